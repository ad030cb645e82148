/*
 * imp/rng.h - the library's deterministic random generator.
 *
 * xoshiro256** (Blackman and Vigna, 2018) seeded through splitmix64: the
 * same seed gives the same stream on every platform, so initialization and
 * generated data are reproducible from one number.  The state is a plain
 * value; copy it to fork a stream.
 */
#ifndef IMP_RNG_H
#define IMP_RNG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Generator state; set it with imp_rng_seed before use. */
typedef struct imp_rng {
  uint64_t s[4];
} imp_rng;

/** Seed the generator; every seed, 0 included, is valid. */
void imp_rng_seed(imp_rng *rng, uint64_t seed);

/** The next 64 random bits. */
uint64_t imp_rng_next(imp_rng *rng);

/** Uniform on [0, 1), 53 random bits. */
double imp_rng_uniform(imp_rng *rng);

/** Uniform integer on [0, n) without modulo bias; 0 when n is 0. */
uint64_t imp_rng_below(imp_rng *rng, uint64_t n);

/** Standard normal (Marsaglia's polar method, no cached spare value, so
 *  the state alone determines the stream). */
double imp_rng_normal(imp_rng *rng);

/** Fill a[0..n) with normal samples of the given mean and deviation. */
void imp_rng_fill_normal(imp_rng *rng, double *a, size_t n, double mean,
                         double stddev);

/** Fill a[0..n) with uniform samples on [lo, hi). */
void imp_rng_fill_uniform(imp_rng *rng, double *a, size_t n, double lo,
                          double hi);

/** Shuffle idx[0..n) in place (Fisher-Yates). */
void imp_rng_shuffle(imp_rng *rng, size_t *idx, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* IMP_RNG_H */

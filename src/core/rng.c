/*
 * core/rng.c - xoshiro256** seeded by splitmix64.
 */
#include <math.h>

#include "imp/rng.h"

static uint64_t splitmix64(uint64_t *x)
{
  uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);

  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
  return (x << k) | (x >> (64 - k));
}

void imp_rng_seed(imp_rng *rng, uint64_t seed)
{
  for (int i = 0; i < 4; i++)
    rng->s[i] = splitmix64(&seed);
}

uint64_t imp_rng_next(imp_rng *rng)
{
  uint64_t *s = rng->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;

  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double imp_rng_uniform(imp_rng *rng)
{
  return (double)(imp_rng_next(rng) >> 11) * 0x1.0p-53;
}

uint64_t imp_rng_below(imp_rng *rng, uint64_t n)
{
  uint64_t limit, r;

  if (n == 0)
    return 0;
  /* Reject the top partial block so every residue is equally likely. */
  limit = UINT64_MAX - UINT64_MAX % n;
  do
    r = imp_rng_next(rng);
  while (r >= limit);
  return r % n;
}

double imp_rng_normal(imp_rng *rng)
{
  double u, v, s;

  do {
    u = 2.0 * imp_rng_uniform(rng) - 1.0;
    v = 2.0 * imp_rng_uniform(rng) - 1.0;
    s = u * u + v * v;
  } while (s >= 1.0 || s == 0.0);
  return u * sqrt(-2.0 * log(s) / s);
}

void imp_rng_fill_normal(imp_rng *rng, double *a, size_t n, double mean,
                         double stddev)
{
  for (size_t i = 0; i < n; i++)
    a[i] = mean + stddev * imp_rng_normal(rng);
}

void imp_rng_fill_uniform(imp_rng *rng, double *a, size_t n, double lo,
                          double hi)
{
  for (size_t i = 0; i < n; i++)
    a[i] = lo + (hi - lo) * imp_rng_uniform(rng);
}

void imp_rng_shuffle(imp_rng *rng, size_t *idx, size_t n)
{
  for (size_t i = n; i > 1; i--) {
    size_t j = (size_t)imp_rng_below(rng, i);
    size_t t = idx[i - 1];

    idx[i - 1] = idx[j];
    idx[j] = t;
  }
}

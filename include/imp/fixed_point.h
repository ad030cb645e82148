/*
 * imp/fixed_point.h - batched fixed-point solvers: z = T(z), per sample.
 *
 * A batch of n independent problems z_b = T_b(z_b), each z_b in R^d, is
 * solved by one driver that owns the loop, the stopping test and the
 * bookkeeping, and one solver type that turns the current iterate z and
 * its image g = T(z) into the next iterate.  This is the GSL pattern of
 * multiroot: a const type table per algorithm, each in a file of its own
 * (src/deq/picard.c, anderson.c, broyden.c), and the user's choice is a
 * pointer to one of them.
 *
 *   picard    z <- (1 - tau) z + tau g, damped Picard (Mann) iteration;
 *             converges for any contraction, at its rate.
 *   anderson  Anderson acceleration (Anderson 1965; Walker and Ni 2011):
 *             the next iterate mixes the last m images with weights alpha
 *             that minimize || sum_i alpha_i (g_i - z_i) || subject to
 *             sum_i alpha_i = 1, regularized by a ridge lambda; a singular
 *             or non-finite mixing system falls back to a Picard step.
 *   broyden   limited-memory "good" Broyden on r(z) = g - z = 0, keeping
 *             m rank-one updates of the inverse Jacobian; restarts when the
 *             memory is full or an update degenerates.
 *
 * Each sample stops on its own when ||g - z|| <= atol or
 * ||g - z|| <= rtol ||g||, and is then no longer evaluated: T is called
 * only on the samples still active.  (A relative test alone is fooled by
 * iterates that run off to infinity, where ||g - z|| / ||g|| -> 0: set
 * atol, with rtol = 0, where that can happen.)  The driver returns, for
 * every sample, the iterate with the lowest residual it has seen, and
 * IMP_ENOCONV if any sample is still above tolerance when the budget runs
 * out (never silently).
 */
#ifndef IMP_FIXED_POINT_H
#define IMP_FIXED_POINT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * The map: out = T(z) for the m samples whose batch indices are idx[0..m),
 * with z and out packed as m x d rows in that order.  Returns 0 on success.
 */
typedef int (*imp_fp_map_fn)(void *ctx, size_t m, const size_t *idx,
                             const double *z, double *out);

/** Options; a zero field means the default beside it. */
typedef struct imp_fp_options {
  size_t max_iter; /**< evaluations of T per sample; default 50 */
  double atol;     /**< absolute residual tolerance; default 0 (off) */
  double rtol;     /**< relative residual tolerance; default 1e-6 */
  size_t memory;   /**< anderson and broyden: history length m; default 5 */
  double damping;  /**< picard tau, anderson beta; default 1 */
  double ridge;    /**< anderson: Tikhonov lambda; default 1e-10 */
} imp_fp_options;

/** What a solve did. */
typedef struct imp_fp_stats {
  size_t iterations;   /**< driver iterations (the most any sample took) */
  size_t evaluations;  /**< sample evaluations of T, summed over samples */
  double abs_residual; /**< max over samples of ||T(z) - z|| at the result */
  double rel_residual; /**< max over samples of ||T(z) - z|| / ||T(z)|| */
  size_t converged;    /**< number of samples within tolerance */
  size_t fallbacks;    /**< anderson/broyden steps replaced by picard */
} imp_fp_stats;

/** A solver type: one algorithm, behind a table of operations. */
typedef struct imp_fp_type {
  const char *name;
  /** Allocate per-sample state for n samples of size d. */
  int (*alloc)(void **state, size_t n, size_t d, const imp_fp_options *opt);
  /**
   * Given z and g = T(z) for the m active samples idx (packed m x d),
   * write the next iterates to z_next (packed); count fallbacks.
   */
  int (*update)(void *state, size_t m, const size_t *idx, const double *z,
                const double *g, double *z_next, size_t *fallbacks);
  void (*free)(void *state);
} imp_fp_type;

extern const imp_fp_type *const imp_fp_picard;
extern const imp_fp_type *const imp_fp_anderson;
extern const imp_fp_type *const imp_fp_broyden;

/** Look a type up by name ("picard", "anderson", "broyden"); NULL if
 *  unknown. */
const imp_fp_type *imp_fp_type_by_name(const char *name);

/**
 * Solve z_b = T(z_b) for b < n.  z (n x d) holds the initial iterates on
 * entry and the best iterates on return, also on IMP_ENOCONV.  trace, if
 * not NULL, receives the largest relative residual over the active samples
 * at each iteration (max_iter entries; *trace_len set).  opt and stats may
 * be NULL.  Returns IMP_OK, IMP_ENOCONV (best iterates in z), IMP_EINVAL,
 * IMP_ECALLBACK, IMP_ENONFINITE (T produced NaN/Inf; z holds the best
 * finite iterates), IMP_ENOMEM.
 */
int imp_fp_solve(const imp_fp_type *type, imp_fp_map_fn map, void *ctx,
                 size_t n, size_t d, double *z, const imp_fp_options *opt,
                 imp_fp_stats *stats, double *trace, size_t *trace_len);

#ifdef __cplusplus
}
#endif

#endif /* IMP_FIXED_POINT_H */

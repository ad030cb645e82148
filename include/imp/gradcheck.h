/*
 * imp/gradcheck.h - finite-difference gradient checks.
 *
 * Every gradient imp computes is tested against finite differences with
 * this checker.  It perturbs one parameter at a time and compares the
 * analytic gradient with a central difference quotient of the objective:
 * second order, (L(p + h) - L(p - h)) / 2h, or fourth order,
 * (-L(p + 2h) + 8 L(p + h) - 8 L(p - h) + L(p - 2h)) / 12h.
 * The error reported for entry i is
 *
 *     |g_i - d_i| / max(|g_i|, |d_i|, floor),
 *
 * so entries far below floor are compared absolutely.
 */
#ifndef IMP_GRADCHECK_H
#define IMP_GRADCHECK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** A scalar objective L(params); returns 0 on success. */
typedef int (*imp_objective_fn)(void *ctx, const double *params, double *value);

/** Options; zero fields mean the defaults beside them. */
typedef struct imp_gradcheck_options {
  double h;     /**< step, scaled by max(1, |p_i|); default 1e-5 (order 2)
                     or 1e-3 (order 4) */
  double floor; /**< absolute floor of the error's denominator;
                     default 1e-8 */
  int order;    /**< 2 or 4; default 4 */
} imp_gradcheck_options;

/** The outcome of a check. */
typedef struct imp_gradcheck_result {
  double max_rel_err; /**< the worst error over all entries */
  size_t worst;       /**< the entry where it occurred */
  double analytic;    /**< g at that entry */
  double numeric;     /**< the difference quotient at that entry */
  size_t evaluations; /**< objective evaluations spent */
} imp_gradcheck_result;

/**
 * Compare grad (size n) with finite differences of f at params (size n).
 * params is perturbed in place and restored bit for bit before return.
 * opt may be NULL.  Returns IMP_OK; IMP_EINVAL; IMP_ECALLBACK if the
 * objective fails (the error message names the entry); IMP_ENONFINITE if
 * it returns NaN or Inf.
 */
int imp_gradcheck(imp_objective_fn f, void *ctx, double *params, size_t n,
                  const double *grad, const imp_gradcheck_options *opt,
                  imp_gradcheck_result *result);

#ifdef __cplusplus
}
#endif

#endif /* IMP_GRADCHECK_H */

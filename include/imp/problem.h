/*
 * imp/problem.h - the implicit problem, the value type behind every layer.
 *
 * An implicit problem defines y as a function of an input x and parameters
 * theta through an equation
 *
 *     f(x, y; theta) = 0,      x in R^nx, y in R^ny, theta in R^ntheta,
 *
 * with f mapping into R^ny.  The user supplies f (the residual) and its
 * vector-Jacobian product.  Root-finding, equilibrium, optimization and ODE
 * layers are all built on this one type, and all are differentiated by the
 * same adjoint solve (imp/adjoint.h).
 *
 * Callback contract, shared by every callback below:
 *   - vectors are dense doubles; matrices are row-major;
 *   - the callback returns 0 on success and any non-zero value on failure,
 *     which the library reports as IMP_ECALLBACK and stops cleanly; a
 *     callback may instead return one of imp's negative statuses (say
 *     IMP_ENOMEM, or the status of an imp call it made), which is passed
 *     on as it is;
 *   - ctx is the problem's ctx pointer, passed through untouched.
 */
#ifndef IMP_PROBLEM_H
#define IMP_PROBLEM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** r = f(x, y; theta), r of size ny. */
typedef int (*imp_residual_fn)(void *ctx, const double *x, const double *y,
                               const double *theta, double *r);

/**
 * Vector-Jacobian products with the cotangent v (size ny):
 *   vjp_y      = v^T df/dy      (size ny, overwritten),
 *   vjp_x     += v^T df/dx      (size nx, accumulated),
 *   vjp_theta += v^T df/dtheta  (size ntheta, accumulated).
 * Any output pointer may be NULL, meaning "not needed".
 */
typedef int (*imp_vjp_fn)(void *ctx, const double *x, const double *y,
                          const double *theta, const double *v, double *vjp_y,
                          double *vjp_x, double *vjp_theta);

/** Optional: out = (df/dy) u, u and out of size ny. */
typedef int (*imp_jvp_fn)(void *ctx, const double *x, const double *y,
                          const double *theta, const double *u, double *out);

/** Optional: the dense Jacobian df/dy, ny x ny row-major:
 *  jac[i * ny + j] = d f_i / d y_j. */
typedef int (*imp_jacobian_fn)(void *ctx, const double *x, const double *y,
                               const double *theta, double *jac);

/**
 * The implicit problem.  A plain value: fill it with a designated
 * initializer.  The library never takes ownership of ctx.
 */
typedef struct imp_problem {
  size_t nx;                /**< input size (may be 0) */
  size_t ny;                /**< number of unknowns and of equations, > 0 */
  size_t ntheta;            /**< number of parameters (may be 0) */
  imp_residual_fn residual; /**< required */
  imp_vjp_fn vjp;           /**< required for gradients */
  imp_jvp_fn jvp;           /**< optional */
  imp_jacobian_fn jacobian; /**< optional */
  void *ctx;                /**< passed to every callback */
} imp_problem;

/**
 * Check that a problem is well formed: ny > 0 and a residual.  With
 * need_vjp, a vjp callback is required too.  Returns IMP_OK or IMP_EINVAL
 * with a message naming the missing piece.
 */
int imp_problem_check(const imp_problem *p, int need_vjp);

/**
 * Evaluate the residual through the problem's callback, turning a callback
 * failure into IMP_ECALLBACK and a non-finite entry of r into
 * IMP_ENONFINITE.  theta may be NULL when ntheta is 0, x when nx is 0.
 */
int imp_problem_residual(const imp_problem *p, const double *x, const double *y,
                         const double *theta, double *r);

/**
 * Evaluate the vjp through the callback, with the same checks on every
 * output that is not NULL.
 */
int imp_problem_vjp(const imp_problem *p, const double *x, const double *y,
                    const double *theta, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_theta);

/**
 * The dense Jacobian df/dy (ny x ny, row-major, caller-allocated): from the
 * jacobian callback when there is one, else column by column from the jvp,
 * else row by row from ny vjp calls.  *ncalls, if not NULL, receives the
 * number of callback calls spent.
 */
int imp_problem_jacobian(const imp_problem *p, const double *x, const double *y,
                         const double *theta, double *jac, size_t *ncalls);

#ifdef __cplusplus
}
#endif

#endif /* IMP_PROBLEM_H */

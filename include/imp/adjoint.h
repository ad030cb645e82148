/*
 * imp/adjoint.h - the one differentiation path shared by every layer.
 *
 * Let y*(x, theta) solve f(x, y; theta) = 0 and let L be a loss with
 * ybar = dL/dy.  If df/dy is invertible at y*, the implicit function
 * theorem gives the derivative of y* in x as -(df/dy)^-1 df/dx, so with
 * the adjoint v solving
 *
 *     (df/dy)^T v = -ybar,
 *
 * the gradients are xbar = (df/dx)^T v and thetabar = (df/dtheta)^T v.
 * Solving for v is itself an implicit problem, linear in v, and costs one
 * linear solve no matter how many iterations the forward solver took.
 *
 * Two solvers are offered:
 *   - dense LU (LAPACK dgetrf/dgetrs) on df/dy, taken from the problem's
 *     jacobian callback or assembled from ny vjp calls; the condition number
 *     is estimated (dgecon) and a singular or ill-conditioned Jacobian is
 *     reported as IMP_ESINGULAR, never passed on as a huge gradient;
 *   - restarted GMRES (Saad and Schultz, 1986) that needs only the vjp,
 *     for large ny; the condition of the Krylov projection (the Arnoldi
 *     Hessenberg matrix) serves as the condition estimate.
 */
#ifndef IMP_ADJOINT_H
#define IMP_ADJOINT_H

#include <stddef.h>

#include "imp/problem.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Which linear solver the adjoint solve uses. */
typedef enum imp_adjoint_method {
  IMP_ADJOINT_AUTO = 0, /**< dense LU if ny <= dense_max or a Jacobian
                             callback exists, otherwise GMRES */
  IMP_ADJOINT_DENSE_LU, /**< LAPACK LU with condition estimate */
  IMP_ADJOINT_GMRES     /**< matrix-free restarted GMRES on the vjp */
} imp_adjoint_method;

/**
 * Options of the adjoint solve.  A zero-initialized struct (or NULL) means
 * the defaults written beside each field.
 */
typedef struct imp_adjoint_options {
  imp_adjoint_method method; /**< default IMP_ADJOINT_AUTO */
  double max_cond;           /**< estimated condition number above which the
                          Jacobian counts as singular; default 1e12 */
  size_t dense_max;          /**< AUTO: largest ny for dense LU; default 256 */
  size_t restart;            /**< GMRES restart length; default min(ny, 40) */
  size_t max_iter; /**< GMRES iterations in all; default 20 * ny + 100 */
  double rtol;     /**< GMRES: ||J^T v + ybar|| <= rtol ||ybar||;
                          default 1e-11 */
} imp_adjoint_options;

/** What one adjoint solve did. */
typedef struct imp_adjoint_stats {
  imp_adjoint_method method; /**< the solver actually used */
  size_t vjp_calls;          /**< vjp evaluations, the final one included */
  size_t jacobian_calls;     /**< jacobian callback evaluations */
  size_t iterations;         /**< GMRES iterations (0 for dense LU) */
  double residual;           /**< ||J^T v + ybar|| / ||ybar|| */
  double cond;               /**< estimated condition number of df/dy */
} imp_adjoint_stats;

/**
 * Solve (df/dy)^T v = -ybar at (x, y, theta), then accumulate
 * xbar += (df/dx)^T v and thetabar += (df/dtheta)^T v.
 *
 *   ybar      size ny, required;
 *   v         size ny, optional output (the adjoint itself);
 *   xbar      size nx, accumulated, may be NULL;
 *   thetabar  size ntheta, accumulated, may be NULL;
 *   opt       may be NULL (defaults);  stats may be NULL.
 *
 * Returns IMP_OK; IMP_EINVAL for a malformed problem or NULL ybar;
 * IMP_ENONFINITE for a non-finite ybar or result; IMP_ESINGULAR when the
 * estimated condition number exceeds max_cond (stats->cond holds it);
 * IMP_ENOCONV when GMRES misses rtol within max_iter; IMP_ECALLBACK;
 * IMP_ENOMEM.  On failure xbar and thetabar are left unchanged.
 */
int imp_adjoint_solve(const imp_problem *p, const double *x, const double *y,
                      const double *theta, const double *ybar, double *v,
                      double *xbar, double *thetabar,
                      const imp_adjoint_options *opt, imp_adjoint_stats *stats);

#ifdef __cplusplus
}
#endif

#endif /* IMP_ADJOINT_H */

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
 *     Hessenberg matrix) serves as the condition estimate;
 *   - for problems in fixed-point form f = y - h(x, y), the adjoint fixed
 *     point u = (dh/dy)^T u + ybar, v = -u, solved with one of the
 *     fixed-point solvers of imp/fixed_point.h.  Since
 *     (dh/dy)^T u = u - (df/dy)^T u, it needs only the vjp of f, and it
 *     converges whenever the forward iteration contracts.  No condition
 *     number is estimated (stats->cond is 0).
 */
#ifndef IMP_ADJOINT_H
#define IMP_ADJOINT_H

#include <stddef.h>

#include "imp/fixed_point.h"
#include "imp/problem.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Which linear solver the adjoint solve uses. */
typedef enum imp_adjoint_method {
  IMP_ADJOINT_AUTO = 0, /**< dense LU if ny <= dense_max or a Jacobian
                             callback exists, otherwise GMRES */
  IMP_ADJOINT_DENSE_LU, /**< LAPACK LU with condition estimate */
  IMP_ADJOINT_GMRES,    /**< matrix-free restarted GMRES on the vjp */
  /** u = u - (df/dy)^T u + ybar by a fixed-point solver; for problems
   *  f = y - h with h contractive. */
  IMP_ADJOINT_FIXED_POINT
} imp_adjoint_method;

/**
 * Buffers kept from one adjoint solve to the next, so that a layer that
 * solves many systems of one size does not allocate and fault in a dense
 * Jacobian each time.  Not safe to share between threads at once.
 */
typedef struct imp_adjoint_workspace imp_adjoint_workspace;

/** Make an empty workspace; the caller frees it with
 *  imp_adjoint_workspace_free.  Returns IMP_EINVAL or IMP_ENOMEM. */
int imp_adjoint_workspace_create(imp_adjoint_workspace **out);

/** Free a workspace; NULL is accepted. */
void imp_adjoint_workspace_free(imp_adjoint_workspace *workspace);

/**
 * Options of the adjoint solve.  A zero-initialized struct (or NULL) means
 * the defaults written beside each field.
 */
typedef struct imp_adjoint_options {
  /** Default IMP_ADJOINT_AUTO. */
  imp_adjoint_method method;
  /** Estimated condition number above which df/dy counts as singular;
   *  default 1e12. */
  double max_cond;
  /** AUTO: the largest ny solved by dense LU; default 256. */
  size_t dense_max;
  /** GMRES restart length; default min(ny, 40). */
  size_t restart;
  /** GMRES or fixed-point iterations in all; default 20 ny + 100. */
  size_t max_iter;
  /** GMRES: stop at ||J^T v + ybar|| <= rtol ||ybar||; fixed point: the
   *  driver's relative residual; default 1e-11. */
  double rtol;
  /** Fixed point: the solver type; default imp_fp_anderson. */
  const imp_fp_type *fp_solver;
  /** Fixed point: df/dy is block diagonal with this many equal blocks (a
   *  batch), each solved and stopped on its own; default 1. */
  size_t blocks;
  /** Fixed point: the solver's memory, damping and ridge (its max_iter and
   *  tolerances are ignored: max_iter and rtol above apply). */
  imp_fp_options fp;
  /** Dense LU: buffers to reuse (borrowed); NULL allocates per call. */
  imp_adjoint_workspace *workspace;
} imp_adjoint_options;

/** What one adjoint solve did. */
typedef struct imp_adjoint_stats {
  /** The solver actually used. */
  imp_adjoint_method method;
  /** vjp evaluations, the final accumulation included. */
  size_t vjp_calls;
  /** jacobian callback evaluations. */
  size_t jacobian_calls;
  /** GMRES or fixed-point iterations (0 for dense LU). */
  size_t iterations;
  /** ||J^T v + ybar|| / ||ybar||. */
  double residual;
  /** Estimated condition number of df/dy; 0 if not estimated. */
  double cond;
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

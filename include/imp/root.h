/*
 * imp/root.h - root-finding layers on GSL multiroot.
 *
 * A root-finding layer maps an input x to a zero y* of an implicit problem
 * (imp/problem.h),
 *
 *     f(x, y*; theta) = 0,     x in R^nx, y* in R^ny, theta in R^ntheta,
 *
 * found by one of GSL's multiroot solvers from an initial guess.  Its
 * gradient comes from the implicit function theorem, not from the solver's
 * iterations: with J = df/dy at y*, the adjoint v solves J^T v = -ybar and
 * xbar = (df/dx)^T v, thetabar = (df/dtheta)^T v (imp_adjoint_solve).
 *
 * Solvers, by their GSL names:
 *   needing only the residual (GSL's gsl_multiroot_fsolver):
 *     hybrids   Powell's hybrid dogleg method, scaled (MINPACK's hybrd,
 *               More, Garbow and Hillstrom); the default
 *     hybrid    the same without the scaling of the variables
 *     dnewton   Newton's method on a finite-difference Jacobian
 *     broyden   Broyden's rank-one secant updates of that Jacobian
 *   needing df/dy (gsl_multiroot_fdfsolver), which the problem provides
 *   through its jacobian callback or, failing that, is assembled column by
 *   column from its jvp or row by row from its vjp (imp_problem_jacobian):
 *     hybridsj  hybrids with the exact Jacobian (MINPACK's hybrj)
 *     hybridj   hybrid with the exact Jacobian
 *     newton    Newton's method
 *     gnewton   Newton's method with a step reduced until ||f||_2 falls
 *
 * Convergence: a sample has converged when sum_i |f_i| < residual_tol
 * (GSL's gsl_multiroot_test_residual), tested at the start and after each
 * iteration.  With step_tol > 0 it has also converged when the last step
 * has |dy_i| < step_tol (1 + |y_i|) (gsl_multiroot_test_delta) and a full
 * Newton step from the iterate, J d = -f with J = df/dy there, has
 * |d_i| < step_tol (1 + |y_i|) too.  A short step alone proves nothing:
 * the hybrid solvers report their trial step even when the trust region
 * rejected it, and gnewton shortens its steps wherever ||f|| stops
 * falling, root or not; a short Newton step places a root about that
 * far away when J changes slowly (Kantorovich's theorem).  J comes from
 * the problem's jacobian, jvp or vjp, or from forward differences of the
 * residual if it has none, and costs one Jacobian and one LU
 * factorization each time the step test passes but the residual test
 * does not; a singular J confirms nothing, and an unconfirmed step test
 * lets the iteration go on.  A sample that misses the tests within
 * max_iter iterations, or whose solver stops making progress, fails with
 * IMP_ENOCONV and the residual in the message, which also says when the
 * steps stalled away from a root: a root layer never returns an
 * unconverged result as if it were a root.
 *
 * Backward first checks that the root is regular to the accuracy of the
 * forward solve, because the computed root y is only a root of f - f(y):
 * at a singular root such as f(y) = y^2, whose computed root y ~ sqrt(tol)
 * has the perfectly conditioned 1 x 1 Jacobian 2y, the gradient would be
 * huge and meaningless.  With s = J^-1 f(y) scaled up to the tolerance
 * (the Newton correction that the solve could not resolve),
 * D = J(y - s) - J(y) and C = diag(||J e_j||_2), the norms of J's
 * columns, the column-equilibrated Jacobian (J + t D) C^-1 on the segment
 * y - t s, 0 <= t <= 4, has condition number at most
 * kappa(J C^-1) (1 + 4w) / (1 - 4w), where w = ||C J^-1 D C^-1||_inf (a
 * Kantorovich-style bound).  Equilibrating makes the check independent of
 * the units of y: under y = S z the plain ||J^-1 D||_inf becomes
 * ||S (J_z^-1 D_z) S^-1||_inf, which grows with the spread of S, while C
 * scales with S and cancels.  If kappa(J), the matrix the adjoint solves
 * with, exceeds the adjoint's max_cond, or 4w >= 1, or the bound exceeds
 * max_cond, backward fails with IMP_ESINGULAR and the condition number in
 * the message.  The check assembles two dense Jacobians; it runs when
 * ny <= IMP_ROOT_CHECK_MAX and can be turned off.
 *
 * Statuses: IMP_ENOCONV (budget spent or no progress), IMP_ESINGULAR (a
 * Newton solver met a singular Jacobian, or backward a singular root),
 * IMP_ECALLBACK (a user callback failed, also inside a GSL iteration),
 * IMP_ENONFINITE (NaN or Inf in an input, iterate or residual),
 * IMP_EBACKEND (any other GSL failure, with GSL's reason), IMP_EINVAL,
 * IMP_ESHAPE, IMP_ENOMEM.
 *
 * GSL's error handler aborts by default.  Every function here turns it off
 * on entry with gsl_set_error_handler_off() and restores the caller's
 * handler before returning, so a user's own handler is left as it was.
 * The handler is process-wide state of GSL: like any GSL caller that
 * changes it, these functions must not race another thread doing so.
 *
 * Example: y* = cube root of x, the zero of f(x, y) = y^3 - x.
 *
 *     static int cube(void *ctx, const double *x, const double *y,
 *                     const double *theta, double *r)
 *     {
 *       (void)ctx; (void)theta;
 *       r[0] = y[0] * y[0] * y[0] - x[0];
 *       return 0;
 *     }
 *     static int cube_vjp(void *ctx, const double *x, const double *y,
 *                         const double *theta, const double *v,
 *                         double *vy, double *vx, double *vtheta)
 *     {
 *       (void)ctx; (void)x; (void)theta; (void)vtheta;
 *       if (vy != NULL) vy[0] = 3.0 * y[0] * y[0] * v[0];
 *       if (vx != NULL) vx[0] += -v[0];
 *       return 0;
 *     }
 *
 *     imp_problem p = {.nx = 1, .ny = 1, .residual = cube,
 *                      .vjp = cube_vjp};
 *     double y0 = 1.0, x[2] = {8.0, 27.0}, y[2], ybar[2] = {1, 1};
 *     double xbar[2] = {0, 0};
 *     imp_root_options opt = {.solver = IMP_ROOT_NEWTON, .initial = &y0};
 *     imp_shape in = {2, 1, 1, 1};
 *     imp_layer *layer;
 *
 *     if (imp_root_layer_create(&p, NULL, &opt, "cbrt", &layer) != IMP_OK)
 *       return 1;
 *     imp_layer_forward(layer, &in, x, y);                 y = {2, 3}
 *     imp_layer_backward(layer, xbar, ybar, &in, x, y);    xbar = {1/12,
 *     imp_layer_free(layer);                                       1/27}
 */
#ifndef IMP_ROOT_H
#define IMP_ROOT_H

#include <stddef.h>

#include "imp/adjoint.h"
#include "imp/layer.h"
#include "imp/problem.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The GSL multiroot solvers; the first four need only the residual. */
typedef enum imp_root_solver {
  IMP_ROOT_HYBRIDS = 0, /**< the default */
  IMP_ROOT_HYBRID,
  IMP_ROOT_DNEWTON,
  IMP_ROOT_BROYDEN,
  IMP_ROOT_HYBRIDSJ,
  IMP_ROOT_HYBRIDJ,
  IMP_ROOT_NEWTON,
  IMP_ROOT_GNEWTON,
  IMP_ROOT_NSOLVERS /**< the number of solvers, not a solver */
} imp_root_solver;

/** Largest ny for which backward runs its regularity check. */
#define IMP_ROOT_CHECK_MAX 256

/** The solver's GSL name ("hybrids", ...), or "unknown"; static string. */
const char *imp_root_solver_name(imp_root_solver solver);

/** The solver with that GSL name.  Returns IMP_OK, or IMP_EINVAL for NULL
 *  or an unknown name (the message lists the known ones). */
int imp_root_solver_lookup(const char *name, imp_root_solver *solver);

/** 1 if the solver needs df/dy (an fdfsolver), 0 if not. */
int imp_root_solver_needs_jacobian(imp_root_solver solver);

/**
 * Options.  A zero-initialized struct, or NULL, means the defaults written
 * beside each field.
 */
typedef struct imp_root_options {
  imp_root_solver solver;      /**< default IMP_ROOT_HYBRIDS */
  double residual_tol;         /**< converged when sum_i |f_i| < residual_tol;
                               default 1e-10 */
  double step_tol;             /**< > 0: also converged when the last step
                               and a full Newton step from the iterate
                               both have |dy_i| < step_tol (1 + |y_i|);
                               default 0, off */
  size_t max_iter;             /**< iterations per sample; default 1000 */
  const double *initial;       /**< the layer's initial guess, ny doubles,
                               copied at creation; NULL means zeros.
                               imp_root_solve ignores it. */
  int warm_start;              /**< layer only: 1 starts each sample from its
                               own last solution; the first forward and any
                               change of batch size start from initial */
  int skip_check;              /**< 1 skips backward's regularity check */
  imp_adjoint_options adjoint; /**< backward's linear solve */
} imp_root_options;

/**
 * What a forward did.  Counts are summed over the samples of the batch;
 * max_iterations and residual are the largest over the batch.
 */
typedef struct imp_root_stats {
  size_t samples;        /**< samples attempted (1 for imp_root_solve) */
  size_t iterations;     /**< solver iterations, summed */
  size_t max_iterations; /**< the most iterations any one sample took */
  size_t function_evals; /**< residual evaluations, summed; for the
                              solvers without a Jacobian this includes the
                              finite-difference columns */
  size_t jacobian_evals; /**< Jacobians formed for the fdfsolvers, summed,
                              however assembled */
  double residual;       /**< the largest final sum_i |f_i| */
} imp_root_stats;

/**
 * Solve f(x, y; theta) = 0 for one sample, without a layer.  y_inout (ny)
 * holds the initial guess on entry and the root on success; on failure it
 * is left unchanged.  x (nx) and theta (ntheta) may be NULL when their
 * size is 0.  opt may be NULL; its initial and warm_start fields are not
 * used.  stats, if not NULL, receives the counts even on failure.  The
 * GSL workspace is allocated and freed inside the call; the caller keeps
 * ownership of everything passed in.
 */
int imp_root_solve(const imp_problem *problem, const imp_root_options *opt,
                   const double *x, const double *theta, double *y_inout,
                   imp_root_stats *stats);

/**
 * The backward of one sample at a root y: the regularity check (unless
 * opt->skip_check), then imp_adjoint_solve, which accumulates
 * xbar += (dy/dx)^T ybar (nx, may be NULL) and thetabar += (dy/dtheta)^T
 * ybar (ntheta, may be NULL).  The problem needs a vjp.  opt and stats may
 * be NULL.  On failure xbar and thetabar are unchanged.  Nothing passed in
 * changes owner.
 */
int imp_root_backward(const imp_problem *problem, const imp_root_options *opt,
                      const double *x, const double *theta, const double *y,
                      const double *ybar, double *xbar, double *thetabar,
                      imp_adjoint_stats *stats);

/**
 * Make a root-finding layer: input (n, nx, 1, 1), output (n, ny, 1, 1),
 * parameters theta (ntheta doubles, copied from theta, which may be NULL
 * when ntheta is 0).  The problem struct is copied; its ctx stays the
 * caller's and must outlive the layer.  opt (may be NULL) is copied, and
 * opt->initial with it.  name may be NULL ("root").  The GSL solver is
 * allocated once here and reused by every forward.  Free the layer with
 * imp_layer_free.  Returns IMP_EINVAL for a malformed problem, bad options,
 * or a Jacobian solver on a problem without jacobian, jvp or vjp;
 * IMP_ENONFINITE for NaN or Inf in theta or initial; IMP_ENOMEM.
 *
 * imp_layer_forward first checks the shape and looks for NaN or Inf in x
 * and theta; a forward it refuses returns before the layer runs and
 * leaves y, and the layer's statistics, as they were.  A forward that
 * reaches the layer solves the samples in order and stops at the first
 * failure, whose status it returns with the sample's index in the
 * message; y is then filled with NaN, so that a caller who ignores the
 * status cannot take it for a root.  Backward calls imp_root_backward on
 * each sample and adds to xbar and the layer's gradients only once all
 * succeeded.
 */
int imp_root_layer_create(const imp_problem *problem, const double *theta,
                          const imp_root_options *opt, const char *name,
                          imp_layer **out);

/** The statistics of the most recent forward that reached the layer,
 *  successful or not; a forward that imp_layer_forward's own checks
 *  refused (NULL arguments, shape, NaN or Inf in x or theta) leaves them
 *  as they were.  Returns IMP_EINVAL if layer is not a root layer. */
int imp_root_layer_stats(const imp_layer *layer, imp_root_stats *stats);

/** Forget the warm-start solutions, so that the next forward starts every
 *  sample from the initial guess.  Returns IMP_EINVAL if layer is not a
 *  root layer. */
int imp_root_layer_reset(imp_layer *layer);

#ifdef __cplusplus
}
#endif

#endif /* IMP_ROOT_H */

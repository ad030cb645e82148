/*
 * root/solve.c - one GSL multiroot solve of an implicit problem: the
 * wrappers that GSL calls, the iteration with its convergence tests, and
 * the translation of GSL's outcomes into imp statuses.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gsl/gsl_errno.h>
#include <gsl/gsl_multiroots.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "root/internal.h"

/* The last error message, copied to buf, without its own "name: " lead
 * for status rc, which a new message on it repeats. */
static const char *last_message(int rc, char *buf, size_t size)
{
  const char *status_name = imp_status_name(rc);
  size_t len = strlen(status_name);

  snprintf(buf, size, "%s", imp_last_error());
  if (strncmp(buf, status_name, len) == 0 && buf[len] == ':' &&
      buf[len + 1] == ' ')
    return buf + len + 2;
  return buf;
}

int imp__root_rewrap(int rc, const char *prefix)
{
  char inner[512];

  return imp__fail(rc, "%s: %s", prefix, last_message(rc, inner, sizeof inner));
}

static int valid_tolerance(double t)
{
  return isfinite(t) && t >= 0.0;
}

int imp__root_configure(const imp_problem *p, const imp_root_options *opt,
                        imp__root_config *cfg)
{
  imp_root_options o = {0};

  IMP__TRY(imp_problem_check(p, 0));
  if (opt != NULL)
    o = *opt;
  if ((unsigned)o.solver >= (unsigned)IMP_ROOT_NSOLVERS)
    return imp__fail(IMP_EINVAL, "root: unknown solver %d", (int)o.solver);
  if (!valid_tolerance(o.residual_tol) || !valid_tolerance(o.step_tol))
    return imp__fail(IMP_EINVAL,
                     "root: tolerances must be finite and >= 0 "
                     "(residual_tol %g, step_tol %g)",
                     o.residual_tol, o.step_tol);
  if (imp_root_solver_needs_jacobian(o.solver) && p->jacobian == NULL &&
      p->jvp == NULL && p->vjp == NULL)
    return imp__fail(IMP_EINVAL,
                     "root: solver %s needs df/dy, but the "
                     "problem has no jacobian, jvp or vjp "
                     "callback",
                     imp_root_solver_name(o.solver));

  cfg->solver = o.solver;
  cfg->residual_tol = o.residual_tol > 0.0 ? o.residual_tol : 1e-10;
  cfg->step_tol = o.step_tol;
  cfg->max_iter = o.max_iter > 0 ? o.max_iter : 1000;
  cfg->skip_check = o.skip_check != 0;
  cfg->adjoint = o.adjoint;
  return IMP_OK;
}

/*
 * The wrappers run once per function evaluation, so their checks are
 * written out here rather than taken from imp_problem_residual, whose
 * messages they repeat: for a two-unknown system a call and a loop more
 * per evaluation are a measurable share of the solve.
 */
static int finite(const double *a, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!isfinite(a[i]))
      return 0;
  return 1;
}

/* The iterate as a contiguous array: GSL's own vectors have stride 1, so
 * the copy is only a safeguard. */
static const double *iterate_values(imp__root_work *w, const gsl_vector *y)
{
  if (y->stride == 1)
    return y->data;
  for (size_t i = 0; i < w->problem.ny; i++)
    w->y_copy[i] = gsl_vector_get(y, i);
  return w->y_copy;
}

/* Every wrapper starts here: refuse to go on after a recorded failure. */
static const double *wrapper_start(imp__root_work *w, const gsl_vector *y)
{
  return w->failure == IMP_OK ? iterate_values(w, y) : NULL;
}

/* Record a non-finite output, blaming the iterate if it was not finite
 * itself.  The iterate is only examined here, off the common path. */
static int nonfinite(imp__root_work *w, const double *yv, const char *what)
{
  if (!finite(yv, w->problem.ny))
    w->failure = imp__fail(IMP_ENONFINITE, "the solver produced an iterate "
                                           "with NaN or Inf");
  else
    w->failure = imp__fail(IMP_ENONFINITE,
                           "%s callback produced NaN or "
                           "Inf",
                           what);
  return GSL_EBADFUNC;
}

/* r = f(x, y; theta) for GSL. */
static int gsl_residual(const gsl_vector *y, void *params, gsl_vector *r)
{
  imp__root_work *w = params;
  const imp_problem *p = &w->problem;
  const double *yv = wrapper_start(w, y);
  double *rv = r->stride == 1 ? r->data : w->r_copy;
  int rc;

  if (yv == NULL)
    return GSL_EBADFUNC;
  w->residual_evals++;
  rc = p->residual(p->ctx, w->x, yv, w->theta, rv);
  if (rc != 0) {
    w->failure = imp__callback_status(rc, "residual callback");
    return GSL_EBADFUNC;
  }
  if (!finite(rv, p->ny))
    return nonfinite(w, yv, "residual");
  if (rv != r->data)
    for (size_t i = 0; i < p->ny; i++)
      gsl_vector_set(r, i, rv[i]);
  return GSL_SUCCESS;
}

/* J = df/dy for GSL, from the problem's jacobian callback, or else
 * assembled from its jvp or vjp. */
static int gsl_jacobian(const gsl_vector *y, void *params, gsl_matrix *J)
{
  imp__root_work *w = params;
  const imp_problem *p = &w->problem;
  size_t n = p->ny;
  const double *yv = wrapper_start(w, y);
  double *jv = J->tda == n ? J->data : w->jac;
  int rc;

  if (yv == NULL)
    return GSL_EBADFUNC;
  w->jacobian_evals++;
  if (p->jacobian != NULL) {
    rc = p->jacobian(p->ctx, w->x, yv, w->theta, jv);
    if (rc != 0) {
      w->failure = imp__callback_status(rc, "jacobian callback");
      return GSL_EBADFUNC;
    }
    if (!finite(jv, n * n))
      return nonfinite(w, yv, "jacobian");
  } else {
    rc = imp_problem_jacobian(p, w->x, yv, w->theta, jv, NULL);
    if (rc != IMP_OK) {
      w->failure = rc;
      return GSL_EBADFUNC;
    }
  }
  if (jv != J->data)
    for (size_t i = 0; i < n; i++)
      memcpy(J->data + i * J->tda, jv + i * n, n * sizeof(double));
  return GSL_SUCCESS;
}

static int gsl_residual_jacobian(const gsl_vector *y, void *params,
                                 gsl_vector *r, gsl_matrix *J)
{
  int status = gsl_residual(y, params, r);

  return status != GSL_SUCCESS ? status : gsl_jacobian(y, params, J);
}

void imp__root_work_free(imp__root_work *w)
{
  if (w->fsolver != NULL)
    gsl_multiroot_fsolver_free(w->fsolver);
  if (w->fdfsolver != NULL)
    gsl_multiroot_fdfsolver_free(w->fdfsolver);
  if (w->start != NULL)
    gsl_vector_free(w->start);
  if (w->newton_jac != NULL)
    gsl_matrix_free(w->newton_jac);
  free(w->y_copy);
  free(w->r_copy);
  free(w->jac);
  free(w->newton_step);
  free(w->newton_pivots);
  w->fsolver = NULL;
  w->fdfsolver = NULL;
  w->start = NULL;
  w->newton_jac = NULL;
  w->y_copy = w->r_copy = w->jac = w->newton_step = NULL;
  w->newton_pivots = NULL;
}

int imp__root_work_init(imp__root_work *w)
{
  size_t n = w->problem.ny;
  const gsl_multiroot_fsolver_type *ftype;
  const gsl_multiroot_fdfsolver_type *fdftype;
  gsl_error_handler_t *previous;
  int newton_check = w->cfg.step_tol > 0.0;

  w->function.f = gsl_residual;
  w->function.n = n;
  w->function.params = w;
  w->function_fdf.f = gsl_residual;
  w->function_fdf.df = gsl_jacobian;
  w->function_fdf.fdf = gsl_residual_jacobian;
  w->function_fdf.n = n;
  w->function_fdf.params = w;

  /* GSL reports a failed allocation through its error handler. */
  ftype = imp__root_fsolver_type(w->cfg.solver);
  fdftype = imp__root_fdfsolver_type(w->cfg.solver);
  previous = gsl_set_error_handler_off();
  if (fdftype != NULL)
    w->fdfsolver = gsl_multiroot_fdfsolver_alloc(fdftype, n);
  else
    w->fsolver = gsl_multiroot_fsolver_alloc(ftype, n);
  w->start = gsl_vector_alloc(n);
  if (newton_check && n <= (size_t)INT_MAX && n <= SIZE_MAX / n)
    w->newton_jac = gsl_matrix_alloc(n, n);
  gsl_set_error_handler(previous);

  w->y_copy = imp__dalloc(n);
  w->r_copy = imp__dalloc(n);
  if (fdftype != NULL && n <= SIZE_MAX / n)
    w->jac = imp__dalloc(n * n);
  if (newton_check) {
    w->newton_step = imp__dalloc(n);
    w->newton_pivots = malloc(n * sizeof(int));
  }
  if ((w->fsolver == NULL && w->fdfsolver == NULL) || w->start == NULL ||
      w->y_copy == NULL || w->r_copy == NULL ||
      (fdftype != NULL && w->jac == NULL) ||
      (newton_check && (w->newton_jac == NULL || w->newton_step == NULL ||
                        w->newton_pivots == NULL))) {
    imp__root_work_free(w);
    return imp__fail(IMP_ENOMEM, "root (%s): workspace for %zu unknowns",
                     imp_root_solver_name(w->cfg.solver), n);
  }
  return IMP_OK;
}

static double residual_l1(const gsl_vector *f)
{
  double sum = 0.0;

  for (size_t i = 0; i < f->size; i++)
    sum += fabs(f->data[i * f->stride]);
  return sum;
}

/*
 * Turn a GSL status (or a failure a wrapper recorded) at iteration iter
 * (0: at the start) into an imp status with a message.
 */
static int translate(const imp__root_work *w, int status, size_t iter,
                     double residual)
{
  const char *name = imp_root_solver_name(w->cfg.solver);
  char where[96];

  if (iter == 0)
    snprintf(where, sizeof where, "root (%s), at the start", name);
  else
    snprintf(where, sizeof where, "root (%s), iteration %zu", name, iter);
  if (w->failure != IMP_OK)
    return imp__root_rewrap(w->failure, where);

  switch (status) {
  case GSL_EBADFUNC:
    return imp__fail(IMP_ENONFINITE,
                     "%s: GSL found a non-finite residual "
                     "or Jacobian (%s)",
                     where, gsl_strerror(status));
  case GSL_ENOPROG:
  case GSL_ENOPROGJ:
    return imp__fail(IMP_ENOCONV,
                     "%s: no progress (GSL: %s); residual "
                     "sum|f_i| = %.3g, tolerance %.3g",
                     where, gsl_strerror(status), residual,
                     w->cfg.residual_tol);
  case GSL_EDOM:
  case GSL_ESING:
  case GSL_EZERODIV:
    return imp__fail(IMP_ESINGULAR,
                     "%s: the solver's Jacobian is singular "
                     "(GSL: %s); residual sum|f_i| = %.3g",
                     where, gsl_strerror(status), residual);
  case GSL_ENOMEM:
    return imp__fail(IMP_ENOMEM, "%s: GSL ran out of memory", where);
  default:
    return imp__fail(IMP_EBACKEND,
                     "%s: GSL error %d (%s); residual "
                     "sum|f_i| = %.3g",
                     where, status, gsl_strerror(status), residual);
  }
}

/*
 * The step test alone cannot tell a root from a stall: GSL's dx holds the
 * hybrid solvers' trial step even when the trust region rejected it, and
 * gnewton shrinks its steps wherever ||f||_2 stops falling, root or not.
 * A full Newton step from the iterate, J d = -f, can tell them apart: the
 * step test is confirmed only if Newton itself would move every unknown
 * by less than the tolerance, |d_i| < step_tol (1 + |y_i|).  J comes from
 * the problem's jacobian, jvp or vjp when it has one, and otherwise from
 * forward differences of the residual, as the solvers that need no
 * Jacobian form it (GSL's differences report a zero column as GSL_ESING).
 * A singular J confirms nothing.  Returns 1 if confirmed; *excess receives
 * max_i |d_i| / (step_tol (1 + |y_i|)).  A callback failure, or a lack of
 * memory, is left in w->failure.
 */
static int newton_confirms(imp__root_work *w, const gsl_vector *root,
                           const gsl_vector *f, double *excess)
{
  const imp_problem *p = &w->problem;
  int n = (int)p->ny, one = 1, info = 0, status;
  double *lu = w->newton_jac->data, *d = w->newton_step, worst = 0.0;

  /* J at the iterate, row-major, which LAPACK reads as J^T. */
  *excess = INFINITY;
  if (p->jacobian != NULL || p->jvp != NULL || p->vjp != NULL)
    status = gsl_jacobian(root, w, w->newton_jac);
  else
    status = gsl_multiroot_fdjacobian(&w->function, root, f,
                                      GSL_SQRT_DBL_EPSILON, w->newton_jac);
  if (status == GSL_ENOMEM && w->failure == IMP_OK)
    w->failure = imp__fail(IMP_ENOMEM, "the finite-difference Jacobian that "
                                       "confirms the step test");
  if (w->failure != IMP_OK || status != GSL_SUCCESS)
    return 0;

  /* d = -J^-1 f from the LU factors of J^T, solved transposed. */
  for (int i = 0; i < n; i++)
    d[i] = -gsl_vector_get(f, (size_t)i);
  dgetrf_(&n, &n, lu, &n, w->newton_pivots, &info);
  if (info != 0)
    return 0;
  dgetrs_("T", &n, &one, lu, &n, w->newton_pivots, d, &n, &info, 1);

  /* The largest step relative to its tolerance; NaN confirms nothing. */
  for (int i = 0; i < n; i++) {
    double yi = gsl_vector_get(root, (size_t)i);
    double ratio = fabs(d[i]) / (w->cfg.step_tol * (1.0 + fabs(yi)));

    if (!(ratio <= worst))
      worst = ratio;
  }
  *excess = worst;
  return worst < 1.0;
}

/* Add to an IMP_ENOCONV message that the step test passed away from a
 * root, so that the user does not look for a loose step_tol. */
static int stalled(const imp__root_work *w, size_t stalls, double excess)
{
  char inner[512];
  const char *text = last_message(IMP_ENOCONV, inner, sizeof inner);

  return imp__fail(IMP_ENOCONV,
                   "%s; the steps stalled away from a root: they passed "
                   "the step test (step_tol %.3g) %zu times, but a full "
                   "Newton step would have moved %.3g times the tolerance",
                   text, w->cfg.step_tol, stalls, excess);
}

int imp__root_work_solve(imp__root_work *w, const double *x,
                         const double *theta, double *y,
                         imp__root_sample *sample)
{
  size_t n = w->problem.ny, iter = 0, stalls = 0;
  gsl_vector *root, *f, *dx;
  int status, rc = IMP_OK, converged = 0;
  double excess = INFINITY;

  w->x = x;
  w->theta = theta;
  w->failure = IMP_OK;
  w->residual_evals = 0;
  w->jacobian_evals = 0;
  memcpy(w->start->data, y, n * sizeof(double));

  /* Hand the start to GSL, which evaluates f (and J) there. */
  if (w->fdfsolver != NULL) {
    status =
        gsl_multiroot_fdfsolver_set(w->fdfsolver, &w->function_fdf, w->start);
    root = w->fdfsolver->x;
    f = w->fdfsolver->f;
    dx = w->fdfsolver->dx;
  } else {
    status = gsl_multiroot_fsolver_set(w->fsolver, &w->function, w->start);
    root = w->fsolver->x;
    f = w->fsolver->f;
    dx = w->fsolver->dx;
  }
  if (status != GSL_SUCCESS || w->failure != IMP_OK)
    rc = translate(w, status, 0, residual_l1(f));
  else
    converged = residual_l1(f) < w->cfg.residual_tol;

  /* Iterate until the residual test, or the optional step test, passes;
   * a passed step test counts only if a Newton step confirms it. */
  while (rc == IMP_OK && !converged && iter < w->cfg.max_iter) {
    if (w->fdfsolver != NULL)
      status = gsl_multiroot_fdfsolver_iterate(w->fdfsolver);
    else
      status = gsl_multiroot_fsolver_iterate(w->fsolver);
    iter++;
    if (status != GSL_SUCCESS || w->failure != IMP_OK) {
      rc = translate(w, status, iter, residual_l1(f));
      break;
    }
    if (!finite(root->data, n)) {
      rc = imp__fail(IMP_ENONFINITE,
                     "root (%s), iteration %zu: the "
                     "iterate has NaN or Inf",
                     imp_root_solver_name(w->cfg.solver), iter);
      break;
    }
    converged = residual_l1(f) < w->cfg.residual_tol;
    if (!converged && w->cfg.step_tol > 0.0 &&
        gsl_multiroot_test_delta(dx, root, w->cfg.step_tol, w->cfg.step_tol) ==
            GSL_SUCCESS) {
      converged = newton_confirms(w, root, f, &excess);
      if (w->failure != IMP_OK) {
        rc = translate(w, GSL_EBADFUNC, iter, residual_l1(f));
        break;
      }
      stalls += !converged;
    }
  }

  /* Report, and hand back the root only if there is one. */
  sample->iterations = iter;
  sample->residual_evals = w->residual_evals;
  sample->jacobian_evals = w->jacobian_evals;
  sample->residual = residual_l1(f);
  if (rc == IMP_OK && !converged)
    rc = imp__fail(IMP_ENOCONV,
                   "root (%s): no convergence in %zu "
                   "iterations: residual sum|f_i| = %.3g, tolerance %.3g",
                   imp_root_solver_name(w->cfg.solver), iter, sample->residual,
                   w->cfg.residual_tol);
  if (rc == IMP_ENOCONV && stalls > 0)
    rc = stalled(w, stalls, excess);
  if (rc == IMP_OK)
    memcpy(y, root->data, n * sizeof(double));
  return rc;
}

static void stats_from_sample(imp_root_stats *stats, const imp__root_sample *s)
{
  stats->samples = 1;
  stats->iterations = s->iterations;
  stats->max_iterations = s->iterations;
  stats->function_evals = s->residual_evals;
  stats->jacobian_evals = s->jacobian_evals;
  stats->residual = s->residual;
}

int imp_root_solve(const imp_problem *problem, const imp_root_options *opt,
                   const double *x, const double *theta, double *y_inout,
                   imp_root_stats *stats)
{
  imp__root_work w = {0};
  imp__root_sample sample = {0};
  gsl_error_handler_t *previous;
  int rc;

  /* Check the arguments. */
  if (stats != NULL)
    memset(stats, 0, sizeof *stats);
  IMP__TRY(imp__root_configure(problem, opt, &w.cfg));
  if (y_inout == NULL || (problem->nx > 0 && x == NULL) ||
      (problem->ntheta > 0 && theta == NULL))
    return imp__fail(IMP_EINVAL, "root_solve: NULL y, x or theta");
  if (!imp__all_finite(y_inout, problem->ny) ||
      (x != NULL && !imp__all_finite(x, problem->nx)) ||
      (theta != NULL && !imp__all_finite(theta, problem->ntheta)))
    return imp__fail(IMP_ENONFINITE, "root_solve: NaN or Inf in the initial "
                                     "guess, x or theta");

  /* Solve with GSL's abort handler off, then restore the caller's. */
  w.problem = *problem;
  IMP__TRY(imp__root_work_init(&w));
  previous = gsl_set_error_handler_off();
  rc = imp__root_work_solve(&w, x, theta, y_inout, &sample);
  gsl_set_error_handler(previous);
  imp__root_work_free(&w);

  if (stats != NULL)
    stats_from_sample(stats, &sample);
  return rc;
}

int imp__root_backward(const imp_problem *p, const imp__root_config *c,
                       const double *x, const double *theta, const double *y,
                       const double *ybar, double *xbar, double *thetabar,
                       imp_adjoint_stats *stats)
{
  if (!c->skip_check && p->ny <= IMP_ROOT_CHECK_MAX)
    IMP__TRY(imp__root_check_regular(p, c, x, theta, y));
  return imp_adjoint_solve(p, x, y, theta, ybar, NULL, xbar, thetabar,
                           &c->adjoint, stats);
}

int imp_root_backward(const imp_problem *problem, const imp_root_options *opt,
                      const double *x, const double *theta, const double *y,
                      const double *ybar, double *xbar, double *thetabar,
                      imp_adjoint_stats *stats)
{
  imp__root_config c;

  IMP__TRY(imp_problem_check(problem, 1));
  IMP__TRY(imp__root_configure(problem, opt, &c));
  if (y == NULL || ybar == NULL || (problem->nx > 0 && x == NULL) ||
      (problem->ntheta > 0 && theta == NULL))
    return imp__fail(IMP_EINVAL, "root_backward: NULL y, ybar, x or theta");
  if (!imp__all_finite(y, problem->ny) ||
      (x != NULL && !imp__all_finite(x, problem->nx)) ||
      (theta != NULL && !imp__all_finite(theta, problem->ntheta)))
    return imp__fail(IMP_ENONFINITE, "root_backward: NaN or Inf in y, x or "
                                     "theta");
  return imp__root_backward(problem, &c, x, theta, y, ybar, xbar, thetabar,
                            stats);
}

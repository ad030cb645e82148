/*
 * test_root.c - root-finding layers: every solver on GSL's own test set
 * against GSL itself, gradients against finite differences, and the
 * failures a root layer must report.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gsl/gsl_errno.h>
#include <gsl/gsl_linalg.h>

#include "imp.h"
#include "root_mgh.h"

#define MGH_TOL 1e-7      /* GSL's own test tolerance on sum |f_i| */
#define MGH_MAX_ITER 1000 /* GSL's own test budget */

/* ------------------------------------------------------------------ */
/* Every solver on every More-Garbow-Hillstrom system, plain GSL against
 * imp_root_solve and against a root layer. */

/* The imp status a GSL outcome must become. */
static int expected_status(int gsl_status, int nonfinite)
{
  if (nonfinite)
    return IMP_ENONFINITE;
  switch (gsl_status) {
  case GSL_SUCCESS:
    return IMP_OK;
  case GSL_CONTINUE:
  case GSL_ENOPROG:
  case GSL_ENOPROGJ:
    return IMP_ENOCONV;
  case GSL_EBADFUNC:
    return IMP_ENONFINITE;
  case GSL_EDOM:
  case GSL_ESING:
  case GSL_EZERODIV:
    return IMP_ESINGULAR;
  default:
    return IMP_EBACKEND;
  }
}

static double max_rel_diff(const double *a, const double *b, size_t n)
{
  double worst = 0.0;

  for (size_t i = 0; i < n; i++) {
    double d = fabs(a[i] - b[i]) / (1.0 + fabs(b[i]));

    if (!(d <= worst))
      worst = d;
  }
  return worst;
}

/* Run one system with one solver through GSL and through imp, assert
 * that they agree, and print one row of the table. */
static void mgh_compare(const mgh_problem *m, imp_root_solver solver,
                        double factor)
{
  imp_root_options opt = {
      .solver = solver, .residual_tol = MGH_TOL, .max_iter = MGH_MAX_ITER};
  double y_gsl[MGH_NMAX], y_imp[MGH_NMAX], start[MGH_NMAX];
  double y_layer[2 * MGH_NMAX], x_dummy = 0.0, gsl_residual;
  size_t gsl_iter, nonfinite_evals;
  int gsl_status, nonfinite, want, rc;
  gsl_error_handler_t *previous;
  imp_root_stats st;
  mgh_gsl g;

  /* GSL on its own. */
  ck_assert_int_eq(mgh_gsl_init(&g, m, solver), 0);
  previous = gsl_set_error_handler_off();
  gsl_status = mgh_gsl_solve(&g, factor, MGH_TOL, MGH_MAX_ITER, &gsl_iter,
                             y_gsl, &gsl_residual);
  gsl_set_error_handler(previous);
  nonfinite_evals = g.params.nonfinite;
  nonfinite = !isfinite(gsl_residual) || nonfinite_evals > 0;
  mgh_gsl_free(&g);
  for (size_t i = 0; i < m->n; i++)
    nonfinite |= !isfinite(y_gsl[i]);
  want = expected_status(gsl_status, nonfinite);

  /* The same through imp_root_solve, with each way of giving df/dy. */
  for (int d = MGH_JACOBIAN; d <= MGH_VJP; d++) {
    imp_problem p = mgh_imp_problem(m, (mgh_derivative)d);

    if (d != MGH_JACOBIAN && !imp_root_solver_needs_jacobian(solver))
      break;
    mgh_start(m, factor, y_imp);
    memcpy(start, y_imp, m->n * sizeof(double));
    rc = imp_root_solve(&p, &opt, NULL, NULL, y_imp, &st);
    ck_assert_msg(rc == want,
                  "%s on %s x %g (derivative %d): imp %s, GSL "
                  "%s: %s",
                  imp_root_solver_name(solver), m->name, factor, d,
                  imp_status_name(rc), gsl_strerror(gsl_status),
                  imp_last_error());
    if (want == IMP_OK) {
      /* The same arithmetic in the same order: the roots agree to
       * rounding, and so do the iteration counts. */
      ck_assert_double_le(max_rel_diff(y_imp, y_gsl, m->n), 1e-12);
      ck_assert_uint_eq(st.iterations, gsl_iter);
      ck_assert_double_lt(st.residual, MGH_TOL);
    } else {
      ck_assert_double_eq(max_rel_diff(y_imp, start, m->n), 0.0);
      if (want != IMP_ENONFINITE)
        ck_assert_uint_eq(st.iterations, gsl_iter);
      if (want == IMP_ENOCONV)
        ck_assert_ptr_nonnull(strstr(imp_last_error(), "residual"));
    }
    if (d == MGH_JACOBIAN && imp_root_solver_needs_jacobian(solver))
      ck_assert_uint_gt(st.jacobian_evals, 0);
  }

  /* Through a layer: two samples share one GSL solver, set afresh. */
  {
    imp_problem p = mgh_imp_problem(m, MGH_JACOBIAN);
    imp_shape in = {2, 0, 1, 1};
    imp_layer *layer;

    mgh_start(m, factor, start);
    opt.initial = start;
    ck_assert_int_eq(imp_root_layer_create(&p, NULL, &opt, m->name, &layer),
                     IMP_OK);
    rc = imp_layer_forward(layer, &in, &x_dummy, y_layer);
    ck_assert_int_eq(rc, want);
    ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
    if (want == IMP_OK) {
      ck_assert_double_le(max_rel_diff(y_layer, y_gsl, m->n), 1e-12);
      ck_assert_double_le(max_rel_diff(y_layer + m->n, y_gsl, m->n), 1e-12);
      ck_assert_uint_eq(st.iterations, 2 * gsl_iter);
      ck_assert_uint_eq(st.max_iterations, gsl_iter);
      ck_assert_uint_eq(st.samples, 2);
    } else {
      for (size_t i = 0; i < 2 * m->n; i++)
        ck_assert(isnan(y_layer[i]));
      ck_assert_ptr_nonnull(strstr(imp_last_error(), "sample 0"));
      ck_assert_uint_eq(st.samples, 1);
    }
    imp_layer_free(layer);
  }

  /* The table row. */
  if (want == IMP_OK)
    fprintf(stderr,
            "  %-9s %-20s x%-4g converges in %4zu iterations, "
            "residual %.1e\n",
            imp_root_solver_name(solver), m->name, factor, gsl_iter,
            gsl_residual);
  else if (gsl_status == GSL_SUCCESS)
    fprintf(stderr,
            "  %-9s %-20s x%-4g GSL converges past %zu NaN/Inf "
            "residuals, which imp refuses -> imp %s\n",
            imp_root_solver_name(solver), m->name, factor, nonfinite_evals,
            imp_status_name(want));
  else
    fprintf(stderr,
            "  %-9s %-20s x%-4g FAILS after %4zu iterations: GSL "
            "%s%s -> imp %s\n",
            imp_root_solver_name(solver), m->name, factor, gsl_iter,
            gsl_status == GSL_CONTINUE ? "budget spent"
                                       : gsl_strerror(gsl_status),
            nonfinite ? " (NaN/Inf residuals on the way)" : "",
            imp_status_name(want));
}

START_TEST(mgh_agrees_with_gsl)
{
  imp_root_solver solver = (imp_root_solver)_i;

  fprintf(stderr,
          "%s on the More-Garbow-Hillstrom systems, from x0, 10 x0 "
          "and 100 x0:\n",
          imp_root_solver_name(solver));
  for (int scale = 0; scale < 3; scale++)
    for (size_t k = 0; k < MGH_NPROBLEMS; k++)
      mgh_compare(&mgh_problems[k], solver, pow(10.0, scale));
}
END_TEST

START_TEST(solver_names)
{
  imp_root_solver s;

  for (int k = 0; k < IMP_ROOT_NSOLVERS; k++) {
    const char *name = imp_root_solver_name((imp_root_solver)k);

    ck_assert_int_eq(imp_root_solver_lookup(name, &s), IMP_OK);
    ck_assert_int_eq(s, k);
    ck_assert_int_eq(imp_root_solver_needs_jacobian((imp_root_solver)k),
                     k >= IMP_ROOT_HYBRIDSJ);
  }
  ck_assert_str_eq(imp_root_solver_name(IMP_ROOT_HYBRIDS), "hybrids");
  ck_assert_str_eq(imp_root_solver_name(IMP_ROOT_GNEWTON), "gnewton");
  ck_assert_str_eq(imp_root_solver_name(IMP_ROOT_NSOLVERS), "unknown");
  ck_assert_int_eq(imp_root_solver_lookup("bisection", &s), IMP_EINVAL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "hybridsj"));
  ck_assert_int_eq(imp_root_solver_lookup(NULL, &s), IMP_EINVAL);
  ck_assert_int_eq(imp_root_solver_needs_jacobian(IMP_ROOT_NSOLVERS), 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A parameterized system for gradients:
 *     f1 = y1^3 + t0 y1 + t2 y2 - x1,
 *     f2 = y2^3 + t1 y2 - t2 y1 - x2,
 * whose Jacobian [[3 y1^2 + t0, t2], [-t2, 3 y2^2 + t1]] has determinant
 * at least t0 t1 + t2^2 > 0, so the root exists and is unique. */

typedef struct pair_ctx {
  int fail_residual_at; /* fail on this residual call (1-based); 0 never */
  int nan_residual_at;  /* return NaN on this call; 0 never */
  int fail_jacobian_at;
  int fail_vjp;
  int residual_calls, jacobian_calls;
} pair_ctx;

static int pair_residual(void *ctx, const double *x, const double *y,
                         const double *t, double *r)
{
  pair_ctx *c = ctx;

  if (c != NULL) {
    c->residual_calls++;
    if (c->residual_calls == c->fail_residual_at)
      return 7;
  }
  r[0] = y[0] * y[0] * y[0] + t[0] * y[0] + t[2] * y[1] - x[0];
  r[1] = y[1] * y[1] * y[1] + t[1] * y[1] - t[2] * y[0] - x[1];
  if (c != NULL && c->residual_calls == c->nan_residual_at)
    r[1] = NAN;
  return 0;
}

static int pair_jacobian(void *ctx, const double *x, const double *y,
                         const double *t, double *jac)
{
  pair_ctx *c = ctx;

  (void)x;
  if (c != NULL && ++c->jacobian_calls == c->fail_jacobian_at)
    return 3;
  jac[0] = 3.0 * y[0] * y[0] + t[0];
  jac[1] = t[2];
  jac[2] = -t[2];
  jac[3] = 3.0 * y[1] * y[1] + t[1];
  return 0;
}

static int pair_vjp(void *ctx, const double *x, const double *y,
                    const double *t, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_t)
{
  pair_ctx *c = ctx;

  (void)x;
  if (c != NULL && c->fail_vjp)
    return 5;
  if (vjp_y != NULL) {
    vjp_y[0] = v[0] * (3.0 * y[0] * y[0] + t[0]) - v[1] * t[2];
    vjp_y[1] = v[0] * t[2] + v[1] * (3.0 * y[1] * y[1] + t[1]);
  }
  if (vjp_x != NULL) {
    vjp_x[0] -= v[0];
    vjp_x[1] -= v[1];
  }
  if (vjp_t != NULL) {
    vjp_t[0] += v[0] * y[0];
    vjp_t[1] += v[1] * y[1];
    vjp_t[2] += v[0] * y[1] - v[1] * y[0];
  }
  return 0;
}

static imp_problem pair_problem(pair_ctx *c, int with_jacobian)
{
  imp_problem p = {.nx = 2,
                   .ny = 2,
                   .ntheta = 3,
                   .residual = pair_residual,
                   .vjp = pair_vjp,
                   .ctx = c};

  if (with_jacobian)
    p.jacobian = pair_jacobian;
  return p;
}

#define PAIR_N 3
static const double pair_x[PAIR_N * 2] = {0.5, -1.0, 2.0, 0.3, -1.5, 1.2};
static const double pair_theta[3] = {1.0, 2.0, 0.5};
static const double pair_weights[PAIR_N * 2] = {0.7, -1.3, 0.4, 1.1, -0.6, 0.9};

/* The objective of the gradient checks: L = sum w . y over the batch, as
 * a function of (x, theta) packed in one vector. */
typedef struct objective_ctx {
  imp_layer *layer;
} objective_ctx;

static int pair_objective(void *ctx, const double *params, double *value)
{
  objective_ctx *o = ctx;
  imp_shape in = {PAIR_N, 2, 1, 1};
  double y[PAIR_N * 2];
  int rc;

  memcpy(imp_layer_params(o->layer), params + 2 * PAIR_N, 3 * sizeof(double));
  rc = imp_layer_forward(o->layer, &in, params, y);
  if (rc != IMP_OK)
    return rc;
  *value = 0.0;
  for (int i = 0; i < PAIR_N * 2; i++)
    *value += pair_weights[i] * y[i];
  return 0;
}

START_TEST(gradients_match_finite_differences)
{
  imp_root_solver solver = (imp_root_solver)(_i / 2);
  imp_adjoint_method method =
      _i % 2 == 0 ? IMP_ADJOINT_DENSE_LU : IMP_ADJOINT_GMRES;
  /* The Jacobian solvers take df/dy from the callback for two of them and
   * assembled from the vjp for the other two. */
  int with_jacobian = solver == IMP_ROOT_HYBRIDSJ || solver == IMP_ROOT_NEWTON;
  imp_problem p = pair_problem(NULL, with_jacobian);
  imp_root_options opt = {
      .solver = solver, .residual_tol = 1e-13, .adjoint = {.method = method}};
  imp_shape in = {PAIR_N, 2, 1, 1};
  double params[PAIR_N * 2 + 3], grad[PAIR_N * 2 + 3], y[PAIR_N * 2];
  double xbar[PAIR_N * 2] = {0}, direct[3] = {0};
  objective_ctx o;
  imp_gradcheck_result res;

  ck_assert_int_eq(
      imp_root_layer_create(&p, pair_theta, &opt, "pair", &o.layer), IMP_OK);
  memcpy(params, pair_x, sizeof pair_x);
  memcpy(params + 2 * PAIR_N, pair_theta, sizeof pair_theta);

  /* Analytic: one forward and one backward with ybar = w. */
  ck_assert_int_eq(imp_layer_forward(o.layer, &in, pair_x, y), IMP_OK);
  imp_layer_zero_grad(o.layer);
  ck_assert_int_eq(
      imp_layer_backward(o.layer, xbar, pair_weights, &in, pair_x, y), IMP_OK);
  memcpy(grad, xbar, sizeof xbar);
  memcpy(grad + 2 * PAIR_N, imp_layer_grads(o.layer), 3 * sizeof(double));

  /* Against fourth-order central differences of the forward. */
  ck_assert_int_eq(imp_gradcheck(pair_objective, &o, params, PAIR_N * 2 + 3,
                                 grad, NULL, &res),
                   IMP_OK);
  ck_assert_msg(res.max_rel_err < 1e-6,
                "%s, adjoint %d: entry %zu "
                "analytic %.10g numeric %.10g (error %.2g)",
                imp_root_solver_name(solver), (int)method, res.worst,
                res.analytic, res.numeric, res.max_rel_err);

  /* imp_root_backward on the samples one by one sums to the same. */
  for (int b = 0; b < PAIR_N; b++)
    ck_assert_int_eq(imp_root_backward(&p, &opt, pair_x + 2 * b, pair_theta,
                                       y + 2 * b, pair_weights + 2 * b, NULL,
                                       direct, NULL),
                     IMP_OK);
  for (int i = 0; i < 3; i++)
    ck_assert_double_eq_tol(direct[i], grad[2 * PAIR_N + i],
                            1e-12 * (1.0 + fabs(direct[i])));
  imp_layer_free(o.layer);
}
END_TEST

/* The example in imp/root.h, verbatim in substance. */
static int cube(void *ctx, const double *x, const double *y,
                const double *theta, double *r)
{
  (void)ctx;
  (void)theta;
  r[0] = y[0] * y[0] * y[0] - x[0];
  return 0;
}

static int cube_vjp(void *ctx, const double *x, const double *y,
                    const double *theta, const double *v, double *vy,
                    double *vx, double *vtheta)
{
  (void)ctx;
  (void)x;
  (void)theta;
  (void)vtheta;
  if (vy != NULL)
    vy[0] = 3.0 * y[0] * y[0] * v[0];
  if (vx != NULL)
    vx[0] += -v[0];
  return 0;
}

START_TEST(header_example)
{
  imp_problem p = {.nx = 1, .ny = 1, .residual = cube, .vjp = cube_vjp};
  double y0 = 1.0, x[2] = {8.0, 27.0}, y[2], ybar[2] = {1, 1};
  double xbar[2] = {0, 0};
  imp_root_options opt = {.solver = IMP_ROOT_NEWTON, .initial = &y0};
  imp_shape in = {2, 1, 1, 1};
  imp_layer *layer;

  ck_assert_int_eq(imp_root_layer_create(&p, NULL, &opt, "cbrt", &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, xbar, ybar, &in, x, y), IMP_OK);
  /* The residual test sum |f| < 1e-10 leaves y within about 1e-11. */
  ck_assert_double_eq_tol(y[0], 2.0, 1e-10);
  ck_assert_double_eq_tol(y[1], 3.0, 1e-10);
  ck_assert_double_eq_tol(xbar[0], 1.0 / 12.0, 1e-12);
  ck_assert_double_eq_tol(xbar[1], 1.0 / 27.0, 1e-12);
  ck_assert_str_eq(imp_layer_kind(layer), "root");
  imp_layer_free(layer);
}
END_TEST

START_TEST(backward_accumulates)
{
  imp_problem p = pair_problem(NULL, 1);
  imp_root_options opt = {.solver = IMP_ROOT_HYBRIDSJ, .residual_tol = 1e-13};
  imp_shape in = {PAIR_N, 2, 1, 1};
  double y[PAIR_N * 2], xbar[PAIR_N * 2] = {0}, once[3];
  imp_layer *layer;

  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, &opt, NULL, &layer),
                   IMP_OK);
  ck_assert_str_eq(imp_layer_name(layer), "root");
  ck_assert_int_eq(imp_layer_forward(layer, &in, pair_x, y), IMP_OK);
  ck_assert_int_eq(
      imp_layer_backward(layer, xbar, pair_weights, &in, pair_x, y), IMP_OK);
  memcpy(once, imp_layer_grads(layer), sizeof once);
  ck_assert_double_ne(once[0], 0.0);

  /* A second backward, without xbar, adds the same amount again. */
  ck_assert_int_eq(
      imp_layer_backward(layer, NULL, pair_weights, &in, pair_x, y), IMP_OK);
  for (int i = 0; i < 3; i++)
    ck_assert_double_eq_tol(imp_layer_grads(layer)[i], 2.0 * once[i],
                            1e-14 * (1.0 + fabs(once[i])));
  imp_layer_free(layer);
}
END_TEST

START_TEST(warm_start_and_copies)
{
  imp_problem p = pair_problem(NULL, 0);
  double theta[3], initial[2] = {0.0, 0.0};
  imp_root_options opt = {
      .residual_tol = 1e-12, .initial = initial, .warm_start = 1};
  imp_shape in = {PAIR_N, 2, 1, 1}, in2 = {2, 2, 1, 1};
  double y1[PAIR_N * 2], y2[PAIR_N * 2];
  imp_root_stats st;
  imp_layer *layer;

  memcpy(theta, pair_theta, sizeof theta);
  ck_assert_int_eq(imp_root_layer_create(&p, theta, &opt, "warm", &layer),
                   IMP_OK);

  /* theta and the initial guess were copied: changing ours does nothing. */
  theta[0] = 100.0;
  initial[0] = 1e6;
  ck_assert_double_eq(imp_layer_params(layer)[0], pair_theta[0]);
  ck_assert_int_eq(imp_layer_forward(layer, &in, pair_x, y1), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
  ck_assert_uint_gt(st.iterations, PAIR_N);
  ck_assert_uint_le(st.max_iterations, st.iterations);
  ck_assert_uint_eq(st.samples, PAIR_N);
  ck_assert_double_lt(st.residual, 1e-12);

  /* The same input again starts at the solutions: no iteration at all. */
  ck_assert_int_eq(imp_layer_forward(layer, &in, pair_x, y2), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
  ck_assert_uint_eq(st.iterations, 0);
  ck_assert_mem_eq(y1, y2, sizeof y1);

  /* A new batch size, or a reset, starts from the initial guess again. */
  ck_assert_int_eq(imp_layer_forward(layer, &in2, pair_x, y2), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
  ck_assert_uint_gt(st.iterations, 0);
  ck_assert_int_eq(imp_layer_forward(layer, &in2, pair_x, y2), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
  ck_assert_uint_eq(st.iterations, 0);
  ck_assert_int_eq(imp_root_layer_reset(layer), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in2, pair_x, y2), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &st), IMP_OK);
  ck_assert_uint_gt(st.iterations, 0);
  imp_layer_free(layer);
}
END_TEST

START_TEST(batch_stats_sum_and_max)
{
  imp_problem p = pair_problem(NULL, 0);
  imp_root_options opt = {.solver = IMP_ROOT_BROYDEN};
  imp_shape in = {PAIR_N, 2, 1, 1};
  double y[PAIR_N * 2];
  imp_root_stats whole, one;
  size_t iterations = 0, evals = 0, most = 0;
  double worst = 0.0;
  imp_layer *layer;

  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, &opt, NULL, &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, pair_x, y), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &whole), IMP_OK);
  for (int b = 0; b < PAIR_N; b++) {
    double yb[2] = {0.0, 0.0};

    ck_assert_int_eq(
        imp_root_solve(&p, &opt, pair_x + 2 * b, pair_theta, yb, &one), IMP_OK);
    ck_assert_uint_eq(one.samples, 1);
    ck_assert_mem_eq(yb, y + 2 * b, sizeof yb);
    iterations += one.iterations;
    evals += one.function_evals;
    most = one.iterations > most ? one.iterations : most;
    worst = one.residual > worst ? one.residual : worst;
  }
  ck_assert_uint_eq(whole.iterations, iterations);
  ck_assert_uint_eq(whole.function_evals, evals);
  ck_assert_uint_eq(whole.max_iterations, most);
  ck_assert_uint_eq(whole.jacobian_evals, 0);
  ck_assert_double_eq(whole.residual, worst);
  imp_layer_free(layer);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad input. */

static int other_forward(imp_layer *l, const imp_shape *in, const double *x,
                         double *y)
{
  (void)l;
  (void)in;
  (void)x;
  (void)y;
  return IMP_OK;
}

static int other_backward(imp_layer *l, double *xbar, const double *ybar,
                          const imp_shape *in, const double *x, const double *y)
{
  (void)l;
  (void)xbar;
  (void)ybar;
  (void)in;
  (void)x;
  (void)y;
  return IMP_OK;
}

static int other_shape(const imp_layer *l, const imp_shape *in, imp_shape *out)
{
  (void)l;
  *out = *in;
  return IMP_OK;
}

START_TEST(bad_input)
{
  static const imp_layer_ops other_ops = {.kind = "other",
                                          .output_shape = other_shape,
                                          .forward = other_forward,
                                          .backward = other_backward};
  imp_problem p = pair_problem(NULL, 0), bad;
  imp_root_options opt = {0};
  double x[2] = {0.5, -1.0}, y[4] = {0, 0, 0, 0}, nan_theta[3];
  double xbar[2] = {0, 0}, ybar[2] = {1, 1}, nan_x[2] = {NAN, 0.0};
  imp_shape wrong_c = {1, 3, 1, 1}, wrong_h = {1, 2, 2, 1};
  imp_shape in = {1, 2, 1, 1};
  imp_root_stats st;
  imp_layer *layer, *other;

  /* NULL and malformed problems. */
  ck_assert_int_eq(imp_root_solve(NULL, NULL, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_root_solve(&p, NULL, x, pair_theta, NULL, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_root_solve(&p, NULL, NULL, pair_theta, y, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_root_solve(&p, NULL, x, NULL, y, NULL), IMP_EINVAL);
  bad = p;
  bad.ny = 0;
  ck_assert_int_eq(imp_root_solve(&bad, NULL, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  bad = p;
  bad.residual = NULL;
  ck_assert_int_eq(imp_root_layer_create(&bad, pair_theta, NULL, NULL, &layer),
                   IMP_EINVAL);
  ck_assert_ptr_null(layer);
  ck_assert_int_eq(imp_root_layer_create(NULL, pair_theta, NULL, NULL, &layer),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, NULL, NULL, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_root_layer_create(&p, NULL, NULL, NULL, &layer),
                   IMP_EINVAL);

  /* Bad options. */
  opt.solver = IMP_ROOT_NSOLVERS;
  ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  opt.solver = IMP_ROOT_HYBRIDS;
  opt.residual_tol = -1.0;
  ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  opt.residual_tol = NAN;
  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, &opt, NULL, &layer),
                   IMP_EINVAL);
  opt.residual_tol = 0.0;
  opt.step_tol = -1e-3;
  ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  opt.step_tol = 0.0;

  /* A Jacobian solver on a problem with no way to form df/dy. */
  bad = p;
  bad.vjp = NULL;
  opt.solver = IMP_ROOT_NEWTON;
  ck_assert_int_eq(imp_root_solve(&bad, &opt, x, pair_theta, y, NULL),
                   IMP_EINVAL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "newton"));
  ck_assert_int_eq(imp_root_layer_create(&bad, pair_theta, &opt, NULL, &layer),
                   IMP_EINVAL);
  opt.solver = IMP_ROOT_HYBRIDS;

  /* NaN and Inf. */
  ck_assert_int_eq(imp_root_solve(&p, NULL, nan_x, pair_theta, y, &st),
                   IMP_ENONFINITE);
  y[1] = INFINITY;
  ck_assert_int_eq(imp_root_solve(&p, NULL, x, pair_theta, y, NULL),
                   IMP_ENONFINITE);
  y[1] = 0.0;
  memcpy(nan_theta, pair_theta, sizeof nan_theta);
  nan_theta[2] = NAN;
  ck_assert_int_eq(imp_root_solve(&p, NULL, x, nan_theta, y, NULL),
                   IMP_ENONFINITE);
  ck_assert_int_eq(imp_root_layer_create(&p, nan_theta, NULL, NULL, &layer),
                   IMP_ENONFINITE);
  opt.initial = nan_x;
  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, &opt, NULL, &layer),
                   IMP_ENONFINITE);
  opt.initial = NULL;

  /* The layer: NaN input, wrong shapes, backward without a vjp. */
  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, NULL, NULL, &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, nan_x, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_layer_forward(layer, &wrong_c, x, y), IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(layer, &wrong_h, x, y), IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(layer, NULL, x, y), IMP_EINVAL);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, xbar, ybar, &wrong_c, x, y),
                   IMP_ESHAPE);
  imp_layer_free(layer);
  bad = p;
  bad.vjp = NULL;
  ck_assert_int_eq(imp_root_layer_create(&bad, pair_theta, NULL, NULL, &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, xbar, ybar, &in, x, y),
                   IMP_EINVAL);
  ck_assert_int_eq(
      imp_root_backward(&bad, NULL, x, pair_theta, y, ybar, xbar, NULL, NULL),
      IMP_EINVAL);
  ck_assert_double_eq(xbar[0], 0.0);
  imp_layer_free(layer);
  ck_assert_int_eq(
      imp_root_backward(&p, NULL, x, pair_theta, NULL, ybar, xbar, NULL, NULL),
      IMP_EINVAL);
  ck_assert_int_eq(
      imp_root_backward(&p, NULL, nan_x, pair_theta, y, ybar, xbar, NULL, NULL),
      IMP_ENONFINITE);

  /* The root layer's own functions refuse other layers. */
  ck_assert_int_eq(imp_layer_create(&other_ops, NULL, 0, "other", &other),
                   IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(other, &st), IMP_EINVAL);
  ck_assert_int_eq(imp_root_layer_reset(other), IMP_EINVAL);
  ck_assert_int_eq(imp_root_layer_stats(NULL, &st), IMP_EINVAL);
  ck_assert_int_eq(imp_root_layer_reset(NULL), IMP_EINVAL);
  imp_layer_free(other);
  imp_layer_free(NULL);
}
END_TEST

/* A failing callback, also deep inside a GSL iteration, comes back as
 * IMP_ECALLBACK, and a NaN residual as IMP_ENONFINITE, for every solver. */
START_TEST(callback_failures)
{
  imp_root_solver solver = (imp_root_solver)_i;
  pair_ctx c = {0};
  imp_problem p = pair_problem(&c, solver == IMP_ROOT_NEWTON);
  imp_root_options opt = {.solver = solver};
  double x[2] = {0.5, -1.0}, y[2] = {0.0, 0.0}, out[2];
  imp_shape in = {1, 2, 1, 1};
  imp_layer *layer;

  /* The fourth residual call fails: GSL is iterating by then. */
  c.fail_residual_at = 4;
  ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                   IMP_ECALLBACK);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "returned 7"));
  ck_assert_double_eq(y[0], 0.0);

  /* A NaN from the residual. */
  memset(&c, 0, sizeof c);
  c.nan_residual_at = 4;
  ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                   IMP_ENONFINITE);

  /* The same inside a layer, which then works again. */
  ck_assert_int_eq(imp_root_layer_create(&p, pair_theta, &opt, NULL, &layer),
                   IMP_OK);
  memset(&c, 0, sizeof c);
  c.fail_residual_at = 4;
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_ECALLBACK);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "sample 0"));
  ck_assert(isnan(out[0]) && isnan(out[1]));
  memset(&c, 0, sizeof c);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_OK);

  /* A failing vjp in backward. */
  c.fail_vjp = 1;
  ck_assert_int_eq(imp_layer_backward(layer, NULL, out, &in, x, out),
                   IMP_ECALLBACK);
  imp_layer_free(layer);

  /* The Jacobian solvers: a failing jacobian or vjp while forming df/dy. */
  if (imp_root_solver_needs_jacobian(solver)) {
    memset(&c, 0, sizeof c);
    c.fail_jacobian_at = 2;
    c.fail_vjp = solver != IMP_ROOT_NEWTON;
    ck_assert_int_eq(imp_root_solve(&p, &opt, x, pair_theta, y, NULL),
                     IMP_ECALLBACK);
  }
}
END_TEST

START_TEST(no_convergence)
{
  const mgh_problem *m = &mgh_problems[0]; /* Rosenbrock */
  imp_problem p = mgh_imp_problem(m, MGH_JACOBIAN);
  imp_root_options opt = {.max_iter = 3};
  double y[2];
  imp_root_stats st;

  m->start(y);
  ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, NULL, y, &st), IMP_ENOCONV);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "3 iterations"));
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "residual"));
  ck_assert_uint_eq(st.iterations, 3);
  ck_assert_double_gt(st.residual, 1e-10);
  ck_assert_double_eq(y[0], -1.2);

  /* A step tolerance stops earlier than the residual test would. */
  opt.max_iter = 0;
  opt.step_tol = 1e-3;
  opt.residual_tol = 1e-300;
  ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, NULL, y, &st), IMP_OK);
  ck_assert_double_eq_tol(y[0], 1.0, 1e-2);
}
END_TEST

/* f = (y1^2 + 1e-2, y2 - 1) has no real root: ||f||_1 >= 1e-2.  From
 * (0.7, 0.2) the hybrid solvers' rejected trial steps and gnewton's
 * shortened ones fall below step_tol near y1 = 0, where Newton's own step
 * -f1 / (2 y1) is huge. */
typedef struct rootless_ctx {
  int fail_jacobian; /* 1: the jacobian callback fails */
} rootless_ctx;

static int rootless_residual(void *ctx, const double *x, const double *y,
                             const double *theta, double *r)
{
  (void)ctx;
  (void)x;
  (void)theta;
  r[0] = y[0] * y[0] + 1e-2;
  r[1] = y[1] - 1.0;
  return 0;
}

static int rootless_jacobian(void *ctx, const double *x, const double *y,
                             const double *theta, double *jac)
{
  const rootless_ctx *c = ctx;

  (void)x;
  (void)theta;
  if (c != NULL && c->fail_jacobian)
    return 4;
  jac[0] = 2.0 * y[0];
  jac[1] = 0.0;
  jac[2] = 0.0;
  jac[3] = 1.0;
  return 0;
}

START_TEST(step_test_away_from_a_root)
{
  imp_root_solver solver = (imp_root_solver)_i;
  rootless_ctx c = {0};
  imp_problem p = {.ny = 2,
                   .residual = rootless_residual,
                   .jacobian = rootless_jacobian,
                   .ctx = &c};
  imp_root_options opt = {.solver = solver, .step_tol = 1e-4};
  double y[2] = {0.7, 0.2};
  imp_root_stats st;
  int rc;

  /* No solver may call the stall a root; y is left as it was. */
  rc = imp_root_solve(&p, &opt, NULL, NULL, y, &st);
  ck_assert_msg(rc == IMP_ENOCONV, "%s: %s: %s", imp_root_solver_name(solver),
                imp_status_name(rc), imp_last_error());
  ck_assert_double_ge(st.residual, 1e-2);
  ck_assert_double_eq(y[0], 0.7);
  ck_assert_double_eq(y[1], 0.2);

  /* Where the step test passed, the message says why it was not taken. */
  if (solver == IMP_ROOT_HYBRIDS || solver == IMP_ROOT_HYBRIDSJ ||
      solver == IMP_ROOT_GNEWTON)
    ck_assert_ptr_nonnull(strstr(imp_last_error(), "stalled away"));

  /* The hybrid solvers without a Jacobian confirm through the problem's
   * jacobian when it has one, whose failure is reported, and through
   * differences of the residual when it has none. */
  if (solver == IMP_ROOT_HYBRIDS) {
    c.fail_jacobian = 1;
    ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, NULL, y, &st),
                     IMP_ECALLBACK);
    ck_assert_ptr_nonnull(strstr(imp_last_error(), "jacobian callback"));
    p.jacobian = NULL;
    ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, NULL, y, &st), IMP_ENOCONV);
    ck_assert_ptr_nonnull(strstr(imp_last_error(), "stalled away"));
    ck_assert_double_eq(y[0], 0.7);
  }
}
END_TEST

/* At a root, Newton confirms the step test, also from differences of the
 * residual, and the solve stops before the residual test would. */
START_TEST(step_test_at_a_root)
{
  imp_root_solver solver = (imp_root_solver)_i;
  imp_problem p = pair_problem(NULL, solver == IMP_ROOT_NEWTON);
  imp_root_options tight = {.solver = IMP_ROOT_HYBRIDSJ, .residual_tol = 1e-14};
  imp_root_options opt = {
      .solver = solver, .step_tol = 1e-6, .residual_tol = 1e-300};
  double y[2] = {0.0, 0.0}, root[2] = {0.0, 0.0};
  imp_root_stats st;

  /* The root to 1e-14, then the step test alone. */
  ck_assert_int_eq(imp_root_solve(&p, &tight, pair_x, pair_theta, root, NULL),
                   IMP_OK);
  if (solver == IMP_ROOT_HYBRIDS)
    p.vjp = NULL;
  ck_assert_msg(imp_root_solve(&p, &opt, pair_x, pair_theta, y, &st) == IMP_OK,
                "%s: %s", imp_root_solver_name(solver), imp_last_error());

  /* Newton moved each unknown by less than 1e-6 (1 + |y_i|), and the
   * Jacobian there has condition number below 10, so y is within about
   * 1e-5 of the root. */
  ck_assert_double_eq_tol(y[0], root[0], 1e-5);
  ck_assert_double_eq_tol(y[1], root[1], 1e-5);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Singular roots. */

/* The circle f = x^2 + y^2 - r^2, theta = r. */
static int circle_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx;
  r[0] = x[0] * x[0] + y[0] * y[0] - theta[0] * theta[0];
  return 0;
}

static int circle_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *v, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  (void)ctx;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * y[0] * v[0];
  if (vjp_x != NULL)
    vjp_x[0] += 2.0 * x[0] * v[0];
  if (vjp_theta != NULL)
    vjp_theta[0] += -2.0 * theta[0] * v[0];
  return 0;
}

/* f = y^2 - x, singular at x = 0. */
static int square_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx;
  (void)theta;
  r[0] = y[0] * y[0] - x[0];
  return 0;
}

static int square_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *v, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  (void)ctx;
  (void)x;
  (void)theta;
  (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * y[0] * v[0];
  if (vjp_x != NULL)
    vjp_x[0] -= v[0];
  return 0;
}

/* f = (y1 + y2 - x, 2 (y1 + y2 - x)): consistent, singular everywhere. */
static int rank_one_residual(void *ctx, const double *x, const double *y,
                             const double *theta, double *r)
{
  (void)ctx;
  (void)theta;
  r[0] = y[0] + y[1] - x[0];
  r[1] = 2.0 * r[0];
  return 0;
}

static int rank_one_vjp(void *ctx, const double *x, const double *y,
                        const double *theta, const double *v, double *vjp_y,
                        double *vjp_x, double *vjp_theta)
{
  (void)ctx;
  (void)x;
  (void)y;
  (void)theta;
  (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = vjp_y[1] = v[0] + 2.0 * v[1];
  if (vjp_x != NULL)
    vjp_x[0] -= v[0] + 2.0 * v[1];
  return 0;
}

START_TEST(singular_roots)
{
  imp_adjoint_method method =
      _i == 0 ? IMP_ADJOINT_DENSE_LU : IMP_ADJOINT_GMRES;
  imp_problem circle = {.nx = 1,
                        .ny = 1,
                        .ntheta = 1,
                        .residual = circle_residual,
                        .vjp = circle_vjp};
  imp_problem square = {
      .nx = 1, .ny = 1, .residual = square_residual, .vjp = square_vjp};
  imp_problem rank_one = {
      .nx = 1, .ny = 2, .residual = rank_one_residual, .vjp = rank_one_vjp};
  double one = 1.0, r = 1.0, ybar = 1.0;
  imp_root_options opt = {.initial = &one, .adjoint = {.method = method}};
  imp_shape in = {1, 1, 1, 1};
  double x, y, xbar, y2[2] = {0.25, 0.25}, x2 = 0.5, xbar2 = 0.0;
  double ybar2[2] = {1.0, 0.0};
  imp_layer *layer;

  ck_assert_int_eq(imp_root_layer_create(&circle, &r, &opt, "circle", &layer),
                   IMP_OK);

  /* A regular point near the edge: dy/dx = -x / y. */
  x = 0.99;
  xbar = 0.0;
  ck_assert_int_eq(imp_layer_forward(layer, &in, &x, &y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, &xbar, &ybar, &in, &x, &y),
                   IMP_OK);
  ck_assert_double_eq_tol(xbar, -x / y, 1e-10);

  /* x = +-1: the forward finds y ~ 1e-5, whose 1 x 1 Jacobian 2y is well
   * conditioned on its own; the regularity check reports the singular
   * root instead of a gradient of -x/y ~ 1e5. */
  for (int sign = -1; sign <= 1; sign += 2) {
    x = sign;
    xbar = 0.0;
    ck_assert_int_eq(imp_layer_forward(layer, &in, &x, &y), IMP_OK);
    ck_assert_int_eq(imp_layer_backward(layer, &xbar, &ybar, &in, &x, &y),
                     IMP_ESINGULAR);
    ck_assert_ptr_nonnull(strstr(imp_last_error(), "condition number"));
    ck_assert_double_eq(xbar, 0.0);
  }
  imp_layer_free(layer);

  /* Without the check the gradient is huge and meaningless. */
  opt.skip_check = 1;
  ck_assert_int_eq(imp_root_layer_create(&circle, &r, &opt, "circle", &layer),
                   IMP_OK);
  x = 1.0;
  xbar = 0.0;
  ck_assert_int_eq(imp_layer_forward(layer, &in, &x, &y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, &xbar, &ybar, &in, &x, &y),
                   IMP_OK);
  ck_assert_double_gt(fabs(xbar), 1e3);
  imp_layer_free(layer);
  opt.skip_check = 0;

  /* f(y) = y^2 at its root 0, through the direct entry points. */
  x = 0.0;
  y = 1.0;
  xbar = 0.0;
  ck_assert_int_eq(imp_root_solve(&square, &opt, &x, NULL, &y, NULL), IMP_OK);
  ck_assert_double_lt(fabs(y), 1e-4);
  ck_assert_int_eq(
      imp_root_backward(&square, &opt, &x, NULL, &y, &ybar, &xbar, NULL, NULL),
      IMP_ESINGULAR);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "condition number"));
  ck_assert_double_eq(xbar, 0.0);

  /* An exactly singular 2 x 2 Jacobian: condition number infinite. */
  ck_assert_int_eq(imp_root_backward(&rank_one, &opt, &x2, NULL, y2, ybar2,
                                     &xbar2, NULL, NULL),
                   IMP_ESINGULAR);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "condition number inf"));
  opt.skip_check = 1;
  ck_assert_int_eq(imp_root_backward(&rank_one, &opt, &x2, NULL, y2, ybar2,
                                     &xbar2, NULL, NULL),
                   IMP_ESINGULAR);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "singular"));
  ck_assert_double_eq(xbar2, 0.0);
}
END_TEST

/* The regularity check on the roots of the test systems: only Powell's
 * singular system, whose Jacobian is singular at its root, is refused. */
START_TEST(regularity_check_on_mgh)
{
  for (size_t k = 0; k < MGH_NPROBLEMS; k++) {
    const mgh_problem *m = &mgh_problems[k];
    imp_problem p = mgh_imp_problem(m, MGH_JACOBIAN);
    imp_root_options opt = {.solver = IMP_ROOT_HYBRIDSJ};
    double y[MGH_NMAX], ybar[MGH_NMAX];
    int singular = strcmp(m->name, "Powell singular") == 0;

    mgh_start(m, 1.0, y);
    for (size_t i = 0; i < m->n; i++)
      ybar[i] = 1.0 + (double)i;
    ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, NULL, y, NULL), IMP_OK);
    ck_assert_msg(
        imp_root_backward(&p, &opt, NULL, NULL, y, ybar, NULL, NULL, NULL) ==
            (singular ? IMP_ESINGULAR : IMP_OK),
        "%s: %s", m->name, imp_last_error());
  }
}
END_TEST

/* A regular root whose unknowns differ in scale by S^2:
 *     u = y1 / S, v = y2 S,
 *     f1 = u + v - 2 - theta,  f2 = u v - 1 + 0.1 (v^3 - 1).
 * In (u, v) the Jacobian [[1, 1], [v, u + 0.3 v^2]] is well conditioned at
 * the root, the same for every S; only the units of y change. */
static int scaled_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  double s = *(const double *)ctx, u = y[0] / s, v = y[1] * s;

  (void)x;
  r[0] = u + v - 2.0 - theta[0];
  r[1] = u * v - 1.0 + 0.1 * (v * v * v - 1.0);
  return 0;
}

static int scaled_jacobian(void *ctx, const double *x, const double *y,
                           const double *theta, double *jac)
{
  double s = *(const double *)ctx, u = y[0] / s, v = y[1] * s;

  (void)x;
  (void)theta;
  jac[0] = 1.0 / s;
  jac[1] = s;
  jac[2] = v / s;
  jac[3] = (u + 0.3 * v * v) * s;
  return 0;
}

static int scaled_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *w, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  double jac[4];

  (void)vjp_x;
  scaled_jacobian(ctx, x, y, theta, jac);
  if (vjp_y != NULL) {
    vjp_y[0] = jac[0] * w[0] + jac[2] * w[1];
    vjp_y[1] = jac[1] * w[0] + jac[3] * w[1];
  }
  if (vjp_theta != NULL)
    vjp_theta[0] -= w[0];
  return 0;
}

/* L(theta) = y2 through a layer. */
static int scaled_objective(void *ctx, const double *theta, double *value)
{
  imp_layer *layer = ctx;
  imp_shape in = {1, 0, 1, 1};
  double x = 0.0, y[2];
  int rc;

  imp_layer_params(layer)[0] = theta[0];
  rc = imp_layer_forward(layer, &in, &x, y);
  if (rc != IMP_OK)
    return rc;
  *value = y[1];
  return 0;
}

START_TEST(regularity_check_ignores_units)
{
  static const double scales[3] = {1.0, 1e3, 1e6};
  double s = scales[_i], theta = 0.0, x = 0.0, tbar, y[2], ybar[2] = {0, 1};
  double initial[2] = {0.8 * s, 1.3 / s}, u, v, exact;
  imp_problem p = {.ny = 2,
                   .ntheta = 1,
                   .residual = scaled_residual,
                   .jacobian = scaled_jacobian,
                   .vjp = scaled_vjp,
                   .ctx = &s};
  /* kappa(J) grows like S^2, to 9e12 at S = 1e6: the adjoint's own limit
   * is raised so that only the regularity check is under test. */
  imp_root_options opt = {.solver = IMP_ROOT_HYBRIDSJ,
                          .residual_tol = 1e-12,
                          .initial = initial,
                          .adjoint = {.max_cond = 1e30}};
  imp_shape in = {1, 0, 1, 1};
  imp_gradcheck_result res;
  imp_layer *layer;

  /* The check passes, and the gradient is d(v / S)/dtheta = -v / (S det)
   * with det = u + 0.3 v^2 - v, the determinant in (u, v). */
  memcpy(y, initial, sizeof y);
  ck_assert_int_eq(imp_root_solve(&p, &opt, NULL, &theta, y, NULL), IMP_OK);
  tbar = 0.0;
  ck_assert_msg(imp_root_backward(&p, &opt, NULL, &theta, y, ybar, NULL, &tbar,
                                  NULL) == IMP_OK,
                "S = %g: %s", s, imp_last_error());
  u = y[0] / s;
  v = y[1] * s;
  exact = -v / (u + 0.3 * v * v - v) / s;
  ck_assert_double_eq_tol(tbar, exact, 1e-9 * fabs(exact));

  /* Through a layer, against finite differences (fourth order, relative
   * error 1e-6; the forward is accurate to 1e-12 in f). */
  ck_assert_int_eq(imp_root_layer_create(&p, &theta, &opt, "scaled", &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, &x, y), IMP_OK);
  imp_layer_zero_grad(layer);
  ck_assert_int_eq(imp_layer_backward(layer, NULL, ybar, &in, &x, y), IMP_OK);
  tbar = imp_layer_grads(layer)[0];
  ck_assert_int_eq(
      imp_gradcheck(scaled_objective, layer, &theta, 1, &tbar, NULL, &res),
      IMP_OK);
  ck_assert_msg(res.max_rel_err < 1e-6, "S = %g: analytic %.10g numeric %.10g",
                s, res.analytic, res.numeric);
  imp_layer_free(layer);
}
END_TEST

/* A forward that imp_layer_forward refuses before the layer runs leaves
 * y and the statistics of the previous forward; one that fails inside the
 * layer replaces both. */
START_TEST(refused_forward_keeps_stats)
{
  imp_problem p = {.nx = 1, .ny = 1, .residual = cube, .vjp = cube_vjp};
  double one = 1.0, x[2] = {8.0, 27.0}, bad[2] = {8.0, NAN}, y[2], kept[2];
  imp_root_options opt = {.solver = IMP_ROOT_NEWTON, .initial = &one};
  imp_shape in = {2, 1, 1, 1}, wrong = {2, 3, 1, 1};
  imp_root_stats before, after;
  imp_layer *layer;

  ck_assert_int_eq(imp_root_layer_create(&p, NULL, &opt, NULL, &layer), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_root_layer_stats(layer, &before), IMP_OK);
  ck_assert_uint_eq(before.samples, 2);
  memcpy(kept, y, sizeof y);

  /* Refused: NaN input, wrong shape. */
  ck_assert_int_eq(imp_layer_forward(layer, &in, bad, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_layer_forward(layer, &wrong, x, y), IMP_ESHAPE);
  ck_assert_int_eq(imp_root_layer_stats(layer, &after), IMP_OK);
  ck_assert_mem_eq(&after, &before, sizeof before);
  ck_assert_mem_eq(y, kept, sizeof y);
  imp_layer_free(layer);

  /* Failed inside the layer: two iterations are not enough. */
  opt.max_iter = 2;
  ck_assert_int_eq(imp_root_layer_create(&p, NULL, &opt, NULL, &layer), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, y), IMP_ENOCONV);
  ck_assert_int_eq(imp_root_layer_stats(layer, &after), IMP_OK);
  ck_assert_uint_eq(after.samples, 1);
  ck_assert_uint_eq(after.iterations, 2);
  ck_assert(isnan(y[0]) && isnan(y[1]));
  imp_layer_free(layer);
}
END_TEST

/* ------------------------------------------------------------------ */
/* GSL's error handler: off inside imp, the caller's own afterwards. */

static int handler_calls;

static void counting_handler(const char *reason, const char *file, int line,
                             int gsl_errno)
{
  (void)reason;
  (void)file;
  (void)line;
  (void)gsl_errno;
  handler_calls++;
}

START_TEST(gsl_handler_restored)
{
  /* Newton from y = 0 on f = y^2 - x: df/dy = 0, so GSL's LU solve fails
   * and raises GSL_EDOM through the error handler. */
  imp_problem square = {
      .nx = 1, .ny = 1, .residual = square_residual, .vjp = square_vjp};
  double zero = 0.0, x = 2.0, y = 0.0, out;
  imp_root_options opt = {.solver = IMP_ROOT_NEWTON, .initial = &zero};
  imp_shape in = {1, 1, 1, 1};
  gsl_error_handler_t *previous, *current;
  gsl_matrix *lu = gsl_matrix_calloc(1, 1);
  gsl_permutation *perm = gsl_permutation_calloc(1);
  gsl_vector *b = gsl_vector_calloc(1), *sol = gsl_vector_calloc(1);
  imp_layer *layer;

  /* The same GSL failure outside imp reaches the handler: the check
   * below is not vacuous. */
  previous = gsl_set_error_handler(counting_handler);
  handler_calls = 0;
  gsl_linalg_LU_solve(lu, perm, b, sol);
  ck_assert_int_eq(handler_calls, 1);

  /* Inside imp it does not, and the handler is ours again afterwards. */
  handler_calls = 0;
  ck_assert_int_eq(imp_root_solve(&square, &opt, &x, NULL, &y, NULL),
                   IMP_ESINGULAR);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "singular"));
  ck_assert_int_eq(imp_root_layer_create(&square, NULL, &opt, NULL, &layer),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &in, &x, &out), IMP_ESINGULAR);
  imp_layer_free(layer);
  ck_assert_int_eq(handler_calls, 0);
  current = gsl_set_error_handler(previous);
  ck_assert(current == counting_handler);

  gsl_matrix_free(lu);
  gsl_permutation_free(perm);
  gsl_vector_free(b);
  gsl_vector_free(sol);
}
END_TEST

static Suite *root_suite(void)
{
  Suite *s = suite_create("root");
  TCase *tc = tcase_create("root");

  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, solver_names);
  tcase_add_loop_test(tc, mgh_agrees_with_gsl, 0, IMP_ROOT_NSOLVERS);
  tcase_add_loop_test(tc, gradients_match_finite_differences, 0,
                      2 * IMP_ROOT_NSOLVERS);
  tcase_add_test(tc, header_example);
  tcase_add_test(tc, backward_accumulates);
  tcase_add_test(tc, warm_start_and_copies);
  tcase_add_test(tc, batch_stats_sum_and_max);
  tcase_add_test(tc, bad_input);
  tcase_add_loop_test(tc, callback_failures, 0, IMP_ROOT_NSOLVERS);
  tcase_add_test(tc, no_convergence);
  tcase_add_loop_test(tc, step_test_away_from_a_root, 0, IMP_ROOT_NSOLVERS);
  tcase_add_loop_test(tc, step_test_at_a_root, 0, IMP_ROOT_NSOLVERS);
  tcase_add_loop_test(tc, singular_roots, 0, 2);
  tcase_add_test(tc, regularity_check_on_mgh);
  tcase_add_loop_test(tc, regularity_check_ignores_units, 0, 3);
  tcase_add_test(tc, refused_forward_keeps_stats);
  tcase_add_test(tc, gsl_handler_restored);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(root_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

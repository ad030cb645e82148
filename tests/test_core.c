/*
 * test_core.c - statuses, the implicit problem, the shared adjoint solve,
 * the gradient checker, the layer handle, the generator and the BLAS
 * binding.
 */
#define _GNU_SOURCE
#include <check.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "imp.h"

/* ------------------------------------------------------------------ */
/* A test problem: f(x, y; theta) = A y + theta * y^3 - x, elementwise
 * theta, with A = 2 I + a fixed non-symmetric coupling.  For theta >= 0
 * the map y -> f is strongly monotone, so y*(x, theta) exists and is
 * unique. */

#define TN 4

typedef struct cubic {
  double a[TN * TN];
  int fail_vjp_after; /* fail once this many vjp calls were made; -1 never */
  int vjp_calls;
} cubic;

static void cubic_init(cubic *c)
{
  for (int i = 0; i < TN; i++)
    for (int j = 0; j < TN; j++)
      c->a[i * TN + j] = (i == j ? 2.0 : 0.0) + 0.3 * sin(1.0 + i + 2 * j);
  c->fail_vjp_after = -1;
  c->vjp_calls = 0;
}

static int cubic_residual(void *ctx, const double *x, const double *y,
                          const double *theta, double *r)
{
  cubic *c = ctx;

  for (int i = 0; i < TN; i++) {
    r[i] = theta[i] * y[i] * y[i] * y[i] - x[i];
    for (int j = 0; j < TN; j++)
      r[i] += c->a[i * TN + j] * y[j];
  }
  return 0;
}

static int cubic_vjp(void *ctx, const double *x, const double *y,
                     const double *theta, const double *v, double *vjp_y,
                     double *vjp_x, double *vjp_theta)
{
  cubic *c = ctx;

  (void)x;
  if (c->fail_vjp_after >= 0 && c->vjp_calls >= c->fail_vjp_after)
    return 7;
  c->vjp_calls++;
  for (int j = 0; vjp_y != NULL && j < TN; j++) {
    vjp_y[j] = 3.0 * theta[j] * y[j] * y[j] * v[j];
    for (int i = 0; i < TN; i++)
      vjp_y[j] += v[i] * c->a[i * TN + j];
  }
  for (int i = 0; vjp_x != NULL && i < TN; i++)
    vjp_x[i] -= v[i];
  for (int i = 0; vjp_theta != NULL && i < TN; i++)
    vjp_theta[i] += v[i] * y[i] * y[i] * y[i];
  return 0;
}

static imp_problem cubic_problem(cubic *c)
{
  imp_problem p = {.nx = TN,
                   .ny = TN,
                   .ntheta = TN,
                   .residual = cubic_residual,
                   .vjp = cubic_vjp,
                   .ctx = c};
  return p;
}

/* Newton's method on the problem, with the Jacobian from the library. */
static void newton(const imp_problem *p, const double *x, const double *theta,
                   double *y)
{
  double jac[TN * TN], r[TN];
  int n = TN, one = 1, ipiv[TN], info;

  for (int i = 0; i < TN; i++)
    y[i] = 0.0;
  for (int it = 0; it < 60; it++) {
    ck_assert_int_eq(imp_problem_residual(p, x, y, theta, r), IMP_OK);
    ck_assert_int_eq(imp_problem_jacobian(p, x, y, theta, jac, NULL), IMP_OK);
    /* Row-major J reads as J^T: solve with trans = 'T'. */
    dgetrf_(&n, &n, jac, &n, ipiv, &info);
    ck_assert_int_eq(info, 0);
    dgetrs_("T", &n, &one, jac, &n, ipiv, r, &n, &info, 1);
    for (int i = 0; i < TN; i++)
      y[i] -= r[i];
  }
  ck_assert_int_eq(imp_problem_residual(p, x, y, theta, r), IMP_OK);
  ck_assert(imp__nrm2(TN, r) < 1e-13);
}

/* L(x, theta) = w . y*(x, theta), the objective of the gradient checks;
 * params holds x then theta. */
typedef struct objective {
  imp_problem p;
  double w[TN];
} objective;

static int objective_eval(void *ctx, const double *params, double *value)
{
  objective *o = ctx;
  double y[TN];

  newton(&o->p, params, params + TN, y);
  *value = imp__dot(TN, o->w, y);
  return 0;
}

static void check_adjoint_gradient(imp_adjoint_method method)
{
  cubic c;
  objective o;
  double params[2 * TN], grad[2 * TN] = {0}, y[TN];
  imp_adjoint_options opt = {.method = method};
  imp_adjoint_stats st;
  imp_gradcheck_result res;

  cubic_init(&c);
  o.p = cubic_problem(&c);
  for (int i = 0; i < TN; i++) {
    params[i] = 0.5 + 0.25 * i;     /* x */
    params[TN + i] = 0.2 + 0.1 * i; /* theta */
    o.w[i] = 1.0 - 0.3 * i;
  }
  newton(&o.p, params, params + TN, y);

  /* ybar = dL/dy = w. */
  ck_assert_int_eq(imp_adjoint_solve(&o.p, params, y, params + TN, o.w, NULL,
                                     grad, grad + TN, &opt, &st),
                   IMP_OK);
  ck_assert_int_eq(st.method, method);
  ck_assert(st.residual < 1e-10);
  ck_assert(st.cond > 1.0 && st.cond < 100.0);

  ck_assert_int_eq(
      imp_gradcheck(objective_eval, &o, params, 2 * TN, grad, NULL, &res),
      IMP_OK);
  ck_assert_msg(res.max_rel_err < 1e-8, "max rel err %g", res.max_rel_err);
}

START_TEST(adjoint_dense_matches_fd)
{
  check_adjoint_gradient(IMP_ADJOINT_DENSE_LU);
}
END_TEST

START_TEST(adjoint_gmres_matches_fd)
{
  check_adjoint_gradient(IMP_ADJOINT_GMRES);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A linear problem f = M y - x with M given, for singular and large
 * cases.  Its adjoint is v = -M^-T ybar and xbar = -v. */

typedef struct linear {
  size_t n;
  double *m; /* n x n row-major */
} linear;

static int linear_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  linear *l = ctx;

  (void)theta;
  for (size_t i = 0; i < l->n; i++) {
    r[i] = -x[i];
    for (size_t j = 0; j < l->n; j++)
      r[i] += l->m[i * l->n + j] * y[j];
  }
  return 0;
}

static int linear_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *v, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  linear *l = ctx;

  (void)x, (void)y, (void)theta, (void)vjp_theta;
  for (size_t j = 0; vjp_y != NULL && j < l->n; j++) {
    vjp_y[j] = 0.0;
    for (size_t i = 0; i < l->n; i++)
      vjp_y[j] += v[i] * l->m[i * l->n + j];
  }
  for (size_t i = 0; vjp_x != NULL && i < l->n; i++)
    vjp_x[i] -= v[i];
  return 0;
}

static imp_problem linear_problem(linear *l)
{
  imp_problem p = {.nx = l->n,
                   .ny = l->n,
                   .residual = linear_residual,
                   .vjp = linear_vjp,
                   .ctx = l};
  return p;
}

/* diag(1, ..., 1, d) */
static void diag_matrix(linear *l, size_t n, double d)
{
  l->n = n;
  l->m = calloc(n * n, sizeof(double));
  for (size_t i = 0; i < n; i++)
    l->m[i * n + i] = i + 1 < n ? 1.0 : d;
}

static void check_singular(imp_adjoint_method method, double d, int expect)
{
  linear l;
  imp_problem p;
  double x[3] = {1, 2, 3}, y[3] = {1, 2, 3}, ybar[3] = {1, 1, 1};
  double xbar[3] = {5, 5, 5};
  imp_adjoint_options opt = {.method = method};
  imp_adjoint_stats st;
  int rc;

  diag_matrix(&l, 3, d);
  p = linear_problem(&l);
  rc = imp_adjoint_solve(&p, x, y, NULL, ybar, NULL, xbar, NULL, &opt, &st);
  ck_assert_msg(rc == expect, "d = %g: status %s, expected %s (%s)", d,
                imp_status_name(rc), imp_status_name(expect), imp_last_error());
  if (expect == IMP_ESINGULAR) {
    /* The message carries the condition estimate; xbar is untouched. */
    ck_assert(strstr(imp_last_error(), "condition") != NULL);
    ck_assert(st.cond > 1e12);
    for (int i = 0; i < 3; i++)
      ck_assert(xbar[i] == 5.0);
  } else {
    /* xbar = -v = M^-T ybar, accumulated onto 5. */
    ck_assert(fabs(xbar[2] - (5.0 + 1.0 / d)) < 1e-9 / d);
    ck_assert(fabs(st.cond - 1.0 / d) < 1e-6 / d);
  }
  free(l.m);
}

START_TEST(adjoint_reports_singular)
{
  imp_adjoint_method methods[2] = {IMP_ADJOINT_DENSE_LU, IMP_ADJOINT_GMRES};

  for (int k = 0; k < 2; k++) {
    check_singular(methods[k], 0.0, IMP_ESINGULAR);   /* exactly singular */
    check_singular(methods[k], 1e-14, IMP_ESINGULAR); /* cond 1e14 */
    check_singular(methods[k], 1e-6, IMP_OK);         /* cond 1e6: fine */
  }
}
END_TEST

/* ny = 300 takes GMRES under AUTO; it must agree with dense LU. */
START_TEST(adjoint_gmres_large)
{
  size_t n = 300;
  linear l = {.n = n, .m = calloc(n * n, sizeof(double))};
  imp_problem p = linear_problem(&l);
  double *x = calloc(n, sizeof(double)), *y = calloc(n, sizeof(double));
  double *ybar = calloc(n, sizeof(double));
  double *g1 = calloc(n, sizeof(double)), *g2 = calloc(n, sizeof(double));
  imp_adjoint_options dense = {.method = IMP_ADJOINT_DENSE_LU};
  imp_adjoint_stats st;
  imp_rng rng;

  imp_rng_seed(&rng, 11);
  for (size_t i = 0; i < n; i++) {
    for (size_t j = 0; j < n; j++)
      l.m[i * n + j] = 0.5 * imp_rng_normal(&rng) / sqrt((double)n);
    l.m[i * n + i] += 2.0;
    ybar[i] = imp_rng_normal(&rng);
  }
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, NULL, ybar, NULL, g1, NULL, NULL, &st),
      IMP_OK);
  ck_assert_int_eq(st.method, IMP_ADJOINT_GMRES);
  ck_assert(st.iterations < 100);
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, NULL, ybar, NULL, g2, NULL, &dense, NULL),
      IMP_OK);
  for (size_t i = 0; i < n; i++)
    ck_assert(fabs(g1[i] - g2[i]) < 1e-9 * (1.0 + fabs(g2[i])));
  free(l.m), free(x), free(y), free(ybar), free(g1), free(g2);
}
END_TEST

START_TEST(adjoint_bad_input)
{
  cubic c;
  imp_problem p;
  double x[TN] = {1, 1, 1, 1}, y[TN] = {0}, th[TN] = {0}, yb[TN] = {1};
  double xbar[TN] = {3, 3, 3, 3};
  imp_adjoint_method methods[2] = {IMP_ADJOINT_DENSE_LU, IMP_ADJOINT_GMRES};

  cubic_init(&c);
  p = cubic_problem(&c);

  /* NULL and malformed arguments. */
  ck_assert_int_eq(
      imp_adjoint_solve(NULL, x, y, th, yb, NULL, NULL, NULL, NULL, NULL),
      IMP_EINVAL);
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, th, NULL, NULL, NULL, NULL, NULL, NULL),
      IMP_EINVAL);
  p.vjp = NULL;
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, th, yb, NULL, NULL, NULL, NULL, NULL),
      IMP_EINVAL);
  ck_assert(strstr(imp_last_error(), "vjp") != NULL);
  p = cubic_problem(&c);
  p.ny = 0;
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, th, yb, NULL, NULL, NULL, NULL, NULL),
      IMP_EINVAL);
  p = cubic_problem(&c);

  /* A NaN cotangent. */
  yb[1] = NAN;
  ck_assert_int_eq(
      imp_adjoint_solve(&p, x, y, th, yb, NULL, xbar, NULL, NULL, NULL),
      IMP_ENONFINITE);
  yb[1] = 0.0;

  /* A vjp that fails on the first, a middle and the last call leaves xbar
   * untouched. */
  for (int k = 0; k < 2; k++)
    for (int after = 0; after <= TN; after += 2) {
      imp_adjoint_options opt = {.method = methods[k]};

      c.vjp_calls = 0;
      c.fail_vjp_after = after;
      ck_assert_int_eq(
          imp_adjoint_solve(&p, x, y, th, yb, NULL, xbar, NULL, &opt, NULL),
          IMP_ECALLBACK);
      for (int i = 0; i < TN; i++)
        ck_assert(xbar[i] == 3.0);
    }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Statuses and the log hook. */

START_TEST(status_names_and_messages)
{
  int codes[] = {
#define CODE(name, value, short_name, message) name,
      IMP_STATUS_TABLE(CODE)
#undef CODE
  };
  size_t n = sizeof codes / sizeof codes[0];

  ck_assert(n >= 8);
  for (size_t i = 0; i < n; i++) {
    ck_assert(codes[i] <= 0);
    ck_assert(strlen(imp_strerror(codes[i])) > 3);
    for (size_t j = 0; j < i; j++)
      ck_assert_str_ne(imp_status_name(codes[i]), imp_status_name(codes[j]));
  }
  ck_assert_str_eq(imp_status_name(IMP_ESINGULAR), "singular");
  ck_assert_str_eq(imp_strerror(12345), "unknown status code");
}
END_TEST

typedef struct log_capture {
  int lines;
  char last[512];
} log_capture;

static void capture(imp_log_level level, const char *line, void *user)
{
  log_capture *c = user;

  (void)level;
  c->lines++;
  strncpy(c->last, line, sizeof c->last - 1);
}

START_TEST(errors_and_log_hook)
{
  log_capture cap = {0};
  imp_problem p = {0};

  /* Silent by default; the detail message is kept per thread. */
  imp_clear_error();
  ck_assert_str_eq(imp_last_error(), "");
  ck_assert_int_eq(imp_problem_check(&p, 0), IMP_EINVAL);
  ck_assert(strstr(imp_last_error(), "ny = 0") != NULL);
  ck_assert(strncmp(imp_last_error(), "invalid: ", 9) == 0);

  imp_set_log(capture, &cap, IMP_LOG_ERROR);
  ck_assert_int_eq(imp_problem_check(NULL, 0), IMP_EINVAL);
  ck_assert_int_eq(cap.lines, 1);
  ck_assert(strstr(cap.last, "NULL") != NULL);
  imp_set_log(NULL, NULL, IMP_LOG_ERROR);
  ck_assert_int_eq(imp_problem_check(NULL, 0), IMP_EINVAL);
  ck_assert_int_eq(cap.lines, 1);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The gradient checker itself: L = sum sin(p_i) p_{i+1}. */

static int wavy(void *ctx, const double *p, double *value)
{
  size_t n = *(size_t *)ctx;

  *value = 0.0;
  for (size_t i = 0; i + 1 < n; i++)
    *value += sin(p[i]) * p[i + 1];
  return 0;
}

static int failing_objective(void *ctx, const double *p, double *value)
{
  (void)ctx, (void)p, (void)value;
  return 1;
}

START_TEST(gradcheck_detects_errors)
{
  size_t n = 6;
  double p[6] = {0.3, -1.2, 2.0, 0.7, 5.5, -0.1}, saved[6], g[6] = {0};
  imp_gradcheck_options second = {.order = 2};
  imp_gradcheck_result res;

  memcpy(saved, p, sizeof p);
  for (size_t i = 0; i < n; i++) {
    if (i + 1 < n)
      g[i] += cos(p[i]) * p[i + 1];
    if (i > 0)
      g[i] += sin(p[i - 1]);
  }

  /* A right gradient passes at both orders; params come back exactly. */
  ck_assert_int_eq(imp_gradcheck(wavy, &n, p, n, g, NULL, &res), IMP_OK);
  ck_assert(res.max_rel_err < 1e-10);
  ck_assert_int_eq(res.evaluations, 4 * n);
  ck_assert_int_eq(imp_gradcheck(wavy, &n, p, n, g, &second, &res), IMP_OK);
  ck_assert(res.max_rel_err < 1e-8);
  ck_assert(memcmp(p, saved, sizeof p) == 0);

  /* A wrong entry is found and named. */
  g[3] *= 1.001;
  ck_assert_int_eq(imp_gradcheck(wavy, &n, p, n, g, NULL, &res), IMP_OK);
  ck_assert_int_eq(res.worst, 3);
  ck_assert(res.max_rel_err > 5e-4 && res.max_rel_err < 2e-3);

  ck_assert_int_eq(imp_gradcheck(failing_objective, NULL, p, n, g, NULL, &res),
                   IMP_ECALLBACK);
  ck_assert_int_eq(imp_gradcheck(wavy, &n, NULL, n, g, NULL, &res), IMP_EINVAL);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The layer handle, with a user layer y = s * x (one parameter s). */

static int scale_shape(const imp_layer *l, const imp_shape *in, imp_shape *out)
{
  (void)l;
  *out = *in;
  return IMP_OK;
}

static int scale_forward(imp_layer *l, const imp_shape *in, const double *x,
                         double *y)
{
  double s = imp_layer_params(l)[0];

  for (size_t i = 0; i < imp_shape_numel(in); i++)
    y[i] = s * x[i];
  return IMP_OK;
}

static int scale_backward(imp_layer *l, double *xbar, const double *ybar,
                          const imp_shape *in, const double *x, const double *y)
{
  double s = imp_layer_params(l)[0];

  (void)y;
  for (size_t i = 0; i < imp_shape_numel(in); i++) {
    if (xbar != NULL)
      xbar[i] += s * ybar[i];
    imp_layer_grads(l)[0] += x[i] * ybar[i];
  }
  return IMP_OK;
}

static int rebinds;

static int scale_rebind(imp_layer *l)
{
  (void)l;
  rebinds++;
  return IMP_OK;
}

static const imp_layer_ops scale_ops = {.kind = "scale",
                                        .output_shape = scale_shape,
                                        .forward = scale_forward,
                                        .backward = scale_backward,
                                        .rebind = scale_rebind};

START_TEST(layer_handle)
{
  imp_layer *l = NULL;
  imp_shape in = {.n = 2, .c = 3, .h = 1, .w = 1};
  double x[6] = {1, 2, 3, 4, 5, 6}, y[6], yb[6] = {1, 1, 1, 1, 1, 1};
  double xb[6] = {0}, p[1], g[1];

  ck_assert_int_eq(imp_layer_create(NULL, NULL, 1, "s", &l), IMP_EINVAL);
  ck_assert_ptr_null(l);
  ck_assert_int_eq(imp_layer_create(&scale_ops, NULL, 1, NULL, &l), IMP_OK);
  ck_assert_str_eq(imp_layer_name(l), "scale");
  ck_assert_str_eq(imp_layer_kind(l), "scale");
  ck_assert_int_eq(imp_layer_nparams(l), 1);
  ck_assert(imp_layer_training(l));
  imp_layer_params(l)[0] = 2.0;

  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert(y[5] == 12.0);
  ck_assert_int_eq(imp_layer_backward(l, xb, yb, &in, x, y), IMP_OK);
  ck_assert(xb[0] == 2.0 && imp_layer_grads(l)[0] == 21.0);

  /* Moving the storage keeps the values and tells the layer. */
  ck_assert_int_eq(imp_layer_bind_storage(l, p, g), IMP_OK);
  ck_assert(p[0] == 2.0 && g[0] == 21.0 && rebinds == 1);
  imp_layer_zero_grad(l);
  ck_assert(g[0] == 0.0);

  /* Non-finite input and parameters are refused. */
  x[4] = INFINITY;
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENONFINITE);
  x[4] = 5.0;
  p[0] = NAN;
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_layer_forward(l, &in, NULL, y), IMP_EINVAL);

  imp_layer_free(l);
  imp_layer_free(NULL);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The generator. */

START_TEST(rng_is_deterministic)
{
  imp_rng a, b;
  double mean = 0.0, var = 0.0;
  size_t idx[50], seen[50] = {0}, n = 200000;

  imp_rng_seed(&a, 42);
  imp_rng_seed(&b, 42);
  for (int i = 0; i < 100; i++)
    ck_assert(imp_rng_next(&a) == imp_rng_next(&b));
  imp_rng_seed(&b, 43);
  ck_assert(imp_rng_next(&a) != imp_rng_next(&b));

  /* Moments of the normal sampler, with 5-sigma tolerances. */
  for (size_t i = 0; i < n; i++) {
    double z = imp_rng_normal(&a);

    mean += z;
    var += z * z;
  }
  mean /= (double)n;
  var = var / (double)n - mean * mean;
  ck_assert(fabs(mean) < 5.0 / sqrt((double)n));
  ck_assert(fabs(var - 1.0) < 5.0 * sqrt(2.0 / (double)n));

  for (size_t i = 0; i < 50; i++)
    idx[i] = i;
  imp_rng_shuffle(&a, idx, 50);
  for (size_t i = 0; i < 50; i++)
    seen[idx[i]]++;
  for (size_t i = 0; i < 50; i++)
    ck_assert_int_eq(seen[i], 1);
  for (int i = 0; i < 1000; i++)
    ck_assert(imp_rng_below(&a, 7) < 7);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The process binds cblas_* to OpenBLAS, for GSL's calls too: GSL's own
 * cblas_dgemm reference resolves through the same global lookup. */

START_TEST(blas_is_openblas)
{
  const char *names[] = {"cblas_dgemm", "cblas_ddot", "cblas_dnrm2"};

  for (int i = 0; i < 3; i++) {
    void *sym = dlsym(RTLD_DEFAULT, names[i]);
    Dl_info info;

    ck_assert_ptr_nonnull(sym);
    ck_assert(dladdr(sym, &info) != 0);
    ck_assert_msg(strstr(info.dli_fname, "openblas") != NULL,
                  "%s comes from %s", names[i], info.dli_fname);
  }
}
END_TEST

static Suite *core_suite(void)
{
  Suite *s = suite_create("core");
  TCase *tc = tcase_create("core");

  tcase_add_test(tc, status_names_and_messages);
  tcase_add_test(tc, errors_and_log_hook);
  tcase_add_test(tc, adjoint_dense_matches_fd);
  tcase_add_test(tc, adjoint_gmres_matches_fd);
  tcase_add_test(tc, adjoint_reports_singular);
  tcase_add_test(tc, adjoint_gmres_large);
  tcase_add_test(tc, adjoint_bad_input);
  tcase_add_test(tc, gradcheck_detects_errors);
  tcase_add_test(tc, layer_handle);
  tcase_add_test(tc, rng_is_deterministic);
  tcase_add_test(tc, blas_is_openblas);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(core_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

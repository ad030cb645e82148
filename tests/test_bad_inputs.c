/*
 * test_bad_inputs.c - a table of bad inputs per public entry point.
 *
 * Each row tries one bad input on one entry point and asserts the status
 * it must return.  The rows are written as a Markdown table to the file
 * named by IMP_BAD_INPUT_TABLE when that is set, and compared with the
 * checked-in table named by IMP_BAD_INPUT_DOC (docs/bad-inputs.md) when
 * that is set, so the document cannot go stale.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imp.h"

#define MAX_ROWS 160

typedef struct row {
  const char *entry;
  const char *input;
  int expected;
  int got;
} row;

static row rows[MAX_ROWS];
static size_t nrows, nwrong;

/* Record a row; a status other than the expected one is printed here and
 * fails the test once every row has run, so that all of them show. */
static void record(const char *entry, const char *input, int expected, int got)
{
  ck_assert_uint_lt(nrows, MAX_ROWS);
  rows[nrows++] = (row){entry, input, expected, got};
  if (got != expected) {
    nwrong++;
    fprintf(stderr, "%s with %s: expected %s, got %s (%s)\n", entry, input,
            imp_status_name(expected), imp_status_name(got), imp_last_error());
  }
}

/* ------------------------------------------------------------------ */
/* Callbacks that fail on a chosen call                                  */
/* ------------------------------------------------------------------ */

/* Calls counted so far and the call that fails (0: none fails).  A
 * failing callback returns 1: a negative IMP_E* code would be passed
 * through as it is. */
static long calls, fail_at;

static int tick(void)
{
  calls++;
  return calls == fail_at ? 1 : 0;
}

/* The call counts that fail: the first, a middle and the last one. */
typedef int (*run_fn)(void);

/* first = 0 leaves out the failure on the first call. */
static void callback_rows(const char *entry, const char *callback, run_fn run,
                          int first)
{
  static char labels[MAX_ROWS][3][64];
  static size_t nlabels;
  static const char *where[3] = {"first", "middle", "last"};
  long n, at[3];

  /* Count the calls of a clean run, which must succeed. */
  calls = 0;
  fail_at = 0;
  ck_assert_int_eq(run(), IMP_OK);
  n = calls;
  ck_assert_int_ge(n, 3);
  at[0] = 1;
  at[1] = (n + 1) / 2;
  at[2] = n;

  /* The same run with a failure on each chosen call. */
  ck_assert_uint_lt(nlabels, MAX_ROWS);
  for (int k = first ? 0 : 1; k < 3; k++) {
    snprintf(labels[nlabels][k], sizeof labels[nlabels][k],
             "%s fails on the %s call", callback, where[k]);
    calls = 0;
    fail_at = at[k];
    record(entry, labels[nlabels][k], IMP_ECALLBACK, run());
  }
  nlabels++;
  fail_at = 0;
}

/* ------------------------------------------------------------------ */
/* A linear problem r = A y - x, A 2 x 2                                 */
/* ------------------------------------------------------------------ */

static double lin_a[4];

static void set_matrix(double a, double b, double c, double d)
{
  lin_a[0] = a, lin_a[1] = b, lin_a[2] = c, lin_a[3] = d;
}

static int lin_residual(void *ctx, const double *x, const double *y,
                        const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = lin_a[0] * y[0] + lin_a[1] * y[1] - x[0];
  r[1] = lin_a[2] * y[0] + lin_a[3] * y[1] - x[1];
  return tick();
}

static int lin_vjp(void *ctx, const double *x, const double *y,
                   const double *theta, const double *v, double *vjp_y,
                   double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)x, (void)y, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL) {
    vjp_y[0] = lin_a[0] * v[0] + lin_a[2] * v[1];
    vjp_y[1] = lin_a[1] * v[0] + lin_a[3] * v[1];
  }
  if (vjp_x != NULL) {
    vjp_x[0] -= v[0];
    vjp_x[1] -= v[1];
  }
  return tick();
}

static const imp_problem lin_problem = {
    .nx = 2, .ny = 2, .residual = lin_residual, .vjp = lin_vjp};

static int adjoint_run(void)
{
  imp_adjoint_options opt = {.method = IMP_ADJOINT_DENSE_LU};
  double x[2] = {1, 2}, y[2] = {0.5, 1}, ybar[2] = {1, -1}, v[2], xbar[2];

  set_matrix(2, 0, 0, 2);
  xbar[0] = xbar[1] = 0;
  return imp_adjoint_solve(&lin_problem, x, y, NULL, ybar, v, xbar, NULL, &opt,
                           NULL);
}

static void adjoint_rows(void)
{
  const char *e = "imp_adjoint_solve";
  imp_adjoint_options opt = {.method = IMP_ADJOINT_DENSE_LU};
  imp_problem p = lin_problem;
  double x[2] = {1, 2}, y[2] = {0.5, 1}, ybar[2] = {1, -1}, v[2], xbar[2];
  double inf_bar[2] = {INFINITY, 0}, nan_y[2] = {0.5, NAN};

  set_matrix(2, 0, 0, 2);
  record(e, "NULL problem", IMP_EINVAL,
         imp_adjoint_solve(NULL, x, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  record(e, "NULL y", IMP_EINVAL,
         imp_adjoint_solve(&p, x, NULL, NULL, ybar, v, xbar, NULL, &opt, NULL));
  record(e, "NULL ybar", IMP_EINVAL,
         imp_adjoint_solve(&p, x, y, NULL, NULL, v, xbar, NULL, &opt, NULL));
  p.ny = 0;
  record(e, "ny = 0", IMP_EINVAL,
         imp_adjoint_solve(&p, x, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  p = lin_problem;
  p.vjp = NULL;
  record(e, "no vjp callback", IMP_EINVAL,
         imp_adjoint_solve(&p, x, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  p = lin_problem;
  record(e, "Inf in ybar", IMP_ENONFINITE,
         imp_adjoint_solve(&p, x, y, NULL, inf_bar, v, xbar, NULL, &opt, NULL));
  record(
      e, "NaN in y", IMP_ENONFINITE,
      imp_adjoint_solve(&p, x, nan_y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  record(
      e, "Inf in x", IMP_ENONFINITE,
      imp_adjoint_solve(&p, inf_bar, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  set_matrix(1, 1, 1, 1);
  record(e, "singular df/dy", IMP_ESINGULAR,
         imp_adjoint_solve(&p, x, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  set_matrix(1, 1, 1, 1 + 1e-14);
  record(e, "near-singular df/dy (cond 4e14)", IMP_ESINGULAR,
         imp_adjoint_solve(&p, x, y, NULL, ybar, v, xbar, NULL, &opt, NULL));
  callback_rows(e, "vjp", adjoint_run, 1);
}

/* ------------------------------------------------------------------ */
/* imp_gradcheck                                                         */
/* ------------------------------------------------------------------ */

static int square_sum(void *ctx, const double *params, double *value)
{
  (void)ctx;
  *value = params[0] * params[0] + params[1] * params[1];
  return tick();
}

static int gradcheck_run(void)
{
  double params[2] = {1, 2}, grad[2] = {2, 4};
  imp_gradcheck_result r;

  return imp_gradcheck(square_sum, NULL, params, 2, grad, NULL, &r);
}

static void gradcheck_rows(void)
{
  const char *e = "imp_gradcheck";
  double params[2] = {1, 2}, grad[2] = {2, 4}, nan_grad[2] = {NAN, 4};
  double inf_params[2] = {INFINITY, 2};
  imp_gradcheck_options order3 = {.order = 3};
  imp_gradcheck_result r;

  record(e, "NULL objective", IMP_EINVAL,
         imp_gradcheck(NULL, NULL, params, 2, grad, NULL, &r));
  record(e, "NULL params", IMP_EINVAL,
         imp_gradcheck(square_sum, NULL, NULL, 2, grad, NULL, &r));
  record(e, "NULL grad", IMP_EINVAL,
         imp_gradcheck(square_sum, NULL, params, 2, NULL, NULL, &r));
  record(e, "NULL result", IMP_EINVAL,
         imp_gradcheck(square_sum, NULL, params, 2, grad, NULL, NULL));
  record(e, "order 3", IMP_EINVAL,
         imp_gradcheck(square_sum, NULL, params, 2, grad, &order3, &r));
  record(e, "Inf in params", IMP_ENONFINITE,
         imp_gradcheck(square_sum, NULL, inf_params, 2, grad, NULL, &r));

  /* A NaN in the analytic gradient is a failed check, not an error: the
   * worst error is Inf at that entry. */
  record(e, "NaN in grad (max_rel_err = Inf)", IMP_OK,
         imp_gradcheck(square_sum, NULL, params, 2, nan_grad, NULL, &r));
  ck_assert(isinf(r.max_rel_err));
  ck_assert_uint_eq(r.worst, 0);
  callback_rows(e, "objective", gradcheck_run, 1);
}

/* ------------------------------------------------------------------ */
/* Dense, convolution and stack                                          */
/* ------------------------------------------------------------------ */

static void dense_rows(void)
{
  const char *e = "imp_layer_forward (dense)";
  const char *b = "imp_layer_backward (dense)";
  imp_rng rng;
  imp_layer *dense = NULL, *bad = NULL;
  imp_shape in = {2, 3, 1, 1}, wrong = {2, 4, 1, 1}, empty = {0, 3, 1, 1};
  double x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[4], ybar[4] = {1, 1, 1, 1};
  double xbar[8] = {0}, nan_x[6] = {1, NAN, 3, 4, 5, 6};
  double inf_bar[4] = {1, INFINITY, 1, 1};

  imp_rng_seed(&rng, 7);
  record("imp_dense_create", "in = 0", IMP_EINVAL,
         imp_dense_create(0, 2, &rng, "d", &bad));
  record("imp_dense_create", "NULL out", IMP_EINVAL,
         imp_dense_create(3, 2, &rng, "d", NULL));
  ck_assert_int_eq(imp_dense_create(3, 2, &rng, "dense", &dense), IMP_OK);

  record(e, "NULL layer", IMP_EINVAL, imp_layer_forward(NULL, &in, x, y));
  record(e, "NULL shape", IMP_EINVAL, imp_layer_forward(dense, NULL, x, y));
  record(e, "NULL x", IMP_EINVAL, imp_layer_forward(dense, &in, NULL, y));
  record(e, "NULL y", IMP_EINVAL, imp_layer_forward(dense, &in, x, NULL));
  record(e, "4 features into a 3-input layer", IMP_ESHAPE,
         imp_layer_forward(dense, &wrong, x, y));
  record(e, "batch of 0", IMP_ESHAPE, imp_layer_forward(dense, &empty, x, y));
  record(e, "NaN in x", IMP_ENONFINITE,
         imp_layer_forward(dense, &in, nan_x, y));
  imp_layer_params(dense)[0] = INFINITY;
  record(e, "Inf in the weight", IMP_ENONFINITE,
         imp_layer_forward(dense, &in, x, y));
  imp_layer_params(dense)[0] = 0.5;

  ck_assert_int_eq(imp_layer_forward(dense, &in, x, y), IMP_OK);
  record(b, "NULL layer", IMP_EINVAL,
         imp_layer_backward(NULL, xbar, ybar, &in, x, y));
  record(b, "NULL ybar", IMP_EINVAL,
         imp_layer_backward(dense, xbar, NULL, &in, x, y));
  record(b, "4 features into a 3-input layer", IMP_ESHAPE,
         imp_layer_backward(dense, xbar, ybar, &wrong, x, y));
  record(b, "Inf in ybar", IMP_ENONFINITE,
         imp_layer_backward(dense, xbar, inf_bar, &in, x, y));
  imp_layer_free(dense);
}

static void conv_rows(void)
{
  const char *e = "imp_layer_forward (conv3x3)";
  imp_rng rng;
  imp_layer *conv = NULL, *bad = NULL;
  imp_shape in = {1, 2, 3, 3}, wrong = {1, 3, 3, 3};
  double x[27] = {0}, y[36];

  imp_rng_seed(&rng, 8);
  record("imp_conv3x3_create", "cin = 0", IMP_EINVAL,
         imp_conv3x3_create(0, 4, &rng, "c", &bad));
  ck_assert_int_eq(imp_conv3x3_create(2, 4, &rng, "conv", &conv), IMP_OK);
  record(e, "3 channels into a 2-channel convolution", IMP_ESHAPE,
         imp_layer_forward(conv, &wrong, x, y));
  x[4] = NAN;
  record(e, "NaN in x", IMP_ENONFINITE, imp_layer_forward(conv, &in, x, y));
  imp_layer_free(conv);
}

static void stack_rows(void)
{
  const char *e = "imp_stack_forward";
  imp_rng rng;
  imp_stack *stack = NULL;
  imp_layer *d1 = NULL, *d2 = NULL;
  imp_shape in = {1, 3, 1, 1}, wrong = {1, 5, 1, 1};
  double x[5] = {1, 2, 3, 4, 5}, y[4], nan_x[3] = {1, NAN, 3};

  imp_rng_seed(&rng, 9);
  ck_assert_int_eq(imp_stack_create("stack", &stack), IMP_OK);
  ck_assert_int_eq(imp_dense_create(3, 4, &rng, "d1", &d1), IMP_OK);
  ck_assert_int_eq(imp_dense_create(4, 2, &rng, "d2", &d2), IMP_OK);
  ck_assert_int_eq(imp_stack_add(stack, d1), IMP_OK);
  ck_assert_int_eq(imp_stack_add(stack, d2), IMP_OK);
  record("imp_stack_add", "NULL layer", IMP_EINVAL, imp_stack_add(stack, NULL));

  record(e, "NULL stack", IMP_EINVAL, imp_stack_forward(NULL, &in, x, y));
  record(e, "NULL x", IMP_EINVAL, imp_stack_forward(stack, &in, NULL, y));
  record(e, "5 features into a 3-input stack", IMP_ESHAPE,
         imp_stack_forward(stack, &wrong, x, y));
  record(e, "NaN in x", IMP_ENONFINITE,
         imp_stack_forward(stack, &in, nan_x, y));

  imp_stack_free(stack);
}

/* ------------------------------------------------------------------ */
/* Root finding                                                          */
/* ------------------------------------------------------------------ */

static int root_run(void)
{
  double x[2] = {1, 2}, y[2] = {0, 0};

  set_matrix(2, 1, 1, 3);
  return imp_root_solve(&lin_problem, NULL, x, NULL, y, NULL);
}

static void root_rows(void)
{
  const char *e = "imp_root_solve";
  const char *b = "imp_root_backward";
  const char *c = "imp_root_layer_create";
  imp_problem p = lin_problem;
  imp_root_options opt = {0};
  imp_layer *layer = NULL;
  double x[2] = {1, 2}, y[2] = {0, 0}, nan_x[2] = {NAN, 2};
  double ybar[2] = {1, 1}, xbar[2] = {0, 0};

  set_matrix(2, 1, 1, 3);
  record(e, "NULL problem", IMP_EINVAL,
         imp_root_solve(NULL, NULL, x, NULL, y, NULL));
  record(e, "NULL y", IMP_EINVAL,
         imp_root_solve(&p, NULL, x, NULL, NULL, NULL));
  record(e, "NaN in x", IMP_ENONFINITE,
         imp_root_solve(&p, NULL, nan_x, NULL, y, NULL));
  opt.solver = IMP_ROOT_NSOLVERS;
  record(e, "solver IMP_ROOT_NSOLVERS", IMP_EINVAL,
         imp_root_solve(&p, &opt, x, NULL, y, NULL));
  p.residual = NULL;
  record(e, "no residual callback", IMP_EINVAL,
         imp_root_solve(&p, NULL, x, NULL, y, NULL));
  p = lin_problem;
  p.ny = 0;
  record(e, "ny = 0", IMP_EINVAL, imp_root_solve(&p, NULL, x, NULL, y, NULL));
  p = lin_problem;
  callback_rows(e, "residual", root_run, 1);

  set_matrix(1, 1, 1, 1);
  y[0] = y[1] = 1;
  record(b, "singular df/dy", IMP_ESINGULAR,
         imp_root_backward(&p, NULL, x, NULL, y, ybar, xbar, NULL, NULL));
  set_matrix(1, 1, 1, 1 + 1e-14);
  record(b, "near-singular df/dy (cond 4e14)", IMP_ESINGULAR,
         imp_root_backward(&p, NULL, x, NULL, y, ybar, xbar, NULL, NULL));
  set_matrix(2, 1, 1, 3);
  record(b, "NULL ybar", IMP_EINVAL,
         imp_root_backward(&p, NULL, x, NULL, y, NULL, xbar, NULL, NULL));

  record(c, "NULL problem", IMP_EINVAL,
         imp_root_layer_create(NULL, NULL, NULL, "r", &layer));
  record(c, "NULL out", IMP_EINVAL,
         imp_root_layer_create(&p, NULL, NULL, "r", NULL));
  p.ny = 0;
  record(c, "ny = 0", IMP_EINVAL,
         imp_root_layer_create(&p, NULL, NULL, "r", &layer));
  p = lin_problem;
  p.ntheta = 1;
  record(c, "ntheta = 1 with NULL theta", IMP_EINVAL,
         imp_root_layer_create(&p, NULL, NULL, "r", &layer));
  ck_assert_ptr_null(layer);
}

/* ------------------------------------------------------------------ */
/* Deep equilibrium layer                                                */
/* ------------------------------------------------------------------ */

/* h(x, z) = 0.5 z + x, one feature per pixel. */
static int half_map(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    double *out)
{
  (void)ctx, (void)xs, (void)theta;
  for (size_t i = 0; i < imp_shape_numel(zs); i++)
    out[i] = 0.5 * z[i] + x[i];
  return tick();
}

static int half_vjp(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    const double *v, double *vjp_z, double *vjp_x,
                    double *vjp_theta)
{
  (void)ctx, (void)xs, (void)x, (void)z, (void)theta, (void)vjp_theta;
  for (size_t i = 0; i < imp_shape_numel(zs); i++) {
    if (vjp_z != NULL)
      vjp_z[i] = 0.5 * v[i];
    if (vjp_x != NULL)
      vjp_x[i] += v[i];
  }
  return 0;
}

static const imp_deq_map half = {
    .x_channels = 1, .z_channels = 1, .map = half_map, .vjp = half_vjp};

static int deq_run(void)
{
  imp_deq_options opt = {.solver = imp_fp_picard,
                         .train = {.max_iter = 60, .rtol = 1e-10},
                         .eval = {.max_iter = 60, .rtol = 1e-10}};
  imp_shape in = {1, 1, 1, 1};
  double x[1] = {1}, y[1];
  imp_layer *l = NULL;
  int rc;

  ck_assert_int_eq(imp_deq_create(&half, NULL, &opt, "half", &l), IMP_OK);
  calls = 0;
  rc = imp_layer_forward(l, &in, x, y);
  imp_layer_free(l);
  return rc;
}

static void deq_rows(void)
{
  const char *c = "imp_deq_create";
  const char *f = "imp_layer_forward (deq)";
  const char *s = "imp_deq_set_budget";
  imp_deq_map m = half;
  imp_deq_options opt = {.solver = imp_fp_picard,
                         .train = {.max_iter = 3, .rtol = 1e-12},
                         .eval = {.max_iter = 3, .rtol = 1e-12}};
  imp_deq_budget zero = {.max_iter = 0, .rtol = 1e-6};
  imp_deq_budget negative = {.max_iter = 10, .rtol = -1};
  imp_deq_budget none = {.max_iter = 10};
  imp_deq_budget good = {.max_iter = 10, .rtol = 1e-6};
  imp_shape in = {1, 1, 1, 1}, wrong = {1, 2, 1, 1};
  double x[2] = {1, 1}, y[2], nan_x[1] = {NAN};
  imp_layer *l = NULL, *bad = NULL, *dense = NULL;
  imp_rng rng;

  record(c, "NULL map", IMP_EINVAL,
         imp_deq_create(NULL, NULL, NULL, "d", &bad));
  m.map = NULL;
  record(c, "no map callback", IMP_EINVAL,
         imp_deq_create(&m, NULL, NULL, "d", &bad));
  m = half;
  m.z_channels = 0;
  record(c, "z_channels = 0", IMP_EINVAL,
         imp_deq_create(&m, NULL, NULL, "d", &bad));
  ck_assert_ptr_null(bad);

  ck_assert_int_eq(imp_deq_create(&half, NULL, &opt, "half", &l), IMP_OK);
  record(f, "2 channels into a 1-channel map", IMP_ESHAPE,
         imp_layer_forward(l, &wrong, x, y));
  record(f, "NaN in x", IMP_ENONFINITE, imp_layer_forward(l, &in, nan_x, y));
  record(f, "3 iterations for rtol 1e-12", IMP_ENOCONV,
         imp_layer_forward(l, &in, x, y));
  callback_rows(f, "map", deq_run, 1);

  record(s, "max_iter = 0", IMP_EINVAL, imp_deq_set_budget(l, 1, &zero));
  record(s, "negative rtol", IMP_EINVAL, imp_deq_set_budget(l, 0, &negative));
  record(s, "no tolerance", IMP_EINVAL, imp_deq_set_budget(l, 1, &none));
  record(s, "NULL budget", IMP_EINVAL, imp_deq_set_budget(l, 1, NULL));
  record(s, "NULL layer", IMP_EINVAL, imp_deq_set_budget(NULL, 1, &good));
  imp_rng_seed(&rng, 10);
  ck_assert_int_eq(imp_dense_create(1, 1, &rng, "dense", &dense), IMP_OK);
  record(s, "a dense layer", IMP_EINVAL, imp_deq_set_budget(dense, 1, &good));
  imp_layer_free(dense);
  imp_layer_free(l);
}

/* ------------------------------------------------------------------ */
/* Quadratic programs                                                    */
/* ------------------------------------------------------------------ */

static void qp_rows(void)
{
  const char *e = "imp_qp_solve";
  imp_qp_dims dims = {.nz = 2, .nineq = 2}, zero = {.nz = 0, .nineq = 2};
  double Q[4] = {1, 0, 0, 1}, p[2] = {1, -1}, G[4] = {1, 0, 0, 1};
  double h[2] = {1, 1}, y[8], nan_Q[4] = {1, NAN, 0, 1};
  double inf_h[2] = {1, INFINITY}, indefinite[4] = {1, 0, 0, -1};
  double ginf[2] = {1, -1}, hinf[2] = {-1, -1};
  imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};
  imp_qp_dims one = {.nz = 1, .nineq = 2};
  double Q1[1] = {1}, p1[1] = {0};

  record(e, "NULL dims", IMP_EINVAL, imp_qp_solve(NULL, 1, &d, y, NULL, NULL));
  record(e, "NULL data", IMP_EINVAL,
         imp_qp_solve(&dims, 1, NULL, y, NULL, NULL));
  record(e, "NULL y", IMP_EINVAL, imp_qp_solve(&dims, 1, &d, NULL, NULL, NULL));
  record(e, "nz = 0", IMP_EINVAL, imp_qp_solve(&zero, 1, &d, y, NULL, NULL));
  record(e, "a batch of 0", IMP_EINVAL,
         imp_qp_solve(&dims, 0, &d, y, NULL, NULL));
  d.Q = NULL;
  record(e, "NULL Q", IMP_EINVAL, imp_qp_solve(&dims, 1, &d, y, NULL, NULL));
  d.Q = Q;
  d.G = NULL;
  record(e, "NULL G with nineq = 2", IMP_EINVAL,
         imp_qp_solve(&dims, 1, &d, y, NULL, NULL));
  d.G = G;
  d.Q = nan_Q;
  record(e, "NaN in Q", IMP_ENONFINITE,
         imp_qp_solve(&dims, 1, &d, y, NULL, NULL));
  d.Q = Q;
  d.h = inf_h;
  record(e, "Inf in h", IMP_ENONFINITE,
         imp_qp_solve(&dims, 1, &d, y, NULL, NULL));
  d.h = h;
  d.Q = indefinite;
  record(e, "indefinite Q (eigenvalue -1)", IMP_ENONCONVEX,
         imp_qp_solve(&dims, 1, &d, y, NULL, NULL));
  d = (imp_qp_data){.Q = Q1, .p = p1, .G = ginf, .h = hinf};
  record(e, "z <= -1 and -z <= -1", IMP_EINFEASIBLE,
         imp_qp_solve(&one, 1, &d, y, NULL, NULL));
}

/* ------------------------------------------------------------------ */
/* Neural ODE                                                            */
/* ------------------------------------------------------------------ */

/* Robertson's stiff kinetics with rate constants theta. */
static int rob_rhs(void *ctx, const double *t, const double *h, const double *p,
                   double *out)
{
  (void)ctx, (void)t;
  out[0] = -p[0] * h[0] + p[1] * h[1] * h[2];
  out[2] = p[2] * h[1] * h[1];
  out[1] = -out[0] - out[2];
  return tick();
}

static int rob_vjp(void *ctx, const double *t, const double *h, const double *p,
                   const double *v, double *vjp_h, double *vjp_t,
                   double *vjp_theta)
{
  double l21 = v[1] - v[0], l32 = v[2] - v[1];

  (void)ctx, (void)t, (void)vjp_t;
  if (vjp_h != NULL) {
    vjp_h[0] = p[0] * l21;
    vjp_h[1] = -p[1] * h[2] * l21 + 2.0 * p[2] * h[1] * l32;
    vjp_h[2] = -p[1] * h[1] * l21;
  }
  if (vjp_theta != NULL) {
    vjp_theta[0] += h[0] * l21;
    vjp_theta[1] -= h[1] * h[2] * l21;
    vjp_theta[2] += h[1] * h[1] * l32;
  }
  return 0;
}

static const imp_ode_field rob_field = {
    .d = 3, .ntheta = 3, .rhs = rob_rhs, .vjp = rob_vjp};

static void rob_rates(imp_layer *ode)
{
  imp_layer_params(ode)[0] = 0.04;
  imp_layer_params(ode)[1] = 1.0e4;
  imp_layer_params(ode)[2] = 3.0e7;
}

static int ode_run(void)
{
  imp_ode_options opt = {.method = IMP_ODE_BDF};
  double times[1] = {1.0}, x[3] = {1, 0, 0}, y[3];
  imp_shape in = {1, 3, 1, 1};
  imp_layer *ode = NULL;
  int rc;

  ck_assert_int_eq(imp_ode_create(&rob_field, 0, times, 1, &opt, "r", &ode),
                   IMP_OK);
  rob_rates(ode);
  calls = 0;
  rc = imp_layer_forward(ode, &in, x, y);
  imp_layer_free(ode);
  return rc;
}

static void ode_rows(void)
{
  const char *c = "imp_ode_create";
  const char *f = "imp_layer_forward (ode)";
  imp_ode_field field = rob_field;
  imp_ode_options adams = {.method = IMP_ODE_ADAMS, .max_steps = 50};
  imp_ode_options bad_tol = {.rtol = -1};
  double times[2] = {1.0, 4e5}, backwards[2] = {2.0, 1.0};
  double nan_times[1] = {NAN};
  double x[6] = {1, 0, 0, 1, 0, 0}, y[12], nan_x[3] = {1, NAN, 0};
  imp_shape in = {1, 3, 1, 1}, wrong = {1, 4, 1, 1};
  imp_layer *ode = NULL, *bad = NULL;

  record(c, "NULL field", IMP_EINVAL,
         imp_ode_create(NULL, 0, times, 2, NULL, "o", &bad));
  field.rhs = NULL;
  record(c, "no rhs callback", IMP_EINVAL,
         imp_ode_create(&field, 0, times, 2, NULL, "o", &bad));
  field = rob_field;
  field.d = 0;
  record(c, "d = 0", IMP_EINVAL,
         imp_ode_create(&field, 0, times, 2, NULL, "o", &bad));
  field = rob_field;
  record(c, "ntimes = 0", IMP_EINVAL,
         imp_ode_create(&field, 0, times, 0, NULL, "o", &bad));
  record(c, "decreasing times", IMP_EINVAL,
         imp_ode_create(&field, 0, backwards, 2, NULL, "o", &bad));
  record(c, "NaN output time", IMP_EINVAL,
         imp_ode_create(&field, 0, nan_times, 1, NULL, "o", &bad));
  record(c, "negative rtol", IMP_EINVAL,
         imp_ode_create(&field, 0, times, 2, &bad_tol, "o", &bad));
  ck_assert_ptr_null(bad);

  ck_assert_int_eq(imp_ode_create(&field, 0, times, 2, &adams, "rob", &ode),
                   IMP_OK);
  rob_rates(ode);
  record(f, "4 channels into a 3-state field", IMP_ESHAPE,
         imp_layer_forward(ode, &wrong, x, y));
  record(f, "NaN in x", IMP_ENONFINITE, imp_layer_forward(ode, &in, nan_x, y));
  imp_layer_params(ode)[1] = NAN;
  record(f, "NaN in theta", IMP_ENONFINITE, imp_layer_forward(ode, &in, x, y));
  rob_rates(ode);
  record(f, "stiff Robertson, Adams, 50 steps", IMP_ENOCONV,
         imp_layer_forward(ode, &in, x, y));
  imp_layer_free(ode);
  /* The very first rhs call's failure came back as IMP_OK once: CVODES
   * went on after it. */
  callback_rows(f, "rhs", ode_run, 1);
}

/* ------------------------------------------------------------------ */
/* Checkpoints and optimizers                                            */
/* ------------------------------------------------------------------ */

static void checkpoint_rows(void)
{
  const char *e = "imp_checkpoint_load";
  char dir[] = "/tmp/imp-bad-inputs-XXXXXX", path[96], missing[96];
  imp_rng rng;
  imp_stack *stack = NULL;
  imp_layer *dense = NULL;
  FILE *file;
  long size;

  ck_assert_ptr_nonnull(mkdtemp(dir));
  snprintf(path, sizeof path, "%s/model.ckpt", dir);
  snprintf(missing, sizeof missing, "%s/missing.ckpt", dir);
  imp_rng_seed(&rng, 11);
  ck_assert_int_eq(imp_stack_create("stack", &stack), IMP_OK);
  ck_assert_int_eq(imp_dense_create(3, 2, &rng, "dense", &dense), IMP_OK);
  ck_assert_int_eq(imp_stack_add(stack, dense), IMP_OK);
  ck_assert_int_eq(imp_checkpoint_save(path, stack, NULL, NULL), IMP_OK);

  record(e, "NULL path", IMP_EINVAL,
         imp_checkpoint_load(NULL, stack, NULL, NULL));
  record(e, "NULL stack", IMP_EINVAL,
         imp_checkpoint_load(path, NULL, NULL, NULL));
  record(e, "a missing file", IMP_EIO,
         imp_checkpoint_load(missing, stack, NULL, NULL));

  /* Cut the file to half its length. */
  file = fopen(path, "rb");
  ck_assert_ptr_nonnull(file);
  ck_assert_int_eq(fseek(file, 0, SEEK_END), 0);
  size = ftell(file);
  fclose(file);
  ck_assert_int_gt(size, 16);
  ck_assert_int_eq(truncate(path, size / 2), 0);
  record(e, "a file cut to half its length", IMP_EFORMAT,
         imp_checkpoint_load(path, stack, NULL, NULL));
  ck_assert_int_eq(truncate(path, 0), 0);
  record(e, "an empty file", IMP_EFORMAT,
         imp_checkpoint_load(path, stack, NULL, NULL));

  ck_assert_int_eq(unlink(path), 0);
  ck_assert_int_eq(rmdir(dir), 0);
  imp_stack_free(stack);
}

static void optim_rows(void)
{
  const char *e = "imp_optim_create";
  imp_optim_options o = imp_optim_defaults();
  imp_optim *optim = NULL;

  record(e, "NULL type", IMP_EINVAL, imp_optim_create(NULL, 4, NULL, &optim));
  record(e, "NULL out", IMP_EINVAL,
         imp_optim_create(imp_optim_adam, 4, NULL, NULL));
  o.lr = -1e-3;
  record(e, "negative learning rate", IMP_EINVAL,
         imp_optim_create(imp_optim_adam, 4, &o, &optim));
  o = imp_optim_defaults();
  o.lr = NAN;
  record(e, "NaN learning rate", IMP_EINVAL,
         imp_optim_create(imp_optim_sgd, 4, &o, &optim));
  o = imp_optim_defaults();
  o.beta1 = 1.0;
  record(e, "Adam beta1 = 1", IMP_EINVAL,
         imp_optim_create(imp_optim_adam, 4, &o, &optim));
  o = imp_optim_defaults();
  o.eps = 0.0;
  record(e, "RMSprop eps = 0", IMP_EINVAL,
         imp_optim_create(imp_optim_rmsprop, 4, &o, &optim));
  o = imp_optim_defaults();
  o.nesterov = 1;
  record(e, "SGD Nesterov without momentum", IMP_EINVAL,
         imp_optim_create(imp_optim_sgd, 4, &o, &optim));
  ck_assert_ptr_null(optim);
}

/* ------------------------------------------------------------------ */
/* The table                                                             */
/* ------------------------------------------------------------------ */

static const char *doc_heading =
    "# Bad inputs\n"
    "\n"
    "What each public entry point returns for a bad input.  The table is\n"
    "generated by tests/test_bad_inputs.c, which asserts every row; none\n"
    "crashes, aborts or leaks: the suite also runs under ASan/UBSan.\n"
    "Regenerate it with\n"
    "\n"
    "    IMP_BAD_INPUT_TABLE=docs/bad-inputs.md build/test_bad_inputs\n"
    "\n"
    "| Entry point | Input | Status |\n"
    "| --- | --- | --- |\n";

/* The whole document as a malloc'd string. */
static char *render(void)
{
  size_t cap = strlen(doc_heading) + 1, len = 0;
  char *s;

  for (size_t i = 0; i < nrows; i++)
    cap += strlen(rows[i].entry) + strlen(rows[i].input) + 64;
  s = malloc(cap);
  ck_assert_ptr_nonnull(s);
  len += (size_t)snprintf(s, cap, "%s", doc_heading);
  for (size_t i = 0; i < nrows; i++)
    len += (size_t)snprintf(s + len, cap - len, "| `%s` | %s | `%s` |\n",
                            rows[i].entry, rows[i].input,
                            imp_status_name(rows[i].got));
  return s;
}

static char *slurp(const char *path)
{
  FILE *f = fopen(path, "rb");
  char *s;
  long n;

  ck_assert_msg(f != NULL, "cannot open %s", path);
  ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
  n = ftell(f);
  ck_assert_int_ge(n, 0);
  rewind(f);
  s = malloc((size_t)n + 1);
  ck_assert_ptr_nonnull(s);
  ck_assert_uint_eq(fread(s, 1, (size_t)n, f), (size_t)n);
  s[n] = '\0';
  fclose(f);
  return s;
}

START_TEST(bad_inputs_table)
{
  const char *out = getenv("IMP_BAD_INPUT_TABLE");
  const char *doc = getenv("IMP_BAD_INPUT_DOC");
  char *table;

  nrows = nwrong = 0;
  adjoint_rows();
  gradcheck_rows();
  dense_rows();
  conv_rows();
  stack_rows();
  root_rows();
  deq_rows();
  qp_rows();
  ode_rows();
  checkpoint_rows();
  optim_rows();
  ck_assert_msg(nwrong == 0, "%zu of %zu rows returned another status", nwrong,
                nrows);
  table = render();

  if (out != NULL && out[0] != '\0') {
    FILE *f = fopen(out, "w");

    ck_assert_msg(f != NULL, "cannot write %s", out);
    ck_assert_int_ge(fputs(table, f), 0);
    ck_assert_int_eq(fclose(f), 0);
  }
  if (doc != NULL && doc[0] != '\0') {
    char *expected = slurp(doc);

    ck_assert_msg(strcmp(expected, table) == 0,
                  "%s is stale: regenerate it with IMP_BAD_INPUT_TABLE", doc);
    free(expected);
  }
  free(table);
}
END_TEST

static Suite *bad_inputs_suite(void)
{
  Suite *s = suite_create("bad_inputs");
  TCase *tc = tcase_create("table");

  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, bad_inputs_table);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(bad_inputs_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

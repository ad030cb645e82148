/*
 * test_deq.c - fixed-point solvers and DEQ layers: gradients of every
 * backward mode against finite differences, solver efficiency, failure to
 * converge, a sample gone NaN, budgets and the defaults derived from them,
 * and bad input.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp.h"
#include "imp/blocks.h"
#include "imp/deq.h"
#include "imp/stack.h"

/* ------------------------------------------------------------------ */
/* The dense tanh map h(x, z) = tanh(W z + U x + b), theta = (W, U, b),
 * with NZ state and NX input features. */

#define NZ 6
#define NX 3
#define NB 3
#define NTHETA (NZ * NZ + NZ * NX + NZ)

typedef struct tanh_map {
  int fail_map; /* fail once this many map calls were made; -1 never */
  int calls;
} tanh_map;

static int tanh_forward(void *ctx, const imp_shape *xs, const double *x,
                        const imp_shape *zs, const double *z,
                        const double *theta, double *out)
{
  tanh_map *t = ctx;
  const double *w = theta, *u = theta + NZ * NZ, *b = u + NZ * NX;

  (void)xs;
  if (t != NULL && t->fail_map >= 0 && t->calls++ >= t->fail_map)
    return 3;
  for (size_t s = 0; s < zs->n; s++)
    for (int i = 0; i < NZ; i++) {
      double a = b[i];

      for (int j = 0; j < NZ; j++)
        a += w[i * NZ + j] * z[s * NZ + j];
      for (int j = 0; j < NX; j++)
        a += u[i * NX + j] * x[s * NX + j];
      out[s * NZ + i] = tanh(a);
    }
  return 0;
}

static int tanh_vjp(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    const double *v, double *vjp_z, double *vjp_x,
                    double *vjp_theta)
{
  const double *w = theta, *u = theta + NZ * NZ;
  double h[NZ];

  (void)ctx;
  for (size_t s = 0; s < zs->n; s++) {
    /* delta_i = v_i * tanh'(a_i) = v_i (1 - h_i^2). */
    tanh_forward(NULL, xs, x + s * NX, &(imp_shape){1, NZ, 1, 1}, z + s * NZ,
                 theta, h);
    for (int i = 0; i < NZ; i++)
      h[i] = v[s * NZ + i] * (1.0 - h[i] * h[i]);
    for (int j = 0; vjp_z != NULL && j < NZ; j++) {
      vjp_z[s * NZ + j] = 0.0;
      for (int i = 0; i < NZ; i++)
        vjp_z[s * NZ + j] += h[i] * w[i * NZ + j];
    }
    for (int j = 0; vjp_x != NULL && j < NX; j++)
      for (int i = 0; i < NZ; i++)
        vjp_x[s * NX + j] += h[i] * u[i * NX + j];
    for (int i = 0; vjp_theta != NULL && i < NZ; i++) {
      for (int j = 0; j < NZ; j++)
        vjp_theta[i * NZ + j] += h[i] * z[s * NZ + j];
      for (int j = 0; j < NX; j++)
        vjp_theta[NZ * NZ + i * NX + j] += h[i] * x[s * NX + j];
      vjp_theta[NZ * NZ + NZ * NX + i] += h[i];
    }
  }
  return 0;
}

/* theta with ||W||_F = w_norm (so ||W||_2 <= w_norm: a contraction for
 * w_norm < 1, since |tanh'| <= 1). */
static void init_theta(double *theta, double w_norm, unsigned seed)
{
  imp_rng rng;
  double f;

  imp_rng_seed(&rng, seed);
  imp_rng_fill_normal(&rng, theta, NTHETA, 0.0, 1.0);
  f = w_norm / imp__nrm2(NZ * NZ, theta);
  for (int i = 0; i < NZ * NZ; i++)
    theta[i] *= f;
}

static imp_layer *make_deq(const imp_deq_options *opt, const double *theta,
                           tanh_map *ctx)
{
  imp_deq_map map = {.ntheta = NTHETA,
                     .x_channels = NX,
                     .z_channels = NZ,
                     .map = tanh_forward,
                     .vjp = tanh_vjp,
                     .ctx = ctx};
  imp_layer *l = NULL;

  ck_assert_int_eq(imp_deq_create(&map, theta, opt, "deq", &l), IMP_OK);
  return l;
}

/* L(theta, x) = sum_k w_k y_k of the layer's output. */
typedef struct objective {
  imp_layer *layer;
  double w[NB * NZ];
} objective;

static int objective_eval(void *ctx, const double *params, double *value)
{
  objective *o = ctx;
  imp_shape in = {NB, NX, 1, 1};
  double y[NB * NZ];
  int rc;

  memcpy(imp_layer_params(o->layer), params, NTHETA * sizeof(double));
  rc = imp_layer_forward(o->layer, &in, params + NTHETA, y);
  if (rc != IMP_OK)
    return rc;
  *value = imp__dot(NB * NZ, o->w, y);
  return 0;
}

/* The analytic gradient (theta then x) of the objective at params. */
static void analytic(objective *o, double *params, double *grad)
{
  imp_shape in = {NB, NX, 1, 1};
  double y[NB * NZ];

  memcpy(imp_layer_params(o->layer), params, NTHETA * sizeof(double));
  imp_layer_zero_grad(o->layer);
  memset(grad, 0, (NTHETA + NB * NX) * sizeof(double));
  ck_assert_int_eq(imp_layer_forward(o->layer, &in, params + NTHETA, y),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_backward(o->layer, grad + NTHETA, o->w, &in,
                                      params + NTHETA, y),
                   IMP_OK);
  memcpy(grad, imp_layer_grads(o->layer), NTHETA * sizeof(double));
}

static void setup_objective(objective *o, double *params, imp_layer *l)
{
  imp_rng rng;

  o->layer = l;
  init_theta(params, 0.8, 5);
  imp_rng_seed(&rng, 9);
  imp_rng_fill_normal(&rng, params + NTHETA, NB * NX, 0.0, 1.0);
  imp_rng_fill_normal(&rng, o->w, NB * NZ, 0.0, 1.0);
}

/* Worst relative error of the layer's gradient against differences. */
static double gradient_error(const imp_deq_options *opt)
{
  double params[NTHETA + NB * NX], grad[NTHETA + NB * NX];
  objective o;
  imp_gradcheck_result res;

  setup_objective(&o, params, make_deq(opt, NULL, NULL));
  analytic(&o, params, grad);
  ck_assert_int_eq(imp_gradcheck(objective_eval, &o, params, NTHETA + NB * NX,
                                 grad, NULL, &res),
                   IMP_OK);
  imp_layer_free(o.layer);
  return res.max_rel_err;
}

START_TEST(implicit_gradient_matches_fd)
{
  imp_adjoint_method methods[3] = {IMP_ADJOINT_FIXED_POINT, IMP_ADJOINT_GMRES,
                                   IMP_ADJOINT_DENSE_LU};
  const imp_fp_type *solvers[3] = {imp_fp_anderson, imp_fp_broyden,
                                   imp_fp_picard};

  for (int m = 0; m < 3; m++)
    for (int s = 0; s < 3; s++) {
      imp_deq_options opt = {
          .solver = solvers[s],
          .train = {.max_iter = 400, .rtol = 1e-13},
          .adjoint = {.method = methods[m], .max_iter = 400, .rtol = 1e-13},
      };
      double err = gradient_error(&opt);

      /* The implicit gradient to 1e-6 relative, as required. */
      ck_assert_msg(err < 1e-6, "adjoint %d, solver %s: error %g", m,
                    solvers[s]->name, err);
    }
}
END_TEST

START_TEST(unrolled_gradient_matches_fd)
{
  imp_deq_options opt = {
      .backward = IMP_DEQ_UNROLLED, .unroll_steps = 7, .unroll_damping = 0.8};

  /* Exact backpropagation through 7 steps: differences agree to the
   * fourth-order stencil's accuracy. */
  ck_assert_double_lt(gradient_error(&opt), 1e-8);
}
END_TEST

/* Gradient (theta then x) of a layer with the given options. */
static void layer_gradient(const imp_deq_options *opt, double *params,
                           objective *o, double *grad, imp_layer **keep)
{
  o->layer = make_deq(opt, NULL, NULL);
  analytic(o, params, grad);
  if (keep != NULL)
    *keep = o->layer;
  else
    imp_layer_free(o->layer);
}

static double relative_distance(const double *a, const double *b, size_t n)
{
  double d = 0.0;

  for (size_t i = 0; i < n; i++)
    d += (a[i] - b[i]) * (a[i] - b[i]);
  return sqrt(d) / imp__nrm2(n, b);
}

START_TEST(phantom_gradient)
{
  size_t n = NTHETA + NB * NX;
  double params[NTHETA + NB * NX], exact[NTHETA + NB * NX];
  double g[NTHETA + NB * NX], err[31];
  imp_deq_options implicit = {.train = {.max_iter = 400, .rtol = 1e-13},
                              .eval = {.max_iter = 400, .rtol = 1e-13},
                              .adjoint = {.rtol = 1e-13, .max_iter = 400}};
  objective o;
  imp_layer *ph;
  imp_gradcheck_result res;
  imp_shape zs = {NB, NZ, 1, 1};

  setup_objective(&o, params, NULL);
  layer_gradient(&implicit, params, &o, exact, NULL);

  /* The phantom gradient approaches the implicit one as k grows. */
  for (size_t k = 1; k <= 30; k++) {
    imp_deq_options opt = implicit;

    opt.backward = IMP_DEQ_PHANTOM;
    opt.phantom_steps = k;
    opt.phantom_damping = 1.0;
    layer_gradient(&opt, params, &o, g, NULL);
    err[k] = relative_distance(g, exact, n);
  }
  /* Measured: 7e-2 at k = 1, shrinking about tenfold a step to 3e-14 (the
   * rounding floor) by k = 15. */
  ck_assert_msg(err[1] > 1e-2, "one step: %g", err[1]);
  for (size_t k = 2; k <= 12; k++)
    ck_assert_msg(err[k] < 0.5 * err[k - 1], "k = %zu: %g", k, err[k]);
  ck_assert_msg(err[30] < 1e-12, "k = 30: %g", err[30]);

  /* It is the exact gradient of k steps from z* held constant: the same
   * computation as an unrolled layer started at z*. */
  {
    imp_deq_options opt = implicit, unrolled = {0};
    double zstar[NB * NZ];
    imp_shape in = {NB, NX, 1, 1};

    opt.backward = IMP_DEQ_PHANTOM;
    opt.phantom_steps = 3;
    opt.phantom_damping = 0.6;
    layer_gradient(&opt, params, &o, g, &ph);
    imp_layer_set_training(ph, 0);
    ck_assert_int_eq(imp_layer_forward(ph, &in, params + NTHETA, zstar),
                     IMP_OK);
    imp_layer_free(ph);

    unrolled.backward = IMP_DEQ_UNROLLED;
    unrolled.unroll_steps = 3;
    unrolled.unroll_damping = 0.6;
    unrolled.init = IMP_DEQ_INIT_GIVEN;
    o.layer = make_deq(&unrolled, NULL, NULL);
    ck_assert_int_eq(imp_deq_set_initial(o.layer, &zs, zstar), IMP_OK);
    /* Only theta: x moves z*, which the phantom gradient ignores. */
    ck_assert_int_eq(
        imp_gradcheck(objective_eval, &o, params, NTHETA, g, NULL, &res),
        IMP_OK);
    ck_assert_msg(res.max_rel_err < 1e-7, "phantom vs its computation: %g",
                  res.max_rel_err);
    imp_layer_free(o.layer);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Solvers. */

static size_t evaluations_to_converge(const imp_fp_type *solver, double w_norm)
{
  double theta[NTHETA], x[NB * NX], y[NB * NZ];
  imp_deq_options opt = {.solver = solver,
                         .eval = {.max_iter = 2000, .rtol = 1e-10}};
  imp_shape in = {NB, NX, 1, 1};
  imp_deq_stats st;
  imp_layer *l;
  imp_rng rng;

  init_theta(theta, w_norm, 21);
  imp_rng_seed(&rng, 4);
  imp_rng_fill_normal(&rng, x, NB * NX, 0.0, 1.0);
  l = make_deq(&opt, theta, NULL);
  imp_layer_set_training(l, 0);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_int_eq(st.converged, NB);
  ck_assert(st.rel_residual <= 1e-10);
  ck_assert_int_eq(st.trace_len, st.iterations);
  ck_assert(st.trace[st.trace_len - 1] <= 1e-10);
  imp_layer_free(l);
  return st.evaluations;
}

START_TEST(accelerated_solvers_need_fewer_evaluations)
{
  /* A slowly contracting map: ||W||_F = 0.97. */
  size_t picard = evaluations_to_converge(imp_fp_picard, 0.97);
  size_t anderson = evaluations_to_converge(imp_fp_anderson, 0.97);
  size_t broyden = evaluations_to_converge(imp_fp_broyden, 0.97);

  ck_assert_msg(anderson < picard && broyden < picard,
                "picard %zu, anderson %zu, broyden %zu", picard, anderson,
                broyden);
}
END_TEST

/* h(z) = z + 1 + 0.1 sin(z) has no fixed point: h(z) - z >= 0.9.  Its
 * iterates run off to infinity, which fools a relative test, so the test
 * below is absolute. */
static int drifting(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    double *out)
{
  (void)ctx, (void)xs, (void)x, (void)theta;
  for (size_t i = 0; i < imp_shape_numel(zs); i++)
    out[i] = z[i] + 1.0 + 0.1 * sin(z[i]);
  return 0;
}

START_TEST(non_contractive_map_reports_noconv)
{
  const imp_fp_type *solvers[3] = {imp_fp_picard, imp_fp_anderson,
                                   imp_fp_broyden};
  imp_deq_map map = {.z_channels = 2, .map = drifting};
  imp_shape in = {4, 1, 1, 1};
  double x[4] = {0}, y[8];

  for (int s = 0; s < 3; s++) {
    imp_deq_options opt = {.solver = solvers[s], .train = {.atol = 1e-6}};
    imp_deq_stats st;
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&map, NULL, &opt, "drift", &l), IMP_OK);
    ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENOCONV);
    ck_assert(strstr(imp_last_error(), "above tolerance") != NULL);
    ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
    ck_assert_int_eq(st.converged, 0);
    ck_assert_int_eq(st.forward_status, IMP_ENOCONV);
    ck_assert_int_eq(st.iterations, 30); /* the training budget */
    /* The best iterate is handed back: finite, residual about 0.9 per
     * entry, so about 0.9 sqrt(2) per sample at best. */
    ck_assert(imp__all_finite(y, 8));
    ck_assert(st.abs_residual >= 0.9 * sqrt(2.0) - 1e-12);
    imp_layer_free(l);
  }

  /* Asked for, an exhausted budget is not an error. */
  {
    imp_deq_options opt = {.noconv_ok = 1, .train = {.atol = 1e-6}};
    imp_deq_stats st;
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&map, NULL, &opt, "drift", &l), IMP_OK);
    ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
    ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
    ck_assert_int_eq(st.forward_status, IMP_ENOCONV);
    ck_assert_int_eq(st.converged, 0);
    imp_layer_free(l);
  }
}
END_TEST

/* h(x, z) = D z + x with D = diag(0.7, -0.5, 0.3): spectral radius 0.7. */
static const double diag3[3] = {0.7, -0.5, 0.3};

static int linear_map(void *ctx, const imp_shape *xs, const double *x,
                      const imp_shape *zs, const double *z, const double *theta,
                      double *out)
{
  (void)ctx, (void)xs, (void)theta;
  for (size_t i = 0; i < imp_shape_numel(zs); i++)
    out[i] = diag3[i % 3] * z[i] + x[i];
  return 0;
}

static int linear_vjp(void *ctx, const imp_shape *xs, const double *x,
                      const imp_shape *zs, const double *z, const double *theta,
                      const double *v, double *vjp_z, double *vjp_x,
                      double *vjp_theta)
{
  (void)ctx, (void)xs, (void)x, (void)z, (void)theta, (void)vjp_theta;
  for (size_t i = 0; i < imp_shape_numel(zs); i++) {
    if (vjp_z != NULL)
      vjp_z[i] = diag3[i % 3] * v[i];
    if (vjp_x != NULL)
      vjp_x[i] += v[i];
  }
  return 0;
}

START_TEST(budgets_warm_start_and_spectral_radius)
{
  imp_deq_map map = {
      .x_channels = 3, .z_channels = 3, .map = linear_map, .vjp = linear_vjp};
  imp_deq_options opt = {.solver = imp_fp_picard,
                         .train = {.max_iter = 5, .rtol = 1e-12},
                         .eval = {.max_iter = 200, .rtol = 1e-12},
                         .init = IMP_DEQ_INIT_PREVIOUS};
  imp_shape in = {2, 3, 1, 1};
  double x[6] = {1, 2, 3, -1, 0.5, 2}, y[6], rho;
  imp_deq_stats st;
  imp_layer *l = NULL;

  ck_assert_int_eq(imp_deq_create(&map, NULL, &opt, "lin", &l), IMP_OK);

  /* Training's 5 Picard steps fall short of 1e-12 ... */
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENOCONV);

  /* ... the evaluation budget reaches z* = x / (1 - D), warm started. */
  imp_layer_set_training(l, 0);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  for (int i = 0; i < 6; i++)
    ck_assert(fabs(y[i] - x[i] / (1.0 - diag3[i % 3])) < 1e-10);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);

  /* Started at the fixed point, a second solve stops at once. */
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_int_eq(st.iterations, 1);

  ck_assert_int_eq(imp_deq_spectral_radius(l, x, 60, &rho), IMP_OK);
  ck_assert_msg(fabs(rho - 0.7) < 1e-3, "rho %g", rho);

  /* Budgets can be changed at test time, but not to nothing. */
  ck_assert_int_eq(
      imp_deq_set_budget(l, 0, &(imp_deq_budget){.max_iter = 0, .rtol = 1e-6}),
      IMP_EINVAL);
  ck_assert(strstr(imp_last_error(), "zero iterations") != NULL);
  ck_assert_int_eq(imp_deq_set_budget(l, 0, &(imp_deq_budget){.max_iter = 3}),
                   IMP_EINVAL);
  ck_assert_int_eq(
      imp_deq_set_budget(l, 0, &(imp_deq_budget){.max_iter = 3, .rtol = 1e-6}),
      IMP_OK);
  imp_layer_free(l);
}
END_TEST

START_TEST(bad_input)
{
  double theta[NTHETA], x[NB * NX] = {0}, y[NB * NZ], yb[NB * NZ] = {1};
  imp_shape in = {NB, NX, 1, 1}, wrong = {NB, NX + 1, 1, 1};
  tanh_map ctx = {.fail_map = -1};
  imp_deq_map nomap = {.z_channels = NZ};
  imp_layer *l, *bad = NULL;

  init_theta(theta, 0.5, 3);
  l = make_deq(&(imp_deq_options){.train = {.rtol = 1e-12}}, theta, &ctx);

  /* Creation. */
  ck_assert_int_eq(imp_deq_create(&nomap, NULL, NULL, "x", &bad), IMP_EINVAL);
  ck_assert_ptr_null(bad);
  ck_assert_int_eq(imp_deq_create(NULL, NULL, NULL, "x", &bad), IMP_EINVAL);

  /* Shapes, NaN input and parameters. */
  ck_assert_int_eq(imp_layer_forward(l, &wrong, x, y), IMP_ESHAPE);
  x[4] = NAN;
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENONFINITE);
  x[4] = 0.0;
  imp_layer_params(l)[7] = NAN;
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ENONFINITE);
  imp_layer_params(l)[7] = theta[7];

  /* Backward before any forward. */
  ck_assert_int_eq(imp_layer_backward(l, NULL, yb, &in, x, y), IMP_EINVAL);

  /* A map that fails on the first, a middle and a late call. */
  for (int when = 0; when <= 6; when += 3) {
    ctx.calls = 0;
    ctx.fail_map = when;
    ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_ECALLBACK);
  }
  ctx.fail_map = -1;
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(l, NULL, yb, &in, x, y), IMP_OK);

  /* The stats getter refuses other layers. */
  {
    imp_deq_stats st;

    ck_assert_int_eq(imp_deq_get_stats(NULL, &st), IMP_EINVAL);
  }
  imp_layer_free(l);
}
END_TEST

/* T(z) = c + (z - c) / 2 with c = 1e160: the Gram matrix of Anderson's
 * residuals overflows, and the safeguard must fall back to Picard steps,
 * which still converge.  One sample starts at its fixed point and must
 * stop after one evaluation while the others go on. */
static int huge_map(void *ctx, size_t m, const size_t *idx, const double *z,
                    double *out)
{
  (void)ctx, (void)idx;
  for (size_t i = 0; i < 4 * m; i++)
    out[i] = 1e160 + 0.5 * (z[i] - 1e160);
  return 0;
}

START_TEST(anderson_falls_back_and_samples_stop_on_their_own)
{
  double z[3 * 4] = {0};
  imp_fp_options opt = {.max_iter = 100, .rtol = 1e-8};
  imp_fp_stats st;

  for (int i = 4; i < 8; i++)
    z[i] = 1e160; /* sample 1 starts at the fixed point */
  ck_assert_int_eq(imp_fp_solve(imp_fp_anderson, huge_map, NULL, 3, 4, z, &opt,
                                &st, NULL, NULL),
                   IMP_OK);
  ck_assert(st.fallbacks > 0);
  ck_assert_int_eq(st.converged, 3);
  for (int i = 0; i < 12; i++)
    ck_assert(fabs(z[i] / 1e160 - 1.0) < 1e-7);
  /* Picard at rate 1/2 needs about 27 steps to 1e-8; sample 1 needs 1. */
  ck_assert_int_eq(st.evaluations, 2 * st.iterations + 1);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A DEQ built from the library's blocks, inside a stack:
 * [dense U] -> deq(h(u, z) = tanh(dense W (z) + u)).  It must agree with
 * the callback form above on the same weights, and its whole gradient with
 * finite differences. */

typedef struct stack_objective {
  imp_stack *stack;
  double w[NB * NZ];
} stack_objective;

static int stack_eval(void *ctx, const double *params, double *value)
{
  stack_objective *o = ctx;
  imp_shape in = {NB, NX, 1, 1};
  size_t np = imp_stack_nparams(o->stack);
  double y[NB * NZ];
  int rc;

  memcpy(imp_stack_params(o->stack), params, np * sizeof(double));
  rc = imp_stack_forward(o->stack, &in, params + np, y);
  if (rc != IMP_OK)
    return rc;
  *value = imp__dot(NB * NZ, o->w, y);
  return 0;
}

START_TEST(deq_from_layers_agrees_with_callbacks)
{
  imp_deq_options opt = {.train = {.max_iter = 400, .rtol = 1e-13},
                         .adjoint = {.max_iter = 400, .rtol = 1e-13}};
  double theta[NTHETA], x[NB * NX], y1[NB * NZ], y2[NB * NZ];
  double params[NTHETA + NZ + NB * NX], grad[NTHETA + NZ + NB * NX] = {0};
  imp_layer *dense_w, *dense_u, *act, *deq = NULL, *ref;
  imp_shape in = {NB, NX, 1, 1};
  stack_objective o;
  imp_gradcheck_result res;
  imp_rng rng;
  size_t np;

  init_theta(theta, 0.8, 5);
  imp_rng_seed(&rng, 2);
  imp_rng_fill_normal(&rng, x, NB * NX, 0.0, 1.0);
  imp_rng_fill_normal(&rng, o.w, NB * NZ, 0.0, 1.0);

  /* The blocks: U (bias 0), then the DEQ of W (bias b) and tanh. */
  ck_assert_int_eq(imp_dense_create(NX, NZ, NULL, "U", &dense_u), IMP_OK);
  ck_assert_int_eq(imp_dense_create(NZ, NZ, NULL, "W", &dense_w), IMP_OK);
  ck_assert_int_eq(imp_activation_create(IMP_ACT_TANH, NULL, &act), IMP_OK);
  ck_assert_int_eq(
      imp_deq_create_from_layers(NZ, dense_w, act, &opt, "deq", &deq), IMP_OK);
  ck_assert_int_eq(imp_layer_nparams(deq), NZ * NZ + NZ);
  ck_assert_int_eq(imp_stack_create("stack", &o.stack), IMP_OK);
  ck_assert_int_eq(imp_stack_add(o.stack, dense_u), IMP_OK);
  ck_assert_int_eq(imp_stack_add(o.stack, deq), IMP_OK);

  /* Stack parameters: [U, b_U = 0, W, b]. */
  np = imp_stack_nparams(o.stack);
  ck_assert_int_eq(np, NTHETA + NZ);
  memset(params, 0, sizeof params);
  memcpy(params, theta + NZ * NZ, NZ * NX * sizeof(double));
  memcpy(params + NZ * NX + NZ, theta, NZ * NZ * sizeof(double));
  memcpy(params + NZ * NX + NZ + NZ * NZ, theta + NZ * NZ + NZ * NX,
         NZ * sizeof(double));
  memcpy(params + np, x, sizeof x);
  memcpy(imp_stack_params(o.stack), params, np * sizeof(double));

  /* The same fixed point as the callback form. */
  ck_assert_int_eq(imp_stack_forward(o.stack, &in, x, y1), IMP_OK);
  ref = make_deq(&opt, theta, NULL);
  ck_assert_int_eq(imp_layer_forward(ref, &in, x, y2), IMP_OK);
  for (int i = 0; i < NB * NZ; i++)
    ck_assert(fabs(y1[i] - y2[i]) < 1e-12);
  imp_layer_free(ref);

  /* The whole gradient against finite differences. */
  imp_stack_zero_grad(o.stack);
  ck_assert_int_eq(imp_stack_backward(o.stack, grad + np, o.w), IMP_OK);
  memcpy(grad, imp_stack_grads(o.stack), np * sizeof(double));
  ck_assert_int_eq(
      imp_gradcheck(stack_eval, &o, params, np + NB * NX, grad, NULL, &res),
      IMP_OK);
  ck_assert_msg(res.max_rel_err < 1e-6, "error %g at %zu", res.max_rel_err,
                res.worst);
  imp_stack_free(o.stack);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Per-sample failure, budgets and options. */

/* h(x, z) = 0.5 z + x per sample, fixed point z* = 2x.  The sample of
 * batch index bad[k] returns NaN from its at[k]-th evaluation on, each
 * sample's evaluations counted on their own. */
typedef struct spoiled {
  double x[4];
  int calls[4];
  size_t bad[2];
  int at[2];
} spoiled;

static int spoiled_map(void *ctx, const imp_shape *xs, const double *x,
                       const imp_shape *zs, const double *z,
                       const double *theta, double *out)
{
  spoiled *s = ctx;

  (void)xs, (void)theta;
  for (size_t r = 0; r < zs->n; r++) {
    out[r] = 0.5 * z[r] + x[r];

    /* The packed row r is the sample whose x it carries. */
    for (size_t b = 0; b < 4; b++) {
      if (x[r] != s->x[b])
        continue;
      s->calls[b]++;
      for (int k = 0; k < 2; k++)
        if (b == s->bad[k] && s->calls[b] >= s->at[k])
          out[r] = NAN;
    }
  }
  return 0;
}

START_TEST(nonfinite_sample_is_dropped_and_named)
{
  const imp_fp_type *solvers[3] = {imp_fp_picard, imp_fp_anderson,
                                   imp_fp_broyden};
  imp_shape in = {4, 1, 1, 1};

  for (int s = 0; s < 3; s++) {
    spoiled ctx = {.x = {1, 2, 3, 4}, .bad = {2, 2}, .at = {3, 3}};
    imp_deq_map map = {
        .x_channels = 1, .z_channels = 1, .map = spoiled_map, .ctx = &ctx};
    imp_deq_options opt = {.solver = solvers[s],
                           .train = {.max_iter = 100, .rtol = 1e-10},
                           .noconv_ok = 1};
    double y[4];
    imp_deq_stats st;
    imp_layer *l = NULL;

    /* Sample 2 turns NaN on its third evaluation: it alone is dropped,
     * and the call says which sample it was (noconv_ok does not hide
     * it). */
    ck_assert_int_eq(imp_deq_create(&map, NULL, &opt, "spoiled", &l), IMP_OK);
    ck_assert_int_eq(imp_layer_forward(l, &in, ctx.x, y), IMP_ENONFINITE);
    ck_assert_msg(strstr(imp_last_error(), "sample 2") != NULL, "%s: %s",
                  solvers[s]->name, imp_last_error());
    ck_assert_int_eq(ctx.calls[2], 3);

    /* The others reach z* = 2x to rtol 1e-10: for this contraction by
     * 1/2, |z - z*| = 2 |h(z) - z| <= 2e-10 |h(z)|, 1.6e-9 at x = 4. */
    for (int b = 0; b < 4; b++)
      if (b != 2)
        ck_assert_msg(fabs(y[b] - 2.0 * ctx.x[b]) < 2.1e-10 * 2.0 * ctx.x[b],
                      "%s: y[%d] = %.17g", solvers[s]->name, b, y[b]);

    /* Sample 2 keeps its best finite iterate: of z_0 = 0 (residual 3)
     * and z_1 = h(0) = 3 (residual 1.5), the only ones whose image was
     * finite, z_1.  Every solver's first step is the plain image. */
    ck_assert_msg(y[2] == 3.0, "%s: y[2] = %.17g", solvers[s]->name, y[2]);
    ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
    ck_assert_int_eq(st.forward_status, IMP_ENONFINITE);
    ck_assert_int_eq(st.converged, 3);
    ck_assert_int_eq(st.batch, 4);
    imp_layer_free(l);
  }

  /* With two bad samples the first to fail is named, not the lowest
   * index: sample 3 fails on its second evaluation, sample 1 on its
   * third. */
  {
    spoiled ctx = {.x = {1, 2, 3, 4}, .bad = {1, 3}, .at = {3, 2}};
    imp_deq_map map = {
        .x_channels = 1, .z_channels = 1, .map = spoiled_map, .ctx = &ctx};
    imp_deq_options opt = {.solver = imp_fp_picard,
                           .train = {.max_iter = 100, .rtol = 1e-10}};
    double y[4];
    imp_deq_stats st;
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&map, NULL, &opt, "spoiled", &l), IMP_OK);
    ck_assert_int_eq(imp_layer_forward(l, &in, ctx.x, y), IMP_ENONFINITE);
    ck_assert_msg(strstr(imp_last_error(), "sample 3") != NULL, "%s",
                  imp_last_error());
    ck_assert_msg(strstr(imp_last_error(), "2 of 4") != NULL, "%s",
                  imp_last_error());
    ck_assert(fabs(y[0] - 2.0) < 1e-9 && fabs(y[2] - 6.0) < 1e-9);
    ck_assert(imp__all_finite(y, 4));
    ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
    ck_assert_int_eq(st.converged, 2);
    imp_layer_free(l);
  }
}
END_TEST

/* h(x, z) = a z + x per entry, theta = {a}: z* = x / (1 - a), and the
 * adjoint of ybar = 1 gives xbar = 1 / (1 - a). */
static int scaled_map(void *ctx, const imp_shape *xs, const double *x,
                      const imp_shape *zs, const double *z, const double *theta,
                      double *out)
{
  (void)ctx, (void)xs;
  for (size_t i = 0; i < imp_shape_numel(zs); i++)
    out[i] = theta[0] * z[i] + x[i];
  return 0;
}

static int scaled_vjp(void *ctx, const imp_shape *xs, const double *x,
                      const imp_shape *zs, const double *z, const double *theta,
                      const double *v, double *vjp_z, double *vjp_x,
                      double *vjp_theta)
{
  (void)ctx, (void)xs, (void)x;
  for (size_t i = 0; i < imp_shape_numel(zs); i++) {
    if (vjp_z != NULL)
      vjp_z[i] = theta[0] * v[i];
    if (vjp_x != NULL)
      vjp_x[i] += v[i];
    if (vjp_theta != NULL)
      vjp_theta[0] += v[i] * z[i];
  }
  return 0;
}

static const imp_deq_map scaled = {.ntheta = 1,
                                   .x_channels = 1,
                                   .z_channels = 1,
                                   .map = scaled_map,
                                   .vjp = scaled_vjp};

START_TEST(huge_budget_costs_only_the_iterations_run)
{
  const size_t budgets[3] = {(size_t)1e11, (size_t)-1 / 2, (size_t)-1};
  double x[3] = {1, 2, 3}, y[3];
  imp_shape in = {3, 1, 1, 1};

  /* A budget far beyond memory, for a solve that takes a few hundred
   * Picard steps at rate 0.95: the trace follows the steps taken. */
  for (int k = 0; k < 3; k++) {
    double a = 0.95;
    imp_deq_options opt = {.solver = imp_fp_picard};
    imp_deq_budget big = {.max_iter = budgets[k], .rtol = 1e-12};
    imp_deq_stats st;
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&scaled, &a, &opt, "big", &l), IMP_OK);
    imp_layer_set_training(l, 0);
    ck_assert_int_eq(imp_deq_set_budget(l, 0, &big), IMP_OK);
    ck_assert_msg(imp_layer_forward(l, &in, x, y) == IMP_OK, "%zu: %s",
                  budgets[k], imp_last_error());
    ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);

    /* 0.95^k <= 1e-12 takes k >= 539; the relative test stops a little
     * earlier, since ||h(z) - z|| = 0.05 ||z - z*||. */
    ck_assert_msg(st.iterations > 400 && st.iterations < 600, "%zu",
                  st.iterations);
    ck_assert_int_eq(st.trace_len, st.iterations);
    for (size_t i = 1; i < st.trace_len; i++)
      ck_assert(st.trace[i] < st.trace[i - 1]); /* Picard shrinks it */
    ck_assert(st.trace[st.trace_len - 1] <= 1e-12);
    /* |z - z*| = |h(z) - z| / (1 - a) <= 20 rtol |h(z)|. */
    for (int b = 0; b < 3; b++)
      ck_assert(fabs(y[b] * (1.0 - a) / x[b] - 1.0) < 1e-10);
    imp_layer_free(l);
  }
}
END_TEST

START_TEST(derived_defaults_follow_the_training_budget)
{
  double a = 0.9, x[3] = {1, 2, 3}, y[3], xbar[3], ybar[3] = {1, 1, 1};
  imp_shape in = {3, 1, 1, 1};
  imp_deq_budget seven = {.max_iter = 7, .rtol = 1e-6};
  imp_deq_budget tight = {.max_iter = 400, .rtol = 1e-12};
  imp_deq_stats st;
  imp_layer *l = NULL;

  /* The unrolled steps default to the training max_iter, also after
   * the budget changes ... */
  ck_assert_int_eq(
      imp_deq_create(&scaled, &a,
                     &(imp_deq_options){.backward = IMP_DEQ_UNROLLED}, "u", &l),
      IMP_OK);
  ck_assert_int_eq(imp_deq_set_budget(l, 1, &seven), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_int_eq(st.iterations, 7);
  imp_layer_free(l);

  /* ... but a given number of steps stays. */
  ck_assert_int_eq(
      imp_deq_create(
          &scaled, &a,
          &(imp_deq_options){.backward = IMP_DEQ_UNROLLED, .unroll_steps = 4},
          "u", &l),
      IMP_OK);
  ck_assert_int_eq(imp_deq_set_budget(l, 1, &seven), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_int_eq(st.iterations, 4);
  imp_layer_free(l);

  /* The adjoint's max_iter and rtol follow a tightened training budget:
   * Picard at rate 0.9 needs about 260 steps to 1e-12, far beyond the
   * default 30, and xbar = 1 / (1 - a) = 10 then holds to 1e-9. */
  ck_assert_int_eq(imp_deq_create(&scaled, &a,
                                  &(imp_deq_options){.solver = imp_fp_picard},
                                  "a", &l),
                   IMP_OK);
  ck_assert_int_eq(imp_deq_set_budget(l, 1, &tight), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  memset(xbar, 0, sizeof xbar);
  ck_assert_msg(imp_layer_backward(l, xbar, ybar, &in, x, y) == IMP_OK, "%s",
                imp_last_error());
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert(st.backward_residual <= 1e-11);
  for (int b = 0; b < 3; b++)
    ck_assert_msg(fabs(xbar[b] - 10.0) < 1e-9, "xbar %.17g", xbar[b]);
  imp_layer_free(l);

  /* A given adjoint budget is the user's and stays. */
  ck_assert_int_eq(
      imp_deq_create(
          &scaled, &a,
          &(imp_deq_options){.solver = imp_fp_picard,
                             .adjoint = {.max_iter = 20, .rtol = 1e-12}},
          "a", &l),
      IMP_OK);
  ck_assert_int_eq(imp_deq_set_budget(l, 1, &tight), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(l, xbar, ybar, &in, x, y), IMP_ENOCONV);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_int_eq(st.backward_iterations, 20);
  imp_layer_free(l);
}
END_TEST

START_TEST(create_validates_options)
{
  static const struct {
    const char *what; /* a word the message must contain */
    imp_deq_options opt;
  } bad[] = {
      {"train", {.train = {.rtol = NAN}}},
      {"train", {.train = {.atol = INFINITY}}},
      {"train", {.train = {.rtol = -1e-6, .atol = 1e-6}}},
      {"eval", {.eval = {.atol = -1}}},
      {"phantom_damping", {.phantom_damping = NAN}},
      {"phantom_damping", {.phantom_damping = -0.5}},
      {"unroll_damping", {.unroll_damping = INFINITY}},
      {"init", {.init = (imp_deq_init)42}},
      {"fp", {.fp = {.damping = NAN}}},
      {"fp", {.fp = {.ridge = -1}}},
      {"adjoint", {.adjoint = {.rtol = NAN}}},
  };
  double a = 0.5;

  for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&scaled, &a, &bad[k].opt, "bad", &l),
                     IMP_EINVAL);
    ck_assert_ptr_null(l);
    ck_assert_msg(strstr(imp_last_error(), bad[k].what) != NULL, "case %zu: %s",
                  k, imp_last_error());
  }

  /* Zeros still mean the defaults, and positive values are taken. */
  {
    imp_deq_options ok = {.train = {.atol = 1e-8},
                          .phantom_damping = 0.7,
                          .init = IMP_DEQ_INIT_PREVIOUS};
    imp_layer *l = NULL;

    ck_assert_int_eq(imp_deq_create(&scaled, &a, &ok, "ok", &l), IMP_OK);
    imp_layer_free(l);
  }
}
END_TEST

START_TEST(adjoint_fixed_point_uses_the_forward_solver)
{
  double a = 0.9, x[3] = {1, 2, 3}, y[3], xbar[3] = {0}, ybar[3] = {1, 1, 1};
  imp_shape in = {3, 1, 1, 1};
  imp_deq_options opt = {.solver = imp_fp_picard,
                         .train = {.max_iter = 400, .rtol = 1e-12},
                         .adjoint = {.method = IMP_ADJOINT_FIXED_POINT}};
  imp_deq_stats st;
  imp_layer *l = NULL;

  /* Picard on u = 0.9 u + 1 takes some 250 steps to 1e-12, where
   * Anderson, exact on a linear map after two, would take 3. */
  ck_assert_int_eq(imp_deq_create(&scaled, &a, &opt, "p", &l), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(l, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(l, xbar, ybar, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_deq_get_stats(l, &st), IMP_OK);
  ck_assert_msg(st.backward_iterations > 200, "%zu", st.backward_iterations);
  for (int b = 0; b < 3; b++)
    ck_assert(fabs(xbar[b] - 10.0) < 1e-9);
  imp_layer_free(l);
}
END_TEST

static Suite *deq_suite(void)
{
  Suite *s = suite_create("deq");
  TCase *tc = tcase_create("deq");

  tcase_add_test(tc, implicit_gradient_matches_fd);
  tcase_add_test(tc, unrolled_gradient_matches_fd);
  tcase_add_test(tc, phantom_gradient);
  tcase_add_test(tc, accelerated_solvers_need_fewer_evaluations);
  tcase_add_test(tc, non_contractive_map_reports_noconv);
  tcase_add_test(tc, budgets_warm_start_and_spectral_radius);
  tcase_add_test(tc, bad_input);
  tcase_add_test(tc, anderson_falls_back_and_samples_stop_on_their_own);
  tcase_add_test(tc, deq_from_layers_agrees_with_callbacks);
  tcase_add_test(tc, nonfinite_sample_is_dropped_and_named);
  tcase_add_test(tc, huge_budget_costs_only_the_iterations_run);
  tcase_add_test(tc, derived_defaults_follow_the_training_budget);
  tcase_add_test(tc, create_validates_options);
  tcase_add_test(tc, adjoint_fixed_point_uses_the_forward_solver);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(deq_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

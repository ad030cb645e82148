/*
 * test_ode.c - the neural ODE layer: a linear ODE with an analytic
 * solution and gradients under every solver configuration, the Robertson
 * kinetics gradient that CVODES' own adjoint example prints, finite-
 * difference checks on a tanh MLP vector field (Adams and BDF), and the
 * failure paths (NaN, failing callbacks, a step budget too small).
 */
#define _GNU_SOURCE
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"
#include "imp.h"
#include "imp/blocks.h"
#include "imp/ode.h"

/* ------------------------------------------------------------------ */
/* A damped rotation: dh/dt = A h, A = [[-a, -w], [w, -a]], theta = (a, w).
 * With s = t - t0, h(t) = e^(-a s) R(w s) x, R the rotation matrix, and
 *   dh/da = -s h,   dh/dw = s J h,  J = [[0, -1], [1, 0]],
 *   dh/dx = e^(-a s) R(w s). */

typedef struct rotation {
  int fail_rhs_after_t; /* rhs fails for t > fail_t when set */
  int nan_rhs_after_t;  /* rhs gives NaN for t > fail_t when set */
  int fail_vjp;         /* vjp returns 5 when set */
  double fail_t;
} rotation;

static int rot_rhs(void *ctx, const double *t, const double *h,
                   const double *theta, double *out)
{
  rotation *r = ctx;
  double a = theta[0], w = theta[1];

  if (r != NULL && r->fail_rhs_after_t && *t > r->fail_t)
    return 7;
  out[0] = -a * h[0] - w * h[1];
  out[1] = w * h[0] - a * h[1];
  if (r != NULL && r->nan_rhs_after_t && *t > r->fail_t)
    out[1] = NAN;
  return 0;
}

static int rot_vjp(void *ctx, const double *t, const double *h,
                   const double *theta, const double *v, double *vjp_h,
                   double *vjp_t, double *vjp_theta)
{
  rotation *r = ctx;
  double a = theta[0], w = theta[1];

  (void)t;
  ck_assert_ptr_null(vjp_t);
  if (r != NULL && r->fail_vjp)
    return 5;
  if (vjp_h != NULL) {
    vjp_h[0] = -a * v[0] + w * v[1];
    vjp_h[1] = -w * v[0] - a * v[1];
  }
  if (vjp_theta != NULL) {
    vjp_theta[0] += -(v[0] * h[0] + v[1] * h[1]);
    vjp_theta[1] += -v[0] * h[1] + v[1] * h[0];
  }
  return 0;
}

static int rot_jvp(void *ctx, const double *t, const double *h,
                   const double *theta, const double *u, double *out)
{
  double a = theta[0], w = theta[1];

  (void)ctx;
  (void)t;
  (void)h;
  out[0] = -a * u[0] - w * u[1];
  out[1] = w * u[0] - a * u[1];
  return 0;
}

static int rot_jacobian(void *ctx, const double *t, const double *h,
                        const double *theta, double *jac)
{
  double a = theta[0], w = theta[1];

  (void)ctx;
  (void)t;
  (void)h;
  jac[0] = -a;
  jac[1] = -w;
  jac[2] = w;
  jac[3] = -a;
  return 0;
}

#define ROT_N 2
#define ROT_K 3

static const double rot_t0 = 0.5;
static const double rot_times[ROT_K] = {0.5, 1.2, 2.0};
static const double rot_x[ROT_N * 2] = {1.0, -0.5, 0.3, 2.0};
static const double rot_theta[2] = {0.4, 1.7};

/* Weights of the loss L = sum w . y, one per output entry. */
static double loss_weight(size_t i)
{
  return sin(1.0 + 0.7 * (double)i);
}

/* The analytic y, xbar and thetabar of the rotation for L = sum w . y. */
static void rot_analytic(double *y, double *xbar, double *thetabar)
{
  double a = rot_theta[0], w = rot_theta[1];

  thetabar[0] = thetabar[1] = 0.0;
  for (size_t b = 0; b < ROT_N; b++) {
    const double *x = rot_x + 2 * b;

    xbar[2 * b] = xbar[2 * b + 1] = 0.0;
    for (size_t k = 0; k < ROT_K; k++) {
      double s = rot_times[k] - rot_t0, e = exp(-a * s);
      double c = cos(w * s), sn = sin(w * s);
      size_t at = b * ROT_K * 2 + k * 2;
      double *yk = y + at, w0 = loss_weight(at), w1 = loss_weight(at + 1);

      yk[0] = e * (c * x[0] - sn * x[1]);
      yk[1] = e * (sn * x[0] + c * x[1]);
      xbar[2 * b] += e * (c * w0 + sn * w1);
      xbar[2 * b + 1] += e * (-sn * w0 + c * w1);
      thetabar[0] += -s * (w0 * yk[0] + w1 * yk[1]);
      thetabar[1] += s * (-w0 * yk[1] + w1 * yk[0]);
    }
  }
}

static void check_close(double got, double want, double rtol, const char *what)
{
  ck_assert_msg(fabs(got - want) <= rtol * fmax(1.0, fabs(want)),
                "%s: got %.12g, want %.12g", what, got, want);
}

/* Forward and backward through the layer for L = sum w . y. */
static void run_rotation(const imp_ode_options *opt, int with_jvp, int with_jac,
                         double tol)
{
  imp_ode_field field = {.d = 2, .ntheta = 2, .rhs = rot_rhs, .vjp = rot_vjp};
  imp_shape in = {ROT_N, 2, 1, 1};
  double y[ROT_N * ROT_K * 2], ybar[ROT_N * ROT_K * 2];
  double want_y[ROT_N * ROT_K * 2], want_xbar[ROT_N * 2], want_theta[2];
  double xbar[ROT_N * 2] = {0};
  imp_ode_stats stats;
  imp_layer *ode;

  if (with_jvp)
    field.jvp = rot_jvp;
  if (with_jac)
    field.jacobian = rot_jacobian;
  ck_assert_int_eq(
      imp_ode_create(&field, rot_t0, rot_times, ROT_K, opt, "rotation", &ode),
      IMP_OK);
  memcpy(imp_layer_params(ode), rot_theta, sizeof rot_theta);
  for (size_t i = 0; i < ROT_N * ROT_K * 2; i++)
    ybar[i] = loss_weight(i);

  ck_assert_int_eq(imp_layer_forward(ode, &in, rot_x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, xbar, ybar, &in, rot_x, y), IMP_OK);
  rot_analytic(want_y, want_xbar, want_theta);

  /* Solution, x gradient and theta gradient, to tol. */
  for (size_t i = 0; i < ROT_N * ROT_K * 2; i++)
    check_close(y[i], want_y[i], tol, "y");
  for (size_t i = 0; i < ROT_N * 2; i++)
    check_close(xbar[i], want_xbar[i], tol, "xbar");
  for (size_t j = 0; j < 2; j++)
    check_close(imp_layer_grads(ode)[j], want_theta[j], tol, "thetabar");

  /* The statistics count real work on both passes. */
  ck_assert_int_eq(imp_ode_get_stats(ode, &stats), IMP_OK);
  ck_assert_int_gt(stats.forward.steps, 5);
  ck_assert_int_ge(stats.forward.rhs_evals, stats.forward.steps);
  ck_assert_int_gt(stats.backward.steps, 5);
  ck_assert_int_gt(stats.backward.vjp_evals, stats.backward.steps);
  ck_assert_uint_eq(stats.samples, ROT_N);
  imp_layer_free(ode);
}

START_TEST(rotation_every_configuration)
{
  /* Tolerance 1e-11 on the solver; results checked to 1e-7. */
  const double tol = 1e-7;

  for (int mode = 0; mode < 2; mode++) {
    imp_ode_options opt = {.rtol = 1e-11, .atol = 1e-13};

    /* One system (the default), then per sample. */
    opt.batch = mode == 0 ? IMP_ODE_BATCH_SYSTEM : IMP_ODE_BATCH_SAMPLES;

    /* Adams: fixed point (the default), with Anderson acceleration, and
     * Newton on the jvp. */
    run_rotation(&opt, 0, 0, tol);
    opt.anderson_m = 3;
    run_rotation(&opt, 0, 0, tol);
    opt.anderson_m = 0;
    opt.iteration = IMP_ODE_ITER_NEWTON;
    run_rotation(&opt, 1, 0, tol);
    opt.iteration = IMP_ODE_ITER_AUTO;

    /* BDF: direct from the jacobian (dense, or banded for the system),
     * from the jvp, from CVODES' difference quotient; SPGMR on the jvp
     * and on the difference quotient. */
    opt.method = IMP_ODE_BDF;
    run_rotation(&opt, 0, 1, tol);
    opt.linsol = IMP_ODE_LINSOL_DENSE;
    run_rotation(&opt, 1, 0, tol);
    run_rotation(&opt, 0, 0, tol);
    opt.linsol = IMP_ODE_LINSOL_SPGMR;
    run_rotation(&opt, 1, 0, tol);
    run_rotation(&opt, 0, 0, tol);
    opt.linsol = IMP_ODE_LINSOL_AUTO;

    /* Polynomial interpolation and few steps between checkpoints, so that
     * the backward pass recomputes the forward between many of them. */
    opt.interp = IMP_ODE_POLYNOMIAL;
    opt.checkpoint_steps = 7;
    run_rotation(&opt, 0, 1, tol);
    opt.method = IMP_ODE_ADAMS;
    opt.checkpoint_steps = 13;
    run_rotation(&opt, 0, 0, tol);
  }
}
END_TEST

/* The header's example, dh/dt = -theta h, checked as written there. */
static int decay_rhs(void *ctx, const double *t, const double *h,
                     const double *theta, double *out)
{
  (void)ctx;
  (void)t;
  out[0] = -theta[0] * h[0];
  return 0;
}

static int decay_vjp(void *ctx, const double *t, const double *h,
                     const double *theta, const double *v, double *vjp_h,
                     double *vjp_t, double *vjp_theta)
{
  (void)ctx;
  (void)t;
  (void)vjp_t;
  if (vjp_h != NULL)
    vjp_h[0] = -theta[0] * v[0];
  if (vjp_theta != NULL)
    vjp_theta[0] += -h[0] * v[0];
  return 0;
}

START_TEST(decay_header_example)
{
  imp_ode_field field = {
      .d = 1, .ntheta = 1, .rhs = decay_rhs, .vjp = decay_vjp};
  double times[1] = {2.0}, x[1] = {3.0}, y[1], ybar[1] = {1.0};
  double xbar[1] = {0.0};
  imp_ode_options opt = {.rtol = 1e-10, .atol = 1e-12};
  imp_shape in = {1, 1, 1, 1};
  imp_layer *ode;

  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 1, &opt, "decay", &ode),
                   IMP_OK);
  imp_layer_params(ode)[0] = 0.5;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, xbar, ybar, &in, x, y), IMP_OK);

  /* Values to 1e-8 relative. */
  check_close(y[0], 3.0 * exp(-1.0), 1e-8, "h(T)");
  check_close(xbar[0], exp(-1.0), 1e-8, "xbar");
  check_close(imp_layer_grads(ode)[0], -6.0 * exp(-1.0), 1e-8, "thetabar");

  /* Backward again accumulates: xbar and the gradient double. */
  ck_assert_int_eq(imp_layer_backward(ode, xbar, ybar, &in, x, y), IMP_OK);
  check_close(xbar[0], 2.0 * exp(-1.0), 1e-8, "xbar twice");
  check_close(imp_layer_grads(ode)[0], -12.0 * exp(-1.0), 1e-8,
              "thetabar twice");

  /* An evaluation-mode forward keeps nothing; backward integrates again
   * and gets the same gradient. */
  imp_layer_zero_grad(ode);
  imp_layer_set_training(ode, 0);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y), IMP_OK);
  check_close(imp_layer_grads(ode)[0], -6.0 * exp(-1.0), 1e-8,
              "thetabar after eval forward");
  imp_layer_free(ode);
}
END_TEST

/* A field made from an imp_problem (nx = 1, x[0] the time) runs the
 * same: dh/dt = -theta h + sin(t), checked against the decay layer with
 * the forcing switched off by comparing to a closed form. */
static int forced_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx;
  r[0] = -theta[0] * y[0] + sin(x[0]);
  return 0;
}

START_TEST(field_from_problem)
{
  imp_problem p = {.nx = 1,
                   .ny = 1,
                   .ntheta = 1,
                   .residual = forced_residual,
                   .vjp = decay_vjp};
  imp_problem wide = p;
  imp_ode_field field;
  double times[1] = {1.5}, x[1] = {0.2}, y[1], k = 0.8, T = 1.5;
  imp_ode_options opt = {.rtol = 1e-11, .atol = 1e-13};
  imp_shape in = {1, 1, 1, 1};
  imp_layer *ode;
  double want;

  wide.nx = 3;
  ck_assert_int_eq(imp_ode_field_from_problem(&wide, &field), IMP_EINVAL);
  ck_assert_int_eq(imp_ode_field_from_problem(&p, &field), IMP_OK);
  ck_assert_uint_eq(field.d, 1);
  ck_assert(field.rhs == forced_residual);

  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 1, &opt, NULL, &ode),
                   IMP_OK);
  ck_assert_str_eq(imp_layer_kind(ode), "ode");
  imp_layer_params(ode)[0] = k;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);

  /* h(T) = x e^(-kT) + (k sin T - cos T + e^(-kT)) / (1 + k^2), to 1e-8. */
  want =
      x[0] * exp(-k * T) + (k * sin(T) - cos(T) + exp(-k * T)) / (1.0 + k * k);
  check_close(y[0], want, 1e-8, "forced h(T)");
  imp_layer_free(ode);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Robertson's kinetics with G = int_0^T y3 dt as a fourth component
 * q' = y3, q(0) = 0, so that G = q(T) and the layer's thetabar is dG/dp.
 *
 * The callbacks evaluate every expression in the same order as the
 * example's f, Jac, fB, JacB and fQB.  That matters: at rtol 1e-6 CVODES
 * carries rounding differences in fB into dG/dp at about 3e-5 (measured:
 * writing fB as a loop over the Jacobian moves dG/dp1 from 7.68424e5 to
 * 7.68399e5), so the printed digits are those of this arithmetic.  The
 * values at tight tolerances are 7.6838e+05, -3.0689e+00, 5.1149e-04. */

static int rob_rhs(void *ctx, const double *t, const double *y, const double *p,
                   double *out)
{
  (void)ctx;
  (void)t;
  out[0] = -p[0] * y[0] + p[1] * y[1] * y[2];
  out[2] = p[2] * y[1] * y[1];
  out[1] = -out[0] - out[2];
  out[3] = y[2];
  return 0;
}

static int rob_jacobian(void *ctx, const double *t, const double *y,
                        const double *p, double *jac)
{
  /* Row by row; clang-format would otherwise lay the 4 x 4 out in pairs. */
  // clang-format off
  double rows[16] = {
    -p[0], p[1] * y[2],                    p[1] * y[1],  0.0,
    p[0],  -p[1] * y[2] - 2 * p[2] * y[1], -p[1] * y[1], 0.0,
    0.0,   2 * p[2] * y[1],                0.0,          0.0,
    0.0,   0.0,                            1.0,          0.0};
  // clang-format on

  (void)ctx;
  (void)t;
  memcpy(jac, rows, sizeof rows);
  return 0;
}

/* v^T dg/dh and v^T dg/dp, with l21 = v2 - v1 and l32 = v3 - v2 as in
 * the example (whose fB is -(v^T dg/dh) for the first three entries). */
static int rob_vjp(void *ctx, const double *t, const double *y, const double *p,
                   const double *v, double *vjp_h, double *vjp_t,
                   double *vjp_theta)
{
  double l21 = v[1] - v[0], l32 = v[2] - v[1];

  (void)ctx;
  (void)t;
  (void)vjp_t;
  if (vjp_h != NULL) {
    vjp_h[0] = -(-p[0] * l21);
    vjp_h[1] = -(p[1] * y[2] * l21 - 2.0 * p[2] * y[1] * l32);
    vjp_h[2] = -(p[1] * y[1] * l21 - v[3]);
    vjp_h[3] = 0.0;
  }
  if (vjp_theta != NULL) {
    vjp_theta[0] += y[0] * l21;
    vjp_theta[1] += -(y[1] * y[2]) * l21;
    vjp_theta[2] += y[1] * y[1] * l32;
  }
  return 0;
}

#define ROBERTSON_OUT                                                          \
  "/usr/share/doc/libsundials-dev/examples/cvodes/serial/"                     \
  "cvsRoberts_ASAi_dns.out"

/* What cvsRoberts_ASAi_dns.out prints for the run from tB0 = 4e7. */
static const char *rob_printed_g = "3.9983e+07";
static const char *rob_printed_dgdp[3] = {"7.6842e+05", "-3.0691e+00",
                                          "5.1144e-04"};
static const char *rob_printed_lambda0 = "3.9967e+07";

/* If the installed .out file is there, it must print the embedded
 * numbers: its first "dG/dp:" line belongs to the run from tB0 = 4e7. */
static void check_printed_against_file(void)
{
  FILE *f = fopen(ROBERTSON_OUT, "r");
  char line[256], a[32], b[32], c[32];
  int found = 0;

  if (f == NULL)
    return;
  while (fgets(line, sizeof line, f) != NULL) {
    if (sscanf(line, " dG/dp: %31s %31s %31s", a, b, c) == 3) {
      found = 1;
      break;
    }
  }
  fclose(f);
  ck_assert_msg(found, "no dG/dp line in %s", ROBERTSON_OUT);
  ck_assert_str_eq(a, rob_printed_dgdp[0]);
  ck_assert_str_eq(b, rob_printed_dgdp[1]);
  ck_assert_str_eq(c, rob_printed_dgdp[2]);
}

/* Run the example's problem through the layer; the fourth component is
 * a CVODES quadrature when as_quadrature is set, else part of the ODE. */
static void robertson(int as_quadrature, double *g, double *dgdp,
                      double *lambda0, imp_ode_stats *stats)
{
  /* The example's settings: BDF, Newton with the dense Jacobian, rtol
   * 1e-6 and atol (1e-8, 1e-14, 1e-6) (1e-6 for the quadrature), the
   * adjoint at 1e-6 / 1e-8 and its quadrature at 1e-6, 150 steps between
   * checkpoints, Hermite interpolation, 2500 steps at most. */
  static const double atol[4] = {1e-8, 1e-14, 1e-6, 1e-6};
  imp_ode_field field = {.d = 4,
                         .ntheta = 3,
                         .rhs = rob_rhs,
                         .vjp = rob_vjp,
                         .jacobian = rob_jacobian};
  imp_ode_options opt = {.method = IMP_ODE_BDF,
                         .rtol = 1e-6,
                         .atol_vec = atol,
                         .adjoint_rtol = 1e-6,
                         .adjoint_atol = 1e-8,
                         .adjoint_atol_quad = 1e-6,
                         .max_steps = 2500,
                         .checkpoint_steps = 150,
                         .interp = IMP_ODE_HERMITE,
                         .quadratures = as_quadrature ? 1 : 0};
  double times[1] = {4e7}, x[4] = {1.0, 0.0, 0.0, 0.0}, y[4];
  double ybar[4] = {0.0, 0.0, 0.0, 1.0}, xbar[4] = {0};
  imp_shape in = {1, 4, 1, 1};
  imp_layer *ode;

  ck_assert_int_eq(
      imp_ode_create(&field, 0.0, times, 1, &opt, "robertson", &ode), IMP_OK);
  imp_layer_params(ode)[0] = 0.04;
  imp_layer_params(ode)[1] = 1.0e4;
  imp_layer_params(ode)[2] = 3.0e7;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, xbar, ybar, &in, x, y), IMP_OK);
  *g = y[3];
  memcpy(dgdp, imp_layer_grads(ode), 3 * sizeof(double));
  memcpy(lambda0, xbar, 3 * sizeof(double));
  ck_assert_int_eq(imp_ode_get_stats(ode, stats), IMP_OK);
  imp_layer_free(ode);
}

START_TEST(robertson_matches_cvodes_example)
{
  double g, dgdp[3], lambda0[3];
  imp_ode_stats stats;
  char text[32];

  check_printed_against_file();

  /* With q as a quadrature the layer makes the example's computation:
   * G, dG/dp and lambda(t0) agree to every printed digit, and the
   * forward takes the example's 766 steps with 37 error test failures. */
  robertson(1, &g, dgdp, lambda0, &stats);
  snprintf(text, sizeof text, "%.4e", g);
  ck_assert_str_eq(text, rob_printed_g);
  for (int j = 0; j < 3; j++) {
    snprintf(text, sizeof text, "%.4e", dgdp[j]);
    ck_assert_str_eq(text, rob_printed_dgdp[j]);
    snprintf(text, sizeof text, "%.4e", lambda0[j]);
    ck_assert_str_eq(text, rob_printed_lambda0);
  }
  ck_assert_int_eq(stats.forward.steps, 766);
  ck_assert_int_eq(stats.forward.error_test_fails, 37);
  ck_assert_int_eq(stats.checkpoints, 5);
  ck_assert_int_gt(stats.backward.jacobian_evals, 0);

  /* With q as a fourth ODE component (the state augmented, in Newton's
   * system and the error test) the steps differ; dG/dp agrees with the
   * printed values to 5e-4 relative. */
  robertson(0, &g, dgdp, lambda0, &stats);
  for (int j = 0; j < 3; j++) {
    double want = strtod(rob_printed_dgdp[j], NULL);

    ck_assert_msg(fabs(dgdp[j] - want) <= 5e-4 * fabs(want),
                  "augmented dG/dp%d = %.6e, printed %.4e", j + 1, dgdp[j],
                  want);
  }
  ck_assert_msg(fabs(g - 3.9983e7) <= 1e-4 * 3.9983e7, "G = %.6e", g);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A small neural vector field: g(t, h) = W2 tanh(W1 h + b1 + t u) + b2,
 * d = 2, H hidden units; theta = [W1 (H x d), b1, u, W2 (d x H), b2]. */

#define MLP_D 2
#define MLP_H 5
#define MLP_NTHETA (MLP_H * MLP_D + 2 * MLP_H + MLP_D * MLP_H + MLP_D)

typedef struct mlp {
  double a[MLP_H];    /* tanh activations */
  double abar[MLP_H]; /* their cotangents */
} mlp;

static void mlp_hidden(mlp *m, double t, const double *h, const double *p)
{
  const double *w1 = p, *b1 = p + MLP_H * MLP_D, *u = b1 + MLP_H;

  for (int i = 0; i < MLP_H; i++) {
    double z = b1[i] + t * u[i];

    for (int j = 0; j < MLP_D; j++)
      z += w1[i * MLP_D + j] * h[j];
    m->a[i] = tanh(z);
  }
}

static int mlp_rhs(void *ctx, const double *t, const double *h, const double *p,
                   double *out)
{
  mlp *m = ctx;
  const double *w2 = p + MLP_H * MLP_D + 2 * MLP_H, *b2 = w2 + MLP_D * MLP_H;

  mlp_hidden(m, *t, h, p);
  for (int k = 0; k < MLP_D; k++) {
    out[k] = b2[k];
    for (int i = 0; i < MLP_H; i++)
      out[k] += w2[k * MLP_H + i] * m->a[i];
  }
  return 0;
}

static int mlp_vjp(void *ctx, const double *t, const double *h, const double *p,
                   const double *v, double *vjp_h, double *vjp_t,
                   double *vjp_theta)
{
  mlp *m = ctx;
  const double *w1 = p, *w2 = p + MLP_H * MLP_D + 2 * MLP_H;

  (void)vjp_t;
  mlp_hidden(m, *t, h, p);
  for (int i = 0; i < MLP_H; i++) {
    double s = 0.0;

    for (int k = 0; k < MLP_D; k++)
      s += w2[k * MLP_H + i] * v[k];
    m->abar[i] = s * (1.0 - m->a[i] * m->a[i]);
  }

  if (vjp_h != NULL)
    for (int j = 0; j < MLP_D; j++) {
      vjp_h[j] = 0.0;
      for (int i = 0; i < MLP_H; i++)
        vjp_h[j] += w1[i * MLP_D + j] * m->abar[i];
    }
  if (vjp_theta != NULL) {
    double *gw1 = vjp_theta, *gb1 = gw1 + MLP_H * MLP_D, *gu = gb1 + MLP_H;
    double *gw2 = gu + MLP_H, *gb2 = gw2 + MLP_D * MLP_H;

    for (int i = 0; i < MLP_H; i++) {
      for (int j = 0; j < MLP_D; j++)
        gw1[i * MLP_D + j] += m->abar[i] * h[j];
      gb1[i] += m->abar[i];
      gu[i] += m->abar[i] * *t;
    }
    for (int k = 0; k < MLP_D; k++) {
      for (int i = 0; i < MLP_H; i++)
        gw2[k * MLP_H + i] += v[k] * m->a[i];
      gb2[k] += v[k];
    }
  }
  return 0;
}

static int mlp_jvp(void *ctx, const double *t, const double *h, const double *p,
                   const double *u_in, double *out)
{
  mlp *m = ctx;
  const double *w1 = p, *w2 = p + MLP_H * MLP_D + 2 * MLP_H;
  double dz[MLP_H];

  mlp_hidden(m, *t, h, p);
  for (int i = 0; i < MLP_H; i++) {
    dz[i] = 0.0;
    for (int j = 0; j < MLP_D; j++)
      dz[i] += w1[i * MLP_D + j] * u_in[j];
    dz[i] *= 1.0 - m->a[i] * m->a[i];
  }
  for (int k = 0; k < MLP_D; k++) {
    out[k] = 0.0;
    for (int i = 0; i < MLP_H; i++)
      out[k] += w2[k * MLP_H + i] * dz[i];
  }
  return 0;
}

static int mlp_jacobian(void *ctx, const double *t, const double *h,
                        const double *p, double *jac)
{
  double unit[MLP_D] = {0}, col[MLP_D];

  for (int j = 0; j < MLP_D; j++) {
    unit[j] = 1.0;
    mlp_jvp(ctx, t, h, p, unit, col);
    unit[j] = 0.0;
    for (int k = 0; k < MLP_D; k++)
      jac[k * MLP_D + j] = col[k];
  }
  return 0;
}

/*
 * The same field with a running cost as a quadrature component: d = 3,
 * h = (y, q) with q' = |g(t, y)|^2 (the kinetic regularizer of Finlay et
 * al., 2020), so v^T dg~/dh is the MLP's vjp with v_y + 2 v_q g.
 */
static int kinetic_rhs(void *ctx, const double *t, const double *h,
                       const double *p, double *out)
{
  mlp_rhs(ctx, t, h, p, out);
  out[MLP_D] = 0.0;
  for (int k = 0; k < MLP_D; k++)
    out[MLP_D] += out[k] * out[k];
  return 0;
}

static int kinetic_vjp(void *ctx, const double *t, const double *h,
                       const double *p, const double *v, double *vjp_h,
                       double *vjp_t, double *vjp_theta)
{
  double g[MLP_D], veff[MLP_D];

  mlp_rhs(ctx, t, h, p, g);
  for (int k = 0; k < MLP_D; k++)
    veff[k] = v[k] + 2.0 * v[MLP_D] * g[k];
  mlp_vjp(ctx, t, h, p, veff, vjp_h, vjp_t, vjp_theta);
  if (vjp_h != NULL)
    vjp_h[MLP_D] = 0.0;
  return 0;
}

#define MLP_N 2
#define MLP_K 3
#define MAX_D 3

/* The objective L = sum w . y as a function of theta or of x. */
typedef struct mlp_objective {
  imp_layer *layer;
  size_t d;
  double x[MLP_N * MAX_D];
  double y[MLP_N * MLP_K * MAX_D];
  int of_x; /* 1: params are x; 0: params are theta */
} mlp_objective;

static int mlp_loss(void *ctx, const double *params, double *value)
{
  mlp_objective *o = ctx;
  imp_shape in = {MLP_N, o->d, 1, 1};
  const double *x = o->of_x ? params : o->x;
  int rc = imp_layer_forward(o->layer, &in, x, o->y);

  if (rc != IMP_OK)
    return rc;
  *value = 0.0;
  for (size_t i = 0; i < MLP_N * MLP_K * o->d; i++)
    *value += loss_weight(i) * o->y[i];
  return 0;
}

/* Check both gradients of L = sum w . y for a field of the MLP family:
 * relative errors below tol, compared absolutely below floor. */
static void gradcheck_field(const imp_ode_field *field,
                            const imp_ode_options *opt, double tol,
                            double floor)
{
  static const double times[MLP_K] = {0.4, 0.9, 1.6};
  size_t d = field->d, ny = MLP_N * MLP_K * d;
  imp_shape in = {MLP_N, d, 1, 1};
  imp_gradcheck_options gc = {.h = 1e-3, .floor = floor, .order = 4};
  imp_gradcheck_result res;
  double ybar[MLP_N * MLP_K * MAX_D], xbar[MLP_N * MAX_D] = {0};
  mlp_objective o = {.d = d};
  imp_rng rng;

  ck_assert_int_eq(
      imp_ode_create(field, 0.0, times, MLP_K, opt, "mlp", &o.layer), IMP_OK);
  imp_rng_seed(&rng, 11);
  imp_rng_fill_normal(&rng, imp_layer_params(o.layer), MLP_NTHETA, 0.0, 0.8);
  imp_rng_fill_uniform(&rng, o.x, MLP_N * d, -1.5, 1.5);
  for (size_t i = 0; i < ny; i++)
    ybar[i] = loss_weight(i);

  /* The analytic gradients from one forward and one backward. */
  ck_assert_int_eq(imp_layer_forward(o.layer, &in, o.x, o.y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(o.layer, xbar, ybar, &in, o.x, o.y),
                   IMP_OK);

  /* theta: fourth-order differences with h = 1e-3 against the adjoint. */
  o.of_x = 0;
  ck_assert_int_eq(imp_gradcheck(mlp_loss, &o, imp_layer_params(o.layer),
                                 MLP_NTHETA, imp_layer_grads(o.layer), &gc,
                                 &res),
                   IMP_OK);
  ck_assert_msg(res.max_rel_err < tol, "theta: max rel err %g at %zu",
                res.max_rel_err, res.worst);

  /* x: the same tolerance. */
  o.of_x = 1;
  ck_assert_int_eq(imp_gradcheck(mlp_loss, &o, o.x, MLP_N * d, xbar, &gc, &res),
                   IMP_OK);
  ck_assert_msg(res.max_rel_err < tol, "x: max rel err %g at %zu",
                res.max_rel_err, res.worst);
  imp_layer_free(o.layer);
}

static void gradcheck_mlp(const imp_ode_options *opt, int with_jvp,
                          int with_jac)
{
  mlp ctx;
  imp_ode_field field = {.d = MLP_D,
                         .ntheta = MLP_NTHETA,
                         .rhs = mlp_rhs,
                         .vjp = mlp_vjp,
                         .ctx = &ctx};

  if (with_jvp)
    field.jvp = mlp_jvp;
  if (with_jac)
    field.jacobian = mlp_jacobian;

  /* The solver at rtol 1e-12: the adjoint is then right to about 1e-9,
   * and the differences' noise from step changes stays below 1e-7 (at
   * rtol 1e-11 BDF's put 4e-6 into them).  Tolerance 1e-6. */
  gradcheck_field(&field, opt, 1e-6, 1e-8);
}

START_TEST(mlp_gradcheck_adams)
{
  imp_ode_options opt = {.rtol = 1e-12, .atol = 1e-14};

  gradcheck_mlp(&opt, 0, 0);
  opt.batch = IMP_ODE_BATCH_SAMPLES;
  gradcheck_mlp(&opt, 0, 0);
}
END_TEST

START_TEST(mlp_gradcheck_bdf)
{
  imp_ode_options opt = {.method = IMP_ODE_BDF, .rtol = 1e-12, .atol = 1e-14};

  gradcheck_mlp(&opt, 0, 1);
  opt.batch = IMP_ODE_BATCH_SAMPLES;
  gradcheck_mlp(&opt, 0, 1);
  opt.linsol = IMP_ODE_LINSOL_SPGMR;
  gradcheck_mlp(&opt, 1, 0);
}
END_TEST

/* A running cost as a quadrature component, through Adams and through
 * BDF with matrix-free Newton (its adjoint's Krylov products skip the
 * quadrature's own adjoint), per sample and as one system. */
START_TEST(quadrature_gradcheck)
{
  mlp ctx;
  imp_ode_field field = {.d = MLP_D + 1,
                         .ntheta = MLP_NTHETA,
                         .rhs = kinetic_rhs,
                         .vjp = kinetic_vjp,
                         .ctx = &ctx};
  imp_ode_options opt = {.rtol = 1e-12, .atol = 1e-14, .quadratures = 1};

  /* The loss now holds q, an integral, so the differences' noise is
   * about 1e-8 absolute (measured: the adjoint agrees across solvers to
   * 1e-11 while the differences scatter by 1e-8); entries below 1e-3 are
   * compared absolutely.  Tolerance 5e-5. */
  gradcheck_field(&field, &opt, 5e-5, 1e-3);
  opt.method = IMP_ODE_BDF;
  opt.linsol = IMP_ODE_LINSOL_SPGMR;
  gradcheck_field(&field, &opt, 5e-5, 1e-3);
  opt.batch = IMP_ODE_BATCH_SAMPLES;
  gradcheck_field(&field, &opt, 5e-5, 1e-3);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Failures: statuses, CVODES' flag names, nothing printed, no leaks. */

/* Run fn with stderr sent to a temporary file; return what it wrote. */
static long stderr_bytes_during(void (*fn)(void))
{
  FILE *tmp = tmpfile();
  int saved = dup(STDERR_FILENO);
  long bytes;

  ck_assert_ptr_nonnull(tmp);
  fflush(stderr);
  dup2(fileno(tmp), STDERR_FILENO);
  fn();
  fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  fseek(tmp, 0, SEEK_END);
  bytes = ftell(tmp);
  fclose(tmp);
  return bytes;
}

static imp_layer *rotation_layer(rotation *ctx, const imp_ode_options *opt)
{
  static const double times[2] = {1.0, 2.0};
  imp_ode_field field = {.d = 2,
                         .ntheta = 2,
                         .rhs = rot_rhs,
                         .vjp = rot_vjp,
                         .jacobian = rot_jacobian,
                         .ctx = ctx};
  imp_layer *ode;

  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, opt, NULL, &ode),
                   IMP_OK);
  memcpy(imp_layer_params(ode), rot_theta, sizeof rot_theta);
  return ode;
}

static void failures(void)
{
  rotation ctx = {0};
  imp_ode_options opt = {0};
  imp_shape in = {1, 2, 1, 1}, bad_shape = {1, 3, 1, 1};
  double x[3] = {1.0, 0.5, 0.0}, y[4], ybar[4] = {1.0, 1.0, 1.0, 1.0};
  double nan_x[2] = {NAN, 1.0};
  imp_layer *ode = rotation_layer(&ctx, &opt);

  /* A NaN initial state. */
  ck_assert_int_eq(imp_layer_forward(ode, &in, nan_x, y), IMP_ENONFINITE);

  /* An input of the wrong size. */
  ck_assert_int_eq(imp_layer_forward(ode, &bad_shape, x, y), IMP_ESHAPE);

  /* The rhs fails after t = 0.3: CVODES stops, the callback is named. */
  ctx.fail_rhs_after_t = 1;
  ctx.fail_t = 0.3;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_ECALLBACK);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "rhs callback returned 7"));
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "CV_"));
  ctx.fail_rhs_after_t = 0;

  /* The rhs gives NaN after t = 0.3, so no step can pass it. */
  ctx.nan_rhs_after_t = 1;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_ENONFINITE);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "NaN"));
  ctx.nan_rhs_after_t = 0;

  /* A good forward works again, then the vjp fails in backward; nothing
   * is added to the gradients. */
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ctx.fail_vjp = 1;
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y),
                   IMP_ECALLBACK);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "vjp callback returned 5"));
  ck_assert(imp_layer_grads(ode)[0] == 0.0 && imp_layer_grads(ode)[1] == 0.0);
  ctx.fail_vjp = 0;

  /* A NaN cotangent. */
  ybar[2] = NAN;
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y),
                   IMP_ENONFINITE);
  imp_layer_free(ode);

  /* A step budget too small: IMP_ENOCONV naming CV_TOO_MUCH_WORK and
   * quoting CVODES' own message, forward and then backward (the forward
   * budget is ample there). */
  opt.max_steps = 3;
  ode = rotation_layer(&ctx, &opt);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_ENOCONV);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "CV_TOO_MUCH_WORK"));
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "mxstep steps taken"));
  imp_layer_free(ode);
  opt.max_steps = 0;
  opt.adjoint_max_steps = 2;
  opt.rtol = 1e-10;
  ode = rotation_layer(&ctx, &opt);
  ybar[2] = 1.0;
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y), IMP_ENOCONV);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "CV_TOO_MUCH_WORK"));
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "CVodeB"));
  imp_layer_free(ode);
}

START_TEST(failures_are_statuses_and_silent)
{
  /* SUNDIALS would print its messages on stderr; the layer keeps them. */
  ck_assert_int_eq(stderr_bytes_during(failures), 0);
}
END_TEST

START_TEST(bad_arguments)
{
  imp_ode_field field = {.d = 2, .ntheta = 2, .rhs = rot_rhs, .vjp = rot_vjp};
  imp_ode_field no_vjp = field;
  double times[2] = {1.0, 2.0}, backwards[2] = {2.0, 1.0}, x[2] = {1, 0};
  double y[4], ybar[4] = {1, 1, 1, 1}, bad_atol[2] = {1e-8, -1.0};
  imp_ode_options opt = {.rtol = -1.0};
  imp_shape in = {1, 2, 1, 1};
  imp_ode_stats stats;
  imp_layer *ode = (imp_layer *)&field, *dense;
  imp_rng rng;

  /* Each refusal leaves *out NULL. */
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_EINVAL);
  ck_assert_ptr_null(ode);
  opt.rtol = 0.0;
  opt.max_order = 6;
  opt.method = IMP_ODE_BDF;
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_EINVAL);
  opt = (imp_ode_options){.atol_vec = bad_atol};
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_EINVAL);
  opt = (imp_ode_options){.interp = IMP_ODE_POLYNOMIAL, .checkpoint_steps = 7};
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_EINVAL);
  opt = (imp_ode_options){.quadratures = 2};
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_ode_create(&field, 0.0, backwards, 2, NULL, NULL, &ode),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_ode_create(&field, 3.0, times, 2, NULL, NULL, &ode),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 0, NULL, NULL, &ode),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_ode_create(NULL, 0.0, times, 2, NULL, NULL, &ode),
                   IMP_EINVAL);

  /* Without a vjp the layer runs forward but refuses gradients. */
  no_vjp.vjp = NULL;
  ck_assert_int_eq(imp_ode_create(&no_vjp, 0.0, times, 2, NULL, NULL, &ode),
                   IMP_OK);
  memcpy(imp_layer_params(ode), rot_theta, sizeof rot_theta);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y), IMP_EINVAL);

  /* set_times changes the output shape and validates its times. */
  ck_assert_int_eq(imp_ode_set_times(ode, 0.0, backwards, 2), IMP_EINVAL);
  ck_assert_int_eq(imp_ode_set_times(ode, 0.0, times + 1, 1), IMP_OK);
  ck_assert_uint_eq(imp_ode_ntimes(ode), 1);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  check_close(y[0], exp(-0.8) * (cos(3.4) * 1.0), 1e-5, "after set_times");

  /* Statistics only for ODE layers. */
  imp_rng_seed(&rng, 1);
  ck_assert_int_eq(imp_dense_create(2, 2, &rng, NULL, &dense), IMP_OK);
  ck_assert_int_eq(imp_ode_get_stats(dense, &stats), IMP_EINVAL);
  ck_assert_uint_eq(imp_ode_ntimes(dense), 0);
  ck_assert_int_eq(imp_ode_get_stats(ode, &stats), IMP_OK);
  imp_layer_free(dense);
  imp_layer_free(ode);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A field that fails from some time on, counting what the layer asks of
 * it: dh/dt = -theta h, whose rhs (forward) or vjp (backward) fails for
 * t > fail_t or t < fail_t respectively, by returning a code or NaN. */

typedef enum flaky_mode {
  FLAKY_NONE,
  FLAKY_RHS_CODE, /* the rhs returns 7 for t > fail_t */
  FLAKY_RHS_NAN,  /* the rhs gives NaN for t > fail_t */
  FLAKY_VJP_CODE, /* the vjp returns 5 for t < fail_t */
  FLAKY_VJP_NAN   /* the vjp gives NaN for t < fail_t */
} flaky_mode;

typedef struct flaky {
  flaky_mode mode;
  double fail_t;
  long calls;         /* rhs and vjp calls */
  long failures;      /* failed results returned */
  long calls_at_last; /* calls when the latest failure was returned */
} flaky;

static int flaky_failed(flaky *f)
{
  f->failures++;
  f->calls_at_last = f->calls;
  return f->mode == FLAKY_RHS_CODE ? 7 : f->mode == FLAKY_VJP_CODE ? 5 : 0;
}

static int flaky_rhs(void *ctx, const double *t, const double *h,
                     const double *theta, double *out)
{
  flaky *f = ctx;

  f->calls++;
  out[0] = -theta[0] * h[0];
  if ((f->mode == FLAKY_RHS_CODE || f->mode == FLAKY_RHS_NAN) &&
      *t > f->fail_t) {
    out[0] = NAN;
    return flaky_failed(f);
  }
  return 0;
}

static int flaky_vjp(void *ctx, const double *t, const double *h,
                     const double *theta, const double *v, double *vjp_h,
                     double *vjp_t, double *vjp_theta)
{
  flaky *f = ctx;
  int bad =
      (f->mode == FLAKY_VJP_CODE || f->mode == FLAKY_VJP_NAN) && *t < f->fail_t;

  (void)vjp_t;
  f->calls++;
  if (vjp_h != NULL)
    vjp_h[0] = bad ? NAN : -theta[0] * v[0];
  if (vjp_theta != NULL)
    vjp_theta[0] += bad ? NAN : -h[0] * v[0];
  return bad ? flaky_failed(f) : 0;
}

static imp_layer *flaky_layer(flaky *f, imp_ode_method method)
{
  static const double times[2] = {0.6, 1.0};
  imp_ode_field field = {
      .d = 1, .ntheta = 1, .rhs = flaky_rhs, .vjp = flaky_vjp, .ctx = f};
  imp_ode_options opt = {.method = method};
  imp_layer *ode;

  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 2, &opt, NULL, &ode),
                   IMP_OK);
  imp_layer_params(ode)[0] = 0.8;
  return ode;
}

/* Run one pass of a flaky field; return its status. */
static int flaky_pass(flaky_mode mode, imp_ode_method method,
                      imp_ode_stats *stats, flaky *f)
{
  imp_shape in = {1, 1, 1, 1};
  double x[1] = {1.0}, y[2], ybar[2] = {1.0, 1.0}, xbar[1] = {0.0};
  imp_layer *ode;
  int rc;

  memset(f, 0, sizeof *f);
  f->fail_t = 0.3;
  ode = flaky_layer(f, method);
  if (mode == FLAKY_VJP_CODE || mode == FLAKY_VJP_NAN)
    ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  f->mode = mode;
  f->calls = f->failures = f->calls_at_last = 0;
  if (mode == FLAKY_VJP_CODE || mode == FLAKY_VJP_NAN)
    rc = imp_layer_backward(ode, xbar, ybar, &in, x, y);
  else
    rc = imp_layer_forward(ode, &in, x, y);
  ck_assert_int_eq(imp_ode_get_stats(ode, stats), IMP_OK);
  imp_layer_free(ode);
  return rc;
}

/*
 * After a callback fails, the layer calls the field no more in that
 * CVODES call.  CVODES 6.4.1 treats a failed rhs under fixed-point
 * iteration (Adams' default) as recoverable and used to call it about
 * 0.83 max_steps times more (4157 at the default 5000): each failure mode
 * is run under Adams and BDF, forward and backward.  A failing code is
 * returned once; NaN results, which CVODES may step around, exactly the
 * 10 the header allows; no call follows the last.
 */
START_TEST(no_calls_after_a_failure)
{
  static const flaky_mode modes[4] = {FLAKY_RHS_CODE, FLAKY_RHS_NAN,
                                      FLAKY_VJP_CODE, FLAKY_VJP_NAN};

  for (int m = 0; m < 2; m++)
    for (int i = 0; i < 4; i++) {
      imp_ode_method method = m == 0 ? IMP_ODE_ADAMS : IMP_ODE_BDF;
      int nan = modes[i] == FLAKY_RHS_NAN || modes[i] == FLAKY_VJP_NAN;
      imp_ode_stats stats;
      flaky f;
      int rc = flaky_pass(modes[i], method, &stats, &f);

      ck_assert_msg(rc == (nan ? IMP_ENONFINITE : IMP_ECALLBACK),
                    "method %d mode %d: status %d: %s", m, i, rc,
                    imp_last_error());
      ck_assert_msg(f.failures == (nan ? 10 : 1),
                    "method %d mode %d: %ld failed results", m, i, f.failures);
      ck_assert_msg(f.calls == f.calls_at_last,
                    "method %d mode %d: %ld calls after the last failure", m, i,
                    f.calls - f.calls_at_last);
    }
}
END_TEST

/* dh/dt = -10 h, NaN once rounding makes h negative: with Adams CVODES
 * stepped past 24 NaN results and reported success. */
static int nan_below_zero_rhs(void *ctx, const double *t, const double *h,
                              const double *theta, double *out)
{
  long *nans = ctx;

  (void)t;
  (void)theta;
  out[0] = -10.0 * h[0];
  if (h[0] < 0.0) {
    out[0] = NAN;
    (*nans)++;
  }
  return 0;
}

START_TEST(nan_cap_decides_the_status)
{
  long nans = 0;
  imp_ode_field field = {.d = 1, .rhs = nan_below_zero_rhs, .ctx = &nans};
  imp_ode_options opt = {.rtol = 1e-8, .atol = 1e-10};
  double times[1] = {3.0}, x[1] = {1.0}, y[1];
  imp_shape in = {1, 1, 1, 1};
  imp_layer *ode;

  ck_assert_int_eq(imp_ode_create(&field, 0.0, times, 1, &opt, NULL, &ode),
                   IMP_OK);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(nans, 10);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "10 times"));
  imp_layer_free(ode);
}
END_TEST

/*
 * The statistics of a failed pass count its work: CVODES' steps as well
 * as the callbacks' evaluations (a failed Adams pass on Robertson's
 * kinetics used to report 0 steps and 11620 rhs evaluations).
 */
START_TEST(stats_of_failed_passes)
{
  rotation ctx = {0};
  imp_ode_options opt = {.max_steps = 3};
  imp_shape in = {1, 2, 1, 1};
  double x[2] = {1.0, 0.5}, y[4], ybar[4] = {1.0, 1.0, 1.0, 1.0};
  imp_ode_stats stats;
  imp_layer *ode = rotation_layer(&ctx, &opt);
  flaky f;

  /* Out of steps forward: the 3 steps taken before the first output. */
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_ENOCONV);
  ck_assert_int_eq(imp_ode_get_stats(ode, &stats), IMP_OK);
  ck_assert_int_eq(stats.forward.steps, 3);
  ck_assert_int_ge(stats.forward.rhs_evals, stats.forward.steps);
  ck_assert_int_gt(stats.forward.nonlin_iters, 0);
  imp_layer_free(ode);

  /* Out of steps backward: the 2 adjoint steps of the first segment. */
  opt = (imp_ode_options){.adjoint_max_steps = 2, .rtol = 1e-10};
  ode = rotation_layer(&ctx, &opt);
  ck_assert_int_eq(imp_layer_forward(ode, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(ode, NULL, ybar, &in, x, y), IMP_ENOCONV);
  ck_assert_int_eq(imp_ode_get_stats(ode, &stats), IMP_OK);
  ck_assert_int_eq(stats.backward.steps, 2);
  ck_assert_int_ge(stats.backward.vjp_evals, stats.backward.steps);
  imp_layer_free(ode);

  /* A callback failure: the steps that reached t = 0.3 are counted,
   * forward and backward. */
  for (int m = 0; m < 2; m++) {
    imp_ode_method method = m == 0 ? IMP_ODE_ADAMS : IMP_ODE_BDF;

    ck_assert_int_eq(flaky_pass(FLAKY_RHS_CODE, method, &stats, &f),
                     IMP_ECALLBACK);
    ck_assert_int_gt(stats.forward.steps, 3);
    ck_assert_int_ge(stats.forward.rhs_evals, stats.forward.steps);
    ck_assert_int_eq(stats.forward.rhs_evals, f.calls);
    ck_assert_int_eq(flaky_pass(FLAKY_VJP_CODE, method, &stats, &f),
                     IMP_ECALLBACK);
    ck_assert_int_gt(stats.backward.steps, 3);
    ck_assert_int_ge(stats.backward.vjp_evals, stats.backward.steps);
  }
}
END_TEST

/* The decay field dh/dt = -theta h through one pass each way, with the
 * gradients of L = h(T) to rtol; returns the first failing status. */
static int decay_both_passes(double t0, const double *times, size_t ntimes,
                             double rtol)
{
  imp_ode_field field = {
      .d = 1, .ntheta = 1, .rhs = decay_rhs, .vjp = decay_vjp};
  imp_shape in = {1, 1, 1, 1};
  double x[1] = {3.0}, y[2], ybar[2] = {0.0, 0.0}, xbar[1] = {0.0};
  double s = times[ntimes - 1] - t0, theta = 0.5;
  imp_layer *ode;
  int rc = imp_ode_create(&field, t0, times, ntimes, NULL, NULL, &ode);

  if (rc != IMP_OK)
    return rc;
  imp_layer_params(ode)[0] = theta;
  ybar[ntimes - 1] = 1.0;
  rc = imp_layer_forward(ode, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_layer_backward(ode, xbar, ybar, &in, x, y);
  if (rc == IMP_OK) {
    check_close(y[ntimes - 1], 3.0 * exp(-theta * s), rtol, "h(T)");
    check_close(xbar[0], exp(-theta * s), rtol, "xbar");
    ck_assert_msg(fabs(imp_layer_grads(ode)[0] + 3.0 * s * exp(-theta * s)) <=
                      rtol * 3.0 * s,
                  "thetabar %g, want %g", imp_layer_grads(ode)[0],
                  -3.0 * s * exp(-theta * s));
  }
  imp_layer_free(ode);
  return rc;
}

/*
 * Spans that CVODES cannot integrate are refused when the times are set,
 * with IMP_EINVAL, instead of failing in a pass: from t0 = 0 a horizon of
 * 1e-160 failed forward with CV_BAD_T and one of 1e-170 passed forward
 * and failed backward with CV_BAD_TB0 (both IMP_EBACKEND); output times
 * 1 ulp apart passed forward and failed backward with CV_TOO_CLOSE.  The
 * smallest spans accepted integrate both ways, to 1e-6.
 */
START_TEST(spans_too_short_are_refused)
{
  const double eps = DBL_EPSILON;
  double tiny[1] = {1e-160}, tinier[1] = {1e-170}, near_t0[2] = {1.0, 2.0};
  double close_pair[2] = {1.0, 1.0 + eps}, ok_small[1] = {1e-140};
  double ok_pair[2] = {1.0, 1.0 + 8.0 * eps}, ok_near[2] = {1.0, 2.0};
  imp_ode_field field = {
      .d = 1, .ntheta = 1, .rhs = decay_rhs, .vjp = decay_vjp};
  imp_layer *ode;

  near_t0[0] = 1.0 + 2.0 * eps;
  ok_near[0] = 1.0 + 8.0 * eps;
  ck_assert_int_eq(decay_both_passes(0.0, tiny, 1, 1e-6), IMP_EINVAL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "rescale the time"));
  ck_assert_int_eq(decay_both_passes(0.0, tinier, 1, 1e-6), IMP_EINVAL);
  ck_assert_int_eq(decay_both_passes(1.0, near_t0, 2, 1e-6), IMP_EINVAL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "ulps of t0"));
  ck_assert_int_eq(decay_both_passes(0.0, close_pair, 2, 1e-6), IMP_EINVAL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "ulps of the previous"));

  /* set_times applies the same rule. */
  ck_assert_int_eq(imp_ode_create(&field, 0.0, ok_small, 1, NULL, NULL, &ode),
                   IMP_OK);
  ck_assert_int_eq(imp_ode_set_times(ode, 0.0, tiny, 1), IMP_EINVAL);
  ck_assert_int_eq(imp_ode_set_times(ode, 0.0, close_pair, 2), IMP_EINVAL);
  imp_layer_free(ode);

  ck_assert_int_eq(decay_both_passes(0.0, ok_small, 1, 1e-6), IMP_OK);
  ck_assert_int_eq(decay_both_passes(0.0, ok_pair, 2, 1e-6), IMP_OK);
  ck_assert_int_eq(decay_both_passes(1.0, ok_near, 2, 1e-6), IMP_OK);
}
END_TEST

static Suite *ode_suite(void)
{
  Suite *s = suite_create("ode");
  TCase *tc = tcase_create("ode");

  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, rotation_every_configuration);
  tcase_add_test(tc, decay_header_example);
  tcase_add_test(tc, field_from_problem);
  tcase_add_test(tc, robertson_matches_cvodes_example);
  tcase_add_test(tc, mlp_gradcheck_adams);
  tcase_add_test(tc, mlp_gradcheck_bdf);
  tcase_add_test(tc, quadrature_gradcheck);
  tcase_add_test(tc, failures_are_statuses_and_silent);
  tcase_add_test(tc, bad_arguments);
  tcase_add_test(tc, no_calls_after_a_failure);
  tcase_add_test(tc, nan_cap_decides_the_status);
  tcase_add_test(tc, stats_of_failed_passes);
  tcase_add_test(tc, spans_too_short_are_refused);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(ode_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

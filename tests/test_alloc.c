/*
 * test_alloc.c - allocation-failure injection: for every n, fail the n-th
 * allocation (and all later ones) of a scenario that creates a layer, runs
 * forward and backward and frees it.  Each run must end in IMP_OK (n was
 * past the last allocation) or IMP_ENOMEM, and free all it allocated.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "failalloc.h"
#include "imp.h"

typedef int (*scenario_fn)(void);

/* Run scenario with the n-th allocation failing, for n = 0, 1, ... until
 * it no longer reaches an allocation that fails. */
static void exhaust(const char *name, scenario_fn scenario)
{
  long n, made = 0, live = 0;
  int rc;

  /* Warm up: one-time initialization (OpenBLAS buffers) is not ours. */
  rc = scenario();
  ck_assert_msg(rc == IMP_OK, "%s: %s", name, imp_last_error());
  for (n = 0; n < 100000; n++) {
    failalloc_arm(n);
    rc = scenario();
    failalloc_disarm(&made, &live);
    ck_assert_msg(live == 0, "%s: allocation %ld failed: %ld blocks leaked",
                  name, n, live);
    if (made <= n) {
      ck_assert_msg(rc == IMP_OK, "%s: status %s with no failure", name,
                    imp_status_name(rc));
      break;
    }
    ck_assert_msg(rc == IMP_ENOMEM,
                  "%s: allocation %ld of %ld failed, "
                  "status %s (%s)",
                  name, n, made, imp_status_name(rc), imp_last_error());
  }
  fprintf(stderr, "%s: %ld allocations, each failed once\n", name, n);
}

/* ------------------------------------------------------------------ */
/* Root: f(x, y) = (y0^2 + y1 - x0, y0 - y1^3 - theta), batch of 2. */

static int root_residual(void *ctx, const double *x, const double *y,
                         const double *theta, double *r)
{
  (void)ctx;
  r[0] = y[0] * y[0] + y[1] - x[0];
  r[1] = y[0] - y[1] * y[1] * y[1] - theta[0];
  return 0;
}

static int root_vjp(void *ctx, const double *x, const double *y,
                    const double *theta, const double *v, double *vy,
                    double *vx, double *vtheta)
{
  (void)ctx, (void)x, (void)theta;
  if (vy != NULL) {
    vy[0] = 2.0 * y[0] * v[0] + v[1];
    vy[1] = v[0] - 3.0 * y[1] * y[1] * v[1];
  }
  if (vx != NULL)
    vx[0] -= v[0];
  if (vtheta != NULL)
    vtheta[0] -= v[1];
  return 0;
}

static int root_scenario(imp_root_solver solver)
{
  imp_problem p = {.nx = 1,
                   .ny = 2,
                   .ntheta = 1,
                   .residual = root_residual,
                   .vjp = root_vjp};
  double guess[2] = {1.0, 0.5}, theta = 0.3, x[2] = {1.5, 2.0}, y[4];
  double ybar[4] = {1, -1, 0.5, 2}, xbar[2] = {0};
  imp_root_options opt = {.solver = solver, .initial = guess};
  imp_shape in = {2, 1, 1, 1};
  imp_layer *l = NULL;
  int rc;

  rc = imp_root_layer_create(&p, &theta, &opt, "root", &l);
  if (rc == IMP_OK)
    rc = imp_layer_forward(l, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_layer_backward(l, xbar, ybar, &in, x, y);
  imp_layer_free(l);
  return rc;
}

static int root_hybrids(void)
{
  return root_scenario(IMP_ROOT_HYBRIDS);
}
static int root_newton(void)
{
  return root_scenario(IMP_ROOT_NEWTON);
}

START_TEST(root_layer)
{
  failalloc_exempt("libgsl");
  exhaust("root (hybrids)", root_hybrids);
  exhaust("root (newton)", root_newton);
}
END_TEST

/* ------------------------------------------------------------------ */
/* DEQ: h(x, z) = tanh(0.5 z_rotated + x) in the callback form. */

static int deq_map(void *ctx, const imp_shape *xs, const double *x,
                   const imp_shape *zs, const double *z, const double *theta,
                   double *out)
{
  size_t c = zs->c;

  (void)ctx, (void)xs;
  for (size_t b = 0; b < zs->n; b++)
    for (size_t i = 0; i < c; i++)
      out[b * c + i] = tanh(theta[0] * z[b * c + (i + 1) % c] + x[b * c + i]);
  return 0;
}

static int deq_vjp(void *ctx, const imp_shape *xs, const double *x,
                   const imp_shape *zs, const double *z, const double *theta,
                   const double *v, double *vz, double *vx, double *vtheta)
{
  size_t c = zs->c;

  (void)ctx, (void)xs;
  for (size_t b = 0; b < zs->n; b++)
    for (size_t i = 0; i < c; i++) {
      size_t k = b * c + i, j = b * c + (i + 1) % c;
      double h = tanh(theta[0] * z[j] + x[k]), d = v[k] * (1.0 - h * h);

      if (vz != NULL)
        vz[j] = theta[0] * d; /* each z_j feeds exactly one output */
      if (vx != NULL)
        vx[k] += d;
      if (vtheta != NULL)
        vtheta[0] += d * z[j];
    }
  return 0;
}

static int deq_scenario(const imp_deq_options *opt)
{
  imp_deq_map map = {.ntheta = 1,
                     .x_channels = 4,
                     .z_channels = 4,
                     .map = deq_map,
                     .vjp = deq_vjp};
  double theta = 0.5, x[12], y[12], ybar[12], xbar[12] = {0}, rho;
  imp_shape in = {3, 4, 1, 1};
  imp_layer *l = NULL;
  int rc;

  for (int i = 0; i < 12; i++) {
    x[i] = sin(1.0 + i);
    ybar[i] = cos(2.0 * i);
  }
  rc = imp_deq_create(&map, &theta, opt, "deq", &l);
  if (rc == IMP_OK)
    rc = imp_layer_forward(l, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_layer_backward(l, xbar, ybar, &in, x, y);
  if (rc == IMP_OK && opt->backward != IMP_DEQ_UNROLLED)
    rc = imp_deq_spectral_radius(l, x, 5, &rho); /* at z*, if solved */
  imp_layer_free(l);
  return rc;
}

static int deq_anderson(void)
{
  return deq_scenario(&(imp_deq_options){.solver = imp_fp_anderson});
}

static int deq_broyden_gmres(void)
{
  return deq_scenario(&(imp_deq_options){
      .solver = imp_fp_broyden, .adjoint = {.method = IMP_ADJOINT_GMRES}});
}

static int deq_picard_dense(void)
{
  return deq_scenario(&(imp_deq_options){
      .solver = imp_fp_picard, .adjoint = {.method = IMP_ADJOINT_DENSE_LU}});
}

static int deq_phantom(void)
{
  return deq_scenario(&(imp_deq_options){.backward = IMP_DEQ_PHANTOM});
}

static int deq_unrolled(void)
{
  return deq_scenario(&(imp_deq_options){.backward = IMP_DEQ_UNROLLED});
}

START_TEST(deq_layer)
{
  exhaust("deq (anderson, fixed-point adjoint)", deq_anderson);
  exhaust("deq (broyden, gmres adjoint)", deq_broyden_gmres);
  exhaust("deq (picard, dense adjoint)", deq_picard_dense);
  exhaust("deq (phantom)", deq_phantom);
  exhaust("deq (unrolled)", deq_unrolled);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A convolutional stack: conv -> DEQ(conv with a Lipschitz bound, relu),
 * then a checkpoint saved and loaded with Adam's state. */

static char checkpoint_path[64];

static int conv_scenario(void)
{
  imp_shape in = {2, 3, 5, 6};
  double x[2 * 3 * 5 * 6], y[2 * 4 * 5 * 6], ybar[2 * 4 * 5 * 6];
  imp_layer *inject = NULL, *zconv = NULL, *act = NULL, *deq = NULL;
  imp_stack *stack = NULL;
  imp_optim *adam = NULL;
  imp_rng rng;
  int rc;

  imp_rng_seed(&rng, 7);
  imp_rng_fill_normal(&rng, x, sizeof x / sizeof x[0], 0.0, 1.0);
  imp_rng_fill_normal(&rng, ybar, sizeof ybar / sizeof ybar[0], 0.0, 1.0);

  rc = imp_stack_create("maze-like", &stack);
  if (rc == IMP_OK)
    rc = imp_conv3x3_create(3, 4, &rng, "inject", &inject);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, inject);
    if (rc != IMP_OK)
      imp_layer_free(inject);
  }
  if (rc == IMP_OK)
    rc = imp_conv3x3_create(4, 4, &rng, "zconv", &zconv);
  if (rc == IMP_OK)
    rc = imp_conv3x3_set_lipschitz(zconv, 0.8, 5, 6, 20);
  if (rc == IMP_OK)
    rc = imp_activation_create(IMP_ACT_RELU, NULL, &act);
  if (rc == IMP_OK)
    rc = imp_deq_create_from_layers(4, zconv, act, NULL, "deq", &deq);
  if (rc == IMP_OK) {
    zconv = act = NULL; /* the DEQ owns them now */
    rc = imp_stack_add(stack, deq);
    if (rc != IMP_OK)
      imp_layer_free(deq);
  }
  imp_layer_free(zconv);
  imp_layer_free(act);

  if (rc == IMP_OK)
    rc = imp_stack_forward(stack, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_stack_backward(stack, NULL, ybar);
  if (rc == IMP_OK)
    rc =
        imp_optim_create(imp_optim_adam, imp_stack_nparams(stack), NULL, &adam);
  if (rc == IMP_OK)
    rc = imp_optim_step(adam, imp_stack_params(stack), imp_stack_grads(stack),
                        imp_stack_nparams(stack));
  if (rc == IMP_OK)
    rc = imp_checkpoint_save(checkpoint_path, stack, adam, NULL);
  if (rc == IMP_OK)
    rc = imp_checkpoint_load(checkpoint_path, stack, adam, NULL);
  imp_optim_free(adam);
  imp_stack_free(stack);
  return rc;
}

START_TEST(conv_stack_and_checkpoint)
{
  snprintf(checkpoint_path, sizeof checkpoint_path, "/tmp/imp-alloc-%ld.ckpt",
           (long)getpid());
  exhaust("conv stack + checkpoint", conv_scenario);
  unlink(checkpoint_path);
}
END_TEST

/* ------------------------------------------------------------------ */
/* QP: the projection of a point onto {z : z >= 0, 1^T z = 1} for a batch
 * of two, both the primal and the dual reduced systems, then the KKT
 * backward. */

static int qp_scenario(imp_qp_system system)
{
  imp_qp_dims dims = {.nz = 3, .nineq = 3, .neq = 1};
  double q[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1},
         g[9] = {-1, 0, 0, 0, -1, 0, 0, 0, -1};
  double h[3] = {0}, a[3] = {1, 1, 1}, b[1] = {1};
  double p[6] = {-0.2, -0.9, 0.4, 0.3, -0.1, -0.5};
  double y[14], ybar[14] = {1, -2, 0.5, 0, 0, 0, 0, -1, 1, 2, 0, 0, 0, 0};
  double pbar[6] = {0}, qbar[9] = {0};
  imp_qp_data data = {
      .Q = q, .p = p, .p_stride = 3, .A = a, .b = b, .G = g, .h = h};
  imp_qp_grad grad = {.Q = qbar, .p = pbar, .p_stride = 3};
  imp_qp_options opt = {.system = system};
  int rc;

  rc = imp_qp_solve(&dims, 2, &data, y, &opt, NULL);
  if (rc == IMP_OK)
    rc = imp_qp_backward(&dims, 2, &data, y, ybar, &grad, &opt, NULL);
  return rc;
}

static int qp_primal(void)
{
  return qp_scenario(IMP_QP_SYSTEM_PRIMAL);
}
static int qp_auto(void)
{
  return qp_scenario(IMP_QP_SYSTEM_AUTO);
}

START_TEST(qp_solve_and_backward)
{
  exhaust("qp (primal system)", qp_primal);
  exhaust("qp (auto system)", qp_auto);
}
END_TEST

/* ------------------------------------------------------------------ */
/* ODE: dh/dt = A h with A = [[-theta, 1], [-1, -theta]], a batch of two,
 * outputs at two times, forward and adjoint, Adams and BDF. */

static int spiral_rhs(void *ctx, const double *t, const double *h,
                      const double *theta, double *out)
{
  (void)ctx, (void)t;
  out[0] = -theta[0] * h[0] + h[1];
  out[1] = -h[0] - theta[0] * h[1];
  return 0;
}

static int spiral_vjp(void *ctx, const double *t, const double *h,
                      const double *theta, const double *v, double *vh,
                      double *vt, double *vtheta)
{
  (void)ctx, (void)t, (void)vt;
  if (vh != NULL) {
    vh[0] = -theta[0] * v[0] - v[1];
    vh[1] = v[0] - theta[0] * v[1];
  }
  if (vtheta != NULL)
    vtheta[0] -= v[0] * h[0] + v[1] * h[1];
  return 0;
}

static int ode_scenario(imp_ode_method method)
{
  imp_ode_field field = {
      .d = 2, .ntheta = 1, .rhs = spiral_rhs, .vjp = spiral_vjp};
  imp_ode_options opt = {.method = method, .rtol = 1e-8, .atol = 1e-10};
  double times[2] = {0.5, 1.0}, x[4] = {1, 0, 0, 2}, y[8];
  double ybar[8] = {1, 0, 0, 1, -1, 2, 0.5, 0}, xbar[4] = {0};
  imp_shape in = {2, 2, 1, 1};
  imp_layer *ode = NULL;
  int rc;

  rc = imp_ode_create(&field, 0.0, times, 2, &opt, "spiral", &ode);
  if (rc == IMP_OK) {
    imp_layer_params(ode)[0] = 0.1;
    rc = imp_layer_forward(ode, &in, x, y);
  }
  if (rc == IMP_OK)
    rc = imp_layer_backward(ode, xbar, ybar, &in, x, y);
  imp_layer_free(ode);
  return rc;
}

static int ode_adams(void)
{
  return ode_scenario(IMP_ODE_ADAMS);
}
static int ode_bdf(void)
{
  return ode_scenario(IMP_ODE_BDF);
}

START_TEST(ode_layer)
{
  /* SUNDIALS 6.4.1 dereferences its own failed allocations (N_VClone,
   * SUNLogger_Create): only imp's allocations are failed here. */
  failalloc_exempt("libsundials");
  exhaust("ode (adams)", ode_adams);
  exhaust("ode (bdf)", ode_bdf);
}
END_TEST

static Suite *alloc_suite(void)
{
  Suite *s = suite_create("alloc");
  TCase *tc = tcase_create("alloc");

  tcase_add_test(tc, root_layer);
  tcase_add_test(tc, deq_layer);
  tcase_add_test(tc, conv_stack_and_checkpoint);
  tcase_add_test(tc, qp_solve_and_backward);
  tcase_add_test(tc, ode_layer);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(alloc_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

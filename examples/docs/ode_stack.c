/*
 * examples/docs/ode_stack.c - a neural ODE layer inside a stack.
 *
 * The model is ODE -> dense:
 *
 *     dh/dt = A h,   h(0) = x,   the layer outputs (h(0.5), h(1)),
 *     y = R (h(0.5), h(1)) + c   (a dense readout, 4 -> 2),
 *
 * with A (2 x 2) the ODE layer's parameters.  The data are the flow of the
 * damped rotation dh/dt = [[-0.1, -1], [1, -0.1]] h over one time unit,
 * y = exp(A* T) x, which the model can represent exactly.  CVODES
 * integrates forward; backward integrates the adjoint
 * dlambda/dt = -A^T lambda back from t = 1 with the readout's cotangents
 * added at each output time, and accumulates dL/dA as a quadrature.
 *
 * docs/ode.md pulls its samples from the blocks marked [name].  The
 * program checks that Adam brings the loss below 1e-2 of its start, and
 * that the layer's statistics count forward and backward steps.  It exits
 * non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define NSAMPLES 32
#define STEPS 300

/* [field] */
/* g(t, h; A) = A h, A row-major 2 x 2; the time arrives as x = &t. */
static int linear_rhs(void *ctx, const double *t, const double *h,
                      const double *a, double *out)
{
  (void)ctx, (void)t;
  out[0] = a[0] * h[0] + a[1] * h[1];
  out[1] = a[2] * h[0] + a[3] * h[1];
  return 0;
}

/* vjp_h = A^T v (overwritten);  vjp_a += v h^T (accumulated). */
static int linear_vjp(void *ctx, const double *t, const double *h,
                      const double *a, const double *v, double *vjp_h,
                      double *vjp_t, double *vjp_a)
{
  (void)ctx, (void)t, (void)vjp_t;
  if (vjp_h != NULL) {
    vjp_h[0] = a[0] * v[0] + a[2] * v[1];
    vjp_h[1] = a[1] * v[0] + a[3] * v[1];
  }
  if (vjp_a != NULL) {
    vjp_a[0] += v[0] * h[0];
    vjp_a[1] += v[0] * h[1];
    vjp_a[2] += v[1] * h[0];
    vjp_a[3] += v[1] * h[1];
  }
  return 0;
}

static const imp_ode_field linear_field = {
    .d = 2, .ntheta = 4, .rhs = linear_rhs, .vjp = linear_vjp};
/* [field] */

/* y = exp(A* T) x for the damped rotation, T = 1. */
static void make_data(double *x, double *target)
{
  double decay = exp(-0.1), c = cos(1.0), s = sin(1.0);
  imp_rng rng;

  imp_rng_seed(&rng, 5);
  for (int i = 0; i < NSAMPLES; i++) {
    x[2 * i] = 2.0 * imp_rng_uniform(&rng) - 1.0;
    x[2 * i + 1] = 2.0 * imp_rng_uniform(&rng) - 1.0;
    target[2 * i] = decay * (c * x[2 * i] - s * x[2 * i + 1]);
    target[2 * i + 1] = decay * (s * x[2 * i] + c * x[2 * i + 1]);
  }
}

/* The model; *ode is borrowed from the stack, which owns both layers. */
static int build_model(imp_rng *rng, imp_stack **out, imp_layer **ode)
{
  /* [stack] */
  double times[2] = {0.5, 1.0}; /* output times; t0 = 0 */
  imp_ode_options opt = {.rtol = 1e-8, .atol = 1e-10}; /* Adams */
  imp_layer *readout = NULL;
  imp_stack *stack = NULL;
  int rc = imp_stack_create("ode-dense", &stack);

  if (rc == IMP_OK)
    rc = imp_ode_create(&linear_field, 0.0, times, 2, &opt, "flow", ode);
  if (rc == IMP_OK) {
    imp_layer_params(*ode)[0] = imp_layer_params(*ode)[3] = -0.5; /* A */
    rc = imp_stack_add(stack, *ode);
    if (rc != IMP_OK)
      imp_layer_free(*ode);
  }
  if (rc == IMP_OK) /* the ODE's output: (h(0.5), h(1)), 4 numbers */
    rc = imp_dense_create(4, 2, rng, "readout", &readout);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, readout);
    if (rc != IMP_OK)
      imp_layer_free(readout);
  }
  /* [stack] */
  *out = stack;
  return rc;
}

int main(void)
{
  static double x[2 * NSAMPLES], target[2 * NSAMPLES];
  double y[2 * NSAMPLES], ybar[2 * NSAMPLES], loss = 0.0, first_loss = 0.0;
  imp_shape in = {NSAMPLES, 2, 1, 1}, out = {NSAMPLES, 2, 1, 1};
  imp_optim_options adam = imp_optim_defaults();
  imp_optim *optim = NULL;
  imp_stack *stack = NULL;
  imp_layer *ode = NULL;
  imp_ode_stats stats;
  imp_rng rng;
  int failures = 0, rc;

  make_data(x, target);
  imp_rng_seed(&rng, 9);
  rc = build_model(&rng, &stack, &ode);
  adam.lr = 0.05;
  if (rc == IMP_OK)
    rc = imp_optim_create(imp_optim_adam, imp_stack_nparams(stack), &adam,
                          &optim);

  /* [train] */
  for (int step = 0; rc == IMP_OK && step < STEPS; step++) {
    imp_stack_zero_grad(stack);
    rc = imp_stack_forward(stack, &in, x, y); /* CVODES forward */
    if (rc == IMP_OK)
      rc = imp_loss_mse(&out, y, target, &loss, ybar);
    if (rc == IMP_OK)
      rc = imp_stack_backward(stack, NULL, ybar); /* CVODES adjoint */
    if (rc == IMP_OK)
      rc = imp_optim_step(optim, imp_stack_params(stack),
                          imp_stack_grads(stack), imp_stack_nparams(stack));
    if (step == 0)
      first_loss = loss;
  }
  /* [train] */

  /* [stats] */
  if (rc == IMP_OK)
    rc = imp_ode_get_stats(ode, &stats);
  /* stats.forward and stats.backward: steps, rhs_evals, vjp_evals,
   * error_test_fails, nonlin_iters, ...; stats.checkpoints */
  /* [stats] */
  if (rc == IMP_OK) {
    const double *a = imp_layer_params(ode);

    printf("loss %.3e -> %.3e after %d Adam steps\n", first_loss, loss, STEPS);
    printf("A = [[%.4f, %.4f], [%.4f, %.4f]]\n", a[0], a[1], a[2], a[3]);
    printf("last step: forward %ld CVODES steps, %ld evaluations of g; "
           "backward %ld steps, %ld vjp calls; %ld checkpoints\n",
           stats.forward.steps, stats.forward.rhs_evals, stats.backward.steps,
           stats.backward.vjp_evals, stats.checkpoints);
    failures += !(loss <= first_loss / 100.0);
    failures += !(stats.forward.steps > 0 && stats.backward.steps > 0);
  } else {
    fprintf(stderr, "ode stack: %s\n", imp_last_error());
    failures++;
  }
  imp_optim_free(optim);
  imp_stack_free(stack);
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

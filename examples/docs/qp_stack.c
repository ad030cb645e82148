/*
 * examples/docs/qp_stack.c - a QP layer inside a stack.
 *
 * The model is dense -> QP:
 *
 *     p  = W x + c                                (dense, 3 -> 3)
 *     z* = argmin 1/2 |z|^2 + p^T z  s.t.  1^T z = 1, z >= 0,
 *
 * that is the Euclidean projection of -p onto the probability simplex: a
 * layer whose outputs are non-negative and sum to one, like a softmax,
 * but with exact zeros.  Q = I, A = 1^T, b = 1, G = -I and h = 0 are
 * fixed; p is the layer's input.  The data are projections of M x for a
 * fixed M, and Adam fits W and c through the KKT conditions' adjoint.
 *
 * docs/qp.md pulls its samples from the blocks marked [name].  The program
 * checks that the loss falls below 1e-2 of its start, that every output is
 * on the simplex (to 1e-8), and that some outputs have exact zeros.  It
 * exits non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"
#include "imp/qp.h"

#define NSAMPLES 64
#define STEPS 400

/* The projection of v (3 numbers) onto the simplex, by sorting. */
static void project(const double *v, double *z)
{
  double s[3] = {v[0], v[1], v[2]}, sum = 0.0, tau = 0.0;

  for (int i = 0; i < 3; i++) /* sort descending */
    for (int j = i + 1; j < 3; j++)
      if (s[j] > s[i]) {
        double tmp = s[i];

        s[i] = s[j];
        s[j] = tmp;
      }
  for (int k = 0; k < 3; k++) {
    sum += s[k];
    if (s[k] - (sum - 1.0) / (k + 1) > 0.0)
      tau = (sum - 1.0) / (k + 1);
  }
  for (int i = 0; i < 3; i++)
    z[i] = fmax(v[i] - tau, 0.0);
}

static void make_data(double *x, double *target)
{
  static const double m[9] = {1.5, -1.0, 0.2, -0.5, 2.0, 0.0, 0.3, 0.4, -1.2};
  imp_rng rng;

  imp_rng_seed(&rng, 13);
  for (int i = 0; i < NSAMPLES; i++) {
    double v[3];

    for (int j = 0; j < 3; j++)
      x[3 * i + j] = 2.0 * imp_rng_uniform(&rng) - 1.0;
    for (int r = 0; r < 3; r++)
      v[r] = m[3 * r] * x[3 * i] + m[3 * r + 1] * x[3 * i + 1] +
             m[3 * r + 2] * x[3 * i + 2];
    project(v, target + 3 * i);
  }
}

/* The model; *qp is borrowed from the stack, which owns both layers. */
static int build_model(imp_rng *rng, imp_stack **out, imp_layer **qp)
{
  /* [stack] */
  static const double eye[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  static const double minus_eye[9] = {-1, 0, 0, 0, -1, 0, 0, 0, -1};
  static const double ones[3] = {1, 1, 1}, one[1] = {1}, zeros[3] = {0};
  imp_qp_layer_config simplex = {
      .dims = {.nz = 3, .nineq = 3, .neq = 1},
      .input = IMP_QP_P, /* p comes from the layer below */
      .values = {.Q = eye, .A = ones, .b = one, .G = minus_eye, .h = zeros},
  };
  imp_layer *dense = NULL;
  imp_stack *stack = NULL;
  int rc = imp_stack_create("dense-qp", &stack);

  if (rc == IMP_OK)
    rc = imp_dense_create(3, 3, rng, "p = Wx + c", &dense);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, dense);
    if (rc != IMP_OK)
      imp_layer_free(dense);
  }
  if (rc == IMP_OK)
    rc = imp_qp_layer_create(&simplex, "simplex", qp);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, *qp);
    if (rc != IMP_OK)
      imp_layer_free(*qp);
  }
  /* [stack] */
  *out = stack;
  return rc;
}

int main(void)
{
  static double x[3 * NSAMPLES], target[3 * NSAMPLES];
  double z[3 * NSAMPLES], zbar[3 * NSAMPLES], loss = 0.0, first_loss = 0.0;
  double worst = 0.0;
  imp_shape in = {NSAMPLES, 3, 1, 1}, out = {NSAMPLES, 3, 1, 1};
  imp_optim_options adam = imp_optim_defaults();
  imp_optim *optim = NULL;
  imp_stack *stack = NULL;
  imp_layer *qp = NULL;
  imp_qp_stats stats;
  imp_rng rng;
  size_t zeros = 0;
  int failures = 0, rc;

  make_data(x, target);
  imp_rng_seed(&rng, 17);
  rc = build_model(&rng, &stack, &qp);
  adam.lr = 0.05;
  if (rc == IMP_OK)
    rc = imp_optim_create(imp_optim_adam, imp_stack_nparams(stack), &adam,
                          &optim);

  /* [train] */
  for (int step = 0; rc == IMP_OK && step < STEPS; step++) {
    imp_stack_zero_grad(stack);
    rc = imp_stack_forward(stack, &in, x, z); /* interior point */
    if (rc == IMP_OK)
      rc = imp_loss_mse(&out, z, target, &loss, zbar);
    if (rc == IMP_OK)
      rc = imp_stack_backward(stack, NULL, zbar); /* KKT adjoint */
    if (rc == IMP_OK)
      rc = imp_optim_step(optim, imp_stack_params(stack),
                          imp_stack_grads(stack), imp_stack_nparams(stack));
    if (step == 0)
      first_loss = loss;
  }
  /* [train] */

  /* [stats] */
  if (rc == IMP_OK)
    rc = imp_qp_layer_stats(qp, &stats); /* of the last backward */
  /* stats.iterations (the most over the batch), .total_iterations,
   * .primal_residual, .dual_residual, .gap; backward: .adjoint_cond and
   * .adjoint_residual */
  /* [stats] */
  if (rc != IMP_OK) {
    fprintf(stderr, "qp stack: %s\n", imp_last_error());
    imp_optim_free(optim);
    imp_stack_free(stack);
    return EXIT_FAILURE;
  }
  for (int i = 0; i < NSAMPLES; i++) {
    double sum = z[3 * i] + z[3 * i + 1] + z[3 * i + 2];

    worst = fmax(worst, fabs(sum - 1.0));
    for (int j = 0; j < 3; j++) {
      worst = fmax(worst, fmax(-z[3 * i + j], 0.0));
      zeros += z[3 * i + j] < 1e-8;
    }
  }
  printf("loss %.3e -> %.3e after %d Adam steps\n", first_loss, loss, STEPS);
  printf("outputs on the simplex to %.1e; %zu of %d entries are zero\n", worst,
         zeros, 3 * NSAMPLES);
  printf("last backward: adjoint condition number %.1f, residual %.1e; "
         "interior point up to %zu iterations\n",
         stats.adjoint_cond, stats.adjoint_residual, stats.iterations);
  failures += !(loss <= first_loss / 100.0);
  failures += !(worst <= 1e-8);
  failures += !(zeros > 0);
  imp_optim_free(optim);
  imp_stack_free(stack);
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

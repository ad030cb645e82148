/*
 * examples/docs/deq_stack.c - a deep equilibrium layer inside a stack.
 *
 * The model is dense -> DEQ -> dense:
 *
 *     u  = U x + c                      (2 inputs, 8 features)
 *     z* = tanh(W z* + u)               (the DEQ: W dense, 8 x 8, with a
 *                                        Lipschitz bound ||W||_2 <= 0.9)
 *     y  = r . z* + d                   (the readout)
 *
 * The bound makes z -> tanh(W z + u) a contraction (tanh is 1-Lipschitz),
 * so the fixed point exists, is unique, and Anderson acceleration finds
 * it; the DEQ's backward solves the adjoint fixed point with the same
 * solver.  The stack is fitted to t(x) = sin(2 x1) cos(x2) with Adam.
 *
 * docs/deq.md pulls its samples from the blocks marked [name].  The
 * program checks that training lowers the loss ten-fold, that every
 * sample of the last forward converged, and that in evaluation mode a
 * larger budget gives a smaller residual.  It exits non-zero if a check
 * fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define NSAMPLES 64
#define WIDTH 8
#define STEPS 300

static void make_data(double *x, double *t)
{
  imp_rng rng;

  imp_rng_seed(&rng, 11);
  for (int i = 0; i < NSAMPLES; i++) {
    x[2 * i] = 2.0 * imp_rng_uniform(&rng) - 1.0;
    x[2 * i + 1] = 2.0 * imp_rng_uniform(&rng) - 1.0;
    t[i] = sin(2.0 * x[2 * i]) * cos(x[2 * i + 1]);
  }
}

/* Append layer to stack, freeing it if the stack refuses it. */
static int add(imp_stack *stack, imp_layer *layer, int rc)
{
  if (rc != IMP_OK)
    return rc;
  rc = imp_stack_add(stack, layer);
  if (rc != IMP_OK)
    imp_layer_free(layer);
  return rc;
}

/* The model; *deq is borrowed from the stack, which owns every layer. */
static int build_model(imp_rng *rng, imp_stack **out, imp_layer **deq)
{
  /* [stack] */
  imp_deq_options opt = {.solver = NULL, /* Anderson, the default */
                         .train = {.max_iter = 50, .rtol = 1e-6},
                         .eval = {.max_iter = 200, .rtol = 1e-10}};
  imp_layer *in = NULL, *w = NULL, *act = NULL, *readout = NULL;
  imp_stack *stack = NULL;
  int rc = imp_stack_create("dense-deq-dense", &stack);

  if (rc == IMP_OK)
    rc = add(stack, in, imp_dense_create(2, WIDTH, rng, "u = Ux + c", &in));

  /* The map h(u, z) = tanh(W z + u): W a bounded dense layer, then tanh. */
  if (rc == IMP_OK)
    rc = imp_dense_create(WIDTH, WIDTH, rng, "W", &w);
  if (rc == IMP_OK)
    rc = imp_dense_set_lipschitz(w, 0.9, 2); /* ||W||_2 <= 0.9 */
  if (rc == IMP_OK)
    rc = imp_activation_create(IMP_ACT_TANH, NULL, &act);
  if (rc == IMP_OK) /* on success the DEQ owns w and act */
    rc = imp_deq_create_from_layers(WIDTH, w, act, &opt, "deq", deq);
  if (rc != IMP_OK) {
    imp_layer_free(w);
    imp_layer_free(act);
  }
  if (rc == IMP_OK)
    rc = add(stack, *deq, IMP_OK);

  if (rc == IMP_OK)
    rc = add(stack, readout,
             imp_dense_create(WIDTH, 1, rng, "y = r.z + d", &readout));
  /* [stack] */
  *out = stack;
  return rc;
}

/* Forward in evaluation mode with a budget of max_iter iterations and
 * tolerance rtol; *residual receives the worst relative residual. */
static int evaluate(imp_stack *stack, imp_layer *deq, size_t max_iter,
                    double rtol, const double *x, double *y, double *residual)
{
  imp_shape in = {NSAMPLES, 2, 1, 1};
  imp_deq_stats stats;
  int rc;

  /* [budget] */
  imp_deq_budget budget = {.max_iter = max_iter, .rtol = rtol};

  rc = imp_deq_set_budget(deq, 0, &budget); /* 0: the evaluation budget */
  if (rc == IMP_OK)
    rc = imp_stack_forward(stack, &in, x, y); /* IMP_ENOCONV if missed */
  /* [budget] */
  imp_deq_get_stats(deq, &stats);
  *residual = stats.rel_residual;
  return rc;
}

int main(void)
{
  static double x[2 * NSAMPLES], t[NSAMPLES];
  double y[NSAMPLES], ybar[NSAMPLES], loss = 0.0, first_loss = 0.0;
  double coarse, fine;
  imp_shape in = {NSAMPLES, 2, 1, 1}, out = {NSAMPLES, 1, 1, 1};
  imp_optim_options adam = imp_optim_defaults();
  imp_optim *optim = NULL;
  imp_stack *stack = NULL;
  imp_layer *deq = NULL;
  imp_deq_stats stats;
  imp_rng rng;
  int failures = 0, rc;

  make_data(x, t);
  imp_rng_seed(&rng, 3);
  rc = build_model(&rng, &stack, &deq);
  adam.lr = 0.01;
  if (rc == IMP_OK)
    rc = imp_optim_create(imp_optim_adam, imp_stack_nparams(stack), &adam,
                          &optim);

  /* [train] */
  for (int step = 0; rc == IMP_OK && step < STEPS; step++) {
    imp_stack_zero_grad(stack);
    rc = imp_stack_forward(stack, &in, x, y); /* solves for z* */
    if (rc == IMP_OK)
      rc = imp_loss_mse(&out, y, t, &loss, ybar);
    if (rc == IMP_OK)
      rc = imp_stack_backward(stack, NULL, ybar); /* the adjoint */
    if (rc == IMP_OK)
      rc = imp_optim_step(optim, imp_stack_params(stack),
                          imp_stack_grads(stack), imp_stack_nparams(stack));
    if (step == 0)
      first_loss = loss;
  }
  /* [train] */

  /* [stats] */
  if (rc == IMP_OK)
    rc = imp_deq_get_stats(deq, &stats);
  /* stats.converged of stats.batch samples met the tolerance in
   * stats.iterations iterations (stats.evaluations of h); the adjoint
   * took stats.backward_iterations; stats.trace holds the worst relative
   * residual at each iteration */
  /* [stats] */
  if (rc == IMP_OK) {
    printf("loss %.3e -> %.3e after %d Adam steps\n", first_loss, loss, STEPS);
    printf("last training forward: %zu of %zu converged in %zu iterations "
           "(relative residual %.1e); adjoint %zu iterations\n",
           stats.converged, stats.batch, stats.iterations, stats.rel_residual,
           stats.backward_iterations);
    failures += !(loss <= first_loss / 10.0);
    failures += !(stats.converged == stats.batch && stats.batch == NSAMPLES);
  }

  /* Test-time compute: 5 iterations miss 1e-12 and say so; 200 reach
   * 1e-10. */
  if (rc == IMP_OK) {
    imp_stack_set_training(stack, 0); /* evaluation mode */
    rc = evaluate(stack, deq, 5, 1e-12, x, y, &coarse);
    if (rc == IMP_ENOCONV) {
      printf("5 iterations: %s\n", imp_last_error());
      rc = IMP_OK;
    } else {
      failures++; /* the small budget must be reported as missed */
    }
  }
  if (rc == IMP_OK)
    rc = evaluate(stack, deq, 200, 1e-10, x, y, &fine);
  if (rc == IMP_OK) {
    printf("evaluation: relative residual %.1e with 5 iterations, %.1e with "
           "up to 200\n",
           coarse, fine);
    failures += !(fine < coarse && fine <= 1e-10);
  }

  if (rc != IMP_OK)
    fprintf(stderr, "deq stack: %s\n", imp_last_error());
  imp_optim_free(optim);
  imp_stack_free(stack);
  failures += rc != IMP_OK;
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

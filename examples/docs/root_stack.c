/*
 * examples/docs/root_stack.c - a root-finding layer inside a stack,
 * trained end to end.
 *
 * The model is dense -> root -> output:
 *
 *     u = w . x + b                 (a dense layer, 2 inputs)
 *     y = the root of f(u, y; theta) = y^3 + theta y - u,
 *
 * a monotone cubic for theta > 0, so that y is unique and df/dy =
 * 3 y^2 + theta never vanishes.  Data come from w = (1, -2), b = 0.5 and
 * theta = 1; the model starts elsewhere and Adam fits all four numbers
 * through the root layer's implicit gradient.
 *
 * docs/root.md pulls its samples from the blocks marked [name].  The
 * program checks that the stack's gradient matches finite differences
 * (1e-6 relative), that training brings the loss below 1e-6 and theta
 * within 1e-2 of 1, and that the layer's statistics say every sample
 * converged.  It exits non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define NSAMPLES 64
#define STEPS 2000

/* [problem] */
/* f(u, y; theta) = y^3 + theta y - u. */
static int cubic_residual(void *ctx, const double *u, const double *y,
                          const double *theta, double *r)
{
  (void)ctx;
  r[0] = y[0] * y[0] * y[0] + theta[0] * y[0] - u[0];
  return 0;
}

/* v df/dy = (3 y^2 + theta) v;  v df/du = -v;  v df/dtheta = y v. */
static int cubic_vjp(void *ctx, const double *u, const double *y,
                     const double *theta, const double *v, double *vjp_y,
                     double *vjp_u, double *vjp_theta)
{
  (void)ctx, (void)u;
  if (vjp_y != NULL)
    vjp_y[0] = (3.0 * y[0] * y[0] + theta[0]) * v[0];
  if (vjp_u != NULL)
    vjp_u[0] += -v[0];
  if (vjp_theta != NULL)
    vjp_theta[0] += y[0] * v[0];
  return 0;
}

static const imp_problem cubic = {.nx = 1,
                                  .ny = 1,
                                  .ntheta = 1,
                                  .residual = cubic_residual,
                                  .vjp = cubic_vjp};
/* [problem] */

/* The training data: y = root of y^3 + y - (x1 - 2 x2 + 0.5). */
static void make_data(double *x, double *target)
{
  imp_rng rng;

  imp_rng_seed(&rng, 7);
  for (int i = 0; i < NSAMPLES; i++) {
    double u, y = 0.0;

    x[2 * i] = imp_rng_uniform(&rng) * 2.0 - 1.0;
    x[2 * i + 1] = imp_rng_uniform(&rng) * 2.0 - 1.0;
    u = x[2 * i] - 2.0 * x[2 * i + 1] + 0.5;
    for (int k = 0; k < 60; k++) /* Newton on the true cubic */
      y -= (y * y * y + y - u) / (3.0 * y * y + 1.0);
    target[i] = y;
  }
}

typedef struct fit {
  imp_stack *stack;
  const double *x, *target;
} fit;

/* The loss at the stack's parameters p (copied in), for gradcheck. */
static int loss_at(void *ctx, const double *p, double *loss)
{
  fit *f = ctx;
  imp_shape in = {NSAMPLES, 2, 1, 1}, out = {NSAMPLES, 1, 1, 1};
  double y[NSAMPLES];
  size_t n = imp_stack_nparams(f->stack);
  int rc;

  for (size_t i = 0; i < n; i++)
    imp_stack_params(f->stack)[i] = p[i];
  rc = imp_stack_forward(f->stack, &in, f->x, y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, y, f->target, loss, NULL);
  return rc;
}

static int gradient_check(fit *f, double *worst)
{
  imp_shape in = {NSAMPLES, 2, 1, 1}, out = {NSAMPLES, 1, 1, 1};
  double y[NSAMPLES], ybar[NSAMPLES], loss, p[4], g[4];
  imp_gradcheck_options go = {.floor = 1e-8};
  imp_gradcheck_result res;
  int rc;

  imp_stack_zero_grad(f->stack);
  rc = imp_stack_forward(f->stack, &in, f->x, y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, y, f->target, &loss, ybar);
  if (rc == IMP_OK)
    rc = imp_stack_backward(f->stack, NULL, ybar);
  for (int i = 0; rc == IMP_OK && i < 4; i++) {
    p[i] = imp_stack_params(f->stack)[i];
    g[i] = imp_stack_grads(f->stack)[i];
  }
  if (rc == IMP_OK)
    rc = imp_gradcheck(loss_at, f, p, 4, g, &go, &res);
  for (int i = 0; i < 4; i++) /* restore the parameters */
    imp_stack_params(f->stack)[i] = p[i];
  *worst = res.max_rel_err;
  return rc;
}

/* The model: a dense layer, then the root layer; *root is borrowed from
 * the stack, which owns both. */
static int build_model(imp_stack **out, imp_layer **root)
{
  /* [stack] */
  double theta0 = 0.3;                      /* the root layer's parameter */
  imp_root_options opt = {.warm_start = 1}; /* each sample from its last y */
  imp_layer *dense = NULL;
  imp_stack *stack = NULL;
  int rc = imp_stack_create("dense-root", &stack);

  if (rc == IMP_OK)
    rc = imp_dense_create(2, 1, NULL, "u = w.x + b", &dense);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, dense); /* the stack owns it now */
    if (rc != IMP_OK)
      imp_layer_free(dense);
  }
  if (rc == IMP_OK)
    rc = imp_root_layer_create(&cubic, &theta0, &opt, "cubic root", root);
  if (rc == IMP_OK) {
    rc = imp_stack_add(stack, *root);
    if (rc != IMP_OK)
      imp_layer_free(*root);
  }
  /* [stack] */
  *out = stack;
  return rc;
}

int main(void)
{
  static double x[2 * NSAMPLES], target[NSAMPLES];
  double y[NSAMPLES], ybar[NSAMPLES], loss = 0.0, first_loss = 0.0, worst;
  imp_shape in = {NSAMPLES, 2, 1, 1}, out = {NSAMPLES, 1, 1, 1};
  imp_optim_options adam = imp_optim_defaults();
  imp_stack *stack = NULL;
  imp_layer *root = NULL;
  imp_optim *optim = NULL;
  imp_root_stats stats;
  int failures = 0, rc;

  make_data(x, target);

  rc = build_model(&stack, &root);
  if (rc == IMP_OK)
    rc = imp_optim_create(imp_optim_adam, imp_stack_nparams(stack), &adam,
                          &optim);
  if (rc != IMP_OK) {
    fprintf(stderr, "set-up: %s\n", imp_last_error());
    imp_stack_free(stack);
    return EXIT_FAILURE;
  }

  /* The dense layer starts at w = (0.2, 0.2), b = 0. */
  imp_stack_params(stack)[0] = imp_stack_params(stack)[1] = 0.2;
  {
    fit f = {stack, x, target};

    rc = gradient_check(&f, &worst);
  }
  adam.lr = 0.1;
  imp_optim_set_lr(optim, adam.lr);

  /* [train] */
  for (int step = 0; rc == IMP_OK && step < STEPS; step++) {
    imp_stack_zero_grad(stack);
    rc = imp_stack_forward(stack, &in, x, y);
    if (rc == IMP_OK)
      rc = imp_loss_mse(&out, y, target, &loss, ybar); /* ybar = dL/dy */
    if (rc == IMP_OK)
      rc = imp_stack_backward(stack, NULL, ybar); /* adjoint solves */
    if (rc == IMP_OK)
      rc = imp_optim_step(optim, imp_stack_params(stack),
                          imp_stack_grads(stack), imp_stack_nparams(stack));
    if (step == 0)
      first_loss = loss;
  }
  /* [train] */

  /* [stats] */
  if (rc == IMP_OK)
    rc = imp_root_layer_stats(root, &stats); /* of the last forward */
  /* stats.samples, .iterations (summed), .max_iterations,
   * .function_evals, .jacobian_evals and .residual (the worst) */
  /* [stats] */
  if (rc != IMP_OK) {
    fprintf(stderr, "training: %s\n", imp_last_error());
    imp_optim_free(optim);
    imp_stack_free(stack);
    return EXIT_FAILURE;
  }

  {
    const double *p = imp_stack_params(stack);

    printf("gradient check of the stack: worst relative error %.1e "
           "(tolerance 1e-6)\n",
           worst);
    printf("loss %.3e -> %.3e after %d Adam steps\n", first_loss, loss, STEPS);
    printf("w = (%.4f, %.4f), b = %.4f, theta = %.4f  (data: 1, -2, 0.5, "
           "1)\n",
           p[0], p[1], p[2], p[3]);
    printf("last forward: %zu samples, %zu iterations in all (at most %zu), "
           "worst residual %.1e\n",
           stats.samples, stats.iterations, stats.max_iterations,
           stats.residual);
    failures += !(worst <= 1e-6);
    failures += !(loss <= 1e-6);
    failures += !(fabs(p[3] - 1.0) <= 1e-2);
    failures += !(stats.samples == NSAMPLES && stats.residual < 1e-10);
  }
  imp_optim_free(optim);
  imp_stack_free(stack);
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * examples/docs/explicit.c - explicit functions as implicit ones, and the
 * unit circle, which is implicit but not the graph of one function.
 *
 * docs/explicit.md pulls its samples from the blocks marked [name] below.
 * The program checks what the page says:
 *   1. a root-finding layer on f(x, y) = y - sin x returns y = sin x, and
 *      its backward returns dy/dx = cos x (to 1e-9);
 *   2. at x = 0.6 the circle x^2 + y^2 - 1 = 0 has the two roots +-0.8,
 *      and which one the solver returns depends only on the initial guess.
 * It exits non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

/* [explicit] */
/* Any explicit y = g(x) is the zero of f(x, y) = y - g(x); here g = sin. */
static int sine_residual(void *ctx, const double *x, const double *y,
                         const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = y[0] - sin(x[0]);
  return 0;
}

/* v df/dy = v and v df/dx = -v cos x (accumulated). */
static int sine_vjp(void *ctx, const double *x, const double *y,
                    const double *theta, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)y, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = v[0];
  if (vjp_x != NULL)
    vjp_x[0] += -v[0] * cos(x[0]);
  return 0;
}

static const imp_problem sine = {
    .nx = 1, .ny = 1, .residual = sine_residual, .vjp = sine_vjp};
/* [explicit] */

/* [circle] */
/* The unit circle: f(x, y) = x^2 + y^2 - 1, no parameters. */
static int circle_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = x[0] * x[0] + y[0] * y[0] - 1.0;
  return 0;
}

static const imp_problem circle = {
    .nx = 1, .ny = 1, .residual = circle_residual};
/* [circle] */

static int check_explicit(void)
{
  int failures = 0;

  /* [explicit-layer] */
  imp_shape in = {.n = 3, .c = 1, .h = 1, .w = 1};
  double x[3] = {0.0, 0.5, 1.0}, y[3], ybar[3] = {1.0, 1.0, 1.0};
  double xbar[3] = {0.0, 0.0, 0.0};
  imp_layer *layer;
  int rc = imp_root_layer_create(&sine, NULL, NULL, "sin", &layer);

  if (rc == IMP_OK)
    rc = imp_layer_forward(layer, &in, x, y); /* y = sin x */
  if (rc == IMP_OK)
    rc = imp_layer_backward(layer, xbar, ybar, &in, x, y); /* cos x */
  imp_layer_free(layer);
  /* [explicit-layer] */
  if (rc != IMP_OK) {
    fprintf(stderr, "explicit: %s\n", imp_last_error());
    return 1;
  }

  printf("%6s %14s %14s %14s %14s\n", "x", "y", "sin x", "dy/dx", "cos x");
  for (int i = 0; i < 3; i++) {
    printf("%6.2f %14.10f %14.10f %14.10f %14.10f\n", x[i], y[i], sin(x[i]),
           xbar[i], cos(x[i]));
    failures += !(fabs(y[i] - sin(x[i])) <= 1e-9);
    failures += !(fabs(xbar[i] - cos(x[i])) <= 1e-9);
  }
  return failures;
}

static int check_circle(void)
{
  /* [two-roots] */
  double x = 0.6, upper = 1.0, lower = -1.0; /* two initial guesses */
  int rc = imp_root_solve(&circle, NULL, &x, NULL, &upper, NULL);

  if (rc == IMP_OK)
    rc = imp_root_solve(&circle, NULL, &x, NULL, &lower, NULL);
  /* upper = 0.8 and lower = -0.8: both are zeros of f at x = 0.6 */
  /* [two-roots] */
  if (rc != IMP_OK) {
    fprintf(stderr, "circle: %s\n", imp_last_error());
    return 1;
  }
  printf("\ncircle at x = 0.6: from y0 = +1 the root %.12f, from y0 = -1 "
         "the root %.12f\n",
         upper, lower);
  return !(fabs(upper - 0.8) <= 1e-9) + !(fabs(lower + 0.8) <= 1e-9);
}

int main(void)
{
  int failures = check_explicit() + check_circle();

  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

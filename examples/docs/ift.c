/*
 * examples/docs/ift.c - the implicit function theorem on the unit circle.
 *
 * On f(x, y) = x^2 + y^2 - 1 = 0 the theorem gives
 *
 *     dy/dx = -(df/dy)^-1 df/dx = -2x / 2y = -x / y
 *
 * wherever df/dy = 2y is not 0.  docs/ift.md pulls its samples from the
 * blocks marked [name] below.  The program checks
 *   1. the derivative that imp_adjoint_solve returns against -x / y at
 *      points all around the circle (to 1e-12);
 *   2. that at (1, 0), where df/dy = 0, it refuses with IMP_ESINGULAR.
 * It exits non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define PI 3.14159265358979323846

/* [circle] */
static int circle_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = x[0] * x[0] + y[0] * y[0] - 1.0;
  return 0;
}

/* vjp_y = v df/dy = 2 y v, vjp_x += v df/dx = 2 x v. */
static int circle_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *v, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * y[0] * v[0];
  if (vjp_x != NULL)
    vjp_x[0] += 2.0 * x[0] * v[0];
  return 0;
}

static const imp_problem circle = {
    .nx = 1, .ny = 1, .residual = circle_residual, .vjp = circle_vjp};
/* [circle] */

/* dy/dx at the point (x, y) of the circle, by the theorem; v receives the
 * adjoint. */
static int slope(double x, double y, double *dydx, double *v)
{
  /* [slope] */
  double ybar = 1.0; /* the seed: we want dy/dx itself */
  imp_adjoint_stats stats;

  *dydx = 0.0; /* xbar is accumulated into */
  return imp_adjoint_solve(&circle, &x, &y, NULL, &ybar, v, dydx, NULL, NULL,
                           &stats);
  /* [slope] */
}

int main(void)
{
  double x, y, dydx, v;
  int failures = 0, rc;

  printf("%8s %8s %16s %16s %12s\n", "x", "y", "dy/dx (adjoint)", "-x/y", "v");
  for (int k = 0; k < 12; k++) {
    double angle = (k + 0.5) * PI / 6.0;

    x = cos(angle);
    y = sin(angle);
    if (slope(x, y, &dydx, &v) != IMP_OK) {
      fprintf(stderr, "adjoint: %s\n", imp_last_error());
      return EXIT_FAILURE;
    }
    printf("%8.4f %8.4f %16.12f %16.12f %12.6f\n", x, y, dydx, -x / y, v);
    failures += !(fabs(dydx + x / y) <= 1e-12 * fmax(1.0, fabs(x / y)));
  }

  /* [singular] */
  x = 1.0;
  y = 0.0; /* df/dy = 2y = 0 here */
  rc = slope(x, y, &dydx, &v);

  if (rc == IMP_ESINGULAR)
    printf("\nat (1, 0): %s: %s\n", imp_status_name(rc), imp_last_error());
  /* [singular] */
  failures += rc != IMP_ESINGULAR;

  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* tiny.c - the smallest program against the installed imp: the adjoint of
 * f(x, y) = 2y - x gives dy/dx = 1/2; f(x, y) = y^2 - x is singular at 0. */
#include <stdio.h>

#include <imp.h>

static int lin(void *ctx, const double *x, const double *y, const double *theta,
               double *r)
{
  (void)ctx, (void)theta;
  r[0] = 2.0 * y[0] - x[0];
  return 0;
}

static int lin_vjp(void *ctx, const double *x, const double *y,
                   const double *theta, const double *v, double *vjp_y,
                   double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)x, (void)y, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * v[0];
  if (vjp_x != NULL)
    vjp_x[0] -= v[0];
  return 0;
}

static int sq_vjp(void *ctx, const double *x, const double *y,
                  const double *theta, const double *v, double *vjp_y,
                  double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)x, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * y[0] * v[0];
  if (vjp_x != NULL)
    vjp_x[0] -= v[0];
  return 0;
}

int main(void)
{
  imp_problem p = {.nx = 1, .ny = 1, .residual = lin, .vjp = lin_vjp};
  double x = 1.0, y = 0.5, ybar = 1.0, xbar = 0.0, zero = 0.0, dummy = 0.0;
  int rc;

  if (imp_adjoint_solve(&p, &x, &y, NULL, &ybar, NULL, &xbar, NULL, NULL,
                        NULL) != IMP_OK)
    return 1;
  p.vjp = sq_vjp;
  rc = imp_adjoint_solve(&p, &zero, &zero, NULL, &ybar, NULL, &dummy, NULL,
                         NULL, NULL);
  printf("tiny: xbar = %g, singular: %s\n", xbar, imp_status_name(rc));
  return 0;
}

/* first.c - a root-finding layer for y = cbrt(x), the zero of
 * f(x, y) = y^3 - x, and its gradient dy/dx = 1 / (3 y^2) from the
 * implicit function theorem. */
#include <stdio.h>

#include <imp.h>

static int cube(void *ctx, const double *x, const double *y,
                const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = y[0] * y[0] * y[0] - x[0];
  return 0;
}

static int cube_vjp(void *ctx, const double *x, const double *y,
                    const double *theta, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)x, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL)
    vjp_y[0] = 3.0 * y[0] * y[0] * v[0]; /* v df/dy */
  if (vjp_x != NULL)
    vjp_x[0] -= v[0]; /* v df/dx, accumulated */
  return 0;
}

int main(void)
{
  imp_problem p = {.nx = 1, .ny = 1, .residual = cube, .vjp = cube_vjp};
  double guess = 1.0; /* Newton from 0 would meet df/dy = 0 */
  imp_root_options opt = {.solver = IMP_ROOT_NEWTON, .initial = &guess};
  imp_shape in = {.n = 2, .c = 1, .h = 1, .w = 1}; /* a batch of two */
  double x[2] = {8.0, 27.0}, y[2], ybar[2] = {1.0, 1.0}, xbar[2] = {0};
  imp_layer *layer;
  int rc;

  rc = imp_root_layer_create(&p, NULL, &opt, "cbrt", &layer);
  if (rc == IMP_OK)
    rc = imp_layer_forward(layer, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_layer_backward(layer, xbar, ybar, &in, x, y);
  if (rc != IMP_OK) {
    fprintf(stderr, "first: %s\n", imp_last_error());
    imp_layer_free(layer);
    return 1;
  }
  printf("cbrt(8) = %g, cbrt(27) = %g\n", y[0], y[1]);
  printf("d/dx: %.6f %.6f (1/12 = %.6f, 1/27 = %.6f)\n", xbar[0], xbar[1],
         1.0 / 12.0, 1.0 / 27.0);
  imp_layer_free(layer);
  return 0;
}

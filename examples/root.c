/*
 * examples/root.c - a root-finding layer on the circle.
 *
 * The layer's output y is the upper root of
 *
 *     f(x, y; r) = x^2 + y^2 - r^2 = 0,      so y = sqrt(r^2 - x^2),
 *
 * found by GSL's hybrids solver from the guess y0 = 1.  Its gradients come
 * from the implicit function theorem, one adjoint solve per sample:
 *
 *     dy/dx = -(df/dy)^-1 df/dx = -x / y,     dy/dr = r / y.
 *
 * At x = +-r, df/dy = 2y = 0: the theorem does not apply, and the layer's
 * backward reports a singular Jacobian instead of a gradient.
 *
 * The demo
 *   1. solves the unit circle (r = 1) for x across (-1, 1) and checks the
 *      backward's dy/dx against -x/y (to 1e-10) and against finite
 *      differences (imp_gradcheck, to 1e-6 relative);
 *   2. shows the singular-Jacobian error at x = +-1;
 *   3. fits r to noisy points of a circle of radius 1.5 by gradient descent
 *      through the root solve;
 *   4. draws the circle, the tangent segments dy/dx gives, the data and
 *      the fitted circle as an SVG figure.
 *
 * Usage: imp-root-demo [figure.svg]     (default root-circle.svg)
 * Progress goes to stderr, results to stdout; the exit status is non-zero
 * if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define SWEEP 19   /* points x = -0.9, -0.8, ..., 0.9 */
#define SAMPLES 32 /* training points */
#define STEPS 20   /* gradient-descent steps */
#define TRUE_RADIUS 1.5
#define NOISE 0.02

/* f(x, y; r) = x^2 + y^2 - r^2. */
static int circle_residual(void *ctx, const double *x, const double *y,
                           const double *theta, double *r)
{
  (void)ctx;
  r[0] = x[0] * x[0] + y[0] * y[0] - theta[0] * theta[0];
  return 0;
}

/* v df/dy = 2 y v, v df/dx = 2 x v, v df/dr = -2 r v. */
static int circle_vjp(void *ctx, const double *x, const double *y,
                      const double *theta, const double *v, double *vjp_y,
                      double *vjp_x, double *vjp_theta)
{
  (void)ctx;
  if (vjp_y != NULL)
    vjp_y[0] = 2.0 * y[0] * v[0];
  if (vjp_x != NULL)
    vjp_x[0] += 2.0 * x[0] * v[0];
  if (vjp_theta != NULL)
    vjp_theta[0] += -2.0 * theta[0] * v[0];
  return 0;
}

static const imp_problem circle = {.nx = 1,
                                   .ny = 1,
                                   .ntheta = 1,
                                   .residual = circle_residual,
                                   .vjp = circle_vjp};

/* y(x) through the layer, as the objective of the finite differences. */
static int height(void *ctx, const double *x, double *value)
{
  imp_shape one = {1, 1, 1, 1};

  return imp_layer_forward(ctx, &one, x, value);
}

/* Step 1: y and dy/dx across (-1, 1).  Returns the number of failed
 * checks. */
static int sweep(imp_layer *layer, double *xs, double *ys, double *slopes)
{
  imp_shape in = {SWEEP, 1, 1, 1};
  double ybar[SWEEP], err_ift = 0.0, err_fd = 0.0;
  imp_gradcheck_options fd_opt = {.floor = 1e-6};
  imp_gradcheck_result fd;
  int failures = 0;

  for (int k = 0; k < SWEEP; k++) {
    xs[k] = (k - SWEEP / 2) / 10.0;
    ybar[k] = 1.0;
    slopes[k] = 0.0;
  }
  if (imp_layer_forward(layer, &in, xs, ys) != IMP_OK ||
      imp_layer_backward(layer, slopes, ybar, &in, xs, ys) != IMP_OK) {
    fprintf(stderr, "sweep failed: %s\n", imp_last_error());
    return 1;
  }

  printf("unit circle: y = root of x^2 + y^2 - 1, dy/dx by the implicit "
         "function theorem\n");
  printf("%8s %14s %18s %18s %18s\n", "x", "y", "dy/dx (IFT)", "-x/y",
         "finite diff.");
  for (int k = 0; k < SWEEP; k++) {
    double x = xs[k], exact = -xs[k] / ys[k];

    if (imp_gradcheck(height, layer, &x, 1, &slopes[k], &fd_opt, &fd) !=
        IMP_OK) {
      fprintf(stderr, "finite differences failed: %s\n", imp_last_error());
      return 1;
    }
    printf("%8.3f %14.10f %18.12f %18.12f %18.12f\n", xs[k], ys[k], slopes[k],
           exact, fd.numeric);
    err_ift = fmax(err_ift, fabs(slopes[k] - exact));
    err_fd = fmax(err_fd, fd.max_rel_err);
  }
  printf("max |IFT - (-x/y)|            = %.2e   (check: <= 1e-10)\n", err_ift);
  printf("max relative |IFT - fin.diff| = %.2e   (check: <= 1e-6, "
         "absolute below 1e-6)\n",
         err_fd);
  failures += !(err_ift <= 1e-10);
  failures += !(err_fd <= 1e-6);
  return failures;
}

/* Step 2: at x = +-1 the forward converges, but backward must refuse. */
static int singular_points(imp_layer *layer)
{
  imp_shape one = {1, 1, 1, 1};
  int failures = 0;

  printf("\nat x = +-1, df/dy = 2y = 0:\n");
  for (int sign = -1; sign <= 1; sign += 2) {
    double x = sign, y, ybar = 1.0, xbar = 0.0;
    int rc = imp_layer_forward(layer, &one, &x, &y);

    if (rc != IMP_OK) {
      printf("  x = %+.0f: forward: %s (%s)\n", x, imp_strerror(rc),
             imp_last_error());
      failures++;
      continue;
    }
    rc = imp_layer_backward(layer, &xbar, &ybar, &one, &x, &y);
    printf("  x = %+.0f: forward finds y = %.3g; backward: %s\n    %s\n", x, y,
           imp_strerror(rc), imp_last_error());
    failures += rc != IMP_ESINGULAR;
  }
  return failures;
}

/* Step 3: fit r by gradient descent on the mean squared error of the
 * heights.  Returns the number of failed checks. */
static int fit_radius(double *data_x, double *data_y, double *radius)
{
  imp_root_options opt = {.residual_tol = 1e-12, .warm_start = 1};
  imp_shape in = {SAMPLES, 1, 1, 1};
  double y0 = 1.0, r0 = 1.0, y[SAMPLES], ybar[SAMPLES], loss = 0.0;
  double first_loss = 0.0, rate = 0.3;
  int rc = IMP_OK;
  imp_layer *layer;
  imp_rng rng;

  /* Noisy points of the upper half of a circle of radius 1.5. */
  imp_rng_seed(&rng, 2024);
  for (int i = 0; i < SAMPLES; i++) {
    data_x[i] = -0.9 + 1.8 * imp_rng_uniform(&rng);
    data_y[i] = sqrt(TRUE_RADIUS * TRUE_RADIUS - data_x[i] * data_x[i]) +
                NOISE * imp_rng_normal(&rng);
  }

  opt.initial = &y0;
  if (imp_root_layer_create(&circle, &r0, &opt, "radius", &layer) != IMP_OK) {
    fprintf(stderr, "layer: %s\n", imp_last_error());
    return 1;
  }
  printf("\nfitting r to %d noisy points of a circle of radius %.1f "
         "(gradient descent, rate %.1f):\n",
         SAMPLES, TRUE_RADIUS, rate);
  printf("%6s %12s %14s %14s\n", "step", "r", "loss", "dL/dr");

  for (int step = 0; step <= STEPS; step++) {
    double *r = imp_layer_params(layer), grad;

    /* Forward, loss, and ybar = dL/dy. */
    rc = imp_layer_forward(layer, &in, data_x, y);
    if (rc != IMP_OK)
      break;
    loss = 0.0;
    for (int i = 0; i < SAMPLES; i++) {
      loss += (y[i] - data_y[i]) * (y[i] - data_y[i]) / SAMPLES;
      ybar[i] = 2.0 * (y[i] - data_y[i]) / SAMPLES;
    }
    if (step == 0)
      first_loss = loss;

    /* Backward gives dL/dr; step r against it. */
    imp_layer_zero_grad(layer);
    rc = imp_layer_backward(layer, NULL, ybar, &in, data_x, y);
    if (rc != IMP_OK)
      break;
    grad = imp_layer_grads(layer)[0];
    if (step % 2 == 0)
      printf("%6d %12.8f %14.6e %14.6e\n", step, r[0], loss, grad);
    *radius = r[0];
    if (step < STEPS)
      r[0] -= rate * grad;
  }
  imp_layer_free(layer);
  if (rc != IMP_OK) {
    fprintf(stderr, "training stopped: %s\n", imp_last_error());
    return 1;
  }

  printf("learned radius %.6f (data drawn with %.1f, noise %.2f)\n", *radius,
         TRUE_RADIUS, NOISE);
  return !(fabs(*radius - TRUE_RADIUS) < 0.02) + !(loss < first_loss / 100);
}

/* Step 4: the figure, in plain SVG: 180 pixels per unit on a 680 x 420
 * canvas, the origin at (340, 380). */
static double px(double x)
{
  return 340.0 + 180.0 * x;
}

static double py(double y)
{
  return 380.0 - 180.0 * y;
}

static int write_figure(const char *path, const double *xs, const double *ys,
                        const double *slopes, const double *data_x,
                        const double *data_y, double radius)
{
  FILE *f = fopen(path, "w");

  if (f == NULL) {
    perror(path);
    return 1;
  }
  fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"680\" "
             "height=\"420\" viewBox=\"0 0 680 420\" "
             "font-family=\"sans-serif\" font-size=\"13\">\n");
  fprintf(f, "<rect width=\"680\" height=\"420\" fill=\"white\"/>\n");
  fprintf(f,
          "<line x1=\"0\" y1=\"%.1f\" x2=\"680\" y2=\"%.1f\" "
          "stroke=\"#999\"/>\n",
          py(0), py(0));
  fprintf(f,
          "<line x1=\"%.1f\" y1=\"0\" x2=\"%.1f\" y2=\"420\" "
          "stroke=\"#999\"/>\n",
          px(0), px(0));

  /* The unit circle, the fitted circle, and the data. */
  fprintf(f,
          "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"180\" fill=\"none\" "
          "stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n",
          px(0), py(0));
  fprintf(f,
          "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\" fill=\"none\" "
          "stroke=\"#2ca02c\" stroke-dasharray=\"6 4\"/>\n",
          px(0), py(0), 180.0 * radius);
  for (int i = 0; i < SAMPLES; i++)
    fprintf(f,
            "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" "
            "fill=\"#2ca02c\"/>\n",
            px(data_x[i]), py(data_y[i]));

  /* Tangent segments of length 0.5 along (1, dy/dx) at every third x. */
  for (int k = 0; k < SWEEP; k += 3) {
    double norm = sqrt(1.0 + slopes[k] * slopes[k]);
    double dx = 0.25 / norm, dy = 0.25 * slopes[k] / norm;

    fprintf(f,
            "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
            "stroke=\"#d62728\" stroke-width=\"2.5\"/>\n",
            px(xs[k] - dx), py(ys[k] - dy), px(xs[k] + dx), py(ys[k] + dy));
    fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"black\"/>\n",
            px(xs[k]), py(ys[k]));
  }

  /* The singular points. */
  for (int sign = -1; sign <= 1; sign += 2)
    fprintf(f,
            "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"6\" fill=\"none\" "
            "stroke=\"black\" stroke-width=\"2\"/>\n",
            px(sign), py(0));
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">df/dy = 0: singular</text>\n",
          px(1.0) + 10, py(0) + 20);
  fprintf(f, "<text x=\"10\" y=\"20\" fill=\"#1f77b4\">x\xc2\xb2 + "
             "y\xc2\xb2 = 1, tangents from the implicit function theorem "
             "(red)</text>\n");
  fprintf(f,
          "<text x=\"10\" y=\"38\" fill=\"#2ca02c\">data from r = "
          "%.1f, fitted r = %.4f (dashed)</text>\n",
          TRUE_RADIUS, radius);
  fprintf(f, "</svg>\n");
  if (fclose(f) != 0) {
    perror(path);
    return 1;
  }
  return 0;
}

int main(int argc, char **argv)
{
  const char *path = argc > 1 ? argv[1] : "root-circle.svg";
  double y0 = 1.0, r = 1.0, radius = 0.0;
  imp_root_options opt = {.residual_tol = 1e-12};
  double xs[SWEEP], ys[SWEEP], slopes[SWEEP];
  double data_x[SAMPLES], data_y[SAMPLES];
  imp_layer *layer;
  int failures = 0;

  opt.initial = &y0;
  if (imp_root_layer_create(&circle, &r, &opt, "unit circle", &layer) !=
      IMP_OK) {
    fprintf(stderr, "layer: %s\n", imp_last_error());
    return 1;
  }
  fprintf(stderr, "[1/4] solving the unit circle across (-1, 1)\n");
  failures += sweep(layer, xs, ys, slopes);
  fprintf(stderr, "[2/4] the singular points x = +-1\n");
  failures += singular_points(layer);
  imp_layer_free(layer);

  fprintf(stderr, "[3/4] fitting the radius\n");
  failures += fit_radius(data_x, data_y, &radius);
  fprintf(stderr, "[4/4] writing %s\n", path);
  failures += write_figure(path, xs, ys, slopes, data_x, data_y, radius);

  printf("\n%s (%d failed checks); figure in %s\n",
         failures == 0 ? "all checks passed" : "CHECKS FAILED", failures, path);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

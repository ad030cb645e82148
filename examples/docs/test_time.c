/*
 * examples/docs/test_time.c - test-time compute: the same DEQ, evaluated
 * with more iterations, gets closer to its fixed point.
 *
 * The layer is z* = tanh(W z* + u) with W = 0.97 Q, Q orthogonal: a slow
 * contraction, on a batch of 16 random inputs u of width 32.  Its
 * parameters never change; only the evaluation budget does
 * (imp_deq_set_budget).  For budgets of 1, 2, 4, ..., 1024 iterations the
 * program measures the distance max |z - z*| of the output to the fixed
 * point, for Picard iteration and for Anderson acceleration.
 *
 * docs/test-time.md pulls its samples from the blocks marked [name].  The
 * program checks that, for both solvers, the distance never grows as the
 * budget grows and ends below 1e-9.  With a path argument it also draws
 * the distances against the budget as an SVG figure.  It exits non-zero
 * if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

#define BATCH 16
#define WIDTH 32
#define NBUDGETS 11 /* 1, 2, 4, ..., 1024 */

/* w = rho Q for a random orthogonal Q (Gram-Schmidt on a normal matrix):
 * every singular value is rho, so the map contracts, but slowly. */
static void scaled_orthogonal(double *w, double rho, imp_rng *rng)
{
  imp_rng_fill_normal(rng, w, WIDTH * WIDTH, 0.0, 1.0);
  for (int i = 0; i < WIDTH; i++) {
    double norm = 0.0;

    for (int k = 0; k < i; k++) {
      double dot = 0.0;

      for (int j = 0; j < WIDTH; j++)
        dot += w[i * WIDTH + j] * w[k * WIDTH + j];
      for (int j = 0; j < WIDTH; j++)
        w[i * WIDTH + j] -= dot * w[k * WIDTH + j];
    }
    for (int j = 0; j < WIDTH; j++)
      norm += w[i * WIDTH + j] * w[i * WIDTH + j];
    for (int j = 0; j < WIDTH; j++)
      w[i * WIDTH + j] /= sqrt(norm);
  }
  for (int i = 0; i < WIDTH * WIDTH; i++)
    w[i] *= rho;
}

/* A DEQ layer with the given solver; the same map for every call. */
static int make_deq(const imp_fp_type *solver, imp_layer **deq)
{
  /* [layer] */
  imp_deq_options opt = {.solver = solver, /* picard or anderson */
                         .noconv_ok = 1};  /* a spent budget is not an
                                              error: we want the iterate */
  imp_layer *w = NULL, *act = NULL;
  imp_rng rng;
  int rc;

  imp_rng_seed(&rng, 21);
  rc = imp_dense_create(WIDTH, WIDTH, NULL, "W", &w); /* zero bias */
  if (rc == IMP_OK) {
    scaled_orthogonal(imp_layer_params(w), 0.97, &rng); /* ||W||_2 = 0.97 */
    rc = imp_dense_set_lipschitz(w, 0.97, 2);           /* and it stays so */
  }
  if (rc == IMP_OK)
    rc = imp_activation_create(IMP_ACT_TANH, NULL, &act);
  if (rc == IMP_OK)
    rc = imp_deq_create_from_layers(WIDTH, w, act, &opt, "deq", deq);
  if (rc != IMP_OK) {
    imp_layer_free(w);
    imp_layer_free(act);
  }
  /* [layer] */
  return rc;
}

/* The distances of the outputs to z* for each budget; z* is the
 * evaluation at a budget of 1000 iterations and rtol 1e-14. */
static int sweep(const imp_fp_type *solver, const double *u, double *distance)
{
  imp_shape in = {BATCH, WIDTH, 1, 1};
  static double z[BATCH * WIDTH], zstar[BATCH * WIDTH];
  imp_deq_budget exact = {.max_iter = 5000, .rtol = 1e-14};
  imp_layer *deq = NULL;
  int rc = make_deq(solver, &deq);

  if (rc == IMP_OK) {
    imp_layer_set_training(deq, 0);
    rc = imp_deq_set_budget(deq, 0, &exact);
  }
  if (rc == IMP_OK)
    rc = imp_layer_forward(deq, &in, u, zstar);

  for (int b = 0; rc == IMP_OK && b < NBUDGETS; b++) {
    /* [budget] */
    imp_deq_budget budget = {.max_iter = (size_t)1 << b, .rtol = 1e-14};

    rc = imp_deq_set_budget(deq, 0, &budget); /* evaluation budget */
    if (rc == IMP_OK)
      rc = imp_layer_forward(deq, &in, u, z); /* same parameters */
    /* [budget] */
    distance[b] = 0.0;
    for (size_t i = 0; i < BATCH * WIDTH; i++)
      distance[b] = fmax(distance[b], fabs(z[i] - zstar[i]));
  }
  imp_layer_free(deq);
  return rc;
}

static int write_svg(const char *path, const double *picard,
                     const double *anderson)
{
  const double left = 80, right = 600, top = 40, bottom = 320;
  const double *curves[2] = {picard, anderson};
  const char *colours[2] = {"#1f77b4", "#d62728"};
  const char *names[2] = {"Picard", "Anderson (m = 5)"};
  FILE *f = fopen(path, "w");

  if (f == NULL)
    return -1;
  fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" "
             "height=\"380\" viewBox=\"0 0 640 380\" font-family=\"DejaVu "
             "Sans, sans-serif\" font-size=\"13\">\n"
             "<rect width=\"640\" height=\"380\" fill=\"white\"/>\n");
  fprintf(f, "<text x=\"340\" y=\"24\" text-anchor=\"middle\" "
             "font-size=\"15\">The same DEQ, more test-time "
             "iterations</text>\n");
  for (int e = 0; e >= -14; e -= 2) { /* one grid line per 100x */
    double y = top + (bottom - top) * (-e) / 14.0;

    fprintf(f,
            "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" "
            "stroke=\"#e4e4e4\"/>\n<text x=\"%.0f\" y=\"%.1f\" "
            "text-anchor=\"end\">1e%d</text>\n",
            left, y, right, y, left - 6, y + 4, e);
  }
  for (int b = 0; b < NBUDGETS; b++) {
    double x = left + (right - left) * b / (NBUDGETS - 1.0);

    fprintf(f, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d</text>\n",
            x, bottom + 18, 1 << b);
  }
  fprintf(f,
          "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" "
          "fill=\"none\" stroke=\"black\"/>\n",
          left, top, right - left, bottom - top);
  fprintf(f, "<text x=\"340\" y=\"365\" text-anchor=\"middle\">iteration "
             "budget at evaluation (log scale)</text>\n");
  fprintf(f, "<text transform=\"translate(22 180) rotate(-90)\" "
             "text-anchor=\"middle\">max |z - z*|</text>\n");
  for (int s = 0; s < 2; s++) {
    fprintf(f,
            "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" "
            "points=\"",
            colours[s]);
    for (int b = 0; b < NBUDGETS; b++) {
      double d = fmax(curves[s][b], 1e-14);

      fprintf(f, "%s%.1f,%.1f", b ? " " : "",
              left + (right - left) * b / (NBUDGETS - 1.0),
              top + (bottom - top) * (-log10(d)) / 14.0);
    }
    fprintf(f, "\"/>\n<text x=\"%.0f\" y=\"%d\" fill=\"%s\">%s</text>\n",
            right - 150, 70 + 20 * s, colours[s], names[s]);
  }
  fprintf(f, "</svg>\n");
  return fclose(f) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
  static double u[BATCH * WIDTH];
  double picard[NBUDGETS], anderson[NBUDGETS];
  int failures = 0, rc;
  imp_rng rng;

  imp_rng_seed(&rng, 4);
  imp_rng_fill_normal(&rng, u, BATCH * WIDTH, 0.0, 0.1);
  rc = sweep(imp_fp_picard, u, picard);
  if (rc == IMP_OK)
    rc = sweep(imp_fp_anderson, u, anderson);
  if (rc != IMP_OK) {
    fprintf(stderr, "test-time: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  printf("%8s %16s %16s\n", "budget", "Picard |z - z*|", "Anderson");
  for (int b = 0; b < NBUDGETS; b++) {
    printf("%8d %16.3e %16.3e\n", 1 << b, picard[b], anderson[b]);
    if (b > 0)
      failures += !(picard[b] <= picard[b - 1] &&
                    anderson[b] <= anderson[b - 1] + 1e-15);
  }
  failures += !(picard[NBUDGETS - 1] <= 1e-9);
  failures += !(anderson[NBUDGETS - 1] <= 1e-9);
  if (argc > 1 && write_svg(argv[1], picard, anderson) != 0) {
    fprintf(stderr, "test-time: cannot write %s\n", argv[1]);
    failures++;
  }
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

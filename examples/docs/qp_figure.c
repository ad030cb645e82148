/*
 * examples/docs/qp_figure.c - the QP layer's output and derivative, drawn.
 *
 * The layer is the projection onto the segment {z >= 0, z1 + z2 = 1}:
 *
 *     z*(x) = argmin 1/2 |z - x|^2  s.t.  z1 + z2 = 1,  z >= 0,
 *
 * a QP with Q = I, p = -x (the input), A = (1, 1), b = 1, G = -I, h = 0.
 * For a grid of points x the program draws the arrow from x to z*(x),
 * coloured by the active set, and writes beside each region the
 * derivative dz1/dx1 that the layer's backward returns there: 1/2 where
 * both constraints z >= 0 are inactive (z moves along the segment at half
 * the speed of x), 0 where one is active (z sits in a corner).
 *
 * docs/qp.md shows the figure.  The program checks every z* against the
 * projection computed by hand (to 1e-8) and every derivative against 1/2
 * or 0 (to 1e-6), skipping grid points within 1e-3 of a region boundary.
 * Usage: docs-qp-figure [figure.svg]; it exits non-zero if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"
#include "imp/qp.h"

#define GRID 9 /* points per axis on [-1, 2] */
#define NPOINTS (GRID * GRID)

static double coord(int k)
{
  return -1.0 + 3.0 * k / (GRID - 1.0) + 0.013; /* off the boundaries */
}

/* The exact projection onto the segment and dz1/dx1 there. */
static void exact(const double *x, double *z, double *dz1)
{
  double t = 0.5 * (x[0] - x[1] + 1.0); /* z = (t, 1 - t) on the line */

  *dz1 = t > 0.0 && t < 1.0 ? 0.5 : 0.0;
  t = fmin(fmax(t, 0.0), 1.0);
  z[0] = t;
  z[1] = 1.0 - t;
}

static double px(double x)
{
  return 60.0 + 140.0 * (x + 1.0);
}

static double py(double y)
{
  return 480.0 - 140.0 * (y + 1.0);
}

static int write_svg(const char *path, const double *x, const double *z,
                     const double *dz1)
{
  FILE *f = fopen(path, "w");

  if (f == NULL)
    return -1;
  fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" "
             "height=\"520\" viewBox=\"0 0 720 520\" font-family=\"DejaVu "
             "Sans, sans-serif\" font-size=\"13\">\n"
             "<rect width=\"720\" height=\"520\" fill=\"white\"/>\n");
  fprintf(f, "<text x=\"270\" y=\"24\" text-anchor=\"middle\" "
             "font-size=\"15\">QP layer: z*(x) = projection of x onto "
             "{z &#8805; 0, z1 + z2 = 1}</text>\n");
  fprintf(f,
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
          "stroke=\"#999\"/>\n<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" "
          "y2=\"%.1f\" stroke=\"#999\"/>\n",
          px(-1), py(0), px(2), py(0), px(0), py(-1), px(0), py(2));
  fprintf(f,
          "<text x=\"%.1f\" y=\"%.1f\">x1</text>\n<text x=\"%.1f\" "
          "y=\"%.1f\">x2</text>\n",
          px(2) + 6, py(0) + 4, px(0) - 8, py(2) - 8);
  for (int i = 0; i < NPOINTS; i++) {
    const char *colour = dz1[i] > 0.25 ? "#1f77b4" : "#d62728";

    fprintf(f,
            "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
            "stroke=\"%s\" stroke-opacity=\"0.6\"/>\n"
            "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n",
            px(x[2 * i]), py(x[2 * i + 1]), px(z[2 * i]), py(z[2 * i + 1]),
            colour, px(x[2 * i]), py(x[2 * i + 1]), colour);
  }
  fprintf(f,
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
          "stroke=\"black\" stroke-width=\"4\"/>\n",
          px(1), py(0), px(0), py(1));
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">the feasible segment</text>\n",
          px(0.55), py(0.62));
  fprintf(f, "<text x=\"510\" y=\"120\" fill=\"#1f77b4\">&#8706;z1/&#8706;x1 "
             "= 1/2:</text>\n<text x=\"510\" y=\"138\" "
             "fill=\"#1f77b4\">z inside the segment</text>\n");
  fprintf(f, "<text x=\"510\" y=\"180\" fill=\"#d62728\">&#8706;z1/&#8706;x1 "
             "= 0:</text>\n<text x=\"510\" y=\"198\" fill=\"#d62728\">z at "
             "a corner (z1 or z2 = 0)</text>\n");
  fprintf(f, "<text x=\"510\" y=\"250\" fill=\"#444\">dots: inputs x; "
             "lines:</text>\n<text x=\"510\" y=\"268\" fill=\"#444\">to "
             "the layer's output z*(x)</text>\n");
  fprintf(f, "<text x=\"510\" y=\"300\" fill=\"#444\">derivatives from the "
             "layer's</text>\n<text x=\"510\" y=\"318\" "
             "fill=\"#444\">backward (KKT adjoint)</text>\n");
  fprintf(f, "</svg>\n");
  return fclose(f) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
  static const double eye[4] = {1, 0, 0, 1}, minus_eye[4] = {-1, 0, 0, -1};
  static const double ones[2] = {1, 1}, one[1] = {1}, zeros[2] = {0, 0};
  imp_qp_layer_config segment = {
      .dims = {.nz = 2, .nineq = 2, .neq = 1},
      .input = IMP_QP_P,
      .values = {.Q = eye, .A = ones, .b = one, .G = minus_eye, .h = zeros},
  };
  static double x[2 * NPOINTS], p[2 * NPOINTS], z[2 * NPOINTS];
  static double zbar[2 * NPOINTS], pbar[2 * NPOINTS], dz1[NPOINTS];
  imp_shape in = {NPOINTS, 2, 1, 1};
  imp_layer *qp = NULL;
  int failures = 0, rc;

  for (int i = 0; i < NPOINTS; i++) {
    x[2 * i] = coord(i % GRID);
    x[2 * i + 1] = coord(i / GRID);
    p[2 * i] = -x[2 * i]; /* p = -x: 1/2 |z|^2 - x^T z */
    p[2 * i + 1] = -x[2 * i + 1];
    zbar[2 * i] = 1.0; /* seed: d z1 */
    zbar[2 * i + 1] = 0.0;
  }
  rc = imp_qp_layer_create(&segment, "segment", &qp);
  if (rc == IMP_OK)
    rc = imp_layer_forward(qp, &in, p, z);
  if (rc == IMP_OK)
    rc = imp_layer_backward(qp, pbar, zbar, &in, p, z);
  imp_layer_free(qp);
  if (rc != IMP_OK) {
    fprintf(stderr, "qp figure: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  for (int i = 0; i < NPOINTS; i++) {
    double ze[2], de, t = 0.5 * (x[2 * i] - x[2 * i + 1] + 1.0);

    dz1[i] = -pbar[2 * i]; /* dz1/dx1 = -dz1/dp1 */
    exact(x + 2 * i, ze, &de);
    failures += !(fabs(z[2 * i] - ze[0]) <= 1e-8);
    failures += !(fabs(z[2 * i + 1] - ze[1]) <= 1e-8);
    if (fabs(t) > 1e-3 && fabs(t - 1.0) > 1e-3)
      failures += !(fabs(dz1[i] - de) <= 1e-6);
  }
  printf("%d points: outputs and derivatives %s the exact projection\n",
         NPOINTS, failures == 0 ? "match" : "DO NOT MATCH");
  if (argc > 1) {
    if (write_svg(argv[1], x, z, dz1) != 0) {
      fprintf(stderr, "qp figure: cannot write %s\n", argv[1]);
      return EXIT_FAILURE;
    }
    printf("wrote %s\n", argv[1]);
  }
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

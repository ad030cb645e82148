/*
 * examples/deq.c - a deep equilibrium layer fitted to a curve, and its
 * three fixed-point solvers compared.
 *
 * The layer's output is the fixed point z* of the weight-tied map
 *
 *     z = h(x, z) = tanh(W z + U x + b),     z in R^24, x in R,
 *
 * and a linear readout y = c . z* + d predicts the target
 *
 *     t(x) = sin(3 x) exp(-x^2 / 4)   on [-2, 2].
 *
 * The map contracts with factor at most ||W||_2 (|tanh'| <= 1), so
 * training keeps ||W||_2 <= 0.95 by rescaling W after each Adam step
 * whenever the power-iteration estimate of ||W||_2 (imp_spectral_norm)
 * exceeds it: a projection onto that ball.  The fixed point then exists, is
 * unique and every solver reaches it.  The gradient of the loss in
 * theta = (W, U, b) and in x comes from the implicit function theorem: the
 * adjoint fixed point u = (dh/dz)^T u + zbar at z*, solved with the
 * forward's solver.
 *
 * The demo
 *   1. trains theta and (c, d) jointly with Adam on 64 points;
 *   2. solves the trained DEQ to 1e-12 with Picard, Anderson (m = 5) and
 *      Broyden (m = 5) and prints each solver's worst relative residual
 *      ||h(z) - z|| / ||h(z)|| per iteration and its evaluations of h;
 *   3. checks the implicit gradient of the held-out loss, in theta and in
 *      the inputs, against finite differences (imp_gradcheck; fails above
 *      1e-6 relative);
 *   4. draws the convergence curves as an SVG figure.
 *
 * Usage: imp-deq-demo [figure.svg]     (default deq-convergence.svg)
 * Progress goes to stderr, results to stdout; the exit status is non-zero
 * if a check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imp.h"
#include "imp/blocks.h"
#include "imp/deq.h"

#define NZ 24     /* state width */
#define NX 1      /* input width */
#define NTRAIN 64 /* training points on [-2, 2] */
#define NTEST 16  /* held-out points, between the training points */
#define NTHETA (NZ * NZ + NZ * NX + NZ)
#define NPARAM (NTHETA + NZ + 1) /* theta, then the readout c and d */
#define STEPS 600
#define LEARNING_RATE 1e-2
#define W_BOUND 0.95       /* the projection's radius in ||W||_2 */
#define TRACE_RTOL 1e-12   /* tolerance of the solver comparison */
#define TRACE_BUDGET 400   /* its iteration budget */
#define GRADCHECK_TOL 1e-6 /* the implicit gradient, relative */

static double target(double x)
{
  return sin(3.0 * x) * exp(-0.25 * x * x);
}

/* ------------------------------------------------------------------ */
/* The map h(x, z) = tanh(W z + U x + b), theta = (W, U, b), written with
 * the raw dense blocks on the whole batch the solver hands over. */

typedef struct tanh_map {
  imp_workspace ws; /* 3 n NZ: the image, U x, and tanh' v */
} tanh_map;

static int tanh_forward(void *ctx, const imp_shape *xs, const double *x,
                        const imp_shape *zs, const double *z,
                        const double *theta, double *out)
{
  tanh_map *t = ctx;
  const double *w = theta, *u = theta + NZ * NZ, *b = u + NZ * NX;
  size_t n = zs->n, nz = n * NZ;
  double *ux;

  (void)xs;
  if (imp_workspace_reserve(&t->ws, 3 * nz) != IMP_OK)
    return 1;
  ux = t->ws.data + nz;

  /* out = W z + b, plus U x, through tanh. */
  if (imp_dense_apply(w, b, 1.0, NZ, NZ, n, z, out) != IMP_OK ||
      imp_dense_apply(u, NULL, 1.0, NX, NZ, n, x, ux) != IMP_OK ||
      imp_add(nz, out, ux, out) != IMP_OK ||
      imp_activation_apply(IMP_ACT_TANH, nz, out, out) != IMP_OK)
    return 2;
  return 0;
}

/* With delta = v (1 - h^2): vjp_z = W^T delta, vjp_x += U^T delta,
 * (W, U, b)bar += (delta z^T, delta x^T, delta), summed over the batch. */
static int tanh_vjp(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    const double *v, double *vjp_z, double *vjp_x,
                    double *vjp_theta)
{
  tanh_map *t = ctx;
  const double *w = theta, *u = theta + NZ * NZ;
  double *wbar = vjp_theta, *ubar = NULL, *bbar = NULL, *h, *delta;
  size_t n = zs->n, nz = n * NZ;

  /* h(x, z) again (into the last third of the scratch), then tanh' v. */
  if (imp_workspace_reserve(&t->ws, 3 * nz) != IMP_OK)
    return 1;
  h = t->ws.data + 2 * nz;
  delta = t->ws.data;
  if (tanh_forward(ctx, xs, x, zs, z, theta, h) != 0)
    return 1;
  for (size_t i = 0; i < nz; i++)
    delta[i] = v[i] * (1.0 - h[i] * h[i]);

  /* The two dense pieces' backward passes accumulate; vjp_z starts at 0. */
  if (vjp_theta != NULL) {
    ubar = vjp_theta + NZ * NZ;
    bbar = ubar + NZ * NX;
  }
  if (vjp_z != NULL)
    memset(vjp_z, 0, nz * sizeof(double));
  if (imp_dense_apply_backward(vjp_z, wbar, bbar, delta, w, 1.0, NZ, NZ, n,
                               z) != IMP_OK ||
      imp_dense_apply_backward(vjp_x, ubar, NULL, delta, u, 1.0, NX, NZ, n,
                               x) != IMP_OK)
    return 2;
  return 0;
}

static int make_deq(tanh_map *ctx, const imp_deq_options *opt,
                    const double *theta, const char *name, imp_layer **out)
{
  imp_deq_map map = {.ntheta = NTHETA,
                     .x_channels = NX,
                     .z_channels = NZ,
                     .map = tanh_forward,
                     .vjp = tanh_vjp,
                     .ctx = ctx};

  return imp_deq_create(&map, theta, opt, name, out);
}

/* ------------------------------------------------------------------ */
/* The readout and the loss. */

/* L = mean (c . z_i + d - t_i)^2 over n points.  With zbar (may be NULL)
 * the cotangent dL/dz is written and dL/dc, dL/dd are added to gc. */
static double readout_loss(const double *c, size_t n, const double *z,
                           const double *t, double *zbar, double *gc)
{
  double loss = 0.0;

  for (size_t i = 0; i < n; i++) {
    double y = c[NZ], e;

    for (size_t k = 0; k < NZ; k++)
      y += c[k] * z[i * NZ + k];
    e = y - t[i];
    loss += e * e / (double)n;
    if (zbar == NULL)
      continue;
    for (size_t k = 0; k < NZ; k++) {
      zbar[i * NZ + k] = 2.0 * e / (double)n * c[k];
      gc[k] += 2.0 * e / (double)n * z[i * NZ + k];
    }
    gc[NZ] += 2.0 * e / (double)n;
  }
  return loss;
}

/* Scale W down onto the ball ||W||_2 <= W_BOUND.  The power iteration
 * keeps its vector between calls, so a few steps track a W that moves a
 * little per update. */
static int project(imp_spectral *sp, double *w, int iterations)
{
  double sigma;
  int rc = imp_spectral_norm(sp, w, iterations, &sigma);

  for (size_t i = 0; rc == IMP_OK && sigma > W_BOUND && i < NZ * NZ; i++)
    w[i] *= W_BOUND / sigma;
  return rc;
}

/* The data: training points evenly on [-2, 2], test points halfway. */
typedef struct dataset {
  double x[NTRAIN], t[NTRAIN];
  double xt[NTEST], tt[NTEST];
} dataset;

static void make_data(dataset *ds)
{
  for (size_t i = 0; i < NTRAIN; i++) {
    ds->x[i] = -2.0 + 4.0 * (double)i / (NTRAIN - 1);
    ds->t[i] = target(ds->x[i]);
  }
  for (size_t i = 0; i < NTEST; i++) {
    ds->xt[i] = -2.0 + 4.0 * ((double)i + 0.5) / NTEST;
    ds->tt[i] = target(ds->xt[i]);
  }
}

static int report(const char *what, int rc)
{
  if (rc != IMP_OK)
    fprintf(stderr, "deq demo: %s failed: %s (%s)\n", what, imp_status_name(rc),
            imp_last_error());
  return rc;
}

/* The loss on the test points, through a layer in training mode. */
static int test_loss(imp_layer *deq, const double *c, const dataset *ds,
                     double *loss)
{
  imp_shape in = {NTEST, NX, 1, 1};
  double z[NTEST * NZ];
  int rc = imp_layer_forward(deq, &in, ds->xt, z);

  if (rc == IMP_OK)
    *loss = readout_loss(c, NTEST, z, ds->tt, NULL, NULL);
  return rc;
}

/* ------------------------------------------------------------------ */
/* 1. Training. */

static int train(imp_layer *deq, double *params, double *grads,
                 const dataset *ds)
{
  imp_shape in = {NTRAIN, NX, 1, 1};
  double z[NTRAIN * NZ], zbar[NTRAIN * NZ], loss = 0.0;
  imp_optim_options oo = imp_optim_defaults();
  imp_optim *adam = NULL;
  imp_spectral *sp = NULL;
  imp_deq_stats st;
  size_t iters = 0, adjoint_iters = 0;
  double sigma = 0.0, rho = 0.0;
  int rc;

  oo.lr = LEARNING_RATE;
  rc = imp_optim_create(imp_optim_adam, NPARAM, &oo, &adam);
  if (rc == IMP_OK)
    rc = imp_spectral_create_dense(NZ, NZ, 7, &sp);
  if (rc == IMP_OK)
    rc = project(sp, params, 50);
  if (rc != IMP_OK) {
    imp_optim_free(adam);
    return report("optimizer", rc);
  }

  for (int step = 0; step < STEPS && rc == IMP_OK; step++) {
    /* Forward through the solve, the loss, then the adjoint solve. */
    memset(grads, 0, NPARAM * sizeof(double));
    rc = report("forward", imp_layer_forward(deq, &in, ds->x, z));
    if (rc != IMP_OK)
      break;
    loss =
        readout_loss(params + NTHETA, NTRAIN, z, ds->t, zbar, grads + NTHETA);
    imp_deq_get_stats(deq, &st);
    iters += st.iterations;
    rc = report("backward", imp_layer_backward(deq, NULL, zbar, &in, ds->x, z));
    if (rc != IMP_OK)
      break;
    imp_deq_get_stats(deq, &st);
    adjoint_iters += st.backward_iterations;

    /* Adam on everything, then back into the contraction ball. */
    rc = report("adam", imp_optim_step(adam, params, grads, NPARAM));
    if (rc == IMP_OK)
      rc = report("projection", project(sp, params, 5));
    if ((step + 1) % 100 == 0) {
      fprintf(stderr,
              "step %4d  loss %.3e  mean iterations: forward %.1f, "
              "adjoint %.1f\n",
              step + 1, loss, (double)iters / 100.0,
              (double)adjoint_iters / 100.0);
      iters = adjoint_iters = 0;
    }
  }
  /* The final loss, ||W||_2, and the local rate at the fixed points. */
  if (rc == IMP_OK)
    rc = report("forward", imp_layer_forward(deq, &in, ds->x, z));
  if (rc == IMP_OK)
    loss = readout_loss(params + NTHETA, NTRAIN, z, ds->t, NULL, NULL);
  if (rc == IMP_OK)
    rc = report("spectral norm", imp_spectral_norm(sp, params, 200, &sigma));
  if (rc == IMP_OK)
    rc = report("spectral radius",
                imp_deq_spectral_radius(deq, ds->x, 200, &rho));
  imp_optim_free(adam);
  imp_spectral_free(sp);
  if (rc == IMP_OK)
    printf("trained %d Adam steps: training loss %.3e (rms %.3e)\n"
           "||W||_2 = %.4f; spectral radius of dh/dz at the fixed points "
           "%.4f\n",
           STEPS, loss, sqrt(loss), sigma, rho);
  return rc;
}

/* ------------------------------------------------------------------ */
/* 2. The solvers at the trained parameters. */

#define NSOLVERS 3

typedef struct curve {
  const char *name;
  double trace[TRACE_BUDGET];
  size_t len, iterations, evaluations;
  double residual;
  int converged;
} curve;

static int solve_with(const imp_fp_type *solver, const double *theta,
                      const dataset *ds, curve *cv)
{
  imp_deq_options opt = {.solver = solver,
                         .eval = {.max_iter = TRACE_BUDGET, .rtol = TRACE_RTOL},
                         .noconv_ok = 1};
  imp_shape in = {NTRAIN, NX, 1, 1};
  double z[NTRAIN * NZ];
  tanh_map ctx = {IMP_WORKSPACE_INIT};
  imp_deq_stats st;
  imp_layer *deq = NULL;
  int rc;

  rc = report("create", make_deq(&ctx, &opt, theta, solver->name, &deq));
  if (rc != IMP_OK)
    return rc;
  imp_layer_set_training(deq, 0);
  rc = report(solver->name, imp_layer_forward(deq, &in, ds->x, z));
  if (rc == IMP_OK) {
    imp_deq_get_stats(deq, &st);
    cv->name = solver->name;
    cv->len = st.trace_len;
    memcpy(cv->trace, st.trace, st.trace_len * sizeof(double));
    cv->iterations = st.iterations;
    cv->evaluations = st.evaluations;
    cv->residual = st.rel_residual;
    cv->converged = st.forward_status == IMP_OK;
  }
  imp_layer_free(deq);
  imp_workspace_free(&ctx.ws);
  return rc;
}

static void print_table(const curve *cv)
{
  static const size_t rows[] = {0,  1,  2,  3,   5,   10,  15, 20,
                                30, 50, 75, 100, 150, 200, 300};
  size_t nrows = sizeof rows / sizeof rows[0];

  printf("\nworst relative residual ||h(z) - z|| / ||h(z)|| over the %d "
         "points, per iteration\n(solved to %.0e; '-' once converged)\n",
         NTRAIN, TRACE_RTOL);
  printf("%9s", "iteration");
  for (int s = 0; s < NSOLVERS; s++)
    printf("  %10s", cv[s].name);
  printf("\n");
  for (size_t r = 0; r < nrows; r++) {
    int active = 0;

    for (int s = 0; s < NSOLVERS; s++)
      active |= rows[r] < cv[s].len;
    if (!active)
      break;
    printf("%9zu", rows[r]);
    for (int s = 0; s < NSOLVERS; s++)
      if (rows[r] < cv[s].len)
        printf("  %10.2e", cv[s].trace[rows[r]]);
      else
        printf("  %10s", "-");
    printf("\n");
  }
  printf("\n%-9s  %10s  %12s  %10s\n", "solver", "iterations", "evaluations",
         "residual");
  for (int s = 0; s < NSOLVERS; s++)
    printf("%-9s  %10zu  %12zu  %10.2e%s\n", cv[s].name, cv[s].iterations,
           cv[s].evaluations, cv[s].residual,
           cv[s].converged ? "" : "  (budget exhausted)");
  printf("(evaluations of h summed over the %d points: a converged point\n"
         "drops out of the batch)\n",
         NTRAIN);
}

/* ------------------------------------------------------------------ */
/* 3. The implicit gradient against finite differences. */

/* The test loss as a function of (theta, x_test), readout fixed. */
typedef struct check_ctx {
  imp_layer *deq;
  const double *c;
  dataset ds;
} check_ctx;

static int check_objective(void *ctx, const double *p, double *value)
{
  check_ctx *k = ctx;

  memcpy(imp_layer_params(k->deq), p, NTHETA * sizeof(double));
  memcpy(k->ds.xt, p + NTHETA, NTEST * sizeof(double));
  return test_loss(k->deq, k->c, &k->ds, value);
}

static int gradient_check(const double *params, const dataset *ds, int *ok)
{
  imp_deq_options opt = {.train = {.max_iter = 400, .rtol = 1e-13},
                         .adjoint = {.max_iter = 400, .rtol = 1e-13}};
  imp_shape in = {NTEST, NX, 1, 1};
  double p[NTHETA + NTEST], g[NTHETA + NTEST] = {0};
  double z[NTEST * NZ], zbar[NTEST * NZ], gc[NZ + 1] = {0};
  tanh_map map = {IMP_WORKSPACE_INIT};
  check_ctx k = {.c = params + NTHETA, .ds = *ds};
  imp_gradcheck_options go = {0};
  imp_gradcheck_result res;
  imp_deq_stats st;
  double gmax = 0.0;
  int rc;

  /* The analytic gradient: one forward, one adjoint solve. */
  rc = report("create", make_deq(&map, &opt, params, "check", &k.deq));
  if (rc != IMP_OK)
    return rc;
  rc = report("forward", imp_layer_forward(k.deq, &in, ds->xt, z));
  if (rc == IMP_OK) {
    double loss = readout_loss(k.c, NTEST, z, ds->tt, zbar, gc);

    printf("\nheld-out loss on %d points: %.3e (rms %.3e)\n", NTEST, loss,
           sqrt(loss));
    rc = report("backward",
                imp_layer_backward(k.deq, g + NTHETA, zbar, &in, ds->xt, z));
  }
  if (rc == IMP_OK) {
    imp_deq_get_stats(k.deq, &st);
    memcpy(g, imp_layer_grads(k.deq), NTHETA * sizeof(double));
    memcpy(p, params, NTHETA * sizeof(double));
    memcpy(p + NTHETA, ds->xt, NTEST * sizeof(double));

    /* Fourth-order central differences of the same loss.  Entries below
     * 1e-4 of the largest are compared absolutely, at that scale: the
     * differences carry an absolute error of about 1e-14 from the solves'
     * rounding, a relative error above 1e-6 for the entries near 1e-8,
     * which says nothing about the gradient. */
    for (size_t i = 0; i < NTHETA + NTEST; i++)
      gmax = fmax(gmax, fabs(g[i]));
    go.floor = 1e-4 * gmax;
    rc = report("gradcheck", imp_gradcheck(check_objective, &k, p,
                                           NTHETA + NTEST, g, &go, &res));
  }
  if (rc == IMP_OK) {
    *ok = res.max_rel_err <= GRADCHECK_TOL;
    printf("gradient check of the implicit gradient (adjoint fixed point, "
           "%zu iterations,\nresidual %.1e) in %d parameters and %d inputs "
           "against 4th-order finite\ndifferences: worst relative error "
           "%.2e at entry %zu (analytic %.6e,\nnumeric %.6e; entries "
           "below %.1e compared absolutely),\ntolerance %.0e: %s\n",
           st.backward_iterations, st.backward_residual, NTHETA, NTEST,
           res.max_rel_err, res.worst, res.analytic, res.numeric, go.floor,
           GRADCHECK_TOL, *ok ? "passed" : "FAILED");
  }
  imp_layer_free(k.deq);
  imp_workspace_free(&map.ws);
  return rc;
}

/* ------------------------------------------------------------------ */
/* 4. The figure: residual against iteration, log scale. */

#define SVG_W 720
#define SVG_H 450
#define PLOT_L 86 /* plot area: left, right, top, bottom */
#define PLOT_R 690
#define PLOT_T 48
#define PLOT_B 390

static const char *const colours[NSOLVERS] = {"#1f77b4", "#d62728", "#2ca02c"};

/* A tick step of 1, 2 or 5 times a power of ten giving at most 10 ticks
 * up to n. */
static size_t tick_step(size_t n)
{
  size_t step = 1;

  for (;;) {
    if (n <= 10 * step)
      return step;
    if (n <= 20 * step)
      return 2 * step;
    if (n <= 50 * step)
      return 5 * step;
    step *= 10;
  }
}

static int write_svg(const char *path, const curve *cv, double tol)
{
  FILE *f = fopen(path, "w");
  size_t xmax = 0, xstep;
  int dmin = 0, dmax = 0; /* decades shown */
  double pw = PLOT_R - PLOT_L, ph = PLOT_B - PLOT_T;

  if (f == NULL) {
    fprintf(stderr, "deq demo: cannot write %s\n", path);
    return -1;
  }
  /* The axes' ranges: whole ticks in x, whole decades in y (down to the
   * smallest residual, at most 16 decades). */
  for (int s = 0; s < NSOLVERS; s++) {
    if (cv[s].len > xmax)
      xmax = cv[s].len;
    for (size_t it = 0; it < cv[s].len; it++)
      if (cv[s].trace[it] > 0.0 && log10(cv[s].trace[it]) < dmin)
        dmin = (int)floor(log10(cv[s].trace[it]));
  }
  dmin = dmin < -16 ? -16 : dmin;
  xstep = tick_step(xmax);
  xmax = (xmax + xstep - 1) / xstep * xstep;

#define X_OF(it) (PLOT_L + pw * (double)(it) / (double)xmax)
#define Y_OF(r)                                                                \
  (PLOT_B - ph * (log10(fmax(r, 1e-300)) - dmin) / (double)(dmax - dmin))

  fprintf(f,
          "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" "
          "height=\"%d\" viewBox=\"0 0 %d %d\" font-family=\"DejaVu Sans, "
          "Helvetica, Arial, sans-serif\" font-size=\"13\">\n",
          SVG_W, SVG_H, SVG_W, SVG_H);
  fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
  fprintf(f,
          "<text x=\"%d\" y=\"26\" text-anchor=\"middle\" "
          "font-size=\"15\">DEQ z = tanh(Wz + Ux + b), width %d: "
          "convergence at the trained parameters</text>\n",
          (PLOT_L + PLOT_R) / 2, NZ);

  /* Grid and tick labels: a line per decade, a tick every xstep. */
  for (int e = dmin; e <= dmax; e++) {
    double y = PLOT_B - ph * (e - dmin) / (double)(dmax - dmin);

    fprintf(f,
            "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" "
            "stroke=\"#e4e4e4\"/>\n",
            PLOT_L, y, PLOT_R, y);
    if ((e - dmin) % 2 == 0 || e == dmax)
      fprintf(f,
              "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">10<tspan "
              "dy=\"-6\" font-size=\"10\">%d</tspan></text>\n",
              PLOT_L - 8, y + 4.5, e);
  }
  for (size_t it = 0; it <= xmax; it += xstep) {
    double x = X_OF(it);

    fprintf(f,
            "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" "
            "stroke=\"#e4e4e4\"/>\n",
            x, PLOT_T, x, PLOT_B);
    fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%zu</text>\n",
            x, PLOT_B + 18, it);
  }

  /* The tolerance, the axes and their labels. */
  fprintf(f,
          "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" "
          "stroke=\"#888\" stroke-dasharray=\"5,4\"/>\n",
          PLOT_L, Y_OF(tol), PLOT_R, Y_OF(tol));
  fprintf(f,
          "<text x=\"%d\" y=\"%.1f\" fill=\"#666\" font-size=\"11\">"
          "tolerance %.0e</text>\n",
          PLOT_L + 6, Y_OF(tol) - 5, tol);
  fprintf(f,
          "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" "
          "fill=\"none\" stroke=\"black\"/>\n",
          PLOT_L, PLOT_T, PLOT_R - PLOT_L, PLOT_B - PLOT_T);
  fprintf(f,
          "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">iteration"
          "</text>\n",
          (PLOT_L + PLOT_R) / 2, PLOT_B + 44);
  fprintf(f,
          "<text transform=\"translate(24 %d) rotate(-90)\" "
          "text-anchor=\"middle\">worst relative residual "
          "\u2016h(z) \u2212 z\u2016 / \u2016h(z)\u2016</text>\n",
          (PLOT_T + PLOT_B) / 2);

  /* One polyline per solver. */
  for (int s = 0; s < NSOLVERS; s++) {
    fprintf(f,
            "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" "
            "stroke-linejoin=\"round\" points=\"",
            colours[s]);
    for (size_t it = 0; it < cv[s].len; it++)
      fprintf(f, "%s%.1f,%.1f", it ? " " : "", X_OF(it),
              Y_OF(fmax(cv[s].trace[it], pow(10.0, dmin))));
    fprintf(f, "\"/>\n");
  }

  /* The legend, top right. */
  fprintf(f,
          "<rect x=\"%d\" y=\"%d\" width=\"330\" height=\"%d\" "
          "fill=\"white\" stroke=\"#bbb\"/>\n",
          PLOT_R - 342, PLOT_T + 12, 34 + 20 * NSOLVERS);
  for (int s = 0; s < NSOLVERS; s++) {
    int y = PLOT_T + 32 + 20 * s;

    fprintf(f,
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" "
            "stroke-width=\"2\"/>\n",
            PLOT_R - 330, y - 4, PLOT_R - 302, y - 4, colours[s]);
    fprintf(f,
            "<text x=\"%d\" y=\"%d\">%s: %zu iterations, %zu "
            "evaluations</text>\n",
            PLOT_R - 294, y, cv[s].name, cv[s].iterations, cv[s].evaluations);
  }
  fprintf(f,
          "<text x=\"%d\" y=\"%d\" fill=\"#666\" font-size=\"11\">"
          "evaluations of h summed over the %d points</text>\n",
          PLOT_R - 330, PLOT_T + 32 + 20 * NSOLVERS, NTRAIN);
  fprintf(f, "</svg>\n");
#undef X_OF
#undef Y_OF
  return fclose(f) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
  const char *figure = argc > 1 ? argv[1] : "deq-convergence.svg";
  const imp_fp_type *solvers[NSOLVERS] = {imp_fp_picard, imp_fp_anderson,
                                          imp_fp_broyden};
  imp_deq_options opt = {.train = {.max_iter = 200, .rtol = 1e-8},
                         .adjoint = {.max_iter = 200, .rtol = 1e-8}};
  static curve curves[NSOLVERS];
  static dataset ds;
  double params[NPARAM], grads[NPARAM];
  tanh_map map = {IMP_WORKSPACE_INIT};
  imp_layer *deq = NULL;
  imp_rng rng;
  int ok = 0, rc;

  /* Parameters: W normal, projected onto ||W||_2 <= W_BOUND before the
   * first step; U, b normal; the readout smaller. */
  make_data(&ds);
  imp_rng_seed(&rng, 2024);
  imp_rng_fill_normal(&rng, params, NPARAM, 0.0, 1.0);
  for (size_t i = NTHETA; i < NPARAM; i++)
    params[i] *= 0.3;

  /* The layer's parameters live in the first NTHETA entries of params. */
  rc = report("create", make_deq(&map, &opt, params, "deq", &deq));
  if (rc == IMP_OK)
    rc = report("bind", imp_layer_bind_storage(deq, params, grads));
  fprintf(stderr,
          "training a DEQ of width %d on %d points of "
          "sin(3x) exp(-x^2/4)\n",
          NZ, NTRAIN);
  if (rc == IMP_OK)
    rc = train(deq, params, grads, &ds);
  imp_layer_free(deq);
  imp_workspace_free(&map.ws);

  for (int s = 0; s < NSOLVERS && rc == IMP_OK; s++)
    rc = solve_with(solvers[s], params, &ds, &curves[s]);
  if (rc == IMP_OK)
    print_table(curves);
  if (rc == IMP_OK)
    rc = gradient_check(params, &ds, &ok);
  if (rc == IMP_OK && write_svg(figure, curves, TRACE_RTOL) == 0)
    printf("\nwrote %s\n", figure);
  else if (rc == IMP_OK)
    rc = -1;
  return rc == IMP_OK && ok ? EXIT_SUCCESS : EXIT_FAILURE;
}

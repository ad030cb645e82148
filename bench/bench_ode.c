/*
 * bench_ode.c - the neural ODE layer against the same problem written
 * directly on CVODES, the cost of a gradient against a forward solve as
 * the parameters grow, and the data for the scipy side of bench_ode.py.
 *
 * The vector field is the spiral demo's network,
 *
 *     g(y) = W2 tanh(W1 y^3 + b1) + b2,   y in R^2, H hidden units,
 *
 * theta = (W1, b1, W2, b2), 5 H + 2 parameters, with W1 ~ N(0, 0.5^2),
 * b1 ~ N(0, 0.1^2), W2 ~ N(0, 1 / H), b2 ~ N(0, 0.1^2), written as plain
 * loops (the same functions serve the layer and the hand-written code).
 * A batch of 20 initial states, uniform on [-1.5, 1.5]^2, is integrated
 * over [0, 5] with 10 output times 0.5, 1.0, ..., 5.0; Adams with
 * fixed-point iteration, rtol 1e-7, atol 1e-9.  The backward pass is the
 * layer's adjoint for L = sum w . y with fixed weights w.
 *
 * (a) Overhead.  The hand-written baseline drives CVODES as the layer does,
 *     one CVODES memory per sample: CVodeReInit, CVodeF to each output
 *     time (CVode without checkpoints for a plain forward), then CVodeB
 *     from output time to output time with CVodeReInitB and
 *     CVodeQuadReInitB, the cotangent added at each.  Its results must
 *     equal the layer's; layer / direct is the layer's overhead (the
 *     checks, copies and counters around the same CVODES calls).
 * (b) The spiral problem at H = 50: the layer's plain forward, per sample
 *     and as one system, for bench_ode.py to set beside solve_ivp.
 * (c) One gradient (training forward + adjoint) over one plain forward,
 *     for H = 20, 200, 2000, 20000 (about 10^2 to 10^5 parameters), per
 *     sample and as one system.  The wide networks repeat each unit of
 *     the H = 20 one and divide W2 by the repeat count: the same g, so
 *     the same steps at every width, and only the cost of an evaluation
 *     (and of CVODES' thetabar quadrature) grows with the parameters.
 *
 * Each figure is the median of several repetitions of wall-clock time,
 * and of the thread's CPU time, which a busy machine disturbs less; the
 * two sides of a ratio are timed interleaved.
 *
 * Usage: bench_ode [--quick] [--data FILE]
 *   --quick  fewer repetitions, and (c) only up to H = 2000;
 *   --data   write the spiral problem for bench_ode.py: raw doubles in the
 *            native byte order: theta (5 H + 2), x (20 x 2), times (10),
 *            then the layer's y (20 x 10 x 2), per-sample mode.
 * Output lines are key=value (read by bench_ode.py) and '#' comments.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cvodes/cvodes.h>
#include <nvector/nvector_serial.h>
#include <sunnonlinsol/sunnonlinsol_fixedpoint.h>

#include "imp.h"
#include "imp/ode.h"

#define D 2
#define BATCH 20
#define K 10
#define T_END 5.0
#define RTOL 1e-7
#define ATOL 1e-9
#define SPIRAL_HIDDEN 50
#define MAX_REPS 64

/* ------------------------------------------------------------------ */
/* The field                                                            */
/* ------------------------------------------------------------------ */

typedef struct net {
  size_t hidden;
  double *a;    /* tanh activations, hidden */
  double *abar; /* their cotangents times tanh', hidden */
} net;

static size_t ntheta_of(size_t hidden)
{
  return 5 * hidden + D;
}

static void net_hidden(const net *m, const double *y, const double *p)
{
  size_t h = m->hidden;
  const double *w1 = p, *b1 = p + 2 * h;
  double c0 = y[0] * y[0] * y[0], c1 = y[1] * y[1] * y[1];

  for (size_t i = 0; i < h; i++)
    m->a[i] = tanh(w1[2 * i] * c0 + w1[2 * i + 1] * c1 + b1[i]);
}

static int net_rhs(void *ctx, const double *t, const double *y, const double *p,
                   double *out)
{
  const net *m = ctx;
  size_t h = m->hidden;
  const double *w2 = p + 3 * h, *b2 = p + 5 * h;

  (void)t;
  net_hidden(m, y, p);
  for (int k = 0; k < D; k++) {
    double s = b2[k];

    for (size_t i = 0; i < h; i++)
      s += w2[k * h + i] * m->a[i];
    out[k] = s;
  }
  return 0;
}

static int net_vjp(void *ctx, const double *t, const double *y, const double *p,
                   const double *v, double *vjp_y, double *vjp_t,
                   double *vjp_theta)
{
  const net *m = ctx;
  size_t h = m->hidden;
  const double *w1 = p, *w2 = p + 3 * h;
  double c0 = y[0] * y[0] * y[0], c1 = y[1] * y[1] * y[1];

  (void)t;
  (void)vjp_t;
  net_hidden(m, y, p);
  for (size_t i = 0; i < h; i++)
    m->abar[i] = (w2[i] * v[0] + w2[h + i] * v[1]) * (1.0 - m->a[i] * m->a[i]);

  if (vjp_y != NULL) {
    double u0 = 0.0, u1 = 0.0;

    for (size_t i = 0; i < h; i++) {
      u0 += w1[2 * i] * m->abar[i];
      u1 += w1[2 * i + 1] * m->abar[i];
    }
    vjp_y[0] = u0 * 3.0 * y[0] * y[0];
    vjp_y[1] = u1 * 3.0 * y[1] * y[1];
  }
  if (vjp_theta != NULL) {
    double *gw1 = vjp_theta, *gb1 = gw1 + 2 * h, *gw2 = gb1 + h;
    double *gb2 = gw2 + 2 * h;

    for (size_t i = 0; i < h; i++) {
      gw1[2 * i] += m->abar[i] * c0;
      gw1[2 * i + 1] += m->abar[i] * c1;
      gb1[i] += m->abar[i];
      gw2[i] += v[0] * m->a[i];
      gw2[h + i] += v[1] * m->a[i];
    }
    gb2[0] += v[0];
    gb2[1] += v[1];
  }
  return 0;
}

/* The problem: weights, initial states, output times, loss weights. */
typedef struct problem {
  size_t hidden, ntheta;
  double *theta;
  double x[BATCH * D];
  double times[K];
  double w[BATCH * K * D];
  net net;
} problem;

/*
 * Weights for H hidden units.  With base = 0 they are drawn afresh; with
 * base > 0 a network of base units is drawn and each unit repeated
 * H / base times with W2 divided by that factor, so that g is the same
 * function (up to rounding) for every width and the solver takes the same
 * steps: only the cost per evaluation grows with the parameters.
 */
static int problem_init(problem *pb, size_t hidden, size_t base, uint64_t seed)
{
  size_t h = hidden, h0 = base > 0 ? base : hidden, r = h / h0;
  double *t0;
  imp_rng rng;

  memset(pb, 0, sizeof *pb);
  pb->hidden = h;
  pb->ntheta = ntheta_of(h);
  pb->theta = malloc(pb->ntheta * sizeof(double));
  pb->net.hidden = h;
  pb->net.a = malloc(h * sizeof(double));
  pb->net.abar = malloc(h * sizeof(double));
  t0 = malloc(ntheta_of(h0) * sizeof(double));
  if (pb->theta == NULL || pb->net.a == NULL || pb->net.abar == NULL ||
      t0 == NULL || r * h0 != h) {
    free(t0);
    return 1;
  }

  imp_rng_seed(&rng, seed);
  imp_rng_fill_normal(&rng, t0, 2 * h0, 0.0, 0.5);
  imp_rng_fill_normal(&rng, t0 + 2 * h0, h0, 0.0, 0.1);
  imp_rng_fill_normal(&rng, t0 + 3 * h0, 2 * h0, 0.0, 1.0 / sqrt(h0));
  imp_rng_fill_normal(&rng, t0 + 5 * h0, D, 0.0, 0.1);
  for (size_t i = 0; i < h; i++) {
    size_t u = i / r; /* the base unit that unit i repeats */

    pb->theta[2 * i] = t0[2 * u];
    pb->theta[2 * i + 1] = t0[2 * u + 1];
    pb->theta[2 * h + i] = t0[2 * h0 + u];
    pb->theta[3 * h + i] = t0[3 * h0 + u] / (double)r;
    pb->theta[4 * h + i] = t0[4 * h0 + u] / (double)r;
  }
  pb->theta[5 * h] = t0[5 * h0];
  pb->theta[5 * h + 1] = t0[5 * h0 + 1];
  free(t0);

  imp_rng_fill_uniform(&rng, pb->x, BATCH * D, -1.5, 1.5);
  imp_rng_fill_normal(&rng, pb->w, BATCH * K * D, 0.0, 1.0);
  for (int k = 0; k < K; k++)
    pb->times[k] = T_END * (k + 1) / K;
  return 0;
}

static void problem_free(problem *pb)
{
  free(pb->theta);
  free(pb->net.a);
  free(pb->net.abar);
}

/* ------------------------------------------------------------------ */
/* The same problem on CVODES directly                                  */
/* ------------------------------------------------------------------ */

typedef struct direct {
  const problem *pb;
  SUNContext sunctx;
  void *mem[BATCH];
  N_Vector y[BATCH], lambda[BATCH], quad[BATCH];
  SUNNonlinearSolver nls[BATCH], nls_b[BATCH];
  int which[BATCH];
} direct;

static int direct_rhs(sunrealtype t, N_Vector y, N_Vector ydot, void *data)
{
  direct *dr = data;
  problem *pb = (problem *)dr->pb;

  return net_rhs(&pb->net, &t, N_VGetArrayPointer(y), pb->theta,
                 N_VGetArrayPointer(ydot));
}

static int direct_rhs_b(sunrealtype t, N_Vector y, N_Vector yb, N_Vector ybdot,
                        void *data)
{
  direct *dr = data;
  problem *pb = (problem *)dr->pb;
  double *out = N_VGetArrayPointer(ybdot);

  net_vjp(&pb->net, &t, N_VGetArrayPointer(y), pb->theta,
          N_VGetArrayPointer(yb), out, NULL, NULL);
  out[0] = -out[0];
  out[1] = -out[1];
  return 0;
}

static int direct_quad_b(sunrealtype t, N_Vector y, N_Vector yb, N_Vector qbdot,
                         void *data)
{
  direct *dr = data;
  problem *pb = (problem *)dr->pb;
  double *q = N_VGetArrayPointer(qbdot);

  memset(q, 0, pb->ntheta * sizeof(double));
  net_vjp(&pb->net, &t, N_VGetArrayPointer(y), pb->theta,
          N_VGetArrayPointer(yb), NULL, NULL, q);
  for (size_t j = 0; j < pb->ntheta; j++)
    q[j] = -q[j];
  return 0;
}

static void direct_free(direct *dr)
{
  for (int b = 0; b < BATCH; b++) {
    if (dr->mem[b] != NULL)
      CVodeFree(&dr->mem[b]);
    if (dr->nls[b] != NULL)
      SUNNonlinSolFree(dr->nls[b]);
    if (dr->nls_b[b] != NULL)
      SUNNonlinSolFree(dr->nls_b[b]);
    if (dr->y[b] != NULL)
      N_VDestroy(dr->y[b]);
    if (dr->lambda[b] != NULL)
      N_VDestroy(dr->lambda[b]);
    if (dr->quad[b] != NULL)
      N_VDestroy(dr->quad[b]);
  }
  if (dr->sunctx != NULL)
    SUNContext_Free(&dr->sunctx);
}

/* Everything a hand-written program sets up once. */
static int direct_init(direct *dr, const problem *pb)
{
  memset(dr, 0, sizeof *dr);
  dr->pb = pb;
  if (SUNContext_Create(NULL, &dr->sunctx) != 0)
    return 1;
  for (int b = 0; b < BATCH; b++) {
    void *mem = CVodeCreate(CV_ADAMS, dr->sunctx);

    dr->mem[b] = mem;
    dr->y[b] = N_VNew_Serial(D, dr->sunctx);
    dr->lambda[b] = N_VNew_Serial(D, dr->sunctx);
    dr->quad[b] = N_VNew_Serial((sunindextype)pb->ntheta, dr->sunctx);
    if (mem == NULL || dr->y[b] == NULL || dr->lambda[b] == NULL ||
        dr->quad[b] == NULL)
      return 1;
    N_VConst(0.0, dr->y[b]);
    N_VConst(0.0, dr->lambda[b]);
    N_VConst(0.0, dr->quad[b]);
    dr->nls[b] = SUNNonlinSol_FixedPoint(dr->y[b], 0, dr->sunctx);
    dr->nls_b[b] = SUNNonlinSol_FixedPoint(dr->lambda[b], 0, dr->sunctx);
    if (CVodeInit(mem, direct_rhs, 0.0, dr->y[b]) != CV_SUCCESS ||
        CVodeSStolerances(mem, RTOL, ATOL) != CV_SUCCESS ||
        CVodeSetUserData(mem, dr) != CV_SUCCESS ||
        CVodeSetMaxNumSteps(mem, 5000) != CV_SUCCESS ||
        CVodeSetNonlinearSolver(mem, dr->nls[b]) != CV_SUCCESS ||
        CVodeAdjInit(mem, 100, CV_HERMITE) != CV_SUCCESS)
      return 1;
    if (CVodeCreateB(mem, CV_ADAMS, &dr->which[b]) != CV_SUCCESS ||
        CVodeInitB(mem, dr->which[b], direct_rhs_b, T_END, dr->lambda[b]) !=
            CV_SUCCESS ||
        CVodeSStolerancesB(mem, dr->which[b], RTOL, ATOL) != CV_SUCCESS ||
        CVodeSetUserDataB(mem, dr->which[b], dr) != CV_SUCCESS ||
        CVodeSetMaxNumStepsB(mem, dr->which[b], 5000) != CV_SUCCESS ||
        CVodeSetNonlinearSolverB(mem, dr->which[b], dr->nls_b[b]) !=
            CV_SUCCESS ||
        CVodeQuadInitB(mem, dr->which[b], direct_quad_b, dr->quad[b]) !=
            CV_SUCCESS ||
        CVodeQuadSStolerancesB(mem, dr->which[b], RTOL, ATOL) != CV_SUCCESS ||
        CVodeSetQuadErrConB(mem, dr->which[b], SUNTRUE) != CV_SUCCESS)
      return 1;
  }
  return 0;
}

/* Forward: y (BATCH x K x D); keep = 1 stores checkpoints (CVodeF). */
static int direct_forward(direct *dr, double *y, int keep)
{
  for (int b = 0; b < BATCH; b++) {
    void *mem = dr->mem[b];
    double *state = N_VGetArrayPointer(dr->y[b]), tret;
    int ncheck;

    memcpy(state, dr->pb->x + b * D, D * sizeof(double));
    /* The adjoint module leaves its own first step behind. */
    if (CVodeSetInitStep(mem, 0.0) != CV_SUCCESS ||
        CVodeReInit(mem, 0.0, dr->y[b]) != CV_SUCCESS ||
        (keep && CVodeAdjReInit(mem) != CV_SUCCESS))
      return 1;
    for (int k = 0; k < K; k++) {
      int flag = keep
                     ? CVodeF(mem, dr->pb->times[k], dr->y[b], &tret, CV_NORMAL,
                              &ncheck)
                     : CVode(mem, dr->pb->times[k], dr->y[b], &tret, CV_NORMAL);

      if (flag < 0)
        return 1;
      memcpy(y + (b * K + k) * D, state, D * sizeof(double));
    }
  }
  return 0;
}

/* Backward for ybar = w: xbar (BATCH x D) and thetabar (ntheta), set. */
static int direct_backward(direct *dr, double *xbar, double *thetabar)
{
  const problem *pb = dr->pb;

  memset(thetabar, 0, pb->ntheta * sizeof(double));
  for (int b = 0; b < BATCH; b++) {
    void *mem = dr->mem[b];
    int which = dr->which[b];
    double *lambda = N_VGetArrayPointer(dr->lambda[b]), tret;
    const double *q = N_VGetArrayPointer(dr->quad[b]);

    memcpy(lambda, pb->w + (b * K + K - 1) * D, D * sizeof(double));
    N_VConst(0.0, dr->quad[b]);
    for (int k = K - 1; k >= 0; k--) {
      double tc = pb->times[k], tprev = k > 0 ? pb->times[k - 1] : 0.0;

      if (CVodeReInitB(mem, which, tc, dr->lambda[b]) != CV_SUCCESS ||
          CVodeQuadReInitB(mem, which, dr->quad[b]) != CV_SUCCESS ||
          CVodeB(mem, tprev, CV_NORMAL) < 0 ||
          CVodeGetB(mem, which, &tret, dr->lambda[b]) != CV_SUCCESS ||
          CVodeGetQuadB(mem, which, &tret, dr->quad[b]) != CV_SUCCESS)
        return 1;
      if (k > 0)
        for (int j = 0; j < D; j++)
          lambda[j] += pb->w[(b * K + k - 1) * D + j];
    }
    memcpy(xbar + b * D, lambda, D * sizeof(double));
    for (size_t j = 0; j < pb->ntheta; j++)
      thetabar[j] += q[j];
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* Timing                                                               */
/* ------------------------------------------------------------------ */

static double now(clockid_t clock)
{
  struct timespec ts;

  clock_gettime(clock, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_doubles(const void *a, const void *b)
{
  double x = *(const double *)a, y = *(const double *)b;

  return (x > y) - (x < y);
}

static double median(double *v, int n)
{
  qsort(v, (size_t)n, sizeof(double), compare_doubles);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Wall-clock and thread CPU samples of one timed quantity. */
typedef struct timing {
  double wall[MAX_REPS], cpu[MAX_REPS];
  int n;
} timing;

typedef struct clocks {
  double wall, cpu;
} clocks;

static clocks clocks_now(void)
{
  clocks c = {now(CLOCK_MONOTONIC), now(CLOCK_THREAD_CPUTIME_ID)};

  return c;
}

static void timing_add(timing *t, clocks start)
{
  clocks end = clocks_now();

  if (t->n < MAX_REPS) {
    t->wall[t->n] = end.wall - start.wall;
    t->cpu[t->n] = end.cpu - start.cpu;
    t->n++;
  }
}

static double med_wall(timing *t)
{
  return median(t->wall, t->n);
}

static double med_cpu(timing *t)
{
  return median(t->cpu, t->n);
}

/* ------------------------------------------------------------------ */
/* The layer                                                            */
/* ------------------------------------------------------------------ */

static int layer_make(problem *pb, imp_ode_batch mode, imp_layer **out)
{
  imp_ode_field field = {.d = D,
                         .ntheta = pb->ntheta,
                         .rhs = net_rhs,
                         .vjp = net_vjp,
                         .ctx = &pb->net};
  imp_ode_options opt = {.rtol = RTOL, .atol = ATOL, .batch = mode};
  int rc = imp_ode_create(&field, 0.0, pb->times, K, &opt, "bench", out);

  if (rc == IMP_OK)
    memcpy(imp_layer_params(*out), pb->theta, pb->ntheta * sizeof(double));
  return rc;
}

static int layer_forward(imp_layer *l, const problem *pb, double *y,
                         int training)
{
  imp_shape in = {BATCH, D, 1, 1};

  imp_layer_set_training(l, training);
  return imp_layer_forward(l, &in, pb->x, y);
}

static int layer_gradient(imp_layer *l, const problem *pb, double *y,
                          double *xbar)
{
  imp_shape in = {BATCH, D, 1, 1};
  int rc = layer_forward(l, pb, y, 1);

  imp_layer_zero_grad(l);
  memset(xbar, 0, BATCH * D * sizeof(double));
  if (rc == IMP_OK)
    rc = imp_layer_backward(l, xbar, pb->w, &in, pb->x, y);
  return rc;
}

static double max_rel_diff(const double *a, const double *b, size_t n)
{
  double worst = 0.0, scale = 0.0;

  for (size_t i = 0; i < n; i++)
    scale = fmax(scale, fabs(b[i]));
  for (size_t i = 0; i < n; i++)
    worst = fmax(worst, fabs(a[i] - b[i]));
  return scale > 0.0 ? worst / scale : worst;
}

static int fail(const char *what)
{
  fprintf(stderr, "bench_ode: %s failed: %s\n", what, imp_last_error());
  return EXIT_FAILURE;
}

/* (a) The layer against hand-written CVODES, per sample. */
static int bench_overhead(int reps)
{
  problem pb;
  direct dr;
  imp_layer *l = NULL;
  double y_l[BATCH * K * D], y_d[BATCH * K * D];
  double xbar_l[BATCH * D], xbar_d[BATCH * D], *tbar_d;
  timing lf = {0}, df = {0}, lg = {0}, dg = {0};
  imp_ode_stats st;
  int status = EXIT_FAILURE;

  if (problem_init(&pb, SPIRAL_HIDDEN, 0, 7) != 0 || direct_init(&dr, &pb) != 0)
    return fail("set-up");
  tbar_d = malloc(pb.ntheta * sizeof(double));
  if (tbar_d == NULL || layer_make(&pb, IMP_ODE_BATCH_SAMPLES, &l) != IMP_OK)
    goto done;

  /* The same numbers on both sides, to the last bit or nearly. */
  if (layer_gradient(l, &pb, y_l, xbar_l) != IMP_OK ||
      direct_forward(&dr, y_d, 1) != 0 ||
      direct_backward(&dr, xbar_d, tbar_d) != 0) {
    fail("first gradient");
    goto done;
  }
  printf("# (a) H = %d (%zu parameters), batch %d, %d output times on "
         "[0, %g], Adams, rtol %g\n",
         SPIRAL_HIDDEN, pb.ntheta, BATCH, K, T_END, RTOL);
  printf("overhead_agree_y=%.3g\n", max_rel_diff(y_l, y_d, BATCH * K * D));
  printf("overhead_agree_xbar=%.3g\n", max_rel_diff(xbar_l, xbar_d, BATCH * D));
  printf("overhead_agree_thetabar=%.3g\n",
         max_rel_diff(imp_layer_grads(l), tbar_d, pb.ntheta));
  imp_ode_get_stats(l, &st);
  printf("# per gradient: forward %ld steps, %ld rhs; backward %ld steps, "
         "%ld vjp\n",
         st.forward.steps, st.forward.rhs_evals, st.backward.steps,
         st.backward.vjp_evals);

  /* Interleaved repetitions. */
  for (int r = 0; r < reps; r++) {
    clocks c = clocks_now();

    if (layer_forward(l, &pb, y_l, 0) != IMP_OK)
      goto done;
    timing_add(&lf, c);
    c = clocks_now();
    if (direct_forward(&dr, y_d, 0) != 0)
      goto done;
    timing_add(&df, c);
    c = clocks_now();
    if (layer_gradient(l, &pb, y_l, xbar_l) != IMP_OK)
      goto done;
    timing_add(&lg, c);
    c = clocks_now();
    if (direct_forward(&dr, y_d, 1) != 0 ||
        direct_backward(&dr, xbar_d, tbar_d) != 0)
      goto done;
    timing_add(&dg, c);
  }
  printf("overhead_forward_ms=%.3f direct=%.3f ratio=%.3f cpu_ratio=%.3f\n",
         1e3 * med_wall(&lf), 1e3 * med_wall(&df),
         med_wall(&lf) / med_wall(&df), med_cpu(&lf) / med_cpu(&df));
  printf("overhead_gradient_ms=%.3f direct=%.3f ratio=%.3f cpu_ratio=%.3f\n",
         1e3 * med_wall(&lg), 1e3 * med_wall(&dg),
         med_wall(&lg) / med_wall(&dg), med_cpu(&lg) / med_cpu(&dg));
  status = EXIT_SUCCESS;

done:
  if (status != EXIT_SUCCESS)
    fail("overhead benchmark");
  imp_layer_free(l);
  direct_free(&dr);
  free(tbar_d);
  problem_free(&pb);
  return status;
}

/* (b) The spiral problem's plain forward, both batch modes; optionally
 * the data for bench_ode.py. */
static int bench_spiral(int reps, const char *data)
{
  static const char *names[2] = {"system", "samples"};
  problem pb;
  double y[2][BATCH * K * D];
  int status = EXIT_FAILURE;

  if (problem_init(&pb, SPIRAL_HIDDEN, 0, 7) != 0)
    return fail("set-up");
  printf("# (b) the spiral field, H = %d, batch %d, %d output times, rtol "
         "%g, atol %g: plain forward\n",
         SPIRAL_HIDDEN, BATCH, K, RTOL, ATOL);
  /* names[mode] matches imp_ode_batch: system 0, samples 1. */
  for (int mode = 0; mode < 2; mode++) {
    imp_layer *l;
    timing t = {0};
    imp_ode_stats st;

    if (layer_make(&pb, (imp_ode_batch)mode, &l) != IMP_OK)
      goto done;
    for (int r = 0; r < reps; r++) {
      clocks c = clocks_now();

      if (layer_forward(l, &pb, y[mode], 0) != IMP_OK) {
        imp_layer_free(l);
        goto done;
      }
      timing_add(&t, c);
    }
    imp_ode_get_stats(l, &st);
    printf("spiral_forward_%s_ms=%.3f steps=%ld rhs=%ld\n", names[mode],
           1e3 * med_wall(&t), st.forward.steps, st.forward.rhs_evals);
    printf("spiral_forward_%s_cpu_ms=%.3f\n", names[mode], 1e3 * med_cpu(&t));
    imp_layer_free(l);
  }
  printf("spiral_modes_agree=%.3g\n", max_rel_diff(y[0], y[1], BATCH * K * D));

  if (data != NULL) {
    FILE *f = fopen(data, "wb");

    if (f == NULL ||
        fwrite(pb.theta, sizeof(double), pb.ntheta, f) != pb.ntheta ||
        fwrite(pb.x, sizeof(double), BATCH * D, f) != BATCH * D ||
        fwrite(pb.times, sizeof(double), K, f) != K ||
        fwrite(y[0], sizeof(double), BATCH * K * D, f) != BATCH * K * D) {
      if (f != NULL)
        fclose(f);
      fprintf(stderr, "bench_ode: cannot write %s\n", data);
      goto done;
    }
    fclose(f);
    printf("spiral_hidden=%d\nspiral_batch=%d\nspiral_times=%d\n"
           "spiral_rtol=%g\nspiral_atol=%g\n",
           SPIRAL_HIDDEN, BATCH, K, RTOL, ATOL);
  }
  status = EXIT_SUCCESS;

done:
  if (status != EXIT_SUCCESS)
    fail("spiral benchmark");
  problem_free(&pb);
  return status;
}

/* (c) Gradient over forward as theta grows. */
static int bench_scaling(int reps, int quick)
{
  static const size_t widths[4] = {20, 200, 2000, 20000};
  static const char *names[2] = {"system", "samples"};
  double y[BATCH * K * D], xbar[BATCH * D];

  printf("# (c) one gradient (training forward + adjoint) / one plain "
         "forward\n");
  for (int i = 0; i < (quick ? 3 : 4); i++) {
    problem pb;

    if (problem_init(&pb, widths[i], widths[0], 7) != 0)
      return fail("set-up");
    for (int mode = 0; mode < 2; mode++) {
      imp_layer *l;
      timing f = {0}, g = {0};
      imp_ode_stats st;
      int n = i == 3 ? (reps + 3) / 4 : reps;

      if (layer_make(&pb, (imp_ode_batch)mode, &l) != IMP_OK) {
        problem_free(&pb);
        return fail("layer");
      }
      for (int r = 0; r < n; r++) {
        clocks c = clocks_now();

        if (layer_forward(l, &pb, y, 0) != IMP_OK)
          break;
        timing_add(&f, c);
        c = clocks_now();
        if (layer_gradient(l, &pb, y, xbar) != IMP_OK)
          break;
        timing_add(&g, c);
      }
      if (g.n < n) {
        imp_layer_free(l);
        problem_free(&pb);
        return fail("scaling run");
      }
      imp_ode_get_stats(l, &st);
      printf("scaling_%s_ntheta=%zu forward_ms=%.3f gradient_ms=%.3f "
             "ratio=%.2f cpu_ratio=%.2f fwd_steps=%ld rhs=%ld nni=%ld "
             "ncf=%ld bwd_steps=%ld vjp=%ld\n",
             names[mode], pb.ntheta, 1e3 * med_wall(&f), 1e3 * med_wall(&g),
             med_wall(&g) / med_wall(&f), med_cpu(&g) / med_cpu(&f),
             st.forward.steps, st.forward.rhs_evals, st.forward.nonlin_iters,
             st.forward.nonlin_conv_fails, st.backward.steps,
             st.backward.vjp_evals);
      imp_layer_free(l);
    }
    problem_free(&pb);
  }
  return EXIT_SUCCESS;
}

int main(int argc, char **argv)
{
  const char *data = NULL;
  int quick = 0, reps;

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--quick") == 0)
      quick = 1;
    else if (strcmp(argv[i], "--data") == 0 && i + 1 < argc)
      data = argv[++i];
    else {
      fprintf(stderr, "usage: %s [--quick] [--data FILE]\n", argv[0]);
      return EXIT_FAILURE;
    }
  }
  reps = quick ? 5 : 21;

  if (bench_overhead(reps) != EXIT_SUCCESS ||
      bench_spiral(reps, data) != EXIT_SUCCESS ||
      bench_scaling(quick ? 3 : 7, quick) != EXIT_SUCCESS)
    return EXIT_FAILURE;
  return EXIT_SUCCESS;
}

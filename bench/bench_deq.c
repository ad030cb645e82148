/*
 * bench_deq.c - forward + backward of a dense DEQ layer against the GEMMs
 * its solves perform, and the data for the PyTorch side of bench_deq.py.
 *
 * The layer is the fixed point of
 *
 *     z = h(x, z) = tanh(W z + U x + b),   z in R^256, x in R^256,
 *
 * on a batch of 64, with W drawn normal and scaled to ||W||_2 = 0.9 (300
 * steps of power iteration, imp_spectral_norm), U normal with deviation
 * 1 / sqrt(256), b normal with deviation 0.1, x and the cotangent ybar
 * standard normal; theta = (W, U, b).  Forward: Anderson with memory 5
 * from z = 0, relative tolerance 1e-6 per sample, at most 100 iterations
 * (the training budget).  Backward: implicit, the adjoint fixed point
 * u = (dh/dz)^T u + ybar solved by Anderson with the same settings.
 * (For this W, dh/dz at z* has spectral radius about 0.34: a Gaussian
 * matrix's spectral radius is about half its largest singular value, and
 * tanh' < 1.  Each solve takes 14 iterations, and so would Picard's.)
 *
 * The map and its vjp are user callbacks on the whole active batch of m
 * samples, with OpenBLAS GEMMs (row-major):
 *
 *     map   out = x U^T, out += z W^T, then tanh(out + b)     2 GEMMs
 *     vjp   s = 1 - h(x, z)^2 is computed at the first call at a point z
 *           (2 GEMMs) and kept until the next map call, as an autograd
 *           graph keeps tanh's output; then delta = v s and
 *           vjp_z = delta W                                  1 GEMM
 *           vjp_x += delta U, Wbar += delta^T z, Ubar += delta^T x
 *                                                  1 GEMM each, if asked
 *
 * The floor is the arithmetic no implementation of these solves can skip:
 * every GEMM the callbacks issue during one forward + backward is logged
 * with its shape, the counts are checked against the layer's statistics
 * (map calls = iterations, rows = evaluations, vjp calls =
 * backward_vjp_calls), and the same GEMMs are replayed on scratch buffers.
 * imp / floor is the layer's overhead: the solver's bookkeeping (Anderson's
 * per-sample Gram systems, packing, best-iterate copies) and the
 * callbacks' element-wise work (tanh, bias, delta).
 *
 * Each repetition times one forward + backward and one replay of the
 * floor, interleaved; the medians of wall-clock times are reported, and
 * those of the thread's CPU time as well, which a busy machine disturbs
 * less, and the fastest repetition of each.  OpenBLAS is pinned to one thread.
 *
 * Usage: bench-deq [data-file [repetitions]]   (default: no file, 21;
 * "-" for no file).  The data file receives, as raw doubles in the native
 * byte order (little-endian on x86-64): W (256 x 256),
 * U (256 x 256), b (256), x (64 x 256), ybar (64 x 256), then the layer's
 * z* (64 x 256), xbar (64 x 256), Wbar, Ubar, bbar.  Output lines are
 * key=value (read by bench_deq.py) and comments starting with '#'.
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imp.h"
#include "imp/blocks.h"
#include "imp/deq.h"

#define NZ 256
#define NX 256
#define BATCH 64
#define NTHETA (NZ * NZ + NZ * NX + NZ)
#define MEMORY 5
#define RTOL 1e-6
#define MAX_ITER 100
#define SPECTRAL_NORM 0.9
#define MAX_GEMMS 4096

static double clock_seconds(clockid_t clock)
{
  struct timespec t;

  clock_gettime(clock, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Wall-clock time, and the CPU time of this thread (which does all the
 * work: OpenBLAS runs single-threaded on the caller), which leaves out
 * the time other processes hold the core. */
static double now(void)
{
  return clock_seconds(CLOCK_MONOTONIC);
}

static double cpu_now(void)
{
  return clock_seconds(CLOCK_THREAD_CPUTIME_ID);
}

/* One logged GEMM: C (m x n) = op(A) op(B) + beta C, row-major. */
typedef struct gemm {
  int trans_a, trans_b, m, n, k;
  double beta;
} gemm;

/* The callbacks' context: scratch, the vjp's cached slope, counters and
 * the GEMM log. */
typedef struct tanh_dense {
  double *slope; /* BATCH x NZ: 1 - h^2 at the cached point */
  double *delta; /* BATCH x NZ */
  const double *cached_z, *cached_x, *cached_theta;
  size_t cached_n;
  int cache_valid;

  size_t map_calls, map_rows, vjp_calls;
  double callback_seconds;
  int logging;
  size_t ngemm, forward_gemms; /* logged in all, and by the forward */
  gemm log[MAX_GEMMS];
} tanh_dense;

/* cblas_dgemm with the shape logged when asked. */
static void dgemm(tanh_dense *t, int trans_a, int trans_b, int m, int n, int k,
                  const double *a, const double *b, double beta, double *c)
{
  int lda = trans_a ? m : k, ldb = trans_b ? k : n;

  if (t->logging && t->ngemm < MAX_GEMMS)
    t->log[t->ngemm++] = (gemm){trans_a, trans_b, m, n, k, beta};
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, 1.0, a, lda, b, ldb,
              beta, c, n);
}

/* out = tanh(z W^T + x U^T + b) for m rows. */
static void image(tanh_dense *t, int m, const double *x, const double *z,
                  const double *theta, double *out)
{
  const double *w = theta, *u = theta + NZ * NZ, *b = u + NZ * NX;

  dgemm(t, 0, 1, m, NZ, NX, x, u, 0.0, out);
  dgemm(t, 0, 1, m, NZ, NZ, z, w, 1.0, out);
  for (int r = 0; r < m; r++)
    for (int i = 0; i < NZ; i++)
      out[r * NZ + i] = tanh(out[r * NZ + i] + b[i]);
}

static int tanh_map(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    double *out)
{
  tanh_dense *t = ctx;
  double start = now();

  (void)xs;
  t->cache_valid = 0;
  t->map_calls++;
  t->map_rows += zs->n;
  image(t, (int)zs->n, x, z, theta, out);
  t->callback_seconds += now() - start;
  return 0;
}

static int tanh_vjp(void *ctx, const imp_shape *xs, const double *x,
                    const imp_shape *zs, const double *z, const double *theta,
                    const double *v, double *vjp_z, double *vjp_x,
                    double *vjp_theta)
{
  tanh_dense *t = ctx;
  const double *w = theta, *u = theta + NZ * NZ;
  int n = (int)zs->n;
  double start = now();

  (void)xs;
  t->vjp_calls++;

  /* The slope at z, unless it is cached: the layer calls the vjp at its
   * fixed point, with the same x and theta, until the next forward. */
  if (!t->cache_valid || t->cached_z != z || t->cached_x != x ||
      t->cached_theta != theta || t->cached_n != zs->n) {
    image(t, n, x, z, theta, t->slope);
    for (int i = 0; i < n * NZ; i++)
      t->slope[i] = 1.0 - t->slope[i] * t->slope[i];
    t->cached_z = z;
    t->cached_x = x;
    t->cached_theta = theta;
    t->cached_n = zs->n;
    t->cache_valid = 1;
  }
  for (int i = 0; i < n * NZ; i++)
    t->delta[i] = v[i] * t->slope[i];

  /* The products the caller asked for. */
  if (vjp_z != NULL)
    dgemm(t, 0, 0, n, NZ, NZ, t->delta, w, 0.0, vjp_z);
  if (vjp_x != NULL)
    dgemm(t, 0, 0, n, NX, NZ, t->delta, u, 1.0, vjp_x);
  if (vjp_theta != NULL) {
    double *bbar = vjp_theta + NZ * NZ + NZ * NX;

    dgemm(t, 1, 0, NZ, NZ, n, t->delta, z, 1.0, vjp_theta);
    dgemm(t, 1, 0, NZ, NX, n, t->delta, x, 1.0, vjp_theta + NZ * NZ);
    for (int r = 0; r < n; r++)
      for (int i = 0; i < NZ; i++)
        bbar[i] += t->delta[r * NZ + i];
  }
  t->callback_seconds += now() - start;
  return 0;
}

/* ------------------------------------------------------------------ */

/* The benchmark's state: the layer, its data and the floor's buffers. */
typedef struct bench {
  imp_layer *layer;
  tanh_dense *map;
  double *x, *ybar, *z, *xbar;
  double *a, *b, *c; /* the floor's operands, NZ * NZ each */
} bench;

static int forward_backward(bench *bn, double *t_forward, double *t_backward)
{
  imp_shape in = {BATCH, NX, 1, 1};
  double t0, t1;
  int rc;

  imp_layer_zero_grad(bn->layer);
  memset(bn->xbar, 0, BATCH * NX * sizeof(double));
  t0 = now();
  rc = imp_layer_forward(bn->layer, &in, bn->x, bn->z);
  t1 = now();
  if (bn->map->logging)
    bn->map->forward_gemms = bn->map->ngemm;
  if (rc == IMP_OK)
    rc = imp_layer_backward(bn->layer, bn->xbar, bn->ybar, &in, bn->x, bn->z);
  *t_forward = t1 - t0;
  *t_backward = now() - t1;
  if (rc != IMP_OK)
    fprintf(stderr, "bench-deq: %s: %s\n", imp_status_name(rc),
            imp_last_error());
  return rc;
}

/* Replay logged GEMMs [from, to) on scratch operands. */
static double floor_replay(bench *bn, size_t from, size_t to)
{
  const tanh_dense *t = bn->map;
  double start = now();

  for (size_t i = from; i < to; i++) {
    const gemm *g = &t->log[i];

    cblas_dgemm(CblasRowMajor, g->trans_a ? CblasTrans : CblasNoTrans,
                g->trans_b ? CblasTrans : CblasNoTrans, g->m, g->n, g->k, 1.0,
                bn->a, g->trans_a ? g->m : g->k, bn->b,
                g->trans_b ? g->k : g->n, g->beta, bn->c, g->n);
  }
  return now() - start;
}

static int compare_doubles(const void *a, const void *b)
{
  double x = *(const double *)a, y = *(const double *)b;

  return (x > y) - (x < y);
}

/* The median of v[0..n); sorts v in place. */
static double median(double *v, int n)
{
  qsort(v, (size_t)n, sizeof(double), compare_doubles);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void *checked_alloc(size_t n)
{
  void *p = calloc(n, sizeof(double));

  if (p == NULL) {
    fprintf(stderr, "bench-deq: out of memory\n");
    exit(EXIT_FAILURE);
  }
  return p;
}

/* The weights: W normal scaled to ||W||_2 = SPECTRAL_NORM, U and b. */
static int make_theta(imp_rng *rng, double *theta, double *sigma)
{
  imp_spectral *sp = NULL;
  double *w = theta, *u = theta + NZ * NZ, *b = u + NZ * NX, s = 0.0;
  int rc;

  imp_rng_fill_normal(rng, w, NZ * NZ, 0.0, 1.0);
  imp_rng_fill_normal(rng, u, NZ * NX, 0.0, 1.0 / sqrt((double)NX));
  imp_rng_fill_normal(rng, b, NZ, 0.0, 0.1);
  rc = imp_spectral_create_dense(NZ, NZ, 11, &sp);
  if (rc == IMP_OK)
    rc = imp_spectral_norm(sp, w, 300, &s);
  for (int i = 0; rc == IMP_OK && i < NZ * NZ; i++)
    w[i] *= SPECTRAL_NORM / s;
  if (rc == IMP_OK)
    rc = imp_spectral_norm(sp, w, 50, sigma);
  imp_spectral_free(sp);
  return rc;
}

static int write_data(const char *path, bench *bn, const double *theta0)
{
  FILE *f = fopen(path, "wb");
  const double *grads = imp_layer_grads(bn->layer);
  int ok;

  if (f == NULL) {
    fprintf(stderr, "bench-deq: cannot write %s\n", path);
    return -1;
  }
  ok = fwrite(theta0, sizeof(double), NTHETA, f) == NTHETA &&
       fwrite(bn->x, sizeof(double), BATCH * NX, f) == BATCH * NX &&
       fwrite(bn->ybar, sizeof(double), BATCH * NZ, f) == BATCH * NZ &&
       fwrite(bn->z, sizeof(double), BATCH * NZ, f) == BATCH * NZ &&
       fwrite(bn->xbar, sizeof(double), BATCH * NX, f) == BATCH * NX &&
       fwrite(grads, sizeof(double), NTHETA, f) == NTHETA;
  if (fclose(f) != 0 || !ok) {
    fprintf(stderr, "bench-deq: writing %s failed\n", path);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv)
{
  const char *data = argc > 1 && strcmp(argv[1], "-") != 0 ? argv[1] : NULL;
  int reps = argc > 2 ? atoi(argv[2]) : 21;
  imp_deq_options opt = {
      .solver = imp_fp_anderson,
      .fp = {.memory = MEMORY},
      .train = {.max_iter = MAX_ITER, .rtol = RTOL},
      .adjoint = {.method = IMP_ADJOINT_FIXED_POINT,
                  .fp_solver = imp_fp_anderson,
                  .max_iter = MAX_ITER,
                  .rtol = RTOL},
  };
  static double theta0[NTHETA];
  double *t_fwd, *t_bwd, *t_total, *t_cb, *t_ffwd, *t_fbwd, *t_floor;
  double *cpu_total, *cpu_floor;
  double sigma = 0.0, rho;
  tanh_dense *map = calloc(1, sizeof *map);
  bench bn = {.map = map};
  imp_deq_stats st;
  imp_rng rng;
  int rc;

  if (map == NULL) {
    fprintf(stderr, "bench-deq: out of memory\n");
    return EXIT_FAILURE;
  }
  if (reps < 1)
    reps = 1;
  openblas_set_num_threads(1);
  t_fwd = checked_alloc((size_t)reps);
  t_bwd = checked_alloc((size_t)reps);
  t_total = checked_alloc((size_t)reps);
  t_cb = checked_alloc((size_t)reps);
  t_ffwd = checked_alloc((size_t)reps);
  t_fbwd = checked_alloc((size_t)reps);
  t_floor = checked_alloc((size_t)reps);
  cpu_total = checked_alloc((size_t)reps);
  cpu_floor = checked_alloc((size_t)reps);
  map->slope = checked_alloc(BATCH * NZ);
  map->delta = checked_alloc(BATCH * NZ);
  bn.x = checked_alloc(BATCH * NX);
  bn.ybar = checked_alloc(BATCH * NZ);
  bn.z = checked_alloc(BATCH * NZ);
  bn.xbar = checked_alloc(BATCH * NX);
  bn.a = checked_alloc(NZ * NZ);
  bn.b = checked_alloc(NZ * NZ);
  bn.c = checked_alloc(NZ * NZ);

  /* Data and layer. */
  imp_rng_seed(&rng, 2024);
  rc = make_theta(&rng, theta0, &sigma);
  imp_rng_fill_normal(&rng, bn.x, BATCH * NX, 0.0, 1.0);
  imp_rng_fill_normal(&rng, bn.ybar, BATCH * NZ, 0.0, 1.0);
  imp_rng_fill_uniform(&rng, bn.a, NZ * NZ, -1.0, 1.0);
  imp_rng_fill_uniform(&rng, bn.b, NZ * NZ, -1.0, 1.0);
  if (rc == IMP_OK) {
    imp_deq_map m = {.ntheta = NTHETA,
                     .x_channels = NX,
                     .z_channels = NZ,
                     .map = tanh_map,
                     .vjp = tanh_vjp,
                     .ctx = map};

    rc = imp_deq_create(&m, theta0, &opt, "deq", &bn.layer);
  }
  if (rc != IMP_OK) {
    fprintf(stderr, "bench-deq: setup: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  /* One forward + backward with the GEMMs logged, checked against the
   * layer's statistics. */
  map->logging = 1;
  if (forward_backward(&bn, &t_fwd[0], &t_bwd[0]) != IMP_OK)
    return EXIT_FAILURE;
  map->logging = 0;
  imp_deq_get_stats(bn.layer, &st);
  if (map->map_calls != st.iterations || map->map_rows != st.evaluations ||
      map->vjp_calls != st.backward_vjp_calls || map->ngemm >= MAX_GEMMS) {
    fprintf(stderr,
            "bench-deq: the callbacks saw %zu map calls (%zu rows) and %zu "
            "vjp calls; the statistics say %zu iterations, %zu evaluations, "
            "%zu vjp calls\n",
            map->map_calls, map->map_rows, map->vjp_calls, st.iterations,
            st.evaluations, st.backward_vjp_calls);
    return EXIT_FAILURE;
  }
  if (data != NULL && write_data(data, &bn, theta0) != 0)
    return EXIT_FAILURE;

  /* The timed repetitions, each followed by the floor's replay. */
  for (int r = 0; r < reps; r++) {
    double c0 = cpu_now(), c1;

    map->callback_seconds = 0.0;
    if (forward_backward(&bn, &t_fwd[r], &t_bwd[r]) != IMP_OK)
      return EXIT_FAILURE;
    c1 = cpu_now();
    t_total[r] = t_fwd[r] + t_bwd[r];
    t_cb[r] = map->callback_seconds;
    t_ffwd[r] = floor_replay(&bn, 0, map->forward_gemms);
    t_fbwd[r] = floor_replay(&bn, map->forward_gemms, map->ngemm);
    t_floor[r] = t_ffwd[r] + t_fbwd[r];
    cpu_total[r] = c1 - c0;
    cpu_floor[r] = cpu_now() - c1;
  }

  /* How fast the map contracts at the fixed point (after the timing: the
   * power iteration calls the vjp). */
  if (imp_deq_spectral_radius(bn.layer, bn.x, 100, &rho) != IMP_OK)
    rho = NAN;

  printf("# dense DEQ z = tanh(W z + U x + b): width %d, input %d, batch "
         "%d, ||W||_2 = %.4f\n",
         NZ, NX, BATCH, sigma);
  printf("# Anderson m = %d, rtol %.0e, max %d iterations; implicit "
         "backward, adjoint fixed point by Anderson\n",
         MEMORY, RTOL, MAX_ITER);
  printf("# OpenBLAS threads %d (%s); medians of %d repetitions\n",
         openblas_get_num_threads(), openblas_get_config(), reps);
  printf("nz=%d\nnx=%d\nbatch=%d\nmemory=%d\nrtol=%g\nmax_iter=%d\n"
         "openblas_threads=%d\nrepetitions=%d\nspectral_norm=%.6f\n"
         "jacobian_spectral_radius=%.4f\n",
         NZ, NX, BATCH, MEMORY, RTOL, MAX_ITER, openblas_get_num_threads(),
         reps, sigma, rho);
  printf("iterations=%zu\nevaluations=%zu\nforward_rel_residual=%.3e\n"
         "backward_iterations=%zu\nbackward_vjp_calls=%zu\n"
         "backward_rel_residual=%.3e\ngemms=%zu\nforward_gemms=%zu\n",
         st.iterations, st.evaluations, st.rel_residual, st.backward_iterations,
         st.backward_vjp_calls, st.backward_residual, map->ngemm,
         map->forward_gemms);
  {
    double fwd = median(t_fwd, reps), bwd = median(t_bwd, reps);
    double total = median(t_total, reps), cb = median(t_cb, reps);
    double ffwd = median(t_ffwd, reps), fbwd = median(t_fbwd, reps);
    double fl = median(t_floor, reps), ctot = median(cpu_total, reps);
    double cfl = median(cpu_floor, reps);

    printf("forward_ms=%.3f\nbackward_ms=%.3f\ntotal_ms=%.3f\n"
           "callbacks_ms=%.3f\nfloor_forward_ms=%.3f\n"
           "floor_backward_ms=%.3f\nfloor_ms=%.3f\nratio_floor=%.3f\n",
           1e3 * fwd, 1e3 * bwd, 1e3 * total, 1e3 * cb, 1e3 * ffwd, 1e3 * fbwd,
           1e3 * fl, total / fl);
    printf("cpu_total_ms=%.3f\ncpu_floor_ms=%.3f\nratio_floor_cpu=%.3f\n",
           1e3 * ctot, 1e3 * cfl, ctot / cfl);
    /* median sorted the arrays: the first entries are the fastest. */
    printf("best_total_ms=%.3f\nbest_floor_ms=%.3f\nratio_floor_best=%.3f\n",
           1e3 * t_total[0], 1e3 * t_floor[0], t_total[0] / t_floor[0]);
  }
  imp_layer_free(bn.layer);
  free(map->slope);
  free(map->delta);
  free(map);
  free(t_fwd);
  free(t_bwd);
  free(t_total);
  free(t_cb);
  free(t_ffwd);
  free(t_fbwd);
  free(t_floor);
  free(cpu_total);
  free(cpu_floor);
  free(bn.x);
  free(bn.ybar);
  free(bn.z);
  free(bn.xbar);
  free(bn.a);
  free(bn.b);
  free(bn.c);
  return EXIT_SUCCESS;
}

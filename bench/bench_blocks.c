/*
 * bench_blocks.c - throughput of the dense and 3x3 convolution layers
 * against the OpenBLAS GEMMs they must do.
 *
 * For each block, forward and forward + backward are timed twice: once
 * through the layer (imp_layer_forward / imp_layer_backward, with their
 * checks, bias, im2col and col2im), once as the bare cblas_dgemm calls of
 * the same sizes (the floor: no layer can do less arithmetic).  The ratio
 * layer / floor is the layer's overhead.  Sizes:
 *
 *     dense   batch 64, 256 -> 256         3 GEMMs of 64 x 256 x 256
 *     conv    batch 32, 16 -> 16, 32 x 32  3 GEMMs of 16 x 1024 x 144
 *                                          per sample
 *
 * Usage: bench_blocks [threads]  (OpenBLAS threads, default 1).  Each
 * time is the best per-call mean over 11 rounds of about 0.1 s each, the
 * layer's and the floor's rounds taken in turn.
 * Output lines are key=value, read by bench_blocks.py.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imp.h"
#include "imp/blocks.h"

#define ROUNDS 11
#define ROUND_SECONDS 0.1

typedef void (*bench_fn)(void *ctx);

static double now(void)
{
  struct timespec t;

  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Calls of fn that take about ROUND_SECONDS. */
static long calibrate(bench_fn fn, void *ctx)
{
  double start;

  fn(ctx);
  start = now();
  fn(ctx);
  return (long)(ROUND_SECONDS / (now() - start + 1e-9)) + 1;
}

/* The mean seconds per call of one round of reps calls. */
static double round_time(bench_fn fn, void *ctx, long reps)
{
  double start = now();

  for (long k = 0; k < reps; k++)
    fn(ctx);
  return (now() - start) / (double)reps;
}

/*
 * The best per-call times of the layer and of its floor over ROUNDS
 * rounds each, taken in turn, so that a change in the machine's load
 * reaches both alike.
 */
static void compare(bench_fn layer, void *layer_ctx, bench_fn floor,
                    void *floor_ctx, double *t_layer, double *t_floor)
{
  long reps_layer = calibrate(layer, layer_ctx);
  long reps_floor = calibrate(floor, floor_ctx);

  *t_layer = *t_floor = 1e300;
  for (int r = 0; r < ROUNDS; r++) {
    double a = round_time(layer, layer_ctx, reps_layer);
    double b = round_time(floor, floor_ctx, reps_floor);

    if (a < *t_layer)
      *t_layer = a;
    if (b < *t_floor)
      *t_floor = b;
  }
}

/* A layer, its input, output and cotangent buffers. */
typedef struct layer_case {
  imp_layer *layer;
  imp_shape in;
  size_t nx, ny;
  double *x, *y, *ybar, *xbar;
} layer_case;

static void layer_forward(void *ctx)
{
  layer_case *c = ctx;

  if (imp_layer_forward(c->layer, &c->in, c->x, c->y) != IMP_OK)
    fprintf(stderr, "forward failed: %s\n", imp_last_error());
}

static void layer_forward_backward(void *ctx)
{
  layer_case *c = ctx;

  layer_forward(c);
  memset(c->xbar, 0, c->nx * sizeof(double));
  if (imp_layer_backward(c->layer, c->xbar, c->ybar, &c->in, c->x, c->y) !=
      IMP_OK)
    fprintf(stderr, "backward failed: %s\n", imp_last_error());
}

/* The bare GEMMs of a dense layer: Y = X W^T; Xbar = Ybar W, Wbar +=
 * Ybar^T X. */
typedef struct dense_floor {
  int n, in, out;
  double *x, *w, *y, *ybar, *xbar, *wbar;
} dense_floor;

static void dense_floor_forward(void *ctx)
{
  dense_floor *d = ctx;

  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d->n, d->out, d->in, 1.0,
              d->x, d->in, d->w, d->in, 0.0, d->y, d->out);
}

static void dense_floor_forward_backward(void *ctx)
{
  dense_floor *d = ctx;

  dense_floor_forward(d);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d->n, d->in, d->out,
              1.0, d->ybar, d->out, d->w, d->in, 0.0, d->xbar, d->in);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d->out, d->in, d->n, 1.0,
              d->ybar, d->out, d->x, d->in, 1.0, d->wbar, d->in);
}

/* The bare GEMMs of a convolution, per sample, on a columns buffer that
 * is already filled: Y_b = W X_col; Wbar += Ybar_b X_col^T, X_colbar =
 * W^T Ybar_b. */
typedef struct conv_floor {
  int n, k, cout, hw; /* k = 9 cin */
  double *col, *w, *y, *ybar, *wbar;
} conv_floor;

static void conv_floor_forward(void *ctx)
{
  conv_floor *c = ctx;

  for (int b = 0; b < c->n; b++)
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c->cout, c->hw, c->k,
                1.0, c->w, c->k, c->col, c->hw, 0.0,
                c->y + (size_t)b * c->cout * c->hw, c->hw);
}

static void conv_floor_forward_backward(void *ctx)
{
  conv_floor *c = ctx;

  conv_floor_forward(c);
  for (int b = 0; b < c->n; b++) {
    const double *yb = c->ybar + (size_t)b * c->cout * c->hw;

    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->cout, c->k, c->hw,
                1.0, yb, c->hw, c->col, c->hw, 1.0, c->wbar, c->k);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->k, c->hw, c->cout,
                1.0, c->w, c->k, yb, c->hw, 0.0, c->col, c->hw);
  }
}

static double *normal_buffer(imp_rng *rng, size_t n)
{
  double *a = malloc(n * sizeof(double));

  if (a == NULL) {
    fprintf(stderr, "out of memory\n");
    exit(EXIT_FAILURE);
  }
  imp_rng_fill_normal(rng, a, n, 0.0, 1.0);
  return a;
}

static void layer_case_init(layer_case *c, imp_layer *layer, imp_shape in,
                            imp_rng *rng)
{
  imp_shape out;

  imp_layer_output_shape(layer, &in, &out);
  c->layer = layer;
  c->in = in;
  c->nx = imp_shape_numel(&in);
  c->ny = imp_shape_numel(&out);
  c->x = normal_buffer(rng, c->nx);
  c->y = normal_buffer(rng, c->ny);
  c->ybar = normal_buffer(rng, c->ny);
  c->xbar = normal_buffer(rng, c->nx);
}

static void layer_case_free(layer_case *c)
{
  imp_layer_free(c->layer);
  free(c->x);
  free(c->y);
  free(c->ybar);
  free(c->xbar);
}

/* One line of results: times in milliseconds, the ratio, GFLOP/s. */
static void report(const char *name, double flops, double layer, double floor)
{
  printf("case=%s imp_ms=%.4f gemm_ms=%.4f ratio=%.3f imp_gflops=%.2f "
         "gemm_gflops=%.2f\n",
         name, 1e3 * layer, 1e3 * floor, layer / floor, 1e-9 * flops / layer,
         1e-9 * flops / floor);
}

int main(int argc, char **argv)
{
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  imp_rng rng;
  imp_layer *layer = NULL;
  layer_case lc;
  double t_layer, t_floor, flops;

  if (threads < 1)
    threads = 1;
  openblas_set_num_threads(threads);
  printf("openblas_threads=%d config=\"%s\"\n", openblas_get_num_threads(),
         openblas_get_config());
  imp_rng_seed(&rng, 2024);

  /* Dense, batch 64, 256 -> 256. */
  {
    dense_floor d = {64, 256, 256, NULL, NULL, NULL, NULL, NULL, NULL};

    imp_dense_create(256, 256, &rng, "dense", &layer);
    layer_case_init(&lc, layer, (imp_shape){64, 256, 1, 1}, &rng);
    d.x = lc.x;
    d.y = lc.y;
    d.ybar = lc.ybar;
    d.xbar = lc.xbar;
    d.w = imp_layer_params(layer);
    d.wbar = imp_layer_grads(layer);
    flops = 2.0 * 64 * 256 * 256;

    compare(layer_forward, &lc, dense_floor_forward, &d, &t_layer, &t_floor);
    report("dense_fwd", flops, t_layer, t_floor);
    compare(layer_forward_backward, &lc, dense_floor_forward_backward, &d,
            &t_layer, &t_floor);
    report("dense_fwdbwd", 3 * flops, t_layer, t_floor);
    layer_case_free(&lc);
  }

  /* 3x3 convolution, batch 32, 16 -> 16 channels, 32 x 32. */
  {
    conv_floor c = {32, 9 * 16, 16, 32 * 32, NULL, NULL, NULL, NULL, NULL};

    imp_conv3x3_create(16, 16, &rng, "conv", &layer);
    layer_case_init(&lc, layer, (imp_shape){32, 16, 32, 32}, &rng);
    c.col = normal_buffer(&rng, (size_t)c.k * c.hw);
    c.w = imp_layer_params(layer);
    c.y = lc.y;
    c.ybar = lc.ybar;
    c.wbar = imp_layer_grads(layer);
    flops = 2.0 * 32 * 16 * 1024 * 144;

    compare(layer_forward, &lc, conv_floor_forward, &c, &t_layer, &t_floor);
    report("conv_fwd", flops, t_layer, t_floor);
    compare(layer_forward_backward, &lc, conv_floor_forward_backward, &c,
            &t_layer, &t_floor);
    report("conv_fwdbwd", 3 * flops, t_layer, t_floor);
    free(c.col);
    layer_case_free(&lc);
  }
  return EXIT_SUCCESS;
}

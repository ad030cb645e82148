/*
 * core/dense.c - the dense (affine) layer y = W x + b on OpenBLAS GEMM.
 *
 * A batch of n inputs is an n x in row-major matrix X, so forward is
 * Y = X W^T + 1 b^T and backward is Xbar += Ybar W, Wbar += Ybar^T X,
 * bbar += Ybar^T 1: three GEMMs over the whole batch.
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/blocks_internal.h"
#include "core/internal.h"
#include "imp/blocks.h"

typedef struct dense_state {
  size_t in, out;
  imp__lipschitz lip;
} dense_state;

static const imp_layer_ops dense_ops;

void imp__dense_forward(const double *weight, const double *bias, double scale,
                        size_t in, size_t out, size_t n, const double *x,
                        double *y)
{
  double beta = 0.0;

  /* Start from the bias in every row, so that the GEMM adds onto it. */
  if (bias != NULL) {
    for (size_t b = 0; b < n; b++)
      memcpy(y + b * out, bias, out * sizeof(double));
    beta = 1.0;
  }

  /* Y (n x out) = scale X (n x in) W^T (in x out) + beta Y. */
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out,
              (int)in, scale, x, (int)in, weight, (int)in, beta, y, (int)out);
}

void imp__dense_backward(double *xbar, double *wbar, double *bbar,
                         const double *ybar, const double *weight, double scale,
                         size_t in, size_t out, size_t n, const double *x)
{
  /* Xbar (n x in) += scale Ybar (n x out) W (out x in). */
  if (xbar != NULL)
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)in,
                (int)out, scale, ybar, (int)out, weight, (int)in, 1.0, xbar,
                (int)in);

  /* Wbar (out x in) += scale Ybar^T (out x n) X (n x in). */
  if (wbar != NULL)
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, (int)in,
                (int)n, scale, ybar, (int)out, x, (int)in, 1.0, wbar, (int)in);

  /* bbar += the column sums of Ybar. */
  if (bbar != NULL)
    for (size_t b = 0; b < n; b++)
      for (size_t o = 0; o < out; o++)
        bbar[o] += ybar[b * out + o];
}

/* Check the sizes of a raw call: non-zero and within an int. */
static int dense_check_sizes(const char *where, size_t in, size_t out, size_t n)
{
  if (in == 0 || out == 0 || n == 0)
    return imp__fail(IMP_ESHAPE, "%s: empty size (in %zu, out %zu, n %zu)",
                     where, in, out, n);
  if (in > INT_MAX || out > INT_MAX || n > INT_MAX || out > INT_MAX / in)
    return imp__fail(IMP_ESHAPE,
                     "%s: sizes too large for BLAS (in %zu, "
                     "out %zu, n %zu)",
                     where, in, out, n);
  return IMP_OK;
}

int imp_dense_apply(const double *weight, const double *bias, double scale,
                    size_t in, size_t out, size_t n, const double *x, double *y)
{
  if (weight == NULL || x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "dense_apply: NULL argument");
  IMP__TRY(dense_check_sizes("dense_apply", in, out, n));
  if (!isfinite(scale) || !imp__all_finite(weight, in * out) ||
      (bias != NULL && !imp__all_finite(bias, out)))
    return imp__fail(IMP_ENONFINITE, "dense_apply: NaN or Inf in the "
                                     "weight, bias or scale");
  if (!imp__all_finite(x, in * n))
    return imp__fail(IMP_ENONFINITE, "dense_apply: NaN or Inf in x");

  imp__dense_forward(weight, bias, scale, in, out, n, x, y);
  return IMP_OK;
}

int imp_dense_apply_backward(double *xbar, double *wbar, double *bbar,
                             const double *ybar, const double *weight,
                             double scale, size_t in, size_t out, size_t n,
                             const double *x)
{
  if (ybar == NULL || (xbar != NULL && weight == NULL) ||
      (wbar != NULL && x == NULL))
    return imp__fail(IMP_EINVAL, "dense_apply_backward: NULL argument");
  IMP__TRY(dense_check_sizes("dense_apply_backward", in, out, n));
  if (!imp__all_finite(ybar, out * n))
    return imp__fail(IMP_ENONFINITE, "dense_apply_backward: NaN or Inf "
                                     "in ybar");

  imp__dense_backward(xbar, wbar, bbar, ybar, weight, scale, in, out, n, x);
  return IMP_OK;
}

static int dense_output_shape(const imp_layer *layer, const imp_shape *in,
                              imp_shape *out)
{
  const dense_state *st = imp_layer_state(layer);
  size_t sample = imp_shape_sample(in);

  if (sample != st->in)
    return imp__fail(IMP_ESHAPE,
                     "%s: input sample has %zu values "
                     "(%zu x %zu x %zu), expected %zu",
                     imp_layer_name(layer), sample, in->c, in->h, in->w,
                     st->in);
  if (in->n == 0 || in->n > INT_MAX)
    return imp__fail(IMP_ESHAPE, "%s: batch of %zu", imp_layer_name(layer),
                     in->n);
  out->n = in->n;
  out->c = st->out;
  out->h = 1;
  out->w = 1;
  return IMP_OK;
}

static int dense_forward(imp_layer *layer, const imp_shape *in, const double *x,
                         double *y)
{
  dense_state *st = imp_layer_state(layer);
  const double *weight = imp_layer_params(layer);
  const double *bias = weight + st->out * st->in;
  double scale = 1.0;

  /* With a Lipschitz bound, apply W / s; the estimate of sigma is redone
   * only if W changed since the last one. */
  if (st->lip.target > 0) {
    IMP__TRY(imp__lipschitz_refresh(&st->lip, weight));
    scale = 1.0 / st->lip.scale;
  }

  imp__dense_forward(weight, bias, scale, st->in, st->out, in->n, x, y);
  return IMP_OK;
}

static int dense_backward(imp_layer *layer, double *xbar, const double *ybar,
                          const imp_shape *in, const double *x, const double *y)
{
  dense_state *st = imp_layer_state(layer);
  const double *weight = imp_layer_params(layer);
  double *wbar = imp_layer_grads(layer);
  double *bbar = wbar + st->out * st->in;
  imp__lipschitz *lip = &st->lip;

  (void)y;

  /* Without a bound, or with one that does not bite, W is applied as is. */
  if (lip->target <= 0 || lip->sigma <= lip->target) {
    imp__dense_backward(xbar, wbar, bbar, ybar, weight, 1.0, st->in, st->out,
                        in->n, x);
    return IMP_OK;
  }

  /* The applied weight is W / s: xbar and bbar as for that weight, and
   * its gradient g pulled back through s into wbar. */
  imp__dense_backward(xbar, NULL, bbar, ybar, weight, 1.0 / lip->scale, st->in,
                      st->out, in->n, x);
  memset(lip->weight_grad, 0, lip->nweight * sizeof(double));
  imp__dense_backward(NULL, lip->weight_grad, NULL, ybar, weight, 1.0, st->in,
                      st->out, in->n, x);
  return imp__lipschitz_backward(lip, weight, wbar);
}

static void dense_destroy(void *state)
{
  dense_state *st = state;

  if (st == NULL)
    return;
  imp__lipschitz_clear(&st->lip);
  free(st);
}

static const imp_layer_ops dense_ops = {
    .kind = "dense",
    .output_shape = dense_output_shape,
    .forward = dense_forward,
    .backward = dense_backward,
    .rebind = NULL,
    .destroy = dense_destroy,
};

int imp_dense_create(size_t in, size_t out, imp_rng *rng, const char *name,
                     imp_layer **layer)
{
  dense_state *st;
  size_t nweight;
  int rc;

  if (layer == NULL)
    return imp__fail(IMP_EINVAL, "dense_create: NULL output pointer");
  *layer = NULL;
  if (in == 0 || out == 0)
    return imp__fail(IMP_EINVAL, "dense_create: %zu inputs, %zu outputs", in,
                     out);
  if (in > INT_MAX || out > INT_MAX || out > (INT_MAX - out) / in)
    return imp__fail(IMP_EINVAL, "dense_create: %zu x %zu is too large", out,
                     in);
  nweight = out * in;

  st = calloc(1, sizeof *st);
  if (st == NULL)
    return imp__fail(IMP_ENOMEM, "dense_create");
  st->in = in;
  st->out = out;
  st->lip.scale = 1.0;

  rc = imp_layer_create(&dense_ops, st, nweight + out,
                        name != NULL ? name : "dense", layer);
  if (rc != IMP_OK) {
    free(st);
    return rc;
  }

  /* Glorot normal: variance 2 / (fan_in + fan_out); the bias stays 0. */
  if (rng != NULL)
    imp_rng_fill_normal(rng, imp_layer_params(*layer), nweight, 0.0,
                        sqrt(2.0 / (double)(in + out)));
  return IMP_OK;
}

imp__lipschitz *imp__dense_lipschitz(const imp_layer *layer)
{
  dense_state *st;

  if (imp_layer_get_ops(layer) != &dense_ops)
    return NULL;
  st = imp_layer_state(layer);
  return &st->lip;
}

int imp_dense_set_lipschitz(imp_layer *layer, double target, int iterations)
{
  dense_state *st;
  imp_spectral *spectral = NULL;

  if (layer == NULL || imp_layer_get_ops(layer) != &dense_ops)
    return imp__fail(IMP_EINVAL, "dense_set_lipschitz: not a dense layer");
  if (!isfinite(target))
    return imp__fail(IMP_EINVAL, "dense_set_lipschitz: target is not "
                                 "finite");
  st = imp_layer_state(layer);
  if (target <= 0)
    return imp__lipschitz_set(&st->lip, 0.0, 0, NULL, 0);
  if (iterations < 1)
    return imp__fail(IMP_EINVAL, "dense_set_lipschitz: %d iterations",
                     iterations);

  IMP__TRY(imp_spectral_create_dense(st->out, st->in, 0x5eedULL, &spectral));
  return imp__lipschitz_set(&st->lip, target, iterations, spectral,
                            st->out * st->in);
}

/*
 * core/spectral.c - spectral norms by power iteration (dense weights and
 * 3x3 convolution operators) and the Lipschitz bound of dense and
 * convolution layers.
 *
 * One power step on an operator A with the kept unit vector v:
 *
 *     u = A v / ||A v||,   v = A^T u / ||A^T u||,   sigma = ||A^T u||.
 *
 * After it u^T A v = sigma, so (u, v, sigma) is a consistent estimate of
 * the top singular triple and d sigma / dA = u v^T.  For a convolution A
 * is the convolution on one image (batch 1) and A^T its backward with
 * respect to the input.
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/blocks_internal.h"
#include "core/internal.h"
#include "imp/blocks.h"

enum spectral_kind { SPECTRAL_DENSE, SPECTRAL_CONV3X3 };

struct imp_spectral {
  enum spectral_kind kind;
  size_t rows, cols; /* A is rows x cols */
  size_t cin, cout;  /* convolution only */
  imp_shape image;   /* convolution only: (1, cin, h, w) */
  double *u;         /* rows: left singular vector estimate */
  double *v;         /* cols: right singular vector estimate */
  double sigma;
  imp_workspace ws; /* convolution only */
};

/* Allocate the state and draw v as a random unit vector. */
static int spectral_alloc(enum spectral_kind kind, size_t rows, size_t cols,
                          uint64_t seed, imp_spectral **out)
{
  imp_spectral *s = calloc(1, sizeof *s);
  imp_rng rng;
  double norm;

  if (s == NULL)
    return imp__fail(IMP_ENOMEM, "spectral_create");
  s->kind = kind;
  s->rows = rows;
  s->cols = cols;
  s->u = imp__dalloc(rows);
  s->v = imp__dalloc(cols);
  if (s->u == NULL || s->v == NULL) {
    imp_spectral_free(s);
    return imp__fail(IMP_ENOMEM, "spectral_create: %zu x %zu operator", rows,
                     cols);
  }

  imp_rng_seed(&rng, seed);
  imp_rng_fill_normal(&rng, s->v, cols, 0.0, 1.0);
  norm = imp__nrm2(cols, s->v);
  for (size_t j = 0; j < cols; j++)
    s->v[j] /= norm;
  *out = s;
  return IMP_OK;
}

int imp_spectral_create_dense(size_t rows, size_t cols, uint64_t seed,
                              imp_spectral **s)
{
  if (s == NULL)
    return imp__fail(IMP_EINVAL, "spectral_create_dense: NULL output");
  *s = NULL;
  if (rows == 0 || cols == 0 || rows > INT_MAX || cols > INT_MAX ||
      rows > INT_MAX / cols)
    return imp__fail(IMP_EINVAL, "spectral_create_dense: %zu x %zu", rows,
                     cols);
  return spectral_alloc(SPECTRAL_DENSE, rows, cols, seed, s);
}

int imp_spectral_create_conv3x3(size_t cin, size_t cout, size_t h, size_t w,
                                uint64_t seed, imp_spectral **s)
{
  int rc;

  if (s == NULL)
    return imp__fail(IMP_EINVAL, "spectral_create_conv3x3: NULL output");
  *s = NULL;
  if (!imp__conv3x3_sizes_fit(cin, cout, h, w) || cout > SIZE_MAX / (h * w) ||
      cin > SIZE_MAX / (h * w))
    return imp__fail(IMP_EINVAL,
                     "spectral_create_conv3x3: %zu to %zu "
                     "channels on %zu x %zu",
                     cin, cout, h, w);

  rc = spectral_alloc(SPECTRAL_CONV3X3, cout * h * w, cin * h * w, seed, s);
  if (rc != IMP_OK)
    return rc;
  (*s)->cin = cin;
  (*s)->cout = cout;
  (*s)->image.n = 1;
  (*s)->image.c = cin;
  (*s)->image.h = h;
  (*s)->image.w = w;
  return IMP_OK;
}

void imp_spectral_free(imp_spectral *s)
{
  if (s == NULL)
    return;
  free(s->u);
  free(s->v);
  imp_workspace_free(&s->ws);
  free(s);
}

/* u = A v. */
static int spectral_apply(imp_spectral *s, const double *weight)
{
  if (s->kind == SPECTRAL_DENSE) {
    cblas_dgemv(CblasRowMajor, CblasNoTrans, (int)s->rows, (int)s->cols, 1.0,
                weight, (int)s->cols, s->v, 1, 0.0, s->u, 1);
    return IMP_OK;
  }
  return imp__conv3x3_forward(weight, NULL, 1.0, s->cout, &s->image, s->v, s->u,
                              &s->ws);
}

/* v = A^T u. */
static int spectral_apply_adjoint(imp_spectral *s, const double *weight)
{
  if (s->kind == SPECTRAL_DENSE) {
    cblas_dgemv(CblasRowMajor, CblasTrans, (int)s->rows, (int)s->cols, 1.0,
                weight, (int)s->cols, s->u, 1, 0.0, s->v, 1);
    return IMP_OK;
  }
  memset(s->v, 0, s->cols * sizeof(double));
  return imp__conv3x3_backward(s->v, NULL, NULL, s->u, weight, 1.0, s->cout,
                               &s->image, NULL, &s->ws);
}

/* The number of entries of the weight the state expects. */
static size_t spectral_nweight(const imp_spectral *s)
{
  return s->kind == SPECTRAL_DENSE ? s->rows * s->cols : 9 * s->cin * s->cout;
}

int imp_spectral_norm(imp_spectral *s, const double *weight, int iterations,
                      double *sigma)
{
  if (s == NULL || weight == NULL || sigma == NULL)
    return imp__fail(IMP_EINVAL, "spectral_norm: NULL argument");
  if (iterations < 1)
    return imp__fail(IMP_EINVAL, "spectral_norm: %d iterations", iterations);
  if (!imp__all_finite(weight, spectral_nweight(s)))
    return imp__fail(IMP_ENONFINITE, "spectral_norm: NaN or Inf in the "
                                     "weight");

  for (int it = 0; it < iterations; it++) {
    double norm_u, norm_v;

    /* Forward through A; A v = 0 means A = 0 or v in its null space, and
     * sigma = 0 is reported (u = 0, v kept). */
    IMP__TRY(spectral_apply(s, weight));
    norm_u = imp__nrm2(s->rows, s->u);
    if (norm_u == 0.0) {
      s->sigma = 0.0;
      break;
    }
    for (size_t i = 0; i < s->rows; i++)
      s->u[i] /= norm_u;

    /* Back through A^T; ||A^T u|| >= u^T A v = ||A v|| > 0. */
    IMP__TRY(spectral_apply_adjoint(s, weight));
    norm_v = imp__nrm2(s->cols, s->v);
    for (size_t j = 0; j < s->cols; j++)
      s->v[j] /= norm_v;
    s->sigma = norm_v;
  }

  *sigma = s->sigma;
  return IMP_OK;
}

int imp_spectral_sigma_backward(imp_spectral *s, double scale, double *grad)
{
  if (s == NULL || grad == NULL)
    return imp__fail(IMP_EINVAL, "spectral_sigma_backward: NULL argument");
  if (!isfinite(scale))
    return imp__fail(IMP_ENONFINITE, "spectral_sigma_backward: scale is "
                                     "not finite");
  if (s->sigma == 0.0)
    return IMP_OK;

  /* d sigma / dA = u v^T, or for a convolution the weight gradient of the
   * convolution with input v and output cotangent u. */
  if (s->kind == SPECTRAL_DENSE) {
    cblas_dger(CblasRowMajor, (int)s->rows, (int)s->cols, scale, s->u, 1, s->v,
               1, grad, (int)s->cols);
    return IMP_OK;
  }
  return imp__conv3x3_backward(NULL, grad, NULL, s->u, NULL, scale, s->cout,
                               &s->image, s->v, &s->ws);
}

double imp_spectral_sigma(const imp_spectral *s)
{
  return s != NULL ? s->sigma : 0.0;
}

/* ------------------------------------------------------------------ */
/* The Lipschitz bound of dense and convolution layers                   */
/* ------------------------------------------------------------------ */

/* The first estimate starts from a random vector and needs more steps
 * than the warm-started ones that follow. */
#define IMP__LIPSCHITZ_COLD_STEPS 50

void imp__lipschitz_clear(imp__lipschitz *lip)
{
  imp_spectral_free(lip->spectral);
  free(lip->weight_seen);
  free(lip->weight_grad);
  memset(lip, 0, sizeof *lip);
  lip->scale = 1.0;
}

int imp__lipschitz_set(imp__lipschitz *lip, double target, int iterations,
                       imp_spectral *spectral, size_t nweight)
{
  imp__lipschitz_clear(lip);
  if (target <= 0) {
    imp_spectral_free(spectral);
    return IMP_OK;
  }

  lip->weight_seen = imp__dalloc(nweight);
  lip->weight_grad = imp__dalloc(nweight);
  if (lip->weight_seen == NULL || lip->weight_grad == NULL) {
    free(lip->weight_seen);
    free(lip->weight_grad);
    lip->weight_seen = lip->weight_grad = NULL;
    imp_spectral_free(spectral);
    return imp__fail(IMP_ENOMEM, "lipschitz: %zu weights", nweight);
  }
  lip->target = target;
  lip->iterations = iterations;
  lip->spectral = spectral;
  lip->nweight = nweight;
  return IMP_OK;
}

int imp__lipschitz_refresh(imp__lipschitz *lip, const double *weight)
{
  int steps = lip->iterations;

  /* The same weight bit for bit: the last estimate stands. */
  if (lip->estimated &&
      memcmp(lip->weight_seen, weight, lip->nweight * sizeof(double)) == 0)
    return IMP_OK;

  if (!lip->estimated && steps < IMP__LIPSCHITZ_COLD_STEPS)
    steps = IMP__LIPSCHITZ_COLD_STEPS;
  IMP__TRY(imp_spectral_norm(lip->spectral, weight, steps, &lip->sigma));

  memcpy(lip->weight_seen, weight, lip->nweight * sizeof(double));
  lip->scale = lip->sigma > lip->target ? lip->sigma / lip->target : 1.0;
  lip->estimated = 1;
  return IMP_OK;
}

int imp__lipschitz_backward(imp__lipschitz *lip, const double *weight,
                            double *wbar)
{
  double s = lip->scale;
  const double *g = lip->weight_grad;

  /* The direct part, g / s. */
  for (size_t i = 0; i < lip->nweight; i++)
    wbar[i] += g[i] / s;

  /* Through s = sigma / t: d(W / s) = dW / s - W dsigma / (s^2 t). */
  if (lip->sigma > lip->target) {
    double gw = imp__dot(lip->nweight, g, weight);

    IMP__TRY(imp_spectral_sigma_backward(lip->spectral,
                                         -gw / (s * s * lip->target), wbar));
  }
  return IMP_OK;
}

int imp_block_lipschitz_scale(const imp_layer *layer, double *scale,
                              double *sigma)
{
  imp__lipschitz *lip = imp__dense_lipschitz(layer);

  if (lip == NULL)
    lip = imp__conv3x3_lipschitz(layer);
  if (lip == NULL)
    return imp__fail(IMP_EINVAL, "block_lipschitz_scale: not a dense or "
                                 "conv3x3 layer");
  if (scale != NULL)
    *scale = lip->target > 0 ? lip->scale : 1.0;
  if (sigma != NULL)
    *sigma = lip->target > 0 ? lip->sigma : 0.0;
  return IMP_OK;
}

/*
 * deq/anderson.c - Anderson acceleration (Anderson 1965; Walker and Ni,
 * SIAM J. Numer. Anal. 2011), per sample.
 *
 * With the last k <= m iterates z_i, images g_i and residuals
 * f_i = g_i - z_i, the weights alpha solve
 *
 *     min || sum_i alpha_i f_i ||^2 + lambda sum_i alpha_i^2 ||f_i||^2
 *     subject to sum_i alpha_i = 1,
 *
 * that is (F^T F + lambda D) y = 1 with D = diag(F^T F), alpha = y / (1^T y),
 * and the next iterate is
 *
 *     z+ = beta sum_i alpha_i g_i + (1 - beta) sum_i alpha_i z_i.
 *
 * The ridge is scaled column by column, by each residual's own squared
 * norm, so that lambda is a relative size that does not depend on the
 * units of z nor on how far apart the residuals in the window are.  Near
 * convergence they span many decades, and a single scale fails one way or
 * the other: scaled by the largest (oldest) residual the ridge swamps the
 * newest ones, which then get nearly equal weights whatever their angles,
 * so that a longer memory converges more slowly; scaled by the smallest it
 * leaves the large, nearly parallel old residuals unregularized, and the
 * factorization fails.  With D the system is a diagonal rescaling of the
 * residuals' matrix of cosines plus lambda I, whose condition number is at
 * most about k / lambda however spread the residuals are, and Cholesky's
 * accuracy does not depend on the rescaling.  If the factorization fails
 * or the weights are not finite, the step falls back to damped Picard and
 * the fallback is counted.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "imp/fixed_point.h"

typedef struct anderson {
  size_t n, d, m;
  double beta, ridge;
  double *f;     /* n x m x d: residual history, a ring per sample */
  double *g;     /* n x m x d: image history */
  size_t *count; /* n: pushes so far per sample */
  double *dots;  /* n x m x m: f_i . f_j over the ring's slots */
  double *gram;  /* m x m scratch */
  double *alpha; /* m scratch */
} anderson;

static void anderson_free(void *state)
{
  anderson *a = state;

  if (a == NULL)
    return;
  free(a->f);
  free(a->g);
  free(a->count);
  free(a->dots);
  free(a->gram);
  free(a->alpha);
  free(a);
}

/* 1 if a x b x c doubles can be counted in bytes without overflow. */
static int doubles_fit(size_t a, size_t b, size_t c)
{
  size_t limit = SIZE_MAX / sizeof(double);

  if (a == 0 || b == 0 || c == 0)
    return 1;
  return b <= limit / a && c <= limit / a / b;
}

static int anderson_alloc(void **state, size_t n, size_t d,
                          const imp_fp_options *opt)
{
  anderson *a;
  size_t m = opt->memory;

  /* The history's sizes are checked before they are multiplied: a huge
   * memory would otherwise wrap to a small block that the pushes overrun.
   * Bounding n m^2 also keeps k within LAPACK's int. */
  if (!doubles_fit(n, m, d) || !doubles_fit(n, m, m))
    return imp__fail(IMP_ENOMEM,
                     "anderson: memory %zu is too large for %zu samples of "
                     "%zu values: the history (n x m x d and n x m x m "
                     "doubles) overflows size_t",
                     m, n, d);
  a = calloc(1, sizeof *a);
  if (a == NULL)
    return imp__fail(IMP_ENOMEM, "anderson state");
  a->n = n;
  a->d = d;
  a->m = m;
  a->beta = opt->damping;
  a->ridge = opt->ridge;
  a->f = imp__dalloc(n * m * d);
  a->g = imp__dalloc(n * m * d);
  a->count = calloc(n, sizeof(size_t));
  a->dots = imp__dalloc(n * m * m);
  a->gram = imp__dalloc(m * m);
  a->alpha = imp__dalloc(m);
  if (a->f == NULL || a->g == NULL || a->count == NULL || a->dots == NULL ||
      a->gram == NULL || a->alpha == NULL) {
    anderson_free(a);
    return imp__fail(IMP_ENOMEM, "anderson history: %zu x %zu x %zu", n, m, d);
  }
  *state = a;
  return IMP_OK;
}

/* Refresh row and column `slot` of sample b's residual dot products
 * after a push: k new dot products instead of a whole Gram matrix. */
static void update_dots(anderson *a, size_t b, size_t slot, size_t k)
{
  const double *f = a->f + b * a->m * a->d;
  double *dots = a->dots + b * a->m * a->m;

  for (size_t j = 0; j < k; j++) {
    double v = imp__dot(a->d, f + slot * a->d, f + j * a->d);

    dots[slot * a->m + j] = dots[j * a->m + slot] = v;
  }
}

/* The mixing weights of sample b over its k stored residuals (ring slots
 * 0..k-1, in any order: the weights' order does not matter); 0 if the
 * regularized Gram system cannot be solved. */
static int mixing_weights(anderson *a, size_t b, size_t k)
{
  const double *dots = a->dots + b * a->m * a->m;
  double sum = 0.0;
  int kk = (int)k, one = 1, info = 0;

  for (size_t i = 0; i < k; i++)
    for (size_t j = 0; j < k; j++)
      a->gram[i * k + j] = dots[i * a->m + j];

  /* Each diagonal entry gets the ridge relative to itself (see the top of
   * the file).  A zero or overflowed residual norm leaves no sound scale:
   * fall back. */
  for (size_t i = 0; i < k; i++) {
    double fi2 = a->gram[i * k + i];

    if (!(fi2 > 0.0) || !isfinite(fi2))
      return 0;
    a->gram[i * k + i] = fi2 + a->ridge * fi2;
    a->alpha[i] = 1.0;
  }

  dpotrf_("L", &kk, a->gram, &kk, &info, 1);
  if (info != 0)
    return 0;
  dpotrs_("L", &kk, &one, a->gram, &kk, a->alpha, &kk, &info, 1);
  if (info != 0)
    return 0;
  for (size_t i = 0; i < k; i++)
    sum += a->alpha[i];
  if (!isfinite(sum) || fabs(sum) < 1e-300)
    return 0;
  for (size_t i = 0; i < k; i++)
    a->alpha[i] /= sum;
  return imp__all_finite(a->alpha, k);
}

static int anderson_update(void *state, size_t m, const size_t *idx,
                           const double *z, const double *g, double *z_next,
                           size_t *fallbacks)
{
  anderson *a = state;
  size_t d = a->d;

  for (size_t r = 0; r < m; r++) {
    size_t b = idx[r], slot = a->count[b] % a->m, k;
    const double *zr = z + r * d, *gr = g + r * d;
    double *out = z_next + r * d;
    double *fh = a->f + b * a->m * d, *gh = a->g + b * a->m * d;

    /* Push the newest pair into the sample's ring. */
    for (size_t i = 0; i < d; i++) {
      fh[slot * d + i] = gr[i] - zr[i];
      gh[slot * d + i] = gr[i];
    }
    a->count[b]++;
    k = a->count[b] < a->m ? a->count[b] : a->m;
    update_dots(a, b, slot, k);

    /* Mix, or fall back to a damped Picard step. */
    if (k < 2 || !mixing_weights(a, b, k)) {
      if (k >= 2)
        (*fallbacks)++;
      for (size_t i = 0; i < d; i++)
        out[i] = (1.0 - a->beta) * zr[i] + a->beta * gr[i];
      continue;
    }
    memset(out, 0, d * sizeof(double));
    for (size_t j = 0; j < k; j++) {
      const double *fj = fh + j * d, *gj = gh + j * d;
      double w = a->alpha[j];

      /* z_j = g_j - f_j, so beta g + (1 - beta) z = g - (1 - beta) f. */
      for (size_t i = 0; i < d; i++)
        out[i] += w * (gj[i] - (1.0 - a->beta) * fj[i]);
    }
  }
  return IMP_OK;
}

static const imp_fp_type anderson_type = {
    .name = "anderson",
    .alloc = anderson_alloc,
    .update = anderson_update,
    .free = anderson_free,
};

const imp_fp_type *const imp_fp_anderson = &anderson_type;

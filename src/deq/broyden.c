/*
 * deq/broyden.c - limited-memory "good" Broyden on F(z) = T(z) - z = 0,
 * per sample (Broyden 1965; used for DEQs by Bai, Kolter and Koltun 2019).
 *
 * The inverse Jacobian of F is approximated by H = -I + sum_i u_i v_i^T,
 * starting from -I (the exact inverse when T is constant), and the step is
 * the quasi-Newton one, z+ = z - H F.  After a step s = z+ - z with
 * residual change y = F+ - F, the good Broyden update
 *
 *     H <- H + (s - H y) (s^T H) / (s^T H y)
 *
 * appends u = (s - H y) / (s^T H y) and v = H^T s.  With m updates stored
 * the memory restarts from -I, and the step's update, computed with -I,
 * becomes the first of the new memory.  A denominator that vanishes
 * empties the memory and counts as a fallback.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp/fixed_point.h"

typedef struct broyden {
  size_t n, d, m;
  double *u, *v;       /* n x m x d: the rank-one factors */
  size_t *rank;        /* n: updates stored */
  int *has_prev;       /* n */
  double *z_prev;      /* n x d */
  double *f_prev;      /* n x d */
  double *f, *hy, *sv; /* d scratch each */
} broyden;

static void broyden_free(void *state)
{
  broyden *b = state;

  if (b == NULL)
    return;
  free(b->u);
  free(b->v);
  free(b->rank);
  free(b->has_prev);
  free(b->z_prev);
  free(b->f_prev);
  free(b->f);
  free(b->hy);
  free(b->sv);
  free(b);
}

/* 1 if a x b x c doubles can be counted in bytes without overflow. */
static int doubles_fit(size_t a, size_t b, size_t c)
{
  size_t limit = SIZE_MAX / sizeof(double);

  if (a == 0 || b == 0 || c == 0)
    return 1;
  return b <= limit / a && c <= limit / a / b;
}

static int broyden_alloc(void **state, size_t n, size_t d,
                         const imp_fp_options *opt)
{
  broyden *b;
  size_t m = opt->memory;

  /* The memory's size is checked before it is multiplied: a huge memory
   * would otherwise wrap to a small block that the updates overrun. */
  if (!doubles_fit(n, m, d))
    return imp__fail(IMP_ENOMEM,
                     "broyden: memory %zu is too large for %zu samples of "
                     "%zu values: n x m x d doubles overflow size_t",
                     m, n, d);
  b = calloc(1, sizeof *b);
  if (b == NULL)
    return imp__fail(IMP_ENOMEM, "broyden state");
  b->n = n;
  b->d = d;
  b->m = m;
  b->u = imp__dalloc(n * m * d);
  b->v = imp__dalloc(n * m * d);
  b->rank = calloc(n, sizeof(size_t));
  b->has_prev = calloc(n, sizeof(int));
  b->z_prev = imp__dalloc(n * d);
  b->f_prev = imp__dalloc(n * d);
  b->f = imp__dalloc(d);
  b->hy = imp__dalloc(d);
  b->sv = imp__dalloc(d);
  if (!b->u || !b->v || !b->rank || !b->has_prev || !b->z_prev || !b->f_prev ||
      !b->f || !b->hy || !b->sv) {
    broyden_free(b);
    return imp__fail(IMP_ENOMEM, "broyden memory: %zu x %zu x %zu", n, m, d);
  }
  *state = b;
  return IMP_OK;
}

/* out = H x (transpose = 0) or H^T x (transpose = 1) for sample s. */
static void apply_inverse(const broyden *b, size_t s, const double *x,
                          double *out, int transpose)
{
  const double *u = b->u + s * b->m * b->d, *v = b->v + s * b->m * b->d;
  size_t d = b->d;

  for (size_t i = 0; i < d; i++)
    out[i] = -x[i];
  for (size_t j = 0; j < b->rank[s]; j++) {
    const double *left = transpose ? v + j * d : u + j * d;
    const double *right = transpose ? u + j * d : v + j * d;
    double c = imp__dot(d, right, x);

    for (size_t i = 0; i < d; i++)
      out[i] += c * left[i];
  }
}

/* Fold the last step of sample s into its inverse Jacobian. */
static void broyden_rank_one(broyden *b, size_t s, const double *z,
                             size_t *fallbacks)
{
  size_t d = b->d;
  double *zp = b->z_prev + s * d, *fp = b->f_prev + s * d, denom;
  double *u, *v;

  /* zp <- s_k = z - z_prev, fp <- y_k = F - F_prev. */
  for (size_t i = 0; i < d; i++) {
    zp[i] = z[i] - zp[i];
    fp[i] = b->f[i] - fp[i];
  }

  /* A full memory restarts from H = -I before H is used: u and v must both
   * come from the H they update, or H+ y = s fails after each restart. */
  if (b->rank[s] == b->m)
    b->rank[s] = 0;
  apply_inverse(b, s, fp, b->hy, 0);
  denom = imp__dot(d, zp, b->hy);
  if (!(fabs(denom) > 1e-12 * imp__nrm2(d, zp) * imp__nrm2(d, b->hy))) {
    b->rank[s] = 0;
    (*fallbacks)++;
    return;
  }

  apply_inverse(b, s, zp, b->sv, 1);
  u = b->u + (s * b->m + b->rank[s]) * d;
  v = b->v + (s * b->m + b->rank[s]) * d;
  for (size_t i = 0; i < d; i++) {
    u[i] = (zp[i] - b->hy[i]) / denom;
    v[i] = b->sv[i];
  }
  b->rank[s]++;
}

static int broyden_update(void *state, size_t m, const size_t *idx,
                          const double *z, const double *g, double *z_next,
                          size_t *fallbacks)
{
  broyden *b = state;
  size_t d = b->d;

  for (size_t r = 0; r < m; r++) {
    size_t s = idx[r];
    const double *zr = z + r * d, *gr = g + r * d;
    double *out = z_next + r * d;

    for (size_t i = 0; i < d; i++)
      b->f[i] = gr[i] - zr[i];
    if (b->has_prev[s])
      broyden_rank_one(b, s, zr, fallbacks);

    /* z+ = z - H F. */
    apply_inverse(b, s, b->f, out, 0);
    for (size_t i = 0; i < d; i++)
      out[i] = zr[i] - out[i];

    memcpy(b->z_prev + s * d, zr, d * sizeof(double));
    memcpy(b->f_prev + s * d, b->f, d * sizeof(double));
    b->has_prev[s] = 1;
  }
  return IMP_OK;
}

static const imp_fp_type broyden_type = {
    .name = "broyden",
    .alloc = broyden_alloc,
    .update = broyden_update,
    .free = broyden_free,
};

const imp_fp_type *const imp_fp_broyden = &broyden_type;

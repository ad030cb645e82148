/*
 * deq/fixed_point.c - the batched fixed-point driver: it evaluates T on
 * the active samples, tests each one, keeps the best iterate of each, and
 * asks the solver type for the next iterates.  A sample whose image is
 * not finite leaves the active set with its best finite iterate, so that
 * one bad sample does not cost the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "deq/deq_internal.h"
#include "imp/fixed_point.h"

const imp_fp_type *imp_fp_type_by_name(const char *name)
{
  const imp_fp_type *const types[] = {imp_fp_picard, imp_fp_anderson,
                                      imp_fp_broyden};

  for (size_t i = 0; name != NULL && i < 3; i++)
    if (strcmp(types[i]->name, name) == 0)
      return types[i];
  return NULL;
}

static imp_fp_options with_defaults(const imp_fp_options *opt)
{
  imp_fp_options o = {0};

  if (opt != NULL)
    o = *opt;
  if (o.max_iter == 0)
    o.max_iter = 50;
  if (o.rtol <= 0.0 && o.atol <= 0.0)
    o.rtol = 1e-6;
  if (o.memory == 0)
    o.memory = 5;
  if (o.damping <= 0.0)
    o.damping = 1.0;
  if (o.ridge <= 0.0)
    o.ridge = 1e-10;
  return o;
}

/* The buffers of one solve. */
typedef struct fp_work {
  size_t *idx;                 /* n, batch indices of the active samples */
  double *z;                   /* n x d, packed current iterates */
  double *g;                   /* n x d, packed images */
  double *z_next;              /* n x d, packed next iterates */
  double *best;                /* n x d, by batch index */
  double *best_abs, *best_rel; /* n */

  /* Samples dropped because T gave them NaN or Inf, and the first one. */
  size_t dropped;
  size_t first_bad, first_bad_iter; /* SIZE_MAX while none */
} fp_work;

static void work_free(fp_work *w)
{
  free(w->idx);
  free(w->z);
  free(w->g);
  free(w->z_next);
  free(w->best);
  free(w->best_abs);
  free(w->best_rel);
}

static int work_alloc(fp_work *w, size_t n, size_t d)
{
  memset(w, 0, sizeof *w);
  if (d != 0 && n > ((size_t)-1) / sizeof(double) / d)
    return imp__fail(IMP_ENOMEM, "fixed point: %zu x %zu overflows", n, d);
  w->idx = calloc(n, sizeof(size_t));
  w->z = imp__dalloc(n * d);
  w->g = imp__dalloc(n * d);
  w->z_next = imp__dalloc(n * d);
  w->best = imp__dalloc(n * d);
  w->best_abs = imp__dalloc(n);
  w->best_rel = imp__dalloc(n);
  w->first_bad = w->first_bad_iter = SIZE_MAX;
  if (w->idx && w->z && w->g && w->z_next && w->best && w->best_abs &&
      w->best_rel)
    return IMP_OK;
  work_free(w);
  return imp__fail(IMP_ENOMEM, "fixed point: buffers for %zu x %zu", n, d);
}

/* How far a residual is from the tolerance: at most 1 means converged.
 * The best iterate is the one of least merit, so that "best" and
 * "converged" never disagree. */
static double merit(double r, double rel, const imp_fp_options *o)
{
  double m = INFINITY;

  if (o->atol > 0.0)
    m = r / o->atol;
  if (o->rtol > 0.0)
    m = fmin(m, rel / o->rtol);
  return m;
}

/*
 * Test the m active samples of iteration it, remember each one's best
 * iterate, and drop the converged ones and those whose image is not
 * finite, compacting the packed rows in place.  Returns the number still
 * active; *worst gets the largest relative residual of the finite ones.
 */
static size_t test_and_compact(fp_work *w, size_t m, size_t d, size_t it,
                               const imp_fp_options *o, double *worst)
{
  size_t kept = 0;

  *worst = 0.0;
  for (size_t k = 0; k < m; k++) {
    const double *z = w->z + k * d, *g = w->g + k * d;
    size_t b = w->idx[k];
    double r = 0.0, gn, rel;

    /* NaN or Inf: the sample's best finite iterate stays its answer, and
     * the solver never sees the bad image. */
    if (!imp__all_finite(g, d)) {
      if (w->dropped++ == 0) {
        w->first_bad = b;
        w->first_bad_iter = it;
      }
      continue;
    }
    for (size_t i = 0; i < d; i++)
      r += (g[i] - z[i]) * (g[i] - z[i]);
    r = sqrt(r);
    gn = imp__nrm2(d, g);
    rel = r / (gn > 0.0 ? gn : 1.0);
    if (rel > *worst)
      *worst = rel;
    if (merit(r, rel, o) < merit(w->best_abs[b], w->best_rel[b], o) ||
        !isfinite(w->best_abs[b])) {
      w->best_abs[b] = r;
      w->best_rel[b] = rel;
      memcpy(w->best + b * d, z, d * sizeof(double));
    }
    if (merit(r, rel, o) <= 1.0)
      continue;
    if (kept != k) {
      w->idx[kept] = b;
      memcpy(w->z + kept * d, z, d * sizeof(double));
      memcpy(w->g + kept * d, g, d * sizeof(double));
    }
    kept++;
  }
  return kept;
}

/* Record the worst residual of iteration it, into the caller's array of
 * max_iter entries or into a trace grown on demand (doubling, up to the
 * budget), so that a budget never spent costs no memory. */
static int record(double *fixed, imp__fp_trace *grown, size_t max_iter,
                  size_t it, double worst)
{
  if (fixed != NULL) {
    fixed[it] = worst;
    return IMP_OK;
  }
  if (grown == NULL)
    return IMP_OK;
  if (it >= grown->capacity) {
    size_t cap = grown->capacity < 32 ? 64 : 2 * grown->capacity;
    double *data;

    if (cap > max_iter)
      cap = max_iter;
    data = cap <= SIZE_MAX / sizeof(double)
               ? realloc(grown->data, cap * sizeof(double))
               : NULL;
    if (data == NULL)
      return imp__fail(IMP_ENOMEM,
                       "fixed point: no memory for a trace of %zu "
                       "iterations",
                       cap);
    grown->data = data;
    grown->capacity = cap;
  }
  grown->data[it] = worst;
  grown->len = it + 1;
  return IMP_OK;
}

/* The driver behind imp_fp_solve and imp__fp_solve_grown: at most one of
 * trace (max_iter entries) and grown is given. */
static int drive(const imp_fp_type *type, imp_fp_map_fn map, void *ctx,
                 size_t n, size_t d, double *z, const imp_fp_options *opt,
                 imp_fp_stats *stats, double *trace, size_t *trace_len,
                 imp__fp_trace *grown)
{
  imp_fp_options o;
  imp_fp_stats st = {0};
  fp_work w;
  void *state = NULL;
  size_t m = n, it;
  int rc = IMP_OK;

  if (grown != NULL)
    grown->len = 0; /* nothing of a failed start is left from before */
  if (type == NULL || map == NULL || z == NULL || n == 0 || d == 0)
    return imp__fail(IMP_EINVAL,
                     "fixed point: NULL type, map or z, or a "
                     "zero size (n = %zu, d = %zu)",
                     n, d);
  if (!imp__all_finite(z, n * d))
    return imp__fail(IMP_ENONFINITE, "fixed point: NaN or Inf in the "
                                     "initial iterate");
  o = with_defaults(opt);
  IMP__TRY(work_alloc(&w, n, d));
  rc = type->alloc(&state, n, d, &o);
  if (rc != IMP_OK) {
    work_free(&w);
    return rc;
  }

  /* Every sample starts active, its best residual unknown. */
  for (size_t b = 0; b < n; b++) {
    w.idx[b] = b;
    w.best_abs[b] = INFINITY;
    w.best_rel[b] = INFINITY;
  }
  memcpy(w.z, z, n * d * sizeof(double));
  memcpy(w.best, z, n * d * sizeof(double));

  for (it = 0; it < o.max_iter && m > 0; it++) {
    double worst;

    /* Evaluate T on the active samples. */
    rc = map(ctx, m, w.idx, w.z, w.g);
    if (rc != 0) {
      rc = imp__callback_status(rc, "fixed point: the map");
      break;
    }
    st.evaluations += m;

    /* Test, record, drop the converged and the non-finite samples. */
    m = test_and_compact(&w, m, d, it, &o, &worst);
    rc = record(trace, grown, o.max_iter, it, worst);
    if (rc != IMP_OK)
      break;
    if (m == 0 || it + 1 == o.max_iter)
      continue;

    /* Step.  A non-finite proposal becomes the plain image g. */
    rc = type->update(state, m, w.idx, w.z, w.g, w.z_next, &st.fallbacks);
    if (rc != IMP_OK)
      break;
    for (size_t k = 0; k < m; k++)
      if (!imp__all_finite(w.z_next + k * d, d)) {
        memcpy(w.z_next + k * d, w.g + k * d, d * sizeof(double));
        st.fallbacks++;
      }
    memcpy(w.z, w.z_next, m * d * sizeof(double));
  }
  st.iterations = it;
  if (trace_len != NULL)
    *trace_len = it;
  if (grown != NULL && rc != IMP_OK && grown->len > it)
    grown->len = it; /* the entry of an iteration cut short */

  /* Hand back the best iterates and judge them. */
  memcpy(z, w.best, n * d * sizeof(double));
  for (size_t b = 0; b < n; b++) {
    if (w.best_abs[b] > st.abs_residual)
      st.abs_residual = w.best_abs[b];
    if (w.best_rel[b] > st.rel_residual)
      st.rel_residual = w.best_rel[b];
    if (merit(w.best_abs[b], w.best_rel[b], &o) <= 1.0)
      st.converged++;
  }
  if (rc == IMP_OK && w.dropped > 0)
    rc = imp__fail(IMP_ENONFINITE,
                   "fixed point (%s): the map produced NaN or Inf for "
                   "sample %zu at iteration %zu; %zu of %zu samples "
                   "dropped with their best finite iterates, %zu converged",
                   type->name, w.first_bad, w.first_bad_iter, w.dropped, n,
                   st.converged);
  else if (rc == IMP_OK && st.converged < n)
    rc =
        imp__fail(IMP_ENOCONV,
                  "fixed point (%s): %zu of %zu samples "
                  "above tolerance after %zu iterations; worst relative "
                  "residual %.3g (rtol %.3g)",
                  type->name, n - st.converged, n, it, st.rel_residual, o.rtol);

  type->free(state);
  work_free(&w);
  if (stats != NULL)
    *stats = st;
  return rc;
}

int imp_fp_solve(const imp_fp_type *type, imp_fp_map_fn map, void *ctx,
                 size_t n, size_t d, double *z, const imp_fp_options *opt,
                 imp_fp_stats *stats, double *trace, size_t *trace_len)
{
  return drive(type, map, ctx, n, d, z, opt, stats, trace, trace_len, NULL);
}

int imp__fp_solve_grown(const imp_fp_type *type, imp_fp_map_fn map, void *ctx,
                        size_t n, size_t d, double *z,
                        const imp_fp_options *opt, imp_fp_stats *stats,
                        imp__fp_trace *trace)
{
  return drive(type, map, ctx, n, d, z, opt, stats, NULL, NULL, trace);
}

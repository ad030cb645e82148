/*
 * root/layer.c - the root-finding layer: a batch of GSL solves forward,
 * the implicit function theorem backward.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gsl/gsl_errno.h>

#include "core/internal.h"
#include "root/internal.h"

typedef struct root_state {
  imp__root_work work; /* the GSL solver, reused by every forward */
  double *initial;     /* ny, the initial guess */
  int warm_start;
  double *warm;         /* warm_cap x ny, each sample's last solution */
  size_t warm_cap;      /* samples the warm buffer holds */
  size_t warm_n;        /* batch size of the stored solutions; 0: none */
  imp_root_stats stats; /* of the most recent forward */
} root_state;

static void root_destroy(void *state)
{
  root_state *st = state;

  if (st == NULL)
    return;
  imp__root_work_free(&st->work);
  free(st->initial);
  free(st->warm);
  free(st);
}

static int root_output_shape(const imp_layer *layer, const imp_shape *in,
                             imp_shape *out)
{
  const root_state *st = imp_layer_state(layer);
  const imp_problem *p = &st->work.problem;

  if (in->c != p->nx || in->h != 1 || in->w != 1)
    return imp__fail(IMP_ESHAPE,
                     "%s: input of shape (%zu, %zu, %zu, %zu), "
                     "expected (n, %zu, 1, 1)",
                     imp_layer_name(layer), in->n, in->c, in->h, in->w, p->nx);
  out->n = in->n;
  out->c = p->ny;
  out->h = 1;
  out->w = 1;
  return IMP_OK;
}

/* Make room for n warm-start solutions, forgetting the stored ones if the
 * batch size changed. */
static int warm_prepare(root_state *st, size_t n)
{
  size_t ny = st->work.problem.ny;
  double *grown;

  if (st->warm_n == n)
    return IMP_OK;
  st->warm_n = 0;
  if (n <= st->warm_cap)
    return IMP_OK;
  grown = realloc(st->warm, n * ny * sizeof(double));
  if (grown == NULL)
    return imp__fail(IMP_ENOMEM, "root: warm-start store for %zu samples", n);
  st->warm = grown;
  st->warm_cap = n;
  return IMP_OK;
}

static void add_sample(imp_root_stats *stats, const imp__root_sample *s)
{
  stats->samples++;
  stats->iterations += s->iterations;
  if (s->iterations > stats->max_iterations)
    stats->max_iterations = s->iterations;
  stats->function_evals += s->residual_evals;
  stats->jacobian_evals += s->jacobian_evals;
  if (s->residual > stats->residual || isnan(s->residual))
    stats->residual = s->residual;
}

static int root_forward(imp_layer *layer, const imp_shape *in, const double *x,
                        double *y)
{
  root_state *st = imp_layer_state(layer);
  size_t n = in->n, nx = st->work.problem.nx, ny = st->work.problem.ny;
  const double *theta = imp_layer_params(layer);
  gsl_error_handler_t *previous;
  int rc = IMP_OK;

  memset(&st->stats, 0, sizeof st->stats);
  if (st->warm_start)
    IMP__TRY(warm_prepare(st, n));

  /* Each sample starts from its last solution or from the initial guess. */
  if (st->warm_start && st->warm_n == n && n > 0)
    memcpy(y, st->warm, n * ny * sizeof(double));
  else
    for (size_t b = 0; b < n; b++)
      memcpy(y + b * ny, st->initial, ny * sizeof(double));

  /* Solve the samples in order, with GSL's abort handler off. */
  previous = gsl_set_error_handler_off();
  for (size_t b = 0; b < n && rc == IMP_OK; b++) {
    imp__root_sample sample = {0};

    rc =
        imp__root_work_solve(&st->work, x + b * nx, theta, y + b * ny, &sample);
    add_sample(&st->stats, &sample);
    if (rc != IMP_OK) {
      char where[96];

      snprintf(where, sizeof where, "%s, sample %zu of %zu",
               imp_layer_name(layer), b, n);
      rc = imp__root_rewrap(rc, where);
    }
  }
  gsl_set_error_handler(previous);

  /* A failed batch yields no numbers that could pass for roots. */
  if (rc != IMP_OK) {
    for (size_t i = 0; i < n * ny; i++)
      y[i] = NAN;
    return rc;
  }
  if (st->warm_start && n > 0) {
    memcpy(st->warm, y, n * ny * sizeof(double));
    st->warm_n = n;
  }
  return IMP_OK;
}

static int root_backward(imp_layer *layer, double *xbar, const double *ybar,
                         const imp_shape *in, const double *x, const double *y)
{
  root_state *st = imp_layer_state(layer);
  const imp_problem *p = &st->work.problem;
  size_t n = in->n, nx = p->nx, ny = p->ny, ntheta = p->ntheta;
  const double *theta = imp_layer_params(layer);
  double *grads = imp_layer_grads(layer);
  double *gx = NULL, *gtheta;
  int rc = IMP_OK;

  /* Sums go to temporaries, so that a failure leaves the caller's alone. */
  IMP__TRY(imp_problem_check(p, 1));
  gtheta = imp__dalloc(ntheta);
  if (xbar != NULL)
    gx = imp__dalloc(n * nx);
  if (gtheta == NULL || (xbar != NULL && gx == NULL)) {
    free(gtheta);
    free(gx);
    return imp__fail(IMP_ENOMEM, "%s: backward sums", imp_layer_name(layer));
  }

  /* One adjoint solve per sample. */
  for (size_t b = 0; b < n && rc == IMP_OK; b++) {
    rc = imp__root_backward(p, &st->work.cfg, x + b * nx, theta, y + b * ny,
                            ybar + b * ny, gx != NULL ? gx + b * nx : NULL,
                            gtheta, NULL);
    if (rc != IMP_OK) {
      char where[96];

      snprintf(where, sizeof where, "%s, backward, sample %zu of %zu",
               imp_layer_name(layer), b, n);
      rc = imp__root_rewrap(rc, where);
    }
  }

  /* Accumulate. */
  if (rc == IMP_OK) {
    for (size_t i = 0; gx != NULL && i < n * nx; i++)
      xbar[i] += gx[i];
    for (size_t i = 0; i < ntheta; i++)
      grads[i] += gtheta[i];
  }
  free(gx);
  free(gtheta);
  return rc;
}

static const imp_layer_ops root_ops = {
    .kind = "root",
    .output_shape = root_output_shape,
    .forward = root_forward,
    .backward = root_backward,
    .destroy = root_destroy,
};

int imp_root_layer_create(const imp_problem *problem, const double *theta,
                          const imp_root_options *opt, const char *name,
                          imp_layer **out)
{
  root_state *st;
  imp_layer *layer;
  int rc;

  /* Check the arguments. */
  if (out == NULL)
    return imp__fail(IMP_EINVAL, "root_layer_create: NULL output pointer");
  *out = NULL;
  st = calloc(1, sizeof *st);
  if (st == NULL)
    return imp__fail(IMP_ENOMEM, "root_layer_create");
  rc = imp__root_configure(problem, opt, &st->work.cfg);
  if (rc == IMP_OK && problem->ntheta > 0 && theta == NULL)
    rc = imp__fail(IMP_EINVAL,
                   "root_layer_create: NULL theta for %zu "
                   "parameters",
                   problem->ntheta);
  if (rc == IMP_OK &&
      ((theta != NULL && !imp__all_finite(theta, problem->ntheta)) ||
       (opt != NULL && opt->initial != NULL &&
        !imp__all_finite(opt->initial, problem->ny))))
    rc = imp__fail(IMP_ENONFINITE, "root_layer_create: NaN or Inf in theta "
                                   "or the initial guess");
  if (rc != IMP_OK) {
    free(st);
    return rc;
  }

  /* Copy what the layer keeps, and allocate the GSL solver. */
  st->work.problem = *problem;
  st->warm_start = opt != NULL && opt->warm_start != 0;
  st->initial = imp__dalloc(problem->ny);
  if (st->initial == NULL) {
    root_destroy(st);
    return imp__fail(IMP_ENOMEM, "root_layer_create");
  }
  if (opt != NULL && opt->initial != NULL)
    memcpy(st->initial, opt->initial, problem->ny * sizeof(double));
  rc = imp__root_work_init(&st->work);
  if (rc == IMP_OK)
    rc = imp_layer_create(&root_ops, st, problem->ntheta,
                          name != NULL ? name : "root", &layer);
  if (rc != IMP_OK) {
    root_destroy(st);
    return rc;
  }
  if (problem->ntheta > 0)
    memcpy(imp_layer_params(layer), theta, problem->ntheta * sizeof(double));
  *out = layer;
  return IMP_OK;
}

int imp_root_layer_stats(const imp_layer *layer, imp_root_stats *stats)
{
  const root_state *st;

  if (layer == NULL || stats == NULL || imp_layer_get_ops(layer) != &root_ops)
    return imp__fail(IMP_EINVAL, "root_layer_stats: not a root layer");
  st = imp_layer_state(layer);
  *stats = st->stats;
  return IMP_OK;
}

int imp_root_layer_reset(imp_layer *layer)
{
  root_state *st;

  if (layer == NULL || imp_layer_get_ops(layer) != &root_ops)
    return imp__fail(IMP_EINVAL, "root_layer_reset: not a root layer");
  st = imp_layer_state(layer);
  st->warm_n = 0;
  return IMP_OK;
}

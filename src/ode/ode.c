/*
 * ode/ode.c - the neural ODE layer: options and times, the layer's
 * forward and backward around the CVODES driver (integrate.c), and the
 * public accessors.  The maths is in imp/ode.h.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <sundials/sundials_context.h>

#include "core/internal.h"
#include "imp/ode.h"
#include "ode/ode_internal.h"

/* Defaults of imp_ode_options. */
#define ODE_RTOL 1e-6
#define ODE_ATOL 1e-8
#define ODE_MAX_STEPS 5000
#define ODE_CHECKPOINT_STEPS 100
#define ODE_ADAMS_MAX_ORDER 12
#define ODE_BDF_MAX_ORDER 5

/* The fewest ulps between consecutive times (see check_span). */
#define ODE_MIN_SPAN_ULPS 4

static const imp_layer_ops ode_ops;

int imp_ode_field_from_problem(const imp_problem *problem, imp_ode_field *field)
{
  if (problem == NULL || field == NULL)
    return imp__fail(IMP_EINVAL, "ode_field_from_problem: NULL argument");
  if (problem->nx > 1)
    return imp__fail(IMP_EINVAL,
                     "ode_field_from_problem: the problem has nx = %zu "
                     "inputs; a vector field takes only the time (nx <= 1)",
                     problem->nx);
  if (problem->ny == 0 || problem->residual == NULL)
    return imp__fail(IMP_EINVAL, "ode_field_from_problem: the problem has "
                                 "no unknowns or no residual");

  field->d = problem->ny;
  field->ntheta = problem->ntheta;
  field->rhs = problem->residual;
  field->vjp = problem->vjp;
  field->jvp = problem->jvp;
  field->jacobian = problem->jacobian;
  field->ctx = problem->ctx;
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Checks and defaults                                                  */
/* ------------------------------------------------------------------ */

/*
 * Can CVODES integrate between the times a < b, forward and back?  The
 * forward's first span and every backward segment start with CVODES'
 * first-step estimate (cvHin).  It refuses b - a below 2 eps max(|a|,
 * |b|) (CV_TOO_CLOSE), and it takes the square root of at most 10 eps
 * max(|a|, |b|) (b - a), which underflows at tiny scales of t: from
 * t0 = 0, horizons below about 3e-155 made the forward fail with
 * CV_BAD_T, or pass and leave a backward that failed with CV_BAD_TB0,
 * and output times 1e-160 apart near 1e-150 made the backward fail
 * (SUNDIALS 6.4.1).  Both are refused here, before either pass: a span
 * must be ODE_MIN_SPAN_ULPS ulps of its ends, and eps max(|a|, |b|)
 * (b - a) a normal number.
 */
static int check_span(double a, double b, const char *what, size_t k)
{
  double scale = fmax(fabs(a), fabs(b)), span = b - a;

  if (span < ODE_MIN_SPAN_ULPS * DBL_EPSILON * scale)
    return imp__fail(IMP_EINVAL,
                     "ode: times[%zu] = %.17g is within %d ulps of %s "
                     "%.17g; CVODES cannot step between them",
                     k, b, ODE_MIN_SPAN_ULPS, what, a);
  if (DBL_EPSILON * scale * span < DBL_MIN)
    return imp__fail(IMP_EINVAL,
                     "ode: the span from %s %g to times[%zu] = %g is too "
                     "short for CVODES at this scale of t (its first "
                     "step estimate underflows); rescale the time",
                     what, a, k, b);
  return IMP_OK;
}

static int check_times(double t0, const double *times, size_t ntimes)
{
  if (times == NULL || ntimes == 0)
    return imp__fail(IMP_EINVAL, "ode: no output times");
  if (!isfinite(t0) || !imp__all_finite(times, ntimes))
    return imp__fail(IMP_EINVAL, "ode: NaN or Inf in t0 or the times");
  if (times[0] < t0)
    return imp__fail(IMP_EINVAL,
                     "ode: the first output time %g is before "
                     "t0 = %g",
                     times[0], t0);
  for (size_t k = 1; k < ntimes; k++)
    if (!(times[k] > times[k - 1]))
      return imp__fail(IMP_EINVAL,
                       "ode: output times must increase; times[%zu] = %g "
                       "after %g",
                       k, times[k], times[k - 1]);
  if (!(times[ntimes - 1] > t0))
    return imp__fail(IMP_EINVAL,
                     "ode: the last output time must be after "
                     "t0 = %g",
                     t0);

  /* Every span CVODES integrates, from t0 (unless the first output time
   * is t0 itself, whose output is x) and between output times. */
  for (size_t k = 0; k < ntimes; k++) {
    if (k == 0 && times[0] == t0)
      continue;
    IMP__TRY(check_span(k == 0 ? t0 : times[k - 1], times[k],
                        k == 0 ? "t0 =" : "the previous time", k));
  }
  return IMP_OK;
}

/* A tolerance-like option: 0 means the default, else positive, finite. */
static int positive_or_default(double *value, double fallback, const char *what)
{
  if (*value == 0.0) {
    *value = fallback;
    return IMP_OK;
  }
  if (!(*value > 0.0) || !isfinite(*value))
    return imp__fail(IMP_EINVAL, "ode: %s = %g must be positive and finite",
                     what, *value);
  return IMP_OK;
}

/* Copy the options with the defaults filled in, checking every field. */
static int resolve_options(const imp_ode_options *in, size_t d,
                           imp_ode_options *o, double **atol_vec)
{
  int max_order;

  *atol_vec = NULL;
  if (in != NULL)
    *o = *in;
  else
    memset(o, 0, sizeof *o);

  if (o->quadratures >= d)
    return imp__fail(IMP_EINVAL,
                     "ode: %zu quadrature components leave "
                     "none of the d = %zu to integrate",
                     o->quadratures, d);
  if ((unsigned)o->method > IMP_ODE_BDF ||
      (unsigned)o->iteration > IMP_ODE_ITER_NEWTON ||
      (unsigned)o->linsol > IMP_ODE_LINSOL_SPGMR ||
      (unsigned)o->interp > IMP_ODE_POLYNOMIAL ||
      (unsigned)o->batch > IMP_ODE_BATCH_SAMPLES)
    return imp__fail(IMP_EINVAL, "ode: an option's enum value is out of "
                                 "range");

  IMP__TRY(positive_or_default(&o->rtol, ODE_RTOL, "rtol"));
  IMP__TRY(positive_or_default(&o->atol, ODE_ATOL, "atol"));
  IMP__TRY(positive_or_default(&o->adjoint_rtol, o->rtol, "adjoint_rtol"));
  IMP__TRY(positive_or_default(&o->adjoint_atol, o->atol, "adjoint_atol"));
  IMP__TRY(positive_or_default(&o->adjoint_atol_quad, o->adjoint_atol,
                               "adjoint_atol_quad"));

  if (o->max_steps < 0 || o->adjoint_max_steps < 0 || o->checkpoint_steps < 0)
    return imp__fail(IMP_EINVAL, "ode: negative max_steps, "
                                 "adjoint_max_steps or checkpoint_steps");
  if (o->max_steps == 0)
    o->max_steps = ODE_MAX_STEPS;
  if (o->adjoint_max_steps == 0)
    o->adjoint_max_steps = o->max_steps;
  if (o->checkpoint_steps == 0)
    o->checkpoint_steps = ODE_CHECKPOINT_STEPS;

  max_order =
      o->method == IMP_ODE_BDF ? ODE_BDF_MAX_ORDER : ODE_ADAMS_MAX_ORDER;
  if (o->max_order < 0 || o->max_order > max_order)
    return imp__fail(IMP_EINVAL,
                     "ode: max_order = %d; this method allows "
                     "1 to %d",
                     o->max_order, max_order);
  if (o->max_order == 0)
    o->max_order = max_order;
  /* CVODES' polynomial interpolation reads past its data points when an
   * interval between checkpoints holds fewer steps than the order needs
   * (seen with valgrind in SUNDIALS 6.4.1), so such settings are refused. */
  if (o->interp == IMP_ODE_POLYNOMIAL &&
      o->checkpoint_steps <= (long)o->max_order)
    return imp__fail(IMP_EINVAL,
                     "ode: polynomial interpolation needs "
                     "checkpoint_steps > max_order = %d",
                     o->max_order);
  if (o->anderson_m < 0 || o->krylov_dim < 0)
    return imp__fail(IMP_EINVAL, "ode: negative anderson_m or krylov_dim");
  if (!(o->init_step >= 0.0) || !isfinite(o->init_step) ||
      !(o->max_step >= 0.0) || !isfinite(o->max_step))
    return imp__fail(IMP_EINVAL, "ode: init_step and max_step must be 0 "
                                 "or positive and finite");

  /* The per-component tolerances are copied. */
  if (o->atol_vec != NULL) {
    for (size_t j = 0; j < d; j++)
      if (!(o->atol_vec[j] >= 0.0) || !isfinite(o->atol_vec[j]))
        return imp__fail(IMP_EINVAL,
                         "ode: atol_vec[%zu] = %g must be "
                         ">= 0 and finite",
                         j, o->atol_vec[j]);
    *atol_vec = imp__dalloc(d);
    if (*atol_vec == NULL)
      return imp__fail(IMP_ENOMEM, "ode: atol_vec of %zu", d);
    memcpy(*atol_vec, o->atol_vec, d * sizeof(double));
    o->atol_vec = *atol_vec;
  }
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* State                                                                */
/* ------------------------------------------------------------------ */

static void state_free(ode_state *st)
{
  if (st == NULL)
    return;
  imp__ode_free_runs(st);
  if (st->sunctx != NULL)
    SUNContext_Free(&st->sunctx);
  free(st->atol_vec);
  free(st->times);
  free(st->jac_rows);
  free(st->unit);
  free(st->column);
  free(st->h_full);
  free(st->v_full);
  free(st->out_full);
  free(st->saved_x);
  free(st->saved_theta);
  free(st->scratch_y);
  free(st->xbar_acc);
  free(st->thetabar_acc);
  free(st);
}

static void ode_destroy(void *state)
{
  state_free(state);
}

static int set_times(ode_state *st, double t0, const double *times,
                     size_t ntimes)
{
  double *copy;

  IMP__TRY(check_times(t0, times, ntimes));
  copy = imp__dalloc(ntimes);
  if (copy == NULL)
    return imp__fail(IMP_ENOMEM, "ode: %zu output times", ntimes);
  memcpy(copy, times, ntimes * sizeof(double));
  free(st->times);
  st->times = copy;
  st->ntimes = ntimes;
  st->t0 = t0;

  /* The CVODES memories were initialized at the old t0. */
  imp__ode_free_runs(st);
  return IMP_OK;
}

/* Make a buffer hold at least n doubles. */
static int reserve(double **buf, size_t *cap, size_t n)
{
  double *p;

  if (*buf != NULL && *cap >= n)
    return IMP_OK;
  p = imp__dalloc(n);
  if (p == NULL)
    return imp__fail(IMP_ENOMEM, "ode: buffer of %zu doubles", n);
  free(*buf);
  *buf = p;
  *cap = n;
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Layer operations                                                     */
/* ------------------------------------------------------------------ */

static int ode_output_shape(const imp_layer *layer, const imp_shape *in,
                            imp_shape *out)
{
  const ode_state *st = imp_layer_state(layer);

  if (imp_shape_sample(in) != st->field.d || in->n == 0)
    return imp__fail(IMP_ESHAPE,
                     "%s: input of %zu per sample (batch %zu); the state "
                     "has d = %zu",
                     imp_layer_name(layer), imp_shape_sample(in), in->n,
                     st->field.d);
  out->n = in->n;
  out->c = st->ntimes * st->field.d;
  out->h = 1;
  out->w = 1;
  return IMP_OK;
}

/* Integrate with checkpoints and remember x and theta for backward. */
static int forward_keep(ode_state *st, size_t n, const double *x, double *y)
{
  size_t d = st->field.d, ntheta = st->field.ntheta;

  IMP__TRY(imp__ode_forward(st, n, x, y, 1));
  IMP__TRY(reserve(&st->saved_x, &st->saved_x_cap, n * d));
  if (st->saved_theta == NULL) {
    st->saved_theta = imp__dalloc(ntheta);
    if (st->saved_theta == NULL)
      return imp__fail(IMP_ENOMEM, "ode: %zu parameters", ntheta);
  }
  memcpy(st->saved_x, x, n * d * sizeof(double));
  if (ntheta > 0)
    memcpy(st->saved_theta, st->theta, ntheta * sizeof(double));
  st->saved = 1;
  st->saved_n = n;
  return IMP_OK;
}

static int ode_forward(imp_layer *layer, const imp_shape *in, const double *x,
                       double *y)
{
  ode_state *st = imp_layer_state(layer);

  st->theta = imp_layer_params(layer);
  if (imp_layer_training(layer))
    return forward_keep(st, in->n, x, y);
  return imp__ode_forward(st, in->n, x, y, 0);
}

/* Did the latest forward keep checkpoints for this x and theta? */
static int forward_matches(const ode_state *st, size_t n, const double *x)
{
  size_t d = st->field.d, ntheta = st->field.ntheta;

  if (!st->saved || st->saved_n != n)
    return 0;
  if (memcmp(st->saved_x, x, n * d * sizeof(double)) != 0)
    return 0;
  return ntheta == 0 ||
         memcmp(st->saved_theta, st->theta, ntheta * sizeof(double)) == 0;
}

static int ode_backward(imp_layer *layer, double *xbar, const double *ybar,
                        const imp_shape *in, const double *x, const double *y)
{
  ode_state *st = imp_layer_state(layer);
  size_t n = in->n, d = st->field.d, ntheta = st->field.ntheta;
  double *grads = imp_layer_grads(layer);
  int rc;

  (void)y;
  if (st->field.vjp == NULL)
    return imp__fail(IMP_EINVAL,
                     "%s: the vector field has no vjp, which "
                     "gradients need",
                     imp_layer_name(layer));
  st->theta = imp_layer_params(layer);

  /* Integrate again if the latest forward kept nothing for this input. */
  if (!forward_matches(st, n, x)) {
    IMP__TRY(reserve(&st->scratch_y, &st->scratch_cap, n * st->ntimes * d));
    IMP__TRY(forward_keep(st, n, x, st->scratch_y));
  }

  /* The adjoint pass accumulates into zeroed buffers, which are added to
   * xbar and the gradients only when the whole pass succeeded. */
  IMP__TRY(reserve(&st->xbar_acc, &st->xbar_cap, n * d));
  IMP__TRY(reserve(&st->thetabar_acc, &st->thetabar_cap, ntheta));
  memset(st->xbar_acc, 0, n * d * sizeof(double));
  memset(st->thetabar_acc, 0, ntheta * sizeof(double));
  rc = imp__ode_backward(st, n, ybar, st->xbar_acc, st->thetabar_acc);
  if (rc != IMP_OK)
    return rc;
  if (!imp__all_finite(st->xbar_acc, n * d) ||
      !imp__all_finite(st->thetabar_acc, ntheta))
    return imp__fail(IMP_ENONFINITE, "%s: the adjoint pass gave NaN or Inf",
                     imp_layer_name(layer));

  if (xbar != NULL)
    for (size_t i = 0; i < n * d; i++)
      xbar[i] += st->xbar_acc[i];
  for (size_t j = 0; j < ntheta; j++)
    grads[j] += st->thetabar_acc[j];
  return IMP_OK;
}

static const imp_layer_ops ode_ops = {
    .kind = "ode",
    .output_shape = ode_output_shape,
    .forward = ode_forward,
    .backward = ode_backward,
    .rebind = NULL,
    .destroy = ode_destroy,
};

/* ------------------------------------------------------------------ */
/* Public functions                                                     */
/* ------------------------------------------------------------------ */

int imp_ode_create(const imp_ode_field *field, double t0, const double *times,
                   size_t ntimes, const imp_ode_options *opt, const char *name,
                   imp_layer **out)
{
  ode_state *st;
  size_t d;
  int rc;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "ode_create: NULL output pointer");
  *out = NULL;
  if (field == NULL || field->rhs == NULL || field->d == 0)
    return imp__fail(IMP_EINVAL, "ode_create: the field needs d > 0 and "
                                 "an rhs callback");
  d = field->d;

  st = calloc(1, sizeof *st);
  if (st == NULL)
    return imp__fail(IMP_ENOMEM, "ode_create");
  st->field = *field;
  rc = resolve_options(opt, d, &st->opt, &st->atol_vec);
  if (rc == IMP_OK)
    rc = set_times(st, t0, times, ntimes);
  if (rc != IMP_OK) {
    state_free(st);
    return rc;
  }

  st->nq = st->opt.quadratures;
  st->dy = d - st->nq;
  st->jac_rows = imp__dalloc(d * d);
  st->unit = imp__dalloc(d);
  st->column = imp__dalloc(d);
  st->h_full = imp__dalloc(d);
  st->v_full = imp__dalloc(d);
  st->out_full = imp__dalloc(d);
  if (st->jac_rows == NULL || st->unit == NULL || st->column == NULL ||
      st->h_full == NULL || st->v_full == NULL || st->out_full == NULL) {
    state_free(st);
    return imp__fail(IMP_ENOMEM, "ode_create: scratch for d = %zu", d);
  }
  if (SUNContext_Create(NULL, &st->sunctx) != 0 || st->sunctx == NULL) {
    st->sunctx = NULL;
    state_free(st);
    return imp__fail(IMP_EBACKEND, "ode_create: SUNContext_Create failed");
  }

  rc = imp_layer_create(&ode_ops, st, field->ntheta,
                        name != NULL ? name : "ode", out);
  if (rc != IMP_OK)
    state_free(st);
  return rc;
}

/* The state of an ODE layer, or NULL for any other layer. */
static ode_state *ode_of(const imp_layer *layer)
{
  if (layer == NULL || imp_layer_get_ops(layer) != &ode_ops)
    return NULL;
  return imp_layer_state(layer);
}

int imp_ode_set_times(imp_layer *layer, double t0, const double *times,
                      size_t ntimes)
{
  ode_state *st = ode_of(layer);

  if (st == NULL)
    return imp__fail(IMP_EINVAL, "ode_set_times: not an ODE layer");
  return set_times(st, t0, times, ntimes);
}

size_t imp_ode_ntimes(const imp_layer *layer)
{
  const ode_state *st = ode_of(layer);

  return st != NULL ? st->ntimes : 0;
}

int imp_ode_get_stats(const imp_layer *layer, imp_ode_stats *stats)
{
  const ode_state *st = ode_of(layer);

  if (st == NULL || stats == NULL)
    return imp__fail(IMP_EINVAL, "ode_get_stats: not an ODE layer, or "
                                 "NULL output");
  *stats = st->stats;
  return IMP_OK;
}

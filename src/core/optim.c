/*
 * core/optim.c - SGD, Adam and RMSprop as const kind tables, gradient
 * clipping by global norm, and learning-rate schedules.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp/optim.h"

#define IMP__PI 3.14159265358979323846

struct imp_optim_type {
  const char *name;
  size_t blocks; /* state = blocks * n doubles */
  int (*check)(const imp_optim_options *opt);
  void (*update)(imp_optim *o, double *params, const double *grads);
};

struct imp_optim {
  const imp_optim_type *type;
  imp_optim_options opt;
  size_t n;
  uint64_t t;
  double *state; /* type->blocks * n */
};

imp_optim_options imp_optim_defaults(void)
{
  imp_optim_options opt = {
      .lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .rho = 0.99, .eps = 1e-8};

  return opt;
}

/* 1 if 0 <= v < 1. */
static int unit_interval(double v)
{
  return v >= 0.0 && v < 1.0;
}

/* Checks shared by every kind. */
static int check_common(const imp_optim_options *opt)
{
  if (!(opt->lr >= 0.0) || !isfinite(opt->lr))
    return imp__fail(IMP_EINVAL,
                     "optim: learning rate %g, expected a "
                     "finite value >= 0",
                     opt->lr);
  if (!(opt->weight_decay >= 0.0) || !isfinite(opt->weight_decay))
    return imp__fail(IMP_EINVAL,
                     "optim: weight decay %g, expected a "
                     "finite value >= 0",
                     opt->weight_decay);
  return IMP_OK;
}

/* The gradient with coupled weight decay, g + lambda p, and the decoupled
 * shrink p <- p - a lambda p, applied to entry i before the update. */
static double decayed_grad(const imp_optim *o, double *params,
                           const double *grads, size_t i)
{
  double lambda = o->opt.weight_decay;

  if (lambda == 0.0)
    return grads[i];
  if (o->opt.decoupled_decay) {
    params[i] -= o->opt.lr * lambda * params[i];
    return grads[i];
  }
  return grads[i] + lambda * params[i];
}

/* ------------------------------------------------------------------ */
/* SGD with momentum: state b. */

static int sgd_check(const imp_optim_options *opt)
{
  IMP__TRY(check_common(opt));
  if (!unit_interval(opt->momentum))
    return imp__fail(IMP_EINVAL, "sgd: momentum %g, expected [0, 1)",
                     opt->momentum);
  if (opt->nesterov && opt->momentum == 0.0)
    return imp__fail(IMP_EINVAL, "sgd: Nesterov momentum needs "
                                 "momentum > 0");
  return IMP_OK;
}

static void sgd_update(imp_optim *o, double *params, const double *grads)
{
  double a = o->opt.lr, mu = o->opt.momentum;
  double *b = o->state;

  for (size_t i = 0; i < o->n; i++) {
    double g = decayed_grad(o, params, grads, i);
    double d = g;

    if (mu > 0.0) {
      b[i] = mu * b[i] + g;
      d = o->opt.nesterov ? g + mu * b[i] : b[i];
    }
    params[i] -= a * d;
  }
}

static const imp_optim_type sgd_type = {"sgd", 1, sgd_check, sgd_update};
const imp_optim_type *const imp_optim_sgd = &sgd_type;

/* ------------------------------------------------------------------ */
/* Adam: state m (first moment) then v (second moment). */

static int adam_check(const imp_optim_options *opt)
{
  IMP__TRY(check_common(opt));
  if (!unit_interval(opt->beta1) || !unit_interval(opt->beta2))
    return imp__fail(IMP_EINVAL, "adam: betas (%g, %g), expected [0, 1)",
                     opt->beta1, opt->beta2);
  if (!(opt->eps > 0.0) || !isfinite(opt->eps))
    return imp__fail(IMP_EINVAL, "adam: eps %g, expected > 0", opt->eps);
  return IMP_OK;
}

static void adam_update(imp_optim *o, double *params, const double *grads)
{
  double b1 = o->opt.beta1, b2 = o->opt.beta2;
  double *m = o->state, *v = o->state + o->n;

  /* The bias corrections 1 - beta^t of zero-initialized averages. */
  double c1 = 1.0 - pow(b1, (double)o->t);
  double c2 = 1.0 - pow(b2, (double)o->t);

  for (size_t i = 0; i < o->n; i++) {
    double g = decayed_grad(o, params, grads, i);

    m[i] = b1 * m[i] + (1.0 - b1) * g;
    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
    params[i] -= o->opt.lr * (m[i] / c1) / (sqrt(v[i] / c2) + o->opt.eps);
  }
}

static const imp_optim_type adam_type = {"adam", 2, adam_check, adam_update};
const imp_optim_type *const imp_optim_adam = &adam_type;

/* ------------------------------------------------------------------ */
/* RMSprop: state s (mean square) then b (momentum). */

static int rmsprop_check(const imp_optim_options *opt)
{
  IMP__TRY(check_common(opt));
  if (!unit_interval(opt->rho))
    return imp__fail(IMP_EINVAL, "rmsprop: rho %g, expected [0, 1)", opt->rho);
  if (!unit_interval(opt->momentum))
    return imp__fail(IMP_EINVAL, "rmsprop: momentum %g, expected [0, 1)",
                     opt->momentum);
  if (!(opt->eps > 0.0) || !isfinite(opt->eps))
    return imp__fail(IMP_EINVAL, "rmsprop: eps %g, expected > 0", opt->eps);
  return IMP_OK;
}

static void rmsprop_update(imp_optim *o, double *params, const double *grads)
{
  double rho = o->opt.rho, mu = o->opt.momentum;
  double *s = o->state, *b = o->state + o->n;

  for (size_t i = 0; i < o->n; i++) {
    double g = decayed_grad(o, params, grads, i);
    double u;

    s[i] = rho * s[i] + (1.0 - rho) * g * g;
    u = g / (sqrt(s[i]) + o->opt.eps);
    if (mu > 0.0) {
      b[i] = mu * b[i] + u;
      u = b[i];
    }
    params[i] -= o->opt.lr * u;
  }
}

static const imp_optim_type rmsprop_type = {"rmsprop", 2, rmsprop_check,
                                            rmsprop_update};
const imp_optim_type *const imp_optim_rmsprop = &rmsprop_type;

/* ------------------------------------------------------------------ */
/* The optimizer handle. */

int imp_optim_create(const imp_optim_type *type, size_t n,
                     const imp_optim_options *opt, imp_optim **out)
{
  imp_optim_options options = opt != NULL ? *opt : imp_optim_defaults();
  imp_optim *o;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "optim_create: NULL output pointer");
  *out = NULL;
  if (type == NULL)
    return imp__fail(IMP_EINVAL, "optim_create: NULL optimizer kind");
  if (n == 0)
    return imp__fail(IMP_EINVAL, "%s: no parameters to optimize", type->name);
  IMP__TRY(type->check(&options));

  o = calloc(1, sizeof *o);
  if (o == NULL)
    return imp__fail(IMP_ENOMEM, "%s: optimizer", type->name);
  o->state =
      n <= SIZE_MAX / type->blocks ? imp__dalloc(type->blocks * n) : NULL;
  if (o->state == NULL) {
    free(o);
    return imp__fail(IMP_ENOMEM, "%s: state for %zu parameters", type->name, n);
  }

  o->type = type;
  o->opt = options;
  o->n = n;
  *out = o;
  return IMP_OK;
}

void imp_optim_free(imp_optim *optim)
{
  if (optim == NULL)
    return;
  free(optim->state);
  free(optim);
}

int imp_optim_step(imp_optim *optim, double *params, const double *grads,
                   size_t n)
{
  if (optim == NULL || params == NULL || grads == NULL)
    return imp__fail(IMP_EINVAL, "optim_step: NULL argument");
  if (n != optim->n)
    return imp__fail(IMP_ESHAPE,
                     "%s: %zu parameters, the optimizer was "
                     "made for %zu",
                     optim->type->name, n, optim->n);
  if (!imp__all_finite(grads, n))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the gradient",
                     optim->type->name);
  if (!imp__all_finite(params, n))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the parameters",
                     optim->type->name);

  optim->t++;
  optim->type->update(optim, params, grads);
  return IMP_OK;
}

int imp_optim_set_lr(imp_optim *optim, double lr)
{
  if (optim == NULL)
    return imp__fail(IMP_EINVAL, "optim_set_lr: NULL optimizer");
  if (!(lr >= 0.0) || !isfinite(lr))
    return imp__fail(IMP_EINVAL,
                     "%s: learning rate %g, expected a finite "
                     "value >= 0",
                     optim->type->name, lr);
  optim->opt.lr = lr;
  return IMP_OK;
}

double imp_optim_lr(const imp_optim *optim)
{
  return optim != NULL ? optim->opt.lr : 0.0;
}

int imp_optim_reset(imp_optim *optim)
{
  if (optim == NULL)
    return imp__fail(IMP_EINVAL, "optim_reset: NULL optimizer");
  memset(optim->state, 0, imp_optim_state_size(optim) * sizeof(double));
  optim->t = 0;
  return IMP_OK;
}

const char *imp_optim_name(const imp_optim *optim)
{
  return optim != NULL ? optim->type->name : "";
}

size_t imp_optim_size(const imp_optim *optim)
{
  return optim != NULL ? optim->n : 0;
}

uint64_t imp_optim_steps(const imp_optim *optim)
{
  return optim != NULL ? optim->t : 0;
}

int imp_optim_set_steps(imp_optim *optim, uint64_t steps)
{
  if (optim == NULL)
    return imp__fail(IMP_EINVAL, "optim_set_steps: NULL optimizer");
  optim->t = steps;
  return IMP_OK;
}

double *imp_optim_state(imp_optim *optim)
{
  return optim != NULL ? optim->state : NULL;
}

size_t imp_optim_state_size(const imp_optim *optim)
{
  return optim != NULL ? optim->type->blocks * optim->n : 0;
}

/* ------------------------------------------------------------------ */
/* Clipping and schedules. */

int imp_clip_grad_norm(double *grads, size_t n, double max_norm, double *norm)
{
  double total;

  if (grads == NULL && n > 0)
    return imp__fail(IMP_EINVAL, "clip_grad_norm: NULL gradient");
  if (!(max_norm > 0.0))
    return imp__fail(IMP_EINVAL,
                     "clip_grad_norm: max_norm %g, expected "
                     "> 0",
                     max_norm);

  if (!imp__all_finite(grads, n)) {
    if (norm != NULL)
      *norm = NAN;
    return imp__fail(IMP_ENONFINITE, "clip_grad_norm: NaN or Inf in the "
                                     "gradient");
  }

  /* dnrm2 scales as it goes, so large entries do not overflow. */
  total = n > 0 ? imp__nrm2(n, grads) : 0.0;
  if (norm != NULL)
    *norm = total;
  if (!isfinite(total))
    return imp__fail(IMP_ENONFINITE, "clip_grad_norm: gradient norm %g", total);

  if (total > max_norm) {
    double scale = max_norm / total;

    for (size_t i = 0; i < n; i++)
      grads[i] *= scale;
  }
  return IMP_OK;
}

/* 1 if v is finite and >= 0. */
static int valid_rate(double v)
{
  return v >= 0.0 && isfinite(v);
}

/* The half-cosine from hi (u = 0) down to lo (u = 1). */
static double cosine_anneal(double hi, double lo, double u)
{
  return lo + (hi - lo) * 0.5 * (1.0 + cos(IMP__PI * u));
}

int imp_schedule_lr(const imp_schedule *schedule, uint64_t step, double *lr)
{
  const imp_schedule *s = schedule;

  if (s == NULL || lr == NULL)
    return imp__fail(IMP_EINVAL, "schedule_lr: NULL argument");
  if (!valid_rate(s->lr))
    return imp__fail(IMP_EINVAL,
                     "schedule: rate %g, expected a finite "
                     "value >= 0",
                     s->lr);

  switch (s->kind) {
  case IMP_SCHEDULE_CONSTANT:
    *lr = s->lr;
    return IMP_OK;

  case IMP_SCHEDULE_STEP:
    if (s->step_size == 0 || !(s->gamma > 0.0) || !isfinite(s->gamma))
      return imp__fail(IMP_EINVAL,
                       "step schedule: step_size %llu, gamma "
                       "%g; expected both > 0",
                       (unsigned long long)s->step_size, s->gamma);
    *lr = s->lr * pow(s->gamma, (double)(step / s->step_size));
    return IMP_OK;

  case IMP_SCHEDULE_COSINE:
    if (s->total == 0 || !valid_rate(s->lr_min))
      return imp__fail(IMP_EINVAL,
                       "cosine schedule: total %llu, lr_min "
                       "%g; expected total > 0, lr_min >= 0",
                       (unsigned long long)s->total, s->lr_min);
    *lr = step >= s->total ? s->lr_min
                           : cosine_anneal(s->lr, s->lr_min,
                                           (double)step / (double)s->total);
    return IMP_OK;

  case IMP_SCHEDULE_ONE_CYCLE:
    if (s->warmup >= s->total || !valid_rate(s->lr_min) ||
        !valid_rate(s->lr_start))
      return imp__fail(IMP_EINVAL,
                       "one-cycle schedule: warmup %llu, total "
                       "%llu, lr_start %g, lr_min %g; expected warmup < "
                       "total and rates >= 0",
                       (unsigned long long)s->warmup,
                       (unsigned long long)s->total, s->lr_start, s->lr_min);
    if (step < s->warmup)
      *lr = s->lr_start +
            (s->lr - s->lr_start) * (double)step / (double)s->warmup;
    else if (step >= s->total)
      *lr = s->lr_min;
    else
      *lr = cosine_anneal(s->lr, s->lr_min,
                          (double)(step - s->warmup) /
                              (double)(s->total - s->warmup));
    return IMP_OK;
  }
  return imp__fail(IMP_EINVAL, "schedule: unknown kind %d", (int)s->kind);
}

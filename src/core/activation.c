/*
 * core/activation.c - element-wise activations (relu, tanh, elu,
 * softplus) and the element-wise add pair.
 */
#include <math.h>
#include <stdlib.h>

#include "core/internal.h"
#include "imp/blocks.h"

typedef struct activation_state {
  imp_activation kind;
} activation_state;

static int activation_known(imp_activation kind)
{
  return kind == IMP_ACT_RELU || kind == IMP_ACT_TANH || kind == IMP_ACT_ELU ||
         kind == IMP_ACT_SOFTPLUS;
}

const char *imp_activation_name(imp_activation kind)
{
  switch (kind) {
  case IMP_ACT_RELU:
    return "relu";
  case IMP_ACT_TANH:
    return "tanh";
  case IMP_ACT_ELU:
    return "elu";
  case IMP_ACT_SOFTPLUS:
    return "softplus";
  }
  return "";
}

/* y = act(x) on n entries; y may be x. */
static void activation_forward_kernel(imp_activation kind, size_t n,
                                      const double *x, double *y)
{
  switch (kind) {
  case IMP_ACT_RELU:
    for (size_t i = 0; i < n; i++)
      y[i] = x[i] > 0 ? x[i] : 0.0;
    break;
  case IMP_ACT_TANH:
    for (size_t i = 0; i < n; i++)
      y[i] = tanh(x[i]);
    break;
  case IMP_ACT_ELU:
    for (size_t i = 0; i < n; i++)
      y[i] = x[i] > 0 ? x[i] : expm1(x[i]);
    break;
  case IMP_ACT_SOFTPLUS:
    /* log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), safe for any x. */
    for (size_t i = 0; i < n; i++)
      y[i] = (x[i] > 0 ? x[i] : 0.0) + log1p(exp(-fabs(x[i])));
    break;
  }
}

/* xbar += act'(x) ybar on n entries. */
static void activation_backward_kernel(imp_activation kind, size_t n,
                                       double *xbar, const double *ybar,
                                       const double *x, const double *y)
{
  switch (kind) {
  case IMP_ACT_RELU:
    for (size_t i = 0; i < n; i++)
      if (x[i] > 0)
        xbar[i] += ybar[i];
    break;
  case IMP_ACT_TANH:
    for (size_t i = 0; i < n; i++)
      xbar[i] += (1.0 - y[i] * y[i]) * ybar[i];
    break;
  case IMP_ACT_ELU:
    for (size_t i = 0; i < n; i++)
      xbar[i] += (x[i] > 0 ? 1.0 : exp(x[i])) * ybar[i];
    break;
  case IMP_ACT_SOFTPLUS:
    /* The logistic sigmoid 1 / (1 + e^-x); e^-x may overflow to Inf,
     * which gives the right limit 0. */
    for (size_t i = 0; i < n; i++)
      xbar[i] += ybar[i] / (1.0 + exp(-x[i]));
    break;
  }
}

int imp_activation_apply(imp_activation kind, size_t n, const double *x,
                         double *y)
{
  if (x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "activation_apply: NULL argument");
  if (!activation_known(kind))
    return imp__fail(IMP_EINVAL, "activation_apply: unknown kind %d",
                     (int)kind);
  if (!imp__all_finite(x, n))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in x",
                     imp_activation_name(kind));

  activation_forward_kernel(kind, n, x, y);
  return IMP_OK;
}

int imp_activation_apply_backward(imp_activation kind, size_t n, double *xbar,
                                  const double *ybar, const double *x,
                                  const double *y)
{
  if (xbar == NULL || ybar == NULL || x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "activation_apply_backward: NULL "
                                 "argument");
  if (!activation_known(kind))
    return imp__fail(IMP_EINVAL,
                     "activation_apply_backward: unknown kind "
                     "%d",
                     (int)kind);
  if (!imp__all_finite(ybar, n))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in ybar",
                     imp_activation_name(kind));

  activation_backward_kernel(kind, n, xbar, ybar, x, y);
  return IMP_OK;
}

static int activation_output_shape(const imp_layer *layer, const imp_shape *in,
                                   imp_shape *out)
{
  if (imp_shape_numel(in) == 0)
    return imp__fail(IMP_ESHAPE,
                     "%s: empty or oversized input (%zu, %zu, "
                     "%zu, %zu)",
                     imp_layer_name(layer), in->n, in->c, in->h, in->w);
  *out = *in;
  return IMP_OK;
}

static int activation_forward(imp_layer *layer, const imp_shape *in,
                              const double *x, double *y)
{
  const activation_state *st = imp_layer_state(layer);

  activation_forward_kernel(st->kind, imp_shape_numel(in), x, y);
  return IMP_OK;
}

static int activation_backward(imp_layer *layer, double *xbar,
                               const double *ybar, const imp_shape *in,
                               const double *x, const double *y)
{
  const activation_state *st = imp_layer_state(layer);

  if (xbar != NULL)
    activation_backward_kernel(st->kind, imp_shape_numel(in), xbar, ybar, x, y);
  return IMP_OK;
}

static const imp_layer_ops activation_ops = {
    .kind = "activation",
    .output_shape = activation_output_shape,
    .forward = activation_forward,
    .backward = activation_backward,
    .rebind = NULL,
    .destroy = free,
};

int imp_activation_create(imp_activation kind, const char *name,
                          imp_layer **layer)
{
  activation_state *st;
  int rc;

  if (layer == NULL)
    return imp__fail(IMP_EINVAL, "activation_create: NULL output pointer");
  *layer = NULL;
  if (!activation_known(kind))
    return imp__fail(IMP_EINVAL, "activation_create: unknown kind %d",
                     (int)kind);

  st = malloc(sizeof *st);
  if (st == NULL)
    return imp__fail(IMP_ENOMEM, "activation_create");
  st->kind = kind;

  rc = imp_layer_create(&activation_ops, st, 0,
                        name != NULL ? name : imp_activation_name(kind), layer);
  if (rc != IMP_OK)
    free(st);
  return rc;
}

int imp_add(size_t n, const double *a, const double *b, double *y)
{
  if (a == NULL || b == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "add: NULL argument");

  for (size_t i = 0; i < n; i++)
    y[i] = a[i] + b[i];

  if (!imp__all_finite(y, n))
    return imp__fail(IMP_ENONFINITE, "add: NaN or Inf in the sum");
  return IMP_OK;
}

int imp_add_backward(size_t n, double *abar, double *bbar, const double *ybar)
{
  if (ybar == NULL)
    return imp__fail(IMP_EINVAL, "add_backward: NULL ybar");

  if (abar != NULL)
    for (size_t i = 0; i < n; i++)
      abar[i] += ybar[i];
  if (bbar != NULL)
    for (size_t i = 0; i < n; i++)
      bbar[i] += ybar[i];
  return IMP_OK;
}

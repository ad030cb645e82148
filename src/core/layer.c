/*
 * core/layer.c - the layer handle: storage, checks around forward and
 * backward, and the generic accessors.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp/layer.h"

struct imp_layer {
  const imp_layer_ops *ops;
  void *state;
  char name[48];
  size_t nparams;
  double *params; /* nparams */
  double *grads;  /* nparams */
  int owns_storage;
  int training;
};

size_t imp_shape_numel(const imp_shape *s)
{
  size_t m = imp_shape_sample(s);

  if (s->n != 0 && m > SIZE_MAX / s->n)
    return 0;
  return m * s->n;
}

size_t imp_shape_sample(const imp_shape *s)
{
  size_t m = s->c;

  if (s->h != 0 && m > SIZE_MAX / s->h)
    return 0;
  m *= s->h;
  if (s->w != 0 && m > SIZE_MAX / s->w)
    return 0;
  return m * s->w;
}

int imp_layer_create(const imp_layer_ops *ops, void *state, size_t nparams,
                     const char *name, imp_layer **out)
{
  imp_layer *l;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "layer_create: NULL output pointer");
  *out = NULL;
  if (ops == NULL || ops->output_shape == NULL || ops->forward == NULL ||
      ops->backward == NULL)
    return imp__fail(IMP_EINVAL, "layer_create: ops table lacks "
                                 "output_shape, forward or backward");

  l = calloc(1, sizeof *l);
  if (l == NULL)
    return imp__fail(IMP_ENOMEM, "layer_create");
  l->params = imp__dalloc(nparams);
  l->grads = imp__dalloc(nparams);
  if (l->params == NULL || l->grads == NULL) {
    free(l->params);
    free(l->grads);
    free(l);
    return imp__fail(IMP_ENOMEM, "layer_create: %zu parameters", nparams);
  }

  l->ops = ops;
  l->state = state;
  l->nparams = nparams;
  l->owns_storage = 1;
  l->training = 1;
  strncpy(l->name, name != NULL ? name : ops->kind, sizeof l->name - 1);
  *out = l;
  return IMP_OK;
}

void imp_layer_free(imp_layer *layer)
{
  if (layer == NULL)
    return;
  if (layer->ops->destroy != NULL)
    layer->ops->destroy(layer->state);
  if (layer->owns_storage) {
    free(layer->params);
    free(layer->grads);
  }
  free(layer);
}

int imp_layer_output_shape(const imp_layer *layer, const imp_shape *in,
                           imp_shape *out)
{
  if (layer == NULL || in == NULL || out == NULL)
    return imp__fail(IMP_EINVAL, "output_shape: NULL argument");
  return layer->ops->output_shape(layer, in, out);
}

int imp_layer_forward(imp_layer *layer, const imp_shape *in, const double *x,
                      double *y)
{
  imp_shape out;
  int rc;

  if (layer == NULL || in == NULL || x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "forward: NULL argument");
  IMP__TRY(layer->ops->output_shape(layer, in, &out));
  if (!imp__all_finite(x, imp_shape_numel(in)))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the input",
                     layer->name);
  if (!imp__all_finite(layer->params, layer->nparams))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the parameters",
                     layer->name);

  rc = layer->ops->forward(layer, in, x, y);
  if (rc != IMP_OK)
    return rc;
  if (!imp__all_finite(y, imp_shape_numel(&out)))
    return imp__fail(IMP_ENONFINITE, "%s: the output has NaN or Inf",
                     layer->name);
  return IMP_OK;
}

int imp_layer_backward(imp_layer *layer, double *xbar, const double *ybar,
                       const imp_shape *in, const double *x, const double *y)
{
  imp_shape out;

  if (layer == NULL || ybar == NULL || in == NULL || x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "backward: NULL argument");
  IMP__TRY(layer->ops->output_shape(layer, in, &out));
  if (!imp__all_finite(ybar, imp_shape_numel(&out)))
    return imp__fail(IMP_ENONFINITE,
                     "%s: NaN or Inf in the output "
                     "cotangent",
                     layer->name);
  return layer->ops->backward(layer, xbar, ybar, in, x, y);
}

size_t imp_layer_nparams(const imp_layer *layer)
{
  return layer != NULL ? layer->nparams : 0;
}

double *imp_layer_params(imp_layer *layer)
{
  return layer != NULL ? layer->params : NULL;
}

double *imp_layer_grads(imp_layer *layer)
{
  return layer != NULL ? layer->grads : NULL;
}

void imp_layer_zero_grad(imp_layer *layer)
{
  if (layer != NULL && layer->nparams > 0)
    memset(layer->grads, 0, layer->nparams * sizeof(double));
}

const char *imp_layer_name(const imp_layer *layer)
{
  return layer != NULL ? layer->name : "";
}

const char *imp_layer_kind(const imp_layer *layer)
{
  return layer != NULL ? layer->ops->kind : "";
}

void *imp_layer_state(const imp_layer *layer)
{
  return layer != NULL ? layer->state : NULL;
}

const imp_layer_ops *imp_layer_get_ops(const imp_layer *layer)
{
  return layer != NULL ? layer->ops : NULL;
}

void imp_layer_set_training(imp_layer *layer, int training)
{
  if (layer != NULL)
    layer->training = training != 0;
}

int imp_layer_training(const imp_layer *layer)
{
  return layer != NULL ? layer->training : 0;
}

int imp_layer_bind_storage(imp_layer *layer, double *params, double *grads)
{
  double *old_params, *old_grads;
  int owned, rc = IMP_OK;

  if (layer == NULL ||
      ((params == NULL || grads == NULL) && layer->nparams > 0))
    return imp__fail(IMP_EINVAL, "bind_storage: NULL argument");
  if (layer->nparams > 0) {
    memmove(params, layer->params, layer->nparams * sizeof(double));
    memmove(grads, layer->grads, layer->nparams * sizeof(double));
  }
  old_params = layer->params;
  old_grads = layer->grads;
  owned = layer->owns_storage;
  layer->params = params;
  layer->grads = grads;
  layer->owns_storage = 0;

  /* A container moves its children while the old storage still exists. */
  if (layer->ops->rebind != NULL)
    rc = layer->ops->rebind(layer);
  if (owned) {
    free(old_params);
    free(old_grads);
  }
  return rc;
}

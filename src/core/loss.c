/*
 * core/loss.c - mean squared error, mean absolute error and per-pixel
 * softmax cross-entropy.  The maths is in imp/loss.h.
 */
#include <math.h>
#include <string.h>

#include "core/internal.h"
#include "imp/loss.h"

/* The checks every element-wise loss shares. */
static int loss_check(const char *where, const imp_shape *shape,
                      const double *pred, const double *target,
                      const double *loss)
{
  if (shape == NULL || pred == NULL || target == NULL || loss == NULL)
    return imp__fail(IMP_EINVAL, "%s: NULL argument", where);
  if (imp_shape_numel(shape) == 0)
    return imp__fail(IMP_ESHAPE,
                     "%s: empty or oversized shape (%zu, %zu, "
                     "%zu, %zu)",
                     where, shape->n, shape->c, shape->h, shape->w);
  if (!imp__all_finite(pred, imp_shape_numel(shape)))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the prediction", where);
  if (!imp__all_finite(target, imp_shape_numel(shape)))
    return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in the target", where);
  return IMP_OK;
}

int imp_loss_mse(const imp_shape *shape, const double *pred,
                 const double *target, double *loss, double *grad)
{
  size_t n;
  double sum = 0.0;

  IMP__TRY(loss_check("loss_mse", shape, pred, target, loss));
  n = imp_shape_numel(shape);

  for (size_t i = 0; i < n; i++) {
    double d = pred[i] - target[i];

    sum += d * d;
    if (grad != NULL)
      grad[i] = 2.0 * d / (double)n;
  }

  *loss = sum / (double)n;
  if (!isfinite(*loss))
    return imp__fail(IMP_ENONFINITE, "loss_mse: the loss overflows");
  return IMP_OK;
}

int imp_loss_mae(const imp_shape *shape, const double *pred,
                 const double *target, double *loss, double *grad)
{
  size_t n;
  double sum = 0.0;

  IMP__TRY(loss_check("loss_mae", shape, pred, target, loss));
  n = imp_shape_numel(shape);

  for (size_t i = 0; i < n; i++) {
    double d = pred[i] - target[i];

    sum += fabs(d);
    if (grad != NULL)
      grad[i] = (d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0) / (double)n;
  }

  *loss = sum / (double)n;
  if (!isfinite(*loss))
    return imp__fail(IMP_ENONFINITE, "loss_mae: the loss overflows");
  return IMP_OK;
}

int imp_loss_softmax_xent(const imp_shape *shape, const double *logits,
                          const int *labels, const double *mask, double *loss,
                          double *grad)
{
  size_t classes, hw, pixels;
  double total = 0.0, weight = 0.0;

  /* Check the arguments: sizes, labels, mask, finiteness. */
  if (shape == NULL || logits == NULL || labels == NULL || loss == NULL)
    return imp__fail(IMP_EINVAL, "loss_softmax_xent: NULL argument");
  if (imp_shape_numel(shape) == 0)
    return imp__fail(IMP_ESHAPE,
                     "loss_softmax_xent: empty or oversized "
                     "shape (%zu, %zu, %zu, %zu)",
                     shape->n, shape->c, shape->h, shape->w);
  classes = shape->c;
  hw = shape->h * shape->w;
  pixels = shape->n * hw;
  for (size_t p = 0; p < pixels; p++) {
    if (labels[p] < 0 || (size_t)labels[p] >= classes)
      return imp__fail(IMP_EINVAL,
                       "loss_softmax_xent: label %d at pixel "
                       "%zu, expected 0 to %zu",
                       labels[p], p, classes - 1);
    if (mask != NULL && !isfinite(mask[p]))
      return imp__fail(IMP_ENONFINITE,
                       "loss_softmax_xent: NaN or Inf in "
                       "the mask at pixel %zu",
                       p);
    if (mask != NULL && mask[p] < 0)
      return imp__fail(IMP_EINVAL,
                       "loss_softmax_xent: mask %g < 0 at "
                       "pixel %zu",
                       mask[p], p);
    weight += mask != NULL ? mask[p] : 1.0;
  }
  if (!imp__all_finite(logits, imp_shape_numel(shape)))
    return imp__fail(IMP_ENONFINITE, "loss_softmax_xent: NaN or Inf in the "
                                     "logits");

  /* No pixel kept: the loss and its gradient are zero. */
  if (grad != NULL)
    memset(grad, 0, imp_shape_numel(shape) * sizeof(double));
  if (weight == 0.0) {
    *loss = 0.0;
    return IMP_OK;
  }

  /* One pixel at a time: its classes are hw apart. */
  for (size_t b = 0; b < shape->n; b++)
    for (size_t q = 0; q < hw; q++) {
      const double *z = logits + b * classes * hw + q;
      size_t p = b * hw + q;
      double m = mask != NULL ? mask[p] : 1.0;
      double zmax = z[0], sum = 0.0, lse;

      if (m == 0.0)
        continue;
      for (size_t c = 1; c < classes; c++)
        if (z[c * hw] > zmax)
          zmax = z[c * hw];
      for (size_t c = 0; c < classes; c++)
        sum += exp(z[c * hw] - zmax);
      lse = zmax + log(sum);
      total += m * (lse - z[(size_t)labels[p] * hw]);

      /* dL/dz_c = m (softmax_c - [c = label]) / weight. */
      if (grad != NULL) {
        double *g = grad + b * classes * hw + q;

        for (size_t c = 0; c < classes; c++)
          g[c * hw] = m * exp(z[c * hw] - lse) / weight;
        g[(size_t)labels[p] * hw] -= m / weight;
      }
    }

  *loss = total / weight;
  return IMP_OK;
}

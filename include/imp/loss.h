/*
 * imp/loss.h - losses: mean squared error, mean absolute error, and
 * per-pixel softmax cross-entropy with an optional mask.
 *
 * Each loss reduces a prediction p to a scalar L and writes dL/dp, the
 * cotangent that starts backward.  For a tensor of N = n c h w entries
 * with target t:
 *
 *     mse:  L = (1/N) sum_i (p_i - t_i)^2,   dL/dp_i = 2 (p_i - t_i) / N;
 *     mae:  L = (1/N) sum_i |p_i - t_i|,     dL/dp_i = sign(p_i - t_i) / N
 *           (0 where p_i = t_i, the subgradient that keeps it unmoved).
 *
 * Softmax cross-entropy reads a (n, classes, h, w) tensor of logits z as
 * one class distribution per pixel, q = softmax over the class axis, and
 * compares it with an integer label k in [0, classes) per pixel:
 *
 *     L = sum_pixels m (log sum_c e^{z_c} - z_k) / sum_pixels m,
 *     dL/dz_c = m (q_c - [c = k]) / sum_pixels m,
 *
 * with m the pixel's mask weight (every m = 1 without a mask), so L is the
 * mean negative log-likelihood over the pixels the mask keeps.  The log-sum
 * is taken after subtracting the pixel's largest logit, so no logit
 * overflows.  Labels are (n, h, w), row-major, one int per pixel; the mask
 * has the same layout, entries >= 0 (a 0/1 mask selects pixels, other
 * weights scale them).  A mask that keeps no pixel gives L = 0 and a zero
 * gradient.
 *
 * Ownership: the caller owns every buffer.  grad (size of the prediction)
 * is overwritten, not accumulated, and may be NULL when only L is wanted.
 * Statuses: IMP_EINVAL for NULL arguments, a label out of range or a
 * negative mask entry; IMP_ESHAPE for an empty or oversized shape;
 * IMP_ENONFINITE for NaN or Inf in the prediction, target or mask.
 */
#ifndef IMP_LOSS_H
#define IMP_LOSS_H

#include "imp/layer.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Mean squared error of pred against target, both of shape *shape. */
int imp_loss_mse(const imp_shape *shape, const double *pred,
                 const double *target, double *loss, double *grad);

/** Mean absolute error of pred against target, both of shape *shape. */
int imp_loss_mae(const imp_shape *shape, const double *pred,
                 const double *target, double *loss, double *grad);

/**
 * Softmax cross-entropy per pixel: logits of shape (n, classes, h, w),
 * labels and mask (may be NULL) of n h w entries each.
 */
int imp_loss_softmax_xent(const imp_shape *shape, const double *logits,
                          const int *labels, const double *mask, double *loss,
                          double *grad);

#ifdef __cplusplus
}
#endif

#endif /* IMP_LOSS_H */

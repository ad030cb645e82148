/*
 * model.h - the maze DEQ: a max-propagation map that is a contraction in
 * the sup norm by construction, and a scale-free head.
 *
 * Input x, per pixel: open o, start s, goal g (3 channels).  State z: C
 * non-negative channels per pixel.  The map is
 *
 *     h(x, z)(p) = o(p) relu(A m(p) + V x(p) + b),
 *     m_c(p) = max { z_c(q) : q an open 4-neighbour of p }  (0 if none),
 *
 * with A = W re-parameterized row by row, A_r = W_r min(1, gamma / |W_r|_1),
 * so that every row of A has absolute sum at most gamma < 1.  The maximum
 * over neighbours is 1-Lipschitz in the sup norm, relu and the wall mask
 * are too, and |A|_inf <= gamma, so
 *
 *     |h(x, z) - h(x, z')|_inf <= gamma |z - z'|_inf
 *
 * on every image size: a contraction with a unique fixed point, reached
 * from any start (Banach), whose bound does not depend on the maze's size
 * (a sup-norm bound of a local map is the same on every grid).  Information
 * moves one pixel per iteration and only along corridors.
 *
 * Head, per pixel p and direction e (4 of them), with q = p + e:
 *
 *     f_{e,c}(p) = o(p) o(q) tanh(k (z_c(q) - z_c(p)) /
 *                                  (z_c(q) + z_c(p) + eps)),
 *     logits(p) = W2 relu(W1 f(p) + V1 x(p) + b1) + b2   (2 classes),
 *
 * k = 2 / (1 - gamma).  The features compare each channel with its
 * neighbours by ratio, so they do not change when a channel is scaled: a
 * flood that decays like gamma^distance gives the same features at
 * distance 5 and at distance 5000.
 */
#ifndef IMP_MAZE_MODEL_H
#define IMP_MAZE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "imp/deq.h"
#include "imp/stack.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Architecture; the zero value means the defaults beside the fields. */
typedef struct maze_model_config {
  size_t channels;  /**< C, default 8 */
  size_t hidden;    /**< head width, default 16 */
  double gamma;     /**< sup-norm contraction bound, default 0.999 */
  int sources_only; /**< 1: b = 0 and no open-channel term in V x, so
                         only S and G feed the floods (default 0) */
} maze_model_config;

typedef struct maze_model maze_model;

/**
 * Make a model with parameters drawn from seed; deq (may be NULL) are the
 * DEQ options (solver, budgets, backward mode).  Free with
 * maze_model_free.
 */
int maze_model_create(const maze_model_config *cfg, uint64_t seed,
                      const imp_deq_options *deq, maze_model **out);

void maze_model_free(maze_model *m);

/** The stack (DEQ then head) that owns the parameters, for the optimizer
 *  and checkpoints. */
imp_stack *maze_model_stack(maze_model *m);

/** The DEQ layer (budgets, statistics, initial states). */
imp_layer *maze_model_deq(maze_model *m);

/** The configuration in use (defaults filled in). */
maze_model_config maze_model_get_config(const maze_model *m);

/**
 * logits (n, 2, h, w) for x (n, 3, h, w).  x must stay valid and
 * unchanged until the next forward (backward reads it).  logits may be
 * NULL (read them with maze_model_logits).
 */
int maze_model_forward(maze_model *m, const imp_shape *xs, const double *x,
                       double *logits);

/** The logits of the last forward (borrowed). */
const double *maze_model_logits(const maze_model *m);

/** The fixed point z* of the last forward (borrowed) and its shape. */
const double *maze_model_state(const maze_model *m, imp_shape *zs);

/** Accumulate parameter gradients for the cotangent of the logits. */
int maze_model_backward(maze_model *m, const double *logits_bar);

/** The map h(x, z) itself, for measuring residuals: out shaped as z. */
int maze_model_map(maze_model *m, const imp_shape *xs, const double *x,
                   const double *z, double *out);

#ifdef __cplusplus
}
#endif

#endif /* IMP_MAZE_MODEL_H */

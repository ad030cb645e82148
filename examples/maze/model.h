/*
 * model.h - the maze DEQ: flood maps that are contractions in the sup
 * norm by construction, and a scale-free head.
 *
 * Input x, per pixel: open o, start s, goal g (3 channels).  State z: C
 * non-negative channels per pixel (C even).  The fixed flood
 * (MAZE_MAP_FLOOD, C = 2 by default) is
 *
 *     h(x, z)_c(p) = o(p) max(gamma m_c(p), |v_c| x_src(c)(p)),
 *     m_c(p) = max { z_c(q) : q an open 4-neighbour of p }  (0 if none),
 *
 * where the first C/2 channels are fed by the start (src = s) and the
 * others by the goal (src = g), with learned gains v.  There is no bias
 * and no other input in the recurrence, so h is positively homogeneous in
 * (x-sources, z).  The maximum over neighbours, the maximum with a
 * constant and the wall mask are 1-Lipschitz in the sup norm, so
 *
 *     |h(x, z) - h(x, z')|_inf <= gamma |z - z'|_inf
 *
 * on every image size: a contraction with a unique fixed point, reached
 * from any start (Banach).  The fixed point is the geometric flood
 * z*_c(p) = |v_c| gamma^d(src, p), d the corridor distance (max-times
 * form of a shortest-path recursion), and plain iteration from zero
 * reaches it exactly after (largest distance + 1) steps.  The relu map
 * of the first version (MAZE_MAP_RELU, model.c) is kept for comparison:
 *
 *     h(x, z)(p) = o(p) relu(A m(p) + V x(p) + b),  |A_r|_1 <= gamma.
 *
 * The mixing flood (MAZE_MAP_MIX, C = 4 by default; imp-maze's default)
 * learns how the channels of each source feed each other:
 *
 *     h(x, z)_r(p) = o(p) max(sum_k A_rk m_k(p), |v_r| x_src(r)(p)),
 *     A_r = gamma softmax(W_r) over the channels of r's own half,
 *
 * A zero between the halves (W is C x C/2).  Its rows are non-negative
 * and sum to gamma: the same sup-norm bound gamma, still no bias, and a
 * fixed point that scales with v.  Why the halves must not mix is in
 * docs/maze.md.
 *
 * Head, per pixel p and direction e (4 of them), with q = p + e:
 *
 *     f_{e,c}(p) = o(p) o(q) tanh(k (z_c(q) - z_c(p)) /
 *                                  (z_c(q) + z_c(p))),
 *     logits(p) = W2 relu(W1 f(p) + V1 x(p) + b1) + b2   (2 classes),
 *
 * k = 2 / (1 - gamma).  The features compare each channel with its
 * neighbours by ratio, so they do not change when a channel is scaled: on
 * the flood z(q) / z(p) is 1/gamma (q nearer the source) or gamma, and the
 * features are +-tanh(2 / (1 + gamma)) at distance 5 and at distance 5000.
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

/** The maps: the fixed flood, the relu map of the first version, kept
 *  for comparison, and the flood with learned mixing. */
enum { MAZE_MAP_FLOOD = 0, MAZE_MAP_RELU = 1, MAZE_MAP_MIX = 2 };

/** Architecture; the zero value means the defaults beside the fields. */
typedef struct maze_model_config {
  size_t channels;  /**< C, default 2 (flood, even), 8 (relu) or 4 (mix,
                         even) */
  size_t hidden;    /**< head width, default 16 */
  double gamma;     /**< sup-norm contraction bound, default 0.999 */
  int sources_only; /**< 1: b = 0 and no open-channel term in V x, so
                         only S and G feed the floods (default 0);
                         relu map only */
  int kind;         /**< MAZE_MAP_FLOOD (the zero value), _RELU or _MIX
                         (imp-maze's default) */
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

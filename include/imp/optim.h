/*
 * imp/optim.h - first-order optimizers, gradient clipping and
 * learning-rate schedules.
 *
 * An optimizer updates a flat parameter vector p from its gradient g (for
 * a stack: imp_stack_params and imp_stack_grads) and keeps its own state.
 * Each kind is a const table, chosen by pointer as in GSL.  With learning
 * rate a, step count t = 1, 2, ... and weight decay lambda:
 *
 *   imp_optim_sgd      SGD with momentum mu (Polyak's heavy ball, in the
 *                      form of Sutskever et al., 2013):
 *                        b <- mu b + g,  d = b, or d = g + mu b (Nesterov),
 *                        p <- p - a d.
 *   imp_optim_adam     Adam (Kingma and Ba, 2015), bias-corrected:
 *                        m <- beta1 m + (1 - beta1) g,
 *                        v <- beta2 v + (1 - beta2) g^2,
 *                        p <- p - a (m / (1 - beta1^t)) /
 *                                   (sqrt(v / (1 - beta2^t)) + eps).
 *   imp_optim_rmsprop  RMSprop (Tieleman and Hinton, 2012):
 *                        s <- rho s + (1 - rho) g^2,  u = g / (sqrt(s) + eps),
 *                        b <- mu b + u,  p <- p - a b   (u itself if mu = 0).
 *
 * Weight decay is either coupled, an L2 term added to the gradient first,
 * g <- g + lambda p, or decoupled (Loshchilov and Hutter, 2019), a shrink
 * before the update, p <- p - a lambda p; Adam with decoupled decay is
 * AdamW.  All operations are elementwise; the state is zero at creation.
 *
 * Gradient clipping by global norm rescales g to g * c / ||g||_2 when
 * ||g||_2 > c.  Schedules give the learning rate as a function of the
 * step: step decay, cosine annealing (Loshchilov and Hutter, 2017) and
 * one-cycle (Smith, 2018: linear warm-up, then a cosine anneal).
 */
#ifndef IMP_OPTIM_H
#define IMP_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** An optimizer kind (a const table inside the library). */
typedef struct imp_optim_type imp_optim_type;

/** The kinds: pass one of these pointers to imp_optim_create. */
extern const imp_optim_type *const imp_optim_sgd;
extern const imp_optim_type *const imp_optim_adam;
extern const imp_optim_type *const imp_optim_rmsprop;

/** Hyperparameters; start from imp_optim_defaults().  A kind ignores the
 *  fields it does not use. */
typedef struct imp_optim_options {
  double lr;           /**< learning rate a >= 0; default 1e-3 */
  double weight_decay; /**< lambda >= 0; default 0 */
  int decoupled_decay; /**< 1: decoupled (AdamW); 0: L2 in g; default 0 */
  double momentum;     /**< SGD, RMSprop: mu in [0, 1); default 0 */
  int nesterov;        /**< SGD: Nesterov's momentum, needs mu > 0 */
  double beta1;        /**< Adam: in [0, 1); default 0.9 */
  double beta2;        /**< Adam: in [0, 1); default 0.999 */
  double rho;          /**< RMSprop: in [0, 1); default 0.99 */
  double eps;          /**< Adam, RMSprop: > 0; default 1e-8 */
} imp_optim_options;

/** The defaults written beside each field above. */
imp_optim_options imp_optim_defaults(void);

typedef struct imp_optim imp_optim;

/**
 * Make an optimizer of the given kind for n parameters; opt (may be NULL:
 * the defaults) is copied.  The caller owns *out and frees it with
 * imp_optim_free.  Returns IMP_EINVAL, saying which, for a hyperparameter
 * out of range.  On failure *out is NULL.
 */
int imp_optim_create(const imp_optim_type *type, size_t n,
                     const imp_optim_options *opt, imp_optim **out);

/** Free the optimizer and its state.  NULL is accepted. */
void imp_optim_free(imp_optim *optim);

/**
 * One update of params (n doubles, caller-owned, changed in place) from
 * grads (n doubles, borrowed, unchanged).  n must be the size given at
 * creation (IMP_ESHAPE otherwise).  NaN or Inf in params or grads returns
 * IMP_ENONFINITE and changes nothing.
 */
int imp_optim_step(imp_optim *optim, double *params, const double *grads,
                   size_t n);

/** Set the learning rate (for a schedule); IMP_EINVAL unless a >= 0 and
 *  finite. */
int imp_optim_set_lr(imp_optim *optim, double lr);

/** The current learning rate; 0 for NULL. */
double imp_optim_lr(const imp_optim *optim);

/** Zero the state and the step count, as at creation. */
int imp_optim_reset(imp_optim *optim);

/** The kind's name: "sgd", "adam" or "rmsprop"; "" for NULL. */
const char *imp_optim_name(const imp_optim *optim);

/** The number of parameters given at creation; 0 for NULL. */
size_t imp_optim_size(const imp_optim *optim);

/** Steps taken since creation or reset (t); 0 for NULL. */
uint64_t imp_optim_steps(const imp_optim *optim);

/** Set t (a checkpoint restores it; Adam's bias correction uses it). */
int imp_optim_set_steps(imp_optim *optim, uint64_t steps);

/**
 * The state vector, owned by the optimizer (a checkpoint saves and
 * restores it through this pointer): state_size doubles, k blocks of n,
 * SGD: b; Adam: m then v; RMSprop: s then b.
 */
double *imp_optim_state(imp_optim *optim);

/** The state's length in doubles (n, 2n or 2n); 0 for NULL. */
size_t imp_optim_state_size(const imp_optim *optim);

/**
 * Clip by global norm: if ||grads||_2 > max_norm, scale grads (n doubles,
 * caller-owned, changed in place) by max_norm / ||grads||_2.  *norm
 * (may be NULL) receives the norm before clipping.  Returns IMP_EINVAL
 * unless max_norm > 0, IMP_ENONFINITE (grads unchanged) if the norm is
 * not finite.
 */
int imp_clip_grad_norm(double *grads, size_t n, double max_norm, double *norm);

/** Learning-rate schedules. */
typedef enum imp_schedule_kind {
  IMP_SCHEDULE_CONSTANT = 0, /**< lr */
  IMP_SCHEDULE_STEP = 1,     /**< lr * gamma^floor(t / step_size) */
  IMP_SCHEDULE_COSINE = 2,   /**< lr_min + (lr - lr_min)(1 + cos(pi t/T))/2,
                                  lr_min for t >= T = total */
  IMP_SCHEDULE_ONE_CYCLE = 3 /**< lr_start + (lr - lr_start) t / warmup for
                                  t < warmup, then a cosine from lr down to
                                  lr_min over the remaining total - warmup
                                  steps, lr_min after */
} imp_schedule_kind;

/** A schedule is a plain value; the fields its kind does not use are
 *  ignored. */
typedef struct imp_schedule {
  imp_schedule_kind kind;
  double lr;          /**< the base (or, for one-cycle, the peak) rate */
  double lr_min;      /**< cosine, one-cycle: the final rate */
  double lr_start;    /**< one-cycle: the rate at t = 0 */
  double gamma;       /**< step: the decay factor, > 0 */
  uint64_t step_size; /**< step: steps between decays, > 0 */
  uint64_t warmup;    /**< one-cycle: warm-up steps, < total */
  uint64_t total;     /**< cosine, one-cycle: steps to lr_min, > 0 */
} imp_schedule;

/**
 * *lr = the schedule's rate at step t (t = 0 for the first update).
 * Returns IMP_EINVAL, saying which, for fields out of range (negative or
 * non-finite rates, zero lengths, warmup >= total).
 */
int imp_schedule_lr(const imp_schedule *schedule, uint64_t step, double *lr);

#ifdef __cplusplus
}
#endif

#endif /* IMP_OPTIM_H */

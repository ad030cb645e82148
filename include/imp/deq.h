/*
 * imp/deq.h - deep equilibrium (DEQ) layers.
 *
 * A DEQ layer's output is a fixed point of a weight-tied map,
 *
 *     z* = h(x, z*; theta),
 *
 * the limit of a network of "infinite depth" z_{k+1} = h(x, z_k) (Bai,
 * Kolter and Koltun, NeurIPS 2019).  Forward finds z* with one of the
 * fixed-point solvers of imp/fixed_point.h, per sample, within a budget.
 * Each sample stops on its own when ||h(z) - z|| <= atol or
 * ||h(z) - z|| <= rtol ||h(z)||.  On a map with no fixed point the
 * relative test alone can accept iterates that run off to infinity, where
 * ||h(z) - z|| / ||h(z)|| -> 0: give such a map a budget with atol and
 * rtol = 0.  A sample whose h(z) holds NaN or Inf leaves the solve with its
 * best finite iterate while the others go on, and forward then returns
 * IMP_ENONFINITE naming the first such sample.
 *
 * As an implicit problem its residual is f(x, z) = z - h(x, z), so
 * df/dz = I - dh/dz, and three backward modes are offered:
 *
 *   IMP_DEQ_IMPLICIT  the shared adjoint solve of imp/adjoint.h on
 *                     f = z - h: (I - dh/dz)^T v = -ybar, then
 *                     xbar = -(dh/dx)^T v, thetabar = -(dh/dtheta)^T v.
 *                     With IMP_ADJOINT_FIXED_POINT the adjoint is the fixed
 *                     point u = (dh/dz)^T u + ybar (u = -v) found by the
 *                     same solver family as the forward; GMRES and dense LU
 *                     work too.  Exact at an exact fixed point.
 *   IMP_DEQ_PHANTOM   the phantom gradient (Geng et al., NeurIPS 2021):
 *                     k damped steps z_{i+1} = (1 - l) z_i + l h(x, z_i)
 *                     from z_0 = z* held constant; training forward returns
 *                     z_k and backward differentiates those k steps
 *                     exactly.  k = 1 is the one-step (Jacobian-free)
 *                     gradient.  Cheap and approximate: its error shrinks
 *                     like the k-th power of the damped map's contraction.
 *   IMP_DEQ_UNROLLED  plain backpropagation through K damped steps from the
 *                     initial state, for comparison: training forward runs
 *                     exactly K steps (no solver) and backward is exact for
 *                     that truncated network.  Memory grows with K.
 *
 * In evaluation mode (imp_layer_set_training(layer, 0)) forward always
 * solves for z* with the evaluation budget, which may be larger than the
 * training one: more test-time compute, the same parameters.
 *
 * The map works on a batch at once, so that a dense or convolutional h
 * runs on matrix-matrix products; the solver calls it only on the samples
 * that have not yet converged, packed together.  Shapes: x is (n, cx, H, W)
 * as given to forward, z is (n, z_channels, H, W) with the same H and W,
 * so a convolutional DEQ trained on small images runs on large ones.
 *
 * Example: the scalar DEQ z = tanh(w z + x), whose implicit derivative is
 * dz/dx = h' / (1 - w h') with h' = 1 - z^2.
 *
 *     static int map(void *ctx, const imp_shape *xs, const double *x,
 *                    const imp_shape *zs, const double *z,
 *                    const double *theta, double *out)
 *     {
 *       (void)ctx; (void)xs;
 *       for (size_t i = 0; i < zs->n; i++)
 *         out[i] = tanh(theta[0] * z[i] + x[i]);
 *       return 0;
 *     }
 *     static int vjp(void *ctx, const imp_shape *xs, const double *x,
 *                    const imp_shape *zs, const double *z,
 *                    const double *theta, const double *v, double *vz,
 *                    double *vx, double *vtheta)
 *     {
 *       (void)ctx; (void)xs;
 *       for (size_t i = 0; i < zs->n; i++) {
 *         double h = tanh(theta[0] * z[i] + x[i]), d = v[i] * (1 - h * h);
 *         if (vz != NULL) vz[i] = theta[0] * d;
 *         if (vx != NULL) vx[i] += d;
 *         if (vtheta != NULL) vtheta[0] += d * z[i];
 *       }
 *       return 0;
 *     }
 *
 *     imp_deq_map m = {.ntheta = 1, .x_channels = 1, .z_channels = 1,
 *                      .map = map, .vjp = vjp};
 *     imp_deq_options opt = {.train = {.max_iter = 100, .rtol = 1e-10}};
 *     double w = 0.5, x[2] = {0.3, -1.0}, z[2], zbar[2] = {1, 1};
 *     double xbar[2] = {0, 0};
 *     imp_shape in = {2, 1, 1, 1};
 *     imp_layer *deq;
 *
 *     imp_deq_create(&m, &w, &opt, "deq", &deq);
 *     imp_layer_forward(deq, &in, x, z);          z = {0.50083, -0.89522}
 *     imp_layer_backward(deq, xbar, zbar, &in, x, z);
 *                                   xbar = {1.19787, 0.22047} = dz/dx
 *     imp_layer_free(deq);
 *
 * (Check every status in real code.)
 */
#ifndef IMP_DEQ_H
#define IMP_DEQ_H

#include <stddef.h>

#include "imp/adjoint.h"
#include "imp/fixed_point.h"
#include "imp/layer.h"

#ifdef __cplusplus
extern "C" {
#endif

/** out = h(x, z; theta) for the batch in the shapes; out shaped as z. */
typedef int (*imp_deq_map_fn)(void *ctx, const imp_shape *xs, const double *x,
                              const imp_shape *zs, const double *z,
                              const double *theta, double *out);

/**
 * Vector-Jacobian products of h with v (shaped as z):
 *   vjp_z      = v^T dh/dz      (shaped as z, overwritten),
 *   vjp_x     += v^T dh/dx      (shaped as x, accumulated),
 *   vjp_theta += v^T dh/dtheta  (ntheta, accumulated, summed over batch).
 * Any output may be NULL: not needed.
 */
typedef int (*imp_deq_vjp_fn)(void *ctx, const imp_shape *xs, const double *x,
                              const imp_shape *zs, const double *z,
                              const double *theta, const double *v,
                              double *vjp_z, double *vjp_x, double *vjp_theta);

/** The weight-tied map of a DEQ; ctx is not owned by the layer. */
typedef struct imp_deq_map {
  size_t ntheta;      /**< parameters of h */
  size_t x_channels;  /**< channels of x per pixel; 0 accepts any */
  size_t z_channels;  /**< channels (features) of z per pixel */
  imp_deq_map_fn map; /**< required */
  imp_deq_vjp_fn vjp; /**< required for training */
  void *ctx;
} imp_deq_map;

typedef enum imp_deq_backward {
  IMP_DEQ_IMPLICIT = 0,
  IMP_DEQ_PHANTOM,
  IMP_DEQ_UNROLLED
} imp_deq_backward;

/** Where the solver starts. */
typedef enum imp_deq_init {
  IMP_DEQ_INIT_ZERO = 0, /**< z_0 = 0 */
  IMP_DEQ_INIT_PREVIOUS, /**< the last fixed point, if the shape matches */
  IMP_DEQ_INIT_GIVEN     /**< the state set by imp_deq_set_initial */
} imp_deq_init;

/** A solve budget; zero fields mean the defaults of the options.  Only the
 *  iterations run cost memory, so a generous max_iter costs nothing. */
typedef struct imp_deq_budget {
  size_t max_iter; /**< training default 30, evaluation default 100 */
  double rtol;     /**< training default 1e-4, evaluation default 1e-6 */
  double atol;     /**< default 0 (off) */
} imp_deq_budget;

/** Options; zero-initialized means the defaults beside each field. */
typedef struct imp_deq_options {
  const imp_fp_type *solver; /**< default imp_fp_anderson */
  imp_fp_options fp;         /**< memory, damping, ridge (tolerances and budgets
                           come from train and eval) */
  imp_deq_budget train, eval;
  imp_deq_backward backward; /**< default IMP_DEQ_IMPLICIT */
  /** Implicit mode's adjoint solve.  Defaults: IMP_ADJOINT_FIXED_POINT;
   *  with that method (by default or chosen) the forward's solver and its
   *  memory, damping and ridge; and max_iter and rtol from the training
   *  budget, following imp_deq_set_budget when it replaces that budget. */
  imp_adjoint_options adjoint;
  size_t phantom_steps;   /**< k, default 5 */
  double phantom_damping; /**< l, default 0.5 */
  size_t unroll_steps;    /**< K, default the training max_iter (following
                               imp_deq_set_budget) */
  double unroll_damping;  /**< default 1 */
  imp_deq_init init;      /**< default IMP_DEQ_INIT_ZERO */
  int noconv_ok; /**< if set, an exhausted budget returns IMP_OK with the
                      best iterate and is visible only in the statistics;
                      by default it is IMP_ENOCONV */
} imp_deq_options;

/** Statistics of the last forward and backward. */
typedef struct imp_deq_stats {
  int forward_status;  /**< the last solve's status, before noconv_ok:
                            IMP_OK, IMP_ENOCONV, IMP_ENONFINITE (samples
                            dropped for NaN or Inf), or the failure that
                            stopped it; IMP_OK for unrolled steps */
  size_t iterations;   /**< solver iterations (the most of any sample) */
  size_t evaluations;  /**< evaluations of h, counted per sample */
  double abs_residual; /**< max over the batch of ||h(z) - z|| at z (a
                            dropped sample's at its best finite iterate,
                            Inf if it had none) */
  double rel_residual; /**< max over the batch of ||h(z) - z|| / ||h(z)|| */
  size_t converged;    /**< samples within tolerance; never a dropped one */
  size_t batch;        /**< samples in the last forward */
  const double *trace; /**< worst relative residual per iteration over the
                             active finite samples, owned by the layer,
                             valid until the next forward */
  size_t trace_len;
  size_t backward_iterations; /**< adjoint iterations or unrolled steps */
  size_t backward_vjp_calls;  /**< vjp calls of the last backward */
  double backward_residual;   /**< relative residual of the adjoint */
} imp_deq_stats;

/**
 * Make a DEQ layer.  map is copied (its ctx is borrowed and must outlive
 * the layer); theta0 (ntheta values, may be NULL for zeros) is copied into
 * the layer's parameters; opt may be NULL.  The options are judged as
 * imp_deq_set_budget judges a budget, except that zeros mean defaults:
 * a NaN, infinite or negative tolerance, damping, ridge or adjoint rtol,
 * and an unknown backward or init, are IMP_EINVAL.  Returns IMP_OK,
 * IMP_EINVAL, IMP_ENONFINITE (theta0), IMP_ENOMEM.
 */
int imp_deq_create(const imp_deq_map *map, const double *theta0,
                   const imp_deq_options *opt, const char *name,
                   imp_layer **out);

/**
 * Make a DEQ whose map is built from layers,
 *
 *     h(u, z) = core(z_layer(z) + u),
 *
 * where u is the DEQ's input, with as many channels as z_layer produces,
 * and core maps back to z_channels.  For z = tanh(W z + U x + b), put a
 * dense U before the DEQ in a stack, and pass a dense W (with b) and a tanh
 * activation; for a convolutional DEQ, 3x3 convolutions and activations in
 * a stack as core.  The DEQ takes ownership of both layers on success; on
 * failure they stay the caller's.  Their parameters become the DEQ's,
 * z_layer's first.  The vjp runs the layers' forward again at the z it is
 * asked about, so it costs about two evaluations of h.
 */
int imp_deq_create_from_layers(size_t z_channels, imp_layer *z_layer,
                               imp_layer *core, const imp_deq_options *opt,
                               const char *name, imp_layer **out);

/**
 * Replace the training (training = 1) or evaluation (0) budget of a DEQ
 * layer, e.g. to spend more iterations at test time.  Unlike the options,
 * nothing here has a default: max_iter = 0, a negative or non-finite
 * tolerance, or no tolerance at all is IMP_EINVAL.  A new training budget
 * also moves what was left to default from it: the adjoint's max_iter and
 * rtol and unroll_steps.
 */
int imp_deq_set_budget(imp_layer *layer, int training,
                       const imp_deq_budget *budget);

/** Copy the statistics of the last forward/backward of a DEQ layer. */
int imp_deq_get_stats(const imp_layer *layer, imp_deq_stats *stats);

/** Set the initial state used with IMP_DEQ_INIT_GIVEN: numel(zs) values
 *  shaped as z, copied. */
int imp_deq_set_initial(imp_layer *layer, const imp_shape *zs,
                        const double *z0);

/**
 * Estimate the spectral radius of dh/dz at the last fixed point by power
 * iteration on the vjp (the largest over the batch, since the batch's
 * Jacobian is block diagonal).  x is the input of the last forward.
 * Below 1 means the map contracts locally.
 */
int imp_deq_spectral_radius(imp_layer *layer, const double *x,
                            size_t iterations, double *rho);

#ifdef __cplusplus
}
#endif

#endif /* IMP_DEQ_H */

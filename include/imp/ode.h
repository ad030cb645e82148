/*
 * imp/ode.h - neural ODE layers on SUNDIALS CVODES, with adjoint
 * gradients.
 *
 * The layer maps an initial state x to the solution of an initial value
 * problem at K output times t0 <= t_1 < t_2 < ... < t_K:
 *
 *     dh/dt = g(t, h; theta),   h(t0) = x,   y_k = h(t_k),
 *
 * with h in R^d and theta in R^ntheta (the layer's parameters).  The
 * forward solve is CVODES (Hindmarsh et al., 2005): variable-order,
 * variable-step Adams-Moulton (non-stiff, orders 1 to 12) or BDF (stiff,
 * orders 1 to 5), with either fixed-point (functional) iteration or
 * Newton's method on the implicit corrector equations.  Newton's linear
 * systems use a direct LU (dense, or banded for a batch) when the field
 * gives its Jacobian, otherwise matrix-free GMRES (SPGMR) on the field's
 * jvp, or on CVODES' own difference quotient of g when there is no jvp.
 *
 * Gradients come from the continuous adjoint (Pontryagin's costate; used
 * for neural ODEs by Chen, Rubanova, Bettencourt and Duvenaud, 2018; the
 * form below is CVODES' adjoint module, Cao, Li, Petzold and Serban,
 * 2003).  For a loss L(y_1, ..., y_K) with cotangents ybar_k = dL/dy_k,
 * the adjoint lambda(t) = dL/dh(t) solves, backwards in time,
 *
 *     dlambda/dt = -(dg/dh)^T lambda,        lambda(t_K) = ybar_K,
 *     lambda(t_k-) = lambda(t_k+) + ybar_k   at each earlier output time,
 *
 * and the gradients are
 *
 *     xbar     = lambda(t0),
 *     thetabar = integral from t0 to t_K of (dg/dtheta)^T lambda dt.
 *
 * Both right-hand sides are vector-Jacobian products, so the backward
 * pass needs only the field's vjp: the same callback contract as every
 * implicit problem (imp/problem.h).  In CVODES terms the adjoint is the
 * backward problem yB = lambda with fB = -vjp_h(lambda) (CVodeCreateB,
 * CVodeInitB), and thetabar is its backward quadrature qB with
 * dqB/dt = -vjp_theta(lambda), qB(t_K) = 0 (CVodeQuadInitB), so that
 * qB(t0) = thetabar.  At each earlier output time the backward problem
 * stops, ybar_k is added to lambda, and it restarts from there
 * (CVodeReInitB, CVodeQuadReInitB with the quadrature so far).  Each
 * restart begins again at order 1 with a small step, so output times
 * cost backward steps: with 10 output times the backward pass of
 * bench/bench_ode.c takes twice the steps it takes with one.
 *
 * lambda's equation needs h(t) on the way back.  The forward pass keeps
 * checkpoints every checkpoint_steps steps (CVodeAdjInit); the backward
 * pass integrates forward again from each checkpoint and interpolates h
 * between the stored steps, by cubic Hermite or by CVODES' variable-degree
 * polynomial.  Memory is O((steps / checkpoint_steps + checkpoint_steps) d)
 * per sample; the time is one adjoint solve plus at most one forward
 * recomputation (none when the forward took fewer than checkpoint_steps
 * steps, since the last interval's data are kept).
 *
 * The vector field.  imp_ode_field uses imp_problem's callback types with
 * the time passed as the input x: x = &t (nx = 1), y = h, r = g.  So
 *
 *     rhs(ctx, &t, h, theta, out)                out = g(t, h; theta)
 *     vjp(ctx, &t, h, theta, v, vjp_h, NULL, vjp_theta)
 *                                                vjp_h = v^T dg/dh
 *                                                (overwritten),
 *                                                vjp_theta += v^T dg/dtheta
 *     jvp(ctx, &t, h, theta, u, out)             out = (dg/dh) u
 *     jacobian(ctx, &t, h, theta, jac)           jac = dg/dh, d x d
 *                                                row-major
 *
 * A map written once for an implicit problem with nx = 1 (or nx = 0, which
 * ignores x) is a vector field as it stands; imp_ode_field_from_problem
 * copies it over.  The layer never asks for the derivative in t (vjp_x is
 * NULL), and either of vjp_h and vjp_theta may be NULL: CVODES evaluates
 * the adjoint's right-hand side and its quadrature at different points, so
 * the layer asks for one at a time.  theta is the layer's parameter
 * vector.  Callbacks return 0 on success; any other value is a failure,
 * reported as IMP_ECALLBACK (CVODES is told it is unrecoverable).  A
 * result with NaN or Inf is reported to CVODES as recoverable, so that it
 * can retry with a smaller step (a trial step may overshoot into a region
 * where g overflows); after 10 such results in one CVODES call, or when
 * CVODES stalls in front of them, the layer returns IMP_ENONFINITE, even
 * if CVODES would have stepped on.  From a failure, or the 10th
 * non-finite result, to the end of that CVODES call no callback is called
 * again: the layer answers CVODES itself, since CVODES 6.4.1 retries a
 * failed rhs under fixed-point iteration up to about max_steps times.
 *
 * Quadrature components.  With opt.quadratures = nq > 0 the last nq
 * components q of h = (y, q) are integrals, q(t) = q(t0) + int g_q dt:
 * the field must make no component of g depend on q.  CVODES then
 * integrates them as quadratures (CVodeQuadInit, in the error test at the
 * forward tolerances, the last nq entries of atol_vec for theirs) instead
 * of in the corrector's equations, and their adjoint, constant between
 * output times, stays out of the backward system.  This is how a running
 * cost such as int |g|^2 dt, or CVODES' own G = int y3 dt in the
 * Robertson example, enters a loss as an output.  The rhs is then called
 * once more per step, for the quadratures.
 *
 * Shapes.  The input is a batch of n initial states, shape (n, c, h, w)
 * with c h w = d.  The output has shape (n, K d, 1, 1): sample b's state
 * at time t_k, component j, sits at y[b K d + k d + j], so each sample's
 * row is its trajectory, time-major.  An output time equal to t0 gives x
 * itself.
 *
 * Batches.  By default (IMP_ODE_BATCH_SYSTEM) the batch is stacked into
 * one CVODES system of n d equations: CVODES' per-step work (its vector
 * operations and error norms, and, backward, the history arrays of the
 * ntheta-long thetabar quadrature) is paid once for the batch instead of
 * once per sample.  The price: all samples share the step that the
 * hardest of them needs, and the error test is a weighted RMS over the
 * whole batch, so one sample's local error may exceed the tolerances by
 * up to sqrt(n).  A dense Jacobian for the system is block diagonal and is
 * stored and factored as a band of half-width d - 1 (SUNBandMatrix),
 * O(n d^3) work.  IMP_ODE_BATCH_SAMPLES makes each sample its own CVODES
 * problem, with its own steps, order and error test, so that rtol and atol
 * hold for every trajectory and a hard sample does not slow the easy ones;
 * its backward quadrature's history arrays (about (max_order + 5) ntheta
 * doubles) are then allocated for one sample at a time.
 *
 * Measured (bench/bench_ode.c, two full runs of build/bench/bench_ode on
 * a shared 2-core machine: a tanh MLP field, batch 20, 10 output times,
 * Adams, rtol 1e-7): a plain forward costs about the same either way (per
 * sample, g is evaluated nearly half as often; as one system, CVODES
 * takes a tenth of the steps), but a gradient costs 3.1 to 4.0 times less
 * as one system (the scaling_ lines' gradient_ms, per sample over one
 * system), and its cost over a forward stays between 7 and 13, with no
 * trend, from 10^2 to 10^5 parameters, while per sample it rises from 18
 * to 40: there CVODES' bookkeeping of the thetabar quadrature grows with
 * steps times ntheta, over 13 to 14 times as many backward steps (4036 to
 * 4704 against 297 to 335).  Hence the default.
 *
 * Statuses.  Every failing CVODES call becomes a status whose message
 * names CVODES' flag as CVodeGetReturnFlagName spells it (from a table of
 * the layer's own: that function crashes when malloc fails) and carries
 * CVODES' own message, which the layer records instead of letting
 * SUNDIALS print it:
 *   IMP_ENOCONV     CV_TOO_MUCH_WORK (max_steps reached before an output
 *                   time), CV_TOO_MUCH_ACC, CV_ERR_FAILURE,
 *                   CV_CONV_FAILURE: the integrator could not meet the
 *                   tolerances within its budget;
 *   IMP_ECALLBACK   a callback returned non-zero;
 *   IMP_ENONFINITE  NaN or Inf in x, theta, ybar or a callback's result
 *                   that CVODES could not step around;
 *   IMP_EINVAL      bad options or times (spans too short for CVODES
 *                   among them, see imp_ode_create), a missing vjp for
 *                   gradients;
 *   IMP_ENOMEM      allocation failures (CV_MEM_FAIL included);
 *   IMP_EBACKEND    any other CVODES failure.
 * The SUNDIALS context and every CVODES object are freed on every path.
 *
 * Threads: one layer must not run on two threads at once (it keeps the
 * CVODES memories between forward and backward).
 *
 * Example: dh/dt = -theta h, so h(T) = x e^(-theta T).
 *
 *     static int decay_rhs(void *ctx, const double *t, const double *h,
 *                          const double *theta, double *out)
 *     {
 *       (void)ctx; (void)t;
 *       out[0] = -theta[0] * h[0];
 *       return 0;
 *     }
 *
 *     static int decay_vjp(void *ctx, const double *t, const double *h,
 *                          const double *theta, const double *v,
 *                          double *vjp_h, double *vjp_t, double *vjp_theta)
 *     {
 *       (void)ctx; (void)t; (void)vjp_t;
 *       if (vjp_h != NULL)
 *         vjp_h[0] = -theta[0] * v[0];
 *       if (vjp_theta != NULL)
 *         vjp_theta[0] += -h[0] * v[0];
 *       return 0;
 *     }
 *
 *     imp_ode_field field = {.d = 1, .ntheta = 1, .rhs = decay_rhs,
 *                            .vjp = decay_vjp};
 *     double times[1] = {2.0}, x[1] = {3.0}, y[1], ybar[1] = {1.0};
 *     double xbar[1] = {0.0};
 *     imp_ode_options opt = {.rtol = 1e-10, .atol = 1e-12};
 *     imp_shape in = {1, 1, 1, 1};
 *     imp_layer *ode;
 *
 *     imp_ode_create(&field, 0.0, times, 1, &opt, "decay", &ode);
 *     imp_layer_params(ode)[0] = 0.5;
 *     imp_layer_forward(ode, &in, x, y);        // y = 3 e^-1
 *     imp_layer_backward(ode, xbar, ybar, &in, x, y);
 *     // xbar[0] = e^-1, imp_layer_grads(ode)[0] = -2 * 3 e^-1
 *     imp_layer_free(ode);
 *
 * (Check every status in real code.)
 */
#ifndef IMP_ODE_H
#define IMP_ODE_H

#include <stddef.h>

#include "imp/layer.h"
#include "imp/problem.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * A vector field g(t, h; theta) with its derivatives, through the
 * callback types of imp/problem.h (the time is passed as x = &t).  A plain
 * value; the layer copies it and never owns ctx.
 */
typedef struct imp_ode_field {
  size_t d;                 /**< state size, > 0 */
  size_t ntheta;            /**< number of parameters (may be 0) */
  imp_residual_fn rhs;      /**< out = g(t, h; theta); required */
  imp_vjp_fn vjp;           /**< required for gradients */
  imp_jvp_fn jvp;           /**< optional: Newton-Krylov uses it */
  imp_jacobian_fn jacobian; /**< optional: dense Newton uses it */
  void *ctx;                /**< passed to every callback */
} imp_ode_field;

/**
 * Make a vector field from an implicit problem whose residual is g, with
 * nx = 0 or 1 (x[0] is the time).  The callbacks and ctx are copied; the
 * problem's ctx stays the caller's.  Returns IMP_EINVAL for nx > 1, no
 * residual or ny = 0.
 */
int imp_ode_field_from_problem(const imp_problem *problem,
                               imp_ode_field *field);

/** The linear multistep method. */
typedef enum imp_ode_method {
  IMP_ODE_ADAMS = 0, /**< Adams-Moulton, non-stiff (the default) */
  IMP_ODE_BDF = 1    /**< backward differentiation formulas, stiff */
} imp_ode_method;

/** The iteration on the implicit corrector equations. */
typedef enum imp_ode_iteration {
  IMP_ODE_ITER_AUTO = 0,        /**< fixed point for Adams, Newton for BDF */
  IMP_ODE_ITER_FIXED_POINT = 1, /**< SUNNonlinSol_FixedPoint (Anderson
                                     acceleration if anderson_m > 0) */
  IMP_ODE_ITER_NEWTON = 2       /**< SUNNonlinSol_Newton with a linear solver */
} imp_ode_iteration;

/** Newton's linear solver. */
typedef enum imp_ode_linsol {
  IMP_ODE_LINSOL_AUTO = 0,  /**< dense if the field has a jacobian, else
                                 SPGMR */
  IMP_ODE_LINSOL_DENSE = 1, /**< SUNDenseMatrix + SUNLinSol_Dense (a band
                                 matrix and SUNLinSol_Band for a batch as
                                 one system); the Jacobian from the
                                 jacobian callback, else from d jvps, else
                                 CVODES' difference quotient (backward:
                                 from d vjps) */
  IMP_ODE_LINSOL_SPGMR = 2  /**< matrix-free GMRES: forward on the jvp or
                                 CVODES' difference quotient, backward on
                                 the vjp */
} imp_ode_linsol;

/** How the backward pass rebuilds h(t) between checkpoints. */
typedef enum imp_ode_interp {
  IMP_ODE_HERMITE = 0,   /**< cubic Hermite (CV_HERMITE), the default */
  IMP_ODE_POLYNOMIAL = 1 /**< variable-degree polynomial (CV_POLYNOMIAL) */
} imp_ode_interp;

/** How a batch is integrated (see the header comment). */
typedef enum imp_ode_batch {
  IMP_ODE_BATCH_SYSTEM = 0, /**< the batch as one system of n d */
  IMP_ODE_BATCH_SAMPLES = 1 /**< one CVODES problem per sample */
} imp_ode_batch;

/**
 * Options.  A zero field means the default written beside it; NULL means
 * all defaults.  The struct is copied at creation (atol_vec too).
 */
typedef struct imp_ode_options {
  imp_ode_method method;       /**< default IMP_ODE_ADAMS */
  imp_ode_iteration iteration; /**< default IMP_ODE_ITER_AUTO */
  imp_ode_linsol linsol;       /**< default IMP_ODE_LINSOL_AUTO */
  double rtol;                 /**< relative tolerance; default 1e-6 */
  double atol;                 /**< absolute tolerance; default 1e-8 */
  const double *atol_vec;      /**< d per-component absolute tolerances
                                    (replace atol forward); default NULL */
  double adjoint_rtol;         /**< lambda and thetabar; default rtol */
  double adjoint_atol;         /**< lambda; default atol */
  double adjoint_atol_quad;    /**< thetabar; default adjoint_atol */
  int quad_errcon_off;         /**< 1: leave thetabar out of the backward
                                    error test; default 0 (in it) */
  long max_steps;              /**< steps allowed to reach each output
                                    time (CVODES mxstep); default 5000 */
  long adjoint_max_steps;      /**< the same backward; default max_steps */
  long checkpoint_steps;       /**< steps between checkpoints; default 100 */
  imp_ode_interp interp;       /**< default IMP_ODE_HERMITE */
  int max_order;               /**< default 12 (Adams) or 5 (BDF) */
  int anderson_m;              /**< fixed point: Anderson depth; default 0 */
  int krylov_dim;              /**< SPGMR: Krylov dimension; default 5 */
  double init_step;            /**< first step; default 0: CVODES estimates */
  double max_step;             /**< largest step; default 0: unbounded */
  imp_ode_batch batch;         /**< default IMP_ODE_BATCH_SYSTEM */
  size_t quadratures;          /**< the last this many components of h are
                                    integrals (see above); default 0 */
} imp_ode_options;

/**
 * What one pass did, summed over the batch.  A failed pass counts the
 * work up to its failure (per sample: that of the samples integrated so
 * far, the failing one included).
 */
typedef struct imp_ode_pass_stats {
  long steps;             /**< CVODES steps (backward: adjoint steps) */
  long rhs_evals;         /**< g evaluations, difference quotients
                               included; backward: the forward
                               recomputation between checkpoints */
  long vjp_evals;         /**< vjp callback calls */
  long jvp_evals;         /**< jvp callback calls */
  long jacobian_evals;    /**< dense Jacobians assembled (per sample) */
  long error_test_fails;  /**< steps rejected by the error test */
  long nonlin_iters;      /**< corrector iterations */
  long nonlin_conv_fails; /**< corrector convergence failures */
  long linear_iters;      /**< SPGMR iterations */
} imp_ode_pass_stats;

/** Statistics of the latest forward and the latest backward. */
typedef struct imp_ode_stats {
  imp_ode_pass_stats forward;
  imp_ode_pass_stats backward;
  long checkpoints; /**< checkpoints stored by the latest forward */
  size_t systems;   /**< CVODES problems in the latest forward */
  size_t samples;   /**< samples in the latest forward */
} imp_ode_stats;

/**
 * Make a neural ODE layer for the field, with initial time t0 and ntimes
 * output times (t0 <= times[0] < times[1] < ..., times[ntimes - 1] > t0,
 * all finite).  Each span CVODES integrates, from t0 to times[0] (unless
 * they are equal) and between consecutive output times, must be long
 * enough for its first-step estimate, forward and backward: at least 4
 * ulps of its ends, and, for a span from a to b, DBL_EPSILON max(|a|,
 * |b|) (b - a) at least DBL_MIN (from t0 = 0, a horizon above about
 * 1e-146; shorter ones made CVODES fail forward, or backward only).
 * field, times and opt (may be NULL) are copied.  The
 * layer's nparams = field->ntheta parameters are theta, zero at creation;
 * set them through imp_layer_params.  name may be NULL ("ode").  The
 * caller frees *out with imp_layer_free, which frees every CVODES object
 * and the SUNDIALS context.  Returns IMP_EINVAL for a malformed field,
 * times or options, IMP_ENOMEM, or IMP_EBACKEND if SUNDIALS cannot make
 * its context; on failure *out is NULL.
 *
 * In training mode (imp_layer_set_training, the default) the forward
 * keeps the checkpoints that backward needs; in evaluation mode it keeps
 * none, and a backward after it integrates forward again first.  A
 * backward whose x or parameters differ from the latest forward's also
 * integrates forward again.
 */
int imp_ode_create(const imp_ode_field *field, double t0, const double *times,
                   size_t ntimes, const imp_ode_options *opt, const char *name,
                   imp_layer **out);

/**
 * Change the initial and output times (copied; same rules as at
 * creation).  The output shape changes with ntimes.  The checkpoints of
 * the latest forward are dropped.
 */
int imp_ode_set_times(imp_layer *layer, double t0, const double *times,
                      size_t ntimes);

/** The number of output times K; 0 if layer is not an ODE layer. */
size_t imp_ode_ntimes(const imp_layer *layer);

/**
 * Copy the statistics of the latest forward and backward into *stats.
 * Returns IMP_EINVAL if layer is not an ODE layer.
 */
int imp_ode_get_stats(const imp_layer *layer, imp_ode_stats *stats);

#ifdef __cplusplus
}
#endif

#endif /* IMP_ODE_H */

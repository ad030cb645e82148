/*
 * examples/stack.c - all four kinds of implicit layer in one model.
 *
 * The model maps a point x in R^2 to a probability vector in R^4 through
 * five layers, each with a job:
 *
 *     u  = U x + c                     dense: lift x to 4 features
 *     z* = tanh(W z* + b + u)          DEQ: an equilibrium feature map
 *     h  = h(1), dh/dt = tanh(A h + a), h(0) = z*
 *                                      neural ODE: flow the features
 *     r  solves r + s o r^3 = h,  s = softplus(theta)
 *                                      root layer: a smooth, monotone and
 *                                      so invertible squashing of h
 *     y  = argmin 1/2 |y|^2 + r^T y,  y >= 0, 1^T y = 1
 *                                      QP layer: the Euclidean projection
 *                                      of -r onto the probability simplex
 *
 * The targets are projections onto the simplex of a linear function of x,
 * so many of them have zero entries: only a layer that lands exactly on
 * the simplex's faces can fit them, which is the QP's job.  The model is
 * trained end to end by Adam on the mean squared error; every backward
 * step of an implicit layer is its own adjoint (the DEQ's adjoint fixed
 * point, CVODES' backward integration, the root's and the QP's adjoint
 * linear solves).
 *
 * The same model is written twice (mix_form):
 *   MIX_BLOCKS     the library's own pieces: imp_dense_create, a DEQ made by
 *                  imp_deq_create_from_layers, an ODE field and a root
 *                  residual written with the blocks' raw functions
 *                  (imp_dense_apply, imp_activation_apply), and the QP
 *                  layer imp_qp_layer_create;
 *   MIX_CALLBACKS  the user-callback forms: a dense user layer
 *                  (imp_layer_create with a hand-written forward and
 *                  backward), a DEQ from imp_deq_create with a hand-written
 *                  map and vjp, an ODE field and root residual written out
 *                  by hand, and the simplex projection as a user layer
 *                  computed by sorting (Held, Wolfe and Crowder, 1974),
 *                  differentiated by hand on its support.
 * Both take the same flat parameters in the same layout, so their outputs
 * and gradients can be compared entry by entry (tests/test_stack_mixed.c
 * does, and so does this demo).
 *
 * The demo trains the blocks form, printing per epoch the loss and the
 * statistics of every implicit layer, checks that the loss falls at least
 * LOSS_FACTOR-fold, checks the whole gradient (every parameter and the
 * input) against fourth-order finite differences to GRAD_TOL, and checks
 * that the callback form agrees.  It exits non-zero if a check fails.
 *
 * Usage: imp-stack-demo [--epochs E] [--seed S]
 *
 * Compiled with IMP_STACK_NO_MAIN, this file is the model only; the test
 * suite includes it that way.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imp.h"

#define MIX_IN 2  /* input features */
#define MIX_F 4   /* features of every layer after the first */
#define MIX_T 1.0 /* the ODE's flow time */

/* Parameter layout of the flat vector, shared by both forms. */
#define MIX_NDENSE (MIX_F * MIX_IN + MIX_F) /* U, c */
#define MIX_NDEQ (MIX_F * MIX_F + MIX_F)    /* W, b */
#define MIX_NODE (MIX_F * MIX_F + MIX_F)    /* A, a */
#define MIX_NROOT MIX_F                     /* theta */
#define MIX_NPARAMS (MIX_NDENSE + MIX_NDEQ + MIX_NODE + MIX_NROOT)

typedef enum mix_form { MIX_BLOCKS = 0, MIX_CALLBACKS = 1 } mix_form;

/* A model: the stack owns the layers; the pointers are borrowed. */
typedef struct mix_model {
  mix_form form;
  imp_stack *stack;
  imp_layer *dense, *deq, *ode, *root, *qp;
} mix_model;

/* ------------------------------------------------------------------ */
/* The dense layer by hand: y = U x + c.                                 */
/* ------------------------------------------------------------------ */

static int hand_dense_shape(const imp_layer *layer, const imp_shape *in,
                            imp_shape *out)
{
  (void)layer;
  if (imp_shape_sample(in) != MIX_IN)
    return IMP_ESHAPE;
  *out = (imp_shape){in->n, MIX_F, 1, 1};
  return IMP_OK;
}

static int hand_dense_forward(imp_layer *layer, const imp_shape *in,
                              const double *x, double *y)
{
  const double *u = imp_layer_params(layer), *c = u + MIX_F * MIX_IN;

  for (size_t b = 0; b < in->n; b++)
    for (size_t i = 0; i < MIX_F; i++) {
      double sum = c[i];

      for (size_t j = 0; j < MIX_IN; j++)
        sum += u[i * MIX_IN + j] * x[b * MIX_IN + j];
      y[b * MIX_F + i] = sum;
    }
  return IMP_OK;
}

/* xbar += U^T ybar, Ubar += ybar x^T, cbar += ybar. */
static int hand_dense_backward(imp_layer *layer, double *xbar,
                               const double *ybar, const imp_shape *in,
                               const double *x, const double *y)
{
  const double *u = imp_layer_params(layer);
  double *ubar = imp_layer_grads(layer), *cbar = ubar + MIX_F * MIX_IN;

  (void)y;
  for (size_t b = 0; b < in->n; b++)
    for (size_t i = 0; i < MIX_F; i++) {
      double g = ybar[b * MIX_F + i];

      cbar[i] += g;
      for (size_t j = 0; j < MIX_IN; j++) {
        ubar[i * MIX_IN + j] += g * x[b * MIX_IN + j];
        if (xbar != NULL)
          xbar[b * MIX_IN + j] += u[i * MIX_IN + j] * g;
      }
    }
  return IMP_OK;
}

static const imp_layer_ops hand_dense_ops = {.kind = "hand-dense",
                                             .output_shape = hand_dense_shape,
                                             .forward = hand_dense_forward,
                                             .backward = hand_dense_backward};

/* ------------------------------------------------------------------ */
/* The DEQ's map by hand: h(u, z) = tanh(W z + b + u), batched.          */
/* ------------------------------------------------------------------ */

static int hand_deq_map(void *ctx, const imp_shape *xs, const double *x,
                        const imp_shape *zs, const double *z,
                        const double *theta, double *out)
{
  const double *w = theta, *bias = theta + MIX_F * MIX_F;

  (void)ctx, (void)xs;
  for (size_t b = 0; b < zs->n; b++)
    for (size_t i = 0; i < MIX_F; i++) {
      double pre = bias[i] + x[b * MIX_F + i];

      for (size_t j = 0; j < MIX_F; j++)
        pre += w[i * MIX_F + j] * z[b * MIX_F + j];
      out[b * MIX_F + i] = tanh(pre);
    }
  return 0;
}

/*
 * With g = v o (1 - h^2): vjp_z = W^T g (overwritten), vjp_x += g,
 * Wbar += g z^T and bbar += g summed over the batch.
 */
static int hand_deq_vjp(void *ctx, const imp_shape *xs, const double *x,
                        const imp_shape *zs, const double *z,
                        const double *theta, const double *v, double *vjp_z,
                        double *vjp_x, double *vjp_theta)
{
  const double *w = theta;
  double h[MIX_F];

  for (size_t b = 0; b < zs->n; b++) {
    imp_shape one = {1, MIX_F, 1, 1};
    const double *zb = z + b * MIX_F, *vb = v + b * MIX_F;

    hand_deq_map(ctx, xs, x + b * MIX_F, &one, zb, theta, h);
    if (vjp_z != NULL)
      memset(vjp_z + b * MIX_F, 0, MIX_F * sizeof(double));
    for (size_t i = 0; i < MIX_F; i++) {
      double g = vb[i] * (1.0 - h[i] * h[i]);

      if (vjp_x != NULL)
        vjp_x[b * MIX_F + i] += g;
      if (vjp_theta != NULL)
        vjp_theta[MIX_F * MIX_F + i] += g;
      for (size_t j = 0; j < MIX_F; j++) {
        if (vjp_z != NULL)
          vjp_z[b * MIX_F + j] += w[i * MIX_F + j] * g;
        if (vjp_theta != NULL)
          vjp_theta[i * MIX_F + j] += g * zb[j];
      }
    }
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* The ODE's field g(t, h) = tanh(A h + a), twice.                       */
/* ------------------------------------------------------------------ */

/* With the blocks' raw functions: a dense map, then tanh. */
static int blocks_field_rhs(void *ctx, const double *t, const double *h,
                            const double *theta, double *out)
{
  const double *a = theta, *bias = theta + MIX_F * MIX_F;
  int rc;

  (void)ctx, (void)t;
  rc = imp_dense_apply(a, bias, 1.0, MIX_F, MIX_F, 1, h, out);
  if (rc == IMP_OK)
    rc = imp_activation_apply(IMP_ACT_TANH, MIX_F, out, out);
  return rc;
}

/* The same through the blocks' backward functions. */
static int blocks_field_vjp(void *ctx, const double *t, const double *h,
                            const double *theta, const double *v, double *vjp_h,
                            double *vjp_t, double *vjp_theta)
{
  const double *a = theta, *bias = theta + MIX_F * MIX_F;
  double pre[MIX_F], g[MIX_F], act[MIX_F] = {0};
  int rc;

  (void)ctx, (void)t, (void)vjp_t;
  rc = imp_dense_apply(a, bias, 1.0, MIX_F, MIX_F, 1, h, pre);
  if (rc == IMP_OK)
    rc = imp_activation_apply(IMP_ACT_TANH, MIX_F, pre, g);
  if (rc == IMP_OK)
    rc = imp_activation_apply_backward(IMP_ACT_TANH, MIX_F, act, v, pre, g);
  if (rc == IMP_OK && vjp_h != NULL)
    memset(vjp_h, 0, MIX_F * sizeof(double));
  if (rc == IMP_OK)
    rc = imp_dense_apply_backward(
        vjp_h, vjp_theta, vjp_theta == NULL ? NULL : vjp_theta + MIX_F * MIX_F,
        act, a, 1.0, MIX_F, MIX_F, 1, h);
  return rc;
}

/* By hand: loops over A's rows. */
static int hand_field_rhs(void *ctx, const double *t, const double *h,
                          const double *theta, double *out)
{
  (void)ctx, (void)t;
  for (size_t i = 0; i < MIX_F; i++) {
    double pre = theta[MIX_F * MIX_F + i];

    for (size_t j = 0; j < MIX_F; j++)
      pre += theta[i * MIX_F + j] * h[j];
    out[i] = tanh(pre);
  }
  return 0;
}

/* With g = v o (1 - out^2): vjp_h = A^T g, Abar += g h^T, abar += g. */
static int hand_field_vjp(void *ctx, const double *t, const double *h,
                          const double *theta, const double *v, double *vjp_h,
                          double *vjp_t, double *vjp_theta)
{
  double out[MIX_F];

  (void)vjp_t;
  hand_field_rhs(ctx, t, h, theta, out);
  if (vjp_h != NULL)
    memset(vjp_h, 0, MIX_F * sizeof(double));
  for (size_t i = 0; i < MIX_F; i++) {
    double g = v[i] * (1.0 - out[i] * out[i]);

    if (vjp_theta != NULL)
      vjp_theta[MIX_F * MIX_F + i] += g;
    for (size_t j = 0; j < MIX_F; j++) {
      if (vjp_h != NULL)
        vjp_h[j] += theta[i * MIX_F + j] * g;
      if (vjp_theta != NULL)
        vjp_theta[i * MIX_F + j] += g * h[j];
    }
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* The root layer's residual f(h, r) = r + s o r^3 - h, twice.           */
/* ------------------------------------------------------------------ */

/* s = softplus(theta) through the activation block. */
static int blocks_root_residual(void *ctx, const double *x, const double *y,
                                const double *theta, double *r)
{
  double s[MIX_F];
  int rc = imp_activation_apply(IMP_ACT_SOFTPLUS, MIX_F, theta, s);

  (void)ctx;
  for (size_t i = 0; rc == IMP_OK && i < MIX_F; i++)
    r[i] = y[i] + s[i] * y[i] * y[i] * y[i] - x[i];
  return rc;
}

/* vjp_y = v o (1 + 3 s r^2), vjp_x += -v, thetabar += v o r^3 softplus'. */
static int blocks_root_vjp(void *ctx, const double *x, const double *y,
                           const double *theta, const double *v, double *vjp_y,
                           double *vjp_x, double *vjp_theta)
{
  double s[MIX_F], vs[MIX_F];
  int rc = imp_activation_apply(IMP_ACT_SOFTPLUS, MIX_F, theta, s);

  (void)ctx, (void)x;
  for (size_t i = 0; rc == IMP_OK && i < MIX_F; i++) {
    if (vjp_y != NULL)
      vjp_y[i] = v[i] * (1.0 + 3.0 * s[i] * y[i] * y[i]);
    if (vjp_x != NULL)
      vjp_x[i] -= v[i];
    vs[i] = v[i] * y[i] * y[i] * y[i];
  }
  if (rc == IMP_OK && vjp_theta != NULL)
    rc = imp_activation_apply_backward(IMP_ACT_SOFTPLUS, MIX_F, vjp_theta, vs,
                                       theta, s);
  return rc;
}

/* The residual's Jacobian is diagonal: 1 + 3 s r^2. */
static int blocks_root_jacobian(void *ctx, const double *x, const double *y,
                                const double *theta, double *jac)
{
  double s[MIX_F];
  int rc = imp_activation_apply(IMP_ACT_SOFTPLUS, MIX_F, theta, s);

  (void)ctx, (void)x;
  memset(jac, 0, MIX_F * MIX_F * sizeof(double));
  for (size_t i = 0; i < MIX_F; i++)
    jac[i * MIX_F + i] = 1.0 + 3.0 * s[i] * y[i] * y[i];
  return rc;
}

/* softplus(t) = max(t, 0) + log1p(e^-|t|), and its derivative. */
static double hand_softplus(double t)
{
  return fmax(t, 0.0) + log1p(exp(-fabs(t)));
}

static double hand_sigmoid(double t)
{
  return 1.0 / (1.0 + exp(-t));
}

static int hand_root_residual(void *ctx, const double *x, const double *y,
                              const double *theta, double *r)
{
  (void)ctx;
  for (size_t i = 0; i < MIX_F; i++)
    r[i] = y[i] + hand_softplus(theta[i]) * y[i] * y[i] * y[i] - x[i];
  return 0;
}

static int hand_root_vjp(void *ctx, const double *x, const double *y,
                         const double *theta, const double *v, double *vjp_y,
                         double *vjp_x, double *vjp_theta)
{
  (void)ctx, (void)x;
  for (size_t i = 0; i < MIX_F; i++) {
    double cube = y[i] * y[i] * y[i];

    if (vjp_y != NULL)
      vjp_y[i] = v[i] * (1.0 + 3.0 * hand_softplus(theta[i]) * y[i] * y[i]);
    if (vjp_x != NULL)
      vjp_x[i] -= v[i];
    if (vjp_theta != NULL)
      vjp_theta[i] += v[i] * cube * hand_sigmoid(theta[i]);
  }
  return 0;
}

static int hand_root_jacobian(void *ctx, const double *x, const double *y,
                              const double *theta, double *jac)
{
  (void)ctx, (void)x;
  memset(jac, 0, MIX_F * MIX_F * sizeof(double));
  for (size_t i = 0; i < MIX_F; i++)
    jac[i * MIX_F + i] = 1.0 + 3.0 * hand_softplus(theta[i]) * y[i] * y[i];
  return 0;
}

/* ------------------------------------------------------------------ */
/* The simplex projection by hand: y = argmin |y + p|^2 on the simplex.  */
/* ------------------------------------------------------------------ */

/*
 * For q = -p, y_i = max(q_i - tau, 0) with tau chosen so that the entries
 * sum to 1: sort q downwards, and take the largest k whose
 * tau_k = (q_(1) + ... + q_(k) - 1) / k leaves q_(k) > tau_k.
 */
static void simplex_project(const double *p, double *y)
{
  double q[MIX_F], sum = 0.0, tau = 0.0;

  for (size_t i = 0; i < MIX_F; i++)
    q[i] = -p[i];
  for (size_t i = 1; i < MIX_F; i++) /* insertion sort, descending */
    for (size_t j = i; j > 0 && q[j] > q[j - 1]; j--) {
      double swap = q[j];

      q[j] = q[j - 1];
      q[j - 1] = swap;
    }
  for (size_t k = 0; k < MIX_F; k++) {
    sum += q[k];
    if (q[k] > (sum - 1.0) / (double)(k + 1))
      tau = (sum - 1.0) / (double)(k + 1);
  }
  for (size_t i = 0; i < MIX_F; i++)
    y[i] = fmax(-p[i] - tau, 0.0);
}

static int hand_simplex_shape(const imp_layer *layer, const imp_shape *in,
                              imp_shape *out)
{
  (void)layer;
  if (imp_shape_sample(in) != MIX_F)
    return IMP_ESHAPE;
  *out = (imp_shape){in->n, MIX_F, 1, 1};
  return IMP_OK;
}

static int hand_simplex_forward(imp_layer *layer, const imp_shape *in,
                                const double *x, double *y)
{
  (void)layer;
  for (size_t b = 0; b < in->n; b++)
    simplex_project(x + b * MIX_F, y + b * MIX_F);
  return IMP_OK;
}

/*
 * On the support S = {i : y_i > 0} the projection is q - tau with tau the
 * mean of q over S minus 1 / |S|, so dy/dq = I - 1 1^T / |S| there and 0
 * off it; p = -q flips the sign.
 */
static int hand_simplex_backward(imp_layer *layer, double *xbar,
                                 const double *ybar, const imp_shape *in,
                                 const double *x, const double *y)
{
  (void)layer, (void)x;
  if (xbar == NULL)
    return IMP_OK;
  for (size_t b = 0; b < in->n; b++) {
    const double *yb = y + b * MIX_F, *gb = ybar + b * MIX_F;
    double mean = 0.0;
    size_t support = 0;

    for (size_t i = 0; i < MIX_F; i++)
      if (yb[i] > 0.0) {
        mean += gb[i];
        support++;
      }
    mean /= (double)support;
    for (size_t i = 0; i < MIX_F; i++)
      if (yb[i] > 0.0)
        xbar[b * MIX_F + i] -= gb[i] - mean;
  }
  return IMP_OK;
}

static const imp_layer_ops hand_simplex_ops = {
    .kind = "hand-simplex",
    .output_shape = hand_simplex_shape,
    .forward = hand_simplex_forward,
    .backward = hand_simplex_backward};

/* ------------------------------------------------------------------ */
/* Building the model                                                    */
/* ------------------------------------------------------------------ */

/* Append layer to the stack, freeing it if that fails; keep *slot. */
static int mix_add(imp_stack *stack, imp_layer *layer, imp_layer **slot, int rc)
{
  if (rc != IMP_OK)
    return rc;
  rc = imp_stack_add(stack, layer);
  if (rc != IMP_OK)
    imp_layer_free(layer);
  else
    *slot = layer;
  return rc;
}

/* The tolerances are tight so that finite differences can check the
 * gradient to about 1e-6. */
static const imp_deq_options mix_deq_options = {
    .train = {.max_iter = 200, .rtol = 1e-13},
    .eval = {.max_iter = 200, .rtol = 1e-13},
    .adjoint = {.max_iter = 200, .rtol = 1e-13}};

static const imp_ode_options mix_ode_options = {.rtol = 1e-10, .atol = 1e-12};

static const imp_root_options mix_root_options = {
    .solver = IMP_ROOT_NEWTON, .residual_tol = 1e-14, .max_iter = 100};

static int mix_deq(mix_form form, imp_layer **deq)
{
  static const imp_deq_map hand_map = {.ntheta = MIX_NDEQ,
                                       .x_channels = MIX_F,
                                       .z_channels = MIX_F,
                                       .map = hand_deq_map,
                                       .vjp = hand_deq_vjp};
  imp_layer *w = NULL, *act = NULL;
  int rc;

  if (form == MIX_CALLBACKS)
    return imp_deq_create(&hand_map, NULL, &mix_deq_options, "deq", deq);
  rc = imp_dense_create(MIX_F, MIX_F, NULL, "W", &w);
  if (rc == IMP_OK)
    rc = imp_activation_create(IMP_ACT_TANH, NULL, &act);
  if (rc == IMP_OK)
    rc =
        imp_deq_create_from_layers(MIX_F, w, act, &mix_deq_options, "deq", deq);
  if (rc != IMP_OK) { /* on success the DEQ owns w and act */
    imp_layer_free(w);
    imp_layer_free(act);
  }
  return rc;
}

static int mix_qp(mix_form form, imp_layer **qp)
{
  static const double eye[MIX_F * MIX_F] = {1, 0, 0, 0, 0, 1, 0, 0,
                                            0, 0, 1, 0, 0, 0, 0, 1};
  static const double minus_eye[MIX_F * MIX_F] = {-1, 0, 0,  0, 0, -1, 0, 0,
                                                  0,  0, -1, 0, 0, 0,  0, -1};
  static const double ones[MIX_F] = {1, 1, 1, 1}, one[1] = {1};
  static const double zeros[MIX_F] = {0, 0, 0, 0};
  imp_qp_layer_config config = {
      .dims = {.nz = MIX_F, .nineq = MIX_F, .neq = 1},
      .input = IMP_QP_P,
      .values = {.Q = eye, .A = ones, .b = one, .G = minus_eye, .h = zeros},
      .options = {.tol = 1e-12}};

  if (form == MIX_CALLBACKS)
    return imp_layer_create(&hand_simplex_ops, NULL, 0, "simplex", qp);
  return imp_qp_layer_create(&config, "simplex", qp);
}

/*
 * Build the model in the given form, with every parameter zero (set them
 * with mix_init).  The caller frees m->stack with imp_stack_free.
 */
static int mix_build(mix_form form, mix_model *m)
{
  static const double times[1] = {MIX_T}, theta0[MIX_NROOT] = {0};
  imp_ode_field field = {.d = MIX_F, .ntheta = MIX_NODE};
  imp_problem root = {.nx = MIX_F, .ny = MIX_F, .ntheta = MIX_NROOT};
  imp_layer *layer = NULL;
  int rc;

  memset(m, 0, sizeof *m);
  m->form = form;
  if (form == MIX_BLOCKS) {
    field.rhs = blocks_field_rhs, field.vjp = blocks_field_vjp;
    root.residual = blocks_root_residual, root.vjp = blocks_root_vjp;
    root.jacobian = blocks_root_jacobian;
  } else {
    field.rhs = hand_field_rhs, field.vjp = hand_field_vjp;
    root.residual = hand_root_residual, root.vjp = hand_root_vjp;
    root.jacobian = hand_root_jacobian;
  }
  rc = imp_stack_create(
      form == MIX_BLOCKS ? "mixed (blocks)" : "mixed (callbacks)", &m->stack);

  if (rc == IMP_OK && form == MIX_BLOCKS)
    rc = imp_dense_create(MIX_IN, MIX_F, NULL, "lift", &layer);
  else if (rc == IMP_OK)
    rc = imp_layer_create(&hand_dense_ops, NULL, MIX_NDENSE, "lift", &layer);
  rc = mix_add(m->stack, layer, &m->dense, rc);

  if (rc == IMP_OK)
    rc = mix_deq(form, &layer);
  rc = mix_add(m->stack, layer, &m->deq, rc);
  if (rc == IMP_OK)
    rc =
        imp_ode_create(&field, 0.0, times, 1, &mix_ode_options, "flow", &layer);
  rc = mix_add(m->stack, layer, &m->ode, rc);
  if (rc == IMP_OK)
    rc = imp_root_layer_create(&root, theta0, &mix_root_options, "squash",
                               &layer);
  rc = mix_add(m->stack, layer, &m->root, rc);
  if (rc == IMP_OK)
    rc = mix_qp(form, &layer);
  rc = mix_add(m->stack, layer, &m->qp, rc);

  if (rc == IMP_OK && imp_stack_nparams(m->stack) != MIX_NPARAMS)
    rc = IMP_ESHAPE;
  if (rc != IMP_OK) {
    imp_stack_free(m->stack);
    m->stack = NULL;
  }
  return rc;
}

/*
 * Draw the initial parameters from seed: U of unit scale, W small enough
 * (entries of standard deviation 0.15, ||W||_2 about 0.5) that the DEQ's
 * map contracts, A of moderate scale, biases and theta zero.
 */
static void mix_init(mix_model *m, uint64_t seed)
{
  double *p = imp_stack_params(m->stack);
  imp_rng rng;

  imp_rng_seed(&rng, seed);
  memset(p, 0, MIX_NPARAMS * sizeof(double));
  imp_rng_fill_normal(&rng, p, MIX_F * MIX_IN, 0.0, 1.0);
  p += MIX_NDENSE;
  imp_rng_fill_normal(&rng, p, MIX_F * MIX_F, 0.0, 0.15);
  p += MIX_NDEQ;
  imp_rng_fill_normal(&rng, p, MIX_F * MIX_F, 0.0, 0.4);
}

/*
 * The task: t = the projection onto the simplex of M x + m, with M and m
 * fixed, for x uniform in [-1, 1]^2.  Writes n inputs and targets.
 */
static void mix_data(size_t n, uint64_t seed, double *x, double *t)
{
  static const double mm[MIX_F * MIX_IN] = {1.5,  0.0, 0.0,  1.5,
                                            -1.5, 0.0, -1.0, -1.0};
  imp_rng rng;

  imp_rng_seed(&rng, seed);
  imp_rng_fill_uniform(&rng, x, n * MIX_IN, -1.0, 1.0);
  for (size_t b = 0; b < n; b++) {
    double q[MIX_F];

    for (size_t i = 0; i < MIX_F; i++) /* simplex_project takes p = -q */
      q[i] = -(0.25 + mm[i * MIX_IN] * x[b * MIX_IN] +
               mm[i * MIX_IN + 1] * x[b * MIX_IN + 1]);
    simplex_project(q, t + b * MIX_F);
  }
}

/* The loss and its gradient for the whole stack: the objective of the
 * finite-difference check reads theta = (params, x). */
typedef struct mix_objective {
  mix_model *model;
  size_t n;
  const double *target;
  double *y;
} mix_objective;

static int mix_loss(void *ctx, const double *theta, double *value)
{
  mix_objective *o = ctx;
  imp_shape in = {o->n, MIX_IN, 1, 1}, out = {o->n, MIX_F, 1, 1};
  int rc;

  memcpy(imp_stack_params(o->model->stack), theta,
         MIX_NPARAMS * sizeof(double));
  rc = imp_stack_forward(o->model->stack, &in, theta + MIX_NPARAMS, o->y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, o->y, o->target, value, NULL);
  return rc;
}

/*
 * Forward, loss and backward at the stack's current parameters: *loss,
 * y (n x MIX_F) and grad = (dL/dparams, dL/dx), MIX_NPARAMS + n MIX_IN
 * doubles, overwritten.
 */
static int mix_gradient(mix_model *m, size_t n, const double *x,
                        const double *target, double *y, double *loss,
                        double *grad)
{
  imp_shape in = {n, MIX_IN, 1, 1}, out = {n, MIX_F, 1, 1};
  double *ybar = malloc(n * MIX_F * sizeof(double));
  int rc = ybar == NULL ? IMP_ENOMEM : IMP_OK;

  if (rc == IMP_OK)
    rc = imp_stack_forward(m->stack, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, y, target, loss, ybar);
  memset(grad, 0, (MIX_NPARAMS + n * MIX_IN) * sizeof(double));
  imp_stack_zero_grad(m->stack);
  if (rc == IMP_OK)
    rc = imp_stack_backward(m->stack, grad + MIX_NPARAMS, ybar);
  if (rc == IMP_OK)
    memcpy(grad, imp_stack_grads(m->stack), MIX_NPARAMS * sizeof(double));
  free(ybar);
  return rc;
}

/*
 * Check grad (from mix_gradient) against fourth-order finite differences
 * of the loss in every parameter and input.  The parameters are restored.
 * Entries below 1e-6 are compared absolutely (the floor): a coordinate
 * that only moves an output lying on a face of the simplex has a zero
 * gradient, whose difference quotient is rounding noise of about 1e-13.
 */
static int mix_gradcheck(mix_model *m, size_t n, const double *x,
                         const double *target, const double *grad,
                         imp_gradcheck_result *res)
{
  size_t nall = MIX_NPARAMS + n * MIX_IN;
  double *theta = malloc(nall * sizeof(double));
  double *y = malloc(n * MIX_F * sizeof(double));
  mix_objective o = {m, n, target, y};
  imp_gradcheck_options opt = {.order = 4, .h = 1e-5, .floor = 1e-6};
  int rc = theta == NULL || y == NULL ? IMP_ENOMEM : IMP_OK;

  if (rc == IMP_OK) {
    memcpy(theta, imp_stack_params(m->stack), MIX_NPARAMS * sizeof(double));
    memcpy(theta + MIX_NPARAMS, x, n * MIX_IN * sizeof(double));
    rc = imp_gradcheck(mix_loss, &o, theta, nall, grad, &opt, res);
    memcpy(imp_stack_params(m->stack), theta, MIX_NPARAMS * sizeof(double));
  }
  free(theta);
  free(y);
  return rc;
}

#ifndef IMP_STACK_NO_MAIN

#define NSAMPLES 64
#define BATCH 16
#define EPOCHS 40
#define LR 0.03
#define LOSS_FACTOR 20.0 /* the loss must fall at least this many times */
#define GRAD_TOL 1e-5    /* finite-difference check, relative */
#define AGREE_TOL 1e-8   /* the two forms, relative to the largest entry */
#define CHECK_N 6        /* samples in the gradient checks */

/* One line of statistics for every implicit layer's last passes. */
static int print_stats(const mix_model *m)
{
  imp_root_stats root;
  imp_deq_stats deq;
  imp_ode_stats ode;
  imp_qp_stats qp;
  int rc = imp_deq_get_stats(m->deq, &deq);

  if (rc == IMP_OK)
    rc = imp_ode_get_stats(m->ode, &ode);
  if (rc == IMP_OK)
    rc = imp_root_layer_stats(m->root, &root);
  if (rc == IMP_OK)
    rc = imp_qp_layer_stats(m->qp, &qp);
  if (rc != IMP_OK)
    return rc;
  printf("    deq  %2zu it %4zu evals res %.1e | adj %2zu it res %.1e\n",
         deq.iterations, deq.evaluations, deq.rel_residual,
         deq.backward_iterations, deq.backward_residual);
  printf("    ode  %3ld steps %4ld rhs | adj %3ld steps %4ld vjp\n",
         ode.forward.steps, ode.forward.rhs_evals, ode.backward.steps,
         ode.backward.vjp_evals);
  printf("    root %2zu it (max %zu) %3zu f %2zu J res %.1e\n", root.iterations,
         root.max_iterations, root.function_evals, root.jacobian_evals,
         root.residual);
  printf("    qp   %2zu it (max) res %.1e/%.1e gap %.1e | adj res %.1e\n",
         qp.iterations, qp.primal_residual, qp.dual_residual, qp.gap,
         qp.adjoint_residual);
  return IMP_OK;
}

/* Adam on minibatches; *first and *last are the full-data losses. */
static int train(mix_model *m, const double *x, const double *t, int epochs,
                 uint64_t seed, double *first, double *last)
{
  size_t order[NSAMPLES];
  double bx[BATCH * MIX_IN], bt[BATCH * MIX_F], y[NSAMPLES * MIX_F];
  double grad[MIX_NPARAMS + NSAMPLES * MIX_IN], loss;
  imp_shape in = {NSAMPLES, MIX_IN, 1, 1}, out = {NSAMPLES, MIX_F, 1, 1};
  imp_optim_options adam = imp_optim_defaults();
  imp_optim *optim = NULL;
  imp_rng rng;
  int rc;

  adam.lr = LR;
  rc = imp_optim_create(imp_optim_adam, MIX_NPARAMS, &adam, &optim);
  imp_rng_seed(&rng, seed);
  for (size_t i = 0; i < NSAMPLES; i++)
    order[i] = i;

  if (rc == IMP_OK)
    rc = imp_stack_forward(m->stack, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, y, t, first, NULL);
  if (rc == IMP_OK)
    printf("epoch  0  loss %.4e\n", *first);

  for (int epoch = 1; rc == IMP_OK && epoch <= epochs; epoch++) {
    double sum = 0.0;

    imp_rng_shuffle(&rng, order, NSAMPLES);
    for (size_t s = 0; rc == IMP_OK && s < NSAMPLES / BATCH; s++) {
      for (size_t b = 0; b < BATCH; b++) {
        size_t k = order[s * BATCH + b];

        memcpy(bx + b * MIX_IN, x + k * MIX_IN, MIX_IN * sizeof(double));
        memcpy(bt + b * MIX_F, t + k * MIX_F, MIX_F * sizeof(double));
      }
      rc = mix_gradient(m, BATCH, bx, bt, y, &loss, grad);
      if (rc == IMP_OK)
        rc = imp_optim_step(optim, imp_stack_params(m->stack), grad,
                            MIX_NPARAMS);
      sum += loss;
    }
    if (rc == IMP_OK) {
      printf("epoch %2d  loss %.4e (mean over the epoch's batches)\n", epoch,
             sum / (NSAMPLES / BATCH));
      rc = print_stats(m);
    }
  }

  if (rc == IMP_OK)
    rc = imp_stack_forward(m->stack, &in, x, y);
  if (rc == IMP_OK)
    rc = imp_loss_mse(&out, y, t, last, NULL);
  imp_optim_free(optim);
  return rc;
}

/* The largest |a_i - b_i| over max |b_i|. */
static double rel_diff(const double *a, const double *b, size_t n)
{
  double diff = 0.0, scale = 0.0;

  for (size_t i = 0; i < n; i++) {
    diff = fmax(diff, fabs(a[i] - b[i]));
    scale = fmax(scale, fabs(b[i]));
  }
  return diff / fmax(scale, 1e-300);
}

int main(int argc, char **argv)
{
  static double x[NSAMPLES * MIX_IN], t[NSAMPLES * MIX_F];
  static double y1[NSAMPLES * MIX_F], y2[NSAMPLES * MIX_F];
  static double g1[MIX_NPARAMS + NSAMPLES * MIX_IN];
  static double g2[MIX_NPARAMS + NSAMPLES * MIX_IN];
  mix_model blocks = {0}, hand = {0};
  imp_gradcheck_result res = {0};
  double first = 0.0, last = 0.0, loss1, loss2, dy = 0.0, dg = 0.0;
  int epochs = EPOCHS, failures = 0, rc;
  uint64_t seed = 1;

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--epochs") == 0 && i + 1 < argc)
      epochs = atoi(argv[++i]);
    else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
      seed = strtoull(argv[++i], NULL, 10);
    else {
      fprintf(stderr, "usage: %s [--epochs E] [--seed S]\n", argv[0]);
      return EXIT_FAILURE;
    }
  }

  /* Train the blocks form. */
  mix_data(NSAMPLES, seed, x, t);
  rc = mix_build(MIX_BLOCKS, &blocks);
  if (rc == IMP_OK) {
    mix_init(&blocks, seed + 100);
    rc = train(&blocks, x, t, epochs, seed + 200, &first, &last);
  }
  if (rc == IMP_OK) {
    printf("loss %.4e -> %.4e (%.1f-fold; required %.0f-fold)\n", first, last,
           first / last, LOSS_FACTOR);
    failures += !(last * LOSS_FACTOR <= first);
  }

  /* The whole gradient, at the trained parameters, on CHECK_N samples. */
  if (rc == IMP_OK)
    rc = mix_gradient(&blocks, CHECK_N, x, t, y1, &loss1, g1);
  if (rc == IMP_OK)
    rc = mix_gradcheck(&blocks, CHECK_N, x, t, g1, &res);
  if (rc == IMP_OK) {
    printf("gradient vs finite differences (%d params + %d inputs): "
           "max rel err %.2e at %zu (tolerance %.0e)\n",
           MIX_NPARAMS, CHECK_N * MIX_IN, res.max_rel_err, res.worst, GRAD_TOL);
    failures += !(res.max_rel_err < GRAD_TOL);
  }

  /* The callback form, at the same parameters. */
  if (rc == IMP_OK)
    rc = mix_build(MIX_CALLBACKS, &hand);
  if (rc == IMP_OK) {
    memcpy(imp_stack_params(hand.stack), imp_stack_params(blocks.stack),
           MIX_NPARAMS * sizeof(double));
    rc = mix_gradient(&hand, CHECK_N, x, t, y2, &loss2, g2);
  }
  if (rc == IMP_OK) {
    dy = rel_diff(y2, y1, CHECK_N * MIX_F);
    dg = rel_diff(g2, g1, MIX_NPARAMS + CHECK_N * MIX_IN);
    printf("callback form vs blocks form: outputs %.2e, gradients %.2e "
           "(relative; tolerance %.0e)\n",
           dy, dg, AGREE_TOL);
    failures += !(dy < AGREE_TOL && dg < AGREE_TOL);
  }

  if (rc != IMP_OK) {
    fprintf(stderr, "imp-stack-demo: %s\n", imp_last_error());
    failures++;
  }
  imp_stack_free(blocks.stack);
  imp_stack_free(hand.stack);
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif /* IMP_STACK_NO_MAIN */

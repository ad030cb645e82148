/*
 * deq/deq.c - the DEQ layer: forward by a batched fixed-point solve (or a
 * fixed number of steps), backward by the shared adjoint solve, the
 * phantom gradient, or backpropagation through the unrolled steps.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "deq/deq_internal.h"
#include "imp/blocks.h"
#include "imp/deq.h"
#include "imp/rng.h"

/* What produced the layer's last output. */
typedef enum deq_mode {
  MODE_NONE,
  MODE_SOLVED,
  MODE_STEPPED /* phantom or unrolled: traj holds the states */
} deq_mode;

typedef struct deq {
  imp_deq_map map;
  imp__deq_owner owner; /* a map context the layer owns, if any */
  imp_deq_options opt;  /* defaults resolved */

  /* The defaults that follow the training budget, re-derived whenever
   * imp_deq_set_budget replaces it: set where the user gave 0. */
  int derive_adjoint_iter, derive_adjoint_rtol, derive_unroll;

  /* Saved by forward for backward. */
  deq_mode mode;
  imp_shape xs, zs;
  imp_workspace zstar; /* numel(zs): the fixed point */
  imp_workspace traj;  /* (steps + 1) x numel(zs): the stepped states */
  size_t steps;
  double damping; /* of the stepped states */
  int has_prev;

  /* The user's initial state. */
  imp_workspace init;
  imp_shape init_shape;
  int has_init;

  /* Statistics and the residual trace, grown with the iterations run. */
  imp_deq_stats stats;
  imp__fp_trace trace;

  /* Scratch. */
  imp_workspace xpack, zwork, xgrad, tgrad;

  /* The call in progress. */
  const double *x, *theta;
} deq;

static int same_shape(const imp_shape *a, const imp_shape *b)
{
  return a->n == b->n && a->c == b->c && a->h == b->h && a->w == b->w;
}

/* ------------------------------------------------------------------ */
/* Evaluating h. */

/* out = h(x, z) on the whole batch. */
static int apply_map(deq *d, const double *z, double *out)
{
  int rc = d->map.map(d->map.ctx, &d->xs, d->x, &d->zs, z, d->theta, out);

  if (rc != 0)
    return imp__callback_status(rc, "deq: the map");
  if (!imp__all_finite(out, imp_shape_numel(&d->zs)))
    return imp__fail(IMP_ENONFINITE, "deq: the map produced NaN or Inf");
  return IMP_OK;
}

/* The same, with vector-Jacobian products at z. */
static int apply_vjp(deq *d, const double *z, const double *v, double *vz,
                     double *vx, double *vtheta)
{
  int rc;

  if (d->map.vjp == NULL)
    return imp__fail(IMP_EINVAL, "deq: the map has no vjp callback");
  rc = d->map.vjp(d->map.ctx, &d->xs, d->x, &d->zs, z, d->theta, v, vz, vx,
                  vtheta);
  if (rc != 0)
    return imp__callback_status(rc, "deq: the vjp");
  return IMP_OK;
}

/* The fixed-point driver's map: h on the m active samples idx, whose x
 * rows are packed first unless all samples are active (idx is then the
 * identity, since the driver keeps the order). */
static int solver_map(void *ctx, size_t m, const size_t *idx, const double *z,
                      double *out)
{
  deq *d = ctx;
  imp_shape xs = d->xs, zs = d->zs;
  size_t dx = imp_shape_sample(&d->xs);
  const double *x = d->x;

  if (m < d->xs.n) {
    for (size_t k = 0; k < m; k++)
      memcpy(d->xpack.data + k * dx, d->x + idx[k] * dx, dx * sizeof(double));
    x = d->xpack.data;
  }
  xs.n = zs.n = m;
  return d->map.map(d->map.ctx, &xs, x, &zs, z, d->theta, out);
}

/* ------------------------------------------------------------------ */
/* Forward. */

static int deq_output_shape(const imp_layer *layer, const imp_shape *in,
                            imp_shape *out)
{
  const deq *d = imp_layer_state(layer);

  if (in->n == 0 || imp_shape_numel(in) == 0)
    return imp__fail(IMP_ESHAPE, "%s: empty input", imp_layer_name(layer));
  if (d->map.x_channels != 0 && in->c != d->map.x_channels)
    return imp__fail(IMP_ESHAPE,
                     "%s: input has %zu channels, the map "
                     "takes %zu",
                     imp_layer_name(layer), in->c, d->map.x_channels);
  *out = *in;
  out->c = d->map.z_channels;
  return IMP_OK;
}

/* Put the initial state into z. */
static int initial_state(deq *d, double *z, size_t nz)
{
  if (d->opt.init == IMP_DEQ_INIT_GIVEN) {
    if (!d->has_init || !same_shape(&d->init_shape, &d->zs))
      return imp__fail(IMP_ESHAPE, "deq: no initial state of this shape "
                                   "was given (imp_deq_set_initial)");
    memcpy(z, d->init.data, nz * sizeof(double));
  } else if (d->opt.init == IMP_DEQ_INIT_PREVIOUS && d->has_prev) {
    /* zstar still holds the last fixed point if the shape is the same. */
    if (z != d->zstar.data)
      memcpy(z, d->zstar.data, nz * sizeof(double));
  } else {
    memset(z, 0, nz * sizeof(double));
  }
  return IMP_OK;
}

/* states[i + 1] = (1 - l) states[i] + l h(states[i]) for i < steps. */
static int step(deq *d, double *states, size_t steps, double l)
{
  size_t nz = imp_shape_numel(&d->zs);

  for (size_t i = 0; i < steps; i++) {
    double *cur = states + i * nz, *next = cur + nz;

    IMP__TRY(apply_map(d, cur, next));
    for (size_t j = 0; j < nz; j++)
      next[j] = (1.0 - l) * cur[j] + l * next[j];
  }
  d->stats.evaluations += steps * d->zs.n;
  return IMP_OK;
}

/* The residual statistics of the batch at the states z, with h(z) given. */
static void residual_stats(deq *d, const double *z, const double *hz)
{
  size_t per = imp_shape_sample(&d->zs);

  d->stats.abs_residual = d->stats.rel_residual = 0.0;
  for (size_t b = 0; b < d->zs.n; b++) {
    double r = 0.0, hn = imp__nrm2(per, hz + b * per), rel;

    for (size_t i = 0; i < per; i++) {
      double e = hz[b * per + i] - z[b * per + i];

      r += e * e;
    }
    r = sqrt(r);
    rel = r / (hn > 0.0 ? hn : 1.0);
    d->stats.abs_residual = fmax(d->stats.abs_residual, r);
    d->stats.rel_residual = fmax(d->stats.rel_residual, rel);
  }
}

/* Find z* with the budget of the current mode. */
static int solve(deq *d, int training)
{
  const imp_deq_budget *budget = training ? &d->opt.train : &d->opt.eval;
  imp_fp_options fo = d->opt.fp;
  imp_fp_stats fs;
  size_t nz = imp_shape_numel(&d->zs);
  int rc;

  fo.max_iter = budget->max_iter;
  fo.rtol = budget->rtol;
  fo.atol = budget->atol;
  IMP__TRY(initial_state(d, d->zstar.data, nz));

  rc = imp__fp_solve_grown(d->opt.solver, solver_map, d, d->zs.n,
                           imp_shape_sample(&d->zs), d->zstar.data, &fo, &fs,
                           &d->trace);
  d->stats.trace_len = d->trace.len;
  d->stats.iterations = fs.iterations;
  d->stats.evaluations += fs.evaluations;
  d->stats.abs_residual = fs.abs_residual;
  d->stats.rel_residual = fs.rel_residual;
  d->stats.converged = fs.converged;
  d->stats.trace = d->trace.data;
  d->stats.forward_status = rc;
  if (rc == IMP_OK || rc == IMP_ENOCONV)
    d->has_prev = 1;
  if (rc == IMP_ENOCONV && d->opt.noconv_ok)
    rc = IMP_OK;
  return rc;
}

static int deq_forward(imp_layer *layer, const imp_shape *in, const double *x,
                       double *y)
{
  deq *d = imp_layer_state(layer);
  int training = imp_layer_training(layer);
  imp_deq_backward kind = d->opt.backward;
  size_t nz, steps = 0;
  imp_shape zs;
  int rc;

  /* Shapes, buffers and bookkeeping of this call. */
  IMP__TRY(deq_output_shape(layer, in, &zs));
  if (!same_shape(&zs, &d->zs))
    d->has_prev = 0;
  d->xs = *in;
  d->zs = zs;
  d->x = x;
  d->theta = imp_layer_params(layer);
  d->mode = MODE_NONE;
  nz = imp_shape_numel(&zs);
  if (training && kind == IMP_DEQ_PHANTOM)
    steps = d->opt.phantom_steps;
  else if (training && kind == IMP_DEQ_UNROLLED)
    steps = d->opt.unroll_steps;
  if (steps > 0 && steps + 1 > ((size_t)-1) / sizeof(double) / nz)
    return imp__fail(IMP_ENOMEM, "deq: %zu stepped states", steps);
  IMP__TRY(imp_workspace_reserve(&d->zstar, nz));
  IMP__TRY(imp_workspace_reserve(&d->zwork, nz));
  IMP__TRY(imp_workspace_reserve(&d->xpack, imp_shape_numel(in)));
  IMP__TRY(imp_workspace_reserve(&d->traj, (steps + 1) * nz));
  memset(&d->stats, 0, sizeof d->stats);
  d->stats.batch = zs.n;

  /* Unrolled training: K steps from the initial state, no solver. */
  if (steps > 0 && kind == IMP_DEQ_UNROLLED) {
    double l = d->opt.unroll_damping;

    IMP__TRY(initial_state(d, d->traj.data, nz));
    IMP__TRY(step(d, d->traj.data, steps, l));
    d->stats.iterations = steps;
    /* The residual at the last state that was evaluated. */
    rc = apply_map(d, d->traj.data + steps * nz, d->zwork.data);
    if (rc != IMP_OK)
      return rc;
    residual_stats(d, d->traj.data + steps * nz, d->zwork.data);
    d->stats.evaluations += zs.n;
    d->steps = steps;
    d->damping = l;
    d->mode = MODE_STEPPED;
    memcpy(y, d->traj.data + steps * nz, nz * sizeof(double));
    return IMP_OK;
  }

  /* Solve; a phantom gradient then steps k times from z*. */
  rc = solve(d, training);
  if (rc != IMP_OK)
    memcpy(y, d->zstar.data, nz * sizeof(double)); /* the best iterate */
  if (rc != IMP_OK)
    return rc;
  if (steps > 0) {
    memcpy(d->traj.data, d->zstar.data, nz * sizeof(double));
    IMP__TRY(step(d, d->traj.data, steps, d->opt.phantom_damping));
    d->steps = steps;
    d->damping = d->opt.phantom_damping;
    d->mode = MODE_STEPPED;
    memcpy(y, d->traj.data + steps * nz, nz * sizeof(double));
  } else {
    d->mode = MODE_SOLVED;
    memcpy(y, d->zstar.data, nz * sizeof(double));
  }
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Backward. */

/* The implicit problem f(x, z) = z - h(x, z) of the whole batch. */
static int fixed_point_residual(void *ctx, const double *x, const double *z,
                                const double *theta, double *r)
{
  deq *d = ctx;
  size_t nz = imp_shape_numel(&d->zs);

  d->x = x;
  d->theta = theta;
  IMP__TRY(apply_map(d, z, r));
  for (size_t i = 0; i < nz; i++)
    r[i] = z[i] - r[i];
  return IMP_OK;
}

/* v^T df/dz = v - v^T dh/dz; the x and theta parts are -v^T dh/d., which
 * the map's vjp accumulates when given -v. */
static int fixed_point_vjp(void *ctx, const double *x, const double *z,
                           const double *theta, const double *v, double *vjp_z,
                           double *vjp_x, double *vjp_theta)
{
  deq *d = ctx;
  size_t nz = imp_shape_numel(&d->zs);
  double *neg = d->zwork.data;

  d->x = x;
  d->theta = theta;
  for (size_t i = 0; i < nz; i++)
    neg[i] = -v[i];
  IMP__TRY(apply_vjp(d, z, neg, vjp_z, vjp_x, vjp_theta));
  for (size_t i = 0; vjp_z != NULL && i < nz; i++)
    vjp_z[i] += v[i];
  return IMP_OK;
}

static int backward_implicit(deq *d, double *xbar, const double *ybar,
                             double *grads)
{
  imp_problem p = {.nx = imp_shape_numel(&d->xs),
                   .ny = imp_shape_numel(&d->zs),
                   .ntheta = d->map.ntheta,
                   .residual = fixed_point_residual,
                   .vjp = fixed_point_vjp,
                   .ctx = d};
  imp_adjoint_options ao = d->opt.adjoint;
  imp_adjoint_stats as;
  int rc;

  if (ao.method == IMP_ADJOINT_FIXED_POINT && ao.blocks == 0)
    ao.blocks = d->zs.n;
  rc = imp_adjoint_solve(&p, d->x, d->zstar.data, d->theta, ybar, NULL, xbar,
                         grads, &ao, &as);
  d->stats.backward_iterations = as.iterations;
  d->stats.backward_vjp_calls = as.vjp_calls;
  d->stats.backward_residual = as.residual;
  return rc;
}

/* Backpropagation through states[i + 1] = (1 - l) states[i] + l h(...):
 * u_i = (1 - l) u_{i+1} + (dh/dz)^T (l u_{i+1}), with x and theta picking
 * up (dh/d.)^T (l u_{i+1}) at every step.  The first state is a constant
 * (z* for the phantom gradient, the initial state when unrolled). */
static int backward_stepped(deq *d, double *xbar, const double *ybar,
                            double *grads)
{
  size_t nz = imp_shape_numel(&d->zs), nx = imp_shape_numel(&d->xs);
  size_t nt = d->map.ntheta;
  double l = d->damping, *u, *lu, *vz;
  imp_workspace work = IMP_WORKSPACE_INIT;
  int rc = IMP_OK;

  IMP__TRY(imp_workspace_reserve(&d->xgrad, nx));
  IMP__TRY(imp_workspace_reserve(&d->tgrad, nt > 0 ? nt : 1));
  IMP__TRY(imp_workspace_reserve(&work, 3 * nz));
  u = work.data;
  lu = u + nz;
  vz = lu + nz;
  memcpy(u, ybar, nz * sizeof(double));
  memset(d->xgrad.data, 0, nx * sizeof(double));
  memset(d->tgrad.data, 0, (nt > 0 ? nt : 1) * sizeof(double));

  for (size_t i = d->steps; i-- > 0;) {
    for (size_t j = 0; j < nz; j++)
      lu[j] = l * u[j];
    rc = apply_vjp(d, d->traj.data + i * nz, lu, vz, d->xgrad.data,
                   d->tgrad.data);
    if (rc != IMP_OK)
      break;
    for (size_t j = 0; j < nz; j++)
      u[j] = (1.0 - l) * u[j] + vz[j];
  }
  if (rc == IMP_OK && (!imp__all_finite(d->xgrad.data, nx) ||
                       !imp__all_finite(d->tgrad.data, nt)))
    rc = imp__fail(IMP_ENONFINITE, "deq: backward produced NaN or Inf");

  /* Accumulate only on success. */
  if (rc == IMP_OK) {
    for (size_t j = 0; xbar != NULL && j < nx; j++)
      xbar[j] += d->xgrad.data[j];
    for (size_t j = 0; j < nt; j++)
      grads[j] += d->tgrad.data[j];
  }
  d->stats.backward_iterations = d->steps;
  d->stats.backward_vjp_calls = d->steps;
  imp_workspace_free(&work);
  return rc;
}

static int deq_backward(imp_layer *layer, double *xbar, const double *ybar,
                        const imp_shape *in, const double *x, const double *y)
{
  deq *d = imp_layer_state(layer);

  (void)y;
  if (d->mode == MODE_NONE || !same_shape(in, &d->xs))
    return imp__fail(IMP_EINVAL,
                     "%s: backward needs a successful forward "
                     "on an input of this shape first",
                     imp_layer_name(layer));
  d->x = x;
  d->theta = imp_layer_params(layer);
  if (d->mode == MODE_STEPPED)
    return backward_stepped(d, xbar, ybar, imp_layer_grads(layer));
  return backward_implicit(d, xbar, ybar, imp_layer_grads(layer));
}

/* ------------------------------------------------------------------ */
/* Creation and the kind's own functions. */

static void deq_destroy(void *state)
{
  deq *d = state;

  if (d == NULL)
    return;
  if (d->owner.destroy != NULL)
    d->owner.destroy(d->owner.ctx);
  imp_workspace_free(&d->zstar);
  imp_workspace_free(&d->traj);
  imp_workspace_free(&d->init);
  free(d->trace.data);
  imp_workspace_free(&d->xpack);
  imp_workspace_free(&d->zwork);
  imp_workspace_free(&d->xgrad);
  imp_workspace_free(&d->tgrad);
  free(d);
}

static int deq_rebind(imp_layer *layer)
{
  deq *d = imp_layer_state(layer);

  if (d->owner.rebind == NULL)
    return IMP_OK;
  return d->owner.rebind(d->owner.ctx, imp_layer_params(layer));
}

static const imp_layer_ops deq_ops = {
    .kind = "deq",
    .output_shape = deq_output_shape,
    .forward = deq_forward,
    .backward = deq_backward,
    .rebind = deq_rebind,
    .destroy = deq_destroy,
};

static void resolve_budget(imp_deq_budget *b, size_t iters, double rtol)
{
  if (b->max_iter == 0)
    b->max_iter = iters;
  if (b->rtol <= 0.0 && b->atol <= 0.0)
    b->rtol = rtol;
}

static imp_deq_options resolve_options(const imp_deq_options *opt)
{
  imp_deq_options o = {0};

  if (opt != NULL)
    o = *opt;
  if (o.solver == NULL)
    o.solver = imp_fp_anderson;
  resolve_budget(&o.train, 30, 1e-4);
  resolve_budget(&o.eval, 100, 1e-6);
  if (o.phantom_steps == 0)
    o.phantom_steps = 5;
  if (o.phantom_damping <= 0.0)
    o.phantom_damping = 0.5;
  if (o.unroll_damping <= 0.0)
    o.unroll_damping = 1.0;
  if (o.adjoint.method == IMP_ADJOINT_AUTO)
    o.adjoint.method = IMP_ADJOINT_FIXED_POINT;
  if (o.adjoint.method == IMP_ADJOINT_FIXED_POINT &&
      o.adjoint.fp_solver == NULL)
    o.adjoint.fp_solver = o.solver;
  if (o.adjoint.fp.memory == 0 && o.adjoint.fp.damping <= 0.0 &&
      o.adjoint.fp.ridge <= 0.0)
    o.adjoint.fp = o.fp; /* the forward's memory, damping and ridge */
  return o;
}

/* Fill the defaults taken from the training budget: at creation, and
 * again each time imp_deq_set_budget replaces that budget, so that they
 * never go stale. */
static void follow_training_budget(deq *d)
{
  if (d->derive_unroll)
    d->opt.unroll_steps = d->opt.train.max_iter;
  if (d->derive_adjoint_iter)
    d->opt.adjoint.max_iter = d->opt.train.max_iter;
  if (d->derive_adjoint_rtol)
    d->opt.adjoint.rtol = d->opt.train.rtol;
}

/* A budget's tolerances: finite and not negative, and where defaults are
 * not allowed (imp_deq_set_budget), at least one positive and max_iter
 * positive too. */
static int check_budget(const char *where, const char *which,
                        const imp_deq_budget *b, int defaults)
{
  if (!defaults && b->max_iter == 0)
    return imp__fail(IMP_EINVAL, "%s: a %s budget of zero iterations", where,
                     which);
  if (!(b->rtol >= 0.0) || !(b->atol >= 0.0) || !isfinite(b->rtol) ||
      !isfinite(b->atol) || (!defaults && b->rtol == 0.0 && b->atol == 0.0))
    return imp__fail(IMP_EINVAL, "%s: %s tolerances rtol %g, atol %g: need %s",
                     where, which, b->rtol, b->atol,
                     defaults ? "finite values >= 0 (both 0 for the default)"
                              : "at least one positive, both finite and "
                                ">= 0");
  return IMP_OK;
}

/* A value whose 0 means its default: finite and not negative. */
static int check_default_zero(const char *field, double v)
{
  if (!(v >= 0.0) || !isfinite(v))
    return imp__fail(IMP_EINVAL,
                     "deq_create: %s = %g: need a finite value > 0 (0 for "
                     "the default)",
                     field, v);
  return IMP_OK;
}

/* The options as imp_deq_set_budget would judge them, zeros meaning the
 * defaults; NaN and Inf are never defaults. */
static int check_options(const imp_deq_options *o)
{
  if (o->backward != IMP_DEQ_IMPLICIT && o->backward != IMP_DEQ_PHANTOM &&
      o->backward != IMP_DEQ_UNROLLED)
    return imp__fail(IMP_EINVAL, "deq_create: unknown backward mode %d",
                     (int)o->backward);
  if (o->init != IMP_DEQ_INIT_ZERO && o->init != IMP_DEQ_INIT_PREVIOUS &&
      o->init != IMP_DEQ_INIT_GIVEN)
    return imp__fail(IMP_EINVAL, "deq_create: unknown init %d", (int)o->init);
  IMP__TRY(check_budget("deq_create", "train", &o->train, 1));
  IMP__TRY(check_budget("deq_create", "eval", &o->eval, 1));
  IMP__TRY(check_default_zero("phantom_damping", o->phantom_damping));
  IMP__TRY(check_default_zero("unroll_damping", o->unroll_damping));
  IMP__TRY(check_default_zero("fp.damping", o->fp.damping));
  IMP__TRY(check_default_zero("fp.ridge", o->fp.ridge));
  IMP__TRY(check_default_zero("adjoint.rtol", o->adjoint.rtol));
  return IMP_OK;
}

int imp_deq_create(const imp_deq_map *map, const double *theta0,
                   const imp_deq_options *opt, const char *name,
                   imp_layer **out)
{
  return imp__deq_create(map, theta0, opt, name, NULL, out);
}

int imp__deq_create(const imp_deq_map *map, const double *theta0,
                    const imp_deq_options *opt, const char *name,
                    const imp__deq_owner *owner, imp_layer **out)
{
  deq *d;
  int rc;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "deq_create: NULL output pointer");
  *out = NULL;
  if (map == NULL || map->map == NULL || map->z_channels == 0)
    return imp__fail(IMP_EINVAL, "deq_create: the map needs a map "
                                 "callback and z_channels > 0");
  if (opt != NULL)
    IMP__TRY(check_options(opt));
  if (theta0 != NULL && !imp__all_finite(theta0, map->ntheta))
    return imp__fail(IMP_ENONFINITE, "deq_create: NaN or Inf in theta0");

  d = calloc(1, sizeof *d);
  if (d == NULL)
    return imp__fail(IMP_ENOMEM, "deq_create");
  d->map = *map;
  d->opt = resolve_options(opt);
  d->derive_unroll = d->opt.unroll_steps == 0;
  d->derive_adjoint_iter = d->opt.adjoint.max_iter == 0;
  d->derive_adjoint_rtol = d->opt.adjoint.rtol == 0.0;
  follow_training_budget(d);
  if (owner != NULL)
    d->owner = *owner;
  rc = imp_layer_create(&deq_ops, d, map->ntheta, name, out);
  if (rc != IMP_OK) {
    free(d);
    return rc;
  }
  if (owner != NULL && owner->rebind != NULL) {
    rc = owner->rebind(owner->ctx, imp_layer_params(*out));
    if (rc != IMP_OK) {
      d->owner.destroy = NULL; /* the caller keeps the context */
      imp_layer_free(*out);
      *out = NULL;
      return rc;
    }
  }
  if (theta0 != NULL && map->ntheta > 0)
    memcpy(imp_layer_params(*out), theta0, map->ntheta * sizeof(double));
  return IMP_OK;
}

static deq *deq_of(const imp_layer *layer)
{
  return imp_layer_get_ops(layer) == &deq_ops ? imp_layer_state(layer) : NULL;
}

int imp_deq_get_stats(const imp_layer *layer, imp_deq_stats *stats)
{
  deq *d = deq_of(layer);

  if (d == NULL || stats == NULL)
    return imp__fail(IMP_EINVAL, "deq_get_stats: not a DEQ layer, or NULL");
  *stats = d->stats;
  return IMP_OK;
}

int imp_deq_set_budget(imp_layer *layer, int training,
                       const imp_deq_budget *budget)
{
  deq *d = deq_of(layer);

  if (d == NULL || budget == NULL)
    return imp__fail(IMP_EINVAL, "deq_set_budget: not a DEQ layer, or "
                                 "NULL");
  IMP__TRY(check_budget("deq_set_budget", training ? "training" : "evaluation",
                        budget, 0));
  if (training) {
    d->opt.train = *budget;
    follow_training_budget(d);
  } else {
    d->opt.eval = *budget;
  }
  return IMP_OK;
}

int imp_deq_set_initial(imp_layer *layer, const imp_shape *zs, const double *z0)
{
  deq *d = deq_of(layer);
  size_t n;

  if (d == NULL || zs == NULL || z0 == NULL)
    return imp__fail(IMP_EINVAL, "deq_set_initial: not a DEQ layer, or "
                                 "NULL");
  n = imp_shape_numel(zs);
  if (n == 0 || zs->c != d->map.z_channels)
    return imp__fail(IMP_ESHAPE,
                     "deq_set_initial: %zu channels, the map "
                     "has %zu",
                     zs->c, d->map.z_channels);
  if (!imp__all_finite(z0, n))
    return imp__fail(IMP_ENONFINITE, "deq_set_initial: NaN or Inf");
  IMP__TRY(imp_workspace_reserve(&d->init, n));
  memcpy(d->init.data, z0, n * sizeof(double));
  d->init_shape = *zs;
  d->has_init = 1;
  return IMP_OK;
}

int imp_deq_spectral_radius(imp_layer *layer, const double *x,
                            size_t iterations, double *rho)
{
  deq *d = deq_of(layer);
  size_t nz;
  double *u, *w, log_sum = 0.0;
  size_t counted = 0;
  imp_rng rng;
  int rc = IMP_OK;

  if (d == NULL || x == NULL || rho == NULL || iterations == 0)
    return imp__fail(IMP_EINVAL, "deq_spectral_radius: not a DEQ layer, "
                                 "NULL, or no iterations");
  if (!d->has_prev)
    return imp__fail(IMP_EINVAL, "deq_spectral_radius: no fixed point yet");
  nz = imp_shape_numel(&d->zs);
  u = imp__dalloc(nz);
  w = imp__dalloc(nz);
  if (u == NULL || w == NULL) {
    free(u);
    free(w);
    return imp__fail(IMP_ENOMEM, "deq_spectral_radius");
  }
  d->x = x;
  d->theta = imp_layer_params(layer);

  /* Power iteration on (dh/dz)^T; the geometric mean of the growth over
   * the second half of the run copes with complex dominant pairs. */
  imp_rng_seed(&rng, 1);
  imp_rng_fill_normal(&rng, u, nz, 0.0, 1.0);
  for (size_t k = 0; k < iterations && rc == IMP_OK; k++) {
    double nu = imp__nrm2(nz, u), nw;

    for (size_t i = 0; i < nz; i++)
      u[i] /= nu;
    rc = apply_vjp(d, d->zstar.data, u, w, NULL, NULL);
    nw = imp__nrm2(nz, w);
    if (rc == IMP_OK && k >= iterations / 2) {
      log_sum += log(nw > 0.0 ? nw : 1e-300);
      counted++;
    }
    memcpy(u, w, nz * sizeof(double));
    if (nw == 0.0)
      break;
  }
  if (rc == IMP_OK)
    *rho = counted > 0 ? exp(log_sum / (double)counted) : 0.0;
  free(u);
  free(w);
  return rc;
}

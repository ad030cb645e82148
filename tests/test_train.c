/*
 * test_train.c - stacks, optimizers, gradient clipping, learning-rate
 * schedules and checkpoints.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/internal.h"
#include "imp.h"
#include "imp/blocks.h"
#include "imp/loss.h"

/* ------------------------------------------------------------------ */
/* A small implicit layer written here on the core API: per feature j,
 * the output solves the fixed point
 *
 *     y_j = tanh(a_j y_j + x_j),   residual f = y - tanh(a y + x),
 *
 * with parameters a (|a_j| < 1, so the map is a contraction in y).
 * Forward iterates to the fixed point; backward is the shared adjoint
 * solve, imp_adjoint_solve, per sample. */

static int fp_residual(void *ctx, const double *x, const double *y,
                       const double *theta, double *r)
{
  size_t n = *(const size_t *)ctx;

  for (size_t j = 0; j < n; j++)
    r[j] = y[j] - tanh(theta[j] * y[j] + x[j]);
  return 0;
}

static int fp_vjp(void *ctx, const double *x, const double *y,
                  const double *theta, const double *v, double *vjp_y,
                  double *vjp_x, double *vjp_theta)
{
  size_t n = *(const size_t *)ctx;

  for (size_t j = 0; j < n; j++) {
    double t = tanh(theta[j] * y[j] + x[j]), d = 1.0 - t * t;

    if (vjp_y != NULL)
      vjp_y[j] = v[j] - v[j] * d * theta[j];
    if (vjp_x != NULL)
      vjp_x[j] -= v[j] * d;
    if (vjp_theta != NULL)
      vjp_theta[j] -= v[j] * d * y[j];
  }
  return 0;
}

typedef struct fp_state {
  size_t features;
} fp_state;

static int fp_output_shape(const imp_layer *layer, const imp_shape *in,
                           imp_shape *out)
{
  const fp_state *s = imp_layer_state(layer);

  if (imp_shape_sample(in) != s->features)
    return imp__fail(IMP_ESHAPE, "fixed point: %zu features, expected %zu",
                     imp_shape_sample(in), s->features);
  *out = *in;
  return IMP_OK;
}

static int fp_forward(imp_layer *layer, const imp_shape *in, const double *x,
                      double *y)
{
  const fp_state *s = imp_layer_state(layer);
  const double *a = imp_layer_params(layer);
  size_t m = s->features;

  for (size_t b = 0; b < in->n; b++)
    for (size_t j = 0; j < m; j++) {
      double z = 0.0;

      for (int it = 0; it < 400; it++) {
        double next = tanh(a[j] * z + x[b * m + j]);

        if (next == z)
          break;
        z = next;
      }
      y[b * m + j] = z;
    }
  return IMP_OK;
}

static int fp_backward(imp_layer *layer, double *xbar, const double *ybar,
                       const imp_shape *in, const double *x, const double *y)
{
  fp_state *s = imp_layer_state(layer);
  size_t m = s->features;
  imp_problem p = {.nx = m,
                   .ny = m,
                   .ntheta = m,
                   .residual = fp_residual,
                   .vjp = fp_vjp,
                   .ctx = &s->features};

  for (size_t b = 0; b < in->n; b++)
    IMP__TRY(imp_adjoint_solve(&p, x + b * m, y + b * m,
                               imp_layer_params(layer), ybar + b * m, NULL,
                               xbar != NULL ? xbar + b * m : NULL,
                               imp_layer_grads(layer), NULL, NULL));
  return IMP_OK;
}

static const imp_layer_ops fp_ops = {.kind = "test_fixed_point",
                                     .output_shape = fp_output_shape,
                                     .forward = fp_forward,
                                     .backward = fp_backward,
                                     .destroy = free};

static imp_layer *fixed_point_layer(size_t features, const char *name)
{
  fp_state *s = malloc(sizeof *s);
  imp_layer *l;

  ck_assert_ptr_nonnull(s);
  s->features = features;
  ck_assert_int_eq(imp_layer_create(&fp_ops, s, features, name, &l), IMP_OK);
  for (size_t j = 0; j < features; j++)
    imp_layer_params(l)[j] = 0.6 * sin(1.0 + 2.0 * (double)j);
  return l;
}

static imp_layer *dense(size_t in, size_t out, imp_rng *rng, const char *name)
{
  imp_layer *l;

  ck_assert_int_eq(imp_dense_create(in, out, rng, name, &l), IMP_OK);
  /* A non-zero bias, so that its gradient is exercised too. */
  for (size_t o = 0; o < out; o++)
    imp_layer_params(l)[out * in + o] = 0.1 * (double)o - 0.2;
  return l;
}

static imp_layer *activation(imp_activation kind)
{
  imp_layer *l;

  ck_assert_int_eq(imp_activation_create(kind, NULL, &l), IMP_OK);
  return l;
}

static void add(imp_stack *s, imp_layer *l)
{
  ck_assert_int_eq(imp_stack_add(s, l), IMP_OK);
}

/*
 * The mixed stack of most tests, for inputs of 3 features:
 *   dense 3 -> 5, tanh, fixed point (5), [dense 5 -> 4, softplus], dense
 *   4 -> 2,
 * with the bracket a nested stack.
 */
static imp_stack *mixed_stack_named(uint64_t seed, const char *head)
{
  imp_stack *s, *inner;
  imp_layer *view;
  imp_rng rng;

  imp_rng_seed(&rng, seed);
  ck_assert_int_eq(imp_stack_create("mixed", &s), IMP_OK);
  ck_assert_int_eq(imp_stack_create("inner", &inner), IMP_OK);
  add(s, dense(3, 5, &rng, "d1"));
  add(s, activation(IMP_ACT_TANH));
  add(s, fixed_point_layer(5, "fp"));
  add(inner, dense(5, 4, &rng, "d2"));
  add(inner, activation(IMP_ACT_SOFTPLUS));
  ck_assert_int_eq(imp_stack_as_layer(inner, &view), IMP_OK);
  add(s, view);
  add(s, dense(4, 2, &rng, head));
  return s;
}

static imp_stack *mixed_stack(uint64_t seed)
{
  return mixed_stack_named(seed, "d3");
}

/* ------------------------------------------------------------------ */
/* Stack: structure and the flat view. */

START_TEST(stack_flat_view)
{
  imp_stack *s = mixed_stack(1), *inner;
  size_t total = 0;

  ck_assert_uint_eq(imp_stack_nlayers(s), 5);
  ck_assert_ptr_null(imp_stack_layer(s, 5));

  /* Every layer's parameters and gradients live in the flat buffers, in
   * order, nested layers included. */
  for (size_t k = 0; k < imp_stack_nlayers(s); k++) {
    imp_layer *l = imp_stack_layer(s, k);

    ck_assert_uint_eq(imp_stack_param_offset(s, k), total);
    ck_assert_ptr_eq(imp_layer_params(l), imp_stack_params(s) + total);
    ck_assert_ptr_eq(imp_layer_grads(l), imp_stack_grads(s) + total);
    total += imp_layer_nparams(l);
  }
  ck_assert_uint_eq(imp_stack_nparams(s), total);
  ck_assert_uint_eq(total, (15 + 5) + 5 + (20 + 4) + (8 + 2));

  inner = imp_stack_from_layer(imp_stack_layer(s, 3));
  ck_assert_ptr_nonnull(inner);
  ck_assert_ptr_null(imp_stack_from_layer(imp_stack_layer(s, 0)));
  ck_assert_str_eq(imp_layer_kind(imp_stack_layer(s, 3)), "stack");
  ck_assert_ptr_eq(imp_stack_params(inner),
                   imp_stack_params(s) + imp_stack_param_offset(s, 3));
  ck_assert_ptr_eq(imp_layer_params(imp_stack_layer(inner, 0)),
                   imp_stack_params(s) + imp_stack_param_offset(s, 3));

  imp_stack_free(s);
}
END_TEST

/* Three levels of nesting: values survive every move, every leaf's
 * storage lies in the outermost flat buffer, and the output is the
 * composition of the leaves. */
START_TEST(stack_nests_deeply)
{
  imp_stack *s1, *s2, *s3;
  imp_layer *v2, *v3, *leaf[4];
  imp_rng rng;
  imp_shape in = {2, 2, 1, 1}, mid = {2, 3, 1, 1};
  double x[4] = {0.3, -0.7, 1.1, 0.2}, y[4], a[6], b[6], want[4];
  double *before;
  size_t np;

  imp_rng_seed(&rng, 9);
  leaf[0] = dense(2, 3, &rng, "l0");
  leaf[1] = activation(IMP_ACT_TANH);
  leaf[2] = dense(3, 3, &rng, "l2");
  leaf[3] = dense(3, 2, &rng, "l3");
  ck_assert_int_eq(imp_stack_create("s3", &s3), IMP_OK);
  ck_assert_int_eq(imp_stack_create("s2", &s2), IMP_OK);
  ck_assert_int_eq(imp_stack_create("s1", &s1), IMP_OK);
  add(s3, leaf[0]);
  add(s3, leaf[1]);
  ck_assert_int_eq(imp_stack_as_layer(s3, &v3), IMP_OK);
  add(s2, v3);
  add(s2, leaf[2]);
  ck_assert_int_eq(imp_stack_as_layer(s2, &v2), IMP_OK);
  add(s1, v2);
  np = imp_stack_nparams(s1);
  before = malloc(np * sizeof(double));
  ck_assert_ptr_nonnull(before);
  memcpy(before, imp_stack_params(s1), np * sizeof(double));
  add(s1, leaf[3]);
  ck_assert_uint_eq(np, 9 + 12);
  ck_assert_mem_eq(imp_stack_params(s1), before, np * sizeof(double));
  ck_assert_ptr_eq(imp_layer_params(leaf[0]), imp_stack_params(s1));
  ck_assert_ptr_eq(imp_layer_params(leaf[2]), imp_stack_params(s1) + 9);
  ck_assert_ptr_eq(imp_layer_params(leaf[3]), imp_stack_params(s1) + 21);
  ck_assert_ptr_eq(imp_stack_params(s3), imp_stack_params(s1));

  /* The leaves by hand. */
  ck_assert_int_eq(imp_layer_forward(leaf[0], &in, x, a), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(leaf[1], &mid, a, b), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(leaf[2], &mid, b, a), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(leaf[3], &mid, a, want), IMP_OK);
  ck_assert_int_eq(imp_stack_forward(s1, &in, x, y), IMP_OK);
  ck_assert_mem_eq(y, want, sizeof y);

  free(before);
  imp_stack_free(s1);
}
END_TEST

START_TEST(stack_add_preserves_values)
{
  imp_stack *s;
  imp_layer *a, *b;
  imp_rng rng;
  double pa[20], ga[20], pb[10];

  imp_rng_seed(&rng, 5);
  a = dense(3, 5, &rng, "a");
  b = dense(4, 2, &rng, "b");
  for (int i = 0; i < 20; i++)
    imp_layer_grads(a)[i] = 0.5 * i;
  memcpy(pa, imp_layer_params(a), sizeof pa);
  memcpy(ga, imp_layer_grads(a), sizeof ga);
  memcpy(pb, imp_layer_params(b), sizeof pb);

  /* Each add moves every layer into a new flat pair, values kept. */
  ck_assert_int_eq(imp_stack_create(NULL, &s), IMP_OK);
  add(s, a);
  ck_assert_mem_eq(imp_stack_params(s), pa, sizeof pa);
  add(s, b);
  ck_assert_mem_eq(imp_stack_params(s), pa, sizeof pa);
  ck_assert_mem_eq(imp_stack_grads(s), ga, sizeof ga);
  ck_assert_mem_eq(imp_stack_params(s) + 20, pb, sizeof pb);

  /* zero_grad clears the whole flat gradient. */
  imp_stack_zero_grad(s);
  for (int i = 0; i < 30; i++)
    ck_assert(imp_stack_grads(s)[i] == 0.0);
  imp_stack_free(s);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Stack: the whole gradient against finite differences. */

#define GC_BATCH 3
#define GC_IN 3
#define GC_OUT 2

/* L(params, x) = sum_i w_i y_i: the gradient check's objective over the
 * concatenation [params, x]. */
typedef struct stack_objective {
  imp_stack *stack;
  imp_shape in;
  double w[GC_BATCH * GC_OUT];
} stack_objective;

static int stack_objective_eval(void *ctx, const double *z, double *value)
{
  stack_objective *o = ctx;
  size_t np = imp_stack_nparams(o->stack);
  double y[GC_BATCH * GC_OUT];

  memcpy(imp_stack_params(o->stack), z, np * sizeof(double));
  if (imp_stack_forward(o->stack, &o->in, z + np, y) != IMP_OK)
    return 1;
  *value = 0.0;
  for (int i = 0; i < GC_BATCH * GC_OUT; i++)
    *value += o->w[i] * y[i];
  return 0;
}

START_TEST(stack_gradient_matches_fd)
{
  stack_objective o = {.stack = mixed_stack(2), .in = {GC_BATCH, GC_IN, 1, 1}};
  size_t np = imp_stack_nparams(o.stack), nz = np + GC_BATCH * GC_IN;
  double *z = malloc(nz * sizeof(double)), *g = calloc(nz, sizeof(double));
  double y[GC_BATCH * GC_OUT], value;
  imp_gradcheck_result res;

  ck_assert_ptr_nonnull(z);
  ck_assert_ptr_nonnull(g);
  memcpy(z, imp_stack_params(o.stack), np * sizeof(double));
  for (int i = 0; i < GC_BATCH * GC_IN; i++)
    z[np + i] = sin(0.7 * i + 0.3);
  for (int i = 0; i < GC_BATCH * GC_OUT; i++)
    o.w[i] = 1.0 - 0.35 * i;

  /* Analytic: forward, then backward from ybar = w; the gradients are
   * accumulated, so a second backward must double them. */
  ck_assert_int_eq(stack_objective_eval(&o, z, &value), 0);
  imp_stack_zero_grad(o.stack);
  ck_assert_int_eq(imp_stack_backward(o.stack, g + np, o.w), IMP_OK);
  memcpy(g, imp_stack_grads(o.stack), np * sizeof(double));
  ck_assert_int_eq(imp_stack_backward(o.stack, NULL, o.w), IMP_OK);
  for (size_t i = 0; i < np; i++)
    ck_assert_double_eq_tol(imp_stack_grads(o.stack)[i], 2.0 * g[i],
                            1e-12 * (1.0 + fabs(g[i])));

  /* Fourth-order differences over every parameter and every input. */
  ck_assert_int_eq(
      imp_gradcheck(stack_objective_eval, &o, z, nz, g, NULL, &res), IMP_OK);
  ck_assert_msg(res.max_rel_err < 1e-8, "max rel err %g at %zu",
                res.max_rel_err, res.worst); /* tolerance: 1e-8 */

  /* The output is that of the layers applied by hand. */
  ck_assert_int_eq(imp_stack_forward(o.stack, &o.in, z + np, y), IMP_OK);
  {
    const double *a;
    imp_shape sh;

    ck_assert_int_eq(imp_stack_activation(o.stack, 5, &sh, &a), IMP_OK);
    ck_assert_uint_eq(sh.n, GC_BATCH);
    ck_assert_uint_eq(sh.c, GC_OUT);
    ck_assert_mem_eq(a, y, sizeof y);
    ck_assert_int_eq(imp_stack_activation(o.stack, 0, &sh, &a), IMP_OK);
    ck_assert_mem_eq(a, z + np, GC_BATCH * GC_IN * sizeof(double));
    ck_assert_int_eq(imp_stack_activation(o.stack, 6, &sh, &a), IMP_EINVAL);
  }

  free(z);
  free(g);
  imp_stack_free(o.stack);
}
END_TEST

/* A stack used as a layer behaves exactly like the stack itself. */
START_TEST(stack_view_matches_stack)
{
  imp_stack *s = mixed_stack(3);
  imp_layer *view;
  imp_shape in = {2, 3, 1, 1}, out;
  double x[6] = {0.1, -0.4, 0.9, 0.3, 0.2, -0.8}, ybar[4] = {1, -2, 0.5, 3};
  double y1[4], y2[4], xb1[6] = {0}, xb2[6] = {0};
  double *g1 = calloc(imp_stack_nparams(s), sizeof(double));

  ck_assert_ptr_nonnull(g1);
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y1), IMP_OK);
  ck_assert_int_eq(imp_stack_backward(s, xb1, ybar), IMP_OK);
  memcpy(g1, imp_stack_grads(s), imp_stack_nparams(s) * sizeof(double));
  imp_stack_zero_grad(s);

  ck_assert_int_eq(imp_stack_as_layer(s, &view), IMP_OK);
  ck_assert_int_eq(imp_layer_output_shape(view, &in, &out), IMP_OK);
  ck_assert_uint_eq(out.c, 2);
  ck_assert_uint_eq(imp_layer_nparams(view), imp_stack_nparams(s));
  ck_assert_ptr_eq(imp_layer_params(view), imp_stack_params(s));
  ck_assert_int_eq(imp_layer_forward(view, &in, x, y2), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(view, xb2, ybar, &in, x, y2), IMP_OK);
  ck_assert_mem_eq(y1, y2, sizeof y1);
  ck_assert_mem_eq(xb1, xb2, sizeof xb1);
  ck_assert_mem_eq(g1, imp_stack_grads(s),
                   imp_stack_nparams(s) * sizeof(double));

  /* A second call returns the same view; the architecture is now fixed. */
  {
    imp_layer *again, *extra = activation(IMP_ACT_RELU);

    ck_assert_int_eq(imp_stack_as_layer(s, &again), IMP_OK);
    ck_assert_ptr_eq(again, view);
    ck_assert_int_eq(imp_stack_add(s, extra), IMP_EUNSUPPORTED);
    imp_layer_free(extra);
  }

  free(g1);
  imp_layer_free(view); /* frees the stack: they are one object */
}
END_TEST

/* Activations grow with the batch and the results do not depend on what
 * ran before. */
START_TEST(stack_buffers_grow)
{
  imp_stack *s = mixed_stack(4);
  double x[7 * 3], y7[7 * 2], y1[2], y2[2 * 2];
  imp_shape in7 = {7, 3, 1, 1}, in1 = {1, 3, 1, 1}, in2 = {2, 3, 1, 1}, out;

  for (int i = 0; i < 21; i++)
    x[i] = cos(0.37 * i);
  ck_assert_int_eq(imp_stack_forward(s, &in2, x, y2), IMP_OK);
  ck_assert_int_eq(imp_stack_forward(s, &in7, x, y7), IMP_OK);
  ck_assert_int_eq(imp_stack_output_shape(s, &in7, &out), IMP_OK);
  ck_assert_uint_eq(out.n, 7);
  ck_assert_uint_eq(out.c, 2);
  for (int b = 0; b < 7; b++) {
    ck_assert_int_eq(imp_stack_forward(s, &in1, x + 3 * b, y1), IMP_OK);
    ck_assert_double_eq_tol(y1[0], y7[2 * b], 1e-14);
    ck_assert_double_eq_tol(y1[1], y7[2 * b + 1], 1e-14);
  }
  ck_assert_double_eq_tol(y2[3], y7[3], 1e-14);
  imp_stack_free(s);
}
END_TEST

START_TEST(stack_empty_is_identity)
{
  imp_stack *s;
  imp_shape in = {2, 2, 1, 1}, out;
  double x[4] = {1, 2, 3, 4}, y[4], xbar[4] = {1, 1, 1, 1};
  double ybar[4] = {0.5, -1, 2, 0};

  ck_assert_int_eq(imp_stack_create("empty", &s), IMP_OK);
  ck_assert_uint_eq(imp_stack_nparams(s), 0);
  ck_assert_int_eq(imp_stack_output_shape(s, &in, &out), IMP_OK);
  ck_assert_uint_eq(out.c, 2);
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_OK);
  ck_assert_mem_eq(x, y, sizeof x);
  ck_assert_int_eq(imp_stack_backward(s, xbar, ybar), IMP_OK);
  ck_assert(xbar[0] == 1.5 && xbar[1] == 0.0 && xbar[2] == 3.0 &&
            xbar[3] == 1.0);
  imp_stack_free(s);
}
END_TEST

START_TEST(stack_training_mode_propagates)
{
  imp_stack *s = mixed_stack(6);
  imp_stack *inner = imp_stack_from_layer(imp_stack_layer(s, 3));
  imp_layer *view = imp_stack_layer(s, 3);
  imp_shape in = {1, 3, 1, 1};
  double x[3] = {0.1, 0.2, 0.3}, y[2];

  imp_stack_set_training(s, 0);
  for (size_t k = 0; k < imp_stack_nlayers(s); k++)
    ck_assert_int_eq(imp_layer_training(imp_stack_layer(s, k)), 0);
  for (size_t k = 0; k < imp_stack_nlayers(inner); k++)
    ck_assert_int_eq(imp_layer_training(imp_stack_layer(inner, k)), 0);

  /* Setting the view's mode reaches its children by the next forward. */
  imp_layer_set_training(view, 1);
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_OK);
  for (size_t k = 0; k < imp_stack_nlayers(inner); k++)
    ck_assert_int_eq(imp_layer_training(imp_stack_layer(inner, k)), 1);
  ck_assert_int_eq(imp_layer_training(imp_stack_layer(s, 0)), 0);
  imp_stack_free(s);
}
END_TEST

START_TEST(stack_bad_input)
{
  imp_stack *s, *bad;
  imp_layer *l;
  imp_rng rng;
  imp_shape in = {2, 3, 1, 1}, wrong = {2, 4, 1, 1}, empty = {0, 3, 1, 1};
  double x[8] = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}, y[4], ybar[4] = {0};

  /* NULL arguments. */
  ck_assert_int_eq(imp_stack_create(NULL, NULL), IMP_EINVAL);
  s = mixed_stack(7);
  ck_assert_int_eq(imp_stack_add(s, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_add(NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_forward(s, &in, NULL, y), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_forward(s, NULL, x, y), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_forward(NULL, &in, x, y), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_backward(s, NULL, ybar), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_backward(s, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_as_layer(NULL, &l), IMP_EINVAL);
  ck_assert_ptr_null(imp_stack_params(NULL));
  ck_assert_uint_eq(imp_stack_nlayers(NULL), 0);
  imp_stack_free(NULL);

  /* Backward needs a successful forward first; a failed forward forgets
   * the last good one. */
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_stack_backward(s, NULL, ybar), IMP_OK);

  /* Wrong input shape, empty input, NaN input, NaN parameters. */
  ck_assert_int_eq(imp_stack_forward(s, &wrong, x, y), IMP_ESHAPE);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "layer 0 (d1)"));
  ck_assert_int_eq(imp_stack_backward(s, NULL, ybar), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_forward(s, &empty, x, y), IMP_ESHAPE);
  x[4] = NAN;
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_ENONFINITE);
  x[4] = 0.5;
  imp_stack_params(s)[30] = INFINITY;
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_ENONFINITE);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "layer 3 (inner)"));
  imp_stack_params(s)[30] = 0.0;

  /* NaN in the output cotangent. */
  ck_assert_int_eq(imp_stack_forward(s, &in, x, y), IMP_OK);
  ybar[1] = NAN;
  ck_assert_int_eq(imp_stack_backward(s, NULL, ybar), IMP_ENONFINITE);

  /* The same layer twice; a nested stack's view in a second stack. */
  ck_assert_int_eq(imp_stack_add(s, imp_stack_layer(s, 1)), IMP_EINVAL);
  ck_assert_int_eq(imp_stack_create("other", &bad), IMP_OK);
  ck_assert_int_eq(imp_stack_add(bad, imp_stack_layer(s, 3)), IMP_EINVAL);
  ck_assert_uint_eq(imp_stack_nlayers(bad), 0);
  imp_stack_free(bad);
  imp_stack_free(s);

  /* Layers whose shapes do not chain: 3 -> 5, then 4 -> 2. */
  imp_rng_seed(&rng, 8);
  ck_assert_int_eq(imp_stack_create("bad", &bad), IMP_OK);
  add(bad, dense(3, 5, &rng, "first"));
  add(bad, dense(4, 2, &rng, "second"));
  ck_assert_int_eq(imp_stack_forward(bad, &in, x, y), IMP_ESHAPE);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "layer 1 (second)"));
  ck_assert_int_eq(imp_stack_output_shape(bad, &in, &wrong), IMP_ESHAPE);
  ck_assert_int_eq(imp_stack_backward(bad, NULL, ybar), IMP_EINVAL);
  imp_stack_free(bad);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Optimizers against hand-computed references. */

/* The test's gradient: f(p) = 1/2 sum_i c_i p_i^2, g = c p. */
static const double ref_c[3] = {1.0, 4.0, 0.25};
static const double ref_p0[3] = {1.0, -2.0, 0.5};

static void ref_grad(const double *p, double *g)
{
  for (int i = 0; i < 3; i++)
    g[i] = ref_c[i] * p[i];
}

/* Run steps updates of an optimizer made with opt, from ref_p0, writing
 * the parameters after each step into traj (steps x 3). */
static void run_optim(const imp_optim_type *type, const imp_optim_options *opt,
                      int steps, double *traj)
{
  imp_optim *o;
  double p[3], g[3];

  memcpy(p, ref_p0, sizeof p);
  ck_assert_int_eq(imp_optim_create(type, 3, opt, &o), IMP_OK);
  for (int t = 0; t < steps; t++) {
    ref_grad(p, g);
    ck_assert_int_eq(imp_optim_step(o, p, g, 3), IMP_OK);
    memcpy(traj + 3 * t, p, sizeof p);
  }
  ck_assert_uint_eq(imp_optim_steps(o), (uint64_t)steps);
  imp_optim_free(o);
}

static void assert_traj(const double *got, const double *want, int n)
{
  for (int i = 0; i < n; i++)
    ck_assert_msg(fabs(got[i] - want[i]) <= 1e-14 * (1.0 + fabs(want[i])),
                  "entry %d: %.17g, expected %.17g", i, got[i], want[i]);
}

/*
 * The same updates restated per coordinate, straight from the formulas
 * of imp/optim.h, for the longer runs.
 */
static void reference_sgd(double lr, double mu, int nesterov, double wd,
                          int steps, double *traj)
{
  for (int i = 0; i < 3; i++) {
    double p = ref_p0[i], b = 0.0;

    for (int t = 0; t < steps; t++) {
      double g = ref_c[i] * p + wd * p;

      b = mu * b + g;
      p = p - lr * (nesterov ? g + mu * b : b);
      traj[3 * t + i] = p;
    }
  }
}

static void reference_adam(double lr, double b1, double b2, double eps,
                           double wd, int steps, double *traj)
{
  for (int i = 0; i < 3; i++) {
    double p = ref_p0[i], m = 0.0, v = 0.0;

    for (int t = 1; t <= steps; t++) {
      double g = ref_c[i] * p, mhat, vhat;

      p = p * (1.0 - lr * wd); /* decoupled (AdamW) */
      m = b1 * m + (1.0 - b1) * g;
      v = b2 * v + (1.0 - b2) * g * g;
      mhat = m / (1.0 - pow(b1, t));
      vhat = v / (1.0 - pow(b2, t));
      p = p - lr * mhat / (sqrt(vhat) + eps);
      traj[3 * (t - 1) + i] = p;
    }
  }
}

static void reference_rmsprop(double lr, double rho, double mu, double eps,
                              int steps, double *traj)
{
  for (int i = 0; i < 3; i++) {
    double p = ref_p0[i], s = 0.0, b = 0.0;

    for (int t = 0; t < steps; t++) {
      double g = ref_c[i] * p;

      s = rho * s + (1.0 - rho) * g * g;
      b = mu * b + g / (sqrt(s) + eps);
      p = p - lr * b;
      traj[3 * t + i] = p;
    }
  }
}

START_TEST(optim_sgd_reference)
{
  imp_optim_options opt = imp_optim_defaults();
  double got[30], want[30];

  /* Step 1 by hand: g = c p + 0.1 p = (1.1, -8.2, 0.175), b = g,
   * p = p0 - 0.1 b = (0.89, -1.18, 0.4825). */
  static const double hand[9] = {0.89,     -1.18,    0.4825,
                                 0.6931,   0.0418,   0.4498625,
                                 0.439649, 1.124282, 0.4047435625};
  opt.lr = 0.1;
  opt.momentum = 0.9;
  opt.weight_decay = 0.1;
  run_optim(imp_optim_sgd, &opt, 10, got);
  assert_traj(got, hand, 9);
  reference_sgd(0.1, 0.9, 0, 0.1, 10, want);
  assert_traj(got, want, 30);

  /* Nesterov, step 1: b = g = (1, -8, 0.125), d = g + 0.9 b = 1.9 g,
   * p = p0 - 0.19 g = (0.81, -0.48, 0.47625). */
  static const double nesterov[6] = {0.81,   -0.48,  0.47625,
                                     0.5751, 0.5328, 0.443503125};
  opt.weight_decay = 0.0;
  opt.nesterov = 1;
  run_optim(imp_optim_sgd, &opt, 10, got);
  assert_traj(got, nesterov, 6);
  reference_sgd(0.1, 0.9, 1, 0.0, 10, want);
  assert_traj(got, want, 30);

  /* Without momentum: plain gradient descent, p1 = p0 - 0.1 c p0. */
  opt.momentum = 0.0;
  opt.nesterov = 0;
  run_optim(imp_optim_sgd, &opt, 1, got);
  ck_assert_double_eq_tol(got[0], 0.9, 1e-15);
  ck_assert_double_eq_tol(got[1], -1.2, 1e-15);
  ck_assert_double_eq_tol(got[2], 0.4875, 1e-15);
}
END_TEST

START_TEST(optim_adam_reference)
{
  imp_optim_options opt = imp_optim_defaults();
  double got[30], want[30];

  /* Step 1: mhat = g, vhat = g^2, so p1 = p0 - 0.1 g / (|g| + 1e-8):
   * each entry moves by 0.1 (less a hair for eps). */
  static const double adam[9] = {
      0.900000001,        -1.900000000125,     0.40000000799999935,
      0.8004122297123382, -1.8001664858630053, 0.3011874361594803,
      0.701586274504415,  -1.7006233916636408, 0.20487127481435818};
  opt.lr = 0.1;
  run_optim(imp_optim_adam, &opt, 10, got);
  assert_traj(got, adam, 9);
  reference_adam(0.1, 0.9, 0.999, 1e-8, 0.0, 10, want);
  assert_traj(got, want, 30);

  /* AdamW, lambda = 0.5: p shrinks by (1 - 0.05) before the Adam step,
   * p1 = 0.95 p0 - 0.1 sign(g). */
  static const double adamw[6] = {0.850000001,         -1.8000000001249998,
                                  0.37500000799999933, 0.7082484443656524,
                                  -1.610412227920495,  0.2579925081503335};
  opt.weight_decay = 0.5;
  opt.decoupled_decay = 1;
  run_optim(imp_optim_adam, &opt, 10, got);
  assert_traj(got, adamw, 6);
  reference_adam(0.1, 0.9, 0.999, 1e-8, 0.5, 10, want);
  assert_traj(got, want, 30);

  /* Coupled decay differs: g + lambda p enters the moments. */
  opt.decoupled_decay = 0;
  run_optim(imp_optim_adam, &opt, 10, got);
  ck_assert(fabs(got[27] - want[27]) > 1e-3);
}
END_TEST

START_TEST(optim_rmsprop_reference)
{
  imp_optim_options opt = imp_optim_defaults();
  double got[30], want[30];

  /* Step 1: s = 0.01 g^2, u = g / (0.1 |g| + eps) ~ 10 sign(g), so each
   * entry moves by about lr * 10 = 0.1. */
  static const double plain[9] = {
      0.9000000099999991, -1.90000000125,      0.40000007999993603,
      0.8329179752650593, -1.8309433272561533, 0.33733927565312555,
      0.7799822819823541, -1.7753494433525812, 0.29043333876247535};
  opt.lr = 0.01;
  run_optim(imp_optim_rmsprop, &opt, 10, got);
  assert_traj(got, plain, 9);
  reference_rmsprop(0.01, 0.99, 0.0, 1e-8, 10, want);
  assert_traj(got, want, 30);

  static const double momentum[6] = {0.9000000099999991,  -1.90000000125,
                                     0.40000007999993603, 0.7829179802650588,
                                     -1.7809433278811533, 0.28733931565309356};
  opt.momentum = 0.5;
  run_optim(imp_optim_rmsprop, &opt, 10, got);
  assert_traj(got, momentum, 6);
  reference_rmsprop(0.01, 0.99, 0.5, 1e-8, 10, want);
  assert_traj(got, want, 30);
}
END_TEST

/* Each optimizer minimizes f(p) = 1/2 (p - p*)^T A (p - p*), A SPD with
 * condition number about 10, under a cosine schedule to lr_min = 0. */
static double quadratic(const double *p, double *g)
{
  static const double a[16] = {4.0, 1.0, 0.0, 0.5, 1.0, 3.0, 0.5, 0.0,
                               0.0, 0.5, 2.0, 0.3, 0.5, 0.0, 0.3, 0.5};
  static const double star[4] = {1.0, -2.0, 0.5, 3.0};
  double f = 0.0;

  for (int i = 0; i < 4; i++) {
    g[i] = 0.0;
    for (int j = 0; j < 4; j++)
      g[i] += a[4 * i + j] * (p[j] - star[j]);
    f += 0.5 * (p[i] - star[i]) * g[i];
  }
  return f;
}

static void minimize(const imp_optim_type *type, imp_optim_options opt,
                     uint64_t steps, double tol)
{
  imp_schedule sched = {
      .kind = IMP_SCHEDULE_COSINE, .lr = opt.lr, .lr_min = 0.0, .total = steps};
  double p[4] = {0}, g[4], f0 = quadratic(p, g), f = f0, lr;
  imp_optim *o;

  ck_assert_int_eq(imp_optim_create(type, 4, &opt, &o), IMP_OK);
  for (uint64_t t = 0; t < steps; t++) {
    ck_assert_int_eq(imp_schedule_lr(&sched, t, &lr), IMP_OK);
    ck_assert_int_eq(imp_optim_set_lr(o, lr), IMP_OK);
    f = quadratic(p, g);
    ck_assert_int_eq(imp_optim_step(o, p, g, 4), IMP_OK);
  }
  f = quadratic(p, g);
  ck_assert_msg(f < tol * f0, "%s: f = %g from %g", imp_optim_name(o), f, f0);
  imp_optim_free(o);
}

START_TEST(optim_minimize_quadratic)
{
  imp_optim_options opt = imp_optim_defaults();

  opt.lr = 0.1;
  opt.momentum = 0.9;
  minimize(imp_optim_sgd, opt, 400, 1e-12); /* tolerance: f < 1e-12 f0 */
  opt.nesterov = 1;
  minimize(imp_optim_sgd, opt, 400, 1e-12);

  opt = imp_optim_defaults();
  opt.lr = 0.1;
  minimize(imp_optim_adam, opt, 3000, 1e-8);
  opt.weight_decay = 1e-4;
  opt.decoupled_decay = 1;
  minimize(imp_optim_adam, opt, 3000, 1e-6); /* the decay's pull on p */

  opt = imp_optim_defaults();
  opt.lr = 0.02;
  minimize(imp_optim_rmsprop, opt, 3000, 1e-8);
  opt.momentum = 0.5;
  minimize(imp_optim_rmsprop, opt, 3000, 1e-8);
}
END_TEST

START_TEST(optim_bad_input)
{
  imp_optim_options opt = imp_optim_defaults();
  imp_optim *o;
  double p[3] = {1, 2, 3}, g[3] = {0.1, NAN, 0.3}, before[3];

  ck_assert_int_eq(imp_optim_create(imp_optim_adam, 3, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_optim_create(NULL, 3, NULL, &o), IMP_EINVAL);
  ck_assert_ptr_null(o);
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, 0, NULL, &o), IMP_EINVAL);
  opt.beta1 = 1.0;
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, 3, &opt, &o), IMP_EINVAL);
  opt = imp_optim_defaults();
  opt.nesterov = 1;
  ck_assert_int_eq(imp_optim_create(imp_optim_sgd, 3, &opt, &o), IMP_EINVAL);
  opt.nesterov = 0;
  opt.lr = -1.0;
  ck_assert_int_eq(imp_optim_create(imp_optim_sgd, 3, &opt, &o), IMP_EINVAL);
  opt.lr = NAN;
  ck_assert_int_eq(imp_optim_create(imp_optim_rmsprop, 3, &opt, &o),
                   IMP_EINVAL);
  opt = imp_optim_defaults();
  opt.eps = 0.0;
  ck_assert_int_eq(imp_optim_create(imp_optim_rmsprop, 3, &opt, &o),
                   IMP_EINVAL);

  /* A NaN gradient changes nothing, the step count included. */
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, 3, NULL, &o), IMP_OK);
  memcpy(before, p, sizeof p);
  ck_assert_int_eq(imp_optim_step(o, p, g, 3), IMP_ENONFINITE);
  ck_assert_mem_eq(p, before, sizeof p);
  ck_assert_uint_eq(imp_optim_steps(o), 0);
  g[1] = 0.2;
  ck_assert_int_eq(imp_optim_step(o, p, g, 2), IMP_ESHAPE);
  ck_assert_int_eq(imp_optim_step(o, NULL, g, 3), IMP_EINVAL);
  ck_assert_int_eq(imp_optim_set_lr(o, INFINITY), IMP_EINVAL);
  ck_assert_int_eq(imp_optim_step(o, p, g, 3), IMP_OK);
  ck_assert_uint_eq(imp_optim_steps(o), 1);
  ck_assert(imp_optim_state(o)[0] != 0.0);
  ck_assert_int_eq(imp_optim_reset(o), IMP_OK);
  ck_assert_uint_eq(imp_optim_steps(o), 0);
  ck_assert(imp_optim_state(o)[0] == 0.0);
  ck_assert_uint_eq(imp_optim_state_size(o), 6);
  ck_assert_str_eq(imp_optim_name(o), "adam");
  imp_optim_free(o);
  imp_optim_free(NULL);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Clipping and schedules. */

START_TEST(clip_by_global_norm)
{
  double g[2] = {3.0, 4.0}, norm = 0.0, big[2] = {3e200, 4e200};
  double bad[2] = {1.0, INFINITY};

  ck_assert_int_eq(imp_clip_grad_norm(g, 2, 10.0, &norm), IMP_OK);
  ck_assert(norm == 5.0 && g[0] == 3.0 && g[1] == 4.0);
  ck_assert_int_eq(imp_clip_grad_norm(g, 2, 1.0, &norm), IMP_OK);
  ck_assert_double_eq_tol(norm, 5.0, 1e-15);
  ck_assert_double_eq_tol(g[0], 0.6, 1e-15);
  ck_assert_double_eq_tol(g[1], 0.8, 1e-15);
  ck_assert_double_eq_tol(sqrt(g[0] * g[0] + g[1] * g[1]), 1.0, 1e-15);

  /* No overflow for huge entries. */
  ck_assert_int_eq(imp_clip_grad_norm(big, 2, 1.0, &norm), IMP_OK);
  ck_assert_double_eq_tol(norm / 5e200, 1.0, 1e-14);
  ck_assert_double_eq_tol(big[1], 0.8, 1e-14);

  /* Bad input. */
  ck_assert_int_eq(imp_clip_grad_norm(bad, 2, 1.0, &norm), IMP_ENONFINITE);
  ck_assert(bad[0] == 1.0);
  ck_assert_int_eq(imp_clip_grad_norm(g, 2, 0.0, &norm), IMP_EINVAL);
  ck_assert_int_eq(imp_clip_grad_norm(NULL, 2, 1.0, &norm), IMP_EINVAL);
  ck_assert_int_eq(imp_clip_grad_norm(NULL, 0, 1.0, &norm), IMP_OK);
  ck_assert(norm == 0.0);
}
END_TEST

static double lr_at(const imp_schedule *s, uint64_t t)
{
  double lr = -1.0;

  ck_assert_int_eq(imp_schedule_lr(s, t, &lr), IMP_OK);
  return lr;
}

START_TEST(schedules_follow_formulas)
{
  const double pi = 3.14159265358979323846;
  imp_schedule constant = {.kind = IMP_SCHEDULE_CONSTANT, .lr = 0.3};
  imp_schedule step = {
      .kind = IMP_SCHEDULE_STEP, .lr = 0.1, .gamma = 0.5, .step_size = 3};
  imp_schedule cosine = {
      .kind = IMP_SCHEDULE_COSINE, .lr = 1.0, .lr_min = 0.1, .total = 10};
  imp_schedule cycle = {.kind = IMP_SCHEDULE_ONE_CYCLE,
                        .lr = 0.1,
                        .lr_start = 0.01,
                        .lr_min = 0.001,
                        .warmup = 4,
                        .total = 12};
  double prev;

  ck_assert(lr_at(&constant, 12345) == 0.3);

  /* Step decay: 0.1 for t = 0..2, 0.05 for 3..5, 0.025 at 6. */
  ck_assert(lr_at(&step, 0) == 0.1 && lr_at(&step, 2) == 0.1);
  ck_assert(lr_at(&step, 3) == 0.05 && lr_at(&step, 5) == 0.05);
  ck_assert(lr_at(&step, 6) == 0.025);

  /* Cosine: 1 at 0, the mean 0.55 half way, 0.1 at and after T. */
  ck_assert_double_eq_tol(lr_at(&cosine, 0), 1.0, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cosine, 5), 0.55, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cosine, 3),
                          0.1 + 0.9 * 0.5 * (1.0 + cos(pi * 0.3)), 1e-15);
  ck_assert(lr_at(&cosine, 10) == 0.1 && lr_at(&cosine, 1000) == 0.1);

  /* One-cycle: linear warm-up 0.01 -> 0.1 over 4 steps, then a cosine
   * from 0.1 to 0.001 over 8. */
  ck_assert_double_eq_tol(lr_at(&cycle, 0), 0.01, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cycle, 2), 0.055, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cycle, 4), 0.1, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cycle, 8), 0.0505, 1e-15);
  ck_assert_double_eq_tol(lr_at(&cycle, 6),
                          0.001 + 0.099 * 0.5 * (1.0 + cos(pi * 0.25)), 1e-15);
  ck_assert(lr_at(&cycle, 12) == 0.001);
  prev = 0.0;
  for (uint64_t t = 0; t <= 4; t++) {
    ck_assert(lr_at(&cycle, t) > prev);
    prev = lr_at(&cycle, t);
  }
  for (uint64_t t = 5; t <= 12; t++) {
    ck_assert(lr_at(&cycle, t) < prev);
    prev = lr_at(&cycle, t);
  }

  /* Fields out of range. */
  {
    imp_schedule s = cosine;
    double lr;

    s.total = 0;
    ck_assert_int_eq(imp_schedule_lr(&s, 0, &lr), IMP_EINVAL);
    s = cycle;
    s.warmup = 12;
    ck_assert_int_eq(imp_schedule_lr(&s, 0, &lr), IMP_EINVAL);
    s = step;
    s.step_size = 0;
    ck_assert_int_eq(imp_schedule_lr(&s, 0, &lr), IMP_EINVAL);
    s = constant;
    s.lr = NAN;
    ck_assert_int_eq(imp_schedule_lr(&s, 0, &lr), IMP_EINVAL);
    s.kind = (imp_schedule_kind)42;
    s.lr = 1.0;
    ck_assert_int_eq(imp_schedule_lr(&s, 0, &lr), IMP_EINVAL);
    ck_assert_int_eq(imp_schedule_lr(NULL, 0, &lr), IMP_EINVAL);
  }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Checkpoints. */

static char tmp_dir[64];

static void make_tmp_dir(void)
{
  strcpy(tmp_dir, "/tmp/imp_train_XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(tmp_dir));
}

static void remove_tmp_dir(void)
{
  DIR *d = opendir(tmp_dir);
  struct dirent *e;
  char path[512];

  if (d == NULL)
    return;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    snprintf(path, sizeof path, "%s/%s", tmp_dir, e->d_name);
    unlink(path);
  }
  closedir(d);
  rmdir(tmp_dir);
}

/* The number of entries in the test directory. */
static int dir_entries(void)
{
  DIR *d = opendir(tmp_dir);
  struct dirent *e;
  int n = 0;

  ck_assert_ptr_nonnull(d);
  while ((e = readdir(d)) != NULL)
    n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
  closedir(d);
  return n;
}

static unsigned char *slurp(const char *path, size_t *len)
{
  FILE *f = fopen(path, "rb");
  unsigned char *b;
  long n;

  ck_assert_ptr_nonnull(f);
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  b = malloc((size_t)n + 1);
  ck_assert_ptr_nonnull(b);
  ck_assert_uint_eq(fread(b, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  *len = (size_t)n;
  return b;
}

static void spit(const char *path, const unsigned char *b, size_t len)
{
  FILE *f = fopen(path, "wb");

  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(b, 1, len, f), len);
  fclose(f);
}

/* A trained state: the mixed stack after a few Adam steps on an MSE
 * loss, with the progress of that run. */
typedef struct run {
  imp_stack *stack;
  imp_optim *optim;
  imp_progress progress;
} run;

/* One training step on a batch drawn from the run's generator. */
static void train_step(run *r)
{
  imp_shape in = {4, 3, 1, 1};
  double x[12], target[8], y[8], grad[8], loss;

  imp_rng_fill_normal(&r->progress.rng, x, 12, 0.0, 1.0);
  for (int b = 0; b < 4; b++) {
    target[2 * b] = sin(x[3 * b]) + x[3 * b + 1];
    target[2 * b + 1] = x[3 * b + 2] * x[3 * b];
  }
  ck_assert_int_eq(imp_stack_forward(r->stack, &in, x, y), IMP_OK);
  ck_assert_int_eq(
      imp_loss_mse(&(imp_shape){4, 2, 1, 1}, y, target, &loss, grad), IMP_OK);
  imp_stack_zero_grad(r->stack);
  ck_assert_int_eq(imp_stack_backward(r->stack, NULL, grad), IMP_OK);
  ck_assert_int_eq(imp_clip_grad_norm(imp_stack_grads(r->stack),
                                      imp_stack_nparams(r->stack), 5.0, NULL),
                   IMP_OK);
  ck_assert_int_eq(imp_optim_step(r->optim, imp_stack_params(r->stack),
                                  imp_stack_grads(r->stack),
                                  imp_stack_nparams(r->stack)),
                   IMP_OK);
  r->progress.step++;
}

static run make_run(uint64_t seed, int steps)
{
  run r;
  imp_optim_options opt = imp_optim_defaults();

  opt.lr = 0.01;
  r.stack = mixed_stack(seed);
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, imp_stack_nparams(r.stack),
                                    &opt, &r.optim),
                   IMP_OK);
  r.progress.step = 0;
  imp_rng_seed(&r.progress.rng, seed + 100);
  for (int i = 0; i < steps; i++)
    train_step(&r);
  return r;
}

static void free_run(run *r)
{
  imp_stack_free(r->stack);
  imp_optim_free(r->optim);
}

/* A copy of everything a load could change. */
typedef struct snapshot {
  double *params, *state;
  size_t np, ns;
  uint64_t t;
  double lr;
  imp_progress progress;
} snapshot;

static snapshot take_snapshot(run *r)
{
  snapshot s;

  s.np = imp_stack_nparams(r->stack);
  s.ns = imp_optim_state_size(r->optim);
  s.params = malloc(s.np * sizeof(double));
  s.state = malloc(s.ns * sizeof(double));
  ck_assert_ptr_nonnull(s.params);
  ck_assert_ptr_nonnull(s.state);
  memcpy(s.params, imp_stack_params(r->stack), s.np * sizeof(double));
  memcpy(s.state, imp_optim_state(r->optim), s.ns * sizeof(double));
  s.t = imp_optim_steps(r->optim);
  s.lr = imp_optim_lr(r->optim);
  s.progress = r->progress;
  return s;
}

static void assert_same(run *r, const snapshot *s)
{
  ck_assert_mem_eq(imp_stack_params(r->stack), s->params,
                   s->np * sizeof(double));
  ck_assert_mem_eq(imp_optim_state(r->optim), s->state, s->ns * sizeof(double));
  ck_assert_uint_eq(imp_optim_steps(r->optim), s->t);
  ck_assert(imp_optim_lr(r->optim) == s->lr);
  ck_assert_mem_eq(&r->progress, &s->progress, sizeof s->progress);
}

static void free_snapshot(snapshot *s)
{
  free(s->params);
  free(s->state);
}

static uint32_t le32(const unsigned char *b)
{
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
         (uint32_t)b[3] << 24;
}

static uint64_t le64(const unsigned char *b)
{
  return (uint64_t)le32(b) | (uint64_t)le32(b + 4) << 32;
}

START_TEST(checkpoint_round_trip)
{
  run a = make_run(11, 5), b = make_run(12, 2);
  snapshot sa = take_snapshot(&a);
  char path[128], path2[128];
  unsigned char *f1, *f2;
  size_t n1, n2;

  make_tmp_dir();
  snprintf(path, sizeof path, "%s/model.ckpt", tmp_dir);
  snprintf(path2, sizeof path2, "%s/again.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(path, a.stack, a.optim, &a.progress),
                   IMP_OK);
  ck_assert_int_eq(dir_entries(), 1); /* no temporary file left */

  /* Load into a run with other values: everything comes back bit for
   * bit, and saving it again gives the same bytes. */
  ck_assert_int_eq(imp_checkpoint_load(path, b.stack, b.optim, &b.progress),
                   IMP_OK);
  assert_same(&b, &sa);
  ck_assert_int_eq(imp_checkpoint_save(path2, b.stack, b.optim, &b.progress),
                   IMP_OK);
  f1 = slurp(path, &n1);
  f2 = slurp(path2, &n2);
  ck_assert_uint_eq(n1, n2);
  ck_assert_mem_eq(f1, f2, n1);

  /* Saving over an existing checkpoint replaces it. */
  train_step(&b);
  ck_assert_int_eq(imp_checkpoint_save(path, b.stack, b.optim, &b.progress),
                   IMP_OK);
  free(f1);
  f1 = slurp(path, &n1);
  ck_assert(memcmp(f1, f2, n1) != 0);
  ck_assert_int_eq(dir_entries(), 2);

  /* Parameters alone, without optimizer or progress. */
  ck_assert_int_eq(imp_checkpoint_save(path2, a.stack, NULL, NULL), IMP_OK);
  ck_assert_int_eq(imp_checkpoint_load(path2, b.stack, NULL, NULL), IMP_OK);
  ck_assert_mem_eq(imp_stack_params(b.stack), sa.params,
                   sa.np * sizeof(double));

  free(f1);
  free(f2);
  free_snapshot(&sa);
  free_run(&a);
  free_run(&b);
  remove_tmp_dir();
}
END_TEST

/* Training 6 steps straight equals 3 steps, a save, a load into a fresh
 * run, and 3 more steps, bit for bit. */
START_TEST(checkpoint_resume_is_exact)
{
  run straight = make_run(21, 6), first = make_run(21, 3);
  run resumed = make_run(99, 0);
  char path[128];

  make_tmp_dir();
  snprintf(path, sizeof path, "%s/resume.ckpt", tmp_dir);
  ck_assert_int_eq(
      imp_checkpoint_save(path, first.stack, first.optim, &first.progress),
      IMP_OK);
  ck_assert_int_eq(imp_checkpoint_load(path, resumed.stack, resumed.optim,
                                       &resumed.progress),
                   IMP_OK);
  for (int i = 0; i < 3; i++)
    train_step(&resumed);
  ck_assert_mem_eq(imp_stack_params(resumed.stack),
                   imp_stack_params(straight.stack),
                   imp_stack_nparams(straight.stack) * sizeof(double));
  ck_assert_mem_eq(imp_optim_state(resumed.optim),
                   imp_optim_state(straight.optim),
                   imp_optim_state_size(straight.optim) * sizeof(double));
  ck_assert_uint_eq(resumed.progress.step, 6);
  ck_assert_mem_eq(&resumed.progress, &straight.progress,
                   sizeof straight.progress);

  free_run(&straight);
  free_run(&first);
  free_run(&resumed);
  remove_tmp_dir();
}
END_TEST

/* The bytes on disk follow the layout documented in imp/checkpoint.h. */
START_TEST(checkpoint_layout_as_documented)
{
  run a = make_run(31, 1);
  char path[128];
  unsigned char *f;
  size_t n, pos = 32, total = 0;
  uint32_t crc;
  double p0;
  static const unsigned char magic[8] = {0x89, 0x49, 0x4d, 0x50,
                                         0x43, 0x4b, 0x50, 0x54};

  /* The checksum is the standard CRC-32. */
  ck_assert_int_eq(imp_crc32("123456789", 9, &crc), IMP_OK);
  ck_assert_uint_eq(crc, 0xcbf43926u);
  ck_assert_int_eq(imp_crc32(NULL, 0, &crc), IMP_OK);
  ck_assert_uint_eq(crc, 0);

  make_tmp_dir();
  snprintf(path, sizeof path, "%s/layout.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(path, a.stack, a.optim, &a.progress),
                   IMP_OK);
  f = slurp(path, &n);
  ck_assert_mem_eq(f, magic, 8);
  ck_assert_uint_eq(le32(f + 8), 1);
  ck_assert_uint_eq(le32(f + 12), 3);
  ck_assert_uint_eq(le64(f + 16), n);
  ck_assert_uint_eq(le64(f + 24), 7); /* 5 layers, 2 inside the nested one */

  /* Walk the records: depth, kind, name, count. */
  for (int r = 0; r < 7; r++) {
    uint32_t depth = le32(f + pos);

    ck_assert_uint_eq(depth, r >= 4 && r <= 5 ? 1 : 0);
    pos += 4;
    pos += 4 + le32(f + pos);
    pos += 4 + le32(f + pos);
    if (depth == 0)
      total += le64(f + pos);
    pos += 8;
  }
  ck_assert_uint_eq(le64(f + pos), imp_stack_nparams(a.stack));
  ck_assert_uint_eq(total, imp_stack_nparams(a.stack));
  pos += 8;
  {
    uint64_t bits = le64(f + pos);

    memcpy(&p0, &bits, sizeof p0);
  }
  ck_assert(p0 == imp_stack_params(a.stack)[0]);
  pos += 8 * imp_stack_nparams(a.stack);

  /* Optimizer: "adam", n, t, lr, S, state; then progress; then CRC. */
  ck_assert_uint_eq(le32(f + pos), 4);
  ck_assert(memcmp(f + pos + 4, "adam", 4) == 0);
  pos += 8;
  ck_assert_uint_eq(le64(f + pos), imp_stack_nparams(a.stack));
  ck_assert_uint_eq(le64(f + pos + 8), 1);
  ck_assert_uint_eq(le64(f + pos + 24), 2 * imp_stack_nparams(a.stack));
  pos += 32 + 8 * 2 * imp_stack_nparams(a.stack);
  ck_assert_uint_eq(le64(f + pos), 1);
  ck_assert_uint_eq(le64(f + pos + 8), a.progress.rng.s[0]);
  pos += 40;
  ck_assert_uint_eq(pos + 4, n);
  ck_assert_int_eq(imp_crc32(f, n - 4, &crc), IMP_OK);
  ck_assert_uint_eq(le32(f + n - 4), crc);

  free(f);
  free_run(&a);
  remove_tmp_dir();
}
END_TEST

/* Load damaged contents, written to a new file beside path, into r; it
 * must fail with IMP_EFORMAT and change nothing.  (A new file each time:
 * rewriting one file in place makes ext4 flush it on every close.) */
static void assert_refused(const char *path, const unsigned char *b, size_t len,
                           run *r, const snapshot *s, const char *why)
{
  static unsigned serial;
  char name[160];
  int rc;

  snprintf(name, sizeof name, "%s.%u", path, serial++);
  spit(name, b, len);
  rc = imp_checkpoint_load(name, r->stack, r->optim, &r->progress);
  unlink(name);
  ck_assert_msg(rc == IMP_EFORMAT, "%s: status %d (%s)", why, rc,
                imp_last_error());
  assert_same(r, s);
}

START_TEST(checkpoint_damage_is_detected)
{
  run a = make_run(41, 3), b = make_run(42, 1);
  snapshot sb = take_snapshot(&b);
  char good[128], bad[128];
  unsigned char *f, *copy;
  size_t n;
  uint32_t crc;

  make_tmp_dir();
  snprintf(good, sizeof good, "%s/good.ckpt", tmp_dir);
  snprintf(bad, sizeof bad, "%s/bad.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(good, a.stack, a.optim, &a.progress),
                   IMP_OK);
  f = slurp(good, &n);
  copy = malloc(n + 1);
  ck_assert_ptr_nonnull(copy);

  /* Truncated at every length. */
  for (size_t len = 0; len < n; len++)
    assert_refused(bad, f, len, &b, &sb, "truncated");
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "truncated"));

  /* One byte flipped at every position, two ways. */
  for (size_t i = 0; i < n; i++)
    for (int k = 0; k < 2; k++) {
      memcpy(copy, f, n);
      copy[i] ^= k == 0 ? 0x01 : 0xff;
      assert_refused(bad, copy, n, &b, &sb, "flipped");
    }
  memcpy(copy, f, n);
  copy[n / 2] ^= 0x10;
  assert_refused(bad, copy, n, &b, &sb, "flipped");
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "checksum"));

  /* A trailing byte. */
  memcpy(copy, f, n);
  copy[n] = 0;
  assert_refused(bad, copy, n + 1, &b, &sb, "trailing");

  /* Wrong magic. */
  memcpy(copy, f, n);
  memcpy(copy, "PK\x03\x04", 4);
  assert_refused(bad, copy, n, &b, &sb, "magic");
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "magic"));

  /* Another version, with a valid checksum. */
  memcpy(copy, f, n);
  copy[8] = 2;
  imp_crc32(copy, n - 4, &crc);
  for (int i = 0; i < 4; i++)
    copy[n - 4 + i] = (unsigned char)(crc >> (8 * i));
  assert_refused(bad, copy, n, &b, &sb, "version");
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "version 2"));

  /* Unknown flags, with a valid checksum. */
  memcpy(copy, f, n);
  copy[12] |= 0x80;
  imp_crc32(copy, n - 4, &crc);
  for (int i = 0; i < 4; i++)
    copy[n - 4 + i] = (unsigned char)(crc >> (8 * i));
  assert_refused(bad, copy, n, &b, &sb, "flags");

  /* A missing file is an I/O error, and changes nothing either. */
  ck_assert_int_eq(imp_checkpoint_load("/nonexistent/dir/x.ckpt", b.stack,
                                       b.optim, &b.progress),
                   IMP_EIO);
  ck_assert_int_eq(imp_checkpoint_load(tmp_dir, b.stack, NULL, NULL), IMP_EIO);
  assert_same(&b, &sb);

  /* The undamaged file still loads. */
  ck_assert_int_eq(imp_checkpoint_load(good, b.stack, b.optim, &b.progress),
                   IMP_OK);

  free(f);
  free(copy);
  free_snapshot(&sb);
  free_run(&a);
  free_run(&b);
  remove_tmp_dir();
}
END_TEST

START_TEST(checkpoint_mismatch_is_detected)
{
  run a = make_run(51, 2);
  imp_stack *other, *renamed, *shorter;
  imp_optim *sgd, *small;
  imp_rng rng;
  char path[128], noopt[128];
  double *before;

  make_tmp_dir();
  snprintf(path, sizeof path, "%s/a.ckpt", tmp_dir);
  snprintf(noopt, sizeof noopt, "%s/noopt.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(path, a.stack, a.optim, &a.progress),
                   IMP_OK);
  ck_assert_int_eq(imp_checkpoint_save(noopt, a.stack, NULL, NULL), IMP_OK);

  /* A wider first layer: 3 -> 6 instead of 3 -> 5. */
  imp_rng_seed(&rng, 1);
  ck_assert_int_eq(imp_stack_create("mixed", &other), IMP_OK);
  add(other, dense(3, 6, &rng, "d1"));
  before = malloc(imp_stack_nparams(other) * sizeof(double));
  ck_assert_ptr_nonnull(before);
  memcpy(before, imp_stack_params(other),
         imp_stack_nparams(other) * sizeof(double));
  ck_assert_int_eq(imp_checkpoint_load(path, other, NULL, NULL), IMP_EFORMAT);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "architecture"));
  ck_assert_mem_eq(imp_stack_params(other), before,
                   imp_stack_nparams(other) * sizeof(double));

  /* The same shapes and counts, but the last layer named differently. */
  renamed = mixed_stack_named(51, "head");
  ck_assert_uint_eq(imp_stack_nparams(renamed), imp_stack_nparams(a.stack));
  ck_assert_int_eq(imp_checkpoint_load(path, renamed, NULL, NULL), IMP_EFORMAT);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "\"head\""));

  /* Fewer layers. */
  ck_assert_int_eq(imp_stack_create("mixed", &shorter), IMP_OK);
  add(shorter, dense(3, 5, &rng, "d1"));
  ck_assert_int_eq(imp_checkpoint_load(path, shorter, NULL, NULL), IMP_EFORMAT);

  /* Another optimizer kind or size; no optimizer or progress saved. */
  ck_assert_int_eq(
      imp_optim_create(imp_optim_sgd, imp_stack_nparams(a.stack), NULL, &sgd),
      IMP_OK);
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, 3, NULL, &small), IMP_OK);
  memcpy(before, imp_stack_params(a.stack), 10 * sizeof(double));
  ck_assert_int_eq(imp_checkpoint_load(path, a.stack, sgd, NULL), IMP_EFORMAT);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "optimizer mismatch"));
  ck_assert_int_eq(imp_checkpoint_load(path, a.stack, small, NULL),
                   IMP_EFORMAT);
  ck_assert_int_eq(imp_checkpoint_load(noopt, a.stack, a.optim, NULL),
                   IMP_EFORMAT);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "no optimizer"));
  ck_assert_int_eq(imp_checkpoint_load(noopt, a.stack, NULL, &a.progress),
                   IMP_EFORMAT);
  ck_assert_int_eq(imp_checkpoint_load(noopt, a.stack, NULL, NULL), IMP_OK);

  free(before);
  imp_stack_free(other);
  imp_stack_free(renamed);
  imp_stack_free(shorter);
  imp_optim_free(sgd);
  imp_optim_free(small);
  free_run(&a);
  remove_tmp_dir();
}
END_TEST

START_TEST(checkpoint_failed_save_keeps_old_file)
{
  run a = make_run(61, 2), b = make_run(62, 4);
  char path[128], missing[160];
  unsigned char *before, *after;
  size_t n0, n1;
  struct rlimit saved, small;

  make_tmp_dir();
  snprintf(path, sizeof path, "%s/keep.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(path, a.stack, a.optim, &a.progress),
                   IMP_OK);
  before = slurp(path, &n0);

  /* A path in a directory that does not exist. */
  snprintf(missing, sizeof missing, "%s/no/such/dir/x.ckpt", tmp_dir);
  ck_assert_int_eq(imp_checkpoint_save(missing, b.stack, NULL, NULL), IMP_EIO);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "temporary"));

  /* A write that fails half way, as a full disk or a crash would leave
   * it: the file size limit makes write() fail with EFBIG. */
  ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, SIG_IGN);
  small = saved;
  small.rlim_cur = (rlim_t)(n0 / 2);
  ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
  ck_assert_int_eq(imp_checkpoint_save(path, b.stack, b.optim, &b.progress),
                   IMP_EIO);
  ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, SIG_DFL);
  ck_assert_ptr_nonnull(strstr(imp_last_error(), "cannot write"));
  after = slurp(path, &n1);
  ck_assert_uint_eq(n0, n1);
  ck_assert_mem_eq(before, after, n0);
  ck_assert_int_eq(dir_entries(), 1); /* the temporary file is gone */
  free(after);

  /* A directory that is not writable (root writes anyway, so only as
   * another user). */
  if (geteuid() != 0) {
    ck_assert_int_eq(chmod(tmp_dir, 0500), 0);
    ck_assert_int_eq(imp_checkpoint_save(path, b.stack, NULL, NULL), IMP_EIO);
    ck_assert_int_eq(chmod(tmp_dir, 0700), 0);
    after = slurp(path, &n1);
    ck_assert_mem_eq(before, after, n0);
    free(after);
  }

  /* Non-finite parameters are refused before anything is written. */
  imp_stack_params(b.stack)[0] = NAN;
  ck_assert_int_eq(imp_checkpoint_save(path, b.stack, NULL, NULL),
                   IMP_ENONFINITE);
  after = slurp(path, &n1);
  ck_assert_mem_eq(before, after, n0);
  ck_assert_int_eq(dir_entries(), 1);

  /* The old checkpoint is whole and loads. */
  ck_assert_int_eq(imp_checkpoint_load(path, a.stack, a.optim, &a.progress),
                   IMP_OK);
  ck_assert_int_eq(imp_checkpoint_save(NULL, a.stack, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_checkpoint_load(path, NULL, NULL, NULL), IMP_EINVAL);

  free(after);
  free(before);
  free_run(&a);
  free_run(&b);
  remove_tmp_dir();
}
END_TEST

static Suite *train_suite(void)
{
  Suite *s = suite_create("train");
  TCase *stack = tcase_create("stack");
  TCase *optim = tcase_create("optim");
  TCase *ckpt = tcase_create("checkpoint");

  tcase_add_test(stack, stack_flat_view);
  tcase_add_test(stack, stack_add_preserves_values);
  tcase_add_test(stack, stack_nests_deeply);
  tcase_add_test(stack, stack_gradient_matches_fd);
  tcase_add_test(stack, stack_view_matches_stack);
  tcase_add_test(stack, stack_buffers_grow);
  tcase_add_test(stack, stack_empty_is_identity);
  tcase_add_test(stack, stack_training_mode_propagates);
  tcase_add_test(stack, stack_bad_input);
  suite_add_tcase(s, stack);

  tcase_add_test(optim, optim_sgd_reference);
  tcase_add_test(optim, optim_adam_reference);
  tcase_add_test(optim, optim_rmsprop_reference);
  tcase_add_test(optim, optim_minimize_quadratic);
  tcase_add_test(optim, optim_bad_input);
  tcase_add_test(optim, clip_by_global_norm);
  tcase_add_test(optim, schedules_follow_formulas);
  suite_add_tcase(s, optim);

  tcase_add_test(ckpt, checkpoint_round_trip);
  tcase_add_test(ckpt, checkpoint_resume_is_exact);
  tcase_add_test(ckpt, checkpoint_layout_as_documented);
  tcase_add_test(ckpt, checkpoint_damage_is_detected);
  tcase_add_test(ckpt, checkpoint_mismatch_is_detected);
  tcase_add_test(ckpt, checkpoint_failed_save_keeps_old_file);
  suite_add_tcase(s, ckpt);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(train_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

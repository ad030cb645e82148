/*
 * test_blocks.c - dense, 3x3 convolution, activations, add, losses and
 * spectral normalization.
 *
 * Every gradient is compared with finite differences (imp_gradcheck) on
 * odd sizes: batch 3, 5 channels, 7 x 9 images, dense 5 -> 7.  Forward
 * values are compared with direct loops, and spectral norms with LAPACK's
 * SVD of the operator assembled column by column.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "imp.h"
#include "imp/blocks.h"
#include "imp/loss.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static double *alloc_normal(imp_rng *rng, size_t n, double stddev)
{
  double *a = imp__dalloc(n);

  ck_assert_ptr_nonnull(a);
  imp_rng_fill_normal(rng, a, n, 0.0, stddev);
  return a;
}

/* Uniform magnitudes in [lo, hi) with random signs: keeps entries away
 * from 0, where relu and elu have their kinks. */
static double *alloc_away_from_zero(imp_rng *rng, size_t n, double lo,
                                    double hi)
{
  double *a = imp__dalloc(n);

  ck_assert_ptr_nonnull(a);
  for (size_t i = 0; i < n; i++) {
    double m = lo + (hi - lo) * imp_rng_uniform(rng);

    a[i] = imp_rng_uniform(rng) < 0.5 ? -m : m;
  }
  return a;
}

static double max_abs_diff(const double *a, const double *b, size_t n)
{
  double d = 0.0;

  for (size_t i = 0; i < n; i++)
    d = fmax(d, fabs(a[i] - b[i]));
  return d;
}

/* The largest singular value of an m x n column-major matrix (LAPACK
 * dgesvd on a copy). */
static double top_singular_value(int m, int n, const double *a)
{
  int lda = m, one = 1, lwork = -1, info = 0;
  int k = m < n ? m : n;
  double query, top;
  double *copy = imp__dalloc((size_t)m * (size_t)n);
  double *s = imp__dalloc((size_t)k);
  double *work;

  ck_assert_ptr_nonnull(copy);
  ck_assert_ptr_nonnull(s);
  memcpy(copy, a, (size_t)m * (size_t)n * sizeof(double));
  dgesvd_("N", "N", &m, &n, copy, &lda, s, NULL, &one, NULL, &one, &query,
          &lwork, &info, 1, 1);
  ck_assert_int_eq(info, 0);
  lwork = (int)query;
  work = imp__dalloc((size_t)lwork);
  ck_assert_ptr_nonnull(work);
  dgesvd_("N", "N", &m, &n, copy, &lda, s, NULL, &one, NULL, &one, work, &lwork,
          &info, 1, 1);
  ck_assert_int_eq(info, 0);
  top = s[0];
  free(copy);
  free(s);
  free(work);
  return top;
}

/*
 * The matrix of the linear map x -> layer(x) - layer(0) on inputs of
 * shape (1, c, h, w), column-major (rows = outputs): the layer applied to
 * every unit vector at once, as a batch.
 */
static double *assemble_layer_operator(imp_layer *layer, size_t c, size_t h,
                                       size_t w, size_t *rows, size_t *cols)
{
  imp_shape one = {1, c, h, w}, out;
  size_t n = c * h * w, m;
  imp_shape batch = {n, c, h, w};
  double *units = imp__dalloc(n * n), *zero = imp__dalloc(n);
  double *op, *offset;

  ck_assert_int_eq(imp_layer_output_shape(layer, &one, &out), IMP_OK);
  m = imp_shape_numel(&out);
  op = imp__dalloc(n * m);
  offset = imp__dalloc(m);
  ck_assert_ptr_nonnull(units);
  ck_assert_ptr_nonnull(op);
  for (size_t j = 0; j < n; j++)
    units[j * n + j] = 1.0;

  /* Row j of the batched output is layer(e_j), that is column j. */
  ck_assert_int_eq(imp_layer_forward(layer, &batch, units, op), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(layer, &one, zero, offset), IMP_OK);
  for (size_t j = 0; j < n; j++)
    for (size_t i = 0; i < m; i++)
      op[j * m + i] -= offset[i];

  free(units);
  free(zero);
  free(offset);
  *rows = m;
  *cols = n;
  return op;
}

/* A direct 3x3 convolution with zero padding, the reference. */
static void conv_reference(const double *weight, const double *bias,
                           size_t cout, const imp_shape *in, const double *x,
                           double *y)
{
  size_t cin = in->c, h = in->h, w = in->w;

  for (size_t b = 0; b < in->n; b++)
    for (size_t o = 0; o < cout; o++)
      for (size_t i = 0; i < h; i++)
        for (size_t j = 0; j < w; j++) {
          double sum = bias != NULL ? bias[o] : 0.0;

          for (size_t c = 0; c < cin; c++)
            for (size_t di = 0; di < 3; di++)
              for (size_t dj = 0; dj < 3; dj++) {
                long ii = (long)i + (long)di - 1, jj = (long)j + (long)dj - 1;

                if (ii < 0 || jj < 0 || ii >= (long)h || jj >= (long)w)
                  continue;
                sum += weight[((o * cin + c) * 3 + di) * 3 + dj] *
                       x[((b * cin + c) * h + (size_t)ii) * w + (size_t)jj];
              }
          y[((b * cout + o) * h + i) * w + j] = sum;
        }
}

/*
 * Finite-difference checks of a layer: L = sum_i r_i y_i(x, params) with a
 * fixed random r, so that dL/dx = backward(r) and dL/dparams = the
 * accumulated gradient.  The objective reads the parameters through the
 * layer, which gradcheck perturbs in place.
 *
 * Every objective here returns L - L0, its change from the value at the
 * unperturbed point.  The quotient's weights (-1, 8, -8, 1) do not cancel
 * exactly in floating point, so a flat direction (a masked pixel, relu's
 * off side, a tap outside a one-pixel-high image) would otherwise show
 * rounding noise of ulp(8 L) / 12h, about 2e-12 at L = 60, as a huge
 * relative error against an exact 0.
 */
typedef struct layer_objective {
  imp_layer *layer;
  imp_shape in;
  const double *x; /* the input when checking the parameters */
  const double *r; /* the cotangent, size of the output */
  double *y;       /* output scratch */
  size_t ny;
  int wrt_input;
  double base; /* L at the unperturbed point */
} layer_objective;

static int layer_objective_fn(void *ctx, const double *p, double *value)
{
  layer_objective *o = ctx;
  int rc = imp_layer_forward(o->layer, &o->in, o->wrt_input ? p : o->x, o->y);

  if (rc != IMP_OK)
    return rc;
  *value = imp__dot(o->ny, o->r, o->y) - o->base;
  return 0;
}

typedef struct layer_errors {
  double input;  /* worst relative error of dL/dx */
  double params; /* worst relative error of dL/dparams (0 if none) */
} layer_errors;

static layer_errors check_layer_gradients(imp_layer *layer, const imp_shape *in,
                                          double *x, imp_rng *rng)
{
  imp_shape out;
  size_t nx = imp_shape_numel(in), ny, np = imp_layer_nparams(layer);
  double *y, *r, *xbar, *grads;
  layer_objective o;
  imp_gradcheck_result res;
  layer_errors err = {0.0, 0.0};

  ck_assert_int_eq(imp_layer_output_shape(layer, in, &out), IMP_OK);
  ny = imp_shape_numel(&out);
  y = imp__dalloc(ny);
  r = alloc_normal(rng, ny, 1.0);
  xbar = imp__dalloc(nx);
  grads = imp__dalloc(np);

  /* The analytic gradients, from one forward and one backward. */
  imp_layer_zero_grad(layer);
  ck_assert_int_eq(imp_layer_forward(layer, in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, xbar, r, in, x, y), IMP_OK);
  if (np > 0)
    memcpy(grads, imp_layer_grads(layer), np * sizeof(double));

  /* Against finite differences in x, then in the parameters. */
  o = (layer_objective){layer, *in, x, r, y, ny, 1, imp__dot(ny, r, y)};
  ck_assert_int_eq(
      imp_gradcheck(layer_objective_fn, &o, x, nx, xbar, NULL, &res), IMP_OK);
  err.input = res.max_rel_err;
  if (np > 0) {
    o.wrt_input = 0;
    ck_assert_int_eq(imp_gradcheck(layer_objective_fn, &o,
                                   imp_layer_params(layer), np, grads, NULL,
                                   &res),
                     IMP_OK);
    err.params = res.max_rel_err;
  }

  free(y);
  free(r);
  free(xbar);
  free(grads);
  return err;
}

/* ------------------------------------------------------------------ */
/* Dense                                                                */
/* ------------------------------------------------------------------ */

START_TEST(dense_forward_matches_loops)
{
  imp_rng rng;
  imp_layer *d = NULL;
  imp_shape in = {3, 5, 1, 1}, out;
  double *x, y[3 * 7], ref[3 * 7], *p;

  imp_rng_seed(&rng, 1);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  ck_assert_str_eq(imp_layer_kind(d), "dense");
  ck_assert_uint_eq(imp_layer_nparams(d), 7 * 5 + 7);
  ck_assert_int_eq(imp_layer_output_shape(d, &in, &out), IMP_OK);
  ck_assert(out.n == 3 && out.c == 7 && out.h == 1 && out.w == 1);
  p = imp_layer_params(d);
  imp_rng_fill_normal(&rng, p + 35, 7, 0.0, 1.0);
  x = alloc_normal(&rng, 15, 1.0);

  ck_assert_int_eq(imp_layer_forward(d, &in, x, y), IMP_OK);
  for (size_t b = 0; b < 3; b++)
    for (size_t o = 0; o < 7; o++) {
      ref[b * 7 + o] = p[35 + o];
      for (size_t i = 0; i < 5; i++)
        ref[b * 7 + o] += p[o * 5 + i] * x[b * 5 + i];
    }
  ck_assert_double_le(max_abs_diff(y, ref, 21), 1e-13); /* roundoff */

  /* Any input shape with 5 values per sample reads the same. */
  in = (imp_shape){3, 1, 1, 5};
  ck_assert_int_eq(imp_layer_forward(d, &in, x, y), IMP_OK);
  ck_assert_double_le(max_abs_diff(y, ref, 21), 1e-13); /* roundoff */

  /* Without a generator every parameter starts at zero. */
  imp_layer_free(d);
  ck_assert_int_eq(imp_dense_create(5, 7, NULL, "head", &d), IMP_OK);
  ck_assert_str_eq(imp_layer_name(d), "head");
  for (size_t i = 0; i < imp_layer_nparams(d); i++)
    ck_assert_double_eq(imp_layer_params(d)[i], 0.0);
  imp_layer_free(d);
  free(x);
}
END_TEST

START_TEST(dense_gradients_match_fd)
{
  imp_rng rng;
  imp_layer *d = NULL;
  imp_shape in = {3, 5, 1, 1};
  double *x;
  layer_errors err;

  imp_rng_seed(&rng, 2);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  imp_rng_fill_normal(&rng, imp_layer_params(d) + 35, 7, 0.0, 1.0);
  x = alloc_normal(&rng, 15, 1.0);

  err = check_layer_gradients(d, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-7);  /* linear: FD exact up to roundoff */
  ck_assert_double_le(err.params, 1e-7); /* likewise */

  imp_layer_free(d);
  free(x);
}
END_TEST

START_TEST(backward_accumulates)
{
  imp_rng rng;
  imp_layer *d = NULL, *c = NULL;
  imp_shape din = {3, 5, 1, 1}, cin = {3, 5, 7, 9};
  double *x = NULL, *y, *r, *xbar, *first;
  imp_layer *layers[2];
  imp_shape shapes[2] = {din, cin};
  size_t ny[2] = {3 * 7, 3 * 4 * 63};

  imp_rng_seed(&rng, 3);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  ck_assert_int_eq(imp_conv3x3_create(5, 4, &rng, NULL, &c), IMP_OK);
  layers[0] = d;
  layers[1] = c;

  /* Two backward calls give twice the gradients of one. */
  for (int k = 0; k < 2; k++) {
    size_t nx = imp_shape_numel(&shapes[k]);
    size_t np = imp_layer_nparams(layers[k]);

    x = alloc_normal(&rng, nx, 1.0);
    y = imp__dalloc(ny[k]);
    r = alloc_normal(&rng, ny[k], 1.0);
    xbar = imp__dalloc(nx);
    first = imp__dalloc(np);
    ck_assert_int_eq(imp_layer_forward(layers[k], &shapes[k], x, y), IMP_OK);
    ck_assert_int_eq(imp_layer_backward(layers[k], xbar, r, &shapes[k], x, y),
                     IMP_OK);
    memcpy(first, imp_layer_grads(layers[k]), np * sizeof(double));
    ck_assert_int_eq(imp_layer_backward(layers[k], xbar, r, &shapes[k], x, y),
                     IMP_OK);
    for (size_t i = 0; i < np; i++)
      ck_assert_double_eq_tol(imp_layer_grads(layers[k])[i], 2 * first[i],
                              1e-12 * (1 + fabs(first[i]))); /* roundoff */

    /* xbar may be NULL: only the parameter gradients are wanted. */
    ck_assert_int_eq(imp_layer_backward(layers[k], NULL, r, &shapes[k], x, y),
                     IMP_OK);
    for (size_t i = 0; i < np; i++)
      ck_assert_double_eq_tol(imp_layer_grads(layers[k])[i], 3 * first[i],
                              1e-12 * (1 + fabs(first[i]))); /* roundoff */
    free(x);
    free(y);
    free(r);
    free(xbar);
    free(first);
  }

  imp_layer_free(d);
  imp_layer_free(c);
}
END_TEST

START_TEST(layers_read_bound_storage)
{
  imp_rng rng;
  imp_layer *d = NULL;
  imp_shape in = {3, 5, 1, 1};
  double params[42], grads[42], x[15], y[21], r[21], xbar[15] = {0};

  /* Bind the layer to outside storage, then change the weights there:
   * the next forward must see them. */
  imp_rng_seed(&rng, 4);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  ck_assert_int_eq(imp_layer_bind_storage(d, params, grads), IMP_OK);
  memset(params, 0, sizeof params);
  for (size_t o = 0; o < 7; o++)
    params[35 + o] = (double)o;
  imp_rng_fill_normal(&rng, x, 15, 0.0, 1.0);
  ck_assert_int_eq(imp_layer_forward(d, &in, x, y), IMP_OK);
  for (size_t b = 0; b < 3; b++)
    for (size_t o = 0; o < 7; o++)
      ck_assert_double_eq(y[b * 7 + o], (double)o);

  /* Gradients land in the outside buffer too. */
  memset(grads, 0, sizeof grads);
  for (size_t i = 0; i < 21; i++)
    r[i] = 1.0;
  ck_assert_int_eq(imp_layer_backward(d, xbar, r, &in, x, y), IMP_OK);
  for (size_t o = 0; o < 7; o++)
    ck_assert_double_eq(grads[35 + o], 3.0);
  imp_layer_free(d);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Convolution                                                          */
/* ------------------------------------------------------------------ */

START_TEST(conv_forward_matches_loops_at_changing_sizes)
{
  imp_rng rng;
  imp_layer *c = NULL;
  const size_t sizes[][2] = {{7, 9}, {4, 11}, {1, 1}, {12, 3}, {7, 9}};
  const double *weight, *bias;

  imp_rng_seed(&rng, 5);
  ck_assert_int_eq(imp_conv3x3_create(5, 4, &rng, NULL, &c), IMP_OK);
  ck_assert_str_eq(imp_layer_kind(c), "conv3x3");
  ck_assert_uint_eq(imp_layer_nparams(c), 4 * 5 * 9 + 4);
  imp_rng_fill_normal(&rng, imp_layer_params(c) + 180, 4, 0.0, 1.0);
  weight = imp_layer_params(c);
  bias = weight + 180;

  /* The layer and the raw function against the direct loops, as the image
   * size grows, shrinks and grows again. */
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    imp_shape in = {3, 5, sizes[k][0], sizes[k][1]}, out;
    size_t ny = 3 * 4 * sizes[k][0] * sizes[k][1];
    double *x = alloc_normal(&rng, imp_shape_numel(&in), 1.0);
    double *y = imp__dalloc(ny), *ref = imp__dalloc(ny);
    imp_workspace ws = IMP_WORKSPACE_INIT;

    ck_assert_int_eq(imp_layer_output_shape(c, &in, &out), IMP_OK);
    ck_assert(out.n == 3 && out.c == 4 && out.h == in.h && out.w == in.w);
    conv_reference(weight, bias, 4, &in, x, ref);
    ck_assert_int_eq(imp_layer_forward(c, &in, x, y), IMP_OK);
    ck_assert_double_le(max_abs_diff(y, ref, ny), 1e-12); /* roundoff */
    memset(y, 0, ny * sizeof(double));
    ck_assert_int_eq(imp_conv3x3_apply(weight, bias, 1.0, 4, &in, x, y, &ws),
                     IMP_OK);
    ck_assert_double_le(max_abs_diff(y, ref, ny), 1e-12); /* roundoff */
    ck_assert_int_eq(imp_conv3x3_apply(weight, NULL, 2.0, 4, &in, x, y, NULL),
                     IMP_OK);
    for (size_t i = 0; i < ny; i++) {
      size_t o = (i / (in.h * in.w)) % 4;

      ck_assert_double_eq_tol(y[i], 2.0 * (ref[i] - bias[o]), 1e-12);
    }
    imp_workspace_free(&ws);
    free(x);
    free(y);
    free(ref);
  }
  imp_layer_free(c);
}
END_TEST

START_TEST(conv_gradients_match_fd)
{
  imp_rng rng;
  imp_layer *c = NULL;
  imp_shape in = {3, 5, 7, 9};
  double *x;
  layer_errors err;

  imp_rng_seed(&rng, 6);
  ck_assert_int_eq(imp_conv3x3_create(5, 4, &rng, NULL, &c), IMP_OK);
  imp_rng_fill_normal(&rng, imp_layer_params(c) + 180, 4, 0.0, 1.0);
  x = alloc_normal(&rng, imp_shape_numel(&in), 1.0);
  err = check_layer_gradients(c, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-7);  /* linear: FD exact up to roundoff */
  ck_assert_double_le(err.params, 1e-7); /* likewise */
  free(x);

  /* Then on another image size with the same layer, and one pixel high. */
  in = (imp_shape){3, 5, 4, 11};
  x = alloc_normal(&rng, imp_shape_numel(&in), 1.0);
  err = check_layer_gradients(c, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-7);  /* as above */
  ck_assert_double_le(err.params, 1e-7); /* as above */
  free(x);
  in = (imp_shape){2, 5, 1, 6};
  x = alloc_normal(&rng, imp_shape_numel(&in), 1.0);
  err = check_layer_gradients(c, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-7);  /* as above */
  ck_assert_double_le(err.params, 1e-7); /* as above */
  free(x);
  imp_layer_free(c);
}
END_TEST

START_TEST(conv_raw_backward_is_the_adjoint)
{
  imp_rng rng;
  imp_shape in = {2, 3, 5, 6};
  size_t nx = 2 * 3 * 30, ny = 2 * 4 * 30;
  double *weight, *x, *u, *y, *xbar, *wbar, *wbar_layer;
  imp_layer *c = NULL;

  /* <conv(x), u> = <x, conv^T(u)>: the input part of backward is the
   * adjoint of forward. */
  imp_rng_seed(&rng, 7);
  weight = alloc_normal(&rng, 108, 1.0);
  x = alloc_normal(&rng, nx, 1.0);
  u = alloc_normal(&rng, ny, 1.0);
  y = imp__dalloc(ny);
  xbar = imp__dalloc(nx);
  wbar = imp__dalloc(108);
  ck_assert_int_eq(imp_conv3x3_apply(weight, NULL, 1.0, 4, &in, x, y, NULL),
                   IMP_OK);
  ck_assert_int_eq(imp_conv3x3_apply_backward(xbar, wbar, NULL, u, weight, 1.0,
                                              4, &in, x, NULL),
                   IMP_OK);
  ck_assert_double_eq_tol(imp__dot(ny, y, u), imp__dot(nx, x, xbar),
                          1e-11); /* roundoff on sums of ~400 terms */

  /* The weight part equals the layer's parameter gradient. */
  ck_assert_int_eq(imp_conv3x3_create(3, 4, NULL, NULL, &c), IMP_OK);
  memcpy(imp_layer_params(c), weight, 108 * sizeof(double));
  ck_assert_int_eq(imp_layer_forward(c, &in, x, y), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(c, NULL, u, &in, x, y), IMP_OK);
  wbar_layer = imp_layer_grads(c);
  ck_assert_double_le(max_abs_diff(wbar, wbar_layer, 108), 1e-12);

  imp_layer_free(c);
  free(weight);
  free(x);
  free(u);
  free(y);
  free(xbar);
  free(wbar);
}
END_TEST

START_TEST(conv_bands_on_a_large_image)
{
  imp_rng rng;
  imp_shape in = {2, 16, 31, 40};
  size_t nx = imp_shape_numel(&in), ny = 2 * 12 * 31 * 40, nw = 12 * 16 * 9;
  double *weight, *dweight, *x, *u, *y, *ref, *xbar, *wbar;
  imp_workspace ws = IMP_WORKSPACE_INIT;

  /* 16 channels of 40 pixels a row fill the cache-sized band in 5 rows,
   * so 31 rows take 7 bands, the last one short. */
  imp_rng_seed(&rng, 16);
  weight = alloc_normal(&rng, nw, 0.3);
  dweight = alloc_normal(&rng, nw, 1.0);
  x = alloc_normal(&rng, nx, 1.0);
  u = alloc_normal(&rng, ny, 1.0);
  y = imp__dalloc(ny);
  ref = imp__dalloc(ny);
  xbar = imp__dalloc(nx);
  wbar = imp__dalloc(nw);

  /* Forward against the direct loops. */
  conv_reference(weight, NULL, 12, &in, x, ref);
  ck_assert_int_eq(imp_conv3x3_apply(weight, NULL, 1.0, 12, &in, x, y, &ws),
                   IMP_OK);
  ck_assert_double_le(max_abs_diff(y, ref, ny), 1e-12); /* roundoff */

  /* Backward: <conv(x; W), u> = <x, xbar> and, the convolution being
   * linear in W, <conv(x; dW), u> = <dW, wbar>. */
  ck_assert_int_eq(imp_conv3x3_apply_backward(xbar, wbar, NULL, u, weight, 1.0,
                                              12, &in, x, &ws),
                   IMP_OK);
  ck_assert_double_eq_tol(imp__dot(ny, y, u), imp__dot(nx, x, xbar),
                          1e-9); /* roundoff on sums of ~60000 terms */
  conv_reference(dweight, NULL, 12, &in, x, ref);
  ck_assert_double_eq_tol(imp__dot(ny, ref, u), imp__dot(nw, dweight, wbar),
                          1e-9); /* likewise */

  imp_workspace_free(&ws);
  free(weight);
  free(dweight);
  free(x);
  free(u);
  free(y);
  free(ref);
  free(xbar);
  free(wbar);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Activations and add                                                  */
/* ------------------------------------------------------------------ */

START_TEST(activation_gradients_match_fd)
{
  const imp_activation kinds[] = {IMP_ACT_RELU, IMP_ACT_TANH, IMP_ACT_ELU,
                                  IMP_ACT_SOFTPLUS};
  imp_rng rng;
  imp_shape in = {3, 5, 7, 9};

  imp_rng_seed(&rng, 8);
  for (size_t k = 0; k < 4; k++) {
    imp_layer *a = NULL;
    double *x = alloc_away_from_zero(&rng, imp_shape_numel(&in), 0.1, 2.5);
    layer_errors err;

    ck_assert_int_eq(imp_activation_create(kinds[k], NULL, &a), IMP_OK);
    ck_assert_str_eq(imp_layer_name(a), imp_activation_name(kinds[k]));
    ck_assert_uint_eq(imp_layer_nparams(a), 0);

    /* Inputs at least 0.1 from relu's and elu's kinks at 0, farther than
     * the differencing steps (2e-3). */
    err = check_layer_gradients(a, &in, x, &rng);
    ck_assert_msg(err.input <= 1e-7, "%s: error %g", /* smooth there */
                  imp_activation_name(kinds[k]), err.input);
    imp_layer_free(a);
    free(x);
  }
}
END_TEST

START_TEST(activation_values)
{
  const double x[] = {-800.0, -1.0, 0.0, 0.5, 800.0};
  double y[5], xbar[5], ones[5] = {1, 1, 1, 1, 1};

  /* relu, including its derivative 0 at exactly 0. */
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_RELU, 5, x, y), IMP_OK);
  ck_assert(y[0] == 0 && y[1] == 0 && y[2] == 0 && y[3] == 0.5 && y[4] == 800);
  memset(xbar, 0, sizeof xbar);
  ck_assert_int_eq(
      imp_activation_apply_backward(IMP_ACT_RELU, 5, xbar, ones, x, y), IMP_OK);
  ck_assert(xbar[2] == 0 && xbar[3] == 1 && xbar[1] == 0);

  /* elu saturates at -1 with slope e^x. */
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_ELU, 5, x, y), IMP_OK);
  ck_assert_double_eq_tol(y[0], -1.0, 1e-300);
  ck_assert_double_eq_tol(y[1], exp(-1.0) - 1.0, 1e-16);
  memset(xbar, 0, sizeof xbar);
  ck_assert_int_eq(
      imp_activation_apply_backward(IMP_ACT_ELU, 5, xbar, ones, x, y), IMP_OK);
  ck_assert_double_eq_tol(xbar[1], exp(-1.0), 1e-16);
  ck_assert_double_eq(xbar[4], 1.0);

  /* softplus neither overflows at 800 nor loses log(2) at 0. */
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_SOFTPLUS, 5, x, y), IMP_OK);
  ck_assert_double_eq(y[4], 800.0);
  ck_assert_double_eq_tol(y[2], log(2.0), 1e-16);
  ck_assert(y[0] >= 0 && y[0] < 1e-300);
  memset(xbar, 0, sizeof xbar);
  ck_assert_int_eq(
      imp_activation_apply_backward(IMP_ACT_SOFTPLUS, 5, xbar, ones, x, y),
      IMP_OK);
  ck_assert_double_eq(xbar[0], 0.0);
  ck_assert_double_eq_tol(xbar[2], 0.5, 1e-16);
  ck_assert_double_eq(xbar[4], 1.0);

  /* tanh in place. */
  memcpy(y, x, sizeof y);
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_TANH, 5, y, y), IMP_OK);
  ck_assert_double_eq_tol(y[3], tanh(0.5), 1e-16);
  ck_assert_double_eq(y[0], -1.0);
}
END_TEST

START_TEST(add_and_residual)
{
  double a[4] = {1, 2, 3, 4}, b[4] = {0.5, -2, 0, 1}, y[4];
  double abar[4] = {1, 1, 1, 1}, bbar[4] = {0}, ybar[4] = {1, 2, 3, 4};

  ck_assert_int_eq(imp_add(4, a, b, y), IMP_OK);
  ck_assert(y[0] == 1.5 && y[1] == 0 && y[2] == 3 && y[3] == 5);

  /* Both branches receive ybar, added onto what they hold. */
  ck_assert_int_eq(imp_add_backward(4, abar, bbar, ybar), IMP_OK);
  for (int i = 0; i < 4; i++) {
    ck_assert_double_eq(abar[i], 1.0 + ybar[i]);
    ck_assert_double_eq(bbar[i], ybar[i]);
  }
  ck_assert_int_eq(imp_add_backward(4, NULL, bbar, ybar), IMP_OK);
  ck_assert_double_eq(bbar[3], 8.0);

  /* In place, y aliasing a. */
  ck_assert_int_eq(imp_add(4, a, b, a), IMP_OK);
  ck_assert_double_eq(a[0], 1.5);
  b[2] = INFINITY;
  ck_assert_int_eq(imp_add(4, a, b, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_add(4, NULL, b, y), IMP_EINVAL);
  ck_assert_int_eq(imp_add_backward(4, abar, bbar, NULL), IMP_EINVAL);
}
END_TEST

/*
 * A residual block y = x + conv(relu(x)) written with the raw functions,
 * against finite differences in x: the pattern weight-tied maps use.
 */
typedef struct residual {
  const double *weight;
  imp_shape in;
  double *hidden, *branch, *y, *r;
  imp_workspace ws;
} residual;

static int residual_forward(residual *s, const double *x)
{
  size_t n = imp_shape_numel(&s->in);

  IMP__TRY(imp_activation_apply(IMP_ACT_RELU, n, x, s->hidden));
  IMP__TRY(imp_conv3x3_apply(s->weight, NULL, 1.0, s->in.c, &s->in, s->hidden,
                             s->branch, &s->ws));
  return imp_add(n, x, s->branch, s->y);
}

static int residual_objective(void *ctx, const double *x, double *value)
{
  residual *s = ctx;

  IMP__TRY(residual_forward(s, x));
  *value = imp__dot(imp_shape_numel(&s->in), s->r, s->y);
  return 0;
}

START_TEST(residual_block_gradient)
{
  imp_rng rng;
  residual s = {0};
  size_t n;
  double *x, *weight, *xbar, *hbar;
  imp_gradcheck_result res;

  imp_rng_seed(&rng, 9);
  s.in = (imp_shape){3, 5, 7, 9};
  n = imp_shape_numel(&s.in);
  weight = alloc_normal(&rng, 225, 0.3);
  s.weight = weight;
  x = alloc_away_from_zero(&rng, n, 0.1, 2.0); /* off relu's kink */
  s.r = alloc_normal(&rng, n, 1.0);
  s.hidden = imp__dalloc(n);
  s.branch = imp__dalloc(n);
  s.y = imp__dalloc(n);
  xbar = imp__dalloc(n);
  hbar = imp__dalloc(n);

  /* Backward: both add branches get r; the conv branch goes back through
   * the convolution and the relu. */
  ck_assert_int_eq(residual_forward(&s, x), IMP_OK);
  ck_assert_int_eq(imp_add_backward(n, xbar, hbar, s.r), IMP_OK);
  memset(s.branch, 0, n * sizeof(double));
  ck_assert_int_eq(imp_conv3x3_apply_backward(s.branch, NULL, NULL, hbar,
                                              weight, 1.0, 5, &s.in, NULL,
                                              &s.ws),
                   IMP_OK);
  ck_assert_int_eq(imp_activation_apply_backward(IMP_ACT_RELU, n, xbar,
                                                 s.branch, x, s.hidden),
                   IMP_OK);

  ck_assert_int_eq(
      imp_gradcheck(residual_objective, &s, x, n, xbar, NULL, &res), IMP_OK);
  ck_assert_double_le(res.max_rel_err, 1e-7); /* piecewise linear, off kinks */

  imp_workspace_free(&s.ws);
  free(x);
  free(weight);
  free(s.r);
  free(s.hidden);
  free(s.branch);
  free(s.y);
  free(xbar);
  free(hbar);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Losses                                                               */
/* ------------------------------------------------------------------ */

typedef struct loss_ctx {
  int kind; /* 0 mse, 1 mae, 2 softmax cross-entropy */
  imp_shape shape;
  const double *target;
  const int *labels;
  const double *mask;
  double base; /* the loss at the unperturbed point (see above) */
} loss_ctx;

static int loss_objective(void *ctx, const double *p, double *value)
{
  loss_ctx *l = ctx;
  int rc;

  if (l->kind == 0)
    rc = imp_loss_mse(&l->shape, p, l->target, value, NULL);
  else if (l->kind == 1)
    rc = imp_loss_mae(&l->shape, p, l->target, value, NULL);
  else
    rc = imp_loss_softmax_xent(&l->shape, p, l->labels, l->mask, value, NULL);
  *value -= l->base;
  return rc;
}

START_TEST(losses_match_fd)
{
  imp_rng rng;
  imp_shape shape = {3, 5, 7, 9};
  size_t n = imp_shape_numel(&shape), pixels = 3 * 63;
  double *pred, *target, *offset, *grad = imp__dalloc(n), *mask, loss;
  int *labels = calloc(pixels, sizeof(int));
  imp_gradcheck_result res;
  loss_ctx ctx = {0, shape, NULL, NULL, NULL, 0.0};

  imp_rng_seed(&rng, 10);
  target = alloc_normal(&rng, n, 1.0);
  offset = alloc_away_from_zero(&rng, n, 0.1, 1.0);
  pred = imp__dalloc(n);
  for (size_t i = 0; i < n; i++)
    pred[i] = target[i] + offset[i];
  ctx.target = target;

  /* Mean squared error. */
  ck_assert_int_eq(imp_loss_mse(&shape, pred, target, &loss, grad), IMP_OK);
  ck_assert_double_eq_tol(loss, imp__dot(n, offset, offset) / (double)n, 1e-14);
  ctx.base = loss;
  ck_assert_int_eq(
      imp_gradcheck(loss_objective, &ctx, pred, n, grad, NULL, &res), IMP_OK);
  ck_assert_double_le(res.max_rel_err, 1e-7); /* quadratic: exact FD */

  /* Mean absolute error, p - t at least 0.1 from its kink. */
  ctx.kind = 1;
  ck_assert_int_eq(imp_loss_mae(&shape, pred, target, &loss, grad), IMP_OK);
  ctx.base = loss;
  ck_assert_int_eq(
      imp_gradcheck(loss_objective, &ctx, pred, n, grad, NULL, &res), IMP_OK);
  ck_assert_double_le(res.max_rel_err, 1e-7); /* linear there */

  /* Cross-entropy over 5 classes per pixel, without and with a mask. */
  mask = imp__dalloc(pixels);
  for (size_t p = 0; p < pixels; p++) {
    labels[p] = (int)imp_rng_below(&rng, 5);
    mask[p] = (double)imp_rng_below(&rng, 3) / 2.0; /* 0, 0.5 or 1 */
  }
  ctx.kind = 2;
  ctx.labels = labels;
  for (int with_mask = 0; with_mask < 2; with_mask++) {
    ctx.mask = with_mask ? mask : NULL;
    ck_assert_int_eq(
        imp_loss_softmax_xent(&shape, pred, labels, ctx.mask, &loss, grad),
        IMP_OK);
    ck_assert(loss > 0);
    ctx.base = loss;
    ck_assert_int_eq(
        imp_gradcheck(loss_objective, &ctx, pred, n, grad, NULL, &res), IMP_OK);
    ck_assert_double_le(res.max_rel_err, 1e-7); /* smooth */
  }

  free(pred);
  free(target);
  free(offset);
  free(grad);
  free(mask);
  free(labels);
}
END_TEST

START_TEST(loss_values)
{
  imp_shape one = {1, 3, 1, 1}, two = {1, 3, 1, 2};
  double logits[3] = {1, 2, 3}, grad[6], loss;
  double wide[6] = {1, 1000, 2, 1000, 3, -1000}, mask[2] = {1, 0};
  int label = 2, labels[2] = {2, 2};
  double lse = log(exp(1.0) + exp(2.0) + exp(3.0));
  double p[2] = {1, -1}, t[2] = {0, 1};
  imp_shape pair = {2, 1, 1, 1};

  /* One pixel: -log softmax(z)[2]. */
  ck_assert_int_eq(
      imp_loss_softmax_xent(&one, logits, &label, NULL, &loss, grad), IMP_OK);
  ck_assert_double_eq_tol(loss, lse - 3.0, 1e-15);
  ck_assert_double_eq_tol(grad[2], exp(3.0 - lse) - 1.0, 1e-15);
  ck_assert_double_eq_tol(grad[0] + grad[1] + grad[2], 0.0, 1e-15);

  /* Two pixels, the second with logits of +-1000 masked out: the loss is
   * the first pixel's alone and nothing overflows. */
  ck_assert_int_eq(imp_loss_softmax_xent(&two, wide, labels, mask, &loss, grad),
                   IMP_OK);
  ck_assert_double_eq_tol(loss, lse - 3.0, 1e-15);
  ck_assert(grad[1] == 0 && grad[3] == 0 && grad[5] == 0);
  mask[1] = 1;
  ck_assert_int_eq(imp_loss_softmax_xent(&two, wide, labels, mask, &loss, grad),
                   IMP_OK);
  ck_assert_double_eq_tol(loss, (lse - 3.0 + 2000.0 + log(2.0)) / 2.0, 1e-12);

  /* A mask that keeps nothing. */
  mask[0] = mask[1] = 0;
  ck_assert_int_eq(imp_loss_softmax_xent(&two, wide, labels, mask, &loss, grad),
                   IMP_OK);
  ck_assert_double_eq(loss, 0.0);
  ck_assert_double_eq(grad[0], 0.0);

  /* mse and mae on two entries. */
  ck_assert_int_eq(imp_loss_mse(&pair, p, t, &loss, grad), IMP_OK);
  ck_assert_double_eq(loss, 2.5);
  ck_assert(grad[0] == 1.0 && grad[1] == -2.0);
  ck_assert_int_eq(imp_loss_mae(&pair, p, t, &loss, NULL), IMP_OK);
  ck_assert_double_eq(loss, 1.5);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad input                                                            */
/* ------------------------------------------------------------------ */

START_TEST(bad_input_is_reported)
{
  imp_rng rng;
  imp_layer *d = NULL, *c = NULL, *a = NULL, *none = NULL;
  imp_shape din = {3, 5, 1, 1}, cin = {3, 5, 7, 9}, out;
  double x[3 * 5 * 63] = {0}, y[3 * 7 * 63], loss, grad[3];
  int labels[1] = {3};
  imp_shape pixel = {1, 3, 1, 1};
  imp_spectral *s = NULL;

  imp_rng_seed(&rng, 11);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  ck_assert_int_eq(imp_conv3x3_create(5, 7, &rng, NULL, &c), IMP_OK);
  ck_assert_int_eq(imp_activation_create(IMP_ACT_TANH, NULL, &a), IMP_OK);

  /* Wrong shapes. */
  ck_assert_int_eq(imp_layer_output_shape(d, &(imp_shape){3, 6, 1, 1}, &out),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(d, &(imp_shape){3, 2, 2, 1}, x, y),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(d, &(imp_shape){0, 5, 1, 1}, x, y),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(c, &(imp_shape){3, 4, 7, 9}, x, y),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(c, &(imp_shape){3, 5, 0, 9}, x, y),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_layer_forward(a, &(imp_shape){0, 5, 7, 9}, x, y),
                   IMP_ESHAPE);
  ck_assert_int_eq(imp_conv3x3_apply(imp_layer_params(c), NULL, 1.0, 7,
                                     &(imp_shape){3, 5, 7, 0}, x, y, NULL),
                   IMP_ESHAPE);
  ck_assert_int_eq(
      imp_dense_apply(imp_layer_params(d), NULL, 1.0, 5, 0, 3, x, y),
      IMP_ESHAPE);
  ck_assert_int_eq(imp_loss_mse(&(imp_shape){0, 1, 1, 1}, x, x, &loss, NULL),
                   IMP_ESHAPE);
  ck_assert_str_ne(imp_last_error(), "");

  /* NULL arguments. */
  ck_assert_int_eq(imp_layer_forward(d, &din, NULL, y), IMP_EINVAL);
  ck_assert_int_eq(imp_dense_create(5, 7, NULL, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_dense_create(0, 7, NULL, NULL, &none), IMP_EINVAL);
  ck_assert_ptr_null(none);
  ck_assert_int_eq(imp_conv3x3_create(5, 0, NULL, NULL, &none), IMP_EINVAL);
  ck_assert_int_eq(imp_activation_create((imp_activation)42, NULL, &none),
                   IMP_EINVAL);
  ck_assert_ptr_null(none);
  ck_assert_int_eq(imp_dense_apply(NULL, NULL, 1.0, 5, 7, 3, x, y), IMP_EINVAL);
  ck_assert_int_eq(
      imp_dense_apply_backward(x, NULL, NULL, NULL, x, 1.0, 5, 7, 3, x),
      IMP_EINVAL);
  ck_assert_int_eq(imp_conv3x3_apply(NULL, NULL, 1.0, 7, &cin, x, y, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_conv3x3_apply_backward(NULL, y, NULL, y, NULL, 1.0, 7,
                                              &cin, NULL, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_RELU, 3, NULL, y), IMP_EINVAL);
  ck_assert_int_eq(imp_loss_mse(&pixel, NULL, x, &loss, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_loss_softmax_xent(&pixel, x, NULL, NULL, &loss, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_spectral_norm(NULL, x, 3, &loss), IMP_EINVAL);
  ck_assert_int_eq(imp_dense_set_lipschitz(c, 1.0, 3), IMP_EINVAL);
  ck_assert_int_eq(imp_conv3x3_set_lipschitz(NULL, 1.0, 7, 9, 3), IMP_EINVAL);
  ck_assert_int_eq(imp_block_lipschitz_scale(a, &loss, NULL), IMP_EINVAL);
  imp_workspace_free(NULL);
  imp_spectral_free(NULL);

  /* Labels out of range and negative mask weights. */
  ck_assert_int_eq(imp_loss_softmax_xent(&pixel, x, labels, NULL, &loss, grad),
                   IMP_EINVAL);
  labels[0] = 1;
  ck_assert_int_eq(
      imp_loss_softmax_xent(&pixel, x, labels, &(double){-1.0}, &loss, grad),
      IMP_EINVAL);

  /* NaN and Inf. */
  x[7] = NAN;
  ck_assert_int_eq(imp_layer_forward(d, &din, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_layer_forward(c, &cin, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_layer_forward(a, &cin, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(
      imp_conv3x3_apply(imp_layer_params(c), NULL, 1.0, 7, &cin, x, y, NULL),
      IMP_ENONFINITE);
  ck_assert_int_eq(
      imp_dense_apply(imp_layer_params(d), NULL, 1.0, 5, 7, 3, x, y),
      IMP_ENONFINITE);
  ck_assert_int_eq(imp_activation_apply(IMP_ACT_RELU, 20, x, y),
                   IMP_ENONFINITE);
  ck_assert_int_eq(imp_loss_mae(&(imp_shape){3, 5, 7, 9}, x, y, &loss, NULL),
                   IMP_ENONFINITE);
  x[7] = 0.0;
  x[1] = INFINITY;
  ck_assert_int_eq(imp_loss_softmax_xent(&pixel, x, labels, NULL, &loss, NULL),
                   IMP_ENONFINITE);
  x[1] = 0.0;
  imp_layer_params(c)[4] = NAN;
  ck_assert_int_eq(imp_layer_forward(c, &cin, x, y), IMP_ENONFINITE);
  ck_assert_int_eq(imp_spectral_create_conv3x3(5, 7, 7, 9, 1, &s), IMP_OK);
  ck_assert_int_eq(imp_spectral_norm(s, imp_layer_params(c), 3, &loss),
                   IMP_ENONFINITE);

  imp_spectral_free(s);
  imp_layer_free(a);
  imp_layer_free(c);
  imp_layer_free(d);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Spectral normalization                                               */
/* ------------------------------------------------------------------ */

/* The largest singular value of a 3x3 convolution's operator on h x w
 * images, by SVD of the assembled matrix. */
static double conv_operator_norm_svd(const double *weight, size_t cin,
                                     size_t cout, size_t h, size_t w)
{
  imp_layer *c = NULL;
  size_t rows, cols;
  double *op, top;

  ck_assert_int_eq(imp_conv3x3_create(cin, cout, NULL, NULL, &c), IMP_OK);
  memcpy(imp_layer_params(c), weight, 9 * cin * cout * sizeof(double));
  op = assemble_layer_operator(c, cin, h, w, &rows, &cols);
  top = top_singular_value((int)rows, (int)cols, op);
  free(op);
  imp_layer_free(c);
  return top;
}

/*
 * An upper bound on the operator norm for h x w images: the largest
 * singular value of the kernel's Fourier symbol over the frequencies of
 * an (h + 1) x (w + 1) torus, where the zero-padded operator is a
 * compression of the periodic one.  A complex cout x cin matrix B + iC has
 * the singular values of the real [B -C; C B], each twice.
 */
static double conv_periodic_bound(const double *weight, size_t cin, size_t cout,
                                  size_t h, size_t w)
{
  const double pi = acos(-1.0);
  size_t th = h + 1, tw = w + 1, m = 2 * cout, n = 2 * cin;
  double *sym = imp__dalloc(m * n), best = 0.0;

  for (size_t k1 = 0; k1 < th; k1++)
    for (size_t k2 = 0; k2 < tw; k2++) {
      double f1 = 2.0 * pi * (double)k1 / (double)th;
      double f2 = 2.0 * pi * (double)k2 / (double)tw;

      /* Column-major [B -C; C B] with B + iC = sum_d W_d e^{i f.(d-1)}. */
      memset(sym, 0, m * n * sizeof(double));
      for (size_t o = 0; o < cout; o++)
        for (size_t c = 0; c < cin; c++)
          for (size_t di = 0; di < 3; di++)
            for (size_t dj = 0; dj < 3; dj++) {
              double wt = weight[((o * cin + c) * 3 + di) * 3 + dj];
              double ph = f1 * ((double)di - 1) + f2 * ((double)dj - 1);
              double re = wt * cos(ph), im = wt * sin(ph);

              sym[c * m + o] += re;
              sym[(cin + c) * m + cout + o] += re;
              sym[c * m + cout + o] += im;
              sym[(cin + c) * m + o] -= im;
            }
      best = fmax(best, top_singular_value((int)m, (int)n, sym));
    }
  free(sym);
  return best;
}

START_TEST(spectral_norm_dense_matches_svd)
{
  imp_rng rng;
  imp_spectral *s = NULL;
  double *w, sigma, exact, *grad;

  imp_rng_seed(&rng, 12);
  w = alloc_normal(&rng, 7 * 5, 1.0);
  exact = top_singular_value(5, 7, w); /* W^T column-major */
  ck_assert_int_eq(imp_spectral_create_dense(7, 5, 99, &s), IMP_OK);
  ck_assert_double_eq(imp_spectral_sigma(s), 0.0);

  /* A few steps give a lower bound; more steps converge. */
  ck_assert_int_eq(imp_spectral_norm(s, w, 2, &sigma), IMP_OK);
  ck_assert_double_le(sigma, exact * (1 + 1e-14));
  ck_assert_int_eq(imp_spectral_norm(s, w, 200, &sigma), IMP_OK);
  ck_assert_double_eq_tol(sigma, exact, 1e-10 * exact); /* converged */
  ck_assert_double_eq(imp_spectral_sigma(s), sigma);

  /* d sigma / dW = u v^T has unit Frobenius norm and <u v^T, W> = sigma. */
  grad = imp__dalloc(35);
  ck_assert_int_eq(imp_spectral_sigma_backward(s, 1.0, grad), IMP_OK);
  ck_assert_double_eq_tol(imp__nrm2(35, grad), 1.0, 1e-12);
  ck_assert_double_eq_tol(imp__dot(35, grad, w), sigma, 1e-10 * sigma);

  imp_spectral_free(s);
  free(w);
  free(grad);
}
END_TEST

START_TEST(spectral_norm_conv_is_the_operator_norm)
{
  imp_rng rng;
  imp_spectral *s = NULL;
  double *w, sigma, exact, reshaped, bound, larger;

  /* A random kernel, 3 -> 4 channels, on 5 x 6 images: power iteration
   * through the convolution and its adjoint against the SVD of the
   * assembled 120 x 90 operator. */
  imp_rng_seed(&rng, 13);
  w = alloc_normal(&rng, 4 * 3 * 9, 1.0);
  exact = conv_operator_norm_svd(w, 3, 4, 5, 6);
  ck_assert_int_eq(imp_spectral_create_conv3x3(3, 4, 5, 6, 7, &s), IMP_OK);
  ck_assert_int_eq(imp_spectral_norm(s, w, 500, &sigma), IMP_OK);
  ck_assert_double_eq_tol(sigma, exact, 1e-8 * exact); /* converged */
  imp_spectral_free(s);
  free(w);

  /* Nine equal taps per channel pair (plus a little noise), 5 -> 5
   * channels on 7 x 9: the reshaped 5 x 45 weight [A A ... A] has norm
   * about 3 ||A||, the operator about 9 ||A|| cos(pi/8) cos(pi/10). */
  w = imp__dalloc(5 * 5 * 9);
  for (size_t o = 0; o < 5; o++)
    for (size_t c = 0; c < 5; c++) {
      double a = imp_rng_normal(&rng);

      for (size_t t = 0; t < 9; t++)
        w[(o * 5 + c) * 9 + t] = a + 0.05 * imp_rng_normal(&rng);
    }
  exact = conv_operator_norm_svd(w, 5, 5, 7, 9);
  reshaped = top_singular_value(45, 5, w); /* W^T column-major */
  ck_assert_int_eq(imp_spectral_create_conv3x3(5, 5, 7, 9, 7, &s), IMP_OK);
  ck_assert_int_eq(imp_spectral_norm(s, w, 300, &sigma), IMP_OK);
  ck_assert_double_eq_tol(sigma, exact, 1e-8 * exact); /* converged */
  ck_assert_msg(sigma > 2.5 * reshaped, "operator %g, reshaped %g", sigma,
                reshaped);

  /* The norm grows with the image and stays below the periodic bound. */
  larger = conv_operator_norm_svd(w, 5, 5, 10, 12);
  bound = conv_periodic_bound(w, 5, 5, 10, 12);
  ck_assert_double_le(exact, larger * (1 + 1e-12));
  ck_assert_double_le(larger, bound * (1 + 1e-12));
  ck_assert_double_le(bound, 3.0 * reshaped * (1 + 1e-12));

  imp_spectral_free(s);
  free(w);
}
END_TEST

START_TEST(lipschitz_dense_bounds_and_differentiates)
{
  imp_rng rng;
  imp_layer *d = NULL;
  imp_shape in = {3, 5, 1, 1};
  double *p, *x, y1[21], y2[21], scale, sigma, exact, applied;
  double *op;
  size_t rows, cols;
  layer_errors err;

  /* ||W|| about 9, bounded to 2. */
  imp_rng_seed(&rng, 14);
  ck_assert_int_eq(imp_dense_create(5, 7, &rng, NULL, &d), IMP_OK);
  p = imp_layer_params(d);
  imp_rng_fill_normal(&rng, p, 35, 0.0, 2.0);
  imp_rng_fill_normal(&rng, p + 35, 7, 0.0, 1.0);
  exact = top_singular_value(5, 7, p);
  ck_assert_int_eq(imp_dense_set_lipschitz(d, 2.0, 30), IMP_OK);
  x = alloc_normal(&rng, 15, 1.0);
  ck_assert_int_eq(imp_layer_forward(d, &in, x, y1), IMP_OK);
  ck_assert_int_eq(imp_block_lipschitz_scale(d, &scale, &sigma), IMP_OK);
  ck_assert_double_eq_tol(sigma, exact, 1e-10 * exact);
  ck_assert_double_eq_tol(scale, exact / 2.0, 1e-10 * exact);

  /* The map the layer applies has norm 2. */
  op = assemble_layer_operator(d, 5, 1, 1, &rows, &cols);
  applied = top_singular_value((int)rows, (int)cols, op);
  ck_assert_double_eq_tol(applied, 2.0, 1e-9);
  free(op);

  /* With the same weight, forward is the same function bit for bit. */
  ck_assert_int_eq(imp_layer_forward(d, &in, x, y2), IMP_OK);
  ck_assert_int_eq(memcmp(y1, y2, sizeof y1), 0);

  /* Gradients through the normalization, sigma differentiated. */
  err = check_layer_gradients(d, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-7);  /* linear in x */
  ck_assert_double_le(err.params, 1e-6); /* sigma's estimate to ~1e-12 */

  /* A target above sigma leaves the weight alone. */
  ck_assert_int_eq(imp_dense_set_lipschitz(d, 100.0, 5), IMP_OK);
  ck_assert_int_eq(imp_layer_forward(d, &in, x, y1), IMP_OK);
  ck_assert_int_eq(imp_block_lipschitz_scale(d, &scale, NULL), IMP_OK);
  ck_assert_double_eq(scale, 1.0);
  err = check_layer_gradients(d, &in, x, &rng);
  ck_assert_double_le(err.params, 1e-7); /* plain dense */

  /* And a target of 0 switches the bound off. */
  ck_assert_int_eq(imp_dense_set_lipschitz(d, 0.0, 0), IMP_OK);
  ck_assert_int_eq(imp_block_lipschitz_scale(d, &scale, &sigma), IMP_OK);
  ck_assert(scale == 1.0 && sigma == 0.0);

  imp_layer_free(d);
  free(x);
}
END_TEST

START_TEST(lipschitz_conv_bounds_the_operator)
{
  imp_rng rng;
  imp_layer *c = NULL;
  imp_shape in = {3, 5, 7, 9};
  double *p, *x, scale, sigma, exact, applied;
  double *op;
  size_t rows, cols;
  layer_errors err;

  /* Equal taps plus noise: a clear top singular value, far above 1. */
  imp_rng_seed(&rng, 15);
  ck_assert_int_eq(imp_conv3x3_create(5, 5, NULL, NULL, &c), IMP_OK);
  p = imp_layer_params(c);
  for (size_t o = 0; o < 5; o++)
    for (size_t k = 0; k < 5; k++) {
      double a = imp_rng_normal(&rng);

      for (size_t t = 0; t < 9; t++)
        p[(o * 5 + k) * 9 + t] = a + 0.3 * imp_rng_normal(&rng);
    }
  imp_rng_fill_normal(&rng, p + 225, 5, 0.0, 1.0);
  exact = conv_operator_norm_svd(p, 5, 5, 7, 9);

  /* Bound the operator on 7 x 9 images to 1. */
  ck_assert_int_eq(imp_conv3x3_set_lipschitz(c, 1.0, 7, 9, 100), IMP_OK);
  x = alloc_normal(&rng, imp_shape_numel(&in), 1.0);
  err = check_layer_gradients(c, &in, x, &rng);
  ck_assert_double_le(err.input, 1e-6);  /* linear in x, but W / 28 makes
                                           entries of 1e-4 where rounding
                                           in L reaches 1e-7 relative */
  ck_assert_double_le(err.params, 1e-6); /* sigma's estimate to ~1e-12 */
  ck_assert_int_eq(imp_block_lipschitz_scale(c, &scale, &sigma), IMP_OK);
  ck_assert_double_eq_tol(sigma, exact, 1e-9 * exact);

  /* The applied operator has norm 1 on 7 x 9, and at most 1 on smaller
   * images. */
  op = assemble_layer_operator(c, 5, 7, 9, &rows, &cols);
  applied = top_singular_value((int)rows, (int)cols, op);
  ck_assert_double_eq_tol(applied, 1.0, 1e-8);
  free(op);
  op = assemble_layer_operator(c, 5, 4, 5, &rows, &cols);
  applied = top_singular_value((int)rows, (int)cols, op);
  ck_assert_double_le(applied, 1.0 + 1e-8);
  ck_assert_double_gt(applied, 0.5);
  free(op);

  imp_layer_free(c);
  free(x);
}
END_TEST

static Suite *blocks_suite(void)
{
  Suite *s = suite_create("blocks");
  TCase *tc = tcase_create("blocks");

  tcase_add_test(tc, dense_forward_matches_loops);
  tcase_add_test(tc, dense_gradients_match_fd);
  tcase_add_test(tc, backward_accumulates);
  tcase_add_test(tc, layers_read_bound_storage);
  tcase_add_test(tc, conv_forward_matches_loops_at_changing_sizes);
  tcase_add_test(tc, conv_gradients_match_fd);
  tcase_add_test(tc, conv_raw_backward_is_the_adjoint);
  tcase_add_test(tc, conv_bands_on_a_large_image);
  tcase_add_test(tc, activation_gradients_match_fd);
  tcase_add_test(tc, activation_values);
  tcase_add_test(tc, add_and_residual);
  tcase_add_test(tc, residual_block_gradient);
  tcase_add_test(tc, losses_match_fd);
  tcase_add_test(tc, loss_values);
  tcase_add_test(tc, bad_input_is_reported);
  tcase_add_test(tc, spectral_norm_dense_matches_svd);
  tcase_add_test(tc, spectral_norm_conv_is_the_operator_norm);
  tcase_add_test(tc, lipschitz_dense_bounds_and_differentiates);
  tcase_add_test(tc, lipschitz_conv_bounds_the_operator);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(blocks_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * core/conv.c - the 3x3 convolution (zero padding, stride 1) as im2col
 * and OpenBLAS GEMM, and the growing workspace it runs in.
 *
 * For one sample x (cin x h x w) the columns matrix X_col has 9 cin rows
 * and h w columns; row (c, di, dj) holds channel c shifted by (di - 1,
 * dj - 1), zero where the shift leaves the image.  Then
 *
 *     forward:   Y (cout x hw) = scale W (cout x 9 cin) X_col + b 1^T,
 *     backward:  Wbar += scale Ybar X_col^T,
 *                X_colbar = scale W^T Ybar,  xbar += col2im(X_colbar),
 *                bbar += Ybar 1.
 *
 * X_col is built a band of image rows at a time, sized to stay in cache
 * (about 256 KiB), and each band's GEMMs run on it before the next is
 * built: X_col is nine times the input, and writing it whole for a large
 * image costs as much as the products.  It is rebuilt from x in backward
 * rather than kept from forward, so one band buffer serves any batch and
 * any x.
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/blocks_internal.h"
#include "core/internal.h"
#include "imp/blocks.h"

typedef struct conv_state {
  size_t cin, cout;
  imp_workspace ws; /* the band buffer of X_col, grown as needed */
  imp__lipschitz lip;
} conv_state;

static const imp_layer_ops conv_ops;

int imp_workspace_reserve(imp_workspace *ws, size_t n)
{
  double *data;

  if (ws == NULL)
    return imp__fail(IMP_EINVAL, "workspace_reserve: NULL workspace");
  if (n <= ws->capacity)
    return IMP_OK;

  /* The contents need not survive, so free first and allocate afresh. */
  free(ws->data);
  ws->data = NULL;
  ws->capacity = 0;
  data = n <= SIZE_MAX / sizeof(double) ? malloc(n * sizeof(double)) : NULL;
  if (data == NULL)
    return imp__fail(IMP_ENOMEM, "workspace_reserve: %zu doubles", n);
  ws->data = data;
  ws->capacity = n;
  return IMP_OK;
}

void imp_workspace_free(imp_workspace *ws)
{
  if (ws == NULL)
    return;
  free(ws->data);
  ws->data = NULL;
  ws->capacity = 0;
}

/*
 * Row (c, di, dj) of X_col is channel c read at the flat offset
 * s = (di - 1) w + (dj - 1): entry p = i w + j is x_c[p + s] when p + s
 * falls inside the image, 0 beyond its first or last row.  A shift by
 * dj - 1 = -1 or +1 wraps column 0 or w - 1 onto the neighbouring image
 * row; that column is outside the padded image and is zeroed.  [lo, hi)
 * is the range of p where p + s is inside; edge is the wrapped column (w
 * when there is none).
 */
typedef struct tap {
  ptrdiff_t shift;
  size_t lo, hi, edge;
} tap;

static tap tap_of(size_t di, size_t dj, size_t h, size_t w)
{
  tap t;
  size_t hw = h * w;

  t.shift = ((ptrdiff_t)di - 1) * (ptrdiff_t)w + ((ptrdiff_t)dj - 1);
  t.lo = t.shift < 0 ? (size_t)(-t.shift) : 0;
  t.hi = t.shift <= 0 ? hw : (size_t)t.shift < hw ? hw - (size_t)t.shift : 0;
  if (t.lo > hw)
    t.lo = hw;
  if (t.hi < t.lo)
    t.hi = t.lo;
  t.edge = dj == 0 ? 0 : dj == 2 ? w - 1 : w;
  return t;
}

/* The doubles of a band of X_col that stay in a core's cache. */
#define IMP__CONV_BAND_DOUBLES 32768

/* Image rows per band: at least one, at most h. */
static size_t band_rows(size_t cin, size_t h, size_t w)
{
  size_t rows = IMP__CONV_BAND_DOUBLES / (9 * cin * w);

  return rows < 1 ? 1 : rows > h ? h : rows;
}

/* Fill the band of col (9 cin x (p1 - p0)) for pixels [p0, p1), whole
 * image rows, from x (cin x h x w). */
static void im2col(size_t cin, size_t h, size_t w, const double *x, size_t p0,
                   size_t p1, double *col)
{
  size_t hw = h * w, np = p1 - p0;

  for (size_t c = 0; c < cin; c++)
    for (size_t di = 0; di < 3; di++)
      for (size_t dj = 0; dj < 3; dj++) {
        double *row = col + ((c * 3 + di) * 3 + dj) * np;
        const double *xc = x + c * hw;
        tap t = tap_of(di, dj, h, w);
        size_t lo = t.lo > p0 ? t.lo : p0, hi = t.hi < p1 ? t.hi : p1;

        /* The shifted copy, zero above and below the image. */
        if (hi < lo)
          hi = lo;
        memset(row, 0, (lo - p0) * sizeof(double));
        if (hi > lo)
          memcpy(row + (lo - p0), xc + ((ptrdiff_t)lo + t.shift),
                 (hi - lo) * sizeof(double));
        memset(row + (hi - p0), 0, (p1 - hi) * sizeof(double));

        /* The column that wrapped around from the next image row. */
        if (t.edge < w)
          for (size_t q = t.edge; q < np; q += w)
            row[q] = 0.0;
      }
}

/* The adjoint of im2col on the band [p0, p1): xbar_c[p + s] += col[(c,
 * di, dj), p - p0] over the entries im2col copied.  col is scratch: its
 * wrapped column is zeroed here so that one flat loop does the rest. */
static void col2im(size_t cin, size_t h, size_t w, double *col, size_t p0,
                   size_t p1, double *xbar)
{
  size_t hw = h * w, np = p1 - p0;

  for (size_t c = 0; c < cin; c++)
    for (size_t di = 0; di < 3; di++)
      for (size_t dj = 0; dj < 3; dj++) {
        double *row = col + ((c * 3 + di) * 3 + dj) * np;
        double *xc = xbar + c * hw;
        tap t = tap_of(di, dj, h, w);
        size_t lo = t.lo > p0 ? t.lo : p0, hi = t.hi < p1 ? t.hi : p1;

        if (t.edge < w)
          for (size_t q = t.edge; q < np; q += w)
            row[q] = 0.0;
        for (size_t p = lo; p < hi; p++)
          xc[(ptrdiff_t)p + t.shift] += row[p - p0];
      }
}

int imp__conv3x3_sizes_fit(size_t cin, size_t cout, size_t h, size_t w)
{
  return cin > 0 && cout > 0 && h > 0 && w > 0 && cin <= INT_MAX / 9 &&
         cout <= INT_MAX && h <= INT_MAX / w && cout <= INT_MAX / (9 * cin);
}

int imp__conv3x3_forward(const double *weight, const double *bias, double scale,
                         size_t cout, const imp_shape *in, const double *x,
                         double *y, imp_workspace *ws)
{
  size_t cin = in->c, h = in->h, w = in->w, hw = h * w, k = 9 * cin;
  size_t band = band_rows(cin, h, w) * w;
  double beta = bias != NULL ? 1.0 : 0.0;
  double *col;

  IMP__TRY(imp_workspace_reserve(ws, k * band));
  col = ws->data;

  for (size_t b = 0; b < in->n; b++) {
    const double *xb = x + b * cin * hw;
    double *yb = y + b * cout * hw;

    /* Every output channel starts from its bias. */
    if (bias != NULL)
      for (size_t o = 0; o < cout; o++)
        for (size_t p = 0; p < hw; p++)
          yb[o * hw + p] = bias[o];

    /* Y[:, band] (cout x np) = scale W (cout x 9 cin) X_col[:, band]
     * (9 cin x np) + beta Y[:, band], band by band. */
    for (size_t p0 = 0; p0 < hw; p0 += band) {
      size_t p1 = p0 + band < hw ? p0 + band : hw, np = p1 - p0;

      im2col(cin, h, w, xb, p0, p1, col);
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)cout, (int)np,
                  (int)k, scale, weight, (int)k, col, (int)np, beta, yb + p0,
                  (int)hw);
    }
  }
  return IMP_OK;
}

int imp__conv3x3_backward(double *xbar, double *wbar, double *bbar,
                          const double *ybar, const double *weight,
                          double scale, size_t cout, const imp_shape *in,
                          const double *x, imp_workspace *ws)
{
  size_t cin = in->c, h = in->h, w = in->w, hw = h * w, k = 9 * cin;
  size_t band = band_rows(cin, h, w) * w;
  double *col = NULL;

  if (xbar != NULL || wbar != NULL) {
    IMP__TRY(imp_workspace_reserve(ws, k * band));
    col = ws->data;
  }

  for (size_t b = 0; b < in->n; b++) {
    const double *yb = ybar + b * cout * hw;

    for (size_t p0 = 0; p0 < hw && col != NULL; p0 += band) {
      size_t p1 = p0 + band < hw ? p0 + band : hw, np = p1 - p0;

      /* Wbar (cout x 9 cin) += scale Ybar[:, band] X_col[:, band]^T. */
      if (wbar != NULL) {
        im2col(cin, h, w, x + b * cin * hw, p0, p1, col);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)cout, (int)k,
                    (int)np, scale, yb + p0, (int)hw, col, (int)np, 1.0, wbar,
                    (int)k);
      }

      /* X_colbar[:, band] = scale W^T Ybar[:, band], back onto pixels. */
      if (xbar != NULL) {
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)k, (int)np,
                    (int)cout, scale, weight, (int)k, yb + p0, (int)hw, 0.0,
                    col, (int)np);
        col2im(cin, h, w, col, p0, p1, xbar + b * cin * hw);
      }
    }

    /* bbar[o] += the sum of channel o of Ybar. */
    if (bbar != NULL)
      for (size_t o = 0; o < cout; o++) {
        double sum = 0.0;

        for (size_t p = 0; p < hw; p++)
          sum += yb[o * hw + p];
        bbar[o] += sum;
      }
  }
  return IMP_OK;
}

/* Check a raw call's shape: non-empty, within int for BLAS. */
static int conv_check_shape(const char *where, size_t cout, const imp_shape *in)
{
  size_t numel = imp_shape_numel(in);

  if (numel == 0 || !imp__conv3x3_sizes_fit(in->c, cout, in->h, in->w))
    return imp__fail(IMP_ESHAPE,
                     "%s: input (%zu, %zu, %zu, %zu) with %zu "
                     "output channels is empty or too large",
                     where, in->n, in->c, in->h, in->w, cout);
  if (in->n > SIZE_MAX / (cout * in->h * in->w))
    return imp__fail(IMP_ESHAPE, "%s: output too large", where);
  return IMP_OK;
}

/* Run a raw call with the caller's workspace, or a temporary one. */
int imp_conv3x3_apply(const double *weight, const double *bias, double scale,
                      size_t cout, const imp_shape *in, const double *x,
                      double *y, imp_workspace *ws)
{
  imp_workspace own = IMP_WORKSPACE_INIT;
  int rc;

  if (weight == NULL || in == NULL || x == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "conv3x3_apply: NULL argument");
  IMP__TRY(conv_check_shape("conv3x3_apply", cout, in));
  if (!isfinite(scale) || !imp__all_finite(weight, 9 * in->c * cout) ||
      (bias != NULL && !imp__all_finite(bias, cout)))
    return imp__fail(IMP_ENONFINITE, "conv3x3_apply: NaN or Inf in the "
                                     "weight, bias or scale");
  if (!imp__all_finite(x, imp_shape_numel(in)))
    return imp__fail(IMP_ENONFINITE, "conv3x3_apply: NaN or Inf in x");

  rc = imp__conv3x3_forward(weight, bias, scale, cout, in, x, y,
                            ws != NULL ? ws : &own);
  imp_workspace_free(&own);
  return rc;
}

int imp_conv3x3_apply_backward(double *xbar, double *wbar, double *bbar,
                               const double *ybar, const double *weight,
                               double scale, size_t cout, const imp_shape *in,
                               const double *x, imp_workspace *ws)
{
  imp_workspace own = IMP_WORKSPACE_INIT;
  int rc;

  if (ybar == NULL || in == NULL || (xbar != NULL && weight == NULL) ||
      (wbar != NULL && x == NULL))
    return imp__fail(IMP_EINVAL, "conv3x3_apply_backward: NULL argument");
  IMP__TRY(conv_check_shape("conv3x3_apply_backward", cout, in));
  if (!imp__all_finite(ybar, in->n * cout * in->h * in->w))
    return imp__fail(IMP_ENONFINITE, "conv3x3_apply_backward: NaN or Inf "
                                     "in ybar");

  rc = imp__conv3x3_backward(xbar, wbar, bbar, ybar, weight, scale, cout, in, x,
                             ws != NULL ? ws : &own);
  imp_workspace_free(&own);
  return rc;
}

static int conv_output_shape(const imp_layer *layer, const imp_shape *in,
                             imp_shape *out)
{
  const conv_state *st = imp_layer_state(layer);

  if (in->c != st->cin)
    return imp__fail(IMP_ESHAPE, "%s: input has %zu channels, expected %zu",
                     imp_layer_name(layer), in->c, st->cin);
  if (in->n == 0 || in->h == 0 || in->w == 0 ||
      !imp__conv3x3_sizes_fit(st->cin, st->cout, in->h, in->w) ||
      in->n > SIZE_MAX / (st->cout * in->h * in->w))
    return imp__fail(IMP_ESHAPE,
                     "%s: input (%zu, %zu, %zu, %zu) is empty "
                     "or too large",
                     imp_layer_name(layer), in->n, in->c, in->h, in->w);
  out->n = in->n;
  out->c = st->cout;
  out->h = in->h;
  out->w = in->w;
  return IMP_OK;
}

static int conv_forward(imp_layer *layer, const imp_shape *in, const double *x,
                        double *y)
{
  conv_state *st = imp_layer_state(layer);
  const double *weight = imp_layer_params(layer);
  const double *bias = weight + 9 * st->cin * st->cout;
  double scale = 1.0;

  /* With a Lipschitz bound, apply W / s (sigma redone only if W moved). */
  if (st->lip.target > 0) {
    IMP__TRY(imp__lipschitz_refresh(&st->lip, weight));
    scale = 1.0 / st->lip.scale;
  }

  return imp__conv3x3_forward(weight, bias, scale, st->cout, in, x, y, &st->ws);
}

static int conv_backward(imp_layer *layer, double *xbar, const double *ybar,
                         const imp_shape *in, const double *x, const double *y)
{
  conv_state *st = imp_layer_state(layer);
  const double *weight = imp_layer_params(layer);
  double *wbar = imp_layer_grads(layer);
  double *bbar = wbar + 9 * st->cin * st->cout;
  imp__lipschitz *lip = &st->lip;

  (void)y;

  /* Without a bound, or with one that does not bite, W is applied as is. */
  if (lip->target <= 0 || lip->sigma <= lip->target)
    return imp__conv3x3_backward(xbar, wbar, bbar, ybar, weight, 1.0, st->cout,
                                 in, x, &st->ws);

  /* The applied weight is W / s: xbar and bbar as for that weight, and
   * its gradient g pulled back through s into wbar. */
  IMP__TRY(imp__conv3x3_backward(xbar, NULL, bbar, ybar, weight,
                                 1.0 / lip->scale, st->cout, in, x, &st->ws));
  memset(lip->weight_grad, 0, lip->nweight * sizeof(double));
  IMP__TRY(imp__conv3x3_backward(NULL, lip->weight_grad, NULL, ybar, weight,
                                 1.0, st->cout, in, x, &st->ws));
  return imp__lipschitz_backward(lip, weight, wbar);
}

static void conv_destroy(void *state)
{
  conv_state *st = state;

  if (st == NULL)
    return;
  imp_workspace_free(&st->ws);
  imp__lipschitz_clear(&st->lip);
  free(st);
}

static const imp_layer_ops conv_ops = {
    .kind = "conv3x3",
    .output_shape = conv_output_shape,
    .forward = conv_forward,
    .backward = conv_backward,
    .rebind = NULL,
    .destroy = conv_destroy,
};

int imp_conv3x3_create(size_t cin, size_t cout, imp_rng *rng, const char *name,
                       imp_layer **layer)
{
  conv_state *st;
  size_t nweight;
  int rc;

  if (layer == NULL)
    return imp__fail(IMP_EINVAL, "conv3x3_create: NULL output pointer");
  *layer = NULL;
  if (cin == 0 || cout == 0 || !imp__conv3x3_sizes_fit(cin, cout, 1, 1))
    return imp__fail(IMP_EINVAL, "conv3x3_create: %zu to %zu channels", cin,
                     cout);
  nweight = 9 * cin * cout;

  st = calloc(1, sizeof *st);
  if (st == NULL)
    return imp__fail(IMP_ENOMEM, "conv3x3_create");
  st->cin = cin;
  st->cout = cout;
  st->lip.scale = 1.0;

  rc = imp_layer_create(&conv_ops, st, nweight + cout,
                        name != NULL ? name : "conv3x3", layer);
  if (rc != IMP_OK) {
    free(st);
    return rc;
  }

  /* Glorot normal with the kernel's fan-in 9 cin and fan-out 9 cout. */
  if (rng != NULL)
    imp_rng_fill_normal(rng, imp_layer_params(*layer), nweight, 0.0,
                        sqrt(2.0 / (9.0 * (double)(cin + cout))));
  return IMP_OK;
}

imp__lipschitz *imp__conv3x3_lipschitz(const imp_layer *layer)
{
  conv_state *st;

  if (imp_layer_get_ops(layer) != &conv_ops)
    return NULL;
  st = imp_layer_state(layer);
  return &st->lip;
}

int imp_conv3x3_set_lipschitz(imp_layer *layer, double target, size_t h,
                              size_t w, int iterations)
{
  conv_state *st;
  imp_spectral *spectral = NULL;

  if (layer == NULL || imp_layer_get_ops(layer) != &conv_ops)
    return imp__fail(IMP_EINVAL, "conv3x3_set_lipschitz: not a conv3x3 "
                                 "layer");
  if (!isfinite(target))
    return imp__fail(IMP_EINVAL, "conv3x3_set_lipschitz: target is not "
                                 "finite");
  st = imp_layer_state(layer);
  if (target <= 0)
    return imp__lipschitz_set(&st->lip, 0.0, 0, NULL, 0);
  if (iterations < 1)
    return imp__fail(IMP_EINVAL, "conv3x3_set_lipschitz: %d iterations",
                     iterations);

  IMP__TRY(imp_spectral_create_conv3x3(st->cin, st->cout, h, w, 0x5eedULL,
                                       &spectral));
  return imp__lipschitz_set(&st->lip, target, iterations, spectral,
                            9 * st->cin * st->cout);
}

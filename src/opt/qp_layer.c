/*
 * opt/qp_layer.c - the QP layer: imp_qp_solve forward, imp_qp_backward
 * backward, with each piece of the data learned, read from the input or
 * fixed (the layouts are described in imp/qp.h).
 */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "opt/qp_internal.h"

typedef struct qp_layer_state {
  imp_qp_dims dims;
  unsigned learned, input;
  int output_duals;
  imp_qp_options options;
  double *fixed;       /* the fixed pieces, at fixed_off */
  size_t fixed_off[6]; /* offsets into fixed */
  size_t param_off[6]; /* offsets into the layer's parameters */
  size_t input_off[6]; /* offsets inside one input sample */
  size_t nparams, input_size;
  double *y;    /* nbatch x ny: the last forward's solutions */
  double *ybar; /* nbatch x ny: backward's full cotangent */
  size_t nbatch, capacity;
  imp_qp_stats stats;
} qp_layer_state;

static void state_free(void *p)
{
  qp_layer_state *s = p;

  if (s == NULL)
    return;
  free(s->fixed);
  free(s->y);
  free(s->ybar);
  free(s);
}

static int qp_output_shape(const imp_layer *layer, const imp_shape *in,
                           imp_shape *out)
{
  const qp_layer_state *s = imp_layer_state(layer);

  if (imp_shape_sample(in) != s->input_size)
    return imp__fail(IMP_ESHAPE,
                     "%s: input samples have %zu values, the "
                     "QP layer reads %zu",
                     imp_layer_name(layer), imp_shape_sample(in),
                     s->input_size);
  out->n = in->n;
  out->c = s->output_duals ? imp_qp_ny(&s->dims) : s->dims.nz;
  out->h = 1;
  out->w = 1;
  return IMP_OK;
}

/* The batch's data: each piece from the parameters, the input or the
 * fixed copy. */
static imp_qp_data gather(const qp_layer_state *s, const double *params,
                          const double *x)
{
  const double *ptr[6];
  size_t stride[6];
  imp_qp_data d;

  for (unsigned i = 0; i < 6; i++) {
    unsigned piece = 1u << i;

    stride[i] = 0;
    if (imp_qp_piece_size(&s->dims, piece) == 0)
      ptr[i] = NULL;
    else if (s->learned & piece)
      ptr[i] = params + s->param_off[i];
    else if (s->input & piece) {
      ptr[i] = x + s->input_off[i];
      stride[i] = s->input_size;
    } else
      ptr[i] = s->fixed + s->fixed_off[i];
  }
  d.Q = ptr[0];
  d.p = ptr[1];
  d.A = ptr[2];
  d.b = ptr[3];
  d.G = ptr[4];
  d.h = ptr[5];
  d.Q_stride = stride[0];
  d.p_stride = stride[1];
  d.A_stride = stride[2];
  d.b_stride = stride[3];
  d.G_stride = stride[4];
  d.h_stride = stride[5];
  return d;
}

static int reserve(qp_layer_state *s, size_t nbatch)
{
  size_t ny = imp_qp_ny(&s->dims);
  double *y, *ybar;

  if (nbatch <= s->capacity)
    return IMP_OK;
  y = imp__dalloc(nbatch * ny);
  ybar = imp__dalloc(nbatch * ny);
  if (y == NULL || ybar == NULL) {
    free(y);
    free(ybar);
    return imp__fail(IMP_ENOMEM, "qp layer: %zu solutions", nbatch);
  }
  free(s->y);
  free(s->ybar);
  s->y = y;
  s->ybar = ybar;
  s->capacity = nbatch;
  return IMP_OK;
}

static int qp_forward(imp_layer *layer, const imp_shape *in, const double *x,
                      double *out)
{
  qp_layer_state *s = imp_layer_state(layer);
  size_t ny = imp_qp_ny(&s->dims), nz = s->dims.nz;
  imp_qp_data d;
  int rc;

  IMP__TRY(reserve(s, in->n));
  d = gather(s, imp_layer_params(layer), x);
  s->nbatch = 0;
  rc = imp_qp_solve(&s->dims, in->n, &d, s->y, &s->options, &s->stats);
  if (rc != IMP_OK)
    return rc;
  s->nbatch = in->n;

  /* The output: z, or all of y. */
  if (s->output_duals)
    memcpy(out, s->y, in->n * ny * sizeof(double));
  else
    for (size_t k = 0; k < in->n; k++)
      memcpy(out + k * nz, s->y + k * ny, nz * sizeof(double));
  return IMP_OK;
}

static int qp_backward(imp_layer *layer, double *xbar, const double *ybar,
                       const imp_shape *in, const double *x, const double *y)
{
  qp_layer_state *s = imp_layer_state(layer);
  size_t ny = imp_qp_ny(&s->dims), nz = s->dims.nz, n = in->n;
  size_t nx = n * s->input_size;
  double *pbar = NULL, *xtmp = NULL;
  imp_qp_data d;
  imp_qp_grad g = {0};
  int rc;

  (void)y;
  if (s->nbatch != n || n == 0)
    return imp__fail(IMP_EINVAL,
                     "%s: backward on a batch of %zu without a "
                     "matching successful forward (last: %zu)",
                     imp_layer_name(layer), n, s->nbatch);

  /* The full cotangent (zbar, lambdabar, nubar). */
  if (s->output_duals)
    memcpy(s->ybar, ybar, n * ny * sizeof(double));
  else {
    memset(s->ybar, 0, n * ny * sizeof(double));
    for (size_t k = 0; k < n; k++)
      memcpy(s->ybar + k * ny, ybar + k * nz, nz * sizeof(double));
  }

  /* Gradients go to temporaries, so that a failure changes nothing. */
  pbar = imp__dalloc(s->nparams);
  xtmp = xbar != NULL ? imp__dalloc(nx) : NULL;
  if (pbar == NULL || (xbar != NULL && xtmp == NULL)) {
    free(pbar);
    free(xtmp);
    return imp__fail(IMP_ENOMEM, "%s: gradient buffers", imp_layer_name(layer));
  }
  {
    double *dst[6] = {NULL};
    size_t stride[6] = {0};

    for (unsigned i = 0; i < 6; i++) {
      unsigned piece = 1u << i;

      if (imp_qp_piece_size(&s->dims, piece) == 0)
        continue;
      if (s->learned & piece)
        dst[i] = pbar + s->param_off[i];
      else if ((s->input & piece) && xtmp != NULL) {
        dst[i] = xtmp + s->input_off[i];
        stride[i] = s->input_size;
      }
    }
    g.Q = dst[0];
    g.p = dst[1];
    g.A = dst[2];
    g.b = dst[3];
    g.G = dst[4];
    g.h = dst[5];
    g.Q_stride = stride[0];
    g.p_stride = stride[1];
    g.A_stride = stride[2];
    g.b_stride = stride[3];
    g.G_stride = stride[4];
    g.h_stride = stride[5];
  }

  d = gather(s, imp_layer_params(layer), x);
  {
    imp_qp_stats st;

    rc = imp_qp_backward(&s->dims, n, &d, s->y, s->ybar, &g, &s->options, &st);
    s->stats.adjoint_cond = st.adjoint_cond;
    s->stats.adjoint_residual = st.adjoint_residual;
    s->stats.sample = st.sample;
  }
  if (rc == IMP_OK) {
    double *grads = imp_layer_grads(layer);

    for (size_t i = 0; i < s->nparams; i++)
      grads[i] += pbar[i];
    for (size_t i = 0; xbar != NULL && i < nx; i++)
      xbar[i] += xtmp[i];
  }
  free(pbar);
  free(xtmp);
  return rc;
}

static const imp_layer_ops qp_layer_ops = {
    .kind = "qp",
    .output_shape = qp_output_shape,
    .forward = qp_forward,
    .backward = qp_backward,
    .destroy = state_free,
};

/* Check the masks and lay out the parameters, inputs and fixed pieces. */
static int layout(qp_layer_state *s, const imp_qp_layer_config *cfg)
{
  const double *values[6] = {cfg->values.Q, cfg->values.p, cfg->values.A,
                             cfg->values.b, cfg->values.G, cfg->values.h};
  static const char *const names[6] = {"Q", "p", "A", "b", "G", "h"};
  size_t nfixed = 0;

  if (cfg->learned & cfg->input)
    return imp__fail(IMP_EINVAL,
                     "qp_layer_create: a piece is both learned "
                     "and input (masks %#x and %#x)",
                     cfg->learned, cfg->input);
  if ((cfg->learned | cfg->input) & ~(unsigned)IMP_QP_ALL)
    return imp__fail(IMP_EINVAL,
                     "qp_layer_create: unknown flags in the "
                     "masks %#x and %#x",
                     cfg->learned, cfg->input);

  for (unsigned i = 0; i < 6; i++) {
    unsigned piece = 1u << i;
    size_t size = imp_qp_piece_size(&cfg->dims, piece);

    if (size == 0) {
      if ((cfg->learned | cfg->input) & piece)
        return imp__fail(IMP_ESHAPE,
                         "qp_layer_create: %s is learned or "
                         "input but has no entries (nineq = %zu, neq = %zu)",
                         names[i], cfg->dims.nineq, cfg->dims.neq);
      continue;
    }
    if (cfg->learned & piece) {
      s->param_off[i] = s->nparams;
      s->nparams += size;
    } else if (cfg->input & piece) {
      s->input_off[i] = s->input_size;
      s->input_size += size;
    } else {
      if (values[i] == NULL)
        return imp__fail(IMP_EINVAL,
                         "qp_layer_create: %s is fixed (neither "
                         "learned nor input) but has no value",
                         names[i]);
      if (!imp__all_finite(values[i], size))
        return imp__fail(IMP_ENONFINITE,
                         "qp_layer_create: NaN or Inf in "
                         "the fixed %s",
                         names[i]);
      s->fixed_off[i] = nfixed;
      nfixed += size;
    }
  }

  s->fixed = imp__dalloc(nfixed);
  if (s->fixed == NULL)
    return imp__fail(IMP_ENOMEM, "qp_layer_create: fixed data");
  for (unsigned i = 0; i < 6; i++) {
    unsigned piece = 1u << i;
    size_t size = imp_qp_piece_size(&cfg->dims, piece);

    if (size > 0 && !((cfg->learned | cfg->input) & piece))
      memcpy(s->fixed + s->fixed_off[i], values[i], size * sizeof(double));
  }
  return IMP_OK;
}

int imp_qp_layer_create(const imp_qp_layer_config *config, const char *name,
                        imp_layer **out)
{
  const double *values[6];
  qp_layer_state *s;
  int rc;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "qp_layer_create: NULL output pointer");
  *out = NULL;
  if (config == NULL)
    return imp__fail(IMP_EINVAL, "qp_layer_create: NULL config");
  if (config->dims.nz == 0)
    return imp__fail(IMP_EINVAL, "qp_layer_create: nz = 0");

  s = calloc(1, sizeof *s);
  if (s == NULL)
    return imp__fail(IMP_ENOMEM, "qp_layer_create");
  s->dims = config->dims;
  s->learned = config->learned;
  s->input = config->input;
  s->output_duals = config->output_duals != 0;
  s->options = config->options;
  rc = layout(s, config);
  if (rc == IMP_OK)
    rc = imp_layer_create(&qp_layer_ops, s, s->nparams,
                          name != NULL ? name : "qp", out);
  if (rc != IMP_OK) {
    state_free(s);
    return rc;
  }

  /* Initial values of the learned pieces, where given. */
  values[0] = config->values.Q;
  values[1] = config->values.p;
  values[2] = config->values.A;
  values[3] = config->values.b;
  values[4] = config->values.G;
  values[5] = config->values.h;
  for (unsigned i = 0; i < 6; i++) {
    unsigned piece = 1u << i;

    if ((s->learned & piece) && values[i] != NULL)
      memcpy(imp_layer_params(*out) + s->param_off[i], values[i],
             imp_qp_piece_size(&s->dims, piece) * sizeof(double));
  }
  return IMP_OK;
}

int imp_qp_layer_param(const imp_layer *layer, unsigned piece, size_t *offset,
                       size_t *size)
{
  const qp_layer_state *s;

  if (layer == NULL || offset == NULL || size == NULL)
    return imp__fail(IMP_EINVAL, "qp_layer_param: NULL argument");
  if (imp_layer_get_ops(layer) != &qp_layer_ops)
    return imp__fail(IMP_EINVAL,
                     "qp_layer_param: %s is a %s layer, not a "
                     "QP layer",
                     imp_layer_name(layer), imp_layer_kind(layer));
  s = imp_layer_state(layer);
  for (unsigned i = 0; i < 6; i++)
    if (piece == (1u << i) && (s->learned & piece)) {
      *offset = s->param_off[i];
      *size = imp_qp_piece_size(&s->dims, piece);
      return IMP_OK;
    }
  return imp__fail(IMP_EINVAL,
                   "qp_layer_param: piece %#x is not one "
                   "learned piece of %s",
                   piece, imp_layer_name(layer));
}

int imp_qp_layer_stats(const imp_layer *layer, imp_qp_stats *stats)
{
  if (layer == NULL || stats == NULL)
    return imp__fail(IMP_EINVAL, "qp_layer_stats: NULL argument");
  if (imp_layer_get_ops(layer) != &qp_layer_ops)
    return imp__fail(IMP_EINVAL, "qp_layer_stats: not a QP layer");
  *stats = ((const qp_layer_state *)imp_layer_state(layer))->stats;
  return IMP_OK;
}

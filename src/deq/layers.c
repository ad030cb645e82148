/*
 * deq/layers.c - a DEQ whose map is built from layers:
 *
 *     h(u, z) = core(z_layer(z) + u),
 *
 * with u the layer's input (already injected, e.g. by a convolution of the
 * raw input earlier in a stack) and z the state.  The parameters of the
 * two layers become the DEQ's parameters; their gradients go to a scratch
 * buffer, since the solvers call the vjp many times without wanting
 * parameter gradients, and are added to vjp_theta only when asked.
 */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "deq/deq_internal.h"
#include "imp/blocks.h"
#include "imp/deq.h"

typedef struct layer_map {
  imp_layer *z_layer, *core;
  size_t nz_params, ncore_params;
  double *scratch;  /* gradients of both layers, nz + ncore */
  imp_workspace ws; /* the four buffers below, n doubles each */
  double *mix, *zout, *hout, *mixbar; /* views into ws, set per call */
} layer_map;

static void layer_map_free(void *ctx)
{
  layer_map *m = ctx;

  if (m == NULL)
    return;
  imp_layer_free(m->z_layer);
  imp_layer_free(m->core);
  free(m->scratch);
  imp_workspace_free(&m->ws);
  free(m);
}

static int layer_map_rebind(void *ctx, double *params)
{
  layer_map *m = ctx;

  IMP__TRY(imp_layer_bind_storage(m->z_layer, params, m->scratch));
  return imp_layer_bind_storage(m->core, params + m->nz_params,
                                m->scratch + m->nz_params);
}

/* Room for n doubles in each of the four buffers. */
static int grow(layer_map *m, size_t n)
{
  if (n > ((size_t)-1) / 4)
    return imp__fail(IMP_ENOMEM, "deq (layers): %zu doubles", n);
  IMP__TRY(imp_workspace_reserve(&m->ws, 4 * n));
  m->mix = m->ws.data;
  m->zout = m->mix + n;
  m->hout = m->zout + n;
  m->mixbar = m->hout + n;
  return IMP_OK;
}

/* mix = z_layer(z) + u and out = core(mix) (out NULL: into hout),
 * keeping z_layer(z) in zout. */
static int run_forward(layer_map *m, const imp_shape *us, const double *u,
                       const imp_shape *zs, const double *z, double *out,
                       imp_shape *ms)
{
  imp_shape hs;
  size_t n;

  IMP__TRY(imp_layer_output_shape(m->z_layer, zs, ms));
  if (ms->n != us->n || ms->c != us->c || ms->h != us->h || ms->w != us->w)
    return imp__fail(IMP_ESHAPE,
                     "deq (layers): z_layer gives (%zu, %zu, "
                     "%zu, %zu), the input is (%zu, %zu, %zu, %zu)",
                     ms->n, ms->c, ms->h, ms->w, us->n, us->c, us->h, us->w);
  IMP__TRY(imp_layer_output_shape(m->core, ms, &hs));
  if (hs.c != zs->c || hs.h != zs->h || hs.w != zs->w)
    return imp__fail(IMP_ESHAPE,
                     "deq (layers): core gives %zu channels "
                     "for a %zu-channel state",
                     hs.c, zs->c);
  n = imp_shape_numel(ms);
  IMP__TRY(grow(m, n > imp_shape_numel(zs) ? n : imp_shape_numel(zs)));

  IMP__TRY(imp_layer_forward(m->z_layer, zs, z, m->zout));
  for (size_t i = 0; i < n; i++)
    m->mix[i] = m->zout[i] + u[i];
  return imp_layer_forward(m->core, ms, m->mix, out != NULL ? out : m->hout);
}

static int layer_map_apply(void *ctx, const imp_shape *us, const double *u,
                           const imp_shape *zs, const double *z,
                           const double *theta, double *out)
{
  imp_shape ms;

  (void)theta; /* the layers read it through their bound storage */
  return run_forward(ctx, us, u, zs, z, out, &ms);
}

static int layer_map_vjp(void *ctx, const imp_shape *us, const double *u,
                         const imp_shape *zs, const double *z,
                         const double *theta, const double *v, double *vjp_z,
                         double *vjp_x, double *vjp_theta)
{
  layer_map *m = ctx;
  size_t np = m->nz_params + m->ncore_params, nm;
  imp_shape ms;

  (void)theta;

  /* Backward needs the forward at this z.  Failures return their status,
   * which the DEQ passes on (imp__callback_status). */
  /* out = NULL: into m->hout, which grow may move. */
  IMP__TRY(run_forward(m, us, u, zs, z, NULL, &ms));
  nm = imp_shape_numel(&ms);
  memset(m->scratch, 0, (np > 0 ? np : 1) * sizeof(double));
  memset(m->mixbar, 0, nm * sizeof(double));

  IMP__TRY(imp_layer_backward(m->core, m->mixbar, v, &ms, m->mix, m->hout));
  for (size_t i = 0; vjp_x != NULL && i < nm; i++)
    vjp_x[i] += m->mixbar[i];
  if (vjp_z != NULL)
    memset(vjp_z, 0, imp_shape_numel(zs) * sizeof(double));
  if (vjp_z != NULL || vjp_theta != NULL)
    IMP__TRY(imp_layer_backward(m->z_layer, vjp_z, m->mixbar, zs, z, m->zout));
  for (size_t i = 0; vjp_theta != NULL && i < np; i++)
    vjp_theta[i] += m->scratch[i];
  return 0;
}

int imp_deq_create_from_layers(size_t z_channels, imp_layer *z_layer,
                               imp_layer *core, const imp_deq_options *opt,
                               const char *name, imp_layer **out)
{
  imp_shape probe = {1, z_channels, 1, 1}, ms;
  imp__deq_owner owner = {.destroy = layer_map_free,
                          .rebind = layer_map_rebind};
  imp_deq_map map = {
      .z_channels = z_channels, .map = layer_map_apply, .vjp = layer_map_vjp};
  layer_map *m;
  int rc;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "deq_create_from_layers: NULL output");
  *out = NULL;
  if (z_layer == NULL || core == NULL || z_channels == 0)
    return imp__fail(IMP_EINVAL, "deq_create_from_layers: NULL layer or "
                                 "zero channels");
  /* The input's channels are those z_layer produces. */
  IMP__TRY(imp_layer_output_shape(z_layer, &probe, &ms));

  m = calloc(1, sizeof *m);
  if (m == NULL)
    return imp__fail(IMP_ENOMEM, "deq_create_from_layers");
  m->nz_params = imp_layer_nparams(z_layer);
  m->ncore_params = imp_layer_nparams(core);
  m->scratch = imp__dalloc(m->nz_params + m->ncore_params);
  if (m->scratch == NULL) {
    free(m);
    return imp__fail(IMP_ENOMEM, "deq_create_from_layers: gradients");
  }
  m->z_layer = z_layer;
  m->core = core;
  owner.ctx = m;
  map.ctx = m;
  map.x_channels = ms.c;
  map.ntheta = m->nz_params + m->ncore_params;

  rc = imp__deq_create(&map, NULL, opt, name, &owner, out);
  if (rc != IMP_OK) {
    free(m->scratch); /* the layers stay the caller's */
    free(m);
  }
  return rc;
}

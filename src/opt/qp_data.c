/*
 * opt/qp_data.c - the sizes, views and checks of a batch of QPs, the
 * packing of one QP's data into theta, and the objective.
 */
#include <limits.h>
#include <string.h>

#include "core/internal.h"
#include "opt/qp_internal.h"

size_t imp_qp_ny(const imp_qp_dims *dims)
{
  return dims != NULL ? dims->nz + dims->nineq + dims->neq : 0;
}

size_t imp_qp_piece_size(const imp_qp_dims *dims, unsigned piece)
{
  if (dims == NULL)
    return 0;
  switch (piece) {
  case IMP_QP_Q:
    return dims->nz * dims->nz;
  case IMP_QP_P:
    return dims->nz;
  case IMP_QP_A:
    return dims->neq * dims->nz;
  case IMP_QP_B:
    return dims->neq;
  case IMP_QP_G:
    return dims->nineq * dims->nz;
  case IMP_QP_H:
    return dims->nineq;
  default:
    return 0;
  }
}

void imp__qp_theta_offsets(const imp_qp_dims *dims, size_t off[7])
{
  off[0] = 0;
  for (unsigned i = 0; i < 6; i++)
    off[i + 1] = off[i] + imp_qp_piece_size(dims, 1u << i);
}

size_t imp_qp_ntheta(const imp_qp_dims *dims)
{
  size_t off[7];

  if (dims == NULL)
    return 0;
  imp__qp_theta_offsets(dims, off);
  return off[6];
}

imp__qp_config imp__qp_configure(const imp_qp_options *opt)
{
  imp_qp_options o = {0};
  imp__qp_config c;

  if (opt != NULL)
    o = *opt;
  c.tol = o.tol > 0.0 ? o.tol : 1e-10;
  c.max_iter = o.max_iter > 0 ? o.max_iter : 100;
  c.psd_tol = o.psd_tol > 0.0 ? o.psd_tol : 1e-10;
  c.radius = o.radius > 0.0 ? o.radius : 1e9;
  c.system = o.system;
  c.adjoint = o.adjoint;
  return c;
}

/* A piece's pointer and stride, by its index 0..5 (Q, p, A, b, G, h). */
static const double *piece_ptr(const imp_qp_data *d, unsigned i, size_t *stride)
{
  const double *ptr[6] = {d->Q, d->p, d->A, d->b, d->G, d->h};
  size_t st[6] = {d->Q_stride, d->p_stride, d->A_stride,
                  d->b_stride, d->G_stride, d->h_stride};

  *stride = st[i];
  return ptr[i];
}

static const char *const piece_names[6] = {"Q", "p", "A", "b", "G", "h"};

int imp__qp_check(const imp_qp_dims *dims, size_t nbatch,
                  const imp_qp_data *data, const char *fn)
{
  size_t limit = (size_t)INT_MAX / 4;

  if (dims == NULL || data == NULL)
    return imp__fail(IMP_EINVAL, "%s: NULL dims or data", fn);
  if (dims->nz == 0)
    return imp__fail(IMP_EINVAL, "%s: nz = 0, a QP needs variables", fn);
  if (nbatch == 0)
    return imp__fail(IMP_EINVAL, "%s: an empty batch (nbatch = 0)", fn);
  if (dims->nz > 46340 || dims->nineq > limit || dims->neq > limit ||
      imp_qp_ny(dims) > 46340)
    return imp__fail(IMP_ESHAPE,
                     "%s: nz = %zu, nineq = %zu, neq = %zu exceed "
                     "what LAPACK's int sizes can index",
                     fn, dims->nz, dims->nineq, dims->neq);

  /* Each piece is given exactly when its size is not 0, and samples do
   * not overlap. */
  for (unsigned i = 0; i < 6; i++) {
    size_t stride, size = imp_qp_piece_size(dims, 1u << i);
    const double *ptr = piece_ptr(data, i, &stride);

    if (size > 0 && ptr == NULL)
      return imp__fail(IMP_EINVAL, "%s: %s is NULL but has %zu entries", fn,
                       piece_names[i], size);
    if (size == 0 && ptr != NULL)
      return imp__fail(IMP_ESHAPE,
                       "%s: %s is given but has no entries "
                       "(nineq = %zu, neq = %zu)",
                       fn, piece_names[i], dims->nineq, dims->neq);
    if (stride != 0 && stride < size)
      return imp__fail(IMP_ESHAPE,
                       "%s: stride %zu of %s is less than its "
                       "size %zu, so samples overlap",
                       fn, stride, piece_names[i], size);
  }
  return IMP_OK;
}

imp__qp_view imp__qp_view_of(const imp_qp_data *data, size_t k)
{
  imp__qp_view v;

  v.Q = data->Q != NULL ? data->Q + k * data->Q_stride : NULL;
  v.p = data->p != NULL ? data->p + k * data->p_stride : NULL;
  v.A = data->A != NULL ? data->A + k * data->A_stride : NULL;
  v.b = data->b != NULL ? data->b + k * data->b_stride : NULL;
  v.G = data->G != NULL ? data->G + k * data->G_stride : NULL;
  v.h = data->h != NULL ? data->h + k * data->h_stride : NULL;
  return v;
}

int imp__qp_check_finite(const imp_qp_dims *dims, const imp_qp_data *data,
                         size_t k, const char *fn)
{
  for (unsigned i = 0; i < 6; i++) {
    size_t stride, size = imp_qp_piece_size(dims, 1u << i);
    const double *ptr = piece_ptr(data, i, &stride);

    if (size == 0 || (stride == 0 && k > 0))
      continue;
    if (!imp__all_finite(ptr + k * stride, size))
      return imp__fail(IMP_ENONFINITE, "%s: NaN or Inf in %s of sample %zu", fn,
                       piece_names[i], k);
  }
  return IMP_OK;
}

int imp_qp_pack_theta(const imp_qp_dims *dims, const imp_qp_data *data,
                      size_t k, double *theta)
{
  size_t off[7];

  if (theta == NULL)
    return imp__fail(IMP_EINVAL, "qp_pack_theta: NULL theta");
  IMP__TRY(imp__qp_check(dims, k + 1, data, "qp_pack_theta"));
  imp__qp_theta_offsets(dims, off);
  for (unsigned i = 0; i < 6; i++) {
    size_t stride;
    const double *ptr = piece_ptr(data, i, &stride);

    if (off[i + 1] > off[i])
      memcpy(theta + off[i], ptr + k * stride,
             (off[i + 1] - off[i]) * sizeof(double));
  }
  return IMP_OK;
}

int imp_qp_objective(const imp_qp_dims *dims, size_t nbatch,
                     const imp_qp_data *data, const double *y, double *f)
{
  size_t n, ny;

  IMP__TRY(imp__qp_check(dims, nbatch, data, "qp_objective"));
  if (y == NULL || f == NULL)
    return imp__fail(IMP_EINVAL, "qp_objective: NULL y or f");
  n = dims->nz;
  ny = imp_qp_ny(dims);

  /* 1/2 z^T Q z + p^T z, one row of Q at a time. */
  for (size_t k = 0; k < nbatch; k++) {
    imp__qp_view v = imp__qp_view_of(data, k);
    const double *z = y + k * ny;
    double quad = 0.0;

    for (size_t i = 0; i < n; i++)
      quad += z[i] * imp__dot(n, v.Q + i * n, z);
    f[k] = 0.5 * quad + imp__dot(n, v.p, z);
  }
  return IMP_OK;
}

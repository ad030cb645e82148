/*
 * opt/qp_kkt.c - the backward of the QP layer: the KKT conditions as an
 * implicit problem in y = (z, lambda, nu), differentiated by the shared
 * adjoint solve (imp/adjoint.h).  There is no other backward.
 *
 * With v = (v_z, v_lambda, v_nu) and c = w o lambda o v_lambda, the
 * vector-Jacobian products of the residual are
 *
 *   v^T df/dz      = Qs v_z + G^T c + A^T v_nu,
 *   v^T df/dlambda = G v_z + w o (G z - h) o v_lambda,
 *   v^T df/dnu     = A v_z,
 *   Qbar = (v_z z^T + z v_z^T) / 2,  pbar = v_z,
 *   Abar = v_nu z^T + nu v_z^T,      bbar = -v_nu,
 *   Gbar = lambda v_z^T + c z^T,     hbar = -c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/internal.h"
#include "opt/qp_internal.h"

/* The pieces of theta, by the offsets of imp__qp_theta_offsets. */
typedef struct theta_view {
  const double *Q, *p, *A, *b, *G, *h;
} theta_view;

static theta_view theta_of(const imp_qp_dims *dims, const double *theta)
{
  size_t off[7];
  theta_view t;

  imp__qp_theta_offsets(dims, off);
  t.Q = theta + off[0];
  t.p = theta + off[1];
  t.A = theta + off[2];
  t.b = theta + off[3];
  t.G = theta + off[4];
  t.h = theta + off[5];
  return t;
}

/* f(y; theta) = (Qs z + p + G^T lambda + A^T nu, w o lambda o (G z - h),
 * A z - b). */
static int kkt_residual(void *ctx, const double *x, const double *y,
                        const double *theta, double *r)
{
  const imp_qp_kkt *kkt = ctx;
  size_t n = kkt->dims.nz, m = kkt->dims.nineq, p = kkt->dims.neq;
  int ni = (int)n, mi = (int)m, pi = (int)p;
  theta_view t = theta_of(&kkt->dims, theta);
  const double *z = y, *lam = y + n, *nu = y + n + m;

  (void)x;

  /* Stationarity, with Qs = (Q + Q^T) / 2. */
  memcpy(r, t.p, n * sizeof(double));
  cblas_dgemv(CblasRowMajor, CblasNoTrans, ni, ni, 0.5, t.Q, ni, z, 1, 1.0, r,
              1);
  cblas_dgemv(CblasRowMajor, CblasTrans, ni, ni, 0.5, t.Q, ni, z, 1, 1.0, r, 1);
  if (m > 0)
    cblas_dgemv(CblasRowMajor, CblasTrans, mi, ni, 1.0, t.G, ni, lam, 1, 1.0, r,
                1);
  if (p > 0)
    cblas_dgemv(CblasRowMajor, CblasTrans, pi, ni, 1.0, t.A, ni, nu, 1, 1.0, r,
                1);

  /* Complementarity, scaled, and primal feasibility of the equalities. */
  for (size_t i = 0; i < m; i++)
    r[n + i] = kkt->w[i] * lam[i] * (imp__dot(n, t.G + i * n, z) - t.h[i]);
  for (size_t i = 0; i < p; i++)
    r[n + m + i] = imp__dot(n, t.A + i * n, z) - t.b[i];
  return 0;
}

static int kkt_vjp(void *ctx, const double *x, const double *y,
                   const double *theta, const double *v, double *vjp_y,
                   double *vjp_x, double *vjp_theta)
{
  const imp_qp_kkt *kkt = ctx;
  const imp_qp_dims *dims = &kkt->dims;
  size_t n = dims->nz, m = dims->nineq, p = dims->neq, off[7];
  int ni = (int)n, mi = (int)m, pi = (int)p;
  theta_view t = theta_of(dims, theta);
  const double *z = y, *lam = y + n, *nu = y + n + m;
  const double *vz = v, *vl = v + n, *vn = v + n + m;

  (void)x;
  (void)vjp_x;

  /* v^T df/dy, block by block. */
  if (vjp_y != NULL) {
    double *gz = vjp_y, *gl = vjp_y + n, *gn = vjp_y + n + m;

    memset(gz, 0, n * sizeof(double));
    cblas_dgemv(CblasRowMajor, CblasNoTrans, ni, ni, 0.5, t.Q, ni, vz, 1, 1.0,
                gz, 1);
    cblas_dgemv(CblasRowMajor, CblasTrans, ni, ni, 0.5, t.Q, ni, vz, 1, 1.0, gz,
                1);
    for (size_t i = 0; i < m; i++) {
      const double *gi = t.G + i * n;
      double slack = imp__dot(n, gi, z) - t.h[i];

      cblas_daxpy(ni, kkt->w[i] * lam[i] * vl[i], gi, 1, gz, 1);
      gl[i] = imp__dot(n, gi, vz) + kkt->w[i] * slack * vl[i];
    }
    if (p > 0) {
      cblas_dgemv(CblasRowMajor, CblasTrans, pi, ni, 1.0, t.A, ni, vn, 1, 1.0,
                  gz, 1);
      cblas_dgemv(CblasRowMajor, CblasNoTrans, pi, ni, 1.0, t.A, ni, vz, 1, 0.0,
                  gn, 1);
    }
  }

  /* v^T df/dtheta, accumulated. */
  if (vjp_theta != NULL) {
    double *Qb, *pb, *Ab, *bb, *Gb, *hb;

    imp__qp_theta_offsets(dims, off);
    Qb = vjp_theta + off[0];
    pb = vjp_theta + off[1];
    Ab = vjp_theta + off[2];
    bb = vjp_theta + off[3];
    Gb = vjp_theta + off[4];
    hb = vjp_theta + off[5];
    cblas_dger(CblasRowMajor, ni, ni, 0.5, vz, 1, z, 1, Qb, ni);
    cblas_dger(CblasRowMajor, ni, ni, 0.5, z, 1, vz, 1, Qb, ni);
    cblas_daxpy(ni, 1.0, vz, 1, pb, 1);
    if (p > 0) {
      cblas_dger(CblasRowMajor, pi, ni, 1.0, vn, 1, z, 1, Ab, ni);
      cblas_dger(CblasRowMajor, pi, ni, 1.0, nu, 1, vz, 1, Ab, ni);
      cblas_daxpy(pi, -1.0, vn, 1, bb, 1);
    }
    if (m > 0)
      cblas_dger(CblasRowMajor, mi, ni, 1.0, lam, 1, vz, 1, Gb, ni);
    for (size_t i = 0; i < m; i++) {
      double ci = kkt->w[i] * lam[i] * vl[i];

      cblas_daxpy(ni, ci, z, 1, Gb + i * n, 1);
      hb[i] -= ci;
    }
  }
  return 0;
}

/* The dense Jacobian df/dy, ny x ny row-major. */
static int kkt_jacobian(void *ctx, const double *x, const double *y,
                        const double *theta, double *jac)
{
  const imp_qp_kkt *kkt = ctx;
  size_t n = kkt->dims.nz, m = kkt->dims.nineq, p = kkt->dims.neq;
  size_t ny = n + m + p;
  theta_view t = theta_of(&kkt->dims, theta);
  const double *z = y, *lam = y + n;

  (void)x;
  memset(jac, 0, ny * ny * sizeof(double));

  /* Rows of stationarity: [Qs, G^T, A^T]. */
  for (size_t i = 0; i < n; i++) {
    double *row = jac + i * ny;

    for (size_t j = 0; j < n; j++)
      row[j] = 0.5 * (t.Q[i * n + j] + t.Q[j * n + i]);
    for (size_t j = 0; j < m; j++)
      row[n + j] = t.G[j * n + i];
    for (size_t j = 0; j < p; j++)
      row[n + m + j] = t.A[j * n + i];
  }

  /* Rows of complementarity: [w lambda_i G_i, w (G_i z - h_i) e_i, 0]. */
  for (size_t i = 0; i < m; i++) {
    double *row = jac + (n + i) * ny;
    const double *gi = t.G + i * n;

    for (size_t j = 0; j < n; j++)
      row[j] = kkt->w[i] * lam[i] * gi[j];
    row[n + i] = kkt->w[i] * (imp__dot(n, gi, z) - t.h[i]);
  }

  /* Rows of the equalities: [A, 0, 0]. */
  for (size_t i = 0; i < p; i++)
    memcpy(jac + (n + m + i) * ny, t.A + i * n, n * sizeof(double));
  return 0;
}

int imp_qp_kkt_problem(imp_qp_kkt *kkt, const double *y, const double *theta,
                       imp_problem *problem)
{
  size_t n, m;
  theta_view t;

  if (kkt == NULL || y == NULL || theta == NULL || problem == NULL)
    return imp__fail(IMP_EINVAL, "qp_kkt_problem: NULL argument");
  if (kkt->dims.nz == 0)
    return imp__fail(IMP_EINVAL, "qp_kkt_problem: nz = 0");
  if (kkt->dims.nineq > 0 && kkt->w == NULL)
    return imp__fail(IMP_EINVAL,
                     "qp_kkt_problem: NULL w with %zu "
                     "inequalities",
                     kkt->dims.nineq);
  n = kkt->dims.nz;
  m = kkt->dims.nineq;
  t = theta_of(&kkt->dims, theta);

  /* The weights of the complementarity rows, from the solution. */
  for (size_t i = 0; i < m; i++) {
    double slack = t.h[i] - imp__dot(n, t.G + i * n, y);
    double scale = fmax(fabs(y[n + i]), fabs(slack));

    kkt->w[i] = scale > 0.0 ? 1.0 / scale : 1.0;
  }

  memset(problem, 0, sizeof *problem);
  problem->nx = 0;
  problem->ny = imp_qp_ny(&kkt->dims);
  problem->ntheta = imp_qp_ntheta(&kkt->dims);
  problem->residual = kkt_residual;
  problem->vjp = kkt_vjp;
  problem->jacobian = kkt_jacobian;
  problem->ctx = kkt;
  return IMP_OK;
}

/* Add one sample's thetabar into the gradient outputs it belongs to. */
static void scatter(const imp_qp_dims *dims, const double *tbar, size_t k,
                    imp_qp_grad *grad)
{
  double *dst[6] = {grad->Q, grad->p, grad->A, grad->b, grad->G, grad->h};
  size_t stride[6] = {grad->Q_stride, grad->p_stride, grad->A_stride,
                      grad->b_stride, grad->G_stride, grad->h_stride};
  size_t off[7];

  imp__qp_theta_offsets(dims, off);
  for (unsigned i = 0; i < 6; i++) {
    double *g = dst[i];

    if (g == NULL)
      continue;
    g += k * stride[i];
    for (size_t j = off[i]; j < off[i + 1]; j++)
      g[j - off[i]] += tbar[j];
  }
}

int imp_qp_backward(const imp_qp_dims *dims, size_t nbatch,
                    const imp_qp_data *data, const double *y,
                    const double *ybar, imp_qp_grad *grad,
                    const imp_qp_options *opt, imp_qp_stats *stats)
{
  imp__qp_config c = imp__qp_configure(opt);
  imp_qp_stats st = {0};
  imp_qp_kkt kkt;
  imp_problem problem;
  imp_adjoint_workspace *own_workspace = NULL;
  size_t ny, ntheta;
  double *theta = NULL, *tbar = NULL;
  int rc = IMP_OK;

  /* Check the arguments. */
  IMP__TRY(imp__qp_check(dims, nbatch, data, "qp_backward"));
  if (y == NULL || ybar == NULL || grad == NULL)
    return imp__fail(IMP_EINVAL, "qp_backward: NULL y, ybar or grad");
  ny = imp_qp_ny(dims);
  ntheta = imp_qp_ntheta(dims);
  if (!imp__all_finite(y, nbatch * ny) || !imp__all_finite(ybar, nbatch * ny))
    return imp__fail(IMP_ENONFINITE, "qp_backward: NaN or Inf in y or ybar");

  kkt.dims = *dims;
  kkt.w = imp__dalloc(dims->nineq);
  theta = imp__dalloc(ntheta);
  tbar = imp__dalloc(ntheta);
  if (kkt.w == NULL || theta == NULL || tbar == NULL) {
    rc = imp__fail(IMP_ENOMEM, "qp_backward: %zu parameters", ntheta);
    goto done;
  }

  /* One dense KKT Jacobian's buffers for the whole batch, unless the
   * caller brought their own. */
  if (c.adjoint.workspace == NULL) {
    rc = imp_adjoint_workspace_create(&own_workspace);
    if (rc != IMP_OK)
      goto done;
    c.adjoint.workspace = own_workspace;
  }

  /* One adjoint solve per QP, on its KKT residual. */
  for (size_t k = 0; k < nbatch; k++) {
    imp_adjoint_stats ast;

    rc = imp__qp_check_finite(dims, data, k, "qp_backward");
    if (rc == IMP_OK)
      rc = imp_qp_pack_theta(dims, data, k, theta);
    if (rc == IMP_OK)
      rc = imp_qp_kkt_problem(&kkt, y + k * ny, theta, &problem);
    if (rc != IMP_OK) {
      st.sample = k;
      break;
    }
    memset(tbar, 0, ntheta * sizeof(double));
    rc = imp_adjoint_solve(&problem, NULL, y + k * ny, theta, ybar + k * ny,
                           NULL, NULL, tbar, &c.adjoint, &ast);
    st.adjoint_cond = fmax(st.adjoint_cond, ast.cond);
    st.adjoint_residual = fmax(st.adjoint_residual, ast.residual);
    if (rc != IMP_OK) {
      char why[200];

      snprintf(why, sizeof why, "%s", imp_last_error());
      rc = imp__fail(rc, "qp_backward (sample %zu): %s", k, why);
      st.sample = k;
      break;
    }
    scatter(dims, tbar, k, grad);
  }

done:
  imp_adjoint_workspace_free(own_workspace);
  free(kkt.w);
  free(theta);
  free(tbar);
  if (stats != NULL)
    *stats = st;
  return rc;
}

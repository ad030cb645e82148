/*
 * core/adjoint.c - the shared adjoint solve (df/dy)^T v = -ybar and the
 * accumulation of xbar and thetabar from v.
 *
 * Dense LU assembles df/dy, factors it with LAPACK and estimates its
 * reciprocal condition number with dgecon.  GMRES works on the operator
 * u -> (df/dy)^T u, which the vjp callback applies, and estimates the
 * condition number from the singular values of the Arnoldi Hessenberg
 * matrix: the operator restricted to the Krylov space, so the estimate is
 * a lower bound of the true condition number.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "imp/adjoint.h"

/* Options with the defaults filled in. */
typedef struct adjoint_config {
  imp_adjoint_method method;
  imp_adjoint_workspace *workspace;
  const imp_fp_type *fp_solver;
  imp_fp_options fp;
  size_t blocks;
  double max_cond;
  size_t restart;
  size_t max_iter;
  double rtol;
} adjoint_config;

static adjoint_config configure(const imp_problem *p,
                                const imp_adjoint_options *opt)
{
  imp_adjoint_options o = {0};
  adjoint_config c;
  size_t dense_max;

  if (opt != NULL)
    o = *opt;
  dense_max = o.dense_max > 0 ? o.dense_max : 256;
  c.method = o.method;
  if (c.method == IMP_ADJOINT_AUTO)
    c.method = (p->jacobian != NULL || p->ny <= dense_max)
                   ? IMP_ADJOINT_DENSE_LU
                   : IMP_ADJOINT_GMRES;
  c.max_cond = o.max_cond > 0 ? o.max_cond : 1e12;
  c.restart = o.restart > 0 ? o.restart : (p->ny < 40 ? p->ny : 40);
  c.max_iter = o.max_iter > 0 ? o.max_iter : 20 * p->ny + 100;
  c.rtol = o.rtol > 0 ? o.rtol : 1e-11;
  c.fp_solver = o.fp_solver != NULL ? o.fp_solver : imp_fp_anderson;
  c.blocks = o.blocks > 0 ? o.blocks : 1;
  c.fp = o.fp;
  c.workspace = o.workspace;
  return c;
}

/*
 * Dense LU.  jac is df/dy row-major, which LAPACK reads as (df/dy)^T in
 * column-major order: factoring it as stored solves the transposed system
 * directly.
 */
struct imp_adjoint_workspace {
  double *dense; /* 2 ny^2 + 4 ny doubles: Jacobian, LU factors, work */
  int *ints;     /* 2 ny: pivots and dgecon's work */
  size_t ny;     /* the largest ny the buffers hold */
};

int imp_adjoint_workspace_create(imp_adjoint_workspace **out)
{
  if (out == NULL)
    return imp__fail(IMP_EINVAL, "adjoint_workspace_create: NULL output");
  *out = calloc(1, sizeof **out);
  return *out != NULL ? IMP_OK
                      : imp__fail(IMP_ENOMEM, "adjoint_workspace_create");
}

void imp_adjoint_workspace_free(imp_adjoint_workspace *w)
{
  if (w == NULL)
    return;
  free(w->dense);
  free(w->ints);
  free(w);
}

/* Make room for a dense solve of size ny. */
static int workspace_reserve(imp_adjoint_workspace *w, size_t ny)
{
  double *dense;
  int *ints;

  if (ny <= w->ny)
    return IMP_OK;
  if (ny > ((size_t)-1) / sizeof(double) / (2 * ny + 4))
    return imp__fail(IMP_ENOMEM, "adjoint (dense LU): ny = %zu", ny);
  dense = malloc((2 * ny * ny + 4 * ny) * sizeof(double));
  ints = malloc(2 * ny * sizeof(int));
  if (dense == NULL || ints == NULL) {
    free(dense);
    free(ints);
    return imp__fail(IMP_ENOMEM, "adjoint (dense LU): %zu x %zu Jacobian", ny,
                     ny);
  }
  free(w->dense);
  free(w->ints);
  w->dense = dense;
  w->ints = ints;
  w->ny = ny;
  return IMP_OK;
}

static int solve_dense(const imp_problem *p, const double *x, const double *y,
                       const double *theta, const double *b, double *v,
                       const adjoint_config *c, imp_adjoint_stats *st)
{
  int n = (int)p->ny, one = 1, info = 0;
  size_t nn = p->ny * p->ny, ncalls = 0;
  imp_adjoint_workspace local = {0}, *ws = c->workspace;
  double *jac, *lu, *work, anorm, rcond = 0.0;
  int *ipiv, *iwork;
  int rc;

  /* The caller's buffers, or buffers of this call alone. */
  if (ws == NULL)
    ws = &local;
  rc = workspace_reserve(ws, p->ny);
  if (rc != IMP_OK)
    return rc;
  jac = ws->dense;
  lu = jac + nn;
  work = lu + nn;
  ipiv = ws->ints;
  iwork = ipiv + p->ny;

  /* Assemble and factor. */
  rc = imp_problem_jacobian(p, x, y, theta, jac, &ncalls);
  if (p->jacobian != NULL)
    st->jacobian_calls += ncalls;
  else
    st->vjp_calls += ncalls;
  if (rc != IMP_OK)
    goto done;
  memcpy(lu, jac, nn * sizeof(double));
  anorm = dlange_("1", &n, &n, lu, &n, work, 1);
  dgetrf_(&n, &n, lu, &n, ipiv, &info);
  if (info < 0) {
    rc = imp__fail(IMP_EBACKEND, "adjoint: dgetrf argument %d invalid", -info);
    goto done;
  }

  /* Condition test before the solve: a singular matrix has no adjoint. */
  if (info == 0 && anorm > 0.0) {
    dgecon_("1", &n, lu, &n, &anorm, &rcond, work, iwork, &info, 1);
    if (info != 0)
      rcond = 0.0;
  }
  st->cond = rcond > 0.0 ? 1.0 / rcond : INFINITY;
  if (!(st->cond <= c->max_cond)) {
    rc = imp__fail(IMP_ESINGULAR,
                   "adjoint (dense LU): df/dy is singular "
                   "or ill-conditioned, estimated condition number %.3g "
                   "exceeds %.3g",
                   st->cond, c->max_cond);
    goto done;
  }
  dgetrs_("N", &n, &one, lu, &n, ipiv, v, &n, &info, 1);
  if (info != 0)
    rc = imp__fail(IMP_EBACKEND, "adjoint: dgetrs returned %d", info);

  /* The residual of the transposed system, J^T v - b. */
  if (rc == IMP_OK) {
    double bnorm = imp__nrm2(p->ny, b);

    memcpy(work, b, p->ny * sizeof(double));
    cblas_dgemv(CblasRowMajor, CblasTrans, n, n, 1.0, jac, n, v, 1, -1.0, work,
                1);
    st->residual = imp__nrm2(p->ny, work) / (bnorm > 0.0 ? bnorm : 1.0);
  }

done:
  free(local.dense);
  free(local.ints);
  return rc;
}

/* The condition number of an (rows x cols) column-major matrix from its
 * singular values; h is overwritten. */
static int hessenberg_cond(double *h, int rows, int cols, double *cond)
{
  int lwork = 5 * (rows + cols) + 64, info = 0, one = 1;
  double *s = imp__dalloc((size_t)cols), *work = imp__dalloc((size_t)lwork);

  if (s == NULL || work == NULL) {
    free(s);
    free(work);
    return imp__fail(IMP_ENOMEM, "adjoint (GMRES): singular values");
  }
  dgesvd_("N", "N", &rows, &cols, h, &rows, s, NULL, &one, NULL, &one, work,
          &lwork, &info, 1, 1);
  *cond = info == 0 && s[cols - 1] > 0.0 ? s[0] / s[cols - 1] : INFINITY;
  free(s);
  free(work);
  return IMP_OK;
}

/* w = (df/dy)^T u through the vjp. */
static int apply_transpose(const imp_problem *p, const double *x,
                           const double *y, const double *theta,
                           const double *u, double *w, imp_adjoint_stats *st)
{
  st->vjp_calls++;
  return imp_problem_vjp(p, x, y, theta, u, w, NULL, NULL);
}

/* Workspace of restarted GMRES(m) on n unknowns. */
typedef struct gmres_work {
  double *basis;   /* (m + 1) x n, the Arnoldi vectors, one per row */
  double *hess;    /* (m + 1) x m column-major, the Hessenberg matrix */
  double *tri;     /* (m + 1) x m, the same after Givens rotations */
  double *g;       /* m + 1, the rotated right-hand side */
  double *cs, *sn; /* m, the rotations */
  double *r;       /* n, residual and scratch */
} gmres_work;

static void gmres_free(gmres_work *w)
{
  free(w->basis);
  free(w->hess);
  free(w->tri);
  free(w->g);
  free(w->cs);
  free(w->sn);
  free(w->r);
}

static int gmres_alloc(gmres_work *w, size_t n, size_t m)
{
  w->basis = imp__dalloc((m + 1) * n);
  w->hess = imp__dalloc((m + 1) * m);
  w->tri = imp__dalloc((m + 1) * m);
  w->g = imp__dalloc(m + 1);
  w->cs = imp__dalloc(m);
  w->sn = imp__dalloc(m);
  w->r = imp__dalloc(n);
  if (w->basis && w->hess && w->tri && w->g && w->cs && w->sn && w->r)
    return IMP_OK;
  gmres_free(w);
  return imp__fail(IMP_ENOMEM, "adjoint (GMRES): n = %zu, restart %zu", n, m);
}

/*
 * One Arnoldi step on column j: orthogonalize w = A v_j against v_0..v_j
 * by modified Gram-Schmidt with one pass of reorthogonalization, store the
 * coefficients, and rotate the new column of the triangular factor.
 * Returns the new residual estimate |g_{j+1}|.
 */
static double arnoldi_step(gmres_work *w, size_t n, size_t m, size_t j,
                           double *next)
{
  size_t ld = m + 1;
  double *h = w->hess + j * ld, *t = w->tri + j * ld, norm, denom;

  for (size_t i = 0; i <= j; i++)
    h[i] = 0.0;
  for (int pass = 0; pass < 2; pass++)
    for (size_t i = 0; i <= j; i++) {
      double c = imp__dot(n, next, w->basis + i * n);

      h[i] += c;
      cblas_daxpy((blasint)n, -c, w->basis + i * n, 1, next, 1);
    }
  norm = imp__nrm2(n, next);
  h[j + 1] = norm;
  if (norm > 0.0)
    for (size_t k = 0; k < n; k++)
      next[k] /= norm;

  /* Apply the earlier rotations, then make the one that zeroes t[j+1]. */
  memcpy(t, h, (j + 2) * sizeof(double));
  for (size_t i = 0; i < j; i++) {
    double a = t[i], b = t[i + 1];

    t[i] = w->cs[i] * a + w->sn[i] * b;
    t[i + 1] = -w->sn[i] * a + w->cs[i] * b;
  }
  denom = hypot(t[j], t[j + 1]);
  w->cs[j] = denom > 0.0 ? t[j] / denom : 1.0;
  w->sn[j] = denom > 0.0 ? t[j + 1] / denom : 0.0;
  t[j] = denom;
  t[j + 1] = 0.0;
  w->g[j + 1] = -w->sn[j] * w->g[j];
  w->g[j] = w->cs[j] * w->g[j];
  return fabs(w->g[j + 1]);
}

/* Add the Krylov correction sum_i z_i v_i, where T z = g, to the solution.
 * Returns 0 if the triangular factor is singular. */
static int gmres_update(gmres_work *w, size_t n, size_t m, size_t k, double *v)
{
  size_t ld = m + 1;
  double *z = w->g;

  for (size_t i = k; i-- > 0;) {
    double s = z[i];

    for (size_t l = i + 1; l < k; l++)
      s -= w->tri[l * ld + i] * z[l];
    if (w->tri[i * ld + i] == 0.0)
      return 0;
    z[i] = s / w->tri[i * ld + i];
  }
  for (size_t i = 0; i < k; i++)
    cblas_daxpy((blasint)n, z[i], w->basis + i * n, 1, v, 1);
  return 1;
}

static int solve_gmres(const imp_problem *p, const double *x, const double *y,
                       const double *theta, const double *b, double *v,
                       const adjoint_config *c, imp_adjoint_stats *st)
{
  size_t n = p->ny, m = c->restart, ld = c->restart + 1;
  double bnorm = imp__nrm2(n, b), beta = bnorm, cond_max = 0.0;
  gmres_work w;
  int rc, converged = 0;

  if (bnorm == 0.0) { /* ybar = 0: the adjoint is 0 */
    memset(v, 0, n * sizeof(double));
    return IMP_OK;
  }
  IMP__TRY(gmres_alloc(&w, n, m));
  memset(v, 0, n * sizeof(double));
  memcpy(w.r, b, n * sizeof(double));

  while (!converged && st->iterations < c->max_iter) {
    size_t k = 0;
    int breakdown = 0;

    /* Start a cycle from the current residual. */
    memset(w.g, 0, ld * sizeof(double));
    w.g[0] = beta;
    for (size_t i = 0; i < n; i++)
      w.basis[i] = w.r[i] / beta;

    /* Arnoldi steps until the cycle ends, the residual is small, or the
     * Krylov space stops growing. */
    while (k < m && st->iterations < c->max_iter) {
      double *next = w.basis + (k + 1) * n, res;

      rc = apply_transpose(p, x, y, theta, w.basis + k * n, next, st);
      if (rc != IMP_OK)
        goto done;
      res = arnoldi_step(&w, n, m, k, next);
      st->iterations++;
      k++;
      breakdown = w.hess[(k - 1) * ld + k] <= DBL_EPSILON * bnorm;
      if (res <= c->rtol * bnorm || breakdown)
        break;
    }

    /* The condition of the projected operator, from a copy of H. */
    {
      double *h = imp__dalloc((k + 1) * k), cond = INFINITY;

      if (h == NULL) {
        rc = imp__fail(IMP_ENOMEM, "adjoint (GMRES): Hessenberg copy");
        goto done;
      }
      for (size_t j = 0; j < k; j++)
        memcpy(h + j * (k + 1), w.hess + j * ld, (k + 1) * sizeof(double));
      rc = hessenberg_cond(h, (int)(k + 1), (int)k, &cond);
      free(h);
      if (rc != IMP_OK)
        goto done;
      if (cond > cond_max)
        cond_max = cond;
    }
    st->cond = cond_max;
    if (!(cond_max <= c->max_cond) || !gmres_update(&w, n, m, k, v)) {
      rc = imp__fail(IMP_ESINGULAR,
                     "adjoint (GMRES): df/dy is singular or "
                     "ill-conditioned, estimated condition number %.3g "
                     "exceeds %.3g",
                     cond_max, c->max_cond);
      goto done;
    }

    /* The true residual r = b - A v decides, not the recurrence. */
    rc = apply_transpose(p, x, y, theta, v, w.r, st);
    if (rc != IMP_OK)
      goto done;
    for (size_t i = 0; i < n; i++)
      w.r[i] = b[i] - w.r[i];
    beta = imp__nrm2(n, w.r);
    st->residual = beta / bnorm;
    converged = beta <= c->rtol * bnorm * 10.0 || beta == 0.0;
    if (breakdown && !converged) {
      rc = imp__fail(IMP_ESINGULAR,
                     "adjoint (GMRES): the Krylov space "
                     "closed with residual %.3g: df/dy is singular on it",
                     st->residual);
      goto done;
    }
  }

  rc = converged ? IMP_OK
                 : imp__fail(IMP_ENOCONV,
                             "adjoint (GMRES): relative "
                             "residual %.3g after %zu iterations, wanted "
                             "%.3g",
                             st->residual, st->iterations, c->rtol);
done:
  gmres_free(&w);
  return rc;
}

/* The adjoint fixed point, u <- u - (df/dy)^T u + ybar, on the blocks the
 * fixed-point driver still has active; the others are zero, which block
 * diagonality makes harmless. */
typedef struct fixed_point_ctx {
  const imp_problem *p;
  const double *x, *y, *theta, *ybar;
  size_t d;
  double *u, *w; /* ny each */
  imp_adjoint_stats *st;
  int rc;
} fixed_point_ctx;

static int adjoint_map(void *ctx, size_t m, const size_t *idx, const double *u,
                       double *out)
{
  fixed_point_ctx *c = ctx;
  size_t d = c->d;

  memset(c->u, 0, c->p->ny * sizeof(double));
  for (size_t k = 0; k < m; k++)
    memcpy(c->u + idx[k] * d, u + k * d, d * sizeof(double));
  c->rc = apply_transpose(c->p, c->x, c->y, c->theta, c->u, c->w, c->st);
  if (c->rc != IMP_OK)
    return c->rc; /* passed on by the driver */
  for (size_t k = 0; k < m; k++) {
    size_t off = idx[k] * d;

    for (size_t i = 0; i < d; i++)
      out[k * d + i] = c->u[off + i] - c->w[off + i] + c->ybar[off + i];
  }
  return 0;
}

static int solve_fixed_point(const imp_problem *p, const double *x,
                             const double *y, const double *theta,
                             const double *ybar, double *v,
                             const adjoint_config *c, imp_adjoint_stats *st)
{
  fixed_point_ctx ctx = {
      .p = p, .x = x, .y = y, .theta = theta, .ybar = ybar, .st = st};
  imp_fp_options fo = c->fp;
  imp_fp_stats fs;
  double bnorm = imp__nrm2(p->ny, ybar);
  int rc;

  fo.max_iter = c->max_iter;
  fo.rtol = c->rtol;
  fo.atol = 0.0;
  if (p->ny % c->blocks != 0)
    return imp__fail(IMP_EINVAL,
                     "adjoint (fixed point): %zu blocks do not "
                     "divide ny = %zu",
                     c->blocks, p->ny);
  ctx.d = p->ny / c->blocks;
  ctx.u = imp__dalloc(p->ny);
  ctx.w = imp__dalloc(p->ny);
  if (ctx.u == NULL || ctx.w == NULL) {
    free(ctx.u);
    free(ctx.w);
    return imp__fail(IMP_ENOMEM, "adjoint (fixed point): ny = %zu", p->ny);
  }

  /* Solve for u from u = 0; v = -u. */
  memset(v, 0, p->ny * sizeof(double));
  rc = imp_fp_solve(c->fp_solver, adjoint_map, &ctx, c->blocks, ctx.d, v, &fo,
                    &fs, NULL, NULL);
  st->iterations = fs.iterations;
  if (rc == IMP_ENOCONV)
    rc = imp__fail(IMP_ENOCONV,
                   "adjoint (fixed point, %s): relative "
                   "residual %.3g after %zu iterations, wanted %.3g; the "
                   "map may not contract (try GMRES)",
                   c->fp_solver->name, fs.rel_residual, fs.iterations, c->rtol);
  for (size_t i = 0; i < p->ny; i++)
    v[i] = -v[i];

  /* The residual of the transposed system, ||J^T v + ybar|| / ||ybar||. */
  if (rc == IMP_OK && bnorm > 0.0) {
    rc = apply_transpose(p, x, y, theta, v, ctx.w, st);
    if (rc == IMP_OK) {
      for (size_t i = 0; i < p->ny; i++)
        ctx.w[i] += ybar[i];
      st->residual = imp__nrm2(p->ny, ctx.w) / bnorm;
    }
  }
  free(ctx.u);
  free(ctx.w);
  return rc;
}

int imp_adjoint_solve(const imp_problem *p, const double *x, const double *y,
                      const double *theta, const double *ybar, double *v,
                      double *xbar, double *thetabar,
                      const imp_adjoint_options *opt, imp_adjoint_stats *stats)
{
  imp_adjoint_stats st = {0};
  adjoint_config c;
  double *adj = NULL, *b = NULL, *gx = NULL, *gtheta = NULL;
  int rc;

  /* Check the arguments. */
  IMP__TRY(imp_problem_check(p, 1));
  if (y == NULL || ybar == NULL || (p->nx > 0 && x == NULL) ||
      (p->ntheta > 0 && theta == NULL))
    return imp__fail(IMP_EINVAL, "adjoint: NULL y, ybar, x or theta");
  if (!imp__all_finite(ybar, p->ny))
    return imp__fail(IMP_ENONFINITE, "adjoint: NaN or Inf in ybar");
  if (!imp__all_finite(y, p->ny))
    return imp__fail(IMP_ENONFINITE, "adjoint: NaN or Inf in the solution y");
  if (p->nx > 0 && !imp__all_finite(x, p->nx))
    return imp__fail(IMP_ENONFINITE, "adjoint: NaN or Inf in x");
  if (p->ntheta > 0 && !imp__all_finite(theta, p->ntheta))
    return imp__fail(IMP_ENONFINITE, "adjoint: NaN or Inf in theta");
  c = configure(p, opt);
  st.method = c.method;

  adj = imp__dalloc(p->ny);
  b = imp__dalloc(p->ny);
  gx = imp__dalloc(p->nx);
  gtheta = imp__dalloc(p->ntheta);
  if (adj == NULL || b == NULL || gx == NULL || gtheta == NULL) {
    rc = imp__fail(IMP_ENOMEM, "adjoint: work vectors");
    goto done;
  }

  /* Solve (df/dy)^T v = -ybar.  Dense LU solves in place, so v starts as
   * the right-hand side; b keeps a copy for the residual. */
  for (size_t i = 0; i < p->ny; i++)
    adj[i] = b[i] = -ybar[i];
  if (c.method == IMP_ADJOINT_DENSE_LU)
    rc = solve_dense(p, x, y, theta, b, adj, &c, &st);
  else if (c.method == IMP_ADJOINT_GMRES)
    rc = solve_gmres(p, x, y, theta, b, adj, &c, &st);
  else if (c.method == IMP_ADJOINT_FIXED_POINT)
    rc = solve_fixed_point(p, x, y, theta, ybar, adj, &c, &st);
  else
    rc = imp__fail(IMP_EINVAL, "adjoint: unknown method %d", (int)c.method);
  if (rc == IMP_OK && !imp__all_finite(adj, p->ny))
    rc = imp__fail(IMP_ENONFINITE, "adjoint: the solution has NaN or Inf");
  if (rc != IMP_OK)
    goto done;

  /* xbar += (df/dx)^T v, thetabar += (df/dtheta)^T v, through temporaries
   * so that a failing callback leaves the caller's sums untouched. */
  if (xbar != NULL || thetabar != NULL) {
    st.vjp_calls++;
    rc = imp_problem_vjp(p, x, y, theta, adj, NULL,
                         xbar != NULL && p->nx > 0 ? gx : NULL,
                         thetabar != NULL && p->ntheta > 0 ? gtheta : NULL);
    if (rc != IMP_OK)
      goto done;
    for (size_t i = 0; xbar != NULL && i < p->nx; i++)
      xbar[i] += gx[i];
    for (size_t i = 0; thetabar != NULL && i < p->ntheta; i++)
      thetabar[i] += gtheta[i];
  }
  if (v != NULL)
    memcpy(v, adj, p->ny * sizeof(double));

done:
  if (stats != NULL)
    *stats = st;
  free(adj);
  free(b);
  free(gx);
  free(gtheta);
  return rc;
}

/*
 * opt/qp_solve.c - the forward of the QP layer: a primal-dual
 * interior-point method with Mehrotra's predictor-corrector on Cholesky
 * factorizations of the reduced KKT system, for a batch of QPs (the maths
 * is at the top of imp/qp.h).
 *
 * Column-major LAPACK and row-major data meet without copies here: the
 * matrices that get factored are symmetric, and a row-major m x n matrix
 * (G, A) is read as its column-major transpose (G^T, A^T).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "opt/qp_internal.h"

/* The fraction of the way to the boundary that steps go at first, and at
 * least (step_fraction). */
#define STEP_FRACTION 0.99

/* The relative gap below which steps are refined: earlier, W is mild and
 * the step's rounding far below the residuals it reduces. */
#define REFINE_GAP 1e-6

/* Iterations without progress after which the solve gives up. */
#define STALL_LIMIT 5

/* Iterations without progress after which the steps go on with the
 * augmented system (ipm), if its order n + p + m is at most
 * AUG_MAX_ORDER (its matrix then takes at most 128 MiB). */
#define AUG_STALL_LIMIT 2
#define AUG_MAX_ORDER 4096

/* Relative size below which a certificate's direction counts as zero. */
#define DIRECTION_TOL 1e-6

/* The workspace of one QP's solve, reused across the batch. */
typedef struct ipm_work ipm_work;

struct ipm_work {
  size_t n, m, p;
  const double *Qs;             /* n x n: (Q + Q^T) / 2, Q itself or Qs_buf */
  const double *Kbase;          /* n x n: Qs + rho A^T A, Qs or Kbase_buf */
  double *Qs_buf, *Kbase_buf;   /* n x n each, where Q is not symmetric or
                                   rho > 0 */
  double *K;                    /* n x n: reduced matrix, then its factor */
  double *Gw;                   /* m x n: row i of G times sqrt(w_i) */
  double *M;                    /* n x p column-major: L^-1 A^T */
  double *S;                    /* p x p: M^T M, then its factor */
  double *z, *s, *lam, *nu;     /* the iterate: n, m, m, p */
  double *dz, *ds, *dlam, *dnu; /* a Newton step */
  double *ds_aff, *dlam_aff;    /* the predictor's step, m each */
  double *rd, *req, *rin, *rc;  /* residuals: n, p, m, m */
  double *w;                    /* m: lambda / s */
  double *Qz;                   /* n: Qs z */
  double *tn, *tm, *tp;         /* scratch: n, m, p */
  double *gl;                   /* n: G^T lambda + A^T nu (residuals) */
  double *LQ;                   /* n x n: Cholesky factor of Qs */
  double *MG;                   /* n x m column-major: LQ^-1 G^T */
  double *C;                    /* m x m: MG^T MG = G Q^-1 G^T */
  double *H;                    /* m x m: C + diag(s / lambda), its factor */
  double *u, *v0, *yl;          /* n each: the dual iteration's (see */
  double *gq, *w0, *rq, *g0;    /* m each:  ipm_dual) */
  double *rl;                   /* m: 1 / lambda (ipm_dual) */
  double *e1, *e2, *e3, *e4;    /* refinement: row residuals n, p, m, m */
  double *cz, *cs, *cl, *cnu;   /* refinement: the correction */
  double *eig, *eig_work;       /* n and 3n + 1: eigenvalues of Q */
  double rho;                   /* weight of A^T A in K (0: none) */
  int dual;                     /* this QP's steps use the dual system */
  int dual_possible;            /* the dual system's arrays are allocated */
  int q_definite;               /* Qs is definite (check_convexity) */
  double q_max;                 /* largest eigenvalue of Qs, if computed */
  double theta, rd0;            /* the dual iteration's rd = theta rd0,
                                   and |rd0|_inf */
  double x0_norm;               /* |Q^-1 p|_1 (dual_certify) */
  int factored;                 /* the factors are those of the current W */
  int aug;                      /* this QP's steps use the augmented system */
  int aug_dual, aug_failed;     /* ws->dual before it; it could not be
                                   allocated or factored */
  size_t aug_size;              /* its order N = n + p + m, once allocated */
  double *aug_k;                /* N x N: the augmented matrix, its factor */
  double *aug_rhs, *aug_work;   /* N, and dsytrf's workspace */
  int *aug_ipiv, aug_lwork;     /* N: dsytrf's pivots */
  /* Scales of the current QP. */
  double norm_p, norm_bh, length;
};

/* What one QP's solve reached. */
typedef struct ipm_result {
  size_t iterations;
  double primal, dual, gap, objective;
} ipm_result;

/* The workspace's arrays and their lengths, for allocation and release. */
#define WORK_ARRAYS 48

static void work_table(ipm_work *ws, double **ptr[WORK_ARRAYS],
                       size_t size[WORK_ARRAYS])
{
  size_t n = ws->n, m = ws->m, p = ws->p, k = 0;
  size_t md = ws->dual_possible ? m : 0;

#define ENTRY(field, count) (ptr[k] = &ws->field, size[k++] = (count))
  ENTRY(Qs_buf, n * n);
  ENTRY(Kbase_buf, n * n);
  ENTRY(K, n * n);
  ENTRY(Gw, m * n);
  ENTRY(M, n * p);
  ENTRY(S, p * p);
  ENTRY(z, n);
  ENTRY(s, m);
  ENTRY(lam, m);
  ENTRY(nu, p);
  ENTRY(dz, n);
  ENTRY(ds, m);
  ENTRY(dlam, m);
  ENTRY(dnu, p);
  ENTRY(ds_aff, m);
  ENTRY(dlam_aff, m);
  ENTRY(rd, n);
  ENTRY(req, p);
  ENTRY(rin, m);
  ENTRY(rc, m);
  ENTRY(w, m);
  ENTRY(Qz, n);
  ENTRY(tn, n);
  ENTRY(tm, m);
  ENTRY(tp, p);
  ENTRY(gl, n);
  ENTRY(LQ, n * n);
  ENTRY(MG, n * md);
  ENTRY(C, md * md);
  ENTRY(H, md * md);
  ENTRY(u, md > 0 ? n : 0);
  ENTRY(v0, md > 0 ? n : 0);
  ENTRY(yl, md > 0 ? n : 0);
  ENTRY(gq, md);
  ENTRY(w0, md);
  ENTRY(rq, md);
  ENTRY(g0, md);
  ENTRY(rl, md);
  ENTRY(e1, n);
  ENTRY(e2, p);
  ENTRY(e3, m);
  ENTRY(e4, m);
  ENTRY(cz, n);
  ENTRY(cs, m);
  ENTRY(cl, m);
  ENTRY(cnu, p);
  ENTRY(eig, n);
  ENTRY(eig_work, 3 * n + 1);
#undef ENTRY
}

static void work_free(ipm_work *ws)
{
  double **ptr[WORK_ARRAYS];
  size_t size[WORK_ARRAYS];

  free(ws->aug_k);
  free(ws->aug_rhs);
  free(ws->aug_work);
  free(ws->aug_ipiv);
  ws->aug_k = ws->aug_rhs = ws->aug_work = NULL;
  ws->aug_ipiv = NULL;

  work_table(ws, ptr, size);
  for (size_t i = 0; i < WORK_ARRAYS; i++) {
    free(*ptr[i]);
    *ptr[i] = NULL;
  }
}

static int work_alloc(ipm_work *ws, const imp_qp_dims *dims, int dual_possible)
{
  double **ptr[WORK_ARRAYS];
  size_t size[WORK_ARRAYS];
  int ok = 1;

  memset(ws, 0, sizeof *ws);
  ws->n = dims->nz;
  ws->m = dims->nineq;
  ws->p = dims->neq;
  ws->dual_possible = dual_possible;
  work_table(ws, ptr, size);
  for (size_t i = 0; i < WORK_ARRAYS; i++) {
    *ptr[i] = imp__dalloc(size[i]);
    ok &= *ptr[i] != NULL;
  }
  if (!ok) {
    work_free(ws);
    return imp__fail(IMP_ENOMEM,
                     "qp_solve: workspace for nz = %zu, "
                     "nineq = %zu, neq = %zu",
                     ws->n, ws->m, ws->p);
  }
  return IMP_OK;
}

/* |a|_inf; NaN entries are skipped (the data were checked to be finite). */
static double norm_inf(size_t n, const double *a)
{
  double r = 0.0;

  for (size_t i = 0; i < n; i++) {
    double v = fabs(a[i]);

    r = v > r ? v : r;
  }
  return r;
}

/*
 * The Cholesky factorization a = L L^T (LAPACK dpotrf, lower) of the
 * n x n column-major matrix a with leading dimension lda.  Returns 0, or
 * j > 0 if the leading minor of order j is not positive definite.
 */
static int chol_lower(int n, double *a, int lda)
{
  int info = 0;

  dpotrf_("L", &n, a, &lda, &info, 1);
  return info;
}

/* Solve L^T x = b in place (x holds b on entry), L lower triangular,
 * column-major with leading dimension lda (BLAS dtrsv). */
static void trsv_lower_trans(int n, const double *L, int lda, double *x)
{
  cblas_dtrsv(CblasColMajor, CblasLower, CblasTrans, CblasNonUnit, n, L, lda, x,
              1);
}

/*
 * Cholesky factorization (lower) in place of the n x n matrix a, which
 * build(ws, d, a) fills.  If a is not numerically definite, it is built
 * again and retried with its diagonal shifted by 1e-12, 1e-10, ... 1e-4
 * times its largest entry: the interior-point iteration corrects the
 * inexact steps that follow, since its residuals are always computed from
 * the data.  Returns 0, or non-zero if every shift failed.
 */
typedef void (*build_fn)(ipm_work *ws, const imp__qp_view *d, double *a);

static int cholesky(ipm_work *ws, const imp__qp_view *d, build_fn build,
                    double *a, size_t n)
{
  int ni = (int)n, info = 0;
  double dmax = 0.0, shift = 1e-14;

  build(ws, d, a);
  for (size_t i = 0; i < n; i++)
    dmax = fmax(dmax, fabs(a[i * n + i]));
  if (dmax == 0.0)
    dmax = 1.0;
  for (int attempt = 0; attempt < 6; attempt++) {
    if (attempt > 0) {
      build(ws, d, a);
      shift *= 100.0;
      for (size_t i = 0; i < n; i++)
        a[i * n + i] += shift * dmax;
    }
    info = chol_lower(ni, a, ni);
    if (info == 0)
      return 0;
  }
  return info;
}

/*
 * The convexity check of Q's symmetric part, whose lower triangle prepare
 * left in LQ.  A Cholesky factorization
 * whose pivots all exceed psd_tol times the largest diagonal entry proves
 * Q definite (every pivot bounds the smallest eigenvalue from above, so a
 * tiny pivot means a nearly singular Q).  Otherwise the eigenvalues decide:
 * below -psd_tol times the largest magnitude is IMP_ENONCONVEX, within
 * psd_tol of it is semidefinite (accepted, with the uniqueness test after
 * convergence), above is definite.  A definite Q's factor stays in LQ.
 */
static int check_convexity(ipm_work *ws, const imp__qp_config *c, size_t k)
{
  int ni = (int)ws->n, lwork = (int)(3 * ws->n + 1), info = 0;
  size_t n = ws->n;
  double lo, hi, scale, dmax = 0.0, pivot = INFINITY;

  info = chol_lower(ni, ws->LQ, ni);
  for (size_t i = 0; i < n; i++) {
    dmax = fmax(dmax, ws->Qs[i * n + i]);
    pivot = fmin(pivot, ws->LQ[i * n + i] * ws->LQ[i * n + i]);
  }
  ws->q_definite = info == 0 && pivot > c->psd_tol * dmax;
  if (ws->q_definite)
    return IMP_OK;

  memcpy(ws->K, ws->Qs, n * n * sizeof(double));
  dsyev_("N", "L", &ni, ws->K, &ni, ws->eig, ws->eig_work, &lwork, &info, 1, 1);
  if (info != 0)
    return imp__fail(IMP_EBACKEND, "qp (sample %zu): dsyev on Q returned %d", k,
                     info);
  lo = ws->eig[0];
  hi = ws->eig[n - 1];
  scale = fmax(fabs(lo), fabs(hi));
  ws->q_max = scale;
  if (lo < -c->psd_tol * scale)
    return imp__fail(IMP_ENONCONVEX,
                     "qp (sample %zu): Q is not positive "
                     "semidefinite: its smallest eigenvalue is %.6g (largest "
                     "%.6g), so the QP is not convex",
                     k, lo, hi);
  ws->q_definite = lo > c->psd_tol * scale;
  return IMP_OK;
}

/* The scales of one QP, for the stopping test and the certificates. */
static void measure_data(ipm_work *ws, const imp__qp_view *d)
{
  size_t n = ws->n, m = ws->m, p = ws->p;

  ws->norm_p = norm_inf(n, d->p);
  ws->norm_bh = fmax(norm_inf(p, d->b), norm_inf(m, d->h));
  ws->length = 1.0 + fmax(ws->norm_p, ws->norm_bh);
}

/* K = Qs + rho A^T A + (W^1/2 G)^T (W^1/2 G), lower triangle, from Gw. */
static void build_k(ipm_work *ws, const imp__qp_view *d, double *K)
{
  int ni = (int)ws->n, mi = (int)ws->m;

  (void)d;
  memcpy(K, ws->Kbase, ws->n * ws->n * sizeof(double));
  if (mi > 0)
    cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, ni, mi, 1.0, ws->Gw,
                ni, 1.0, K, ni);
}

/* S = M^T M = A K^-1 A^T, from M = L^-1 A^T. */
static void build_s(ipm_work *ws, const imp__qp_view *d, double *S)
{
  int ni = (int)ws->n, pi = (int)ws->p;

  (void)d;
  cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, pi, ni, 1.0, ws->M, ni,
              0.0, S, pi);
}

/*
 * The dual system's factor: H = G Q^-1 G^T + W^-1 (lower).  Returns 0, or
 * non-zero if H is not numerically definite; the solve then goes on with
 * the primal system rather than shift H.
 */
static int factor_dual(ipm_work *ws)
{
  size_t m = ws->m;
  int mi = (int)m;

  /* Only the lower triangle is read, so only it is copied. */
  for (size_t j = 0; j < m; j++) {
    memcpy(ws->H + j * m + j, ws->C + j * m + j, (m - j) * sizeof(double));
    ws->H[j * m + j] += 1.0 / ws->w[j];
  }
  return chol_lower(mi, ws->H, mi);
}

/*
 * The augmented system, where rounding stalls the others (see ipm):
 *
 *     [ Qs  A^T  G^T    ] [ dz  ]   [ -rd              ]
 *     [ A   0    0      ] [ dnu ] = [ -req             ]
 *     [ G   0    -W^-1  ] [ dl  ]   [ rc / lambda - rin ]
 *
 * of order N = n + p + m, factored by LAPACK dsytrf (Bunch-Kaufman, lower)
 * and solved by dsytrs.  It is the Newton system with ds eliminated
 * alone: W, whose entries on active rows grow like 1 / tol near the end,
 * appears only as W^-1 on the diagonal instead of entering
 * Q + G^T W G through products with G, where its rounding sets a floor
 * under the dual residual when Q is near singular or the rows of G
 * differ in scale by orders of magnitude (tests/test_qp.c,
 * test_random_families: 1e-10 to 1e-7 against tol 1e-10).  It costs an
 * N x N factorization per step, which is why it only finishes a QP.
 * The arrays are allocated at the first use; returns 0, or non-zero if
 * that fails or N exceeds AUG_MAX_ORDER.
 */
static int augmented_alloc(ipm_work *ws)
{
  size_t N = ws->n + ws->p + ws->m;
  int Ni = (int)N, info = 0, query = -1;
  double size = 0.0;

  if (ws->aug_size == N)
    return 0;
  if (N > AUG_MAX_ORDER)
    return 1;
  free(ws->aug_k); /* what an earlier failed try left */
  free(ws->aug_rhs);
  free(ws->aug_ipiv);
  free(ws->aug_work);
  ws->aug_work = NULL;
  ws->aug_k = imp__dalloc(N * N);
  ws->aug_rhs = imp__dalloc(N);
  ws->aug_ipiv = malloc(N * sizeof(int));
  if (ws->aug_k == NULL || ws->aug_rhs == NULL || ws->aug_ipiv == NULL)
    return 1;
  dsytrf_("L", &Ni, ws->aug_k, &Ni, ws->aug_ipiv, &size, &query, &info, 1);
  ws->aug_lwork = info == 0 && size >= 1.0 ? (int)size : Ni;
  ws->aug_work = imp__dalloc((size_t)ws->aug_lwork);
  if (ws->aug_work == NULL)
    return 1;
  ws->aug_size = N;
  return 0;
}

/* Returns 0, or dsytrf's info where a pivot is exactly 0. */
static int factor_augmented(ipm_work *ws, const imp__qp_view *d)
{
  size_t n = ws->n, m = ws->m, p = ws->p, N = ws->aug_size;
  int Ni = (int)N, info = 0;
  double *K = ws->aug_k;

  /* The lower triangle, column by column: Qs's, then A's and G's rows. */
  memset(K, 0, N * N * sizeof(double));
  for (size_t j = 0; j < n; j++) {
    for (size_t i = j; i < n; i++)
      K[j * N + i] = ws->Qs[i * n + j];
    for (size_t i = 0; i < p; i++)
      K[j * N + n + i] = d->A[i * n + j];
    for (size_t i = 0; i < m; i++)
      K[j * N + n + p + i] = d->G[i * n + j];
  }
  for (size_t i = 0; i < m; i++)
    K[(n + p + i) * N + n + p + i] = -1.0 / ws->w[i];
  dsytrf_("L", &Ni, K, &Ni, ws->aug_ipiv, ws->aug_work, &ws->aug_lwork, &info,
          1);
  return info;
}

static void direction_augmented(ipm_work *ws, const imp__qp_view *d,
                                const double *rd, const double *req,
                                const double *rin, const double *rc, double *dz,
                                double *ds, double *dl, double *dnu)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  int Ni = (int)ws->aug_size, one = 1, info = 0;
  double *x = ws->aug_rhs;

  for (size_t j = 0; j < n; j++)
    x[j] = -rd[j];
  for (size_t i = 0; i < p; i++)
    x[n + i] = -req[i];
  for (size_t i = 0; i < m; i++)
    x[n + p + i] = rc[i] / ws->lam[i] - rin[i];
  dsytrs_("L", &Ni, &one, ws->aug_k, &Ni, ws->aug_ipiv, x, &Ni, &info, 1);
  memcpy(dz, x, n * sizeof(double));
  memcpy(dnu, x + n, p * sizeof(double));
  memcpy(dl, x + n + p, m * sizeof(double));

  /* ds = -rin - G dz. */
  for (size_t i = 0; i < m; i++)
    ds[i] = -rin[i];
  if (m > 0)
    cblas_dgemv(CblasRowMajor, CblasNoTrans, (int)m, (int)n, -1.0, d->G, (int)n,
                dz, 1, 1.0, ds, 1);
}

/*
 * Factor the reduced matrix K = Qs + G^T W G (+ rho A^T A) and, with
 * equality constraints, the Schur complement S = A K^-1 A^T = M^T M with
 * M = L^-1 A^T; or, on the dual system, H.
 */
static int factor(ipm_work *ws, const imp__qp_view *d, size_t k)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  int ni = (int)n, pi = (int)p;

  /* Where the augmented matrix is singular in rounding (duplicated active
   * rows, whose W^-1 has gone to 0), the system before it goes on. */
  if (ws->aug) {
    if (factor_augmented(ws, d) == 0)
      return IMP_OK;
    ws->aug = 0;
    ws->aug_failed = 1;
    ws->dual = ws->aug_dual;
  }
  if (ws->dual && factor_dual(ws) == 0)
    return IMP_OK;
  ws->dual = 0;

  /* The rows of G scaled by sqrt(w), then K and its factor. */
  for (size_t i = 0; i < m; i++) {
    const double sw = sqrt(ws->w[i]);
    const double *restrict gi = d->G + i * n;
    double *restrict out = ws->Gw + i * n;

    for (size_t j = 0; j < n; j++)
      out[j] = sw * gi[j];
  }
  if (cholesky(ws, d, build_k, ws->K, n) != 0)
    return imp__fail(IMP_ESINGULAR,
                     "qp (sample %zu): the reduced KKT matrix "
                     "Q + G^T W G cannot be factored, even shifted by 1e-4 "
                     "of its diagonal",
                     k);

  /* The Schur complement of the equality constraints. */
  if (p > 0) {
    memcpy(ws->M, d->A, p * n * sizeof(double));
    cblas_dtrsm(CblasColMajor, CblasLeft, CblasLower, CblasNoTrans,
                CblasNonUnit, ni, pi, 1.0, ws->K, ni, ws->M, ni);
    if (cholesky(ws, d, build_s, ws->S, p) != 0)
      return imp__fail(IMP_ESINGULAR,
                       "qp (sample %zu): the Schur complement "
                       "A K^-1 A^T cannot be factored: A has no full row "
                       "rank",
                       k);
  }
  return IMP_OK;
}

/*
 * Solve K x + A^T u = g, A x = e with the current factors; g is
 * overwritten with x.  With rho > 0, K carries rho A^T A, so the right
 * side gets rho A^T e: the same x and u as without it.
 */
static void solve_reduced(ipm_work *ws, const imp__qp_view *d, double *g,
                          const double *e, double *u)
{
  int ni = (int)ws->n, pi = (int)ws->p;

  if (ws->rho > 0.0)
    cblas_dgemv(CblasRowMajor, CblasTrans, pi, ni, ws->rho, d->A, ni, e, 1, 1.0,
                g, 1);
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, ni, ws->K,
              ni, g, 1);
  if (pi == 0) {
    trsv_lower_trans(ni, ws->K, ni, g);
    return;
  }

  /* With y = L^-1 g: S u = M^T y - e, then x = L^-T (y - M u). */
  memcpy(u, e, ws->p * sizeof(double));
  cblas_dgemv(CblasColMajor, CblasTrans, ni, pi, 1.0, ws->M, ni, g, 1, -1.0, u,
              1);
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, pi, ws->S,
              pi, u, 1);
  trsv_lower_trans(pi, ws->S, pi, u);
  cblas_dgemv(CblasColMajor, CblasNoTrans, ni, pi, -1.0, ws->M, ni, u, 1, 1.0,
              g, 1);
  trsv_lower_trans(ni, ws->K, ni, g);
}

/*
 * The Newton direction (dz, ds, dl, dnu) for the residuals rd, req, rin
 * and the complementarity target rc (s o lambda minus the centering and
 * correction terms):
 *
 *   Q dz + G^T dl + A^T dnu = -rd,   A dz = -req,
 *   G dz + ds = -rin,                lambda o ds + s o dl = -rc.
 *
 * On the primal system, eliminating ds and dl leaves the reduced system
 * (Q + G^T W G) dz + A^T dnu = -rd - G^T ((lambda o rin - rc) / s).
 */
static void direction_primal(ipm_work *ws, const imp__qp_view *d,
                             const double *rd, const double *req,
                             const double *rin, const double *rc, double *dz,
                             double *ds, double *dl, double *dnu)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  int ni = (int)n, mi = (int)m;

  for (size_t i = 0; i < m; i++)
    ws->tm[i] = (ws->lam[i] * rin[i] - rc[i]) / ws->s[i];
  for (size_t j = 0; j < n; j++)
    dz[j] = -rd[j];
  if (m > 0)
    cblas_dgemv(CblasRowMajor, CblasTrans, mi, ni, -1.0, d->G, ni, ws->tm, 1,
                1.0, dz, 1);
  for (size_t i = 0; i < p; i++)
    ws->tp[i] = -req[i];
  solve_reduced(ws, d, dz, ws->tp, dnu);

  /* Back-substitute for the slacks and the inequality duals. */
  if (m > 0) {
    for (size_t i = 0; i < m; i++)
      ds[i] = -rin[i];
    cblas_dgemv(CblasRowMajor, CblasNoTrans, mi, ni, -1.0, d->G, ni, dz, 1, 1.0,
                ds, 1);
  }
  for (size_t i = 0; i < m; i++)
    dl[i] = -(rc[i] + ws->lam[i] * ds[i]) / ws->s[i];
}

/*
 * The same direction on the dual system (definite Q, no equalities):
 * eliminating dz = -Q^-1 (rd + G^T dl) and ds leaves
 *
 *   (G Q^-1 G^T + W^-1) dl = rin - rc / lambda - G Q^-1 rd,
 *
 * solved with LQ, MG = LQ^-1 G^T and the factor of H.
 */
static void direction_dual(ipm_work *ws, const double *rd, const double *rin,
                           const double *rc, double *dz, double *ds, double *dl)
{
  size_t n = ws->n, m = ws->m;
  int ni = (int)n, mi = (int)m;

  /* t = LQ^-1 rd, dl = H^-1 (rin - rc / lambda - MG^T t). */
  memcpy(ws->tn, rd, n * sizeof(double));
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, ni, ws->LQ,
              ni, ws->tn, 1);
  for (size_t i = 0; i < m; i++)
    dl[i] = rin[i] - rc[i] / ws->lam[i];
  cblas_dgemv(CblasColMajor, CblasTrans, ni, mi, -1.0, ws->MG, ni, ws->tn, 1,
              1.0, dl, 1);
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, mi, ws->H,
              mi, dl, 1);
  trsv_lower_trans(mi, ws->H, mi, dl);

  /* dz = -LQ^-T (t + MG dl), ds = -(rc + s o dl) / lambda. */
  cblas_dgemv(CblasColMajor, CblasNoTrans, ni, mi, 1.0, ws->MG, ni, dl, 1, 1.0,
              ws->tn, 1);
  trsv_lower_trans(ni, ws->LQ, ni, ws->tn);
  for (size_t j = 0; j < n; j++)
    dz[j] = -ws->tn[j];
  for (size_t i = 0; i < m; i++)
    ds[i] = -(rc[i] + ws->s[i] * dl[i]) / ws->lam[i];
}

static void direction(ipm_work *ws, const imp__qp_view *d, const double *rd,
                      const double *req, const double *rin, const double *rc,
                      double *dz, double *ds, double *dl, double *dnu)
{
  if (ws->aug)
    direction_augmented(ws, d, rd, req, rin, rc, dz, ds, dl, dnu);
  else if (ws->dual)
    direction_dual(ws, rd, rin, rc, dz, ds, dl);
  else
    direction_primal(ws, d, rd, req, rin, rc, dz, ds, dl, dnu);
}

/*
 * The Newton step at the current residuals.  With refined, one round of
 * iterative refinement follows: the step's residual in all four rows is
 * solved for with the same factors and subtracted.
 */
static void newton(ipm_work *ws, const imp__qp_view *d, int refined)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  int ni = (int)n, mi = (int)m, pi = (int)p;

  direction(ws, d, ws->rd, ws->req, ws->rin, ws->rc, ws->dz, ws->ds, ws->dlam,
            ws->dnu);
  if (!refined)
    return;

  /* e1 = Qs dz + G^T dl + A^T dnu + rd, e2 = A dz + req,
   * e3 = G dz + ds + rin, e4 = lambda o ds + s o dl + rc. */
  memcpy(ws->e1, ws->rd, n * sizeof(double));
  cblas_dgemv(CblasRowMajor, CblasNoTrans, ni, ni, 1.0, ws->Qs, ni, ws->dz, 1,
              1.0, ws->e1, 1);
  if (m > 0) {
    cblas_dgemv(CblasRowMajor, CblasTrans, mi, ni, 1.0, d->G, ni, ws->dlam, 1,
                1.0, ws->e1, 1);
    for (size_t i = 0; i < m; i++)
      ws->e3[i] = ws->ds[i] + ws->rin[i];
    cblas_dgemv(CblasRowMajor, CblasNoTrans, mi, ni, 1.0, d->G, ni, ws->dz, 1,
                1.0, ws->e3, 1);
  }
  for (size_t i = 0; i < m; i++)
    ws->e4[i] = ws->lam[i] * ws->ds[i] + ws->s[i] * ws->dlam[i] + ws->rc[i];
  if (p > 0) {
    cblas_dgemv(CblasRowMajor, CblasTrans, pi, ni, 1.0, d->A, ni, ws->dnu, 1,
                1.0, ws->e1, 1);
    memcpy(ws->e2, ws->req, p * sizeof(double));
    cblas_dgemv(CblasRowMajor, CblasNoTrans, pi, ni, 1.0, d->A, ni, ws->dz, 1,
                1.0, ws->e2, 1);
  }

  /* The direction for residuals e is -J^-1 e, the correction to add. */
  direction(ws, d, ws->e1, ws->e2, ws->e3, ws->e4, ws->cz, ws->cs, ws->cl,
            ws->cnu);
  cblas_daxpy(ni, 1.0, ws->cz, 1, ws->dz, 1);
  for (size_t i = 0; i < m; i++) {
    ws->ds[i] += ws->cs[i];
    ws->dlam[i] += ws->cl[i];
  }
  for (size_t i = 0; i < p; i++)
    ws->dnu[i] += ws->cnu[i];
}

/* The longest step t <= 1 / STEP_FRACTION with v + t dv >= 0: enough for
 * min(1, eta t) with any eta >= STEP_FRACTION. */
static double max_step(size_t m, const double *v, const double *dv)
{
  double t = 1.0 / STEP_FRACTION;

  for (size_t i = 0; i < m; i++)
    if (dv[i] < 0.0 && -v[i] > t * dv[i])
      t = -v[i] / dv[i];
  return t;
}

/*
 * The fraction eta of the way to the boundary that a step goes, from the
 * iterate's stopping measures: STEP_FRACTION at first, then 1 - r once
 * the largest measure r falls below 1 - STEP_FRACTION, so that steps
 * approach the boundary as fast as the iterate approaches the solution
 * (eta_k -> 1, which makes the convergence superlinear: Nocedal and
 * Wright, section 14.2).  1 - eta stays at least 0.1 tol / gap, so that
 * the last step lands near a gap of 0.1 tol instead of orders of
 * magnitude below it: weakly active or duplicated constraints (lambda_i
 * and s_i both tending to 0) would be left so near the boundary that the
 * backward's KKT Jacobian became numerically singular.  On the benchmark
 * this took the mean from 7.73 to 7.56 iterations at tol 1e-7 and from
 * 9.34 to 8.54 at 1e-10; on 600 random QPs, by 7 and 16%.
 */
static double step_fraction(const imp__qp_config *c, const ipm_result *res)
{
  double r = fmax(res->gap, fmax(res->primal, res->dual));

  if (res->gap > 0.0)
    r = fmax(r, 0.1 * c->tol / res->gap);
  return 1.0 - fmin(1.0 - STEP_FRACTION, r);
}

/*
 * Residuals of the current iterate and the three stopping measures, each
 * relative to the size of the terms it balances, so that rounding in
 * large terms (a large Q z against a small p) does not set a floor.
 */
static void residuals(ipm_work *ws, const imp__qp_view *d, ipm_result *res)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  int ni = (int)n, mi = (int)m, pi = (int)p;
  double gap = 0.0, dual_scale, primal_scale;

  /* rd = Qs z + p + G^T lambda + A^T nu, keeping gl = G^T lambda +
   * A^T nu for the certificate, which must not take it from rd - Qs z - p:
   * that difference cancels to rounding where the duals are small. */
  cblas_dgemv(CblasRowMajor, CblasNoTrans, ni, ni, 1.0, ws->Qs, ni, ws->z, 1,
              0.0, ws->Qz, 1);
  dual_scale = fmax(norm_inf(n, ws->Qz), ws->norm_p);
  memset(ws->gl, 0, n * sizeof(double));
  if (m > 0) {
    cblas_dgemv(CblasRowMajor, CblasTrans, mi, ni, 1.0, d->G, ni, ws->lam, 1,
                0.0, ws->gl, 1);
    dual_scale = fmax(dual_scale, norm_inf(n, ws->gl));
  }
  if (p > 0) {
    cblas_dgemv(CblasRowMajor, CblasTrans, pi, ni, 1.0, d->A, ni, ws->nu, 1,
                0.0, ws->tn, 1);
    dual_scale = fmax(dual_scale, norm_inf(n, ws->tn));
    cblas_daxpy(ni, 1.0, ws->tn, 1, ws->gl, 1);
  }
  for (size_t j = 0; j < n; j++)
    ws->rd[j] = ws->Qz[j] + d->p[j] + ws->gl[j];

  /* req = A z - b, rin = G z + s - h. */
  primal_scale = ws->norm_bh;
  if (p > 0) {
    cblas_dgemv(CblasRowMajor, CblasNoTrans, pi, ni, 1.0, d->A, ni, ws->z, 1,
                0.0, ws->req, 1);
    primal_scale = fmax(primal_scale, norm_inf(p, ws->req));
  }
  for (size_t i = 0; i < p; i++)
    ws->req[i] -= d->b[i];
  if (m > 0) {
    cblas_dgemv(CblasRowMajor, CblasNoTrans, mi, ni, 1.0, d->G, ni, ws->z, 1,
                0.0, ws->rin, 1);
    primal_scale = fmax(primal_scale, norm_inf(m, ws->rin));
  }
  for (size_t i = 0; i < m; i++) {
    ws->rin[i] += ws->s[i] - d->h[i];
    gap += ws->s[i] * ws->lam[i];
  }

  res->objective = 0.5 * imp__dot(n, ws->z, ws->Qz) + imp__dot(n, d->p, ws->z);
  res->primal =
      fmax(norm_inf(p, ws->req), norm_inf(m, ws->rin)) / (1.0 + primal_scale);
  res->dual = norm_inf(n, ws->rd) / (1.0 + dual_scale);
  res->gap = gap / (1.0 + fabs(res->objective));
}

/* The failure for duals that certify infeasibility: t = -(h^T lambda +
 * b^T nu) > 0 and rn = |G^T lambda + A^T nu|_inf. */
static int infeasible(size_t k, double t, double rn, const ipm_result *res)
{
  return imp__fail(IMP_EINFEASIBLE,
                   "qp (sample %zu) is infeasible: the duals "
                   "certify that no feasible z has |z|_1 < %.3g "
                   "(|G'lambda + A'nu|_inf = %.3g, -(h'lambda + b'nu) = "
                   "%.3g); primal residual %.3g after %zu iterations",
                   k, rn > 0.0 ? t / rn : INFINITY, rn, t, res->primal,
                   res->iterations);
}

/*
 * The certificates of imp/qp.h, from the current iterate: the duals may
 * prove that nothing within the radius is feasible, or z may have run off
 * along a direction of recession and descent.
 */
static int certify(ipm_work *ws, const imp__qp_view *d, const imp__qp_config *c,
                   size_t k, const ipm_result *res)
{
  size_t n = ws->n, m = ws->m, p = ws->p;
  double radius = c->radius * ws->length, t, rn, zn;

  /* Infeasibility: t = -(h^T lambda + b^T nu) against G^T lambda + A^T nu,
   * kept by residuals. */
  t = -imp__dot(m, d->h, ws->lam) - imp__dot(p, d->b, ws->nu);
  rn = norm_inf(n, ws->gl);
  if (t > 0.0 && radius * rn < t)
    return infeasible(k, t, rn, res);

  /* Unboundedness: d = z / |z|_inf with A z = req + b, G z = rin + h - s. */
  zn = norm_inf(n, ws->z);
  if (zn > radius) {
    double pd = imp__dot(n, d->p, ws->z) / zn;
    double qd = norm_inf(n, ws->Qz) / zn, ad = 0.0, gd = -INFINITY;

    for (size_t i = 0; i < p; i++)
      ad = fmax(ad, fabs(ws->req[i] + d->b[i]) / zn);
    for (size_t i = 0; i < m; i++)
      gd = fmax(gd, (ws->rin[i] + d->h[i] - ws->s[i]) / zn);
    /* The matrices' scales are needed only here, so they are measured
     * here, once z has grown past the radius. */
    if (pd < -DIRECTION_TOL * ws->norm_p &&
        qd <= DIRECTION_TOL * norm_inf(n * n, ws->Qs) &&
        ad <= DIRECTION_TOL * norm_inf(p * n, d->A) &&
        gd <= DIRECTION_TOL * norm_inf(m * n, d->G))
      return imp__fail(IMP_EUNBOUNDED,
                       "qp (sample %zu) is unbounded below: "
                       "|z|_inf = %.3g and along d = z / |z|_inf, p'd = %.3g, "
                       "|Qd|_inf = %.3g, |Ad|_inf = %.3g, max(Gd) = %.3g; "
                       "objective %.3g after %zu iterations",
                       k, zn, pd, qd, ad, m > 0 ? gd : 0.0, res->objective,
                       res->iterations);
  }
  return IMP_OK;
}

/*
 * For a semidefinite Q, the minimizer is unique when Q is definite on the
 * null space of the equality rows and the active inequality rows.  That
 * null space comes from the SVD of those rows, stacked as the columns of
 * an n x r matrix C^T: its left singular vectors past the rank.
 */
static int check_unique(ipm_work *ws, const imp__qp_view *d,
                        const imp__qp_config *c, size_t k)
{
  size_t n = ws->n, m = ws->m, p = ws->p, r = p, rank = 0, kn;
  int ni = (int)n, ri, one = 1, info = 0, lwork = -1;
  double *C, *U, *sv, *T, *H, query = 0.0, *work = NULL, lo;
  int rc = IMP_OK;

  for (size_t i = 0; i < m; i++)
    r += ws->lam[i] >= ws->s[i];
  ri = (int)r;
  C = imp__dalloc(n * r);
  U = imp__dalloc(n * n);
  sv = imp__dalloc(n + r);
  T = imp__dalloc(n * n);
  H = imp__dalloc(n * n);
  if (C == NULL || U == NULL || sv == NULL || T == NULL || H == NULL) {
    rc = imp__fail(IMP_ENOMEM, "qp (sample %zu): uniqueness test", k);
    goto done;
  }

  /* The rank of the constraint rows and the null space's basis. */
  if (p > 0)
    memcpy(C, d->A, p * n * sizeof(double));
  for (size_t i = 0, j = p; i < m; i++)
    if (ws->lam[i] >= ws->s[i])
      memcpy(C + n * j++, d->G + i * n, n * sizeof(double));
  if (r > 0) {
    dgesvd_("A", "N", &ni, &ri, C, &ni, sv, U, &ni, NULL, &one, &query, &lwork,
            &info, 1, 1);
    lwork = (int)query + 1;
    work = imp__dalloc((size_t)lwork);
    if (work == NULL) {
      rc = imp__fail(IMP_ENOMEM, "qp (sample %zu): SVD workspace", k);
      goto done;
    }
    dgesvd_("A", "N", &ni, &ri, C, &ni, sv, U, &ni, NULL, &one, work, &lwork,
            &info, 1, 1);
    if (info != 0) {
      rc = imp__fail(IMP_EBACKEND, "qp (sample %zu): dgesvd returned %d", k,
                     info);
      goto done;
    }
    for (size_t i = 0; i < (n < r ? n : r); i++)
      rank += sv[i] > sv[0] * (double)(n > r ? n : r) * 10.0 * DBL_EPSILON;
  } else {
    for (size_t i = 0; i < n; i++)
      U[i * n + i] = 1.0;
  }
  kn = n - rank;
  if (kn == 0)
    goto done;

  /* H = N^T Qs N on the null space N = U[:, rank:], and its eigenvalues. */
  {
    int ki = (int)kn, hw = (int)(n * n + 3 * n);
    const double *N = U + rank * n;

    cblas_dgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, ni, ki, ni, 1.0,
                ws->Qs, ni, N, ni, 0.0, T, ni);
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, ki, ki, ni, 1.0, N, ni,
                T, ni, 0.0, H, ki);
    free(work);
    work = imp__dalloc(n * n + 3 * n);
    if (work == NULL) {
      rc = imp__fail(IMP_ENOMEM, "qp (sample %zu): eigenvalue workspace", k);
      goto done;
    }
    dsyev_("N", "L", &ki, H, &ki, sv, work, &hw, &info, 1, 1);
    if (info != 0) {
      rc = imp__fail(IMP_EBACKEND, "qp (sample %zu): dsyev returned %d", k,
                     info);
      goto done;
    }
    lo = sv[0];
  }
  if (lo <= c->psd_tol * ws->q_max)
    rc = imp__fail(IMP_ESINGULAR,
                   "qp (sample %zu): Q is only positive "
                   "semidefinite and the minimizer is not unique: on the "
                   "%zu-dimensional null space of the equality and active "
                   "inequality rows, Q's smallest eigenvalue is %.3g",
                   k, kn, lo);

done:
  free(C);
  free(U);
  free(sv);
  free(T);
  free(H);
  free(work);
  return rc;
}

/*
 * The interior point of both starts, from the W = I solution, in which
 * s0 = -lambda0: s = lambda = |lambda0| + max(1, mean |lambda0|), entry by
 * entry.  Both are positive, each entry moved by at most
 * 2 |lambda0_i| plus the shift, and their ratio W = I is the one the
 * start just factored, so the first iteration reuses its factors.
 * Shifting s and lambda by separate constants instead leaves W != I and
 * costs one more factorization, for as many iterations or more (7.80
 * against 7.73 on average on the benchmark at tol 1e-7, 9.41 against
 * 9.34 at 1e-10, with the step fraction held at 0.99).
 */
static void start_point(ipm_work *ws, const double *lam0)
{
  size_t m = ws->m;
  double shift = 0.0;

  for (size_t i = 0; i < m; i++)
    shift += fabs(lam0[i]);
  shift = fmax(1.0, m > 0 ? shift / (double)m : 0.0);
  for (size_t i = 0; i < m; i++)
    ws->s[i] = ws->lam[i] = fabs(lam0[i]) + shift;
  ws->factored = 1;
}

/*
 * The start point: minimize 1/2 z^T Q z + p^T z + 1/2 |G z - h|^2 subject
 * to A z = b.  That is the Newton direction at z = 0, s = lambda = 1 with
 * the residuals rd = p, req = -b, rin = -h and rc = 0, which gives z, nu,
 * s = h - G z and lambda = G z - h; then start_point moves s and lambda
 * inside.
 */
static int start(ipm_work *ws, const imp__qp_view *d, size_t k)
{
  size_t n = ws->n, m = ws->m, p = ws->p;

  for (size_t i = 0; i < m; i++) {
    ws->w[i] = ws->s[i] = ws->lam[i] = 1.0;
    ws->rin[i] = -d->h[i];
    ws->rc[i] = 0.0;
  }
  for (size_t i = 0; i < p; i++)
    ws->req[i] = -d->b[i];
  memcpy(ws->rd, d->p, n * sizeof(double));
  IMP__TRY(factor(ws, d, k));
  direction(ws, d, ws->rd, ws->req, ws->rin, ws->rc, ws->z, ws->ds, ws->dlam,
            ws->nu);
  start_point(ws, ws->dlam);
  return IMP_OK;
}

/*
 * The iteration on the dual system, without z.  Every Newton step of the
 * KKT conditions solves their first row exactly, so the dual residual
 * rd = Qs z + p + G^T lambda only shrinks, rd = theta rd0 with
 * theta = prod (1 - alpha) over the steps taken, and z is a function of
 * lambda and theta:
 *
 *     z = -Q^-1 (p + G^T lambda - theta rd0) = -LQ^-T yl,
 *     yl = u + MG lambda - theta v0,   u = LQ^-1 p,   v0 = LQ^-1 rd0.
 *
 * With w0 = MG^T v0 = G Q^-1 rd0, all the iteration needs comes from yl:
 * G z = -MG^T yl, so rin = (s - h) - MG^T yl; the right side of
 * direction_dual is rq - rc / lambda with rq = rin - theta w0; and the
 * objective is f = 1/2 |yl|^2 - u^T yl.  An iteration thus forms neither z
 * nor any product with Q or G: two products with MG, the factorization of
 * H and two pairs of triangular solves with it.  z is formed once, at the
 * end, and the KKT residuals are then computed from it and the data as
 * everywhere else.
 *
 * In exact arithmetic the iterates are those of the full iteration.  In
 * rounding the order of the sums matters: p + G^T lambda cancels to about
 * Q z, and summed first (in yl), its rounding stays in the range of G,
 * where C is definite, instead of entering rin on its own.  rin is then as
 * accurate as G z + s - h even where C is singular and diag(s / lambda)
 * small (duals that are not unique, as in test_dual_degenerate), while
 * s - C lambda - q, the same number in exact arithmetic, would carry the
 * rounding of C lambda ~ G Q^-1 p into the null space of C.
 *
 * The step is not refined here, unlike on the primal system, where the
 * wide range of W enters Q + G^T W G through products with G.  Here it
 * only adds to H's diagonal, and one round of refinement (a product with
 * C and two more solves per step) changed neither the iteration counts
 * nor the solutions, in the tests and on 600 random QPs (duplicated rows,
 * rows scaled over six orders of magnitude, Q near singular) at
 * tolerances from 1e-7 to 1e-13.
 */

/* z = -LQ^-T yl, for the yl of the last dual_residuals. */
static void dual_z(ipm_work *ws)
{
  memcpy(ws->z, ws->yl, ws->n * sizeof(double));
  trsv_lower_trans((int)ws->n, ws->LQ, (int)ws->n, ws->z);
  for (size_t j = 0; j < ws->n; j++)
    ws->z[j] = -ws->z[j];
}

/* The step for the complementarity target rc, with H factored:
 * dl = H^-1 (rq - rc / lambda), ds = -(rc + s o dl) / lambda, the
 * divisions by lambda as products with rl = 1 / lambda. */
static void dual_step(ipm_work *ws, const double *rc, double *ds, double *dl)
{
  size_t m = ws->m;
  int mi = (int)m;

  for (size_t i = 0; i < m; i++)
    dl[i] = ws->rq[i] - rc[i] * ws->rl[i];
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, mi, ws->H,
              mi, dl, 1);
  trsv_lower_trans(mi, ws->H, mi, dl);
  for (size_t i = 0; i < m; i++)
    ds[i] = -(rc[i] + ws->s[i] * dl[i]) * ws->rl[i];
}

/* yl, rin, rq and the stopping measures of the iterate, as above.  The
 * dual residual's scale is taken as |p| alone, which can only overstate
 * it. */
static void dual_residuals(ipm_work *ws, const imp__qp_view *d, ipm_result *res)
{
  size_t n = ws->n, m = ws->m;
  int ni = (int)n, mi = (int)m;
  double gap = 0.0;

  for (size_t j = 0; j < n; j++)
    ws->yl[j] = ws->u[j] - ws->theta * ws->v0[j];
  cblas_dgemv(CblasColMajor, CblasNoTrans, ni, mi, 1.0, ws->MG, ni, ws->lam, 1,
              1.0, ws->yl, 1);
  cblas_dgemv(CblasColMajor, CblasTrans, ni, mi, 1.0, ws->MG, ni, ws->yl, 1,
              0.0, ws->gq, 1);
  for (size_t i = 0; i < m; i++) {
    ws->rin[i] = (ws->s[i] - d->h[i]) - ws->gq[i];
    ws->rq[i] = ws->rin[i] - ws->theta * ws->w0[i];
    gap += ws->s[i] * ws->lam[i];
  }
  res->objective =
      0.5 * imp__dot(n, ws->yl, ws->yl) - imp__dot(n, ws->u, ws->yl);
  res->primal =
      norm_inf(m, ws->rin) / (1.0 + fmax(ws->norm_bh, norm_inf(m, ws->gq)));
  res->dual = ws->theta * ws->rd0 / (1.0 + ws->norm_p);
  res->gap = gap / (1.0 + fabs(res->objective));
}

/*
 * The infeasibility certificate of certify, on the dual iterate.  It needs
 * |G^T lambda|_inf, a product with G that an iteration otherwise does
 * without, so a bound rules it out first: for any x,
 * |G^T lambda|_inf >= |(G x)^T lambda| / |x|_1, and x0 = Q^-1 p has
 * G x0 = g0 = MG^T u at hand.  Where radius times that bound is at least
 * 2 t, with t = -h^T lambda, no certificate can hold.  Along a ray that
 * certifies infeasibility G^T lambda stays bounded while t grows, and
 * g0^T lambda = x0^T G^T lambda stays bounded with it, so there the bound
 * fails and G^T lambda is formed.  The QP cannot be unbounded, Q being
 * definite.
 */
static int dual_certify(ipm_work *ws, const imp__qp_view *d,
                        const imp__qp_config *c, size_t k,
                        const ipm_result *res)
{
  int ni = (int)ws->n, mi = (int)ws->m;
  double t = -imp__dot(ws->m, d->h, ws->lam), radius, rn;

  if (!(t > 0.0))
    return IMP_OK;
  radius = c->radius * ws->length;
  if (ws->x0_norm > 0.0 &&
      radius * fabs(imp__dot(ws->m, ws->g0, ws->lam)) >= 2.0 * t * ws->x0_norm)
    return IMP_OK;
  cblas_dgemv(CblasRowMajor, CblasTrans, mi, ni, 1.0, d->G, ni, ws->lam, 1, 0.0,
              ws->tn, 1);
  rn = norm_inf(ws->n, ws->tn);
  if (radius * rn < t)
    return infeasible(k, t, rn, res);
  return IMP_OK;
}

/*
 * The start of start(), in these variables: (C + I) lambda0 =
 * -(h + MG^T u) gives the W = I solution (z(lambda0), s0 = -lambda0,
 * lambda0), and start_point moves s and lambda inside.  z stays where it
 * was, so the dual residual is rd0 = G^T delta = LQ v0 with
 * delta = lambda - lambda0 and v0 = MG delta, and theta = 1.  Also g0 and
 * |Q^-1 p|_1 for dual_certify.  Returns non-zero if C + I cannot be
 * factored.
 */
static int dual_start(ipm_work *ws, const imp__qp_view *d)
{
  size_t n = ws->n, m = ws->m;
  int ni = (int)n, mi = (int)m;

  /* u = LQ^-1 p, g0 = MG^T u = G Q^-1 p, and |Q^-1 p|_1 = |LQ^-T u|_1. */
  memcpy(ws->u, d->p, n * sizeof(double));
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, ni, ws->LQ,
              ni, ws->u, 1);
  cblas_dgemv(CblasColMajor, CblasTrans, ni, mi, 1.0, ws->MG, ni, ws->u, 1, 0.0,
              ws->g0, 1);
  memcpy(ws->tn, ws->u, n * sizeof(double));
  trsv_lower_trans(ni, ws->LQ, ni, ws->tn);
  ws->x0_norm = cblas_dasum(ni, ws->tn, 1);

  /* The W = I solution, and the interior point. */
  for (size_t i = 0; i < m; i++) {
    ws->dlam[i] = -d->h[i] - ws->g0[i];
    ws->w[i] = 1.0;
  }
  if (factor_dual(ws) != 0)
    return 1;
  cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, mi, ws->H,
              mi, ws->dlam, 1);
  trsv_lower_trans(mi, ws->H, mi, ws->dlam);
  start_point(ws, ws->dlam);

  /* The dual residual the move of lambda leaves. */
  for (size_t i = 0; i < m; i++)
    ws->tm[i] = ws->lam[i] - ws->dlam[i];
  cblas_dgemv(CblasColMajor, CblasNoTrans, ni, mi, 1.0, ws->MG, ni, ws->tm, 1,
              0.0, ws->v0, 1);
  cblas_dgemv(CblasColMajor, CblasTrans, ni, mi, 1.0, ws->MG, ni, ws->v0, 1,
              0.0, ws->w0, 1);
  memcpy(ws->tn, ws->v0, n * sizeof(double));
  cblas_dtrmv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, ni, ws->LQ,
              ni, ws->tn, 1);
  ws->rd0 = norm_inf(n, ws->tn);
  ws->theta = 1.0;
  return 0;
}

/* Iterations in a row in which the gap is below tol but the larger
 * residual has not halved against the best so far (*best, updated), given
 * the count before this iterate: rounding, not the method, then limits
 * the residuals. */
static size_t stall_count(size_t stalled, double *best, const imp__qp_config *c,
                          const ipm_result *res)
{
  double merit = fmax(res->primal, res->dual);

  stalled = merit < 0.5 * *best || res->gap > c->tol ? 0 : stalled + 1;
  *best = fmin(*best, merit);
  return stalled;
}

/*
 * The iteration of ipm on the dual QP, from dual_start.  It ends with z
 * formed and the KKT residuals from the data in ws and res; *done is 1 if
 * those meet the tolerance.  Otherwise ipm goes on from that iterate with
 * the full iteration: on the primal system where H stopped being
 * numerically definite (ws->dual is then 0), else on the dual one (where
 * the residuals of the formed z missed the tolerance, the iteration
 * stalled, or max_iter was reached, which ipm then reports).
 */
static int ipm_dual(ipm_work *ws, const imp__qp_view *d,
                    const imp__qp_config *c, size_t k, ipm_result *res,
                    int *done)
{
  size_t m = ws->m, stalled = 0;
  double best = INFINITY;

  *done = 0;
  if (dual_start(ws, d) != 0) {
    ws->dual = 0;
    return start(ws, d, k);
  }

  for (;;) {
    double alpha, mu, mu_aff, sigma;

    /* Test the iterate, as ipm does. */
    dual_residuals(ws, d, res);
    if (res->primal <= c->tol && res->dual <= c->tol && res->gap <= c->tol)
      break;
    IMP__TRY(dual_certify(ws, d, c, k, res));
    if (res->iterations >= c->max_iter)
      break;
    stalled = stall_count(stalled, &best, c, res);
    if (stalled >= STALL_LIMIT)
      break;

    /* Factor at W = diag(lambda / s), unless the start did; the primal
     * system takes over where H is not numerically definite. */
    for (size_t i = 0; i < m; i++) {
      ws->w[i] = ws->lam[i] / ws->s[i];
      ws->rl[i] = 1.0 / ws->lam[i];
    }
    if (ws->factored)
      ws->factored = 0;
    else if (factor_dual(ws) != 0) {
      ws->dual = 0;
      break;
    }

    /* Predictor and corrector, as in ipm. */
    for (size_t i = 0; i < m; i++)
      ws->rc[i] = ws->s[i] * ws->lam[i];
    dual_step(ws, ws->rc, ws->ds, ws->dlam);
    alpha = fmin(
        1.0, fmin(max_step(m, ws->s, ws->ds), max_step(m, ws->lam, ws->dlam)));
    mu = imp__dot(m, ws->s, ws->lam) / (double)m;
    mu_aff = 0.0;
    for (size_t i = 0; i < m; i++)
      mu_aff +=
          (ws->s[i] + alpha * ws->ds[i]) * (ws->lam[i] + alpha * ws->dlam[i]);
    mu_aff /= (double)m;
    sigma = mu > 0.0 ? pow(mu_aff / mu, 3.0) : 0.0;
    for (size_t i = 0; i < m; i++)
      ws->rc[i] = ws->s[i] * ws->lam[i] + ws->ds[i] * ws->dlam[i] - sigma * mu;
    dual_step(ws, ws->rc, ws->ds, ws->dlam);
    alpha =
        fmin(1.0, step_fraction(c, res) * fmin(max_step(m, ws->s, ws->ds),
                                               max_step(m, ws->lam, ws->dlam)));

    /* Step. */
    for (size_t i = 0; i < m; i++) {
      ws->s[i] += alpha * ws->ds[i];
      ws->lam[i] += alpha * ws->dlam[i];
    }
    ws->theta *= 1.0 - alpha;
    res->iterations++;
    if (!imp__all_finite(ws->lam, m) || !imp__all_finite(ws->s, m))
      return imp__fail(IMP_ENONFINITE,
                       "qp (sample %zu): the iterate became "
                       "NaN or Inf after %zu iterations",
                       k, res->iterations);
  }

  /* z, and the KKT residuals from it and the data; the full iteration, if
   * it follows, factors afresh. */
  dual_z(ws);
  residuals(ws, d, res);
  ws->factored = 0;
  *done = ws->dual && res->primal <= c->tol && res->dual <= c->tol &&
          res->gap <= c->tol;
  return IMP_OK;
}

/* One QP: iterate to tolerance, or to a certificate, or out of budget. */
static int ipm(ipm_work *ws, const imp__qp_view *d, const imp__qp_config *c,
               size_t k, double *y, ipm_result *res)
{
  size_t n = ws->n, m = ws->m, p = ws->p, stalled = 0;
  double best = INFINITY;
  int converged = 0;

  memset(res, 0, sizeof *res);
  measure_data(ws, d);
  ws->factored = 0;
  ws->aug = ws->aug_failed = 0;
  if (ws->dual)
    IMP__TRY(ipm_dual(ws, d, c, k, res, &converged));
  else
    IMP__TRY(start(ws, d, k));

  while (!converged) {
    double alpha, mu, mu_aff, sigma;
    int refined;

    /* Test the iterate. */
    residuals(ws, d, res);
    if (res->primal <= c->tol && res->dual <= c->tol && res->gap <= c->tol) {
      converged = 1;
      break;
    }
    IMP__TRY(certify(ws, d, c, k, res));
    if (res->iterations >= c->max_iter)
      break;

    /* Near the end of the central path (gap below tol), rounding limits
     * how far the residuals can fall.  Once the worst of them has not
     * halved in AUG_STALL_LIMIT iterations, the steps go on with the
     * augmented system, whose rounding does not carry W's large entries
     * (see augmented_alloc); the iteration stops once that too has not
     * halved them in STALL_LIMIT iterations. */
    stalled = stall_count(stalled, &best, c, res);
    if (!ws->aug && !ws->aug_failed && stalled >= AUG_STALL_LIMIT) {
      ws->aug_failed = augmented_alloc(ws) != 0;
      if (!ws->aug_failed) {
        imp__log(IMP_LOG_INFO,
                 "qp (sample %zu): rounding stalled the residuals after "
                 "%zu iterations; going on with the augmented system",
                 k, res->iterations);
        ws->aug = 1;
        ws->aug_dual = ws->dual;
        ws->dual = 0;
        ws->factored = 0;
        stalled = 0;
        best = INFINITY;
      }
    }
    if (stalled >= STALL_LIMIT)
      break;

    /* Factor at W = diag(lambda / s), unless the start did. */
    for (size_t i = 0; i < m; i++)
      ws->w[i] = ws->lam[i] / ws->s[i];
    if (ws->factored)
      ws->factored = 0;
    else
      IMP__TRY(factor(ws, d, k));

    /* Predictor: the affine step, aiming at s o lambda = 0.  Only the step
     * taken is refined: without inequalities, this one. */
    for (size_t i = 0; i < m; i++)
      ws->rc[i] = ws->s[i] * ws->lam[i];
    refined = m == 0 || res->gap < REFINE_GAP;
    newton(ws, d, m == 0);
    alpha = fmin(
        1.0, fmin(max_step(m, ws->s, ws->ds), max_step(m, ws->lam, ws->dlam)));
    mu = m > 0 ? imp__dot(m, ws->s, ws->lam) / (double)m : 0.0;
    mu_aff = 0.0;
    for (size_t i = 0; i < m; i++)
      mu_aff +=
          (ws->s[i] + alpha * ws->ds[i]) * (ws->lam[i] + alpha * ws->dlam[i]);
    mu_aff = m > 0 ? mu_aff / (double)m : 0.0;
    sigma = mu > 0.0 ? pow(mu_aff / mu, 3.0) : 0.0;

    /* Corrector: centering sigma mu and the second-order term. */
    if (m > 0) {
      memcpy(ws->ds_aff, ws->ds, m * sizeof(double));
      memcpy(ws->dlam_aff, ws->dlam, m * sizeof(double));
      for (size_t i = 0; i < m; i++)
        ws->rc[i] = ws->s[i] * ws->lam[i] + ws->ds_aff[i] * ws->dlam_aff[i] -
                    sigma * mu;
      newton(ws, d, refined);
    }
    alpha =
        fmin(1.0, step_fraction(c, res) * fmin(max_step(m, ws->s, ws->ds),
                                               max_step(m, ws->lam, ws->dlam)));

    /* Step. */
    cblas_daxpy((int)n, alpha, ws->dz, 1, ws->z, 1);
    for (size_t i = 0; i < m; i++) {
      ws->s[i] += alpha * ws->ds[i];
      ws->lam[i] += alpha * ws->dlam[i];
    }
    for (size_t i = 0; i < p; i++)
      ws->nu[i] += alpha * ws->dnu[i];
    res->iterations++;
    if (!imp__all_finite(ws->z, n))
      return imp__fail(IMP_ENONFINITE,
                       "qp (sample %zu): the iterate became "
                       "NaN or Inf after %zu iterations",
                       k, res->iterations);
  }

  if (!converged)
    return imp__fail(IMP_ENOCONV,
                     "qp (sample %zu): no convergence in %zu "
                     "iterations%s: primal residual %.3g, dual residual "
                     "%.3g, gap %.3g (tolerance %.3g), and no certificate of "
                     "infeasibility or unboundedness",
                     k, res->iterations,
                     stalled >= STALL_LIMIT ? " (stalled)" : "", res->primal,
                     res->dual, res->gap, c->tol);
  if (!ws->q_definite)
    IMP__TRY(check_unique(ws, d, c, k));

  memcpy(y, ws->z, n * sizeof(double));
  memcpy(y + n, ws->lam, m * sizeof(double));
  memcpy(y + n + m, ws->nu, p * sizeof(double));
  return IMP_OK;
}

/* 1 if the n x n matrix a equals its transpose, compared in tiles.  On
 * the way its lower triangle (column-major, the same numbers where a is
 * symmetric) is copied to lower, which saves the convexity check's
 * factorization a pass of its own over Q. */
static int symmetric_copy(const double *a, size_t n, double *lower)
{
  for (size_t i0 = 0; i0 < n; i0 += 16)
    for (size_t j0 = 0; j0 <= i0; j0 += 16)
      for (size_t i = i0; i < i0 + 16 && i < n; i++)
        for (size_t j = j0; j < j0 + 16 && j < i; j++) {
          const double v = a[j * n + i];

          if (a[i * n + j] != v)
            return 0;
          lower[j * n + i] = v;
        }
  for (size_t i = 0; i < n; i++)
    lower[i * n + i] = a[i * n + i];
  return 1;
}

/* Per-QP set-up that depends only on Q and A: Qs, the convexity check
 * and K's constant part Qs + rho A^T A.  A symmetric Q is used as it is,
 * and so is Qs where rho = 0, which keeps the working set small. */
static int prepare(ipm_work *ws, const imp__qp_view *d, const imp__qp_config *c,
                   size_t k)
{
  size_t n = ws->n, p = ws->p;
  double qn, an;

  /* Qs = (Q + Q^T) / 2, in tiles of 16 x 16 for the transposed reads, and
   * its lower triangle in LQ for the convexity check. */
  if (symmetric_copy(d->Q, n, ws->LQ))
    ws->Qs = d->Q;
  else {
    for (size_t i0 = 0; i0 < n; i0 += 16)
      for (size_t j0 = 0; j0 < n; j0 += 16)
        for (size_t i = i0; i < i0 + 16 && i < n; i++)
          for (size_t j = j0; j < j0 + 16 && j < n; j++)
            ws->Qs_buf[i * n + j] = 0.5 * (d->Q[i * n + j] + d->Q[j * n + i]);
    ws->Qs = ws->Qs_buf;
    memcpy(ws->LQ, ws->Qs, n * n * sizeof(double));
  }
  IMP__TRY(check_convexity(ws, c, k));

  /* A semidefinite Q borrows definiteness from the equality rows. */
  ws->rho = 0.0;
  ws->Kbase = ws->Qs;
  an = norm_inf(p * n, d->A);
  if (!ws->q_definite && p > 0 && an > 0.0) {
    qn = norm_inf(n * n, ws->Qs);
    ws->rho = fmax(1.0, qn) / (an * an);
    memcpy(ws->Kbase_buf, ws->Qs, n * n * sizeof(double));
    cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, (int)n, (int)p,
                ws->rho, d->A, (int)n, 1.0, ws->Kbase_buf, (int)n);
    ws->Kbase = ws->Kbase_buf;
  }
  return IMP_OK;
}

/* The dual system's constant part, for a definite Q without equalities:
 * MG = LQ^-1 G^T and C = MG^T MG = G Q^-1 G^T. */
static void prepare_dual(ipm_work *ws, const imp__qp_view *d)
{
  int ni = (int)ws->n, mi = (int)ws->m;

  memcpy(ws->MG, d->G, ws->m * ws->n * sizeof(double));
  cblas_dtrsm(CblasColMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit,
              ni, mi, 1.0, ws->LQ, ni, ws->MG, ni);
  cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, mi, ni, 1.0, ws->MG, ni,
              0.0, ws->C, mi);
}

int imp_qp_solve(const imp_qp_dims *dims, size_t nbatch,
                 const imp_qp_data *data, double *y, const imp_qp_options *opt,
                 imp_qp_stats *stats)
{
  imp__qp_config c = imp__qp_configure(opt);
  imp_qp_stats st = {0};
  ipm_work ws;
  size_t ny;
  int rc = IMP_OK;

  IMP__TRY(imp__qp_check(dims, nbatch, data, "qp_solve"));
  if (y == NULL)
    return imp__fail(IMP_EINVAL, "qp_solve: NULL y");
  ny = imp_qp_ny(dims);
  IMP__TRY(work_alloc(
      &ws, dims,
      c.system != IMP_QP_SYSTEM_PRIMAL && dims->neq == 0 && dims->nineq > 0 &&
          (c.system == IMP_QP_SYSTEM_DUAL || dims->nineq <= dims->nz)));

  for (size_t k = 0; k < nbatch && rc == IMP_OK; k++) {
    imp__qp_view d = imp__qp_view_of(data, k);
    ipm_result res = {0};

    /* Checks and the Q-, A- and G-dependent set-up, shared where they are:
     * the dual system where Q is definite, there are no equalities and
     * (by default) no more inequalities than variables. */
    rc = imp__qp_check_finite(dims, data, k, "qp_solve");
    if (rc == IMP_OK && (k == 0 || data->Q_stride != 0 || data->A_stride != 0))
      rc = prepare(&ws, &d, &c, k);
    if (rc == IMP_OK) {
      int dual = ws.dual_possible && ws.q_definite;

      if (dual && (k == 0 || data->Q_stride != 0 || data->G_stride != 0))
        prepare_dual(&ws, &d);
      ws.dual = dual;
      st.semidefinite += !ws.q_definite;
      rc = ipm(&ws, &d, &c, k, y + k * ny, &res);
      st.dual_system += rc == IMP_OK && ws.dual;
      st.augmented += rc == IMP_OK && ws.aug;
    }

    /* A failing QP's figures count too: they show why it failed. */
    st.iterations =
        res.iterations > st.iterations ? res.iterations : st.iterations;
    st.total_iterations += res.iterations;
    st.primal_residual = fmax(st.primal_residual, res.primal);
    st.dual_residual = fmax(st.dual_residual, res.dual);
    st.gap = fmax(st.gap, res.gap);
    if (rc != IMP_OK)
      st.sample = k;
  }

  work_free(&ws);
  if (stats != NULL)
    *stats = st;
  return rc;
}

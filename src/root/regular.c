/*
 * root/regular.c - backward's check that a computed root is a regular
 * root to the accuracy of the forward solve.
 *
 * The computed y is an exact root of f - f(y), not of f.  The root of f
 * lies about one Newton correction s = J^-1 f(y) away, where J = df/dy at
 * y, and the implicit function theorem's gradient is only meaningful if J
 * stays invertible over that distance.  Writing D = J(y - s) - J(y) and
 * w = ||J^-1 D||_inf, the Jacobian's linear model J(y) + t D on the segment
 * y - t s satisfies, for t w < 1,
 *
 *     kappa(J + t D) <= kappa(J) (1 + t w) / (1 - t w),
 *
 * because J + t D = J (I + t J^-1 D).  The check takes t up to 4, twice the
 * radius within which Kantorovich's theorem places the root, and fails
 * when 4w >= 1 or the bound exceeds max_cond.  So that a solve which
 * happened to stop far below its tolerance is judged by the accuracy it
 * promised, s is scaled up to ||f(y)||_1 = residual_tol.
 *
 * Both w and kappa are taken on the column-equilibrated problem, in the
 * unknowns z = C y with C = diag(||J e_j||_2), whose Jacobian J C^-1 has
 * columns of unit length: w = ||C J^-1 D C^-1||_inf and kappa(J C^-1).
 * Plain ||J^-1 D||_inf is not a property of the root but of the units of
 * y: under y = S z it becomes ||S (J_z^-1 D_z) S^-1||_inf, which grows
 * with the spread of S and rejected regular roots whose unknowns differ
 * in scale.  Rescaling y rescales C by the same S, so the equilibrated w
 * and kappa, and with them the check, do not depend on the units of y.
 * The bound above holds for them unchanged, applied to J C^-1 and D C^-1.
 * The condition number of J itself is still held to max_cond first,
 * because that is the matrix the adjoint solves with.
 *
 * For f(y) = y^2 at the computed root y: s >= y / 2, D <= -J / 2 and 4w >=
 * 2, so the root is reported singular; for a regular root s is of the
 * order of the tolerance and the bound is kappa(J C^-1) to many digits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/lapack.h"
#include "root/internal.h"

/* The check's work arrays, carved from one block. */
typedef struct check_work {
  double *jac;     /* n x n, J row-major (J^T to LAPACK) */
  double *lu;      /* n x n, LU factors of J^T */
  double *jac2;    /* n x n, J C^-1's LU, then J(y - s) row-major */
  double *change;  /* n x n column-major, D, then J^-1 D */
  double *columns; /* n, C: the 2-norms of J's columns */
  double *r;       /* n, f(y) */
  double *s;       /* n, the correction */
  double *shifted; /* n, y - s */
  double *work;    /* 4n, for dlange and dgecon */
  int *ipiv;       /* n, J^T's pivots */
  int *ipiv_eq;    /* n, the pivots of (J C^-1)^T */
  int *iwork;      /* n */
  void *block;
} check_work;

static int check_alloc(check_work *cw, size_t n)
{
  size_t doubles, ints;

  memset(cw, 0, sizeof *cw);
  if (n > SIZE_MAX / n / 8)
    return imp__fail(IMP_ENOMEM, "root: regularity check for %zu unknowns", n);
  doubles = 4 * n * n + 8 * n;
  ints = 3 * n;
  cw->block = malloc(doubles * sizeof(double) + ints * sizeof(int));
  if (cw->block == NULL)
    return imp__fail(IMP_ENOMEM, "root: regularity check for %zu unknowns", n);
  cw->jac = cw->block;
  cw->lu = cw->jac + n * n;
  cw->jac2 = cw->lu + n * n;
  cw->change = cw->jac2 + n * n;
  cw->columns = cw->change + n * n;
  cw->r = cw->columns + n;
  cw->s = cw->r + n;
  cw->shifted = cw->s + n;
  cw->work = cw->shifted + n;
  cw->ipiv = (int *)(cw->work + 4 * n);
  cw->ipiv_eq = cw->ipiv + n;
  cw->iwork = cw->ipiv_eq + n;
  return IMP_OK;
}

/* The condition number of a matrix from the LU factors lu of its
 * transpose (infinity norm of the matrix, anorm). */
static double condition(const check_work *cw, const double *lu, int n,
                        double anorm, int info)
{
  double rcond = 0.0;

  if (info != 0 || anorm == 0.0)
    return INFINITY;
  dgecon_("1", &n, lu, &n, &anorm, &rcond, cw->work, cw->iwork, &info, 1);
  return info == 0 && rcond > 0.0 ? 1.0 / rcond : INFINITY;
}

/* The column norms C of J and kappa(J C^-1), factored in cw->jac2 (its
 * LU is not kept).  J passed the first condition test, so it has no zero
 * column and C is invertible. */
static double equilibrated_condition(check_work *cw, int n)
{
  size_t ny = (size_t)n;
  double anorm;
  int info = 0;

  for (size_t j = 0; j < ny; j++) {
    double sum = 0.0;

    for (size_t i = 0; i < ny; i++)
      sum += cw->jac[i * ny + j] * cw->jac[i * ny + j];
    cw->columns[j] = sqrt(sum);
  }

  /* J C^-1 row-major is (J C^-1)^T to LAPACK, as J is for cw->lu. */
  for (size_t i = 0; i < ny; i++)
    for (size_t j = 0; j < ny; j++)
      cw->jac2[i * ny + j] = cw->jac[i * ny + j] / cw->columns[j];
  anorm = dlange_("1", &n, &n, cw->jac2, &n, cw->work, 1);
  dgetrf_(&n, &n, cw->jac2, &n, cw->ipiv_eq, &info);
  return condition(cw, cw->jac2, n, anorm, info);
}

/* s = J^-1 f(y), with f(y) scaled up to the tolerance; a zero residual is
 * replaced by a probe of that size along (1, ..., 1). */
static void correction(const check_work *cw, int n, double tol)
{
  double rnorm = 0.0, scale;
  int one = 1, info = 0;

  for (int i = 0; i < n; i++)
    rnorm += fabs(cw->r[i]);
  if (rnorm > 0.0) {
    scale = rnorm < tol ? tol / rnorm : 1.0;
    for (int i = 0; i < n; i++)
      cw->s[i] = scale * cw->r[i];
  } else {
    for (int i = 0; i < n; i++)
      cw->s[i] = tol / n;
  }
  dgetrs_("T", &n, &one, cw->lu, &n, cw->ipiv, cw->s, &n, &info, 1);
}

int imp__root_check_regular(const imp_problem *p, const imp__root_config *c,
                            const double *x, const double *theta,
                            const double *y)
{
  size_t ny = p->ny;
  int n = (int)ny, info = 0;
  double max_cond = c->adjoint.max_cond > 0.0 ? c->adjoint.max_cond : 1e12;
  double anorm, cond, cond_eq, omega, bound;
  check_work cw;
  int rc;

  IMP__TRY(check_alloc(&cw, ny));

  /* The residual and Jacobian at the root, and J's condition number. */
  rc = imp_problem_residual(p, x, y, theta, cw.r);
  if (rc == IMP_OK)
    rc = imp_problem_jacobian(p, x, y, theta, cw.jac, NULL);
  if (rc != IMP_OK) {
    rc = imp__root_rewrap(rc, "root: regularity check at the root");
    goto done;
  }
  memcpy(cw.lu, cw.jac, ny * ny * sizeof(double));
  anorm = dlange_("1", &n, &n, cw.lu, &n, cw.work, 1);
  dgetrf_(&n, &n, cw.lu, &n, cw.ipiv, &info);
  cond = condition(&cw, cw.lu, n, anorm, info);
  if (!(cond <= max_cond)) {
    rc = imp__fail(IMP_ESINGULAR,
                   "root: df/dy is singular at the root: "
                   "estimated condition number %.3g exceeds %.3g",
                   cond, max_cond);
    goto done;
  }

  /* The same in the unknowns C y, in which J's columns have unit norm. */
  cond_eq = equilibrated_condition(&cw, n);

  /* The Jacobian one correction away. */
  correction(&cw, n, c->residual_tol);
  for (size_t i = 0; i < ny; i++)
    cw.shifted[i] = y[i] - cw.s[i];
  omega = INFINITY;
  if (imp__all_finite(cw.shifted, ny)) {
    rc = imp_problem_jacobian(p, x, cw.shifted, theta, cw.jac2, NULL);
    if (rc != IMP_OK) {
      rc = imp__root_rewrap(rc, "root: regularity check one Newton "
                                "correction from the root");
      goto done;
    }

    /* w = ||C J^-1 D C^-1||_inf, with D stored column-major for
     * LAPACK. */
    for (size_t i = 0; i < ny; i++)
      for (size_t j = 0; j < ny; j++)
        cw.change[j * ny + i] = cw.jac2[i * ny + j] - cw.jac[i * ny + j];
    dgetrs_("T", &n, &n, cw.lu, &n, cw.ipiv, cw.change, &n, &info, 1);
    for (size_t j = 0; j < ny; j++)
      for (size_t i = 0; i < ny; i++)
        cw.change[j * ny + i] *= cw.columns[i] / cw.columns[j];
    omega = dlange_("I", &n, &n, cw.change, &n, cw.work, 1);
  }

  /* The condition bound over four corrections. */
  bound = 4.0 * omega < 1.0
              ? cond_eq * (1.0 + 4.0 * omega) / (1.0 - 4.0 * omega)
              : INFINITY;
  if (!(bound <= max_cond))
    rc = imp__fail(IMP_ESINGULAR,
                   "root: df/dy is singular to within the "
                   "accuracy of the solve: with its columns equilibrated, "
                   "its estimated condition number is %.3g at the computed "
                   "root but reaches %.3g within four Newton corrections "
                   "(it changes by %.3g of itself per correction), above "
                   "%.3g",
                   cond_eq, bound, omega, max_cond);

done:
  free(cw.block);
  return rc;
}

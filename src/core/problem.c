/*
 * core/problem.c - checked evaluation of an implicit problem's callbacks.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "core/internal.h"
#include "imp/problem.h"

int imp__all_finite(const double *a, size_t n)
{
  /* x * 0 is 0 for finite x and NaN otherwise; four independent sums keep
   * the loop free of branches and of a serial dependency. */
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  size_t i = 0;

  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * 0.0;
    s1 += a[i + 1] * 0.0;
    s2 += a[i + 2] * 0.0;
    s3 += a[i + 3] * 0.0;
  }
  for (; i < n; i++)
    s0 += a[i] * 0.0;
  return (s0 + s1 + s2 + s3) == 0.0;
}

double imp__nrm2(size_t n, const double *a)
{
  return cblas_dnrm2((blasint)n, a, 1);
}

double imp__dot(size_t n, const double *a, const double *b)
{
  return cblas_ddot((blasint)n, a, 1, b, 1);
}

double *imp__dalloc(size_t n)
{
  if (n == 0)
    n = 1;
  return calloc(n, sizeof(double));
}

int imp_problem_check(const imp_problem *p, int need_vjp)
{
  if (p == NULL)
    return imp__fail(IMP_EINVAL, "problem is NULL");
  if (p->ny == 0)
    return imp__fail(IMP_EINVAL, "problem has ny = 0 unknowns");
  if (p->residual == NULL)
    return imp__fail(IMP_EINVAL, "problem has no residual callback");
  if (need_vjp && p->vjp == NULL)
    return imp__fail(IMP_EINVAL, "problem has no vjp callback, which "
                                 "gradients need");
  return IMP_OK;
}

int imp_problem_residual(const imp_problem *p, const double *x, const double *y,
                         const double *theta, double *r)
{
  int rc = p->residual(p->ctx, x, y, theta, r);

  if (rc != 0)
    return imp__callback_status(rc, "residual callback");
  if (!imp__all_finite(r, p->ny))
    return imp__fail(IMP_ENONFINITE, "residual callback produced NaN or "
                                     "Inf");
  return IMP_OK;
}

int imp_problem_vjp(const imp_problem *p, const double *x, const double *y,
                    const double *theta, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_theta)
{
  int rc;

  if (p->vjp == NULL)
    return imp__fail(IMP_EINVAL, "problem has no vjp callback");
  rc = p->vjp(p->ctx, x, y, theta, v, vjp_y, vjp_x, vjp_theta);
  if (rc != 0)
    return imp__callback_status(rc, "vjp callback");
  if ((vjp_y != NULL && !imp__all_finite(vjp_y, p->ny)) ||
      (vjp_x != NULL && !imp__all_finite(vjp_x, p->nx)) ||
      (vjp_theta != NULL && !imp__all_finite(vjp_theta, p->ntheta)))
    return imp__fail(IMP_ENONFINITE, "vjp callback produced NaN or Inf");
  return IMP_OK;
}

/* Column j of df/dy is the jvp with the unit vector e_j. */
static int jacobian_from_jvp(const imp_problem *p, const double *x,
                             const double *y, const double *theta, double *jac,
                             double *unit, double *col)
{
  size_t n = p->ny;

  for (size_t j = 0; j < n; j++) {
    int rc;

    unit[j] = 1.0;
    rc = p->jvp(p->ctx, x, y, theta, unit, col);
    unit[j] = 0.0;
    if (rc != 0)
      return imp__callback_status(rc, "jvp callback");
    for (size_t i = 0; i < n; i++)
      jac[i * n + j] = col[i];
  }
  return IMP_OK;
}

/* Row i of df/dy is the vjp with the unit vector e_i. */
static int jacobian_from_vjp(const imp_problem *p, const double *x,
                             const double *y, const double *theta, double *jac,
                             double *unit)
{
  size_t n = p->ny;

  for (size_t i = 0; i < n; i++) {
    int rc;

    unit[i] = 1.0;
    rc = imp_problem_vjp(p, x, y, theta, unit, jac + i * n, NULL, NULL);
    unit[i] = 0.0;
    if (rc != IMP_OK)
      return rc;
  }
  return IMP_OK;
}

int imp_problem_jacobian(const imp_problem *p, const double *x, const double *y,
                         const double *theta, double *jac, size_t *ncalls)
{
  size_t n;
  double *unit, *col;
  int rc;

  IMP__TRY(imp_problem_check(p, 0));
  if (jac == NULL || y == NULL)
    return imp__fail(IMP_EINVAL, "jacobian: NULL y or output");
  n = p->ny;

  if (p->jacobian != NULL) {
    rc = p->jacobian(p->ctx, x, y, theta, jac);
    if (ncalls != NULL)
      *ncalls = 1;
    if (rc != 0)
      return imp__callback_status(rc, "jacobian callback");
    if (!imp__all_finite(jac, n * n))
      return imp__fail(IMP_ENONFINITE, "jacobian callback produced NaN or "
                                       "Inf");
    return IMP_OK;
  }
  if (p->jvp == NULL && p->vjp == NULL)
    return imp__fail(IMP_EINVAL, "jacobian: the problem has no jacobian, "
                                 "jvp or vjp callback");

  unit = imp__dalloc(n);
  col = imp__dalloc(n);
  if (unit == NULL || col == NULL) {
    free(unit);
    free(col);
    return imp__fail(IMP_ENOMEM, "jacobian: %zu-vector", n);
  }
  if (p->jvp != NULL)
    rc = jacobian_from_jvp(p, x, y, theta, jac, unit, col);
  else
    rc = jacobian_from_vjp(p, x, y, theta, jac, unit);
  if (rc == IMP_OK && !imp__all_finite(jac, n * n))
    rc = imp__fail(IMP_ENONFINITE, "jacobian: NaN or Inf entry");
  if (ncalls != NULL)
    *ncalls = n;
  free(unit);
  free(col);
  return rc;
}

/*
 * core/gradcheck.c - central finite differences against an analytic
 * gradient.
 */
#include <math.h>

#include "core/internal.h"
#include "imp/gradcheck.h"

/* L at params with entry i moved by delta; params[i] is restored. */
static int shifted(imp_objective_fn f, void *ctx, double *params, size_t i,
                   double delta, double *value, size_t *evals)
{
  double saved = params[i];
  int rc;

  params[i] = saved + delta;
  rc = f(ctx, params, value);
  params[i] = saved;
  (*evals)++;
  if (rc != 0)
    return imp__fail(IMP_ECALLBACK,
                     "gradcheck: objective returned %d at "
                     "entry %zu",
                     rc, i);
  if (!isfinite(*value))
    return imp__fail(IMP_ENONFINITE,
                     "gradcheck: objective is not finite "
                     "at entry %zu",
                     i);
  return IMP_OK;
}

/* The difference quotient for entry i. */
static int quotient(imp_objective_fn f, void *ctx, double *params, size_t i,
                    double h, int order, double *d, size_t *evals)
{
  double step = h * fmax(1.0, fabs(params[i])), lp, lm, lp2, lm2;

  IMP__TRY(shifted(f, ctx, params, i, step, &lp, evals));
  IMP__TRY(shifted(f, ctx, params, i, -step, &lm, evals));
  if (order == 2) {
    *d = (lp - lm) / (2.0 * step);
    return IMP_OK;
  }
  IMP__TRY(shifted(f, ctx, params, i, 2.0 * step, &lp2, evals));
  IMP__TRY(shifted(f, ctx, params, i, -2.0 * step, &lm2, evals));
  /* Differences of nearby values first, so a flat direction gives 0. */
  *d = ((lm2 - lp2) + 8.0 * (lp - lm)) / (12.0 * step);
  return IMP_OK;
}

int imp_gradcheck(imp_objective_fn f, void *ctx, double *params, size_t n,
                  const double *grad, const imp_gradcheck_options *opt,
                  imp_gradcheck_result *result)
{
  imp_gradcheck_options o = {0};
  imp_gradcheck_result r = {0};
  int rc = IMP_OK;

  if (f == NULL || (n > 0 && (params == NULL || grad == NULL)) ||
      result == NULL)
    return imp__fail(IMP_EINVAL, "gradcheck: NULL argument");
  if (opt != NULL)
    o = *opt;
  if (o.order == 0)
    o.order = 4;
  if (o.order != 2 && o.order != 4)
    return imp__fail(IMP_EINVAL, "gradcheck: order %d, expected 2 or 4",
                     o.order);
  if (o.h <= 0.0)
    o.h = o.order == 2 ? 1e-5 : 1e-3;
  if (o.floor <= 0.0)
    o.floor = 1e-8;

  for (size_t i = 0; i < n; i++) {
    double d, err;

    rc = quotient(f, ctx, params, i, o.h, o.order, &d, &r.evaluations);
    if (rc != IMP_OK)
      break;
    err = fabs(grad[i] - d) / fmax(fmax(fabs(grad[i]), fabs(d)), o.floor);
    if (!isfinite(grad[i]))
      err = INFINITY;
    if (i == 0 || err > r.max_rel_err) {
      r.max_rel_err = err;
      r.worst = i;
      r.analytic = grad[i];
      r.numeric = d;
    }
  }
  *result = r;
  return rc;
}

/*
 * examples/docs/adjoint.c - the adjoint equation is one more implicit
 * problem.
 *
 * For y*(x) with f(x, y*) = 0 and a loss gradient ybar = dL/dy, reverse
 * mode needs xbar = J^T ybar with J the Jacobian of y* in x.  The
 * implicit function theorem turns it into the adjoint equation
 *
 *     g(v) = (df/dy)^T v + ybar = 0,     then  xbar = (df/dx)^T v,
 *
 * an implicit problem in v, linear, whose residual needs nothing but the
 * vjp of f.  This program solves it twice at the root of a small
 * nonlinear system: once with imp_adjoint_solve (LU with a condition
 * estimate), and once by handing g to a general root finder as an
 * imp_problem of its own.  The two adjoints must agree (to 1e-10), and so
 * must both xbar with finite differences of the forward solve (1e-6).
 * docs/autograd.md pulls its samples from the blocks marked [name].
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imp.h"

/*
 * The forward problem, two equations in two unknowns:
 *     f1 = y1 + 0.5 tanh(y2) - x1,
 *     f2 = y2 + 0.5 tanh(y1) - x2.
 */
static int pair_residual(void *ctx, const double *x, const double *y,
                         const double *theta, double *r)
{
  (void)ctx, (void)theta;
  r[0] = y[0] + 0.5 * tanh(y[1]) - x[0];
  r[1] = y[1] + 0.5 * tanh(y[0]) - x[1];
  return 0;
}

static int pair_vjp(void *ctx, const double *x, const double *y,
                    const double *theta, const double *v, double *vjp_y,
                    double *vjp_x, double *vjp_theta)
{
  double s0 = 1.0 - tanh(y[0]) * tanh(y[0]);
  double s1 = 1.0 - tanh(y[1]) * tanh(y[1]);

  (void)ctx, (void)x, (void)theta, (void)vjp_theta;
  if (vjp_y != NULL) {
    vjp_y[0] = v[0] + 0.5 * s0 * v[1];
    vjp_y[1] = v[1] + 0.5 * s1 * v[0];
  }
  if (vjp_x != NULL) {
    vjp_x[0] -= v[0];
    vjp_x[1] -= v[1];
  }
  return 0;
}

static const imp_problem pair = {
    .nx = 2, .ny = 2, .residual = pair_residual, .vjp = pair_vjp};

/* [adjoint-problem] */
/* The adjoint equation as an implicit problem in v: its "input" is ybar,
 * and the point (x, y*) where f is linearized is fixed in the context. */
typedef struct adjoint_ctx {
  const imp_problem *forward;
  const double *x, *y; /* the forward input and its root */
} adjoint_ctx;

/* g(ybar, v) = (df/dy)^T v + ybar, one vjp of the forward problem. */
static int adjoint_residual(void *ctx, const double *ybar, const double *v,
                            const double *theta, double *r)
{
  adjoint_ctx *a = ctx;
  int rc = imp_problem_vjp(a->forward, a->x, a->y, NULL, v, r, NULL, NULL);

  (void)theta;
  for (size_t i = 0; rc == IMP_OK && i < a->forward->ny; i++)
    r[i] += ybar[i];
  return rc;
}
/* [adjoint-problem] */

/* The adjoint v and xbar at the root y of pair for the input x, by a
 * general root finder on g; xbar is accumulated. */
static int adjoint_by_root_finder(const double *x, const double *y,
                                  const double *ybar, double *v, double *xbar)
{
  /* [adjoint-solve] */
  adjoint_ctx actx = {.forward = &pair, .x = x, .y = y};
  imp_problem adjoint = {
      .nx = 2, .ny = 2, .residual = adjoint_residual, .ctx = &actx};
  int rc;

  v[0] = v[1] = 0.0; /* the initial guess; g is linear in v */
  rc = imp_root_solve(&adjoint, NULL, ybar, NULL, v, NULL);
  if (rc == IMP_OK) /* xbar = (df/dx)^T v: one more vjp */
    rc = imp_problem_vjp(&pair, x, y, NULL, v, NULL, xbar, NULL);
  /* [adjoint-solve] */
  return rc;
}

/* The forward solve as an objective for the finite differences. */
static int first_output(void *ctx, const double *x, double *value)
{
  const double *ybar = ctx;
  double y[2] = {0.0, 0.0};
  int rc = imp_root_solve(&pair, NULL, x, NULL, y, NULL);

  *value = ybar[0] * y[0] + ybar[1] * y[1];
  return rc;
}

int main(void)
{
  double x[2] = {0.7, -0.4}, y[2] = {0.0, 0.0}, ybar[2] = {1.0, -2.0};
  double v_lu[2], xbar_lu[2] = {0.0, 0.0}, xbar_root[2] = {0.0, 0.0};
  double v[2] = {0.0, 0.0};
  imp_gradcheck_result fd_lu, fd_root;
  imp_adjoint_stats stats;
  int failures = 0, rc;

  /* The forward root. */
  rc = imp_root_solve(&pair, NULL, x, NULL, y, NULL);
  if (rc == IMP_OK)
    rc = imp_adjoint_solve(&pair, x, y, NULL, ybar, v_lu, xbar_lu, NULL, NULL,
                           &stats);
  if (rc != IMP_OK) {
    fprintf(stderr, "adjoint: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  rc = adjoint_by_root_finder(x, y, ybar, v, xbar_root);
  if (rc != IMP_OK) {
    fprintf(stderr, "adjoint as a root problem: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  rc = imp_gradcheck(first_output, ybar, x, 2, xbar_lu, NULL, &fd_lu);
  if (rc == IMP_OK)
    rc = imp_gradcheck(first_output, ybar, x, 2, xbar_root, NULL, &fd_root);
  if (rc != IMP_OK) {
    fprintf(stderr, "gradcheck: %s\n", imp_last_error());
    return EXIT_FAILURE;
  }

  printf("root y* = (%.12f, %.12f)\n", y[0], y[1]);
  printf("adjoint by imp_adjoint_solve (%s, cond %.2f): v = (%.12f, "
         "%.12f)\n",
         stats.method == IMP_ADJOINT_DENSE_LU ? "dense LU" : "other",
         stats.cond, v_lu[0], v_lu[1]);
  printf("adjoint by a root finder on g(v) = J^T v + ybar:  v = (%.12f, "
         "%.12f)\n",
         v[0], v[1]);
  printf("xbar = (%.12f, %.12f) and (%.12f, %.12f)\n", xbar_lu[0], xbar_lu[1],
         xbar_root[0], xbar_root[1]);
  printf("finite differences: worst relative error %.1e and %.1e\n",
         fd_lu.max_rel_err, fd_root.max_rel_err);

  for (int i = 0; i < 2; i++)
    failures += !(fabs(v[i] - v_lu[i]) <= 1e-10);
  failures += !(fd_lu.max_rel_err <= 1e-6) + !(fd_root.max_rel_err <= 1e-6);
  printf("%s\n", failures == 0 ? "all checks passed" : "CHECKS FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

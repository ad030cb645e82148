/*
 * tests/root_mgh.h - the More-Garbow-Hillstrom systems that GSL's own
 * multiroot tests solve, with the starting points GSL uses, written once
 * for tests/test_root.c and bench/bench_root.c.
 *
 * J. J. More, B. S. Garbow and K. E. Hillstrom, "Testing unconstrained
 * optimization software", ACM TOMS 7 (1981) 17-41.  GSL moves two starts:
 * Freudenstein-Roth from (0.5, -2) to (4.5, 3.5), and the trigonometric
 * system from 1/n to 0.05, where the original starts are too hard.
 *
 * Each system comes as plain arrays (residual and row-major Jacobian), as
 * imp callbacks (ctx is the mgh_problem) and as GSL callbacks (params is
 * the mgh_problem), so that both sides evaluate the same arithmetic.  The
 * header holds static functions only; include it in one file per program.
 */
#ifndef IMP_TESTS_ROOT_MGH_H
#define IMP_TESTS_ROOT_MGH_H

#include <math.h>
#include <string.h>

#include <gsl/gsl_errno.h>
#include <gsl/gsl_multiroots.h>

#include "imp/root.h"

#define MGH_NMAX 10 /* the largest system */

typedef struct mgh_problem {
  const char *name;
  size_t n;
  void (*start)(double *y);
  void (*residual)(const double *y, double *r);
  void (*jacobian)(const double *y, double *jac); /* row-major */
} mgh_problem;

/* Rosenbrock: (1 - y0, 10 (y1 - y0^2)), root (1, 1). */
static void rosenbrock_start(double *y)
{
  y[0] = -1.2;
  y[1] = 1.0;
}

static void rosenbrock_residual(const double *y, double *r)
{
  r[0] = 1.0 - y[0];
  r[1] = 10.0 * (y[1] - y[0] * y[0]);
}

static void rosenbrock_jacobian(const double *y, double *jac)
{
  jac[0] = -1.0;
  jac[1] = 0.0;
  jac[2] = -20.0 * y[0];
  jac[3] = 10.0;
}

/* Freudenstein and Roth, root (5, 4). */
static void roth_start(double *y)
{
  y[0] = 4.5;
  y[1] = 3.5;
}

static void roth_residual(const double *y, double *r)
{
  r[0] = -13.0 + y[0] + ((5.0 - y[1]) * y[1] - 2.0) * y[1];
  r[1] = -29.0 + y[0] + ((y[1] + 1.0) * y[1] - 14.0) * y[1];
}

static void roth_jacobian(const double *y, double *jac)
{
  jac[0] = 1.0;
  jac[1] = (-3.0 * y[1] + 10.0) * y[1] - 2.0;
  jac[2] = 1.0;
  jac[3] = (3.0 * y[1] + 2.0) * y[1] - 14.0;
}

/* Powell badly scaled: 1e4 y0 y1 = 1, exp(-y0) + exp(-y1) = 1.0001. */
static void powell_scaled_start(double *y)
{
  y[0] = 0.0;
  y[1] = 1.0;
}

static void powell_scaled_residual(const double *y, double *r)
{
  r[0] = 10000.0 * y[0] * y[1] - 1.0;
  r[1] = exp(-y[0]) + exp(-y[1]) - 1.0001;
}

static void powell_scaled_jacobian(const double *y, double *jac)
{
  jac[0] = 10000.0 * y[1];
  jac[1] = 10000.0 * y[0];
  jac[2] = -exp(-y[0]);
  jac[3] = -exp(-y[1]);
}

/* Brown badly scaled, GSL's two-equation form: root (1e6, 2e-6). */
static void brown_scaled_start(double *y)
{
  y[0] = 1.0;
  y[1] = 1.0;
}

static void brown_scaled_residual(const double *y, double *r)
{
  r[0] = y[0] - 1e6;
  r[1] = y[0] * y[1] - 2.0;
}

static void brown_scaled_jacobian(const double *y, double *jac)
{
  jac[0] = 1.0;
  jac[1] = 0.0;
  jac[2] = y[1];
  jac[3] = y[0];
}

/* Powell singular: root 0, where the Jacobian is singular. */
static void powell_singular_start(double *y)
{
  y[0] = 3.0;
  y[1] = -1.0;
  y[2] = 0.0;
  y[3] = 1.0;
}

static void powell_singular_residual(const double *y, double *r)
{
  double a = y[1] - 2.0 * y[2], b = y[0] - y[3];

  r[0] = y[0] + 10.0 * y[1];
  r[1] = sqrt(5.0) * (y[2] - y[3]);
  r[2] = a * a;
  r[3] = sqrt(10.0) * b * b;
}

static void powell_singular_jacobian(const double *y, double *jac)
{
  double a = y[1] - 2.0 * y[2], b = y[0] - y[3];

  memset(jac, 0, 16 * sizeof(double));
  jac[0] = 1.0;
  jac[1] = 10.0;
  jac[6] = sqrt(5.0);
  jac[7] = -sqrt(5.0);
  jac[9] = 2.0 * a;
  jac[10] = -4.0 * a;
  jac[12] = 2.0 * sqrt(10.0) * b;
  jac[15] = -2.0 * sqrt(10.0) * b;
}

/* Wood, as the gradient system of Wood's function: root (1, 1, 1, 1). */
static void wood_start(double *y)
{
  y[0] = -3.0;
  y[1] = -1.0;
  y[2] = -3.0;
  y[3] = -1.0;
}

static void wood_residual(const double *y, double *r)
{
  double t1 = y[1] - y[0] * y[0], t2 = y[3] - y[2] * y[2];

  r[0] = -200.0 * y[0] * t1 - (1.0 - y[0]);
  r[1] = 200.0 * t1 + 20.2 * (y[1] - 1.0) + 19.8 * (y[3] - 1.0);
  r[2] = -180.0 * y[2] * t2 - (1.0 - y[2]);
  r[3] = 180.0 * t2 + 20.2 * (y[3] - 1.0) + 19.8 * (y[1] - 1.0);
}

static void wood_jacobian(const double *y, double *jac)
{
  memset(jac, 0, 16 * sizeof(double));
  jac[0] = -200.0 * (y[1] - 3.0 * y[0] * y[0]) + 1.0;
  jac[1] = -200.0 * y[0];
  jac[4] = -400.0 * y[0];
  jac[5] = 220.2;
  jac[7] = 19.8;
  jac[10] = -180.0 * (y[3] - 3.0 * y[2] * y[2]) + 1.0;
  jac[11] = -180.0 * y[2];
  jac[13] = 19.8;
  jac[14] = -360.0 * y[2];
  jac[15] = 200.2;
}

/* Helical valley: root (1, 0, 0). */
static void helical_start(double *y)
{
  y[0] = -1.0;
  y[1] = 0.0;
  y[2] = 0.0;
}

static void helical_residual(const double *y, double *r)
{
  double angle;

  if (y[0] > 0.0)
    angle = atan(y[1] / y[0]) / (2.0 * M_PI);
  else if (y[0] < 0.0)
    angle = 0.5 + atan(y[1] / y[0]) / (2.0 * M_PI);
  else
    angle = y[1] > 0.0 ? 0.25 : -0.25;
  r[0] = 10.0 * (y[2] - 10.0 * angle);
  r[1] = 10.0 * (sqrt(y[0] * y[0] + y[1] * y[1]) - 1.0);
  r[2] = y[2];
}

static void helical_jacobian(const double *y, double *jac)
{
  double rr = y[0] * y[0] + y[1] * y[1], norm = sqrt(rr);

  jac[0] = 100.0 * y[1] / (2.0 * M_PI * rr);
  jac[1] = -100.0 * y[0] / (2.0 * M_PI * rr);
  jac[2] = 10.0;
  jac[3] = 10.0 * y[0] / norm;
  jac[4] = 10.0 * y[1] / norm;
  jac[5] = 0.0;
  jac[6] = 0.0;
  jac[7] = 0.0;
  jac[8] = 1.0;
}

/* Discrete boundary value problem on 10 interior points. */
static void dbv_start(double *y)
{
  double h = 1.0 / (MGH_NMAX + 1.0);

  for (int i = 0; i < MGH_NMAX; i++) {
    double t = (i + 1) * h;

    y[i] = t * (t - 1.0);
  }
}

static void dbv_residual(const double *y, double *r)
{
  double h = 1.0 / (MGH_NMAX + 1.0);

  for (int i = 0; i < MGH_NMAX; i++) {
    double t = (i + 1) * h, u = y[i] + t + 1.0;
    double left = i > 0 ? y[i - 1] : 0.0;
    double right = i < MGH_NMAX - 1 ? y[i + 1] : 0.0;

    r[i] = 2.0 * y[i] - left - right + h * h * u * u * u / 2.0;
  }
}

static void dbv_jacobian(const double *y, double *jac)
{
  double h = 1.0 / (MGH_NMAX + 1.0);

  memset(jac, 0, MGH_NMAX * MGH_NMAX * sizeof(double));
  for (int i = 0; i < MGH_NMAX; i++) {
    double t = (i + 1) * h, u = y[i] + t + 1.0;

    jac[i * MGH_NMAX + i] = 2.0 + 1.5 * h * h * u * u;
    if (i > 0)
      jac[i * MGH_NMAX + i - 1] = -1.0;
    if (i < MGH_NMAX - 1)
      jac[i * MGH_NMAX + i + 1] = -1.0;
  }
}

/* Trigonometric system on 10 unknowns. */
static void trig_start(double *y)
{
  for (int i = 0; i < MGH_NMAX; i++)
    y[i] = 0.05;
}

static void trig_residual(const double *y, double *r)
{
  double sum = 0.0;

  for (int j = 0; j < MGH_NMAX; j++)
    sum += cos(y[j]);
  for (int i = 0; i < MGH_NMAX; i++)
    r[i] = MGH_NMAX - sum + (i + 1) * (1.0 - cos(y[i])) - sin(y[i]);
}

static void trig_jacobian(const double *y, double *jac)
{
  for (int i = 0; i < MGH_NMAX; i++)
    for (int j = 0; j < MGH_NMAX; j++)
      jac[i * MGH_NMAX + j] =
          i == j ? (i + 2) * sin(y[i]) - cos(y[i]) : sin(y[j]);
}

static const mgh_problem mgh_problems[] = {
    {"Rosenbrock", 2, rosenbrock_start, rosenbrock_residual,
     rosenbrock_jacobian},
    {"Freudenstein-Roth", 2, roth_start, roth_residual, roth_jacobian},
    {"Powell badly scaled", 2, powell_scaled_start, powell_scaled_residual,
     powell_scaled_jacobian},
    {"Brown badly scaled", 2, brown_scaled_start, brown_scaled_residual,
     brown_scaled_jacobian},
    {"Powell singular", 4, powell_singular_start, powell_singular_residual,
     powell_singular_jacobian},
    {"Wood", 4, wood_start, wood_residual, wood_jacobian},
    {"helical valley", 3, helical_start, helical_residual, helical_jacobian},
    {"discrete BVP", MGH_NMAX, dbv_start, dbv_residual, dbv_jacobian},
    {"trigonometric", MGH_NMAX, trig_start, trig_residual, trig_jacobian},
};

#define MGH_NPROBLEMS (sizeof mgh_problems / sizeof mgh_problems[0])

/* The start scaled as in More, Garbow and Hillstrom's protocol, which also
 * solves from 10 x0 and 100 x0 (a zero start becomes factor (1, ..., 1)),
 * as GSL's tests do. */
static void mgh_start(const mgh_problem *m, double factor, double *y)
{
  int zero = 1;

  m->start(y);
  for (size_t i = 0; i < m->n; i++)
    zero &= y[i] == 0.0;
  for (size_t i = 0; i < m->n && factor != 1.0; i++)
    y[i] = zero ? factor : factor * y[i];
}

/* ---- imp callbacks ---------------------------------------------------- */

static int mgh_imp_residual(void *ctx, const double *x, const double *y,
                            const double *theta, double *r)
{
  const mgh_problem *m = ctx;

  (void)x;
  (void)theta;
  m->residual(y, r);
  return 0;
}

static int mgh_imp_jacobian(void *ctx, const double *x, const double *y,
                            const double *theta, double *jac)
{
  const mgh_problem *m = ctx;

  (void)x;
  (void)theta;
  m->jacobian(y, jac);
  return 0;
}

static int mgh_imp_jvp(void *ctx, const double *x, const double *y,
                       const double *theta, const double *u, double *out)
{
  const mgh_problem *m = ctx;
  double jac[MGH_NMAX * MGH_NMAX];

  (void)x;
  (void)theta;
  m->jacobian(y, jac);
  for (size_t i = 0; i < m->n; i++) {
    out[i] = 0.0;
    for (size_t j = 0; j < m->n; j++)
      out[i] += jac[i * m->n + j] * u[j];
  }
  return 0;
}

static int mgh_imp_vjp(void *ctx, const double *x, const double *y,
                       const double *theta, const double *v, double *vjp_y,
                       double *vjp_x, double *vjp_theta)
{
  const mgh_problem *m = ctx;
  double jac[MGH_NMAX * MGH_NMAX];

  (void)x;
  (void)theta;
  (void)vjp_x;
  (void)vjp_theta;
  if (vjp_y == NULL)
    return 0;
  m->jacobian(y, jac);
  for (size_t j = 0; j < m->n; j++) {
    vjp_y[j] = 0.0;
    for (size_t i = 0; i < m->n; i++)
      vjp_y[j] += v[i] * jac[i * m->n + j];
  }
  return 0;
}

/* Which derivative callbacks the imp problem gets. */
typedef enum mgh_derivative {
  MGH_JACOBIAN, /* the jacobian callback (and a vjp) */
  MGH_JVP,      /* a jvp only: the Jacobian is assembled by columns */
  MGH_VJP       /* a vjp only: the Jacobian is assembled by rows */
} mgh_derivative;

static imp_problem mgh_imp_problem(const mgh_problem *m, mgh_derivative d)
{
  imp_problem p = {.ny = m->n, .residual = mgh_imp_residual, .ctx = (void *)m};

  if (d == MGH_JACOBIAN) {
    p.jacobian = mgh_imp_jacobian;
    p.vjp = mgh_imp_vjp;
  } else if (d == MGH_JVP) {
    p.jvp = mgh_imp_jvp;
  } else {
    p.vjp = mgh_imp_vjp;
  }
  return p;
}

/* ---- plain GSL ---------------------------------------------------------- */

static const double *mgh_gsl_values(const gsl_vector *v, double *copy)
{
  if (v->stride == 1)
    return v->data;
  for (size_t i = 0; i < v->size; i++)
    copy[i] = gsl_vector_get(v, i);
  return copy;
}

/* The GSL callbacks' params: the system, and a count of the residuals
 * that came out NaN or Inf, which GSL's hybrid solvers step back from but
 * imp refuses. */
typedef struct mgh_gsl_params {
  const mgh_problem *m;
  size_t nonfinite;
} mgh_gsl_params;

static int mgh_gsl_f(const gsl_vector *y, void *params, gsl_vector *r)
{
  mgh_gsl_params *g = params;
  double ycopy[MGH_NMAX], rv[MGH_NMAX];

  double *out = r->stride == 1 ? r->data : rv;

  g->m->residual(mgh_gsl_values(y, ycopy), out);
  for (size_t i = 0; i < g->m->n; i++) {
    if (!isfinite(out[i]))
      g->nonfinite++;
    if (out == rv)
      gsl_vector_set(r, i, rv[i]);
  }
  return GSL_SUCCESS;
}

static int mgh_gsl_df(const gsl_vector *y, void *params, gsl_matrix *J)
{
  const mgh_gsl_params *g = params;
  double ycopy[MGH_NMAX], jac[MGH_NMAX * MGH_NMAX];

  if (J->tda == g->m->n) {
    g->m->jacobian(mgh_gsl_values(y, ycopy), J->data);
    return GSL_SUCCESS;
  }
  g->m->jacobian(mgh_gsl_values(y, ycopy), jac);
  for (size_t i = 0; i < g->m->n; i++)
    for (size_t j = 0; j < g->m->n; j++)
      gsl_matrix_set(J, i, j, jac[i * g->m->n + j]);
  return GSL_SUCCESS;
}

static int mgh_gsl_fdf(const gsl_vector *y, void *params, gsl_vector *r,
                       gsl_matrix *J)
{
  mgh_gsl_f(y, params, r);
  return mgh_gsl_df(y, params, J);
}

/* A GSL solver for one system, used as a GSL user would: allocated once,
 * set and iterated for each solve. */
typedef struct mgh_gsl {
  const mgh_problem *m;
  mgh_gsl_params params;
  gsl_multiroot_fsolver *fs;
  gsl_multiroot_fdfsolver *fdfs;
  gsl_multiroot_function f;
  gsl_multiroot_function_fdf fdf;
  gsl_vector *start;
} mgh_gsl;

static const gsl_multiroot_fsolver_type *mgh_fsolver(imp_root_solver s)
{
  switch (s) {
  case IMP_ROOT_HYBRIDS:
    return gsl_multiroot_fsolver_hybrids;
  case IMP_ROOT_HYBRID:
    return gsl_multiroot_fsolver_hybrid;
  case IMP_ROOT_DNEWTON:
    return gsl_multiroot_fsolver_dnewton;
  case IMP_ROOT_BROYDEN:
    return gsl_multiroot_fsolver_broyden;
  default:
    return NULL;
  }
}

static const gsl_multiroot_fdfsolver_type *mgh_fdfsolver(imp_root_solver s)
{
  switch (s) {
  case IMP_ROOT_HYBRIDSJ:
    return gsl_multiroot_fdfsolver_hybridsj;
  case IMP_ROOT_HYBRIDJ:
    return gsl_multiroot_fdfsolver_hybridj;
  case IMP_ROOT_NEWTON:
    return gsl_multiroot_fdfsolver_newton;
  case IMP_ROOT_GNEWTON:
    return gsl_multiroot_fdfsolver_gnewton;
  default:
    return NULL;
  }
}

static int mgh_gsl_init(mgh_gsl *g, const mgh_problem *m, imp_root_solver s)
{
  memset(g, 0, sizeof *g);
  g->m = m;
  g->f.f = mgh_gsl_f;
  g->f.n = m->n;
  g->params.m = m;
  g->f.params = &g->params;
  g->fdf.f = mgh_gsl_f;
  g->fdf.df = mgh_gsl_df;
  g->fdf.fdf = mgh_gsl_fdf;
  g->fdf.n = m->n;
  g->fdf.params = &g->params;
  if (mgh_fdfsolver(s) != NULL)
    g->fdfs = gsl_multiroot_fdfsolver_alloc(mgh_fdfsolver(s), m->n);
  else
    g->fs = gsl_multiroot_fsolver_alloc(mgh_fsolver(s), m->n);
  g->start = gsl_vector_alloc(m->n);
  return (g->fs != NULL || g->fdfs != NULL) && g->start != NULL ? 0 : -1;
}

static void mgh_gsl_free(mgh_gsl *g)
{
  if (g->fs != NULL)
    gsl_multiroot_fsolver_free(g->fs);
  if (g->fdfs != NULL)
    gsl_multiroot_fdfsolver_free(g->fdfs);
  if (g->start != NULL)
    gsl_vector_free(g->start);
}

/*
 * GSL's own loop from the system's start times factor: iterate, then test
 * the residual sum |f_i| < tol, at most max_iter times.  Returns
 * GSL_SUCCESS, the failing status of set or iterate, or GSL_CONTINUE if
 * the budget ran out.
 * The caller turns GSL's error handler off.
 */
static int mgh_gsl_solve(mgh_gsl *g, double factor, double tol, size_t max_iter,
                         size_t *iterations, double *y, double *residual)
{
  gsl_vector *root, *f;
  size_t iter = 0;
  int status;

  g->params.nonfinite = 0;
  mgh_start(g->m, factor, g->start->data);
  if (g->fdfs != NULL) {
    status = gsl_multiroot_fdfsolver_set(g->fdfs, &g->fdf, g->start);
    root = g->fdfs->x;
    f = g->fdfs->f;
  } else {
    status = gsl_multiroot_fsolver_set(g->fs, &g->f, g->start);
    root = g->fs->x;
    f = g->fs->f;
  }
  while (status == GSL_SUCCESS && iter < max_iter) {
    iter++;
    status = g->fdfs != NULL ? gsl_multiroot_fdfsolver_iterate(g->fdfs)
                             : gsl_multiroot_fsolver_iterate(g->fs);
    if (status != GSL_SUCCESS)
      break;
    status = gsl_multiroot_test_residual(f, tol);
    if (status == GSL_SUCCESS)
      break;
    status = GSL_SUCCESS;
    if (iter == max_iter)
      status = GSL_CONTINUE;
  }
  *iterations = iter;
  *residual = 0.0;
  for (size_t i = 0; i < g->m->n; i++) {
    y[i] = gsl_vector_get(root, i);
    *residual += fabs(gsl_vector_get(f, i));
  }
  return status;
}

#endif /* IMP_TESTS_ROOT_MGH_H */

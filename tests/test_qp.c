/*
 * tests/test_qp.c - the QP layer: the interior-point forward on small
 * problems of the Maros-Meszaros convex QP test set and on 250 random QPs
 * with planted solutions in five hard families, gradients of every
 * piece of the data through the KKT conditions against finite
 * differences, the statuses of infeasible, unbounded, non-convex and
 * malformed problems, and the layer in its input modes.
 *
 * The Maros-Meszaros problems are written out below from their
 * definitions (most are Hock and Schittkowski's): objective
 * 1/2 x^T Q x + c^T x + c0, general rows lo <= a^T x <= hi, equality rows,
 * bounds lo <= x <= hi.  The set's published optimal values include the
 * constant c0, which the QP layer does not carry, so the tests add it.
 * Bounds and one-sided rows become rows of G.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp/gradcheck.h"
#include "imp/layer.h"
#include "imp/problem.h"
#include "imp/qp.h"
#include "imp/rng.h"
#include "imp/status.h"

#define INF HUGE_VAL
#define MAXN 16
#define MAXROWS 64

/* A problem as the Maros-Meszaros set states it. */
typedef struct mm_problem {
  const char *name;
  size_t n, nrows, neq;
  double Q[MAXN * MAXN], c[MAXN], c0;
  double rows[MAXROWS * MAXN], row_lo[MAXROWS], row_hi[MAXROWS];
  double eq[MAXROWS * MAXN], eq_rhs[MAXROWS];
  double lo[MAXN], hi[MAXN];
  double optimum; /* the published optimal objective, c0 included */
} mm_problem;

/* The same problem in the layer's form: G z <= h, A z = b. */
typedef struct qp_form {
  imp_qp_dims dims;
  double *Q, *p, *A, *b, *G, *h;
} qp_form;

static void add_row(qp_form *f, const double *a, double sign, double bound)
{
  size_t n = f->dims.nz, i = f->dims.nineq++;

  for (size_t j = 0; j < n; j++)
    f->G[i * n + j] = sign * a[j];
  f->h[i] = sign * bound;
}

/* Finite bounds and one-sided rows become rows of G. */
static qp_form to_form(const mm_problem *mm)
{
  size_t n = mm->n, cap = 2 * (mm->nrows + n);
  qp_form f = {.dims = {.nz = n, .nineq = 0, .neq = mm->neq}};
  double unit[MAXN];

  f.Q = calloc(n * n, sizeof(double));
  f.p = calloc(n, sizeof(double));
  f.G = calloc(cap * n, sizeof(double));
  f.h = calloc(cap, sizeof(double));
  f.A = mm->neq > 0 ? calloc(mm->neq * n, sizeof(double)) : NULL;
  f.b = mm->neq > 0 ? calloc(mm->neq, sizeof(double)) : NULL;
  memcpy(f.Q, mm->Q, n * n * sizeof(double));
  memcpy(f.p, mm->c, n * sizeof(double));
  if (mm->neq > 0) {
    memcpy(f.A, mm->eq, mm->neq * n * sizeof(double));
    memcpy(f.b, mm->eq_rhs, mm->neq * sizeof(double));
  }
  for (size_t i = 0; i < mm->nrows; i++) {
    if (mm->row_hi[i] < INF)
      add_row(&f, mm->rows + i * n, 1.0, mm->row_hi[i]);
    if (mm->row_lo[i] > -INF)
      add_row(&f, mm->rows + i * n, -1.0, mm->row_lo[i]);
  }
  for (size_t j = 0; j < n; j++) {
    memset(unit, 0, sizeof unit);
    unit[j] = 1.0;
    if (mm->hi[j] < INF)
      add_row(&f, unit, 1.0, mm->hi[j]);
    if (mm->lo[j] > -INF)
      add_row(&f, unit, -1.0, mm->lo[j]);
  }
  if (f.dims.nineq == 0) {
    free(f.G);
    free(f.h);
    f.G = f.h = NULL;
  }
  return f;
}

static void form_free(qp_form *f)
{
  free(f->Q);
  free(f->p);
  free(f->A);
  free(f->b);
  free(f->G);
  free(f->h);
}

static imp_qp_data data_of(const qp_form *f)
{
  imp_qp_data d = {
      .Q = f->Q, .p = f->p, .A = f->A, .b = f->b, .G = f->G, .h = f->h};

  return d;
}

/* Free variables: every bound infinite. */
static void free_bounds(mm_problem *mm)
{
  for (size_t j = 0; j < MAXN; j++) {
    mm->lo[j] = -INF;
    mm->hi[j] = INF;
  }
}

static void nonnegative(mm_problem *mm)
{
  for (size_t j = 0; j < MAXN; j++) {
    mm->lo[j] = 0.0;
    mm->hi[j] = INF;
  }
}

/* Set Q[i][j] and Q[j][i]. */
static void sym(mm_problem *mm, size_t i, size_t j, double v)
{
  mm->Q[i * mm->n + j] = v;
  mm->Q[j * mm->n + i] = v;
}

/* HS21: min 0.01 x1^2 + x2^2 - 100, 10 x1 - x2 >= 10, 2 <= x1 <= 50,
 * -50 <= x2 <= 50. */
static void hs21(mm_problem *mm)
{
  memset(mm, 0, sizeof *mm);
  mm->name = "HS21";
  mm->n = 2;
  sym(mm, 0, 0, 0.02);
  sym(mm, 1, 1, 2.0);
  mm->c0 = -100.0;
  mm->nrows = 1;
  mm->rows[0] = 10.0;
  mm->rows[1] = -1.0;
  mm->row_lo[0] = 10.0;
  mm->row_hi[0] = INF;
  mm->lo[0] = 2.0;
  mm->hi[0] = 50.0;
  mm->lo[1] = -50.0;
  mm->hi[1] = 50.0;
  mm->optimum = -99.96;
}

/* HS35: min 9 - 8x1 - 6x2 - 4x3 + 2x1^2 + 2x2^2 + x3^2 + 2x1x2 + 2x1x3,
 * x1 + x2 + 2x3 <= 3, x >= 0. */
static void hs35(mm_problem *mm)
{
  memset(mm, 0, sizeof *mm);
  mm->name = "HS35";
  mm->n = 3;
  sym(mm, 0, 0, 4.0);
  sym(mm, 1, 1, 4.0);
  sym(mm, 2, 2, 2.0);
  sym(mm, 0, 1, 2.0);
  sym(mm, 0, 2, 2.0);
  mm->c[0] = -8.0;
  mm->c[1] = -6.0;
  mm->c[2] = -4.0;
  mm->c0 = 9.0;
  mm->nrows = 1;
  mm->rows[0] = 1.0;
  mm->rows[1] = 1.0;
  mm->rows[2] = 2.0;
  mm->row_lo[0] = -INF;
  mm->row_hi[0] = 3.0;
  nonnegative(mm);
  mm->optimum = 1.0 / 9.0;
}

/* HS51 and HS52 share their constraints' pattern and most of Q:
 * (a x1 - x2)^2 + (x2 + x3 - 2)^2 + (x4 - 1)^2 + (x5 - 1)^2, whose
 * constant is 6. */
static void hs5x(mm_problem *mm, double a)
{
  memset(mm, 0, sizeof *mm);
  mm->n = 5;
  sym(mm, 0, 0, 2.0 * a * a);
  sym(mm, 0, 1, -2.0 * a);
  sym(mm, 1, 1, 4.0);
  sym(mm, 1, 2, 2.0);
  sym(mm, 2, 2, 2.0);
  sym(mm, 3, 3, 2.0);
  sym(mm, 4, 4, 2.0);
  mm->c[1] = -4.0;
  mm->c[2] = -4.0;
  mm->c[3] = -2.0;
  mm->c[4] = -2.0;
  mm->c0 = 6.0;
  mm->neq = 3;
  mm->eq[0 * 5 + 0] = 1.0;
  mm->eq[0 * 5 + 1] = 3.0;
  mm->eq[1 * 5 + 2] = 1.0;
  mm->eq[1 * 5 + 3] = 1.0;
  mm->eq[1 * 5 + 4] = -2.0;
  mm->eq[2 * 5 + 1] = 1.0;
  mm->eq[2 * 5 + 4] = -1.0;
  free_bounds(mm);
}

/* HS51: a = 1, x1 + 3x2 = 4 (Q is only semidefinite). */
static void hs51(mm_problem *mm)
{
  hs5x(mm, 1.0);
  mm->name = "HS51";
  mm->eq_rhs[0] = 4.0;
  mm->optimum = 0.0;
}

/* HS52: a = 4, x1 + 3x2 = 0. */
static void hs52(mm_problem *mm)
{
  hs5x(mm, 4.0);
  mm->name = "HS52";
  mm->optimum = 5.3266476;
}

/* HS76: min x1^2 + x2^2/2 + x3^2 + x4^2/2 - x1x3 + x3x4 - x1 - 3x2 + x3
 * - x4, three rows, x >= 0. */
static void hs76(mm_problem *mm)
{
  static const double rows[12] = {1, 2, 1, 1, 3, 1, 2, -1, 0, 1, 4, 0};

  memset(mm, 0, sizeof *mm);
  mm->name = "HS76";
  mm->n = 4;
  sym(mm, 0, 0, 2.0);
  sym(mm, 1, 1, 1.0);
  sym(mm, 2, 2, 2.0);
  sym(mm, 3, 3, 1.0);
  sym(mm, 0, 2, -1.0);
  sym(mm, 2, 3, 1.0);
  mm->c[0] = -1.0;
  mm->c[1] = -3.0;
  mm->c[2] = 1.0;
  mm->c[3] = -1.0;
  mm->nrows = 3;
  memcpy(mm->rows, rows, sizeof rows);
  mm->row_lo[0] = -INF;
  mm->row_hi[0] = 5.0;
  mm->row_lo[1] = -INF;
  mm->row_hi[1] = 4.0;
  mm->row_lo[2] = 1.5;
  mm->row_hi[2] = INF;
  nonnegative(mm);
  mm->optimum = -4.6818182;
}

/* HS118: 15 variables in 5 periods of 3, separable quadratic costs,
 * ramping ranges between periods, demands, bounds. */
static void hs118(mm_problem *mm)
{
  static const double lin[3] = {2.3, 1.7, 2.2}, quad[3] = {1e-4, 1e-4, 1.5e-4};
  static const double ramp_lo[3] = {-7, -7, -7}, ramp_hi[3] = {6, 7, 6};
  static const double demand[5] = {60, 50, 70, 85, 100};
  static const double lo0[3] = {8, 43, 3}, hi0[3] = {21, 57, 16};
  static const double hik[3] = {90, 120, 60};
  size_t n = 15, r = 0;

  memset(mm, 0, sizeof *mm);
  mm->name = "HS118";
  mm->n = n;
  for (size_t k = 0; k < 5; k++)
    for (size_t u = 0; u < 3; u++) {
      sym(mm, 3 * k + u, 3 * k + u, 2.0 * quad[u]);
      mm->c[3 * k + u] = lin[u];
    }

  /* -7 <= x[3j + u] - x[3(j - 1) + u] <= 6, 7 or 6. */
  for (size_t j = 1; j < 5; j++)
    for (size_t u = 0; u < 3; u++, r++) {
      mm->rows[r * n + 3 * j + u] = 1.0;
      mm->rows[r * n + 3 * (j - 1) + u] = -1.0;
      mm->row_lo[r] = ramp_lo[u];
      mm->row_hi[r] = ramp_hi[u];
    }

  /* The demand of each period. */
  for (size_t k = 0; k < 5; k++, r++) {
    for (size_t u = 0; u < 3; u++)
      mm->rows[r * n + 3 * k + u] = 1.0;
    mm->row_lo[r] = demand[k];
    mm->row_hi[r] = INF;
  }
  mm->nrows = r;
  for (size_t u = 0; u < 3; u++) {
    mm->lo[u] = lo0[u];
    mm->hi[u] = hi0[u];
    for (size_t k = 1; k < 5; k++) {
      mm->lo[3 * k + u] = 0.0;
      mm->hi[3 * k + u] = hik[u];
    }
  }
  mm->optimum = 664.82045;
}

/* GENHS28: min sum_{i<9} (x_i + x_{i+1})^2, x_i + 2x_{i+1} + 3x_{i+2} = 1
 * for i < 8 (Q is only semidefinite). */
static void genhs28(mm_problem *mm)
{
  size_t n = 10;

  memset(mm, 0, sizeof *mm);
  mm->name = "GENHS28";
  mm->n = n;
  for (size_t i = 0; i + 1 < n; i++) {
    mm->Q[i * n + i] += 2.0;
    mm->Q[(i + 1) * n + i + 1] += 2.0;
    mm->Q[i * n + i + 1] += 2.0;
    mm->Q[(i + 1) * n + i] += 2.0;
  }
  mm->neq = n - 2;
  for (size_t i = 0; i + 2 < n; i++) {
    mm->eq[i * n + i] = 1.0;
    mm->eq[i * n + i + 1] = 2.0;
    mm->eq[i * n + i + 2] = 3.0;
    mm->eq_rhs[i] = 1.0;
  }
  free_bounds(mm);
  mm->optimum = 0.92717369;
}

/* ZECEVIC2: min -2x1 - 3x2 + 2x2^2, x1 + x2 <= 2, x1 + 4x2 <= 4,
 * 0 <= x <= 10 (Q is only semidefinite). */
static void zecevic2(mm_problem *mm)
{
  static const double rows[4] = {1, 1, 1, 4};

  memset(mm, 0, sizeof *mm);
  mm->name = "ZECEVIC2";
  mm->n = 2;
  sym(mm, 1, 1, 4.0);
  mm->c[0] = -2.0;
  mm->c[1] = -3.0;
  mm->nrows = 2;
  memcpy(mm->rows, rows, sizeof rows);
  mm->row_lo[0] = mm->row_lo[1] = -INF;
  mm->row_hi[0] = 2.0;
  mm->row_hi[1] = 4.0;
  mm->lo[0] = mm->lo[1] = 0.0;
  mm->hi[0] = mm->hi[1] = 10.0;
  mm->optimum = -4.125;
}

/* QPTEST: min 1.5x1 - 2x2 + 4x1^2 + 2x1x2 + 5x2^2, 2x1 + x2 >= 2,
 * -x1 + 2x2 <= 6, 0 <= x1 <= 20, x2 >= 0. */
static void qptest(mm_problem *mm)
{
  static const double rows[4] = {2, 1, -1, 2};

  memset(mm, 0, sizeof *mm);
  mm->name = "QPTEST";
  mm->n = 2;
  sym(mm, 0, 0, 8.0);
  sym(mm, 0, 1, 2.0);
  sym(mm, 1, 1, 10.0);
  mm->c[0] = 1.5;
  mm->c[1] = -2.0;
  mm->nrows = 2;
  memcpy(mm->rows, rows, sizeof rows);
  mm->row_lo[0] = 2.0;
  mm->row_hi[0] = INF;
  mm->row_lo[1] = -INF;
  mm->row_hi[1] = 6.0;
  mm->lo[0] = 0.0;
  mm->hi[0] = 20.0;
  mm->lo[1] = 0.0;
  mm->hi[1] = INF;
  mm->optimum = 4.3718750;
}

static void (*const mm_set[])(mm_problem *) = {
    hs21, hs35, hs51, hs52, hs76, hs118, genhs28, zecevic2, qptest};
#define MM_COUNT (sizeof mm_set / sizeof mm_set[0])

/* Every problem reaches its published optimum to 1e-6 relative, on each
 * choice of the linear system (the dual one applies where Q is definite
 * and there are no equalities; elsewhere it falls back to the primal). */
START_TEST(test_maros_meszaros)
{
  static const imp_qp_system systems[3] = {
      IMP_QP_SYSTEM_AUTO, IMP_QP_SYSTEM_PRIMAL, IMP_QP_SYSTEM_DUAL};
  static mm_problem mm;
  imp_qp_options opt = {.system = systems[_i % 3]};
  qp_form f;
  imp_qp_data d;
  imp_qp_stats st;
  double y[3 * MAXROWS], obj;
  int rc;

  mm_set[_i / 3](&mm);
  f = to_form(&mm);
  d = data_of(&f);
  rc = imp_qp_solve(&f.dims, 1, &d, y, &opt, &st);
  ck_assert_msg(rc == IMP_OK, "%s: %s (%s)", mm.name, imp_status_name(rc),
                imp_last_error());
  ck_assert_int_eq(imp_qp_objective(&f.dims, 1, &d, y, &obj), IMP_OK);
  obj += mm.c0;

  /* 1e-6 relative to max(1, |f*|): HS51's optimum is 0. */
  ck_assert_msg(fabs(obj - mm.optimum) <= 1e-6 * fmax(1.0, fabs(mm.optimum)),
                "%s: objective %.10g, published %.10g", mm.name, obj,
                mm.optimum);
  ck_assert_msg(st.primal_residual <= 1e-10 && st.dual_residual <= 1e-10 &&
                    st.gap <= 1e-10,
                "%s: residuals %.3g %.3g %.3g", mm.name, st.primal_residual,
                st.dual_residual, st.gap);
  ck_assert(st.iterations > 0 || f.dims.nineq == 0);
  /* HS51, HS52, GENHS28 and ZECEVIC2 have a singular Q. */
  ck_assert_int_eq(st.semidefinite, !strcmp(mm.name, "HS51") ||
                                        !strcmp(mm.name, "HS52") ||
                                        !strcmp(mm.name, "GENHS28") ||
                                        !strcmp(mm.name, "ZECEVIC2"));

  /* The primal system is used where asked, or where the dual one does not
   * apply (m > n by default, a semidefinite Q, equalities). */
  if (opt.system == IMP_QP_SYSTEM_PRIMAL || st.semidefinite || f.dims.neq ||
      (opt.system == IMP_QP_SYSTEM_AUTO && f.dims.nineq > f.dims.nz))
    ck_assert_uint_eq(st.dual_system, 0);

  /* Known solutions: HS51 at (1, 1, 1, 1, 1), HS21 at (2, 0). */
  if (!strcmp(mm.name, "HS51"))
    for (size_t j = 0; j < 5; j++)
      ck_assert_double_eq_tol(y[j], 1.0, 1e-8);
  if (!strcmp(mm.name, "HS21")) {
    ck_assert_double_eq_tol(y[0], 2.0, 1e-8);
    ck_assert_double_eq_tol(y[1], 0.0, 1e-8);
  }
  form_free(&f);
}
END_TEST

/* b = A z0 and p = -(Q z0 + G^T lambda0 + A^T nu0): the data that make
 * (z0, lambda0, nu0) satisfy the equality rows and stationarity of f. */
static void plant_kkt_point(qp_form *f, const double *z0, const double *lam0,
                            const double *nu0)
{
  size_t n = f->dims.nz, m = f->dims.nineq, p = f->dims.neq;

  for (size_t i = 0; i < p; i++)
    f->b[i] = imp__dot(n, f->A + i * n, z0);
  for (size_t j = 0; j < n; j++) {
    double r = 0.0;

    for (size_t l = 0; l < n; l++)
      r += f->Q[j * n + l] * z0[l];
    for (size_t i = 0; i < m; i++)
      r += f->G[i * n + j] * lam0[i];
    for (size_t i = 0; i < p; i++)
      r += f->A[i * n + j] * nu0[i];
    f->p[j] = -r;
  }
}

/*
 * A random QP with a known solution and strict complementarity: z0, the
 * first nact rows of G active with lambda in [0.5, 1.5], the others slack
 * by [0.5, 1.5], then h, b and p chosen to make (z0, lambda0, nu0) its
 * KKT point.  Margins of 0.5 keep the active set fixed under the finite
 * differences' perturbations.
 */
static qp_form random_qp(imp_rng *rng, size_t n, size_t m, size_t p,
                         size_t nact, double *ystar)
{
  qp_form f = {.dims = {.nz = n, .nineq = m, .neq = p}};
  double L[MAXN * MAXN], z0[MAXN], lam0[MAXROWS], nu0[MAXROWS];

  f.Q = calloc(n * n, sizeof(double));
  f.p = calloc(n, sizeof(double));
  f.A = p > 0 ? calloc(p * n, sizeof(double)) : NULL;
  f.b = p > 0 ? calloc(p, sizeof(double)) : NULL;
  f.G = m > 0 ? calloc(m * n, sizeof(double)) : NULL;
  f.h = m > 0 ? calloc(m, sizeof(double)) : NULL;

  /* Q = L L^T + I/2, and a random point with its duals. */
  imp_rng_fill_normal(rng, L, n * n, 0.0, 1.0);
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < n; j++) {
      double q = i == j ? 0.5 : 0.0;

      for (size_t l = 0; l < n; l++)
        q += L[i * n + l] * L[j * n + l] / (double)n;
      f.Q[i * n + j] = q;
    }
  imp_rng_fill_normal(rng, z0, n, 0.0, 1.0);
  imp_rng_fill_normal(rng, nu0, p, 0.0, 1.0);
  if (m > 0)
    imp_rng_fill_normal(rng, f.G, m * n, 0.0, 1.0);
  if (p > 0)
    imp_rng_fill_normal(rng, f.A, p * n, 0.0, 1.0);

  /* h = G z0 + s0, b = A z0, p = -(Q z0 + G^T lambda0 + A^T nu0). */
  for (size_t i = 0; i < m; i++) {
    double gz = imp__dot(n, f.G + i * n, z0), u = imp_rng_uniform(rng);

    lam0[i] = i < nact ? 0.5 + u : 0.0;
    f.h[i] = gz + (i < nact ? 0.0 : 0.5 + u);
  }
  plant_kkt_point(&f, z0, lam0, nu0);
  if (ystar != NULL) {
    memcpy(ystar, z0, n * sizeof(double));
    memcpy(ystar + n, lam0, m * sizeof(double));
    memcpy(ystar + n + m, nu0, p * sizeof(double));
  }
  return f;
}

/* Random problems recover their planted solutions: one with equalities
 * (primal system), one without and with nineq <= nz, which the default
 * solves on the dual system; there the primal system agrees. */
START_TEST(test_planted_solution)
{
  imp_qp_options primal = {.system = IMP_QP_SYSTEM_PRIMAL};
  imp_rng rng;
  double ystar[MAXROWS], y[MAXROWS], y2[MAXROWS];
  qp_form f;
  imp_qp_data d;
  imp_qp_stats st;

  imp_rng_seed(&rng, 11);
  f = random_qp(&rng, 6, 9, 2, 3, ystar);
  d = data_of(&f);
  ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &d, y, NULL, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 0);
  for (size_t i = 0; i < imp_qp_ny(&f.dims); i++)
    ck_assert_double_eq_tol(y[i], ystar[i], 1e-8);
  form_free(&f);

  f = random_qp(&rng, 8, 6, 0, 3, ystar);
  d = data_of(&f);
  ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &d, y, NULL, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 1);
  ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &d, y2, &primal, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 0);
  for (size_t i = 0; i < imp_qp_ny(&f.dims); i++) {
    ck_assert_double_eq_tol(y[i], ystar[i], 1e-8);
    ck_assert_double_eq_tol(y2[i], ystar[i], 1e-8);
  }
  form_free(&f);
}
END_TEST

/* Four copies of one active row, more rows than variables: G Q^-1 G^T has
 * rank 1, and the dual system (asked for) stays definite only through
 * W^-1, which goes to 0 on active rows.  It still finishes there, with the
 * primal system's answer. */
START_TEST(test_dual_degenerate)
{
  imp_qp_dims dims = {.nz = 1, .nineq = 4};
  double Q[1] = {1}, p[1] = {-1}, G[4] = {1, 1, 1, 1}, h[4] = {0};
  imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};
  imp_qp_options dual = {.system = IMP_QP_SYSTEM_DUAL};
  imp_qp_options primal = {.system = IMP_QP_SYSTEM_PRIMAL};
  double y[5], y2[5];
  imp_qp_stats st;

  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, &dual, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 1);
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y2, &primal, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 0);
  ck_assert_double_eq_tol(y[0], 0.0, 1e-9);
  ck_assert_double_eq_tol(y[1] + y[2] + y[3] + y[4], 1.0, 1e-9);
  for (size_t i = 0; i < 5; i++)
    ck_assert_double_eq_tol(y[i], y2[i], 1e-8);

  /* By default, four rows on one variable take the primal system. */
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_OK);
  ck_assert_uint_eq(st.dual_system, 0);
}
END_TEST

/*
 * Families of random QPs that are hard for one part of the method or
 * another, each with a planted KKT point (z0, lambda0, nu0) and Q
 * definite, so that z0 is the unique minimizer and the exact answer:
 *   0 generic: Q = L L^T / n + 1e-3 I;
 *   1 Q near singular: Q = L L^T / n + 1e-6 I, with rank-deficient L
 *     (n / 2 columns) where n > 1;
 *   2 duplicated rows: each odd row of G and h repeats the even one, the
 *     multiplier split between the two (not unique);
 *   3 rows of G scaled by 10^u, u uniform on (-3, 3);
 *   4 weakly active rows: a third of the rows with lambda0 = s0 = 0.
 * A third of the other rows are active (lambda0 in [0.5, 1.5]), the rest
 * slack by [0.5, 1.5].  f holds the sizes on entry.
 */
static void planted_family(imp_rng *rng, int kind, qp_form *f, double *z0)
{
  size_t n = f->dims.nz, m = f->dims.nineq, p = f->dims.neq;
  size_t rank = kind == 1 && n > 1 ? n / 2 : n;
  double *L = malloc(n * rank * sizeof(double));
  double *lam = malloc(m * sizeof(double)), *nu = malloc(p * sizeof(double));

  f->Q = malloc(n * n * sizeof(double));
  f->p = malloc(n * sizeof(double));
  f->G = malloc(m * n * sizeof(double));
  f->h = malloc(m * sizeof(double));
  f->A = p > 0 ? malloc(p * n * sizeof(double)) : NULL;
  f->b = p > 0 ? malloc(p * sizeof(double)) : NULL;
  ck_assert(L && lam && nu && f->Q && f->p && f->G && f->h);
  ck_assert(p == 0 || (f->A && f->b));
  imp_rng_fill_normal(rng, L, n * rank, 0.0, 1.0);
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < n; j++) {
      double q = i == j ? (kind == 1 ? 1e-6 : 1e-3) : 0.0;

      for (size_t l = 0; l < rank; l++)
        q += L[i * rank + l] * L[j * rank + l] / (double)n;
      f->Q[i * n + j] = q;
    }
  imp_rng_fill_normal(rng, f->G, m * n, 0.0, 1.0);
  imp_rng_fill_normal(rng, z0, n, 0.0, 1.0);
  if (p > 0) {
    imp_rng_fill_normal(rng, f->A, p * n, 0.0, 1.0);
    imp_rng_fill_normal(rng, nu, p, 0.0, 1.0);
  }
  for (size_t i = 0; i < m; i++) {
    double u = imp_rng_uniform(rng), s = 0.0, *gi = f->G + i * n;
    int role = (int)(3.0 * imp_rng_uniform(rng)); /* 0 active, else slack */

    if (kind == 2 && i % 2 == 1) {
      memcpy(gi, gi - n, n * sizeof(double));
      f->h[i] = f->h[i - 1];
      lam[i] = lam[i - 1] *= 0.5;
      continue;
    }
    if (kind == 3) {
      double scale = pow(10.0, 6.0 * imp_rng_uniform(rng) - 3.0);

      for (size_t j = 0; j < n; j++)
        gi[j] *= scale;
    }
    lam[i] = 0.0;
    if (kind == 4 && i % 3 == 0)
      ; /* weakly active: lambda0 = s0 = 0 */
    else if (role == 0)
      lam[i] = 0.5 + u;
    else
      s = 0.5 + u;
    f->h[i] = imp__dot(n, gi, z0) + s;
  }
  plant_kkt_point(f, z0, lam, nu);
  free(L);
  free(lam);
  free(nu);
}

/*
 * 250 QPs of those families, in three shapes: nz in 1..40 with nineq in
 * 1..nz (the dual system by default), with nineq in nz+1..2.5 nz (the
 * primal one), or with 1..nz/3 equality rows besides nineq in 1..2 nz;
 * each solved by default and with either system forced, at tol 1e-10.
 * On the families that defeat the primal system's rounding (1 and 3),
 * some QPs finish on the augmented system.
 */
START_TEST(test_random_families)
{
  /* Worst |z - z0| / max(1, |z0|) allowed per family: where Q is near
   * singular, rows are scaled or constraints weakly active, the minimizer
   * moves by about tol over Q's smallest eigenvalue (or sqrt(tol)) under
   * residuals of tol, and 1e-3 is that with a margin. */
  const double bound[5] = {1e-6, 1e-3, 1e-6, 1e-3, 1e-3};
  const imp_qp_system systems[3] = {IMP_QP_SYSTEM_AUTO, IMP_QP_SYSTEM_DUAL,
                                    IMP_QP_SYSTEM_PRIMAL};
  size_t solved = 0, on_dual = 0, augmented = 0;
  imp_rng rng;

  imp_rng_seed(&rng, 2026);
  for (int t = 0; t < 250; t++) {
    int kind = t % 5, shape = t % 10 < 4 ? 0 : t % 10 < 7 ? 1 : 2;
    size_t n = 1 + (size_t)(40.0 * imp_rng_uniform(&rng)), m, neq = 0;
    double u = imp_rng_uniform(&rng), *z0 = malloc(n * sizeof(double)), *y;
    qp_form f;
    imp_qp_data d;

    if (shape == 0)
      m = 1 + (size_t)((double)n * u);
    else if (shape == 1)
      m = n + 1 + (size_t)(1.5 * (double)n * u);
    else {
      m = 1 + (size_t)(2.0 * (double)n * u);
      neq = 1 + (size_t)((double)(n / 3) * imp_rng_uniform(&rng));
    }
    f = (qp_form){.dims = {.nz = n, .nineq = m, .neq = neq}};
    ck_assert_ptr_nonnull(z0);
    planted_family(&rng, kind, &f, z0);
    d = data_of(&f);
    y = malloc(imp_qp_ny(&f.dims) * sizeof(double));
    ck_assert_ptr_nonnull(y);
    for (int s = 0; s < 3; s++) {
      imp_qp_options opt = {.system = systems[s]};
      imp_qp_stats st;
      double err = 0.0, scale = 1.0;

      ck_assert_msg(imp_qp_solve(&f.dims, 1, &d, y, &opt, &st) == IMP_OK,
                    "QP %d (family %d, nz %zu, nineq %zu, neq %zu), system "
                    "%d: %s",
                    t, kind, n, m, neq, s, imp_last_error());
      for (size_t j = 0; j < n; j++) {
        err = fmax(err, fabs(y[j] - z0[j]));
        scale = fmax(scale, fabs(z0[j]));
      }
      ck_assert_msg(err / scale < bound[kind],
                    "QP %d (family %d), system %d: |z - z0| %.3g", t, kind, s,
                    err / scale);
      solved++;
      on_dual += st.dual_system;
      augmented += st.augmented;
    }
    form_free(&f);
    free(z0);
    free(y);
  }
  ck_assert_uint_eq(solved, 750);
  ck_assert_uint_gt(on_dual, 200);
  ck_assert_uint_gt(augmented, 0);
}
END_TEST

/* L(piece) = ybar^T y*(data) with one piece of the data perturbed. */
typedef struct piece_objective {
  qp_form *form;
  unsigned piece;
  const double *ybar;
  double tol;
} piece_objective;

static double *piece_of(qp_form *f, unsigned piece)
{
  switch (piece) {
  case IMP_QP_Q:
    return f->Q;
  case IMP_QP_P:
    return f->p;
  case IMP_QP_A:
    return f->A;
  case IMP_QP_B:
    return f->b;
  case IMP_QP_G:
    return f->G;
  default:
    return f->h;
  }
}

static int solve_objective(void *ctx, const double *params, double *value)
{
  piece_objective *o = ctx;
  imp_qp_options opt = {.tol = o->tol};
  imp_qp_data d = data_of(o->form);
  double y[3 * MAXROWS];
  int rc;

  (void)params; /* the checker perturbs the piece in place */
  rc = imp_qp_solve(&o->form->dims, 1, &d, y, &opt, NULL);
  if (rc != IMP_OK)
    return rc;
  *value = imp__dot(imp_qp_ny(&o->form->dims), o->ybar, y);
  return 0;
}

/* The gradient of every piece, with a cotangent on z, lambda and nu, on a
 * problem with three active inequalities and two equalities. */
START_TEST(test_gradients_each_piece)
{
  static const unsigned pieces[6] = {IMP_QP_Q, IMP_QP_P, IMP_QP_A,
                                     IMP_QP_B, IMP_QP_G, IMP_QP_H};
  static const char *const names[6] = {"Q", "p", "A", "b", "G", "h"};
  imp_rng rng;
  qp_form f;
  imp_qp_data d;
  double y[3 * MAXROWS], ybar[3 * MAXROWS];
  double gQ[MAXN * MAXN] = {0}, gp[MAXN] = {0}, gA[MAXROWS * MAXN] = {0};
  double gb[MAXROWS] = {0}, gG[MAXROWS * MAXN] = {0}, gh[MAXROWS] = {0};
  imp_qp_grad g = {.Q = gQ, .p = gp, .A = gA, .b = gb, .G = gG, .h = gh};
  double *grads[6] = {gQ, gp, gA, gb, gG, gh};
  imp_qp_options opt = {.tol = 1e-13};
  imp_qp_stats st;
  size_t ny;

  imp_rng_seed(&rng, 5);
  f = random_qp(&rng, 5, 7, 2, 3, NULL);
  d = data_of(&f);
  ny = imp_qp_ny(&f.dims);
  imp_rng_fill_normal(&rng, ybar, ny, 0.0, 1.0);
  ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &d, y, &opt, NULL), IMP_OK);
  ck_assert_int_eq(imp_qp_backward(&f.dims, 1, &d, y, ybar, &g, &opt, &st),
                   IMP_OK);
  ck_assert(st.adjoint_cond > 1.0 && st.adjoint_cond < 1e8);
  ck_assert(st.adjoint_residual < 1e-10);

  for (unsigned i = 0; i < 6; i++) {
    piece_objective o = {
        .form = &f, .piece = pieces[i], .ybar = ybar, .tol = 1e-13};
    /* Entries below 1e-4 (inactive rows of G) compare absolutely: the
     * solve's noise divided by the step is about 1e-11 there. */
    imp_gradcheck_options go = {.floor = 1e-4};
    imp_gradcheck_result res;
    int rc = imp_gradcheck(solve_objective, &o, piece_of(&f, pieces[i]),
                           imp_qp_piece_size(&f.dims, pieces[i]), grads[i], &go,
                           &res);

    ck_assert_msg(rc == IMP_OK, "%s: %s", names[i], imp_last_error());
    /* Fourth-order differences of a solve to 1e-13: 1e-6 is ample. */
    ck_assert_msg(res.max_rel_err < 1e-6, "%s: error %.3g at %zu (%g vs %g)",
                  names[i], res.max_rel_err, res.worst, res.analytic,
                  res.numeric);
  }
  form_free(&f);
}
END_TEST

/* A weakly active constraint: min 1/2 (z - a)^2 subject to z <= 0 at
 * a = 0, where lambda = 0 and the slack is 0.  dz/da is 1 on one side and
 * 0 on the other; the backward gives a finite value between them. */
START_TEST(test_weakly_active)
{
  imp_qp_dims dims = {.nz = 1, .nineq = 1, .neq = 0};
  double Q[1] = {1.0}, p[1] = {0.0}, G[1] = {1.0}, h[1] = {0.0};
  imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};
  double y[2], ybar[2] = {1.0, 0.0}, gp[1] = {0.0}, gh[1] = {0.0};
  imp_qp_grad g = {.p = gp, .h = gh};
  double dz_da;

  /* The interior point approaches a degenerate vertex from inside: z and
   * lambda are both of the order of sqrt(gap). */
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
  ck_assert(fabs(y[0]) < 1e-4 && y[1] >= 0.0 && y[1] < 1e-4);
  ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, ybar, &g, NULL, NULL),
                   IMP_OK);

  /* p = -a, so dz/da = -pbar. */
  dz_da = -gp[0];
  ck_assert(isfinite(dz_da) && isfinite(gh[0]));
  ck_assert_msg(dz_da >= 0.0 && dz_da <= 1.0, "dz/da = %g", dz_da);
  ck_assert(gh[0] >= 0.0 && gh[0] <= 1.0);
  ck_assert_double_eq_tol(dz_da + gh[0], 1.0, 1e-8);

  /* The unscaled complementarity row would vanish here: the weight is
   * what keeps the Jacobian regular. */
  {
    imp_qp_kkt kkt = {.dims = dims};
    double w[1], theta[4], jac[4];
    imp_problem prob;

    kkt.w = w;
    ck_assert_int_eq(imp_qp_pack_theta(&dims, &d, 0, theta), IMP_OK);
    ck_assert_int_eq(imp_qp_kkt_problem(&kkt, y, theta, &prob), IMP_OK);
    ck_assert(w[0] > 1e3);
    ck_assert_int_eq(imp_problem_jacobian(&prob, NULL, y, theta, jac, NULL),
                     IMP_OK);
    ck_assert_double_eq_tol(fmax(fabs(jac[2]), fabs(jac[3])), 1.0, 1e-15);
    ck_assert(fmin(fabs(jac[2]), fabs(jac[3])) > 0.01);
  }
}
END_TEST

/*
 * Two copies of one active inequality violate LICQ: the duals are not
 * unique, but the interior point splits them evenly and the weighted rows
 * keep the Jacobian regular; dz/dp is 0, as z is pinned at 0.  Two copies
 * of an equality leave the Jacobian exactly singular: the backward says
 * so and leaves the gradients alone.
 */
START_TEST(test_singular_kkt)
{
  double y[3], ybar[3] = {1.0, 0.0, 0.0}, gp[1] = {0.0};
  imp_qp_grad g = {.p = gp};
  imp_qp_stats st;

  {
    imp_qp_dims dims = {.nz = 1, .nineq = 2, .neq = 0};
    double Q[1] = {1.0}, p[1] = {-1.0}, G[2] = {1.0, 1.0}, h[2] = {0, 0};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
    ck_assert_double_eq_tol(y[0], 0.0, 1e-8);
    ck_assert_double_eq_tol(y[1], y[2], 1e-8);
    ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, ybar, &g, NULL, &st),
                     IMP_OK);
    ck_assert(isfinite(gp[0]) && fabs(gp[0]) < 1e-8);
  }
  {
    imp_qp_dims dims = {.nz = 1, .nineq = 0, .neq = 2};
    double Q[1] = {1.0}, p[1] = {-1.0}, A[2] = {1.0, 1.0}, b[2] = {0, 0};
    imp_qp_data d = {.Q = Q, .p = p, .A = A, .b = b};

    gp[0] = 0.0;
    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
    ck_assert_double_eq_tol(y[0], 0.0, 1e-8);
    ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, ybar, &g, NULL, &st),
                     IMP_ESINGULAR);
    ck_assert(strstr(imp_last_error(), "sample 0") != NULL);
    ck_assert_double_eq(gp[0], 0.0);
  }
}
END_TEST

/* The KKT problem itself: zero residual at the solution, and its vjp in
 * theta and y against finite differences and the dense Jacobian. */
typedef struct residual_objective {
  imp_problem *problem;
  const double *y, *u;
  double *theta;
} residual_objective;

static int residual_dot(void *ctx, const double *params, double *value)
{
  residual_objective *o = ctx;
  double r[3 * MAXROWS];

  (void)params;
  if (imp_problem_residual(o->problem, NULL, o->y, o->theta, r) != IMP_OK)
    return 1;
  *value = imp__dot(o->problem->ny, o->u, r);
  return 0;
}

START_TEST(test_kkt_problem)
{
  imp_rng rng;
  qp_form f;
  imp_qp_data d;
  double y[3 * MAXROWS], r[3 * MAXROWS], u[3 * MAXROWS], w[MAXROWS];
  double theta[1024], tbar[1024] = {0}, vy[3 * MAXROWS], jty[3 * MAXROWS];
  double jac[(3 * MAXROWS) * (3 * MAXROWS)];
  imp_qp_kkt kkt;
  imp_problem prob;
  imp_gradcheck_result res;
  size_t ny, nt;

  imp_rng_seed(&rng, 21);
  f = random_qp(&rng, 4, 6, 2, 2, NULL);
  d = data_of(&f);
  ny = imp_qp_ny(&f.dims);
  nt = imp_qp_ntheta(&f.dims);
  ck_assert(nt <= 1024);
  ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &d, y, NULL, NULL), IMP_OK);
  kkt.dims = f.dims;
  kkt.w = w;
  ck_assert_int_eq(imp_qp_pack_theta(&f.dims, &d, 0, theta), IMP_OK);
  ck_assert_int_eq(imp_qp_kkt_problem(&kkt, y, theta, &prob), IMP_OK);
  ck_assert_uint_eq(prob.ny, ny);
  ck_assert_uint_eq(prob.ntheta, nt);

  /* The solver's y zeroes the residual. */
  ck_assert_int_eq(imp_problem_residual(&prob, NULL, y, theta, r), IMP_OK);
  ck_assert_double_le(imp__nrm2(ny, r), 1e-9);

  /* u^T df/dtheta by the vjp against differences of u^T f. */
  imp_rng_fill_normal(&rng, u, ny, 0.0, 1.0);
  ck_assert_int_eq(imp_problem_vjp(&prob, NULL, y, theta, u, vy, NULL, tbar),
                   IMP_OK);
  {
    residual_objective o = {.problem = &prob, .y = y, .u = u, .theta = theta};

    imp_gradcheck_options go = {.floor = 1e-6};

    ck_assert_int_eq(
        imp_gradcheck(residual_dot, &o, theta, nt, tbar, &go, &res), IMP_OK);
    /* f is linear in theta: only rounding (about 1e-13 absolute, 1e-7
     * against the floor of 1e-6) separates the two. */
    ck_assert_msg(res.max_rel_err <= 1e-6, "error %.3g at %zu: %g vs %g",
                  res.max_rel_err, res.worst, res.analytic, res.numeric);
  }

  /* u^T df/dy by the vjp equals J^T u from the dense Jacobian. */
  ck_assert_int_eq(imp_problem_jacobian(&prob, NULL, y, theta, jac, NULL),
                   IMP_OK);
  for (size_t j = 0; j < ny; j++) {
    jty[j] = 0.0;
    for (size_t i = 0; i < ny; i++)
      jty[j] += jac[i * ny + j] * u[i];
    ck_assert_double_eq_tol(vy[j], jty[j], 1e-12 * (1.0 + fabs(jty[j])));
  }
  form_free(&f);
}
END_TEST

/* A batch with shared and per-sample pieces matches one solve per QP, and
 * the gradient of a shared piece is the sum over the batch. */
START_TEST(test_batch_strides)
{
  enum { B = 3, N = 4, M = 5, P = 1 };
  imp_rng rng;
  qp_form f;
  double pb[B * N], hb[B * M], y[B * (N + M + P)], y1[N + M + P];
  double ybar[B * (N + M + P)], gQ[N * N] = {0}, gp[B * N] = {0};
  double gQ1[N * N] = {0}, gp1[N] = {0};
  imp_qp_data d;
  imp_qp_stats st;
  size_t ny = N + M + P;

  imp_rng_seed(&rng, 8);
  f = random_qp(&rng, N, M, P, 2, NULL);
  for (size_t k = 0; k < B; k++) {
    for (size_t j = 0; j < N; j++)
      pb[k * N + j] = f.p[j] + 0.1 * (double)k * (double)j;
    for (size_t i = 0; i < M; i++)
      hb[k * M + i] = f.h[i] + 0.05 * (double)k;
  }
  imp_rng_fill_normal(&rng, ybar, B * ny, 0.0, 1.0);
  d = data_of(&f);
  d.p = pb;
  d.p_stride = N;
  d.h = hb;
  d.h_stride = M;
  ck_assert_int_eq(imp_qp_solve(&f.dims, B, &d, y, NULL, &st), IMP_OK);
  ck_assert_uint_ge(st.total_iterations, st.iterations);
  {
    imp_qp_grad g = {.Q = gQ, .p = gp, .p_stride = N};

    ck_assert_int_eq(imp_qp_backward(&f.dims, B, &d, y, ybar, &g, NULL, NULL),
                     IMP_OK);
  }

  for (size_t k = 0; k < B; k++) {
    imp_qp_data dk = data_of(&f);
    imp_qp_grad g1 = {.Q = gQ1, .p = gp1};

    dk.p = pb + k * N;
    dk.h = hb + k * M;
    memset(gp1, 0, sizeof gp1);
    ck_assert_int_eq(imp_qp_solve(&f.dims, 1, &dk, y1, NULL, NULL), IMP_OK);
    for (size_t i = 0; i < ny; i++)
      ck_assert_double_eq_tol(y1[i], y[k * ny + i], 1e-12);
    ck_assert_int_eq(
        imp_qp_backward(&f.dims, 1, &dk, y1, ybar + k * ny, &g1, NULL, NULL),
        IMP_OK);
    for (size_t j = 0; j < N; j++)
      ck_assert_double_eq_tol(gp1[j], gp[k * N + j], 1e-10);
  }
  for (size_t i = 0; i < N * N; i++)
    ck_assert_double_eq_tol(gQ1[i], gQ[i], 1e-10);
  form_free(&f);
}
END_TEST

/* Infeasible problems: contradictory bounds, equalities against bounds,
 * inconsistent equalities, an infeasible LP. */
START_TEST(test_infeasible)
{
  double y[16];
  imp_qp_stats st;

  {
    imp_qp_dims dims = {.nz = 1, .nineq = 2};
    double Q[1] = {1}, p[1] = {0}, G[2] = {1, -1}, h[2] = {-1, -1};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EINFEASIBLE);
  }
  {
    imp_qp_dims dims = {.nz = 2, .nineq = 4, .neq = 1};
    double Q[4] = {1, 0, 0, 1}, p[2] = {0, 0}, A[2] = {1, 1}, b[1] = {3};
    double G[8] = {1, 0, 0, 1, -1, 0, 0, -1}, h[4] = {1, 1, 0, 0};
    imp_qp_data d = {.Q = Q, .p = p, .A = A, .b = b, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EINFEASIBLE);
    ck_assert(strstr(imp_last_error(), "infeasible") != NULL);
    ck_assert(strstr(imp_last_error(), "primal residual") != NULL);
    ck_assert_double_gt(st.primal_residual, 1e-3);
  }
  {
    imp_qp_dims dims = {.nz = 2, .neq = 2};
    double Q[4] = {1, 0, 0, 1}, p[2] = {0, 0}, A[4] = {1, 1, 1, 1};
    double b[2] = {1, 2};
    imp_qp_data d = {.Q = Q, .p = p, .A = A, .b = b};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EINFEASIBLE);
  }
  {
    imp_qp_dims dims = {.nz = 2, .nineq = 3};
    double Q[4] = {0}, p[2] = {1, 1}, G[6] = {-1, 0, 0, -1, 1, 1};
    double h[3] = {0, 0, -1};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EINFEASIBLE);
  }
}
END_TEST

/* Unbounded problems: an LP ray, a semidefinite Q with a free direction,
 * an unbounded ray through an equality, and no constraints at all. */
START_TEST(test_unbounded)
{
  double y[16];
  imp_qp_stats st;

  {
    imp_qp_dims dims = {.nz = 1, .nineq = 1};
    double Q[1] = {0}, p[1] = {-1}, G[1] = {-1}, h[1] = {0};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EUNBOUNDED);
    ck_assert(strstr(imp_last_error(), "unbounded") != NULL);
  }
  {
    imp_qp_dims dims = {.nz = 2, .nineq = 1};
    double Q[4] = {2, 0, 0, 0}, p[2] = {0, -1}, G[2] = {0, -1}, h[1] = {0};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EUNBOUNDED);
  }
  {
    imp_qp_dims dims = {.nz = 2, .nineq = 1, .neq = 1};
    double Q[4] = {0}, p[2] = {-1, 0}, A[2] = {1, -1}, b[1] = {0};
    double G[2] = {0, -1}, h[1] = {-1};
    imp_qp_data d = {.Q = Q, .p = p, .A = A, .b = b, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EUNBOUNDED);
  }
  {
    imp_qp_dims dims = {.nz = 2};
    double Q[4] = {1, 0, 0, 0}, p[2] = {0, 1};
    imp_qp_data d = {.Q = Q, .p = p};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, &st), IMP_EUNBOUNDED);
  }
}
END_TEST

/* An indefinite Q is not convex; a semidefinite Q that leaves the
 * minimizer free along a face is reported as not unique. */
START_TEST(test_convexity)
{
  double y[16];

  {
    imp_qp_dims dims = {.nz = 2, .nineq = 2};
    double Q[4] = {1, 0, 0, -1}, p[2] = {0, 1}, G[4] = {1, 0, 0, 1};
    double h[2] = {1, 1};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_ENONCONVEX);
    ck_assert(strstr(imp_last_error(), "eigenvalue is -1") != NULL);
  }
  {
    /* A non-symmetric Q whose symmetric part is definite is fine. */
    imp_qp_dims dims = {.nz = 2};
    double Q[4] = {2, 3, -3, 2}, p[2] = {-2, -4};
    imp_qp_data d = {.Q = Q, .p = p};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
    ck_assert_double_eq_tol(y[0], 1.0, 1e-10);
    ck_assert_double_eq_tol(y[1], 2.0, 1e-10);
  }
  {
    /* min 0 over the box [0, 1]: every point is optimal. */
    imp_qp_dims dims = {.nz = 1, .nineq = 2};
    double Q[1] = {0}, p[1] = {0}, G[2] = {1, -1}, h[2] = {1, 0};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_ESINGULAR);
    ck_assert(strstr(imp_last_error(), "not unique") != NULL);
  }
  {
    /* An LP with a unique vertex is accepted. */
    imp_qp_dims dims = {.nz = 2, .nineq = 2};
    double Q[4] = {0}, p[2] = {1, 1}, G[4] = {-1, 0, 0, -1}, h[2] = {0, 0};
    imp_qp_data d = {.Q = Q, .p = p, .G = G, .h = h};

    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
    ck_assert_double_eq_tol(y[0], 0.0, 1e-8);
    ck_assert_double_eq_tol(y[2], 1.0, 1e-8);
  }
}
END_TEST

/* Malformed input: NULL, zero sizes, NaN, pieces that do not fit. */
START_TEST(test_malformed)
{
  imp_qp_dims dims = {.nz = 2, .nineq = 2, .neq = 1};
  double Q[4] = {1, 0, 0, 1}, p[2] = {1, 1}, A[2] = {1, 1}, b[1] = {1};
  double G[4] = {-1, 0, 0, -1}, h[2] = {0, 0}, y[10], ybar[5] = {1};
  imp_qp_data d = {.Q = Q, .p = p, .A = A, .b = b, .G = G, .h = h}, e;
  imp_qp_dims zero = {0};
  imp_qp_grad g = {0};

  ck_assert_int_eq(imp_qp_solve(NULL, 1, &d, y, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_solve(&dims, 1, NULL, y, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, NULL, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_solve(&zero, 1, &d, y, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_solve(&dims, 0, &d, y, NULL, NULL), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, NULL, &g, NULL, NULL),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, ybar, NULL, NULL, NULL),
                   IMP_EINVAL);

  /* A missing piece, a piece with no rows to fill, overlapping samples. */
  e = d;
  e.G = NULL;
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &e, y, NULL, NULL), IMP_EINVAL);
  {
    imp_qp_dims noeq = {.nz = 2, .nineq = 2, .neq = 0};

    ck_assert_int_eq(imp_qp_solve(&noeq, 1, &d, y, NULL, NULL), IMP_ESHAPE);
    ck_assert(strstr(imp_last_error(), "A is given") != NULL);
  }
  e = d;
  e.Q_stride = 3;
  ck_assert_int_eq(imp_qp_solve(&dims, 2, &e, y, NULL, NULL), IMP_ESHAPE);

  /* NaN and Inf in each piece. */
  for (unsigned i = 0; i < 6; i++) {
    double *piece[6] = {Q, p, A, b, G, h}, keep = piece[i][0];

    piece[i][0] = i % 2 ? NAN : INFINITY;
    ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_ENONFINITE);
    piece[i][0] = keep;
  }
  ck_assert_int_eq(imp_qp_solve(&dims, 1, &d, y, NULL, NULL), IMP_OK);
  ybar[1] = NAN;
  ck_assert_int_eq(imp_qp_backward(&dims, 1, &d, y, ybar, &g, NULL, NULL),
                   IMP_ENONFINITE);
}
END_TEST

/* L = cbar^T layer(x) as a function of the parameters or of x. */
typedef struct layer_objective {
  imp_layer *layer;
  imp_shape in;
  const double *x, *cbar;
  size_t nout;
} layer_objective;

static int layer_loss(void *ctx, const double *params, double *value)
{
  layer_objective *o = ctx;
  double out[256];
  int rc;

  (void)params; /* perturbed in place: the layer's parameters or x */
  rc = imp_layer_forward(o->layer, &o->in, o->x, out);
  if (rc != IMP_OK)
    return rc;
  *value = imp__dot(o->nout, o->cbar, out);
  return 0;
}

/* OptNet's setting: p from each input sample, Q, A, b, G, h learned. */
START_TEST(test_layer_optnet)
{
  enum { B = 3, N = 4, M = 5, P = 1 };
  imp_rng rng;
  qp_form f;
  imp_qp_layer_config cfg = {.dims = {.nz = N, .nineq = M, .neq = P}};
  imp_layer *layer = NULL;
  double x[B * N], out[B * N], cbar[B * N], xbar[B * N] = {0};
  imp_shape in = {.n = B, .c = N, .h = 1, .w = 1}, os;
  imp_gradcheck_options go = {.floor = 1e-4};
  imp_gradcheck_result res;
  size_t off, size;

  imp_rng_seed(&rng, 3);
  f = random_qp(&rng, N, M, P, 2, NULL);
  for (size_t k = 0; k < B; k++)
    for (size_t j = 0; j < N; j++)
      x[k * N + j] = f.p[j] + 0.2 * imp_rng_normal(&rng);
  imp_rng_fill_normal(&rng, cbar, B * N, 0.0, 1.0);
  cfg.learned = IMP_QP_Q | IMP_QP_A | IMP_QP_B | IMP_QP_G | IMP_QP_H;
  cfg.input = IMP_QP_P;
  cfg.values = data_of(&f);
  cfg.options.tol = 1e-13;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, "optnet", &layer), IMP_OK);
  ck_assert_str_eq(imp_layer_kind(layer), "qp");
  ck_assert_uint_eq(imp_layer_nparams(layer), N * N + P * N + P + M * N + M);
  ck_assert_int_eq(imp_qp_layer_param(layer, IMP_QP_G, &off, &size), IMP_OK);
  ck_assert_uint_eq(off, N * N + P * N + P);
  ck_assert_uint_eq(size, M * N);
  ck_assert_double_eq(imp_layer_params(layer)[off], f.G[0]);
  ck_assert_int_eq(imp_qp_layer_param(layer, IMP_QP_P, &off, &size),
                   IMP_EINVAL);
  ck_assert_int_eq(imp_layer_output_shape(layer, &in, &os), IMP_OK);
  ck_assert_uint_eq(os.c, N);

  /* Forward, backward, and both gradients against differences. */
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_OK);
  imp_layer_zero_grad(layer);
  ck_assert_int_eq(imp_layer_backward(layer, xbar, cbar, &in, x, out), IMP_OK);
  {
    layer_objective o = {
        .layer = layer, .in = in, .x = x, .cbar = cbar, .nout = B * N};

    ck_assert_int_eq(imp_gradcheck(layer_loss, &o, imp_layer_params(layer),
                                   imp_layer_nparams(layer),
                                   imp_layer_grads(layer), &go, &res),
                     IMP_OK);
    /* The same solves to 1e-13 as the direct test: 1e-6. */
    ck_assert_msg(res.max_rel_err < 1e-6, "params: %.3g at %zu",
                  res.max_rel_err, res.worst);
    ck_assert_int_eq(imp_gradcheck(layer_loss, &o, x, B * N, xbar, &go, &res),
                     IMP_OK);
    ck_assert_msg(res.max_rel_err < 1e-6, "x: %.3g at %zu", res.max_rel_err,
                  res.worst);
  }

  /* Backward accumulates. */
  {
    double g0 = imp_layer_grads(layer)[0], x0 = xbar[0];

    ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_OK);
    ck_assert_int_eq(imp_layer_backward(layer, xbar, cbar, &in, x, out),
                     IMP_OK);
    ck_assert_double_eq_tol(imp_layer_grads(layer)[0], 2.0 * g0, 1e-9);
    ck_assert_double_eq_tol(xbar[0], 2.0 * x0, 1e-9);
  }
  imp_layer_free(layer);
  form_free(&f);
}
END_TEST

/* Every piece learned, the output (z, lambda, nu). */
START_TEST(test_layer_parametric)
{
  enum { N = 3, M = 4, P = 1, NY = N + M + P };
  imp_rng rng;
  qp_form f;
  imp_qp_layer_config cfg = {.dims = {.nz = N, .nineq = M, .neq = P}};
  imp_layer *layer = NULL;
  double x[1] = {0}, out[NY], cbar[NY];
  imp_shape in = {.n = 1, .c = 0, .h = 1, .w = 1}, os;
  imp_gradcheck_options go = {.floor = 1e-4};
  imp_gradcheck_result res;

  imp_rng_seed(&rng, 4);
  f = random_qp(&rng, N, M, P, 2, NULL);
  imp_rng_fill_normal(&rng, cbar, NY, 0.0, 1.0);
  cfg.learned = IMP_QP_ALL;
  cfg.values = data_of(&f);
  cfg.output_duals = 1;
  cfg.options.tol = 1e-13;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, &layer), IMP_OK);
  ck_assert_str_eq(imp_layer_name(layer), "qp");
  ck_assert_int_eq(imp_layer_output_shape(layer, &in, &os), IMP_OK);
  ck_assert_uint_eq(os.c, NY);
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_OK);
  imp_layer_zero_grad(layer);
  ck_assert_int_eq(imp_layer_backward(layer, NULL, cbar, &in, x, out), IMP_OK);
  {
    layer_objective o = {
        .layer = layer, .in = in, .x = x, .cbar = cbar, .nout = NY};

    ck_assert_int_eq(imp_gradcheck(layer_loss, &o, imp_layer_params(layer),
                                   imp_layer_nparams(layer),
                                   imp_layer_grads(layer), &go, &res),
                     IMP_OK);
    /* Cotangents on the duals too; same solves: 1e-6. */
    ck_assert_msg(res.max_rel_err < 1e-6, "%.3g at %zu (%g vs %g)",
                  res.max_rel_err, res.worst, res.analytic, res.numeric);
  }
  imp_layer_free(layer);
  form_free(&f);
}
END_TEST

/* Layers that cannot be made or cannot take an input. */
START_TEST(test_layer_errors)
{
  double Q[4] = {1, 0, 0, 1}, p[2] = {0, 0}, G[4] = {-1, 0, 0, -1};
  double h[2] = {0, 0}, x[6] = {0}, out[6], ybar[6] = {0};
  imp_qp_layer_config cfg = {.dims = {.nz = 2, .nineq = 2}};
  imp_shape in = {.n = 3, .c = 2, .h = 1, .w = 1}, bad = in;
  imp_layer *layer = NULL;
  size_t off, size;

  cfg.values = (imp_qp_data){.Q = Q, .p = p, .G = G, .h = h};
  cfg.learned = IMP_QP_P;
  cfg.input = IMP_QP_P;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, &layer), IMP_EINVAL);
  ck_assert(strstr(imp_last_error(), "both learned and input") != NULL);
  cfg.input = 0;
  cfg.learned = IMP_QP_A;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, &layer), IMP_ESHAPE);
  cfg.learned = 0;
  cfg.values.G = NULL;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, &layer), IMP_EINVAL);
  ck_assert(strstr(imp_last_error(), "G is fixed") != NULL);
  cfg.values.G = G;
  ck_assert_int_eq(imp_qp_layer_create(NULL, NULL, &layer), IMP_EINVAL);
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, NULL), IMP_EINVAL);

  /* p from the input: samples of 2; a sample of 3 does not fit. */
  cfg.input = IMP_QP_P;
  ck_assert_int_eq(imp_qp_layer_create(&cfg, NULL, &layer), IMP_OK);
  ck_assert_int_eq(imp_layer_backward(layer, NULL, ybar, &in, x, out),
                   IMP_EINVAL);
  bad.c = 3;
  ck_assert_int_eq(imp_layer_forward(layer, &bad, x, out), IMP_ESHAPE);
  x[1] = NAN;
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_ENONFINITE);
  x[1] = -1.0;
  ck_assert_int_eq(imp_layer_forward(layer, &in, x, out), IMP_OK);
  ck_assert_double_eq_tol(out[1], 1.0, 1e-8);
  ck_assert_int_eq(imp_qp_layer_param(layer, IMP_QP_Q, &off, &size),
                   IMP_EINVAL);
  imp_layer_free(layer);
  imp_layer_free(NULL);
}
END_TEST

/* The Euclidean projection onto the probability simplex by sorting
 * (Held, Wolfe and Crowder, 1974): z = max(x - tau, 0) with tau from the
 * sorted x. */
static int descending(const void *a, const void *b)
{
  double u = *(const double *)a, v = *(const double *)b;

  return (u < v) - (u > v);
}

static void simplex_by_sort(size_t n, const double *x, double *z)
{
  double u[MAXN], sum = 0.0, tau = 0.0;

  memcpy(u, x, n * sizeof(double));
  qsort(u, n, sizeof(double), descending);
  for (size_t k = 0; k < n; k++) {
    sum += u[k];
    if (u[k] - (sum - 1.0) / (double)(k + 1) > 0.0)
      tau = (sum - 1.0) / (double)(k + 1);
  }
  for (size_t j = 0; j < n; j++)
    z[j] = fmax(x[j] - tau, 0.0);
}

START_TEST(test_simplex_projection)
{
  enum { B = 20, N = 6 };
  double I[N * N] = {0}, ones[N], one[1] = {1.0}, G[N * N] = {0}, h[N] = {0};
  double x[B * N], px[B * N], y[B * (2 * N + 1)], z[N];
  imp_qp_dims dims = {.nz = N, .nineq = N, .neq = 1};
  imp_qp_data d = {
      .Q = I, .p = px, .A = ones, .b = one, .G = G, .h = h, .p_stride = N};
  imp_rng rng;

  for (size_t j = 0; j < N; j++) {
    I[j * N + j] = 1.0;
    G[j * N + j] = -1.0;
    ones[j] = 1.0;
  }
  imp_rng_seed(&rng, 9);
  imp_rng_fill_normal(&rng, x, B * N, 0.0, 1.0);
  for (size_t i = 0; i < B * N; i++)
    px[i] = -x[i];
  ck_assert_int_eq(imp_qp_solve(&dims, B, &d, y, NULL, NULL), IMP_OK);
  for (size_t k = 0; k < B; k++) {
    simplex_by_sort(N, x + k * N, z);
    for (size_t j = 0; j < N; j++)
      ck_assert_double_eq_tol(y[k * (2 * N + 1) + j], z[j], 1e-8);
  }
}
END_TEST

/* The example at the top of imp/qp.h, as written there. */
START_TEST(test_header_example)
{
  double Q[4] = {1, 0, 0, 1}, p[2] = {-0.8, -0.6}; /* p = -x */
  double A[2] = {1, 1}, b[1] = {1};
  double G[4] = {-1, 0, 0, -1}, h[2] = {0, 0};
  imp_qp_dims d = {.nz = 2, .nineq = 2, .neq = 1};
  imp_qp_data qp = {.Q = Q, .p = p, .A = A, .b = b, .G = G, .h = h};
  double y[5], ybar[5] = {1, 0, 0, 0, 0}, pbar[2] = {0, 0};
  imp_qp_grad g = {.p = pbar};
  int rc = imp_qp_solve(&d, 1, &qp, y, NULL, NULL);

  ck_assert_int_eq(rc, IMP_OK);
  ck_assert_double_eq_tol(y[0], 0.6, 1e-9);
  ck_assert_double_eq_tol(y[1], 0.4, 1e-9);
  rc = imp_qp_backward(&d, 1, &qp, y, ybar, &g, NULL, NULL);
  ck_assert_int_eq(rc, IMP_OK);
  ck_assert_double_eq_tol(pbar[0], -0.5, 1e-9);
  ck_assert_double_eq_tol(pbar[1], 0.5, 1e-9);
}
END_TEST

Suite *qp_suite(void);

Suite *qp_suite(void)
{
  Suite *s = suite_create("qp");
  TCase *tc = tcase_create("maros_meszaros");

  tcase_add_loop_test(tc, test_maros_meszaros, 0, 3 * (int)MM_COUNT);
  suite_add_tcase(s, tc);

  tc = tcase_create("gradients");
  tcase_add_test(tc, test_header_example);
  tcase_add_test(tc, test_planted_solution);
  tcase_add_test(tc, test_dual_degenerate);
  tcase_add_test(tc, test_random_families);
  tcase_add_test(tc, test_gradients_each_piece);
  tcase_add_test(tc, test_weakly_active);
  tcase_add_test(tc, test_singular_kkt);
  tcase_add_test(tc, test_kkt_problem);
  tcase_add_test(tc, test_batch_strides);
  suite_add_tcase(s, tc);

  tc = tcase_create("layer");
  tcase_add_test(tc, test_layer_optnet);
  tcase_add_test(tc, test_layer_parametric);
  tcase_add_test(tc, test_layer_errors);
  tcase_add_test(tc, test_simplex_projection);
  suite_add_tcase(s, tc);

  tc = tcase_create("statuses");
  tcase_add_test(tc, test_infeasible);
  tcase_add_test(tc, test_unbounded);
  tcase_add_test(tc, test_convexity);
  tcase_add_test(tc, test_malformed);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(qp_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

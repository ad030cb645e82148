/*
 * bench/bench_qp.c - the QP layer's forward and backward on a batch of
 * random feasible QPs, against the floor: the LAPACK factorizations alone
 * that the solves need.
 *
 * The problems (as in the OptNet paper's benchmark): for each of `batch`
 * QPs with n variables and m inequalities, L, p, G and z0 standard normal,
 * s0 uniform on (0, 1), and
 *
 *     Q = L L^T + 1e-3 I,   h = G z0 + s0,
 *
 * so that z0 is strictly feasible.  No equality constraints.
 *
 * The floor.  Each interior-point iteration factors one n x n matrix
 * (dpotrf), and so does the convexity check of Q (the start point's
 * factorization is the first iteration's); the backward factors one
 * ny x ny KKT Jacobian (dgetrf, inside imp_adjoint_solve).  The floor is
 * the time of exactly those factorizations, on matrices of the same
 * problems (Q + G^T G for the Cholesky, the KKT Jacobian at the solution
 * for the LU), with the copies that refresh their input timed apart and
 * subtracted.  Everything else (forming K, the solves, the residuals, the
 * condition estimate, the Jacobian's assembly) is overhead against it.
 * The forward has a floor of its own, forward_floor below: every kernel
 * call of the iteration, not just its factorizations.
 *
 * Times are CPU time of the process (CLOCK_PROCESS_CPUTIME_ID), meant for
 * one BLAS thread (OPENBLAS_NUM_THREADS=1), each the best of R runs.
 *
 * Usage: bench_qp [--batch B] [--n N] [--m M] [--seed S] [--reps R]
 *                 [--tol T] [--system auto|primal|dual] [--write FILE]
 * prints the timings, and with --write stores the problems and imp's
 * solutions for bench_qp.py, which compares with cvxopt on them.  The last
 * line of output is one line of JSON with every figure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "core/lapack.h"
#include "imp.h"
#include "imp/qp.h"

/* CPU time of the process: with one BLAS thread, it is the work done, and
 * a shared machine's other load does not count. */
static double seconds(void)
{
  struct timespec t;

  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct problems {
  size_t batch, n, m;
  double *Q, *p, *G, *h; /* batch copies each */
} problems;

static int generate(problems *P, uint64_t seed)
{
  size_t n = P->n, m = P->m, B = P->batch;
  double *L = malloc(n * n * sizeof(double));
  double *z0 = malloc(n * sizeof(double)), *s0 = malloc(m * sizeof(double));
  imp_rng rng;

  P->Q = malloc(B * n * n * sizeof(double));
  P->p = malloc(B * n * sizeof(double));
  P->G = malloc(B * m * n * sizeof(double));
  P->h = malloc(B * m * sizeof(double));
  if (L == NULL || z0 == NULL || s0 == NULL || P->Q == NULL || P->p == NULL ||
      P->G == NULL || P->h == NULL)
    return 1;
  imp_rng_seed(&rng, seed);
  for (size_t k = 0; k < B; k++) {
    double *Q = P->Q + k * n * n, *G = P->G + k * m * n, *h = P->h + k * m;

    imp_rng_fill_normal(&rng, L, n * n, 0.0, 1.0);
    imp_rng_fill_normal(&rng, P->p + k * n, n, 0.0, 1.0);
    imp_rng_fill_normal(&rng, G, m * n, 0.0, 1.0);
    imp_rng_fill_normal(&rng, z0, n, 0.0, 1.0);
    imp_rng_fill_uniform(&rng, s0, m, 0.0, 1.0);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)n, (int)n,
                1.0, L, (int)n, L, (int)n, 0.0, Q, (int)n);
    for (size_t i = 0; i < n; i++)
      Q[i * n + i] += 1e-3;
    for (size_t i = 0; i < m; i++)
      h[i] = cblas_ddot((int)n, G + i * n, 1, z0, 1) + s0[i];
  }
  free(L);
  free(z0);
  free(s0);
  return 0;
}

/* Time `count` factorizations of copies of a (size x size); the copies'
 * own time is measured alone and subtracted. */
static double time_factor(const double *a, size_t size, size_t count,
                          int cholesky, double *work, int *ipiv)
{
  int ni = (int)size, info = 0;
  volatile double sink = 0.0;
  double t0, t_all, t_copy;

  t0 = seconds();
  for (size_t r = 0; r < count; r++) {
    memcpy(work, a, size * size * sizeof(double));
    if (cholesky)
      dpotrf_("L", &ni, work, &ni, &info, 1);
    else
      dgetrf_(&ni, &ni, work, &ni, ipiv, &info);
  }
  t_all = seconds() - t0;
  t0 = seconds();
  for (size_t r = 0; r < count; r++) {
    memcpy(work, a, size * size * sizeof(double));
    sink += work[r % size];
  }
  t_copy = seconds() - t0;
  return t_all - t_copy > 0.0 ? t_all - t_copy : 0.0;
}

/*
 * The forward's floor: the kernels of the iteration on the dual system
 * alone (see src/opt/qp_solve.c), for each QP the Cholesky factorization
 * of Q, MG = LQ^-1 G^T (dtrsm) and C = MG^T MG (dsyrk) once, then per
 * iteration one Cholesky factorization of H = C + W^-1 and two pairs of
 * triangular solves with it (predictor and corrector).  A second pass
 * makes only the copies that refresh the inputs, and its time is
 * subtracted.  Everything else the forward does (the residuals, the step
 * lengths, the checks) is overhead against it.
 */
static double forward_floor(const problems *P, const size_t *iterations)
{
  size_t n = P->n, m = P->m;
  int ni = (int)n, mi = (int)m, info = 0;
  double *LQ = malloc(n * n * sizeof(double));
  double *MG = malloc(n * m * sizeof(double));
  double *C = calloc(m * m, sizeof(double));
  double *H = malloc(m * m * sizeof(double));
  double *v = malloc(m * sizeof(double));
  double t[2] = {0.0, 0.0};

  if (LQ == NULL || MG == NULL || C == NULL || H == NULL || v == NULL)
    t[0] = NAN;
  for (int pass = 0; pass < 2 && !isnan(t[0]); pass++) {
    double t0 = seconds();

    for (size_t k = 0; k < P->batch; k++) {
      memcpy(LQ, P->Q + k * n * n, n * n * sizeof(double));
      memcpy(MG, P->G + k * m * n, m * n * sizeof(double));
      if (pass == 0) {
        dpotrf_("L", &ni, LQ, &ni, &info, 1);
        cblas_dtrsm(CblasColMajor, CblasLeft, CblasLower, CblasNoTrans,
                    CblasNonUnit, ni, mi, 1.0, LQ, ni, MG, ni);
        cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, mi, ni, 1.0, MG, ni,
                    0.0, C, mi);
      }
      for (size_t it = 0; it < iterations[k]; it++) {
        memcpy(H, C, m * m * sizeof(double));
        for (size_t i = 0; i < m; i++)
          H[i * m + i] += 1.0;
        if (pass == 1)
          continue;
        dpotrf_("L", &mi, H, &mi, &info, 1);
        for (int solve = 0; solve < 2; solve++) {
          for (size_t i = 0; i < m; i++)
            v[i] = 1.0;
          cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, mi,
                      H, mi, v, 1);
          cblas_dtrsv(CblasColMajor, CblasLower, CblasTrans, CblasNonUnit, mi,
                      H, mi, v, 1);
        }
      }
    }
    t[pass] = seconds() - t0;
  }
  free(LQ);
  free(MG);
  free(C);
  free(H);
  free(v);
  return t[0] - t[1] > 0.0 ? t[0] - t[1] : 0.0;
}

/* The floor for the whole batch: (iterations + 1) Cholesky factorizations
 * of n x n per QP (Q's, and one per iteration: the start's is the first
 * iteration's), and one LU of the ny x ny KKT Jacobian. */
static int floor_time(const problems *P, const double *y,
                      const size_t *iterations, double *t_chol, double *t_lu)
{
  size_t n = P->n, m = P->m, ny = n + m;
  imp_qp_dims dims = {.nz = n, .nineq = m};
  double *K = malloc(n * n * sizeof(double));
  double *jac = malloc(ny * ny * sizeof(double));
  double *work = malloc(ny * ny * sizeof(double));
  double *theta = malloc(imp_qp_ntheta(&dims) * sizeof(double));
  double *w = malloc(m * sizeof(double));
  int *ipiv = malloc(ny * sizeof(int));
  imp_qp_kkt kkt = {.dims = dims, .w = w};
  int rc = IMP_OK;

  *t_chol = *t_lu = 0.0;
  for (size_t k = 0; k < P->batch && rc == IMP_OK; k++) {
    const double *Q = P->Q + k * n * n, *G = P->G + k * m * n;
    imp_qp_data d = {.Q = Q, .p = P->p + k * n, .G = G, .h = P->h + k * m};
    imp_problem prob;

    /* K = Q + G^T G: definite, of the size and kind the iterations use. */
    memcpy(K, Q, n * n * sizeof(double));
    cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, (int)n, (int)m, 1.0, G,
                (int)n, 1.0, K, (int)n);
    *t_chol += time_factor(K, n, iterations[k] + 1, 1, work, ipiv);

    /* The KKT Jacobian at the solution, as the adjoint solve sees it. */
    rc = imp_qp_pack_theta(&dims, &d, 0, theta);
    if (rc == IMP_OK)
      rc = imp_qp_kkt_problem(&kkt, y + k * ny, theta, &prob);
    if (rc == IMP_OK)
      rc = imp_problem_jacobian(&prob, NULL, y + k * ny, theta, jac, NULL);
    if (rc == IMP_OK)
      *t_lu += time_factor(jac, ny, 1, 0, work, ipiv);
  }
  free(K);
  free(jac);
  free(work);
  free(theta);
  free(w);
  free(ipiv);
  return rc;
}

static int write_problems(const char *path, const problems *P, const double *y)
{
  FILE *f = fopen(path, "wb");
  int64_t head[3] = {(int64_t)P->batch, (int64_t)P->n, (int64_t)P->m};
  size_t B = P->batch, n = P->n, m = P->m, ok = 1;

  if (f == NULL)
    return 1;
  ok &= fwrite(head, sizeof head, 1, f) == 1;
  ok &= fwrite(P->Q, sizeof(double), B * n * n, f) == B * n * n;
  ok &= fwrite(P->p, sizeof(double), B * n, f) == B * n;
  ok &= fwrite(P->G, sizeof(double), B * m * n, f) == B * m * n;
  ok &= fwrite(P->h, sizeof(double), B * m, f) == B * m;
  ok &= fwrite(y, sizeof(double), B * (n + m), f) == B * (n + m);
  ok &= fclose(f) == 0;
  return !ok;
}

int main(int argc, char **argv)
{
  problems P = {.batch = 128, .n = 100, .m = 100};
  size_t reps = 5, ny;
  uint64_t seed = 1;
  const char *out = NULL;
  imp_qp_options opt = {0};
  imp_qp_stats st;
  double *y, *ybar, *gQ, *gp, *gG, *gh, t_fwd = INFINITY, t_bwd = INFINITY;
  double t_chol = INFINITY, t_lu = INFINITY, t_ffloor = INFINITY;
  imp_qp_dims dims;
  size_t *iters;
  imp_qp_data d;
  int rc = IMP_OK;

  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--batch"))
      P.batch = strtoul(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--n"))
      P.n = strtoul(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--m"))
      P.m = strtoul(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--seed"))
      seed = strtoull(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--reps"))
      reps = strtoul(argv[i + 1], NULL, 10);
    else if (!strcmp(argv[i], "--tol"))
      opt.tol = strtod(argv[i + 1], NULL);
    else if (!strcmp(argv[i], "--system"))
      opt.system = !strcmp(argv[i + 1], "primal") ? IMP_QP_SYSTEM_PRIMAL
                   : !strcmp(argv[i + 1], "dual") ? IMP_QP_SYSTEM_DUAL
                                                  : IMP_QP_SYSTEM_AUTO;
    else if (!strcmp(argv[i], "--write"))
      out = argv[i + 1];
    else {
      fprintf(stderr, "%s: unknown option %s\n", argv[0], argv[i]);
      return 2;
    }
  }
  if (P.batch == 0 || P.n == 0 || reps == 0 || generate(&P, seed) != 0) {
    fprintf(stderr, "%s: bad sizes or out of memory\n", argv[0]);
    return 2;
  }
  ny = P.n + P.m;
  dims = (imp_qp_dims){.nz = P.n, .nineq = P.m, .neq = 0};
  y = calloc(P.batch * ny, sizeof(double));
  ybar = calloc(P.batch * ny, sizeof(double));
  gQ = calloc(P.batch * P.n * P.n, sizeof(double));
  gp = calloc(P.batch * P.n, sizeof(double));
  gG = calloc(P.batch * P.m * P.n, sizeof(double));
  gh = calloc(P.batch * P.m, sizeof(double));
  iters = calloc(P.batch, sizeof(size_t));
  d = (imp_qp_data){.Q = P.Q,
                    .p = P.p,
                    .G = P.G,
                    .h = P.h,
                    .Q_stride = P.n * P.n,
                    .p_stride = P.n,
                    .G_stride = P.m * P.n,
                    .h_stride = P.m};
  {
    imp_rng rng;

    imp_rng_seed(&rng, seed + 1);
    for (size_t k = 0; k < P.batch; k++)
      imp_rng_fill_normal(&rng, ybar + k * ny, P.n, 0.0, 1.0);
  }

  /* Iterations per QP, for the floor. */
  for (size_t k = 0; k < P.batch && rc == IMP_OK; k++) {
    imp_qp_data dk = {.Q = P.Q + k * P.n * P.n,
                      .p = P.p + k * P.n,
                      .G = P.G + k * P.m * P.n,
                      .h = P.h + k * P.m};
    imp_qp_stats sk;

    rc = imp_qp_solve(&dims, 1, &dk, y + k * ny, &opt, &sk);
    iters[k] = sk.iterations;
  }

  /* Forward, backward and the floor in turn, each the best of reps, so
   * that a busy machine slows all three alike. */
  for (size_t r = 0; r < reps && rc == IMP_OK; r++) {
    imp_qp_grad g = {.Q = gQ,
                     .p = gp,
                     .G = gG,
                     .h = gh,
                     .Q_stride = P.n * P.n,
                     .p_stride = P.n,
                     .G_stride = P.m * P.n,
                     .h_stride = P.m};
    double t0 = seconds(), t1, t2, tc = 0.0, tl = 0.0;

    rc = imp_qp_solve(&dims, P.batch, &d, y, &opt, &st);
    t1 = seconds();
    if (rc == IMP_OK)
      rc = imp_qp_backward(&dims, P.batch, &d, y, ybar, &g, &opt, NULL);
    t2 = seconds();
    if (rc == IMP_OK)
      rc = floor_time(&P, y, iters, &tc, &tl);
    t_fwd = fmin(t_fwd, t1 - t0);
    t_bwd = fmin(t_bwd, t2 - t1);
    t_chol = fmin(t_chol, tc);
    t_lu = fmin(t_lu, tl);
    t_ffloor = fmin(t_ffloor, forward_floor(&P, iters));
  }
  if (rc != IMP_OK) {
    fprintf(stderr, "bench_qp: %s\n", imp_last_error());
    return 1;
  }
  if (out != NULL && write_problems(out, &P, y) != 0) {
    fprintf(stderr, "bench_qp: cannot write %s\n", out);
    return 1;
  }

  printf("batch of %zu QPs, n = %zu, m = %zu inequalities, best of %zu\n",
         P.batch, P.n, P.m, reps);
  printf("  iterations: max %zu, mean %.1f; residuals: primal %.1e, dual "
         "%.1e, gap %.1e; %zu on the dual system\n",
         st.iterations, (double)st.total_iterations / (double)P.batch,
         st.primal_residual, st.dual_residual, st.gap, st.dual_system);
  printf("  forward                 %8.2f ms\n", 1e3 * t_fwd);
  printf("  forward's floor         %8.2f ms  (its kernels alone: forward / "
         "floor = %.2f)\n",
         1e3 * t_ffloor, t_fwd / t_ffloor);
  printf("  backward                %8.2f ms  (adjoint solves, 6 gradients)\n",
         1e3 * t_bwd);
  printf("  floor: dpotrf x (it+1)  %8.2f ms\n", 1e3 * t_chol);
  printf("  floor: dgetrf of KKT    %8.2f ms\n", 1e3 * t_lu);
  printf("  forward + backward / floor = %.2f\n",
         (t_fwd + t_bwd) / (t_chol + t_lu));
  printf("{\"batch\": %zu, \"n\": %zu, \"m\": %zu, \"forward_s\": %.6f, "
         "\"backward_s\": %.6f, \"floor_chol_s\": %.6f, \"floor_lu_s\": %.6f, "
         "\"floor_forward_s\": %.6f, \"iterations_max\": %zu, "
         "\"iterations_mean\": %.2f}\n",
         P.batch, P.n, P.m, t_fwd, t_bwd, t_chol, t_lu, t_ffloor, st.iterations,
         (double)st.total_iterations / (double)P.batch);

  free(P.Q);
  free(P.p);
  free(P.G);
  free(P.h);
  free(y);
  free(ybar);
  free(gQ);
  free(gp);
  free(gG);
  free(gh);
  free(iters);
  return 0;
}

/*
 * bench/bench_root.c - the root layer's forward against plain GSL.
 *
 * For every More-Garbow-Hillstrom system (tests/root_mgh.h) and every
 * solver, from the standard start and with GSL's test tolerance
 * sum |f_i| < 1e-7, it times N solves two ways in the same process:
 *
 *   imp  one imp_layer_forward on a batch of N samples, each starting
 *        from x0 (the layer reuses one GSL solver);
 *   GSL  the loop a GSL user writes: one solver allocated once, then
 *        set and iterated N times with the same callbacks' arithmetic.
 *
 * The two are interleaved and the best of R rounds is kept.  The table
 * gives microseconds per solve and the ratio imp/GSL per row, per system
 * (summed over the solvers) and overall; the target is an overhead under
 * 5%, a ratio below 1.05.
 *
 * Usage: bench_root [--reps N] [--rounds R] [--solver NAME] [--only SIDE]
 *   --reps N     solves per timing (default 200)
 *   --rounds R   timings per side, the fastest kept (default 5)
 *   --solver S   only that solver (a GSL name: hybrids, newton, ...)
 *   --only SIDE  run only "imp" or only "gsl", for profiling, e.g.
 *                valgrind --tool=callgrind bench_root --reps 20
 *                    --rounds 1 --only imp
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../tests/root_mgh.h"
#include "imp.h"

#define TOL 1e-7
#define MAX_ITER 1000

typedef struct bench_config {
  size_t reps;
  size_t rounds;
  int solver; /* -1: all */
  int run_imp, run_gsl;
} bench_config;

static double now(void)
{
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* N solves by plain GSL; returns the seconds, or -1 if one fails. */
static double time_gsl(mgh_gsl *g, size_t reps, double *y, size_t *iter)
{
  double residual, t0 = now();

  for (size_t k = 0; k < reps; k++)
    if (mgh_gsl_solve(g, 1.0, TOL, MAX_ITER, iter, y, &residual) != GSL_SUCCESS)
      return -1.0;
  return now() - t0;
}

/* One forward of N samples; returns the seconds, or -1 on failure. */
static double time_imp(imp_layer *layer, size_t reps, double *y)
{
  imp_shape in = {reps, 0, 1, 1};
  double x_unused = 0.0, t0 = now();

  if (imp_layer_forward(layer, &in, &x_unused, y) != IMP_OK)
    return -1.0;
  return now() - t0;
}

/* Time one pair; fills the best seconds of each side.  Returns 0, or -1
 * if either side fails to converge (the pair is skipped). */
static int bench_pair(const bench_config *cfg, const mgh_problem *m,
                      imp_root_solver solver, double *best_imp,
                      double *best_gsl, size_t *iterations)
{
  imp_problem p = mgh_imp_problem(m, MGH_JACOBIAN);
  double start[MGH_NMAX], y_gsl[MGH_NMAX];
  imp_root_options opt = {.solver = solver,
                          .residual_tol = TOL,
                          .max_iter = MAX_ITER,
                          .initial = start};
  double *y_imp = malloc(cfg->reps * m->n * sizeof(double));
  imp_layer *layer = NULL;
  mgh_gsl g;
  int rc = 0;

  mgh_start(m, 1.0, start);
  *best_imp = *best_gsl = INFINITY;
  if (y_imp == NULL || mgh_gsl_init(&g, m, solver) != 0)
    return -1;
  if (imp_root_layer_create(&p, NULL, &opt, m->name, &layer) != IMP_OK)
    rc = -1;

  for (size_t round = 0; round < cfg->rounds && rc == 0; round++) {
    double t;

    if (cfg->run_gsl) {
      t = time_gsl(&g, cfg->reps, y_gsl, iterations);
      rc = t < 0.0 ? -1 : rc;
      *best_gsl = fmin(*best_gsl, t);
    }
    if (cfg->run_imp && rc == 0) {
      t = time_imp(layer, cfg->reps, y_imp);
      rc = t < 0.0 ? -1 : rc;
      *best_imp = fmin(*best_imp, t);
    }
  }

  /* Both sides must have found the same root. */
  if (rc == 0 && cfg->run_imp && cfg->run_gsl)
    for (size_t i = 0; i < m->n; i++)
      if (y_imp[(cfg->reps - 1) * m->n + i] != y_gsl[i])
        rc = -1;
  imp_layer_free(layer);
  mgh_gsl_free(&g);
  free(y_imp);
  return rc;
}

static int parse(int argc, char **argv, bench_config *cfg)
{
  cfg->reps = 200;
  cfg->rounds = 5;
  cfg->solver = -1;
  cfg->run_imp = cfg->run_gsl = 1;
  for (int i = 1; i < argc; i++) {
    const char *value = i + 1 < argc ? argv[i + 1] : NULL;
    imp_root_solver s;

    if (value == NULL)
      return -1;
    if (strcmp(argv[i], "--reps") == 0)
      cfg->reps = strtoul(value, NULL, 10);
    else if (strcmp(argv[i], "--rounds") == 0)
      cfg->rounds = strtoul(value, NULL, 10);
    else if (strcmp(argv[i], "--solver") == 0 &&
             imp_root_solver_lookup(value, &s) == IMP_OK)
      cfg->solver = (int)s;
    else if (strcmp(argv[i], "--only") == 0 && strcmp(value, "imp") == 0)
      cfg->run_gsl = 0;
    else if (strcmp(argv[i], "--only") == 0 && strcmp(value, "gsl") == 0)
      cfg->run_imp = 0;
    else
      return -1;
    i++;
  }
  return cfg->reps > 0 && cfg->rounds > 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
  bench_config cfg;
  double total_imp = 0.0, total_gsl = 0.0, log_ratio = 0.0;
  size_t rows = 0;

  if (parse(argc, argv, &cfg) != 0) {
    fprintf(stderr,
            "usage: %s [--reps N] [--rounds R] [--solver NAME] "
            "[--only imp|gsl]\n",
            argv[0]);
    return 2;
  }

  /* Plain GSL must not abort either; imp restores this setting. */
  gsl_set_error_handler_off();
  printf("root layer forward vs plain GSL: %zu solves per timing, best of "
         "%zu, tolerance sum|f| < %g\n\n",
         cfg.reps, cfg.rounds, TOL);
  printf("%-20s %-9s %6s %12s %12s %8s\n", "system", "solver", "iters",
         "imp us", "GSL us", "imp/GSL");

  for (size_t k = 0; k < MGH_NPROBLEMS; k++) {
    const mgh_problem *m = &mgh_problems[k];
    double sys_imp = 0.0, sys_gsl = 0.0;

    fprintf(stderr, "timing %s\n", m->name);
    for (int s = 0; s < IMP_ROOT_NSOLVERS; s++) {
      double t_imp, t_gsl;
      size_t iterations = 0;

      if (cfg.solver >= 0 && s != cfg.solver)
        continue;
      if (bench_pair(&cfg, m, (imp_root_solver)s, &t_imp, &t_gsl,
                     &iterations) != 0) {
        printf("%-20s %-9s  (does not converge or roots differ: "
               "skipped)\n",
               m->name, imp_root_solver_name(s));
        continue;
      }
      if (!cfg.run_imp || !cfg.run_gsl) {
        printf("%-20s %-9s %6s %12.3f %12.3f\n", m->name,
               imp_root_solver_name(s), "",
               cfg.run_imp ? 1e6 * t_imp / cfg.reps : 0.0,
               cfg.run_gsl ? 1e6 * t_gsl / cfg.reps : 0.0);
        continue;
      }
      printf("%-20s %-9s %6zu %12.3f %12.3f %8.3f\n", m->name,
             imp_root_solver_name(s), iterations, 1e6 * t_imp / cfg.reps,
             1e6 * t_gsl / cfg.reps, t_imp / t_gsl);
      sys_imp += t_imp;
      sys_gsl += t_gsl;
      log_ratio += log(t_imp / t_gsl);
      rows++;
    }
    if (sys_gsl > 0.0)
      printf("%-20s %-9s %6s %12.3f %12.3f %8.3f\n\n", m->name, "all", "",
             1e6 * sys_imp / cfg.reps, 1e6 * sys_gsl / cfg.reps,
             sys_imp / sys_gsl);
    total_imp += sys_imp;
    total_gsl += sys_gsl;
  }

  if (rows > 0) {
    printf("overall: imp/GSL = %.3f on total time, geometric mean of the "
           "%zu rows %.3f (target < 1.05)\n",
           total_imp / total_gsl, rows, exp(log_ratio / rows));
  }
  return 0;
}

/*
 * root/internal.h - the GSL workspace shared by imp_root_solve and the
 * root layer.  Not installed.
 */
#ifndef IMP_ROOT_INTERNAL_H
#define IMP_ROOT_INTERNAL_H

#include <stddef.h>

#include <gsl/gsl_multiroots.h>

#include "imp/root.h"

/* Options with the defaults filled in. */
typedef struct imp__root_config {
  imp_root_solver solver;
  double residual_tol;
  double step_tol;
  size_t max_iter;
  int skip_check;
  imp_adjoint_options adjoint;
} imp__root_config;

/*
 * One GSL solver bound to a problem.  The GSL function structs point at
 * this workspace, so it must not move while a solver uses it.  The sample
 * being solved (x, theta) is set before each solve; the wrappers count
 * evaluations and record the first failure of a callback, which GSL only
 * sees as GSL_EBADFUNC.
 */
typedef struct imp__root_work {
  imp_problem problem;
  imp__root_config cfg;
  gsl_multiroot_fsolver *fsolver; /* one of the two is set */
  gsl_multiroot_fdfsolver *fdfsolver;
  gsl_multiroot_function function;
  gsl_multiroot_function_fdf function_fdf;
  gsl_vector *start;      /* ny, the initial guess handed to GSL */
  double *y_copy;         /* ny, for a strided iterate */
  double *r_copy;         /* ny, for a strided residual */
  double *jac;            /* ny x ny, for a padded GSL matrix */
  gsl_matrix *newton_jac; /* ny x ny, J for confirming the step test; these
                             three only with step_tol > 0 */
  double *newton_step;    /* ny, the Newton step -J^-1 f */
  int *newton_pivots;     /* ny, the pivots of J's LU factors */
  const double *x;
  const double *theta;
  size_t residual_evals;
  size_t jacobian_evals;
  int failure; /* the imp status a wrapper recorded, or IMP_OK */
} imp__root_work;

/* What one sample's solve did. */
typedef struct imp__root_sample {
  size_t iterations;
  size_t residual_evals;
  size_t jacobian_evals;
  double residual; /* sum_i |f_i| at the returned or last iterate */
} imp__root_sample;

/* The GSL type of a solver, or NULL if it is not of that family
 * (root/solvers.c). */
const gsl_multiroot_fsolver_type *imp__root_fsolver_type(imp_root_solver s);
const gsl_multiroot_fdfsolver_type *imp__root_fdfsolver_type(imp_root_solver s);

/* Check the options and fill in the defaults.  opt may be NULL. */
int imp__root_configure(const imp_problem *p, const imp_root_options *opt,
                        imp__root_config *cfg);

/* Allocate the GSL solver for an already configured workspace whose
 * problem and cfg are set.  On failure everything is freed. */
int imp__root_work_init(imp__root_work *w);

/* Free what imp__root_work_init allocated; a zeroed workspace is fine. */
void imp__root_work_free(imp__root_work *w);

/* Solve one sample from y (ny), writing the root into y on success and
 * leaving it unchanged on failure.  The caller has turned GSL's error
 * handler off. */
int imp__root_work_solve(imp__root_work *w, const double *x,
                         const double *theta, double *y,
                         imp__root_sample *sample);

/* One sample's backward with a configuration: imp_root_backward. */
int imp__root_backward(const imp_problem *p, const imp__root_config *c,
                       const double *x, const double *theta, const double *y,
                       const double *ybar, double *xbar, double *thetabar,
                       imp_adjoint_stats *stats);

/* The regularity check of backward (root/regular.c). */
int imp__root_check_regular(const imp_problem *p, const imp__root_config *c,
                            const double *x, const double *theta,
                            const double *y);

/* Fail with status rc, putting prefix before the message that the failing
 * call already recorded. */
int imp__root_rewrap(int rc, const char *prefix);

#endif /* IMP_ROOT_INTERNAL_H */

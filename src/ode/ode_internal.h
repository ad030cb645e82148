/*
 * ode/ode_internal.h - the state of a neural ODE layer, shared by the
 * layer (ode.c) and the CVODES driver (integrate.c).  Not installed.
 */
#ifndef IMP_ODE_INTERNAL_H
#define IMP_ODE_INTERNAL_H

#include <stddef.h>

#include <cvodes/cvodes.h>
#include <sundials/sundials_context.h>

#include "imp/ode.h"

typedef struct ode_state ode_state;

/*
 * One CVODES problem: samples first .. first + m - 1 of the batch,
 * stacked into one vector of m dy entries (dy = d - nq: the components
 * that are not quadratures), with the m nq quadratures beside it.  The
 * per-sample mode has one run per sample (m = 1), the system mode one run
 * for the batch.  A run lives
 * from the first forward at a batch size to the next change of batch size
 * (or the layer's end), so forward calls reuse their CVODES memory.
 */
typedef struct ode_run {
  ode_state *st;
  size_t first, m, dim;     /* dim = m dy */
  void *mem;                /* CVODES memory of the forward problem */
  N_Vector y;               /* dim: the state */
  N_Vector atol;            /* dim: per-component tolerances, or NULL */
  N_Vector quad_fwd;        /* m nq: the quadrature components, or NULL */
  N_Vector atol_quad;       /* m nq: their tolerances, or NULL */
  SUNMatrix jac;            /* dim x dim, or NULL */
  SUNLinearSolver ls;       /* forward linear solver, or NULL */
  SUNNonlinearSolver nls;   /* fixed-point solver, or NULL */
  int which;                /* index of the backward problem */
  int has_backward;         /* CVodeCreateB and CVodeInitB done */
  int quad_alive;           /* the backward quadrature is allocated */
  N_Vector lambda;          /* dim: the adjoint */
  double *lambda_q;         /* m nq: the quadratures' adjoint (constant
                               between output times), or NULL */
  N_Vector quad;            /* ntheta: thetabar so far, or NULL */
  SUNMatrix jac_b;          /* backward dense Jacobian, or NULL */
  SUNLinearSolver ls_b;     /* backward linear solver, or NULL */
  SUNNonlinearSolver nls_b; /* backward fixed-point solver, or NULL */
  long checkpoints;         /* checkpoints of the latest forward */
} ode_run;

struct ode_state {
  imp_ode_field field;
  imp_ode_options opt; /* defaults filled in; opt.atol_vec is atol_vec */
  double *atol_vec;    /* d, or NULL */
  size_t dy, nq;       /* d = dy + nq: integrated and quadrature parts */
  double t0;
  double *times; /* ntimes */
  size_t ntimes;
  SUNContext sunctx;

  ode_run *runs;
  size_t nruns;
  size_t batch; /* the batch size the runs were made for */

  /* Scratch for dense Jacobians and their assembly, and for the full
   * d-vectors [y, q] the callbacks see when there are quadratures. */
  double *jac_rows; /* d x d */
  double *unit;     /* d */
  double *column;   /* d */
  double *h_full;   /* d */
  double *v_full;   /* d */
  double *out_full; /* d */

  /* Set for the duration of one pass. */
  const double *theta;       /* the layer's parameters */
  imp_ode_pass_stats *tally; /* where the callbacks count */

  /* The first callback failure of the current CVODES call. */
  int cb_status; /* 0, IMP_ECALLBACK or IMP_ENONFINITE */
  const char *cb_what;
  int cb_code;
  double cb_t;
  size_t cb_sample;
  int nonfinite_count; /* non-finite results in the current call */

  /* SUNDIALS' latest error message, recorded by the error handler. */
  char backend_msg[320];

  /* What the latest training forward kept for backward. */
  int saved;
  size_t saved_n;
  double *saved_x; /* saved_n d */
  size_t saved_x_cap;
  double *saved_theta; /* ntheta */
  double *scratch_y;   /* output of a forward that backward re-runs */
  size_t scratch_cap;

  /* The adjoint pass's results before they are added to the caller's. */
  double *xbar_acc; /* n d */
  size_t xbar_cap;
  double *thetabar_acc; /* ntheta */
  size_t thetabar_cap;

  imp_ode_stats stats;
};

/* Free every run and its CVODES objects. */
void imp__ode_free_runs(ode_state *st);

/*
 * Integrate the batch x (n d) forward and write the trajectories to y
 * (n K d).  With keep = 1 the checkpoints for backward are stored.
 */
int imp__ode_forward(ode_state *st, size_t n, const double *x, double *y,
                     int keep);

/*
 * The adjoint pass for the latest forward (made with keep = 1): from
 * ybar (n K d), accumulate xbar (n d, may be NULL) and thetabar (ntheta).
 */
int imp__ode_backward(ode_state *st, size_t n, const double *ybar, double *xbar,
                      double *thetabar);

#endif /* IMP_ODE_INTERNAL_H */

/*
 * ode/integrate.c - the CVODES side of the neural ODE layer: callbacks
 * that adapt an imp_ode_field to CVODES, the forward integration with
 * checkpoints, and the adjoint pass (see imp/ode.h for the maths).
 *
 * Every CVODES call is checked.  A failure becomes a status through
 * cvodes_failed (or cvls_failed for the linear solver interface), which
 * names CVODES' flag and quotes the message that SUNDIALS would have
 * printed; record_backend_error, installed as the error handler of every
 * CVODES memory, keeps that message instead.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cvodes/cvodes.h>
#include <nvector/nvector_serial.h>
#include <sunlinsol/sunlinsol_band.h>
#include <sunlinsol/sunlinsol_dense.h>
#include <sunlinsol/sunlinsol_spgmr.h>
#include <sunmatrix/sunmatrix_band.h>
#include <sunmatrix/sunmatrix_dense.h>
#include <sunnonlinsol/sunnonlinsol_fixedpoint.h>

#include "core/internal.h"
#include "ode/ode_internal.h"

/* Non-finite callback results tolerated in one CVODES call. */
#define ODE_NONFINITE_RETRIES 10

/* ------------------------------------------------------------------ */
/* Failures                                                             */
/* ------------------------------------------------------------------ */

/* The SUNDIALS error handler: keep the message, print nothing.  Warnings
 * (positive codes) are dropped. */
static void record_backend_error(int code, const char *module,
                                 const char *function, char *msg,
                                 void *user_data)
{
  ode_state *st = user_data;

  (void)module;
  if (code > 0)
    return;
  snprintf(st->backend_msg, sizeof st->backend_msg, "%s: %s", function, msg);
}

/*
 * Has the current CVODES call been cut off from the field?  After a
 * callback failed, or gave NaN or Inf ODE_NONFINITE_RETRIES times, every
 * callback returns -1 without calling the field.  A negative return
 * should end the CVODES call, but CVODES 6.4.1 treats one from the rhs
 * under fixed-point iteration (the default with Adams) as recoverable:
 * it shrinks the step and calls again, up to about max_steps times, and
 * may even step on once the field gives finite values again.  The cut
 * keeps the field from being called after it failed, makes every retry
 * fail at once, and the driver then fails the call whatever CVODES
 * returns.
 */
static int cut_off(const ode_state *st)
{
  return st->cb_status == IMP_ECALLBACK ||
         st->nonfinite_count >= ODE_NONFINITE_RETRIES;
}

/*
 * Record a callback's failure (the first of the current CVODES call; a
 * failing callback outranks a non-finite result) and tell CVODES to stop:
 * a negative return is unrecoverable.
 */
static int callback_failed(ode_state *st, const char *what, double t,
                           size_t sample, int code)
{
  if (st->cb_status != IMP_ECALLBACK) {
    st->cb_status = IMP_ECALLBACK;
    st->cb_what = what;
    st->cb_code = code;
    st->cb_t = t;
    st->cb_sample = sample;
  }
  return -1;
}

/*
 * Record a NaN or Inf in a callback's result.  CVODES may retry with a
 * smaller step (a positive return is recoverable): a trial step can
 * overshoot into a region where g overflows.  After ODE_NONFINITE_RETRIES
 * such results in one CVODES call the failure is made unrecoverable, so
 * that a field that is NaN past some time stops the integration instead of
 * letting CVODES creep towards that time until max_steps.
 */
static int result_nonfinite(ode_state *st, const char *what, double t,
                            size_t sample)
{
  if (st->cb_status == 0) {
    st->cb_status = IMP_ENONFINITE;
    st->cb_what = what;
    st->cb_code = 0;
    st->cb_t = t;
    st->cb_sample = sample;
  }
  st->nonfinite_count++;
  return st->nonfinite_count >= ODE_NONFINITE_RETRIES ? -1 : 1;
}

/*
 * The name of a CVODES flag, as CVodeGetReturnFlagName gives it.  That
 * function mallocs its string and writes into it unchecked, which crashes
 * when memory runs out (found by allocation-failure injection), so the
 * names are kept here instead.
 */
typedef struct cvodes_flag {
  int flag;
  const char *name;
} cvodes_flag;

#define ODE__FLAG(f)                                                           \
  {                                                                            \
    f, #f                                                                      \
  }

/* clang-format off */
static const cvodes_flag cv_flags[] = {
    ODE__FLAG(CV_SUCCESS), ODE__FLAG(CV_TSTOP_RETURN),
    ODE__FLAG(CV_ROOT_RETURN), ODE__FLAG(CV_WARNING),
    ODE__FLAG(CV_TOO_MUCH_WORK), ODE__FLAG(CV_TOO_MUCH_ACC),
    ODE__FLAG(CV_ERR_FAILURE), ODE__FLAG(CV_CONV_FAILURE),
    ODE__FLAG(CV_LINIT_FAIL), ODE__FLAG(CV_LSETUP_FAIL),
    ODE__FLAG(CV_LSOLVE_FAIL), ODE__FLAG(CV_RHSFUNC_FAIL),
    ODE__FLAG(CV_FIRST_RHSFUNC_ERR), ODE__FLAG(CV_REPTD_RHSFUNC_ERR),
    ODE__FLAG(CV_UNREC_RHSFUNC_ERR), ODE__FLAG(CV_RTFUNC_FAIL),
    ODE__FLAG(CV_NLS_INIT_FAIL), ODE__FLAG(CV_NLS_SETUP_FAIL),
    ODE__FLAG(CV_CONSTR_FAIL), ODE__FLAG(CV_NLS_FAIL), ODE__FLAG(CV_MEM_FAIL),
    ODE__FLAG(CV_MEM_NULL), ODE__FLAG(CV_ILL_INPUT), ODE__FLAG(CV_NO_MALLOC),
    ODE__FLAG(CV_BAD_K), ODE__FLAG(CV_BAD_T), ODE__FLAG(CV_BAD_DKY),
    ODE__FLAG(CV_TOO_CLOSE), ODE__FLAG(CV_VECTOROP_ERR), ODE__FLAG(CV_NO_QUAD),
    ODE__FLAG(CV_QRHSFUNC_FAIL), ODE__FLAG(CV_FIRST_QRHSFUNC_ERR),
    ODE__FLAG(CV_REPTD_QRHSFUNC_ERR), ODE__FLAG(CV_UNREC_QRHSFUNC_ERR),
    ODE__FLAG(CV_CONTEXT_ERR), ODE__FLAG(CV_UNRECOGNIZED_ERR),
    ODE__FLAG(CV_NO_ADJ), ODE__FLAG(CV_NO_FWD), ODE__FLAG(CV_NO_BCK),
    ODE__FLAG(CV_BAD_TB0), ODE__FLAG(CV_REIFWD_FAIL), ODE__FLAG(CV_FWD_FAIL),
    ODE__FLAG(CV_GETY_BADT),
};
/* clang-format on */

/* The flags of CVODES' linear solver interface (CVLS). */
static const cvodes_flag cvls_flags[] = {
    ODE__FLAG(CVLS_SUCCESS),         ODE__FLAG(CVLS_MEM_NULL),
    ODE__FLAG(CVLS_LMEM_NULL),       ODE__FLAG(CVLS_ILL_INPUT),
    ODE__FLAG(CVLS_MEM_FAIL),        ODE__FLAG(CVLS_PMEM_NULL),
    ODE__FLAG(CVLS_JACFUNC_UNRECVR), ODE__FLAG(CVLS_JACFUNC_RECVR),
    ODE__FLAG(CVLS_SUNMAT_FAIL),     ODE__FLAG(CVLS_SUNLS_FAIL),
    ODE__FLAG(CVLS_NO_ADJ),          ODE__FLAG(CVLS_LMEMB_NULL)};

static const char *name_of(const cvodes_flag *table, size_t n, int flag)
{
  for (size_t i = 0; i < n; i++)
    if (table[i].flag == flag)
      return table[i].name;
  return "an unknown flag";
}

static const char *cv_flag_name(int flag)
{
  return name_of(cv_flags, sizeof cv_flags / sizeof cv_flags[0], flag);
}

static const char *cvls_flag_name(int flag)
{
  return name_of(cvls_flags, sizeof cvls_flags / sizeof cvls_flags[0], flag);
}

/* The status for a CVODES failure flag, before callbacks are considered. */
static int status_of_flag(int flag)
{
  switch (flag) {
  case CV_TOO_MUCH_WORK:
  case CV_TOO_MUCH_ACC:
  case CV_ERR_FAILURE:
  case CV_CONV_FAILURE:
    return IMP_ENOCONV;
  case CV_RHSFUNC_FAIL:
  case CV_FIRST_RHSFUNC_ERR:
  case CV_REPTD_RHSFUNC_ERR:
  case CV_UNREC_RHSFUNC_ERR:
  case CV_QRHSFUNC_FAIL:
  case CV_FIRST_QRHSFUNC_ERR:
  case CV_REPTD_QRHSFUNC_ERR:
  case CV_UNREC_QRHSFUNC_ERR:
    return IMP_ECALLBACK;
  case CV_MEM_FAIL:
    return IMP_ENOMEM;
  case CV_TOO_CLOSE:
    return IMP_EINVAL;
  default:
    return IMP_EBACKEND;
  }
}

/*
 * Did CVODES run out of steps because it kept shrinking its step in front
 * of a NaN or Inf?  With fixed-point iteration it can creep towards the
 * first time where g is not finite, in steps that no longer move t.
 */
static int stalled(const ode_state *st, void *mem, int flag)
{
  double h = 0.0, tcur = 0.0;

  if (flag != CV_TOO_MUCH_WORK || st->cb_status != IMP_ENONFINITE ||
      mem == NULL)
    return 0;
  CVodeGetCurrentStep(mem, &h);
  CVodeGetCurrentTime(mem, &tcur);
  return fabs(h) <= 1e3 * DBL_EPSILON * fmax(1.0, fabs(tcur));
}

/*
 * Turn a failed CVODES call into a status with a message that names the
 * flag.  A callback failure recorded during the call decides the status
 * and is described first; so do non-finite results once they reached
 * ODE_NONFINITE_RETRIES, and fewer of them unless CVODES ran out of steps
 * or of precision for another reason.  The flag may be a success: CVODES
 * can return one after the callbacks were cut off (see cut_off).
 */
static int cvodes_failed(ode_state *st, const ode_run *run, int flag,
                         const char *call, double t, void *mem)
{
  const char *flag_name = cv_flag_name(flag);
  int status = status_of_flag(flag);
  char where[64], when[48] = "";
  int rc;

  if (cut_off(st) ||
      (st->cb_status == IMP_ENONFINITE && flag != CV_TOO_MUCH_WORK &&
       flag != CV_TOO_MUCH_ACC) ||
      stalled(st, mem, flag))
    status = st->cb_status;
  if (run->m == 1)
    snprintf(where, sizeof where, "sample %zu", run->first);
  else
    snprintf(where, sizeof where, "batch of %zu", run->m);
  if (!isnan(t))
    snprintf(when, sizeof when, " towards t = %g", t);

  if (status == IMP_ECALLBACK && st->cb_status == IMP_ECALLBACK)
    rc = imp__fail(status,
                   "ode: the %s callback returned %d at t = %g "
                   "(sample %zu); %s returned %s",
                   st->cb_what, st->cb_code, st->cb_t, st->cb_sample, call,
                   flag_name);
  else if (status == IMP_ENONFINITE && cut_off(st))
    rc = imp__fail(status,
                   "ode: callbacks gave NaN or Inf %d times in one %s "
                   "call, the most tolerated, the %s callback first at "
                   "t = %g (sample %zu); %s returned %s",
                   st->nonfinite_count, call, st->cb_what, st->cb_t,
                   st->cb_sample, call, flag_name);
  else if (status == IMP_ENONFINITE)
    rc = imp__fail(status,
                   "ode: the %s callback gave NaN or Inf at t = %g "
                   "(sample %zu); %s returned %s",
                   st->cb_what, st->cb_t, st->cb_sample, call, flag_name);
  else
    rc = imp__fail(status, "ode: %s: %s%s returned %s: %s", where, call, when,
                   flag_name, st->backend_msg);
  return rc;
}

/* A failed call of CVODES' linear solver interface (CVLS flags). */
static int cvls_failed(ode_state *st, const ode_run *run, int flag,
                       const char *call)
{
  (void)run;
  return imp__fail(flag == CVLS_MEM_FAIL ? IMP_ENOMEM : IMP_EBACKEND,
                   "ode: %s returned %s: %s", call, cvls_flag_name(flag),
                   st->backend_msg);
}

/* Check a call of the linear solver interface. */
#define ODE__CHECK_LS(st, run, name, call)                                     \
  do {                                                                         \
    int ode__flag;                                                             \
    (st)->backend_msg[0] = '\0';                                               \
    ode__flag = (call);                                                        \
    if (ode__flag < 0)                                                         \
      return cvls_failed((st), (run), ode__flag, (name));                      \
  } while (0)

/* Check a CVODES set-up or output call. */
#define ODE__CHECK(st, run, name, call)                                        \
  do {                                                                         \
    int ode__flag;                                                             \
    (st)->cb_status = 0;                                                       \
    (st)->nonfinite_count = 0;                                                 \
    (st)->backend_msg[0] = '\0';                                               \
    ode__flag = (call);                                                        \
    if (ode__flag < 0)                                                         \
      return cvodes_failed((st), (run), ode__flag, (name), NAN, NULL);         \
  } while (0)

/* ------------------------------------------------------------------ */
/* Callbacks                                                            */
/* ------------------------------------------------------------------ */

/*
 * The full d-vector [y, q] of one sample as the field sees it: y itself
 * when there are no quadrature components, else a copy in buf with q
 * appended (zeros for q = NULL: the field does not depend on q).
 */
static const double *full_vector(const ode_state *st, double *buf,
                                 const double *y, const double *q)
{
  if (st->nq == 0)
    return y;
  memcpy(buf, y, st->dy * sizeof(double));
  if (q != NULL)
    memcpy(buf + st->dy, q, st->nq * sizeof(double));
  else
    memset(buf + st->dy, 0, st->nq * sizeof(double));
  return buf;
}

/* g of one sample into st->out_full (or straight into out when there
 * are no quadratures); returns the callback's verdict for CVODES. */
static int field_rhs(ode_state *st, double t, const double *y, double *out,
                     size_t sample)
{
  const imp_ode_field *f = &st->field;
  const double *h;
  double *g = st->nq > 0 ? st->out_full : out;
  int rc;

  if (cut_off(st))
    return -1;
  h = full_vector(st, st->h_full, y, NULL);
  rc = f->rhs(f->ctx, &t, h, st->theta, g);
  st->tally->rhs_evals++;
  if (rc != 0)
    return callback_failed(st, "rhs", t, sample, rc);
  if (!imp__all_finite(g, f->d))
    return result_nonfinite(st, "rhs", t, sample);
  return 0;
}

/* The forward right-hand side: the integrated part of g, sample by
 * sample. */
static int rhs_forward(sunrealtype t, N_Vector y, N_Vector ydot,
                       void *user_data)
{
  ode_run *run = user_data;
  ode_state *st = run->st;
  const double *h = N_VGetArrayPointer(y);
  double *out = N_VGetArrayPointer(ydot);
  size_t dy = st->dy;

  for (size_t i = 0; i < run->m; i++) {
    int rc = field_rhs(st, t, h + i * dy, out + i * dy, run->first + i);

    if (rc != 0)
      return rc;
    if (st->nq > 0)
      memcpy(out + i * dy, st->out_full, dy * sizeof(double));
  }
  return 0;
}

/* The forward quadratures: the last nq components of g. */
static int quad_forward(sunrealtype t, N_Vector y, N_Vector qdot,
                        void *user_data)
{
  ode_run *run = user_data;
  ode_state *st = run->st;
  const double *h = N_VGetArrayPointer(y);
  double *out = N_VGetArrayPointer(qdot);

  for (size_t i = 0; i < run->m; i++) {
    int rc = field_rhs(st, t, h + i * st->dy, NULL, run->first + i);

    if (rc != 0)
      return rc;
    memcpy(out + i * st->nq, st->out_full + st->dy, st->nq * sizeof(double));
  }
  return 0;
}

/* Forward Newton-Krylov: Jv = (dg/dh) v through the field's jvp. */
static int jtimes_forward(N_Vector v, N_Vector jv, sunrealtype t, N_Vector y,
                          N_Vector fy, void *user_data, N_Vector tmp)
{
  ode_run *run = user_data;
  ode_state *st = run->st;
  const imp_ode_field *f = &st->field;
  const double *h = N_VGetArrayPointer(y);
  const double *u = N_VGetArrayPointer(v);
  double *out = N_VGetArrayPointer(jv);
  size_t dy = st->dy;

  (void)fy;
  (void)tmp;
  if (cut_off(st))
    return -1;
  for (size_t i = 0; i < run->m; i++) {
    const double *hi = full_vector(st, st->h_full, h + i * dy, NULL);
    const double *ui = full_vector(st, st->v_full, u + i * dy, NULL);
    double *oi = st->nq > 0 ? st->out_full : out + i * dy;
    int rc = f->jvp(f->ctx, &t, hi, st->theta, ui, oi);

    st->tally->jvp_evals++;
    if (rc != 0)
      return callback_failed(st, "jvp", t, run->first + i, rc);
    if (!imp__all_finite(oi, f->d))
      return result_nonfinite(st, "jvp", t, run->first + i);
    if (st->nq > 0)
      memcpy(out + i * dy, oi, dy * sizeof(double));
  }
  return 0;
}

/*
 * The d x d Jacobian dg/dh of one sample at (t, y), row-major into
 * st->jac_rows: from the jacobian callback, else column by column from
 * the jvp, else row by row from the vjp.
 */
static int field_jacobian(ode_state *st, double t, const double *y,
                          size_t sample)
{
  const imp_ode_field *f = &st->field;
  const double *h;
  size_t d = f->d;
  double *jac = st->jac_rows;
  int rc;

  if (cut_off(st))
    return -1;
  h = full_vector(st, st->h_full, y, NULL);
  st->tally->jacobian_evals++;
  if (f->jacobian != NULL) {
    rc = f->jacobian(f->ctx, &t, h, st->theta, jac);
    if (rc != 0)
      return callback_failed(st, "jacobian", t, sample, rc);
  } else if (f->jvp != NULL) {
    for (size_t j = 0; j < d; j++) {
      st->unit[j] = 1.0;
      rc = f->jvp(f->ctx, &t, h, st->theta, st->unit, st->column);
      st->unit[j] = 0.0;
      st->tally->jvp_evals++;
      if (rc != 0)
        return callback_failed(st, "jvp", t, sample, rc);
      for (size_t i = 0; i < d; i++)
        jac[i * d + j] = st->column[i];
    }
  } else {
    for (size_t i = 0; i < d; i++) {
      st->unit[i] = 1.0;
      rc = f->vjp(f->ctx, &t, h, st->theta, st->unit, jac + i * d, NULL, NULL);
      st->unit[i] = 0.0;
      st->tally->vjp_evals++;
      if (rc != 0)
        return callback_failed(st, "vjp", t, sample, rc);
    }
  }

  if (!imp__all_finite(jac, d * d))
    return result_nonfinite(st, "jacobian", t, sample);
  return 0;
}

/* Entry (i, j) of a dense or band matrix. */
static void matrix_set(SUNMatrix a, size_t i, size_t j, double value)
{
  if (SUNMatGetID(a) == SUNMATRIX_BAND)
    SM_ELEMENT_B(a, (sunindextype)i, (sunindextype)j) = value;
  else
    SM_ELEMENT_D(a, (sunindextype)i, (sunindextype)j) = value;
}

/*
 * A Jacobian of the run, block diagonal over its samples (a band of
 * half-width dy - 1 when the run has several): each block is the
 * integrated part of dg/dh (sign +1, forward) or minus its transpose
 * (sign -1, the adjoint's).
 */
static int dense_blocks(ode_run *run, double t, const double *h, SUNMatrix jac,
                        int sign)
{
  ode_state *st = run->st;
  size_t d = st->field.d, dy = st->dy;

  SUNMatZero(jac);
  for (size_t i = 0; i < run->m; i++) {
    int rc = field_jacobian(st, t, h + i * dy, run->first + i);

    if (rc != 0)
      return rc;
    for (size_t r = 0; r < dy; r++)
      for (size_t c = 0; c < dy; c++) {
        double v = st->jac_rows[r * d + c];

        if (sign > 0)
          matrix_set(jac, i * dy + r, i * dy + c, v);
        else
          matrix_set(jac, i * dy + c, i * dy + r, -v);
      }
  }
  return 0;
}

/* Forward dense Newton. */
static int jac_forward(sunrealtype t, N_Vector y, N_Vector fy, SUNMatrix jac,
                       void *user_data, N_Vector tmp1, N_Vector tmp2,
                       N_Vector tmp3)
{
  (void)fy;
  (void)tmp1;
  (void)tmp2;
  (void)tmp3;
  return dense_blocks(user_data, t, N_VGetArrayPointer(y), jac, 1);
}

/*
 * -(dg/dh)^T v for each sample, integrated part only: the adjoint's
 * right-hand side when v is lambda with the quadratures' adjoint lambda_q
 * appended, and its Jacobian-vector product when lambda_q is NULL.
 */
static int adjoint_vjp(ode_run *run, double t, const double *h, const double *v,
                       const double *lambda_q, double *out)
{
  ode_state *st = run->st;
  const imp_ode_field *f = &st->field;
  size_t dy = st->dy, nq = st->nq;

  if (cut_off(st))
    return -1;
  for (size_t i = 0; i < run->m; i++) {
    const double *hi = full_vector(st, st->h_full, h + i * dy, NULL);
    const double *vi = full_vector(st, st->v_full, v + i * dy,
                                   lambda_q != NULL ? lambda_q + i * nq : NULL);
    double *oi = nq > 0 ? st->out_full : out + i * dy;
    int rc = f->vjp(f->ctx, &t, hi, st->theta, vi, oi, NULL, NULL);

    st->tally->vjp_evals++;
    if (rc != 0)
      return callback_failed(st, "vjp", t, run->first + i, rc);
    if (!imp__all_finite(oi, f->d))
      return result_nonfinite(st, "vjp", t, run->first + i);
    for (size_t j = 0; j < dy; j++)
      out[i * dy + j] = -oi[j];
  }
  return 0;
}

/* The adjoint's right-hand side: dlambda/dt = -(dg/dh)^T lambda. */
static int rhs_backward(sunrealtype t, N_Vector y, N_Vector yb, N_Vector ybdot,
                        void *user_data)
{
  ode_run *run = user_data;

  return adjoint_vjp(run, t, N_VGetArrayPointer(y), N_VGetArrayPointer(yb),
                     run->lambda_q, N_VGetArrayPointer(ybdot));
}

/* Backward Newton-Krylov: J_B v = -(dg/dh)^T v, an exact vjp. */
static int jtimes_backward(N_Vector vb, N_Vector jvb, sunrealtype t, N_Vector y,
                           N_Vector yb, N_Vector fyb, void *user_data,
                           N_Vector tmpb)
{
  (void)yb;
  (void)fyb;
  (void)tmpb;
  return adjoint_vjp(user_data, t, N_VGetArrayPointer(y),
                     N_VGetArrayPointer(vb), NULL, N_VGetArrayPointer(jvb));
}

/* Backward dense Newton: J_B = -(dg/dh)^T, block by block. */
static int jac_backward(sunrealtype t, N_Vector y, N_Vector yb, N_Vector fyb,
                        SUNMatrix jac, void *user_data, N_Vector tmp1,
                        N_Vector tmp2, N_Vector tmp3)
{
  (void)yb;
  (void)fyb;
  (void)tmp1;
  (void)tmp2;
  (void)tmp3;
  return dense_blocks(user_data, t, N_VGetArrayPointer(y), jac, -1);
}

/* The backward quadrature: dqB/dt = -(dg/dtheta)^T lambda, summed over
 * the run's samples. */
static int quad_backward(sunrealtype t, N_Vector y, N_Vector yb, N_Vector qbdot,
                         void *user_data)
{
  ode_run *run = user_data;
  ode_state *st = run->st;
  const imp_ode_field *f = &st->field;
  const double *h = N_VGetArrayPointer(y);
  const double *lambda = N_VGetArrayPointer(yb);
  double *q = N_VGetArrayPointer(qbdot);
  size_t dy = st->dy, nq = st->nq;

  if (cut_off(st))
    return -1;
  memset(q, 0, f->ntheta * sizeof(double));
  for (size_t i = 0; i < run->m; i++) {
    const double *hi = full_vector(st, st->h_full, h + i * dy, NULL);
    const double *vi =
        full_vector(st, st->v_full, lambda + i * dy,
                    run->lambda_q != NULL ? run->lambda_q + i * nq : NULL);
    int rc = f->vjp(f->ctx, &t, hi, st->theta, vi, NULL, NULL, q);

    st->tally->vjp_evals++;
    if (rc != 0)
      return callback_failed(st, "vjp", t, run->first + i, rc);
  }

  if (!imp__all_finite(q, f->ntheta))
    return result_nonfinite(st, "vjp", t, run->first);
  for (size_t j = 0; j < f->ntheta; j++)
    q[j] = -q[j];
  return 0;
}

/* ------------------------------------------------------------------ */
/* Runs: creation and release                                           */
/* ------------------------------------------------------------------ */

static int uses_newton(const ode_state *st)
{
  if (st->opt.iteration == IMP_ODE_ITER_AUTO)
    return st->opt.method == IMP_ODE_BDF;
  return st->opt.iteration == IMP_ODE_ITER_NEWTON;
}

static int uses_dense(const ode_state *st)
{
  if (st->opt.linsol == IMP_ODE_LINSOL_AUTO)
    return st->field.jacobian != NULL;
  return st->opt.linsol == IMP_ODE_LINSOL_DENSE;
}

static int lmm_of(const ode_state *st)
{
  return st->opt.method == IMP_ODE_BDF ? CV_BDF : CV_ADAMS;
}

/* Newton's matrix and direct solver: dense for one sample, banded for
 * the block diagonal of several (each block couples only its own dy
 * components, so the half-width is dy - 1). */
static int make_direct_solver(const ode_state *st, const ode_run *run,
                              N_Vector y, SUNMatrix *jac, SUNLinearSolver *ls)
{
  sunindextype dim = (sunindextype)run->dim;
  sunindextype w = (sunindextype)st->dy - 1;

  *jac = run->m == 1 ? SUNDenseMatrix(dim, dim, st->sunctx)
                     : SUNBandMatrix(dim, w, w, st->sunctx);
  if (*jac == NULL)
    return imp__fail(IMP_ENOMEM, "ode: Newton matrix of %zu", run->dim);
  *ls = run->m == 1 ? SUNLinSol_Dense(y, *jac, st->sunctx)
                    : SUNLinSol_Band(y, *jac, st->sunctx);
  if (*ls == NULL)
    return imp__fail(IMP_ENOMEM, "ode: direct linear solver");
  return IMP_OK;
}

/* Attach the forward corrector: fixed point, or Newton with a direct or
 * Krylov linear solver. */
static int attach_forward_solvers(ode_state *st, ode_run *run)
{
  if (!uses_newton(st)) {
    run->nls = SUNNonlinSol_FixedPoint(run->y, st->opt.anderson_m, st->sunctx);
    if (run->nls == NULL)
      return imp__fail(IMP_ENOMEM, "ode: SUNNonlinSol_FixedPoint");
    ODE__CHECK(st, run, "CVodeSetNonlinearSolver",
               CVodeSetNonlinearSolver(run->mem, run->nls));
    return IMP_OK;
  }

  if (uses_dense(st)) {
    IMP__TRY(make_direct_solver(st, run, run->y, &run->jac, &run->ls));
    ODE__CHECK_LS(st, run, "CVodeSetLinearSolver",
                  CVodeSetLinearSolver(run->mem, run->ls, run->jac));
    if (st->field.jacobian != NULL || st->field.jvp != NULL)
      ODE__CHECK_LS(st, run, "CVodeSetJacFn",
                    CVodeSetJacFn(run->mem, jac_forward));
    return IMP_OK;
  }

  run->ls =
      SUNLinSol_SPGMR(run->y, SUN_PREC_NONE, st->opt.krylov_dim, st->sunctx);
  if (run->ls == NULL)
    return imp__fail(IMP_ENOMEM, "ode: SUNLinSol_SPGMR");
  ODE__CHECK_LS(st, run, "CVodeSetLinearSolver",
                CVodeSetLinearSolver(run->mem, run->ls, NULL));
  if (st->field.jvp != NULL)
    ODE__CHECK_LS(st, run, "CVodeSetJacTimes",
                  CVodeSetJacTimes(run->mem, NULL, jtimes_forward));
  return IMP_OK;
}

/* A vector of m copies of the n tolerances tol (or of the scalar atol). */
static N_Vector repeated_tolerances(const ode_state *st, const double *tol,
                                    size_t n, size_t m)
{
  N_Vector v = N_VNew_Serial((sunindextype)(n * m), st->sunctx);
  double *a;

  if (v == NULL)
    return NULL;
  a = N_VGetArrayPointer(v);
  for (size_t i = 0; i < m; i++)
    for (size_t j = 0; j < n; j++)
      a[i * n + j] = tol != NULL ? tol[j] : st->opt.atol;
  return v;
}

/* The forward quadratures: error-controlled, at the forward tolerances. */
static int quad_forward_init(ode_state *st, ode_run *run)
{
  size_t nq = st->nq;
  const double *tol = st->atol_vec != NULL ? st->atol_vec + st->dy : NULL;

  run->quad_fwd = N_VNew_Serial((sunindextype)(run->m * nq), st->sunctx);
  run->atol_quad = repeated_tolerances(st, tol, nq, run->m);
  if (run->quad_fwd == NULL || run->atol_quad == NULL)
    return imp__fail(IMP_ENOMEM, "ode: %zu quadratures", run->m * nq);
  N_VConst(0.0, run->quad_fwd);
  ODE__CHECK(st, run, "CVodeQuadInit",
             CVodeQuadInit(run->mem, quad_forward, run->quad_fwd));
  ODE__CHECK(st, run, "CVodeQuadSVtolerances",
             CVodeQuadSVtolerances(run->mem, st->opt.rtol, run->atol_quad));
  ODE__CHECK(st, run, "CVodeSetQuadErrCon",
             CVodeSetQuadErrCon(run->mem, SUNTRUE));
  return IMP_OK;
}

/* Make the CVODES memory of one run, with its adjoint memory. */
static int run_create(ode_state *st, ode_run *run, size_t first, size_t m)
{
  const imp_ode_options *o = &st->opt;

  run->st = st;
  run->first = first;
  run->m = m;
  run->dim = m * st->dy;
  run->y = N_VNew_Serial((sunindextype)run->dim, st->sunctx);
  if (run->y == NULL)
    return imp__fail(IMP_ENOMEM, "ode: state vector of %zu", run->dim);
  N_VConst(0.0, run->y);

  run->mem = CVodeCreate(lmm_of(st), st->sunctx);
  if (run->mem == NULL)
    return imp__fail(IMP_ENOMEM, "ode: CVodeCreate");
  ODE__CHECK(st, run, "CVodeSetErrHandlerFn",
             CVodeSetErrHandlerFn(run->mem, record_backend_error, st));
  ODE__CHECK(st, run, "CVodeInit",
             CVodeInit(run->mem, rhs_forward, st->t0, run->y));
  ODE__CHECK(st, run, "CVodeSetUserData", CVodeSetUserData(run->mem, run));

  /* Tolerances: a per-component vector repeats atol_vec for each sample. */
  if (st->atol_vec != NULL) {
    run->atol = repeated_tolerances(st, st->atol_vec, st->dy, m);
    if (run->atol == NULL)
      return imp__fail(IMP_ENOMEM, "ode: tolerance vector");
    ODE__CHECK(st, run, "CVodeSVtolerances",
               CVodeSVtolerances(run->mem, o->rtol, run->atol));
  } else {
    ODE__CHECK(st, run, "CVodeSStolerances",
               CVodeSStolerances(run->mem, o->rtol, o->atol));
  }
  if (st->nq > 0)
    IMP__TRY(quad_forward_init(st, run));

  ODE__CHECK(st, run, "CVodeSetMaxNumSteps",
             CVodeSetMaxNumSteps(run->mem, o->max_steps));
  ODE__CHECK(st, run, "CVodeSetMaxOrd", CVodeSetMaxOrd(run->mem, o->max_order));
  if (o->max_step > 0.0)
    ODE__CHECK(st, run, "CVodeSetMaxStep",
               CVodeSetMaxStep(run->mem, o->max_step));
  IMP__TRY(attach_forward_solvers(st, run));

  ODE__CHECK(st, run, "CVodeAdjInit",
             CVodeAdjInit(run->mem, o->checkpoint_steps,
                          o->interp == IMP_ODE_POLYNOMIAL ? CV_POLYNOMIAL
                                                          : CV_HERMITE));
  return IMP_OK;
}

/* Free one run: CVODES' memory first (it frees the backward problems),
 * then the solvers, matrices and vectors the run made. */
static void run_free(ode_run *run)
{
  N_Vector vectors[] = {run->y,         run->atol,   run->quad_fwd,
                        run->atol_quad, run->lambda, run->quad};

  if (run->mem != NULL)
    CVodeFree(&run->mem);
  if (run->nls != NULL)
    SUNNonlinSolFree(run->nls);
  if (run->nls_b != NULL)
    SUNNonlinSolFree(run->nls_b);
  if (run->ls != NULL)
    SUNLinSolFree(run->ls);
  if (run->ls_b != NULL)
    SUNLinSolFree(run->ls_b);
  if (run->jac != NULL)
    SUNMatDestroy(run->jac);
  if (run->jac_b != NULL)
    SUNMatDestroy(run->jac_b);
  for (size_t i = 0; i < sizeof vectors / sizeof vectors[0]; i++)
    if (vectors[i] != NULL)
      N_VDestroy(vectors[i]);
  free(run->lambda_q);
  memset(run, 0, sizeof *run);
}

void imp__ode_free_runs(ode_state *st)
{
  for (size_t r = 0; r < st->nruns; r++)
    run_free(&st->runs[r]);
  free(st->runs);
  st->runs = NULL;
  st->nruns = 0;
  st->batch = 0;
  st->saved = 0;
}

/* Make sure there are runs for a batch of n: one per sample, or one. */
static int ensure_runs(ode_state *st, size_t n)
{
  size_t nruns = st->opt.batch == IMP_ODE_BATCH_SAMPLES ? n : 1;

  if (st->runs != NULL && st->batch == n)
    return IMP_OK;
  imp__ode_free_runs(st);

  st->runs = calloc(nruns, sizeof *st->runs);
  if (st->runs == NULL)
    return imp__fail(IMP_ENOMEM, "ode: %zu runs", nruns);
  st->nruns = nruns;
  st->batch = n;
  for (size_t r = 0; r < nruns; r++) {
    int rc = nruns == 1 ? run_create(st, &st->runs[r], 0, n)
                        : run_create(st, &st->runs[r], r, 1);

    if (rc != IMP_OK) {
      imp__ode_free_runs(st);
      return rc;
    }
  }
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Forward                                                              */
/* ------------------------------------------------------------------ */

/* Copy the run's state (m dy) and quadratures (m nq, may be NULL) into
 * output time k of each of its samples. */
static void scatter_output(const ode_state *st, const ode_run *run,
                           const double *state, const double *quad, size_t k,
                           double *y)
{
  size_t d = st->field.d, dy = st->dy, nq = st->nq, row = st->ntimes * d;

  for (size_t i = 0; i < run->m; i++) {
    double *out = y + (run->first + i) * row + k * d;

    memcpy(out, state + i * dy, dy * sizeof(double));
    if (nq > 0)
      memcpy(out + dy, quad + i * nq, nq * sizeof(double));
  }
}

/* Split the run's samples of x (n d) into state and quadratures. */
static void gather_input(const ode_state *st, const ode_run *run,
                         const double *x, double *state, double *quad)
{
  size_t d = st->field.d, dy = st->dy, nq = st->nq;

  for (size_t i = 0; i < run->m; i++) {
    const double *xi = x + (run->first + i) * d;

    memcpy(state + i * dy, xi, dy * sizeof(double));
    if (nq > 0)
      memcpy(quad + i * nq, xi + dy, nq * sizeof(double));
  }
}

/* Add CVODES' counters of one memory into a tally. */
static void add_counters(void *mem, int has_ls, imp_ode_pass_stats *tally)
{
  long nst = 0, netf = 0, nni = 0, nncf = 0, nli = 0;

  CVodeGetNumSteps(mem, &nst);
  CVodeGetNumErrTestFails(mem, &netf);
  CVodeGetNonlinSolvStats(mem, &nni, &nncf);
  if (has_ls)
    CVodeGetNumLinIters(mem, &nli);
  tally->steps += nst;
  tally->error_test_fails += netf;
  tally->nonlin_iters += nni;
  tally->nonlin_conv_fails += nncf;
  tally->linear_iters += nli;
}

/* Integrate the run from output time to output time, writing y; at t0
 * itself the output is x (state and quadratures still hold it). */
static int forward_outputs(ode_state *st, ode_run *run, double *y, int keep,
                           int *ncheck)
{
  double *state = N_VGetArrayPointer(run->y);
  double *quad = st->nq > 0 ? N_VGetArrayPointer(run->quad_fwd) : NULL;
  double tret;

  for (size_t k = 0; k < st->ntimes; k++) {
    double tk = st->times[k];
    int flag;

    if (tk == st->t0) {
      scatter_output(st, run, state, quad, k, y);
      continue;
    }
    st->cb_status = 0;
    st->nonfinite_count = 0;
    st->backend_msg[0] = '\0';
    if (keep)
      flag = CVodeF(run->mem, tk, run->y, &tret, CV_NORMAL, ncheck);
    else
      flag = CVode(run->mem, tk, run->y, &tret, CV_NORMAL);
    /* CVODES 6.4 can go on, and even succeed, after a callback failed
     * unrecoverably: a cut-off (see cut_off) fails the pass whatever
     * CVODES returned. */
    if (flag < 0 || cut_off(st))
      return cvodes_failed(st, run, flag, keep ? "CVodeF" : "CVode", tk,
                           run->mem);
    if (quad != NULL)
      ODE__CHECK(st, run, "CVodeGetQuad",
                 CVodeGetQuad(run->mem, &tret, run->quad_fwd));
    scatter_output(st, run, state, quad, k, y);
  }
  return IMP_OK;
}

static int run_forward(ode_state *st, ode_run *run, const double *x, double *y,
                       int keep)
{
  double *state = N_VGetArrayPointer(run->y);
  double *quad = st->nq > 0 ? N_VGetArrayPointer(run->quad_fwd) : NULL;
  int ncheck = 0, rc;

  /* Start from x.  CVODES' adjoint module changes the first step of the
   * forward memory when it recomputes; set it back each time. */
  gather_input(st, run, x, state, quad);
  ODE__CHECK(st, run, "CVodeSetInitStep",
             CVodeSetInitStep(run->mem, st->opt.init_step));
  ODE__CHECK(st, run, "CVodeReInit", CVodeReInit(run->mem, st->t0, run->y));
  if (quad != NULL)
    ODE__CHECK(st, run, "CVodeQuadReInit",
               CVodeQuadReInit(run->mem, run->quad_fwd));
  if (keep)
    ODE__CHECK(st, run, "CVodeAdjReInit", CVodeAdjReInit(run->mem));

  /* CVodeReInit zeroed CVODES' counters, so from here on they hold this
   * pass's work: they are added whether or not the integration succeeds,
   * so that the statistics of a failed pass agree with the callbacks'
   * counts, which are kept as the callbacks run. */
  rc = forward_outputs(st, run, y, keep, &ncheck);
  run->checkpoints = ncheck;
  st->stats.checkpoints += ncheck;
  add_counters(run->mem, run->ls != NULL, st->tally);
  return rc;
}

int imp__ode_forward(ode_state *st, size_t n, const double *x, double *y,
                     int keep)
{
  st->saved = 0;
  IMP__TRY(ensure_runs(st, n));

  memset(&st->stats.forward, 0, sizeof st->stats.forward);
  st->stats.checkpoints = 0;
  st->stats.systems = st->nruns;
  st->stats.samples = n;
  st->tally = &st->stats.forward;
  for (size_t r = 0; r < st->nruns; r++)
    IMP__TRY(run_forward(st, &st->runs[r], x, y, keep));
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Backward                                                             */
/* ------------------------------------------------------------------ */

/* Attach the backward corrector, of the same kind as the forward one. */
static int attach_backward_solvers(ode_state *st, ode_run *run)
{
  if (!uses_newton(st)) {
    run->nls_b =
        SUNNonlinSol_FixedPoint(run->lambda, st->opt.anderson_m, st->sunctx);
    if (run->nls_b == NULL)
      return imp__fail(IMP_ENOMEM, "ode: SUNNonlinSol_FixedPoint");
    ODE__CHECK(st, run, "CVodeSetNonlinearSolverB",
               CVodeSetNonlinearSolverB(run->mem, run->which, run->nls_b));
    return IMP_OK;
  }

  if (uses_dense(st)) {
    IMP__TRY(make_direct_solver(st, run, run->lambda, &run->jac_b, &run->ls_b));
    ODE__CHECK_LS(
        st, run, "CVodeSetLinearSolverB",
        CVodeSetLinearSolverB(run->mem, run->which, run->ls_b, run->jac_b));
    ODE__CHECK_LS(st, run, "CVodeSetJacFnB",
                  CVodeSetJacFnB(run->mem, run->which, jac_backward));
    return IMP_OK;
  }

  run->ls_b = SUNLinSol_SPGMR(run->lambda, SUN_PREC_NONE, st->opt.krylov_dim,
                              st->sunctx);
  if (run->ls_b == NULL)
    return imp__fail(IMP_ENOMEM, "ode: SUNLinSol_SPGMR");
  ODE__CHECK_LS(st, run, "CVodeSetLinearSolverB",
                CVodeSetLinearSolverB(run->mem, run->which, run->ls_b, NULL));
  ODE__CHECK_LS(st, run, "CVodeSetJacTimesB",
                CVodeSetJacTimesB(run->mem, run->which, NULL, jtimes_backward));
  return IMP_OK;
}

/* Make the run's backward problem (once per run), starting at tb. */
static int backward_create(ode_state *st, ode_run *run, double tb)
{
  const imp_ode_options *o = &st->opt;
  void *mem_b;

  run->lambda = N_VNew_Serial((sunindextype)run->dim, st->sunctx);
  if (run->lambda == NULL)
    return imp__fail(IMP_ENOMEM, "ode: adjoint vector of %zu", run->dim);
  N_VConst(0.0, run->lambda);
  if (st->nq > 0) {
    run->lambda_q = imp__dalloc(run->m * st->nq);
    if (run->lambda_q == NULL)
      return imp__fail(IMP_ENOMEM, "ode: quadratures' adjoint");
  }
  if (st->field.ntheta > 0) {
    run->quad = N_VNew_Serial((sunindextype)st->field.ntheta, st->sunctx);
    if (run->quad == NULL)
      return imp__fail(IMP_ENOMEM, "ode: quadrature of %zu", st->field.ntheta);
    N_VConst(0.0, run->quad);
  }

  ODE__CHECK(st, run, "CVodeCreateB",
             CVodeCreateB(run->mem, lmm_of(st), &run->which));
  ODE__CHECK(st, run, "CVodeInitB",
             CVodeInitB(run->mem, run->which, rhs_backward, tb, run->lambda));
  run->has_backward = 1;
  mem_b = CVodeGetAdjCVodeBmem(run->mem, run->which);
  if (mem_b == NULL)
    return imp__fail(IMP_EBACKEND, "ode: CVodeGetAdjCVodeBmem gave NULL");
  ODE__CHECK(st, run, "CVodeSetErrHandlerFn",
             CVodeSetErrHandlerFn(mem_b, record_backend_error, st));
  ODE__CHECK(st, run, "CVodeSStolerancesB",
             CVodeSStolerancesB(run->mem, run->which, o->adjoint_rtol,
                                o->adjoint_atol));
  ODE__CHECK(st, run, "CVodeSetUserDataB",
             CVodeSetUserDataB(run->mem, run->which, run));
  ODE__CHECK(st, run, "CVodeSetMaxNumStepsB",
             CVodeSetMaxNumStepsB(run->mem, run->which, o->adjoint_max_steps));
  ODE__CHECK(st, run, "CVodeSetMaxOrdB",
             CVodeSetMaxOrdB(run->mem, run->which, o->max_order));
  if (o->max_step > 0.0)
    ODE__CHECK(st, run, "CVodeSetMaxStepB",
               CVodeSetMaxStepB(run->mem, run->which, o->max_step));
  return attach_backward_solvers(st, run);
}

/* Start (or restart) the thetabar quadrature from run->quad. */
static int quad_start(ode_state *st, ode_run *run)
{
  const imp_ode_options *o = &st->opt;

  if (run->quad_alive) {
    ODE__CHECK(st, run, "CVodeQuadReInitB",
               CVodeQuadReInitB(run->mem, run->which, run->quad));
    return IMP_OK;
  }
  ODE__CHECK(st, run, "CVodeQuadInitB",
             CVodeQuadInitB(run->mem, run->which, quad_backward, run->quad));
  run->quad_alive = 1;
  ODE__CHECK(st, run, "CVodeQuadSStolerancesB",
             CVodeQuadSStolerancesB(run->mem, run->which, o->adjoint_rtol,
                                    o->adjoint_atol_quad));
  ODE__CHECK(st, run, "CVodeSetQuadErrConB",
             CVodeSetQuadErrConB(run->mem, run->which,
                                 o->quad_errcon_off ? SUNFALSE : SUNTRUE));
  return IMP_OK;
}

/* Add the cotangent of output time k into the run's adjoint: its
 * integrated part into lambda, its quadrature part into lambda_q. */
static void gather_cotangent(const ode_state *st, const ode_run *run,
                             const double *ybar, size_t k, double *lambda)
{
  size_t d = st->field.d, dy = st->dy, nq = st->nq, row = st->ntimes * d;

  for (size_t i = 0; i < run->m; i++) {
    const double *src = ybar + (run->first + i) * row + k * d;

    for (size_t j = 0; j < dy; j++)
      lambda[i * dy + j] += src[j];
    for (size_t j = 0; j < nq; j++)
      run->lambda_q[i * nq + j] += src[dy + j];
  }
}

/* Integrate lambda and thetabar backward from tc to tprev. */
static int backward_segment(ode_state *st, ode_run *run, double tc,
                            double tprev)
{
  void *mem_b;
  double tret;
  int flag, rc;

  ODE__CHECK(st, run, "CVodeReInitB",
             CVodeReInitB(run->mem, run->which, tc, run->lambda));
  if (run->quad != NULL)
    IMP__TRY(quad_start(st, run));

  st->cb_status = 0;
  st->nonfinite_count = 0;
  st->backend_msg[0] = '\0';
  flag = CVodeB(run->mem, tprev, CV_NORMAL);
  mem_b = CVodeGetAdjCVodeBmem(run->mem, run->which);

  /* CVodeReInitB zeroed the backward memory's counters, and the next one
   * will again: add them now, on failure too (as in the forward pass). */
  rc = flag < 0 || cut_off(st)
           ? cvodes_failed(st, run, flag, "CVodeB", tprev, mem_b)
           : IMP_OK;
  if (mem_b != NULL)
    add_counters(mem_b, run->ls_b != NULL, st->tally);
  if (rc != IMP_OK)
    return rc;
  ODE__CHECK(st, run, "CVodeGetB",
             CVodeGetB(run->mem, run->which, &tret, run->lambda));
  if (run->quad != NULL)
    ODE__CHECK(st, run, "CVodeGetQuadB",
               CVodeGetQuadB(run->mem, run->which, &tret, run->quad));
  return IMP_OK;
}

static int run_backward(ode_state *st, ode_run *run, const double *ybar,
                        double *xbar, double *thetabar)
{
  size_t d = st->field.d, K = st->ntimes;
  double tc = st->times[K - 1];
  double *lambda;

  if (!run->has_backward)
    IMP__TRY(backward_create(st, run, tc));
  lambda = N_VGetArrayPointer(run->lambda);

  /* lambda(t_K) = ybar_K; thetabar starts at zero. */
  memset(lambda, 0, run->dim * sizeof(double));
  if (run->lambda_q != NULL)
    memset(run->lambda_q, 0, run->m * st->nq * sizeof(double));
  gather_cotangent(st, run, ybar, K - 1, lambda);
  if (run->quad != NULL)
    N_VConst(0.0, run->quad);

  /* From each output time to the one before, adding its cotangent. */
  for (size_t k = K; k-- > 0;) {
    double tprev = k > 0 ? st->times[k - 1] : st->t0;

    if (tprev < tc) {
      IMP__TRY(backward_segment(st, run, tc, tprev));
      lambda = N_VGetArrayPointer(run->lambda);
      tc = tprev;
    }
    if (k > 0)
      gather_cotangent(st, run, ybar, k - 1, lambda);
  }

  /* xbar += lambda(t0) (and lambda_q), thetabar += qB(t0). */
  if (xbar != NULL)
    for (size_t i = 0; i < run->m; i++) {
      double *xi = xbar + (run->first + i) * d;

      for (size_t j = 0; j < st->dy; j++)
        xi[j] += lambda[i * st->dy + j];
      for (size_t j = 0; j < st->nq; j++)
        xi[st->dy + j] += run->lambda_q[i * st->nq + j];
    }
  if (run->quad != NULL) {
    const double *q = N_VGetArrayPointer(run->quad);

    for (size_t j = 0; j < st->field.ntheta; j++)
      thetabar[j] += q[j];
  }

  /* With one run per sample, keep one quadrature history at a time. */
  if (st->nruns > 1 && run->quad_alive) {
    CVodeQuadFree(CVodeGetAdjCVodeBmem(run->mem, run->which));
    run->quad_alive = 0;
  }
  return IMP_OK;
}

int imp__ode_backward(ode_state *st, size_t n, const double *ybar, double *xbar,
                      double *thetabar)
{
  if (!st->saved || st->saved_n != n || st->batch != n)
    return imp__fail(IMP_EINVAL, "ode: backward without a matching "
                                 "training forward");

  memset(&st->stats.backward, 0, sizeof st->stats.backward);
  st->tally = &st->stats.backward;
  for (size_t r = 0; r < st->nruns; r++)
    IMP__TRY(run_backward(st, &st->runs[r], ybar, xbar, thetabar));
  return IMP_OK;
}

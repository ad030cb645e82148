/*
 * imp/qp.h - convex quadratic programs as layers, differentiated through
 * their KKT conditions (OptNet: Amos and Kolter, "OptNet: Differentiable
 * Optimization as a Layer in Neural Networks", ICML 2017).
 *
 * The problem.  For data theta = (Q, p, A, b, G, h), with z in R^nz,
 *
 *     z* = argmin  1/2 z^T Q z + p^T z
 *          subject to  A z = b   (neq rows),   G z <= h   (nineq rows).
 *
 * Only the symmetric part (Q + Q^T) / 2 enters the objective, so that is
 * what the solver uses and what the gradient of Q describes.  Q must be
 * positive definite, or positive semidefinite with the constraints making
 * the minimizer unique; bounds l <= z <= u are rows of G.
 *
 * The KKT conditions.  With duals lambda >= 0 (one per row of G) and nu
 * (one per row of A), z* is optimal if and only if
 *
 *     stationarity          Q z + p + G^T lambda + A^T nu = 0,
 *     complementarity       lambda_i (G z - h)_i = 0,   i = 1..nineq,
 *     primal feasibility    A z = b,  G z <= h,  lambda >= 0.
 *
 * The solution of a QP is y = (z, lambda, nu), of ny = nz + nineq + neq
 * numbers, stored in that order.
 *
 * The forward: a primal-dual interior-point method with Mehrotra's
 * predictor-corrector (Mehrotra, SIAM J. Optim. 1992; Nocedal and Wright,
 * "Numerical Optimization", section 16.6).  With slacks s = h - G z > 0
 * and W = diag(lambda / s), every Newton step solves the reduced system
 *
 *     (Q + G^T W G) dz + A^T dnu = r1,     A dz = r2,
 *
 * by a Cholesky factorization of K = Q + G^T W G and, when there are
 * equality constraints, a second Cholesky factorization of the Schur
 * complement A K^-1 A^T (both LAPACK dpotrf).  When Q is only semidefinite,
 * rho A^T A is added to K (exact, since A dz = r2 is imposed anyway),
 * which makes K definite whenever the minimizer is unique.  Where Q is
 * definite and there are no equalities, the same step can come from the
 * dual system
 *
 *     (G Q^-1 G^T + W^-1) dlambda = r3,
 *
 * whose first term C = G Q^-1 G^T is computed once per QP from Q's
 * Cholesky factor L and L^-1 G^T, so that an iteration factors
 * nineq x nineq and forms no product of G.  There the iteration leaves z
 * out as well: a Newton step solves stationarity's linear row exactly, so
 * its residual only shrinks, to theta rd0 with theta the product of the
 * (1 - alpha) of the steps taken, and z = -Q^-1 (p + G^T lambda - theta
 * rd0) is a function of lambda.  The iterate is (s, lambda), of the dual
 * QP min 1/2 lambda^T C lambda + (h + G Q^-1 p)^T lambda over lambda >= 0,
 * and each iteration costs one product with L^-1 G^T and its transpose,
 * one factorization and two pairs of triangular solves.  The stopping
 * measures below are computed from lambda meanwhile (the dual one's scale
 * from |p| alone, which can only overstate it); z is formed at the end and
 * the measures are computed again from it and the data.  By default
 * (IMP_QP_SYSTEM_AUTO) the dual system is used when nineq <= nz; should
 * it stop being numerically definite, or z miss the tolerance, the QP
 * goes on with the full iteration (on the primal system in the first
 * case).
 *
 * Each iteration factors once and solves twice: an affine (predictor)
 * step, then a step towards the central path with sigma = (mu_aff / mu)^3
 * and Mehrotra's second-order correction, taken a fraction eta of the way
 * to the boundary: eta = 0.99 at first and 1 - r once the largest of the
 * three stopping measures r (below) falls under 0.01, so that eta -> 1
 * (Nocedal and Wright, section 14.2), but 1 - eta >= 0.1 tol / gap: the
 * last step lands near a gap of tol / 10 rather than orders below it,
 * where weakly active constraints would leave the backward's Jacobian
 * numerically singular.  On the primal system, once the gap is below
 * 1e-6, where W spans many orders of magnitude, the step taken gets one
 * round of iterative refinement on all four rows of the Newton system
 * with the same factors.  The start point solves the same system with
 * W = I (the minimizer of the objective plus 1/2 |G z - h|^2 subject to
 * A z = b, whose lambda0 = G z - h = -s0) and moves into the interior to
 * s = lambda = |lambda0| + max(1, mean |lambda0|), entry by entry, so that
 * W = I again and the first iteration reuses the start's factors.
 * The iteration stops when the residuals, each relative to the largest
 * term it balances (norms are |.|_inf),
 *
 *     primal  max(|A z - b|, |G z + s - h|) / (1 + max(|b|, |h|, |Az|, |Gz|))
 *     dual    |Q z + p + G^T lambda + A^T nu|
 *               / (1 + max(|Qz|, |p|, |G^T lambda|, |A^T nu|))
 *     gap     s^T lambda / (1 + |1/2 z^T Q z + p^T z|)
 *
 * are all below tol.  When the gap is below tol but the larger residual
 * has not halved in 2 iterations, rounding in the system's matrix sets
 * the limit (W's entries on active rows grow like 1 / tol, and enter
 * Q + G^T W G through products with G), and the steps go on with the
 * augmented system of order n + p + m,
 *
 *     [Q A^T G^T; A 0 0; G 0 -W^-1] (dz, dnu, dlambda) = r,
 *
 * factored by LAPACK dsytrf (Bunch-Kaufman), where W only enters as
 * W^-1 on the diagonal (stats->augmented counts the QPs it finished; it
 * is skipped where n + p + m > 4096, or where its matrix is singular in
 * rounding).  It gives up (IMP_ENOCONV) after max_iter iterations, or
 * when the residual has not halved in 5 more (rounding, not the method,
 * then sets the limit).
 *
 * Checks.  Q (its symmetric part) is factored by Cholesky first; if that
 * fails or leaves a pivot below psd_tol times Q's largest diagonal entry,
 * its eigenvalues (dsyev) decide, with e the largest eigenvalue magnitude:
 * a smallest eigenvalue below -psd_tol e is IMP_ENONCONVEX, one within
 * psd_tol e of 0 makes Q semidefinite.  A semidefinite Q is accepted, and
 * after convergence the minimizer's uniqueness is tested: Q
 * must be definite on the null space of the equality rows and the active
 * inequality rows (those with lambda_i >= s_i), computed by SVD; otherwise
 * the call fails with IMP_ESINGULAR and says so.
 *
 * Infeasible and unbounded problems are detected from the iterates, which
 * diverge along a certificate (Todd, "Detecting infeasibility in
 * infeasible-interior-point methods for optimization", 2004).  With the
 * length scale L = 1 + max(|p|_inf, |b|_inf, |h|_inf) and R = radius * L:
 *   - infeasible (IMP_EINFEASIBLE) when the duals certify that no feasible
 *     point lies within R: t = -(h^T lambda + b^T nu) > 0 and
 *     R |G^T lambda + A^T nu|_inf < t.  Since lambda >= 0, every feasible z
 *     satisfies (G^T lambda + A^T nu)^T z <= -t, hence |z|_1 > R;
 *   - unbounded (IMP_EUNBOUNDED) when |z|_inf > R and d = z / |z|_inf is a
 *     direction of descent and recession to within 1e-6 of the data's
 *     scale: p^T d < -1e-6 |p|_inf, |Q d|, |A d|, max(G d, 0) <= 1e-6 times
 *     |Q|, |A|, |G| (largest entries).
 * The residuals that show it are in imp_last_error(); no solution is
 * returned.  A problem that neither converges nor certifies within
 * max_iter iterations is IMP_ENOCONV.
 *
 * The backward.  The KKT conditions are the residual of an implicit
 * problem (imp/problem.h) in the unknowns y = (z, lambda, nu):
 *
 *     f(y; theta) = ( Q z + p + G^T lambda + A^T nu,
 *                     w o lambda o (G z - h),
 *                     A z - b ),
 *
 * and the gradients come from the shared adjoint solve (imp/adjoint.h):
 * (df/dy)^T v = -ybar, thetabar = (df/dtheta)^T v, where
 *
 *     df/dy = [ Q                    G^T                   A^T ]
 *             [ diag(w o lambda) G   diag(w o (G z - h))   0   ]
 *             [ A                    0                     0   ].
 *
 * The complementarity rows are scaled by the constants
 * w_i = 1 / max(lambda_i, s_i) taken at the solution.  Scaling a row of f
 * by a positive constant leaves its zero set and the implicit derivative
 * unchanged, and it makes the larger of the two coefficients of each row
 * equal to 1.  Without it, a weakly active constraint (lambda_i and s_i
 * both near 0) gives a row that vanishes and a singular Jacobian.  With it,
 * such a row reads (lambda_i / s_i) G_i dz - dlambda_i = ..., the
 * derivative of the central path of the interior-point method: a finite
 * value between the one-sided derivatives with the constraint treated as
 * active and as inactive (in one variable with lambda_i = s_i, their
 * average; tests/test_qp.c checks that case).  Where
 * strict complementarity holds the result is the exact derivative, up to
 * O(mu) from the solver's tolerance.
 *
 * Layout.  Matrices are row-major: Q is nz x nz, A is neq x nz, G is
 * nineq x nz.  theta, the parameters of one QP's implicit problem, is
 * (Q, p, A, b, G, h) in that order, each piece row-major.
 *
 * Batches.  Every call takes a batch of QPs of the same dims.  Each piece
 * of imp_qp_data has a stride: 0 means one copy shared by the whole batch,
 * otherwise sample k's copy starts at ptr + k * stride.  Gradients of a
 * shared piece are summed over the batch.  Statistics are the maximum over
 * the batch (iterations, residuals, condition numbers) or the sum
 * (total_iterations).
 *
 * The layer.  imp_qp_layer_create makes an imp_layer in which every piece
 * is one of: learned (a parameter of the layer), input (read from each
 * sample of x), or fixed (copied at creation).  The parameters are the
 * learned pieces in the order Q, p, A, b, G, h, each row-major, end to end;
 * each input sample is the input pieces in the same order, end to end, so
 * its size is the sum of their sizes.  OptNet's usual setting has p from
 * the input and the rest learned; a fully parametric layer has every piece
 * learned (its input then has size 0 per sample: shape (n, 0, 1, 1)).
 * The output is z (n, nz, 1, 1), or y = (z, lambda, nu) (n, ny, 1, 1)
 * with output_duals.
 *
 * Example: the projection of x onto {z >= 0, z1 + z2 = 1}, and dz1/dx.
 *
 *     double Q[4] = {1, 0, 0, 1}, p[2] = {-0.8, -0.6};   // p = -x
 *     double A[2] = {1, 1}, b[1] = {1};
 *     double G[4] = {-1, 0, 0, -1}, h[2] = {0, 0};
 *     imp_qp_dims d = {.nz = 2, .nineq = 2, .neq = 1};
 *     imp_qp_data qp = {.Q = Q, .p = p, .A = A, .b = b, .G = G, .h = h};
 *     double y[5], ybar[5] = {1, 0, 0, 0, 0}, pbar[2] = {0, 0};
 *     imp_qp_grad g = {.p = pbar};
 *     int rc = imp_qp_solve(&d, 1, &qp, y, NULL, NULL);
 *     // y[0], y[1] = 0.6, 0.4
 *     if (rc == IMP_OK)
 *       rc = imp_qp_backward(&d, 1, &qp, y, ybar, &g, NULL, NULL);
 *     // pbar = dz1/dp = (-0.5, 0.5), so dz1/dx = (0.5, -0.5)
 */
#ifndef IMP_QP_INCLUDED_H
#define IMP_QP_INCLUDED_H /* not IMP_QP_H: that names the piece h */

#include <stddef.h>

#include "imp/adjoint.h"
#include "imp/layer.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The pieces of a QP's data, as bit flags for the layer's masks. */
typedef enum imp_qp_piece {
  IMP_QP_Q = 1 << 0,
  IMP_QP_P = 1 << 1,
  IMP_QP_A = 1 << 2,
  IMP_QP_B = 1 << 3,
  IMP_QP_G = 1 << 4,
  IMP_QP_H = 1 << 5,
  IMP_QP_ALL = (1 << 6) - 1
} imp_qp_piece;

/** The sizes of a QP: nz > 0 variables, nineq rows of G, neq rows of A. */
typedef struct imp_qp_dims {
  size_t nz, nineq, neq;
} imp_qp_dims;

/** ny = nz + nineq + neq, the size of one solution y = (z, lambda, nu). */
size_t imp_qp_ny(const imp_qp_dims *dims);

/** The number of doubles of one piece (one IMP_QP_* flag): nz * nz for Q,
 *  nz for p, neq * nz for A, ...; 0 for anything else. */
size_t imp_qp_piece_size(const imp_qp_dims *dims, unsigned piece);

/** ntheta, the size of theta = (Q, p, A, b, G, h) for one QP. */
size_t imp_qp_ntheta(const imp_qp_dims *dims);

/**
 * The data of a batch of QPs, borrowed.  A, b must be NULL when neq = 0 and
 * G, h when nineq = 0; all others are required.  A stride of 0 shares the
 * piece across the batch; otherwise sample k reads ptr + k * stride.
 */
typedef struct imp_qp_data {
  const double *Q, *p, *A, *b, *G, *h;
  size_t Q_stride, p_stride, A_stride, b_stride, G_stride, h_stride;
} imp_qp_data;

/**
 * Gradient outputs, accumulated (+=); a NULL piece is not computed.  Same
 * stride rule as imp_qp_data: a stride of 0 sums the batch into one copy.
 */
typedef struct imp_qp_grad {
  double *Q, *p, *A, *b, *G, *h;
  size_t Q_stride, p_stride, A_stride, b_stride, G_stride, h_stride;
} imp_qp_grad;

/** Which linear system the interior-point steps solve (see above). */
typedef enum imp_qp_system {
  IMP_QP_SYSTEM_AUTO = 0, /**< dual where Q is definite, neq = 0 and
                               nineq <= nz; primal otherwise */
  IMP_QP_SYSTEM_PRIMAL,   /**< always Q + G^T W G */
  IMP_QP_SYSTEM_DUAL      /**< G Q^-1 G^T + W^-1 wherever Q is definite
                               and neq = 0 */
} imp_qp_system;

/** Options; a zero-initialized struct (or NULL) means the defaults. */
typedef struct imp_qp_options {
  double tol;           /**< primal, dual and gap tolerance (relative, see the
                        top of this file); default 1e-10 */
  size_t max_iter;      /**< interior-point iterations per QP; default 100 */
  double psd_tol;       /**< relative to Q's largest eigenvalue magnitude, the
                        size below which an eigenvalue counts as 0;
                        default 1e-10 */
  double radius;        /**< certificates of infeasibility or unboundedness
                        look this far, times L; default 1e9 */
  imp_qp_system system; /**< default IMP_QP_SYSTEM_AUTO */
  imp_adjoint_options adjoint; /**< the backward's adjoint solve */
} imp_qp_options;

/** What a call did; maxima over the batch unless said otherwise. */
typedef struct imp_qp_stats {
  size_t iterations;       /**< interior-point iterations, the most */
  size_t total_iterations; /**< summed over the batch */
  double primal_residual;  /**< relative, as defined above */
  double dual_residual;    /**< relative, as defined above */
  double gap;              /**< relative duality gap */
  size_t semidefinite;     /**< QPs whose Q was only semidefinite */
  size_t dual_system;      /**< QPs solved on the dual system to the end */
  size_t augmented;        /**< QPs finished on the augmented system */
  size_t sample;           /**< on failure, the first QP that failed */
  double adjoint_cond;     /**< backward: estimated cond of df/dy */
  double adjoint_residual; /**< backward: |J^T v + ybar| / |ybar| */
} imp_qp_stats;

/**
 * Solve nbatch >= 1 QPs.  y (nbatch * ny doubles, caller-owned) receives
 * each solution (z, lambda, nu).  opt and stats may be NULL.
 *
 * Returns IMP_OK; IMP_EINVAL for NULL or missing pieces, zero nz or
 * nbatch; IMP_ESHAPE for a piece given where its size is 0;
 * IMP_ENONFINITE for NaN or Inf in the data; IMP_ENONCONVEX for an
 * indefinite Q; IMP_EINFEASIBLE; IMP_EUNBOUNDED; IMP_ESINGULAR for a
 * minimizer that is not unique or a system that cannot be factored;
 * IMP_ENOCONV; IMP_ENOMEM.  On failure the message names the sample
 * (stats->sample) and the contents of y are unspecified.
 */
int imp_qp_solve(const imp_qp_dims *dims, size_t nbatch,
                 const imp_qp_data *data, double *y, const imp_qp_options *opt,
                 imp_qp_stats *stats);

/**
 * Gradients through the KKT conditions: for each QP of the batch, solve
 * (df/dy)^T v = -ybar with imp_adjoint_solve on the KKT residual at y (as
 * imp_qp_solve returned it) and accumulate (df/dtheta)^T v into grad.
 * ybar (nbatch * ny) holds cotangents of z, lambda and nu.  All inputs
 * are borrowed; grad's arrays are the caller's.
 *
 * Returns IMP_OK, the input errors of imp_qp_solve, or the adjoint's
 * (IMP_ESINGULAR for a singular KKT Jacobian).  On failure grad holds the
 * sums of the samples before stats->sample.
 */
int imp_qp_backward(const imp_qp_dims *dims, size_t nbatch,
                    const imp_qp_data *data, const double *y,
                    const double *ybar, imp_qp_grad *grad,
                    const imp_qp_options *opt, imp_qp_stats *stats);

/** f[k] = 1/2 z^T Q z + p^T z for each QP of the batch, z from y; f is
 *  the caller's nbatch doubles.  Returns IMP_OK or IMP_EINVAL. */
int imp_qp_objective(const imp_qp_dims *dims, size_t nbatch,
                     const imp_qp_data *data, const double *y, double *f);

/**
 * The KKT conditions of one QP as an implicit problem: a plain value that
 * the problem's ctx points to.  w holds the nineq weights of the
 * complementarity rows, in the caller's storage (NULL when nineq = 0).
 */
typedef struct imp_qp_kkt {
  imp_qp_dims dims;
  double *w;
} imp_qp_kkt;

/**
 * Fill *problem with the KKT residual of kkt->dims at y (ny doubles) and
 * theta (ntheta doubles, the packed data): ny unknowns, nx = 0, ntheta
 * parameters, residual, vjp and dense Jacobian callbacks, ctx = kkt.  The
 * weights w_i = 1 / max(|lambda_i|, |s_i|) (1 where both are 0) are set
 * here from y and theta and stay fixed afterwards.  kkt must outlive the
 * problem's use.  This is the problem imp_qp_backward gives to
 * imp_adjoint_solve.
 */
int imp_qp_kkt_problem(imp_qp_kkt *kkt, const double *y, const double *theta,
                       imp_problem *problem);

/** Pack one QP's data (sample k of data) into theta (ntheta doubles). */
int imp_qp_pack_theta(const imp_qp_dims *dims, const imp_qp_data *data,
                      size_t k, double *theta);

/** How the layer gets its data. */
typedef struct imp_qp_layer_config {
  imp_qp_dims dims;
  unsigned learned; /**< IMP_QP_* flags: the layer's parameters */
  unsigned input;   /**< IMP_QP_* flags: read from each input sample */
  /** Values of the fixed pieces (those neither learned nor input),
   *  required, and initial values of the learned ones (NULL: zero).
   *  Copied; strides are ignored. */
  imp_qp_data values;
  int output_duals;       /**< 1: output y = (z, lambda, nu); 0: z */
  imp_qp_options options; /**< copied */
} imp_qp_layer_config;

/**
 * Make a QP layer.  A piece whose size is 0 (A, b without equalities, G, h
 * without inequalities) must appear in no mask.  Returns IMP_EINVAL when a
 * piece is both learned and input, or fixed without a value.  The caller
 * owns *out (imp_layer_free); on failure *out is NULL.
 *
 * Forward solves the batch with imp_qp_solve and keeps the solutions;
 * backward runs imp_qp_backward with ybar on z (and on the duals with
 * output_duals), accumulating the learned pieces' gradients into the
 * layer's gradients and the input pieces' into xbar.
 */
int imp_qp_layer_create(const imp_qp_layer_config *config, const char *name,
                        imp_layer **out);

/**
 * Where one learned piece (one IMP_QP_* flag) sits in a QP layer's
 * parameters: *offset into imp_layer_params and imp_layer_grads, *size
 * doubles.  Returns IMP_EINVAL for a layer of another kind or a piece that
 * is not learned.
 */
int imp_qp_layer_param(const imp_layer *layer, unsigned piece, size_t *offset,
                       size_t *size);

/** The statistics of the layer's last forward or backward. */
int imp_qp_layer_stats(const imp_layer *layer, imp_qp_stats *stats);

#ifdef __cplusplus
}
#endif

#endif /* IMP_QP_INCLUDED_H */

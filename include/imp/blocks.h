/*
 * imp/blocks.h - explicit building blocks: dense, 3x3 convolution,
 * activations, element-wise add, and spectral normalization.
 *
 * These are the pieces from which the maps inside implicit layers are
 * written (a DEQ's h(z, x), an ODE's g(t, h)).  Each block is an imp_layer
 * (imp/layer.h) with forward and backward in the style of llm.c: backward
 * takes the gradient outputs first and accumulates, xbar += (dy/dx)^T ybar
 * and grads += (dy/dparams)^T ybar.  Each block also has raw-buffer
 * functions (imp_*_apply, imp_*_apply_backward) on a weight the caller
 * holds, so that a weight-tied map can call them many times, on inputs
 * whose sizes change, without building layers.
 *
 * Dense (affine) layer, in inputs, out outputs, batch n:
 *
 *     y = W x + b,   W out x in row-major, b of size out,
 *     params = [W, b];
 *     backward: xbar += W^T ybar,  Wbar += ybar x^T,  bbar += ybar.
 *
 * The input may have any shape (n, c, h, w) with c * h * w = in; it is read
 * as n vectors and the output has shape (n, out, 1, 1).  Each line above is
 * one OpenBLAS GEMM over the whole batch.
 *
 * 3x3 convolution, cin to cout channels, zero ("same") padding, stride 1,
 * on (n, cin, h, w) inputs of any h, w >= 1, giving (n, cout, h, w):
 *
 *     y[b, o, i, j] = b_o + sum_{c, di, dj} W[o, c, di, dj]
 *                                 x[b, c, i + di - 1, j + dj - 1],
 *
 * with x read as 0 outside the image; params = [W (cout x cin x 3 x 3), b].
 * It is lowered to a matrix product per sample (im2col): the columns
 * matrix X_col (9 cin x h w) holds the 9 shifted copies of every channel,
 * and Y = W X_col with W read as cout x 9 cin, computed a cache-sized band
 * of image rows at a time.  Backward is
 *
 *     Wbar += Ybar X_col^T,   X_colbar = W^T Ybar,   xbar += col2im(X_colbar),
 *     bbar += Ybar summed over pixels,
 *
 * again GEMMs, with col2im adding each column entry back onto the pixel it
 * was copied from.  Scratch buffers grow to the largest image seen; they
 * live in the layer, so one layer must not run on two threads at once.
 *
 * Activations act element-wise on any shape and have no parameters:
 *
 *     relu(x)     = max(x, 0)               relu'     = [x > 0]
 *     tanh(x)                               tanh'     = 1 - y^2
 *     elu(x)      = x if x > 0, e^x - 1     elu'      = 1 if x > 0, e^x
 *     softplus(x) = log(1 + e^x)            softplus' = 1 / (1 + e^-x)
 *
 * (ELU with alpha = 1; softplus evaluated as max(x, 0) + log1p(e^-|x|) so
 * that it neither overflows nor loses digits.)  relu' at exactly 0 is 0.
 *
 * Element-wise add has two inputs, so it is a pair of raw functions rather
 * than a layer: imp_add (y = a + b) and imp_add_backward (abar += ybar,
 * bbar += ybar).  A residual connection y = x + F(x) is written with them
 * around F's own forward and backward.
 *
 * Spectral normalization (Miyato et al., 2018) estimates sigma = ||W||_2,
 * the largest singular value, by power iteration,
 *
 *     u <- W v / ||W v||,   v <- W^T u / ||W^T u||,   sigma = ||W^T u||,
 *
 * keeping v between calls so that a few steps per call track a weight that
 * changes slowly during training.  Every estimate is a lower bound on the
 * true sigma (sigma = u^T W v for unit u, v) that tightens as the steps
 * align v with the top right singular vector.  For a convolution the
 * operator is the convolution itself on an image of a given size, and W^T
 * is its adjoint (the convolution's backward with respect to its input).
 * That is the quantity that matters: a 3x3 convolution's operator norm can
 * be up to three times the norm of its weight reshaped as a cout x 9 cin
 * matrix (a kernel with nine equal taps reaches it), so normalizing the
 * reshaped weight does not bound the map.
 *
 * Why a bound matters for an equilibrium model: if the weight-tied map
 * z -> h(z, x) of a DEQ has Lipschitz constant rho < 1 in z, it is a
 * contraction, so z <- h(z, x) converges from any start to its unique
 * fixed point, the error shrinking by rho per step (Banach), and
 * I - dh/dz stays invertible, so the adjoint solve of backward is well
 * posed too.  Without a bound nothing makes the iteration settle; it may
 * wander, and more iterations then do not help.  The constant of a
 * composition is at most the product of its pieces': relu, tanh, elu and
 * softplus are 1-Lipschitz, so a bound t on every linear operator on the
 * path from z gives rho <= the product of the t's (a skip connection
 * z + F(z) adds 1, so it needs damping instead).  A bound on the weight
 * reshaped as a matrix is not a bound on the convolution, which is why the
 * convolution is normalized as an operator.
 *
 * The norm of a zero-padded convolution depends on the image size: an
 * image embedded in a larger one with a zero border is acted on by the
 * same convolution, so the norm grows (weakly) with h and w.  For every
 * size it is at most the norm of the periodic convolution on an
 * (h + 1) x (w + 1) torus, which is the largest singular value of the
 * kernel's Fourier symbol K(f) = sum_taps W[:, :, di, dj] e^{-i f . d} over
 * that torus's frequencies, and at most the symbol's maximum over all
 * frequencies, a bound that holds for every image size.  The layer option
 * below normalizes for one chosen size; choose the largest size the layer
 * will see.
 *
 * Lipschitz option on dense and convolution layers: with a target t > 0
 * the layer applies W / s, s = max(1, sigma / t), so its linear part has
 * norm at most t (up to the accuracy of the sigma estimate).  sigma is
 * re-estimated only when the weight differs from the one the last estimate
 * was made for, so the map is a fixed function of its weight, as a DEQ
 * solve needs.  Backward differentiates through s: with G the gradient for
 * the applied weight W / s, and u, v the estimate's singular vectors,
 *
 *     Wbar += G / s - [sigma > t] <G, W> / (s^2 t) u v^T,
 *
 * using d sigma / dW = u v^T (exact for a converged, simple top singular
 * value; for a convolution "u v^T" is the weight gradient of the
 * convolution with input v and output cotangent u).
 *
 * Ownership: create functions give the caller a layer to free with
 * imp_layer_free; raw functions write only into the buffers they are
 * given.  Every function returns IMP_OK or a negative status: IMP_EINVAL
 * for NULL or meaningless arguments, IMP_ESHAPE for sizes that do not fit,
 * IMP_ENONFINITE for NaN or Inf in inputs or weights, IMP_ENOMEM.
 */
#ifndef IMP_BLOCKS_H
#define IMP_BLOCKS_H

#include <stddef.h>
#include <stdint.h>

#include "imp/layer.h"
#include "imp/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Scratch memory that grows on demand.  Caller-allocated: initialize it
 * with IMP_WORKSPACE_INIT (or zero it) and release it with
 * imp_workspace_free.  Its contents are not kept from call to call.
 */
typedef struct imp_workspace {
  double *data;
  size_t capacity; /* doubles */
} imp_workspace;

#define IMP_WORKSPACE_INIT                                                     \
  {                                                                            \
    NULL, 0                                                                    \
  }

/** Make ws->data hold at least n doubles (contents undefined). */
int imp_workspace_reserve(imp_workspace *ws, size_t n);

/** Free the workspace's memory and reset it; NULL is accepted. */
void imp_workspace_free(imp_workspace *ws);

/* ------------------------------------------------------------------ */
/* Dense                                                                 */
/* ------------------------------------------------------------------ */

/**
 * A dense layer with in inputs and out outputs; params = [W (out x in),
 * b (out)].  With rng non-NULL, W is drawn from N(0, 2 / (in + out))
 * (Glorot normal) and b is zero; with rng NULL all parameters are zero.
 * name may be NULL ("dense").  The caller frees *out with imp_layer_free.
 */
int imp_dense_create(size_t in, size_t out, imp_rng *rng, const char *name,
                     imp_layer **layer);

/**
 * Raw dense forward: y (n x out) = x (n x in) W^T + b.  bias may be NULL
 * (no bias).  x and weight must be finite.  scale multiplies the product
 * W x before the bias is added (1 for a plain dense map).
 */
int imp_dense_apply(const double *weight, const double *bias, double scale,
                    size_t in, size_t out, size_t n, const double *x,
                    double *y);

/**
 * Raw dense backward for y = scale W x + b: accumulates
 * xbar += scale W^T ybar, wbar += scale ybar x^T, bbar += ybar.  Any of
 * xbar, wbar, bbar may be NULL (not needed).
 */
int imp_dense_apply_backward(double *xbar, double *wbar, double *bbar,
                             const double *ybar, const double *weight,
                             double scale, size_t in, size_t out, size_t n,
                             const double *x);

/* ------------------------------------------------------------------ */
/* 3x3 convolution                                                       */
/* ------------------------------------------------------------------ */

/**
 * A 3x3 convolution layer from cin to cout channels, zero padding, stride
 * 1; params = [W (cout x cin x 3 x 3), b (cout)].  With rng non-NULL, W is
 * drawn from N(0, 2 / (9 (cin + cout))) (Glorot normal with the kernel's
 * fan-in and fan-out) and b is zero; with rng NULL all are zero.  name may
 * be NULL ("conv3x3").  The caller frees *layer with imp_layer_free.
 */
int imp_conv3x3_create(size_t cin, size_t cout, imp_rng *rng, const char *name,
                       imp_layer **layer);

/**
 * Raw convolution forward: y = scale conv(x; weight) + bias, x of shape
 * in = (n, cin, h, w), y of shape (n, cout, h, w).  bias may be NULL.  ws
 * holds a band of the columns matrix (at most 9 cin h w doubles, about
 * 256 KiB for large images); NULL means allocate and free one for this
 * call.  x and weight must be finite.
 */
int imp_conv3x3_apply(const double *weight, const double *bias, double scale,
                      size_t cout, const imp_shape *in, const double *x,
                      double *y, imp_workspace *ws);

/**
 * Raw convolution backward for y = scale conv(x; weight) + bias:
 * accumulates xbar += scale conv^T(ybar) (the adjoint convolution),
 * wbar += scale (ybar correlated with x), bbar += ybar summed over
 * pixels.  Any of xbar, wbar, bbar may be NULL; x may be NULL when wbar is
 * NULL.  ws as for imp_conv3x3_apply.
 */
int imp_conv3x3_apply_backward(double *xbar, double *wbar, double *bbar,
                               const double *ybar, const double *weight,
                               double scale, size_t cout, const imp_shape *in,
                               const double *x, imp_workspace *ws);

/* ------------------------------------------------------------------ */
/* Activations and add                                                   */
/* ------------------------------------------------------------------ */

/** The element-wise activations. */
typedef enum imp_activation {
  IMP_ACT_RELU = 0,
  IMP_ACT_TANH = 1,
  IMP_ACT_ELU = 2,
  IMP_ACT_SOFTPLUS = 3
} imp_activation;

/** The activation's name ("relu", "tanh", "elu", "softplus"), or "". */
const char *imp_activation_name(imp_activation kind);

/**
 * An activation layer (no parameters, output shape = input shape).  name
 * may be NULL (the activation's name).  The caller frees *layer with
 * imp_layer_free.
 */
int imp_activation_create(imp_activation kind, const char *name,
                          imp_layer **layer);

/** Raw activation forward on n entries: y = act(x); x must be finite.
 *  y may equal x (in place). */
int imp_activation_apply(imp_activation kind, size_t n, const double *x,
                         double *y);

/** Raw activation backward: xbar += act'(x) ybar, from the x and y of
 *  the forward. */
int imp_activation_apply_backward(imp_activation kind, size_t n, double *xbar,
                                  const double *ybar, const double *x,
                                  const double *y);

/** y = a + b on n entries (y may alias a or b).  Returns IMP_ENONFINITE
 *  if the sum has NaN or Inf. */
int imp_add(size_t n, const double *a, const double *b, double *y);

/** abar += ybar and bbar += ybar on n entries; either may be NULL. */
int imp_add_backward(size_t n, double *abar, double *bbar, const double *ybar);

/* ------------------------------------------------------------------ */
/* Spectral normalization                                                */
/* ------------------------------------------------------------------ */

/** Power-iteration state for one operator (opaque). */
typedef struct imp_spectral imp_spectral;

/**
 * State for the norm of a rows x cols matrix (a dense weight, out x in).
 * v starts as a normal vector drawn from seed.  Free with
 * imp_spectral_free.
 */
int imp_spectral_create_dense(size_t rows, size_t cols, uint64_t seed,
                              imp_spectral **s);

/**
 * State for the norm of the 3x3 convolution cin -> cout as an operator on
 * h x w images (zero padding), the map from R^(cin h w) to R^(cout h w).
 * Free with imp_spectral_free.
 */
int imp_spectral_create_conv3x3(size_t cin, size_t cout, size_t h, size_t w,
                                uint64_t seed, imp_spectral **s);

/** Free the state; NULL is accepted. */
void imp_spectral_free(imp_spectral *s);

/**
 * Run iterations steps of power iteration on the operator of weight
 * (out x in for dense; cout x cin x 3 x 3 for a convolution), starting
 * from the kept vector, and set *sigma to the estimate of its largest
 * singular value.  iterations >= 1.  Returns IMP_ENONFINITE for a
 * non-finite weight; a zero operator gives sigma = 0.
 */
int imp_spectral_norm(imp_spectral *s, const double *weight, int iterations,
                      double *sigma);

/**
 * Accumulate scale * d sigma / d weight into grad (same layout as weight):
 * u v^T for a matrix, the convolution's weight gradient with input v and
 * cotangent u for a convolution, from the latest imp_spectral_norm call.
 */
int imp_spectral_sigma_backward(imp_spectral *s, double scale, double *grad);

/** The latest estimate (0 before the first imp_spectral_norm call). */
double imp_spectral_sigma(const imp_spectral *s);

/**
 * Bound a dense layer's linear part: forward applies W / max(1, sigma / t)
 * with sigma the power-iteration estimate of ||W||_2, and backward
 * differentiates through the scale (see the header comment).  sigma is
 * re-estimated with iterations warm-started steps whenever W changed since
 * the last estimate; the first estimate runs at least 50 steps.  target
 * <= 0 switches the bound off.  iterations >= 1 when target > 0.
 */
int imp_dense_set_lipschitz(imp_layer *layer, double target, int iterations);

/**
 * The same for a convolution layer, with sigma its operator norm on h x w
 * images (the largest size it will see: the norm grows weakly with size).
 */
int imp_conv3x3_set_lipschitz(imp_layer *layer, double target, size_t h,
                              size_t w, int iterations);

/**
 * The scale s = max(1, sigma / t) that the layer's last forward divided
 * its weight by (1 when no bound is set), and sigma (0 when none).  Either
 * output may be NULL.  For dense and conv3x3 layers only.
 */
int imp_block_lipschitz_scale(const imp_layer *layer, double *scale,
                              double *sigma);

#ifdef __cplusplus
}
#endif

#endif /* IMP_BLOCKS_H */

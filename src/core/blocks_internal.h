/*
 * core/blocks_internal.h - what dense.c, conv.c and spectral.c share:
 * unchecked kernels and the Lipschitz bound kept by dense and convolution
 * layers.  Not installed; nothing here is part of the public API.
 */
#ifndef IMP_CORE_BLOCKS_INTERNAL_H
#define IMP_CORE_BLOCKS_INTERNAL_H

#include <stddef.h>

#include "imp/blocks.h"

/*
 * The kernels behind imp_dense_apply*, imp_conv3x3_apply*: same meaning,
 * no checks of pointers or finiteness (the callers have made them).  Sizes
 * must already be known to fit in an int.
 */
void imp__dense_forward(const double *weight, const double *bias, double scale,
                        size_t in, size_t out, size_t n, const double *x,
                        double *y);
void imp__dense_backward(double *xbar, double *wbar, double *bbar,
                         const double *ybar, const double *weight, double scale,
                         size_t in, size_t out, size_t n, const double *x);
int imp__conv3x3_forward(const double *weight, const double *bias, double scale,
                         size_t cout, const imp_shape *in, const double *x,
                         double *y, imp_workspace *ws);
int imp__conv3x3_backward(double *xbar, double *wbar, double *bbar,
                          const double *ybar, const double *weight,
                          double scale, size_t cout, const imp_shape *in,
                          const double *x, imp_workspace *ws);

/* 1 if every dimension that a GEMM of this convolution sees fits in an
 * int: 9 cin, cout, h w. */
int imp__conv3x3_sizes_fit(size_t cin, size_t cout, size_t h, size_t w);

/*
 * The Lipschitz bound of a dense or convolution layer: the applied weight
 * is W / scale with scale = max(1, sigma / target).  target 0 means off.
 */
typedef struct imp__lipschitz {
  double target;
  int iterations;         /* power steps per re-estimate */
  imp_spectral *spectral; /* owned */
  size_t nweight;         /* entries of W */
  double *weight_seen;    /* nweight: the W of the latest estimate */
  double *weight_grad;    /* nweight: scratch for dL/d(W / scale) */
  int estimated;          /* 0 until the first estimate */
  double sigma;
  double scale;
} imp__lipschitz;

/* Switch the bound on (target > 0, taking ownership of spectral, which is
 * freed on failure too) or off (target <= 0, spectral NULL). */
int imp__lipschitz_set(imp__lipschitz *lip, double target, int iterations,
                       imp_spectral *spectral, size_t nweight);

/* Re-estimate sigma if W differs from the W of the latest estimate. */
int imp__lipschitz_refresh(imp__lipschitz *lip, const double *weight);

/* wbar += g / scale - [sigma > target] <g, W> / (scale^2 target) dsigma/dW,
 * with g = lip->weight_grad, the gradient for the applied weight. */
int imp__lipschitz_backward(imp__lipschitz *lip, const double *weight,
                            double *wbar);

/* Free what the bound owns and switch it off. */
void imp__lipschitz_clear(imp__lipschitz *lip);

/* The bound of a dense or convolution layer, NULL for other kinds. */
imp__lipschitz *imp__dense_lipschitz(const imp_layer *layer);
imp__lipschitz *imp__conv3x3_lipschitz(const imp_layer *layer);

#endif /* IMP_CORE_BLOCKS_INTERNAL_H */

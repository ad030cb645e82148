/*
 * imp/layer.h - the layer interface that every block, implicit layer and
 * stack plugs into.
 *
 * A layer maps a batch of inputs x to a batch of outputs y (forward) and
 * pulls a cotangent ybar = dL/dy back to xbar = dL/dx (backward), adding
 * dL/dparams into its gradient buffer as it goes.  Tensors are dense
 * doubles, batch first, row-major: an (n, c, h, w) tensor stores entry
 * (b, k, i, j) at ((b * c + k) * h + i) * w + j.  A vector layer uses
 * (n, features, 1, 1).
 *
 * Layers come in two flavours behind the same handle: the library's own
 * (dense, convolution, root-finding, DEQ, ODE, QP, ...) and user layers
 * made with imp_layer_create from a table of operations.
 */
#ifndef IMP_LAYER_H
#define IMP_LAYER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** A tensor shape: batch, channels (or features), height, width. */
typedef struct imp_shape {
  size_t n, c, h, w;
} imp_shape;

/** n * c * h * w, or 0 if that overflows size_t. */
size_t imp_shape_numel(const imp_shape *s);

/** c * h * w: the size of one sample. */
size_t imp_shape_sample(const imp_shape *s);

typedef struct imp_layer imp_layer;

/**
 * The operations of a layer kind.  forward and backward receive the input
 * shape; the library has already checked that the buffers are non-NULL and
 * that x holds finite values.
 *
 * backward is called with the x and y of the most recent forward and may
 * use whatever that forward saved.  It takes the gradient outputs first:
 * xbar (may be NULL: not needed) is accumulated, xbar += (dy/dx)^T ybar, and
 * the layer's gradient buffer is accumulated likewise.
 */
typedef struct imp_layer_ops {
  const char *kind; /**< "dense", "root", "deq", ... */
  int (*output_shape)(const imp_layer *layer, const imp_shape *in,
                      imp_shape *out);
  int (*forward)(imp_layer *layer, const imp_shape *in, const double *x,
                 double *y);
  int (*backward)(imp_layer *layer, double *xbar, const double *ybar,
                  const imp_shape *in, const double *x, const double *y);
  /** Optional: the parameter and gradient storage moved (see
   *  imp_layer_bind_storage); a container rebinds its children here. */
  int (*rebind)(imp_layer *layer);
  /** Optional: free the kind's state. */
  void (*destroy)(void *state);
} imp_layer_ops;

/**
 * Make a layer from a table of operations.  The layer keeps the ops
 * pointer (it must outlive the layer), takes ownership of state (freed with
 * ops->destroy) and allocates nparams parameters and gradients, zeroed.
 * name is copied (truncated to 47 characters).  On failure *out is NULL and
 * state is not freed.
 */
int imp_layer_create(const imp_layer_ops *ops, void *state, size_t nparams,
                     const char *name, imp_layer **out);

/** Free a layer and everything it owns.  NULL is accepted. */
void imp_layer_free(imp_layer *layer);

/** The shape forward would produce for an input of shape in. */
int imp_layer_output_shape(const imp_layer *layer, const imp_shape *in,
                           imp_shape *out);

/**
 * y = layer(x).  x has shape in; y must hold imp_shape_numel(out) doubles
 * for the out that imp_layer_output_shape gives.  Returns IMP_EINVAL for
 * NULL arguments, IMP_ESHAPE for an input the layer cannot take,
 * IMP_ENONFINITE for NaN/Inf in x, the parameters or the result, or the
 * layer's own failure status.
 */
int imp_layer_forward(imp_layer *layer, const imp_shape *in, const double *x,
                      double *y);

/** Accumulate xbar (may be NULL) and the layer's gradients from ybar, for
 *  the x and y of the most recent forward. */
int imp_layer_backward(imp_layer *layer, double *xbar, const double *ybar,
                       const imp_shape *in, const double *x, const double *y);

/** Number of parameters. */
size_t imp_layer_nparams(const imp_layer *layer);

/** The parameters (nparams doubles, owned by the layer or its container);
 *  write through this pointer to set them. */
double *imp_layer_params(imp_layer *layer);

/** The gradients, same size and ownership as the parameters. */
double *imp_layer_grads(imp_layer *layer);

/** Set the gradients to zero. */
void imp_layer_zero_grad(imp_layer *layer);

/** The name given at creation. */
const char *imp_layer_name(const imp_layer *layer);

/** The kind string of the layer's ops. */
const char *imp_layer_kind(const imp_layer *layer);

/** The state pointer given at creation (for a kind's own functions). */
void *imp_layer_state(const imp_layer *layer);

/** The ops table given at creation. */
const imp_layer_ops *imp_layer_get_ops(const imp_layer *layer);

/** Training (1, the default) or evaluation (0) mode; implicit layers use
 *  it to choose between training and evaluation budgets. */
void imp_layer_set_training(imp_layer *layer, int training);
int imp_layer_training(const imp_layer *layer);

/**
 * Move the layer's parameters and gradients into caller-owned storage of
 * nparams doubles each (a container's flat buffers).  The current values
 * are copied over and ops->rebind is called while the old storage can
 * still be read (a container moves its children there); then the layer's
 * own buffers, if it had any, are freed.  A later bind moves them again;
 * the layer never frees caller storage.
 */
int imp_layer_bind_storage(imp_layer *layer, double *params, double *grads);

#ifdef __cplusplus
}
#endif

#endif /* IMP_LAYER_H */

/*
 * imp/stack.h - layers composed in sequence.
 *
 * A stack of layers l_1, ..., l_L is the composition
 *
 *     a_0 = x,   a_k = l_k(a_{k-1}; theta_k),   y = a_L.
 *
 * forward keeps every activation a_k in buffers the stack owns; backward
 * is reverse-mode differentiation of the composition:
 *
 *     abar_L = ybar,   abar_{k-1} = (d l_k / d a_{k-1})^T abar_k,
 *     thetabar_k += (d l_k / d theta_k)^T abar_k,
 *
 * each step done by the layer's own backward, so explicit blocks and
 * implicit layers (whose backward is the adjoint solve) mix freely.
 *
 * The parameters of all layers live in one flat buffer, theta = (theta_1,
 * ..., theta_L), with a gradient buffer of the same layout: an optimizer
 * (imp/optim.h) or a checkpoint (imp/checkpoint.h) works on that one view.
 * Each layer's storage is moved into it (imp_layer_bind_storage) when the
 * layer is added, values preserved.
 *
 * A stack can be viewed as a layer of kind "stack" (imp_stack_as_layer), so
 * stacks nest: a stack inside a stack is one layer of the outer one.
 */
#ifndef IMP_STACK_H
#define IMP_STACK_H

#include <stddef.h>

#include "imp/layer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct imp_stack imp_stack;

/**
 * Make an empty stack; an empty stack is the identity map.  name (may be
 * NULL: "stack") is the name of its layer view.  The caller owns *out and
 * frees it with imp_stack_free.  On failure *out is NULL.
 */
int imp_stack_create(const char *name, imp_stack **out);

/**
 * Free the stack, every layer it holds, and its layer view if one was made
 * (the stack and its view are one object: free it once, with either
 * imp_stack_free or imp_layer_free).  Do not free a stack whose view was
 * added to another stack; the outer stack owns it.  NULL is accepted.
 */
void imp_stack_free(imp_stack *stack);

/**
 * Append a layer.  On success the stack owns the layer (it is freed with
 * the stack) and the layer's parameters and gradients now live in the
 * stack's flat buffers, values preserved; pointers obtained earlier from
 * imp_layer_params, imp_layer_grads, imp_stack_params or imp_stack_grads
 * are invalid.  On failure the caller still owns the layer and nothing
 * changed, with one exception: if the layer's own rebind op fails, its
 * storage has already moved, so the layer is freed.  A layer belongs to
 * one stack at most.  Returns IMP_EUNSUPPORTED once the stack has a layer
 * view (its parameter count is then fixed) and IMP_EINVAL for a layer that
 * is already in this stack.
 */
int imp_stack_add(imp_stack *stack, imp_layer *layer);

/** Number of layers; 0 for NULL. */
size_t imp_stack_nlayers(const imp_stack *stack);

/** Layer i (borrowed; owned by the stack), or NULL if i is out of range. */
imp_layer *imp_stack_layer(const imp_stack *stack, size_t i);

/**
 * The shape of the stack's output for an input of shape in, following the
 * shapes through every layer.  Returns IMP_ESHAPE, naming the layer, if a
 * layer cannot take the shape its predecessor produces.
 */
int imp_stack_output_shape(const imp_stack *stack, const imp_shape *in,
                           imp_shape *out);

/**
 * y = l_L(... l_1(x)).  x (shape in, borrowed) is copied; y (may be NULL:
 * read the result with imp_stack_activation) receives
 * imp_shape_numel(out) doubles.  The activations are kept in buffers the
 * stack owns, grown when shapes grow, for the next backward.  Returns
 * IMP_EINVAL for NULL arguments, IMP_ESHAPE for shapes that do not chain,
 * IMP_ENONFINITE for NaN or Inf in x, the parameters or an activation, or
 * the failing layer's status; the error message names the layer.
 */
int imp_stack_forward(imp_stack *stack, const imp_shape *in, const double *x,
                      double *y);

/**
 * Pull ybar (the output cotangent, borrowed, the shape of the last
 * forward's output) back through every layer, for the activations of the
 * last successful forward.  Gradient outputs first: xbar (may be NULL:
 * not needed) is accumulated, xbar += (dy/dx)^T ybar, and every layer's
 * parameter gradients are accumulated into the flat gradient buffer.
 * Returns IMP_EINVAL if no forward succeeded since the last change.
 */
int imp_stack_backward(imp_stack *stack, double *xbar, const double *ybar);

/**
 * Activation a_i of the last successful forward, 0 <= i <= nlayers (a_0 is
 * the copy of x, a_L the output): its shape and a borrowed pointer, valid
 * until the next forward or add.  Returns IMP_EINVAL if there is none.
 */
int imp_stack_activation(const imp_stack *stack, size_t i, imp_shape *shape,
                         const double **a);

/** Total number of parameters of all layers. */
size_t imp_stack_nparams(const imp_stack *stack);

/** The flat parameters (layer 1's first), owned by the stack (or by the
 *  stack that holds this one); write through it to set them. */
double *imp_stack_params(imp_stack *stack);

/** The flat gradients, same layout and ownership as the parameters. */
double *imp_stack_grads(imp_stack *stack);

/** Offset of layer i's parameters in the flat buffers (the sum of the
 *  earlier layers' counts); nparams for i past the end. */
size_t imp_stack_param_offset(const imp_stack *stack, size_t i);

/** Set every gradient to zero. */
void imp_stack_zero_grad(imp_stack *stack);

/** Training (1) or evaluation (0) mode for every layer, nested stacks
 *  included (imp_layer_set_training on each). */
void imp_stack_set_training(imp_stack *stack, int training);

/**
 * The stack as a layer of kind "stack" (borrowed: the stack and its view
 * are one object).  The first call makes the view; later calls return the
 * same one.  From then on the architecture is fixed (a layer's parameter
 * count is fixed when it is made) and imp_stack_add fails.  Adding the view
 * to another stack hands the whole stack to that stack.
 */
int imp_stack_as_layer(imp_stack *stack, imp_layer **out);

/** The stack behind a layer of kind "stack" (borrowed), or NULL if the
 *  layer is not a stack's view. */
imp_stack *imp_stack_from_layer(const imp_layer *layer);

#ifdef __cplusplus
}
#endif

#endif /* IMP_STACK_H */

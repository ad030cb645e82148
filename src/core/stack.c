/*
 * core/stack.c - layers in sequence: the flat parameter view, forward
 * with kept activations, reverse-mode backward, and the stack's own layer
 * view so that stacks nest.
 */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "imp/stack.h"

struct imp_stack {
  char name[48];
  imp_layer **layers; /* nlayers, owned */
  size_t nlayers;
  size_t *offsets; /* nlayers + 1: layer k's parameters start at offsets[k] */

  double *params; /* nparams, flat over all layers */
  double *grads;  /* nparams */
  size_t nparams;
  int owns_flat; /* params and grads were allocated here (not a parent's) */

  imp_layer *self; /* the layer view, or NULL until imp_stack_as_layer */
  int training;

  /* The last forward: shapes[k] and acts[k] are a_k, k = 0..nlayers. */
  imp_shape *shapes;    /* nlayers + 1 */
  double **acts;        /* nlayers + 1 buffers, act_cap[k] doubles each */
  size_t *act_cap;      /* nlayers + 1 */
  double *cotangent[2]; /* two buffers of cot_cap doubles for backward */
  size_t cot_cap;
  int have_forward;
};

static const imp_layer_ops stack_ops;

/* Free everything the stack owns; the layer view itself is not touched. */
static void stack_release(imp_stack *s)
{
  for (size_t k = 0; k < s->nlayers; k++)
    imp_layer_free(s->layers[k]);
  for (size_t k = 0; s->acts != NULL && k <= s->nlayers; k++)
    free(s->acts[k]);
  if (s->owns_flat) {
    free(s->params);
    free(s->grads);
  }
  free(s->cotangent[0]);
  free(s->cotangent[1]);
  free(s->layers);
  free(s->offsets);
  free(s->shapes);
  free(s->acts);
  free(s->act_cap);
  free(s);
}

int imp_stack_create(const char *name, imp_stack **out)
{
  imp_stack *s;

  if (out == NULL)
    return imp__fail(IMP_EINVAL, "stack_create: NULL output pointer");
  *out = NULL;

  s = calloc(1, sizeof *s);
  if (s == NULL)
    return imp__fail(IMP_ENOMEM, "stack_create");
  s->offsets = calloc(1, sizeof *s->offsets);
  s->shapes = calloc(1, sizeof *s->shapes);
  s->acts = calloc(1, sizeof *s->acts);
  s->act_cap = calloc(1, sizeof *s->act_cap);
  s->params = imp__dalloc(0);
  s->grads = imp__dalloc(0);
  s->owns_flat = 1;
  if (s->offsets == NULL || s->shapes == NULL || s->acts == NULL ||
      s->act_cap == NULL || s->params == NULL || s->grads == NULL) {
    stack_release(s);
    return imp__fail(IMP_ENOMEM, "stack_create");
  }

  strncpy(s->name, name != NULL ? name : "stack", sizeof s->name - 1);
  s->training = 1;
  *out = s;
  return IMP_OK;
}

void imp_stack_free(imp_stack *stack)
{
  if (stack == NULL)
    return;
  if (stack->self != NULL)
    imp_layer_free(stack->self); /* its destroy op releases the stack */
  else
    stack_release(stack);
}

/* Grow the per-layer arrays to hold n layers (n + 1 activations). */
static int stack_reserve(imp_stack *s, size_t n)
{
  imp_layer **layers = realloc(s->layers, n * sizeof *layers);
  size_t *offsets, *act_cap;
  imp_shape *shapes;
  double **acts;

  if (layers == NULL)
    return IMP_ENOMEM;
  s->layers = layers;
  offsets = realloc(s->offsets, (n + 1) * sizeof *offsets);
  if (offsets == NULL)
    return IMP_ENOMEM;
  s->offsets = offsets;
  shapes = realloc(s->shapes, (n + 1) * sizeof *shapes);
  if (shapes == NULL)
    return IMP_ENOMEM;
  s->shapes = shapes;
  acts = realloc(s->acts, (n + 1) * sizeof *acts);
  if (acts == NULL)
    return IMP_ENOMEM;
  s->acts = acts;
  act_cap = realloc(s->act_cap, (n + 1) * sizeof *act_cap);
  if (act_cap == NULL)
    return IMP_ENOMEM;
  s->act_cap = act_cap;

  /* The new activation slot starts empty. */
  s->acts[n] = NULL;
  s->act_cap[n] = 0;
  return IMP_OK;
}

/* Bind layers [0, count) to params/grads at their offsets. */
static int stack_bind_children(imp_stack *s, size_t count, double *params,
                               double *grads)
{
  for (size_t k = 0; k < count; k++)
    IMP__TRY(imp_layer_bind_storage(s->layers[k], params + s->offsets[k],
                                    grads + s->offsets[k]));
  return IMP_OK;
}

int imp_stack_add(imp_stack *stack, imp_layer *layer)
{
  const imp_stack *inner;
  size_t n, m, total;
  double *params, *grads;
  int rc;

  if (stack == NULL || layer == NULL)
    return imp__fail(IMP_EINVAL, "stack_add: NULL argument");
  if (stack->self != NULL)
    return imp__fail(IMP_EUNSUPPORTED,
                     "stack %s: cannot add a layer once "
                     "the stack is viewed as a layer",
                     stack->name);
  inner = imp_stack_from_layer(layer);
  if (inner != NULL && !inner->owns_flat)
    return imp__fail(IMP_EINVAL,
                     "stack %s: stack %s is already inside "
                     "another stack",
                     stack->name, inner->name);
  for (size_t k = 0; k < stack->nlayers; k++)
    if (stack->layers[k] == layer)
      return imp__fail(IMP_EINVAL, "stack %s: layer %s is already layer %zu",
                       stack->name, imp_layer_name(layer), k);

  /* Allocate everything first, so that a failure changes nothing. */
  n = stack->nlayers;
  m = imp_layer_nparams(layer);
  total = stack->nparams + m;
  if (total < m || stack_reserve(stack, n + 1) != IMP_OK)
    return imp__fail(IMP_ENOMEM, "stack %s: room for layer %zu", stack->name,
                     n);
  params = imp__dalloc(total);
  grads = imp__dalloc(total);
  if (params == NULL || grads == NULL) {
    free(params);
    free(grads);
    return imp__fail(IMP_ENOMEM, "stack %s: %zu parameters", stack->name,
                     total);
  }

  /* Move every layer's storage into the new flat buffers, values kept:
   * the old layers first, the new one last. */
  stack->layers[n] = layer;
  stack->offsets[n + 1] = total;
  rc = stack_bind_children(stack, n, params, grads);
  if (rc == IMP_OK) {
    rc = imp_layer_bind_storage(layer, params + stack->offsets[n],
                                grads + stack->offsets[n]);
    if (rc != IMP_OK)
      imp_layer_free(layer); /* its storage has moved: it cannot go back */
  }
  if (rc != IMP_OK) {
    stack_bind_children(stack, n, stack->params, stack->grads);
    free(params);
    free(grads);
    return rc;
  }
  free(stack->params);
  free(stack->grads);
  stack->params = params;
  stack->grads = grads;
  stack->nparams = total;
  stack->nlayers = n + 1;
  imp_layer_set_training(layer, stack->training);
  stack->have_forward = 0;
  return IMP_OK;
}

size_t imp_stack_nlayers(const imp_stack *stack)
{
  return stack != NULL ? stack->nlayers : 0;
}

imp_layer *imp_stack_layer(const imp_stack *stack, size_t i)
{
  if (stack == NULL || i >= stack->nlayers)
    return NULL;
  return stack->layers[i];
}

size_t imp_stack_nparams(const imp_stack *stack)
{
  return stack != NULL ? stack->nparams : 0;
}

double *imp_stack_params(imp_stack *stack)
{
  return stack != NULL ? stack->params : NULL;
}

double *imp_stack_grads(imp_stack *stack)
{
  return stack != NULL ? stack->grads : NULL;
}

size_t imp_stack_param_offset(const imp_stack *stack, size_t i)
{
  if (stack == NULL)
    return 0;
  return stack->offsets[i < stack->nlayers ? i : stack->nlayers];
}

void imp_stack_zero_grad(imp_stack *stack)
{
  if (stack != NULL && stack->nparams > 0)
    memset(stack->grads, 0, stack->nparams * sizeof(double));
}

void imp_stack_set_training(imp_stack *stack, int training)
{
  if (stack == NULL)
    return;
  stack->training = training != 0;
  if (stack->self != NULL)
    imp_layer_set_training(stack->self, stack->training);
  for (size_t k = 0; k < stack->nlayers; k++) {
    imp_stack *inner = imp_stack_from_layer(stack->layers[k]);

    if (inner != NULL)
      imp_stack_set_training(inner, stack->training);
    else
      imp_layer_set_training(stack->layers[k], stack->training);
  }
}

/*
 * Re-record a layer's failure with the stack and the layer named in front,
 * keeping the status.  The layer's message is copied first, because
 * imp__fail writes into the buffer that imp_last_error returns.
 */
static int stack_fail_at(const imp_stack *s, size_t k, int rc)
{
  const char *last = imp_last_error();
  size_t prefix = strlen(imp_status_name(rc));
  char detail[400];

  /* Drop the "name: " prefix that imp__fail put in front. */
  if (strncmp(last, imp_status_name(rc), prefix) == 0 &&
      strncmp(last + prefix, ": ", 2) == 0)
    last += prefix + 2;
  strncpy(detail, last, sizeof detail - 1);
  detail[sizeof detail - 1] = '\0';
  return imp__fail(rc, "stack %s, layer %zu (%s): %s", s->name, k,
                   imp_layer_name(s->layers[k]), detail);
}

/* b = the output shape of layer k for input shape a. */
static int stack_layer_shape(const imp_stack *s, size_t k, const imp_shape *a,
                             imp_shape *b)
{
  int rc = imp_layer_output_shape(s->layers[k], a, b);

  if (rc != IMP_OK)
    return stack_fail_at(s, k, rc);
  if (imp_shape_numel(b) == 0)
    return imp__fail(IMP_ESHAPE,
                     "stack %s, layer %zu (%s): empty or overflowing output "
                     "for input (%zu, %zu, %zu, %zu)",
                     s->name, k, imp_layer_name(s->layers[k]), a->n, a->c, a->h,
                     a->w);
  return IMP_OK;
}

int imp_stack_output_shape(const imp_stack *stack, const imp_shape *in,
                           imp_shape *out)
{
  imp_shape a;

  if (stack == NULL || in == NULL || out == NULL)
    return imp__fail(IMP_EINVAL, "stack_output_shape: NULL argument");

  /* Not through stack->shapes: those belong to the last forward. */
  a = *in;
  for (size_t k = 0; k < stack->nlayers; k++) {
    imp_shape b;

    IMP__TRY(stack_layer_shape(stack, k, &a, &b));
    a = b;
  }
  *out = a;
  return IMP_OK;
}

/* Make acts[k] hold at least the activation of shapes[k], and the two
 * cotangent buffers the largest of them. */
static int stack_grow_buffers(imp_stack *s)
{
  size_t largest = 0;

  for (size_t k = 0; k <= s->nlayers; k++) {
    size_t need = imp_shape_numel(&s->shapes[k]);

    if (need > largest)
      largest = need;
    if (need > s->act_cap[k]) {
      double *a = imp__dalloc(need);

      if (a == NULL)
        return imp__fail(IMP_ENOMEM,
                         "stack %s: activation %zu of %zu "
                         "doubles",
                         s->name, k, need);
      free(s->acts[k]);
      s->acts[k] = a;
      s->act_cap[k] = need;
    }
  }

  if (largest > s->cot_cap) {
    double *c0 = imp__dalloc(largest), *c1 = imp__dalloc(largest);

    if (c0 == NULL || c1 == NULL) {
      free(c0);
      free(c1);
      return imp__fail(IMP_ENOMEM, "stack %s: cotangents of %zu doubles",
                       s->name, largest);
    }
    free(s->cotangent[0]);
    free(s->cotangent[1]);
    s->cotangent[0] = c0;
    s->cotangent[1] = c1;
    s->cot_cap = largest;
  }
  return IMP_OK;
}

int imp_stack_forward(imp_stack *stack, const imp_shape *in, const double *x,
                      double *y)
{
  imp_shape *shapes;
  size_t nin, L;

  if (stack == NULL || in == NULL || x == NULL)
    return imp__fail(IMP_EINVAL, "stack_forward: NULL argument");
  stack->have_forward = 0;
  L = stack->nlayers;

  /* Shapes first, then buffers, then the input itself. */
  nin = imp_shape_numel(in);
  if (nin == 0)
    return imp__fail(IMP_ESHAPE,
                     "stack %s: empty or overflowing input "
                     "shape (%zu, %zu, %zu, %zu)",
                     stack->name, in->n, in->c, in->h, in->w);
  shapes = stack->shapes;
  shapes[0] = *in;
  for (size_t k = 0; k < L; k++)
    IMP__TRY(stack_layer_shape(stack, k, &shapes[k], &shapes[k + 1]));
  IMP__TRY(stack_grow_buffers(stack));
  if (!imp__all_finite(x, nin))
    return imp__fail(IMP_ENONFINITE, "stack %s: NaN or Inf in the input",
                     stack->name);

  /* a_0 = x, a_k = l_k(a_{k-1}). */
  memcpy(stack->acts[0], x, nin * sizeof(double));
  for (size_t k = 0; k < L; k++) {
    int rc = imp_layer_forward(stack->layers[k], &stack->shapes[k],
                               stack->acts[k], stack->acts[k + 1]);

    if (rc != IMP_OK)
      return stack_fail_at(stack, k, rc);
  }

  if (y != NULL)
    memcpy(y, stack->acts[L],
           imp_shape_numel(&stack->shapes[L]) * sizeof(double));
  stack->have_forward = 1;
  return IMP_OK;
}

int imp_stack_backward(imp_stack *stack, double *xbar, const double *ybar)
{
  const double *abar;
  size_t L, nout;

  if (stack == NULL || ybar == NULL)
    return imp__fail(IMP_EINVAL, "stack_backward: NULL argument");
  if (!stack->have_forward)
    return imp__fail(IMP_EINVAL,
                     "stack %s: backward without a successful "
                     "forward",
                     stack->name);
  L = stack->nlayers;
  nout = imp_shape_numel(&stack->shapes[L]);
  if (!imp__all_finite(ybar, nout))
    return imp__fail(IMP_ENONFINITE,
                     "stack %s: NaN or Inf in the output "
                     "cotangent",
                     stack->name);

  /* The identity: xbar += ybar. */
  if (L == 0) {
    for (size_t i = 0; xbar != NULL && i < nout; i++)
      xbar[i] += ybar[i];
    return IMP_OK;
  }

  /* abar_{k-1} = (d l_k / d a_{k-1})^T abar_k, alternating between the two
   * cotangent buffers; the last step accumulates into the caller's xbar. */
  abar = ybar;
  for (size_t k = L; k-- > 0;) {
    double *prev = k > 0 ? stack->cotangent[k % 2] : xbar;
    int rc;

    if (k > 0)
      memset(prev, 0, imp_shape_numel(&stack->shapes[k]) * sizeof(double));
    rc = imp_layer_backward(stack->layers[k], prev, abar, &stack->shapes[k],
                            stack->acts[k], stack->acts[k + 1]);
    if (rc != IMP_OK)
      return stack_fail_at(stack, k, rc);
    abar = prev;
  }
  return IMP_OK;
}

int imp_stack_activation(const imp_stack *stack, size_t i, imp_shape *shape,
                         const double **a)
{
  if (stack == NULL || shape == NULL || a == NULL)
    return imp__fail(IMP_EINVAL, "stack_activation: NULL argument");
  if (!stack->have_forward)
    return imp__fail(IMP_EINVAL, "stack %s: no successful forward",
                     stack->name);
  if (i > stack->nlayers)
    return imp__fail(IMP_EINVAL, "stack %s: activation %zu of %zu", stack->name,
                     i, stack->nlayers);
  *shape = stack->shapes[i];
  *a = stack->acts[i];
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* The layer view. */

static int stack_op_output_shape(const imp_layer *layer, const imp_shape *in,
                                 imp_shape *out)
{
  return imp_stack_output_shape(imp_layer_state(layer), in, out);
}

static int stack_op_forward(imp_layer *layer, const imp_shape *in,
                            const double *x, double *y)
{
  imp_stack *s = imp_layer_state(layer);

  /* imp_layer_set_training on the view reaches the children here. */
  if (imp_layer_training(layer) != s->training)
    imp_stack_set_training(s, imp_layer_training(layer));
  return imp_stack_forward(s, in, x, y);
}

/* x and y are those of the last forward, which the stack kept. */
static int stack_op_backward(imp_layer *layer, double *xbar, const double *ybar,
                             const imp_shape *in, const double *x,
                             const double *y)
{
  (void)in;
  (void)x;
  (void)y;
  return imp_stack_backward(imp_layer_state(layer), xbar, ybar);
}

/* The view's storage moved (into a parent's flat buffers): move every
 * child along and drop the stack's own buffers. */
static int stack_op_rebind(imp_layer *layer)
{
  imp_stack *s = imp_layer_state(layer);
  double *params = imp_layer_params(layer);
  double *grads = imp_layer_grads(layer);

  IMP__TRY(stack_bind_children(s, s->nlayers, params, grads));
  if (s->owns_flat && params != s->params) {
    free(s->params);
    free(s->grads);
    s->owns_flat = 0;
  }
  s->params = params;
  s->grads = grads;
  return IMP_OK;
}

/* Called by imp_layer_free on the view.  Before the view is complete
 * (self still NULL) the stack belongs to its caller and is left alone. */
static void stack_op_destroy(void *state)
{
  imp_stack *s = state;

  if (s != NULL && s->self != NULL)
    stack_release(s);
}

static const imp_layer_ops stack_ops = {
    .kind = "stack",
    .output_shape = stack_op_output_shape,
    .forward = stack_op_forward,
    .backward = stack_op_backward,
    .rebind = stack_op_rebind,
    .destroy = stack_op_destroy,
};

int imp_stack_as_layer(imp_stack *stack, imp_layer **out)
{
  imp_layer *view;
  int rc;

  if (stack == NULL || out == NULL)
    return imp__fail(IMP_EINVAL, "stack_as_layer: NULL argument");
  if (stack->self != NULL) {
    *out = stack->self;
    return IMP_OK;
  }
  *out = NULL;

  /* The view's storage is the stack's flat buffers: copy the values into
   * the view's own buffers, then bind them back, which keeps them. */
  IMP__TRY(
      imp_layer_create(&stack_ops, stack, stack->nparams, stack->name, &view));
  if (stack->nparams > 0) {
    memcpy(imp_layer_params(view), stack->params,
           stack->nparams * sizeof(double));
    memcpy(imp_layer_grads(view), stack->grads,
           stack->nparams * sizeof(double));
  }
  rc = imp_layer_bind_storage(view, stack->params, stack->grads);
  if (rc != IMP_OK) {
    imp_layer_free(view); /* self is NULL: the stack survives */
    return rc;
  }

  imp_layer_set_training(view, stack->training);
  stack->self = view;
  *out = view;
  return IMP_OK;
}

imp_stack *imp_stack_from_layer(const imp_layer *layer)
{
  if (layer == NULL || imp_layer_get_ops(layer) != &stack_ops)
    return NULL;
  return imp_layer_state(layer);
}

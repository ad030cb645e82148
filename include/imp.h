/*
 * imp.h - implicit layers in C.
 *
 * An implicit layer defines its output y by an equation f(x, y; theta) = 0
 * rather than a formula, finds y with a solver, and gets its gradient from
 * the implicit function theorem instead of backpropagating through the
 * solver.  imp builds four kinds from one abstraction, the implicit problem
 * (imp/problem.h), and differentiates all of them through one adjoint solve
 * (imp/adjoint.h):
 *
 *   root-finding layers     y is a zero of f(x, y; theta)       imp/root.h
 *   neural ODE layers       y = h(T), dh/dt = g(t, h; theta)    imp/ode.h
 *   optimization layers     y solves a convex QP (via KKT)      imp/qp.h
 *   deep equilibrium layers y = h(x, y; theta), a fixed point   imp/deq.h
 *
 * Each of those headers opens with the layer's maths, and ends its opening
 * comment with one complete example of the kind: a problem, the layer,
 * forward and backward.  Every layer is an imp_layer (imp/layer.h), so
 * the kinds compose with each other and with the explicit blocks
 * (imp/blocks.h: dense, 3x3 convolution, activations) in a stack
 * (imp/stack.h), trained by an optimizer (imp/optim.h) on a loss
 * (imp/loss.h) and saved in checkpoints (imp/checkpoint.h).
 * examples/stack.c chains a dense layer, a DEQ, a neural ODE, a
 * root-finding layer and a QP layer in one stack and trains it end to end.
 *
 * Conventions: every function returns a status (imp/status.h); the
 * library never aborts, exits or prints; doubles, row-major, batch first;
 * ownership is written beside each function.
 *
 * Include this header for all of imp.
 */
#ifndef IMP_H
#define IMP_H

#include "imp/status.h"
#include "imp/problem.h"
#include "imp/adjoint.h"
#include "imp/gradcheck.h"
#include "imp/layer.h"
#include "imp/rng.h"
#include "imp/root.h"
#include "imp/qp.h"
#include "imp/ode.h"
#include "imp/blocks.h"
#include "imp/loss.h"
#include "imp/stack.h"
#include "imp/optim.h"
#include "imp/checkpoint.h"
#include "imp/fixed_point.h"
#include "imp/deq.h"

#endif /* IMP_H */

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
 *   root-finding layers    y is a zero of f(x, y; theta)       imp/root.h
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

/*
 * fixture.c - the stack, optimizer and progress of fixture.h.
 */
#include "fixture.h"

#include <string.h>

#include "imp/blocks.h"
#include "imp/status.h"

void fuzz_fixture_make(fuzz_fixture *f)
{
  imp_layer *fc = NULL, *act = NULL;
  imp_rng rng;
  double grads[16];
  size_t n;

  /* The stack: Glorot-normal weights from a fixed seed. */
  memset(f, 0, sizeof *f);
  imp_rng_seed(&rng, 20240601);
  FUZZ_CHECK(imp_stack_create("fuzz", &f->stack) == IMP_OK, "stack");
  FUZZ_CHECK(imp_dense_create(3, 4, &rng, "fc", &fc) == IMP_OK, "dense");
  FUZZ_CHECK(imp_stack_add(f->stack, fc) == IMP_OK, "add dense");
  FUZZ_CHECK(imp_activation_create(IMP_ACT_TANH, "act", &act) == IMP_OK,
             "tanh");
  FUZZ_CHECK(imp_stack_add(f->stack, act) == IMP_OK, "add tanh");
  n = imp_stack_nparams(f->stack);
  FUZZ_CHECK(n == 16, "a dense 3 -> 4 layer has 16 parameters");

  /* Two Adam steps from fixed gradients, so that the moments and the
   * step count are not those of a fresh optimizer. */
  FUZZ_CHECK(imp_optim_create(imp_optim_adam, n, NULL, &f->optim) == IMP_OK,
             "adam");
  for (int step = 0; step < 2; step++) {
    for (size_t i = 0; i < n; i++)
      grads[i] = 0.25 * (double)i - 1.0 + 0.5 * step;
    FUZZ_CHECK(imp_optim_step(f->optim, imp_stack_params(f->stack), grads, n) ==
                   IMP_OK,
               "adam step");
  }

  /* The run's progress: step 2, a generator that has moved on. */
  f->progress.step = 2;
  f->progress.rng = rng;
}

void fuzz_fixture_free(fuzz_fixture *f)
{
  imp_stack_free(f->stack);
  imp_optim_free(f->optim);
  memset(f, 0, sizeof *f);
}

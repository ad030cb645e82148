/*
 * fixture.h - the fixed training state the checkpoint fuzz target loads
 * into, and that its seed generator saves: a stack "fuzz" of a dense layer
 * 3 -> 4 ("fc") and a tanh ("act"), an Adam optimizer over its 16
 * parameters that has taken two steps, and the run's progress.
 *
 * Everything is deterministic, so the seeds written from it are the same
 * bytes on every run, and a target that loads them succeeds.  This is
 * harness code: if the library refuses to build the fixture, it aborts
 * through FUZZ_CHECK.
 */
#ifndef IMP_FUZZ_FIXTURE_H
#define IMP_FUZZ_FIXTURE_H

#include <stddef.h>

#include "check.h"
#include "imp/checkpoint.h"

typedef struct fuzz_fixture {
  imp_stack *stack;
  imp_optim *optim;
  imp_progress progress;
} fuzz_fixture;

/** Build the fixture into f; aborts if the library refuses. */
void fuzz_fixture_make(fuzz_fixture *f);

/** Free what fuzz_fixture_make made; the fields are zeroed. */
void fuzz_fixture_free(fuzz_fixture *f);

#endif /* IMP_FUZZ_FIXTURE_H */

/*
 * deq/picard.c - damped Picard (Krasnosel'skii-Mann) iteration,
 * z <- (1 - tau) z + tau T(z).  It needs no memory; for a contraction with
 * factor rho it gains a factor 1 - tau (1 - rho) per step.
 */
#include <stdlib.h>

#include "core/internal.h"
#include "imp/fixed_point.h"

typedef struct picard {
  size_t d;
  double tau;
} picard;

static int picard_alloc(void **state, size_t n, size_t d,
                        const imp_fp_options *opt)
{
  picard *p = malloc(sizeof *p);

  (void)n;
  if (p == NULL)
    return imp__fail(IMP_ENOMEM, "picard state");
  p->d = d;
  p->tau = opt->damping;
  *state = p;
  return IMP_OK;
}

static int picard_update(void *state, size_t m, const size_t *idx,
                         const double *z, const double *g, double *z_next,
                         size_t *fallbacks)
{
  const picard *p = state;

  (void)idx, (void)fallbacks;
  for (size_t i = 0; i < m * p->d; i++)
    z_next[i] = (1.0 - p->tau) * z[i] + p->tau * g[i];
  return IMP_OK;
}

static const imp_fp_type picard_type = {
    .name = "picard",
    .alloc = picard_alloc,
    .update = picard_update,
    .free = free,
};

const imp_fp_type *const imp_fp_picard = &picard_type;

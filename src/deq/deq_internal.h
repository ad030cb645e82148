/*
 * deq/deq_internal.h - what a DEQ whose map the library owns (one built
 * from layers) needs from the layer: a context freed with the layer and
 * told when the parameters move; and what the layer needs from the
 * fixed-point driver beyond imp_fp_solve: a residual trace that grows
 * with the iterations run.
 */
#ifndef IMP_DEQ_INTERNAL_H
#define IMP_DEQ_INTERNAL_H

#include "imp/deq.h"

typedef struct imp__deq_owner {
  void *ctx; /* the map's context, owned by the layer */
  void (*destroy)(void *ctx);
  /* The layer's parameters now live at params (old storage still valid). */
  int (*rebind)(void *ctx, double *params);
} imp__deq_owner;

/* imp_deq_create, with the map's context handed to the layer.  On failure
 * the context is not freed. */
int imp__deq_create(const imp_deq_map *map, const double *theta0,
                    const imp_deq_options *opt, const char *name,
                    const imp__deq_owner *owner, imp_layer **out);

/* A residual trace that grows with the iterations actually run, so that a
 * budget of 1e11 iterations costs nothing until they are spent.  data
 * (malloc'd, freed with free) holds capacity doubles, of which len are
 * the worst relative residuals of the iterations of the last solve. */
typedef struct imp__fp_trace {
  double *data;
  size_t capacity, len;
} imp__fp_trace;

/* imp_fp_solve, with the trace kept in *trace (NULL: none), grown by
 * realloc as the iterations go; the memory stays with the trace for the
 * next solve. */
int imp__fp_solve_grown(const imp_fp_type *type, imp_fp_map_fn map, void *ctx,
                        size_t n, size_t d, double *z,
                        const imp_fp_options *opt, imp_fp_stats *stats,
                        imp__fp_trace *trace);

#endif /* IMP_DEQ_INTERNAL_H */

/*
 * deq/deq_internal.h - what a DEQ whose map the library owns (one built
 * from layers) needs from the layer: a context freed with the layer and
 * told when the parameters move.
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

#endif /* IMP_DEQ_INTERNAL_H */

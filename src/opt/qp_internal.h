/*
 * opt/qp_internal.h - what the QP sources share: one QP's view into a
 * batch, the argument checks, and the options with their defaults.
 * Not installed.
 */
#ifndef IMP_OPT_QP_INTERNAL_H
#define IMP_OPT_QP_INTERNAL_H

#include <stddef.h>

#include "imp/qp.h"

/* One QP of a batch: pointers to sample k's pieces (NULL where absent). */
typedef struct imp__qp_view {
  const double *Q, *p, *A, *b, *G, *h;
} imp__qp_view;

/* Options with the defaults filled in. */
typedef struct imp__qp_config {
  double tol;
  size_t max_iter;
  double psd_tol;
  double radius;
  imp_qp_system system;
  imp_adjoint_options adjoint;
} imp__qp_config;

imp__qp_config imp__qp_configure(const imp_qp_options *opt);

/* Check dims, nbatch and the data's pointers and strides; fn names the
 * caller in the message. */
int imp__qp_check(const imp_qp_dims *dims, size_t nbatch,
                  const imp_qp_data *data, const char *fn);

/* Sample k's pieces. */
imp__qp_view imp__qp_view_of(const imp_qp_data *data, size_t k);

/* IMP_ENONFINITE, naming the piece and the sample, unless sample k's data
 * is finite.  Shared pieces are checked only for k = 0. */
int imp__qp_check_finite(const imp_qp_dims *dims, const imp_qp_data *data,
                         size_t k, const char *fn);

/* The offsets of the pieces inside theta: Q, p, A, b, G, h, end. */
void imp__qp_theta_offsets(const imp_qp_dims *dims, size_t off[7]);

#endif /* IMP_OPT_QP_INTERNAL_H */

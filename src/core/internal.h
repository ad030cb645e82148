/*
 * core/internal.h - helpers shared by the library's own sources.
 * Not installed; nothing here is part of the public API.
 */
#ifndef IMP_CORE_INTERNAL_H
#define IMP_CORE_INTERNAL_H

#include <stddef.h>

#include "imp/status.h"

#if defined(__GNUC__)
#define IMP__PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define IMP__PRINTF(f, a)
#endif

/*
 * Record a failure: format the thread's detail message, pass it to the log
 * hook, and return status so that callers can write
 *     return imp__fail(IMP_EINVAL, "dense: %zu inputs, expected %zu", ...);
 */
int imp__fail(int status, const char *fmt, ...) IMP__PRINTF(2, 3);

/*
 * A callback's return code as a status.  0 is IMP_OK.  A negative code
 * that is one of imp's statuses passes through as it is, its message kept:
 * a callback the library owns (a DEQ built from layers, say) reports its
 * own IMP_ENOMEM so.  Anything else is IMP_ECALLBACK, naming what failed.
 */
int imp__callback_status(int rc, const char *what);

/* Send a line to the log hook, if one is installed at that level. */
void imp__log(imp_log_level level, const char *fmt, ...) IMP__PRINTF(2, 3);

/* 1 if all n entries are finite. */
int imp__all_finite(const double *a, size_t n);

/* Euclidean norm and dot product (BLAS dnrm2/ddot). */
double imp__nrm2(size_t n, const double *a);
double imp__dot(size_t n, const double *a, const double *b);

/* calloc of n doubles, NULL on overflow or failure; free with free(). */
double *imp__dalloc(size_t n);

/* Evaluate a statement that yields a status; return it on failure. */
#define IMP__TRY(expr)                                                         \
  do {                                                                         \
    int imp__rc = (expr);                                                      \
    if (imp__rc != IMP_OK)                                                     \
      return imp__rc;                                                          \
  } while (0)

#endif /* IMP_CORE_INTERNAL_H */

/*
 * imp/status.h - status codes, error details and the log hook.
 *
 * Every public function of imp returns an int status: IMP_OK (0) on
 * success, a negative IMP_E* code on failure.  Nothing in the library
 * aborts, exits or prints.  A failing call also records a one-line detail
 * message for the calling thread, which imp_last_error() returns; the
 * message says where the failure arose and carries the figures that show
 * it (a condition number, a residual, a CVODES flag name).
 */
#ifndef IMP_STATUS_H
#define IMP_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * The table of status codes: X(enum name, value, short name, message).
 * Values are stable; new codes are appended.
 */
#define IMP_STATUS_TABLE(X)                                                    \
  X(IMP_OK, 0, "ok", "success")                                                \
  X(IMP_EINVAL, -1, "invalid", "invalid argument")                             \
  X(IMP_ENOMEM, -2, "nomem", "out of memory")                                  \
  X(IMP_ENONFINITE, -3, "nonfinite", "non-finite value (NaN or Inf)")          \
  X(IMP_ENOCONV, -4, "noconv", "no convergence within the budget")             \
  X(IMP_ESINGULAR, -5, "singular", "singular or ill-conditioned Jacobian")     \
  X(IMP_ECALLBACK, -6, "callback", "a user callback reported failure")         \
  X(IMP_EBACKEND, -7, "backend",                                               \
    "a backend library (GSL, SUNDIALS, LAPACK) "                               \
    "failed")                                                                  \
  X(IMP_ESHAPE, -8, "shape", "tensor shapes do not match")                     \
  X(IMP_EIO, -9, "io", "input/output error")                                   \
  X(IMP_EFORMAT, -10, "format", "malformed or corrupted data")                 \
  X(IMP_EINFEASIBLE, -11, "infeasible", "the problem is infeasible")           \
  X(IMP_EUNBOUNDED, -12, "unbounded", "the problem is unbounded")              \
  X(IMP_ENONCONVEX, -13, "nonconvex", "the problem is not convex")             \
  X(IMP_EUNSUPPORTED, -14, "unsupported",                                      \
    "operation not supported by this object")

/** Status codes returned by every public function. */
typedef enum imp_status {
#define IMP__STATUS_ENUM(name, value, short_name, message) name = value,
  IMP_STATUS_TABLE(IMP__STATUS_ENUM)
#undef IMP__STATUS_ENUM
} imp_status;

/** A static message for a status code; never NULL, even for unknown codes. */
const char *imp_strerror(int status);

/** The short name of a status code ("singular", "noconv", ...). */
const char *imp_status_name(int status);

/**
 * The detail message of the calling thread's last failure, or "" if no
 * call has failed yet.  The string is owned by the library and stays valid
 * until the thread's next failing imp call.
 */
const char *imp_last_error(void);

/** Forget the calling thread's last error message. */
void imp_clear_error(void);

/** Log levels passed to the log hook. */
typedef enum imp_log_level {
  IMP_LOG_ERROR = 0,
  IMP_LOG_WARN = 1,
  IMP_LOG_INFO = 2,
  IMP_LOG_DEBUG = 3
} imp_log_level;

/** A log hook: called with a level, a complete line (no newline) and the
 *  user's pointer.  It may be called from any thread that calls imp. */
typedef void (*imp_log_fn)(imp_log_level level, const char *line, void *user);

/**
 * Install a log hook; NULL removes it.  The library is silent by default.
 * Messages above max_level are not formatted at all.
 */
void imp_set_log(imp_log_fn fn, void *user, imp_log_level max_level);

#ifdef __cplusplus
}
#endif

#endif /* IMP_STATUS_H */

/*
 * core/status.c - status names and messages, the per-thread error detail,
 * and the log hook.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "imp/status.h"

#define IMP__MESSAGE_SIZE 512

static _Thread_local char last_error[IMP__MESSAGE_SIZE];

static imp_log_fn log_fn;
static void *log_user;
static imp_log_level log_max = IMP_LOG_ERROR;

const char *imp_strerror(int status)
{
  switch (status) {
#define IMP__STATUS_MESSAGE(name, value, short_name, message)                  \
  case name:                                                                   \
    return message;
    IMP_STATUS_TABLE(IMP__STATUS_MESSAGE)
#undef IMP__STATUS_MESSAGE
  }
  return "unknown status code";
}

const char *imp_status_name(int status)
{
  switch (status) {
#define IMP__STATUS_NAME(name, value, short_name, message)                     \
  case name:                                                                   \
    return short_name;
    IMP_STATUS_TABLE(IMP__STATUS_NAME)
#undef IMP__STATUS_NAME
  }
  return "unknown";
}

const char *imp_last_error(void)
{
  return last_error;
}

void imp_clear_error(void)
{
  last_error[0] = '\0';
}

void imp_set_log(imp_log_fn fn, void *user, imp_log_level max_level)
{
  log_fn = fn;
  log_user = user;
  log_max = max_level;
}

int imp__callback_status(int rc, const char *what)
{
  if (rc == 0)
    return IMP_OK;
  if (rc < 0 && strcmp(imp_status_name(rc), "unknown") != 0)
    return rc;
  return imp__fail(IMP_ECALLBACK, "%s returned %d", what, rc);
}

int imp__fail(int status, const char *fmt, ...)
{
  char line[IMP__MESSAGE_SIZE - 32]; /* room for the status name */
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  snprintf(last_error, sizeof last_error, "%s: %s", imp_status_name(status),
           line);
  if (log_fn != NULL && IMP_LOG_ERROR <= log_max)
    log_fn(IMP_LOG_ERROR, last_error, log_user);
  return status;
}

void imp__log(imp_log_level level, const char *fmt, ...)
{
  char line[IMP__MESSAGE_SIZE];
  va_list ap;

  if (log_fn == NULL || level > log_max)
    return;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  log_fn(level, line, log_user);
}

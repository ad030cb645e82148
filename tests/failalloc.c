/*
 * failalloc.c - a malloc that fails on demand and remembers what it gave
 * out while armed.  See failalloc.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <stddef.h>
#include <stdint.h>

#include "failalloc.h"

void *__libc_malloc(size_t size);
void *__libc_calloc(size_t n, size_t size);
void *__libc_realloc(void *p, size_t size);
void __libc_free(void *p);

void *malloc(size_t size);
void *calloc(size_t n, size_t size);
void *realloc(void *p, size_t size);
void free(void *p);

#define SLOTS (1u << 16) /* open addressing; far more than a scenario holds */

static int armed;
static const char *exempt;
static long fail_at, made;
static void *live[SLOTS];
static long nlive;

static size_t slot_of(const void *p)
{
  return (size_t)(((uintptr_t)p >> 4) * 2654435761u) & (SLOTS - 1);
}

static void remember(void *p)
{
  size_t i = slot_of(p);

  while (live[i] != NULL)
    i = (i + 1) & (SLOTS - 1);
  live[i] = p;
  nlive++;
}

/* Forget p if it was handed out while armed (backward-shift deletion). */
static void forget(void *p)
{
  size_t i = slot_of(p), j;

  while (live[i] != NULL && live[i] != p)
    i = (i + 1) & (SLOTS - 1);
  if (live[i] == NULL)
    return;
  live[i] = NULL;
  nlive--;
  for (j = (i + 1) & (SLOTS - 1); live[j] != NULL; j = (j + 1) & (SLOTS - 1)) {
    size_t home = slot_of(live[j]);

    /* Move live[j] into the hole if its home is not between i and j. */
    if ((j > i && (home <= i || home > j)) ||
        (j < i && home <= i && home > j)) {
      live[i] = live[j];
      live[j] = NULL;
      i = j;
    }
  }
}

/* 1 if this allocation, made from the code at caller, is to fail. */
static int should_fail(const void *caller)
{
  Dl_info info;

  if (!armed)
    return 0;
  if (exempt != NULL && dladdr(caller, &info) != 0 && info.dli_fname != NULL &&
      strstr(info.dli_fname, exempt) != NULL)
    return 0;
  return made++ >= fail_at;
}

void *malloc(size_t size)
{
  void *p;

  if (should_fail(__builtin_return_address(0))) {
    errno = ENOMEM;
    return NULL;
  }
  p = __libc_malloc(size);
  if (armed && p != NULL)
    remember(p);
  return p;
}

void *calloc(size_t n, size_t size)
{
  void *p;

  if (should_fail(__builtin_return_address(0))) {
    errno = ENOMEM;
    return NULL;
  }
  p = __libc_calloc(n, size);
  if (armed && p != NULL)
    remember(p);
  return p;
}

void *realloc(void *p, size_t size)
{
  void *q;

  if (p == NULL)
    return malloc(size);
  if (should_fail(__builtin_return_address(0))) {
    errno = ENOMEM;
    return NULL;
  }
  q = __libc_realloc(p, size);
  if (armed && q != NULL) {
    forget(p);
    remember(q);
  }
  return q;
}

void free(void *p)
{
  if (p == NULL)
    return;
  if (nlive > 0)
    forget(p);
  __libc_free(p);
}

void failalloc_exempt(const char *name)
{
  exempt = name;
}

void failalloc_arm(long n)
{
  fail_at = n;
  made = 0;
  armed = 1;
}

void failalloc_disarm(long *n_made, long *n_live)
{
  armed = 0;
  *n_made = made;
  *n_live = nlive;
  for (size_t i = 0; i < SLOTS; i++)
    live[i] = NULL;
  nlive = 0;
}

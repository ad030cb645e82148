/*
 * check.c - fuzz_die, behind FUZZ_CHECK.
 */
#include "check.h"

#include <stdio.h>
#include <stdlib.h>

#include "imp/status.h"

void fuzz_die(const char *file, int line, const char *what)
{
  fprintf(stderr, "%s:%d: fuzz check failed: %s (last imp error: %s)\n", file,
          line, what, imp_last_error());
  abort();
}

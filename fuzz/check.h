/*
 * check.h - the fuzz targets' one assertion.  A broken promise prints
 * where and what, with imp's last error message, and aborts, which
 * libFuzzer (and the replay driver's test) reports as a crash.
 */
#ifndef IMP_FUZZ_CHECK_H
#define IMP_FUZZ_CHECK_H

/** Abort with a message unless cond holds. */
#define FUZZ_CHECK(cond, what)                                                 \
  do {                                                                         \
    if (!(cond))                                                               \
      fuzz_die(__FILE__, __LINE__, what);                                      \
  } while (0)

/** Print where and what, then abort. */
void fuzz_die(const char *file, int line, const char *what);

#endif /* IMP_FUZZ_CHECK_H */

/*
 * failalloc.h - allocation-failure injection for the test that links it.
 *
 * failalloc.c replaces malloc, calloc, realloc and free for the whole
 * process (glibc allows it, and the __libc_* entry points do the work), so
 * the allocations of GSL, SUNDIALS and OpenBLAS are counted and failed as
 * well as imp's own.  Not for sanitizer builds, which replace malloc too.
 */
#ifndef IMP_TESTS_FAILALLOC_H
#define IMP_TESTS_FAILALLOC_H

/* Count allocations from now on; the one numbered fail_at (0-based) and
 * every later one fail. */
void failalloc_arm(long fail_at);

/* Never fail allocations made directly by code in a shared object whose
 * path contains name (NULL: none).  GSL 2.7's own out-of-memory paths in
 * gsl_multiroot_fsolver_alloc free an invalid pointer and abort (seen with
 * hybrids on Debian 12), which no caller can defend against. */
void failalloc_exempt(const char *name);

/* Stop counting.  *made gets the allocations attempted while armed, *live
 * those made while armed and not freed since. */
void failalloc_disarm(long *made, long *live);

#endif /* IMP_TESTS_FAILALLOC_H */

/*
 * core/lapack.h - the Fortran LAPACK routines imp calls, as OpenBLAS
 * exports them.  Debian's libopenblas-dev ships no lapacke.h, so they are
 * declared here.  Character arguments carry their hidden length (size_t
 * with gfortran) at the end.  Matrices are column-major: a row-major
 * buffer passed as is reads as its transpose.
 */
#ifndef IMP_CORE_LAPACK_H
#define IMP_CORE_LAPACK_H

#include <stddef.h>

void dgetrf_(const int *m, const int *n, double *a, const int *lda, int *ipiv,
             int *info);
void dgetrs_(const char *trans, const int *n, const int *nrhs, const double *a,
             const int *lda, const int *ipiv, double *b, const int *ldb,
             int *info, size_t trans_len);
void dgecon_(const char *norm, const int *n, const double *a, const int *lda,
             const double *anorm, double *rcond, double *work, int *iwork,
             int *info, size_t norm_len);
double dlange_(const char *norm, const int *m, const int *n, const double *a,
               const int *lda, double *work, size_t norm_len);
void dgesvd_(const char *jobu, const char *jobvt, const int *m, const int *n,
             double *a, const int *lda, double *s, double *u, const int *ldu,
             double *vt, const int *ldvt, double *work, const int *lwork,
             int *info, size_t jobu_len, size_t jobvt_len);
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda,
             int *info, size_t uplo_len);
void dpotrs_(const char *uplo, const int *n, const int *nrhs, const double *a,
             const int *lda, double *b, const int *ldb, int *info,
             size_t uplo_len);
void dsytrf_(const char *uplo, const int *n, double *a, const int *lda,
             int *ipiv, double *work, const int *lwork, int *info,
             size_t uplo_len);
void dsytrs_(const char *uplo, const int *n, const int *nrhs, const double *a,
             const int *lda, const int *ipiv, double *b, const int *ldb,
             int *info, size_t uplo_len);
void dsyev_(const char *jobz, const char *uplo, const int *n, double *a,
            const int *lda, double *w, double *work, const int *lwork,
            int *info, size_t jobz_len, size_t uplo_len);

#endif /* IMP_CORE_LAPACK_H */

/*
 * root/solvers.c - the table of GSL multiroot solvers: names, families
 * and GSL types.  Every solver a root layer can use is listed here.
 */
#include <stdio.h>
#include <string.h>

#include <gsl/gsl_multiroots.h>

#include "core/internal.h"
#include "root/internal.h"

/* A solver: its GSL name and, for exactly one family, its GSL type.  GSL
 * exports the types as pointer variables, so the table holds their
 * addresses. */
typedef struct solver_entry {
  const char *name;
  const gsl_multiroot_fsolver_type *const *fsolver;
  const gsl_multiroot_fdfsolver_type *const *fdfsolver;
} solver_entry;

static const solver_entry solvers[IMP_ROOT_NSOLVERS] = {
    [IMP_ROOT_HYBRIDS] = {"hybrids", &gsl_multiroot_fsolver_hybrids, NULL},
    [IMP_ROOT_HYBRID] = {"hybrid", &gsl_multiroot_fsolver_hybrid, NULL},
    [IMP_ROOT_DNEWTON] = {"dnewton", &gsl_multiroot_fsolver_dnewton, NULL},
    [IMP_ROOT_BROYDEN] = {"broyden", &gsl_multiroot_fsolver_broyden, NULL},
    [IMP_ROOT_HYBRIDSJ] = {"hybridsj", NULL, &gsl_multiroot_fdfsolver_hybridsj},
    [IMP_ROOT_HYBRIDJ] = {"hybridj", NULL, &gsl_multiroot_fdfsolver_hybridj},
    [IMP_ROOT_NEWTON] = {"newton", NULL, &gsl_multiroot_fdfsolver_newton},
    [IMP_ROOT_GNEWTON] = {"gnewton", NULL, &gsl_multiroot_fdfsolver_gnewton},
};

static int known(imp_root_solver s)
{
  return (unsigned)s < (unsigned)IMP_ROOT_NSOLVERS;
}

const char *imp_root_solver_name(imp_root_solver solver)
{
  return known(solver) ? solvers[solver].name : "unknown";
}

int imp_root_solver_lookup(const char *name, imp_root_solver *solver)
{
  char list[128] = "";

  if (name == NULL || solver == NULL)
    return imp__fail(IMP_EINVAL, "root_solver_lookup: NULL argument");
  for (int s = 0; s < IMP_ROOT_NSOLVERS; s++)
    if (strcmp(name, solvers[s].name) == 0) {
      *solver = (imp_root_solver)s;
      return IMP_OK;
    }

  /* Name the known solvers in the message. */
  for (int s = 0; s < IMP_ROOT_NSOLVERS; s++) {
    size_t used = strlen(list);

    snprintf(list + used, sizeof list - used, "%s%s", s > 0 ? ", " : "",
             solvers[s].name);
  }
  return imp__fail(IMP_EINVAL,
                   "root: unknown solver \"%.40s\"; the solvers "
                   "are %s",
                   name, list);
}

int imp_root_solver_needs_jacobian(imp_root_solver solver)
{
  return known(solver) && solvers[solver].fdfsolver != NULL;
}

const gsl_multiroot_fsolver_type *imp__root_fsolver_type(imp_root_solver s)
{
  return known(s) && solvers[s].fsolver != NULL ? *solvers[s].fsolver : NULL;
}

const gsl_multiroot_fdfsolver_type *imp__root_fdfsolver_type(imp_root_solver s)
{
  return known(s) && solvers[s].fdfsolver != NULL ? *solvers[s].fdfsolver
                                                  : NULL;
}

/*
 * examples/opt.c - the QP layer (imp/qp.h) in two demos.
 *
 * 1. Projection onto the probability simplex as a layer:
 *
 *        z*(x) = argmin 1/2 |z - x|^2  subject to  1^T z = 1,  z >= 0,
 *
 *    that is Q = I, p = -x (the input), A = 1^T, b = 1, G = -I, h = 0.
 *    The layer's output is compared with the exact projection by sorting
 *    (z = max(x - tau, 0)), its Jacobian with the exact one (on the
 *    support S: I - 1 1^T / |S|, zero elsewhere), and its gradient with
 *    finite differences.
 *
 * 2. Learning the rules of 4x4 Sudoku from examples, as in OptNet (Amos
 *    and Kolter, 2017, section 5.2).  A board is 16 cells of one-hot
 *    digits, 64 numbers.  The layer solves
 *
 *        z*(x) = argmin 1/2 eps |z|^2 - x^T z  subject to  A z = b,  z >= 0
 *
 *    with x the puzzle's one-hot clues (zero on blank cells), eps = 0.1,
 *    and A (40 x 64, the rank of Sudoku's constraint matrix) learned from
 *    puzzle-solution pairs by Adam on the squared error |z* - solution|^2,
 *    its learning rate annealed by a cosine.
 *    As in OptNet, b = A z0 with z0 = exp(w) > 0 learned too, so that the
 *    feasible set is never empty.  The layer takes p = -x and b from its
 *    input, A as its parameter, and Q, G, h fixed; the demo carries the
 *    gradient of b back to A and w.  A test puzzle counts as solved when
 *    the largest entry of every cell of z* is its solution's digit.
 *
 *    Puzzles come from the demo's own generator: a random full grid by
 *    backtracking, then clues removed in random order while a backtracking
 *    counter still finds exactly one solution.
 *
 * Usage: imp-opt-demo [--train N] [--full] [--epochs E] [--batch B]
 *                     [--lr A] [--seed S]
 * The defaults (1000 training pairs, 20 epochs of batches of 50, Adam
 * with lr 0.1 annealed to 0.001, seed 1) take about 35 s of CPU on this
 * project's 2-core machine and solve 99% of the 1000 test puzzles;
 * --full trains on OptNet's 9000 pairs (with --epochs 10: about three
 * minutes, 100%).  Progress goes to stderr, results to stdout.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imp.h"
#include "imp/qp.h"

#define CELLS 16
#define DIGITS 4
#define NZ (CELLS * DIGITS)
#define NEQ 40
#define NTEST 1000

static double seconds(void)
{
  struct timespec t;

  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- 1. The simplex projection ---------------------------------------- */

static int descending(const void *a, const void *b)
{
  double u = *(const double *)a, v = *(const double *)b;

  return (u < v) - (u > v);
}

/* The exact projection: tau from the sorted x, z = max(x - tau, 0). */
static void project_by_sort(size_t n, const double *x, double *z)
{
  double *u = malloc(n * sizeof(double)), sum = 0.0, tau = 0.0;

  memcpy(u, x, n * sizeof(double));
  qsort(u, n, sizeof(double), descending);
  for (size_t k = 0; k < n; k++) {
    sum += u[k];
    if (u[k] - (sum - 1.0) / (double)(k + 1) > 0.0)
      tau = (sum - 1.0) / (double)(k + 1);
  }
  for (size_t j = 0; j < n; j++)
    z[j] = fmax(x[j] - tau, 0.0);
  free(u);
}

/* L(x) = c^T z*(x) through the layer, for the gradient check. */
typedef struct simplex_loss {
  imp_layer *layer;
  imp_shape in;
  double *p, *z;
  const double *c;
  size_t n;
} simplex_loss;

static int simplex_objective(void *ctx, const double *x, double *value)
{
  simplex_loss *s = ctx;
  size_t total = s->in.n * s->n;
  int rc;

  for (size_t i = 0; i < total; i++)
    s->p[i] = -x[i];
  rc = imp_layer_forward(s->layer, &s->in, s->p, s->z);
  if (rc != IMP_OK)
    return rc;
  *value = 0.0;
  for (size_t i = 0; i < total; i++)
    *value += s->c[i] * s->z[i];
  return 0;
}

static int simplex_demo(uint64_t seed)
{
  enum { B = 8, N = 10 };
  double Q[N * N] = {0}, ones[N], one[1] = {1.0}, G[N * N] = {0}, h[N] = {0};
  double x[B * N], p[B * N], z[B * N], exact[B * N], c[B * N];
  double pbar[B * N] = {0}, xbar[B * N], err = 0.0, jac_err = 0.0;
  imp_qp_layer_config cfg = {.dims = {.nz = N, .nineq = N, .neq = 1}};
  imp_shape in = {.n = B, .c = N, .h = 1, .w = 1};
  imp_layer *layer = NULL;
  imp_gradcheck_result gc;
  imp_rng rng;
  int rc;

  /* The layer: p = -x from the input, everything else fixed. */
  for (size_t j = 0; j < N; j++) {
    Q[j * N + j] = 1.0;
    G[j * N + j] = -1.0;
    ones[j] = 1.0;
  }
  cfg.input = IMP_QP_P;
  cfg.values = (imp_qp_data){.Q = Q, .A = ones, .b = one, .G = G, .h = h};
  cfg.options.tol = 1e-14;
  rc = imp_qp_layer_create(&cfg, "simplex", &layer);
  if (rc != IMP_OK)
    return rc;

  /* Forward against the sort-based projection. */
  imp_rng_seed(&rng, seed);
  imp_rng_fill_normal(&rng, x, B * N, 0.0, 1.0);
  imp_rng_fill_normal(&rng, c, B * N, 0.0, 1.0);
  for (size_t i = 0; i < B * N; i++)
    p[i] = -x[i];
  rc = imp_layer_forward(layer, &in, p, z);
  for (size_t k = 0; rc == IMP_OK && k < B; k++) {
    project_by_sort(N, x + k * N, exact + k * N);
    for (size_t j = 0; j < N; j++)
      err = fmax(err, fabs(z[k * N + j] - exact[k * N + j]));
  }

  /* Backward: xbar = -pbar; against the exact Jacobian and differences. */
  if (rc == IMP_OK)
    rc = imp_layer_backward(layer, pbar, c, &in, p, z);
  for (size_t k = 0; rc == IMP_OK && k < B; k++) {
    const double *e = exact + k * N, *ck = c + k * N;
    double support = 0.0, csum = 0.0;

    for (size_t j = 0; j < N; j++) {
      support += e[j] > 0.0;
      csum += e[j] > 0.0 ? ck[j] : 0.0;
    }
    for (size_t j = 0; j < N; j++) {
      double g = e[j] > 0.0 ? ck[j] - csum / support : 0.0;

      xbar[k * N + j] = -pbar[k * N + j];
      jac_err = fmax(jac_err, fabs(xbar[k * N + j] - g));
    }
  }
  if (rc == IMP_OK) {
    simplex_loss s = {.layer = layer, .in = in, .p = p, .z = z, .c = c, .n = N};

    /* Off the support the gradient is 0 and the interior point leaves
     * about 1e-9 there: entries below 1e-6 compare absolutely. */
    imp_gradcheck_options go = {.floor = 1e-6};

    rc = imp_gradcheck(simplex_objective, &s, x, B * N, xbar, &go, &gc);
  }
  if (rc != IMP_OK) {
    fprintf(stderr, "simplex demo: %s\n", imp_last_error());
    imp_layer_free(layer);
    return rc;
  }

  printf("1. projection onto the simplex, %d points in R^%d\n", B, N);
  printf("   max |z_layer - z_sort|          %.2e\n", err);
  printf("   max |xbar - exact J^T c|        %.2e\n", jac_err);
  printf("   gradient check (4th order)      max rel err %.2e "
         "(floor 1e-6)\n",
         gc.max_rel_err);
  imp_layer_free(layer);
  return IMP_OK;
}

/* ---- 2. Sudoku -------------------------------------------------------- */

/* A board: cell r * 4 + c holds a digit 1..4, or 0 for blank. */
typedef struct board {
  unsigned char cell[CELLS];
} board;

static int allowed(const board *b, int i, int d)
{
  int r = i / 4, c = i % 4, br = r / 2 * 2, bc = c / 2 * 2;

  for (int k = 0; k < 4; k++)
    if (b->cell[r * 4 + k] == d || b->cell[k * 4 + c] == d)
      return 0;
  for (int u = br; u < br + 2; u++)
    for (int v = bc; v < bc + 2; v++)
      if (b->cell[u * 4 + v] == d)
        return 0;
  return 1;
}

/* The number of solutions, counting no further than limit. */
static int count_solutions(board *b, int limit)
{
  int i = 0, count = 0;

  while (i < CELLS && b->cell[i] != 0)
    i++;
  if (i == CELLS)
    return 1;
  for (int d = 1; d <= DIGITS && count < limit; d++)
    if (allowed(b, i, d)) {
      b->cell[i] = (unsigned char)d;
      count += count_solutions(b, limit - count);
      b->cell[i] = 0;
    }
  return count;
}

/* Fill the blanks from cell i on, trying digits in a random order. */
static int fill_random(board *b, int i, imp_rng *rng)
{
  size_t order[DIGITS] = {1, 2, 3, 4};

  if (i == CELLS)
    return 1;
  imp_rng_shuffle(rng, order, DIGITS);
  for (int k = 0; k < DIGITS; k++)
    if (allowed(b, i, (int)order[k])) {
      b->cell[i] = (unsigned char)order[k];
      if (fill_random(b, i + 1, rng))
        return 1;
      b->cell[i] = 0;
    }
  return 0;
}

/* A puzzle with a unique solution: up to `blanks` clues removed. */
static void make_puzzle(imp_rng *rng, int blanks, board *puzzle,
                        board *solution)
{
  size_t order[CELLS];
  int removed = 0;

  memset(solution, 0, sizeof *solution);
  fill_random(solution, 0, rng);
  *puzzle = *solution;
  for (size_t i = 0; i < CELLS; i++)
    order[i] = i;
  imp_rng_shuffle(rng, order, CELLS);
  for (size_t k = 0; k < CELLS && removed < blanks; k++) {
    unsigned char keep = puzzle->cell[order[k]];

    puzzle->cell[order[k]] = 0;
    if (count_solutions(puzzle, 2) == 1)
      removed++;
    else
      puzzle->cell[order[k]] = keep;
  }
}

static void one_hot(const board *b, double *x)
{
  memset(x, 0, NZ * sizeof(double));
  for (int i = 0; i < CELLS; i++)
    if (b->cell[i] != 0)
      x[i * DIGITS + b->cell[i] - 1] = 1.0;
}

/* 1 if the largest entry of every cell of z is the solution's digit. */
static int solved(const double *z, const board *solution)
{
  for (int i = 0; i < CELLS; i++) {
    int best = 0;

    for (int d = 1; d < DIGITS; d++)
      if (z[i * DIGITS + d] > z[i * DIGITS + best])
        best = d;
    if (best + 1 != solution->cell[i])
      return 0;
  }
  return 1;
}

static uint64_t board_key(const board *b)
{
  uint64_t key = 0;

  for (int i = 0; i < CELLS; i++)
    key = key * 5 + b->cell[i];
  return key;
}

static int compare_keys(const void *a, const void *b)
{
  uint64_t u = *(const uint64_t *)a, v = *(const uint64_t *)b;

  return (u > v) - (u < v);
}

/* How many test puzzles also occur among the training puzzles. */
static size_t overlap(const board *train, size_t ntrain, const board *test,
                      size_t ntest)
{
  uint64_t *keys = malloc(ntrain * sizeof(uint64_t));
  size_t count = 0;

  for (size_t i = 0; i < ntrain; i++)
    keys[i] = board_key(&train[i]);
  qsort(keys, ntrain, sizeof(uint64_t), compare_keys);
  for (size_t i = 0; i < ntest; i++) {
    uint64_t key = board_key(&test[i]);

    count += bsearch(&key, keys, ntrain, sizeof key, compare_keys) != NULL;
  }
  free(keys);
  return count;
}

/* The model: the QP layer's A, then w = log z0, in one flat buffer. */
typedef struct sudoku_model {
  imp_layer *layer;
  double *params, *grads; /* NEQ * NZ + NZ */
  size_t nparams;
  double *x; /* batch x (NZ + NEQ): the layer's input */
  double *z, *zbar, *xbar;
} sudoku_model;

/* x_k = (-puzzle_k, b) with b = A exp(w). */
static void make_input(sudoku_model *m, const board *puzzles, size_t n)
{
  const double *A = m->params, *w = m->params + NEQ * NZ;
  double b[NEQ];

  for (size_t i = 0; i < NEQ; i++) {
    b[i] = 0.0;
    for (size_t j = 0; j < NZ; j++)
      b[i] += A[i * NZ + j] * exp(w[j]);
  }
  for (size_t k = 0; k < n; k++) {
    double *xk = m->x + k * (NZ + NEQ);

    one_hot(&puzzles[k], xk);
    for (size_t j = 0; j < NZ; j++)
      xk[j] = -xk[j];
    memcpy(xk + NZ, b, sizeof b);
  }
}

/* One step of Adam on a batch; returns the batch's mean squared error per
 * entry, or a negative status. */
static int train_step(sudoku_model *m, imp_optim *adam, const board *puzzles,
                      const board *solutions, size_t n, double *loss)
{
  imp_shape in = {.n = n, .c = NZ + NEQ, .h = 1, .w = 1};
  double *A_grad = m->grads, *w_grad = m->grads + NEQ * NZ, sol[NZ];
  const double *A = m->params, *w = m->params + NEQ * NZ;
  double bbar[NEQ] = {0};
  int rc;

  /* Forward and the loss's cotangent. */
  make_input(m, puzzles, n);
  rc = imp_layer_forward(m->layer, &in, m->x, m->z);
  if (rc != IMP_OK)
    return rc;
  *loss = 0.0;
  for (size_t k = 0; k < n; k++) {
    one_hot(&solutions[k], sol);
    for (size_t j = 0; j < NZ; j++) {
      double e = m->z[k * NZ + j] - sol[j];

      *loss += e * e / (double)(n * NZ);
      m->zbar[k * NZ + j] = 2.0 * e / (double)(n * NZ);
    }
  }

  /* Backward into A (the layer's gradient) and into b, then b = A z0. */
  memset(m->grads, 0, m->nparams * sizeof(double));
  memset(m->xbar, 0, n * (NZ + NEQ) * sizeof(double));
  rc = imp_layer_backward(m->layer, m->xbar, m->zbar, &in, m->x, m->z);
  if (rc != IMP_OK)
    return rc;
  for (size_t k = 0; k < n; k++)
    for (size_t i = 0; i < NEQ; i++)
      bbar[i] += m->xbar[k * (NZ + NEQ) + NZ + i];
  for (size_t i = 0; i < NEQ; i++)
    for (size_t j = 0; j < NZ; j++) {
      double z0 = exp(w[j]);

      A_grad[i * NZ + j] += bbar[i] * z0;
      w_grad[j] += bbar[i] * A[i * NZ + j] * z0;
    }
  return imp_optim_step(adam, m->params, m->grads, m->nparams);
}

/* The fraction of puzzles solved exactly. */
static int evaluate(sudoku_model *m, const board *puzzles,
                    const board *solutions, size_t n, size_t batch,
                    double *fraction)
{
  size_t good = 0;

  for (size_t k0 = 0; k0 < n; k0 += batch) {
    size_t nb = n - k0 < batch ? n - k0 : batch;
    imp_shape in = {.n = nb, .c = NZ + NEQ, .h = 1, .w = 1};
    int rc;

    make_input(m, puzzles + k0, nb);
    rc = imp_layer_forward(m->layer, &in, m->x, m->z);
    if (rc != IMP_OK)
      return rc;
    for (size_t k = 0; k < nb; k++)
      good += solved(m->z + k * NZ, &solutions[k0 + k]);
  }
  *fraction = (double)good / (double)n;
  return IMP_OK;
}

typedef struct sudoku_options {
  size_t ntrain, epochs, batch;
  double lr;
  uint64_t seed;
} sudoku_options;

static int sudoku_demo(const sudoku_options *o)
{
  size_t total = o->ntrain + NTEST, steps = 0, failed = 0;
  board *puzzles = malloc(total * sizeof(board));
  board *solutions = malloc(total * sizeof(board));
  double Q[NZ * NZ] = {0}, G[NZ * NZ] = {0}, h[NZ] = {0}, t0, before, after;
  imp_qp_layer_config cfg = {.dims = {.nz = NZ, .nineq = NZ, .neq = NEQ}};
  imp_optim_options ao = imp_optim_defaults();
  sudoku_model m = {0};
  imp_optim *adam = NULL;
  imp_schedule schedule = {0};
  imp_rng rng;
  double clues = 0.0;
  int rc = IMP_OK;

  /* The puzzles, each checked once more by the counter. */
  imp_rng_seed(&rng, o->seed);
  for (size_t k = 0; k < total; k++) {
    make_puzzle(&rng, 6 + (int)imp_rng_below(&rng, 5), &puzzles[k],
                &solutions[k]);
    if (count_solutions(&puzzles[k], 2) != 1) {
      fprintf(stderr, "sudoku: puzzle %zu is not unique\n", k);
      rc = IMP_EINVAL;
    }
    for (int i = 0; i < CELLS; i++)
      clues += puzzles[k].cell[i] != 0;
  }

  /* The layer: Q = eps I, G = -I, h = 0 fixed; p and b from the input. */
  for (size_t j = 0; j < NZ; j++) {
    Q[j * NZ + j] = 0.1;
    G[j * NZ + j] = -1.0;
  }
  cfg.learned = IMP_QP_A;
  cfg.input = IMP_QP_P | IMP_QP_B;
  cfg.values = (imp_qp_data){.Q = Q, .G = G, .h = h};
  cfg.options.tol = 1e-8;
  if (rc == IMP_OK)
    rc = imp_qp_layer_create(&cfg, "sudoku", &m.layer);

  /* A uniform on [0, 1) and z0 = 1 as in OptNet; one flat buffer. */
  m.nparams = NEQ * NZ + NZ;
  m.params = calloc(m.nparams, sizeof(double));
  m.grads = calloc(m.nparams, sizeof(double));
  m.x = calloc(o->batch * (NZ + NEQ), sizeof(double));
  m.xbar = calloc(o->batch * (NZ + NEQ), sizeof(double));
  m.z = calloc(o->batch * NZ, sizeof(double));
  m.zbar = calloc(o->batch * NZ, sizeof(double));
  if (rc == IMP_OK)
    rc = imp_layer_bind_storage(m.layer, m.params, m.grads);
  ao.lr = o->lr;
  if (rc == IMP_OK)
    rc = imp_optim_create(imp_optim_adam, m.nparams, &ao, &adam);
  if (rc == IMP_OK)
    imp_rng_fill_uniform(&rng, m.params, NEQ * NZ, 0.0, 1.0);

  printf("2. 4x4 Sudoku: learning A (%d x %d) of a QP layer, as in OptNet\n",
         NEQ, NZ);
  printf("   %zu training and %d test puzzles, %.1f clues on average; "
         "%zu test puzzles also occur in training\n",
         o->ntrain, NTEST, clues / (double)total,
         overlap(puzzles, o->ntrain, puzzles + o->ntrain, NTEST));
  if (rc == IMP_OK)
    rc = evaluate(&m, puzzles + o->ntrain, solutions + o->ntrain, NTEST,
                  o->batch, &before);

  /* Training: epochs over the training pairs in a shuffled order, the
   * learning rate annealed by a cosine from lr to lr / 100. */
  schedule.kind = IMP_SCHEDULE_COSINE;
  schedule.lr = o->lr;
  schedule.lr_min = o->lr / 100.0;
  schedule.total = o->epochs * ((o->ntrain + o->batch - 1) / o->batch);
  if (schedule.total == 0)
    schedule.total = 1;
  t0 = seconds();
  for (size_t e = 0; rc == IMP_OK && e < o->epochs; e++) {
    size_t *order = malloc(o->ntrain * sizeof(size_t));
    board *bp = malloc(o->batch * sizeof(board));
    board *bs = malloc(o->batch * sizeof(board));
    double sum = 0.0;
    size_t nb = 0;

    for (size_t i = 0; i < o->ntrain; i++)
      order[i] = i;
    imp_rng_shuffle(&rng, order, o->ntrain);
    for (size_t k0 = 0; k0 < o->ntrain; k0 += o->batch) {
      size_t n = o->ntrain - k0 < o->batch ? o->ntrain - k0 : o->batch;
      double loss, lr;
      int step;

      for (size_t k = 0; k < n; k++) {
        bp[k] = puzzles[order[k0 + k]];
        bs[k] = solutions[order[k0 + k]];
      }
      if (imp_schedule_lr(&schedule, steps, &lr) == IMP_OK)
        imp_optim_set_lr(adam, lr);
      step = train_step(&m, adam, bp, bs, n, &loss);
      steps++;
      if (step != IMP_OK) {
        /* A batch the layer cannot solve is skipped, and counted. */
        fprintf(stderr, "   batch skipped: %s\n", imp_last_error());
        failed++;
        continue;
      }
      sum += loss;
      nb++;
    }
    fprintf(stderr, "   epoch %zu: mean squared error %.5f (%.1f s)\n", e + 1,
            nb > 0 ? sum / (double)nb : NAN, seconds() - t0);
    free(order);
    free(bp);
    free(bs);
  }
  if (rc == IMP_OK)
    rc = evaluate(&m, puzzles + o->ntrain, solutions + o->ntrain, NTEST,
                  o->batch, &after);

  if (rc == IMP_OK) {
    printf("   %zu epochs, %zu Adam steps (lr %g, cosine, batch %zu), %zu "
           "skipped, %.1f s\n",
           o->epochs, steps, o->lr, o->batch, failed, seconds() - t0);
    printf("   test puzzles solved exactly: %.1f%% before training, "
           "%.1f%% after\n",
           100.0 * before, 100.0 * after);
  } else
    fprintf(stderr, "sudoku demo: %s\n", imp_last_error());
  imp_optim_free(adam);
  imp_layer_free(m.layer);
  free(m.params);
  free(m.grads);
  free(m.x);
  free(m.xbar);
  free(m.z);
  free(m.zbar);
  free(puzzles);
  free(solutions);
  return rc;
}

int main(int argc, char **argv)
{
  sudoku_options o = {
      .ntrain = 1000, .epochs = 20, .batch = 50, .lr = 0.1, .seed = 1};
  int rc;

  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

    if (!strcmp(a, "--full")) {
      o.ntrain = 9000;
      continue;
    }
    if (v == NULL) {
      fprintf(stderr,
              "usage: %s [--train N] [--full] [--epochs E] "
              "[--batch B] [--lr A] [--seed S]\n",
              argv[0]);
      return 2;
    }
    if (!strcmp(a, "--train"))
      o.ntrain = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--epochs"))
      o.epochs = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--batch"))
      o.batch = strtoul(v, NULL, 10);
    else if (!strcmp(a, "--lr"))
      o.lr = strtod(v, NULL);
    else if (!strcmp(a, "--seed"))
      o.seed = strtoull(v, NULL, 10);
    else {
      fprintf(stderr, "%s: unknown option %s\n", argv[0], a);
      return 2;
    }
    i++;
  }
  if (o.ntrain == 0 || o.batch == 0) {
    fprintf(stderr, "%s: --train and --batch must be positive\n", argv[0]);
    return 2;
  }

  rc = simplex_demo(o.seed);
  if (rc == IMP_OK)
    rc = sudoku_demo(&o);
  return rc == IMP_OK ? 0 : 1;
}

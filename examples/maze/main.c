/*
 * imp-maze - a DEQ that learns to solve mazes from 9x9 examples and solves
 * larger ones by iterating to its fixed point.
 *
 *   imp-maze generate [--size N] [--count K] [--seed S] [--solution]
 *   imp-maze train    [--out FILE] [--steps N] [--minutes M] ...
 *   imp-maze solve    FILE|- [--model FILE] [--rtol R] [--max-iter N]
 *   imp-maze eval     [--model FILE] [--count K] [--svg DIR] ...
 *
 * The model is in model.h.  The default map (--map mix) is
 * z_r(p) = o(p) max(sum_k A_rk maxnbr(z_k)(p), |V_rS| s(p) + |V_rG| g(p))
 * with A = gamma softmax(W) learned: non-negative rows summing to
 * gamma < 1, so a sup-norm contraction on every maze size.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imp/checkpoint.h"
#include "imp/deq.h"
#include "imp/loss.h"
#include "imp/optim.h"
#include "imp/status.h"
#include "maze.h"
#include "model.h"

#ifndef IMP_MAZE_DEFAULT_MODEL
#define IMP_MAZE_DEFAULT_MODEL "data/maze.ckpt"
#endif

/* Mazes per size in the accuracy-against-iterations curve. */
#define CURVE_SMALL 100
#define CURVE_LARGE 10

/* Seeds of the held-out evaluation mazes: far from the training seed. */
#define EVAL_SEED 0x5eed0000e7a1ULL

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int die(const char *what, int rc)
{
  fprintf(stderr, "imp-maze: %s: %s (%s)\n", what, imp_strerror(rc),
          imp_last_error());
  return 1;
}

/* Common options. */
typedef struct options {
  const char *model, *out, *svg, *file, *backward, *solver, *sizes, *map;
  size_t size, count, count_large, steps, batch, max_iter, log_every;
  size_t ckpt_every, train_iter, channels, hidden, count_random;
  size_t count_random_large, jobs;
  double minutes, lr, rtol, rtol_random, gamma;
  uint64_t seed;
  int solution, fresh, sources;
} options;

static void defaults(options *o)
{
  memset(o, 0, sizeof *o);
  o->model = IMP_MAZE_DEFAULT_MODEL;
  o->out = "maze-train.ckpt";
  o->backward = "phantom";
  o->solver = "picard";
  o->map = "mix";
  o->sizes = "9,13,33,59,201";
  o->size = 9;
  o->count = 1;
  o->count_large = 200;
  o->count_random = 100;
  o->count_random_large = 20;
  o->steps = 2000;
  o->batch = 32;
  o->max_iter = 100000;
  o->train_iter = 300;
  o->log_every = 20;
  o->ckpt_every = 100;
  o->minutes = 30.0;
  o->lr = 3e-3;
  o->rtol = 1e-8;
  o->rtol_random = 1e-13;
  o->seed = 1;
}

static int parse_options(int argc, char **argv, options *o, int want_file)
{
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v != NULL && ++i)
    if (strcmp(a, "--solution") == 0)
      o->solution = 1;
    else if (strcmp(a, "--sources-only") == 0)
      o->sources = 1;
    else if (strcmp(a, "--fresh") == 0)
      o->fresh = 1;
    else if (OPT("--size"))
      o->size = strtoul(v, NULL, 10);
    else if (OPT("--count"))
      o->count = strtoul(v, NULL, 10);
    else if (OPT("--count-random"))
      o->count_random = strtoul(v, NULL, 10);
    else if (OPT("--count-random-large"))
      o->count_random_large = strtoul(v, NULL, 10);
    else if (OPT("--jobs"))
      o->jobs = strtoul(v, NULL, 10);
    else if (OPT("--count-large"))
      o->count_large = strtoul(v, NULL, 10);
    else if (OPT("--seed"))
      o->seed = strtoull(v, NULL, 10);
    else if (OPT("--model"))
      o->model = v;
    else if (OPT("--out"))
      o->out = v;
    else if (OPT("--svg"))
      o->svg = v;
    else if (OPT("--sizes"))
      o->sizes = v;
    else if (OPT("--steps"))
      o->steps = strtoul(v, NULL, 10);
    else if (OPT("--batch"))
      o->batch = strtoul(v, NULL, 10);
    else if (OPT("--minutes"))
      o->minutes = strtod(v, NULL);
    else if (OPT("--lr"))
      o->lr = strtod(v, NULL);
    else if (OPT("--rtol"))
      o->rtol = strtod(v, NULL);
    else if (OPT("--rtol-random"))
      o->rtol_random = strtod(v, NULL);
    else if (OPT("--map"))
      o->map = v;
    else if (OPT("--max-iter"))
      o->max_iter = strtoul(v, NULL, 10);
    else if (OPT("--train-iter"))
      o->train_iter = strtoul(v, NULL, 10);
    else if (OPT("--log-every"))
      o->log_every = strtoul(v, NULL, 10);
    else if (OPT("--ckpt-every"))
      o->ckpt_every = strtoul(v, NULL, 10);
    else if (OPT("--backward"))
      o->backward = v;
    else if (OPT("--solver"))
      o->solver = v;
    else if (OPT("--channels"))
      o->channels = strtoul(v, NULL, 10);
    else if (OPT("--hidden"))
      o->hidden = strtoul(v, NULL, 10);
    else if (OPT("--gamma"))
      o->gamma = strtod(v, NULL);
    else if (want_file && o->file == NULL && (a[0] != '-' || a[1] == '\0'))
      o->file = a;
    else {
      fprintf(stderr, "imp-maze: unknown or incomplete option '%s'\n", a);
      return -1;
    }
#undef OPT
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* Model set-up                                                         */
/* ------------------------------------------------------------------ */

static int make_model(const options *o, int given, maze_model **model)
{
  imp_deq_options dq = {0};
  maze_model_config cfg = {.channels = o->channels,
                           .hidden = o->hidden,
                           .gamma = o->gamma,
                           .sources_only = o->sources};

  if (strcmp(o->map, "mix") == 0)
    cfg.kind = MAZE_MAP_MIX;
  else if (strcmp(o->map, "flood") == 0)
    cfg.kind = MAZE_MAP_FLOOD;
  else if (strcmp(o->map, "relu") == 0)
    cfg.kind = MAZE_MAP_RELU;
  else {
    fprintf(stderr, "imp-maze: unknown map '%s' (mix, flood or relu)\n",
            o->map);
    return IMP_EINVAL;
  }

  dq.solver = imp_fp_type_by_name(o->solver);
  if (dq.solver == NULL) {
    fprintf(stderr, "imp-maze: unknown solver '%s'\n", o->solver);
    return IMP_EINVAL;
  }
  dq.fp.memory = 8;
  dq.train.max_iter = o->train_iter;
  dq.train.rtol = 1e-4;
  dq.adjoint.max_iter = 3 * o->train_iter;
  dq.eval.max_iter = o->max_iter;
  dq.eval.rtol = o->rtol;
  dq.noconv_ok = 1;
  dq.init = given ? IMP_DEQ_INIT_GIVEN : IMP_DEQ_INIT_ZERO;
  if (strcmp(o->backward, "implicit") == 0)
    dq.backward = IMP_DEQ_IMPLICIT;
  else if (strcmp(o->backward, "phantom") == 0) {
    dq.backward = IMP_DEQ_PHANTOM;
    dq.phantom_steps = 20;
    dq.phantom_damping = 1.0;
  } else if (strcmp(o->backward, "unrolled") == 0) {
    dq.backward = IMP_DEQ_UNROLLED;
    dq.unroll_steps = 60;
  } else {
    fprintf(stderr, "imp-maze: unknown backward mode '%s'\n", o->backward);
    return IMP_EINVAL;
  }
  return maze_model_create(&cfg, 12345, &dq, model);
}

/* Predicted path: open pixels whose path logit beats the other. */
static void decode(const maze *m, const double *logits, unsigned char *path)
{
  size_t hw = m->h * m->w;
  for (size_t p = 0; p < hw; p++)
    path[p] = m->px[p] != MAZE_WALL && logits[hw + p] > logits[p];
}

static int exact(const maze *m, const unsigned char *path)
{
  for (size_t p = 0; p < m->h * m->w; p++)
    if ((path[p] != 0) != (m->path[p] != 0))
      return 0;
  return 1;
}

/* Solve one maze at evaluation budget; path gets the prediction. */
static int solve_one(maze_model *model, const maze *m, double *x,
                     unsigned char *path, imp_deq_stats *st)
{
  imp_shape xs = {1, 3, m->h, m->w};
  maze_encode(m, x);
  int rc = maze_model_forward(model, &xs, x, NULL);
  if (rc != IMP_OK)
    return rc;
  decode(m, maze_model_logits(model), path);
  if (st != NULL)
    imp_deq_get_stats(maze_model_deq(model), st);
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* generate                                                             */
/* ------------------------------------------------------------------ */

static int cmd_generate(const options *o)
{
  size_t cells = maze_cells_for_size(o->size);
  imp_rng rng;

  if (cells < 2) {
    fprintf(stderr, "imp-maze: --size must be odd and >= 3 (2k - 1)\n");
    return 1;
  }
  imp_rng_seed(&rng, o->seed);
  for (size_t i = 0; i < o->count; i++) {
    maze m;
    if (maze_generate(cells, &rng, &m) != 0) {
      fprintf(stderr, "imp-maze: cannot generate a maze of size %zu\n",
              o->size);
      return 1;
    }
    if (i > 0)
      putchar('\n');
    maze_write(stdout, &m, o->solution ? m.path : NULL);
    maze_free(&m);
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* train                                                                */
/* ------------------------------------------------------------------ */

static int cmd_train(const options *o)
{
  maze_model *model = NULL;
  imp_optim *adam = NULL;
  imp_progress prog;
  size_t side = 11, hw = side * side, b = o->batch;
  double *x = NULL, *mask = NULL, *grad = NULL;
  int *labels = NULL, rc;
  imp_schedule sched = {.kind = IMP_SCHEDULE_ONE_CYCLE,
                        .lr = o->lr,
                        .lr_start = o->lr / 10,
                        .lr_min = o->lr / 100,
                        .warmup = o->steps / 10,
                        .total = o->steps};
  imp_optim_options ao = imp_optim_defaults();
  maze *batch = NULL;

  rc = make_model(o, 0, &model);
  if (rc != IMP_OK)
    return die("model", rc);
  imp_stack *stack = maze_model_stack(model);
  size_t np = imp_stack_nparams(stack);
  ao.lr = o->lr;
  rc = imp_optim_create(imp_optim_adam, np, &ao, &adam);
  if (rc != IMP_OK)
    return die("optimizer", rc);
  prog.step = 0;
  imp_rng_seed(&prog.rng, o->seed);

  /* Resume from the checkpoint if there is one. */
  FILE *probe = o->fresh ? NULL : fopen(o->out, "rb");
  if (probe != NULL) {
    fclose(probe);
    rc = imp_checkpoint_load(o->out, stack, adam, &prog);
    if (rc != IMP_OK)
      return die(o->out, rc);
    fprintf(stderr, "resuming %s at step %llu\n", o->out,
            (unsigned long long)prog.step);
  }

  x = malloc(b * 3 * hw * sizeof *x);
  mask = malloc(b * hw * sizeof *mask);
  grad = malloc(b * 2 * hw * sizeof *grad);
  labels = malloc(b * hw * sizeof *labels);
  batch = calloc(b, sizeof *batch);
  if (!x || !mask || !grad || !labels || !batch)
    return die("memory", IMP_ENOMEM);
  fprintf(stderr,
          "training %zu parameters, batch %zu, %zu steps, "
          "backward %s, solver %s\n",
          np, b, o->steps, o->backward, o->solver);

  double t0 = now(), tlast = t0, loss_acc = 0.0;
  size_t correct = 0, seen = 0, since = 0, start = (size_t)prog.step;
  size_t skipped = 0;
  while (prog.step < o->steps) {
    imp_shape xs = {b, 3, side, side}, ls = {b, 2, side, side};
    double loss, lr, gnorm;
    unsigned char pred[11 * 11];

    /* A fresh batch of 9x9 mazes from the run's own generator. */
    for (size_t i = 0; i < b; i++) {
      maze_free(&batch[i]);
      if (maze_generate(5, &prog.rng, &batch[i]) != 0)
        return die("generator", IMP_ENOMEM);
      maze_encode(&batch[i], x + i * 3 * hw);
      for (size_t p = 0; p < hw; p++) {
        labels[i * hw + p] = batch[i].path[p];
        mask[i * hw + p] = batch[i].px[p] != MAZE_WALL;
      }
    }

    /* Forward, loss, backward, clip, Adam with a one-cycle rate. */
    imp_stack_zero_grad(stack);
    rc = maze_model_forward(model, &xs, x, NULL);
    if (rc == IMP_OK)
      rc = imp_loss_softmax_xent(&ls, maze_model_logits(model), labels, mask,
                                 &loss, grad);
    if (rc == IMP_OK) {
      rc = maze_model_backward(model, grad);
      if (rc == IMP_ENOCONV) {
        /* An adjoint that has not settled gives no trustworthy gradient:
         * skip this batch, counted on the progress line. */
        skipped++;
        imp_stack_zero_grad(stack);
        rc = IMP_OK;
      }
    }
    if (rc == IMP_OK)
      rc = imp_clip_grad_norm(imp_stack_grads(stack), np, 1.0, &gnorm);
    if (rc == IMP_OK)
      rc = imp_schedule_lr(&sched, prog.step, &lr);
    if (rc == IMP_OK)
      rc = imp_optim_set_lr(adam, lr);
    if (rc == IMP_OK)
      rc = imp_optim_step(adam, imp_stack_params(stack), imp_stack_grads(stack),
                          np);
    if (rc != IMP_OK)
      return die("training step", rc);
    prog.step++;
    since++;
    loss_acc += loss;
    for (size_t i = 0; i < b; i++) {
      decode(&batch[i], maze_model_logits(model) + i * 2 * hw, pred);
      correct += (size_t)exact(&batch[i], pred);
    }
    seen += b;

    double t = now();
    int stop = (t - t0) / 60.0 >= o->minutes;
    if (prog.step % o->log_every == 0 || prog.step == o->steps || stop) {
      imp_deq_stats st;
      imp_deq_get_stats(maze_model_deq(model), &st);
      double rate = (double)seen / (t - tlast);
      double per = (t - t0) / (double)(prog.step - start);
      double left = per * (double)(o->steps - prog.step);
      fprintf(stderr,
              "step %6llu  loss %.4f  acc %.3f  %.0f mazes/s  iter %zu  "
              "res %.1e  adj %zu  skipped %zu  left %.0fm%02.0fs\n",
              (unsigned long long)prog.step, loss_acc / (double)since,
              (double)correct / (double)seen, rate, st.iterations,
              st.rel_residual, st.backward_iterations, skipped,
              floor(left / 60.0), fmod(left, 60.0));
      loss_acc = 0.0;
      since = correct = seen = 0;
      tlast = t;
    }
    if (prog.step % o->ckpt_every == 0 || prog.step == o->steps || stop) {
      rc = imp_checkpoint_save(o->out, stack, adam, &prog);
      if (rc != IMP_OK)
        return die(o->out, rc);
    }
    if (stop) {
      fprintf(stderr, "time limit reached; run again to resume\n");
      break;
    }
  }
  maze_free_all(batch, b);
  free(x);
  free(mask);
  free(grad);
  free(labels);
  imp_optim_free(adam);
  maze_model_free(model);
  return 0;
}

/* Load a model for inference from o->model. */
static int load_model(const options *o, int given, maze_model **model)
{
  int rc = make_model(o, given, model);
  if (rc != IMP_OK)
    return rc;
  rc = imp_checkpoint_load(o->model, maze_model_stack(*model), NULL, NULL);
  if (rc == IMP_EFORMAT && strstr(imp_last_error(), "mismatch") != NULL)
    fprintf(stderr,
            "imp-maze: %s was saved from another architecture; "
            "--map and --channels must match the training run\n",
            o->model);
  if (rc != IMP_OK) {
    maze_model_free(*model);
    *model = NULL;
    return rc;
  }
  imp_layer_set_training(maze_model_deq(*model), 0);
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* solve                                                                */
/* ------------------------------------------------------------------ */

static int cmd_solve(const options *o)
{
  FILE *f = stdin;
  char *text = NULL;
  size_t len = 0, count = 0;
  maze *mazes = NULL;
  maze_error err;
  maze_model *model = NULL;
  int rc, status = 0;

  if (o->file == NULL) {
    fprintf(stderr, "imp-maze solve: give a FILE (or - for stdin)\n");
    return 2;
  }
  if (strcmp(o->file, "-") != 0 && (f = fopen(o->file, "r")) == NULL) {
    perror(o->file);
    return 1;
  }
  rc = maze_read_all(f, &text, &len);
  if (f != stdin)
    fclose(f);
  if (rc != 0) {
    fprintf(stderr, "imp-maze: cannot read %s\n", o->file);
    return 1;
  }
  if (maze_parse(text, len, &mazes, &count, &err) != 0) {
    fprintf(stderr, "%s:%s\n", strcmp(o->file, "-") ? o->file : "<stdin>",
            err.message + 4);
    free(text);
    return 1;
  }
  free(text);
  rc = load_model(o, 0, &model);
  if (rc != IMP_OK)
    return die(o->model, rc);

  for (size_t i = 0; i < count; i++) {
    maze *m = &mazes[i];
    double *x = malloc(3 * m->h * m->w * sizeof *x);
    unsigned char *path = malloc(m->h * m->w);
    imp_deq_stats st;
    if (x == NULL || path == NULL)
      return die("memory", IMP_ENOMEM);
    rc = solve_one(model, m, x, path, &st);
    if (rc != IMP_OK)
      return die("solve", rc);
    if (st.forward_status != IMP_OK) {
      fprintf(stderr,
              "imp-maze: maze %zu did not settle in %zu iterations "
              "(residual %.2e)\n",
              i + 1, st.iterations, st.rel_residual);
      status = 3;
    }
    if (i > 0)
      putchar('\n');
    maze_write(stdout, m, path);
    free(x);
    free(path);
  }
  maze_free_all(mazes, count);
  maze_model_free(model);
  return status;
}

/* ------------------------------------------------------------------ */
/* eval                                                                 */
/* ------------------------------------------------------------------ */

#define NCURVE 40

/* Accuracy after k plain iterations from zero, at k = curve_k[i]. */
typedef struct curve {
  size_t k[NCURVE], nk;
  size_t correct[NCURVE], total;
} curve;

static void curve_init(curve *c, size_t kmax)
{
  memset(c, 0, sizeof *c);
  for (double k = 1; c->nk < NCURVE && (size_t)k <= kmax; k *= 1.35) {
    size_t kk = (size_t)k;
    if (c->nk == 0 || kk > c->k[c->nk - 1])
      c->k[c->nk++] = kk;
  }
}

/* Plain iteration z <- h(z) from zero, reading the path at each k. */
static int curve_add(maze_model *model, const maze *m, const double *x,
                     curve *c)
{
  maze_model_config cfg = maze_model_get_config(model);
  imp_shape xs = {1, 3, m->h, m->w}, zs = {1, cfg.channels, m->h, m->w};
  size_t nz = cfg.channels * m->h * m->w, hw = m->h * m->w, ki = 0;
  double *z = calloc(nz, sizeof *z), *zn = malloc(nz * sizeof *zn);
  double *logits = malloc(2 * hw * sizeof *logits);
  unsigned char *path = malloc(hw);
  imp_layer *head = imp_stack_layer(maze_model_stack(model), 1);
  int rc = IMP_OK;

  if (!z || !zn || !logits || !path)
    rc = IMP_ENOMEM;
  for (size_t k = 1; rc == IMP_OK && ki < c->nk; k++) {
    rc = maze_model_map(model, &xs, x, z, zn);
    memcpy(z, zn, nz * sizeof *z);
    if (rc == IMP_OK && k == c->k[ki]) {
      rc = imp_layer_forward(head, &zs, z, logits);
      decode(m, logits, path);
      c->correct[ki++] += (size_t)exact(m, path);
    }
  }
  c->total++;
  free(z);
  free(zn);
  free(logits);
  free(path);
  return rc;
}

/* Relative residual |h(z) - z|_2 / |h(z)|_2 of the state z. */
static double residual(maze_model *model, const maze *m, const double *x,
                       const double *z)
{
  maze_model_config cfg = maze_model_get_config(model);
  imp_shape xs = {1, 3, m->h, m->w};
  size_t nz = cfg.channels * m->h * m->w;
  double *hz = malloc(nz * sizeof *hz), num = 0.0, den = 0.0;
  if (hz == NULL || maze_model_map(model, &xs, x, z, hz) != IMP_OK) {
    free(hz);
    return NAN;
  }
  for (size_t i = 0; i < nz; i++) {
    num += (hz[i] - z[i]) * (hz[i] - z[i]);
    den += hz[i] * hz[i];
  }
  free(hz);
  return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* One maze drawn as SVG rectangles: walls dark, path blue, missed path
 * red, extra predicted pixels orange; runs of a row merged. */
static void svg_maze(FILE *f, const maze *m, const unsigned char *pred,
                     double ox, double oy, double cell)
{
  for (size_t i = 0; i < m->h; i++) {
    size_t j = 0;
    while (j < m->w) {
      size_t p = i * m->w + j;
      const char *col;
      if (m->px[p] == MAZE_WALL)
        col = "#222";
      else if (m->px[p] == MAZE_START)
        col = "#2a2";
      else if (m->px[p] == MAZE_GOAL)
        col = "#a2a";
      else if (pred[p] && m->path[p])
        col = "#36c";
      else if (m->path[p])
        col = "#e22";
      else if (pred[p])
        col = "#f90";
      else
        col = "#fff";
      size_t r = j + 1;
      while (r < m->w) {
        size_t q = i * m->w + r;
        int same = m->px[q] == m->px[p] && pred[q] == pred[p] &&
                   m->path[q] == m->path[p];
        if (!same || m->px[p] == MAZE_START || m->px[p] == MAZE_GOAL)
          break;
        r++;
      }
      fprintf(f,
              "<rect x='%.2f' y='%.2f' width='%.2f' height='%.2f' "
              "fill='%s'/>\n",
              ox + (double)j * cell, oy + (double)i * cell,
              (double)(r - j) * cell, cell, col);
      j = r;
    }
  }
}

static void svg_curves(const char *dir, const size_t *sizes, size_t ns,
                       const curve *cv)
{
  static const char *colors[] = {"#36c", "#e22", "#2a2", "#a2a",
                                 "#f90", "#099", "#555", "#c60"};
  char path[1024];
  double w = 640, h = 400, l = 60, r = 20, t = 20, b = 50, kmax = 1;
  FILE *f;

  snprintf(path, sizeof path, "%s/maze_accuracy.svg", dir);
  f = fopen(path, "w");
  if (f == NULL)
    return;
  for (size_t s = 0; s < ns; s++)
    if (cv[s].nk > 0 && (double)cv[s].k[cv[s].nk - 1] > kmax)
      kmax = (double)cv[s].k[cv[s].nk - 1];
  fprintf(f,
          "<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' "
          "height='%.0f' font-family='sans-serif' font-size='12'>\n"
          "<rect width='100%%' height='100%%' fill='white'/>\n",
          w, h);
  fprintf(f,
          "<text x='%.0f' y='%.0f' text-anchor='middle'>test-time "
          "iterations (plain z &lt;- h(z) from 0, log scale)</text>\n",
          (l + w - r) / 2, h - 10);
  fprintf(f,
          "<text x='15' y='%.0f' transform='rotate(-90 15 %.0f)' "
          "text-anchor='middle'>exact-match accuracy</text>\n",
          (t + h - b) / 2, (t + h - b) / 2);
  fprintf(f,
          "<rect x='%.0f' y='%.0f' width='%.0f' height='%.0f' "
          "fill='none' stroke='black'/>\n",
          l, t, w - l - r, h - t - b);
  for (int q = 0; q <= 4; q++) {
    double y = h - b - (h - t - b) * q / 4.0;
    fprintf(f, "<text x='%.0f' y='%.0f' text-anchor='end'>%.2f</text>\n", l - 5,
            y + 4, q / 4.0);
  }
  for (double k = 1; k <= kmax; k *= 10) {
    double x = l + (w - l - r) * log(k) / log(kmax);
    fprintf(f, "<text x='%.0f' y='%.0f' text-anchor='middle'>%.0f</text>\n", x,
            h - b + 15, k);
  }
  for (size_t s = 0; s < ns; s++) {
    if (cv[s].total == 0)
      continue;
    fprintf(f,
            "<polyline fill='none' stroke='%s' stroke-width='2' "
            "points='",
            colors[s % 8]);
    for (size_t i = 0; i < cv[s].nk; i++) {
      double x = l + (w - l - r) * log((double)cv[s].k[i]) / log(kmax);
      double y =
          h - b - (h - t - b) * (double)cv[s].correct[i] / (double)cv[s].total;
      fprintf(f, "%.1f,%.1f ", x, y);
    }
    fprintf(f, "'/>\n<text x='%.0f' y='%.0f' fill='%s'>%zux%zu</text>\n",
            l + 10, t + 15 + 15 * (double)s, colors[s % 8], sizes[s], sizes[s]);
  }
  fprintf(f, "</svg>\n");
  fclose(f);
}

/* What one evaluation worker adds up over its share of one size. */
typedef struct eval_sums {
  size_t correct, itmax, same, unsettled;
  double itsum, itsum_r, resmax, zdiff;
  curve cv;
} eval_sums;

/* One worker: its own models (their scratch is not shared), and the
 * size it works on.  Every worker draws every maze and random start, so
 * that its generators stay in step with the serial order, and solves the
 * mazes i with i % jobs == id. */
typedef struct eval_worker {
  const options *o;
  maze_model *model, *model_r;
  size_t id, jobs, size, count, nrandom, ncurve;
  eval_sums sums;
  int rc;
  const char *what;
  pthread_t thread;
} eval_worker;

static int eval_share(eval_worker *ew)
{
  const options *o = ew->o;
  maze_model_config cfg = maze_model_get_config(ew->model);
  size_t cells = maze_cells_for_size(ew->size);
  eval_sums *e = &ew->sums;
  imp_rng rng, init_rng;
  int rc = IMP_OK;

  imp_rng_seed(&rng, EVAL_SEED + ew->size);
  imp_rng_seed(&init_rng, EVAL_SEED + 1000003 * ew->size);
  for (size_t i = 0; i < ew->count && rc == IMP_OK; i++) {
    maze m;
    imp_deq_stats st;
    if (maze_generate(cells, &rng, &m) != 0) {
      ew->what = "generator";
      return IMP_ENOMEM;
    }
    size_t hw = m.h * m.w, nz = cfg.channels * hw;
    double *x = malloc(3 * hw * sizeof *x), *z0 = malloc(nz * sizeof *z0);
    double *zstar = malloc(nz * sizeof *zstar);
    unsigned char *path = malloc(hw), *path2 = malloc(hw);
    imp_shape zs;
    int mine = i % ew->jobs == ew->id;

    if (!x || !z0 || !zstar || !path || !path2) {
      ew->what = "memory";
      rc = IMP_ENOMEM;
    }
    if (rc == IMP_OK && i < ew->nrandom)
      imp_rng_fill_uniform(&init_rng, z0, nz, 0.0, 10.0);

    /* From zero. */
    if (rc == IMP_OK && mine) {
      ew->what = "solve";
      rc = solve_one(ew->model, &m, x, path, &st);
    }
    if (rc == IMP_OK && mine) {
      e->correct += (size_t)exact(&m, path);
      e->itsum += (double)st.iterations;
      if (st.iterations > e->itmax)
        e->itmax = st.iterations;
      memcpy(zstar, maze_model_state(ew->model, &zs), nz * sizeof *zstar);
      double res = residual(ew->model, &m, x, zstar);
      if (!(res <= e->resmax))
        e->resmax = res;
      e->unsettled += st.forward_status != IMP_OK;
    }

    /* From a random state with entries uniform on [0, 10), for the
     * first nrandom mazes: a contraction forgets its start at the rate
     * gamma per iteration, so these solves are the slow ones. */
    if (rc == IMP_OK && mine && i < ew->nrandom) {
      imp_shape z0s = {1, cfg.channels, m.h, m.w};
      imp_deq_stats st2;
      ew->what = "solve from a random state";
      rc = imp_deq_set_initial(maze_model_deq(ew->model_r), &z0s, z0);
      if (rc == IMP_OK)
        rc = solve_one(ew->model_r, &m, x, path2, &st2);
      if (rc == IMP_OK) {
        const double *z2 = maze_model_state(ew->model_r, &zs);
        double zmax = 0.0, dmax = 0.0;
        for (size_t k = 0; k < nz; k++) {
          if (fabs(zstar[k]) > zmax)
            zmax = fabs(zstar[k]);
          if (fabs(zstar[k] - z2[k]) > dmax)
            dmax = fabs(zstar[k] - z2[k]);
        }
        if (zmax > 0 && dmax / zmax > e->zdiff)
          e->zdiff = dmax / zmax;
        e->same += memcmp(path, path2, hw) == 0;
        e->itsum_r += (double)st2.iterations;
        e->unsettled += st2.forward_status != IMP_OK;
      }
    }

    if (rc == IMP_OK && mine && i < ew->ncurve) {
      ew->what = "accuracy curve";
      rc = curve_add(ew->model, &m, x, &e->cv);
    }
    if (rc == IMP_OK && mine && i == 0 && o->svg != NULL) {
      char file[1024];
      FILE *svg;
      snprintf(file, sizeof file, "%s/maze_%zu.svg", o->svg, ew->size);
      svg = fopen(file, "w");
      if (svg != NULL) {
        double cell = 600.0 / (double)m.w;
        fprintf(svg,
                "<svg xmlns='http://www.w3.org/2000/svg' width='620' "
                "height='640' font-family='sans-serif' font-size='12'>\n"
                "<rect width='100%%' height='100%%' fill='white'/>\n"
                "<text x='10' y='15'>%zux%zu: blue predicted path, red "
                "missed, orange extra; %s, %zu iterations</text>\n",
                ew->size, ew->size, exact(&m, path) ? "exact" : "wrong",
                st.iterations);
        svg_maze(svg, &m, path, 10, 30, cell);
        fprintf(svg, "</svg>\n");
        fclose(svg);
      }
    }
    free(x);
    free(z0);
    free(zstar);
    free(path);
    free(path2);
    maze_free(&m);
  }
  return rc;
}

static void *eval_thread(void *arg)
{
  eval_worker *ew = arg;
  ew->rc = eval_share(ew);
  return NULL;
}

static int cmd_eval(const options *o)
{
  size_t sizes[8], ns = 0, jobs = o->jobs > 0 ? o->jobs : 1;
  const char *s = o->sizes;
  eval_worker *ew;
  curve cv[8];
  int rc = IMP_OK;

  while (*s != '\0' && ns < 8) {
    char *end;
    sizes[ns] = strtoul(s, &end, 10);
    if (maze_cells_for_size(sizes[ns]) < 2) {
      fprintf(stderr, "imp-maze: bad size list '%s'\n", o->sizes);
      return 2;
    }
    ns++;
    s = *end == ',' ? end + 1 : end;
    if (end == s && *s != '\0')
      break;
  }
  if (jobs > 64) {
    fprintf(stderr, "imp-maze: --jobs must be between 1 and 64\n");
    return 2;
  }
  ew = calloc(jobs, sizeof *ew);
  if (ew == NULL)
    return die("memory", IMP_ENOMEM);

  /* The random starts stop at the tighter rtol_random: from a start above
   * the fixed point the residual is only (1 - gamma) times the distance
   * left, and at the far end of a large maze a distance of 1e-6 of the
   * largest value is enough to flip a neighbour ratio the head reads. */
  options o_random = *o;
  o_random.rtol = o->rtol_random;
  for (size_t t = 0; t < jobs && rc == IMP_OK; t++) {
    rc = load_model(o, 0, &ew[t].model);
    if (rc == IMP_OK)
      rc = load_model(&o_random, 1, &ew[t].model_r);
  }
  if (rc != IMP_OK) {
    for (size_t t = 0; t < jobs; t++) {
      maze_model_free(ew[t].model);
      maze_model_free(ew[t].model_r);
    }
    free(ew);
    return die(o->model, rc);
  }
  maze_model_config cfg = maze_model_get_config(ew[0].model);

  printf("model %s (%s map): C = %zu, hidden %zu, gamma %g; solver %s, "
         "rtol %g (random starts %g)\n\n",
         o->model, o->map, cfg.channels, cfg.hidden, cfg.gamma, o->solver,
         o->rtol, o->rtol_random);
  printf("| size | mazes | exact | iterations mean / max | max rel. residual "
         "| unsettled | from random: same path / max z diff / iterations "
         "| seconds |\n");
  printf("|---|---|---|---|---|---|---|---|\n");
  fflush(stdout);
  for (size_t si = 0; si < ns && rc == IMP_OK; si++) {
    size_t cells = maze_cells_for_size(sizes[si]);
    size_t count = sizes[si] > 100 ? o->count_large : o->count;
    size_t nrandom = sizes[si] > 100 ? o->count_random_large : o->count_random;
    /* The accuracy curve re-runs plain iterations up to half the pixel
     * count (20 604 at 201x201), so large sizes draw it from fewer mazes. */
    size_t ncurve = sizes[si] > 100 ? CURVE_LARGE : CURVE_SMALL;
    eval_sums tot = {0};
    double t0 = now();

    nrandom = nrandom < count ? nrandom : count;
    ncurve = ncurve < count ? ncurve : count;
    curve_init(&cv[si], (size_t)(2 * cells + 1) * (2 * cells + 1) / 2);
    for (size_t t = 0; t < jobs; t++) {
      eval_worker *w = &ew[t];
      w->o = o;
      w->id = t;
      w->jobs = jobs;
      w->size = sizes[si];
      w->count = count;
      w->nrandom = nrandom;
      w->ncurve = ncurve;
      w->rc = IMP_OK;
      w->what = "";
      memset(&w->sums, 0, sizeof w->sums);
      w->sums.cv = cv[si];
    }
    if (jobs == 1)
      eval_thread(&ew[0]);
    else {
      size_t started = 0;
      for (; started < jobs; started++)
        if (pthread_create(&ew[started].thread, NULL, eval_thread,
                           &ew[started]) != 0)
          break;
      for (size_t t = 0; t < started; t++)
        pthread_join(ew[t].thread, NULL);
      for (size_t t = started; t < jobs; t++) {
        ew[t].rc = IMP_ENOMEM;
        ew[t].what = "starting a thread";
      }
    }

    /* Sums, maxima and counts: the same for any number of jobs. */
    for (size_t t = 0; t < jobs; t++) {
      const eval_sums *e = &ew[t].sums;
      if (ew[t].rc != IMP_OK && rc == IMP_OK) {
        rc = ew[t].rc;
        die(ew[t].what, rc);
      }
      tot.correct += e->correct;
      tot.same += e->same;
      tot.unsettled += e->unsettled;
      tot.itsum += e->itsum;
      tot.itsum_r += e->itsum_r;
      tot.itmax = e->itmax > tot.itmax ? e->itmax : tot.itmax;
      tot.resmax = fmax(tot.resmax, e->resmax);
      tot.zdiff = fmax(tot.zdiff, e->zdiff);
      for (size_t k = 0; k < cv[si].nk; k++)
        cv[si].correct[k] += e->cv.correct[k];
      cv[si].total += e->cv.total;
    }
    if (rc != IMP_OK)
      break;
    printf("| %zux%zu | %zu | %.1f%% | %.0f / %zu | %.1e | %zu | "
           "%zu/%zu / %.1e / %.0f | %.0f |\n",
           sizes[si], sizes[si], count,
           100.0 * (double)tot.correct / (double)count,
           tot.itsum / (double)count, tot.itmax, tot.resmax, tot.unsettled,
           tot.same, nrandom, tot.zdiff,
           nrandom > 0 ? tot.itsum_r / (double)nrandom : 0.0, now() - t0);
    fflush(stdout);
  }

  if (rc == IMP_OK) {
    printf("\naccuracy against plain iterations from zero (first %d mazes, "
           "%d above 100x100):\n",
           CURVE_SMALL, CURVE_LARGE);
    for (size_t si = 0; si < ns; si++) {
      if (cv[si].total == 0)
        continue;
      printf("%zux%zu:", sizes[si], sizes[si]);
      for (size_t i = 0; i < cv[si].nk; i++)
        printf(" %zu:%.2f", cv[si].k[i],
               (double)cv[si].correct[i] / (double)cv[si].total);
      printf("\n");
    }
    if (o->svg != NULL)
      svg_curves(o->svg, sizes, ns, cv);
  }
  for (size_t t = 0; t < jobs; t++) {
    maze_model_free(ew[t].model);
    maze_model_free(ew[t].model_r);
  }
  free(ew);
  return rc == IMP_OK ? 0 : 1;
}

/* ------------------------------------------------------------------ */

static const char *usage =
    "usage: imp-maze COMMAND [options]   (imp-maze COMMAND --help)\n"
    "  generate  print random perfect mazes in the text format\n"
    "  train     train the maze DEQ on 9x9 mazes (resumes a checkpoint)\n"
    "  solve     solve the mazes of FILE (- for stdin), '*' on the path\n"
    "  eval      accuracy, iterations, residuals, path independence\n";

static const char *help_generate =
    "usage: imp-maze generate [--size N] [--count K] [--seed S] "
    "[--solution]\n"
    "  --size N     odd size 2k - 1 of a maze of k x k cells (default 9)\n"
    "  --count K    number of mazes, separated by blank lines (default 1)\n"
    "  --seed S     generator seed (default 1)\n"
    "  --solution   mark the path with '*'\n";

static const char *help_train =
    "usage: imp-maze train [options]\n"
    "  --out FILE        checkpoint, resumed if it exists (maze-train.ckpt)\n"
    "  --fresh           ignore an existing checkpoint\n"
    "  --steps N         Adam steps on batches of 9x9 mazes (2000)\n"
    "  --batch B         mazes per step (32)\n"
    "  --lr A            one-cycle peak learning rate (3e-3)\n"
    "  --minutes M       stop (resumably) after M minutes (30)\n"
    "  --backward MODE   phantom | implicit | unrolled (phantom)\n"
    "  --train-iter N    forward and adjoint budget in training (300)\n"
    "  --seed S          training data seed (1)\n"
    "  --log-every N, --ckpt-every N   progress line, checkpoint period\n"
    "  --map NAME        mix: the flood with learned channel mixing (the\n"
    "                    default); flood: the fixed two-channel flood;\n"
    "                    relu: the first version's relu map\n"
    "  --channels C, --hidden H, --gamma G   architecture (C 4 mix, 2\n"
    "                    flood, 8 relu; H 16; G 0.999)\n"
    "  --sources-only    relu map: no bias or open-channel input\n";

static const char *help_solve =
    "usage: imp-maze solve FILE|- [options]\n"
    "  writes every maze of FILE with '*' on the predicted path\n"
    "  --model FILE      checkpoint (default the shipped one)\n"
    "  --map NAME        the checkpoint's map: mix (default), flood, relu\n"
    "  --rtol R          stop when |h(z) - z| <= R |h(z)| (1e-8)\n"
    "  --max-iter N      iteration budget (100000)\n"
    "  --solver NAME     picard | anderson | broyden (picard)\n";

static const char *help_eval =
    "usage: imp-maze eval [options]\n"
    "  --model FILE      checkpoint (default the shipped one)\n"
    "  --sizes LIST      maze sizes (9,13,33,59,201)\n"
    "  --count K         held-out mazes per size (1000)\n"
    "  --count-large K   mazes for sizes above 100 (200)\n"
    "  --count-random K  of those, solved from a random state too (100)\n"
    "  --count-random-large K   the same for sizes above 100 (20)\n"
    "  --svg DIR         write maze_accuracy.svg and maze_SIZE.svg there\n"
    "  --rtol-random R   residual test of the random starts (1e-13)\n"
    "  --jobs J          solve on J threads (1); the output is the same\n"
    "  --model, --map, --rtol, --max-iter, --solver   as for solve\n";

int main(int argc, char **argv)
{
  options o;
  const char *help;
  int (*cmd)(const options *);

  if (argc < 2 || strcmp(argv[1], "--help") == 0 ||
      strcmp(argv[1], "-h") == 0) {
    fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  defaults(&o);
  if (strcmp(argv[1], "generate") == 0) {
    cmd = cmd_generate;
    help = help_generate;
  } else if (strcmp(argv[1], "train") == 0) {
    cmd = cmd_train;
    help = help_train;
  } else if (strcmp(argv[1], "solve") == 0) {
    cmd = cmd_solve;
    help = help_solve;
  } else if (strcmp(argv[1], "eval") == 0) {
    cmd = cmd_eval;
    help = help_eval;
    o.count = 1000;
  } else {
    fprintf(stderr, "imp-maze: unknown command '%s'\n%s", argv[1], usage);
    return 2;
  }
  for (int i = 2; i < argc; i++)
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(help, stdout);
      return 0;
    }
  if (parse_options(argc - 2, argv + 2, &o, cmd == cmd_solve) != 0) {
    fputs(help, stderr);
    return 2;
  }
  return cmd(&o);
}

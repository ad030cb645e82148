/*
 * test_maze.c - the maze demo's generator, text format and model: perfect
 * mazes with a unique path, deterministic from the seed; reader and writer
 * round trips; every malformed input refused with its line number; the
 * model's maps sup-norm contractions; the flood's fixed point the exact
 * geometric flood; the gradients of both models against finite
 * differences.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "imp/gradcheck.h"
#include "imp/loss.h"
#include "imp/status.h"
#include "../examples/maze/maze.h"
#include "../examples/maze/model.h"

/* Count open pixels and check the open cells form a tree: for a perfect
 * maze of k x k cells there are k^2 - 1 passages. */
START_TEST(test_generate_perfect)
{
  imp_rng rng;
  imp_rng_seed(&rng, 7);
  for (size_t k = 2; k <= 12; k++) {
    maze m;
    ck_assert_int_eq(maze_generate(k, &rng, &m), 0);
    ck_assert_uint_eq(m.h, 2 * k + 1);
    ck_assert_uint_eq(m.w, 2 * k + 1);
    size_t open = 0, starts = 0, goals = 0, border = 0, onpath = 0;
    for (size_t i = 0; i < m.h; i++)
      for (size_t j = 0; j < m.w; j++) {
        unsigned char c = m.px[i * m.w + j];
        open += c != MAZE_WALL;
        starts += c == MAZE_START;
        goals += c == MAZE_GOAL;
        onpath += m.path[i * m.w + j];
        if ((i == 0 || j == 0 || i == m.h - 1 || j == m.w - 1) &&
            c != MAZE_WALL)
          border++;
        if (i % 2 == 1 && j % 2 == 1)
          ck_assert_int_ne(c, MAZE_WALL); /* every cell is open */
        if (i % 2 == 0 && j % 2 == 0)
          ck_assert_int_eq(c, MAZE_WALL); /* corner posts stay */
      }
    /* k^2 cells and k^2 - 1 passages: a spanning tree. */
    ck_assert_uint_eq(open, k * k + k * k - 1);
    ck_assert_uint_eq(starts, 1);
    ck_assert_uint_eq(goals, 1);
    ck_assert_uint_eq(border, 0);
    ck_assert_uint_ge(onpath, 3);
    maze_free(&m);
  }
}
END_TEST

/* The path is connected from S to G and each interior path pixel has
 * exactly two path neighbours. */
START_TEST(test_path_is_simple)
{
  imp_rng rng;
  imp_rng_seed(&rng, 11);
  for (int t = 0; t < 50; t++) {
    maze m;
    ck_assert_int_eq(maze_generate(2 + (size_t)t % 9, &rng, &m), 0);
    for (size_t i = 1; i + 1 < m.h; i++)
      for (size_t j = 1; j + 1 < m.w; j++) {
        size_t p = i * m.w + j;
        if (!m.path[p])
          continue;
        ck_assert_int_ne(m.px[p], MAZE_WALL);
        int nb =
            m.path[p - 1] + m.path[p + 1] + m.path[p - m.w] + m.path[p + m.w];
        if (m.px[p] == MAZE_START || m.px[p] == MAZE_GOAL)
          ck_assert_int_eq(nb, 1);
        else
          ck_assert_int_eq(nb, 2);
      }
    maze_free(&m);
  }
}
END_TEST

START_TEST(test_deterministic)
{
  imp_rng a, b, c;
  maze ma, mb, mc;
  imp_rng_seed(&a, 99);
  imp_rng_seed(&b, 99);
  imp_rng_seed(&c, 100);
  ck_assert_int_eq(maze_generate(15, &a, &ma), 0);
  ck_assert_int_eq(maze_generate(15, &b, &mb), 0);
  ck_assert_int_eq(maze_generate(15, &c, &mc), 0);
  ck_assert_int_eq(memcmp(ma.px, mb.px, ma.h * ma.w), 0);
  ck_assert_int_ne(memcmp(ma.px, mc.px, ma.h * ma.w), 0);
  maze_free(&ma);
  maze_free(&mb);
  maze_free(&mc);
  ck_assert_uint_eq(maze_cells_for_size(9), 5);
  ck_assert_uint_eq(maze_cells_for_size(59), 30);
  ck_assert_uint_eq(maze_cells_for_size(8), 0);
}
END_TEST

/* Write mazes with their paths to text and read them back. */
START_TEST(test_round_trip)
{
  imp_rng rng;
  maze m[3];
  char *text = NULL;
  size_t len = 0, count = 0;
  FILE *f = open_memstream(&text, &len);
  imp_rng_seed(&rng, 5);
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(maze_generate(3 + (size_t)i * 4, &rng, &m[i]), 0);
    if (i > 0)
      fputc('\n', f);
    ck_assert_int_eq(maze_write(f, &m[i], m[i].path), 0);
  }
  fclose(f);

  maze *back = NULL;
  maze_error err;
  ck_assert_int_eq(maze_parse(text, len, &back, &count, &err), 0);
  ck_assert_uint_eq(count, 3);
  for (int i = 0; i < 3; i++) {
    ck_assert_uint_eq(back[i].h, m[i].h);
    ck_assert_uint_eq(back[i].w, m[i].w);
    ck_assert_int_eq(memcmp(back[i].px, m[i].px, m[i].h * m[i].w), 0);
    ck_assert_ptr_nonnull(back[i].path);
    ck_assert_int_eq(memcmp(back[i].path, m[i].path, m[i].h * m[i].w), 0);
  }
  maze_free_all(back, count);
  free(text);

  /* Without '*' the maze has no path; CRLF and trailing blanks are fine. */
  const char *plain = "\n\n#####\r\n#S.G#\r\n#####\r\n  \n\n";
  ck_assert_int_eq(maze_parse(plain, strlen(plain), &back, &count, &err), 0);
  ck_assert_uint_eq(count, 1);
  ck_assert_ptr_null(back[0].path);
  ck_assert_uint_eq(back[0].w, 5);
  ck_assert_int_eq(back[0].px[6], MAZE_START);
  ck_assert_int_eq(maze_solve_bfs(&back[0]), 0);
  ck_assert_int_eq(back[0].path[7], 1);
  maze_free_all(back, count);
  for (int i = 0; i < 3; i++)
    maze_free(&m[i]);
}
END_TEST

static void expect_error(const char *text, size_t line, const char *word)
{
  maze *mz = (maze *)1;
  size_t count = 7;
  maze_error err;
  ck_assert_int_eq(maze_parse(text, strlen(text), &mz, &count, &err), -1);
  ck_assert_ptr_null(mz);
  ck_assert_uint_eq(count, 0);
  ck_assert_msg(err.line == line, "'%s': line %zu, expected %zu (%s)", text,
                err.line, line, err.message);
  ck_assert_msg(strstr(err.message, word) != NULL, "'%s' lacks '%s'",
                err.message, word);
}

START_TEST(test_malformed)
{
  expect_error("", 1, "empty");
  expect_error("\n \n\n", 3, "empty");
  expect_error("#####\n#S.G#\n####\n", 3, "ragged");
  expect_error("#####\n#..G#\n#####\n", 1, "no start");
  expect_error("#####\n#S..#\n#####\n", 1, "no goal");
  expect_error("#####\n#SGG#\n#####\n", 2, "second goal");
  expect_error("#####\n#S.G#\n#S..#\n", 3, "second start");
  expect_error("#####\n#S.G#\n##x##\n", 3, "unknown character 'x'");
  expect_error("###\n#SG\n###\n\n#####\n#S..#\n#.?G#\n", 7, "column 3");
  /* The second maze's error is reported on its own lines. */
  expect_error("###\nSG#\n\n\n###\n#S#\n", 5, "no goal");
}
END_TEST

/* All three maps are contractions in the sup norm: |h(z) - h(z')|_inf <=
 * gamma |z - z'|_inf for random states, on a small and a large maze,
 * with weights drawn far above the bound. */
START_TEST(test_contraction)
{
  for (int kind = MAZE_MAP_FLOOD; kind <= MAZE_MAP_MIX; kind++) {
    maze_model_config cfg = {
        .channels = 4, .hidden = 6, .gamma = 0.9, .kind = kind};
    maze_model *model;
    imp_rng rng;
    ck_assert_int_eq(maze_model_create(&cfg, 3, NULL, &model), IMP_OK);
    imp_rng_seed(&rng, 4);
    double *th = imp_layer_params(maze_model_deq(model));
    size_t nth = kind == MAZE_MAP_FLOOD ? 4 : (kind == MAZE_MAP_MIX ? 12 : 16);
    for (size_t i = 0; i < nth; i++)
      th[i] = 3.0 * imp_rng_normal(&rng); /* rows far above gamma */
    for (size_t cells = 3; cells <= 20; cells += 17) {
      maze m;
      ck_assert_int_eq(maze_generate(cells, &rng, &m), 0);
      size_t hw = m.h * m.w, nz = 4 * hw;
      imp_shape xs = {1, 3, m.h, m.w};
      double *x = malloc(3 * hw * sizeof *x), *z1 = malloc(nz * sizeof *z1);
      double *z2 = malloc(nz * sizeof *z2), *h1 = malloc(nz * sizeof *h1);
      double *h2 = malloc(nz * sizeof *h2);
      maze_encode(&m, x);
      for (int t = 0; t < 20; t++) {
        double dz = 0.0, dh = 0.0;
        imp_rng_fill_uniform(&rng, z1, nz, 0.0, 5.0);
        imp_rng_fill_uniform(&rng, z2, nz, 0.0, 5.0);
        ck_assert_int_eq(maze_model_map(model, &xs, x, z1, h1), IMP_OK);
        ck_assert_int_eq(maze_model_map(model, &xs, x, z2, h2), IMP_OK);
        for (size_t i = 0; i < nz; i++) {
          dz = fmax(dz, fabs(z1[i] - z2[i]));
          dh = fmax(dh, fabs(h1[i] - h2[i]));
        }
        ck_assert_double_le(dh, 0.9 * dz * (1 + 1e-12));
        ck_assert_double_gt(dh, 0.0);
      }
      free(x);
      free(z1);
      free(z2);
      free(h1);
      free(h2);
      maze_free(&m);
    }
    maze_model_free(model);
  }
}
END_TEST

/* Breadth-first distances (in pixels) from the pixel of kind `kind`
 * through open pixels; unreachable pixels get -1. */
static void bfs_distance(const maze *m, int kind, long *d)
{
  size_t hw = m->h * m->w, *queue = malloc(hw * sizeof *queue);
  size_t head = 0, tail = 0;
  for (size_t p = 0; p < hw; p++) {
    d[p] = m->px[p] == kind ? 0 : -1;
    if (d[p] == 0)
      queue[tail++] = p;
  }
  while (head < tail) {
    size_t p = queue[head++], q[4] = {p - 1, p + 1, p - m->w, p + m->w};
    for (int k = 0; k < 4; k++)
      if (m->px[q[k]] != MAZE_WALL && d[q[k]] < 0) {
        d[q[k]] = d[p] + 1;
        queue[tail++] = q[k];
      }
  }
  free(queue);
}

/* The flood map's fixed point, reached by plain iteration from zero, is
 * exactly the geometric flood |v_c| gamma^d(source, p) of each channel,
 * and it is reached after (largest distance + 1) iterations. */
START_TEST(test_flood_fixed_point)
{
  maze_model_config cfg = {.gamma = 0.999};
  maze_model *model;
  imp_rng rng;
  maze m;
  ck_assert_int_eq(maze_model_create(&cfg, 5, NULL, &model), IMP_OK);
  imp_rng_seed(&rng, 6);
  ck_assert_int_eq(maze_generate(12, &rng, &m), 0);
  size_t hw = m.h * m.w, nz = 2 * hw;
  imp_shape xs = {1, 3, m.h, m.w};
  double *x = malloc(3 * hw * sizeof *x), *z = calloc(nz, sizeof *z);
  double *hz = malloc(nz * sizeof *hz);
  long *ds = malloc(hw * sizeof *ds), *dg = malloc(hw * sizeof *dg);
  const double *v = imp_layer_params(maze_model_deq(model));
  long dmax = 0;
  maze_encode(&m, x);
  bfs_distance(&m, MAZE_START, ds);
  bfs_distance(&m, MAZE_GOAL, dg);
  for (size_t p = 0; p < hw; p++)
    dmax = ds[p] > dmax ? ds[p] : (dg[p] > dmax ? dg[p] : dmax);
  for (long k = 0; k <= dmax; k++) {
    ck_assert_int_eq(maze_model_map(model, &xs, x, z, hz), IMP_OK);
    memcpy(z, hz, nz * sizeof *z);
  }
  ck_assert_int_eq(maze_model_map(model, &xs, x, z, hz), IMP_OK);
  for (size_t p = 0; p < hw; p++) {
    ck_assert_double_eq(hz[p], z[p]); /* an exact fixed point */
    if (m.px[p] == MAZE_WALL) {
      ck_assert_double_eq(z[p], 0.0);
      ck_assert_double_eq(z[hw + p], 0.0);
      continue;
    }
    /* Tolerance 1e-12 relative: d multiplications by gamma. */
    double es = fabs(v[0]) * pow(0.999, (double)ds[p]);
    double eg = fabs(v[1]) * pow(0.999, (double)dg[p]);
    ck_assert_double_eq_tol(z[p], es, 1e-12 * es);
    ck_assert_double_eq_tol(z[hw + p], eg, 1e-12 * eg);
  }
  free(x);
  free(z);
  free(hz);
  free(ds);
  free(dg);
  maze_free(&m);
  maze_model_free(model);
}
END_TEST

/* Loss of the whole model (DEQ solved to 1e-12, implicit backward) as a
 * function of its parameters, for imp_gradcheck. */
typedef struct loss_ctx {
  maze_model *model;
  imp_shape xs;
  double *x;
  int *labels;
  double *mask;
} loss_ctx;

static int model_loss(void *vctx, const double *theta, double *loss,
                      double *grad)
{
  loss_ctx *c = vctx;
  imp_stack *st = maze_model_stack(c->model);
  size_t np = imp_stack_nparams(st);
  imp_shape ls = c->xs;
  double *g = malloc(2 * c->xs.n * c->xs.h * c->xs.w * sizeof *g);
  int rc;

  ls.c = 2;
  memcpy(imp_stack_params(st), theta, np * sizeof *theta);
  imp_stack_zero_grad(st);
  rc = maze_model_forward(c->model, &c->xs, c->x, NULL);
  if (rc == IMP_OK)
    rc = imp_loss_softmax_xent(&ls, maze_model_logits(c->model), c->labels,
                               c->mask, loss, g);
  if (rc == IMP_OK && grad != NULL) {
    rc = maze_model_backward(c->model, g);
    memcpy(grad, imp_stack_grads(st), np * sizeof *grad);
  }
  free(g);
  return rc;
}

static int model_value(void *vctx, const double *theta, double *loss)
{
  return model_loss(vctx, theta, loss, NULL);
}

/* Gradients of the loss through the DEQ (implicit backward, fixed-point
 * adjoint) and the head against central differences, for each map (the
 * loop index _i is the map's kind).  The flood's source gains get a
 * gradient of zero up to rounding, since the head is scale-free; the
 * head's parameters carry the check there. */
START_TEST(test_gradient)
{
  int kind = _i;
  maze_model_config cfg = {
      .channels = kind == MAZE_MAP_RELU ? 3 : 2 + 2 * (kind == MAZE_MAP_MIX),
      .hidden = 4,
      .gamma = 0.9,
      .kind = kind};
  imp_deq_options dq = {0};
  loss_ctx c = {0};
  imp_rng rng;
  maze m[2];

  dq.train.max_iter = 2000;
  dq.train.rtol = 1e-13;
  dq.adjoint.rtol = 1e-13;
  dq.adjoint.max_iter = 2000;
  if (kind != MAZE_MAP_RELU)
    dq.solver = imp_fp_picard; /* Anderson stalls on the max (see docs) */
  ck_assert_int_eq(maze_model_create(&cfg, 8, &dq, &c.model), IMP_OK);
  imp_rng_seed(&rng, 21);
  c.xs = (imp_shape){2, 3, 7, 7};
  c.x = malloc(2 * 3 * 49 * sizeof *c.x);
  c.labels = malloc(2 * 49 * sizeof *c.labels);
  c.mask = malloc(2 * 49 * sizeof *c.mask);
  for (int i = 0; i < 2; i++) {
    ck_assert_int_eq(maze_generate(3, &rng, &m[i]), 0);
    maze_encode(&m[i], c.x + i * 3 * 49);
    for (size_t p = 0; p < 49; p++) {
      c.labels[i * 49 + p] = m[i].path[p];
      c.mask[i * 49 + p] = m[i].px[p] != MAZE_WALL;
    }
    maze_free(&m[i]);
  }

  imp_stack *st = maze_model_stack(c.model);
  size_t np = imp_stack_nparams(st);
  double *theta = malloc(np * sizeof *theta), *grad = malloc(np * sizeof *grad);
  double loss;
  memcpy(theta, imp_stack_params(st), np * sizeof *theta);
  ck_assert_int_eq(model_loss(&c, theta, &loss, grad), IMP_OK);
  ck_assert(isfinite(loss) && loss > 0.0);

  imp_gradcheck_options go = {.h = 1e-6, .order = 2, .floor = 1e-6};
  imp_gradcheck_result res;
  ck_assert_int_eq(imp_gradcheck(model_value, &c, theta, np, grad, &go, &res),
                   IMP_OK);
  /* Tolerance 1e-4: second-order differences with h = 1e-6 on a solve
   * converged to 1e-13; the map is piecewise smooth (max and relu). */
  ck_assert_msg(res.max_rel_err < 1e-4, "entry %zu: %g vs %g (%g)", res.worst,
                res.analytic, res.numeric, res.max_rel_err);

  /* The mixing map's recurrence is learned: its mixing logits W (the
   * first C^2 / 2 parameters) get a gradient that is not rounding noise. */
  double gw = 0.0;
  for (size_t i = 0; kind == MAZE_MAP_MIX && i < 8; i++)
    gw = fmax(gw, fabs(grad[i]));
  if (kind == MAZE_MAP_MIX)
    ck_assert_double_gt(gw, 1e-6);
  free(theta);
  free(grad);
  free(c.x);
  free(c.labels);
  free(c.mask);
  maze_model_free(c.model);
}
END_TEST

static Suite *maze_suite(void)
{
  Suite *s = suite_create("maze");
  TCase *tc = tcase_create("maze");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_generate_perfect);
  tcase_add_test(tc, test_path_is_simple);
  tcase_add_test(tc, test_deterministic);
  tcase_add_test(tc, test_round_trip);
  tcase_add_test(tc, test_malformed);
  tcase_add_test(tc, test_contraction);
  tcase_add_test(tc, test_flood_fixed_point);
  tcase_add_loop_test(tc, test_gradient, MAZE_MAP_FLOOD, MAZE_MAP_MIX + 1);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(maze_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

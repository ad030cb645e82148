/*
 * tests/test_stack_mixed.c - the mixed stack of examples/stack.c: a dense
 * layer, a DEQ, a neural ODE, a root-finding layer and a QP layer.
 *
 * The model is the demo's own, included with IMP_STACK_NO_MAIN, so the
 * test checks exactly what the demo trains.  It checks that
 *   - the whole gradient (every parameter and every input) matches
 *     fourth-order finite differences, in both forms of the model;
 *   - the form built from the library's blocks and the form built from
 *     user callbacks give the same outputs and gradients;
 *   - a few Adam steps lower the loss;
 *   - every implicit layer reports statistics of real work.
 */
#define IMP_STACK_NO_MAIN
#include "../examples/stack.c"

#include <check.h>

#define NB 3 /* samples: a smaller instance than the demo's */

/* Relative to the largest entry of b. */
static double max_rel_diff(const double *a, const double *b, size_t n)
{
  double diff = 0.0, scale = 0.0;

  for (size_t i = 0; i < n; i++) {
    diff = fmax(diff, fabs(a[i] - b[i]));
    scale = fmax(scale, fabs(b[i]));
  }
  return diff / scale;
}

static void check_gradient(mix_form form)
{
  double x[NB * MIX_IN], t[NB * MIX_F], y[NB * MIX_F];
  double grad[MIX_NPARAMS + NB * MIX_IN], loss;
  imp_gradcheck_result res;
  mix_model m;

  mix_data(NB, 7, x, t);
  ck_assert_int_eq(mix_build(form, &m), IMP_OK);
  mix_init(&m, 8);
  ck_assert_int_eq(mix_gradient(&m, NB, x, t, y, &loss, grad), IMP_OK);
  ck_assert_int_eq(mix_gradcheck(&m, NB, x, t, grad, &res), IMP_OK);

  /* Solvers run to 1e-13 (DEQ), 1e-10 relative (ODE), 1e-14 (root) and
   * 1e-12 (QP); order-4 differences with h = 1e-5 (small enough not to
   * cross a face of the simplex) then agree to about 1e-7 here, and to
   * 2e-6 at worst over the demo's training runs: 1e-5. */
  ck_assert_msg(res.max_rel_err < 1e-5, "form %d: error %g at %zu (%g vs %g)",
                (int)form, res.max_rel_err, res.worst, res.analytic,
                res.numeric);
  imp_stack_free(m.stack);
}

START_TEST(blocks_gradient_matches_fd)
{
  check_gradient(MIX_BLOCKS);
}
END_TEST

START_TEST(callbacks_gradient_matches_fd)
{
  check_gradient(MIX_CALLBACKS);
}
END_TEST

START_TEST(the_two_forms_agree)
{
  double x[NB * MIX_IN], t[NB * MIX_F], y1[NB * MIX_F], y2[NB * MIX_F];
  double g1[MIX_NPARAMS + NB * MIX_IN], g2[MIX_NPARAMS + NB * MIX_IN];
  double loss1, loss2;
  mix_model blocks, hand;
  int active = 0;

  mix_data(NB, 3, x, t);
  ck_assert_int_eq(mix_build(MIX_BLOCKS, &blocks), IMP_OK);
  ck_assert_int_eq(mix_build(MIX_CALLBACKS, &hand), IMP_OK);
  ck_assert_str_eq(imp_layer_kind(hand.dense), "hand-dense");
  ck_assert_str_eq(imp_layer_kind(hand.qp), "hand-simplex");
  mix_init(&blocks, 4);
  mix_init(&hand, 4);
  ck_assert_int_eq(mix_gradient(&blocks, NB, x, t, y1, &loss1, g1), IMP_OK);
  ck_assert_int_eq(mix_gradient(&hand, NB, x, t, y2, &loss2, g2), IMP_OK);

  /* The outputs lie on the simplex, some on its faces. */
  for (int b = 0; b < NB; b++) {
    double sum = 0.0;

    for (int i = 0; i < MIX_F; i++) {
      ck_assert(y1[b * MIX_F + i] > -1e-10);
      sum += y1[b * MIX_F + i];
      active += y2[b * MIX_F + i] == 0.0;
    }
    ck_assert(fabs(sum - 1.0) < 1e-10);
  }
  ck_assert_msg(active > 0, "no output on a face: the QP is not tested");

  /* The two forms differ only by rounding and the solvers' tolerances
   * (the ODE's steps may differ where its right-hand sides round
   * differently): 1e-8 relative. */
  ck_assert_msg(max_rel_diff(y2, y1, NB * MIX_F) < 1e-8, "outputs %g",
                max_rel_diff(y2, y1, NB * MIX_F));
  ck_assert(fabs(loss1 - loss2) < 1e-8 * loss1);
  ck_assert_msg(max_rel_diff(g2, g1, MIX_NPARAMS + NB * MIX_IN) < 1e-8,
                "gradients %g",
                max_rel_diff(g2, g1, MIX_NPARAMS + NB * MIX_IN));
  imp_stack_free(blocks.stack);
  imp_stack_free(hand.stack);
}
END_TEST

START_TEST(adam_lowers_the_loss)
{
  enum { N = 16, STEPS = 15 };
  double x[N * MIX_IN], t[N * MIX_F], y[N * MIX_F];
  double grad[MIX_NPARAMS + N * MIX_IN], first = 0.0, loss = 0.0;
  imp_optim_options adam = imp_optim_defaults();
  imp_optim *optim;
  imp_root_stats root;
  imp_deq_stats deq;
  imp_ode_stats ode;
  imp_qp_stats qp;
  mix_model m;

  mix_data(N, 5, x, t);
  ck_assert_int_eq(mix_build(MIX_BLOCKS, &m), IMP_OK);
  mix_init(&m, 6);
  adam.lr = 0.03;
  ck_assert_int_eq(imp_optim_create(imp_optim_adam, MIX_NPARAMS, &adam, &optim),
                   IMP_OK);
  for (int step = 0; step <= STEPS; step++) {
    ck_assert_int_eq(mix_gradient(&m, N, x, t, y, &loss, grad), IMP_OK);
    if (step == 0)
      first = loss;
    if (step < STEPS)
      ck_assert_int_eq(
          imp_optim_step(optim, imp_stack_params(m.stack), grad, MIX_NPARAMS),
          IMP_OK);
  }

  /* From the demo's runs: 15 full-batch steps at lr 0.03 lower the loss
   * several-fold; ask for a factor of 2. */
  ck_assert_msg(loss < 0.5 * first, "loss %g -> %g", first, loss);

  /* Every implicit layer did and reports real work. */
  ck_assert_int_eq(imp_deq_get_stats(m.deq, &deq), IMP_OK);
  ck_assert_int_eq(deq.converged, N);
  ck_assert(deq.iterations > 1 && deq.rel_residual < 1e-12);
  ck_assert(deq.backward_iterations > 0);
  ck_assert_int_eq(imp_ode_get_stats(m.ode, &ode), IMP_OK);
  ck_assert(ode.forward.steps > 0 && ode.backward.steps > 0);
  ck_assert(ode.backward.vjp_evals > 0);
  ck_assert_int_eq(imp_root_layer_stats(m.root, &root), IMP_OK);
  ck_assert_int_eq(root.samples, N);
  ck_assert(root.iterations >= N && root.residual < 1e-14);
  ck_assert_int_eq(imp_qp_layer_stats(m.qp, &qp), IMP_OK);
  ck_assert(qp.iterations > 0 && qp.gap < 1e-10);
  imp_optim_free(optim);
  imp_stack_free(m.stack);
}
END_TEST

static Suite *stack_mixed_suite(void)
{
  Suite *s = suite_create("stack_mixed");
  TCase *tc = tcase_create("stack_mixed");

  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, blocks_gradient_matches_fd);
  tcase_add_test(tc, callbacks_gradient_matches_fd);
  tcase_add_test(tc, the_two_forms_agree);
  tcase_add_test(tc, adam_lowers_the_loss);
  suite_add_tcase(s, tc);
  return s;
}

int main(void)
{
  SRunner *sr = srunner_create(stack_mixed_suite());
  int failed;

  srunner_run_all(sr, CK_NORMAL);
  failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * model.c - the maze DEQ's map, its vector-Jacobian products, and the
 * ratio head (see model.h for the mathematics).
 */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "imp/rng.h"
#include "imp/status.h"

#define NX 3       /* input channels: open, start, goal */
#define EPS 1e-300 /* keeps the ratio features defined where z is zero */
/* Below this z_q + z_p the features are held constant in backward: their
 * derivative there is of order 1 / (z_q + z_p) and would overflow. */
#define FLAT 1e-280

/* Growable double and index buffers. */
typedef struct dbuf {
  double *p;
  size_t cap;
} dbuf;

typedef struct lbuf {
  long *p;
  size_t cap;
} lbuf;

static int dgrow(dbuf *b, size_t n)
{
  if (n <= b->cap)
    return 0;
  double *q = realloc(b->p, n * sizeof *q);
  if (q == NULL)
    return -1;
  b->p = q;
  b->cap = n;
  return 0;
}

static int lgrow(lbuf *b, size_t n)
{
  if (n <= b->cap)
    return 0;
  long *q = realloc(b->p, n * sizeof *q);
  if (q == NULL)
    return -1;
  b->p = q;
  b->cap = n;
  return 0;
}

/* The map's context: sizes and scratch for one call at a time. */
typedef struct map_ctx {
  size_t c;
  int kind;         /* MAZE_MAP_FLOOD or MAZE_MAP_RELU */
  int sources_only; /* no bias and no open-channel input: only S and G
                       feed the floods */
  double gamma;
  dbuf a, m, weff, g, pad;
  lbuf arg;
} map_ctx;

/* The head's state: sizes and the input of the current forward. */
typedef struct head_state {
  size_t c, hidden;
  double kappa;
  const double *x; /* (n, NX, h, w), borrowed from the model's caller */
  dbuf feat, hid;
} head_state;

struct maze_model {
  maze_model_config cfg;
  map_ctx map;
  head_state *head;
  imp_stack *stack;
  imp_layer *deq;
  dbuf logits;
  size_t nlogits;
};

/* ------------------------------------------------------------------ */
/* The map                                                              */
/* ------------------------------------------------------------------ */

/* A = W with each row scaled to absolute sum at most gamma. */
static void effective_weight(const map_ctx *ctx, const double *w, double *a)
{
  size_t c = ctx->c;

  for (size_t r = 0; r < c; r++) {
    double s = 0.0;
    for (size_t k = 0; k < c; k++)
      s += fabs(w[r * c + k]);
    double scale = s > ctx->gamma ? ctx->gamma / s : 1.0;
    for (size_t k = 0; k < c; k++)
      a[r * c + k] = w[r * c + k] * scale;
  }
}

/* m_c(p) = max of z_c over the open 4-neighbours of p, and where it came
 * from (-1 when p has no open neighbour), for one sample. */
static void neighbour_max(size_t c, size_t h, size_t w, const double *open,
                          const double *z, double *m, long *arg)
{
  size_t hw = h * w;

  for (size_t ch = 0; ch < c; ch++) {
    const double *zc = z + ch * hw;
    for (size_t i = 0; i < h; i++) {
      for (size_t j = 0; j < w; j++) {
        size_t p = i * w + j;
        long best = -1;
        double v = 0.0;
        size_t q[4], nq = 0;
        if (i > 0)
          q[nq++] = p - w;
        if (i + 1 < h)
          q[nq++] = p + w;
        if (j > 0)
          q[nq++] = p - 1;
        if (j + 1 < w)
          q[nq++] = p + 1;
        for (size_t k = 0; k < nq; k++) {
          if (open[q[k]] > 0.5 && (best < 0 || zc[q[k]] > v)) {
            best = (long)q[k];
            v = zc[q[k]];
          }
        }
        m[ch * hw + p] = best < 0 ? 0.0 : v;
        arg[ch * hw + p] = best < 0 ? -1 : (long)(ch * hw) + best;
      }
    }
  }
}

/*
 * The neighbour maxima alone, without where they came from: the forward
 * maps' inner loop.  Each channel is copied into pad, a (h + 2) x (w + 2)
 * image holding z where the pixel is open and -inf at walls and on a
 * one-pixel frame, so that every pixel has four neighbours and the loop
 * has no branch (the compiler turns it into vector maxima).  The values
 * equal neighbour_max's: a maximum does not depend on the order of its
 * arguments, and -inf (no open neighbour) becomes 0 as there.
 */
static void neighbour_max_values(size_t c, size_t h, size_t w,
                                 const double *open, const double *z, double *m,
                                 double *pad)
{
  size_t hw = h * w, pw = w + 2;

  for (size_t j = 0; j < pw; j++)
    pad[j] = pad[(h + 1) * pw + j] = -INFINITY;
  for (size_t i = 1; i <= h; i++)
    pad[i * pw] = pad[i * pw + w + 1] = -INFINITY;

  for (size_t ch = 0; ch < c; ch++) {
    const double *zc = z + ch * hw;
    double *mc = m + ch * hw;

    for (size_t i = 0; i < h; i++) {
      const double *oi = open + i * w, *zi = zc + i * w;
      double *row = pad + (i + 1) * pw + 1;
      /* Both loads first, so that the selection needs no branch. */
      for (size_t j = 0; j < w; j++) {
        double v = zi[j], open_j = oi[j];
        row[j] = open_j > 0.5 ? v : -INFINITY;
      }
    }
    for (size_t i = 0; i < h; i++) {
      const double *up = pad + i * pw + 1, *mid = pad + (i + 1) * pw;
      const double *down = pad + (i + 2) * pw + 1;
      double *mi = mc + i * w;
      for (size_t j = 0; j < w; j++) {
        double a = up[j] > down[j] ? up[j] : down[j];
        double b = mid[j] > mid[j + 2] ? mid[j] : mid[j + 2];
        double v = a > b ? a : b;
        mi[j] = v == -INFINITY ? 0.0 : v;
      }
    }
  }
}

/* Pre-activations a = A m + V x + b for one sample, all (C, hw). */
static void preactivation(const map_ctx *ctx, const double *theta, size_t hw,
                          const double *x, const double *m, double *a)
{
  size_t c = ctx->c;
  const double *v = theta + c * c, *b = v + c * NX;

  for (size_t r = 0; r < c; r++) {
    double *ar = a + r * hw;
    for (size_t p = 0; p < hw; p++)
      ar[p] = ctx->sources_only ? 0.0 : b[r];
    for (size_t k = 0; k < c; k++) {
      double w = ctx->weff.p[r * c + k];
      const double *mk = m + k * hw;
      for (size_t p = 0; p < hw; p++)
        ar[p] += w * mk[p];
    }
    for (size_t k = ctx->sources_only ? 1 : 0; k < NX; k++) {
      double w = v[r * NX + k];
      const double *xk = x + k * hw;
      for (size_t p = 0; p < hw; p++)
        ar[p] += w * xk[p];
    }
  }
}

static int prepare(map_ctx *ctx, const imp_shape *zs)
{
  size_t n = ctx->c * zs->h * zs->w;
  if (dgrow(&ctx->a, n) || dgrow(&ctx->m, n) || lgrow(&ctx->arg, n) ||
      dgrow(&ctx->weff, ctx->c * ctx->c) || dgrow(&ctx->g, n) ||
      dgrow(&ctx->pad, (zs->h + 2) * (zs->w + 2)))
    return -1;
  return 0;
}

static int map_forward(void *vctx, const imp_shape *xs, const double *x,
                       const imp_shape *zs, const double *z,
                       const double *theta, double *out)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w;

  if (prepare(ctx, zs) != 0)
    return -1;
  effective_weight(ctx, theta, ctx->weff.p);
  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw, *zb = z + s * c * hw;
    double *ob = out + s * c * hw;

    neighbour_max(c, zs->h, zs->w, xb, zb, ctx->m.p, ctx->arg.p);
    preactivation(ctx, theta, hw, xb, ctx->m.p, ctx->a.p);
    for (size_t r = 0; r < c; r++)
      for (size_t p = 0; p < hw; p++) {
        double a = ctx->a.p[r * hw + p];
        ob[r * hw + p] = xb[p] > 0.5 && a > 0.0 ? a : 0.0;
      }
  }
  (void)xs;
  return 0;
}

static int map_vjp(void *vctx, const imp_shape *xs, const double *x,
                   const imp_shape *zs, const double *z, const double *theta,
                   const double *v, double *vjp_z, double *vjp_x,
                   double *vjp_theta)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w;
  double *gw = NULL, *gv = NULL, *gb = NULL;
  double *gacc = NULL;

  if (prepare(ctx, zs) != 0)
    return -1;
  effective_weight(ctx, theta, ctx->weff.p);
  if (vjp_theta != NULL) {
    gacc = calloc(c * c, sizeof *gacc);
    if (gacc == NULL)
      return -1;
    gw = vjp_theta;
    gv = gw + c * c;
    gb = gv + c * NX;
  }
  if (vjp_z != NULL)
    memset(vjp_z, 0, zs->n * c * hw * sizeof *vjp_z);

  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw, *zb = z + s * c * hw;
    const double *vb = v + s * c * hw;
    double *g = ctx->g.p;

    /* g = v o [a > 0], the cotangent of the pre-activation. */
    neighbour_max(c, zs->h, zs->w, xb, zb, ctx->m.p, ctx->arg.p);
    preactivation(ctx, theta, hw, xb, ctx->m.p, ctx->a.p);
    for (size_t i = 0; i < c * hw; i++) {
      size_t p = i % hw;
      g[i] = xb[p] > 0.5 && ctx->a.p[i] > 0.0 ? vb[i] : 0.0;
    }

    /* Parameters: bias, input weights, and A's gradient. */
    for (size_t r = 0; vjp_theta != NULL && r < c; r++) {
      const double *gr = g + r * hw;
      for (size_t p = 0; p < hw && !ctx->sources_only; p++)
        gb[r] += gr[p];
      for (size_t k = ctx->sources_only ? 1 : 0; k < NX; k++)
        for (size_t p = 0; p < hw; p++)
          gv[r * NX + k] += gr[p] * xb[k * hw + p];
      for (size_t k = 0; k < c; k++) {
        const double *mk = ctx->m.p + k * hw;
        double acc = 0.0;
        for (size_t p = 0; p < hw; p++)
          acc += gr[p] * mk[p];
        gacc[r * c + k] += acc;
      }
    }

    /* The state: A^T g routed back to the neighbour each max chose. */
    for (size_t k = 0; vjp_z != NULL && k < c; k++) {
      double *vz = vjp_z + s * c * hw;
      for (size_t p = 0; p < hw; p++) {
        long src = ctx->arg.p[k * hw + p];
        if (src < 0)
          continue;
        double acc = 0.0;
        for (size_t r = 0; r < c; r++)
          acc += ctx->weff.p[r * c + k] * g[r * hw + p];
        vz[src] += acc;
      }
    }

    /* The input: V^T g, and the wall mask's own derivative. */
    for (size_t k = ctx->sources_only; vjp_x != NULL && k < NX; k++) {
      double *vx = vjp_x + s * NX * hw + k * hw;
      const double *vv = theta + c * c;
      for (size_t r = 0; r < c; r++)
        for (size_t p = 0; p < hw; p++)
          vx[p] += vv[r * NX + k] * g[r * hw + p];
    }
    for (size_t r = 0; vjp_x != NULL && r < c; r++)
      for (size_t p = 0; p < hw; p++) {
        double a = ctx->a.p[r * hw + p];
        if (a > 0.0)
          vjp_x[s * NX * hw + p] += vb[r * hw + p] * a;
      }
  }

  /* Through the row scaling A_r = gamma W_r / |W_r|_1 where it is active:
   * dA_rk/dW_rj = (gamma/s) [k = j] - gamma W_rk sign(W_rj) / s^2. */
  for (size_t r = 0; vjp_theta != NULL && r < c; r++) {
    const double *wr = theta + r * c;
    double s = 0.0, dot = 0.0;
    for (size_t k = 0; k < c; k++)
      s += fabs(wr[k]);
    if (s <= ctx->gamma) {
      for (size_t k = 0; k < c; k++)
        gw[r * c + k] += gacc[r * c + k];
      continue;
    }
    for (size_t k = 0; k < c; k++)
      dot += gacc[r * c + k] * wr[k];
    for (size_t j = 0; j < c; j++) {
      double sg = wr[j] > 0.0 ? 1.0 : (wr[j] < 0.0 ? -1.0 : 0.0);
      gw[r * c + j] +=
          ctx->gamma / s * gacc[r * c + j] - ctx->gamma * sg * dot / (s * s);
    }
  }
  free(gacc);
  (void)xs;
  return 0;
}

/* ------------------------------------------------------------------ */
/* The flood map                                                        */
/* ------------------------------------------------------------------ */

/* The input channel (1: start, 2: goal) that feeds state channel ch: the
 * first half of the channels is fed by S, the second half by G. */
static size_t flood_source(const map_ctx *ctx, size_t ch)
{
  return ch < ctx->c / 2 ? 1 : 2;
}

/* out_c(p) = o(p) max(gamma m_c(p), |v_c| x_src(c)(p)). */
static int flood_forward(void *vctx, const imp_shape *xs, const double *x,
                         const imp_shape *zs, const double *z,
                         const double *theta, double *out)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w;

  if (prepare(ctx, zs) != 0)
    return -1;
  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw;

    neighbour_max_values(c, zs->h, zs->w, xb, z + s * c * hw, ctx->m.p,
                         ctx->pad.p);
    for (size_t r = 0; r < c; r++) {
      const double *src = xb + flood_source(ctx, r) * hw;
      const double *mr = ctx->m.p + r * hw;
      double *oc = out + (s * c + r) * hw, gain = fabs(theta[r]);
      for (size_t p = 0; p < hw; p++) {
        double carried = ctx->gamma * mr[p], fed = gain * src[p];
        double top = carried > fed ? carried : fed;
        oc[p] = xb[p] > 0.5 ? top : 0.0;
      }
    }
  }
  (void)xs;
  return 0;
}

/* The flood map's vjp: each output pixel passes its cotangent either to
 * the neighbour its maximum came from (times gamma) or to its source. */
static int flood_vjp(void *vctx, const imp_shape *xs, const double *x,
                     const imp_shape *zs, const double *z, const double *theta,
                     const double *v, double *vjp_z, double *vjp_x,
                     double *vjp_theta)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w;

  if (prepare(ctx, zs) != 0)
    return -1;
  if (vjp_z != NULL)
    memset(vjp_z, 0, zs->n * c * hw * sizeof *vjp_z);
  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw, *zb = z + s * c * hw;
    const double *vb = v + s * c * hw;

    neighbour_max(c, zs->h, zs->w, xb, zb, ctx->m.p, ctx->arg.p);
    for (size_t r = 0; r < c; r++) {
      size_t k = flood_source(ctx, r);
      const double *src = xb + k * hw;
      double gain = fabs(theta[r]);
      double sg = theta[r] > 0.0 ? 1.0 : (theta[r] < 0.0 ? -1.0 : 0.0);
      for (size_t p = 0; p < hw; p++) {
        double g = vb[r * hw + p];
        double carried = ctx->gamma * ctx->m.p[r * hw + p];
        double fed = gain * src[p];
        if (xb[p] < 0.5)
          continue;
        if (vjp_x != NULL)
          vjp_x[s * NX * hw + p] += g * fmax(carried, fed);
        if (carried > fed) {
          if (vjp_z != NULL)
            vjp_z[s * c * hw + (size_t)ctx->arg.p[r * hw + p]] +=
                ctx->gamma * g;
        } else {
          if (vjp_theta != NULL)
            vjp_theta[r] += g * sg * src[p];
          if (vjp_x != NULL)
            vjp_x[s * NX * hw + k * hw + p] += g * gain;
        }
      }
    }
  }
  (void)xs;
  return 0;
}

/* ------------------------------------------------------------------ */
/* The mixing flood map                                                 */
/* ------------------------------------------------------------------ */

/* The first channel of row r's half: 0 for the channels fed by the
 * start, C/2 for those fed by the goal. */
static size_t mix_half(size_t c, size_t r)
{
  return r < c / 2 ? 0 : c / 2;
}

/*
 * A (C x C, zero across the halves) from W (C x C/2): row r of A is
 * gamma softmax(W_r) over the channels of r's own half, so its entries
 * are non-negative and sum to gamma.  Nothing flows between the halves:
 * an earlier version learned those entries too, and a leak of 7e-5 was
 * enough to turn the start's flood into the goal's at the far end of a
 * 201x201 maze (docs/maze.md).
 */
static void mix_weight(const map_ctx *ctx, const double *w, double *a)
{
  size_t c = ctx->c, half = c / 2;

  memset(a, 0, c * c * sizeof *a);
  for (size_t r = 0; r < c; r++) {
    const double *wr = w + r * half;
    double *ar = a + r * c + mix_half(c, r), top = wr[0], sum = 0.0;

    for (size_t j = 1; j < half; j++)
      top = fmax(top, wr[j]);
    for (size_t j = 0; j < half; j++) {
      ar[j] = exp(wr[j] - top);
      sum += ar[j];
    }
    for (size_t j = 0; j < half; j++)
      ar[j] *= ctx->gamma / sum;
  }
}

/* For one sample: the neighbour maxima m, the mixed carry a = A m, and
 * the injected sources u_r = |v_r| src_r (src_r the start for the first
 * half of the channels, the goal for the second), all (C, hw). */
static void mix_terms(map_ctx *ctx, const double *theta, size_t h, size_t w,
                      const double *x, const double *z, double *u, int with_arg)
{
  size_t c = ctx->c, hw = h * w, half = c / 2;
  const double *v = theta + c * half;

  if (with_arg)
    neighbour_max(c, h, w, x, z, ctx->m.p, ctx->arg.p);
  else
    neighbour_max_values(c, h, w, x, z, ctx->m.p, ctx->pad.p);
  for (size_t r = 0; r < c; r++) {
    size_t k0 = mix_half(c, r);
    double *restrict ar = ctx->a.p + r * hw, *restrict ur = u + r * hw;
    const double *restrict m = ctx->m.p, *wr = ctx->weff.p + r * c;
    const double *restrict src = x + (k0 == 0 ? 1 : 2) * hw;
    double vr = fabs(v[r]);

    for (size_t p = 0; p < hw; p++) {
      ar[p] = wr[k0] * m[k0 * hw + p];
      ur[p] = vr * src[p];
    }
    for (size_t k = k0 + 1; k < k0 + half; k++) {
      const double *restrict mk = m + k * hw;
      double akk = wr[k];
      for (size_t p = 0; p < hw; p++)
        ar[p] += akk * mk[p];
    }
  }
}

/* out_r(p) = o(p) max(sum_k A_rk m_k(p), u_r(p)). */
static int mix_forward(void *vctx, const imp_shape *xs, const double *x,
                       const imp_shape *zs, const double *z,
                       const double *theta, double *out)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w;

  if (prepare(ctx, zs) != 0)
    return -1;
  mix_weight(ctx, theta, ctx->weff.p);
  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw;
    double *ob = out + s * c * hw, *u = ctx->g.p;

    mix_terms(ctx, theta, zs->h, zs->w, xb, z + s * c * hw, u, 0);
    for (size_t r = 0; r < c; r++) {
      const double *ar = ctx->a.p + r * hw, *ur = u + r * hw;
      double *out_r = ob + r * hw;
      for (size_t p = 0; p < hw; p++) {
        double top = ar[p] > ur[p] ? ar[p] : ur[p];
        out_r[p] = xb[p] > 0.5 ? top : 0.0;
      }
    }
  }
  (void)xs;
  return 0;
}

/* The mixing map's vjp.  Where the carry wins, the cotangent goes to W
 * (through the softmax) and, times A_rk, to the neighbour each channel's
 * maximum came from; where the source wins, to V and the source pixel. */
static int mix_vjp(void *vctx, const imp_shape *xs, const double *x,
                   const imp_shape *zs, const double *z, const double *theta,
                   const double *v, double *vjp_z, double *vjp_x,
                   double *vjp_theta)
{
  map_ctx *ctx = vctx;
  size_t c = ctx->c, hw = zs->h * zs->w, half = c / 2;
  const double *vsrc = theta + c * half;
  double *gacc = NULL, *gv = NULL;

  if (prepare(ctx, zs) != 0)
    return -1;
  mix_weight(ctx, theta, ctx->weff.p);
  if (vjp_theta != NULL) {
    gacc = calloc(c * c, sizeof *gacc);
    if (gacc == NULL)
      return -1;
    gv = vjp_theta + c * half;
  }
  if (vjp_z != NULL)
    memset(vjp_z, 0, zs->n * c * hw * sizeof *vjp_z);

  for (size_t s = 0; s < zs->n; s++) {
    const double *xb = x + s * NX * hw, *vb = v + s * c * hw;
    double *u = ctx->g.p;

    mix_terms(ctx, theta, zs->h, zs->w, xb, z + s * c * hw, u, 1);
    for (size_t r = 0; r < c; r++)
      for (size_t p = 0; p < hw; p++) {
        size_t i = r * hw + p;
        double g = vb[i], a = ctx->a.p[i];
        if (xb[p] < 0.5)
          continue;
        if (vjp_x != NULL)
          vjp_x[s * NX * hw + p] += g * fmax(a, u[i]);
        if (a > u[i]) {
          for (size_t k = mix_half(c, r); k < mix_half(c, r) + half; k++) {
            long src = ctx->arg.p[k * hw + p];
            if (src < 0)
              continue;
            if (gacc != NULL)
              gacc[r * c + k] += g * ctx->m.p[k * hw + p];
            if (vjp_z != NULL)
              vjp_z[s * c * hw + (size_t)src] += ctx->weff.p[r * c + k] * g;
          }
          continue;
        }
        {
          size_t j = mix_half(c, r) == 0 ? 1 : 2;
          double vr = vsrc[r], srcr = xb[j * hw + p];
          double sg = vr > 0.0 ? 1.0 : (vr < 0.0 ? -1.0 : 0.0);
          if (gv != NULL)
            gv[r] += g * sg * srcr;
          if (vjp_x != NULL)
            vjp_x[s * NX * hw + j * hw + p] += g * fabs(vr);
        }
      }
  }

  /* Through the softmax of each row over its own half:
   * dA_rk/dW_rj = A_rk ([k = j] - A_rj / gamma). */
  for (size_t r = 0; vjp_theta != NULL && r < c; r++) {
    const double *ar = ctx->weff.p + r * c + mix_half(c, r);
    const double *gr = gacc + r * c + mix_half(c, r);
    double dot = 0.0;
    for (size_t j = 0; j < half; j++)
      dot += gr[j] * ar[j];
    for (size_t j = 0; j < half; j++)
      vjp_theta[r * half + j] += ar[j] * (gr[j] - dot / ctx->gamma);
  }
  free(gacc);
  (void)xs;
  return 0;
}

/* ------------------------------------------------------------------ */
/* The head                                                             */
/* ------------------------------------------------------------------ */

static int head_shape(const imp_layer *layer, const imp_shape *in,
                      imp_shape *out)
{
  (void)layer;
  *out = *in;
  out->c = 2;
  return IMP_OK;
}

/* The 4 C ratio features at every pixel of one sample, (4C, hw). */
static void head_features(const head_state *hs, size_t h, size_t w,
                          const double *open, const double *z, double *f)
{
  static const int di[4] = {-1, 1, 0, 0}, dj[4] = {0, 0, -1, 1};
  size_t hw = h * w, c = hs->c;

  for (size_t e = 0; e < 4; e++)
    for (size_t ch = 0; ch < c; ch++) {
      double *fe = f + (e * c + ch) * hw;
      const double *zc = z + ch * hw;
      for (size_t i = 0; i < h; i++)
        for (size_t j = 0; j < w; j++) {
          long qi = (long)i + di[e], qj = (long)j + dj[e];
          size_t p = i * w + j, q;
          fe[p] = 0.0;
          if (qi < 0 || qj < 0 || qi >= (long)h || qj >= (long)w)
            continue;
          q = (size_t)qi * w + (size_t)qj;
          if (open[p] < 0.5 || open[q] < 0.5)
            continue;
          fe[p] = tanh(hs->kappa * (zc[q] - zc[p]) / (zc[q] + zc[p] + EPS));
        }
    }
}

static int head_forward(imp_layer *layer, const imp_shape *in, const double *z,
                        double *y)
{
  head_state *hs = imp_layer_state(layer);
  const double *th = imp_layer_params(layer);
  size_t c = hs->c, nh = hs->hidden, hw = in->h * in->w, nf = 4 * c;
  const double *w1 = th, *v1 = w1 + nh * nf, *b1 = v1 + nh * NX;
  const double *w2 = b1 + nh, *b2 = w2 + 2 * nh;

  if (hs->x == NULL || in->c != c)
    return IMP_ESHAPE;
  if (dgrow(&hs->feat, nf * hw) || dgrow(&hs->hid, nh * hw))
    return IMP_ENOMEM;
  for (size_t s = 0; s < in->n; s++) {
    const double *xb = hs->x + s * NX * hw;
    double *yb = y + s * 2 * hw, *f = hs->feat.p, *q = hs->hid.p;

    head_features(hs, in->h, in->w, xb, z + s * c * hw, f);
    for (size_t k = 0; k < nh; k++)
      for (size_t p = 0; p < hw; p++) {
        double a = b1[k];
        for (size_t j = 0; j < nf; j++)
          a += w1[k * nf + j] * f[j * hw + p];
        for (size_t j = 0; j < NX; j++)
          a += v1[k * NX + j] * xb[j * hw + p];
        q[k * hw + p] = a > 0.0 ? a : 0.0;
      }
    for (size_t o = 0; o < 2; o++)
      for (size_t p = 0; p < hw; p++) {
        double a = b2[o];
        for (size_t k = 0; k < nh; k++)
          a += w2[o * nh + k] * q[k * hw + p];
        yb[o * hw + p] = a;
      }
  }
  return IMP_OK;
}

static int head_backward(imp_layer *layer, double *zbar, const double *ybar,
                         const imp_shape *in, const double *z, const double *y)
{
  static const int di[4] = {-1, 1, 0, 0}, dj[4] = {0, 0, -1, 1};
  head_state *hs = imp_layer_state(layer);
  const double *th = imp_layer_params(layer);
  double *gr = imp_layer_grads(layer);
  size_t c = hs->c, nh = hs->hidden, h = in->h, w = in->w, hw = h * w;
  size_t nf = 4 * c;
  const double *w1 = th, *v1 = w1 + nh * nf, *b1 = v1 + nh * NX;
  const double *w2 = b1 + nh;
  double *gw1 = gr, *gv1 = gw1 + nh * nf, *gb1 = gv1 + nh * NX;
  double *gw2 = gb1 + nh, *gb2 = gw2 + 2 * nh;
  double *qbar = NULL, *fbar = NULL;

  (void)y;
  if (dgrow(&hs->feat, nf * hw) || dgrow(&hs->hid, nh * hw))
    return IMP_ENOMEM;
  qbar = malloc(nh * hw * sizeof *qbar);
  fbar = malloc(nf * hw * sizeof *fbar);
  if (qbar == NULL || fbar == NULL) {
    free(qbar);
    free(fbar);
    return IMP_ENOMEM;
  }
  for (size_t s = 0; s < in->n; s++) {
    const double *xb = hs->x + s * NX * hw, *zb = z + s * c * hw;
    const double *yb = ybar + s * 2 * hw;
    double *f = hs->feat.p, *q = hs->hid.p;

    /* Recompute the features and hidden units of this sample. */
    head_features(hs, h, w, xb, zb, f);
    for (size_t k = 0; k < nh; k++)
      for (size_t p = 0; p < hw; p++) {
        double a = b1[k];
        for (size_t j = 0; j < nf; j++)
          a += w1[k * nf + j] * f[j * hw + p];
        for (size_t j = 0; j < NX; j++)
          a += v1[k * NX + j] * xb[j * hw + p];
        q[k * hw + p] = a > 0.0 ? a : 0.0;
      }

    /* Output layer, then the hidden relu. */
    for (size_t o = 0; o < 2; o++)
      for (size_t p = 0; p < hw; p++) {
        gb2[o] += yb[o * hw + p];
        for (size_t k = 0; k < nh; k++)
          gw2[o * nh + k] += yb[o * hw + p] * q[k * hw + p];
      }
    for (size_t k = 0; k < nh; k++)
      for (size_t p = 0; p < hw; p++) {
        double a = 0.0;
        if (q[k * hw + p] > 0.0)
          a = w2[k] * yb[p] + w2[nh + k] * yb[hw + p];
        qbar[k * hw + p] = a;
        gb1[k] += a;
        for (size_t j = 0; j < NX; j++)
          gv1[k * NX + j] += a * xb[j * hw + p];
        for (size_t j = 0; j < nf; j++)
          gw1[k * nf + j] += a * f[j * hw + p];
      }
    if (zbar == NULL)
      continue;

    /* Features: f = tanh(k r), r = (zq - zp) / (zq + zp + eps). */
    for (size_t j = 0; j < nf; j++)
      for (size_t p = 0; p < hw; p++) {
        double a = 0.0;
        for (size_t k = 0; k < nh; k++)
          a += w1[k * nf + j] * qbar[k * hw + p];
        fbar[j * hw + p] = a;
      }
    for (size_t e = 0; e < 4; e++)
      for (size_t ch = 0; ch < c; ch++) {
        const double *zc = zb + ch * hw, *fe = f + (e * c + ch) * hw;
        const double *fb = fbar + (e * c + ch) * hw;
        double *zo = zbar + s * c * hw + ch * hw;
        for (size_t i = 0; i < h; i++)
          for (size_t jj = 0; jj < w; jj++) {
            long qi = (long)i + di[e], qj = (long)jj + dj[e];
            size_t p = i * w + jj, qq;
            if (qi < 0 || qj < 0 || qi >= (long)h || qj >= (long)w)
              continue;
            qq = (size_t)qi * w + (size_t)qj;
            if (xb[p] < 0.5 || xb[qq] < 0.5)
              continue;
            double sum = zc[qq] + zc[p] + EPS;
            double dr = fb[p] * hs->kappa * (1.0 - fe[p] * fe[p]);
            if (sum < FLAT)
              continue;
            zo[qq] += dr * ((2.0 * zc[p] + EPS) / sum) / sum;
            zo[p] -= dr * ((2.0 * zc[qq] + EPS) / sum) / sum;
          }
      }
  }
  free(qbar);
  free(fbar);
  return IMP_OK;
}

static void head_destroy(void *state)
{
  head_state *hs = state;
  if (hs == NULL)
    return;
  free(hs->feat.p);
  free(hs->hid.p);
  free(hs);
}

static const imp_layer_ops head_ops = {.kind = "maze-head",
                                       .output_shape = head_shape,
                                       .forward = head_forward,
                                       .backward = head_backward,
                                       .destroy = head_destroy};

/* ------------------------------------------------------------------ */
/* The model                                                            */
/* ------------------------------------------------------------------ */

int maze_model_create(const maze_model_config *cfg, uint64_t seed,
                      const imp_deq_options *deq, maze_model **out)
{
  maze_model *m;
  imp_rng rng;
  imp_layer *head = NULL;
  double *theta;
  size_t c, nh, ntheta, nhead;
  int rc;

  if (out == NULL)
    return IMP_EINVAL;
  *out = NULL;
  m = calloc(1, sizeof *m);
  if (m == NULL)
    return IMP_ENOMEM;
  if (cfg != NULL)
    m->cfg = *cfg;
  if (m->cfg.kind != MAZE_MAP_FLOOD && m->cfg.kind != MAZE_MAP_RELU &&
      m->cfg.kind != MAZE_MAP_MIX) {
    free(m);
    return IMP_EINVAL;
  }
  if (m->cfg.channels == 0)
    m->cfg.channels = m->cfg.kind == MAZE_MAP_FLOOD
                          ? 2
                          : (m->cfg.kind == MAZE_MAP_MIX ? 4 : 8);
  if (m->cfg.kind != MAZE_MAP_RELU && m->cfg.channels % 2 != 0) {
    free(m);
    return IMP_EINVAL;
  }
  if (m->cfg.hidden == 0)
    m->cfg.hidden = 16;
  if (!(m->cfg.gamma > 0.0))
    m->cfg.gamma = 0.999;
  c = m->cfg.channels;
  nh = m->cfg.hidden;
  m->map.c = c;
  m->map.kind = m->cfg.kind;
  m->map.gamma = m->cfg.gamma;
  m->map.sources_only = m->cfg.sources_only;
  imp_rng_seed(&rng, seed);

  /* The map's parameters.  Flood: the source gains v, near 1.  Relu: W
   * near gamma I (each channel its own flood to begin with), V normal, b
   * zero.  Mix: the logits W near 0 (each row mixes its half about
   * evenly) and the gains v near 1. */
  int flood = m->cfg.kind == MAZE_MAP_FLOOD, mix = m->cfg.kind == MAZE_MAP_MIX;
  ntheta = flood ? c : (mix ? c * c / 2 + c : c * c + c * NX + c);
  theta = calloc(ntheta, sizeof *theta);
  if (theta == NULL) {
    free(m);
    return IMP_ENOMEM;
  }
  for (size_t r = 0; flood && r < c; r++)
    theta[r] = 1.0 + 0.1 * imp_rng_normal(&rng);
  for (size_t r = 0; !flood && !mix && r < c; r++)
    for (size_t k = 0; k < c; k++)
      theta[r * c + k] =
          (r == k ? m->cfg.gamma : 0.0) + 0.05 * imp_rng_normal(&rng);
  for (size_t i = 0; !flood && !mix && i < c * NX; i++)
    theta[c * c + i] = 0.5 * imp_rng_normal(&rng);
  for (size_t i = 0; mix && i < c * c / 2; i++)
    theta[i] = 0.1 * imp_rng_normal(&rng);
  for (size_t r = 0; mix && r < c; r++)
    theta[c * c / 2 + r] = 1.0 + 0.1 * imp_rng_normal(&rng);

  imp_deq_map map = {.ntheta = ntheta,
                     .x_channels = NX,
                     .z_channels = c,
                     .map = flood ? flood_forward
                                  : (mix ? mix_forward : map_forward),
                     .vjp = flood ? flood_vjp : (mix ? mix_vjp : map_vjp),
                     .ctx = &m->map};
  const char *name =
      flood ? "maze-deq-flood"
            : (mix ? "maze-deq-mix"
                   : (m->cfg.sources_only ? "maze-deq-src" : "maze-deq"));
  rc = imp_stack_create("maze", &m->stack);
  if (rc == IMP_OK)
    rc = imp_deq_create(&map, theta, deq, name, &m->deq);
  free(theta);
  if (rc == IMP_OK) {
    rc = imp_stack_add(m->stack, m->deq);
    if (rc != IMP_OK)
      imp_layer_free(m->deq);
  }

  /* The head: W1 and V1 normal, W2 normal, biases zero. */
  if (rc == IMP_OK) {
    head_state *hs = calloc(1, sizeof *hs);
    nhead = nh * 4 * c + nh * NX + nh + 2 * nh + 2;
    rc = hs == NULL ? IMP_ENOMEM : IMP_OK;
    if (rc == IMP_OK) {
      hs->c = c;
      hs->hidden = nh;
      hs->kappa = 2.0 / (1.0 - m->cfg.gamma);
      m->head = hs;
      rc = imp_layer_create(&head_ops, hs, nhead, "maze-head", &head);
      if (rc != IMP_OK)
        head_destroy(hs);
    }
    if (rc == IMP_OK) {
      double *p = imp_layer_params(head);
      for (size_t i = 0; i < nh * (4 * c + NX); i++)
        p[i] = imp_rng_normal(&rng) / sqrt((double)(4 * c + NX));
      for (size_t i = 0; i < 2 * nh; i++)
        p[nh * (4 * c + NX) + nh + i] = imp_rng_normal(&rng) / sqrt((double)nh);
      rc = imp_stack_add(m->stack, head);
      if (rc != IMP_OK)
        imp_layer_free(head);
    }
  }
  if (rc != IMP_OK) {
    maze_model_free(m);
    return rc;
  }
  *out = m;
  return IMP_OK;
}

void maze_model_free(maze_model *m)
{
  if (m == NULL)
    return;
  imp_stack_free(m->stack);
  free(m->map.a.p);
  free(m->map.m.p);
  free(m->map.weff.p);
  free(m->map.g.p);
  free(m->map.arg.p);
  free(m->map.pad.p);
  free(m->logits.p);
  free(m);
}

imp_stack *maze_model_stack(maze_model *m)
{
  return m->stack;
}

imp_layer *maze_model_deq(maze_model *m)
{
  return m->deq;
}

maze_model_config maze_model_get_config(const maze_model *m)
{
  return m->cfg;
}

int maze_model_forward(maze_model *m, const imp_shape *xs, const double *x,
                       double *logits)
{
  size_t n = xs->n * 2 * xs->h * xs->w;

  if (dgrow(&m->logits, n) != 0)
    return IMP_ENOMEM;
  m->head->x = x;
  int rc = imp_stack_forward(m->stack, xs, x, m->logits.p);
  if (rc != IMP_OK)
    return rc;
  m->nlogits = n;
  if (logits != NULL)
    memcpy(logits, m->logits.p, n * sizeof *logits);
  return IMP_OK;
}

const double *maze_model_logits(const maze_model *m)
{
  return m->logits.p;
}

const double *maze_model_state(const maze_model *m, imp_shape *zs)
{
  const double *z = NULL;
  if (imp_stack_activation(m->stack, 1, zs, &z) != IMP_OK)
    return NULL;
  return z;
}

int maze_model_backward(maze_model *m, const double *logits_bar)
{
  return imp_stack_backward(m->stack, NULL, logits_bar);
}

int maze_model_map(maze_model *m, const imp_shape *xs, const double *x,
                   const double *z, double *out)
{
  imp_shape zs = *xs;
  zs.c = m->cfg.channels;
  imp_deq_map_fn fn =
      m->cfg.kind == MAZE_MAP_FLOOD
          ? flood_forward
          : (m->cfg.kind == MAZE_MAP_MIX ? mix_forward : map_forward);
  if (fn(&m->map, xs, x, &zs, z, imp_layer_params(m->deq), out) != 0)
    return IMP_ENOMEM;
  return IMP_OK;
}

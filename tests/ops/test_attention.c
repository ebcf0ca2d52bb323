/* Attention: forward against a naive full T x T reference (in double), backward against a naive
 * reference and against finite differences, its dqkv written over garbage (every query, key and value
 * element, the key and value heads summing their group's query heads); MHA, MQA, GQA; odd T and D;
 * dropout with its mask; a slice of the heads (tensor parallelism) drawing the full model's masks. */
#include <math.h>
#include <stdio.h>

#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

typedef struct {
    int B, T, H, G, D;
    float p;
    uint64_t key;
} shape;

static size_t qkv_n(const shape *s) { return (size_t)s->B * s->T * (s->H + 2 * s->G) * s->D; }
static size_t out_n(const shape *s) { return (size_t)s->B * s->T * s->H * s->D; }

static size_t qoff(const shape *s, int b, int t, int h) {
    int hpg = s->H / s->G, g = h / hpg;
    return (((size_t)b * s->T + t) * (s->H + 2 * s->G) + g * (hpg + 2) + h % hpg) * s->D;
}
static size_t koff(const shape *s, int b, int t, int g) {
    int hpg = s->H / s->G;
    return (((size_t)b * s->T + t) * (s->H + 2 * s->G) + g * (hpg + 2) + hpg) * s->D;
}
static double keep_factor(const shape *s, int b, int h, int i, int j) {
    if (s->p <= 0.0f) return 1.0;
    uint64_t idx = (((uint64_t)b * s->H + h) * s->T + i) * (uint64_t)s->T + j;
    return lt_rng_uniform(s->key, idx) < s->p ? 0.0 : 1.0 / (1.0 - (double)s->p);
}

/* Naive reference: full score matrix per (b, h), double precision; forward and (if dout) backward. */
static void naive(const shape *s, const float *qkv, const float *dout, double *out, double *lse, double *dqkv) {
    const int T = s->T, D = s->D, H = s->H, hpg = s->H / s->G;
    const double scale = 1.0 / sqrt((double)D);
    double *P = malloc(sizeof(double) * T * T), *Pd = malloc(sizeof(double) * T * T);
    for (int b = 0; b < s->B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / hpg;
            for (int i = 0; i < T; i++) {
                const float *q = qkv + qoff(s, b, i, h);
                double m = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    const float *k = qkv + koff(s, b, j, g);
                    double d = 0;
                    for (int e = 0; e < D; e++) d += (double)q[e] * k[e];
                    P[i * T + j] = d * scale;
                    if (d * scale > m) m = d * scale;
                }
                double l = 0;
                for (int j = 0; j <= i; j++) l += exp(P[i * T + j] - m);
                lse[((size_t)b * H + h) * T + i] = m + log(l);
                for (int j = 0; j <= i; j++) {
                    P[i * T + j] = exp(P[i * T + j] - m) / l;
                    Pd[i * T + j] = P[i * T + j] * keep_factor(s, b, h, i, j);
                }
                double *o = out + (((size_t)b * T + i) * H + h) * D;
                for (int e = 0; e < D; e++) o[e] = 0;
                for (int j = 0; j <= i; j++) {
                    const float *v = qkv + koff(s, b, j, g) + D;
                    for (int e = 0; e < D; e++) o[e] += Pd[i * T + j] * v[e];
                }
            }
            if (!dout) continue;
            for (int i = 0; i < T; i++) {
                const float *go = dout + (((size_t)b * T + i) * H + h) * D;
                const float *q = qkv + qoff(s, b, i, h);
                double *dq = dqkv + qoff(s, b, i, h);
                double *dp = malloc(sizeof(double) * (i + 1)), di = 0;
                for (int j = 0; j <= i; j++) {
                    const float *v = qkv + koff(s, b, j, g) + D;
                    double *dv = dqkv + koff(s, b, j, g) + D;
                    double d = 0;
                    for (int e = 0; e < D; e++) d += (double)go[e] * v[e], dv[e] += Pd[i * T + j] * go[e];
                    dp[j] = d * keep_factor(s, b, h, i, j);
                    di += P[i * T + j] * dp[j];
                }
                for (int j = 0; j <= i; j++) {
                    const double ds = P[i * T + j] * (dp[j] - di) * scale;
                    const float *k = qkv + koff(s, b, j, g);
                    double *dk = dqkv + koff(s, b, j, g);
                    for (int e = 0; e < D; e++) dq[e] += ds * k[e], dk[e] += ds * q[e];
                }
                free(dp);
            }
        }
    free(P);
    free(Pd);
}

static double max_rel_d(const float *a, const double *b, size_t n) { return tu_rel_err(a, b, n); }

/* Forward and backward vs the naive reference; backward writes a dqkv prefilled with garbage. */
static void check_vs_naive(const char *name, shape s) {
    const size_t nq = qkv_n(&s), no = out_n(&s), nl = (size_t)s.B * s.H * s.T;
    float *qkv = tu_new_randn(nq, 1.0f), *dout = tu_new_randn(no, 1.0f);
    float *out = tu_alloc(no), *lse = tu_alloc(nl), *dqkv = tu_new_garbage(nq);
    double *rout = calloc(no, sizeof(double)), *rlse = calloc(nl, sizeof(double)), *rd = calloc(nq, sizeof(double));
    lt_attention_forward(out, lse, qkv, s.B, s.T, s.H, s.G, s.D, s.p, s.key, 0, s.H);
    naive(&s, qkv, dout, rout, rlse, rd);
    TAP_CHECK(max_rel_d(out, rout, no) < 2e-5, "%s: forward out vs naive (rel %.2e)", name, max_rel_d(out, rout, no));
    TAP_CHECK(max_rel_d(lse, rlse, nl) < 2e-6, "%s: forward lse vs naive (rel %.2e)", name, max_rel_d(lse, rlse, nl));
    lt_attention_backward(dqkv, dout, qkv, out, lse, s.B, s.T, s.H, s.G, s.D, s.p, s.key, 0, s.H);
    double e = max_rel_d(dqkv, rd, nq);
    TAP_CHECK(e < 1e-4, "%s: backward dqkv (written over garbage) vs naive (rel %.2e)", name, e);
    free(qkv), free(dout), free(out), free(lse), free(dqkv), free(rout), free(rlse), free(rd);
}

/* Finite differences of L = sum(out * R) through the real forward. */
typedef struct {
    shape s;
    float *qkv, *out, *lse, *R;
} fd_ctx;

static double fd_loss(void *p) {
    fd_ctx *c = p;
    lt_attention_forward(c->out, c->lse, c->qkv, c->s.B, c->s.T, c->s.H, c->s.G, c->s.D, c->s.p, c->s.key, 0, c->s.H);
    return tu_dot(c->out, c->R, out_n(&c->s));
}

static void check_fd(const char *name, shape s) {
    const size_t nq = qkv_n(&s), no = out_n(&s);
    fd_ctx c = {s, tu_new_randn(nq, 1.0f), tu_alloc(no), tu_alloc((size_t)s.B * s.H * s.T), tu_new_randn(no, 1.0f)};
    float *zero = tu_alloc(nq), *dqkv = tu_new_garbage(nq);
    fd_loss(&c);
    lt_attention_backward(dqkv, c.R, c.qkv, c.out, c.lse, s.B, s.T, s.H, s.G, s.D, s.p, s.key, 0, s.H);
    char what[128];
    snprintf(what, sizeof what, "%s: dqkv (written over garbage)", name);
    tu_check_fd(what, dqkv, zero, c.qkv, nq, 1e-2f, fd_loss, &c, 5e-4);
    free(c.qkv), free(c.out), free(c.lse), free(c.R), free(dqkv), free(zero);
}

/* Copy the columns [off, off + width) of each of rows rows of pitch floats: one rank's heads of a buffer. */
static float *slice_rows(const float *src, size_t rows, size_t pitch, size_t off, size_t width) {
    float *dst = tu_alloc(rows * width);
    for (size_t r = 0; r < rows; r++) memcpy(dst + r * width, src + r * pitch + off, width * sizeof(float));
    return dst;
}
static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

/* Tensor parallelism: heads [h0, h0 + Hl) of the model s, run alone with head_offset h0 and heads_total s.H,
 * give exactly the full run's out, lse and dqkv of those heads (dropout masks are numbered by global head).
 * The slice holds whole kv groups, so its qkv row is a contiguous part of the full row. */
static void check_head_slice(const char *name, shape s, int h0, int Hl) {
    const int hpg = s.H / s.G;
    shape l = s;
    l.H = Hl, l.G = Hl / hpg;
    const size_t nq = qkv_n(&s), no = out_n(&s), nl = (size_t)s.B * s.H * s.T;
    const size_t lq = qkv_n(&l), lo = out_n(&l), ll = (size_t)l.B * l.H * l.T, rows = (size_t)s.B * s.T;
    float *qkv = tu_new_randn(nq, 1.0f), *dout = tu_new_randn(no, 1.0f);
    float *out = tu_alloc(no), *lse = tu_alloc(nl), *dqkv = tu_alloc(nq);
    lt_attention_forward(out, lse, qkv, s.B, s.T, s.H, s.G, s.D, s.p, s.key, 0, s.H);
    lt_attention_backward(dqkv, dout, qkv, out, lse, s.B, s.T, s.H, s.G, s.D, s.p, s.key, 0, s.H);

    /* the local qkv row: groups h0 / hpg on, each its hpg query heads, key, value */
    const size_t qcol = (size_t)(h0 / hpg) * (hpg + 2) * s.D, hd = (size_t)s.H * s.D;
    float *lqkv = slice_rows(qkv, rows, nq / rows, qcol, lq / rows);
    float *ldout = slice_rows(dout, rows, hd, (size_t)h0 * s.D, (size_t)Hl * s.D);
    float *want_out = slice_rows(out, rows, hd, (size_t)h0 * s.D, (size_t)Hl * s.D);
    float *want_lse = slice_rows(lse, s.B, (size_t)s.H * s.T, (size_t)h0 * s.T, (size_t)Hl * s.T);
    float *want_dqkv = slice_rows(dqkv, rows, nq / rows, qcol, lq / rows);
    float *lout = tu_alloc(lo), *llse = tu_alloc(ll), *ldqkv = tu_new_garbage(lq);
    lt_attention_forward(lout, llse, lqkv, l.B, l.T, l.H, l.G, l.D, l.p, l.key, h0, s.H);
    lt_attention_backward(ldqkv, ldout, lqkv, lout, llse, l.B, l.T, l.H, l.G, l.D, l.p, l.key, h0, s.H);
    TAP_CHECK(same_bits(lout, want_out, lo), "%s: heads [%d, %d) alone: out bit-identical", name, h0, h0 + Hl);
    TAP_CHECK(same_bits(llse, want_lse, ll), "%s: heads [%d, %d) alone: lse bit-identical", name, h0, h0 + Hl);
    TAP_CHECK(same_bits(ldqkv, want_dqkv, lq), "%s: heads [%d, %d) alone: dqkv bit-identical", name, h0, h0 + Hl);
    /* the check can fail: numbered from head 0 (the offset ignored), the slice draws other masks */
    lt_attention_forward(lout, llse, lqkv, l.B, l.T, l.H, l.G, l.D, l.p, l.key, 0, l.H);
    TAP_CHECK(!same_bits(lout, want_out, lo), "%s: heads numbered from 0 instead: out differs", name);
    free(qkv), free(dout), free(out), free(lse), free(dqkv), free(lqkv), free(ldout), free(want_out);
    free(want_lse), free(want_dqkv), free(lout), free(llse), free(ldqkv);
}

int main(void) {
    /* naive-reference checks, block boundaries crossed: BR = 64 query rows, 16-wide tiles */
    check_vs_naive("MHA B2 T37 H3 G3 D16", (shape){2, 37, 3, 3, 16, 0.0f, 0});
    check_vs_naive("MQA B1 T70 H4 G1 D12", (shape){1, 70, 4, 1, 12, 0.0f, 0});
    check_vs_naive("GQA B2 T130 H4 G2 D8", (shape){2, 130, 4, 2, 8, 0.0f, 0});
    check_vs_naive("MHA B1 T128 H2 G2 D64", (shape){1, 128, 2, 2, 64, 0.0f, 0});
    check_vs_naive("T1 B3 H2 G1 D20", (shape){3, 1, 2, 1, 20, 0.0f, 0});
    check_vs_naive("dropout 0.3 GQA B2 T70 H4 G2 D8", (shape){2, 70, 4, 2, 8, 0.3f, 12345});
    /* finite differences through the real forward */
    check_fd("fd MHA B2 T9 H2 G2 D4", (shape){2, 9, 2, 2, 4, 0.0f, 0});
    check_fd("fd MQA B1 T11 H3 G1 D6", (shape){1, 11, 3, 1, 6, 0.0f, 0});
    check_fd("fd GQA B1 T10 H4 G2 D4", (shape){1, 10, 4, 2, 4, 0.0f, 0});
    check_fd("fd GQA B1 T67 H2 G1 D2", (shape){1, 67, 2, 1, 2, 0.0f, 0});
    check_fd("fd dropout 0.25 GQA B2 T12 H4 G2 D4", (shape){2, 12, 4, 2, 4, 0.25f, 777});
    /* tensor parallelism: the last 2 of 4 heads (MHA: 2 of 4 groups; GQA: 1 of 2 groups), dropout on */
    check_head_slice("slice dropout 0.3 MHA B2 T70 H4 G4 D8", (shape){2, 70, 4, 4, 8, 0.3f, 4242}, 2, 2);
    check_head_slice("slice dropout 0.3 GQA B2 T70 H4 G2 D8", (shape){2, 70, 4, 2, 8, 0.3f, 4242}, 2, 2);

    /* dropout: rate of dropped probabilities, and key changes the mask */
    {
        shape s = {2, 64, 2, 2, 8, 0.2f, 99};
        const shape big = {1, 256, 2, 2, 8, 0.2f, 99}; /* 65792 causal entries: std of the rate ~0.0016 */
        size_t dropped = 0, total = 0;
        for (int h = 0; h < big.H; h++)
            for (int i = 0; i < big.T; i++)
                for (int j = 0; j <= i; j++) dropped += keep_factor(&big, 0, h, i, j) == 0.0, total++;
        double rate = (double)dropped / total;
        TAP_CHECK(fabs(rate - 0.2) < 0.008, "attention dropout mask rate %.4f ~ 0.2", rate);
        const size_t nq = qkv_n(&s), no = out_n(&s);
        float *qkv = tu_new_randn(nq, 1.0f), *o1 = tu_alloc(no), *o2 = tu_alloc(no), *o3 = tu_alloc(no);
        float *lse = tu_alloc((size_t)s.B * s.H * s.T);
        lt_attention_forward(o1, lse, qkv, s.B, s.T, s.H, s.G, s.D, s.p, 99, 0, s.H);
        lt_attention_forward(o2, lse, qkv, s.B, s.T, s.H, s.G, s.D, s.p, 99, 0, s.H);
        lt_attention_forward(o3, lse, qkv, s.B, s.T, s.H, s.G, s.D, s.p, 100, 0, s.H);
        TAP_CHECK(memcmp(o1, o2, no * sizeof(float)) == 0, "attention dropout: same key, identical output");
        TAP_CHECK(tu_max_abs_diff(o1, o3, no) > 1e-3, "attention dropout: another key, another mask");
        free(qkv), free(o1), free(o2), free(o3), free(lse);
    }
    return tap_done();
}

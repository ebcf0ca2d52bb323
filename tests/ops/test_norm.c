/* LayerNorm (with and without bias) and RMSNorm: forward and every gradient vs double references,
 * accumulating onto prefilled buffers; small shapes also vs finite differences, large shapes take
 * the multi-threaded paths (row blocks and weight-gradient column blocks). The per-head norms of a
 * fused qkv buffer (qk_norm) against the plain norms on the gathered query and key rows, and finite
 * differences. */
#include <stdio.h>
#include <string.h>

#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

static const float EPS = 1e-5f;

typedef struct {
    int N, C, rms;
    float *inp, *w, *b, *out, *mean, *rstd, *R;
} ctx_t;

static double loss(void *p) {
    ctx_t *c = p;
    if (c->rms)
        lt_rmsnorm_forward(c->out, c->rstd, c->inp, c->w, c->N, c->C, EPS);
    else
        lt_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C, EPS);
    return tu_dot(c->out, c->R, (size_t)c->N * c->C);
}

static void check(const char *name, int N, int C, int rms, int bias, int fd) {
    ctx_t c = {N,
               C,
               rms,
               tu_new_randn((size_t)N * C, 1.0f),
               tu_new_randn(C, 1.0f),
               bias ? tu_new_randn(C, 1.0f) : NULL,
               tu_alloc((size_t)N * C),
               tu_alloc(N),
               tu_alloc(N),
               tu_new_randn((size_t)N * C, 1.0f)};
    for (int i = 0; i < N * C; i++) c.inp[i] += 0.5f * (float)((i / C) % 9); /* rows with non-zero means */
    loss(&c);
    float *pi, *pw, *pb = NULL, *di = tu_new_grad((size_t)N * C, &pi), *dw = tu_new_grad(C, &pw);
    float *db = bias ? tu_new_grad(C, &pb) : NULL;
    if (rms)
        lt_rmsnorm_backward(di, dw, c.R, c.inp, c.w, c.rstd, N, C);
    else
        lt_layernorm_backward(di, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, N, C);

    /* double reference: y = xhat * w + b, xhat = (x - m) * r; dxhat = dout * w;
     * dinp = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) (no mean(dxhat) term for RMSNorm) */
    double ey = 0, es = 0, ei = 0, ew = 0, eb = 0;
    double *rw = calloc(C, sizeof(double)), *rb = calloc(C, sizeof(double));
    for (int n = 0; n < N; n++) {
        const float *x = c.inp + (size_t)n * C, *g = c.R + (size_t)n * C;
        double m = 0, v = 0, s1 = 0, s2 = 0;
        for (int k = 0; k < C; k++) m += x[k];
        m = rms ? 0 : m / C;
        for (int k = 0; k < C; k++) v += (x[k] - m) * (x[k] - m);
        const double r = 1.0 / sqrt(v / C + EPS);
        for (int k = 0; k < C; k++) {
            const double xh = (x[k] - m) * r, dxh = (double)g[k] * c.w[k];
            ey = fmax(ey, fabs(xh * c.w[k] + (bias ? c.b[k] : 0.0) - c.out[(size_t)n * C + k]));
            s1 += dxh / C, s2 += dxh * xh / C;
            rw[k] += g[k] * xh, rb[k] += g[k];
        }
        es = fmax(es, fabs(r - c.rstd[n]) / r + (rms ? 0 : fabs(m - c.mean[n])));
        for (int k = 0; k < C; k++) {
            const double xh = (x[k] - m) * r, dxh = (double)g[k] * c.w[k];
            const double ref = pi[(size_t)n * C + k] + r * (dxh - (rms ? 0 : s1) - xh * s2);
            ei = fmax(ei, fabs(ref - di[(size_t)n * C + k]));
        }
    }
    for (int k = 0; k < C; k++) {
        ew = fmax(ew, fabs(pw[k] + rw[k] - dw[k]) / sqrt(N));
        if (bias) eb = fmax(eb, fabs(pb[k] + rb[k] - db[k]) / sqrt(N));
    }
    TAP_CHECK(ey < 1e-5, "%s: forward vs double reference (max diff %.2e)", name, ey);
    TAP_CHECK(es < 1e-5, "%s: saved mean/rstd (diff %.2e)", name, es);
    TAP_CHECK(ei < 1e-5 && ew < 1e-5 && eb < 1e-5,
              "%s: accumulated dinp/dweight/dbias vs double reference (%.1e %.1e %.1e)", name, ei, ew, eb);
    if (fd) {
        char what[96];
        snprintf(what, sizeof what, "%s dinp", name);
        tu_check_fd(what, di, pi, c.inp, (size_t)N * C, 1e-2f, loss, &c, 5e-4);
        snprintf(what, sizeof what, "%s dweight", name);
        tu_check_fd(what, dw, pw, c.w, C, 1e-2f, loss, &c, 5e-4);
        if (bias) {
            snprintf(what, sizeof what, "%s dbias", name);
            tu_check_fd(what, db, pb, c.b, C, 1e-2f, loss, &c, 5e-4);
        }
    }
    free(rw), free(rb);
}

/* ---- q_layernorm / k_layernorm on a fused qkv buffer [N, G, H/G + 2, D] ---- */

typedef struct {
    int N, H, G, D, rms;
    float *inp, *qw, *qb, *kw, *kb, *out, *mean, *rstd, *R;
} qk_t;

static size_t qk_numel(const qk_t *c) { return (size_t)c->N * (c->H + 2 * c->G) * c->D; }

static double qk_loss(void *p) {
    qk_t *c = p;
    lt_qk_norm_forward(c->out, c->rms ? NULL : c->mean, c->rstd, c->inp, c->qw, c->qb, c->kw, c->kb, c->N, c->H, c->G,
                       c->D, EPS);
    return tu_dot(c->out, c->R, qk_numel(c));
}

/* Copies the rows of one part (0 query heads, 1 key heads, 2 value heads) of a qkv buffer into dst
 * (gather) or back (scatter). */
static void qk_rows(float *dst, const float *qkv, const qk_t *c, int part, int scatter) {
    const int hpg = c->H / c->G, slots = hpg + 2;
    size_t k = 0;
    for (int n = 0; n < c->N; n++)
        for (int g = 0; g < c->G; g++)
            for (int h = 0; h < slots; h++) {
                const int p = h < hpg ? 0 : h == hpg ? 1 : 2;
                if (p != part) continue;
                float *row = (float *)qkv + (((size_t)n * c->G + g) * slots + h) * c->D;
                if (scatter) memcpy(row, dst + k * c->D, sizeof(float) * c->D);
                else memcpy(dst + k * c->D, row, sizeof(float) * c->D);
                k++;
            }
}

/* The op against the plain norm on the gathered query rows and key rows (value heads: copies), then
 * finite differences. */
static void check_qk(const char *name, int N, int H, int G, int D, int rms, int fd) {
    qk_t c = {N, H, G, D, rms};
    const size_t n = qk_numel(&c), nq = (size_t)N * H * D, nk = (size_t)N * G * D, nr = (size_t)N * (H + G);
    c.inp = tu_new_randn(n, 1.0f);
    for (size_t i = 0; i < n; i++) c.inp[i] += 0.3f * (float)((i / D) % 5); /* rows with non-zero means */
    c.qw = tu_new_randn(D, 1.0f), c.kw = tu_new_randn(D, 1.0f);
    c.qb = rms ? NULL : tu_new_randn(D, 1.0f), c.kb = rms ? NULL : tu_new_randn(D, 1.0f);
    c.out = tu_new_garbage(n), c.mean = tu_alloc(nr), c.rstd = tu_alloc(nr), c.R = tu_new_randn(n, 1.0f);
    qk_loss(&c);

    float *xq = tu_alloc(nq), *xk = tu_alloc(nk), *yq = tu_alloc(nq), *yk = tu_alloc(nk), *gq = tu_alloc(nq),
          *gk = tu_alloc(nk);
    float *m = tu_alloc(nr), *r = tu_alloc(nr), *ref = tu_alloc(n);
    qk_rows(xq, c.inp, &c, 0, 0), qk_rows(xk, c.inp, &c, 1, 0);
    if (rms) {
        lt_rmsnorm_forward(yq, r, xq, c.qw, N * H, D, EPS);
        lt_rmsnorm_forward(yk, r + (size_t)N * H, xk, c.kw, N * G, D, EPS);
    } else {
        lt_layernorm_forward(yq, m, r, xq, c.qw, c.qb, N * H, D, EPS);
        lt_layernorm_forward(yk, m + (size_t)N * H, r + (size_t)N * H, xk, c.kw, c.kb, N * G, D, EPS);
    }
    memcpy(ref, c.inp, sizeof(float) * n); /* the value heads stay */
    qk_rows(yq, ref, &c, 0, 1), qk_rows(yk, ref, &c, 1, 1);
    double ey = tu_max_abs_diff(ref, c.out, n), es = tu_max_abs_diff(r, c.rstd, nr);
    if (!rms) es = fmax(es, tu_max_abs_diff(m, c.mean, nr));
    TAP_CHECK(ey < 1e-5 && es < 1e-5, "%s: forward = the plain norm on the query and key heads, values copied (%.1e %.1e)",
              name, ey, es);

    /* backward: dinp written over garbage; weight gradients accumulate onto prefills */
    float *pqw, *pkw, *pqb = NULL, *pkb = NULL;
    float *di = tu_new_garbage(n), *dqw = tu_new_grad(D, &pqw), *dkw = tu_new_grad(D, &pkw);
    float *dqb = rms ? NULL : tu_new_grad(D, &pqb), *dkb = rms ? NULL : tu_new_grad(D, &pkb);
    lt_qk_norm_backward(di, dqw, dqb, dkw, dkb, c.R, c.inp, c.qw, c.kw, rms ? NULL : c.mean, c.rstd, N, H, G, D);
    float *rqw = tu_copy(pqw, D), *rkw = tu_copy(pkw, D), *rqb = rms ? NULL : tu_copy(pqb, D),
          *rkb = rms ? NULL : tu_copy(pkb, D);
    float *dq = tu_alloc(nq), *dk = tu_alloc(nk);
    memset(dq, 0, sizeof(float) * nq), memset(dk, 0, sizeof(float) * nk);
    qk_rows(gq, c.R, &c, 0, 0), qk_rows(gk, c.R, &c, 1, 0);
    if (rms) {
        lt_rmsnorm_backward(dq, rqw, gq, xq, c.qw, r, N * H, D);
        lt_rmsnorm_backward(dk, rkw, gk, xk, c.kw, r + (size_t)N * H, N * G, D);
    } else {
        lt_layernorm_backward(dq, rqw, rqb, gq, xq, c.qw, m, r, N * H, D);
        lt_layernorm_backward(dk, rkw, rkb, gk, xk, c.kw, m + (size_t)N * H, r + (size_t)N * H, N * G, D);
    }
    memcpy(ref, c.R, sizeof(float) * n); /* the value heads' gradient passes through */
    qk_rows(dq, ref, &c, 0, 1), qk_rows(dk, ref, &c, 1, 1);
    double ei = tu_max_abs_diff(ref, di, n), ew = fmax(tu_max_abs_diff(rqw, dqw, D), tu_max_abs_diff(rkw, dkw, D));
    double eb = rms ? 0 : fmax(tu_max_abs_diff(rqb, dqb, D), tu_max_abs_diff(rkb, dkb, D));
    TAP_CHECK(ei < 1e-5 && ew < 1e-4 && eb < 1e-4,
              "%s: backward = the plain norms' (dinp written, weight gradients accumulated) (%.1e %.1e %.1e)", name, ei,
              ew, eb);
    if (fd) {
        char what[96];
        float *zeros = tu_alloc(n);
        memset(zeros, 0, sizeof(float) * n);
        snprintf(what, sizeof what, "%s dinp", name);
        tu_check_fd(what, di, zeros, c.inp, n, 1e-2f, qk_loss, &c, 5e-4);
        snprintf(what, sizeof what, "%s dqweight", name);
        tu_check_fd(what, dqw, pqw, c.qw, D, 1e-2f, qk_loss, &c, 5e-4);
        snprintf(what, sizeof what, "%s dkweight", name);
        tu_check_fd(what, dkw, pkw, c.kw, D, 1e-2f, qk_loss, &c, 5e-4);
        if (!rms) {
            snprintf(what, sizeof what, "%s dqbias", name);
            tu_check_fd(what, dqb, pqb, c.qb, D, 1e-2f, qk_loss, &c, 5e-4);
            snprintf(what, sizeof what, "%s dkbias", name);
            tu_check_fd(what, dkb, pkb, c.kb, D, 1e-2f, qk_loss, &c, 5e-4);
        }
        free(zeros);
    }
}

int main(void) {
    check("layernorm 7x45", 7, 45, 0, 1, 1);
    check("layernorm no bias 7x45", 7, 45, 0, 0, 1);
    check("rmsnorm 7x45", 7, 45, 1, 0, 1);
    check("layernorm 301x130 (threaded)", 301, 130, 0, 1, 0);
    check("layernorm no bias 301x130 (threaded)", 301, 130, 0, 0, 0);
    check("rmsnorm 301x130 (threaded)", 301, 130, 1, 0, 0);
    check_qk("qk layernorm N=3 H=4 G=2 D=6", 3, 4, 2, 6, 0, 1);
    check_qk("qk rmsnorm N=3 H=3 G=1 D=8", 3, 3, 1, 8, 1, 1);
    check_qk("qk layernorm N=5 H=2 G=2 D=5", 5, 2, 2, 5, 0, 1);
    check_qk("qk layernorm N=512 H=8 G=2 D=64 (threaded)", 512, 8, 2, 64, 0, 0);
    check_qk("qk rmsnorm N=512 H=8 G=4 D=64 (threaded)", 512, 8, 4, 64, 1, 0);
    return tap_done();
}

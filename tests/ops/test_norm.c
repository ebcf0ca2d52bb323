/* LayerNorm (with and without bias) and RMSNorm: forward and every gradient vs double references,
 * accumulating onto prefilled buffers; small shapes also vs finite differences, large shapes take
 * the multi-threaded paths (row blocks and weight-gradient column blocks). */
#include <stdio.h>

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

int main(void) {
    check("layernorm 7x45", 7, 45, 0, 1, 1);
    check("layernorm no bias 7x45", 7, 45, 0, 0, 1);
    check("rmsnorm 7x45", 7, 45, 1, 0, 1);
    check("layernorm 301x130 (threaded)", 301, 130, 0, 1, 0);
    check("layernorm no bias 301x130 (threaded)", 301, 130, 0, 0, 0);
    check("rmsnorm 301x130 (threaded)", 301, 130, 1, 0, 0);
    return tap_done();
}

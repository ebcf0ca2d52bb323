/* Linear (sgemm) forward vs a naive loop; dinp, dweight, dbias vs finite differences with and
 * without bias, dinp NULL; the forward's residual (separate, and out itself); lt_matmul in all four
 * transpose combinations with alpha and beta. */
#include <stdio.h>

#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

typedef struct {
    int N, IN, OUT;
    float *inp, *w, *b, *out, *R;
} ctx_t;

static double loss(void *p) {
    ctx_t *c = p;
    lt_linear_forward(c->out, c->inp, c->w, c->b, NULL, c->N, c->IN, c->OUT);
    return tu_dot(c->out, c->R, (size_t)c->N * c->OUT);
}

/* Forward and every gradient vs naive double loops; with fd, also vs finite differences (each element
 * costs two sgemm calls, so fd runs on small shapes). */
static void check(const char *name, int N, int IN, int OUT, int bias, int with_dinp, int fd) {
    ctx_t c = {N,
               IN,
               OUT,
               tu_new_randn((size_t)N * IN, 1.0f),
               tu_new_randn((size_t)OUT * IN, 1.0f),
               bias ? tu_new_randn(OUT, 1.0f) : NULL,
               tu_new_randn((size_t)N * OUT, 1.0f),
               tu_new_randn((size_t)N * OUT, 1.0f)};
    loss(&c); /* out held garbage: forward must overwrite it */
    double maxd = 0;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            double s = bias ? c.b[o] : 0.0;
            for (int i = 0; i < IN; i++) s += (double)c.inp[n * IN + i] * c.w[o * IN + i];
            maxd = fmax(maxd, fabs(s - c.out[n * OUT + o]));
        }
    TAP_CHECK(maxd < 1e-5 * sqrt(IN), "%s: forward vs naive (max diff %.2e)", name, maxd);
    /* dinp is written (it starts as garbage), dweight and dbias accumulate onto a prefill */
    float *di = with_dinp ? tu_new_garbage((size_t)N * IN) : NULL, *pi = NULL, *pw, *pb = NULL;
    if (with_dinp) {
        pi = tu_alloc((size_t)N * IN);
        for (size_t i = 0; i < (size_t)N * IN; i++) pi[i] = 0.0f;
    }
    float *dw = tu_new_grad((size_t)OUT * IN, &pw), *db = bias ? tu_new_grad(OUT, &pb) : NULL;
    lt_linear_backward(di, dw, db, c.R, c.inp, c.w, N, IN, OUT);
    /* naive: dinp = R W; dW = R^T inp and db = column sums of R on top of their prefills */
    double ei = 0, ew = 0, eb = 0;
    for (int n = 0; n < N && with_dinp; n++)
        for (int i = 0; i < IN; i++) {
            double s = 0.0;
            for (int o = 0; o < OUT; o++) s += (double)c.R[n * OUT + o] * c.w[o * IN + i];
            ei = tu_worse(ei, fabs(s - di[n * IN + i])); /* NaN: a junk element left */
        }
    for (int o = 0; o < OUT; o++) {
        for (int i = 0; i < IN; i++) {
            double s = pw[o * IN + i];
            for (int n = 0; n < N; n++) s += (double)c.R[n * OUT + o] * c.inp[n * IN + i];
            ew = fmax(ew, fabs(s - dw[o * IN + i]));
        }
        if (bias) {
            double s = pb[o];
            for (int n = 0; n < N; n++) s += c.R[n * OUT + o];
            eb = fmax(eb, fabs(s - db[o]));
        }
    }
    TAP_CHECK(ei < 1e-5 * sqrt(OUT) && ew < 1e-5 * sqrt(N) && eb < 1e-5 * sqrt(N),
              "%s: written dinp, accumulated dweight/dbias vs naive (max diff %.1e %.1e %.1e)", name, ei, ew, eb);
    if (fd) {
        char what[96];
        if (with_dinp) {
            snprintf(what, sizeof what, "%s dinp", name);
            tu_check_fd(what, di, pi, c.inp, (size_t)N * IN, 1e-2f, loss, &c, 5e-4);
        }
        snprintf(what, sizeof what, "%s dweight", name);
        tu_check_fd(what, dw, pw, c.w, (size_t)OUT * IN, 1e-2f, loss, &c, 5e-4);
        if (bias) {
            snprintf(what, sizeof what, "%s dbias", name);
            tu_check_fd(what, db, pb, c.b, OUT, 1e-2f, loss, &c, 5e-4);
        }
    }
}

/* out = inp W^T + bias + residual, with the residual a separate buffer or out itself (in place). */
static void check_residual(int N, int IN, int OUT, int bias, int in_place) {
    const size_t no = (size_t)N * OUT;
    float *inp = tu_new_randn((size_t)N * IN, 1.0f), *w = tu_new_randn((size_t)OUT * IN, 1.0f);
    float *b = bias ? tu_new_randn(OUT, 1.0f) : NULL, *res = tu_new_randn(no, 1.0f), *r0 = tu_copy(res, no);
    float *out = in_place ? res : tu_new_garbage(no);
    lt_linear_forward(out, inp, w, b, res, N, IN, OUT);
    double maxd = 0;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            double s = r0[n * OUT + o] + (bias ? b[o] : 0.0);
            for (int i = 0; i < IN; i++) s += (double)inp[n * IN + i] * w[o * IN + i];
            maxd = tu_worse(maxd, fabs(s - out[n * OUT + o]));
        }
    TAP_CHECK(maxd < 1e-5 * sqrt(IN), "linear residual%s%s: forward vs naive (max diff %.2e)", bias ? " + bias" : "",
              in_place ? ", in place (residual == out)" : "", maxd);
}

static void check_matmul(int ta, int tb) {
    const int M = 5, Nn = 7, K = 4;
    const float alpha = 0.75f, beta = -0.5f;
    float *a = tu_new_randn((size_t)M * K, 1.0f), *b = tu_new_randn((size_t)K * Nn, 1.0f);
    float *c = tu_new_randn((size_t)M * Nn, 1.0f), *c0 = tu_copy(c, (size_t)M * Nn);
    lt_matmul(c, a, b, M, Nn, K, ta, tb, alpha, beta);
    double maxd = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < Nn; j++) {
            double s = 0;
            for (int k = 0; k < K; k++)
                s += (double)(ta ? a[k * M + i] : a[i * K + k]) * (tb ? b[j * K + k] : b[k * Nn + j]);
            double d = fabs(alpha * s + beta * c0[i * Nn + j] - c[i * Nn + j]);
            if (d > maxd) maxd = d;
        }
    TAP_CHECK(maxd < 1e-5, "matmul trans_a=%d trans_b=%d alpha/beta vs naive (max diff %.2e)", ta, tb, maxd);
}

int main(void) {
    /* OUT = 70 spans two bias-gradient column blocks */
    check("linear bias", 4, 5, 70, 1, 1, 1);
    check("linear no bias", 4, 5, 70, 0, 1, 1);
    check("linear dinp NULL", 4, 5, 70, 1, 0, 1);
    check("linear bias 67x96x520 (threaded bias)", 67, 96, 520, 1, 1, 0);
    check("linear dinp NULL 67x96x520 (threaded bias)", 67, 96, 520, 1, 0, 0);
    check_residual(67, 96, 520, 1, 0);
    check_residual(67, 96, 520, 0, 0);
    check_residual(4, 5, 70, 1, 1);
    check_residual(4, 5, 70, 0, 1);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) check_matmul(ta, tb);
    return tap_done();
}

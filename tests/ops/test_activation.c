/* Softmax, GELU (exact erf, and the tanh approximation), SwiGLU and add: forward vs double references, backward vs finite
 * differences. Softmax, GELU and SwiGLU write dinp (prefilled with garbage, which must not survive);
 * add accumulates (onto a prefill). */
#include <stdio.h>

#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

enum { N = 6, C = 37, F = 29 };

static float *x, *y, *R, *a2, *b2; /* inputs, output, loss weights */

static double softmax_loss(void *p) {
    (void)p;
    lt_softmax_forward(y, x, N, C);
    return tu_dot(y, R, (size_t)N * C);
}
static double gelu_loss(void *p) {
    (void)p;
    lt_gelu_forward(y, x, (int64_t)N * C);
    return tu_dot(y, R, (size_t)N * C);
}
static double gelu_tanh_loss(void *p) {
    (void)p;
    lt_gelu_tanh_forward(y, x, (int64_t)N * C);
    return tu_dot(y, R, (size_t)N * C);
}
static double swiglu_loss(void *p) {
    (void)p;
    lt_swiglu_forward(y, x, N, F);
    return tu_dot(y, R, (size_t)N * F);
}
static double add_loss(void *p) {
    (void)p;
    lt_add_forward(y, a2, b2, (int64_t)N * C);
    return tu_dot(y, R, (size_t)N * C);
}

int main(void) {
    const size_t nc = (size_t)N * C;
    x = tu_new_randn(2 * nc, 2.0f), y = tu_alloc(nc), R = tu_new_randn(nc, 1.0f);
    float *g, *zero = tu_alloc(2 * nc);

    /* softmax */
    softmax_loss(NULL);
    double maxd = 0;
    for (int n = 0; n < N; n++) {
        double m = -INFINITY, s = 0;
        for (int c = 0; c < C; c++) m = fmax(m, x[n * C + c]);
        for (int c = 0; c < C; c++) s += exp(x[n * C + c] - m);
        for (int c = 0; c < C; c++) maxd = fmax(maxd, fabs(exp(x[n * C + c] - m) / s - y[n * C + c]));
    }
    TAP_CHECK(maxd < 1e-6, "softmax forward vs double (max diff %.2e)", maxd);
    g = tu_new_garbage(nc);
    lt_softmax_backward(g, R, y, N, C);
    tu_check_fd("softmax dinp (written over garbage)", g, zero, x, nc, 1e-2f, softmax_loss, NULL, 5e-4);
    free(g);

    /* gelu: exact erf form, including large |x| */
    for (int i = 0; i < 4; i++) x[i] = (i % 2 ? 1.0f : -1.0f) * (6.0f + i);
    gelu_loss(NULL);
    maxd = 0;
    for (size_t i = 0; i < nc; i++) maxd = fmax(maxd, fabs(0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0))) - y[i]));
    TAP_CHECK(maxd < 2e-6, "gelu forward vs 0.5 x (1 + erf(x / sqrt 2)) (max diff %.2e)", maxd);
    g = tu_new_garbage(nc);
    lt_gelu_backward(g, R, x, (int64_t)nc);
    tu_check_fd("gelu dinp (written over garbage)", g, zero, x, nc, 1e-2f, gelu_loss, NULL, 5e-4);
    free(g);

    /* gelu, tanh approximation (the same inputs, large |x| included) */
    gelu_tanh_loss(NULL);
    maxd = 0;
    for (size_t i = 0; i < nc; i++) {
        const double v = x[i], t = tanh(sqrt(2.0 / 3.14159265358979323846) * (v + 0.044715 * v * v * v));
        maxd = tu_worse(maxd, fabs(0.5 * v * (1.0 + t) - y[i]));
    }
    TAP_CHECK(maxd < 2e-6, "gelu_tanh forward vs 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (max diff %.2e)",
              maxd);
    g = tu_new_garbage(nc);
    lt_gelu_tanh_backward(g, R, x, (int64_t)nc);
    tu_check_fd("gelu_tanh dinp (written over garbage)", g, zero, x, nc, 1e-2f, gelu_tanh_loss, NULL, 5e-4);
    free(g);

    /* swiglu on [N, 2F] */
    swiglu_loss(NULL);
    maxd = 0;
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) {
            double a = x[n * 2 * F + f], b = x[n * 2 * F + F + f];
            maxd = fmax(maxd, fabs(a / (1 + exp(-a)) * b - y[n * F + f]));
        }
    TAP_CHECK(maxd < 1e-5, "swiglu forward vs silu(a) * b (max diff %.2e)", maxd);
    g = tu_new_garbage((size_t)N * 2 * F);
    lt_swiglu_backward(g, R, x, N, F);
    tu_check_fd("swiglu dinp (both halves, written over garbage)", g, zero, x, (size_t)N * 2 * F, 1e-2f, swiglu_loss,
                NULL, 5e-4);
    free(g);

    /* add, including out aliasing an input, and nullable gradients */
    a2 = tu_new_randn(nc, 1.0f), b2 = tu_new_randn(nc, 1.0f);
    add_loss(NULL);
    int ok = 1;
    for (size_t i = 0; i < nc; i++) ok &= y[i] == a2[i] + b2[i];
    float *alias = tu_copy(a2, nc);
    lt_add_forward(alias, alias, b2, (int64_t)nc);
    ok &= memcmp(alias, y, nc * sizeof(float)) == 0;
    TAP_CHECK(ok, "add forward, also in place");
    float *pa, *pb, *ga = tu_new_grad(nc, &pa), *gb = tu_new_grad(nc, &pb);
    lt_add_backward(ga, gb, R, (int64_t)nc);
    tu_check_fd("add da", ga, pa, a2, nc, 1e-2f, add_loss, NULL, 5e-4);
    tu_check_fd("add db", gb, pb, b2, nc, 1e-2f, add_loss, NULL, 5e-4);
    float *gb2 = tu_copy(pb, nc);
    lt_add_backward(NULL, gb2, R, (int64_t)nc);
    TAP_CHECK(memcmp(gb2, gb, nc * sizeof(float)) == 0, "add backward with da NULL");
    /* threaded size: forwards and backwards vs double formulas */
    {
        enum { NB = 200, CB = 300 }; /* swiglu: F = CB / 2 */
        const size_t nb = (size_t)NB * CB;
        float *xb = tu_new_randn(nb, 2.0f), *gb = tu_new_randn(nb, 1.0f), *yb = tu_alloc(nb);
        float *db = tu_new_garbage(nb); /* each backward writes dinp over garbage */
        double es = 0, esb = 0, eg = 0, egb = 0, ew = 0, ewb = 0;
        lt_softmax_forward(yb, xb, NB, CB);
        lt_softmax_backward(db, gb, yb, NB, CB);
        for (int n = 0; n < NB; n++) {
            const float *xr = xb + (size_t)n * CB, *gr = gb + (size_t)n * CB;
            double m = -INFINITY, s = 0, dot = 0;
            for (int c = 0; c < CB; c++) m = fmax(m, xr[c]);
            for (int c = 0; c < CB; c++) s += exp(xr[c] - m);
            for (int c = 0; c < CB; c++) dot += gr[c] * exp(xr[c] - m) / s;
            for (int c = 0; c < CB; c++) {
                const double p = exp(xr[c] - m) / s;
                es = fmax(es, fabs(p - yb[(size_t)n * CB + c]));
                esb = tu_worse(esb, fabs(p * (gr[c] - dot) - db[(size_t)n * CB + c]));
            }
        }
        free(db), db = tu_new_garbage(nb);
        lt_gelu_forward(yb, xb, (int64_t)nb);
        lt_gelu_backward(db, gb, xb, (int64_t)nb);
        for (size_t i = 0; i < nb; i++) {
            const double v = xb[i], cdf = 0.5 * (1 + erf(v / sqrt(2.0))), pdf = exp(-0.5 * v * v) / 2.5066282746310002;
            eg = fmax(eg, fabs(v * cdf - yb[i]));
            egb = tu_worse(egb, fabs(gb[i] * (cdf + v * pdf) - db[i]));
        }
        free(db), db = tu_new_garbage(nb);
        const int FB = CB / 2;
        lt_swiglu_forward(yb, xb, NB, FB);
        lt_swiglu_backward(db, gb, xb, NB, FB);
        for (int n = 0; n < NB; n++)
            for (int f = 0; f < FB; f++) {
                const double a = xb[(size_t)n * CB + f], bb = xb[(size_t)n * CB + FB + f], s = 1 / (1 + exp(-a));
                const double g = gb[(size_t)n * FB + f];
                ew = fmax(ew, fabs(a * s * bb - yb[(size_t)n * FB + f]));
                ewb = tu_worse(ewb, fabs(g * bb * s * (1 + a * (1 - s)) - db[(size_t)n * CB + f]) +
                                        fabs(g * a * s - db[(size_t)n * CB + FB + f]));
            }
        TAP_CHECK(es < 1e-6 && esb < 1e-6, "threaded softmax %dx%d vs double (%.1e %.1e)", NB, CB, es, esb);
        TAP_CHECK(eg < 2e-6 && egb < 2e-6, "threaded gelu vs double (%.1e %.1e)", eg, egb);
        TAP_CHECK(ew < 1e-5 && ewb < 1e-5, "threaded swiglu vs double (%.1e %.1e)", ew, ewb);
    }
    return tap_done();
}

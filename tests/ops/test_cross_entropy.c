/* Fused softmax cross-entropy: loss and lse vs a naive log-softmax, ignored targets (< 0), backward
 * written (not accumulated) and in place (dlogits == logits), vs finite differences; large logits. */
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

enum { N = 7, V = 53 };
static const int32_t targets[N] = {3, -100, 52, 0, 17, -1, 3};
static float *logits, *losses, *lse, *dloss;

static double loss(void *p) { /* L = sum_n dloss[n] * loss[n] */
    (void)p;
    lt_cross_entropy_forward(losses, lse, logits, targets, N, V);
    return tu_dot(losses, dloss, N);
}

int main(void) {
    logits = tu_new_randn((size_t)N * V, 3.0f), losses = tu_alloc(N), lse = tu_alloc(N), dloss = tu_new_randn(N, 1.0f);
    loss(NULL);
    double maxl = 0, maxs = 0;
    int ignored_ok = 1;
    for (int n = 0; n < N; n++) {
        double m = -INFINITY, s = 0;
        for (int v = 0; v < V; v++) m = fmax(m, logits[n * V + v]);
        for (int v = 0; v < V; v++) s += exp(logits[n * V + v] - m);
        const double l = m + log(s);
        maxs = fmax(maxs, fabs(l - lse[n]));
        if (targets[n] >= 0)
            maxl = fmax(maxl, fabs((l - logits[n * V + targets[n]]) - losses[n]));
        else
            ignored_ok &= losses[n] == 0.0f;
    }
    TAP_CHECK(maxl < 1e-5, "loss vs naive -log_softmax[target] (max diff %.2e)", maxl);
    TAP_CHECK(maxs < 1e-5, "saved lse vs naive (max diff %.2e)", maxs);
    TAP_CHECK(ignored_ok, "targets < 0 give loss 0");

    /* backward writes: prefilled garbage must not leak into the result */
    const size_t nv = (size_t)N * V;
    float *d = tu_new_randn(nv, 5.0f), *zero = tu_alloc(nv);
    lt_cross_entropy_backward(d, logits, lse, targets, dloss, N, V);
    int rows_zero = 1;
    for (int v = 0; v < V; v++) rows_zero &= d[1 * V + v] == 0.0f && d[5 * V + v] == 0.0f;
    TAP_CHECK(rows_zero, "ignored rows get zero gradient");
    tu_check_fd("dlogits (written, not accumulated)", d, zero, logits, nv, 1e-2f, loss, NULL, 5e-4);

    /* in place: the logits buffer becomes its own gradient, identical to the out-of-place result */
    loss(NULL);
    lt_cross_entropy_backward(d, logits, lse, targets, dloss, N, V);
    float *inplace = tu_copy(logits, nv);
    lt_cross_entropy_backward(inplace, inplace, lse, targets, dloss, N, V);
    TAP_CHECK(memcmp(inplace, d, nv * sizeof(float)) == 0, "backward with dlogits == logits matches out of place");

    /* shift invariance with large logits: no overflow, same losses */
    float *l0 = tu_copy(losses, N);
    for (size_t i = 0; i < nv; i++) logits[i] += 1000.0f;
    loss(NULL);
    double e = 0;
    int finite = 1;
    for (int n = 0; n < N; n++) e = fmax(e, fabs(losses[n] - l0[n])), finite &= isfinite(lse[n]);
    TAP_CHECK(finite && e < 1e-3, "logits + 1000: finite, same losses (max diff %.2e)", e);
    /* a target >= V is another rank's column (vocabulary parallelism): loss 0, and the gradient is the
     * softmax part alone (a row with the target equals the same row with it, plus dloss at the target) */
    {
        const int32_t elsewhere[2] = {V, 3};
        float l2[2], s2[2], g2[2] = {0.7f, 0.7f}, *d2 = tu_alloc(2 * (size_t)V);
        float *two = tu_alloc(2 * (size_t)V);
        memcpy(two, logits, sizeof(float) * V);
        memcpy(two + V, logits, sizeof(float) * V);
        lt_cross_entropy_forward(l2, s2, two, elsewhere, 2, V);
        lt_cross_entropy_backward(d2, two, s2, elsewhere, g2, 2, V);
        int softmax_only = l2[0] == 0.0f && s2[0] == s2[1];
        for (int v = 0; v < V; v++) softmax_only &= d2[v] == d2[V + v] + (v == 3 ? 0.7f : 0.0f) || v == 3;
        softmax_only &= fabsf(d2[3] - (d2[V + 3] + 0.7f)) < 1e-6f;
        TAP_CHECK(softmax_only, "target V (another rank's column): loss 0, the softmax part of the gradient only");
    }
    /* threaded size: losses and gradient vs double formulas */
    {
        enum { NB = 64, VB = 1000 };
        float *lg = tu_new_randn((size_t)NB * VB, 2.0f), *ls = tu_alloc(NB), *le = tu_alloc(NB),
              *dl = tu_new_randn(NB, 1.0f);
        int32_t tg[NB];
        for (int n = 0; n < NB; n++) tg[n] = n % 5 == 0 ? -1 : (n * 131) % VB;
        float *dg = tu_alloc((size_t)NB * VB);
        lt_cross_entropy_forward(ls, le, lg, tg, NB, VB);
        lt_cross_entropy_backward(dg, lg, le, tg, dl, NB, VB);
        double el = 0, eg = 0;
        for (int n = 0; n < NB; n++) {
            const float *x = lg + (size_t)n * VB;
            double m = -INFINITY, s = 0;
            for (int v = 0; v < VB; v++) m = fmax(m, x[v]);
            for (int v = 0; v < VB; v++) s += exp(x[v] - m);
            const double l = m + log(s);
            el = fmax(el, fabs((tg[n] >= 0 ? l - x[tg[n]] : 0.0) - ls[n]));
            for (int v = 0; v < VB; v++) {
                const double ref = tg[n] < 0 ? 0.0 : (exp(x[v] - l) - (v == tg[n])) * dl[n];
                eg = fmax(eg, fabs(ref - dg[(size_t)n * VB + v]));
            }
        }
        TAP_CHECK(el < 1e-5 && eg < 1e-6, "threaded %dx%d: losses and dlogits vs double (%.1e %.1e)", NB, VB, el, eg);
    }
    return tap_done();
}

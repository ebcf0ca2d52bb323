/* Shared helpers for the op tests: deterministic random data, naive-reference comparison,
 * and central finite differences of a scalar loss L = sum(out * R). */
#ifndef LT_TESTS_OPS_TESTUTIL_H
#define LT_TESTS_OPS_TESTUTIL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/rng.h"
#include "tests/tap.h"

static uint64_t tu_counter;

static float *tu_alloc(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) abort();
    return p;
}

/* Fill with N(0, std^2) values from a fixed stream: every run sees the same data. */
static void tu_randn(float *x, size_t n, float std) {
    lt_rng_fill_normal(x, (int64_t)n, 0x7e57ull, tu_counter, 0.0f, std);
    tu_counter += n;
}
static float *tu_new_randn(size_t n, float std) {
    float *x = tu_alloc(n);
    tu_randn(x, n, std);
    return x;
}
static float *tu_copy(const float *x, size_t n) {
    float *y = tu_alloc(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

static double tu_dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* max |a - b| / max |b| over the vectors (b is the reference). */
static double tu_rel_err(const float *a, const double *b, size_t n) {
    double num = 0.0, den = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return num / den;
}
static double tu_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m || isnan(d)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

/* max(m, d) where a NaN d counts as infinite (fmax alone would drop it). */
static double tu_worse(double m, double d) { return isnan(d) ? INFINITY : fmax(m, d); }

/* Loss callback: recompute the forward from the current inputs, return sum(out * R) in double. */
typedef double (*tu_loss_fn)(void *ctx);

/* Central differences of loss w.r.t. x[i] for i < n; numeric[i] filled. */
static void tu_numgrad(double *numeric, float *x, size_t n, float eps, tu_loss_fn loss, void *ctx) {
    for (size_t i = 0; i < n; i++) {
        const float x0 = x[i];
        x[i] = x0 + eps;
        const double lp = loss(ctx);
        x[i] = x0 - eps;
        const double lm = loss(ctx);
        x[i] = x0;
        numeric[i] = (lp - lm) / (2.0 * (double)eps);
    }
}

/* Gradients that accumulate (weights, a norm's dinp) start non-zero so the checks also prove the +=. */
static float *tu_new_grad(size_t n, float **prefill) {
    float *g = tu_new_randn(n, 1.0f);
    *prefill = tu_copy(g, n);
    return g;
}
/* Gradients that are written (activations) start as garbage: NaN, +-1e30 and inf in turn, which an op
 * that read or added to them, or skipped an element, would leave in its result. */
static float *tu_new_garbage(size_t n) {
    static const float junk[4] = {NAN, 1e30f, -1e30f, INFINITY};
    float *g = tu_alloc(n);
    for (size_t i = 0; i < n; i++) g[i] = junk[i % 4];
    return g;
}
/* analytic = buffer - prefill, compared with the finite differences. */
static void tu_check_fd(const char *what, const float *grad, const float *prefill, float *x, size_t n, float eps,
                        tu_loss_fn loss, void *ctx, double tol) {
    double *num = malloc(n * sizeof(double));
    float *ana = tu_alloc(n);
    for (size_t i = 0; i < n; i++) ana[i] = grad[i] - prefill[i];
    tu_numgrad(num, x, n, eps, loss, ctx);
    double e = tu_rel_err(ana, num, n);
    TAP_CHECK(e < tol, "%s: gradient (buffer minus prefill) vs finite differences (rel err %.2e, tol %.0e)", what, e,
              tol);
    free(num);
    free(ana);
}
#endif

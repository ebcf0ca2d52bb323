/* AdamW (one and two steps) and SGD with momentum vs the PyTorch update formulas written out in
 * double; sum of squares in double; in-place scaling. */
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

enum { N = 100000 }; /* above the threading threshold */

int main(void) {
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    float *p = tu_new_randn(N, 1.0f), *m = tu_alloc(N), *v = tu_alloc(N);
    float *g1 = tu_new_randn(N, 1.0f), *g2 = tu_new_randn(N, 1.0f);
    double *rp = malloc(N * sizeof(double)), *rm = calloc(N, sizeof(double)), *rv = calloc(N, sizeof(double));
    for (int i = 0; i < N; i++) rp[i] = p[i];
    for (int step = 1; step <= 2; step++) {
        const float *g = step == 1 ? g1 : g2;
        lt_adamw_update(p, g, m, v, N, lr, b1, b2, eps, wd, step);
        /* torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
         * p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps) */
        double maxd = 0, maxm = 0, maxv = 0;
        for (int i = 0; i < N; i++) {
            rp[i] *= 1.0 - (double)lr * wd;
            rm[i] = b1 * rm[i] + (1.0 - b1) * g[i];
            rv[i] = b2 * rv[i] + (1.0 - b2) * (double)g[i] * g[i];
            const double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
            rp[i] -= lr / bc1 * rm[i] / (sqrt(rv[i]) / sqrt(bc2) + eps);
            maxd = fmax(maxd, fabs(rp[i] - p[i]));
            maxm = fmax(maxm, fabs(rm[i] - m[i]));
            maxv = fmax(maxv, fabs(rv[i] - v[i]));
        }
        /* an Adam step moves each parameter by about lr; errors must be far below that */
        TAP_CHECK(maxd < 1e-6 && maxm < 1e-6 && maxv < 1e-6,
                  "adamw step %d vs PyTorch formula (param %.2e, exp_avg %.2e, exp_avg_sq %.2e)", step, maxd, maxm,
                  maxv);
    }

    /* SGD with momentum and weight decay, two steps (the buffer starts at zero) */
    const float mom = 0.9f, swd = 0.01f;
    float *sp = tu_new_randn(N, 1.0f), *buf = tu_alloc(N);
    double *rsp = malloc(N * sizeof(double)), *rb = calloc(N, sizeof(double));
    for (int i = 0; i < N; i++) rsp[i] = sp[i];
    double maxs = 0;
    for (int step = 1; step <= 2; step++) {
        const float *g = step == 1 ? g1 : g2;
        lt_sgd_update(sp, g, buf, N, lr, mom, swd);
        for (int i = 0; i < N; i++) {
            rb[i] = mom * rb[i] + g[i] + swd * rsp[i];
            rsp[i] -= lr * rb[i];
            maxs = fmax(maxs, fabs(rsp[i] - sp[i]) + fabs(rb[i] - buf[i]));
        }
    }
    TAP_CHECK(maxs < 1e-6, "sgd momentum two steps vs PyTorch formula (max diff %.2e)", maxs);
    float *q = tu_copy(sp, N);
    double maxq = 0;
    lt_sgd_update(q, g1, NULL, N, lr, 0.0f, swd);
    for (int i = 0; i < N; i++) maxq = fmax(maxq, fabs((sp[i] - lr * (g1[i] + swd * (double)sp[i])) - q[i]));
    TAP_CHECK(maxq < 1e-6, "sgd without momentum, NULL buffer (max diff %.2e)", maxq);

    /* sum of squares in double, and scale */
    const int64_t big = 3000001;
    float *x = tu_new_randn((size_t)big, 1.0f);
    double ref = 0;
    for (int64_t i = 0; i < big; i++) ref += (double)x[i] * x[i];
    double got = lt_sum_squares(x, big);
    TAP_CHECK(fabs(got - ref) / ref < 1e-12, "sum_squares vs double loop (rel %.2e)", fabs(got - ref) / ref);
    float *xs = tu_copy(x, (size_t)big);
    lt_scale(xs, big, -0.37f);
    int ok = 1;
    for (int64_t i = 0; i < big; i++) ok &= xs[i] == x[i] * -0.37f;
    TAP_CHECK(ok, "scale multiplies in place");
    return tap_done();
}

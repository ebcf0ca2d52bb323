/* The CUDA backend against the CPU reference. Without a GPU (no driver, no device) every check
 * reports itself as skipped, so CPU-only machines build and pass; on the lent GPU it runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "engine/ops/cuda/device.h"
#include "engine/ops/ops.h"
#include "tests/tap.h"

int main(void) {
    char err[256] = "";
    int n = lt_cuda_device_count(err, sizeof err);
    if (n == 0) {
        printf("ok 1 - CUDA AdamW matches the CPU kernel # SKIP %s\n1..1\n", err[0] ? err : "no GPU");
        return 0;
    }
    char desc[256];
    lt_cuda_device_describe(0, desc, sizeof desc);
    printf("# device 0: %s\n", desc);
    enum { N = 100003 };
    float *p = malloc(sizeof(float) * N * 8), *g = p + N, *m = g + N, *v = m + N, *p2 = v + N, *m2 = p2 + N,
          *v2 = m2 + N, *back = v2 + N;
    for (int i = 0; i < N; i++) {
        p[i] = p2[i] = sinf((float)i), g[i] = cosf(0.7f * (float)i), m[i] = m2[i] = 0.01f * (float)(i % 7);
        v[i] = v2[i] = 0.001f * (float)(i % 5);
    }
    float *dp = lt_cuda_malloc(sizeof(float) * N * 4, err, sizeof err);
    TAP_CHECK(dp != NULL, "cudaMalloc: %s", err);
    if (!dp) return tap_done();
    float *dg = dp + N, *dm = dg + N, *dv = dm + N;
    lt_cuda_copy(dp, p, sizeof(float) * N, 1, err, sizeof err);
    lt_cuda_copy(dg, g, sizeof(float) * N, 1, err, sizeof err);
    lt_cuda_copy(dm, m, sizeof(float) * N, 1, err, sizeof err);
    lt_cuda_copy(dv, v, sizeof(float) * N, 1, err, sizeof err);
    for (int step = 1; step <= 3; step++) {
        lt_adamw_update(p2, g, m2, v2, N, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
        TAP_CHECK(lt_cuda_adamw_update(dp, dg, dm, dv, N, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step, err, sizeof err) == 0,
                  "AdamW kernel step %d: %s", step, err);
    }
    lt_cuda_copy(back, dp, sizeof(float) * N, 0, err, sizeof err);
    double worst = 0;
    for (int i = 0; i < N; i++) worst = fmax(worst, fabs((double)back[i] - p2[i]));
    TAP_CHECK(worst < 1e-6, "CUDA AdamW matches the CPU kernel over 3 steps (max abs diff %.3g)", worst);
    lt_cuda_free(dp);
    free(p);
    return tap_done();
}

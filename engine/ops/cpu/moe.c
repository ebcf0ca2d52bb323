/* Mixture of experts: the combine of the experts' outputs back into the tokens' rows (ops.h). */
#include <string.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

void lt_moe_combine_forward(float *out, const float *y, const int32_t *rows, const float *weights, int N, int k,
                            int C) {
#pragma omp parallel for schedule(static) if ((int64_t)N * k * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;
        memset(o, 0, sizeof(float) * C);
        for (int j = 0; j < k; j++) { /* in order of j: the sum does not depend on the thread count */
            const int32_t r = rows[(size_t)n * k + j];
            if (r < 0) continue; /* a dropped slot: its weight is not read */
            const float w = weights[(size_t)n * k + j], *yr = y + (size_t)r * C;
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] += w * yr[c];
        }
    }
}

void lt_moe_combine_backward(float *dy, float *dweights, const float *dout, const float *y, const int32_t *rows,
                             const float *weights, int N, int k, int M, int C) {
    /* The rows no slot names must be zeros; finding them would take scratch, so every row is zeroed and
     * the named ones overwritten (the CPU op is the reference, not the fast path). */
    memset(dy, 0, sizeof(float) * (size_t)M * C);
#pragma omp parallel for schedule(static) if ((int64_t)N * k * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = dout + (size_t)n * C;
        for (int j = 0; j < k; j++) {
            const size_t i = (size_t)n * k + j;
            const int32_t r = rows[i];
            if (r < 0) {
                dweights[i] = 0.0f;
                continue;
            }
            /* row r has this one writer (the precondition): no two threads share it */
            const float w = weights[i], *yr = y + (size_t)r * C;
            float *d = dy + (size_t)r * C, s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int c = 0; c < C; c++) {
                d[c] = w * g[c];
                s += g[c] * yr[c];
            }
            dweights[i] = s;
        }
    }
}

/* LayerNorm and RMSNorm over the last dimension. Rows are independent in forward and for dinp;
 * the weight/bias gradients are column sums over all rows, computed by column blocks so each
 * block is owned by one thread (deterministic, no per-thread copies to reduce). */
#include <math.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

#define LT_NORM_COLS 32 /* columns per weight-gradient task */

void lt_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                          const float *bias, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c];
        const float m = s / C;
        float v = 0.0f; /* two passes: no cancellation when |mean| >> std */
#pragma omp simd reduction(+ : v)
        for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        const float r = 1.0f / sqrtf(v / C + eps);
        if (bias) {
#pragma omp simd
            for (int c = 0; c < C; c++) y[c] = (x[c] - m) * r * weight[c] + bias[c];
        } else {
#pragma omp simd
            for (int c = 0; c < C; c++) y[c] = (x[c] - m) * r * weight[c];
        }
        mean[n] = m;
        rstd[n] = r;
    }
}

void lt_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, const float *mean, const float *rstd, int N, int C) {
    const int nblk = (C + LT_NORM_COLS - 1) / LT_NORM_COLS;
#pragma omp parallel if ((int64_t)N * C >= LT_PAR_MIN)
    {
        /* dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight */
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
            float *dx = dinp + (size_t)n * C;
            const float m = mean[n], r = rstd[n];
            float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
            for (int c = 0; c < C; c++) {
                const float dn = g[c] * weight[c];
                s1 += dn;
                s2 += dn * (x[c] - m) * r;
            }
            s1 /= C, s2 /= C;
#pragma omp simd
            for (int c = 0; c < C; c++) dx[c] += r * (g[c] * weight[c] - s1 - (x[c] - m) * r * s2);
        }
#pragma omp for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int c0 = blk * LT_NORM_COLS, w = C - c0 < LT_NORM_COLS ? C - c0 : LT_NORM_COLS;
            float aw[LT_NORM_COLS] = {0}, ab[LT_NORM_COLS] = {0};
            for (int n = 0; n < N; n++) {
                const float *x = inp + (size_t)n * C + c0, *g = dout + (size_t)n * C + c0;
                const float m = mean[n], r = rstd[n];
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    aw[c] += g[c] * (x[c] - m) * r;
                    ab[c] += g[c];
                }
            }
            for (int c = 0; c < w; c++) {
                dweight[c0 + c] += aw[c];
                if (dbias) dbias[c0 + c] += ab[c];
            }
        }
    }
}

void lt_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c] * x[c];
        const float r = 1.0f / sqrtf(s / C + eps);
#pragma omp simd
        for (int c = 0; c < C; c++) y[c] = x[c] * r * weight[c];
        rstd[n] = r;
    }
}

void lt_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                         const float *rstd, int N, int C) {
    const int nblk = (C + LT_NORM_COLS - 1) / LT_NORM_COLS;
#pragma omp parallel if ((int64_t)N * C >= LT_PAR_MIN)
    {
        /* dinp = rstd * (dnorm - norm * mean(dnorm * norm)) */
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
            float *dx = dinp + (size_t)n * C;
            const float r = rstd[n];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int c = 0; c < C; c++) s += g[c] * weight[c] * x[c] * r;
            s /= C;
#pragma omp simd
            for (int c = 0; c < C; c++) dx[c] += r * (g[c] * weight[c] - x[c] * r * s);
        }
#pragma omp for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int c0 = blk * LT_NORM_COLS, w = C - c0 < LT_NORM_COLS ? C - c0 : LT_NORM_COLS;
            float aw[LT_NORM_COLS] = {0};
            for (int n = 0; n < N; n++) {
                const float *x = inp + (size_t)n * C + c0, *g = dout + (size_t)n * C + c0;
                const float r = rstd[n];
#pragma omp simd
                for (int c = 0; c < w; c++) aw[c] += g[c] * x[c] * r;
            }
            for (int c = 0; c < w; c++) dweight[c0 + c] += aw[c];
        }
    }
}

/* LayerNorm and RMSNorm over the last dimension, and the per-head norms of a fused qkv buffer
 * (Megatron's q_layernorm / k_layernorm). Rows are independent in forward and for dinp; the
 * weight/bias gradients are column sums over all rows, computed by column blocks so each block is
 * owned by one thread (deterministic, no per-thread copies to reduce).
 *
 * Every kernel below visits a selection of rows (norm_rows): all rows in order for the plain ops,
 * the query or the key heads of each token for the qkv ones. */
#include <math.h>
#include <string.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

#define LT_NORM_COLS 32 /* columns per weight-gradient task */

/* Logical row r of a selection is buffer row (r / count) * period + first + r % count. */
typedef struct {
    int period, first, count;
} norm_rows;
static const norm_rows ALL_ROWS = {1, 0, 1};

static inline size_t row_at(norm_rows s, int r) {
    if (s.count == 1) return (size_t)r * (size_t)s.period + (size_t)s.first; /* no division on the plain ops */
    return (size_t)(r / s.count) * (size_t)s.period + (size_t)s.first + (size_t)(r % s.count);
}

static void layernorm_forward_rows(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                                   const float *bias, int N, int C, float eps, norm_rows sel) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + row_at(sel, n) * C;
        float *y = out + row_at(sel, n) * C;
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

static void layernorm_backward_rows(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                                    const float *weight, const float *mean, const float *rstd, int N, int C,
                                    norm_rows sel) {
    const int nblk = (C + LT_NORM_COLS - 1) / LT_NORM_COLS;
#pragma omp parallel if ((int64_t)N * C >= LT_PAR_MIN)
    {
        /* dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight */
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++) {
            const size_t at = row_at(sel, n) * C;
            const float *x = inp + at, *g = dout + at;
            float *dx = dinp + at;
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
                const float *x = inp + row_at(sel, n) * C + c0, *g = dout + row_at(sel, n) * C + c0;
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

static void rmsnorm_forward_rows(float *out, float *rstd, const float *inp, const float *weight, int N, int C,
                                 float eps, norm_rows sel) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + row_at(sel, n) * C;
        float *y = out + row_at(sel, n) * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c] * x[c];
        const float r = 1.0f / sqrtf(s / C + eps);
#pragma omp simd
        for (int c = 0; c < C; c++) y[c] = x[c] * r * weight[c];
        rstd[n] = r;
    }
}

static void rmsnorm_backward_rows(float *dinp, float *dweight, const float *dout, const float *inp,
                                  const float *weight, const float *rstd, int N, int C, norm_rows sel) {
    const int nblk = (C + LT_NORM_COLS - 1) / LT_NORM_COLS;
#pragma omp parallel if ((int64_t)N * C >= LT_PAR_MIN)
    {
        /* dinp = rstd * (dnorm - norm * mean(dnorm * norm)) */
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++) {
            const size_t at = row_at(sel, n) * C;
            const float *x = inp + at, *g = dout + at;
            float *dx = dinp + at;
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
                const float *x = inp + row_at(sel, n) * C + c0, *g = dout + row_at(sel, n) * C + c0;
                const float r = rstd[n];
#pragma omp simd
                for (int c = 0; c < w; c++) aw[c] += g[c] * x[c] * r;
            }
            for (int c = 0; c < w; c++) dweight[c0 + c] += aw[c];
        }
    }
}

void lt_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                          const float *bias, int N, int C, float eps) {
    layernorm_forward_rows(out, mean, rstd, inp, weight, bias, N, C, eps, ALL_ROWS);
}

void lt_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, const float *mean, const float *rstd, int N, int C) {
    layernorm_backward_rows(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, ALL_ROWS);
}

void lt_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
    rmsnorm_forward_rows(out, rstd, inp, weight, N, C, eps, ALL_ROWS);
}

void lt_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                         const float *rstd, int N, int C) {
    rmsnorm_backward_rows(dinp, dweight, dout, inp, weight, rstd, N, C, ALL_ROWS);
}

/* ---- per-head norms of a fused qkv buffer [N, G, H/G + 2, D] ---- */

/* dst = src on the value heads, 0 on the query and key heads (which the norms then fill). */
static void qk_value_heads(float *dst, const float *src, int N, int H, int G, int D) {
    const int slots = H / G + 2;
    const size_t D_bytes = sizeof(float) * (size_t)D;
#pragma omp parallel for schedule(static) if ((int64_t)N * (H + 2 * G) * D >= LT_PAR_MIN)
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const size_t head = ((size_t)n * G + g) * slots;
            memset(dst + head * D, 0, D_bytes * (size_t)(slots - 1));
            memcpy(dst + (head + slots - 1) * D, src + (head + slots - 1) * D, D_bytes);
        }
}

void lt_qk_norm_forward(float *out, float *mean, float *rstd, const float *inp, const float *qweight,
                        const float *qbias, const float *kweight, const float *kbias, int N, int H, int G, int D,
                        float eps) {
    const int hpg = H / G;
    const norm_rows q = {hpg + 2, 0, hpg}, k = {hpg + 2, hpg, 1};
    const size_t NH = (size_t)N * H;
    qk_value_heads(out, inp, N, H, G, D);
    if (mean) {
        layernorm_forward_rows(out, mean, rstd, inp, qweight, qbias, N * H, D, eps, q);
        layernorm_forward_rows(out, mean + NH, rstd + NH, inp, kweight, kbias, N * G, D, eps, k);
    } else {
        rmsnorm_forward_rows(out, rstd, inp, qweight, N * H, D, eps, q);
        rmsnorm_forward_rows(out, rstd + NH, inp, kweight, N * G, D, eps, k);
    }
}

void lt_qk_norm_backward(float *dinp, float *dqweight, float *dqbias, float *dkweight, float *dkbias,
                         const float *dout, const float *inp, const float *qweight, const float *kweight,
                         const float *mean, const float *rstd, int N, int H, int G, int D) {
    const int hpg = H / G;
    const norm_rows q = {hpg + 2, 0, hpg}, k = {hpg + 2, hpg, 1};
    const size_t NH = (size_t)N * H;
    qk_value_heads(dinp, dout, N, H, G, D); /* the norms' dinp accumulate onto the zeros */
    if (mean) {
        layernorm_backward_rows(dinp, dqweight, dqbias, dout, inp, qweight, mean, rstd, N * H, D, q);
        layernorm_backward_rows(dinp, dkweight, dkbias, dout, inp, kweight, mean + NH, rstd + NH, N * G, D, k);
    } else {
        rmsnorm_backward_rows(dinp, dqweight, dout, inp, qweight, rstd, N * H, D, q);
        rmsnorm_backward_rows(dinp, dkweight, dout, inp, kweight, rstd + NH, N * G, D, k);
    }
}

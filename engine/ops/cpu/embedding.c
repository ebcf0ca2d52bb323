/* Token and learned position embeddings. Backward never lets two threads write one row:
 * the table gradient is split by columns, so repeated ids need no atomics and sum in order of n. */
#include <string.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

#define LT_EMB_COLS 64 /* columns per backward task: a few cache lines of every touched row */

void lt_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * C, table + (size_t)ids[n] * C, sizeof(float) * C);
}

void lt_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C) {
    const int nblk = (C + LT_EMB_COLS - 1) / LT_EMB_COLS;
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int blk = 0; blk < nblk; blk++) {
        const int c0 = blk * LT_EMB_COLS, c1 = c0 + LT_EMB_COLS < C ? c0 + LT_EMB_COLS : C;
        for (int n = 0; n < N; n++) {
            float *d = dtable + (size_t)ids[n] * C;
            const float *g = dout + (size_t)n * C;
#pragma omp simd
            for (int c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}

void lt_position_embedding_forward(float *out, const float *wpe, int B, int T, int C, const int32_t *pos) {
#pragma omp parallel for schedule(static) if ((int64_t)B * T * C >= LT_PAR_MIN)
    for (int bt = 0; bt < B * T; bt++) {
        float *o = out + (size_t)bt * C;
        const int t = bt % T;
        const float *w = wpe + (size_t)(pos ? pos[t] : t) * C;
#pragma omp simd
        for (int c = 0; c < C; c++) o[c] += w[c];
    }
}

/* One thread per position t: its row of dwpe (distinct positions: distinct rows) sums b in order. */
void lt_position_embedding_backward(float *dwpe, const float *dout, int B, int T, int C, const int32_t *pos) {
#pragma omp parallel for schedule(static) if ((int64_t)B * T * C >= LT_PAR_MIN)
    for (int t = 0; t < T; t++) {
        float *d = dwpe + (size_t)(pos ? pos[t] : t) * C;
        for (int b = 0; b < B; b++) {
            const float *g = dout + ((size_t)b * T + t) * C;
#pragma omp simd
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}

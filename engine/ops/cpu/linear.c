/* Linear layers and general matmul on OpenBLAS sgemm (row-major; weight [OUT, IN]). */
#include <cblas.h>
#include <string.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

#define LT_BIAS_COLS 64 /* columns per bias-gradient task */

void lt_linear_forward(float *out, const float *inp, const float *weight, const float *bias, const float *residual,
                       int N, int IN, int OUT) {
    float beta = 0.0f;
    if (bias || residual) { /* start from bias + residual and let sgemm accumulate onto it */
#pragma omp parallel for schedule(static) if ((int64_t)N * OUT >= LT_PAR_MIN)
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * OUT;
            const float *r = residual ? residual + (size_t)n * OUT : NULL;
            if (bias && r) {
#pragma omp simd
                for (int j = 0; j < OUT; j++) o[j] = bias[j] + r[j];
            } else if (bias) {
#pragma omp simd
                for (int j = 0; j < OUT; j++) o[j] = bias[j];
            } else if (r != o) {
                memcpy(o, r, sizeof(float) * (size_t)OUT);
            }
        }
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OUT, IN, 1.0f, inp, IN, weight, IN, beta, out, OUT);
}

void lt_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, int N, int IN, int OUT) {
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IN, OUT, 1.0f, dout, OUT, weight, IN, 0.0f, dinp, IN);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, IN, N, 1.0f, dout, OUT, inp, IN, 1.0f, dweight, IN);
    if (dbias) { /* column sums by column blocks: each output owned by one thread */
        const int nblk = (OUT + LT_BIAS_COLS - 1) / LT_BIAS_COLS;
#pragma omp parallel for schedule(static) if ((int64_t)N * OUT >= LT_PAR_MIN)
        for (int blk = 0; blk < nblk; blk++) {
            const int j0 = blk * LT_BIAS_COLS, w = OUT - j0 < LT_BIAS_COLS ? OUT - j0 : LT_BIAS_COLS;
            float acc[LT_BIAS_COLS] = {0};
            for (int n = 0; n < N; n++) {
                const float *g = dout + (size_t)n * OUT + j0;
#pragma omp simd
                for (int j = 0; j < w; j++) acc[j] += g[j];
            }
            for (int j = 0; j < w; j++) dbias[j0 + j] += acc[j];
        }
    }
}

static inline int lt_ld(int x) { return x > 1 ? x : 1; } /* BLAS rejects a leading dimension of 0 */

void lt_matmul(float *c, const float *a, const float *b, int M, int N, int K, int trans_a, int trans_b, float alpha,
               float beta) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha,
                a, lt_ld(trans_a ? M : K), b, lt_ld(trans_b ? K : N), beta, c, lt_ld(N));
}

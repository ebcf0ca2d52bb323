// Linear layers on cuBLAS sgemm. Data is row-major; cuBLAS is column-major, and a row-major X[r, c]
// is the column-major X^T (c x r, leading dimension c), so every product is written for the
// transposes: row-major out = inp @ W^T becomes column-major out^T = W @ inp^T, where cuBLAS sees the
// W buffer as W^T (hence op T) and the inp buffer as inp^T (op N); the backward products likewise.
#include <stdio.h>

#include "engine/ops/cuda/internal.cuh"
#ifndef LT_CUDA_EMULATION
#include <cublas_v2.h>
#endif

/* fp32 checking mode: plain fp32 GEMMs (CUBLAS_DEFAULT_MATH). Switching this on lets cuBLAS use TF32
 * tensor cores (10-bit mantissa inputs): much faster, no longer within 1e-4 of the CPU. */
static const bool cuda_linear_allow_tf32 = false;

static cublasHandle_t cuda_cublas;

#define LIN_BIAS_COLS 32
#define LIN_BIAS_ROWS 8

int cuda_linear_open(char *err, size_t errlen) {
    cublasStatus_t s = cublasCreate(&cuda_cublas);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(cuda_cublas, cuda_ctx.stream);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetMathMode(cuda_cublas, cuda_linear_allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    if (s != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cuBLAS: %s", cublasGetStatusString(s));
        return -1;
    }
    return 0;
}

static void lin_check_cublas(const char *op, cublasStatus_t s) {
    if (s != CUBLAS_STATUS_SUCCESS) cuda_record(op, "cuBLAS: %s", cublasGetStatusString(s));
}

/* out[n, j] = bias[j]: the GEMM then accumulates onto it (beta = 1), as the CPU op does. */
template <typename scalar_t>
__global__ void lin_bias_broadcast_kernel(scalar_t *out, const scalar_t *bias, int64_t total, int OUT) {
    CUDA_FOR(i, total) cuda_st(out + i, cuda_ld(bias + i % OUT));
}

/* Partial column sums of dout[N, OUT] over row chunks (deterministic, no atomics): block (32, 8),
 * blockIdx.x = 32 columns, blockIdx.y = row chunk; lane ty sums rows ty, ty + 8, ... */
template <typename scalar_t>
__global__ void lin_bias_partial_kernel(float *partial, const scalar_t *dout, int N, int OUT, int rows_per_part) {
    __shared__ float sh[LIN_BIAS_ROWS][LIN_BIAS_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, j = blockIdx.x * LIN_BIAS_COLS + tx, part = blockIdx.y;
    const int n0 = part * rows_per_part, n1 = min(N, n0 + rows_per_part);
    float acc = 0.0f;
    if (j < OUT)
        for (int n = n0 + ty; n < n1; n += LIN_BIAS_ROWS) acc += cuda_ld(dout + (int64_t)n * OUT + j);
    sh[ty][tx] = acc;
    __syncthreads(); /* every thread gets here */
    if (ty == 0 && j < OUT) {
        float s = 0.0f;
        for (int k = 0; k < LIN_BIAS_ROWS; k++) s += sh[k][tx];
        partial[(int64_t)part * OUT + j] = s;
    }
}

/* dbias[j] += the partials of column j, in order. */
template <typename scalar_t>
__global__ void lin_bias_final_kernel(scalar_t *dbias, const float *partial, int P, int OUT) {
    CUDA_FOR(j, OUT) {
        float s = 0.0f;
        for (int p = 0; p < P; p++) s += partial[(int64_t)p * OUT + j];
        cuda_st(dbias + j, cuda_ld(dbias + j) + s);
    }
}

void cuda_linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                         int OUT) {
    if (N <= 0 || OUT <= 0) return;
    float alpha = 1.0f, beta = 0.0f;
    if (bias) {
        const int64_t total = (int64_t)N * OUT;
        CUDA_LAUNCH(lin_bias_broadcast_kernel<float>, cuda_blocks(total, CUDA_THREADS), CUDA_THREADS, 0)(
            out, bias, total, OUT);
        cuda_check("linear_forward");
        beta = 1.0f;
    }
    if (IN <= 0) { /* an empty product: out is the bias (or zero) */
        if (!bias) cuda_memzero(out, sizeof(float) * (size_t)N * OUT);
        return;
    }
    /* column-major out^T[OUT, N] = W[OUT, IN] (stored as col-major IN x OUT, so op T) @ inp^T[IN, N] */
    lin_check_cublas("linear_forward", cublasSgemm(cuda_cublas, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, &alpha, weight,
                                                   IN, inp, IN, &beta, out, OUT));
    cuda_check("linear_forward");
}

void cuda_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                          const float *weight, int N, int IN, int OUT) {
    if (N <= 0 || OUT <= 0) return;
    const float one = 1.0f;
    if (IN > 0) {
        /* dinp[N, IN] += dout[N, OUT] @ W[OUT, IN]: column-major dinp^T[IN, N] += W^T[IN, OUT] @ dout^T[OUT, N],
         * and W^T, dout^T are exactly how cuBLAS sees the row-major buffers (op N, N). */
        if (dinp)
            lin_check_cublas("linear_backward", cublasSgemm(cuda_cublas, CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, &one,
                                                            weight, IN, dout, OUT, &one, dinp, IN));
        /* dweight[OUT, IN] += dout^T @ inp: column-major dweight^T[IN, OUT] += inp^T[IN, N] @ dout[N, OUT], where
         * cuBLAS sees dout as dout^T (OUT x N), hence op T on it. */
        lin_check_cublas("linear_backward", cublasSgemm(cuda_cublas, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, &one, inp,
                                                        IN, dout, OUT, &one, dweight, IN));
        cuda_check("linear_backward");
    }
    if (dbias) {
        const int ncb = (OUT + LIN_BIAS_COLS - 1) / LIN_BIAS_COLS;
        int P = (4 * cuda_ctx.sm_count + ncb - 1) / ncb; /* ~4 blocks per SM, >= 32 rows each, <= 1024 parts */
        const int max_p = (N + 31) / 32;
        if (P > max_p) P = max_p;
        if (P > 1024) P = 1024;
        if (P < 1) P = 1;
        const int rows_per_part = (N + P - 1) / P;
        P = (N + rows_per_part - 1) / rows_per_part;
        const size_t nbytes = sizeof(float) * (size_t)P * OUT;
        float *partial = (float *)cuda_scratch(nbytes, "linear_backward");
        if (!partial) return;
        CUDA_LAUNCH(lin_bias_partial_kernel<float>, dim3(ncb, P), dim3(LIN_BIAS_COLS, LIN_BIAS_ROWS), 0)(
            partial, dout, N, OUT, rows_per_part);
        CUDA_LAUNCH(lin_bias_final_kernel<float>, cuda_blocks(OUT, CUDA_THREADS), CUDA_THREADS, 0)(
            dbias, partial, P, OUT);
        cuda_check("linear_backward");
        cuda_release(partial, nbytes);
    }
}

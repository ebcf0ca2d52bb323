// Linear layers on cuBLAS. Data is row-major; cuBLAS is column-major, and a row-major X[r, c] is the
// column-major X^T (c x r, leading dimension c), so every product is written for the transposes:
// row-major out = inp @ W^T becomes column-major out^T = W @ inp^T, where cuBLAS sees the W buffer as
// W^T (hence op T) and the inp buffer as inp^T (op N); the backward products likewise.
//
// fp32 table: cublasSgemm, no TF32 (the checking mode). bf16 table: cublasGemmEx with bf16 A and B,
// fp32 accumulation and scaling (CUBLAS_COMPUTE_32F: tensor cores), C in bf16 for out and dinp and in
// fp32 for dweight. The bias is added the way the CPU reference does it (out = bias, then the GEMM with
// beta = 1): the bf16 bias copied into the bf16 out is exact, and cuBLAS computes acc + 1 * C in fp32
// and rounds once, so out = round(inp @ W^T + bias) with the single rounding of the reference.
// dinp (bf16) accumulates the same way: beta = 1, C read, added in fp32, rounded once. The bias kernels
// (broadcast, column sums for dbias) move 16-byte packs when OUT allows and the pointers are aligned.
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

/* out[n, j] = bias[j]: the GEMM then accumulates onto it (beta = 1), as the CPU op does. W elements per
 * thread (W > 1: OUT % W == 0 and both pointers 16-byte aligned). */
template <typename scalar_t, int W>
__global__ void lin_bias_broadcast_kernel(scalar_t *out, const scalar_t *bias, int64_t total, int OUT) {
    CUDA_FOR(j, total / W) {
        const int64_t i = j * W;
        const cuda_pack<scalar_t, W> b = cuda_ldp<W>(bias + i % OUT);
        cuda_pack<scalar_t, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) cuda_st(&y.x[k], cuda_ld(&b.x[k]));
        cuda_stp<W>(out + i, y);
    }
}

/* Partial column sums of dout[N, OUT] over row chunks (deterministic, no atomics): block (32, 8),
 * blockIdx.x = 32 W columns, blockIdx.y = row chunk; lane ty sums rows ty, ty + 8, ... of columns
 * j0 .. j0 + W - 1 (W > 1: OUT % W == 0 and dout 16-byte aligned; each column is summed in the same
 * order whatever W is). */
template <typename scalar_t, int W>
__global__ void lin_bias_partial_kernel(float *partial, const scalar_t *dout, int N, int OUT, int rows_per_part) {
    __shared__ float sh[LIN_BIAS_ROWS][W][LIN_BIAS_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, j0 = (blockIdx.x * LIN_BIAS_COLS + tx) * W, part = blockIdx.y;
    const int n0 = part * rows_per_part, n1 = min(N, n0 + rows_per_part);
    float acc[W];
#pragma unroll
    for (int k = 0; k < W; k++) acc[k] = 0.0f;
    if (j0 < OUT)
        for (int n = n0 + ty; n < n1; n += LIN_BIAS_ROWS) {
            const cuda_pack<scalar_t, W> g = cuda_ldp<W>(dout + (int64_t)n * OUT + j0);
#pragma unroll
            for (int k = 0; k < W; k++) acc[k] += cuda_ld(&g.x[k]);
        }
#pragma unroll
    for (int k = 0; k < W; k++) sh[ty][k][tx] = acc[k];
    __syncthreads(); /* every thread gets here */
    if (ty == 0 && j0 < OUT) {
#pragma unroll
        for (int k = 0; k < W; k++) {
            float s = 0.0f;
            for (int r = 0; r < LIN_BIAS_ROWS; r++) s += sh[r][k][tx];
            partial[(int64_t)part * OUT + j0 + k] = s;
        }
    }
}

/* dbias[j] (fp32) += the partials of column j, in order. */
__global__ void lin_bias_final_kernel(float *dbias, const float *partial, int P, int OUT) {
    CUDA_FOR(j, OUT) {
        float s = 0.0f;
#pragma unroll 8
        for (int p = 0; p < P; p++) s += partial[(int64_t)p * OUT + j];
        dbias[j] += s;
    }
}

/* Column-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, accumulated in fp32: the one overload
 * per type combination the layers use. */
static cublasStatus_t lin_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *A,
                               int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    const float alpha = 1.0f;
    return cublasSgemm(cuda_cublas, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc);
}
static cublasStatus_t lin_gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                    const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb, float beta,
                                    void *C, cudaDataType_t ctype, int ldc) {
    const float alpha = 1.0f; /* CUBLAS_COMPUTE_32F: alpha and beta are floats */
    return cublasGemmEx(cuda_cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C,
                        ctype, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
static cublasStatus_t lin_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                               const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb, float beta,
                               __nv_bfloat16 *C, int ldc) {
    return lin_gemm_bf16(ta, tb, m, n, k, A, lda, B, ldb, beta, C, CUDA_R_16BF, ldc);
}
static cublasStatus_t lin_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                               const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb, float beta, float *C,
                               int ldc) {
    return lin_gemm_bf16(ta, tb, m, n, k, A, lda, B, ldb, beta, C, CUDA_R_32F, ldc);
}

template <typename T>
static void lin_forward(void *out_, const void *inp_, const void *weight_, const void *bias_, int N, int IN,
                        int OUT) {
    if (N <= 0 || OUT <= 0) return;
    T *out = (T *)out_;
    const T *inp = (const T *)inp_, *weight = (const T *)weight_, *bias = (const T *)bias_;
    float beta = 0.0f;
    if (bias) {
        const int64_t total = (int64_t)N * OUT;
        constexpr int V = CUDA_VEC(T);
        if (OUT % V == 0 && cuda_aligned16(out, bias))
            CUDA_LAUNCH((lin_bias_broadcast_kernel<T, V>), cuda_blocks(total / V, CUDA_THREADS), CUDA_THREADS, 0)(
                out, bias, total, OUT);
        else
            CUDA_LAUNCH((lin_bias_broadcast_kernel<T, 1>), cuda_blocks(total, CUDA_THREADS), CUDA_THREADS, 0)(
                out, bias, total, OUT);
        cuda_check("linear_forward");
        beta = 1.0f;
    }
    if (IN <= 0) { /* an empty product: out is the bias (or zero) */
        if (!bias) cuda_memzero(out, sizeof(T) * (size_t)N * OUT);
        return;
    }
    /* column-major out^T[OUT, N] = W[OUT, IN] (stored as col-major IN x OUT, so op T) @ inp^T[IN, N] */
    lin_check_cublas("linear_forward", lin_gemm(CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, weight, IN, inp, IN, beta, out,
                                                OUT));
    cuda_check("linear_forward");
}

template <typename T>
static void lin_backward(void *dinp_, float *dweight, float *dbias, const void *dout_, const void *inp_,
                         const void *weight_, int N, int IN, int OUT) {
    if (N <= 0 || OUT <= 0) return;
    T *dinp = (T *)dinp_;
    const T *dout = (const T *)dout_, *inp = (const T *)inp_, *weight = (const T *)weight_;
    if (IN > 0) {
        /* dinp[N, IN] += dout[N, OUT] @ W[OUT, IN]: column-major dinp^T[IN, N] += W^T[IN, OUT] @ dout^T[OUT, N],
         * and W^T, dout^T are exactly how cuBLAS sees the row-major buffers (op N, N). */
        if (dinp)
            lin_check_cublas("linear_backward", lin_gemm(CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, weight, IN, dout, OUT,
                                                         1.0f, dinp, IN));
        /* dweight[OUT, IN] (fp32) += dout^T @ inp: column-major dweight^T[IN, OUT] += inp^T[IN, N] @ dout[N, OUT],
         * where cuBLAS sees dout as dout^T (OUT x N), hence op T on it. */
        lin_check_cublas("linear_backward", lin_gemm(CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, inp, IN, dout, OUT, 1.0f,
                                                     dweight, IN));
        cuda_check("linear_backward");
    }
    if (dbias) {
        constexpr int V = CUDA_VEC(T);
        const int W = OUT % V == 0 && cuda_aligned16(dout) ? V : 1;
        const int ncb = (OUT + LIN_BIAS_COLS * W - 1) / (LIN_BIAS_COLS * W);
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
        void (*const k)(float *, const T *, int, int, int) =
            W > 1 ? lin_bias_partial_kernel<T, V> : lin_bias_partial_kernel<T, 1>;
        CUDA_LAUNCH(k, dim3(ncb, P), dim3(LIN_BIAS_COLS, LIN_BIAS_ROWS), 0)(partial, dout, N, OUT, rows_per_part);
        CUDA_LAUNCH(lin_bias_final_kernel, cuda_blocks(OUT, CUDA_THREADS), CUDA_THREADS, 0)(dbias, partial, P, OUT);
        cuda_check("linear_backward");
        cuda_release(partial, nbytes);
    }
}

void cuda_linear_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, linear_forward, lin_forward);
    CUDA_SET_OP(f32, bf16, linear_backward, lin_backward);
}

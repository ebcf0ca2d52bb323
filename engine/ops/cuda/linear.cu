// Linear layers on cuBLASLt. Data is row-major; cuBLAS is column-major, and a row-major X[r, c] is the
// column-major X^T (c x r, leading dimension c), so every product is written for the transposes:
// row-major out = inp @ W^T becomes column-major out^T = W @ inp^T, where cuBLASLt sees the W buffer as
// W^T (hence op T) and the inp buffer as inp^T (op N); the backward products likewise.
//
// Every GEMM is one cublasLtMatmul with CUBLAS_COMPUTE_32F: in the fp32 table plain fp32 (no TF32, the
// checking mode); in the bf16 table bf16 A and B on tensor cores with fp32 accumulation and scaling, D
// in bf16 for out and dinp (rounded once) and in fp32 for dweight. The bias rides in the GEMM's
// epilogue: forward adds it, and the residual (the GEMM's C with beta = 1), to the fp32 accumulator
// before the one rounding (EPILOGUE_BIAS: the CPU reference's bias-and-residual-then-GEMM with
// beta = 1, without passes over out); backward sums dout's columns in the dweight GEMM
// (EPILOGUE_BGRADB, which reads dout anyway) into fp32 scratch that is added to dbias. Where the
// heuristic offers no algorithm with an epilogue (an alignment, a type the library does not fuse), the
// bias kernels below do the same work: bias + residual written to out before a beta = 1 GEMM (in bf16
// that sum is rounded once more: within the bf16 tolerance), and deterministic column sums (16-byte
// packs when OUT allows and the pointers are aligned).
//
// The MLP's tanh GELU rides in epilogues too: fc1 forward with GELU_AUX_BIAS (act = gelu(acc + bias)
// in D, pre = acc + bias in the aux matrix, both rounded once), fc2's dinp GEMM with DGELU (dpre =
// acc * gelu'(pre), the product never rounded on its own). Their fallbacks: the plain GEMM, then a
// GELU kernel over pre (forward), or over dpre in place (backward: the product is rounded once more).
//
// The MoE experts' grouped ops are one cublasGemmGroupedBatchedEx per product over all local experts
// (a problem per non-empty expert, its operand pointers uploaded with the call). That call has no
// epilogues: a bias is broadcast into out first (beta = 1, as the CPU op) and its gradient summed by one
// kernel over all groups. cuBLAS documents it for A = B = C types only, so bf16 weight gradients (fp32 C)
// fall back to one cuBLASLt GEMM per expert, as linear_backward computes them, where the library refuses.
#include <stdio.h>

#include "engine/ops/cuda/internal.cuh"
#ifndef LT_CUDA_EMULATION
#include <cublasLt.h>
#include <cublas_v2.h>
#endif
#include <stdlib.h>
#include <string.h>

static cublasLtHandle_t lin_lt;
static cublasHandle_t lin_blas; /* for the grouped GEMMs */
static void *lin_workspace; /* cuBLASLt's scratch, allocated once: what Hopper's kernels ask for */
static size_t lin_workspace_bytes;
#define LIN_WORKSPACE_BYTES ((size_t)32 << 20)

int cuda_linear_open(char *err, size_t errlen) {
    const cublasStatus_t s = cublasLtCreate(&lin_lt);
    if (s != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cuBLASLt: %s", cublasLtGetStatusString(s));
        return -1;
    }
    const cublasStatus_t g = cublasCreate(&lin_blas);
    if (g != CUBLAS_STATUS_SUCCESS || cublasSetStream(lin_blas, cuda_ctx.stream) != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cuBLAS: %s", cublasGetStatusString(g));
        return -1;
    }
    lin_workspace = cuda_alloc(LIN_WORKSPACE_BYTES);
    lin_workspace_bytes = lin_workspace ? LIN_WORKSPACE_BYTES : 0; /* none: algorithms without workspace */
    return 0;
}

#define LIN_BIAS_COLS 32
#define LIN_BIAS_ROWS 8

/* out[n, j] = bias[j] (+ residual[n, j]), for a GEMM that then accumulates onto it (beta = 1), as the
 * CPU op does. W elements per thread (W > 1: OUT % W == 0 and the pointers 16-byte aligned). */
template <typename scalar_t, int W>
__global__ void lin_bias_broadcast_kernel(scalar_t *out, const scalar_t *bias, const scalar_t *residual,
                                          int64_t total, int OUT) {
    CUDA_FOR(j, total / W) {
        const int64_t i = j * W;
        const cuda_pack<scalar_t, W> b = cuda_ldp<W>(bias + i % OUT);
        cuda_pack<scalar_t, W> r{}, y;
        if (residual) r = cuda_ldp<W>(residual + i);
#pragma unroll
        for (int k = 0; k < W; k++) cuda_st(&y.x[k], cuda_ld(&b.x[k]) + (residual ? cuda_ld(&r.x[k]) : 0.0f));
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

/* One cublasLtMatmul, column-major: D[m, n] = op(A)[m, k] op(B)[k, n] + beta C (+ bias[m] with
 * CUBLASLT_EPILOGUE_BIAS; with CUBLASLT_EPILOGUE_BGRADB, bias[n] = the sums of op(B)'s columns over k,
 * written in D's type); C has D's layout and is D itself when NULL. A and B have type ab, C and D type
 * d. CUBLAS_STATUS_NOT_SUPPORTED when the heuristic has no algorithm for it (the caller then does the
 * epilogue's work itself). */
typedef struct {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void *A;
    int lda;
    const void *B;
    int ldb;
    void *D;
    int ldd;
    const void *C;
    const void *aux; /* GELU's input: written by GELU_AUX(_BIAS), read by DGELU; D's layout, pitch aux_ld */
    int64_t aux_ld;
    cudaDataType_t ab, d;
    float beta;
    cublasLtEpilogue_t epilogue;
    void *bias;
} lin_gemm;

/* A plain product D = op(A) op(B): no C, no epilogue (the caller sets those). */
static lin_gemm lin_product(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A, int lda,
                            const void *B, int ldb, void *D, int ldd, cudaDataType_t ab, cudaDataType_t d) {
    lin_gemm g;
    g.ta = ta, g.tb = tb, g.m = m, g.n = n, g.k = k, g.A = A, g.lda = lda, g.B = B, g.ldb = ldb, g.D = D, g.ldd = ldd;
    g.C = NULL, g.aux = NULL, g.aux_ld = 0, g.ab = ab, g.d = d, g.beta = 0.0f, g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = NULL;
    return g;
}

/* The alignment a pointer has (a power of two, at most the 256 bytes cuBLASLt asks about): views into
 * a flat parameter or activation buffer need not be 256-byte aligned, and the heuristic must not pick
 * an algorithm that assumes more than they have. */
static uint32_t lin_alignment(const void *p) {
    uint32_t a = 256;
    while (a > 1 && (uintptr_t)p % a) a >>= 1;
    return a;
}

static cublasStatus_t lin_matmul(const lin_gemm *g) {
    cublasLtMatmulDesc_t desc = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t h;
    int found = 0;
    const float alpha = 1.0f;
    const void *C = g->C ? g->C : g->D;
    const uint32_t align[4] = {lin_alignment(g->A), lin_alignment(g->B), lin_alignment(C), lin_alignment(g->D)};
    const uint64_t workspace = lin_workspace_bytes;
    cublasStatus_t s = cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
#define LIN_TRY(call) \
    if (s == CUBLAS_STATUS_SUCCESS) s = (call)
    LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &g->ta, sizeof g->ta));
    LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &g->tb, sizeof g->tb));
    LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &g->epilogue, sizeof g->epilogue));
    if (g->aux) {
        LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g->aux, sizeof g->aux));
        LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g->aux_ld, sizeof g->aux_ld));
    }
    if (g->bias) {
        const int32_t bias_type = g->d;
        LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g->bias, sizeof g->bias));
        LIN_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    }
    LIN_TRY(cublasLtMatrixLayoutCreate(&la, g->ab, g->ta == CUBLAS_OP_N ? g->m : g->k,
                                       g->ta == CUBLAS_OP_N ? g->k : g->m, g->lda));
    LIN_TRY(cublasLtMatrixLayoutCreate(&lb, g->ab, g->tb == CUBLAS_OP_N ? g->k : g->n,
                                       g->tb == CUBLAS_OP_N ? g->n : g->k, g->ldb));
    LIN_TRY(cublasLtMatrixLayoutCreate(&ld, g->d, g->m, g->n, g->ldd));
    LIN_TRY(cublasLtMatmulPreferenceCreate(&pref));
    LIN_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                 sizeof workspace));
    LIN_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0],
                                                 sizeof align[0]));
    LIN_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1],
                                                 sizeof align[1]));
    LIN_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2],
                                                 sizeof align[2]));
    LIN_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[3],
                                                 sizeof align[3]));
    /* C and D share one layout */
    LIN_TRY(cublasLtMatmulAlgoGetHeuristic(lin_lt, desc, la, lb, ld, ld, pref, 1, &h, &found));
    if (s == CUBLAS_STATUS_SUCCESS && found == 0) s = CUBLAS_STATUS_NOT_SUPPORTED;
    LIN_TRY(cublasLtMatmul(lin_lt, desc, &alpha, g->A, la, g->B, lb, &g->beta, C, ld, g->D, ld, &h.algo,
                           lin_workspace, lin_workspace_bytes, cuda_ctx.stream));
#undef LIN_TRY
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (desc) cublasLtMatmulDescDestroy(desc);
    /* every caller of an epilogue falls back to its own kernels when it fails: count those for the profile */
    if (s != CUBLAS_STATUS_SUCCESS && g->epilogue != CUBLASLT_EPILOGUE_DEFAULT) cuda_ctx.gemm_unfused++;
    return s;
}

/* lin_matmul, recording a failure for op; 0 when it ran, -1 otherwise. */
static int lin_run(const char *op, const lin_gemm *g) {
    const cublasStatus_t s = lin_matmul(g);
    if (s == CUBLAS_STATUS_SUCCESS) return 0;
    cuda_record(op, "cuBLASLt (m %d, n %d, k %d): %s", g->m, g->n, g->k, cublasLtGetStatusString(s));
    return -1;
}

template <typename T>
static constexpr cudaDataType_t lin_type() {
    return sizeof(T) == 4 ? CUDA_R_32F : CUDA_R_16BF;
}

/* out = bias (broadcast) + residual, either nullable (both NULL: zeros). */
template <typename T>
static void lin_bias_broadcast(T *out, const T *bias, const T *residual, int N, int OUT) {
    const int64_t total = (int64_t)N * OUT;
    constexpr int V = CUDA_VEC(T);
    if (!bias) {
        if (!residual) cuda_memzero(out, sizeof(T) * (size_t)total);
        else if (residual != out) cuda_copy(out, residual, sizeof(T) * (size_t)total);
    } else if (OUT % V == 0 && cuda_aligned16(out, bias) && (!residual || cuda_aligned16(residual))) {
        CUDA_LAUNCH((lin_bias_broadcast_kernel<T, V>), cuda_blocks(total / V, CUDA_THREADS), CUDA_THREADS, 0)(
            out, bias, residual, total, OUT);
    } else {
        CUDA_LAUNCH((lin_bias_broadcast_kernel<T, 1>), cuda_blocks(total, CUDA_THREADS), CUDA_THREADS, 0)(
            out, bias, residual, total, OUT);
    }
}

/* dbias[j] += the column sums of dout[N, OUT] (the fallback of the BGRADB epilogue). */
template <typename T>
static void lin_bias_grad(float *dbias, const T *dout, int N, int OUT) {
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
    cuda_release(partial, nbytes);
}

template <typename T>
static void lin_forward(void *out, const void *inp, const void *weight, const void *bias, const void *residual, int N,
                        int IN, int OUT) {
    if (N <= 0 || OUT <= 0) return;
    if (IN <= 0) { /* an empty product: out is bias + residual (or zero) */
        lin_bias_broadcast((T *)out, (const T *)bias, (const T *)residual, N, OUT);
        cuda_check("linear_forward");
        return;
    }
    /* column-major out^T[OUT, N] = W[OUT, IN] (stored as col-major IN x OUT, so op T) @ inp^T[IN, N],
     * + residual^T as C (beta = 1) */
    lin_gemm g = lin_product(CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, weight, IN, inp, IN, out, OUT, lin_type<T>(),
                             lin_type<T>());
    g.C = residual, g.beta = residual ? 1.0f : 0.0f;
    if (bias) g.epilogue = CUBLASLT_EPILOGUE_BIAS, g.bias = (void *)bias;
    if (!bias || lin_matmul(&g) != CUBLAS_STATUS_SUCCESS) {
        if (bias) { /* no fused bias: out = bias + residual, then accumulate onto it */
            lin_bias_broadcast((T *)out, (const T *)bias, (const T *)residual, N, OUT);
            g.C = NULL, g.beta = 1.0f, g.epilogue = CUBLASLT_EPILOGUE_DEFAULT, g.bias = NULL;
        }
        lin_run("linear_forward", &g);
    }
    cuda_check("linear_forward");
}

template <typename T>
static void lin_backward(void *dinp, float *dweight, float *dbias, const void *dout, const void *inp,
                         const void *weight, int N, int IN, int OUT) {
    if (N <= 0) return;
    if (OUT <= 0 || IN <= 0) { /* empty products: dinp is zero, the weight gradients get nothing */
        if (dinp && IN > 0) cuda_memzero(dinp, sizeof(T) * (size_t)N * IN);
        if (dbias && IN <= 0 && OUT > 0) lin_bias_grad(dbias, (const T *)dout, N, OUT);
        cuda_check("linear_backward");
        return;
    }
    /* dinp[N, IN] = dout[N, OUT] @ W[OUT, IN] (written): column-major dinp^T[IN, N] = W^T[IN, OUT] @
     * dout^T[OUT, N], and W^T, dout^T are exactly how cuBLASLt sees the row-major buffers (op N, N). */
    if (dinp) {
        const lin_gemm g = lin_product(CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, weight, IN, dout, OUT, dinp, IN,
                                       lin_type<T>(), lin_type<T>());
        lin_run("linear_backward", &g);
    }
    /* dweight[OUT, IN] (fp32) += dout^T @ inp: column-major dweight^T[IN, OUT] += inp^T[IN, N] @ dout[N, OUT],
     * where cuBLASLt sees dout as dout^T (OUT x N), hence op T on it; op(B) = dout, whose column sums
     * over k = N are dbias (BGRADB, written to scratch, then added). */
    lin_gemm g = lin_product(CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, inp, IN, dout, OUT, dweight, IN, lin_type<T>(),
                             CUDA_R_32F);
    g.beta = 1.0f;
    const size_t db_bytes = sizeof(float) * (size_t)OUT;
    float *db = dbias ? (float *)cuda_scratch(db_bytes, "linear_backward") : NULL;
    int fused = 0;
    if (db) {
        g.epilogue = CUBLASLT_EPILOGUE_BGRADB, g.bias = db;
        fused = lin_matmul(&g) == CUBLAS_STATUS_SUCCESS;
        if (fused) CUDA_LAUNCH(lin_bias_final_kernel, cuda_blocks(OUT, CUDA_THREADS), CUDA_THREADS, 0)(dbias, db, 1, OUT);
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT, g.bias = NULL;
    }
    if (!fused && lin_run("linear_backward", &g) == 0 && dbias) /* no fused bias gradient: column sums */
        lin_bias_grad(dbias, (const T *)dout, N, OUT);
    if (db) cuda_release(db, db_bytes);
    cuda_check("linear_backward");
}

/* act = gelu_tanh(pre) (forward fallback), or, in place, d = d * gelu_tanh'(pre) (backward fallback). */
template <typename T, bool GRAD>
__global__ void lin_gelu_kernel(T *out, const T *pre, int64_t n) {
    CUDA_FOR(i, n) {
        const float x = cuda_ld(pre + i);
        cuda_st(out + i, GRAD ? cuda_ld(out + i) * cuda_gelu_tanh_grad(x) : cuda_gelu_tanh(x));
    }
}

template <typename T>
static void lin_gelu_forward(void *act, void *pre, const void *inp, const void *weight, const void *bias, int N,
                             int IN, int OUT) {
    if (N <= 0 || OUT <= 0) return;
    if (IN > 0) {
        /* act^T = gelu(W inp^T + bias), pre^T = W inp^T + bias in the aux matrix */
        lin_gemm g = lin_product(CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, weight, IN, inp, IN, act, OUT, lin_type<T>(),
                                 lin_type<T>());
        g.aux = pre, g.aux_ld = OUT;
        g.epilogue = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX, g.bias = (void *)bias;
        if (lin_matmul(&g) == CUBLAS_STATUS_SUCCESS) {
            cuda_check("linear_gelu_forward");
            return;
        }
    }
    lin_forward<T>(pre, inp, weight, bias, NULL, N, IN, OUT);
    const int64_t n = (int64_t)N * OUT;
    CUDA_LAUNCH((lin_gelu_kernel<T, false>), cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)((T *)act, (const T *)pre, n);
    cuda_check("linear_gelu_forward");
}

template <typename T>
static void lin_dgelu_backward(void *dpre, float *dweight, float *dbias, const void *dout, const void *inp,
                               const void *weight, const void *pre, int N, int IN, int OUT) {
    if (N <= 0 || IN <= 0) return;
    int fused = 0;
    if (OUT > 0) { /* dpre^T = dgelu(W^T dout^T, pre^T): the dinp product of lin_backward with the DGELU epilogue */
        lin_gemm g = lin_product(CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, weight, IN, dout, OUT, dpre, IN, lin_type<T>(),
                                 lin_type<T>());
        g.aux = pre, g.aux_ld = IN, g.epilogue = CUBLASLT_EPILOGUE_DGELU;
        fused = lin_matmul(&g) == CUBLAS_STATUS_SUCCESS;
    }
    lin_backward<T>(fused ? NULL : dpre, dweight, dbias, dout, inp, weight, N, IN, OUT);
    if (!fused) { /* dpre holds dout @ W: times the GELU's derivative, in place */
        const int64_t n = (int64_t)N * IN;
        CUDA_LAUNCH((lin_gelu_kernel<T, true>), cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)((T *)dpre,
                                                                                           (const T *)pre, n);
    }
    cuda_check("linear_dgelu_backward");
}

/* ---- grouped linear (the MoE experts) ---- */

/* One grouped GEMM as cublasGemmGroupedBatchedEx takes it: a problem per non-empty group (group_size
 * 1), shapes and scalars on the host; the operand pointers, each group's extra pointer (bias or dbias)
 * and the row offsets in one device table. */
typedef struct {
    int count, G;
    int *m, *n, *k, *lda, *ldb, *ldc, *size;
    float *alpha, *beta;
    const void **ptr; /* host: the device table's contents (lin_grouped_table_bytes) */
    void *dev;        /* device: the pointers, then first[G + 1] */
    size_t dev_bytes;
    cublasOperation_t *tas, *tbs;
} lin_grouped;

static void lin_grouped_free(lin_grouped *b) {
    if (b->dev) cuda_release(b->dev, b->dev_bytes);
    free(b->m), free(b->alpha), free(b->ptr), free(b->tas);
}

/* The problems for rows first[g] .. first[g + 1] of each group: ld, op and the per-group operands come
 * from the caller through add. Returns 0, or -1 with the error recorded for op. */
/* The device table's bytes: the pointers A[G], B[G], C[G], extra[G], then first[G + 1]. */
static size_t lin_grouped_table_bytes(int G) { return sizeof(void *) * (size_t)(4 * G) + sizeof(int64_t) * (size_t)(G + 1); }

static int lin_grouped_init(lin_grouped *b, int G, const char *op) {
    memset(b, 0, sizeof *b);
    b->G = G;
    b->m = (int *)calloc((size_t)7 * G + 7, sizeof(int));
    b->alpha = (float *)calloc((size_t)2 * G + 2, sizeof(float));
    b->ptr = (const void **)calloc(1, lin_grouped_table_bytes(G));
    b->tas = (cublasOperation_t *)calloc((size_t)2 * G + 2, sizeof(cublasOperation_t));
    if (!b->m || !b->alpha || !b->ptr || !b->tas) {
        lin_grouped_free(b);
        cuda_record(op, "out of host memory for a grouped GEMM of %d groups", G);
        return -1;
    }
    b->n = b->m + G + 1, b->k = b->n + G + 1, b->lda = b->k + G + 1, b->ldb = b->lda + G + 1;
    b->ldc = b->ldb + G + 1, b->size = b->ldc + G + 1, b->beta = b->alpha + G + 1, b->tbs = b->tas + G + 1;
    return 0;
}

static void lin_grouped_add(lin_grouped *b, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *A, int lda, const void *B, int ldb, void *C, int ldc, float beta) {
    const int i = b->count++;
    b->tas[i] = ta, b->tbs[i] = tb, b->m[i] = m, b->n[i] = n, b->k[i] = k, b->lda[i] = lda, b->ldb[i] = ldb;
    b->ldc[i] = ldc, b->size[i] = 1, b->alpha[i] = 1.0f, b->beta[i] = beta;
    b->ptr[i] = A, b->ptr[b->G + i] = B, b->ptr[2 * b->G + i] = C;
}

/* Uploads the table (A, B, C of the problems, extra[G], first[G + 1]); 0, or -1 recorded. */
static int lin_grouped_upload(lin_grouped *b, const void *const *extra, const int64_t *first, const char *op) {
    b->dev_bytes = lin_grouped_table_bytes(b->G);
    b->dev = cuda_scratch(b->dev_bytes, op);
    if (!b->dev) return -1;
    for (int g = 0; g < b->G; g++) b->ptr[3 * b->G + g] = extra ? extra[g] : NULL;
    memcpy(b->ptr + 4 * b->G, first, sizeof(int64_t) * (size_t)(b->G + 1));
    /* pageable source: staged before the call returns, so the host table can change or go after it */
    cuda_record_cuda(op, cudaMemcpyAsync(b->dev, b->ptr, b->dev_bytes, cudaMemcpyHostToDevice, cuda_ctx.stream));
    return 0;
}
static void *const *lin_grouped_dev(const lin_grouped *b, int which) { return (void *const *)b->dev + which * b->G; }
static const int64_t *lin_grouped_first(const lin_grouped *b) {
    return (const int64_t *)((const char *)b->dev + sizeof(void *) * (size_t)(4 * b->G));
}

static cublasStatus_t lin_grouped_run(const lin_grouped *b, cudaDataType_t ab, cudaDataType_t c) {
    if (!b->count) return CUBLAS_STATUS_SUCCESS;
    return cublasGemmGroupedBatchedEx(lin_blas, b->tas, b->tbs, b->m, b->n, b->k, b->alpha,
                                      (const void *const *)lin_grouped_dev(b, 0), ab, b->lda,
                                      (const void *const *)lin_grouped_dev(b, 1), ab, b->ldb, b->beta,
                                      lin_grouped_dev(b, 2), c, b->ldc, b->count, b->size, CUBLAS_COMPUTE_32F);
}

/* out rows of group g = bias[g] (blockIdx.y = g). */
template <typename T>
__global__ void lin_grouped_bias_kernel(T *out, void *const *bias, const int64_t *first, int OUT) {
    const int g = blockIdx.y;
    const T *b = (const T *)bias[g];
    T *o = out + first[g] * OUT;
    CUDA_FOR(i, (first[g + 1] - first[g]) * OUT) o[i] = b[i % OUT];
}

/* dbias[g][j] (fp32) += column j of group g's rows of dout, summed in row order (deterministic). */
template <typename T>
__global__ void lin_grouped_bias_grad_kernel(void *const *dbias, const T *dout, const int64_t *first, int OUT) {
    const int g = blockIdx.y;
    float *db = (float *)dbias[g];
    CUDA_FOR(j, OUT) {
        float s = 0.0f;
        for (int64_t r = first[g]; r < first[g + 1]; r++) s += cuda_ld(dout + r * OUT + j);
        db[j] += s;
    }
}

template <typename T>
static void lin_grouped_forward(void *out, const void *inp, const void *const *weight, const void *const *bias,
                                const int64_t *first, int G, int IN, int OUT) {
    const char *op = "grouped_linear_forward";
    if (G <= 0 || first[G] <= 0 || OUT <= 0) return;
    lin_grouped b;
    if (lin_grouped_init(&b, G, op)) return;
    /* per group, column-major out_g^T[OUT, n] = W_g (op T) @ inp_g^T, onto the bias when there is one */
    for (int g = 0; g < G; g++) {
        const int n = (int)(first[g + 1] - first[g]);
        if (n > 0 && IN > 0)
            lin_grouped_add(&b, CUBLAS_OP_T, CUBLAS_OP_N, OUT, n, IN, weight[g], IN,
                            (const T *)inp + first[g] * IN, IN, (T *)out + first[g] * OUT, OUT, bias ? 1.0f : 0.0f);
    }
    if (lin_grouped_upload(&b, (const void *const *)bias, first, op) == 0) {
        if (bias)
            CUDA_LAUNCH(lin_grouped_bias_kernel<T>, dim3(cuda_blocks(first[G] * OUT / G + 1, CUDA_THREADS), G),
                        CUDA_THREADS, 0)((T *)out, lin_grouped_dev(&b, 3), lin_grouped_first(&b), OUT);
        else if (IN <= 0)
            cuda_memzero(out, sizeof(T) * (size_t)first[G] * OUT);
        const cublasStatus_t s = lin_grouped_run(&b, lin_type<T>(), lin_type<T>());
        if (s != CUBLAS_STATUS_SUCCESS) cuda_record(op, "cuBLAS grouped GEMM (%d experts): %s", b.count,
                                                    cublasGetStatusString(s));
    }
    lin_grouped_free(&b);
    cuda_check(op);
}

template <typename T>
static void lin_grouped_backward(void *dinp, float *const *dweight, float *const *dbias, const void *dout,
                                 const void *inp, const void *const *weight, const int64_t *first, int G, int IN,
                                 int OUT) {
    const char *op = "grouped_linear_backward";
    if (G <= 0 || first[G] <= 0 || IN <= 0) return;
    if (OUT <= 0) { /* empty products: dinp is zero, the weights get nothing */
        if (dinp) cuda_memzero(dinp, sizeof(T) * (size_t)first[G] * IN);
        cuda_check(op);
        return;
    }
    lin_grouped di, dw;
    if (lin_grouped_init(&di, G, op)) return;
    if (lin_grouped_init(&dw, G, op)) {
        lin_grouped_free(&di);
        return;
    }
    for (int g = 0; g < G; g++) {
        const int n = (int)(first[g + 1] - first[g]);
        if (n <= 0) continue;
        const T *dy = (const T *)dout + first[g] * OUT, *x = (const T *)inp + first[g] * IN;
        /* dinp_g^T[IN, n] = W_g^T @ dout_g^T (op N, N); dweight_g^T[IN, OUT] += inp_g^T @ dout_g (op T on dout) */
        if (dinp) lin_grouped_add(&di, CUBLAS_OP_N, CUBLAS_OP_N, IN, n, OUT, weight[g], IN, dy, OUT,
                                  (T *)dinp + first[g] * IN, IN, 0.0f);
        lin_grouped_add(&dw, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, n, x, IN, dy, OUT, dweight[g], IN, 1.0f);
    }
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    if (dinp && lin_grouped_upload(&di, NULL, first, op) == 0) s = lin_grouped_run(&di, lin_type<T>(), lin_type<T>());
    if (s != CUBLAS_STATUS_SUCCESS)
        cuda_record(op, "cuBLAS grouped GEMM (%d experts): %s", di.count, cublasGetStatusString(s));
    if (lin_grouped_upload(&dw, (const void *const *)dbias, first, op) == 0) {
        s = lin_grouped_run(&dw, lin_type<T>(), CUDA_R_32F);
        if (s == CUBLAS_STATUS_SUCCESS && dbias) {
            CUDA_LAUNCH(lin_grouped_bias_grad_kernel<T>, dim3(cuda_blocks(OUT, CUDA_THREADS), G), CUDA_THREADS, 0)(
                lin_grouped_dev(&dw, 3), (const T *)dout, lin_grouped_first(&dw), OUT);
        } else if (s == CUBLAS_STATUS_NOT_SUPPORTED) { /* no grouped form for this type: expert by expert */
            for (int g = 0; g < G; g++)
                if (first[g + 1] > first[g])
                    lin_backward<T>(NULL, dweight[g], dbias ? dbias[g] : NULL, (const T *)dout + first[g] * OUT,
                                    (const T *)inp + first[g] * IN, weight[g], (int)(first[g + 1] - first[g]), IN, OUT);
        } else if (s != CUBLAS_STATUS_SUCCESS) {
            cuda_record(op, "cuBLAS grouped GEMM (%d experts): %s", dw.count, cublasGetStatusString(s));
        }
    }
    lin_grouped_free(&di), lin_grouped_free(&dw);
    cuda_check(op);
}

void cuda_linear_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, grouped_linear_forward, lin_grouped_forward);
    CUDA_SET_OP(f32, bf16, grouped_linear_backward, lin_grouped_backward);
    CUDA_SET_OP(f32, bf16, linear_forward, lin_forward);
    CUDA_SET_OP(f32, bf16, linear_backward, lin_backward);
    CUDA_SET_OP(f32, bf16, linear_gelu_forward, lin_gelu_forward);
    CUDA_SET_OP(f32, bf16, linear_dgelu_backward, lin_dgelu_backward);
}

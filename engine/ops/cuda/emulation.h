/* A host emulation of the CUDA subset the plugin uses, so that the plugin's own sources (kernels,
 * launchers, allocator, table) build as plain C++ with -DLT_CUDA_EMULATION and run through
 * tests/cuda/ops_test.c on a machine without a GPU. Not a simulator of performance or of the memory
 * model: it checks index arithmetic, bounds, the use of __syncthreads and warp shuffles, launch
 * configurations and the op contracts.
 *
 * How kernels run: one block at a time; each CUDA thread is a coroutine (its own stack, switched with
 * _setjmp/_longjmp; created once per slot with makecontext and reused). A thread runs until it reaches
 * __syncthreads, a warp shuffle or its end. __syncthreads releases when every thread of the block waits
 * there; a shuffle when all 32 lanes of the warp wait at a shuffle (full mask). Anything else (a barrier
 * some threads never reach, a shuffle with lanes missing, a partial warp) is a bug of the kernel: the
 * emulator prints it and aborts. Threads run in forward order in even blocks and in reverse order in odd
 * ones, so a missing barrier between a shared-memory write and another thread's read shows up as wrong
 * results. Device memory and dynamic shared memory start filled with 0xFF bytes (NaN), so reading what
 * was never written shows up too. Launches are checked as CUDA checks them (block <= 1024 threads, grid
 * y/z <= 65535, dynamic shared memory above 48 KiB only after cudaFuncSetAttribute) and fail with
 * cudaGetLastError the way CUDA does. Events (the plugin's profile) take the host's clock when recorded:
 * emulated work is done when its call returns. cublasLtMatmul is a plain loop over operands widened to
 * fp32, rounding a bf16 D once at the end (what tensor cores with fp32 accumulation compute, up to the
 * order of the sums), with the bias and bias-gradient epilogues. __nv_bfloat16 is a 16-bit struct with the
 * conversions of cuda_bf16.h (round to nearest even; a NaN becomes the canonical 0x7FFF, as the GPU's
 * cvt.rn.bf16.f32 does). __syncwarp is a warp barrier (all 32 lanes, like a shuffle). The tensor-core
 * instruction mma.sync m16n8k16 (bf16 inputs, fp32 accumulators) and the fragment load ldmatrix .x4 are
 * warp-collective calls with the fragment layouts of the PTX ISA; mma computes d = a b + c in fp32
 * from the exact bf16 products.
 *
 * Build with -U_FORTIFY_SOURCE (its longjmp check rejects jumps between stacks) and single-threaded
 * use of the backend. */
#ifndef LT_CUDA_EMULATION_H
#define LT_CUDA_EMULATION_H
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>

#include <tuple>
#include <utility>

/* ---------------- types and qualifiers ---------------- */

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
    unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) {
    uint4 r = {a, b, c, d};
    return r;
}

/* bf16 (cuda_bf16.h): the top half of an fp32. */
struct __nv_bfloat16 {
    unsigned short __x;
};
typedef __nv_bfloat16 nv_bfloat16;
static inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.__x = 0x7fff; /* cvt.rn.bf16.f32: the canonical NaN */
        return h;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.__x = (unsigned short)(u >> 16);
    return h;
}
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, sizeof u);
    return u;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__ static /* one block runs at a time: a static is that block's shared memory */

/* ---------------- runtime API ---------------- */

typedef enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
} cudaError_t;
typedef enum {
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
} cudaMemcpyKind;
typedef enum { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 } cudaFuncAttribute;
typedef struct emu_stream *cudaStream_t;
#define cudaStreamNonBlocking 0x01

typedef struct {
    char name[256];
    int major, minor, multiProcessorCount;
    size_t totalGlobalMem, sharedMemPerBlockOptin;
} cudaDeviceProp;

inline cudaError_t emu_last_error = cudaSuccess;
static inline cudaError_t emu_fail(cudaError_t e) {
    if (emu_last_error == cudaSuccess) emu_last_error = e;
    return e;
}

static inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    }
    return "cudaErrorUnknown";
}
static inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    }
    return "unknown error";
}
static inline cudaError_t cudaGetLastError(void) {
    cudaError_t e = emu_last_error;
    emu_last_error = cudaSuccess;
    return e;
}
static inline cudaError_t cudaPeekAtLastError(void) { return emu_last_error; }
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : emu_fail(cudaErrorInvalidValue); }
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (d != 0) return emu_fail(cudaErrorInvalidValue);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulation on the CPU");
    p->major = 9, p->minor = 0;
    p->multiProcessorCount = 132; /* an H100's: the same grid shapes as on the GPU */
    p->totalGlobalMem = (size_t)16 << 30;
    p->sharedMemPerBlockOptin = 227 * 1024;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    (void)flags;
    *s = (cudaStream_t)(uintptr_t)0x5700;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    (void)s;
    return cudaSuccess;
}
#define EMU_MAX_ALLOC ((size_t)8 << 30)
static inline cudaError_t cudaMalloc(void **p, size_t n) {
    *p = NULL;
    if (n > EMU_MAX_ALLOC) return emu_fail(cudaErrorMemoryAllocation);
    void *q = NULL;
    if (posix_memalign(&q, 256, n ? n : 1) != 0) return emu_fail(cudaErrorMemoryAllocation);
    memset(q, 0xFF, n); /* NaN: reads of never-written memory show */
    *p = q;
    return cudaSuccess;
}
static inline cudaError_t cudaFree(void *p) {
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    (void)s;
    if (!p) return emu_fail(cudaErrorInvalidValue);
    memset(p, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s) {
    (void)k, (void)s;
    if (!dst || !src) return emu_fail(cudaErrorInvalidValue);
    memmove(dst, src, n);
    return cudaSuccess;
}

/* Events: every emulated operation has finished when its call returns, so an event is complete as soon
 * as it is recorded and its time is the host's monotonic clock at the record. ElapsedTime of an event
 * never recorded fails, as on the GPU. */
typedef struct emu_event {
    double ms;
    int recorded;
} *cudaEvent_t;
static inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = (cudaEvent_t)calloc(1, sizeof **e);
    return *e ? cudaSuccess : emu_fail(cudaErrorMemoryAllocation);
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    free(e);
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    (void)s;
    if (!e) return emu_fail(cudaErrorInvalidResourceHandle);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->ms = (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
    e->recorded = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaEventQuery(cudaEvent_t e) {
    return e ? cudaSuccess : emu_fail(cudaErrorInvalidResourceHandle);
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    return e ? cudaSuccess : emu_fail(cudaErrorInvalidResourceHandle);
}
static inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms || !start || !end || !start->recorded || !end->recorded) return emu_fail(cudaErrorInvalidResourceHandle);
    *ms = (float)(end->ms - start->ms);
    return cudaSuccess;
}

/* cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel. */
#define EMU_MAX_FUNCS 256
inline const void *emu_func_ptr[EMU_MAX_FUNCS];
inline int emu_func_smem[EMU_MAX_FUNCS];
inline int emu_nfuncs;
static inline int *emu_func_slot(const void *f, int create) {
    for (int i = 0; i < emu_nfuncs; i++)
        if (emu_func_ptr[i] == f) return &emu_func_smem[i];
    if (!create || emu_nfuncs == EMU_MAX_FUNCS) return NULL;
    emu_func_ptr[emu_nfuncs] = f;
    emu_func_smem[emu_nfuncs] = 48 * 1024;
    return &emu_func_smem[emu_nfuncs++];
}
static inline cudaError_t cudaFuncSetAttribute(const void *f, cudaFuncAttribute a, int v) {
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > 227 * 1024)
        return emu_fail(cudaErrorInvalidValue);
    int *slot = emu_func_slot(f, 1);
    if (!slot) return emu_fail(cudaErrorInvalidValue);
    *slot = v;
    return cudaSuccess;
}

/* ---------------- cuBLASLt ---------------- */

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum {
    CUBLASLT_EPILOGUE_DEFAULT = 1,
    CUBLASLT_EPILOGUE_BIAS = 4,
    CUBLASLT_EPILOGUE_GELU_AUX = 32 | 128,
    CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4,
    CUBLASLT_EPILOGUE_DGELU = 64 | 128,
    CUBLASLT_EPILOGUE_BGRADB = 512
} cublasLtEpilogue_t;
typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26
} cublasLtMatmulDescAttributes_t;
typedef enum {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8
} cublasLtMatmulPreferenceAttributes_t;
typedef struct emu_lt *cublasLtHandle_t;
struct emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t ta, tb;
    uint32_t epilogue;
    void *bias;
    int32_t bias_type; /* -1: D's type */
    void *aux;         /* the GELU epilogues' input matrix (D's type and layout, pitch aux_ld) */
    int64_t aux_ld;
};
typedef emu_lt_desc *cublasLtMatmulDesc_t;
struct emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};
typedef emu_lt_layout *cublasLtMatrixLayout_t;
struct emu_lt_pref {
    uint64_t workspace;
    uint32_t align[4]; /* A, B, C, D: the alignment the caller promises its pointers have */
};
typedef emu_lt_pref *cublasLtMatmulPreference_t;
typedef struct {
    uint64_t data[8]; /* emulated: a tag, the promised alignments, the workspace the algorithm needs */
} cublasLtMatmulAlgo_t;
typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;
#define EMU_LT_ALGO_TAG 0x4C7A6C67ull

static inline const char *cublasLtGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS         ? "CUBLAS_STATUS_SUCCESS"
           : s == CUBLAS_STATUS_NOT_SUPPORTED ? "CUBLAS_STATUS_NOT_SUPPORTED"
                                              : "CUBLAS_STATUS_INVALID_VALUE";
}
static inline cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = (cublasLtHandle_t)(uintptr_t)0xB1A5;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t c, cudaDataType_t s) {
    if (c != CUBLAS_COMPUTE_32F || s != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
    *d = new emu_lt_desc{c, s, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, NULL, -1, NULL, 0};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
/* Attributes are copied by value and must have their documented size. */
static inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                                            const void *buf, size_t size) {
    switch (a) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
        if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(a == CUBLASLT_MATMUL_DESC_TRANSA ? &d->ta : &d->tb, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
        if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->epilogue, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
        if (size != sizeof(int64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux_ld, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
        if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias_type, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}
static inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t t, uint64_t rows,
                                                        uint64_t cols, int64_t ld) {
    if (ld < 1 || (uint64_t)ld < rows) return CUBLAS_STATUS_INVALID_VALUE; /* column-major */
    *l = new emu_lt_layout{t, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new emu_lt_pref{0, {256, 256, 256, 256}}; /* cuBLASLt's defaults */
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                                  cublasLtMatmulPreferenceAttributes_t a,
                                                                  const void *buf, size_t size) {
    if (a == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
        memcpy(&p->workspace, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (a >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && a <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES &&
        size == sizeof(uint32_t)) {
        memcpy(&p->align[a - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

/* The shapes and types the plugin's products may have: A and B both fp32 or both bf16, C = D, fp32 or
 * (with bf16 A and B) bf16; op(A) m x k, op(B) k x n, D m x n; an epilogue with its bias or aux pointer. */
static inline int emu_lt_gelu(uint32_t e) {
    return e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU;
}
static inline int emu_lt_valid(const emu_lt_desc *d, const emu_lt_layout *a, const emu_lt_layout *b,
                               const emu_lt_layout *c, const emu_lt_layout *dd) {
    const uint64_t m = dd->rows, n = dd->cols, k = d->ta == CUBLAS_OP_N ? a->cols : a->rows;
    return a->type == b->type && (a->type == CUDA_R_32F || a->type == CUDA_R_16BF) && c->type == dd->type &&
           c->rows == m && c->cols == n && c->ld == dd->ld && (dd->type == CUDA_R_32F || a->type == CUDA_R_16BF) &&
           (d->ta == CUBLAS_OP_N ? a->rows : a->cols) == m && (d->tb == CUBLAS_OP_N ? b->rows : b->cols) == k &&
           (d->tb == CUBLAS_OP_N ? b->cols : b->rows) == n &&
           ((d->epilogue != CUBLASLT_EPILOGUE_BIAS && d->epilogue != CUBLASLT_EPILOGUE_GELU_AUX_BIAS &&
             d->epilogue != CUBLASLT_EPILOGUE_BGRADB) || d->bias) &&
           (!emu_lt_gelu(d->epilogue) || (d->aux && (uint64_t)d->aux_ld >= m)) &&
           (d->bias_type == -1 || d->bias_type == (int32_t)dd->type) &&
           (d->epilogue == CUBLASLT_EPILOGUE_DEFAULT || d->epilogue == CUBLASLT_EPILOGUE_BIAS ||
            d->epilogue == CUBLASLT_EPILOGUE_BGRADB || emu_lt_gelu(d->epilogue));
}

/* One algorithm for every valid product; none (NOT_SUPPORTED) with LUATRON_EMULATE_NO_LT_EPILOGUE=1 for
 * products with an epilogue, as a library without those fusions answers, so tests reach the plugin's
 * fallback. The algorithm remembers the alignments the caller promised, for cublasLtMatmul to check. */
static inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t d,
                                                            cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                            cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd,
                                                            cublasLtMatmulPreference_t p, int requested,
                                                            cublasLtMatmulHeuristicResult_t *r, int *found) {
    *found = 0;
    if (requested < 1 || !emu_lt_valid(d, a, b, c, dd)) return CUBLAS_STATUS_INVALID_VALUE;
    const char *no = getenv("LUATRON_EMULATE_NO_LT_EPILOGUE");
    if (no && *no == '1' && d->epilogue != CUBLASLT_EPILOGUE_DEFAULT) return CUBLAS_STATUS_NOT_SUPPORTED;
    /* the library's rule for the GELU input matrix: "leading dimension ... must be divisible by 8" */
    if (emu_lt_gelu(d->epilogue) && d->aux_ld % 8 != 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(r, 0, sizeof *r);
    r->algo.data[0] = EMU_LT_ALGO_TAG;
    for (int i = 0; i < 4; i++) r->algo.data[1 + i] = p->align[i];
    r->workspaceSize = p->workspace < ((size_t)1 << 20) ? p->workspace : ((size_t)1 << 20);
    r->algo.data[5] = r->workspaceSize;
    r->state = CUBLAS_STATUS_SUCCESS;
    r->wavesCount = 1.0f;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

/* Column-major P[m, n] = op(A)[m, k] op(B)[k, n] in fp32 (a plain loop). */
static inline void emu_sgemm(int ta, int tb, int m, int n, int k, const float *A, int64_t lda, const float *B,
                             int64_t ldb, float *P, int64_t ldp) {
    float *col = (float *)malloc(sizeof(float) * (size_t)(k > 0 ? k : 1));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(m > 0 ? m : 1));
    for (int j = 0; j < n; j++) {
        for (int l = 0; l < k; l++) col[l] = tb == CUBLAS_OP_N ? B[l + (size_t)j * ldb] : B[j + (size_t)l * ldb];
        for (int i = 0; i < m; i++) acc[i] = 0.0f;
        if (ta == CUBLAS_OP_T) { /* A^T(i, l) = A[l + i lda]: a dot product along l */
            for (int i = 0; i < m; i++)
                for (int l = 0; l < k; l++) acc[i] += A[(size_t)i * lda + l] * col[l];
        } else { /* A(i, l) = A[i + l lda]: axpy of columns of A */
            for (int l = 0; l < k; l++)
                for (int i = 0; i < m; i++) acc[i] += A[i + (size_t)l * lda] * col[l];
        }
        for (int i = 0; i < m; i++) P[i + (size_t)j * ldp] = acc[i];
    }
    free(col), free(acc);
}
/* A column-major rows x cols matrix of type t with leading dimension ld, widened to fp32 (exact), keeping ld. */
static inline float *emu_widen_matrix(const void *X, cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld) {
    const size_t n = cols ? (size_t)ld * (size_t)(cols - 1) + (size_t)rows : 0;
    float *f = (float *)malloc(sizeof(float) * (n ? n : 1));
    if (!f) abort();
    for (size_t i = 0; i < n; i++)
        f[i] = t == CUDA_R_32F ? ((const float *)X)[i] : __bfloat162float(((const __nv_bfloat16 *)X)[i]);
    return f;
}
static inline void emu_store(void *X, cudaDataType_t t, size_t i, float v) {
    if (t == CUDA_R_32F) ((float *)X)[i] = v;
    else ((__nv_bfloat16 *)X)[i] = __float2bfloat16_rn(v);
}

/* GELU's tanh approximation, as cuBLASLt's GELU epilogues compute it, and its derivative. */
static inline float emu_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
static inline float emu_gelu_tanh_grad(float x) {
    const float t = tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * x * x);
}

/* D = alpha op(A) op(B) + beta C (+ bias[i] down the rows: EPILOGUE_BIAS), accumulated in fp32 from the
 * widened operands and stored once (a bf16 D rounded once: what tensor cores with fp32 accumulation
 * compute, up to the order of the sums); EPILOGUE_BGRADB also writes bias[j] = sum over k of op(B)'s
 * column j, in D's type; GELU_AUX(_BIAS) stores that value in aux and its GELU in D; DGELU multiplies
 * it by the GELU's derivative at aux. Checks the algorithm came from the heuristic, that every pointer
 * has the alignment promised there, and that the workspace it asked for is given. */
static inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                                            cublasLtMatrixLayout_t la, const void *B, cublasLtMatrixLayout_t lb,
                                            const void *beta, const void *C, cublasLtMatrixLayout_t lc, void *D,
                                            cublasLtMatrixLayout_t ld, const cublasLtMatmulAlgo_t *algo,
                                            void *workspace, size_t workspace_bytes, cudaStream_t) {
    if (!algo || algo->data[0] != EMU_LT_ALGO_TAG || !emu_lt_valid(d, la, lb, lc, ld))
        return CUBLAS_STATUS_INVALID_VALUE;
    const void *ptrs[4] = {A, B, C, D};
    for (int i = 0; i < 4; i++)
        if ((uintptr_t)ptrs[i] % algo->data[1 + i]) {
            fprintf(stderr, "CUDA EMULATION: cublasLtMatmul: pointer %c is not %llu-byte aligned as promised\n",
                    "ABCD"[i], (unsigned long long)algo->data[1 + i]);
            abort();
        }
    if (workspace_bytes < algo->data[5] || (algo->data[5] && !workspace)) return CUBLAS_STATUS_INVALID_VALUE;
    const int m = (int)ld->rows, n = (int)ld->cols, k = (int)(d->ta == CUBLAS_OP_N ? la->cols : la->rows);
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float al = *(const float *)alpha, b = *(const float *)beta;
    float *a = emu_widen_matrix(A, la->type, la->rows, la->cols, la->ld);
    float *bb = emu_widen_matrix(B, lb->type, lb->rows, lb->cols, lb->ld);
    float *c = b != 0.0f ? emu_widen_matrix(C, lc->type, lc->rows, lc->cols, lc->ld)
                         : (float *)calloc((size_t)ld->ld * (size_t)(n - 1) + (size_t)m, sizeof(float));
    float *p = (float *)malloc(sizeof(float) * ((size_t)ld->ld * (size_t)(n - 1) + (size_t)m));
    if (!c || !p) abort();
    emu_sgemm(d->ta, d->tb, m, n, k, a, la->ld, bb, lb->ld, p, ld->ld);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            const size_t o = (size_t)j * ld->ld + i;
            float v = al * p[o] + (b != 0.0f ? b * c[o] : 0.0f);
            if (d->epilogue == CUBLASLT_EPILOGUE_BIAS || d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
                v += ld->type == CUDA_R_32F ? ((const float *)d->bias)[i]
                                            : __bfloat162float(((const __nv_bfloat16 *)d->bias)[i]);
            const size_t ao = (size_t)j * (size_t)d->aux_ld + i;
            if (d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX || d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) {
                emu_store(d->aux, ld->type, ao, v);
                v = emu_gelu_tanh(v);
            } else if (d->epilogue == CUBLASLT_EPILOGUE_DGELU) {
                const float x = ld->type == CUDA_R_32F ? ((const float *)d->aux)[ao]
                                                       : __bfloat162float(((const __nv_bfloat16 *)d->aux)[ao]);
                v *= emu_gelu_tanh_grad(x);
            }
            emu_store(D, ld->type, o, v);
        }
    if (d->epilogue == CUBLASLT_EPILOGUE_BGRADB)
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int l = 0; l < k; l++) s += d->tb == CUBLAS_OP_N ? bb[l + (size_t)j * lb->ld] : bb[j + (size_t)l * lb->ld];
            emu_store(d->bias, ld->type, (size_t)j, s);
        }
    free(a), free(bb), free(c), free(p);
    return CUBLAS_STATUS_SUCCESS;
}

/* ---------------- cuBLAS: the grouped GEMM ---------------- */

typedef struct emu_cublas *cublasHandle_t;
static inline const char *cublasGetStatusString(cublasStatus_t s) { return cublasLtGetStatusString(s); }
static inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = (cublasHandle_t)(uintptr_t)0xB1A6;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }

/* Column-major C_p = alpha_g op(A_p) op(B_p) + beta_g C_p for problem p of group g (group_size[g] problems
 * each, sharing the group's shape), the pointer arrays read from device memory as the library does, each
 * problem as cublasLtMatmul computes it (fp32 sums, one rounding). Only A = B = C types with fp32 compute,
 * the combinations cuBLAS documents for this call: bf16 inputs with an fp32 C are NOT_SUPPORTED there,
 * so the same is answered here and the caller's fallback runs. */
static inline cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t, const cublasOperation_t ta[],
                                                        const cublasOperation_t tb[], const int m[], const int n[],
                                                        const int k[], const void *alpha, const void *const A[],
                                                        cudaDataType_t at, const int lda[], const void *const B[],
                                                        cudaDataType_t bt, const int ldb[], const void *beta,
                                                        void *const C[], cudaDataType_t ct, const int ldc[],
                                                        int groups, const int group_size[],
                                                        cublasComputeType_t compute) {
    if (compute != CUBLAS_COMPUTE_32F || at != bt || bt != ct) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (groups < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int g = 0, p = 0; g < groups; p += group_size[g++]) {
        const int rows_a = ta[g] == CUBLAS_OP_N ? m[g] : k[g], rows_b = tb[g] == CUBLAS_OP_N ? k[g] : n[g];
        if (m[g] < 0 || n[g] < 0 || k[g] < 0 || group_size[g] < 0 || lda[g] < (rows_a > 1 ? rows_a : 1) ||
            ldb[g] < (rows_b > 1 ? rows_b : 1) || ldc[g] < (m[g] > 1 ? m[g] : 1))
            return CUBLAS_STATUS_INVALID_VALUE;
        const float al = ((const float *)alpha)[g], be = ((const float *)beta)[g];
        for (int q = p; q < p + group_size[g] && m[g] && n[g]; q++) {
            const size_t span = (size_t)ldc[g] * (size_t)(n[g] - 1) + (size_t)m[g];
            float *a = emu_widen_matrix(A[q], at, ta[g] == CUBLAS_OP_N ? m[g] : k[g],
                                        ta[g] == CUBLAS_OP_N ? k[g] : m[g], lda[g]);
            float *b = emu_widen_matrix(B[q], bt, rows_b, tb[g] == CUBLAS_OP_N ? n[g] : k[g], ldb[g]);
            float *c = be != 0.0f ? emu_widen_matrix(C[q], ct, m[g], n[g], ldc[g]) : NULL;
            float *prod = (float *)malloc(sizeof(float) * span);
            if (!prod || (be != 0.0f && !c)) abort();
            emu_sgemm(ta[g], tb[g], m[g], n[g], k[g], a, lda[g], b, ldb[g], prod, ldc[g]);
            for (int j = 0; j < n[g]; j++)
                for (int i = 0; i < m[g]; i++) {
                    const size_t o = (size_t)j * ldc[g] + i;
                    emu_store(C[q], ct, o, al * prod[o] + (be != 0.0f ? be * c[o] : 0.0f));
                }
            free(a), free(b), free(c), free(prod);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

/* ---------------- threads ---------------- */

enum { EMU_READY, EMU_BARRIER, EMU_SHFL, EMU_DONE };
#define EMU_STACK (256 * 1024)

typedef struct {
    jmp_buf jb;
    ucontext_t uc;
    char *stack;
    int started;
    int state;
    int linear; /* linear thread index in the block */
    dim3 tid;
    uint64_t shfl_val, shfl_res;
    int shfl_src;
} emu_thread;

inline emu_thread emu_threads[1024];
inline emu_thread *emu_cur;
inline jmp_buf emu_sched_jb;
inline void (*emu_body)(void *);
inline void *emu_body_arg;
inline dim3 emu_grid, emu_block, emu_bidx;
inline char *emu_dyn_smem;
inline const char *emu_kernel_name;

#define threadIdx (emu_cur->tid)
#define blockIdx (emu_bidx)
#define blockDim (emu_block)
#define gridDim (emu_grid)

[[noreturn]] static inline void emu_abort(const char *what) {
    fprintf(stderr, "CUDA EMULATION: %s: kernel %s, block (%u, %u, %u)\n", what, emu_kernel_name, emu_bidx.x,
            emu_bidx.y, emu_bidx.z);
    fflush(stderr);
    abort();
}

/* Back to the scheduler; returns when this thread is resumed. */
static inline void emu_yield(void) {
    if (!_setjmp(emu_cur->jb)) _longjmp(emu_sched_jb, 1);
}

/* A slot's coroutine: runs the kernel for whichever thread the scheduler put in it, for ever. */
static void emu_slot_main(void) {
    for (;;) {
        emu_body(emu_body_arg);
        emu_cur->state = EMU_DONE;
        emu_yield();
    }
}

static inline void emu_resume(emu_thread *t) {
    emu_cur = t;
    if (!_setjmp(emu_sched_jb)) {
        if (!t->started) {
            t->started = 1;
            if (!t->stack) t->stack = (char *)malloc(EMU_STACK);
            if (!t->stack) emu_abort("out of memory for a thread stack");
            getcontext(&t->uc);
            t->uc.uc_stack.ss_sp = t->stack;
            t->uc.uc_stack.ss_size = EMU_STACK;
            t->uc.uc_link = NULL;
            makecontext(&t->uc, emu_slot_main, 0);
            setcontext(&t->uc);
        }
        _longjmp(t->jb, 1);
    }
}

static inline void __syncthreads(void) {
    emu_cur->state = EMU_BARRIER;
    emu_yield();
}

template <typename V>
static inline V emu_shfl(V v, int src) {
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    emu_cur->shfl_val = bits;
    emu_cur->shfl_src = src & 31;
    emu_cur->state = EMU_SHFL;
    emu_yield();
    V r;
    bits = emu_cur->shfl_res;
    memcpy(&r, &bits, sizeof r);
    return r;
}
template <typename V>
static inline V __shfl_sync(unsigned mask, V v, int src) {
    if (mask != 0xffffffffu) emu_abort("only full-mask shuffles are emulated");
    return emu_shfl(v, src);
}
template <typename V>
static inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    if (mask != 0xffffffffu) emu_abort("only full-mask shuffles are emulated");
    return emu_shfl(v, (emu_cur->linear & 31) ^ lane_mask);
}

/* __syncwarp (full mask): a barrier of the warp's 32 lanes (the shuffle machinery without data). */
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu_abort("only full-mask __syncwarp is emulated");
    (void)emu_shfl(0, emu_cur->linear & 31);
}

/* ---------------- ldmatrix .x4 (b16) ----------------
 * Warp-collective: lanes 8m .. 8m + 7 give the row addresses of 8 x 8 matrix m (8 b16 each, 16-byte
 * aligned, or the emulator aborts); after a barrier lane 4g + t receives in r[m] the pair (row g,
 * columns 2t, 2t + 1) of matrix m, or with trans the pair (rows 2t, 2t + 1, column g); the lower one
 * in the low half. */
inline const unsigned short *emu_ldm_rows[32][32]; /* [warp of the block][lane] */
static inline void emu_ldmatrix_x4(uint32_t r[4], bool trans, const void *row) {
    const int warp = emu_cur->linear / 32, lane = emu_cur->linear % 32, g = lane >> 2, t = lane & 3;
    if ((uintptr_t)row % 16 != 0) emu_abort("ldmatrix: a row address is not 16-byte aligned");
    emu_ldm_rows[warp][lane] = (const unsigned short *)row;
    __syncwarp();
    for (int m = 0; m < 4; m++) {
        const unsigned short *const *rows = emu_ldm_rows[warp] + 8 * m;
        const unsigned lo = trans ? rows[2 * t][g] : rows[g][2 * t], hi = trans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
        r[m] = lo | (hi << 16);
    }
    __syncwarp(); /* every lane has read the addresses before any lane's next ldmatrix writes them */
}

/* ---------------- mma.sync m16n8k16 (bf16 in, fp32 accumulate) ----------------
 * Warp-collective, as on the GPU: every lane hands in its fragment registers (in the PTX ISA's layout
 * for this shape, lane = 4 g + t: A a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8,
 * 2t+8..); B b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8,
 * 2t..2t+1); bf16 pairs with the lower index in the low half), the warp meets at a barrier, and each
 * lane computes its own four results from everyone's registers: fp32 sums of the exact products,
 * k in order, onto C. A lane missing from the call is a deadlock the emulator reports. */
struct emu_mma_regs {
    uint32_t a[4], b[2];
    float c[4];
};
inline emu_mma_regs emu_mma_stage[32][32]; /* [warp of the block][lane] */
static inline float emu_bf16_half(uint32_t reg, int hi) {
    __nv_bfloat16 h;
    h.__x = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
    return __bfloat162float(h);
}
static inline void emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    const int warp = emu_cur->linear / 32, lane = emu_cur->linear % 32, g = lane >> 2, t = lane & 3;
    emu_mma_regs *st = emu_mma_stage[warp];
    memcpy(st[lane].a, a, sizeof st[lane].a);
    memcpy(st[lane].b, b, sizeof st[lane].b);
    memcpy(st[lane].c, d, sizeof st[lane].c);
    __syncwarp();
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
        float s = st[(r % 8) * 4 + n / 2].c[(r / 8) * 2 + n % 2];
        for (int k = 0; k < 16; k++) {
            const float x = emu_bf16_half(st[(r % 8) * 4 + (k % 8) / 2].a[(k / 8) * 2 + r / 8], k % 2);
            const float y = emu_bf16_half(st[n * 4 + (k % 8) / 2].b[k / 8], k % 2);
            s += x * y;
        }
        out[e] = s;
    }
    __syncwarp(); /* every lane has read the stage before any lane's next mma writes it */
    memcpy(d, out, sizeof out);
}

/* Runs one block to completion. */
static inline void emu_run_block(int nthreads, int reverse) {
    for (int i = 0; i < nthreads; i++) {
        emu_thread *t = &emu_threads[i];
        t->state = EMU_READY;
        t->linear = i;
        t->tid = dim3(i % emu_block.x, (i / emu_block.x) % emu_block.y, i / (emu_block.x * emu_block.y));
    }
    for (;;) {
        for (int k = 0; k < nthreads; k++) {
            emu_thread *t = &emu_threads[reverse ? nthreads - 1 - k : k];
            if (t->state == EMU_READY) emu_resume(t);
        }
        int done = 0, at_barrier = 0, released = 0;
        for (int i = 0; i < nthreads; i++) {
            done += emu_threads[i].state == EMU_DONE;
            at_barrier += emu_threads[i].state == EMU_BARRIER;
        }
        if (done == nthreads) return;
        /* warp shuffles: all 32 lanes must be there */
        for (int w = 0; w * 32 < nthreads; w++) {
            emu_thread *lanes = &emu_threads[w * 32];
            const int nl = nthreads - w * 32 < 32 ? nthreads - w * 32 : 32;
            int at_shfl = 0;
            for (int l = 0; l < nl; l++) at_shfl += lanes[l].state == EMU_SHFL;
            if (at_shfl == 0) continue;
            if (nl < 32) emu_abort("shuffle in a partial warp");
            if (at_shfl < 32) {
                for (int l = 0; l < 32; l++)
                    if (lanes[l].state == EMU_DONE) emu_abort("shuffle while lanes of the warp have exited");
                continue; /* the others wait at __syncthreads: a deadlock, found below */
            }
            for (int l = 0; l < 32; l++) lanes[l].shfl_res = lanes[lanes[l].shfl_src].shfl_val;
            for (int l = 0; l < 32; l++) lanes[l].state = EMU_READY;
            released = 1;
        }
        if (released) continue;
        if (at_barrier == nthreads - done) {
            if (done > 0) emu_abort("__syncthreads not reached by threads that have exited");
            for (int i = 0; i < nthreads; i++) emu_threads[i].state = EMU_READY;
            continue;
        }
        emu_abort("deadlock: threads wait at __syncthreads while others wait at a shuffle");
    }
}

/* The launch: CUDA's configuration checks, then every block in order. */
template <typename... P>
struct emu_launcher {
    void (*kernel)(P...);
    const char *name;
    dim3 grid, block;
    size_t smem;

    template <typename... A>
    void operator()(A &&...args) {
        const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
        int *smem_limit = emu_func_slot((const void *)kernel, 0);
        const size_t smem_max = smem_limit ? (size_t)*smem_limit : 48 * 1024;
        if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
            grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || smem > smem_max) {
            emu_fail(cudaErrorInvalidConfiguration);
            return;
        }
        std::tuple<P...> params(std::forward<A>(args)...);
        struct ctx_t {
            void (*kernel)(P...);
            std::tuple<P...> *params;
        } ctx = {kernel, &params};
        emu_body = [](void *c) {
            ctx_t *x = (ctx_t *)c;
            std::apply(x->kernel, *x->params);
        };
        emu_body_arg = &ctx;
        emu_kernel_name = name;
        emu_grid = grid;
        emu_block = block;
        /* 128-byte aligned, as the GPU's shared memory window is */
        char *dyn = smem ? (char *)aligned_alloc(128, (smem + 127) / 128 * 128) : NULL;
        emu_dyn_smem = dyn;
        unsigned long long nblock = 0;
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) {
                    emu_bidx = dim3(x, y, z);
                    if (dyn) memset(dyn, 0xFF, smem); /* NaN until written */
                    emu_run_block((int)nthreads, (int)(nblock++ & 1));
                }
        free(dyn);
        emu_body_arg = NULL; /* ctx is gone */
        emu_dyn_smem = NULL;
    }
};
template <typename... P>
static inline emu_launcher<P...> emu_launch(void (*kernel)(P...), const char *name, dim3 grid, dim3 block,
                                            size_t smem) {
    return emu_launcher<P...>{kernel, name, grid, block, smem};
}

#define CUDA_LAUNCH(kernel, grid, block, smem) emu_launch(kernel, #kernel, (grid), (block), (size_t)(smem))
#define CUDA_DYNAMIC_SMEM(type, name) type *name = (type *)emu_dyn_smem

/* ---------------- device functions ---------------- */

static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float atomicAdd(float *p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

#endif

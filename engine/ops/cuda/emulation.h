/* A host emulation of the CUDA subset the plugin uses, so that the plugin's own sources (kernels,
 * launchers, allocator, table) build as plain C++ with -DLT_CUDA_EMULATION and run through
 * tests/cuda/ops_test.c on a machine without a GPU. Not a simulator of performance or of the memory
 * model: it checks index arithmetic, bounds, the use of __syncthreads and warp shuffles, launch
 * configurations and the op contracts.
 *
 * How kernels run: one block at a time; each CUDA thread is a coroutine (its own stack, switched with
 * _setjmp/_longjmp; created once per slot with makecontext and reused). A thread runs until it reaches
 * __syncthreads, a warp shuffle or its end. __syncthreads releases when every thread of the block
 * waits there; a shuffle when all 32 lanes of the warp wait at a shuffle (full mask). Anything else
 * (a barrier some threads never reach, a shuffle with lanes missing, a partial warp) is a bug of the
 * kernel: the emulator prints it and aborts. Threads run in forward order in even blocks and in
 * reverse order in odd ones, so a missing barrier between a shared-memory write and another
 * thread's read shows up as wrong results. Device memory and dynamic shared memory start filled with
 * 0xFF bytes (NaN), so reading what was never written shows up too. Launches are checked as CUDA
 * checks them (block <= 1024 threads, grid y/z <= 65535, dynamic shared memory above 48 KiB only after
 * cudaFuncSetAttribute) and fail with cudaGetLastError the way CUDA does. cuBLAS sgemm is a plain loop.
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

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
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
    }
    return "unknown error";
}
static inline cudaError_t cudaGetLastError(void) {
    cudaError_t e = emu_last_error;
    emu_last_error = cudaSuccess;
    return e;
}
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

/* ---------------- cuBLAS ---------------- */

typedef struct emu_cublas *cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;
static inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = (cublasHandle_t)(uintptr_t)0xB1A5;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
static inline const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE";
}
/* Column-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C; C is not read when beta == 0 (BLAS). */
static inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                         const float *beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0 || lda < (ta == CUBLAS_OP_N ? m : k) || lda < 1 ||
        ldb < (tb == CUBLAS_OP_N ? k : n) || ldb < 1 || ldc < m || ldc < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    float *col = (float *)malloc(sizeof(float) * (size_t)(k > 0 ? k : 1));
    for (int j = 0; j < n; j++) {
        for (int l = 0; l < k; l++) col[l] = tb == CUBLAS_OP_N ? B[l + (size_t)j * ldb] : B[j + (size_t)l * ldb];
        float *c = C + (size_t)j * ldc;
        if (ta == CUBLAS_OP_T) { /* A^T(i, l) = A[l + i lda]: a dot product along l */
            for (int i = 0; i < m; i++) {
                const float *a = A + (size_t)i * lda;
                float s = 0.0f;
                for (int l = 0; l < k; l++) s += a[l] * col[l];
                c[i] = *beta == 0.0f ? *alpha * s : *alpha * s + *beta * c[i];
            }
        } else { /* A(i, l) = A[i + l lda]: axpy of columns of A */
            float *acc = (float *)calloc((size_t)(m > 0 ? m : 1), sizeof(float));
            for (int l = 0; l < k; l++) {
                const float *a = A + (size_t)l * lda, b = col[l];
                for (int i = 0; i < m; i++) acc[i] += a[i] * b;
            }
            for (int i = 0; i < m; i++) c[i] = *beta == 0.0f ? *alpha * acc[i] : *alpha * acc[i] + *beta * c[i];
            free(acc);
        }
    }
    free(col);
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
        char *dyn = smem ? (char *)malloc(smem) : NULL;
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

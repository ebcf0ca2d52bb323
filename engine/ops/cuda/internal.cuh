/* Internal declarations of the CUDA backend plugin (luatron_cuda.so), shared by its .cu files.
 *
 * Every op runs on one non-blocking stream (cuda_ctx.stream) in issue order; launch errors go to a
 * sticky slot that synchronize() reports. Each .cu is compiled on its own (no relocatable device
 * code), so device helpers used by several files live here as inline functions.
 *
 * The model's ops come in two tables (lt_ops of backend.h): fp32 and bf16. Each op is one template on
 * the storage type T of activations and of the weights it reads (float or __nv_bfloat16), with the
 * lt_ops signature (void * in, cast inside); its kernels load and store T through cuda_ld / cuda_st
 * and compute in fp32. A bf16 store rounds to nearest even once, at the end of the fp32 computation.
 * Activation gradients are written without being read (ops.h); an accumulating bf16 output (a norm's
 * dinp, += the residual stream's gradient) is read, added to in fp32 and rounded, as the CPU's bf16
 * reference (engine/ops/cpu_tables.c) does. Weight gradients, norm statistics, lse and losses are
 * fp32 in both tables. Each family's .cu sets its entries of both tables (cuda_<family>_ops). */
#ifndef LT_CUDA_INTERNAL_CUH
#define LT_CUDA_INTERNAL_CUH
#include <stddef.h>
#include <stdint.h>

#ifdef LT_CUDA_EMULATION
/* Host C++ build of these sources for tests without a GPU (see emulation.h). */
#include "engine/ops/cuda/emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
/* Launches go through this macro (and dynamic shared memory through the next) so that the same
 * sources also build against emulation.h. Usage: CUDA_LAUNCH(kernel, grid, block, smem)(args...). */
#define CUDA_LAUNCH(kernel, grid, block, smem) kernel<<<(grid), (block), (smem), cuda_ctx.stream>>>
#define CUDA_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

extern "C" {
#include "engine/ops/backend.h"
}

/* ---- the device context (memory.cu) ---- */
typedef struct {
    int device;
    cudaStream_t stream; /* every kernel, copy and cuBLASLt call runs here */
    int sm_count;
    size_t smem_optin;   /* the most dynamic shared memory one block may opt in to */
    int sync_each_op;    /* LUATRON_CUDA_SYNC=1: synchronize after every op so an error names its op */
    int attention_tc;    /* bf16 attention on tensor cores (attention_tc.cu); LUATRON_CUDA_ATTENTION=simt:
                            the fp32-math kernels of attention.cu, as the fp32 table uses */
    int profile;         /* LUATRON_CUDA_PROFILE=1: time every op with events (profile.cu) */
    long long gemm_unfused; /* GEMMs whose epilogue (bias, GELU) cuBLASLt did not fuse (linear.cu's fallback
                               kernels ran instead): in the profile report */
} cuda_context;
extern cuda_context cuda_ctx;

/* Opens the device, its stream and the allocator; 0, or -1 with err. */
int cuda_context_open(int device, char *err, size_t errlen);

/* ---- errors (memory.cu) ---- */
/* Keeps the first error since the last synchronize: "op: message". */
void cuda_record(const char *op, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Records a CUDA runtime error for op and clears the runtime's last-error state (so a later launch
 * check does not blame the next op). No-op for cudaSuccess. */
void cuda_record_cuda(const char *op, cudaError_t e);
/* After an op's launches: cudaGetLastError (and a stream sync under LUATRON_CUDA_SYNC=1). */
void cuda_check(const char *op);
int cuda_synchronize(char *err, size_t errlen);

/* ---- memory (memory.cu) ---- */
void *cuda_alloc(size_t nbytes);
void cuda_release(void *p, size_t nbytes);
void cuda_memzero(void *p, size_t nbytes);
void cuda_to_device(void *dst, const void *host_src, size_t nbytes);
void cuda_to_host(void *host_dst, const void *src, size_t nbytes);
void cuda_copy(void *dst, const void *src, size_t nbytes);
void cuda_memory_stats(size_t *in_use, size_t *peak, size_t *cached);
void cuda_reset_peak(void);
/* Scratch for an op from the caching allocator; NULL (error recorded for op) when out of memory.
 * Release it right after the launches that use it: the block is only reused by work issued later
 * on the same stream, so the kernels already issued finish with it first. */
void *cuda_scratch(size_t nbytes, const char *op);

/* ---- the per-op profile (profile.cu) ---- */
/* Wraps every device entry of be and every op of both tables with event timing (profiling on only). */
void cuda_profile_install(lt_backend *be, lt_ops *f32, lt_ops *bf16);
/* From synchronize, after the stream sync: ok reads every pending pair; !ok (the stream failed) drops them. */
void cuda_profile_collect(int ok);
/* lt_backend.profile_report. */
int cuda_profile_report(char *buf, size_t buflen);

/* ---- nccl.cu: collectives on device memory (lt_backend.comm; NCCL loaded on first use) ---- */
extern const lt_device_comm_ops cuda_nccl_ops;

/* ---- elementwise.cu: fp32 kernels of the backend itself ---- */
void cuda_fill(float *out, int64_t n, float value);
void cuda_fill_normal(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std);
double cuda_sum_squares(const float *x, int64_t n);
void cuda_scale(float *x, int64_t n, float s);
void cuda_cast_to_bf16(void *dst, const float *src, int64_t n);
void cuda_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int64_t step);
void cuda_sgd_update(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                     float weight_decay);

/* ---- the op tables: each family sets its ops in both (f32: T = float, bf16: T = __nv_bfloat16) ---- */
void cuda_elementwise_ops(lt_ops *f32, lt_ops *bf16);   /* gelu, swiglu, add, dropout */
void cuda_embedding_ops(lt_ops *f32, lt_ops *bf16);     /* token and position embeddings */
void cuda_moe_ops(lt_ops *f32, lt_ops *bf16);           /* mixture of experts: the combine */
void cuda_norm_ops(lt_ops *f32, lt_ops *bf16);          /* layernorm, rmsnorm */
int cuda_linear_open(char *err, size_t errlen);          /* the cuBLASLt handle and workspace */
void cuda_linear_ops(lt_ops *f32, lt_ops *bf16);        /* linear (cuBLASLt) */
void cuda_attention_ops(lt_ops *f32, lt_ops *bf16);     /* attention */
/* attention_tc.cu: the bf16 kernels on tensor cores, behind the bf16 table's attention ops (shapes
 * checked there; delta[b, h, t] = dout . out from attention.cu). */
void cuda_attention_tc_forward(__nv_bfloat16 *out, float *lse, const __nv_bfloat16 *qkv, int B, int T, int H, int G,
                               int D, float p, uint64_t key, int head_offset, int heads_total);
void cuda_attention_tc_backward(__nv_bfloat16 *dqkv, const __nv_bfloat16 *dout, const __nv_bfloat16 *qkv,
                                const float *lse, const float *delta, int B, int T, int H, int G, int D, float p,
                                uint64_t key, int head_offset, int heads_total);
/* attention_kv_forward, attention_merge, attention_kv_backward (context parallelism): CUDA-core kernels in
 * both tables (the bf16 one included: no tensor-core path for these) */
void cuda_attention_kv_ops(lt_ops *f32, lt_ops *bf16);
void cuda_rope_ops(lt_ops *f32, lt_ops *bf16);          /* rope */
void cuda_cross_entropy_ops(lt_ops *f32, lt_ops *bf16); /* cross-entropy */

/* Sets one entry of both tables to the float and bf16 instances of a template op. */
#define CUDA_SET_OP(f32, bf16, field, fn) ((f32)->field = fn<float>, (bf16)->field = fn<__nv_bfloat16>)

/* ---- launch helpers ---- */
#define CUDA_THREADS 256

/* Blocks for a grid-stride loop over n elements (n > 0): enough to fill the GPU, never more than
 * the elements need; far below the 2^31 - 1 limit of gridDim.x. */
static inline unsigned cuda_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    int64_t cap = (int64_t)cuda_ctx.sm_count * 16;
    if (cap < 1) cap = 1;
    return (unsigned)(b < cap ? b : cap);
}

/* Grid-stride loop over [0, n) with a 64-bit index (n may exceed 2^31). */
#define CUDA_FOR(i, n)                                                                 \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
         i += (int64_t)gridDim.x * blockDim.x)

/* ---- device helpers ---- */
/* Storage loads and stores: identity for float; bf16 widens exactly and rounds to nearest even. */
static __device__ __forceinline__ float cuda_ld(const float *p) { return *p; }
static __device__ __forceinline__ void cuda_st(float *p, float v) { *p = v; }
static __device__ __forceinline__ float cuda_ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
static __device__ __forceinline__ void cuda_st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* ---- 16-byte vectors (one LDG.128 / STG.128): 8 bf16 or 4 float ----
 * Bandwidth-bound kernels move storage as packs of CUDA_VEC(T) elements when every pointer they touch
 * is 16-byte aligned (checked on the host with cuda_aligned16 before choosing the vector kernel: views
 * into a flat parameter or activation buffer need not be), and fall back to one element at a time
 * otherwise. A pack is only a way to move bits: each element is widened with cuda_ld and rounded with
 * cuda_st exactly as the scalar kernels do, so per-element results are the same bits on both paths. */
#define CUDA_VEC(T) ((int)(16 / sizeof(T)))
template <typename T, int W>
struct alignas(W * sizeof(T)) cuda_pack {
    T x[W];
};
/* W elements from p: 16-byte loads when the pack is a multiple of 16 bytes (p must then be 16-byte
 * aligned), else one element at a time (W = 1: the scalar kernels). */
template <int W, typename T>
static __device__ __forceinline__ cuda_pack<T, W> cuda_ldp(const T *p) {
    cuda_pack<T, W> r;
    if constexpr ((W * sizeof(T)) % 16 == 0) {
#pragma unroll
        for (int q = 0; q < (int)(W * sizeof(T) / 16); q++)
            reinterpret_cast<uint4 *>(&r)[q] = reinterpret_cast<const uint4 *>(p)[q];
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) r.x[k] = p[k];
    }
    return r;
}
template <int W, typename T>
static __device__ __forceinline__ void cuda_stp(T *p, const cuda_pack<T, W> &v) {
    if constexpr ((W * sizeof(T)) % 16 == 0) {
#pragma unroll
        for (int q = 0; q < (int)(W * sizeof(T) / 16); q++)
            reinterpret_cast<uint4 *>(p)[q] = reinterpret_cast<const uint4 *>(&v)[q];
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) p[k] = v.x[k];
    }
}
/* Whether every pointer given is 16-byte aligned (NULL counts as aligned: an absent operand). */
static inline bool cuda_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }
template <typename... P>
static inline bool cuda_aligned16(const void *p, P... rest) {
    return cuda_aligned16(p) && cuda_aligned16(rest...);
}

/* GELU's tanh approximation (lt_gelu_tanh_forward / _backward) and its derivative. */
#define CUDA_SQRT_2_OVER_PI 0.79788456080286536f
#define CUDA_GELU_TANH_C 0.044715f
static __device__ __forceinline__ float cuda_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(CUDA_SQRT_2_OVER_PI * (x + CUDA_GELU_TANH_C * x * x * x)));
}
static __device__ __forceinline__ float cuda_gelu_tanh_grad(float x) {
    const float t = tanhf(CUDA_SQRT_2_OVER_PI * (x + CUDA_GELU_TANH_C * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * CUDA_SQRT_2_OVER_PI * (1.0f + 3.0f * CUDA_GELU_TANH_C * x * x);
}

static __device__ __forceinline__ float cuda_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ double cuda_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float cuda_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, <= 1024, blockDim.y = 1), in a fixed order
 * (deterministic). shm holds at least 32 values. Every thread of the block must call it; the
 * result is valid in thread 0 (and in all of warp 0). */
template <typename V>
static __device__ __forceinline__ V cuda_block_sum(V v, V *shm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = cuda_warp_sum(v);
    __syncthreads(); /* shm may still be read by a previous call */
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    V t = 0;
    if (warp == 0) {
        t = lane < nwarps ? shm[lane] : (V)0;
        t = cuda_warp_sum(t);
    }
    return t;
}

#endif

/* What the two attention implementations share (attention.cu: fp32 math on CUDA cores, both tables;
 * attention_tc.cu: bf16 on tensor cores): the qkv layout, the dropout mask, shared-memory opt-in. */
#ifndef LT_CUDA_ATTENTION_COMMON_CUH
#define LT_CUDA_ATTENTION_COMMON_CUH
#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"

#define ATT_MAX_D 128

/* Offsets into qkv (elements): token row pitch, and the start of head h's query / group g's key in a row. */
static __device__ __forceinline__ int64_t att_row_pitch(int H, int G, int D) { return (int64_t)(H + 2 * G) * D; }
static __device__ __forceinline__ int64_t att_q_col(int h, int hpg, int D) {
    return (int64_t)((h / hpg) * (hpg + 2) + h % hpg) * D;
}
static __device__ __forceinline__ int64_t att_k_col(int g, int hpg, int D) { return (int64_t)(g * (hpg + 2) + hpg) * D; }

/* The dropout mask element (b, h, i, j) of ops.h, mh = b * heads_total + head_offset + h (the global head). */
static __device__ __forceinline__ bool att_dropped(uint64_t key, int64_t mh, int T, int i, int j, float p) {
    return cuda_uniform(key, ((uint64_t)mh * (uint64_t)T + (uint64_t)i) * (uint64_t)T + (uint64_t)j) < p;
}

/* Above 48 KiB a kernel must opt in to its dynamic shared memory (H100: up to 227 KiB). */
static bool att_smem_ok(const void *kernel, size_t bytes, const char *op) {
    if (bytes <= 48 * 1024) return true;
    if (bytes > cuda_ctx.smem_optin) {
        cuda_record(op, "needs %zu bytes of shared memory, the GPU allows %zu", bytes, cuda_ctx.smem_optin);
        return false;
    }
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        cuda_record_cuda(op, e);
        return false;
    }
    return true;
}

#endif

// The CUDA backend's table and the plugin's one exported symbol, lt_cuda_backend_open.
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ops/cuda/internal.cuh"

static lt_backend cuda_backend;

/* The GPU from LUATRON_CUDA_DEVICE (default 0); -1 with err when it names no device. */
static int cuda_pick_device(int count, char *err, size_t errlen) {
    const char *s = getenv("LUATRON_CUDA_DEVICE");
    if (!s || !*s) return 0;
    char *end = NULL;
    long d = strtol(s, &end, 10);
    if (*end != '\0' || d < 0 || d >= count) {
        snprintf(err, errlen, "LUATRON_CUDA_DEVICE=%s is not a GPU of this machine (0..%d)", s, count - 1);
        return -1;
    }
    return (int)d;
}

/* The model's ops: one table per compute precision, filled by the families at open. */
static lt_ops cuda_ops_f32, cuda_ops_bf16;

/* 0 when every op of the table is set; else the offset of the first missing one. */
static size_t cuda_ops_missing(const lt_ops *ops) {
    typedef void (*fn)(void);
    for (size_t off = offsetof(lt_ops, embedding_forward); off + sizeof(fn) <= sizeof(lt_ops); off += sizeof(fn)) {
        fn f;
        memcpy(&f, (const char *)ops + off, sizeof f);
        if (!f) return off;
    }
    return 0;
}

static int cuda_fill_table(lt_backend *be, char *err, size_t errlen) {
    memset(&cuda_ops_f32, 0, sizeof cuda_ops_f32);
    memset(&cuda_ops_bf16, 0, sizeof cuda_ops_bf16);
    cuda_ops_f32.dtype = LT_F32;
    cuda_ops_bf16.dtype = LT_BF16;
    cuda_elementwise_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_embedding_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_moe_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_norm_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_linear_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_attention_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_attention_kv_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_rope_ops(&cuda_ops_f32, &cuda_ops_bf16);
    cuda_cross_entropy_ops(&cuda_ops_f32, &cuda_ops_bf16);
    const size_t miss = cuda_ops_missing(&cuda_ops_f32) ? cuda_ops_missing(&cuda_ops_f32)
                                                        : cuda_ops_missing(&cuda_ops_bf16);
    if (miss) { /* a family forgot an op: a bug of the plugin, refused rather than a NULL call later */
        snprintf(err, errlen, "luatron_cuda.so: op table incomplete (no op at offset %zu of lt_ops)", miss);
        return -1;
    }
    be->abi = LT_BACKEND_ABI;
    be->name = "cuda";
    be->device = LT_CUDA;
    be->alloc = cuda_alloc;
    be->release = cuda_release;
    be->memzero = cuda_memzero;
    be->to_device = cuda_to_device;
    be->to_host = cuda_to_host;
    be->copy = cuda_copy;
    be->synchronize = cuda_synchronize;
    be->memory_stats = cuda_memory_stats;
    be->reset_peak = cuda_reset_peak;
    be->fill = cuda_fill;
    be->fill_normal = cuda_fill_normal;
    be->sum_squares = cuda_sum_squares;
    be->scale = cuda_scale;
    be->cast_to_bf16 = cuda_cast_to_bf16;
    be->adamw_update = cuda_adamw_update;
    be->sgd_update = cuda_sgd_update;
    be->f32 = &cuda_ops_f32;
    be->bf16 = &cuda_ops_bf16;
    be->profile_report = cuda_profile_report; /* reports nothing unless profiling is on */
    be->comm = &cuda_nccl_ops;                /* NCCL, loaded on first use (nccl.cu) */
    if (cuda_ctx.profile) cuda_profile_install(be, &cuda_ops_f32, &cuda_ops_bf16);
    return 0;
}

/* Opened once per process (the loader calls it once; a second call returns the same table). */
extern "C" __attribute__((visibility("default"))) const lt_backend *lt_cuda_backend_open(char *err, size_t errlen) {
    static int opened;
    char scratch[8];
    if (!err || !errlen) err = scratch, errlen = sizeof scratch;
    err[0] = '\0';
    if (opened) return &cuda_backend;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice || (e == cudaSuccess && count == 0)) {
        /* no driver or no device: the caller falls back to the CPU, nothing is aborted */
        snprintf(err, errlen, "no GPU: %s", cudaGetErrorString(e == cudaSuccess ? cudaErrorNoDevice : e));
        cudaGetLastError();
        return NULL;
    }
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
        cudaGetLastError();
        return NULL;
    }
    const int dev = cuda_pick_device(count, err, errlen);
    if (dev < 0) return NULL;
    cudaDeviceProp prop;
    e = cudaGetDeviceProperties(&prop, dev);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "GPU %d: %s (%s)", dev, cudaGetErrorString(e), cudaGetErrorName(e));
        cudaGetLastError();
        return NULL;
    }
    if (prop.major != 9 || prop.minor != 0) { /* the kernels are sm_90a code: H100 / H200 only */
        snprintf(err, errlen, "GPU %d (%s) is sm_%d%d; luatron_cuda.so is built for sm_90a (H100, H200) only", dev,
                 prop.name, prop.major, prop.minor);
        return NULL;
    }
    if (cuda_context_open(dev, err, errlen) != 0) return NULL;
    if (cuda_linear_open(err, errlen) != 0) return NULL;
    if (cuda_fill_table(&cuda_backend, err, errlen) != 0) return NULL;
    snprintf(cuda_backend.description, sizeof cuda_backend.description, "%.200s, sm_%d%d, %.1f GiB", prop.name,
             prop.major, prop.minor, (double)prop.totalGlobalMem / (double)(1ull << 30));
    opened = 1;
    return &cuda_backend;
}

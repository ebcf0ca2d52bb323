// The CUDA backend's table and the plugin's one exported symbol, lt_cuda_backend_open.
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

static void cuda_fill_table(lt_backend *be) {
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
    be->embedding_forward = cuda_embedding_forward;
    be->embedding_backward = cuda_embedding_backward;
    be->position_embedding_forward = cuda_position_embedding_forward;
    be->position_embedding_backward = cuda_position_embedding_backward;
    be->layernorm_forward = cuda_layernorm_forward;
    be->layernorm_backward = cuda_layernorm_backward;
    be->rmsnorm_forward = cuda_rmsnorm_forward;
    be->rmsnorm_backward = cuda_rmsnorm_backward;
    be->linear_forward = cuda_linear_forward;
    be->linear_backward = cuda_linear_backward;
    be->attention_forward = cuda_attention_forward;
    be->attention_backward = cuda_attention_backward;
    be->rope_forward = cuda_rope_forward;
    be->rope_backward = cuda_rope_backward;
    be->gelu_forward = cuda_gelu_forward;
    be->gelu_backward = cuda_gelu_backward;
    be->swiglu_forward = cuda_swiglu_forward;
    be->swiglu_backward = cuda_swiglu_backward;
    be->add_forward = cuda_add_forward;
    be->dropout_forward = cuda_dropout_forward;
    be->dropout_backward = cuda_dropout_backward;
    be->cross_entropy_forward = cuda_cross_entropy_forward;
    be->cross_entropy_backward = cuda_cross_entropy_backward;
    be->adamw_update = cuda_adamw_update;
    be->sgd_update = cuda_sgd_update;
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
    cuda_fill_table(&cuda_backend);
    snprintf(cuda_backend.description, sizeof cuda_backend.description, "%.200s, sm_%d%d, %.1f GiB", prop.name,
             prop.major, prop.minor, (double)prop.totalGlobalMem / (double)(1ull << 30));
    opened = 1;
    return &cuda_backend;
}

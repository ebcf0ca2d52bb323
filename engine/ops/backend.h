/* A compute backend: where a model's memory lives and the kernels that work on it.
 *
 * The CPU backend is built in (the functions of ops.h). The CUDA backend is a plugin,
 * luatron_cuda.so, loaded only when a recipe asks for device "cuda": a CPU-only build or run
 * never needs a GPU, its driver or its libraries.
 *
 * Every op below has the signature and the contract of its CPU function in ops.h (backward
 * accumulates, nullable pointers, layouts); its pointers are memory of the backend's device.
 * On an accelerator ops are asynchronous and run in issue order; `synchronize` waits for all of
 * them and reports the first error since it was last called. */
#ifndef LT_BACKEND_H
#define LT_BACKEND_H
#include <stddef.h>
#include <stdint.h>

#include "engine/core/tensor.h"

typedef struct lt_backend {
    const char *name;      /* "cpu", "cuda" */
    lt_device device;
    char description[256]; /* what it runs on: "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" */

    /* ---- memory ---- */
    /* Uninitialised, 256-byte aligned (caching allocator); NULL when the device is out of memory. */
    void *(*alloc)(size_t nbytes);
    /* Gives back a block from alloc, with its size. */
    void (*release)(void *p, size_t nbytes);
    void (*memzero)(void *p, size_t nbytes);
    void (*to_device)(void *dst, const void *host_src, size_t nbytes);
    void (*to_host)(void *host_dst, const void *src, size_t nbytes); /* waits for the data */
    void (*copy)(void *dst, const void *src, size_t nbytes);         /* within the device */
    /* 0 when everything issued so far has finished; -1 with the first error since the last call. */
    int (*synchronize)(char *err, size_t errlen);
    /* Bytes handed out now, their high-water mark (reset by reset_peak), and bytes kept for reuse. */
    void (*memory_stats)(size_t *in_use, size_t *peak, size_t *cached);
    void (*reset_peak)(void);

    /* ---- initialisation and reductions ---- */
    /* out[i] = value. */
    void (*fill)(float *out, int64_t n, float value);
    /* out[i] = mean + std * lt_rng_normal(key, first + i): the same Philox stream as engine/core/rng.h. */
    void (*fill_normal)(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std);
    /* Sum of squares (accumulated in double on the CPU, at least fp32 pairwise elsewhere); waits. */
    double (*sum_squares)(const float *x, int64_t n);
    void (*scale)(float *x, int64_t n, float s);

    /* ---- the ops of ops.h ---- */
    void (*embedding_forward)(float *out, const int32_t *ids, const float *table, int N, int C);
    void (*embedding_backward)(float *dtable, const float *dout, const int32_t *ids, int N, int C);
    void (*position_embedding_forward)(float *out, const float *wpe, int B, int T, int C);
    void (*position_embedding_backward)(float *dwpe, const float *dout, int B, int T, int C);

    void (*layernorm_forward)(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                              const float *bias, int N, int C, float eps);
    void (*layernorm_backward)(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                               const float *weight, const float *mean, const float *rstd, int N, int C);
    void (*rmsnorm_forward)(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
    void (*rmsnorm_backward)(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                             const float *rstd, int N, int C);

    void (*linear_forward)(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                           int OUT);
    void (*linear_backward)(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                            const float *weight, int N, int IN, int OUT);

    void (*attention_forward)(float *out, float *lse, const float *qkv, int B, int T, int H, int G, int D,
                              float dropout_p, uint64_t dropout_key);
    void (*attention_backward)(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                               int B, int T, int H, int G, int D, float dropout_p, uint64_t dropout_key);
    void (*rope_forward)(float *qkv, int B, int T, int H, int G, int D, float base);
    void (*rope_backward)(float *dqkv, int B, int T, int H, int G, int D, float base);

    void (*gelu_forward)(float *out, const float *inp, int64_t n);
    void (*gelu_backward)(float *dinp, const float *dout, const float *inp, int64_t n);
    void (*swiglu_forward)(float *out, const float *inp, int N, int F);
    void (*swiglu_backward)(float *dinp, const float *dout, const float *inp, int N, int F);
    void (*add_forward)(float *out, const float *a, const float *b, int64_t n);
    void (*dropout_forward)(float *out, const float *inp, int64_t n, float p, uint64_t key, uint64_t first);
    void (*dropout_backward)(float *dinp, const float *dout, int64_t n, float p, uint64_t key, uint64_t first);

    void (*cross_entropy_forward)(float *losses, float *lse, const float *logits, const int32_t *targets, int N,
                                  int V);
    void (*cross_entropy_backward)(float *dlogits, const float *logits, const float *lse, const int32_t *targets,
                                   const float *dloss, int N, int V);

    void (*adamw_update)(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                         float beta1, float beta2, float eps, float weight_decay, int64_t step);
    void (*sgd_update)(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                       float weight_decay);
} lt_backend;

/* The built-in CPU backend. */
const lt_backend *lt_backend_cpu(void);

/* The backend for a device name ("cpu" or "cuda"), loaded on first use; NULL with the reason in
 * err (an unknown name, a missing plugin, no GPU). The CUDA plugin is looked for in
 * $LUATRON_CUDA_PLUGIN, then beside the running executable, then beside the module holding this code. */
const lt_backend *lt_backend_get(const char *device, char *err, size_t errlen);

/* The backend whose memory holds t (CPU for host tensors; a device backend is loaded already when
 * one of its tensors exists). */
const lt_backend *lt_backend_of(const lt_tensor *t);

/* A zero-filled contiguous tensor in the backend's memory (released through the backend when its
 * last view is freed); NULL when out of memory. */
lt_tensor *lt_backend_tensor(const lt_backend *be, lt_dtype dtype, int ndim, const int64_t *shape);

/* The plugin's one exported symbol: fills in the CUDA backend for GPU 0, or returns NULL with the
 * reason ("no GPU: ..."). */
typedef const lt_backend *(*lt_backend_open_fn)(char *err, size_t errlen);
#define LT_CUDA_PLUGIN_SYMBOL "lt_cuda_backend_open"
#define LT_CUDA_PLUGIN_FILE "luatron_cuda.so"

#endif

/* A compute backend: where a model's memory lives and the kernels that work on it.
 *
 * The CPU backend is built in. The CUDA backend is a plugin, luatron_cuda.so, loaded only when a
 * recipe asks for device "cuda": a CPU-only build or run never needs a GPU, its driver or its
 * libraries.
 *
 * A backend has memory functions, fp32 kernels for initialisation and the optimizer, and a table
 * of model ops per compute precision (lt_ops: fp32, and bf16 for mixed precision). Each op has the
 * contract of its CPU function in ops.h (activation gradients written, weight and norm-input
 * gradients accumulated, nullable pointers, layouts); in the table, activations and the weights an
 * op reads are `void *` of the table's dtype, while weight gradients, normalisation statistics,
 * log-sum-exps and losses are always fp32 (`float *`).
 * On an accelerator everything is asynchronous and runs in issue order; `synchronize` waits and
 * reports the first error since it was last called. */
#ifndef LT_BACKEND_H
#define LT_BACKEND_H
#include <stddef.h>
#include <stdint.h>

#include "engine/core/device_comm.h"
#include "engine/core/tensor.h"

/* The model's ops at one precision. */
typedef struct lt_ops {
    lt_dtype dtype; /* of activations and of the weights ops read: LT_F32 or LT_BF16 */

    void (*embedding_forward)(void *out, const int32_t *ids, const void *table, int N, int C);
    void (*embedding_backward)(float *dtable, const void *dout, const int32_t *ids, int N, int C);
    /* pos: T int32 global positions in this backend's memory, or NULL for 0 .. T-1 (ops.h) */
    void (*position_embedding_forward)(void *out, const void *wpe, int B, int T, int C, const int32_t *pos);
    void (*position_embedding_backward)(float *dwpe, const void *dout, int B, int T, int C, const int32_t *pos);

    /* lt_moe_combine_forward / _backward: y, out, dout, dy of the table's dtype; rows, weights (fp32) and
     * dweights (fp32) in this backend's memory */
    void (*moe_combine_forward)(void *out, const void *y, const int32_t *rows, const float *weights, int N, int k,
                                int C);
    void (*moe_combine_backward)(void *dy, float *dweights, const void *dout, const void *y, const int32_t *rows,
                                 const float *weights, int N, int k, int M, int C);

    void (*layernorm_forward)(void *out, float *mean, float *rstd, const void *inp, const void *weight,
                              const void *bias, int N, int C, float eps);
    void (*layernorm_backward)(void *dinp, float *dweight, float *dbias, const void *dout, const void *inp,
                               const void *weight, const float *mean, const float *rstd, int N, int C);
    void (*rmsnorm_forward)(void *out, float *rstd, const void *inp, const void *weight, int N, int C, float eps);
    void (*rmsnorm_backward)(void *dinp, float *dweight, const void *dout, const void *inp, const void *weight,
                             const float *rstd, int N, int C);

    void (*linear_forward)(void *out, const void *inp, const void *weight, const void *bias, const void *residual,
                           int N, int IN, int OUT);
    void (*linear_backward)(void *dinp, float *dweight, float *dbias, const void *dout, const void *inp,
                            const void *weight, int N, int IN, int OUT);
    /* The MLP's fc1 with the tanh GELU (lt_gelu_tanh_forward) after it, fused where the device can (the
     * GEMM's epilogue): pre = inp @ weight^T + bias (kept for backward), act = gelu_tanh(pre); bias
     * nullable. Under bf16 act is the GELU of the unrounded pre, each output rounded once. */
    void (*linear_gelu_forward)(void *act, void *pre, const void *inp, const void *weight, const void *bias, int N,
                                int IN, int OUT);
    /* fc2's backward with the GELU's before it: dpre = (dout @ weight) * gelu_tanh'(pre) (written; the
     * product is not rounded before the GELU's derivative), dweight += dout^T @ inp, dbias += sum dout
     * (nullable); pre as linear_gelu_forward kept it. */
    void (*linear_dgelu_backward)(void *dpre, float *dweight, float *dbias, const void *dout, const void *inp,
                                  const void *weight, const void *pre, int N, int IN, int OUT);

    /* The MoE experts' GEMMs, one call over all local experts (a grouped GEMM): group g's rows
     * [first[g], first[g + 1]) of inp[first[G], IN] go through weight[g] [OUT, IN] (+ bias[g]) into the
     * same rows of out[first[G], OUT], as linear_forward would one group at a time. first: G + 1 host
     * offsets from 0 (empty groups allowed); weight, bias, dweight, dbias: host arrays of G pointers into
     * this backend's memory, bias and dbias NULL or whole. Backward: dinp written (nullable), dweight[g]
     * and dbias[g] accumulated. */
    void (*grouped_linear_forward)(void *out, const void *inp, const void *const *weight, const void *const *bias,
                                   const int64_t *first, int G, int IN, int OUT);
    void (*grouped_linear_backward)(void *dinp, float *const *dweight, float *const *dbias, const void *dout,
                                    const void *inp, const void *const *weight, const int64_t *first, int G, int IN,
                                    int OUT);

    void (*attention_forward)(void *out, float *lse, const void *qkv, int B, int T, int H, int G, int D,
                              float dropout_p, uint64_t dropout_key, int head_offset, int heads_total);
    void (*attention_backward)(void *dqkv, const void *dout, const void *qkv, const void *out, const float *lse,
                               int B, int T, int H, int G, int D, float dropout_p, uint64_t dropout_key,
                               int head_offset, int heads_total);
    /* ring attention's blocks (lt_attention_kv_forward, lt_attention_merge, lt_attention_kv_backward); q_pos,
     * k_pos int32 in this backend's memory */
    void (*attention_kv_forward)(void *out, float *lse, const void *qkv, const void *kv, int B, int Tq, int Tk, int H,
                                 int G, int D, const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                                 uint64_t dropout_key, int head_offset, int heads_total);
    void (*attention_merge)(void *out, float *lse, const void *out_b, const float *lse_b, int B, int T, int H, int D);
    void (*attention_kv_backward)(void *dq, void *dkv, const void *dout, const void *qkv, const void *kv,
                                  const void *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                                  const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                                  uint64_t dropout_key, int head_offset, int heads_total);
    /* pos: T int32 positions in this backend's memory, or NULL for 0 .. T-1 */
    void (*rope_forward)(void *qkv, int B, int T, int H, int G, int D, float base, const int32_t *pos);
    void (*rope_backward)(void *dqkv, int B, int T, int H, int G, int D, float base, const int32_t *pos);
    /* lt_qk_norm_forward / lt_qk_norm_backward: mean NULL selects RMSNorm. */
    void (*qk_norm_forward)(void *out, float *mean, float *rstd, const void *inp, const void *qweight,
                            const void *qbias, const void *kweight, const void *kbias, int N, int H, int G, int D,
                            float eps);
    void (*qk_norm_backward)(void *dinp, float *dqweight, float *dqbias, float *dkweight, float *dkbias,
                             const void *dout, const void *inp, const void *qweight, const void *kweight,
                             const float *mean, const float *rstd, int N, int H, int G, int D);

    void (*gelu_forward)(void *out, const void *inp, int64_t n);
    void (*gelu_backward)(void *dinp, const void *dout, const void *inp, int64_t n);
    /* lt_gelu_tanh_forward / _backward on their own (the grouped experts' activation: no GEMM to fuse into) */
    void (*gelu_tanh_forward)(void *out, const void *inp, int64_t n);
    void (*gelu_tanh_backward)(void *dinp, const void *dout, const void *inp, int64_t n);
    void (*swiglu_forward)(void *out, const void *inp, int N, int F);
    void (*swiglu_backward)(void *dinp, const void *dout, const void *inp, int N, int F);
    void (*add_forward)(void *out, const void *a, const void *b, int64_t n);
    void (*dropout_forward)(void *out, const void *inp, int64_t n, float p, uint64_t key, uint64_t first);
    void (*dropout_backward)(void *dinp, const void *dout, int64_t n, float p, uint64_t key, uint64_t first);

    void (*cross_entropy_forward)(float *losses, float *lse, const void *logits, const int32_t *targets, int N, int V);
    void (*cross_entropy_backward)(void *dlogits, const void *logits, const float *lse, const int32_t *targets,
                                   const float *dloss, int N, int V);
} lt_ops;

/* Bumped whenever lt_backend, lt_ops or lt_device_comm_ops change, in layout or in an op's contract
 * (5: activation gradients written, not accumulated;
 * 6: linear_forward adds a residual; 7: linear_gelu_forward, linear_dgelu_backward; 8: qk_norm_forward,
 * qk_norm_backward; 9: lt_device_comm_ops.batch_p2p; 10: positions for rope and position embeddings,
 * attention_kv_forward, attention_merge, attention_kv_backward; 11: moe_combine_forward,
 * moe_combine_backward; 12: grouped_linear_forward, grouped_linear_backward, gelu_tanh_forward, gelu_tanh_backward): the loader refuses a
 * plugin built against another. */
#define LT_BACKEND_ABI 12

/* The backend's collectives (lt_backend.comm): engine/core/device_comm.h. */

typedef struct lt_backend {
    int abi;               /* LT_BACKEND_ABI of the code that filled the table */
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

    /* dst[i] = src[i] rounded to bf16 (nearest even): the compute copy of fp32 weights. */
    void (*cast_to_bf16)(void *dst, const float *src, int64_t n);

    /* ---- the optimizer (fp32) ---- */
    void (*adamw_update)(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                         float beta1, float beta2, float eps, float weight_decay, int64_t step);
    void (*sgd_update)(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                       float weight_decay);

    /* ---- the model's ops, per compute precision (bf16 NULL where there is none) ---- */
    const lt_ops *f32, *bf16;

    /* ---- profile (NULL where there is none) ---- */
    /* With LUATRON_CUDA_PROFILE=1, the device time of every entry of this table and of both op tables,
     * per op and precision, as a text table sorted by time (op, calls, ms, % of the profiled time,
     * us per call, TFLOP/s for GEMMs and attention, GB/s of the bytes the op must move). Covers the
     * work finished by the last synchronize (or finished already). Returns the length it wanted,
     * as snprintf does (buf may be NULL when buflen is 0); 0, and an empty buf, when profiling is
     * off. profile_report(NULL, 1) clears the counts (after warm-up steps, say) and returns 0. */
    int (*profile_report)(char *buf, size_t buflen);

    /* ---- collectives on this backend's memory (NULL where there are none: the CPU) ---- */
    const lt_device_comm_ops *comm;
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

/* A contiguous host copy of t (t on any device; a GPU tensor must be contiguous); NULL when out of
 * memory or t is a non-contiguous GPU view. */
lt_tensor *lt_backend_to_host(const lt_tensor *t);

/* A zero-filled contiguous tensor in the backend's memory (released through the backend when its
 * last view is freed); NULL when out of memory. */
lt_tensor *lt_backend_tensor(const lt_backend *be, lt_dtype dtype, int ndim, const int64_t *shape);

/* The plugin's one exported symbol: fills in the CUDA backend for GPU 0, or returns NULL with the
 * reason ("no GPU: ..."). */
typedef const lt_backend *(*lt_backend_open_fn)(char *err, size_t errlen);
#define LT_CUDA_PLUGIN_SYMBOL "lt_cuda_backend_open"
#define LT_CUDA_PLUGIN_FILE "luatron_cuda.so"

#endif

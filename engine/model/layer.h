/* One transformer layer (Megatron-Core's TransformerLayer with the local spec), forward and backward
 * for one microbatch, llm.c style: the caller hands in everything the layer touches.
 *
 *   out = h + dropout(mlp(pre_mlp_layernorm(h))),   h = x + dropout(attention(input_layernorm(x)))
 *
 * The contract is narrow so later modules can replace a block without touching the rest: the
 * attention block and the MLP block are separate functions with their own weight, gradient and
 * activation structs (a tensor-parallel linear, ring attention or an MoE MLP replaces one block);
 * each block includes its pre-norm, its dropout and its residual add. Weights are views into a
 * chunk's flat buffers (the compute dtype: fp32, or the bf16 copy), gradients fp32 views that
 * backward accumulates into. Activations are the compute dtype; norm statistics are fp32.
 * Dropout masks are keyed by (microbatch seed, GLOBAL layer number, site), so a layer draws the same
 * masks whichever chunk holds it.
 *
 * Under tensor parallelism (engine/parallel/tp.h) a layer holds its rank's heads, query groups and
 * ffn columns (the spec's sizes are the local ones): linear_qkv and linear_fc1 are column-parallel,
 * linear_proj and linear_fc2 row-parallel, their bias and the residual added once after the
 * reduction. Outside those regions (norms, dropout, residual adds) a rank holds every row, or under
 * sequence parallelism its [B, T/TP] rows; dropout masks are the single rank's for every position
 * and head. */
#ifndef LT_LAYER_H
#define LT_LAYER_H
#include <stddef.h>
#include <stdint.h>

#include "engine/ops/backend.h"
#include "engine/parallel/cp.h"
#include "engine/parallel/tp.h"

/* What a layer's shapes and maths depend on (a subset of the model config): this rank's heads
 * [head_offset, head_offset + num_attention_heads) of heads_total, its query groups and ffn columns. */
typedef struct {
    int hidden_size, num_attention_heads, num_query_groups, kv_channels, ffn_hidden_size;
    int head_offset, heads_total, groups_total;
    int kv_replicas; /* TP ranks sharing each query group's key and value: TP / num_query_groups when the
                        model has fewer query groups than TP ranks (then one group per rank), else 1 */
    const lt_tp *tp; /* the tensor-parallel group (size 1: a single rank) */
    const lt_cp *cp; /* the context-parallel group (size 1: the whole sequence here) */
    int rmsnorm; /* 0: LayerNorm, 1: RMSNorm */
    float layernorm_epsilon;
    int gated_linear_unit, gelu_tanh; /* SwiGLU / GELU (tanh approximation fused into the GEMMs) */
    int rope;
    float rotary_base;
    int qk_layernorm;
    float hidden_dropout, attention_dropout;
} lt_layer_spec;

/* Widths of the fused QKV (this rank's heads, as attention reads it) and fc1 outputs, and of
 * linear_qkv's GEMM output: the QKV width, or with shared key/value heads (kv_replicas > 1) this rank's
 * 1/TP of the whole model's, which Megatron gathers before taking the rank's heads out. */
int lt_layer_qkv_dim(const lt_layer_spec *s);
int lt_layer_qkv_gemm_dim(const lt_layer_spec *s);
int lt_layer_fc1_dim(const lt_layer_spec *s);

/* Weights as the ops read them; NULL for an absent parameter (bias, qk norms). Norm weights are
 * what the norm multiplies by (1 + gamma under zero-centred gamma: the chunk resolves that). */
typedef struct {
    const void *ln_w, *ln_b, *qkv_w, *qkv_b, *qn_w, *qn_b, *kn_w, *kn_b, *proj_w, *proj_b;
} lt_attention_weights;
typedef struct {
    float *ln_w, *ln_b, *qkv_w, *qkv_b, *qn_w, *qn_b, *kn_w, *kn_b, *proj_w, *proj_b;
} lt_attention_grads;
typedef struct {
    const void *ln_w, *ln_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} lt_mlp_weights;
typedef struct {
    float *ln_w, *ln_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
} lt_mlp_grads;

/* Saved activations of one block for one microbatch (void: compute dtype; float: fp32). */
typedef struct {
    void *ln, *qkv_pre, *qkv, *att; /* qkv_pre: linear_qkv's output before the q/k norms */
    float *ln_mean, *ln_rstd, *qk_mean, *qk_rstd, *lse;
} lt_attention_acts;
typedef struct {
    void *ln, *fc1, *act;
    float *ln_mean, *ln_rstd;
} lt_mlp_acts;

/* The per-microbatch context of one layer: its shape, global layer number, mode, dropout seed and
 * what its forward saved for its backward (h: the attention block's output, the MLP block's input).
 * training 0 is eval mode: no dropout (dropout_seed unused), as a model configured without it. */
/* With shared key/value heads, a microbatch's row maps over kv_channels-wide rows, in the backend's
 * memory: select[n (H + 2) + i] the row of the whole QKV [N, (H_total + 2 G_total)] that is row i of this
 * rank's token n (its heads, then its group's key and value); expand the inverse over the whole QKV,
 * N (H + 2) (a zero row) where this rank has nothing. */
typedef struct {
    int32_t *select, *expand;
    size_t bytes;
} lt_layer_kv_maps;
lt_layer_kv_maps *lt_layer_kv_maps_new(const lt_layer_spec *s, int N, char *err, size_t errlen);
void lt_layer_kv_maps_free(const lt_layer_spec *s, lt_layer_kv_maps *k);

/* Incremental decoding (text generation, one sequence): a layer's keys and values of the positions
 * before this forward's, kv [max_len, G, 2, D] (per group its key head, then its value head, after the
 * rotary embedding), len of them filled; pos 0 .. max_len - 1 and kv_rows (the qkv row of each kv row,
 * lt_cp_maps' kv_of_qkv for B = 1) in the backend's memory. */
typedef struct {
    void *kv;
    int len, max_len;
    const int32_t *pos, *kv_rows;
} lt_layer_kv_cache;

typedef struct {
    int B, T, layer;
    const lt_tp_rows *rows; /* the microbatch for tensor parallelism (NULL without) */
    const lt_layer_kv_maps *kv; /* with shared key/value heads (NULL without) */
    const lt_cp_maps *cp;       /* under context parallelism: the ring's maps (NULL without) */
    const int32_t *pos;         /* the rows' global positions, device [T] (NULL: 0 .. T-1) */
    lt_layer_kv_cache *cache;   /* decoding: attention over the cached positions and these (NULL without) */
    int moe;                    /* an MoE layer: no dense MLP activations (engine/model/moe_mlp.h) */
    int training;
    uint64_t dropout_seed;
    lt_attention_acts attn;
    void *h;
    lt_mlp_acts mlp;
} lt_layer_ctx;

/* Carves a layer's activations out of memory: call with base NULL to measure (*used grows by the
 * bytes needed), then with real memory. Every buffer is 64-byte aligned. */
void lt_layer_ctx_layout(const lt_layer_spec *s, size_t E, lt_layer_ctx *c, char *base, size_t *used);

/* Scratch the caller provides (compute dtype, N = B T rows): backward's d_c and d_c2 [N, hidden], d_att
 * [N, heads*D], d_qkv and d_fc1 [N, max(qkv_dim, fc1_dim)], d_act [N, ffn_hidden_size]; under sequence
 * parallelism tp_full and tp_landing [N, hidden], with shared key/value heads kv_a and kv_b
 * (lt_layer_kv_scratch elements each), under context parallelism ring (forward and backward). */
typedef struct {
    void *d_c, *d_c2, *d_att, *d_qkv, *d_fc1, *d_act;
    void *tp_full, *tp_landing;
    void *kv_a, *kv_b;
    void *ring; /* under context parallelism: lt_cp_attention_scratch bytes */
} lt_layer_scratch;
/* Elements of kv_a and of kv_b for N rows: the whole QKV and one more row; 0 without shared heads. */
size_t lt_layer_kv_scratch(const lt_layer_spec *s, int N);

/* Each returns 0, or -1 with err set when a tensor-parallel collective fails.
 * out = x + dropout(attention(norm(x))), saving into c->attn. out may not alias x. */
int lt_layer_attention_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                               lt_layer_ctx *c, const void *x, void *out, const lt_layer_scratch *sc, char *err,
                               size_t errlen);
/* dx holds d(out) on entry and d(x) on return (the residual passes through); gradients accumulate. */
int lt_layer_attention_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                                const lt_attention_grads *g, const lt_layer_ctx *c, const void *x, void *dx,
                                const lt_layer_scratch *sc, char *err, size_t errlen);
int lt_layer_mlp_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, lt_layer_ctx *c,
                         const void *h, void *out, const lt_layer_scratch *sc, char *err, size_t errlen);
int lt_layer_mlp_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, const lt_mlp_grads *g,
                          const lt_layer_ctx *c, const void *h, void *dx, const lt_layer_scratch *sc, char *err,
                          size_t errlen);

/* The whole layer: attention block into c->h, then the MLP block into out. */
int lt_layer_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                     const lt_mlp_weights *mw, lt_layer_ctx *c, const void *x, void *out, const lt_layer_scratch *sc,
                     char *err, size_t errlen);
int lt_layer_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                      const lt_attention_grads *ag, const lt_mlp_weights *mw, const lt_mlp_grads *mg,
                      const lt_layer_ctx *c, const void *x, void *dx, const lt_layer_scratch *sc, char *err,
                      size_t errlen);

/* Rows a layer's input and output hold: B T, or this rank's B T / TP under sequence parallelism. */
int lt_layer_outer_rows(const lt_layer_spec *s, int B, int T);

/* LayerNorm or RMSNorm (by the spec) over rows of hidden_size; mean is unused by RMSNorm. */
void lt_layer_norm_forward(const lt_layer_spec *s, const lt_ops *ops, void *out, float *mean, float *rstd,
                           const void *inp, const void *w, const void *b, int N);
void lt_layer_norm_backward(const lt_layer_spec *s, const lt_ops *ops, void *dinp, float *dw, float *db,
                            const void *dout, const void *inp, const void *w, const float *mean, const float *rstd,
                            int N);

/* The dropout stream key of one (microbatch seed, global layer, site); layer -1 is the embedding. */
uint64_t lt_dropout_key(uint64_t seed, int layer, const char *site);

#endif

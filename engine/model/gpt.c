#include "engine/model/gpt.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"
#include "engine/core/rng.h"
#include "engine/model/layer.h"
#include "engine/model/moe_mlp.h"
#include "engine/parallel/vocab.h"

/* Offsets (in floats) of one layer's parameters in the flat buffers; -1 when absent. qn, kn: the
 * per-head query and key norms (qk_layernorm). */
typedef struct {
    int64_t ln1_w, ln1_b, qkv_w, qkv_b, qn_w, qn_b, kn_w, kn_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
        fc2_b;
    /* an MoE layer: the router's weight and each expert's ([num_moe_experts] arrays; -1 entries when absent) */
    int moe;
    int64_t router_w, *e_fc1_w, *e_fc1_b, *e_fc2_w, *e_fc2_b;
    int64_t sh_fc1_w, sh_fc1_b, sh_fc2_w, sh_fc2_b; /* the shared experts */
    float *expert_bias, *bias_tokens;              /* host [E] (moe_router_enable_expert_bias) */
    float *global_sum, global_steps;               /* host [E]: global_aux_loss's tracker of the step */
    char bias_name[96];
} layer_offsets;

/* A norm weight under layernorm_zero_centered_gamma: its n values at flat offset off, and where
 * 1 + weight is kept for the ops (element offset in lt_gpt.gamma). */
typedef struct {
    int64_t off, n, eff;
} gamma_slot;

struct lt_gpt {
    lt_gpt_config cfg;
    lt_gpt_stage stage;
    int nl;              /* layers held: stage.layer_end - stage.layer_begin */
    lt_layer_spec spec;  /* what the layers need of cfg */
    lt_tp tp;            /* the tensor-parallel group (size 1 without) */
    lt_cp cp;            /* the context-parallel group (size 1 without) */
    lt_vocab_range vocab; /* this rank's slice of the vocabulary */
    const lt_backend *be;
    const lt_ops *ops; /* the backend's ops at the compute precision */
    size_t E;          /* bytes per activation element (4 fp32, 2 bf16) */
    int num_params, cap_params;
    lt_gpt_param *params;
    int64_t total;
    lt_tensor *weights, *grads; /* fp32: the main weights the optimizer updates, and their gradients */
    lt_tensor *compute;         /* bf16 copy of the weights under mixed precision (NULL in fp32) */
    /* Offsets; -1 when absent. out_w: the output layer's weight on a last stage (wte itself when tied
     * and also first; else output_layer.weight, or the tied copy of the word embeddings). */
    int64_t wte, wpe, lnf_w, lnf_b, out_w;
    layer_offsets *layers; /* [nl]: layers[i] is global layer layer_begin + i */
    int qkv_dim, fc1_dim; /* widths of the fused QKV and fc1 outputs */
    /* Zero-centred gamma: the norms read 1 + weight from `gamma` (compute dtype: ones, then one slot per
     * norm weight), refreshed with the weights in forward; NULL and 0 otherwise. */
    lt_tensor *gamma;
    gamma_slot *gammas;
    int num_gammas;
    lt_gpt_grad_ready_fn grad_ready;
    void *grad_ready_ud;
    lt_gpt_param_wait_fn param_wait;
    void *param_wait_ud;
    lt_moe_spec moe; /* mixture of experts (num_experts 0: none) */
    int64_t expert_offset; /* the experts' parameters lie from here to the end of the flat buffers */
    /* routing statistics of the training steps since the last lt_gpt_take_moe_stats */
    int64_t *moe_tokens;
    lt_gpt_moe_totals moe_totals;
};

struct lt_gpt_ctx {
    const lt_backend *be;
    const lt_tp *tp;
    const lt_layer_spec *spec;
    int B, T;
    int training; /* 0: eval mode, no dropout */
    uint64_t dropout_seed;
    void *arena; /* backend memory */
    size_t arena_bytes;
    int32_t *host_targets; /* host copy: counts valid tokens and scales their loss gradients */
    float *host_scratch;   /* N floats on the host: backward's dloss */
    int32_t *tokens, *targets;
    /* Row indices for the [b, s, h] <-> [s, b, h] transposes at a chunk boundary (NULL for the whole
     * model): to_bsh[b*T + t] = t*B + b, to_sbh[t*B + b] = b*T + t. */
    int32_t *to_bsh, *to_sbh;
    lt_tp_rows *rows;    /* the microbatch for tensor parallelism (NULL without) */
    lt_layer_kv_maps *kv; /* the shared key/value heads' row maps (NULL without) */
    lt_cp_maps *cp;       /* context parallelism's maps (NULL without); cp->pos + rank T: this rank's positions */
    const int32_t *pos;   /* the rows' global positions on the device (NULL: 0 .. T-1) */
    int32_t *host_tokens; /* a first stage's tokens on the host (the vocabulary-parallel embedding's) */
    void **x; /* residual stream [B, T, C] (the outer rows): x[0] the chunk's input, x[i+1] output of layer i */
    lt_layer_ctx *layers;
    int nl;
    lt_moe_state **moe; /* [nl]: each MoE layer's state (NULL for a dense one) */
    void *lnf, *logits;
    float *lnf_mean, *lnf_rstd, *ce_lse;
    lt_tensor *losses; /* per-token losses [B, T] (last stage with targets) */
    int64_t num_valid;
};

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The weights of every norm (input, pre-MLP, final, and the per-head q/k norms) end so. */
static int is_norm_weight(const char *name) { return ends_with(name, "layernorm.weight"); }

/* The last part of a name, and whether it is a bias ("bias", or grouped experts' "bias<e>"). */
static const char *last_part(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}
static int is_bias(const char *name) { return strncmp(last_part(name), "bias", 4) == 0; }

/* The weights Megatron initialises with output_layer_init_method (std / sqrt(2 L)): those that feed
 * the residual, linear_proj's and every linear_fc2's (an expert's included: "...linear_fc2.weight<e>"). */
static int is_scaled_init(const char *name) {
    return strstr(name, "linear_proj.weight") || strstr(name, "linear_fc2.weight");
}

/* Whether replicated parameter p's gradient is a part on each TP rank (Megatron's sequence_parallel
 * attribute, and the q/k norms of finalize_model_grads). */
static int grad_sums_over_tp(const lt_gpt *m, const lt_gpt_param *p) {
    if (m->tp.size == 1 || p->split != LT_SPLIT_NONE) return 0;
    if (strstr(p->name, "q_layernorm.") || strstr(p->name, "k_layernorm.")) return 1;
    return m->tp.sequence_parallel && (strstr(p->name, "layernorm.") || ends_with(p->name, "linear_proj.bias") ||
                                       ends_with(p->name, "linear_fc2.bias") || ends_with(p->name, "router.weight"));
}

/* A parameter of full shape [d0, d1] (d1 ignored when 1-D), split across TP as `split`. */
static int64_t add_param(lt_gpt *m, int ndim, int64_t d0, int64_t d1, int no_wd, lt_split split, const char *fmt,
                         ...) {
    if (m->num_params == m->cap_params) {
        m->cap_params = m->cap_params ? 2 * m->cap_params : 64;
        m->params = realloc(m->params, sizeof(lt_gpt_param) * (size_t)m->cap_params);
    }
    lt_gpt_param *p = &m->params[m->num_params++];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->ndim = ndim;
    p->full_shape[0] = p->shape[0] = d0;
    p->full_shape[1] = p->shape[1] = ndim == 2 ? d1 : 1;
    p->full_numel = d0 * p->full_shape[1];
    p->split = m->tp.size > 1 ? split : LT_SPLIT_NONE;
    if (p->split == LT_SPLIT_COLUMNS) p->shape[1] /= m->tp.size;
    else if (p->split != LT_SPLIT_NONE) p->shape[0] /= m->tp.size;
    p->numel = p->shape[0] * p->shape[1];
    p->offset = m->total;
    p->no_weight_decay = no_wd;
    p->tp_grad_sum = grad_sums_over_tp(m, p);
    p->expert = -1;
    /* Keep each parameter 16-float aligned so kernels see aligned rows. */
    m->total += (p->numel + 15) / 16 * 16;
    return p->offset;
}

static int check_config(const lt_gpt_config *c, char *err, int errlen) {
#define REQUIRE(cond, ...) \
    do { if (!(cond)) { lt_fail(err, (size_t)errlen, __VA_ARGS__); return 0; } } while (0)
    REQUIRE(c->num_layers > 0, "num_layers must be positive (got %d)", c->num_layers);
    REQUIRE(c->hidden_size > 0, "hidden_size must be positive (got %d)", c->hidden_size);
    REQUIRE(c->num_attention_heads > 0, "num_attention_heads must be positive");
    REQUIRE(c->num_query_groups > 0 && c->num_attention_heads % c->num_query_groups == 0,
            "num_attention_heads (%d) must be a multiple of num_query_groups (%d)", c->num_attention_heads,
            c->num_query_groups);
    REQUIRE(c->kv_channels > 0, "kv_channels must be positive");
    REQUIRE(!c->rope || c->kv_channels % 2 == 0, "rotary embeddings need an even kv_channels (got %d)",
            c->kv_channels);
    REQUIRE(c->ffn_hidden_size > 0, "ffn_hidden_size must be positive");
    REQUIRE(c->seq_length > 0 && c->vocab_size > 0, "seq_length and vocab_size must be positive");
    REQUIRE(c->hidden_dropout >= 0 && c->hidden_dropout < 1, "hidden_dropout must be in [0, 1)");
    REQUIRE(c->attention_dropout >= 0 && c->attention_dropout < 1, "attention_dropout must be in [0, 1)");
    REQUIRE(!(c->gelu_tanh && c->gated_linear_unit), "gelu_tanh (openai_gelu) is for the GELU MLP, not SwiGLU");
    const int TP = c->tp_comm ? lt_comm_size(c->tp_comm) : 1;
    REQUIRE(!c->sequence_parallel || TP > 1, "sequence parallelism needs tensor_model_parallel_size > 1");
    REQUIRE(c->num_attention_heads % TP == 0, "num_attention_heads (%d) must be a multiple of "
            "tensor_model_parallel_size (%d)", c->num_attention_heads, TP);
    REQUIRE(c->num_query_groups % TP == 0 || TP % c->num_query_groups == 0, "num_query_groups (%d) must be a "
            "multiple or a divisor of tensor_model_parallel_size (%d)", c->num_query_groups, TP);
    REQUIRE((c->num_attention_heads + 2 * c->num_query_groups) * c->kv_channels % TP == 0, "linear_qkv's %d outputs "
            "((num_attention_heads + 2 num_query_groups) x kv_channels) must divide by tensor_model_parallel_size (%d)",
            (c->num_attention_heads + 2 * c->num_query_groups) * c->kv_channels, TP);
    REQUIRE(c->ffn_hidden_size % TP == 0, "ffn_hidden_size (%d) must be a multiple of tensor_model_parallel_size (%d)",
            c->ffn_hidden_size, TP);
    if (c->num_moe_experts > 0) {
        const int EP = c->ep_comm ? lt_comm_size(c->ep_comm) : 1;
        const int ETP = c->expert_tensor_parallel ? TP : 1;
        REQUIRE(EP % ETP == 0 && c->num_moe_experts % (EP / ETP) == 0, "num_moe_experts (%d) must be a multiple of "
                "expert_model_parallel_size (%d)", c->num_moe_experts, EP / ETP);
        REQUIRE(c->moe_ffn_hidden_size % ETP == 0, "moe_ffn_hidden_size (%d) must be a multiple of "
                "expert_tensor_parallel_size (%d)", c->moe_ffn_hidden_size, ETP);
        REQUIRE(c->moe_shared_expert_intermediate_size >= 0 && c->moe_shared_expert_intermediate_size % TP == 0,
                "moe_shared_expert_intermediate_size (%d) must be a multiple of tensor_model_parallel_size (%d)",
                c->moe_shared_expert_intermediate_size, TP);
        REQUIRE(c->moe_dispatcher >= LT_MOE_ALLGATHER && c->moe_dispatcher <= LT_MOE_FLEX,
                "moe_token_dispatcher_type must be allgather, alltoall or flex");
        REQUIRE(TP == 1 || c->sequence_parallel, "MoE layers with tensor_model_parallel_size = %d need "
                "sequence_parallel (as Megatron requires in training)", TP);
        REQUIRE(c->moe_ffn_hidden_size > 0 && c->moe_layer_freq > 0, "moe_ffn_hidden_size and moe_layer_freq must be "
                "positive");
        char rerr[256];
        lt_moe_router_cfg one = c->moe_router; /* a microbatch of one token sets the shape */
        one.seq_length = one.micro_batch_size = 1;
        REQUIRE(lt_moe_router_check(&one, 1, c->num_moe_experts, rerr, sizeof rerr) == 0, "%s", rerr);
    }
    REQUIRE(c->vocab_size % TP == 0, "the padded vocabulary (%d) must be a multiple of tensor_model_parallel_size "
            "(%d): pad it to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size", c->vocab_size,
            TP);
#undef REQUIRE
    return 1;
}

/* The expert parameter just added: which expert (global number). Its gradient is its own, reduced over
 * the expert-data-parallel group, never summed over TP. */
static int64_t as_expert(lt_gpt *m, int64_t offset, int e) {
    m->params[m->num_params - 1].expert = e;
    m->params[m->num_params - 1].tp_grad_sum = 0;
    return offset;
}

/* Local experts: how many, and the first's global number. */
static int local_experts(const lt_gpt *m) { return m->moe.num_experts * m->moe.etp / m->moe.ep_size; }
static int first_expert(const lt_gpt *m) { return m->moe.ep_rank / m->moe.etp * local_experts(m); }

/* An MoE layer's local experts (moe_mlp.h), global numbers e0 .. e0 + El - 1, in Megatron's module order:
 * with grouped experts every expert's fc1, then every fc2; else expert by expert. Under expert-tensor
 * parallelism they split as the dense MLP does (fc1 by rows, each SwiGLU half alike; fc2 by columns). */
static void add_experts(lt_gpt *m, layer_offsets *o, int l) {
    const lt_gpt_config *c = &m->cfg;
    const int El = local_experts(m), e0 = first_expert(m);
    const int C = c->hidden_size, F = c->moe_ffn_hidden_size, bias = c->add_bias_linear;
    const int fc1 = (c->gated_linear_unit ? 2 : 1) * F;
    const char *pre = "decoder.layers";
    const int split = m->moe.etp > 1;
    const lt_split ROWS = !split ? LT_SPLIT_NONE : c->gated_linear_unit ? LT_SPLIT_GLU_ROWS : LT_SPLIT_ROWS;
    const lt_split COLS = split ? LT_SPLIT_COLUMNS : LT_SPLIT_NONE, NONE = LT_SPLIT_NONE;
    int64_t **arrays[4] = {&o->e_fc1_w, &o->e_fc1_b, &o->e_fc2_w, &o->e_fc2_b};
    for (int k = 0; k < 4; k++) {
        *arrays[k] = malloc(sizeof(int64_t) * (size_t)El);
        for (int j = 0; j < El; j++) (*arrays[k])[j] = -1;
    }
    for (int pass = 0; pass < (c->moe_grouped_gemm ? 2 : 1); pass++)
        for (int j = 0; j < El; j++) {
            const int e = e0 + j;
            if (c->moe_grouped_gemm) {
                const char *which = pass == 0 ? "linear_fc1" : "linear_fc2";
                const int rows = pass == 0 ? fc1 : C, cols = pass == 0 ? C : F;
                const lt_split how = pass == 0 ? ROWS : COLS;
                (pass == 0 ? o->e_fc1_w : o->e_fc2_w)[j] = as_expert(
                    m, add_param(m, 2, rows, cols, 0, how, "%s.%d.mlp.experts.%s.weight%d", pre, l, which, e), e);
                if (bias)
                    (pass == 0 ? o->e_fc1_b : o->e_fc2_b)[j] = as_expert(
                        m, add_param(m, 1, rows, 0, 1, pass == 0 ? ROWS : NONE, "%s.%d.mlp.experts.%s.bias%d", pre,
                                     l, which, e), e);
                continue;
            }
            const char *x = "mlp.experts.local_experts";
            o->e_fc1_w[j] =
                as_expert(m, add_param(m, 2, fc1, C, 0, ROWS, "%s.%d.%s.%d.linear_fc1.weight", pre, l, x, e), e);
            if (bias)
                o->e_fc1_b[j] = as_expert(m, add_param(m, 1, fc1, 0, 1, ROWS, "%s.%d.%s.%d.linear_fc1.bias", pre, l, x, e), e);
            o->e_fc2_w[j] = as_expert(m, add_param(m, 2, C, F, 0, COLS, "%s.%d.%s.%d.linear_fc2.weight", pre, l, x, e), e);
            if (bias)
                o->e_fc2_b[j] = as_expert(m, add_param(m, 1, C, 0, 1, NONE, "%s.%d.%s.%d.linear_fc2.bias", pre, l, x, e), e);
        }
}

/* Zero-centred gamma: one slot per norm weight, after `widest` ones (the buffer the slots are computed
 * from); slots 16-element aligned like the flat buffer. 0 when out of memory. */
static int gamma_new(lt_gpt *m) {
    int64_t widest = 0, len = 0;
    m->gammas = calloc((size_t)m->num_params, sizeof *m->gammas);
    if (!m->gammas) return 0;
    for (int i = 0; i < m->num_params; i++) {
        const lt_gpt_param *p = &m->params[i];
        if (!is_norm_weight(p->name)) continue;
        m->gammas[m->num_gammas++] = (gamma_slot){p->offset, p->numel, len};
        len += (p->numel + 15) / 16 * 16;
        if (p->numel > widest) widest = p->numel;
    }
    widest = (widest + 15) / 16 * 16;
    for (int i = 0; i < m->num_gammas; i++) m->gammas[i].eff += widest;
    int64_t shape[1] = {widest + len};
    m->gamma = lt_backend_tensor(m->be, m->ops->dtype, 1, shape);
    if (!m->gamma) return 0;
    /* the ones, in the compute dtype */
    const uint16_t one16 = lt_f32_to_bf16(1.0f);
    const float one32 = 1.0f;
    const void *one = m->E == 2 ? (const void *)&one16 : (const void *)&one32;
    char *ones = malloc(m->E * (size_t)widest);
    if (!ones) return 0;
    for (int64_t i = 0; i < widest; i++) memcpy(ones + m->E * (size_t)i, one, m->E);
    m->be->to_device(lt_tensor_data(m->gamma), ones, m->E * (size_t)widest);
    free(ones);
    return 1;
}

static int check_stage(const lt_gpt_config *c, const lt_gpt_stage *st, char *err, int errlen) {
    const int L = c->num_layers;
    if (st->layer_begin < 0 || st->layer_begin > st->layer_end || st->layer_end > L)
        return lt_fail(err, (size_t)errlen, "chunk layers [%d, %d) are not a range of the model's %d layers",
                       st->layer_begin, st->layer_end, L), 0;
    if (st->pre_process && st->layer_begin != 0)
        return lt_fail(err, (size_t)errlen, "a first stage (pre_process) must begin at layer 0, not %d",
                       st->layer_begin), 0;
    if (st->post_process && st->layer_end != L)
        return lt_fail(err, (size_t)errlen, "a last stage (post_process) must end at layer %d, not %d", L,
                       st->layer_end), 0;
    if (st->layer_begin == st->layer_end && !st->pre_process && !st->post_process)
        return lt_fail(err, (size_t)errlen, "chunk [%d, %d) holds nothing", st->layer_begin, st->layer_end), 0;
    return 1;
}

/* The layers' spec: this rank's heads, query groups (one, shared with other ranks, when the model has
 * fewer than TP) and ffn columns. */
static lt_layer_spec spec_of(const lt_gpt_config *c, const lt_tp *tp, const lt_cp *cp) {
    const int heads = c->num_attention_heads / tp->size, G = c->num_query_groups;
    return (lt_layer_spec){.hidden_size = c->hidden_size,
                           .num_attention_heads = heads,
                           .num_query_groups = G >= tp->size ? G / tp->size : 1,
                           .kv_channels = c->kv_channels,
                           .ffn_hidden_size = c->ffn_hidden_size / tp->size,
                           .head_offset = tp->rank * heads,
                           .heads_total = c->num_attention_heads,
                           .groups_total = G,
                           .kv_replicas = G >= tp->size ? 1 : tp->size / G,
                           .rmsnorm = c->rmsnorm,
                           .layernorm_epsilon = c->layernorm_epsilon,
                           .gated_linear_unit = c->gated_linear_unit,
                           .gelu_tanh = c->gelu_tanh,
                           .rope = c->rope,
                           .rotary_base = c->rotary_base,
                           .qk_layernorm = c->qk_layernorm,
                           .hidden_dropout = c->hidden_dropout,
                           .attention_dropout = c->attention_dropout,
                           .tp = tp,
                           .cp = cp};
}

lt_gpt *lt_gpt_new(const lt_gpt_config *cfg, char *err, int errlen) {
    const lt_gpt_stage whole = {0, cfg->num_layers, 1, 1};
    return lt_gpt_new_chunk(cfg, &whole, err, errlen);
}

lt_gpt *lt_gpt_new_chunk(const lt_gpt_config *cfg, const lt_gpt_stage *stage, char *err, int errlen) {
    if (!check_config(cfg, err, errlen) || !check_stage(cfg, stage, err, errlen)) return NULL;
    lt_gpt *m = calloc(1, sizeof *m);
    m->cfg = *cfg;
    m->stage = *stage;
    m->nl = stage->layer_end - stage->layer_begin;
    m->be = cfg->backend ? cfg->backend : lt_backend_cpu();
    m->ops = cfg->bf16 ? m->be->bf16 : m->be->f32;
    if (!m->ops) {
        lt_fail(err, (size_t)errlen, "the %s backend has no bf16 kernels", m->be->name);
        free(m);
        return NULL;
    }
    m->tp = (lt_tp){cfg->tp_comm, 0, 1, 0, m->be, m->ops};
    if (cfg->tp_comm && lt_comm_size(cfg->tp_comm) > 1)
        m->tp = (lt_tp){cfg->tp_comm, lt_comm_rank(cfg->tp_comm), lt_comm_size(cfg->tp_comm), cfg->sequence_parallel,
                        m->be, m->ops};
    lt_vocab_range_of(&m->vocab, &m->tp, cfg->vocab_size, err, (size_t)errlen); /* divides: checked above */
    m->cp = (lt_cp){NULL, 0, 1, m->be, m->ops, 0};
    if (cfg->cp_comm && lt_comm_size(cfg->cp_comm) > 1)
        m->cp = (lt_cp){cfg->cp_comm, lt_comm_rank(cfg->cp_comm), lt_comm_size(cfg->cp_comm), m->be, m->ops,
                        cfg->cp_all_gather};
    m->spec = spec_of(cfg, &m->tp, &m->cp);
    if (cfg->num_moe_experts > 0) {
        const int ep = cfg->ep_comm && lt_comm_size(cfg->ep_comm) > 1, etp = cfg->expert_tensor_parallel ? m->tp.size : 1;
        m->moe = (lt_moe_spec){cfg->num_moe_experts, cfg->moe_router.topk, cfg->moe_ffn_hidden_size / etp,
                               cfg->moe_router, 1.0f, (lt_moe_dispatcher)cfg->moe_dispatcher, ep ? cfg->ep_comm : NULL,
                               ep ? lt_comm_rank(cfg->ep_comm) : 0, ep ? lt_comm_size(cfg->ep_comm) : 1, etp,
                               cfg->moe_shared_expert_intermediate_size / m->tp.size,
                               cfg->moe_global_comm && lt_comm_size(cfg->moe_global_comm) > 1 ? cfg->moe_global_comm
                                                                                              : NULL,
                               cfg->moe_grouped_gemm};
        m->moe_tokens = calloc((size_t)cfg->num_moe_experts, sizeof(int64_t));
    }
    m->E = lt_dtype_size(m->ops->dtype);
    const int C = cfg->hidden_size, V = cfg->vocab_size;
    const int D = cfg->kv_channels, HD = cfg->num_attention_heads * D; /* full sizes */
    const int bias = cfg->add_bias_linear, rms = cfg->rmsnorm, qk = cfg->qk_layernorm;
    m->qkv_dim = lt_layer_qkv_dim(&m->spec);
    m->fc1_dim = lt_layer_fc1_dim(&m->spec);

    /* Full shapes and how each splits (engine/parallel/tp.h): qkv rows by whole query groups (its
     * layout is group-major), fc1 by the matching rows of each SwiGLU half, the vocabulary by rows. */
    const int qkv_full = (cfg->num_attention_heads + 2 * cfg->num_query_groups) * D;
    const int fc1_full = (cfg->gated_linear_unit ? 2 : 1) * cfg->ffn_hidden_size;
    const lt_split fc1_split = cfg->gated_linear_unit ? LT_SPLIT_GLU_ROWS : LT_SPLIT_ROWS;
    const lt_split NONE = LT_SPLIT_NONE, ROWS = LT_SPLIT_ROWS, COLS = LT_SPLIT_COLUMNS;
    m->wte = m->wpe = m->lnf_w = m->lnf_b = m->out_w = -1;
    if (stage->pre_process) {
        m->wte = add_param(m, 2, V, C, 0, ROWS, "embedding.word_embeddings.weight");
        m->wpe = cfg->rope ? -1
                           : add_param(m, 2, cfg->seq_length, C, 0, NONE, "embedding.position_embeddings.weight");
    }
    m->layers = calloc((size_t)(m->nl > 0 ? m->nl : 1), sizeof *m->layers);
    for (int i = 0; i < m->nl; i++) {
        const int l = stage->layer_begin + i; /* global: names (and so initial values) do not depend on the chunk */
        layer_offsets *o = &m->layers[i];
        const char *pre = "decoder.layers";
        o->ln1_w = add_param(m, 1, C, 0, 1, NONE, "%s.%d.input_layernorm.weight", pre, l);
        o->ln1_b = rms ? -1 : add_param(m, 1, C, 0, 1, NONE, "%s.%d.input_layernorm.bias", pre, l);
        o->qkv_w = add_param(m, 2, qkv_full, C, 0, ROWS, "%s.%d.self_attention.linear_qkv.weight", pre, l);
        o->qkv_b = bias || cfg->add_qkv_bias
                       ? add_param(m, 1, qkv_full, 0, 1, ROWS, "%s.%d.self_attention.linear_qkv.bias", pre, l)
                       : -1;
        o->qn_w = qk ? add_param(m, 1, D, 0, 1, NONE, "%s.%d.self_attention.q_layernorm.weight", pre, l) : -1;
        o->qn_b = qk && !rms ? add_param(m, 1, D, 0, 1, NONE, "%s.%d.self_attention.q_layernorm.bias", pre, l) : -1;
        o->kn_w = qk ? add_param(m, 1, D, 0, 1, NONE, "%s.%d.self_attention.k_layernorm.weight", pre, l) : -1;
        o->kn_b = qk && !rms ? add_param(m, 1, D, 0, 1, NONE, "%s.%d.self_attention.k_layernorm.bias", pre, l) : -1;
        o->proj_w = add_param(m, 2, C, HD, 0, COLS, "%s.%d.self_attention.linear_proj.weight", pre, l);
        o->proj_b = bias ? add_param(m, 1, C, 0, 1, NONE, "%s.%d.self_attention.linear_proj.bias", pre, l) : -1;
        o->ln2_w = add_param(m, 1, C, 0, 1, NONE, "%s.%d.pre_mlp_layernorm.weight", pre, l);
        o->ln2_b = rms ? -1 : add_param(m, 1, C, 0, 1, NONE, "%s.%d.pre_mlp_layernorm.bias", pre, l);
        o->fc1_w = o->fc1_b = o->fc2_w = o->fc2_b = -1;
        if (cfg->num_moe_experts > 0 && l % cfg->moe_layer_freq == 0) {
            o->moe = 1;
            o->router_w = add_param(m, 2, cfg->num_moe_experts, C, 0, NONE, "%s.%d.mlp.router.weight", pre, l);
            o->sh_fc1_w = o->sh_fc1_b = o->sh_fc2_w = o->sh_fc2_b = -1;
            if (cfg->moe_router.load_balancing == 4)
                o->global_sum = calloc((size_t)cfg->num_moe_experts, sizeof(float));
            if (cfg->moe_router_enable_expert_bias) {
                o->expert_bias = calloc((size_t)cfg->num_moe_experts, sizeof(float));
                o->bias_tokens = calloc((size_t)cfg->num_moe_experts, sizeof(float));
                snprintf(o->bias_name, sizeof o->bias_name, "%s.%d.mlp.router.expert_bias", pre, l);
            }
            const int Fs = cfg->moe_shared_expert_intermediate_size, fc1s = (cfg->gated_linear_unit ? 2 : 1) * Fs;
            if (Fs) { /* split over TP as the dense MLP */
                const char *x = "mlp.shared_experts";
                o->sh_fc1_w = add_param(m, 2, fc1s, C, 0, fc1_split, "%s.%d.%s.linear_fc1.weight", pre, l, x);
                o->sh_fc1_b = bias ? add_param(m, 1, fc1s, 0, 1, fc1_split, "%s.%d.%s.linear_fc1.bias", pre, l, x) : -1;
                o->sh_fc2_w = add_param(m, 2, C, Fs, 0, COLS, "%s.%d.%s.linear_fc2.weight", pre, l, x);
                o->sh_fc2_b = bias ? add_param(m, 1, C, 0, 1, NONE, "%s.%d.%s.linear_fc2.bias", pre, l, x) : -1;
            }
            continue;
        }
        o->fc1_w = add_param(m, 2, fc1_full, C, 0, fc1_split, "%s.%d.mlp.linear_fc1.weight", pre, l);
        o->fc1_b = bias ? add_param(m, 1, fc1_full, 0, 1, fc1_split, "%s.%d.mlp.linear_fc1.bias", pre, l) : -1;
        o->fc2_w = add_param(m, 2, C, cfg->ffn_hidden_size, 0, COLS, "%s.%d.mlp.linear_fc2.weight", pre, l);
        o->fc2_b = bias ? add_param(m, 1, C, 0, 1, NONE, "%s.%d.mlp.linear_fc2.bias", pre, l) : -1;
    }
    if (stage->post_process) {
        m->lnf_w = add_param(m, 1, C, 0, 1, NONE, "decoder.final_layernorm.weight");
        m->lnf_b = rms ? -1 : add_param(m, 1, C, 0, 1, NONE, "decoder.final_layernorm.bias");
        if (!cfg->share_embeddings_and_output_weights) m->out_w = add_param(m, 2, V, C, 0, ROWS, "output_layer.weight");
        else if (stage->pre_process) m->out_w = m->wte;
        else m->out_w = add_param(m, 2, V, C, 0, ROWS, "embedding.word_embeddings.weight"); /* the tied copy */
    }

    /* the experts after everything else, each part a multiple of flat_multiple (data parallelism shards
     * each part over its own group) */
    int multiple = cfg->flat_multiple > 0 ? cfg->flat_multiple : 16;
    m->total = (m->total + multiple - 1) / multiple * multiple;
    m->expert_offset = m->total;
    for (int i = 0; i < m->nl; i++)
        if (m->layers[i].moe) add_experts(m, &m->layers[i], stage->layer_begin + i);
    m->total = (m->total + multiple - 1) / multiple * multiple;
    int64_t shape[1] = {m->total};
    m->weights = lt_backend_tensor(m->be, LT_F32, 1, shape);
    m->grads = lt_backend_tensor(m->be, LT_F32, 1, shape);
    if (cfg->bf16) m->compute = lt_backend_tensor(m->be, LT_BF16, 1, shape);
    if (!m->weights || !m->grads || (cfg->bf16 && !m->compute) ||
        (cfg->layernorm_zero_centered_gamma && !gamma_new(m))) {
        lt_fail(err, (size_t)errlen, "out of %s memory allocating %lld parameters", m->be->name, (long long)m->total);
        lt_gpt_free(m);
        return NULL;
    }
    lt_gpt_init_weights(m);
    return m;
}

void lt_gpt_free(lt_gpt *m) {
    if (!m) return;
    lt_tensor_free(m->weights);
    lt_tensor_free(m->grads);
    lt_tensor_free(m->compute);
    lt_tensor_free(m->gamma);
    free(m->gammas);
    for (int i = 0; m->layers && i < m->nl; i++) {
        layer_offsets *o = &m->layers[i];
        free(o->e_fc1_w), free(o->e_fc1_b), free(o->e_fc2_w), free(o->e_fc2_b);
        free(o->expert_bias), free(o->bias_tokens), free(o->global_sum);
    }
    free(m->layers);
    free(m->params);
    free(m->moe_tokens);
    free(m);
}

void lt_gpt_set_moe_aux_loss_scale(lt_gpt *m, float scale) { m->moe.aux_loss_scale = scale; }

int64_t lt_gpt_expert_offset(const lt_gpt *m) { return m->expert_offset; }

/* The chunk's layer holding MoE layer k's expert bias, or -1. */
static int bias_layer(const lt_gpt *m, int k) {
    for (int i = 0; i < m->nl; i++)
        if (m->layers[i].expert_bias && k-- == 0) return i;
    return -1;
}

int lt_gpt_moe_bias_layers(const lt_gpt *m) {
    int n = 0;
    for (int i = 0; i < m->nl; i++) n += m->layers[i].expert_bias != NULL;
    return n;
}

float *lt_gpt_moe_expert_bias(lt_gpt *m, int k, float **tokens, const char **name) {
    const int i = bias_layer(m, k);
    if (i < 0) return NULL;
    if (tokens) *tokens = m->layers[i].bias_tokens;
    if (name) *name = m->layers[i].bias_name;
    return m->layers[i].expert_bias;
}

void lt_gpt_take_moe_stats(lt_gpt *m, int64_t *tokens_per_expert, lt_gpt_moe_totals *totals) {
    const int E = m->moe.num_experts;
    if (tokens_per_expert && E) memcpy(tokens_per_expert, m->moe_tokens, sizeof(int64_t) * (size_t)E);
    if (totals) *totals = m->moe_totals;
    if (E) memset(m->moe_tokens, 0, sizeof(int64_t) * (size_t)E);
    m->moe_totals = (lt_gpt_moe_totals){0};
}

const lt_gpt_config *lt_gpt_get_config(const lt_gpt *m) { return &m->cfg; }
const lt_gpt_stage *lt_gpt_get_stage(const lt_gpt *m) { return &m->stage; }
const lt_backend *lt_gpt_backend(const lt_gpt *m) { return m->be; }
int lt_gpt_num_params(const lt_gpt *m) { return m->num_params; }
const lt_gpt_param *lt_gpt_param_info(const lt_gpt *m, int i) {
    return i >= 0 && i < m->num_params ? &m->params[i] : NULL;
}
int lt_gpt_find_param(const lt_gpt *m, const char *name) {
    for (int i = 0; i < m->num_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return i;
    return -1;
}
lt_tensor *lt_gpt_weights(lt_gpt *m) { return m->weights; }
lt_tensor *lt_gpt_grads(lt_gpt *m) { return m->grads; }

int lt_gpt_tp_rank(const lt_gpt *m) { return m->tp.rank; }
int lt_gpt_tp_size(const lt_gpt *m) { return m->tp.size; }

int64_t lt_gpt_param_num_runs(const lt_gpt_param *p, int size) {
    if (size == 1 || p->split == LT_SPLIT_NONE || p->split == LT_SPLIT_ROWS) return 1;
    return p->split == LT_SPLIT_GLU_ROWS ? 2 : p->full_shape[0];
}

lt_gpt_run lt_gpt_param_run(const lt_gpt_param *p, int rank, int size, int64_t k) {
    const int64_t n = p->full_numel / size; /* every shard's size */
    switch (size == 1 ? LT_SPLIT_NONE : p->split) {
    case LT_SPLIT_ROWS: return (lt_gpt_run){0, rank * n, n};
    case LT_SPLIT_GLU_ROWS: return (lt_gpt_run){k * n / 2, k * p->full_numel / 2 + rank * n / 2, n / 2};
    case LT_SPLIT_COLUMNS: {
        const int64_t cols = p->full_shape[1] / size;
        return (lt_gpt_run){k * cols, k * p->full_shape[1] + rank * cols, cols};
    }
    default: return (lt_gpt_run){0, 0, p->full_numel};
    }
}

/* Initial values come from the global element index, so a shard holds exactly the single rank's. */
void lt_gpt_init_weights(lt_gpt *m) {
    const lt_backend *be = m->be;
    float *w = lt_tensor_data(m->weights);
    be->memzero(w, sizeof(float) * (size_t)m->total);
    const float std = m->cfg.init_method_std;
    /* Megatron's output_layer_init_method: std / sqrt(2 * num_layers) for the layers that feed the residual. */
    const float scaled_std = std / sqrtf(2.0f * (float)m->cfg.num_layers);
    for (int i = 0; i < m->num_params; i++) {
        const lt_gpt_param *p = &m->params[i];
        float *dst = w + p->offset;
        if (is_norm_weight(p->name)) {
            if (!m->cfg.layernorm_zero_centered_gamma) be->fill(dst, p->numel, 1.0f); /* else gamma - 1 = 0 */
        } else if (is_bias(p->name)) {
            /* zero */
        } else {
            const int scaled = is_scaled_init(p->name);
            const uint64_t key = lt_rng_key(m->cfg.seed, p->name);
            for (int64_t k = 0; k < lt_gpt_param_num_runs(p, m->tp.size); k++) {
                const lt_gpt_run r = lt_gpt_param_run(p, m->tp.rank, m->tp.size, k);
                be->fill_normal(dst + r.local, r.n, key, (uint64_t)r.full, 0.0f, scaled ? scaled_std : std);
            }
        }
    }
}

void lt_gpt_set_grad_ready_hook(lt_gpt *m, lt_gpt_grad_ready_fn fn, void *ud) {
    m->grad_ready = fn;
    m->grad_ready_ud = ud;
}

void lt_gpt_set_param_wait_hook(lt_gpt *m, lt_gpt_param_wait_fn fn, void *ud) {
    m->param_wait = fn;
    m->param_wait_ud = ud;
}

static void params_needed_to(lt_gpt *m, int64_t end) {
    if (m->param_wait) m->param_wait(m->param_wait_ud, end);
}

static void grads_ready_from(lt_gpt *m, int64_t offset) {
    if (m->grad_ready) m->grad_ready(m->grad_ready_ud, offset);
}

/* (A step begins: global_aux_loss's trackers start again, as Megatron's after each step's finalize.) */
void lt_gpt_zero_grad(lt_gpt *m) {
    m->be->memzero(lt_tensor_data(m->grads), sizeof(float) * (size_t)m->total);
    for (int i = 0; i < m->nl; i++) {
        layer_offsets *o = &m->layers[i];
        if (o->global_sum) memset(o->global_sum, 0, sizeof(float) * (size_t)m->moe.num_experts), o->global_steps = 0;
    }
}

#define PTR(base, off) ((off) < 0 ? NULL : (base) + (off))

/* Element i of an activation (or compute-weight) buffer of the compute dtype. */
static void *at(const lt_gpt *m, const void *base, int64_t i) { return (char *)base + (size_t)i * m->E; }

/* The weight at a flat offset as the ops read it; NULL for an absent parameter (-1). */
static const void *weight(const lt_gpt *m, int64_t off) {
    if (off < 0) return NULL;
    return at(m, lt_tensor_data(m->compute ? m->compute : m->weights), off);
}

/* The first zero-centred gamma slot at a flat offset >= off (num_gammas when none). */
static int gamma_from(const lt_gpt *m, int64_t off) {
    int lo = 0, hi = m->num_gammas;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (m->gammas[mid].off < off) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* A norm weight as the norms apply it: the weight itself, or 1 + weight under zero-centred gamma. */
static const void *norm_weight(const lt_gpt *m, int64_t off) {
    if (!m->gamma || off < 0) return weight(m, off);
    return at(m, lt_tensor_data(m->gamma), m->gammas[gamma_from(m, off)].eff);
}

/* Zero-centred gamma: recomputes 1 + weight for the norm weights in [from, end) from the weights the
 * ops read (the bf16 copy under mixed precision: 1 + its rounded value, rounded, as Megatron's bf16
 * `weight + 1`). */
static void gamma_refresh(lt_gpt *m, int64_t from, int64_t end) {
    const void *ones = lt_tensor_data(m->gamma);
    for (int i = gamma_from(m, from); i < m->num_gammas && m->gammas[i].off < end; i++) {
        const gamma_slot *g = &m->gammas[i];
        m->ops->add_forward(at(m, ones, g->eff), ones, weight(m, g->off), g->n);
    }
}

/* Layer i of the chunk (global layer layer_begin + i): its weights as the ops read them, and its
 * gradients, as views into the chunk's flat buffers. */
static void weights_of(const lt_gpt *m, int i, lt_attention_weights *aw, lt_mlp_weights *mw) {
    const layer_offsets *o = &m->layers[i];
    *aw = (lt_attention_weights){norm_weight(m, o->ln1_w), weight(m, o->ln1_b),     weight(m, o->qkv_w),
                                 weight(m, o->qkv_b),      norm_weight(m, o->qn_w), weight(m, o->qn_b),
                                 norm_weight(m, o->kn_w),  weight(m, o->kn_b),      weight(m, o->proj_w),
                                 weight(m, o->proj_b)};
    *mw = (lt_mlp_weights){norm_weight(m, o->ln2_w), weight(m, o->ln2_b), weight(m, o->fc1_w),
                           weight(m, o->fc1_b),      weight(m, o->fc2_w), weight(m, o->fc2_b)};
}

static void grads_of(lt_gpt *m, int i, lt_attention_grads *ag, lt_mlp_grads *mg) {
    float *g = lt_tensor_data(m->grads);
    const layer_offsets *o = &m->layers[i];
    *ag = (lt_attention_grads){PTR(g, o->ln1_w), PTR(g, o->ln1_b), PTR(g, o->qkv_w),  PTR(g, o->qkv_b),
                               PTR(g, o->qn_w),  PTR(g, o->qn_b),  PTR(g, o->kn_w),   PTR(g, o->kn_b),
                               PTR(g, o->proj_w), PTR(g, o->proj_b)};
    *mg = (lt_mlp_grads){PTR(g, o->ln2_w), PTR(g, o->ln2_b), PTR(g, o->fc1_w),
                         PTR(g, o->fc1_b), PTR(g, o->fc2_w), PTR(g, o->fc2_b)};
}

/* An MoE layer's weights and gradients (arrays of its local experts' pointers in `ptrs`: 8 of them). */
static void moe_of(lt_gpt *m, int i, lt_moe_weights *w, lt_moe_grads *g, void **ptrs) {
    layer_offsets *o = &m->layers[i];
    const int E = local_experts(m);
    float *gr = lt_tensor_data(m->grads);
    const void **wp = (const void **)ptrs;
    float **gp = (float **)(ptrs + 4 * (size_t)E);
    const int64_t *offs[4] = {o->e_fc1_w, o->e_fc1_b, o->e_fc2_w, o->e_fc2_b};
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < E; e++) {
            wp[k * E + e] = weight(m, offs[k][e]);
            gp[k * E + e] = PTR(gr, offs[k][e]);
        }
    const int bias = m->cfg.add_bias_linear;
    *w = (lt_moe_weights){norm_weight(m, o->ln2_w), weight(m, o->ln2_b), weight(m, o->router_w), wp,
                          bias ? wp + E : NULL, wp + 2 * E, bias ? wp + 3 * E : NULL,
                          {NULL, NULL, weight(m, o->sh_fc1_w), weight(m, o->sh_fc1_b), weight(m, o->sh_fc2_w),
                           weight(m, o->sh_fc2_b)},
                          o->expert_bias, o->global_sum, o->global_sum ? &o->global_steps : NULL};
    *g = (lt_moe_grads){PTR(gr, o->ln2_w), PTR(gr, o->ln2_b), PTR(gr, o->router_w), gp, bias ? gp + E : NULL,
                        gp + 2 * E, bias ? gp + 3 * E : NULL,
                        {NULL, NULL, PTR(gr, o->sh_fc1_w), PTR(gr, o->sh_fc1_b), PTR(gr, o->sh_fc2_w),
                         PTR(gr, o->sh_fc2_b)}};
}

/* Where the chunk's layer i begins in the flat buffers (i == nl: what follows the last layer). */
static int64_t layer_start(const lt_gpt *m, int i) {
    if (i < m->nl) return m->layers[i].ln1_w;
    return m->stage.post_process ? m->lnf_w : m->total;
}

/* ---- context memory: one arena per microbatch ---- */

typedef struct {
    char *base;
    size_t used;
} arena;

static void *take(arena *a, size_t nbytes) {
    void *p = a->base ? a->base + a->used : NULL;
    a->used += (nbytes + 63) & ~(size_t)63;
    return p;
}

/* Lays out the context twice: first to measure (base NULL), then for real. */
static void layout_ctx(const lt_gpt *m, lt_gpt_ctx *c, arena *a) {
    const lt_gpt_config *cfg = &m->cfg;
    const size_t N = (size_t)c->B * c->T, C = cfg->hidden_size, F = sizeof(float), E = m->E;
    const size_t No = (size_t)lt_layer_outer_rows(&m->spec, c->B, c->T);
    const int pre = m->stage.pre_process, post = m->stage.post_process;
    c->tokens = pre ? take(a, N * 4) : NULL;
    c->targets = post ? take(a, N * 4) : NULL;
    c->to_bsh = c->to_sbh = NULL;
    if (!pre || !post) {
        c->to_bsh = take(a, No * 4);
        c->to_sbh = take(a, No * 4);
    }
    for (int i = 0; i <= m->nl; i++) c->x[i] = take(a, No * C * E);
    for (int i = 0; i < m->nl; i++) {
        lt_layer_ctx *lc = &c->layers[i];
        lc->B = c->B;
        lc->T = c->T;
        lc->layer = m->stage.layer_begin + i; /* global: dropout masks do not depend on the chunk */
        lc->training = c->training;
        lc->dropout_seed = c->dropout_seed;
        lc->moe = m->layers[i].moe; /* its MLP activations live in the MoE state instead */
        lt_layer_ctx_layout(&m->spec, E, lc, a->base, &a->used);
    }
    c->lnf = c->logits = NULL;
    c->lnf_mean = c->lnf_rstd = c->ce_lse = NULL;
    if (post) {
        c->lnf = take(a, No * C * E);
        c->lnf_mean = take(a, No * F);
        c->lnf_rstd = take(a, No * F);
        c->logits = take(a, N * (size_t)(m->vocab.end - m->vocab.start) * E);
        c->ce_lse = take(a, N * F);
    }
}

size_t lt_gpt_activation_bytes(const lt_gpt *m, int B, int T) {
    if (B <= 0 || T <= 0 || (m->tp.sequence_parallel && T % m->tp.size)) return 0;
    lt_gpt_ctx c = {.B = B, .T = T};
    c.x = calloc((size_t)m->nl + 1, sizeof *c.x);
    c.layers = calloc((size_t)(m->nl > 0 ? m->nl : 1), sizeof *c.layers);
    arena a = {NULL, 0};
    layout_ctx(m, &c, &a);
    free(c.x);
    free(c.layers);
    return a.used;
}

static lt_gpt_ctx *ctx_new(const lt_gpt *m, int B, int T, int training, uint64_t dropout_seed) {
    lt_gpt_ctx *c = calloc(1, sizeof *c);
    c->be = m->be;
    c->tp = &m->tp;
    c->spec = &m->spec;
    c->B = B;
    c->T = T;
    c->training = training != 0;
    c->dropout_seed = dropout_seed;
    c->x = calloc((size_t)m->nl + 1, sizeof *c->x);
    c->layers = calloc((size_t)(m->nl > 0 ? m->nl : 1), sizeof *c->layers);
    c->nl = m->nl;
    c->moe = calloc((size_t)(m->nl > 0 ? m->nl : 1), sizeof *c->moe);
    arena a = {NULL, 0};
    layout_ctx(m, c, &a);
    c->arena_bytes = a.used;
    c->arena = m->be->alloc(a.used);
    c->host_targets = malloc(sizeof(int32_t) * (size_t)B * T);
    c->host_tokens = malloc(sizeof(int32_t) * (size_t)B * T);
    c->host_scratch = malloc(sizeof(float) * (size_t)B * T);
    if (!c->arena || !c->host_targets || !c->host_tokens || !c->host_scratch || !c->moe) {
        lt_gpt_ctx_free(c);
        return NULL;
    }
    a = (arena){c->arena, 0};
    layout_ctx(m, c, &a);
    return c;
}

void lt_gpt_ctx_free(lt_gpt_ctx *c) {
    if (!c) return;
    if (c->arena) c->be->release(c->arena, c->arena_bytes);
    lt_tensor_free(c->losses);
    if (c->rows) lt_tp_rows_free(c->tp, c->rows);
    if (c->kv) lt_layer_kv_maps_free(c->spec, c->kv);
    if (c->cp) lt_cp_maps_free(c->spec->cp, c->cp);
    for (int i = 0; c->moe && i < c->nl; i++) lt_moe_state_free(c->spec, c->moe[i]);
    free(c->moe);
    free(c->host_targets);
    free(c->host_tokens);
    free(c->host_scratch);
    free(c->x);
    free(c->layers);
    free(c);
}

const void *lt_gpt_ctx_logits(const lt_gpt_ctx *c) { return c->logits; }

/* ---- the chunk boundary: [B, T, C] inside, [T, B, C] (Megatron's [s, b, h]) between chunks ---- */

/* Both row maps of a [B, T] microbatch (its outer rows: [B, T/TP] under sequence parallelism), into
 * the context's device memory. */
static void boundary_indices(const lt_gpt *m, lt_gpt_ctx *c) {
    const int B = c->B, N = lt_layer_outer_rows(&m->spec, B, c->T), T = N / B;
    int32_t *h = malloc(sizeof(int32_t) * 2 * (size_t)N);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            h[b * T + t] = t * B + b;     /* to_bsh */
            h[N + t * B + b] = b * T + t; /* to_sbh */
        }
    m->be->to_device(c->to_bsh, h, sizeof(int32_t) * (size_t)N);
    m->be->to_device(c->to_sbh, h + N, sizeof(int32_t) * (size_t)N);
    free(h);
}

/* The transpose is a row gather: the embedding lookup copies row ids[n] of a table to row n, exactly
 * and in one kernel on any backend, so no new op is needed. */
static void transpose_rows(const lt_gpt *m, void *dst, const void *src, const int32_t *ids, int N) {
    m->ops->embedding_forward(dst, ids, src, N, m->cfg.hidden_size);
}

/* A boundary tensor must be [T, B, C], contiguous, of the compute dtype, in the backend's memory. */
static int check_boundary(const lt_gpt *m, const lt_tensor *t, int B, int T, const char *what, char *err,
                          int errlen) {
    const int C = m->cfg.hidden_size;
    T = lt_layer_outer_rows(&m->spec, B, T) / B; /* this rank's positions under sequence parallelism */
    if (!t) {
        lt_fail(err, (size_t)errlen, "chunk [%d, %d) needs %s [%d, %d, %d]", m->stage.layer_begin,
                m->stage.layer_end, what, T, B, C);
        return 0;
    }
    if (t->ndim != 3 || t->shape[0] != T || t->shape[1] != B || t->shape[2] != C || !lt_tensor_is_contiguous(t) ||
        t->dtype != m->ops->dtype || t->storage->device != m->be->device) {
        lt_fail(err, (size_t)errlen, "%s must be a contiguous %s %s tensor [%d, %d, %d] ([seq, batch, hidden])",
                what, lt_dtype_name(m->ops->dtype), m->be->name, T, B, C);
        return 0;
    }
    return 1;
}

/* ---- forward ---- */

/* Weights below flat offset `end` are about to be read: wait for them (data parallelism may still
 * be gathering them) and, under mixed precision, refresh their bf16 copy from the fp32 main
 * weights, which the optimizer may have changed since the last forward (and, under zero-centred
 * gamma, the norms' 1 + weight). *ready tracks how far
 * this forward has got; a cast costs one read and one write of the weights per microbatch. */
static void weights_needed_to(lt_gpt *m, int64_t *ready, int64_t end) {
    params_needed_to(m, end);
    if (end <= *ready) return;
    if (m->compute)
        m->be->cast_to_bf16(at(m, lt_tensor_data(m->compute), *ready), (const float *)lt_tensor_data(m->weights) + *ready,
                            end - *ready);
    if (m->gamma) gamma_refresh(m, *ready, end);
    *ready = end;
}

/* Bytes of the parallel layers' scratch for a [B, T] microbatch: sequence parallelism's two [N, C]
 * buffers, the shared key/value heads' two (compute dtype), and the ring's under context parallelism. */
/* Each of them 64-byte aligned. */
static size_t aligned(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t parallel_scratch_bytes(const lt_gpt *m, int B, int T) {
    const int N = B * T;
    const size_t sp = m->tp.size > 1 && m->tp.sequence_parallel ? aligned(m->E * (size_t)N * m->cfg.hidden_size) : 0;
    const lt_cp_maps shape = {B, T, m->spec.num_attention_heads, m->spec.num_query_groups, m->cfg.kv_channels};
    const size_t ring = m->cp.size > 1 ? lt_cp_attention_scratch(&m->cp, &shape) : 0;
    return 2 * sp + 2 * aligned(m->E * lt_layer_kv_scratch(&m->spec, N)) + ring;
}

/* Points sc's parallel buffers into base (parallel_scratch_bytes of it; NULL ones where not needed). */
static void parallel_scratch(const lt_gpt *m, int B, int T, char *base, lt_layer_scratch *sc) {
    const int N = B * T;
    const size_t sp = m->tp.size > 1 && m->tp.sequence_parallel ? aligned(m->E * (size_t)N * m->cfg.hidden_size) : 0;
    const size_t kv = aligned(m->E * lt_layer_kv_scratch(&m->spec, N));
    sc->tp_full = sp ? base : NULL;
    sc->tp_landing = sp ? base + sp : NULL;
    sc->kv_a = kv ? base + 2 * sp : NULL;
    sc->kv_b = kv ? base + 2 * sp + kv : NULL;
    sc->ring = m->cp.size > 1 ? base + 2 * sp + 2 * kv : NULL;
}

/* The embedding on one rank: the tokens' rows, the positions, dropout. */
static void embed(lt_gpt *m, lt_gpt_ctx *c) {
    const int B = c->B, T = c->T, N = B * T, C = m->cfg.hidden_size;
    m->ops->embedding_forward(c->x[0], c->tokens, weight(m, m->wte), N, C);
    if (m->wpe >= 0) m->ops->position_embedding_forward(c->x[0], weight(m, m->wpe), B, T, C, c->pos);
    const float p = c->training ? m->cfg.hidden_dropout : 0.0f;
    if (p > 0) /* at the rows' global positions (c->rows under context parallelism) */
        lt_tp_dropout_forward(&m->tp, c->rows, c->x[0], c->x[0], B, T, C, p,
                              lt_dropout_key(c->dropout_seed, -1, "embedding"));
}

/* The vocabulary-parallel embedding: each rank's rows summed over TP (reduce-scattered under SP);
 * with learned positions Megatron all-reduces, adds the positions, then scatters. Then dropout. */
static int embed_parallel(lt_gpt *m, lt_gpt_ctx *c, const lt_layer_scratch *sc, char *err, int errlen) {
    const lt_tp *tp = &m->tp;
    const int B = c->B, T = c->T, N = B * T, C = m->cfg.hidden_size;
    void *full = tp->sequence_parallel ? sc->tp_full : c->x[0], *out;
    if (lt_vocab_embedding_forward(tp, &m->vocab, full, c->host_tokens, weight(m, m->wte), N, C, err, (size_t)errlen))
        return -1;
    if (m->wpe < 0) {
        if (lt_tp_exit(tp, c->rows, &out, full, c->x[0], sc->tp_landing, C, err, (size_t)errlen)) return -1;
    } else {
        if (lt_tp_all_reduce(tp, full, (int64_t)N * C, m->ops->dtype, err, (size_t)errlen)) return -1;
        m->ops->position_embedding_forward(full, weight(m, m->wpe), B, T, C, c->pos);
        if (tp->sequence_parallel) lt_tp_scatter(tp, c->rows, c->x[0], full, C);
    }
    const float p = c->training ? m->cfg.hidden_dropout : 0.0f;
    if (p > 0)
        lt_tp_dropout_forward(tp, c->rows, c->x[0], c->x[0], B, T, C, p,
                              lt_dropout_key(c->dropout_seed, -1, "embedding"));
    return 0;
}

/* The maps the parallel layers need for c's microbatch: tensor parallelism's rows (also, under
 * context parallelism, the rows' global positions for dropout), the shared key/value heads', and the
 * ring's. -1 with err when one cannot be made. */
static int parallel_maps(lt_gpt *m, lt_gpt_ctx *c, char *err, int errlen) {
    const int B = c->B, T = c->T, cp = m->cp.size > 1;
    if ((m->tp.size > 1 || cp) && !(c->rows = lt_tp_rows_new(&m->tp, B, T, err, (size_t)errlen))) return -1;
    if (m->spec.kv_replicas > 1 && !(c->kv = lt_layer_kv_maps_new(&m->spec, B * T, err, (size_t)errlen))) return -1;
    if (!cp) return 0;
    c->cp = lt_cp_maps_new(&m->cp, B, T, m->spec.num_attention_heads, m->spec.num_query_groups, m->cfg.kv_channels,
                           err, (size_t)errlen);
    int32_t *pos = c->cp ? malloc(sizeof(int32_t) * (size_t)T) : NULL;
    if (c->cp && !pos) lt_fail(err, (size_t)errlen, "out of host memory");
    if (!pos) return -1;
    for (int t = 0; t < T; t++) pos[t] = lt_cp_position(m->cp.rank, m->cp.size, T, t);
    lt_tp_rows_set_positions(&m->tp, c->rows, pos, T * m->cp.size);
    free(pos);
    c->pos = c->cp->pos + (size_t)m->cp.rank * T;
    return 0;
}

/* One MoE layer's training forward into the routing statistics (and its expert bias's token counts). */
static void count_moe(lt_gpt *m, const lt_moe_state *st, layer_offsets *o) {
    const lt_moe_stats s = lt_moe_state_stats(st);
    for (int e = 0; o->bias_tokens && e < m->moe.num_experts; e++) o->bias_tokens[e] += (float)s.tokens_per_expert[e];
    lt_gpt_moe_totals *t = &m->moe_totals;
    for (int e = 0; e < m->moe.num_experts; e++) m->moe_tokens[e] += s.tokens_per_expert[e];
    t->forwards++, t->routed += s.routed, t->kept += s.kept, t->aux_loss += s.aux_loss, t->z_loss += s.z_loss;
    t->rows_sent += s.rows_sent, t->rows_received += s.rows_received, t->dispatch_seconds += s.dispatch_seconds;
}

/* ---- the key/value cache of text generation ---- */

struct lt_gpt_cache {
    const lt_backend *be;
    int nl;
    lt_layer_kv_cache *layers; /* [nl], sharing pos and kv_rows */
    void *mem;                 /* backend memory: every layer's kv, then pos and kv_rows */
    size_t bytes;
};

/* The chunk forward, or with a cache the decoding forward of one sequence (eval mode): rows at positions
 * cache->len .. len + T - 1 attend to the cached ones too. */
static lt_gpt_ctx *forward(lt_gpt *m, const int32_t *tokens, const lt_tensor *hidden, const int32_t *targets, int B,
                           int T, int training, uint64_t dropout_seed, lt_tensor **out, int64_t *num_valid,
                           lt_gpt_cache *cache, char *err, int errlen) {
    const lt_gpt_config *cfg = &m->cfg;
    const int N = B * T, C = cfg->hidden_size, V = cfg->vocab_size, Vl = (int)(m->vocab.end - m->vocab.start);
    const int pre = m->stage.pre_process, post = m->stage.post_process;
    const int sp = m->tp.size > 1 && m->tp.sequence_parallel;
    if (out) *out = NULL;
    if (num_valid) *num_valid = 0;
    if (cache && T > cache->layers[0].max_len - cache->layers[0].len) {
        lt_fail(err, (size_t)errlen, "%d more tokens do not fit the key/value cache: %d of its %d positions are taken", T,
                cache->layers[0].len, cache->layers[0].max_len);
        return NULL;
    }
    if (B <= 0 || T <= 0 || T > cfg->seq_length) {
        lt_fail(err, (size_t)errlen, "batch shape [%d, %d] is invalid: need B > 0 and 0 < T <= seq_length (%d)", B, T,
                cfg->seq_length);
        return NULL;
    }
    if (sp && T % m->tp.size != 0) {
        lt_fail(err, (size_t)errlen, "sequence parallelism splits the %d positions of a microbatch across "
                "tensor_model_parallel_size = %d ranks: they do not divide", T, m->tp.size);
        return NULL;
    }
    if (pre && !tokens) {
        lt_fail(err, (size_t)errlen, "a first stage's forward needs tokens");
        return NULL;
    }
    if (!pre && !check_boundary(m, hidden, B, T, "the input hidden state", err, errlen)) return NULL;
    for (int i = 0; i < N; i++) {
        if (pre && (tokens[i] < 0 || tokens[i] >= V)) {
            lt_fail(err, (size_t)errlen, "token id %d at position %d is outside the vocabulary [0, %d)", tokens[i], i,
                    V);
            return NULL;
        }
        if (post && targets && targets[i] >= V) {
            lt_fail(err, (size_t)errlen, "target id %d at position %d is outside the vocabulary [0, %d)", targets[i],
                    i, V);
            return NULL;
        }
    }
    lt_gpt_ctx *c = ctx_new(m, B, T, training, dropout_seed);
    lt_layer_scratch sc = {0};
    const size_t sc_bytes = parallel_scratch_bytes(m, B, T);
    char *sc_base = c && sc_bytes ? m->be->alloc(sc_bytes) : NULL;
    parallel_scratch(m, B, T, sc_base, &sc);
    if (!c || (sc_bytes && !sc_base)) {
        if (sc_base) m->be->release(sc_base, sc_bytes);
        lt_gpt_ctx_free(c);
        lt_fail(err, (size_t)errlen, "out of %s memory for the activations of a [%d, %d] microbatch", m->be->name, B,
                T);
        return NULL;
    }
    if (parallel_maps(m, c, err, errlen)) {
        if (sc_base) m->be->release(sc_base, sc_bytes);
        lt_gpt_ctx_free(c);
        return NULL;
    }
    const lt_backend *be = m->be;
    const lt_ops *ops = m->ops;
    if (post) {
        if (targets) memcpy(c->host_targets, targets, sizeof(int32_t) * (size_t)N);
        else for (int i = 0; i < N; i++) c->host_targets[i] = -1;
        be->to_device(c->targets, c->host_targets, sizeof(int32_t) * (size_t)N);
    }
    if (pre) {
        memcpy(c->host_tokens, tokens, sizeof(int32_t) * (size_t)N);
        be->to_device(c->tokens, tokens, sizeof(int32_t) * (size_t)N);
    }
    if (c->to_bsh) boundary_indices(m, c);
    if (cache) c->pos = cache->layers[0].pos + cache->layers[0].len;
    for (int i = 0; i < m->nl; i++) {
        lt_layer_ctx *lc = &c->layers[i];
        lc->rows = c->rows, lc->kv = c->kv, lc->cp = c->cp, lc->pos = c->pos;
        lc->cache = cache ? &cache->layers[i] : NULL;
    }
    const int No = lt_layer_outer_rows(&m->spec, B, T);
    int rc = 0;

    /* eval mode drops nothing (c->training reaches the embedding and every layer's context) */
    int64_t ready = 0;
    if (pre) {
        weights_needed_to(m, &ready, layer_start(m, 0));
        if (m->tp.size > 1) rc = embed_parallel(m, c, &sc, err, errlen);
        else embed(m, c);
    } else {
        transpose_rows(m, c->x[0], lt_tensor_data(hidden), c->to_bsh, No);
    }
    void **moe_ptrs = m->moe.num_experts ? malloc(sizeof(void *) * 8 * (size_t)m->moe.num_experts) : NULL;
    for (int i = 0; i < m->nl && !rc; i++) {
        weights_needed_to(m, &ready, layer_start(m, i + 1));
        lt_attention_weights aw;
        lt_mlp_weights mw;
        weights_of(m, i, &aw, &mw);
        lt_layer_ctx *lc = &c->layers[i];
        if (!m->layers[i].moe) {
            rc = lt_layer_forward(&m->spec, ops, &aw, &mw, lc, c->x[i], c->x[i + 1], &sc, err, (size_t)errlen);
            continue;
        }
        lt_moe_weights w;
        lt_moe_grads g;
        moe_of(m, i, &w, &g, moe_ptrs);
        rc = lt_layer_attention_forward(&m->spec, ops, &aw, lc, c->x[i], lc->h, &sc, err, (size_t)errlen);
        if (!rc) rc = lt_moe_mlp_forward(&m->spec, &m->moe, ops, &w, lc, lc->h, c->x[i + 1], &c->moe[i], &sc, err,
                                         (size_t)errlen);
        if (!rc && c->training) count_moe(m, c->moe[i], &m->layers[i]);
    }
    free(moe_ptrs);
    weights_needed_to(m, &ready, m->total);
    if (rc) goto fail;

    const void *last = c->x[m->nl];
    if (!post) {
        int64_t shape[3] = {No / B, B, C};
        lt_tensor *o = out ? lt_backend_tensor(be, ops->dtype, 3, shape) : NULL;
        if (out && !o) {
            lt_fail(err, (size_t)errlen, "out of %s memory for a chunk's output [%d, %d, %d]", be->name, No / B, B, C);
            goto fail;
        }
        if (o) transpose_rows(m, lt_tensor_data(o), last, c->to_sbh, No);
        if (out) *out = o;
        if (sc_base) be->release(sc_base, sc_bytes);
        return c;
    }
    const void *ln;
    lt_layer_norm_forward(&m->spec, ops, c->lnf, c->lnf_mean, c->lnf_rstd, last, norm_weight(m, m->lnf_w),
                          weight(m, m->lnf_b), No);
    if (lt_tp_enter(&m->tp, c->rows, &ln, c->lnf, sc.tp_full, sc.tp_landing, C, err, (size_t)errlen)) goto fail;
    ops->linear_forward(c->logits, ln, weight(m, m->out_w), NULL, NULL, N, C, Vl);
    c->num_valid = 0;
    if (targets) {
        int64_t shape[2] = {B, T};
        c->losses = lt_backend_tensor(be, LT_F32, 2, shape);
        if (!c->losses) {
            lt_fail(err, (size_t)errlen, "out of %s memory for the losses of a [%d, %d] microbatch", be->name, B, T);
            goto fail;
        }
        if (m->tp.size == 1)
            ops->cross_entropy_forward(lt_tensor_data(c->losses), c->ce_lse, c->logits, c->targets, N, V);
        else if (lt_vocab_cross_entropy_forward(&m->tp, &m->vocab, lt_tensor_data(c->losses), c->ce_lse, c->logits,
                                                c->host_targets, N, err, (size_t)errlen))
            goto fail;
        for (int i = 0; i < N; i++) c->num_valid += c->host_targets[i] >= 0;
        /* the caller's view shares the storage, so the losses outlive the context */
        if (out) *out = lt_tensor_view(c->losses, 2, c->losses->shape, c->losses->stride, c->losses->offset);
    }
    if (num_valid) *num_valid = c->num_valid;
    if (sc_base) be->release(sc_base, sc_bytes);
    return c;
fail:
    if (sc_base) be->release(sc_base, sc_bytes);
    lt_gpt_ctx_free(c);
    return NULL;
}

lt_gpt_ctx *lt_gpt_chunk_forward(lt_gpt *m, const int32_t *tokens, const lt_tensor *hidden, const int32_t *targets,
                                 int B, int T, int training, uint64_t dropout_seed, lt_tensor **out, int64_t *num_valid,
                                 char *err, int errlen) {
    return forward(m, tokens, hidden, targets, B, T, training, dropout_seed, out, num_valid, NULL, err, errlen);
}

lt_gpt_cache *lt_gpt_cache_new(lt_gpt *m, int max_len, char *err, int errlen) {
    const lt_layer_spec *s = &m->spec;
    const int G = s->num_query_groups, D = s->kv_channels, per = s->num_attention_heads / G + 2;
    if (!m->stage.pre_process || !m->stage.post_process || m->tp.size > 1 || m->cp.size > 1) {
        lt_fail(err, (size_t)errlen, "text generation runs the whole model on one rank: this chunk holds layers "
                "[%d, %d) of %d at tensor_model_parallel_size %d, context_parallel_size %d", m->stage.layer_begin,
                m->stage.layer_end, m->cfg.num_layers, m->tp.size, m->cp.size);
        return NULL;
    }
    if (max_len < 1 || max_len > m->cfg.seq_length) {
        lt_fail(err, (size_t)errlen, "a key/value cache of %d positions: the model takes 1 to seq_length = %d", max_len,
                m->cfg.seq_length);
        return NULL;
    }
    const size_t kv = ((size_t)max_len * 2 * G * D * m->E + 255) & ~(size_t)255, rows = (size_t)max_len * 2 * G;
    lt_gpt_cache *c = calloc(1, sizeof *c);
    int32_t *host = malloc(sizeof(int32_t) * (max_len + rows));
    if (c) c->layers = calloc((size_t)(m->nl > 0 ? m->nl : 1), sizeof *c->layers);
    if (c) c->be = m->be, c->nl = m->nl, c->bytes = kv * (size_t)m->nl + sizeof(int32_t) * (max_len + rows);
    if (c && c->layers && host) c->mem = m->be->alloc(c->bytes);
    if (!c || !c->layers || !host || !c->mem) {
        free(host);
        lt_gpt_cache_free(c);
        lt_fail(err, (size_t)errlen, "out of %s memory for a key/value cache of %d positions", m->be->name, max_len);
        return NULL;
    }
    /* positions 0 .. max_len - 1, then kv row (t G + g) 2 + j <- qkv row (t G + g) per + per - 2 + j */
    for (int t = 0; t < max_len; t++) host[t] = t;
    for (size_t r = 0; r < rows; r++) host[max_len + r] = (int32_t)(r / 2 * per + per - 2 + r % 2);
    int32_t *pos = (int32_t *)((char *)c->mem + kv * (size_t)m->nl);
    m->be->to_device(pos, host, sizeof(int32_t) * (max_len + rows));
    free(host);
    for (int i = 0; i < m->nl; i++)
        c->layers[i] = (lt_layer_kv_cache){(char *)c->mem + kv * (size_t)i, 0, max_len, pos, pos + max_len};
    return c;
}

void lt_gpt_cache_free(lt_gpt_cache *c) {
    if (!c) return;
    if (c->mem) c->be->release(c->mem, c->bytes);
    free(c->layers);
    free(c);
}

int lt_gpt_cache_length(const lt_gpt_cache *c) { return c->nl ? c->layers[0].len : 0; }

int lt_gpt_decode(lt_gpt *m, lt_gpt_cache *cache, const int32_t *tokens, int T, float *logits, char *err, int errlen) {
    if (!cache->nl) return lt_fail(err, (size_t)errlen, "a model without layers has nothing to decode");
    lt_gpt_ctx *c = forward(m, tokens, NULL, NULL, 1, T, 0, 0, NULL, NULL, cache, err, errlen);
    if (!c) return -1;
    const int V = m->cfg.vocab_size;
    const size_t E = m->E, last = E * (size_t)(T - 1) * V;
    if (m->ops->dtype == LT_F32) {
        m->be->to_host(logits, (const char *)c->logits + last, sizeof(float) * (size_t)V);
    } else { /* bf16: widened here */
        uint16_t *row = malloc(sizeof(uint16_t) * (size_t)V);
        if (!row) {
            lt_gpt_ctx_free(c);
            return lt_fail(err, (size_t)errlen, "out of host memory");
        }
        m->be->to_host(row, (const char *)c->logits + last, sizeof(uint16_t) * (size_t)V);
        for (int v = 0; v < V; v++) logits[v] = lt_bf16_to_f32(row[v]);
        free(row);
    }
    for (int i = 0; i < cache->nl; i++) cache->layers[i].len += T;
    lt_gpt_ctx_free(c);
    return 0;
}

lt_gpt_ctx *lt_gpt_forward(lt_gpt *m, const int32_t *tokens, const int32_t *targets, int B, int T, int training,
                           uint64_t dropout_seed, float *loss, int64_t *num_valid, char *err, int errlen) {
    if (!m->stage.pre_process || !m->stage.post_process) {
        lt_fail(err, (size_t)errlen, "lt_gpt_forward runs the whole model; chunk [%d, %d) needs lt_gpt_chunk_forward",
                m->stage.layer_begin, m->stage.layer_end);
        return NULL;
    }
    lt_gpt_ctx *c =
        lt_gpt_chunk_forward(m, tokens, NULL, targets, B, T, training, dropout_seed, NULL, num_valid, err, errlen);
    if (!c) return NULL;
    double sum = 0;
    if (c->losses) { /* the mean over valid targets, summed in double on the host */
        const int N = B * T;
        float *losses = c->host_scratch;
        m->be->to_host(losses, lt_tensor_data(c->losses), sizeof(float) * (size_t)N);
        for (int i = 0; i < N; i++)
            if (c->host_targets[i] >= 0) sum += losses[i];
    }
    if (loss) *loss = c->num_valid ? (float)(sum / (double)c->num_valid) : 0.0f;
    return c;
}

/* ---- backward ---- */

/* The embedding's backward on one rank: dropout, then the table's and the positions' gradients. */
static void embed_backward(lt_gpt *m, lt_gpt_ctx *c, const void *dx, const lt_layer_scratch *sc) {
    const int B = c->B, T = c->T, N = B * T, C = m->cfg.hidden_size;
    float *g = lt_tensor_data(m->grads);
    const void *d = dx;
    const float p = c->training ? m->cfg.hidden_dropout : 0.0f;
    if (p > 0) {
        lt_tp_dropout_backward(&m->tp, c->rows, sc->d_c, dx, B, T, C, p, lt_dropout_key(c->dropout_seed, -1, "embedding"));
        d = sc->d_c;
    }
    m->ops->embedding_backward(g + m->wte, d, c->tokens, N, C);
    if (m->wpe >= 0) m->ops->position_embedding_backward(g + m->wpe, d, B, T, C, c->pos);
}

/* The vocabulary-parallel embedding's backward: dropout, the gradient gathered back to every row
 * (under SP), then each rank's rows of the table and the positions. */
static int embed_parallel_backward(lt_gpt *m, lt_gpt_ctx *c, const void *dx, const lt_layer_scratch *sc, char *err,
                                   int errlen) {
    const lt_tp *tp = &m->tp;
    const int B = c->B, T = c->T, N = B * T, C = m->cfg.hidden_size;
    float *g = lt_tensor_data(m->grads);
    const void *d = dx, *dfull;
    const float p = c->training ? m->cfg.hidden_dropout : 0.0f;
    if (p > 0) {
        lt_tp_dropout_backward(tp, c->rows, sc->d_c, dx, B, T, C, p, lt_dropout_key(c->dropout_seed, -1, "embedding"));
        d = sc->d_c;
    }
    if (lt_tp_exit_backward(tp, c->rows, &dfull, d, sc->tp_full, sc->tp_landing, C, err, (size_t)errlen)) return -1;
    if (lt_vocab_embedding_backward(tp, &m->vocab, g + m->wte, dfull, c->host_tokens, N, C, err, (size_t)errlen))
        return -1;
    if (m->wpe >= 0) m->ops->position_embedding_backward(g + m->wpe, dfull, B, T, C, c->pos);
    return 0;
}

int lt_gpt_chunk_backward(lt_gpt *m, lt_gpt_ctx *c, const lt_tensor *grad_output, float grad_scale,
                          lt_tensor **grad_input, char *err, int errlen) {
    const lt_gpt_config *cfg = &m->cfg;
    const int B = c->B, T = c->T, N = B * T, C = cfg->hidden_size, V = cfg->vocab_size;
    const int Vl = (int)(m->vocab.end - m->vocab.start), No = lt_layer_outer_rows(&m->spec, B, T);
    const size_t NC = (size_t)N * C, E = m->E;
    const int pre = m->stage.pre_process, post = m->stage.post_process;
    const lt_backend *be = m->be;
    const lt_ops *ops = m->ops;
    float *g = lt_tensor_data(m->grads);
    if (grad_input) *grad_input = NULL;
    if (!post && !check_boundary(m, grad_output, B, T, "the output's gradient", err, errlen)) {
        lt_gpt_ctx_free(c);
        return -1;
    }

    size_t widest = (size_t)m->qkv_dim;
    if ((size_t)m->fc1_dim > widest) widest = (size_t)m->fc1_dim;
    const size_t HD = (size_t)m->spec.num_attention_heads * cfg->kv_channels;
    const size_t bytes = E * (size_t)N * (3 * (size_t)C + HD + 2 * widest + m->spec.ffn_hidden_size) +
                         sizeof(float) * (size_t)N + parallel_scratch_bytes(m, B, T);
    void *base = be->alloc(bytes);
    lt_tensor *gin = NULL;
    if (!pre) {
        int64_t shape[3] = {No / B, B, C};
        gin = lt_backend_tensor(be, ops->dtype, 3, shape);
    }
    if (!base || (!pre && !gin)) {
        if (base) be->release(base, bytes);
        lt_tensor_free(gin);
        lt_gpt_ctx_free(c);
        return lt_fail(err, (size_t)errlen, "out of %s memory for the backward of a [%d, %d] microbatch (%.1f MiB)",
                       be->name, B, T, (double)bytes / (1 << 20));
    }
    lt_layer_scratch s = {0};
    char *p = base;
    float *dloss = (float *)p; p += sizeof(float) * (size_t)N; /* first: fp32 alignment holds */
    s.d_c = p; p += E * NC;
    s.d_c2 = p; p += E * NC;
    void *dx = p; p += E * NC; /* d(residual stream), from the chunk's output down to its input */
    s.d_att = p; p += E * (size_t)N * HD;
    s.d_qkv = p; p += E * (size_t)N * widest;
    s.d_fc1 = p; p += E * (size_t)N * widest;
    s.d_act = p; p += E * (size_t)N * m->spec.ffn_hidden_size;
    parallel_scratch(m, B, T, p, &s);
    int rc = 0;

    if (post) {
        /* Loss → logits, in place: the logits buffer becomes its own gradient. */
        float *host_dloss = c->host_scratch;
        for (int i = 0; i < N; i++) host_dloss[i] = c->host_targets[i] >= 0 ? grad_scale : 0.0f;
        be->to_device(dloss, host_dloss, sizeof(float) * (size_t)N);
        if (m->tp.size == 1) ops->cross_entropy_backward(c->logits, c->logits, c->ce_lse, c->targets, dloss, N, V);
        else rc = lt_vocab_cross_entropy_backward(&m->tp, &m->vocab, c->logits, c->logits, c->ce_lse, c->host_targets,
                                                  dloss, N, err, (size_t)errlen);
        const void *ln;
        void *dln;
        if (!rc) rc = lt_tp_enter(&m->tp, c->rows, &ln, c->lnf, s.tp_full, s.tp_landing, C, err, (size_t)errlen);
        if (!rc) {
            ops->linear_backward(s.d_c2, g + m->out_w, NULL, c->logits, ln, weight(m, m->out_w), N, C, Vl);
            rc = lt_tp_enter_backward(&m->tp, c->rows, &dln, s.d_c2, s.d_c, s.tp_landing, C, err, (size_t)errlen);
        }
        if (!rc) {
            be->memzero(dx, E * (size_t)No * C);
            lt_layer_norm_backward(&m->spec, ops, dx, g + m->lnf_w, PTR(g, m->lnf_b), dln, c->x[m->nl],
                                   norm_weight(m, m->lnf_w), c->lnf_mean, c->lnf_rstd, No);
            /* Untied output layer and final norm are done (a tied output weight that is the embedding
             * itself finishes last; a tied copy lies after the final norm). */
            grads_ready_from(m, m->lnf_w);
        }
    } else {
        transpose_rows(m, dx, lt_tensor_data(grad_output), c->to_bsh, No);
    }
    void **moe_ptrs = m->moe.num_experts ? malloc(sizeof(void *) * 8 * (size_t)m->moe.num_experts) : NULL;
    for (int i = m->nl - 1; i >= 0 && !rc; i--) {
        lt_attention_weights aw;
        lt_mlp_weights mw;
        lt_attention_grads ag;
        lt_mlp_grads mg;
        weights_of(m, i, &aw, &mw);
        grads_of(m, i, &ag, &mg);
        const lt_layer_ctx *lc = &c->layers[i];
        if (m->layers[i].moe) {
            lt_moe_weights w;
            lt_moe_grads g;
            moe_of(m, i, &w, &g, moe_ptrs);
            rc = lt_moe_mlp_backward(&m->spec, &m->moe, ops, &w, &g, lc, c->moe[i], lc->h, dx, &s, err, (size_t)errlen);
            if (!rc) m->moe_totals.dispatch_seconds += lt_moe_state_stats(c->moe[i]).backward_dispatch_seconds;
            if (!rc) rc = lt_layer_attention_backward(&m->spec, ops, &aw, &ag, lc, c->x[i], dx, &s, err, (size_t)errlen);
        } else {
            rc = lt_layer_backward(&m->spec, ops, &aw, &ag, &mw, &mg, lc, c->x[i], dx, &s, err, (size_t)errlen);
        }
        if (!rc) grads_ready_from(m, m->layers[i].ln1_w);
    }
    free(moe_ptrs);

    if (!rc && pre) {
        if (m->tp.size > 1) rc = embed_parallel_backward(m, c, dx, &s, err, errlen);
        else embed_backward(m, c, dx, &s);
        if (!rc) grads_ready_from(m, 0);
    } else if (!rc) {
        transpose_rows(m, lt_tensor_data(gin), dx, c->to_sbh, No);
    }

    be->release(base, bytes);
    lt_gpt_ctx_free(c);
    if (rc) lt_tensor_free(gin), gin = NULL;
    if (grad_input) *grad_input = gin;
    else lt_tensor_free(gin);
    return rc;
}

int lt_gpt_backward(lt_gpt *m, lt_gpt_ctx *c, float grad_scale, char *err, int errlen) {
    if (!m->stage.pre_process || !m->stage.post_process) {
        lt_gpt_ctx_free(c);
        return lt_fail(err, (size_t)errlen,
                       "lt_gpt_backward runs the whole model; chunk [%d, %d) needs lt_gpt_chunk_backward",
                       m->stage.layer_begin, m->stage.layer_end);
    }
    return lt_gpt_chunk_backward(m, c, NULL, grad_scale, NULL, err, errlen);
}

double lt_gpt_flops_per_token(const lt_gpt *m) {
    /* the parameters a token meets: each MoE layer's top-k experts of its local ones (the same size each) */
    double n = 0, experts = 0;
    for (int i = 0; i < m->num_params; i++)
        *(m->params[i].expert >= 0 ? &experts : &n) += (double)m->params[i].full_numel;
    if (experts > 0) n += experts * m->moe.topk / local_experts(m);
    const lt_gpt_config *c = &m->cfg;
    return 6.0 * n + 6.0 * c->num_layers * c->hidden_size * (double)c->seq_length;
}

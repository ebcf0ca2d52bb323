#include "engine/model/gpt.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"
#include "engine/core/rng.h"

/* Offsets (in floats) of one layer's parameters in the flat buffers; -1 when absent. qn, kn: the
 * per-head query and key norms (qk_layernorm). */
typedef struct {
    int64_t ln1_w, ln1_b, qkv_w, qkv_b, qn_w, qn_b, kn_w, kn_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
        fc2_b;
} layer_offsets;

/* Weights as the ops read them: fp32, or the bf16 compute copy under mixed precision. */
typedef struct {
    const void *ln1_w, *ln1_b, *qkv_w, *qkv_b, *qn_w, *qn_b, *kn_w, *kn_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc1_w,
        *fc1_b, *fc2_w, *fc2_b;
} layer_weights;

typedef struct {
    float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *qn_w, *qn_b, *kn_w, *kn_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc1_w,
        *fc1_b, *fc2_w, *fc2_b;
} layer_grads;

/* A norm weight under layernorm_zero_centered_gamma: its n values at flat offset off, and where
 * 1 + weight is kept for the ops (element offset in lt_gpt.gamma). */
typedef struct {
    int64_t off, n, eff;
} gamma_slot;

struct lt_gpt {
    lt_gpt_config cfg;
    const lt_backend *be;
    const lt_ops *ops; /* the backend's ops at the compute precision */
    size_t E;          /* bytes per activation element (4 fp32, 2 bf16) */
    int num_params, cap_params;
    lt_gpt_param *params;
    int64_t total;
    lt_tensor *weights, *grads; /* fp32: the main weights the optimizer updates, and their gradients */
    lt_tensor *compute;         /* bf16 copy of the weights under mixed precision (NULL in fp32) */
    int64_t wte, wpe, lnf_w, lnf_b, out_w; /* offsets; -1 when absent */
    layer_offsets *layers;
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
};

/* Saved activations of one layer for one microbatch (void: the compute dtype; float: always fp32). */
typedef struct {
    void *ln1, *qkv_pre, *qkv, *att, *res1, *ln2, *fc1, *act; /* qkv_pre: linear_qkv's output (qk_layernorm) */
    float *ln1_mean, *ln1_rstd, *qk_mean, *qk_rstd, *lse, *ln2_mean, *ln2_rstd;
} layer_acts;

struct lt_gpt_ctx {
    const lt_backend *be;
    int B, T;
    uint64_t dropout_seed;
    void *arena; /* backend memory */
    size_t arena_bytes;
    int32_t *host_targets; /* host copy: counts valid tokens and scales their loss gradients */
    float *host_scratch;   /* N floats on the host: the losses read back, then backward's dloss */
    int32_t *tokens, *targets;
    void **x; /* residual stream: x[0] embeddings, x[l+1] output of layer l */
    layer_acts *acts;
    void *lnf, *logits;
    float *lnf_mean, *lnf_rstd, *losses, *ce_lse;
    int64_t num_valid;
};

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The weights of every norm (input, pre-MLP, final, and the per-head q/k norms) end so. */
static int is_norm_weight(const char *name) { return ends_with(name, "layernorm.weight"); }

static int64_t add_param(lt_gpt *m, int ndim, int64_t d0, int64_t d1, int no_wd, const char *fmt, ...) {
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
    p->shape[0] = d0;
    p->shape[1] = ndim == 2 ? d1 : 1;
    p->numel = d0 * (ndim == 2 ? d1 : 1);
    p->offset = m->total;
    p->no_weight_decay = no_wd;
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
#undef REQUIRE
    return 1;
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

lt_gpt *lt_gpt_new(const lt_gpt_config *cfg, char *err, int errlen) {
    if (!check_config(cfg, err, errlen)) return NULL;
    lt_gpt *m = calloc(1, sizeof *m);
    m->cfg = *cfg;
    m->be = cfg->backend ? cfg->backend : lt_backend_cpu();
    m->ops = cfg->bf16 ? m->be->bf16 : m->be->f32;
    if (!m->ops) {
        lt_fail(err, (size_t)errlen, "the %s backend has no bf16 kernels", m->be->name);
        free(m);
        return NULL;
    }
    m->E = lt_dtype_size(m->ops->dtype);
    const int C = cfg->hidden_size, V = cfg->vocab_size, L = cfg->num_layers;
    const int D = cfg->kv_channels, HD = cfg->num_attention_heads * D;
    const int bias = cfg->add_bias_linear, rms = cfg->rmsnorm, qk = cfg->qk_layernorm;
    m->qkv_dim = (cfg->num_attention_heads + 2 * cfg->num_query_groups) * cfg->kv_channels;
    m->fc1_dim = cfg->gated_linear_unit ? 2 * cfg->ffn_hidden_size : cfg->ffn_hidden_size;

    m->wte = add_param(m, 2, V, C, 0, "embedding.word_embeddings.weight");
    m->wpe = cfg->rope ? -1 : add_param(m, 2, cfg->seq_length, C, 0, "embedding.position_embeddings.weight");
    m->layers = calloc((size_t)L, sizeof *m->layers);
    for (int l = 0; l < L; l++) {
        layer_offsets *o = &m->layers[l];
        const char *pre = "decoder.layers";
        o->ln1_w = add_param(m, 1, C, 0, 1, "%s.%d.input_layernorm.weight", pre, l);
        o->ln1_b = rms ? -1 : add_param(m, 1, C, 0, 1, "%s.%d.input_layernorm.bias", pre, l);
        o->qkv_w = add_param(m, 2, m->qkv_dim, C, 0, "%s.%d.self_attention.linear_qkv.weight", pre, l);
        o->qkv_b = bias || cfg->add_qkv_bias
                       ? add_param(m, 1, m->qkv_dim, 0, 1, "%s.%d.self_attention.linear_qkv.bias", pre, l)
                       : -1;
        o->qn_w = qk ? add_param(m, 1, D, 0, 1, "%s.%d.self_attention.q_layernorm.weight", pre, l) : -1;
        o->qn_b = qk && !rms ? add_param(m, 1, D, 0, 1, "%s.%d.self_attention.q_layernorm.bias", pre, l) : -1;
        o->kn_w = qk ? add_param(m, 1, D, 0, 1, "%s.%d.self_attention.k_layernorm.weight", pre, l) : -1;
        o->kn_b = qk && !rms ? add_param(m, 1, D, 0, 1, "%s.%d.self_attention.k_layernorm.bias", pre, l) : -1;
        o->proj_w = add_param(m, 2, C, HD, 0, "%s.%d.self_attention.linear_proj.weight", pre, l);
        o->proj_b = bias ? add_param(m, 1, C, 0, 1, "%s.%d.self_attention.linear_proj.bias", pre, l) : -1;
        o->ln2_w = add_param(m, 1, C, 0, 1, "%s.%d.pre_mlp_layernorm.weight", pre, l);
        o->ln2_b = rms ? -1 : add_param(m, 1, C, 0, 1, "%s.%d.pre_mlp_layernorm.bias", pre, l);
        o->fc1_w = add_param(m, 2, m->fc1_dim, C, 0, "%s.%d.mlp.linear_fc1.weight", pre, l);
        o->fc1_b = bias ? add_param(m, 1, m->fc1_dim, 0, 1, "%s.%d.mlp.linear_fc1.bias", pre, l) : -1;
        o->fc2_w = add_param(m, 2, C, cfg->ffn_hidden_size, 0, "%s.%d.mlp.linear_fc2.weight", pre, l);
        o->fc2_b = bias ? add_param(m, 1, C, 0, 1, "%s.%d.mlp.linear_fc2.bias", pre, l) : -1;
    }
    m->lnf_w = add_param(m, 1, C, 0, 1, "decoder.final_layernorm.weight");
    m->lnf_b = rms ? -1 : add_param(m, 1, C, 0, 1, "decoder.final_layernorm.bias");
    m->out_w = cfg->share_embeddings_and_output_weights ? -1 : add_param(m, 2, V, C, 0, "output_layer.weight");

    int multiple = cfg->flat_multiple > 0 ? cfg->flat_multiple : 16;
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
    free(m->layers);
    free(m->params);
    free(m);
}

const lt_gpt_config *lt_gpt_get_config(const lt_gpt *m) { return &m->cfg; }
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
        } else if (ends_with(p->name, ".bias")) {
            /* zero */
        } else {
            int scaled = ends_with(p->name, "linear_proj.weight") || ends_with(p->name, "linear_fc2.weight");
            be->fill_normal(dst, p->numel, lt_rng_key(m->cfg.seed, p->name), 0, 0.0f, scaled ? scaled_std : std);
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

void lt_gpt_zero_grad(lt_gpt *m) { m->be->memzero(lt_tensor_data(m->grads), sizeof(float) * (size_t)m->total); }

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

static layer_weights weights_of(const lt_gpt *m, int l) {
    const layer_offsets *o = &m->layers[l];
    return (layer_weights){norm_weight(m, o->ln1_w), weight(m, o->ln1_b),  weight(m, o->qkv_w),
                           weight(m, o->qkv_b),      norm_weight(m, o->qn_w), weight(m, o->qn_b),
                           norm_weight(m, o->kn_w),  weight(m, o->kn_b),  weight(m, o->proj_w),
                           weight(m, o->proj_b),     norm_weight(m, o->ln2_w), weight(m, o->ln2_b),
                           weight(m, o->fc1_w),      weight(m, o->fc1_b), weight(m, o->fc2_w),
                           weight(m, o->fc2_b)};
}

static layer_grads grads_of(lt_gpt *m, int l) {
    float *g = lt_tensor_data(m->grads);
    const layer_offsets *o = &m->layers[l];
    return (layer_grads){PTR(g, o->ln1_w),  PTR(g, o->ln1_b),  PTR(g, o->qkv_w), PTR(g, o->qkv_b),
                         PTR(g, o->qn_w),   PTR(g, o->qn_b),   PTR(g, o->kn_w),  PTR(g, o->kn_b),
                         PTR(g, o->proj_w), PTR(g, o->proj_b), PTR(g, o->ln2_w), PTR(g, o->ln2_b),
                         PTR(g, o->fc1_w),  PTR(g, o->fc1_b),  PTR(g, o->fc2_w), PTR(g, o->fc2_b)};
}

/* ---- normalisation dispatch: LayerNorm or RMSNorm with the same call shape ---- */

static void norm_forward(const lt_gpt *m, void *out, float *mean, float *rstd, const void *inp, const void *w,
                         const void *b, int N) {
    const int C = m->cfg.hidden_size;
    if (m->cfg.rmsnorm) m->ops->rmsnorm_forward(out, rstd, inp, w, N, C, m->cfg.layernorm_epsilon);
    else m->ops->layernorm_forward(out, mean, rstd, inp, w, b, N, C, m->cfg.layernorm_epsilon);
}

static void norm_backward(const lt_gpt *m, void *dinp, float *dw, float *db, const void *dout, const void *inp,
                          const void *w, const float *mean, const float *rstd, int N) {
    const int C = m->cfg.hidden_size;
    if (m->cfg.rmsnorm) m->ops->rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
    else m->ops->layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
}

/* Dropout stream keys: one per (microbatch seed, site). */
static uint64_t dropout_key(uint64_t seed, int layer, const char *site) {
    char name[96];
    snprintf(name, sizeof name, "dropout.%d.%s", layer, site);
    return lt_rng_key(seed, name);
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
    const size_t HD = (size_t)cfg->num_attention_heads * cfg->kv_channels;
    c->tokens = take(a, N * 4);
    c->targets = take(a, N * 4);
    for (int l = 0; l <= cfg->num_layers; l++) c->x[l] = take(a, N * C * E);
    for (int l = 0; l < cfg->num_layers; l++) {
        layer_acts *s = &c->acts[l];
        s->ln1 = take(a, N * C * E);
        s->ln1_mean = take(a, N * F);
        s->ln1_rstd = take(a, N * F);
        if (cfg->qk_layernorm) { /* qk_mean NULL: RMSNorm */
            const size_t rows = N * (size_t)(cfg->num_attention_heads + cfg->num_query_groups);
            s->qkv_pre = take(a, N * m->qkv_dim * E);
            s->qk_mean = cfg->rmsnorm ? NULL : take(a, rows * F);
            s->qk_rstd = take(a, rows * F);
        }
        s->qkv = take(a, N * m->qkv_dim * E);
        s->att = take(a, N * HD * E);
        s->lse = take(a, (size_t)c->B * cfg->num_attention_heads * c->T * F);
        s->res1 = take(a, N * C * E);
        s->ln2 = take(a, N * C * E);
        s->ln2_mean = take(a, N * F);
        s->ln2_rstd = take(a, N * F);
        s->fc1 = take(a, N * m->fc1_dim * E);
        s->act = take(a, N * cfg->ffn_hidden_size * E);
    }
    c->lnf = take(a, N * C * E);
    c->lnf_mean = take(a, N * F);
    c->lnf_rstd = take(a, N * F);
    c->logits = take(a, N * cfg->vocab_size * E);
    c->losses = take(a, N * F);
    c->ce_lse = take(a, N * F);
}

static lt_gpt_ctx *ctx_new(const lt_gpt *m, int B, int T) {
    lt_gpt_ctx *c = calloc(1, sizeof *c);
    c->be = m->be;
    c->B = B;
    c->T = T;
    c->x = calloc((size_t)m->cfg.num_layers + 1, sizeof *c->x);
    c->acts = calloc((size_t)m->cfg.num_layers, sizeof *c->acts);
    arena a = {NULL, 0};
    layout_ctx(m, c, &a);
    c->arena_bytes = a.used;
    c->arena = m->be->alloc(a.used);
    c->host_targets = malloc(sizeof(int32_t) * (size_t)B * T);
    c->host_scratch = malloc(sizeof(float) * (size_t)B * T);
    if (!c->arena || !c->host_targets || !c->host_scratch) {
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
    free(c->host_targets);
    free(c->host_scratch);
    free(c->x);
    free(c->acts);
    free(c);
}

const void *lt_gpt_ctx_logits(const lt_gpt_ctx *c) { return c->logits; }

/* ---- forward ---- */

static void layer_forward(const lt_gpt *m, int l, lt_gpt_ctx *c, const void *x, void *out) {
    const lt_gpt_config *cfg = &m->cfg;
    const lt_ops *ops = m->ops;
    const int B = c->B, T = c->T, N = B * T, C = cfg->hidden_size;
    const int H = cfg->num_attention_heads, G = cfg->num_query_groups, D = cfg->kv_channels;
    const layer_weights w = weights_of(m, l);
    layer_acts *s = &c->acts[l];

    norm_forward(m, s->ln1, s->ln1_mean, s->ln1_rstd, x, w.ln1_w, w.ln1_b, N);
    if (cfg->qk_layernorm) { /* per-head norms between linear_qkv and the rotary embedding */
        ops->linear_forward(s->qkv_pre, s->ln1, w.qkv_w, w.qkv_b, NULL, N, C, m->qkv_dim);
        ops->qk_norm_forward(s->qkv, s->qk_mean, s->qk_rstd, s->qkv_pre, w.qn_w, w.qn_b, w.kn_w, w.kn_b, N, H, G, D,
                             cfg->layernorm_epsilon);
    } else {
        ops->linear_forward(s->qkv, s->ln1, w.qkv_w, w.qkv_b, NULL, N, C, m->qkv_dim);
    }
    if (cfg->rope) ops->rope_forward(s->qkv, B, T, H, G, D, cfg->rotary_base);
    ops->attention_forward(s->att, s->lse, s->qkv, B, T, H, G, D, cfg->attention_dropout,
                           dropout_key(c->dropout_seed, l, "attention"));
    /* res1 = x + dropout(proj(att)): without dropout the GEMM adds the residual itself */
    const int drop = cfg->hidden_dropout > 0;
    ops->linear_forward(s->res1, s->att, w.proj_w, w.proj_b, drop ? NULL : x, N, H * D, C);
    if (drop) {
        ops->dropout_forward(s->res1, s->res1, (int64_t)N * C, cfg->hidden_dropout,
                             dropout_key(c->dropout_seed, l, "attention_out"), 0);
        ops->add_forward(s->res1, s->res1, x, (int64_t)N * C);
    }

    norm_forward(m, s->ln2, s->ln2_mean, s->ln2_rstd, s->res1, w.ln2_w, w.ln2_b, N);
    if (cfg->gelu_tanh) { /* fc1 and its GELU in one op (one GEMM where the device fuses them) */
        ops->linear_gelu_forward(s->act, s->fc1, s->ln2, w.fc1_w, w.fc1_b, N, C, m->fc1_dim);
    } else {
        ops->linear_forward(s->fc1, s->ln2, w.fc1_w, w.fc1_b, NULL, N, C, m->fc1_dim);
        if (cfg->gated_linear_unit) ops->swiglu_forward(s->act, s->fc1, N, cfg->ffn_hidden_size);
        else ops->gelu_forward(s->act, s->fc1, (int64_t)N * cfg->ffn_hidden_size);
    }
    ops->linear_forward(out, s->act, w.fc2_w, w.fc2_b, drop ? NULL : s->res1, N, cfg->ffn_hidden_size, C);
    if (drop) {
        ops->dropout_forward(out, out, (int64_t)N * C, cfg->hidden_dropout, dropout_key(c->dropout_seed, l, "mlp_out"),
                             0);
        ops->add_forward(out, out, s->res1, (int64_t)N * C);
    }
}

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

lt_gpt_ctx *lt_gpt_forward(lt_gpt *m, const int32_t *tokens, const int32_t *targets, int B, int T,
                           uint64_t dropout_seed, float *loss, int64_t *num_valid, char *err, int errlen) {
    const lt_gpt_config *cfg = &m->cfg;
    const int N = B * T, C = cfg->hidden_size, V = cfg->vocab_size, L = cfg->num_layers;
    if (B <= 0 || T <= 0 || T > cfg->seq_length) {
        lt_fail(err, (size_t)errlen, "batch shape [%d, %d] is invalid: need B > 0 and 0 < T <= seq_length (%d)", B, T,
                cfg->seq_length);
        return NULL;
    }
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) {
            lt_fail(err, (size_t)errlen, "token id %d at position %d is outside the vocabulary [0, %d)", tokens[i], i, V);
            return NULL;
        }
        if (targets && targets[i] >= V) {
            lt_fail(err, (size_t)errlen, "target id %d at position %d is outside the vocabulary [0, %d)", targets[i], i, V);
            return NULL;
        }
    }
    lt_gpt_ctx *c = ctx_new(m, B, T);
    if (!c) {
        lt_fail(err, (size_t)errlen, "out of %s memory for the activations of a [%d, %d] microbatch", m->be->name, B, T);
        return NULL;
    }
    const lt_backend *be = m->be;
    const lt_ops *ops = m->ops;
    c->dropout_seed = dropout_seed;
    if (targets) memcpy(c->host_targets, targets, sizeof(int32_t) * (size_t)N);
    else for (int i = 0; i < N; i++) c->host_targets[i] = -1;
    be->to_device(c->tokens, tokens, sizeof(int32_t) * (size_t)N);
    be->to_device(c->targets, c->host_targets, sizeof(int32_t) * (size_t)N);

    int64_t ready = 0;
    weights_needed_to(m, &ready, m->layers[0].ln1_w);
    ops->embedding_forward(c->x[0], c->tokens, weight(m, m->wte), N, C);
    if (m->wpe >= 0) ops->position_embedding_forward(c->x[0], weight(m, m->wpe), B, T, C);
    if (cfg->hidden_dropout > 0)
        ops->dropout_forward(c->x[0], c->x[0], (int64_t)N * C, cfg->hidden_dropout,
                             dropout_key(dropout_seed, -1, "embedding"), 0);
    for (int l = 0; l < L; l++) {
        weights_needed_to(m, &ready, l + 1 < L ? m->layers[l + 1].ln1_w : m->lnf_w);
        layer_forward(m, l, c, c->x[l], c->x[l + 1]);
    }
    weights_needed_to(m, &ready, m->total);

    norm_forward(m, c->lnf, c->lnf_mean, c->lnf_rstd, c->x[L], norm_weight(m, m->lnf_w), weight(m, m->lnf_b), N);
    ops->linear_forward(c->logits, c->lnf, weight(m, m->out_w >= 0 ? m->out_w : m->wte), NULL, NULL, N, C, V);

    c->num_valid = 0;
    double sum = 0;
    if (targets) {
        ops->cross_entropy_forward(c->losses, c->ce_lse, c->logits, c->targets, N, V);
        float *losses = c->host_scratch;
        be->to_host(losses, c->losses, sizeof(float) * (size_t)N);
        for (int i = 0; i < N; i++)
            if (c->host_targets[i] >= 0) {
                sum += losses[i];
                c->num_valid++;
            }
    }
    if (loss) *loss = c->num_valid ? (float)(sum / (double)c->num_valid) : 0.0f;
    if (num_valid) *num_valid = c->num_valid;
    return c;
}

/* ---- backward ---- */

typedef struct {
    void *d_c, *d_c2, *d_qkv, *d_att, *d_fc1, *d_act; /* scratch gradients, compute dtype */
    float *dloss;                                     /* [N] */
    size_t bytes;
    void *base;
} scratch;

static void layer_backward(lt_gpt *m, int l, lt_gpt_ctx *c, const void *x, void *dx, scratch *s) {
    const lt_gpt_config *cfg = &m->cfg;
    const lt_ops *ops = m->ops;
    const int B = c->B, T = c->T, N = B * T, C = cfg->hidden_size, F = cfg->ffn_hidden_size;
    const int H = cfg->num_attention_heads, G = cfg->num_query_groups, D = cfg->kv_channels;
    const size_t NC = (size_t)N * C;
    const layer_weights w = weights_of(m, l);
    const layer_grads g = grads_of(m, l);
    const layer_acts *a = &c->acts[l];

    /* out = res1 + dropout(fc2(act)): dx flows to res1 unchanged; d(fc2 out) is dx through the mask. */
    const void *d_fc2 = dx;
    if (cfg->hidden_dropout > 0) {
        ops->dropout_backward(s->d_c, dx, (int64_t)NC, cfg->hidden_dropout,
                              dropout_key(c->dropout_seed, l, "mlp_out"), 0);
        d_fc2 = s->d_c;
    }
    if (cfg->gelu_tanh) { /* fc2's backward and the GELU's before it in one op */
        ops->linear_dgelu_backward(s->d_fc1, g.fc2_w, g.fc2_b, d_fc2, a->act, w.fc2_w, a->fc1, N, F, C);
    } else {
        ops->linear_backward(s->d_act, g.fc2_w, g.fc2_b, d_fc2, a->act, w.fc2_w, N, F, C);
        if (cfg->gated_linear_unit) ops->swiglu_backward(s->d_fc1, s->d_act, a->fc1, N, F);
        else ops->gelu_backward(s->d_fc1, s->d_act, a->fc1, (int64_t)N * F);
    }
    ops->linear_backward(s->d_c2, g.fc1_w, g.fc1_b, s->d_fc1, a->ln2, w.fc1_w, N, C, m->fc1_dim);
    norm_backward(m, dx, g.ln2_w, g.ln2_b, s->d_c2, a->res1, w.ln2_w, a->ln2_mean, a->ln2_rstd, N);

    /* res1 = x + dropout(proj(att)). */
    const void *d_proj = dx;
    if (cfg->hidden_dropout > 0) {
        ops->dropout_backward(s->d_c, dx, (int64_t)NC, cfg->hidden_dropout,
                              dropout_key(c->dropout_seed, l, "attention_out"), 0);
        d_proj = s->d_c;
    }
    ops->linear_backward(s->d_att, g.proj_w, g.proj_b, d_proj, a->att, w.proj_w, N, H * D, C);
    ops->attention_backward(s->d_qkv, s->d_att, a->qkv, a->att, a->lse, B, T, H, G, D, cfg->attention_dropout,
                            dropout_key(c->dropout_seed, l, "attention"));
    if (cfg->rope) ops->rope_backward(s->d_qkv, B, T, H, G, D, cfg->rotary_base);
    const void *d_qkv = s->d_qkv;
    if (cfg->qk_layernorm) { /* into d_fc1, free since the MLP's backward */
        ops->qk_norm_backward(s->d_fc1, g.qn_w, g.qn_b, g.kn_w, g.kn_b, s->d_qkv, a->qkv_pre, w.qn_w, w.kn_w,
                              a->qk_mean, a->qk_rstd, N, H, G, D);
        d_qkv = s->d_fc1;
    }
    ops->linear_backward(s->d_c2, g.qkv_w, g.qkv_b, d_qkv, a->ln1, w.qkv_w, N, C, m->qkv_dim);
    norm_backward(m, dx, g.ln1_w, g.ln1_b, s->d_c2, x, w.ln1_w, a->ln1_mean, a->ln1_rstd, N);
}

int lt_gpt_backward(lt_gpt *m, lt_gpt_ctx *c, float grad_scale, char *err, int errlen) {
    const lt_gpt_config *cfg = &m->cfg;
    const int B = c->B, T = c->T, N = B * T, C = cfg->hidden_size, V = cfg->vocab_size, L = cfg->num_layers;
    const size_t NC = (size_t)N * C, E = m->E;
    const lt_backend *be = m->be;
    const lt_ops *ops = m->ops;
    float *g = lt_tensor_data(m->grads);

    scratch s;
    size_t widest = (size_t)m->qkv_dim;
    if ((size_t)m->fc1_dim > widest) widest = (size_t)m->fc1_dim;
    const size_t HD = (size_t)cfg->num_attention_heads * cfg->kv_channels;
    s.bytes = E * (size_t)N * (3 * (size_t)C + HD + 2 * widest + cfg->ffn_hidden_size) + sizeof(float) * (size_t)N;
    s.base = be->alloc(s.bytes);
    if (!s.base) {
        lt_gpt_ctx_free(c);
        return lt_fail(err, (size_t)errlen, "out of %s memory for the backward of a [%d, %d] microbatch (%.1f MiB)",
                       be->name, B, T, (double)s.bytes / (1 << 20));
    }
    char *p = s.base;
    s.dloss = (float *)p; p += sizeof(float) * (size_t)N; /* first: fp32 alignment holds */
    s.d_c = p; p += E * NC;
    s.d_c2 = p; p += E * NC;
    void *dx = p; p += E * NC;
    s.d_att = p; p += E * (size_t)N * HD;
    s.d_qkv = p; p += E * (size_t)N * widest;
    s.d_fc1 = p; p += E * (size_t)N * widest;
    s.d_act = p;

    /* Loss → logits, in place: the logits buffer becomes its own gradient. */
    float *host_dloss = c->host_scratch;
    for (int i = 0; i < N; i++) host_dloss[i] = c->host_targets[i] >= 0 ? grad_scale : 0.0f;
    be->to_device(s.dloss, host_dloss, sizeof(float) * (size_t)N);
    ops->cross_entropy_backward(c->logits, c->logits, c->ce_lse, c->targets, s.dloss, N, V);
    const int64_t out_off = m->out_w >= 0 ? m->out_w : m->wte;
    ops->linear_backward(s.d_c2, g + out_off, NULL, c->logits, c->lnf, weight(m, out_off), N, C, V);
    be->memzero(dx, E * NC);
    norm_backward(m, dx, g + m->lnf_w, PTR(g, m->lnf_b), s.d_c2, c->x[L], norm_weight(m, m->lnf_w), c->lnf_mean,
                  c->lnf_rstd, N);

    /* Untied output layer and final norm are done (the tied output weight is the embedding,
     * which finishes last). */
    grads_ready_from(m, m->lnf_w);
    for (int l = L - 1; l >= 0; l--) {
        layer_backward(m, l, c, c->x[l], dx, &s);
        grads_ready_from(m, m->layers[l].ln1_w);
    }

    const void *d_emb = dx;
    if (cfg->hidden_dropout > 0) {
        ops->dropout_backward(s.d_c, dx, (int64_t)NC, cfg->hidden_dropout,
                              dropout_key(c->dropout_seed, -1, "embedding"), 0);
        d_emb = s.d_c;
    }
    ops->embedding_backward(g + m->wte, d_emb, c->tokens, N, C);
    if (m->wpe >= 0) ops->position_embedding_backward(g + m->wpe, d_emb, B, T, C);
    grads_ready_from(m, 0);

    be->release(s.base, s.bytes);
    lt_gpt_ctx_free(c);
    return 0;
}

double lt_gpt_flops_per_token(const lt_gpt *m) {
    double n = 0;
    for (int i = 0; i < m->num_params; i++) n += (double)m->params[i].numel;
    const lt_gpt_config *c = &m->cfg;
    return 6.0 * n + 6.0 * c->num_layers * c->hidden_size * (double)c->seq_length;
}

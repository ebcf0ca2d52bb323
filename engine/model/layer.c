#include "engine/model/layer.h"

#include <stdio.h>

#include "engine/core/rng.h"

int lt_layer_qkv_dim(const lt_layer_spec *s) {
    return (s->num_attention_heads + 2 * s->num_query_groups) * s->kv_channels;
}

int lt_layer_fc1_dim(const lt_layer_spec *s) {
    return s->gated_linear_unit ? 2 * s->ffn_hidden_size : s->ffn_hidden_size;
}

uint64_t lt_dropout_key(uint64_t seed, int layer, const char *site) {
    char name[96];
    snprintf(name, sizeof name, "dropout.%d.%s", layer, site);
    return lt_rng_key(seed, name);
}

/* Eval mode (c->training 0) drops nothing: the same ops as a model configured without dropout, so
 * its output is bit-identical to that model's. */
static float hidden_p(const lt_layer_spec *s, const lt_layer_ctx *c) { return c->training ? s->hidden_dropout : 0.0f; }
static float attention_p(const lt_layer_spec *s, const lt_layer_ctx *c) {
    return c->training ? s->attention_dropout : 0.0f;
}

void lt_layer_norm_forward(const lt_layer_spec *s, const lt_ops *ops, void *out, float *mean, float *rstd,
                           const void *inp, const void *w, const void *b, int N) {
    if (s->rmsnorm) ops->rmsnorm_forward(out, rstd, inp, w, N, s->hidden_size, s->layernorm_epsilon);
    else ops->layernorm_forward(out, mean, rstd, inp, w, b, N, s->hidden_size, s->layernorm_epsilon);
}

void lt_layer_norm_backward(const lt_layer_spec *s, const lt_ops *ops, void *dinp, float *dw, float *db,
                            const void *dout, const void *inp, const void *w, const float *mean, const float *rstd,
                            int N) {
    if (s->rmsnorm) ops->rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, s->hidden_size);
    else ops->layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, s->hidden_size);
}

static void *take(char *base, size_t *used, size_t nbytes) {
    void *p = base ? base + *used : NULL;
    *used += (nbytes + 63) & ~(size_t)63;
    return p;
}

void lt_layer_ctx_layout(const lt_layer_spec *s, size_t E, lt_layer_ctx *c, char *base, size_t *used) {
    const size_t N = (size_t)c->B * c->T, C = s->hidden_size, F = sizeof(float);
    const size_t HD = (size_t)s->num_attention_heads * s->kv_channels, qkv = (size_t)lt_layer_qkv_dim(s);
    lt_attention_acts *a = &c->attn;
    a->ln = take(base, used, N * C * E);
    a->ln_mean = take(base, used, N * F);
    a->ln_rstd = take(base, used, N * F);
    a->qkv_pre = a->qk_mean = a->qk_rstd = NULL;
    if (s->qk_layernorm) { /* qk_mean NULL: RMSNorm */
        const size_t rows = N * (size_t)(s->num_attention_heads + s->num_query_groups);
        a->qkv_pre = take(base, used, N * qkv * E);
        a->qk_mean = s->rmsnorm ? NULL : take(base, used, rows * F);
        a->qk_rstd = take(base, used, rows * F);
    }
    a->qkv = take(base, used, N * qkv * E);
    a->att = take(base, used, N * HD * E);
    a->lse = take(base, used, (size_t)c->B * s->num_attention_heads * c->T * F);
    c->h = take(base, used, N * C * E);
    lt_mlp_acts *m = &c->mlp;
    m->ln = take(base, used, N * C * E);
    m->ln_mean = take(base, used, N * F);
    m->ln_rstd = take(base, used, N * F);
    m->fc1 = take(base, used, N * (size_t)lt_layer_fc1_dim(s) * E);
    m->act = take(base, used, N * (size_t)s->ffn_hidden_size * E);
}

/* ---- attention block ---- */

void lt_layer_attention_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                                lt_layer_ctx *c, const void *x, void *out) {
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, qkv = lt_layer_qkv_dim(s);
    const int H = s->num_attention_heads, G = s->num_query_groups, D = s->kv_channels;
    lt_attention_acts *a = &c->attn;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, x, w->ln_w, w->ln_b, N);
    if (s->qk_layernorm) { /* per-head norms between linear_qkv and the rotary embedding */
        ops->linear_forward(a->qkv_pre, a->ln, w->qkv_w, w->qkv_b, NULL, N, C, qkv);
        ops->qk_norm_forward(a->qkv, a->qk_mean, a->qk_rstd, a->qkv_pre, w->qn_w, w->qn_b, w->kn_w, w->kn_b, N, H, G, D,
                             s->layernorm_epsilon);
    } else {
        ops->linear_forward(a->qkv, a->ln, w->qkv_w, w->qkv_b, NULL, N, C, qkv);
    }
    if (s->rope) ops->rope_forward(a->qkv, B, T, H, G, D, s->rotary_base);
    /* all of the model's heads on this rank: masks numbered from head 0 of num_attention_heads */
    ops->attention_forward(a->att, a->lse, a->qkv, B, T, H, G, D, attention_p(s, c),
                           lt_dropout_key(c->dropout_seed, c->layer, "attention"), 0, s->num_attention_heads);
    /* out = x + dropout(proj(att)): without dropout the GEMM adds the residual itself */
    const float p = hidden_p(s, c);
    const int drop = p > 0;
    ops->linear_forward(out, a->att, w->proj_w, w->proj_b, drop ? NULL : x, N, H * D, C);
    if (drop) {
        ops->dropout_forward(out, out, (int64_t)N * C, p,
                             lt_dropout_key(c->dropout_seed, c->layer, "attention_out"), 0);
        ops->add_forward(out, out, x, (int64_t)N * C);
    }
}

void lt_layer_attention_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                                 const lt_attention_grads *g, const lt_layer_ctx *c, const void *x, void *dx,
                                 const lt_layer_scratch *sc) {
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, qkv = lt_layer_qkv_dim(s);
    const int H = s->num_attention_heads, G = s->num_query_groups, D = s->kv_channels;
    const lt_attention_acts *a = &c->attn;
    /* out = x + dropout(proj(att)): dx flows to x unchanged; d(proj out) is dx through the mask. */
    const void *d_proj = dx;
    const float p = hidden_p(s, c);
    if (p > 0) {
        ops->dropout_backward(sc->d_c, dx, (int64_t)N * C, p,
                              lt_dropout_key(c->dropout_seed, c->layer, "attention_out"), 0);
        d_proj = sc->d_c;
    }
    ops->linear_backward(sc->d_att, g->proj_w, g->proj_b, d_proj, a->att, w->proj_w, N, H * D, C);
    ops->attention_backward(sc->d_qkv, sc->d_att, a->qkv, a->att, a->lse, B, T, H, G, D, attention_p(s, c),
                            lt_dropout_key(c->dropout_seed, c->layer, "attention"), 0, s->num_attention_heads);
    if (s->rope) ops->rope_backward(sc->d_qkv, B, T, H, G, D, s->rotary_base);
    const void *d_qkv = sc->d_qkv;
    if (s->qk_layernorm) { /* into d_fc1, free since the MLP's backward */
        ops->qk_norm_backward(sc->d_fc1, g->qn_w, g->qn_b, g->kn_w, g->kn_b, sc->d_qkv, a->qkv_pre, w->qn_w, w->kn_w,
                              a->qk_mean, a->qk_rstd, N, H, G, D);
        d_qkv = sc->d_fc1;
    }
    ops->linear_backward(sc->d_c2, g->qkv_w, g->qkv_b, d_qkv, a->ln, w->qkv_w, N, C, qkv);
    /* the norm's backward adds d(x) through the norm onto the residual's dx */
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, sc->d_c2, x, w->ln_w, a->ln_mean, a->ln_rstd, N);
}

/* ---- MLP block ---- */

void lt_layer_mlp_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, lt_layer_ctx *c,
                          const void *h, void *out) {
    const int N = c->B * c->T, C = s->hidden_size, F = s->ffn_hidden_size, fc1 = lt_layer_fc1_dim(s);
    lt_mlp_acts *a = &c->mlp;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, h, w->ln_w, w->ln_b, N);
    if (s->gelu_tanh) { /* fc1 and its GELU in one op (one GEMM where the device fuses them) */
        ops->linear_gelu_forward(a->act, a->fc1, a->ln, w->fc1_w, w->fc1_b, N, C, fc1);
    } else {
        ops->linear_forward(a->fc1, a->ln, w->fc1_w, w->fc1_b, NULL, N, C, fc1);
        if (s->gated_linear_unit) ops->swiglu_forward(a->act, a->fc1, N, F);
        else ops->gelu_forward(a->act, a->fc1, (int64_t)N * F);
    }
    const float p = hidden_p(s, c);
    const int drop = p > 0;
    ops->linear_forward(out, a->act, w->fc2_w, w->fc2_b, drop ? NULL : h, N, F, C);
    if (drop) {
        ops->dropout_forward(out, out, (int64_t)N * C, p,
                             lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"), 0);
        ops->add_forward(out, out, h, (int64_t)N * C);
    }
}

void lt_layer_mlp_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, const lt_mlp_grads *g,
                           const lt_layer_ctx *c, const void *h, void *dx, const lt_layer_scratch *sc) {
    const int N = c->B * c->T, C = s->hidden_size, F = s->ffn_hidden_size, fc1 = lt_layer_fc1_dim(s);
    const lt_mlp_acts *a = &c->mlp;
    const void *d_fc2 = dx;
    const float p = hidden_p(s, c);
    if (p > 0) {
        ops->dropout_backward(sc->d_c, dx, (int64_t)N * C, p,
                              lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"), 0);
        d_fc2 = sc->d_c;
    }
    if (s->gelu_tanh) { /* fc2's backward and the GELU's before it in one op */
        ops->linear_dgelu_backward(sc->d_fc1, g->fc2_w, g->fc2_b, d_fc2, a->act, w->fc2_w, a->fc1, N, F, C);
    } else {
        ops->linear_backward(sc->d_act, g->fc2_w, g->fc2_b, d_fc2, a->act, w->fc2_w, N, F, C);
        if (s->gated_linear_unit) ops->swiglu_backward(sc->d_fc1, sc->d_act, a->fc1, N, F);
        else ops->gelu_backward(sc->d_fc1, sc->d_act, a->fc1, (int64_t)N * F);
    }
    ops->linear_backward(sc->d_c2, g->fc1_w, g->fc1_b, sc->d_fc1, a->ln, w->fc1_w, N, C, fc1);
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, sc->d_c2, h, w->ln_w, a->ln_mean, a->ln_rstd, N);
}

/* ---- the layer ---- */

void lt_layer_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                      const lt_mlp_weights *mw, lt_layer_ctx *c, const void *x, void *out) {
    lt_layer_attention_forward(s, ops, aw, c, x, c->h);
    lt_layer_mlp_forward(s, ops, mw, c, c->h, out);
}

void lt_layer_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                       const lt_attention_grads *ag, const lt_mlp_weights *mw, const lt_mlp_grads *mg,
                       const lt_layer_ctx *c, const void *x, void *dx, const lt_layer_scratch *sc) {
    lt_layer_mlp_backward(s, ops, mw, mg, c, c->h, dx, sc);
    lt_layer_attention_backward(s, ops, aw, ag, c, x, dx, sc);
}

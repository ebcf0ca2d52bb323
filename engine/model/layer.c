#include "engine/model/layer.h"

#include <stdio.h>
#include <stdlib.h>

#include "engine/core/rng.h"

int lt_layer_qkv_dim(const lt_layer_spec *s) {
    return (s->num_attention_heads + 2 * s->num_query_groups) * s->kv_channels;
}

int lt_layer_qkv_gemm_dim(const lt_layer_spec *s) {
    if (s->kv_replicas == 1) return lt_layer_qkv_dim(s);
    return (s->heads_total + 2 * s->groups_total) * s->kv_channels / s->tp->size;
}

size_t lt_layer_kv_scratch(const lt_layer_spec *s, int N) {
    if (s->kv_replicas == 1) return 0;
    return ((size_t)N * (s->heads_total + 2 * s->groups_total) + 1) * s->kv_channels;
}

/* Rank r holds query heads [j H, (j+1) H) of group g = r / kv_replicas, j = r % kv_replicas: in the
 * whole QKV's D-wide rows of a token, the group begins at g (H_total / G_total + 2). */
lt_layer_kv_maps *lt_layer_kv_maps_new(const lt_layer_spec *s, int N, char *err, size_t errlen) {
    const int H = s->num_attention_heads, per_group = s->heads_total / s->groups_total;
    const int whole = s->heads_total + 2 * s->groups_total, mine = H + 2, rank = s->tp->rank;
    const int first = rank / s->kv_replicas * (per_group + 2), j = rank % s->kv_replicas;
    const size_t count = (size_t)N * (mine + whole);
    lt_layer_kv_maps *k = calloc(1, sizeof *k);
    int32_t *h = malloc(sizeof(int32_t) * count), *dev = s->tp->be->alloc(sizeof(int32_t) * count);
    if (!k || !h || !dev) {
        free(k);
        free(h);
        if (dev) s->tp->be->release(dev, sizeof(int32_t) * count);
        snprintf(err, errlen, "out of %s memory for the key/value heads' row maps", s->tp->be->name);
        return NULL;
    }
    int32_t *select = h, *expand = h + (size_t)N * mine;
    for (int n = 0; n < N; n++) {
        for (int c = 0; c < whole; c++) expand[(size_t)n * whole + c] = N * mine; /* the zero row */
        for (int i = 0; i < mine; i++) {
            const int c = first + (i < H ? j * H + i : per_group + i - H); /* a query head, or key, value */
            select[(size_t)n * mine + i] = n * whole + c;
            expand[(size_t)n * whole + c] = n * mine + i;
        }
    }
    s->tp->be->to_device(dev, h, sizeof(int32_t) * count);
    free(h);
    *k = (lt_layer_kv_maps){dev, dev + (size_t)N * mine, sizeof(int32_t) * count};
    return k;
}

void lt_layer_kv_maps_free(const lt_layer_spec *s, lt_layer_kv_maps *k) {
    if (!k) return;
    s->tp->be->release(k->select, k->bytes);
    free(k);
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

int lt_layer_outer_rows(const lt_layer_spec *s, int B, int T) { return lt_tp_outer_rows(s->tp, B * T); }

/* Norm outputs, their statistics and the block outputs hold the outer rows; the rest all N. */
void lt_layer_ctx_layout(const lt_layer_spec *s, size_t E, lt_layer_ctx *c, char *base, size_t *used) {
    const size_t N = (size_t)c->B * c->T, No = (size_t)lt_layer_outer_rows(s, c->B, c->T);
    const size_t C = s->hidden_size, F = sizeof(float);
    const size_t HD = (size_t)s->num_attention_heads * s->kv_channels, qkv = (size_t)lt_layer_qkv_dim(s);
    lt_attention_acts *a = &c->attn;
    a->ln = take(base, used, No * C * E);
    a->ln_mean = take(base, used, No * F);
    a->ln_rstd = take(base, used, No * F);
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
    c->h = take(base, used, No * C * E);
    lt_mlp_acts *m = &c->mlp;
    m->ln = take(base, used, No * C * E);
    m->ln_mean = take(base, used, No * F);
    m->ln_rstd = take(base, used, No * F);
    m->fc1 = m->act = NULL;
    if (c->moe) return;
    m->fc1 = take(base, used, N * (size_t)lt_layer_fc1_dim(s) * E);
    m->act = take(base, used, N * (size_t)s->ffn_hidden_size * E);
}

/* ---- the two ends of a block ----
 * A block opens with a norm and a column-parallel GEMM (linear_qkv, linear_fc1) and closes with a
 * row-parallel GEMM (linear_proj, linear_fc2), its bias, dropout and the residual add. */

/* The open GEMM's input: the norm's output, gathered along the sequence under SP (into sc->tp_full). */
static int open_input(const lt_layer_spec *s, const lt_layer_ctx *c, const lt_layer_scratch *sc, const void **inp,
                      const void *ln, char *err, size_t errlen) {
    return lt_tp_enter(s->tp, c->rows, inp, ln, sc->tp_full, sc->tp_landing, s->hidden_size, err, errlen);
}

/* After the open GEMM's backward wrote its partial input gradient to sc->d_c2: summed over TP (or
 * reduce-scattered into sc->d_c); *dln is where the norm's output gradient is then. */
static int open_backward(const lt_layer_spec *s, const lt_layer_ctx *c, const lt_layer_scratch *sc, void **dln,
                         char *err, size_t errlen) {
    return lt_tp_enter_backward(s->tp, c->rows, dln, sc->d_c2, sc->d_c, sc->tp_landing, s->hidden_size, err,
                                errlen);
}

/* out = x + dropout(inp W^T + b). A single rank adds the residual in the GEMM when nothing comes
 * between; under TP the bias and residual come after the reduction, on the outer rows, and under CP
 * dropout takes the rows' global positions (c->rows). */
static int close_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_layer_ctx *c,
                         const lt_layer_scratch *sc, void *out, const void *x, const void *inp, const void *W,
                         const void *b, int IN, const char *site, char *err, size_t errlen) {
    const lt_tp *tp = s->tp;
    const int B = c->B, T = c->T, N = B * T, No = lt_layer_outer_rows(s, B, T), C = s->hidden_size;
    const float p = hidden_p(s, c);
    const uint64_t key = lt_dropout_key(c->dropout_seed, c->layer, site);
    if (tp->size == 1 && !c->rows) {
        ops->linear_forward(out, inp, W, b, p > 0 ? NULL : x, N, IN, C);
        if (p > 0) {
            ops->dropout_forward(out, out, (int64_t)N * C, p, key, 0);
            ops->add_forward(out, out, x, (int64_t)N * C);
        }
        return 0;
    }
    void *partial = tp->sequence_parallel ? sc->tp_full : out, *reduced;
    ops->linear_forward(partial, inp, W, NULL, NULL, N, IN, C);
    if (lt_tp_exit(tp, c->rows, &reduced, partial, out, sc->tp_landing, C, err, errlen)) return -1;
    if (b) lt_tp_bias_forward(tp, out, b, No, C);
    if (p > 0) lt_tp_dropout_forward(tp, c->rows, out, out, B, T, C, p, key);
    ops->add_forward(out, out, x, (int64_t)No * C);
    return 0;
}

/* From d(out) in dx to the close GEMM's output gradient over all N rows (*dout), and the bias
 * gradient that GEMM's backward should accumulate (*db; NULL under SP, where it is taken here from
 * this rank's rows and summed over TP when the step finishes). */
static int close_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_layer_ctx *c,
                          const lt_layer_scratch *sc, const void *dx, float *gb, const char *site, const void **dout,
                          float **db, char *err, size_t errlen) {
    const lt_tp *tp = s->tp;
    const int B = c->B, T = c->T, No = lt_layer_outer_rows(s, B, T), C = s->hidden_size;
    const float p = hidden_p(s, c);
    const void *d = dx;
    if (p > 0) {
        lt_tp_dropout_backward(tp, c->rows, sc->d_c, dx, B, T, C, p, lt_dropout_key(c->dropout_seed, c->layer, site));
        d = sc->d_c;
    }
    *db = gb;
    if (tp->size > 1 && tp->sequence_parallel && gb) {
        lt_tp_bias_backward(tp, gb, d, No, C);
        *db = NULL;
    }
    return lt_tp_exit_backward(tp, c->rows, dout, d, sc->tp_full, sc->tp_landing, C, err, errlen);
}

/* ---- attention block ---- */

int lt_layer_attention_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                               lt_layer_ctx *c, const void *x, void *out, const lt_layer_scratch *sc, char *err,
                               size_t errlen) {
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, qkv = lt_layer_qkv_dim(s);
    const int H = s->num_attention_heads, G = s->num_query_groups, D = s->kv_channels;
    lt_attention_acts *a = &c->attn;
    const void *ln;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, x, w->ln_w, w->ln_b, lt_layer_outer_rows(s, B, T));
    if (open_input(s, c, sc, &ln, a->ln, err, errlen)) return -1;
    void *q = s->qk_layernorm ? a->qkv_pre : a->qkv; /* linear_qkv's output, this rank's heads */
    if (s->kv_replicas == 1) {
        ops->linear_forward(q, ln, w->qkv_w, w->qkv_b, NULL, N, C, qkv);
    } else { /* Megatron's: the whole QKV gathered, this rank's query heads and its group's key, value taken */
        const int gemm = lt_layer_qkv_gemm_dim(s);
        ops->linear_forward(sc->kv_b, ln, w->qkv_w, w->qkv_b, NULL, N, C, gemm);
        if (lt_tp_gather_last(s->tp, c->rows, sc->kv_b, sc->kv_b, sc->kv_a, gemm, err, errlen)) return -1;
        ops->embedding_forward(q, c->kv->select, sc->kv_b, N * (H + 2), D);
    }
    if (s->qk_layernorm) /* per-head norms between linear_qkv and the rotary embedding */
        ops->qk_norm_forward(a->qkv, a->qk_mean, a->qk_rstd, a->qkv_pre, w->qn_w, w->qn_b, w->kn_w, w->kn_b, N, H, G, D,
                             s->layernorm_epsilon);
    if (s->rope) ops->rope_forward(a->qkv, B, T, H, G, D, s->rotary_base, c->pos);
    const uint64_t key = lt_dropout_key(c->dropout_seed, c->layer, "attention");
    if (c->cp) { /* this rank's queries against every rank's keys and values, round the cp ring */
        if (lt_cp_attention_forward(s->cp, c->cp, a->att, a->lse, a->qkv, attention_p(s, c), key, s->head_offset,
                                    s->heads_total, sc->ring, err, errlen))
            return -1;
    } else if (c->cache) { /* decoding: these keys and values join the cache; the queries see all of it */
        lt_layer_kv_cache *k = c->cache;
        ops->embedding_forward((char *)k->kv + lt_dtype_size(ops->dtype) * (size_t)k->len * 2 * G * D, k->kv_rows,
                               a->qkv, T * 2 * G, D);
        ops->attention_kv_forward(a->att, a->lse, a->qkv, k->kv, 1, T, k->len + T, H, G, D, k->pos + k->len, k->pos,
                                  k->max_len, 0.0f, key, s->head_offset, s->heads_total);
    } else {
        ops->attention_forward(a->att, a->lse, a->qkv, B, T, H, G, D, attention_p(s, c), key, s->head_offset,
                               s->heads_total);
    }
    return close_forward(s, ops, c, sc, out, x, a->att, w->proj_w, w->proj_b, H * D, "attention_out", err, errlen);
}

int lt_layer_attention_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *w,
                                const lt_attention_grads *g, const lt_layer_ctx *c, const void *x, void *dx,
                                const lt_layer_scratch *sc, char *err, size_t errlen) {
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, qkv = lt_layer_qkv_dim(s);
    const int H = s->num_attention_heads, G = s->num_query_groups, D = s->kv_channels;
    const lt_attention_acts *a = &c->attn;
    /* out = x + dropout(proj(att)): dx flows to x unchanged; d(proj out) is dx through the mask. */
    const void *d_proj, *ln;
    float *db;
    if (close_backward(s, ops, c, sc, dx, g->proj_b, "attention_out", &d_proj, &db, err, errlen)) return -1;
    ops->linear_backward(sc->d_att, g->proj_w, db, d_proj, a->att, w->proj_w, N, H * D, C);
    const uint64_t key = lt_dropout_key(c->dropout_seed, c->layer, "attention");
    if (c->cp) {
        if (lt_cp_attention_backward(s->cp, c->cp, sc->d_qkv, sc->d_att, a->qkv, a->att, a->lse, attention_p(s, c), key,
                                     s->head_offset, s->heads_total, sc->ring, err, errlen))
            return -1;
    } else {
        ops->attention_backward(sc->d_qkv, sc->d_att, a->qkv, a->att, a->lse, B, T, H, G, D, attention_p(s, c), key,
                                s->head_offset, s->heads_total);
    }
    if (s->rope) ops->rope_backward(sc->d_qkv, B, T, H, G, D, s->rotary_base, c->pos);
    const void *d_qkv = sc->d_qkv;
    if (s->qk_layernorm) { /* into d_fc1, free since the MLP's backward */
        ops->qk_norm_backward(sc->d_fc1, g->qn_w, g->qn_b, g->kn_w, g->kn_b, sc->d_qkv, a->qkv_pre, w->qn_w, w->kn_w,
                              a->qk_mean, a->qk_rstd, N, H, G, D);
        d_qkv = sc->d_fc1;
    }
    int gemm = qkv;
    if (s->kv_replicas > 1) { /* back in place in the whole QKV (zeros elsewhere), reduce-scattered */
        const lt_backend *be = s->tp->be;
        const size_t E = lt_dtype_size(ops->dtype), mine = (size_t)N * (H + 2) * D;
        gemm = lt_layer_qkv_gemm_dim(s);
        be->copy(sc->kv_a, d_qkv, E * mine);
        be->memzero((char *)sc->kv_a + E * mine, E * (size_t)D);
        ops->embedding_forward(sc->kv_b, c->kv->expand, sc->kv_a, N * (s->heads_total + 2 * s->groups_total), D);
        if (lt_tp_gather_last_backward(s->tp, c->rows, sc->d_qkv, sc->kv_b, sc->kv_a, gemm, err, errlen)) return -1;
        d_qkv = sc->d_qkv;
    }
    /* under SP the norm's output is gathered again (Megatron's trade: memory for one more all-gather) */
    if (open_input(s, c, sc, &ln, a->ln, err, errlen)) return -1;
    ops->linear_backward(sc->d_c2, g->qkv_w, g->qkv_b, d_qkv, ln, w->qkv_w, N, C, gemm);
    void *dln;
    if (open_backward(s, c, sc, &dln, err, errlen)) return -1;
    /* the norm's backward adds d(x) through the norm onto the residual's dx */
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, dln, x, w->ln_w, a->ln_mean, a->ln_rstd,
                           lt_layer_outer_rows(s, B, T));
    return 0;
}

/* ---- MLP block ---- */

int lt_layer_mlp_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, lt_layer_ctx *c,
                         const void *h, void *out, const lt_layer_scratch *sc, char *err, size_t errlen) {
    const int N = c->B * c->T, C = s->hidden_size, F = s->ffn_hidden_size, fc1 = lt_layer_fc1_dim(s);
    lt_mlp_acts *a = &c->mlp;
    const void *ln;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, h, w->ln_w, w->ln_b,
                          lt_layer_outer_rows(s, c->B, c->T));
    if (open_input(s, c, sc, &ln, a->ln, err, errlen)) return -1;
    if (s->gelu_tanh) { /* fc1 and its GELU in one op (one GEMM where the device fuses them) */
        ops->linear_gelu_forward(a->act, a->fc1, ln, w->fc1_w, w->fc1_b, N, C, fc1);
    } else {
        ops->linear_forward(a->fc1, ln, w->fc1_w, w->fc1_b, NULL, N, C, fc1);
        if (s->gated_linear_unit) ops->swiglu_forward(a->act, a->fc1, N, F);
        else ops->gelu_forward(a->act, a->fc1, (int64_t)N * F);
    }
    return close_forward(s, ops, c, sc, out, h, a->act, w->fc2_w, w->fc2_b, F, "mlp_out", err, errlen);
}

int lt_layer_mlp_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_mlp_weights *w, const lt_mlp_grads *g,
                          const lt_layer_ctx *c, const void *h, void *dx, const lt_layer_scratch *sc, char *err,
                          size_t errlen) {
    const int N = c->B * c->T, C = s->hidden_size, F = s->ffn_hidden_size, fc1 = lt_layer_fc1_dim(s);
    const lt_mlp_acts *a = &c->mlp;
    const void *d_fc2, *ln;
    float *db;
    if (close_backward(s, ops, c, sc, dx, g->fc2_b, "mlp_out", &d_fc2, &db, err, errlen)) return -1;
    if (s->gelu_tanh) { /* fc2's backward and the GELU's before it in one op */
        ops->linear_dgelu_backward(sc->d_fc1, g->fc2_w, db, d_fc2, a->act, w->fc2_w, a->fc1, N, F, C);
    } else {
        ops->linear_backward(sc->d_act, g->fc2_w, db, d_fc2, a->act, w->fc2_w, N, F, C);
        if (s->gated_linear_unit) ops->swiglu_backward(sc->d_fc1, sc->d_act, a->fc1, N, F);
        else ops->gelu_backward(sc->d_fc1, sc->d_act, a->fc1, (int64_t)N * F);
    }
    if (open_input(s, c, sc, &ln, a->ln, err, errlen)) return -1;
    ops->linear_backward(sc->d_c2, g->fc1_w, g->fc1_b, sc->d_fc1, ln, w->fc1_w, N, C, fc1);
    void *dln;
    if (open_backward(s, c, sc, &dln, err, errlen)) return -1;
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, dln, h, w->ln_w, a->ln_mean, a->ln_rstd,
                           lt_layer_outer_rows(s, c->B, c->T));
    return 0;
}

/* ---- the layer ---- */

int lt_layer_forward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                     const lt_mlp_weights *mw, lt_layer_ctx *c, const void *x, void *out, const lt_layer_scratch *sc,
                     char *err, size_t errlen) {
    if (lt_layer_attention_forward(s, ops, aw, c, x, c->h, sc, err, errlen)) return -1;
    return lt_layer_mlp_forward(s, ops, mw, c, c->h, out, sc, err, errlen);
}

int lt_layer_backward(const lt_layer_spec *s, const lt_ops *ops, const lt_attention_weights *aw,
                      const lt_attention_grads *ag, const lt_mlp_weights *mw, const lt_mlp_grads *mg,
                      const lt_layer_ctx *c, const void *x, void *dx, const lt_layer_scratch *sc, char *err,
                      size_t errlen) {
    if (lt_layer_mlp_backward(s, ops, mw, mg, c, c->h, dx, sc, err, errlen)) return -1;
    return lt_layer_attention_backward(s, ops, aw, ag, c, x, dx, sc, err, errlen);
}

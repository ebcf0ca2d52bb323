/* The MoE MLP block (moe_mlp.h): the gating GEMM on the device, the router on the host, dispatch by a
 * row gather, each expert's GEMMs on its block of rows, moe_combine back into token order. */
#include "engine/model/moe_mlp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"

struct lt_moe_state {
    int N, E, K, B, T; /* tokens (B T, rows b T + t), experts, slots per token */
    int64_t M;         /* rows dispatched: the sum of the experts' counts */
    lt_moe_router_cfg router;
    /* host, in the router's token order (token s B + b, Megatron's [s, b]) */
    float *logits, *probs;
    uint8_t *map;
    int64_t *counts, *first; /* [E]: each expert's rows, and where its block begins */
    int64_t kept;
    double aux, z;
    /* backend memory: one allocation */
    char *dev;
    size_t dev_bytes;
    int32_t *rows;            /* [M]: the token (row of ln) of each dispatched row */
    int32_t *slots;           /* [N K]: each token's dispatched rows, -1 past its last */
    float *weights, *ones;    /* [N K]: their routing probabilities; ones (the backward's plain sum) */
    void *x, *fc1, *act, *y;  /* [M, C], [M, fc1], [M, F], [M, C] */
};

static size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Rows of the router's order and of the layer's: token s B + b is row b T + s. */
static int layer_row(const lt_moe_state *st, int t) { return (t % st->B) * st->T + t / st->B; }

static int fc1_width(const lt_layer_spec *s, const lt_moe_spec *ms) {
    return s->gated_linear_unit ? 2 * ms->ffn_hidden_size : ms->ffn_hidden_size;
}

void lt_moe_state_free(const lt_layer_spec *s, lt_moe_state *st) {
    if (!st) return;
    if (st->dev) s->tp->be->release(st->dev, st->dev_bytes);
    free(st->logits);
    free(st->probs);
    free(st->map);
    free(st->counts);
    free(st->first);
    free(st);
}

lt_moe_stats lt_moe_state_stats(const lt_moe_state *st) {
    return (lt_moe_stats){st->counts, (int64_t)st->N * st->router.topk, st->kept, st->aux, st->z};
}

/* A compute-dtype device buffer of n values to host fp32, and back. */
static void to_host_f32(const lt_ops *ops, const lt_backend *be, float *dst, const void *src, size_t n) {
    if (ops->dtype == LT_F32) {
        be->to_host(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = malloc(sizeof(uint16_t) * n);
    be->to_host(h, src, sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) dst[i] = lt_bf16_to_f32(h[i]);
    free(h);
}

static void to_device_dtype(const lt_ops *ops, const lt_backend *be, void *dst, const float *src, size_t n) {
    if (ops->dtype == LT_F32) {
        be->to_device(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = malloc(sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(src[i]);
    be->to_device(dst, h, sizeof(uint16_t) * n);
    free(h);
}

/* Routes the logits (device, layer order) and lays out the dispatch: st's host arrays, then its backend
 * memory with the row maps and the experts' activations. */
static int route(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, lt_moe_state *st,
                 const void *logits_dev, char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int N = st->N, E = st->E, C = s->hidden_size;
    float *layer_order = malloc(sizeof(float) * (size_t)N * E);
    st->logits = malloc(sizeof(float) * (size_t)N * E);
    st->probs = malloc(sizeof(float) * (size_t)N * E);
    st->map = malloc((size_t)N * E);
    st->counts = calloc((size_t)E, sizeof(int64_t));
    st->first = calloc((size_t)E + 1, sizeof(int64_t));
    if (!layer_order || !st->logits || !st->probs || !st->map || !st->counts || !st->first) {
        free(layer_order);
        return lt_fail(err, errlen, "out of host memory routing %d tokens", N);
    }
    to_host_f32(ops, be, layer_order, logits_dev, (size_t)N * E);
    for (int t = 0; t < N; t++) memcpy(st->logits + (size_t)t * E, layer_order + (size_t)layer_row(st, t) * E,
                                       sizeof(float) * E);
    free(layer_order);
    if (lt_moe_route_forward(&st->router, st->logits, N, E, st->probs, st->map, st->counts, &st->aux, &st->z, err,
                             errlen))
        return -1;
    /* each expert's rows in token order; each token's slots in expert order */
    int K = 1;
    for (int t = 0; t < N; t++) {
        int n = 0;
        for (int e = 0; e < E; e++) n += st->map[(size_t)t * E + e];
        if (n > K) K = n;
    }
    st->K = K;
    for (int e = 0; e < E; e++) st->first[e + 1] = st->first[e] + st->counts[e];
    st->M = st->first[E];
    st->kept = st->M;
    const int F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype), M = (size_t)st->M, NK = (size_t)N * K;
    const size_t at_slots = up64(sizeof(int32_t) * M), at_w = at_slots + up64(sizeof(int32_t) * NK);
    const size_t at_ones = at_w + up64(sizeof(float) * NK), at_x = at_ones + up64(sizeof(float) * NK);
    const size_t at_fc1 = at_x + up64(Ed * M * C), at_act = at_fc1 + up64(Ed * M * fc1);
    const size_t at_y = at_act + up64(Ed * M * F);
    st->dev_bytes = at_y + up64(Ed * M * C) + 64;
    st->dev = be->alloc(st->dev_bytes);
    int32_t *rows = malloc(sizeof(int32_t) * (M ? M : 1)), *slots = malloc(sizeof(int32_t) * NK);
    float *w = malloc(sizeof(float) * NK), *ones = malloc(sizeof(float) * NK);
    int64_t *next = malloc(sizeof(int64_t) * (size_t)E);
    if (!st->dev || !rows || !slots || !w || !ones || !next) {
        free(rows), free(slots), free(w), free(ones), free(next);
        return lt_fail(err, errlen, "out of %s memory dispatching %lld rows to the experts", be->name,
                       (long long)st->M);
    }
    for (int e = 0; e < E; e++) next[e] = st->first[e];
    for (size_t i = 0; i < NK; i++) slots[i] = -1, w[i] = 0.0f, ones[i] = 1.0f;
    for (int t = 0; t < N; t++) {
        const int r = layer_row(st, t);
        int j = 0;
        for (int e = 0; e < E; e++) {
            if (!st->map[(size_t)t * E + e]) continue;
            const int64_t m = next[e]++;
            rows[m] = r;
            slots[(size_t)r * K + j] = (int32_t)m;
            w[(size_t)r * K + j] = st->probs[(size_t)t * E + e];
            j++;
        }
    }
    st->rows = (int32_t *)st->dev;
    st->slots = (int32_t *)(st->dev + at_slots);
    st->weights = (float *)(st->dev + at_w);
    st->ones = (float *)(st->dev + at_ones);
    st->x = st->dev + at_x, st->fc1 = st->dev + at_fc1, st->act = st->dev + at_act, st->y = st->dev + at_y;
    if (M) be->to_device(st->rows, rows, sizeof(int32_t) * M);
    be->to_device(st->slots, slots, sizeof(int32_t) * NK);
    be->to_device(st->weights, w, sizeof(float) * NK);
    be->to_device(st->ones, ones, sizeof(float) * NK);
    free(rows), free(slots), free(w), free(ones), free(next);
    return 0;
}

/* Element offset of expert e's block of rows in a buffer `width` wide. */
static size_t block(const lt_moe_state *st, int e, int width, size_t Ed) {
    return Ed * (size_t)st->first[e] * (size_t)width;
}

int lt_moe_mlp_forward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                       lt_layer_ctx *c, const void *h, void *out, lt_moe_state **state, char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, E = ms->num_experts;
    const int F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype);
    lt_mlp_acts *a = &c->mlp;
    *state = NULL;
    lt_moe_state *st = calloc(1, sizeof *st);
    void *logits = be->alloc(Ed * (size_t)N * E);
    if (!st || !logits) {
        free(st);
        if (logits) be->release(logits, Ed * (size_t)N * E);
        return lt_fail(err, errlen, "out of %s memory for the router's logits", be->name);
    }
    *st = (lt_moe_state){.N = N, .E = E, .B = B, .T = T, .router = ms->router};
    st->router.seq_length = T, st->router.micro_batch_size = B;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, h, w->ln_w, w->ln_b, N);
    ops->linear_forward(logits, a->ln, w->router_w, NULL, NULL, N, C, E);
    const int rc = route(s, ms, ops, st, logits, err, errlen);
    be->release(logits, Ed * (size_t)N * E);
    if (rc) {
        lt_moe_state_free(s, st);
        return -1;
    }
    if (st->M) ops->embedding_forward(st->x, st->rows, a->ln, (int)st->M, C); /* dispatch */
    for (int e = 0; e < E; e++) {
        const int n = (int)st->counts[e];
        if (!n) continue;
        char *x = (char *)st->x + block(st, e, C, Ed), *pre = (char *)st->fc1 + block(st, e, fc1, Ed);
        char *act = (char *)st->act + block(st, e, F, Ed), *y = (char *)st->y + block(st, e, C, Ed);
        if (s->gelu_tanh) {
            ops->linear_gelu_forward(act, pre, x, w->fc1_w[e], w->fc1_b ? w->fc1_b[e] : NULL, n, C, fc1);
        } else {
            ops->linear_forward(pre, x, w->fc1_w[e], w->fc1_b ? w->fc1_b[e] : NULL, NULL, n, C, fc1);
            if (s->gated_linear_unit) ops->swiglu_forward(act, pre, n, F);
            else ops->gelu_forward(act, pre, (int64_t)n * F);
        }
        ops->linear_forward(y, act, w->fc2_w[e], w->fc2_b ? w->fc2_b[e] : NULL, NULL, n, F, C);
    }
    ops->moe_combine_forward(out, st->y, st->slots, st->weights, N, st->K, C);
    const float p = c->training ? s->hidden_dropout : 0.0f;
    if (p > 0)
        lt_tp_dropout_forward(s->tp, c->rows, out, out, B, T, C, p, lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"));
    ops->add_forward(out, out, h, (int64_t)N * C);
    *state = st;
    return 0;
}

int lt_moe_mlp_backward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                        const lt_moe_grads *g, const lt_layer_ctx *c, const lt_moe_state *st, const void *h,
                        void *dx, const lt_layer_scratch *sc, char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int B = c->B, T = c->T, N = B * T, C = s->hidden_size, E = st->E, K = st->K;
    const int F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype), M = (size_t)st->M, NK = (size_t)N * K;
    const lt_mlp_acts *a = &c->mlp;
    /* d(combined): dx through the dropout mask */
    const void *d = dx;
    const float p = c->training ? s->hidden_dropout : 0.0f;
    if (p > 0) {
        lt_tp_dropout_backward(s->tp, c->rows, sc->d_c, dx, B, T, C, p,
                               lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"));
        d = sc->d_c;
    }
    const size_t at_dw = up64(Ed * M * C), at_dact = at_dw + up64(sizeof(float) * NK);
    const size_t at_dfc1 = at_dact + up64(Ed * M * F), at_dx = at_dfc1 + up64(Ed * M * fc1);
    const size_t at_dlog = at_dx + up64(Ed * M * C), bytes = at_dlog + up64(Ed * (size_t)N * E) + 64;
    char *base = be->alloc(bytes);
    float *hw = malloc(sizeof(float) * NK), *dprobs = calloc((size_t)N * E, sizeof(float));
    float *dlogits = malloc(sizeof(float) * (size_t)N * E), *layer_order = malloc(sizeof(float) * (size_t)N * E);
    int rc = 0;
    if (!base || !hw || !dprobs || !dlogits || !layer_order) {
        rc = lt_fail(err, errlen, "out of memory for the MoE block's backward (%zu bytes)", bytes);
        goto done;
    }
    char *dy = base, *dact = base + at_dact, *dfc1 = base + at_dfc1, *dxp = base + at_dx, *dlog = base + at_dlog;
    float *dweights = (float *)(base + at_dw);
    ops->moe_combine_backward(dy, dweights, d, st->y, st->slots, st->weights, N, K, (int)M, C);
    for (int e = 0; e < E; e++) {
        const int n = (int)st->counts[e];
        if (!n) continue;
        const size_t oc = block(st, e, C, Ed), of = block(st, e, F, Ed), o1 = block(st, e, fc1, Ed);
        float *gb2 = g->fc2_b ? g->fc2_b[e] : NULL, *gb1 = g->fc1_b ? g->fc1_b[e] : NULL;
        if (s->gelu_tanh) {
            ops->linear_dgelu_backward(dfc1 + o1, g->fc2_w[e], gb2, dy + oc, (char *)st->act + of, w->fc2_w[e],
                                       (char *)st->fc1 + o1, n, F, C);
        } else {
            ops->linear_backward(dact + of, g->fc2_w[e], gb2, dy + oc, (char *)st->act + of, w->fc2_w[e], n, F, C);
            if (s->gated_linear_unit) ops->swiglu_backward(dfc1 + o1, dact + of, (char *)st->fc1 + o1, n, F);
            else ops->gelu_backward(dfc1 + o1, dact + of, (char *)st->fc1 + o1, (int64_t)n * F);
        }
        ops->linear_backward(dxp + oc, g->fc1_w[e], gb1, dfc1 + o1, (char *)st->x + oc, w->fc1_w[e], n, C, fc1);
    }
    /* d(ln) from the experts: each token's dispatched rows summed back (weights 1) */
    ops->moe_combine_forward(sc->d_c2, dxp, st->slots, st->ones, N, K, C);
    /* the router: d(probs) from the combine's weights, then the router's own backward with the aux and
     * z losses at the autoscaler's scale, then the gating GEMM */
    be->to_host(hw, dweights, sizeof(float) * NK);
    for (int t = 0; t < N; t++) { /* a token's slots are its experts in order, as route laid them out */
        const int r = layer_row(st, t);
        int j = 0;
        for (int e = 0; e < E; e++)
            if (st->map[(size_t)t * E + e]) dprobs[(size_t)t * E + e] = hw[(size_t)r * K + j++];
    }
    if (lt_moe_route_backward(&st->router, st->logits, st->probs, st->map, st->counts, N, E, dprobs,
                              ms->aux_loss_scale, ms->aux_loss_scale, dlogits, err, errlen)) {
        rc = -1;
        goto done;
    }
    for (int t = 0; t < N; t++) memcpy(layer_order + (size_t)layer_row(st, t) * E, dlogits + (size_t)t * E,
                                       sizeof(float) * E);
    to_device_dtype(ops, be, dlog, layer_order, (size_t)N * E);
    ops->linear_backward(sc->d_c, g->router_w, NULL, dlog, a->ln, w->router_w, N, C, E);
    ops->add_forward(sc->d_c2, sc->d_c2, sc->d_c, (int64_t)N * C);
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, sc->d_c2, h, w->ln_w, a->ln_mean, a->ln_rstd, N);
done:
    if (base) be->release(base, bytes);
    free(hw), free(dprobs), free(dlogits), free(layer_order);
    return rc;
}

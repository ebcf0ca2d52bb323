/* The MoE router (moe_router.h): Megatron's router math token by token in fp32 on the host, and its
 * autograd gradient written out by hand. Backward recomputes each token's choices from the logits (they
 * are a function of them) rather than keeping them from forward. */
#include "engine/parallel/moe_router.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"

enum { NONE, AUX, SEQ_AUX, SINKHORN, GLOBAL_AUX };

static int aux_on(const lt_moe_router_cfg *c) {
    return (c->load_balancing == AUX || c->load_balancing == SEQ_AUX || c->load_balancing == GLOBAL_AUX) &&
           c->aux_loss_coeff > 0;
}

int lt_moe_router_check(const lt_moe_router_cfg *c, int T, int E, char *err, size_t errlen) {
    if (T < 1 || E < 1) return lt_fail(err, errlen, "the router needs tokens and experts (got %d x %d logits)", T, E);
    if (c->topk < 1) return lt_fail(err, errlen, "moe_router_topk must be at least 1 (got %d)", c->topk);
    if (c->topk > E)
        return lt_fail(err, errlen, "moe_router_topk (%d) is larger than num_moe_experts (%d): a token cannot pick "
                       "more experts than there are", c->topk, E);
    if (!c->sigmoid && c->topk == 1 && !c->pre_softmax && c->load_balancing != SINKHORN)
        return lt_fail(err, errlen, "Please use --moe-router-pre-softmax when topk is 1.");
    if (c->expert_bias && !c->sigmoid)
        return lt_fail(err, errlen, "Expert bias for aux-loss-free routing only supports 'sigmoid' and 'sqrtsoftplus' "
                       "score functions. Please set --moe-router-score-function to 'sigmoid' or 'sqrtsoftplus', "
                       "or unset --moe-router-enable-expert-bias.");
    if (c->pad_to_capacity && !(c->capacity_factor > 0))
        return lt_fail(err, errlen, "moe_expert_capacity_factor must be set to use moe_pad_expert_input_to_capacity");
    if (c->load_balancing < NONE || c->load_balancing > GLOBAL_AUX)
        return lt_fail(err, errlen, "load_balancing must be 0 (none), 1 (aux_loss), 2 (seq_aux_loss), 3 (sinkhorn) "
                       "or 4 (global_aux_loss), got %d", c->load_balancing);
    if (c->load_balancing == SINKHORN && c->capacity_factor > 0) /* TransformerConfig's check */
        return lt_fail(err, errlen, "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, "
                       "global_aux_loss or none load balancing");
    if (c->load_balancing == SINKHORN && c->aux_loss_coeff != 0) /* sinkhorn_load_balancing's assert */
        return lt_fail(err, errlen, "Sinkhorn routing does not support aux loss.");
    if (aux_on(c) && c->load_balancing == SEQ_AUX &&
        (c->seq_length < 1 || c->micro_batch_size < 1 || (int64_t)c->seq_length * c->micro_batch_size != T))
        return lt_fail(err, errlen,
                       "seq_aux_loss needs seq_length x micro_batch_size = the tokens (%d x %d, %d tokens)",
                       c->seq_length, c->micro_batch_size, T);
    if (aux_on(c) && c->load_balancing != GLOBAL_AUX && c->tp_cp_size > 1 && !c->aux_counts)
        return lt_fail(err, errlen,
                       "the aux loss over a TP x CP group of %d needs the counts summed over it (aux_counts)",
                       c->tp_cp_size);
    if (aux_on(c) && c->load_balancing == GLOBAL_AUX && c->tp_dp_cp_size > 1 && !c->global_counts)
        return lt_fail(err, errlen, "the global aux loss over a TP x DP x CP group of %d needs the averaged counts "
                       "summed over it (global_counts)", c->tp_dp_cp_size);
    return 0;
}

/* torch.topk's order: the larger first, NaN above every number, ties to the lower index. */
static int before(float a, int ia, float b, int ib) {
    if (isnan(a) || isnan(b)) return isnan(a) && (!isnan(b) || ia < ib);
    return a > b || (a == b && ia < ib);
}

static float key(const float *v, const float *bias, int j) { return bias ? v[j] + bias[j] : v[j]; }

/* idx[0..k) = the indices of the k first of v (+ bias, added in fp32) in that order: insertion, k is small. */
static void topk(const float *v, const float *bias, int n, int k, int *idx) {
    int m = 0;
    for (int j = 0; j < n; j++) {
        const float x = key(v, bias, j);
        if (m == k && !before(x, j, key(v, bias, idx[k - 1]), idx[k - 1])) continue;
        int p = m < k ? m++ : k - 1;
        for (; p > 0 && before(x, j, key(v, bias, idx[p - 1]), idx[p - 1]); p--) idx[p] = idx[p - 1];
        idx[p] = j;
    }
}

/* out = softmax(x) over n (torch's: exp of x - max, over their sum); returns the log-sum-exp. */
static float softmax(const float *x, int n, float *out) {
    float mx = x[0], sum = 0;
    for (int j = 1; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    for (int j = 0; j < n; j++) sum += out[j] = expf(x[j] - mx);
    for (int j = 0; j < n; j++) out[j] /= sum;
    return mx + logf(sum);
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* One token's k experts (idx, in order) and their probs before the scaling factor (p); s: E floats of
 * scratch, left holding the scores (softmax or sigmoid over all E) where the score function has them. */
static void route_token(const lt_moe_router_cfg *c, const float *l, int E, float *s, int *idx, float *p) {
    const int k = c->topk;
    if (!c->sigmoid && c->pre_softmax) {
        softmax(l, E, s);
        topk(s, NULL, E, k, idx);
        for (int j = 0; j < k; j++) p[j] = s[idx[j]];
    } else if (!c->sigmoid) {
        topk(l, NULL, E, k, idx);
        for (int j = 0; j < k; j++) s[j] = l[idx[j]];
        softmax(s, k, p);
    } else {
        for (int e = 0; e < E; e++) s[e] = sigmoid(l[e]);
        topk(s, c->expert_bias, E, k, idx);
        float sum = 0;
        for (int j = 0; j < k; j++) sum += p[j] = s[idx[j]];
        if (k > 1)
            for (int j = 0; j < k; j++) p[j] /= sum + 1e-20f;
    }
}

/* dl[E] += the gradient through route_token of g[k] (d/dp), with route_token's s, idx and p. */
static void route_token_backward(const lt_moe_router_cfg *c, const float *s, const int *idx, const float *p,
                                 const float *g, int E, float *dl) {
    const int k = c->topk;
    float dot = 0;
    if (!c->sigmoid && c->pre_softmax) { /* p = gather(softmax over E): softmax's backward over all E */
        for (int j = 0; j < k; j++) dot += g[j] * p[j];
        for (int e = 0; e < E; e++) dl[e] -= s[e] * dot;
        for (int j = 0; j < k; j++) dl[idx[j]] += s[idx[j]] * g[j];
    } else if (!c->sigmoid) { /* softmax over the k gathered logits */
        for (int j = 0; j < k; j++) dot += g[j] * p[j];
        for (int j = 0; j < k; j++) dl[idx[j]] += p[j] * (g[j] - dot);
    } else { /* p = sc / (sum sc + 1e-20) for k > 1, sc = sigmoid at idx */
        float sum = 0;
        for (int j = 0; j < k; j++) sum += s[idx[j]];
        const float D = sum + 1e-20f;
        for (int j = 0; j < k; j++) dot += g[j] * s[idx[j]];
        for (int j = 0; j < k; j++) {
            const float sc = s[idx[j]], dsc = k > 1 ? g[j] / D - dot / (D * D) : g[j];
            dl[idx[j]] += dsc * sc * (1 - sc);
        }
    }
}

/* The aux loss's scores of one token (compute_routing_scores_for_aux_loss): softmax over E, or sigmoid
 * normalised over E; sg: the sigmoids (sigmoid only). */
static void aux_scores(const lt_moe_router_cfg *c, const float *l, int E, float *s, float *sg) {
    if (!c->sigmoid) {
        softmax(l, E, s);
        return;
    }
    float sum = 0;
    for (int e = 0; e < E; e++) sum += sg[e] = sigmoid(l[e]);
    for (int e = 0; e < E; e++) s[e] = sg[e] / (sum + 1e-20f);
}

static void aux_scores_backward(const lt_moe_router_cfg *c, const float *s, const float *sg, const float *g, int E,
                                float *dl) {
    float dot = 0;
    if (!c->sigmoid) {
        for (int e = 0; e < E; e++) dot += g[e] * s[e];
        for (int e = 0; e < E; e++) dl[e] += s[e] * (g[e] - dot);
        return;
    }
    float sum = 0;
    for (int e = 0; e < E; e++) sum += sg[e], dot += g[e] * sg[e];
    const float D = sum + 1e-20f;
    for (int e = 0; e < E; e++) dl[e] += (g[e] / D - dot / (D * D)) * sg[e] * (1 - sg[e]);
}

/* Column of the aux loss's counts for token t's expert e: seq_aux_loss folds the batch into the experts
 * ([S, B E] with t = s B + b). */
static int aux_col(const lt_moe_router_cfg *c, int t, int e, int E) {
    return c->load_balancing == SEQ_AUX ? (t % c->micro_batch_size) * E + e : e;
}

int lt_moe_aux_counts_len(const lt_moe_router_cfg *c, int E) {
    return !aux_on(c) ? 0 : c->load_balancing == SEQ_AUX ? c->micro_batch_size * E : E;
}

void lt_moe_global_counts_add(float *sum, float *steps, const int64_t *summed, int E, float *avg) {
    *steps += 1;
    for (int e = 0; e < E; e++) {
        sum[e] += (float)summed[e];
        avg[e] = sum[e] / *steps;
    }
}

#define SINKHORN_LIMIT 100000

int lt_moe_sinkhorn(const float *logits, int T, int E, float *out, char *err, size_t errlen) {
    if (T < 1 || E < 1) return lt_fail(err, errlen, "sinkhorn needs tokens and experts (got %d x %d logits)", T, E);
    float *d0 = malloc(sizeof(float) * ((size_t)T + 2 * (size_t)E));
    double *col = malloc(sizeof(double) * (size_t)E);
    if (!d0 || !col) {
        free(d0), free(col);
        return lt_fail(err, errlen, "out of host memory in the MoE router's sinkhorn (%d x %d logits)", T, E);
    }
    float *d1 = d0 + T, *old = d1 + E;
    float *cost = out; /* exp(logits), scaled in place at the end */
    for (size_t i = 0; i < (size_t)T * E; i++) cost[i] = expf(logits[i]);
    for (int e = 0; e < E; e++) d1[e] = old[e] = 1;
    /* Megatron's (1 / n) * 1 / (sum + eps) is the tensor's reciprocal times the Python scalar 1 / n */
    const float rT = (float)(1.0 / T), rE = (float)(1.0 / E), eps = 1e-8f;
    float error = 1e9f;
    int it = 0;
    while (error > 1e-4f) { /* a NaN error ends it, as in Python */
        if (++it > SINKHORN_LIMIT) {
            free(d0), free(col);
            return lt_fail(err, errlen, "sinkhorn did not reach Megatron's tolerance (mean change 1e-4, now %g) in %d "
                           "iterations; Megatron's loop has no limit and would not stop", (double)error,
                           SINKHORN_LIMIT);
        }
        /* sums in double: closer than a sequential float sum to torch's tree reductions over long columns */
        for (int t = 0; t < T; t++) {
            double sum = 0;
            for (int e = 0; e < E; e++) sum += d1[e] * cost[(size_t)t * E + e];
            d0[t] = 1.0f / ((float)sum + eps) * rT;
        }
        for (int e = 0; e < E; e++) col[e] = 0;
        for (int t = 0; t < T; t++)
            for (int e = 0; e < E; e++) col[e] += d0[t] * cost[(size_t)t * E + e];
        double change = 0;
        for (int e = 0; e < E; e++) {
            d1[e] = 1.0f / ((float)col[e] + eps) * rE;
            change += fabsf(old[e] - d1[e]);
            old[e] = d1[e];
        }
        error = (float)change / (float)E;
    }
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) out[(size_t)t * E + e] = d1[e] * cost[(size_t)t * E + e] * d0[t];
    free(d0), free(col);
    return 0;
}

/* Sinkhorn's activation (_sinkhorn_activation): sigmoid for k = 1, else softmax over all E. */
static void sinkhorn_act(int k, const float *l, int E, float *s) {
    if (k > 1) {
        softmax(l, E, s);
        return;
    }
    for (int e = 0; e < E; e++) s[e] = sigmoid(l[e]);
}

struct ranked {
    float v;
    int t;
};

/* Scratch of one call: a token's floats and k indices, and (when dropping) a column to rank and the mask. */
typedef struct {
    float *s, *sg, *p, *g;
    int *idx;
    struct ranked *col; /* a column of T for dropping */
    uint8_t *mask;
} scratch;

static int scratch_new(scratch *w, int T, int E, int k, int dropping, char *err, size_t errlen) {
    const size_t head = sizeof(struct ranked) * (dropping ? (size_t)T : 0);
    char *m = malloc(head + sizeof(float) * (3 * (size_t)E + k) + sizeof(int) * k + (dropping ? (size_t)T * E : 0));
    if (!m) return lt_fail(err, errlen, "out of host memory in the MoE router (%d x %d logits)", T, E);
    w->col = (struct ranked *)m;
    w->s = (float *)(m + head), w->sg = w->s + E, w->g = w->sg + E, w->p = w->g + E;
    w->idx = (int *)(w->p + k);
    w->mask = (uint8_t *)(w->idx + k);
    return 0;
}

static void counts_of(const lt_moe_router_cfg *c, const float *logits, int T, int E, int64_t *counts,
                     const scratch *w) {
    memset(counts, 0, sizeof(int64_t) * (size_t)lt_moe_aux_counts_len(c, E));
    for (int t = 0; t < T; t++) {
        aux_scores(c, logits + (size_t)t * E, E, w->s, w->sg);
        topk(w->s, NULL, E, c->topk, w->idx);
        for (int j = 0; j < c->topk; j++) counts[aux_col(c, t, w->idx[j], E)]++;
    }
}

int lt_moe_aux_counts(const lt_moe_router_cfg *c, const float *logits, int T, int E, int64_t *counts, char *err,
                      size_t errlen) {
    lt_moe_router_cfg own = *c; /* a rank's own counts are what the group's sum needs: none summed yet */
    own.tp_cp_size = own.tp_dp_cp_size = 1;
    scratch w;
    if (lt_moe_router_check(&own, T, E, err, errlen) || scratch_new(&w, T, E, c->topk, 0, err, errlen)) return -1;
    counts_of(c, logits, T, E, counts, &w);
    free(w.col);
    return 0;
}

/* The counts the aux loss multiplies the scores by, as the fp32 tensor Megatron multiplies (the caller's
 * sums or average, or this rank's own counts), in a new array for the caller to free. */
static float *aux_weights(const lt_moe_router_cfg *c, const float *logits, int T, int E, const scratch *w, char *err,
                          size_t errlen) {
    const int n = lt_moe_aux_counts_len(c, E);
    float *f = malloc(sizeof(float) * (size_t)n);
    int64_t *own = NULL;
    const int global = c->load_balancing == GLOBAL_AUX;
    const int64_t *counts = global ? NULL : c->aux_counts;
    if (f && global && c->global_counts) {
        memcpy(f, c->global_counts, sizeof(float) * (size_t)n);
        return f;
    }
    if (f && !counts && (own = malloc(sizeof(int64_t) * (size_t)n))) counts_of(c, logits, T, E, own, w), counts = own;
    if (!f || !counts) {
        free(f);
        return lt_fail(err, errlen, "out of host memory in the MoE router"), NULL;
    }
    for (int i = 0; i < n; i++) f[i] = (float)counts[i];
    free(own);
    return f;
}

/* d(aux)/d(sum of the scores x counts): Megatron's E coeff / (k T'^2), a Python double applied to an
 * fp32 tensor (so rounded to float); seq_aux_loss then divides by B. T' counts the group's tokens: the
 * TP x CP group's, or the TP x DP x CP group's for global_aux_loss. */
static float aux_scale(const lt_moe_router_cfg *c, int T, int E) {
    const int group = c->load_balancing == GLOBAL_AUX ? c->tp_dp_cp_size : c->tp_cp_size;
    const int64_t n = (int64_t)(c->load_balancing == SEQ_AUX ? c->seq_length : T) * (group > 1 ? group : 1);
    return (float)((double)E * c->aux_loss_coeff / (double)((int64_t)c->topk * n * n));
}

static int64_t capacity_of(const lt_moe_router_cfg *c, int T, int E) {
    return (int64_t)ceil((double)((int64_t)T * c->topk) / E * c->capacity_factor);
}

static int by_rank(const void *a, const void *b) {
    const struct ranked *x = a, *y = b;
    return x->t == y->t ? 0 : before(x->v, x->t, y->v, y->t) ? -1 : 1;
}

/* apply_router_token_dropping: per expert, the capacity mask = the top `capacity` tokens of the probs
 * column (or of the 0/1 map column, by position), ties to the lower token; map and probs masked, or the
 * map replaced by the mask when padding. */
static void drop_tokens(const lt_moe_router_cfg *c, float *probs, uint8_t *map, int T, int E, const scratch *w) {
    const int64_t cap = capacity_of(c, T, E);
    if (cap > T) {
        memset(w->mask, 1, (size_t)T * E);
    } else {
        memset(w->mask, 0, (size_t)T * E);
        for (int e = 0; e < E; e++) {
            for (int t = 0; t < T; t++) {
                const size_t i = (size_t)t * E + e;
                w->col[t] = (struct ranked){c->drop_by_position ? (float)map[i] : probs[i], t};
            }
            qsort(w->col, (size_t)T, sizeof *w->col, by_rank);
            for (int64_t r = 0; r < cap; r++) w->mask[(size_t)w->col[r].t * E + e] = 1;
        }
    }
    for (size_t i = 0; i < (size_t)T * E; i++) {
        map[i] = c->pad_to_capacity ? w->mask[i] : (uint8_t)(map[i] & w->mask[i]);
        if (!map[i]) probs[i] = 0;
    }
}

/* sinkhorn_load_balancing: probs and map of all T tokens at once (the scaling couples them); the top-k of
 * the sinkhorn-normalised logits in training, of the activation in eval, and the activation there. */
static int sinkhorn_route(const lt_moe_router_cfg *c, const float *logits, int T, int E, float *probs, uint8_t *map,
                          const scratch *w, char *err, size_t errlen) {
    float *norm = NULL;
    if (!c->eval) {
        norm = malloc(sizeof(float) * (size_t)T * E);
        if (!norm) return lt_fail(err, errlen, "out of host memory in the MoE router (%d x %d logits)", T, E);
        if (lt_moe_sinkhorn(logits, T, E, norm, err, errlen)) {
            free(norm);
            return -1;
        }
    }
    for (int t = 0; t < T; t++) {
        sinkhorn_act(c->topk, logits + (size_t)t * E, E, w->s);
        topk(norm ? norm + (size_t)t * E : w->s, NULL, E, c->topk, w->idx);
        for (int j = 0; j < c->topk; j++) {
            const size_t i = (size_t)t * E + w->idx[j];
            probs[i] = w->s[w->idx[j]], map[i] = 1;
        }
    }
    free(norm);
    return 0;
}

int lt_moe_route_forward(const lt_moe_router_cfg *c, const float *logits, int T, int E, float *probs, uint8_t *map,
                         int64_t *tokens_per_expert, double *aux_loss, double *z_loss, char *err, size_t errlen) {
    const int dropping = c->capacity_factor > 0;
    scratch w;
    if (lt_moe_router_check(c, T, E, err, errlen) || scratch_new(&w, T, E, c->topk, dropping, err, errlen)) return -1;
    const int k = c->topk;
    /* 1. z-loss: fp32 log-sum-exps, their squares averaged, x the coefficient over TP x CP (a double) */
    *z_loss = 0;
    if (c->z_loss_coeff != 0) {
        double sum = 0;
        for (int t = 0; t < T; t++) {
            const float lse = softmax(logits + (size_t)t * E, E, w.s);
            sum += lse * lse;
        }
        const double coeff = c->z_loss_coeff / (c->tp_cp_size > 1 ? c->tp_cp_size : 1);
        *z_loss = (float)(sum / T) * (float)coeff;
    }
    /* 2. top-k with the score function, or sinkhorn's */
    memset(probs, 0, sizeof(float) * (size_t)T * E);
    memset(map, 0, (size_t)T * E);
    if (c->load_balancing == SINKHORN && sinkhorn_route(c, logits, T, E, probs, map, &w, err, errlen)) {
        free(w.col);
        return -1;
    }
    for (int t = 0; c->load_balancing != SINKHORN && t < T; t++) {
        route_token(c, logits + (size_t)t * E, E, w.s, w.idx, w.p);
        for (int j = 0; j < k; j++) {
            const size_t i = (size_t)t * E + w.idx[j];
            probs[i] = c->topk_scaling_factor != 0 ? w.p[j] * c->topk_scaling_factor : w.p[j];
            map[i] = 1;
        }
    }
    /* 3. token dropping */
    if (dropping) drop_tokens(c, probs, map, T, E, &w);
    for (int e = 0; e < E; e++) tokens_per_expert[e] = 0;
    for (size_t i = 0; i < (size_t)T * E; i++) tokens_per_expert[i % E] += map[i];
    /* 4. the load-balancing loss from the aux loss's own scores and top-k counts */
    *aux_loss = 0;
    if (aux_on(c)) {
        const int ncol = lt_moe_aux_counts_len(c, E);
        float *counts = aux_weights(c, logits, T, E, &w, err, errlen);
        double *agg = counts ? calloc((size_t)ncol, sizeof(double)) : NULL;
        if (!agg) {
            free(counts), free(w.col);
            return counts ? lt_fail(err, errlen, "out of host memory in the MoE router") : -1;
        }
        for (int t = 0; t < T; t++) {
            aux_scores(c, logits + (size_t)t * E, E, w.s, w.sg);
            for (int e = 0; e < E; e++) agg[aux_col(c, t, e, E)] += w.s[e];
        }
        double sum = 0;
        for (int i = 0; i < ncol; i++) sum += (float)agg[i] * counts[i];
        float aux = (float)sum * aux_scale(c, T, E);
        *aux_loss = c->load_balancing == SEQ_AUX ? aux / (float)c->micro_batch_size : aux;
        free(agg), free(counts);
    }
    free(w.col);
    return 0;
}

int lt_moe_route_backward(const lt_moe_router_cfg *c, const float *logits, const float *probs, const uint8_t *map,
                          const int64_t *tokens_per_expert, int T, int E, const float *dprobs, float daux, float dz,
                          float *dlogits, char *err, size_t errlen) {
    (void)probs, (void)tokens_per_expert;
    scratch w;
    if (lt_moe_router_check(c, T, E, err, errlen) || scratch_new(&w, T, E, c->topk, 0, err, errlen)) return -1;
    const int k = c->topk;
    const float scale = c->topk_scaling_factor != 0 ? c->topk_scaling_factor : 1.0f;
    float *counts = NULL;
    if (aux_on(c) && daux != 0 && !(counts = aux_weights(c, logits, T, E, &w, err, errlen))) {
        free(w.col);
        return -1;
    }
    /* d(aux)/d(score) per unit count: daux / B (seq_aux_loss) x the scalar, in fp32 as autograd forms it */
    const float per_b = c->load_balancing == SEQ_AUX ? daux / (float)c->micro_batch_size : daux;
    const float gaux = counts ? per_b * aux_scale(c, T, E) : 0;
    const float gz = c->z_loss_coeff != 0 && dz != 0
                         ? dz * (float)(c->z_loss_coeff / (c->tp_cp_size > 1 ? c->tp_cp_size : 1)) / (float)T
                         : 0;
    for (int t = 0; t < T; t++) {
        const float *l = logits + (size_t)t * E, *dp = dprobs + (size_t)t * E;
        float *dl = dlogits + (size_t)t * E;
        memset(dl, 0, sizeof(float) * (size_t)E);
        if (c->load_balancing == SINKHORN) { /* probs = activation x map (no dropping): its backward */
            sinkhorn_act(k, l, E, w.s);
            float dot = 0;
            for (int e = 0; e < E; e++) w.g[e] = map[(size_t)t * E + e] ? dp[e] : 0, dot += w.g[e] * w.s[e];
            for (int e = 0; e < E; e++) dl[e] += k > 1 ? w.s[e] * (w.g[e] - dot) : w.g[e] * w.s[e] * (1 - w.s[e]);
        } else { /* probs: the masked scatter passes dprobs to the chosen k where the final map keeps them */
            route_token(c, l, E, w.s, w.idx, w.p);
            for (int j = 0; j < k; j++) {
                const size_t i = (size_t)t * E + w.idx[j];
                w.g[j] = map[i] ? dp[w.idx[j]] * scale : 0;
            }
            route_token_backward(c, w.s, w.idx, w.p, w.g, E, dl);
        }
        if (gaux != 0) {
            aux_scores(c, l, E, w.s, w.sg);
            for (int e = 0; e < E; e++) w.g[e] = gaux * counts[aux_col(c, t, e, E)];
            aux_scores_backward(c, w.s, w.sg, w.g, E, dl);
        }
        if (gz != 0) { /* d(lse^2)/dl = 2 lse softmax(l) */
            const float lse = softmax(l, E, w.s);
            for (int e = 0; e < E; e++) dl[e] += gz * 2 * lse * w.s[e];
        }
    }
    free(counts), free(w.col);
    return 0;
}

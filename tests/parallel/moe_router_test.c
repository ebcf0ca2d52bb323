/* The MoE router (engine/parallel/moe_router.h) against
 * - hand-computed cases: every score function (softmax after top-k, pre-softmax, sigmoid with and
 *   without expert bias, k = 1 and k > 1, scaling factor), ties to the lowest index, capacity and
 *   dropping by probs and by position, padding, capacity > T and = T, the capacity's double product
 *   (0.3 x 10 = 3, not 4), aux_loss, seq_aux_loss (t = s B + b), z-loss, counts summed over TP x CP;
 *   sinkhorn (a 3 x 3 whose balanced scaling is known, Megatron's tolerance against a converged one, the
 *   activation's probs, eval), global_aux_loss with averaged counts over TP x DP x CP and their tracker;
 * - an independent double-precision reference written from Megatron's code (router.py, moe_utils.py)
 *   with its own selection (repeated arg-max, not insertion), on random logits for many configurations:
 *   forward equal (probs 1e-6, maps and counts exactly, losses 1e-5 relative), and backward against
 *   central differences of the reference's sum(dprobs probs) + daux aux + dz z (dprobs nonzero
 *   everywhere: unrouted and dropped entries must pass nothing);
 * - the configuration checks and their messages. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/parallel/moe_router.h"
#include "tests/tap.h"

#define MAXT 64
#define MAXE 16

typedef struct {
    float probs[MAXT * MAXE];
    uint8_t map[MAXT * MAXE];
    int64_t tpe[MAXE];
    double aux, z;
} out_t;

static int route(const lt_moe_router_cfg *c, const float *l, int T, int E, out_t *o) {
    char err[256] = "";
    int rc = lt_moe_route_forward(c, l, T, E, o->probs, o->map, o->tpe, &o->aux, &o->z, err, sizeof err);
    if (rc) printf("# forward failed: %s\n", err);
    return rc;
}

static int close_to(double a, double b, double tol) { return fabs(a - b) <= tol * (1 + fabs(b)); }

/* ---- the reference: Megatron's functions, in double ---- */

/* torch.topk(dim=-1): k times the largest not yet taken, the first index on ties. */
static void ref_topk(const double *v, int n, int k, int *idx) {
    int taken[MAXT > MAXE ? MAXT : MAXE] = {0};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
        taken[best] = 1, idx[j] = best;
    }
}

static void ref_softmax(const double *x, int n, double *out) {
    double m = x[0], s = 0;
    for (int i = 1; i < n; i++) m = fmax(m, x[i]);
    for (int i = 0; i < n; i++) s += out[i] = exp(x[i] - m);
    for (int i = 0; i < n; i++) out[i] /= s;
}

static double ref_sigmoid(double x) { return 1 / (1 + exp(-x)); }

/* moe_utils.sinkhorn with tolerance tol (Megatron's: 1e-4); returns the iterations it took. */
static int ref_sinkhorn(const double *logits, int T, int E, double tol, double *out) {
    double d0[MAXT], d1[MAXE], old[MAXE], error = 1e9;
    int it = 0;
    for (int e = 0; e < E; e++) d1[e] = old[e] = 1;
    for (; error > tol; it++) {
        for (int t = 0; t < T; t++) {
            double s = 0;
            for (int e = 0; e < E; e++) s += d1[e] * exp(logits[t * E + e]);
            d0[t] = 1.0 / T / (s + 1e-8);
        }
        error = 0;
        for (int e = 0; e < E; e++) {
            double s = 0;
            for (int t = 0; t < T; t++) s += d0[t] * exp(logits[t * E + e]);
            d1[e] = 1.0 / E / (s + 1e-8);
            error += fabs(old[e] - d1[e]) / E, old[e] = d1[e];
        }
    }
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) out[t * E + e] = d1[e] * exp(logits[t * E + e]) * d0[t];
    return it;
}

typedef struct {
    double probs[MAXT * MAXE];
    uint8_t map[MAXT * MAXE];
    int64_t tpe[MAXE];
    double aux, z;
} ref_t;

static void ref_route(const lt_moe_router_cfg *c, const double *logits, int T, int E, ref_t *r) {
    const int k = c->topk, tpcp = c->tp_cp_size > 1 ? c->tp_cp_size : 1;
    memset(r, 0, sizeof *r);
    /* z_loss_func: mean(logsumexp^2) x coeff / tp_cp */
    double zs = 0;
    for (int t = 0; t < T; t++) {
        const double *l = logits + t * E;
        double m = l[0], s = 0;
        for (int e = 1; e < E; e++) m = fmax(m, l[e]);
        for (int e = 0; e < E; e++) s += exp(l[e] - m);
        zs += (m + log(s)) * (m + log(s));
    }
    r->z = zs / T * (c->z_loss_coeff / tpcp);
    /* sinkhorn_load_balancing: top-k of sinkhorn (training) or of the activation (eval), the activation's
     * values there */
    double norm[MAXT * MAXE];
    if (c->load_balancing == 3 && !c->eval) ref_sinkhorn(logits, T, E, 1e-4, norm);
    for (int t = 0; c->load_balancing == 3 && t < T; t++) {
        double act[MAXE];
        int idx[MAXE];
        if (k > 1) ref_softmax(logits + t * E, E, act);
        for (int e = 0; k == 1 && e < E; e++) act[e] = ref_sigmoid(logits[t * E + e]);
        ref_topk(c->eval ? act : norm + t * E, E, k, idx);
        for (int j = 0; j < k; j++) r->probs[t * E + idx[j]] = act[idx[j]], r->map[t * E + idx[j]] = 1;
    }
    /* topk_routing_with_score_function */
    for (int t = 0; c->load_balancing != 3 && t < T; t++) {
        const double *l = logits + t * E;
        double sc[MAXE], p[MAXE], v[MAXE];
        int idx[MAXE];
        if (!c->sigmoid && c->pre_softmax) {
            ref_softmax(l, E, sc);
            ref_topk(sc, E, k, idx);
            for (int j = 0; j < k; j++) p[j] = sc[idx[j]];
        } else if (!c->sigmoid) {
            ref_topk(l, E, k, idx);
            for (int j = 0; j < k; j++) v[j] = l[idx[j]];
            ref_softmax(v, k, p);
        } else {
            for (int e = 0; e < E; e++)
                sc[e] = ref_sigmoid(l[e]), v[e] = sc[e] + (c->expert_bias ? c->expert_bias[e] : 0);
            ref_topk(v, E, k, idx);
            double s = 0;
            for (int j = 0; j < k; j++) s += p[j] = sc[idx[j]];
            for (int j = 0; k > 1 && j < k; j++) p[j] /= s + 1e-20;
        }
        for (int j = 0; j < k; j++) {
            r->probs[t * E + idx[j]] = c->topk_scaling_factor ? p[j] * c->topk_scaling_factor : p[j];
            r->map[t * E + idx[j]] = 1;
        }
    }
    /* apply_router_token_dropping */
    if (c->capacity_factor > 0) {
        const int cap = (int)ceil((double)(T * k) / E * c->capacity_factor);
        uint8_t mask[MAXT * MAXE];
        for (int e = 0; e < E; e++) {
            double col[MAXT] = {0};
            int idx[MAXT];
            for (int t = 0; t < T; t++) col[t] = c->drop_by_position ? r->map[t * E + e] : r->probs[t * E + e];
            if (cap <= T) ref_topk(col, T, cap, idx);
            for (int t = 0; t < T; t++) mask[t * E + e] = cap > T;
            for (int j = 0; cap <= T && j < cap; j++) mask[idx[j] * E + e] = 1;
        }
        for (int i = 0; i < T * E; i++) {
            r->map[i] = c->pad_to_capacity ? mask[i] : r->map[i] && mask[i];
            r->probs[i] *= r->map[i];
        }
    }
    for (int i = 0; i < T * E; i++) r->tpe[i % E] += r->map[i];
    /* compute_routing_scores_for_aux_loss + switch_load_balancing_loss_func (seq: [S, B E], / B) */
    if (c->load_balancing && c->load_balancing != 3 && c->aux_loss_coeff > 0) {
        const int seq = c->load_balancing == 2, global = c->load_balancing == 4;
        const int B = seq ? c->micro_batch_size : 1, ncol = B * E;
        double agg[MAXT * MAXE] = {0}, cnt[MAXT * MAXE] = {0};
        for (int t = 0; t < T; t++) {
            double sc[MAXE];
            int idx[MAXE];
            if (!c->sigmoid) ref_softmax(logits + t * E, E, sc);
            else {
                double s = 0;
                for (int e = 0; e < E; e++) s += sc[e] = ref_sigmoid(logits[t * E + e]);
                for (int e = 0; e < E; e++) sc[e] /= s + 1e-20;
            }
            ref_topk(sc, E, k, idx);
            const int b = seq ? t % B : 0;
            for (int e = 0; e < E; e++) agg[b * E + e] += sc[e];
            for (int j = 0; j < k; j++) cnt[b * E + idx[j]] += 1;
        }
        if (c->aux_counts && !global)
            for (int i = 0; i < ncol; i++) cnt[i] = (double)c->aux_counts[i];
        if (c->global_counts && global)
            for (int i = 0; i < ncol; i++) cnt[i] = c->global_counts[i];
        const double n = (double)(seq ? c->seq_length : T) *
                         (global ? (c->tp_dp_cp_size > 1 ? c->tp_dp_cp_size : 1) : tpcp);
        double s = 0;
        for (int i = 0; i < ncol; i++) s += agg[i] * cnt[i];
        r->aux = s * (E * c->aux_loss_coeff / (k * n * n)) / B;
    }
}

/* ---- hand-computed cases ---- */

static lt_moe_router_cfg base(int topk) {
    return (lt_moe_router_cfg){.topk = topk, .tp_cp_size = 1};
}

static void row_is(const out_t *o, int t, int E, const double *want, const char *what) {
    int ok = 1;
    for (int e = 0; e < E; e++) {
        ok &= close_to(o->probs[t * E + e], want[e], 1e-6);
        ok &= o->map[t * E + e] == (want[e] != 0);
    }
    TAP_CHECK(ok, "%s: token %d probs %.7f %.7f %.7f %.7f", what, t, o->probs[t * E], o->probs[t * E + 1],
              E > 2 ? o->probs[t * E + 2] : 0.0, E > 3 ? o->probs[t * E + 3] : 0.0);
}

static void score_functions(void) {
    out_t o;
    const double L3 = log(3.0), L2 = log(2.0), L5 = log(5.0);
    const double a = 1 / (1 + exp(-1.0)); /* softmax([3, 2]) = (a, 1 - a) */
    {   /* softmax after top-k, k = 2; a tie over three experts goes to the two lowest */
        lt_moe_router_cfg c = base(2);
        const float l[] = {1, 3, 2, 0, 2, 2, 2, 1};
        route(&c, l, 2, 4, &o);
        row_is(&o, 0, 4, (double[]){0, a, 1 - a, 0}, "softmax top-2");
        row_is(&o, 1, 4, (double[]){0.5, 0.5, 0, 0}, "softmax top-2, a three-way tie");
        TAP_CHECK(o.tpe[0] == 1 && o.tpe[1] == 2 && o.tpe[2] == 1 && o.tpe[3] == 0, "tokens per expert 1 2 1 0");
        TAP_CHECK(o.aux == 0 && o.z == 0, "no losses when off");
        c.topk_scaling_factor = 2.5f;
        route(&c, l, 2, 4, &o);
        row_is(&o, 0, 4, (double[]){0, 2.5 * a, 2.5 * (1 - a), 0}, "softmax top-2 x scaling factor 2.5");
    }
    {   /* pre-softmax: softmax over all (exps 1 2 5 1 / 9), top-k, no renormalisation */
        lt_moe_router_cfg c = base(1);
        c.pre_softmax = 1;
        const float l[] = {0, (float)L2, (float)L5, 0};
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){0, 0, 5 / 9.0, 0}, "pre-softmax top-1");
        c.topk = 3;
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){1 / 9.0, 2 / 9.0, 5 / 9.0, 0}, "pre-softmax top-3 (tie 1/9: the lower index)");
    }
    {   /* sigmoid: scores .5 .75 .25 .5 */
        lt_moe_router_cfg c = base(2);
        c.sigmoid = 1;
        const float l[] = {0, (float)L3, (float)-L3, 0};
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){0.4, 0.6, 0, 0}, "sigmoid top-2 normalised (tie .5: expert 0)");
        const float bias[] = {0, 0, 0.6f, 0.1f}; /* biased .5 .75 .85 .6: picks 2 and 1, probs unbiased */
        c.expert_bias = bias;
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){0, 0.75, 0.25, 0}, "sigmoid top-2 with expert bias");
        c.topk_scaling_factor = 2;
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){0, 1.5, 0.5, 0}, "sigmoid top-2, bias, scaling factor 2");
        c.topk = 1, c.topk_scaling_factor = 0, c.expert_bias = NULL;
        route(&c, l, 1, 4, &o);
        row_is(&o, 0, 4, (double[]){0, 0.75, 0, 0}, "sigmoid top-1: the score itself");
    }
}

/* p at expert 0 and 1 - p at expert 1 under pre-softmax. */
static void two_way(float *row, double p) { row[0] = (float)log(p), row[1] = (float)log(1 - p); }

static void map_col(const out_t *o, int T, int E, int e, const char *want, const char *what) {
    char got[MAXT + 1];
    for (int t = 0; t < T; t++) got[t] = (char)('0' + o->map[t * E + e]);
    got[T] = 0;
    TAP_CHECK(strcmp(got, want) == 0, "%s: expert %d map %s (want %s)", what, e, got, want);
}

static void dropping(void) {
    out_t o;
    float l[8];
    const double p[] = {0.9, 0.6, 0.8, 0.7}; /* every token prefers expert 0 */
    for (int t = 0; t < 4; t++) two_way(l + 2 * t, p[t]);
    lt_moe_router_cfg c = base(1);
    c.pre_softmax = 1, c.capacity_factor = 1.0; /* capacity ceil(4 x 1 / 2 x 1) = 2 */
    route(&c, l, 4, 2, &o);
    map_col(&o, 4, 2, 0, "1010", "drop by probs");
    TAP_CHECK(o.tpe[0] == 2 && o.tpe[1] == 0 && close_to(o.probs[2 * 2], 0.8, 1e-6) && o.probs[1 * 2] == 0,
              "drop by probs: tokens per expert 2 0, kept probs, dropped zeros");
    c.drop_by_position = 1;
    route(&c, l, 4, 2, &o);
    map_col(&o, 4, 2, 0, "1100", "drop by position");
    c.pad_to_capacity = 1;
    route(&c, l, 4, 2, &o);
    map_col(&o, 4, 2, 0, "1100", "position + padding");
    map_col(&o, 4, 2, 1, "1100", "position + padding (empty expert padded with the earliest)");
    TAP_CHECK(o.tpe[0] == 2 && o.tpe[1] == 2 && o.probs[1] == 0 && o.probs[3] == 0,
              "padding: every expert at capacity, padded entries prob 0");
    c.drop_by_position = 0;
    route(&c, l, 4, 2, &o);
    map_col(&o, 4, 2, 0, "1010", "probs + padding");
    map_col(&o, 4, 2, 1, "1100", "probs + padding (zeros tie: the lowest tokens)");
    /* a column short of the capacity is filled by padding: expert 1 gets token 1 routed + token 0 */
    two_way(l + 2, 0.3);
    route(&c, l, 4, 2, &o);
    map_col(&o, 4, 2, 1, "1100", "padding fills a short column");
    TAP_CHECK(close_to(o.probs[3], 0.7, 1e-6) && o.probs[1] == 0, "padding: the routed token keeps its prob");
    two_way(l + 2, 0.6);
    c.pad_to_capacity = 0, c.capacity_factor = 2.0; /* capacity 4 = T: nothing dropped */
    route(&c, l, 4, 2, &o);
    TAP_CHECK(o.tpe[0] == 4 && o.tpe[1] == 0, "capacity = T: nothing dropped");
    c.capacity_factor = 3.0, c.pad_to_capacity = 1; /* capacity 6 > T: the mask is all ones */
    route(&c, l, 4, 2, &o);
    TAP_CHECK(o.tpe[0] == 4 && o.tpe[1] == 4 && o.probs[1] == 0, "capacity > T with padding: every token everywhere");
    /* the capacity is a double product: (10 x 2 / 2) x 0.3 = 3 exactly (a float 0.3 would give 4) */
    float l10[20];
    for (int i = 0; i < 20; i++) l10[i] = (float)(i % 3) * 0.1f;
    lt_moe_router_cfg d = base(2);
    d.capacity_factor = 0.3;
    route(&d, l10, 10, 2, &o);
    TAP_CHECK(o.tpe[0] == 3 && o.tpe[1] == 3, "capacity ceil(10 x 0.3) = 3 (got %lld %lld)", (long long)o.tpe[0],
              (long long)o.tpe[1]);
}

static void losses(void) {
    out_t o;
    const float L3 = (float)log(3.0);
    lt_moe_router_cfg c = base(1);
    c.pre_softmax = 1, c.load_balancing = 1, c.aux_loss_coeff = 0.1;
    {   /* softmax .75 .25 twice: agg 1.5 .5, counts 2 0: E c / (k T^2) x 3 = 1.5 c */
        const float l[] = {L3, 0, L3, 0};
        route(&c, l, 2, 2, &o);
        TAP_CHECK(close_to(o.aux, 0.15, 1e-6), "aux_loss 1.5 coeff (got %.8f)", o.aux);
        const float m[] = {L3, 0, 0, L3}; /* balanced: agg 1 1, counts 1 1: c */
        route(&c, m, 2, 2, &o);
        TAP_CHECK(close_to(o.aux, 0.1, 1e-6), "aux_loss balanced = coeff (got %.8f)", o.aux);
        int64_t counts[2], global[2] = {3, 1};
        char err[128];
        lt_moe_aux_counts(&c, l, 2, 2, counts, err, sizeof err);
        TAP_CHECK(counts[0] == 2 && counts[1] == 0 && lt_moe_aux_counts_len(&c, 2) == 2, "aux counts 2 0");
        /* summed over TP x CP of 2: T' = 4, counts 3 1: 2 c / 16 x (1.5 x 3 + .5 x 1) = 0.625 c */
        c.tp_cp_size = 2;
        counts[0] = counts[1] = -1;
        TAP_CHECK(lt_moe_aux_counts(&c, l, 2, 2, counts, err, sizeof err) == 0 && counts[0] == 2 && counts[1] == 0,
                  "a rank's own aux counts under TP x CP, before they are summed");
        c.aux_counts = global;
        route(&c, l, 2, 2, &o);
        TAP_CHECK(close_to(o.aux, 0.0625, 1e-6), "aux_loss with counts over TP x CP (got %.8f)", o.aux);
        c.tp_cp_size = 1, c.aux_counts = NULL;
    }
    {   /* seq_aux_loss, S = 2, B = 2, t = s B + b: b = 0 tokens 0, 2 (agg 1.5 .5, counts 2 0: 3),
         * b = 1 tokens 1, 3 (agg 1 1, counts 1 1: 2); E c / (k S^2) x 5 / B = 1.25 c */
        const float l[] = {L3, 0, L3, 0, L3, 0, 0, L3};
        c.load_balancing = 2, c.seq_length = 2, c.micro_batch_size = 2;
        route(&c, l, 4, 2, &o);
        TAP_CHECK(close_to(o.aux, 0.125, 1e-6), "seq_aux_loss 1.25 coeff (got %.8f)", o.aux);
        int64_t counts[4];
        char err[128];
        lt_moe_aux_counts(&c, l, 4, 2, counts, err, sizeof err);
        TAP_CHECK(counts[0] == 2 && counts[1] == 0 && counts[2] == 1 && counts[3] == 1 &&
                      lt_moe_aux_counts_len(&c, 2) == 4, "seq aux counts by (b, e): 2 0 1 1");
        c.load_balancing = 1; /* the same tokens as one batch: agg 2.5 1.5, counts 3 1: 2 c / 16 x 9 = 1.125 c */
        route(&c, l, 4, 2, &o);
        TAP_CHECK(close_to(o.aux, 0.1125, 1e-6), "aux_loss of the same tokens 1.125 coeff (got %.8f)", o.aux);
        /* the aux loss counts its own top-k before dropping: capacity 1 drops, the loss stays */
        c.capacity_factor = 0.5;
        route(&c, l, 4, 2, &o);
        TAP_CHECK(o.tpe[0] == 1 && o.tpe[1] == 1 && close_to(o.aux, 0.1125, 1e-6),
                  "dropping leaves the aux loss's counts alone (tpe %lld %lld, aux %.8f)", (long long)o.tpe[0],
                  (long long)o.tpe[1], o.aux);
        c.load_balancing = 0;
        route(&c, l, 4, 2, &o);
        TAP_CHECK(o.aux == 0, "load balancing none: no aux loss");
    }
    {   /* sigmoid aux scores are normalised over all experts and ignore the expert bias */
        lt_moe_router_cfg s = base(1);
        s.sigmoid = 1, s.load_balancing = 1, s.aux_loss_coeff = 1;
        const float bias[] = {0, 1};
        s.expert_bias = bias;
        const float l[] = {L3, -L3}; /* sigmoid .75 .25: normalised .75 .25; the bias routes to expert 1 */
        route(&s, l, 1, 2, &o);
        TAP_CHECK(o.map[1] == 1 && close_to(o.probs[1], 0.25, 1e-6) && close_to(o.aux, 2 * 0.75, 1e-6),
                  "sigmoid: biased routing, unbiased aux counts (aux %.8f)", o.aux);
    }
    {   /* z-loss: lse ln 2 and ln 4: coeff (ln2^2 + 4 ln2^2) / 2 */
        lt_moe_router_cfg z = base(2);
        z.z_loss_coeff = 0.01;
        const float l[] = {0, 0, L3, 0};
        route(&z, l, 2, 2, &o);
        const double want = 0.01 * 2.5 * log(2.0) * log(2.0);
        TAP_CHECK(close_to(o.z, want, 1e-6), "z-loss %.9f (want %.9f)", o.z, want);
        z.tp_cp_size = 2;
        route(&z, l, 2, 2, &o);
        TAP_CHECK(close_to(o.z, want / 2, 1e-6), "z-loss coefficient over TP x CP");
    }
}

/* The balanced scaling of exp(logits) = a_t K_te b_e / 3, K doubly stochastic, is K / 3 (rows and columns
 * summing to 1/3). b pulls every token's largest logit to expert 0; sinkhorn's picks are K's. */
static const double SK[3][3] = {{.6, .3, .1}, {.1, .6, .3}, {.3, .1, .6}};

static void sinkhorn_cases(void) {
    const double a[3] = {1, 2, .5}, b[3] = {10, 1, 1};
    float l[9], norm[9];
    double ld[9], want[9];
    for (int t = 0; t < 3; t++)
        for (int e = 0; e < 3; e++) l[t * 3 + e] = (float)log(a[t] * SK[t][e] * b[e] / 3), ld[t * 3 + e] = l[t * 3 + e];
    char err[256] = "";
    TAP_CHECK(lt_moe_sinkhorn(l, 3, 3, norm, err, sizeof err) == 0, "sinkhorn runs %s", err);
    const int iters = ref_sinkhorn(ld, 3, 3, 1e-4, want);
    double off_ref = 0, off_k = 0;
    for (int i = 0; i < 9; i++)
        off_ref = fmax(off_ref, fabs(norm[i] - want[i])), off_k = fmax(off_k, fabs(norm[i] - SK[i / 3][i % 3] / 3));
    TAP_CHECK(off_ref < 2e-7, "sinkhorn = the plain loops at tolerance 1e-4 (%d iterations; off by %.2e)", iters,
              off_ref);
    /* stopped where Megatron stops: near K / 3 but not at it (the next iterations would move it) */
    TAP_CHECK(off_k > 2e-6 && off_k < 1e-4, "sinkhorn balances to K / 3 within Megatron's tolerance (off by %.2e)",
              off_k);
    out_t o;
    lt_moe_router_cfg c = base(1); /* top-1 softmax without pre_softmax: Megatron's check spares sinkhorn */
    c.load_balancing = 3;
    TAP_CHECK(route(&c, l, 3, 3, &o) == 0, "sinkhorn top-1 needs no pre_softmax");
    double s[3];
    for (int t = 0; t < 3; t++) {
        double row[3] = {0};
        row[t] = ref_sigmoid(l[t * 3 + t]);
        row_is(&o, t, 3, row, "sinkhorn top-1: K's largest, the sigmoid of its logit");
    }
    TAP_CHECK(o.tpe[0] == 1 && o.tpe[1] == 1 && o.tpe[2] == 1 && o.aux == 0, "sinkhorn top-1: one token each, no aux");
    c.eval = 1; /* outside training: the activation's top-1, expert 0 for all */
    route(&c, l, 3, 3, &o);
    for (int t = 0; t < 3; t++) row_is(&o, t, 3, (double[]){ref_sigmoid(l[t * 3]), 0, 0}, "sinkhorn top-1, eval");
    c = base(2);
    c.load_balancing = 3;
    route(&c, l, 3, 3, &o);
    const int pick[3][2] = {{0, 1}, {1, 2}, {2, 0}};
    for (int t = 0; t < 3; t++) {
        double row[3] = {0};
        ref_softmax(ld + t * 3, 3, s);
        for (int j = 0; j < 2; j++) row[pick[t][j]] = s[pick[t][j]];
        row_is(&o, t, 3, row, "sinkhorn top-2: K's two largest, softmax over all three there");
    }
    out_t ignored; /* sinkhorn_load_balancing does not look at the score function's options */
    const float bias[3] = {5, 0, 0};
    c.sigmoid = 1, c.expert_bias = bias, c.topk_scaling_factor = 3, c.pre_softmax = 1;
    route(&c, l, 3, 3, &ignored);
    TAP_CHECK(memcmp(ignored.probs, o.probs, sizeof(float) * 9) == 0 && memcmp(ignored.map, o.map, 9) == 0,
              "sinkhorn ignores sigmoid, expert bias, scaling factor and pre-softmax");
    c = base(2);
    c.z_loss_coeff = 0.01;
    route(&c, l, 3, 3, &ignored);
    c.load_balancing = 3;
    route(&c, l, 3, 3, &o);
    TAP_CHECK(o.z == ignored.z && o.z > 0, "sinkhorn keeps the z-loss (%.8f)", o.z);
    /* backward: only the activation at the map's entries, by hand for token 0 (k = 2, softmax s):
     * dl_e = s_e (g_e - sum g s) with g = dprobs on the map; sinkhorn's scaling passes nothing */
    float dp[9], dl[9];
    for (int i = 0; i < 9; i++) dp[i] = (float)(i % 4) - 1.5f;
    c.z_loss_coeff = 0;
    route(&c, l, 3, 3, &o);
    lt_moe_route_backward(&c, l, NULL, o.map, NULL, 3, 3, dp, 0, 0, dl, err, sizeof err);
    ref_softmax(ld, 3, s);
    const double dot = dp[0] * s[0] + dp[1] * s[1];
    TAP_CHECK(close_to(dl[0], s[0] * (dp[0] - dot), 1e-5) && close_to(dl[1], s[1] * (dp[1] - dot), 1e-5) &&
                  close_to(dl[2], -s[2] * dot, 1e-5),
              "sinkhorn backward by hand: %.7f %.7f %.7f", dl[0], dl[1], dl[2]);
    c = base(1);
    c.load_balancing = 3;
    route(&c, l, 3, 3, &o);
    lt_moe_route_backward(&c, l, NULL, o.map, NULL, 3, 3, dp, 0, 0, dl, err, sizeof err);
    const double sg = ref_sigmoid(ld[0]);
    TAP_CHECK(close_to(dl[0], dp[0] * sg * (1 - sg), 1e-5) && dl[1] == 0 && dl[2] == 0,
              "sinkhorn top-1 backward: the sigmoid's at the chosen expert only");
}

static void global_aux_cases(void) {
    out_t o;
    const float L3 = (float)log(3.0), l[] = {L3, 0, L3, 0}; /* softmax .75 .25 twice: agg 1.5 .5 */
    lt_moe_router_cfg c = base(1);
    c.pre_softmax = 1, c.load_balancing = 4, c.aux_loss_coeff = 0.1;
    route(&c, l, 2, 2, &o);
    TAP_CHECK(close_to(o.aux, 0.15, 1e-6), "global_aux_loss at one rank, first microbatch = aux_loss (got %.8f)",
              o.aux);
    /* the tracker: counts 3 1 then 2 2 over TP x DP x CP average to 2.5 1.5 */
    float sum[2] = {0, 0}, steps = 0, avg[2];
    lt_moe_global_counts_add(sum, &steps, (int64_t[]){3, 1}, 2, avg);
    TAP_CHECK(avg[0] == 3 && avg[1] == 1 && steps == 1, "tracker after one microbatch: 3 1");
    lt_moe_global_counts_add(sum, &steps, (int64_t[]){2, 2}, 2, avg);
    TAP_CHECK(avg[0] == 2.5f && avg[1] == 1.5f && steps == 2 && sum[0] == 5, "tracker after two: 2.5 1.5");
    /* over TP x DP x CP of 2: T' = 4: E c / (k T'^2) (1.5 x 2.5 + .5 x 1.5) = 2 c / 16 x 4.5 = 0.5625 c;
     * the TP x CP counts and size are not the global loss's */
    const int64_t wrong[2] = {100, 100};
    c.tp_dp_cp_size = 2, c.global_counts = avg, c.tp_cp_size = 4, c.aux_counts = wrong;
    route(&c, l, 2, 2, &o);
    TAP_CHECK(close_to(o.aux, 0.05625, 1e-6), "global_aux_loss with averaged counts over TP x DP x CP (got %.8f)",
              o.aux);
    int64_t counts[2] = {-1, -1};
    char err[256] = "";
    c.global_counts = NULL;
    TAP_CHECK(lt_moe_aux_counts_len(&c, 2) == 2 && lt_moe_aux_counts(&c, l, 2, 2, counts, err, sizeof err) == 0 &&
                  counts[0] == 2 && counts[1] == 0,
              "a rank's own global aux counts, before they are summed: 2 0 %s", err);
    c.global_counts = avg;
    /* backward by hand: g_e = daux x 2 c / 16 x avg_e = (.03125, .01875); softmax (.75, .25): dot .028125 */
    float dp[4] = {0}, dl[4];
    lt_moe_route_backward(&c, l, NULL, o.map, NULL, 2, 2, dp, 1, 0, dl, err, sizeof err);
    TAP_CHECK(close_to(dl[0], 0.00234375, 1e-5) && close_to(dl[1], -0.00234375, 1e-5) &&
                  close_to(dl[2], 0.00234375, 1e-5),
              "global_aux_loss backward by hand: %.8f %.8f", dl[0], dl[1]);
}

/* ---- random configurations: reference forward and finite differences ---- */

/* Marks a case that takes an expert bias (random_case draws one); also what the checks refuse. */
static const float some_bias[MAXE];

static uint64_t rng = 88172645463325252ull;
static double uniform(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static double ref_loss(const lt_moe_router_cfg *c, const double *l, int T, int E, const float *dp, float daux,
                       float dz) {
    ref_t r;
    ref_route(c, l, T, E, &r);
    double s = daux * r.aux + dz * r.z;
    for (int i = 0; i < T * E; i++) s += dp[i] * r.probs[i];
    return s;
}

static void random_case(const char *name, lt_moe_router_cfg c, int T, int E) {
    float l[MAXT * MAXE], dp[MAXT * MAXE], dl[MAXT * MAXE], bias[MAXE];
    double ld[MAXT * MAXE] = {0};
    for (int i = 0; i < T * E; i++) l[i] = (float)(4 * uniform() - 2), dp[i] = (float)(2 * uniform() - 1);
    for (int e = 0; e < E; e++) bias[e] = (float)(0.3 * uniform());
    if (c.expert_bias) c.expert_bias = bias;
    for (int i = 0; i < T * E; i++) ld[i] = l[i];
    out_t o;
    ref_t r;
    if (route(&c, l, T, E, &o)) {
        TAP_CHECK(0, "%s: forward", name);
        return;
    }
    ref_route(&c, ld, T, E, &r);
    int map_ok = 1, p_ok = 1, tpe_ok = 1;
    for (int i = 0; i < T * E; i++) map_ok &= o.map[i] == r.map[i], p_ok &= fabs(o.probs[i] - r.probs[i]) < 1e-6;
    for (int e = 0; e < E; e++) tpe_ok &= o.tpe[e] == r.tpe[e];
    TAP_CHECK(map_ok && p_ok && tpe_ok && close_to(o.aux, r.aux, 1e-5) && close_to(o.z, r.z, 1e-5),
              "%s: forward = reference (map %d probs %d tpe %d aux %.7g/%.7g z %.7g/%.7g)", name, map_ok, p_ok, tpe_ok,
              o.aux, r.aux, o.z, r.z);
    const float daux = 0.7f, dz = 1.3f;
    char err[256] = "";
    if (lt_moe_route_backward(&c, l, o.probs, o.map, o.tpe, T, E, dp, daux, dz, dl, err, sizeof err)) {
        TAP_CHECK(0, "%s: backward: %s", name, err);
        return;
    }
    double worst = 0, scale = 0;
    const double h = 1e-5;
    for (int i = 0; i < T * E; i++) {
        const double keep = ld[i];
        ld[i] = keep + h;
        const double up = ref_loss(&c, ld, T, E, dp, daux, dz);
        ld[i] = keep - h;
        const double down = ref_loss(&c, ld, T, E, dp, daux, dz);
        ld[i] = keep;
        const double fd = (up - down) / (2 * h);
        worst = fmax(worst, fabs(fd - dl[i]));
        scale = fmax(scale, fabs(fd));
    }
    TAP_CHECK(scale > 0 && worst <= 1e-4 * scale + 1e-6, "%s: backward = finite differences (worst %.2e of %.2e)", name,
              worst, scale);
}

static void random_cases(void) {
    struct {
        const char *name;
        lt_moe_router_cfg c;
        int T, E;
    } cases[] = {
        {"softmax top-2", {.topk = 2}, 12, 6},
        {"softmax top-3 x 1.7", {.topk = 3, .topk_scaling_factor = 1.7f}, 12, 6},
        {"pre-softmax top-1", {.topk = 1, .pre_softmax = 1}, 12, 6},
        {"pre-softmax top-2", {.topk = 2, .pre_softmax = 1}, 12, 6},
        {"sigmoid top-1", {.topk = 1, .sigmoid = 1}, 12, 6},
        {"sigmoid top-2 bias x 2.5", {.topk = 2, .sigmoid = 1, .expert_bias = some_bias, .topk_scaling_factor = 2.5f},
         12, 6},
        {"softmax top-2 drop by probs", {.topk = 2, .capacity_factor = 0.8}, 12, 6},
        {"softmax top-2 drop by position", {.topk = 2, .capacity_factor = 0.8, .drop_by_position = 1}, 12, 6},
        {"pre-softmax top-2 drop by probs, padded", {.topk = 2, .pre_softmax = 1, .capacity_factor = 0.8,
                                                     .pad_to_capacity = 1}, 12, 6},
        {"sigmoid top-2 drop by position, padded", {.topk = 2, .sigmoid = 1, .capacity_factor = 1.2,
                                                    .drop_by_position = 1, .pad_to_capacity = 1}, 12, 6},
        {"softmax top-2 aux_loss", {.topk = 2, .load_balancing = 1, .aux_loss_coeff = 0.01}, 12, 6},
        {"sigmoid top-2 aux_loss", {.topk = 2, .sigmoid = 1, .load_balancing = 1, .aux_loss_coeff = 0.05}, 12, 6},
        {"softmax top-2 seq_aux_loss", {.topk = 2, .load_balancing = 2, .aux_loss_coeff = 0.01, .seq_length = 6,
                                        .micro_batch_size = 2}, 12, 6},
        {"sigmoid top-3 seq_aux_loss", {.topk = 3, .sigmoid = 1, .load_balancing = 2, .aux_loss_coeff = 0.02,
                                        .seq_length = 4, .micro_batch_size = 3}, 12, 6},
        {"softmax top-2 z-loss", {.topk = 2, .z_loss_coeff = 0.001}, 12, 6},
        {"everything: pre-softmax top-2, drop by probs, aux, z, TP x CP 1",
         {.topk = 2, .pre_softmax = 1, .capacity_factor = 1.0, .load_balancing = 1, .aux_loss_coeff = 0.1,
          .z_loss_coeff = 0.01, .topk_scaling_factor = 1.5f}, 16, 8},
        {"everything: sigmoid top-2 bias, position, padded, seq aux, z",
         {.topk = 2, .sigmoid = 1, .expert_bias = some_bias, .capacity_factor = 0.9, .drop_by_position = 1,
          .pad_to_capacity = 1, .load_balancing = 2, .aux_loss_coeff = 0.1, .z_loss_coeff = 0.01,
          .seq_length = 8, .micro_batch_size = 2}, 16, 8},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        random_case(cases[i].name, cases[i].c, cases[i].T, cases[i].E);
    /* counts over TP x CP given by the caller: the gradient uses them too */
    int64_t counts[8] = {5, 1, 3, 0, 2, 4, 6, 3};
    random_case("softmax top-2 aux_loss with TP x CP counts",
                (lt_moe_router_cfg){.topk = 2, .load_balancing = 1, .aux_loss_coeff = 0.1, .tp_cp_size = 2,
                                    .aux_counts = counts, .z_loss_coeff = 0.01},
                12, 8);
    /* sinkhorn: forward = the reference's sinkhorn at Megatron's tolerance; its finite differences see only
     * the activation (the picks are constant near the point), as no_grad gives */
    random_case("sinkhorn top-1", (lt_moe_router_cfg){.topk = 1, .load_balancing = 3}, 12, 6);
    random_case("sinkhorn top-2 z-loss", (lt_moe_router_cfg){.topk = 2, .load_balancing = 3, .z_loss_coeff = 0.01},
                12, 6);
    random_case("sinkhorn top-3, score options ignored",
                (lt_moe_router_cfg){.topk = 3, .load_balancing = 3, .sigmoid = 1, .expert_bias = some_bias,
                                    .topk_scaling_factor = 2}, 16, 8);
    random_case("sinkhorn top-2 eval", (lt_moe_router_cfg){.topk = 2, .load_balancing = 3, .eval = 1}, 12, 6);
    random_case("sinkhorn top-2 TP x CP 2, 64 tokens",
                (lt_moe_router_cfg){.topk = 2, .load_balancing = 3, .z_loss_coeff = 0.01, .tp_cp_size = 2}, 64, 8);
    /* global aux: the caller's averaged counts over TP x DP x CP enter the gradient too */
    const float avg[8] = {10.5f, 3, 7.25f, 0, 4.5f, 12, 1.75f, 9};
    random_case("softmax top-2 global_aux_loss, TP x DP x CP 4",
                (lt_moe_router_cfg){.topk = 2, .load_balancing = 4, .aux_loss_coeff = 0.1, .tp_dp_cp_size = 4,
                                    .global_counts = avg, .tp_cp_size = 2, .z_loss_coeff = 0.01}, 12, 8);
    random_case("sigmoid top-2 bias global_aux_loss, drop by probs, own counts",
                (lt_moe_router_cfg){.topk = 2, .sigmoid = 1, .expert_bias = some_bias, .load_balancing = 4,
                                    .aux_loss_coeff = 0.05, .capacity_factor = 0.8}, 12, 6);
}

static void checks(void) {
    struct {
        lt_moe_router_cfg c;
        int T, E;
        const char *want;
    } bad[] = {
        {{.topk = 5}, 4, 4, "moe_router_topk (5) is larger than num_moe_experts (4)"},
        {{.topk = 0}, 4, 4, "moe_router_topk must be at least 1"},
        {{.topk = 1}, 4, 4, "Please use --moe-router-pre-softmax when topk is 1."},
        {{.topk = 2, .expert_bias = some_bias}, 4, 4, "Expert bias for aux-loss-free routing only supports"},
        {{.topk = 2, .pad_to_capacity = 1}, 4, 4, "moe_expert_capacity_factor must be set to use"},
        {{.topk = 2, .load_balancing = 5}, 4, 4, "load_balancing must be 0"},
        {{.topk = 2, .load_balancing = 3, .capacity_factor = 1}, 4, 4,
         "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, global_aux_loss or none"},
        {{.topk = 2, .load_balancing = 3, .aux_loss_coeff = 0.01}, 4, 4, "Sinkhorn routing does not support aux loss."},
        {{.topk = 2, .load_balancing = 4, .aux_loss_coeff = 1, .tp_dp_cp_size = 2}, 4, 4,
         "needs the averaged counts summed over it (global_counts)"},
        {{.topk = 2, .load_balancing = 2, .aux_loss_coeff = 1, .seq_length = 3, .micro_batch_size = 2}, 4, 4,
         "seq_aux_loss needs seq_length x micro_batch_size"},
        {{.topk = 2, .load_balancing = 1, .aux_loss_coeff = 1, .tp_cp_size = 2}, 4, 4, "needs the counts summed"},
        {{.topk = 2}, 0, 4, "the router needs tokens and experts"},
    };
    float l[16] = {0};
    out_t o;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char err[512] = "";
        const int rc = lt_moe_route_forward(&bad[i].c, l, bad[i].T, bad[i].E, o.probs, o.map, o.tpe, &o.aux, &o.z, err,
                                            sizeof err);
        TAP_CHECK(rc == -1 && strstr(err, bad[i].want), "refused: %s", err);
    }
}

int main(void) {
    score_functions();
    dropping();
    losses();
    sinkhorn_cases();
    global_aux_cases();
    random_cases();
    checks();
    return tap_done();
}

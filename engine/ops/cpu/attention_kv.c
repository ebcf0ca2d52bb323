/* Block attention with global positions: the pieces of ring attention (context parallelism, ops.h).
 * A clear row-at-a-time implementation: per query row the allowed scores of the block (k_pos[j] <=
 * q_pos[i]), their softmax over this block alone, and in backward this block's share of the gradient
 * from the final (merged) out and lse. The dropout mask is drawn at global (position, position)
 * indices, so the blocks of a ring draw exactly the elements lt_attention_forward draws on the whole
 * sequence. OpenMP over (b, h) rows in forward and over (b, g) kv groups in backward, where a task owns
 * its group's dK, dV rows and its heads' dq rows: no atomics, deterministic. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/rng.h"
#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

typedef struct {
    int B, Tq, Tk, H, G, D, hpg, S;
    size_t qrs, krs; /* floats per token row of qkv and of kv */
    float scale, p, inv_keep;
    uint64_t key;
    int h0, HT;
} lt_kv_dims;

static lt_kv_dims lt_kv_make(int B, int Tq, int Tk, int H, int G, int D, int S, float p, uint64_t key, int h0,
                             int HT) {
    lt_kv_dims d = {B, Tq, Tk, H, G, D, H / G, S};
    d.qrs = (size_t)(H + 2 * G) * D;
    d.krs = (size_t)2 * G * D;
    d.scale = 1.0f / sqrtf((float)D);
    d.p = p;
    d.inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    d.key = key, d.h0 = h0, d.HT = HT;
    return d;
}
static inline size_t lt_kv_q_off(const lt_kv_dims *d, int b, int i, int h) {
    return ((size_t)b * d->Tq + i) * d->qrs + (size_t)((h / d->hpg) * (d->hpg + 2) + h % d->hpg) * d->D;
}
/* group g's key row j in kv; its value row follows at + D */
static inline size_t lt_kv_k_off(const lt_kv_dims *d, int b, int j, int g) {
    return ((size_t)b * d->Tk + j) * d->krs + (size_t)g * 2 * d->D;
}
/* The dropout factor of element (b, h, i, j): 0 or 1/(1-p), at the global mask index of ops.h. */
static inline float lt_kv_keep(const lt_kv_dims *d, int b, int h, int qp, int kp) {
    if (d->p <= 0.0f) return 1.0f;
    const uint64_t mh = (uint64_t)b * d->HT + d->h0 + h, S = (uint64_t)d->S;
    return lt_rng_uniform(d->key, (mh * S + (uint64_t)qp) * S + (uint64_t)kp) < d->p ? 0.0f : d->inv_keep;
}
/* s[j] = scale * q . k_j for the allowed keys, -INFINITY for the others; returns the row max. */
static float lt_kv_scores(const lt_kv_dims *d, float *s, const float *q, const float *kv, int b, int g, int qp,
                          const int32_t *k_pos) {
    float m = -INFINITY;
    for (int j = 0; j < d->Tk; j++) {
        if (k_pos[j] > qp) {
            s[j] = -INFINITY;
            continue;
        }
        const float *k = kv + lt_kv_k_off(d, b, j, g);
        float dot = 0.0f;
        for (int e = 0; e < d->D; e++) dot += q[e] * k[e];
        s[j] = d->scale * dot;
        m = s[j] > m ? s[j] : m;
    }
    return m;
}
static float *lt_kv_scratch(size_t n) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    if (!p) abort(); /* ops have no error channel */
    return p;
}
static inline int lt_kv_threaded(const lt_kv_dims *d) {
    return (int64_t)d->B * d->H * d->Tq * d->Tk * d->D >= 8 * (int64_t)LT_PAR_MIN;
}

void lt_attention_kv_forward(float *out, float *lse, const float *qkv, const float *kv, int B, int Tq, int Tk, int H,
                             int G, int D, const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                             uint64_t dropout_key, int head_offset, int heads_total) {
    const lt_kv_dims dm = lt_kv_make(B, Tq, Tk, H, G, D, S, dropout_p, dropout_key, head_offset, heads_total);
#pragma omp parallel if (lt_kv_threaded(&dm))
    {
        float *s = lt_kv_scratch((size_t)Tk);
        double *acc = malloc(sizeof(double) * (size_t)D);
        if (!acc) abort();
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H, g = h / dm.hpg;
            for (int i = 0; i < Tq; i++) {
                const float *q = qkv + lt_kv_q_off(&dm, b, i, h);
                float *o = out + (((size_t)b * Tq + i) * H + h) * D;
                const float m = lt_kv_scores(&dm, s, q, kv, b, g, q_pos[i], k_pos);
                if (m == -INFINITY) { /* no key of this block is visible to the row */
                    lse[(size_t)bh * Tq + i] = -INFINITY;
                    memset(o, 0, sizeof(float) * D);
                    continue;
                }
                double l = 0.0;
                for (int e = 0; e < D; e++) acc[e] = 0.0;
                for (int j = 0; j < Tk; j++) {
                    if (s[j] == -INFINITY) continue;
                    const float pe = expf(s[j] - m);
                    l += pe;
                    const float w = pe * lt_kv_keep(&dm, b, h, q_pos[i], k_pos[j]);
                    if (w == 0.0f) continue;
                    const float *v = kv + lt_kv_k_off(&dm, b, j, g) + D;
                    for (int e = 0; e < D; e++) acc[e] += (double)w * v[e];
                }
                lse[(size_t)bh * Tq + i] = m + (float)log(l);
                for (int e = 0; e < D; e++) o[e] = (float)(acc[e] / l);
            }
        }
        free(s), free(acc);
    }
}

void lt_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b, int B, int T, int H, int D) {
#pragma omp parallel for schedule(static) if ((int64_t)B * T * H * D >= LT_PAR_MIN)
    for (int bth = 0; bth < B * T * H; bth++) {
        const int b = bth / (T * H), t = (bth / H) % T, h = bth % H;
        float *l = lse + ((size_t)b * H + h) * T + t;
        const float lb = lse_b[((size_t)b * H + h) * T + t];
        float *o = out + (size_t)bth * D;
        const float *ob = out_b + (size_t)bth * D;
        if (lb == -INFINITY) continue; /* the block saw nothing: keep the running result */
        if (*l == -INFINITY) {         /* nothing so far: take the block's */
            memcpy(o, ob, sizeof(float) * D);
            *l = lb;
            continue;
        }
        const float mx = *l > lb ? *l : lb, mn = *l > lb ? lb : *l;
        const float ln = mx + log1pf(expf(mn - mx));
        const float w = expf(*l - ln), wb = expf(lb - ln);
        for (int e = 0; e < D; e++) o[e] = o[e] * w + ob[e] * wb;
        *l = ln;
    }
}

void lt_attention_kv_backward(float *dq, float *dkv, const float *dout, const float *qkv, const float *kv,
                              const float *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                              const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                              uint64_t dropout_key, int head_offset, int heads_total) {
    const lt_kv_dims dm = lt_kv_make(B, Tq, Tk, H, G, D, S, dropout_p, dropout_key, head_offset, heads_total);
#pragma omp parallel if (lt_kv_threaded(&dm))
    {
        float *s = lt_kv_scratch((size_t)Tk);
        double *dqa = malloc(sizeof(double) * (size_t)D);
        if (!dqa) abort();
#pragma omp for schedule(dynamic, 1)
        for (int bg = 0; bg < B * G; bg++) {
            const int b = bg / G, g = bg % G;
            for (int j = 0; j < Tk; j++) memset(dkv + lt_kv_k_off(&dm, b, j, g), 0, sizeof(float) * 2 * D);
            for (int hh = 0; hh < dm.hpg; hh++) { /* the group's query heads, in order */
                const int h = g * dm.hpg + hh;
                for (int i = 0; i < Tq; i++) {
                    const float l = lse[((size_t)b * H + h) * Tq + i];
                    if (l == -INFINITY) continue; /* a row that sees no key anywhere: no gradient */
                    const float *q = qkv + lt_kv_q_off(&dm, b, i, h);
                    const float *go = dout + (((size_t)b * Tq + i) * H + h) * D;
                    const float *o = out + (((size_t)b * Tq + i) * H + h) * D;
                    float delta = 0.0f;
                    for (int e = 0; e < D; e++) delta += go[e] * o[e];
                    lt_kv_scores(&dm, s, q, kv, b, g, q_pos[i], k_pos);
                    for (int e = 0; e < D; e++) dqa[e] = 0.0;
                    for (int j = 0; j < Tk; j++) {
                        if (s[j] == -INFINITY) continue;
                        float *dk = dkv + lt_kv_k_off(&dm, b, j, g), *dv = dk + D;
                        const float *k = kv + lt_kv_k_off(&dm, b, j, g), *v = k + D;
                        const float pr = expf(s[j] - l), f = lt_kv_keep(&dm, b, h, q_pos[i], k_pos[j]);
                        float dp = 0.0f;
                        for (int e = 0; e < D; e++) dp += go[e] * v[e];
                        const float ds = pr * (dp * f - delta), pf = pr * f, dss = dm.scale * ds;
                        for (int e = 0; e < D; e++) {
                            dqa[e] += (double)ds * k[e];
                            dk[e] += dss * q[e];
                            dv[e] += pf * go[e];
                        }
                    }
                    float *dqr = dq + lt_kv_q_off(&dm, b, i, h);
                    for (int e = 0; e < D; e++) dqr[e] += (float)(dm.scale * dqa[e]);
                }
            }
        }
        free(s), free(dqa);
    }
}

/* Block attention with global positions: the pieces of ring attention (context parallelism, ops.h).
 * Flash-attention style like attention.c, with its register-tiled kernel over packed, zero-padded
 * copies of Q, K, V (attention_tile.h). The causal diagonal becomes a mask by positions, k_pos[j] <=
 * q_pos[i]: per (row tile, column tile) the positions' ranges say whether the tile is entirely masked
 * (skipped: no scores, no products), entirely allowed (no per-element mask) or mixed. Positions need
 * not be ascending or contiguous for the results; ascending runs (a ring block's two chunks) are what
 * makes most tiles one or the other. The dropout mask is drawn at global (position, position) indices,
 * so the blocks of a ring draw exactly the elements lt_attention_forward draws on the whole sequence.
 * OpenMP over (b, h) tasks (in forward also over query blocks when heads are few); every output row
 * and every dK, dV scratch row belongs to one task and is computed in a fixed order: no atomics,
 * results independent of the thread count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ops/cpu/attention_tile.h"
#include "engine/ops/cpu/parallel.h"
#include "engine/ops/cpu/simd_math.h"
#include "engine/ops/ops.h"

#define LT_RT (LT_BR / LT_MR) /* row tiles per query block */
#define LT_NOKEY INT32_MAX    /* the position of a padding key: above every query's */

typedef struct {
    int B, Tq, Tk, H, G, D, hpg, S;
    int Dp, Tqp, Tkp, ldk, nct; /* padded sizes; ldk: leading dim of Tk-wide buffers (see attention.c); nct
                                 * column tiles */
    size_t qrs, krs;            /* floats per token row of qkv and of kv */
    float scale, p, inv_keep;
    uint64_t key;
    int h0, HT;
    int32_t *kp;          /* [Tkp] key positions, LT_NOKEY on the padding */
    int32_t *kmin, *kmax; /* [nct] each column tile's range of positions */
    int *krun;            /* [nct] leading keys of the tile at consecutive positions (one dropout fill) */
} lt_kv_dims;

static lt_kv_dims lt_kv_make(int B, int Tq, int Tk, int H, int G, int D, const int32_t *k_pos, int S, float p,
                             uint64_t key, int h0, int HT) {
    lt_kv_dims d = {B, Tq, Tk, H, G, D, H / G, S};
    d.Dp = lt_round_up(D, LT_NR);
    d.Tqp = lt_round_up(Tq, LT_NR);
    d.Tkp = lt_round_up(Tk, LT_NR);
    d.ldk = d.Tkp + LT_NR;
    d.nct = d.Tkp / LT_NR;
    d.qrs = (size_t)(H + 2 * G) * D;
    d.krs = (size_t)2 * G * D;
    d.scale = 1.0f / sqrtf((float)D);
    d.p = p;
    d.inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    d.key = key, d.h0 = h0, d.HT = HT;
    d.kp = malloc(sizeof(int32_t) * (d.Tkp + 2 * d.nct) + sizeof(int) * (d.nct + 1));
    if (!d.kp) abort(); /* ops have no error channel */
    d.kmin = d.kp + d.Tkp, d.kmax = d.kmin + d.nct, d.krun = (int *)(d.kmax + d.nct);
    for (int j = 0; j < d.Tkp; j++) d.kp[j] = j < Tk ? k_pos[j] : LT_NOKEY;
    for (int c = 0; c < d.nct; c++) {
        const int32_t *k = d.kp + c * LT_NR;
        int32_t lo = k[0], hi = k[0];
        int run = 1;
        while (run < LT_NR && k[run] != LT_NOKEY && k[run] == k[0] + run) run++;
        for (int t = 1; t < LT_NR; t++) lo = k[t] < lo ? k[t] : lo, hi = k[t] > hi ? k[t] : hi;
        d.kmin[c] = lo, d.kmax[c] = hi, d.krun[c] = run;
    }
    return d;
}
static inline size_t lt_kv_q_off(const lt_kv_dims *d, int b, int i, int h) {
    return ((size_t)b * d->Tq + i) * d->qrs + (size_t)((h / d->hpg) * (d->hpg + 2) + h % d->hpg) * d->D;
}
/* group g's key row j in kv; its value row follows at + D */
static inline size_t lt_kv_k_off(const lt_kv_dims *d, int b, int j, int g) {
    return ((size_t)b * d->Tk + j) * d->krs + (size_t)g * 2 * d->D;
}
static inline int lt_kv_threaded(const lt_kv_dims *d) {
    return (int64_t)d->B * d->H * d->Tq * d->Tk * d->D >= 8 * (int64_t)LT_PAR_MIN;
}

/* Which tiles of one query block (rows i0 .. i0+nr) meet an allowed key: a row tile's positions span
 * [qlo, qhi]; column tile c is live for it iff kmin[c] <= qhi. Its live tiles as runs of consecutive
 * columns [run[2k], run[2k+1]), so products walk them without touching the masked tiles between. */
typedef struct {
    int nrt;
    int32_t qlo[LT_RT], qhi[LT_RT];
    int nrun[LT_RT];
    int *run;            /* [LT_RT][nct + 1] */
    unsigned char *live; /* [LT_RT][nct] */
} lt_kv_tiles;

static void lt_kv_tiles_of(lt_kv_tiles *t, const lt_kv_dims *d, const int32_t *q_pos, int i0, int nr) {
    t->nrt = lt_round_up(nr, LT_MR) / LT_MR;
    for (int rt = 0; rt < t->nrt; rt++) {
        const int r1 = lt_imin((rt + 1) * LT_MR, nr);
        int32_t lo = q_pos[i0 + rt * LT_MR], hi = lo;
        for (int r = rt * LT_MR + 1; r < r1; r++) {
            const int32_t q = q_pos[i0 + r];
            lo = q < lo ? q : lo, hi = q > hi ? q : hi;
        }
        t->qlo[rt] = lo, t->qhi[rt] = hi;
        unsigned char *live = t->live + (size_t)rt * d->nct;
        int *run = t->run + (size_t)rt * (d->nct + 1), n = 0;
        for (int c = 0; c < d->nct; c++) live[c] = d->kmin[c] <= hi;
        for (int c = 0; c < d->nct; c++) {
            if (live[c] && (c == 0 || !live[c - 1])) run[2 * n] = c * LT_NR;
            if (live[c] && (c == d->nct - 1 || !live[c + 1])) run[2 * n + 1] = (c + 1) * LT_NR, n++;
        }
        t->nrun[rt] = n;
    }
}
static inline const int *lt_kv_runs(const lt_kv_tiles *t, const lt_kv_dims *d, int rt) {
    return t->run + (size_t)rt * (d->nct + 1);
}
static void lt_kv_tiles_alloc(lt_kv_tiles *t, const lt_kv_dims *d) {
    t->run = malloc(sizeof(int) * LT_RT * (d->nct + 1));
    t->live = malloc((size_t)LT_RT * d->nct + 1);
    if (!t->run || !t->live) abort();
}
static void lt_kv_tiles_free(lt_kv_tiles *t) { free(t->run), free(t->live); }

/* u[j] for the keys of column tile c = the uniform of element (row's mask base, k_pos[j]) (ops.h): one
 * vectorised fill over the tile's consecutive positions, single draws for the rest. */
static inline void lt_kv_uniform(const lt_kv_dims *d, float *u, uint64_t base, int c) {
    const int j0 = c * LT_NR, n = d->krun[c];
    lt_uniform_fill(u + j0, d->key, base + (uint64_t)d->kp[j0], n);
    for (int j = j0 + n; j < j0 + LT_NR; j++)
        u[j] = d->kp[j] == LT_NOKEY ? 1.0f : lt_uniform_inline(d->key, base + (uint64_t)d->kp[j]);
}
/* the mask row of (b, h, query position qp): element k_pos of it at base + k_pos */
static inline uint64_t lt_kv_mask_base(const lt_kv_dims *d, int b, int h, int32_t qp) {
    const uint64_t S = (uint64_t)d->S;
    return (((uint64_t)b * d->HT + d->h0 + h) * S + (uint64_t)qp) * S;
}

/* ---------------- forward ---------------- */

void lt_attention_kv_forward(float *out, float *lse, const float *qkv, const float *kv, int B, int Tq, int Tk, int H,
                             int G, int D, const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                             uint64_t dropout_key, int head_offset, int heads_total) {
    const lt_kv_dims dm =
        lt_kv_make(B, Tq, Tk, H, G, D, k_pos, S, dropout_p, dropout_key, head_offset, heads_total);
    const int Dp = dm.Dp, Tkp = dm.Tkp, ldk = dm.ldk, nqb = (Tq + LT_BR - 1) / LT_BR;
    const int32_t *kp = dm.kp;
    /* as attention.c: a task is (b, h) and all its query blocks, or one query block when (b, h) pairs
     * are too few to keep the threads busy (a block's result does not depend on which) */
    const int split = !lt_kv_threaded(&dm) || B * H >= 2 * lt_max_threads() ? 1 : nqb;
    const int ntask = B * H * split;
#pragma omp parallel if (lt_kv_threaded(&dm))
    {
        float *Qs = lt_scratch((size_t)LT_BR * Dp), *Kt = lt_scratch((size_t)Dp * ldk);
        float *V = lt_scratch((size_t)Tkp * Dp), *P = lt_scratch((size_t)LT_BR * ldk);
        float *O = lt_scratch((size_t)LT_BR * Dp), *U = dropout_p > 0.0f ? lt_scratch((size_t)Tkp) : NULL;
        lt_kv_tiles tl;
        lt_kv_tiles_alloc(&tl, &dm);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntask; task++) {
            /* the last query blocks (the highest positions: the most live tiles) are handed out first */
            const int chunk = split - 1 - task / (B * H), bh = task % (B * H), b = bh / H, h = bh % H, g = h / dm.hpg;
            const int qb0 = chunk * nqb / split, qb1 = (chunk + 1) * nqb / split;
            lt_pack_cols(Kt, ldk, kv + lt_kv_k_off(&dm, b, 0, g), dm.krs, Tk, Tkp, D, Dp);
            lt_pack_rows(V, kv + lt_kv_k_off(&dm, b, 0, g) + D, dm.krs, Tk, Tkp, D, Dp, 1.0f);
            for (int qb = qb0; qb < qb1; qb++) {
                const int i0 = qb * LT_BR, nr = lt_imin(LT_BR, Tq - i0), mr = lt_round_up(nr, LT_MR);
                lt_pack_rows(Qs, qkv + lt_kv_q_off(&dm, b, i0, h), dm.qrs, nr, mr, D, Dp, dm.scale);
                lt_kv_tiles_of(&tl, &dm, q_pos, i0, nr);
                /* scores of the live tiles */
                for (int rt = 0; rt < tl.nrt; rt++) {
                    const int r0 = rt * LT_MR, *run = lt_kv_runs(&tl, &dm, rt);
                    for (int k = 0; k < tl.nrun[rt]; k++)
                        for (int j0 = run[2 * k]; j0 < run[2 * k + 1]; j0 += LT_NR)
                            lt_tile_mm(P + (size_t)r0 * ldk + j0, ldk, Qs + (size_t)r0 * Dp, Dp, 1, Kt + j0, ldk, 0, Dp,
                                       0);
                }
                /* softmax of each row over its allowed keys, saved lse, dropout; masked entries of live
                 * tiles become 0 */
                for (int r = 0; r < mr; r++) {
                    const int rt = r / LT_MR, nrun = tl.nrun[rt], *run = lt_kv_runs(&tl, &dm, rt);
                    float *row = P + (size_t)r * ldk;
                    const int32_t qp = r < nr ? q_pos[i0 + r] : 0;
                    float m = -INFINITY;
                    if (r < nr)
                        for (int k = 0; k < nrun; k++)
                            for (int j0 = run[2 * k]; j0 < run[2 * k + 1]; j0 += LT_NR) {
                                float *x = row + j0;
                                if (dm.kmax[j0 / LT_NR] > qp) { /* a mixed tile */
#pragma omp simd
                                    for (int j = 0; j < LT_NR; j++) x[j] = kp[j0 + j] <= qp ? x[j] : -INFINITY;
                                }
#pragma omp simd reduction(max : m)
                                for (int j = 0; j < LT_NR; j++) m = x[j] > m ? x[j] : m;
                            }
                    if (m == -INFINITY) { /* padding, or no key of this block is visible to the row */
                        if (r < nr) lse[(size_t)bh * Tq + i0 + r] = -INFINITY;
                        for (int k = 0; k < nrun; k++)
                            memset(row + run[2 * k], 0, sizeof(float) * (run[2 * k + 1] - run[2 * k]));
                        continue;
                    }
                    float l = 0.0f;
                    for (int k = 0; k < nrun; k++) {
#pragma omp simd reduction(+ : l)
                        for (int j = run[2 * k]; j < run[2 * k + 1]; j++) {
                            const float e = lt_exp(row[j] - m);
                            row[j] = e;
                            l += e;
                        }
                    }
                    lse[(size_t)bh * Tq + i0 + r] = m + logf(l);
                    const float inv = 1.0f / l;
                    if (dropout_p > 0.0f) {
                        const float kept = inv * dm.inv_keep;
                        const uint64_t base = lt_kv_mask_base(&dm, b, h, qp);
                        for (int k = 0; k < nrun; k++)
                            for (int j0 = run[2 * k]; j0 < run[2 * k + 1]; j0 += LT_NR) {
                                lt_kv_uniform(&dm, U, base, j0 / LT_NR);
#pragma omp simd
                                for (int j = j0; j < j0 + LT_NR; j++) row[j] = U[j] < dropout_p ? 0.0f : row[j] * kept;
                            }
                    } else {
                        for (int k = 0; k < nrun; k++) {
#pragma omp simd
                            for (int j = run[2 * k]; j < run[2 * k + 1]; j++) row[j] *= inv;
                        }
                    }
                }
                /* out block = P @ V over the live runs of each row tile */
                for (int rt = 0; rt < tl.nrt; rt++) {
                    const int r0 = rt * LT_MR, *run = lt_kv_runs(&tl, &dm, rt);
                    if (tl.nrun[rt] == 0) {
                        memset(O + (size_t)r0 * Dp, 0, sizeof(float) * LT_MR * Dp);
                        continue;
                    }
                    for (int d0 = 0; d0 < Dp; d0 += LT_NR)
                        for (int k = 0; k < tl.nrun[rt]; k++)
                            lt_tile_mm(O + (size_t)r0 * Dp + d0, Dp, P + (size_t)r0 * ldk, ldk, 1, V + d0, Dp, run[2 * k],
                                       run[2 * k + 1], k > 0);
                }
                for (int r = 0; r < nr; r++)
                    memcpy(out + (((size_t)b * Tq + i0 + r) * H + h) * D, O + (size_t)r * Dp, sizeof(float) * D);
            }
        }
        free(Qs), free(Kt), free(V), free(P), free(O), free(U);
        lt_kv_tiles_free(&tl);
    }
    free(dm.kp);
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


/* ---------------- backward ----------------
 * As attention.c's, on the live tiles: per query block, with P = exp(S - lse) (the FINAL lse),
 * Pd = P * mask / (1 - p), dPd = dO @ V^T, dP = dPd * mask / (1 - p), Di = dO_i . O_i:
 *   dV += Pd^T @ dO,  dS = P * (dP - Di),  dq += scale * dS @ K,  dK += dS^T @ (scale * Q),
 * dK and dV summed over the query blocks in the task's scratch, then written: straight into dkv
 * when a group has one head, else the group's heads summed in head order after the tasks. */
void lt_attention_kv_backward(float *dq, float *dkv, const float *dout, const float *qkv, const float *kv,
                              const float *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                              const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                              uint64_t dropout_key, int head_offset, int heads_total) {
    const lt_kv_dims dm =
        lt_kv_make(B, Tq, Tk, H, G, D, k_pos, S, dropout_p, dropout_key, head_offset, heads_total);
    const int Dp = dm.Dp, Tqp = dm.Tqp, Tkp = dm.Tkp, ldk = dm.ldk, nct = dm.nct, hpg = dm.hpg;
    const int nqb = (Tq + LT_BR - 1) / LT_BR;
    const int32_t *kp = dm.kp;
    const size_t kv_elems = (size_t)Tkp * Dp;
    float *gkv = hpg > 1 ? lt_scratch((size_t)B * H * 2 * kv_elems) : NULL;
#pragma omp parallel if (lt_kv_threaded(&dm))
    {
        float *Qs = lt_scratch((size_t)Tqp * Dp), *dO = lt_scratch((size_t)Tqp * Dp), *K = lt_scratch(kv_elems);
        float *dKl = lt_scratch(kv_elems), *dVl = lt_scratch(kv_elems);
        float *Kt = lt_scratch((size_t)Dp * ldk), *Vt = lt_scratch((size_t)Dp * ldk);
        float *P = lt_scratch((size_t)LT_BR * ldk), *dP = lt_scratch((size_t)LT_BR * ldk);
        float *dQb = lt_scratch((size_t)LT_BR * Dp), *Di = lt_scratch((size_t)Tqp);
        float *U = dropout_p > 0.0f ? lt_scratch((size_t)Tkp) : NULL;
        lt_kv_tiles tl;
        lt_kv_tiles_alloc(&tl, &dm);
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H, g = h / hpg;
            const float *kp0 = kv + lt_kv_k_off(&dm, b, 0, g), *lse_bh = lse + (size_t)bh * Tq;
            lt_pack_rows(Qs, qkv + lt_kv_q_off(&dm, b, 0, h), dm.qrs, Tq, Tqp, D, Dp, dm.scale);
            lt_pack_rows(K, kp0, dm.krs, Tk, Tkp, D, Dp, 1.0f);
            lt_pack_cols(Kt, ldk, kp0, dm.krs, Tk, Tkp, D, Dp);
            lt_pack_cols(Vt, ldk, kp0 + D, dm.krs, Tk, Tkp, D, Dp);
            lt_pack_rows(dO, dout + ((size_t)b * Tq * H + h) * D, (size_t)H * D, Tq, Tqp, D, Dp, 1.0f);
            for (int t = 0; t < Tq; t++) {
                const float *o = out + (((size_t)b * Tq + t) * H + h) * D, *go = dO + (size_t)t * Dp;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int e = 0; e < D; e++) s += o[e] * go[e];
                Di[t] = s;
            }
            memset(dKl, 0, sizeof(float) * kv_elems);
            memset(dVl, 0, sizeof(float) * kv_elems);
            for (int qb = 0; qb < nqb; qb++) {
                const int i0 = qb * LT_BR, nr = lt_imin(LT_BR, Tq - i0), mr = lt_round_up(nr, LT_MR);
                lt_kv_tiles_of(&tl, &dm, q_pos, i0, nr);
                /* S = Qs K^T and dPd = dO V^T on the live tiles */
                for (int rt = 0; rt < tl.nrt; rt++) {
                    const int r0 = rt * LT_MR, *run = lt_kv_runs(&tl, &dm, rt);
                    for (int k = 0; k < tl.nrun[rt]; k++)
                        for (int j0 = run[2 * k]; j0 < run[2 * k + 1]; j0 += LT_NR) {
                            lt_tile_mm(P + (size_t)r0 * ldk + j0, ldk, Qs + (size_t)(i0 + r0) * Dp, Dp, 1, Kt + j0, ldk,
                                       0, Dp, 0);
                            lt_tile_mm(dP + (size_t)r0 * ldk + j0, ldk, dO + (size_t)(i0 + r0) * Dp, Dp, 1, Vt + j0,
                                       ldk, 0, Dp, 0);
                        }
                }
                /* P becomes Pd, dP becomes dS, row by row; masked entries, padding rows and rows that see
                 * no key anywhere (lse -inf: no gradient) become 0 */
                for (int r = 0; r < mr; r++) {
                    const int rt = r / LT_MR, nrun = tl.nrun[rt], *run = lt_kv_runs(&tl, &dm, rt);
                    float *p = P + (size_t)r * ldk, *dp = dP + (size_t)r * ldk;
                    const int i = i0 + r;
                    if (r >= nr || lse_bh[i] == -INFINITY) {
                        for (int k = 0; k < nrun; k++) {
                            const size_t n = sizeof(float) * (run[2 * k + 1] - run[2 * k]);
                            memset(p + run[2 * k], 0, n), memset(dp + run[2 * k], 0, n);
                        }
                        continue;
                    }
                    const int32_t qp = q_pos[i];
                    const float l = lse_bh[i], di = Di[i];
                    const uint64_t base = lt_kv_mask_base(&dm, b, h, qp);
                    for (int k = 0; k < nrun; k++)
                        for (int j0 = run[2 * k]; j0 < run[2 * k + 1]; j0 += LT_NR) {
                            float *x = p + j0, *y = dp + j0;
                            const int mixed = dm.kmax[j0 / LT_NR] > qp;
                            if (dropout_p > 0.0f) {
                                lt_kv_uniform(&dm, U, base, j0 / LT_NR);
                                const float *u = U + j0;
#pragma omp simd
                                for (int j = 0; j < LT_NR; j++) {
                                    const float pr = lt_exp(x[j] - l), f = u[j] < dropout_p ? 0.0f : dm.inv_keep;
                                    x[j] = pr * f;
                                    y[j] = pr * (y[j] * f - di);
                                }
                            } else {
#pragma omp simd
                                for (int j = 0; j < LT_NR; j++) {
                                    const float pr = lt_exp(x[j] - l);
                                    x[j] = pr;
                                    y[j] = pr * (y[j] - di);
                                }
                            }
                            if (mixed) {
#pragma omp simd
                                for (int j = 0; j < LT_NR; j++)
                                    if (kp[j0 + j] > qp) x[j] = 0.0f, y[j] = 0.0f;
                            }
                        }
                }
                /* dV += Pd^T dO and dK += dS^T Qs (P, dP read transposed), per MR keys over the query
                 * rows from the first row tile that can see one of them to the last live one */
                for (int c = 0; c < nct; c++) {
                    int rs = 0, re = tl.nrt;
                    while (rs < re && !tl.live[(size_t)rs * nct + c]) rs++;
                    while (re > rs && !tl.live[(size_t)(re - 1) * nct + c]) re--;
                    if (rs == re) continue;
                    for (int rt = rs + 1; rt < re - 1; rt++) /* masked tiles between live ones hold no scores */
                        if (!tl.live[(size_t)rt * nct + c])
                            for (int r = rt * LT_MR; r < (rt + 1) * LT_MR; r++) {
                                memset(P + (size_t)r * ldk + c * LT_NR, 0, sizeof(float) * LT_NR);
                                memset(dP + (size_t)r * ldk + c * LT_NR, 0, sizeof(float) * LT_NR);
                            }
                    for (int j = c * LT_NR; j < (c + 1) * LT_NR; j += LT_MR) {
                        int32_t kl = kp[j];
                        for (int t = 1; t < LT_MR; t++) kl = kp[j + t] < kl ? kp[j + t] : kl;
                        int ks = rs;
                        while (ks < re && tl.qhi[ks] < kl) ks++;
                        if (ks == re) continue;
                        for (int d0 = 0; d0 < Dp; d0 += LT_NR) {
                            lt_tile_mm(dVl + (size_t)j * Dp + d0, Dp, P + j, 1, ldk, dO + (size_t)i0 * Dp + d0, Dp,
                                       ks * LT_MR, re * LT_MR, 1);
                            lt_tile_mm(dKl + (size_t)j * Dp + d0, Dp, dP + j, 1, ldk, Qs + (size_t)i0 * Dp + d0, Dp,
                                       ks * LT_MR, re * LT_MR, 1);
                        }
                    }
                }
                /* dq += scale * dS K over the live runs */
                for (int rt = 0; rt < tl.nrt; rt++) {
                    const int r0 = rt * LT_MR, *run = lt_kv_runs(&tl, &dm, rt);
                    if (tl.nrun[rt] == 0) continue;
                    for (int d0 = 0; d0 < Dp; d0 += LT_NR)
                        for (int k = 0; k < tl.nrun[rt]; k++)
                            lt_tile_mm(dQb + (size_t)r0 * Dp + d0, Dp, dP + (size_t)r0 * ldk, ldk, 1, K + d0, Dp,
                                       run[2 * k], run[2 * k + 1], k > 0);
                    for (int r = r0; r < lt_imin(r0 + LT_MR, nr); r++) {
                        float *dqr = dq + lt_kv_q_off(&dm, b, i0 + r, h);
                        const float *s = dQb + (size_t)r * Dp;
#pragma omp simd
                        for (int e = 0; e < D; e++) dqr[e] += dm.scale * s[e];
                    }
                }
            }
            if (hpg == 1) { /* this task owns the kv group: store straight into dkv */
                for (int t = 0; t < Tk; t++) {
                    float *dk = dkv + lt_kv_k_off(&dm, b, t, g);
                    memcpy(dk, dKl + (size_t)t * Dp, sizeof(float) * D);
                    memcpy(dk + D, dVl + (size_t)t * Dp, sizeof(float) * D);
                }
            } else {
                memcpy(gkv + (size_t)bh * 2 * kv_elems, dKl, sizeof(float) * kv_elems);
                memcpy(gkv + ((size_t)bh * 2 + 1) * kv_elems, dVl, sizeof(float) * kv_elems);
            }
        }
        free(Qs), free(dO), free(K), free(dKl), free(dVl), free(Kt), free(Vt);
        free(P), free(dP), free(dQb), free(Di), free(U);
        lt_kv_tiles_free(&tl);
    }
    if (gkv) {
#pragma omp parallel for schedule(static) if (lt_kv_threaded(&dm))
        for (int bgt = 0; bgt < B * G * Tk; bgt++) {
            const int b = bgt / (G * Tk), g = (bgt / Tk) % G, t = bgt % Tk;
            float *dk = dkv + lt_kv_k_off(&dm, b, t, g);
            const size_t bh0 = (size_t)b * H + (size_t)g * hpg;
            lt_sum_group_heads(dk, dk + D, gkv + bh0 * 2 * kv_elems + (size_t)t * Dp, kv_elems, hpg, D);
        }
        free(gkv);
    }
    free(dm.kp);
}

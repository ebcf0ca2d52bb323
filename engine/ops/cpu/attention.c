/* Causal grouped-query attention on Megatron's fused QKV layout, flash-attention style:
 * the forward keeps only out and the per-row log-sum-exp; the backward recomputes the probabilities
 * block by block. Scores and products go through a small register-tiled kernel over packed,
 * zero-padded copies of Q, K, V (so every tile is full and the inner loops are contiguous). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ops/cpu/attention_tile.h"
#include "engine/ops/cpu/parallel.h"
#include "engine/ops/cpu/simd_math.h"
#include "engine/ops/ops.h"

/* Shape of one call and offsets into the fused qkv rows. */
typedef struct {
    int B, T, H, G, D, hpg; /* hpg: query heads per group */
    int Dp, Tp;             /* D and T padded to the tile sizes */
    int ldt;                /* leading dim of T-wide buffers: Tp plus a tile, so that walking down a
                             * column does not hit the same L1 sets every 4 KiB (T a power of two) */
    size_t rs;              /* floats per token row of qkv */
    float scale;
} lt_attn_dims;

static lt_attn_dims lt_attn_make(int B, int T, int H, int G, int D) {
    lt_attn_dims d;
    d.B = B, d.T = T, d.H = H, d.G = G, d.D = D, d.hpg = H / G;
    d.Dp = lt_round_up(D, LT_NR);
    d.Tp = lt_round_up(T, LT_NR);
    d.ldt = d.Tp + LT_NR;
    d.rs = (size_t)(H + 2 * G) * D;
    d.scale = 1.0f / sqrtf((float)D);
    return d;
}
/* Tiny problems (a few heads of a few tokens) run on the calling thread; see parallel.h. */
static inline int lt_attn_threaded(const lt_attn_dims *d) {
    return (int64_t)d->B * d->H * d->T * d->T * d->D >= 8 * (int64_t)LT_PAR_MIN;
}
static inline size_t lt_q_off(const lt_attn_dims *d, int b, int t, int h) {
    int g = h / d->hpg;
    return ((size_t)b * d->T + t) * d->rs + (size_t)(g * (d->hpg + 2) + h % d->hpg) * d->D;
}
static inline size_t lt_k_off(const lt_attn_dims *d, int b, int t, int g) {
    return ((size_t)b * d->T + t) * d->rs + (size_t)(g * (d->hpg + 2) + d->hpg) * d->D;
}

/* ---------------- forward ---------------- */

void lt_attention_forward(float *out, float *lse, const float *qkv, int B, int T, int H, int G, int D, float dropout_p,
                          uint64_t dropout_key, int head_offset, int heads_total) {
    const lt_attn_dims dm = lt_attn_make(B, T, H, G, D);
    const int Dp = dm.Dp, Tp = dm.Tp, ldt = dm.ldt, nqb = (T + LT_BR - 1) / LT_BR;
    /* A task is (b, h) and all its query blocks, so K and V are packed once; when (b, h) pairs are too
     * few to keep the threads busy, a task is one query block (repacking its keys). */
    const int split = !lt_attn_threaded(&dm) || B * H >= 2 * lt_max_threads() ? 1 : nqb;
    const int ntask = B * H * split;
    const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
#pragma omp parallel if (lt_attn_threaded(&dm))
    {
        float *Qs = lt_scratch((size_t)LT_BR * Dp), *Kt = lt_scratch((size_t)Dp * ldt);
        float *V = lt_scratch((size_t)Tp * Dp), *P = lt_scratch((size_t)LT_BR * ldt);
        float *O = lt_scratch((size_t)LT_BR * Dp), *U = dropout_p > 0.0f ? lt_scratch((size_t)Tp) : NULL;
        /* the heaviest (last) query blocks are handed out first, for load balance */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntask; task++) {
            const int chunk = split - 1 - task / (B * H), bh = task % (B * H), b = bh / H, h = bh % H, g = h / dm.hpg;
            const int qb0 = chunk * nqb / split, qb1 = (chunk + 1) * nqb / split;
            const uint64_t mh = (uint64_t)b * heads_total + head_offset + h; /* the head's mask row (ops.h) */
            { /* the keys of the task's last block, zero-padded to its tile columns */
                const int nk = lt_imin(qb1 * LT_BR, T), cols = lt_imin(lt_round_up(nk, LT_NR), Tp);
                lt_pack_cols(Kt, ldt, qkv + lt_k_off(&dm, b, 0, g), dm.rs, nk, cols, D, Dp);
                lt_pack_rows(V, qkv + lt_k_off(&dm, b, 0, g) + D, dm.rs, nk, cols, D, Dp, 1.0f);
            }
            for (int qb = qb0; qb < qb1; qb++) {
                const int i0 = qb * LT_BR, nr = lt_imin(LT_BR, T - i0), mr = lt_round_up(nr, LT_MR);
                const int nk = i0 + nr, kend = lt_imin(lt_round_up(i0 + mr, LT_NR), Tp);
                lt_pack_rows(Qs, qkv + lt_q_off(&dm, b, i0, h), dm.rs, nr, mr, D, Dp, dm.scale);
                /* scores, only the tiles that reach below the diagonal */
                for (int r0 = 0; r0 < mr; r0 += LT_MR) {
                    const int ncol = lt_imin(lt_round_up(i0 + r0 + LT_MR, LT_NR), kend);
                    for (int j0 = 0; j0 < ncol; j0 += LT_NR)
                        lt_tile_mm(P + (size_t)r0 * ldt + j0, ldt, Qs + (size_t)r0 * Dp, Dp, 1, Kt + j0, ldt, 0, Dp, 0);
                }
                /* softmax of each causal row, saved lse, dropout, zeros past the diagonal */
                for (int r = 0; r < mr; r++) {
                    float *row = P + (size_t)r * ldt;
                    const int i = i0 + r;
                    if (r >= nr) {
                        memset(row, 0, sizeof(float) * kend);
                        continue;
                    }
                    float m = row[0];
#pragma omp simd reduction(max : m)
                    for (int j = 1; j <= i; j++) m = row[j] > m ? row[j] : m;
                    float l = 0.0f;
#pragma omp simd reduction(+ : l)
                    for (int j = 0; j <= i; j++) {
                        const float e = lt_exp(row[j] - m);
                        row[j] = e;
                        l += e;
                    }
                    lse[((size_t)b * H + h) * T + i] = m + logf(l);
                    const float inv = 1.0f / l;
                    if (dropout_p > 0.0f) {
                        const float kept = inv * inv_keep;
                        lt_uniform_fill(U, dropout_key, (mh * T + i) * (uint64_t)T, i + 1);
#pragma omp simd
                        for (int j = 0; j <= i; j++) row[j] = U[j] < dropout_p ? 0.0f : row[j] * kept;
                    } else {
#pragma omp simd
                        for (int j = 0; j <= i; j++) row[j] *= inv;
                    }
                    for (int j = i + 1; j < kend; j++) row[j] = 0.0f;
                }
                /* out block = P @ V, keys limited to the causal range of each row tile */
                for (int r0 = 0; r0 < mr; r0 += LT_MR) {
                    const int kk = lt_imin(i0 + r0 + LT_MR, nk);
                    for (int d0 = 0; d0 < Dp; d0 += LT_NR)
                        lt_tile_mm(O + (size_t)r0 * Dp + d0, Dp, P + (size_t)r0 * ldt, ldt, 1, V + d0, Dp, 0, kk, 0);
                }
                for (int r = 0; r < nr; r++)
                    memcpy(out + (((size_t)b * T + i0 + r) * H + h) * D, O + (size_t)r * Dp, sizeof(float) * D);
            }
        }
        free(Qs), free(Kt), free(V), free(P), free(O), free(U);
    }
}

/* ---------------- backward ----------------
 * Per query block, with P = exp(S - lse), Pd = P * mask / (1 - p) (the probabilities forward used),
 * dPd = dO @ V^T, dP = dPd * mask / (1 - p), Di = dO_i . O_i = sum_j P_ij dP_ij:
 *   dV += Pd^T @ dO,  dS = P * (dP - Di),  dQ = scale * dS @ K,  dK += dS^T @ (scale * Q),
 * dK and dV summed over the query blocks in scratch. Every element of dqkv is then stored once
 * (written, not accumulated): each query row by its (b, h) task, each key / value row by its task
 * (one head per group) or by the group sum after the tasks. */

void lt_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse, int B,
                           int T, int H, int G, int D, float dropout_p, uint64_t dropout_key, int head_offset,
                           int heads_total) {
    const lt_attn_dims dm = lt_attn_make(B, T, H, G, D);
    const int Dp = dm.Dp, Tp = dm.Tp, ldt = dm.ldt, hpg = dm.hpg, nqb = (T + LT_BR - 1) / LT_BR;
    const float inv_keep = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
    const size_t kv_elems = (size_t)Tp * Dp;
    /* Heads sharing a kv group write their dK, dV here and are summed in a fixed order afterwards,
     * so tasks never write the same memory (no atomics, deterministic) and no zeroed dqkv is needed. */
    float *gkv = hpg > 1 ? lt_scratch((size_t)B * H * 2 * kv_elems) : NULL;
#pragma omp parallel if (lt_attn_threaded(&dm))
    {
        float *Qs = lt_scratch(kv_elems), *K = lt_scratch(kv_elems), *dO = lt_scratch(kv_elems);
        float *dKl = lt_scratch(kv_elems), *dVl = lt_scratch(kv_elems);
        float *Kt = lt_scratch((size_t)Dp * ldt), *Vt = lt_scratch((size_t)Dp * ldt);
        float *P = lt_scratch((size_t)LT_BR * ldt), *dP = lt_scratch((size_t)LT_BR * ldt);
        float *dQb = lt_scratch((size_t)LT_BR * Dp), *Di = lt_scratch((size_t)Tp);
        float *U = dropout_p > 0.0f ? lt_scratch((size_t)Tp) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H, g = h / hpg;
            const uint64_t mh = (uint64_t)b * heads_total + head_offset + h; /* the head's mask row (ops.h) */
            const float *kp = qkv + lt_k_off(&dm, b, 0, g);
            const float *lse_bh = lse + (size_t)bh * T;
            lt_pack_rows(Qs, qkv + lt_q_off(&dm, b, 0, h), dm.rs, T, Tp, D, Dp, dm.scale);
            lt_pack_rows(K, kp, dm.rs, T, Tp, D, Dp, 1.0f);
            lt_pack_cols(Kt, ldt, kp, dm.rs, T, Tp, D, Dp);
            lt_pack_cols(Vt, ldt, kp + D, dm.rs, T, Tp, D, Dp);
            lt_pack_rows(dO, dout + ((size_t)b * T * H + h) * D, (size_t)H * D, T, Tp, D, Dp, 1.0f);
            for (int t = 0; t < T; t++) {
                const float *o = out + (((size_t)b * T + t) * H + h) * D, *g_ = dO + (size_t)t * Dp;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += o[d] * g_[d];
                Di[t] = s;
            }
            memset(dKl, 0, sizeof(float) * kv_elems);
            memset(dVl, 0, sizeof(float) * kv_elems);
            for (int qb = 0; qb < nqb; qb++) {
                const int i0 = qb * LT_BR, nr = lt_imin(LT_BR, T - i0), mr = lt_round_up(nr, LT_MR);
                const int kend = lt_imin(lt_round_up(i0 + mr, LT_NR), Tp);
                /* S = Qs K^T and dPd = dO V^T, tiles reaching below the diagonal */
                for (int r0 = 0; r0 < mr; r0 += LT_MR) {
                    const int ncol = lt_imin(lt_round_up(i0 + r0 + LT_MR, LT_NR), kend);
                    for (int j0 = 0; j0 < ncol; j0 += LT_NR) {
                        lt_tile_mm(P + (size_t)r0 * ldt + j0, ldt, Qs + (size_t)(i0 + r0) * Dp, Dp, 1, Kt + j0, ldt, 0,
                                   Dp, 0);
                        lt_tile_mm(dP + (size_t)r0 * ldt + j0, ldt, dO + (size_t)(i0 + r0) * Dp, Dp, 1, Vt + j0, ldt, 0,
                                   Dp, 0);
                    }
                }
                /* P becomes Pd, dP becomes dS, row by row */
                for (int r = 0; r < mr; r++) {
                    float *p = P + (size_t)r * ldt, *dp = dP + (size_t)r * ldt;
                    const int i = i0 + r;
                    int jn = 0; /* entries j < jn are live */
                    if (r < nr) {
                        jn = i + 1;
                        const float l = lse_bh[i], di = Di[i];
                        if (dropout_p > 0.0f) {
                            lt_uniform_fill(U, dropout_key, (mh * T + i) * (uint64_t)T, i + 1);
#pragma omp simd
                            for (int j = 0; j <= i; j++) {
                                const float pr = lt_exp(p[j] - l);
                                const float f = U[j] < dropout_p ? 0.0f : inv_keep;
                                p[j] = pr * f;
                                dp[j] = pr * (dp[j] * f - di);
                            }
                        } else {
#pragma omp simd
                            for (int j = 0; j <= i; j++) {
                                const float pr = lt_exp(p[j] - l);
                                p[j] = pr;
                                dp[j] = pr * (dp[j] - di);
                            }
                        }
                    }
                    for (int j = jn; j < kend; j++) p[j] = 0.0f, dp[j] = 0.0f;
                }
                /* dV += Pd^T dO and dK += dS^T Qs (P, dP read transposed): key j only sees query rows i >= j */
                for (int j0 = 0; j0 < kend; j0 += LT_MR) {
                    const int ks = j0 > i0 ? j0 - i0 : 0;
                    if (ks >= mr) continue;
                    for (int d0 = 0; d0 < Dp; d0 += LT_NR) {
                        lt_tile_mm(dVl + (size_t)j0 * Dp + d0, Dp, P + j0, 1, ldt, dO + (size_t)i0 * Dp + d0, Dp, ks,
                                   mr, 1);
                        lt_tile_mm(dKl + (size_t)j0 * Dp + d0, Dp, dP + j0, 1, ldt, Qs + (size_t)i0 * Dp + d0, Dp, ks,
                                   mr, 1);
                    }
                }
                /* dQ block = scale * dS K */
                for (int r0 = 0; r0 < mr; r0 += LT_MR) {
                    const int kk = lt_imin(i0 + r0 + LT_MR, T);
                    for (int d0 = 0; d0 < Dp; d0 += LT_NR)
                        lt_tile_mm(dQb + (size_t)r0 * Dp + d0, Dp, dP + (size_t)r0 * ldt, ldt, 1, K + d0, Dp, 0, kk, 0);
                }
                for (int r = 0; r < nr; r++) {
                    float *dq = dqkv + lt_q_off(&dm, b, i0 + r, h);
                    const float *s = dQb + (size_t)r * Dp;
#pragma omp simd
                    for (int d = 0; d < D; d++) dq[d] = dm.scale * s[d];
                }
            }
            if (hpg == 1) { /* this task owns the kv group: store straight into dqkv */
                for (int t = 0; t < T; t++) {
                    float *dk = dqkv + lt_k_off(&dm, b, t, g), *dv = dk + D;
                    const float *sk = dKl + (size_t)t * Dp, *sv = dVl + (size_t)t * Dp;
#pragma omp simd
                    for (int d = 0; d < D; d++) dk[d] = sk[d], dv[d] = sv[d];
                }
            } else {
                memcpy(gkv + (size_t)bh * 2 * kv_elems, dKl, sizeof(float) * kv_elems);
                memcpy(gkv + ((size_t)bh * 2 + 1) * kv_elems, dVl, sizeof(float) * kv_elems);
            }
        }
        free(Qs), free(K), free(dO), free(dKl), free(dVl), free(Kt), free(Vt);
        free(P), free(dP), free(dQb), free(Di), free(U);
    }
    if (gkv) {
#pragma omp parallel for schedule(static) if (lt_attn_threaded(&dm))
        for (int bgt = 0; bgt < B * G * T; bgt++) {
            const int b = bgt / (G * T), g = (bgt / T) % G, t = bgt % T;
            float *dk = dqkv + lt_k_off(&dm, b, t, g);
            const size_t bh0 = (size_t)b * H + (size_t)g * hpg;
            lt_sum_group_heads(dk, dk + D, gkv + bh0 * 2 * kv_elems + (size_t)t * Dp, kv_elems, hpg, D);
        }
        free(gkv);
    }
}

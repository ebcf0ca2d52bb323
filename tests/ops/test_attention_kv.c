/* Block attention with global positions (lt_attention_kv_forward, lt_attention_merge,
 * lt_attention_kv_backward): the ring decomposition of context parallelism against lt_attention_forward /
 * lt_attention_backward on the whole sequence.
 *
 * A sequence of S = 2 CP L tokens; rank r holds chunks r and 2CP-1-r (its Tl = 2L local rows at global
 * positions pos_r). Each rank's queries meet every rank's kv block in ring order (its own first, then
 * r-1, r-2, ...), the block results merged with attention_merge; backward accumulates dq over the blocks
 * and sums each block's dkv at the block's owner. out, lse, dq, dk, dv must equal the whole sequence's at
 * those positions: MHA and GQA, dropout 0.3 (the masks must be the same elements) and none, CP = 2 and 4,
 * L not a multiple of any tile, fp32 (ops.h) and the CPU bf16 table (looser). Broken positions and a
 * broken mask index must fail the same comparison. */
#include <math.h>
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/core/tensor.h"
#include "engine/ops/backend.h"
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

typedef struct {
    int B, CP, L, H, G, D;
    float p;
    uint64_t key;
} ring_shape;

/* Rank r's global positions: chunk r, then chunk 2CP-1-r. */
static void rank_pos(int32_t *pos, int CP, int L, int r) {
    for (int t = 0; t < 2 * L; t++) pos[t] = t < L ? r * L + t : (2 * CP - 1 - r) * L + t - L;
}

/* fp32 values as the table's storage and back (bf16: rounded). */
static void *to_st(const lt_ops *ops, const float *x, size_t n) {
    if (ops->dtype == LT_F32) return tu_copy(x, n);
    uint16_t *h = malloc(n * 2);
    for (size_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(x[i]);
    return h;
}
static float *from_st(const lt_ops *ops, const void *s, size_t n) {
    if (ops->dtype == LT_F32) return tu_copy(s, n);
    float *f = tu_alloc(n);
    for (size_t i = 0; i < n; i++) f[i] = lt_bf16_to_f32(((const uint16_t *)s)[i]);
    return f;
}
static void round_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = lt_bf16_to_f32(lt_f32_to_bf16(x[i]));
}

/* max |a - b| / max |b| (b the reference; equal infinities agree, a NaN anywhere is infinite). */
static double rel(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 1e-30;
    for (size_t i = 0; i < n; i++) {
        if (isinf(b[i]) && a[i] == b[i]) continue;
        const double d = fabs((double)a[i] - b[i]);
        num = isnan(d) ? INFINITY : fmax(num, d);
        if (isfinite(b[i])) den = fmax(den, fabs(b[i]));
    }
    return num / den;
}

/* What can be broken on purpose: nothing, a rank's second-chunk query positions, or the mask index (S). */
enum { BREAK_NONE, BREAK_POS, BREAK_MASK };

typedef struct {
    double out, lse, dq, dk, dv;
} ring_err;

/* Runs the ring on the table ops and compares with the whole-sequence fp32 ops on the same inputs. */
static ring_err ring_run(const lt_ops *ops, ring_shape s, int brk) {
    const int CP = s.CP, L = s.L, S = 2 * CP * L, Tl = 2 * L, B = s.B, H = s.H, G = s.G, D = s.D, hpg = H / G;
    const int rw = (H + 2 * G) * D, kw = 2 * G * D, ow = H * D;
    const int bf = ops->dtype == LT_BF16;
    const size_t nq = (size_t)B * S * rw, no = (size_t)B * S * ow, nl = (size_t)B * H * S;
    float *qkv = tu_new_randn(nq, 1.0f), *dout = tu_new_randn(no, 1.0f);
    if (bf) round_bf16(qkv, nq), round_bf16(dout, no);
    /* the whole sequence, fp32 */
    float *out = tu_alloc(no), *lse = tu_alloc(nl), *dqkv = tu_alloc(nq);
    lt_attention_forward(out, lse, qkv, B, S, H, G, D, s.p, s.key, 0, H);
    lt_attention_backward(dqkv, dout, qkv, out, lse, B, S, H, G, D, s.p, s.key, 0, H);

    /* each rank's local rows */
    int32_t *pos = malloc(sizeof(int32_t) * CP * Tl);
    float **lq = malloc(sizeof(float *) * CP), **lkv = malloc(sizeof(float *) * CP), **ldo = malloc(sizeof(float *) * CP);
    for (int r = 0; r < CP; r++) {
        rank_pos(pos + r * Tl, CP, L, r);
        lq[r] = tu_alloc((size_t)B * Tl * rw), lkv[r] = tu_alloc((size_t)B * Tl * kw), ldo[r] = tu_alloc((size_t)B * Tl * ow);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < Tl; t++) {
                const size_t src = (size_t)b * S + pos[r * Tl + t], dst = (size_t)b * Tl + t;
                memcpy(lq[r] + dst * rw, qkv + src * rw, sizeof(float) * rw);
                memcpy(ldo[r] + dst * ow, dout + src * ow, sizeof(float) * ow);
                for (int g = 0; g < G; g++)
                    memcpy(lkv[r] + dst * kw + (size_t)g * 2 * D, qkv + src * rw + (size_t)(g * (hpg + 2) + hpg) * D,
                           sizeof(float) * 2 * D);
            }
    }
    const size_t tq = (size_t)B * Tl * rw, tk = (size_t)B * Tl * kw, to = (size_t)B * Tl * ow, tl = (size_t)B * H * Tl;
    void **sq = malloc(sizeof(void *) * CP), **skv = malloc(sizeof(void *) * CP);
    float **dkv_sum = malloc(sizeof(float *) * CP);
    for (int r = 0; r < CP; r++) sq[r] = to_st(ops, lq[r], tq), skv[r] = to_st(ops, lkv[r], tk), dkv_sum[r] = tu_alloc(tk);
    ring_err e = {0, 0, 0, 0, 0};
    float *zero_o = tu_alloc(to), *ninf = tu_alloc(tl), *lse_b = tu_alloc(tl), *zero_q = tu_alloc(tq);
    for (size_t i = 0; i < tl; i++) ninf[i] = -INFINITY;
    for (size_t i = 0; i < tq; i++) /* dq starts 0 in its query heads, 7 in the key / value slots it must not touch */
        zero_q[i] = (int)((i / D) % (hpg + 2)) < hpg ? 0.0f : 7.0f;
    int32_t *qpos = malloc(sizeof(int32_t) * Tl);
    for (int r = 0; r < CP; r++) {
        memcpy(qpos, pos + r * Tl, sizeof(int32_t) * Tl);
        if (brk == BREAK_POS) /* the second chunk's query positions one chunk off */
            for (int t = L; t < Tl; t++) qpos[t] -= L;
        const int Sm = brk == BREAK_MASK ? S + 1 : S;
        void *o = to_st(ops, zero_o, to), *ob = to_st(ops, zero_o, to), *dout_r = to_st(ops, ldo[r], to);
        float *l = tu_copy(ninf, tl);
        for (int step = 0; step < CP; step++) { /* ring order: own block, then the ones passed along */
            const int src = (r - step + CP) % CP;
            ops->attention_kv_forward(ob, lse_b, sq[r], skv[src], B, Tl, Tl, H, G, D, qpos, pos + src * Tl, Sm, s.p,
                                      s.key, 0, H);
            ops->attention_merge(o, l, ob, lse_b, B, Tl, H, D);
        }
        void *dq = to_st(ops, zero_q, tq), *dkv = malloc(tk * (bf ? 2 : 4));
        for (int step = 0; step < CP; step++) {
            const int src = (r - step + CP) % CP;
            ops->attention_kv_backward(dq, dkv, dout_r, sq[r], skv[src], o, l, B, Tl, Tl, H, G, D, qpos,
                                       pos + src * Tl, Sm, s.p, s.key, 0, H);
            float *d = from_st(ops, dkv, tk);
            for (size_t i = 0; i < tk; i++) dkv_sum[src][i] += d[i]; /* reduced at the block's owner */
            free(d);
        }
        /* compare this rank's rows */
        float *of = from_st(ops, o, to), *dqf = from_st(ops, dq, tq);
        /* out and dq: relative to the largest reference value of the whole tensor */
        double mo = 1e-30, ml = 1e-30, mq = 1e-30;
        for (size_t i = 0; i < no; i++) mo = fmax(mo, fabs(out[i]));
        for (size_t i = 0; i < nl; i++) ml = fmax(ml, fabs(lse[i]));
        for (size_t i = 0; i < nq; i++)
            if ((int)((i / D) % (hpg + 2)) < hpg) mq = fmax(mq, fabs(dqkv[i]));
        double eo = 0, el = 0, eq = 0;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < Tl; t++) {
                const size_t src = (size_t)b * S + pos[r * Tl + t], dst = (size_t)b * Tl + t;
                for (int i = 0; i < ow; i++) eo = tu_worse(eo, fabs(of[dst * ow + i] - out[src * ow + i]));
                for (int h = 0; h < H; h++)
                    el = tu_worse(el, fabs(l[((size_t)b * H + h) * Tl + t] - lse[((size_t)b * H + h) * S + pos[r * Tl + t]]));
                for (int g = 0; g < G; g++) {
                    for (int hh = 0; hh < hpg; hh++)
                        for (int d = 0; d < D; d++) {
                            const size_t c = (size_t)(g * (hpg + 2) + hh) * D + d;
                            eq = tu_worse(eq, fabs(dqf[dst * rw + c] - dqkv[src * rw + c]));
                        }
                    for (int d = 0; d < 2 * D; d++) /* dq's key / value slots untouched */
                        if (dqf[dst * rw + (size_t)(g * (hpg + 2) + hpg) * D + d] != 7.0f) eq = INFINITY;
                }
            }
        e.out = tu_worse(e.out, eo / mo), e.lse = tu_worse(e.lse, el / ml), e.dq = tu_worse(e.dq, eq / mq);
        free(o), free(ob), free(dout_r), free(l), free(dq), free(dkv), free(of), free(dqf);
    }
    /* dk, dv: each rank's sum over the ring against the whole sequence's key / value heads */
    double mk = 1e-30, mv = 1e-30, ek = 0, ev = 0;
    for (size_t i = 0; i < nq; i++) {
        const int slot = (int)((i / D) % (hpg + 2));
        if (slot == hpg) mk = fmax(mk, fabs(dqkv[i]));
        if (slot == hpg + 1) mv = fmax(mv, fabs(dqkv[i]));
    }
    for (int r = 0; r < CP; r++)
        for (int b = 0; b < B; b++)
            for (int t = 0; t < Tl; t++) {
                const size_t src = (size_t)b * S + pos[r * Tl + t], dst = (size_t)b * Tl + t;
                for (int g = 0; g < G; g++)
                    for (int d = 0; d < D; d++) {
                        const size_t c = (size_t)(g * (hpg + 2) + hpg) * D + d, kc = (size_t)g * 2 * D + d;
                        ek = tu_worse(ek, fabs(dkv_sum[r][dst * kw + kc] - dqkv[src * rw + c]));
                        ev = tu_worse(ev, fabs(dkv_sum[r][dst * kw + kc + D] - dqkv[src * rw + c + D]));
                    }
            }
    e.dk = ek / mk, e.dv = ev / mv;
    for (int r = 0; r < CP; r++) free(lq[r]), free(lkv[r]), free(ldo[r]), free(sq[r]), free(skv[r]), free(dkv_sum[r]);
    free(lq), free(lkv), free(ldo), free(sq), free(skv), free(dkv_sum), free(pos), free(qpos);
    free(qkv), free(dout), free(out), free(lse), free(dqkv), free(zero_o), free(ninf), free(lse_b), free(zero_q);
    return e;
}

static void check_ring(const char *table, const lt_ops *ops, ring_shape s, double tol_out, double tol_grad) {
    char name[200];
    snprintf(name, sizeof name, "%s ring CP=%d L=%d (S=%d) B=%d H=%d G=%d D=%d dropout=%g", table, s.CP, s.L,
             2 * s.CP * s.L, s.B, s.H, s.G, s.D, s.p);
    const ring_err e = ring_run(ops, s, BREAK_NONE);
    TAP_CHECK(e.out < tol_out, "%s: merged out vs whole sequence (rel %.2e, tol %.0e)", name, e.out, tol_out);
    TAP_CHECK(e.lse < 2e-6, "%s: merged lse vs whole sequence (rel %.2e, tol 2e-6)", name, e.lse);
    TAP_CHECK(e.dq < tol_grad, "%s: dq accumulated over the ring, k/v slots untouched (rel %.2e, tol %.0e)", name, e.dq,
              tol_grad);
    TAP_CHECK(e.dk < tol_grad && e.dv < tol_grad, "%s: dk, dv summed at the owner (rel %.2e, %.2e, tol %.0e)", name,
              e.dk, e.dv, tol_grad);
}

/* The same comparisons fail when a position or the mask index is wrong. */
static void check_broken(ring_shape s) {
    const lt_ops *ops = lt_backend_cpu()->f32;
    const ring_err bp = ring_run(ops, s, BREAK_POS);
    TAP_CHECK(bp.out > 1e-2 && bp.dq > 1e-2, "broken query positions: out (rel %.2e) and dq (rel %.2e) fail", bp.out,
              bp.dq);
    const ring_err bm = ring_run(ops, s, BREAK_MASK);
    TAP_CHECK(bm.out > 1e-2 && bm.dk > 1e-2, "broken mask index (S + 1): out (rel %.2e) and dk (rel %.2e) fail",
              bm.out, bm.dk);
}

/* One block holding the whole sequence at positions 0..S-1, kv the k/v heads of qkv: lt_attention_forward
 * and lt_attention_backward (dq accumulated into zeros, dkv written over garbage). */
static void check_whole(int B, int S, int H, int G, int D, float p) {
    const int hpg = H / G, rw = (H + 2 * G) * D, kw = 2 * G * D;
    const size_t nq = (size_t)B * S * rw, nk = (size_t)B * S * kw, no = (size_t)B * S * H * D, nl = (size_t)B * H * S;
    float *qkv = tu_new_randn(nq, 1.0f), *dout = tu_new_randn(no, 1.0f), *kv = tu_alloc(nk);
    for (size_t bt = 0; bt < (size_t)B * S; bt++)
        for (int g = 0; g < G; g++)
            memcpy(kv + bt * kw + (size_t)g * 2 * D, qkv + bt * rw + (size_t)(g * (hpg + 2) + hpg) * D, sizeof(float) * 2 * D);
    int32_t *pos = malloc(sizeof(int32_t) * S);
    for (int t = 0; t < S; t++) pos[t] = t;
    float *o1 = tu_alloc(no), *l1 = tu_alloc(nl), *o2 = tu_alloc(no), *l2 = tu_alloc(nl), *d1 = tu_alloc(nq);
    float *dq = tu_alloc(nq), *dkv = tu_new_garbage(nk);
    lt_attention_forward(o1, l1, qkv, B, S, H, G, D, p, 321, 1, H + 2);
    lt_attention_kv_forward(o2, l2, qkv, kv, B, S, S, H, G, D, pos, pos, S, p, 321, 1, H + 2);
    lt_attention_backward(d1, dout, qkv, o1, l1, B, S, H, G, D, p, 321, 1, H + 2);
    lt_attention_kv_backward(dq, dkv, dout, qkv, kv, o1, l1, B, S, S, H, G, D, pos, pos, S, p, 321, 1, H + 2);
    float *d2 = tu_copy(dq, nq);
    for (size_t bt = 0; bt < (size_t)B * S; bt++)
        for (int g = 0; g < G; g++)
            memcpy(d2 + bt * rw + (size_t)(g * (hpg + 2) + hpg) * D, dkv + bt * kw + (size_t)g * 2 * D, sizeof(float) * 2 * D);
    const double eo = rel(o2, o1, no), el = rel(l2, l1, nl), ed = rel(d2, d1, nq);
    TAP_CHECK(eo < 1e-6 && el < 1e-6 && ed < 1e-5,
              "one block = the whole sequence B=%d S=%d H=%d G=%d D=%d dropout=%g (heads [1, %d) of %d): out %.2e, "
              "lse %.2e, dq + dkv %.2e vs lt_attention_forward / backward",
              B, S, H, G, D, p, 1 + H, H + 2, eo, el, ed);
    free(qkv), free(dout), free(kv), free(pos), free(o1), free(l1), free(o2), free(l2), free(d1), free(dq), free(dkv);
    free(d2);
}

/* The same results, bit for bit, on 1 and on 3 threads: a ring block's rows (rank 0 of CP = 2, the
 * second chunk's queries against the first rank's block) and its gradients (dq accumulated onto a
 * nonzero start, dkv with GQA's group sum). */
static void check_threads(int B, int L, int H, int G, int D, float p) {
    const int Tl = 2 * L, rw = (H + 2 * G) * D, kw = 2 * G * D;
    const size_t nq = (size_t)B * Tl * rw, nk = (size_t)B * Tl * kw, no = (size_t)B * Tl * H * D, nl = (size_t)B * H * Tl;
    float *qkv = tu_new_randn(nq, 1.0f), *kv = tu_new_randn(nk, 1.0f), *dout = tu_new_randn(no, 1.0f);
    float *dq0 = tu_new_randn(nq, 1.0f);
    int32_t *qp = malloc(sizeof(int32_t) * Tl), *kp = malloc(sizeof(int32_t) * Tl);
    rank_pos(qp, 2, L, 0);
    rank_pos(kp, 2, L, 1);
    float *o[2], *l[2], *dq[2], *dkv[2];
    for (int k = 0; k < 2; k++) {
#ifdef _OPENMP
        omp_set_num_threads(k ? 3 : 1);
#endif
        o[k] = tu_alloc(no), l[k] = tu_alloc(nl), dq[k] = tu_copy(dq0, nq), dkv[k] = tu_alloc(nk);
        lt_attention_kv_forward(o[k], l[k], qkv, kv, B, Tl, Tl, H, G, D, qp, kp, 4 * L, p, 11, 0, H);
        lt_attention_kv_backward(dq[k], dkv[k], dout, qkv, kv, o[k], l[k], B, Tl, Tl, H, G, D, qp, kp, 4 * L, p, 11,
                                 0, H);
    }
    const int same = !memcmp(o[0], o[1], no * 4) && !memcmp(l[0], l[1], nl * 4) && !memcmp(dq[0], dq[1], nq * 4) &&
                     !memcmp(dkv[0], dkv[1], nk * 4);
    TAP_CHECK(same, "B=%d Tq=Tk=%d H=%d G=%d D=%d dropout=%g: out, lse, dq, dkv bitwise equal on 1 and 3 threads", B, Tl,
              H, G, D, p);
    for (int k = 0; k < 2; k++) free(o[k]), free(l[k]), free(dq[k]), free(dkv[k]);
    free(qkv), free(kv), free(dout), free(dq0), free(qp), free(kp);
}

/* attention_merge on hand-made rows: both finite, one side -inf (either), both -inf. */
static void check_merge(void) {
    /* B = 1, T = 4, H = 1, D = 2 */
    float out[8] = {1, 2, 3, 4, 5, 6, 0, 0}, lse[4] = {0.5f, -INFINITY, 1.0f, -INFINITY};
    const float ob[8] = {-1, 1, 7, 8, 9, 9, 0, 0}, lb[4] = {-0.25f, 2.0f, -INFINITY, -INFINITY};
    lt_attention_merge(out, lse, ob, lb, 1, 4, 1, 2);
    const double l0 = log(exp(0.5) + exp(-0.25)), w0 = exp(0.5 - l0), w1 = exp(-0.25 - l0);
    const int ok = fabs(lse[0] - l0) < 1e-6 && fabs(out[0] - (w0 * 1 - w1)) < 1e-6 && fabs(out[1] - (w0 * 2 + w1)) < 1e-6 &&
                   lse[1] == 2.0f && out[2] == 7 && out[3] == 8 && lse[2] == 1.0f && out[4] == 5 && out[5] == 6 &&
                   lse[3] == -INFINITY && out[6] == 0 && out[7] == 0;
    TAP_CHECK(ok, "attention_merge: logaddexp and weights; a -inf side adds nothing; both -inf stay -inf, out 0");
}

int main(void) {
    const lt_backend *cpu = lt_backend_cpu();
    check_merge();
    check_whole(2, 37, 4, 2, 8, 0.0f);
    check_whole(1, 70, 3, 3, 12, 0.3f);
    check_whole(2, 40, 4, 1, 6, 0.3f);
    check_whole(1, 200, 4, 2, 16, 0.3f);
    check_threads(1, 300, 4, 2, 8, 0.3f);
    check_threads(2, 150, 2, 1, 8, 0.0f);
    /* B, CP, L, H, G, D, p, key */
    const ring_shape shapes[] = {
        {2, 2, 5, 2, 2, 8, 0.0f, 0},    {2, 2, 37, 4, 2, 8, 0.0f, 0},   {1, 4, 5, 4, 2, 12, 0.0f, 0},
        {2, 4, 9, 3, 3, 8, 0.3f, 1234}, {2, 2, 37, 4, 2, 8, 0.3f, 77}, {1, 4, 17, 4, 1, 16, 0.3f, 5},
        /* blocks of 200 rows: several query blocks and key tiles, a chunk boundary inside a tile */
        {1, 2, 100, 4, 2, 8, 0.3f, 9},  {1, 4, 100, 2, 2, 12, 0.0f, 0},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) check_ring("fp32", cpu->f32, shapes[i], 2e-6, 1e-5);
    /* the bf16 table: bf16 inputs, out rounded at every merge, dq at every block */
    check_ring("bf16", cpu->bf16, shapes[1], 2e-2, 3e-2);
    check_ring("bf16", cpu->bf16, shapes[5], 2e-2, 3e-2);
    check_broken(shapes[3]);
    return tap_done();
}

/* Context parallelism (engine/parallel/cp.h) with real processes (fork, shm communicators) at CP = 1, 2
 * and 4, on the CPU backend's fp32 and bf16 op tables.
 *
 * - Positions: rank r holds chunks r and 2 CP - 1 - r of L = S / (2 CP) positions, in that order
 *   (Megatron's load balancing), checked against hand-written lists and, over several shapes, chunk by
 *   chunk, every position held exactly once; lt_cp_maps_new's positions are those of every rank.
 * - Ring attention: every rank draws the same full qkv [B, S, G, H/G + 2, D] and dout [B, S, H, D]
 *   from a fixed seed; the reference is lt_attention_forward / lt_attention_backward (fp32) on the whole
 *   sequence. Each rank runs lt_cp_attention_forward on its rows (positions lt_cp_position) and
 *   compares out and lse with the reference's rows at its positions, then lt_cp_attention_backward with
 *   its rows of dout and the forward's out and lse, and compares all of dqkv: query heads, and the key
 *   and value heads, which sum the contributions of every rank's queries. Output buffers and the
 *   scratch start as NaN, so anything left unwritten fails. MHA (G = 4) and GQA (G = 2), dropout 0.3
 *   and none, L = 8 and L = 5 (not a multiple of any tile). Tolerance: max |a - b| <= tol x max
 *   |reference| per tensor (per slot kind for dqkv), fp32 1e-5; bf16 (inputs rounded to bf16, the
 *   reference fp32 on the same values; out rounded at every merge, gradients at every ring step) 3e-2.
 * - Communication: forward sends CP - 1 key/value blocks, backward CP - 1 blocks and CP gradients
 *   (lt_cp_ring_bytes, also against that count of [B, T, G, 2, D] blocks); every send and every receive
 *   is one call (comm.h), so 2 (CP - 1) calls forward and 2 (CP - 1) + 2 CP backward; CP = 1 nothing.
 * - cp groups of 2 inside a world of 4 ({0,1}, {2,3}, different data each): the same on the group,
 *   nothing on the world communicator.
 * - lt_cp_maps_new refuses an odd local length at CP > 1 with a message (and takes it at CP = 1). */
#include "tests/comm/harness.h" /* first: it defines _GNU_SOURCE */
#include "tests/parallel/tp_testutil.h"

#include <math.h>

#include "engine/ops/backend.h"
#include "engine/ops/ops.h"
#include "engine/parallel/cp.h"

enum { B = 2, H = 4, D = 8 };

static const char *dtype_name(lt_dtype d) { return d == LT_BF16 ? "bf16" : "fp32"; }

/* The largest |difference| (NaN: infinite) and the largest |reference| seen. */
typedef struct {
    double diff, ref;
} error;
static void see(error *e, float got, float ref) {
    const double d = fabs((double)got - ref);
    e->diff = isnan(d) ? INFINITY : fmax(e->diff, d);
}
static double relative(error e) { return e.diff / fmax(e.ref, 1e-30); }

/* ---- positions ---- */

/* Rank r's positions as lists written out by hand: CP = 2 (L = 2) and CP = 4 (L = 1). */
static void position_lists(void) {
    static const int cp2[2][4] = {{0, 1, 6, 7}, {2, 3, 4, 5}}, cp4[4][2] = {{0, 7}, {1, 6}, {2, 5}, {3, 4}};
    int ok = 1;
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 4; t++) ok &= lt_cp_position(r, 2, 4, t) == cp2[r][t];
    TAP_CHECK(ok, "CP = 2, S = 8: rank 0 holds positions {0,1,6,7} (chunks 0, 3), rank 1 {2,3,4,5} (chunks 1, 2)");
    ok = 1;
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 2; t++) ok &= lt_cp_position(r, 4, 2, t) == cp4[r][t];
    TAP_CHECK(ok, "CP = 4, S = 8: ranks hold {0,7}, {1,6}, {2,5}, {3,4}");
    ok = 1;
    for (int t = 0; t < 5; t++) ok &= lt_cp_position(0, 1, 5, t) == t;
    TAP_CHECK(ok, "CP = 1: the identity (odd lengths too)");
}

/* For CP = 2, 4 and L = 1, 5, 8: local row t < L is position t of chunk r, row L + t position t of chunk
 * 2 CP - 1 - r; every position of the S = 2 CP L held by exactly one (rank, row). */
static void position_cover(void) {
    int ok = 1;
    char what[200] = "";
    const int Ls[] = {1, 5, 8};
    for (int cp = 2; cp <= 4; cp *= 2)
        for (int k = 0; k < 3; k++) {
            const int L = Ls[k], T = 2 * L, S = cp * T;
            int held[64] = {0};
            for (int r = 0; r < cp; r++)
                for (int t = 0; t < T; t++) {
                    const int p = lt_cp_position(r, cp, T, t), chunk = t < L ? r : 2 * cp - 1 - r;
                    if (p != chunk * L + t % L || p < 0 || p >= S) {
                        if (ok) snprintf(what, sizeof what, "CP %d L %d rank %d row %d: position %d", cp, L, r, t, p);
                        ok = 0;
                    } else held[p]++;
                }
            for (int p = 0; p < S; p++)
                if (held[p] != 1) {
                    if (ok) snprintf(what, sizeof what, "CP %d L %d: position %d held %d times", cp, L, p, held[p]);
                    ok = 0;
                }
        }
    TAP_CHECK(ok, "CP = 2, 4, L = 1, 5, 8: rank r's rows are chunk r then chunk 2CP-1-r, every position held once %s",
              what);
}

/* ---- ring attention ---- */

/* The ring on communicator c against the whole sequence's attention, forward and backward, with its
 * communication counted. Returns the worst relative difference. */
static double ring_checks(rank_ctx *ctx, lt_comm *c, int L, int G, float p, lt_dtype dtype, int gathered,
                          uint64_t seed) {
    char err[512] = "";
    const lt_backend *be = lt_backend_cpu();
    const int n = lt_comm_size(c), me = lt_comm_rank(c);
    const lt_cp cp = {n > 1 ? c : NULL, me, n, be, dtype == LT_BF16 ? be->bf16 : be->f32, gathered};
    const int hpg = H / G, T = 2 * L, S = n * T, rw = (H + 2 * G) * D, ow = H * D;
    const size_t E = lt_dtype_size(dtype), nq = (size_t)B * S * rw, no = (size_t)B * S * ow, nl = (size_t)B * H * S;
    const size_t tq = (size_t)B * T * rw, to = (size_t)B * T * ow, tl = (size_t)B * H * T;
    const uint64_t key = 0xc0ffeeull + seed;
    char what[160];
    snprintf(what, sizeof what, "%s CP %d rank %d L %d G %d p %g %s", dtype_name(dtype), n, me, L, G, p,
             gathered ? "all_gather" : "p2p");

    /* every rank the same full data; the reference on all of it */
    rng_state = seed;
    float *qkv = fvec(nq, -2, 2), *dout = fvec(no, -1, 1);
    quantize(dtype, qkv, nq), quantize(dtype, dout, no);
    float *out = malloc(no * 4), *lse = malloc(nl * 4), *dqkv = malloc(nq * 4);
    lt_attention_forward(out, lse, qkv, B, S, H, G, D, p, key, 0, H);
    lt_attention_backward(dqkv, dout, qkv, out, lse, B, S, H, G, D, p, key, 0, H);

    /* this rank's rows */
    int *pos = malloc(sizeof(int) * T);
    float *lq = malloc(tq * 4), *ldo = malloc(to * 4);
    for (int t = 0; t < T; t++) pos[t] = lt_cp_position(me, n, T, t);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const size_t g = (size_t)b * S + pos[t], l = (size_t)b * T + t;
            memcpy(lq + l * rw, qkv + g * rw, sizeof(float) * rw);
            memcpy(ldo + l * ow, dout + g * ow, sizeof(float) * ow);
        }
    void *Q = to_dtype(dtype, lq, tq), *DO = to_dtype(dtype, ldo, to);
    lt_cp_maps *m = lt_cp_maps_new(&cp, B, T, H, G, D, err, sizeof err);
    RCHECK(ctx, m, "%s: maps: %s", what, err);
    if (!m) return INFINITY;
    int pos_ok = 1;
    for (int r = 0; r < n; r++)
        for (int t = 0; t < T; t++) pos_ok &= m->pos[(size_t)r * T + t] == lt_cp_position(r, n, T, t);
    RCHECK(ctx, pos_ok, "%s: the maps' positions are not every rank's lt_cp_position", what);

    /* the ring's volumes: whole [B, T, G, 2, D] blocks */
    const uint64_t block = (uint64_t)B * T * G * 2 * D * E;
    const uint64_t fwd = lt_cp_ring_bytes(&cp, m, 0), bwd = lt_cp_ring_bytes(&cp, m, 1);
    const int bwd_blocks = n == 1 ? 0 : gathered ? 2 * (n - 1) : 2 * n - 1; /* all-gather and reduce-scatter */
    RCHECK(ctx, fwd == (uint64_t)(n - 1) * block && bwd == (uint64_t)bwd_blocks * block,
           "%s: lt_cp_ring_bytes %llu / %llu, not %d / %d blocks of %llu bytes", what, (unsigned long long)fwd,
           (unsigned long long)bwd, n - 1, bwd_blocks, (unsigned long long)block);

    /* outputs and scratch start as NaN (all-ones bytes, in fp32 and in bf16): all must be written */
    const size_t sb = lt_cp_attention_scratch(&cp, m);
    void *scratch = malloc(sb), *O = malloc(to * E), *DQ = malloc(tq * E);
    float *l = malloc(tl * 4);
    memset(scratch, 0xff, sb), memset(O, 0xff, to * E), memset(DQ, 0xff, tq * E), memset(l, 0xff, tl * 4);

    lt_comm_reset_stats(c);
    int rc = lt_cp_attention_forward(&cp, m, O, l, Q, p, key, 0, H, scratch, err, sizeof err);
    RCHECK(ctx, rc == 0, "%s: forward: %s", what, err);
    check_stats(ctx, c, "forward", n == 1 ? 0 : gathered ? 1 : 2 * (uint64_t)(n - 1), fwd);
    memset(scratch, 0xff, sb); /* backward must not live on what forward left */
    rc = lt_cp_attention_backward(&cp, m, DQ, DO, Q, O, l, p, key, 0, H, scratch, err, sizeof err);
    RCHECK(ctx, rc == 0, "%s: backward: %s", what, err);
    check_stats(ctx, c, "backward", n == 1 ? 0 : gathered ? 2 : 2 * (uint64_t)(n - 1) + 2 * (uint64_t)n, bwd);

    /* against the reference's rows at this rank's positions, relative to the whole reference's largest */
    error eo = {0, 0}, el = {0, 0}, ed[3] = {{0, 0}, {0, 0}, {0, 0}}; /* dqkv: query, key, value heads */
    for (size_t i = 0; i < no; i++) eo.ref = fmax(eo.ref, fabs(out[i]));
    for (size_t i = 0; i < nl; i++) el.ref = fmax(el.ref, fabs(lse[i]));
    for (size_t i = 0; i < nq; i++) {
        const int slot = (int)((i / D) % (hpg + 2)), kind = slot < hpg ? 0 : slot - hpg + 1;
        ed[kind].ref = fmax(ed[kind].ref, fabs(dqkv[i]));
    }
    float *of = to_f32(dtype, O, to), *dqf = to_f32(dtype, DQ, tq);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const size_t g = (size_t)b * S + pos[t], lr = (size_t)b * T + t;
            for (int i = 0; i < ow; i++) see(&eo, of[lr * ow + i], out[g * ow + i]);
            for (int h = 0; h < H; h++) see(&el, l[((size_t)b * H + h) * T + t], lse[((size_t)b * H + h) * S + pos[t]]);
            for (int i = 0; i < rw; i++) {
                const int slot = (i / D) % (hpg + 2), kind = slot < hpg ? 0 : slot - hpg + 1;
                see(&ed[kind], dqf[lr * rw + i], dqkv[g * rw + i]);
            }
        }
    const double tol = dtype == LT_BF16 ? 3e-2 : 1e-5;
    const double e[5] = {relative(eo), relative(el), relative(ed[0]), relative(ed[1]), relative(ed[2])};
    const char *names[5] = {"out", "lse", "dqkv's query heads", "dqkv's key heads", "dqkv's value heads"};
    double worst = 0;
    for (int k = 0; k < 5; k++) {
        RCHECK(ctx, e[k] <= tol, "%s: %s differs from the whole sequence's by %.3g of its largest magnitude", what,
               names[k], e[k]);
        worst = fmax(worst, e[k]);
    }
    free(qkv), free(dout), free(out), free(lse), free(dqkv), free(pos), free(lq), free(ldo), free(Q), free(DO);
    free(scratch), free(O), free(DQ), free(l), free(of), free(dqf);
    lt_cp_maps_free(&cp, m);
    return worst;
}

/* Every shape on communicator c, both op tables. worst[d]: the worst relative difference of dtype d. */
static void all_checks(rank_ctx *ctx, lt_comm *c, uint64_t seed, double worst[2]) {
    const int Ls[2] = {8, 5}, Gs[2] = {4, 2};
    const float ps[2] = {0.0f, 0.3f};
    for (int d = 0; d < 2; d++)
        for (int i = 0; i < 8; i++) {
            const uint64_t s = seed + 16 * (uint64_t)d + (uint64_t)i;
            worst[d] = fmax(worst[d], ring_checks(ctx, c, Ls[i & 1], Gs[(i >> 1) & 1], ps[i >> 2],
                                                  d ? LT_BF16 : LT_F32, 0, s));
        }
    /* cp_comm_type "all_gather": the same results, its own traffic */
    worst[0] = fmax(worst[0], ring_checks(ctx, c, 5, 2, 0.3f, LT_F32, 1, seed + 99));
}

static void rank_world(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    double worst[2] = {0, 0};
    all_checks(ctx, c, 4242, worst);
    ctx->out->val[0] = worst[0], ctx->out->val[1] = worst[1];
    lt_comm_free(c);
}

/* 4 ranks as 2 rings of CP = 2 ({0,1}, {2,3}), each on its own data: nothing on the world */
static void pair_checks(rank_ctx *ctx, lt_comm *cpc, int grp) {
    double worst[2] = {0, 0};
    all_checks(ctx, cpc, 500 + 97 * (uint64_t)grp, worst);
    ctx->out->val[0] = worst[0], ctx->out->val[1] = worst[1];
}
static void rank_groups(rank_ctx *ctx) { in_pairs(ctx, "cp", pair_checks); }

/* The worst fp32 and bf16 differences over n ranks' results. */
static void worst_of(int n, double w[2]) {
    w[0] = w[1] = 0;
    for (int r = 0; r < n; r++)
        for (int d = 0; d < 2; d++) w[d] = fmax(w[d], shared_results[r].val[d]);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    position_lists();
    position_cover();

    char label[600];
    for (int n = 1; n <= 4; n *= 2) {
        run_status st = run_ranks(n, 10.0, rank_world, NULL, 120);
        double w[2];
        worst_of(n, w);
        snprintf(label, sizeof label,
                 "CP = %d, B %d H %d D %d, S = 2 CP L with L = 8 and 5, G = 4 and 2, dropout 0 and 0.3, fp32 and bf16: "
                 "out, lse and all of dqkv at each rank's positions within tolerance of the whole sequence's (worst "
                 "fp32 %.2g, bf16 %.2g); %s",
                 n, B, H, D, w[0], w[1],
                 n > 1 ? "p2p calls and bytes = lt_cp_ring_bytes (CP-1 blocks forward, 2CP-1 backward)"
                       : "no communication");
        report_run(label, n, &st, 0);
    }
    run_status st = run_ranks(4, 10.0, rank_groups, NULL, 120);
    double w[2];
    worst_of(4, w);
    snprintf(label, sizeof label,
             "4 ranks as 2 rings of CP = 2 (cp groups {0,1} and {2,3}, different data each): all of the above on the "
             "group (worst fp32 %.2g, bf16 %.2g), nothing on the world communicator",
             w[0], w[1]);
    report_run(label, 4, &st, 0);

    /* refusal: no communication involved, so the parent checks it alone */
    const lt_backend *be = lt_backend_cpu();
    const lt_cp cp2 = {NULL, 0, 2, be, be->f32}, cp1 = {NULL, 0, 1, be, be->f32};
    char err[512] = "";
    lt_cp_maps *m = lt_cp_maps_new(&cp2, 2, 5, H, 2, D, err, sizeof err);
    TAP_CHECK(!m && strstr(err, "5 positions does not halve"),
              "CP = 2 refuses a local length of 5 with a message: '%s'", err);
    lt_cp_maps_free(&cp2, m);
    m = lt_cp_maps_new(&cp1, 2, 5, H, 2, D, err, sizeof err);
    TAP_CHECK(m != NULL, "CP = 1 takes a local length of 5");
    lt_cp_maps_free(&cp1, m);

    char names[1024];
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind: %s", names);
    return tap_done();
}

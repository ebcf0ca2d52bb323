/* Vocabulary-parallel embedding and cross-entropy (engine/parallel/vocab.h) with real processes (fork,
 * shm communicators) at TP = 1, 2 and 4, on the CPU backend's fp32 and bf16 op tables, against the
 * single-rank ops of the same table on the same data.
 *
 * Every rank draws the same full data from a fixed seed (table [V, C], ids, logits [N, V], targets,
 * gradients), runs the single-rank op on all of it, and compares with what the TP functions give on its
 * slice of the vocabulary:
 * - embedding forward: the single-rank op's rows for the ids this rank owns, zero rows for the others,
 *   exactly; summed over TP (lt_tp_exit) the single-rank output exactly, all of it or under sequence
 *   parallelism this rank's positions (one value plus zeros: no rounding).
 * - embedding backward: this rank's rows of the single-rank table gradient exactly, from zero and
 *   accumulated onto nonzero values (the same values summed in the same order of n).
 * - cross-entropy: losses and lse within 1e-6 relative per element, dlogits on this rank's columns
 *   within 1e-6 (fp32) or 1e-2 (bf16: one rounding of the output) of the largest reference magnitude.
 *   Not bit-exact: the log-sum-exp is formed per slice and combined across ranks (another summation
 *   order, libm's expf / logf). A row whose maximum sits on another rank than most of its mass and a
 *   large-magnitude row are included; backward is also checked in place over the logits.
 * - ids and targets on every slice boundary (r V/TP - 1, r V/TP) and at 0 and V - 1, repeats; ignored
 *   targets (-1): loss 0 and a zero gradient row on every rank.
 * - communication: the embedding itself none (its sum is lt_tp_exit's: 1 all-reduce of N x C values, or
 *   under SP 1 reduce-scatter); cross-entropy forward exactly 3 all-reduces of N floats (ring bytes
 *   2 (TP-1)/TP of each), its backward none; TP = 1 nothing at all.
 * - tp groups of 2 inside a world of 4 (two replicas on different data): the same, on the group alone.
 * - a vocabulary not divisible by TP (or not positive) is refused by lt_vocab_range_of with a message. */
#include "tests/comm/harness.h" /* first: it defines _GNU_SOURCE */
#include "tests/parallel/tp_testutil.h"

#include <math.h>

#include "engine/ops/backend.h"
#include "engine/parallel/vocab.h"

typedef struct {
    int V, C, B, T; /* T divisible by 4 for sequence parallelism */
} shape;

static lt_tp make_tp(lt_comm *c, int sp, lt_dtype dtype) {
    const lt_backend *be = lt_backend_cpu();
    const int n = lt_comm_size(c);
    return (lt_tp){n > 1 ? c : NULL, lt_comm_rank(c), n, sp, be, dtype == LT_BF16 ? be->bf16 : be->f32};
}

static const char *dtype_name(lt_dtype d) { return d == LT_BF16 ? "bf16" : "fp32"; }

/* ids: the slice boundaries of every TP in {1, 2, 4} and both ends, then random ids (repeats included);
 * with ignore, every 7th is -1. */
static int32_t *make_ids(int N, int V, int ignore) {
    int32_t *ids = malloc((size_t)N * sizeof(int32_t));
    int k = 0;
    const int special[] = {0, V - 1, V / 4 - 1, V / 4, V / 2 - 1, V / 2, 3 * V / 4 - 1, 3 * V / 4};
    for (int i = 0; i < 8 && k < N; i++) ids[k++] = special[i];
    for (int i = 0; i < 2 && k < N; i++) ids[k++] = special[3]; /* repeats for certain */
    for (; k < N; k++) ids[k] = (int32_t)(next_u32() % (uint32_t)V);
    if (ignore)
        for (int n = 3; n < N; n += 7) ids[n] = -1;
    return ids;
}

/* ---- embedding ---- */
static void embedding_checks(rank_ctx *ctx, lt_comm *c, const shape *s, lt_dtype dtype, uint64_t seed) {
    const int V = s->V, C = s->C, B = s->B, T = s->T, N = B * T;
    const size_t E = lt_dtype_size(dtype), full_n = (size_t)N * C;
    const char *dn = dtype_name(dtype);
    char err[512] = "";
    lt_tp tp = make_tp(c, 0, dtype);
    const int n = tp.size, me = tp.rank;
    const lt_ops *ops = tp.ops;
    rng_state = seed;
    float *table = fvec((size_t)V * C, -1, 1), *dout = fvec(full_n, -1, 1);
    quantize(dtype, table, (size_t)V * C), quantize(dtype, dout, full_n);
    int32_t *ids = make_ids(N, V, 0);
    void *tabled = to_dtype(dtype, table, (size_t)V * C), *doutd = to_dtype(dtype, dout, full_n);
    /* the single rank's op; its table gradient from zero and from 0.5 (as after an earlier microbatch) */
    void *refd = malloc(full_n * E);
    float *dref = calloc((size_t)V * C, 4), *dref2 = malloc((size_t)V * C * 4);
    for (size_t i = 0; i < (size_t)V * C; i++) dref2[i] = 0.5f;
    ops->embedding_forward(refd, ids, tabled, N, C);
    ops->embedding_backward(dref, doutd, ids, N, C);
    ops->embedding_backward(dref2, doutd, ids, N, C);
    float *ref = to_f32(dtype, refd, full_n);

    lt_vocab_range r;
    int rc = lt_vocab_range_of(&r, &tp, V, err, sizeof err);
    RCHECK(ctx, rc == 0 && r.vocab == V && r.start == (int64_t)me * V / n && r.end == (int64_t)(me + 1) * V / n,
           "range: %s", err);
    const size_t shard_n = (size_t)(V / n) * C;
    void *shard = to_dtype(dtype, table + (size_t)r.start * C, shard_n);
    void *outd = malloc(full_n * E), *local = malloc(full_n * E), *scratch = malloc(full_n * E);

    lt_comm_reset_stats(c);
    rc = lt_vocab_embedding_forward(&tp, &r, outd, ids, shard, N, C, err, sizeof err);
    RCHECK(ctx, rc == 0, "forward: %s", err);
    check_stats(ctx, c, "embedding forward", 0, 0);
    float *out = to_f32(dtype, outd, full_n);
    int bad = -1;
    for (size_t i = 0; i < full_n && bad < 0; i++) {
        const int mine = ids[i / C] >= r.start && ids[i / C] < r.end;
        if (out[i] != (mine ? ref[i] : 0.0f)) bad = (int)i;
    }
    RCHECK(ctx, bad < 0, "%s embedding forward: row %d (id %d, slice [%lld, %lld)) differs: %g vs %g", dn, bad / C,
           ids[bad < 0 ? 0 : bad / C], (long long)r.start, (long long)r.end, bad < 0 ? 0 : out[bad],
           bad < 0 ? 0 : ref[bad]);
    /* summed over tp: the single rank's output */
    lt_tp_rows *rows = lt_tp_rows_new(&tp, B, T, err, sizeof err);
    RCHECK(ctx, rows, "rows: %s", err);
    void *sum = NULL;
    rc = lt_tp_exit(&tp, rows, &sum, outd, local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0, "exit: %s", err);
    check_stats(ctx, c, "embedding sum", n > 1, ring_all_reduce(n, full_n * E));
    free(out);
    out = to_f32(dtype, sum, full_n);
    bad = -1;
    for (size_t i = 0; i < full_n && bad < 0; i++)
        if (out[i] != ref[i]) bad = (int)i;
    RCHECK(ctx, bad < 0, "%s embedding summed over tp: row %d (id %d) differs", dn, bad / C,
           ids[bad < 0 ? 0 : bad / C]);
    /* under sequence parallelism the sum is reduce-scattered: this rank's positions of every sample */
    lt_tp_rows_free(&tp, rows);
    lt_tp tsp = make_tp(c, 1, dtype);
    rows = lt_tp_rows_new(&tsp, B, T, err, sizeof err);
    RCHECK(ctx, rows, "SP rows: %s", err);
    rc = lt_vocab_embedding_forward(&tsp, &r, outd, ids, shard, N, C, err, sizeof err);
    rc |= lt_tp_exit(&tsp, rows, &sum, outd, local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0, "SP forward: %s", err);
    check_stats(ctx, c, "embedding SP", n > 1, n > 1 ? ring_half(n, full_n * E) : 0);
    free(out);
    const int Tl = T / n, No = lt_tp_outer_rows(&tsp, N);
    out = to_f32(dtype, sum, (size_t)No * C);
    bad = -1;
    for (int i = 0; i < No && bad < 0; i++) {
        const int f = n > 1 ? (i / Tl) * T + me * Tl + i % Tl : i; /* (b, me T/TP + t') */
        if (memcmp(out + (size_t)i * C, ref + (size_t)f * C, (size_t)C * 4) != 0) bad = i;
    }
    RCHECK(ctx, bad < 0, "%s SP embedding: local row %d is not the single rank's row of its position", dn, bad);
    lt_tp_rows_free(&tsp, rows);

    /* backward: this rank's rows of the single rank's table gradient, accumulated and from zero */
    float *dtable = malloc(shard_n * 4);
    for (size_t i = 0; i < shard_n; i++) dtable[i] = 0.5f;
    rc = lt_vocab_embedding_backward(&tp, &r, dtable, doutd, ids, N, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(dtable, dref2 + (size_t)r.start * C, shard_n * 4) == 0,
           "%s embedding backward (accumulated) differs from the single rank's rows [%lld, %lld): %s", dn,
           (long long)r.start, (long long)r.end, err);
    memset(dtable, 0, shard_n * 4);
    rc = lt_vocab_embedding_backward(&tp, &r, dtable, doutd, ids, N, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(dtable, dref + (size_t)r.start * C, shard_n * 4) == 0,
           "%s embedding backward from zero differs from the single rank's rows [%lld, %lld): %s", dn,
           (long long)r.start, (long long)r.end, err);
    check_stats(ctx, c, "embedding backward", 0, 0);

    free(table), free(dout), free(ids), free(tabled), free(doutd), free(refd), free(dref), free(dref2), free(ref);
    free(shard), free(outd), free(local), free(scratch), free(out), free(dtable);
}

/* ---- cross-entropy ---- */
static double rel(double a, double b) { return fabs(a - b) / fmax(fabs(b), 1e-30); }

/* Returns the worst relative difference of losses / lse and of dlogits (in worst[0], worst[1]). */
static void cross_entropy_checks(rank_ctx *ctx, lt_comm *c, const shape *s, lt_dtype dtype, uint64_t seed,
                                 double worst[2]) {
    const int V = s->V, N = s->B * s->T;
    const size_t E = lt_dtype_size(dtype);
    const char *dn = dtype_name(dtype);
    char err[512] = "";
    lt_tp tp = make_tp(c, 0, dtype);
    const int n = tp.size;
    const lt_ops *ops = tp.ops;
    rng_state = seed;
    float *logits = fvec((size_t)N * V, -4, 4), *dloss = fvec((size_t)N, 0.1f, 2.0f);
    int32_t *targets = make_ids(N, V, 1);
    /* a row whose maximum sits on another rank than most of its mass, and a large-magnitude row */
    logits[(size_t)1 * V + V - 1] += 30.0f;
    for (int v = 0; v < V; v++) logits[(size_t)2 * V + v] *= 20.0f;
    quantize(dtype, logits, (size_t)N * V);
    void *logitsd = to_dtype(dtype, logits, (size_t)N * V), *drefd = malloc((size_t)N * V * E);
    float *loss_ref = malloc(N * 4), *lse_ref = malloc(N * 4);
    ops->cross_entropy_forward(loss_ref, lse_ref, logitsd, targets, N, V);
    ops->cross_entropy_backward(drefd, logitsd, lse_ref, targets, dloss, N, V);
    float *dref = to_f32(dtype, drefd, (size_t)N * V);

    lt_vocab_range r;
    int rc = lt_vocab_range_of(&r, &tp, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "range: %s", err);
    const int W = V / n;
    float *slicef = malloc((size_t)N * W * 4);
    for (int i = 0; i < N; i++) memcpy(slicef + (size_t)i * W, logits + (size_t)i * V + r.start, (size_t)W * 4);
    void *slice = to_dtype(dtype, slicef, (size_t)N * W), *dl = malloc((size_t)N * W * E);
    float *loss = malloc(N * 4), *lse = malloc(N * 4);

    lt_comm_reset_stats(c);
    rc = lt_vocab_cross_entropy_forward(&tp, &r, loss, lse, slice, targets, N, err, sizeof err);
    RCHECK(ctx, rc == 0, "forward: %s", err);
    check_stats(ctx, c, "cross-entropy forward", n > 1 ? 3 : 0, 3 * ring_all_reduce(n, (uint64_t)N * 4));
    double wl = 0;
    int ignored_ok = 1;
    for (int i = 0; i < N; i++) {
        if (targets[i] < 0) ignored_ok &= loss[i] == 0.0f;
        else wl = fmax(wl, rel(loss[i], loss_ref[i]));
        wl = fmax(wl, rel(lse[i], lse_ref[i]));
    }
    RCHECK(ctx, wl <= 1e-6, "%s losses / lse differ: worst relative %.3g", dn, wl);
    RCHECK(ctx, ignored_ok, "%s: an ignored target has a nonzero loss", dn);
    worst[0] = fmax(worst[0], wl);

    /* backward, into a separate buffer, then in place over the logits */
    rc = lt_vocab_cross_entropy_backward(&tp, &r, dl, slice, lse, targets, dloss, N, err, sizeof err);
    RCHECK(ctx, rc == 0, "backward: %s", err);
    check_stats(ctx, c, "cross-entropy backward", 0, 0);
    float *dlf = to_f32(dtype, dl, (size_t)N * W);
    double maxref = 0, maxdiff = 0;
    int zero_rows = 1;
    for (int i = 0; i < N; i++)
        for (int v = 0; v < W; v++) {
            const double a = dlf[(size_t)i * W + v], b = dref[(size_t)i * V + r.start + v];
            maxref = fmax(maxref, fabs(b));
            maxdiff = fmax(maxdiff, fabs(a - b));
            if (targets[i] < 0) zero_rows &= a == 0.0;
        }
    const double tol = dtype == LT_BF16 ? 1e-2 : 1e-6;
    RCHECK(ctx, maxdiff <= tol * maxref, "%s dlogits differ by %.3g (largest gradient %.3g)", dn, maxdiff, maxref);
    RCHECK(ctx, zero_rows, "%s: a row of an ignored target has a nonzero gradient", dn);
    worst[1] = fmax(worst[1], maxdiff / maxref);
    rc = lt_vocab_cross_entropy_backward(&tp, &r, slice, slice, lse, targets, dloss, N, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(slice, dl, (size_t)N * W * E) == 0, "%s in-place backward differs: %s", dn, err);

    free(logits), free(dloss), free(targets), free(logitsd), free(drefd), free(loss_ref), free(lse_ref), free(dref);
    free(slicef), free(slice), free(dl), free(loss), free(lse), free(dlf);
}

/* Both, for both op tables; worst[0..1] fp32 cross-entropy, [2..3] bf16. */
static void all_checks(rank_ctx *ctx, lt_comm *c, const shape *s, uint64_t seed, double worst[4]) {
    for (int d = 0; d < 2; d++) {
        const lt_dtype dtype = d ? LT_BF16 : LT_F32;
        embedding_checks(ctx, c, s, dtype, seed + (uint64_t)d);
        cross_entropy_checks(ctx, c, s, dtype, seed + 100 + (uint64_t)d, worst + 2 * d);
    }
}

static void rank_world(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    all_checks(ctx, c, ctx->arg, 12345, ctx->out->val);
    lt_comm_free(c);
}

/* 4 ranks as 2 data-parallel replicas of TP = 2 ({0,1}, {2,3}), each replica on its own data; the
 * collectives and their statistics stay on the tp group */
static void pair_checks(rank_ctx *ctx, lt_comm *tpc, int g) {
    all_checks(ctx, tpc, ctx->arg, 100 + 1000 * (uint64_t)g, ctx->out->val);
}
static void rank_groups(rank_ctx *ctx) { in_pairs(ctx, "tp", pair_checks); }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char label[400];
    const shape shapes[] = {{64, 8, 4, 8}, {256, 5, 4, 12}};
    for (int k = 0; k < 2; k++)
        for (int tp = 1; tp <= 4; tp *= 2) {
            const shape *s = &shapes[k];
            run_status st = run_ranks(tp, 10.0, rank_world, s, 60);
            const double *w = shared_results[0].val;
            snprintf(label, sizeof label,
                     "TP = %d, V = %d, C = %d, N = %d, fp32 and bf16: embedding forward / backward the single-rank "
                     "op's exactly (summed over tp, and under SP this rank's positions); cross-entropy losses / lse "
                     "within 1e-6 (worst fp32 %.2g, bf16 %.2g), dlogits (worst %.2g, %.2g), ignored targets; %s",
                     tp, s->V, s->C, s->B * s->T, w[0], w[2], w[1], w[3],
                     tp > 1 ? "3 all-reduces of N floats in the cross-entropy forward, nothing else"
                            : "no communication");
            report_run(label, tp, &st, 0);
        }
    run_status st = run_ranks(4, 10.0, rank_groups, &shapes[1], 60);
    report_run("4 ranks as 2 replicas of TP = 2 (tp groups {0,1} and {2,3}, different data each): embedding and "
               "cross-entropy as above on the group, nothing on the world communicator",
               4, &st, 0);

    /* refusals: no collective involved, so the parent checks them alone */
    const lt_backend *be = lt_backend_cpu();
    lt_tp tp4 = {NULL, 3, 4, 0, be, be->f32};
    lt_vocab_range r;
    char err[512] = "";
    int rc = lt_vocab_range_of(&r, &tp4, 22, err, sizeof err);
    TAP_CHECK(rc == -1 && strstr(err, "(22) is not divisible by tensor_model_parallel_size (4)") &&
                  strstr(err, "make_vocab_size_divisible_by"),
              "V = 22 at TP = 4 refused with a message: '%s'", err);
    err[0] = '\0';
    rc = lt_vocab_range_of(&r, &tp4, 0, err, sizeof err);
    TAP_CHECK(rc == -1 && strstr(err, "(0)"), "V = 0 refused: '%s'", err);
    rc = lt_vocab_range_of(&r, &tp4, 24, err, sizeof err);
    TAP_CHECK(rc == 0 && r.vocab == 24 && r.start == 18 && r.end == 24, "V = 24 at TP = 4: rank 3 owns [18, 24)");

    char names[1024];
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind: %s", names);
    return tap_done();
}

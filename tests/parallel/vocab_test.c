/* Vocabulary-parallel embedding and cross-entropy (engine/parallel/vocab.h) with real processes (fork,
 * shm communicators) at TP = 1, 2 and 4, against the single-rank ops of engine/ops on the same data.
 *
 * Every rank draws the same full data from a fixed seed (table [V, C], ids, logits [N, V], targets,
 * gradients), runs the single-rank op on all of it, and compares with what the TP functions give on its
 * slice:
 * - embedding forward and backward (also the sequence-parallel variant): exactly equal. Each output
 *   element is one table value plus zeros from the other ranks, and the table gradient sums the same
 *   values in the same order of n, so no rounding differs.
 * - cross-entropy: losses and lse within 1e-6 relative per element, dlogits within 1e-6 of the largest
 *   reference gradient magnitude (which is ~1, the target's). Not bit-exact: the row maximum and the sum
 *   of exponentials are formed per slice and then reduced across ranks (another summation order), expf
 *   is libm's rather than the op's polynomial (within 2 ulp), and the loss is log s - (x_t - m) rather
 *   than (m + log s) - x_t: differences of a few ulp of the values (~1e-7 relative).
 * - ids and targets on every slice boundary (r V/TP - 1, r V/TP) and at 0 and V - 1; ignored targets
 *   (-1): loss 0 and a zero gradient row on every rank.
 * - communication per call equals the analytic count: embedding forward 1 all-reduce of N C floats,
 *   cross-entropy forward 3 all-reduces of N floats (ring bytes 2 (TP-1)/TP of each buffer), SP
 *   forward 1 reduce-scatter and its backward 1 all-gather of N C floats ((TP-1)/TP), backward passes
 *   nothing; TP = 1 nothing at all.
 * - tp groups of 2 inside a world of 4 (two replicas on different data): the same, on the group alone.
 * - a vocabulary not divisible by TP, and ids outside it, are refused with a message before any
 *   collective (so no rank waits for the others). */
#include "tests/comm/harness.h" /* first: it defines _GNU_SOURCE */
#include "tests/parallel/tp_testutil.h"

#include <math.h>

#include "engine/ops/ops.h"
#include "engine/parallel/vocab.h"

typedef struct {
    int V, C, N; /* N divisible by 4 for the SP variant */
} shape;

/* ids: the slice boundaries of every TP in {1, 2, 4} and both ends, then random ids (repeats included);
 * with ignore, every 7th is -1. */
static int32_t *make_ids(int N, int V, int ignore) {
    int32_t *ids = malloc((size_t)N * sizeof(int32_t));
    int k = 0;
    const int special[] = {0, V - 1, V / 4 - 1, V / 4, V / 2 - 1, V / 2, 3 * V / 4 - 1, 3 * V / 4};
    for (int i = 0; i < 8 && k < N; i++) ids[k++] = special[i];
    for (; k < N; k++) ids[k] = (int32_t)(next_u32() % (uint32_t)V);
    if (ignore)
        for (int n = 3; n < N; n += 7) ids[n] = -1;
    return ids;
}

/* ---- embedding, with and without sequence parallelism ---- */
static void embedding_checks(rank_ctx *ctx, lt_comm *c, const shape *s, uint64_t seed) {
    const int V = s->V, C = s->C, N = s->N, tp = lt_comm_size(c), me = lt_comm_rank(c);
    char err[512] = "";
    rng_state = seed;
    float *table = fvec((size_t)V * C, -1, 1), *dout = fvec((size_t)N * C, -1, 1);
    int32_t *ids = make_ids(N, V, 0);
    /* the single rank's op */
    float *ref = malloc((size_t)N * C * 4), *dref = calloc((size_t)V * C, 4);
    lt_embedding_forward(ref, ids, table, N, C);
    lt_embedding_backward(dref, dout, ids, N, C);

    lt_vocab_range r;
    int rc = lt_vocab_range_of(&r, V, me, tp, err, sizeof err);
    RCHECK(ctx, rc == 0 && r.start == (int64_t)me * V / tp && r.end == (int64_t)(me + 1) * V / tp, "range: %s", err);
    const float *shard = table + (size_t)r.start * C;
    const size_t shard_n = (size_t)(V / tp) * C;
    float *out = malloc((size_t)N * C * 4), *dtable = calloc(shard_n, 4), *full = malloc((size_t)N * C * 4);
    /* the table gradient accumulates (+=): from 0.5 everywhere, as after an earlier microbatch, the
     * single-rank op's result is the reference too */
    float *dref2 = malloc((size_t)V * C * 4);
    for (size_t i = 0; i < (size_t)V * C; i++) dref2[i] = 0.5f;
    for (size_t i = 0; i < shard_n; i++) dtable[i] = 0.5f;
    lt_embedding_backward(dref2, dout, ids, N, C);

    lt_comm_reset_stats(c);
    rc = lt_vocab_embedding_forward(c, out, ids, shard, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "forward: %s", err);
    check_stats(ctx, c, "embedding forward", tp > 1, tp > 1 ? ring_all_reduce(tp, (uint64_t)N * C * 4) : 0);
    int bad = -1;
    for (size_t i = 0; i < (size_t)N * C && bad < 0; i++)
        if (out[i] != ref[i]) bad = (int)i;
    RCHECK(ctx, bad < 0, "embedding forward differs at row %d (id %d): %g vs %g", bad / C, ids[bad < 0 ? 0 : bad / C],
           bad < 0 ? 0 : out[bad], bad < 0 ? 0 : ref[bad]);

    rc = lt_vocab_embedding_backward(c, dtable, dout, ids, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "backward: %s", err);
    check_stats(ctx, c, "embedding backward", 0, 0);
    bad = -1;
    for (size_t i = 0; i < shard_n && bad < 0; i++)
        if (dtable[i] != dref2[(size_t)r.start * C + i]) bad = (int)i;
    RCHECK(ctx, bad < 0, "embedding backward differs at shard row %d: %g vs %g", bad / C, bad < 0 ? 0 : dtable[bad],
           bad < 0 ? 0 : dref2[(size_t)r.start * C + bad]);
    /* and, from zero, the single-rank op's gradient rows of this slice exactly */
    memset(dtable, 0, shard_n * 4);
    lt_vocab_embedding_backward(c, dtable, dout, ids, N, C, V, err, sizeof err);
    RCHECK(ctx, memcmp(dtable, dref + (size_t)r.start * C, shard_n * 4) == 0,
           "embedding backward from zero differs from the single-rank op's rows [%lld, %lld)", (long long)r.start,
           (long long)r.end);

    /* sequence parallel: this rank's N/TP rows of the sum; backward all-gathers the gradient */
    const int rows = N / tp;
    float *out_sp = malloc((size_t)rows * C * 4);
    rc = lt_vocab_embedding_forward_sp(c, out_sp, full, ids, shard, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "sp forward: %s", err);
    check_stats(ctx, c, "sp embedding forward", tp > 1, ring_half(tp, (uint64_t)N * C * 4));
    RCHECK(ctx, memcmp(out_sp, ref + (size_t)me * rows * C, (size_t)rows * C * 4) == 0,
           "sp forward: rows [%d, %d) differ from the single-rank op's", me * rows, (me + 1) * rows);
    memset(dtable, 0, shard_n * 4);
    rc = lt_vocab_embedding_backward_sp(c, dtable, full, dout + (size_t)me * rows * C, ids, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "sp backward: %s", err);
    check_stats(ctx, c, "sp embedding backward", tp > 1, ring_half(tp, (uint64_t)N * C * 4));
    RCHECK(ctx, memcmp(dtable, dref + (size_t)r.start * C, shard_n * 4) == 0,
           "sp backward differs from the single-rank op's rows");

    free(table), free(dout), free(ids), free(ref), free(dref), free(dref2), free(out), free(dtable), free(full);
    free(out_sp);
}

static void rank_embedding(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    embedding_checks(ctx, c, ctx->arg, 12345);
    lt_comm_free(c);
}

/* ---- cross-entropy ---- */
static double rel(double a, double b) { return fabs(a - b) / fmax(fabs(b), 1e-30); }

static void cross_entropy_checks(rank_ctx *ctx, lt_comm *c, const shape *s, uint64_t seed) {
    const int V = s->V, N = s->N, tp = lt_comm_size(c), me = lt_comm_rank(c);
    char err[512] = "";
    rng_state = seed;
    float *logits = fvec((size_t)N * V, -4, 4), *dloss = fvec((size_t)N, 0.1f, 2.0f);
    int32_t *targets = make_ids(N, V, 1);
    /* a row whose maximum sits on another rank than most of its mass, and a large-magnitude row */
    for (int v = 0; v < V; v++) logits[(size_t)1 * V + v] += (v == V - 1) ? 30.0f : 0.0f;
    for (int v = 0; v < V; v++) logits[(size_t)2 * V + v] *= 20.0f;
    float *loss_ref = malloc(N * 4), *lse_ref = malloc(N * 4), *dref = malloc((size_t)N * V * 4);
    lt_cross_entropy_forward(loss_ref, lse_ref, logits, targets, N, V);
    lt_cross_entropy_backward(dref, logits, lse_ref, targets, dloss, N, V);

    lt_vocab_range r;
    lt_vocab_range_of(&r, V, me, tp, err, sizeof err);
    const int W = V / tp;
    float *slice = malloc((size_t)N * W * 4), *dl = malloc((size_t)N * W * 4);
    for (int n = 0; n < N; n++) memcpy(slice + (size_t)n * W, logits + (size_t)n * V + r.start, (size_t)W * 4);
    float *loss = malloc(N * 4), *lse = malloc(N * 4), *sumexp = malloc(N * 4);

    lt_comm_reset_stats(c);
    int rc = lt_vocab_cross_entropy_forward(c, loss, lse, sumexp, slice, targets, N, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "forward: %s", err);
    check_stats(ctx, c, "cross-entropy forward", tp > 1 ? 3 : 0, 3 * ring_all_reduce(tp, (uint64_t)N * 4));
    double worst_loss = 0, worst_lse = 0;
    int ignored_ok = 1;
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0) {
            ignored_ok &= loss[n] == 0.0f;
        } else {
            worst_loss = fmax(worst_loss, rel(loss[n], loss_ref[n]));
        }
        worst_lse = fmax(worst_lse, rel(lse[n], lse_ref[n]));
    }
    RCHECK(ctx, worst_loss <= 1e-6 && worst_lse <= 1e-6, "losses / lse differ: worst relative %.3g / %.3g",
           worst_loss, worst_lse);
    RCHECK(ctx, ignored_ok, "an ignored target has a nonzero loss");
    ctx->out->val[0] = worst_loss;

    /* backward, into a separate buffer, then in place over the logits */
    rc = lt_vocab_cross_entropy_backward(c, dl, slice, lse, targets, dloss, N, V, err, sizeof err);
    RCHECK(ctx, rc == 0, "backward: %s", err);
    check_stats(ctx, c, "cross-entropy backward", 0, 0);
    double maxref = 0, maxdiff = 0;
    int zero_rows = 1;
    for (int n = 0; n < N; n++)
        for (int v = 0; v < W; v++) {
            const double a = dl[(size_t)n * W + v], b = dref[(size_t)n * V + r.start + v];
            maxref = fmax(maxref, fabs(b));
            maxdiff = fmax(maxdiff, fabs(a - b));
            if (targets[n] < 0) zero_rows &= a == 0.0;
        }
    RCHECK(ctx, maxdiff <= 1e-6 * maxref, "dlogits differ by %.3g (largest gradient %.3g)", maxdiff, maxref);
    RCHECK(ctx, zero_rows, "a row of an ignored target has a nonzero gradient");
    ctx->out->val[1] = maxdiff / maxref;
    rc = lt_vocab_cross_entropy_backward(c, slice, slice, lse, targets, dloss, N, V, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(slice, dl, (size_t)N * W * 4) == 0, "in-place backward differs: %s", err);

    free(logits), free(dloss), free(targets), free(loss_ref), free(lse_ref), free(dref), free(slice), free(dl);
    free(loss), free(lse), free(sumexp);
}

static void rank_cross_entropy(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    cross_entropy_checks(ctx, c, ctx->arg, 777);
    lt_comm_free(c);
}

/* ---- tp groups inside a larger world: 4 ranks as 2 data-parallel replicas of TP = 2 ({0,1}, {2,3}),
 * each replica on its own data; the collectives and their statistics stay on the tp group ---- */
static void rank_groups(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    const int g = ctx->rank / 2, ranks[2] = {2 * g, 2 * g + 1};
    lt_comm *tp = lt_comm_group(w, ranks, 2, "tp", err, sizeof err);
    RCHECK(ctx, tp, "tp group: %s", err);
    if (tp) {
        lt_comm_reset_stats(w);
        embedding_checks(ctx, tp, ctx->arg, 100 + (uint64_t)g);
        cross_entropy_checks(ctx, tp, ctx->arg, 200 + (uint64_t)g);
        lt_comm_stats st = lt_comm_get_stats(w);
        RCHECK(ctx, st.calls == 0, "the world communicator was used (%llu calls)", (unsigned long long)st.calls);
        lt_comm_free(tp);
    }
    lt_comm_free(w);
}

/* ---- refusals: they fail on every rank before any collective, so none waits ---- */
static void rank_refusals(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    const int V = 4 * 5 + 2, C = 3, N = 4; /* 22: divisible by 2, not by 4 */
    float table[22 * 3], out[4 * 3], full[4 * 3], logits[4 * 22], loss[4], lse[4], se[4];
    memset(table, 0, sizeof table);
    memset(logits, 0, sizeof logits);
    int32_t ids[4] = {0, 1, 2, 3};
    lt_comm_reset_stats(c);
    int rc = lt_vocab_embedding_forward(c, out, ids, table, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "22 is not divisible by tensor_model_parallel_size 4"),
           "V = 22 at TP = 4 embedding: rc %d, '%s'", rc, err);
    err[0] = '\0';
    rc = lt_vocab_embedding_forward_sp(c, out, full, ids, table, N, C, V, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "not divisible"), "V = 22 at TP = 4 sp embedding: rc %d, '%s'", rc, err);
    err[0] = '\0';
    rc = lt_vocab_cross_entropy_forward(c, loss, lse, se, logits, ids, N, V, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "not divisible"), "V = 22 at TP = 4 cross-entropy: rc %d, '%s'", rc, err);
    lt_vocab_range r;
    rc = lt_vocab_range_of(&r, 10, 0, 4, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "pad it to a multiple of make_vocab_size_divisible_by"), "range: '%s'", err);
    /* ids outside the vocabulary (V = 24 divides) */
    int32_t bad_ids[4] = {0, 24, 1, 2}, bad_targets[4] = {0, -1, -5, 23};
    err[0] = '\0';
    rc = lt_vocab_embedding_forward(c, out, bad_ids, table, N, C, 24, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "token id 24 at position 1 is outside the vocabulary [0, 24)"),
           "id 24: rc %d, '%s'", rc, err);
    bad_targets[2] = 24;
    err[0] = '\0';
    rc = lt_vocab_cross_entropy_forward(c, loss, lse, se, logits, bad_targets, N, 24, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "target 24 at position 2"), "target 24: rc %d, '%s'", rc, err);
    /* SP needs N % TP == 0 */
    err[0] = '\0';
    rc = lt_vocab_embedding_forward_sp(c, out, full, ids, table, 3, C, 24, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "3 rows"), "sp with 3 rows: rc %d, '%s'", rc, err);
    check_stats(ctx, c, "refused calls", 0, 0);
    lt_comm_free(c);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char label[256];
    const shape shapes[] = {{64, 8, 32}, {256, 5, 48}};
    for (int k = 0; k < 2; k++)
        for (int tp = 1; tp <= 4; tp *= 2) {
            const shape *s = &shapes[k];
            run_status st = run_ranks(tp, 10.0, rank_embedding, s, 60);
            snprintf(label, sizeof label,
                     "TP = %d, V = %d, C = %d, N = %d: embedding forward / backward (and the sequence-parallel "
                     "variant) equal the single-rank op's exactly; %s",
                     tp, s->V, s->C, s->N,
                     tp > 1 ? "1 all-reduce (SP: 1 reduce-scatter, 1 all-gather) of analytic bytes"
                            : "no communication");
            report_run(label, tp, &st, 0);
            st = run_ranks(tp, 10.0, rank_cross_entropy, s, 60);
            snprintf(label, sizeof label,
                     "TP = %d, V = %d, N = %d: cross-entropy losses, lse and dlogits within 1e-6 of the single-rank "
                     "op's (worst %.2g / %.2g), ignored targets, %s",
                     tp, s->V, s->N, shared_results[0].val[0], shared_results[0].val[1],
                     tp > 1 ? "3 all-reduces of analytic bytes" : "no communication");
            report_run(label, tp, &st, 0);
        }
    run_status st = run_ranks(4, 10.0, rank_groups, &shapes[1], 60);
    report_run("4 ranks as 2 replicas of TP = 2 (tp groups {0,1} and {2,3}, different data each): embedding and "
               "cross-entropy as above on the group, nothing on the world communicator",
               4, &st, 0);
    st = run_ranks(4, 10.0, rank_refusals, NULL, 60);
    report_run("V = 22 at TP = 4 refused (embedding, SP embedding, cross-entropy), ids / targets outside the "
               "vocabulary and SP rows not divisible by TP refused, all before any collective",
               4, &st, 0);
    char names[1024];
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind: %s", names);
    return tap_done();
}

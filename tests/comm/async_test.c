/* Non-blocking collectives (engine/comm/async.c) with real processes: results identical to the
 * blocking calls, FIFO order, a blocking call waiting for pending requests, overlap with the
 * caller's own work, statistics, and a timeout surfacing at lt_comm_wait. */
#include "tests/comm/harness.h"

enum { K = 4, COUNT = 300000 };

static void fill(float *x, int64_t n, int rank, int k) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)((i * 7 + rank * 13 + k * 5) % 101) * 0.01f + 0.001f * rank;
}

static void rank_async(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float *a[K], *b[K];
    for (int k = 0; k < K; k++) {
        a[k] = malloc(sizeof(float) * COUNT);
        b[k] = malloc(sizeof(float) * COUNT);
        fill(a[k], COUNT, ctx->rank, k);
        fill(b[k], COUNT, ctx->rank, k);
    }
    /* Blocking reference first, then the same through the background thread. */
    for (int k = 0; k < K; k++)
        RCHECK(ctx, lt_comm_all_reduce(c, b[k], COUNT, LT_F32, LT_REDUCE_AVG, err, sizeof err) == 0, "%s", err);
    lt_comm_reset_stats(c);
    lt_comm_request *r[K];
    for (int k = 0; k < K; k++) r[k] = lt_comm_all_reduce_async(c, a[k], COUNT, LT_F32, LT_REDUCE_AVG);
    /* The caller works meanwhile: the requests progress without it. */
    double t0 = now_s(), busy = 0;
    volatile double sink = 0;
    while (now_s() - t0 < 0.05) sink += 1.0;
    (void)sink;
    busy = now_s() - t0;
    /* Wait out of order: the last first. */
    for (int k = K - 1; k >= 0; k--) RCHECK(ctx, lt_comm_wait(r[k], err, sizeof err) == 0, "wait %d: %s", k, err);
    int same = 1;
    for (int k = 0; k < K; k++) same &= memcmp(a[k], b[k], sizeof(float) * COUNT) == 0;
    RCHECK(ctx, same, "async all_reduce results differ from the blocking ones");
    lt_comm_stats s = lt_comm_get_stats(c);
    uint64_t want = (uint64_t)K * (uint64_t)(2 * (ctx->n - 1) * (int64_t)COUNT * 4 / ctx->n);
    RCHECK(ctx, s.calls == K && s.bytes == want, "stats: %llu calls, %llu bytes (want %d, %llu)",
           (unsigned long long)s.calls, (unsigned long long)s.bytes, K, (unsigned long long)want);
    ctx->out->val[0] = busy;

    /* A blocking call right after async ones waits for them: order is kept on every rank. */
    fill(a[0], COUNT, ctx->rank, 9);
    memcpy(b[0], a[0], sizeof(float) * COUNT);
    lt_comm_request *q = lt_comm_all_reduce_async(c, a[0], COUNT, LT_F32, LT_REDUCE_SUM);
    float one = (float)ctx->rank;
    RCHECK(ctx, lt_comm_all_reduce(c, &one, 1, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, lt_comm_test(q) == 1, "the blocking call returned before the pending request finished");
    RCHECK(ctx, lt_comm_wait(q, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, one == (float)(ctx->n * (ctx->n - 1) / 2), "scalar sum %g", one);
    RCHECK(ctx, lt_comm_all_reduce(c, b[0], COUNT, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, memcmp(a[0], b[0], sizeof(float) * COUNT) == 0, "async-then-blocking results differ");

    /* reduce_scatter and all_gather, async. */
    int n = ctx->n;
    float *send = malloc(sizeof(float) * 1000 * n), *mine = malloc(sizeof(float) * 1000),
          *ref = malloc(sizeof(float) * 1000), *all = malloc(sizeof(float) * 1000 * n),
          *allref = malloc(sizeof(float) * 1000 * n);
    fill(send, 1000 * n, ctx->rank, 3);
    RCHECK(ctx, lt_comm_reduce_scatter(c, send, ref, 1000, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, lt_comm_wait(lt_comm_reduce_scatter_async(c, send, mine, 1000, LT_F32, LT_REDUCE_SUM), err,
                             sizeof err) == 0, "%s", err);
    RCHECK(ctx, memcmp(mine, ref, sizeof(float) * 1000) == 0, "async reduce_scatter differs");
    RCHECK(ctx, lt_comm_all_gather(c, mine, allref, 1000, LT_F32, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, lt_comm_wait(lt_comm_all_gather_async(c, mine, all, 1000, LT_F32), err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, memcmp(all, allref, sizeof(float) * 1000 * n) == 0, "async all_gather differs");
    ctx->out->hash[0] = fnv(FNV0, a[1], sizeof(float) * COUNT);

    for (int k = 0; k < K; k++) free(a[k]), free(b[k]);
    free(send), free(mine), free(ref), free(all), free(allref);
    lt_comm_free(c); /* joins the background thread */
}

/* The last rank never issues the collective: the others' wait reports the timeout. */
static void rank_async_timeout(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float x[16] = {0};
    if (ctx->rank == ctx->n - 1) {
        usleep((useconds_t)((ctx->timeout + 1.0) * 1e6));
        lt_comm_free(c);
        return;
    }
    lt_comm_request *r = lt_comm_all_reduce_async(c, x, 16, LT_F32, LT_REDUCE_SUM);
    int rc = lt_comm_wait(r, err, sizeof err);
    char want[64];
    snprintf(want, sizeof want, "rank %d did not arrive", ctx->n - 1);
    RCHECK(ctx, rc != 0 && strstr(err, want) && strstr(err, "timed out"), "expected a timeout, got %d: %s", rc, err);
    lt_comm_free(c);
}

int main(void) {
    int sizes[2] = {2, 4};
    char label[200];
    for (int i = 0; i < 2; i++) {
        int n = sizes[i];
        run_status st = run_ranks(n, 10.0, rank_async, NULL, 30);
        snprintf(label, sizeof label, "N=%d: async all_reduce x%d (waited out of order), reduce_scatter, all_gather "
                 "equal the blocking calls; blocking after async keeps the order; statistics", n, K);
        report_run(label, n, &st, 0);
        int same = 1;
        for (int r = 0; r < n; r++) same &= shared_results[r].hash[0] == shared_results[0].hash[0];
        TAP_CHECK(same, "N=%d: async results bit-identical on every rank", n);
    }
    run_status st = run_ranks(3, 0.5, rank_async_timeout, NULL, 30);
    report_run("a rank that never issues the collective: lt_comm_wait reports the timeout naming it", 3, &st, 0);
    char names[512] = "";
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind %s", names);
    return tap_done();
}

/* Non-blocking collectives (engine/comm/async.c) with real processes (N = 2 and 4 forked ranks):
 * results bit-identical to the blocking calls (all_reduce over several dtypes/ops/sizes, waited
 * in order and out of order; reduce_scatter, all_gather), FIFO completion, a blocking call
 * waiting for pending requests, overlap with the caller's own computation, statistics equal to
 * the blocking ones, argument errors, a timeout and an abort surfacing at lt_comm_wait, the
 * background thread started lazily, using no CPU while idle, and joined by lt_comm_free. */
#include "tests/comm/harness.h"

enum { K = 5, BIG = 2000000, RS = 1000 };

/* The all_reduces of one round: different buffers, sizes, dtypes and ops. */
static const int64_t counts[K] = {300000, 1, 77777, 0, 131072};
static const lt_dtype dtypes[K] = {LT_F32, LT_F32, LT_BF16, LT_F32, LT_I32};
static const lt_reduce_op ops[K] = {LT_REDUCE_AVG, LT_REDUCE_SUM, LT_REDUCE_SUM, LT_REDUCE_SUM, LT_REDUCE_MAX};

static void fill(void *p, lt_dtype dt, int64_t n, int rank, int k) {
    for (int64_t i = 0; i < n; i++) {
        float v = (float)((i * 7 + rank * 13 + k * 5) % 101) * 0.01f + 0.001f * (float)rank;
        if (dt == LT_F32) {
            ((float *)p)[i] = v;
        } else if (dt == LT_BF16) {
            uint32_t u;
            memcpy(&u, &v, 4);
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        } else {
            ((int32_t *)p)[i] = (int32_t)((i * 31 + rank * 17 + k) % 1000) - 500;
        }
    }
}

static size_t nbytes(int k) { return (size_t)counts[k] * lt_dtype_size(dtypes[k]); }

/* Threads of this process (the background thread shows up here). */
static int threads_now(void) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* The caller's own work: repeated dot products of a local vector for about `seconds`; every
 * repetition must give the same value. Returns the number of repetitions (0 on a wrong value). */
static long compute_for(double seconds) {
    enum { M = 65536 };
    static float x[M];
    for (int i = 0; i < M; i++) x[i] = (float)(i % 17) * 0.25f;
    double want = 0;
    for (int i = 0; i < M; i++) want += (double)x[i] * x[i];
    long reps = 0;
    double t0 = now_s();
    do {
        double s = 0;
        for (int i = 0; i < M; i++) s += (double)x[i] * x[i];
        if (s != want) return 0;
        reps++;
    } while (now_s() - t0 < seconds);
    return reps;
}

static int same_stats(lt_comm_stats a, lt_comm_stats b) { return a.calls == b.calls && a.bytes == b.bytes; }

static void rank_async(rank_ctx *ctx) {
    char err[512], err2[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    int n = ctx->n, me = ctx->rank;
    RCHECK(ctx, lt_comm_barrier(c, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, threads_now() == 1, "a thread before any non-blocking call: %d threads", threads_now());

    void *in[K], *ref[K], *a[K];
    for (int k = 0; k < K; k++) {
        in[k] = malloc(nbytes(k) + 1);
        ref[k] = malloc(nbytes(k) + 1);
        a[k] = malloc(nbytes(k) + 1);
        fill(in[k], dtypes[k], counts[k], me, k);
        memcpy(ref[k], in[k], nbytes(k));
    }

    /* Blocking reference, and its statistics. */
    lt_comm_reset_stats(c);
    for (int k = 0; k < K; k++)
        RCHECK(ctx, lt_comm_all_reduce(c, ref[k], counts[k], dtypes[k], ops[k], err, sizeof err) == 0, "%s", err);
    lt_comm_stats sb = lt_comm_get_stats(c);
    uint64_t want_bytes = 0;
    for (int k = 0; k < K; k++) want_bytes += 2 * (uint64_t)(n - 1) * nbytes(k) / (uint64_t)n;
    RCHECK(ctx, sb.calls == K && sb.bytes == want_bytes, "blocking stats %llu calls %llu bytes",
           (unsigned long long)sb.calls, (unsigned long long)sb.bytes);

    /* Round 1: issued back to back, waited in order. */
    lt_comm_reset_stats(c);
    lt_comm_request *r[K];
    for (int k = 0; k < K; k++) memcpy(a[k], in[k], nbytes(k));
    for (int k = 0; k < K; k++) r[k] = lt_comm_all_reduce_async(c, a[k], counts[k], dtypes[k], ops[k]);
    RCHECK(ctx, threads_now() == 2, "one background thread expected: %d threads", threads_now());
    for (int k = 0; k < K; k++) RCHECK(ctx, r[k] && lt_comm_wait(r[k], err, sizeof err) == 0, "wait %d: %s", k, err);
    for (int k = 0; k < K; k++)
        RCHECK(ctx, memcmp(a[k], ref[k], nbytes(k)) == 0, "round 1: all_reduce %d differs from the blocking one", k);
    lt_comm_stats sa = lt_comm_get_stats(c);
    lt_comm_async_stats as = lt_comm_get_async_stats(c);
    RCHECK(ctx, same_stats(sa, sb) && sa.seconds > 0, "async stats %llu calls %llu bytes %g s, blocking %llu %llu",
           (unsigned long long)sa.calls, (unsigned long long)sa.bytes, sa.seconds, (unsigned long long)sb.calls,
           (unsigned long long)sb.bytes);
    RCHECK(ctx, as.requests == K && as.seconds > 0 && as.blocked_seconds >= 0 && as.seconds >= sa.seconds * 0.999,
           "async stats: %llu requests, %g s on the thread (%g s in the collectives), %g s blocked",
           (unsigned long long)as.requests, as.seconds, sa.seconds, as.blocked_seconds);
    /* The idle background thread sleeps (condition variable): no CPU time while nothing is queued. */
    struct timespec c0, c1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    usleep(100000);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    double idle_cpu = (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec);
    RCHECK(ctx, idle_cpu < 0.01, "the idle background thread used %.1f ms of CPU in 100 ms", 1e3 * idle_cpu);
    lt_comm_reset_stats(c);
    as = lt_comm_get_async_stats(c);
    sa = lt_comm_get_stats(c);
    RCHECK(ctx, as.requests == 0 && as.seconds == 0 && as.blocked_seconds == 0 && sa.calls == 0,
           "reset_stats leaves async stats");

    /* Round 2: waited out of order; waiting for the last one means every earlier one is done. */
    for (int k = 0; k < K; k++) memcpy(a[k], in[k], nbytes(k));
    for (int k = 0; k < K; k++) r[k] = lt_comm_all_reduce_async(c, a[k], counts[k], dtypes[k], ops[k]);
    RCHECK(ctx, lt_comm_wait(r[K - 1], err, sizeof err) == 0, "%s", err);
    for (int k = 0; k < K - 1; k++) RCHECK(ctx, lt_comm_test(r[k]) == 1, "request %d not finished before %d", k, K - 1);
    static const int order[K - 1] = {2, 0, 3, 1};
    for (int i = 0; i < K - 1; i++)
        RCHECK(ctx, lt_comm_wait(r[order[i]], err, sizeof err) == 0, "wait %d: %s", order[i], err);
    for (int k = 0; k < K; k++)
        RCHECK(ctx, memcmp(a[k], ref[k], nbytes(k)) == 0, "round 2: all_reduce %d differs from the blocking one", k);
    ctx->out->hash[0] = fnv(FNV0, a[0], nbytes(0));
    ctx->out->hash[1] = fnv(FNV0, a[2], nbytes(2));
    sa = lt_comm_get_stats(c);
    RCHECK(ctx, same_stats(sa, sb), "round 2 stats differ");

    /* reduce_scatter, all_gather and all_reduce queued together, against the blocking calls. */
    float *send = malloc(sizeof(float) * RS * n), *mine = malloc(sizeof(float) * RS),
          *mine_ref = malloc(sizeof(float) * RS), *all = malloc(sizeof(float) * RS * n),
          *all_ref = malloc(sizeof(float) * RS * n), *gin = malloc(sizeof(float) * RS);
    fill(send, LT_F32, (int64_t)RS * n, me, 3);
    fill(gin, LT_F32, RS, me, 4);
    memcpy(a[0], in[0], nbytes(0));
    lt_comm_reset_stats(c);
    RCHECK(ctx, lt_comm_reduce_scatter(c, send, mine_ref, RS, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, lt_comm_all_gather(c, gin, all_ref, RS, LT_F32, err, sizeof err) == 0, "%s", err);
    sb = lt_comm_get_stats(c);
    lt_comm_reset_stats(c);
    lt_comm_request *q1 = lt_comm_reduce_scatter_async(c, send, mine, RS, LT_F32, LT_REDUCE_SUM);
    lt_comm_request *q2 = lt_comm_all_reduce_async(c, a[0], counts[0], dtypes[0], ops[0]);
    lt_comm_request *q3 = lt_comm_all_gather_async(c, gin, all, RS, LT_F32);
    RCHECK(ctx, lt_comm_wait(q3, err, sizeof err) == 0, "all_gather: %s", err);
    RCHECK(ctx, lt_comm_wait(q1, err, sizeof err) == 0, "reduce_scatter: %s", err);
    RCHECK(ctx, lt_comm_wait(q2, err, sizeof err) == 0, "all_reduce: %s", err);
    RCHECK(ctx, memcmp(mine, mine_ref, sizeof(float) * RS) == 0, "async reduce_scatter differs");
    RCHECK(ctx, memcmp(all, all_ref, sizeof(float) * RS * n) == 0, "async all_gather differs");
    RCHECK(ctx, memcmp(a[0], ref[0], nbytes(0)) == 0, "all_reduce between them differs");
    sa = lt_comm_get_stats(c);
    RCHECK(ctx, sa.calls == 3 && sa.bytes == sb.bytes + 2 * (uint64_t)(n - 1) * nbytes(0) / (uint64_t)n,
           "mixed stats %llu calls %llu bytes", (unsigned long long)sa.calls, (unsigned long long)sa.bytes);
    ctx->out->hash[2] = fnv(FNV0, all, sizeof(float) * RS * n);

    /* Async, then a blocking call on the same communicator: it waits for the pending ones first. */
    memcpy(a[0], in[0], nbytes(0));
    memcpy(a[2], in[2], nbytes(2));
    q1 = lt_comm_all_reduce_async(c, a[0], counts[0], dtypes[0], ops[0]);
    q2 = lt_comm_all_reduce_async(c, a[2], counts[2], dtypes[2], ops[2]);
    float one = (float)me;
    RCHECK(ctx, lt_comm_all_reduce(c, &one, 1, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, lt_comm_test(q1) == 1 && lt_comm_test(q2) == 1,
           "the blocking call returned before the pending requests finished");
    RCHECK(ctx, one == (float)(n * (n - 1) / 2), "scalar sum %g", one);
    RCHECK(ctx, lt_comm_wait(q1, err, sizeof err) == 0 && lt_comm_wait(q2, err2, sizeof err2) == 0, "%s / %s", err,
           err2);
    RCHECK(ctx, memcmp(a[0], ref[0], nbytes(0)) == 0 && memcmp(a[2], ref[2], nbytes(2)) == 0,
           "async-then-blocking results differ");
    q1 = lt_comm_all_reduce_async(c, a[1], 1, LT_F32, LT_REDUCE_SUM); /* a barrier right behind it */
    RCHECK(ctx, lt_comm_barrier(c, err, sizeof err) == 0 && lt_comm_test(q1) == 1, "barrier after async: %s", err);
    RCHECK(ctx, lt_comm_wait(q1, err, sizeof err) == 0, "%s", err);

    /* Overlap: a large all_reduce runs while the caller computes for 50 ms. */
    float *big = malloc(sizeof(float) * BIG), *big_ref = malloc(sizeof(float) * BIG);
    fill(big, LT_F32, BIG, me, 7);
    memcpy(big_ref, big, sizeof(float) * BIG);
    RCHECK(ctx, lt_comm_all_reduce(c, big_ref, BIG, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "%s", err);
    lt_comm_reset_stats(c);
    /* Rank 0 issues first while the others hold back until it has seen its request pending: the
     * call must return without the collective, and lt_comm_test must say 0. */
    volatile double *go = &ctx->all[0].val[7];
    if (me != 0) {
        double tw = now_s();
        while (*go == 0 && now_s() - tw < 5.0) usleep(100);
    }
    double t0 = now_s();
    lt_comm_request *rb = lt_comm_all_reduce_async(c, big, BIG, LT_F32, LT_REDUCE_SUM);
    if (me == 0) {
        RCHECK(ctx, lt_comm_test(rb) == 0, "lt_comm_test said 1 before the other ranks issued the collective");
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        *go = 1;
    }
    long reps = compute_for(0.05);
    RCHECK(ctx, reps > 0, "the caller's computation went wrong while the all_reduce ran");
    int polls = 0;
    while (!lt_comm_test(rb) && now_s() - t0 < 5.0) {
        polls++;
        usleep(200);
    }
    RCHECK(ctx, lt_comm_test(rb) == 1, "lt_comm_test never became 1");
    RCHECK(ctx, lt_comm_wait(rb, err, sizeof err) == 0, "%s", err);
    RCHECK(ctx, memcmp(big, big_ref, sizeof(float) * BIG) == 0, "overlapped all_reduce differs from the blocking one");
    as = lt_comm_get_async_stats(c);
    RCHECK(ctx, as.requests == 1 && as.blocked_seconds < 1e-3, "after polling, wait still blocked %g s",
           as.blocked_seconds);
    ctx->out->val[0] = as.seconds;
    ctx->out->val[1] = now_s() - t0;

    /* Argument errors surface at wait with the blocking call's message; the communicator stays usable. */
    RCHECK(ctx, lt_comm_all_reduce(c, a[0], -1, LT_F32, LT_REDUCE_SUM, err2, sizeof err2) == -1,
           "blocking accepted -1");
    RCHECK(ctx, lt_comm_wait(lt_comm_all_reduce_async(c, a[0], -1, LT_F32, LT_REDUCE_SUM), err, sizeof err) == -1 &&
                    strcmp(err, err2) == 0,
           "async argument error '%s', blocking '%s'", err, err2);
    RCHECK(ctx, lt_comm_barrier(c, err, sizeof err) == 0, "after an argument error: %s", err);
    RCHECK(ctx, lt_comm_wait(NULL, err, sizeof err) == -1 && lt_comm_test(NULL) == 1, "NULL request");

    for (int k = 0; k < K; k++) free(in[k]), free(ref[k]), free(a[k]);
    free(send), free(mine), free(mine_ref), free(all), free(all_ref), free(gin), free(big), free(big_ref);
    lt_comm_free(c); /* joins the background thread */
    RCHECK(ctx, threads_now() == 1, "lt_comm_free left %d threads", threads_now());
}

/* The last rank never issues the collective: the others' wait reports the timeout naming it, a
 * request queued behind it and a later blocking call report the communicator unusable, and free
 * still joins the thread. */
static void rank_async_timeout(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float x[16] = {0}, y[16] = {0};
    if (ctx->rank == ctx->n - 1) {
        usleep((useconds_t)((ctx->timeout + 1.0) * 1e6));
        lt_comm_free(c);
        return;
    }
    lt_comm_request *r1 = lt_comm_all_reduce_async(c, x, 16, LT_F32, LT_REDUCE_SUM);
    lt_comm_request *r2 = lt_comm_all_reduce_async(c, y, 16, LT_F32, LT_REDUCE_SUM);
    int rc = lt_comm_wait(r1, err, sizeof err);
    char want[64];
    snprintf(want, sizeof want, "rank %d did not arrive", ctx->n - 1);
    RCHECK(ctx, rc != 0 && strstr(err, "all_reduce on communicator 'world'") && strstr(err, want) &&
                    strstr(err, "timed out"),
           "expected a timeout, got %d: %s", rc, err);
    rc = lt_comm_wait(r2, err, sizeof err);
    RCHECK(ctx, rc != 0 && strstr(err, "unusable after an earlier failure") && strstr(err, want),
           "queued request: %d: %s", rc, err);
    rc = lt_comm_barrier(c, err, sizeof err);
    RCHECK(ctx, rc != 0 && strstr(err, "unusable"), "blocking call after: %d: %s", rc, err);
    lt_comm_stats s = lt_comm_get_stats(c);
    /* Like the blocking calls: the timed-out call counts (without bytes); calls refused because the
     * communicator is unusable do not. */
    RCHECK(ctx, s.calls == 1 && s.bytes == 0 && s.seconds >= 0.4, "stats after the timeout: %llu calls %llu bytes",
           (unsigned long long)s.calls, (unsigned long long)s.bytes);
    lt_comm_free(c);
    RCHECK(ctx, threads_now() == 1, "lt_comm_free left %d threads", threads_now());
}

/* The last rank aborts while the others wait for a request: their wait reports the abort (long
 * before the timeout); the aborted rank's later requests fail at once. */
static void rank_async_abort(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float x[16] = {0};
    int last = ctx->rank == ctx->n - 1;
    if (last) {
        usleep(100000);
        lt_comm_abort(c, "stopping for the test");
        int rc = lt_comm_wait(lt_comm_all_reduce_async(c, x, 16, LT_F32, LT_REDUCE_SUM), err, sizeof err);
        RCHECK(ctx, rc != 0 && strstr(err, "this rank aborted: stopping for the test"), "after abort: %d: %s", rc,
               err);
    } else {
        double t0 = now_s();
        int rc = lt_comm_wait(lt_comm_all_reduce_async(c, x, 16, LT_F32, LT_REDUCE_SUM), err, sizeof err);
        char want[96];
        snprintf(want, sizeof want, "rank %d aborted: stopping for the test", ctx->n - 1);
        RCHECK(ctx, rc != 0 && strstr(err, want), "expected the abort, got %d: %s", rc, err);
        RCHECK(ctx, now_s() - t0 < 0.5 * ctx->timeout, "the abort took %.2f s to arrive", now_s() - t0);
    }
    lt_comm_free(c);
    RCHECK(ctx, threads_now() == 1, "lt_comm_free left %d threads", threads_now());
}

int main(void) {
    int sizes[2] = {2, 4};
    for (int i = 0; i < 2; i++) {
        int n = sizes[i];
        run_status st = run_ranks(n, 10.0, rank_async, NULL, 30);
        report_run(n == 2 ? "N=2: async all_reduce x5 (f32 avg/sum, bf16 sum, i32 max, sizes 0..300000) waited in "
                            "order and out of order, FIFO completion, reduce_scatter/all_gather/all_reduce queued "
                            "together, blocking after async, overlap with 50 ms of the caller's work, argument "
                            "errors, statistics equal to blocking, thread started lazily, idle without CPU, joined "
                            "by free"
                          : "N=4: the same",
                   n, &st, 0);
        int same = 1;
        for (int r = 0; r < n; r++)
            for (int h = 0; h < 3; h++) same &= shared_results[r].hash[h] == shared_results[0].hash[h];
        TAP_CHECK(same, "N=%d: async results bit-identical on every rank", n);
        printf("#   N=%d: %.1f MB all_reduce took %.1f ms on the background thread; issue to done while the caller "
               "computed 50 ms: %.1f ms (rank 0)\n",
               n, BIG * 4e-6, 1e3 * shared_results[0].val[0], 1e3 * shared_results[0].val[1]);
    }
    run_status st = run_ranks(3, 0.5, rank_async_timeout, NULL, 30);
    report_run("N=3: a rank that never issues the collective: lt_comm_wait reports the timeout naming it, the "
               "request behind it and a blocking call report the communicator unusable, free joins",
               3, &st, 0);
    st = run_ranks(3, 10.0, rank_async_abort, NULL, 30);
    report_run("N=3: a rank aborts: the others' lt_comm_wait reports it at once; its own later request fails", 3, &st,
               0);
    char names[512] = "";
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind %s", names);
    return tap_done();
}

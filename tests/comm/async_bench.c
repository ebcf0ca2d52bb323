/* How much of an all_reduce the non-blocking path hides behind the caller's computation (the
 * overlap_grad_reduce situation): N forked ranks, an fp32 buffer of `bytes`, and per iteration
 *   blocking:  all_reduce alone (the exposed cost without overlap)
 *   compute:   the caller's work alone (a fixed amount, calibrated on rank 0 to `ms`)
 *   overlap:   all_reduce_async, the same work, lt_comm_wait
 * Prints medians (rank 0) and hidden = 1 - blocked / total, where total is the time the
 * background thread spent in the collective and blocked the time the caller spent in
 * lt_comm_wait (lt_comm_async_stats).
 *   async_bench [ranks=2] [bytes=3400000] [compute ms=20] [iterations=30] */
#include "tests/comm/harness.h"

typedef struct {
    int64_t count;
    double ms;
    int iters;
} bench_arg;

enum { M = 65536, MAXIT = 1000 };
static float x[M];

static double work(long reps) {
    double s = 0;
    for (long r = 0; r < reps; r++)
        for (int i = 0; i < M; i++) s += (double)x[i] * x[i] * (1.0 + 1e-9 * (double)r);
    return s;
}

static int cmp(const void *a, const void *b) {
    double u = *(const double *)a, v = *(const double *)b;
    return u < v ? -1 : u > v;
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void rank_bench(rank_ctx *ctx) {
    const bench_arg *a = ctx->arg;
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    for (int i = 0; i < M; i++) x[i] = (float)(i % 17) * 0.25f;
    /* Calibrate the work on rank 0, the same amount everywhere. */
    double reps = 0;
    if (ctx->rank == 0) {
        double t0 = now_s();
        long r = 0;
        volatile double sink = 0;
        while (now_s() - t0 < 0.2) sink += work(1), r++;
        reps = (double)r * a->ms / 200.0;
    }
    float repf = (float)reps;
    lt_comm_broadcast(c, &repf, 1, LT_F32, 0, err, sizeof err);
    long nreps = (long)repf > 0 ? (long)repf : 1;

    float *buf = malloc((size_t)a->count * 4);
    for (int64_t i = 0; i < a->count; i++) buf[i] = (float)((i + ctx->rank) % 7);
    int iters = a->iters < MAXIT ? a->iters : MAXIT;
    static double tb[MAXIT], tc[MAXIT], ts[MAXIT], tt[MAXIT], tw[MAXIT];
    volatile double sink = 0;
    for (int it = -3; it < iters; it++) { /* 3 warm-up iterations */
        lt_comm_barrier(c, err, sizeof err);
        double t0 = now_s();
        int rc = lt_comm_all_reduce(c, buf, a->count, LT_F32, LT_REDUCE_AVG, err, sizeof err);
        double blocking = now_s() - t0;
        RCHECK(ctx, rc == 0, "%s", err);

        lt_comm_barrier(c, err, sizeof err);
        t0 = now_s();
        sink += work(nreps);
        double compute = now_s() - t0;

        lt_comm_barrier(c, err, sizeof err);
        lt_comm_reset_stats(c);
        t0 = now_s();
        lt_comm_request *r = lt_comm_all_reduce_async(c, buf, a->count, LT_F32, LT_REDUCE_AVG);
        sink += work(nreps);
        rc = lt_comm_wait(r, err, sizeof err);
        double step = now_s() - t0;
        RCHECK(ctx, rc == 0, "%s", err);
        lt_comm_async_stats as = lt_comm_get_async_stats(c);
        if (it < 0) continue;
        tb[it] = blocking, tc[it] = compute, ts[it] = step, tt[it] = as.seconds, tw[it] = as.blocked_seconds;
    }
    (void)sink;
    double hid[MAXIT];
    for (int i = 0; i < iters; i++) hid[i] = tt[i] > 0 ? 1.0 - tw[i] / tt[i] : 0;
    ctx->out->val[0] = median(tb, iters);
    ctx->out->val[1] = median(tc, iters);
    ctx->out->val[2] = median(ts, iters);
    ctx->out->val[3] = median(tt, iters);
    ctx->out->val[4] = median(tw, iters);
    ctx->out->val[5] = median(hid, iters);
    free(buf);
    lt_comm_free(c);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2;
    bench_arg a = {(argc > 2 ? atoll(argv[2]) : 3400000) / 4, argc > 3 ? atof(argv[3]) : 20.0,
                   argc > 4 ? atoi(argv[4]) : 30};
    run_status st = run_ranks(n, 30.0, rank_bench, &a, 600);
    if (!report_run("async_bench", n, &st, 0)) return 1;
    for (int r = 0; r < n; r++) {
        const double *v = shared_results[r].val;
        printf("rank %d: %d ranks, %.2f MB fp32, medians of %d: blocking all_reduce %.2f ms | compute alone %.2f ms | "
               "async + compute + wait %.2f ms | comm thread %.2f ms, caller blocked %.2f ms | hidden %.0f%% "
               "(median of per-iteration 1 - blocked/thread; from medians %.0f%%) | step saved vs blocking %.2f ms\n",
               r, n, a.count * 4e-6, a.iters, 1e3 * v[0], 1e3 * v[1], 1e3 * v[2], 1e3 * v[3], 1e3 * v[4],
               100 * v[5], 100 * (1 - v[4] / v[3]), 1e3 * (v[0] + v[1] - v[2]));
    }
    return 0;
}

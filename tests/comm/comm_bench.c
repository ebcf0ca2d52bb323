/* all_reduce bandwidth of the shm backend: N forked ranks, an fp32 buffer of M MiB.
 *   comm_bench [ranks=2] [MiB=100] [iterations=10]
 * Prints the best and mean time per all_reduce, the algorithm bandwidth (buffer bytes / time)
 * and the bus bandwidth (algbw * 2(N-1)/N, the ring convention), next to a single-process memcpy
 * of the same buffer for scale. */
#include "tests/comm/harness.h"

typedef struct {
    int64_t count;
    int iters;
} bench_arg;

static void rank_bench(rank_ctx *ctx) {
    const bench_arg *a = ctx->arg;
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float *buf = malloc((size_t)a->count * 4);
    for (int64_t i = 0; i < a->count; i++) buf[i] = (float)((i + ctx->rank) % 7);
    int rc = lt_comm_all_reduce(c, buf, a->count, LT_F32, LT_REDUCE_SUM, err, sizeof err); /* warm up */
    RCHECK(ctx, rc == 0, "all_reduce: %s", err);
    double best = 1e30, total = 0;
    for (int it = 0; it < a->iters && rc == 0; it++) {
        lt_comm_barrier(c, err, sizeof err);
        double t0 = now_s();
        rc = lt_comm_all_reduce(c, buf, a->count, LT_F32, LT_REDUCE_AVG, err, sizeof err);
        double dt = now_s() - t0;
        RCHECK(ctx, rc == 0, "all_reduce: %s", err);
        if (dt < best) best = dt;
        total += dt;
    }
    ctx->out->val[0] = best;
    ctx->out->val[1] = total / a->iters;
    free(buf);
    lt_comm_free(c);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2;
    double mib = argc > 2 ? atof(argv[2]) : 100;
    bench_arg a = {(int64_t)(mib * 1048576 / 4), argc > 3 ? atoi(argv[3]) : 10};
    if (n < 1 || n > MAX_RANKS || a.count < 1 || a.iters < 1) {
        fprintf(stderr, "usage: comm_bench [ranks 1..%d] [MiB] [iterations]\n", MAX_RANKS);
        return 2;
    }
    size_t bytes = (size_t)a.count * 4;
    /* memcpy reference */
    char *x = malloc(bytes), *y = malloc(bytes);
    memset(x, 1, bytes);
    memset(y, 2, bytes);
    double mbest = 1e30;
    for (int i = 0; i < 5; i++) {
        double t0 = now_s();
        memcpy(y, x, bytes);
        double dt = now_s() - t0;
        if (dt < mbest) mbest = dt;
    }
    free(x);
    free(y);
    run_status st = run_ranks(n, 60, rank_bench, &a, 600);
    double best = 0, mean = 0;
    for (int r = 0; r < n; r++) {
        if (st.exited[r] || shared_results[r].fails) {
            fprintf(stderr, "rank %d failed: %s\n", r, shared_results[r].msg);
            return 1;
        }
        if (shared_results[r].val[0] > best) best = shared_results[r].val[0];
        mean += shared_results[r].val[1] / n;
    }
    double gb = bytes / 1e9;
    printf("all_reduce fp32 %lld elements (%.3g MiB), %d ranks, %d iterations: best %.1f us, mean %.1f us\n",
           (long long)a.count, bytes / 1048576.0, n, a.iters, best * 1e6, mean * 1e6);
    printf("  algbw %.2f GB/s (best) %.2f GB/s (mean), busbw %.2f GB/s (best)\n", gb / best, gb / mean,
           gb / best * 2.0 * (n - 1) / n);
    printf("  memcpy of the same buffer, one process: %.2f ms = %.2f GB/s\n", mbest * 1e3, gb / mbest);
    return 0;
}

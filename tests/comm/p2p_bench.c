/* Pairwise exchange through the shm backend (what a pipeline stage does with its neighbour in
 * 1F1B's steady state): two forked ranks swap a message of B bytes each way, either in one
 * lt_comm_batch_p2p (both directions at once) or with blocking calls in turn (rank 0 sends then
 * receives, rank 1 the reverse: the only order blocking sends allow). Prints a markdown table:
 * median time per exchange, the bandwidth per direction (B / time) and both together (2B / time),
 * next to a one-process memcpy of B bytes for scale.
 *   p2p_bench [iterations per size=50]   (sizes 4 B .. 64 MiB) */
#include "tests/comm/harness.h"

static const int64_t SIZES[] = {4, 4096, 65536, 1 << 20, 8 << 20, 64 << 20};
#define NSIZES ((int)(sizeof SIZES / sizeof SIZES[0]))

typedef struct {
    int iters;
    int batched;
} bench_arg;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void rank_bench(rank_ctx *ctx) {
    const bench_arg *a = ctx->arg;
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    int me = ctx->rank, peer = 1 - me;
    double *times = malloc(sizeof(double) * (size_t)a->iters);
    for (int k = 0; k < NSIZES; k++) {
        int64_t bytes = SIZES[k];
        uint8_t *s = malloc((size_t)bytes), *r = malloc((size_t)bytes);
        memset(s, me + 1, (size_t)bytes);
        memset(r, 0, (size_t)bytes);
        int iters = bytes >= (8 << 20) ? (a->iters + 4) / 5 : a->iters;
        int rc = 0;
        for (int it = -2; it < iters && rc == 0; it++) { /* two warm-up exchanges */
            lt_comm_barrier(c, err, sizeof err);
            double t0 = now_s();
            if (a->batched) {
                lt_comm_p2p_op ops[2] = {{LT_P2P_SEND, s, bytes / 4, LT_I32, peer}, {LT_P2P_RECV, r, bytes / 4, LT_I32, peer}};
                rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
            } else if (me == 0) {
                rc = lt_comm_send(c, s, bytes / 4, LT_I32, peer, err, sizeof err);
                if (!rc) rc = lt_comm_recv(c, r, bytes / 4, LT_I32, peer, err, sizeof err);
            } else {
                rc = lt_comm_recv(c, r, bytes / 4, LT_I32, peer, err, sizeof err);
                if (!rc) rc = lt_comm_send(c, s, bytes / 4, LT_I32, peer, err, sizeof err);
            }
            if (it >= 0) times[it] = now_s() - t0;
        }
        RCHECK(ctx, rc == 0, "exchange of %lld bytes: %s", (long long)bytes, err);
        RCHECK(ctx, r[0] == peer + 1 && r[bytes - 1] == peer + 1, "exchange of %lld bytes: wrong data", (long long)bytes);
        qsort(times, (size_t)iters, sizeof(double), cmp_double);
        ctx->out->val[k] = times[iters / 2];
        free(s);
        free(r);
        if (rc) break;
    }
    free(times);
    lt_comm_free(c);
}

int main(int argc, char **argv) {
    bench_arg a = {argc > 1 ? atoi(argv[1]) : 50, 1};
    if (a.iters < 1) {
        fprintf(stderr, "usage: p2p_bench [iterations per size]\n");
        return 2;
    }
    double med[2][NSIZES];
    for (int b = 0; b < 2; b++) {
        a.batched = 1 - b;
        run_status st = run_ranks(2, 60, rank_bench, &a, 600);
        for (int r = 0; r < 2; r++)
            if (st.exited[r] || shared_results[r].fails) {
                fprintf(stderr, "rank %d failed: %s\n", r, shared_results[r].msg);
                return 1;
            }
        for (int k = 0; k < NSIZES; k++)
            med[b][k] = shared_results[0].val[k] > shared_results[1].val[k] ? shared_results[0].val[k] : shared_results[1].val[k];
    }
    printf("| bytes each way | batch_p2p us | per direction GB/s | both GB/s | blocking in turn us | both GB/s | "
           "batch speed-up | memcpy GB/s |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int k = 0; k < NSIZES; k++) {
        int64_t bytes = SIZES[k];
        char *x = malloc((size_t)bytes), *y = malloc((size_t)bytes);
        memset(x, 1, (size_t)bytes);
        memset(y, 2, (size_t)bytes);
        double mbest = 1e30;
        for (int i = 0; i < 5; i++) {
            double t0 = now_s();
            memcpy(y, x, (size_t)bytes);
            double dt = now_s() - t0;
            if (dt < mbest) mbest = dt;
        }
        free(x);
        free(y);
        double gb = (double)bytes / 1e9;
        printf("| %lld | %.1f | %.2f | %.2f | %.1f | %.2f | %.2fx | %.2f |\n", (long long)bytes, med[0][k] * 1e6,
               gb / med[0][k], 2 * gb / med[0][k], med[1][k] * 1e6, 2 * gb / med[1][k], med[1][k] / med[0][k],
               gb / mbest);
    }
    return 0;
}

/* The nccl backend of lt_comm (engine/comm/nccl.c over lt_backend.comm, engine/ops/cuda/nccl.cu).
 *
 * Every check runs in forked ranks (tests/comm/harness.h): the parent never touches CUDA, so the
 * ranks of the multi-GPU part can still open their own GPU after fork.
 *   1. One rank (the only layout one GPU allows: NCCL refuses two ranks on one GPU): a shm world of
 *      1 and an NCCL communicator over it; all_reduce sum/avg/max, reduce_scatter, all_gather,
 *      broadcast, all_to_all on device buffers (fp32 and bf16) written by a kernel just before (the
 *      collective must wait for it), compared after to_host; the non-blocking path (the background
 *      thread); barrier; statistics; lt_comm_group refused; the CPU backend refused.
 *   2. LUATRON_NCCL_TEST_RANKS=N (N GPUs; unset: SKIP): N ranks, rank r on GPU r, every collective
 *      with rank-dependent data, send/recv in a ring, the four-way exchange in one lt_comm_batch_p2p.
 * Without a GPU the plugin must still load and report "no GPU"; without libnccl.so.2 the
 * communicator must fail with "NCCL is not available"; under the emulated plugin (--emulated) with
 * "NCCL is not available under the emulator". The device checks are then "ok ... # SKIP <reason>". */
#define _GNU_SOURCE
#include <limits.h>
#include <math.h>

#include "engine/ops/backend.h"
#include "tests/comm/harness.h"

static const char *const DEVICE_CHECKS[] = {
    "NCCL communicator over a shm world of 1: name, rank, size",
    "all_reduce sum/avg/max fp32 after a kernel wrote the buffer",
    "all_reduce sum/avg/max bf16",
    "reduce_scatter fp32 and bf16",
    "all_gather fp32 and bf16",
    "broadcast fp32 and bf16",
    "all_to_all int32",
    "non-blocking all_reduce and reduce_scatter on the background thread",
    "barrier",
    "statistics counted (calls, bytes)",
    "lt_comm_group refused with a hint",
};
#define NCHECKS ((int)(sizeof DEVICE_CHECKS / sizeof DEVICE_CHECKS[0]))

static void locate_plugin(void) {
    char buf[PATH_MAX + 64], cwd[PATH_MAX];
    const char *env = getenv("LUATRON_CUDA_PLUGIN");
    if (env && *env && env[0] != '/' && getcwd(cwd, sizeof cwd)) {
        snprintf(buf, sizeof buf, "%s/%s", cwd, env);
        setenv("LUATRON_CUDA_PLUGIN", buf, 1);
    }
}

static uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float float_of_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- one rank ---- */

enum { N1 = 4096 };

static void skip_all(const char *why) {
    for (int i = 0; i < NCHECKS; i++) printf("ok %d - %s # SKIP %s\n", ++tap_count, DEVICE_CHECKS[i], why);
}

/* Runs in the forked rank: prints its TAP lines, hands tap_count / tap_failed back in val[0..1]. */
static void single_rank(rank_ctx *ctx) {
    const int emulated = *(const int *)ctx->arg;
    char err[512] = "";
    lt_comm *host = make_world(ctx, err, sizeof err);
    TAP_CHECK(host != NULL, "shm world of 1 (%s)", host ? "ok" : err);
    if (!host) goto out;
    lt_comm *bad = lt_comm_nccl(host, "cpu", lt_backend_cpu()->comm, err, sizeof err);
    TAP_CHECK(!bad && strstr(err, "no device collectives"), "the CPU backend is refused: %s", err);

    const lt_backend *be = lt_backend_get("cuda", err, sizeof err);
    if (!be) {
        /* the plugin loaded and found no GPU: anything else (no plugin, bad symbol) is a failure */
        TAP_CHECK(strstr(err, "no GPU") != NULL, "the CUDA plugin loads and reports no GPU (%s)", err);
        skip_all(err);
        goto out_host;
    }
    TAP_CHECK(be->comm != NULL && strcmp(be->comm->name, "nccl") == 0, "the CUDA backend has device collectives");
    lt_comm *c = lt_comm_nccl(host, be->name, be->comm, err, sizeof err);
    if (!c) {
        if (emulated) {
            TAP_CHECK(strstr(err, "NCCL is not available under the emulator") && strstr(err, "'world'"),
                      "the emulated plugin reports no NCCL, naming the communicator: %s", err);
        } else {
            TAP_CHECK(strstr(err, "NCCL is not available") != NULL && strstr(err, "LUATRON_NCCL_LIB") != NULL,
                      "without NCCL the error says what to do: %s", err);
        }
        /* the host communicator still works after the failed start */
        int32_t x = 7;
        TAP_CHECK(lt_comm_broadcast(host, &x, 1, LT_I32, 0, err, sizeof err) == 0 && x == 7,
                  "the host communicator is usable after a failed NCCL start");
        skip_all(err);
        goto out_host;
    }
    TAP_CHECK(!emulated, "the NCCL communicator starts (not under the emulator)");
    TAP_CHECK(strcmp(lt_comm_name(c), "world/nccl") == 0 && lt_comm_rank(c) == 0 && lt_comm_size(c) == 1,
              "%s: name %s, rank %d, size %d", DEVICE_CHECKS[0], lt_comm_name(c), lt_comm_rank(c), lt_comm_size(c));
    lt_comm_reset_stats(c);
    uint64_t calls = 0, bytes = 0;

    float *h = malloc(sizeof(float) * N1), *h2 = malloc(sizeof(float) * N1);
    uint16_t *hb = malloc(2 * N1), *hb2 = malloc(2 * N1);
    float *d = be->alloc(sizeof(float) * N1), *d2 = be->alloc(sizeof(float) * N1);
    void *db = be->alloc(2 * N1), *db2 = be->alloc(2 * N1);
    int ok;

    /* all_reduce fp32: a kernel (fill) writes the buffer just before; world 1: the result is the input */
    static const lt_reduce_op OPS[3] = {LT_REDUCE_SUM, LT_REDUCE_AVG, LT_REDUCE_MAX};
    ok = 1;
    for (int o = 0; o < 3; o++) {
        be->fill(d, N1, 1.5f + (float)o);
        ok &= lt_comm_all_reduce(c, d, N1, LT_F32, OPS[o], err, sizeof err) == 0;
        calls++;
        be->to_host(h, d, sizeof(float) * N1);
        for (int i = 0; i < N1; i++) ok &= h[i] == 1.5f + (float)o;
    }
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[1], err);

    /* bf16 */
    ok = 1;
    for (int i = 0; i < N1; i++) hb[i] = bf16_of((float)(i % 97) - 40.0f);
    for (int o = 0; o < 3; o++) {
        be->to_device(db, hb, 2 * N1);
        ok &= lt_comm_all_reduce(c, db, N1, LT_BF16, OPS[o], err, sizeof err) == 0;
        calls++;
        be->to_host(hb2, db, 2 * N1);
        ok &= memcmp(hb, hb2, 2 * N1) == 0;
    }
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[2], err);

    /* reduce_scatter: out of place, world 1: recv = send */
    ok = 1;
    for (int i = 0; i < N1; i++) h[i] = (float)i * 0.25f - 100.0f;
    be->to_device(d, h, sizeof(float) * N1);
    be->memzero(d2, sizeof(float) * N1);
    ok &= lt_comm_reduce_scatter(c, d, d2, N1, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0;
    be->to_host(h2, d2, sizeof(float) * N1);
    ok &= memcmp(h, h2, sizeof(float) * N1) == 0;
    be->to_device(db, hb, 2 * N1);
    be->memzero(db2, 2 * N1);
    ok &= lt_comm_reduce_scatter(c, db, db2, N1, LT_BF16, LT_REDUCE_AVG, err, sizeof err) == 0;
    be->to_host(hb2, db2, 2 * N1);
    ok &= memcmp(hb, hb2, 2 * N1) == 0;
    calls += 2;
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[3], err);

    /* all_gather */
    ok = 1;
    be->memzero(d2, sizeof(float) * N1);
    ok &= lt_comm_all_gather(c, d, d2, N1, LT_F32, err, sizeof err) == 0;
    be->to_host(h2, d2, sizeof(float) * N1);
    ok &= memcmp(h, h2, sizeof(float) * N1) == 0;
    be->memzero(db2, 2 * N1);
    ok &= lt_comm_all_gather(c, db, db2, N1, LT_BF16, err, sizeof err) == 0;
    be->to_host(hb2, db2, 2 * N1);
    ok &= memcmp(hb, hb2, 2 * N1) == 0;
    calls += 2;
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[4], err);

    /* broadcast (counts count * B on every rank) */
    ok = 1;
    ok &= lt_comm_broadcast(c, d, N1, LT_F32, 0, err, sizeof err) == 0;
    be->to_host(h2, d, sizeof(float) * N1);
    ok &= memcmp(h, h2, sizeof(float) * N1) == 0;
    ok &= lt_comm_broadcast(c, db, N1, LT_BF16, 0, err, sizeof err) == 0;
    be->to_host(hb2, db, 2 * N1);
    ok &= memcmp(hb, hb2, 2 * N1) == 0;
    calls += 2;
    bytes += sizeof(float) * N1 + 2 * N1;
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[5], err);

    /* all_to_all: one block to itself */
    ok = 1;
    {
        int32_t *hi = (int32_t *)h, *hi2 = (int32_t *)h2;
        for (int i = 0; i < N1; i++) hi[i] = i * 3 - 7;
        be->to_device(d, hi, 4 * N1);
        be->memzero(d2, 4 * N1);
        int64_t sc[1] = {N1}, rc[1] = {N1};
        ok &= lt_comm_all_to_all(c, d, sc, d2, rc, LT_I32, err, sizeof err) == 0;
        be->to_host(hi2, d2, 4 * N1);
        ok &= memcmp(hi, hi2, 4 * N1) == 0;
        calls++;
    }
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[6], err);

    /* non-blocking: the background thread issues on the comm stream (its own CUDA device setting) */
    ok = 1;
    be->fill(d, N1, -2.25f);
    lt_comm_request *r1 = lt_comm_all_reduce_async(c, d, N1, LT_F32, LT_REDUCE_AVG);
    lt_comm_request *r2 = lt_comm_reduce_scatter_async(c, db, db2, N1, LT_BF16, LT_REDUCE_MAX);
    ok &= lt_comm_wait(r1, err, sizeof err) == 0;
    ok &= lt_comm_wait(r2, err, sizeof err) == 0;
    calls += 2;
    be->to_host(h2, d, sizeof(float) * N1);
    for (int i = 0; i < N1; i++) ok &= h2[i] == -2.25f;
    be->to_host(hb2, db2, 2 * N1);
    ok &= memcmp(hb, hb2, 2 * N1) == 0;
    TAP_CHECK(ok, "%s (%s)", DEVICE_CHECKS[7], err);

    TAP_CHECK(lt_comm_barrier(c, err, sizeof err) == 0, "%s (%s)", DEVICE_CHECKS[8], err);
    calls++;

    lt_comm_stats s = lt_comm_get_stats(c);
    TAP_CHECK(s.calls == calls && s.bytes == bytes, "%s: %llu calls (expected %llu), %llu bytes (expected %llu)",
              DEVICE_CHECKS[9], (unsigned long long)s.calls, (unsigned long long)calls,
              (unsigned long long)s.bytes, (unsigned long long)bytes);

    int only[1] = {0};
    lt_comm *g = lt_comm_group(c, only, 1, "g", err, sizeof err);
    TAP_CHECK(!g && strstr(err, "lt_comm_nccl"), "%s: %s", DEVICE_CHECKS[10], err);

    char serr[512];
    TAP_CHECK(be->synchronize(serr, sizeof serr) == 0, "no device error after the collectives (%s)", serr);
    be->release(d, sizeof(float) * N1);
    be->release(d2, sizeof(float) * N1);
    be->release(db, 2 * N1);
    be->release(db2, 2 * N1);
    free(h), free(h2), free(hb), free(hb2);
    lt_comm_free(c);
out_host:
    lt_comm_free(host);
out:
    fflush(stdout);
    ctx->out->val[0] = tap_count;
    ctx->out->val[1] = tap_failed;
}

/* ---- N ranks, one GPU each ---- */

enum { NM = 1 << 16 };

static void multi_rank(rank_ctx *ctx) {
    char dev[16], err[512] = "";
    snprintf(dev, sizeof dev, "%d", ctx->rank);
    setenv("LUATRON_CUDA_DEVICE", dev, 1);
    const int n = ctx->n, me = ctx->rank;
    lt_comm *host = make_world(ctx, err, sizeof err);
    RCHECK(ctx, host, "shm world: %s", err);
    if (!host) return;
    const lt_backend *be = lt_backend_get("cuda", err, sizeof err);
    RCHECK(ctx, be, "cuda on GPU %d: %s", me, err);
    if (!be) return;
    lt_comm *c = lt_comm_nccl(host, be->name, be->comm, err, sizeof err);
    RCHECK(ctx, c, "NCCL: %s", err);
    if (!c) return;
    float *h = malloc(sizeof(float) * NM * n), *h2 = malloc(sizeof(float) * NM * n);
    uint16_t *hb = malloc(2 * (size_t)NM * n), *hb2 = malloc(2 * (size_t)NM * n);
    float *d = be->alloc(sizeof(float) * NM * n), *d2 = be->alloc(sizeof(float) * NM * n);
    uint16_t *db = be->alloc(2 * (size_t)NM * n);
    /* rank r's element i: (r + 1) * (i % 13 + 1): small integers, exact in fp32 and bf16 */
#define VAL(r, i) ((float)(((r) + 1) * ((i) % 13 + 1)))
    const float sum_r = (float)(n * (n + 1) / 2);
    static const lt_reduce_op OPS[3] = {LT_REDUCE_SUM, LT_REDUCE_AVG, LT_REDUCE_MAX};
    for (int o = 0; o < 3; o++) {
        for (int i = 0; i < NM; i++) h[i] = VAL(me, i), hb[i] = bf16_of(VAL(me, i));
        be->to_device(d, h, sizeof(float) * NM);
        be->to_device(db, hb, 2 * NM);
        int rc = lt_comm_all_reduce(c, d, NM, LT_F32, OPS[o], err, sizeof err);
        if (!rc) rc = lt_comm_all_reduce(c, db, NM, LT_BF16, OPS[o], err, sizeof err);
        RCHECK(ctx, rc == 0, "all_reduce %d: %s", o, err);
        be->to_host(h2, d, sizeof(float) * NM);
        be->to_host(hb2, db, 2 * NM);
        int bad = 0;
        for (int i = 0; i < NM; i++) {
            float k = (float)(i % 13 + 1);
            float want = o == 0 ? sum_r * k : o == 1 ? sum_r * k / (float)n : (float)n * k;
            bad += fabsf(h2[i] - want) > 1e-5f * fabsf(want);
            bad += fabsf(float_of_bf16(hb2[i]) - want) > 1e-2f * fabsf(want);
        }
        RCHECK(ctx, bad == 0, "all_reduce op %d: %d wrong elements", o, bad);
    }
    /* reduce_scatter: rank r gets block r summed */
    for (int i = 0; i < NM * n; i++) h[i] = VAL(me, i);
    be->to_device(d, h, sizeof(float) * NM * n);
    RCHECK(ctx, lt_comm_reduce_scatter(c, d, d2, NM, LT_F32, LT_REDUCE_SUM, err, sizeof err) == 0, "rs: %s", err);
    be->to_host(h2, d2, sizeof(float) * NM);
    int bad = 0;
    for (int i = 0; i < NM; i++) bad += h2[i] != sum_r * (float)((me * NM + i) % 13 + 1);
    RCHECK(ctx, bad == 0, "reduce_scatter: %d wrong", bad);
    /* all_gather: block r is rank r's */
    for (int i = 0; i < NM; i++) h[i] = VAL(me, i);
    be->to_device(d, h, sizeof(float) * NM);
    RCHECK(ctx, lt_comm_all_gather(c, d, d2, NM, LT_F32, err, sizeof err) == 0, "ag: %s", err);
    be->to_host(h2, d2, sizeof(float) * NM * n);
    bad = 0;
    for (int r = 0; r < n; r++)
        for (int i = 0; i < NM; i++) bad += h2[r * NM + i] != VAL(r, i);
    RCHECK(ctx, bad == 0, "all_gather: %d wrong", bad);
    /* broadcast from the last rank */
    be->to_device(d, h, sizeof(float) * NM);
    RCHECK(ctx, lt_comm_broadcast(c, d, NM, LT_F32, n - 1, err, sizeof err) == 0, "bcast: %s", err);
    be->to_host(h2, d, sizeof(float) * NM);
    bad = 0;
    for (int i = 0; i < NM; i++) bad += h2[i] != VAL(n - 1, i);
    RCHECK(ctx, bad == 0, "broadcast: %d wrong", bad);
    /* ring: send to me+1, receive from me-1 (grouping is NCCL's: even ranks send first) */
    int rc = 0;
    if (me % 2 == 0) {
        rc = lt_comm_send(c, d, NM, LT_F32, (me + 1) % n, err, sizeof err);
        if (!rc) rc = lt_comm_recv(c, d2, NM, LT_F32, (me + n - 1) % n, err, sizeof err);
    } else {
        rc = lt_comm_recv(c, d2, NM, LT_F32, (me + n - 1) % n, err, sizeof err);
        if (!rc) rc = lt_comm_send(c, d, NM, LT_F32, (me + 1) % n, err, sizeof err);
    }
    RCHECK(ctx, rc == 0, "send/recv: %s", err);
    /* the interleaved schedule's exchange in one batch (one NCCL group): send to next and prev,
     * receive from prev and next, every rank posting its sends first */
    {
        const int next = (me + 1) % n, prev = (me + n - 1) % n;
        for (int i = 0; i < NM; i++) h[i] = (float)(me * 10000 + i % 1000), h[NM + i] = (float)(me * 10000 + 5000 + i % 1000);
        be->to_device(d, h, sizeof(float) * 2 * NM);
        lt_comm_p2p_op ops[4] = {{LT_P2P_SEND, d, NM, LT_F32, next}, {LT_P2P_SEND, d + NM, NM, LT_F32, prev},
                                 {LT_P2P_RECV, d2, NM, LT_F32, prev}, {LT_P2P_RECV, d2 + NM, NM, LT_F32, next}};
        rc = lt_comm_batch_p2p(c, ops, 4, err, sizeof err);
        RCHECK(ctx, rc == 0, "batch_p2p: %s", err);
        be->to_host(h2, d2, sizeof(float) * 2 * NM);
        int wrong = 0;
        for (int i = 0; i < NM; i++) {
            wrong += h2[i] != (float)(prev * 10000 + i % 1000);
            wrong += h2[NM + i] != (float)(next * 10000 + 5000 + i % 1000);
        }
        RCHECK(ctx, wrong == 0, "batch_p2p four-way exchange: %d wrong elements", wrong);
    }
    /* all_to_all: NM / n elements to each rank, value = sender * 1000 + receiver */
    const int64_t blk = NM / n;
    int64_t sc[MAX_RANKS], rcn[MAX_RANKS];
    for (int r = 0; r < n; r++) {
        sc[r] = rcn[r] = blk;
        for (int64_t i = 0; i < blk; i++) h[r * blk + i] = (float)(me * 1000 + r);
    }
    be->to_device(d, h, sizeof(float) * blk * n);
    RCHECK(ctx, lt_comm_all_to_all(c, d, sc, d2, rcn, LT_F32, err, sizeof err) == 0, "a2a: %s", err);
    be->to_host(h2, d2, sizeof(float) * blk * n);
    bad = 0;
    for (int r = 0; r < n; r++)
        for (int64_t i = 0; i < blk; i++) bad += h2[r * blk + i] != (float)(r * 1000 + me);
    RCHECK(ctx, bad == 0, "all_to_all: %d wrong", bad);
    RCHECK(ctx, lt_comm_barrier(c, err, sizeof err) == 0, "barrier: %s", err);
    lt_comm_stats s = lt_comm_get_stats(c);
    RCHECK(ctx, s.calls == 6 + 1 + 1 + 1 + 2 + 4 + 1 + 1, "stats: %llu calls", (unsigned long long)s.calls);
    be->release(d, sizeof(float) * NM * n);
    be->release(d2, sizeof(float) * NM * n);
    be->release(db, 2 * (size_t)NM * n);
    free(h), free(h2), free(hb), free(hb2);
    lt_comm_free(c);
    lt_comm_free(host);
}

int main(int argc, char **argv) {
    int emulated = argc > 1 && strcmp(argv[1], "--emulated") == 0;
    locate_plugin();
    printf("# plugin: %s%s\n", getenv("LUATRON_CUDA_PLUGIN") ? getenv("LUATRON_CUDA_PLUGIN") : "(beside the executable)",
           emulated ? " (emulated)" : "");
    run_status st = run_ranks(1, 30.0, single_rank, &emulated, 120.0);
    if (st.timed_out || st.exited[0] != 0) {
        TAP_CHECK(0, "the one-rank checks finished (exit %d%s)", st.exited[0], st.timed_out ? ", timed out" : "");
    } else {
        tap_count = (int)shared_results[0].val[0];
        tap_failed = (int)shared_results[0].val[1];
    }
    const char *ranks = getenv("LUATRON_NCCL_TEST_RANKS");
    int n = ranks ? atoi(ranks) : 0;
    if (n >= 2 && n <= MAX_RANKS && !emulated) {
        run_status ms = run_ranks(n, 60.0, multi_rank, NULL, 300.0);
        char label[96];
        snprintf(label, sizeof label, "%d ranks on %d GPUs: every collective, send/recv ring, batch_p2p four-way, statistics", n, n);
        report_run(label, n, &ms, 0);
    } else {
        printf("ok %d - N ranks on N GPUs # SKIP set LUATRON_NCCL_TEST_RANKS=N (2..%d) on a machine with N GPUs\n",
               ++tap_count, MAX_RANKS);
    }
    return tap_done();
}

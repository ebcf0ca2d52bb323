/* What the tensor-parallel tests (tp_test.c, vocab_test.c) share: a seeded generator for their data
 * (every rank draws every rank's data, so each knows what a collective must give), and the ring
 * volumes a call's statistics must equal. Include after tests/comm/harness.h. */
#ifndef LT_TESTS_PARALLEL_TP_TESTUTIL_H
#define LT_TESTS_PARALLEL_TP_TESTUTIL_H

static uint64_t rng_state;
static uint32_t next_u32(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() >> 8) / 16777216.0f; }

static float *fvec(size_t n, float lo, float hi) {
    float *x = malloc(n * sizeof(float) + 4);
    for (size_t i = 0; i < n; i++) x[i] = uniform(lo, hi);
    return x;
}

/* Bytes a rank sends: all-reduce 2 (TP-1)/TP of the buffer; reduce-scatter and all-gather (TP-1)/TP. */
static uint64_t ring_all_reduce(int tp, uint64_t bytes) { return 2 * (uint64_t)(tp - 1) * bytes / (uint64_t)tp; }
static uint64_t ring_half(int tp, uint64_t bytes) { return (uint64_t)(tp - 1) * bytes / (uint64_t)tp; }

/* c's calls and bytes since the last check equal the analytic ones (then the statistics restart). */
static int check_stats(rank_ctx *ctx, lt_comm *c, const char *what, uint64_t calls, uint64_t bytes) {
    lt_comm_stats st = lt_comm_get_stats(c);
    RCHECK(ctx, st.calls == calls && st.bytes == bytes, "%s: %llu calls / %llu bytes, analytic %llu / %llu", what,
           (unsigned long long)st.calls, (unsigned long long)st.bytes, (unsigned long long)calls,
           (unsigned long long)bytes);
    lt_comm_reset_stats(c);
    return st.calls == calls && st.bytes == bytes;
}

#endif

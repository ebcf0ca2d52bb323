/* What the tensor- and context-parallel tests (tp_test.c, vocab_test.c, cp_test.c) share: a seeded
 * generator for their data (every rank draws every rank's data, so each knows what a collective must
 * give), conversions between the test's fp32 host data and an op table's dtype (the CPU backend's
 * memory is the host's), the ring volumes a call's statistics must equal, and ranks run in pairs.
 * Include after tests/comm/harness.h. */
#ifndef LT_TESTS_PARALLEL_TP_TESTUTIL_H
#define LT_TESTS_PARALLEL_TP_TESTUTIL_H

#include "engine/core/tensor.h"

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

/* Values of x representable in dtype (rounded to bf16 in place), so that data converted to the ops'
 * dtype and back is the data itself. */
static void quantize(lt_dtype dtype, float *x, size_t n) {
    if (dtype == LT_BF16)
        for (size_t i = 0; i < n; i++) x[i] = lt_bf16_to_f32(lt_f32_to_bf16(x[i]));
}

/* A new buffer of dtype holding x (rounded to bf16 for LT_BF16). */
static void *to_dtype(lt_dtype dtype, const float *x, size_t n) {
    if (dtype == LT_F32) {
        float *y = malloc(n * sizeof(float) + 4);
        memcpy(y, x, n * sizeof(float));
        return y;
    }
    uint16_t *y = malloc(n * sizeof(uint16_t) + 4);
    for (size_t i = 0; i < n; i++) y[i] = lt_f32_to_bf16(x[i]);
    return y;
}

/* A new fp32 copy of n values of dtype. */
static float *to_f32(lt_dtype dtype, const void *x, size_t n) {
    float *y = malloc(n * sizeof(float) + 4);
    if (dtype == LT_F32) memcpy(y, x, n * sizeof(float));
    else
        for (size_t i = 0; i < n; i++) y[i] = lt_bf16_to_f32(((const uint16_t *)x)[i]);
    return y;
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

/* Ranks in pairs ({0,1}, {2,3}, ...), each pair on its own: run(ctx, pair, which) on a group `name` of
 * the caller's pair (which: 0 for the first pair, ...), checking that nothing went over the world. */
static void in_pairs(rank_ctx *ctx, const char *name, void (*run)(rank_ctx *, lt_comm *, int)) {
    char err[512] = "";
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    const int which = ctx->rank / 2, ranks[2] = {2 * which, 2 * which + 1};
    lt_comm *pair = lt_comm_group(w, ranks, 2, name, err, sizeof err);
    RCHECK(ctx, pair, "%s group: %s", name, err);
    if (pair) {
        lt_comm_reset_stats(w);
        run(ctx, pair, which);
        lt_comm_stats st = lt_comm_get_stats(w);
        RCHECK(ctx, st.calls == 0, "the world communicator was used (%llu calls)", (unsigned long long)st.calls);
        lt_comm_free(pair);
    }
    lt_comm_free(w);
}

#endif

/* Tensor- and sequence-parallel mappings and linear layers (engine/parallel/tp.h) with real processes
 * (fork, shm communicators) at TP = 1, 2 and 4.
 *
 * - Mappings: every rank draws every rank's data from a fixed seed, so it knows what each collective
 *   must give. Splits, gathers and identities are compared exactly; the sums (all-reduce,
 *   reduce-scatter) against the sum in rank order 0, 1, ... (the communicator's documented order), also
 *   exactly. Each call's collectives and bytes equal the ring volumes.
 * - The MLP pattern: x -> ColumnParallelLinear (C -> F, bias) -> GELU -> RowParallelLinear (F -> C,
 *   bias, residual x), with and without sequence parallelism, against the single-rank composition of
 *   lt_linear_forward / lt_gelu_forward / lt_linear_forward (and their backward) on the full tensors:
 *   the output, the input gradient, each rank's weight and bias gradient shards against the slices of
 *   the full gradients (under SP the row bias gradient after the all-reduce over TP that
 *   finalize_model_grads does for sequence-parallel parameters). Tolerance: max |a - b| <= 1e-6 x
 *   max |reference| per tensor (the measured worst is printed). Not bit-exact: the row-parallel output
 *   and the input gradient are sums over ranks of partial GEMMs over F/TP (resp. C) columns, a different
 *   summation order from one GEMM over all of them; the sharded GEMMs themselves may block differently.
 *   Measured: 0 at TP = 1 (the layers add bias + residual and sum the bias gradient in the single-rank
 *   op's order), at most ~3.4e-7 at TP = 2 and 4.
 *   The weight gradients accumulate (+=) onto nonzero values, as after an earlier microbatch.
 * - Communication per forward and per backward of the MLP equals the analytic volume: without SP one
 *   all-reduce of N x C floats each way (2 (TP-1)/TP of the bytes); with SP one all-gather and one
 *   reduce-scatter of N x C floats each way ((TP-1)/TP each); TP = 1 nothing.
 * - A column-parallel linear with gather_output gives the full output and the same gradients; a
 *   row-parallel one with the residual in the output buffer gives the same output.
 * - tp groups of 2 inside a world of 4: the same, on the group alone.
 * - Refusals (features or sequence not divisible by TP, gather_output with SP) with their messages,
 *   before any collective. */
#include "tests/comm/harness.h" /* first: it defines _GNU_SOURCE */
#include "tests/parallel/tp_testutil.h"

#include <math.h>

#include "engine/ops/ops.h"
#include "engine/parallel/tp.h"

typedef struct {
    int s, b, C, F, sp;
} mlp_shape;

static float *fcopy(const float *x, size_t n) {
    float *y = malloc(n * sizeof(float) + 4);
    memcpy(y, x, n * sizeof(float));
    return y;
}

/* max |a - b| / max |b|, over n values of a and of b read with strides (rows of width w). */
static double normdiff(const float *a, int lda, const float *b, int ldb, int rows, int w) {
    double d = 0, m = 0;
    for (int n = 0; n < rows; n++)
        for (int j = 0; j < w; j++) {
            const double x = a[(size_t)n * lda + j], y = b[(size_t)n * ldb + j];
            d = fmax(d, fabs(x - y));
            m = fmax(m, fabs(y));
        }
    return d / fmax(m, 1e-30);
}

/* ---- mappings ---- */
static void rank_mappings(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    const int tp = lt_comm_size(c), me = lt_comm_rank(c);
    const int s = 8, b = 3, h = 12, N = s * b, w = h / tp, rows = N / tp;
    const size_t full_n = (size_t)N * h;
    const uint64_t full_bytes = full_n * 4;
    rng_state = 4242;
    float *x[MAX_RANKS]; /* rank r's full-size buffer */
    for (int r = 0; r < tp; r++) x[r] = fvec(full_n, -1, 1);
    float *sum = calloc(full_n, 4); /* the sum in rank order */
    for (size_t i = 0; i < full_n; i++) {
        float v = x[0][i];
        for (int r = 1; r < tp; r++) v += x[r][i];
        sum[i] = v;
    }
    float *out = malloc(full_n * 4), *scratch = malloc(full_n * 4), *buf = malloc(full_n * 4);
    lt_comm_reset_stats(c);

    /* copy_to: identity forward, all-reduce backward */
    int rc = lt_tp_copy_to_forward(c, out, x[me], (int64_t)full_n, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[me], full_n * 4) == 0, "copy_to forward: %s", err);
    check_stats(ctx, c, "copy_to forward", 0, 0);
    memcpy(buf, x[me], full_n * 4);
    rc = lt_tp_copy_to_backward(c, buf, (int64_t)full_n, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(buf, sum, full_n * 4) == 0, "copy_to backward is not the sum over ranks: %s", err);
    check_stats(ctx, c, "copy_to backward", tp > 1, ring_all_reduce(tp, full_bytes));

    /* reduce_from: all-reduce forward, identity backward */
    memcpy(buf, x[me], full_n * 4);
    rc = lt_tp_reduce_from_forward(c, buf, (int64_t)full_n, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(buf, sum, full_n * 4) == 0, "reduce_from forward is not the sum: %s", err);
    check_stats(ctx, c, "reduce_from forward", tp > 1, ring_all_reduce(tp, full_bytes));
    rc = lt_tp_reduce_from_backward(c, out, x[me], (int64_t)full_n, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[me], full_n * 4) == 0, "reduce_from backward: %s", err);
    check_stats(ctx, c, "reduce_from backward", 0, 0);

    /* last dim: rank r's [N, w] is columns [r w, (r+1) w) of x[0] (the full tensor); a gather of the
     * slices gives x[0] back */
    rc = lt_tp_scatter_last_forward(c, out, x[0], N, h, err, sizeof err);
    int ok = rc == 0;
    for (int n = 0; n < N; n++) ok &= memcmp(out + (size_t)n * w, x[0] + (size_t)n * h + me * w, (size_t)w * 4) == 0;
    RCHECK(ctx, ok, "scatter (last dim) forward: %s", err);
    check_stats(ctx, c, "scatter (last dim) forward", 0, 0);
    memcpy(buf, out, (size_t)N * w * 4);
    rc = lt_tp_scatter_last_backward(c, out, buf, scratch, N, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0], full_n * 4) == 0, "scatter (last dim) backward: %s", err);
    check_stats(ctx, c, "scatter (last dim) backward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_gather_last_forward(c, out, buf, scratch, N, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0], full_n * 4) == 0, "gather (last dim) forward: %s", err);
    check_stats(ctx, c, "gather (last dim) forward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_gather_last_backward(c, scratch, x[0], N, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(scratch, buf, (size_t)N * w * 4) == 0, "gather (last dim) backward: %s", err);
    check_stats(ctx, c, "gather (last dim) backward", 0, 0);

    /* sequence: rank r's [s/TP, b, h] is rows [r N/TP, (r+1) N/TP) */
    const size_t block = (size_t)rows * h;
    rc = lt_tp_scatter_to_sequence_forward(c, out, x[0], s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0] + me * block, block * 4) == 0, "scatter_to_sequence forward: %s", err);
    check_stats(ctx, c, "scatter_to_sequence forward", 0, 0);
    memcpy(buf, out, block * 4);
    rc = lt_tp_scatter_to_sequence_backward(c, out, buf, s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0], full_n * 4) == 0, "scatter_to_sequence backward: %s", err);
    check_stats(ctx, c, "scatter_to_sequence backward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_gather_from_sequence_forward(c, out, buf, s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0], full_n * 4) == 0, "gather_from_sequence forward: %s", err);
    check_stats(ctx, c, "gather_from_sequence forward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_gather_from_sequence_backward(c, out, x[me], s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, sum + me * block, block * 4) == 0,
           "gather_from_sequence backward is not this rank's rows of the sum: %s", err);
    check_stats(ctx, c, "gather_from_sequence backward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_reduce_scatter_to_sequence_forward(c, out, x[me], s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, sum + me * block, block * 4) == 0,
           "reduce_scatter_to_sequence forward is not this rank's rows of the sum: %s", err);
    check_stats(ctx, c, "reduce_scatter_to_sequence forward", tp > 1, ring_half(tp, full_bytes));
    rc = lt_tp_reduce_scatter_to_sequence_backward(c, out, x[0] + me * block, s, b, h, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(out, x[0], full_n * 4) == 0, "reduce_scatter_to_sequence backward: %s", err);
    check_stats(ctx, c, "reduce_scatter_to_sequence backward", tp > 1, ring_half(tp, full_bytes));

    for (int r = 0; r < tp; r++) free(x[r]);
    free(sum), free(out), free(scratch), free(buf);
    lt_comm_free(c);
}

/* ---- the MLP pattern ---- */
static void mlp_checks(rank_ctx *ctx, lt_comm *c, const mlp_shape *S, uint64_t seed) {
    char err[512] = "";
    const int tp = lt_comm_size(c), me = lt_comm_rank(c);
    const int s = S->s, b = S->b, C = S->C, F = S->F, N = s * b, Fp = F / tp, sp = S->sp;
    const int rows = N / tp, row0 = sp ? me * rows : 0;
    const int nrows = sp ? rows : N; /* rows this rank holds outside the layers */
    rng_state = seed + (uint64_t)F;
    float *x = fvec((size_t)N * C, -1, 1), *W1 = fvec((size_t)F * C, -0.3f, 0.3f), *b1 = fvec(F, -0.5f, 0.5f);
    float *W2 = fvec((size_t)C * F, -0.3f, 0.3f), *b2 = fvec(C, -0.5f, 0.5f), *dy = fvec((size_t)N * C, -1, 1);
    /* the gradients start nonzero: they accumulate */
    float *g0W1 = fvec((size_t)F * C, -0.1f, 0.1f), *g0b1 = fvec(F, -0.1f, 0.1f);
    float *g0W2 = fvec((size_t)C * F, -0.1f, 0.1f), *g0b2 = fvec(C, -0.1f, 0.1f);

    /* the single rank */
    float *h = malloc((size_t)N * F * 4), *g = malloc((size_t)N * F * 4), *y = malloc((size_t)N * C * 4);
    float *dg = malloc((size_t)N * F * 4), *dh = malloc((size_t)N * F * 4), *dx = malloc((size_t)N * C * 4);
    float *dW1 = fcopy(g0W1, (size_t)F * C), *db1 = fcopy(g0b1, F), *dW2 = fcopy(g0W2, (size_t)C * F);
    float *db2 = fcopy(g0b2, C);
    lt_linear_forward(h, x, W1, b1, NULL, N, C, F);
    lt_gelu_forward(g, h, (int64_t)N * F);
    lt_linear_forward(y, g, W2, b2, x, N, F, C);
    lt_linear_backward(dg, dW2, db2, dy, g, W2, N, F, C);
    lt_gelu_backward(dh, dg, h, (int64_t)N * F);
    lt_linear_backward(dx, dW1, db1, dh, x, W1, N, C, F);
    for (size_t i = 0; i < (size_t)N * C; i++) dx[i] += dy[i]; /* the residual's gradient */

    /* this rank */
    lt_tp_linear col = {s, b, C, F, sp, 0}, row = {s, b, F, C, sp, 0};
    float *w1 = malloc((size_t)Fp * C * 4), *bb1 = malloc(Fp * 4), *w2 = malloc((size_t)C * Fp * 4);
    float *gw1 = malloc((size_t)Fp * C * 4), *gb1 = malloc(Fp * 4), *gw2 = malloc((size_t)C * Fp * 4);
    float *gb2 = fcopy(g0b2, C);
    int rc = lt_tp_shard_rows(w1, W1, F, C, me, tp, err, sizeof err) | lt_tp_shard_rows(bb1, b1, F, 1, me, tp, err,
                                                                                         sizeof err) |
             lt_tp_shard_columns(w2, W2, C, F, me, tp, err, sizeof err) |
             lt_tp_shard_rows(gw1, g0W1, F, C, me, tp, err, sizeof err) |
             lt_tp_shard_rows(gb1, g0b1, F, 1, me, tp, err, sizeof err) |
             lt_tp_shard_columns(gw2, g0W2, C, F, me, tp, err, sizeof err);
    RCHECK(ctx, rc == 0, "shards: %s", err);
    float *cs = malloc((size_t)(lt_tp_column_scratch(&col, tp) + 1) * 4);
    float *rs = malloc((size_t)(lt_tp_row_scratch(&row, tp) + 1) * 4);
    float *xl = x + (size_t)row0 * C; /* this rank's input rows (all of them without SP) */
    float *hl = malloc((size_t)N * Fp * 4), *gl = malloc((size_t)N * Fp * 4), *yl = malloc((size_t)nrows * C * 4);
    float *dgl = malloc((size_t)N * Fp * 4), *dhl = malloc((size_t)N * Fp * 4), *dxl = malloc((size_t)nrows * C * 4);

    lt_comm_reset_stats(c);
    rc = lt_tp_column_forward(c, &col, hl, xl, w1, bb1, cs, err, sizeof err);
    RCHECK(ctx, rc == 0, "column forward: %s", err);
    lt_gelu_forward(gl, hl, (int64_t)N * Fp);
    rc = lt_tp_row_forward(c, &row, yl, gl, w2, b2, xl, rs, err, sizeof err);
    RCHECK(ctx, rc == 0, "row forward: %s", err);
    const uint64_t act = (uint64_t)N * C * 4;
    if (sp)
        check_stats(ctx, c, "MLP forward (SP)", tp > 1 ? 2 : 0, 2 * ring_half(tp, act));
    else
        check_stats(ctx, c, "MLP forward", tp > 1, ring_all_reduce(tp, act));

    rc = lt_tp_row_backward(c, &row, dgl, gw2, gb2, dy + (size_t)row0 * C, gl, w2, rs, err, sizeof err);
    RCHECK(ctx, rc == 0, "row backward: %s", err);
    lt_gelu_backward(dhl, dgl, hl, (int64_t)N * Fp);
    rc = lt_tp_column_backward(c, &col, dxl, gw1, gb1, dhl, xl, w1, cs, err, sizeof err);
    RCHECK(ctx, rc == 0, "column backward: %s", err);
    for (size_t i = 0; i < (size_t)nrows * C; i++) dxl[i] += dy[(size_t)row0 * C + i];
    if (sp)
        check_stats(ctx, c, "MLP backward (SP)", tp > 1 ? 2 : 0, 2 * ring_half(tp, act));
    else
        check_stats(ctx, c, "MLP backward", tp > 1, ring_all_reduce(tp, act));

    /* under SP the row bias is a sequence-parallel parameter: finalize_model_grads sums its gradient over
     * TP. Only this step's part is summed here (the starting value is on every rank once). */
    if (sp) {
        for (int j = 0; j < C; j++) gb2[j] -= g0b2[j];
        rc = lt_comm_size(c) > 1 ? lt_comm_all_reduce(c, gb2, C, LT_F32, LT_REDUCE_SUM, err, sizeof err) : 0;
        RCHECK(ctx, rc == 0, "bias all-reduce: %s", err);
        for (int j = 0; j < C; j++) gb2[j] += g0b2[j];
    }

    double e[6];
    e[0] = normdiff(yl, C, y + (size_t)row0 * C, C, nrows, C);
    e[1] = normdiff(dxl, C, dx + (size_t)row0 * C, C, nrows, C);
    e[2] = fmax(normdiff(gw1, C, dW1 + (size_t)me * Fp * C, C, Fp, C), normdiff(gb1, 1, db1 + me * Fp, 1, Fp, 1));
    e[3] = normdiff(gw2, Fp, dW2 + (size_t)me * Fp, F, C, Fp);
    e[4] = normdiff(gb2, 1, db2, 1, C, 1);
    e[5] = normdiff(hl, Fp, h + (size_t)me * Fp, F, N, Fp); /* the column output, this rank's columns */
    const char *names[6] = {"output", "input gradient", "fc1 weight / bias gradient shards",
                            "fc2 weight gradient shard", "fc2 bias gradient", "fc1 output columns"};
    double worst = 0;
    for (int k = 0; k < 6; k++) {
        RCHECK(ctx, e[k] <= 1e-6, "%s differs from the single rank's: %.3g of its largest magnitude", names[k], e[k]);
        worst = fmax(worst, e[k]);
    }
    ctx->out->val[0] = worst;

    /* the residual may be the output buffer itself (the residual stream updated in place) */
    float *stream = fcopy(xl, (size_t)nrows * C);
    rc = lt_tp_row_forward(c, &row, stream, gl, w2, b2, stream, rs, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(stream, yl, (size_t)nrows * C * 4) == 0,
           "row forward with residual == out differs: %s", err);
    free(stream);
    lt_comm_reset_stats(c);

    /* gather_output (no SP): the full fc1 output, and the same gradients from the full dh */
    if (!sp) {
        lt_tp_linear gcol = {s, b, C, F, 0, 1};
        float *gs = malloc((size_t)(lt_tp_column_scratch(&gcol, tp) + 1) * 4), *hf = malloc((size_t)N * F * 4);
        float *gw = malloc((size_t)Fp * C * 4), *gb = malloc(Fp * 4), *dxg = malloc((size_t)N * C * 4);
        lt_tp_shard_rows(gw, g0W1, F, C, me, tp, err, sizeof err);
        lt_tp_shard_rows(gb, g0b1, F, 1, me, tp, err, sizeof err);
        rc = lt_tp_column_forward(c, &gcol, hf, x, w1, bb1, gs, err, sizeof err);
        RCHECK(ctx, rc == 0, "gather_output forward: %s", err);
        check_stats(ctx, c, "gather_output forward", tp > 1, ring_half(tp, (uint64_t)N * F * 4));
        rc = lt_tp_column_backward(c, &gcol, dxg, gw, gb, dh, x, w1, gs, err, sizeof err);
        RCHECK(ctx, rc == 0, "gather_output backward: %s", err);
        check_stats(ctx, c, "gather_output backward", tp > 1, ring_all_reduce(tp, act));
        const double eg = fmax(normdiff(hf, F, h, F, N, F), normdiff(gw, C, dW1 + (size_t)me * Fp * C, C, Fp, C));
        /* dx of the composition is this (fc1's input gradient) plus the residual's dy */
        for (size_t i = 0; i < (size_t)N * C; i++) dxg[i] += dy[i];
        const double ex = normdiff(dxg, C, dx, C, N, C);
        RCHECK(ctx, eg <= 1e-6 && ex <= 1e-6, "gather_output: output / weight gradient %.3g, input gradient %.3g",
               eg, ex);
        free(gs), free(hf), free(gw), free(gb), free(dxg);
    }

    free(x), free(W1), free(b1), free(W2), free(b2), free(dy), free(g0W1), free(g0b1), free(g0W2), free(g0b2);
    free(h), free(g), free(y), free(dg), free(dh), free(dx), free(dW1), free(db1), free(dW2), free(db2);
    free(w1), free(bb1), free(w2), free(gw1), free(gb1), free(gw2), free(gb2), free(cs), free(rs);
    free(hl), free(gl), free(yl), free(dgl), free(dhl), free(dxl);
}

static void rank_mlp(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    mlp_checks(ctx, c, ctx->arg, 99);
    lt_comm_free(c);
}

/* 4 ranks as 2 data-parallel replicas of TP = 2 ({0,1}, {2,3}), each on its own data: the layers work on
 * the tp group alone and nothing goes over the world communicator */
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
        mlp_shape S = *(const mlp_shape *)ctx->arg;
        for (S.sp = 0; S.sp <= 1; S.sp++) mlp_checks(ctx, tp, &S, 500 + 7 * (uint64_t)g);
        lt_comm_stats st = lt_comm_get_stats(w);
        RCHECK(ctx, st.calls == 0, "the world communicator was used (%llu calls)", (unsigned long long)st.calls);
        lt_comm_free(tp);
    }
    lt_comm_free(w);
}

/* ---- refusals, on every rank before any collective ---- */
static void rank_refusals(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    float buf[6 * 2 * 8 * 2], out[6 * 2 * 8 * 2], scratch[6 * 2 * 8 * 4];
    memset(buf, 0, sizeof buf);
    lt_comm_reset_stats(c);
    lt_tp_linear col = {4, 2, 8, 6, 0, 0}; /* out 6 at TP 4 */
    int rc = lt_tp_column_forward(c, &col, out, buf, buf, NULL, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "column-parallel linear: its output features 6 are not divisible by "
                                        "tensor_model_parallel_size 4"),
           "column with out 6: rc %d, '%s'", rc, err);
    err[0] = '\0';
    rc = lt_tp_column_backward(c, &col, out, buf, NULL, buf, buf, buf, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "output features 6"), "column backward with out 6: '%s'", err);
    lt_tp_linear row = {4, 2, 6, 8, 0, 0}; /* in 6 */
    err[0] = '\0';
    rc = lt_tp_row_forward(c, &row, out, buf, buf, NULL, NULL, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "row-parallel linear: its input features 6 are not divisible"),
           "row with in 6: rc %d, '%s'", rc, err);
    err[0] = '\0';
    rc = lt_tp_row_backward(c, &row, out, buf, NULL, buf, buf, buf, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "input features 6"), "row backward with in 6: '%s'", err);
    lt_tp_linear seq = {6, 2, 8, 8, 1, 0}; /* s 6 under SP */
    err[0] = '\0';
    rc = lt_tp_column_forward(c, &seq, out, buf, buf, NULL, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "sequence parallelism needs the sequence length 6 divisible by "
                                        "tensor_model_parallel_size 4"),
           "column SP with s 6: rc %d, '%s'", rc, err);
    err[0] = '\0';
    rc = lt_tp_row_forward(c, &seq, out, buf, buf, NULL, NULL, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "sequence length 6"), "row SP with s 6: '%s'", err);
    lt_tp_linear gsp = {4, 2, 8, 8, 1, 1};
    err[0] = '\0';
    rc = lt_tp_column_forward(c, &gsp, out, buf, buf, NULL, scratch, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "gather_output is only for a column-parallel linear without sequence"),
           "gather_output with SP: '%s'", err);
    err[0] = '\0';
    rc = lt_tp_gather_from_sequence_forward(c, out, buf, 6, 2, 4, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "sequence length (sequence parallelism) 6 is not divisible"),
           "gather_from_sequence with s 6: '%s'", err);
    err[0] = '\0';
    rc = lt_tp_gather_last_forward(c, out, buf, scratch, 4, 6, err, sizeof err);
    RCHECK(ctx, rc == -1 && strstr(err, "last dimension 6 is not divisible"), "gather (last dim) with h 6: '%s'",
           err);
    check_stats(ctx, c, "refused calls", 0, 0);
    lt_comm_free(c);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char label[320];
    const mlp_shape shapes[] = {{8, 3, 16, 64, 0}, {4, 2, 12, 40, 0}};
    for (int tp = 1; tp <= 4; tp *= 2) {
        run_status st = run_ranks(tp, 10.0, rank_mappings, NULL, 60);
        snprintf(label, sizeof label,
                 "TP = %d: copy_to, reduce_from, scatter / gather (last dim), scatter_to / gather_from / "
                 "reduce_scatter_to sequence: forward and backward exact, %s",
                 tp, tp > 1 ? "collectives and bytes analytic" : "no communication");
        report_run(label, tp, &st, 0);
        for (int k = 0; k < 2; k++)
            for (int sp = 0; sp <= 1; sp++) {
                mlp_shape S = shapes[k];
                S.sp = sp;
                st = run_ranks(tp, 10.0, rank_mlp, &S, 60);
                snprintf(label, sizeof label,
                         "TP = %d%s, s %d b %d C %d F %d: column -> GELU -> row (bias, residual) output and "
                         "gradients within 1e-6 of the single rank's (worst %.2g)%s, %s",
                         tp, sp ? " with SP" : "", S.s, S.b, S.C, S.F, shared_results[0].val[0],
                         sp ? "" : ", gather_output too",
                         tp == 1 ? "no communication"
                                 : (sp ? "1 all-gather + 1 reduce-scatter each way, analytic bytes"
                                       : "1 all-reduce each way, analytic bytes"));
                report_run(label, tp, &st, 0);
            }
    }
    run_status st = run_ranks(4, 10.0, rank_groups, &shapes[0], 60);
    report_run("4 ranks as 2 replicas of TP = 2 (tp groups {0,1} and {2,3}, different data each): the MLP with and "
               "without SP as above on the group, nothing on the world communicator",
               4, &st, 0);
    st = run_ranks(4, 10.0, rank_refusals, NULL, 60);
    report_run("TP = 4: features, sequence (SP) and last dim not divisible by TP, gather_output with SP refused "
               "with messages, before any collective",
               4, &st, 0);
    char names[1024];
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind: %s", names);
    return tap_done();
}

/* Tensor- and sequence-parallel mappings (engine/parallel/tp.h) with real processes (fork, shm
 * communicators) at TP = 1, 2 and 4, on the CPU backend's fp32 and bf16 op tables.
 *
 * Every rank draws every rank's data from a fixed seed, so it knows what each call must give.
 * - Mappings: lt_tp_enter / _exit and their backwards, without sequence parallelism (identity, or an
 *   all-reduce in place) and with it (rank r holds positions [r T/TP, (r+1) T/TP) of every sample as
 *   [B, T/TP] rows: the all-gather must give the full data in [b, t] row order, the reduce-scatter this
 *   rank's rows of the sum); lt_tp_scatter; lt_tp_all_reduce. Exact: gathers and scatters move values,
 *   and the communicator sums in rank order (bf16 accumulated in fp32 and rounded once), which the
 *   test repeats. The last dim (lt_tp_gather_last): every rank's columns gathered into the full data,
 *   and backward this rank's columns of the sum. Each call's collectives and bytes equal the ring
 *   volumes: all-gather and reduce-scatter (TP-1)/TP of the full N x C buffer, all-reduce 2 (TP-1)/TP;
 *   TP = 1 nothing.
 * - Dropout of an outer region: this rank's rows of the single-rank op's result on the full tensor,
 *   bit for bit (the masks are the single rank's), forward and backward.
 * - The MLP pattern: x -> enter -> linear with this rank's rows of W1 (column-parallel, bias) -> GELU
 *   -> linear with this rank's columns of W2 (row-parallel) -> exit -> + bias (lt_tp_bias_forward),
 *   against the single-rank composition of the same ops on the full tensors, forward and backward: the
 *   output and input gradient rows, the fc1 output columns, the weight and bias gradient shards against
 *   the slices of the full gradients (accumulated onto nonzero values, as after an earlier microbatch),
 *   the fc2 bias gradient (under SP from this rank's rows and summed over TP, as finalize does).
 *   Tolerance per tensor: max |a - b| <= tol x max |reference|, tol 1e-6 in fp32 and 1e-2 in bf16 (the
 *   measured worst is printed). Not bit-exact: the row-parallel output and the input gradient are sums
 *   over ranks of partial GEMMs (another summation order), in bf16 each partial rounded, and the bias is
 *   added after the reduction instead of inside the GEMM.
 * - tp groups of 2 inside a world of 4: the same on the group alone, nothing on the world.
 * - lt_tp_rows_new refuses a sequence that does not divide by TP under SP, with a message. */
#include "tests/comm/harness.h" /* first: it defines _GNU_SOURCE */
#include "tests/parallel/tp_testutil.h"

#include <math.h>

#include "engine/ops/backend.h"
#include "engine/parallel/tp.h"

typedef struct {
    int B, T, C, F;
} shape;

static lt_tp make_tp(lt_comm *c, int sp, lt_dtype dtype) {
    const lt_backend *be = lt_backend_cpu();
    const int n = lt_comm_size(c);
    return (lt_tp){n > 1 ? c : NULL, lt_comm_rank(c), n, sp, be, dtype == LT_BF16 ? be->bf16 : be->f32};
}

/* The full row of this rank's outer row i: i itself, or under SP (b, r T/TP + t') of local row b T/TP + t'. */
static int full_row(const lt_tp *tp, int T, int i) {
    if (tp->size == 1 || !tp->sequence_parallel) return i;
    const int Tl = T / tp->size;
    return (i / Tl) * T + tp->rank * Tl + i % Tl;
}

/* A new copy of the rows of full [B T, C] this rank holds outside the region. */
static float *outer(const lt_tp *tp, const float *full, int B, int T, int C) {
    const int No = lt_tp_outer_rows(tp, B * T);
    float *y = malloc((size_t)No * C * sizeof(float) + 4);
    for (int i = 0; i < No; i++) memcpy(y + (size_t)i * C, full + (size_t)full_row(tp, T, i) * C, (size_t)C * 4);
    return y;
}

/* n values of dtype at a equal the fp32 values x (representable in dtype) exactly. */
static int same(lt_dtype dtype, const void *a, const float *x, size_t n) {
    float *y = to_f32(dtype, a, n);
    int ok = memcmp(y, x, n * sizeof(float)) == 0;
    free(y);
    return ok;
}

/* max |a - b| / max |b| over rows x w values read with leading dimensions lda and ldb. */
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

static const char *dtype_name(lt_dtype d) { return d == LT_BF16 ? "bf16" : "fp32"; }

/* ---- mappings, dropout ---- */
static void mapping_checks(rank_ctx *ctx, lt_comm *c, const shape *S, int sp, lt_dtype dtype, uint64_t seed) {
    char err[512] = "";
    lt_tp tp = make_tp(c, sp, dtype);
    const int B = S->B, T = S->T, C = S->C, N = B * T, me = tp.rank, n = tp.size, No = lt_tp_outer_rows(&tp, N);
    const int on = n > 1 && sp; /* sequence parallelism in effect */
    const size_t full_n = (size_t)N * C, E = lt_dtype_size(dtype);
    const uint64_t full_bytes = full_n * E;
    RCHECK(ctx, No == (on ? N / n : N), "%s: outer rows %d of %d", dtype_name(dtype), No, N);
    rng_state = seed;
    float *x[MAX_RANKS]; /* rank r's full-size buffer; x[0] is also "the full data" */
    for (int r = 0; r < n; r++) {
        x[r] = fvec(full_n, -1, 1);
        quantize(dtype, x[r], full_n);
    }
    float *sum = malloc(full_n * 4); /* the communicator's sum: fp32 in rank order, rounded once */
    for (size_t i = 0; i < full_n; i++) {
        float v = x[0][i];
        for (int r = 1; r < n; r++) v += x[r][i];
        sum[i] = v;
    }
    quantize(dtype, sum, full_n);
    lt_tp_rows *rows = lt_tp_rows_new(&tp, B, T, err, sizeof err);
    RCHECK(ctx, rows, "rows: %s", err);
    if (!rows) return;
    float *xo = outer(&tp, x[0], B, T, C), *sumo = outer(&tp, sum, B, T, C);
    void *X = to_dtype(dtype, x[0], full_n), *Xo = to_dtype(dtype, xo, (size_t)No * C);
    void *full = malloc(full_n * E), *scratch = malloc(full_n * E), *local = malloc(full_n * E);
    const char *dn = dtype_name(dtype);
    lt_comm_reset_stats(c);

    /* entering: the input itself, or the all-gather of every rank's rows into the full data */
    const void *inner = NULL;
    int rc = lt_tp_enter(&tp, rows, &inner, Xo, full, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && inner == (on ? full : Xo) && same(dtype, inner, x[0], full_n), "%s enter: %s", dn, err);
    check_stats(ctx, c, "enter", on, on ? ring_half(n, full_bytes) : 0);
    /* its backward: the sum of every rank's partial gradient, all of it or this rank's rows */
    void *part = to_dtype(dtype, x[me], full_n), *dx = NULL;
    rc = lt_tp_enter_backward(&tp, rows, &dx, part, local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && dx == (on ? local : part) && same(dtype, dx, on ? sumo : sum, (size_t)No * C),
           "%s enter backward is not %s of the sum over ranks: %s", dn, on ? "this rank's rows" : "all", err);
    const uint64_t reduction = n == 1 ? 0 : on ? ring_half(n, full_bytes) : ring_all_reduce(n, full_bytes);
    check_stats(ctx, c, "enter backward", n > 1, reduction);
    /* leaving: the same reduction */
    free(part);
    part = to_dtype(dtype, x[me], full_n);
    void *out = NULL;
    rc = lt_tp_exit(&tp, rows, &out, part, local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && out == (on ? local : part) && same(dtype, out, on ? sumo : sum, (size_t)No * C),
           "%s exit is not %s of the sum over ranks: %s", dn, on ? "this rank's rows" : "all", err);
    check_stats(ctx, c, "exit", n > 1, reduction);
    /* its backward: the gradient of every row, the same on every rank */
    const void *dinner = NULL;
    rc = lt_tp_exit_backward(&tp, rows, &dinner, Xo, full, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0 && dinner == (on ? full : Xo) && same(dtype, dinner, x[0], full_n), "%s exit backward: %s", dn,
           err);
    check_stats(ctx, c, "exit backward", on, on ? ring_half(n, full_bytes) : 0);
    if (on) { /* scatter_to_sequence_parallel_region: this rank's rows, no communication */
        lt_tp_scatter(&tp, rows, local, X, C);
        RCHECK(ctx, same(dtype, local, xo, (size_t)No * C), "%s scatter is not this rank's rows", dn);
        check_stats(ctx, c, "scatter", 0, 0);
    }
    if (n > 1 && C % n == 0) { /* the last dim: columns [r w, (r+1) w) of each row are rank r's */
        const int w = C / n;
        float *cols = malloc((size_t)N * w * 4 + 4), *sumcols = malloc((size_t)N * w * 4 + 4);
        for (int i = 0; i < N; i++) {
            memcpy(cols + (size_t)i * w, x[0] + (size_t)i * C + (size_t)me * w, (size_t)w * 4);
            memcpy(sumcols + (size_t)i * w, sum + (size_t)i * C + (size_t)me * w, (size_t)w * 4);
        }
        void *shard = to_dtype(dtype, cols, (size_t)N * w);
        rc = lt_tp_gather_last(&tp, rows, full, shard, scratch, w, err, sizeof err);
        RCHECK(ctx, rc == 0 && same(dtype, full, x[0], full_n), "%s gather of the last dim: %s", dn, err);
        check_stats(ctx, c, "gather_last", 1, ring_half(n, full_bytes));
        void *dfull = to_dtype(dtype, x[me], full_n);
        rc = lt_tp_gather_last_backward(&tp, rows, shard, dfull, scratch, w, err, sizeof err);
        RCHECK(ctx, rc == 0 && same(dtype, shard, sumcols, (size_t)N * w),
               "%s gather of the last dim, backward: not this rank's columns of the sum: %s", dn, err);
        check_stats(ctx, c, "gather_last backward", 1, ring_half(n, full_bytes));
        free(cols), free(sumcols), free(shard), free(dfull);
    }
    /* the finalize reduction of replicated parameters' gradients: fp32 */
    float *g = malloc(full_n * 4), *gsum = malloc(full_n * 4);
    memcpy(g, x[me], full_n * 4);
    for (size_t i = 0; i < full_n; i++) {
        float v = x[0][i];
        for (int r = 1; r < n; r++) v += x[r][i];
        gsum[i] = v;
    }
    rc = lt_tp_all_reduce(&tp, g, (int64_t)full_n, LT_F32, err, sizeof err);
    RCHECK(ctx, rc == 0 && memcmp(g, gsum, full_n * 4) == 0, "all_reduce is not the sum: %s", err);
    check_stats(ctx, c, "all_reduce", n > 1, ring_all_reduce(n, full_n * 4));

    /* dropout: this rank's rows of the single rank's result on the full tensor, bit for bit */
    const float p = 0.3f;
    const uint64_t key = 0x5eedull + seed;
    void *ref = malloc(full_n * E);
    tp.ops->dropout_forward(ref, X, (int64_t)full_n, p, key, 0);
    float *reff = to_f32(dtype, ref, full_n), *refo = outer(&tp, reff, B, T, C);
    lt_tp_dropout_forward(&tp, rows, local, Xo, B, T, C, p, key);
    RCHECK(ctx, same(dtype, local, refo, (size_t)No * C), "%s dropout forward: not the single rank's masks", dn);
    tp.ops->dropout_backward(ref, X, (int64_t)full_n, p, key, 0);
    free(reff), free(refo);
    reff = to_f32(dtype, ref, full_n), refo = outer(&tp, reff, B, T, C);
    lt_tp_dropout_backward(&tp, rows, local, Xo, B, T, C, p, key);
    RCHECK(ctx, same(dtype, local, refo, (size_t)No * C), "%s dropout backward: not the single rank's masks", dn);
    check_stats(ctx, c, "dropout", 0, 0);

    for (int r = 0; r < n; r++) free(x[r]);
    free(sum), free(xo), free(sumo), free(X), free(Xo), free(full), free(scratch), free(local), free(part);
    free(g), free(gsum), free(ref), free(reff), free(refo);
    lt_tp_rows_free(&tp, rows);
}

/* ---- the MLP pattern ---- */
static double mlp_checks(rank_ctx *ctx, lt_comm *c, const shape *S, int sp, lt_dtype dtype, uint64_t seed) {
    char err[512] = "";
    lt_tp tp = make_tp(c, sp, dtype);
    const lt_ops *ops = tp.ops;
    const int B = S->B, T = S->T, C = S->C, F = S->F, N = B * T, n = tp.size, me = tp.rank, Fp = F / n;
    const int No = lt_tp_outer_rows(&tp, N), on = n > 1 && sp;
    const size_t E = lt_dtype_size(dtype);
    const char *dn = dtype_name(dtype);
    rng_state = seed + (uint64_t)F;
    float *x = fvec((size_t)N * C, -1, 1), *W1 = fvec((size_t)F * C, -0.3f, 0.3f), *b1 = fvec(F, -0.5f, 0.5f);
    float *W2 = fvec((size_t)C * F, -0.3f, 0.3f), *b2 = fvec(C, -0.5f, 0.5f), *dy = fvec((size_t)N * C, -1, 1);
    quantize(dtype, x, (size_t)N * C), quantize(dtype, W1, (size_t)F * C), quantize(dtype, b1, F);
    quantize(dtype, W2, (size_t)C * F), quantize(dtype, b2, C), quantize(dtype, dy, (size_t)N * C);
    /* the gradients (fp32) start nonzero: they accumulate */
    float *g0W1 = fvec((size_t)F * C, -0.1f, 0.1f), *g0b1 = fvec(F, -0.1f, 0.1f);
    float *g0W2 = fvec((size_t)C * F, -0.1f, 0.1f), *g0b2 = fvec(C, -0.1f, 0.1f);

    /* the single rank, with the same op table on all of the data */
    void *Xd = to_dtype(dtype, x, (size_t)N * C), *dyd = to_dtype(dtype, dy, (size_t)N * C);
    void *W1d = to_dtype(dtype, W1, (size_t)F * C), *b1d = to_dtype(dtype, b1, F);
    void *W2d = to_dtype(dtype, W2, (size_t)C * F), *b2d = to_dtype(dtype, b2, C);
    void *h = malloc((size_t)N * F * E), *g = malloc((size_t)N * F * E), *y = malloc((size_t)N * C * E);
    void *dg = malloc((size_t)N * F * E), *dh = malloc((size_t)N * F * E), *dx = malloc((size_t)N * C * E);
    float *dW1 = to_f32(LT_F32, g0W1, (size_t)F * C), *db1 = to_f32(LT_F32, g0b1, F);
    float *dW2 = to_f32(LT_F32, g0W2, (size_t)C * F), *db2 = to_f32(LT_F32, g0b2, C);
    ops->linear_forward(h, Xd, W1d, b1d, NULL, N, C, F);
    ops->gelu_forward(g, h, (int64_t)N * F);
    ops->linear_forward(y, g, W2d, b2d, NULL, N, F, C);
    ops->linear_backward(dg, dW2, db2, dyd, g, W2d, N, F, C);
    ops->gelu_backward(dh, dg, h, (int64_t)N * F);
    ops->linear_backward(dx, dW1, db1, dh, Xd, W1d, N, C, F);

    /* this rank: rows [me Fp, (me+1) Fp) of W1 and b1, those columns of W2 */
    float *w1 = malloc((size_t)Fp * C * 4), *w2 = malloc((size_t)C * Fp * 4), *gw2 = malloc((size_t)C * Fp * 4);
    for (int o = 0; o < C; o++) {
        memcpy(w2 + (size_t)o * Fp, W2 + (size_t)o * F + (size_t)me * Fp, (size_t)Fp * 4);
        memcpy(gw2 + (size_t)o * Fp, g0W2 + (size_t)o * F + (size_t)me * Fp, (size_t)Fp * 4);
    }
    memcpy(w1, W1 + (size_t)me * Fp * C, (size_t)Fp * C * 4);
    float *gw1 = to_f32(LT_F32, g0W1 + (size_t)me * Fp * C, (size_t)Fp * C), *gb1 = to_f32(LT_F32, g0b1 + me * Fp, Fp);
    float *gb2 = to_f32(LT_F32, g0b2, C);
    void *w1d = to_dtype(dtype, w1, (size_t)Fp * C), *b1s = to_dtype(dtype, b1 + me * Fp, Fp);
    void *w2d = to_dtype(dtype, w2, (size_t)C * Fp);
    float *xo = outer(&tp, x, B, T, C), *dyo = outer(&tp, dy, B, T, C);
    void *xod = to_dtype(dtype, xo, (size_t)No * C), *dyod = to_dtype(dtype, dyo, (size_t)No * C);
    void *xfull = malloc((size_t)N * C * E), *dfull = malloc((size_t)N * C * E), *scratch = malloc((size_t)N * C * E);
    void *partial = malloc((size_t)N * C * E), *out_local = malloc((size_t)N * C * E);
    void *dinx = malloc((size_t)N * C * E), *dx_local = malloc((size_t)N * C * E);
    void *hl = malloc((size_t)N * Fp * E), *gl = malloc((size_t)N * Fp * E), *dgl = malloc((size_t)N * Fp * E);
    void *dhl = malloc((size_t)N * Fp * E);
    lt_tp_rows *rows = lt_tp_rows_new(&tp, B, T, err, sizeof err);
    RCHECK(ctx, rows, "rows: %s", err);
    if (!rows) return 1;

    lt_comm_reset_stats(c);
    const void *inner = NULL;
    void *out = NULL;
    int rc = lt_tp_enter(&tp, rows, &inner, xod, xfull, scratch, C, err, sizeof err);
    ops->linear_forward(hl, inner, w1d, b1s, NULL, N, C, Fp);
    ops->gelu_forward(gl, hl, (int64_t)N * Fp);
    ops->linear_forward(partial, gl, w2d, NULL, NULL, N, Fp, C);
    rc |= lt_tp_exit(&tp, rows, &out, partial, out_local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0, "forward: %s", err);
    lt_tp_bias_forward(&tp, out, b2d, No, C);
    const uint64_t act = (uint64_t)N * C * E;
    if (on) check_stats(ctx, c, "MLP forward (SP)", 2, 2 * ring_half(n, act));
    else check_stats(ctx, c, "MLP forward", n > 1, ring_all_reduce(n, act));

    const void *dinner = NULL;
    void *dxp = NULL;
    lt_tp_bias_backward(&tp, gb2, dyod, No, C);
    rc = lt_tp_exit_backward(&tp, rows, &dinner, dyod, dfull, scratch, C, err, sizeof err);
    ops->linear_backward(dgl, gw2, NULL, dinner, gl, w2d, N, Fp, C);
    ops->gelu_backward(dhl, dgl, hl, (int64_t)N * Fp);
    ops->linear_backward(dinx, gw1, gb1, dhl, inner, w1d, N, C, Fp);
    rc |= lt_tp_enter_backward(&tp, rows, &dxp, dinx, dx_local, scratch, C, err, sizeof err);
    RCHECK(ctx, rc == 0, "backward: %s", err);
    if (on) check_stats(ctx, c, "MLP backward (SP)", 2, 2 * ring_half(n, act));
    else check_stats(ctx, c, "MLP backward", n > 1, ring_all_reduce(n, act));
    /* under SP the bias gradient came from this rank's rows: finalize sums it over TP (only this step's
     * part; the starting value is on every rank once) */
    if (on) {
        for (int j = 0; j < C; j++) gb2[j] -= g0b2[j];
        rc = lt_tp_all_reduce(&tp, gb2, C, LT_F32, err, sizeof err);
        RCHECK(ctx, rc == 0, "bias all-reduce: %s", err);
        for (int j = 0; j < C; j++) gb2[j] += g0b2[j];
    }

    float *yf = to_f32(dtype, y, (size_t)N * C), *dxf = to_f32(dtype, dx, (size_t)N * C);
    float *hf = to_f32(dtype, h, (size_t)N * F);
    float *yo = outer(&tp, yf, B, T, C), *dxo = outer(&tp, dxf, B, T, C);
    float *outf = to_f32(dtype, out, (size_t)No * C), *dxpf = to_f32(dtype, dxp, (size_t)No * C);
    float *hlf = to_f32(dtype, hl, (size_t)N * Fp);
    double e[7];
    e[0] = normdiff(outf, C, yo, C, No, C);
    e[1] = normdiff(dxpf, C, dxo, C, No, C);
    e[2] = normdiff(gw1, C, dW1 + (size_t)me * Fp * C, C, Fp, C);
    e[3] = normdiff(gb1, 1, db1 + me * Fp, 1, Fp, 1);
    e[4] = normdiff(gw2, Fp, dW2 + (size_t)me * Fp, F, C, Fp);
    e[5] = normdiff(gb2, 1, db2, 1, C, 1);
    e[6] = normdiff(hlf, Fp, hf + (size_t)me * Fp, F, N, Fp);
    const char *names[7] = {"output rows", "input gradient rows", "fc1 weight gradient shard",
                            "fc1 bias gradient shard", "fc2 weight gradient shard", "fc2 bias gradient",
                            "fc1 output columns"};
    const double tol = dtype == LT_BF16 ? 1e-2 : 1e-6;
    double worst = 0;
    for (int k = 0; k < 7; k++) {
        RCHECK(ctx, e[k] <= tol, "%s%s: %s differs from the single rank's by %.3g of its largest magnitude", dn,
               on ? " SP" : "", names[k], e[k]);
        worst = fmax(worst, e[k]);
    }

    free(x), free(W1), free(b1), free(W2), free(b2), free(dy), free(g0W1), free(g0b1), free(g0W2), free(g0b2);
    free(Xd), free(W1d), free(b1d), free(W2d), free(b2d), free(dyd), free(h), free(g), free(y), free(dg), free(dh);
    free(dx), free(dW1), free(db1), free(dW2), free(db2), free(w1), free(w2), free(gw2), free(gw1), free(gb1);
    free(gb2), free(w1d), free(b1s), free(w2d), free(xo), free(dyo), free(xod), free(dyod), free(xfull), free(dfull);
    free(scratch), free(partial), free(out_local), free(dinx), free(dx_local), free(hl), free(gl), free(dgl);
    free(dhl), free(yf), free(dxf), free(hf), free(yo), free(dxo), free(outf), free(dxpf), free(hlf);
    lt_tp_rows_free(&tp, rows);
    return worst;
}

/* Everything above on communicator c, for both op tables, with and without SP. worst[d]: the MLP's
 * worst relative difference for dtype d (0 fp32, 1 bf16). */
static void all_checks(rank_ctx *ctx, lt_comm *c, const shape *S, uint64_t seed, double worst[2]) {
    for (int d = 0; d < 2; d++)
        for (int sp = 0; sp <= 1; sp++) {
            const lt_dtype dtype = d ? LT_BF16 : LT_F32;
            mapping_checks(ctx, c, S, sp, dtype, seed + 10 * (uint64_t)sp + (uint64_t)d);
            worst[d] = fmax(worst[d], mlp_checks(ctx, c, S, sp, dtype, seed + 20 + (uint64_t)sp));
        }
}

static void rank_world(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    double worst[2] = {0, 0};
    all_checks(ctx, c, ctx->arg, 4242, worst);
    ctx->out->val[0] = worst[0], ctx->out->val[1] = worst[1];
    lt_comm_free(c);
}

/* 4 ranks as 2 data-parallel replicas of TP = 2 ({0,1}, {2,3}), each on its own data: the mappings work
 * on the tp group alone and nothing goes over the world communicator */
static void pair_checks(rank_ctx *ctx, lt_comm *tpc, int grp) {
    double worst[2] = {0, 0};
    all_checks(ctx, tpc, ctx->arg, 500 + 7 * (uint64_t)grp, worst);
}
static void rank_groups(rank_ctx *ctx) { in_pairs(ctx, "tp", pair_checks); }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char label[400];
    const shape shapes[] = {{3, 8, 12, 32}, {2, 4, 8, 16}};
    for (int k = 0; k < 2; k++)
        for (int tp = 1; tp <= 4; tp *= 2) {
            const shape *S = &shapes[k];
            run_status st = run_ranks(tp, 10.0, rank_world, S, 60);
            snprintf(label, sizeof label,
                     "TP = %d, B %d T %d C %d F %d, fp32 and bf16, with and without SP: enter / exit / backwards, "
                     "scatter, all_reduce exact, dropout the single rank's masks, %s; column -> GELU -> row + bias "
                     "forward and backward within tolerance of the single rank's (worst fp32 %.2g, bf16 %.2g)",
                     tp, S->B, S->T, S->C, S->F, tp > 1 ? "collectives and bytes analytic" : "no communication",
                     shared_results[0].val[0], shared_results[0].val[1]);
            report_run(label, tp, &st, 0);
        }
    run_status st = run_ranks(4, 10.0, rank_groups, &shapes[0], 60);
    report_run("4 ranks as 2 replicas of TP = 2 (tp groups {0,1} and {2,3}, different data each): all of the above "
               "on the group, nothing on the world communicator",
               4, &st, 0);

    /* refusal: no collective involved, so the parent checks it alone */
    const lt_backend *be = lt_backend_cpu();
    lt_tp tp4 = {NULL, 1, 4, 1, be, be->f32};
    char err[512] = "";
    lt_tp_rows *r = lt_tp_rows_new(&tp4, 2, 6, err, sizeof err);
    TAP_CHECK(!r && strstr(err, "tensor_model_parallel_size = 4") && strstr(err, "6 positions does not divide"),
              "SP at TP = 4 refuses T = 6 with a message: '%s'", err);
    lt_tp_rows_free(&tp4, r);
    r = lt_tp_rows_new(&tp4, 2, 8, err, sizeof err);
    TAP_CHECK(r && r->local_T == 2 && r->full_of_stacked && r->local_of_full, "SP at TP = 4 takes T = 8 (local_T 2)");
    lt_tp_rows_free(&tp4, r);

    char names[1024];
    TAP_CHECK(leftover_segments(names, sizeof names) == 0, "no shared-memory segments left behind: %s", names);
    return tap_done();
}

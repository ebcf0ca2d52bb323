/* The MoE combine (lt_moe_combine_forward / _backward and the CPU backend's fp32 and bf16 table entries)
 * against double-precision references: empty slots (-1, with NaN weights that must never be read), a token
 * with no rows (zeros), y rows no slot names (padding to capacity: zeros in dy), outputs that start as
 * garbage (they are written, not accumulated), finite differences of L = sum(out * R) for dy and dweights,
 * and a size that runs the OpenMP team. */
#include "engine/core/tensor.h"
#include "engine/ops/backend.h"
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

/* A deterministic shuffle of 0 .. M-1 (xorshift): each slot's row is distinct, as the dispatch makes them. */
static void shuffle_rows(int32_t *perm, int M, uint64_t seed) {
    for (int i = 0; i < M; i++) perm[i] = i;
    for (int i = M - 1; i > 0; i--) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        const int j = (int)(seed % (uint64_t)(i + 1));
        const int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
}

/* rows [N k]: the first N k rows of a shuffle of M >= N k, with every `hole`-th slot and all of token
 * `empty`'s slots (when in range) set to -1. */
static int32_t *make_rows(int N, int k, int M, int hole, int empty, uint64_t seed) {
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)M), *rows = malloc(sizeof(int32_t) * (size_t)N * k);
    shuffle_rows(perm, M, seed);
    for (int i = 0; i < N * k; i++) rows[i] = (hole > 0 && i % hole == hole - 1) || i / k == empty ? -1 : perm[i];
    free(perm);
    return rows;
}
/* Weights in (0, 1); NaN in the empty slots (never read). */
static float *make_weights(const int32_t *rows, int NK) {
    float *w = tu_new_randn((size_t)NK, 1.0f);
    for (int i = 0; i < NK; i++) w[i] = rows[i] < 0 ? NAN : 0.5f + 0.4f * tanhf(w[i]);
    return w;
}

static void ref_forward(double *out, const float *y, const int32_t *rows, const float *w, int N, int k, int C) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int j = 0; j < k; j++) {
                const int32_t r = rows[n * k + j];
                if (r >= 0) s += (double)w[n * k + j] * y[(size_t)r * C + c];
            }
            out[(size_t)n * C + c] = s;
        }
}
static void ref_backward(double *dy, double *dw, const float *dout, const float *y, const int32_t *rows,
                         const float *w, int N, int k, int M, int C) {
    for (size_t i = 0; i < (size_t)M * C; i++) dy[i] = 0.0;
    for (int i = 0; i < N * k; i++) {
        const int32_t r = rows[i];
        dw[i] = 0.0;
        if (r < 0) continue;
        const float *g = dout + (size_t)(i / k) * C;
        for (int c = 0; c < C; c++) {
            dy[(size_t)r * C + c] = (double)w[i] * g[c];
            dw[i] += (double)g[c] * y[(size_t)r * C + c];
        }
    }
}
/* Rows of y no slot names, and how many of them are not exactly zero in d. */
static int unnamed_rows_nonzero(const float *d, const int32_t *rows, int NK, int M, int C, int *unnamed) {
    char *named = calloc((size_t)M, 1);
    for (int i = 0; i < NK; i++)
        if (rows[i] >= 0) named[rows[i]] = 1;
    int bad = 0;
    *unnamed = 0;
    for (int m = 0; m < M; m++) {
        if (named[m]) continue;
        ++*unnamed;
        for (int c = 0; c < C; c++) bad += d[(size_t)m * C + c] != 0.0f;
    }
    free(named);
    return bad;
}

/* The fp32 op at one shape: forward, dy and dweights against the references; the table entry the same bits. */
static void check_fp32(int N, int k, int M, int C, int hole, int empty) {
    const size_t NC = (size_t)N * C, MC = (size_t)M * C, NK = (size_t)N * k;
    int32_t *rows = make_rows(N, k, M, hole, empty, 0x5eedull + (uint64_t)N * k);
    float *w = make_weights(rows, (int)NK), *y = tu_new_randn(MC, 1.0f), *g = tu_new_randn(NC, 1.0f);
    float *out = tu_new_garbage(NC), *dy = tu_new_garbage(MC), *dw = tu_new_garbage(NK);
    double *ro = malloc(sizeof(double) * NC), *rdy = malloc(sizeof(double) * MC), *rdw = malloc(sizeof(double) * NK);
    lt_moe_combine_forward(out, y, rows, w, N, k, C);
    lt_moe_combine_backward(dy, dw, g, y, rows, w, N, k, M, C);
    ref_forward(ro, y, rows, w, N, k, C);
    ref_backward(rdy, rdw, g, y, rows, w, N, k, M, C);
    int unnamed = 0, zero_tok = 1;
    const int bad = unnamed_rows_nonzero(dy, rows, (int)NK, M, C, &unnamed);
    for (int c = 0; empty >= 0 && empty < N && c < C; c++) zero_tok &= out[(size_t)empty * C + c] == 0.0f;
    const double ef = tu_rel_err(out, ro, NC), ed = tu_rel_err(dy, rdy, MC), ew = tu_rel_err(dw, rdw, NK);
    TAP_CHECK(ef < 1e-6 && zero_tok, "N=%d k=%d M=%d C=%d: forward vs double (rel err %.2e)%s", N, k, M, C, ef,
              empty >= 0 && empty < N ? ", the token with no rows zeros" : "");
    TAP_CHECK(ed < 1e-6 && bad == 0 && unnamed > 0,
              "N=%d k=%d M=%d C=%d: dy written vs double (rel err %.2e), %d unnamed rows zero (%d nonzero)", N, k, M,
              C, ed, unnamed, bad);
    TAP_CHECK(ew < 1e-5, "N=%d k=%d M=%d C=%d: dweights written vs double dots, 0 at empty slots (rel err %.2e)", N, k,
              M, C, ew);
    /* the CPU backend's fp32 table is this op */
    const lt_ops *t = lt_backend_cpu()->f32;
    float *out2 = tu_new_garbage(NC), *dy2 = tu_new_garbage(MC), *dw2 = tu_new_garbage(NK);
    t->moe_combine_forward(out2, y, rows, w, N, k, C);
    t->moe_combine_backward(dy2, dw2, g, y, rows, w, N, k, M, C);
    TAP_CHECK(!memcmp(out, out2, NC * 4) && !memcmp(dy, dy2, MC * 4) && !memcmp(dw, dw2, NK * 4),
              "N=%d k=%d M=%d C=%d: the fp32 table's entries give the same bits", N, k, M, C);
    free(rows), free(w), free(y), free(g), free(out), free(dy), free(dw), free(ro), free(rdy), free(rdw);
    free(out2), free(dy2), free(dw2);
}

/* Finite differences of L = sum(out * R) at a small shape. */
enum { FN = 7, FK = 3, FC = 37, FM = FN * FK + 5 };
static int32_t *f_rows;
static float *f_y, *f_w, *f_out, *f_R;
static double fd_loss(void *ctx) {
    (void)ctx;
    lt_moe_combine_forward(f_out, f_y, f_rows, f_w, FN, FK, FC);
    return tu_dot(f_out, f_R, (size_t)FN * FC);
}
static void check_fd(void) {
    f_rows = make_rows(FN, FK, FM, 5, 2, 0xfdull);
    f_w = make_weights(f_rows, FN * FK), f_y = tu_new_randn((size_t)FM * FC, 1.0f);
    f_out = tu_alloc((size_t)FN * FC), f_R = tu_new_randn((size_t)FN * FC, 1.0f);
    float *dy = tu_new_garbage((size_t)FM * FC), *dw = tu_new_garbage(FN * FK);
    float *zy = tu_alloc((size_t)FM * FC), *zw = tu_alloc(FN * FK);
    lt_moe_combine_backward(dy, dw, f_R, f_y, f_rows, f_w, FN, FK, FM, FC);
    tu_check_fd("moe_combine dy", dy, zy, f_y, (size_t)FM * FC, 1e-2f, fd_loss, NULL, 5e-4);
    tu_check_fd("moe_combine dweights", dw, zw, f_w, FN * FK, 1e-2f, fd_loss, NULL, 5e-4);
    free(f_rows), free(f_w), free(f_y), free(f_out), free(f_R), free(dy), free(dw), free(zy), free(zw);
}

/* The CPU backend's bf16 table: bf16 y, dout, out and dy (rounded once), fp32 weights and dweights; against the
 * double references on the bf16 values (a looser tolerance for the rounded outputs). */
static uint16_t *to_bf16(float *x, size_t n) { /* rounds x in place too: the reference's inputs */
    uint16_t *h = malloc(sizeof(uint16_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(x[i]), x[i] = lt_bf16_to_f32(h[i]);
    return h;
}
static float *from_bf16(const uint16_t *h, size_t n) {
    float *x = tu_alloc(n);
    for (size_t i = 0; i < n; i++) x[i] = lt_bf16_to_f32(h[i]);
    return x;
}
static void check_bf16(int N, int k, int M, int C, int hole, int empty) {
    const size_t NC = (size_t)N * C, MC = (size_t)M * C, NK = (size_t)N * k;
    const lt_ops *t = lt_backend_cpu()->bf16;
    int32_t *rows = make_rows(N, k, M, hole, empty, 0xbf16ull + (uint64_t)N);
    float *w = make_weights(rows, (int)NK), *y = tu_new_randn(MC, 1.0f), *g = tu_new_randn(NC, 1.0f);
    uint16_t *hy = to_bf16(y, MC), *hg = to_bf16(g, NC), *ho = malloc(NC * 2), *hdy = malloc(MC * 2);
    memset(ho, 0xff, NC * 2), memset(hdy, 0xff, MC * 2); /* NaN bits: a slot left unwritten shows */
    float *dw = tu_new_garbage(NK);
    double *ro = malloc(sizeof(double) * NC), *rdy = malloc(sizeof(double) * MC), *rdw = malloc(sizeof(double) * NK);
    t->moe_combine_forward(ho, hy, rows, w, N, k, C);
    t->moe_combine_backward(hdy, dw, hg, hy, rows, w, N, k, M, C);
    ref_forward(ro, y, rows, w, N, k, C);
    ref_backward(rdy, rdw, g, y, rows, w, N, k, M, C);
    float *out = from_bf16(ho, NC), *dy = from_bf16(hdy, MC);
    int unnamed = 0;
    const int bad = unnamed_rows_nonzero(dy, rows, (int)NK, M, C, &unnamed);
    const double ef = tu_rel_err(out, ro, NC), ed = tu_rel_err(dy, rdy, MC), ew = tu_rel_err(dw, rdw, NK);
    TAP_CHECK(ef < 1e-2 && ed < 1e-2 && bad == 0 && unnamed > 0 && ew < 1e-5,
              "bf16 table N=%d k=%d M=%d C=%d: forward (rel err %.2e, tol 1e-2), dy (%.2e, tol 1e-2, %d unnamed rows "
              "zero, %d nonzero), dweights fp32 (%.2e, tol 1e-5)",
              N, k, M, C, ef, ed, unnamed, bad, ew);
    /* and the rounding is what rounding the fp32 op's results once gives */
    float *of = tu_alloc(NC), *dyf = tu_alloc(MC), *dwf = tu_alloc(NK);
    lt_moe_combine_forward(of, y, rows, w, N, k, C);
    lt_moe_combine_backward(dyf, dwf, g, y, rows, w, N, k, M, C);
    int diff = 0;
    for (size_t i = 0; i < NC; i++) diff += lt_f32_to_bf16(of[i]) != ho[i];
    for (size_t i = 0; i < MC; i++) diff += lt_f32_to_bf16(dyf[i]) != hdy[i];
    TAP_CHECK(diff == 0 && !memcmp(dwf, dw, NK * 4),
              "bf16 table N=%d k=%d M=%d C=%d: the fp32 op's results rounded once (%d differ)", N, k, M, C, diff);
    free(rows), free(w), free(y), free(g), free(hy), free(hg), free(ho), free(hdy), free(dw), free(ro), free(rdy);
    free(rdw), free(out), free(dy), free(of), free(dyf), free(dwf);
}

int main(void) {
    /* N, k, M, C, every hole-th slot empty, the token with no rows */
    check_fp32(7, 3, 7 * 3 + 5, 37, 5, 2);
    check_fp32(5, 1, 8, 8, 0, -1);               /* k = 1, no empty slots; 3 padding rows */
    check_fp32(4, 2, 9, 16, 1, -1);              /* every slot empty: out zeros, dy zeros */
    check_fp32(600, 2, 600 * 2 + 37, 100, 7, 11); /* the OpenMP team */
    check_fd();
    check_bf16(7, 3, 7 * 3 + 5, 37, 5, 2);
    check_bf16(600, 2, 600 * 2 + 37, 100, 7, 11);
    return tap_done();
}

/* The CPU backend's op tables: fp32 (ops.h as it is) and the bf16 reference for mixed precision.
 *
 * The bf16 table stores activations and reads weights in bf16 exactly where a GPU does: each op
 * widens its bf16 operands to fp32, runs the fp32 op of ops.h, and rounds its bf16 results to
 * nearest even, once per stored value (a bf16 output the op accumulates into, such as a norm's dinp,
 * is widened first). It is slow (conversions around every op) and exists to check the mixed-precision
 * machinery and the GPU's bf16 kernels against a known answer. */
#include <stdlib.h>

#include "engine/core/alloc.h"
#include "engine/core/tensor.h"
#include "engine/ops/backend.h"
#include "engine/ops/ops.h"

/* ---- fp32: ops.h behind the table's untyped activation pointers ---- */

static void f32_embedding_forward(void *out, const int32_t *ids, const void *table, int N, int C) {
    lt_embedding_forward(out, ids, table, N, C);
}
static void f32_embedding_backward(float *dtable, const void *dout, const int32_t *ids, int N, int C) {
    lt_embedding_backward(dtable, dout, ids, N, C);
}
static void f32_position_embedding_forward(void *out, const void *wpe, int B, int T, int C, const int32_t *pos) {
    lt_position_embedding_forward(out, wpe, B, T, C, pos);
}
static void f32_position_embedding_backward(float *dwpe, const void *dout, int B, int T, int C, const int32_t *pos) {
    lt_position_embedding_backward(dwpe, dout, B, T, C, pos);
}
static void f32_moe_combine_forward(void *out, const void *y, const int32_t *rows, const float *weights, int N, int k,
                                    int C) {
    lt_moe_combine_forward(out, y, rows, weights, N, k, C);
}
static void f32_moe_combine_backward(void *dy, float *dweights, const void *dout, const void *y, const int32_t *rows,
                                     const float *weights, int N, int k, int M, int C) {
    lt_moe_combine_backward(dy, dweights, dout, y, rows, weights, N, k, M, C);
}
static void f32_layernorm_forward(void *out, float *mean, float *rstd, const void *inp, const void *w, const void *b,
                                  int N, int C, float eps) {
    lt_layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps);
}
static void f32_layernorm_backward(void *dinp, float *dw, float *db, const void *dout, const void *inp, const void *w,
                                   const float *mean, const float *rstd, int N, int C) {
    lt_layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
}
static void f32_rmsnorm_forward(void *out, float *rstd, const void *inp, const void *w, int N, int C, float eps) {
    lt_rmsnorm_forward(out, rstd, inp, w, N, C, eps);
}
static void f32_rmsnorm_backward(void *dinp, float *dw, const void *dout, const void *inp, const void *w,
                                 const float *rstd, int N, int C) {
    lt_rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
}
static void f32_linear_forward(void *out, const void *inp, const void *w, const void *b, const void *res, int N,
                               int IN, int OUT) {
    lt_linear_forward(out, inp, w, b, res, N, IN, OUT);
}
static void f32_linear_backward(void *dinp, float *dw, float *db, const void *dout, const void *inp, const void *w,
                                int N, int IN, int OUT) {
    lt_linear_backward(dinp, dw, db, dout, inp, w, N, IN, OUT);
}
static void f32_linear_gelu_forward(void *act, void *pre, const void *inp, const void *w, const void *b, int N, int IN,
                                    int OUT) {
    lt_linear_forward(pre, inp, w, b, NULL, N, IN, OUT);
    lt_gelu_tanh_forward(act, pre, (int64_t)N * OUT);
}
static void f32_linear_dgelu_backward(void *dpre, float *dw, float *db, const void *dout, const void *inp,
                                      const void *w, const void *pre, int N, int IN, int OUT) {
    const size_t bytes = sizeof(float) * (size_t)N * IN;
    float *dact = lt_alloc(bytes);
    lt_linear_backward(dact, dw, db, dout, inp, w, N, IN, OUT);
    lt_gelu_tanh_backward(dpre, dact, pre, (int64_t)N * IN);
    lt_release(dact, bytes);
}
static void f32_attention_forward(void *out, float *lse, const void *qkv, int B, int T, int H, int G, int D, float p,
                                  uint64_t key, int h0, int HT) {
    lt_attention_forward(out, lse, qkv, B, T, H, G, D, p, key, h0, HT);
}
static void f32_attention_backward(void *dqkv, const void *dout, const void *qkv, const void *out, const float *lse,
                                   int B, int T, int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    lt_attention_backward(dqkv, dout, qkv, out, lse, B, T, H, G, D, p, key, h0, HT);
}
static void f32_attention_kv_forward(void *out, float *lse, const void *qkv, const void *kv, int B, int Tq, int Tk,
                                     int H, int G, int D, const int32_t *qp, const int32_t *kp, int S, float p,
                                     uint64_t key, int h0, int HT) {
    lt_attention_kv_forward(out, lse, qkv, kv, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT);
}
static void f32_attention_merge(void *out, float *lse, const void *out_b, const float *lse_b, int B, int T, int H,
                                int D) {
    lt_attention_merge(out, lse, out_b, lse_b, B, T, H, D);
}
static void f32_attention_kv_backward(void *dq, void *dkv, const void *dout, const void *qkv, const void *kv,
                                      const void *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                                      const int32_t *qp, const int32_t *kp, int S, float p, uint64_t key, int h0,
                                      int HT) {
    lt_attention_kv_backward(dq, dkv, dout, qkv, kv, out, lse, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT);
}
static void f32_rope_forward(void *qkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    lt_rope_forward(qkv, B, T, H, G, D, base, pos);
}
static void f32_rope_backward(void *dqkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    lt_rope_backward(dqkv, B, T, H, G, D, base, pos);
}
static void f32_qk_norm_forward(void *out, float *mean, float *rstd, const void *inp, const void *qw, const void *qb,
                                const void *kw, const void *kb, int N, int H, int G, int D, float eps) {
    lt_qk_norm_forward(out, mean, rstd, inp, qw, qb, kw, kb, N, H, G, D, eps);
}
static void f32_qk_norm_backward(void *dinp, float *dqw, float *dqb, float *dkw, float *dkb, const void *dout,
                                 const void *inp, const void *qw, const void *kw, const float *mean,
                                 const float *rstd, int N, int H, int G, int D) {
    lt_qk_norm_backward(dinp, dqw, dqb, dkw, dkb, dout, inp, qw, kw, mean, rstd, N, H, G, D);
}
static void f32_gelu_forward(void *out, const void *inp, int64_t n) { lt_gelu_forward(out, inp, n); }
static void f32_gelu_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    lt_gelu_backward(dinp, dout, inp, n);
}
static void f32_gelu_tanh_forward(void *out, const void *inp, int64_t n) { lt_gelu_tanh_forward(out, inp, n); }
static void f32_gelu_tanh_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    lt_gelu_tanh_backward(dinp, dout, inp, n);
}
static void f32_swiglu_forward(void *out, const void *inp, int N, int F) { lt_swiglu_forward(out, inp, N, F); }
static void f32_swiglu_backward(void *dinp, const void *dout, const void *inp, int N, int F) {
    lt_swiglu_backward(dinp, dout, inp, N, F);
}
static void f32_add_forward(void *out, const void *a, const void *b, int64_t n) { lt_add_forward(out, a, b, n); }
static void f32_dropout_forward(void *out, const void *inp, int64_t n, float p, uint64_t key, uint64_t first) {
    lt_dropout_forward(out, inp, n, p, key, first);
}
static void f32_dropout_backward(void *dinp, const void *dout, int64_t n, float p, uint64_t key, uint64_t first) {
    lt_dropout_backward(dinp, dout, n, p, key, first);
}
static void f32_cross_entropy_forward(float *losses, float *lse, const void *logits, const int32_t *targets, int N,
                                      int V) {
    lt_cross_entropy_forward(losses, lse, logits, targets, N, V);
}
static void f32_cross_entropy_backward(void *dlogits, const void *logits, const float *lse, const int32_t *targets,
                                       const float *dloss, int N, int V) {
    lt_cross_entropy_backward(dlogits, logits, lse, targets, dloss, N, V);
}

/* ---- grouped linear: on the CPU the table's own linear ops, group by group (each one a multi-threaded
 * sgemm over all of the group's rows) ---- */

#define GROUPED_LINEAR(prefix, es)                                                                                  \
    static void prefix##_grouped_linear_forward(void *out, const void *inp, const void *const *w,                 \
                                                const void *const *b, const int64_t *first, int G, int IN,         \
                                                int OUT) {                                                          \
        for (int g = 0; g < G; g++)                                                                                 \
            if (first[g + 1] > first[g])                                                                            \
                prefix##_linear_forward((char *)out + (es) * (size_t)first[g] * OUT,                                \
                                        (const char *)inp + (es) * (size_t)first[g] * IN, w[g], b ? b[g] : NULL,    \
                                        NULL, (int)(first[g + 1] - first[g]), IN, OUT);                             \
    }                                                                                                               \
    static void prefix##_grouped_linear_backward(void *dinp, float *const *dw, float *const *db, const void *dout, \
                                                 const void *inp, const void *const *w, const int64_t *first,      \
                                                 int G, int IN, int OUT) {                                          \
        for (int g = 0; g < G; g++)                                                                                 \
            if (first[g + 1] > first[g])                                                                            \
                prefix##_linear_backward(dinp ? (char *)dinp + (es) * (size_t)first[g] * IN : NULL, dw[g],          \
                                         db ? db[g] : NULL, (const char *)dout + (es) * (size_t)first[g] * OUT,     \
                                         (const char *)inp + (es) * (size_t)first[g] * IN, w[g],                    \
                                         (int)(first[g + 1] - first[g]), IN, OUT);                                  \
    }

#define OPS_TABLE(prefix, dt)                                                                                     \
    {                                                                                                             \
        .dtype = dt, .embedding_forward = prefix##_embedding_forward,                                            \
        .embedding_backward = prefix##_embedding_backward,                                                        \
        .position_embedding_forward = prefix##_position_embedding_forward,                                        \
        .position_embedding_backward = prefix##_position_embedding_backward,                                      \
        .moe_combine_forward = prefix##_moe_combine_forward,                                                      \
        .moe_combine_backward = prefix##_moe_combine_backward,                                                    \
        .layernorm_forward = prefix##_layernorm_forward, .layernorm_backward = prefix##_layernorm_backward,     \
        .rmsnorm_forward = prefix##_rmsnorm_forward, .rmsnorm_backward = prefix##_rmsnorm_backward,             \
        .linear_forward = prefix##_linear_forward, .linear_backward = prefix##_linear_backward,                 \
        .linear_gelu_forward = prefix##_linear_gelu_forward,                                                      \
        .linear_dgelu_backward = prefix##_linear_dgelu_backward,                                                  \
        .grouped_linear_forward = prefix##_grouped_linear_forward,                                                \
        .grouped_linear_backward = prefix##_grouped_linear_backward,                                              \
        .attention_forward = prefix##_attention_forward, .attention_backward = prefix##_attention_backward,     \
        .attention_kv_forward = prefix##_attention_kv_forward, .attention_merge = prefix##_attention_merge,     \
        .attention_kv_backward = prefix##_attention_kv_backward,                                                  \
        .rope_forward = prefix##_rope_forward, .rope_backward = prefix##_rope_backward,                         \
        .qk_norm_forward = prefix##_qk_norm_forward, .qk_norm_backward = prefix##_qk_norm_backward,             \
        .gelu_forward = prefix##_gelu_forward, .gelu_backward = prefix##_gelu_backward,                         \
        .gelu_tanh_forward = prefix##_gelu_tanh_forward, .gelu_tanh_backward = prefix##_gelu_tanh_backward,     \
        .swiglu_forward = prefix##_swiglu_forward, .swiglu_backward = prefix##_swiglu_backward,                 \
        .add_forward = prefix##_add_forward, .dropout_forward = prefix##_dropout_forward,                       \
        .dropout_backward = prefix##_dropout_backward, .cross_entropy_forward = prefix##_cross_entropy_forward, \
        .cross_entropy_backward = prefix##_cross_entropy_backward,                                                \
    }

GROUPED_LINEAR(f32, sizeof(float))
const lt_ops lt_cpu_ops_f32 = OPS_TABLE(f32, LT_F32);

/* ---- bf16: widen, run the fp32 op, round ---- */

/* An fp32 copy of n bf16 values (NULL in, NULL out). */
static float *widen(const void *src, int64_t n) {
    if (!src) return NULL;
    float *f = lt_alloc(sizeof(float) * (size_t)n);
    const uint16_t *h = src;
    for (int64_t i = 0; i < n; i++) f[i] = lt_bf16_to_f32(h[i]);
    return f;
}

/* Rounds n fp32 values into dst (bf16) and releases the fp32 copy. */
static void narrow(void *dst, float *f, int64_t n) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(f[i]);
    lt_release(f, sizeof(float) * (size_t)n);
}

static void drop(const float *f, int64_t n) {
    if (f) lt_release((void *)f, sizeof(float) * (size_t)n);
}

/* Scratch for an output the op overwrites (a forward's output, an activation gradient): its old bf16
 * values are not read. */
static float *scratch(int64_t n) { return lt_alloc(sizeof(float) * (size_t)n); }

static void bf16_embedding_forward(void *out, const int32_t *ids, const void *table, int N, int C) {
    /* Rows are copied: widening only the rows used would do, but the whole table keeps it simple. */
    float *o = scratch((int64_t)N * C);
    const uint16_t *t = table;
    for (int64_t n = 0; n < N; n++)
        for (int c = 0; c < C; c++) o[n * C + c] = lt_bf16_to_f32(t[(int64_t)ids[n] * C + c]);
    narrow(out, o, (int64_t)N * C);
}
static void bf16_embedding_backward(float *dtable, const void *dout, const int32_t *ids, int N, int C) {
    float *d = widen(dout, (int64_t)N * C);
    lt_embedding_backward(dtable, d, ids, N, C);
    drop(d, (int64_t)N * C);
}
static void bf16_position_embedding_forward(void *out, const void *wpe, int B, int T, int C, const int32_t *pos) {
    /* the table rows up to the largest position are widened (positions may reach past T) */
    int64_t rows = T;
    for (int t = 0; pos && t < T; t++) rows = pos[t] + 1 > rows ? pos[t] + 1 : rows;
    float *o = widen(out, (int64_t)B * T * C), *w = widen(wpe, rows * C);
    lt_position_embedding_forward(o, w, B, T, C, pos);
    drop(w, rows * C);
    narrow(out, o, (int64_t)B * T * C);
}
static void bf16_position_embedding_backward(float *dwpe, const void *dout, int B, int T, int C, const int32_t *pos) {
    float *d = widen(dout, (int64_t)B * T * C);
    lt_position_embedding_backward(dwpe, d, B, T, C, pos);
    drop(d, (int64_t)B * T * C);
}
/* The forward does not know M: the named rows are widened into a compact copy (slot i's row at i) and the
 * fp32 op runs on that. */
static void bf16_moe_combine_forward(void *out, const void *y, const int32_t *rows, const float *weights, int N,
                                     int k, int C) {
    const int64_t NK = (int64_t)N * k, NC = (int64_t)N * C;
    float *o = scratch(NC), *yc = scratch(NK * C);
    int32_t *slot = lt_alloc(sizeof(int32_t) * (size_t)NK);
    const uint16_t *h = y;
    for (int64_t i = 0; i < NK; i++) {
        slot[i] = rows[i] < 0 ? -1 : (int32_t)i;
        for (int c = 0; rows[i] >= 0 && c < C; c++) yc[i * C + c] = lt_bf16_to_f32(h[(int64_t)rows[i] * C + c]);
    }
    lt_moe_combine_forward(o, yc, slot, weights, N, k, C);
    drop(yc, NK * C);
    lt_release(slot, sizeof(int32_t) * (size_t)NK);
    narrow(out, o, NC);
}
static void bf16_moe_combine_backward(void *dy, float *dweights, const void *dout, const void *y, const int32_t *rows,
                                      const float *weights, int N, int k, int M, int C) {
    const int64_t NC = (int64_t)N * C, MC = (int64_t)M * C;
    float *d = scratch(MC), *g = widen(dout, NC), *yf = widen(y, MC);
    lt_moe_combine_backward(d, dweights, g, yf, rows, weights, N, k, M, C);
    drop(g, NC), drop(yf, MC);
    narrow(dy, d, MC);
}
static void bf16_layernorm_forward(void *out, float *mean, float *rstd, const void *inp, const void *w, const void *b,
                                   int N, int C, float eps) {
    const int64_t NC = (int64_t)N * C;
    float *o = scratch(NC), *x = widen(inp, NC), *wf = widen(w, C), *bf = widen(b, C);
    lt_layernorm_forward(o, mean, rstd, x, wf, bf, N, C, eps);
    drop(x, NC), drop(wf, C), drop(bf, C);
    narrow(out, o, NC);
}
static void bf16_layernorm_backward(void *dinp, float *dw, float *db, const void *dout, const void *inp, const void *w,
                                    const float *mean, const float *rstd, int N, int C) {
    const int64_t NC = (int64_t)N * C;
    float *di = widen(dinp, NC), *d = widen(dout, NC), *x = widen(inp, NC), *wf = widen(w, C);
    lt_layernorm_backward(di, dw, db, d, x, wf, mean, rstd, N, C);
    drop(d, NC), drop(x, NC), drop(wf, C);
    narrow(dinp, di, NC);
}
static void bf16_rmsnorm_forward(void *out, float *rstd, const void *inp, const void *w, int N, int C, float eps) {
    const int64_t NC = (int64_t)N * C;
    float *o = scratch(NC), *x = widen(inp, NC), *wf = widen(w, C);
    lt_rmsnorm_forward(o, rstd, x, wf, N, C, eps);
    drop(x, NC), drop(wf, C);
    narrow(out, o, NC);
}
static void bf16_rmsnorm_backward(void *dinp, float *dw, const void *dout, const void *inp, const void *w,
                                  const float *rstd, int N, int C) {
    const int64_t NC = (int64_t)N * C;
    float *di = widen(dinp, NC), *d = widen(dout, NC), *x = widen(inp, NC), *wf = widen(w, C);
    lt_rmsnorm_backward(di, dw, d, x, wf, rstd, N, C);
    drop(d, NC), drop(x, NC), drop(wf, C);
    narrow(dinp, di, NC);
}
static void bf16_linear_forward(void *out, const void *inp, const void *w, const void *b, const void *res, int N,
                                int IN, int OUT) {
    const int64_t NI = (int64_t)N * IN, NO = (int64_t)N * OUT, WN = (int64_t)IN * OUT;
    float *o = scratch(NO), *x = widen(inp, NI), *wf = widen(w, WN), *bf = widen(b, OUT), *rf = widen(res, NO);
    lt_linear_forward(o, x, wf, bf, rf, N, IN, OUT);
    drop(x, NI), drop(wf, WN), drop(bf, OUT), drop(rf, NO);
    narrow(out, o, NO);
}
static void bf16_linear_backward(void *dinp, float *dw, float *db, const void *dout, const void *inp, const void *w,
                                 int N, int IN, int OUT) {
    const int64_t NI = (int64_t)N * IN, NO = (int64_t)N * OUT, WN = (int64_t)IN * OUT;
    float *di = dinp ? scratch(NI) : NULL, *d = widen(dout, NO), *x = widen(inp, NI), *wf = widen(w, WN);
    lt_linear_backward(di, dw, db, d, x, wf, N, IN, OUT);
    drop(d, NO), drop(x, NI), drop(wf, WN);
    if (dinp) narrow(dinp, di, NI);
}
/* Like the fused GPU op: act is the GELU of the unrounded pre; dpre the GELU derivative times the
 * unrounded product. */
static void bf16_linear_gelu_forward(void *act, void *pre, const void *inp, const void *w, const void *b, int N,
                                     int IN, int OUT) {
    const int64_t NI = (int64_t)N * IN, NO = (int64_t)N * OUT, WN = (int64_t)IN * OUT;
    float *o = scratch(NO), *a = scratch(NO), *x = widen(inp, NI), *wf = widen(w, WN), *bf = widen(b, OUT);
    lt_linear_forward(o, x, wf, bf, NULL, N, IN, OUT);
    lt_gelu_tanh_forward(a, o, NO);
    drop(x, NI), drop(wf, WN), drop(bf, OUT);
    narrow(pre, o, NO);
    narrow(act, a, NO);
}
static void bf16_linear_dgelu_backward(void *dpre, float *dw, float *db, const void *dout, const void *inp,
                                       const void *w, const void *pre, int N, int IN, int OUT) {
    const int64_t NI = (int64_t)N * IN, NO = (int64_t)N * OUT, WN = (int64_t)IN * OUT;
    float *da = scratch(NI), *dp = scratch(NI), *d = widen(dout, NO), *x = widen(inp, NI), *wf = widen(w, WN);
    float *p = widen(pre, NI);
    lt_linear_backward(da, dw, db, d, x, wf, N, IN, OUT);
    lt_gelu_tanh_backward(dp, da, p, NI);
    drop(da, NI), drop(d, NO), drop(x, NI), drop(wf, WN), drop(p, NI);
    narrow(dpre, dp, NI);
}
static void bf16_attention_forward(void *out, float *lse, const void *qkv, int B, int T, int H, int G, int D, float p,
                                   uint64_t key, int h0, int HT) {
    const int64_t NQ = (int64_t)B * T * (H + 2 * G) * D, NO = (int64_t)B * T * H * D;
    float *o = scratch(NO), *q = widen(qkv, NQ);
    lt_attention_forward(o, lse, q, B, T, H, G, D, p, key, h0, HT);
    drop(q, NQ);
    narrow(out, o, NO);
}
static void bf16_attention_backward(void *dqkv, const void *dout, const void *qkv, const void *out, const float *lse,
                                    int B, int T, int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    const int64_t NQ = (int64_t)B * T * (H + 2 * G) * D, NO = (int64_t)B * T * H * D;
    float *dq = scratch(NQ), *d = widen(dout, NO), *q = widen(qkv, NQ), *o = widen(out, NO);
    lt_attention_backward(dq, d, q, o, lse, B, T, H, G, D, p, key, h0, HT);
    drop(d, NO), drop(q, NQ), drop(o, NO);
    narrow(dqkv, dq, NQ);
}
static void bf16_attention_kv_forward(void *out, float *lse, const void *qkv, const void *kv, int B, int Tq, int Tk,
                                      int H, int G, int D, const int32_t *qp, const int32_t *kp, int S, float p,
                                      uint64_t key, int h0, int HT) {
    const int64_t NQ = (int64_t)B * Tq * (H + 2 * G) * D, NK = (int64_t)B * Tk * 2 * G * D, NO = (int64_t)B * Tq * H * D;
    float *o = scratch(NO), *q = widen(qkv, NQ), *k = widen(kv, NK);
    lt_attention_kv_forward(o, lse, q, k, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT);
    drop(q, NQ), drop(k, NK);
    narrow(out, o, NO);
}
static void bf16_attention_merge(void *out, float *lse, const void *out_b, const float *lse_b, int B, int T, int H,
                                 int D) {
    const int64_t NO = (int64_t)B * T * H * D;
    float *o = widen(out, NO), *ob = widen(out_b, NO);
    lt_attention_merge(o, lse, ob, lse_b, B, T, H, D);
    drop(ob, NO);
    narrow(out, o, NO);
}
/* dq accumulates: its bf16 query heads are widened, added to in fp32 and rounded (the key / value slots
 * go through the round trip unchanged: bf16 -> fp32 -> bf16 is exact). */
static void bf16_attention_kv_backward(void *dq, void *dkv, const void *dout, const void *qkv, const void *kv,
                                       const void *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                                       const int32_t *qp, const int32_t *kp, int S, float p, uint64_t key, int h0,
                                       int HT) {
    const int64_t NQ = (int64_t)B * Tq * (H + 2 * G) * D, NK = (int64_t)B * Tk * 2 * G * D, NO = (int64_t)B * Tq * H * D;
    float *dqf = widen(dq, NQ), *dk = scratch(NK), *d = widen(dout, NO), *q = widen(qkv, NQ), *k = widen(kv, NK);
    float *o = widen(out, NO);
    lt_attention_kv_backward(dqf, dk, d, q, k, o, lse, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT);
    drop(d, NO), drop(q, NQ), drop(k, NK), drop(o, NO);
    narrow(dq, dqf, NQ);
    narrow(dkv, dk, NK);
}
static void bf16_rope_forward(void *qkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    const int64_t NQ = (int64_t)B * T * (H + 2 * G) * D;
    float *q = widen(qkv, NQ);
    lt_rope_forward(q, B, T, H, G, D, base, pos);
    narrow(qkv, q, NQ);
}
static void bf16_rope_backward(void *dqkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    const int64_t NQ = (int64_t)B * T * (H + 2 * G) * D;
    float *q = widen(dqkv, NQ);
    lt_rope_backward(q, B, T, H, G, D, base, pos);
    narrow(dqkv, q, NQ);
}
static void bf16_qk_norm_forward(void *out, float *mean, float *rstd, const void *inp, const void *qw, const void *qb,
                                 const void *kw, const void *kb, int N, int H, int G, int D, float eps) {
    const int64_t NQ = (int64_t)N * (H + 2 * G) * D;
    float *o = scratch(NQ), *x = widen(inp, NQ);
    float *qwf = widen(qw, D), *qbf = widen(qb, D), *kwf = widen(kw, D), *kbf = widen(kb, D);
    lt_qk_norm_forward(o, mean, rstd, x, qwf, qbf, kwf, kbf, N, H, G, D, eps);
    drop(x, NQ), drop(qwf, D), drop(qbf, D), drop(kwf, D), drop(kbf, D);
    narrow(out, o, NQ);
}
static void bf16_qk_norm_backward(void *dinp, float *dqw, float *dqb, float *dkw, float *dkb, const void *dout,
                                  const void *inp, const void *qw, const void *kw, const float *mean,
                                  const float *rstd, int N, int H, int G, int D) {
    const int64_t NQ = (int64_t)N * (H + 2 * G) * D;
    float *di = scratch(NQ), *d = widen(dout, NQ), *x = widen(inp, NQ), *qwf = widen(qw, D), *kwf = widen(kw, D);
    lt_qk_norm_backward(di, dqw, dqb, dkw, dkb, d, x, qwf, kwf, mean, rstd, N, H, G, D);
    drop(d, NQ), drop(x, NQ), drop(qwf, D), drop(kwf, D);
    narrow(dinp, di, NQ);
}
static void bf16_gelu_forward(void *out, const void *inp, int64_t n) {
    float *o = scratch(n), *x = widen(inp, n);
    lt_gelu_forward(o, x, n);
    drop(x, n);
    narrow(out, o, n);
}
static void bf16_gelu_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    float *di = scratch(n), *d = widen(dout, n), *x = widen(inp, n);
    lt_gelu_backward(di, d, x, n);
    drop(d, n), drop(x, n);
    narrow(dinp, di, n);
}
static void bf16_gelu_tanh_forward(void *out, const void *inp, int64_t n) {
    float *o = scratch(n), *x = widen(inp, n);
    lt_gelu_tanh_forward(o, x, n);
    drop(x, n);
    narrow(out, o, n);
}
static void bf16_gelu_tanh_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    float *di = scratch(n), *d = widen(dout, n), *x = widen(inp, n);
    lt_gelu_tanh_backward(di, d, x, n);
    drop(d, n), drop(x, n);
    narrow(dinp, di, n);
}
static void bf16_swiglu_forward(void *out, const void *inp, int N, int F) {
    const int64_t NF = (int64_t)N * F;
    float *o = scratch(NF), *x = widen(inp, 2 * NF);
    lt_swiglu_forward(o, x, N, F);
    drop(x, 2 * NF);
    narrow(out, o, NF);
}
static void bf16_swiglu_backward(void *dinp, const void *dout, const void *inp, int N, int F) {
    const int64_t NF = (int64_t)N * F;
    float *di = scratch(2 * NF), *d = widen(dout, NF), *x = widen(inp, 2 * NF);
    lt_swiglu_backward(di, d, x, N, F);
    drop(d, NF), drop(x, 2 * NF);
    narrow(dinp, di, 2 * NF);
}
static void bf16_add_forward(void *out, const void *a, const void *b, int64_t n) {
    float *x = widen(a, n), *y = widen(b, n);
    lt_add_forward(x, x, y, n);
    drop(y, n);
    narrow(out, x, n);
}
static void bf16_dropout_forward(void *out, const void *inp, int64_t n, float p, uint64_t key, uint64_t first) {
    float *x = widen(inp, n);
    lt_dropout_forward(x, x, n, p, key, first);
    narrow(out, x, n);
}
static void bf16_dropout_backward(void *dinp, const void *dout, int64_t n, float p, uint64_t key, uint64_t first) {
    float *di = scratch(n), *d = widen(dout, n);
    lt_dropout_backward(di, d, n, p, key, first);
    drop(d, n);
    narrow(dinp, di, n);
}
static void bf16_cross_entropy_forward(float *losses, float *lse, const void *logits, const int32_t *targets, int N,
                                       int V) {
    const int64_t NV = (int64_t)N * V;
    float *l = widen(logits, NV);
    lt_cross_entropy_forward(losses, lse, l, targets, N, V);
    drop(l, NV);
}
static void bf16_cross_entropy_backward(void *dlogits, const void *logits, const float *lse, const int32_t *targets,
                                        const float *dloss, int N, int V) {
    const int64_t NV = (int64_t)N * V;
    float *l = widen(logits, NV);
    lt_cross_entropy_backward(l, l, lse, targets, dloss, N, V);
    narrow(dlogits, l, NV);
}

GROUPED_LINEAR(bf16, sizeof(uint16_t))
const lt_ops lt_cpu_ops_bf16 = OPS_TABLE(bf16, LT_BF16);

// LayerNorm and RMSNorm over the last dimension. Forward and dinp: one warp per row (8 rows per block),
// fp32 sums reduced with shuffles, the CPU's formulas (two-pass variance). Weight and bias gradients:
// column sums over all rows, done deterministically without atomics: per-block partial sums over a
// chunk of rows into scratch, then a second kernel that adds the partials in order into dweight/dbias.
// Activations and weights are float or bf16 (read as fp32, outputs rounded once); statistics and the
// weight gradients are fp32 in both. Rows and weight-gradient columns move as 16-byte packs when the
// pointers are 16-byte aligned and C a whole number of packs (see the kernels).
// Every kernel visits a selection of rows (norm_rows): all rows in order for the plain ops, the query or
// the key heads of each token for the per-head norms of a fused qkv buffer (qk_norm_forward / _backward).
#include "engine/ops/cuda/internal.cuh"

#define NORM_ROWS_PER_BLOCK 8 /* warps per block, one row each */
#define NORM_WG_COLS 32       /* weight-gradient block: 32 columns x 8 row lanes */
#define NORM_WG_ROWS 8

/* Logical row r of a selection is buffer row (r / count) * period + first + r % count. */
struct norm_rows {
    int period, first, count;
};
static const norm_rows NORM_ALL_ROWS = {1, 0, 1};
static __device__ __forceinline__ int64_t norm_row(norm_rows s, int r) {
    if (s.count == 1) return (int64_t)r * s.period + s.first; /* no division on the plain ops */
    return (int64_t)(r / s.count) * s.period + s.first + r % s.count;
}

/* The row kernels read and write W elements at a time: W = CUDA_VEC(T) (16-byte packs) when C % W == 0
 * and every pointer of the row is 16-byte aligned (then every row is), W = 1 otherwise (one element per
 * lane and step). Lane L handles the packs L, L + 32, ... of its row: the per-element math is the same
 * for both; the fp32 sums of the statistics (mean, variance, the backward dot products) visit the
 * elements in another order per lane, so their last bits can differ between the two paths. */
template <typename scalar_t, int W>
__global__ void norm_layernorm_forward_kernel(scalar_t *out, float *mean, float *rstd, const scalar_t *inp,
                                              const scalar_t *weight, const scalar_t *bias, int N, int C,
                                              float eps, norm_rows sel) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return; /* whole warps leave; the kernel has no __syncthreads */
    const scalar_t *x = inp + norm_row(sel, row) * C;
    scalar_t *y = out + norm_row(sel, row) * C;
    float s = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + c);
#pragma unroll
        for (int k = 0; k < W; k++) s += cuda_ld(&xv.x[k]);
    }
    const float m = cuda_warp_sum(s) / C;
    float v = 0.0f; /* two passes: no cancellation when |mean| >> std */
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float d = cuda_ld(&xv.x[k]) - m;
            v += d * d;
        }
    }
    const float r = 1.0f / sqrtf(cuda_warp_sum(v) / C + eps);
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + c), wv = cuda_ldp<W>(weight + c);
        cuda_pack<scalar_t, W> bv{}, yv;
        if (bias) bv = cuda_ldp<W>(bias + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float o = (cuda_ld(&xv.x[k]) - m) * r * cuda_ld(&wv.x[k]);
            if (bias) o += cuda_ld(&bv.x[k]);
            cuda_st(&yv.x[k], o);
        }
        cuda_stp<W>(y + c, yv);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

/* dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight. */
template <typename scalar_t, int W>
__global__ void norm_layernorm_backward_kernel(scalar_t *dinp, const scalar_t *dout, const scalar_t *inp,
                                               const scalar_t *weight, const float *mean, const float *rstd, int N,
                                               int C, norm_rows sel) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const int64_t at = norm_row(sel, row) * C;
    const scalar_t *x = inp + at, *g = dout + at;
    scalar_t *dx = dinp + at;
    const float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(g + c), wv = cuda_ldp<W>(weight + c), xv = cuda_ldp<W>(x + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float dn = cuda_ld(&gv.x[k]) * cuda_ld(&wv.x[k]);
            s1 += dn;
            s2 += dn * (cuda_ld(&xv.x[k]) - m) * r;
        }
    }
    s1 = cuda_warp_sum(s1) / C;
    s2 = cuda_warp_sum(s2) / C;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(g + c), wv = cuda_ldp<W>(weight + c), xv = cuda_ldp<W>(x + c);
        cuda_pack<scalar_t, W> dv = cuda_ldp<W>(dx + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float d = r * (cuda_ld(&gv.x[k]) * cuda_ld(&wv.x[k]) - s1 - (cuda_ld(&xv.x[k]) - m) * r * s2);
            cuda_st(&dv.x[k], cuda_ld(&dv.x[k]) + d);
        }
        cuda_stp<W>(dx + c, dv);
    }
}

template <typename scalar_t, int W>
__global__ void norm_rmsnorm_forward_kernel(scalar_t *out, float *rstd, const scalar_t *inp, const scalar_t *weight,
                                            int N, int C, float eps, norm_rows sel) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const scalar_t *x = inp + norm_row(sel, row) * C;
    scalar_t *y = out + norm_row(sel, row) * C;
    float s = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float xk = cuda_ld(&xv.x[k]);
            s += xk * xk;
        }
    }
    const float r = 1.0f / sqrtf(cuda_warp_sum(s) / C + eps);
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + c), wv = cuda_ldp<W>(weight + c);
        cuda_pack<scalar_t, W> yv;
#pragma unroll
        for (int k = 0; k < W; k++) cuda_st(&yv.x[k], cuda_ld(&xv.x[k]) * r * cuda_ld(&wv.x[k]));
        cuda_stp<W>(y + c, yv);
    }
    if (lane == 0) rstd[row] = r;
}

/* dinp += rstd * (dnorm - norm * mean(dnorm * norm)). */
template <typename scalar_t, int W>
__global__ void norm_rmsnorm_backward_kernel(scalar_t *dinp, const scalar_t *dout, const scalar_t *inp,
                                             const scalar_t *weight, const float *rstd, int N, int C,
                                             norm_rows sel) {
    const int row = blockIdx.x * NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const int64_t at = norm_row(sel, row) * C;
    const scalar_t *x = inp + at, *g = dout + at;
    scalar_t *dx = dinp + at;
    const float r = rstd[row];
    float s = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(g + c), wv = cuda_ldp<W>(weight + c), xv = cuda_ldp<W>(x + c);
#pragma unroll
        for (int k = 0; k < W; k++) s += cuda_ld(&gv.x[k]) * cuda_ld(&wv.x[k]) * cuda_ld(&xv.x[k]) * r;
    }
    s = cuda_warp_sum(s) / C;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(g + c), wv = cuda_ldp<W>(weight + c), xv = cuda_ldp<W>(x + c);
        cuda_pack<scalar_t, W> dv = cuda_ldp<W>(dx + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float d = r * (cuda_ld(&gv.x[k]) * cuda_ld(&wv.x[k]) - cuda_ld(&xv.x[k]) * r * s);
            cuda_st(&dv.x[k], cuda_ld(&dv.x[k]) + d);
        }
        cuda_stp<W>(dx + c, dv);
    }
}

/* Partial weight (and bias) gradients of rows [part * rows_per_part, ...) for 32 * W columns:
 * block (32, 8), blockIdx.x = column chunk, blockIdx.y = row chunk ("part"). Thread (tx, ty) sums
 * rows ty, ty + 8, ... of columns c0 .. c0 + W - 1, c0 = chunk start + tx * W (coalesced: a warp reads
 * 32 W adjacent elements of a row; W > 1 only when C % W == 0 and dout, inp are 16-byte aligned), then
 * row lane 0 adds the 8 lanes in order. Each column is summed in the same order whatever W is.
 * LayerNorm: pw += dout * (x - mean) * rstd, pb += dout; RMSNorm (mean == NULL): pw += dout * x * rstd.
 * pb NULL: no bias gradient. */
template <typename scalar_t, int W>
__global__ void norm_wgrad_partial_kernel(float *pw, float *pb, const scalar_t *dout, const scalar_t *inp,
                                          const float *mean, const float *rstd, int N, int C, int rows_per_part,
                                          norm_rows sel) {
    __shared__ float sw[NORM_WG_ROWS][W][NORM_WG_COLS + 1], sb[NORM_WG_ROWS][W][NORM_WG_COLS + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, c0 = (blockIdx.x * NORM_WG_COLS + tx) * W, part = blockIdx.y;
    const int n0 = part * rows_per_part, n1 = min(N, n0 + rows_per_part);
    float aw[W], ab[W];
#pragma unroll
    for (int k = 0; k < W; k++) aw[k] = 0.0f, ab[k] = 0.0f;
    if (c0 < C) {
        for (int n = n0 + ty; n < n1; n += NORM_WG_ROWS) {
            const int64_t at = norm_row(sel, n) * C + c0;
            const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(dout + at);
            const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(inp + at);
            if (mean) {
                const float mn = mean[n], rs = rstd[n];
#pragma unroll
                for (int k = 0; k < W; k++) {
                    const float g = cuda_ld(&gv.x[k]);
                    aw[k] += g * (cuda_ld(&xv.x[k]) - mn) * rs;
                    ab[k] += g;
                }
            } else {
                const float rs = rstd[n];
#pragma unroll
                for (int k = 0; k < W; k++) aw[k] += cuda_ld(&gv.x[k]) * cuda_ld(&xv.x[k]) * rs;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < W; k++) sw[ty][k][tx] = aw[k], sb[ty][k][tx] = ab[k];
    __syncthreads(); /* reached by every thread: no early return above */
    if (ty == 0 && c0 < C) {
#pragma unroll
        for (int k = 0; k < W; k++) {
            float s = 0.0f, t = 0.0f;
            for (int j = 0; j < NORM_WG_ROWS; j++) s += sw[j][k][tx], t += sb[j][k][tx];
            pw[(int64_t)part * C + c0 + k] = s;
            if (pb) pb[(int64_t)part * C + c0 + k] = t;
        }
    }
}

/* dweight[c] (fp32) += sum over parts (in order); dbias likewise when pb is given. */
__global__ void norm_wgrad_final_kernel(float *dweight, float *dbias, const float *pw, const float *pb, int P, int C) {
    CUDA_FOR(c, C) {
        float s = 0.0f, t = 0.0f;
#pragma unroll 8
        for (int p = 0; p < P; p++) {
            s += pw[(int64_t)p * C + c];
            if (pb) t += pb[(int64_t)p * C + c];
        }
        dweight[c] += s;
        if (pb) dbias[c] += t;
    }
}

/* Column sums of the weight (and bias) gradients; returns -1 (error recorded) without scratch. */
template <typename T>
static int norm_wgrad(float *dweight, float *dbias, const T *dout, const T *inp, const float *mean, const float *rstd,
                      int N, int C, norm_rows sel, const char *op) {
    constexpr int V = CUDA_VEC(T);
    const int W = C % V == 0 && cuda_aligned16(dout, inp) ? V : 1;
    const int ncb = (C + NORM_WG_COLS * W - 1) / (NORM_WG_COLS * W);
    /* enough parts for ~4 blocks per SM, each of at least 32 rows; at most 1024 parts */
    int P = (4 * cuda_ctx.sm_count + ncb - 1) / ncb;
    const int max_p = (N + 31) / 32;
    if (P > max_p) P = max_p;
    if (P > 1024) P = 1024;
    if (P < 1) P = 1;
    const int rows_per_part = (N + P - 1) / P;
    P = (N + rows_per_part - 1) / rows_per_part; /* no empty parts */
    const size_t nbytes = sizeof(float) * (size_t)P * C * (dbias ? 2 : 1);
    float *pw = (float *)cuda_scratch(nbytes, op);
    if (!pw) return -1;
    float *pb = dbias ? pw + (size_t)P * C : NULL;
    void (*const k)(float *, float *, const T *, const T *, const float *, const float *, int, int, int, norm_rows) =
        W > 1 ? norm_wgrad_partial_kernel<T, V> : norm_wgrad_partial_kernel<T, 1>;
    CUDA_LAUNCH(k, dim3(ncb, P), dim3(NORM_WG_COLS, NORM_WG_ROWS), 0)(pw, pb, dout, inp, mean, rstd, N, C,
                                                                      rows_per_part, sel);
    CUDA_LAUNCH(norm_wgrad_final_kernel, cuda_blocks(C, CUDA_THREADS), CUDA_THREADS, 0)(dweight, dbias, pw, pb, P, C);
    cuda_check(op);
    cuda_release(pw, nbytes);
    return 0;
}

static unsigned norm_row_blocks(int N) { return (unsigned)((N + NORM_ROWS_PER_BLOCK - 1) / NORM_ROWS_PER_BLOCK); }

/* The row kernels' pack width: CUDA_VEC(T) when C is a whole number of packs and every pointer is
 * 16-byte aligned (row starts are then aligned too), else 1. */
template <typename T, typename... P>
static bool norm_vec(int C, P... ptrs) {
    return C % CUDA_VEC(T) == 0 && cuda_aligned16(ptrs...);
}

/* The row ops on a selection of N rows of C values; op names the op in errors. */
template <typename T>
static void norm_layernorm_forward_rows(void *out, float *mean, float *rstd, const void *inp, const void *weight,
                                        const void *bias, int N, int C, float eps, norm_rows sel, const char *op) {
    if (N <= 0 || C <= 0) return;
    void (*const k)(T *, float *, float *, const T *, const T *, const T *, int, int, float, norm_rows) =
        norm_vec<T>(C, out, inp, weight, bias) ? norm_layernorm_forward_kernel<T, CUDA_VEC(T)>
                                               : norm_layernorm_forward_kernel<T, 1>;
    CUDA_LAUNCH(k, norm_row_blocks(N), 32 * NORM_ROWS_PER_BLOCK, 0)(
        (T *)out, mean, rstd, (const T *)inp, (const T *)weight, (const T *)bias, N, C, eps, sel);
    cuda_check(op);
}

template <typename T>
static void norm_layernorm_backward_rows(void *dinp, float *dweight, float *dbias, const void *dout, const void *inp,
                                         const void *weight, const float *mean, const float *rstd, int N, int C,
                                         norm_rows sel, const char *op) {
    if (N <= 0 || C <= 0) return;
    void (*const k)(T *, const T *, const T *, const T *, const float *, const float *, int, int, norm_rows) =
        norm_vec<T>(C, dinp, dout, inp, weight) ? norm_layernorm_backward_kernel<T, CUDA_VEC(T)>
                                                : norm_layernorm_backward_kernel<T, 1>;
    CUDA_LAUNCH(k, norm_row_blocks(N), 32 * NORM_ROWS_PER_BLOCK, 0)(
        (T *)dinp, (const T *)dout, (const T *)inp, (const T *)weight, mean, rstd, N, C, sel);
    cuda_check(op);
    norm_wgrad(dweight, dbias, (const T *)dout, (const T *)inp, mean, rstd, N, C, sel, op);
}

template <typename T>
static void norm_rmsnorm_forward_rows(void *out, float *rstd, const void *inp, const void *weight, int N, int C,
                                      float eps, norm_rows sel, const char *op) {
    if (N <= 0 || C <= 0) return;
    void (*const k)(T *, float *, const T *, const T *, int, int, float, norm_rows) =
        norm_vec<T>(C, out, inp, weight) ? norm_rmsnorm_forward_kernel<T, CUDA_VEC(T)>
                                         : norm_rmsnorm_forward_kernel<T, 1>;
    CUDA_LAUNCH(k, norm_row_blocks(N), 32 * NORM_ROWS_PER_BLOCK, 0)((T *)out, rstd, (const T *)inp,
                                                                   (const T *)weight, N, C, eps, sel);
    cuda_check(op);
}

template <typename T>
static void norm_rmsnorm_backward_rows(void *dinp, float *dweight, const void *dout, const void *inp,
                                       const void *weight, const float *rstd, int N, int C, norm_rows sel,
                                       const char *op) {
    if (N <= 0 || C <= 0) return;
    void (*const k)(T *, const T *, const T *, const T *, const float *, int, int, norm_rows) =
        norm_vec<T>(C, dinp, dout, inp, weight) ? norm_rmsnorm_backward_kernel<T, CUDA_VEC(T)>
                                                : norm_rmsnorm_backward_kernel<T, 1>;
    CUDA_LAUNCH(k, norm_row_blocks(N), 32 * NORM_ROWS_PER_BLOCK, 0)((T *)dinp, (const T *)dout, (const T *)inp,
                                                                   (const T *)weight, rstd, N, C, sel);
    cuda_check(op);
    norm_wgrad(dweight, (float *)NULL, (const T *)dout, (const T *)inp, (const float *)NULL, rstd, N, C, sel, op);
}

template <typename T>
static void norm_layernorm_forward(void *out, float *mean, float *rstd, const void *inp, const void *weight,
                                   const void *bias, int N, int C, float eps) {
    norm_layernorm_forward_rows<T>(out, mean, rstd, inp, weight, bias, N, C, eps, NORM_ALL_ROWS, "layernorm_forward");
}

template <typename T>
static void norm_layernorm_backward(void *dinp, float *dweight, float *dbias, const void *dout, const void *inp,
                                    const void *weight, const float *mean, const float *rstd, int N, int C) {
    norm_layernorm_backward_rows<T>(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, NORM_ALL_ROWS,
                                    "layernorm_backward");
}

template <typename T>
static void norm_rmsnorm_forward(void *out, float *rstd, const void *inp, const void *weight, int N, int C,
                                 float eps) {
    norm_rmsnorm_forward_rows<T>(out, rstd, inp, weight, N, C, eps, NORM_ALL_ROWS, "rmsnorm_forward");
}

template <typename T>
static void norm_rmsnorm_backward(void *dinp, float *dweight, const void *dout, const void *inp, const void *weight,
                                  const float *rstd, int N, int C) {
    norm_rmsnorm_backward_rows<T>(dinp, dweight, dout, inp, weight, rstd, N, C, NORM_ALL_ROWS, "rmsnorm_backward");
}

/* ---- per-head norms of a fused qkv buffer [N, G, H/G + 2, D] ---- */

/* dst = src on the value heads, 0 on the query and key heads (which the norms then fill). */
template <typename T>
__global__ void norm_qk_value_heads_kernel(T *dst, const T *src, int64_t n, int D, int slots) {
    CUDA_FOR(i, n) {
        if ((i / D) % slots == slots - 1) dst[i] = src[i];
        else cuda_st(&dst[i], 0.0f);
    }
}

template <typename T>
static void norm_qk_value_heads(void *dst, const void *src, int N, int H, int G, int D, const char *op) {
    const int64_t n = (int64_t)N * (H + 2 * G) * D;
    CUDA_LAUNCH(norm_qk_value_heads_kernel<T>, cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)(
        (T *)dst, (const T *)src, n, D, H / G + 2);
    cuda_check(op);
}

template <typename T>
static void norm_qk_forward(void *out, float *mean, float *rstd, const void *inp, const void *qw, const void *qb,
                            const void *kw, const void *kb, int N, int H, int G, int D, float eps) {
    if (N <= 0 || D <= 0) return;
    const int hpg = H / G;
    const norm_rows q = {hpg + 2, 0, hpg}, k = {hpg + 2, hpg, 1};
    const int64_t NH = (int64_t)N * H;
    const char *op = "qk_norm_forward";
    norm_qk_value_heads<T>(out, inp, N, H, G, D, op);
    if (mean) {
        norm_layernorm_forward_rows<T>(out, mean, rstd, inp, qw, qb, N * H, D, eps, q, op);
        norm_layernorm_forward_rows<T>(out, mean + NH, rstd + NH, inp, kw, kb, N * G, D, eps, k, op);
    } else {
        norm_rmsnorm_forward_rows<T>(out, rstd, inp, qw, N * H, D, eps, q, op);
        norm_rmsnorm_forward_rows<T>(out, rstd + NH, inp, kw, N * G, D, eps, k, op);
    }
}

template <typename T>
static void norm_qk_backward(void *dinp, float *dqw, float *dqb, float *dkw, float *dkb, const void *dout,
                             const void *inp, const void *qw, const void *kw, const float *mean, const float *rstd,
                             int N, int H, int G, int D) {
    if (N <= 0 || D <= 0) return;
    const int hpg = H / G;
    const norm_rows q = {hpg + 2, 0, hpg}, k = {hpg + 2, hpg, 1};
    const int64_t NH = (int64_t)N * H;
    const char *op = "qk_norm_backward";
    norm_qk_value_heads<T>(dinp, dout, N, H, G, D, op); /* the norms' dinp accumulate onto the zeros */
    if (mean) {
        norm_layernorm_backward_rows<T>(dinp, dqw, dqb, dout, inp, qw, mean, rstd, N * H, D, q, op);
        norm_layernorm_backward_rows<T>(dinp, dkw, dkb, dout, inp, kw, mean + NH, rstd + NH, N * G, D, k, op);
    } else {
        norm_rmsnorm_backward_rows<T>(dinp, dqw, dout, inp, qw, rstd, N * H, D, q, op);
        norm_rmsnorm_backward_rows<T>(dinp, dkw, dout, inp, kw, rstd + NH, N * G, D, k, op);
    }
}

void cuda_norm_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, layernorm_forward, norm_layernorm_forward);
    CUDA_SET_OP(f32, bf16, layernorm_backward, norm_layernorm_backward);
    CUDA_SET_OP(f32, bf16, rmsnorm_forward, norm_rmsnorm_forward);
    CUDA_SET_OP(f32, bf16, rmsnorm_backward, norm_rmsnorm_backward);
    CUDA_SET_OP(f32, bf16, qk_norm_forward, norm_qk_forward);
    CUDA_SET_OP(f32, bf16, qk_norm_backward, norm_qk_backward);
}

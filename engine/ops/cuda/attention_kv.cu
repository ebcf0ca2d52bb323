// Block attention with global positions, the pieces of ring attention (context parallelism): ops.h's
// lt_attention_kv_forward, lt_attention_merge, lt_attention_kv_backward (engine/ops/cpu/attention_kv.c is
// the reference). Queries from the fused qkv[B, Tq, G, H/G + 2, D], keys and values from kv[B, Tk, G, 2, D];
// element (i, j) takes part iff k_pos[j] <= q_pos[i]; the dropout mask is drawn at the global index
// ((b*heads_total + head_offset + h)*S + q_pos[i])*S + k_pos[j], so a ring's blocks draw the elements the
// whole sequence's attention draws.
//
// Plain CUDA-core kernels, fp32 math on float or bf16 storage, for both tables: the bf16 table does NOT
// use tensor cores for these ops (attention_tc.cu's kernels assume the causal T x T layout); correctness
// first. One warp per row: forward and dQ per query row (b, h, i), lanes over 32 keys at a time with the
// query row in shared memory, online softmax in forward; dK/dV per key row (b, g, j), lanes over 32 query
// rows at a time, summing the group's heads in order. Each output row has one writer: no atomics,
// deterministic. Output dims per lane: d = lane + 32 k, k < DV = ceil(D / 32).
#include <math.h>

#include "engine/ops/cuda/attention_common.cuh"
#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"

#define AKV_WARPS 8
#define AKV_THREADS (32 * AKV_WARPS)
#define AKV_FULL 0xffffffffu

/* Element offsets: head h's query in row (b, i) of qkv, group g's key in row (b, j) of kv (value at + D). */
static __device__ __forceinline__ int64_t akv_q(int b, int i, int h, int Tq, int H, int G, int D) {
    return ((int64_t)b * Tq + i) * att_row_pitch(H, G, D) + att_q_col(h, H / G, D);
}
static __device__ __forceinline__ int64_t akv_k(int b, int j, int g, int Tk, int G, int D) {
    return ((int64_t)b * Tk + j) * 2 * G * D + (int64_t)g * 2 * D;
}
/* The dropout factor of (b, h, qp, kp) at global positions: 0 or 1/(1-p) (1 without dropout). */
static __device__ __forceinline__ float akv_keep(uint64_t key, int64_t mh, int S, int qp, int kp, float p,
                                                 float inv_keep) {
    if (p <= 0.0f) return 1.0f;
    const uint64_t idx = ((uint64_t)mh * (uint64_t)S + (uint64_t)qp) * (uint64_t)S + (uint64_t)kp;
    return cuda_uniform(key, idx) < p ? 0.0f : inv_keep;
}
/* scale * q . k_j from the warp's query row in shared memory (q already scaled there). */
template <typename scalar_t>
static __device__ __forceinline__ float akv_dot(const float *qs, const scalar_t *k, int D) {
    float s = 0.0f;
    for (int d = 0; d < D; d++) s += qs[d] * cuda_ld(k + d);
    return s;
}

/* ---------------- forward: one warp per (b, h, i) ---------------- */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(AKV_THREADS)
    akv_forward_kernel(scalar_t *out, float *lse, const scalar_t *qkv, const scalar_t *kv, int B, int Tq, int Tk,
                       int H, int G, int D, const int32_t *q_pos, const int32_t *k_pos, int S, float scale, float p,
                       float inv_keep, uint64_t key, int h0, int HT) {
    CUDA_DYNAMIC_SMEM(float, akv_smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = akv_smem + warp * D;
    const int64_t row = (int64_t)blockIdx.x * AKV_WARPS + warp; /* (b, h, i), i fastest */
    const bool live = row < (int64_t)B * H * Tq;                /* warp-uniform */
    const int i = (int)(row % Tq), bh = (int)(row / Tq), b = bh / H, h = bh % H, g = h / (H / G);
    if (live)
        for (int d = lane; d < D; d += 32) qs[d] = scale * cuda_ld(qkv + akv_q(b, i, h, Tq, H, G, D) + d);
    __syncwarp();
    if (!live) return;
    const int qp = q_pos[i];
    const int64_t mh = (int64_t)b * HT + h0 + h;
    float m = -INFINITY, l = 0.0f, o[DV];
#pragma unroll
    for (int k = 0; k < DV; k++) o[k] = 0.0f;
    for (int j0 = 0; j0 < Tk; j0 += 32) {
        const int j = j0 + lane;
        const bool valid = j < Tk && k_pos[j] <= qp;
        const float s = valid ? akv_dot(qs, kv + akv_k(b, j, g, Tk, G, D), D) : -INFINITY;
        const float m_new = fmaxf(m, cuda_warp_max(s));
        if (m_new == -INFINITY) continue; /* nothing visible yet: warp-uniform */
        const float e = valid ? expf(s - m_new) : 0.0f;
        const float alpha = expf(m - m_new); /* 0 while m = -inf */
        l = l * alpha + cuda_warp_sum(e);
        m = m_new;
        const float pe = valid ? e * akv_keep(key, mh, S, qp, k_pos[j], p, inv_keep) : 0.0f;
#pragma unroll
        for (int k = 0; k < DV; k++) o[k] *= alpha;
        const int jn = min(32, Tk - j0);
        for (int jj = 0; jj < jn; jj++) {
            const float pj = __shfl_sync(AKV_FULL, pe, jj);
            if (pj == 0.0f) continue; /* the same pj in every lane: uniform */
            const scalar_t *v = kv + akv_k(b, j0 + jj, g, Tk, G, D) + D;
#pragma unroll
            for (int k = 0; k < DV; k++) {
                const int d = lane + 32 * k;
                if (d < D) o[k] += pj * cuda_ld(v + d);
            }
        }
    }
    const bool none = m == -INFINITY; /* no key of this block visible: lse -inf, out 0 */
    if (lane == 0) lse[(int64_t)bh * Tq + i] = none ? -INFINITY : m + logf(l);
    scalar_t *op = out + (((int64_t)b * Tq + i) * H + h) * D;
    const float inv = none ? 0.0f : 1.0f / l;
#pragma unroll
    for (int k = 0; k < DV; k++) {
        const int d = lane + 32 * k;
        if (d < D) cuda_st(op + d, o[k] * inv);
    }
}

/* ---------------- merge: one warp per (b, t, h) ---------------- */
template <typename scalar_t>
__global__ void akv_merge_kernel(scalar_t *out, float *lse, const scalar_t *out_b, const float *lse_b, int B, int T,
                                 int H, int D) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int64_t row = (int64_t)blockIdx.x * AKV_WARPS + warp; row < (int64_t)B * T * H;
         row += (int64_t)gridDim.x * AKV_WARPS) {
        const int64_t h = row % H, bt = row / H, t = bt % T, b = bt / T, li = (b * H + h) * T + t;
        const float la = lse[li], lb = lse_b[li];
        if (lb == -INFINITY) continue; /* the block saw nothing */
        scalar_t *o = out + row * D;
        const scalar_t *ob = out_b + row * D;
        float w = 0.0f, wb = 1.0f, ln = lb; /* nothing so far: take the block's */
        if (la != -INFINITY) {
            const float mx = fmaxf(la, lb), mn = fminf(la, lb);
            ln = mx + log1pf(expf(mn - mx));
            w = expf(la - ln), wb = expf(lb - ln);
        }
        for (int d = lane; d < D; d += 32) cuda_st(o + d, (la != -INFINITY ? cuda_ld(o + d) * w : 0.0f) + cuda_ld(ob + d) * wb);
        __syncwarp(); /* every lane has read lse[li] before it changes */
        if (lane == 0) lse[li] = ln;
    }
}

/* ---------------- backward ---------------- */

/* delta[b, h, i] = dout[b, i, h, :] . out[b, i, h, :]: one warp per row. */
template <typename scalar_t>
__global__ void akv_delta_kernel(float *delta, const scalar_t *dout, const scalar_t *out, int64_t rows, int Tq, int H,
                                 int D) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int64_t row = (int64_t)blockIdx.x * AKV_WARPS + warp; row < rows; row += (int64_t)gridDim.x * AKV_WARPS) {
        float s = 0.0f;
        for (int d = lane; d < D; d += 32) s += cuda_ld(dout + row * D + d) * cuda_ld(out + row * D + d);
        s = cuda_warp_sum(s);
        const int64_t h = row % H, bt = row / H, t = bt % Tq, b = bt / Tq;
        if (lane == 0) delta[(b * H + h) * Tq + t] = s;
    }
}

/* dQ of one query row (b, h, i), ACCUMULATED: dq += scale * sum_j P (dP f - delta) k_j. */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(AKV_THREADS)
    akv_dq_kernel(scalar_t *dq, const scalar_t *dout, const scalar_t *qkv, const scalar_t *kv, const float *lse,
                  const float *delta, int B, int Tq, int Tk, int H, int G, int D, const int32_t *q_pos,
                  const int32_t *k_pos, int S, float scale, float p, float inv_keep, uint64_t key, int h0, int HT) {
    CUDA_DYNAMIC_SMEM(float, akv_smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = akv_smem + 2 * warp * D, *gs = qs + D; /* scaled query row, dout row */
    const int64_t row = (int64_t)blockIdx.x * AKV_WARPS + warp;
    const bool live = row < (int64_t)B * H * Tq;
    const int i = (int)(row % Tq), bh = (int)(row / Tq), b = bh / H, h = bh % H, g = h / (H / G);
    if (live)
        for (int d = lane; d < D; d += 32) {
            qs[d] = scale * cuda_ld(qkv + akv_q(b, i, h, Tq, H, G, D) + d);
            gs[d] = cuda_ld(dout + (((int64_t)b * Tq + i) * H + h) * D + d);
        }
    __syncwarp();
    if (!live) return;
    const float l = lse[(int64_t)bh * Tq + i], di = delta[(int64_t)bh * Tq + i];
    if (l == -INFINITY) return; /* the row sees no key anywhere: no gradient (dq stays as it is) */
    const int qp = q_pos[i];
    const int64_t mh = (int64_t)b * HT + h0 + h;
    float acc[DV];
#pragma unroll
    for (int k = 0; k < DV; k++) acc[k] = 0.0f;
    for (int j0 = 0; j0 < Tk; j0 += 32) {
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j < Tk && k_pos[j] <= qp) {
            const scalar_t *k = kv + akv_k(b, j, g, Tk, G, D), *v = k + D;
            const float pr = expf(akv_dot(qs, k, D) - l);
            const float dp = akv_dot(gs, v, D), f = akv_keep(key, mh, S, qp, k_pos[j], p, inv_keep);
            ds = pr * (dp * f - di);
        }
        const int jn = min(32, Tk - j0);
        for (int jj = 0; jj < jn; jj++) {
            const float dsj = __shfl_sync(AKV_FULL, ds, jj);
            if (dsj == 0.0f) continue;
            const scalar_t *k = kv + akv_k(b, j0 + jj, g, Tk, G, D);
#pragma unroll
            for (int kk = 0; kk < DV; kk++) {
                const int d = lane + 32 * kk;
                if (d < D) acc[kk] += dsj * cuda_ld(k + d);
            }
        }
    }
    scalar_t *dqp = dq + akv_q(b, i, h, Tq, H, G, D);
#pragma unroll
    for (int k = 0; k < DV; k++) {
        const int d = lane + 32 * k;
        if (d < D) cuda_st(dqp + d, cuda_ld(dqp + d) + scale * acc[k]);
    }
}

/* dK, dV of one key row (b, g, j), WRITTEN: over the group's heads in order and every query row i,
 * dv_j = sum P f dout_i, dk_j = sum P (dP f - delta_i) scale q_i. Lanes are query rows. */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(AKV_THREADS)
    akv_dkv_kernel(scalar_t *dkv, const scalar_t *dout, const scalar_t *qkv, const scalar_t *kv, const float *lse,
                   const float *delta, int B, int Tq, int Tk, int H, int G, int D, const int32_t *q_pos,
                   const int32_t *k_pos, int S, float scale, float p, float inv_keep, uint64_t key, int h0, int HT) {
    CUDA_DYNAMIC_SMEM(float, akv_smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *ks = akv_smem + 2 * warp * D, *vs = ks + D; /* the key row (scaled), the value row */
    const int64_t row = (int64_t)blockIdx.x * AKV_WARPS + warp; /* (b, g, j), j fastest */
    const bool live = row < (int64_t)B * G * Tk;
    const int j = (int)(row % Tk), bg = (int)(row / Tk), b = bg / G, g = bg % G, hpg = H / G;
    const int64_t ko = akv_k(b, j, g, Tk, G, D);
    if (live)
        for (int d = lane; d < D; d += 32) ks[d] = scale * cuda_ld(kv + ko + d), vs[d] = cuda_ld(kv + ko + D + d);
    __syncwarp();
    if (!live) return;
    const int kp = k_pos[j];
    float dk[DV], dv[DV];
#pragma unroll
    for (int k = 0; k < DV; k++) dk[k] = 0.0f, dv[k] = 0.0f;
    for (int hh = 0; hh < hpg; hh++) {
        const int h = g * hpg + hh;
        const int64_t bh = (int64_t)b * H + h, mh = (int64_t)b * HT + h0 + h;
        for (int i0 = 0; i0 < Tq; i0 += 32) {
            const int i = i0 + lane;
            float pd = 0.0f, ds = 0.0f;
            if (i < Tq && kp <= q_pos[i] && lse[bh * Tq + i] != -INFINITY) {
                const scalar_t *q = qkv + akv_q(b, i, h, Tq, H, G, D);
                const scalar_t *go = dout + (((int64_t)b * Tq + i) * H + h) * D;
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < D; d++) s += cuda_ld(q + d) * ks[d], dp += cuda_ld(go + d) * vs[d];
                const float pr = expf(s - lse[bh * Tq + i]);
                const float f = akv_keep(key, mh, S, q_pos[i], kp, p, inv_keep);
                pd = pr * f, ds = pr * (dp * f - delta[bh * Tq + i]);
            }
            const int in = min(32, Tq - i0);
            for (int ii = 0; ii < in; ii++) {
                const float pdi = __shfl_sync(AKV_FULL, pd, ii), dsi = __shfl_sync(AKV_FULL, ds, ii);
                if (pdi == 0.0f && dsi == 0.0f) continue;
                const scalar_t *q = qkv + akv_q(b, i0 + ii, h, Tq, H, G, D);
                const scalar_t *go = dout + (((int64_t)b * Tq + i0 + ii) * H + h) * D;
#pragma unroll
                for (int k = 0; k < DV; k++) {
                    const int d = lane + 32 * k;
                    if (d < D) dv[k] += pdi * cuda_ld(go + d), dk[k] += dsi * cuda_ld(q + d);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < DV; k++) {
        const int d = lane + 32 * k;
        if (d < D) cuda_st(dkv + ko + d, scale * dk[k]), cuda_st(dkv + ko + D + d, dv[k]);
    }
}

/* ---------------- host side ---------------- */

static bool akv_shape_ok(int B, int Tq, int Tk, int H, int G, int D, int S, float p, const char *op) {
    if (H <= 0 || G <= 0 || H % G != 0 || D < 1 || D > ATT_MAX_D || !(p >= 0.0f && p < 1.0f) || Tq < 0 || Tk < 0 ||
        B < 0 || S <= 0) {
        cuda_record(op, "unsupported shape B=%d Tq=%d Tk=%d H=%d G=%d D=%d S=%d dropout %g (H a multiple of G, "
                        "1 <= D <= %d, 0 <= p < 1)", B, Tq, Tk, H, G, D, S, (double)p, ATT_MAX_D);
        return false;
    }
    return true;
}
static unsigned akv_grid(int64_t rows) { return (unsigned)((rows + AKV_WARPS - 1) / AKV_WARPS); }

template <typename T, int DV>
static void akv_forward_launch(T *out, float *lse, const T *qkv, const T *kv, int B, int Tq, int Tk, int H, int G,
                               int D, const int32_t *qp, const int32_t *kp, int S, float p, uint64_t key, int h0,
                               int HT) {
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    CUDA_LAUNCH((akv_forward_kernel<T, DV>), akv_grid((int64_t)B * H * Tq), AKV_THREADS,
                sizeof(float) * AKV_WARPS * D)(out, lse, qkv, kv, B, Tq, Tk, H, G, D, qp, kp, S, scale, p, inv_keep,
                                               key, h0, HT);
}

template <typename T>
static void akv_attention_kv_forward(void *out, float *lse, const void *qkv, const void *kv, int B, int Tq, int Tk,
                                     int H, int G, int D, const int32_t *qp, const int32_t *kp, int S, float p,
                                     uint64_t key, int h0, int HT) {
    const char *op = "attention_kv_forward";
    if (!akv_shape_ok(B, Tq, Tk, H, G, D, S, p, op) || B == 0 || Tq == 0) return;
    T *o = (T *)out;
    const T *q = (const T *)qkv, *k = (const T *)kv;
    switch ((D + 31) / 32) {
    case 1: akv_forward_launch<T, 1>(o, lse, q, k, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    case 2: akv_forward_launch<T, 2>(o, lse, q, k, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    case 3: akv_forward_launch<T, 3>(o, lse, q, k, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    default: akv_forward_launch<T, 4>(o, lse, q, k, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    }
    cuda_check(op);
}

template <typename T>
static void akv_attention_merge(void *out, float *lse, const void *out_b, const float *lse_b, int B, int T_, int H,
                                int D) {
    const int64_t rows = (int64_t)B * T_ * H;
    if (rows <= 0 || D <= 0) return;
    CUDA_LAUNCH(akv_merge_kernel<T>, cuda_blocks(rows, AKV_WARPS), AKV_THREADS, 0)((T *)out, lse, (const T *)out_b,
                                                                                  lse_b, B, T_, H, D);
    cuda_check("attention_merge");
}

template <typename T, int DV>
static void akv_backward_launch(T *dq, T *dkv, const T *dout, const T *qkv, const T *kv, const float *lse,
                                const float *delta, int B, int Tq, int Tk, int H, int G, int D, const int32_t *qp,
                                const int32_t *kp, int S, float p, uint64_t key, int h0, int HT) {
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const size_t smem = sizeof(float) * 2 * AKV_WARPS * D;
    if (Tq > 0)
        CUDA_LAUNCH((akv_dq_kernel<T, DV>), akv_grid((int64_t)B * H * Tq), AKV_THREADS, smem)(
            dq, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, scale, p, inv_keep, key, h0, HT);
    CUDA_LAUNCH((akv_dkv_kernel<T, DV>), akv_grid((int64_t)B * G * Tk), AKV_THREADS, smem)(
        dkv, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, scale, p, inv_keep, key, h0, HT);
}

template <typename T>
static void akv_attention_kv_backward(void *dq_, void *dkv_, const void *dout_, const void *qkv_, const void *kv_,
                                      const void *out_, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                                      const int32_t *qp, const int32_t *kp, int S, float p, uint64_t key, int h0,
                                      int HT) {
    const char *op = "attention_kv_backward";
    if (!akv_shape_ok(B, Tq, Tk, H, G, D, S, p, op) || B == 0 || Tk == 0) return;
    T *dq = (T *)dq_, *dkv = (T *)dkv_;
    const T *dout = (const T *)dout_, *qkv = (const T *)qkv_, *kv = (const T *)kv_, *out = (const T *)out_;
    const int64_t rows = (int64_t)B * Tq * H;
    float *delta = (float *)cuda_scratch(sizeof(float) * (size_t)(rows > 0 ? rows : 1), op);
    if (!delta) return;
    if (rows > 0)
        CUDA_LAUNCH(akv_delta_kernel<T>, cuda_blocks(rows, AKV_WARPS), AKV_THREADS, 0)(delta, dout, out, rows, Tq, H,
                                                                                      D);
    switch ((D + 31) / 32) {
    case 1: akv_backward_launch<T, 1>(dq, dkv, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    case 2: akv_backward_launch<T, 2>(dq, dkv, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    case 3: akv_backward_launch<T, 3>(dq, dkv, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    default: akv_backward_launch<T, 4>(dq, dkv, dout, qkv, kv, lse, delta, B, Tq, Tk, H, G, D, qp, kp, S, p, key, h0, HT); break;
    }
    cuda_check(op);
    cuda_release(delta, sizeof(float) * (size_t)(rows > 0 ? rows : 1));
}

void cuda_attention_kv_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, attention_kv_forward, akv_attention_kv_forward);
    CUDA_SET_OP(f32, bf16, attention_merge, akv_attention_merge);
    CUDA_SET_OP(f32, bf16, attention_kv_backward, akv_attention_kv_backward);
}

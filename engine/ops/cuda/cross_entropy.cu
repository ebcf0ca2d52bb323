// Fused softmax cross-entropy over logits[N, V]: one block per row. Forward: an online max / sum of
// exponentials per thread (one pass over V), combined across the block; saves lse[N] and the losses.
// Backward writes dlogits = (softmax - onehot) * dloss element by element, so dlogits may be logits.
// Logits are float or bf16 (read as fp32, dlogits rounded once); lse and losses are fp32. Rows are read
// (and dlogits written) as 16-byte packs between an unaligned head and tail, whatever V and the row's
// alignment; the backward falls back to one element at a time when dlogits and logits are not
// equally aligned.
#include <math.h>

#include "engine/ops/cuda/internal.cuh"

#define CE_THREADS 512

/* (m, s) stands for s * exp(m); the sum of two such, with -inf meaning "nothing yet". */
static __device__ __forceinline__ void ce_combine(float &m, float &s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return; /* both empty: -inf - -inf would be NaN */
    s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
    m = mm;
}

/* The row [0, V) as a head (the elements before the row's first 16-byte boundary), whole 16-byte packs
 * of W elements, and a tail: element v of the head or the tail, pack j at head + j W. */
template <typename scalar_t>
static __device__ __forceinline__ void ce_split(const scalar_t *row, int V, int &head, int &npack) {
    constexpr int W = CUDA_VEC(scalar_t);
    head = (int)(((16u - ((unsigned)(uintptr_t)row & 15u)) & 15u) / sizeof(scalar_t));
    if (head > V) head = V;
    npack = (V - head) / W;
}

/* One logit into the thread's online (max, sum of exponentials). */
static __device__ __forceinline__ void ce_visit(float &m, float &s, float xv) {
    if (xv > m) {
        s = s * expf(m - xv) + 1.0f; /* m = -inf at first: exp(-inf) = 0 */
        m = xv;
    } else if (xv > -INFINITY) {
        s += expf(xv - m);
    }
}

/* VEC: the row is read as head, 16-byte packs and tail (any row alignment: logits are at least
 * element-aligned); else one element per thread and step. */
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(CE_THREADS)
    ce_forward_kernel(float *losses, float *lse, const scalar_t *logits, const int32_t *targets, int V) {
    __shared__ float sm[32], ss[32];
    const int64_t n = blockIdx.x;
    const scalar_t *x = logits + n * V;
    float m = -INFINITY, s = 0.0f;
    if constexpr (VEC) {
        constexpr int W = CUDA_VEC(scalar_t);
        int head, npack;
        ce_split(x, V, head, npack);
        for (int v = threadIdx.x; v < head; v += blockDim.x) ce_visit(m, s, cuda_ld(x + v));
        for (int j = threadIdx.x; j < npack; j += blockDim.x) {
            const cuda_pack<scalar_t, W> xv = cuda_ldp<W>(x + head + j * W);
#pragma unroll
            for (int k = 0; k < W; k++) ce_visit(m, s, cuda_ld(&xv.x[k]));
        }
        for (int v = head + npack * W + threadIdx.x; v < V; v += blockDim.x) ce_visit(m, s, cuda_ld(x + v));
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) ce_visit(m, s, cuda_ld(x + v));
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ce_combine(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) sm[warp] = m, ss[warp] = s;
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm[lane] : -INFINITY;
        s = lane < nwarps ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            ce_combine(m, s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            lse[n] = l;
            const int32_t t = targets[n];
            losses[n] = t >= 0 && t < V ? l - cuda_ld(x + t) : 0.0f;
        }
    }
}

/* dlogits[v] = (softmax - onehot) * dloss, or 0 for an ignored row (t < 0, logits not read). */
template <typename scalar_t>
static __device__ __forceinline__ float ce_grad(const scalar_t *xp, int v, int32_t t, float l, float g) {
    if (t < 0) return 0.0f;
    float d = expf(cuda_ld(xp) - l) * g;
    if (v == t) d -= g;
    return d;
}

/* VEC: head, packs and tail as in the forward; dlogits and logits then have the same alignment (checked
 * on the host), so their rows split alike. Each element is read then written by the same thread:
 * dlogits may alias logits. */
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(CE_THREADS)
    ce_backward_kernel(scalar_t *dlogits, const scalar_t *logits, const float *lse, const int32_t *targets,
                       const float *dloss, int V) {
    const int64_t n = blockIdx.x;
    const scalar_t *x = logits + n * V;
    scalar_t *dx = dlogits + n * V;
    const int32_t t = targets[n];
    const float l = t < 0 ? 0.0f : lse[n], g = t < 0 ? 0.0f : dloss[n];
    if constexpr (VEC) {
        constexpr int W = CUDA_VEC(scalar_t);
        int head, npack;
        ce_split(x, V, head, npack);
        for (int v = threadIdx.x; v < head; v += blockDim.x) cuda_st(dx + v, ce_grad(x + v, v, t, l, g));
        for (int j = threadIdx.x; j < npack; j += blockDim.x) {
            const int v0 = head + j * W;
            cuda_pack<scalar_t, W> xv{}, dv;
            if (t >= 0) xv = cuda_ldp<W>(x + v0);
#pragma unroll
            for (int k = 0; k < W; k++) cuda_st(&dv.x[k], ce_grad(&xv.x[k], v0 + k, t, l, g));
            cuda_stp<W>(dx + v0, dv);
        }
        for (int v = head + npack * W + threadIdx.x; v < V; v += blockDim.x)
            cuda_st(dx + v, ce_grad(x + v, v, t, l, g));
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) cuda_st(dx + v, ce_grad(x + v, v, t, l, g));
    }
}

template <typename T>
static void ce_cross_entropy_forward(float *losses, float *lse, const void *logits, const int32_t *targets, int N,
                                     int V) {
    if (N <= 0 || V <= 0) return;
    CUDA_LAUNCH((ce_forward_kernel<T, true>), N, CE_THREADS, 0)(losses, lse, (const T *)logits, targets, V);
    cuda_check("cross_entropy_forward");
}

template <typename T>
static void ce_cross_entropy_backward(void *dlogits, const void *logits, const float *lse, const int32_t *targets,
                                      const float *dloss, int N, int V) {
    if (N <= 0 || V <= 0) return;
    /* the packed path needs both rows to reach a 16-byte boundary at the same element */
    if ((((uintptr_t)dlogits - (uintptr_t)logits) & 15u) == 0)
        CUDA_LAUNCH((ce_backward_kernel<T, true>), N, CE_THREADS, 0)((T *)dlogits, (const T *)logits, lse, targets,
                                                                     dloss, V);
    else
        CUDA_LAUNCH((ce_backward_kernel<T, false>), N, CE_THREADS, 0)((T *)dlogits, (const T *)logits, lse, targets,
                                                                      dloss, V);
    cuda_check("cross_entropy_backward");
}

void cuda_cross_entropy_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, cross_entropy_forward, ce_cross_entropy_forward);
    CUDA_SET_OP(f32, bf16, cross_entropy_backward, ce_cross_entropy_backward);
}

// Fused softmax cross-entropy over logits[N, V]: one block per row. Forward: an online max / sum of
// exponentials per thread (one pass over V), combined across the block; saves lse[N] and the losses.
// Backward writes dlogits = (softmax - onehot) * dloss element by element, so dlogits may be logits.
// Logits are float or bf16 (read as fp32, dlogits rounded once); lse and losses are fp32.
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

template <typename scalar_t>
__global__ void __launch_bounds__(CE_THREADS)
    ce_forward_kernel(float *losses, float *lse, const scalar_t *logits, const int32_t *targets, int V) {
    __shared__ float sm[32], ss[32];
    const int64_t n = blockIdx.x;
    const scalar_t *x = logits + n * V;
    float m = -INFINITY, s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float xv = cuda_ld(x + v);
        if (xv > m) {
            s = s * expf(m - xv) + 1.0f; /* m = -inf at first: exp(-inf) = 0 */
            m = xv;
        } else if (xv > -INFINITY) {
            s += expf(xv - m);
        }
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
            losses[n] = t >= 0 ? l - cuda_ld(x + t) : 0.0f;
        }
    }
}

template <typename scalar_t>
__global__ void __launch_bounds__(CE_THREADS)
    ce_backward_kernel(scalar_t *dlogits, const scalar_t *logits, const float *lse, const int32_t *targets,
                       const float *dloss, int V) {
    const int64_t n = blockIdx.x;
    const scalar_t *x = logits + n * V;
    scalar_t *dx = dlogits + n * V;
    const int32_t t = targets[n];
    if (t < 0) { /* ignored row: zero gradient */
        for (int v = threadIdx.x; v < V; v += blockDim.x) cuda_st(dx + v, 0.0f);
        return;
    }
    const float l = lse[n], g = dloss[n];
    /* each element is read then written by the same thread: dlogits may alias logits */
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float d = expf(cuda_ld(x + v) - l) * g;
        if (v == t) d -= g;
        cuda_st(dx + v, d);
    }
}

template <typename T>
static void ce_cross_entropy_forward(float *losses, float *lse, const void *logits, const int32_t *targets, int N,
                                     int V) {
    if (N <= 0 || V <= 0) return;
    CUDA_LAUNCH(ce_forward_kernel<T>, N, CE_THREADS, 0)(losses, lse, (const T *)logits, targets, V);
    cuda_check("cross_entropy_forward");
}

template <typename T>
static void ce_cross_entropy_backward(void *dlogits, const void *logits, const float *lse, const int32_t *targets,
                                      const float *dloss, int N, int V) {
    if (N <= 0 || V <= 0) return;
    CUDA_LAUNCH(ce_backward_kernel<T>, N, CE_THREADS, 0)((T *)dlogits, (const T *)logits, lse, targets, dloss, V);
    cuda_check("cross_entropy_backward");
}

void cuda_cross_entropy_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, cross_entropy_forward, ce_cross_entropy_forward);
    CUDA_SET_OP(f32, bf16, cross_entropy_backward, ce_cross_entropy_backward);
}

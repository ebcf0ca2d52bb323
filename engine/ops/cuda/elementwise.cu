// Elementwise ops and reductions: fill, fill_normal, scale, add, gelu, swiglu, dropout, sum_squares,
// cast_to_bf16, adamw, sgd. One grid-stride kernel each, 64-bit indices; the formulas (and their order
// of operations) are those of engine/ops/cpu/{activation,optim}.c and engine/core/rng.c. The model's
// ops (add, gelu, swiglu, dropout) are templates on the storage type (fp32 math, one rounding per
// stored bf16 value); their backwards write dinp without reading it. The backend's own kernels (fill,
// optimizer, ...) are fp32. The bandwidth-bound ones (fill, scale, add, gelu, swiglu, dropout,
// cast_to_bf16, adamw) move 16-byte packs when their pointers are 16-byte aligned (internal.cuh), with
// the same per-element math as the scalar fallback.
#include <math.h>

#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"

#define EW_INV_SQRT2 0.70710678118654752f
#define EW_INV_SQRT_2PI 0.39894228040143268f

/* ---------------- kernels ---------------- */

/* The flat elementwise ops share one kernel, ew_map_kernel, around a per-element body: a functor
 * whose operator() takes the element's index and its NIN inputs widened to fp32 and returns the fp32
 * result (the formulas of the CPU, unchanged). W = CUDA_VEC(T) moves 16-byte packs (every pointer
 * 16-byte aligned, checked by ew_map), the last n % W elements one by one; W = 1 is the scalar kernel
 * for unaligned pointers. out is only stored (a backward's dinp is written, not read). */
template <typename scalar_t, int W, int NIN, typename F>
__global__ void ew_map_kernel(scalar_t *out, const scalar_t *in0, const scalar_t *in1, int64_t n, F f) {
    const int64_t nw = n / W;
    CUDA_FOR(j, nw) {
        const int64_t i0 = j * W;
        cuda_pack<scalar_t, W> a{}, b{}, y{};
        if constexpr (NIN > 0) a = cuda_ldp<W>(in0 + i0);
        if constexpr (NIN > 1) b = cuda_ldp<W>(in1 + i0);
#pragma unroll
        for (int k = 0; k < W; k++)
            cuda_st(&y.x[k], f(i0 + k, NIN > 0 ? cuda_ld(&a.x[k]) : 0.0f, NIN > 1 ? cuda_ld(&b.x[k]) : 0.0f));
        cuda_stp<W>(out + i0, y);
    }
    if constexpr (W > 1) { /* the tail: fewer than W elements, one per thread of the first block */
        const int64_t i = nw * W + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) cuda_st(out + i, f(i, NIN > 0 ? cuda_ld(in0 + i) : 0.0f, NIN > 1 ? cuda_ld(in1 + i) : 0.0f));
    }
}

struct ew_fill_f {
    float value;
    __device__ float operator()(int64_t, float, float) const { return value; }
};
struct ew_scale_f {
    float s;
    __device__ float operator()(int64_t, float x, float) const { return x * s; }
};
struct ew_add_f {
    __device__ float operator()(int64_t, float a, float b) const { return a + b; }
};
struct ew_gelu_forward_f {
    __device__ float operator()(int64_t, float x, float) const { return 0.5f * x * (1.0f + erff(x * EW_INV_SQRT2)); }
};
/* d/dx x*Phi(x) = Phi(x) + x*phi(x); inputs dout, inp; written to dinp */
struct ew_gelu_backward_f {
    __device__ float operator()(int64_t, float g, float x) const {
        const float cdf = 0.5f * (1.0f + erff(x * EW_INV_SQRT2));
        const float pdf = EW_INV_SQRT_2PI * expf(-0.5f * x * x);
        return g * (cdf + x * pdf);
    }
};
struct ew_gelu_tanh_forward_f {
    __device__ float operator()(int64_t, float x, float) const { return cuda_gelu_tanh(x); }
};
struct ew_gelu_tanh_backward_f {
    __device__ float operator()(int64_t, float g, float x) const { return g * cuda_gelu_tanh_grad(x); }
};
/* Element i dropped when uniform(key, first + i) < p (the CPU's mask, bit for bit), kept ones scaled. */
struct ew_dropout_forward_f {
    float p, scale;
    uint64_t key, first;
    __device__ float operator()(int64_t i, float x, float) const {
        const float u = cuda_uniform(key, first + (uint64_t)i);
        return u < p ? 0.0f : x * scale;
    }
};
/* dinp = mask * dout * scale; p <= 0 is a plain copy (use_mask = 0). */
struct ew_dropout_backward_f {
    float p, scale;
    uint64_t key, first;
    int use_mask;
    __device__ float operator()(int64_t i, float g, float) const {
        float d = g;
        if (use_mask) d = cuda_uniform(key, first + (uint64_t)i) < p ? 0.0f : g * scale;
        return d;
    }
};

template <typename scalar_t>
__global__ void ew_fill_normal_kernel(scalar_t *out, int64_t n, uint64_t key, uint64_t first, float mean,
                                      float std) {
    /* mean + std * z without fused multiply-add: rng.c is compiled as ISO C (no contraction) */
    CUDA_FOR(i, n) cuda_st(out + i, __fadd_rn(mean, __fmul_rn(std, cuda_normal(key, first + (uint64_t)i))));
}

/* inp[N, 2F]: the gate a = inp[:, :F], the value b = inp[:, F:]; out[N, F] = silu(a) * b. W elements of
 * one row per step (W > 1 only when F % W == 0 and the pointers are 16-byte aligned). */
template <typename scalar_t, int W>
__global__ void ew_swiglu_forward_kernel(scalar_t *out, const scalar_t *inp, int64_t nf, int F) {
    CUDA_FOR(j, nf / W) {
        const int64_t i = j * W, n = i / F, f = i - n * F;
        const scalar_t *row = inp + n * 2 * F;
        const cuda_pack<scalar_t, W> pa = cuda_ldp<W>(row + f), pb = cuda_ldp<W>(row + F + f);
        cuda_pack<scalar_t, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float a = cuda_ld(&pa.x[k]), b = cuda_ld(&pb.x[k]);
            cuda_st(&y.x[k], a / (1.0f + expf(-a)) * b);
        }
        cuda_stp<W>(out + i, y);
    }
}

template <typename scalar_t, int W>
__global__ void ew_swiglu_backward_kernel(scalar_t *dinp, const scalar_t *dout, const scalar_t *inp, int64_t nf,
                                          int F) {
    /* silu'(a) = s * (1 + a * (1 - s)), s = sigmoid(a) */
    CUDA_FOR(j, nf / W) {
        const int64_t i = j * W, n = i / F, f = i - n * F;
        const scalar_t *row = inp + n * 2 * F;
        scalar_t *drow = dinp + n * 2 * F;
        const cuda_pack<scalar_t, W> pa = cuda_ldp<W>(row + f), pb = cuda_ldp<W>(row + F + f);
        const cuda_pack<scalar_t, W> pg = cuda_ldp<W>(dout + i);
        cuda_pack<scalar_t, W> da, db;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float a = cuda_ld(&pa.x[k]), b = cuda_ld(&pb.x[k]), g = cuda_ld(&pg.x[k]);
            const float s = 1.0f / (1.0f + expf(-a));
            cuda_st(&da.x[k], g * b * s * (1.0f + a * (1.0f - s)));
            cuda_st(&db.x[k], g * a * s);
        }
        cuda_stp<W>(drow + f, da);
        cuda_stp<W>(drow + F + f, db);
    }
}

/* Per-block partial sums of x^2 in double (x^2 of a float is exact in double). */
template <typename scalar_t>
__global__ void ew_sum_squares_partial_kernel(double *partial, const scalar_t *x, int64_t n) {
    __shared__ double shm[32];
    double s = 0.0;
    CUDA_FOR(i, n) {
        const double v = (double)cuda_ld(x + i);
        s += v * v;
    }
    s = cuda_block_sum(s, shm);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* One block: the partials in a fixed order (deterministic for a given n and GPU). */
__global__ void ew_sum_squares_final_kernel(double *result, const double *partial, int np) {
    __shared__ double shm[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < np; i += blockDim.x) s += partial[i];
    s = cuda_block_sum(s, shm);
    if (threadIdx.x == 0) *result = s;
}

/* torch.optim.AdamW, the CPU kernel's expression order; step_size and bc2_sqrt come from the host.
 * W = 4: float4 packs of all four arrays (16-byte aligned), the n % 4 tail by the first threads. */
struct ew_adamw_args {
    float beta2, eps, step_size, bc2_sqrt, decay, one_m_b1, one_m_b2;
};
static __device__ __forceinline__ void ew_adamw_elem(float &w, float g, float &m_io, float &v_io,
                                                     const ew_adamw_args &a) {
    const float m = m_io + a.one_m_b1 * (g - m_io);
    const float v = v_io * a.beta2 + a.one_m_b2 * g * g;
    m_io = m;
    v_io = v;
    w = w * a.decay - a.step_size * (m / (sqrtf(v) / a.bc2_sqrt + a.eps));
}
template <int W>
__global__ void ew_adamw_kernel(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n,
                                ew_adamw_args a) {
    const int64_t nw = n / W;
    CUDA_FOR(j, nw) {
        const int64_t i = j * W;
        cuda_pack<float, W> w = cuda_ldp<W>(param + i), m = cuda_ldp<W>(exp_avg + i), v = cuda_ldp<W>(exp_avg_sq + i);
        const cuda_pack<float, W> g = cuda_ldp<W>(grad + i);
#pragma unroll
        for (int k = 0; k < W; k++) ew_adamw_elem(w.x[k], g.x[k], m.x[k], v.x[k], a);
        cuda_stp<W>(exp_avg + i, m);
        cuda_stp<W>(exp_avg_sq + i, v);
        cuda_stp<W>(param + i, w);
    }
    if constexpr (W > 1) {
        const int64_t i = nw * W + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) ew_adamw_elem(param[i], grad[i], exp_avg[i], exp_avg_sq[i], a);
    }
}

template <typename scalar_t>
__global__ void ew_sgd_kernel(scalar_t *param, const scalar_t *grad, float *momentum_buf, int64_t n, float lr,
                              float momentum, float weight_decay) {
    CUDA_FOR(i, n) {
        const float w = cuda_ld(param + i), g = cuda_ld(grad + i);
        if (momentum_buf) {
            const float b = momentum * momentum_buf[i] + g + weight_decay * w;
            momentum_buf[i] = b;
            cuda_st(param + i, w - lr * b);
        } else {
            cuda_st(param + i, w - lr * (g + weight_decay * w));
        }
    }
}

/* fp32 -> bf16 bits, exactly lt_f32_to_bf16 (engine/core/tensor.c): round to nearest even, a NaN
 * stays a NaN of the same sign and top payload bits, made quiet. (__float2bfloat16_rn agrees on
 * every non-NaN but returns one canonical NaN.) */
static __device__ __forceinline__ uint16_t ew_f32_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* W = 8: two 16-byte loads of fp32, one 16-byte store of bf16 (both pointers 16-byte aligned), the
 * n % 8 tail by the first threads; W = 1: one element at a time. */
template <int W>
__global__ void ew_cast_to_bf16_kernel(uint16_t *dst, const float *src, int64_t n) {
    const int64_t nw = n / W;
    CUDA_FOR(j, nw) {
        const cuda_pack<float, W> x = cuda_ldp<W>(src + j * W);
        cuda_pack<uint16_t, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) y.x[k] = ew_f32_to_bf16_bits(x.x[k]);
        cuda_stp<W>(dst + j * W, y);
    }
    if constexpr (W > 1) {
        const int64_t i = nw * W + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) dst[i] = ew_f32_to_bf16_bits(src[i]);
    }
}

/* ---------------- host entry points ---------------- */

#define EW_LAUNCH(kernel, n) CUDA_LAUNCH(kernel, cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)

/* ew_map_kernel over [0, n) (n > 0): the 16-byte kernel when every pointer is aligned and there is at
 * least one whole pack, else the scalar one. */
template <int NIN, typename T, typename F>
static void ew_map(T *out, const T *in0, const T *in1, int64_t n, F f) {
    constexpr int V = CUDA_VEC(T);
    if (n >= V && cuda_aligned16(out, in0, in1)) {
        void (*const k)(T *, const T *, const T *, int64_t, F) = ew_map_kernel<T, V, NIN, F>;
        CUDA_LAUNCH(k, cuda_blocks(n / V, CUDA_THREADS), CUDA_THREADS, 0)(out, in0, in1, n, f);
    } else {
        void (*const k)(T *, const T *, const T *, int64_t, F) = ew_map_kernel<T, 1, NIN, F>;
        CUDA_LAUNCH(k, cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)(out, in0, in1, n, f);
    }
}

void cuda_fill(float *out, int64_t n, float value) {
    if (n <= 0) return;
    ew_map<0>(out, (const float *)NULL, (const float *)NULL, n, ew_fill_f{value});
    cuda_check("fill");
}

void cuda_fill_normal(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std) {
    if (n <= 0) return;
    EW_LAUNCH(ew_fill_normal_kernel<float>, n)(out, n, key, first, mean, std);
    cuda_check("fill_normal");
}

void cuda_scale(float *x, int64_t n, float s) {
    if (n <= 0) return;
    ew_map<1>(x, (const float *)x, (const float *)NULL, n, ew_scale_f{s});
    cuda_check("scale");
}

template <typename T>
static void ew_add_forward(void *out, const void *a, const void *b, int64_t n) {
    if (n <= 0) return;
    ew_map<2>((T *)out, (const T *)a, (const T *)b, n, ew_add_f{});
    cuda_check("add_forward");
}

template <typename T>
static void ew_gelu_forward(void *out, const void *inp, int64_t n) {
    if (n <= 0) return;
    ew_map<1>((T *)out, (const T *)inp, (const T *)NULL, n, ew_gelu_forward_f{});
    cuda_check("gelu_forward");
}

template <typename T>
static void ew_gelu_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    if (n <= 0) return;
    ew_map<2>((T *)dinp, (const T *)dout, (const T *)inp, n, ew_gelu_backward_f{});
    cuda_check("gelu_backward");
}

template <typename T>
static void ew_gelu_tanh_forward(void *out, const void *inp, int64_t n) {
    if (n <= 0) return;
    ew_map<1>((T *)out, (const T *)inp, (const T *)NULL, n, ew_gelu_tanh_forward_f{});
    cuda_check("gelu_tanh_forward");
}

template <typename T>
static void ew_gelu_tanh_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    if (n <= 0) return;
    ew_map<2>((T *)dinp, (const T *)dout, (const T *)inp, n, ew_gelu_tanh_backward_f{});
    cuda_check("gelu_tanh_backward");
}

template <typename T>
static void ew_swiglu_forward(void *out, const void *inp, int N, int F) {
    const int64_t nf = (int64_t)N * F;
    if (nf <= 0) return;
    constexpr int V = CUDA_VEC(T);
    if (F % V == 0 && cuda_aligned16(out, inp))
        EW_LAUNCH((ew_swiglu_forward_kernel<T, V>), nf / V)((T *)out, (const T *)inp, nf, F);
    else
        EW_LAUNCH((ew_swiglu_forward_kernel<T, 1>), nf)((T *)out, (const T *)inp, nf, F);
    cuda_check("swiglu_forward");
}

template <typename T>
static void ew_swiglu_backward(void *dinp, const void *dout, const void *inp, int N, int F) {
    const int64_t nf = (int64_t)N * F;
    if (nf <= 0) return;
    constexpr int V = CUDA_VEC(T);
    if (F % V == 0 && cuda_aligned16(dinp, dout, inp))
        EW_LAUNCH((ew_swiglu_backward_kernel<T, V>), nf / V)((T *)dinp, (const T *)dout, (const T *)inp, nf, F);
    else
        EW_LAUNCH((ew_swiglu_backward_kernel<T, 1>), nf)((T *)dinp, (const T *)dout, (const T *)inp, nf, F);
    cuda_check("swiglu_backward");
}

template <typename T>
static void ew_dropout_forward(void *out, const void *inp, int64_t n, float p, uint64_t key, uint64_t first) {
    if (n <= 0) return;
    if (p <= 0.0f) { /* identity, as on the CPU */
        if (out != inp) {
            cuda_record_cuda("dropout_forward", cudaMemcpyAsync(out, inp, sizeof(T) * (size_t)n,
                                                                cudaMemcpyDeviceToDevice, cuda_ctx.stream));
            cuda_check("dropout_forward");
        }
        return;
    }
    const float scale = 1.0f / (1.0f - p); /* the CPU's float expression */
    ew_map<1>((T *)out, (const T *)inp, (const T *)NULL, n, ew_dropout_forward_f{p, scale, key, first});
    cuda_check("dropout_forward");
}

template <typename T>
static void ew_dropout_backward(void *dinp, const void *dout, int64_t n, float p, uint64_t key, uint64_t first) {
    if (n <= 0) return;
    const int use_mask = p > 0.0f;
    const float scale = use_mask ? 1.0f / (1.0f - p) : 1.0f;
    ew_map<1>((T *)dinp, (const T *)dout, (const T *)NULL, n, ew_dropout_backward_f{p, scale, key, first, use_mask});
    cuda_check("dropout_backward");
}

void cuda_elementwise_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, add_forward, ew_add_forward);
    CUDA_SET_OP(f32, bf16, gelu_forward, ew_gelu_forward);
    CUDA_SET_OP(f32, bf16, gelu_backward, ew_gelu_backward);
    CUDA_SET_OP(f32, bf16, gelu_tanh_forward, ew_gelu_tanh_forward);
    CUDA_SET_OP(f32, bf16, gelu_tanh_backward, ew_gelu_tanh_backward);
    CUDA_SET_OP(f32, bf16, swiglu_forward, ew_swiglu_forward);
    CUDA_SET_OP(f32, bf16, swiglu_backward, ew_swiglu_backward);
    CUDA_SET_OP(f32, bf16, dropout_forward, ew_dropout_forward);
    CUDA_SET_OP(f32, bf16, dropout_backward, ew_dropout_backward);
}

void cuda_cast_to_bf16(void *dst, const float *src, int64_t n) {
    if (n <= 0) return;
    if (n >= 8 && cuda_aligned16(dst, src))
        EW_LAUNCH(ew_cast_to_bf16_kernel<8>, n / 8)((uint16_t *)dst, src, n);
    else
        EW_LAUNCH(ew_cast_to_bf16_kernel<1>, n)((uint16_t *)dst, src, n);
    cuda_check("cast_to_bf16");
}

double cuda_sum_squares(const float *x, int64_t n) {
    if (n <= 0) return 0.0;
    const unsigned nb = cuda_blocks(n, CUDA_THREADS);
    double *scratch = (double *)cuda_scratch(sizeof(double) * ((size_t)nb + 1), "sum_squares");
    if (!scratch) return NAN;
    double *result = scratch + nb;
    CUDA_LAUNCH(ew_sum_squares_partial_kernel<float>, nb, CUDA_THREADS, 0)(scratch, x, n);
    CUDA_LAUNCH(ew_sum_squares_final_kernel, 1, CUDA_THREADS, 0)(result, scratch, (int)nb);
    cuda_check("sum_squares");
    double s = NAN;
    cudaError_t e = cudaMemcpyAsync(&s, result, sizeof s, cudaMemcpyDeviceToHost, cuda_ctx.stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(cuda_ctx.stream); /* waits: the value is returned */
    cuda_record_cuda("sum_squares", e);
    cuda_release(scratch, sizeof(double) * ((size_t)nb + 1));
    return e == cudaSuccess ? s : NAN;
}

void cuda_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    if (n <= 0) return;
    /* bias corrections in double on the host, exactly as engine/ops/cpu/optim.c */
    const double bc1 = 1.0 - pow((double)beta1, (double)step);
    const double bc2 = 1.0 - pow((double)beta2, (double)step);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float decay = 1.0f - lr * weight_decay;
    const float one_m_b1 = 1.0f - beta1, one_m_b2 = 1.0f - beta2;
    const ew_adamw_args a = {beta2, eps, step_size, bc2_sqrt, decay, one_m_b1, one_m_b2};
    if (n >= 4 && cuda_aligned16(param, grad, exp_avg, exp_avg_sq))
        EW_LAUNCH(ew_adamw_kernel<4>, n / 4)(param, grad, exp_avg, exp_avg_sq, n, a);
    else
        EW_LAUNCH(ew_adamw_kernel<1>, n)(param, grad, exp_avg, exp_avg_sq, n, a);
    cuda_check("adamw_update");
}

void cuda_sgd_update(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                     float weight_decay) {
    if (n <= 0) return;
    /* as on the CPU, momentum 0 ignores the buffer (it may be NULL) */
    EW_LAUNCH(ew_sgd_kernel<float>, n)(param, grad, momentum == 0.0f ? NULL : momentum_buf, n, lr, momentum,
                                           weight_decay);
    cuda_check("sgd_update");
}

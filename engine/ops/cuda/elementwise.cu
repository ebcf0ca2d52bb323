// Elementwise ops and reductions: fill, fill_normal, scale, add, gelu, swiglu, dropout, sum_squares,
// cast_to_bf16, adamw, sgd. One grid-stride kernel each, 64-bit indices; the formulas (and their order
// of operations) are those of engine/ops/cpu/{activation,optim}.c and engine/core/rng.c. The model's
// ops (add, gelu, swiglu, dropout) are templates on the storage type (fp32 math, one rounding per
// stored bf16 value); the backend's own kernels (fill, optimizer, ...) are fp32.
#include <math.h>

#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"

#define EW_INV_SQRT2 0.70710678118654752f
#define EW_INV_SQRT_2PI 0.39894228040143268f

/* ---------------- kernels ---------------- */

template <typename scalar_t>
__global__ void ew_fill_kernel(scalar_t *out, int64_t n, float value) {
    CUDA_FOR(i, n) cuda_st(out + i, value);
}

template <typename scalar_t>
__global__ void ew_fill_normal_kernel(scalar_t *out, int64_t n, uint64_t key, uint64_t first, float mean,
                                      float std) {
    /* mean + std * z without fused multiply-add: rng.c is compiled as ISO C (no contraction) */
    CUDA_FOR(i, n) cuda_st(out + i, __fadd_rn(mean, __fmul_rn(std, cuda_normal(key, first + (uint64_t)i))));
}

template <typename scalar_t>
__global__ void ew_scale_kernel(scalar_t *x, int64_t n, float s) {
    CUDA_FOR(i, n) cuda_st(x + i, cuda_ld(x + i) * s);
}

template <typename scalar_t>
__global__ void ew_add_kernel(scalar_t *out, const scalar_t *a, const scalar_t *b, int64_t n) {
    CUDA_FOR(i, n) cuda_st(out + i, cuda_ld(a + i) + cuda_ld(b + i));
}

template <typename scalar_t>
__global__ void ew_gelu_forward_kernel(scalar_t *out, const scalar_t *inp, int64_t n) {
    CUDA_FOR(i, n) {
        const float x = cuda_ld(inp + i);
        cuda_st(out + i, 0.5f * x * (1.0f + erff(x * EW_INV_SQRT2)));
    }
}

template <typename scalar_t>
__global__ void ew_gelu_backward_kernel(scalar_t *dinp, const scalar_t *dout, const scalar_t *inp, int64_t n) {
    /* d/dx x*Phi(x) = Phi(x) + x*phi(x) */
    CUDA_FOR(i, n) {
        const float x = cuda_ld(inp + i);
        const float cdf = 0.5f * (1.0f + erff(x * EW_INV_SQRT2));
        const float pdf = EW_INV_SQRT_2PI * expf(-0.5f * x * x);
        cuda_st(dinp + i, cuda_ld(dinp + i) + cuda_ld(dout + i) * (cdf + x * pdf));
    }
}

/* inp[N, 2F]: the gate a = inp[:, :F], the value b = inp[:, F:]; out[N, F] = silu(a) * b. */
template <typename scalar_t>
__global__ void ew_swiglu_forward_kernel(scalar_t *out, const scalar_t *inp, int64_t nf, int F) {
    CUDA_FOR(i, nf) {
        const int64_t n = i / F, f = i - n * F;
        const scalar_t *row = inp + n * 2 * F;
        const float a = cuda_ld(row + f), b = cuda_ld(row + F + f);
        cuda_st(out + i, a / (1.0f + expf(-a)) * b);
    }
}

template <typename scalar_t>
__global__ void ew_swiglu_backward_kernel(scalar_t *dinp, const scalar_t *dout, const scalar_t *inp, int64_t nf,
                                          int F) {
    /* silu'(a) = s * (1 + a * (1 - s)), s = sigmoid(a) */
    CUDA_FOR(i, nf) {
        const int64_t n = i / F, f = i - n * F;
        const scalar_t *row = inp + n * 2 * F;
        scalar_t *drow = dinp + n * 2 * F;
        const float a = cuda_ld(row + f), b = cuda_ld(row + F + f), g = cuda_ld(dout + i);
        const float s = 1.0f / (1.0f + expf(-a));
        cuda_st(drow + f, cuda_ld(drow + f) + g * b * s * (1.0f + a * (1.0f - s)));
        cuda_st(drow + F + f, cuda_ld(drow + F + f) + g * a * s);
    }
}

/* Element i dropped when uniform(key, first + i) < p (the CPU's mask, bit for bit), kept ones scaled. */
template <typename scalar_t>
__global__ void ew_dropout_forward_kernel(scalar_t *out, const scalar_t *inp, int64_t n, float p, float scale,
                                          uint64_t key, uint64_t first) {
    CUDA_FOR(i, n) {
        const float u = cuda_uniform(key, first + (uint64_t)i);
        cuda_st(out + i, u < p ? 0.0f : cuda_ld(inp + i) * scale);
    }
}

/* dinp += mask * dout * scale; p <= 0 is plain accumulation (use_mask = 0). */
template <typename scalar_t>
__global__ void ew_dropout_backward_kernel(scalar_t *dinp, const scalar_t *dout, int64_t n, float p, float scale,
                                           uint64_t key, uint64_t first, int use_mask) {
    CUDA_FOR(i, n) {
        const float g = cuda_ld(dout + i);
        float d = g;
        if (use_mask) d = cuda_uniform(key, first + (uint64_t)i) < p ? 0.0f : g * scale;
        cuda_st(dinp + i, cuda_ld(dinp + i) + d);
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

/* torch.optim.AdamW, the CPU kernel's expression order; step_size and bc2_sqrt come from the host. */
template <typename scalar_t>
__global__ void ew_adamw_kernel(scalar_t *param, const scalar_t *grad, float *exp_avg, float *exp_avg_sq, int64_t n,
                                float beta2, float eps, float step_size, float bc2_sqrt, float decay, float one_m_b1,
                                float one_m_b2) {
    CUDA_FOR(i, n) {
        const float g = cuda_ld(grad + i);
        const float m = exp_avg[i] + one_m_b1 * (g - exp_avg[i]);
        const float v = exp_avg_sq[i] * beta2 + one_m_b2 * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        cuda_st(param + i, cuda_ld(param + i) * decay - step_size * (m / (sqrtf(v) / bc2_sqrt + eps)));
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

__global__ void ew_cast_to_bf16_kernel(uint16_t *dst, const float *src, int64_t n) {
    CUDA_FOR(i, n) dst[i] = ew_f32_to_bf16_bits(src[i]);
}

/* ---------------- host entry points ---------------- */

#define EW_LAUNCH(kernel, n) CUDA_LAUNCH(kernel, cuda_blocks(n, CUDA_THREADS), CUDA_THREADS, 0)

void cuda_fill(float *out, int64_t n, float value) {
    if (n <= 0) return;
    EW_LAUNCH(ew_fill_kernel<float>, n)(out, n, value);
    cuda_check("fill");
}

void cuda_fill_normal(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std) {
    if (n <= 0) return;
    EW_LAUNCH(ew_fill_normal_kernel<float>, n)(out, n, key, first, mean, std);
    cuda_check("fill_normal");
}

void cuda_scale(float *x, int64_t n, float s) {
    if (n <= 0) return;
    EW_LAUNCH(ew_scale_kernel<float>, n)(x, n, s);
    cuda_check("scale");
}

template <typename T>
static void ew_add_forward(void *out, const void *a, const void *b, int64_t n) {
    if (n <= 0) return;
    EW_LAUNCH(ew_add_kernel<T>, n)((T *)out, (const T *)a, (const T *)b, n);
    cuda_check("add_forward");
}

template <typename T>
static void ew_gelu_forward(void *out, const void *inp, int64_t n) {
    if (n <= 0) return;
    EW_LAUNCH(ew_gelu_forward_kernel<T>, n)((T *)out, (const T *)inp, n);
    cuda_check("gelu_forward");
}

template <typename T>
static void ew_gelu_backward(void *dinp, const void *dout, const void *inp, int64_t n) {
    if (n <= 0) return;
    EW_LAUNCH(ew_gelu_backward_kernel<T>, n)((T *)dinp, (const T *)dout, (const T *)inp, n);
    cuda_check("gelu_backward");
}

template <typename T>
static void ew_swiglu_forward(void *out, const void *inp, int N, int F) {
    const int64_t nf = (int64_t)N * F;
    if (nf <= 0) return;
    EW_LAUNCH(ew_swiglu_forward_kernel<T>, nf)((T *)out, (const T *)inp, nf, F);
    cuda_check("swiglu_forward");
}

template <typename T>
static void ew_swiglu_backward(void *dinp, const void *dout, const void *inp, int N, int F) {
    const int64_t nf = (int64_t)N * F;
    if (nf <= 0) return;
    EW_LAUNCH(ew_swiglu_backward_kernel<T>, nf)((T *)dinp, (const T *)dout, (const T *)inp, nf, F);
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
    EW_LAUNCH(ew_dropout_forward_kernel<T>, n)((T *)out, (const T *)inp, n, p, scale, key, first);
    cuda_check("dropout_forward");
}

template <typename T>
static void ew_dropout_backward(void *dinp, const void *dout, int64_t n, float p, uint64_t key, uint64_t first) {
    if (n <= 0) return;
    const int use_mask = p > 0.0f;
    const float scale = use_mask ? 1.0f / (1.0f - p) : 1.0f;
    EW_LAUNCH(ew_dropout_backward_kernel<T>, n)((T *)dinp, (const T *)dout, n, p, scale, key, first, use_mask);
    cuda_check("dropout_backward");
}

void cuda_elementwise_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, add_forward, ew_add_forward);
    CUDA_SET_OP(f32, bf16, gelu_forward, ew_gelu_forward);
    CUDA_SET_OP(f32, bf16, gelu_backward, ew_gelu_backward);
    CUDA_SET_OP(f32, bf16, swiglu_forward, ew_swiglu_forward);
    CUDA_SET_OP(f32, bf16, swiglu_backward, ew_swiglu_backward);
    CUDA_SET_OP(f32, bf16, dropout_forward, ew_dropout_forward);
    CUDA_SET_OP(f32, bf16, dropout_backward, ew_dropout_backward);
}

void cuda_cast_to_bf16(void *dst, const float *src, int64_t n) {
    if (n <= 0) return;
    EW_LAUNCH(ew_cast_to_bf16_kernel, n)((uint16_t *)dst, src, n);
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
    EW_LAUNCH(ew_adamw_kernel<float>, n)(param, grad, exp_avg, exp_avg_sq, n, beta2, eps, step_size, bc2_sqrt,
                                             decay, one_m_b1, one_m_b2);
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

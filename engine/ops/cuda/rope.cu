// Rotary position embedding, in place on the query and key heads of the fused qkv[B, T, G, H/G + 2, D]
// buffer (the value heads are untouched). Non-interleaved: pairs (i, i + D/2) rotate by
// p(t) * inv_freq[i], p(t) = pos ? pos[t] : t (pos: T int32 global positions on the device, context parallelism). inv_freq is computed on the host exactly as engine/ops/cpu/rope.c does (double pow,
// rounded to float) and passed by value; the angle is the fp32 product (float)t * inv_freq[i]. The
// buffer is float or bf16: a bf16 pair is widened, rotated in fp32 and rounded.
#include <math.h>

#include "engine/ops/cuda/internal.cuh"

#define ROPE_MAX_HALF 64 /* D <= 128, the attention kernels' limit */

typedef struct {
    float f[ROPE_MAX_HALF];
} rope_freqs;

/* One thread per rotated pair: (b, t, g, head j <= H/G (queries then the key), i < D/2).
 * sign = +1 rotates forward, -1 by the inverse rotation (backward). */
template <typename scalar_t>
__global__ void rope_kernel(scalar_t *x, rope_freqs freqs, int64_t total, int T, int G, int hpg, int D, float sign,
                            const int32_t *pos) {
    const int half = D / 2;
    const int64_t rs = (int64_t)G * (hpg + 2) * D; /* elements per token row */
    CUDA_FOR(idx, total) {
        const int i = (int)(idx % half);
        int64_t rest = idx / half;
        const int j = (int)(rest % (hpg + 1));
        rest /= hpg + 1;
        const int g = (int)(rest % G);
        const int64_t bt = rest / G;
        const int t = (int)(bt % T);
        scalar_t *x1 = x + bt * rs + (int64_t)(g * (hpg + 2) + j) * D + i, *x2 = x1 + half;
        const float a = (float)(pos ? pos[t] : t) * freqs.f[i];
        const float cs = cosf(a), sn = sign * sinf(a);
        const float a1 = cuda_ld(x1), a2 = cuda_ld(x2);
        cuda_st(x1, a1 * cs - a2 * sn);
        cuda_st(x2, a2 * cs + a1 * sn);
    }
}

template <typename T>
static void rope_apply(void *x, int B, int T_, int H, int G, int D, float base, float sign, const int32_t *pos,
                       const char *op) {
    if (B <= 0 || T_ <= 0 || H <= 0 || D <= 0) return;
    if (G <= 0 || H % G != 0 || D % 2 != 0 || D / 2 > ROPE_MAX_HALF) {
        cuda_record(op, "unsupported shape H=%d G=%d D=%d (H a multiple of G, D even and <= %d)", H, G, D,
                    2 * ROPE_MAX_HALF);
        return;
    }
    const int half = D / 2, hpg = H / G;
    rope_freqs freqs;
    for (int i = 0; i < half; i++) freqs.f[i] = (float)(1.0 / pow((double)base, (double)(2 * i) / D));
    for (int i = half; i < ROPE_MAX_HALF; i++) freqs.f[i] = 0.0f;
    const int64_t total = (int64_t)B * T_ * G * (hpg + 1) * half;
    CUDA_LAUNCH(rope_kernel<T>, cuda_blocks(total, CUDA_THREADS), CUDA_THREADS, 0)((T *)x, freqs, total, T_, G, hpg,
                                                                                   D, sign, pos);
    cuda_check(op);
}

template <typename T>
static void rope_op_forward(void *qkv, int B, int T_, int H, int G, int D, float base, const int32_t *pos) {
    rope_apply<T>(qkv, B, T_, H, G, D, base, 1.0f, pos, "rope_forward");
}

template <typename T>
static void rope_op_backward(void *dqkv, int B, int T_, int H, int G, int D, float base, const int32_t *pos) {
    rope_apply<T>(dqkv, B, T_, H, G, D, base, -1.0f, pos, "rope_backward");
}

void cuda_rope_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, rope_forward, rope_op_forward);
    CUDA_SET_OP(f32, bf16, rope_backward, rope_op_backward);
}

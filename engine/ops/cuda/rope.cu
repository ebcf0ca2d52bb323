// Rotary position embedding, in place on the query and key heads of the fused qkv[B, T, G, H/G + 2, D]
// buffer (the value heads are untouched). Non-interleaved: pairs (i, i + D/2) rotate by
// t * inv_freq[i]. inv_freq is computed on the host exactly as engine/ops/cpu/rope.c does (double pow,
// rounded to float) and passed by value; the angle is the fp32 product (float)t * inv_freq[i].
#include <math.h>

#include "engine/ops/cuda/internal.cuh"

#define ROPE_MAX_HALF 64 /* D <= 128, the attention kernels' limit */

typedef struct {
    float f[ROPE_MAX_HALF];
} rope_freqs;

/* One thread per rotated pair: (b, t, g, head j <= H/G (queries then the key), i < D/2).
 * sign = +1 rotates forward, -1 by the inverse rotation (backward). */
template <typename scalar_t>
__global__ void rope_kernel(scalar_t *x, rope_freqs freqs, int64_t total, int T, int G, int hpg, int D, float sign) {
    const int half = D / 2;
    const int64_t rs = (int64_t)G * (hpg + 2) * D; /* floats per token row */
    CUDA_FOR(idx, total) {
        const int i = (int)(idx % half);
        int64_t rest = idx / half;
        const int j = (int)(rest % (hpg + 1));
        rest /= hpg + 1;
        const int g = (int)(rest % G);
        const int64_t bt = rest / G;
        const int t = (int)(bt % T);
        scalar_t *x1 = x + bt * rs + (int64_t)(g * (hpg + 2) + j) * D + i, *x2 = x1 + half;
        const float a = (float)t * freqs.f[i];
        const float cs = cosf(a), sn = sign * sinf(a);
        const float a1 = cuda_ld(x1), a2 = cuda_ld(x2);
        cuda_st(x1, a1 * cs - a2 * sn);
        cuda_st(x2, a2 * cs + a1 * sn);
    }
}

static void rope_apply(float *x, int B, int T, int H, int G, int D, float base, float sign, const char *op) {
    if (B <= 0 || T <= 0 || H <= 0 || D <= 0) return;
    if (G <= 0 || H % G != 0 || D % 2 != 0 || D / 2 > ROPE_MAX_HALF) {
        cuda_record(op, "unsupported shape H=%d G=%d D=%d (H a multiple of G, D even and <= %d)", H, G, D,
                    2 * ROPE_MAX_HALF);
        return;
    }
    const int half = D / 2, hpg = H / G;
    rope_freqs freqs;
    for (int i = 0; i < half; i++) freqs.f[i] = (float)(1.0 / pow((double)base, (double)(2 * i) / D));
    for (int i = half; i < ROPE_MAX_HALF; i++) freqs.f[i] = 0.0f;
    const int64_t total = (int64_t)B * T * G * (hpg + 1) * half;
    CUDA_LAUNCH(rope_kernel<float>, cuda_blocks(total, CUDA_THREADS), CUDA_THREADS, 0)(x, freqs, total, T, G,
                                                                                                hpg, D, sign);
    cuda_check(op);
}

void cuda_rope_forward(float *qkv, int B, int T, int H, int G, int D, float base) {
    rope_apply(qkv, B, T, H, G, D, base, 1.0f, "rope_forward");
}

void cuda_rope_backward(float *dqkv, int B, int T, int H, int G, int D, float base) {
    rope_apply(dqkv, B, T, H, G, D, base, -1.0f, "rope_backward");
}

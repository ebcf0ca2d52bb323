/* Branch-free, inlinable exp / erf / uniform-from-Philox for the CPU ops.
 * libm's expf and erff are function calls, so a loop over them stays scalar; these are plain
 * arithmetic that `#pragma omp simd` loops turn into SIMD code (exp over a 50k-wide vocabulary row
 * or over every attention score is otherwise a large share of a training step). */
#ifndef LT_OPS_SIMD_MATH_H
#define LT_OPS_SIMD_MATH_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* exp(x) within 2 ulp (Cephes expf polynomial). Results below the smallest normal flush to 0
 * (so exp(-inf) = 0); above, x is clamped to 88 (no caller exponentiates anything that large); NaN
 * propagates. */
static inline float lt_exp(float x) {
    const int under = x < -87.33654f;
    x = under ? -87.33654f : x;
    x = x > 88.0f ? 88.0f : x;
    /* n = round(x / ln2) by the 1.5 * 2^23 trick (no call to rintf, so it vectorises). */
    float t = x * 1.44269504088896341f + 12582912.0f;
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return under ? 0.0f : y * scale;
}

/* erf(x), Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 in exact arithmetic, ~5e-7 in fp32; the same
 * formula as PyTorch's vectorised CPU erf (so GELU matches torch's closely). */
static inline float lt_erf(float x) {
    float ax = x < 0.0f ? -x : x;
    float t = 1.0f / (1.0f + 0.3275911f * ax);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    float y = 1.0f - p * t * lt_exp(-ax * ax);
    return x < 0.0f ? -y : y;
}

/* The same value as lt_rng_uniform(key, index) (engine/core/rng.c, Philox4x32-10, word 0), inlined so
 * dropout masks are generated in SIMD lanes rather than by one out-of-line call per element.
 * tests/ops/test_dropout.c checks that the two agree bit for bit. */
static inline float lt_uniform_inline(uint64_t key, uint64_t index) {
    uint32_t c0 = (uint32_t)index, c1 = (uint32_t)(index >> 32), c2 = 0u, c3 = 0u;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return (float)(c0 >> 8) * (1.0f / 16777216.0f);
}

#if defined(__AVX512F__)
/* hi and lo 32 bits of c * m in every 32-bit lane (m in the low half of each 64-bit lane): two
 * 32x32->64 multiplies on the even and odd lanes; gcc otherwise widens to slow 64x64 multiplies. */
static inline void lt_mulhilo16(__m512i c, __m512i m, __m512i *hi, __m512i *lo) {
    const __m512i even = _mm512_mul_epu32(c, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#endif

/* u[i] = lt_rng_uniform(key, first + i) for i < n: 16 Philox streams per AVX-512 instruction where
 * available, the inlined scalar form (vectorised by the compiler) elsewhere and for the tail. */
static inline void lt_uniform_fill(float *u, uint64_t key, uint64_t first, int n) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
        const uint64_t start = first + (uint64_t)i;
        const __m512i lo = _mm512_set1_epi32((int)(uint32_t)start), hi = _mm512_set1_epi32((int)(start >> 32));
        __m512i c0 = _mm512_add_epi32(lo, iota);
        /* the high word of the counter carries where the low word wrapped inside this block */
        __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
        __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
        uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
        for (int r = 0; r < 10; r++) {
            __m512i h0, l0, h1, l1;
            lt_mulhilo16(c0, m0, &h0, &l0);
            lt_mulhilo16(c2, m1, &h1, &l1);
            c0 = _mm512_ternarylogic_epi32(h1, c1, _mm512_set1_epi32((int)k0), 0x96); /* a ^ b ^ c */
            c2 = _mm512_ternarylogic_epi32(h0, c3, _mm512_set1_epi32((int)k1), 0x96);
            c1 = l1, c3 = l0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const __m512 v = _mm512_cvtepi32_ps(_mm512_srli_epi32(c0, 8)); /* < 2^24: exact */
        _mm512_storeu_ps(u + i, _mm512_mul_ps(v, _mm512_set1_ps(1.0f / 16777216.0f)));
    }
#endif
#pragma omp simd
    for (int j = i; j < n; j++) u[j] = lt_uniform_inline(key, first + (uint64_t)j);
}

#endif

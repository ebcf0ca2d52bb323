/* Philox4x32-10 on the device: the same function as engine/core/rng.c, so dropout masks and
 * fill_normal reproduce the CPU streams (the uniform, and so every mask decision u < p, bit for bit).
 * Round: (hi, lo) = M0 * c0 and M1 * c2; c = {hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0}; then the key
 * is bumped by the Weyl constants. Counter = (lo, hi) of the 64-bit index, words 2 and 3 zero. */
#ifndef LT_CUDA_PHILOX_CUH
#define LT_CUDA_PHILOX_CUH
#include <stdint.h>

static __device__ __forceinline__ uint4 cuda_philox(uint64_t key, uint64_t counter) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0u, c3 = 0u;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
#pragma unroll
    for (int r = 0; r < 10; r++) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return make_uint4(c0, c1, c2, c3);
}

/* lt_rng_uniform: the top 24 bits of word 0, times 2^-24 (exact in fp32), in [0, 1). */
static __device__ __forceinline__ float cuda_uniform(uint64_t key, uint64_t index) {
    return (float)(cuda_philox(key, index).x >> 8) * (1.0f / 16777216.0f);
}

/* lt_rng_normal: Box-Muller in double on words 0 and 1, u1 in (0, 1] so the log never sees zero. */
static __device__ __forceinline__ float cuda_normal(uint64_t key, uint64_t index) {
    const uint4 o = cuda_philox(key, index);
    const double u1 = ((double)(o.x >> 8) + 1.0) / 16777216.0;
    const double u2 = (double)(o.y >> 8) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

#endif

#include "engine/core/rng.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline void philox_round(uint32_t c[4], const uint32_t k[2]) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c[0];
    uint64_t p1 = (uint64_t)PHILOX_M1 * c[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    uint32_t n0 = hi1 ^ c[1] ^ k[0], n2 = hi0 ^ c[3] ^ k[1];
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
}

lt_philox_out lt_philox(uint64_t key, uint64_t counter) {
    uint32_t c[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0u, 0u};
    uint32_t k[2] = {(uint32_t)key, (uint32_t)(key >> 32)};
    for (int r = 0; r < 10; r++) {
        philox_round(c, k);
        k[0] += PHILOX_W0;
        k[1] += PHILOX_W1;
    }
    lt_philox_out o = {{c[0], c[1], c[2], c[3]}};
    return o;
}

uint64_t lt_hash_name(const char *name) {
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 1099511628211ull;
    }
    return h;
}

uint64_t lt_rng_key(uint64_t seed, const char *name) {
    /* splitmix64 finaliser over seed, then combine with the name hash. */
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z ^ lt_hash_name(name);
}

static inline float u32_to_unit(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

float lt_rng_uniform(uint64_t key, uint64_t index) { return u32_to_unit(lt_philox(key, index).v[0]); }

float lt_rng_normal(uint64_t key, uint64_t index) {
    lt_philox_out o = lt_philox(key, index);
    /* (0, 1] for the log, so it never sees zero. */
    double u1 = ((double)(o.v[0] >> 8) + 1.0) / 16777216.0;
    double u2 = (double)(o.v[1] >> 8) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void lt_rng_fill_normal(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = mean + std * lt_rng_normal(key, first + (uint64_t)i);
}

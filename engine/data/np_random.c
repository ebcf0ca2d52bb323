#include "engine/data/np_random.h"

#define MT_N 624
#define MT_M 397

void lt_np_random_seed(lt_np_random *r, uint32_t seed) {
    r->key[0] = seed;
    for (int i = 1; i < MT_N; i++)
        r->key[i] = 1812433253u * (r->key[i - 1] ^ (r->key[i - 1] >> 30)) + (uint32_t)i;
    r->pos = MT_N;
}

static void mt_refill(lt_np_random *r) {
    uint32_t *k = r->key;
    for (int i = 0; i < MT_N; i++) {
        uint32_t y = (k[i] & 0x80000000u) | (k[(i + 1) % MT_N] & 0x7fffffffu);
        k[i] = k[(i + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    r->pos = 0;
}

uint32_t lt_np_random_u32(lt_np_random *r) {
    if (r->pos >= MT_N) mt_refill(r);
    uint32_t y = r->key[r->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t lt_np_random_interval(lt_np_random *r, uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max, v;
    mask |= mask >> 1; mask |= mask >> 2; mask |= mask >> 4;
    mask |= mask >> 8; mask |= mask >> 16; mask |= mask >> 32;
    if (max <= 0xffffffffu) {
        while ((v = (lt_np_random_u32(r) & mask)) > max) {}
    } else {
        /* numpy's MT19937 next_uint64: high word first. */
        do {
            uint64_t hi = lt_np_random_u32(r);
            v = ((hi << 32) | lt_np_random_u32(r)) & mask;
        } while (v > max);
    }
    return v;
}

void lt_np_shuffle_i32(lt_np_random *r, int32_t *a, int64_t n) {
    for (int64_t i = n - 1; i >= 1; i--) {
        int64_t j = (int64_t)lt_np_random_interval(r, (uint64_t)i);
        int32_t t = a[j]; a[j] = a[i]; a[i] = t;
    }
}

void lt_np_shuffle_i64(lt_np_random *r, int64_t *a, int64_t n) {
    for (int64_t i = n - 1; i >= 1; i--) {
        int64_t j = (int64_t)lt_np_random_interval(r, (uint64_t)i);
        int64_t t = a[j]; a[j] = a[i]; a[i] = t;
    }
}

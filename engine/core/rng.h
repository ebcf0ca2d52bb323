/* Counter-based random numbers (Philox4x32-10).
 * A value depends only on (key, counter), never on call order, so any rank can
 * produce any element of any stream: the basis of layout-independent init and of
 * dropout masks that backward regenerates instead of storing. */
#ifndef LT_RNG_H
#define LT_RNG_H
#include <stdint.h>

typedef struct { uint32_t v[4]; } lt_philox_out;

/* Four independent 32-bit words for (key, counter). */
lt_philox_out lt_philox(uint64_t key, uint64_t counter);

/* 64-bit FNV-1a of a string: turns a parameter name into a stream key. */
uint64_t lt_hash_name(const char *name);

/* Key of the stream for (seed, name): mixes both so names do not collide across seeds. */
uint64_t lt_rng_key(uint64_t seed, const char *name);

/* Uniform in [0, 1) for element `index` of stream `key`. */
float lt_rng_uniform(uint64_t key, uint64_t index);

/* Standard normal for element `index` of stream `key` (Box-Muller on one Philox call). */
float lt_rng_normal(uint64_t key, uint64_t index);

/* out[i] = mean + std * normal(key, first + i), i < n. Parallel and order-independent. */
void lt_rng_fill_normal(float *out, int64_t n, uint64_t key, uint64_t first, float mean, float std);

#endif

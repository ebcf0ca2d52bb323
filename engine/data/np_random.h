/* The subset of numpy's legacy RandomState (MT19937) that Megatron's dataset index uses:
 * RandomState(seed) and shuffle() of a 1-D array. Reproducing it bit for bit gives the
 * same document and shuffle order as Megatron for the same seed and data. */
#ifndef LT_DATA_NP_RANDOM_H
#define LT_DATA_NP_RANDOM_H
#include <stdint.h>

typedef struct {
    uint32_t key[624];
    int pos;
} lt_np_random;

/* numpy.random.RandomState(seed) for an integer seed (MT19937 init_genrand). */
void lt_np_random_seed(lt_np_random *r, uint32_t seed);
uint32_t lt_np_random_u32(lt_np_random *r);
/* numpy's random_interval: uniform in [0, max] by masked rejection. */
uint64_t lt_np_random_interval(lt_np_random *r, uint64_t max);
/* RandomState.shuffle of a 1-D array: Fisher-Yates from the end. */
void lt_np_shuffle_i32(lt_np_random *r, int32_t *a, int64_t n);
void lt_np_shuffle_i64(lt_np_random *r, int64_t *a, int64_t n);

#endif

/* Caching allocator for host memory.
 * Training allocates the same sizes every step; keeping freed blocks by size turns
 * those allocations into list pops and keeps peak memory honest to report. */
#ifndef LT_ALLOC_H
#define LT_ALLOC_H
#include <stddef.h>

typedef struct {
    size_t in_use;      /* bytes handed out and not yet released */
    size_t peak_in_use; /* high-water mark of in_use since start or lt_alloc_reset_peak */
    size_t cached;      /* bytes held in free lists */
    size_t num_allocs;  /* calls that reached malloc (cache misses) */
} lt_alloc_stats;

/* The size class of an n-byte request, as both caching allocators (this one and the CUDA plugin's)
 * round it: up to a multiple of `granule` (a power of two) below 1 MiB, and to 1/16 of its power of
 * two above, so a cached block wastes at most 6.25% there. Header-only: the plugin links no engine code. */
static inline size_t lt_alloc_size_class(size_t n, size_t granule) {
    if (n == 0) n = 1;
    if (n <= ((size_t)1 << 20)) return (n + granule - 1) & ~(granule - 1);
    size_t p = 1;
    while (p < n) p <<= 1;
    size_t step = p / 16;
    return (n + step - 1) / step * step;
}

/* 64-byte aligned, uninitialised. Returns NULL when memory is exhausted. */
void *lt_alloc(size_t nbytes);
/* Return a block obtained from lt_alloc with the same nbytes. */
void lt_release(void *ptr, size_t nbytes);
lt_alloc_stats lt_alloc_get_stats(void);
void lt_alloc_reset_peak(void);
/* Give every cached block back to the system. */
void lt_alloc_empty_cache(void);

#endif

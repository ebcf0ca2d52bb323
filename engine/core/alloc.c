#include "engine/core/alloc.h"

#include <stdint.h>
#include <stdlib.h>

/* Blocks are kept in free lists by size class (lt_alloc_size_class with 64-byte granules), one bin
 * per class. */
typedef struct block { struct block *next; } block;

#define NUM_BINS 1024
typedef struct {
    size_t size;
    block *free;
} bin;

static bin bins[NUM_BINS];
static lt_alloc_stats stats;

static size_t round_size(size_t n) { return lt_alloc_size_class(n, 64); }

static bin *find_bin(size_t size) {
    size_t h = (size * 0x9E3779B97F4A7C15ull) >> 54; /* top 10 bits */
    for (size_t i = 0; i < NUM_BINS; i++) {
        bin *b = &bins[(h + i) % NUM_BINS];
        if (b->size == size || b->size == 0) {
            b->size = size;
            return b;
        }
    }
    return NULL; /* table full: the caller falls back to plain malloc/free */
}

void *lt_alloc(size_t nbytes) {
    size_t size = round_size(nbytes);
    bin *b = find_bin(size);
    void *p = NULL;
    if (b && b->free) {
        block *blk = b->free;
        b->free = blk->next;
        stats.cached -= size;
        p = blk;
    } else {
        p = aligned_alloc(64, size);
        if (!p) {
            lt_alloc_empty_cache();
            p = aligned_alloc(64, size);
        }
        if (!p) return NULL;
        stats.num_allocs++;
    }
    stats.in_use += size;
    if (stats.in_use > stats.peak_in_use) stats.peak_in_use = stats.in_use;
    return p;
}

void lt_release(void *ptr, size_t nbytes) {
    if (!ptr) return;
    size_t size = round_size(nbytes);
    stats.in_use -= size;
    bin *b = find_bin(size);
    if (!b) {
        free(ptr);
        return;
    }
    block *blk = ptr;
    blk->next = b->free;
    b->free = blk;
    stats.cached += size;
}

lt_alloc_stats lt_alloc_get_stats(void) { return stats; }

void lt_alloc_reset_peak(void) { stats.peak_in_use = stats.in_use; }

void lt_alloc_empty_cache(void) {
    for (size_t i = 0; i < NUM_BINS; i++) {
        while (bins[i].free) {
            block *blk = bins[i].free;
            bins[i].free = blk->next;
            free(blk);
        }
    }
    stats.cached = 0;
}

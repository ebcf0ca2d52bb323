// The device context (GPU, stream), the sticky error slot and the caching allocator of the CUDA backend.
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/alloc.h"
#include "engine/ops/cuda/internal.cuh"

cuda_context cuda_ctx;

/* ---------------- errors ---------------- */

static pthread_mutex_t cuda_err_lock = PTHREAD_MUTEX_INITIALIZER;
static char cuda_err_msg[512];
static int cuda_err_set;

void cuda_record(const char *op, const char *fmt, ...) {
    pthread_mutex_lock(&cuda_err_lock);
    if (!cuda_err_set) { /* the first error is the one worth reading: later ones are usually its echo */
        int k = snprintf(cuda_err_msg, sizeof cuda_err_msg, "%s: ", op);
        if (k < 0 || k >= (int)sizeof cuda_err_msg) k = 0;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(cuda_err_msg + k, sizeof cuda_err_msg - (size_t)k, fmt, ap);
        va_end(ap);
        cuda_err_set = 1;
    }
    pthread_mutex_unlock(&cuda_err_lock);
}

void cuda_record_cuda(const char *op, cudaError_t e) {
    if (e == cudaSuccess) return;
    cuda_record(op, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    cudaGetLastError(); /* a failed runtime call also sets the last error; it is recorded now */
}

void cuda_check(const char *op) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && cuda_ctx.sync_each_op) e = cudaStreamSynchronize(cuda_ctx.stream);
    cuda_record_cuda(op, e);
}

int cuda_synchronize(char *err, size_t errlen) {
    const cudaError_t synced = cudaStreamSynchronize(cuda_ctx.stream);
    cudaError_t e = synced;
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess) {
        /* a kernel failed while running (e.g. an illegal address): its op is not known here */
        cuda_record("synchronize", "%s (%s); an op issued since the last synchronize failed (LUATRON_CUDA_SYNC=1 names it)",
                    cudaGetErrorString(e), cudaGetErrorName(e));
        cudaGetLastError();
    }
    if (cuda_ctx.profile) cuda_profile_collect(synced == cudaSuccess); /* every event pair has completed now */
    pthread_mutex_lock(&cuda_err_lock);
    int failed = cuda_err_set;
    if (failed) {
        if (err && errlen) snprintf(err, errlen, "%s", cuda_err_msg);
        cuda_err_set = 0;
        cuda_err_msg[0] = '\0';
    }
    pthread_mutex_unlock(&cuda_err_lock);
    return failed ? -1 : 0;
}

/* ---------------- caching allocator ----------------
 * Blocks from cudaMalloc (never managed memory) are kept in free lists by rounded size, one bin per
 * size class, as engine/core/alloc.c does on the host: sizes round to 256 bytes up to 1 MiB (the
 * alignment cudaMalloc gives anyway) and to 1/16 of their power of two above, so a cached block
 * wastes at most 6.25%. Device memory cannot hold the list links, so host nodes do. All work runs on
 * one stream: a block released and handed out again is only touched by work issued after the
 * release, which the stream orders after the work that used it before. */

typedef struct cuda_node {
    void *ptr;
    struct cuda_node *next;
} cuda_node;

#define CUDA_NUM_BINS 1024
typedef struct {
    size_t size;
    cuda_node *free;
} cuda_bin;

static pthread_mutex_t cuda_alloc_lock = PTHREAD_MUTEX_INITIALIZER;
static cuda_bin cuda_bins[CUDA_NUM_BINS];
static cuda_node *cuda_spare_nodes; /* recycled list nodes */
static size_t cuda_in_use, cuda_peak, cuda_cached;

/* 256-byte granules: the alignment cudaMalloc gives anyway. */
static size_t cuda_round_size(size_t n) { return lt_alloc_size_class(n, 256); }

static cuda_bin *cuda_find_bin(size_t size) {
    size_t h = (size * 0x9E3779B97F4A7C15ull) >> 54; /* top 10 bits */
    for (size_t i = 0; i < CUDA_NUM_BINS; i++) {
        cuda_bin *b = &cuda_bins[(h + i) % CUDA_NUM_BINS];
        if (b->size == size || b->size == 0) {
            b->size = size;
            return b;
        }
    }
    return NULL; /* table full: plain cudaMalloc / cudaFree for this size */
}

/* cudaFree of every cached block, after the stream has finished with them. Lock held. */
static void cuda_empty_cache_locked(void) {
    cudaStreamSynchronize(cuda_ctx.stream);
    for (size_t i = 0; i < CUDA_NUM_BINS; i++) {
        while (cuda_bins[i].free) {
            cuda_node *nd = cuda_bins[i].free;
            cuda_bins[i].free = nd->next;
            cudaFree(nd->ptr);
            nd->next = cuda_spare_nodes;
            cuda_spare_nodes = nd;
        }
    }
    cuda_cached = 0;
    cudaGetLastError(); /* a failure to free is not an op's error */
}

void *cuda_alloc(size_t nbytes) {
    const size_t size = cuda_round_size(nbytes);
    void *p = NULL;
    pthread_mutex_lock(&cuda_alloc_lock);
    cuda_bin *b = cuda_find_bin(size);
    if (b && b->free) {
        cuda_node *nd = b->free;
        b->free = nd->next;
        p = nd->ptr;
        nd->next = cuda_spare_nodes;
        cuda_spare_nodes = nd;
        cuda_cached -= size;
    } else {
        if (cudaMalloc(&p, size) != cudaSuccess) {
            cudaGetLastError(); /* out of memory is the caller's to handle, not a sticky op error */
            cuda_empty_cache_locked();
            if (cudaMalloc(&p, size) != cudaSuccess) {
                cudaGetLastError();
                pthread_mutex_unlock(&cuda_alloc_lock);
                return NULL;
            }
        }
    }
    cuda_in_use += size;
    if (cuda_in_use > cuda_peak) cuda_peak = cuda_in_use;
    pthread_mutex_unlock(&cuda_alloc_lock);
    return p;
}

void cuda_release(void *p, size_t nbytes) {
    if (!p) return;
    const size_t size = cuda_round_size(nbytes);
    pthread_mutex_lock(&cuda_alloc_lock);
    cuda_in_use -= size;
    cuda_bin *b = cuda_find_bin(size);
    cuda_node *nd = NULL;
    if (b) {
        nd = cuda_spare_nodes;
        if (nd) cuda_spare_nodes = nd->next;
        else nd = (cuda_node *)malloc(sizeof *nd);
    }
    if (!nd) {
        cudaFree(p); /* synchronizes the device: safe for work still using p */
        cudaGetLastError();
    } else {
        nd->ptr = p;
        nd->next = b->free;
        b->free = nd;
        cuda_cached += size;
    }
    pthread_mutex_unlock(&cuda_alloc_lock);
}

void cuda_memory_stats(size_t *in_use, size_t *peak, size_t *cached) {
    pthread_mutex_lock(&cuda_alloc_lock);
    if (in_use) *in_use = cuda_in_use;
    if (peak) *peak = cuda_peak;
    if (cached) *cached = cuda_cached;
    pthread_mutex_unlock(&cuda_alloc_lock);
}

void cuda_reset_peak(void) {
    pthread_mutex_lock(&cuda_alloc_lock);
    cuda_peak = cuda_in_use;
    pthread_mutex_unlock(&cuda_alloc_lock);
}

void *cuda_scratch(size_t nbytes, const char *op) {
    void *p = cuda_alloc(nbytes);
    if (!p) cuda_record(op, "out of device memory for %zu bytes of scratch", nbytes);
    return p;
}

/* ---------------- copies ---------------- */

void cuda_memzero(void *p, size_t nbytes) {
    if (nbytes == 0) return;
    cuda_record_cuda("memzero", cudaMemsetAsync(p, 0, nbytes, cuda_ctx.stream));
    cuda_check("memzero");
}

/* Returns only when the host buffer may be reused: pageable copies are staged, the sync makes sure. */
void cuda_to_device(void *dst, const void *host_src, size_t nbytes) {
    if (nbytes == 0) return;
    cuda_record_cuda("to_device", cudaMemcpyAsync(dst, host_src, nbytes, cudaMemcpyHostToDevice, cuda_ctx.stream));
    cuda_record_cuda("to_device", cudaStreamSynchronize(cuda_ctx.stream));
}

void cuda_to_host(void *host_dst, const void *src, size_t nbytes) {
    if (nbytes == 0) return;
    cuda_record_cuda("to_host", cudaMemcpyAsync(host_dst, src, nbytes, cudaMemcpyDeviceToHost, cuda_ctx.stream));
    cuda_record_cuda("to_host", cudaStreamSynchronize(cuda_ctx.stream));
}

void cuda_copy(void *dst, const void *src, size_t nbytes) {
    if (nbytes == 0 || dst == src) return;
    cuda_record_cuda("copy", cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, cuda_ctx.stream));
    cuda_check("copy");
}

/* ---------------- the device ---------------- */

int cuda_context_open(int device, char *err, size_t errlen) {
    cudaError_t e = cudaSetDevice(device);
    cudaDeviceProp prop;
    if (e == cudaSuccess) e = cudaGetDeviceProperties(&prop, device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&cuda_ctx.stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cannot open GPU %d: %s (%s)", device, cudaGetErrorString(e), cudaGetErrorName(e));
        cudaGetLastError();
        return -1;
    }
    cuda_ctx.device = device;
    cuda_ctx.sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    cuda_ctx.smem_optin = prop.sharedMemPerBlockOptin;
    const char *s = getenv("LUATRON_CUDA_SYNC");
    cuda_ctx.sync_each_op = s && *s && strcmp(s, "0") != 0;
    const char *a = getenv("LUATRON_CUDA_ATTENTION");
    cuda_ctx.attention_tc = !(a && strcmp(a, "simt") == 0);
    const char *pr = getenv("LUATRON_CUDA_PROFILE");
    cuda_ctx.profile = pr && *pr && strcmp(pr, "0") != 0;
    return 0;
}

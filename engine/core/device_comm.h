/* The interface a device backend gives engine/comm for collectives on its memory: the CUDA
 * plugin fills it with NCCL (engine/ops/cuda/nccl.cu) as lt_backend.comm (engine/ops/backend.h),
 * and engine/comm/nccl.c puts an lt_comm in front of it (lt_comm_nccl). It lives here, in core,
 * so that engine/comm and engine/ops need not know each other. */
#ifndef LT_DEVICE_COMM_H
#define LT_DEVICE_COMM_H
#include <stddef.h>
#include <stdint.h>

#include "engine/core/tensor.h"

/* Collectives on a backend's memory (the CUDA plugin: NCCL), used by engine/comm/nccl.c behind
 * lt_comm (lt_comm_nccl); the CPU backend has none (lt_backend.comm NULL).
 * The library is loaded on first use, so a backend without it still opens: every function then
 * fails with the reason ("NCCL is not available: ..."). Arguments were checked by engine/comm.
 *
 * Ordering, not blocking: a collective waits on the device for the work issued before it on the
 * compute stream, runs on the communicator's own stream, and the compute stream waits for it
 * before any later work. The host does not wait: a call returns once the collective is enqueued,
 * so its results are ordered for device work, and a host read of them goes through to_host (which
 * waits for the compute stream). barrier alone waits on the host for its one-element all-reduce.
 * Buffers must stay allocated until the compute stream has passed the collective (the caching
 * allocator reuses blocks in compute-stream order, so releasing after the call is fine).
 *
 * All return 0, or -1 with a message in err[errlen]. `op` is lt_reduce_op of engine/comm/comm.h
 * passed as an int (0 = sum, 1 = avg, 2 = max).
 * Counts are elements of dtype (LT_F32, LT_BF16, LT_I32, LT_I64). One thread at a time per handle. */
#define LT_DEVICE_COMM_ID_BYTES 128
/* One operation of batch_p2p: send (1) or receive (0) count elements of dtype at buf to/from peer. */
typedef struct {
    int send;
    void *buf;
    int64_t count;
    lt_dtype dtype;
    int peer;
} lt_device_p2p_op;
typedef struct lt_device_comm_ops {
    const char *name; /* "nccl" */
    /* The rendezvous id (LT_DEVICE_COMM_ID_BYTES, idlen at least that) made by one rank and handed to
     * every rank of the new communicator. */
    int (*unique_id)(void *id, size_t idlen, char *err, size_t errlen);
    /* Joins the communicator of nranks (every rank calls it with the same id); a handle, or NULL with err. */
    void *(*init)(const void *id, int nranks, int rank, char *err, size_t errlen);
    int (*all_reduce)(void *h, void *buf, int64_t count, lt_dtype dtype, int op, char *err, size_t errlen);
    int (*reduce_scatter)(void *h, const void *send, void *recv, int64_t recv_count, lt_dtype dtype, int op,
                          char *err, size_t errlen);
    int (*all_gather)(void *h, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                      size_t errlen);
    int (*broadcast)(void *h, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen);
    int (*send)(void *h, const void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen);
    int (*recv)(void *h, void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen);
    /* Grouped sends and receives: blocks in rank order, as lt_comm_all_to_all. */
    int (*all_to_all)(void *h, const void *send, const int64_t *send_counts, void *recv, const int64_t *recv_counts,
                      lt_dtype dtype, char *err, size_t errlen);
    int (*barrier)(void *h, char *err, size_t errlen);
    /* Abandons the communicator's pending work (never waits for peers); destroy must still follow. */
    void (*abort)(void *h);
    void (*destroy)(void *h);
    /* Sends and receives posted together as one group (lt_comm_batch_p2p): ops[i] goes to or comes
     * from its peer; they progress together, so a batch never waits on itself. */
    int (*batch_p2p)(void *h, const lt_device_p2p_op *ops, int n, char *err, size_t errlen);
} lt_device_comm_ops;

#endif

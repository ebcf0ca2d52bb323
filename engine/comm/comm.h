/* Communicators: the collectives every parallelism is built from, one interface, several
 * backends (shm: host memory of CPU ranks on one machine; nccl: GPU memory, see lt_comm_nccl).
 *
 * Conventions:
 * - Every rank of a communicator calls the same collectives in the same order.
 * - Functions return 0 on success, or -1 with a message in err[errlen] naming the collective,
 *   the communicator and (for a timeout) the ranks that did not arrive. After a failure the
 *   communicator is unusable; the caller reports and exits (the launcher then stops the job).
 *   The one exception is an interrupt (Ctrl-C in the REPL, see "interrupts" at the end): the
 *   call fails with "... interrupted (Ctrl-C)" and the communicator is usable again once every
 *   rank has resynchronised (lt_comm_resync).
 * - Results never depend on timing: reductions add contributions in rank order 0, 1, ..., so a
 *   run is repeatable bit for bit.
 * - Counts are in elements of `dtype` (engine/core/tensor.h: LT_F32, LT_BF16, LT_I32, LT_I64;
 *   bf16 reduces through fp32). In-place is allowed where noted.
 * - Every collective adds the bytes this rank moved to the communicator's statistics, counted as
 *   the ring algorithms move them (all-reduce 2(N-1)/N of the buffer, reduce-scatter and all-gather
 *   (N-1)/N of the full buffer, broadcast the buffer, send/recv the message), so reports can be
 *   compared with the textbook formulas. */
#ifndef LT_COMM_H
#define LT_COMM_H
#include <stddef.h>
#include <stdint.h>

#include "engine/core/device_comm.h"
#include "engine/core/tensor.h"

typedef enum { LT_REDUCE_SUM = 0, LT_REDUCE_AVG = 1, LT_REDUCE_MAX = 2 } lt_reduce_op;

typedef struct lt_comm lt_comm;

typedef struct {
    uint64_t calls;      /* collectives and point-to-point calls */
    uint64_t bytes;      /* bytes this rank sent (ring accounting, see above) */
    double seconds;      /* wall time spent inside calls */
} lt_comm_stats;

/* How a world communicator finds its peers: filled by lt_bootstrap (bootstrap.h) from the
 * launcher's environment or PMIx. */
typedef struct {
    int rank, world_size, local_rank, local_size;
    char job_id[64];  /* unique per job: names shared-memory segments */
    double timeout_s; /* a collective waits at most this long for the other ranks */
} lt_comm_world_info;

/* The world communicator of the shm backend (all ranks on this machine). */
lt_comm *lt_comm_shm_world(const lt_comm_world_info *info, char *err, size_t errlen);

/* A communicator over a subset of `parent`'s ranks (given as parent ranks, ascending, including
 * the caller). Only the members call it, all with the same list; `name` (e.g. "dp", "tp") appears
 * in messages and statistics. The new rank is the caller's position in the list. */
lt_comm *lt_comm_group(lt_comm *parent, const int *ranks, int n, const char *name, char *err, size_t errlen);

/* An NCCL communicator over the same ranks as `host` (a shm communicator: the world or a group),
 * for buffers in the memory of a device backend: `dev` is its collectives (lt_backend.comm of
 * lt_backend_get("cuda"), engine/core/device_comm.h), `device` its name for messages.
 * Every rank of host calls it: rank 0 makes NCCL's unique id, lt_comm_broadcast over host hands it
 * to the others, every rank joins. Its name is "<host name>/nccl"; host must outlive it (its abort
 * also aborts host, so the other ranks learn of it). NULL with the reason in err: no device
 * collectives (dev NULL: the CPU), "NCCL is not available: libnccl.so.2 not found (set
 * LUATRON_NCCL_LIB ...)", or NCCL's own error.
 * Its collectives have the conventions above with these differences: buffers are device memory;
 * a call returns once the collective is enqueued on the device: its results are ordered before
 * device work issued later, and a host read goes through the backend's to_host (which waits);
 * lt_comm_barrier alone waits on the host. Reductions are NCCL's (bf16 reduced in bf16, order by
 * NCCL's algorithm): repeatable for a fixed layout, not bit-identical to shm. Statistics count as
 * for every backend (seconds: the time to enqueue). lt_comm_group on it is refused: call
 * lt_comm_nccl over the host group instead. The non-blocking calls (below) work on it too. */
lt_comm *lt_comm_nccl(lt_comm *host, const char *device, const lt_device_comm_ops *dev, char *err, size_t errlen);

void lt_comm_free(lt_comm *c);
int lt_comm_rank(const lt_comm *c);
int lt_comm_size(const lt_comm *c);
const char *lt_comm_name(const lt_comm *c);
/* The world rank of group rank r (for messages). */
int lt_comm_world_rank(const lt_comm *c, int r);

/* buf (count elements) reduced across ranks, in place. */
int lt_comm_all_reduce(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op, char *err, size_t errlen);
/* send holds size * recv_count elements; rank r receives the reduction of block r. */
int lt_comm_reduce_scatter(lt_comm *c, const void *send, void *recv, int64_t recv_count, lt_dtype dtype,
                           lt_reduce_op op, char *err, size_t errlen);
/* recv holds size * send_count elements: block r is rank r's send. recv may alias block rank of itself. */
int lt_comm_all_gather(lt_comm *c, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                       size_t errlen);
/* send_counts[r] elements go to rank r (blocks laid out in rank order in send); recv_counts[r] come
 * from rank r (laid out in rank order in recv). Counts must agree pairwise across ranks. */
int lt_comm_all_to_all(lt_comm *c, const void *send, const int64_t *send_counts, void *recv,
                       const int64_t *recv_counts, lt_dtype dtype, char *err, size_t errlen);
int lt_comm_broadcast(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen);
/* Blocking point-to-point: a batch of one (see lt_comm_batch_p2p below for the rules). */
int lt_comm_send(lt_comm *c, const void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen);
int lt_comm_recv(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen);
int lt_comm_barrier(lt_comm *c, char *err, size_t errlen);
/* Marks the communicator (and every communicator of the job) failed: peers waiting in a collective
 * return an error naming this rank and the reason instead of waiting for the timeout. */
void lt_comm_abort(lt_comm *c, const char *reason);

lt_comm_stats lt_comm_get_stats(const lt_comm *c);
void lt_comm_reset_stats(lt_comm *c);

/* ==== point-to-point in batches ==============================================================
 * What pipeline schedules need: send to one neighbour while receiving from the other, or send to
 * and receive from the same neighbour at once (Megatron's send_forward_recv_backward), or all four
 * at once (interleaved: send_forward_backward_recv_forward_backward). A batch posts all its sends
 * and receives together and returns when every one of them is complete (as torch's
 * batch_isend_irecv followed by waiting on every request, or NCCL's ncclGroupStart/End).
 *
 * Rules:
 * - Matching: the messages from rank a to rank b match b's receives from a in the order they were
 *   posted (FIFO per ordered pair, across batches and blocking calls alike). A send and its
 *   receive must agree on the size in bytes (a mismatch fails the receiver with both sizes).
 * - Completion: a send is complete when its receiver has copied all of it, a receive when all of
 *   it has arrived. The operations of one batch progress together, in any interleaving, so a
 *   batch never waits on itself: two ranks that send to each other in the same batch (or each in
 *   a batch with the matching receive) do not deadlock, whatever the message sizes.
 * - What deadlocks (and then times out, naming the peers): a send whose receive the peer has not
 *   posted and will only post after something this rank does later, e.g. both ranks calling the
 *   blocking lt_comm_send to each other first, or batches whose matching operations are not in
 *   flight at the same time. Keep every send and its receive in batches the two ranks run at the
 *   same step of their schedules.
 * - Buffers belong to the batch until it returns (for lt_comm_batch_p2p_async: until lt_comm_wait
 *   returns): neither read nor write them meanwhile, and the same receive buffer must not appear
 *   twice in a batch. ops itself is copied by the async form and may go at once.
 * - Errors: as for the collectives: argument errors name the operation (its index in ops), a
 *   timeout (no progress for timeout_s) names the peers that did not send or receive, an abort
 *   names the aborting rank; after a failure the communicator is unusable.
 * - Statistics: every send and every receive counts as one call (a batch of a send and a receive
 *   counts as the two blocking calls would); bytes are the bytes of the sends.
 * - The nccl backend runs a batch as one NCCL group (ncclGroupStart, ncclSend/ncclRecv, ncclGroupEnd)
 *   and returns once it is enqueued, like its collectives. */
typedef enum { LT_P2P_SEND = 0, LT_P2P_RECV = 1 } lt_p2p_kind;

typedef struct {
    lt_p2p_kind kind;
    void *buf;     /* count elements of dtype: read (send) or written (recv) */
    int64_t count;
    lt_dtype dtype;
    int peer;      /* a rank of the communicator other than the caller */
} lt_comm_p2p_op;

/* Runs ops[0..n-1] (n >= 0) together; 0 when all are complete, or -1 with err. */
int lt_comm_batch_p2p(lt_comm *c, const lt_comm_p2p_op *ops, int n, char *err, size_t errlen);
/* The same on the communicator's background thread (the non-blocking section below: FIFO with the
 * other non-blocking calls of c, completed by lt_comm_wait / lt_comm_test), so a schedule can
 * compute while its p2p is in flight. NULL only when c is NULL or out of memory. */
struct lt_comm_request;
struct lt_comm_request *lt_comm_batch_p2p_async(lt_comm *c, const lt_comm_p2p_op *ops, int n);

/* ==== non-blocking collectives (async.c) ====================================================
 * For overlapping communication with computation (Megatron's overlap_grad_reduce: a DDP bucket's
 * reduction starts while backward still computes the earlier layers).
 *
 * - Each communicator has one background thread, started by its first non-blocking call and
 *   joined by lt_comm_free; it sleeps on a condition variable while there is nothing to do. It
 *   runs the requests one at a time in the order they were issued (FIFO), by calling the blocking
 *   collectives, so results are bit-identical to the blocking calls.
 * - The buffers belong to the request from the call until lt_comm_wait returns: the caller must
 *   neither read nor write them meanwhile.
 * - Every request must be waited for exactly once (lt_comm_wait frees it), and before
 *   lt_comm_free (which waits for pending requests, but cannot free requests not waited for).
 * - A blocking call on the same communicator (and lt_comm_group with it as the parent) first
 *   waits for every pending request, so the order of collectives is the order of the calls, the
 *   same on every rank. Requests on different communicators run independently.
 * - One thread issues, waits and makes blocking calls on a given communicator.
 * - Errors surface at lt_comm_wait with the blocking calls' messages (argument errors, timeouts
 *   naming the ranks that did not arrive, aborts). After a failure the communicator is unusable
 *   like after a blocking failure: requests queued behind the failed one fail too.
 * - Statistics (lt_comm_get_stats) count each request exactly as the blocking call (calls, bytes);
 *   its seconds are the time the background thread spent inside the collective, not the caller's.
 *   The caller's side is in lt_comm_async_stats. */
typedef struct lt_comm_request lt_comm_request;

/* NULL only when c is NULL or out of memory (then nothing was started; lt_comm_wait(NULL) reports
 * it). Argument errors are reported by lt_comm_wait. */
lt_comm_request *lt_comm_all_reduce_async(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op);
lt_comm_request *lt_comm_reduce_scatter_async(lt_comm *c, const void *send, void *recv, int64_t recv_count,
                                              lt_dtype dtype, lt_reduce_op op);
lt_comm_request *lt_comm_all_gather_async(lt_comm *c, const void *send, void *recv, int64_t send_count,
                                          lt_dtype dtype);
/* Blocks until the request is done, frees it; 0, or -1 with the collective's message. */
int lt_comm_wait(lt_comm_request *r, char *err, size_t errlen);
/* 1 when the request has finished (lt_comm_wait will not block), 0 otherwise; never blocks. */
int lt_comm_test(const lt_comm_request *r);

typedef struct {
    uint64_t requests;      /* non-blocking collectives finished (also counted in lt_comm_stats.calls) */
    double seconds;         /* time the background thread spent running them */
    double blocked_seconds; /* time the caller spent blocked on them: in lt_comm_wait, and in blocking
                               calls, lt_comm_group and lt_comm_free waiting for pending requests */
} lt_comm_async_stats;

/* Since creation or the last lt_comm_reset_stats (which resets these too). The share of the
 * reduction time hidden behind computation is 1 - blocked_seconds / seconds. */
lt_comm_async_stats lt_comm_get_async_stats(const lt_comm *c);

/* ==== interrupts and resynchronisation (interactive sessions) ===============================
 * How Ctrl-C in the SPMD REPL (engine/cli/repl.h) stops ranks waiting in a collective without
 * killing the job's communicators (lt_comm_abort would, for good).
 *
 * - lt_comm_interrupt() (async-signal-safe: for a SIGINT handler) sets a process-wide flag. Every
 *   wait of this process in progress (blocking calls on any thread, the background thread of the
 *   non-blocking ones, group and world creation) then returns within one sleep slice (20 ms)
 *   with -1 and "<call> on communicator '<name>' (ranks ...) interrupted (Ctrl-C)", and every call
 *   made later fails at once the same way, until lt_comm_resync. Only the REPL calls it: in batch
 *   runs SIGINT keeps its default (the launcher passes it on and the ranks end). Not interrupted:
 *   lt_bootstrap_exchange (NCCL's unique id: it waits for its root at most the timeout) and NCCL's
 *   own device work.
 * - An interrupted call does not mark its communicator failed, but leaves the ranks out of step
 *   (barrier arrivals, call numbers, staging halves, point-to-point chunks). Recovery runs when every
 *   rank of the job has stopped calling (the REPL: every rank finished the interrupted line), in
 *   two steps, each on every rank, the second started only after every rank finished the first,
 *   and no rank calling anything before every rank finished the second (the launcher orders them):
 *     lt_comm_quiesce()  sets the flag and waits for the non-blocking requests of every
 *                        communicator of this process, point-to-point batches included (they
 *                        fail at once, interrupted);
 *     lt_comm_resync()   brings every communicator of this process back in step with its peers
 *                        (shm: each rank catches its counters up to the largest over the ranks,
 *                        read from the shared segment; on each point-to-point channel both
 *                        ends agree again, a message sent but not received is dropped),
 *                        then clears the flag.
 *   Communicators that failed for another reason (timeout, abort, ranks disagreeing) stay failed.
 *   NCCL communicators cannot be brought back in step (a collective may be stuck on the device):
 *   lt_comm_resync marks every NCCL communicator failed with a message saying to create a new one
 *   (core.comm_nccl). Returns 0, or -1 with the first such message in err (the others were still
 *   resynchronised). */
void lt_comm_interrupt(void);
/* Whether lt_comm_interrupt was called since the last lt_comm_resync. Async-signal-safe. */
int lt_comm_interrupt_pending(void);
void lt_comm_quiesce(void);
int lt_comm_resync(char *err, size_t errlen);

#endif

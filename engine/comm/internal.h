/* Communicators, the backend side: what a backend (shm.c, nccl.c) implements and the
 * bookkeeping comm.c does for every backend (argument checks, statistics, names, world ranks).
 *
 * comm.c validates arguments (dtype, counts >= 0, buffers, peer/root in range, group lists),
 * times the call, counts it in the statistics and then calls the backend; a backend only moves
 * data and reports failures. After a backend failure comm.c marks the communicator failed and
 * every later call returns the first error again, unless the backend reported the failure as an
 * interrupt (lt_comm_interrupted_): then the communicator waits for lt_comm_resync (comm.h). */
#ifndef LT_COMM_INTERNAL_H
#define LT_COMM_INTERNAL_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"

typedef struct lt_comm_ops {
    const char *backend; /* "shm", "nccl" */
    /* Every function gets the communicator (its impl in c->impl) and returns 0 or -1 with err. */
    int (*all_reduce)(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op, char *err,
                      size_t errlen);
    int (*reduce_scatter)(lt_comm *c, const void *send, void *recv, int64_t recv_count, lt_dtype dtype,
                          lt_reduce_op op, char *err, size_t errlen);
    int (*all_gather)(lt_comm *c, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                      size_t errlen);
    int (*all_to_all)(lt_comm *c, const void *send, const int64_t *send_counts, void *recv,
                      const int64_t *recv_counts, lt_dtype dtype, char *err, size_t errlen);
    int (*broadcast)(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen);
    /* Point-to-point (blocking send and recv are batches of one); what names the call in messages
     * ("send", "recv", "batch_p2p"). */
    int (*batch_p2p)(lt_comm *c, const lt_comm_p2p_op *ops, int n, const char *what, char *err, size_t errlen);
    int (*barrier)(lt_comm *c, char *err, size_t errlen);
    /* Marks the whole job failed (best effort, never blocks). */
    void (*abort)(lt_comm *c, const char *reason);
    /* A communicator of the same backend over `world_ranks` (n world ranks, ascending in parent
     * order); the caller is position `rank`. Returns the backend state for the new communicator
     * (stored in its impl) or NULL with err. */
    void *(*group)(lt_comm *parent, lt_comm *child, char *err, size_t errlen);
    /* Releases the backend state (never blocks on other ranks). */
    void (*free)(lt_comm *c);
    /* Brings c back in step with its peers after an interrupt (lt_comm_resync: every rank idle);
     * 0, or -1 with err when it cannot (the job was aborted). NULL: the backend cannot, c is then
     * marked failed. */
    int (*resync)(lt_comm *c, char *err, size_t errlen);
} lt_comm_ops;

#define LT_COMM_NAME_MAX 48
#define LT_COMM_ERR_MAX 512

struct lt_comm {
    const lt_comm_ops *ops;
    void *impl;
    int rank, size;
    int *world_ranks; /* size entries: world rank of each member */
    char name[LT_COMM_NAME_MAX];
    double timeout_s;
    lt_comm_stats stats;
    int failed;                  /* a call failed: the communicator is unusable */
    char failure[LT_COMM_ERR_MAX]; /* the first failure, repeated by later calls */
    struct lt_comm_async *async;   /* the background thread of non-blocking calls (async.c), or NULL */
    int interrupt_hit;             /* the backend call failing now was interrupted (lt_comm_interrupted_) */
    struct lt_comm *prev, *next;   /* every communicator of the process (for lt_comm_resync) */
};

/* Waits until no non-blocking request of c is pending (a no-op on its own background thread);
 * the time counts as blocked (lt_comm_async_stats). */
void lt_comm_async_drain_(lt_comm *c);
/* Stops and joins c's background thread (after draining). */
void lt_comm_async_free_(lt_comm *c);
/* Guard c->stats, c->failed and c->failure, which the background thread also updates (no-ops
 * while c has no background thread). Never held across a backend call. */
void lt_comm_lock_(const lt_comm *c);
void lt_comm_unlock_(const lt_comm *c);
/* Zeroes the async statistics; called with lt_comm_lock_ held. */
void lt_comm_async_reset_stats_(lt_comm *c);

/* A communicator shell (ops/impl filled by the caller); NULL when out of memory. world_ranks is
 * copied; NULL means the identity (a world communicator). */
lt_comm *lt_comm_alloc_(const lt_comm_ops *ops, int rank, int size, const int *world_ranks, const char *name,
                        double timeout_s);
/* Frees the shell only (not the backend state). */
void lt_comm_free_shell_(lt_comm *c);

/* For a backend whose wait saw lt_comm_interrupt_pending(): writes "<what> on <communicator>
 * interrupted (Ctrl-C)" into err and tells comm.c that this failure is an interrupt (the
 * communicator is then not marked failed). */
void lt_comm_interrupted_(lt_comm *c, const char *what, char *err, size_t errlen);

/* snprintf into err (if err/errlen allow). */
void lt_comm_errf_(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* "communicator 'dp' (ranks 0,1,2,3)" with world ranks; long lists are written as ranges. */
void lt_comm_describe_(const lt_comm *c, char *out, size_t outlen);
/* A list of world ranks: "2" / "2,5" / "0-7,9" (ranges for runs of three or more). */
void lt_comm_format_ranks_(const int *ranks, int n, char *out, size_t outlen);
const char *lt_comm_op_name_(lt_reduce_op op);
/* Monotonic seconds. */
double lt_comm_now_(void);

#endif

/* The nccl backend of lt_comm: collectives on a device backend's memory (lt_device_comm_ops, NCCL in
 * the CUDA plugin), over the same ranks as a host (shm) communicator that bootstraps it.
 *
 * Differences from the shm backend (see lt_comm_nccl in comm.h):
 * - Buffers are device memory of the backend given to lt_comm_nccl.
 * - Calls return once the collective is enqueued: its results are ordered before any device work
 *   issued later (on the backend's compute stream); the host reads them through to_host, which
 *   waits. lt_comm_barrier alone waits on the host. Statistics count calls, bytes and the time to
 *   enqueue (not the device time).
 * - Reductions follow NCCL's algorithms (bf16 reduced in bf16, not in rank order): repeatable for
 *   a fixed layout and NCCL version, not bit-identical to shm.
 * - lt_comm_group is refused: build a group's NCCL communicator with lt_comm_nccl over the host group.
 * - lt_comm_batch_p2p is one NCCL group (ncclGroupStart, ncclSend/ncclRecv per operation,
 *   ncclGroupEnd), so its operations progress together as on shm; a lone send or recv is the plain call. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm/internal.h"

typedef struct {
    const lt_device_comm_ops *ops;
    void *h;
    lt_comm *host; /* for abort: the job learns of the failure through it */
} nccl_impl;

static nccl_impl *impl(lt_comm *c) { return (nccl_impl *)c->impl; }

static int n_all_reduce(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op, char *err,
                        size_t errlen) {
    return impl(c)->ops->all_reduce(impl(c)->h, buf, count, dtype, (int)op, err, errlen);
}

static int n_reduce_scatter(lt_comm *c, const void *send, void *recv, int64_t recv_count, lt_dtype dtype,
                            lt_reduce_op op, char *err, size_t errlen) {
    return impl(c)->ops->reduce_scatter(impl(c)->h, send, recv, recv_count, dtype, (int)op, err, errlen);
}

static int n_all_gather(lt_comm *c, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                        size_t errlen) {
    return impl(c)->ops->all_gather(impl(c)->h, send, recv, send_count, dtype, err, errlen);
}

static int n_all_to_all(lt_comm *c, const void *send, const int64_t *send_counts, void *recv,
                        const int64_t *recv_counts, lt_dtype dtype, char *err, size_t errlen) {
    return impl(c)->ops->all_to_all(impl(c)->h, send, send_counts, recv, recv_counts, dtype, err, errlen);
}

static int n_broadcast(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen) {
    return impl(c)->ops->broadcast(impl(c)->h, buf, count, dtype, root, err, errlen);
}

/* One NCCL group; a lone send or recv goes through the plain calls. */
static int n_batch_p2p(lt_comm *c, const lt_comm_p2p_op *ops, int n, const char *what, char *err, size_t errlen) {
    nccl_impl *m = impl(c);
    (void)what;
    if (n == 1 && ops[0].kind == LT_P2P_SEND)
        return m->ops->send(m->h, ops[0].buf, ops[0].count, ops[0].dtype, ops[0].peer, err, errlen);
    if (n == 1) return m->ops->recv(m->h, ops[0].buf, ops[0].count, ops[0].dtype, ops[0].peer, err, errlen);
    lt_device_p2p_op *d = malloc(sizeof *d * (size_t)n);
    if (!d) {
        lt_comm_errf_(err, errlen, "batch_p2p: out of memory");
        return -1;
    }
    for (int i = 0; i < n; i++)
        d[i] = (lt_device_p2p_op){ops[i].kind == LT_P2P_SEND, ops[i].buf, ops[i].count, ops[i].dtype, ops[i].peer};
    int rc = m->ops->batch_p2p(m->h, d, n, err, errlen);
    free(d);
    return rc;
}

static int n_barrier(lt_comm *c, char *err, size_t errlen) { return impl(c)->ops->barrier(impl(c)->h, err, errlen); }

static void n_abort(lt_comm *c, const char *reason) {
    nccl_impl *n = impl(c);
    if (!n) return;
    n->ops->abort(n->h);
    if (n->host) lt_comm_abort(n->host, reason); /* the other ranks' host collectives fail promptly */
}

static void *n_group(lt_comm *parent, lt_comm *child, char *err, size_t errlen) {
    (void)child;
    lt_comm_errf_(err, errlen,
                  "NCCL communicator '%s' cannot make groups: make the group on the host communicator "
                  "(lt_comm_group) and an NCCL communicator over it with lt_comm_nccl",
                  parent->name);
    return NULL;
}

static void n_free(lt_comm *c) {
    nccl_impl *n = impl(c);
    if (!n) return;
    n->ops->destroy(n->h);
    free(n);
    c->impl = NULL;
}

static const lt_comm_ops nccl_ops = {
    .backend = "nccl",
    .all_reduce = n_all_reduce,
    .reduce_scatter = n_reduce_scatter,
    .all_gather = n_all_gather,
    .all_to_all = n_all_to_all,
    .broadcast = n_broadcast,
    .batch_p2p = n_batch_p2p,
    .barrier = n_barrier,
    .abort = n_abort,
    .group = n_group,
    .free = n_free,
};

/* What rank 0 hands every rank over the host communicator: its unique id, or why there is none. */
typedef struct {
    int32_t ok;
    char id[LT_DEVICE_COMM_ID_BYTES];
    char why[380];
} nccl_hello;

lt_comm *lt_comm_nccl(lt_comm *host, const char *device, const lt_device_comm_ops *dev, char *err, size_t errlen) {
    if (!host) {
        lt_comm_errf_(err, errlen, "lt_comm_nccl: no host communicator");
        return NULL;
    }
    char desc[256];
    lt_comm_describe_(host, desc, sizeof desc);
    if (!dev) {
        lt_comm_errf_(err, errlen,
                      "NCCL over %s: device \"%s\" has no device collectives (NCCL needs device \"cuda\"; "
                      "host tensors use the host communicator)",
                      desc, device ? device : "?");
        return NULL;
    }
    nccl_hello hello;
    memset(&hello, 0, sizeof hello);
    if (lt_comm_rank(host) == 0) {
        char e[sizeof hello.why] = "";
        hello.ok = dev->unique_id(hello.id, sizeof hello.id, e, sizeof e) == 0;
        if (!hello.ok) snprintf(hello.why, sizeof hello.why, "%s", e[0] ? e : "no NCCL unique id");
    }
    char e[LT_COMM_ERR_MAX] = "";
    if (lt_comm_broadcast(host, &hello, (int64_t)(sizeof hello / 4), LT_I32, 0, e, sizeof e) != 0) {
        lt_comm_errf_(err, errlen, "NCCL over %s: handing out the unique id failed: %s", desc, e);
        return NULL;
    }
    hello.why[sizeof hello.why - 1] = '\0';
    if (!hello.ok) {
        if (lt_comm_rank(host) == 0) lt_comm_errf_(err, errlen, "NCCL over %s: %s", desc, hello.why);
        else lt_comm_errf_(err, errlen, "NCCL over %s: rank 0 could not start NCCL: %s", desc, hello.why);
        return NULL;
    }
    nccl_impl *n = calloc(1, sizeof *n);
    char name[LT_COMM_NAME_MAX];
    snprintf(name, sizeof name, "%.40s/nccl", lt_comm_name(host));
    lt_comm *c = n ? lt_comm_alloc_(&nccl_ops, host->rank, host->size, host->world_ranks, name, host->timeout_s)
                   : NULL;
    if (!c) {
        free(n);
        lt_comm_errf_(err, errlen, "NCCL over %s: out of memory", desc);
        return NULL;
    }
    n->ops = dev;
    n->host = host;
    n->h = dev->init(hello.id, host->size, host->rank, e, sizeof e);
    if (!n->h) {
        lt_comm_errf_(err, errlen, "NCCL over %s, rank %d: %s", desc, host->rank, e);
        free(n);
        lt_comm_free_shell_(c);
        return NULL;
    }
    c->impl = n;
    return c;
}

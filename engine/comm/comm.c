/* Communicators, backend-independent part: argument checks, statistics, names and world ranks,
 * then a call through the backend's table (engine/comm/internal.h). Byte accounting (per call,
 * this rank, integer arithmetic with N = size, B = element size):
 *   all_reduce      floor(2 (N-1) count B / N)
 *   reduce_scatter  (N-1) recv_count B          ((N-1)/N of the full N recv_count buffer)
 *   all_gather      (N-1) send_count B          ((N-1)/N of the full N send_count buffer)
 *   all_to_all      sum over r != rank of send_counts[r] B   (what this rank sends to others)
 *   broadcast       count B on every rank (root included)
 *   send            count B;   recv 0;   barrier 0
 *   batch_p2p       one call per operation; bytes: the sends' count B
 * Every call, failed or not, counts in calls and seconds; bytes only count on success. A
 * non-blocking request (async.c) runs these same functions on the communicator's background
 * thread, so it counts identically, its seconds being the background thread's time. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/comm/internal.h"

/* Every communicator of the process, for lt_comm_quiesce/lt_comm_resync (bottom of this file). */
static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static lt_comm *registry;

double lt_comm_now_(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void lt_comm_errf_(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void lt_comm_format_ranks_(const int *ranks, int n, char *out, size_t outlen) {
    if (!out || outlen == 0) return;
    out[0] = '\0';
    size_t len = 0;
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && ranks[j + 1] == ranks[j] + 1) j++;
        char piece[48];
        if (j - i >= 2)
            snprintf(piece, sizeof piece, "%s%d-%d", i ? "," : "", ranks[i], ranks[j]);
        else if (j == i + 1)
            snprintf(piece, sizeof piece, "%s%d,%d", i ? "," : "", ranks[i], ranks[j]);
        else
            snprintf(piece, sizeof piece, "%s%d", i ? "," : "", ranks[i]);
        size_t pl = strlen(piece);
        if (len + pl + 4 >= outlen) {
            snprintf(out + len, outlen - len, "...");
            return;
        }
        memcpy(out + len, piece, pl + 1);
        len += pl;
        i = j + 1;
    }
}

void lt_comm_describe_(const lt_comm *c, char *out, size_t outlen) {
    char ranks[160];
    if (c->size <= 8) { /* short lists in full: "ranks 0,1,2,3" */
        size_t len = 0;
        ranks[0] = '\0';
        for (int i = 0; i < c->size; i++)
            len += (size_t)snprintf(ranks + len, sizeof ranks - len, "%s%d", i ? "," : "", c->world_ranks[i]);
    } else {
        lt_comm_format_ranks_(c->world_ranks, c->size, ranks, sizeof ranks);
    }
    snprintf(out, outlen, "communicator '%s' (rank%s %s)", c->name, c->size == 1 ? "" : "s", ranks);
}

const char *lt_comm_op_name_(lt_reduce_op op) {
    switch (op) {
    case LT_REDUCE_SUM: return "sum";
    case LT_REDUCE_AVG: return "avg";
    case LT_REDUCE_MAX: return "max";
    }
    return "?";
}

lt_comm *lt_comm_alloc_(const lt_comm_ops *ops, int rank, int size, const int *world_ranks, const char *name,
                        double timeout_s) {
    lt_comm *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->world_ranks = malloc(sizeof(int) * (size_t)(size > 0 ? size : 1));
    if (!c->world_ranks) {
        free(c);
        return NULL;
    }
    for (int i = 0; i < size; i++) c->world_ranks[i] = world_ranks ? world_ranks[i] : i;
    c->ops = ops;
    c->rank = rank;
    c->size = size;
    c->timeout_s = timeout_s;
    snprintf(c->name, sizeof c->name, "%s", name && name[0] ? name : "?");
    pthread_mutex_lock(&registry_mu);
    c->next = registry;
    if (registry) registry->prev = c;
    registry = c;
    pthread_mutex_unlock(&registry_mu);
    return c;
}

void lt_comm_free_shell_(lt_comm *c) {
    if (!c) return;
    pthread_mutex_lock(&registry_mu);
    if (c->prev) c->prev->next = c->next;
    else registry = c->next;
    if (c->next) c->next->prev = c->prev;
    pthread_mutex_unlock(&registry_mu);
    free(c->world_ranks);
    free(c);
}

void lt_comm_free(lt_comm *c) {
    if (!c) return;
    lt_comm_async_free_(c);
    if (c->ops && c->ops->free) c->ops->free(c);
    lt_comm_free_shell_(c);
}

int lt_comm_rank(const lt_comm *c) { return c ? c->rank : -1; }
int lt_comm_size(const lt_comm *c) { return c ? c->size : 0; }
const char *lt_comm_name(const lt_comm *c) { return c ? c->name : "?"; }
int lt_comm_world_rank(const lt_comm *c, int r) { return c && r >= 0 && r < c->size ? c->world_ranks[r] : -1; }

lt_comm_stats lt_comm_get_stats(const lt_comm *c) {
    lt_comm_stats z = {0, 0, 0.0};
    if (!c) return z;
    lt_comm_lock_(c); /* the background thread may be counting a request */
    z = c->stats;
    lt_comm_unlock_(c);
    return z;
}

void lt_comm_reset_stats(lt_comm *c) {
    if (!c) return;
    lt_comm_lock_(c);
    memset(&c->stats, 0, sizeof c->stats);
    lt_comm_async_reset_stats_(c);
    lt_comm_unlock_(c);
}

lt_comm *lt_comm_group(lt_comm *parent, const int *ranks, int n, const char *name, char *err, size_t errlen) {
    if (!parent) {
        lt_comm_errf_(err, errlen, "lt_comm_group: no parent communicator");
        return NULL;
    }
    char desc[256];
    lt_comm_describe_(parent, desc, sizeof desc);
    lt_comm_async_drain_(parent); /* creating a group runs collectives on the parent */
    if (parent->failed) {
        lt_comm_errf_(err, errlen, "group '%s' of %s: the parent is unusable after an earlier failure: %s",
                      name ? name : "?", desc, parent->failure);
        return NULL;
    }
    if (lt_comm_interrupt_pending()) {
        lt_comm_errf_(err, errlen, "group '%s' of %s interrupted (Ctrl-C)", name ? name : "?", desc);
        return NULL;
    }
    if (!ranks || n < 1 || n > parent->size) {
        lt_comm_errf_(err, errlen, "group '%s' of %s: %d ranks is not a valid group size", name ? name : "?", desc,
                      n);
        return NULL;
    }
    int me = -1;
    for (int i = 0; i < n; i++) {
        if (ranks[i] < 0 || ranks[i] >= parent->size || (i > 0 && ranks[i] <= ranks[i - 1])) {
            lt_comm_errf_(err, errlen,
                          "group '%s' of %s: ranks must be ascending ranks of the parent (entry %d is %d)",
                          name ? name : "?", desc, i, ranks[i]);
            return NULL;
        }
        if (ranks[i] == parent->rank) me = i;
    }
    if (me < 0) {
        lt_comm_errf_(err, errlen, "group '%s' of %s: rank %d is not in the list it was called with",
                      name ? name : "?", desc, parent->rank);
        return NULL;
    }
    int *world = malloc(sizeof(int) * (size_t)n);
    if (!world) {
        lt_comm_errf_(err, errlen, "group '%s': out of memory", name ? name : "?");
        return NULL;
    }
    for (int i = 0; i < n; i++) world[i] = parent->world_ranks[ranks[i]];
    lt_comm *c = lt_comm_alloc_(parent->ops, me, n, world, name, parent->timeout_s);
    free(world);
    if (!c) {
        lt_comm_errf_(err, errlen, "group '%s': out of memory", name ? name : "?");
        return NULL;
    }
    c->impl = parent->ops->group(parent, c, err, errlen);
    if (!c->impl) {
        lt_comm_free_shell_(c);
        return NULL;
    }
    return c;
}

/* ---- collectives: checks, timing, statistics, dispatch ---- */

static int valid_dtype(lt_dtype d) { return d == LT_F32 || d == LT_BF16 || d == LT_I32 || d == LT_I64; }

static int precheck(lt_comm *c, const char *what, lt_dtype dtype, int check_dtype, char *err, size_t errlen) {
    if (!c) {
        lt_comm_errf_(err, errlen, "%s: no communicator", what);
        return -1;
    }
    lt_comm_async_drain_(c); /* keep the order of collectives the same on every rank */
    lt_comm_lock_(c);         /* (lt_comm_abort may be writing the failure meanwhile) */
    int failed = c->failed;
    if (failed)
        lt_comm_errf_(err, errlen, "%s: the communicator is unusable after an earlier failure: %s", what,
                      c->failure);
    lt_comm_unlock_(c);
    if (failed) return -1;
    if (lt_comm_interrupt_pending()) { /* the rest of an interrupted line fails at once, in step */
        char desc[256];
        lt_comm_describe_(c, desc, sizeof desc);
        lt_comm_errf_(err, errlen, "%s on %s interrupted (Ctrl-C)", what, desc);
        return -1;
    }
    if (check_dtype && !valid_dtype(dtype)) {
        char desc[256];
        lt_comm_describe_(c, desc, sizeof desc);
        lt_comm_errf_(err, errlen, "%s on %s: unknown dtype %d", what, desc, (int)dtype);
        return -1;
    }
    return 0;
}

static int arg_error(lt_comm *c, const char *what, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int arg_error(lt_comm *c, const char *what, char *err, size_t errlen, const char *fmt, ...) {
    char desc[256], msg[256];
    lt_comm_describe_(c, desc, sizeof desc);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lt_comm_errf_(err, errlen, "%s on %s: %s", what, desc, msg);
    return -1;
}

/* Records the outcome: time, calls, bytes (on success), failure state. */
static int finish(lt_comm *c, int rc, double t0, uint64_t bytes, const char *e, char *err, size_t errlen) {
    double dt = lt_comm_now_() - t0;
    lt_comm_lock_(c);
    c->stats.calls++;
    c->stats.seconds += dt;
    int interrupted = c->interrupt_hit; /* not a failure: lt_comm_resync makes c usable again */
    c->interrupt_hit = 0;
    if (rc == 0) c->stats.bytes += bytes;
    else if (!c->failed && !interrupted) { /* keep the first failure (an abort may have come first) */
        c->failed = 1;
        snprintf(c->failure, sizeof c->failure, "%s", e[0] ? e : "failed");
    }
    lt_comm_unlock_(c);
    if (rc == 0) return 0;
    lt_comm_errf_(err, errlen, "%s", e[0] ? e : "failed");
    return -1;
}

int lt_comm_all_reduce(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op, char *err,
                       size_t errlen) {
    if (precheck(c, "all_reduce", dtype, 1, err, errlen)) return -1;
    if (count < 0) return arg_error(c, "all_reduce", err, errlen, "negative count %lld", (long long)count);
    if (count > 0 && !buf) return arg_error(c, "all_reduce", err, errlen, "no buffer");
    if (op != LT_REDUCE_SUM && op != LT_REDUCE_AVG && op != LT_REDUCE_MAX)
        return arg_error(c, "all_reduce", err, errlen, "unknown reduce op %d", (int)op);
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->all_reduce(c, buf, count, dtype, op, e, sizeof e);
    uint64_t n = (uint64_t)c->size, b = (uint64_t)count * lt_dtype_size(dtype);
    return finish(c, rc, t0, 2 * (n - 1) * b / n, e, err, errlen);
}

int lt_comm_reduce_scatter(lt_comm *c, const void *send, void *recv, int64_t recv_count, lt_dtype dtype,
                           lt_reduce_op op, char *err, size_t errlen) {
    if (precheck(c, "reduce_scatter", dtype, 1, err, errlen)) return -1;
    if (recv_count < 0)
        return arg_error(c, "reduce_scatter", err, errlen, "negative count %lld", (long long)recv_count);
    if (recv_count > 0 && (!send || !recv)) return arg_error(c, "reduce_scatter", err, errlen, "no buffer");
    if (op != LT_REDUCE_SUM && op != LT_REDUCE_AVG && op != LT_REDUCE_MAX)
        return arg_error(c, "reduce_scatter", err, errlen, "unknown reduce op %d", (int)op);
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->reduce_scatter(c, send, recv, recv_count, dtype, op, e, sizeof e);
    uint64_t n = (uint64_t)c->size, b = (uint64_t)recv_count * lt_dtype_size(dtype);
    return finish(c, rc, t0, (n - 1) * b, e, err, errlen);
}

int lt_comm_all_gather(lt_comm *c, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                       size_t errlen) {
    if (precheck(c, "all_gather", dtype, 1, err, errlen)) return -1;
    if (send_count < 0)
        return arg_error(c, "all_gather", err, errlen, "negative count %lld", (long long)send_count);
    if (send_count > 0 && (!send || !recv)) return arg_error(c, "all_gather", err, errlen, "no buffer");
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->all_gather(c, send, recv, send_count, dtype, e, sizeof e);
    uint64_t n = (uint64_t)c->size, b = (uint64_t)send_count * lt_dtype_size(dtype);
    return finish(c, rc, t0, (n - 1) * b, e, err, errlen);
}

int lt_comm_all_to_all(lt_comm *c, const void *send, const int64_t *send_counts, void *recv,
                       const int64_t *recv_counts, lt_dtype dtype, char *err, size_t errlen) {
    if (precheck(c, "all_to_all", dtype, 1, err, errlen)) return -1;
    if (!send_counts || !recv_counts) return arg_error(c, "all_to_all", err, errlen, "no counts");
    uint64_t sent = 0;
    int64_t stot = 0, rtot = 0;
    for (int r = 0; r < c->size; r++) {
        if (send_counts[r] < 0 || recv_counts[r] < 0)
            return arg_error(c, "all_to_all", err, errlen, "negative count for rank %d", r);
        stot += send_counts[r];
        rtot += recv_counts[r];
        if (r != c->rank) sent += (uint64_t)send_counts[r] * lt_dtype_size(dtype);
    }
    if ((stot > 0 && !send) || (rtot > 0 && !recv)) return arg_error(c, "all_to_all", err, errlen, "no buffer");
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->all_to_all(c, send, send_counts, recv, recv_counts, dtype, e, sizeof e);
    return finish(c, rc, t0, sent, e, err, errlen);
}

int lt_comm_broadcast(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen) {
    if (precheck(c, "broadcast", dtype, 1, err, errlen)) return -1;
    if (count < 0) return arg_error(c, "broadcast", err, errlen, "negative count %lld", (long long)count);
    if (count > 0 && !buf) return arg_error(c, "broadcast", err, errlen, "no buffer");
    if (root < 0 || root >= c->size)
        return arg_error(c, "broadcast", err, errlen, "root %d is not a rank of the communicator", root);
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->broadcast(c, buf, count, dtype, root, e, sizeof e);
    return finish(c, rc, t0, (uint64_t)count * lt_dtype_size(dtype), e, err, errlen);
}

/* Point-to-point: every form is a batch. `what` names the call in messages ("send", "recv",
 * "batch_p2p"); each operation counts as one call, bytes are the sends' bytes. */
static int p2p(lt_comm *c, const lt_comm_p2p_op *ops, int n, const char *what, char *err, size_t errlen) {
    if (precheck(c, what, LT_F32, 0, err, errlen)) return -1;
    if (n < 0) return arg_error(c, what, err, errlen, "negative number of operations %d", n);
    if (n > 0 && !ops) return arg_error(c, what, err, errlen, "no operations");
    uint64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        const lt_comm_p2p_op *o = &ops[i];
        char at[48] = "";
        if (n > 1 || strcmp(what, "batch_p2p") == 0) snprintf(at, sizeof at, "operation %d: ", i);
        if (o->kind != LT_P2P_SEND && o->kind != LT_P2P_RECV)
            return arg_error(c, what, err, errlen, "%sunknown kind %d (LT_P2P_SEND or LT_P2P_RECV)", at,
                             (int)o->kind);
        if (!valid_dtype(o->dtype)) return arg_error(c, what, err, errlen, "%sunknown dtype %d", at, (int)o->dtype);
        if (o->count < 0) return arg_error(c, what, err, errlen, "%snegative count %lld", at, (long long)o->count);
        if (o->count > 0 && !o->buf) return arg_error(c, what, err, errlen, "%sno buffer", at);
        if (o->peer < 0 || o->peer >= c->size || o->peer == c->rank)
            return arg_error(c, what, err, errlen, "%speer %d is not another rank of the communicator", at,
                             o->peer);
        if (o->kind == LT_P2P_SEND) bytes += (uint64_t)o->count * lt_dtype_size(o->dtype);
    }
    if (n == 0) return 0; /* an empty batch is no call */
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->batch_p2p(c, ops, n, what, e, sizeof e);
    /* finish counts one call; the other operations of the batch count here */
    if (n > 1) {
        lt_comm_lock_(c);
        c->stats.calls += (uint64_t)(n - 1);
        lt_comm_unlock_(c);
    }
    return finish(c, rc, t0, bytes, e, err, errlen);
}

int lt_comm_send(lt_comm *c, const void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen) {
    lt_comm_p2p_op op = {LT_P2P_SEND, (void *)buf, count, dtype, peer};
    return p2p(c, &op, 1, "send", err, errlen);
}

int lt_comm_recv(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen) {
    lt_comm_p2p_op op = {LT_P2P_RECV, buf, count, dtype, peer};
    return p2p(c, &op, 1, "recv", err, errlen);
}

int lt_comm_batch_p2p(lt_comm *c, const lt_comm_p2p_op *ops, int n, char *err, size_t errlen) {
    return p2p(c, ops, n, "batch_p2p", err, errlen);
}

int lt_comm_barrier(lt_comm *c, char *err, size_t errlen) {
    if (precheck(c, "barrier", LT_F32, 0, err, errlen)) return -1;
    double t0 = lt_comm_now_();
    char e[LT_COMM_ERR_MAX] = "";
    int rc = c->ops->barrier(c, e, sizeof e);
    return finish(c, rc, t0, 0, e, err, errlen);
}

void lt_comm_abort(lt_comm *c, const char *reason) {
    if (!c) return;
    if (c->ops && c->ops->abort) c->ops->abort(c, reason ? reason : "");
    lt_comm_lock_(c); /* never held across a collective: abort does not wait for one */
    if (!c->failed) {
        c->failed = 1;
        snprintf(c->failure, sizeof c->failure, "this rank aborted: %s", reason ? reason : "");
    }
    lt_comm_unlock_(c);
}

/* ---- interrupts and resynchronisation (comm.h) ---- */

/* Lock-free, so a signal handler may set it; read by every thread's waits. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "the interrupt flag must be lock-free");
static atomic_int interrupt_flag;

void lt_comm_interrupt(void) { atomic_store(&interrupt_flag, 1); }

int lt_comm_interrupt_pending(void) { return atomic_load_explicit(&interrupt_flag, memory_order_relaxed); }

void lt_comm_interrupted_(lt_comm *c, const char *what, char *err, size_t errlen) {
    char desc[256];
    lt_comm_describe_(c, desc, sizeof desc);
    lt_comm_errf_(err, errlen, "%s on %s interrupted (Ctrl-C)", what, desc);
    c->interrupt_hit = 1;
}

void lt_comm_quiesce(void) {
    lt_comm_interrupt(); /* so requests still waiting, or queued, end at once */
    pthread_mutex_lock(&registry_mu);
    for (lt_comm *c = registry; c; c = c->next) lt_comm_async_drain_(c);
    pthread_mutex_unlock(&registry_mu);
}

int lt_comm_resync(char *err, size_t errlen) {
    int rc = 0;
    pthread_mutex_lock(&registry_mu);
    for (lt_comm *c = registry; c; c = c->next) {
        if (!c->impl) continue; /* a shell being created or freed */
        lt_comm_async_drain_(c);
        lt_comm_lock_(c);
        int failed = c->failed;
        lt_comm_unlock_(c);
        if (failed) continue; /* a real failure stays */
        char e[LT_COMM_ERR_MAX] = "";
        if (c->ops->resync) {
            if (c->ops->resync(c, e, sizeof e) == 0) continue;
        } else {
            char desc[256];
            lt_comm_describe_(c, desc, sizeof desc);
            lt_comm_errf_(e, sizeof e,
                          "%s (%s) cannot be resynchronised after an interrupt (Ctrl-C): a collective may be "
                          "left waiting on the device; create a new one (core.comm_nccl)",
                          desc, c->ops->backend);
        }
        lt_comm_lock_(c);
        if (!c->failed) {
            c->failed = 1;
            snprintf(c->failure, sizeof c->failure, "%s", e);
        }
        lt_comm_unlock_(c);
        if (rc == 0) lt_comm_errf_(err, errlen, "%s", e);
        rc = -1;
    }
    atomic_store(&interrupt_flag, 0);
    pthread_mutex_unlock(&registry_mu);
    return rc;
}

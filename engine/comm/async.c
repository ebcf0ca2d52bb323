/* Non-blocking collectives (and point-to-point batches, lt_comm_batch_p2p_async): a FIFO of
 * requests per communicator, served by one background thread that runs the ordinary blocking
 * calls (so checks, messages, timeouts, abort handling and statistics are exactly those of the
 * blocking calls). Order is what keeps ranks in step: every
 * rank issues the same collectives in the same order, and the thread runs them in that order.
 *
 * Threads: the caller's thread (one per communicator: the one that issues, waits and calls the
 * blocking collectives) and the background thread. The mutex `mu` of lt_comm_async guards the
 * queue, the requests' done/rc/err, the async statistics, and (through lt_comm_lock_) the
 * communicator's statistics and failure state, which both threads update. The communicator's
 * backend state is only ever used by one thread at a time: the background thread while a request
 * runs, the caller only after draining the queue (every blocking call, lt_comm_group, free).
 *
 * The thread is started by the first non-blocking call, sleeps on a condition variable while the
 * queue is empty (no spinning: it costs no CPU between requests), runs with every signal blocked
 * (handlers stay on the caller's threads) and is joined by lt_comm_free. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm/internal.h"

typedef enum { REQ_ALL_REDUCE, REQ_REDUCE_SCATTER, REQ_ALL_GATHER, REQ_BATCH_P2P } req_kind;

typedef struct lt_comm_async {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work;     /* the queue got a request, or stop */
    pthread_cond_t finished; /* a request finished */
    lt_comm_request *head, *tail;
    int pending; /* queued or running */
    int stop;
    lt_comm_async_stats stats;
} lt_comm_async;

struct lt_comm_request {
    lt_comm *c;
    lt_comm_async *a;
    req_kind kind;
    void *buf; /* all_reduce: in/out; reduce_scatter, all_gather: recv */
    const void *send;
    int64_t count;
    lt_dtype dtype;
    lt_reduce_op op;
    lt_comm_p2p_op *ops; /* REQ_BATCH_P2P: a copy of the caller's operations */
    int nops;
    int done, rc; /* under a->mu */
    char err[LT_COMM_ERR_MAX];
    struct lt_comm_request *next;
};

/* Set on background threads: their blocking calls must not wait for their own queue. */
static _Thread_local int on_worker;

static void run(lt_comm_request *r) {
    switch (r->kind) {
    case REQ_ALL_REDUCE:
        r->rc = lt_comm_all_reduce(r->c, r->buf, r->count, r->dtype, r->op, r->err, sizeof r->err);
        break;
    case REQ_REDUCE_SCATTER:
        r->rc = lt_comm_reduce_scatter(r->c, r->send, r->buf, r->count, r->dtype, r->op, r->err, sizeof r->err);
        break;
    case REQ_ALL_GATHER:
        r->rc = lt_comm_all_gather(r->c, r->send, r->buf, r->count, r->dtype, r->err, sizeof r->err);
        break;
    case REQ_BATCH_P2P: r->rc = lt_comm_batch_p2p(r->c, r->ops, r->nops, r->err, sizeof r->err); break;
    }
}

static void *worker(void *arg) {
    lt_comm_async *a = arg;
    on_worker = 1;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->head && !a->stop) pthread_cond_wait(&a->work, &a->mu);
        if (!a->head) break; /* stop, and nothing left */
        lt_comm_request *r = a->head;
        a->head = r->next;
        if (!a->head) a->tail = NULL;
        pthread_mutex_unlock(&a->mu);
        double t0 = lt_comm_now_();
        run(r);
        double dt = lt_comm_now_() - t0;
        pthread_mutex_lock(&a->mu);
        a->stats.requests++;
        a->stats.seconds += dt;
        r->done = 1; /* from here on r belongs to its waiter (which may free it) */
        a->pending--;
        pthread_cond_broadcast(&a->finished);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

static lt_comm_async *start_async(lt_comm *c) {
    if (c->async) return c->async;
    lt_comm_async *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->work, NULL);
    pthread_cond_init(&a->finished, NULL);
    /* The thread inherits the signal mask: block everything so signals reach the caller's threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&a->thread, NULL, worker, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&a->work);
        pthread_cond_destroy(&a->finished);
        pthread_mutex_destroy(&a->mu);
        free(a);
        return NULL;
    }
    c->async = a;
    return a;
}

static void free_request(lt_comm_request *r) {
    free(r->ops);
    free(r);
}

/* Queues r (filled but for c, a); frees it and returns NULL when the thread cannot start. */
static lt_comm_request *enqueue(lt_comm *c, lt_comm_request *r) {
    lt_comm_async *a = start_async(c);
    if (!a) {
        free_request(r);
        return NULL;
    }
    r->c = c;
    r->a = a;
    pthread_mutex_lock(&a->mu);
    if (a->tail) a->tail->next = r;
    else a->head = r;
    a->tail = r;
    a->pending++;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    return r;
}

static lt_comm_request *submit(lt_comm *c, req_kind kind, void *buf, const void *send, int64_t count,
                               lt_dtype dtype, lt_reduce_op op) {
    if (!c) return NULL;
    lt_comm_request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    *r = (lt_comm_request){.kind = kind, .buf = buf, .send = send, .count = count, .dtype = dtype, .op = op};
    return enqueue(c, r);
}

lt_comm_request *lt_comm_batch_p2p_async(lt_comm *c, const lt_comm_p2p_op *ops, int n) {
    if (!c) return NULL;
    lt_comm_request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->kind = REQ_BATCH_P2P;
    r->nops = n;
    if (n > 0 && ops) { /* argument errors (n < 0, no ops) are reported by the batch at lt_comm_wait */
        r->ops = malloc(sizeof *r->ops * (size_t)n);
        if (!r->ops) {
            free(r);
            return NULL;
        }
        memcpy(r->ops, ops, sizeof *r->ops * (size_t)n);
    }
    return enqueue(c, r);
}

lt_comm_request *lt_comm_all_reduce_async(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op) {
    return submit(c, REQ_ALL_REDUCE, buf, NULL, count, dtype, op);
}

lt_comm_request *lt_comm_reduce_scatter_async(lt_comm *c, const void *send, void *recv, int64_t recv_count,
                                              lt_dtype dtype, lt_reduce_op op) {
    return submit(c, REQ_REDUCE_SCATTER, recv, send, recv_count, dtype, op);
}

lt_comm_request *lt_comm_all_gather_async(lt_comm *c, const void *send, void *recv, int64_t send_count,
                                          lt_dtype dtype) {
    return submit(c, REQ_ALL_GATHER, recv, send, send_count, dtype, LT_REDUCE_SUM);
}

int lt_comm_wait(lt_comm_request *r, char *err, size_t errlen) {
    if (!r) {
        lt_comm_errf_(err, errlen, "wait: no request (it could not be started: no communicator or out of memory)");
        return -1;
    }
    lt_comm_async *a = r->a;
    pthread_mutex_lock(&a->mu);
    if (!r->done) {
        double t0 = lt_comm_now_();
        while (!r->done) pthread_cond_wait(&a->finished, &a->mu);
        a->stats.blocked_seconds += lt_comm_now_() - t0;
    }
    pthread_mutex_unlock(&a->mu);
    int rc = r->rc;
    if (rc != 0) lt_comm_errf_(err, errlen, "%s", r->err);
    free_request(r);
    return rc;
}

int lt_comm_test(const lt_comm_request *r) {
    if (!r) return 1;
    lt_comm_async *a = r->a;
    pthread_mutex_lock(&a->mu);
    int done = r->done;
    pthread_mutex_unlock(&a->mu);
    return done;
}

lt_comm_async_stats lt_comm_get_async_stats(const lt_comm *c) {
    lt_comm_async_stats s = {0, 0.0, 0.0};
    if (!c || !c->async) return s;
    pthread_mutex_lock(&c->async->mu);
    s = c->async->stats;
    pthread_mutex_unlock(&c->async->mu);
    return s;
}

/* ---- for comm.c ---- */

void lt_comm_lock_(const lt_comm *c) {
    if (c->async) pthread_mutex_lock(&c->async->mu);
}

void lt_comm_unlock_(const lt_comm *c) {
    if (c->async) pthread_mutex_unlock(&c->async->mu);
}

void lt_comm_async_reset_stats_(lt_comm *c) { /* called with lt_comm_lock_ held */
    if (c->async) memset(&c->async->stats, 0, sizeof c->async->stats);
}

void lt_comm_async_drain_(lt_comm *c) {
    lt_comm_async *a = c->async;
    if (!a || on_worker) return;
    pthread_mutex_lock(&a->mu);
    if (a->pending > 0) {
        double t0 = lt_comm_now_();
        while (a->pending > 0) pthread_cond_wait(&a->finished, &a->mu);
        a->stats.blocked_seconds += lt_comm_now_() - t0;
    }
    pthread_mutex_unlock(&a->mu);
}

void lt_comm_async_free_(lt_comm *c) {
    lt_comm_async *a = c->async;
    if (!a) return;
    lt_comm_async_drain_(c);
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    pthread_join(a->thread, NULL);
    pthread_cond_destroy(&a->work);
    pthread_cond_destroy(&a->finished);
    pthread_mutex_destroy(&a->mu);
    free(a);
    c->async = NULL;
}

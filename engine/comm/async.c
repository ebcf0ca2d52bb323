/* Non-blocking collectives: a FIFO of requests per communicator, served by one background thread
 * that runs the ordinary blocking calls. Order is what keeps ranks in step: every rank issues the
 * same collectives in the same order, and the thread runs them in that order. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm/internal.h"

typedef enum { REQ_ALL_REDUCE, REQ_REDUCE_SCATTER, REQ_ALL_GATHER } req_kind;

struct lt_comm_request {
    lt_comm *c;
    req_kind kind;
    void *buf;
    const void *send;
    int64_t count;
    lt_dtype dtype;
    lt_reduce_op op;
    int done, rc;
    char err[LT_COMM_ERR_MAX];
    struct lt_comm_request *next;
};

typedef struct lt_comm_async {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, finished;
    lt_comm_request *head, *tail;
    int pending, stop;
} lt_comm_async;

/* Set on the background thread: its blocking calls must not wait for themselves. */
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
        run(r);
        pthread_mutex_lock(&a->mu);
        r->done = 1;
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
    if (pthread_create(&a->thread, NULL, worker, a) != 0) {
        free(a);
        return NULL;
    }
    c->async = a;
    return a;
}

static lt_comm_request *submit(lt_comm *c, lt_comm_request *r) {
    lt_comm_async *a = c ? start_async(c) : NULL;
    if (!a) {
        free(r);
        return NULL;
    }
    r->c = c;
    pthread_mutex_lock(&a->mu);
    if (a->tail) a->tail->next = r;
    else a->head = r;
    a->tail = r;
    a->pending++;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    return r;
}

static lt_comm_request *new_request(req_kind kind, void *buf, const void *send, int64_t count, lt_dtype dtype,
                                    lt_reduce_op op) {
    lt_comm_request *r = calloc(1, sizeof *r);
    if (r) *r = (lt_comm_request){.kind = kind, .buf = buf, .send = send, .count = count, .dtype = dtype, .op = op};
    return r;
}

lt_comm_request *lt_comm_all_reduce_async(lt_comm *c, void *buf, int64_t count, lt_dtype dtype, lt_reduce_op op) {
    return submit(c, new_request(REQ_ALL_REDUCE, buf, NULL, count, dtype, op));
}

lt_comm_request *lt_comm_reduce_scatter_async(lt_comm *c, const void *send, void *recv, int64_t recv_count,
                                              lt_dtype dtype, lt_reduce_op op) {
    return submit(c, new_request(REQ_REDUCE_SCATTER, recv, send, recv_count, dtype, op));
}

lt_comm_request *lt_comm_all_gather_async(lt_comm *c, const void *send, void *recv, int64_t send_count,
                                          lt_dtype dtype) {
    return submit(c, new_request(REQ_ALL_GATHER, recv, send, send_count, dtype, LT_REDUCE_SUM));
}

int lt_comm_wait(lt_comm_request *r, char *err, size_t errlen) {
    if (!r) {
        lt_comm_errf_(err, errlen, "wait: no request (it could not be started: out of memory)");
        return -1;
    }
    lt_comm_async *a = r->c->async;
    pthread_mutex_lock(&a->mu);
    while (!r->done) pthread_cond_wait(&a->finished, &a->mu);
    pthread_mutex_unlock(&a->mu);
    int rc = r->rc;
    if (rc != 0) lt_comm_errf_(err, errlen, "%s", r->err);
    free(r);
    return rc;
}

int lt_comm_test(lt_comm_request *r) {
    if (!r) return 1;
    lt_comm_async *a = r->c->async;
    pthread_mutex_lock(&a->mu);
    int done = r->done;
    pthread_mutex_unlock(&a->mu);
    return done;
}

void lt_comm_async_drain_(lt_comm *c) {
    lt_comm_async *a = c->async;
    if (!a || on_worker) return;
    pthread_mutex_lock(&a->mu);
    while (a->pending > 0) pthread_cond_wait(&a->finished, &a->mu);
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

#include "engine/parallel/ddp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int64_t first, count; /* elements of the flat buffer */
    lt_comm_request *request;
    int started;
} bucket;

struct lt_ddp {
    lt_tensor *grads;
    lt_comm *dp;
    bucket *buckets; /* buckets[0] is the last one of the buffer: the first to be ready */
    int num_buckets;
    int next; /* the next bucket to start */
    double wait_seconds;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

lt_ddp *lt_ddp_new(lt_tensor *grads, int64_t bucket_size, lt_comm *dp) {
    int64_t n = lt_tensor_numel(grads);
    if (bucket_size <= 0 || bucket_size > n) bucket_size = n > 0 ? n : 1;
    lt_ddp *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->grads = grads;
    d->dp = dp;
    d->num_buckets = (int)((n + bucket_size - 1) / bucket_size);
    d->buckets = calloc((size_t)d->num_buckets, sizeof *d->buckets);
    if (!d->buckets) {
        free(d);
        return NULL;
    }
    /* Cut from the end so the first bucket to fill is whole. */
    int64_t end = n;
    for (int i = 0; i < d->num_buckets; i++) {
        int64_t first = end - bucket_size > 0 ? end - bucket_size : 0;
        d->buckets[i] = (bucket){first, end - first, NULL, 0};
        end = first;
    }
    return d;
}

void lt_ddp_free(lt_ddp *d) {
    if (!d) return;
    char err[8];
    for (int i = 0; i < d->num_buckets; i++)
        if (d->buckets[i].request) lt_comm_wait(d->buckets[i].request, err, sizeof err);
    free(d->buckets);
    free(d);
}

int lt_ddp_num_buckets(const lt_ddp *d) { return d->num_buckets; }

void lt_ddp_begin(lt_ddp *d) {
    d->next = 0;
    d->wait_seconds = 0;
    for (int i = 0; i < d->num_buckets; i++) d->buckets[i].started = 0;
}

static void start(lt_ddp *d, bucket *b) {
    float *g = lt_tensor_data(d->grads);
    b->request = lt_comm_all_reduce_async(d->dp, g + b->first, b->count, LT_F32, LT_REDUCE_AVG);
    b->started = 1;
}

void lt_ddp_grads_ready(void *ud, int64_t first_ready) {
    lt_ddp *d = ud;
    while (d->next < d->num_buckets && d->buckets[d->next].first >= first_ready) start(d, &d->buckets[d->next++]);
}

int lt_ddp_finish(lt_ddp *d, char *err, size_t errlen) {
    while (d->next < d->num_buckets) start(d, &d->buckets[d->next++]);
    double t0 = now();
    int rc = 0;
    for (int i = 0; i < d->num_buckets; i++) {
        bucket *b = &d->buckets[i];
        if (!b->request) {
            if (rc == 0) snprintf(err, errlen, "gradient bucket %d could not be started", i);
            rc = -1;
            continue;
        }
        /* Wait for all, even after a failure, so no request is left behind. */
        char e[512];
        if (lt_comm_wait(b->request, e, sizeof e) != 0 && rc == 0) {
            snprintf(err, errlen, "%s", e);
            rc = -1;
        }
        b->request = NULL;
    }
    d->wait_seconds = now() - t0;
    return rc;
}

double lt_ddp_wait_seconds(const lt_ddp *d) { return d->wait_seconds; }

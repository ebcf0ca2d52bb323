#include "engine/parallel/ddp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/ops/backend.h"

typedef struct {
    int64_t first, count; /* elements of the flat buffer */
    lt_comm_request *request;
    lt_comm_request *gather; /* sharded: the pending parameter all-gather */
    int started;
} bucket;

struct lt_ddp {
    lt_tensor *grads;
    lt_tensor *weights, *main_params, *main_grads; /* sharded only */
    const lt_backend *be; /* whose memory holds the buffers (the grads'): main buffers and copies there */
    int sharded, dp_size, dp_rank;
    int gather_failed;
    char gather_err[512];
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
    d->be = lt_backend_of(grads);
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

lt_ddp *lt_ddp_new_sharded(lt_tensor *grads, lt_tensor *weights, int64_t bucket_size, lt_comm *dp, char *err,
                           size_t errlen) {
    int64_t n = lt_tensor_numel(grads);
    int size = lt_comm_size(dp);
    int64_t unit = 16 * (int64_t)size;
    if (n % unit != 0 || lt_tensor_numel(weights) != n) {
        snprintf(err, errlen, "sharded buckets need flat buffers of a multiple of 16 x DP = %lld elements (got %lld)",
                 (long long)unit, (long long)n);
        return NULL;
    }
    if (bucket_size <= 0 || bucket_size > n) bucket_size = n;
    bucket_size = (bucket_size + unit - 1) / unit * unit;
    lt_ddp *d = lt_ddp_new(grads, bucket_size, dp);
    if (!d) {
        snprintf(err, errlen, "out of memory for the distributed optimizer's buckets");
        return NULL;
    }
    d->sharded = 1;
    d->dp_size = size;
    d->dp_rank = lt_comm_rank(dp);
    d->weights = weights;
    int64_t shape[1] = {n / size};
    /* In the grads' memory (the GPU's with an NCCL communicator), as the buffers they exchange with. */
    d->main_params = lt_backend_tensor(d->be, LT_F32, 1, shape);
    d->main_grads = lt_backend_tensor(d->be, LT_F32, 1, shape);
    if (!d->main_params || !d->main_grads) {
        lt_ddp_free(d);
        snprintf(err, errlen, "out of memory for the distributed optimizer's main parameters");
        return NULL;
    }
    return d;
}

void lt_ddp_free(lt_ddp *d) {
    if (!d) return;
    char err[8];
    for (int i = 0; i < d->num_buckets; i++) {
        if (d->buckets[i].request) lt_comm_wait(d->buckets[i].request, err, sizeof err);
        if (d->buckets[i].gather) lt_comm_wait(d->buckets[i].gather, err, sizeof err);
    }
    lt_tensor_free(d->main_params);
    lt_tensor_free(d->main_grads);
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
    if (d->sharded) {
        float *main = (float *)lt_tensor_data(d->main_grads) + b->first / d->dp_size;
        b->request = lt_comm_reduce_scatter_async(d->dp, g + b->first, main, b->count / d->dp_size, LT_F32,
                                                  LT_REDUCE_AVG);
    } else {
        b->request = lt_comm_all_reduce_async(d->dp, g + b->first, b->count, LT_F32, LT_REDUCE_AVG);
    }
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

lt_tensor *lt_ddp_main_params(lt_ddp *d) { return d->main_params; }
lt_tensor *lt_ddp_main_grads(lt_ddp *d) { return d->main_grads; }

void lt_ddp_piece(const lt_ddp *d, int k, int64_t *flat_first, int64_t *count, int64_t *main_offset) {
    const bucket *b = &d->buckets[k];
    int64_t piece = b->count / d->dp_size;
    *flat_first = b->first + d->dp_rank * piece;
    *count = piece;
    *main_offset = b->first / d->dp_size;
}

void lt_ddp_weights_to_main(lt_ddp *d) {
    const float *w = lt_tensor_data(d->weights);
    float *main = lt_tensor_data(d->main_params);
    for (int k = 0; k < d->num_buckets; k++) {
        int64_t first, count, off;
        lt_ddp_piece(d, k, &first, &count, &off);
        d->be->copy(main + off, w + first, sizeof(float) * (size_t)count); /* memcpy on the CPU */
    }
}

void lt_ddp_gather_params(lt_ddp *d) {
    float *w = lt_tensor_data(d->weights);
    const float *main = lt_tensor_data(d->main_params);
    /* Forward order: buckets[] runs from the end of the buffer, so issue from the last entry. */
    for (int k = d->num_buckets - 1; k >= 0; k--) {
        bucket *b = &d->buckets[k];
        int64_t piece = b->count / d->dp_size;
        b->gather = lt_comm_all_gather_async(d->dp, main + b->first / d->dp_size, w + b->first, piece, LT_F32);
    }
}

static void wait_gather(lt_ddp *d, bucket *b) {
    if (!b->gather) return;
    char err[512];
    if (lt_comm_wait(b->gather, err, sizeof err) != 0 && !d->gather_failed) {
        d->gather_failed = 1;
        snprintf(d->gather_err, sizeof d->gather_err, "%s", err);
    }
    b->gather = NULL;
}

void lt_ddp_params_needed(void *ud, int64_t needed_end) {
    lt_ddp *d = ud;
    for (int k = d->num_buckets - 1; k >= 0 && d->buckets[k].first < needed_end; k--) wait_gather(d, &d->buckets[k]);
}

int lt_ddp_params_finish(lt_ddp *d, char *err, size_t errlen) {
    for (int k = d->num_buckets - 1; k >= 0; k--) wait_gather(d, &d->buckets[k]);
    if (d->gather_failed) {
        snprintf(err, errlen, "%s", d->gather_err);
        return -1;
    }
    return 0;
}

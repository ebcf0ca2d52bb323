/* Vocabulary-parallel embedding and cross-entropy (vocab.h): index arrays built on the host, row
 * gathers and the single-rank cross-entropy op on this rank's columns, and Megatron's three fp32
 * all-reduces over N floats. */
#include "engine/parallel/vocab.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"

int lt_vocab_range_of(lt_vocab_range *r, const lt_tp *tp, int64_t vocab, char *err, size_t errlen) {
    if (vocab <= 0 || vocab % tp->size != 0)
        return lt_fail(err, errlen,
                       "the padded vocabulary (%lld) is not divisible by tensor_model_parallel_size (%d): pad it to "
                       "a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size",
                       (long long)vocab, tp->size);
    const int64_t part = vocab / tp->size;
    *r = (lt_vocab_range){vocab, tp->rank * part, (tp->rank + 1) * part};
    return 0;
}

static int owns(const lt_vocab_range *r, int32_t id) { return id >= r->start && id < r->end; }

/* Backend memory for one call: nbytes, released by the caller. */
static void *take(const lt_tp *tp, size_t nbytes, char *err, size_t errlen) {
    void *p = tp->be->alloc(nbytes ? nbytes : 1);
    if (!p) lt_fail(err, errlen, "out of %s memory (%zu bytes) in a vocabulary-parallel op", tp->be->name, nbytes);
    return p;
}

/* The ids this rank owns: local[k] its table row and row[k] its position n, in order of n. Returns K. */
static int owned(const lt_vocab_range *r, const int32_t *ids, int N, int32_t *local, int32_t *row) {
    int K = 0;
    for (int n = 0; n < N; n++)
        if (owns(r, ids[n])) local[K] = ids[n] - (int32_t)r->start, row[K++] = n;
    return K;
}

/* Owned rows are looked up into a compact buffer whose row K stays zero; every output row then
 * gathers its row of it (K for the ids of other ranks): masking with row gathers only. */
int lt_vocab_embedding_forward(const lt_tp *tp, const lt_vocab_range *r, void *out, const int32_t *host_ids,
                               const void *table, int N, int C, char *err, size_t errlen) {
    const size_t E = lt_dtype_size(tp->ops->dtype), ibytes = sizeof(int32_t) * 2 * (size_t)N;
    const size_t bytes = ibytes + E * (size_t)(N + 1) * C;
    int32_t *h = malloc(ibytes + sizeof(int32_t) * (size_t)N);
    char *dev = take(tp, bytes, err, errlen);
    if (!h || !dev) {
        free(h);
        if (dev) tp->be->release(dev, bytes);
        return dev ? lt_fail(err, errlen, "out of host memory in the vocabulary-parallel embedding") : -1;
    }
    int32_t *local = h, *pick = h + N, *row = h + 2 * N;
    const int K = owned(r, host_ids, N, local, row);
    for (int n = 0, k = 0; n < N; n++) pick[n] = owns(r, host_ids[n]) ? k++ : K;
    tp->be->to_device(dev, h, ibytes);
    void *compact = dev + ibytes;
    if (K) tp->ops->embedding_forward(compact, (int32_t *)dev, table, K, C);
    tp->be->memzero((char *)compact + E * (size_t)K * C, E * (size_t)C);
    tp->ops->embedding_forward(out, (int32_t *)dev + N, compact, N, C);
    tp->be->release(dev, bytes);
    free(h);
    return 0;
}

/* The owned rows of dout are gathered in order of n, then accumulated by the single-rank op. */
int lt_vocab_embedding_backward(const lt_tp *tp, const lt_vocab_range *r, float *dtable, const void *dout,
                                const int32_t *host_ids, int N, int C, char *err, size_t errlen) {
    const size_t E = lt_dtype_size(tp->ops->dtype), ibytes = sizeof(int32_t) * 2 * (size_t)N;
    const size_t bytes = ibytes + E * (size_t)N * C;
    int32_t *h = malloc(ibytes);
    char *dev = take(tp, bytes, err, errlen);
    if (!h || !dev) {
        free(h);
        if (dev) tp->be->release(dev, bytes);
        return dev ? lt_fail(err, errlen, "out of host memory in the vocabulary-parallel embedding") : -1;
    }
    const int K = owned(r, host_ids, N, h, h + N);
    if (K) {
        memmove(h + K, h + N, sizeof(int32_t) * (size_t)K);
        tp->be->to_device(dev, h, sizeof(int32_t) * 2 * (size_t)K);
        void *rows = dev + ibytes;
        tp->ops->embedding_forward(rows, (int32_t *)dev + K, dout, K, C);
        tp->ops->embedding_backward(dtable, rows, (int32_t *)dev, K, C);
    }
    tp->be->release(dev, bytes);
    free(h);
    return 0;
}

/* Targets in this rank's columns: owned ids shifted to them, ids of other ranks V/TP (the op's
 * "another rank's column"), ignored ones -1. */
static int32_t *local_targets(const lt_tp *tp, const lt_vocab_range *r, const int32_t *targets, int N, char *err,
                              size_t errlen) {
    int32_t *h = malloc(sizeof(int32_t) * (size_t)N);
    int32_t *dev = take(tp, sizeof(int32_t) * (size_t)N, err, errlen);
    if (!h || !dev) {
        free(h);
        if (dev) tp->be->release(dev, sizeof(int32_t) * (size_t)N);
        if (dev) lt_fail(err, errlen, "out of host memory in the vocabulary-parallel cross-entropy");
        return NULL;
    }
    const int32_t part = (int32_t)(r->end - r->start);
    for (int n = 0; n < N; n++)
        h[n] = targets[n] < 0 ? -1 : owns(r, targets[n]) ? targets[n] - (int32_t)r->start : part;
    tp->be->to_device(dev, h, sizeof(int32_t) * (size_t)N);
    free(h);
    return dev;
}

/* One fp32 all-reduce of N host floats through backend memory (the communicator's). */
static int reduce_host(const lt_tp *tp, float *host, float *dev, int N, lt_reduce_op op, char *err, size_t errlen) {
    if (tp->size == 1) return 0;
    tp->be->to_device(dev, host, sizeof(float) * (size_t)N);
    if (lt_comm_all_reduce(tp->comm, dev, N, LT_F32, op, err, errlen)) return -1;
    tp->be->to_host(host, dev, sizeof(float) * (size_t)N);
    return 0;
}

int lt_vocab_cross_entropy_forward(const lt_tp *tp, const lt_vocab_range *r, float *losses, float *lse,
                                   const void *logits, const int32_t *host_targets, int N, char *err, size_t errlen) {
    int32_t *targets = local_targets(tp, r, host_targets, N, err, errlen);
    float *h = malloc(sizeof(float) * 3 * (size_t)N);
    if (!targets || !h) {
        if (targets) tp->be->release(targets, sizeof(int32_t) * (size_t)N);
        free(h);
        return targets ? lt_fail(err, errlen, "out of host memory in the vocabulary-parallel cross-entropy") : -1;
    }
    const int part = (int)(r->end - r->start);
    /* this rank's columns: partial log-sum-exp, and lse - target logit where it owns the target */
    tp->ops->cross_entropy_forward(losses, lse, logits, targets, N, part);
    float *m = h, *target = h + N, *sum = h + 2 * N;
    tp->be->to_host(m, lse, sizeof(float) * (size_t)N);
    tp->be->to_host(target, losses, sizeof(float) * (size_t)N);
    for (int n = 0; n < N; n++) sum[n] = m[n];                                           /* partial lse */
    for (int n = 0; n < N; n++) target[n] = owns(r, host_targets[n]) ? m[n] - target[n] : 0.0f;
    int rc = reduce_host(tp, m, lse, N, LT_REDUCE_MAX, err, errlen);
    if (!rc) rc = reduce_host(tp, target, lse, N, LT_REDUCE_SUM, err, errlen);
    if (!rc) {
        for (int n = 0; n < N; n++) sum[n] = expf(sum[n] - m[n]);
        rc = reduce_host(tp, sum, lse, N, LT_REDUCE_SUM, err, errlen);
    }
    if (!rc) {
        for (int n = 0; n < N; n++) {
            sum[n] = m[n] + logf(sum[n]); /* the global log-sum-exp */
            target[n] = host_targets[n] < 0 ? 0.0f : sum[n] - target[n];
        }
        tp->be->to_device(lse, sum, sizeof(float) * (size_t)N);
        tp->be->to_device(losses, target, sizeof(float) * (size_t)N);
    }
    tp->be->release(targets, sizeof(int32_t) * (size_t)N);
    free(h);
    return rc;
}

int lt_vocab_cross_entropy_backward(const lt_tp *tp, const lt_vocab_range *r, void *dlogits, const void *logits,
                                    const float *lse, const int32_t *host_targets, const float *dloss, int N,
                                    char *err, size_t errlen) {
    int32_t *targets = local_targets(tp, r, host_targets, N, err, errlen);
    if (!targets) return -1;
    tp->ops->cross_entropy_backward(dlogits, logits, lse, targets, dloss, N, (int)(r->end - r->start));
    tp->be->release(targets, sizeof(int32_t) * (size_t)N);
    return 0;
}

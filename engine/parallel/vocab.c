/* Vocabulary-parallel embedding and cross-entropy (vocab.h): plain host loops around the tp
 * communicator's collectives. */
#include "engine/parallel/vocab.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int lt_vocab_range_of(lt_vocab_range *r, int64_t vocab, int tp_rank, int tp_size, char *err, size_t errlen) {
    if (vocab <= 0 || tp_size <= 0 || tp_rank < 0 || tp_rank >= tp_size) {
        snprintf(err, errlen, "vocab parallel: invalid vocabulary size %lld or tp rank %d of %d", (long long)vocab,
                 tp_rank, tp_size);
        return -1;
    }
    if (vocab % tp_size != 0) {
        snprintf(err, errlen,
                 "vocab parallel: the vocabulary size %lld is not divisible by tensor_model_parallel_size %d: "
                 "pad it to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size",
                 (long long)vocab, tp_size);
        return -1;
    }
    const int64_t per = vocab / tp_size;
    r->vocab = vocab;
    r->start = per * tp_rank;
    r->end = r->start + per;
    r->rank = tp_rank;
    r->size = tp_size;
    return 0;
}

static int range_of_comm(lt_vocab_range *r, lt_comm *tp, int64_t vocab, char *err, size_t errlen) {
    if (!tp) {
        snprintf(err, errlen, "vocab parallel: no tp communicator");
        return -1;
    }
    return lt_vocab_range_of(r, vocab, lt_comm_rank(tp), lt_comm_size(tp), err, errlen);
}

/* Ids are user data (token files): an id outside the vocabulary is an error, not a wild read. */
static int check_ids(const int32_t *ids, int N, int64_t vocab, int allow_negative, const char *what, char *err,
                     size_t errlen) {
    for (int n = 0; n < N; n++) {
        if (ids[n] < 0 && allow_negative) continue;
        if (ids[n] < 0 || ids[n] >= vocab) {
            snprintf(err, errlen, "vocab parallel: %s %d at position %d is outside the vocabulary [0, %lld)", what,
                     (int)ids[n], n, (long long)vocab);
            return -1;
        }
    }
    return 0;
}

/* out[n] = this rank's row of ids[n], or zeros when another rank owns it. */
static void masked_lookup(float *out, const int32_t *ids, const float *table, int N, int C, const lt_vocab_range *r) {
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;
        if (ids[n] >= r->start && ids[n] < r->end)
            memcpy(o, table + (size_t)(ids[n] - r->start) * C, sizeof(float) * (size_t)C);
        else
            memset(o, 0, sizeof(float) * (size_t)C);
    }
}

/* dtable rows of owned ids += dout rows, in order of n (the single-rank op's order per element). */
static void masked_accumulate(float *dtable, const float *dout, const int32_t *ids, int N, int C,
                              const lt_vocab_range *r) {
    for (int n = 0; n < N; n++) {
        if (ids[n] < r->start || ids[n] >= r->end) continue;
        float *d = dtable + (size_t)(ids[n] - r->start) * C;
        const float *g = dout + (size_t)n * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

int lt_vocab_embedding_forward(lt_comm *tp, float *out, const int32_t *ids, const float *table, int N, int C,
                               int64_t vocab, char *err, size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_ids(ids, N, vocab, 0, "token id", err, errlen)) return -1;
    masked_lookup(out, ids, table, N, C, &r);
    if (r.size == 1) return 0;
    return lt_comm_all_reduce(tp, out, (int64_t)N * C, LT_F32, LT_REDUCE_SUM, err, errlen);
}

int lt_vocab_embedding_backward(lt_comm *tp, float *dtable, const float *dout, const int32_t *ids, int N, int C,
                                int64_t vocab, char *err, size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_ids(ids, N, vocab, 0, "token id", err, errlen)) return -1;
    masked_accumulate(dtable, dout, ids, N, C, &r);
    return 0;
}

static int check_sp_rows(const lt_vocab_range *r, int N, char *err, size_t errlen) {
    if (N % r->size != 0) {
        snprintf(err, errlen,
                 "vocab parallel: sequence parallelism needs the %d rows (sequence x batch) divisible by "
                 "tensor_model_parallel_size %d",
                 N, r->size);
        return -1;
    }
    return 0;
}

int lt_vocab_embedding_forward_sp(lt_comm *tp, float *out, float *full, const int32_t *ids, const float *table,
                                  int N, int C, int64_t vocab, char *err, size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_sp_rows(&r, N, err, errlen) ||
        check_ids(ids, N, vocab, 0, "token id", err, errlen))
        return -1;
    masked_lookup(full, ids, table, N, C, &r);
    const int64_t rows = N / r.size;
    if (r.size == 1) {
        memcpy(out, full, sizeof(float) * (size_t)rows * (size_t)C);
        return 0;
    }
    return lt_comm_reduce_scatter(tp, full, out, rows * C, LT_F32, LT_REDUCE_SUM, err, errlen);
}

int lt_vocab_embedding_backward_sp(lt_comm *tp, float *dtable, float *full, const float *dout, const int32_t *ids,
                                   int N, int C, int64_t vocab, char *err, size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_sp_rows(&r, N, err, errlen) ||
        check_ids(ids, N, vocab, 0, "token id", err, errlen))
        return -1;
    const int64_t rows = N / r.size;
    if (r.size == 1)
        memcpy(full, dout, sizeof(float) * (size_t)rows * (size_t)C);
    else if (lt_comm_all_gather(tp, dout, full, rows * C, LT_F32, err, errlen))
        return -1;
    masked_accumulate(dtable, full, ids, N, C, &r);
    return 0;
}

int lt_vocab_cross_entropy_forward(lt_comm *tp, float *losses, float *lse, float *sumexp, const float *logits,
                                   const int32_t *targets, int N, int64_t vocab, char *err, size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_ids(targets, N, vocab, 1, "target", err, errlen))
        return -1;
    const int64_t W = r.end - r.start;
    const int reduce = r.size > 1;
    float *m = lse; /* lse holds the row maxima until the end */

    /* 1. the global row maximum */
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * W;
        float mx = -INFINITY;
        for (int64_t v = 0; v < W; v++) mx = x[v] > mx ? x[v] : mx;
        m[n] = mx;
    }
    if (reduce && lt_comm_all_reduce(tp, m, N, LT_F32, LT_REDUCE_MAX, err, errlen)) return -1;

    /* 2. the target logit minus the maximum, from the rank that owns it (losses holds it until the end),
     * and this rank's sum of exponentials */
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * W;
        const int32_t t = targets[n];
        losses[n] = t >= r.start && t < r.end ? x[t - r.start] - m[n] : 0.0f;
        float s = 0.0f;
        for (int64_t v = 0; v < W; v++) s += expf(x[v] - m[n]);
        sumexp[n] = s;
    }
    if (reduce && lt_comm_all_reduce(tp, losses, N, LT_F32, LT_REDUCE_SUM, err, errlen)) return -1;

    /* 3. the global sum of exponentials */
    if (reduce && lt_comm_all_reduce(tp, sumexp, N, LT_F32, LT_REDUCE_SUM, err, errlen)) return -1;

    for (int n = 0; n < N; n++) {
        const float logs = logf(sumexp[n]);
        losses[n] = targets[n] >= 0 ? logs - losses[n] : 0.0f;
        lse[n] = m[n] + logs;
    }
    return 0;
}

int lt_vocab_cross_entropy_backward(lt_comm *tp, float *dlogits, const float *logits, const float *lse,
                                    const int32_t *targets, const float *dloss, int N, int64_t vocab, char *err,
                                    size_t errlen) {
    lt_vocab_range r;
    if (range_of_comm(&r, tp, vocab, err, errlen) || check_ids(targets, N, vocab, 1, "target", err, errlen))
        return -1;
    const int64_t W = r.end - r.start;
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * W;
        float *dx = dlogits + (size_t)n * W;
        const int32_t t = targets[n];
        if (t < 0) {
            for (int64_t v = 0; v < W; v++) dx[v] = 0.0f;
            continue;
        }
        const float l = lse[n], g = dloss[n];
        /* element by element, so dlogits may be the logits buffer itself */
        for (int64_t v = 0; v < W; v++) dx[v] = expf(x[v] - l) * g;
        if (t >= r.start && t < r.end) dx[t - r.start] -= g;
    }
    return 0;
}

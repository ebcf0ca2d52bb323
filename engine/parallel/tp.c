/* Tensor- and sequence-parallel mappings (tp.h): the tp communicator's collectives around row
 * gathers, on the backend the model runs on. */
#include "engine/parallel/tp.h"

#include <stdio.h>
#include <stdlib.h>

#include "engine/core/error.h"

static int sp(const lt_tp *tp) { return tp->size > 1 && tp->sequence_parallel; }

lt_tp_rows *lt_tp_rows_new(const lt_tp *tp, int B, int T, char *err, size_t errlen) {
    if (sp(tp) && T % tp->size != 0) {
        lt_fail(err, errlen, "sequence parallelism splits the sequence across tensor_model_parallel_size = %d ranks: "
                "a microbatch of %d positions does not divide", tp->size, T);
        return NULL;
    }
    const int N = B * T, P = tp->size, Tl = sp(tp) ? T / P : T, Nl = B * Tl;
    /* the last dim's two maps [N P], then under SP the sequence's three [N], [N], [Nl] */
    const size_t count = 2 * (size_t)N * P + (sp(tp) ? 2 * (size_t)N + (size_t)Nl : 0);
    lt_tp_rows *r = calloc(1, sizeof *r);
    int32_t *h = malloc(sizeof(int32_t) * count), *outer_pos = malloc(sizeof(int32_t) * (size_t)Tl);
    int32_t *dev = tp->be->alloc(sizeof(int32_t) * count);
    if (!r || !h || !outer_pos || !dev) {
        free(r);
        free(h);
        free(outer_pos);
        if (dev) tp->be->release(dev, sizeof(int32_t) * count);
        lt_fail(err, errlen, "out of %s memory for tensor-parallel row maps", tp->be->name);
        return NULL;
    }
    *r = (lt_tp_rows){B, T, Tl, NULL, NULL, NULL, dev, dev + (size_t)N * P, sizeof(int32_t) * count, T, outer_pos};
    for (int t = 0; t < Tl; t++) outer_pos[t] = (sp(tp) ? tp->rank * Tl : 0) + t;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < P; k++) {
            h[n * P + k] = k * N + n;              /* full_of_blocks */
            h[(size_t)N * P + k * N + n] = n * P + k; /* blocks_of_full */
        }
    if (sp(tp)) {
        int32_t *s = h + 2 * (size_t)N * P;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                const int rank = t / Tl, stacked = (rank * B + b) * Tl + t % Tl;
                s[b * T + t] = stacked;     /* full_of_stacked */
                s[N + stacked] = b * T + t; /* stacked_of_full */
            }
        for (int b = 0; b < B; b++)
            for (int t = 0; t < Tl; t++) s[2 * N + b * Tl + t] = b * T + tp->rank * Tl + t; /* local_of_full */
        int32_t *d = dev + 2 * (size_t)N * P;
        r->full_of_stacked = d, r->stacked_of_full = d + N, r->local_of_full = d + 2 * N;
    }
    tp->be->to_device(dev, h, sizeof(int32_t) * count);
    free(h);
    return r;
}

void lt_tp_rows_free(const lt_tp *tp, lt_tp_rows *r) {
    if (!r) return;
    tp->be->release(r->full_of_blocks, r->bytes);
    free(r->outer_pos);
    free(r);
}

void lt_tp_rows_set_positions(const lt_tp *tp, lt_tp_rows *r, const int32_t *pos, int S) {
    for (int t = 0; t < r->local_T; t++) r->outer_pos[t] = pos[(sp(tp) ? tp->rank * r->local_T : 0) + t];
    r->S = S;
}

int lt_tp_outer_rows(const lt_tp *tp, int N) { return sp(tp) ? N / tp->size : N; }

/* Rows rows[n] of src into row n of dst: the embedding lookup is an exact row gather on any backend. */
static void gather_rows(const lt_tp *tp, void *dst, const int32_t *rows, const void *src, int N, int C) {
    tp->ops->embedding_forward(dst, rows, src, N, C);
}

int lt_tp_all_reduce(const lt_tp *tp, void *buf, int64_t count, lt_dtype dtype, char *err, size_t errlen) {
    if (tp->size == 1) return 0;
    return lt_comm_all_reduce(tp->comm, buf, count, dtype, LT_REDUCE_SUM, err, errlen);
}

static int all_gather(const lt_tp *tp, const lt_tp_rows *r, void *full, const void *local, void *landing, int C,
                      char *err, size_t errlen) {
    const int64_t n = (int64_t)r->B * r->local_T * C;
    if (lt_comm_all_gather(tp->comm, local, landing, n, tp->ops->dtype, err, errlen)) return -1;
    gather_rows(tp, full, r->full_of_stacked, landing, r->B * r->T, C);
    return 0;
}

static int reduce_scatter(const lt_tp *tp, const lt_tp_rows *r, void *local, const void *full, void *stack, int C,
                          char *err, size_t errlen) {
    gather_rows(tp, stack, r->stacked_of_full, full, r->B * r->T, C);
    const int64_t n = (int64_t)r->B * r->local_T * C;
    return lt_comm_reduce_scatter(tp->comm, stack, local, n, tp->ops->dtype, LT_REDUCE_SUM, err, errlen);
}

int lt_tp_enter(const lt_tp *tp, const lt_tp_rows *r, const void **inner, const void *x, void *full, void *landing,
                int C, char *err, size_t errlen) {
    *inner = x;
    if (!sp(tp)) return 0;
    *inner = full;
    return all_gather(tp, r, full, x, landing, C, err, errlen);
}

int lt_tp_enter_backward(const lt_tp *tp, const lt_tp_rows *r, void **dx, void *dinner, void *dx_local, void *stack,
                         int C, char *err, size_t errlen) {
    if (!sp(tp)) {
        *dx = dinner;
        if (tp->size == 1) return 0;
        return lt_tp_all_reduce(tp, dinner, (int64_t)r->B * r->T * C, tp->ops->dtype, err, errlen);
    }
    *dx = dx_local;
    return reduce_scatter(tp, r, dx_local, dinner, stack, C, err, errlen);
}

int lt_tp_exit(const lt_tp *tp, const lt_tp_rows *r, void **out, void *partial, void *out_local, void *stack, int C,
               char *err, size_t errlen) {
    return lt_tp_enter_backward(tp, r, out, partial, out_local, stack, C, err, errlen);
}

int lt_tp_exit_backward(const lt_tp *tp, const lt_tp_rows *r, const void **dinner, const void *dout, void *full,
                        void *landing, int C, char *err, size_t errlen) {
    return lt_tp_enter(tp, r, dinner, dout, full, landing, C, err, errlen);
}

int lt_tp_gather_last(const lt_tp *tp, const lt_tp_rows *r, void *full, const void *shard, void *landing, int w,
                      char *err, size_t errlen) {
    const int N = r->B * r->T;
    if (lt_comm_all_gather(tp->comm, shard, landing, (int64_t)N * w, tp->ops->dtype, err, errlen)) return -1;
    gather_rows(tp, full, r->full_of_blocks, landing, N * tp->size, w);
    return 0;
}

int lt_tp_gather_last_backward(const lt_tp *tp, const lt_tp_rows *r, void *dshard, const void *dfull, void *stack,
                               int w, char *err, size_t errlen) {
    const int N = r->B * r->T;
    gather_rows(tp, stack, r->blocks_of_full, dfull, N * tp->size, w);
    return lt_comm_reduce_scatter(tp->comm, stack, dshard, (int64_t)N * w, tp->ops->dtype, LT_REDUCE_SUM, err, errlen);
}

void lt_tp_scatter(const lt_tp *tp, const lt_tp_rows *r, void *local, const void *full, int C) {
    gather_rows(tp, local, r->local_of_full, full, r->B * r->local_T, C);
}

/* A bias is a position embedding of one position: out[n, 0, :] += bias for N "samples". */
void lt_tp_bias_forward(const lt_tp *tp, void *out, const void *bias, int N, int C) {
    tp->ops->position_embedding_forward(out, bias, N, 1, C, NULL);
}

void lt_tp_bias_backward(const lt_tp *tp, float *dbias, const void *dout, int N, int C) {
    tp->ops->position_embedding_backward(dbias, dout, N, 1, C, NULL);
}

/* Outer row t of sample b is element (b S + outer_pos[t]) C of the single rank's stream; rows whose
 * elements follow each other there are one op call (all of them without SP or CP, one run per sample
 * under SP, two per chunk boundary crossed under CP). */
static void dropout(const lt_tp *tp, const lt_tp_rows *r, void *out, const void *inp, int B, int T, int C, float p,
                    uint64_t key, int backward) {
    void (*op)(void *, const void *, int64_t, float, uint64_t, uint64_t) =
        backward ? tp->ops->dropout_backward : tp->ops->dropout_forward;
    if (!r) {
        op(out, inp, (int64_t)B * T * C, p, key, 0);
        return;
    }
    const size_t E = lt_dtype_size(tp->ops->dtype);
    int64_t row = 0, len = 0; /* the run: its first outer row and its rows */
    uint64_t first = 0;
    for (int b = 0; b <= B; b++)
        for (int t = 0; t < (b < B ? r->local_T : 1); t++) {
            const uint64_t at = b < B ? ((uint64_t)b * r->S + (uint64_t)r->outer_pos[t]) * (uint64_t)C : 0;
            if (b < B && len && at == first + (uint64_t)len * C) {
                len++;
                continue;
            }
            if (len)
                op((char *)out + E * (size_t)row * C, (const char *)inp + E * (size_t)row * C, len * C, p, key, first);
            row = (int64_t)b * r->local_T + t, first = at, len = 1;
        }
}

void lt_tp_dropout_forward(const lt_tp *tp, const lt_tp_rows *r, void *out, const void *inp, int B, int T, int C,
                           float p, uint64_t key) {
    dropout(tp, r, out, inp, B, T, C, p, key, 0);
}

void lt_tp_dropout_backward(const lt_tp *tp, const lt_tp_rows *r, void *dinp, const void *dout, int B, int T, int C,
                            float p, uint64_t key) {
    dropout(tp, r, dinp, dout, B, T, C, p, key, 1);
}

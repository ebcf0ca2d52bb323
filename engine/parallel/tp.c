/* Tensor- and sequence-parallel mappings (tp.h): the tp communicator's collectives around row
 * gathers, on the backend the model runs on. */
#include "engine/parallel/tp.h"

#include <stdio.h>
#include <stdlib.h>

#include "engine/core/error.h"

static int sp(const lt_tp *tp) { return tp->size > 1 && tp->sequence_parallel; }

lt_tp_rows *lt_tp_rows_new(const lt_tp *tp, int B, int T, char *err, size_t errlen) {
    if (!sp(tp)) { /* the shape only */
        lt_tp_rows *r = calloc(1, sizeof *r);
        if (r) *r = (lt_tp_rows){B, T, T, NULL, NULL, NULL};
        else lt_fail(err, errlen, "out of host memory");
        return r;
    }
    if (T % tp->size != 0) {
        lt_fail(err, errlen, "sequence parallelism splits the sequence across tensor_model_parallel_size = %d ranks: "
                "a microbatch of %d positions does not divide", tp->size, T);
        return NULL;
    }
    const int N = B * T, Tl = T / tp->size, Nl = B * Tl;
    lt_tp_rows *r = calloc(1, sizeof *r);
    int32_t *h = malloc(sizeof(int32_t) * (2 * (size_t)N + (size_t)Nl));
    const size_t bytes = sizeof(int32_t) * (2 * (size_t)N + (size_t)Nl);
    int32_t *dev = tp->be->alloc(bytes);
    if (!r || !h || !dev) {
        free(r);
        free(h);
        if (dev) tp->be->release(dev, bytes);
        lt_fail(err, errlen, "out of %s memory for sequence-parallel row maps", tp->be->name);
        return NULL;
    }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const int rank = t / Tl, stacked = (rank * B + b) * Tl + t % Tl;
            h[b * T + t] = stacked;          /* full_of_stacked */
            h[N + stacked] = b * T + t;      /* stacked_of_full */
        }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < Tl; t++) h[2 * N + b * Tl + t] = b * T + tp->rank * Tl + t; /* local_of_full */
    tp->be->to_device(dev, h, bytes);
    free(h);
    *r = (lt_tp_rows){B, T, Tl, dev, dev + N, dev + 2 * N};
    return r;
}

void lt_tp_rows_free(const lt_tp *tp, lt_tp_rows *r) {
    if (!r) return;
    if (r->full_of_stacked)
        tp->be->release(r->full_of_stacked, sizeof(int32_t) * (2 * (size_t)r->B * r->T + (size_t)r->B * r->local_T));
    free(r);
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

void lt_tp_scatter(const lt_tp *tp, const lt_tp_rows *r, void *local, const void *full, int C) {
    gather_rows(tp, local, r->local_of_full, full, r->B * r->local_T, C);
}

/* A bias is a position embedding of one position: out[n, 0, :] += bias for N "samples". */
void lt_tp_bias_forward(const lt_tp *tp, void *out, const void *bias, int N, int C) {
    tp->ops->position_embedding_forward(out, bias, N, 1, C);
}

void lt_tp_bias_backward(const lt_tp *tp, float *dbias, const void *dout, int N, int C) {
    tp->ops->position_embedding_backward(dbias, dout, N, 1, C);
}

/* Each sample's local positions are one run of the stream: (b T + r T/TP) C onwards. */
static void dropout(const lt_tp *tp, const lt_tp_rows *r, void *out, const void *inp, int B, int T, int C, float p,
                    uint64_t key, int backward) {
    void (*op)(void *, const void *, int64_t, float, uint64_t, uint64_t) =
        backward ? tp->ops->dropout_backward : tp->ops->dropout_forward;
    if (!sp(tp)) {
        op(out, inp, (int64_t)B * T * C, p, key, 0);
        return;
    }
    const int Tl = r->local_T;
    const size_t E = lt_dtype_size(tp->ops->dtype), run = (size_t)Tl * C;
    for (int b = 0; b < B; b++)
        op((char *)out + E * run * b, (const char *)inp + E * run * b, (int64_t)run, p, key,
           ((uint64_t)b * T + (uint64_t)tp->rank * Tl) * (uint64_t)C);
}

void lt_tp_dropout_forward(const lt_tp *tp, const lt_tp_rows *r, void *out, const void *inp, int B, int T, int C,
                           float p, uint64_t key) {
    dropout(tp, r, out, inp, B, T, C, p, key, 0);
}

void lt_tp_dropout_backward(const lt_tp *tp, const lt_tp_rows *r, void *dinp, const void *dout, int B, int T, int C,
                            float p, uint64_t key) {
    dropout(tp, r, dinp, dout, B, T, C, p, key, 1);
}

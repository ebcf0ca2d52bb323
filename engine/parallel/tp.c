/* Tensor- and sequence-parallel mappings and linear layers (tp.h): host loops and the single-rank
 * GEMMs around the tp communicator's collectives. */
#include "engine/parallel/tp.h"

#include <stdio.h>
#include <string.h>

#include "engine/ops/ops.h"

static int check_comm(lt_comm *tp, char *err, size_t errlen) {
    if (!tp) {
        snprintf(err, errlen, "tensor parallel: no tp communicator");
        return -1;
    }
    return 0;
}

/* Megatron's `divide`: a dimension split across TP must divide exactly. */
static int check_div(int64_t n, int size, const char *what, char *err, size_t errlen) {
    if (n <= 0 || n % size != 0) {
        snprintf(err, errlen, "tensor parallel: %s %lld is not divisible by tensor_model_parallel_size %d", what,
                 (long long)n, size);
        return -1;
    }
    return 0;
}

static int check_seq(lt_comm *tp, int s, int b, int h, char *err, size_t errlen) {
    if (check_comm(tp, err, errlen)) return -1;
    if (b <= 0 || h <= 0) {
        snprintf(err, errlen, "tensor parallel: invalid shape [%d, %d, %d]", s, b, h);
        return -1;
    }
    return check_div(s, lt_comm_size(tp), "the sequence length (sequence parallelism)", err, errlen);
}

/* ---- mappings ---- */

int lt_tp_copy_to_forward(lt_comm *tp, float *out, const float *in, int64_t count, char *err, size_t errlen) {
    if (check_comm(tp, err, errlen)) return -1;
    if (out != in) memcpy(out, in, sizeof(float) * (size_t)count);
    return 0;
}

int lt_tp_copy_to_backward(lt_comm *tp, float *grad, int64_t count, char *err, size_t errlen) {
    if (check_comm(tp, err, errlen)) return -1;
    if (lt_comm_size(tp) == 1) return 0;
    return lt_comm_all_reduce(tp, grad, count, LT_F32, LT_REDUCE_SUM, err, errlen);
}

int lt_tp_reduce_from_forward(lt_comm *tp, float *buf, int64_t count, char *err, size_t errlen) {
    return lt_tp_copy_to_backward(tp, buf, count, err, errlen);
}

int lt_tp_reduce_from_backward(lt_comm *tp, float *dout, const float *din, int64_t count, char *err, size_t errlen) {
    return lt_tp_copy_to_forward(tp, dout, din, count, err, errlen);
}

/* out[N, w] = columns [r w, (r+1) w) of in[N, h], w = h / TP. */
static void take_columns(float *out, const float *in, int N, int h, int rank, int size) {
    const int w = h / size;
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * w, in + (size_t)n * h + (size_t)rank * w, sizeof(float) * (size_t)w);
}

int lt_tp_scatter_last_forward(lt_comm *tp, float *out, const float *in, int N, int h, char *err, size_t errlen) {
    if (check_comm(tp, err, errlen) || check_div(h, lt_comm_size(tp), "the last dimension", err, errlen)) return -1;
    take_columns(out, in, N, h, lt_comm_rank(tp), lt_comm_size(tp));
    return 0;
}

int lt_tp_gather_last_forward(lt_comm *tp, float *out, const float *in, float *scratch, int N, int h, char *err,
                              size_t errlen) {
    if (check_comm(tp, err, errlen) || check_div(h, lt_comm_size(tp), "the last dimension", err, errlen)) return -1;
    const int size = lt_comm_size(tp), w = h / size;
    if (size == 1) {
        if (out != in) memcpy(out, in, sizeof(float) * (size_t)N * (size_t)h);
        return 0;
    }
    /* the all-gather stacks whole [N, w] blocks rank by rank; interleave them into rows */
    if (lt_comm_all_gather(tp, in, scratch, (int64_t)N * w, LT_F32, err, errlen)) return -1;
    for (int r = 0; r < size; r++)
        for (int n = 0; n < N; n++)
            memcpy(out + (size_t)n * h + (size_t)r * w, scratch + ((size_t)r * N + n) * w, sizeof(float) * (size_t)w);
    return 0;
}

int lt_tp_scatter_last_backward(lt_comm *tp, float *din, const float *dout, float *scratch, int N, int h, char *err,
                                size_t errlen) {
    return lt_tp_gather_last_forward(tp, din, dout, scratch, N, h, err, errlen);
}

int lt_tp_gather_last_backward(lt_comm *tp, float *din, const float *dout, int N, int h, char *err, size_t errlen) {
    return lt_tp_scatter_last_forward(tp, din, dout, N, h, err, errlen);
}

int lt_tp_scatter_to_sequence_forward(lt_comm *tp, float *local, const float *full, int s, int b, int h, char *err,
                                      size_t errlen) {
    if (check_seq(tp, s, b, h, err, errlen)) return -1;
    const size_t block = (size_t)(s / lt_comm_size(tp)) * (size_t)b * (size_t)h;
    memcpy(local, full + (size_t)lt_comm_rank(tp) * block, sizeof(float) * block);
    return 0;
}

int lt_tp_gather_from_sequence_forward(lt_comm *tp, float *full, const float *local, int s, int b, int h,
                                       char *err, size_t errlen) {
    if (check_seq(tp, s, b, h, err, errlen)) return -1;
    const int64_t block = (int64_t)(s / lt_comm_size(tp)) * b * h;
    if (lt_comm_size(tp) == 1) {
        if (full != local) memcpy(full, local, sizeof(float) * (size_t)block);
        return 0;
    }
    return lt_comm_all_gather(tp, local, full, block, LT_F32, err, errlen);
}

int lt_tp_reduce_scatter_to_sequence_forward(lt_comm *tp, float *local, const float *full, int s, int b, int h,
                                             char *err, size_t errlen) {
    if (check_seq(tp, s, b, h, err, errlen)) return -1;
    const int64_t block = (int64_t)(s / lt_comm_size(tp)) * b * h;
    if (lt_comm_size(tp) == 1) {
        if (full != local) memcpy(local, full, sizeof(float) * (size_t)block);
        return 0;
    }
    return lt_comm_reduce_scatter(tp, full, local, block, LT_F32, LT_REDUCE_SUM, err, errlen);
}

int lt_tp_scatter_to_sequence_backward(lt_comm *tp, float *dfull, const float *dlocal, int s, int b, int h,
                                       char *err, size_t errlen) {
    return lt_tp_gather_from_sequence_forward(tp, dfull, dlocal, s, b, h, err, errlen);
}

int lt_tp_gather_from_sequence_backward(lt_comm *tp, float *dlocal, const float *dfull, int s, int b, int h,
                                        char *err, size_t errlen) {
    return lt_tp_reduce_scatter_to_sequence_forward(tp, dlocal, dfull, s, b, h, err, errlen);
}

int lt_tp_reduce_scatter_to_sequence_backward(lt_comm *tp, float *dfull, const float *dlocal, int s, int b, int h,
                                              char *err, size_t errlen) {
    return lt_tp_gather_from_sequence_forward(tp, dfull, dlocal, s, b, h, err, errlen);
}

/* ---- shards ---- */

int lt_tp_shard_rows(float *dst, const float *src, int rows, int cols, int rank, int size, char *err, size_t errlen) {
    if (check_div(rows, size, "the number of rows", err, errlen)) return -1;
    const size_t n = (size_t)(rows / size) * (size_t)cols;
    memcpy(dst, src + (size_t)rank * n, sizeof(float) * n);
    return 0;
}

int lt_tp_shard_columns(float *dst, const float *src, int rows, int cols, int rank, int size, char *err,
                        size_t errlen) {
    if (check_div(cols, size, "the number of columns", err, errlen)) return -1;
    take_columns(dst, src, rows, cols, rank, size);
    return 0;
}

/* ---- linear layers ---- */

static int check_linear(lt_comm *tp, const lt_tp_linear *L, int column, char *err, size_t errlen) {
    if (check_comm(tp, err, errlen)) return -1;
    const int size = lt_comm_size(tp);
    const char *kind = column ? "column-parallel linear" : "row-parallel linear";
    if (L->s <= 0 || L->b <= 0 || L->in <= 0 || L->out <= 0) {
        snprintf(err, errlen, "tensor parallel: %s: invalid shape s %d, b %d, in %d, out %d", kind, L->s, L->b,
                 L->in, L->out);
        return -1;
    }
    /* the split dimension: the output features of a column-parallel linear, the input ones of a row one */
    const int split = column ? L->out : L->in;
    if (split % size != 0) {
        snprintf(err, errlen,
                 "tensor parallel: %s: its %s features %d are not divisible by tensor_model_parallel_size %d", kind,
                 column ? "output" : "input", split, size);
        return -1;
    }
    if (L->sequence_parallel && L->s % size != 0) {
        snprintf(err, errlen,
                 "tensor parallel: %s: sequence parallelism needs the sequence length %d divisible by "
                 "tensor_model_parallel_size %d",
                 kind, L->s, size);
        return -1;
    }
    if (L->gather_output && (!column || L->sequence_parallel)) {
        snprintf(err, errlen, "tensor parallel: %s: gather_output is only for a column-parallel linear without "
                 "sequence parallelism", kind);
        return -1;
    }
    return 0;
}

int64_t lt_tp_column_scratch(const lt_tp_linear *L, int tp_size) {
    (void)tp_size;
    const int64_t N = (int64_t)L->s * L->b;
    return (L->sequence_parallel ? 2 * N * L->in : 0) + (L->gather_output ? N * L->out : 0);
}

int64_t lt_tp_row_scratch(const lt_tp_linear *L, int tp_size) {
    const int64_t N = (int64_t)L->s * L->b;
    return N * L->out + (L->sequence_parallel ? N / tp_size * L->out : 0);
}

int lt_tp_column_forward(lt_comm *tp, const lt_tp_linear *L, float *out, const float *x, const float *weight,
                         const float *bias, float *scratch, char *err, size_t errlen) {
    if (check_linear(tp, L, 1, err, errlen)) return -1;
    const int size = lt_comm_size(tp), N = L->s * L->b, w = L->out / size;
    /* the input: copy_to (the identity) without SP, all-gathered along the sequence with it */
    const float *xin = x;
    float *rest = scratch;
    if (L->sequence_parallel) {
        if (lt_tp_gather_from_sequence_forward(tp, scratch, x, L->s, L->b, L->in, err, errlen)) return -1;
        xin = scratch;
        rest = scratch + 2 * (size_t)N * L->in;
    }
    if (!L->gather_output) {
        lt_linear_forward(out, xin, weight, bias, NULL, N, L->in, w);
        return 0;
    }
    /* the local [N, w] block first into out's storage (it holds N x out floats); the all-gather lands in
     * the scratch and is interleaved back into out */
    lt_linear_forward(out, xin, weight, bias, NULL, N, L->in, w);
    return lt_tp_gather_last_forward(tp, out, out, rest, N, L->out, err, errlen);
}

int lt_tp_column_backward(lt_comm *tp, const lt_tp_linear *L, float *dx, float *dweight, float *dbias,
                          const float *dout, const float *x, const float *weight, float *scratch, char *err,
                          size_t errlen) {
    if (check_linear(tp, L, 1, err, errlen)) return -1;
    const int size = lt_comm_size(tp), N = L->s * L->b, w = L->out / size;
    const float *xin = x;
    float *dxin = dx, *rest = scratch;
    if (L->sequence_parallel) {
        xin = scratch; /* the forward's gathered input */
        dxin = scratch + (size_t)N * L->in;
        rest = scratch + 2 * (size_t)N * L->in;
    }
    const float *dlocal = dout;
    if (L->gather_output) { /* the gather's backward: this rank's columns */
        if (lt_tp_gather_last_backward(tp, rest, dout, N, L->out, err, errlen)) return -1;
        dlocal = rest;
    }
    lt_linear_backward(dxin, dweight, dbias, dlocal, xin, weight, N, L->in, w);
    if (L->sequence_parallel) /* the all-gather's backward */
        return lt_tp_gather_from_sequence_backward(tp, dx, dxin, L->s, L->b, L->in, err, errlen);
    return lt_tp_copy_to_backward(tp, dx, (int64_t)N * L->in, err, errlen);
}

int lt_tp_row_forward(lt_comm *tp, const lt_tp_linear *L, float *out, const float *x, const float *weight,
                      const float *bias, const float *residual, float *scratch, char *err, size_t errlen) {
    if (check_linear(tp, L, 0, err, errlen)) return -1;
    const int size = lt_comm_size(tp), N = L->s * L->b, O = L->out;
    /* the partial product, without bias or residual: those must be added once, after the sum */
    lt_linear_forward(scratch, x, weight, NULL, NULL, N, L->in / size, O);
    const float *sum = scratch;
    int rows = N;
    if (L->sequence_parallel) {
        rows = N / size;
        float *local = scratch + (size_t)N * O;
        if (lt_tp_reduce_scatter_to_sequence_forward(tp, local, scratch, L->s, L->b, O, err, errlen)) return -1;
        sum = local;
    } else if (lt_tp_reduce_from_forward(tp, scratch, (int64_t)N * O, err, errlen)) {
        return -1;
    }
    /* out = sum + (bias + residual), element by element (residual may be out): the single-rank op's
     * order, which starts from bias + residual and lets the GEMM add onto it */
    for (int n = 0; n < rows; n++) {
        const float *p = sum + (size_t)n * O;
        const float *r = residual ? residual + (size_t)n * O : NULL;
        float *o = out + (size_t)n * O;
        for (int j = 0; j < O; j++) {
            float e = 0.0f;
            if (bias && r)
                e = bias[j] + r[j];
            else if (bias)
                e = bias[j];
            else if (r)
                e = r[j];
            o[j] = p[j] + e;
        }
    }
    return 0;
}

int lt_tp_row_backward(lt_comm *tp, const lt_tp_linear *L, float *dx, float *dweight, float *dbias,
                       const float *dout, const float *x, const float *weight, float *scratch, char *err,
                       size_t errlen) {
    if (check_linear(tp, L, 0, err, errlen)) return -1;
    const int size = lt_comm_size(tp), N = L->s * L->b, O = L->out;
    const int rows = L->sequence_parallel ? N / size : N;
    if (dbias) /* over the rows this rank holds: summed from zero in order of n, then added, as the single-rank op */
        for (int j = 0; j < O; j++) {
            float acc = 0.0f;
            for (int n = 0; n < rows; n++) acc += dout[(size_t)n * O + j];
            dbias[j] += acc;
        }
    const float *dfull = dout;
    if (L->sequence_parallel) { /* the reduce-scatter's backward */
        if (lt_tp_reduce_scatter_to_sequence_backward(tp, scratch, dout, L->s, L->b, O, err, errlen)) return -1;
        dfull = scratch;
    }
    lt_linear_backward(dx, dweight, NULL, dfull, x, weight, N, L->in / size, O);
    return 0;
}

/* Tensor and sequence parallelism: the mappings around Megatron's ColumnParallelLinear and
 * RowParallelLinear (tensor_parallel/mappings.py and layers.py, MEGATRON_SEMANTICS.md §5), on any
 * backend: buffers are of the ops' dtype in the backend's memory, the collectives are the tp
 * communicator's (shm on the host, NCCL on GPUs).
 *
 * A tensor-parallel region is entered before a column-parallel linear (Megatron's
 * copy_to_tensor_model_parallel_region, or gather_from_sequence_parallel_region under sequence
 * parallelism) and left after a row-parallel one (reduce_from_tensor_model_parallel_region, or
 * reduce_scatter_to_sequence_parallel_region). Inside, every rank holds all N rows of a microbatch
 * and its own columns; outside, every rank holds all rows and all columns, or under sequence
 * parallelism its own positions.
 *
 * Rows are luatron's [b, s] order (row b T + t). Under sequence parallelism rank r holds positions
 * [r T/TP, (r+1) T/TP) of every sample, as [B, T/TP] rows: Megatron's [s/TP, b, h] split, so that
 * norms, dropout and residual adds see 1/TP of the rows. The collectives stack whole rank blocks,
 * so entering and leaving the region reorders rows with one row gather (the embedding lookup op).
 *
 * Functions return 0, or -1 with the reason in err. With size 1 nothing is communicated. */
#ifndef LT_TP_H
#define LT_TP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/ops/backend.h"

typedef struct {
    lt_comm *comm; /* the tensor-parallel group; NULL when size is 1 */
    int rank, size;
    int sequence_parallel;
    const lt_backend *be;
    const lt_ops *ops; /* buffers are of ops->dtype */
} lt_tp;

/* A [B, T] microbatch as the functions below need it (size > 1; NULL is fine at size 1): its row
 * maps, in the backend's memory. Under sequence parallelism (T % size == 0) full_of_stacked[b T + t]
 * is the row of a rank-stacked [size][B][T/size] buffer that holds full row (b, t); stacked_of_full
 * the inverse; local_of_full[b T/size + t'] the full row of this rank's local row (b, t'); NULL
 * without. For the last dim, with N = B T rows cut into size blocks of w columns:
 * full_of_blocks[n size + k] = k N + n, the row of a rank-stacked [size][N] buffer of w-wide rows
 * that holds block k of row n; blocks_of_full the inverse. */
typedef struct {
    int B, T, local_T; /* local_T: the rows of a sample outside the region */
    int32_t *full_of_stacked, *stacked_of_full, *local_of_full;
    int32_t *full_of_blocks, *blocks_of_full;
    size_t bytes; /* of the one allocation holding them */
    /* On the host: the global position of each of a sample's local_T outer rows in a sequence of S
     * (T, and the rows' own positions, unless lt_tp_rows_set_positions says otherwise): dropout's masks. */
    int S;
    int32_t *outer_pos;
} lt_tp_rows;

/* NULL with err when out of memory or T % size != 0. */
lt_tp_rows *lt_tp_rows_new(const lt_tp *tp, int B, int T, char *err, size_t errlen);
void lt_tp_rows_free(const lt_tp *tp, lt_tp_rows *r);
/* The T rows of a sample are positions pos[0..T) (host) of a sequence of S (context parallelism). */
void lt_tp_rows_set_positions(const lt_tp *tp, lt_tp_rows *r, const int32_t *pos, int S);

/* Rows a rank holds outside the region: N, or N / size under sequence parallelism. */
int lt_tp_outer_rows(const lt_tp *tp, int N);

/* Entering (column-parallel input). Without SP *inner = x (every rank holds x already); with SP the
 * all-gather of every rank's local x [N/TP, C] into full [N, C] (landing: N x C scratch), *inner = full. */
int lt_tp_enter(const lt_tp *tp, const lt_tp_rows *r, const void **inner, const void *x, void *full, void *landing,
                int C, char *err, size_t errlen);
/* Its backward: dinner [N, C] holds this rank's partial input gradient. Without SP it is all-reduced in
 * place and *dx = dinner; with SP reduce-scattered into dx_local [N/TP, C] (stack: N x C scratch). */
int lt_tp_enter_backward(const lt_tp *tp, const lt_tp_rows *r, void **dx, void *dinner, void *dx_local, void *stack,
                         int C, char *err, size_t errlen);
/* Leaving (row-parallel output): partial [N, C] holds this rank's partial sum. Without SP it is
 * all-reduced in place and *out = partial; with SP reduce-scattered into out_local [N/TP, C]. */
int lt_tp_exit(const lt_tp *tp, const lt_tp_rows *r, void **out, void *partial, void *out_local, void *stack, int C,
               char *err, size_t errlen);
/* Its backward: without SP *dinner = dout (the same on every rank); with SP the all-gather of every
 * rank's dout [N/TP, C] into full [N, C], *dinner = full. */
int lt_tp_exit_backward(const lt_tp *tp, const lt_tp_rows *r, const void **dinner, const void *dout, void *full,
                        void *landing, int C, char *err, size_t errlen);

/* gather_from_tensor_model_parallel_region (the last dim): full [N, size w] from every rank's shard
 * [N, w], rank k's in columns [k w, (k+1) w) (landing: N size w scratch). Its backward is the
 * reduce-scatter of dfull [N, size w] into this rank's dshard [N, w] (stack: N size w scratch): each
 * rank's columns summed over the ranks. */
int lt_tp_gather_last(const lt_tp *tp, const lt_tp_rows *r, void *full, const void *shard, void *landing, int w,
                      char *err, size_t errlen);
int lt_tp_gather_last_backward(const lt_tp *tp, const lt_tp_rows *r, void *dshard, const void *dfull, void *stack,
                               int w, char *err, size_t errlen);

/* scatter_to_sequence_parallel_region: local [N/TP, C] = this rank's rows of full [N, C] (no
 * communication); its backward is lt_tp_enter's all-gather. */
void lt_tp_scatter(const lt_tp *tp, const lt_tp_rows *r, void *local, const void *full, int C);

/* All-reduce (SUM) of count elements of dtype in place: the finalize step of the gradients of
 * parameters replicated across tp (fp32), and the reductions above. */
int lt_tp_all_reduce(const lt_tp *tp, void *buf, int64_t count, lt_dtype dtype, char *err, size_t errlen);

/* out[n, :] += bias[:] for N rows (a row-parallel bias, added once after the reduction); dbias[:] +=
 * the sum of dout's N rows (fp32). */
void lt_tp_bias_forward(const lt_tp *tp, void *out, const void *bias, int N, int C);
void lt_tp_bias_backward(const lt_tp *tp, float *dbias, const void *dout, int N, int C);

/* The dropout of an outer region (p > 0) with the single-rank model's masks: element (b, t, c) of the
 * whole [B, S, C] activation is element (b S + t) C + c of the stream (key), whichever rank holds it
 * (r's positions; r NULL: all of [B, T, C] here). Backward regenerates the masks. */
void lt_tp_dropout_forward(const lt_tp *tp, const lt_tp_rows *r, void *out, const void *inp, int B, int T, int C,
                           float p, uint64_t key);
void lt_tp_dropout_backward(const lt_tp *tp, const lt_tp_rows *r, void *dinp, const void *dout, int B, int T, int C,
                            float p, uint64_t key);

#endif

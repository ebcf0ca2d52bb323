/* Tensor- and sequence-parallel mappings and linear layers over a tensor-parallel communicator
 * (Megatron's tensor_parallel/mappings.py, ColumnParallelLinear and RowParallelLinear,
 * MEGATRON_SEMANTICS.md §5).
 *
 * Activations are [s, b, h] flattened to N = s x b rows of h values, sequence-major (row n is
 * position n / b of sample n % b). "Along the sequence" therefore means contiguous blocks of rows:
 * rank r of TP holds rows [r N/TP, (r+1) N/TP), i.e. positions [r s/TP, (r+1) s/TP), which needs
 * s % TP == 0. "Along the last dim" means columns [r h/TP, (r+1) h/TP) of every row.
 *
 * Weights are in the engine's layout [OUT, IN] (lt_linear_forward). Rank r of a column-parallel
 * linear holds rows [r OUT/TP, (r+1) OUT/TP) of the weight and of the bias, contiguous; rank r of a
 * row-parallel one holds columns [r IN/TP, (r+1) IN/TP) of every weight row, stored as a contiguous
 * [OUT, IN/TP] matrix, and the whole bias (replicated). lt_tp_shard_rows / lt_tp_shard_columns cut
 * those shards (and the matching slices of a full gradient) out of a full tensor.
 *
 * Everything is fp32 in host memory, the GEMMs are lt_linear_forward / lt_linear_backward and the
 * rest plain loops: this is the CPU path. A CUDA path needs the slicing and the bias / residual
 * epilogue as device copies or kernels (the communicator's collectives take device memory already
 * through lt_comm_nccl).
 *
 * Functions return 0, or -1 with the reason in err (a size that does not divide by TP, a
 * collective's message). Size checks happen before any collective, on every rank alike, so a
 * refusal never leaves another rank waiting. With TP = 1 nothing is communicated. */
#ifndef LT_TP_H
#define LT_TP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"

/* ---- mappings (mappings.py). "count" functions work on any buffer; the others on [N, h] rows ---- */

/* copy_to_tensor_model_parallel_region: forward identity (out = in, nothing when they alias),
 * backward all-reduce (SUM) of the gradient, in place. */
int lt_tp_copy_to_forward(lt_comm *tp, float *out, const float *in, int64_t count, char *err, size_t errlen);
int lt_tp_copy_to_backward(lt_comm *tp, float *grad, int64_t count, char *err, size_t errlen);
/* reduce_from_tensor_model_parallel_region: forward all-reduce (SUM) in place, backward identity. */
int lt_tp_reduce_from_forward(lt_comm *tp, float *buf, int64_t count, char *err, size_t errlen);
int lt_tp_reduce_from_backward(lt_comm *tp, float *dout, const float *din, int64_t count, char *err, size_t errlen);

/* scatter_to_tensor_model_parallel_region (last dim): out[N, h/TP] = this rank's columns of in[N, h].
 * Backward all-gathers the last dim: din[N, h] from dout[N, h/TP]; scratch holds N x h floats. */
int lt_tp_scatter_last_forward(lt_comm *tp, float *out, const float *in, int N, int h, char *err, size_t errlen);
int lt_tp_scatter_last_backward(lt_comm *tp, float *din, const float *dout, float *scratch, int N, int h, char *err,
                                size_t errlen);
/* gather_from_tensor_model_parallel_region (last dim): out[N, h] from every rank's in[N, h/TP]
 * (h is the full width); scratch holds N x h floats. Backward takes this rank's columns. */
int lt_tp_gather_last_forward(lt_comm *tp, float *out, const float *in, float *scratch, int N, int h, char *err,
                              size_t errlen);
int lt_tp_gather_last_backward(lt_comm *tp, float *din, const float *dout, int N, int h, char *err, size_t errlen);

/* The sequence-parallel mappings on [s, b, h] (full sizes; s % TP == 0). "full" is [s, b, h], "local"
 * this rank's [s/TP, b, h]. */
/* scatter_to_sequence_parallel_region: forward split (local = this rank's rows of full), backward
 * all-gather (dfull from every rank's dlocal). */
int lt_tp_scatter_to_sequence_forward(lt_comm *tp, float *local, const float *full, int s, int b, int h, char *err,
                                      size_t errlen);
int lt_tp_scatter_to_sequence_backward(lt_comm *tp, float *dfull, const float *dlocal, int s, int b, int h,
                                       char *err, size_t errlen);
/* gather_from_sequence_parallel_region: forward all-gather, backward reduce-scatter (SUM). */
int lt_tp_gather_from_sequence_forward(lt_comm *tp, float *full, const float *local, int s, int b, int h,
                                       char *err, size_t errlen);
int lt_tp_gather_from_sequence_backward(lt_comm *tp, float *dlocal, const float *dfull, int s, int b, int h,
                                        char *err, size_t errlen);
/* reduce_scatter_to_sequence_parallel_region: forward reduce-scatter (SUM), backward all-gather. */
int lt_tp_reduce_scatter_to_sequence_forward(lt_comm *tp, float *local, const float *full, int s, int b, int h,
                                             char *err, size_t errlen);
int lt_tp_reduce_scatter_to_sequence_backward(lt_comm *tp, float *dfull, const float *dlocal, int s, int b, int h,
                                              char *err, size_t errlen);

/* ---- shards of full tensors ---- */
/* dst[rows/TP, cols] = rows [r rows/TP, (r+1) rows/TP) of src[rows, cols] (column-parallel weight, bias
 * with cols = 1). -1 when rows % size != 0. */
int lt_tp_shard_rows(float *dst, const float *src, int rows, int cols, int rank, int size, char *err, size_t errlen);
/* dst[rows, cols/TP] = columns [r cols/TP, (r+1) cols/TP) of src[rows, cols] (row-parallel weight). */
int lt_tp_shard_columns(float *dst, const float *src, int rows, int cols, int rank, int size, char *err,
                        size_t errlen);

/* ---- the linear layers ---- */
typedef struct {
    int s, b;              /* full sequence length and micro-batch: N = s b rows */
    int in, out;           /* full (unsplit) features: the full weight is [out, in] */
    int sequence_parallel; /* activations outside the layer are [s/TP, b, h] (needs s % TP == 0) */
    int gather_output;     /* column-parallel only: all-gather the output's last dim (not with SP) */
} lt_tp_linear;

/* Floats of the scratch a call needs (0 when none). Column: under SP the gathered input [N, in] (the
 * forward's all-gather result, which backward reads again: keep it between the two) and backward's
 * partial input gradient [N, in]; plus N x out for gather_output. Row: N x out for the partial
 * products, plus N/TP x out under SP. */
int64_t lt_tp_column_scratch(const lt_tp_linear *L, int tp_size);
int64_t lt_tp_row_scratch(const lt_tp_linear *L, int tp_size);

/* ColumnParallelLinear forward. x: [N, in] (every rank the same) or, under SP, this rank's [N/TP, in]
 * (all-gathered into the scratch's first N x in floats). out: [N, out/TP] = x W_r^T + b_r, or with
 * gather_output the full [N, out]. weight: this rank's [out/TP, in]; bias [out/TP] or NULL.
 * Communication: none; SP: 1 all-gather of N x in; gather_output: 1 all-gather of N x out. */
int lt_tp_column_forward(lt_comm *tp, const lt_tp_linear *L, float *out, const float *x, const float *weight,
                         const float *bias, float *scratch, char *err, size_t errlen);
/* Its backward. dout: as out. dx: [N, in] (written; all-reduced over TP: copy_to's backward) or, under
 * SP, this rank's [N/TP, in] (reduce-scattered). dweight [out/TP, in] and dbias [out/TP] (nullable)
 * accumulate (+=). x and scratch as given to the forward (under SP the gathered input is read back from
 * the scratch; Megatron gathers it again instead, trading one more all-gather for activation memory).
 * Communication: 1 all-reduce of N x in; SP: 1 reduce-scatter of N x in. */
int lt_tp_column_backward(lt_comm *tp, const lt_tp_linear *L, float *dx, float *dweight, float *dbias,
                          const float *dout, const float *x, const float *weight, float *scratch, char *err,
                          size_t errlen);

/* RowParallelLinear forward. x: this rank's [N, in/TP] (already parallel). out: [N, out] (SP: this
 * rank's [N/TP, out]) = the sum over ranks of x_r W_r^T, then + bias + residual, added once after the
 * reduction (not on every rank). weight: [out, in/TP]; bias [out] (whole, replicated) and residual
 * (shaped as out; may be out itself) nullable.
 * Communication: 1 all-reduce of N x out; SP: 1 reduce-scatter of N x out. */
int lt_tp_row_forward(lt_comm *tp, const lt_tp_linear *L, float *out, const float *x, const float *weight,
                      const float *bias, const float *residual, float *scratch, char *err, size_t errlen);
/* Its backward. dout: as out (the residual's gradient is dout itself: the caller adds it). dx: [N, in/TP]
 * written; dweight [out, in/TP] and dbias [out] (nullable) accumulate. dbias sums the rows this rank
 * holds: all N without SP (the same on every rank), its N/TP under SP, where the bias is a
 * sequence-parallel parameter and the caller all-reduces its gradient over TP (finalize_model_grads).
 * Communication: none; SP: 1 all-gather of N x out (into the scratch). */
int lt_tp_row_backward(lt_comm *tp, const lt_tp_linear *L, float *dx, float *dweight, float *dbias,
                       const float *dout, const float *x, const float *weight, float *scratch, char *err,
                       size_t errlen);

#endif

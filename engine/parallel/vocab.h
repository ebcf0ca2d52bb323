/* Vocabulary-parallel embedding and cross-entropy over a tensor-parallel communicator
 * (Megatron's VocabParallelEmbedding and tensor_parallel/cross_entropy.py, MEGATRON_SEMANTICS.md §5).
 *
 * Rank r of a tp communicator of size TP owns rows [r V/TP, (r+1) V/TP) of the (padded) vocabulary V:
 * its shard of the embedding table, and its columns of the output layer's logits. V must divide by TP
 * exactly (Megatron's `divide`): the vocabulary is padded to a multiple of make_vocab_size_divisible_by
 * x TP before the model is built.
 *
 * Ids and targets are global vocabulary ids. Everything is fp32 in host memory and the loops are plain
 * C: this is the CPU path. A CUDA path needs the masking and the three cross-entropy passes as device
 * kernels (the communicator's collectives already take device memory through lt_comm_nccl).
 *
 * Functions return 0, or -1 with the reason in err (a vocabulary that does not divide by TP, an id
 * outside [0, V), a collective's message). With TP = 1 nothing is communicated. */
#ifndef LT_VOCAB_H
#define LT_VOCAB_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"

/* This rank's slice of the vocabulary: ids [start, end). */
typedef struct {
    int64_t vocab;      /* V, the padded vocabulary */
    int64_t start, end; /* end - start = V / TP */
    int rank, size;     /* in the tp communicator */
} lt_vocab_range;

/* The slice of rank tp_rank of tp_size; -1 with err when V % TP != 0 (or either is not positive). */
int lt_vocab_range_of(lt_vocab_range *r, int64_t vocab, int tp_rank, int tp_size, char *err, size_t errlen);

/* ---- embedding ----
 * table: this rank's shard [V/TP, C]; ids[N] global, every one in [0, V) (checked).
 * Forward (without sequence parallelism): out[N, C] = the rows of ids this rank owns, zero for the
 * others, then all-reduced (SUM) over tp, so every rank holds the full embedding. One all-reduce of
 * N x C floats. */
int lt_vocab_embedding_forward(lt_comm *tp, float *out, const int32_t *ids, const float *table, int N, int C,
                               int64_t vocab, char *err, size_t errlen);
/* dtable[id - start, :] += dout[n, :] for the ids this rank owns (summed in order of n, as the single-rank
 * op). dout is the full [N, C] gradient: the all-reduce's backward is the identity. No communication. */
int lt_vocab_embedding_backward(lt_comm *tp, float *dtable, const float *dout, const int32_t *ids, int N, int C,
                                int64_t vocab, char *err, size_t errlen);

/* Sequence-parallel variant: the N rows are sequence-major ([s, b] flattened, s first), N % TP == 0, and
 * the masked rows are reduce-scattered along them: out[N/TP, C] holds rows [rank N/TP, (rank+1) N/TP) of
 * the summed embedding. full is caller scratch of N x C floats. One reduce-scatter of N x C floats. */
int lt_vocab_embedding_forward_sp(lt_comm *tp, float *out, float *full, const int32_t *ids, const float *table,
                                  int N, int C, int64_t vocab, char *err, size_t errlen);
/* Its backward: dout[N/TP, C] (this rank's rows) is all-gathered into full [N, C] (the reduce-scatter's
 * backward), then accumulated as lt_vocab_embedding_backward. One all-gather of N x C floats. */
int lt_vocab_embedding_backward_sp(lt_comm *tp, float *dtable, float *full, const float *dout, const int32_t *ids,
                                   int N, int C, int64_t vocab, char *err, size_t errlen);

/* ---- cross-entropy that never gathers the logits ----
 * logits: this rank's columns [N, V/TP]; targets[N] global, < 0 ignored (loss 0, no gradient), otherwise
 * in [0, V) (checked). In fp32, Megatron's three all-reduces of N floats each over tp: MAX of the row
 * maxima m; SUM of the target logit minus m (0 on ranks that do not own the target); SUM of
 * sum(exp(logit - m)) = s. Writes losses[N] = log s - (target logit - m) and lse[N] = m + log s (the
 * global log-sum-exp, for backward); sumexp is scratch of N floats. Every rank gets the same losses. */
int lt_vocab_cross_entropy_forward(lt_comm *tp, float *losses, float *lse, float *sumexp, const float *logits,
                                   const int32_t *targets, int N, int64_t vocab, char *err, size_t errlen);
/* dlogits[N, V/TP] = (exp(logit - lse) - onehot(target)) * dloss[n] on this rank's columns, written; rows
 * of ignored targets are zero. dlogits may be logits itself. No communication. */
int lt_vocab_cross_entropy_backward(lt_comm *tp, float *dlogits, const float *logits, const float *lse,
                                    const int32_t *targets, const float *dloss, int N, int64_t vocab, char *err,
                                    size_t errlen);

#endif

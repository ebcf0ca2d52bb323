/* Vocabulary-parallel embedding and cross-entropy (Megatron's VocabParallelEmbedding and
 * tensor_parallel/cross_entropy.py, MEGATRON_SEMANTICS.md §5), on the backend the model runs on.
 *
 * Rank r of a tp group of size TP owns rows [r V/TP, (r+1) V/TP) of the padded vocabulary V: its shard
 * of the embedding table and its columns of the output layer's logits. V must divide by TP exactly
 * (Megatron's `divide`): the vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP.
 * Ids and targets are global, read from the host (the caller has them there), and valid (the model
 * checks them).
 *
 * Functions return 0, or -1 with the reason in err (out of memory, a collective's message). */
#ifndef LT_VOCAB_H
#define LT_VOCAB_H
#include <stddef.h>
#include <stdint.h>

#include "engine/parallel/tp.h"

/* This rank's slice of the vocabulary: ids [start, end). */
typedef struct {
    int64_t vocab;      /* V, the padded vocabulary */
    int64_t start, end; /* end - start = V / TP */
} lt_vocab_range;

/* The slice of tp's rank; -1 with err when V % TP != 0 (or V is not positive). */
int lt_vocab_range_of(lt_vocab_range *r, const lt_tp *tp, int64_t vocab, char *err, size_t errlen);

/* out[N, C] = the table rows of the ids this rank owns, zero rows for the others: this rank's part of
 * the embedding, which the caller sums over tp (lt_tp_exit). table: this rank's shard [V/TP, C]. */
int lt_vocab_embedding_forward(const lt_tp *tp, const lt_vocab_range *r, void *out, const int32_t *host_ids,
                               const void *table, int N, int C, char *err, size_t errlen);
/* dtable[id - start, :] += dout[n, :] for the ids this rank owns, summed in order of n (as the
 * single-rank op); dout is the full [N, C] gradient. */
int lt_vocab_embedding_backward(const lt_tp *tp, const lt_vocab_range *r, float *dtable, const void *dout,
                                const int32_t *host_ids, int N, int C, char *err, size_t errlen);

/* Cross-entropy over logits this rank's columns [N, V/TP] without gathering them: in fp32, three
 * all-reduces of N floats over tp (MAX of the rows' log-sum-exp over this rank's columns, SUM of the
 * target logit, 0 where another rank owns it, and SUM of the exponentials rescaled to that maximum;
 * Megatron reduces the maximum logit instead of the partial log-sum-exp, the same softmax).
 * Writes losses[N] = log-sum-exp - target logit (0 where host_targets[n] < 0) and lse[N] (the global
 * log-sum-exp, for backward) in the backend's memory, the same on every rank. */
int lt_vocab_cross_entropy_forward(const lt_tp *tp, const lt_vocab_range *r, float *losses, float *lse,
                                   const void *logits, const int32_t *host_targets, int N, char *err, size_t errlen);
/* dlogits[N, V/TP] = (exp(logit - lse) - onehot(target)) * dloss[n] on this rank's columns, written
 * (dloss in the backend's memory; rows of ignored targets zero). dlogits may be logits itself. No
 * communication. */
int lt_vocab_cross_entropy_backward(const lt_tp *tp, const lt_vocab_range *r, void *dlogits, const void *logits,
                                    const float *lse, const int32_t *host_targets, const float *dloss, int N,
                                    char *err, size_t errlen);

#endif

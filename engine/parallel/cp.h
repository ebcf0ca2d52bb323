/* Context parallelism (Megatron's, MEGATRON_SEMANTICS.md §4): the sequence of S positions is cut into
 * 2 CP chunks of L = S / (2 CP) and rank r of the cp group holds chunks r and 2 CP - 1 - r, so every
 * rank does the same share of causal attention. A rank's local sequence is those 2 L positions in that
 * order; everything outside attention works on it row by row (with the rows' global positions for
 * RoPE, learned positions and dropout masks), and attention runs as a ring (cp_comm_type "p2p"): each
 * rank's keys and values go round the cp group while every rank computes its queries against the block
 * it holds (engine/ops attention_kv_*), the partial results merged by their log-sum-exp; in backward
 * the blocks go round again, each carrying its key/value gradient back to its owner. cp_comm_type
 * "all_gather" instead gathers every rank's block first (no overlap) and reduce-scatters the key/value
 * gradients.
 *
 * Buffers are of the ops' dtype in the backend's memory; the communicator carries them (shm on the
 * host, NCCL on GPUs). Functions return 0, or -1 with the reason in err. */
#ifndef LT_CP_H
#define LT_CP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/ops/backend.h"

typedef struct {
    lt_comm *comm; /* the cp group; NULL when size is 1 */
    int rank, size;
    const lt_backend *be;
    const lt_ops *ops;
    int all_gather; /* cp_comm_type "all_gather" (0: "p2p", the ring) */
} lt_cp;

/* The global position of row t (0 <= t < T) of rank's local sequence of T = S / size rows. */
int lt_cp_position(int rank, int size, int T, int t);

/* What the ring needs for a [B, T] microbatch of local sequences, in the backend's memory: every
 * rank's global positions (pos + r T: rank r's), and row maps over kv_channels-wide rows between the
 * fused qkv [B, T, G, H/G + 2, D] and a key/value block [B, T, G, 2, D]: kv_of_qkv[i] the qkv row of
 * block row i; qkv_of_parts[j] for each qkv row j the row of [dq (qkv's rows) ; dkv (the block's)] it
 * takes (its query heads from dq, its key and value from dkv). */
typedef struct {
    int B, T, H, G, D;
    int32_t *pos, *kv_of_qkv, *qkv_of_parts;
    size_t bytes;
} lt_cp_maps;
lt_cp_maps *lt_cp_maps_new(const lt_cp *cp, int B, int T, int H, int G, int D, char *err, size_t errlen);
void lt_cp_maps_free(const lt_cp *cp, lt_cp_maps *m);

/* Bytes of the scratch the ring's forward and backward take for m's shape. */
size_t lt_cp_attention_scratch(const lt_cp *cp, const lt_cp_maps *m);

/* out [B, T, H, D] and lse [B, H, T] of this rank's queries (in qkv, rotary embedding applied) against
 * every rank's keys and values: size - 1 ring steps, each block's transfer in flight while the block
 * before is computed. Dropout masks as the single rank's at global positions (S = T size): p, key,
 * head_offset, heads_total as the attention ops take them. */
int lt_cp_attention_forward(const lt_cp *cp, const lt_cp_maps *m, void *out, float *lse, const void *qkv, float p,
                            uint64_t key, int head_offset, int heads_total, void *scratch, char *err, size_t errlen);
/* Its backward: dqkv [B, T, G, H/G + 2, D] WRITTEN (query heads from every block, this rank's key and
 * value gradients summed over every rank's queries), from dout and the forward's out and lse. */
int lt_cp_attention_backward(const lt_cp *cp, const lt_cp_maps *m, void *dqkv, const void *dout, const void *qkv,
                             const void *out, const float *lse, float p, uint64_t key, int head_offset,
                             int heads_total, void *scratch, char *err, size_t errlen);

/* Bytes this rank sends per microbatch and layer (as the communicator counts them): forward size - 1
 * key/value blocks; backward size - 1 blocks and size key/value gradients (p2p), or size - 1 of each
 * (all_gather: an all-gather and a reduce-scatter). */
uint64_t lt_cp_ring_bytes(const lt_cp *cp, const lt_cp_maps *m, int backward);

#endif

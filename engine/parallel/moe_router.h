/* The MoE router after the gating GEMM, as Megatron-Core's TopKRouter.routing computes it
 * (moe/router.py, moe/moe_utils.py; MEGATRON_SEMANTICS.md §6), on host fp32 arrays: the layer copies
 * the [T, E] logits of its T tokens to the host (T x E is small) and the probs and map back.
 *
 * Forward, in Megatron's order:
 *  1. z-loss = mean_t(logsumexp(logits_t)^2) x z_loss_coeff / tp_cp_size (on the logits);
 *  2. top-k with the score function:
 *     softmax, pre_softmax: softmax over all E, top-k of it, no renormalisation;
 *     softmax (default):    top-k of the logits, softmax over those k;
 *     sigmoid:              top-k of sigmoid(logits) + expert_bias; probs = the unbiased sigmoid scores,
 *                           divided by (their sum over the k + 1e-20) when k > 1;
 *     then x topk_scaling_factor (when not 0). Ties go to the lowest expert index (as torch.topk on
 *     the GPU), the k in descending order;
 *  3. token dropping (capacity_factor > 0): capacity = ceil((T k / E) x capacity_factor) (get_capacity
 *     without min_capacity, as apply_router_token_dropping calls it); when capacity > T nothing is
 *     dropped, else each expert keeps the `capacity` tokens with the highest probs ("probs") or the
 *     earliest routed tokens (drop_by_position: top-k of the 0/1 map column), ties to the lowest token.
 *     Those capacity masks count zeros too: a column with fewer routed tokens than the capacity is
 *     filled with unrouted tokens, which is what pad_to_capacity sends (map = the capacity mask, probs
 *     0 there; with capacity > T every token goes to every expert). Without padding map &= mask;
 *  4. the load-balancing loss (load_balancing 1, 2 or 4 and aux_loss_coeff > 0), from the logits
 *     again, not from step 2's or 3's map: scores = softmax over all E (softmax) or sigmoid normalised
 *     over all E (sigmoid: / (sum + 1e-20)), no expert bias, and ITS OWN top-k map
 *     (compute_routing_scores_for_aux_loss), before any dropping. With c_i that map's column counts
 *     and T' the tokens they count:
 *       aux_loss:     E coeff / (k T'^2) sum_i (sum_t score_ti) c_i,                 T' = T tp_cp_size
 *       seq_aux_loss: the same over columns (b, i), token t = s B + b of seq_length S and
 *                     micro_batch_size B (T = S B), divided by B,                     T' = S tp_cp_size
 *     Counts and T' are Megatron's sums over the TP x CP group: with tp_cp_size > 1 the caller passes
 *     the summed counts in aux_counts (lt_moe_aux_counts gives a rank's own, lt_moe_aux_counts_len
 *     long, to all-reduce); with tp_cp_size 1 and aux_counts NULL a rank uses its own.
 *       global_aux_loss (_apply_global_aux_loss): the aux_loss formula with c_i = global_counts, the
 *                     running average over the step's microbatches so far (this one included) of the
 *                     counts summed over TP x DP x CP, and                             T' = T tp_dp_cp_size
 *     The caller keeps Megatron's tracker (global_tokens_per_expert, ga_steps): per microbatch it sums
 *     lt_moe_aux_counts over TP x DP x CP, lt_moe_global_counts_add gives the average, and the tracker
 *     is zeroed when the step's gradients are final (finalize_model_grads). With tp_dp_cp_size 1 and
 *     global_counts NULL a rank uses its own counts (Megatron's average at the step's first microbatch).
 *
 * Sinkhorn (load_balancing 3, sinkhorn_load_balancing) replaces step 2: the k experts are the top-k of
 * lt_moe_sinkhorn(logits) (of the activation below when eval, as Megatron outside training), and the probs
 * are the activation at them: sigmoid (k = 1) or softmax over all E (k > 1), nothing renormalised. Like
 * Megatron it ignores sigmoid, pre_softmax, topk_scaling_factor and expert_bias (checks still apply) and has
 * no aux loss; it refuses a capacity factor (and so padding) and a nonzero aux_loss_coeff with Megatron's
 * messages. The z-loss applies as for the others.
 *
 * The losses come back as the values that enter the total loss (coefficients applied; Megatron logs
 * them divided by the coefficient). Their gradients enter as MoEAuxLossAutoScaler's: d(total)/d(aux)
 * and d(total)/d(z) are the caller's (1, or the main loss's backward scale; x local tokens x tp_cp_size
 * under calculate_per_token_loss, global_aux_loss's too), passed to backward as daux and dz.
 *
 * Functions return 0, or -1 with the reason in err (a bad configuration, out of memory). */
#ifndef LT_MOE_ROUTER_H
#define LT_MOE_ROUTER_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int topk;                  /* moe_router_topk, 1..E */
    int sigmoid;               /* moe_router_score_function "sigmoid" (0: "softmax") */
    int pre_softmax;           /* moe_router_pre_softmax (softmax only) */
    float topk_scaling_factor; /* moe_router_topk_scaling_factor; 0: none */
    const float *expert_bias;  /* [E] (sigmoid only) or NULL */
    /* moe_expert_capacity_factor; <= 0: no dropping. A double as in Megatron: the capacity is the
     * ceiling of a double product (0.3f x 10 would round up to 4, 0.3 x 10 gives 3). */
    double capacity_factor;
    int drop_by_position; /* moe_token_drop_policy "position" (0: "probs") */
    int pad_to_capacity;  /* moe_pad_expert_input_to_capacity (needs a capacity factor) */
    int load_balancing;   /* 0 none, 1 aux_loss, 2 seq_aux_loss, 3 sinkhorn, 4 global_aux_loss */
    double aux_loss_coeff, z_loss_coeff;
    int seq_length, micro_batch_size; /* seq_aux_loss: T = seq_length x micro_batch_size */
    int tp_cp_size;                   /* ranks of the TP x CP group (<= 1: one) */
    const int64_t *aux_counts;        /* the aux loss's counts summed over TP x CP, or NULL: this rank's */
    /* global_aux_loss: the ranks of the TP x DP x CP group (<= 1: one) and [E] the running average of the
     * counts summed over it (lt_moe_global_counts_add), or NULL: this rank's own (one rank, first microbatch) */
    int tp_dp_cp_size;
    const float *global_counts;
    /* Megatron's router outside training: sinkhorn then picks by its activation. Only that changes: the
     * losses, which Megatron skips there, are the caller's to ignore (and eval counts stay out of the tracker) */
    int eval;
} lt_moe_router_cfg;

/* Checks cfg for T tokens of E experts (Megatron's messages where it has them). */
int lt_moe_router_check(const lt_moe_router_cfg *cfg, int T, int E, char *err, size_t errlen);

/* How many counts the aux loss takes: E (aux_loss, global_aux_loss), micro_batch_size x E (seq_aux_loss,
 * column b E + i), 0 when it is off. */
int lt_moe_aux_counts_len(const lt_moe_router_cfg *cfg, int E);
/* This rank's counts of the aux loss's top-k map (step 4), to sum over TP x CP into aux_counts (over
 * TP x DP x CP into lt_moe_global_counts_add for global_aux_loss). */
int lt_moe_aux_counts(const lt_moe_router_cfg *cfg, const float *logits, int T, int E, int64_t *counts, char *err,
                      size_t errlen);
/* global_aux_loss's tracker, in fp32 as Megatron's buffers: sum[E] += summed (the microbatch's counts summed
 * over TP x DP x CP), *steps += 1, avg[E] = sum / *steps: the cfg's global_counts. sum and *steps start at 0
 * each step. */
void lt_moe_global_counts_add(float *sum, float *steps, const int64_t *summed, int E, float *avg);

/* out [T, E] = moe_utils.sinkhorn(logits) in fp32: exp, then row and column scalings alternated until the
 * mean change of the column one is <= 1e-4, Megatron's tolerance (no iteration limit there; here -1 after
 * 100000, where Megatron would not stop). */
int lt_moe_sinkhorn(const float *logits, int T, int E, float *out, char *err, size_t errlen);

/* probs [T, E] (0 where not routed), map [T, E] (0/1), tokens_per_expert [E] (map's column sums, after
 * dropping and padding), aux_loss and z_loss (0 when off), all written. */
int lt_moe_route_forward(const lt_moe_router_cfg *cfg, const float *logits, int T, int E, float *probs, uint8_t *map,
                         int64_t *tokens_per_expert, double *aux_loss, double *z_loss, char *err, size_t errlen);

/* dlogits [T, E], written: the gradient of sum(dprobs x probs) + daux aux_loss + dz z_loss with respect to
 * the logits, as autograd through Megatron's code gives it (the top-k choices, capacity masks and counts
 * carry none; a dropped entry passes none; sinkhorn's scaling is under no_grad: only its activation at
 * the map's entries passes). map is forward's; probs and tokens_per_expert are not read (may be NULL):
 * everything else is recomputed from the logits, which decide it. */
int lt_moe_route_backward(const lt_moe_router_cfg *cfg, const float *logits, const float *probs, const uint8_t *map,
                          const int64_t *tokens_per_expert, int T, int E, const float *dprobs, float daux, float dz,
                          float *dlogits, char *err, size_t errlen);

#endif

/* The MoE MLP block (Megatron-Core's MoELayer with the local spec): in a layer of the moe_layer_freq
 * pattern it takes the dense MLP's place after pre_mlp_layernorm.
 *
 *   out = h + dropout(sum_e probs[t, e] expert_e(ln_t)),   ln = pre_mlp_layernorm(h)
 *
 * The router (engine/parallel/moe_router.h) runs on the host over the [tokens, experts] logits of
 * router.weight (the gating GEMM); each expert is an MLP of the dense one's form (GELU or SwiGLU) with
 * moe_ffn_hidden_size columns. Tokens are dispatched with a row gather into expert order (each expert's
 * rows contiguous), every expert runs its two GEMMs on its block of rows, and moe_combine sums each
 * token's expert outputs weighted by its routing probabilities. Backward runs the same in reverse; the
 * router's gradient includes the aux and z losses' at the scale Megatron's MoEAuxLossAutoScaler gives
 * them (aux_loss_scale).
 *
 * Expert parallelism: rank p of the EP group holds experts [p El, (p + 1) El), El = E / EP, and routes
 * its own tokens over all E. The dispatcher moves them (Megatron's token dispatchers):
 *   allgather  every rank's normed tokens and routing are all-gathered; each rank runs its experts on
 *              the tokens routed to them and sums their outputs weighted by the probabilities per
 *              gathered token; a reduce-scatter returns each rank's tokens, summed over the experts;
 *   alltoall   each (token, expert) pair is a row sent to the expert's rank (all-to-all with per-rank
 *              counts, learnt by an all-gather of the experts' counts), regrouped there by local
 *              expert; outputs go back the same way and are weighted and summed at the source;
 *   flex       one row per (token, destination rank), carrying the token's probabilities for that
 *              rank's experts (DeepEP's dispatch: a token crosses to a rank once however many of its
 *              experts live there); the destination weights and sums its experts' outputs per row,
 *              the source sums the rows that come back.
 * Backward runs the same exchanges in reverse. With one rank the three move nothing and compute
 * the same.
 *
 * Shared experts (moe_shared_expert_intermediate_size): a dense MLP of that width, split over TP like
 * the dense one, runs on every token beside the routed experts and its output is added to theirs
 * (Megatron's SharedExpertMLP, without the overlap).
 *
 * Expert-tensor parallelism (ETP > 1, the TP group): each expert is split over ETP ranks as the dense
 * MLP is over TP (fc1 by rows, fc2 by columns), each computing a partial output. The dispatch group is
 * then the ETP x EP ranks (Megatron's tp_ep group; rank p holds its shard of EP rank p / ETP's experts):
 * allgather gathers over all of them and its reduce-scatter sums the shards with the experts; alltoall
 * and flex send a row to each of the ETP ranks holding its expert and the source sums the partial
 * outputs that come back (Megatron's alltoall all-to-alls over EP and then all-gathers over ETP: the
 * same sums, other bytes). Under tensor parallelism (sequence parallel: each TP rank routes its own
 * [B, T / TP] rows) and context parallelism (each CP rank its part of the sequence) the aux loss's
 * counts are summed over the TP x CP group, as Megatron's. */
#ifndef LT_MOE_MLP_H
#define LT_MOE_MLP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/model/layer.h"
#include "engine/parallel/moe_router.h"

typedef enum { LT_MOE_ALLGATHER = 0, LT_MOE_ALLTOALL = 1, LT_MOE_FLEX = 2 } lt_moe_dispatcher;

typedef struct {
    int num_experts, topk, ffn_hidden_size; /* moe_ffn_hidden_size */
    lt_moe_router_cfg router;               /* seq_length / micro_batch_size set per microbatch */
    float aux_loss_scale;                   /* d(total loss)/d(aux and z losses): 1 / microbatches per step */
    lt_moe_dispatcher dispatcher;           /* moe_token_dispatcher_type */
    lt_comm *ep;                            /* the dispatch group, ETP x EP ranks (NULL: one rank) */
    int ep_rank, ep_size;
    int etp;                                /* ranks sharing each expert (expert_tensor_parallel_size) */
    int shared_ffn_hidden_size;             /* this TP rank's columns of the shared experts (0: none) */
    lt_comm *global;                        /* global_aux_loss's TP x DP x CP group (NULL: one rank) */
    int grouped_gemm;                       /* moe_grouped_gemm: each GEMM one call over all local experts */
} lt_moe_spec;

/* Weights: the expert arrays hold local expert j's (global (ep_rank / etp) El + j, El = E etp / ep_size;
 * its shard when etp > 1) at index j (biases NULL without add_bias_linear). */
typedef struct {
    const void *ln_w, *ln_b, *router_w;
    const void **fc1_w, **fc1_b, **fc2_w, **fc2_b;
    lt_mlp_weights shared;    /* the shared experts (its ln_w, ln_b unused; NULLs without) */
    const float *expert_bias; /* host fp32 [E]: the router's expert bias (NULL without) */
    float *global_sum, *global_steps; /* host: global_aux_loss's tracker ([E], 1; lt_moe_global_counts_add) */
} lt_moe_weights;
typedef struct {
    float *ln_w, *ln_b, *router_w;
    float **fc1_w, **fc1_b, **fc2_w, **fc2_b;
    lt_mlp_grads shared;
} lt_moe_grads;

/* What a microbatch's MoE block keeps for backward, and what it routed (for the log). */
typedef struct lt_moe_state lt_moe_state;
void lt_moe_state_free(const lt_layer_spec *s, lt_moe_state *st);

/* Routing statistics of one forward: tokens each expert received from this rank (after dropping and
 * padding), the tokens routed before dropping (T topk) and after, the aux and z losses (coefficients
 * applied), and what the dispatcher exchanged: rows this rank sent to other EP ranks and received
 * from them in the forward's dispatch (its combine sends them back the other way), and the seconds
 * spent in the exchanges (host wall time: on a GPU the time to enqueue). */
typedef struct {
    const int64_t *tokens_per_expert;
    int64_t routed, kept;
    double aux_loss, z_loss;
    int64_t rows_sent, rows_received;
    double dispatch_seconds, backward_dispatch_seconds; /* the forward's; the backward's (0 before it) */
} lt_moe_stats;
lt_moe_stats lt_moe_state_stats(const lt_moe_state *st);

/* out = h + dropout(MoE(norm(h))) for c's microbatch; *state receives what backward needs (the
 * caller frees it with lt_moe_state_free, or backward does). */
int lt_moe_mlp_forward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                       lt_layer_ctx *c, const void *h, void *out, lt_moe_state **state, const lt_layer_scratch *sc,
                       char *err, size_t errlen);
/* dx holds d(out) on entry and d(h) on return; gradients accumulate. */
int lt_moe_mlp_backward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                        const lt_moe_grads *g, const lt_layer_ctx *c, lt_moe_state *state, const void *h,
                        void *dx, const lt_layer_scratch *sc, char *err, size_t errlen);

#endif

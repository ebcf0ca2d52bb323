/* A GPT decoder (Megatron-Core's GPTModel with the local layer spec), forward and backward, as a
 * whole or as a chunk: a pipeline stage holding layers [layer_begin, layer_end) (engine/model/layer.h),
 * the embedding when it is the first stage and the final norm, output layer and loss when it is the
 * last. Layer numbers stay global, so a parameter's name, initial values and a layer's dropout masks
 * are the same whichever chunk holds it; the whole model is the one chunk that is first and last.
 *
 * All parameters of a chunk live in one flat fp32 buffer (and their gradients in another), so the
 * optimizer, gradient clipping and gradient buckets work on contiguous memory; under bf16
 * mixed precision the ops read a bf16 copy of it, refreshed layer by layer in forward.
 * Memory and ops come from a backend (engine/ops/backend.h): the CPU, or the CUDA plugin.
 * Each parameter keeps Megatron's state-dict name and is initialised from
 * (seed, name, element index) alone, so any layout of the same model starts identical.
 *
 * Forward returns a per-microbatch context holding exactly what backward needs;
 * backward consumes and frees it, so a pipeline schedule can keep several in flight.
 *
 * Forward runs in training mode (training 1: dropout on, its masks chosen by dropout_seed) or in
 * eval mode (training 0: no dropout, dropout_seed ignored; Megatron's model.eval(), which its
 * evaluation and inference use). Eval mode computes exactly what the same model configured with
 * hidden_dropout = attention_dropout = 0 computes, bit for bit. Any seed, 0 included, is a valid
 * training seed. A backward of an eval-mode context is the gradient of that dropout-free forward. */
#ifndef LT_GPT_H
#define LT_GPT_H
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/core/tensor.h"
#include "engine/ops/backend.h"
#include "engine/parallel/moe_router.h"

typedef struct {
    int num_layers, hidden_size, num_attention_heads, num_query_groups, kv_channels, ffn_hidden_size;
    int seq_length;
    int vocab_size; /* already padded to make_vocab_size_divisible_by */
    int rmsnorm;    /* 0: LayerNorm, 1: RMSNorm */
    float layernorm_epsilon;
    int gated_linear_unit; /* 1: SwiGLU, 0: GELU */
    int gelu_tanh;         /* GELU's tanh approximation (Megatron's openai_gelu; fused into fc1 / fc2 GEMMs) */
    int rope;              /* 1: rotary, 0: learned absolute positions */
    float rotary_base;
    int share_embeddings_and_output_weights;
    int add_bias_linear;
    int add_qkv_bias; /* linear_qkv has a bias even without add_bias_linear (no other linear gets one) */
    int layernorm_zero_centered_gamma; /* norm weights are stored as gamma - 1 (initialised to 0): every norm
                                          scales by 1 + weight (Megatron's apply_layernorm_1p) */
    int qk_layernorm; /* norms (of the model's kind) over each query and key head after linear_qkv, before
                         the rotary embedding: self_attention.q_layernorm / k_layernorm, kv_channels wide */
    float init_method_std;
    float hidden_dropout, attention_dropout;
    uint64_t seed;
    int flat_multiple; /* the flat buffers' length is rounded up to a multiple of this (0: 16), so
                          data parallelism can shard them evenly */
    const lt_backend *backend; /* where weights, gradients and activations live and run; NULL: the CPU */
    int bf16; /* mixed precision: bf16 activations and weight copies for the ops; fp32 main weights and
                 gradients (the optimizer's), as Megatron's bf16 with grad_reduce_in_fp32 */
    /* Tensor parallelism (engine/parallel/tp.h): this rank's group (NULL: one rank; borrowed, it must
     * outlive the model) and sequence parallelism. The chunk holds this rank's shard of each split
     * parameter; names, initial values and dropout masks stay the single rank's. */
    lt_comm *tp_comm;
    int sequence_parallel;
    /* Context parallelism (engine/parallel/cp.h): this rank's cp group (NULL: one rank; borrowed). A
     * chunk's T is then this rank's local sequence, 2 of the 2 CP chunks of seq_length. */
    lt_comm *cp_comm;
    int cp_all_gather; /* cp_comm_type "all_gather" (0: "p2p", the ring) */
    /* Mixture of experts (engine/model/moe_mlp.h): num_moe_experts 0 for a dense model; layer l's MLP
     * is an MoE block when l % moe_layer_freq == 0 (Megatron's integer pattern). Expert e's weights are
     * named mlp.experts.linear_fc1.weight<e> with moe_grouped_gemm (Megatron's grouped experts), else
     * mlp.experts.local_experts.<e>.linear_fc1.weight. The router's options as moe_router.h takes them
     * (seq_length and micro_batch_size are set per microbatch; expert_bias and aux_counts NULL). */
    int num_moe_experts, moe_ffn_hidden_size, moe_layer_freq, moe_grouped_gemm;
    int moe_shared_expert_intermediate_size; /* 0: no shared experts (mlp.shared_experts.linear_fc1.weight, ...) */
    int moe_router_enable_expert_bias;       /* each router keeps an expert bias (lt_gpt_moe_expert_bias) */
    lt_moe_router_cfg moe_router;
    int moe_dispatcher; /* lt_moe_dispatcher: moe_token_dispatcher_type */
    /* Expert parallelism: the dispatch group, ETP x EP ranks (NULL: one rank), whose rank p holds the experts
     * of EP rank p / ETP, [(p / ETP) E / EP, (p / ETP + 1) E / EP) (named by their global number). With
     * expert_tensor_parallel (expert_tensor_parallel_size = TP > 1; else 1) each expert is split over the
     * TP group as the dense MLP is. A chunk lays its experts' parameters out after all the others, from
     * lt_gpt_expert_offset on: their gradients are reduced over another group than the rest. */
    lt_comm *ep_comm;
    int expert_tensor_parallel;
    /* global_aux_loss (moe_router.load_balancing 4): the TP x DP x CP group its counts are summed over
     * (NULL: one rank); each MoE layer keeps Megatron's running tracker, zeroed by lt_gpt_zero_grad. */
    lt_comm *moe_global_comm;
} lt_gpt_config;

/* How a parameter is split across the TP ranks: rank r of TP holds */
typedef enum {
    LT_SPLIT_NONE = 0, /* all of it (replicated) */
    LT_SPLIT_ROWS,     /* rows [r R/TP, (r+1) R/TP): column-parallel weights and biases, vocabulary shards */
    LT_SPLIT_COLUMNS,  /* columns [r C/TP, (r+1) C/TP) of every row: row-parallel weights */
    LT_SPLIT_GLU_ROWS, /* the matching rows of each half: SwiGLU's fc1, [gate; up] */
} lt_split;

typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];      /* this rank's shard */
    int64_t offset, numel; /* in the flat buffers */
    int no_weight_decay;   /* biases and norm weights, as Megatron */
    lt_split split;
    int64_t full_shape[2], full_numel; /* the whole parameter, as a single rank holds it */
    int tp_grad_sum; /* replicated, but each TP rank's gradient is a part (sequence-parallel norms and
                        row-parallel biases, q/k norms): summed over TP when the step finishes */
    int expert;      /* the global number of the expert it belongs to; -1 for the others */
} lt_gpt_param;

/* A contiguous run of a shard: n elements at local element offset `local` of the shard and `full` of
 * the whole parameter (row-major). */
typedef struct {
    int64_t local, full, n;
} lt_gpt_run;
/* The runs of rank's shard of p among size ranks (1 to full_shape[0] of them); run k. */
int64_t lt_gpt_param_num_runs(const lt_gpt_param *p, int size);
lt_gpt_run lt_gpt_param_run(const lt_gpt_param *p, int rank, int size, int64_t k);

/* The part of the model a chunk holds (Megatron's pipeline stage semantics). */
typedef struct {
    int layer_begin, layer_end; /* global layer numbers, [begin, end) */
    int pre_process;            /* holds the embedding (needs layer_begin 0): forward takes tokens */
    int post_process;           /* holds the final norm, output layer and loss (needs layer_end num_layers) */
} lt_gpt_stage;

/* A chunk (an lt_gpt holds one; every function below works on any chunk unless it says otherwise). */
typedef struct lt_gpt lt_gpt;
typedef struct lt_gpt_ctx lt_gpt_ctx;

/* The whole model: the chunk [0, num_layers), first and last. NULL on invalid config or out of
 * memory, with the reason in err. */
lt_gpt *lt_gpt_new(const lt_gpt_config *cfg, char *err, int errlen);
/* One chunk. Its parameters are those of its part, in forward order. With tied embeddings
 * (share_embeddings_and_output_weights) a last stage that is not also first holds its own copy of
 * embedding.word_embeddings.weight (same name and initial values) as its output weight; keeping the
 * two copies equal (all-reducing their gradients) is the pipeline's job. */
lt_gpt *lt_gpt_new_chunk(const lt_gpt_config *cfg, const lt_gpt_stage *stage, char *err, int errlen);
const lt_gpt_stage *lt_gpt_get_stage(const lt_gpt *m);
void lt_gpt_free(lt_gpt *m);
const lt_gpt_config *lt_gpt_get_config(const lt_gpt *m);

int lt_gpt_num_params(const lt_gpt *m);
const lt_gpt_param *lt_gpt_param_info(const lt_gpt *m, int i);
int lt_gpt_find_param(const lt_gpt *m, const char *name); /* index or -1 */
const lt_backend *lt_gpt_backend(const lt_gpt *m);
/* Flat fp32 buffers of all weights and all gradients, in the backend's memory (borrowed; the model
 * owns them). */
lt_tensor *lt_gpt_weights(lt_gpt *m);
lt_tensor *lt_gpt_grads(lt_gpt *m);

/* (Re)initialise every parameter from the config's seed. */
void lt_gpt_init_weights(lt_gpt *m);
/* Zeroes the gradients, and global_aux_loss's trackers: a step begins. */
void lt_gpt_zero_grad(lt_gpt *m);

/* Whole model only (first and last): forward on tokens[B, T] with next-token targets[B, T]
 * (targets < 0 are ignored; targets may be NULL for inference, then the loss is not computed).
 * training and dropout_seed: the mode and, in training mode, this microbatch's dropout masks (see
 * above). Returns the context, or NULL with err set (bad token id, shape, memory). *loss receives
 * the mean loss over valid targets (read back to the host), *num_valid their count. */
lt_gpt_ctx *lt_gpt_forward(lt_gpt *m, const int32_t *tokens, const int32_t *targets, int B, int T, int training,
                           uint64_t dropout_seed, float *loss, int64_t *num_valid, char *err, int errlen);
/* Logits [B*T, V] of a context, in the backend's memory and the compute dtype (fp32, or bf16 under
 * mixed precision; valid until backward or free). */
const void *lt_gpt_ctx_logits(const lt_gpt_ctx *ctx);
/* Whole model only: backward accumulates into the model's gradients, scaling d(loss of each valid
 * token) by grad_scale (e.g. 1 / (valid tokens * microbatches)). Frees the context, also on failure
 * (-1 with err set when the backend is out of memory for the gradients' scratch; 0 otherwise). */
int lt_gpt_backward(lt_gpt *m, lt_gpt_ctx *ctx, float grad_scale, char *err, int errlen);
void lt_gpt_ctx_free(lt_gpt_ctx *ctx);

/* Chunk forward of one microbatch [B, T]. A first stage reads host tokens[B, T] (hidden NULL);
 * any other stage reads `hidden`, the previous stage's output: [T, B, hidden_size] (Megatron's
 * [s, b, h] at the boundary; [T/TP, B, h], this rank's positions, under sequence parallelism) in the
 * backend's memory and the compute dtype. A last stage reads
 * host targets[B, T] (< 0 ignored; NULL: no loss). *out receives a new tensor the caller frees: on a
 * last stage the per-token losses [B, T] fp32 (0 where the target is ignored; NULL without targets),
 * kept in the backend's memory (nothing is read back), elsewhere the output hidden state [T, B, h].
 * *num_valid (may be NULL) receives the count of valid targets (0 when not a last stage).
 * training, dropout_seed: as lt_gpt_forward's (every chunk of a microbatch takes the same). */
lt_gpt_ctx *lt_gpt_chunk_forward(lt_gpt *m, const int32_t *tokens, const lt_tensor *hidden, const int32_t *targets,
                                 int B, int T, int training, uint64_t dropout_seed, lt_tensor **out, int64_t *num_valid,
                                 char *err, int errlen);
/* Chunk backward: a last stage scales d(loss of each valid token) by grad_scale (grad_output
 * NULL); any other stage reads grad_output [T, B, h] (d of its output). Parameter gradients
 * accumulate in the chunk's buffer; *grad_input receives a new tensor [T, B, h] (d of its input)
 * unless the chunk is a first stage (NULL then). Frees the context, also on failure. */
int lt_gpt_chunk_backward(lt_gpt *m, lt_gpt_ctx *ctx, const lt_tensor *grad_output, float grad_scale,
                          lt_tensor **grad_input, char *err, int errlen);

/* Called during backward each time more gradients are final: every gradient at a flat offset
 * >= first_ready will not change again in this backward. Parameters are laid out in forward
 * order and backward runs in reverse, so the ready region grows from the end of the buffer down
 * to 0 (the embeddings, final last). Data parallelism uses it to start reducing gradient buckets
 * while backward goes on. NULL removes the hook. */
typedef void (*lt_gpt_grad_ready_fn)(void *ud, int64_t first_ready);
void lt_gpt_set_grad_ready_hook(lt_gpt *m, lt_gpt_grad_ready_fn fn, void *ud);

/* Called during forward before parameters are read: every weight at a flat offset below
 * needed_end must be final now. The needed region grows from 0 (embeddings) to the end of the
 * buffer, layer by layer; the distributed optimizer uses it to let the parameter all-gather of
 * later buckets run behind the forward of earlier layers. NULL removes the hook. */
typedef void (*lt_gpt_param_wait_fn)(void *ud, int64_t needed_end);
void lt_gpt_set_param_wait_hook(lt_gpt *m, lt_gpt_param_wait_fn fn, void *ud);

/* Text generation: a key/value cache for one sequence of up to max_len (<= seq_length) positions, for the
 * whole model on one rank (NULL with err otherwise, or out of memory). lt_gpt_decode runs tokens[T] at the
 * next T positions (eval mode), their keys and values joining the cache, and writes the last one's
 * next-token logits [vocab_size] (padded vocabulary included, fp32) to the host's logits: the prompt in
 * one call, then one token per call, each attending to everything before it (no recompute). */
typedef struct lt_gpt_cache lt_gpt_cache;
lt_gpt_cache *lt_gpt_cache_new(lt_gpt *m, int max_len, char *err, int errlen);
void lt_gpt_cache_free(lt_gpt_cache *c);
int lt_gpt_cache_length(const lt_gpt_cache *c); /* positions filled */
int lt_gpt_decode(lt_gpt *m, lt_gpt_cache *cache, const int32_t *tokens, int T, float *logits, char *err, int errlen);

/* Bytes of backend memory a forward of a [B, T] microbatch keeps for its backward (the context's
 * saved activations); 0 when the shape is invalid. */
size_t lt_gpt_activation_bytes(const lt_gpt *m, int B, int T);

/* Mixture of experts: the scale of the aux and z losses' gradients (Megatron's MoEAuxLossAutoScaler:
 * 1 / microbatches per step; 1 until set), and the routing statistics of the training steps since the
 * last call (then reset), summed over the chunk's MoE layers: tokens this rank sent each expert (into
 * tokens_per_expert[num_moe_experts] when not NULL) and the totals below. */
typedef struct {
    int64_t forwards;              /* MoE layer forwards counted */
    int64_t routed, kept;          /* tokens routed before and after dropping (x topk) */
    double aux_loss, z_loss;       /* coefficients applied */
    int64_t rows_sent, rows_received; /* the forwards' dispatch rows to and from other EP ranks */
    double dispatch_seconds;       /* in the dispatchers' exchanges, forward and backward */
} lt_gpt_moe_totals;
void lt_gpt_set_moe_aux_loss_scale(lt_gpt *m, float scale);
void lt_gpt_take_moe_stats(lt_gpt *m, int64_t *tokens_per_expert, lt_gpt_moe_totals *totals);
/* Aux-loss-free balancing (moe_router_enable_expert_bias, Megatron's router.expert_bias): MoE layer k of the
 * chunk's (0 <= k < lt_gpt_moe_bias_layers) host fp32 [num_moe_experts] bias, which the sigmoid router adds
 * to the scores it picks the top-k by, and the tokens this rank routed to each expert in the training
 * forwards since they were last zeroed (Megatron's local_tokens_per_expert), which the caller sums over
 * TP x DP x CP at each step to move the bias by rate x sign(mean - tokens) and zeroes. *name receives
 * the bias's name, "decoder.layers.<l>.mlp.router.expert_bias" (a checkpoint's). */
int lt_gpt_moe_bias_layers(const lt_gpt *m);
float *lt_gpt_moe_expert_bias(lt_gpt *m, int k, float **tokens, const char **name);

/* Where the experts' parameters begin in the flat buffers (the length when there are none). */
int64_t lt_gpt_expert_offset(const lt_gpt *m);

/* This chunk's tensor-parallel rank and size (0 and 1 without). */
int lt_gpt_tp_rank(const lt_gpt *m);
int lt_gpt_tp_size(const lt_gpt *m);

/* Model FLOPs per token by the 6N + 6LCT rule (N = non-embedding + embedding parameters, whole; of an MoE
 * layer's experts only the top-k a token is routed to). */
double lt_gpt_flops_per_token(const lt_gpt *m);

#endif

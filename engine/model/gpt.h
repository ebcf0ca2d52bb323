/* A GPT decoder (Megatron-Core's GPTModel with the local layer spec), forward and backward.
 *
 * All parameters live in one flat fp32 buffer (and their gradients in another), so the
 * optimizer, gradient clipping and gradient buckets work on contiguous memory; under bf16
 * mixed precision the ops read a bf16 copy of it, refreshed layer by layer in forward.
 * Memory and ops come from a backend (engine/ops/backend.h): the CPU, or the CUDA plugin.
 * Each parameter keeps Megatron's state-dict name and is initialised from
 * (seed, name, element index) alone, so any layout of the same model starts identical.
 *
 * Forward returns a per-microbatch context holding exactly what backward needs;
 * backward consumes and frees it, so a pipeline schedule can keep several in flight. */
#ifndef LT_GPT_H
#define LT_GPT_H
#include <stdint.h>

#include "engine/core/tensor.h"
#include "engine/ops/backend.h"

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
} lt_gpt_config;

typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    int64_t offset, numel; /* in the flat buffers */
    int no_weight_decay;   /* biases and norm weights, as Megatron */
} lt_gpt_param;

typedef struct lt_gpt lt_gpt;
typedef struct lt_gpt_ctx lt_gpt_ctx;

/* NULL on invalid config or out of memory, with the reason in err. */
lt_gpt *lt_gpt_new(const lt_gpt_config *cfg, char *err, int errlen);
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
void lt_gpt_zero_grad(lt_gpt *m);

/* Forward on tokens[B, T] with next-token targets[B, T] (targets < 0 are ignored; targets may be
 * NULL for inference, then the loss is not computed). dropout_seed selects this microbatch's dropout
 * masks. Returns the context, or NULL with err set (bad token id, shape, memory). *loss receives the
 * mean loss over valid targets, *num_valid their count. */
lt_gpt_ctx *lt_gpt_forward(lt_gpt *m, const int32_t *tokens, const int32_t *targets, int B, int T,
                           uint64_t dropout_seed, float *loss, int64_t *num_valid, char *err, int errlen);
/* Logits [B*T, V] of a context, in the backend's memory and the compute dtype (fp32, or bf16 under
 * mixed precision; valid until backward or free). */
const void *lt_gpt_ctx_logits(const lt_gpt_ctx *ctx);
/* Backward: accumulates into the model's gradients, scaling d(loss of each valid token) by
 * grad_scale (e.g. 1 / (valid tokens * microbatches)). Frees the context, also on failure
 * (-1 with err set when the backend is out of memory for the gradients' scratch; 0 otherwise). */
int lt_gpt_backward(lt_gpt *m, lt_gpt_ctx *ctx, float grad_scale, char *err, int errlen);
void lt_gpt_ctx_free(lt_gpt_ctx *ctx);

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

/* Model FLOPs per token by the 6N + 6LCT rule (N = non-embedding + embedding parameters). */
double lt_gpt_flops_per_token(const lt_gpt *m);

#endif

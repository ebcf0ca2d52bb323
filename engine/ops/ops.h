/* Every numeric operation of the model, forward and backward (CPU backend).
 *
 * Conventions, llm.c style:
 * - Plain pointers to contiguous row-major fp32 arrays; N = rows (batch * seq), C = features.
 * - Backward WRITES the gradient of an activation input (dinp, dqkv: overwritten, its old contents
 *   never read), so the caller need not zero an activation gradient before each call (on a GPU that
 *   zeroing is a memset plus a read-modify-write of every activation gradient of the step).
 *   Exceptions, which accumulate (+=): weight gradients (dweight, dbias, dtable, dwpe: summed over
 *   microbatches, zeroed once per step), the dinp of layernorm / rmsnorm (the residual stream's
 *   gradient is already there and the norm's adds to it), add_backward, rope_backward (in place), and the dq
 *   of attention_kv_backward (summed over a ring's blocks).
 *   Gradient pointers documented as nullable may be NULL to skip that gradient.
 * - Weights follow the PyTorch/Megatron layout: a linear weight is [out_features, in_features].
 * - No allocation inside an op unless stated; scratch comes from the caller.
 * - OpenMP where it pays; results must not depend on the thread count beyond float rounding.
 */
#ifndef LT_OPS_H
#define LT_OPS_H
#include <stddef.h>
#include <stdint.h>

/* ---- embeddings ---- */
/* out[n, :] = table[ids[n], :]. ids are validated by the caller (0 <= id < rows). */
void lt_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C);
/* dtable[ids[n], :] += dout[n, :]. Deterministic (no atomics): rows are owned by one thread. */
void lt_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C);
/* Learned absolute positions: out[b, t, :] += wpe[p(t), :], p(t) = pos ? pos[t] : t. pos (T int32, the same
 * for every sample b; nullable) gives global positions where a rank holds non-contiguous parts of the
 * sequence (context parallelism). */
void lt_position_embedding_forward(float *out, const float *wpe, int B, int T, int C, const int32_t *pos);
/* dwpe[p(t), :] += sum_b dout[b, t, :]. The positions of one call must be distinct. */
void lt_position_embedding_backward(float *dwpe, const float *dout, int B, int T, int C, const int32_t *pos);

/* ---- mixture of experts ----
 * Tokens reach their experts through a row gather (lt_embedding_forward with the dispatch's row ids, each
 * expert's rows contiguous); the combine brings the experts' outputs y [M, C] back to the N tokens.
 * rows, weights [N, k]: the y row of token n's j-th expert and its routing probability; a row of -1 is an
 * empty slot (the token was dropped at that expert's capacity) whose weight is never read.
 * Forward: out[n, :] = sum over j with rows[n, j] >= 0 of weights[n, j] y[rows[n, j], :], WRITTEN (zeros
 * for a token with no rows), summed in fp32 in order j = 0 .. k-1. */
void lt_moe_combine_forward(float *out, const float *y, const int32_t *rows, const float *weights, int N, int k,
                            int C);
/* dy [M, C] WRITTEN: dy[rows[n, j], :] = weights[n, j] dout[n, :], zeros in the rows that no slot names
 * (padding to capacity); dweights [N, k] WRITTEN: dout[n, :] . y[rows[n, j], :] in fp32, 0 for an empty
 * slot. Precondition: no y row is named by two slots (the dispatch gives each (token, expert) pair a row
 * of its own), so every row of dy has one writer: no atomics. */
void lt_moe_combine_backward(float *dy, float *dweights, const float *dout, const float *y, const int32_t *rows,
                             const float *weights, int N, int k, int M, int C);

/* ---- normalisation ---- */
/* LayerNorm over the last dim. bias nullable. Saves mean[N], rstd[N] for backward. */
void lt_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                          const float *bias, int N, int C, float eps);
/* dinp += (the residual stream's gradient is there already); dweight, dbias +=. dbias nullable. */
void lt_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, const float *mean, const float *rstd, int N, int C);
/* RMSNorm: out = inp * rstd * weight, rstd = 1/sqrt(mean(inp^2) + eps). Saves rstd[N]. */
void lt_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
/* dinp +=, dweight += (as layernorm). */
void lt_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                         const float *rstd, int N, int C);

/* ---- linear (OpenBLAS sgemm) ---- */
/* out[N, OUT] = inp[N, IN] @ weight[OUT, IN]^T + bias[OUT] + residual[N, OUT]: the residual connection
 * after a projection, added in the same pass (one rounding where out is bf16). bias, residual nullable;
 * residual may be out itself, never inp. */
void lt_linear_forward(float *out, const float *inp, const float *weight, const float *bias, const float *residual,
                       int N, int IN, int OUT);
/* dinp[N, IN] = dout @ weight (written); dweight[OUT, IN] += dout^T @ inp; dbias[OUT] += sum_n dout.
 * dinp, dbias nullable. */
void lt_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, int N, int IN, int OUT);
/* General matmul: c[M, N] = alpha * op(a) @ op(b) + beta * c, op(x) = x or x^T (row-major). */
void lt_matmul(float *c, const float *a, const float *b, int M, int N, int K, int trans_a, int trans_b, float alpha,
               float beta);

/* ---- attention ----
 * Fused QKV in Megatron's layout: each token row of qkv holds, for each of the G query groups,
 * the group's H/G query heads, then its key head, then its value head, each of D values:
 *   qkv[B, T, G, H/G + 2, D].   out[B, T, H, D].   lse[B, H, T] (log-sum-exp of each score row).
 * Causal, scale 1/sqrt(D), grouped query attention (query head h uses kv group h / (H/G)).
 * No T x T matrix is kept between forward and backward: backward recomputes scores from q, k, lse.
 * Attention dropout (p in [0, 1)) drops probabilities with mask element (b, h, i, j) drawn from
 * lt_rng_uniform(dropout_key, ((b*heads_total + head_offset + h)*T + i)*T + j) < p, kept ones scaled
 * by 1/(1-p); backward regenerates the same mask. p = 0 disables it. The op's H heads are heads
 * [head_offset, head_offset + H) of a model with heads_total heads, so a tensor-parallel rank running
 * its local heads draws the single-rank model's masks; a single rank passes 0, H. */
void lt_attention_forward(float *out, float *lse, const float *qkv, int B, int T, int H, int G, int D,
                          float dropout_p, uint64_t dropout_key, int head_offset, int heads_total);
/* dqkv (same layout as qkv) = gradient: every element written, the query, key and value heads of every
 * group (a key / value head sums the gradients of its group's H/G query heads itself). */
void lt_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                           int B, int T, int H, int G, int D, float dropout_p, uint64_t dropout_key,
                           int head_offset, int heads_total);

/* Block attention with global positions, the pieces of ring attention (context parallelism): a rank's
 * queries against one block of keys and values (its own or a peer's), merged across blocks by
 * attention_merge. Queries come from a fused qkv [B, Tq, G, H/G + 2, D] (its key / value heads unused),
 * keys and values from kv [B, Tk, G, 2, D] (per group its key head, then its value head). q_pos [Tq] and
 * k_pos [Tk] are the tokens' global positions in the sequence of S tokens (the same for every sample);
 * element (i, j) takes part iff k_pos[j] <= q_pos[i]. Scale 1/sqrt(D), GQA as above.
 * Forward: out [B, Tq, H, D] = attention over the allowed keys of this block alone (normalised by this
 * block's softmax sum), lse [B, H, Tq] = log-sum-exp of the allowed scaled scores; a row with none gets
 * lse -INFINITY and out 0. Dropout as lt_attention_forward's at global indices: element (b, h, i, j) dropped
 * iff lt_rng_uniform(key, ((b*heads_total + head_offset + h)*S + q_pos[i])*S + k_pos[j]) < p. So with
 * Tq = Tk = S, positions 0..S-1 and kv the key / value heads of qkv it is lt_attention_forward. */
void lt_attention_kv_forward(float *out, float *lse, const float *qkv, const float *kv, int B, int Tq, int Tk, int H,
                             int G, int D, const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                             uint64_t dropout_key, int head_offset, int heads_total);
/* Online-softmax merge of a block's result into the running one, in place: lse' = logaddexp(lse, lse_b),
 * out' = out exp(lse - lse') + out_b exp(lse_b - lse'); a side at -INFINITY adds nothing (both: lse stays
 * -INFINITY, out 0). out, out_b [B, T, H, D]; lse, lse_b [B, H, T]. */
void lt_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b, int B, int T, int H, int D);
/* This block's share of the gradient, from the FINAL out and lse (merged over every block of the ring):
 * P = exp(score - lse), dP = dout . v (dropout-masked), dS = P (dP - delta), delta = rowsum(dout * out).
 * dq: the query heads of a [B, Tq, G, H/G + 2, D] buffer, ACCUMULATED (+=; its key / value heads
 * untouched); dkv [B, Tk, G, 2, D]: this block's dK, dV, WRITTEN (a key head sums its group's query heads). */
void lt_attention_kv_backward(float *dq, float *dkv, const float *dout, const float *qkv, const float *kv,
                              const float *out, const float *lse, int B, int Tq, int Tk, int H, int G, int D,
                              const int32_t *q_pos, const int32_t *k_pos, int S, float dropout_p,
                              uint64_t dropout_key, int head_offset, int heads_total);

/* Rotary position embedding, in place on the query and key heads of a fused qkv buffer (layout above).
 * Non-interleaved ("rotate half"): pairs (i, i + D/2), angle p(t) * base^(-2i/D), i < D/2, with token t's
 * position p(t) = pos ? pos[t] : t (pos: T int32, the same for every sample; nullable). D must be even.
 * Backward applies the inverse rotation to the query and key parts of dqkv, in place. */
void lt_rope_forward(float *qkv, int B, int T, int H, int G, int D, float base, const int32_t *pos);
void lt_rope_backward(float *dqkv, int B, int T, int H, int G, int D, float base, const int32_t *pos);

/* Megatron's q_layernorm and k_layernorm on a fused qkv buffer of N = B * T tokens (layout above): each
 * D-sized query head normalised over its D values with qweight / qbias, each key head with kweight / kbias;
 * value heads copied unchanged. LayerNorm when mean is given, RMSNorm when mean is NULL (no biases then;
 * for LayerNorm they are nullable). Saves mean, rstd [N*H + N*G]: the query heads' rows (token-major),
 * then the key heads'. out must not alias inp. */
void lt_qk_norm_forward(float *out, float *mean, float *rstd, const float *inp, const float *qweight,
                        const float *qbias, const float *kweight, const float *kbias, int N, int H, int G, int D,
                        float eps);
/* dinp (qkv layout) WRITTEN: the value heads are dout's, the query and key heads their norms' input
 * gradients; dqweight, dqbias, dkweight, dkbias += (biases nullable). mean NULL: RMSNorm, as forward. */
void lt_qk_norm_backward(float *dinp, float *dqweight, float *dqbias, float *dkweight, float *dkbias,
                         const float *dout, const float *inp, const float *qweight, const float *kweight,
                         const float *mean, const float *rstd, int N, int H, int G, int D);

/* ---- activations and elementwise ---- */
/* Softmax over the last dim of inp[N, C]. Backward writes dinp. */
void lt_softmax_forward(float *out, const float *inp, int N, int C);
void lt_softmax_backward(float *dinp, const float *dout, const float *out, int N, int C);
/* Exact (erf) GELU, as torch.nn.functional.gelu. Backward writes dinp. */
void lt_gelu_forward(float *out, const float *inp, int64_t n);
void lt_gelu_backward(float *dinp, const float *dout, const float *inp, int64_t n);
/* GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): Megatron's openai_gelu and
 * its fused bias-GELU, GPT-2's gelu_new, and what cuBLASLt's GELU epilogue computes. Backward writes dinp. */
void lt_gelu_tanh_forward(float *out, const float *inp, int64_t n);
void lt_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, int64_t n);
/* SwiGLU on inp[N, 2F] (Megatron's gated fc1 output): out[N, F] = silu(inp[:, :F]) * inp[:, F:].
 * Backward writes both halves of dinp[N, 2F]. */
void lt_swiglu_forward(float *out, const float *inp, int N, int F);
void lt_swiglu_backward(float *dinp, const float *dout, const float *inp, int N, int F);
/* out = a + b (out may alias a or b). Backward: da += dout, db += dout (either nullable). */
void lt_add_forward(float *out, const float *a, const float *b, int64_t n);
void lt_add_backward(float *da, float *db, const float *dout, int64_t n);
/* Inverted dropout; element i kept when lt_rng_uniform(key, first + i) >= p, then scaled by 1/(1-p).
 * out may alias inp. Backward regenerates the mask from (key, first) and writes dinp. */
void lt_dropout_forward(float *out, const float *inp, int64_t n, float p, uint64_t key, uint64_t first);
void lt_dropout_backward(float *dinp, const float *dout, int64_t n, float p, uint64_t key, uint64_t first);

/* ---- loss ----
 * Softmax cross-entropy fused over logits[N, V]: forward writes losses[N] and lse[N] and keeps no
 * probabilities. Targets < 0 are ignored (loss 0, no gradient). A target >= V is a column another rank
 * holds (vocabulary parallelism, engine/parallel/vocab.h): loss 0, and backward writes the softmax part
 * of the gradient without the one-hot.
 * Backward writes (not accumulates) dlogits = (softmax(logits) - onehot(target)) * dloss[n], and may be
 * called with dlogits == logits, so the logits buffer becomes its own gradient: the V-wide tensor
 * exists once. */
void lt_cross_entropy_forward(float *losses, float *lse, const float *logits, const int32_t *targets, int N, int V);
void lt_cross_entropy_backward(float *dlogits, const float *logits, const float *lse, const int32_t *targets,
                               const float *dloss, int N, int V);

/* ---- optimizer kernels ---- */
/* AdamW (decoupled weight decay, PyTorch semantics), bias correction with 1-based step. */
void lt_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t step);
/* SGD with momentum (PyTorch semantics: buf = momentum*buf + grad + wd*param; param -= lr*buf).
 * momentum_buf nullable when momentum == 0. */
void lt_sgd_update(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                   float weight_decay);
/* Sum of squares in double (for global-norm clipping), and in-place scaling. */
double lt_sum_squares(const float *x, int64_t n);
void lt_scale(float *x, int64_t n, float s);

#endif

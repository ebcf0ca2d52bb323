/* End-to-end tests of the GPT decoder (engine/model/gpt.h):
 *   1. backward against central finite differences of the mean loss, for every parameter tensor of
 *      several configurations (LayerNorm/GELU/learned positions/tied/bias; RMSNorm/SwiGLU/RoPE/untied/
 *      no bias; GQA with kv_channels != hidden/heads; ignored targets), plus gradient accumulation;
 *   2. dropout: same seed → same loss, other seed → other loss, finite differences still match;
 *      eval mode (training 0) computes bit for bit what the model without dropout computes (loss,
 *      logits, gradients) whatever the seed, while training mode with seed 0 drops;
 *   3. layout-independent init and init statistics;
 *   4. errors (bad token id, T > seq_length, invalid config);
 *   5. Megatron parameter names and shapes;
 *   6. a few SGD steps overfit one batch;
 *   7. bf16 mixed precision (the CPU reference kernels): close to fp32, fp32 main weights and
 *      gradients, and the bf16 copy follows every change of the main weights;
 *   8. Megatron's add_qkv_bias, layernorm_zero_centered_gamma and qk_layernorm: finite differences
 *      alone and combined, names and init, and zero-centred gamma g
 *      computing exactly what ordinary gamma 1 + g computes (outputs and gradients). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/rng.h"
#include "engine/core/tensor.h"
#include "engine/model/gpt.h"
#include "engine/model/moe_mlp.h"
#include "engine/ops/ops.h"
#include "tests/tap.h"

/* ---- helpers ---- */

static lt_gpt_config small_config(void) {
    lt_gpt_config c;
    memset(&c, 0, sizeof c);
    c.num_layers = 2;
    c.hidden_size = 16;
    c.num_attention_heads = 4;
    c.num_query_groups = 4;
    c.kv_channels = 4;
    c.ffn_hidden_size = 32;
    c.seq_length = 8;
    c.vocab_size = 32;
    c.rmsnorm = 0;
    c.layernorm_epsilon = 1e-5f;
    c.gated_linear_unit = 0;
    c.rope = 0;
    c.rotary_base = 10000.0f;
    c.share_embeddings_and_output_weights = 1;
    c.add_bias_linear = 1;
    c.init_method_std = 0.2f;
    c.hidden_dropout = 0.0f;
    c.attention_dropout = 0.0f;
    c.seed = 1234;
    return c;
}

static lt_gpt *new_model(const lt_gpt_config *c) {
    char err[256] = "";
    lt_gpt *m = lt_gpt_new(c, err, sizeof err);
    if (!m) {
        TAP_CHECK(0, "lt_gpt_new failed: %s", err);
        exit(tap_done() | 1);
    }
    return m;
}

static float *wdata(lt_gpt *m) { return lt_tensor_data(lt_gpt_weights(m)); }
static float *gdata(lt_gpt *m) { return lt_tensor_data(lt_gpt_grads(m)); }

static int64_t flat_total(lt_gpt *m) {
    const lt_gpt_param *p = lt_gpt_param_info(m, lt_gpt_num_params(m) - 1);
    return p->offset + p->numel;
}

typedef struct {
    int B, T;
    int32_t tokens[64], targets[64];
} batch;

/* Deterministic random batch; targets[i] = -1 where ignore_every divides i + 1 (0: none ignored). */
static batch make_batch(int B, int T, int V, uint64_t key, int ignore_every) {
    batch b;
    b.B = B;
    b.T = T;
    for (int i = 0; i < B * T; i++) {
        b.tokens[i] = (int32_t)(lt_rng_uniform(key, 2 * (uint64_t)i) * (float)V) % V;
        b.targets[i] = (int32_t)(lt_rng_uniform(key, 2 * (uint64_t)i + 1) * (float)V) % V;
        if (ignore_every && (i + 1) % ignore_every == 0) b.targets[i] = (i % 2) ? -1 : -100;
    }
    return b;
}

/* Mean loss of one forward (the context is freed). */
/* The mean loss of a training forward, plus an MoE model's aux and z losses (what backward's gradient
 * is of: their scale is 1 until set). */
static float loss_of(lt_gpt *m, const batch *b, uint64_t dseed) {
    char err[256] = "";
    float loss = NAN;
    int64_t nv = 0;
    lt_gpt_moe_totals moe;
    lt_gpt_take_moe_stats(m, NULL, NULL); /* what earlier forwards left */
    /* each evaluation a step of its own (global_aux_loss's tracker starts again), the gradients kept */
    const size_t bytes = sizeof(float) * (size_t)flat_total(m);
    float *kept = malloc(bytes);
    memcpy(kept, gdata(m), bytes);
    lt_gpt_zero_grad(m);
    memcpy(gdata(m), kept, bytes);
    free(kept);
    lt_gpt_ctx *c = lt_gpt_forward(m, b->tokens, b->targets, b->B, b->T, 1, dseed, &loss, &nv, err, sizeof err);
    if (!c) {
        TAP_CHECK(0, "forward failed: %s", err);
        return NAN;
    }
    lt_gpt_take_moe_stats(m, NULL, &moe);
    lt_gpt_ctx_free(c);
    return (float)((double)loss + moe.aux_loss + moe.z_loss);
}

/* Forward + backward with grad_scale = 1 / num_valid (so the gradient is d(mean loss)), accumulating. */
static float fwd_bwd(lt_gpt *m, const batch *b, uint64_t dseed, int64_t *num_valid) {
    char err[256] = "";
    float loss = NAN;
    int64_t nv = 0;
    lt_gpt_ctx *c = lt_gpt_forward(m, b->tokens, b->targets, b->B, b->T, 1, dseed, &loss, &nv, err, sizeof err);
    if (!c) {
        TAP_CHECK(0, "forward failed: %s", err);
        return NAN;
    }
    if (lt_gpt_backward(m, c, nv ? 1.0f / (float)nv : 0.0f, err, sizeof err) != 0) TAP_CHECK(0, "backward: %s", err);
    if (num_valid) *num_valid = nv;
    return loss;
}

/* Tolerances of the finite-difference comparison (fp32 forward, eps = 1e-2 on weights of std 0.2):
 * the loss is ~3.5, so its rounding noise (~1e-6) divided by 2 eps gives ~5e-5 of noise, and the
 * O(eps^2) truncation error is of the same order. */
#define FD_EPS 1e-2f
#define FD_ATOL 3e-4
#define FD_RTOL 2e-2
/* Along a random unit direction over a whole tensor the perturbation of each element is small, so the
 * comparison is tighter. */
#define DIR_ATOL 1e-4
#define DIR_RTOL 5e-3

/* Central difference of the loss along the perturbation w[idx[k]] += eps * dir[k] (in place, restored).
 * Returns fd and sets *an to the analytic g . delta / (2 eps), using the deltas fp32 actually applied. */
static double fd_along(lt_gpt *m, const batch *b, uint64_t dseed, const float *g, const int64_t *idx,
                       const float *dir, int n, float eps, double *an) {
    float *w = wdata(m);
    float *w0 = malloc(sizeof(float) * (size_t)n);
    double *dp = malloc(sizeof(double) * (size_t)n), *dm = malloc(sizeof(double) * (size_t)n);
    for (int k = 0; k < n; k++) w0[k] = w[idx[k]];
    for (int k = 0; k < n; k++) {
        w[idx[k]] = w0[k] + eps * dir[k];
        dp[k] = (double)w[idx[k]] - w0[k];
    }
    double lp = loss_of(m, b, dseed);
    for (int k = 0; k < n; k++) {
        w[idx[k]] = w0[k] - eps * dir[k];
        dm[k] = (double)w0[k] - w[idx[k]];
    }
    double lm = loss_of(m, b, dseed);
    for (int k = 0; k < n; k++) w[idx[k]] = w0[k];
    double a = 0;
    for (int k = 0; k < n; k++) a += (double)g[idx[k]] * (dp[k] + dm[k]);
    *an = a / (2.0 * eps);
    free(w0);
    free(dp);
    free(dm);
    return (lp - lm) / (2.0 * eps);
}

static int close_enough(double fd, double an, double atol, double rtol, double *ratio) {
    double tol = atol + rtol * fmax(fabs(fd), fabs(an));
    double r = fabs(fd - an) / tol;
    if (isnan(r)) r = INFINITY;
    if (r > *ratio) *ratio = r;
    return r <= 1.0;
}

/* Gradient check of every parameter tensor: 5 sampled elements (first, last, 3 random) and one
 * random direction over the whole tensor; then gradient accumulation (two backwards = 2x). */
static void grad_check(const char *label, lt_gpt *m, const batch *b, uint64_t dseed) {
    lt_gpt_zero_grad(m);
    int64_t nv = 0;
    float loss = fwd_bwd(m, b, dseed, &nv);
    TAP_CHECK(isfinite(loss) && nv > 0, "%s: forward gives a finite loss %.4f over %lld valid targets", label,
              loss, (long long)nv);
    const int64_t total = flat_total(m);
    float *g = malloc(sizeof(float) * (size_t)total);
    memcpy(g, gdata(m), sizeof(float) * (size_t)total);

    /* Loss recomputed in double from the returned logits matches the returned mean loss. */
    {
        char err[256];
        float l2 = NAN;
        int64_t nv2 = 0;
        lt_gpt_ctx *c = lt_gpt_forward(m, b->tokens, b->targets, b->B, b->T, 1, dseed, &l2, &nv2, err, sizeof err);
        const float *logits = lt_gpt_ctx_logits(c);
        const int V = lt_gpt_get_config(m)->vocab_size;
        double sum = 0;
        int64_t cnt = 0;
        for (int i = 0; i < b->B * b->T; i++) {
            if (b->targets[i] < 0) continue;
            const float *row = logits + (size_t)i * V;
            double mx = row[0], s = 0;
            for (int v = 1; v < V; v++) mx = fmax(mx, row[v]);
            for (int v = 0; v < V; v++) s += exp((double)row[v] - mx);
            sum += mx + log(s) - row[b->targets[i]];
            cnt++;
        }
        double ref = sum / (double)cnt;
        TAP_CHECK(l2 == loss && nv2 == nv && cnt == nv && fabs(ref - loss) <= 1e-5 * fabs(ref) + 1e-6,
                  "%s: mean loss %.6f = mean cross-entropy of the logits %.6f over %lld targets", label, loss, ref,
                  (long long)cnt);
        lt_gpt_ctx_free(c);
    }

    uint64_t key = lt_rng_key(7, label);
    for (int i = 0; i < lt_gpt_num_params(m); i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        double ratio = 0, max_g = 0, sumsq = 0;
        int ok = 1;
        for (int64_t j = 0; j < p->numel; j++) {
            double v = g[p->offset + j];
            sumsq += v * v;
            if (!isfinite(v)) ok = 0;
        }
        /* Elements: first, last and three random ones. */
        int64_t sample[5] = {0, p->numel - 1, 0, 0, 0};
        for (int k = 2; k < 5; k++)
            sample[k] = (int64_t)(lt_rng_uniform(key, (uint64_t)(i * 8 + k)) * (float)p->numel) % p->numel;
        double worst_fd = 0, worst_an = 0;
        for (int k = 0; k < 5; k++) {
            int64_t idx = p->offset + sample[k];
            float one = 1.0f;
            double an;
            double fd = fd_along(m, b, dseed, g, &idx, &one, 1, FD_EPS, &an);
            double before = ratio;
            if (!close_enough(fd, an, FD_ATOL, FD_RTOL, &ratio)) ok = 0;
            if (ratio > before) worst_fd = fd, worst_an = an;
            if (fabs(an) > max_g) max_g = fabs(an);
        }
        /* One random direction (unit norm) over the whole tensor. */
        int64_t *idx = malloc(sizeof(int64_t) * (size_t)p->numel);
        float *dir = malloc(sizeof(float) * (size_t)p->numel);
        lt_rng_fill_normal(dir, p->numel, key ^ 0x5eedull, (uint64_t)i << 32, 0.0f, 1.0f);
        double nrm = 0;
        for (int64_t j = 0; j < p->numel; j++) nrm += (double)dir[j] * dir[j];
        for (int64_t j = 0; j < p->numel; j++) {
            idx[j] = p->offset + j;
            dir[j] = (float)(dir[j] / sqrt(nrm));
        }
        double dan;
        double dfd = fd_along(m, b, dseed, g, idx, dir, (int)p->numel, FD_EPS, &dan);
        double dratio = 0;
        if (!close_enough(dfd, dan, DIR_ATOL, DIR_RTOL, &dratio)) ok = 0;
        free(idx);
        free(dir);
        if (!(sumsq > 0)) ok = 0; /* every tensor takes part in the loss */
        TAP_CHECK(ok,
                  "%s: d(mean loss)/d %s matches finite differences (elements: worst err/tol %.2f, fd %.3g vs "
                  "%.3g, max |g| %.2e; direction: err/tol %.2f, fd %.4g vs %.4g; |g| %.2e)",
                  label, p->name, ratio, worst_fd, worst_an, max_g, dratio, dfd, dan, sqrt(sumsq));
    }

    /* Gradients accumulate: a second backward without zeroing doubles them. */
    fwd_bwd(m, b, dseed, NULL);
    const float *g2 = gdata(m);
    double maxdiff = 0, maxg = 0;
    for (int64_t j = 0; j < total; j++) {
        maxdiff = fmax(maxdiff, fabs((double)g2[j] - 2.0 * g[j]));
        maxg = fmax(maxg, fabs((double)g[j]));
    }
    TAP_CHECK(maxg > 0 && maxdiff <= 1e-6 * maxg, "%s: two backwards accumulate twice the gradient (max diff %.2e)",
              label, maxdiff);
    lt_gpt_zero_grad(m);
    double zs = 0;
    for (int64_t j = 0; j < total; j++) zs += fabs((double)gdata(m)[j]);
    TAP_CHECK(zs == 0, "%s: zero_grad clears the gradients", label);
    free(g);
}

/* ---- 1. gradient checks ---- */

static void test_gradients(void) {
    /* (a) LayerNorm + GELU + learned positions + tied embeddings + bias. */
    lt_gpt_config a = small_config();
    lt_gpt *m = new_model(&a);
    batch b = make_batch(2, 8, a.vocab_size, 11, 0);
    grad_check("(a) layernorm/gelu/learned-pos/tied/bias", m, &b, 0);
    lt_gpt_free(m);

    /* (b) RMSNorm + SwiGLU + RoPE + untied output + no bias. */
    lt_gpt_config c = small_config();
    c.rmsnorm = 1;
    c.gated_linear_unit = 1;
    c.rope = 1;
    c.share_embeddings_and_output_weights = 0;
    c.add_bias_linear = 0;
    c.seed = 99;
    m = new_model(&c);
    b = make_batch(2, 8, c.vocab_size, 12, 0);
    grad_check("(b) rmsnorm/swiglu/rope/untied/no-bias", m, &b, 0);
    lt_gpt_free(m);

    /* (c) GQA: 4 heads in 2 query groups, kv_channels 6 != 16 / 4, with RoPE, bias and T < seq_length. */
    lt_gpt_config q = small_config();
    q.num_query_groups = 2;
    q.kv_channels = 6;
    q.rope = 1;
    q.gated_linear_unit = 1;
    q.share_embeddings_and_output_weights = 0;
    q.seed = 5;
    m = new_model(&q);
    b = make_batch(2, 7, q.vocab_size, 13, 0);
    grad_check("(c) gqa 4 heads/2 groups, kv_channels 6", m, &b, 0);
    lt_gpt_free(m);

    /* (c2) GELU's tanh approximation (openai_gelu), through the fused MLP ops, with bias. */
    lt_gpt_config t = small_config();
    t.gelu_tanh = 1;
    t.seed = 31;
    m = new_model(&t);
    b = make_batch(2, 8, t.vocab_size, 15, 0);
    grad_check("(c2) gelu_tanh (openai_gelu)", m, &b, 0);
    lt_gpt_free(m);

    /* (d) Ignored targets (-1 and -100), GQA with learned positions and GELU. */
    lt_gpt_config d = small_config();
    d.num_query_groups = 2;
    d.kv_channels = 8;
    d.seed = 77;
    m = new_model(&d);
    b = make_batch(2, 8, d.vocab_size, 14, 3);
    int expected = 0;
    for (int i = 0; i < 16; i++) expected += b.targets[i] >= 0;
    int64_t nv = 0;
    float loss = NAN;
    char err[128];
    lt_gpt_ctx *ctx = lt_gpt_forward(m, b.tokens, b.targets, 2, 8, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(ctx && nv == expected && expected < 16, "(d) num_valid counts only targets >= 0 (%lld of 16)",
              (long long)nv);
    lt_gpt_ctx_free(ctx);
    /* Only the valid targets count: the gradient check uses grad_scale = 1 / num_valid. */
    grad_check("(d) ignored targets", m, &b, 0);

    /* Inference: no targets → loss 0, num_valid 0, the same logits. */
    lt_gpt_ctx *c1 = lt_gpt_forward(m, b.tokens, b.targets, 2, 8, 1, 0, &loss, &nv, err, sizeof err);
    float l0 = -1;
    int64_t nv0 = -1;
    lt_gpt_ctx *c0 = lt_gpt_forward(m, b.tokens, NULL, 2, 8, 1, 0, &l0, &nv0, err, sizeof err);
    TAP_CHECK(c0 && c1 && l0 == 0.0f && nv0 == 0 &&
                  memcmp(lt_gpt_ctx_logits(c0), lt_gpt_ctx_logits(c1), sizeof(float) * 16 * d.vocab_size) == 0,
              "inference forward (targets NULL): loss 0, num_valid 0, same logits");
    lt_gpt_ctx_free(c0);
    lt_gpt_ctx_free(c1);
    lt_gpt_free(m);
}

/* ---- 2. dropout ---- */

static void test_dropout(void) {
    lt_gpt_config c = small_config();
    c.hidden_dropout = 0.2f;
    c.attention_dropout = 0.25f;
    lt_gpt *m = new_model(&c);
    batch b = make_batch(2, 8, c.vocab_size, 21, 0);
    float l1 = loss_of(m, &b, 42), l2 = loss_of(m, &b, 42), l3 = loss_of(m, &b, 43);
    TAP_CHECK(l1 == l2, "dropout: the same dropout seed gives the identical loss (%.7f, %.7f)", l1, l2);
    TAP_CHECK(l1 != l3, "dropout: another dropout seed gives another loss (%.7f, %.7f)", l1, l3);
    lt_gpt_config nod = c;
    nod.hidden_dropout = nod.attention_dropout = 0;
    lt_gpt *m0 = new_model(&nod);
    float ln = loss_of(m0, &b, 42);
    TAP_CHECK(ln != l1 && ln == loss_of(m0, &b, 43), "dropout: p = 0 ignores the seed and differs from p > 0");
    lt_gpt_free(m0);
    grad_check("(e) dropout seed 42", m, &b, 42);
    lt_gpt_free(m);

    /* Dropout with RMSNorm/SwiGLU/RoPE/GQA too. */
    c.rmsnorm = c.gated_linear_unit = c.rope = 1;
    c.num_query_groups = 2;
    c.add_bias_linear = 0;
    c.share_embeddings_and_output_weights = 0;
    m = new_model(&c);
    grad_check("(f) dropout + rmsnorm/swiglu/rope/gqa", m, &b, 1234567);
    lt_gpt_free(m);
}

/* Eval mode against the same weights configured without dropout (Megatron's model.eval()). */

/* Bytes of the logits [B*T, V] of a batch (compute dtype: bf16 under mixed precision). */
static size_t logits_bytes(const lt_gpt_config *c, const batch *b) {
    return (size_t)(c->bf16 ? 2 : 4) * (size_t)b->B * b->T * c->vocab_size;
}

/* Forward (training mode or not) + backward of the mean loss on a zeroed gradient; copies the
 * logits and the gradients out (CPU backend: host memory). */
static float run_mode(lt_gpt *m, const batch *b, int training, uint64_t dseed, void *logits, float *grads) {
    char err[256] = "";
    float loss = NAN;
    int64_t nv = 0;
    lt_gpt_zero_grad(m);
    lt_gpt_ctx *c = lt_gpt_forward(m, b->tokens, b->targets, b->B, b->T, training, dseed, &loss, &nv, err, sizeof err);
    if (!c) {
        TAP_CHECK(0, "forward failed: %s", err);
        return NAN;
    }
    memcpy(logits, lt_gpt_ctx_logits(c), logits_bytes(lt_gpt_get_config(m), b));
    if (lt_gpt_backward(m, c, 1.0f / (float)nv, err, sizeof err) != 0) TAP_CHECK(0, "backward: %s", err);
    memcpy(grads, gdata(m), sizeof(float) * (size_t)flat_total(m));
    return loss;
}

static void eval_case(const char *label, lt_gpt_config c) {
    lt_gpt_config nod = c;
    nod.hidden_dropout = nod.attention_dropout = 0;
    lt_gpt *m = new_model(&c), *m0 = new_model(&nod);
    batch b = make_batch(2, 8, c.vocab_size, 77, 5);
    const size_t nl = logits_bytes(&c, &b), ng = (size_t)flat_total(m);
    TAP_CHECK(ng == (size_t)flat_total(m0) && memcmp(wdata(m), wdata(m0), sizeof(float) * ng) == 0,
              "eval %s: the models with and without dropout start from the same weights", label);
    char *lg[4];
    float *gr[4], loss[4];
    for (int k = 0; k < 4; k++) {
        lg[k] = malloc(nl);
        gr[k] = malloc(sizeof(float) * ng);
    }
    loss[0] = run_mode(m0, &b, 1, 42, lg[0], gr[0]); /* no dropout configured */
    loss[1] = run_mode(m, &b, 0, 0, lg[1], gr[1]);   /* eval mode, seed 0 */
    loss[2] = run_mode(m, &b, 0, 42, lg[2], gr[2]);  /* eval mode, another seed */
    loss[3] = run_mode(m, &b, 1, 0, lg[3], gr[3]);   /* training mode, seed 0 */
    for (int k = 1; k <= 2; k++) {
        TAP_CHECK(loss[k] == loss[0], "eval %s (seed %d): the loss is bit-identical to the model without dropout "
                  "(%.9g, %.9g)", label, k == 1 ? 0 : 42, loss[k], loss[0]);
        TAP_CHECK(memcmp(lg[k], lg[0], nl) == 0,
                  "eval %s (seed %d): the logits are bit-identical to the model without dropout", label,
                  k == 1 ? 0 : 42);
        TAP_CHECK(memcmp(gr[k], gr[0], sizeof(float) * ng) == 0,
                  "eval %s (seed %d): the gradients are bit-identical to the model without dropout", label,
                  k == 1 ? 0 : 42);
    }
    TAP_CHECK(isfinite(loss[3]) && loss[3] != loss[0] && memcmp(lg[3], lg[0], nl) != 0,
              "eval %s: training mode with seed 0 drops (loss %.7f, without dropout %.7f)", label, loss[3], loss[0]);
    for (int k = 0; k < 4; k++) {
        free(lg[k]);
        free(gr[k]);
    }
    lt_gpt_free(m);
    lt_gpt_free(m0);
}

static void test_eval_mode(void) {
    lt_gpt_config c = small_config(); /* learned positions: the embedding's dropout too */
    c.hidden_dropout = 0.2f;
    c.attention_dropout = 0.25f;
    eval_case("(both dropouts)", c);
    lt_gpt_config h = c;
    h.attention_dropout = 0;
    eval_case("(hidden only)", h);
    lt_gpt_config a = c;
    a.hidden_dropout = 0;
    eval_case("(attention only)", a);
    c.rmsnorm = c.gated_linear_unit = c.rope = 1;
    c.num_query_groups = 2;
    c.add_bias_linear = 0;
    c.share_embeddings_and_output_weights = 0;
    eval_case("(rmsnorm/swiglu/rope/gqa)", c);
    c.bf16 = 1;
    eval_case("(bf16)", c);
}

/* ---- 3. initialisation ---- */

static const float *param_ptr(lt_gpt *m, const char *name, int64_t *numel) {
    int i = lt_gpt_find_param(m, name);
    if (i < 0) return NULL;
    const lt_gpt_param *p = lt_gpt_param_info(m, i);
    if (numel) *numel = p->numel;
    return wdata(m) + p->offset;
}

static void stats(const float *x, int64_t n, double *mean, double *std) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    *mean = s / (double)n;
    for (int64_t i = 0; i < n; i++) ss += ((double)x[i] - *mean) * ((double)x[i] - *mean);
    *std = sqrt(ss / (double)n);
}

static int std_close(lt_gpt *m, const char *name, double want, double rtol) {
    int64_t n = 0;
    const float *x = param_ptr(m, name, &n);
    if (!x) return 0;
    double mean, std;
    stats(x, n, &mean, &std);
    int ok = fabs(std / want - 1.0) <= rtol && fabs(mean) <= 4.0 * want / sqrt((double)n);
    TAP_CHECK(ok, "init: %s has mean %.2e and std %.5f ~ %.5f (%lld values)", name, mean, std, want, (long long)n);
    return ok;
}

static int all_equal(lt_gpt *m, const char *name, float v) {
    int64_t n = 0;
    const float *x = param_ptr(m, name, &n);
    if (!x) return 0;
    for (int64_t i = 0; i < n; i++)
        if (x[i] != v) return 0;
    return 1;
}

static int same_values(lt_gpt *a, lt_gpt *b, const char *name, int64_t n) {
    int64_t na = 0, nb = 0;
    const float *x = param_ptr(a, name, &na), *y = param_ptr(b, name, &nb);
    if (!x || !y) return 0;
    if (n < 0) {
        if (na != nb) return 0;
        n = na;
    }
    return n <= na && n <= nb && memcmp(x, y, sizeof(float) * (size_t)n) == 0;
}

static void test_init(void) {
    lt_gpt_config c = small_config();
    c.hidden_size = 64;
    c.ffn_hidden_size = 256;
    c.kv_channels = 16;
    c.vocab_size = 512;
    c.seq_length = 64;
    c.init_method_std = 0.02f;
    c.share_embeddings_and_output_weights = 0;
    lt_gpt *m2 = new_model(&c), *m2b = new_model(&c);
    const int64_t total = flat_total(m2);
    TAP_CHECK(memcmp(wdata(m2), wdata(m2b), sizeof(float) * (size_t)total) == 0,
              "init: two models with the same seed have bit-identical weights");
    lt_gpt_config cs = c;
    cs.seed = c.seed + 1;
    lt_gpt *ms = new_model(&cs);
    int64_t n = 0, same = 0;
    const float *x = param_ptr(m2, "embedding.word_embeddings.weight", &n);
    const float *y = param_ptr(ms, "embedding.word_embeddings.weight", NULL);
    for (int64_t i = 0; i < n; i++) same += x[i] == y[i];
    int fc_same = same_values(m2, ms, "decoder.layers.0.mlp.linear_fc1.weight", -1);
    TAP_CHECK(same < n / 100 && !fc_same, "init: another seed gives other weights (%lld of %lld equal)",
              (long long)same, (long long)n);
    /* Re-initialising restores the same values. */
    float *w = wdata(m2b);
    for (int64_t i = 0; i < total; i++) w[i] = 3.0f;
    lt_gpt_init_weights(m2b);
    TAP_CHECK(memcmp(wdata(m2), wdata(m2b), sizeof(float) * (size_t)total) == 0,
              "init: lt_gpt_init_weights restores the same weights");

    /* Layout independence: a 3-layer model, a smaller vocabulary, RoPE (no position table). */
    lt_gpt_config c3 = c;
    c3.num_layers = 3;
    lt_gpt *m3 = new_model(&c3);
    TAP_CHECK(same_values(m2, m3, "embedding.word_embeddings.weight", -1) &&
                  same_values(m2, m3, "embedding.position_embeddings.weight", -1) &&
                  same_values(m2, m3, "decoder.layers.0.mlp.linear_fc1.weight", -1) &&
                  same_values(m2, m3, "decoder.layers.1.self_attention.linear_qkv.weight", -1) &&
                  same_values(m2, m3, "output_layer.weight", -1),
              "init: 2-layer and 3-layer models share word/position embeddings, fc1, qkv and output weights");
    TAP_CHECK(lt_gpt_param_info(m2, lt_gpt_find_param(m2, "output_layer.weight"))->offset !=
                  lt_gpt_param_info(m3, lt_gpt_find_param(m3, "output_layer.weight"))->offset,
              "init: ... although they sit at different offsets in the flat buffer");
    lt_gpt_config cv = c;
    cv.vocab_size = 384;
    cv.rope = 1;
    lt_gpt *mv = new_model(&cv);
    TAP_CHECK(same_values(m2, mv, "embedding.word_embeddings.weight", 384LL * 64) &&
                  same_values(m2, mv, "output_layer.weight", 384LL * 64) &&
                  same_values(m2, mv, "decoder.layers.1.mlp.linear_fc2.weight", -1) &&
                  lt_gpt_find_param(mv, "embedding.position_embeddings.weight") < 0,
              "init: a smaller vocabulary (and RoPE) keeps the first 384 embedding/output rows and the layers");

    /* Statistics: init_method_std, scaled std / sqrt(2 L) for linear_proj and linear_fc2. */
    const double s = c.init_method_std;
    std_close(m2, "embedding.word_embeddings.weight", s, 0.03);
    std_close(m2, "embedding.position_embeddings.weight", s, 0.06);
    std_close(m2, "output_layer.weight", s, 0.03);
    std_close(m2, "decoder.layers.0.self_attention.linear_qkv.weight", s, 0.05);
    std_close(m2, "decoder.layers.1.mlp.linear_fc1.weight", s, 0.04);
    std_close(m2, "decoder.layers.0.self_attention.linear_proj.weight", s / sqrt(4.0), 0.06);
    std_close(m2, "decoder.layers.1.mlp.linear_fc2.weight", s / sqrt(4.0), 0.04);
    std_close(m3, "decoder.layers.2.self_attention.linear_proj.weight", s / sqrt(6.0), 0.06);
    std_close(m3, "decoder.layers.0.mlp.linear_fc2.weight", s / sqrt(6.0), 0.04);
    int ones = 1, zeros = 1, nb = 0, nn = 0;
    for (int i = 0; i < lt_gpt_num_params(m3); i++) {
        const char *name = lt_gpt_param_info(m3, i)->name;
        size_t len = strlen(name);
        if (len > 16 && strcmp(name + len - 16, "layernorm.weight") == 0) ones &= all_equal(m3, name, 1.0f), nn++;
        if (len > 5 && strcmp(name + len - 5, ".bias") == 0) zeros &= all_equal(m3, name, 0.0f), nb++;
    }
    TAP_CHECK(ones && nn == 7, "init: all %d layernorm weights are 1", nn);
    TAP_CHECK(zeros && nb == 3 * 6 + 1, "init: all %d biases are 0", nb);
    lt_gpt_free(m2);
    lt_gpt_free(m2b);
    lt_gpt_free(ms);
    lt_gpt_free(m3);
    lt_gpt_free(mv);
}

/* ---- 4. errors ---- */

static void test_errors(void) {
    lt_gpt_config c = small_config();
    lt_gpt *m = new_model(&c);
    batch b = make_batch(2, 8, c.vocab_size, 31, 0);
    char err[256];
    float loss;
    int64_t nv;

    b.tokens[5] = 37;
    strcpy(err, "");
    lt_gpt_ctx *ctx = lt_gpt_forward(m, b.tokens, b.targets, 2, 8, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(!ctx && strstr(err, "37") && strstr(err, "token"), "error: token id out of range: \"%s\"", err);
    lt_gpt_ctx_free(ctx);

    b.tokens[5] = -3;
    strcpy(err, "");
    ctx = lt_gpt_forward(m, b.tokens, b.targets, 2, 8, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(!ctx && strstr(err, "-3"), "error: negative token id: \"%s\"", err);
    lt_gpt_ctx_free(ctx);
    b.tokens[5] = 1;

    b.targets[3] = 32;
    strcpy(err, "");
    ctx = lt_gpt_forward(m, b.tokens, b.targets, 2, 8, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(!ctx && strstr(err, "32") && strstr(err, "target"), "error: target id out of range: \"%s\"", err);
    lt_gpt_ctx_free(ctx);
    b.targets[3] = 1;

    batch big = make_batch(1, 9, c.vocab_size, 32, 0);
    strcpy(err, "");
    ctx = lt_gpt_forward(m, big.tokens, big.targets, 1, 9, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(!ctx && strstr(err, "seq_length") && strstr(err, "9"), "error: T > seq_length: \"%s\"", err);
    lt_gpt_ctx_free(ctx);

    strcpy(err, "");
    ctx = lt_gpt_forward(m, b.tokens, b.targets, 0, 8, 1, 0, &loss, &nv, err, sizeof err);
    TAP_CHECK(!ctx && err[0], "error: B = 0: \"%s\"", err);
    lt_gpt_ctx_free(ctx);

    /* The model still works after the errors. */
    TAP_CHECK(isfinite(loss_of(m, &b, 0)), "forward works after rejected batches");
    lt_gpt_free(m);

    lt_gpt_config bad = small_config();
    bad.num_query_groups = 3;
    strcpy(err, "");
    lt_gpt *mb = lt_gpt_new(&bad, err, sizeof err);
    TAP_CHECK(!mb && strstr(err, "num_query_groups"), "error: 4 heads in 3 query groups: \"%s\"", err);
    lt_gpt_free(mb);

    bad = small_config();
    bad.rope = 1;
    bad.kv_channels = 5;
    strcpy(err, "");
    mb = lt_gpt_new(&bad, err, sizeof err);
    TAP_CHECK(!mb && strstr(err, "kv_channels"), "error: RoPE with odd kv_channels: \"%s\"", err);
    lt_gpt_free(mb);

    bad = small_config();
    bad.num_layers = 0;
    strcpy(err, "");
    mb = lt_gpt_new(&bad, err, sizeof err);
    TAP_CHECK(!mb && strstr(err, "num_layers"), "error: num_layers 0: \"%s\"", err);
    lt_gpt_free(mb);
}

/* ---- 5. parameter names and shapes ---- */

typedef struct {
    const char *name;
    int ndim;
    int64_t d0, d1;
} expected_param;

static void check_names(const char *label, const lt_gpt_config *c, const expected_param *want, int n) {
    lt_gpt *m = new_model(c);
    int ok = lt_gpt_num_params(m) == n;
    int64_t end = 0;
    for (int i = 0; ok && i < n; i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        if (strcmp(p->name, want[i].name) != 0 || p->ndim != want[i].ndim || p->shape[0] != want[i].d0 ||
            (p->ndim == 2 && p->shape[1] != want[i].d1) || p->numel != want[i].d0 * (p->ndim == 2 ? want[i].d1 : 1) ||
            p->offset < end || lt_gpt_find_param(m, want[i].name) != i) {
            printf("# param %d: got %s [%lld, %lld] at %lld, want %s [%lld, %lld]\n", i, p->name,
                   (long long)p->shape[0], (long long)p->shape[1], (long long)p->offset, want[i].name,
                   (long long)want[i].d0, (long long)want[i].d1);
            ok = 0;
        }
        int nwd = strstr(p->name, "layernorm") != NULL || strstr(p->name, ".bias") != NULL;
        if (p->no_weight_decay != nwd) {
            printf("# param %s: no_weight_decay %d\n", p->name, p->no_weight_decay);
            ok = 0;
        }
        end = p->offset + p->numel;
    }
    ok = ok && end <= lt_tensor_numel(lt_gpt_weights(m)) &&
         lt_tensor_numel(lt_gpt_grads(m)) == lt_tensor_numel(lt_gpt_weights(m)) &&
         lt_gpt_find_param(m, "no.such.param") == -1 && lt_gpt_param_info(m, n) == NULL &&
         lt_gpt_param_info(m, -1) == NULL;
    TAP_CHECK(ok, "names: %s: %d parameters with Megatron's names, shapes and no_weight_decay, in order", label, n);
    lt_gpt_free(m);
}

static void test_names(void) {
    /* LayerNorm, learned positions, bias, untied, GELU; H = 4, G = 2, D = 8, C = 16, F = 24, L = 2. */
    lt_gpt_config c = small_config();
    c.num_query_groups = 2;
    c.kv_channels = 8;
    c.ffn_hidden_size = 24;
    c.share_embeddings_and_output_weights = 0;
    const int64_t V = 32, C = 16, S = 8, QKV = (4 + 2 * 2) * 8, HD = 4 * 8, F = 24;
    expected_param full[] = {
        {"embedding.word_embeddings.weight", 2, V, C},
        {"embedding.position_embeddings.weight", 2, S, C},
        {"decoder.layers.0.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.input_layernorm.bias", 1, C, 0},
        {"decoder.layers.0.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.0.self_attention.linear_qkv.bias", 1, QKV, 0},
        {"decoder.layers.0.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.0.self_attention.linear_proj.bias", 1, C, 0},
        {"decoder.layers.0.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.pre_mlp_layernorm.bias", 1, C, 0},
        {"decoder.layers.0.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.0.mlp.linear_fc1.bias", 1, F, 0},
        {"decoder.layers.0.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.layers.0.mlp.linear_fc2.bias", 1, C, 0},
        {"decoder.layers.1.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.1.input_layernorm.bias", 1, C, 0},
        {"decoder.layers.1.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.1.self_attention.linear_qkv.bias", 1, QKV, 0},
        {"decoder.layers.1.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.1.self_attention.linear_proj.bias", 1, C, 0},
        {"decoder.layers.1.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.1.pre_mlp_layernorm.bias", 1, C, 0},
        {"decoder.layers.1.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.1.mlp.linear_fc1.bias", 1, F, 0},
        {"decoder.layers.1.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.layers.1.mlp.linear_fc2.bias", 1, C, 0},
        {"decoder.final_layernorm.weight", 1, C, 0},
        {"decoder.final_layernorm.bias", 1, C, 0},
        {"output_layer.weight", 2, V, C},
    };
    check_names("layernorm/gelu/learned-pos/bias/untied/gqa", &c, full, (int)(sizeof full / sizeof full[0]));

    /* RMSNorm, RoPE, no bias, tied, SwiGLU (fc1 is [2F, C]), one layer. */
    c.num_layers = 1;
    c.rmsnorm = 1;
    c.rope = 1;
    c.add_bias_linear = 0;
    c.share_embeddings_and_output_weights = 1;
    c.gated_linear_unit = 1;
    expected_param lean[] = {
        {"embedding.word_embeddings.weight", 2, V, C},
        {"decoder.layers.0.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.0.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.0.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.mlp.linear_fc1.weight", 2, 2 * F, C},
        {"decoder.layers.0.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.final_layernorm.weight", 1, C, 0},
    };
    check_names("rmsnorm/swiglu/rope/no-bias/tied", &c, lean, (int)(sizeof lean / sizeof lean[0]));
}

/* ---- 6. a few SGD steps overfit one batch ---- */

static void test_sgd(void) {
    lt_gpt_config c = small_config();
    c.init_method_std = 0.02f;
    c.rmsnorm = 1;
    c.gated_linear_unit = 1;
    c.rope = 1;
    c.share_embeddings_and_output_weights = 0;
    lt_gpt *m = new_model(&c);
    batch b = make_batch(2, 8, c.vocab_size, 41, 0);
    const int64_t n = lt_tensor_numel(lt_gpt_weights(m));
    float first = NAN, last = NAN;
    int finite = 1;
    for (int step = 0; step < 30; step++) {
        lt_gpt_zero_grad(m);
        float loss = fwd_bwd(m, &b, 0, NULL);
        if (!isfinite(loss)) finite = 0;
        if (step == 0) first = loss;
        last = loss;
        lt_sgd_update(wdata(m), gdata(m), NULL, n, 1.0f, 0.0f, 0.0f);
    }
    float final = loss_of(m, &b, 0);
    TAP_CHECK(finite && fabsf(first - logf(32.0f)) < 0.1f, "sgd: initial loss %.4f ~ log(V) = %.4f", first,
              logf(32.0f));
    TAP_CHECK(finite && final < 0.5f * first && final <= last, "sgd: 30 steps on one batch: loss %.4f -> %.4f",
              first, final);
    lt_gpt_free(m);
}

/* ---- 7. bf16 mixed precision ---- */

/* max |a - b| / max |a| over n values. */
static double rel_diff(const float *a, const float *b, int64_t n) {
    double d = 0, scale = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        scale = fmax(scale, fabs((double)a[i]));
    }
    return scale > 0 ? d / scale : d;
}

static void test_bf16(void) {
    lt_gpt_config c = small_config();
    c.rope = 1;
    c.gated_linear_unit = 1;
    c.hidden_dropout = 0.1f;
    lt_gpt *f = new_model(&c);
    c.bf16 = 1;
    lt_gpt *h = new_model(&c);
    batch b = make_batch(2, 8, c.vocab_size, 77, 5);
    const int64_t n = lt_tensor_numel(lt_gpt_weights(f));
    TAP_CHECK(lt_gpt_weights(h)->dtype == LT_F32 && lt_gpt_grads(h)->dtype == LT_F32 &&
                  memcmp(wdata(f), wdata(h), sizeof(float) * (size_t)n) == 0,
              "bf16: main weights and gradients are fp32, initialised as in fp32");

    lt_gpt_zero_grad(f);
    lt_gpt_zero_grad(h);
    float lf = fwd_bwd(f, &b, 3, NULL), lh = fwd_bwd(h, &b, 3, NULL);
    /* bf16 keeps 8 bits of mantissa: one rounding is 2^-9 relative, a few layers of them stay near 1%. */
    TAP_CHECK(fabsf(lf - lh) <= 1e-2f * lf && lf != lh, "bf16: loss %.6f vs fp32 %.6f (within 1%%, not equal)", lh, lf);
    double dg = rel_diff(gdata(f), gdata(h), n);
    TAP_CHECK(dg < 5e-2, "bf16: gradients within 5%% of fp32 (max diff / max |grad| = %.3g)", dg);

    /* The bf16 copy is refreshed from the main weights at every forward. */
    for (int64_t i = 0; i < n; i++) wdata(f)[i] = wdata(h)[i] = wdata(h)[i] * 0.5f;
    lf = loss_of(f, &b, 3);
    lh = loss_of(h, &b, 3);
    TAP_CHECK(fabsf(lf - lh) <= 1e-2f * lf, "bf16: after the main weights change, loss %.6f follows fp32 %.6f", lh, lf);
    lt_gpt_free(f);
    lt_gpt_free(h);
}

/* ---- 8. add_qkv_bias, zero-centred gamma, qk_layernorm ---- */

/* Norm weights away from their init (1, or 0 when zero-centred): w += 0.5 * uniform(-1, 1), so the
 * checks see norms that scale. */
static void jitter_norm_weights(lt_gpt *m, uint64_t key) {
    for (int i = 0; i < lt_gpt_num_params(m); i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        size_t len = strlen(p->name);
        if (len < 16 || strcmp(p->name + len - 16, "layernorm.weight") != 0) continue;
        for (int64_t j = 0; j < p->numel; j++)
            wdata(m)[p->offset + j] += 0.5f * (2.0f * lt_rng_uniform(key, (uint64_t)(p->offset + j)) - 1.0f);
    }
}

/* One finite-difference case: the model of c (from seed), its norm weights jittered with key (none for
 * 0), on a [2, T] batch from batch_seed (every ignore_every-th target ignored; 0: none). */
static void flag_case(const char *name, lt_gpt_config c, uint64_t seed, uint64_t key, int T, uint64_t batch_seed,
                      int ignore_every, uint64_t dropout_seed) {
    c.seed = seed;
    lt_gpt *m = new_model(&c);
    if (key) jitter_norm_weights(m, key);
    batch b = make_batch(2, T, c.vocab_size, batch_seed, ignore_every);
    grad_check(name, m, &b, dropout_seed);
    lt_gpt_free(m);
}

static void test_flag_gradients(void) {
    /* add_qkv_bias without add_bias_linear: RMSNorm/SwiGLU/RoPE, the one bias per layer learns. */
    lt_gpt_config c = small_config();
    c.rmsnorm = c.gated_linear_unit = c.rope = 1;
    c.add_bias_linear = 0;
    c.add_qkv_bias = 1;
    flag_case("(g) add_qkv_bias, no add_bias_linear", c, 101, 0, 8, 51, 0, 0);

    /* zero-centred gamma, LayerNorm with bias, learned positions; gamma jittered away from 0 */
    c = small_config();
    c.layernorm_zero_centered_gamma = 1;
    flag_case("(h) zero-centred gamma, layernorm", c, 102, 1, 8, 52, 0, 0);

    /* zero-centred gamma with RMSNorm (as Transformer Engine's RMSNorm), untied output */
    c = small_config();
    c.layernorm_zero_centered_gamma = c.rmsnorm = c.gated_linear_unit = c.rope = 1;
    c.share_embeddings_and_output_weights = 0;
    flag_case("(i) zero-centred gamma, rmsnorm", c, 103, 2, 8, 53, 0, 0);

    /* qk_layernorm, LayerNorm, GQA (2 query heads per group), RoPE after the norms, bias */
    c = small_config();
    c.qk_layernorm = c.rope = 1;
    c.num_query_groups = 2;
    c.kv_channels = 6;
    flag_case("(j) qk_layernorm, layernorm, gqa, rope", c, 105, 4, 7, 55, 0, 0);

    /* qk_layernorm, RMSNorm, one query group for all 4 heads, SwiGLU, no biases */
    c = small_config();
    c.qk_layernorm = c.rmsnorm = c.gated_linear_unit = 1;
    c.num_query_groups = 1;
    c.add_bias_linear = 0;
    flag_case("(k) qk_layernorm, rmsnorm, mqa", c, 106, 5, 8, 56, 0, 0);

    /* all three together, with GQA, RoPE, dropout and ignored targets */
    c = small_config();
    c.add_bias_linear = 0;
    c.add_qkv_bias = c.layernorm_zero_centered_gamma = 1;
    c.qk_layernorm = c.rope = 1;
    c.num_query_groups = 2;
    c.hidden_dropout = 0.1f;
    c.attention_dropout = 0.1f;
    flag_case("(l) all three flags, gqa, rope, dropout", c, 107, 6, 8, 57, 4, 7);

    /* MoE: 4 experts, top-2 softmax, aux and z losses, GELU experts with biases, every layer */
    c = small_config();
    c.num_moe_experts = 4;
    c.moe_ffn_hidden_size = 24;
    c.moe_layer_freq = 1;
    c.moe_router = (lt_moe_router_cfg){.topk = 2, .load_balancing = 1, .aux_loss_coeff = 0.05, .z_loss_coeff = 0.01};
    flag_case("(m) MoE: 4 experts, top-2, aux and z losses (allgather)", c, 108, 0, 8, 58, 0, 0);

    /* the same through the grouped GEMMs, with tanh GELU experts (their activation then not fused) */
    c.moe_grouped_gemm = c.gelu_tanh = 1;
    flag_case("(m2) MoE with grouped GEMMs: tanh GELU experts with biases (allgather)", c, 108, 0, 8, 58, 0, 0);

    /* MoE every other layer, grouped GEMMs, sigmoid router with a scaling factor, SwiGLU experts, no
     * biases, seq_aux_loss, dropout, ignored targets */
    c = small_config();
    c.num_moe_experts = 3;
    c.moe_ffn_hidden_size = 12;
    c.moe_layer_freq = 2;
    c.moe_grouped_gemm = 1;
    c.gated_linear_unit = c.rmsnorm = c.rope = 1;
    c.add_bias_linear = 0;
    c.hidden_dropout = 0.1f;
    c.moe_router = (lt_moe_router_cfg){.topk = 2, .sigmoid = 1, .topk_scaling_factor = 1.5f, .load_balancing = 2,
                                       .aux_loss_coeff = 0.05};
    c.moe_dispatcher = LT_MOE_FLEX;
    flag_case("(n) MoE every other layer: sigmoid, seq_aux_loss, swiglu, dropout (flex)", c, 109, 0, 8, 59, 5, 9);

    /* MoE with token dropping: capacity factor 1 over 16 tokens, dropping by position; pre-softmax top-1 */
    c = small_config();
    c.num_moe_experts = 4;
    c.moe_ffn_hidden_size = 16;
    c.moe_layer_freq = 1;
    c.moe_router = (lt_moe_router_cfg){.topk = 1, .pre_softmax = 1, .capacity_factor = 1.0, .drop_by_position = 1};
    c.moe_dispatcher = LT_MOE_ALLTOALL;
    flag_case("(o) MoE with token dropping (capacity 1.0, by position), pre-softmax top-1 (alltoall)", c, 110, 0, 8,
              60, 0, 0);

    /* MoE with shared experts (SwiGLU, biases) beside 4 routed ones, dropout */
    c = small_config();
    c.num_moe_experts = 4;
    c.moe_ffn_hidden_size = 8;
    c.moe_shared_expert_intermediate_size = 12;
    c.moe_layer_freq = 1;
    c.gated_linear_unit = 1;
    c.hidden_dropout = 0.1f;
    c.moe_router = (lt_moe_router_cfg){.topk = 2, .load_balancing = 1, .aux_loss_coeff = 0.05};
    c.moe_dispatcher = LT_MOE_ALLTOALL;
    flag_case("(p) MoE with shared experts (swiglu, biases), dropout (alltoall)", c, 111, 0, 8, 61, 0, 11);

    /* sinkhorn routing (top-2: softmax probs, gradient through the activation only) with a z-loss */
    c = small_config();
    c.num_moe_experts = 4;
    c.moe_ffn_hidden_size = 8;
    c.moe_layer_freq = 1;
    c.moe_router = (lt_moe_router_cfg){.topk = 2, .load_balancing = 3, .z_loss_coeff = 0.01};
    c.moe_dispatcher = LT_MOE_FLEX;
    flag_case("(q) MoE with sinkhorn routing, top-2, z-loss (flex)", c, 112, 0, 8, 62, 0, 0);

    /* global_aux_loss at one rank (its tracker's average of the step's counts), on (m)'s model */
    c = small_config();
    c.num_moe_experts = 4;
    c.moe_ffn_hidden_size = 24;
    c.moe_layer_freq = 1;
    c.moe_router = (lt_moe_router_cfg){.topk = 2, .load_balancing = 4, .aux_loss_coeff = 0.05, .z_loss_coeff = 0.01};
    flag_case("(r) MoE with global_aux_loss (allgather)", c, 108, 0, 8, 58, 0, 0);
}

/* Zero-centred gamma g and ordinary gamma 1 + g are the same function: the same logits and loss, and
 * d/dg = d/dgamma. Everything but the norm weights is initialised by name, so both models share it. */
static void test_zero_centered_equivalence(int bf16) {
    lt_gpt_config c = small_config();
    c.qk_layernorm = c.rope = 1;
    c.num_query_groups = 2;
    c.bf16 = bf16;
    c.seed = 201;
    lt_gpt *o = new_model(&c);
    c.layernorm_zero_centered_gamma = 1;
    lt_gpt *z = new_model(&c);
    jitter_norm_weights(z, 9); /* g */
    const int64_t n = lt_tensor_numel(lt_gpt_weights(z));
    int norms = 0, others_equal = 1;
    for (int i = 0; i < lt_gpt_num_params(z); i++) {
        const lt_gpt_param *p = lt_gpt_param_info(z, i);
        size_t len = strlen(p->name);
        int is_norm = len >= 16 && strcmp(p->name + len - 16, "layernorm.weight") == 0;
        for (int64_t j = 0; j < p->numel; j++) {
            float *wo = wdata(o) + p->offset + j, zv = wdata(z)[p->offset + j];
            if (is_norm) *wo = 1.0f + zv; /* gamma = 1 + g */
            else others_equal &= *wo == zv;
        }
        norms += is_norm;
    }
    TAP_CHECK(others_equal && norms == 2 * 4 + 1, "zero-centred%s: same weights but the %d norm weights", bf16 ? " bf16" : "",
              norms);
    batch b = make_batch(2, 8, c.vocab_size, 61, 0);
    char err[256];
    float lo = NAN, lz = NAN;
    int64_t nv = 0;
    lt_gpt_zero_grad(o);
    lt_gpt_zero_grad(z);
    lt_gpt_ctx *co = lt_gpt_forward(o, b.tokens, b.targets, 2, 8, 1, 0, &lo, &nv, err, sizeof err);
    lt_gpt_ctx *cz = lt_gpt_forward(z, b.tokens, b.targets, 2, 8, 1, 0, &lz, &nv, err, sizeof err);
    const int64_t NV = 16LL * c.vocab_size;
    float *logits_o = malloc(sizeof(float) * (size_t)NV), *logits_z = malloc(sizeof(float) * (size_t)NV);
    for (int64_t i = 0; i < NV; i++) {
        const void *po = lt_gpt_ctx_logits(co), *pz = lt_gpt_ctx_logits(cz);
        logits_o[i] = bf16 ? lt_bf16_to_f32(((const uint16_t *)po)[i]) : ((const float *)po)[i];
        logits_z[i] = bf16 ? lt_bf16_to_f32(((const uint16_t *)pz)[i]) : ((const float *)pz)[i];
    }
    lt_gpt_backward(o, co, 1.0f / (float)nv, err, sizeof err);
    lt_gpt_backward(z, cz, 1.0f / (float)nv, err, sizeof err);
    /* fp32: 1 + g is the same fp32 sum in both, so the results agree to rounding noise at most. bf16:
     * the zero-centred model rounds g to bf16 before adding 1 (Megatron's bf16 weight + 1), the other
     * rounds 1 + g once: a bf16 ulp apart. */
    const double tol_out = bf16 ? 2e-2 : 1e-6, tol_grad = bf16 ? 3e-2 : 1e-5;
    const double dl = rel_diff(logits_o, logits_z, NV), dg = rel_diff(gdata(o), gdata(z), n);
    TAP_CHECK(dl <= tol_out && fabsf(lo - lz) <= tol_out * lo,
              "zero-centred%s gamma g = ordinary gamma 1 + g: logits differ by %.2g (tol %g), loss %.7f vs %.7f",
              bf16 ? " bf16" : "", dl, tol_out, lz, lo);
    TAP_CHECK(dg <= tol_grad, "zero-centred%s: d/dg = d/dgamma for every parameter (max diff / max |grad| %.2g, tol %g)",
              bf16 ? " bf16" : "", dg, tol_grad);
    free(logits_o);
    free(logits_z);
    lt_gpt_free(o);
    lt_gpt_free(z);
}

static void test_flag_init(void) {
    lt_gpt_config c = small_config();
    c.hidden_size = 64;
    c.kv_channels = 16;
    c.init_method_std = 0.02f;
    lt_gpt *plain = new_model(&c);
    c.add_bias_linear = 0;
    c.add_qkv_bias = c.layernorm_zero_centered_gamma = 1;
    c.qk_layernorm = 1;
    lt_gpt *flags = new_model(&c);
    int zeros = 1, nn = 0, nb = 0;
    for (int i = 0; i < lt_gpt_num_params(flags); i++) {
        const char *name = lt_gpt_param_info(flags, i)->name;
        size_t len = strlen(name);
        if (len > 16 && strcmp(name + len - 16, "layernorm.weight") == 0) zeros &= all_equal(flags, name, 0.0f), nn++;
        if (len > 5 && strcmp(name + len - 5, ".bias") == 0) zeros &= all_equal(flags, name, 0.0f), nb++;
    }
    TAP_CHECK(zeros && nn == 4 * 2 + 1 && nb == 2 * (1 + 2 + 2) + 1,
              "init: zero-centred gamma: all %d norm weights (q/k norms too) and %d biases are 0", nn, nb);
    TAP_CHECK(same_values(plain, flags, "decoder.layers.1.self_attention.linear_qkv.weight", -1) &&
                  same_values(plain, flags, "decoder.layers.0.self_attention.linear_proj.weight", -1) &&
                  same_values(plain, flags, "decoder.layers.1.mlp.linear_fc2.weight", -1) &&
                  same_values(plain, flags, "embedding.word_embeddings.weight", -1),
              "init: the flags leave every other weight as it was (initialised by name)");
    lt_gpt_free(flags);
    c.layernorm_zero_centered_gamma = 0;
    flags = new_model(&c);
    TAP_CHECK(all_equal(flags, "decoder.layers.0.self_attention.q_layernorm.weight", 1.0f) &&
                  all_equal(flags, "decoder.layers.1.self_attention.k_layernorm.weight", 1.0f) &&
                  all_equal(flags, "decoder.layers.1.self_attention.k_layernorm.bias", 0.0f),
              "init: q/k layernorm weights 1, biases 0");
    lt_gpt_free(flags);
    lt_gpt_free(plain);
}

static void test_flag_names(void) {
    /* add_qkv_bias without add_bias_linear, RMSNorm: linear_qkv.bias is the one bias of each layer. */
    lt_gpt_config c = small_config();
    c.num_layers = 2;
    c.rmsnorm = 1;
    c.add_bias_linear = 0;
    c.add_qkv_bias = 1;
    const int64_t V = 32, C = 16, S = 8, QKV = 3 * 16, HD = 16, F = 32, D = 4;
    expected_param qkvb[] = {
        {"embedding.word_embeddings.weight", 2, V, C},
        {"embedding.position_embeddings.weight", 2, S, C},
        {"decoder.layers.0.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.0.self_attention.linear_qkv.bias", 1, QKV, 0},
        {"decoder.layers.0.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.0.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.0.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.layers.1.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.1.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.1.self_attention.linear_qkv.bias", 1, QKV, 0},
        {"decoder.layers.1.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.1.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.1.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.1.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.final_layernorm.weight", 1, C, 0},
    };
    check_names("add_qkv_bias without add_bias_linear: one bias per layer", &c, qkvb,
                (int)(sizeof qkvb / sizeof qkvb[0]));
    /* add_qkv_bias changes nothing when add_bias_linear gives linear_qkv its bias anyway. */
    lt_gpt_config both = small_config(), lin = small_config();
    both.add_qkv_bias = 1;
    lt_gpt *a = new_model(&both), *l = new_model(&lin);
    TAP_CHECK(lt_gpt_num_params(a) == lt_gpt_num_params(l) &&
                  lt_tensor_numel(lt_gpt_weights(a)) == lt_tensor_numel(lt_gpt_weights(l)),
              "names: add_qkv_bias with add_bias_linear: the same %d parameters", lt_gpt_num_params(a));
    lt_gpt_free(a);
    lt_gpt_free(l);

    /* qk_layernorm, one layer: LayerNorm gives q/k weights and biases of kv_channels, RMSNorm weights. */
    c = small_config();
    c.num_layers = 1;
    c.qk_layernorm = 1;
    c.rope = 1;
    c.add_bias_linear = 0;
    expected_param qk_ln[] = {
        {"embedding.word_embeddings.weight", 2, V, C},
        {"decoder.layers.0.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.input_layernorm.bias", 1, C, 0},
        {"decoder.layers.0.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.0.self_attention.q_layernorm.weight", 1, D, 0},
        {"decoder.layers.0.self_attention.q_layernorm.bias", 1, D, 0},
        {"decoder.layers.0.self_attention.k_layernorm.weight", 1, D, 0},
        {"decoder.layers.0.self_attention.k_layernorm.bias", 1, D, 0},
        {"decoder.layers.0.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.0.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.pre_mlp_layernorm.bias", 1, C, 0},
        {"decoder.layers.0.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.0.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.final_layernorm.weight", 1, C, 0},
        {"decoder.final_layernorm.bias", 1, C, 0},
    };
    check_names("qk_layernorm, layernorm", &c, qk_ln, (int)(sizeof qk_ln / sizeof qk_ln[0]));
    c.rmsnorm = 1;
    expected_param qk_rms[] = {
        {"embedding.word_embeddings.weight", 2, V, C},
        {"decoder.layers.0.input_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.self_attention.linear_qkv.weight", 2, QKV, C},
        {"decoder.layers.0.self_attention.q_layernorm.weight", 1, D, 0},
        {"decoder.layers.0.self_attention.k_layernorm.weight", 1, D, 0},
        {"decoder.layers.0.self_attention.linear_proj.weight", 2, C, HD},
        {"decoder.layers.0.pre_mlp_layernorm.weight", 1, C, 0},
        {"decoder.layers.0.mlp.linear_fc1.weight", 2, F, C},
        {"decoder.layers.0.mlp.linear_fc2.weight", 2, C, F},
        {"decoder.final_layernorm.weight", 1, C, 0},
    };
    check_names("qk_layernorm, rmsnorm", &c, qk_rms, (int)(sizeof qk_rms / sizeof qk_rms[0]));
}

int main(void) {
    test_gradients();
    test_dropout();
    test_eval_mode();
    test_init();
    test_errors();
    test_names();
    test_sgd();
    test_bf16();
    test_flag_gradients();
    test_zero_centered_equivalence(0);
    test_zero_centered_equivalence(1);
    test_flag_init();
    test_flag_names();
    return tap_done();
}

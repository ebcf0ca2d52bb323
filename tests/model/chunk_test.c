/* The model as chunks (engine/model/gpt.h, lt_gpt_new_chunk): the tiny model split into 2, 3 and 4
 * pipeline stages on one process, forward passing the [s, b, h] hidden state from chunk to chunk and
 * backward passing its gradient back, reproduces the whole model exactly:
 *   1. every chunk's parameters carry the whole model's names, shapes and initial values;
 *   2. two microbatches in flight (F0 F1 B0 B1, dropout on): the per-token losses give the whole
 *      model's mean loss bit for bit, and every parameter's gradient is bit-identical by name, except
 *      the tied word embeddings, whose two copies' gradients sum to the whole model's (relative 1e-6:
 *      the whole model adds the output layer's and the embedding's contributions into one buffer in
 *      one order, the split model in two buffers, so the rounding of the sum differs);
 *   3. configurations: LayerNorm/GELU/learned positions, tied and untied; RMSNorm/SwiGLU/RoPE/GQA;
 *      bf16 mixed precision; qk_layernorm with zero-centred gamma and add_qkv_bias under bf16;
 *   4. the boundary layout is [s, b, h]: output row (t, b) is sequence b's token t;
 *   5. errors: stages that are not a range, a missing or misshapen hidden state, the whole-model
 *      calls on a chunk;
 *   6. eval mode (training 0) through 2 chunks: per-token losses bit-identical to the whole model
 *      configured without dropout, whatever the seed; training mode with seed 0 differs;
 *   7. the data-parallel hooks on a chunk: parameters are waited for from 0 to the end of its buffer,
 *      gradients reported ready from the end down to 0, once per layer (and head / embedding). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/rng.h"
#include "engine/core/tensor.h"
#include "engine/model/gpt.h"
#include "tests/tap.h"

#define MAXC 4

static lt_gpt_config tiny_config(void) {
    lt_gpt_config c;
    memset(&c, 0, sizeof c);
    c.num_layers = 4;
    c.hidden_size = 16;
    c.num_attention_heads = 4;
    c.num_query_groups = 4;
    c.kv_channels = 4;
    c.ffn_hidden_size = 32;
    c.seq_length = 8;
    c.vocab_size = 32;
    c.layernorm_epsilon = 1e-5f;
    c.rotary_base = 10000.0f;
    c.share_embeddings_and_output_weights = 1;
    c.add_bias_linear = 1;
    c.init_method_std = 0.2f;
    c.hidden_dropout = 0.1f;
    c.attention_dropout = 0.1f;
    c.seed = 1234;
    return c;
}

static lt_gpt *new_chunk(const lt_gpt_config *c, int begin, int end, int pre, int post) {
    char err[256] = "";
    lt_gpt_stage st = {begin, end, pre, post};
    lt_gpt *m = lt_gpt_new_chunk(c, &st, err, sizeof err);
    if (!m) {
        TAP_CHECK(0, "lt_gpt_new_chunk [%d, %d) failed: %s", begin, end, err);
        exit(tap_done() | 1);
    }
    return m;
}

static float *pdata(lt_gpt *m, lt_tensor *flat, const lt_gpt_param *p) {
    (void)m;
    return (float *)lt_tensor_data(flat) + p->offset;
}

/* Moves every weight off its init by a value keyed by (name, index), identically in any chunk, so
 * norms and biases differ between layers and a chunk reading the wrong one would show. */
static void jitter(lt_gpt *m) {
    for (int i = 0; i < lt_gpt_num_params(m); i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        float *w = pdata(m, lt_gpt_weights(m), p);
        const uint64_t key = lt_rng_key(99, p->name);
        for (int64_t j = 0; j < p->numel; j++) w[j] += 0.1f * (2.0f * lt_rng_uniform(key, (uint64_t)j) - 1.0f);
    }
}

typedef struct {
    int B, T;
    int32_t tokens[64], targets[64];
} batch;

static batch make_batch(int B, int T, int V, uint64_t key) {
    batch b = {B, T, {0}, {0}};
    for (int i = 0; i < B * T; i++) {
        b.tokens[i] = (int32_t)(lt_rng_uniform(key, 2 * (uint64_t)i) * (float)V) % V;
        b.targets[i] = (i % 5 == 4) ? -1 : (int32_t)(lt_rng_uniform(key, 2 * (uint64_t)i + 1) * (float)V) % V;
    }
    return b;
}

/* Mean of the valid per-token losses, summed in double as the whole model does. */
static float mean_loss(const lt_tensor *losses, const batch *b, int64_t nv) {
    const float *l = lt_tensor_data(losses);
    double sum = 0;
    for (int i = 0; i < b->B * b->T; i++)
        if (b->targets[i] >= 0) sum += l[i];
    return nv ? (float)(sum / (double)nv) : 0.0f;
}

/* Two microbatches (F0 F1 B0 B1) through the whole model: losses out, gradients accumulated. */
static void run_whole(lt_gpt *m, const batch *b, float *loss) {
    char err[256] = "";
    lt_gpt_ctx *ctx[2];
    int64_t nv[2];
    for (int k = 0; k < 2; k++) {
        ctx[k] = lt_gpt_forward(m, b[k].tokens, b[k].targets, b[k].B, b[k].T, 1, 100 + (uint64_t)k, &loss[k], &nv[k],
                                err, sizeof err);
        if (!ctx[k]) TAP_CHECK(0, "whole forward: %s", err);
    }
    for (int k = 0; k < 2; k++)
        if (lt_gpt_backward(m, ctx[k], 1.0f / (float)(2 * nv[k]), err, sizeof err) != 0)
            TAP_CHECK(0, "whole backward: %s", err);
}

/* The same through chunks ch[0..n): hidden states forward, their gradients backward. */
static int run_chunks(lt_gpt **ch, int n, const batch *b, float *loss) {
    char err[256] = "";
    lt_gpt_ctx *ctx[2][MAXC];
    int64_t nv[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        lt_tensor *h = NULL;
        for (int i = 0; i < n; i++) {
            lt_tensor *out = NULL;
            int64_t v = 0;
            ctx[k][i] = lt_gpt_chunk_forward(ch[i], i == 0 ? b[k].tokens : NULL, h, b[k].targets, b[k].B, b[k].T, 1,
                                             100 + (uint64_t)k, &out, &v, err, sizeof err);
            lt_tensor_free(h);
            if (!ctx[k][i]) return TAP_CHECK(0, "chunk %d forward: %s", i, err), 0;
            if (i == n - 1) {
                nv[k] = v;
                loss[k] = mean_loss(out, &b[k], v);
                lt_tensor_free(out);
            }
            h = out;
        }
    }
    for (int k = 0; k < 2; k++) {
        lt_tensor *dh = NULL;
        for (int i = n - 1; i >= 0; i--) {
            lt_tensor *din = NULL;
            int rc = lt_gpt_chunk_backward(ch[i], ctx[k][i], dh, 1.0f / (float)(2 * nv[k]), &din, err, sizeof err);
            lt_tensor_free(dh);
            if (rc != 0) return TAP_CHECK(0, "chunk %d backward: %s", i, err), 0;
            if ((i == 0) != (din == NULL)) return TAP_CHECK(0, "chunk %d: grad_input only where not first", i), 0;
            dh = din;
        }
    }
    return 1;
}

/* One split of the whole model's layers at cuts[0..n] (cuts[0] = 0, cuts[n] = num_layers). */
static void check_split(const char *label, lt_gpt_config c, const int *cuts, int n) {
    char what[160];
    snprintf(what, sizeof what, "%s, %d chunks [", label, n);
    for (int i = 0; i < n; i++)
        snprintf(what + strlen(what), sizeof what - strlen(what), "%d-%d%s", cuts[i], cuts[i + 1],
                 i + 1 < n ? " " : "]");
    lt_gpt *whole = lt_gpt_new(&c, NULL, 0);
    lt_gpt *ch[MAXC];
    for (int i = 0; i < n; i++) ch[i] = new_chunk(&c, cuts[i], cuts[i + 1], i == 0, i == n - 1);

    /* 1. names, shapes and initial values */
    int named = 0, same_init = 1, found = 1;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < lt_gpt_num_params(ch[i]); j++) {
            const lt_gpt_param *p = lt_gpt_param_info(ch[i], j);
            int w = lt_gpt_find_param(whole, p->name);
            if (w < 0) { found = 0; continue; }
            const lt_gpt_param *q = lt_gpt_param_info(whole, w);
            named++;
            if (p->numel != q->numel || p->shape[0] != q->shape[0] || p->shape[1] != q->shape[1] ||
                memcmp(pdata(ch[i], lt_gpt_weights(ch[i]), p), pdata(whole, lt_gpt_weights(whole), q),
                       sizeof(float) * (size_t)p->numel) != 0)
                same_init = 0;
        }
    const int tied_copy = c.share_embeddings_and_output_weights && n > 1;
    TAP_CHECK(found && named == lt_gpt_num_params(whole) + tied_copy && same_init,
              "%s: every chunk parameter is a whole-model parameter with its shape and initial values (%d%s)",
              what, named, tied_copy ? ", the tied embedding twice" : "");
    if (tied_copy)
        TAP_CHECK(lt_gpt_find_param(ch[n - 1], "embedding.word_embeddings.weight") >= 0 &&
                      lt_gpt_find_param(ch[n - 1], "output_layer.weight") < 0,
                  "%s: the last stage holds its own embedding.word_embeddings.weight as output weight", what);

    jitter(whole);
    for (int i = 0; i < n; i++) jitter(ch[i]);
    lt_gpt_zero_grad(whole);
    for (int i = 0; i < n; i++) lt_gpt_zero_grad(ch[i]);
    batch b[2] = {make_batch(3, 7, c.vocab_size, 5), make_batch(3, 7, c.vocab_size, 6)};
    float lw[2], lc[2] = {NAN, NAN};
    run_whole(whole, b, lw);
    if (!run_chunks(ch, n, b, lc)) exit(tap_done() | 1);
    TAP_CHECK(memcmp(lw, lc, sizeof lw) == 0, "%s: losses %.7f %.7f are the whole model's %.7f %.7f bit for bit",
              what, lc[0], lc[1], lw[0], lw[1]);

    /* 2. gradients by name */
    int exact = 1, nonzero = 1;
    char bad[128] = "";
    for (int w = 0; w < lt_gpt_num_params(whole); w++) {
        const lt_gpt_param *q = lt_gpt_param_info(whole, w);
        const float *gw = pdata(whole, lt_gpt_grads(whole), q);
        float *sum = calloc((size_t)q->numel, sizeof(float));
        int copies = 0;
        for (int i = 0; i < n; i++) {
            int j = lt_gpt_find_param(ch[i], q->name);
            if (j < 0) continue;
            const float *g = pdata(ch[i], lt_gpt_grads(ch[i]), lt_gpt_param_info(ch[i], j));
            for (int64_t e = 0; e < q->numel; e++) sum[e] += g[e];
            copies++;
        }
        double ss = 0;
        for (int64_t e = 0; e < q->numel; e++) ss += (double)gw[e] * gw[e];
        if (ss == 0) nonzero = 0;
        if (copies == 1) {
            if (memcmp(sum, gw, sizeof(float) * (size_t)q->numel) != 0) {
                exact = 0;
                snprintf(bad, sizeof bad, "%s", q->name);
            }
        } else {
            double d = 0, scale = 0;
            for (int64_t e = 0; e < q->numel; e++) {
                d = fmax(d, fabs((double)sum[e] - gw[e]));
                scale = fmax(scale, fabs((double)gw[e]));
            }
            TAP_CHECK(copies == 2 && d <= 1e-6 * scale,
                      "%s: the two copies of %s sum to the whole model's gradient (max diff %.3g of %.3g)", what,
                      q->name, d, scale);
        }
        free(sum);
    }
    TAP_CHECK(exact && nonzero, "%s: every other gradient is bit-identical to the whole model's, by name%s%s", what,
              bad[0] ? "; differs: " : "", bad);
    for (int i = 0; i < n; i++) lt_gpt_free(ch[i]);
    lt_gpt_free(whole);
}

static void check_config(const char *label, lt_gpt_config c) {
    static const int two[] = {0, 2, 4}, uneven[] = {0, 3, 4}, three[] = {0, 1, 3, 4}, four[] = {0, 1, 2, 3, 4};
    check_split(label, c, two, 2);
    check_split(label, c, uneven, 2);
    check_split(label, c, three, 3);
    check_split(label, c, four, 4);
}

/* Dropout is really on in these runs: another seed gives another loss. */
static void test_dropout_active(void) {
    lt_gpt_config c = tiny_config();
    lt_gpt *m = lt_gpt_new(&c, NULL, 0);
    batch b = make_batch(3, 7, c.vocab_size, 5);
    float l1, l2;
    int64_t nv;
    lt_gpt_ctx_free(lt_gpt_forward(m, b.tokens, b.targets, 3, 7, 1, 100, &l1, &nv, NULL, 0));
    lt_gpt_ctx_free(lt_gpt_forward(m, b.tokens, b.targets, 3, 7, 1, 101, &l2, &nv, NULL, 0));
    TAP_CHECK(l1 != l2, "dropout is on: microbatch seeds 100 and 101 give losses %.6f and %.6f", l1, l2);
    lt_gpt_free(m);
}

/* Per-token losses of one forward through chunks ch[0..n) in the given mode, copied to `losses`. */
static int chunk_losses(lt_gpt **ch, int n, const batch *b, int training, uint64_t seed, float *losses) {
    char err[256] = "";
    lt_tensor *h = NULL;
    for (int i = 0; i < n; i++) {
        lt_tensor *out = NULL;
        lt_gpt_ctx *ctx = lt_gpt_chunk_forward(ch[i], i == 0 ? b->tokens : NULL, h, b->targets, b->B, b->T, training,
                                               seed, &out, NULL, err, sizeof err);
        lt_tensor_free(h);
        if (!ctx) return TAP_CHECK(0, "chunk %d forward: %s", i, err), 0;
        lt_gpt_ctx_free(ctx);
        h = out;
    }
    memcpy(losses, lt_tensor_data(h), sizeof(float) * (size_t)b->B * b->T);
    lt_tensor_free(h);
    return 1;
}

/* Eval mode through a pipeline split computes what the model without dropout computes. */
static void test_eval_mode(void) {
    lt_gpt_config c = tiny_config(), nod = c; /* dropout 0.1 */
    nod.hidden_dropout = nod.attention_dropout = 0;
    lt_gpt *ch[2] = {new_chunk(&c, 0, 3, 1, 0), new_chunk(&c, 3, 4, 0, 1)};
    lt_gpt *whole0 = lt_gpt_new(&nod, NULL, 0);
    batch b = make_batch(3, 7, c.vocab_size, 9);
    float want[21], got[21], drop[21];
    int ok = chunk_losses(&whole0, 1, &b, 1, 100, want);
    for (uint64_t seed = 0; ok && seed < 2; seed++) {
        ok = chunk_losses(ch, 2, &b, 0, seed, got);
        TAP_CHECK(ok && memcmp(got, want, sizeof got) == 0,
                  "eval mode through 2 chunks (seed %d): per-token losses bit-identical to the model without dropout",
                  (int)seed);
    }
    ok = ok && chunk_losses(ch, 2, &b, 1, 0, drop);
    TAP_CHECK(ok && memcmp(drop, want, sizeof drop) != 0, "training mode through 2 chunks with seed 0 drops");
    lt_gpt_free(ch[0]);
    lt_gpt_free(ch[1]);
    lt_gpt_free(whole0);
}

/* Output row (t, b) of a first chunk is sequence b's token t: the batch of 3 against each sequence alone
 * (no dropout: its masks depend on the position in the batch). */
static void test_boundary_layout(void) {
    lt_gpt_config c = tiny_config();
    c.hidden_dropout = c.attention_dropout = 0;
    lt_gpt *m = new_chunk(&c, 0, 2, 1, 0);
    batch b = make_batch(3, 7, c.vocab_size, 5);
    char err[256];
    lt_tensor *out = NULL;
    lt_gpt_ctx_free(lt_gpt_chunk_forward(m, b.tokens, NULL, NULL, 3, 7, 1, 0, &out, NULL, err, sizeof err));
    TAP_CHECK(out && out->ndim == 3 && out->shape[0] == 7 && out->shape[1] == 3 && out->shape[2] == 16,
              "a middle output is [s, b, h] = [7, 3, 16]");
    double d = 0, scale = 0;
    for (int s = 0; s < 3; s++) {
        lt_tensor *one = NULL;
        lt_gpt_ctx_free(lt_gpt_chunk_forward(m, b.tokens + 7 * s, NULL, NULL, 1, 7, 1, 0, &one, NULL, err, sizeof err));
        const float *o = lt_tensor_data(out), *r = lt_tensor_data(one);
        for (int t = 0; t < 7; t++)
            for (int h = 0; h < 16; h++) {
                d = fmax(d, fabs((double)o[((size_t)t * 3 + s) * 16 + h] - r[(size_t)t * 16 + h]));
                scale = fmax(scale, fabs((double)r[(size_t)t * 16 + h]));
            }
        lt_tensor_free(one);
    }
    TAP_CHECK(scale > 0 && d <= 1e-5 * scale, "row (t, b) of the output is sequence b's token t (max diff %.3g)", d);
    lt_tensor_free(out);
    lt_gpt_free(m);
}

static void expect_error(const char *what, int failed, const char *err, const char *needle) {
    TAP_CHECK(failed && strstr(err, needle) != NULL, "%s is refused: %s", what, err);
}

static void test_errors(void) {
    lt_gpt_config c = tiny_config();
    char err[256] = "";
    lt_gpt_stage st = {1, 4, 1, 1};
    expect_error("a first stage not at layer 0", lt_gpt_new_chunk(&c, &st, err, sizeof err) == NULL, err,
                 "must begin at layer 0");
    st = (lt_gpt_stage){0, 3, 0, 1};
    expect_error("a last stage not at the last layer", lt_gpt_new_chunk(&c, &st, err, sizeof err) == NULL, err,
                 "must end at layer 4");
    st = (lt_gpt_stage){2, 5, 0, 0};
    expect_error("layers beyond the model", lt_gpt_new_chunk(&c, &st, err, sizeof err) == NULL, err,
                 "not a range of the model's 4 layers");
    st = (lt_gpt_stage){2, 2, 0, 0};
    expect_error("an empty middle chunk", lt_gpt_new_chunk(&c, &st, err, sizeof err) == NULL, err, "holds nothing");

    lt_gpt *mid = new_chunk(&c, 1, 3, 0, 0);
    batch b = make_batch(2, 4, c.vocab_size, 5);
    lt_tensor *out = NULL;
    expect_error("a middle chunk's forward without a hidden state",
                 lt_gpt_chunk_forward(mid, b.tokens, NULL, NULL, 2, 4, 1, 0, &out, NULL, err, sizeof err) == NULL, err,
                 "needs the input hidden state [4, 2, 16]");
    int64_t wrong[3] = {2, 4, 16};
    lt_tensor *h = lt_tensor_new(LT_F32, 3, wrong);
    expect_error("a hidden state shaped [b, s, h]",
                 lt_gpt_chunk_forward(mid, NULL, h, NULL, 2, 4, 1, 0, &out, NULL, err, sizeof err) == NULL, err,
                 "[seq, batch, hidden]");
    lt_tensor_free(h);
    float loss;
    expect_error("lt_gpt_forward on a chunk",
                 lt_gpt_forward(mid, b.tokens, b.targets, 2, 4, 1, 0, &loss, NULL, err, sizeof err) == NULL, err,
                 "runs the whole model");
    int64_t right[3] = {4, 2, 16};
    h = lt_tensor_new(LT_F32, 3, right);
    lt_gpt_ctx *ctx = lt_gpt_chunk_forward(mid, NULL, h, NULL, 2, 4, 1, 0, &out, NULL, err, sizeof err);
    TAP_CHECK(ctx && out, "a middle chunk runs on a [s, b, h] hidden state");
    expect_error("a middle chunk's backward without the output's gradient",
                 lt_gpt_chunk_backward(mid, ctx, NULL, 1.0f, NULL, err, sizeof err) != 0, err,
                 "needs the output's gradient");
    lt_tensor_free(h);
    lt_tensor_free(out);
    lt_gpt_free(mid);
}

/* ---- 6. hooks ---- */

typedef struct {
    int n;
    int64_t at[16];
} calls;

static void record(void *ud, int64_t off) {
    calls *c = ud;
    if (c->n < 16) c->at[c->n] = off;
    c->n++;
}

static void test_hooks(void) {
    lt_gpt_config c = tiny_config();
    c.share_embeddings_and_output_weights = 1;
    lt_gpt *ch[3] = {new_chunk(&c, 0, 1, 1, 0), new_chunk(&c, 1, 3, 0, 0), new_chunk(&c, 3, 4, 0, 1)};
    calls waits[3] = {{0}}, ready[3] = {{0}};
    for (int i = 0; i < 3; i++) {
        lt_gpt_set_param_wait_hook(ch[i], record, &waits[i]);
        lt_gpt_set_grad_ready_hook(ch[i], record, &ready[i]);
    }
    batch b[2] = {make_batch(2, 5, c.vocab_size, 5), make_batch(2, 5, c.vocab_size, 6)};
    float loss[2];
    run_chunks(ch, 3, b, loss);
    /* per microbatch: first stage waits for the embedding then its layer then the rest; the others one
     * wait per layer, then the rest; ready: one report per layer, plus the head, plus the embedding */
    const int want_waits[3] = {3, 3, 2}, want_ready[3] = {2, 2, 2};
    for (int i = 0; i < 3; i++) {
        const int64_t total = lt_tensor_numel(lt_gpt_weights(ch[i]));
        int mono = 1;
        for (int k = 1; k < waits[i].n && k < 16; k++)
            if (waits[i].at[k] < waits[i].at[k - 1] && waits[i].at[k] != waits[i].at[0]) mono = 0;
        for (int k = 1; k < ready[i].n && k < 16; k++)
            if (ready[i].at[k] > ready[i].at[k - 1] && k != ready[i].n / 2) mono = 0;
        TAP_CHECK(waits[i].n == 2 * want_waits[i] && waits[i].at[want_waits[i] - 1] == total &&
                      ready[i].n == 2 * want_ready[i] && ready[i].at[want_ready[i] - 1] == 0 && mono,
                  "chunk %d: parameters waited for up to %lld in %d steps, gradients ready down to 0 in %d, per "
                  "microbatch", i, (long long)total, waits[i].n / 2, ready[i].n / 2);
        lt_gpt_free(ch[i]);
    }
}

int main(void) {
    test_dropout_active();
    test_eval_mode();
    lt_gpt_config c = tiny_config();
    check_config("LayerNorm/GELU/learned positions, tied", c);
    c.share_embeddings_and_output_weights = 0;
    check_config("LayerNorm/GELU/learned positions, untied", c);
    c = tiny_config();
    c.rmsnorm = 1;
    c.gated_linear_unit = 1;
    c.rope = 1;
    c.num_query_groups = 2;
    c.add_bias_linear = 0;
    c.share_embeddings_and_output_weights = 0;
    check_config("RMSNorm/SwiGLU/RoPE/GQA, untied", c);
    c.share_embeddings_and_output_weights = 1;
    c.bf16 = 1;
    check_config("bf16 RMSNorm/SwiGLU/RoPE/GQA, tied", c);
    c = tiny_config();
    c.bf16 = 1;
    c.qk_layernorm = 1;
    c.layernorm_zero_centered_gamma = 1;
    c.add_qkv_bias = 1;
    c.gelu_tanh = 1;
    check_config("bf16 qk_layernorm/zero-centred gamma/qkv bias/tanh GELU, tied", c);
    test_boundary_layout();
    test_errors();
    test_hooks();
    return tap_done();
}

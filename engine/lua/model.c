/* luatron.GPT: a GPT model built from a provider table; luatron.GPTChunk: one pipeline chunk of it
 * (layers [layer_begin, layer_end), the embedding when first, the loss when last); and
 * luatron.GPTContext, the saved activations of one microbatch between forward and backward. Both
 * model types share the parameter methods (param, grad, parameters, flat_weights, ...). */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/rng.h"
#include "engine/lua/bindings.h"
#include "engine/model/gpt.h"
#include "engine/model/sample.h"

#define GPT_MT "luatron.GPT"
#define CHUNK_MT "luatron.GPTChunk"
#define CTX_MT "luatron.GPTContext"
#define CACHE_MT "luatron.GPTCache"

typedef struct {
    lt_gpt *m;
} gpt_box;

typedef struct {
    lt_gpt_ctx *ctx;
    const lt_gpt *owner; /* the model whose forward made it: backward must be that model's */
    int B, T, V;
} ctx_box;

/* A luatron.GPT or a luatron.GPTChunk (both box an lt_gpt). */
static gpt_box *check_box(lua_State *L, int idx) {
    gpt_box *b = luaL_testudata(L, idx, GPT_MT);
    if (!b) b = luaL_testudata(L, idx, CHUNK_MT);
    if (!b) luaL_typeerror(L, idx, "luatron.GPT or luatron.GPTChunk");
    return b;
}

static lt_gpt *check_gpt(lua_State *L, int idx) {
    gpt_box *b = check_box(L, idx);
    if (!b->m) luaL_argerror(L, idx, "model was already closed");
    return b->m;
}

static lt_gpt *check_chunk(lua_State *L, int idx) {
    gpt_box *b = luaL_checkudata(L, idx, CHUNK_MT);
    if (!b->m) luaL_argerror(L, idx, "chunk was already closed");
    return b->m;
}

/* Every field of core.gpt / core.gpt_chunk's table is required: the defaults are resolved once, in
 * Lua (luatron.config.validate's resolve_model), so the engine has none of its own. */
static void field_get(lua_State *L, int idx, const char *name) {
    if (lua_getfield(L, idx, name) == LUA_TNIL) luaL_error(L, "model config: %s is required", name);
}

static lua_Integer field_int(lua_State *L, int idx, const char *name) {
    field_get(L, idx, name);
    int ok;
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok) luaL_error(L, "model config: %s must be an integer", name);
    lua_pop(L, 1);
    return v;
}

static double field_num(lua_State *L, int idx, const char *name) {
    field_get(L, idx, name);
    int ok;
    double v = lua_tonumberx(L, -1, &ok);
    if (!ok) luaL_error(L, "model config: %s must be a number", name);
    lua_pop(L, 1);
    return v;
}

static int field_bool(lua_State *L, int idx, const char *name) {
    field_get(L, idx, name);
    if (!lua_isboolean(L, -1)) luaL_error(L, "model config: %s must be a boolean", name);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* A string field of config 1 that must be one of the NULL-terminated names: its index. */
static int field_enum(lua_State *L, const char *name, const char *const names[]) {
    field_get(L, 1, name);
    const char *v = lua_tostring(L, -1);
    for (int i = 0; v && names[i]; i++)
        if (strcmp(v, names[i]) == 0) {
            lua_pop(L, 1);
            return i;
        }
    return luaL_error(L, "model config: %s = %s is not one the engine knows", name, v ? v : "(not a string)");
}

/* The mixture-of-experts fields (num_moe_experts 0: a dense model; the rest is then not used). */
static void read_moe(lua_State *L, lt_gpt_config *c) {
    static const char *const score[] = {"softmax", "sigmoid", NULL};
    static const char *const drop[] = {"probs", "position", NULL};
    static const char *const balance[] = {"none", "aux_loss", "seq_aux_loss", "sinkhorn", "global_aux_loss", NULL};
    static const char *const dispatchers[] = {"allgather", "alltoall", "flex", NULL}; /* lt_moe_dispatcher's order */
    c->num_moe_experts = (int)field_int(L, 1, "num_moe_experts");
    c->moe_ffn_hidden_size = (int)field_int(L, 1, "moe_ffn_hidden_size");
    c->moe_layer_freq = (int)field_int(L, 1, "moe_layer_freq");
    c->moe_grouped_gemm = field_bool(L, 1, "moe_grouped_gemm");
    c->moe_shared_expert_intermediate_size = (int)field_int(L, 1, "moe_shared_expert_intermediate_size");
    c->moe_router_enable_expert_bias = field_bool(L, 1, "moe_router_enable_expert_bias");
    lt_moe_router_cfg *r = &c->moe_router;
    r->topk = (int)field_int(L, 1, "moe_router_topk");
    r->sigmoid = field_enum(L, "moe_router_score_function", score);
    r->pre_softmax = field_bool(L, 1, "moe_router_pre_softmax");
    r->topk_scaling_factor = (float)field_num(L, 1, "moe_router_topk_scaling_factor");
    r->capacity_factor = field_num(L, 1, "moe_expert_capacity_factor");
    r->drop_by_position = field_enum(L, "moe_token_drop_policy", drop);
    r->pad_to_capacity = field_bool(L, 1, "moe_pad_expert_input_to_capacity");
    r->load_balancing = field_enum(L, "moe_router_load_balancing_type", balance);
    r->aux_loss_coeff = field_num(L, 1, "moe_aux_loss_coeff");
    r->z_loss_coeff = field_num(L, 1, "moe_z_loss_coeff");
    c->moe_dispatcher = field_enum(L, "moe_token_dispatcher_type", dispatchers);
}

/* A communicator field of config 1, or NULL for false. */
static struct lt_comm *opt_comm(lua_State *L, const char *name) {
    field_get(L, 1, name);
    struct lt_comm *c = NULL;
    if (lua_toboolean(L, -1)) c = lt_lua_check_comm(L, lua_gettop(L));
    else if (!lua_isboolean(L, -1)) luaL_error(L, "model config: %s must be a communicator or false", name);
    lua_pop(L, 1);
    return c;
}

/* The model config of core.gpt / core.gpt_chunk's table: the fields are the resolved provider's
 * (vocab_size already padded; activation and norm given as booleans), see luatron.model's
 * engine_config. */
static lt_gpt_config read_config(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lt_gpt_config c;
    memset(&c, 0, sizeof c);
    c.num_layers = (int)field_int(L, 1, "num_layers");
    c.hidden_size = (int)field_int(L, 1, "hidden_size");
    c.num_attention_heads = (int)field_int(L, 1, "num_attention_heads");
    c.num_query_groups = (int)field_int(L, 1, "num_query_groups");
    c.kv_channels = (int)field_int(L, 1, "kv_channels");
    c.ffn_hidden_size = (int)field_int(L, 1, "ffn_hidden_size");
    c.seq_length = (int)field_int(L, 1, "seq_length");
    c.vocab_size = (int)field_int(L, 1, "vocab_size");
    c.rmsnorm = field_bool(L, 1, "rmsnorm");
    c.layernorm_epsilon = (float)field_num(L, 1, "layernorm_epsilon");
    c.gated_linear_unit = field_bool(L, 1, "gated_linear_unit");
    c.gelu_tanh = field_bool(L, 1, "gelu_tanh");
    c.rope = field_bool(L, 1, "rope");
    c.rotary_base = (float)field_num(L, 1, "rotary_base");
    c.share_embeddings_and_output_weights = field_bool(L, 1, "share_embeddings_and_output_weights");
    c.add_bias_linear = field_bool(L, 1, "add_bias_linear");
    c.add_qkv_bias = field_bool(L, 1, "add_qkv_bias");
    c.layernorm_zero_centered_gamma = field_bool(L, 1, "layernorm_zero_centered_gamma");
    c.qk_layernorm = field_bool(L, 1, "qk_layernorm");
    c.init_method_std = (float)field_num(L, 1, "init_method_std");
    c.hidden_dropout = (float)field_num(L, 1, "hidden_dropout");
    c.attention_dropout = (float)field_num(L, 1, "attention_dropout");
    c.seed = (uint64_t)field_int(L, 1, "seed");
    c.flat_multiple = (int)field_int(L, 1, "flat_multiple");
    c.bf16 = field_bool(L, 1, "bf16");
    c.sequence_parallel = field_bool(L, 1, "sequence_parallel");
    /* tensor_parallel, context_parallel, expert_parallel, moe_global_aux: the groups' communicators, or
     * false; the model keeps them (see keep_comms) */
    c.tp_comm = opt_comm(L, "tensor_parallel");
    c.cp_comm = opt_comm(L, "context_parallel");
    c.ep_comm = opt_comm(L, "expert_parallel");
    c.moe_global_comm = opt_comm(L, "moe_global_aux");
    c.expert_tensor_parallel = field_bool(L, 1, "expert_tensor_parallel");
    field_get(L, 1, "cp_comm_type");
    const char *cp_type = lua_tostring(L, -1);
    if (!cp_type || (strcmp(cp_type, "p2p") != 0 && strcmp(cp_type, "all_gather") != 0))
        luaL_error(L, "model config: cp_comm_type must be \"p2p\" or \"all_gather\"");
    c.cp_all_gather = strcmp(cp_type, "all_gather") == 0;
    lua_pop(L, 1);
    read_moe(L, &c);
    lua_Integer local_rank = field_int(L, 1, "local_rank");
    char err[512] = "";
    field_get(L, 1, "device");
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "model config: device must be a string");
    const char *device = lua_tostring(L, -1);
    /* Each rank of a machine takes its own GPU (the plugin reads LUATRON_CUDA_DEVICE once, when it
     * opens); a device set by the user wins. */
    if (strcmp(device, "cuda") == 0 && local_rank > 0 && !getenv("LUATRON_CUDA_DEVICE")) {
        char index[24];
        snprintf(index, sizeof index, "%lld", (long long)local_rank);
        setenv("LUATRON_CUDA_DEVICE", index, 0);
    }
    c.backend = lt_backend_get(device, err, sizeof err);
    lua_pop(L, 1);
    if (!c.backend) luaL_error(L, "cannot build the model: %s", err);
    return c;
}

/* The model at the top of the stack borrows config 1's communicators: its user values keep them
 * alive as long as the model. */
static void keep_comms(lua_State *L) {
    lua_getfield(L, 1, "tensor_parallel");
    lua_setiuservalue(L, -2, 1);
    lua_getfield(L, 1, "context_parallel");
    lua_setiuservalue(L, -2, 2);
    lua_getfield(L, 1, "expert_parallel");
    lua_setiuservalue(L, -2, 3);
    lua_getfield(L, 1, "moe_global_aux");
    lua_setiuservalue(L, -2, 4);
}

static int l_gpt_new(lua_State *L) {
    lt_gpt_config c = read_config(L);
    char err[512] = "";
    gpt_box *b = lua_newuserdatauv(L, sizeof *b, 4);
    b->m = NULL;
    luaL_setmetatable(L, GPT_MT);
    keep_comms(L);
    b->m = lt_gpt_new(&c, err, sizeof err);
    if (!b->m) luaL_error(L, "cannot build the model: %s", err);
    return 1;
}

/* core.gpt_chunk{<core.gpt's fields>, layer_begin=, layer_end=, pre_process=, post_process=}: the
 * chunk holding global layers [layer_begin, layer_end), with the embedding when pre_process and
 * the final norm, output layer and loss when post_process (luatron.model's chunk_layers says
 * which). */
static int l_gpt_chunk_new(lua_State *L) {
    lt_gpt_config c = read_config(L);
    lt_gpt_stage st;
    st.layer_begin = (int)field_int(L, 1, "layer_begin");
    st.layer_end = (int)field_int(L, 1, "layer_end");
    st.pre_process = field_bool(L, 1, "pre_process");
    st.post_process = field_bool(L, 1, "post_process");
    char err[512] = "";
    gpt_box *b = lua_newuserdatauv(L, sizeof *b, 4);
    b->m = NULL;
    luaL_setmetatable(L, CHUNK_MT);
    keep_comms(L);
    b->m = lt_gpt_new_chunk(&c, &st, err, sizeof err);
    if (!b->m) luaL_error(L, "cannot build the chunk: %s", err);
    return 1;
}

/* Reads a [B, T+1] int32 batch into tokens (first T) and targets (last T). */
static void split_batch(lua_State *L, lt_tensor *batch, int32_t *tokens, int32_t *targets, int B, int T) {
    const int32_t *src = lt_tensor_data(batch);
    (void)L;
    for (int b = 0; b < B; b++) {
        memcpy(tokens + (size_t)b * T, src + (size_t)b * (T + 1), sizeof(int32_t) * (size_t)T);
        memcpy(targets + (size_t)b * T, src + (size_t)b * (T + 1) + 1, sizeof(int32_t) * (size_t)T);
    }
}

/* The forward's mode from an optional dropout seed at idx: an integer is training mode with that
 * seed (any value, 0 included); none or nil is eval mode, no dropout (Megatron's model.eval()). */
static int opt_dropout_seed(lua_State *L, int idx, uint64_t *seed) {
    *seed = 0;
    if (lua_isnoneornil(L, idx)) return 0;
    *seed = (uint64_t)luaL_checkinteger(L, idx);
    return 1;
}

/* model:forward(batch [, dropout_seed]) → ctx, mean loss, valid tokens.
 * batch: int32 [B, T+1] (inputs are columns 1..T, targets 2..T+1), or forward(tokens, targets, seed)
 * with two int32 [B, T] tensors (targets may be nil). With a seed it runs in training mode (dropout
 * masks from the seed); without one (or nil) in eval mode: no dropout, for evaluation and inference. */
static int m_forward(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    lt_tensor *a = lt_lua_check_tensor(L, 2);
    lt_tensor *targets_t = lua_isuserdata(L, 3) ? lt_lua_check_tensor(L, 3) : NULL;
    int seed_idx = lua_isuserdata(L, 3) || (lua_isnil(L, 3) && !lua_isnone(L, 4)) ? 4 : 3;
    uint64_t seed;
    int training = opt_dropout_seed(L, seed_idx, &seed);
    if (a->dtype != LT_I32 || a->ndim != 2 || !lt_tensor_is_contiguous(a))
        luaL_argerror(L, 2, "expected a contiguous int32 tensor [batch, tokens]");
    int B = (int)a->shape[0];
    int two_tensors = targets_t != NULL || seed_idx == 4;
    int T = two_tensors ? (int)a->shape[1] : (int)a->shape[1] - 1;
    if (targets_t && (targets_t->dtype != LT_I32 || !lt_tensor_is_contiguous(targets_t) ||
                      lt_tensor_numel(targets_t) != lt_tensor_numel(a)))
        luaL_argerror(L, 3, "targets must be a contiguous int32 tensor shaped like the tokens");
    if (T <= 0) luaL_argerror(L, 2, "batch needs at least 2 columns (inputs and a shifted target)");
    int32_t *buf = NULL;
    const int32_t *tokens, *targets;
    if (two_tensors) {
        tokens = lt_tensor_data(a);
        targets = targets_t ? lt_tensor_data(targets_t) : NULL;
    } else {
        buf = lua_newuserdatauv(L, sizeof(int32_t) * 2 * (size_t)B * T, 0); /* scratch owned by Lua */
        split_batch(L, a, buf, buf + (size_t)B * T, B, T);
        tokens = buf;
        targets = buf + (size_t)B * T;
    }
    float loss = 0;
    int64_t valid = 0;
    char err[256] = "";
    ctx_box *cb = lua_newuserdatauv(L, sizeof *cb, 0);
    cb->ctx = NULL;
    luaL_setmetatable(L, CTX_MT);
    cb->ctx = lt_gpt_forward(m, tokens, targets, B, T, training, seed, &loss, &valid, err, sizeof err);
    if (!cb->ctx) luaL_error(L, "forward: %s", err);
    cb->owner = m;
    cb->B = B;
    cb->T = T;
    cb->V = lt_gpt_get_config(m)->vocab_size;
    lua_pushnumber(L, loss);
    lua_pushinteger(L, valid);
    return 3;
}

/* model:backward(ctx, grad_scale): accumulates gradients and releases ctx. */
static int m_backward(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    ctx_box *cb = luaL_checkudata(L, 2, CTX_MT);
    float scale = (float)luaL_checknumber(L, 3);
    if (!cb->ctx) luaL_argerror(L, 2, "context was already used by a backward (or released)");
    if (cb->owner != m) luaL_argerror(L, 2, "context comes from another model's forward");
    char err[256];
    int rc = lt_gpt_backward(m, cb->ctx, scale, err, sizeof err);
    cb->ctx = NULL;
    if (rc != 0) luaL_error(L, "backward: %s", err);
    return 0;
}

/* ---- chunks ---- */

/* chunk:forward(tokens_or_hidden, targets [, dropout_seed]) -> output, ctx, valid targets.
 * A first stage takes int32 tokens [B, T] (host); any other the previous chunk's output [T, B, h]
 * ([s, b, h], on the model's device, compute dtype). targets: int32 [B, T] (host) or nil, read by a
 * last stage only. output: the hidden state [T, B, h] for the next chunk, or on a last stage the
 * per-token losses [B, T] float32 on the device (0 at ignored targets; nil without targets) with the
 * count of valid targets; nothing is read back from the device. dropout_seed as model:forward's:
 * training mode with it, eval mode (no dropout) without it or nil; every chunk of a microbatch takes
 * the same. */
static int c_forward(lua_State *L) {
    lt_gpt *m = check_chunk(L, 1);
    const lt_gpt_stage *st = lt_gpt_get_stage(m);
    lt_tensor *in = lt_lua_check_tensor(L, 2);
    lt_tensor *targets_t = lua_isnoneornil(L, 3) ? NULL : lt_lua_check_host_tensor(L, 3);
    uint64_t seed;
    int training = opt_dropout_seed(L, 4, &seed);
    int B, T;
    if (st->pre_process) {
        if (in->dtype != LT_I32 || in->ndim != 2 || !lt_tensor_is_contiguous(in) || in->storage->device != LT_CPU)
            luaL_argerror(L, 2, "a first stage takes a contiguous int32 host tensor of tokens [batch, seq]");
        B = (int)in->shape[0];
        T = (int)in->shape[1];
    } else {
        if (in->ndim != 3) luaL_argerror(L, 2, "a chunk after the first takes the hidden state [seq, batch, hidden]");
        T = (int)in->shape[0];
        B = (int)in->shape[1];
        /* under sequence parallelism it holds this rank's seq / TP positions */
        if (lt_gpt_get_config(m)->sequence_parallel) T *= lt_gpt_tp_size(m);
    }
    if (targets_t && (targets_t->dtype != LT_I32 || !lt_tensor_is_contiguous(targets_t) || targets_t->ndim != 2 ||
                      targets_t->shape[0] != B || targets_t->shape[1] != T))
        luaL_argerror(L, 3, "targets must be a contiguous int32 tensor [batch, seq] of the microbatch's shape");
    const int32_t *targets = targets_t && st->post_process ? lt_tensor_data(targets_t) : NULL;
    char err[256] = "";
    lt_tensor *out = NULL;
    int64_t valid = 0;
    ctx_box *cb = lua_newuserdatauv(L, sizeof *cb, 0);
    cb->ctx = NULL;
    luaL_setmetatable(L, CTX_MT);
    cb->ctx = lt_gpt_chunk_forward(m, st->pre_process ? lt_tensor_data(in) : NULL, st->pre_process ? NULL : in,
                                   targets, B, T, training, seed, &out, &valid, err, sizeof err);
    if (!cb->ctx) luaL_error(L, "chunk forward: %s", err);
    cb->owner = m;
    cb->B = B;
    cb->T = T;
    cb->V = lt_gpt_get_config(m)->vocab_size / lt_gpt_tp_size(m); /* this rank's logit columns */
    if (out) lt_lua_push_tensor(L, out);
    else lua_pushnil(L);
    lua_rotate(L, -2, 1); /* output, ctx */
    if (!st->post_process) return 2;
    lua_pushinteger(L, valid);
    return 3;
}

/* chunk:backward(ctx, grad_output | loss_scale) -> grad_input [T, B, h], or nil on a first stage.
 * A last stage takes the scale of d(each valid token's loss) (e.g. 1 / (valid tokens x
 * microbatches)); any other the gradient of its output [T, B, h]. Releases ctx. */
static int c_backward(lua_State *L) {
    lt_gpt *m = check_chunk(L, 1);
    const lt_gpt_stage *st = lt_gpt_get_stage(m);
    ctx_box *cb = luaL_checkudata(L, 2, CTX_MT);
    if (!cb->ctx) luaL_argerror(L, 2, "context was already used by a backward (or released)");
    if (cb->owner != m) luaL_argerror(L, 2, "context comes from another chunk's forward");
    float scale = 0;
    lt_tensor *dout = NULL;
    if (st->post_process) scale = (float)luaL_checknumber(L, 3);
    else dout = lt_lua_check_tensor(L, 3);
    char err[256] = "";
    lt_tensor *din = NULL;
    int rc = lt_gpt_chunk_backward(m, cb->ctx, dout, scale, &din, err, sizeof err);
    cb->ctx = NULL;
    if (rc != 0) luaL_error(L, "chunk backward: %s", err);
    if (din) lt_lua_push_tensor(L, din);
    else lua_pushnil(L);
    return 1;
}

/* chunk:stage() -> {layer_begin=, layer_end=, pre_process=, post_process=} (global layer numbers). */
static int c_stage(lua_State *L) {
    const lt_gpt_stage *st = lt_gpt_get_stage(check_chunk(L, 1));
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, st->layer_begin);
    lua_setfield(L, -2, "layer_begin");
    lua_pushinteger(L, st->layer_end);
    lua_setfield(L, -2, "layer_end");
    lua_pushboolean(L, st->pre_process);
    lua_setfield(L, -2, "pre_process");
    lua_pushboolean(L, st->post_process);
    lua_setfield(L, -2, "post_process");
    return 1;
}

/* model:logits(ctx) → a host copy [B, T, V] in the compute dtype (float32, or bfloat16 under mixed precision). */
static int m_logits(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    ctx_box *cb = luaL_checkudata(L, 2, CTX_MT);
    if (!cb->ctx) luaL_argerror(L, 2, "context was already used by a backward (or released)");
    if (cb->owner != m) luaL_argerror(L, 2, "context comes from another model's forward");
    if (!lt_gpt_ctx_logits(cb->ctx)) luaL_argerror(L, 2, "only a last stage (post_process) has logits");
    int64_t shape[3] = {cb->B, cb->T, cb->V};
    lt_dtype dtype = lt_gpt_get_config(m)->bf16 ? LT_BF16 : LT_F32;
    lt_tensor *t = lt_tensor_new(dtype, 3, shape);
    lt_lua_push_tensor(L, t);
    lt_gpt_backend(m)->to_host(lt_tensor_data(t), lt_gpt_ctx_logits(cb->ctx),
                               lt_dtype_size(dtype) * (size_t)lt_tensor_numel(t));
    return 1;
}

static int m_zero_grad(lua_State *L) { lt_gpt_zero_grad(check_gpt(L, 1)); return 0; }
static int m_init_weights(lua_State *L) { lt_gpt_init_weights(check_gpt(L, 1)); return 0; }

static void push_param_view(lua_State *L, lt_gpt *m, lt_tensor *flat, const lt_gpt_param *p) {
    int64_t stride[2];
    lt_contiguous_strides(p->ndim, p->shape, stride);
    lt_lua_push_tensor(L, lt_tensor_view(flat, p->ndim, p->shape, stride, p->offset));
    (void)m;
}

static const lt_gpt_param *check_param(lua_State *L, lt_gpt *m, int idx) {
    const char *name = luaL_checkstring(L, idx);
    int i = lt_gpt_find_param(m, name);
    if (i < 0) luaL_error(L, "the model has no parameter named '%s'", name);
    return lt_gpt_param_info(m, i);
}

/* model:param(name) / model:grad(name): views sharing the model's memory. */
static int m_param(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    push_param_view(L, m, lt_gpt_weights(m), check_param(L, m, 2));
    return 1;
}

static int m_grad(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    push_param_view(L, m, lt_gpt_grads(m), check_param(L, m, 2));
    return 1;
}

/* model:param_runs(name [, tp_rank]) → array of {local=, full=, n=}: where the shard of tensor-parallel
 * rank tp_rank (default this chunk's) lies in the whole parameter, as contiguous runs of n elements
 * at 0-based element offsets `local` of the shard and `full` of the whole (row-major) tensor. */
static int m_param_runs(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    const lt_gpt_param *p = check_param(L, m, 2);
    const int size = lt_gpt_tp_size(m);
    const lua_Integer rank = luaL_optinteger(L, 3, lt_gpt_tp_rank(m));
    luaL_argcheck(L, rank >= 0 && rank < size, 3, "not a tensor-parallel rank of this model");
    const int64_t n = lt_gpt_param_num_runs(p, size);
    lua_createtable(L, (int)n, 0);
    for (int64_t k = 0; k < n; k++) {
        const lt_gpt_run r = lt_gpt_param_run(p, (int)rank, size, k);
        lua_createtable(L, 0, 3);
        lua_pushinteger(L, r.local);
        lua_setfield(L, -2, "local");
        lua_pushinteger(L, r.full);
        lua_setfield(L, -2, "full");
        lua_pushinteger(L, r.n);
        lua_setfield(L, -2, "n");
        lua_rawseti(L, -2, (int)k + 1);
    }
    return 1;
}

/* model:activation_bytes(B, T) → bytes a forward of a [B, T] microbatch keeps for its backward. */
static int m_activation_bytes(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    lua_pushinteger(L, (lua_Integer)lt_gpt_activation_bytes(m, (int)luaL_checkinteger(L, 2),
                                                            (int)luaL_checkinteger(L, 3)));
    return 1;
}

/* model:set_moe_aux_loss_scale(s): the MoE aux and z losses' gradient scale (1 / microbatches per step). */
static int m_set_moe_aux_loss_scale(lua_State *L) {
    lt_gpt_set_moe_aux_loss_scale(check_gpt(L, 1), (float)luaL_checknumber(L, 2));
    return 0;
}

/* model:take_moe_stats() → {forwards=, tokens_per_expert={...}, routed=, kept=, aux_loss=, z_loss=,
 * rows_sent=, rows_received=, dispatch_seconds=} of the training steps since the last call (sums over the
 * MoE layers and microbatches, see lt_gpt_moe_totals), then reset. */
static int m_take_moe_stats(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    const int E = lt_gpt_get_config(m)->num_moe_experts;
    int64_t *tokens = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)(E > 0 ? E : 1), 0);
    lt_gpt_moe_totals t;
    lt_gpt_take_moe_stats(m, tokens, &t);
    lua_createtable(L, 0, 9);
    lua_pushinteger(L, t.forwards);
    lua_setfield(L, -2, "forwards");
    lua_createtable(L, E, 0);
    for (int e = 0; e < E; e++) {
        lua_pushinteger(L, tokens[e]);
        lua_rawseti(L, -2, e + 1);
    }
    lua_setfield(L, -2, "tokens_per_expert");
    lua_pushinteger(L, t.routed);
    lua_setfield(L, -2, "routed");
    lua_pushinteger(L, t.kept);
    lua_setfield(L, -2, "kept");
    lua_pushnumber(L, t.aux_loss);
    lua_setfield(L, -2, "aux_loss");
    lua_pushnumber(L, t.z_loss);
    lua_setfield(L, -2, "z_loss");
    lua_pushinteger(L, t.rows_sent);
    lua_setfield(L, -2, "rows_sent");
    lua_pushinteger(L, t.rows_received);
    lua_setfield(L, -2, "rows_received");
    lua_pushnumber(L, t.dispatch_seconds);
    lua_setfield(L, -2, "dispatch_seconds");
    return 1;
}

/* model:tp() → this model's tensor-parallel rank and size (0, 1 without). */
static int m_tp(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    lua_pushinteger(L, lt_gpt_tp_rank(m));
    lua_pushinteger(L, lt_gpt_tp_size(m));
    return 2;
}

static const char *const SPLIT_NAMES[] = {"none", "rows", "columns", "glu_rows"};

/* Pushes {d1, ..., dn}. */
static void push_dims(lua_State *L, const int64_t *dims, int n) {
    lua_createtable(L, n, 0);
    for (int d = 0; d < n; d++) {
        lua_pushinteger(L, dims[d]);
        lua_rawseti(L, -2, d + 1);
    }
}

/* model:parameters() → array of {name=, shape={...}, numel=, offset=, no_weight_decay=, split=,
 * full_shape={...}, full_numel=, tp_grad_sum=, expert=} in model order: shape and numel are this rank's
 * shard, split how the parameter splits across tensor-parallel ranks ("none", "rows", "columns",
 * "glu_rows"), tp_grad_sum whether its gradient is summed over them when a step finishes, expert the
 * global number of the MoE expert it belongs to (0-based; nil for the others). */
static int m_parameters(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    int n = lt_gpt_num_params(m);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        lua_createtable(L, 0, 5);
        lua_pushstring(L, p->name);
        lua_setfield(L, -2, "name");
        push_dims(L, p->shape, p->ndim);
        lua_setfield(L, -2, "shape");
        lua_pushinteger(L, p->numel);
        lua_setfield(L, -2, "numel");
        lua_pushinteger(L, p->offset);
        lua_setfield(L, -2, "offset");
        lua_pushboolean(L, p->no_weight_decay);
        lua_setfield(L, -2, "no_weight_decay");
        lua_pushstring(L, SPLIT_NAMES[p->split]);
        lua_setfield(L, -2, "split");
        push_dims(L, p->full_shape, p->ndim);
        lua_setfield(L, -2, "full_shape");
        lua_pushinteger(L, p->full_numel);
        lua_setfield(L, -2, "full_numel");
        lua_pushboolean(L, p->tp_grad_sum);
        lua_setfield(L, -2, "tp_grad_sum");
        if (p->expert >= 0) {
            lua_pushinteger(L, p->expert);
            lua_setfield(L, -2, "expert");
        }
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* Flat views of all weights / all gradients. */
static int m_flat_weights(lua_State *L) {
    lt_tensor *w = lt_gpt_weights(check_gpt(L, 1));
    lt_lua_push_tensor(L, lt_tensor_view(w, w->ndim, w->shape, w->stride, w->offset));
    return 1;
}

static int m_flat_grads(lua_State *L) {
    lt_tensor *g = lt_gpt_grads(check_gpt(L, 1));
    lt_lua_push_tensor(L, lt_tensor_view(g, g->ndim, g->shape, g->stride, g->offset));
    return 1;
}

static int m_num_parameters(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    lua_Integer n = 0;
    for (int i = 0; i < lt_gpt_num_params(m); i++) n += lt_gpt_param_info(m, i)->numel;
    lua_pushinteger(L, n);
    return 1;
}

static int m_flops_per_token(lua_State *L) {
    lua_pushnumber(L, lt_gpt_flops_per_token(check_gpt(L, 1)));
    return 1;
}

static int m_tostring(lua_State *L) {
    gpt_box *b = check_box(L, 1);
    if (!b->m) { lua_pushliteral(L, "GPT(closed)"); return 1; }
    const lt_gpt_config *c = lt_gpt_get_config(b->m);
    const lt_gpt_stage *st = lt_gpt_get_stage(b->m);
    if (luaL_testudata(L, 1, CHUNK_MT)) {
        lua_pushfstring(L, "GPTChunk(layers=[%d, %d) of %d, pre_process=%s, post_process=%s, hidden=%d)",
                        st->layer_begin, st->layer_end, c->num_layers, st->pre_process ? "true" : "false",
                        st->post_process ? "true" : "false", c->hidden_size);
        return 1;
    }
    lua_pushfstring(L, "GPT(layers=%d, hidden=%d, heads=%d, vocab=%d, seq=%d)", c->num_layers, c->hidden_size,
                    c->num_attention_heads, c->vocab_size, c->seq_length);
    return 1;
}

static int m_free(lua_State *L) {
    gpt_box *b = check_box(L, 1);
    lt_gpt_free(b->m);
    b->m = NULL;
    return 0;
}

static int ctx_free(lua_State *L) {
    ctx_box *cb = luaL_checkudata(L, 1, CTX_MT);
    lt_gpt_ctx_free(cb->ctx);
    cb->ctx = NULL;
    return 0;
}

/* A host fp32 tensor holding a copy of n floats. */
static void push_floats(lua_State *L, const float *x, int n) {
    const int64_t shape[1] = {n};
    lt_tensor *t = lt_tensor_new(LT_F32, 1, shape);
    if (!t) luaL_error(L, "out of memory");
    memcpy(lt_tensor_data(t), x, sizeof(float) * (size_t)n);
    lt_lua_push_tensor(L, t);
}

/* model:expert_biases() → array of {name=, bias=, tokens=} for each MoE layer with an expert bias
 * (moe_router_enable_expert_bias; engine/model/gpt.h): copies, host fp32 [num_moe_experts] each. With
 * `true`, the token counts are zeroed after the copy. */
static int m_expert_biases(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    const int reset = lua_toboolean(L, 2), n = lt_gpt_moe_bias_layers(m);
    const int E = lt_gpt_get_config(m)->num_moe_experts;
    lua_createtable(L, n, 0);
    for (int k = 0; k < n; k++) {
        float *tokens;
        const char *name;
        const float *bias = lt_gpt_moe_expert_bias(m, k, &tokens, &name);
        lua_createtable(L, 0, 3);
        lua_pushstring(L, name);
        lua_setfield(L, -2, "name");
        push_floats(L, bias, E);
        lua_setfield(L, -2, "bias");
        push_floats(L, tokens, E);
        lua_setfield(L, -2, "tokens");
        lua_rawseti(L, -2, k + 1);
        if (reset) memset(tokens, 0, sizeof(float) * (size_t)E);
    }
    return 1;
}

/* model:set_expert_bias(k, tensor): MoE layer k's (1-based, in expert_biases' order) expert bias from a
 * fp32 tensor of num_moe_experts values. */
static int m_set_expert_bias(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    const lua_Integer k = luaL_checkinteger(L, 2);
    lt_tensor *t = lt_lua_check_tensor(L, 3);
    const int E = lt_gpt_get_config(m)->num_moe_experts;
    float *bias = k >= 1 && k <= lt_gpt_moe_bias_layers(m) ? lt_gpt_moe_expert_bias(m, (int)k - 1, NULL, NULL) : NULL;
    luaL_argcheck(L, bias, 2, "no such MoE layer with an expert bias");
    luaL_argcheck(L, t->dtype == LT_F32 && t->storage->device == LT_CPU && lt_tensor_numel(t) == E, 3,
                  "expected a float32 host tensor of num_moe_experts values");
    for (int e = 0; e < E; e++) bias[e] = (float)lt_tensor_get_flat(t, e);
    return 0;
}

/* model:expert_offset() → where the MoE experts' parameters begin in the flat buffers (0-based; the
 * length when there are none): data parallelism reduces them over the expert-data-parallel group. */
static int m_expert_offset(lua_State *L) {
    lua_pushinteger(L, lt_gpt_expert_offset(check_gpt(L, 1)));
    return 1;
}

/* ---- text generation ---- */

typedef struct {
    lt_gpt_cache *cache;
    const lt_gpt *owner;
} cache_box;

/* The integer ids of array idx (0-based token ids), in a Lua-owned buffer; *n their count. */
static int32_t *check_ids(lua_State *L, int idx, int *n) {
    *n = (int)luaL_len(L, idx);
    int32_t *ids = lua_newuserdatauv(L, sizeof(int32_t) * (size_t)(*n > 0 ? *n : 1), 0);
    for (int i = 0; i < *n; i++) {
        lua_geti(L, idx, i + 1);
        int ok;
        ids[i] = (int32_t)lua_tointegerx(L, -1, &ok);
        if (!ok) luaL_argerror(L, idx, "token ids must be integers");
        lua_pop(L, 1);
    }
    return ids;
}

/* model:kv_cache(max_len) -> a key/value cache for one sequence of up to max_len positions. */
static int m_kv_cache(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    const int max_len = (int)luaL_checkinteger(L, 2);
    char err[256];
    cache_box *cb = lua_newuserdatauv(L, sizeof *cb, 0);
    cb->cache = NULL;
    luaL_setmetatable(L, CACHE_MT);
    cb->cache = lt_gpt_cache_new(m, max_len, err, sizeof err);
    if (!cb->cache) luaL_error(L, "kv_cache: %s", err);
    cb->owner = m;
    return 1;
}

static cache_box *check_cache(lua_State *L, int idx) {
    cache_box *cb = luaL_checkudata(L, idx, CACHE_MT);
    if (!cb->cache) luaL_argerror(L, idx, "cache was already released");
    return cb;
}

/* model:decode(cache, tokens) -> fp32 host tensor [vocab_size]: the next-token logits after tokens (an int32
 * tensor or an array of ids, at the cache's next positions; their keys and values join it). */
static int m_decode(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    cache_box *cb = check_cache(L, 2);
    if (cb->owner != m) luaL_argerror(L, 2, "cache belongs to another model");
    int T;
    const int32_t *ids;
    if (lua_istable(L, 3)) {
        ids = check_ids(L, 3, &T);
    } else {
        lt_tensor *t = lt_lua_check_tensor(L, 3);
        if (t->dtype != LT_I32 || !lt_tensor_is_contiguous(t)) luaL_argerror(L, 3, "expected a contiguous int32 tensor");
        T = (int)lt_tensor_numel(t);
        ids = lt_tensor_data(t);
    }
    if (T < 1) luaL_argerror(L, 3, "no tokens to decode");
    const int V = lt_gpt_get_config(m)->vocab_size;
    const int64_t shape[1] = {V};
    lt_tensor *logits = lt_tensor_new(LT_F32, 1, shape);
    if (!logits) luaL_error(L, "out of memory");
    char err[256];
    if (lt_gpt_decode(m, cb->cache, ids, T, lt_tensor_data(logits), err, sizeof err)) {
        lt_tensor_free(logits);
        luaL_error(L, "decode: %s", err);
    }
    lt_lua_push_tensor(L, logits);
    return 1;
}

static int cache_length(lua_State *L) {
    lua_pushinteger(L, lt_gpt_cache_length(check_cache(L, 1)->cache));
    return 1;
}

static int cache_free(lua_State *L) {
    cache_box *cb = luaL_checkudata(L, 1, CACHE_MT);
    lt_gpt_cache_free(cb->cache);
    cb->cache = NULL;
    return 0;
}

/* core.sample(logits, vocab, temperature, top_k, top_p, u) -> token id (engine/model/sample.h): logits an
 * fp32 host tensor, only ids below vocab (<= its length) taking part. */
static int l_sample(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    if (t->dtype != LT_F32 || !lt_tensor_is_contiguous(t) || t->storage->device != LT_CPU)
        luaL_argerror(L, 1, "expected a contiguous float32 host tensor");
    const lua_Integer V = luaL_checkinteger(L, 2);
    if (V < 1 || V > lt_tensor_numel(t)) luaL_argerror(L, 2, "vocabulary size outside 1 .. #logits");
    const double u = luaL_checknumber(L, 6);
    luaL_argcheck(L, u >= 0.0 && u < 1.0, 6, "u must be in [0, 1)");
    lua_pushinteger(L, lt_sample_token(lt_tensor_data(t), (int)V, (float)luaL_checknumber(L, 3),
                                       (int)luaL_checkinteger(L, 4), (float)luaL_checknumber(L, 5), (float)u));
    return 1;
}

/* opts[name] as a number (def when absent); an error for anything else. */
static double opt_number(lua_State *L, int idx, const char *name, double def) {
    double v = def;
    if (lua_getfield(L, idx, name) != LUA_TNIL) {
        int ok;
        v = lua_tonumberx(L, -1, &ok);
        if (!ok) luaL_error(L, "generate: %s must be a number", name);
    }
    lua_pop(L, 1);
    return v;
}

/* model:generate(prompt_ids, { max_new_tokens =, temperature =, top_k =, top_p =, seed =, eod =, vocab = })
 * -> the new ids: the prompt through the model once into a key/value cache, then one decode per new
 * token, each sampled by core.sample's rule (temperature 0 or top_k 1: greedy) with u the Philox uniform
 * of (seed, "generate") at its index, until max_new_tokens (default 32) or eod is produced; only ids below
 * vocab (default the model's, padding included) are drawn. Unknown options are refused. */
static int m_generate(lua_State *L) {
    lt_gpt *m = check_gpt(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_isnoneornil(L, 3)) lua_newtable(L), lua_replace(L, 3);
    luaL_checktype(L, 3, LUA_TTABLE);
    static const char *const known[] = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "eod", "vocab", NULL};
    for (lua_pushnil(L); lua_next(L, 3); lua_pop(L, 1)) {
        int ok = 0;
        for (int i = 0; known[i] && !ok; i++) ok = lua_type(L, -2) == LUA_TSTRING && !strcmp(lua_tostring(L, -2), known[i]);
        if (!ok) luaL_error(L, "generate: unknown option '%s' (max_new_tokens, temperature, top_k, top_p, seed, eod, vocab)",
                            luaL_tolstring(L, -2, NULL));
    }
    const int V = lt_gpt_get_config(m)->vocab_size, S = lt_gpt_get_config(m)->seq_length;
    const double steps = opt_number(L, 3, "max_new_tokens", 32), temperature = opt_number(L, 3, "temperature", 1);
    const double top_k = opt_number(L, 3, "top_k", 0), top_p = opt_number(L, 3, "top_p", 0);
    const double seed = opt_number(L, 3, "seed", 0), eod = opt_number(L, 3, "eod", -1), vocab = opt_number(L, 3, "vocab", V);
    if (steps < 0 || steps != (int)steps) luaL_error(L, "generate: max_new_tokens must be a whole number >= 0");
    if (temperature < 0) luaL_error(L, "generate: temperature must be >= 0 (0: greedy)");
    if (top_k < 0 || top_k != (int)top_k) luaL_error(L, "generate: top_k must be a whole number >= 0 (0: off)");
    if (top_p < 0 || top_p > 1) luaL_error(L, "generate: top_p must be in [0, 1] (0 or 1: off)");
    if (vocab < 1 || vocab > V || vocab != (int)vocab) luaL_error(L, "generate: vocab must be 1 .. %d", V);
    int n;
    int32_t *prompt = check_ids(L, 2, &n);
    if (n < 1) luaL_argerror(L, 2, "the prompt needs at least one token");
    if (n + (int)steps > S)
        luaL_error(L, "generate: the prompt's %d tokens and max_new_tokens = %d exceed seq_length = %d", n, (int)steps, S);
    char err[256];
    lt_gpt_cache *cache = lt_gpt_cache_new(m, n + (int)steps > 0 ? n + (int)steps : 1, err, sizeof err);
    float *logits = cache ? malloc(sizeof(float) * (size_t)V) : NULL;
    if (!cache || !logits) {
        lt_gpt_cache_free(cache);
        luaL_error(L, "generate: %s", cache ? "out of memory" : err);
    }
    const uint64_t key = lt_rng_key((uint64_t)seed, "generate");
    lua_createtable(L, (int)steps, 0);
    int rc = 0;
    const int32_t *in = prompt;
    int32_t next;
    for (int i = 0; i < (int)steps; i++) {
        if ((rc = lt_gpt_decode(m, cache, in, i ? 1 : n, logits, err, sizeof err)) != 0) break;
        next = lt_sample_token(logits, (int)vocab, (float)temperature, (int)top_k, (float)top_p, lt_rng_uniform(key, i));
        lua_pushinteger(L, next);
        lua_rawseti(L, -2, i + 1);
        if (next == (int32_t)eod) break;
        in = &next;
    }
    free(logits);
    lt_gpt_cache_free(cache);
    if (rc) luaL_error(L, "generate: %s", err);
    return 1;
}

/* The raw model pointer for other bindings (the optimizer). */
lt_gpt *lt_lua_check_gpt(lua_State *L, int idx) { return check_gpt(L, idx); }

void lt_lua_open_model(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"forward", m_forward},       {"backward", m_backward},         {"logits", m_logits},
        {"zero_grad", m_zero_grad},   {"init_weights", m_init_weights}, {"param", m_param},
        {"grad", m_grad},             {"parameters", m_parameters},     {"flat_weights", m_flat_weights},
        {"flat_grads", m_flat_grads}, {"num_parameters", m_num_parameters},
        {"flops_per_token", m_flops_per_token}, {"close", m_free},
        {"set_moe_aux_loss_scale", m_set_moe_aux_loss_scale}, {"take_moe_stats", m_take_moe_stats},
        {"expert_offset", m_expert_offset}, {"expert_biases", m_expert_biases},
        {"set_expert_bias", m_set_expert_bias}, {"kv_cache", m_kv_cache}, {"decode", m_decode},
        {"generate", m_generate}, {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {"__tostring", m_tostring}, {NULL, NULL}};
    lt_lua_new_type(L, GPT_MT, methods, meta);
    static const luaL_Reg chunk_methods[] = {
        {"forward", c_forward},       {"backward", c_backward},         {"stage", c_stage},
        {"logits", m_logits},
        {"zero_grad", m_zero_grad},   {"init_weights", m_init_weights}, {"param", m_param},
        {"grad", m_grad},             {"parameters", m_parameters},     {"flat_weights", m_flat_weights},
        {"flat_grads", m_flat_grads}, {"num_parameters", m_num_parameters},
        {"param_runs", m_param_runs}, {"tp", m_tp}, {"activation_bytes", m_activation_bytes},
        {"set_moe_aux_loss_scale", m_set_moe_aux_loss_scale}, {"take_moe_stats", m_take_moe_stats},
        {"expert_offset", m_expert_offset}, {"expert_biases", m_expert_biases},
        {"set_expert_bias", m_set_expert_bias}, {"kv_cache", m_kv_cache}, {"decode", m_decode},
        {"generate", m_generate}, {"close", m_free},            {NULL, NULL}};
    lt_lua_new_type(L, CHUNK_MT, chunk_methods, meta);
    static const luaL_Reg ctx_methods[] = {{"release", ctx_free}, {NULL, NULL}};
    static const luaL_Reg ctx_meta[] = {{"__gc", ctx_free}, {"__close", ctx_free}, {NULL, NULL}};
    lt_lua_new_type(L, CTX_MT, ctx_methods, ctx_meta);
    static const luaL_Reg cache_methods[] = {{"length", cache_length}, {"release", cache_free}, {NULL, NULL}};
    static const luaL_Reg cache_meta[] = {{"__gc", cache_free}, {"__close", cache_free}, {NULL, NULL}};
    lt_lua_new_type(L, CACHE_MT, cache_methods, cache_meta);
    lua_pushcfunction(L, l_sample);
    lua_setfield(L, -2, "sample");
    lua_pushcfunction(L, l_gpt_new);
    lua_setfield(L, -2, "gpt");
    lua_pushcfunction(L, l_gpt_chunk_new);
    lua_setfield(L, -2, "gpt_chunk");
}

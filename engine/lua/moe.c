/* core.moe_route, core.moe_route_backward, core.moe_aux_counts, core.moe_global_counts_add: the MoE
 * router of engine/parallel/moe_router.h on host tensors. lua/luatron/moe.lua (lt.moe) checks the
 * options people write and passes a table of the C fields:
 *   { topk, sigmoid, pre_softmax, topk_scaling_factor, expert_bias (fp32 [E] or nil), capacity_factor,
 *     drop_by_position, pad_to_capacity, load_balancing (0..4), aux_loss_coeff, z_loss_coeff,
 *     seq_length, micro_batch_size, tp_cp_size, aux_counts (int64 [n] or nil), tp_dp_cp_size,
 *     global_counts (fp32 [E] or nil), eval }
 *   core.moe_route(logits [T, E] fp32, cfg) --> probs [T, E] fp32, map [T, E] int32,
 *                                              tokens_per_expert [E] int64, aux_loss, z_loss
 *   core.moe_route_backward(logits, map, cfg, dprobs [T, E] fp32, daux, dz) --> dlogits [T, E] fp32
 *   core.moe_aux_counts(logits, cfg) --> int64 [n]: this rank's counts of the aux loss
 *   core.moe_global_counts_add(sum fp32 [E], steps, summed int64 [E]) --> avg fp32 [E], steps + 1
 *     (sum updated in place) */
#include <stdlib.h>

#include "engine/lua/bindings.h"
#include "engine/parallel/moe_router.h"

/* A contiguous host tensor of dtype with `n` dimensions of these sizes (-1: any), for argument idx. */
static lt_tensor *check_shaped(lua_State *L, int idx, lt_dtype dtype, int ndim, int64_t d0, int64_t d1,
                               const char *what) {
    lt_tensor *t = lt_lua_check_host_tensor(L, idx);
    if (t->dtype != dtype || t->ndim != ndim || !lt_tensor_is_contiguous(t) || (d0 >= 0 && t->shape[0] != d0) ||
        (ndim > 1 && d1 >= 0 && t->shape[1] != d1)) {
        if (ndim == 1)
            luaL_error(L, "%s must be a contiguous %s tensor [%s]", what, lt_dtype_name(dtype),
                       d0 >= 0 ? lua_pushfstring(L, "%d", (int)d0) : "experts");
        luaL_error(L, "%s must be a contiguous %s tensor [%s, %s]", what, lt_dtype_name(dtype),
                   d0 >= 0 ? lua_pushfstring(L, "%d", (int)d0) : "tokens",
                   d1 >= 0 ? lua_pushfstring(L, "%d", (int)d1) : "experts");
    }
    return t;
}

static lua_Number num_field(lua_State *L, int idx, const char *key) {
    lua_getfield(L, idx, key);
    const lua_Number v = lua_isnil(L, -1) ? 0 : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    return v;
}

static int int_field(lua_State *L, int idx, const char *key) {
    lua_getfield(L, idx, key);
    int ok = 1;
    const lua_Integer v = lua_isnil(L, -1) ? 0 : lua_tointegerx(L, -1, &ok);
    if (!ok) luaL_error(L, "moe: %s must be an integer", key);
    lua_pop(L, 1);
    return (int)v;
}

static int bool_field(lua_State *L, int idx, const char *key) {
    lua_getfield(L, idx, key);
    const int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The tensor in field key of the table at idx, or NULL; left on the stack (so it lives while used). */
static lt_tensor *tensor_field(lua_State *L, int idx, const char *key, lt_dtype dtype, int64_t n) {
    lua_getfield(L, idx, key);
    if (lua_isnil(L, -1)) return NULL;
    return check_shaped(L, lua_gettop(L), dtype, 1, n, -1, key);
}

/* cfg from the table at idx for logits [T, E]; pushes 3 values (the tensors it points into). */
static lt_moe_router_cfg read_cfg(lua_State *L, int idx, int E) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lt_moe_router_cfg c = {
        .topk = int_field(L, idx, "topk"),
        .sigmoid = bool_field(L, idx, "sigmoid"),
        .pre_softmax = bool_field(L, idx, "pre_softmax"),
        .topk_scaling_factor = (float)num_field(L, idx, "topk_scaling_factor"),
        .capacity_factor = num_field(L, idx, "capacity_factor"),
        .drop_by_position = bool_field(L, idx, "drop_by_position"),
        .pad_to_capacity = bool_field(L, idx, "pad_to_capacity"),
        .load_balancing = int_field(L, idx, "load_balancing"),
        .aux_loss_coeff = num_field(L, idx, "aux_loss_coeff"),
        .z_loss_coeff = num_field(L, idx, "z_loss_coeff"),
        .seq_length = int_field(L, idx, "seq_length"),
        .micro_batch_size = int_field(L, idx, "micro_batch_size"),
        .tp_cp_size = int_field(L, idx, "tp_cp_size"),
        .tp_dp_cp_size = int_field(L, idx, "tp_dp_cp_size"),
        .eval = bool_field(L, idx, "eval"),
    };
    lt_tensor *bias = tensor_field(L, idx, "expert_bias", LT_F32, E);
    c.expert_bias = bias ? lt_tensor_data(bias) : NULL;
    lt_tensor *counts = tensor_field(L, idx, "aux_counts", LT_I64, lt_moe_aux_counts_len(&c, E));
    c.aux_counts = counts ? lt_tensor_data(counts) : NULL;
    lt_tensor *global = tensor_field(L, idx, "global_counts", LT_F32, E);
    c.global_counts = global ? lt_tensor_data(global) : NULL;
    return c;
}

static lt_tensor *new_tensor(lua_State *L, lt_dtype dtype, int ndim, int64_t d0, int64_t d1) {
    const int64_t shape[2] = {d0, d1};
    lt_tensor *t = lt_tensor_new(dtype, ndim, shape);
    lt_lua_push_tensor(L, t); /* raises when out of memory */
    return t;
}

static int l_route(lua_State *L) {
    lt_tensor *lg = check_shaped(L, 1, LT_F32, 2, -1, -1, "logits");
    const int T = (int)lg->shape[0], E = (int)lg->shape[1];
    const lt_moe_router_cfg c = read_cfg(L, 2, E);
    char err[512] = "";
    if (lt_moe_router_check(&c, T, E, err, sizeof err)) return luaL_error(L, "moe.route: %s", err);
    uint8_t *map = malloc((size_t)T * E);
    if (!map) return luaL_error(L, "moe.route: out of memory");
    lt_tensor *probs = new_tensor(L, LT_F32, 2, T, E), *imap = new_tensor(L, LT_I32, 2, T, E);
    lt_tensor *tpe = new_tensor(L, LT_I64, 1, E, 0);
    double aux, z;
    const int rc = lt_moe_route_forward(&c, lt_tensor_data(lg), T, E, lt_tensor_data(probs), map,
                                        lt_tensor_data(tpe), &aux, &z, err, sizeof err);
    int32_t *m = lt_tensor_data(imap);
    for (size_t i = 0; !rc && i < (size_t)T * E; i++) m[i] = map[i];
    free(map);
    if (rc) return luaL_error(L, "moe.route: %s", err);
    lua_pushnumber(L, aux);
    lua_pushnumber(L, z);
    return 5;
}

static int l_route_backward(lua_State *L) {
    lt_tensor *lg = check_shaped(L, 1, LT_F32, 2, -1, -1, "logits");
    const int T = (int)lg->shape[0], E = (int)lg->shape[1];
    lt_tensor *imap = check_shaped(L, 2, LT_I32, 2, T, E, "routing_map");
    const lt_moe_router_cfg c = read_cfg(L, 3, E);
    lt_tensor *dprobs = check_shaped(L, 4, LT_F32, 2, T, E, "dprobs");
    const float daux = (float)luaL_optnumber(L, 5, 0), dz = (float)luaL_optnumber(L, 6, 0);
    char err[512] = "";
    if (lt_moe_router_check(&c, T, E, err, sizeof err)) return luaL_error(L, "moe.route_backward: %s", err);
    uint8_t *map = malloc((size_t)T * E);
    if (!map) return luaL_error(L, "moe.route_backward: out of memory");
    const int32_t *m = lt_tensor_data(imap);
    for (size_t i = 0; i < (size_t)T * E; i++) map[i] = m[i] != 0;
    lt_tensor *dl = new_tensor(L, LT_F32, 2, T, E);
    const int rc = lt_moe_route_backward(&c, lt_tensor_data(lg), NULL, map, NULL, T, E, lt_tensor_data(dprobs), daux,
                                         dz, lt_tensor_data(dl), err, sizeof err);
    free(map);
    if (rc) return luaL_error(L, "moe.route_backward: %s", err);
    return 1;
}

static int l_aux_counts(lua_State *L) {
    lt_tensor *lg = check_shaped(L, 1, LT_F32, 2, -1, -1, "logits");
    const int T = (int)lg->shape[0], E = (int)lg->shape[1];
    const lt_moe_router_cfg c = read_cfg(L, 2, E);
    char err[512] = "";
    lt_tensor *counts = new_tensor(L, LT_I64, 1, lt_moe_aux_counts_len(&c, E), 0);
    if (lt_moe_aux_counts(&c, lt_tensor_data(lg), T, E, lt_tensor_data(counts), err, sizeof err))
        return luaL_error(L, "moe.aux_counts: %s", err);
    return 1;
}

static int l_global_counts_add(lua_State *L) {
    lt_tensor *sum = check_shaped(L, 1, LT_F32, 1, -1, -1, "sum");
    const int E = (int)sum->shape[0];
    float steps = (float)luaL_checknumber(L, 2);
    lt_tensor *summed = check_shaped(L, 3, LT_I64, 1, E, -1, "counts");
    lt_tensor *avg = new_tensor(L, LT_F32, 1, E, 0);
    lt_moe_global_counts_add(lt_tensor_data(sum), &steps, lt_tensor_data(summed), E, lt_tensor_data(avg));
    lua_pushnumber(L, steps);
    return 2;
}

void lt_lua_open_moe(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"moe_route", l_route},
        {"moe_route_backward", l_route_backward},
        {"moe_aux_counts", l_aux_counts},
        {"moe_global_counts_add", l_global_counts_add},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
}

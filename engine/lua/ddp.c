/* luatron.DDP: a model's gradient buckets reduced over a data-parallel communicator while backward
 * runs (engine/parallel/ddp.h). */
#include "engine/lua/bindings.h"
#include "engine/model/gpt.h"
#include "engine/parallel/ddp.h"

#define DDP_MT "luatron.DDP"

typedef struct {
    lt_ddp *d;
    lt_gpt *m;
    lt_tensor *grads, *weights; /* views of the model's flat buffers: the range the buckets cover */
    int hooks;                  /* the range starts the buffers: backward's and forward's hooks apply */
} ddp_box;

static ddp_box *check_ddp(lua_State *L, int idx) {
    ddp_box *b = luaL_checkudata(L, idx, DDP_MT);
    if (!b->d) luaL_argerror(L, idx, "DDP was already closed");
    return b;
}

/* core.ddp(model, communicator [, bucket_size [, sharded [, first, count]]]): sharded = the distributed
 * optimizer's buckets (engine/parallel/ddp.h); first and count (0-based elements) a range of the flat
 * buffers to cover instead of all of them. Only a range from 0 starts its reductions while backward runs
 * (the model's hooks count from the buffers' start); another is reduced when the step finishes. */
static int l_ddp_new(lua_State *L) {
    lt_gpt *m = lt_lua_check_gpt(L, 1);
    lt_comm *c = lt_lua_check_comm(L, 2);
    lua_Integer bucket = luaL_optinteger(L, 3, 0);
    int sharded = lua_toboolean(L, 4);
    const int64_t total = lt_tensor_numel(lt_gpt_grads(m));
    const lua_Integer first = luaL_optinteger(L, 5, 0), count = luaL_optinteger(L, 6, total - first);
    luaL_argcheck(L, first >= 0 && count >= 0 && first + count <= total, 5, "range outside the flat buffers");
    ddp_box *b = lua_newuserdatauv(L, sizeof *b, 2);
    *b = (ddp_box){NULL, m, NULL, NULL, first == 0};
    b->grads = lt_tensor_narrow(lt_gpt_grads(m), 0, first, count);
    b->weights = lt_tensor_narrow(lt_gpt_weights(m), 0, first, count);
    luaL_setmetatable(L, DDP_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, -2, 2);
    char err[512] = "out of memory for DDP buckets";
    if (!b->grads || !b->weights) return luaL_error(L, "%s", err);
    b->d = sharded ? lt_ddp_new_sharded(b->grads, b->weights, bucket, c, err, sizeof err)
                   : lt_ddp_new(b->grads, bucket, c);
    if (!b->d) return luaL_error(L, "%s", err);
    return 1;
}

static void push_view(lua_State *L, lt_tensor *t) {
    lt_lua_push_tensor(L, lt_tensor_view(t, t->ndim, t->shape, t->stride, t->offset));
}

/* Sharded only: ddp:main_params(), ddp:main_grads() (views), ddp:pieces() → {{flat_first=, count=,
 * main_offset=}, ...} (0-based), ddp:weights_to_main(), ddp:gather_params(), ddp:params_finish(),
 * ddp:param_hook(on): let the next forward wait bucket by bucket for the gathered parameters. */
static ddp_box *check_sharded(lua_State *L, int idx) {
    ddp_box *b = check_ddp(L, idx);
    if (!lt_ddp_main_params(b->d)) luaL_argerror(L, idx, "not a sharded (distributed optimizer) DDP");
    return b;
}

static int m_main_params(lua_State *L) { push_view(L, lt_ddp_main_params(check_sharded(L, 1)->d)); return 1; }
static int m_main_grads(lua_State *L) { push_view(L, lt_ddp_main_grads(check_sharded(L, 1)->d)); return 1; }

static int m_pieces(lua_State *L) {
    ddp_box *b = check_sharded(L, 1);
    int n = lt_ddp_num_buckets(b->d);
    lua_createtable(L, n, 0);
    for (int k = 0; k < n; k++) {
        int64_t first, count, off;
        lt_ddp_piece(b->d, k, &first, &count, &off);
        lua_createtable(L, 0, 3);
        lua_pushinteger(L, first);
        lua_setfield(L, -2, "flat_first");
        lua_pushinteger(L, count);
        lua_setfield(L, -2, "count");
        lua_pushinteger(L, off);
        lua_setfield(L, -2, "main_offset");
        lua_rawseti(L, -2, k + 1);
    }
    return 1;
}

static int m_weights_to_main(lua_State *L) { lt_ddp_weights_to_main(check_sharded(L, 1)->d); return 0; }
static int m_gather_params(lua_State *L) { lt_ddp_gather_params(check_sharded(L, 1)->d); return 0; }

static int m_params_finish(lua_State *L) {
    ddp_box *b = check_sharded(L, 1);
    if (b->hooks) lt_gpt_set_param_wait_hook(b->m, NULL, NULL);
    char err[512] = "";
    if (lt_ddp_params_finish(b->d, err, sizeof err) != 0) return luaL_error(L, "%s", err);
    return 0;
}

static int m_param_hook(lua_State *L) {
    ddp_box *b = check_sharded(L, 1);
    if (lua_toboolean(L, 2) && b->hooks) lt_gpt_set_param_wait_hook(b->m, lt_ddp_params_needed, b->d);
    else lt_gpt_set_param_wait_hook(b->m, NULL, NULL);
    return 0;
}

/* ddp:begin(): the next backward starts reducing buckets as their gradients become final. */
static int m_begin(lua_State *L) {
    ddp_box *b = check_ddp(L, 1);
    lt_ddp_begin(b->d);
    if (b->hooks) lt_gpt_set_grad_ready_hook(b->m, lt_ddp_grads_ready, b->d);
    return 0;
}

/* ddp:finish() → seconds spent waiting for the reductions (not hidden behind backward). */
static int m_finish(lua_State *L) {
    ddp_box *b = check_ddp(L, 1);
    if (b->hooks) lt_gpt_set_grad_ready_hook(b->m, NULL, NULL);
    char err[512] = "";
    if (lt_ddp_finish(b->d, err, sizeof err) != 0) return luaL_error(L, "%s", err);
    lua_pushnumber(L, lt_ddp_wait_seconds(b->d));
    return 1;
}

static int m_num_buckets(lua_State *L) {
    lua_pushinteger(L, lt_ddp_num_buckets(check_ddp(L, 1)->d));
    return 1;
}

static int m_free(lua_State *L) {
    ddp_box *b = luaL_checkudata(L, 1, DDP_MT);
    if (b->d && b->hooks) {
        lt_gpt_set_grad_ready_hook(b->m, NULL, NULL);
        lt_gpt_set_param_wait_hook(b->m, NULL, NULL);
    }
    lt_ddp_free(b->d);
    lt_tensor_free(b->grads);
    lt_tensor_free(b->weights);
    b->d = NULL, b->grads = b->weights = NULL;
    return 0;
}

void lt_lua_open_ddp(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"begin", m_begin},
        {"finish", m_finish},
        {"num_buckets", m_num_buckets},
        {"main_params", m_main_params},
        {"main_grads", m_main_grads},
        {"pieces", m_pieces},
        {"weights_to_main", m_weights_to_main},
        {"gather_params", m_gather_params},
        {"params_finish", m_params_finish},
        {"param_hook", m_param_hook},
        {"close", m_free},
        {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {NULL, NULL}};
    lt_lua_new_type(L, DDP_MT, methods, meta);
    lua_pushcfunction(L, l_ddp_new);
    lua_setfield(L, -2, "ddp");
}

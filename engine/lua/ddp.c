/* luatron.DDP: a model's gradient buckets reduced over a data-parallel communicator while backward
 * runs (engine/parallel/ddp.h). */
#include "engine/lua/bindings.h"
#include "engine/model/gpt.h"
#include "engine/parallel/ddp.h"

#define DDP_MT "luatron.DDP"

typedef struct {
    lt_ddp *d;
    lt_gpt *m;
} ddp_box;

static ddp_box *check_ddp(lua_State *L, int idx) {
    ddp_box *b = luaL_checkudata(L, idx, DDP_MT);
    if (!b->d) luaL_argerror(L, idx, "DDP was already closed");
    return b;
}

/* core.ddp(model, communicator [, bucket_size]) */
static int l_ddp_new(lua_State *L) {
    lt_gpt *m = lt_lua_check_gpt(L, 1);
    lt_comm *c = lt_lua_check_comm(L, 2);
    lua_Integer bucket = luaL_optinteger(L, 3, 0);
    ddp_box *b = lua_newuserdatauv(L, sizeof *b, 2);
    b->d = NULL;
    b->m = m;
    luaL_setmetatable(L, DDP_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, -2, 2);
    b->d = lt_ddp_new(lt_gpt_grads(m), bucket, c);
    if (!b->d) return luaL_error(L, "out of memory for DDP buckets");
    return 1;
}

/* ddp:begin(): the next backward starts reducing buckets as their gradients become final. */
static int m_begin(lua_State *L) {
    ddp_box *b = check_ddp(L, 1);
    lt_ddp_begin(b->d);
    lt_gpt_set_grad_ready_hook(b->m, lt_ddp_grads_ready, b->d);
    return 0;
}

/* ddp:finish() → seconds spent waiting for the reductions (not hidden behind backward). */
static int m_finish(lua_State *L) {
    ddp_box *b = check_ddp(L, 1);
    lt_gpt_set_grad_ready_hook(b->m, NULL, NULL);
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
    if (b->d) {
        lt_gpt_set_grad_ready_hook(b->m, NULL, NULL);
        lt_ddp_free(b->d);
    }
    b->d = NULL;
    return 0;
}

void lt_lua_open_ddp(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"begin", m_begin}, {"finish", m_finish}, {"num_buckets", m_num_buckets}, {"close", m_free}, {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {NULL, NULL}};
    lt_lua_new_type(L, DDP_MT, methods, meta);
    lua_pushcfunction(L, l_ddp_new);
    lua_setfield(L, -2, "ddp");
}

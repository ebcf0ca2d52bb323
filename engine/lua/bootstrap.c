/* core.bootstrap(): who this rank is, before any communicator exists (engine/comm/bootstrap.h).
 *   local core = require "luatron.core"
 *   local b = core.bootstrap()  --> {rank=, world_size=, local_rank=, local_size=, job_id=,
 *                                    launcher="local"|"pmix"|"none", timeout_s=}
 * The first call bootstraps (under PMIx it is a collective: every rank must call it, or create
 * the world communicator, which does); later calls return the same values. */
#include "engine/lua/bindings.h"

#include "engine/comm/bootstrap.h"

static int l_bootstrap(lua_State *L) {
    lt_comm_world_info info;
    char err[512] = "";
    if (lt_bootstrap(&info, err, sizeof err) != 0) return luaL_error(L, "bootstrap: %s", err);
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, info.rank);
    lua_setfield(L, -2, "rank");
    lua_pushinteger(L, info.world_size);
    lua_setfield(L, -2, "world_size");
    lua_pushinteger(L, info.local_rank);
    lua_setfield(L, -2, "local_rank");
    lua_pushinteger(L, info.local_size);
    lua_setfield(L, -2, "local_size");
    lua_pushstring(L, info.job_id);
    lua_setfield(L, -2, "job_id");
    lua_pushstring(L, lt_bootstrap_launcher());
    lua_setfield(L, -2, "launcher");
    lua_pushnumber(L, info.timeout_s);
    lua_setfield(L, -2, "timeout_s");
    return 1;
}

void lt_lua_open_bootstrap(lua_State *L) {
    lua_pushcfunction(L, l_bootstrap);
    lua_setfield(L, -2, "bootstrap");
}

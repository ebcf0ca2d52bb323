/* require "luatron.core": the C side of the engine as one Lua module, plus the searcher that
 * finds the embedded Lua library. */
#include <stdlib.h>
#include <string.h>

#include "engine/lua/bindings.h"
#include "engine/lua/embedded.h"

int luaopen_luatron_core(lua_State *L) {
    lua_newtable(L);
    lt_lua_open_tensor(L);
    lt_lua_open_model(L);
    lt_lua_open_optim(L);
    lt_lua_open_data(L);
    lt_lua_open_checkpoint(L);
    lt_lua_open_system(L);
    return 1;
}

/* package.searchers entry: embedded luatron.* modules. LUATRON_LUA_DIR (a checkout's lua/ folder)
 * takes precedence, so the library can be edited without rebuilding. */
static int search_embedded(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    for (const lt_embedded_module *m = lt_embedded_modules; m->module; m++) {
        if (strcmp(m->module, name) != 0) continue;
        if (luaL_loadbuffer(L, m->source, m->length, m->chunkname) != LUA_OK) return lua_error(L);
        lua_pushstring(L, m->chunkname + 1);
        return 2;
    }
    lua_pushfstring(L, "no embedded module '%s'", name);
    return 1;
}

void lt_lua_install(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_luatron_core);
    lua_setfield(L, -2, "luatron.core");
    lua_pop(L, 1);

    lua_getglobal(L, "package");
    const char *dir = getenv("LUATRON_LUA_DIR");
    if (dir && *dir) {
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
        lua_getfield(L, -2, "path");
        lua_concat(L, 2);
        lua_setfield(L, -2, "path");
    }
    /* After preload (1) and before the path searcher (2, 3 with the dir above taking precedence). */
    lua_getfield(L, -1, "searchers");
    int n = (int)luaL_len(L, -1);
    int at = dir && *dir ? 3 : 2;
    for (int i = n; i >= at; i--) {
        lua_geti(L, -1, i);
        lua_seti(L, -2, i + 1);
    }
    lua_pushcfunction(L, search_embedded);
    lua_seti(L, -2, at);
    lua_pop(L, 2);
}

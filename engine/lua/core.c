/* require "luatron.core": the C side of the engine as one Lua module, plus the searcher that
 * finds the embedded Lua library. */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "engine/lua/bindings.h"
#include "engine/lua/embedded.h"

/* Loaded as a C module by a stock lua5.4, this library is dlclose'd when the Lua state closes,
 * which unmaps it and (with it) libgomp and OpenBLAS while their worker threads still run:
 * the process then crashes at exit (SIGSEGV after the script finished, so busted fails).
 * Marking the library RTLD_NODELETE keeps it and its dependencies mapped until the process ends.
 * In the luatron binary this finds the executable itself, where it is a harmless no-op. */
static void pin_library(void) {
    Dl_info info;
    if (dladdr((void *)luaopen_luatron_core, &info) && info.dli_fname && *info.dli_fname)
        (void)dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE); /* deliberately never closed */
}

int luaopen_luatron_core(lua_State *L) {
    pin_library();
    lua_newtable(L);
    lt_lua_open_tensor(L);
    lt_lua_open_model(L);
    lt_lua_open_optim(L);
    lt_lua_open_data(L);
    lt_lua_open_checkpoint(L);
    lt_lua_open_system(L);
    lt_lua_open_parallel(L);
    lt_lua_open_bootstrap(L);
    lt_lua_open_comm(L);
    lt_lua_open_ddp(L);
    lt_lua_open_tp(L);
    lt_lua_open_moe(L);
    lt_lua_open_tokenizer(L);
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

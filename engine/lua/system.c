/* Clocks, memory figures and terminal facts for the training loop's progress output. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "engine/core/alloc.h"
#include "engine/lua/bindings.h"

/* core.clock() → monotonic seconds. */
static int l_clock(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec);
    return 1;
}

/* core.memory() → {in_use=, peak=, cached=, rss_peak=} in bytes. */
static int l_memory(lua_State *L) {
    lt_alloc_stats s = lt_alloc_get_stats();
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)s.in_use);
    lua_setfield(L, -2, "in_use");
    lua_pushinteger(L, (lua_Integer)s.peak_in_use);
    lua_setfield(L, -2, "peak");
    lua_pushinteger(L, (lua_Integer)s.cached);
    lua_setfield(L, -2, "cached");
    lua_pushinteger(L, (lua_Integer)ru.ru_maxrss * 1024);
    lua_setfield(L, -2, "rss_peak");
    return 1;
}

static int l_reset_peak_memory(lua_State *L) {
    (void)L;
    lt_alloc_reset_peak();
    return 0;
}

/* core.isatty(fd) → boolean: progress bars only on terminals. */
static int l_isatty(lua_State *L) {
    lua_pushboolean(L, isatty((int)luaL_optinteger(L, 1, 1)));
    return 1;
}

void lt_lua_open_system(lua_State *L) {
    static const luaL_Reg funcs[] = {{"clock", l_clock}, {"memory", l_memory}, {"reset_peak_memory", l_reset_peak_memory},
                                     {"isatty", l_isatty}, {NULL, NULL}};
    luaL_setfuncs(L, funcs, 0);
}

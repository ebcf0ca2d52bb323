/* Clocks, memory figures and terminal facts for the training loop's progress output, and the
 * signal a run checks between steps (TrainingConfig.exit_signal_handler). */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "engine/lua/bindings.h"
#include "engine/ops/backend.h"

/* core.clock() → monotonic seconds. */
static int l_clock(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec);
    return 1;
}

/* core.wall_time() → seconds since the epoch (fractional): what logs stamp records with. */
static int l_wall_time(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec);
    return 1;
}

/* core.pid() → this process's id. */
static int l_pid(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

/* The backend named by the optional device argument at idx ("cpu" by default); raises its error. */
static const lt_backend *opt_backend(lua_State *L, int idx) {
    char err[512];
    const lt_backend *be = lt_backend_get(luaL_optstring(L, idx, "cpu"), err, sizeof err);
    if (!be) luaL_error(L, "%s", err);
    return be;
}

/* core.memory([device]) → {in_use=, peak=, cached=, rss_peak=} in bytes: the caching allocator of
 * the device ("cpu" by default; "cuda" once a model lives there), and the process's peak RSS. */
static int l_memory(lua_State *L) {
    const lt_backend *be = opt_backend(L, 1);
    size_t in_use, peak, cached;
    be->memory_stats(&in_use, &peak, &cached);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)in_use);
    lua_setfield(L, -2, "in_use");
    lua_pushinteger(L, (lua_Integer)peak);
    lua_setfield(L, -2, "peak");
    lua_pushinteger(L, (lua_Integer)cached);
    lua_setfield(L, -2, "cached");
    lua_pushinteger(L, (lua_Integer)ru.ru_maxrss * 1024);
    lua_setfield(L, -2, "rss_peak");
    return 1;
}

static int l_reset_peak_memory(lua_State *L) {
    const lt_backend *be = opt_backend(L, 1);
    be->reset_peak();
    return 0;
}

/* core.synchronize([device]): waits for the device's queued work; raises the first error since the
 * last call (a failed kernel, by name) so a run stops at the step that went wrong. */
static int l_synchronize(lua_State *L) {
    const lt_backend *be = opt_backend(L, 1);
    char err[512];
    if (be->synchronize(err, sizeof err) != 0) return luaL_error(L, "%s error: %s", be->name, err);
    return 0;
}

/* core.profile_report([device]) → the device's per-op time table (a string), or nil when the backend
 * has no profiler or profiling is off (LUATRON_CUDA_PROFILE=1 turns it on). core.profile_reset(device)
 * starts the counts afresh (after warm-up steps). */
static int l_profile_report(lua_State *L) {
    const lt_backend *be = opt_backend(L, 1);
    int n = be->profile_report ? be->profile_report(NULL, 0) : 0;
    if (n <= 0) {
        lua_pushnil(L);
        return 1;
    }
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, (size_t)n + 1);
    n = be->profile_report(p, (size_t)n + 1);
    luaL_pushresultsize(&b, (size_t)(n > 0 ? n : 0));
    return 1;
}

static int l_profile_reset(lua_State *L) {
    const lt_backend *be = opt_backend(L, 1);
    if (be->profile_report) be->profile_report(NULL, 1);
    return 0;
}

/* core.isatty(fd) → boolean: progress bars only on terminals. */
static int l_isatty(lua_State *L) {
    lua_pushboolean(L, isatty((int)luaL_optinteger(L, 1, 1)));
    return 1;
}

static volatile sig_atomic_t caught_signal;

static void note_signal(int sig) { caught_signal = sig; }

/* core.catch_signal("SIGTERM"): from now on the signal is noted instead of ending the process. */
static int l_catch_signal(lua_State *L) {
    static const char *const names[] = {"SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", NULL};
    static const int sigs[] = {SIGTERM, SIGINT, SIGUSR1, SIGUSR2};
    int sig = sigs[luaL_checkoption(L, 1, NULL, names)];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = note_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(sig, &sa, NULL) != 0) return luaL_error(L, "cannot catch %s", lua_tostring(L, 1));
    return 0;
}

/* core.signal_received() → whether a caught signal has arrived. */
static int l_signal_received(lua_State *L) {
    lua_pushboolean(L, caught_signal != 0);
    return 1;
}

void lt_lua_open_system(lua_State *L) {
    static const luaL_Reg funcs[] = {{"clock", l_clock}, {"wall_time", l_wall_time}, {"pid", l_pid}, {"memory", l_memory}, {"reset_peak_memory", l_reset_peak_memory},
                                     {"synchronize", l_synchronize}, {"profile_report", l_profile_report},
                                     {"profile_reset", l_profile_reset},
                                     {"isatty", l_isatty}, {"catch_signal", l_catch_signal},
                                     {"signal_received", l_signal_received}, {NULL, NULL}};
    luaL_setfuncs(L, funcs, 0);
}

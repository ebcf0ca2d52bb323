/* core.grid{...}: the rank grid (engine/parallel/grid.h) seen from Lua. Ranks are 0-based, as in
 * Megatron, everywhere (not Lua's 1-based convention): they are process ranks, not indices.
 *
 *   local g = core.grid{world_size = 16, tensor_model_parallel_size = 2, pipeline_model_parallel_size = 2,
 *                       context_parallel_size = 2, expert_model_parallel_size = 1,
 *                       expert_tensor_parallel_size = nil (= tp), virtual_pipeline_model_parallel_size = nil,
 *                       use_tp_pp_dp_mapping = false (true: Megatron's order tp-cp-ep-pp-dp)}
 *   g.world_size, g.tp, g.pp, g.cp, g.dp, g.ep, g.etp, g.edp, g.vpp (nil when none)
 *   g.coords(rank)        --> {rank=, tp_rank=, cp_rank=, dp_rank=, pp_rank=, etp_rank=, ep_rank=, edp_rank=}
 *   g.group(kind, rank)   --> {r1, r2, ...} ascending; {} for an embedding kind on a middle pipeline stage
 *   g.groups(kind)        --> {{...}, {...}, ...} every group of the kind, in Megatron's order
 *   g.kinds               --> {"tp", "cp", "dp", "pp", "dp-cp", "tp-pp", ...}
 * The functions also accept method calls (g:coords(rank)). An unknown key of the argument table is
 * an error naming it: a misspelt size must not silently become 1. */
#include <limits.h>
#include <string.h>

#include "engine/lua/bindings.h"
#include "engine/parallel/grid.h"

/* An integer field of the table at idx, def when nil. */
static int opt_int_field(lua_State *L, int idx, const char *key, int def, int required) {
    int type = lua_getfield(L, idx, key), ok;
    if (type == LUA_TNIL) {
        lua_pop(L, 1);
        if (required)
            luaL_error(L, "grid: %s is required", key);
        return def;
    }
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok)
        luaL_error(L, "grid: %s must be an integer (got %s)", key, luaL_tolstring(L, -1, NULL));
    if (v < INT_MIN || v > INT_MAX)
        luaL_error(L, "grid: %s (%I) is out of range", key, (LUA_INTEGER)v);
    lua_pop(L, 1);
    return (int)v;
}

/* The grid behind a closure (upvalue 1), and the index of its first argument: 2 for a method call. */
static const lt_grid *self(lua_State *L, int *arg) {
    *arg = lua_istable(L, 1) ? 2 : 1;
    return lua_touserdata(L, lua_upvalueindex(1));
}

static int check_rank(lua_State *L, const lt_grid *g, int arg) {
    lua_Integer r = luaL_checkinteger(L, arg);
    if (r < 0 || r >= g->world_size)
        luaL_error(L, "grid: rank %I is out of range for world_size %d (ranks are 0-based: 0..%d)", (LUA_INTEGER)r,
                   g->world_size, g->world_size - 1);
    return (int)r;
}

static lt_group_kind check_kind(lua_State *L, int arg) {
    const char *name = luaL_checkstring(L, arg);
    int k = lt_group_kind_parse(name);
    if (k < 0) {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (int i = 0; i < LT_GROUP_COUNT; i++) {
            if (i)
                luaL_addstring(&b, ", ");
            luaL_addstring(&b, lt_group_kind_name((lt_group_kind)i));
        }
        luaL_pushresult(&b);
        luaL_error(L, "grid: unknown group kind '%s' (one of %s)", name, lua_tostring(L, -1));
    }
    return (lt_group_kind)k;
}

static void push_ranks(lua_State *L, const int *ranks, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, ranks[i]);
        lua_seti(L, -2, i + 1);
    }
}

static int *rank_buffer(lua_State *L, const lt_grid *g) {
    /* A userdata left on the stack, collected by Lua even when a later call raises. */
    return lua_newuserdatauv(L, sizeof(int) * (size_t)g->world_size, 0);
}

static int g_coords(lua_State *L) {
    int arg;
    const lt_grid *g = self(L, &arg);
    lt_rank_coords c;
    lt_grid_coords(g, check_rank(L, g, arg), &c);
    lua_createtable(L, 0, 8);
    const struct {
        const char *name;
        int value;
    } fields[] = {{"rank", c.rank},       {"tp_rank", c.tp_rank},   {"cp_rank", c.cp_rank}, {"dp_rank", c.dp_rank},
                  {"pp_rank", c.pp_rank}, {"etp_rank", c.etp_rank}, {"ep_rank", c.ep_rank}, {"edp_rank", c.edp_rank}};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        lua_pushinteger(L, fields[i].value);
        lua_setfield(L, -2, fields[i].name);
    }
    return 1;
}

static int g_group(lua_State *L) {
    int arg, n;
    const lt_grid *g = self(L, &arg);
    lt_group_kind kind = check_kind(L, arg);
    int rank = check_rank(L, g, arg + 1);
    int *ranks = rank_buffer(L, g);
    lt_grid_group(g, kind, rank, ranks, &n); /* n = 0: the rank is in no group of this kind */
    push_ranks(L, ranks, n);
    return 1;
}

static int g_groups(lua_State *L) {
    int arg, n;
    const lt_grid *g = self(L, &arg);
    lt_group_kind kind = check_kind(L, arg);
    int *ranks = rank_buffer(L, g);
    int num = lt_grid_num_groups(g, kind);
    lua_createtable(L, num, 0);
    for (int i = 0; i < num; i++) {
        lt_grid_group_at(g, kind, i, ranks, &n);
        push_ranks(L, ranks, n);
        lua_seti(L, -2, i + 1);
    }
    return 1;
}

/* The keys core.grid takes; anything else is a mistake worth naming. */
static const char *const GRID_KEYS[] = {"world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                                        "context_parallel_size", "expert_model_parallel_size",
                                        "expert_tensor_parallel_size", "virtual_pipeline_model_parallel_size",
                                        "use_tp_pp_dp_mapping", NULL};

static void check_grid_keys(lua_State *L, int idx) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int known = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (const char *const *k = GRID_KEYS; *k && !known; k++)
                known = strcmp(lua_tostring(L, -1), *k) == 0;
        if (!known) {
            const char *key = luaL_tolstring(L, -1, NULL);
            luaL_Buffer b;
            luaL_buffinit(L, &b);
            for (const char *const *k = GRID_KEYS; *k; k++) {
                if (k != GRID_KEYS)
                    luaL_addstring(&b, ", ");
                luaL_addstring(&b, *k);
            }
            luaL_pushresult(&b);
            luaL_error(L, "grid: unknown key '%s' (the keys are %s)", key, lua_tostring(L, -1));
        }
    }
}

static int l_grid(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    check_grid_keys(L, 1);
    lt_grid_config cfg;
    cfg.world_size = opt_int_field(L, 1, "world_size", 0, 1);
    cfg.tp = opt_int_field(L, 1, "tensor_model_parallel_size", 1, 0);
    cfg.pp = opt_int_field(L, 1, "pipeline_model_parallel_size", 1, 0);
    cfg.cp = opt_int_field(L, 1, "context_parallel_size", 1, 0);
    cfg.ep = opt_int_field(L, 1, "expert_model_parallel_size", 1, 0);
    cfg.etp = opt_int_field(L, 1, "expert_tensor_parallel_size", 0, 0);
    cfg.vpp = opt_int_field(L, 1, "virtual_pipeline_model_parallel_size", 0, 0);
    lua_getfield(L, 1, "use_tp_pp_dp_mapping");
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
        luaL_error(L, "grid: use_tp_pp_dp_mapping must be a boolean (got %s)", luaL_typename(L, -1));
    cfg.pp_before_dp = lua_toboolean(L, -1);
    lua_pop(L, 1);
    /* In C, 0 means "same as tp" / "none"; from Lua that is nil, and an explicit value must be a real size. */
    lua_getfield(L, 1, "expert_tensor_parallel_size");
    if (!lua_isnil(L, -1) && cfg.etp < 1)
        luaL_error(L, "grid: expert_tensor_parallel_size must be >= 1 (got %d; leave it nil for the TP size)", cfg.etp);
    lua_getfield(L, 1, "virtual_pipeline_model_parallel_size");
    if (!lua_isnil(L, -1) && cfg.vpp < 1)
        luaL_error(L, "grid: virtual_pipeline_model_parallel_size must be >= 1 (got %d; leave it nil for none)",
                   cfg.vpp);
    lua_settop(L, 1);

    char err[512];
    lt_grid *g = lua_newuserdatauv(L, sizeof *g, 0);
    int up = lua_gettop(L);
    if (lt_grid_init(g, &cfg, err, sizeof err) != 0)
        luaL_error(L, "grid: %s", err);

    lua_createtable(L, 0, 16);
    const struct {
        const char *name;
        int value;
    } sizes[] = {{"world_size", g->world_size},
                 {"tp", g->tp},
                 {"pp", g->pp},
                 {"cp", g->cp},
                 {"dp", g->dp},
                 {"ep", g->ep},
                 {"etp", g->etp},
                 {"edp", g->edp}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        lua_pushinteger(L, sizes[i].value);
        lua_setfield(L, -2, sizes[i].name);
    }
    if (g->vpp > 0) {
        lua_pushinteger(L, g->vpp);
        lua_setfield(L, -2, "vpp");
    }
    lua_pushstring(L, g->pp_before_dp ? "tp-cp-ep-pp-dp" : "tp-cp-ep-dp-pp");
    lua_setfield(L, -2, "order");
    lua_createtable(L, LT_GROUP_COUNT, 0);
    for (int k = 0; k < LT_GROUP_COUNT; k++) {
        lua_pushstring(L, lt_group_kind_name((lt_group_kind)k));
        lua_seti(L, -2, k + 1);
    }
    lua_setfield(L, -2, "kinds");
    static const luaL_Reg fns[] = {{"coords", g_coords}, {"group", g_group}, {"groups", g_groups}, {NULL, NULL}};
    for (const luaL_Reg *f = fns; f->name; f++) {
        lua_pushvalue(L, up);
        lua_pushcclosure(L, f->func, 1);
        lua_setfield(L, -2, f->name);
    }
    return 1;
}

void lt_lua_open_parallel(lua_State *L) {
    lua_pushcfunction(L, l_grid);
    lua_setfield(L, -2, "grid");
}

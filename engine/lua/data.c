/* luatron.Dataset: GPT training samples (Megatron indexed data or the mock dataset) from Lua. */
#include <string.h>

#include "engine/data/gpt_dataset.h"
#include "engine/lua/bindings.h"

#define DATASET_MT "luatron.Dataset"

typedef struct {
    lt_gpt_dataset *ds;
} dataset_box;

static lt_gpt_dataset *check_dataset(lua_State *L, int idx) {
    dataset_box *b = luaL_checkudata(L, idx, DATASET_MT);
    if (!b->ds) luaL_argerror(L, idx, "dataset was already closed");
    return b->ds;
}

/* The list field `name` of the table at idx as n strings (paths) or numbers (weights), in memory the
 * Lua state owns (a userdata left on the stack); NULL when the field is nil. */
static void *opt_list(lua_State *L, int idx, const char *name, int strings, int *n) {
    if (lua_getfield(L, idx, name) == LUA_TNIL) return NULL;
    luaL_checktype(L, -1, LUA_TTABLE);
    int list = lua_gettop(L);
    *n = (int)luaL_len(L, list);
    if (*n < 1) luaL_error(L, "dataset: %s must be a non-empty list", name);
    size_t each = strings ? sizeof(const char *) : sizeof(double);
    void *out = lua_newuserdatauv(L, each * (size_t)*n, 0);
    for (int i = 0; i < *n; i++) {
        lua_geti(L, list, i + 1);
        if (strings) {
            if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "dataset: %s[%d] must be a string", name, i + 1);
            ((const char **)out)[i] = lua_tostring(L, -1); /* kept alive by the list */
        } else {
            if (!lua_isnumber(L, -1)) luaL_error(L, "dataset: %s[%d] must be a number", name, i + 1);
            ((double *)out)[i] = lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
    }
    return out;
}

/* core.dataset{data_path = "0.3 a 0.7 b" | paths = {"a", "b"} [, weights = {0.3, 0.7}] | nothing (mock),
 * split = "969,30,1", split_index = "train" | "valid" | "test", seq_length =, seed =, num_samples =,
 * vocab_size =, mock = bool}. paths take prefixes as they are (spaces included). */
static int l_dataset_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    lua_getfield(L, 1, "data_path");
    c.data_path = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
    int nw = 0;
    c.paths = opt_list(L, 1, "paths", 1, &c.n_paths);
    c.weights = opt_list(L, 1, "weights", 0, &nw);
    if (c.weights && nw != c.n_paths) luaL_error(L, "dataset: %d weights for %d paths", nw, c.n_paths);
    lua_getfield(L, 1, "split");
    if (!lua_isnil(L, -1)) c.split = luaL_checkstring(L, -1);
    lua_getfield(L, 1, "split_index");
    const char *which = luaL_optstring(L, -1, "train");
    if (strcmp(which, "train") == 0) c.split_index = LT_SPLIT_TRAIN;
    else if (strcmp(which, "valid") == 0) c.split_index = LT_SPLIT_VALID;
    else if (strcmp(which, "test") == 0) c.split_index = LT_SPLIT_TEST;
    else luaL_error(L, "split_index must be train, valid or test (got '%s')", which);
    lua_getfield(L, 1, "seq_length");
    c.seq_length = luaL_checkinteger(L, -1);
    lua_getfield(L, 1, "seed");
    c.seed = (uint64_t)luaL_optinteger(L, -1, 1234);
    lua_getfield(L, 1, "num_samples");
    c.num_samples = luaL_optinteger(L, -1, 0);
    lua_getfield(L, 1, "vocab_size");
    c.vocab_size = luaL_optinteger(L, -1, 0);
    lua_getfield(L, 1, "mock");
    c.mock = lua_toboolean(L, -1) || (c.data_path == NULL && c.n_paths == 0);
    char err[512] = "";
    dataset_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->ds = NULL;
    luaL_setmetatable(L, DATASET_MT);
    b->ds = lt_gpt_dataset_open(&c, err, sizeof err);
    if (!b->ds) luaL_error(L, "dataset: %s", err);
    return 1;
}

static int m_size(lua_State *L) { lua_pushinteger(L, lt_gpt_dataset_size(check_dataset(L, 1))); return 1; }

static int m_sample_length(lua_State *L) {
    lua_pushinteger(L, lt_gpt_dataset_sample_length(check_dataset(L, 1)));
    return 1;
}

static int m_is_mock(lua_State *L) { lua_pushboolean(L, lt_gpt_dataset_is_mock(check_dataset(L, 1))); return 1; }

/* ds:batch(first, count) → int32 [count, sample_length] of samples first .. first+count-1
 * (0-based sample numbers, as Megatron's consumed_samples). Samples past the end wrap around. */
static int m_batch(lua_State *L) {
    lt_gpt_dataset *ds = check_dataset(L, 1);
    lua_Integer first = luaL_checkinteger(L, 2), count = luaL_checkinteger(L, 3);
    luaL_argcheck(L, first >= 0, 2, "sample numbers start at 0");
    luaL_argcheck(L, count > 0, 3, "count must be positive");
    int64_t len = lt_gpt_dataset_sample_length(ds), size = lt_gpt_dataset_size(ds);
    int64_t shape[2] = {count, len};
    lt_tensor *t = lt_tensor_new(LT_I32, 2, shape);
    lt_lua_push_tensor(L, t);
    int32_t *dst = lt_tensor_data(t);
    char err[512] = "";
    for (lua_Integer i = 0; i < count; i++) {
        int64_t idx = (int64_t)((first + i) % size);
        if (lt_gpt_dataset_get(ds, idx, dst + i * len, err, sizeof err) != 0) luaL_error(L, "dataset: %s", err);
    }
    return 1;
}

static int m_free(lua_State *L) {
    dataset_box *b = luaL_checkudata(L, 1, DATASET_MT);
    lt_gpt_dataset_close(b->ds);
    b->ds = NULL;
    return 0;
}

void lt_lua_open_data(lua_State *L) {
    static const luaL_Reg methods[] = {{"size", m_size},   {"sample_length", m_sample_length}, {"is_mock", m_is_mock},
                                       {"batch", m_batch}, {"close", m_free},                 {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {NULL, NULL}};
    lt_lua_new_type(L, DATASET_MT, methods, meta);
    lua_pushcfunction(L, l_dataset_new);
    lua_setfield(L, -2, "dataset");
}

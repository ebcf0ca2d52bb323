/* luatron.Tokenizer: Megatron's tokenizers (engine/data/tokenizer.h) from Lua, for text generation
 * and tools. tok = core.tokenizer{tokenizer_type =, vocab_file =, merge_file =, tokenizer_model =};
 * tok:encode(str) -> {ids}, tok:decode(ids) -> str, tok.vocab_size, tok.eod, tok.type. One call
 * encodes or decodes a whole text in C. */
#include <stdlib.h>
#include <string.h>

#include "engine/data/tokenizer.h"
#include "engine/lua/bindings.h"

#define TOKENIZER_MT "luatron.Tokenizer"

typedef struct {
    lt_tokenizer *t;
} tokenizer_box;

static lt_tokenizer *check_tokenizer(lua_State *L, int idx) {
    tokenizer_box *b = luaL_checkudata(L, idx, TOKENIZER_MT);
    if (!b->t) luaL_argerror(L, idx, "tokenizer was already closed");
    return b->t;
}

static const char *opt_field(lua_State *L, int idx, const char *name) {
    int ty = lua_getfield(L, idx, name);
    if (ty == LUA_TNIL) return NULL;
    if (ty != LUA_TSTRING) luaL_error(L, "tokenizer: %s must be a string (a path), not a %s", name, lua_typename(L, ty));
    return lua_tostring(L, -1); /* stays on the stack: alive until the function returns */
}

static int l_tokenizer_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lt_tokenizer_spec spec = {0};
    spec.type = opt_field(L, 1, "tokenizer_type");
    spec.vocab_file = opt_field(L, 1, "vocab_file");
    spec.merge_file = opt_field(L, 1, "merge_file");
    spec.model = opt_field(L, 1, "tokenizer_model");
    tokenizer_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = NULL;
    luaL_setmetatable(L, TOKENIZER_MT);
    char err[1024] = "";
    b->t = lt_tokenizer_open(&spec, err, sizeof err);
    if (!b->t) luaL_error(L, "tokenizer: %s", err);
    return 1;
}

/* tok:encode(str) -> {id, ...} (a Lua list; ids are 0-based token ids) */
static int m_encode(lua_State *L) {
    lt_tokenizer *t = check_tokenizer(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    lt_token_buf ids = {0};
    char err[512] = "";
    if (lt_tokenizer_encode(t, s, n, &ids, err, sizeof err) != 0) {
        lt_token_buf_free(&ids);
        return luaL_error(L, "tokenizer: %s", err);
    }
    if (ids.n > (size_t)INT32_MAX - 1 || !lua_checkstack(L, 2)) {
        lt_token_buf_free(&ids);
        return luaL_error(L, "tokenizer: text too long");
    }
    lua_createtable(L, (int)ids.n, 0);
    for (size_t i = 0; i < ids.n; i++) {
        lua_pushinteger(L, ids.ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lt_token_buf_free(&ids);
    return 1;
}

/* tok:decode({id, ...}) -> str */
static int m_decode(lua_State *L) {
    lt_tokenizer *t = check_tokenizer(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    int32_t *ids = lua_newuserdatauv(L, sizeof(int32_t) * (size_t)(n > 0 ? n : 1), 0);
    for (lua_Integer i = 0; i < n; i++) {
        lua_geti(L, 2, i + 1);
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < INT32_MIN || v > INT32_MAX)
            return luaL_error(L, "tokenizer: decode: ids[%d] is not an integer token id", (int)(i + 1));
        ids[i] = (int32_t)v;
        lua_pop(L, 1);
    }
    char *out, err[512] = "";
    size_t len;
    if (lt_tokenizer_decode(t, ids, (size_t)n, &out, &len, err, sizeof err) != 0)
        return luaL_error(L, "tokenizer: decode: %s", err);
    lua_pushlstring(L, out, len);
    free(out);
    return 1;
}

static int m_free(lua_State *L) {
    tokenizer_box *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    lt_tokenizer_free(b->t);
    b->t = NULL;
    return 0;
}

/* tok.vocab_size, tok.eod, tok.type, tok.source; anything else from the methods (upvalue 1). */
static int m_index(lua_State *L) {
    tokenizer_box *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    const char *k = lua_tostring(L, 2);
    if (k && b->t) {
        if (strcmp(k, "vocab_size") == 0) { lua_pushinteger(L, b->t->vocab_size); return 1; }
        if (strcmp(k, "eod") == 0) { lua_pushinteger(L, b->t->eod); return 1; }
        if (strcmp(k, "type") == 0) { lua_pushstring(L, b->t->type); return 1; }
        if (strcmp(k, "source") == 0) { lua_pushstring(L, b->t->source); return 1; }
    }
    lua_pushvalue(L, 2);
    lua_gettable(L, lua_upvalueindex(1));
    return 1;
}

void lt_lua_open_tokenizer(lua_State *L) {
    static const luaL_Reg methods[] = {{"encode", m_encode}, {"decode", m_decode}, {"close", m_free}, {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {NULL, NULL}};
    lt_lua_new_type(L, TOKENIZER_MT, methods, meta);
    luaL_getmetatable(L, TOKENIZER_MT);
    lua_getfield(L, -1, "__index"); /* the methods table becomes the upvalue of the __index function */
    lua_pushcclosure(L, m_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_tokenizer_new);
    lua_setfield(L, -2, "tokenizer");
}

/* Checkpoint files from Lua: safetensors save and load of named tensors plus string metadata. */
#include <stdlib.h>
#include <string.h>

#include "engine/io/safetensors.h"
#include "engine/lua/bindings.h"
#include "engine/ops/backend.h"

static int st_dtype_of(lt_dtype d, lt_st_dtype *out) {
    switch (d) {
    case LT_F32: *out = LT_ST_F32; return 1;
    case LT_BF16: *out = LT_ST_BF16; return 1;
    case LT_I32: *out = LT_ST_I32; return 1;
    case LT_I64: *out = LT_ST_I64; return 1;
    }
    return 0;
}

static int dtype_of_st(lt_st_dtype d, lt_dtype *out) {
    switch (d) {
    case LT_ST_F32: *out = LT_F32; return 1;
    case LT_ST_BF16: *out = LT_BF16; return 1;
    case LT_ST_I32: *out = LT_I32; return 1;
    case LT_ST_I64: *out = LT_I64; return 1;
    default: return 0;
    }
}

/* core.save_tensors(path, {name = tensor, ...} [, {key = "value", ...}]): written to a temporary
 * name and renamed into place. Raises with the file and the reason on failure. */
static int l_save_tensors(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lt_st_writer *w = lt_st_writer_new();
    if (!w) return luaL_error(L, "out of memory");
    char err[512] = "";
    int ok = 1;
    /* GPU tensors are written from host copies, which must live until the write. */
    lt_tensor **host_copies = NULL;
    int num_copies = 0;
    lua_pushnil(L);
    while (ok && lua_next(L, 2)) {
        if (lua_type(L, -2) != LUA_TSTRING) { ok = 0; snprintf(err, sizeof err, "tensor names must be strings"); break; }
        const char *name = lua_tostring(L, -2);
        lt_tensor *t = luaL_testudata(L, -1, LT_TENSOR_MT) ? lt_lua_check_tensor(L, -1) : NULL;
        lt_st_dtype dt;
        if (!t || !lt_tensor_is_contiguous(t) || !st_dtype_of(t->dtype, &dt)) {
            ok = 0;
            snprintf(err, sizeof err, "'%s' is not a contiguous tensor", name);
            break;
        }
        if (t->storage->device != LT_CPU) {
            lt_tensor *h = lt_backend_to_host(t);
            lt_tensor **grown = realloc(host_copies, sizeof *host_copies * (size_t)(num_copies + 1));
            if (grown) host_copies = grown;
            if (!h || !grown) {
                lt_tensor_free(h);
                ok = 0;
                snprintf(err, sizeof err, "out of memory copying '%s' to the host", name);
                break;
            }
            host_copies[num_copies++] = h;
            t = h;
        }
        if (lt_st_writer_add(w, name, dt, t->ndim, t->shape, lt_tensor_data(t), err, sizeof err) != 0) ok = 0;
        lua_pop(L, 1);
    }
    if (ok && lua_istable(L, 3)) {
        lua_pushnil(L);
        while (ok && lua_next(L, 3)) {
            const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
            if (!k || !v) { ok = 0; snprintf(err, sizeof err, "metadata keys and values must be strings"); }
            else if (lt_st_writer_meta(w, k, v, err, sizeof err) != 0) ok = 0;
            lua_pop(L, 1);
        }
    }
    if (ok && lt_st_writer_write(w, path, err, sizeof err) != 0) ok = 0;
    lt_st_writer_free(w);
    for (int i = 0; i < num_copies; i++) lt_tensor_free(host_copies[i]);
    free(host_copies);
    if (!ok) return luaL_error(L, "cannot save %s: %s", path, err);
    return 0;
}

/* core.load_tensors(path [, allow_unchecked]) → {name = tensor (a copy)}, {key = value}. Every byte
 * is validated (structure and checksum) before anything is returned; on failure it returns nil,
 * message. Files without luatron's checksum (from other writers) load only with allow_unchecked. */
static int l_load_tensors(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    char err[512] = "";
    unsigned flags = lua_toboolean(L, 2) ? 0 : LT_ST_REQUIRE_CHECKSUM;
    lt_st_file *f = lt_st_open_ex(path, flags, err, sizeof err);
    if (!f) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_newtable(L);
    for (size_t i = 0; i < lt_st_count(f); i++) {
        const lt_st_tensor *s = lt_st_tensor_at(f, i);
        lt_dtype dt;
        if (!dtype_of_st(s->dtype, &dt)) {
            lt_st_close(f);
            lua_pushnil(L);
            lua_pushfstring(L, "%s: tensor '%s' has dtype %s, which luatron does not load", path, s->name,
                            lt_st_dtype_name(s->dtype));
            return 2;
        }
        lt_tensor *t = lt_tensor_new(dt, s->ndim, s->shape);
        if (!t) {
            lt_st_close(f);
            return luaL_error(L, "out of memory loading %s", path);
        }
        memcpy(lt_tensor_data(t), s->data, s->nbytes);
        lt_lua_push_tensor(L, t);
        lua_setfield(L, -2, s->name);
    }
    lua_newtable(L);
    for (size_t i = 0; i < lt_st_meta_count(f); i++) {
        const char *k, *v;
        lt_st_meta_at(f, i, &k, &v);
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
    lt_st_close(f);
    return 2;
}

void lt_lua_open_checkpoint(lua_State *L) {
    static const luaL_Reg funcs[] = {{"save_tensors", l_save_tensors}, {"load_tensors", l_load_tensors}, {NULL, NULL}};
    luaL_setfuncs(L, funcs, 0);
}

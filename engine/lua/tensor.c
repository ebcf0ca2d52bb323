/* luatron.Tensor: tensors seen from Lua. Indices and dims are 1-based, as Lua's. */
#include <math.h>
#include <string.h>

#include "engine/lua/bindings.h"
#include "engine/ops/backend.h"
#include "engine/ops/ops.h"

typedef struct {
    lt_tensor *t;
} tensor_box;

void lt_lua_push_tensor(lua_State *L, lt_tensor *t) {
    if (!t) luaL_error(L, "out of memory (or invalid shape) creating a tensor");
    tensor_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = t;
    luaL_setmetatable(L, LT_TENSOR_MT);
}

static tensor_box *check_box(lua_State *L, int idx) { return luaL_checkudata(L, idx, LT_TENSOR_MT); }

lt_tensor *lt_lua_check_tensor(lua_State *L, int idx) {
    tensor_box *b = check_box(L, idx);
    if (!b->t) luaL_argerror(L, idx, "tensor was already closed");
    return b->t;
}

lt_tensor *lt_lua_check_host_tensor(lua_State *L, int idx) {
    lt_tensor *t = lt_lua_check_tensor(L, idx);
    if (t->storage->device != LT_CPU)
        luaL_argerror(L, idx, "the tensor lives in GPU memory: take a host copy with t:to_host()");
    return t;
}

int lt_lua_check_shape(lua_State *L, int idx, int64_t *shape) {
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)luaL_len(L, idx);
    if (n > LT_MAX_DIMS) luaL_argerror(L, idx, "too many dimensions (at most 8)");
    for (int i = 0; i < n; i++) {
        lua_geti(L, idx, i + 1);
        int ok;
        lua_Integer d = lua_tointegerx(L, -1, &ok);
        if (!ok || d < 0) luaL_error(L, "shape[%d] must be a non-negative integer", i + 1);
        shape[i] = d;
        lua_pop(L, 1);
    }
    return n;
}

void lt_lua_new_type(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *metamethods) {
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, metamethods, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

static lt_dtype opt_dtype(lua_State *L, int idx) {
    const char *name = luaL_optstring(L, idx, "float32");
    int d = lt_dtype_parse(name);
    if (d < 0) luaL_argerror(L, idx, lua_pushfstring(L, "unknown dtype '%s' (float32, bfloat16, int32, int64)", name));
    return (lt_dtype)d;
}

/* tensor.zeros({2, 3} [, dtype [, device]]): in host memory, or in the memory of device ("cuda"),
 * e.g. a pipeline stage's receive buffer. */
static int t_zeros(lua_State *L) {
    int64_t shape[LT_MAX_DIMS];
    int nd = lt_lua_check_shape(L, 1, shape);
    lt_dtype dtype = opt_dtype(L, 2);
    const char *device = luaL_optstring(L, 3, "cpu");
    if (strcmp(device, "cpu") == 0) {
        lt_lua_push_tensor(L, lt_tensor_new(dtype, nd, shape));
        return 1;
    }
    char err[256];
    const lt_backend *be = lt_backend_get(device, err, sizeof err);
    if (!be) luaL_error(L, "tensor.zeros: %s", err);
    size_t nbytes = lt_dtype_size(dtype);
    for (int i = 0; i < nd; i++) nbytes *= (size_t)shape[i];
    void *data = be->alloc(nbytes ? nbytes : 1);
    if (!data) luaL_error(L, "tensor.zeros: out of %s memory (%zu bytes)", device, nbytes);
    be->memzero(data, nbytes);
    lt_tensor *t = lt_tensor_wrap(dtype, nd, shape, data, nbytes ? nbytes : 1, be->device, be->release);
    if (!t) {
        be->release(data, nbytes ? nbytes : 1);
        luaL_error(L, "tensor.zeros: invalid shape");
    }
    lt_lua_push_tensor(L, t);
    return 1;
}

/* Walks a nested table to find its shape. */
static int table_shape(lua_State *L, int idx, int64_t *shape) {
    int nd = 0;
    lua_pushvalue(L, idx);
    while (lua_type(L, -1) == LUA_TTABLE) {
        if (nd == LT_MAX_DIMS) luaL_error(L, "tensor.from: too many dimensions");
        shape[nd++] = (int64_t)luaL_len(L, -1);
        lua_geti(L, -1, 1);
        lua_remove(L, -2);
    }
    lua_pop(L, 1);
    return nd;
}

static void fill_from_table(lua_State *L, int idx, lt_tensor *t, int dim, int64_t *pos) {
    int64_t n = (int64_t)luaL_len(L, idx);
    if (n != t->shape[dim]) luaL_error(L, "tensor.from: ragged table (dimension %d has %d and %d entries)", dim + 1,
                                       (int)t->shape[dim], (int)n);
    for (int64_t i = 1; i <= n; i++) {
        lua_geti(L, idx, i);
        if (dim + 1 < t->ndim) {
            if (!lua_istable(L, -1)) luaL_error(L, "tensor.from: ragged table (expected a table at depth %d)", dim + 2);
            fill_from_table(L, lua_gettop(L), t, dim + 1, pos);
        } else {
            int ok;
            lua_Number v = lua_tonumberx(L, -1, &ok);
            if (!ok) luaL_error(L, "tensor.from: element %d is not a number", (int)(*pos + 1));
            lt_tensor_set_flat(t, (*pos)++, v);
        }
        lua_pop(L, 1);
    }
}

/* tensor.from({{1, 2}, {3, 4}} [, dtype]) */
static int t_from(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int64_t shape[LT_MAX_DIMS];
    int nd = table_shape(L, 1, shape);
    lt_tensor *t = lt_tensor_new(opt_dtype(L, 2), nd, shape);
    lt_lua_push_tensor(L, t);
    int64_t pos = 0;
    if (lt_tensor_numel(t) > 0) fill_from_table(L, 1, t, 0, &pos);
    return 1;
}

static int m_shape(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_createtable(L, t->ndim, 0);
    for (int d = 0; d < t->ndim; d++) {
        lua_pushinteger(L, t->shape[d]);
        lua_rawseti(L, -2, d + 1);
    }
    return 1;
}

static int m_size(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_Integer d = luaL_checkinteger(L, 2);
    luaL_argcheck(L, d >= 1 && d <= t->ndim, 2, "dimension out of range");
    lua_pushinteger(L, t->shape[d - 1]);
    return 1;
}

static int m_dim(lua_State *L) { lua_pushinteger(L, lt_lua_check_tensor(L, 1)->ndim); return 1; }
static int m_numel(lua_State *L) { lua_pushinteger(L, lt_tensor_numel(lt_lua_check_tensor(L, 1))); return 1; }
static int m_dtype(lua_State *L) { lua_pushstring(L, lt_dtype_name(lt_lua_check_tensor(L, 1)->dtype)); return 1; }

static void push_element(lua_State *L, const lt_tensor *t, int64_t i) {
    double v = lt_tensor_get_flat(t, i);
    if (t->dtype == LT_I32 || t->dtype == LT_I64) lua_pushinteger(L, (lua_Integer)v);
    else lua_pushnumber(L, v);
}

static void to_table(lua_State *L, const lt_tensor *t, int dim, int64_t *pos) {
    lua_createtable(L, (int)t->shape[dim], 0);
    for (int64_t i = 0; i < t->shape[dim]; i++) {
        if (dim + 1 < t->ndim) to_table(L, t, dim + 1, pos);
        else push_element(L, t, (*pos)++);
        lua_rawseti(L, -2, i + 1);
    }
}

/* t:to_table() → nested Lua tables (a number for a 0-dim tensor). */
static int m_to_table(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    if (t->ndim == 0) { push_element(L, t, 0); return 1; }
    int64_t pos = 0;
    to_table(L, t, 0, &pos);
    return 1;
}

/* Flat position from 1-based indices at stack positions first..first+ndim-1. */
static int64_t check_index(lua_State *L, const lt_tensor *t, int first) {
    int64_t flat = 0;
    int given = lua_gettop(L) - first + 1;
    if (given < t->ndim) luaL_error(L, "expected %d indices, got %d", t->ndim, given);
    for (int d = 0; d < t->ndim; d++) {
        lua_Integer i = luaL_checkinteger(L, first + d);
        if (i < 1 || i > t->shape[d])
            luaL_error(L, "index %d out of range for dimension %d of size %d", (int)i, d + 1, (int)t->shape[d]);
        flat = flat * t->shape[d] + (i - 1);
    }
    return flat;
}

/* t:get(i, j, ...) with 1-based indices; t:item() for a one-element tensor. */
static int m_get(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    push_element(L, t, check_index(L, t, 2));
    return 1;
}

static int m_set(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    lua_Number v = luaL_checknumber(L, lua_gettop(L));
    lua_pop(L, 1);
    lt_tensor_set_flat(t, check_index(L, t, 2), v);
    return 0;
}

static int m_item(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    if (lt_tensor_numel(t) != 1) luaL_error(L, "item() needs a tensor of one element, this one has %d",
                                            (int)lt_tensor_numel(t));
    push_element(L, t, 0);
    return 1;
}

static int m_fill(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    lua_Number v = luaL_checknumber(L, 2);
    int64_t n = lt_tensor_numel(t);
    for (int64_t i = 0; i < n; i++) lt_tensor_set_flat(t, i, v);
    lua_settop(L, 1);
    return 1;
}

/* dst:copy(src): same element count, any dtypes. */
static int m_copy(lua_State *L) {
    lt_tensor *dst = lt_lua_check_tensor(L, 1), *src = lt_lua_check_tensor(L, 2);
    int64_t n = lt_tensor_numel(dst);
    if (n != lt_tensor_numel(src)) luaL_error(L, "copy: %d elements into %d", (int)lt_tensor_numel(src), (int)n);
    int same_layout = dst->dtype == src->dtype && lt_tensor_is_contiguous(dst) && lt_tensor_is_contiguous(src);
    if (dst->storage->device != LT_CPU || src->storage->device != LT_CPU) {
        /* Between host and GPU (or within a GPU): a plain transfer, so layouts must match. */
        if (!same_layout) luaL_error(L, "copy to or from GPU memory needs contiguous tensors of one dtype");
        size_t nbytes = (size_t)n * lt_dtype_size(dst->dtype);
        if (src->storage->device == LT_CPU) lt_backend_of(dst)->to_device(lt_tensor_data(dst), lt_tensor_data(src), nbytes);
        else if (dst->storage->device == LT_CPU) lt_backend_of(src)->to_host(lt_tensor_data(dst), lt_tensor_data(src), nbytes);
        else lt_backend_of(dst)->copy(lt_tensor_data(dst), lt_tensor_data(src), nbytes);
    } else if (same_layout)
        memmove(lt_tensor_data(dst), lt_tensor_data(src), (size_t)n * lt_dtype_size(dst->dtype));
    else if (dst->dtype == src->dtype && lt_tensor_is_contiguous(dst) && dst->storage != src->storage)
        lt_tensor_gather(dst, src); /* (views of one storage may overlap: element by element below) */
    else
        for (int64_t i = 0; i < n; i++) lt_tensor_set_flat(dst, i, lt_tensor_get_flat(src, i));
    lua_settop(L, 1);
    return 1;
}

static int m_clone(lua_State *L) { lt_lua_push_tensor(L, lt_tensor_clone(lt_lua_check_host_tensor(L, 1))); return 1; }

/* t:device() → "cpu" or "cuda". */
static int m_device(lua_State *L) {
    lua_pushstring(L, lt_lua_check_tensor(L, 1)->storage->device == LT_CPU ? "cpu" : "cuda");
    return 1;
}

/* t:to_host() → a contiguous host copy (of a contiguous tensor on any device). */
static int m_to_host(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    if (t->storage->device != LT_CPU && !lt_tensor_is_contiguous(t))
        luaL_argerror(L, 1, "to_host needs a contiguous tensor");
    lt_lua_push_tensor(L, lt_backend_to_host(t));
    return 1;
}

static int m_reshape(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    int64_t shape[LT_MAX_DIMS];
    int nd = lt_lua_check_shape(L, 2, shape);
    lt_tensor *v = lt_tensor_reshape(t, nd, shape);
    if (!v) luaL_error(L, "reshape: needs a contiguous tensor and the same number of elements (%d)",
                       (int)lt_tensor_numel(t));
    lt_lua_push_tensor(L, v);
    return 1;
}

/* t:narrow(dim, start, length), 1-based dim and start: a view. */
static int m_narrow(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_Integer dim = luaL_checkinteger(L, 2), start = luaL_checkinteger(L, 3), len = luaL_checkinteger(L, 4);
    lt_tensor *v = lt_tensor_narrow(t, (int)dim - 1, start - 1, len);
    if (!v) luaL_error(L, "narrow(%d, %d, %d) is out of range for this tensor", (int)dim, (int)start, (int)len);
    lt_lua_push_tensor(L, v);
    return 1;
}

/* t:transpose(dim1, dim2), 1-based dims: a view with the two dimensions swapped (not contiguous; copy it
 * into a contiguous tensor, e.g. a Conv1D weight [in, out] into a linear weight [out, in]). */
static int m_transpose(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_Integer a = luaL_checkinteger(L, 2), b = luaL_checkinteger(L, 3);
    if (a < 1 || a > t->ndim) luaL_argerror(L, 2, "dimension out of range");
    if (b < 1 || b > t->ndim) luaL_argerror(L, 3, "dimension out of range");
    int64_t shape[LT_MAX_DIMS], stride[LT_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i], stride[i] = t->stride[i];
    shape[a - 1] = t->shape[b - 1], stride[a - 1] = t->stride[b - 1];
    shape[b - 1] = t->shape[a - 1], stride[b - 1] = t->stride[a - 1];
    lt_tensor *v = lt_tensor_view(t, t->ndim, shape, stride, t->offset);
    if (!v) luaL_error(L, "transpose: out of memory");
    lt_lua_push_tensor(L, v);
    return 1;
}

static int m_sum(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1);
    double s = 0;
    int64_t n = lt_tensor_numel(t);
    for (int64_t i = 0; i < n; i++) s += lt_tensor_get_flat(t, i);
    lua_pushnumber(L, s);
    return 1;
}

static const float *check_f32(lua_State *L, int idx, lt_tensor *t) {
    if (t->dtype != LT_F32 || !lt_tensor_is_contiguous(t))
        luaL_argerror(L, idx, "needs a contiguous float32 tensor");
    return lt_tensor_data(t);
}

/* t:norm() and in-place t:scale(s) run where t lives (the backend's kernels), so gradient
 * clipping works on GPU tensors too. */
static int m_norm(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_pushnumber(L, sqrt(lt_backend_of(t)->sum_squares(check_f32(L, 1, t), lt_tensor_numel(t))));
    return 1;
}

/* In-place t:scale(s) and t:add(other [, alpha]). */
static int m_scale(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lt_backend_of(t)->scale((float *)check_f32(L, 1, t), lt_tensor_numel(t), (float)luaL_checknumber(L, 2));
    lua_settop(L, 1);
    return 1;
}

static int m_add(lua_State *L) {
    lt_tensor *t = lt_lua_check_host_tensor(L, 1), *o = lt_lua_check_host_tensor(L, 2);
    float alpha = (float)luaL_optnumber(L, 3, 1.0);
    float *a = (float *)check_f32(L, 1, t);
    const float *b = check_f32(L, 2, o);
    int64_t n = lt_tensor_numel(t);
    if (n != lt_tensor_numel(o)) luaL_error(L, "add: %d elements and %d", (int)n, (int)lt_tensor_numel(o));
    for (int64_t i = 0; i < n; i++) a[i] += alpha * b[i];
    lua_settop(L, 1);
    return 1;
}

/* tensor.matmul(a, b) for 2-d float32 tensors → new tensor. */
static int t_matmul(lua_State *L) {
    lt_tensor *a = lt_lua_check_host_tensor(L, 1), *b = lt_lua_check_host_tensor(L, 2);
    check_f32(L, 1, a);
    check_f32(L, 2, b);
    if (a->ndim != 2 || b->ndim != 2 || a->shape[1] != b->shape[0])
        luaL_error(L, "matmul: shapes do not fit ([%d, %d] x [%d, %d])", (int)a->shape[0], (int)a->shape[1],
                   (int)b->shape[0], (int)b->shape[1]);
    int64_t shape[2] = {a->shape[0], b->shape[1]};
    lt_tensor *c = lt_tensor_new(LT_F32, 2, shape);
    lt_lua_push_tensor(L, c);
    lt_matmul(lt_tensor_data(c), lt_tensor_data(a), lt_tensor_data(b), (int)shape[0], (int)shape[1],
              (int)a->shape[1], 0, 0, 1.0f, 0.0f);
    return 1;
}

static int m_tostring(lua_State *L) {
    tensor_box *b = check_box(L, 1);
    if (!b->t) { lua_pushliteral(L, "Tensor(closed)"); return 1; }
    lt_tensor *t = b->t;
    luaL_Buffer buf;
    luaL_buffinit(L, &buf);
    lua_pushfstring(L, "Tensor(%s, [", lt_dtype_name(t->dtype));
    luaL_addvalue(&buf);
    for (int d = 0; d < t->ndim; d++) {
        lua_pushfstring(L, d ? ", %d" : "%d", (int)t->shape[d]);
        luaL_addvalue(&buf);
    }
    luaL_addstring(&buf, "]");
    int64_t n = lt_tensor_numel(t), show = n < 8 ? n : 8;
    if (t->storage->device != LT_CPU) {
        luaL_addstring(&buf, ", cuda");
        n = 0; /* the values stay on the GPU */
    }
    if (n > 0) {
        luaL_addstring(&buf, ": ");
        for (int64_t i = 0; i < show; i++) {
            char num[32];
            snprintf(num, sizeof num, i ? " %.6g" : "%.6g", lt_tensor_get_flat(t, i));
            luaL_addstring(&buf, num);
        }
        if (show < n) luaL_addstring(&buf, " ...");
    }
    luaL_addstring(&buf, ")");
    luaL_pushresult(&buf);
    return 1;
}

static int m_len(lua_State *L) {
    lt_tensor *t = lt_lua_check_tensor(L, 1);
    lua_pushinteger(L, t->ndim ? t->shape[0] : 1);
    return 1;
}

static int m_free(lua_State *L) {
    tensor_box *b = check_box(L, 1);
    lt_tensor_free(b->t);
    b->t = NULL;
    return 0;
}

void lt_lua_open_tensor(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"shape", m_shape}, {"size", m_size},   {"dim", m_dim},         {"numel", m_numel}, {"dtype", m_dtype},
        {"to_table", m_to_table}, {"get", m_get}, {"set", m_set},       {"item", m_item},   {"fill", m_fill},
        {"copy", m_copy},   {"clone", m_clone}, {"reshape", m_reshape}, {"narrow", m_narrow}, {"sum", m_sum},
        {"norm", m_norm},   {"scale", m_scale}, {"add", m_add},         {"free", m_free},
        {"device", m_device}, {"to_host", m_to_host},   {"transpose", m_transpose}, {NULL, NULL}};
    static const luaL_Reg meta[] = {
        {"__gc", m_free}, {"__close", m_free}, {"__tostring", m_tostring}, {"__len", m_len}, {NULL, NULL}};
    lt_lua_new_type(L, LT_TENSOR_MT, methods, meta);
    static const luaL_Reg funcs[] = {{"zeros", t_zeros}, {"from", t_from}, {"matmul", t_matmul}, {NULL, NULL}};
    luaL_newlib(L, funcs);
    lua_setfield(L, -2, "tensor");
}

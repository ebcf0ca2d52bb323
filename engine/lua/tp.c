/* core.tp_region(comm, {batch =, seq =, sequence_parallel =}): the tensor-parallel mappings of
 * engine/parallel/tp.h for Lua tensors, to compose tensor-parallel code of one's own around the
 * column- and row-parallel GEMMs (lt.tensor.matmul) and to look at what the model's layers do.
 *
 *   local r = core.tp_region(tp_comm, { batch = 2, seq = 8, sequence_parallel = true })
 *   r:outer_rows()          --> rows a rank holds outside the region (batch x seq, / TP under SP)
 *   r:enter(x)              --> [batch x seq, C]: x [outer rows, C] itself (a copy), or all-gathered (SP)
 *   r:enter_backward(d)     --> [outer rows, C]: d [batch x seq, C] summed over TP (reduce-scattered under SP)
 *   r:exit(partial)         --> the same reduction (a row-parallel output's)
 *   r:exit_backward(d)      --> enter's gather
 *   r:scatter(full)         --> [outer rows, C]: this rank's rows of full
 * Rows are [b, s] (row b seq + t); under SP a rank holds positions [r seq/TP, (r+1) seq/TP) of every
 * sample. Tensors are 2-D, contiguous, fp32 or bf16, on the communicator's device (an NCCL one for
 * GPU tensors); every call returns a new tensor and every rank of comm calls it alike. comm may be
 * false for one rank (then nothing is communicated). */
#include <stdio.h>

#include "engine/comm/comm.h"
#include "engine/lua/bindings.h"
#include "engine/ops/backend.h"
#include "engine/parallel/tp.h"

#define REGION_MT "luatron.TPRegion"

typedef struct {
    lt_comm *comm; /* NULL: one rank */
    int B, T, sequence_parallel;
} region;

static region *check_region(lua_State *L) { return luaL_checkudata(L, 1, REGION_MT); }

/* Rows a rank holds outside the region. */
static int outer_rows(const region *r) {
    const int size = r->comm ? lt_comm_size(r->comm) : 1;
    return r->sequence_parallel && size > 1 ? r->B * r->T / size : r->B * r->T;
}

static int int_field(lua_State *L, int idx, const char *key) {
    lua_getfield(L, idx, key);
    int ok;
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok || v <= 0) luaL_error(L, "tp_region: %s must be a positive integer", key);
    lua_pop(L, 1);
    return (int)v;
}

static int l_tp_region(lua_State *L) {
    lt_comm *comm = lua_toboolean(L, 1) ? lt_lua_check_comm(L, 1) : NULL;
    luaL_checktype(L, 2, LUA_TTABLE);
    region *r = lua_newuserdatauv(L, sizeof *r, 1);
    r->comm = comm && lt_comm_size(comm) > 1 ? comm : NULL;
    r->B = int_field(L, 2, "batch");
    r->T = int_field(L, 2, "seq");
    lua_getfield(L, 2, "sequence_parallel");
    r->sequence_parallel = lua_toboolean(L, -1);
    lua_pop(L, 1);
    luaL_setmetatable(L, REGION_MT);
    lua_pushvalue(L, 1); /* the communicator lives as long as the region */
    lua_setiuservalue(L, -2, 1);
    return 1;
}

/* The lt_tp for tensor t (its backend and dtype), and t's width; checks t has `rows` rows. */
static lt_tp tp_for(lua_State *L, const region *r, const lt_tensor *t, int rows, int *C) {
    const lt_backend *be = lt_backend_of(t);
    if (t->ndim != 2 || !lt_tensor_is_contiguous(t) || (t->dtype != LT_F32 && t->dtype != LT_BF16))
        luaL_argerror(L, 2, "expected a contiguous 2-D fp32 or bf16 tensor");
    if (t->shape[0] != rows)
        luaL_error(L, "tp_region: the tensor has %d rows, this call takes %d", (int)t->shape[0], rows);
    *C = (int)t->shape[1];
    const int size = r->comm ? lt_comm_size(r->comm) : 1;
    return (lt_tp){r->comm, r->comm ? lt_comm_rank(r->comm) : 0, size, r->sequence_parallel && size > 1, be,
                   t->dtype == LT_BF16 ? be->bf16 : be->f32};
}

typedef enum { ENTER, REDUCE, SCATTER } mapping;

/* One mapping of the tensor at 2 into a new tensor. */
static int apply(lua_State *L, mapping which, int takes_outer) {
    region *r = check_region(L);
    lt_tensor *in = lt_lua_check_tensor(L, 2);
    const int N = r->B * r->T, No = outer_rows(r);
    int C;
    lt_tp tp = tp_for(L, r, in, takes_outer ? No : N, &C);
    char err[512] = "";
    lt_tp_rows *rows = tp.size > 1 ? lt_tp_rows_new(&tp, r->B, r->T, err, sizeof err) : NULL;
    if (tp.size > 1 && !rows) luaL_error(L, "tp_region: %s", err);
    const size_t E = lt_dtype_size(in->dtype);
    int64_t shape[2] = {which == ENTER ? N : No, C};
    lt_tensor *out = lt_backend_tensor(tp.be, in->dtype, 2, shape);
    void *scratch = tp.be->alloc(2 * E * (size_t)N * C);
    int rc = out && scratch ? 0 : -1;
    if (rc) snprintf(err, sizeof err, "out of %s memory", tp.be->name);
    if (!rc && which == ENTER) {
        const void *full;
        rc = lt_tp_enter(&tp, rows, &full, lt_tensor_data(in), lt_tensor_data(out), scratch, C, err, sizeof err);
        if (!rc && full != lt_tensor_data(out)) tp.be->copy(lt_tensor_data(out), full, E * (size_t)N * C);
    } else if (!rc && which == REDUCE) { /* reduced in a copy: the argument stays as it was */
        void *partial = (char *)scratch + E * (size_t)N * C, *reduced;
        tp.be->copy(partial, lt_tensor_data(in), E * (size_t)N * C);
        rc = lt_tp_exit(&tp, rows, &reduced, partial, lt_tensor_data(out), scratch, C, err, sizeof err);
        if (!rc && reduced != lt_tensor_data(out)) tp.be->copy(lt_tensor_data(out), reduced, E * (size_t)No * C);
    } else if (!rc) {
        if (tp.size > 1 && tp.sequence_parallel) lt_tp_scatter(&tp, rows, lt_tensor_data(out), lt_tensor_data(in), C);
        else tp.be->copy(lt_tensor_data(out), lt_tensor_data(in), E * (size_t)N * C);
    }
    if (scratch) tp.be->release(scratch, 2 * E * (size_t)N * C);
    lt_tp_rows_free(&tp, rows);
    if (rc) {
        lt_tensor_free(out);
        return luaL_error(L, "tp_region: %s", err);
    }
    lt_lua_push_tensor(L, out);
    return 1;
}

static int r_enter(lua_State *L) { return apply(L, ENTER, 1); }
static int r_reduce(lua_State *L) { return apply(L, REDUCE, 0); }
static int r_scatter(lua_State *L) { return apply(L, SCATTER, 0); }

static int r_outer_rows(lua_State *L) {
    lua_pushinteger(L, outer_rows(check_region(L)));
    return 1;
}

void lt_lua_open_tp(lua_State *L) {
    static const luaL_Reg methods[] = {{"enter", r_enter},          {"enter_backward", r_reduce},
                                       {"exit", r_reduce},          {"exit_backward", r_enter},
                                       {"scatter", r_scatter},      {"outer_rows", r_outer_rows},
                                       {NULL, NULL}};
    static const luaL_Reg meta[] = {{NULL, NULL}};
    lt_lua_new_type(L, REGION_MT, methods, meta);
    lua_pushcfunction(L, l_tp_region);
    lua_setfield(L, -2, "tp_region");
}

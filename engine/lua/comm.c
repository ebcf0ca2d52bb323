/* luatron.Communicator: collectives on tensors from Lua. The world communicator comes from the
 * launcher's bootstrap (luatron launch, or PMIx under mpirun/srun); groups are made from it.
 * core.comm_nccl(group) makes an NCCL communicator over a host group, for device tensors.
 * luatron.P2PRequest: a batch of sends and receives in flight (comm:batch_p2p_async). */
#include <string.h>

#include "engine/ops/backend.h"

#include "engine/comm/bootstrap.h"
#include "engine/comm/comm.h"
#include "engine/lua/bindings.h"

#define COMM_MT "luatron.Communicator"
#define REQ_MT "luatron.P2PRequest"

typedef struct {
    lt_comm *c;
    int is_world;
    int device; /* an NCCL communicator: its collectives take device tensors */
} comm_box;

static lt_comm *world_comm; /* one per process, never freed: groups refer to it */

static lt_comm *check_comm(lua_State *L, int idx) {
    comm_box *b = luaL_checkudata(L, idx, COMM_MT);
    if (!b->c) luaL_argerror(L, idx, "communicator was already closed");
    return b->c;
}

lt_comm *lt_lua_check_comm(lua_State *L, int idx) { return check_comm(L, idx); }

/* Uservalue 1: the host communicator an NCCL communicator was made over (kept alive with it). */
static comm_box *push_comm(lua_State *L, lt_comm *c, int is_world) {
    comm_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->c = c;
    b->is_world = is_world;
    b->device = 0;
    luaL_setmetatable(L, COMM_MT);
    return b;
}

/* core.comm_world() → the world communicator (created on first call). */
static int l_comm_world(lua_State *L) {
    if (!world_comm) {
        lt_comm_world_info info;
        char err[512] = "";
        if (lt_bootstrap(&info, err, sizeof err) != 0) return luaL_error(L, "bootstrap: %s", err);
        world_comm = lt_comm_shm_world(&info, err, sizeof err);
        if (!world_comm) return luaL_error(L, "cannot create the world communicator: %s", err);
    }
    push_comm(L, world_comm, 1);
    return 1;
}

/* comm:group({ranks...}, name) → a communicator over those ranks of comm (0-based, ascending). */
static int m_group(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *name = luaL_optstring(L, 3, "group");
    int n = (int)luaL_len(L, 2);
    int *ranks = lua_newuserdatauv(L, sizeof(int) * (size_t)(n > 0 ? n : 1), 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, 2, i + 1);
        ranks[i] = (int)luaL_checkinteger(L, -1);
        lua_pop(L, 1);
    }
    char err[512] = "";
    lt_comm *g = lt_comm_group(c, ranks, n, name, err, sizeof err);
    if (!g) return luaL_error(L, "%s", err);
    push_comm(L, g, 0);
    return 1;
}

/* core.comm_nccl(comm [, device = "cuda"]) → an NCCL communicator over comm's ranks (every rank of
 * comm calls it), named "<comm name>/nccl", for tensors on the device; comm stays for host tensors. */
static int l_comm_nccl(lua_State *L) {
    lt_comm *host = check_comm(L, 1);
    const char *device = luaL_optstring(L, 2, "cuda");
    char err[512] = "";
    const lt_backend *be = lt_backend_get(device, err, sizeof err);
    if (!be) return luaL_error(L, "NCCL communicator over '%s': %s", lt_comm_name(host), err);
    lt_comm *c = lt_comm_nccl(host, be->name, be->comm, err, sizeof err);
    if (!c) return luaL_error(L, "%s", err);
    comm_box *b = push_comm(L, c, 0);
    b->device = 1;
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    return 1;
}

static int m_rank(lua_State *L) { lua_pushinteger(L, lt_comm_rank(check_comm(L, 1))); return 1; }
static int m_size(lua_State *L) { lua_pushinteger(L, lt_comm_size(check_comm(L, 1))); return 1; }
static int m_name(lua_State *L) { lua_pushstring(L, lt_comm_name(check_comm(L, 1))); return 1; }

static lt_tensor *check_buffer(lua_State *L, int idx) {
    const comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    lt_tensor *t;
    if (b->device) { /* NCCL moves device memory */
        t = lt_lua_check_tensor(L, idx);
        if (t->storage->device == LT_CPU)
            luaL_argerror(L, idx, "an NCCL communicator needs device tensors (use the host communicator for host ones)");
    } else {
        t = lt_lua_check_host_tensor(L, idx); /* the shm backend moves host memory */
    }
    if (!lt_tensor_is_contiguous(t)) luaL_argerror(L, idx, "collectives need a contiguous tensor");
    return t;
}

static lt_reduce_op check_op(lua_State *L, int idx) {
    static const char *const names[] = {"sum", "avg", "max", NULL};
    return (lt_reduce_op)luaL_checkoption(L, idx, "sum", names);
}

#define CHECKED(call)                                  \
    do {                                               \
        char err[512] = "";                            \
        if ((call) != 0) return luaL_error(L, "%s", err); \
    } while (0)

/* comm:all_reduce(t [, "sum"|"avg"|"max"]) in place; returns t. */
static int m_all_reduce(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *t = check_buffer(L, 2);
    lt_reduce_op op = check_op(L, 3);
    CHECKED(lt_comm_all_reduce(c, lt_tensor_data(t), lt_tensor_numel(t), t->dtype, op, err, sizeof err));
    lua_settop(L, 2);
    return 1;
}

/* comm:reduce_scatter(send, recv [, op]): send has size * numel(recv) elements. */
static int m_reduce_scatter(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *s = check_buffer(L, 2), *r = check_buffer(L, 3);
    lt_reduce_op op = check_op(L, 4);
    if (s->dtype != r->dtype || lt_tensor_numel(s) != lt_tensor_numel(r) * lt_comm_size(c))
        return luaL_error(L, "reduce_scatter: send must hold size (%d) x numel(recv) elements of recv's dtype",
                          lt_comm_size(c));
    CHECKED(lt_comm_reduce_scatter(c, lt_tensor_data(s), lt_tensor_data(r), lt_tensor_numel(r), r->dtype, op, err,
                                   sizeof err));
    lua_settop(L, 3);
    return 1;
}

/* comm:all_gather(send, recv): recv has size * numel(send) elements. */
static int m_all_gather(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *s = check_buffer(L, 2), *r = check_buffer(L, 3);
    if (s->dtype != r->dtype || lt_tensor_numel(r) != lt_tensor_numel(s) * lt_comm_size(c))
        return luaL_error(L, "all_gather: recv must hold size (%d) x numel(send) elements of send's dtype",
                          lt_comm_size(c));
    CHECKED(lt_comm_all_gather(c, lt_tensor_data(s), lt_tensor_data(r), lt_tensor_numel(s), s->dtype, err,
                               sizeof err));
    lua_settop(L, 3);
    return 1;
}

static int64_t *check_counts(lua_State *L, int idx, int n) {
    luaL_checktype(L, idx, LUA_TTABLE);
    if ((int)luaL_len(L, idx) != n) luaL_argerror(L, idx, "needs one count per rank");
    int64_t *counts = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)n, 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, idx, i + 1);
        counts[i] = luaL_checkinteger(L, -1);
        lua_pop(L, 1);
    }
    return counts;
}

/* comm:all_to_all(send, send_counts, recv, recv_counts). */
static int m_all_to_all(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *s = check_buffer(L, 2), *r = check_buffer(L, 4);
    int n = lt_comm_size(c);
    int64_t *sc = check_counts(L, 3, n), *rc = check_counts(L, 5, n);
    int64_t st = 0, rt = 0;
    for (int i = 0; i < n; i++) st += sc[i], rt += rc[i];
    if (s->dtype != r->dtype || st > lt_tensor_numel(s) || rt > lt_tensor_numel(r))
        return luaL_error(L, "all_to_all: counts exceed the tensors (or dtypes differ)");
    CHECKED(lt_comm_all_to_all(c, lt_tensor_data(s), sc, lt_tensor_data(r), rc, s->dtype, err, sizeof err));
    lua_pushvalue(L, 4);
    return 1;
}

static int m_broadcast(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *t = check_buffer(L, 2);
    int root = (int)luaL_optinteger(L, 3, 0);
    CHECKED(lt_comm_broadcast(c, lt_tensor_data(t), lt_tensor_numel(t), t->dtype, root, err, sizeof err));
    lua_settop(L, 2);
    return 1;
}

static int m_send(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *t = check_buffer(L, 2);
    int peer = (int)luaL_checkinteger(L, 3);
    CHECKED(lt_comm_send(c, lt_tensor_data(t), lt_tensor_numel(t), t->dtype, peer, err, sizeof err));
    return 0;
}

static int m_recv(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_tensor *t = check_buffer(L, 2);
    int peer = (int)luaL_checkinteger(L, 3);
    CHECKED(lt_comm_recv(c, lt_tensor_data(t), lt_tensor_numel(t), t->dtype, peer, err, sizeof err));
    lua_settop(L, 2);
    return 1;
}

/* ---- point-to-point in batches (lt_comm_batch_p2p) ----
 * comm:batch_p2p{ {"send", t, peer}, {"recv", t2, peer2}, ... } posts every operation together and
 * returns when all are complete (pipeline schedules: send to one neighbour while receiving from
 * the other, or both directions with one neighbour, without deadlock). comm:batch_p2p_async{...}
 * returns a request (r:wait(), r:test()) so computation can go on meanwhile; the tensors are kept
 * alive by the request and must not be used until r:wait() returns. Messages between two ranks
 * match in FIFO order; see lt_comm_batch_p2p in engine/comm/comm.h for the rules. */

typedef struct {
    lt_comm_request *r; /* NULL once waited for */
} req_box;

/* The operations of the table at idx; pushes (and leaves on the stack) the ops array's userdata
 * and a table of the tensors (what an async request keeps alive). */
static lt_comm_p2p_op *check_p2p_ops(lua_State *L, int idx, int *nops) {
    const comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)luaL_len(L, idx);
    lt_comm_p2p_op *ops = lua_newuserdatauv(L, sizeof *ops * (size_t)(n > 0 ? n : 1), 0);
    lua_createtable(L, n, 0);
    int keep = lua_gettop(L);
    for (int i = 0; i < n; i++) {
        if (lua_geti(L, idx, i + 1) != LUA_TTABLE)
            luaL_error(L, "batch_p2p: entry %d must be a table {\"send\"|\"recv\", tensor, peer}", i + 1);
        int e = lua_gettop(L);
        lua_geti(L, e, 1);
        const char *kind = lua_tostring(L, -1);
        if (!kind || (strcmp(kind, "send") != 0 && strcmp(kind, "recv") != 0))
            luaL_error(L, "batch_p2p: entry %d: the first element must be \"send\" or \"recv\", not %s", i + 1,
                       kind ? kind : luaL_typename(L, -1));
        ops[i].kind = kind[0] == 's' ? LT_P2P_SEND : LT_P2P_RECV;
        lua_geti(L, e, 2);
        if (!luaL_testudata(L, -1, LT_TENSOR_MT))
            luaL_error(L, "batch_p2p: entry %d: the second element must be a tensor, not %s", i + 1,
                       luaL_typename(L, -1));
        lt_tensor *t = lt_lua_check_tensor(L, lua_gettop(L));
        if (b->device && t->storage->device == LT_CPU)
            luaL_error(L, "batch_p2p: entry %d: an NCCL communicator needs device tensors (use the host communicator "
                       "for host ones)", i + 1);
        if (!b->device && t->storage->device != LT_CPU)
            luaL_error(L, "batch_p2p: entry %d: the tensor lives in GPU memory: use an NCCL communicator "
                       "(core.comm_nccl) or a host copy", i + 1);
        if (!lt_tensor_is_contiguous(t)) luaL_error(L, "batch_p2p: entry %d: the tensor must be contiguous", i + 1);
        ops[i].buf = lt_tensor_data(t);
        ops[i].count = lt_tensor_numel(t);
        ops[i].dtype = t->dtype;
        lua_rawseti(L, keep, i + 1); /* the tensor */
        lua_geti(L, e, 3);
        int isnum;
        lua_Integer peer = lua_tointegerx(L, -1, &isnum);
        if (!isnum) luaL_error(L, "batch_p2p: entry %d: the third element must be the peer's rank (an integer)", i + 1);
        ops[i].peer = (int)peer;
        lua_settop(L, e - 1);
    }
    *nops = n;
    return ops;
}

/* comm:batch_p2p{ {"send", t, peer}, {"recv", t2, peer2}, ... }: returns when all are complete. */
static int m_batch_p2p(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    int n;
    lt_comm_p2p_op *ops = check_p2p_ops(L, 2, &n);
    CHECKED(lt_comm_batch_p2p(c, ops, n, err, sizeof err));
    return 0;
}

/* comm:batch_p2p_async{...} → a request. Uservalues: 1 the tensors, 2 the communicator. */
static int m_batch_p2p_async(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    int n;
    lt_comm_p2p_op *ops = check_p2p_ops(L, 2, &n);
    int tensors = lua_gettop(L);
    req_box *b = lua_newuserdatauv(L, sizeof *b, 2);
    b->r = NULL;
    luaL_setmetatable(L, REQ_MT);
    lua_pushvalue(L, tensors);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 2);
    b->r = lt_comm_batch_p2p_async(c, ops, n); /* copies ops */
    if (!b->r) return luaL_error(L, "batch_p2p_async on '%s': out of memory", lt_comm_name(c));
    return 1;
}

/* The request at idx, or NULL when it was waited for. Its communicator closed meanwhile (which
 * finished the batch but freed what the request refers to): the request is dropped unread. */
static lt_comm_request *check_req(lua_State *L, int idx, int *closed) {
    req_box *b = luaL_checkudata(L, idx, REQ_MT);
    *closed = 0;
    if (!b->r) return NULL;
    lua_getiuservalue(L, idx, 2);
    const comm_box *cb = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (!cb || !cb->c) {
        b->r = NULL;
        *closed = 1;
    }
    return b->r;
}

/* r:wait(): blocks until the batch is complete; raises its error. A second wait does nothing. */
static int r_wait(lua_State *L) {
    req_box *b = luaL_checkudata(L, 1, REQ_MT);
    int closed;
    if (!check_req(L, 1, &closed)) {
        if (closed) return luaL_error(L, "wait: the communicator was closed before this request was waited for");
        return 0;
    }
    lt_comm_request *r = b->r;
    b->r = NULL;
    CHECKED(lt_comm_wait(r, err, sizeof err));
    return 0;
}

/* r:test() → true when the batch has finished (r:wait() will not block). */
static int r_test(lua_State *L) {
    int closed;
    lt_comm_request *r = check_req(L, 1, &closed);
    lua_pushboolean(L, !r || lt_comm_test(r));
    return 1;
}

/* __gc / __close: a request nobody waited for is waited for here (its buffers are in use until
 * then); its error, if any, was the caller's to collect with r:wait(). */
static int r_gc(lua_State *L) {
    req_box *b = luaL_checkudata(L, 1, REQ_MT);
    int closed;
    if (check_req(L, 1, &closed)) {
        char err[8];
        lt_comm_wait(b->r, err, sizeof err);
        b->r = NULL;
    }
    return 0;
}

static int r_tostring(lua_State *L) {
    int closed;
    lt_comm_request *r = check_req(L, 1, &closed);
    lua_pushstring(L, !r ? "P2PRequest(waited)" : lt_comm_test(r) ? "P2PRequest(done)" : "P2PRequest(in flight)");
    return 1;
}

static int m_barrier(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    CHECKED(lt_comm_barrier(c, err, sizeof err));
    return 0;
}

static int m_abort(lua_State *L) {
    lt_comm_abort(check_comm(L, 1), luaL_optstring(L, 2, "aborted from Lua"));
    return 0;
}

/* comm:stats() → {calls=, bytes=, seconds=, async_seconds=, blocked_seconds=} (the last two: the
 * non-blocking calls' time in the background and the caller's time blocked on them); comm:reset_stats(). */
static int m_stats(lua_State *L) {
    lt_comm *c = check_comm(L, 1);
    lt_comm_stats s = lt_comm_get_stats(c);
    lt_comm_async_stats a = lt_comm_get_async_stats(c);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)s.calls);
    lua_setfield(L, -2, "calls");
    lua_pushinteger(L, (lua_Integer)s.bytes);
    lua_setfield(L, -2, "bytes");
    lua_pushnumber(L, s.seconds);
    lua_setfield(L, -2, "seconds");
    lua_pushnumber(L, a.seconds);
    lua_setfield(L, -2, "async_seconds");
    lua_pushnumber(L, a.blocked_seconds);
    lua_setfield(L, -2, "blocked_seconds");
    return 1;
}

static int m_reset_stats(lua_State *L) {
    lt_comm_reset_stats(check_comm(L, 1));
    return 0;
}

static int m_tostring(lua_State *L) {
    comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    if (!b->c) lua_pushliteral(L, "Communicator(closed)");
    else lua_pushfstring(L, "Communicator(%s, rank %d of %d)", lt_comm_name(b->c), lt_comm_rank(b->c), lt_comm_size(b->c));
    return 1;
}

static int m_free(lua_State *L) {
    comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    if (b->c && !b->is_world) lt_comm_free(b->c);
    b->c = NULL;
    return 0;
}

void lt_lua_open_comm(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"group", m_group},         {"rank", m_rank},           {"size", m_size},
        {"name", m_name},           {"all_reduce", m_all_reduce}, {"reduce_scatter", m_reduce_scatter},
        {"all_gather", m_all_gather}, {"all_to_all", m_all_to_all}, {"broadcast", m_broadcast},
        {"send", m_send},           {"recv", m_recv},           {"barrier", m_barrier},
        {"abort", m_abort},         {"stats", m_stats},         {"reset_stats", m_reset_stats},
        {"close", m_free},          {"batch_p2p", m_batch_p2p}, {"batch_p2p_async", m_batch_p2p_async},
        {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {"__tostring", m_tostring}, {NULL, NULL}};
    lt_lua_new_type(L, COMM_MT, methods, meta);
    static const luaL_Reg req_methods[] = {{"wait", r_wait}, {"test", r_test}, {NULL, NULL}};
    static const luaL_Reg req_meta[] = {{"__gc", r_gc}, {"__close", r_gc}, {"__tostring", r_tostring}, {NULL, NULL}};
    lt_lua_new_type(L, REQ_MT, req_methods, req_meta);
    lua_pushcfunction(L, l_comm_world);
    lua_setfield(L, -2, "comm_world");
    lua_pushcfunction(L, l_comm_nccl);
    lua_setfield(L, -2, "comm_nccl");
}

/* luatron.Optimizer: AdamW or SGD over a model's flat parameter buffer. */
#include <string.h>

#include "engine/lua/bindings.h"
#include "engine/model/gpt.h"
#include "engine/optim/optimizer.h"

#define OPTIM_MT "luatron.Optimizer"

typedef struct {
    lt_optimizer *o;
    /* The optimizer's own views of the model's flat weights and gradients: they hold a reference
     * to the storage, so model:close() before the optimizer is done cannot leave it writing freed memory. */
    lt_tensor *params, *grads;
} optim_box;

static lt_optimizer *check_optim(lua_State *L, int idx) {
    optim_box *b = luaL_checkudata(L, idx, OPTIM_MT);
    if (!b->o) luaL_argerror(L, idx, "optimizer was already closed");
    return b->o;
}

static float opt_num(lua_State *L, int idx, const char *name, double dflt) {
    lua_getfield(L, idx, name);
    double v = lua_isnil(L, -1) ? dflt : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    return (float)v;
}

static lt_optim_config check_config(lua_State *L, int idx) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "optimizer");
    const char *kind = luaL_optstring(L, -1, "adam");
    lt_optim_config c = {0};
    if (strcmp(kind, "adam") == 0) c.kind = LT_OPTIM_ADAM;
    else if (strcmp(kind, "sgd") == 0) c.kind = LT_OPTIM_SGD;
    else luaL_error(L, "optimizer '%s' is not supported (adam or sgd)", kind);
    lua_pop(L, 1);
    c.beta1 = opt_num(L, idx, "adam_beta1", 0.9);
    c.beta2 = opt_num(L, idx, "adam_beta2", 0.999);
    c.eps = opt_num(L, idx, "adam_eps", 1e-8);
    c.momentum = opt_num(L, idx, "sgd_momentum", 0.9);
    c.weight_decay = opt_num(L, idx, "weight_decay", 0.01);
    return c;
}

/* Pushes an optimizer userdata whose uservalues keep `keep` stack values alive. */
static void push_optimizer(lua_State *L, const lt_optim_config *c, lt_tensor *params, lt_tensor *grads,
                           const lt_optim_segment *segs, int n, const int *keep, int nkeep) {
    optim_box *b = lua_newuserdatauv(L, sizeof *b, nkeep);
    b->o = NULL;
    b->params = b->grads = NULL;
    luaL_setmetatable(L, OPTIM_MT);
    for (int i = 0; i < nkeep; i++) {
        lua_pushvalue(L, keep[i]);
        lua_setiuservalue(L, -2, i + 1);
    }
    /* Own views (a reference on the storage): model:close() or tensor:free() cannot free them under us. */
    b->params = lt_tensor_view(params, params->ndim, params->shape, params->stride, params->offset);
    b->grads = lt_tensor_view(grads, grads->ndim, grads->shape, grads->stride, grads->offset);
    if (b->params && b->grads) b->o = lt_optimizer_new(c, b->params, b->grads, segs, n);
    if (!b->o) luaL_error(L, "out of memory for the optimizer state");
}

/* core.optimizer(model, {optimizer="adam"|"sgd", adam_beta1=, adam_beta2=, adam_eps=, sgd_momentum=,
 * weight_decay=}): over all of a model's parameters (biases and norm weights without decay). */
static int l_optimizer_new(lua_State *L) {
    lt_gpt *m = lt_lua_check_gpt(L, 1);
    lt_optim_config c = check_config(L, 2);
    int n = lt_gpt_num_params(m);
    lt_optim_segment *segs = lua_newuserdatauv(L, sizeof *segs * (size_t)n, 0); /* scratch */
    for (int i = 0; i < n; i++) {
        const lt_gpt_param *p = lt_gpt_param_info(m, i);
        segs[i] = (lt_optim_segment){p->offset, p->numel, p->no_weight_decay};
    }
    int keep[1] = {1};
    push_optimizer(L, &c, lt_gpt_weights(m), lt_gpt_grads(m), segs, n, keep, 1);
    return 1;
}

/* core.optimizer_over(config, params, grads, segments): over flat fp32 tensors (e.g. this rank's shard
 * of the parameters, for the distributed optimizer); segments = {{offset=, numel=, no_weight_decay=}, ...}
 * with offsets (0-based) into params. */
static int l_optimizer_over(lua_State *L) {
    lt_optim_config c = check_config(L, 1);
    lt_tensor *p = lt_lua_check_tensor(L, 2), *g = lt_lua_check_tensor(L, 3);
    luaL_checktype(L, 4, LUA_TTABLE);
    if (p->dtype != LT_F32 || g->dtype != LT_F32 || !lt_tensor_is_contiguous(p) || !lt_tensor_is_contiguous(g) ||
        lt_tensor_numel(p) != lt_tensor_numel(g))
        return luaL_error(L, "optimizer_over: params and grads must be contiguous float32 tensors of one size");
    int n = (int)luaL_len(L, 4);
    lt_optim_segment *segs = lua_newuserdatauv(L, sizeof *segs * (size_t)(n > 0 ? n : 1), 0);
    for (int i = 0; i < n; i++) {
        lua_geti(L, 4, i + 1);
        lua_getfield(L, -1, "offset");
        lua_getfield(L, -2, "numel");
        lua_getfield(L, -3, "no_weight_decay");
        segs[i] = (lt_optim_segment){luaL_checkinteger(L, -3), luaL_checkinteger(L, -2), lua_toboolean(L, -1)};
        if (segs[i].offset < 0 || segs[i].numel < 0 || segs[i].offset + segs[i].numel > lt_tensor_numel(p))
            return luaL_error(L, "optimizer_over: segment %d lies outside the parameters", i + 1);
        lua_pop(L, 4);
    }
    int keep[2] = {2, 3};
    push_optimizer(L, &c, p, g, segs, n, keep, 2);
    return 1;
}

static int m_step(lua_State *L) {
    lt_optimizer_step(check_optim(L, 1), (float)luaL_checknumber(L, 2));
    return 0;
}

static int m_num_steps(lua_State *L) {
    lt_optimizer *o = check_optim(L, 1);
    if (!lua_isnoneornil(L, 2)) lt_optimizer_set_num_steps(o, luaL_checkinteger(L, 2));
    lua_pushinteger(L, lt_optimizer_num_steps(o));
    return 1;
}

/* optimizer:state_names() → {"exp_avg", "exp_avg_sq"}; optimizer:state(name) → flat view. */
static int m_state_names(lua_State *L) {
    const char *const *names = lt_optimizer_state_names(check_optim(L, 1));
    lua_newtable(L);
    for (int i = 0; names[i]; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int m_state(lua_State *L) {
    lt_optimizer *o = check_optim(L, 1);
    const char *name = luaL_checkstring(L, 2);
    lt_tensor *s = lt_optimizer_state(o, name);
    if (!s) luaL_error(L, "the optimizer has no state named '%s'", name);
    lt_lua_push_tensor(L, lt_tensor_view(s, s->ndim, s->shape, s->stride, s->offset));
    return 1;
}

static int m_free(lua_State *L) {
    optim_box *b = luaL_checkudata(L, 1, OPTIM_MT);
    lt_optimizer_free(b->o);
    lt_tensor_free(b->params);
    lt_tensor_free(b->grads);
    b->o = NULL;
    b->params = b->grads = NULL;
    return 0;
}

/* core.clip_grad_norm(grads, max_norm) → norm before clipping. */
static int l_clip_grad_norm(lua_State *L) {
    lt_tensor *g = lt_lua_check_tensor(L, 1);
    if (g->dtype != LT_F32 || !lt_tensor_is_contiguous(g)) luaL_argerror(L, 1, "needs a contiguous float32 tensor");
    lua_pushnumber(L, lt_clip_grad_norm(g, luaL_optnumber(L, 2, 0)));
    return 1;
}

void lt_lua_open_optim(lua_State *L) {
    static const luaL_Reg methods[] = {{"step", m_step},   {"num_steps", m_num_steps}, {"state_names", m_state_names},
                                       {"state", m_state}, {"close", m_free},          {NULL, NULL}};
    static const luaL_Reg meta[] = {{"__gc", m_free}, {"__close", m_free}, {NULL, NULL}};
    lt_lua_new_type(L, OPTIM_MT, methods, meta);
    lua_pushcfunction(L, l_optimizer_new);
    lua_setfield(L, -2, "optimizer");
    lua_pushcfunction(L, l_optimizer_over);
    lua_setfield(L, -2, "optimizer_over");
    lua_pushcfunction(L, l_clip_grad_norm);
    lua_setfield(L, -2, "clip_grad_norm");
}

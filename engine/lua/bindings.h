/* Shared helpers of the Lua bindings: one file per type exposed to Lua, as in Lua's own
 * standard libraries (userdata with a metatable per type, __gc and __close, errors via luaL_error). */
#ifndef LT_LUA_BINDINGS_H
#define LT_LUA_BINDINGS_H
#include <lauxlib.h>
#include <lua.h>

#include "engine/core/tensor.h"

#define LT_TENSOR_MT "luatron.Tensor"

/* Pushes a tensor userdata that owns `t` (freed by __gc/__close). Raises "out of memory" when t is NULL. */
void lt_lua_push_tensor(lua_State *L, lt_tensor *t);
lt_tensor *lt_lua_check_tensor(lua_State *L, int idx);
/* The same, for functions that read or write elements on the CPU: a GPU tensor is an argument error. */
lt_tensor *lt_lua_check_host_tensor(lua_State *L, int idx);
/* Reads a shape given as a table {d1, d2, ...} at idx; returns ndim. */
int lt_lua_check_shape(lua_State *L, int idx, int64_t *shape);
/* Registers a metatable with methods (used as __index) and metamethods. */
void lt_lua_new_type(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *metamethods);

/* The model behind a luatron.GPT userdata (for the optimizer binding). */
struct lt_gpt;
struct lt_gpt *lt_lua_check_gpt(lua_State *L, int idx);
/* The communicator behind a luatron.Communicator userdata. */
struct lt_comm;
struct lt_comm *lt_lua_check_comm(lua_State *L, int idx);

/* Each binding file registers its functions into the module table on the stack top. */
void lt_lua_open_tensor(lua_State *L);
void lt_lua_open_model(lua_State *L);
void lt_lua_open_optim(lua_State *L);
void lt_lua_open_data(lua_State *L);
void lt_lua_open_checkpoint(lua_State *L);
void lt_lua_open_system(lua_State *L);
void lt_lua_open_parallel(lua_State *L);
void lt_lua_open_bootstrap(lua_State *L);
void lt_lua_open_comm(lua_State *L);
void lt_lua_open_ddp(lua_State *L);
void lt_lua_open_tp(lua_State *L);
void lt_lua_open_moe(lua_State *L);
void lt_lua_open_tokenizer(lua_State *L);

/* luaopen function of the whole C core: require "luatron.core". */
int luaopen_luatron_core(lua_State *L);
/* Makes "luatron.core" and the embedded Lua library requireable in L. */
void lt_lua_install(lua_State *L);

#endif

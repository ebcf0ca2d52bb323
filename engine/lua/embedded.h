/* The Lua library (lua/luatron) compiled into the binary by tools/embed_lua.lua. */
#ifndef LT_LUA_EMBEDDED_H
#define LT_LUA_EMBEDDED_H
#include <stddef.h>

typedef struct {
    const char *module;    /* e.g. "luatron.config" */
    const char *chunkname; /* e.g. "@lua/luatron/config.lua", what error messages show */
    const char *source;
    size_t length;
} lt_embedded_module;

extern const lt_embedded_module lt_embedded_modules[]; /* ends with a NULL module */

#endif

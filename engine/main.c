/* The luatron command: run a recipe, open a REPL, preprocess data. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cli/launch.h"
#include "engine/cli/repl.h"
#include "engine/cli/threads.h"
#include "engine/data/preprocess.h"
#include "engine/lua/bindings.h"

#define LT_VERSION "0.1.0"

static const char *usage =
    "usage: luatron <command> [arguments]\n"
    "\n"
    "commands:\n"
    "  run FILE [ARGS]     run a recipe (a Lua file); ARGS reach it as the global `arg`.\n"
    "                      Recipes that call luatron.pretrain accept overrides such as\n"
    "                      train.train_iters=50 optimizer.lr=3e-4 checkpoint.save=runs/x\n"
    "                      (luatron run --help; luatron run FILE --help lists the fields)\n"
    "  repl                interactive Lua 5.4 with `lt = require \"luatron\"` loaded\n"
    "  launch -n N FILE    run a recipe as N ranks on this machine, output prefixed \"[rank R]\";\n"
    "                      --repl instead of FILE: every line typed runs on every rank\n"
    "                      (luatron launch --help)\n"
    "  preprocess ...      write Megatron indexed data (.bin/.idx) from text or JSONL\n"
    "                      (luatron preprocess --help)\n"
    "  generate --load DIR --prompt TEXT\n"
    "                      continue TEXT with a saved run's model and tokenizer\n"
    "                      (luatron generate --help)\n"
    "  convert --from-hf DIR --to CKPT | --from CKPT --to-hf DIR\n"
    "                      Hugging Face model folders to luatron checkpoints and back\n"
    "                      (luatron convert --help)\n"
    "  --help, -h          this text\n"
    "  --version           the version\n"
    "\n"
    "examples:\n"
    "  luatron run recipes/gpt_tiny.lua\n"
    "  luatron run recipes/gpt_tiny.lua train.train_iters=20 checkpoint.save=runs/tiny\n"
    "  luatron launch -n 2 recipes/gpt_tiny.lua\n"
    "  luatron preprocess --input corpus.jsonl --output-prefix data/corpus --append-eod\n"
    "\n"
    "environment:\n"
    "  LUATRON_LUA_DIR     load the Lua library from this folder instead of the embedded copy\n"
    "  OMP_NUM_THREADS     threads for the CPU kernels (default: the cores; with several ranks\n"
    "                      on this machine, cores / ranks, as torchrun)\n"
    "  GOMP_SPINCOUNT      how long an idle CPU thread spins before it sleeps. Unless this or\n"
    "                      OMP_WAIT_POLICY is set, luatron sets " LT_SPINCOUNT " (~30 us): libgomp's default\n"
    "                      (300000) made runs beside other busy processes 5x slower\n"
    "  OMP_WAIT_POLICY     passive: never spin; active: always spin\n"
    "  LUATRON_TRACEBACK   1: print the Lua stack with every error (else only with errors inside luatron)\n"
    "  LUATRON_CUDA_PLUGIN the CUDA backend to load for device \"cuda\" (default: luatron_cuda.so beside luatron)\n"
    "  LUATRON_CUDA_DEVICE which GPU device \"cuda\" uses (default 0)\n"
    "  LUATRON_CUDA_PROFILE 1: time every GPU op (lt.core.profile_report(\"cuda\") prints the table)\n"
    "  LUATRON_NCCL_LIB    libnccl.so.2 to load for data parallelism on GPUs (default: the system's)\n";

/* Whether an error message is positioned inside luatron's own Lua library ("lua/luatron/x.lua:12: ...",
 * embedded or from LUATRON_LUA_DIR): not a message written for the user, most likely a bug. */
static int raised_in_library(const char *msg) {
    const char *colon = strchr(msg, ':');
    if (!colon) return 0;
    const char *lib = strstr(msg, "lua/luatron/");
    return lib && lib < colon;
}

/* Errors for the user (a config error at the recipe's line, a message without position) print as
 * they are; errors raised inside the library, or any error with LUATRON_TRACEBACK=1, get the stack. */
static int traceback_handler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    const char *want = getenv("LUATRON_TRACEBACK");
    if ((want && *want && strcmp(want, "0") != 0) || raised_in_library(msg)) luaL_traceback(L, L, msg, 1);
    else lua_pushstring(L, msg);
    return 1;
}

static lua_State *new_state(void) {
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "luatron: cannot create the Lua state (out of memory)\n");
        exit(1);
    }
    luaL_openlibs(L);
    lt_lua_install(L);
    return L;
}

static const char *run_usage =
    "usage: luatron run FILE [ARGS]\n"
    "\n"
    "Runs the recipe FILE (a Lua file) with the luatron library: `local lt = require \"luatron\"`.\n"
    "ARGS reach it as the global `arg` (arg[0] is FILE), as with the lua command. A recipe that calls\n"
    "lt.pretrain(cfg, arg) takes overrides of its config:\n"
    "  group.field=value     e.g. train.train_iters=20 optimizer.lr=3e-4 model.device=cuda\n"
    "  field=value           the container's own fields, e.g. mixed_precision=bf16_mixed\n"
    "  --help                list every field the recipe's config takes, with its current value\n"
    "  --trace=FILE          write every rank's pipeline steps as a Chrome trace (ui.perfetto.dev)\n"
    "Any other argument is an error (a recipe with arguments of its own hands pretrain\n"
    "lt.overrides.split(arg)). Errors in the recipe name its file and line.\n"
    "\n"
    "examples:\n"
    "  luatron run recipes/gpt_tiny.lua\n"
    "  luatron run recipes/gpt_tiny.lua train.train_iters=20 checkpoint.save=runs/tiny\n"
    "  luatron run recipes/gpt_tiny.lua --help\n";

static int run_recipe(int argc, char **argv) {
    if (argc < 3 || strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0) {
        fputs(run_usage, argc < 3 ? stderr : stdout);
        return argc < 3 ? 2 : 0;
    }
    const char *file = argv[2];
    lua_State *L = new_state();
    /* arg[0] = the recipe, arg[1..] = its arguments, arg[-1] = the program, as lua does. */
    lua_createtable(L, argc - 3, 2);
    for (int i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 2);
    }
    lua_setglobal(L, "arg");
    lua_pushcfunction(L, traceback_handler);
    int status = luaL_loadfile(L, file);
    if (status == LUA_OK) {
        for (int i = 3; i < argc; i++) lua_pushstring(L, argv[i]);
        status = lua_pcall(L, argc - 3, 0, 1);
    }
    if (status != LUA_OK) {
        fprintf(stderr, "luatron: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    lua_close(L);
    return 0;
}

/* A command written in Lua: require(module).main(argv[2], ...), its number the exit code (nil: 0); with
 * --help or -h anywhere, the module's USAGE on stdout instead. */
static int run_lua_command(const char *module, int argc, char **argv) {
    lua_State *L = new_state();
    lua_pushcfunction(L, traceback_handler);
    lua_getglobal(L, "require");
    lua_pushstring(L, module);
    int status = lua_pcall(L, 1, 1, 1), help = 0;
    for (int i = 2; i < argc; i++) help |= strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0;
    if (status == LUA_OK && help) {
        lua_getfield(L, -1, "USAGE");
        fputs(lua_tostring(L, -1) ? lua_tostring(L, -1) : "", stdout);
        lua_close(L);
        return 0;
    }
    if (status == LUA_OK) {
        lua_getfield(L, -1, "main");
        for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
        status = lua_pcall(L, argc - 2, 1, 1);
    }
    if (status != LUA_OK) {
        fprintf(stderr, "luatron: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    const int rc = (int)lua_tointeger(L, -1);
    lua_close(L);
    return rc;
}

static int run_repl(void) {
    lua_State *L = new_state();
    lua_pushcfunction(L, traceback_handler);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "luatron");
    if (lua_pcall(L, 1, 1, -3) != LUA_OK) {
        fprintf(stderr, "luatron: %s\n", lua_tostring(L, -1));
        return 1;
    }
    lua_setglobal(L, "lt");
    lua_pop(L, 1);
    int rc = lt_repl_run(L, "luatron " LT_VERSION " (" LUA_RELEASE "), `lt` is require \"luatron\"; Ctrl-D quits");
    lua_close(L);
    return rc;
}

int main(int argc, char **argv) {
    lt_threads_setup(argv); /* may start the program again, with OpenMP's variables set */
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("luatron %s (%s)\n", LT_VERSION, LUA_RELEASE);
        return 0;
    }
    if (strcmp(argv[1], "run") == 0) return run_recipe(argc, argv);
    if (strcmp(argv[1], "repl") == 0) return run_repl();
    if (strcmp(argv[1], "launch") == 0) return lt_launch_main(argc - 1, argv + 1, "/proc/self/exe");
    if (strcmp(argv[1], "preprocess") == 0) return lt_preprocess_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "generate") == 0) return run_lua_command("luatron.generate", argc, argv);
    if (strcmp(argv[1], "convert") == 0) return run_lua_command("luatron.convert", argc, argv);
    fprintf(stderr, "luatron: unknown command '%s' (see luatron --help)\n", argv[1]);
    return 2;
}

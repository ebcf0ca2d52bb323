/* `luatron repl`: read-eval-print loop, after the stand-alone interpreter lua.c
 * of Lua 5.4 (same compile-as-expression-then-statement rule, continuation on
 * "<eof>" syntax errors, traceback message handler, SIGINT-sets-a-hook).
 *
 * Differences from lua.c:
 *  - GNU readline is always loaded at run time (dlopen) and driven through its
 *    callback interface from a pselect loop, so that Ctrl-C at a prompt only
 *    discards the pending input instead of killing the process;
 *  - prompts and results are also written when stdin is not a terminal, so the
 *    loop can be driven through a pipe;
 *  - the loop runs inside a protected C function, so the caller's stack is not
 *    touched and an error outside a chunk (out of memory, say) does not end it;
 *  - a hook installed by the user is put back after an interrupt;
 *  - an SPMD mode for the ranks of `luatron launch --repl` (repl.h): no prompts,
 *    a marker line after each line read;
 *  - Ctrl-C also interrupts a wait inside a collective (lt_comm_interrupt,
 *    engine/comm/comm.h), which the hook cannot reach: the call fails with
 *    "... interrupted (Ctrl-C)", an ordinary Lua error. The communicators are then
 *    brought back in step before the next line: by the launcher's control lines in
 *    SPMD mode (every rank must be idle, repl.h), here directly otherwise (one
 *    process is the whole job). */
#define _POSIX_C_SOURCE 200809L

#include "engine/cli/repl.h"

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "engine/comm/comm.h"

#define REPL_PROMPT     "> "
#define REPL_PROMPT2    ">> "
#define REPL_CHUNKNAME  "=stdin"
#define REPL_RLNAME     "luatron"           /* for $if conditionals in ~/.inputrc */
#define REPL_RLLIB_VAR  "LUATRON_READLINELIB"
#define EOFMARK         "<eof>"

/* Results of reading one line of input. */
enum { READ_OK, READ_EOF, READ_CANCEL };
/* Results of loadline besides the LUA_* load statuses. */
#define LOAD_EOF     (-1)
#define LOAD_CANCEL  (-2)
#define LOAD_CONTROL (-3) /* SPMD: a control line from the launcher was carried out */

/* ------------------------------------------------------------ SPMD mode */

/* The launcher's token when running as a rank of `luatron launch --repl`, else NULL. */
static const char *spmd_token = NULL;
/* Set when Ctrl-C discarded a chunk at a continuation line (SPMD: then "done"). */
static int cancel_in_chunk = 0;

/* Writes the marker line "<mark><token>:<what>" after everything written so far. */
static void spmd_mark(const char *what) {
    if (spmd_token == NULL) return;
    fflush(stderr);
    fprintf(stdout, "%s%s:%s\n", LT_REPL_SPMD_MARK, spmd_token, what);
    fflush(stdout);
}

/* The launcher's control line "<mark><token>:<what>": what, else NULL (an ordinary line). */
static const char *spmd_control(const char *line) {
    size_t ml = sizeof(LT_REPL_SPMD_MARK) - 1, tl;
    if (spmd_token == NULL || strncmp(line, LT_REPL_SPMD_MARK, ml) != 0) return NULL;
    tl = strlen(spmd_token);
    if (strncmp(line + ml, spmd_token, tl) != 0 || line[ml + tl] != ':') return NULL;
    return line + ml + tl + 1;
}

/* Brings the communicators back in step after an interrupt (comm.h); says which could not be. */
static void comm_resync(void) {
    char err[512] = "";
    if (lt_comm_resync(err, sizeof err) != 0) {
        fflush(stdout);
        fprintf(stderr, "luatron: %s\n", err);
        fflush(stderr);
    }
}

/* Carries out a control line (repl.h); unknown ones are ignored. */
static void spmd_run_control(const char *what) {
    if (strcmp(what, "quiesce") == 0)
        lt_comm_quiesce();
    else if (strcmp(what, "resync") == 0)
        comm_resync();
}

/* ---------------------------------------------------------------- signals */

/* State running a chunk, for the SIGINT handler. */
static lua_State *volatile running_L = NULL;
/* Set by SIGINT while waiting for input. */
static volatile sig_atomic_t input_interrupted = 0;
/* Hook in place when SIGINT came, put back after the interrupt. */
static lua_Hook saved_hook = NULL;
static int saved_hook_mask = 0, saved_hook_count = 0;

static void set_handler(int sig, void (*handler)(int)) {
    struct sigaction sa;
    sa.sa_handler = handler;
    sa.sa_flags = 0; /* no SA_RESTART: a blocking read returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* Hook set by the SIGINT handler: runs at the next Lua event, where it is safe
 * to raise an error. */
static void stop_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, saved_hook, saved_hook_mask, saved_hook_count);
    luaL_error(L, "interrupted!");
}

/* SIGINT while a chunk runs. A C signal may not touch the state except through
 * lua_sethook, which is meant for this; a wait inside a collective is ended by
 * the communicators' interrupt flag. */
static void on_sigint_running(int sig) {
    set_handler(sig, SIG_DFL); /* a second Ctrl-C (code stuck in C) terminates */
    lt_comm_interrupt();
    saved_hook = lua_gethook(running_L);
    saved_hook_mask = lua_gethookmask(running_L);
    saved_hook_count = lua_gethookcount(running_L);
    /* Instructions only, no call or return events: a collective that returns "interrupted
     * (Ctrl-C)" raises it through the message handler, whose call and return would fire the
     * hook and replace that message. */
    lua_sethook(running_L, stop_hook, LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

/* SIGCONT while waiting for readline input: redraw the line after Ctrl-Z, fg. */
static volatile sig_atomic_t input_continued = 0;
static void on_sigcont_input(int sig) {
    (void)sig;
    input_continued = 1;
}

/* SIGINT while waiting for input: the reader notices and discards the input. */
static void on_sigint_input(int sig) {
    (void)sig;
    input_interrupted = 1;
}

/* ------------------------------------------------------ running a chunk */

/* Message handler: the error message plus a traceback (as lua.c). */
static int msghandler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Calls the function under `narg` arguments with the message handler and the
 * interrupting SIGINT handler in place. */
static int docall(lua_State *L, int narg, int nres) {
    int status, base = lua_gettop(L) - narg;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    running_L = L;
    set_handler(SIGINT, on_sigint_running);
    status = lua_pcall(L, narg, nres, base);
    set_handler(SIGINT, on_sigint_input);
    /* A SIGINT that came as the chunk ended left its hook unfired: drop it, or it
     * would interrupt the next chunk. */
    if (lua_gethook(L) == stop_hook)
        lua_sethook(L, saved_hook, saved_hook_mask, saved_hook_count);
    running_L = NULL;
    lua_remove(L, base);
    return status;
}

/* Prints the error message on top of the stack, if status is not OK. */
static void report(lua_State *L, int status) {
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        if (msg == NULL) msg = "(error message not a string)";
        fflush(stdout); /* keep stdout and stderr in order on a shared pipe */
        fprintf(stderr, "%s\n", msg);
        fflush(stderr);
        lua_pop(L, 1);
    }
}

/* Pushes the function that prints results: luatron.show's print (tables as constructors, {4, 128}),
 * or the global 'print' where the library is not there. */
static void push_printer(lua_State *L) {
    int top = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "luatron.show");
    if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1) && lua_getfield(L, -1, "print") == LUA_TFUNCTION) {
        lua_remove(L, -2);
        return;
    }
    lua_settop(L, top);
    lua_getglobal(L, "print");
}

/* Prints the values on the stack. */
static void l_print(lua_State *L) {
    int n = lua_gettop(L);
    if (n > 0) {
        luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
        push_printer(L);
        lua_insert(L, 1);
        if (lua_pcall(L, n, 0, 0) != LUA_OK) {
            lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1));
            report(L, LUA_ERRRUN);
            lua_pop(L, 1);
        }
    }
    fflush(stdout);
}

/* ---------------------------------------------------------- line input */

/* GNU readline, when it could be loaded (callback interface). */
typedef void (*rl_linefn)(char *);
static struct {
    int tried, ok;
    void (*handler_install)(const char *, rl_linefn);
    void (*read_char)(void);
    void (*handler_remove)(void);
    void (*add_history)(const char *);
    void (*free_line_state)(void);
    void (*cleanup_after_signal)(void);
    void (*sigcleanup)(void); /* readline >= 7 */
    void (*redisplay)(void);
    void (*check_signals)(void); /* readline >= 8.1 */
    int (*on_new_line)(void);
    int *point, *end;
} rl;

static void *sym(void *lib, const char *name) { return dlsym(lib, name); }

static void rl_load(void) {
    const char *name;
    void *lib = NULL;
    const char **rlname;
    int *persistent;
    if (rl.tried) return;
    rl.tried = 1;
    name = getenv(REPL_RLLIB_VAR);
    if (name != NULL) {
        if (*name == '\0') return; /* explicitly disabled */
        lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    } else {
        lib = dlopen("libreadline.so.8", RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) lib = dlopen("libreadline.so", RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == NULL) return;
    *(void **)&rl.handler_install = sym(lib, "rl_callback_handler_install");
    *(void **)&rl.read_char = sym(lib, "rl_callback_read_char");
    *(void **)&rl.handler_remove = sym(lib, "rl_callback_handler_remove");
    *(void **)&rl.add_history = sym(lib, "add_history");
    *(void **)&rl.free_line_state = sym(lib, "rl_free_line_state");
    *(void **)&rl.cleanup_after_signal = sym(lib, "rl_cleanup_after_signal");
    *(void **)&rl.sigcleanup = sym(lib, "rl_callback_sigcleanup");
    *(void **)&rl.redisplay = sym(lib, "rl_redisplay");
    *(void **)&rl.check_signals = sym(lib, "rl_check_signals");
    *(void **)&rl.on_new_line = sym(lib, "rl_on_new_line");
    rl.point = (int *)sym(lib, "rl_point");
    rl.end = (int *)sym(lib, "rl_end");
    if (!rl.handler_install || !rl.read_char || !rl.handler_remove || !rl.add_history ||
        !rl.free_line_state || !rl.cleanup_after_signal) {
        dlclose(lib); /* not a usable readline */
        memset(&rl, 0, sizeof rl);
        rl.tried = 1;
        return;
    }
    rlname = (const char **)sym(lib, "rl_readline_name");
    if (rlname != NULL) *rlname = REPL_RLNAME;
    /* Let readline keep its handlers (window size, Ctrl-Z: terminal put back
     * before stopping) for the whole wait, not only inside read_char; its
     * deferred handling runs from rl_check_signals. SIGINT stays ours. */
    persistent = (int *)sym(lib, "rl_persistent_signal_handlers");
    if (persistent != NULL && rl.check_signals != NULL)
        *persistent = 1;
    else
        rl.check_signals = NULL;
    rl.ok = 1;
}

/* Whether this run reads through readline (decided in lt_repl_run). */
static int use_readline = 0;

static char *rl_result = NULL;
static int line_ready = 0;

static void rl_on_line(char *line) {
    rl_result = line; /* NULL at EOF */
    line_ready = 1;
    rl.handler_remove(); /* no new prompt until asked */
}

/* Reads a line with readline into a malloc'd string (*out, NULL at EOF).
 * SIGINT stays blocked except while waiting in pselect, so a Ctrl-C is always
 * seen there and never in the middle of readline's own work. */
static int read_readline(const char *prompt, char **out) {
    sigset_t block, orig, waitmask;
    struct sigaction old_cont;
    int status = READ_OK;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &orig);
    waitmask = orig;
    sigdelset(&waitmask, SIGINT);
    rl_result = NULL;
    line_ready = 0;
    rl.handler_install(prompt, rl_on_line);
    set_handler(SIGINT, on_sigint_input); /* over readline's, which it saved */
    sigaction(SIGCONT, NULL, &old_cont);
    input_continued = 0;
    set_handler(SIGCONT, on_sigcont_input);
    while (!line_ready) {
        fd_set fds;
        int r;
        if (input_interrupted) { /* Ctrl-C: show "^C" after the text, drop the line */
            if (rl.point && rl.end && rl.redisplay) {
                *rl.point = *rl.end; /* so "^C" goes after the text */
                rl.redisplay();
            }
            fputs("^C", stdout);
            fflush(stdout);
            rl.free_line_state();
            if (rl.sigcleanup) rl.sigcleanup();
            rl.cleanup_after_signal();
            rl.handler_remove();
            fputs("\n", stdout);
            fflush(stdout);
            status = READ_CANCEL;
            break;
        }
        FD_ZERO(&fds);
        FD_SET(STDIN_FILENO, &fds);
        r = pselect(STDIN_FILENO + 1, &fds, NULL, NULL, NULL, &waitmask);
        if (r < 0) {
            if (errno == EINTR) { /* SIGINT is seen above; others are readline's */
                if (rl.check_signals && !input_interrupted) rl.check_signals();
                if (input_continued && rl.on_new_line && rl.redisplay) {
                    input_continued = 0; /* back from Ctrl-Z: on a fresh line */
                    rl.on_new_line();
                    rl.redisplay();
                }
                continue;
            }
            rl.handler_remove();
            status = READ_EOF;
            break;
        }
        if (r > 0) rl.read_char();
    }
    sigaction(SIGCONT, &old_cont, NULL);
    sigprocmask(SIG_SETMASK, &orig, NULL);
    if (status == READ_OK && rl_result == NULL) status = READ_EOF;
    *out = status == READ_OK ? rl_result : NULL;
    if (status != READ_OK) free(rl_result);
    return status;
}

/* Reads a line with fgets after writing the prompt; pushes it (without its
 * newline) when READ_OK. Lines of any length. */
static int read_plain(lua_State *L, const char *prompt) {
    char chunk[512];
    size_t got = 0;
    luaL_Buffer b;
    if (spmd_token == NULL) {
        fputs(prompt, stdout);
        fflush(stdout);
    } else if (input_interrupted) { /* SIGINT came just before the read */
        return READ_CANCEL;
    }
    luaL_buffinit(L, &b);
    for (;;) {
        size_t n;
        if (fgets(chunk, sizeof chunk, stdin) == NULL) {
            int eintr = ferror(stdin) && errno == EINTR;
            if (eintr || input_interrupted) clearerr(stdin);
            if (input_interrupted) break;
            if (eintr) continue; /* some other signal */
            if (got == 0) { /* end of input */
                luaL_pushresult(&b);
                lua_pop(L, 1);
                return READ_EOF;
            }
            break; /* last line without a newline */
        }
        n = strlen(chunk);
        got += n;
        if (n > 0 && chunk[n - 1] == '\n') {
            luaL_addlstring(&b, chunk, n - 1);
            break;
        }
        luaL_addlstring(&b, chunk, n);
    }
    luaL_pushresult(&b);
    if (input_interrupted) {
        lua_pop(L, 1);
        if (spmd_token == NULL) {
            fputs("\n", stdout);
            fflush(stdout);
        }
        return READ_CANCEL;
    }
    return READ_OK;
}

static int prompt_tostring(lua_State *L) {
    luaL_tolstring(L, 1, NULL);
    return 1;
}

/* Pushes the prompt to use (kept on the stack to anchor it): tostring of
 * _PROMPT / _PROMPT2 when set, else the default. */
static const char *get_prompt(lua_State *L, int firstline) {
    const char *dflt = firstline ? REPL_PROMPT : REPL_PROMPT2;
    lua_pushcfunction(L, prompt_tostring);
    if (lua_getglobal(L, firstline ? "_PROMPT" : "_PROMPT2") == LUA_TNIL) {
        lua_pop(L, 2);
        lua_pushstring(L, dflt);
    } else if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_isstring(L, -1)) {
        lua_pop(L, 1); /* an error from __tostring: default */
        lua_pushstring(L, dflt);
    }
    return lua_tostring(L, -1);
}

/* Prompts, reads a line, pushes it. A first line "=expr" becomes "return expr". */
static int pushline(lua_State *L, int firstline) {
    const char *prompt;
    int status;
    if (firstline) input_interrupted = 0;
    prompt = get_prompt(L, firstline);
    if (use_readline) {
        char *line = NULL;
        status = read_readline(prompt, &line);
        if (status == READ_OK) {
            lua_pushstring(L, line);
            free(line);
        }
    } else {
        status = read_plain(L, prompt);
    }
    input_interrupted = 0;
    if (status != READ_OK) {
        lua_pop(L, 1); /* prompt */
        return status;
    }
    lua_remove(L, -2); /* prompt */
    if (firstline && lua_tostring(L, -1)[0] == '=') {
        lua_pushfstring(L, "return %s", lua_tostring(L, -1) + 1);
        lua_remove(L, -2);
    }
    return READ_OK;
}

/* ------------------------------------------------------------ compiling */

/* Whether status is a syntax error for an incomplete chunk. */
static int incomplete(lua_State *L, int status) {
    if (status == LUA_ERRSYNTAX) {
        size_t lmsg, lmark = sizeof(EOFMARK) - 1;
        const char *msg = lua_tolstring(L, -1, &lmsg);
        if (msg && lmsg >= lmark && strcmp(msg + lmsg - lmark, EOFMARK) == 0) return 1;
    }
    return 0;
}

/* Tries the line on the stack as "return <line>;"; on success replaces the
 * line's copy with the compiled function above it (stack: line, function). */
static int addreturn(lua_State *L) {
    const char *line = lua_tostring(L, -1);
    const char *retline = lua_pushfstring(L, "return %s;", line);
    int status = luaL_loadbufferx(L, retline, strlen(retline), REPL_CHUNKNAME, "t");
    if (status == LUA_OK)
        lua_remove(L, -2); /* modified line */
    else
        lua_pop(L, 2); /* error message and modified line */
    return status;
}

static void checklocal(const char *line) {
    static const char space[] = " \t";
    line += strspn(line, space);
    if (strncmp(line, "local", 5) == 0 && line[5] != '\0' && strchr(space, line[5])) {
        fflush(stdout);
        fputs("warning: locals do not survive across lines in interactive mode\n", stderr);
        fflush(stderr);
    }
}

/* Compiles the line at index 1 as a statement, reading continuation lines
 * while it is incomplete. Leaves the whole text at index 1 and the function
 * (or error message) on top; LOAD_CANCEL on Ctrl-C (stack: the text). */
static int multiline(lua_State *L) {
    size_t len;
    const char *line = lua_tolstring(L, 1, &len);
    checklocal(line);
    for (;;) {
        int status = luaL_loadbufferx(L, line, len, REPL_CHUNKNAME, "t"), more;
        if (!incomplete(L, status)) return status;
        spmd_mark("more");
        more = pushline(L, 0);
        if (more == READ_EOF) return status; /* report the incomplete chunk */
        if (more == READ_CANCEL) {
            cancel_in_chunk = 1;
            return LOAD_CANCEL;
        }
        lua_remove(L, -2); /* error message */
        lua_pushliteral(L, "\n");
        lua_insert(L, -2);
        lua_concat(L, 3);
        line = lua_tolstring(L, 1, &len);
    }
}

/* Reads and compiles one chunk: as an expression first, else as statements.
 * Returns the load status with the function or message alone on the stack,
 * LOAD_EOF at end of input, LOAD_CANCEL when Ctrl-C discarded the input. */
static int loadline(lua_State *L) {
    const char *line;
    int status;
    lua_settop(L, 0);
    status = pushline(L, 1);
    if (status == READ_EOF) return LOAD_EOF;
    if (status == READ_CANCEL) return LOAD_CANCEL;
    if ((line = spmd_control(lua_tostring(L, 1))) != NULL) {
        spmd_run_control(line);
        lua_settop(L, 0);
        return LOAD_CONTROL;
    }
    if ((status = addreturn(L)) != LUA_OK) status = multiline(L);
    if (status == LOAD_CANCEL) {
        lua_settop(L, 0);
        return status;
    }
    line = lua_tostring(L, 1);
    if (use_readline && line[strspn(line, " \t")] != '\0') rl.add_history(line);
    lua_remove(L, 1);
    return status;
}

/* ---------------------------------------------------------------- loop */

static int repl_loop(lua_State *L) {
    int status;
    while ((status = loadline(L)) != LOAD_EOF) {
        if (status == LOAD_CANCEL) {
            if (cancel_in_chunk) spmd_mark("done");
            cancel_in_chunk = 0;
            continue;
        }
        if (status == LOAD_CONTROL) {
            spmd_mark("done");
            continue;
        }
        if (status == LUA_OK) status = docall(L, 0, LUA_MULTRET);
        if (status == LUA_OK)
            l_print(L);
        else
            report(L, status);
        if (lt_comm_interrupt_pending() && spmd_token == NULL) { /* the whole job is here */
            lt_comm_quiesce();
            comm_resync();
        }
        spmd_mark(lt_comm_interrupt_pending() ? "intr" : "done");
    }
    lua_settop(L, 0);
    return 0;
}

int lt_repl_run(lua_State *L, const char *banner) {
    struct sigaction old_int;
    int top = lua_gettop(L);
    const char *token = getenv(LT_REPL_SPMD_ENV);
    sigaction(SIGINT, NULL, &old_int);
    spmd_token = token != NULL && token[0] != '\0' ? token : NULL;
    cancel_in_chunk = 0;
    use_readline = 0;
    if (spmd_token != NULL) banner = NULL;
    if (spmd_token == NULL && isatty(STDIN_FILENO)) {
        rl_load();
        use_readline = rl.ok;
    }
    if (banner != NULL && banner[0] != '\0') {
        fputs(banner, stdout);
        fputs("\n", stdout);
    }
    fflush(stdout);
    set_handler(SIGINT, on_sigint_input);
    for (;;) {
        int status;
        lua_pushcfunction(L, repl_loop);
        status = lua_pcall(L, 0, 0, 0);
        if (status == LUA_OK) break;
        report(L, status); /* e.g. out of memory outside a chunk: go on */
    }
    if (spmd_token == NULL) fputs("\n", stdout); /* leave the terminal on a fresh line */
    fflush(stdout);
    sigaction(SIGINT, &old_int, NULL);
    lua_settop(L, top);
    return 0;
}

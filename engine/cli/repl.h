/* `luatron repl`: an interactive read-eval-print loop over a Lua state, in the
 * manner of the stand-alone `lua` interpreter (lua.c).
 *
 * Each input line is first compiled as `return <line>` so that expressions print
 * their values (tab-separated, through the global `print`); otherwise it is
 * compiled as a statement, reading continuation lines (prompt ">> ") while the
 * chunk is incomplete. A line starting with '=' is read as `return`. Errors are
 * reported on stderr with a traceback and the session goes on. Prompts can be
 * changed with the globals _PROMPT and _PROMPT2.
 *
 * Ctrl-C while a chunk runs interrupts it ("interrupted!", raised from a hook at
 * the next Lua instruction; a wait inside a collective or a point-to-point batch
 * returns within 20 ms with "<call> on communicator '<name>' (ranks ...)
 * interrupted (Ctrl-C)", see
 * lt_comm_interrupt in engine/comm/comm.h, and the communicators are usable again
 * from the next line; a second Ctrl-C before then kills the process, for code
 * stuck elsewhere in C). Ctrl-C at a prompt discards the input typed so far.
 *
 * When stdin is a terminal, GNU readline (line editing, history) is loaded at
 * run time with dlopen, so the binary never depends on it; the library name can
 * be overridden with $LUATRON_READLINELIB, and an empty value disables it.
 * Without readline, or when stdin is not a terminal, lines are read with fgets
 * and prompts written to stdout, which is flushed after every prompt and result,
 * so the loop can be driven through a pipe. */
#ifndef LT_REPL_H
#define LT_REPL_H
#include <lua.h>

/* SPMD mode, for the ranks of `luatron launch --repl` (engine/cli/launch.h): when the
 * environment variable LT_REPL_SPMD_ENV holds a token (any non-empty string), the loop prints
 * no banner and no prompts, never uses readline, and after each line it reads writes a marker
 * line on stdout (stdout and stderr flushed first):
 *     LT_REPL_SPMD_MARK <token> ":more"   the chunk is incomplete: send the next line
 *     LT_REPL_SPMD_MARK <token> ":done"   the chunk ran (or failed, or was interrupted)
 *     LT_REPL_SPMD_MARK <token> ":intr"   done, and a SIGINT came while it ran: the
 *                                         communicators must be resynchronised (below)
 * A marker may follow output without a final newline on the same line. SIGINT while a chunk
 * runs interrupts it (Lua code at its next instruction, a wait inside a collective within
 * 20 ms: lt_comm_interrupt, engine/comm/comm.h; then "intr"); SIGINT while waiting for a
 * continuation line discards the chunk (then "done"); SIGINT while waiting for a first line
 * does nothing (no marker).
 * Control lines, sent by the launcher in place of a first line, answered with "done":
 *     LT_REPL_SPMD_MARK <token> ":quiesce"   lt_comm_quiesce()
 *     LT_REPL_SPMD_MARK <token> ":resync"    lt_comm_resync() (a communicator that could not be
 *                                            resynchronised is named on stderr)
 * After a line that some rank answered with "intr", the launcher sends "quiesce" to every rank,
 * waits for every "done", sends "resync", waits for every "done", and only then the next line
 * (the order comm.h asks for). */
#define LT_REPL_SPMD_ENV "LUATRON_REPL_SPMD"
#define LT_REPL_SPMD_MARK "\036luatron-spmd:"

/* Runs the loop on stdin/stdout with state L (standard libraries and modules
 * already set up by the caller). Prints `banner` and a newline first unless it
 * is NULL or empty. Returns 0 at end of input (Ctrl-D). The caller's stack is
 * left as it was; the SIGINT disposition is restored on return. */
int lt_repl_run(lua_State *L, const char *banner);

#endif

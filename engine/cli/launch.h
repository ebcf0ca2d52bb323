/* `luatron launch`: start N ranks of a job on this machine (torchrun's standalone mode).
 *
 *   luatron launch -n N [--timeout SECONDS] [--repl] [--] FILE [ARGS]
 *
 * Every rank is a child process running `luatron run FILE ARGS` (with --repl: `luatron repl` in
 * its SPMD mode, see repl.h) with LUATRON_RANK, LUATRON_WORLD_SIZE, LUATRON_LOCAL_RANK,
 * LUATRON_LOCAL_WORLD_SIZE and LUATRON_JOB_ID in its environment (read back by lt_bootstrap,
 * engine/comm/bootstrap.h), LUATRON_COMM_TIMEOUT from --timeout, and OMP_NUM_THREADS =
 * lt_threads_per_rank(N) (engine/cli/threads.h) unless it is already set.
 *
 * Output: each line a rank writes on stdout (stderr) appears on the launcher's stdout (stderr)
 * as "[rank R] line", written whole (lines of different ranks never mix).
 *
 * Failure: when a rank exits non-zero or is killed by a signal, the launcher prints
 * "luatron launch: rank R failed (exit code C)" or "(killed by signal S)", stops the other
 * ranks (SIGTERM to each rank's process group, SIGKILL 3 s later), removes the job's files
 * (/dev/shm/luatron-<job_id>-*, and the same names in $TMPDIR or /tmp) and returns 1. All ranks
 * exiting 0 returns 0. Ctrl-C (SIGINT) is passed on to every rank (a second one stops them;
 * status 130); SIGTERM/SIGHUP stop the ranks (status 128 + signal). Each rank runs in its own
 * process group with PR_SET_PDEATHSIG = SIGKILL, so no rank outlives a launcher that is killed.
 *
 * --repl: the launcher prompts ("> ", ">> " inside a multi-line chunk), sends each line to
 * every rank, waits until every rank has finished it, and shows each rank's output (stdout and
 * stderr, in order) as "[rank R] ...". Ctrl-C interrupts the running chunk on every rank (or
 * discards a half-typed chunk); end of input (Ctrl-D) closes every rank's session. A rank waiting
 * inside a collective is interrupted too ("... interrupted (Ctrl-C)"); once every rank has
 * finished the line, the launcher has them resynchronise their communicators (repl.h's control
 * lines) before the next line, so the session's communicators stay usable. */
#ifndef LT_CLI_LAUNCH_H
#define LT_CLI_LAUNCH_H

/* argv[0] is "launch", argv[1..] the options above. self_exe: the luatron binary the ranks run;
 * NULL or "/proc/self/exe" for this process's own. Returns the exit status. */
int lt_launch_main(int argc, char **argv, const char *self_exe);

#endif

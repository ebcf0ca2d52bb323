/* `luatron launch`: N ranks as child processes, their output prefixed line by line, the job
 * stopped as a whole when one rank fails (see launch.h).
 *
 * One poll loop watches the ranks' pipes, a self-pipe fed by the signal handlers (SIGCHLD,
 * SIGINT, SIGTERM, SIGHUP) and, for --repl, the launcher's stdin. A rank's end is handled once
 * it is reaped and its pipes are at end of file (or 1 s after it was reaped, in case something
 * it started still holds them), so its last words come before the launcher's verdict. */
#define _GNU_SOURCE /* pipe2, memmem, asprintf, environ */
#include "engine/cli/launch.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/cli/repl.h"
#include "engine/cli/threads.h"

extern char **environ;

#define MAX_RANKS 4096
#define KILL_GRACE_S 3.0 /* SIGTERM, then SIGKILL this much later */
#define DRAIN_S 1.0      /* after a rank is reaped, how long its pipes may stay open */
#define MAX_LINE 65536   /* longer lines are cut into pieces of this size */

static const char *launch_usage =
    "usage: luatron launch -n N [--timeout SECONDS] [--repl] [--] FILE [ARGS]\n"
    "\n"
    "Starts N ranks on this machine, each running `luatron run FILE ARGS`, and prints their\n"
    "output line by line as \"[rank R] ...\". Ranks learn who they are from LUATRON_RANK,\n"
    "LUATRON_WORLD_SIZE, LUATRON_LOCAL_RANK, LUATRON_LOCAL_WORLD_SIZE and LUATRON_JOB_ID.\n"
    "\n"
    "options:\n"
    "  -n, --nproc N       number of ranks (1 to 4096)\n"
    "  --timeout SECONDS   how long a collective waits for the other ranks\n"
    "                      (sets LUATRON_COMM_TIMEOUT; default 300)\n"
    "  --repl              an SPMD REPL instead of a recipe: every line typed runs on every\n"
    "                      rank (Ctrl-C interrupts all of them, also ranks waiting in a\n"
    "                      collective, and the session goes on; Ctrl-D quits)\n"
    "  -h, --help          this text\n"
    "\n"
    "When a rank exits non-zero or is killed, the others are stopped (SIGTERM, then SIGKILL\n"
    "after 3 s) and the launcher exits with status 1. Ctrl-C is passed to every rank; a\n"
    "second one stops them. Unless set, OMP_NUM_THREADS is cores / N for every rank\n"
    "(at most the CPUs the launcher may use), and OMP_WAIT_POLICY is passive (luatron --help).\n"
    "Under mpirun or srun --mpi=pmix, use `luatron run FILE` directly: ranks come from PMIx.\n"
    "\n"
    "examples:\n"
    "  luatron launch -n 2 recipes/gpt_tiny.lua train.train_iters=20\n"
    "  luatron launch -n 4 --repl\n";

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    pid_t pid;     /* the rank's process (and process group) */
    int fd[2];     /* read ends of its stdout and stderr pipes (--repl: both on fd[0]); -1 closed */
    buf_t line[2]; /* the unfinished line of each */
    int in_fd;     /* --repl: write end of its stdin; -1 closed */
    int reaped, status;
    int done; /* reaped, pipes closed, end handled */
    double drain_until;
    int pending; /* --repl: a marker is awaited for the line sent */
    int more;    /* --repl: its last marker was "more" */
    int intr;    /* --repl: its last marker was "intr" (a Ctrl-C reached it while the line ran) */
    buf_t held;  /* --repl: its output held back until the ranks before it finished the line */
} rank_t;

static rank_t *ranks;
static int nranks;
static int sig_fd[2] = {-1, -1};
static int repl_mode;
static char mark[128];
static size_t mark_len;
static int stopping, killed, interrupts, term_sig, failed;
static double kill_at;

/* --repl: the launcher's side of the session. */
enum { R_INPUT, R_WAIT, R_EOF };
static int rstate;
static buf_t inbuf;
static int stdin_eof;
/* While the ranks run a line, rank stream_rank's output is written at once and later ranks'
 * output is held, so that a line's output reads rank by rank (rank 0's still live). */
static int stream_rank = INT_MAX;
/* After a line that a Ctrl-C interrupted: the control line the ranks are carrying out (repl.h:
 * "quiesce", then "resync", each on every rank before the next), or 0. */
enum { SYNC_NONE, SYNC_QUIESCE, SYNC_RESYNC };
static int sync_step;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return; /* EPIPE, closed terminal: nothing better to do */
        }
        p += k;
        n -= (size_t)k;
    }
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
    write_all(STDERR_FILENO, msg, (size_t)n);
}

static void buf_add(buf_t *b, const char *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            say("luatron launch: out of memory\n");
            exit(1);
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* Writes "[rank r] " + s[0..n) + "\n" to fd in one write (or holds it, see stream_rank). */
static void emit(int r, int fd, const char *s, size_t n) {
    static buf_t line;
    char prefix[32];
    int k = snprintf(prefix, sizeof prefix, "[rank %d] ", r);
    buf_t *out = r > stream_rank ? &ranks[r].held : &line;
    if (out == &line) line.len = 0;
    buf_add(out, prefix, (size_t)k);
    buf_add(out, s, n);
    buf_add(out, "\n", 1);
    if (out == &line) write_all(fd, line.p, line.len);
}

/* Moves stream_rank past the ranks that finished the line, writing what they held. */
static void advance_stream(int all) {
    while (stream_rank < nranks && (stream_rank < 0 || all || !ranks[stream_rank].pending)) {
        stream_rank++;
        if (stream_rank < nranks && ranks[stream_rank].held.len) {
            write_all(STDOUT_FILENO, ranks[stream_rank].held.p, ranks[stream_rank].held.len);
            ranks[stream_rank].held.len = 0;
        }
    }
    if (stream_rank >= nranks) stream_rank = INT_MAX;
}

static void repl_prompt(void);
static void repl_control(const char *what);

enum { M_DONE, M_MORE, M_INTR };

/* --repl: rank r finished the line it was sent ("done", "intr") or wants the next one ("more").
 * When every rank has answered: the prompt, or first the resynchronisation of the communicators
 * if a Ctrl-C reached a rank while the line ran. */
static void on_marker(int r, int kind) {
    if (!ranks[r].pending) return;
    ranks[r].pending = 0;
    ranks[r].more = kind == M_MORE;
    ranks[r].intr = kind == M_INTR;
    advance_stream(0);
    if (rstate != R_WAIT || stopping) return;
    int intr = 0;
    for (int i = 0; i < nranks; i++) {
        if (ranks[i].pending) return;
        intr |= ranks[i].intr;
    }
    if (sync_step == SYNC_NONE && intr) {
        sync_step = SYNC_QUIESCE;
        repl_control("quiesce");
        return;
    }
    if (sync_step == SYNC_QUIESCE) {
        sync_step = SYNC_RESYNC;
        repl_control("resync");
        return;
    }
    sync_step = SYNC_NONE;
    rstate = R_INPUT;
    repl_prompt();
}

/* Whether another rank already reported this error line ("luatron: ..."). Every rank validates the
 * same config, so a config error would otherwise print once per rank; the first one is enough. */
#define MAX_ERRORS 32
static struct {
    char *text;
    size_t n;
    int rank;
} errors_seen[MAX_ERRORS];
static int nerrors_seen;

static int error_seen_before(int r, const char *s, size_t n) {
    if (n < 9 || memcmp(s, "luatron: ", 9) != 0) return 0;
    for (int i = 0; i < nerrors_seen; i++)
        if (errors_seen[i].n == n && memcmp(errors_seen[i].text, s, n) == 0) return errors_seen[i].rank != r;
    if (nerrors_seen < MAX_ERRORS && (errors_seen[nerrors_seen].text = malloc(n))) {
        memcpy(errors_seen[nerrors_seen].text, s, n);
        errors_seen[nerrors_seen].n = n;
        errors_seen[nerrors_seen++].rank = r;
    }
    return 0;
}

/* A complete line (without its newline) from rank r's stdout (which = 0) or stderr (1). */
static void on_line(int r, int which, const char *s, size_t n) {
    if (repl_mode && which == 0 && n >= mark_len + 4) {
        const char *m = memmem(s, n, mark, mark_len);
        if (m && (size_t)(s + n - m) == mark_len + 4) {
            const char *what = m + mark_len;
            int kind = memcmp(what, "more", 4) == 0   ? M_MORE
                       : memcmp(what, "intr", 4) == 0 ? M_INTR
                       : memcmp(what, "done", 4) == 0 ? M_DONE
                                                      : -1;
            if (kind >= 0) {
                if (m > s) emit(r, STDOUT_FILENO, s, (size_t)(m - s));
                on_marker(r, kind);
                return;
            }
        }
    }
    if (which == 1 && !repl_mode && error_seen_before(r, s, n)) return;
    emit(r, which == 0 || repl_mode ? STDOUT_FILENO : STDERR_FILENO, s, n);
}

static void on_data(int r, int which, const char *data, size_t n) {
    buf_t *b = &ranks[r].line[which];
    buf_add(b, data, n);
    size_t start = 0;
    for (;;) {
        char *nl = memchr(b->p + start, '\n', b->len - start);
        if (!nl) break;
        size_t end = (size_t)(nl - b->p);
        for (; end - start > MAX_LINE; start += MAX_LINE) on_line(r, which, b->p + start, MAX_LINE);
        on_line(r, which, b->p + start, end - start);
        start = end + 1;
    }
    while (b->len - start >= MAX_LINE) {
        on_line(r, which, b->p + start, MAX_LINE);
        start += MAX_LINE;
    }
    memmove(b->p, b->p + start, b->len - start);
    b->len -= start;
}

static void close_pipe(int r, int which) {
    rank_t *k = &ranks[r];
    if (k->fd[which] < 0) return;
    close(k->fd[which]);
    k->fd[which] = -1;
    if (k->line[which].len) on_line(r, which, k->line[which].p, k->line[which].len);
    k->line[which].len = 0;
}

static void close_input(int r) {
    if (ranks[r].in_fd >= 0) close(ranks[r].in_fd);
    ranks[r].in_fd = -1;
}

/* Sends sig to rank r's process group (the rank and what it started). */
static void signal_rank(int r, int sig) {
    if (ranks[r].reaped || ranks[r].pid <= 0) return;
    if (kill(-ranks[r].pid, sig) != 0) kill(ranks[r].pid, sig);
}

static void start_stop(void) {
    if (stopping) return;
    stopping = 1;
    advance_stream(1);
    kill_at = now_s() + KILL_GRACE_S;
    for (int r = 0; r < nranks; r++) {
        close_input(r);
        signal_rank(r, SIGTERM);
    }
}

static void kill_all(void) {
    killed = 1;
    for (int r = 0; r < nranks; r++) signal_rank(r, SIGKILL);
}

/* Rank r is reaped and its pipes are closed: judge its end. */
static void on_rank_end(int r) {
    rank_t *k = &ranks[r];
    int st = k->status;
    k->done = 1;
    close_input(r);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (!ok && !stopping) {
        if (interrupts > 0 && WIFSIGNALED(st) && WTERMSIG(st) == SIGINT) {
            say("luatron launch: interrupted\n"); /* Ctrl-C ended it: stop the rest */
            start_stop();
        } else {
            if (WIFEXITED(st))
                say("luatron launch: rank %d failed (exit code %d)\n", r, WEXITSTATUS(st));
            else
                say("luatron launch: rank %d failed (killed by signal %d)\n", r, WTERMSIG(st));
            failed = 1;
            if (nranks > 1) say("luatron launch: stopping the other ranks\n");
            start_stop();
        }
    }
    if (repl_mode && k->pending) on_marker(r, M_DONE);
}

static void reap(void) {
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p <= 0) break;
        for (int r = 0; r < nranks; r++) {
            if (ranks[r].pid == p && !ranks[r].reaped) {
                ranks[r].reaped = 1;
                ranks[r].status = st;
                ranks[r].drain_until = now_s() + DRAIN_S;
            }
        }
    }
}

static void finish_ended(void) {
    double t = now_s();
    for (int r = 0; r < nranks; r++) {
        rank_t *k = &ranks[r];
        if (!k->reaped || k->done) continue;
        if (k->fd[0] >= 0 || k->fd[1] >= 0) {
            if (t < k->drain_until) continue;
            close_pipe(r, 0);
            close_pipe(r, 1);
        }
        on_rank_end(r);
    }
}

/* ------------------------------------------------------------------ --repl */

static int live(int r) { return !ranks[r].reaped && ranks[r].in_fd >= 0; }

static void repl_prompt(void) {
    int more = 0;
    for (int r = 0; r < nranks; r++)
        if (live(r) && ranks[r].more) more = 1;
    write_all(STDOUT_FILENO, more ? ">> " : "> ", more ? 3 : 2);
}

/* Sends the line (without newline) to every live rank and waits for their markers. */
static void repl_send(const char *s, size_t n) {
    int any = 0;
    for (int r = 0; r < nranks; r++) {
        if (!live(r)) continue;
        write_all(ranks[r].in_fd, s, n);
        write_all(ranks[r].in_fd, "\n", 1);
        ranks[r].pending = 1;
        ranks[r].more = 0;
        any = 1;
    }
    stream_rank = -1;
    advance_stream(0);
    rstate = any ? R_WAIT : R_INPUT;
    if (!any) {
        sync_step = SYNC_NONE;
        repl_prompt();
    }
}

/* Sends the control line "<mark>:<what>" (repl.h) to every live rank. */
static void repl_control(const char *what) {
    char line[sizeof mark + 16];
    int n = snprintf(line, sizeof line, "%s%s", mark, what);
    repl_send(line, (size_t)n);
}

/* In R_INPUT: sends the next complete line, or everything left at end of input. */
static void repl_dispatch(void) {
    while (rstate == R_INPUT) {
        char *nl = inbuf.len ? memchr(inbuf.p, '\n', inbuf.len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - inbuf.p);
            repl_send(inbuf.p, n);
            memmove(inbuf.p, nl + 1, inbuf.len - n - 1);
            inbuf.len -= n + 1;
        } else if (stdin_eof && inbuf.len) { /* a last line without a newline */
            repl_send(inbuf.p, inbuf.len);
            inbuf.len = 0;
        } else if (stdin_eof) {
            rstate = R_EOF;
            write_all(STDOUT_FILENO, "\n", 1);
            for (int r = 0; r < nranks; r++) close_input(r);
        } else {
            break;
        }
    }
}

static void repl_interrupt(void) {
    if (sync_step != SYNC_NONE) return; /* resynchronising: short, and not to be cut */
    if (rstate == R_WAIT) { /* interrupt the chunk where it still runs */
        for (int r = 0; r < nranks; r++)
            if (ranks[r].pending) signal_rank(r, SIGINT);
        return;
    }
    if (rstate == R_EOF) {
        for (int r = 0; r < nranks; r++) signal_rank(r, SIGINT);
        return;
    }
    /* At the prompt: drop what was typed; ranks inside a chunk discard it too. */
    inbuf.len = 0;
    write_all(STDOUT_FILENO, "\n", 1);
    int any = 0;
    for (int r = 0; r < nranks; r++) {
        if (live(r) && ranks[r].more) {
            ranks[r].pending = 1;
            ranks[r].more = 0;
            signal_rank(r, SIGINT);
            any = 1;
        }
    }
    if (any) {
        rstate = R_WAIT;
        stream_rank = -1;
        advance_stream(0);
    } else {
        repl_prompt();
    }
}

/* ------------------------------------------------------------ processes */

static void on_signal(int sig) {
    int e = errno;
    unsigned char c = (unsigned char)sig;
    if (write(sig_fd[1], &c, 1) < 0) { /* full: a signal is already queued */
    }
    errno = e;
}

static void set_handler(int sig, void (*h)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = h;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = h == SIG_IGN || h == SIG_DFL ? 0 : SA_RESTART;
    sigaction(sig, &sa, NULL);
}

/* The environment of rank r: the launcher's, less the variables set here, plus them (those
 * from index *own on, malloc'd). */
static char **rank_env(int r, const char *job, const char *timeout, const char *omp, const char *token,
                       size_t *own) {
    static const char *ours[] = {"LUATRON_RANK=", "LUATRON_WORLD_SIZE=", "LUATRON_LOCAL_RANK=",
                                 "LUATRON_LOCAL_WORLD_SIZE=", "LUATRON_JOB_ID=", LT_REPL_SPMD_ENV "=", NULL};
    size_t n = 0;
    while (environ && environ[n]) n++;
    char **env = calloc(n + 16, sizeof *env);
    if (!env) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const char *e = environ[i];
        int drop = 0;
        for (const char **o = ours; *o && !drop; o++) drop = strncmp(e, *o, strlen(*o)) == 0;
        if (timeout && strncmp(e, "LUATRON_COMM_TIMEOUT=", 21) == 0) drop = 1;
        if (!drop) env[k++] = (char *)e;
    }
    int bad = 0;
    *own = k;
    bad |= asprintf(&env[k++], "LUATRON_RANK=%d", r) < 0;
    bad |= asprintf(&env[k++], "LUATRON_WORLD_SIZE=%d", nranks) < 0;
    bad |= asprintf(&env[k++], "LUATRON_LOCAL_RANK=%d", r) < 0;
    bad |= asprintf(&env[k++], "LUATRON_LOCAL_WORLD_SIZE=%d", nranks) < 0;
    bad |= asprintf(&env[k++], "LUATRON_JOB_ID=%s", job) < 0;
    if (timeout) bad |= asprintf(&env[k++], "LUATRON_COMM_TIMEOUT=%s", timeout) < 0;
    if (omp) bad |= asprintf(&env[k++], "OMP_NUM_THREADS=%s", omp) < 0;
    if (token) bad |= asprintf(&env[k++], "%s=%s", LT_REPL_SPMD_ENV, token) < 0;
    env[k] = NULL;
    return bad ? NULL : env;
}

/* Starts rank r: stdin from in (or /dev/null), stdout to out, stderr to err. */
static pid_t spawn(const char *exe, char **argv, char **env, int in, int out, int err) {
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0) {
        if (pid > 0) setpgid(pid, pid); /* also done by the child: whichever runs first */
        return pid;
    }
    /* child */
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1); /* the launcher died before prctl */
    if (in < 0) in = open("/dev/null", O_RDONLY);
    if (in < 0 || dup2(in, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 || dup2(err, STDERR_FILENO) < 0)
        _exit(127);
    execve(exe, argv, env);
    dprintf(STDERR_FILENO, "luatron launch: cannot run %s: %s\n", exe, strerror(errno));
    _exit(127);
}

static void new_job_id(char *buf, size_t n) {
    uint32_t rnd = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)ts.tv_nsec * 2654435761u ^ (uint32_t)getpid();
    snprintf(buf, n, "l%x-%llx-%08x", (unsigned)getpid(),
             (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000u, rnd);
}

/* Kills what the ranks left behind: processes they started that outlived them were handed to
 * the launcher (PR_SET_CHILD_SUBREAPER), so they are its children: found in /proc, killed, reaped. */
static void kill_strays(void) {
    pid_t self = getpid();
    DIR *d = opendir("/proc");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
        char path[300], stat[512];
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, stat, sizeof stat - 1);
        close(fd);
        if (n <= 0) continue;
        stat[n] = '\0';
        const char *p = strrchr(stat, ')'); /* "pid (comm) state ppid ..." */
        char state;
        int ppid;
        if (!p || sscanf(p + 1, " %c %d", &state, &ppid) != 2 || ppid != self) continue;
        pid_t pid = (pid_t)atoi(e->d_name);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    closedir(d);
}

/* Removes dir/luatron-<job>-* (shared-memory segments and exchange files of the job). */
static void remove_job_files(const char *dir, const char *job) {
    char prefix[128];
    int pl = snprintf(prefix, sizeof prefix, "luatron-%s-", job);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, (size_t)pl) != 0) continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
}

/* ------------------------------------------------------------------- main */

static int parse_count(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < 1 || v > MAX_RANKS) return -1;
    *out = (int)v;
    return 0;
}

static int usage_error(const char *fmt, const char *arg) {
    say("luatron launch: ");
    say(fmt, arg);
    say("\n(luatron launch --help)\n");
    return 2;
}

int lt_launch_main(int argc, char **argv, const char *self_exe) {
    int n = 0, i = 1;
    const char *timeout = NULL;
    for (; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-' || a[1] == '\0') break;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            fputs(launch_usage, stdout);
            return 0;
        }
        if (strcmp(a, "--repl") == 0) {
            repl_mode = 1;
            continue;
        }
        if (strcmp(a, "-n") == 0 || strcmp(a, "--nproc") == 0 || strcmp(a, "--timeout") == 0) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            val = argv[++i];
        } else if (strncmp(a, "-n", 2) == 0 && a[2] != '-') {
            val = a + 2;
            a = "-n";
        } else if (strncmp(a, "--nproc=", 8) == 0) {
            val = a + 8;
            a = "--nproc";
        } else if (strncmp(a, "--timeout=", 10) == 0) {
            val = a + 10;
            a = "--timeout";
        } else {
            return usage_error("unknown option '%s'", a);
        }
        if (strcmp(a, "--timeout") == 0) {
            char *end;
            double t = strtod(val, &end);
            if (!*val || *end || !(t > 0) || t > 1e9) return usage_error("--timeout %s: want a positive number of seconds", val);
            timeout = val;
        } else if (parse_count(val, &n) != 0) {
            return usage_error("-n %s: want a number of ranks from 1 to 4096", val);
        }
    }
    if (n == 0) return usage_error("%s", "how many ranks? give -n N");
    const char *recipe = i < argc ? argv[i] : NULL;
    if (repl_mode && recipe) return usage_error("--repl takes no recipe (got '%s')", recipe);
    if (!repl_mode && !recipe) return usage_error("%s", "which recipe? luatron launch -n N FILE [ARGS]");
    if (recipe && access(recipe, R_OK) != 0) {
        say("luatron launch: cannot read %s: %s\n", recipe, strerror(errno));
        return 2;
    }

    /* stdin, stdout and stderr open, so that no pipe lands on them */
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) != fd) return 1;

    const char *exe = self_exe && *self_exe ? self_exe : "/proc/self/exe";
    char exe_name[PATH_MAX];
    ssize_t len = strcmp(exe, "/proc/self/exe") == 0 ? readlink(exe, exe_name, sizeof exe_name - 1) : -1;
    if (len > 0)
        exe_name[len] = '\0';
    else
        snprintf(exe_name, sizeof exe_name, "%s", exe);

    char job[64], omp_buf[24], token[32];
    const char *omp = NULL;
    new_job_id(job, sizeof job);
    if (!getenv("OMP_NUM_THREADS")) {
        snprintf(omp_buf, sizeof omp_buf, "%d", lt_threads_per_rank(n));
        omp = omp_buf;
    }
    if (repl_mode) {
        snprintf(token, sizeof token, "%08x", (unsigned)(now_s() * 1e6) ^ (unsigned)getpid() * 2654435761u);
        mark_len = (size_t)snprintf(mark, sizeof mark, "%s%s:", LT_REPL_SPMD_MARK, token);
    }

    /* child argv: <exe> run FILE ARGS | <exe> repl */
    int nargs = repl_mode ? 2 : argc - i + 2;
    char **cargv = calloc((size_t)nargs + 1, sizeof *cargv);
    ranks = calloc((size_t)n, sizeof *ranks);
    if (!cargv || !ranks || pipe2(sig_fd, O_CLOEXEC | O_NONBLOCK) != 0) {
        say("luatron launch: cannot start: %s\n", strerror(errno));
        return 1;
    }
    cargv[0] = exe_name;
    if (repl_mode) {
        cargv[1] = "repl";
    } else {
        cargv[1] = "run";
        for (int j = i; j < argc; j++) cargv[2 + j - i] = argv[j];
    }

    prctl(PR_SET_CHILD_SUBREAPER, 1); /* orphans of the ranks come to us (kill_strays) */
    set_handler(SIGCHLD, on_signal);
    set_handler(SIGINT, on_signal);
    set_handler(SIGTERM, on_signal);
    set_handler(SIGHUP, on_signal);
    set_handler(SIGPIPE, SIG_IGN);

    nranks = n;
    for (int r = 0; r < n; r++) {
        rank_t *k = &ranks[r];
        k->fd[0] = k->fd[1] = k->in_fd = -1;
        int out[2], err[2] = {-1, -1}, in[2] = {-1, -1};
        size_t own = 0;
        char **env = rank_env(r, job, timeout, omp, repl_mode ? token : NULL, &own);
        if (!env || pipe2(out, O_CLOEXEC) != 0 || (!repl_mode && pipe2(err, O_CLOEXEC) != 0) ||
            (repl_mode && pipe2(in, O_CLOEXEC) != 0)) {
            say("luatron launch: cannot start rank %d: %s\n", r, strerror(errno));
            nranks = r;
            failed = 1;
            start_stop();
            break;
        }
        k->pid = spawn(exe, cargv, env, in[0], out[1], repl_mode ? out[1] : err[1]);
        int e = errno;
        for (char **p = env + own; *p; p++) free(*p);
        free(env);
        close(out[1]);
        if (err[1] >= 0) close(err[1]);
        if (in[0] >= 0) close(in[0]);
        k->fd[0] = out[0];
        k->fd[1] = err[0];
        k->in_fd = in[1];
        if (k->pid < 0) {
            say("luatron launch: cannot start rank %d: %s\n", r, strerror(e));
            close_pipe(r, 0);
            close_pipe(r, 1);
            close_input(r);
            nranks = r;
            failed = 1;
            start_stop();
            break;
        }
        fcntl(k->fd[0], F_SETFL, O_NONBLOCK);
        if (k->fd[1] >= 0) fcntl(k->fd[1], F_SETFL, O_NONBLOCK);
    }

    if (repl_mode && !stopping) {
        char banner[160];
        int bl = snprintf(banner, sizeof banner,
                          "luatron launch: %d rank%s, SPMD REPL: each line runs on every rank; Ctrl-D quits\n", n,
                          n == 1 ? "" : "s");
        write_all(STDOUT_FILENO, banner, (size_t)bl);
        rstate = R_INPUT;
        repl_prompt();
    }

    struct pollfd *pfd = calloc((size_t)(2 * n + 2), sizeof *pfd);
    int *who = calloc((size_t)(2 * n + 2), sizeof *who);
    if (!pfd || !who) return 1;
    char data[65536];
    for (;;) {
        int all_done = 1;
        for (int r = 0; r < nranks; r++)
            if (!ranks[r].done) all_done = 0;
        if (all_done) break;
        if (repl_mode && rstate == R_INPUT && !stopping) repl_dispatch();

        int np = 0;
        pfd[np].fd = sig_fd[0];
        pfd[np].events = POLLIN;
        who[np++] = -1;
        if (repl_mode && rstate == R_INPUT && !stdin_eof && !stopping) {
            pfd[np].fd = STDIN_FILENO;
            pfd[np].events = POLLIN;
            who[np++] = -2;
        }
        double t = now_s(), wake = -1;
        for (int r = 0; r < nranks; r++) {
            for (int w = 0; w < 2; w++) {
                if (ranks[r].fd[w] < 0) continue;
                pfd[np].fd = ranks[r].fd[w];
                pfd[np].events = POLLIN;
                who[np++] = 2 * r + w;
            }
            if (ranks[r].reaped && !ranks[r].done && (wake < 0 || ranks[r].drain_until < wake))
                wake = ranks[r].drain_until;
        }
        if (stopping && !killed && (wake < 0 || kill_at < wake)) wake = kill_at;
        int timeout_ms = wake < 0 ? -1 : (wake <= t ? 0 : (int)((wake - t) * 1000) + 1);
        int got = poll(pfd, (nfds_t)np, timeout_ms);
        if (got < 0 && errno != EINTR) {
            say("luatron launch: poll: %s\n", strerror(errno));
            start_stop();
            kill_all();
        }
        for (int p = 0; got > 0 && p < np; p++) {
            if (!pfd[p].revents) continue;
            if (who[p] == -1) {
                unsigned char sigs[64];
                ssize_t k;
                while ((k = read(sig_fd[0], sigs, sizeof sigs)) > 0) {
                    for (ssize_t j = 0; j < k; j++) {
                        int s = sigs[j];
                        if (s == SIGCHLD) {
                            reap();
                        } else if (s == SIGINT) {
                            interrupts++;
                            if (stopping) {
                                kill_all();
                            } else if (repl_mode) {
                                repl_interrupt();
                            } else if (interrupts == 1) {
                                for (int r = 0; r < nranks; r++) signal_rank(r, SIGINT);
                            } else {
                                start_stop();
                            }
                        } else {
                            if (!term_sig) term_sig = s;
                            if (stopping) kill_all();
                            start_stop();
                        }
                    }
                }
            } else if (who[p] == -2) {
                ssize_t k = read(STDIN_FILENO, data, sizeof data);
                if (k > 0)
                    buf_add(&inbuf, data, (size_t)k);
                else if (k == 0 || (errno != EINTR && errno != EAGAIN))
                    stdin_eof = 1;
            } else {
                int r = who[p] / 2, w = who[p] % 2;
                if (ranks[r].fd[w] < 0) continue;
                ssize_t k = read(ranks[r].fd[w], data, sizeof data);
                if (k > 0)
                    on_data(r, w, data, (size_t)k);
                else if (k == 0 || (errno != EINTR && errno != EAGAIN))
                    close_pipe(r, w);
            }
        }
        reap(); /* a SIGCHLD may be pending behind output */
        if (stopping && !killed && now_s() >= kill_at) kill_all();
        finish_ended();
    }

    advance_stream(1);
    kill_strays();
    remove_job_files("/dev/shm", job);
    const char *tmp = getenv("TMPDIR");
    remove_job_files(tmp && *tmp ? tmp : "/tmp", job);
    if (term_sig) return 128 + term_sig;
    if (failed) return 1;
    int all_ok = 1;
    for (int r = 0; r < nranks; r++)
        if (!(WIFEXITED(ranks[r].status) && WEXITSTATUS(ranks[r].status) == 0)) all_ok = 0;
    if (!all_ok) return interrupts ? 130 : 1;
    return 0;
}

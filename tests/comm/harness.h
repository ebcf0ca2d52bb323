/* Multi-process test harness for communicators: fork N ranks, each runs a function and reports
 * into a shared anonymous mapping (failure count, first message, hashes, values); the parent
 * waits (killing the ranks after a deadline) and prints TAP. */
#ifndef LT_TESTS_COMM_HARNESS_H
#define LT_TESTS_COMM_HARNESS_H
#define _GNU_SOURCE
#include <dirent.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm/comm.h"
#include "tests/tap.h"

#define MAX_RANKS 8
#define NHASH 32

typedef struct {
    int fails;
    char msg[1024];
    uint64_t hash[NHASH];
    double val[8];
    char err[512]; /* an error message a rank wants the parent to see */
} rank_result;

typedef struct {
    int rank, n;
    char job[64];
    double timeout;
    const void *arg;
    rank_result *out;
    rank_result *all; /* every rank's result (shared), e.g. for flags */
} rank_ctx;

typedef void (*rank_fn)(rank_ctx *ctx);

static rank_result *shared_results;
static int job_counter;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* In a rank: record a failed check (the first message is kept). */
#define RCHECK(ctx, cond, ...)                                                                        \
    do {                                                                                              \
        if (!(cond)) rank_fail((ctx), __LINE__, __VA_ARGS__);                                         \
    } while (0)

static void rank_fail(rank_ctx *ctx, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void rank_fail(rank_ctx *ctx, int line, const char *fmt, ...) {
    if (ctx->out->fails++ == 0) {
        int k = snprintf(ctx->out->msg, sizeof ctx->out->msg, "line %d: ", line);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->out->msg + k, sizeof ctx->out->msg - (size_t)k, fmt, ap);
        va_end(ap);
    }
}

static lt_comm *make_world(rank_ctx *ctx, char *err, size_t errlen) {
    lt_comm_world_info info;
    memset(&info, 0, sizeof info);
    info.rank = ctx->rank;
    info.world_size = ctx->n;
    info.local_rank = ctx->rank;
    info.local_size = ctx->n;
    snprintf(info.job_id, sizeof info.job_id, "%s", ctx->job);
    info.timeout_s = ctx->timeout;
    return lt_comm_shm_world(&info, err, errlen);
}

typedef struct {
    int exited[MAX_RANKS]; /* exit status, or -signal */
    int timed_out;
} run_status;

/* Runs fn on n forked ranks; waits at most `deadline_s`. Results in shared_results[0..n-1]. */
static run_status run_ranks(int n, double timeout, rank_fn fn, const void *arg, double deadline_s) {
    run_status st;
    memset(&st, 0, sizeof st);
    if (!shared_results) {
        shared_results = mmap(NULL, sizeof(rank_result) * MAX_RANKS, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shared_results == MAP_FAILED) {
            perror("mmap");
            exit(2);
        }
    }
    memset(shared_results, 0, sizeof(rank_result) * MAX_RANKS);
    char job[64];
    snprintf(job, sizeof job, "t%d-%d", (int)getpid(), ++job_counter);
    fflush(stdout);
    pid_t pids[MAX_RANKS];
    for (int r = 0; r < n; r++) {
        pid_t p = fork();
        if (p == 0) {
            rank_ctx ctx = {r, n, "", timeout, arg, &shared_results[r], shared_results};
            snprintf(ctx.job, sizeof ctx.job, "%s", job);
            fn(&ctx);
            _exit(0);
        }
        pids[r] = p;
    }
    double end = now_s() + deadline_s;
    int left = n;
    int done[MAX_RANKS] = {0};
    while (left > 0) {
        for (int r = 0; r < n; r++) {
            if (done[r]) continue;
            int status;
            pid_t q = waitpid(pids[r], &status, WNOHANG);
            if (q == pids[r]) {
                done[r] = 1;
                left--;
                st.exited[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
            }
        }
        if (left == 0) break;
        if (now_s() > end) {
            st.timed_out = 1;
            for (int r = 0; r < n; r++)
                if (!done[r]) kill(pids[r], SIGKILL);
            for (int r = 0; r < n; r++)
                if (!done[r]) {
                    int status;
                    waitpid(pids[r], &status, 0);
                    st.exited[r] = -9;
                }
            break;
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    return st;
}

/* TAP line for a run: every rank exited 0 with no failed checks (ranks in `may_die` may be killed). */
static int report_run(const char *label, int n, const run_status *st, unsigned may_die) {
    int ok = !st->timed_out;
    for (int r = 0; r < n; r++) {
        if ((may_die >> r) & 1) continue;
        if (st->exited[r] != 0 || shared_results[r].fails) ok = 0;
    }
    TAP_CHECK(ok, "%s", label);
    if (!ok) {
        if (st->timed_out) printf("#   the ranks did not finish in time (killed)\n");
        for (int r = 0; r < n; r++)
            if (st->exited[r] != 0 || shared_results[r].fails)
                printf("#   rank %d: exit %d, %d failed checks: %s\n", r, st->exited[r], shared_results[r].fails,
                       shared_results[r].msg);
    }
    return ok;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}
#define FNV0 1469598103934665603ull

/* Names in /dev/shm that start with "luatron-t<pid>-". */
static int leftover_segments(char *names, size_t len) {
    char prefix[64];
    snprintf(prefix, sizeof prefix, "luatron-t%d-", (int)getpid());
    DIR *d = opendir("/dev/shm");
    if (!d) return 0;
    int count = 0;
    names[0] = '\0';
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            count++;
            size_t l = strlen(names);
            snprintf(names + l, len - l, "%s ", e->d_name);
        }
    }
    closedir(d);
    return count;
}
#endif

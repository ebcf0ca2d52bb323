/* OpenMP wait policy and threads per rank, set before libgomp reads them (see threads.h). */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "engine/cli/threads.h"

#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Where launchers say how many ranks of the job run on this machine: ours, Open MPI, MPICH. */
static const char *const local_size_vars[] = {"LUATRON_LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                              "MPI_LOCALNRANKS"};

int lt_threads_per_rank(int local_ranks) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long per = cores / (local_ranks > 0 ? local_ranks : 1);
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) == 0 && CPU_COUNT(&mask) < per) per = CPU_COUNT(&mask);
    return per < 1 ? 1 : (int)per;
}

static int local_ranks(void) {
    for (size_t i = 0; i < sizeof local_size_vars / sizeof *local_size_vars; i++) {
        const char *s = getenv(local_size_vars[i]);
        char *end;
        long n = s ? strtol(s, &end, 10) : 0;
        if (s && *s && !*end && n > 0 && n <= INT_MAX) return (int)n;
    }
    return 1;
}

void lt_threads_setup(char **argv) {
    int set = 0;
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) set |= setenv("GOMP_SPINCOUNT", LT_SPINCOUNT, 1) == 0;
    int local = local_ranks();
    if (local > 1 && !getenv("OMP_NUM_THREADS")) {
        char n[16];
        snprintf(n, sizeof n, "%d", lt_threads_per_rank(local));
        set |= setenv("OMP_NUM_THREADS", n, 1) == 0;
    }
    if (set) execv("/proc/self/exe", argv); /* only returns on failure: go on as we are */
}

/* How the CPU kernels' OpenMP threads wait, and how many there are per rank (issue 10).
 *
 * An idle libgomp thread spins before it sleeps: 300000 rounds by default (about 8 ms on an AMD
 * EPYC, ~27 ns a round). Alone on a machine that is cheap, but beside any other busy process
 * (another rank, a build, a test) the spinning thread holds the core its team mate needs, and
 * the tiny recipe ran 5x slower. OMP_WAIT_POLICY=passive (sleep at once) protects loaded runs but
 * costs ~12% on a quiet machine (bench-tiny: a wake-up per parallel region); a spin of 1000 rounds
 * (~30 us) kept quiet runs within ~3% of the default and loaded runs as fast as passive
 * (bench/results.md). libgomp reads these variables when it loads, before main, so
 * lt_threads_setup sets them and starts the program again (execv of /proc/self/exe: same pid,
 * same arguments) once. Whatever the user set stays as it is. */
#ifndef LT_CLI_THREADS_H
#define LT_CLI_THREADS_H

/* GOMP_SPINCOUNT when the user set neither it nor OMP_WAIT_POLICY (also the busted runner's,
 * tests/lua/BUILD). */
#define LT_SPINCOUNT "1000"

/* Call first in main. Sets, each only when unset:
 *  - GOMP_SPINCOUNT=LT_SPINCOUNT (unless OMP_WAIT_POLICY is set: the user chose a policy);
 *  - OMP_NUM_THREADS = lt_threads_per_rank(local ranks) when several ranks of a job share this
 *    machine (LUATRON_LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE from Open MPI's mpirun,
 *    MPI_LOCALNRANKS from MPICH's), as torchrun does;
 * then, if it set anything, re-executes the program. Returns when nothing was to set or the
 * exec failed (the run goes on with libgomp's defaults; child processes still get the values). */
void lt_threads_setup(char **argv);

/* OpenMP threads for each of local_ranks ranks on this machine: cores / local_ranks, at most
 * the CPUs this process may run on, at least 1 (torchrun's rule, capped by the affinity mask). */
int lt_threads_per_rank(int local_ranks);

#endif

/* Bootstrap: how a rank learns who it is (rank, world size, local rank, job id) before any
 * communicator exists, and how rank 0 hands small blobs (NCCL's unique id) to every rank.
 *
 * Three sources, tried in this order by lt_bootstrap:
 *   "local": started by `luatron launch` (engine/cli/launch.h): the environment holds
 *            LUATRON_RANK, LUATRON_WORLD_SIZE, LUATRON_LOCAL_RANK, LUATRON_LOCAL_WORLD_SIZE and
 *            LUATRON_JOB_ID.
 *   "pmix":  started by a PMIx launcher (mpirun of Open MPI 4+, srun --mpi=pmix, prterun): rank
 *            and sizes come from PMIx; rank 0 makes the job id and every rank gets it through a
 *            PMIx fence (PMIx is only tried when the environment shows a PMIx server, PMIX_RANK,
 *            PMIX_NAMESPACE or PMIX_SERVER_URI*; PMIX_ERR_UNREACHABLE falls through quietly).
 *   "none":  neither: rank 0 of 1 with a fresh job id.
 * timeout_s is LUATRON_COMM_TIMEOUT (seconds, > 0; default 300) in every case.
 *
 * The first call does the work and the result is kept: later calls return the same values
 * without talking to anyone (so the Lua binding and the world communicator can both ask).
 * Not thread-safe: call from the main thread. Functions return 0 on success, or -1 with a
 * message in err[errlen]. */
#ifndef LT_COMM_BOOTSTRAP_H
#define LT_COMM_BOOTSTRAP_H
#include <stddef.h>

#include "engine/comm/comm.h"

/* Fills *info (see comm.h). Fails on an inconsistent environment (LUATRON_RANK without
 * LUATRON_WORLD_SIZE or LUATRON_JOB_ID, a rank outside the world, a bad LUATRON_COMM_TIMEOUT)
 * or when a PMIx launcher is present but does not answer. */
int lt_bootstrap(lt_comm_world_info *info, char *err, size_t errlen);

/* A collective over all ranks of the job (all call it, with the same key, in the same order):
 * rank `root` publishes `len` bytes of `value` under `key` ([A-Za-z0-9_.-], at most 64
 * characters); every rank, root included, receives them in out[outlen]. The root's len must
 * equal outlen (other ranks' value/len are ignored). Waits at most timeout_s for the root.
 * Transport: PMIx put/commit/fence/get under "pmix"; under "local" a file in /dev/shm (else
 * $TMPDIR or /tmp) named luatron-<job_id>-bx<n>-<key>, written by the root and polled by the
 * others (`luatron launch` removes these when the job ends); under "none" a copy.
 * Calls lt_bootstrap first if it has not run. */
int lt_bootstrap_exchange(const char *key, const void *value, size_t len, int root, void *out, size_t outlen,
                          char *err, size_t errlen);

/* "local", "pmix" or "none": where lt_bootstrap found the job ("none" before it ran). */
const char *lt_bootstrap_launcher(void);

/* PMIx_Finalize when PMIx was initialized (registered with atexit too, so a rank that exits
 * without calling it still says goodbye to its launcher). Idempotent; after it the exchange
 * no longer works, lt_bootstrap still returns the kept values. */
void lt_bootstrap_finalize(void);

#endif

// Collectives on GPU memory through NCCL: lt_backend.comm (lt_device_comm_ops, engine/ops/backend.h),
// used by engine/comm/nccl.c behind lt_comm.
//
// - NCCL is loaded with dlopen on first use ("libnccl.so.2", or $LUATRON_NCCL_LIB), never linked:
//   the plugin loads and runs on machines without NCCL, where every call fails with the reason.
//   The few types and entry points needed are declared here (their ABI is stable since NCCL 2.10,
//   the first with ncclAvg and bf16), so no nccl.h is needed to build.
// - Each communicator has its own non-blocking stream and two events. A collective: record `ready`
//   on the compute stream (cuda_ctx.stream), the comm stream waits for it (earlier kernels have
//   written the data), the NCCL call runs on the comm stream, record `done` there and the compute
//   stream waits for it (later kernels see the result). The host never waits (barrier excepted).
//   A stream per communicator (not one shared comm stream): two communicators used from different
//   threads (the non-blocking calls' background threads) may enqueue in different orders on
//   different ranks, which on one shared stream could deadlock NCCL.
// - Under the emulator (LT_CUDA_EMULATION) there is no NCCL: every entry fails with that reason.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ops/cuda/internal.cuh"

#ifdef LT_CUDA_EMULATION

static const char cuda_nccl_emulated[] = "NCCL is not available under the emulator";
static int cuda_nccl_fail(char *err, size_t errlen) {
    if (err && errlen) snprintf(err, errlen, "%s", cuda_nccl_emulated);
    return -1;
}
static int emu_nccl_unique_id(void *, size_t, char *err, size_t errlen) { return cuda_nccl_fail(err, errlen); }
static void *emu_nccl_init(const void *, int, int, char *err, size_t errlen) {
    cuda_nccl_fail(err, errlen);
    return NULL;
}
static int emu_nccl_all_reduce(void *, void *, int64_t, lt_dtype, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_reduce_scatter(void *, const void *, void *, int64_t, lt_dtype, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_all_gather(void *, const void *, void *, int64_t, lt_dtype, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_broadcast(void *, void *, int64_t, lt_dtype, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_send(void *, const void *, int64_t, lt_dtype, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_recv(void *, void *, int64_t, lt_dtype, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_all_to_all(void *, const void *, const int64_t *, void *, const int64_t *, lt_dtype, char *err,
                               size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}
static int emu_nccl_barrier(void *, char *err, size_t errlen) { return cuda_nccl_fail(err, errlen); }
static void emu_nccl_abort(void *) {}
static void emu_nccl_destroy(void *) {}
static int emu_nccl_batch_p2p(void *, const lt_device_p2p_op *, int, char *err, size_t errlen) {
    return cuda_nccl_fail(err, errlen);
}

const lt_device_comm_ops cuda_nccl_ops = {
    "nccl",           emu_nccl_unique_id, emu_nccl_init,     emu_nccl_all_reduce, emu_nccl_reduce_scatter,
    emu_nccl_all_gather, emu_nccl_broadcast, emu_nccl_send, emu_nccl_recv,     emu_nccl_all_to_all,
    emu_nccl_barrier, emu_nccl_abort,     emu_nccl_destroy, emu_nccl_batch_p2p,
};

#else

#include <dlfcn.h>
#include <pthread.h>

// ---- the NCCL ABI used here (nccl.h, 2.10 and later) ----
typedef struct ncclComm *ncclComm_t;
typedef struct {
    char internal[128];
} ncclUniqueId;
typedef int ncclResult_t; // ncclSuccess = 0, ncclInProgress = 7
enum { NCCL_OK = 0, NCCL_IN_PROGRESS = 7 };
typedef int ncclRedOp_t;    // ncclSum 0, ncclMax 2, ncclAvg 4
typedef int ncclDataType_t; // ncclInt32 2, ncclInt64 4, ncclFloat32 7, ncclBfloat16 9

static struct {
    pthread_mutex_t lock;
    int tried;
    void *lib;
    char why[400]; // why NCCL could not be loaded
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*AllReduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*ReduceScatter)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                                  cudaStream_t);
    ncclResult_t (*AllGather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*Broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*GroupStart)(void);
    ncclResult_t (*GroupEnd)(void);
    ncclResult_t (*CommAbort)(ncclComm_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
} nccl = {PTHREAD_MUTEX_INITIALIZER};

// Loads NCCL once; 0, or -1 with the reason (the same on every call).
static int nccl_load(char *err, size_t errlen) {
    pthread_mutex_lock(&nccl.lock);
    if (!nccl.tried) {
        nccl.tried = 1;
        const char *env = getenv("LUATRON_NCCL_LIB");
        const char *path = env && *env ? env : "libnccl.so.2";
        void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char *why = dlerror();
            if (env && *env)
                snprintf(nccl.why, sizeof nccl.why, "NCCL is not available: LUATRON_NCCL_LIB=%s does not load (%s)",
                         env, why ? why : "?");
            else
                snprintf(nccl.why, sizeof nccl.why,
                         "NCCL is not available: libnccl.so.2 not found (set LUATRON_NCCL_LIB to its path): %s",
                         why ? why : "?");
        } else {
            struct {
                const char *name;
                void **slot;
            } syms[] = {
                {"ncclGetUniqueId", (void **)&nccl.GetUniqueId},
                {"ncclCommInitRank", (void **)&nccl.CommInitRank},
                {"ncclAllReduce", (void **)&nccl.AllReduce},
                {"ncclReduceScatter", (void **)&nccl.ReduceScatter},
                {"ncclAllGather", (void **)&nccl.AllGather},
                {"ncclBroadcast", (void **)&nccl.Broadcast},
                {"ncclSend", (void **)&nccl.Send},
                {"ncclRecv", (void **)&nccl.Recv},
                {"ncclGroupStart", (void **)&nccl.GroupStart},
                {"ncclGroupEnd", (void **)&nccl.GroupEnd},
                {"ncclCommAbort", (void **)&nccl.CommAbort},
                {"ncclCommDestroy", (void **)&nccl.CommDestroy},
                {"ncclGetErrorString", (void **)&nccl.GetErrorString},
                {"ncclCommGetAsyncError", (void **)&nccl.CommGetAsyncError},
            };
            for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
                *syms[i].slot = dlsym(lib, syms[i].name);
                if (!*syms[i].slot) {
                    snprintf(nccl.why, sizeof nccl.why,
                             "NCCL is not available: %s lacks %s (NCCL 2.10 or later is needed; set LUATRON_NCCL_LIB)",
                             env && *env ? env : "libnccl.so.2", syms[i].name);
                    dlclose(lib);
                    lib = NULL;
                    break;
                }
            }
            nccl.lib = lib;
        }
    }
    const int ok = nccl.lib != NULL;
    pthread_mutex_unlock(&nccl.lock);
    if (!ok && err && errlen) snprintf(err, errlen, "%s", nccl.why);
    return ok ? 0 : -1;
}

typedef struct {
    ncclComm_t comm;
    cudaStream_t stream; // this communicator's collectives
    cudaEvent_t ready;   // on the compute stream: the inputs are written
    cudaEvent_t done;    // on the comm stream: the collective finished
    float *one;          // barrier's element
    int nranks, rank;
    int aborted;
} nccl_handle;

static int nccl_errf(char *err, size_t errlen, const char *what, ncclResult_t r) {
    if (err && errlen)
        snprintf(err, errlen, "NCCL %s: %s (ncclResult %d)", what,
                 nccl.GetErrorString ? nccl.GetErrorString(r) : "error", (int)r);
    return -1;
}

static int cuda_errf(char *err, size_t errlen, const char *what, cudaError_t e) {
    if (err && errlen) snprintf(err, errlen, "NCCL %s: CUDA %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    cudaGetLastError();
    return -1;
}

static int nccl_dtype(lt_dtype d) {
    switch (d) {
    case LT_F32: return 7;
    case LT_BF16: return 9;
    case LT_I32: return 2;
    case LT_I64: return 4;
    }
    return -1;
}

static int nccl_op(int op) { return op == 0 ? 0 /* sum */ : op == 1 ? 4 /* avg */ : op == 2 ? 2 /* max */ : -1; }

// The comm stream waits for the compute stream's work so far (and the calling thread uses our GPU).
static int nccl_begin(nccl_handle *h, const char *what, char *err, size_t errlen) {
    if (h->aborted) {
        if (err && errlen) snprintf(err, errlen, "NCCL %s: the communicator was aborted", what);
        return -1;
    }
    cudaError_t e = cudaSetDevice(cuda_ctx.device);
    if (e == cudaSuccess) e = cudaEventRecord(h->ready, cuda_ctx.stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(h->stream, h->ready, 0);
    return e == cudaSuccess ? 0 : cuda_errf(err, errlen, what, e);
}

// After the NCCL call(s): r is their result; the compute stream waits for the comm stream.
static int nccl_end(nccl_handle *h, const char *what, ncclResult_t r, char *err, size_t errlen) {
    if (r != NCCL_OK && r != NCCL_IN_PROGRESS) return nccl_errf(err, errlen, what, r);
    ncclResult_t async = NCCL_OK;
    if (nccl.CommGetAsyncError(h->comm, &async) == NCCL_OK && async != NCCL_OK && async != NCCL_IN_PROGRESS)
        return nccl_errf(err, errlen, what, async);
    cudaError_t e = cudaEventRecord(h->done, h->stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(cuda_ctx.stream, h->done, 0);
    return e == cudaSuccess ? 0 : cuda_errf(err, errlen, what, e);
}

static int nccl_unique_id(void *id, size_t idlen, char *err, size_t errlen) {
    if (idlen < sizeof(ncclUniqueId)) {
        snprintf(err, errlen, "NCCL unique id: needs %zu bytes, got %zu", sizeof(ncclUniqueId), idlen);
        return -1;
    }
    if (nccl_load(err, errlen) != 0) return -1;
    ncclUniqueId u;
    ncclResult_t r = nccl.GetUniqueId(&u);
    if (r != NCCL_OK) return nccl_errf(err, errlen, "ncclGetUniqueId", r);
    memcpy(id, &u, sizeof u);
    return 0;
}

static void nccl_free_handle(nccl_handle *h) {
    if (h->one) cuda_release(h->one, sizeof(float));
    if (h->ready) cudaEventDestroy(h->ready);
    if (h->done) cudaEventDestroy(h->done);
    if (h->stream) cudaStreamDestroy(h->stream);
    free(h);
}

static void *nccl_init(const void *id, int nranks, int rank, char *err, size_t errlen) {
    if (nccl_load(err, errlen) != 0) return NULL;
    nccl_handle *h = (nccl_handle *)calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "NCCL init: out of memory");
        return NULL;
    }
    h->nranks = nranks;
    h->rank = rank;
    cudaError_t e = cudaSetDevice(cuda_ctx.device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&h->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&h->ready, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&h->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        cuda_errf(err, errlen, "init", e);
        nccl_free_handle(h);
        return NULL;
    }
    h->one = (float *)cuda_alloc(sizeof(float));
    if (!h->one) {
        snprintf(err, errlen, "NCCL init: out of GPU memory");
        nccl_free_handle(h);
        return NULL;
    }
    cuda_memzero(h->one, sizeof(float));
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclResult_t r = nccl.CommInitRank(&h->comm, nranks, u, rank);
    if (r != NCCL_OK) {
        char why[256];
        nccl_errf(why, sizeof why, "ncclCommInitRank", r);
        snprintf(err, errlen, "%s (rank %d of %d on GPU %d; NCCL_DEBUG=WARN says more)", why, rank, nranks,
                 cuda_ctx.device);
        nccl_free_handle(h);
        return NULL;
    }
    return h;
}

#define NCCL_TYPE(what)                                                                               \
    const int ty = nccl_dtype(dtype);                                                                 \
    if (ty < 0) {                                                                                     \
        snprintf(err, errlen, "NCCL %s: unsupported dtype %d", what, (int)dtype);                     \
        return -1;                                                                                    \
    }

static int nccl_all_reduce(void *hv, void *buf, int64_t count, lt_dtype dtype, int op, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("all_reduce");
    const int o = nccl_op(op);
    if (o < 0) return snprintf(err, errlen, "NCCL all_reduce: unknown reduce op %d", op), -1;
    if (nccl_begin(h, "all_reduce", err, errlen)) return -1;
    ncclResult_t r = nccl.AllReduce(buf, buf, (size_t)count, ty, o, h->comm, h->stream);
    return nccl_end(h, "all_reduce", r, err, errlen);
}

static int nccl_reduce_scatter(void *hv, const void *send, void *recv, int64_t recv_count, lt_dtype dtype, int op,
                               char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("reduce_scatter");
    const int o = nccl_op(op);
    if (o < 0) return snprintf(err, errlen, "NCCL reduce_scatter: unknown reduce op %d", op), -1;
    if (nccl_begin(h, "reduce_scatter", err, errlen)) return -1;
    ncclResult_t r = nccl.ReduceScatter(send, recv, (size_t)recv_count, ty, o, h->comm, h->stream);
    return nccl_end(h, "reduce_scatter", r, err, errlen);
}

static int nccl_all_gather(void *hv, const void *send, void *recv, int64_t send_count, lt_dtype dtype, char *err,
                           size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("all_gather");
    if (nccl_begin(h, "all_gather", err, errlen)) return -1;
    ncclResult_t r = nccl.AllGather(send, recv, (size_t)send_count, ty, h->comm, h->stream);
    return nccl_end(h, "all_gather", r, err, errlen);
}

static int nccl_broadcast(void *hv, void *buf, int64_t count, lt_dtype dtype, int root, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("broadcast");
    if (nccl_begin(h, "broadcast", err, errlen)) return -1;
    ncclResult_t r = nccl.Broadcast(buf, buf, (size_t)count, ty, root, h->comm, h->stream);
    return nccl_end(h, "broadcast", r, err, errlen);
}

static int nccl_send(void *hv, const void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("send");
    if (nccl_begin(h, "send", err, errlen)) return -1;
    ncclResult_t r = nccl.Send(buf, (size_t)count, ty, peer, h->comm, h->stream);
    return nccl_end(h, "send", r, err, errlen);
}

static int nccl_recv(void *hv, void *buf, int64_t count, lt_dtype dtype, int peer, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("recv");
    if (nccl_begin(h, "recv", err, errlen)) return -1;
    ncclResult_t r = nccl.Recv(buf, (size_t)count, ty, peer, h->comm, h->stream);
    return nccl_end(h, "recv", r, err, errlen);
}

static int nccl_all_to_all(void *hv, const void *send, const int64_t *send_counts, void *recv,
                           const int64_t *recv_counts, lt_dtype dtype, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    NCCL_TYPE("all_to_all");
    const size_t es = dtype == LT_BF16 ? 2 : dtype == LT_I64 ? 8 : 4;
    if (nccl_begin(h, "all_to_all", err, errlen)) return -1;
    ncclResult_t r = nccl.GroupStart();
    size_t soff = 0, roff = 0;
    for (int p = 0; p < h->nranks && r == NCCL_OK; p++) {
        if (send_counts[p] > 0)
            r = nccl.Send((const char *)send + soff * es, (size_t)send_counts[p], ty, p, h->comm, h->stream);
        if (r == NCCL_OK && recv_counts[p] > 0)
            r = nccl.Recv((char *)recv + roff * es, (size_t)recv_counts[p], ty, p, h->comm, h->stream);
        soff += (size_t)send_counts[p];
        roff += (size_t)recv_counts[p];
    }
    const ncclResult_t g = nccl.GroupEnd(); // always closes the group, even after a failed call
    return nccl_end(h, "all_to_all", r != NCCL_OK ? r : g, err, errlen);
}

// A batch of sends and receives as one group: NCCL progresses them together (no batch waits on itself).
static int nccl_batch_p2p(void *hv, const lt_device_p2p_op *ops, int n, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    for (int i = 0; i < n; i++)
        if (nccl_dtype(ops[i].dtype) < 0) {
            snprintf(err, errlen, "NCCL batch_p2p: operation %d: unsupported dtype %d", i, (int)ops[i].dtype);
            return -1;
        }
    if (nccl_begin(h, "batch_p2p", err, errlen)) return -1;
    ncclResult_t r = nccl.GroupStart();
    for (int i = 0; i < n && r == NCCL_OK; i++) {
        const lt_device_p2p_op *o = &ops[i];
        if (o->send) r = nccl.Send(o->buf, (size_t)o->count, nccl_dtype(o->dtype), o->peer, h->comm, h->stream);
        else r = nccl.Recv(o->buf, (size_t)o->count, nccl_dtype(o->dtype), o->peer, h->comm, h->stream);
    }
    const ncclResult_t g = nccl.GroupEnd(); // always closes the group, even after a failed call
    return nccl_end(h, "batch_p2p", r != NCCL_OK ? r : g, err, errlen);
}

// The one call that waits on the host: a barrier that returned before the others arrived would be none.
static int nccl_barrier(void *hv, char *err, size_t errlen) {
    nccl_handle *h = (nccl_handle *)hv;
    if (nccl_begin(h, "barrier", err, errlen)) return -1;
    ncclResult_t r = nccl.AllReduce(h->one, h->one, 1, 7, 0, h->comm, h->stream);
    if (nccl_end(h, "barrier", r, err, errlen)) return -1;
    cudaError_t e = cudaStreamSynchronize(h->stream);
    return e == cudaSuccess ? 0 : cuda_errf(err, errlen, "barrier", e);
}

static void nccl_abort(void *hv) {
    nccl_handle *h = (nccl_handle *)hv;
    if (!h || h->aborted) return;
    h->aborted = 1;
    if (h->comm) nccl.CommAbort(h->comm);
}

static void nccl_destroy(void *hv) {
    nccl_handle *h = (nccl_handle *)hv;
    if (!h) return;
    cudaSetDevice(cuda_ctx.device);
    if (h->comm && !h->aborted) {
        cudaStreamSynchronize(h->stream); // the collectives issued finish before the communicator goes
        nccl.CommDestroy(h->comm);
    }
    nccl_free_handle(h);
}

const lt_device_comm_ops cuda_nccl_ops = {
    "nccl",          nccl_unique_id, nccl_init, nccl_all_reduce, nccl_reduce_scatter, nccl_all_gather, nccl_broadcast,
    nccl_send,       nccl_recv,      nccl_all_to_all, nccl_barrier, nccl_abort, nccl_destroy, nccl_batch_p2p,
};

#endif

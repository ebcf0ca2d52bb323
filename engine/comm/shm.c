/* The shm backend: ranks are processes on one machine that exchange data through a POSIX
 * shared-memory segment per communicator and synchronise with C11 atomics inside it.
 *
 * Segment "/luatron-<job_id>-world" (and "/luatron-<job_id>-g-<name>-<hash of the world ranks>"
 * for a group), all offsets fixed by (N, S = staging half size, Q = mailbox half size):
 *   [0, 4096)        header: futex word + sleeper count, barrier arrival total, "unlinked" flag,
 *                    abort word (world rank + 1 of the first aborter) and reason, layout words
 *   N x 384 bytes    per-rank control: arrival sequence number, the call header of each staging
 *                    half (which collective, count, dtype, op, root, call number)
 *   N x N x 128      per ordered pair (a -> b) a point-to-point channel: chunks posted (written
 *                    by a), chunks copied out (written by b), the descriptor of each half
 *   then per rank    two staging halves of S bytes (collectives), then one mailbox per
 *                    destination of two halves of Q bytes (send/recv), page aligned.
 * S defaults to 4 MiB and Q to max(4 KiB, (S/2)/N) (about 12 MiB a rank, tmpfs pages are only
 * used once touched); LUATRON_SHM_SLOT_BYTES sets S, e.g. for a small /dev/shm. Larger transfers
 * go in chunks ("rounds").
 *
 * Creation and unlinking: every member shm_open(O_CREAT)s the name, ftruncates it to the layout
 * size (idempotent, zero-filled, so no rank has to be first) and maps it, then the members meet in
 * a barrier; member 0 shm_unlinks the name and raises "unlinked", which the others wait for. From
 * then on the segment has no name: nothing is left in /dev/shm however the processes end (the
 * memory goes when the last mapping does), and a later group with the same name and members
 * gets a fresh segment. When creation fails (a rank never arrives) the rank unlinks the name itself.
 *
 * Barrier: rank r stores its barrier number k in arrive[r], then adds 1 to `total`; the barrier is
 * complete when total >= k N (ranks run at most one barrier apart, so this is "every arrive >= k").
 * arrive[] names the ranks that did not arrive when a wait times out. Waiting spins briefly (not
 * at all when there are more ranks than CPUs; 20 us otherwise, LUATRON_SHM_SPIN_US overrides),
 * yields, then sleeps on the segment's futex word,
 * which every completing barrier, mailbox post and ack bumps (waking sleepers only when there are
 * any). Sleeps are capped at 20 ms, so every wait also notices its deadline (timeout_s), the
 * job's abort word (kept in the world segment, shared by all communicators of the job) and the
 * process's interrupt flag (lt_comm_interrupt, comm.h; a signal also ends the futex sleep).
 *
 * Resynchronisation after an interrupt (shm_resync, every rank idle, see comm.h): the counters
 * that must agree across ranks are the barrier number (arrive[r], and total = the sum of every
 * arrive), the call number (in the call headers), the staging half parity and, per point-to-point
 * channel, the chunk numbers of its two ends (posted, acked). Each rank raises its arrive to the
 * largest arrive of the segment, adding the difference to total (so total = k N again), takes the
 * largest call number found in the headers, restarts its rounds at half 0, and on each channel it
 * is an end of raises its own counter (posted as sender, acked as receiver) to the larger of the
 * two, i.e. to posted: a chunk nobody copied out counts as received, so a half-sent message is
 * dropped and the next batch numbers its chunks from the same point on both ends. Raising to a
 * maximum never changes the maximum, so the ranks may do this in any order, as long as none starts
 * a call before all are done.
 *
 * Collectives are sequences of rounds; round i uses staging half i % 2. A round writes into the
 * rank's own half, then barriers, then reads the other ranks' halves; a half is written again two
 * rounds later, after the barrier of the round in between, by which time every rank has finished
 * reading it, so no trailing barrier is needed. The first round of each call also publishes a call
 * header which every rank checks against its own after the barrier: ranks that call different
 * collectives (or counts, dtypes, ops, roots) all fail at once with a message naming them instead
 * of exchanging garbage.
 *   all_reduce: each rank copies its chunk (except its own block) into its half; barrier; rank r
 *     reduces block r (64-byte aligned blocks) reading the N contributions in rank order 0..N-1
 *     (its own straight from its buffer), writes it into its buffer and its half; barrier; every
 *     rank copies the other blocks from their owners' halves. Results are bit-identical on all
 *     ranks and independent of timing and chunking.
 *   reduce_scatter: one barrier a round (reduce block r in rank order straight into recv).
 *   all_gather, broadcast: one barrier a round. all_to_all: a first round exchanges the count
 *     matrix (checked pairwise), then rounds move up to S/N bytes per pair.
 * Reductions: fp32 sums in fp32; bf16 accumulates in fp32 and rounds once (nearest even); AVG is
 * the sum divided by N (integer division for integers); MAX propagates NaN; integer sums wrap.
 *
 * Point-to-point (batches; blocking send/recv are batches of one): every ordered pair a -> b has
 * its own channel, so traffic to or from different peers never queues behind each other. Chunk g
 * (1, 2, ... over the channel's life) of what a sends to b goes into half g % 2 of a's mailbox for
 * b with a descriptor (message size, offset, length), then `posted` = g; b copies it out once
 * posted >= g and sets `acked` = g; a reuses a half once acked >= g - 2. A batch gives each of its
 * operations its range of chunk numbers on its channel (in the order of the batch, after the
 * earlier batches), which is what matches messages in FIFO order, then runs a progress loop over
 * all of them: post every chunk whose half is free, copy out every chunk that arrived, sleep on
 * the futex word when nothing moved. A send is complete once its last chunk is acked. Because the
 * operations of a batch progress together, a batch never waits on itself (two ranks that send to
 * each other in one batch each do not deadlock); a blocking send still waits for its receiver.
 * That sleep is an ordinary wait: it ends on the deadline, an abort and an interrupt (Ctrl-C). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#include "engine/comm/internal.h"

#define SHM_MAGIC 0x6c7473686d763100ull /* "ltshmv1" */
#define HDR_BYTES 4096
#define CTL_BYTES 384
#define DEFAULT_SLOT (4u << 20)
#define MIN_SLOT 4096
#define ABORT_REASON_MAX 256
#define SLEEP_SLICE_S 0.02
#define DEFAULT_TIMEOUT_S 600.0
#define DEFAULT_SPIN_US 20.0

/* ---- shared layout ---- */

typedef struct {
    _Alignas(64) atomic_uint gen; /* futex word: bumped on every event that may end a wait */
    atomic_uint sleepers;         /* ranks sleeping on gen */
    _Alignas(64) atomic_uint_least64_t total; /* barrier arrivals, all ranks together */
    _Alignas(64) atomic_int unlinked;         /* member 0 removed the name (creation) */
    _Alignas(64) atomic_int abort_claim;      /* CAS 0 -> 1 by the first aborter */
    atomic_int abort_rank1;                   /* world rank + 1 of the aborter, after the reason */
    char abort_reason[ABORT_REASON_MAX];
    _Alignas(64) atomic_uint_least64_t layout[4]; /* magic, N, S, Q: set by the first, checked by all */
} seg_hdr;

typedef struct {
    uint64_t call_seq;
    int32_t kind, dtype, op, root;
    int64_t count;
} call_hdr;

typedef struct {
    _Alignas(64) atomic_uint_least64_t arrive; /* barriers this rank reached */
    int32_t pid;
    _Alignas(64) call_hdr hdr[2];              /* call header per staging half */
} rank_ctl;

/* The point-to-point channel a -> b (see the top of the file). */
typedef struct {
    _Alignas(64) atomic_uint_least64_t posted; /* chunks published, written by a */
    int64_t msg_bytes[2], offset[2], len[2];   /* per half: the chunk's message size and place in it */
    _Alignas(64) atomic_uint_least64_t acked;  /* chunks copied out, written by b */
} chan_ctl;
#define CHAN_BYTES 128

_Static_assert(sizeof(seg_hdr) <= HDR_BYTES, "segment header too large");
_Static_assert(sizeof(rank_ctl) <= CTL_BYTES, "rank control too large");
_Static_assert(sizeof(chan_ctl) <= CHAN_BYTES, "channel control too large");

/* ---- process-local state ---- */

typedef struct {
    int refs;
    void *base;
    size_t size;
    seg_hdr *hdr;
    rank_ctl *ctl; /* N entries of CTL_BYTES */
    chan_ctl *chan; /* N x N channels, [src * N + dst] */
    uint8_t *data;
    int n;
    size_t slot, p2p, per_rank; /* p2p: Q, one mailbox half */
} shm_seg;

typedef struct {
    shm_seg *seg;   /* this communicator's segment */
    shm_seg *world; /* the world segment (abort word); == seg for the world */
    int me, n;
    double timeout;
    double spin_s; /* waiting policy: spin this long, then yield `yields` times, then sleep */
    int yields;
    uint64_t bar_seq, round, call_seq;
    char job[80]; /* sanitized job id: names the group segments */
} shm_comm;

enum { K_BARRIER = 1, K_ALL_REDUCE, K_REDUCE_SCATTER, K_ALL_GATHER, K_ALL_TO_ALL, K_BROADCAST };
static const char *kind_name(int k) {
    switch (k) {
    case K_BARRIER: return "barrier";
    case K_ALL_REDUCE: return "all_reduce";
    case K_REDUCE_SCATTER: return "reduce_scatter";
    case K_ALL_GATHER: return "all_gather";
    case K_ALL_TO_ALL: return "all_to_all";
    case K_BROADCAST: return "broadcast";
    }
    return "nothing";
}

static inline rank_ctl *ctl_of(shm_seg *g, int r) { return (rank_ctl *)((uint8_t *)g->ctl + (size_t)r * CTL_BYTES); }
static inline uint8_t *slot_of(shm_seg *g, int r, int h) { return g->data + (size_t)r * g->per_rank + (size_t)h * g->slot; }
static inline chan_ctl *chan_of(shm_seg *g, int src, int dst) { return &g->chan[(size_t)src * (size_t)g->n + (size_t)dst]; }
/* Half h of src's mailbox for dst. */
static inline uint8_t *box_of(shm_seg *g, int src, int dst, int h) {
    return g->data + (size_t)src * g->per_rank + 2 * g->slot + ((size_t)dst * 2 + (size_t)h) * g->p2p;
}

/* ---- waiting ---- */

static void seg_notify(shm_seg *g) {
    atomic_fetch_add(&g->hdr->gen, 1u);
    if (atomic_load(&g->hdr->sleepers) > 0) {
#ifdef __linux__
        syscall(SYS_futex, (uint32_t *)&g->hdr->gen, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
    }
}

static void seg_sleep(shm_seg *g, unsigned seen, double seconds) {
    if (seconds > SLEEP_SLICE_S) seconds = SLEEP_SLICE_S;
    if (seconds < 0) seconds = 0;
    struct timespec ts = {0, (long)(seconds * 1e9)};
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)&g->hdr->gen, FUTEX_WAIT, seen, &ts, NULL, 0);
#else
    (void)seen;
    ts.tv_nsec = ts.tv_nsec > 200000 ? 200000 : ts.tv_nsec;
    nanosleep(&ts, NULL);
#endif
}

static int aborted(const shm_comm *s) { return atomic_load_explicit(&s->world->hdr->abort_rank1, memory_order_acquire); }

typedef struct p2p_batch p2p_batch;
static int p2p_can_progress(shm_comm *s, const p2p_batch *b);

enum { W_BARRIER, W_UNLINKED, W_P2P };
typedef struct {
    int kind;
    uint64_t target;      /* W_BARRIER: total */
    const p2p_batch *p2p; /* W_P2P: some operation of the batch can move */
    int steady;           /* not ended by an interrupt (a wait that other ranks end promptly anyway) */
} wait_t;

static int cond_ok(shm_comm *s, wait_t *w) {
    shm_seg *g = s->seg;
    switch (w->kind) {
    case W_BARRIER: return atomic_load_explicit(&g->hdr->total, memory_order_acquire) >= w->target;
    case W_UNLINKED: return atomic_load_explicit(&g->hdr->unlinked, memory_order_acquire) != 0;
    case W_P2P: return p2p_can_progress(s, w->p2p);
    }
    return 0;
}

/* 0 when the condition holds, 1 on timeout, 2 when the job was aborted, 3 when interrupted. */
static int shm_wait(shm_comm *s, wait_t *w) {
    if (cond_ok(s, w)) return 0;
    double t0 = lt_comm_now_(), deadline = t0 + s->timeout;
    if (s->spin_s > 0) {
        double until = t0 + s->spin_s;
        for (int i = 1;; i++) {
            CPU_RELAX();
            if (cond_ok(s, w)) return 0;
            if ((i & 63) == 0 && lt_comm_now_() > until) break;
        }
    }
    for (int i = 0; i < s->yields; i++) {
        sched_yield();
        if (cond_ok(s, w)) return 0;
    }
    shm_seg *g = s->seg;
    for (;;) {
        if (aborted(s)) return 2;
        if (!w->steady && lt_comm_interrupt_pending()) return 3;
        double now = lt_comm_now_();
        if (now >= deadline) return cond_ok(s, w) ? 0 : 1;
        atomic_fetch_add(&g->hdr->sleepers, 1u);
        unsigned seen = atomic_load(&g->hdr->gen);
        if (cond_ok(s, w)) {
            atomic_fetch_sub(&g->hdr->sleepers, 1u);
            return 0;
        }
        seg_sleep(g, seen, deadline - now);
        atomic_fetch_sub(&g->hdr->sleepers, 1u);
        if (cond_ok(s, w)) return 0;
    }
}

static shm_comm *impl(lt_comm *c) { return (shm_comm *)c->impl; }

static void abort_message(lt_comm *c, const char *what, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    char desc[256], reason[ABORT_REASON_MAX];
    int r1 = atomic_load_explicit(&s->world->hdr->abort_rank1, memory_order_acquire);
    memcpy(reason, s->world->hdr->abort_reason, sizeof reason);
    reason[sizeof reason - 1] = '\0';
    lt_comm_describe_(c, desc, sizeof desc);
    lt_comm_errf_(err, errlen, "%s on %s failed: rank %d aborted: %s", what, desc, r1 - 1, reason);
}

/* Barrier over the communicator's segment; `what` names the collective in messages. */
static int sync_ranks(lt_comm *c, const char *what, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    uint64_t k = ++s->bar_seq;
    atomic_store(&ctl_of(g, s->me)->arrive, k);
    uint64_t t = atomic_fetch_add(&g->hdr->total, 1) + 1;
    uint64_t target = k * (uint64_t)s->n;
    if (t >= target) seg_notify(g);
    wait_t w = {W_BARRIER, target, NULL, 0};
    int rc = shm_wait(s, &w);
    if (rc == 0) return 0;
    if (rc == 2) {
        abort_message(c, what, err, errlen);
        return -1;
    }
    if (rc == 3) {
        lt_comm_interrupted_(c, what, err, errlen);
        return -1;
    }
    int *late = malloc(sizeof(int) * (size_t)s->n), nl = 0;
    if (late)
        for (int r = 0; r < s->n; r++)
            if (atomic_load(&ctl_of(g, r)->arrive) < k) late[nl++] = c->world_ranks[r];
    char desc[256], lst[160];
    lt_comm_describe_(c, desc, sizeof desc);
    lt_comm_format_ranks_(late, nl, lst, sizeof lst);
    lt_comm_errf_(err, errlen, "%s on %s timed out after %.1f s: rank%s %s did not arrive", what, desc, s->timeout,
                  nl == 1 ? "" : "s", nl ? lst : "?");
    free(late);
    return -1;
}

/* ---- segments ---- */

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static void seg_unref(shm_seg *g) {
    if (!g || --g->refs > 0) return;
    munmap(g->base, g->size);
    free(g);
}

static void sanitize(char *out, size_t outlen, const char *in) {
    size_t i = 0;
    for (; in && in[i] && i + 1 < outlen; i++) {
        char ch = in[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                 ch == '_' || ch == '.';
        out[i] = ok ? ch : '_';
    }
    out[i] = '\0';
}

static size_t env_slot_bytes(void) {
    const char *e = getenv("LUATRON_SHM_SLOT_BYTES");
    if (e && *e) {
        char *end;
        unsigned long long v = strtoull(e, &end, 10);
        if (end != e && v > 0) return (size_t)v;
    }
    return DEFAULT_SLOT;
}

static int cpus_available(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Opens (creating) the segment `name` for n ranks, meets the other members and unlinks the name.
 * On success s->seg is set and s->bar_seq counts the creation barrier. */
static int seg_create(lt_comm *c, shm_comm *s, const char *name, size_t slot, char *err, size_t errlen) {
    int n = s->n;
    char desc[256];
    lt_comm_describe_(c, desc, sizeof desc);
    size_t min_slot = round_up(16 * (size_t)n + 64, 4096);
    if (slot < min_slot) slot = min_slot;
    slot = round_up(slot, 4096);
    size_t p2p = slot / 2 / (size_t)n / 4096 * 4096; /* a channel's half: (S/2)/N, whole pages */
    if (p2p < MIN_SLOT) p2p = MIN_SLOT;
    size_t per_rank = 2 * slot + 2 * (size_t)n * p2p;
    size_t ctl_bytes = round_up((size_t)n * CTL_BYTES, 4096);
    size_t chan_bytes = round_up((size_t)n * (size_t)n * CHAN_BYTES, 4096);
    size_t size = HDR_BYTES + ctl_bytes + chan_bytes + (size_t)n * per_rank;

    struct statvfs vfs;
    if (statvfs("/dev/shm", &vfs) == 0) {
        unsigned long long avail = (unsigned long long)vfs.f_bavail * vfs.f_frsize;
        if (avail < size) {
            lt_comm_errf_(err, errlen,
                          "creating %s: /dev/shm has %.1f MiB free, the segment needs %.1f MiB "
                          "(enlarge /dev/shm, e.g. docker --shm-size, or lower LUATRON_SHM_SLOT_BYTES)",
                          desc, avail / 1048576.0, size / 1048576.0);
            return -1;
        }
    }
    int fd = shm_open(name, O_RDWR | O_CREAT, 0600);
    if (fd < 0) {
        lt_comm_errf_(err, errlen, "creating %s: shm_open %s: %s", desc, name, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size != size && st.st_size != 0) {
        close(fd);
        lt_comm_errf_(err, errlen,
                      "creating %s: shared memory %s exists with another size (%lld bytes, expected %zu): "
                      "another job with the same id, or ranks with different LUATRON_SHM_SLOT_BYTES",
                      desc, name, (long long)st.st_size, size);
        return -1;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        lt_comm_errf_(err, errlen, "creating %s: ftruncate %s to %zu bytes: %s", desc, name, size, strerror(e));
        return -1;
    }
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        int e = errno;
        shm_unlink(name);
        lt_comm_errf_(err, errlen, "creating %s: mmap %s: %s", desc, name, strerror(e));
        return -1;
    }
    shm_seg *g = calloc(1, sizeof *g);
    if (!g) {
        munmap(base, size);
        shm_unlink(name);
        lt_comm_errf_(err, errlen, "creating %s: out of memory", desc);
        return -1;
    }
    g->refs = 1;
    g->base = base;
    g->size = size;
    g->hdr = (seg_hdr *)base;
    g->ctl = (rank_ctl *)((uint8_t *)base + HDR_BYTES);
    g->chan = (chan_ctl *)((uint8_t *)base + HDR_BYTES + ctl_bytes);
    g->data = (uint8_t *)base + HDR_BYTES + ctl_bytes + chan_bytes;
    g->n = n;
    g->slot = slot;
    g->p2p = p2p;
    g->per_rank = per_rank;
    s->seg = g;
    if (!s->world) s->world = g;

    uint64_t want[4] = {SHM_MAGIC, (uint64_t)n, slot, p2p};
    for (int i = 0; i < 4; i++) {
        uint64_t expected = 0;
        if (!atomic_compare_exchange_strong(&g->hdr->layout[i], &expected, want[i]) && expected != want[i]) {
            lt_comm_errf_(err, errlen,
                          "creating %s: shared memory %s has another layout (word %d is %llu, expected %llu): "
                          "another job with the same id, or ranks with different LUATRON_SHM_SLOT_BYTES",
                          desc, name, i, (unsigned long long)expected, (unsigned long long)want[i]);
            shm_unlink(name);
            return -1;
        }
    }
    if (atomic_load(&ctl_of(g, s->me)->arrive) != 0) { /* we have not arrived yet: stale segment */
        lt_comm_errf_(err, errlen,
                      "creating %s: shared memory %s was already joined by rank %d (left over from an earlier "
                      "run with the same job id, or two processes with the same rank); it is removed now, "
                      "start again with a fresh job id",
                      desc, name, c->world_ranks[s->me]);
        shm_unlink(name);
        return -1;
    }
    ctl_of(g, s->me)->pid = (int32_t)getpid();
    if (sync_ranks(c, "setup", err, errlen) != 0) {
        shm_unlink(name); /* nobody else may be left to do it */
        return -1;
    }
    if (s->me == 0) {
        shm_unlink(name);
        atomic_store(&g->hdr->unlinked, 1);
        seg_notify(g);
    } else {
        wait_t w = {W_UNLINKED, 0, NULL, 1}; /* member 0 raises it right after the barrier */
        int rc = shm_wait(s, &w);
        if (rc == 1) {
            shm_unlink(name);
            lt_comm_errf_(err, errlen, "creating %s timed out after %.1f s: rank %d did not finish creating it",
                          desc, s->timeout, c->world_ranks[0]);
            return -1;
        }
        if (rc == 2) {
            abort_message(c, "setup", err, errlen);
            return -1;
        }
    }
    return 0;
}

/* ---- reductions ---- */

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* same as lt_f32_to_bf16: nearest even, quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define TILE 1024

/* d1[i] (and d2[i]) = reduction over j = 0..n-1 in order of srcs[j][i], i < len. d2 may alias a
 * source: each tile is reduced completely before it is written. */
static void reduce_f32(int n, const void *const *srcs, int64_t len, lt_reduce_op op, float *d1, float *d2) {
    float acc[TILE];
    for (int64_t o = 0; o < len; o += TILE) {
        int m = (int)(len - o < TILE ? len - o : TILE);
        const float *s0 = (const float *)srcs[0] + o;
        for (int i = 0; i < m; i++) acc[i] = s0[i];
        for (int j = 1; j < n; j++) {
            const float *restrict sj = (const float *)srcs[j] + o;
            if (op == LT_REDUCE_MAX)
                for (int i = 0; i < m; i++) {
                    float x = sj[i], a = acc[i];
                    acc[i] = ((x > a) | (x != x)) ? x : a;
                }
            else
                for (int i = 0; i < m; i++) acc[i] += sj[i];
        }
        if (op == LT_REDUCE_AVG) {
            float fn = (float)n;
            for (int i = 0; i < m; i++) acc[i] /= fn;
        }
        if (d1) memcpy(d1 + o, acc, (size_t)m * 4);
        if (d2) memcpy(d2 + o, acc, (size_t)m * 4);
    }
}

static void reduce_bf16(int n, const void *const *srcs, int64_t len, lt_reduce_op op, uint16_t *d1, uint16_t *d2) {
    float acc[TILE];
    uint16_t out[TILE];
    for (int64_t o = 0; o < len; o += TILE) {
        int m = (int)(len - o < TILE ? len - o : TILE);
        const uint16_t *s0 = (const uint16_t *)srcs[0] + o;
        for (int i = 0; i < m; i++) acc[i] = bf2f(s0[i]);
        for (int j = 1; j < n; j++) {
            const uint16_t *restrict sj = (const uint16_t *)srcs[j] + o;
            if (op == LT_REDUCE_MAX)
                for (int i = 0; i < m; i++) {
                    float x = bf2f(sj[i]), a = acc[i];
                    acc[i] = ((x > a) | (x != x)) ? x : a;
                }
            else
                for (int i = 0; i < m; i++) acc[i] += bf2f(sj[i]);
        }
        if (op == LT_REDUCE_AVG) {
            float fn = (float)n;
            for (int i = 0; i < m; i++) acc[i] /= fn;
        }
        for (int i = 0; i < m; i++) out[i] = f2bf(acc[i]);
        if (d1) memcpy(d1 + o, out, (size_t)m * 2);
        if (d2) memcpy(d2 + o, out, (size_t)m * 2);
    }
}

#define REDUCE_INT(NAME, T, U)                                                                           \
    static void NAME(int n, const void *const *srcs, int64_t len, lt_reduce_op op, T *d1, T *d2) {       \
        T acc[TILE];                                                                                     \
        for (int64_t o = 0; o < len; o += TILE) {                                                        \
            int m = (int)(len - o < TILE ? len - o : TILE);                                              \
            const T *s0 = (const T *)srcs[0] + o;                                                        \
            for (int i = 0; i < m; i++) acc[i] = s0[i];                                                  \
            for (int j = 1; j < n; j++) {                                                                \
                const T *restrict sj = (const T *)srcs[j] + o;                                           \
                if (op == LT_REDUCE_MAX)                                                                 \
                    for (int i = 0; i < m; i++) acc[i] = sj[i] > acc[i] ? sj[i] : acc[i];                \
                else                                                                                     \
                    for (int i = 0; i < m; i++) acc[i] = (T)((U)acc[i] + (U)sj[i]);                      \
            }                                                                                            \
            if (op == LT_REDUCE_AVG)                                                                     \
                for (int i = 0; i < m; i++) acc[i] = (T)(acc[i] / (T)n);                                 \
            if (d1) memcpy(d1 + o, acc, (size_t)m * sizeof(T));                                          \
            if (d2) memcpy(d2 + o, acc, (size_t)m * sizeof(T));                                          \
        }                                                                                                \
    }
REDUCE_INT(reduce_i32, int32_t, uint32_t)
REDUCE_INT(reduce_i64, int64_t, uint64_t)

static void reduce(lt_dtype dt, int n, const void *const *srcs, int64_t len, lt_reduce_op op, void *d1, void *d2) {
    switch (dt) {
    case LT_F32: reduce_f32(n, srcs, len, op, d1, d2); break;
    case LT_BF16: reduce_bf16(n, srcs, len, op, d1, d2); break;
    case LT_I32: reduce_i32(n, srcs, len, op, d1, d2); break;
    case LT_I64: reduce_i64(n, srcs, len, op, d1, d2); break;
    }
}

/* ---- call headers ---- */

static void describe_call(const call_hdr *h, char *out, size_t outlen) {
    const char *dt = lt_dtype_name((lt_dtype)h->dtype);
    switch (h->kind) {
    case K_ALL_REDUCE:
    case K_REDUCE_SCATTER:
        snprintf(out, outlen, "%s(count %lld, %s, %s) as call %llu", kind_name(h->kind), (long long)h->count, dt,
                 lt_comm_op_name_((lt_reduce_op)h->op), (unsigned long long)h->call_seq);
        break;
    case K_BROADCAST:
        snprintf(out, outlen, "broadcast(count %lld, %s, root %d) as call %llu", (long long)h->count, dt, h->root,
                 (unsigned long long)h->call_seq);
        break;
    case K_ALL_GATHER:
        snprintf(out, outlen, "all_gather(count %lld, %s) as call %llu", (long long)h->count, dt,
                 (unsigned long long)h->call_seq);
        break;
    case K_ALL_TO_ALL:
        snprintf(out, outlen, "all_to_all(%s) as call %llu", dt, (unsigned long long)h->call_seq);
        break;
    default:
        snprintf(out, outlen, "%s as call %llu", kind_name(h->kind), (unsigned long long)h->call_seq);
    }
}

/* Starts a call: publishes its header in the half of the round about to begin. */
static call_hdr call_begin(shm_comm *s, int kind, lt_dtype dt, lt_reduce_op op, int root, int64_t count) {
    call_hdr h = {++s->call_seq, kind, (int32_t)dt, (int32_t)op, root, count};
    ctl_of(s->seg, s->me)->hdr[s->round & 1] = h;
    return h;
}

/* After the first barrier of a call: every rank's header of half h must equal ours. */
static int call_check(lt_comm *c, const call_hdr *mine, int h, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    for (int r = 0; r < s->n; r++) {
        call_hdr o = ctl_of(s->seg, r)->hdr[h];
        if (memcmp(&o, mine, sizeof o) == 0) continue;
        char desc[256], a[160], b[160];
        lt_comm_describe_(c, desc, sizeof desc);
        describe_call(&o, a, sizeof a);
        describe_call(mine, b, sizeof b);
        lt_comm_errf_(err, errlen, "%s on %s: ranks disagree: rank %d called %s, this rank (%d) called %s",
                      kind_name(mine->kind), desc, c->world_ranks[r], a, c->world_ranks[s->me], b);
        return -1;
    }
    return 0;
}

static int entry_check(lt_comm *c, const char *what, char *err, size_t errlen) {
    if (!aborted(impl(c))) return 0;
    abort_message(c, what, err, errlen);
    return -1;
}

/* ---- collectives ---- */

/* memcpy that accepts (NULL, 0) */
static inline void copy(void *dst, const void *src, size_t n) {
    if (n) memcpy(dst, src, n);
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Block r of a chunk of len elements: 64-byte aligned pieces, the last ones possibly shorter/empty. */
static void block_of(int64_t len, int n, size_t esz, int r, int64_t *start, int64_t *size) {
    int64_t unit = (int64_t)(64 / esz);
    int64_t bs = ceil_div(ceil_div(len, n), unit) * unit;
    int64_t a = bs * r, b = a + bs;
    if (a > len) a = len;
    if (b > len) b = len;
    *start = a;
    *size = b - a;
}

static uint8_t mine_dummy[64]; /* stands in for a NULL buffer of 0 elements */

static int shm_all_reduce(lt_comm *c, void *buf, int64_t count, lt_dtype dt, lt_reduce_op op, char *err,
                          size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (entry_check(c, "all_reduce", err, errlen)) return -1;
    size_t esz = lt_dtype_size(dt);
    int64_t chunk = (int64_t)(g->slot / esz);
    int64_t rounds = count > 0 ? ceil_div(count, chunk) : 1;
    call_hdr mine = call_begin(s, K_ALL_REDUCE, dt, op, 0, count);
    const void **srcs = malloc(sizeof(void *) * (size_t)s->n);
    if (!srcs) {
        lt_comm_errf_(err, errlen, "all_reduce: out of memory");
        return -1;
    }
    uint8_t *b = buf ? buf : mine_dummy;
    int rc = 0;
    for (int64_t k = 0; k < rounds && rc == 0; k++) {
        int h = (int)(s->round++ & 1);
        int64_t off = k * chunk, len = count - off < chunk ? count - off : chunk;
        if (len < 0) len = 0;
        int64_t ms, mz;
        block_of(len, s->n, esz, s->me, &ms, &mz);
        uint8_t *mine_slot = slot_of(g, s->me, h);
        /* everything but our own block, which we reduce straight from buf */
        copy(mine_slot, b + off * esz, (size_t)ms * esz);
        copy(mine_slot + (ms + mz) * esz, b + (off + ms + mz) * esz, (size_t)(len - ms - mz) * esz);
        if ((rc = sync_ranks(c, "all_reduce", err, errlen))) break;
        if (k == 0 && (rc = call_check(c, &mine, h, err, errlen))) break;
        if (len == 0) break;
        for (int j = 0; j < s->n; j++)
            srcs[j] = j == s->me ? (const void *)(b + (off + ms) * esz) : (const void *)(slot_of(g, j, h) + ms * esz);
        reduce(dt, s->n, srcs, mz, op, mine_slot + ms * esz, b + (off + ms) * esz);
        if ((rc = sync_ranks(c, "all_reduce", err, errlen))) break;
        for (int j = 0; j < s->n; j++) {
            if (j == s->me) continue;
            int64_t js, jz;
            block_of(len, s->n, esz, j, &js, &jz);
            copy(b + (off + js) * esz, slot_of(g, j, h) + js * esz, (size_t)jz * esz);
        }
    }
    free(srcs);
    return rc;
}

static int shm_reduce_scatter(lt_comm *c, const void *send, void *recv, int64_t rc_count, lt_dtype dt,
                              lt_reduce_op op, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (entry_check(c, "reduce_scatter", err, errlen)) return -1;
    size_t esz = lt_dtype_size(dt);
    int64_t chunk = (int64_t)(g->slot / (esz * (size_t)s->n));
    int64_t rounds = rc_count > 0 ? ceil_div(rc_count, chunk) : 1;
    call_hdr mine = call_begin(s, K_REDUCE_SCATTER, dt, op, 0, rc_count);
    const void **srcs = malloc(sizeof(void *) * (size_t)s->n);
    if (!srcs) {
        lt_comm_errf_(err, errlen, "reduce_scatter: out of memory");
        return -1;
    }
    const uint8_t *sb = send ? send : mine_dummy;
    uint8_t *rb = recv ? recv : mine_dummy;
    int rc = 0;
    for (int64_t k = 0; k < rounds && rc == 0; k++) {
        int h = (int)(s->round++ & 1);
        int64_t off = k * chunk, len = rc_count - off < chunk ? rc_count - off : chunk;
        if (len < 0) len = 0;
        uint8_t *ms = slot_of(g, s->me, h);
        for (int bl = 0; bl < s->n; bl++)
            if (bl != s->me) copy(ms + bl * len * esz, sb + (bl * rc_count + off) * esz, (size_t)len * esz);
        if ((rc = sync_ranks(c, "reduce_scatter", err, errlen))) break;
        if (k == 0 && (rc = call_check(c, &mine, h, err, errlen))) break;
        for (int j = 0; j < s->n; j++)
            srcs[j] = j == s->me ? (const void *)(sb + (s->me * rc_count + off) * esz)
                                 : (const void *)(slot_of(g, j, h) + s->me * len * esz);
        reduce(dt, s->n, srcs, len, op, rb + off * esz, NULL);
    }
    free(srcs);
    return rc;
}

static int shm_all_gather(lt_comm *c, const void *send, void *recv, int64_t sc, lt_dtype dt, char *err,
                          size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (entry_check(c, "all_gather", err, errlen)) return -1;
    size_t esz = lt_dtype_size(dt);
    int64_t chunk = (int64_t)(g->slot / esz);
    int64_t rounds = sc > 0 ? ceil_div(sc, chunk) : 1;
    call_hdr mine = call_begin(s, K_ALL_GATHER, dt, 0, 0, sc);
    const uint8_t *sb = send ? send : mine_dummy;
    uint8_t *rb = recv ? recv : mine_dummy;
    int in_place = sc > 0 && sb == rb + (size_t)s->me * (size_t)sc * esz;
    for (int64_t k = 0; k < rounds; k++) {
        int h = (int)(s->round++ & 1);
        int64_t off = k * chunk, len = sc - off < chunk ? sc - off : chunk;
        if (len < 0) len = 0;
        copy(slot_of(g, s->me, h), sb + off * esz, (size_t)len * esz);
        if (sync_ranks(c, "all_gather", err, errlen)) return -1;
        if (k == 0 && call_check(c, &mine, h, err, errlen)) return -1;
        for (int j = 0; j < s->n; j++) {
            uint8_t *dst = rb + ((size_t)j * (size_t)sc + (size_t)off) * esz;
            if (j == s->me) {
                if (!in_place) memmove(dst, sb + off * esz, (size_t)len * esz);
            } else {
                copy(dst, slot_of(g, j, h), (size_t)len * esz);
            }
        }
    }
    return 0;
}

static int shm_broadcast(lt_comm *c, void *buf, int64_t count, lt_dtype dt, int root, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (entry_check(c, "broadcast", err, errlen)) return -1;
    size_t esz = lt_dtype_size(dt);
    int64_t chunk = (int64_t)(g->slot / esz);
    int64_t rounds = count > 0 ? ceil_div(count, chunk) : 1;
    call_hdr mine = call_begin(s, K_BROADCAST, dt, 0, root, count);
    uint8_t *b = buf ? buf : mine_dummy;
    for (int64_t k = 0; k < rounds; k++) {
        int h = (int)(s->round++ & 1);
        int64_t off = k * chunk, len = count - off < chunk ? count - off : chunk;
        if (len < 0) len = 0;
        if (s->me == root) copy(slot_of(g, root, h), b + off * esz, (size_t)len * esz);
        if (sync_ranks(c, "broadcast", err, errlen)) return -1;
        if (k == 0 && call_check(c, &mine, h, err, errlen)) return -1;
        if (s->me != root) copy(b + off * esz, slot_of(g, root, h), (size_t)len * esz);
    }
    return 0;
}

static int shm_all_to_all(lt_comm *c, const void *send, const int64_t *scounts, void *recv, const int64_t *rcounts,
                          lt_dtype dt, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    int n = s->n, me = s->me;
    if (entry_check(c, "all_to_all", err, errlen)) return -1;
    size_t esz = lt_dtype_size(dt);
    call_hdr mine = call_begin(s, K_ALL_TO_ALL, dt, 0, 0, 0);
    /* round 0: the count matrix (send row then recv row of every rank) */
    int h = (int)(s->round++ & 1);
    int64_t *row = (int64_t *)slot_of(g, me, h);
    copy(row, scounts, sizeof(int64_t) * (size_t)n);
    copy(row + n, rcounts, sizeof(int64_t) * (size_t)n);
    if (sync_ranks(c, "all_to_all", err, errlen)) return -1;
    if (call_check(c, &mine, h, err, errlen)) return -1;
    int64_t q = (int64_t)(g->slot / ((size_t)n * esz)); /* elements per pair and round */
    int64_t maxc = 0;
    for (int a = 0; a < n; a++) {
        const int64_t *ra = (const int64_t *)slot_of(g, a, h);
        for (int b = 0; b < n; b++) {
            int64_t sent = ra[b], expect = ((const int64_t *)slot_of(g, b, h))[n + a];
            if (sent != expect) {
                char desc[256];
                lt_comm_describe_(c, desc, sizeof desc);
                lt_comm_errf_(err, errlen,
                              "all_to_all on %s: rank %d sends %lld elements to rank %d, which expects %lld",
                              desc, c->world_ranks[a], (long long)sent, c->world_ranks[b], (long long)expect);
                return -1;
            }
            if (sent > maxc) maxc = sent;
        }
    }
    int64_t rounds = ceil_div(maxc, q);
    int64_t *sdisp = malloc(sizeof(int64_t) * 2 * (size_t)n);
    if (!sdisp) {
        lt_comm_errf_(err, errlen, "all_to_all: out of memory");
        return -1;
    }
    int64_t *rdisp = sdisp + n;
    int64_t so = 0, ro = 0;
    for (int r = 0; r < n; r++) {
        sdisp[r] = so;
        rdisp[r] = ro;
        so += scounts[r];
        ro += rcounts[r];
    }
    const uint8_t *sb = send ? send : mine_dummy;
    uint8_t *rb = recv ? recv : mine_dummy;
    int rc = 0;
    for (int64_t k = 0; k < rounds; k++) {
        h = (int)(s->round++ & 1);
        int64_t off = k * q;
        uint8_t *ms = slot_of(g, me, h);
        for (int d = 0; d < n; d++) {
            int64_t len = scounts[d] - off < q ? scounts[d] - off : q;
            if (d == me || len <= 0) continue;
            copy(ms + (size_t)d * (size_t)q * esz, sb + (sdisp[d] + off) * esz, (size_t)len * esz);
        }
        if ((rc = sync_ranks(c, "all_to_all", err, errlen))) break;
        for (int src = 0; src < n; src++) {
            int64_t len = rcounts[src] - off < q ? rcounts[src] - off : q;
            if (len <= 0) continue;
            const uint8_t *from = src == me ? sb + (sdisp[me] + off) * esz : slot_of(g, src, h) + (size_t)me * (size_t)q * esz;
            memmove(rb + (rdisp[src] + off) * esz, from, (size_t)len * esz);
        }
    }
    free(sdisp);
    return rc;
}

static int shm_barrier(lt_comm *c, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    if (entry_check(c, "barrier", err, errlen)) return -1;
    call_hdr mine = call_begin(s, K_BARRIER, LT_F32, 0, 0, 0);
    int h = (int)(s->round++ & 1);
    if (sync_ranks(c, "barrier", err, errlen)) return -1;
    return call_check(c, &mine, h, err, errlen);
}

/* ---- point to point ---- */

/* One operation of a batch: its chunks are numbers first .. first + chunks - 1 of its channel. */
typedef struct {
    const lt_comm_p2p_op *op;
    int index; /* in the batch, for messages */
    int64_t bytes, chunks;
    uint64_t first;
    int64_t done; /* chunks posted (send) or copied out (recv) */
    int complete;
} p2p_item;

struct p2p_batch {
    int n;
    p2p_item *items;
};

static chan_ctl *item_chan(shm_comm *s, const p2p_item *it) {
    return it->op->kind == LT_P2P_SEND ? chan_of(s->seg, s->me, it->op->peer) : chan_of(s->seg, it->op->peer, s->me);
}

/* Whether the item can move now: a send can post its next chunk (the chunks before it on the
 * channel are posted and its half is free) or is finished (its last chunk acked); a receive's next
 * chunk has arrived and the chunks before it are copied out. */
static int item_can_move(shm_comm *s, const p2p_item *it) {
    if (it->complete) return 0;
    chan_ctl *ch = item_chan(s, it);
    uint64_t posted = atomic_load_explicit(&ch->posted, memory_order_acquire);
    uint64_t acked = atomic_load_explicit(&ch->acked, memory_order_acquire);
    uint64_t g = it->first + (uint64_t)it->done;
    if (it->op->kind == LT_P2P_SEND) {
        if (it->done < it->chunks) return posted == g - 1 && acked + 2 >= g;
        return acked >= it->first + (uint64_t)it->chunks - 1;
    }
    return posted >= g && acked == g - 1;
}

static int p2p_can_progress(shm_comm *s, const p2p_batch *b) {
    for (int i = 0; i < b->n; i++)
        if (item_can_move(s, &b->items[i])) return 1;
    return 0;
}

/* Moves the item as far as it can now: 1 if it moved, 0 if not, -1 (err set) when the sender's
 * message has another size than this receive. */
static int item_step(lt_comm *c, p2p_item *it, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    const lt_comm_p2p_op *op = it->op;
    int64_t q = (int64_t)g->p2p;
    int moved = 0;
    while (item_can_move(s, it)) {
        moved = 1;
        if (op->kind == LT_P2P_SEND && it->done == it->chunks) { /* the last chunk was acked */
            it->complete = 1;
            break;
        }
        uint64_t k = it->first + (uint64_t)it->done;
        int h = (int)(k & 1);
        int64_t off = it->done * q, len = it->bytes - off < q ? it->bytes - off : q;
        if (len < 0) len = 0;
        if (op->kind == LT_P2P_SEND) {
            chan_ctl *ch = chan_of(g, s->me, op->peer);
            const uint8_t *src = op->buf ? op->buf : mine_dummy; /* NULL for an empty message */
            copy(box_of(g, s->me, op->peer, h), src + off, (size_t)len);
            ch->msg_bytes[h] = it->bytes;
            ch->offset[h] = off;
            ch->len[h] = len;
            atomic_store_explicit(&ch->posted, k, memory_order_release);
            it->done++;
        } else {
            chan_ctl *ch = chan_of(g, op->peer, s->me);
            if (ch->msg_bytes[h] != it->bytes || ch->offset[h] != off || ch->len[h] != len) {
                char desc[256];
                lt_comm_describe_(c, desc, sizeof desc);
                lt_comm_errf_(err, errlen,
                              "recv from rank %d on %s: rank %d sent a message of %lld bytes, this rank expects %lld",
                              c->world_ranks[op->peer], desc, c->world_ranks[op->peer], (long long)ch->msg_bytes[h],
                              (long long)it->bytes);
                return -1;
            }
            uint8_t *dst = op->buf ? op->buf : mine_dummy;
            copy(dst + off, box_of(g, op->peer, s->me, h), (size_t)len);
            atomic_store_explicit(&ch->acked, k, memory_order_release);
            if (++it->done == it->chunks) it->complete = 1;
        }
        seg_notify(g); /* per chunk: the peer can go on with the next one while we copy */
    }
    return moved;
}

/* A batch that stopped moving: rc 3 interrupted (Ctrl-C), 2 aborted, 1 timed out (naming the peers
 * that did not move). */
static void p2p_fail(lt_comm *c, int rc, const char *what, const p2p_batch *b, char *err, size_t errlen) {
    char w[96];
    int single = strcmp(what, "batch_p2p") != 0; /* a blocking send or recv: a batch of one */
    if (single) {
        const lt_comm_p2p_op *op = b->items[0].op;
        snprintf(w, sizeof w, "%s %s rank %d", what, op->kind == LT_P2P_SEND ? "to" : "from",
                 c->world_ranks[op->peer]);
    } else {
        snprintf(w, sizeof w, "%s", what);
    }
    if (rc == 2) {
        abort_message(c, w, err, errlen);
        return;
    }
    if (rc == 3) {
        lt_comm_interrupted_(c, w, err, errlen);
        return;
    }
    char desc[256], lst[LT_COMM_ERR_MAX / 2] = "";
    size_t len = 0;
    for (int i = 0; i < b->n && len + 1 < sizeof lst; i++) {
        const p2p_item *it = &b->items[i];
        if (it->complete) continue;
        int send = it->op->kind == LT_P2P_SEND, peer = c->world_ranks[it->op->peer];
        if (single)
            len += (size_t)snprintf(lst + len, sizeof lst - len, "rank %d did not %s", peer, send ? "receive" : "send");
        else
            len += (size_t)snprintf(lst + len, sizeof lst - len, "%srank %d did not %s (operation %d: %s %s rank %d, %lld bytes)",
                                    len ? "; " : "", peer, send ? "receive" : "send", it->index, send ? "send" : "recv",
                                    send ? "to" : "from", peer, (long long)it->bytes);
    }
    lt_comm_describe_(c, desc, sizeof desc);
    lt_comm_errf_(err, errlen, "%s on %s timed out after %.1f s: %s", w, desc, impl(c)->timeout, lst);
}

static int shm_batch_p2p(lt_comm *c, const lt_comm_p2p_op *ops, int n, const char *what, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (entry_check(c, what, err, errlen)) return -1;
    p2p_item *items = calloc((size_t)n, sizeof *items);
    uint64_t *next = malloc(sizeof(uint64_t) * 2 * (size_t)s->n); /* last chunk number per channel: sends, recvs */
    if (!items || !next) {
        free(items);
        free(next);
        lt_comm_errf_(err, errlen, "%s: out of memory", what);
        return -1;
    }
    for (int p = 0; p < s->n; p++) {
        next[p] = atomic_load_explicit(&chan_of(g, s->me, p)->posted, memory_order_acquire);
        next[s->n + p] = atomic_load_explicit(&chan_of(g, p, s->me)->acked, memory_order_acquire);
    }
    /* chunk numbers in the order of the batch: this is what matches messages first in, first out */
    for (int i = 0; i < n; i++) {
        p2p_item *it = &items[i];
        it->op = &ops[i];
        it->index = i;
        it->bytes = ops[i].count * (int64_t)lt_dtype_size(ops[i].dtype);
        it->chunks = it->bytes > 0 ? ceil_div(it->bytes, (int64_t)g->p2p) : 1;
        uint64_t *nx = &next[(ops[i].kind == LT_P2P_SEND ? 0 : s->n) + ops[i].peer];
        it->first = *nx + 1;
        *nx += (uint64_t)it->chunks;
    }
    free(next);
    p2p_batch b = {n, items};
    int rc = 0;
    for (;;) {
        int moved = 0, pending = 0;
        for (int i = 0; i < n; i++) {
            if (items[i].complete) continue;
            int m = item_step(c, &items[i], err, errlen);
            if (m < 0) {
                rc = -1;
                goto out;
            }
            moved |= m;
            pending += !items[i].complete;
        }
        if (!pending) break;
        if (moved) continue;
        wait_t w = {W_P2P, 0, &b, 0};
        int r = shm_wait(s, &w);
        if (r) {
            p2p_fail(c, r, what, &b, err, errlen);
            rc = -1;
            break;
        }
    }
out:
    free(items);
    return rc;
}

/* ---- lifetime ---- */

static void shm_abort(lt_comm *c, const char *reason) {
    shm_comm *s = impl(c);
    seg_hdr *w = s->world->hdr;
    int expected = 0;
    if (atomic_compare_exchange_strong(&w->abort_claim, &expected, 1)) {
        snprintf(w->abort_reason, sizeof w->abort_reason, "%s", reason);
        atomic_store_explicit(&w->abort_rank1, c->world_ranks[s->me] + 1, memory_order_release);
    }
    seg_notify(s->world);
    if (s->seg != s->world) seg_notify(s->seg);
}

static void shm_free(lt_comm *c) {
    shm_comm *s = impl(c);
    if (!s) return;
    shm_seg *seg = s->seg, *world = s->world;
    if (seg && seg != world) seg_unref(seg);
    seg_unref(world);
    free(s);
    c->impl = NULL;
}

/* ---- resynchronisation after an interrupt (see the top of the file and comm.h) ---- */

/* The point-to-point part: on every channel of this rank, its own counter (posted on the channels
 * it sends on, acked on those it receives on) is raised to the larger of the channel's two. As
 * acked <= posted, both end at posted: a chunk nobody copied out counts as received, so the rest of
 * a message whose send was interrupted is dropped, and the next batch's chunk numbers (posted + 1
 * for the sender, acked + 1 for the receiver) agree again. */
static void p2p_resync(shm_comm *s) {
    for (int p = 0; p < s->n; p++) {
        if (p == s->me) continue;
        chan_ctl *out = chan_of(s->seg, s->me, p), *in = chan_of(s->seg, p, s->me);
        uint64_t op = atomic_load_explicit(&out->posted, memory_order_acquire);
        uint64_t oa = atomic_load_explicit(&out->acked, memory_order_acquire);
        if (oa > op) atomic_store_explicit(&out->posted, oa, memory_order_release);
        uint64_t ip = atomic_load_explicit(&in->posted, memory_order_acquire);
        uint64_t ia = atomic_load_explicit(&in->acked, memory_order_acquire);
        if (ip > ia) atomic_store_explicit(&in->acked, ip, memory_order_release);
    }
}

static int shm_resync(lt_comm *c, char *err, size_t errlen) {
    shm_comm *s = impl(c);
    shm_seg *g = s->seg;
    if (aborted(s)) {
        abort_message(c, "resynchronisation", err, errlen);
        return -1;
    }
    uint64_t k = 0, calls = 0;
    for (int r = 0; r < s->n; r++) {
        rank_ctl *p = ctl_of(g, r);
        uint64_t a = atomic_load_explicit(&p->arrive, memory_order_acquire);
        if (a > k) k = a;
        for (int h = 0; h < 2; h++)
            if (p->hdr[h].call_seq > calls) calls = p->hdr[h].call_seq;
    }
    if (k > s->bar_seq) {
        uint64_t behind = k - s->bar_seq;
        atomic_store(&ctl_of(g, s->me)->arrive, k);
        atomic_fetch_add(&g->hdr->total, behind);
        s->bar_seq = k;
    }
    s->call_seq = calls;
    s->round = 0;
    p2p_resync(s);
    seg_notify(g);
    return 0;
}

static void *shm_group(lt_comm *parent, lt_comm *child, char *err, size_t errlen);

static const lt_comm_ops shm_ops = {
    "shm",         shm_all_reduce, shm_reduce_scatter, shm_all_gather, shm_all_to_all, shm_broadcast,
    shm_batch_p2p, shm_barrier,    shm_abort,          shm_group,      shm_free,       shm_resync,
};

static void *shm_group(lt_comm *parent, lt_comm *child, char *err, size_t errlen) {
    shm_comm *ps = impl(parent);
    if (aborted(ps)) {
        abort_message(child, "setup", err, errlen);
        return NULL;
    }
    shm_comm *s = calloc(1, sizeof *s);
    if (!s) {
        lt_comm_errf_(err, errlen, "group '%s': out of memory", child->name);
        return NULL;
    }
    s->me = child->rank;
    s->n = child->size;
    s->timeout = ps->timeout;
    s->spin_s = ps->spin_s;
    s->yields = ps->yields;
    s->world = ps->world;
    s->world->refs++;
    /* name: job, group name, FNV-1a of the world ranks */
    uint64_t hash = 1469598103934665603ull;
    for (int i = 0; i < child->size; i++) {
        uint32_t v = (uint32_t)child->world_ranks[i];
        for (int k = 0; k < 4; k++) hash = (hash ^ ((v >> (8 * k)) & 0xff)) * 1099511628211ull;
    }
    hash = (hash ^ (uint64_t)child->size) * 1099511628211ull;
    char nm[LT_COMM_NAME_MAX], name[256];
    sanitize(nm, sizeof nm, child->name);
    memcpy(s->job, ps->job, sizeof s->job);
    snprintf(name, sizeof name, "/luatron-%s-g-%s-%016llx", s->job, nm, (unsigned long long)hash);
    child->impl = s;
    if (seg_create(child, s, name, s->world->slot, err, errlen) != 0) {
        child->impl = NULL;
        if (s->seg && s->seg != s->world) seg_unref(s->seg);
        seg_unref(s->world);
        free(s);
        return NULL;
    }
    child->impl = NULL; /* set by lt_comm_group from our return value */
    return s;
}

lt_comm *lt_comm_shm_world(const lt_comm_world_info *info, char *err, size_t errlen) {
    if (!info || info->world_size < 1 || info->rank < 0 || info->rank >= info->world_size) {
        lt_comm_errf_(err, errlen, "lt_comm_shm_world: invalid rank %d of world size %d", info ? info->rank : -1,
                      info ? info->world_size : 0);
        return NULL;
    }
    char job[80];
    sanitize(job, sizeof job, info->job_id);
    if (!job[0]) {
        lt_comm_errf_(err, errlen, "lt_comm_shm_world: empty job id");
        return NULL;
    }
    lt_comm *c = lt_comm_alloc_(&shm_ops, info->rank, info->world_size, NULL, "world",
                                info->timeout_s > 0 ? info->timeout_s : DEFAULT_TIMEOUT_S);
    shm_comm *s = c ? calloc(1, sizeof *s) : NULL;
    if (!s) {
        lt_comm_free_shell_(c);
        lt_comm_errf_(err, errlen, "lt_comm_shm_world: out of memory");
        return NULL;
    }
    s->me = info->rank;
    s->n = info->world_size;
    s->timeout = c->timeout_s;
    int local = info->local_size > 0 ? info->local_size : info->world_size;
    int over = local > cpus_available();
    s->spin_s = over ? 0 : DEFAULT_SPIN_US * 1e-6;
    s->yields = over ? 1 : 4;
    const char *spin_env = getenv("LUATRON_SHM_SPIN_US");
    if (spin_env && *spin_env) s->spin_s = atof(spin_env) * 1e-6;
    c->impl = s;
    memcpy(s->job, job, sizeof s->job);
    char name[160];
    snprintf(name, sizeof name, "/luatron-%s-world", job);
    if (seg_create(c, s, name, env_slot_bytes(), err, errlen) != 0) {
        if (s->seg) seg_unref(s->seg);
        free(s);
        lt_comm_free_shell_(c);
        return NULL;
    }
    return c;
}

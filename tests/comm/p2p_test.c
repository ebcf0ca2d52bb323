/* engine/comm, shm backend: point-to-point in batches (lt_comm_batch_p2p and its async form) with
 * real processes (fork): the exchange patterns of pipeline schedules (pairwise with both ranks
 * sending first, ring, Megatron's 1F1B schedule over 4 ranks, the interleaved schedule's four-way
 * exchange), messages of several chunks, FIFO matching of several messages to one peer, byte
 * statistics, and the failures (timeout naming the peer, size mismatch, abort, blocking sends to
 * each other). Every message's element i is a function of (sender, receiver, tag, i), checked
 * element by element by the receiver. */
#include "tests/comm/harness.h"

#include "engine/core/tensor.h"

static int32_t val(int src, int dst, int tag, int64_t i) {
    uint64_t h = ((uint64_t)src * 1000003u) ^ ((uint64_t)dst * 7919u << 20) ^ ((uint64_t)tag << 40) ^ (uint64_t)i;
    h = (h ^ (h >> 31)) * 0x9e3779b97f4a7c15ull;
    return (int32_t)(h >> 33);
}

static int32_t *message(int src, int dst, int tag, int64_t count) {
    int32_t *b = malloc((size_t)(count + 1) * 4);
    for (int64_t i = 0; i < count; i++) b[i] = val(src, dst, tag, i);
    return b;
}

/* 1 when buf holds message (src, dst, tag); otherwise records the first wrong element. */
static int check_msg(rank_ctx *ctx, const int32_t *buf, int src, int dst, int tag, int64_t count, const char *what) {
    for (int64_t i = 0; i < count; i++)
        if (buf[i] != val(src, dst, tag, i)) {
            rank_fail(ctx, __LINE__, "%s: message %d from rank %d, element %lld of %lld is %d, expected %d", what, tag,
                      src, (long long)i, (long long)count, buf[i], val(src, dst, tag, i));
            return 0;
        }
    return 1;
}

static lt_comm_p2p_op op_send(void *b, int64_t n, int peer) { return (lt_comm_p2p_op){LT_P2P_SEND, b, n, LT_I32, peer}; }
static lt_comm_p2p_op op_recv(void *b, int64_t n, int peer) { return (lt_comm_p2p_op){LT_P2P_RECV, b, n, LT_I32, peer}; }

/* The mailbox of a channel holds 2 halves of Q bytes; with LUATRON_SHM_SLOT_BYTES=4096, Q = 4096. */
#define Q_SMALL 4096

/* ---- pairwise exchange, both ranks send first, several sizes (up to 3x the mailbox) ---- */
static void rank_pairwise(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, peer = me ^ 1;
    /* 0, 1 element, exactly one half, one half + 1, 3 x the mailbox (6 halves) + a bit; other
     * sizes each way so a mix-up of the two directions shows */
    const int64_t counts[] = {0, 1, Q_SMALL / 4, Q_SMALL / 4 + 1, 3 * 2 * Q_SMALL / 4 + 37};
    for (int k = 0; k < 5 && peer < ctx->n; k++) {
        int64_t mine = counts[k] + me, theirs = counts[k] + peer;
        int32_t *s = message(me, peer, k, mine), *r = malloc((size_t)(theirs + 1) * 4);
        lt_comm_p2p_op ops[2] = {op_send(s, mine, peer), op_recv(r, theirs, peer)};
        int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
        RCHECK(ctx, rc == 0, "pairwise exchange of %lld/%lld elements: %s", (long long)mine, (long long)theirs, err);
        if (rc == 0) check_msg(ctx, r, peer, me, k, theirs, "pairwise");
        free(s);
        free(r);
        if (rc) break;
    }
    lt_comm_free(c);
}

/* ---- ring: every rank sends to the next and receives from the previous at once ---- */
static void rank_ring(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, n = ctx->n, next = (me + 1) % n, prev = (me + n - 1) % n;
    int64_t count = 5 * Q_SMALL / 4 + 3; /* several chunks */
    for (int it = 0; it < 6; it++) {
        int32_t *s = message(me, next, it, count), *r = malloc((size_t)count * 4);
        /* half the iterations post the receive first: the order within a batch does not matter */
        lt_comm_p2p_op ops[2] = {op_send(s, count, next), op_recv(r, count, prev)};
        if (it & 1) {
            lt_comm_p2p_op t = ops[0];
            ops[0] = ops[1];
            ops[1] = t;
        }
        int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
        RCHECK(ctx, rc == 0, "ring iteration %d: %s", it, err);
        if (rc == 0) check_msg(ctx, r, prev, me, it, count, "ring");
        free(s);
        free(r);
        if (rc) break;
    }
    lt_comm_free(c);
}

/* ---- Megatron's 1F1B schedule (forward_backward_pipelining_without_interleaving) ----
 * Stage r of P, M microbatches: warm-up min(P - r - 1, M) forwards (recv_forward, send_forward),
 * then the steady state (send_forward_recv_backward with the next stage, send_backward_recv_forward
 * with the previous one: both directions with the same peer at once), then the cool-down
 * backwards. An activation of microbatch m leaving stage r is message (r, r+1, m); a gradient is
 * message (r, r-1, 1000 + m); each stage checks every message it receives. */
typedef struct {
    rank_ctx *ctx;
    lt_comm *c;
    int me, P;
    int64_t count;
    int fails;
} pipe_t;

/* One p2p step: optional send and receive with each neighbour (tag < 0: none). */
static void pipe_step(pipe_t *p, int send_next, int recv_next, int send_prev, int recv_prev) {
    if (p->fails) return;
    lt_comm_p2p_op ops[4];
    int n = 0, me = p->me;
    int32_t *bufs[4] = {0}, *rnext = NULL, *rprev = NULL;
    char err[512] = "";
    if (me == p->P - 1) send_next = recv_next = -1;
    if (me == 0) send_prev = recv_prev = -1;
    if (send_next >= 0) ops[n++] = op_send(bufs[0] = message(me, me + 1, send_next, p->count), p->count, me + 1);
    if (recv_next >= 0) ops[n++] = op_recv(rnext = bufs[1] = malloc((size_t)p->count * 4), p->count, me + 1);
    if (send_prev >= 0) ops[n++] = op_send(bufs[2] = message(me, me - 1, send_prev, p->count), p->count, me - 1);
    if (recv_prev >= 0) ops[n++] = op_recv(rprev = bufs[3] = malloc((size_t)p->count * 4), p->count, me - 1);
    int rc = n == 1 && ops[0].kind == LT_P2P_SEND ? lt_comm_send(p->c, ops[0].buf, p->count, LT_I32, ops[0].peer, err, sizeof err)
             : n == 1 ? lt_comm_recv(p->c, ops[0].buf, p->count, LT_I32, ops[0].peer, err, sizeof err)
                      : lt_comm_batch_p2p(p->c, ops, n, err, sizeof err);
    if (rc) {
        rank_fail(p->ctx, __LINE__, "stage %d, step (send_next %d, recv_next %d, send_prev %d, recv_prev %d): %s", me,
                  send_next, recv_next, send_prev, recv_prev, err);
        p->fails++;
    } else {
        if (rnext && !check_msg(p->ctx, rnext, me + 1, me, recv_next, p->count, "1f1b gradient")) p->fails++;
        if (rprev && !check_msg(p->ctx, rprev, me - 1, me, recv_prev, p->count, "1f1b activation")) p->fails++;
    }
    for (int i = 0; i < 4; i++) free(bufs[i]);
}

static void rank_1f1b(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    const int M = 7;
    pipe_t p = {ctx, c, ctx->rank, ctx->n, 3 * Q_SMALL / 4 + 5, 0};
    int P = p.P, r = p.me;
    int warm = P - r - 1 < M ? P - r - 1 : M, rest = M - warm;
    enum { G = 1000 }; /* gradient tags */
    int fwd = 0, bwd = 0; /* next microbatch to run forward / backward */
    for (int i = 0; i < warm; i++) {
        pipe_step(&p, -1, -1, -1, fwd); /* recv_forward */
        pipe_step(&p, fwd, -1, -1, -1); /* send_forward */
        fwd++;
    }
    if (rest > 0) pipe_step(&p, -1, -1, -1, fwd); /* recv_forward */
    for (int i = 0; i < rest; i++) {
        /* forward of microbatch fwd, then send_forward_recv_backward */
        pipe_step(&p, fwd, G + bwd, -1, -1);
        fwd++;
        /* backward of microbatch bwd, then send_backward (last) or send_backward_recv_forward */
        if (i == rest - 1) pipe_step(&p, -1, -1, G + bwd, -1);
        else pipe_step(&p, -1, -1, G + bwd, fwd);
        bwd++;
    }
    for (int i = 0; i < warm; i++) {
        pipe_step(&p, -1, G + bwd, -1, -1); /* recv_backward */
        pipe_step(&p, -1, -1, G + bwd, -1); /* send_backward */
        bwd++;
    }
    RCHECK(ctx, fwd == M && bwd == M, "ran %d forwards and %d backwards of %d", fwd, bwd, M);
    lt_comm_free(c);
}

/* ---- the interleaved schedule's exchange: send to next and prev, receive from prev and next,
 * all four at once, on a ring (the last stage's next model chunk is on stage 0) ---- */
static void rank_four_way(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, n = ctx->n, next = (me + 1) % n, prev = (me + n - 1) % n;
    for (int it = 0; it < 5; it++) {
        /* activations and gradients of different sizes: a swap of the two would be caught */
        int64_t ca = 2 * Q_SMALL / 4 + 11 + it, cg = Q_SMALL / 4 + 7 + it;
        int32_t *sa = message(me, next, it, ca), *sg = message(me, prev, 100 + it, cg);
        int32_t *ra = malloc((size_t)ca * 4), *rg = malloc((size_t)cg * 4);
        lt_comm_p2p_op ops[4] = {op_send(sa, ca, next), op_send(sg, cg, prev), op_recv(ra, ca, prev),
                                 op_recv(rg, cg, next)};
        int rc = lt_comm_batch_p2p(c, ops, 4, err, sizeof err);
        RCHECK(ctx, rc == 0, "four-way iteration %d: %s", it, err);
        if (rc == 0) {
            check_msg(ctx, ra, prev, me, it, ca, "four-way activation");
            check_msg(ctx, rg, next, me, 100 + it, cg, "four-way gradient");
        }
        free(sa);
        free(sg);
        free(ra);
        free(rg);
        if (rc) break;
    }
    lt_comm_free(c);
}

/* ---- FIFO: several messages to one peer in flight match in order; statistics ---- */
static void rank_fifo(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank;
    const int64_t counts[4] = {3, 2 * Q_SMALL / 4 + 9, 0, 17}; /* sizes differ: a reordering fails */
    lt_comm_reset_stats(c);
    if (me == 0) {
        /* four messages to rank 1 in one batch, a fifth one to rank 2 between them, then two more
         * to rank 1 with blocking sends: all in order */
        int32_t *m[4], *x = message(0, 2, 9, 50);
        lt_comm_p2p_op ops[5];
        for (int k = 0; k < 4; k++) m[k] = message(0, 1, k, counts[k]);
        ops[0] = op_send(m[0], counts[0], 1);
        ops[1] = op_send(m[1], counts[1], 1);
        ops[2] = op_send(x, 50, 2);
        ops[3] = op_send(m[2], counts[2], 1);
        ops[4] = op_send(m[3], counts[3], 1);
        int rc = lt_comm_batch_p2p(c, ops, 5, err, sizeof err);
        RCHECK(ctx, rc == 0, "fifo batch: %s", err);
        int32_t *y = message(0, 1, 4, 100), *z = message(0, 1, 5, 1);
        if (rc == 0) rc = lt_comm_send(c, y, 100, LT_I32, 1, err, sizeof err);
        if (rc == 0) rc = lt_comm_send(c, z, 1, LT_I32, 1, err, sizeof err);
        RCHECK(ctx, rc == 0, "fifo sends: %s", err);
        lt_comm_stats st = lt_comm_get_stats(c);
        uint64_t bytes = 4 * (uint64_t)(counts[0] + counts[1] + counts[2] + counts[3] + 50 + 100 + 1);
        RCHECK(ctx, st.calls == 7 && st.bytes == bytes, "stats: %llu calls, %llu bytes; expected 7 and %llu",
               (unsigned long long)st.calls, (unsigned long long)st.bytes, (unsigned long long)bytes);
        for (int k = 0; k < 4; k++) free(m[k]);
        free(x);
        free(y);
        free(z);
    } else if (me == 1) {
        /* the receiver: the first two in one batch, the rest in a second batch that also receives
         * the two blocking sends, all posted at once */
        int32_t *r[6];
        const int64_t rc6[6] = {counts[0], counts[1], counts[2], counts[3], 100, 1};
        for (int k = 0; k < 6; k++) r[k] = malloc((size_t)(rc6[k] + 1) * 4);
        lt_comm_p2p_op a[2] = {op_recv(r[0], rc6[0], 0), op_recv(r[1], rc6[1], 0)};
        lt_comm_p2p_op b[4] = {op_recv(r[2], rc6[2], 0), op_recv(r[3], rc6[3], 0), op_recv(r[4], rc6[4], 0),
                               op_recv(r[5], rc6[5], 0)};
        int rc = lt_comm_batch_p2p(c, a, 2, err, sizeof err);
        if (rc == 0) rc = lt_comm_batch_p2p(c, b, 4, err, sizeof err);
        RCHECK(ctx, rc == 0, "fifo receives: %s", err);
        if (rc == 0)
            for (int k = 0; k < 6; k++) check_msg(ctx, r[k], 0, 1, k, rc6[k], "fifo");
        lt_comm_stats st = lt_comm_get_stats(c);
        RCHECK(ctx, st.calls == 6 && st.bytes == 0, "receiver stats: %llu calls, %llu bytes; expected 6 and 0",
               (unsigned long long)st.calls, (unsigned long long)st.bytes);
        for (int k = 0; k < 6; k++) free(r[k]);
    } else if (me == 2) {
        int32_t *r = malloc(50 * 4);
        int rc = lt_comm_recv(c, r, 50, LT_I32, 0, err, sizeof err);
        RCHECK(ctx, rc == 0, "fifo: rank 2: %s", err);
        if (rc == 0) check_msg(ctx, r, 0, 2, 9, 50, "fifo to rank 2");
        free(r);
    }
    /* an empty batch is nothing: no call counted */
    lt_comm_stats before = lt_comm_get_stats(c);
    int rc = lt_comm_batch_p2p(c, NULL, 0, err, sizeof err);
    lt_comm_stats after = lt_comm_get_stats(c);
    RCHECK(ctx, rc == 0 && after.calls == before.calls, "empty batch: rc %d, calls %llu -> %llu", rc,
           (unsigned long long)before.calls, (unsigned long long)after.calls);
    rc = lt_comm_barrier(c, err, sizeof err);
    RCHECK(ctx, rc == 0, "barrier after p2p: %s", err);
    lt_comm_free(c);
}

/* ---- the async form: the exchange runs while the caller computes ---- */
static void rank_async(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, peer = me ^ 1;
    int64_t count = 4 * Q_SMALL / 4 + 1;
    for (int it = 0; it < 3; it++) {
        int32_t *s = message(me, peer, it, count), *r = malloc((size_t)count * 4);
        lt_comm_p2p_op ops[2] = {op_send(s, count, peer), op_recv(r, count, peer)};
        lt_comm_request *q = lt_comm_batch_p2p_async(c, ops, 2);
        memset(ops, 0, sizeof ops); /* the request copied them */
        volatile double x = 0;
        for (int i = 0; i < 200000; i++) x += i * 0.5; /* "compute" */
        for (int spins = 0; !lt_comm_test(q) && spins < 100000; spins++) usleep(100);
        RCHECK(ctx, lt_comm_test(q), "the async exchange did not finish");
        int rc = lt_comm_wait(q, err, sizeof err);
        RCHECK(ctx, rc == 0, "async exchange %d: %s", it, err);
        if (rc == 0) check_msg(ctx, r, peer, me, it, count, "async");
        free(s);
        free(r);
    }
    lt_comm_stats st = lt_comm_get_stats(c);
    RCHECK(ctx, st.calls == 6 && st.bytes == 3 * (uint64_t)count * 4, "async stats: %llu calls, %llu bytes",
           (unsigned long long)st.calls, (unsigned long long)st.bytes);
    lt_comm_free(c);
}

/* ---- the default layout: a 5 MB exchange through the default mailbox size ---- */
static void rank_big(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, peer = me ^ 1;
    int64_t count = 1300000 + 17 * me, theirs = 1300000 + 17 * peer;
    int32_t *s = message(me, peer, 0, count), *r = malloc((size_t)theirs * 4);
    lt_comm_p2p_op ops[2] = {op_recv(r, theirs, peer), op_send(s, count, peer)};
    int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
    RCHECK(ctx, rc == 0, "5 MB exchange: %s", err);
    if (rc == 0) check_msg(ctx, r, peer, me, 0, theirs, "5 MB exchange");
    free(s);
    free(r);
    lt_comm_free(c);
}

/* ---- on groups: pipeline groups {0,2} and {1,3} exchange while the world also carries traffic;
 * group ranks are peers, messages name world ranks ---- */
static void rank_groups(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int me = ctx->rank, mates[2] = {me & 1, (me & 1) + 2};
    lt_comm *pp = lt_comm_group(c, mates, 2, "pp", err, sizeof err);
    RCHECK(ctx, pp != NULL, "group: %s", err);
    if (pp) {
        int gp = 1 - lt_comm_rank(pp), wpeer = mates[gp];
        int64_t count = 3 * Q_SMALL / 4;
        for (int it = 0; it < 3; it++) {
            /* in the group: both send first; in the world: a ring at the same time (two batches) */
            int32_t *s = message(me, wpeer, it, count), *r = malloc((size_t)count * 4);
            lt_comm_p2p_op ops[2] = {op_send(s, count, gp), op_recv(r, count, gp)};
            int rc = lt_comm_batch_p2p(pp, ops, 2, err, sizeof err);
            RCHECK(ctx, rc == 0, "group exchange: %s", err);
            if (rc == 0) check_msg(ctx, r, wpeer, me, it, count, "group exchange");
            int next = (me + 1) % ctx->n, prev = (me + ctx->n - 1) % ctx->n;
            int32_t *s2 = message(me, next, 50 + it, 99), *r2 = malloc(99 * 4);
            lt_comm_p2p_op ring[2] = {op_send(s2, 99, next), op_recv(r2, 99, prev)};
            rc = lt_comm_batch_p2p(c, ring, 2, err, sizeof err);
            RCHECK(ctx, rc == 0, "world ring: %s", err);
            if (rc == 0) check_msg(ctx, r2, prev, me, 50 + it, 99, "world ring");
            free(s), free(r), free(s2), free(r2);
        }
        lt_comm_free(pp);
    }
    lt_comm_free(c);
}

/* ---- random batches: every step, messages between random pairs of random sizes (several per
 * pair), each rank posting its operations of the step in a random order that keeps the order of
 * the messages of each pair; every message checked ---- */
static uint64_t rnd(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void rank_random(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    enum { STEPS = 40, MAXM = 12 };
    int me = ctx->rank, n = ctx->n;
    uint64_t shared_seed = 0x2545F4914F6CDD1Dull, mine = 0x9E3779B97F4A7C15ull * (uint64_t)(me + 1);
    for (int step = 0; step < STEPS; step++) {
        /* the step's messages, the same list on every rank */
        int src[MAXM], dst[MAXM], nm = 1 + (int)(rnd(&shared_seed) % MAXM);
        int64_t cnt[MAXM];
        for (int m = 0; m < nm; m++) {
            src[m] = (int)(rnd(&shared_seed) % (uint64_t)n);
            dst[m] = (src[m] + 1 + (int)(rnd(&shared_seed) % (uint64_t)(n - 1))) % n;
            uint64_t k = rnd(&shared_seed) % 4;
            cnt[m] = k == 0 ? 0 : k == 1 ? (int64_t)(rnd(&shared_seed) % 64) : (int64_t)(rnd(&shared_seed) % (4 * Q_SMALL));
        }
        lt_comm_p2p_op ops[MAXM], shuf[MAXM];
        int which[MAXM], no = 0; /* message index of each op */
        int32_t *bufs[MAXM] = {0};
        for (int m = 0; m < nm; m++) {
            if (src[m] == me) {
                bufs[no] = message(me, dst[m], step * 100 + m, cnt[m]);
                ops[no] = op_send(bufs[no], cnt[m], dst[m]);
            } else if (dst[m] == me) {
                bufs[no] = malloc((size_t)(cnt[m] + 1) * 4);
                ops[no] = op_recv(bufs[no], cnt[m], src[m]);
            } else {
                continue;
            }
            which[no++] = m;
        }
        /* a random order of the ops, then each channel's ops put back in their own order into the
         * places its ops took */
        int perm[MAXM], wperm[MAXM];
        for (int i = 0; i < no; i++) perm[i] = i;
        for (int i = no - 1; i > 0; i--) {
            int j = (int)(rnd(&mine) % (uint64_t)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        int used[MAXM] = {0};
        for (int pos = 0; pos < no; pos++) {
            const lt_comm_p2p_op *o = &ops[perm[pos]];
            int first = -1; /* the earliest not yet placed op of this channel */
            for (int i = 0; i < no && first < 0; i++)
                if (!used[i] && ops[i].kind == o->kind && ops[i].peer == o->peer) first = i;
            used[first] = 1;
            shuf[pos] = ops[first];
            wperm[pos] = first;
        }
        int rc = lt_comm_batch_p2p(c, shuf, no, err, sizeof err);
        RCHECK(ctx, rc == 0, "random step %d (%d operations): %s", step, no, err);
        for (int pos = 0; pos < no && rc == 0; pos++) {
            int i = wperm[pos], m = which[i];
            if (ops[i].kind == LT_P2P_RECV && !check_msg(ctx, bufs[i], src[m], me, step * 100 + m, cnt[m], "random")) rc = -1;
        }
        for (int i = 0; i < no; i++) free(bufs[i]);
        if (rc) break;
    }
    lt_comm_free(c);
}

/* ---- failures ---- */

/* Rank 0 receives from rank 1, which never sends: a prompt timeout naming rank 1. */
static void rank_no_sender(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    if (ctx->rank == 0) {
        int32_t a[8], b[8];
        int32_t *s = message(0, 2, 0, 8);
        /* rank 2 receives; rank 1 sends nothing */
        lt_comm_p2p_op ops[2] = {op_send(s, 8, 2), op_recv(a, 8, 1)};
        double t0 = now_s();
        int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
        double dt = now_s() - t0;
        RCHECK(ctx, rc != 0 && strstr(err, "timed out") && strstr(err, "rank 1 did not send") &&
                        strstr(err, "operation 1") && !strstr(err, "rank 2 did not"),
               "batch with a missing sender: %s", rc ? err : "succeeded");
        RCHECK(ctx, dt < ctx->timeout + 1.5, "timed out after %.2f s (timeout %.2f)", dt, ctx->timeout);
        snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
        rc = lt_comm_recv(c, b, 8, LT_I32, 1, err, sizeof err);
        RCHECK(ctx, rc != 0 && strstr(err, "unusable"), "after the timeout the communicator is unusable: %s", err);
        free(s);
    } else if (ctx->rank == 2) {
        int32_t r[8];
        int rc = lt_comm_recv(c, r, 8, LT_I32, 0, err, sizeof err);
        RCHECK(ctx, rc == 0, "rank 2's receive: %s", err);
        if (rc == 0) check_msg(ctx, r, 0, 2, 0, 8, "no_sender");
    } else {
        usleep((useconds_t)(ctx->timeout * 2e6)); /* alive, but sends nothing */
    }
    lt_comm_free(c);
}

/* Both ranks call the blocking send first: each times out naming the other (documented). */
static void rank_blocking_cross(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int peer = ctx->rank ^ 1;
    int32_t *s = message(ctx->rank, peer, 0, 10);
    int rc = lt_comm_send(c, s, 10, LT_I32, peer, err, sizeof err);
    char want[64];
    snprintf(want, sizeof want, "send to rank %d", peer);
    RCHECK(ctx, rc != 0 && strstr(err, want) && strstr(err, "timed out") && strstr(err, "did not receive"),
           "blocking sends to each other: %s", rc ? err : "succeeded");
    if (ctx->rank == 0) snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    free(s);
    lt_comm_free(c);
}

/* The receiver expects another size than the sender sends: the receiver names both sizes. */
static void rank_size_mismatch(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int32_t buf[32] = {0};
    if (ctx->rank == 0) {
        int rc = lt_comm_send(c, buf, 20, LT_I32, 1, err, sizeof err);
        RCHECK(ctx, rc != 0, "the sender of a mismatched message must fail (timeout)");
    } else {
        int rc = lt_comm_recv(c, buf, 30, LT_I32, 0, err, sizeof err);
        RCHECK(ctx, rc != 0 && strstr(err, "80 bytes") && strstr(err, "expects 120"), "size mismatch: %s",
               rc ? err : "succeeded");
        snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    }
    lt_comm_free(c);
}

/* Rank 1 aborts while rank 0 waits in a batch: rank 0 fails promptly with the reason. */
static void rank_abort(rank_ctx *ctx) {
    char err[512] = "";
    lt_comm *c = make_world(ctx, err, sizeof err);
    if (!c) {
        RCHECK(ctx, 0, "world: %s", err);
        return;
    }
    int32_t a[4], b[4] = {0};
    if (ctx->rank == 0) {
        lt_comm_p2p_op ops[2] = {op_send(b, 4, 1), op_recv(a, 4, 1)};
        double t0 = now_s();
        int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
        double dt = now_s() - t0;
        RCHECK(ctx, rc != 0 && strstr(err, "rank 1 aborted") && strstr(err, "stage 3 ran out of memory") &&
                        strstr(err, "batch_p2p"),
               "abort during a batch: %s", rc ? err : "succeeded");
        RCHECK(ctx, dt < ctx->timeout / 2, "the abort took %.2f s to arrive (timeout %.1f)", dt, ctx->timeout);
        snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    } else {
        usleep(300000);
        lt_comm_abort(c, "stage 3 ran out of memory");
    }
    lt_comm_free(c);
}

/* Argument errors name the operation and leave the communicator usable (no ranks needed). */
static void test_arguments(void) {
    rank_ctx ctx;
    rank_result res;
    memset(&ctx, 0, sizeof ctx);
    memset(&res, 0, sizeof res);
    ctx.n = 1; /* a world of one: every peer is oneself, which the argument checks refuse */
    ctx.timeout = 5;
    ctx.out = &res;
    snprintf(ctx.job, sizeof ctx.job, "t%d-args", (int)getpid());
    char err[512] = "";
    lt_comm *c = make_world(&ctx, err, sizeof err);
    TAP_CHECK(c != NULL, "a world of one: %s", c ? "ok" : err);
    if (!c) return;
    int32_t x[4] = {0};
    lt_comm_p2p_op ops[2] = {op_send(x, 4, 0), op_recv(x, 4, 0)};
    int rc = lt_comm_batch_p2p(c, ops, 2, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "operation 0") && strstr(err, "peer 0 is not another rank"),
              "a batch sending to oneself is refused, naming the operation: %s", err);
    ops[0] = (lt_comm_p2p_op){(lt_p2p_kind)7, x, 4, LT_I32, 0};
    rc = lt_comm_batch_p2p(c, ops, 1, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "unknown kind 7"), "an unknown kind is refused: %s", err);
    ops[0] = (lt_comm_p2p_op){LT_P2P_RECV, x, -3, LT_I32, 0};
    rc = lt_comm_batch_p2p(c, ops, 1, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "negative count -3"), "a negative count is refused: %s", err);
    rc = lt_comm_batch_p2p(c, NULL, 2, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "no operations"), "ops NULL with n > 0 is refused: %s", err);
    lt_comm_request *q = lt_comm_batch_p2p_async(c, ops, -1);
    rc = lt_comm_wait(q, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "negative number of operations"), "async: errors surface at wait: %s", err);
    rc = lt_comm_barrier(c, err, sizeof err);
    TAP_CHECK(rc == 0, "argument errors leave the communicator usable: %s", rc ? err : "ok");
    lt_comm_free(c);
}

static void set_slot(const char *v) {
    if (v) setenv("LUATRON_SHM_SLOT_BYTES", v, 1);
    else unsetenv("LUATRON_SHM_SLOT_BYTES");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    double t_start = now_s();
    test_arguments();
    char label[256];
    set_slot("4096"); /* one mailbox half per channel is 4 KiB: messages above it go in chunks */

    run_status st = run_ranks(2, 5.0, rank_pairwise, NULL, 30);
    report_run("pairwise exchange, both ranks sending first in one batch: 0, 1, 1024, 1025 and 3 x the "
               "mailbox + 37 elements, checked element by element", 2, &st, 0);
    st = run_ranks(4, 5.0, rank_pairwise, NULL, 30);
    report_run("pairwise exchange in two pairs at once (4 ranks)", 4, &st, 0);

    for (int n = 2; n <= 4; n++) {
        st = run_ranks(n, 5.0, rank_ring, NULL, 30);
        snprintf(label, sizeof label, "ring of %d: send to next and receive from prev at once, 6 times, 5 chunks "
                 "each, receive or send posted first", n);
        report_run(label, n, &st, 0);
    }

    st = run_ranks(4, 5.0, rank_1f1b, NULL, 60);
    report_run("Megatron's 1F1B over 4 stages, 7 microbatches: warm-up, steady state "
               "(send_forward_recv_backward / send_backward_recv_forward), cool-down; every tensor checked",
               4, &st, 0);
    st = run_ranks(2, 5.0, rank_1f1b, NULL, 60);
    report_run("Megatron's 1F1B over 2 stages, 7 microbatches", 2, &st, 0);

    st = run_ranks(4, 5.0, rank_four_way, NULL, 30);
    report_run("interleaved four-way exchange on 4 ranks (send next + prev, receive prev + next at once), "
               "activations and gradients of different sizes", 4, &st, 0);
    st = run_ranks(2, 5.0, rank_four_way, NULL, 30);
    report_run("four-way exchange on 2 ranks (next and prev are the same peer)", 2, &st, 0);

    st = run_ranks(4, 5.0, rank_groups, NULL, 30);
    report_run("groups {0,2} and {1,3}: exchange within the group (group ranks as peers), a world ring beside it",
               4, &st, 0);

    for (int n = 2; n <= 4; n++) {
        st = run_ranks(n, 5.0, rank_random, NULL, 60);
        snprintf(label, sizeof label, "%d ranks, 40 steps of random messages (0 to 64 KiB: up to 16 chunks; several per pair) "
                 "posted in random order keeping each pair's order", n);
        report_run(label, n, &st, 0);
    }

    st = run_ranks(3, 5.0, rank_fifo, NULL, 30);
    report_run("several messages to one peer in flight (one batch, then blocking sends) match in FIFO order, "
               "across the receiver's batches; calls and bytes counted per operation", 3, &st, 0);

    st = run_ranks(2, 5.0, rank_async, NULL, 30);
    report_run("lt_comm_batch_p2p_async: exchange while computing, lt_comm_test then lt_comm_wait", 2, &st, 0);

    set_slot(NULL);
    st = run_ranks(2, 5.0, rank_big, NULL, 30);
    report_run("a 5 MB exchange through the default mailbox size", 2, &st, 0);

    set_slot("4096");
    st = run_ranks(3, 0.5, rank_no_sender, NULL, 30);
    report_run("a receive without a sender times out promptly naming the rank; the other operations of the "
               "batch complete", 3, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(2, 0.5, rank_blocking_cross, NULL, 30);
    report_run("blocking sends to each other first time out on both ranks naming the peer (use a batch)", 2, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(2, 0.5, rank_size_mismatch, NULL, 30);
    report_run("a receive of another size than the message fails naming both sizes", 2, &st, 0);
    printf("#   %s\n", shared_results[1].err);

    st = run_ranks(2, 10.0, rank_abort, NULL, 30);
    report_run("an abort reaches a rank waiting in a batch promptly, with the reason", 2, &st, 0);
    printf("#   %s\n", shared_results[0].err);
    set_slot(NULL);

    char names[1024];
    int left = leftover_segments(names, sizeof names);
    TAP_CHECK(left == 0, "no /dev/shm/luatron-* segments left (%d: %s)", left, names);
    printf("# %.2f s\n", now_s() - t_start);
    return tap_done();
}

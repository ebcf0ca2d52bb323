/* engine/comm, shm backend: collectives, point to point, groups, statistics and failure handling,
 * with N = 2, 3, 4, 8 real processes (fork) per world. Every rank's data is a deterministic
 * function of its rank; each rank recomputes the expected result locally (adding contributions in
 * rank order, like the contract says) and the parent compares result hashes across ranks and runs. */
#include "tests/comm/harness.h"

#include <math.h>
#include <sys/time.h>

#include "engine/core/tensor.h"

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Element i of rank r's input for test `salt`: floats of varied magnitude (so the order of the
 * additions matters), integers of varied sign. */
static float val_f(int salt, int r, int64_t i) {
    uint64_t h = mix(((uint64_t)salt << 48) ^ ((uint64_t)r << 40) ^ (uint64_t)i);
    float m = (float)((int)(h % 20001) - 10000) / 1000.0f;
    return ldexpf(m, (int)((h >> 32) % 24) - 12);
}
static int64_t val_i(int salt, int r, int64_t i, lt_dtype dt) {
    uint64_t h = mix(((uint64_t)salt << 48) ^ ((uint64_t)r << 40) ^ (uint64_t)i ^ 0x5555);
    if (dt == LT_I32) return (int32_t)(h % 4000001) - 2000000;
    return (int64_t)(h >> 1) - (int64_t)(h >> 2) * 2; /* large, both signs; sums wrap */
}

static void fill(void *buf, int64_t count, lt_dtype dt, int salt, int r) {
    for (int64_t i = 0; i < count; i++) {
        switch (dt) {
        case LT_F32: ((float *)buf)[i] = val_f(salt, r, i); break;
        case LT_BF16: ((uint16_t *)buf)[i] = lt_f32_to_bf16(val_f(salt, r, i)); break;
        case LT_I32: ((int32_t *)buf)[i] = (int32_t)val_i(salt, r, i, dt); break;
        case LT_I64: ((int64_t *)buf)[i] = val_i(salt, r, i, dt); break;
        }
    }
}

/* The reduction over ranks 0..n-1 (in order) of element i, as raw bits in *out (esz bytes). */
static void expect_elem(void *out, int64_t i, lt_dtype dt, lt_reduce_op op, int salt, int n,
                        const int *members) {
    if (dt == LT_F32 || dt == LT_BF16) {
        float acc = 0;
        for (int j = 0; j < n; j++) {
            int r = members ? members[j] : j;
            float x = val_f(salt, r, i);
            if (dt == LT_BF16) x = lt_bf16_to_f32(lt_f32_to_bf16(x));
            if (j == 0) acc = x;
            else if (op == LT_REDUCE_MAX) acc = ((x > acc) | (x != x)) ? x : acc;
            else acc += x;
        }
        if (op == LT_REDUCE_AVG) acc /= (float)n;
        if (dt == LT_F32) memcpy(out, &acc, 4);
        else {
            uint16_t h = lt_f32_to_bf16(acc);
            memcpy(out, &h, 2);
        }
    } else {
        uint64_t acc = 0;
        int64_t mx = 0;
        for (int j = 0; j < n; j++) {
            int r = members ? members[j] : j;
            int64_t x = val_i(salt, r, i, dt);
            if (dt == LT_I32) acc = (uint32_t)((uint32_t)acc + (uint32_t)x);
            else acc += (uint64_t)x;
            if (j == 0 || x > mx) mx = x;
        }
        if (dt == LT_I32) {
            int32_t v = op == LT_REDUCE_MAX ? (int32_t)mx : (int32_t)(uint32_t)acc;
            if (op == LT_REDUCE_AVG) v = v / n;
            memcpy(out, &v, 4);
        } else {
            int64_t v = op == LT_REDUCE_MAX ? mx : (int64_t)acc;
            if (op == LT_REDUCE_AVG) v = v / n;
            memcpy(out, &v, 8);
        }
    }
}

/* First index where buf differs from the expected reduction, or -1. */
static int64_t check_reduced(const void *buf, int64_t count, int64_t first, lt_dtype dt, lt_reduce_op op, int salt,
                             int n, const int *members) {
    size_t esz = lt_dtype_size(dt);
    uint8_t e[8];
    for (int64_t i = 0; i < count; i++) {
        expect_elem(e, first + i, dt, op, salt, n, members);
        if (memcmp(e, (const uint8_t *)buf + i * esz, esz) != 0) return i;
    }
    return -1;
}

static const char *op_name(lt_reduce_op op) { return op == LT_REDUCE_SUM ? "sum" : op == LT_REDUCE_AVG ? "avg" : "max"; }

static const lt_dtype DTYPES[4] = {LT_F32, LT_BF16, LT_I32, LT_I64};
static const lt_reduce_op OPS[3] = {LT_REDUCE_SUM, LT_REDUCE_AVG, LT_REDUCE_MAX};

/* ---- all_reduce: every dtype, op, a few counts ---- */

static void rank_all_reduce(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    const int64_t counts[] = {0, 1, 7, 1000, 5003};
    void *buf = malloc(5003 * 8), *again = malloc(5003 * 8);
    uint64_t h = FNV0;
    int salt = 0;
    for (int d = 0; d < 4; d++)
        for (int o = 0; o < 3; o++)
            for (int k = 0; k < 5; k++) {
                lt_dtype dt = DTYPES[d];
                int64_t n = counts[k];
                size_t esz = lt_dtype_size(dt);
                salt++;
                fill(buf, n, dt, salt, ctx->rank);
                int rc = lt_comm_all_reduce(c, buf, n, dt, OPS[o], err, sizeof err);
                RCHECK(ctx, rc == 0, "all_reduce %s %s %lld: %s", lt_dtype_name(dt), op_name(OPS[o]),
                       (long long)n, err);
                if (rc) goto out;
                int64_t bad = check_reduced(buf, n, 0, dt, OPS[o], salt, ctx->n, NULL);
                RCHECK(ctx, bad < 0, "all_reduce %s %s count %lld differs at %lld", lt_dtype_name(dt),
                       op_name(OPS[o]), (long long)n, (long long)bad);
                /* same call again: bit-identical */
                fill(again, n, dt, salt, ctx->rank);
                rc = lt_comm_all_reduce(c, again, n, dt, OPS[o], err, sizeof err);
                RCHECK(ctx, rc == 0 && memcmp(buf, again, (size_t)n * esz) == 0, "second all_reduce differs");
                h = fnv(h, buf, (size_t)n * esz);
            }
    ctx->out->hash[0] = h;
out:
    free(buf);
    free(again);
    lt_comm_free(c);
}

/* ---- the other collectives, point to point, barrier, statistics ---- */

static void rank_collectives(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    int n = ctx->n, me = ctx->rank;
    uint64_t bytes = 0, calls = 0;
    lt_comm_reset_stats(c);
    RCHECK(ctx, lt_comm_rank(c) == me && lt_comm_size(c) == n && strcmp(lt_comm_name(c), "world") == 0 &&
                    lt_comm_world_rank(c, n - 1) == n - 1,
           "rank/size/name");
    uint64_t h = FNV0;
    int salt = 1000;

    /* reduce_scatter */
    {
        const int64_t rcs[] = {0, 1, 5, 700};
        const struct { lt_dtype dt; lt_reduce_op op; } cases[] = {
            {LT_F32, LT_REDUCE_SUM}, {LT_BF16, LT_REDUCE_AVG}, {LT_I64, LT_REDUCE_MAX}, {LT_I32, LT_REDUCE_SUM}};
        for (int ci = 0; ci < 4; ci++)
            for (int k = 0; k < 4; k++) {
                lt_dtype dt = cases[ci].dt;
                int64_t rc_ = rcs[k];
                size_t esz = lt_dtype_size(dt);
                void *send = malloc((size_t)(n * rc_ + 1) * esz), *recv = malloc((size_t)(rc_ + 1) * esz);
                fill(send, n * rc_, dt, ++salt, me);
                int rc = lt_comm_reduce_scatter(c, send, recv, rc_, dt, cases[ci].op, err, sizeof err);
                RCHECK(ctx, rc == 0, "reduce_scatter: %s", err);
                if (rc == 0) {
                    int64_t bad = check_reduced(recv, rc_, me * rc_, dt, cases[ci].op, salt, n, NULL);
                    RCHECK(ctx, bad < 0, "reduce_scatter %s %lld differs at %lld", lt_dtype_name(dt), (long long)rc_,
                           (long long)bad);
                    bytes += (uint64_t)(n - 1) * (uint64_t)rc_ * esz;
                    calls++;
                }
                free(send);
                free(recv);
                if (rc) goto out;
            }
    }
    /* all_gather, also in place */
    {
        const int64_t scs[] = {0, 3, 2000};
        for (int k = 0; k < 3; k++)
            for (int inplace = 0; inplace < 2; inplace++) {
                lt_dtype dt = k == 1 ? LT_I32 : LT_F32;
                int64_t sc = scs[k];
                size_t esz = lt_dtype_size(dt);
                uint8_t *recv = malloc((size_t)(n * sc + 1) * esz), *send = malloc((size_t)(sc + 1) * esz);
                uint8_t *mine = inplace ? recv + (size_t)me * (size_t)sc * esz : send;
                fill(mine, sc, dt, ++salt, me);
                int rc = lt_comm_all_gather(c, mine, recv, sc, dt, err, sizeof err);
                RCHECK(ctx, rc == 0, "all_gather: %s", err);
                if (rc == 0) {
                    uint8_t *exp = malloc((size_t)(sc + 1) * esz);
                    for (int r = 0; r < n; r++) {
                        fill(exp, sc, dt, salt, r);
                        RCHECK(ctx, memcmp(exp, recv + (size_t)r * (size_t)sc * esz, (size_t)sc * esz) == 0,
                               "all_gather count %lld inplace %d: block %d differs", (long long)sc, inplace, r);
                    }
                    free(exp);
                    h = fnv(h, recv, (size_t)(n * sc) * esz);
                    bytes += (uint64_t)(n - 1) * (uint64_t)sc * esz;
                    calls++;
                }
                free(recv);
                free(send);
                if (rc) goto out;
            }
    }
    /* all_to_all with uneven counts (zeros, and more than a round holds) */
    {
        int64_t sc[MAX_RANKS], rcn[MAX_RANKS], stot = 0, rtot = 0;
        for (int d = 0; d < n; d++) {
#define A2A_COUNT(s, d) ((((s) * 3 + (d) * 5) % 4 == 0) ? 0 : (int64_t)(((s) + 1) * ((d) + 2) * 37 % 900))
            sc[d] = A2A_COUNT(me, d);
            rcn[d] = A2A_COUNT(d, me);
            stot += sc[d];
            rtot += rcn[d];
        }
        int32_t *send = malloc((size_t)(stot + 1) * 4), *recv = malloc((size_t)(rtot + 1) * 4);
        for (int d = 0, o = 0; d < n; d++)
            for (int64_t i = 0; i < sc[d]; i++) send[o++] = me * 1000000 + d * 1000 + (int32_t)i;
        int rc = lt_comm_all_to_all(c, send, sc, recv, rcn, LT_I32, err, sizeof err);
        RCHECK(ctx, rc == 0, "all_to_all: %s", err);
        if (rc == 0) {
            for (int s = 0, o = 0; s < n; s++)
                for (int64_t i = 0; i < rcn[s]; i++, o++)
                    if (recv[o] != s * 1000000 + me * 1000 + (int32_t)i) {
                        rank_fail(ctx, __LINE__, "all_to_all: from %d element %lld is %d", s, (long long)i, recv[o]);
                        s = n;
                        break;
                    }
            for (int d = 0; d < n; d++)
                if (d != me) bytes += (uint64_t)sc[d] * 4;
            calls++;
        }
        free(send);
        free(recv);
        if (rc) goto out;
    }
    /* broadcast from every root */
    for (int root = 0; root < n; root++) {
        lt_dtype dt = root % 2 ? LT_BF16 : LT_F32;
        int64_t count = 3000 + root;
        size_t esz = lt_dtype_size(dt);
        void *buf = malloc((size_t)count * esz), *exp = malloc((size_t)count * esz);
        fill(buf, count, dt, ++salt, me);
        fill(exp, count, dt, salt, root);
        int rc = lt_comm_broadcast(c, buf, count, dt, root, err, sizeof err);
        RCHECK(ctx, rc == 0 && memcmp(buf, exp, (size_t)count * esz) == 0, "broadcast from %d: %s", root,
               rc ? err : "data differs");
        if (rc == 0) {
            bytes += (uint64_t)count * esz;
            calls++;
        }
        free(buf);
        free(exp);
        if (rc) goto out;
    }
    /* point to point: a chain 0 -> 1 -> ... -> n-1 (each adds its rank), then a ring closing to 0 */
    {
        int64_t count = 5000;
        float *buf = malloc((size_t)count * 4);
        int rc = 0;
        if (me == 0) {
            fill(buf, count, LT_F32, ++salt, 0);
            rc = lt_comm_send(c, buf, count, LT_F32, 1, err, sizeof err);
            if (!rc) rc = lt_comm_recv(c, buf, count, LT_F32, n - 1, err, sizeof err);
            calls += 2;
            bytes += (uint64_t)count * 4;
        } else {
            ++salt;
            rc = lt_comm_recv(c, buf, count, LT_F32, me - 1, err, sizeof err);
            for (int64_t i = 0; i < count; i++) buf[i] += (float)me;
            if (!rc) rc = lt_comm_send(c, buf, count, LT_F32, (me + 1) % n, err, sizeof err);
            calls += 2;
            bytes += (uint64_t)count * 4;
        }
        RCHECK(ctx, rc == 0, "chain/ring: %s", err);
        if (rc == 0 && me == 0) {
            int ok = 1;
            for (int64_t i = 0; i < count && ok; i++) {
                float x = val_f(salt, 0, i);
                for (int r = 1; r < n; r++) x += (float)r;
                ok = memcmp(&x, &buf[i], 4) == 0;
            }
            RCHECK(ctx, ok, "ring came back different");
        }
        free(buf);
        if (rc) goto out;
    }
    /* pairwise exchange (partners r ^ 1, the lower sends first), different sizes each way */
    if ((me ^ 1) < n) {
        int peer = me ^ 1;
        int64_t mine = 100 + 2000 * me, theirs = 100 + 2000 * peer;
        int64_t *s = malloc((size_t)mine * 8), *r = malloc((size_t)theirs * 8);
        fill(s, mine, LT_I64, 77, me);
        int rc;
        if (me < peer) {
            rc = lt_comm_send(c, s, mine, LT_I64, peer, err, sizeof err);
            if (!rc) rc = lt_comm_recv(c, r, theirs, LT_I64, peer, err, sizeof err);
        } else {
            rc = lt_comm_recv(c, r, theirs, LT_I64, peer, err, sizeof err);
            if (!rc) rc = lt_comm_send(c, s, mine, LT_I64, peer, err, sizeof err);
        }
        calls += 2;
        bytes += (uint64_t)mine * 8;
        int64_t *e = malloc((size_t)theirs * 8);
        fill(e, theirs, LT_I64, 77, peer);
        RCHECK(ctx, rc == 0 && memcmp(e, r, (size_t)theirs * 8) == 0, "pairwise exchange: %s",
               rc ? err : "data differs");
        free(s);
        free(r);
        free(e);
        if (rc) goto out;
    }
    /* fan-out: rank 0 sends to 1, 2, ... in turn (several chunks each) while all of them are already
     * waiting, so most see rank 0's mailbox addressed to someone else first */
    {
        int64_t count = 3000;
        int32_t *buf = malloc((size_t)count * 4);
        int rc = 0;
        if (me == 0) {
            for (int d = 1; d < n && rc == 0; d++) {
                for (int64_t i = 0; i < count; i++) buf[i] = d * 100000 + (int32_t)i;
                rc = lt_comm_send(c, buf, count, LT_I32, d, err, sizeof err);
                calls++;
                bytes += (uint64_t)count * 4;
            }
        } else {
            rc = lt_comm_recv(c, buf, count, LT_I32, 0, err, sizeof err);
            calls++;
            int ok = 1;
            for (int64_t i = 0; i < count && rc == 0 && ok; i++) ok = buf[i] == me * 100000 + (int32_t)i;
            RCHECK(ctx, ok, "fan-out: wrong data");
        }
        RCHECK(ctx, rc == 0, "fan-out: %s", err);
        free(buf);
        if (rc) goto out;
    }
    /* a zero-size message still pairs up */
    if (n >= 2 && me < 2) {
        int rc = me == 0 ? lt_comm_send(c, NULL, 0, LT_F32, 1, err, sizeof err)
                         : lt_comm_recv(c, NULL, 0, LT_F32, 0, err, sizeof err);
        RCHECK(ctx, rc == 0, "empty message: %s", err);
        calls++;
    }
    /* barrier: everybody's flag is up afterwards */
    for (int round = 1; round <= 3; round++) {
        ctx->all[me].val[0] = round;
        __sync_synchronize();
        int rc = lt_comm_barrier(c, err, sizeof err);
        RCHECK(ctx, rc == 0, "barrier: %s", err);
        calls++;
        for (int r = 0; r < n; r++)
            RCHECK(ctx, ctx->all[r].val[0] >= round, "after barrier %d rank %d's flag is %g", round, r,
                   ctx->all[r].val[0]);
        rc = lt_comm_barrier(c, err, sizeof err); /* nobody raises the flag again before all have looked */
        RCHECK(ctx, rc == 0, "barrier: %s", err);
        calls++;
    }
    /* statistics: ring formulas */
    {
        int64_t count = 4099;
        float *buf = malloc((size_t)count * 4);
        fill(buf, count, LT_F32, 5, me);
        int rc = lt_comm_all_reduce(c, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
        RCHECK(ctx, rc == 0, "all_reduce: %s", err);
        calls++;
        bytes += 2 * (uint64_t)(n - 1) * (uint64_t)count * 4 / (uint64_t)n;
        free(buf);
        lt_comm_stats st = lt_comm_get_stats(c);
        RCHECK(ctx, st.bytes == bytes && st.calls == calls && st.seconds > 0,
               "stats: bytes %llu (expected %llu), calls %llu (expected %llu), %g s", (unsigned long long)st.bytes,
               (unsigned long long)bytes, (unsigned long long)st.calls, (unsigned long long)calls, st.seconds);
        lt_comm_reset_stats(c);
        st = lt_comm_get_stats(c);
        RCHECK(ctx, st.bytes == 0 && st.calls == 0 && st.seconds == 0, "reset stats");
    }
    ctx->out->hash[0] = h;
out:
    lt_comm_free(c);
}

/* ---- groups ---- */

static void rank_groups(rank_ctx *ctx) {
    char err[512];
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    int me = ctx->rank; /* world of 4 */
    /* parity groups {0,2} {1,3} and halves {0,1} {2,3}, used alternately */
    int par[2] = {me % 2, me % 2 + 2}, half[2] = {me / 2 * 2, me / 2 * 2 + 1};
    lt_comm *dp = lt_comm_group(w, par, 2, "dp", err, sizeof err);
    RCHECK(ctx, dp, "group dp: %s", err);
    lt_comm *tp = lt_comm_group(w, half, 2, "tp", err, sizeof err);
    RCHECK(ctx, tp, "group tp: %s", err);
    if (!dp || !tp) goto out;
    RCHECK(ctx, lt_comm_size(dp) == 2 && lt_comm_rank(dp) == me / 2 && strcmp(lt_comm_name(dp), "dp") == 0 &&
                    lt_comm_world_rank(dp, 1) == par[1],
           "dp rank/size/name/world rank");
    RCHECK(ctx, lt_comm_rank(tp) == me % 2 && lt_comm_world_rank(tp, 0) == half[0], "tp rank/world rank");
    for (int it = 0; it < 6; it++) {
        lt_comm *g = it % 2 ? tp : dp;
        int *members = it % 2 ? half : par;
        int64_t count = 1500 + 100 * it;
        float *buf = malloc((size_t)count * 4);
        fill(buf, count, LT_F32, 300 + it, me);
        int rc = lt_comm_all_reduce(g, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
        RCHECK(ctx, rc == 0, "group all_reduce: %s", err);
        if (rc == 0) {
            int64_t bad = check_reduced(buf, count, 0, LT_F32, LT_REDUCE_SUM, 300 + it, 2, members);
            RCHECK(ctx, bad < 0, "%s all_reduce differs at %lld", lt_comm_name(g), (long long)bad);
        }
        free(buf);
        if (rc) goto out;
    }
    /* the world still works between group calls */
    int64_t one = 1;
    int rc = lt_comm_all_reduce(w, &one, 1, LT_I64, LT_REDUCE_SUM, err, sizeof err);
    RCHECK(ctx, rc == 0 && one == 4, "world all_reduce after groups: %s", rc ? err : "wrong value");
    /* a group of a group: ranks given as dp ranks, world ranks come out */
    int both[2] = {0, 1};
    lt_comm *sub = lt_comm_group(dp, both, 2, "sub", err, sizeof err);
    RCHECK(ctx, sub && lt_comm_world_rank(sub, 1) == par[1], "group of a group: %s", sub ? "world ranks" : err);
    if (sub) {
        int64_t v = me;
        rc = lt_comm_all_reduce(sub, &v, 1, LT_I64, LT_REDUCE_MAX, err, sizeof err);
        RCHECK(ctx, rc == 0 && v == par[1], "sub all_reduce: %s", rc ? err : "wrong value");
        lt_comm_free(sub);
    }
    /* singleton groups, three-rank groups, and the same group again after freeing it */
    int self = me;
    lt_comm *solo = lt_comm_group(w, &self, 1, "self", err, sizeof err);
    RCHECK(ctx, solo, "singleton: %s", err);
    if (solo) {
        float x = 1.5f;
        rc = lt_comm_all_reduce(solo, &x, 1, LT_F32, LT_REDUCE_AVG, err, sizeof err);
        RCHECK(ctx, rc == 0 && x == 1.5f, "singleton all_reduce");
        lt_comm_free(solo);
    }
    if (me != 2) {
        int three[3] = {0, 1, 3};
        for (int again = 0; again < 2; again++) {
            lt_comm *t = lt_comm_group(w, three, 3, "three", err, sizeof err);
            RCHECK(ctx, t, "three: %s", err);
            if (!t) break;
            int32_t v = me + again;
            rc = lt_comm_all_reduce(t, &v, 1, LT_I32, LT_REDUCE_SUM, err, sizeof err);
            RCHECK(ctx, rc == 0 && v == 4 + 3 * again, "three all_reduce (%d): %s", again, rc ? err : "wrong value");
            lt_comm_free(t);
        }
    }
    /* bad lists are refused locally */
    int notme[1] = {(me + 1) % 4}, unsorted[2] = {3, 0};
    RCHECK(ctx, !lt_comm_group(w, notme, 1, "x", err, sizeof err) && strstr(err, "not in the list"),
           "a group without the caller is refused: %s", err);
    RCHECK(ctx, !lt_comm_group(w, unsorted, 2, "x", err, sizeof err) && strstr(err, "ascending"),
           "an unsorted group is refused: %s", err);
    rc = lt_comm_barrier(w, err, sizeof err);
    RCHECK(ctx, rc == 0, "final barrier: %s", err);
out:
    lt_comm_free(tp);
    lt_comm_free(dp);
    lt_comm_free(w);
}

/* ---- failures ---- */

/* Rank n-1 skips an all_reduce; the others must time out naming it. */
static void rank_skip(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float x[10] = {0};
    if (ctx->rank == ctx->n - 1) { /* wait until the others have given up, then leave */
        usleep((useconds_t)((ctx->timeout + 1.0) * 1e6));
        lt_comm_free(c);
        return;
    }
    double t0 = now_s();
    int rc = lt_comm_all_reduce(c, x, 10, LT_F32, LT_REDUCE_SUM, err, sizeof err);
    double dt = now_s() - t0;
    char want[64];
    snprintf(want, sizeof want, "rank %d did not arrive", ctx->n - 1);
    RCHECK(ctx, rc != 0 && strstr(err, want) && strstr(err, "timed out") && strstr(err, "all_reduce") &&
                    strstr(err, "'world'"),
           "expected a timeout naming rank %d, got rc %d: %s", ctx->n - 1, rc, err);
    RCHECK(ctx, dt >= ctx->timeout * 0.9 && dt < ctx->timeout + 1.5, "timed out after %.2f s (timeout %.2f)", dt,
           ctx->timeout);
    snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    /* unusable afterwards, promptly */
    t0 = now_s();
    rc = lt_comm_barrier(c, err, sizeof err);
    RCHECK(ctx, rc != 0 && strstr(err, "unusable") && now_s() - t0 < 0.1, "after a failure: %s", err);
    lt_comm_free(c);
}

/* Rank 1 calls broadcast while the others call all_reduce: all fail, naming the odd one. */
static void rank_mismatch(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    float x[10] = {0};
    int rc = ctx->rank == 1 ? lt_comm_broadcast(c, x, 10, LT_F32, 0, err, sizeof err)
                            : lt_comm_all_reduce(c, x, 10, LT_F32, LT_REDUCE_SUM, err, sizeof err);
    RCHECK(ctx, rc != 0 && strstr(err, "disagree"), "expected a disagreement, got rc %d: %s", rc, err);
    if (ctx->rank != 1)
        RCHECK(ctx, strstr(err, "rank 1 called broadcast"), "message names rank 1: %s", err);
    snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    lt_comm_free(c);
}

static void die_now(int sig) {
    (void)sig;
    raise(SIGKILL);
}

/* Rank n-1 is killed (SIGKILL from a timer) in the middle of a stream of chunked all_reduces. */
static void rank_killed(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    int victim = ctx->n - 1;
    if (ctx->rank == victim) {
        signal(SIGALRM, die_now);
        struct itimerval it = {{0, 0}, {0, 150000}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    int64_t count = 20000;
    float *buf = malloc((size_t)count * 4);
    double t0 = now_s();
    int rc = 0, iters = 0;
    while (rc == 0 && now_s() - t0 < 5.0) {
        fill(buf, 64, LT_F32, 1, ctx->rank);
        rc = lt_comm_all_reduce(c, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
        iters++;
    }
    char want[64];
    snprintf(want, sizeof want, "rank %d did not arrive", victim);
    RCHECK(ctx, rc != 0 && strstr(err, want), "after %d calls expected an error naming rank %d, got: %s", iters,
           victim, rc ? err : "no error");
    snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    free(buf);
    lt_comm_free(c);
}

/* Rank 1 aborts; ranks waiting in the world or in a group fail promptly with its reason. */
static void rank_abort(rank_ctx *ctx) {
    char err[512];
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    int me = ctx->rank; /* world of 4: groups {0,1}, {2,3} */
    int half[2] = {me / 2 * 2, me / 2 * 2 + 1};
    lt_comm *g = lt_comm_group(w, half, 2, "half", err, sizeof err);
    RCHECK(ctx, g, "group: %s", err);
    if (!g) goto out;
    if (me == 3) {
        usleep(200000);
        lt_comm_abort(g, "loss is NaN at step 7");
        int rc = lt_comm_barrier(w, err, sizeof err);
        RCHECK(ctx, rc != 0, "the aborting rank's other communicators fail too");
        goto out;
    }
    double t0 = now_s();
    int64_t x = 1;
    int rc = me == 2 ? lt_comm_all_reduce(g, &x, 1, LT_I64, LT_REDUCE_SUM, err, sizeof err)
                     : lt_comm_barrier(w, err, sizeof err);
    double dt = now_s() - t0;
    RCHECK(ctx, rc != 0 && strstr(err, "rank 3 aborted: loss is NaN at step 7"), "expected the abort, got: %s",
           rc ? err : "no error");
    RCHECK(ctx, dt < 1.5, "abort noticed after %.2f s (timeout %.1f)", dt, ctx->timeout);
    snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
out:
    lt_comm_free(g);
    lt_comm_free(w);
}

/* Rank n-1 never creates the world: the others fail naming it, and remove the name. */
static void rank_no_show(rank_ctx *ctx) {
    char err[512];
    if (ctx->rank == ctx->n - 1) return;
    lt_comm *c = make_world(ctx, err, sizeof err);
    char want[64];
    snprintf(want, sizeof want, "rank %d did not arrive", ctx->n - 1);
    RCHECK(ctx, !c && strstr(err, want), "expected the world creation to fail naming rank %d: %s", ctx->n - 1,
           c ? "it succeeded" : err);
    snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    lt_comm_free(c);
}

/* One big all_reduce through the default staging size (several rounds). */
static void rank_big(rank_ctx *ctx) {
    char err[512];
    lt_comm *c = make_world(ctx, err, sizeof err);
    RCHECK(ctx, c, "world: %s", err);
    if (!c) return;
    int64_t count = 3 * 1000 * 1000 + 17;
    float *buf = malloc((size_t)count * 4);
    fill(buf, count, LT_F32, 4242, ctx->rank);
    int rc = lt_comm_all_reduce(c, buf, count, LT_F32, LT_REDUCE_AVG, err, sizeof err);
    RCHECK(ctx, rc == 0, "big all_reduce: %s", err);
    if (rc == 0) {
        int64_t bad = check_reduced(buf, count, 0, LT_F32, LT_REDUCE_AVG, 4242, ctx->n, NULL);
        RCHECK(ctx, bad < 0, "big all_reduce differs at %lld", (long long)bad);
    }
    free(buf);
    lt_comm_free(c);
}

/* ---- interrupts (Ctrl-C in the REPL) and resynchronisation ---- */

/* A barrier outside the communicators (the ranks' shared results): stands in for the launcher,
 * which knows when every rank is idle. */
static void oob_barrier(rank_ctx *ctx, uint64_t phase) {
    __atomic_store_n(&ctx->out->hash[NHASH - 1], phase, __ATOMIC_SEQ_CST);
    for (int all = 0; !all;) {
        all = 1;
        for (int r = 0; r < ctx->n; r++)
            if (__atomic_load_n(&ctx->all[r].hash[NHASH - 1], __ATOMIC_SEQ_CST) < phase) all = 0;
        if (!all) usleep(1000);
    }
}

static void on_alarm(int sig) {
    (void)sig;
    lt_comm_interrupt(); /* what the REPL's SIGINT handler does */
}

static void interrupt_in(double seconds) {
    signal(SIGALRM, on_alarm);
    struct itimerval it = {{0, 0}, {0, (long)(seconds * 1e6)}};
    setitimer(ITIMER_REAL, &it, NULL);
}

/* The REPL's recovery, every rank idle: quiesce everywhere, then resync everywhere. */
static int recover(rank_ctx *ctx, uint64_t *phase, char *err, size_t errlen) {
    oob_barrier(ctx, ++*phase);
    lt_comm_quiesce();
    oob_barrier(ctx, ++*phase);
    int rc = lt_comm_resync(err, errlen);
    oob_barrier(ctx, ++*phase);
    return rc;
}

/* World of 3, group {1,2}, a long timeout. Twice: rank 0 "runs Lua" (no calls) while rank 1
 * waits in a chunked all_reduce on the world with a non-blocking all_reduce pending on the group,
 * and rank 2 waits in a chunked send to rank 0; a timer interrupts them. Every call returns
 * promptly with the interrupt message, calls made afterwards fail at once; after the recovery the
 * pending request reports the interrupt and the world, the group and send/recv give the right
 * results (no stale chunk of the interrupted send). */
static void rank_interrupt(rank_ctx *ctx) {
    char err[512];
    int me = ctx->rank, pair[2] = {1, 2};
    uint64_t phase = 0;
    lt_comm *w = make_world(ctx, err, sizeof err), *p = NULL;
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    if (me > 0) {
        p = lt_comm_group(w, pair, 2, "pair", err, sizeof err);
        RCHECK(ctx, p, "group: %s", err);
        if (!p) return;
    }
    int64_t count = 5000, bytes = 10000;
    float *buf = malloc((size_t)count * 4);
    uint8_t *msg = malloc((size_t)bytes), *got = malloc((size_t)bytes);
    fill(buf, count, LT_F32, 70, me);
    int rc = lt_comm_all_reduce(w, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
    RCHECK(ctx, rc == 0, "all_reduce before: %s", err);
    for (int cycle = 0; cycle < 2; cycle++) {
        interrupt_in(0.3);
        double t0 = now_s();
        lt_comm_request *req = NULL;
        if (me == 0) {
            while (!lt_comm_interrupt_pending() && now_s() - t0 < 10) usleep(1000);
        } else if (me == 1) {
            req = lt_comm_all_reduce_async(p, buf, 100, LT_F32, LT_REDUCE_SUM); /* rank 2 never joins */
            rc = lt_comm_all_reduce(w, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
            RCHECK(ctx, rc != 0 && strstr(err, "all_reduce on communicator 'world' (ranks 0,1,2) interrupted (Ctrl-C)"),
                   "cycle %d: expected the interrupt, got rc %d: %s", cycle, rc, err);
        } else {
            memset(msg, 0xee, (size_t)bytes); /* three chunks: two posted, then a wait */
            rc = lt_comm_send(w, msg, bytes / 4, LT_F32, 0, err, sizeof err);
            RCHECK(ctx, rc != 0 && strstr(err, "send to rank 0 on communicator 'world' (ranks 0,1,2) interrupted"),
                   "cycle %d: expected the interrupt, got rc %d: %s", cycle, rc, err);
        }
        double dt = now_s() - t0;
        RCHECK(ctx, dt < 5.0, "cycle %d: interrupted after %.2f s (timeout %.0f s)", cycle, dt, ctx->timeout);
        if (cycle == 0 && me == 1) snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
        if (me > 0) { /* until the recovery every call fails at once */
            t0 = now_s();
            rc = lt_comm_barrier(p, err, sizeof err);
            RCHECK(ctx, rc != 0 && strstr(err, "barrier on communicator 'pair' (ranks 1,2) interrupted") &&
                            now_s() - t0 < 0.5,
                   "cycle %d: a call after the interrupt: rc %d: %s", cycle, rc, err);
        }
        rc = recover(ctx, &phase, err, sizeof err);
        RCHECK(ctx, rc == 0 && !lt_comm_interrupt_pending(), "cycle %d: resync: %s", cycle, rc ? err : "flag left");
        if (req) {
            rc = lt_comm_wait(req, err, sizeof err);
            RCHECK(ctx, rc != 0 && strstr(err, "all_reduce on communicator 'pair' (ranks 1,2) interrupted"),
                   "cycle %d: the pending request: rc %d: %s", cycle, rc, err);
        }
        /* the next "line": everything in step again */
        int salt = 100 + cycle;
        fill(buf, count, LT_F32, salt, me);
        rc = lt_comm_all_reduce(w, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
        RCHECK(ctx, rc == 0, "cycle %d: all_reduce on the world after the resync: %s", cycle, err);
        if (rc == 0) {
            int64_t bad = check_reduced(buf, count, 0, LT_F32, LT_REDUCE_SUM, salt, 3, NULL);
            RCHECK(ctx, bad < 0, "cycle %d: world all_reduce differs at %lld", cycle, (long long)bad);
        }
        if (me > 0) {
            fill(buf, count, LT_F32, salt + 50, me);
            rc = lt_comm_all_reduce(p, buf, count, LT_F32, LT_REDUCE_SUM, err, sizeof err);
            RCHECK(ctx, rc == 0, "cycle %d: all_reduce on the group after the resync: %s", cycle, err);
            if (rc == 0) {
                int64_t bad = check_reduced(buf, count, 0, LT_F32, LT_REDUCE_SUM, salt + 50, 2, pair);
                RCHECK(ctx, bad < 0, "cycle %d: group all_reduce differs at %lld", cycle, (long long)bad);
            }
        }
        for (int64_t i = 0; i < bytes; i++) msg[i] = (uint8_t)(i * 7 + cycle);
        if (me == 2) {
            rc = lt_comm_send(w, msg, bytes / 4, LT_F32, 0, err, sizeof err);
            RCHECK(ctx, rc == 0, "cycle %d: send after the resync: %s", cycle, err);
        } else if (me == 0) {
            rc = lt_comm_recv(w, got, bytes / 4, LT_F32, 2, err, sizeof err);
            RCHECK(ctx, rc == 0 && memcmp(got, msg, (size_t)bytes) == 0, "cycle %d: recv after the resync: %s",
                   cycle, rc ? err : "wrong data (a stale chunk?)");
        }
        rc = lt_comm_barrier(w, err, sizeof err);
        RCHECK(ctx, rc == 0, "cycle %d: barrier after the resync: %s", cycle, err);
    }
    free(buf);
    free(msg);
    free(got);
    lt_comm_free(p);
    lt_comm_free(w);
}

/* Byte i of the message from src to dst in exchange `tag` (no message of the test is all 0xee). */
static uint8_t p2p_byte(int src, int dst, int tag, int64_t i) {
    return (uint8_t)((uint64_t)i * 131u + (uint64_t)src * 17u + (uint64_t)dst * 29u + (uint64_t)tag * 7u + (uint64_t)(i >> 8));
}

/* Bytes from src to dst (multiples of 4: sent as int32), in the interrupted batches and in the
 * exchanges after them. */
static int64_t p2p_bytes(int src, int dst) {
    static const int64_t b[3][3] = {{0, 2000, 5000}, {3000, 0, 400}, {10000, 400, 0}};
    return b[src][dst];
}

/* World of 3, Q = 4096, twice: rank 0 "runs Lua" with a non-blocking batch pending (a send to
 * rank 1, which never receives it); rank 1 waits in a batch_p2p of a receive from rank 2 (never
 * sent) and a send to rank 0 (posted, never received); rank 2 in a batch of a 3-chunk send to
 * rank 0 (two chunks posted, the third waiting for a free half) and a receive from rank 1 (never
 * sent). A timer interrupts them: the batches fail promptly with the interrupt, the pending
 * request too (after the quiesce). After the resync every pair exchanges, in one batch, messages
 * of the sizes of the interrupted ones, twice: they must arrive exactly (a half-sent message not
 * dropped, or channel ends out of step, would deliver its stale chunks or hang). */
static void rank_interrupt_p2p(rank_ctx *ctx) {
    char err[512];
    int me = ctx->rank;
    uint64_t phase = 0;
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    uint8_t *out[3] = {NULL, NULL, NULL}, *in[3] = {NULL, NULL, NULL};
    for (int p = 0; p < 3; p++) {
        out[p] = malloc(10000);
        in[p] = malloc(10000);
    }
    const char *want = "batch_p2p on communicator 'world' (ranks 0,1,2) interrupted (Ctrl-C)";
    for (int cycle = 0; cycle < 2; cycle++) {
        for (int p = 0; p < 3; p++) memset(out[p], 0xee, 10000);
        interrupt_in(0.3);
        double t0 = now_s();
        lt_comm_request *req = NULL;
        int rc = 0;
        if (me == 0) {
            lt_comm_p2p_op ops[1] = {{LT_P2P_SEND, out[1], p2p_bytes(0, 1) / 4, LT_I32, 1}};
            req = lt_comm_batch_p2p_async(w, ops, 1);
            RCHECK(ctx, req, "cycle %d: batch_p2p_async", cycle);
            while (!lt_comm_interrupt_pending() && now_s() - t0 < 10) usleep(1000);
        } else if (me == 1) {
            lt_comm_p2p_op ops[2] = {{LT_P2P_RECV, in[2], p2p_bytes(2, 1) / 4, LT_I32, 2},
                                     {LT_P2P_SEND, out[0], p2p_bytes(1, 0) / 4, LT_I32, 0}};
            rc = lt_comm_batch_p2p(w, ops, 2, err, sizeof err);
        } else {
            lt_comm_p2p_op ops[2] = {{LT_P2P_SEND, out[0], p2p_bytes(2, 0) / 4, LT_I32, 0},
                                     {LT_P2P_RECV, in[1], p2p_bytes(1, 2) / 4, LT_I32, 1}};
            rc = lt_comm_batch_p2p(w, ops, 2, err, sizeof err);
        }
        double dt = now_s() - t0;
        if (me > 0) {
            RCHECK(ctx, rc != 0 && strstr(err, want), "cycle %d: expected the interrupt, got rc %d: %s", cycle, rc,
                   rc ? err : "no error");
            if (cycle == 0 && me == 2) snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
        }
        RCHECK(ctx, dt < 5.0, "cycle %d: interrupted after %.2f s (timeout %.0f s)", cycle, dt, ctx->timeout);
        rc = recover(ctx, &phase, err, sizeof err);
        RCHECK(ctx, rc == 0 && !lt_comm_interrupt_pending(), "cycle %d: resync: %s", cycle, rc ? err : "flag left");
        if (req) {
            rc = lt_comm_wait(req, err, sizeof err);
            RCHECK(ctx, rc != 0 && strstr(err, want), "cycle %d: the pending request: rc %d: %s", cycle, rc,
                   rc ? err : "no error");
        }
        /* the next "lines": every pair both ways in one batch, exact data */
        for (int ex = 0; ex < 2; ex++) {
            int tag = 10 * cycle + ex;
            lt_comm_p2p_op ops[4];
            int n = 0;
            for (int p = 0; p < 3; p++) {
                if (p == me) continue;
                for (int64_t i = 0; i < p2p_bytes(me, p); i++) out[p][i] = p2p_byte(me, p, tag, i);
                memset(in[p], 0, 10000);
                ops[n++] = (lt_comm_p2p_op){LT_P2P_SEND, out[p], p2p_bytes(me, p) / 4, LT_I32, p};
                ops[n++] = (lt_comm_p2p_op){LT_P2P_RECV, in[p], p2p_bytes(p, me) / 4, LT_I32, p};
            }
            rc = lt_comm_batch_p2p(w, ops, n, err, sizeof err);
            RCHECK(ctx, rc == 0, "cycle %d, exchange %d after the resync: %s", cycle, ex, err);
            for (int p = 0; p < 3 && rc == 0; p++) {
                if (p == me) continue;
                int64_t bad = -1;
                for (int64_t i = 0; i < p2p_bytes(p, me) && bad < 0; i++)
                    if (in[p][i] != p2p_byte(p, me, tag, i)) bad = i;
                RCHECK(ctx, bad < 0, "cycle %d, exchange %d: from rank %d, byte %lld of %lld is 0x%02x, expected 0x%02x%s",
                       cycle, ex, p, (long long)bad, (long long)p2p_bytes(p, me), bad < 0 ? 0 : in[p][bad],
                       bad < 0 ? 0 : p2p_byte(p, me, tag, bad), bad >= 0 && in[p][bad] == 0xee ? " (a stale chunk)" : "");
            }
        }
        rc = lt_comm_barrier(w, err, sizeof err);
        RCHECK(ctx, rc == 0, "cycle %d: barrier after the resync: %s", cycle, err);
    }
    for (int p = 0; p < 3; p++) {
        free(out[p]);
        free(in[p]);
    }
    lt_comm_free(w);
}

/* Creating a group while a member "runs Lua": the setup is interrupted, and the same group made
 * again after the resync is a fresh one that works. */
static void rank_interrupt_setup(rank_ctx *ctx) {
    char err[512];
    uint64_t phase = 0;
    int both[2] = {0, 1};
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    interrupt_in(0.3);
    double t0 = now_s();
    if (ctx->rank == 0) {
        while (!lt_comm_interrupt_pending() && now_s() - t0 < 10) usleep(1000);
    } else {
        lt_comm *g = lt_comm_group(w, both, 2, "late", err, sizeof err);
        RCHECK(ctx, !g && strstr(err, "setup on communicator 'late' (ranks 0,1) interrupted (Ctrl-C)") &&
                        now_s() - t0 < 5.0,
               "expected the interrupt within 5 s, got %s after %.2f s", g ? "a group" : err, now_s() - t0);
        snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
        lt_comm_free(g);
    }
    int rc = recover(ctx, &phase, err, sizeof err);
    RCHECK(ctx, rc == 0, "resync: %s", err);
    lt_comm *g = lt_comm_group(w, both, 2, "late", err, sizeof err);
    RCHECK(ctx, g, "the group made again: %s", err);
    int64_t x = ctx->rank + 5;
    rc = g ? lt_comm_all_reduce(g, &x, 1, LT_I64, LT_REDUCE_SUM, err, sizeof err) : -1;
    RCHECK(ctx, rc == 0 && x == 11, "all_reduce on it: %s (x = %lld)", rc ? err : "ok", (long long)x);
    lt_comm_free(g);
    lt_comm_free(w);
}

/* A communicator that failed for real (rank 1 skipped an all_reduce: timeout) stays failed through
 * an interrupt and a resync; the other rank's, which did not fail, works with a group. */
static void rank_failed_stays(rank_ctx *ctx) {
    char err[512];
    uint64_t phase = 0;
    int both[2] = {0, 1};
    lt_comm *w = make_world(ctx, err, sizeof err);
    RCHECK(ctx, w, "world: %s", err);
    if (!w) return;
    lt_comm *g = lt_comm_group(w, both, 2, "both", err, sizeof err);
    RCHECK(ctx, g, "group: %s", err);
    if (!g) return;
    float x = 1;
    if (ctx->rank == 0) {
        int rc = lt_comm_all_reduce(w, &x, 1, LT_F32, LT_REDUCE_SUM, err, sizeof err);
        RCHECK(ctx, rc != 0 && strstr(err, "timed out"), "expected a timeout: %s", rc ? err : "no error");
    }
    oob_barrier(ctx, ++phase);
    lt_comm_interrupt();
    int rc = recover(ctx, &phase, err, sizeof err);
    RCHECK(ctx, rc == 0, "resync: %s", err);
    if (ctx->rank == 0) {
        rc = lt_comm_barrier(w, err, sizeof err);
        RCHECK(ctx, rc != 0 && strstr(err, "unusable") && strstr(err, "timed out"), "still failed: %s",
               rc ? err : "it works again");
        snprintf(ctx->out->err, sizeof ctx->out->err, "%s", err);
    }
    x = (float)(ctx->rank + 1);
    rc = lt_comm_all_reduce(g, &x, 1, LT_F32, LT_REDUCE_SUM, err, sizeof err);
    RCHECK(ctx, rc == 0 && x == 3.0f, "the group after the resync: %s (x = %g)", rc ? err : "ok", x);
    lt_comm_free(g);
    lt_comm_free(w);
}

/* ---- in the parent: a world of one, argument checks ---- */

static void test_single(void) {
    char err[512];
    lt_comm_world_info info;
    memset(&info, 0, sizeof info);
    info.world_size = 1;
    info.local_size = 1;
    snprintf(info.job_id, sizeof info.job_id, "t%d-single", (int)getpid());
    info.timeout_s = 2;
    lt_comm *c = lt_comm_shm_world(&info, err, sizeof err);
    TAP_CHECK(c != NULL, "a world of one: %s", c ? "created" : err);
    if (!c) return;
    float x[5] = {1, 2, 3, -4, 5.5f};
    int rc = lt_comm_all_reduce(c, x, 5, LT_F32, LT_REDUCE_AVG, err, sizeof err);
    TAP_CHECK(rc == 0 && x[3] == -4 && x[4] == 5.5f, "world of one: all_reduce is the identity");
    float y[5];
    rc = lt_comm_all_gather(c, x, y, 5, LT_F32, err, sizeof err);
    TAP_CHECK(rc == 0 && memcmp(x, y, sizeof x) == 0, "world of one: all_gather copies");
    lt_comm_stats st = lt_comm_get_stats(c);
    TAP_CHECK(st.calls == 2 && st.bytes == 0, "world of one moves no bytes (calls %llu, bytes %llu)",
              (unsigned long long)st.calls, (unsigned long long)st.bytes);
    rc = lt_comm_all_reduce(c, x, -1, LT_F32, LT_REDUCE_SUM, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "negative count"), "a negative count is refused: %s", err);
    rc = lt_comm_send(c, x, 1, LT_F32, 0, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "peer 0"), "sending to oneself is refused: %s", err);
    rc = lt_comm_broadcast(c, x, 1, LT_F32, 3, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "root 3"), "a root outside the communicator is refused: %s", err);
    rc = lt_comm_all_reduce(c, x, 1, (lt_dtype)9, LT_REDUCE_SUM, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "dtype"), "an unknown dtype is refused: %s", err);
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
    test_single();

    static const int sizes[4] = {2, 3, 4, 8};
    char label[256];
    for (int si = 0; si < 4; si++) {
        int n = sizes[si];
        uint64_t hsmall[MAX_RANKS], hdef[MAX_RANKS];
        /* small staging: every count above 1024 elements goes in several rounds */
        set_slot("4096");
        run_status st = run_ranks(n, 5.0, rank_all_reduce, NULL, 30);
        snprintf(label, sizeof label, "all_reduce N=%d: f32/bf16/i32/i64 x sum/avg/max x counts 0,1,7,1000,5003 "
                 "(chunked) match the rank-order reduction, twice", n);
        report_run(label, n, &st, 0);
        for (int r = 0; r < n; r++) hsmall[r] = shared_results[r].hash[0];
        set_slot(NULL);
        st = run_ranks(n, 5.0, rank_all_reduce, NULL, 30);
        snprintf(label, sizeof label, "all_reduce N=%d with the default staging size", n);
        report_run(label, n, &st, 0);
        for (int r = 0; r < n; r++) hdef[r] = shared_results[r].hash[0];
        int same = 1;
        for (int r = 0; r < n; r++) same &= hsmall[r] == hsmall[0] && hdef[r] == hsmall[0];
        TAP_CHECK(same, "all_reduce N=%d: results bit-identical on every rank, across runs and chunk sizes", n);

        set_slot("4096");
        st = run_ranks(n, 5.0, rank_collectives, NULL, 30);
        snprintf(label, sizeof label, "N=%d: reduce_scatter, all_gather (in place too), all_to_all (uneven), "
                 "broadcast from every root, send/recv chain, ring and pairwise, barrier, byte statistics", n);
        report_run(label, n, &st, 0);
        same = 1;
        for (int r = 0; r < n; r++) same &= shared_results[r].hash[0] == shared_results[0].hash[0];
        TAP_CHECK(same, "N=%d: all_gather results identical on every rank", n);
    }

    set_slot("4096");
    run_status st = run_ranks(4, 5.0, rank_groups, NULL, 30);
    report_run("groups: {0,2}/{1,3} and {0,1}/{2,3} used alternately, group of a group, singletons, "
               "re-created groups, bad lists refused", 4, &st, 0);

    set_slot(NULL);
    st = run_ranks(2, 5.0, rank_big, NULL, 30);
    report_run("all_reduce of 3M fp32 (avg) through the default staging size", 2, &st, 0);

    set_slot("4096");
    st = run_ranks(3, 0.5, rank_skip, NULL, 30);
    report_run("a rank that skips a collective: the others time out naming it, and the communicator "
               "stays failed", 3, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(3, 5.0, rank_mismatch, NULL, 30);
    report_run("ranks calling different collectives all fail, naming the odd one", 3, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(3, 0.5, rank_killed, NULL, 30);
    report_run("kill -9 of a rank mid-collective: the others time out naming it", 3, &st, 1u << 2);
    TAP_CHECK(st.exited[2] == -9, "the victim died of SIGKILL (exit %d)", st.exited[2]);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(4, 10.0, rank_abort, NULL, 30);
    report_run("abort through a group: ranks waiting in the world and in another group fail promptly "
               "with the reason", 4, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(3, 60.0, rank_interrupt, NULL, 30);
    report_run("interrupt (Ctrl-C) of ranks waiting in a chunked all_reduce, a send and a pending non-blocking "
               "request, twice: prompt errors well inside the timeout, then after the resync the world, a group "
               "and send/recv are right", 3, &st, 0);
    printf("#   %s\n", shared_results[1].err);

    st = run_ranks(3, 60.0, rank_interrupt_p2p, NULL, 30);
    report_run("interrupt (Ctrl-C) of ranks waiting in batch_p2p (a receive nobody sends, a send nobody "
               "receives, a half-sent 3-chunk message) and of a pending non-blocking batch, twice: prompt errors; "
               "after the resync all pairs exchange exact data in one batch, twice", 3, &st, 0);
    printf("#   %s\n", shared_results[2].err);

    st = run_ranks(2, 60.0, rank_interrupt_setup, NULL, 30);
    report_run("interrupt while creating a group: prompt error; made again after the resync, it works", 2, &st, 0);
    printf("#   %s\n", shared_results[1].err);

    st = run_ranks(2, 0.5, rank_failed_stays, NULL, 30);
    report_run("a communicator that timed out stays failed through a resync; a sound group works", 2, &st, 0);
    printf("#   %s\n", shared_results[0].err);

    st = run_ranks(3, 0.5, rank_no_show, NULL, 30);
    report_run("a rank that never joins: world creation fails naming it", 3, &st, 0);
    printf("#   %s\n", shared_results[0].err);
    set_slot(NULL);

    char names[1024];
    int left = leftover_segments(names, sizeof names);
    TAP_CHECK(left == 0, "no /dev/shm/luatron-* segments left (%d: %s)", left, names);
    printf("# %.2f s\n", now_s() - t_start);
    return tap_done();
}

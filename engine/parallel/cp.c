/* Context parallelism (cp.h): positions of the load-balanced chunks and ring attention over the cp
 * communicator's point-to-point batches, built from the attention_kv ops. */
#include "engine/parallel/cp.h"

#include <stdlib.h>

#include "engine/core/error.h"

int lt_cp_position(int rank, int size, int T, int t) {
    if (size == 1) return t;
    const int L = T / 2;
    return t < L ? rank * L + t : (2 * size - 1 - rank) * L + t - L;
}

lt_cp_maps *lt_cp_maps_new(const lt_cp *cp, int B, int T, int H, int G, int D, char *err, size_t errlen) {
    if (cp->size > 1 && T % 2) {
        lt_fail(err, errlen, "context parallelism holds two chunks of the sequence per rank: a local sequence of %d "
                "positions does not halve", T);
        return NULL;
    }
    const int hpg = H / G;
    const size_t N = (size_t)B * T, blocks = N * G * 2, qkv_rows = N * G * (hpg + 2);
    const size_t count = (size_t)cp->size * T + blocks + qkv_rows;
    lt_cp_maps *m = calloc(1, sizeof *m);
    int32_t *h = malloc(sizeof(int32_t) * count), *dev = cp->be->alloc(sizeof(int32_t) * count);
    if (!m || !h || !dev) {
        free(m);
        free(h);
        if (dev) cp->be->release(dev, sizeof(int32_t) * count);
        lt_fail(err, errlen, "out of %s memory for context parallelism's maps", cp->be->name);
        return NULL;
    }
    int32_t *pos = h, *kv = h + (size_t)cp->size * T, *parts = kv + blocks;
    for (int r = 0; r < cp->size; r++)
        for (int t = 0; t < T; t++) pos[(size_t)r * T + t] = lt_cp_position(r, cp->size, T, t);
    for (size_t tg = 0; tg < N * G; tg++) { /* (token, group) pairs */
        for (int s = 0; s < 2; s++) kv[tg * 2 + s] = (int32_t)(tg * (hpg + 2) + hpg + s);
        for (int k = 0; k < hpg + 2; k++)
            parts[tg * (hpg + 2) + k] = (int32_t)(k < hpg ? tg * (hpg + 2) + k : qkv_rows + tg * 2 + (k - hpg));
    }
    cp->be->to_device(dev, h, sizeof(int32_t) * count);
    free(h);
    *m = (lt_cp_maps){B, T, H, G, D, dev, dev + (size_t)cp->size * T, dev + (size_t)cp->size * T + blocks,
                      sizeof(int32_t) * count};
    return m;
}

void lt_cp_maps_free(const lt_cp *cp, lt_cp_maps *m) {
    if (!m) return;
    cp->be->release(m->pos, m->bytes);
    free(m);
}

/* The scratch's parts, each 64-byte aligned: two key/value blocks (the one computed on, the one
 * arriving) and two of their gradients (all_gather: every rank's blocks, and their gradients), one
 * block's gradient, [dq ; dkv] for the final row gather, and the partial out and lse of a block. */
typedef struct {
    char *kv[2], *dacc[2], *dblk, *parts, *out_b;
    float *lse_b;
    size_t bytes;
} ring_scratch;

static size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static int64_t block_elements(const lt_cp_maps *m) { return (int64_t)m->B * m->T * m->G * 2 * m->D; }

/* cp_comm_type "all_gather" in effect (one rank has nothing to gather). */
static int gathered(const lt_cp *cp) { return cp->all_gather && cp->size > 1; }

/* With base NULL only measures (.bytes). */
static ring_scratch carve(const lt_cp *cp, const lt_cp_maps *m, size_t E, char *base) {
    const size_t N = (size_t)m->B * m->T, block = E * (size_t)block_elements(m);
    const size_t qkv = E * N * m->G * (m->H / m->G + 2) * m->D;
    const size_t pair = cp->all_gather ? up64(block * (size_t)cp->size) : up64(block); /* kv[0], dacc[0] */
    ring_scratch s;
    size_t at = 0;
    s.kv[0] = base + at, at += pair;
    s.kv[1] = base + at, at += cp->all_gather ? 0 : up64(block);
    s.dacc[0] = base + at, at += pair;
    s.dacc[1] = base + at, at += cp->all_gather ? 0 : up64(block);
    s.dblk = base + at, at += up64(block);
    s.parts = base + at, at += up64(qkv + block);
    s.out_b = base + at, at += up64(E * N * m->H * m->D);
    s.lse_b = (float *)(base + at), at += up64(sizeof(float) * N * m->H);
    s.bytes = at;
    return s;
}

size_t lt_cp_attention_scratch(const lt_cp *cp, const lt_cp_maps *m) {
    return carve(cp, m, 4, NULL).bytes; /* the widest dtype, fp32: enough for bf16 too */
}

/* Rows rows[i] of src into row i of dst, D wide: the embedding lookup is an exact row gather. */
static void gather(const lt_cp *cp, const lt_cp_maps *m, void *dst, const int32_t *rows, const void *src, size_t n) {
    cp->ops->embedding_forward(dst, rows, src, (int)n, m->D);
}

static int next_of(const lt_cp *cp) { return (cp->rank + 1) % cp->size; }
static int prev_of(const lt_cp *cp) { return (cp->rank + cp->size - 1) % cp->size; }

/* Sends `send` to the next rank and receives `recv` from the previous one, in the background. The
 * buffer sent is also read by the block computed meanwhile: both only read it. */
static lt_comm_request *pass_on(const lt_cp *cp, void *send, void *recv, int64_t count) {
    const lt_comm_p2p_op ops[2] = {{LT_P2P_SEND, send, count, cp->ops->dtype, next_of(cp)},
                                   {LT_P2P_RECV, recv, count, cp->ops->dtype, prev_of(cp)}};
    return lt_comm_batch_p2p_async(cp->comm, ops, 2);
}

static int finish(lt_comm_request *req, char *err, size_t errlen) {
    if (!req) return 0;
    return lt_comm_wait(req, err, errlen);
}

int lt_cp_attention_forward(const lt_cp *cp, const lt_cp_maps *m, void *out, float *lse, const void *qkv, float p,
                            uint64_t key, int head_offset, int heads_total, void *scratch, char *err, size_t errlen) {
    const size_t E = lt_dtype_size(cp->ops->dtype);
    ring_scratch s = carve(cp, m, E, scratch);
    const int B = m->B, T = m->T, H = m->H, G = m->G, D = m->D, S = T * cp->size;
    const int64_t n = block_elements(m);
    const int32_t *mine = m->pos + (size_t)cp->rank * T;
    char *own = gathered(cp) ? s.dblk : s.kv[0]; /* all_gather: this rank's block, then every rank's in kv[0] */
    gather(cp, m, own, m->kv_of_qkv, qkv, (size_t)n / D);
    if (gathered(cp) && lt_comm_all_gather(cp->comm, own, s.kv[0], n, cp->ops->dtype, err, errlen)) return -1;
    for (int step = 0, cur = 0; step < cp->size; step++, cur ^= 1) {
        const int src = (cp->rank + cp->size - step) % cp->size; /* whose block this rank holds */
        const void *block = gathered(cp) ? s.kv[0] + E * (size_t)n * src : s.kv[cur];
        lt_comm_request *req = NULL;
        if (!gathered(cp) && step < cp->size - 1) {
            req = pass_on(cp, s.kv[cur], s.kv[cur ^ 1], n);
            if (!req) return lt_fail(err, errlen, "context parallelism: out of memory");
        }
        const int32_t *theirs = m->pos + (size_t)src * T;
        if (step == 0) {
            cp->ops->attention_kv_forward(out, lse, qkv, block, B, T, T, H, G, D, mine, theirs, S, p, key, head_offset,
                                          heads_total);
        } else {
            cp->ops->attention_kv_forward(s.out_b, s.lse_b, qkv, block, B, T, T, H, G, D, mine, theirs, S, p, key,
                                          head_offset, heads_total);
            cp->ops->attention_merge(out, lse, s.out_b, s.lse_b, B, T, H, D);
        }
        if (finish(req, err, errlen)) return -1;
    }
    return 0;
}

/* all_gather: every rank's block gathered, each block's key/value gradient computed here, the
 * gradients reduce-scattered to their owners (no overlap). */
static int backward_gathered(const lt_cp *cp, const lt_cp_maps *m, ring_scratch *s, char *dq, char *dkv, const void *dout,
                             const void *qkv, const void *out, const float *lse, float p, uint64_t key, int head_offset,
                             int heads_total, char *err, size_t errlen) {
    const int B = m->B, T = m->T, H = m->H, G = m->G, D = m->D, S = T * cp->size;
    const size_t E = lt_dtype_size(cp->ops->dtype), n = (size_t)block_elements(m);
    gather(cp, m, s->dblk, m->kv_of_qkv, qkv, n / D);
    if (lt_comm_all_gather(cp->comm, s->dblk, s->kv[0], (int64_t)n, cp->ops->dtype, err, errlen)) return -1;
    for (int step = 0; step < cp->size; step++) {
        const int src = (cp->rank + cp->size - step) % cp->size;
        cp->ops->attention_kv_backward(dq, s->dacc[0] + E * n * src, dout, qkv, s->kv[0] + E * n * src, out, lse, B, T, T,
                                       H, G, D, m->pos + (size_t)cp->rank * T, m->pos + (size_t)src * T, S, p, key,
                                       head_offset, heads_total);
    }
    return lt_comm_reduce_scatter(cp->comm, s->dacc[0], dkv, (int64_t)n, cp->ops->dtype, LT_REDUCE_SUM, err, errlen);
}

int lt_cp_attention_backward(const lt_cp *cp, const lt_cp_maps *m, void *dqkv, const void *dout, const void *qkv,
                             const void *out, const float *lse, float p, uint64_t key, int head_offset,
                             int heads_total, void *scratch, char *err, size_t errlen) {
    const size_t E = lt_dtype_size(cp->ops->dtype), n = (size_t)block_elements(m);
    ring_scratch s = carve(cp, m, E, scratch);
    const int B = m->B, T = m->T, H = m->H, G = m->G, D = m->D, S = T * cp->size;
    const size_t dq_bytes = E * (size_t)B * T * G * (H / G + 2) * D;
    const int32_t *mine = m->pos + (size_t)cp->rank * T;
    char *dq = s.parts, *dkv = s.parts + dq_bytes;
    cp->be->memzero(dq, dq_bytes);
    if (gathered(cp)) {
        if (backward_gathered(cp, m, &s, dq, dkv, dout, qkv, out, lse, p, key, head_offset, heads_total, err, errlen))
            return -1;
        cp->ops->embedding_forward(dqkv, m->qkv_of_parts, s.parts, B * T * G * (H / G + 2), D);
        return 0;
    }
    cp->be->memzero(s.dacc[0], E * n);
    gather(cp, m, s.kv[0], m->kv_of_qkv, qkv, n / D);
    int cur = 0;
    for (int step = 0; step < cp->size; step++, cur ^= 1) {
        const int src = (cp->rank + cp->size - step) % cp->size;
        lt_comm_request *req = step < cp->size - 1 ? pass_on(cp, s.kv[cur], s.kv[cur ^ 1], (int64_t)n) : NULL;
        if (step < cp->size - 1 && !req) return lt_fail(err, errlen, "context parallelism: out of memory");
        cp->ops->attention_kv_backward(dq, s.dblk, dout, qkv, s.kv[cur], out, lse, B, T, T, H, G, D, mine,
                                       m->pos + (size_t)src * T, S, p, key, head_offset, heads_total);
        cp->ops->add_forward(s.dacc[cur], s.dacc[cur], s.dblk, (int64_t)n);
        /* the block's gradient goes on with it; after the last step it reaches the block's owner, and
         * this rank receives its own block's from the previous rank */
        lt_comm_request *dreq = cp->size > 1 ? pass_on(cp, s.dacc[cur], s.dacc[cur ^ 1], (int64_t)n) : NULL;
        const int failed = finish(req, err, errlen);
        if (finish(dreq, err, errlen) || failed) return -1;
        if (cp->size > 1 && !dreq) return lt_fail(err, errlen, "context parallelism: out of memory");
    }
    /* the gradients of this rank's block: where the loop left them (swapped past the last step) */
    cp->be->copy(dkv, s.dacc[cp->size > 1 ? cur : cur ^ 1], E * n);
    cp->ops->embedding_forward(dqkv, m->qkv_of_parts, s.parts, B * T * G * (H / G + 2), D);
    return 0;
}

uint64_t lt_cp_ring_bytes(const lt_cp *cp, const lt_cp_maps *m, int backward) {
    const uint64_t block = (uint64_t)block_elements(m) * lt_dtype_size(cp->ops->dtype);
    if (cp->size == 1) return 0;
    if (gathered(cp)) return (uint64_t)(cp->size - 1) * block * (backward ? 2 : 1);
    return backward ? (2 * (uint64_t)cp->size - 1) * block : (uint64_t)(cp->size - 1) * block;
}

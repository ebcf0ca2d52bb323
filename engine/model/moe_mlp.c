/* The MoE MLP block (moe_mlp.h): the gating GEMM on the device, the router on the host, the
 * dispatcher's exchange, each local expert's GEMMs on its block of rows, the combines back. */
#include "engine/model/moe_mlp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/core/error.h"

/* A weighted row sum in moe_combine's layout: out row n = sum_j weights[n, j] in[slots[n, j]], slots -1
 * past a row's last. */
typedef struct {
    int32_t *slots;
    float *weights;
    int n, k;
} combine;

struct lt_moe_state {
    int N, E, El, e0, B, T, EP, me, etp; /* tokens (rows b T + t), experts, local experts from e0, the dispatch
                                            group (rank p holds EP rank p / etp's experts) */
    lt_moe_dispatcher kind;
    lt_moe_router_cfg router;
    /* host, in the router's token order (token s B + b, Megatron's [s, b]) */
    float *logits, *probs;
    uint8_t *map;
    int64_t *counts;     /* [E]: tokens this rank routed to each expert */
    int64_t *aux_counts; /* the aux loss's counts summed over TP x CP (router.aux_counts), or TP x DP x CP */
    float *global_avg;   /* global_aux_loss: the step's running average of those (router.global_counts) */
    int64_t kept;
    double aux, z;
    /* the exchange */
    int64_t S, R, M;                /* rows sent (alltoall, flex), received, and the local experts' rows */
    int64_t *send_rows, *recv_rows; /* [EP]: rows to and from each EP rank (alltoall, flex) */
    int64_t *efirst;                /* [El + 1]: local expert j's rows of x are [efirst[j], efirst[j + 1]) */
    int32_t *sent_token;            /* flex [S]: the router token of each sent row */
    int32_t *src_expert;            /* alltoall [N ks]: the expert of each source slot */
    int32_t *slot_expert;           /* flex, allgather [R kr]: the local expert of each expert-side slot */
    int64_t rows_sent, rows_received;
    double seconds, backward_seconds;
    /* backend memory: one allocation */
    char *dev;
    size_t dev_bytes;
    int32_t *src_rows;  /* [S]: the row of ln each sent row carries (alltoall, flex) */
    int32_t *pair_rows; /* [M]: the received row each expert row computes */
    combine source;     /* [N, ks] over the rows that come back (alltoall: probs; flex: ones) */
    combine expert;     /* [R, kr] over the expert rows (alltoall: its one row, weight 1; else probs) */
    float *ones;        /* [max(N ks, R kr)] */
    void *x, *fc1, *act, *y; /* [M, C], [M, fc1], [M, F], [M, C] */
    void *y_src;             /* alltoall [S, C]: the outputs that came back, for the source combine's backward */
    /* the shared experts' fc1 output and activation over the TP region's rows (one allocation) */
    char *shared;
    size_t shared_bytes;
    void *sh_fc1, *sh_act;
};

static size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Rows of the router's order and of the layer's: token s B + b is row b T + s. */
static int layer_row(const lt_moe_state *st, int t) { return (t % st->B) * st->T + t / st->B; }
static int router_token(const lt_moe_state *st, int r) { return (r % st->T) * st->B + r / st->T; }

/* The first expert of dispatch rank r. */
static int first_expert(const lt_moe_state *st, int r) { return r / st->etp * st->El; }

static int fc1_width(const lt_layer_spec *s, const lt_moe_spec *ms) {
    return s->gated_linear_unit ? 2 * ms->ffn_hidden_size : ms->ffn_hidden_size;
}

void lt_moe_state_free(const lt_layer_spec *s, lt_moe_state *st) {
    if (!st) return;
    if (st->dev) s->tp->be->release(st->dev, st->dev_bytes);
    if (st->shared) s->tp->be->release(st->shared, st->shared_bytes);
    free(st->logits), free(st->probs), free(st->map), free(st->counts), free(st->aux_counts), free(st->global_avg);
    free(st->send_rows), free(st->recv_rows), free(st->efirst), free(st->sent_token), free(st->slot_expert);
    free(st->src_expert);
    free(st);
}

lt_moe_stats lt_moe_state_stats(const lt_moe_state *st) {
    return (lt_moe_stats){st->counts,        (int64_t)st->N * st->router.topk, st->kept, st->aux, st->z,
                          st->rows_sent,     st->rows_received,               st->seconds, st->backward_seconds};
}

/* A compute-dtype device buffer of n values to host fp32, and back. */
static void to_host_f32(const lt_ops *ops, const lt_backend *be, float *dst, const void *src, size_t n) {
    if (ops->dtype == LT_F32) {
        be->to_host(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = malloc(sizeof(uint16_t) * n);
    be->to_host(h, src, sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) dst[i] = lt_bf16_to_f32(h[i]);
    free(h);
}

static void to_device_dtype(const lt_ops *ops, const lt_backend *be, void *dst, const float *src, size_t n) {
    if (ops->dtype == LT_F32) {
        be->to_device(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = malloc(sizeof(uint16_t) * n);
    for (size_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(src[i]);
    be->to_device(dst, h, sizeof(uint16_t) * n);
    free(h);
}

/* ---- the exchanges over the EP group (device memory: the communicator is NCCL's on a GPU) ---- */

/* recv [EP, n] = every rank's send [n] (host arrays). */
static int gather_host(const lt_moe_spec *ms, const lt_backend *be, const void *send, void *recv, int64_t n,
                       lt_dtype dt, char *err, size_t errlen) {
    const size_t bytes = lt_dtype_size(dt) * (size_t)n, all = bytes * (size_t)ms->ep_size;
    if (ms->ep_size == 1) {
        memcpy(recv, send, bytes);
        return 0;
    }
    char *buf = be->alloc(up64(bytes) + all + 64);
    if (!buf) return lt_fail(err, errlen, "out of %s memory for the MoE dispatcher's metadata", be->name);
    be->to_device(buf, send, bytes);
    const int rc = lt_comm_all_gather(ms->ep, buf, buf + up64(bytes), n, dt, err, errlen);
    if (!rc) be->to_host(recv, buf + up64(bytes), all);
    be->release(buf, up64(bytes) + all + 64);
    return rc;
}

/* Rows of `width` elements: send_rows[r] to rank r, recv_rows[r] from it, blocks in rank order. */
static int exchange(const lt_moe_spec *ms, const lt_backend *be, const void *send, const int64_t *send_rows,
                    void *recv, const int64_t *recv_rows, int64_t width, lt_dtype dt, char *err, size_t errlen) {
    const int EP = ms->ep_size;
    if (EP == 1) {
        if (send != recv && send_rows[0]) be->copy(recv, send, lt_dtype_size(dt) * (size_t)(send_rows[0] * width));
        return 0;
    }
    int64_t sc[EP], rc[EP];
    for (int r = 0; r < EP; r++) sc[r] = send_rows[r] * width, rc[r] = recv_rows[r] * width;
    return lt_comm_all_to_all(ms->ep, send, sc, recv, rc, dt, err, errlen);
}

/* The same for host arrays (through device memory). */
static int exchange_host(const lt_moe_spec *ms, const lt_backend *be, const void *send, const int64_t *send_rows,
                         void *recv, const int64_t *recv_rows, int64_t width, lt_dtype dt, char *err, size_t errlen) {
    int64_t S = 0, R = 0;
    for (int r = 0; r < ms->ep_size; r++) S += send_rows[r], R += recv_rows[r];
    const size_t es = lt_dtype_size(dt), sb = es * (size_t)(S * width), rb = es * (size_t)(R * width);
    if (ms->ep_size == 1) {
        memcpy(recv, send, sb);
        return 0;
    }
    char *buf = be->alloc(up64(sb) + rb + 64);
    if (!buf) return lt_fail(err, errlen, "out of %s memory for the MoE dispatcher's metadata", be->name);
    if (sb) be->to_device(buf, send, sb);
    const int rc = exchange(ms, be, buf, send_rows, buf + up64(sb), recv_rows, width, dt, err, errlen);
    if (!rc && rb) be->to_host(recv, buf + up64(sb), rb);
    be->release(buf, up64(sb) + rb + 64);
    return rc;
}

/* ---- the dispatch plan (host) ---- */

/* What a forward uploads: the sent rows' tokens, the source combine, the expert rows' received rows and
 * the expert-side combine. */
typedef struct {
    int32_t *src_rows, *src_slots, *pair_rows, *exp_slots;
    float *src_w, *exp_w;
    int ks, kr;
} plan;

static void plan_free(plan *p) {
    free(p->src_rows), free(p->src_slots), free(p->pair_rows), free(p->exp_slots), free(p->src_w), free(p->exp_w);
}

/* The expert side of allgather and flex: received row i routes to local expert j when mask[i, j]
 * (masks and probs [R, El] with row stride `stride`). Expert rows go expert by expert in received order;
 * each received row's slots list its experts in order, weighted by the probabilities. */
static int plan_expert_side(lt_moe_state *st, plan *p, const float *probs, const float *mask, int64_t stride) {
    const int El = st->El;
    const int64_t R = st->R;
    int kr = 1;
    int64_t M = 0;
    for (int64_t i = 0; i < R; i++) {
        int n = 0;
        for (int j = 0; j < El; j++) n += mask[i * stride + j] != 0.0f;
        if (n > kr) kr = n;
        M += n;
    }
    st->M = M;
    p->kr = kr;
    p->pair_rows = malloc(sizeof(int32_t) * (size_t)(M ? M : 1));
    p->exp_slots = malloc(sizeof(int32_t) * (size_t)(R * kr + 1));
    p->exp_w = malloc(sizeof(float) * (size_t)(R * kr + 1));
    st->slot_expert = malloc(sizeof(int32_t) * (size_t)(R * kr + 1));
    int *fill = calloc((size_t)(R + 1), sizeof(int));
    if (!p->pair_rows || !p->exp_slots || !p->exp_w || !st->slot_expert || !fill) {
        free(fill);
        return -1;
    }
    for (int64_t i = 0; i < R * kr; i++) p->exp_slots[i] = -1, p->exp_w[i] = 0.0f, st->slot_expert[i] = -1;
    int64_t m = 0;
    for (int j = 0; j < El; j++) {
        st->efirst[j] = m;
        for (int64_t i = 0; i < R; i++) {
            if (mask[i * stride + j] == 0.0f) continue;
            const int64_t slot = i * kr + fill[i]++;
            p->pair_rows[m] = (int32_t)i;
            p->exp_slots[slot] = (int32_t)m++;
            p->exp_w[slot] = probs[i * stride + j];
            st->slot_expert[slot] = j;
        }
    }
    st->efirst[El] = m;
    free(fill);
    return 0;
}

/* allgather: every rank's probs and map (as 0/1), [N, 2E] in layer row order, all-gathered. */
static int plan_allgather(lt_moe_state *st, const lt_moe_spec *ms, const lt_backend *be, plan *p, char *err,
                          size_t errlen) {
    const int N = st->N, E = st->E, EP = st->EP;
    float *mine = calloc((size_t)N * 2 * E, sizeof(float)), *all = malloc(sizeof(float) * (size_t)EP * N * 2 * E);
    if (!mine || !all) {
        free(mine), free(all);
        return lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    }
    for (int t = 0; t < N; t++) {
        float *row = mine + (size_t)layer_row(st, t) * 2 * E;
        for (int e = 0; e < E; e++) {
            row[e] = st->probs[(size_t)t * E + e];
            row[E + e] = st->map[(size_t)t * E + e];
        }
    }
    const double t0 = now();
    int rc = gather_host(ms, be, mine, all, (int64_t)N * 2 * E, LT_F32, err, errlen);
    st->seconds += now() - t0;
    st->R = (int64_t)EP * N;
    st->rows_sent = st->rows_received = (int64_t)(EP - 1) * N;
    if (!rc && plan_expert_side(st, p, all + st->e0, all + E + st->e0, 2 * E))
        rc = lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    free(mine), free(all);
    return rc;
}

/* alltoall: a row per (token, expert) pair and rank holding the expert (etp of them), rank by rank,
 * expert by expert, tokens in order. */
static int plan_alltoall(lt_moe_state *st, const lt_moe_spec *ms, const lt_backend *be, plan *p, char *err,
                         size_t errlen) {
    const int N = st->N, E = st->E, EP = st->EP, El = st->El, etp = st->etp;
    int ks = 1;
    for (int t = 0; t < N; t++) {
        int n = 0;
        for (int e = 0; e < E; e++) n += st->map[(size_t)t * E + e];
        if (n * etp > ks) ks = n * etp;
    }
    p->ks = ks;
    st->S = 0;
    for (int r = 0; r < EP; r++) {
        st->send_rows[r] = 0;
        for (int j = 0; j < El; j++) st->send_rows[r] += st->counts[first_expert(st, r) + j];
        st->S += st->send_rows[r];
    }
    int64_t *all = malloc(sizeof(int64_t) * (size_t)EP * E);
    const size_t NK = (size_t)N * ks;
    p->src_rows = malloc(sizeof(int32_t) * (size_t)(st->S + 1));
    p->src_slots = malloc(sizeof(int32_t) * NK);
    p->src_w = malloc(sizeof(float) * NK);
    st->src_expert = malloc(sizeof(int32_t) * NK);
    int *fill = calloc((size_t)N, sizeof(int));
    if (!all || !p->src_rows || !p->src_slots || !p->src_w || !st->src_expert || !fill) {
        free(all), free(fill);
        return lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    }
    const double t0 = now();
    int rc = gather_host(ms, be, st->counts, all, E, LT_I64, err, errlen);
    st->seconds += now() - t0;
    for (size_t i = 0; i < NK; i++) p->src_slots[i] = -1, p->src_w[i] = 0.0f, st->src_expert[i] = -1;
    int64_t m = 0;
    for (int r = 0; r < EP; r++)
        for (int e = first_expert(st, r); e < first_expert(st, r) + El; e++)
            for (int t = 0; t < N; t++) {
                if (!st->map[(size_t)t * E + e]) continue;
                const int row = layer_row(st, t), k = fill[row]++;
                p->src_rows[m] = row;
                p->src_slots[(size_t)row * ks + k] = (int32_t)m++;
                p->src_w[(size_t)row * ks + k] = st->probs[(size_t)t * E + e];
                st->src_expert[(size_t)row * ks + k] = e;
            }
    free(fill);
    /* received: rank by rank, within a rank its rows for our experts in order; regrouped by expert */
    st->R = 0;
    for (int s = 0; s < EP; s++) {
        st->recv_rows[s] = 0;
        for (int j = 0; j < El; j++) st->recv_rows[s] += all[(size_t)s * E + st->e0 + j];
        st->R += st->recv_rows[s];
    }
    st->M = st->R;
    p->kr = 1;
    p->pair_rows = malloc(sizeof(int32_t) * (size_t)(st->R + 1));
    p->exp_slots = malloc(sizeof(int32_t) * (size_t)(st->R + 1));
    p->exp_w = malloc(sizeof(float) * (size_t)(st->R + 1));
    if (rc || !p->pair_rows || !p->exp_slots || !p->exp_w) {
        free(all);
        return rc ? rc : lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    }
    m = 0;
    for (int j = 0; j < El; j++) {
        st->efirst[j] = m;
        int64_t base = 0;
        for (int s = 0; s < EP; s++) {
            int64_t at = base;
            for (int i = 0; i < j; i++) at += all[(size_t)s * E + st->e0 + i];
            for (int64_t k = 0; k < all[(size_t)s * E + st->e0 + j]; k++) {
                p->pair_rows[m] = (int32_t)(at + k);
                p->exp_slots[at + k] = (int32_t)m++;
                p->exp_w[at + k] = 1.0f;
            }
            base += st->recv_rows[s];
        }
    }
    st->efirst[El] = m;
    st->rows_sent = st->S - st->send_rows[st->me];
    st->rows_received = st->R - st->recv_rows[st->me];
    free(all);
    return 0;
}

/* flex: a row per (token, destination rank), ranks in order, tokens in order, carrying the token's
 * probs and map for that rank's experts. */
static int plan_flex(lt_moe_state *st, const lt_moe_spec *ms, const lt_backend *be, plan *p, char *err,
                     size_t errlen) {
    const int N = st->N, E = st->E, EP = st->EP, El = st->El;
    int ks = 1;
    st->S = 0;
    for (int r = 0; r < EP; r++) st->send_rows[r] = 0;
    for (int t = 0; t < N; t++) {
        int n = 0;
        for (int r = 0; r < EP; r++) {
            int any = 0;
            for (int j = 0; j < El; j++) any |= st->map[(size_t)t * E + first_expert(st, r) + j];
            n += any, st->send_rows[r] += any;
        }
        if (n > ks) ks = n;
        st->S += n;
    }
    p->ks = ks;
    const size_t NK = (size_t)N * ks;
    const int64_t S = st->S;
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)EP * EP);
    float *pack = malloc(sizeof(float) * (size_t)(S + 1) * 2 * El);
    p->src_rows = malloc(sizeof(int32_t) * (size_t)(S + 1));
    p->src_slots = malloc(sizeof(int32_t) * NK);
    p->src_w = malloc(sizeof(float) * NK);
    st->sent_token = malloc(sizeof(int32_t) * (size_t)(S + 1));
    int *fill = calloc((size_t)N, sizeof(int));
    float *recv = NULL;
    int rc = 0;
    if (!counts || !pack || !p->src_rows || !p->src_slots || !p->src_w || !st->sent_token || !fill) {
        rc = lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
        goto done;
    }
    for (size_t i = 0; i < NK; i++) p->src_slots[i] = -1, p->src_w[i] = 1.0f;
    int64_t i = 0;
    for (int r = 0; r < EP; r++)
        for (int t = 0; t < N; t++) {
            const uint8_t *mp = st->map + (size_t)t * E + first_expert(st, r);
            int any = 0;
            for (int j = 0; j < El; j++) any |= mp[j];
            if (!any) continue;
            const int row = layer_row(st, t);
            for (int j = 0; j < El; j++) {
                pack[i * 2 * El + j] = st->probs[(size_t)t * E + first_expert(st, r) + j];
                pack[i * 2 * El + El + j] = mp[j];
            }
            p->src_rows[i] = row;
            st->sent_token[i] = t;
            p->src_slots[(size_t)row * ks + fill[row]++] = (int32_t)i;
            i++;
        }
    const double t0 = now();
    rc = gather_host(ms, be, st->send_rows, counts, EP, LT_I64, err, errlen);
    st->R = 0;
    for (int s = 0; s < EP; s++) st->recv_rows[s] = counts[(size_t)s * EP + st->me], st->R += st->recv_rows[s];
    recv = malloc(sizeof(float) * (size_t)(st->R + 1) * 2 * El);
    if (!rc && !recv) rc = lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    if (!rc) rc = exchange_host(ms, be, pack, st->send_rows, recv, st->recv_rows, 2 * El, LT_F32, err, errlen);
    st->seconds += now() - t0;
    if (!rc && plan_expert_side(st, p, recv, recv + El, 2 * El))
        rc = lt_fail(err, errlen, "out of host memory dispatching %d tokens", N);
    st->rows_sent = st->S - st->send_rows[st->me];
    st->rows_received = st->R - st->recv_rows[st->me];
done:
    free(counts), free(pack), free(fill), free(recv);
    return rc;
}

/* ---- forward ---- */

/* n int64 counts summed in place over each group of `groups` (NULL: none). */
static int sum_counts(const lt_backend *be, int64_t *counts, int n, lt_comm *const *groups, int ngroups, char *err,
                      size_t errlen) {
    const size_t bytes = sizeof(int64_t) * (size_t)n;
    void *buf = be->alloc(bytes + 64);
    if (!buf) return lt_fail(err, errlen, "out of %s memory for the aux loss's counts", be->name);
    be->to_device(buf, counts, bytes);
    int rc = 0;
    for (int i = 0; i < ngroups && !rc; i++)
        if (groups[i]) rc = lt_comm_all_reduce(groups[i], buf, n, LT_I64, LT_REDUCE_SUM, err, errlen);
    if (!rc) be->to_host(counts, buf, bytes);
    be->release(buf, bytes + 64);
    return rc;
}

/* What the router's aux losses need beyond this rank's tokens (moe_router.h): aux_loss and seq_aux_loss
 * their counts summed over TP x CP (under sequence and context parallelism each rank routes its own
 * tokens); global_aux_loss the running average of its counts summed over TP x DP x CP, kept in the layer's
 * tracker during training (outside it a rank's own counts stand in: the loss is not used there). */
static int aux_inputs(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_moe_weights *w, lt_moe_state *st,
                      char *err, size_t errlen) {
    lt_moe_router_cfg *r = &st->router;
    const int n = lt_moe_aux_counts_len(r, st->E), E = st->E;
    r->tp_cp_size = s->tp->size * s->cp->size;
    if (!n || (r->load_balancing != 4 && r->tp_cp_size == 1)) return 0;
    st->aux_counts = calloc((size_t)n, sizeof(int64_t));
    if (!st->aux_counts) return lt_fail(err, errlen, "out of host memory for the aux loss's counts");
    if (lt_moe_aux_counts(r, st->logits, st->N, E, st->aux_counts, err, errlen)) return -1;
    if (r->load_balancing != 4) {
        lt_comm *groups[2] = {s->tp->size > 1 ? s->tp->comm : NULL, s->cp->size > 1 ? s->cp->comm : NULL};
        r->aux_counts = st->aux_counts;
        return sum_counts(s->tp->be, st->aux_counts, n, groups, 2, err, errlen);
    }
    r->tp_dp_cp_size = ms->global ? lt_comm_size(ms->global) : 1;
    st->global_avg = malloc(sizeof(float) * (size_t)E);
    if (!st->global_avg) return lt_fail(err, errlen, "out of host memory for the aux loss's counts");
    r->global_counts = st->global_avg;
    if (r->eval || !w->global_sum) {
        for (int e = 0; e < E; e++) st->global_avg[e] = (float)st->aux_counts[e];
        return 0;
    }
    if (sum_counts(s->tp->be, st->aux_counts, n, &ms->global, 1, err, errlen)) return -1;
    lt_moe_global_counts_add(w->global_sum, w->global_steps, st->aux_counts, E, st->global_avg);
    return 0;
}

/* Routes the logits (device, layer order) into st's host arrays. */
static int route(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                 lt_moe_state *st, const void *logits_dev, char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int N = st->N, E = st->E;
    float *layer_order = malloc(sizeof(float) * (size_t)N * E);
    st->logits = malloc(sizeof(float) * (size_t)N * E);
    st->probs = malloc(sizeof(float) * (size_t)N * E);
    st->map = malloc((size_t)N * E);
    st->counts = calloc((size_t)E, sizeof(int64_t));
    st->send_rows = calloc((size_t)st->EP, sizeof(int64_t));
    st->recv_rows = calloc((size_t)st->EP, sizeof(int64_t));
    st->efirst = calloc((size_t)st->El + 1, sizeof(int64_t));
    if (!layer_order || !st->logits || !st->probs || !st->map || !st->counts || !st->send_rows || !st->recv_rows ||
        !st->efirst) {
        free(layer_order);
        return lt_fail(err, errlen, "out of host memory routing %d tokens", N);
    }
    to_host_f32(ops, be, layer_order, logits_dev, (size_t)N * E);
    for (int t = 0; t < N; t++)
        memcpy(st->logits + (size_t)t * E, layer_order + (size_t)layer_row(st, t) * E, sizeof(float) * E);
    free(layer_order);
    if (aux_inputs(s, ms, w, st, err, errlen)) return -1;
    if (lt_moe_route_forward(&st->router, st->logits, N, E, st->probs, st->map, st->counts, &st->aux, &st->z, err,
                             errlen))
        return -1;
    for (int e = 0; e < E; e++) st->kept += st->counts[e];
    return 0;
}

/* Device memory for the plan (st->dev) and its upload. */
static int upload(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, lt_moe_state *st, const plan *p,
                  char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int C = s->hidden_size, F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype), S = (size_t)st->S, R = (size_t)st->R, M = (size_t)st->M;
    const size_t NK = (size_t)st->N * (size_t)p->ks, RK = R * (size_t)p->kr, ones = NK > RK ? NK : RK;
    const int source = st->kind != LT_MOE_ALLGATHER;
    size_t at = 0;
#define CARVE(bytes) (at += up64(bytes), at - up64(bytes))
    const size_t o_src = CARVE(source ? sizeof(int32_t) * S : 0), o_pair = CARVE(sizeof(int32_t) * M);
    const size_t o_ss = CARVE(source ? sizeof(int32_t) * NK : 0), o_sw = CARVE(source ? sizeof(float) * NK : 0);
    const size_t o_es = CARVE(sizeof(int32_t) * RK), o_ew = CARVE(sizeof(float) * RK);
    const size_t o_one = CARVE(sizeof(float) * ones), o_x = CARVE(Ed * M * C), o_fc1 = CARVE(Ed * M * fc1);
    const size_t o_act = CARVE(Ed * M * F), o_y = CARVE(Ed * M * C);
    const size_t o_ysrc = CARVE(st->kind == LT_MOE_ALLTOALL ? Ed * S * C : 0);
#undef CARVE
    st->dev_bytes = at + 64;
    st->dev = be->alloc(st->dev_bytes);
    float *h_ones = malloc(sizeof(float) * (ones ? ones : 1));
    if (!st->dev || !h_ones) {
        free(h_ones);
        return lt_fail(err, errlen, "out of %s memory dispatching %lld rows to the experts", be->name,
                       (long long)st->M);
    }
    char *d = st->dev;
    st->src_rows = (int32_t *)(d + o_src), st->pair_rows = (int32_t *)(d + o_pair);
    st->source = (combine){(int32_t *)(d + o_ss), (float *)(d + o_sw), st->N, p->ks};
    st->expert = (combine){(int32_t *)(d + o_es), (float *)(d + o_ew), (int)R, p->kr};
    st->ones = (float *)(d + o_one);
    st->x = d + o_x, st->fc1 = d + o_fc1, st->act = d + o_act, st->y = d + o_y, st->y_src = d + o_ysrc;
    for (size_t i = 0; i < ones; i++) h_ones[i] = 1.0f;
    if (source && S) be->to_device(st->src_rows, p->src_rows, sizeof(int32_t) * S);
    if (M) be->to_device(st->pair_rows, p->pair_rows, sizeof(int32_t) * M);
    if (source) {
        be->to_device(st->source.slots, p->src_slots, sizeof(int32_t) * NK);
        be->to_device(st->source.weights, p->src_w, sizeof(float) * NK);
    }
    if (RK) {
        be->to_device(st->expert.slots, p->exp_slots, sizeof(int32_t) * RK);
        be->to_device(st->expert.weights, p->exp_w, sizeof(float) * RK);
    }
    if (ones) be->to_device(st->ones, h_ones, sizeof(float) * ones);
    free(h_ones);
    return 0;
}

/* Element offset of local expert j's block of rows in a buffer `width` wide. */
static size_t block(const lt_moe_state *st, int j, int width, size_t Ed) {
    return Ed * (size_t)st->efirst[j] * (size_t)width;
}

/* y = the local experts on x: with moe_grouped_gemm each GEMM one grouped call over all local experts
 * and the activation one pass over all their rows (Megatron's GroupedMLP), else expert by expert
 * (SequentialMLP, the tanh GELU fused into fc1). */
static void experts_forward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                            lt_moe_state *st) {
    const int C = s->hidden_size, F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype);
    if (ms->grouped_gemm) {
        const int64_t rows = st->efirst[st->El];
        ops->grouped_linear_forward(st->fc1, st->x, w->fc1_w, w->fc1_b, st->efirst, st->El, C, fc1);
        if (s->gated_linear_unit) ops->swiglu_forward(st->act, st->fc1, (int)rows, F);
        else if (s->gelu_tanh) ops->gelu_tanh_forward(st->act, st->fc1, rows * F);
        else ops->gelu_forward(st->act, st->fc1, rows * F);
        ops->grouped_linear_forward(st->y, st->act, w->fc2_w, w->fc2_b, st->efirst, st->El, F, C);
        return;
    }
    for (int j = 0; j < st->El; j++) {
        const int n = (int)(st->efirst[j + 1] - st->efirst[j]);
        if (!n) continue;
        char *x = (char *)st->x + block(st, j, C, Ed), *pre = (char *)st->fc1 + block(st, j, fc1, Ed);
        char *act = (char *)st->act + block(st, j, F, Ed), *y = (char *)st->y + block(st, j, C, Ed);
        if (s->gelu_tanh) {
            ops->linear_gelu_forward(act, pre, x, w->fc1_w[j], w->fc1_b ? w->fc1_b[j] : NULL, n, C, fc1);
        } else {
            ops->linear_forward(pre, x, w->fc1_w[j], w->fc1_b ? w->fc1_b[j] : NULL, NULL, n, C, fc1);
            if (s->gated_linear_unit) ops->swiglu_forward(act, pre, n, F);
            else ops->gelu_forward(act, pre, (int64_t)n * F);
        }
        ops->linear_forward(y, act, w->fc2_w[j], w->fc2_b ? w->fc2_b[j] : NULL, NULL, n, F, C);
    }
}

/* ---- the shared experts: the dense MLP's body on the normed input, through the TP region ---- */

static int shared_fc1_width(const lt_layer_spec *s, const lt_moe_spec *ms) {
    return (s->gated_linear_unit ? 2 : 1) * ms->shared_ffn_hidden_size;
}

/* out += fc2(act(fc1(ln))) on this rank's outer rows (ln and out [No, C]); saves fc1's output and the
 * activation over the region's N rows in st. */
static int shared_forward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_mlp_weights *w,
                          const lt_layer_ctx *c, const lt_layer_scratch *sc, lt_moe_state *st, const void *ln,
                          void *out, char *err, size_t errlen) {
    const lt_tp *tp = s->tp;
    const lt_backend *be = tp->be;
    const int N = c->B * c->T, No = st->N, C = s->hidden_size, F = ms->shared_ffn_hidden_size;
    const int fc1 = shared_fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype), o_act = up64(Ed * (size_t)N * fc1);
    const size_t o_out = o_act + up64(Ed * (size_t)N * F);
    st->shared_bytes = o_out + Ed * (size_t)No * C + 64;
    st->shared = be->alloc(st->shared_bytes);
    if (!st->shared) return lt_fail(err, errlen, "out of %s memory for the shared experts", be->name);
    st->sh_fc1 = st->shared, st->sh_act = st->shared + o_act;
    const void *in;
    if (lt_tp_enter(tp, c->rows, &in, ln, sc->tp_full, sc->tp_landing, C, err, errlen)) return -1;
    if (s->gelu_tanh) {
        ops->linear_gelu_forward(st->sh_act, st->sh_fc1, in, w->fc1_w, w->fc1_b, N, C, fc1);
    } else {
        ops->linear_forward(st->sh_fc1, in, w->fc1_w, w->fc1_b, NULL, N, C, fc1);
        if (s->gated_linear_unit) ops->swiglu_forward(st->sh_act, st->sh_fc1, N, F);
        else ops->gelu_forward(st->sh_act, st->sh_fc1, (int64_t)N * F);
    }
    /* fc2's partial sums, reduced over TP (scattered under SP), its bias once after */
    void *partial = tp->sequence_parallel ? sc->tp_full : st->shared + o_out, *reduced;
    ops->linear_forward(partial, st->sh_act, w->fc2_w, NULL, NULL, N, F, C);
    if (lt_tp_exit(tp, c->rows, &reduced, partial, st->shared + o_out, sc->tp_landing, C, err, errlen)) return -1;
    if (w->fc2_b) lt_tp_bias_forward(tp, reduced, w->fc2_b, No, C);
    ops->add_forward(out, out, reduced, (int64_t)No * C);
    return 0;
}

/* d(ln) [No, C] (written) of the shared experts from d(out) [No, C]; their gradients accumulate. tmp:
 * shared_backward_bytes of backend memory. */
static size_t shared_backward_bytes(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, int N) {
    const size_t Ed = lt_dtype_size(ops->dtype);
    return up64(Ed * (size_t)N * ms->shared_ffn_hidden_size) + up64(Ed * (size_t)N * shared_fc1_width(s, ms)) +
           up64(Ed * (size_t)N * s->hidden_size) + 64;
}

static int shared_backward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_mlp_weights *w,
                           const lt_mlp_grads *g, const lt_layer_ctx *c, const lt_layer_scratch *sc,
                           const lt_moe_state *st, const void *ln, const void *dout, void *dln, char *tmp, char *err,
                           size_t errlen) {
    const lt_tp *tp = s->tp;
    const int N = c->B * c->T, No = st->N, C = s->hidden_size, F = ms->shared_ffn_hidden_size;
    const int fc1 = shared_fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype);
    char *dact = tmp, *dfc1 = dact + up64(Ed * (size_t)N * F), *dpart = dfc1 + up64(Ed * (size_t)N * fc1);
    const void *dinner, *in;
    void *dx;
    if (g->fc2_b) lt_tp_bias_backward(tp, g->fc2_b, dout, No, C); /* (this rank's rows; summed over TP later) */
    if (lt_tp_exit_backward(tp, c->rows, &dinner, dout, sc->tp_full, sc->tp_landing, C, err, errlen)) return -1;
    if (s->gelu_tanh) {
        ops->linear_dgelu_backward(dfc1, g->fc2_w, NULL, dinner, st->sh_act, w->fc2_w, st->sh_fc1, N, F, C);
    } else {
        ops->linear_backward(dact, g->fc2_w, NULL, dinner, st->sh_act, w->fc2_w, N, F, C);
        if (s->gated_linear_unit) ops->swiglu_backward(dfc1, dact, st->sh_fc1, N, F);
        else ops->gelu_backward(dfc1, dact, st->sh_fc1, (int64_t)N * F);
    }
    if (lt_tp_enter(tp, c->rows, &in, ln, sc->tp_full, sc->tp_landing, C, err, errlen)) return -1; /* again */
    ops->linear_backward(dpart, g->fc1_w, g->fc1_b, dfc1, in, w->fc1_w, N, C, fc1);
    if (lt_tp_enter_backward(tp, c->rows, &dx, dpart, dln, sc->tp_landing, C, err, errlen)) return -1;
    if (dx != dln) tp->be->copy(dln, dx, Ed * (size_t)No * C);
    return 0;
}

/* A combine with its own weights, or with `weights` instead (the ones: a plain sum). */
static void combine_rows(const lt_ops *ops, void *out, const void *in, const combine *cb, const float *weights,
                         int C) {
    ops->moe_combine_forward(out, in, cb->slots, weights ? weights : cb->weights, cb->n, cb->k, C);
}

int lt_moe_mlp_forward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                       lt_layer_ctx *c, const void *h, void *out, lt_moe_state **state, const lt_layer_scratch *sc,
                       char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    /* under sequence parallelism a TP rank holds (and routes) its [B, T / TP] rows */
    const int B = c->B, T = c->T, N = lt_layer_outer_rows(s, B, T), C = s->hidden_size, E = ms->num_experts;
    const int EP = ms->ep_size, El = E * ms->etp / EP;
    const size_t Ed = lt_dtype_size(ops->dtype);
    lt_mlp_acts *a = &c->mlp;
    *state = NULL;
    lt_moe_state *st = calloc(1, sizeof *st);
    void *logits = be->alloc(Ed * (size_t)N * E);
    if (!st || !logits) {
        free(st);
        if (logits) be->release(logits, Ed * (size_t)N * E);
        return lt_fail(err, errlen, "out of %s memory for the router's logits", be->name);
    }
    *st = (lt_moe_state){.N = N, .E = E, .El = El, .e0 = ms->ep_rank / ms->etp * El, .B = B, .T = N / B, .EP = EP,
                         .me = ms->ep_rank, .etp = ms->etp, .kind = ms->dispatcher, .router = ms->router};
    st->router.seq_length = N / B, st->router.micro_batch_size = B;
    st->router.expert_bias = w->expert_bias;
    st->router.eval = !c->training;
    lt_layer_norm_forward(s, ops, a->ln, a->ln_mean, a->ln_rstd, h, w->ln_w, w->ln_b, N);
    ops->linear_forward(logits, a->ln, w->router_w, NULL, NULL, N, C, E);
    int rc = route(s, ms, ops, w, st, logits, err, errlen);
    be->release(logits, Ed * (size_t)N * E);
    plan p = {0};
    if (!rc) {
        rc = st->kind == LT_MOE_ALLGATHER ? plan_allgather(st, ms, be, &p, err, errlen)
             : st->kind == LT_MOE_ALLTOALL ? plan_alltoall(st, ms, be, &p, err, errlen)
                                           : plan_flex(st, ms, be, &p, err, errlen);
    }
    if (!rc) rc = upload(s, ms, ops, st, &p, err, errlen);
    plan_free(&p);
    /* the rows in flight: what is sent, what arrives, what the experts' combine gives back */
    const size_t S = (size_t)st->S, R = (size_t)st->R;
    const size_t o_recv = up64(Ed * S * C), o_back = o_recv + up64(Ed * R * C), tmp_bytes = o_back + Ed * S * C + 64;
    char *tmp = rc ? NULL : be->alloc(tmp_bytes);
    if (!rc && !tmp) rc = lt_fail(err, errlen, "out of %s memory for the MoE dispatch (%zu bytes)", be->name, tmp_bytes);
    if (rc) {
        lt_moe_state_free(s, st);
        return -1;
    }
    void *x_send = tmp, *x_recv = tmp + o_recv, *y_recv = tmp + o_recv, *y_back = tmp + o_back;
    double t0 = now();
    if (st->kind == LT_MOE_ALLGATHER) {
        x_recv = (void *)a->ln;
        if (EP > 1) {
            x_recv = tmp + o_recv;
            rc = lt_comm_all_gather(ms->ep, a->ln, x_recv, (int64_t)N * C, ops->dtype, err, errlen);
        }
    } else {
        if (S) ops->embedding_forward(x_send, st->src_rows, a->ln, (int)S, C);
        if (EP == 1) x_recv = x_send;
        else rc = exchange(ms, be, x_send, st->send_rows, x_recv, st->recv_rows, C, ops->dtype, err, errlen);
    }
    if (!rc && st->M) ops->embedding_forward(st->x, st->pair_rows, x_recv, (int)st->M, C); /* by local expert */
    st->seconds += now() - t0;
    if (!rc) experts_forward(s, ms, ops, w, st);
    t0 = now();
    if (!rc && st->kind == LT_MOE_ALLGATHER) {
        if (EP == 1) {
            combine_rows(ops, out, st->y, &st->expert, NULL, C);
        } else {
            combine_rows(ops, y_recv, st->y, &st->expert, NULL, C);
            rc = lt_comm_reduce_scatter(ms->ep, y_recv, out, (int64_t)N * C, ops->dtype, LT_REDUCE_SUM, err, errlen);
        }
    } else if (!rc) {
        void *back = st->kind == LT_MOE_ALLTOALL ? st->y_src : y_back;
        if (EP == 1) y_recv = back;
        if (R) combine_rows(ops, y_recv, st->y, &st->expert, NULL, C); /* alltoall: back to received order */
        rc = exchange(ms, be, y_recv, st->recv_rows, back, st->send_rows, C, ops->dtype, err, errlen);
        if (!rc) combine_rows(ops, out, back, &st->source, NULL, C);
    }
    st->seconds += now() - t0;
    be->release(tmp, tmp_bytes);
    if (!rc && ms->shared_ffn_hidden_size) rc = shared_forward(s, ms, ops, &w->shared, c, sc, st, a->ln, out, err, errlen);
    if (rc) {
        lt_moe_state_free(s, st);
        return -1;
    }
    const float pd = c->training ? s->hidden_dropout : 0.0f;
    if (pd > 0)
        lt_tp_dropout_forward(s->tp, c->rows, out, out, B, T, C, pd, lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"));
    ops->add_forward(out, out, h, (int64_t)N * C);
    *state = st;
    return 0;
}

/* ---- backward ---- */

/* d(probs) [N, E] (router order) from the combine weights' gradients: at the source (alltoall: dw [N, ks]
 * in layer rows, each token's slots its experts in order), or at the experts (dw [R, kr]; allgather: the
 * received rows are every rank's tokens, so a reduce-scatter of [EP N, E] brings each rank its own; flex:
 * [R, El] go back the way the rows came). */
static int probs_grad(const lt_moe_spec *ms, const lt_backend *be, lt_moe_state *st, const void *dw_dev, float *dprobs,
                      char *err, size_t errlen) {
    const int N = st->N, E = st->E, El = st->El;
    if (st->kind == LT_MOE_ALLTOALL) {
        const int ks = st->source.k;
        float *hw = malloc(sizeof(float) * (size_t)N * ks);
        if (!hw) return lt_fail(err, errlen, "out of host memory for the router's gradient");
        be->to_host(hw, dw_dev, sizeof(float) * (size_t)N * ks);
        for (size_t i = 0; i < (size_t)N * ks; i++) /* an expert's etp partial outputs: their d(weight)s add */
            if (st->src_expert[i] >= 0)
                dprobs[(size_t)router_token(st, (int)(i / ks)) * E + st->src_expert[i]] += hw[i];
        free(hw);
        return 0;
    }
    const int64_t R = st->R, kr = st->expert.k;
    const int width = st->kind == LT_MOE_ALLGATHER ? E : El, off = st->kind == LT_MOE_ALLGATHER ? st->e0 : 0;
    float *hw = malloc(sizeof(float) * (size_t)(R * kr + 1)), *pack = calloc((size_t)(R + 1) * width, sizeof(float));
    const int64_t back_rows = st->kind == LT_MOE_ALLGATHER ? N : st->S;
    float *back = malloc(sizeof(float) * (size_t)(back_rows + 1) * width);
    int rc = 0;
    if (!hw || !pack || !back) {
        rc = lt_fail(err, errlen, "out of host memory for the router's gradient");
        goto done;
    }
    if (R * kr > 0) be->to_host(hw, dw_dev, sizeof(float) * (size_t)(R * kr));
    for (int64_t i = 0; i < R * kr; i++)
        if (st->slot_expert[i] >= 0) pack[(i / kr) * width + off + st->slot_expert[i]] = hw[i];
    const double t0 = now();
    if (st->kind == LT_MOE_ALLGATHER) {
        if (st->EP == 1) {
            memcpy(back, pack, sizeof(float) * (size_t)N * E);
        } else {
            const size_t all = sizeof(float) * (size_t)R * E, mine = sizeof(float) * (size_t)N * E;
            char *buf = be->alloc(up64(all) + mine + 64);
            if (!buf) {
                rc = lt_fail(err, errlen, "out of %s memory for the router's gradient", be->name);
                goto done;
            }
            be->to_device(buf, pack, all);
            rc = lt_comm_reduce_scatter(ms->ep, buf, buf + up64(all), (int64_t)N * E, LT_F32, LT_REDUCE_SUM, err,
                                        errlen);
            if (!rc) be->to_host(back, buf + up64(all), mine);
            be->release(buf, up64(all) + mine + 64);
        }
        for (int t = 0; !rc && t < N; t++)
            memcpy(dprobs + (size_t)t * E, back + (size_t)layer_row(st, t) * E, sizeof(float) * E);
    } else {
        rc = exchange_host(ms, be, pack, st->recv_rows, back, st->send_rows, El, LT_F32, err, errlen);
        int64_t i = 0;
        for (int r = 0; !rc && r < st->EP; r++)
            for (int64_t k = 0; k < st->send_rows[r]; k++, i++)
                for (int j = 0; j < El; j++) {
                    const size_t at = (size_t)st->sent_token[i] * E + (size_t)first_expert(st, r) + j;
                    if (st->map[at]) dprobs[at] += back[i * El + j];
                }
    }
    st->backward_seconds += now() - t0;
done:
    free(hw), free(pack), free(back);
    return rc;
}

int lt_moe_mlp_backward(const lt_layer_spec *s, const lt_moe_spec *ms, const lt_ops *ops, const lt_moe_weights *w,
                        const lt_moe_grads *g, const lt_layer_ctx *c, lt_moe_state *st, const void *h, void *dx,
                        const lt_layer_scratch *sc, char *err, size_t errlen) {
    const lt_backend *be = s->tp->be;
    const int B = c->B, T = c->T, N = st->N, C = s->hidden_size, E = st->E, EP = st->EP;
    const int F = ms->ffn_hidden_size, fc1 = fc1_width(s, ms);
    const size_t Ed = lt_dtype_size(ops->dtype), M = (size_t)st->M, S = (size_t)st->S, R = (size_t)st->R;
    const lt_mlp_acts *a = &c->mlp;
    /* d(combined): dx through the dropout mask */
    const void *d = dx;
    const float p = c->training ? s->hidden_dropout : 0.0f;
    if (p > 0) {
        lt_tp_dropout_backward(s->tp, c->rows, sc->d_c, dx, B, T, C, p,
                               lt_dropout_key(c->dropout_seed, c->layer, "mlp_out"));
        d = sc->d_c;
    }
    const size_t NK = (size_t)N * st->source.k, RK = R * (size_t)st->expert.k;
    size_t at = 0;
#define CARVE(bytes) (at += up64(bytes), at - up64(bytes))
    const size_t o_dsrc = CARVE(Ed * S * C), o_drecv = CARVE(Ed * R * C), o_dy = CARVE(Ed * M * C);
    const size_t o_dact = CARVE(Ed * M * F), o_dfc1 = CARVE(Ed * M * fc1), o_dx = CARVE(Ed * M * C);
    const size_t o_dws = CARVE(sizeof(float) * NK), o_dwe = CARVE(sizeof(float) * RK);
    const size_t o_dlog = CARVE(Ed * (size_t)N * E);
    const int shared = ms->shared_ffn_hidden_size > 0;
    const size_t o_dsh = CARVE(shared ? Ed * (size_t)N * C : 0); /* the shared experts' d(ln) */
    const size_t o_shtmp = CARVE(shared ? shared_backward_bytes(s, ms, ops, c->B * c->T) : 0);
#undef CARVE
    const size_t bytes = at + 64;
    char *base = be->alloc(bytes);
    float *dprobs = calloc((size_t)N * E, sizeof(float)), *dlogits = malloc(sizeof(float) * (size_t)N * E);
    float *layer_order = malloc(sizeof(float) * (size_t)N * E);
    int rc = 0;
    if (!base || !dprobs || !dlogits || !layer_order) {
        rc = lt_fail(err, errlen, "out of memory for the MoE block's backward (%zu bytes)", bytes);
        goto done;
    }
    char *d_src = base + o_dsrc, *d_recv = base + o_drecv, *dy = base + o_dy, *dact = base + o_dact;
    char *dfc1 = base + o_dfc1, *dxe = base + o_dx, *dlog = base + o_dlog, *dsh = base + o_dsh;
    if (shared && shared_backward(s, ms, ops, &w->shared, &g->shared, c, sc, st, a->ln, d, dsh, base + o_shtmp, err,
                                  errlen)) {
        rc = -1;
        goto done;
    }
    float *dw_src = (float *)(base + o_dws), *dw_exp = (float *)(base + o_dwe); /* the combines' d(weights) */
    /* d(combined) to the experts' rows, the way the tokens went */
    double t0 = now();
    const void *dy_recv = d_recv;
    if (st->kind == LT_MOE_ALLGATHER) {
        if (EP == 1) dy_recv = d;
        else rc = lt_comm_all_gather(ms->ep, d, d_recv, (int64_t)N * C, ops->dtype, err, errlen);
    } else {
        if (st->kind == LT_MOE_ALLTOALL)
            ops->moe_combine_backward(d_src, dw_src, d, st->y_src, st->source.slots, st->source.weights, N, st->source.k,
                                      (int)S, C);
        else if (S)
            ops->embedding_forward(d_src, st->src_rows, d, (int)S, C); /* each row's token, weight 1 */
        if (EP == 1) dy_recv = d_src;
        else rc = exchange(ms, be, d_src, st->send_rows, d_recv, st->recv_rows, C, ops->dtype, err, errlen);
    }
    st->backward_seconds += now() - t0;
    if (rc) goto done;
    if (R)
        ops->moe_combine_backward(dy, dw_exp, dy_recv, st->y,
                                  st->expert.slots, st->expert.weights, (int)R, st->expert.k, (int)M, C);
    if (ms->grouped_gemm) { /* experts_forward's grouped calls, backwards */
        const int64_t rows = st->efirst[st->El];
        ops->grouped_linear_backward(dact, g->fc2_w, g->fc2_b, dy, st->act, w->fc2_w, st->efirst, st->El, F, C);
        if (s->gated_linear_unit) ops->swiglu_backward(dfc1, dact, st->fc1, (int)rows, F);
        else if (s->gelu_tanh) ops->gelu_tanh_backward(dfc1, dact, st->fc1, rows * F);
        else ops->gelu_backward(dfc1, dact, st->fc1, rows * F);
        ops->grouped_linear_backward(dxe, g->fc1_w, g->fc1_b, dfc1, st->x, w->fc1_w, st->efirst, st->El, C, fc1);
    } else {
        for (int j = 0; j < st->El; j++) {
            const int n = (int)(st->efirst[j + 1] - st->efirst[j]);
            if (!n) continue;
            const size_t oc = block(st, j, C, Ed), of = block(st, j, F, Ed), o1 = block(st, j, fc1, Ed);
            float *gb2 = g->fc2_b ? g->fc2_b[j] : NULL, *gb1 = g->fc1_b ? g->fc1_b[j] : NULL;
            if (s->gelu_tanh) {
                ops->linear_dgelu_backward(dfc1 + o1, g->fc2_w[j], gb2, dy + oc, (char *)st->act + of, w->fc2_w[j],
                                           (char *)st->fc1 + o1, n, F, C);
            } else {
                ops->linear_backward(dact + of, g->fc2_w[j], gb2, dy + oc, (char *)st->act + of, w->fc2_w[j], n, F,
                                     C);
                if (s->gated_linear_unit) ops->swiglu_backward(dfc1 + o1, dact + of, (char *)st->fc1 + o1, n, F);
                else ops->gelu_backward(dfc1 + o1, dact + of, (char *)st->fc1 + o1, (int64_t)n * F);
            }
            ops->linear_backward(dxe + oc, g->fc1_w[j], gb1, dfc1 + o1, (char *)st->x + oc, w->fc1_w[j], n, C, fc1);
        }
    }
    /* d(ln) from the experts: each received row's expert rows summed (weights 1), back to the tokens */
    t0 = now();
    if (st->kind == LT_MOE_ALLGATHER) {
        if (EP == 1) {
            combine_rows(ops, sc->d_c2, dxe, &st->expert, st->ones, C);
        } else {
            combine_rows(ops, d_recv, dxe, &st->expert, st->ones, C);
            rc = lt_comm_reduce_scatter(ms->ep, d_recv, sc->d_c2, (int64_t)N * C, ops->dtype, LT_REDUCE_SUM, err,
                                        errlen);
        }
    } else {
        void *dx_recv = EP == 1 ? (void *)d_src : (void *)d_recv;
        if (R) combine_rows(ops, dx_recv, dxe, &st->expert, st->ones, C);
        rc = exchange(ms, be, dx_recv, st->recv_rows, d_src, st->send_rows, C, ops->dtype, err, errlen);
        if (!rc) combine_rows(ops, sc->d_c2, d_src, &st->source, st->ones, C);
    }
    st->backward_seconds += now() - t0;
    /* the router: d(probs) from the combine's weights, then the router's own backward with the aux and
     * z losses at the autoscaler's scale, then the gating GEMM */
    if (!rc) rc = probs_grad(ms, be, st, st->kind == LT_MOE_ALLTOALL ? dw_src : dw_exp, dprobs, err, errlen);
    if (rc) goto done;
    if (lt_moe_route_backward(&st->router, st->logits, st->probs, st->map, st->counts, N, E, dprobs,
                              ms->aux_loss_scale, ms->aux_loss_scale, dlogits, err, errlen)) {
        rc = -1;
        goto done;
    }
    for (int t = 0; t < N; t++)
        memcpy(layer_order + (size_t)layer_row(st, t) * E, dlogits + (size_t)t * E, sizeof(float) * E);
    to_device_dtype(ops, be, dlog, layer_order, (size_t)N * E);
    ops->linear_backward(sc->d_c, g->router_w, NULL, dlog, a->ln, w->router_w, N, C, E);
    ops->add_forward(sc->d_c2, sc->d_c2, sc->d_c, (int64_t)N * C);
    if (shared) ops->add_forward(sc->d_c2, sc->d_c2, dsh, (int64_t)N * C);
    lt_layer_norm_backward(s, ops, dx, g->ln_w, g->ln_b, sc->d_c2, h, w->ln_w, a->ln_mean, a->ln_rstd, N);
done:
    if (base) be->release(base, bytes);
    free(dprobs), free(dlogits), free(layer_order);
    return rc;
}

// The per-op GPU time profile (LUATRON_CUDA_PROFILE=1): where a training step's device time goes.
//
// When profiling is on, cuda_profile_install replaces every entry of the backend table that issues
// device work (fill, fill_normal, sum_squares, scale, cast_to_bf16, adamw_update, sgd_update, memzero,
// to_device, to_host, copy) and every op of both op tables with a wrapper that records a cudaEvent on
// the stream before and after the real function; when it is off nothing is replaced, so the ops cost
// exactly what they cost without this file. Ops called from inside other ops (cuda_memzero inside
// linear_forward, say) are part of their caller's time, never counted twice.
//
// Nothing waits per op: the event pairs queue up in a ring (events are created once, on first use,
// and reused) and are read with cudaEventElapsedTime only once they have completed: by synchronize(),
// which has just waited for the stream anyway, by profile_report (the pairs that have completed), and,
// should the ring fill up between two synchronizes, by waiting for its oldest pair, thousands of ops
// behind the host. Times are aggregated per slot: one per op and precision ("bf16.linear_forward",
// "fp32.add_forward") and one per backend function ("memzero", "adamw_update").
//
// An op's time is the stream's time from its first event to its second: its kernels, plus any time
// the GPU waits in between for the host to launch them (so launch-bound ops show their launch cost).
// The header's span is the stream time from the first op's start to the last op's end of each batch
// of pairs read together (usually one training step, synchronize to synchronize); span minus the ops'
// time is when the GPU waited for the host between ops.
//
// FLOPs are counted for the GEMMs (linear_forward 2 N IN OUT; linear_backward one more GEMM of the
// same size when dinp is given) and the causal attention (forward 4 B H T^2 D / 2, backward 2.5 times
// that); bytes are those an op must read and write at least (each operand once), for the GB/s column.
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tuple>
#include <type_traits>

#include "engine/ops/cuda/internal.cuh"

/* ---------------- the slots ---------------- */

/* Every op of lt_ops, in any order (the static_assert below checks that none is missing). */
#define PROF_LT_OPS(X)                                                                                   \
    X(embedding_forward) X(embedding_backward) X(position_embedding_forward) X(position_embedding_backward) \
    X(moe_combine_forward) X(moe_combine_backward)                                                          \
    X(layernorm_forward) X(layernorm_backward) X(rmsnorm_forward) X(rmsnorm_backward) X(linear_forward)     \
    X(linear_backward) X(linear_gelu_forward) X(linear_dgelu_backward) X(grouped_linear_forward) X(grouped_linear_backward)    \
    X(attention_forward)                   \
    X(attention_backward) X(attention_kv_forward) X(attention_merge) X(attention_kv_backward) X(rope_forward) X(rope_backward) X(qk_norm_forward) X(qk_norm_backward)             \
    X(gelu_forward) X(gelu_backward) X(gelu_tanh_forward) X(gelu_tanh_backward) X(swiglu_forward) X(swiglu_backward) X(add_forward) X(dropout_forward) \
    X(dropout_backward) X(cross_entropy_forward) X(cross_entropy_backward)
/* The backend's own functions that issue device work. */
#define PROF_BACKEND_FNS(X)                                                                               \
    X(fill) X(fill_normal) X(sum_squares) X(scale) X(cast_to_bf16) X(adamw_update) X(sgd_update) X(memzero) \
    X(to_device) X(to_host) X(copy)

enum {
#define PROF_ENUM(f) PROF_OP_##f,
    PROF_LT_OPS(PROF_ENUM) PROF_NOPS
};
enum {
    PROF_BACKEND_FNS(PROF_ENUM) PROF_NFNS
#undef PROF_ENUM
};
static_assert(PROF_NOPS * sizeof(void (*)(void)) == sizeof(lt_ops) - offsetof(lt_ops, embedding_forward),
              "PROF_LT_OPS must list every op of lt_ops");

/* Slots: the fp32 table's ops, the bf16 table's, then the backend functions. */
#define PROF_SLOT_F32(op) (op)
#define PROF_SLOT_BF16(op) (PROF_NOPS + (op))
#define PROF_SLOT_FN(fn) (2 * PROF_NOPS + (fn))
#define PROF_NSLOTS (2 * PROF_NOPS + PROF_NFNS)

typedef struct {
    double flops, bytes; /* 0: not counted */
} prof_cost;

typedef struct {
    char name[64];
    long long calls;
    double ms, flops, bytes;
} prof_stat;

#define PROF_RING 8192 /* event pairs in flight between two reads */

typedef struct {
    cudaEvent_t start, end; /* created on first use, kept for the ring slot's next pairs */
    int slot;               /* -1: the op is still running on the host (its end not recorded yet) */
    int bad;                /* an event could not be recorded: dropped when read */
    prof_cost cost;
} prof_pair;

static pthread_mutex_t prof_lock = PTHREAD_MUTEX_INITIALIZER;
static prof_stat prof_stats[PROF_NSLOTS];
static prof_pair prof_ring[PROF_RING];
static long long prof_head, prof_tail; /* pairs [head, tail) are pending, oldest first */
static long long prof_discard;         /* pairs before this index were issued before a clear: not counted */
static long long prof_lost;            /* pairs dropped (an event failed, or the stream failed) */
static double prof_span_ms;            /* stream time covered by the batches read so far */

/* ---------------- reading completed pairs ---------------- */

/* Reads the pending pairs in order: all of them (wait: the stream has been synchronized), or those
 * whose end event has completed. Lock held. */
static void prof_collect_locked(int wait) {
    long long first = -1, last = -1;
    while (prof_head < prof_tail) {
        prof_pair *p = &prof_ring[prof_head % PROF_RING];
        if (p->slot < 0) break; /* the op issuing now: read at a later call */
        if (!p->bad && !wait && prof_head >= prof_discard) {
            const cudaError_t q = cudaEventQuery(p->end);
            if (q == cudaErrorNotReady) { /* the stream runs in order: the later ones are not done either */
                if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError(); /* not an error */
                break;
            }
            if (q != cudaSuccess) p->bad = 1;
        }
        float ms = 0.0f;
        if (prof_head < prof_discard) {
            prof_head++;
            continue;
        }
        if (!p->bad && cudaEventElapsedTime(&ms, p->start, p->end) != cudaSuccess) p->bad = 1;
        if (p->bad) {
            prof_lost++;
            cudaGetLastError(); /* a profiling failure is not an op's error */
        } else {
            prof_stat *s = &prof_stats[p->slot];
            s->calls++;
            s->ms += ms;
            s->flops += p->cost.flops;
            s->bytes += p->cost.bytes;
            if (first < 0) first = prof_head;
            last = prof_head;
        }
        prof_head++;
    }
    if (first >= 0) { /* the batch's span: its events stay unused until the lock is released */
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, prof_ring[first % PROF_RING].start, prof_ring[last % PROF_RING].end) ==
            cudaSuccess)
            prof_span_ms += ms;
        else
            cudaGetLastError();
    }
}

/* After synchronize: ok, the stream finished everything (read all); else it failed (drop all). */
void cuda_profile_collect(int ok) {
    pthread_mutex_lock(&prof_lock);
    if (ok) {
        prof_collect_locked(1);
    } else {
        for (; prof_head < prof_tail && prof_ring[prof_head % PROF_RING].slot >= 0; prof_head++)
            prof_lost += prof_head >= prof_discard;
    }
    pthread_mutex_unlock(&prof_lock);
}

/* ---------------- recording ---------------- */

/* Before an op: a ring slot with its start event recorded; returns its index. */
static long long prof_begin(void) {
    pthread_mutex_lock(&prof_lock);
    if (prof_tail - prof_head >= PROF_RING) { /* full: read what completed, else wait for the oldest pair */
        prof_collect_locked(0);
        if (prof_tail - prof_head >= PROF_RING) {
            prof_pair *old = &prof_ring[prof_head % PROF_RING];
            if (old->slot >= 0 && !old->bad && cudaEventSynchronize(old->end) != cudaSuccess) old->bad = 1;
            prof_collect_locked(0);
        }
    }
    const long long idx = prof_tail++;
    prof_pair *p = &prof_ring[idx % PROF_RING];
    p->slot = -1;
    p->bad = 0;
    if (!p->start && cudaEventCreate(&p->start) != cudaSuccess) p->start = NULL;
    if (!p->end && cudaEventCreate(&p->end) != cudaSuccess) p->end = NULL;
    if (!p->start || !p->end || cudaEventRecord(p->start, cuda_ctx.stream) != cudaSuccess) p->bad = 1;
    if (p->bad) cudaGetLastError(); /* not the op's error */
    pthread_mutex_unlock(&prof_lock);
    return idx;
}

/* After the op: its end event, and the slot it is counted in. */
static void prof_end(long long idx, int slot, prof_cost cost) {
    pthread_mutex_lock(&prof_lock);
    prof_pair *p = &prof_ring[idx % PROF_RING];
    if (!p->bad && cudaEventRecord(p->end, cuda_ctx.stream) != cudaSuccess) {
        p->bad = 1;
        cudaGetLastError();
    }
    p->cost = cost;
    p->slot = slot;
    pthread_mutex_unlock(&prof_lock);
}

/* ---------------- the wrappers ---------------- */

/* prof_op<Slot, ES, Cost, F>::call has the signature of F, records a pair around orig and counts it in
 * Slot, with Cost{}(ES, args...) FLOPs and bytes (ES: the table's element size, 0 for the backend's). */
template <int Slot, int ES, typename Cost, typename F>
struct prof_op;
template <int Slot, int ES, typename Cost, typename R, typename... A>
struct prof_op<Slot, ES, Cost, R (*)(A...)> {
    static R (*orig)(A...);
    static R call(A... a) {
        const long long idx = prof_begin();
        if constexpr (std::is_void<R>::value) {
            orig(a...);
            prof_end(idx, Slot, Cost{}((double)ES, a...));
        } else {
            R r = orig(a...);
            prof_end(idx, Slot, Cost{}((double)ES, a...));
            return r;
        }
    }
};
template <int Slot, int ES, typename Cost, typename R, typename... A>
R (*prof_op<Slot, ES, Cost, R (*)(A...)>::orig)(A...) = NULL;

/* The costs, from the op's arguments (ARG(k): the k-th, as a double; PTR(k): as it is). */
#define ARG(k) ((double)std::get<k>(std::tie(a...)))
#define PTR(k) (std::get<k>(std::tie(a...)))
#define PROF_COST(op, flops_expr, bytes_expr)                                                 \
    struct prof_cost_##op {                                                                   \
        template <typename... A>                                                              \
        prof_cost operator()(double es, A... a) const {                                       \
            (void)es;                                                                         \
            return prof_cost{(double)(flops_expr), (double)(bytes_expr)};                     \
        }                                                                                     \
    };
/* (out, ids, table, N, C) */
PROF_COST(embedding_forward, 0, 2 * es * ARG(3) * ARG(4) + 4 * ARG(3))
/* (dtable, dout, ids, N, C): dout once, the fp32 rows read and written */
PROF_COST(embedding_backward, 0, es * ARG(3) * ARG(4) + 8 * ARG(3) * ARG(4) + 4 * ARG(3))
/* (out, wpe, B, T, C, pos) */
PROF_COST(position_embedding_forward, 0, es * (2 * ARG(2) * ARG(3) * ARG(4) + ARG(3) * ARG(4)))
/* (dwpe, dout, B, T, C, pos) */
PROF_COST(position_embedding_backward, 0, es * ARG(2) * ARG(3) * ARG(4) + 8 * ARG(3) * ARG(4))
/* (out, y, rows, weights, N, k, C): the k rows of each token read (at most: empty slots read none), out
 * written, rows and weights */
PROF_COST(moe_combine_forward, 0, es * (ARG(4) * ARG(5) + ARG(4)) * ARG(6) + 8 * ARG(4) * ARG(5))
/* (dy, dweights, dout, y, rows, weights, N, k, M, C): dy written and y read (M rows each), dout read,
 * rows, weights and dweights */
PROF_COST(moe_combine_backward, 0, es * (2 * ARG(8) + ARG(6)) * ARG(9) + 12 * ARG(6) * ARG(7))
/* (out, mean, rstd, inp, weight, bias, N, C, eps) */
PROF_COST(layernorm_forward, 0, 2 * es * ARG(6) * ARG(7) + 8 * ARG(6))
/* (dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C): dinp read and written, dout, inp */
PROF_COST(layernorm_backward, 0, 4 * es * ARG(8) * ARG(9) + 8 * ARG(8))
/* (out, rstd, inp, weight, N, C, eps) */
PROF_COST(rmsnorm_forward, 0, 2 * es * ARG(4) * ARG(5) + 4 * ARG(4))
/* (dinp, dweight, dout, inp, weight, rstd, N, C) */
PROF_COST(rmsnorm_backward, 0, 4 * es * ARG(6) * ARG(7) + 4 * ARG(6))
/* (out, inp, weight, bias, residual, N, IN, OUT) */
PROF_COST(linear_forward, 2 * ARG(5) * ARG(6) * ARG(7), 0)
/* (dinp, dweight, dbias, dout, inp, weight, N, IN, OUT): dweight always, dinp when given */
PROF_COST(linear_backward, (PTR(0) ? 4 : 2) * ARG(6) * ARG(7) * ARG(8), 0)
/* (act, pre, inp, weight, bias, N, IN, OUT) */
PROF_COST(linear_gelu_forward, 2 * ARG(5) * ARG(6) * ARG(7), 0)
/* (dpre, dweight, dbias, dout, inp, weight, pre, N, IN, OUT) */
PROF_COST(linear_dgelu_backward, 4 * ARG(7) * ARG(8) * ARG(9), 0)
/* (out, inp, weight, bias, first, G, IN, OUT): first[G] rows in all */
PROF_COST(grouped_linear_forward, 2 * (double)PTR(4)[PTR(5)] * ARG(6) * ARG(7), 0)
/* (dinp, dweight, dbias, dout, inp, weight, first, G, IN, OUT): dweight always, dinp when given */
PROF_COST(grouped_linear_backward, (PTR(0) ? 4 : 2) * (double)PTR(6)[PTR(7)] * ARG(8) * ARG(9), 0)
/* (out, lse, qkv, B, T, H, G, D, p, key, head_offset, heads_total): 4 B H T^2 D / 2 */
PROF_COST(attention_forward, 2 * ARG(3) * ARG(5) * ARG(4) * ARG(4) * ARG(7), 0)
/* (dqkv, dout, qkv, out, lse, B, T, H, G, D, p, key, head_offset, heads_total): 2.5 times the forward */
PROF_COST(attention_backward, 5 * ARG(5) * ARG(7) * ARG(6) * ARG(6) * ARG(9), 0)
/* (out, lse, qkv, kv, B, Tq, Tk, H, G, D, q_pos, k_pos, S, p, key, head_offset, heads_total): 4 B H Tq Tk D
 * for the whole block (the elements the positions mask out are computed too) */
PROF_COST(attention_kv_forward, 4 * ARG(4) * ARG(7) * ARG(5) * ARG(6) * ARG(9), 0)
/* (out, lse, out_b, lse_b, B, T, H, D): out read and written, out_b read, both lse */
PROF_COST(attention_merge, 0, 3 * es * ARG(4) * ARG(5) * ARG(6) * ARG(7) + 12 * ARG(4) * ARG(6) * ARG(5))
/* (dq, dkv, dout, qkv, kv, out, lse, B, Tq, Tk, H, G, D, ...): 2.5 times the forward */
PROF_COST(attention_kv_backward, 10 * ARG(7) * ARG(10) * ARG(8) * ARG(9) * ARG(12), 0)
/* (qkv, B, T, H, G, D, base, pos): the query and key heads read and written */
PROF_COST(rope_forward, 0, 2 * es * ARG(1) * ARG(2) * (ARG(3) + ARG(4)) * ARG(5))
PROF_COST(rope_backward, 0, 2 * es * ARG(1) * ARG(2) * (ARG(3) + ARG(4)) * ARG(5))
/* (out, mean, rstd, inp, qw, qb, kw, kb, N, H, G, D, eps): qkv read and written, statistics of N (H + G) rows */
PROF_COST(qk_norm_forward, 0, 2 * es * ARG(8) * (ARG(9) + 2 * ARG(10)) * ARG(11) + 8 * ARG(8) * (ARG(9) + ARG(10)))
/* (dinp, dqw, dqb, dkw, dkb, dout, inp, qw, kw, mean, rstd, N, H, G, D): dout, inp read, dinp written and read */
PROF_COST(qk_norm_backward, 0,
          4 * es * ARG(11) * (ARG(12) + 2 * ARG(13)) * ARG(14) + 8 * ARG(11) * (ARG(12) + ARG(13)))
/* (out, inp, n) */
PROF_COST(gelu_forward, 0, 2 * es * ARG(2))
/* (dinp, dout, inp, n): dinp written, not read */
PROF_COST(gelu_backward, 0, 3 * es * ARG(3))
PROF_COST(gelu_tanh_forward, 0, 2 * es * ARG(2))
PROF_COST(gelu_tanh_backward, 0, 3 * es * ARG(3))
/* (out, inp, N, F) */
PROF_COST(swiglu_forward, 0, 3 * es * ARG(2) * ARG(3))
/* (dinp, dout, inp, N, F): dout, inp read, dinp written */
PROF_COST(swiglu_backward, 0, 5 * es * ARG(3) * ARG(4))
/* (out, a, b, n) */
PROF_COST(add_forward, 0, 3 * es * ARG(3))
/* (out, inp, n, p, key, first): nothing at all for p = 0 in place */
PROF_COST(dropout_forward, 0, (ARG(3) > 0 || PTR(0) != PTR(1)) ? 2 * es * ARG(2) : 0)
/* (dinp, dout, n, p, key, first) */
PROF_COST(dropout_backward, 0, 2 * es * ARG(2))
/* (losses, lse, logits, targets, N, V) */
PROF_COST(cross_entropy_forward, 0, es * ARG(4) * ARG(5) + 12 * ARG(4))
/* (dlogits, logits, lse, targets, dloss, N, V) */
PROF_COST(cross_entropy_backward, 0, 2 * es * ARG(5) * ARG(6) + 12 * ARG(5))
/* the backend's: (out, n, value), (out, n, key, first, mean, std), (x, n), (x, n, s), (dst, src, n) */
PROF_COST(fill, 0, 4 * ARG(1))
PROF_COST(fill_normal, 0, 4 * ARG(1))
PROF_COST(sum_squares, 0, 4 * ARG(1))
PROF_COST(scale, 0, 8 * ARG(1))
PROF_COST(cast_to_bf16, 0, 6 * ARG(2))
/* (param, grad, exp_avg, exp_avg_sq, n, ...): param, exp_avg, exp_avg_sq read and written, grad read */
PROF_COST(adamw_update, 0, 28 * ARG(4))
/* (param, grad, momentum_buf, n, lr, momentum, weight_decay) */
PROF_COST(sgd_update, 0, (ARG(5) != 0 ? 20 : 12) * ARG(3))
/* (p, nbytes), (dst, src, nbytes) */
PROF_COST(memzero, 0, ARG(1))
PROF_COST(to_device, 0, ARG(2))
PROF_COST(to_host, 0, ARG(2))
PROF_COST(copy, 0, PTR(0) != PTR(1) ? 2 * ARG(2) : 0)
#undef PROF_COST
#undef ARG
#undef PTR

void cuda_profile_install(lt_backend *be, lt_ops *f32, lt_ops *bf16) {
    memset(prof_stats, 0, sizeof prof_stats);
#define PROF_NAME_OP(f)                                                                                 \
    snprintf(prof_stats[PROF_SLOT_F32(PROF_OP_##f)].name, sizeof prof_stats[0].name, "fp32.%s", #f);  \
    snprintf(prof_stats[PROF_SLOT_BF16(PROF_OP_##f)].name, sizeof prof_stats[0].name, "bf16.%s", #f);
#define PROF_NAME_FN(f) snprintf(prof_stats[PROF_SLOT_FN(PROF_OP_##f)].name, sizeof prof_stats[0].name, "%s", #f);
    PROF_LT_OPS(PROF_NAME_OP)
    PROF_BACKEND_FNS(PROF_NAME_FN)
#undef PROF_NAME_OP
#undef PROF_NAME_FN
#define PROF_WRAP_OP(f)                                                                                  \
    {                                                                                                    \
        typedef prof_op<PROF_SLOT_F32(PROF_OP_##f), 4, prof_cost_##f, decltype(lt_ops::f)> w32;          \
        typedef prof_op<PROF_SLOT_BF16(PROF_OP_##f), 2, prof_cost_##f, decltype(lt_ops::f)> w16;         \
        w32::orig = f32->f;                                                                              \
        f32->f = w32::call;                                                                              \
        w16::orig = bf16->f;                                                                             \
        bf16->f = w16::call;                                                                             \
    }
#define PROF_WRAP_FN(f)                                                                                  \
    {                                                                                                    \
        typedef prof_op<PROF_SLOT_FN(PROF_OP_##f), 0, prof_cost_##f, decltype(lt_backend::f)> w;        \
        w::orig = be->f;                                                                                 \
        be->f = w::call;                                                                                 \
    }
    PROF_LT_OPS(PROF_WRAP_OP)
    PROF_BACKEND_FNS(PROF_WRAP_FN)
#undef PROF_WRAP_OP
#undef PROF_WRAP_FN
}

/* ---------------- the report ---------------- */

/* Appends to buf (never past buflen, always terminated when buflen > 0); *len counts every byte wanted. */
static void prof_append(char *buf, size_t buflen, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void prof_append(char *buf, size_t buflen, size_t *len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const bool room = buf && *len < buflen;
    const int k = vsnprintf(room ? buf + *len : NULL, room ? buflen - *len : 0, fmt, ap);
    va_end(ap);
    if (k > 0) *len += (size_t)k;
}

static int prof_by_time(const void *a, const void *b) {
    const prof_stat *x = *(const prof_stat *const *)a, *y = *(const prof_stat *const *)b;
    if (x->ms != y->ms) return x->ms < y->ms ? 1 : -1;
    return strcmp(x->name, y->name);
}

int cuda_profile_report(char *buf, size_t buflen) {
    if (buf && buflen) buf[0] = '\0';
    if (!cuda_ctx.profile) return 0;
    pthread_mutex_lock(&prof_lock);
    if (!buf && buflen == 1) { /* clear: the counts, and the pairs still pending will not count */
        for (int i = 0; i < PROF_NSLOTS; i++) {
            prof_stats[i].calls = 0;
            prof_stats[i].ms = prof_stats[i].flops = prof_stats[i].bytes = 0.0;
        }
        prof_span_ms = 0.0;
        prof_lost = 0;
        cuda_ctx.gemm_unfused = 0;
        prof_discard = prof_tail;
        pthread_mutex_unlock(&prof_lock);
        return 0;
    }
    prof_collect_locked(0); /* whatever has completed since the last synchronize */
    const prof_stat *rows[PROF_NSLOTS];
    int n = 0;
    long long calls = 0;
    double total = 0.0;
    for (int i = 0; i < PROF_NSLOTS; i++)
        if (prof_stats[i].calls > 0) {
            rows[n++] = &prof_stats[i];
            calls += prof_stats[i].calls;
            total += prof_stats[i].ms;
        }
    qsort(rows, (size_t)n, sizeof rows[0], prof_by_time);
    size_t len = 0;
    if (!buf) buflen = 0;
    prof_append(buf, buflen, &len,
                "cuda profile: %lld ops, %.3f ms of device time in ops; span %.3f ms (ops %.1f%%, the rest the "
                "GPU waited for the host); %lld pending, %lld lost\n",
                calls, total, prof_span_ms, prof_span_ms > 0.0 ? 100.0 * total / prof_span_ms : 0.0,
                prof_tail - prof_head, prof_lost);
    prof_append(buf, buflen, &len, "%-34s %8s %11s %6s %10s %8s %8s\n", "op", "calls", "ms", "%", "us/call",
                "TFLOP/s", "GB/s");
    for (int i = 0; i < n; i++) {
        const prof_stat *s = rows[i];
        char tf[32] = "-", gb[32] = "-";
        if (s->flops > 0.0 && s->ms > 0.0) snprintf(tf, sizeof tf, "%.1f", s->flops / (s->ms * 1e-3) / 1e12);
        if (s->bytes > 0.0 && s->ms > 0.0) snprintf(gb, sizeof gb, "%.0f", s->bytes / (s->ms * 1e-3) / 1e9);
        prof_append(buf, buflen, &len, "%-34s %8lld %11.3f %6.1f %10.1f %8s %8s\n", s->name, s->calls, s->ms,
                    total > 0.0 ? 100.0 * s->ms / total : 0.0, 1e3 * s->ms / (double)s->calls, tf, gb);
    }
    if (cuda_ctx.gemm_unfused > 0) /* the library offered no algorithm with the epilogue: worth knowing */
        prof_append(buf, buflen, &len, "cuBLASLt: %lld GEMMs without their fused epilogue (bias or GELU: the fallback kernels ran)\n",
                    cuda_ctx.gemm_unfused);
    pthread_mutex_unlock(&prof_lock);
    return len > (size_t)0x7fffffff ? 0x7fffffff : (int)len;
}

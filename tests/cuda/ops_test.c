/* The CUDA backend (luatron_cuda.so, loaded through lt_backend_get("cuda")) against the CPU backend:
 * the backend's own functions (memory, fill, optimizer, sum_squares, cast_to_bf16) and every op of
 * both op tables, fp32 (be->f32) and bf16 (be->bf16), on random inputs (fixed seeds), several shapes
 * each (sizes that are not multiples of the kernels' tiles, T = 1, odd T, GQA and H = G, dropout on
 * and off), with weight gradients that start non-zero so accumulation (+=) is checked too, and
 * activation gradients that start as junk (123s) that a backward must overwrite. Each TAP line
 * names the op, the table ("bf16 ..." for the bf16 one), the shape and the output, and prints the
 * measured difference:
 *     max |cuda - cpu| / max |cpu|  over the output  <= tolerance
 *
 * fp32 table, against the CPU's fp32 ops: 0 (bit-equal) for copies, fills, add, scale, position
 * embeddings, the MoE combine's dy and dropout (whose masks must match the CPU's element for element);
 * 1e-6 for fill_normal, dropout backward and the optimizers; 1e-5 for the other elementwise ops, norms,
 * embeddings, the MoE combine's out and dweights, rope and cross-entropy; 1e-4 for the GEMM-based linear
 * ops and attention; 1e-9 (relative) for sum_squares (double sums).
 *
 * bf16 table, against the CPU's bf16 reference (lt_backend_cpu()->bf16: widen, fp32 op, round) on
 * the same bf16 inputs: 1e-2 for every bf16 output (a one-ulp difference of bf16 rounding is 2^-8
 * relative to the value, and the fp32 sums before the rounding run in another order: the GEMMs on
 * tensor cores, the reductions in other trees); still 0 where both sides do the same float
 * operations (embedding and position-embedding forward, the MoE combine's dy, add, dropout forward and
 * its mask). fp32 outputs of the bf16 table: the tolerance of the fp32 table where the arithmetic is the
 * same fp32 arithmetic on the same (widened) inputs (norm statistics and weight gradients, lse, losses,
 * embedding gradients, the MoE combine's dweights, dbias); 1e-2 for the GEMM weight gradient (tensor
 * cores). Mixed-precision sanity: the bf16 linear layer is also compared with the CPU's fp32 layer on the
 * unrounded inputs (2e-2: the rounding of inputs and outputs to bf16). cast_to_bf16 must equal
 * lt_f32_to_bf16 bit for bit (ties, round-ups, negatives, overflow to inf, inf, NaN payloads,
 * subnormals, random bits).
 *
 * The bandwidth-bound kernels move 16-byte packs when their pointers are 16-byte aligned and fall back
 * to one element at a time otherwise: the checks run on the allocator's aligned buffers (lengths and
 * rows that are whole packs, and ones that are not) and again on buffers 4 to 12 bytes past alignment
 * ("unaligned" in their names), with the same tolerances.
 *
 * The profile (LUATRON_CUDA_PROFILE, lt_backend.profile_report): without it the report is empty; with
 * --profile (the *_profile_test targets set LUATRON_CUDA_PROFILE=1) a few ops are counted exactly
 * (calls, non-negative times, FLOP rates for the GEMM and attention, the snprintf-style length, a
 * clear, more ops than the ring of event pairs between two synchronizes), every other check then runs
 * through the profile's wrappers, and at the end every op of both tables and every backend function
 * with device work must be listed.
 *
 * Without a GPU (no driver, no device: lt_backend_get's error says "no GPU") the plugin must still
 * load; then every check runs the same code with the CPU backend standing in for the device (so the
 * test's own plumbing is exercised here) and is reported as "ok ... # SKIP no GPU: ...". A check
 * that fails even so is a bug in this test and is reported as "not ok". Any other failure to get
 * the CUDA backend (plugin missing, symbol missing, library not loading) fails.
 *
 * The plugin is found through LUATRON_CUDA_PLUGIN (set by the BUILD file to the runfiles path of
 * //:luatron_cuda.so; made absolute here, since dlopen only treats names with a slash as paths), or
 * in the test's runfiles. LUATRON_CUDA_SYNC=1 makes the plugin name the op of an asynchronous error. */
#define _GNU_SOURCE
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/core/tensor.h"
#include "engine/ops/backend.h"
#include "engine/ops/ops.h"
#include "tests/tap.h"

static const lt_backend *cpu; /* the reference */
static const lt_backend *dev; /* the CUDA backend, or the CPU standing in for it (no GPU) */
static int have_gpu;
static char skip_reason[600];

/* ---------------- reporting ---------------- */

/* One TAP line for a check that ran (on the GPU, or CPU-against-CPU when there is none). */
static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (have_gpu) {
        tap_result(ok, __FILE__, __LINE__, "%s", line);
    } else if (ok) {
        printf("ok %d - %s # SKIP %s\n", ++tap_count, line, skip_reason);
        fflush(stdout);
    } else {
        tap_result(0, __FILE__, __LINE__, "%s (fails CPU against CPU: a bug in this test)", line);
    }
}

/* A check that only means something on a GPU (allocator stats, CUDA errors): SKIP without one. */
static int gpu_only(const char *what) {
    if (have_gpu) return 1;
    printf("ok %d - %s # SKIP %s\n", ++tap_count, what, skip_reason);
    fflush(stdout);
    return 0;
}

/* synchronize; on error the message goes into err (else err = ""). */
static int dev_sync(char *err, size_t errlen) {
    err[0] = '\0';
    return dev->synchronize(err, errlen);
}

/* ---------------- data ---------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static float *host_new(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) abort();
    return p;
}
static float *host_rand(size_t n, float lo, float hi) {
    float *p = host_new(n);
    for (size_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * 0.5f * (frand() + 1.0f);
    return p;
}
static float *host_copy(const float *x, size_t n) {
    float *p = host_new(n);
    memcpy(p, x, n * sizeof(float));
    return p;
}

/* Device buffers: allocation failure aborts the test (it has nothing sensible left to check). */
static void *dev_alloc(size_t nbytes) {
    void *p = dev->alloc(nbytes ? nbytes : 1);
    if (!p) {
        tap_result(0, __FILE__, __LINE__, "device alloc of %zu bytes failed", nbytes);
        exit(tap_done());
    }
    return p;
}
static float *dev_upload(const float *h, size_t n) {
    float *d = dev_alloc(n * sizeof(float));
    dev->to_device(d, h, n * sizeof(float));
    return d;
}
static int32_t *dev_upload_i32(const int32_t *h, size_t n) {
    int32_t *d = dev_alloc(n * sizeof(int32_t));
    dev->to_device(d, h, n * sizeof(int32_t));
    return d;
}
static void dev_free(void *d, size_t nbytes) { dev->release(d, nbytes ? nbytes : 1); }
static void dev_free_f(float *d, size_t n) { dev_free(d, n * sizeof(float)); }

/* max |got - ref| / max |ref| (NaN or inf in got: infinite). */
static double rel_diff(const float *ref, const float *got, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (isnan(d) || isinf(d)) d = INFINITY;
        if (d > num) num = d;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    return den > 0.0 ? num / den : num;
}

/* Downloads n floats of d_got, compares them with ref: one TAP line "<name>: rel diff X (tol T)". */
static void check_close(const char *name, const float *ref, const float *d_got, size_t n, double tol) {
    char err[600];
    float *got = host_new(n);
    dev->to_host(got, d_got, n * sizeof(float));
    if (dev_sync(err, sizeof err) != 0) {
        report(0, "%s: device error: %s", name, err);
        free(got);
        return;
    }
    const double d = rel_diff(ref, got, n);
    report(d <= tol, "%s: max|diff|/max|cpu| %.3g (tol %g)", name, d, tol);
    free(got);
}


/* ---------------- precisions ---------------- */

/* One op table under test: the device's and the CPU reference's, of one storage dtype. */
typedef struct {
    lt_dtype dt;
    const lt_ops *cpu, *dev;
    const char *tag; /* prefix of the check names: "" (fp32) or "bf16 " */
} prec;
static prec P32, P16;

static size_t esize(lt_dtype dt) { return dt == LT_BF16 ? 2 : 4; }
/* The tolerance of a storage output: fp32 table, bf16 table. */
static double tol_for(const prec *P, double f32, double bf16) { return P->dt == LT_BF16 ? bf16 : f32; }

/* Per-test arenas: every host and device buffer of a test, freed together by arena_reset(). */
#define ARENA_MAX 64
static void *arena_host[ARENA_MAX], *arena_dev[ARENA_MAX];
static size_t arena_dev_bytes[ARENA_MAX];
static int arena_nhost, arena_ndev;
static void *hmem(size_t nbytes) {
    void *p = calloc(nbytes ? nbytes : 1, 1);
    if (!p || arena_nhost == ARENA_MAX) abort();
    arena_host[arena_nhost++] = p;
    return p;
}
/* 0: device buffers as the allocator hands them out (256-byte aligned). Else each buffer starts 1, 2 or 3
 * units past that, in turn (unit 4 bytes: never 16-byte aligned, and consecutive buffers misaligned
 * differently): the kernels' scalar fallbacks for unaligned pointers run instead of the 16-byte ones. */
static size_t dev_skew_unit;
static unsigned dev_skew_count;
static void *dmem(size_t nbytes) {
    const size_t skew = dev_skew_unit ? dev_skew_unit * (1 + dev_skew_count++ % 3) : 0;
    void *p = dev_alloc(nbytes + skew);
    if (arena_ndev == ARENA_MAX) abort();
    arena_dev[arena_ndev] = p;
    arena_dev_bytes[arena_ndev++] = nbytes + skew;
    return (char *)p + skew;
}
static void arena_reset(void) {
    for (int i = 0; i < arena_nhost; i++) free(arena_host[i]);
    for (int i = 0; i < arena_ndev; i++) dev_free(arena_dev[i], arena_dev_bytes[i]);
    arena_nhost = arena_ndev = 0;
}

/* n random floats in [lo, hi), already representable in the precision's storage (rounded to bf16). */
static float *rnd(const prec *P, size_t n, float lo, float hi) {
    float *x = hmem(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        x[i] = lo + (hi - lo) * 0.5f * (frand() + 1.0f);
        if (P->dt == LT_BF16) x[i] = lt_bf16_to_f32(lt_f32_to_bf16(x[i]));
    }
    return x;
}
static float *fl(size_t n) { return hmem(n * sizeof(float)); }
static float *fcopy(const float *x, size_t n) { return memcpy(fl(n), x, n * sizeof(float)); }
/* The start of a gradient an op writes (not accumulates): 123s, which reading or skipping would show. */
static float *junk(size_t n) {
    float *x = fl(n);
    for (size_t i = 0; i < n; i++) x[i] = 123.0f;
    return x;
}

/* x in the precision's storage, on the host (the CPU reference's operand). */
static void *st(const prec *P, const float *x, size_t n) {
    if (P->dt == LT_F32) return fcopy(x, n);
    uint16_t *h = hmem(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) h[i] = lt_f32_to_bf16(x[i]);
    return h;
}
/* An empty storage buffer on the host. */
static void *st_new(const prec *P, size_t n) { return hmem(n * esize(P->dt)); }
/* A storage buffer widened to floats (not in the arena: the caller frees it). */
static float *widen(const prec *P, const void *s, size_t n) {
    float *f = host_new(n);
    for (size_t i = 0; i < n; i++) f[i] = P->dt == LT_F32 ? ((const float *)s)[i] : lt_bf16_to_f32(((const uint16_t *)s)[i]);
    return f;
}
/* Device copies: of storage, of floats (fp32 gradients, statistics), of ids; and an empty buffer. */
static void *dst(const prec *P, const void *h, size_t n) {
    void *d = dmem(n * esize(P->dt));
    dev->to_device(d, h, n * esize(P->dt));
    return d;
}
static void *dst_new(const prec *P, size_t n) { return dmem(n * esize(P->dt)); }
static float *dfl(const float *h, size_t n) {
    float *d = dmem(n * sizeof(float));
    dev->to_device(d, h, n * sizeof(float));
    return d;
}
static float *dfl_new(size_t n) { return dmem(n * sizeof(float)); }
static int32_t *di32(const int32_t *h, size_t n) {
    int32_t *d = dmem(n * sizeof(int32_t));
    dev->to_device(d, h, n * sizeof(int32_t));
    return d;
}

/* Downloads n storage elements of d_got and compares them, widened, with the storage ref. */
static void check_st(const prec *P, const char *name, const void *ref, const void *d_got, size_t n, double tol) {
    char err[600];
    void *got = malloc(n * esize(P->dt) + 1);
    dev->to_host(got, d_got, n * esize(P->dt));
    if (dev_sync(err, sizeof err) != 0) {
        report(0, "%s%s: device error: %s", P->tag, name, err);
        free(got);
        return;
    }
    float *r = widen(P, ref, n), *g = widen(P, got, n);
    const double d = rel_diff(r, g, n);
    report(d <= tol, "%s%s: max|diff|/max|cpu| %.3g (tol %g)", P->tag, name, d, tol);
    free(got), free(r), free(g);
}
/* check_close with the table's tag. */
static void check_f(const prec *P, const char *name, const float *ref, const float *d_got, size_t n, double tol) {
    char full[300];
    snprintf(full, sizeof full, "%s%s", P->tag, name);
    check_close(full, ref, d_got, n, tol);
}

/* ---------------- memory ---------------- */

static void test_memory(void) {
    char err[600];
    /* round trips of odd sizes, device-to-device copy and memzero: bytes must come back unchanged */
    const size_t sizes[] = {1, 255, 4097, (1u << 20) + 3};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        const size_t n = sizes[k];
        unsigned char *h = malloc(n), *back = malloc(n);
        for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 131 + k * 7 + 1);
        void *a = dev_alloc(n), *b = dev_alloc(n);
        dev->to_device(a, h, n);
        dev->copy(b, a, n);
        memset(back, 0, n);
        dev->to_host(back, b, n);
        int same = memcmp(h, back, n) == 0;
        dev->memzero(b, n);
        memset(back, 1, n);
        dev->to_host(back, b, n);
        size_t nonzero = 0;
        for (size_t i = 0; i < n; i++) nonzero += back[i] != 0;
        int rc = dev_sync(err, sizeof err);
        report(same && nonzero == 0 && rc == 0, "memory: %zu bytes to_device, copy, to_host round trip %s, memzero %zu non-zero bytes%s%s",
               n, same ? "equal" : "DIFFERS", nonzero, rc ? "; error: " : "", rc ? err : "");
        dev_free(a, n);
        dev_free(b, n);
        free(h);
        free(back);
    }

    if (gpu_only("memory: description names the device")) {
        report(strstr(dev->description, "sm_90") != NULL, "memory: description \"%s\"", dev->description);
        printf("# device: %s\n", dev->description);
    }

    if (gpu_only("memory: allocator stats (rounding, cache reuse, peak)")) {
        size_t u0, p0, c0, u1, p1, c1, u2, p2, c2, u3, p3, c3, u4, p4, c4;
        dev->memory_stats(&u0, &p0, &c0);
        void *a = dev->alloc(1000);
        dev->memory_stats(&u1, &p1, &c1);
        dev->release(a, 1000);
        dev->memory_stats(&u2, &p2, &c2);
        void *b = dev->alloc(1000); /* the same size class: the block just cached comes back */
        dev->memory_stats(&u3, &p3, &c3);
        dev->release(b, 1000);
        const size_t big = (3u << 20) + 1, big_rounded = (3u << 20) + (1u << 18); /* 1/16 of 4 MiB steps */
        void *c = dev->alloc(big);
        dev->memory_stats(&u4, &p4, &c4);
        dev->release(c, big);
        dev->reset_peak();
        size_t u5, p5, c5;
        dev->memory_stats(&u5, &p5, &c5);
        const int ok = a && a == b && ((uintptr_t)a % 256) == 0 && u1 - u0 == 1024 && p1 >= u1 && u2 == u0 &&
                       c2 == c0 + 1024 && u3 == u1 && c3 == c0 && c && ((uintptr_t)c % 256) == 0 &&
                       u4 - u0 == big_rounded && p4 >= u4 && p5 == u5 && u5 == u0;
        report(ok,
               "memory: stats in_use %zu -> %zu (+1024 for 1000 B) -> %zu, cached %zu -> %zu -> %zu, reuse %s, "
               "3 MiB+1 -> +%zu (want %zu), peak after reset %zu (in_use %zu)",
               u0, u1, u2, c0, c2, c3, a == b ? "yes" : "no", u4 - u0, big_rounded, p5, u5);
    }

    if (gpu_only("memory: an impossible allocation returns NULL and leaves no error")) {
        void *p = dev->alloc((size_t)1 << 50);
        int rc = dev_sync(err, sizeof err);
        report(p == NULL && rc == 0, "memory: alloc(1 PiB) %s, synchronize %d %s", p ? "returned memory" : "= NULL", rc,
               err);
        if (p) dev->release(p, (size_t)1 << 50);
    }
}

/* ---------------- the tables ---------------- */

static void test_tables(void) {
    const lt_ops *t[2] = {dev->f32, dev->bf16};
    const lt_dtype want[2] = {LT_F32, LT_BF16};
    for (int k = 0; k < 2; k++) {
        int missing = -1;
        if (t[k]) {
            typedef void (*fn)(void);
            int i = 0;
            for (size_t off = offsetof(lt_ops, embedding_forward); off + sizeof(fn) <= sizeof(lt_ops);
                 off += sizeof(fn), i++) {
                fn f;
                memcpy(&f, (const char *)t[k] + off, sizeof f);
                if (!f && missing < 0) missing = i;
            }
        }
        report(t[k] && t[k]->dtype == want[k] && missing < 0 && dev->cast_to_bf16,
               "the %s op table: %s, dtype %d (want %d), %s", k ? "bf16" : "fp32", t[k] ? "present" : "MISSING",
               t[k] ? (int)t[k]->dtype : -1, (int)want[k], missing < 0 ? "every op set" : "an op is NULL");
    }
}

/* ---------------- the backend's fp32 kernels and the cast ---------------- */

static void test_scale(void) {
    const int64_t n = 300007;
    float *b = host_rand(n, -2, 2), *db = dev_upload(b, n);
    cpu->scale(b, n, -0.7f);
    dev->scale(db, n, -0.7f);
    check_close("scale n=300007", b, db, n, 0.0);
    free(b);
    dev_free_f(db, n);
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* cast_to_bf16 against lt_f32_to_bf16, bit for bit. */
static void test_cast_to_bf16(void) {
    char err[600];
    static const uint32_t special[] = {
        0x3F800000u, /* 1: exact */
        0x3F808000u, /* 1 + 2^-8: a tie, kept (even) */
        0x3F818000u, /* a tie, rounded up to even */
        0x3F80C000u, /* above the tie: up */
        0x3F807FFFu, /* below the tie: down */
        0xBF80C000u, /* negative: up in magnitude */
        0xBF808000u, /* negative tie */
        0x7F7FFFFFu, /* FLT_MAX: overflows to inf */
        0x7F7F8000u, /* a tie at the top: rounds to inf */
        0x7F7F7FFFu, /* just below: the largest finite bf16 */
        0xFF7FFFFFu, /* -FLT_MAX: -inf */
        0x7F800000u, /* inf */
        0xFF800000u, /* -inf */
        0x7FC00000u, /* quiet NaN */
        0x7F800001u, /* signalling NaN, payload only in the low bits: stays a NaN (quiet) */
        0xFFC12345u, /* negative NaN with a payload */
        0x7FBFFFFFu, /* signalling NaN whose rounding would carry into the exponent */
        0x00000000u, /* +0 */
        0x80000000u, /* -0 */
        0x00000001u, /* the smallest subnormal: 0 */
        0x00008000u, /* subnormal tie: down to even (0) */
        0x00018000u, /* subnormal tie: up to even */
        0x807FFFFFu, /* the largest negative subnormal: rounds to -FLT_MIN */
        0x42F6E979u, /* 123.456 */
        0xC61C4000u, /* -10000 */
    };
    const size_t ns = sizeof special / sizeof *special, n = 1000003;
    float *x = host_new(n);
    for (size_t i = 0; i < ns; i++) x[i] = float_of(special[i]);
    uint64_t s = 0x243F6A8885A308D3ull;
    for (size_t i = ns; i < n; i++) { /* random bit patterns: every exponent, sign and payload */
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = float_of((uint32_t)(s >> 32));
    }
    uint16_t *want = malloc(n * 2), *got = malloc(n * 2);
    for (size_t i = 0; i < n; i++) want[i] = lt_f32_to_bf16(x[i]);
    float *dx = dev_upload(x, n);
    void *dy = dev_alloc(n * 2);
    dev->memzero(dy, n * 2);
    dev->cast_to_bf16(dy, dx, (int64_t)n);
    dev->cast_to_bf16(dy, dx, 0); /* n = 0: nothing */
    dev->to_host(got, dy, n * 2);
    const int rc = dev_sync(err, sizeof err);
    size_t bad = 0, first = n, bad_special = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) {
            bad++, bad_special += i < ns;
            if (first == n) first = i;
        }
    char where[160] = "";
    if (first < n)
        snprintf(where, sizeof where, "; first at %zu: 0x%08X -> 0x%04X, want 0x%04X", first, bits_of(x[first]),
                 got[first], want[first]);
    report(rc == 0 && bad == 0,
           "cast_to_bf16 n=1000003 (%zu special values: ties, round-ups, overflow, inf, NaN payloads, subnormals; "
           "then random bits): %zu of %zu differ from lt_f32_to_bf16 (%zu special)%s%s%s",
           ns, bad, n, bad_special, where, rc ? "; error: " : "", rc ? err : "");
    /* an odd length and an offset source: the tail is right */
    const size_t m = 3;
    dev->memzero(dy, 8);
    dev->cast_to_bf16(dy, dx + 1, (int64_t)m);
    uint16_t small[4] = {0, 0, 0, 0};
    dev->to_host(small, dy, 8);
    const int rc2 = dev_sync(err, sizeof err);
    report(rc2 == 0 && small[0] == want[1] && small[1] == want[2] && small[2] == want[3] && small[3] == 0,
           "cast_to_bf16 n=3 from an offset: 0x%04X 0x%04X 0x%04X, then 0x%04X untouched (want 0x%04X 0x%04X 0x%04X 0)",
           small[0], small[1], small[2], small[3], want[1], want[2], want[3]);
    free(x), free(want), free(got);
    dev_free_f(dx, n), dev_free(dy, n * 2);
}

/* ---------------- elementwise ops ---------------- */

static void test_add(const prec *P, int64_t n) {
    char name[128];
    float *a = rnd(P, n, -2, 2), *b = rnd(P, n, -2, 2);
    void *ha = st(P, a, n), *hb = st(P, b, n), *ref = st_new(P, n);
    void *da = dst(P, ha, n), *db = dst(P, hb, n), *dy = dst_new(P, n);
    P->cpu->add_forward(ref, ha, hb, n);
    P->dev->add_forward(dy, da, db, n);
    snprintf(name, sizeof name, "add_forward n=%lld", (long long)n);
    check_st(P, name, ref, dy, n, 0.0);
    P->dev->add_forward(da, da, db, n); /* out aliasing a */
    snprintf(name, sizeof name, "add_forward n=%lld in place (out == a)", (long long)n);
    check_st(P, name, ref, da, n, 0.0);
    arena_reset();
}

static void test_gelu(const prec *P, int64_t n, int tanh_form) {
    char name[128];
    const lt_ops *c = P->cpu, *d = P->dev;
    void (*const cf)(void *, const void *, int64_t) = tanh_form ? c->gelu_tanh_forward : c->gelu_forward;
    void (*const df)(void *, const void *, int64_t) = tanh_form ? d->gelu_tanh_forward : d->gelu_forward;
    void (*const cb)(void *, const void *, const void *, int64_t) = tanh_form ? c->gelu_tanh_backward : c->gelu_backward;
    void (*const db)(void *, const void *, const void *, int64_t) = tanh_form ? d->gelu_tanh_backward : d->gelu_backward;
    const char *op = tanh_form ? "gelu_tanh" : "gelu";
    /* n = 1: a positive input, since max|cpu| of a single tiny gelu(x < -3) would measure the CPU's erf
     * approximation (5e-7 absolute) rather than the kernel */
    float *x = rnd(P, n, n == 1 ? 0.5f : -4, 4), *g = rnd(P, n, -1, 1), *dx0 = junk(n);
    void *hx = st(P, x, n), *hg = st(P, g, n), *ref = st_new(P, n), *dref = st(P, dx0, n);
    void *dx = dst(P, hx, n), *dg = dst(P, hg, n), *dy = dst_new(P, n), *ddx = dst(P, dref, n);
    cf(ref, hx, n);
    df(dy, dx, n);
    snprintf(name, sizeof name, "%s_forward n=%lld", op, (long long)n);
    check_st(P, name, ref, dy, n, tol_for(P, 1e-5, 1e-2));
    cb(dref, hg, hx, n);
    db(ddx, dg, dx, n);
    snprintf(name, sizeof name, "%s_backward n=%lld (dinp written)", op, (long long)n);
    check_st(P, name, dref, ddx, n, tol_for(P, 1e-5, 1e-2));
    arena_reset();
}

static void test_swiglu(const prec *P, int N, int F) {
    char name[128];
    const size_t ni = (size_t)N * 2 * F, no = (size_t)N * F;
    float *x = rnd(P, ni, -4, 4), *g = rnd(P, no, -1, 1), *dx0 = junk(ni);
    void *hx = st(P, x, ni), *hg = st(P, g, no), *ref = st_new(P, no), *dref = st(P, dx0, ni);
    void *dx = dst(P, hx, ni), *dg = dst(P, hg, no), *dy = dst_new(P, no), *ddx = dst(P, dref, ni);
    P->cpu->swiglu_forward(ref, hx, N, F);
    P->dev->swiglu_forward(dy, dx, N, F);
    snprintf(name, sizeof name, "swiglu_forward N=%d F=%d", N, F);
    check_st(P, name, ref, dy, no, tol_for(P, 1e-5, 1e-2));
    P->cpu->swiglu_backward(dref, hg, hx, N, F);
    P->dev->swiglu_backward(ddx, dg, dx, N, F);
    snprintf(name, sizeof name, "swiglu_backward N=%d F=%d (dinp written)", N, F);
    check_st(P, name, dref, ddx, ni, tol_for(P, 1e-5, 1e-2));
    arena_reset();
}

/* Dropout: the output must equal the CPU's exactly, zeros (the mask) included. */
static void test_dropout(const prec *P, int64_t n, float p, uint64_t first) {
    char err[600], name[160];
    const uint64_t key = 0xD50F0123456789ull;
    float *x = rnd(P, n, 0.5f, 1.5f), *g = rnd(P, n, -1, 1), *dx0 = junk(n);
    for (int64_t i = 0; i < n; i += 3) x[i] = -x[i]; /* never zero: a zero output is a dropped element */
    void *hx = st(P, x, n), *hg = st(P, g, n), *ref = st_new(P, n), *dref = st(P, dx0, n);
    void *dx = dst(P, hx, n), *dy = dst_new(P, n), *dg = dst(P, hg, n), *ddx = dst(P, dref, n);
    P->cpu->dropout_forward(ref, hx, n, p, key, first);
    P->dev->dropout_forward(dy, dx, n, p, key, first);
    void *got = hmem(n * esize(P->dt));
    dev->to_host(got, dy, n * esize(P->dt));
    int rc = dev_sync(err, sizeof err);
    float *r = widen(P, ref, n), *o = widen(P, got, n);
    int64_t mask_diff = 0, dropped = 0;
    for (int64_t i = 0; i < n; i++) {
        mask_diff += (r[i] == 0.0f) != (o[i] == 0.0f);
        dropped += r[i] == 0.0f;
    }
    double d = rel_diff(r, o, n);
    report(rc == 0 && mask_diff == 0 && d == 0.0,
           "%sdropout_forward n=%lld p=%g first=%llu: %lld of %lld mask elements differ (%lld dropped), "
           "max|diff|/max|cpu| %.3g (tol 0)%s%s",
           P->tag, (long long)n, p, (unsigned long long)first, (long long)mask_diff, (long long)n, (long long)dropped,
           d, rc ? "; error: " : "", rc ? err : "");
    free(r), free(o);
    /* in place: out == inp */
    P->dev->dropout_forward(dx, dx, n, p, key, first);
    snprintf(name, sizeof name, "dropout_forward n=%lld p=%g in place (out == inp)", (long long)n, p);
    check_st(P, name, ref, dx, n, 0.0);
    P->cpu->dropout_backward(dref, hg, n, p, key, first);
    P->dev->dropout_backward(ddx, dg, n, p, key, first);
    snprintf(name, sizeof name, "dropout_backward n=%lld p=%g (dinp written)", (long long)n, p);
    check_st(P, name, dref, ddx, n, tol_for(P, 1e-6, 1e-2));
    arena_reset();
}
/* ---------------- the backend's fp32 kernels ---------------- */

static void test_fill(void) {
    const int64_t n = 1000003;
    float *ref = host_new(n), *d = dev_alloc(n * sizeof(float));
    cpu->fill(ref, n, 0.375f);
    dev->fill(d, n, 0.375f);
    check_close("fill n=1000003", ref, d, n, 0.0);
    /* counters that cross 2^32 inside the range: the high word of the Philox counter must carry */
    const uint64_t firsts[] = {12345, 0xFFFFFFF0ull};
    for (int k = 0; k < 2; k++) {
        cpu->fill_normal(ref, n, 0xC0FFEEull, firsts[k], 0.5f, 0.02f);
        dev->fill_normal(d, n, 0xC0FFEEull, firsts[k], 0.5f, 0.02f);
        char name[128];
        snprintf(name, sizeof name, "fill_normal n=1000003 first=%llu", (unsigned long long)firsts[k]);
        check_close(name, ref, d, n, 1e-6);
    }
    free(ref);
    dev_free_f(d, n);
}

static void test_sum_squares(int64_t n) {
    char err[600];
    float *x = host_rand(n, -3, 3);
    float *dx = dev_upload(x, n);
    const double ref = cpu->sum_squares(x, n), got = dev->sum_squares(dx, n);
    int rc = dev_sync(err, sizeof err);
    const double d = fabs(got - ref) / (ref > 0 ? ref : 1.0);
    report(rc == 0 && d <= 1e-9, "sum_squares n=%lld: cpu %.17g cuda %.17g, rel diff %.3g (tol 1e-09)%s%s",
           (long long)n, ref, got, d, rc ? "; error: " : "", rc ? err : "");
    free(x);
    dev_free_f(dx, n);
}

static void test_adamw(void) {
    const int64_t n = 100003;
    float *p = host_new(n), *g = host_new(n), *m = host_new(n), *v = host_new(n);
    for (int64_t i = 0; i < n; i++) {
        p[i] = sinf((float)i), g[i] = cosf(0.7f * (float)i), m[i] = 0.01f * (float)(i % 7);
        v[i] = 0.001f * (float)(i % 5);
    }
    float *dp = dev_upload(p, n), *dg = dev_upload(g, n), *dm = dev_upload(m, n), *dv = dev_upload(v, n);
    for (int step = 1; step <= 3; step++) {
        cpu->adamw_update(p, g, m, v, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
        dev->adamw_update(dp, dg, dm, dv, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
    }
    check_close("adamw_update n=100003, 3 steps: param", p, dp, n, 1e-6);
    check_close("adamw_update n=100003, 3 steps: exp_avg", m, dm, n, 1e-6);
    check_close("adamw_update n=100003, 3 steps: exp_avg_sq", v, dv, n, 1e-6);
    free(p), free(g), free(m), free(v);
    dev_free_f(dp, n), dev_free_f(dg, n), dev_free_f(dm, n), dev_free_f(dv, n);
}

static void test_sgd(float momentum) {
    const int64_t n = 65537;
    float *p = host_rand(n, -1, 1), *g = host_rand(n, -1, 1), *b = host_rand(n, -0.1f, 0.1f);
    float *dp = dev_upload(p, n), *dg = dev_upload(g, n), *db = dev_upload(b, n);
    for (int step = 0; step < 2; step++) {
        cpu->sgd_update(p, g, momentum != 0.0f ? b : NULL, n, 0.05f, momentum, 0.01f);
        dev->sgd_update(dp, dg, momentum != 0.0f ? db : NULL, n, 0.05f, momentum, 0.01f);
    }
    char name[128];
    snprintf(name, sizeof name, "sgd_update n=65537 momentum=%g%s, 2 steps: param", momentum,
             momentum != 0.0f ? "" : " (buffer NULL)");
    check_close(name, p, dp, n, 1e-6);
    if (momentum != 0.0f) check_close("sgd_update n=65537 momentum=0.9, 2 steps: momentum buffer", b, db, n, 1e-6);
    free(p), free(g), free(b);
    dev_free_f(dp, n), dev_free_f(dg, n), dev_free_f(db, n);
}


/* ---------------- embeddings ---------------- */

static void test_embedding(const prec *P, int N, int C, int V) {
    char name[160];
    int32_t *ids = hmem(sizeof(int32_t) * N);
    for (int n = 0; n < N; n++) ids[n] = (int32_t)((uint32_t)(n * 2654435761u) % (uint32_t)V); /* repeats when N > V */
    ids[N - 1] = ids[0];
    const size_t nt = (size_t)V * C, no = (size_t)N * C;
    float *table = rnd(P, nt, -1, 1), *g = rnd(P, no, -1, 1), *dt0 = rnd(&P32, nt, -1, 1);
    void *ht = st(P, table, nt), *hg = st(P, g, no), *ref = st_new(P, no);
    float *dref = fcopy(dt0, nt);
    int32_t *dids = di32(ids, N);
    void *dtable = dst(P, ht, nt), *dg = dst(P, hg, no), *dout = dst_new(P, no);
    float *ddt = dfl(dt0, nt);
    P->cpu->embedding_forward(ref, ids, ht, N, C);
    P->dev->embedding_forward(dout, dids, dtable, N, C);
    snprintf(name, sizeof name, "embedding_forward N=%d C=%d V=%d", N, C, V);
    check_st(P, name, ref, dout, no, 0.0);
    P->cpu->embedding_backward(dref, hg, ids, N, C);
    P->dev->embedding_backward(ddt, dg, dids, N, C);
    snprintf(name, sizeof name, "embedding_backward N=%d C=%d V=%d, repeated ids (dtable fp32 += , atomics)", N, C, V);
    check_f(P, name, dref, ddt, nt, 1e-5);
    arena_reset();
}

/* rank >= 0: the T = 2L rows of CP rank `rank` of cp (chunks rank and 2cp-1-rank, context parallelism) at
 * their global positions (pos on the device), the table of S = cp T rows; rank < 0: no positions. */
static int32_t *cp_positions(int T, int cp, int rank) {
    int32_t *pos = hmem(sizeof(int32_t) * (size_t)T);
    const int L = T / 2;
    for (int t = 0; t < T; t++) pos[t] = t < L ? rank * L + t : (2 * cp - 1 - rank) * L + t - L;
    return pos;
}

static void test_position_embedding(const prec *P, int B, int T, int C, int cp, int rank) {
    char name[200], at[64] = "";
    const int rows = rank >= 0 ? cp * T : T;
    const size_t n = (size_t)B * T * C, nw = (size_t)rows * C;
    const int32_t *pos = rank >= 0 ? cp_positions(T, cp, rank) : NULL, *dpos = pos ? di32(pos, T) : NULL;
    if (pos) snprintf(at, sizeof at, " at the positions of CP rank %d of %d", rank, cp);
    float *x = rnd(P, n, -1, 1), *wpe = rnd(P, nw, -1, 1), *dw0 = rnd(&P32, nw, -1, 1);
    void *hx = st(P, x, n), *hw = st(P, wpe, nw), *ref = st(P, x, n);
    float *dref = fcopy(dw0, nw);
    void *dx = dst(P, hx, n), *dwpe = dst(P, hw, nw), *dxorig = dst(P, hx, n);
    float *ddw = dfl(dw0, nw);
    P->cpu->position_embedding_forward(ref, hw, B, T, C, pos);
    P->dev->position_embedding_forward(dx, dwpe, B, T, C, dpos);
    snprintf(name, sizeof name, "position_embedding_forward B=%d T=%d C=%d%s (out += )", B, T, C, at);
    check_st(P, name, ref, dx, n, 0.0);
    P->cpu->position_embedding_backward(dref, hx, B, T, C, pos);
    P->dev->position_embedding_backward(ddw, dxorig, B, T, C, dpos);
    snprintf(name, sizeof name, "position_embedding_backward B=%d T=%d C=%d%s (dwpe fp32 += , same order)", B, T, C, at);
    check_f(P, name, dref, ddw, nw, 0.0);
    arena_reset();
}

/* ---------------- mixture of experts ---------------- */

/* The combine at one shape: rows [N k] are distinct rows of y [M, C] (a shuffle), every hole-th slot and
 * all of token `empty`'s slots -1 (weights NaN there: never read), the rest of the M rows padding. out, dy
 * and dweights start as junk (written, not accumulated). dy is one product per element on both sides
 * (bit-equal); out and dweights are fp32 sums in another order (the device's dots per lane). */
static void test_moe_combine(const prec *P, int N, int k, int M, int C, int hole, int empty) {
    char name[200];
    const size_t nk = (size_t)N * k, no = (size_t)N * C, ny = (size_t)M * C;
    int32_t *perm = hmem(sizeof(int32_t) * (size_t)M), *rows = hmem(sizeof(int32_t) * (nk ? nk : 1));
    for (int i = 0; i < M; i++) perm[i] = i;
    for (int i = M - 1; i > 0; i--) {
        (void)frand(); /* a step of rng_state */
        const int j = (int)((rng_state >> 16) % (uint64_t)(i + 1));
        const int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    float *w = fl(nk ? nk : 1);
    for (size_t i = 0; i < nk; i++) {
        rows[i] = (hole > 0 && (int)(i % hole) == hole - 1) || (int)(i / k) == empty ? -1 : perm[i];
        w[i] = rows[i] < 0 ? NAN : 0.5f + 0.45f * frand();
    }
    float *y = rnd(P, ny, -1, 1), *g = rnd(P, no, -1, 1);
    void *hy = st(P, y, ny), *hg = st(P, g, no), *ref = st_new(P, no), *dyref = st_new(P, ny);
    float *dwref = junk(nk ? nk : 1);
    int32_t *d_rows = di32(rows, nk ? nk : 1);
    float *d_w = dfl(w, nk ? nk : 1), *d_dw = dfl(junk(nk ? nk : 1), nk ? nk : 1);
    void *d_y = dst(P, hy, ny), *d_g = dst(P, hg, no);
    void *d_out = dst(P, st(P, junk(no), no), no), *d_dy = dst(P, st(P, junk(ny), ny), ny);
    P->cpu->moe_combine_forward(ref, hy, rows, w, N, k, C);
    P->dev->moe_combine_forward(d_out, d_y, d_rows, d_w, N, k, C);
    snprintf(name, sizeof name, "moe_combine_forward N=%d k=%d M=%d C=%d%s%s (out written)", N, k, M, C,
             hole > 0 ? ", empty slots" : "", empty >= 0 ? ", a token with none" : "");
    check_st(P, name, ref, d_out, no, tol_for(P, 1e-5, 1e-2));
    P->cpu->moe_combine_backward(dyref, dwref, hg, hy, rows, w, N, k, M, C);
    P->dev->moe_combine_backward(d_dy, d_dw, d_g, d_y, d_rows, d_w, N, k, M, C);
    snprintf(name, sizeof name, "moe_combine_backward N=%d k=%d M=%d C=%d: dy (written, padding rows zero)", N, k, M,
             C);
    check_st(P, name, dyref, d_dy, ny, 0.0);
    snprintf(name, sizeof name, "moe_combine_backward N=%d k=%d M=%d C=%d: dweights (fp32, written, 0 when empty)", N,
             k, M, C);
    check_f(P, name, dwref, d_dw, nk, 1e-5);
    arena_reset();
}

/* ---------------- norms ---------------- */

static void test_layernorm(const prec *P, int N, int C, int with_bias) {
    char name[160];
    const size_t n = (size_t)N * C;
    const double tol = tol_for(P, 1e-5, 1e-2);
    float *x = rnd(P, n, 2, 4); /* |mean| > std: the variance must be two-pass */
    float *w = rnd(P, C, 0.5f, 1.5f), *bias = rnd(P, C, -1, 1), *g = rnd(P, n, -1, 1);
    float *dx0 = rnd(P, n, -1, 1), *dw0 = rnd(&P32, C, -1, 1), *db0 = rnd(&P32, C, -1, 1);
    void *hx = st(P, x, n), *hw = st(P, w, C), *hb = with_bias ? st(P, bias, C) : NULL, *hg = st(P, g, n);
    void *y = st_new(P, n), *dxr = st(P, dx0, n);
    float *mean = fl(N), *rstd = fl(N), *dwr = fcopy(dw0, C), *dbr = with_bias ? fcopy(db0, C) : NULL;
    void *d_x = dst(P, hx, n), *d_w = dst(P, hw, C), *d_b = with_bias ? dst(P, hb, C) : NULL, *d_y = dst_new(P, n);
    void *d_g = dst(P, hg, n), *d_dx = dst(P, dxr, n);
    float *d_mean = dfl_new(N), *d_rstd = dfl_new(N), *d_dw = dfl(dw0, C), *d_db = with_bias ? dfl(db0, C) : NULL;
    const char *tag = with_bias ? "" : " bias NULL";
    P->cpu->layernorm_forward(y, mean, rstd, hx, hw, hb, N, C, 1e-5f);
    P->dev->layernorm_forward(d_y, d_mean, d_rstd, d_x, d_w, d_b, N, C, 1e-5f);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: out", N, C, tag);
    check_st(P, name, y, d_y, n, tol);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: mean (fp32)", N, C, tag);
    check_f(P, name, mean, d_mean, N, 1e-5);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: rstd (fp32)", N, C, tag);
    check_f(P, name, rstd, d_rstd, N, 1e-5);
    /* backward from the CPU's saved mean / rstd, so it is checked on its own */
    dev->to_device(d_mean, mean, N * sizeof(float));
    dev->to_device(d_rstd, rstd, N * sizeof(float));
    P->cpu->layernorm_backward(dxr, dwr, dbr, hg, hx, hw, mean, rstd, N, C);
    P->dev->layernorm_backward(d_dx, d_dw, d_db, d_g, d_x, d_w, d_mean, d_rstd, N, C);
    snprintf(name, sizeof name, "layernorm_backward N=%d C=%d%s: dinp (+= )", N, C, tag);
    check_st(P, name, dxr, d_dx, n, tol);
    snprintf(name, sizeof name, "layernorm_backward N=%d C=%d%s: dweight (fp32 += )", N, C, tag);
    check_f(P, name, dwr, d_dw, C, 1e-5);
    if (with_bias) {
        snprintf(name, sizeof name, "layernorm_backward N=%d C=%d: dbias (fp32 += )", N, C);
        check_f(P, name, dbr, d_db, C, 1e-5);
    }
    arena_reset();
}

static void test_rmsnorm(const prec *P, int N, int C) {
    char name[160];
    const size_t n = (size_t)N * C;
    const double tol = tol_for(P, 1e-5, 1e-2);
    float *x = rnd(P, n, -2, 2), *w = rnd(P, C, 0.5f, 1.5f), *g = rnd(P, n, -1, 1);
    float *dx0 = rnd(P, n, -1, 1), *dw0 = rnd(&P32, C, -1, 1);
    void *hx = st(P, x, n), *hw = st(P, w, C), *hg = st(P, g, n), *y = st_new(P, n), *dxr = st(P, dx0, n);
    float *rstd = fl(N), *dwr = fcopy(dw0, C);
    void *d_x = dst(P, hx, n), *d_w = dst(P, hw, C), *d_y = dst_new(P, n), *d_g = dst(P, hg, n);
    void *d_dx = dst(P, dxr, n);
    float *d_rstd = dfl_new(N), *d_dw = dfl(dw0, C);
    P->cpu->rmsnorm_forward(y, rstd, hx, hw, N, C, 1e-6f);
    P->dev->rmsnorm_forward(d_y, d_rstd, d_x, d_w, N, C, 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_forward N=%d C=%d: out", N, C);
    check_st(P, name, y, d_y, n, tol);
    snprintf(name, sizeof name, "rmsnorm_forward N=%d C=%d: rstd (fp32)", N, C);
    check_f(P, name, rstd, d_rstd, N, 1e-5);
    dev->to_device(d_rstd, rstd, N * sizeof(float));
    P->cpu->rmsnorm_backward(dxr, dwr, hg, hx, hw, rstd, N, C);
    P->dev->rmsnorm_backward(d_dx, d_dw, d_g, d_x, d_w, d_rstd, N, C);
    snprintf(name, sizeof name, "rmsnorm_backward N=%d C=%d: dinp (+= )", N, C);
    check_st(P, name, dxr, d_dx, n, tol);
    snprintf(name, sizeof name, "rmsnorm_backward N=%d C=%d: dweight (fp32 += )", N, C);
    check_f(P, name, dwr, d_dw, C, 1e-5);
    arena_reset();
}

/* q_layernorm / k_layernorm on a fused qkv buffer: LayerNorm (with biases) or RMSNorm (rms) over each
 * D-sized query and key head; value heads copied forward and backward; dinp written over junk. */
static void test_qk_norm(const prec *P, int N, int H, int G, int D, int rms) {
    char name[200], shape[120];
    const size_t n = (size_t)N * (H + 2 * G) * D, nr = (size_t)N * (H + G);
    const double tol = tol_for(P, 1e-5, 1e-2);
    snprintf(shape, sizeof shape, "N=%d H=%d G=%d D=%d %s", N, H, G, D, rms ? "rmsnorm" : "layernorm");
    float *x = rnd(P, n, -2, 4), *g = rnd(P, n, -1, 1), *di0 = junk(n);
    float *qw = rnd(P, D, 0.5f, 1.5f), *kw = rnd(P, D, 0.5f, 1.5f), *qb = rnd(P, D, -1, 1), *kb = rnd(P, D, -1, 1);
    float *dqw0 = rnd(&P32, D, -1, 1), *dkw0 = rnd(&P32, D, -1, 1), *dqb0 = rnd(&P32, D, -1, 1),
          *dkb0 = rnd(&P32, D, -1, 1);
    void *hx = st(P, x, n), *hg = st(P, g, n), *y = st_new(P, n), *dir = st(P, di0, n);
    void *hqw = st(P, qw, D), *hkw = st(P, kw, D), *hqb = rms ? NULL : st(P, qb, D), *hkb = rms ? NULL : st(P, kb, D);
    float *mean = rms ? NULL : fl(nr), *rstd = fl(nr), *rqw = fcopy(dqw0, D), *rkw = fcopy(dkw0, D);
    float *rqb = rms ? NULL : fcopy(dqb0, D), *rkb = rms ? NULL : fcopy(dkb0, D);
    void *d_x = dst(P, hx, n), *d_g = dst(P, hg, n), *d_y = dst(P, dir, n), *d_di = dst(P, dir, n);
    void *d_qw = dst(P, hqw, D), *d_kw = dst(P, hkw, D);
    void *d_qb = rms ? NULL : dst(P, hqb, D), *d_kb = rms ? NULL : dst(P, hkb, D);
    float *d_mean = rms ? NULL : dfl_new(nr), *d_rstd = dfl_new(nr), *d_dqw = dfl(dqw0, D), *d_dkw = dfl(dkw0, D);
    float *d_dqb = rms ? NULL : dfl(dqb0, D), *d_dkb = rms ? NULL : dfl(dkb0, D);
    P->cpu->qk_norm_forward(y, mean, rstd, hx, hqw, hqb, hkw, hkb, N, H, G, D, 1e-5f);
    P->dev->qk_norm_forward(d_y, d_mean, d_rstd, d_x, d_qw, d_qb, d_kw, d_kb, N, H, G, D, 1e-5f);
    snprintf(name, sizeof name, "qk_norm_forward %s: out (over junk)", shape);
    check_st(P, name, y, d_y, n, tol);
    snprintf(name, sizeof name, "qk_norm_forward %s: rstd (fp32)", shape);
    check_f(P, name, rstd, d_rstd, nr, 1e-5);
    if (!rms) {
        snprintf(name, sizeof name, "qk_norm_forward %s: mean (fp32)", shape);
        check_f(P, name, mean, d_mean, nr, 1e-5);
        dev->to_device(d_mean, mean, nr * sizeof(float));
    }
    /* backward from the CPU's saved statistics, so it is checked on its own */
    dev->to_device(d_rstd, rstd, nr * sizeof(float));
    P->cpu->qk_norm_backward(dir, rqw, rqb, rkw, rkb, hg, hx, hqw, hkw, mean, rstd, N, H, G, D);
    P->dev->qk_norm_backward(d_di, d_dqw, d_dqb, d_dkw, d_dkb, d_g, d_x, d_qw, d_kw, d_mean, d_rstd, N, H, G, D);
    snprintf(name, sizeof name, "qk_norm_backward %s: dinp (written)", shape);
    check_st(P, name, dir, d_di, n, tol);
    snprintf(name, sizeof name, "qk_norm_backward %s: dqweight (fp32 += )", shape);
    check_f(P, name, rqw, d_dqw, D, 1e-5);
    snprintf(name, sizeof name, "qk_norm_backward %s: dkweight (fp32 += )", shape);
    check_f(P, name, rkw, d_dkw, D, 1e-5);
    if (!rms) {
        snprintf(name, sizeof name, "qk_norm_backward %s: dqbias (fp32 += )", shape);
        check_f(P, name, rqb, d_dqb, D, 1e-5);
        snprintf(name, sizeof name, "qk_norm_backward %s: dkbias (fp32 += )", shape);
        check_f(P, name, rkb, d_dkb, D, 1e-5);
    }
    arena_reset();
}

/* ---------------- linear ---------------- */

/* with_residual: the forward adds a residual (1: a separate buffer, 2: out itself, in place). */
static void test_linear(const prec *P, int N, int IN, int OUT, int with_bias, int with_dinp, int with_residual) {
    char name[240], shape[96];
    const size_t ni = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT;
    const double tol = tol_for(P, 1e-4, 1e-2);
    /* fp32 draws, and their bf16 roundings for the bf16 table (the unrounded ones feed the mixed check) */
    float *x32 = rnd(&P32, ni, -1, 1), *w32 = rnd(&P32, nw, -1, 1), *b32 = rnd(&P32, OUT, -1, 1);
    float *g32 = rnd(&P32, no, -1, 1), *dx0 = junk(ni), *dw0 = rnd(&P32, nw, -1, 1);
    float *db0 = rnd(&P32, OUT, -1, 1), *r32 = rnd(&P32, no, -1, 1);
    void *hx = st(P, x32, ni), *hw = st(P, w32, nw), *hb = with_bias ? st(P, b32, OUT) : NULL, *hg = st(P, g32, no);
    void *hr = with_residual ? st(P, r32, no) : NULL;
    void *y = with_residual == 2 ? st(P, r32, no) : st_new(P, no), *dxr = with_dinp ? st(P, dx0, ni) : NULL;
    float *dwr = fcopy(dw0, nw), *dbr = with_bias ? fcopy(db0, OUT) : NULL;
    void *d_x = dst(P, hx, ni), *d_w = dst(P, hw, nw), *d_b = with_bias ? dst(P, hb, OUT) : NULL;
    void *d_g = dst(P, hg, no), *d_y = with_residual == 2 ? dst(P, hr, no) : dst_new(P, no);
    void *d_r = with_residual == 1 ? dst(P, hr, no) : with_residual == 2 ? d_y : NULL;
    void *d_dx = with_dinp ? dst(P, st(P, dx0, ni), ni) : NULL;
    float *d_dw = dfl(dw0, nw), *d_db = with_bias ? dfl(db0, OUT) : NULL;
    snprintf(shape, sizeof shape, "N=%d IN=%d OUT=%d%s%s%s", N, IN, OUT, with_bias ? "" : " bias NULL",
             with_dinp ? "" : " dinp NULL",
             with_residual == 1 ? " + residual" : with_residual == 2 ? " + residual in place" : "");
    P->cpu->linear_forward(y, hx, hw, hb, with_residual == 2 ? y : hr, N, IN, OUT);
    P->dev->linear_forward(d_y, d_x, d_w, d_b, d_r, N, IN, OUT);
    snprintf(name, sizeof name, "linear_forward %s: out", shape);
    check_st(P, name, y, d_y, no, tol);
    P->cpu->linear_backward(dxr, dwr, dbr, hg, hx, hw, N, IN, OUT);
    P->dev->linear_backward(d_dx, d_dw, d_db, d_g, d_x, d_w, N, IN, OUT);
    if (with_dinp) {
        snprintf(name, sizeof name, "linear_backward %s: dinp (written)", shape);
        check_st(P, name, dxr, d_dx, ni, tol);
    }
    snprintf(name, sizeof name, "linear_backward %s: dweight (fp32 += )", shape);
    check_f(P, name, dwr, d_dw, nw, tol_for(P, 1e-4, 1e-2));
    if (with_bias) {
        snprintf(name, sizeof name, "linear_backward %s: dbias (fp32 += )", shape);
        check_f(P, name, dbr, d_db, OUT, 1e-5);
    }
    if (P->dt == LT_BF16 && IN >= 64 && !with_residual) {
        /* mixed precision: the bf16 layer against the CPU's fp32 layer on the unrounded inputs (not for
         * tiny products, whose few terms may cancel: relative to max|cpu| the rounding is then unbounded) */
        float *y32 = fl(no), *dw32 = fcopy(dw0, nw);
        P32.cpu->linear_forward(y32, x32, w32, with_bias ? b32 : NULL, NULL, N, IN, OUT);
        P32.cpu->linear_backward(NULL, dw32, NULL, g32, x32, w32, N, IN, OUT);
        void *got = hmem(no * 2);
        dev->to_host(got, d_y, no * 2);
        char err[600];
        const int rc = dev_sync(err, sizeof err);
        float *gw = widen(P, got, no);
        const double d = rel_diff(y32, gw, no);
        report(rc == 0 && d <= 2e-2, "bf16 linear_forward %s: out against the fp32 CPU layer on unrounded inputs: "
               "max|diff|/max|cpu| %.3g (tol 0.02)", shape, d);
        free(gw);
        snprintf(name, sizeof name, "bf16 linear_backward %s: dweight against the fp32 CPU layer on unrounded inputs",
                 shape);
        check_close(name, dw32, d_dw, nw, 2e-2);
    }
    arena_reset();
}

/* The experts' grouped GEMMs against the CPU table (which runs linear_forward / _backward group by
 * group): G groups of rows[g] rows (0: an empty expert), each with its own weight (and bias) buffer;
 * dinp written over junk, dweight and dbias accumulated onto random values. */
static void test_grouped_linear(const prec *P, int G, const int *rows, int IN, int OUT, int with_bias, int with_dinp) {
    char name[240], shape[128];
    int64_t first[17] = {0};
    int len = snprintf(shape, sizeof shape, "G=%d rows=", G);
    for (int g = 0; g < G; g++) {
        first[g + 1] = first[g] + rows[g];
        len += snprintf(shape + len, sizeof shape - (size_t)len, "%s%d", g ? "," : "", rows[g]);
    }
    snprintf(shape + len, sizeof shape - (size_t)len, " IN=%d OUT=%d%s%s", IN, OUT, with_bias ? "" : " bias NULL",
             with_dinp ? "" : " dinp NULL");
    const size_t N = (size_t)first[G], ni = N * IN, no = N * OUT, nw = (size_t)OUT * IN;
    const double tol = tol_for(P, 1e-4, 1e-2);
    void *hx = st(P, rnd(&P32, ni, -1, 1), ni), *hg = st(P, rnd(&P32, no, -1, 1), no), *y = st_new(P, no);
    void *dxr = with_dinp ? st(P, junk(ni), ni) : NULL;
    void *d_x = dst(P, hx, ni), *d_g = dst(P, hg, no), *d_y = dst_new(P, no);
    void *d_dx = with_dinp ? dst(P, dxr, ni) : NULL;
    const void *hw[16], *hb[16], *d_w[16], *d_b[16];
    float *dwr[16], *dbr[16], *d_dw[16], *d_db[16];
    for (int g = 0; g < G; g++) {
        float *dw0 = rnd(&P32, nw, -1, 1), *db0 = rnd(&P32, OUT, -1, 1);
        hw[g] = st(P, rnd(&P32, nw, -1, 1), nw), d_w[g] = dst(P, hw[g], nw);
        hb[g] = st(P, rnd(&P32, OUT, -1, 1), OUT), d_b[g] = dst(P, hb[g], OUT);
        dwr[g] = fcopy(dw0, nw), d_dw[g] = dfl(dw0, nw), dbr[g] = fcopy(db0, OUT), d_db[g] = dfl(db0, OUT);
    }
    P->cpu->grouped_linear_forward(y, hx, hw, with_bias ? hb : NULL, first, G, IN, OUT);
    P->dev->grouped_linear_forward(d_y, d_x, d_w, with_bias ? d_b : NULL, first, G, IN, OUT);
    snprintf(name, sizeof name, "grouped_linear_forward %s: out", shape);
    check_st(P, name, y, d_y, no, tol);
    P->cpu->grouped_linear_backward(dxr, dwr, with_bias ? dbr : NULL, hg, hx, hw, first, G, IN, OUT);
    P->dev->grouped_linear_backward(d_dx, d_dw, with_bias ? d_db : NULL, d_g, d_x, d_w, first, G, IN, OUT);
    if (with_dinp) {
        snprintf(name, sizeof name, "grouped_linear_backward %s: dinp (written)", shape);
        check_st(P, name, dxr, d_dx, ni, tol);
    }
    for (int g = 0; g < G; g++) {
        snprintf(name, sizeof name, "grouped_linear_backward %s: dweight[%d] (fp32 += )", shape, g);
        check_f(P, name, dwr[g], d_dw[g], nw, tol);
        if (with_bias) {
            snprintf(name, sizeof name, "grouped_linear_backward %s: dbias[%d] (fp32 += )", shape, g);
            check_f(P, name, dbr[g], d_db[g], OUT, 1e-5);
        }
    }
    arena_reset();
}

/* The MLP's fused ops with the tanh GELU: fc1 (linear_gelu_forward: act and pre) and, as fc2's backward
 * on top of it, linear_dgelu_backward (dpre written over junk; dweight, dbias accumulated). The
 * backward starts from the CPU's act and pre, so it is checked on its own. OUT a multiple of 8 takes
 * cuBLASLt's GELU epilogues, otherwise their fallback kernels. */
static void test_linear_gelu(const prec *P, int N, int IN, int OUT, int with_bias) {
    char name[240], shape[96];
    const int F = OUT, C2 = IN; /* fc2: F -> C2 */
    const size_t ni = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT, nc = (size_t)N * C2;
    const double tol = tol_for(P, 1e-4, 1e-2);
    float *x32 = rnd(&P32, ni, -1, 1), *w32 = rnd(&P32, nw, -1, 1), *b32 = rnd(&P32, OUT, -1, 1);
    float *g32 = rnd(&P32, nc, -1, 1), *w2_32 = rnd(&P32, (size_t)C2 * F, -1, 1);
    float *dw0 = rnd(&P32, (size_t)C2 * F, -1, 1), *db0 = rnd(&P32, C2, -1, 1);
    void *hx = st(P, x32, ni), *hw = st(P, w32, nw), *hb = with_bias ? st(P, b32, OUT) : NULL;
    void *act = st_new(P, no), *pre = st_new(P, no), *hg = st(P, g32, nc), *hw2 = st(P, w2_32, (size_t)C2 * F);
    void *dpre = st(P, junk(no), no);
    float *dwr = fcopy(dw0, (size_t)C2 * F), *dbr = with_bias ? fcopy(db0, C2) : NULL;
    void *d_x = dst(P, hx, ni), *d_w = dst(P, hw, nw), *d_b = with_bias ? dst(P, hb, OUT) : NULL;
    void *d_act = dst_new(P, no), *d_pre = dst_new(P, no), *d_g = dst(P, hg, nc), *d_w2 = dst(P, hw2, (size_t)C2 * F);
    void *d_dpre = dst(P, dpre, no);
    float *d_dw = dfl(dw0, (size_t)C2 * F), *d_db = with_bias ? dfl(db0, C2) : NULL;
    snprintf(shape, sizeof shape, "N=%d IN=%d OUT=%d%s (%s)", N, IN, OUT, with_bias ? "" : " bias NULL",
             OUT % 8 ? "fallback" : "epilogue");
    P->cpu->linear_gelu_forward(act, pre, hx, hw, hb, N, IN, OUT);
    P->dev->linear_gelu_forward(d_act, d_pre, d_x, d_w, d_b, N, IN, OUT);
    snprintf(name, sizeof name, "linear_gelu_forward %s: act", shape);
    check_st(P, name, act, d_act, no, tol);
    snprintf(name, sizeof name, "linear_gelu_forward %s: pre", shape);
    check_st(P, name, pre, d_pre, no, tol);
    dev->to_device(d_act, act, no * esize(P->dt));
    dev->to_device(d_pre, pre, no * esize(P->dt));
    P->cpu->linear_dgelu_backward(dpre, dwr, dbr, hg, act, hw2, pre, N, F, C2);
    P->dev->linear_dgelu_backward(d_dpre, d_dw, d_db, d_g, d_act, d_w2, d_pre, N, F, C2);
    snprintf(name, sizeof name, "linear_dgelu_backward %s: dpre (written)", shape);
    check_st(P, name, dpre, d_dpre, no, tol);
    snprintf(name, sizeof name, "linear_dgelu_backward %s: dweight (fp32 += )", shape);
    check_f(P, name, dwr, d_dw, (size_t)C2 * F, tol_for(P, 1e-4, 1e-2));
    if (with_bias) {
        snprintf(name, sizeof name, "linear_dgelu_backward %s: dbias (fp32 += )", shape);
        check_f(P, name, dbr, d_db, C2, 1e-5);
    }
    arena_reset();
}

/* ---------------- attention and rope ---------------- */

/* max|diff| over the query (part 0), key (1) or value (2) heads of a qkv-layout buffer, relative to
 * max|cpu| over all of it: a part may be zero in exact arithmetic (T = 1: one key, so dq = dk = 0) and
 * hold only rounding noise, which must not be compared relative to itself. */
static double qkv_part_diff(const float *ref, const float *got, int B, int T, int H, int G, int D, int part) {
    const int hpg = H / G;
    double num = 0.0, den = 0.0;
    const size_t n = (size_t)B * T * (H + 2 * G) * D;
    for (size_t i = 0; i < n; i++) {
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
        const int slot = (int)((i / D) % (hpg + 2)); /* head slot inside its group */
        const int p = slot < hpg ? 0 : slot == hpg ? 1 : 2;
        if (p != part) continue;
        double d = fabs((double)got[i] - (double)ref[i]);
        if (isnan(d) || isinf(d)) d = INFINITY;
        if (d > num) num = d;
    }
    return den > 0.0 ? num / den : num;
}

static void test_attention(const prec *P, int B, int T, int H, int G, int D, float p) {
    char err[600], shape[128], name[200];
    const uint64_t key = 0xA77E4710ull + (uint64_t)T;
    const size_t nq = (size_t)B * T * (H + 2 * G) * D, no = (size_t)B * T * H * D, nl = (size_t)B * H * T;
    const double tol = tol_for(P, 1e-4, 1e-2);
    /* with dropout the op's heads are heads [H, 2H) of a 3H-head model (a tensor-parallel rank's slice):
     * the device must number the masks by global head as the CPU does */
    const int h0 = p > 0.0f ? H : 0, HT = p > 0.0f ? 3 * H : H;
    snprintf(shape, sizeof shape, "B=%d T=%d H=%d G=%d D=%d dropout=%g heads [%d, %d) of %d", B, T, H, G, D, p, h0,
             h0 + H, HT);
    float *qkv = rnd(P, nq, -1, 1), *g = rnd(P, no, -1, 1), *dq0 = junk(nq);
    void *hq = st(P, qkv, nq), *hg = st(P, g, no), *out = st_new(P, no), *dqr = st(P, dq0, nq);
    float *lse = fl(nl);
    void *d_qkv = dst(P, hq, nq), *d_out = dst_new(P, no), *d_g = dst(P, hg, no), *d_dq = dst(P, dqr, nq);
    float *d_lse = dfl_new(nl);
    P->cpu->attention_forward(out, lse, hq, B, T, H, G, D, p, key, h0, HT);
    P->dev->attention_forward(d_out, d_lse, d_qkv, B, T, H, G, D, p, key, h0, HT);
    snprintf(name, sizeof name, "attention_forward %s: out", shape);
    check_st(P, name, out, d_out, no, tol);
    snprintf(name, sizeof name, "attention_forward %s: lse (fp32)", shape);
    check_f(P, name, lse, d_lse, nl, 1e-4);
    /* backward from the CPU's out and lse, so it is checked on its own */
    dev->to_device(d_out, out, no * esize(P->dt));
    dev->to_device(d_lse, lse, nl * sizeof(float));
    P->cpu->attention_backward(dqr, hg, hq, out, lse, B, T, H, G, D, p, key, h0, HT);
    P->dev->attention_backward(d_dq, d_g, d_qkv, d_out, d_lse, B, T, H, G, D, p, key, h0, HT);
    void *got = hmem(nq * esize(P->dt));
    dev->to_host(got, d_dq, nq * esize(P->dt));
    int rc = dev_sync(err, sizeof err);
    float *r = widen(P, dqr, nq), *o = widen(P, got, nq);
    static const char *parts[3] = {"dq (dQ kernel)", "dk (dK/dV kernel)", "dv (dK/dV kernel)"};
    for (int part = 0; part < 3; part++) {
        if (rc != 0) {
            report(0, "%sattention_backward %s: %s: device error: %s", P->tag, shape, parts[part], err);
            continue;
        }
        const double d = qkv_part_diff(r, o, B, T, H, G, D, part);
        report(d <= tol, "%sattention_backward %s: %s (written): max|diff|/max|cpu| %.3g (tol %g)", P->tag, shape,
               parts[part], d, tol);
    }
    free(r), free(o);
    arena_reset();
}

/* The lse of rows that see no key is -inf on both sides: equal infinities agree, finite values compared. */
static void check_lse(const prec *P, const char *name, const float *ref, const float *d_got, size_t n, double tol) {
    char err[600];
    float *got = host_new(n), *r = host_copy(ref, n);
    dev->to_host(got, d_got, n * sizeof(float));
    if (dev_sync(err, sizeof err) != 0) {
        report(0, "%s%s: device error: %s", P->tag, name, err);
        free(got), free(r);
        return;
    }
    size_t ninf = 0, bad = 0;
    for (size_t i = 0; i < n; i++)
        if (isinf(r[i]) || isinf(got[i])) {
            bad += r[i] != got[i];
            ninf++;
            r[i] = got[i] = 0.0f;
        }
    const double d = rel_diff(r, got, n);
    report(d <= tol && bad == 0, "%s%s: %zu rows -inf (%zu disagree), finite max|diff|/max|cpu| %.3g (tol %g)", P->tag,
           name, ninf, bad, d, tol);
    free(got), free(r);
}

/* Ring attention's pieces (context parallelism): CP rank rq's queries (chunks rq, 2CP-1-rq of L tokens) against
 * rank rk's kv block, at global positions (on the device); the merge of that block with the rank's own one in
 * both orders (a side at -inf: rows of chunk rq see nothing of a later rank's block); the backward from the
 * merged out and lse, dq accumulated onto random values (key / value slots untouched), dkv written over junk. */
static void test_attention_kv(const prec *P, int B, int CP, int L, int H, int G, int D, float p, int rq, int rk) {
    char shape[160], name[240];
    const int T = 2 * L, S = 2 * CP * L;
    const uint64_t key = 0xC0FFEEull + (uint64_t)S;
    const size_t nq = (size_t)B * T * (H + 2 * G) * D, nk = (size_t)B * T * 2 * G * D, no = (size_t)B * T * H * D;
    const size_t nl = (size_t)B * H * T;
    const double tol = tol_for(P, 1e-4, 1e-2);
    const int h0 = p > 0.0f ? H : 0, HT = p > 0.0f ? 2 * H : H; /* with dropout: heads [H, 2H) of 2H */
    snprintf(shape, sizeof shape, "B=%d CP=%d L=%d (S=%d) H=%d G=%d D=%d dropout=%g, rank %d's queries, rank %d's kv",
             B, CP, L, S, H, G, D, p, rq, rk);
    const int32_t *qp = cp_positions(T, CP, rq), *kp = cp_positions(T, CP, rk);
    const int32_t *dqp = di32(qp, T), *dkp = di32(kp, T);
    float *qkv = rnd(P, nq, -1, 1), *kvo = rnd(P, nk, -1, 1), *kvr = rnd(P, nk, -1, 1), *g = rnd(P, no, -1, 1);
    float *dq0 = rnd(P, nq, -1, 1), *dk0 = junk(nk);
    void *hq = st(P, qkv, nq), *hko = st(P, kvo, nk), *hkr = st(P, kvr, nk), *hg = st(P, g, no);
    void *oa = st_new(P, no), *ob = st_new(P, no), *dqr = st(P, dq0, nq), *dkr = st(P, dk0, nk);
    float *la = fl(nl), *lb = fl(nl);
    void *d_q = dst(P, hq, nq), *d_kr = dst(P, hkr, nk), *d_g = dst(P, hg, no);
    void *d_o = dst_new(P, no), *d_dq = dst(P, dqr, nq), *d_dk = dst(P, dkr, nk);
    float *d_l = dfl_new(nl);
    /* the rank's own block (a), the other rank's (b) */
    P->cpu->attention_kv_forward(oa, la, hq, hko, B, T, T, H, G, D, qp, qp, S, p, key, h0, HT);
    P->cpu->attention_kv_forward(ob, lb, hq, hkr, B, T, T, H, G, D, qp, kp, S, p, key, h0, HT);
    P->dev->attention_kv_forward(d_o, d_l, d_q, d_kr, B, T, T, H, G, D, dqp, dkp, S, p, key, h0, HT);
    snprintf(name, sizeof name, "attention_kv_forward %s: out", shape);
    check_st(P, name, ob, d_o, no, tol);
    snprintf(name, sizeof name, "attention_kv_forward %s: lse (fp32)", shape);
    check_lse(P, name, lb, d_l, nl, 1e-5);
    /* merges from the CPU's block results: b into a, and a into b */
    for (int order = 0; order < 2; order++) {
        void *into = order ? ob : oa, *from = order ? oa : ob;
        float *l_into = order ? lb : la, *l_from = order ? la : lb;
        void *d_from = dst(P, from, no);
        float *d_lfrom = dfl(l_from, nl);
        dev->to_device(d_o, into, no * esize(P->dt));
        dev->to_device(d_l, l_into, nl * sizeof(float));
        P->cpu->attention_merge(into, l_into, from, l_from, B, T, H, D);
        P->dev->attention_merge(d_o, d_l, d_from, d_lfrom, B, T, H, D);
        snprintf(name, sizeof name, "attention_merge %s, %s: out", shape, order ? "own block into the other's" : "other block into the own");
        check_st(P, name, into, d_o, no, tol);
        snprintf(name, sizeof name, "attention_merge %s, %s: lse", shape, order ? "own block into the other's" : "other block into the own");
        check_lse(P, name, l_into, d_l, nl, 1e-6);
    }
    /* backward of block b from the merged out and lse (ob, lb now hold them) */
    dev->to_device(d_o, ob, no * esize(P->dt));
    dev->to_device(d_l, lb, nl * sizeof(float));
    P->cpu->attention_kv_backward(dqr, dkr, hg, hq, hkr, ob, lb, B, T, T, H, G, D, qp, kp, S, p, key, h0, HT);
    P->dev->attention_kv_backward(d_dq, d_dk, d_g, d_q, d_kr, d_o, d_l, B, T, T, H, G, D, dqp, dkp, S, p, key, h0, HT);
    snprintf(name, sizeof name, "attention_kv_backward %s: dq (+= onto random, k/v slots untouched)", shape);
    check_st(P, name, dqr, d_dq, nq, tol);
    snprintf(name, sizeof name, "attention_kv_backward %s: dkv (written over junk)", shape);
    check_st(P, name, dkr, d_dk, nk, tol);
    arena_reset();
}

static void test_rope(const prec *P, int B, int T, int H, int G, int D, float base, int cp, int rank) {
    char name[240], at[64] = "";
    const size_t n = (size_t)B * T * (H + 2 * G) * D;
    const double tol = tol_for(P, 1e-5, 1e-2);
    const int32_t *pos = rank >= 0 ? cp_positions(T, cp, rank) : NULL, *dpos = pos ? di32(pos, T) : NULL;
    if (pos) snprintf(at, sizeof at, " at the positions of CP rank %d of %d", rank, cp);
    float *x = rnd(P, n, -1, 1), *g = rnd(P, n, -1, 1);
    void *hx = st(P, x, n), *hg = st(P, g, n);
    void *d_x = dst(P, hx, n), *d_g = dst(P, hg, n);
    P->cpu->rope_forward(hx, B, T, H, G, D, base, pos);
    P->dev->rope_forward(d_x, B, T, H, G, D, base, dpos);
    snprintf(name, sizeof name, "rope_forward B=%d T=%d H=%d G=%d D=%d base=%g%s (in place, values untouched)", B, T,
             H, G, D, base, at);
    check_st(P, name, hx, d_x, n, tol);
    P->cpu->rope_backward(hg, B, T, H, G, D, base, pos);
    P->dev->rope_backward(d_g, B, T, H, G, D, base, dpos);
    snprintf(name, sizeof name, "rope_backward B=%d T=%d H=%d G=%d D=%d base=%g%s", B, T, H, G, D, base, at);
    check_st(P, name, hg, d_g, n, tol);
    arena_reset();
}

/* ---------------- cross-entropy ---------------- */

static void test_cross_entropy(const prec *P, int N, int V) {
    char name[160];
    const size_t n = (size_t)N * V;
    const double tol = tol_for(P, 1e-5, 1e-2);
    float *logits = rnd(P, n, -8, 8), *dloss = rnd(&P32, N, 0.5f, 1.5f);
    int32_t *t = hmem(sizeof(int32_t) * N);
    for (int i = 0; i < N; i++) t[i] = (i % 5 == 3) ? -1 : (int32_t)((uint32_t)(i * 2654435761u) % (uint32_t)V);
    void *hl = st(P, logits, n), *dl = st_new(P, n);
    float *loss = fl(N), *lse = fl(N);
    void *d_logits = dst(P, hl, n), *d_dl = dst_new(P, n);
    float *d_dloss = dfl(dloss, N), *d_loss = dfl_new(N), *d_lse = dfl_new(N);
    int32_t *d_t = di32(t, N);
    P->cpu->cross_entropy_forward(loss, lse, hl, t, N, V);
    P->dev->cross_entropy_forward(d_loss, d_lse, d_logits, d_t, N, V);
    snprintf(name, sizeof name, "cross_entropy_forward N=%d V=%d (some targets -1): losses (fp32)", N, V);
    check_f(P, name, loss, d_loss, N, 1e-5);
    snprintf(name, sizeof name, "cross_entropy_forward N=%d V=%d: lse (fp32)", N, V);
    check_f(P, name, lse, d_lse, N, 1e-5);
    dev->to_device(d_lse, lse, N * sizeof(float)); /* backward checked on its own */
    P->cpu->cross_entropy_backward(dl, hl, lse, t, dloss, N, V);
    dev->to_device(d_dl, st(P, junk(n), n), n * esize(P->dt)); /* backward writes, it does not accumulate */
    P->dev->cross_entropy_backward(d_dl, d_logits, d_lse, d_t, d_dloss, N, V);
    snprintf(name, sizeof name, "cross_entropy_backward N=%d V=%d: dlogits (written, not +=)", N, V);
    check_st(P, name, dl, d_dl, n, tol);
    P->dev->cross_entropy_backward(d_logits, d_logits, d_lse, d_t, d_dloss, N, V);
    snprintf(name, sizeof name, "cross_entropy_backward N=%d V=%d: in place (dlogits == logits)", N, V);
    check_st(P, name, dl, d_logits, n, tol);
    arena_reset();
}

/* ---------------- errors (last: a real CUDA error may leave the context unusable) ---------------- */

static void test_errors(void) {
    char err[600];
    for (int k = 0; k < 2; k++) { /* both tables: attention D = 256 is refused by name */
        const lt_ops *ops = k ? dev->bf16 : dev->f32;
        const size_t es = k ? 2 : 4;
        char what[160];
        snprintf(what, sizeof what, "synchronize reports a named op error (%sattention D=256), then clears it",
                 k ? "bf16 " : "");
        if (!gpu_only(what)) continue;
        const int B = 1, T = 4, H = 1, G = 1, D = 256;
        void *d_qkv = dev_alloc(es * B * T * 3 * D), *d_out = dev_alloc(es * B * T * D);
        float *d_lse = dev_alloc(sizeof(float) * B * T);
        ops->attention_forward(d_out, d_lse, d_qkv, B, T, H, G, D, 0.0f, 0, 0, H);
        int rc1 = dev_sync(err, sizeof err);
        char first[600];
        snprintf(first, sizeof first, "%s", err);
        int rc2 = dev_sync(err, sizeof err);
        report(rc1 == -1 && strncmp(first, "attention_forward: ", 19) == 0 && rc2 == 0,
               "synchronize after %sattention D=256: %d \"%s\", then %d", k ? "bf16 " : "", rc1, first, rc2);
        dev_free(d_qkv, es * B * T * 3 * D), dev_free(d_out, es * B * T * D);
        dev_free(d_lse, sizeof(float) * B * T);
    }
    if (gpu_only("synchronize reports a failed CUDA call with its op (memzero of NULL), then clears it")) {
        dev->memzero(NULL, 64);
        int rc1 = dev_sync(err, sizeof err);
        char first[600];
        snprintf(first, sizeof first, "%s", err);
        int rc2 = dev_sync(err, sizeof err);
        report(rc1 == -1 && strncmp(first, "memzero: ", 9) == 0 && rc2 == 0,
               "synchronize after memzero(NULL): %d \"%s\", then %d \"%s\"", rc1, first, rc2, err);
    }
}

/* ---------------- unaligned pointers ----------------
 * The bandwidth-bound kernels move 16-byte packs when every pointer is 16-byte aligned and fall back to
 * one element at a time otherwise: the checks above run the packed kernels (and their tails: lengths
 * that are not whole packs), these the fallbacks, on buffers 4, 8 or 12 bytes past the allocator's
 * alignment (dmem with dev_skew_unit), odd lengths and rows of odd or whole-pack lengths. The checks'
 * names say "unaligned". */

static void test_unaligned(const prec *P) {
    prec U = *P;
    U.tag = P->dt == LT_BF16 ? "bf16 unaligned " : "unaligned ";
    dev_skew_unit = 4;
    test_add(&U, 1001);
    test_gelu(&U, 1003, 0);
    test_gelu(&U, 1003, 1);
    test_swiglu(&U, 5, 16);
    test_dropout(&U, 1003, 0.1f, 5);
    test_embedding(&U, 9, 64, 11);
    test_position_embedding(&U, 2, 5, 64, 0, -1);
    test_position_embedding(&U, 2, 6, 64, 2, 1);
    test_moe_combine(&U, 9, 2, 22, 64, 5, 3);
    test_layernorm(&U, 9, 64, 1);
    test_rmsnorm(&U, 9, 64);
    test_qk_norm(&U, 5, 4, 2, 64, 0);
    test_qk_norm(&U, 5, 4, 2, 33, 1);
    test_linear(&U, 9, 16, 24, 1, 1, 1);
    test_cross_entropy(&U, 5, 67); /* logits and dlogits misaligned alike (in place) and differently */
    dev_skew_unit = 0;
}

/* The backend's fp32 kernels on pointers 4 bytes past 16-byte alignment (bf16: 2 bytes), n = 1001. */
static void test_backend_unaligned(void) {
    char err[600];
    const int64_t n = 1001;
    float *ref = host_new(n), *x = host_rand(n, -2, 2);
    float *d = dev_alloc((n + 1) * sizeof(float)), *du = d + 1;
    cpu->fill(ref, n, 0.375f);
    dev->fill(du, n, 0.375f);
    check_close("unaligned fill n=1001", ref, du, n, 0.0);
    dev->to_device(du, x, n * sizeof(float));
    cpu->scale(x, n, -0.7f);
    dev->scale(du, n, -0.7f);
    check_close("unaligned scale n=1001", x, du, n, 0.0);
    uint16_t *want = malloc(n * 2), *got = malloc(n * 2);
    for (int64_t i = 0; i < n; i++) want[i] = lt_f32_to_bf16(x[i]);
    void *dy = dev_alloc((n + 1) * 2);
    dev->cast_to_bf16((char *)dy + 2, du, n);
    dev->to_host(got, (char *)dy + 2, n * 2);
    int rc = dev_sync(err, sizeof err);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += got[i] != want[i];
    report(rc == 0 && bad == 0, "unaligned cast_to_bf16 n=1001: %lld differ from lt_f32_to_bf16%s%s", (long long)bad,
           rc ? "; error: " : "", rc ? err : "");
    float *p = host_rand(n, -1, 1), *g = host_rand(n, -1, 1);
    float *m = host_rand(n, -0.1f, 0.1f), *v = host_rand(n, 0, 0.01f);
    float *dp = dev_alloc((n + 1) * 4), *dg = dev_alloc((n + 1) * 4), *dm = dev_alloc((n + 1) * 4),
          *dv = dev_alloc((n + 1) * 4);
    dev->to_device(dp + 1, p, n * 4), dev->to_device(dg + 1, g, n * 4);
    dev->to_device(dm + 1, m, n * 4), dev->to_device(dv + 1, v, n * 4);
    for (int step = 1; step <= 2; step++) {
        cpu->adamw_update(p, g, m, v, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
        dev->adamw_update(dp + 1, dg + 1, dm + 1, dv + 1, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
    }
    check_close("unaligned adamw_update n=1001, 2 steps: param", p, dp + 1, n, 1e-6);
    check_close("unaligned adamw_update n=1001, 2 steps: exp_avg_sq", v, dv + 1, n, 1e-6);
    free(ref), free(x), free(want), free(got), free(p), free(g), free(m), free(v);
    dev_free(d, (n + 1) * 4), dev_free(dy, (n + 1) * 2);
    dev_free(dp, (n + 1) * 4), dev_free(dg, (n + 1) * 4), dev_free(dm, (n + 1) * 4), dev_free(dv, (n + 1) * 4);
}

/* ---------------- the profile (LUATRON_CUDA_PROFILE=1) ---------------- */

/* What the profile names: every op of lt_ops (per table: "fp32.<op>", "bf16.<op>") and the backend's
 * functions that issue device work. */
static const char *const prof_ops[] = {
    "embedding_forward", "embedding_backward", "position_embedding_forward", "position_embedding_backward",
    "moe_combine_forward", "moe_combine_backward",
    "layernorm_forward", "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward", "linear_forward",
    "linear_backward", "linear_gelu_forward", "linear_dgelu_backward", "grouped_linear_forward",
    "grouped_linear_backward", "attention_forward", "attention_backward",
    "attention_kv_forward", "attention_merge", "attention_kv_backward", "rope_forward", "rope_backward", "qk_norm_forward", "qk_norm_backward", "gelu_forward", "gelu_backward", "gelu_tanh_forward", "gelu_tanh_backward", "swiglu_forward", "swiglu_backward", "add_forward", "dropout_forward", "dropout_backward",
    "cross_entropy_forward", "cross_entropy_backward",
};
static const char *const prof_fns[] = {"fill",         "fill_normal", "sum_squares", "scale",
                                       "cast_to_bf16", "adamw_update", "sgd_update", "memzero",
                                       "to_device",    "to_host",      "copy"};

/* The whole report (malloc'd), its length in *len. */
static char *prof_get(int *len) {
    const int n = dev->profile_report(NULL, 0);
    char *buf = malloc((size_t)(n > 0 ? n : 0) + 1);
    *len = dev->profile_report(buf, (size_t)(n > 0 ? n : 0) + 1);
    return buf;
}

/* The row of op `name`: calls, ms and the TFLOP/s and GB/s fields ("-" where none); 0 when absent. */
static int prof_row(const char *rep, const char *name, long long *calls, double *ms, char *tf, char *gb) {
    const size_t k = strlen(name);
    for (const char *line = rep; line && *line;) {
        if (strncmp(line, name, k) == 0 && line[k] == ' ') {
            char nm[80];
            double pct, us;
            return sscanf(line, "%79s %lld %lf %lf %lf %31s %31s", nm, calls, ms, &pct, &us, tf, gb) == 7;
        }
        line = strchr(line, '\n');
        if (line) line++;
    }
    return 0;
}

/* The report's lines as TAP comments. */
static void prof_print(const char *rep) {
    for (const char *line = rep; line && *line;) {
        const char *e = strchr(line, '\n');
        const int k = e ? (int)(e - line) : (int)strlen(line);
        printf("# %.*s\n", k, line);
        line = e ? e + 1 : NULL;
    }
}

/* Without LUATRON_CUDA_PROFILE: the report is empty. */
static void test_profile_off(void) {
    if (!gpu_only("profile: off: profile_report returns 0 and an empty string")) return;
    char buf[64];
    memset(buf, 'x', sizeof buf);
    const int n = dev->profile_report ? dev->profile_report(buf, sizeof buf) : -1;
    const int n0 = dev->profile_report ? dev->profile_report(NULL, 0) : -1;
    report(n == 0 && n0 == 0 && buf[0] == '\0', "profile: off: profile_report returns %d and %d (want 0), buf %s", n,
           n0, buf[0] == '\0' ? "empty" : "NOT empty");
}

/* With LUATRON_CUDA_PROFILE=1: a few ops, then synchronize: each is listed with its count. */
static void test_profile_counts(void) {
    char err[600];
    if (!gpu_only("profile: counts, times and FLOPs of a few ops")) return;
    if (!dev->profile_report) {
        report(0, "profile: profile_report is NULL");
        return;
    }
    const int64_t n = 1001;
    const int N = 64, IN = 64, OUT = 64, B = 1, T = 64, H = 2, G = 2, D = 32;
    const size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, nq = (size_t)B * T * (H + 2 * G) * D;
    float *a = host_rand(n, -1, 1);
    uint16_t *h16 = malloc(2 * nq);
    for (size_t i = 0; i < nq; i++) h16[i] = lt_f32_to_bf16(frand());
    float *da = dev_upload(a, n), *db = dev_upload(a, n), *dy = dev_alloc(n * 4), *dlse = dev_alloc(4 * B * H * T);
    void *dx = dev_alloc(2 * nx), *dw = dev_alloc(2 * nw), *dout = dev_alloc(2 * (size_t)N * OUT);
    void *dq = dev_alloc(2 * nq), *dbias = dev_alloc(2 * (size_t)OUT);
    void *dao = dev_alloc(2 * (size_t)B * T * H * D), *dc = dev_alloc(2 * n);
    dev->to_device(dx, h16, 2 * nx), dev->to_device(dw, h16, 2 * nw), dev->to_device(dq, h16, 2 * nq);
    dev->to_device(dbias, h16, 2 * (size_t)OUT);
    int rc = dev_sync(err, sizeof err);
    const int cleared = dev->profile_report(NULL, 1); /* the uploads above do not count */
    for (int k = 0; k < 3; k++) P32.dev->add_forward(dy, da, db, n);
    for (int k = 0; k < 2; k++) P16.dev->linear_forward(dout, dx, dw, k ? dbias : NULL, NULL, N, IN, OUT);
    P16.dev->attention_forward(dao, dlse, dq, B, T, H, G, D, 0.0f, 0, 0, H);
    dev->memzero(dy, 4 * n);
    dev->cast_to_bf16(dc, da, n);
    rc |= dev_sync(err, sizeof err);
    int len = 0;
    char *rep = prof_get(&len);
    prof_print(rep);
    static const struct {
        const char *name;
        long long calls;
        int flops;
    } want[] = {{"fp32.add_forward", 3, 0}, {"bf16.linear_forward", 2, 1}, {"bf16.attention_forward", 1, 1},
                {"memzero", 1, 0},          {"cast_to_bf16", 1, 0}};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        long long calls = -1;
        double ms = -1.0;
        char tf[32] = "", gb[32] = "";
        const int found = prof_row(rep, want[i].name, &calls, &ms, tf, gb);
        const int tf_ok = want[i].flops ? strcmp(tf, "-") != 0 : strcmp(tf, "-") == 0;
        const int gb_ok = want[i].flops ? 1 : strcmp(gb, "-") != 0; /* bandwidth-bound: bytes counted */
        report(rc == 0 && found && calls == want[i].calls && ms >= 0.0 && tf_ok && gb_ok,
               "profile: %s listed %s, %lld calls (want %lld), %.4f ms (>= 0), TFLOP/s %s, GB/s %s%s%s", want[i].name,
               found ? "yes" : "NO", calls, want[i].calls, ms, tf, gb, rc ? "; error: " : "", rc ? err : "");
    }
    long long calls = 0;
    double ms;
    char tf[32], gb[32];
    report(cleared == 0 && !prof_row(rep, "to_device", &calls, &ms, tf, gb) &&
               strncmp(rep, "cuda profile: 8 ops,", 20) == 0,
           "profile: cleared before the ops (returns %d), uploads before it not listed, header counts 8 ops: \"%.40s\"",
           cleared, rep);
    /* the one GEMM with a bias: fused, unless the emulated cuBLASLt has no epilogues (then reported) */
    const char *no_epilogue = getenv("LUATRON_EMULATE_NO_LT_EPILOGUE");
    const int want_unfused = no_epilogue && *no_epilogue == '1';
    const char *unfused = strstr(rep, "cuBLASLt: 1 GEMMs without their fused epilogue");
    report(rc == 0 && (unfused != NULL) == want_unfused,
           "profile: the biased GEMM %s (want %s)", unfused ? "reported unfused" : "fused (no cuBLASLt line)",
           want_unfused ? "reported unfused: LUATRON_EMULATE_NO_LT_EPILOGUE=1" : "fused");
    char small[16];
    const int n_small = dev->profile_report(small, sizeof small);
    report(len > 0 && len == (int)strlen(rep) && n_small == len && strlen(small) == sizeof small - 1 &&
               strncmp(small, rep, sizeof small - 1) == 0,
           "profile: profile_report returns the length wanted (%d, strlen %zu), truncated into 16 bytes: %d \"%s\"",
           len, strlen(rep), n_small, small);
    free(rep);
    /* more pairs than the ring holds between two synchronizes: the oldest are read on the way, none lost */
    dev->profile_report(NULL, 1);
    for (int k = 0; k < 8200; k++) dev->memzero(dy, 4);
    rc = dev_sync(err, sizeof err);
    rep = prof_get(&len);
    calls = -1;
    const int found = prof_row(rep, "memzero", &calls, &ms, tf, gb);
    report(rc == 0 && found && calls == 8200 && strstr(rep, " 0 pending, 0 lost") != NULL,
           "profile: 8200 ops between two synchronizes (past the ring of pairs): memzero %lld calls (want 8200), %s",
           calls, strstr(rep, " 0 pending, 0 lost") ? "0 pending, 0 lost" : "pairs pending or lost");
    free(rep);
    dev->profile_report(NULL, 1);
    free(a), free(h16);
    dev_free_f(da, n), dev_free_f(db, n), dev_free_f(dy, n), dev_free(dlse, 4 * B * H * T);
    dev_free(dx, 2 * nx), dev_free(dw, 2 * nw), dev_free(dout, 2 * (size_t)N * OUT), dev_free(dq, 2 * nq);
    dev_free(dbias, 2 * (size_t)OUT);
    dev_free(dao, 2 * (size_t)B * T * H * D), dev_free(dc, 2 * n);
}

/* After every check has run under the profile: every op of both tables and every backend function
 * that issues device work is listed, each row well formed. */
static void test_profile_all(void) {
    char err[600];
    if (!gpu_only("profile: every op of both tables and the backend's functions listed")) return;
    const size_t nops = (sizeof(lt_ops) - offsetof(lt_ops, embedding_forward)) / sizeof(void (*)(void));
    const int rc = dev_sync(err, sizeof err);
    int len = 0;
    char *rep = prof_get(&len);
    prof_print(rep);
    int missing = 0;
    char first[80] = "";
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < sizeof prof_ops / sizeof *prof_ops; i++) {
            char name[80];
            long long calls = 0;
            double ms = -1.0;
            char tf[32], gb[32];
            snprintf(name, sizeof name, "%s.%s", k ? "bf16" : "fp32", prof_ops[i]);
            if (!prof_row(rep, name, &calls, &ms, tf, gb) || calls < 1 || ms < 0.0) {
                if (!missing++) snprintf(first, sizeof first, "%s", name);
            }
        }
    for (size_t i = 0; i < sizeof prof_fns / sizeof *prof_fns; i++) {
        long long calls = 0;
        double ms = -1.0;
        char tf[32], gb[32];
        if (!prof_row(rep, prof_fns[i], &calls, &ms, tf, gb) || calls < 1 || ms < 0.0) {
            if (!missing++) snprintf(first, sizeof first, "%s", prof_fns[i]);
        }
    }
    report(rc == 0 && nops == sizeof prof_ops / sizeof *prof_ops && missing == 0,
           "profile: after every check, %zu ops x 2 tables and %zu backend functions listed with calls and times: "
           "%d missing%s%s", nops, sizeof prof_fns / sizeof *prof_fns, missing, missing ? ", first " : "", first);
    free(rep);
}

/* LUATRON_CUDA_PLUGIN as an absolute path (dlopen searches the library path for a bare name), or the
 * plugin in this test's runfiles when the variable is unset. */
static void locate_plugin(void) {
    char buf[PATH_MAX + 64], cwd[PATH_MAX];
    const char *env = getenv("LUATRON_CUDA_PLUGIN");
    if (env && *env) {
        if (env[0] != '/' && getcwd(cwd, sizeof cwd)) {
            snprintf(buf, sizeof buf, "%s/%s", cwd, env);
            setenv("LUATRON_CUDA_PLUGIN", buf, 1);
        }
        return;
    }
    const char *srcdir = getenv("TEST_SRCDIR"), *ws = getenv("TEST_WORKSPACE");
    if (srcdir && ws) {
        snprintf(buf, sizeof buf, "%s/%s/%s", srcdir, ws, LT_CUDA_PLUGIN_FILE);
        if (access(buf, R_OK) == 0) setenv("LUATRON_CUDA_PLUGIN", buf, 1);
    }
}

/* --profile (the *_profile_test targets, run with LUATRON_CUDA_PROFILE=1): the profile's own checks
 * first and last, every other check in between, timed by the profile's wrappers. */
int main(int argc, char **argv) {
    const int profile_mode = argc > 1 && strcmp(argv[1], "--profile") == 0;
    char err[512] = "";
    locate_plugin();
    printf("# plugin: %s\n", getenv("LUATRON_CUDA_PLUGIN") ? getenv("LUATRON_CUDA_PLUGIN") : "(beside the executable)");
    cpu = lt_backend_cpu();
    dev = lt_backend_get("cuda", err, sizeof err);
    if (dev) {
        have_gpu = 1;
        tap_result(1, __FILE__, __LINE__, "the CUDA backend opens: %s", dev->description);
    } else if (strstr(err, "no GPU")) {
        /* the plugin loaded and reported no device: the expected outcome on a CPU-only machine */
        tap_result(1, __FILE__, __LINE__, "the CUDA plugin loads and reports no GPU (%s)", err);
        snprintf(skip_reason, sizeof skip_reason, "%s", strstr(err, "no GPU"));
        dev = cpu; /* stand-in: the checks below run CPU against CPU and report SKIP */
    } else {
        tap_result(0, __FILE__, __LINE__, "the CUDA backend opens: %s", err);
        return tap_done();
    }

    test_tables();
    if (!dev->f32 || !dev->bf16) return tap_done();
    P32 = (prec){LT_F32, cpu->f32, dev->f32, ""};
    P16 = (prec){LT_BF16, cpu->bf16, dev->bf16, "bf16 "};

    if (profile_mode) test_profile_counts();
    else test_profile_off();

    test_memory();

    /* the backend's own fp32 kernels */
    test_fill();
    test_scale();
    test_sum_squares(1);
    test_sum_squares(1000003);
    test_adamw();
    test_sgd(0.0f);
    test_sgd(0.9f);
    test_cast_to_bf16();
    test_backend_unaligned();

    /* every op, in both tables */
    const prec *precs[2] = {&P32, &P16};
    for (int k = 0; k < 2; k++) {
        const prec *P = precs[k];
        test_add(P, 300007);
        test_gelu(P, 1, 0);
        test_gelu(P, 1000003, 0);
        test_gelu(P, 1000003, 1);
        test_swiglu(P, 1, 1);
        test_swiglu(P, 37, 129);
        test_swiglu(P, 256, 1000);
        test_dropout(P, 1000003, 0.1f, 987654321ull);
        test_dropout(P, 100003, 0.5f, 0xFFFFFFF0ull); /* counter crosses 2^32 */
        test_dropout(P, 4099, 0.0f, 7);               /* p = 0: a copy both ways */

        test_embedding(P, 67, 129, 50);
        test_embedding(P, 1, 768, 7);
        test_position_embedding(P, 3, 67, 129, 0, -1);
        test_position_embedding(P, 1, 1, 5, 0, -1);
        test_position_embedding(P, 2, 7, 64, 0, -1); /* whole 16-byte packs per row */
        test_position_embedding(P, 2, 10, 64, 4, 1); /* context parallelism: rank 1 of 4 */
        test_position_embedding(P, 3, 34, 129, 2, 0);

        /* N, k, M, C, every hole-th slot empty, the token with none */
        test_moe_combine(P, 7, 3, 7 * 3 + 5, 37, 5, 2);
        test_moe_combine(P, 67, 2, 67 * 2 + 20, 129, 9, 40);
        test_moe_combine(P, 33, 4, 33 * 4 + 8, 64, 0, -1); /* whole 16-byte packs per row */
        test_moe_combine(P, 300, 2, 700, 256, 11, 7);
        test_moe_combine(P, 5, 1, 8, 1, 0, -1);            /* k = 1, C = 1 */

        test_layernorm(P, 1, 3, 1); /* not C = 1: its dinp is 0 + rounding noise * rstd (= 1/sqrt(eps)) */
        test_layernorm(P, 7, 33, 1);
        test_layernorm(P, 67, 768, 0);
        test_layernorm(P, 300, 1000, 1);
        test_rmsnorm(P, 1, 3);
        test_rmsnorm(P, 7, 33);
        test_rmsnorm(P, 300, 1000);
        /* N, H, G, D, rms */
        test_qk_norm(P, 1, 1, 1, 3, 0);
        test_qk_norm(P, 7, 4, 2, 33, 0);  /* rows not whole packs */
        test_qk_norm(P, 67, 8, 2, 64, 0); /* 4 query heads per group, whole packs */
        test_qk_norm(P, 67, 4, 4, 128, 1);
        test_qk_norm(P, 33, 6, 1, 80, 1);

        test_linear(P, 1, 1, 1, 1, 1, 0);
        test_linear(P, 37, 65, 129, 1, 1, 0);
        test_linear(P, 37, 65, 129, 0, 0, 0);
        test_linear(P, 37, 65, 129, 1, 1, 1);  /* + residual */
        test_linear(P, 37, 65, 129, 0, 0, 2);  /* + residual in place, no bias */
        test_linear(P, 64, 128, 200, 1, 1, 0); /* tensor-core friendly leading dimensions */
        test_linear(P, 64, 128, 200, 1, 0, 2);
        test_linear(P, 256, 768, 2304, 1, 1, 0);
        /* groups, rows per group (0: an expert without tokens), IN, OUT, bias, dinp */
        test_grouped_linear(P, 4, (const int[]){5, 0, 17, 3}, 33, 40, 1, 1);
        test_grouped_linear(P, 3, (const int[]){64, 1, 30}, 128, 96, 0, 1);
        test_grouped_linear(P, 2, (const int[]){9, 12}, 24, 65, 1, 0);
        test_grouped_linear(P, 2, (const int[]){0, 0}, 16, 8, 1, 1); /* no rows at all: nothing to do */
        test_linear_gelu(P, 37, 65, 129, 1);  /* OUT not a multiple of 8: the fallback */
        test_linear_gelu(P, 64, 48, 200, 1);  /* the GELU epilogues */
        test_linear_gelu(P, 33, 40, 64, 0);

        /* B, T, H, G, D, dropout */
        test_attention(P, 2, 1, 4, 2, 64, 0.0f);    /* T = 1 */
        test_attention(P, 1, 67, 4, 2, 32, 0.0f);   /* GQA, T not a multiple of the 32-row tile */
        test_attention(P, 2, 67, 4, 4, 80, 0.1f);   /* H = G, D = 80, dropout */
        test_attention(P, 1, 256, 4, 2, 128, 0.0f); /* T = 256, D = 128 */
        test_attention(P, 1, 256, 4, 2, 128, 0.1f); /* the same with dropout */
        test_attention(P, 1, 256, 2, 1, 96, 0.2f);  /* one kv group, D = 96 */
        test_attention(P, 2, 100, 8, 2, 64, 0.0f);  /* 4 query heads per group */
        test_attention(P, 1, 33, 2, 1, 17, 0.1f);   /* odd D */

        test_rope(P, 2, 67, 4, 2, 64, 10000.0f, 0, -1);
        test_rope(P, 1, 256, 2, 2, 128, 500000.0f, 0, -1);
        test_rope(P, 3, 1, 4, 1, 32, 10000.0f, 0, -1);
        test_rope(P, 2, 74, 4, 2, 64, 10000.0f, 4, 2); /* context parallelism: rank 2 of 4 */

        /* B, CP, L, H, G, D, dropout, the queries' rank, the kv block's rank */
        test_attention_kv(P, 2, 2, 37, 4, 2, 32, 0.0f, 0, 1); /* a later rank's block: chunk 0 sees none of it */
        test_attention_kv(P, 1, 2, 37, 4, 2, 32, 0.1f, 1, 0);
        test_attention_kv(P, 2, 4, 9, 3, 3, 80, 0.2f, 2, 1);  /* MHA, D = 80, L not a multiple of 32 */
        test_attention_kv(P, 1, 4, 20, 4, 1, 128, 0.0f, 1, 3); /* one kv group, D = 128 */
        test_attention_kv(P, 1, 2, 5, 2, 1, 17, 0.3f, 1, 1);  /* odd D, the rank's own block */

        test_cross_entropy(P, 5, 7);
        test_cross_entropy(P, 67, 50257);

        test_unaligned(P);
    }

    if (profile_mode) test_profile_all();
    test_errors();
    return tap_done();
}

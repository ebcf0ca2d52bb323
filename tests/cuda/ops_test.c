/* The CUDA backend (luatron_cuda.so, loaded through lt_backend_get("cuda")) against the CPU backend:
 * every op of the lt_backend table on random inputs (fixed seeds), several shapes each (sizes that
 * are not multiples of the kernels' tiles, T = 1, odd T, GQA and H = G, dropout on and off), with
 * gradients that start non-zero so accumulation (+=) is checked too. Each TAP line names the op,
 * the shape and the output, and prints the measured difference:
 *     max |cuda - cpu| / max |cpu|  over the output  <= tolerance
 * Tolerances: 0 (bit-equal) for copies, fills, add, scale, position embeddings and dropout (whose
 * masks must match the CPU's element for element); 1e-6 for fill_normal, dropout backward and the
 * optimizers; 1e-5 for the other elementwise ops, norms, embeddings, rope and cross-entropy; 1e-4
 * for the GEMM-based linear ops and attention; 1e-9 (relative) for sum_squares (double sums).
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
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* ---------------- elementwise ---------------- */

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

static void test_scale_add(void) {
    const int64_t n = 300007;
    float *a = host_rand(n, -2, 2), *b = host_rand(n, -2, 2);
    float *da = dev_upload(a, n), *db = dev_upload(b, n), *dout = dev_alloc(n * sizeof(float));
    float *ref = host_new(n);
    cpu->add_forward(ref, a, b, n);
    dev->add_forward(dout, da, db, n);
    check_close("add_forward n=300007", ref, dout, n, 0.0);
    dev->add_forward(da, da, db, n); /* out aliasing a */
    check_close("add_forward n=300007 in place (out == a)", ref, da, n, 0.0);
    memcpy(ref, b, n * sizeof(float));
    cpu->scale(ref, n, -0.7f);
    dev->scale(db, n, -0.7f);
    check_close("scale n=300007", ref, db, n, 0.0);
    free(a), free(b), free(ref);
    dev_free_f(da, n), dev_free_f(db, n), dev_free_f(dout, n);
}

static void test_gelu(int64_t n) {
    char name[128];
    float *x = host_rand(n, -4, 4), *g = host_rand(n, -1, 1), *dx0 = host_rand(n, -1, 1);
    float *dx = dev_upload(x, n), *dg = dev_upload(g, n), *dy = dev_alloc(n * sizeof(float)), *ddx = dev_upload(dx0, n);
    float *ref = host_new(n);
    cpu->gelu_forward(ref, x, n);
    dev->gelu_forward(dy, dx, n);
    snprintf(name, sizeof name, "gelu_forward n=%lld", (long long)n);
    check_close(name, ref, dy, n, 1e-5);
    memcpy(ref, dx0, n * sizeof(float));
    cpu->gelu_backward(ref, g, x, n);
    dev->gelu_backward(ddx, dg, dx, n);
    snprintf(name, sizeof name, "gelu_backward n=%lld (dinp += )", (long long)n);
    check_close(name, ref, ddx, n, 1e-5);
    free(x), free(g), free(dx0), free(ref);
    dev_free_f(dx, n), dev_free_f(dg, n), dev_free_f(dy, n), dev_free_f(ddx, n);
}

static void test_swiglu(int N, int F) {
    char name[128];
    const size_t ni = (size_t)N * 2 * F, no = (size_t)N * F;
    float *x = host_rand(ni, -4, 4), *g = host_rand(no, -1, 1), *dx0 = host_rand(ni, -1, 1);
    float *dx = dev_upload(x, ni), *dg = dev_upload(g, no), *dy = dev_alloc(no * sizeof(float)), *ddx = dev_upload(dx0, ni);
    float *ref = host_new(ni);
    cpu->swiglu_forward(ref, x, N, F);
    dev->swiglu_forward(dy, dx, N, F);
    snprintf(name, sizeof name, "swiglu_forward N=%d F=%d", N, F);
    check_close(name, ref, dy, no, 1e-5);
    memcpy(ref, dx0, ni * sizeof(float));
    cpu->swiglu_backward(ref, g, x, N, F);
    dev->swiglu_backward(ddx, dg, dx, N, F);
    snprintf(name, sizeof name, "swiglu_backward N=%d F=%d (dinp += )", N, F);
    check_close(name, ref, ddx, ni, 1e-5);
    free(x), free(g), free(dx0), free(ref);
    dev_free_f(dx, ni), dev_free_f(dg, no), dev_free_f(dy, no), dev_free_f(ddx, ni);
}

/* Dropout: the output must equal the CPU's exactly, zeros (the mask) included. */
static void test_dropout(int64_t n, float p, uint64_t first) {
    char err[600];
    const uint64_t key = 0xD50F0123456789ull;
    float *x = host_rand(n, 0.5f, 1.5f), *g = host_rand(n, -1, 1), *dx0 = host_rand(n, -1, 1);
    for (int64_t i = 0; i < n; i += 3) x[i] = -x[i]; /* never zero: a zero output is a dropped element */
    float *ref = host_new(n), *got = host_new(n);
    float *dx = dev_upload(x, n), *dy = dev_alloc(n * sizeof(float)), *dg = dev_upload(g, n), *ddx = dev_upload(dx0, n);
    cpu->dropout_forward(ref, x, n, p, key, first);
    dev->dropout_forward(dy, dx, n, p, key, first);
    dev->to_host(got, dy, n * sizeof(float));
    int rc = dev_sync(err, sizeof err);
    int64_t mask_diff = 0, dropped = 0;
    for (int64_t i = 0; i < n; i++) {
        mask_diff += (ref[i] == 0.0f) != (got[i] == 0.0f);
        dropped += ref[i] == 0.0f;
    }
    double d = rel_diff(ref, got, n);
    report(rc == 0 && mask_diff == 0 && d == 0.0,
           "dropout_forward n=%lld p=%g first=%llu: %lld of %lld mask elements differ (%lld dropped), "
           "max|diff|/max|cpu| %.3g (tol 0)%s%s",
           (long long)n, p, (unsigned long long)first, (long long)mask_diff, (long long)n, (long long)dropped, d,
           rc ? "; error: " : "", rc ? err : "");
    /* in place: out == inp */
    dev->dropout_forward(dx, dx, n, p, key, first);
    char name[160];
    snprintf(name, sizeof name, "dropout_forward n=%lld p=%g in place (out == inp)", (long long)n, p);
    check_close(name, ref, dx, n, 0.0);
    memcpy(ref, dx0, n * sizeof(float));
    cpu->dropout_backward(ref, g, n, p, key, first);
    dev->dropout_backward(ddx, dg, n, p, key, first);
    snprintf(name, sizeof name, "dropout_backward n=%lld p=%g (dinp += )", (long long)n, p);
    check_close(name, ref, ddx, n, 1e-6);
    free(x), free(g), free(dx0), free(ref), free(got);
    dev_free_f(dx, n), dev_free_f(dy, n), dev_free_f(dg, n), dev_free_f(ddx, n);
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

static void test_embedding(int N, int C, int V) {
    char name[160];
    int32_t *ids = malloc(sizeof(int32_t) * N);
    for (int n = 0; n < N; n++) ids[n] = (int32_t)((uint32_t)(n * 2654435761u) % (uint32_t)V); /* repeats when N > V */
    ids[N - 1] = ids[0];
    float *table = host_rand((size_t)V * C, -1, 1), *g = host_rand((size_t)N * C, -1, 1);
    float *dt0 = host_rand((size_t)V * C, -1, 1), *ref = host_new((size_t)N * C), *dref = host_copy(dt0, (size_t)V * C);
    int32_t *dids = dev_upload_i32(ids, N);
    float *dtable = dev_upload(table, (size_t)V * C), *dg = dev_upload(g, (size_t)N * C);
    float *dout = dev_alloc(sizeof(float) * N * C), *ddt = dev_upload(dt0, (size_t)V * C);
    cpu->embedding_forward(ref, ids, table, N, C);
    dev->embedding_forward(dout, dids, dtable, N, C);
    snprintf(name, sizeof name, "embedding_forward N=%d C=%d V=%d", N, C, V);
    check_close(name, ref, dout, (size_t)N * C, 0.0);
    cpu->embedding_backward(dref, g, ids, N, C);
    dev->embedding_backward(ddt, dg, dids, N, C);
    snprintf(name, sizeof name, "embedding_backward N=%d C=%d V=%d, repeated ids (dtable += , atomics)", N, C, V);
    check_close(name, dref, ddt, (size_t)V * C, 1e-5);
    free(ids), free(table), free(g), free(dt0), free(ref), free(dref);
    dev_free(dids, sizeof(int32_t) * N);
    dev_free_f(dtable, (size_t)V * C), dev_free_f(dg, (size_t)N * C), dev_free_f(dout, (size_t)N * C);
    dev_free_f(ddt, (size_t)V * C);
}

static void test_position_embedding(int B, int T, int C) {
    char name[160];
    const size_t n = (size_t)B * T * C, nw = (size_t)T * C;
    float *x = host_rand(n, -1, 1), *wpe = host_rand(nw, -1, 1), *dw0 = host_rand(nw, -1, 1);
    float *dx = dev_upload(x, n), *dwpe = dev_upload(wpe, nw), *ddw = dev_upload(dw0, nw);
    float *ref = host_copy(x, n), *dref = host_copy(dw0, nw);
    cpu->position_embedding_forward(ref, wpe, B, T, C);
    dev->position_embedding_forward(dx, dwpe, B, T, C);
    snprintf(name, sizeof name, "position_embedding_forward B=%d T=%d C=%d (out += )", B, T, C);
    check_close(name, ref, dx, n, 0.0);
    cpu->position_embedding_backward(dref, x, B, T, C);
    float *dxorig = dev_upload(x, n);
    dev->position_embedding_backward(ddw, dxorig, B, T, C);
    snprintf(name, sizeof name, "position_embedding_backward B=%d T=%d C=%d (dwpe += , same order)", B, T, C);
    check_close(name, dref, ddw, nw, 0.0);
    free(x), free(wpe), free(dw0), free(ref), free(dref);
    dev_free_f(dx, n), dev_free_f(dwpe, nw), dev_free_f(ddw, nw), dev_free_f(dxorig, n);
}

/* ---------------- norms ---------------- */

static void test_layernorm(int N, int C, int with_bias) {
    char name[160];
    const size_t n = (size_t)N * C;
    float *x = host_rand(n, 2, 4); /* |mean| > std: the variance must be two-pass */
    float *w = host_rand(C, 0.5f, 1.5f), *bias = host_rand(C, -1, 1), *g = host_rand(n, -1, 1);
    float *dx0 = host_rand(n, -1, 1), *dw0 = host_rand(C, -1, 1), *db0 = host_rand(C, -1, 1);
    float *y = host_new(n), *mean = host_new(N), *rstd = host_new(N);
    float *dxr = host_copy(dx0, n), *dwr = host_copy(dw0, C), *dbr = host_copy(db0, C);
    float *d_x = dev_upload(x, n), *d_w = dev_upload(w, C), *d_b = with_bias ? dev_upload(bias, C) : NULL;
    float *d_y = dev_alloc(n * sizeof(float)), *d_mean = dev_alloc(N * sizeof(float)), *d_rstd = dev_alloc(N * sizeof(float));
    float *d_g = dev_upload(g, n), *d_dx = dev_upload(dx0, n), *d_dw = dev_upload(dw0, C);
    float *d_db = with_bias ? dev_upload(db0, C) : NULL;
    const char *tag = with_bias ? "" : " bias NULL";
    cpu->layernorm_forward(y, mean, rstd, x, w, with_bias ? bias : NULL, N, C, 1e-5f);
    dev->layernorm_forward(d_y, d_mean, d_rstd, d_x, d_w, d_b, N, C, 1e-5f);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: out", N, C, tag);
    check_close(name, y, d_y, n, 1e-5);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: mean", N, C, tag);
    check_close(name, mean, d_mean, N, 1e-5);
    snprintf(name, sizeof name, "layernorm_forward N=%d C=%d%s: rstd", N, C, tag);
    check_close(name, rstd, d_rstd, N, 1e-5);
    /* backward from the CPU's saved mean / rstd, so it is checked on its own */
    dev->to_device(d_mean, mean, N * sizeof(float));
    dev->to_device(d_rstd, rstd, N * sizeof(float));
    cpu->layernorm_backward(dxr, dwr, with_bias ? dbr : NULL, g, x, w, mean, rstd, N, C);
    dev->layernorm_backward(d_dx, d_dw, d_db, d_g, d_x, d_w, d_mean, d_rstd, N, C);
    snprintf(name, sizeof name, "layernorm_backward N=%d C=%d%s: dinp (+= )", N, C, tag);
    check_close(name, dxr, d_dx, n, 1e-5);
    snprintf(name, sizeof name, "layernorm_backward N=%d C=%d%s: dweight (+= )", N, C, tag);
    check_close(name, dwr, d_dw, C, 1e-5);
    if (with_bias) {
        snprintf(name, sizeof name, "layernorm_backward N=%d C=%d: dbias (+= )", N, C);
        check_close(name, dbr, d_db, C, 1e-5);
    }
    free(x), free(w), free(bias), free(g), free(dx0), free(dw0), free(db0), free(y), free(mean), free(rstd);
    free(dxr), free(dwr), free(dbr);
    dev_free_f(d_x, n), dev_free_f(d_w, C), dev_free_f(d_y, n), dev_free_f(d_mean, N), dev_free_f(d_rstd, N);
    dev_free_f(d_g, n), dev_free_f(d_dx, n), dev_free_f(d_dw, C);
    if (with_bias) dev_free_f(d_b, C), dev_free_f(d_db, C);
}

static void test_rmsnorm(int N, int C) {
    char name[160];
    const size_t n = (size_t)N * C;
    float *x = host_rand(n, -2, 2), *w = host_rand(C, 0.5f, 1.5f), *g = host_rand(n, -1, 1);
    float *dx0 = host_rand(n, -1, 1), *dw0 = host_rand(C, -1, 1);
    float *y = host_new(n), *rstd = host_new(N), *dxr = host_copy(dx0, n), *dwr = host_copy(dw0, C);
    float *d_x = dev_upload(x, n), *d_w = dev_upload(w, C), *d_y = dev_alloc(n * sizeof(float));
    float *d_rstd = dev_alloc(N * sizeof(float)), *d_g = dev_upload(g, n), *d_dx = dev_upload(dx0, n);
    float *d_dw = dev_upload(dw0, C);
    cpu->rmsnorm_forward(y, rstd, x, w, N, C, 1e-6f);
    dev->rmsnorm_forward(d_y, d_rstd, d_x, d_w, N, C, 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_forward N=%d C=%d: out", N, C);
    check_close(name, y, d_y, n, 1e-5);
    snprintf(name, sizeof name, "rmsnorm_forward N=%d C=%d: rstd", N, C);
    check_close(name, rstd, d_rstd, N, 1e-5);
    dev->to_device(d_rstd, rstd, N * sizeof(float));
    cpu->rmsnorm_backward(dxr, dwr, g, x, w, rstd, N, C);
    dev->rmsnorm_backward(d_dx, d_dw, d_g, d_x, d_w, d_rstd, N, C);
    snprintf(name, sizeof name, "rmsnorm_backward N=%d C=%d: dinp (+= )", N, C);
    check_close(name, dxr, d_dx, n, 1e-5);
    snprintf(name, sizeof name, "rmsnorm_backward N=%d C=%d: dweight (+= )", N, C);
    check_close(name, dwr, d_dw, C, 1e-5);
    free(x), free(w), free(g), free(dx0), free(dw0), free(y), free(rstd), free(dxr), free(dwr);
    dev_free_f(d_x, n), dev_free_f(d_w, C), dev_free_f(d_y, n), dev_free_f(d_rstd, N), dev_free_f(d_g, n);
    dev_free_f(d_dx, n), dev_free_f(d_dw, C);
}

/* ---------------- linear ---------------- */

static void test_linear(int N, int IN, int OUT, int with_bias, int with_dinp) {
    char name[200];
    const size_t ni = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT;
    float *x = host_rand(ni, -1, 1), *w = host_rand(nw, -1, 1), *b = host_rand(OUT, -1, 1), *g = host_rand(no, -1, 1);
    float *dx0 = host_rand(ni, -1, 1), *dw0 = host_rand(nw, -1, 1), *db0 = host_rand(OUT, -1, 1);
    float *y = host_new(no), *dxr = host_copy(dx0, ni), *dwr = host_copy(dw0, nw), *dbr = host_copy(db0, OUT);
    float *d_x = dev_upload(x, ni), *d_w = dev_upload(w, nw), *d_b = dev_upload(b, OUT), *d_g = dev_upload(g, no);
    float *d_y = dev_alloc(no * sizeof(float)), *d_dx = dev_upload(dx0, ni), *d_dw = dev_upload(dw0, nw);
    float *d_db = dev_upload(db0, OUT);
    char shape[96];
    snprintf(shape, sizeof shape, "N=%d IN=%d OUT=%d%s%s", N, IN, OUT, with_bias ? "" : " bias NULL",
             with_dinp ? "" : " dinp NULL");
    cpu->linear_forward(y, x, w, with_bias ? b : NULL, N, IN, OUT);
    dev->linear_forward(d_y, d_x, d_w, with_bias ? d_b : NULL, N, IN, OUT);
    snprintf(name, sizeof name, "linear_forward %s: out", shape);
    check_close(name, y, d_y, no, 1e-4);
    cpu->linear_backward(with_dinp ? dxr : NULL, dwr, with_bias ? dbr : NULL, g, x, w, N, IN, OUT);
    dev->linear_backward(with_dinp ? d_dx : NULL, d_dw, with_bias ? d_db : NULL, d_g, d_x, d_w, N, IN, OUT);
    if (with_dinp) {
        snprintf(name, sizeof name, "linear_backward %s: dinp (+= )", shape);
        check_close(name, dxr, d_dx, ni, 1e-4);
    }
    snprintf(name, sizeof name, "linear_backward %s: dweight (+= )", shape);
    check_close(name, dwr, d_dw, nw, 1e-4);
    if (with_bias) {
        snprintf(name, sizeof name, "linear_backward %s: dbias (+= )", shape);
        check_close(name, dbr, d_db, OUT, 1e-5);
    }
    free(x), free(w), free(b), free(g), free(dx0), free(dw0), free(db0), free(y), free(dxr), free(dwr), free(dbr);
    dev_free_f(d_x, ni), dev_free_f(d_w, nw), dev_free_f(d_b, OUT), dev_free_f(d_g, no), dev_free_f(d_y, no);
    dev_free_f(d_dx, ni), dev_free_f(d_dw, nw), dev_free_f(d_db, OUT);
}

/* ---------------- attention and rope ---------------- */

/* rel_diff over the query (part 0), key (1) or value (2) heads of a qkv-layout buffer. */
static double qkv_part_diff(const float *ref, const float *got, int B, int T, int H, int G, int D, int part) {
    const int hpg = H / G;
    double num = 0.0, den = 0.0;
    const size_t n = (size_t)B * T * (H + 2 * G) * D;
    for (size_t i = 0; i < n; i++) {
        const int slot = (int)((i / D) % (hpg + 2)); /* head slot inside its group */
        const int p = slot < hpg ? 0 : slot == hpg ? 1 : 2;
        if (p != part) continue;
        double d = fabs((double)got[i] - (double)ref[i]);
        if (isnan(d) || isinf(d)) d = INFINITY;
        if (d > num) num = d;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    return den > 0.0 ? num / den : num;
}

static void test_attention(int B, int T, int H, int G, int D, float p) {
    char err[600], shape[128];
    const uint64_t key = 0xA77E4710ull + (uint64_t)T;
    const size_t nq = (size_t)B * T * (H + 2 * G) * D, no = (size_t)B * T * H * D, nl = (size_t)B * H * T;
    snprintf(shape, sizeof shape, "B=%d T=%d H=%d G=%d D=%d dropout=%g", B, T, H, G, D, p);
    float *qkv = host_rand(nq, -1, 1), *g = host_rand(no, -1, 1), *dq0 = host_rand(nq, -1, 1);
    float *out = host_new(no), *lse = host_new(nl), *dqr = host_copy(dq0, nq);
    float *d_qkv = dev_upload(qkv, nq), *d_out = dev_alloc(no * sizeof(float)), *d_lse = dev_alloc(nl * sizeof(float));
    float *d_g = dev_upload(g, no), *d_dq = dev_upload(dq0, nq);
    cpu->attention_forward(out, lse, qkv, B, T, H, G, D, p, key);
    dev->attention_forward(d_out, d_lse, d_qkv, B, T, H, G, D, p, key);
    char name[200];
    snprintf(name, sizeof name, "attention_forward %s: out", shape);
    check_close(name, out, d_out, no, 1e-4);
    snprintf(name, sizeof name, "attention_forward %s: lse", shape);
    check_close(name, lse, d_lse, nl, 1e-4);
    /* backward from the CPU's out and lse, so it is checked on its own */
    dev->to_device(d_out, out, no * sizeof(float));
    dev->to_device(d_lse, lse, nl * sizeof(float));
    cpu->attention_backward(dqr, g, qkv, out, lse, B, T, H, G, D, p, key);
    dev->attention_backward(d_dq, d_g, d_qkv, d_out, d_lse, B, T, H, G, D, p, key);
    float *got = host_new(nq);
    dev->to_host(got, d_dq, nq * sizeof(float));
    int rc = dev_sync(err, sizeof err);
    static const char *parts[3] = {"dq (dQ kernel)", "dk (dK/dV kernel)", "dv (dK/dV kernel)"};
    for (int part = 0; part < 3; part++) {
        if (rc != 0) {
            report(0, "attention_backward %s: %s: device error: %s", shape, parts[part], err);
            continue;
        }
        const double d = qkv_part_diff(dqr, got, B, T, H, G, D, part);
        report(d <= 1e-4, "attention_backward %s: %s (+= ): max|diff|/max|cpu| %.3g (tol 1e-04)", shape, parts[part], d);
    }
    free(qkv), free(g), free(dq0), free(out), free(lse), free(dqr), free(got);
    dev_free_f(d_qkv, nq), dev_free_f(d_out, no), dev_free_f(d_lse, nl), dev_free_f(d_g, no), dev_free_f(d_dq, nq);
}

static void test_rope(int B, int T, int H, int G, int D, float base) {
    char name[200];
    const size_t n = (size_t)B * T * (H + 2 * G) * D;
    float *x = host_rand(n, -1, 1), *g = host_rand(n, -1, 1);
    float *d_x = dev_upload(x, n), *d_g = dev_upload(g, n);
    cpu->rope_forward(x, B, T, H, G, D, base);
    dev->rope_forward(d_x, B, T, H, G, D, base);
    snprintf(name, sizeof name, "rope_forward B=%d T=%d H=%d G=%d D=%d base=%g (in place, values untouched)", B, T, H,
             G, D, base);
    check_close(name, x, d_x, n, 1e-5);
    cpu->rope_backward(g, B, T, H, G, D, base);
    dev->rope_backward(d_g, B, T, H, G, D, base);
    snprintf(name, sizeof name, "rope_backward B=%d T=%d H=%d G=%d D=%d base=%g", B, T, H, G, D, base);
    check_close(name, g, d_g, n, 1e-5);
    free(x), free(g);
    dev_free_f(d_x, n), dev_free_f(d_g, n);
}

/* ---------------- cross-entropy ---------------- */

static void test_cross_entropy(int N, int V) {
    char name[160];
    const size_t n = (size_t)N * V;
    float *logits = host_rand(n, -8, 8), *dloss = host_rand(N, 0.5f, 1.5f);
    int32_t *t = malloc(sizeof(int32_t) * N);
    for (int i = 0; i < N; i++) t[i] = (i % 5 == 3) ? -1 : (int32_t)((uint32_t)(i * 2654435761u) % (uint32_t)V);
    float *loss = host_new(N), *lse = host_new(N), *dl = host_new(n);
    float *d_logits = dev_upload(logits, n), *d_dloss = dev_upload(dloss, N), *d_loss = dev_alloc(N * sizeof(float));
    float *d_lse = dev_alloc(N * sizeof(float)), *d_dl = dev_alloc(n * sizeof(float));
    int32_t *d_t = dev_upload_i32(t, N);
    cpu->cross_entropy_forward(loss, lse, logits, t, N, V);
    dev->cross_entropy_forward(d_loss, d_lse, d_logits, d_t, N, V);
    snprintf(name, sizeof name, "cross_entropy_forward N=%d V=%d (some targets -1): losses", N, V);
    check_close(name, loss, d_loss, N, 1e-5);
    snprintf(name, sizeof name, "cross_entropy_forward N=%d V=%d: lse", N, V);
    check_close(name, lse, d_lse, N, 1e-5);
    dev->to_device(d_lse, lse, N * sizeof(float)); /* backward checked on its own */
    dev->memzero(d_dl, n * sizeof(float));
    cpu->cross_entropy_backward(dl, logits, lse, t, dloss, N, V);
    dev->fill(d_dl, (int64_t)n, 123.0f); /* backward writes, it does not accumulate */
    dev->cross_entropy_backward(d_dl, d_logits, d_lse, d_t, d_dloss, N, V);
    snprintf(name, sizeof name, "cross_entropy_backward N=%d V=%d: dlogits (written, not +=)", N, V);
    check_close(name, dl, d_dl, n, 1e-5);
    dev->cross_entropy_backward(d_logits, d_logits, d_lse, d_t, d_dloss, N, V);
    snprintf(name, sizeof name, "cross_entropy_backward N=%d V=%d: in place (dlogits == logits)", N, V);
    check_close(name, dl, d_logits, n, 1e-5);
    free(logits), free(dloss), free(t), free(loss), free(lse), free(dl);
    dev_free_f(d_logits, n), dev_free_f(d_dloss, N), dev_free_f(d_loss, N), dev_free_f(d_lse, N), dev_free_f(d_dl, n);
    dev_free(d_t, sizeof(int32_t) * N);
}

/* ---------------- errors (last: a real CUDA error may leave the context unusable) ---------------- */

static void test_errors(void) {
    char err[600];
    if (gpu_only("synchronize reports a named op error (attention D=256), then clears it")) {
        const int B = 1, T = 4, H = 1, G = 1, D = 256;
        float *d_qkv = dev_alloc(sizeof(float) * B * T * 3 * D), *d_out = dev_alloc(sizeof(float) * B * T * D);
        float *d_lse = dev_alloc(sizeof(float) * B * T);
        dev->attention_forward(d_out, d_lse, d_qkv, B, T, H, G, D, 0.0f, 0);
        int rc1 = dev_sync(err, sizeof err);
        char first[600];
        snprintf(first, sizeof first, "%s", err);
        int rc2 = dev_sync(err, sizeof err);
        report(rc1 == -1 && strncmp(first, "attention_forward: ", 19) == 0 && rc2 == 0,
               "synchronize after attention D=256: %d \"%s\", then %d", rc1, first, rc2);
        dev_free(d_qkv, sizeof(float) * B * T * 3 * D), dev_free(d_out, sizeof(float) * B * T * D);
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

/* ---------------- main ---------------- */

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

int main(void) {
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

    test_memory();

    test_fill();
    test_scale_add();
    test_gelu(1);
    test_gelu(1000003);
    test_swiglu(1, 1);
    test_swiglu(37, 129);
    test_swiglu(256, 1000);
    test_dropout(1000003, 0.1f, 987654321ull);
    test_dropout(100003, 0.5f, 0xFFFFFFF0ull); /* counter crosses 2^32 */
    test_dropout(4099, 0.0f, 7);               /* p = 0: a copy, and plain accumulation */
    test_sum_squares(1);
    test_sum_squares(1000003);
    test_adamw();
    test_sgd(0.0f);
    test_sgd(0.9f);

    test_embedding(67, 129, 50);
    test_embedding(1, 768, 7);
    test_position_embedding(3, 67, 129);
    test_position_embedding(1, 1, 5);

    test_layernorm(1, 3, 1); /* not C = 1: its dinp is 0 + rounding noise * rstd (= 1/sqrt(eps)) */
    test_layernorm(7, 33, 1);
    test_layernorm(67, 768, 0);
    test_layernorm(300, 1000, 1);
    test_rmsnorm(1, 3);
    test_rmsnorm(7, 33);
    test_rmsnorm(300, 1000);

    test_linear(1, 1, 1, 1, 1);
    test_linear(37, 65, 129, 1, 1);
    test_linear(37, 65, 129, 0, 0);
    test_linear(256, 768, 2304, 1, 1);

    /* B, T, H, G, D, dropout */
    test_attention(2, 1, 4, 2, 64, 0.0f);     /* T = 1 */
    test_attention(1, 67, 4, 2, 32, 0.0f);    /* GQA, T not a multiple of the 32-row tile */
    test_attention(2, 67, 4, 4, 80, 0.1f);    /* H = G, D = 80, dropout */
    test_attention(1, 256, 4, 2, 128, 0.0f);  /* T = 256, D = 128 */
    test_attention(1, 256, 4, 2, 128, 0.1f);  /* the same with dropout */
    test_attention(1, 256, 2, 1, 96, 0.2f);   /* one kv group, D = 96 */
    test_attention(2, 100, 8, 2, 64, 0.0f);   /* 4 query heads per group */
    test_attention(1, 33, 2, 1, 17, 0.1f);    /* odd D */

    test_rope(2, 67, 4, 2, 64, 10000.0f);
    test_rope(1, 256, 2, 2, 128, 500000.0f);
    test_rope(3, 1, 4, 1, 32, 10000.0f);

    test_cross_entropy(5, 7);
    test_cross_entropy(67, 50257);

    test_errors();
    return tap_done();
}

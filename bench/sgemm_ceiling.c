/* sgemm_ceiling: the machine's own fp32 GEMM ceiling on a model's GEMM shapes.
 *
 *   sgemm_ceiling [--threads N] [--reps R] M N K [M N K ...]
 *
 * For each shape, times row-major cblas_sgemm C[M,N] = A[M,K] * B[K,N] (no transposes, alpha 1,
 * beta 0): warm-up calls first, then the best of R timed calls (at least 0.05 s of timed calls per
 * shape). Prints GFLOP/s per shape (2*M*N*K flops per call), then
 *   RESULT {"gflops": G, "gflops_time_weighted": H, "threads": T}
 * where G is the flop-weighted mean of the per-shape GFLOP/s (sum_i f_i*g_i / sum_i f_i) and H is
 * total flops / total best time (the rate at which all the shapes, once each, would run).
 * --threads defaults to 2 (the benchmark machines' core count); 0 leaves OpenBLAS's own default.
 */
#define _POSIX_C_SOURCE 199309L
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Declared here so the file builds against any cblas.h the system's alternatives point at. */
extern void openblas_set_num_threads(int num_threads);
extern int openblas_get_num_threads(void);

#define MAX_SHAPES 64

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *alloc_fill(size_t n, unsigned *seed) {
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, n * sizeof(float) + 64) != 0) return NULL;
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = ((float)(*seed >> 8) / 16777216.0f - 0.5f) * 0.1f;
    }
    return p;
}

static int parse_pos(const char *s, long *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (!end || *end || v <= 0) return 0;
    *out = v;
    return 1;
}

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s [--threads N] [--reps R] M N K [M N K ...]\n", argv0);
}

int main(int argc, char **argv) {
    long threads = 2, reps = 5;
    long dims[3 * MAX_SHAPES];
    int nd = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            char *end = NULL;
            threads = strtol(argv[++i], &end, 10);
            if (!end || *end || threads < 0) { usage(argv[0]); return 2; }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            if (!parse_pos(argv[++i], &reps)) { usage(argv[0]); return 2; }
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(argv[0]);
            return 0;
        } else {
            if (nd >= 3 * MAX_SHAPES || !parse_pos(argv[i], &dims[nd])) { usage(argv[0]); return 2; }
            nd++;
        }
    }
    if (nd == 0 || nd % 3) { usage(argv[0]); return 2; }
    if (threads > 0) openblas_set_num_threads((int)threads);
    printf("OpenBLAS threads: %d\n", openblas_get_num_threads());

    double sum_f = 0, sum_fg = 0, sum_t = 0;
    unsigned seed = 12345u;
    for (int s = 0; s < nd / 3; s++) {
        long M = dims[3 * s], N = dims[3 * s + 1], K = dims[3 * s + 2];
        float *A = alloc_fill((size_t)M * K, &seed);
        float *B = alloc_fill((size_t)K * N, &seed);
        float *C = alloc_fill((size_t)M * N, &seed);
        if (!A || !B || !C) { fprintf(stderr, "out of memory\n"); return 1; }
        double flops = 2.0 * (double)M * (double)N * (double)K;
        /* warm-up: at least 2 calls and ~0.02 s (thread pool start, page faults, caches) */
        double t0 = now_s();
        for (int w = 0; w < 2 || now_s() - t0 < 0.02; w++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)N, (int)K, 1.0f, A,
                        (int)K, B, (int)N, 0.0f, C, (int)N);
        double best = 1e30, spent = 0;
        for (long r = 0; r < reps || spent < 0.05; r++) {
            double a = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)N, (int)K, 1.0f, A,
                        (int)K, B, (int)N, 0.0f, C, (int)N);
            double dt = now_s() - a;
            spent += dt;
            if (dt < best) best = dt;
            if (r > 10000) break;
        }
        double g = flops / best / 1e9;
        printf("sgemm %6ld x %6ld x %6ld (M x N x K): %8.3f ms best, %8.1f GFLOP/s\n", M, N, K,
               best * 1e3, g);
        sum_f += flops;
        sum_fg += flops * g;
        sum_t += best;
        free(A);
        free(B);
        free(C);
    }
    printf("RESULT {\"gflops\": %.1f, \"gflops_time_weighted\": %.1f, \"threads\": %d}\n",
           sum_fg / sum_f, sum_f / sum_t / 1e9, openblas_get_num_threads());
    return 0;
}

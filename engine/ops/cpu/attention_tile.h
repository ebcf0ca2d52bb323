/* The register-tiled matmul kernel and the packing helpers of the CPU flash-attention ops
 * (attention.c: the whole causal sequence; attention_kv.c: ring attention's blocks). */
#ifndef LT_OPS_ATTENTION_TILE_H
#define LT_OPS_ATTENTION_TILE_H
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LT_MR 8 /* rows of a register tile */
#if defined(__AVX512F__)
#define LT_NR 32 /* columns of a register tile: two 512-bit vectors */
#else
#define LT_NR 16 /* columns of a register tile: two 256-bit vectors */
#endif
#define LT_BR 64 /* query rows per block: a BR x T score block is the only T-sized scratch */

static inline int lt_round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline int lt_imin(int a, int b) { return a < b ? a : b; }

/* c[MR, NR] (+)= a[MR, k0:k1] @ b[k0:k1, NR], element (r, k) of a at a[r * a_rs + k * a_ks] so a
 * transposed operand needs no copy. The accumulator tile stays in registers (at -O3); elements of a
 * are broadcast, rows of b are contiguous vectors. Always inlined: the strides are constants at
 * every call site and specialise the address arithmetic. */
static inline __attribute__((always_inline)) void lt_tile_mm(float *restrict c, int ldc, const float *restrict a,
                                                             int a_rs, int a_ks, const float *restrict b, int ldb,
                                                             int k0, int k1, int accumulate) {
    float acc[LT_MR][LT_NR];
    for (int r = 0; r < LT_MR; r++)
        for (int j = 0; j < LT_NR; j++) acc[r][j] = accumulate ? c[(size_t)r * ldc + j] : 0.0f;
    for (int k = k0; k < k1; k++) {
        const float *bk = b + (size_t)k * ldb;
        const float *ak = a + (size_t)k * a_ks;
        for (int r = 0; r < LT_MR; r++) {
            const float ar = ak[(size_t)r * a_rs];
#pragma omp simd
            for (int j = 0; j < LT_NR; j++) acc[r][j] += ar * bk[j];
        }
    }
    for (int r = 0; r < LT_MR; r++)
        for (int j = 0; j < LT_NR; j++) c[(size_t)r * ldc + j] = acc[r][j];
}

/* dst[r, :Dp] = s * src rows (stride rs), rows r < n; zero padding up to rows_p and Dp. */
static inline void lt_pack_rows(float *dst, const float *src, size_t rs, int n, int rows_p, int D, int Dp, float s) {
    for (int r = 0; r < n; r++) {
        const float *x = src + (size_t)r * rs;
        float *y = dst + (size_t)r * Dp;
        for (int d = 0; d < D; d++) y[d] = s * x[d];
        for (int d = D; d < Dp; d++) y[d] = 0.0f;
    }
    memset(dst + (size_t)n * Dp, 0, sizeof(float) * (size_t)(rows_p - n) * Dp);
}

/* dst[d, j] = src row j, element d (transposed, leading dim ld), j < n; zero for n <= j < cols_p and D <= d < Dp. */
static inline void lt_pack_cols(float *dst, int ld, const float *src, size_t rs, int n, int cols_p, int D, int Dp) {
    for (int j = 0; j < n; j++) {
        const float *x = src + (size_t)j * rs;
        for (int d = 0; d < D; d++) dst[(size_t)d * ld + j] = x[d];
    }
    for (int d = 0; d < Dp; d++) {
        int j0 = d < D ? n : 0;
        for (int j = j0; j < cols_p; j++) dst[(size_t)d * ld + j] = 0.0f;
    }
}

static inline int lt_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline float *lt_scratch(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes);
    if (!p) abort(); /* ops have no error channel; scratch of a few MiB failing means the process is done */
    return p;
}

/* A (token, group)'s key and value gradient rows: the sum, in head order, of the group's hpg query heads'
 * rows kept per head in a per-(b, h) buffer (head h's dK rows at sk0 + h 2 kv_elems, its dV rows
 * kv_elems after): the first stored, the others added, so the result does not depend on threads. */
static inline void lt_sum_group_heads(float *dk, float *dv, const float *sk0, size_t kv_elems, int hpg, int D) {
    const float *sv0 = sk0 + kv_elems;
#pragma omp simd
    for (int d = 0; d < D; d++) dk[d] = sk0[d], dv[d] = sv0[d];
    for (int hh = 1; hh < hpg; hh++) {
        const float *sk = sk0 + (size_t)hh * 2 * kv_elems, *sv = sk + kv_elems;
#pragma omp simd
        for (int d = 0; d < D; d++) dk[d] += sk[d], dv[d] += sv[d];
    }
}

#endif

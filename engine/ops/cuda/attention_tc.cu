// Causal grouped-query attention of the bf16 table on tensor cores, flash-attention-2 style: every
// product (Q K^T, P V; K Q^T, V dO^T, Pd^T dO, dS^T Q; Q K^T, dO V^T, dS K) is a chain of
// mma.sync m16n8k16 (bf16 operands, fp32 accumulators) whose fragments stay in registers, in the
// layout the PTX ISA documents for that shape: the scores of one product become the bf16 A operand of
// the next without leaving the warp, and the running O, dK, dV and dQ are rescaled and summed in
// registers. The softmax, lse, dropout and dS are fp32 on CUDA cores. P and dS are rounded to bf16 to
// enter their second product, as flash-attention does (a 2^-9 relative error per term, inside the
// bf16 tolerance of the reference). The contract, layout and dropout mask are those of attention.cu
// (engine/ops/ops.h; engine/ops/cpu/attention.c is the reference). emulation.h runs mma.sync and
// ldmatrix with the same fragment layouts, so the tests check the index arithmetic on the CPU.
//
// A block has 4 warps and 64 rows (16 per warp) of one side, and walks 64-wide tiles of the other
// side, staged row-major in shared memory (behind __syncthreads). Fragments come from there through
// ldmatrix, transposing (.trans) where a tile's rows are the B operand's k (V for P V, dO and Q for
// the dK/dV products, K for dS K); the scores' fragments never leave the registers. Head dims are
// padded with zeros to DP = 32, 64 or 128 (a template argument: the register arrays are unrolled), and
// dropout is a template argument too (without it the unrolled loops carry no mask code).
//
// Fragments (lane = 4 g + t): A (16 x 16, row-major) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g,
// 2t+8..), a3 = (g+8, 2t+8..); B (16 x 8, column-major) b0 = (2t..2t+1, g), b1 = (2t+8.., g); C (16 x 8,
// fp32) c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1). Pairs are two bf16 in one 32-bit register,
// the lower column (or k) in the low half.
//
// forward:  grid (B*H, ceil(T/64)) blocks of 64 queries; online softmax over the key tiles up to the
//           diagonal; out = O / l, lse = m + log l.
// backward: dK/dV per (b, group, 64 keys), looping over the group's heads and the query tiles from the
//           diagonal on (S^T = K Q^T, dP^T = V dO^T, dV += Pd^T dO, dK += dS^T Q); dQ per (b, h, 64
//           queries) over the key tiles (dQ += dS K). Each block owns its rows (no atomics) and stores
//           them once, without reading dqkv: the two grids cover all of it, so it needs no zeroing.
#include <math.h>
#include <stdint.h>

#include "engine/ops/cuda/attention_common.cuh"

#define ATC_WARPS 4
#define ATC_THREADS (32 * ATC_WARPS)
#define ATC_ROWS 64            /* rows of a block: 16 per warp; also the width of a tile of the other side */
#define ATC_FULL 0xffffffffu

typedef __nv_bfloat16 bf16;

/* The backward kernels walk a 64-wide tile of the other side this many columns at a time: 32 at
 * DP = 128, where two 64-wide score products and the DP-wide dK, dV (or dQ) accumulators would not fit
 * in 255 registers. */
static __host__ __device__ constexpr int atc_sub(int DP) { return DP == 128 ? 32 : 64; }

/* d += a b: one m16n8k16 product, bf16 in, fp32 accumulate (fragments as above). */
static __device__ __forceinline__ void atc_mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef LT_CUDA_EMULATION
    emu_mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

/* Two floats rounded to a bf16 pair (lo in the low half). */
static __device__ __forceinline__ uint32_t atc_pack(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

/* ldmatrix .x4 from shared memory: lanes 8m .. 8m + 7 point at the rows of 8 x 8 matrix m (8 bf16,
 * 16-byte aligned); lane 4g + t receives in r[m] the pair (row g, columns 2t, 2t + 1) of matrix m, or
 * with TRANS the pair (rows 2t, 2t + 1, column g). */
template <bool TRANS>
static __device__ __forceinline__ void atc_ldmatrix(uint32_t r[4], const bf16 *row) {
#ifdef LT_CUDA_EMULATION
    emu_ldmatrix_x4(r, TRANS, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#endif
}

/* The A fragment of rows row0 .. row0 + 15, columns k0 .. k0 + 15 of a row-major tile of pitch ld: the
 * four 8 x 8 quarters in the order a0 .. a3 (rows +0 / +8, then columns +0 / +8). */
static __device__ __forceinline__ void atc_frag_a(uint32_t a[4], const bf16 *tile, int ld, int row0, int k0) {
    const int lane = threadIdx.x & 31, m = lane >> 3;
    atc_ldmatrix<false>(a, tile + (row0 + (lane & 7) + 8 * (m & 1)) * ld + k0 + 8 * (m >> 1));
}
/* The B fragments of two n-tiles, b[0] for n0 .. n0 + 7 and b[1] for n0 + 8 .. n0 + 15, k0 .. k0 + 15:
 * with B(k, n) = tile[n][k] (the tile's rows are B's columns: K for Q K^T), or with TRANS
 * B(k, n) = tile[k][n] (the rows are B's k: V for P V). */
template <bool TRANS>
static __device__ __forceinline__ void atc_frag_b2(uint32_t b[2][2], const bf16 *tile, int ld, int n0, int k0) {
    const int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    uint32_t x[4];
    /* matrices: (n-tile 0, k +0), (n-tile 0, k +8), (n-tile 1, k +0), (n-tile 1, k +8) */
    if (TRANS) atc_ldmatrix<true>(x, tile + (k0 + r + 8 * (m & 1)) * ld + n0 + 8 * (m >> 1));
    else atc_ldmatrix<false>(x, tile + (n0 + r + 8 * (m >> 1)) * ld + k0 + 8 * (m & 1));
    b[0][0] = x[0], b[0][1] = x[1], b[1][0] = x[2], b[1][1] = x[3];
}
/* The A fragment of keys (or queries) 16 kk .. 16 kk + 15 from the accumulators of a 16-row product:
 * C tiles 2 kk and 2 kk + 1 are the two column halves of that A operand, rounded to bf16. */
static __device__ __forceinline__ void atc_frag_from_acc(uint32_t a[4], const float (*c)[4], int kk) {
    a[0] = atc_pack(c[2 * kk][0], c[2 * kk][1]), a[1] = atc_pack(c[2 * kk][2], c[2 * kk][3]);
    a[2] = atc_pack(c[2 * kk + 1][0], c[2 * kk + 1][1]), a[3] = atc_pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}
/* acc[NC][4] (16 rows x 8 NC columns) = A (16 rows of tile a from row0, DP wide) times B^T, B's columns
 * the first 8 NC rows of tile b: S = Q K^T and its kin. Columns from `cols` on (a multiple of 16, the
 * same for the whole warp) are left at 0: the causal mask drops them anyway. */
template <int DP, int NC>
static __device__ __forceinline__ void atc_abt(float acc[NC][4], const bf16 *a_tile, int row0, const bf16 *b_tile,
                                               int cols = 8 * NC) {
    constexpr int LDH = DP + 8;
#pragma unroll
    for (int n = 0; n < NC; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++) {
        uint32_t a[4];
        atc_frag_a(a, a_tile, LDH, row0, ks * 16);
#pragma unroll
        for (int n = 0; n < NC; n += 2) {
            if (n * 8 >= cols) break;
            uint32_t b[2][2];
            atc_frag_b2<false>(b, b_tile, LDH, n * 8, ks * 16);
            atc_mma(acc[n], a, b[0]);
            atc_mma(acc[n + 1], a, b[1]);
        }
    }
}
/* acc[DP/8][4] (16 rows x DP) += P (16 x 8 NC, the bf16 fragments of a product's accumulators) times
 * the first 8 NC rows of the row-major tile v (pitch DP + 8): P V and its kin. P's columns from `cols`
 * on (a multiple of 16, warp-uniform) are known to be 0 and skipped. */
template <int DP, int NC>
static __device__ __forceinline__ void atc_pv(float acc[DP / 8][4], const float pc[NC][4], const bf16 *v,
                                              int cols = 8 * NC) {
#pragma unroll
    for (int kk = 0; kk < NC / 2; kk++) {
        if (kk * 16 >= cols) break;
        uint32_t a[4];
        atc_frag_from_acc(a, pc, kk);
#pragma unroll
        for (int n = 0; n < DP / 8; n += 2) {
            uint32_t b[2][2];
            atc_frag_b2<true>(b, v, DP + 8, n * 8, kk * 16);
            atc_mma(acc[n], a, b[0]);
            atc_mma(acc[n + 1], a, b[1]);
        }
    }
}

/* Row r (0: g, 1: g + 8) of a 16 x DP accumulator, times s, into dst[0, D) as bf16: this lane's
 * columns 2t, 2t + 1 of every 8-wide C tile. */
template <int DP>
static __device__ __forceinline__ void atc_store_row(bf16 *dst, const float acc[DP / 8][4], int r, float s, int D) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < DP / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int c = n * 8 + 2 * t + e;
            if (c < D) dst[c] = __float2bfloat16_rn(s * acc[n][2 * r + e]);
        }
}

/* Shared memory: regions of 128-byte aligned sizes from a 128-byte aligned start. */
static __host__ __device__ __forceinline__ size_t atc_round(size_t n) { return (n + 127) & ~(size_t)127; }
/* A tile: 64 rows of DP (pitch DP + 8 bf16: the eight rows an ldmatrix reads fall in distinct banks). */
static __host__ __device__ __forceinline__ size_t atc_rows_bytes(int DP) {
    return atc_round(sizeof(bf16) * ATC_ROWS * (size_t)(DP + 8));
}
#define ATC_VEC_BYTES atc_round(sizeof(float) * ATC_ROWS)
static size_t atc_forward_smem(int DP) { return 128 + 3 * atc_rows_bytes(DP); }
static size_t atc_dkv_smem(int DP) { return 128 + 4 * atc_rows_bytes(DP) + 2 * ATC_VEC_BYTES; }
static size_t atc_dq_smem(int DP) { return 128 + 4 * atc_rows_bytes(DP); }

/* The next region of the shared memory, advancing *at. */
static __device__ __forceinline__ unsigned char *atc_take(unsigned char **at, size_t bytes) {
    unsigned char *p = *at;
    *at += bytes;
    return p;
}
static __device__ __forceinline__ unsigned char *atc_smem_start(void *raw) {
    return (unsigned char *)(((uintptr_t)raw + 127) & ~(uintptr_t)127);
}

/* Rows t0 .. t0 + 63 of src (element pitch `pitch`), columns 0 .. DP - 1, zero past T and past D, into
 * dst (pitch DP + 8); the block's threads share the work. vec: src rows are 16-byte aligned and D a
 * multiple of 8 (16-byte loads). */
template <int DP>
static __device__ __forceinline__ void atc_load_tile(bf16 *dst, const bf16 *src, int64_t pitch, int t0, int T, int D,
                                                     int vec) {
    if (vec) {
        constexpr int VPR = DP / 8; /* 16-byte vectors per row */
        for (int idx = threadIdx.x; idx < ATC_ROWS * VPR; idx += ATC_THREADS) {
            const int r = idx / VPR, d = (idx - r * VPR) * 8, t = t0 + r;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (t < T && d < D) v = *reinterpret_cast<const uint4 *>(src + (int64_t)t * pitch + d);
            *reinterpret_cast<uint4 *>(dst + r * (DP + 8) + d) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < ATC_ROWS * DP; idx += ATC_THREADS) {
            const int r = idx / DP, d = idx - r * DP, t = t0 + r;
            dst[r * (DP + 8) + d] = t < T && d < D ? src[(int64_t)t * pitch + d] : __float2bfloat16_rn(0.0f);
        }
    }
}

/* ---------------- forward ----------------
 * Warp w owns query rows w*16 + g and w*16 + g + 8 of the block (r = 0, 1 below); the four lanes of a
 * row (t = 0..3) hold its columns 2t, 2t+1 of every 8-wide C tile and reduce over shuffles. */
template <int DP, bool DROP>
__global__ void __launch_bounds__(ATC_THREADS)
    atc_forward_kernel(bf16 *out, float *lse, const bf16 *qkv, int T, int H, int G, int D, float scale, float p,
                       float inv_keep, uint64_t key, int h0, int HT, int vec) {
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Qs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Ks = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int64_t mh = (int64_t)b * HT + h0 + h; /* the head's mask row (ops.h) */
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATC_ROWS; /* the last query tiles (most keys) first */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lg = lane >> 2, lt = lane & 3;
    const int row[2] = {q0 + warp * 16 + lg, q0 + warp * 16 + lg + 8};
    const bool live[2] = {row[0] < T, row[1] < T};
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    atc_load_tile<DP>(Qs, qp, rs, q0, T, D, vec);
    float o[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int q_end = min(q0 + ATC_ROWS, T);
    const int nkt = (q_end - 1) / ATC_ROWS + 1; /* key tiles 0 .. the diagonal one */
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATC_ROWS;
        __syncthreads(); /* the previous Ks, Vs consumed */
        atc_load_tile<DP>(Ks, kp, rs, k0, T, D, vec);
        atc_load_tile<DP>(Vs, vp, rs, k0, T, D, vec);
        __syncthreads(); /* and Qs written (first pass) */
        /* keys past the warp's last row (on the diagonal tile) are masked: not computed */
        const int cols = min(ATC_ROWS, q0 + warp * 16 + 16 - k0);
        float s[8][4];
        atc_abt<DP, 8>(s, Qs, warp * 16, Ks, cols);
        /* online softmax; k0 <= q0 <= i, so a live row has a valid key in every tile and m_new is finite */
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1, i = row[r], j = k0 + n * 8 + 2 * lt + (e & 1);
                s[n][e] = live[r] && j <= i ? s[n][e] * scale : -INFINITY;
                mx[r] = fmaxf(mx[r], s[n][e]);
            }
        float m_new[2], alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(ATC_FULL, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(ATC_FULL, mx[r], 2));
            m_new[r] = live[r] ? fmaxf(m[r], mx[r]) : 0.0f;
            alpha[r] = live[r] ? expf(m[r] - m_new[r]) : 1.0f; /* 0 on the first tile (m = -inf) */
        }
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1, i = row[r], j = k0 + n * 8 + 2 * lt + (e & 1);
                const float x = s[n][e] == -INFINITY ? 0.0f : expf(s[n][e] - m_new[r]);
                sum[r] += x; /* undropped: lse is of the plain softmax */
                s[n][e] = DROP ? (x != 0.0f && att_dropped(key, mh, T, i, j, p) ? 0.0f : x * inv_keep) : x;
            }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            sum[r] += __shfl_xor_sync(ATC_FULL, sum[r], 1);
            sum[r] += __shfl_xor_sync(ATC_FULL, sum[r], 2);
            l[r] = l[r] * alpha[r] + sum[r];
            if (live[r]) m[r] = m_new[r];
        }
#pragma unroll
        for (int n = 0; n < DP / 8; n++) o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
        atc_pv<DP, 8>(o, s, Vs, cols);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (!live[r]) continue;
        const int i = row[r];
        const float inv = 1.0f / l[r];
        if (lt == 0) lse[(int64_t)bh * T + i] = m[r] + logf(l[r]);
        atc_store_row<DP>(out + (((int64_t)b * T + i) * H + h) * D, o, r, inv, D);
    }
}

/* ---------------- backward: dK, dV ----------------
 * grid (B*G, ceil(T/64)): block = 64 keys of group g; warp w owns key rows w*16 + g and + 8 of S^T and
 * dP^T (columns: the 64 queries of the current tile). With P = exp(scale S - lse), f = 0 or 1/(1-p):
 * Pd = P f, dS = P (dP f - delta); dV += Pd^T dO, dK += scale dS^T Q. */
template <int DP, bool DROP>
__global__ void __launch_bounds__(ATC_THREADS)
    atc_backward_dkv_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                            int T, int H, int G, int D, float scale, float p, float inv_keep, uint64_t key, int h0,
                            int HT, int vec) {
    constexpr int SUB = atc_sub(DP); /* columns of the other side per step */
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Ks = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Qs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *dOs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    float *ls = (float *)atc_take(&at, ATC_VEC_BYTES);
    float *dl = (float *)atc_take(&at, ATC_VEC_BYTES);
    const int hpg = H / G, b = blockIdx.x / G, g = blockIdx.x % G;
    const int k0 = blockIdx.y * ATC_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lg = lane >> 2, lt = lane & 3;
    const int krow[2] = {k0 + warp * 16 + lg, k0 + warp * 16 + lg + 8};
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    atc_load_tile<DP>(Ks, kp, rs, k0, T, D, vec);
    atc_load_tile<DP>(Vs, vp, rs, k0, T, D, vec);
    float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    for (int hh = 0; hh < hpg; hh++) { /* every query head of the group, in order */
        const int h = g * hpg + hh;
        const int64_t bh = (int64_t)b * H + h;
        const int64_t mh = (int64_t)b * HT + h0 + h;
        const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
        const bf16 *gp = dout + ((int64_t)b * T * H + h) * D; /* dout[b, t, h, :] = gp + t * H * D */
        for (int q0 = k0; q0 < T; q0 += ATC_ROWS) { /* queries i >= k0 only (causal) */
            __syncthreads(); /* the previous query tile consumed */
            atc_load_tile<DP>(Qs, qp, rs, q0, T, D, vec);
            atc_load_tile<DP>(dOs, gp, (int64_t)H * D, q0, T, D, vec);
            if (threadIdx.x < ATC_ROWS) {
                const int t = q0 + threadIdx.x;
                ls[threadIdx.x] = t < T ? lse[bh * T + t] : 0.0f;
                dl[threadIdx.x] = t < T ? delta[bh * T + t] : 0.0f;
            }
            __syncthreads(); /* and Ks, Vs written (first pass) */
#pragma unroll
            for (int q1 = 0; q1 < ATC_ROWS; q1 += SUB) {
                /* all these queries before the warp's first key: nothing to add (a warp-uniform skip) */
                if (q0 + q1 + SUB <= k0 + warp * 16 || q0 + q1 >= T) continue;
                /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and SUB queries */
                float st[SUB / 8][4], dpt[SUB / 8][4];
                atc_abt<DP, SUB / 8>(st, Ks, warp * 16, Qs + q1 * (DP + 8));
                atc_abt<DP, SUB / 8>(dpt, Vs, warp * 16, dOs + q1 * (DP + 8));
#pragma unroll
                for (int n = 0; n < SUB / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int j = krow[e >> 1], qc = q1 + n * 8 + 2 * lt + (e & 1), i = q0 + qc;
                        const bool valid = i < T && i >= j; /* j <= i < T keeps the key inside the sequence */
                        const float pr = valid ? expf(st[n][e] * scale - ls[qc]) : 0.0f;
                        float f = 1.0f;
                        if (DROP) f = valid && att_dropped(key, mh, T, i, j, p) ? 0.0f : inv_keep;
                        st[n][e] = pr * f;                         /* Pd^T */
                        dpt[n][e] = pr * (dpt[n][e] * f - dl[qc]); /* dS^T */
                    }
                /* dV += Pd^T dO, dK += dS^T Q (the scale is applied once at the end) */
                atc_pv<DP, SUB / 8>(dv, st, dOs + q1 * (DP + 8));
                atc_pv<DP, SUB / 8>(dk, dpt, Qs + q1 * (DP + 8));
            }
        }
    }
    /* this block is the only writer of these key rows' dK and dV: stored, rounded once */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = krow[r];
        if (j >= T) continue;
        bf16 *dkp = dqkv + ((int64_t)b * T + j) * rs + att_k_col(g, hpg, D);
        atc_store_row<DP>(dkp, dk, r, scale, D);
        atc_store_row<DP>(dkp + D, dv, r, 1.0f, D);
    }
}

/* ---------------- backward: dQ ----------------
 * grid (B*H, ceil(T/64)), last tiles first: block = 64 queries of head h; warp w owns query rows
 * w*16 + g and + 8. dQ = scale dS K over the key tiles up to the diagonal. */
template <int DP, bool DROP>
__global__ void __launch_bounds__(ATC_THREADS)
    atc_backward_dq_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                           int T, int H, int G, int D, float scale, float p, float inv_keep, uint64_t key, int h0,
                           int HT, int vec) {
    constexpr int SUB = atc_sub(DP); /* columns of the other side per step */
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Qs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *dOs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Ks = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_rows_bytes(DP));
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int64_t mh = (int64_t)b * HT + h0 + h; /* the head's mask row (ops.h) */
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATC_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lg = lane >> 2, lt = lane & 3;
    const int row[2] = {q0 + warp * 16 + lg, q0 + warp * 16 + lg + 8};
    const bool live[2] = {row[0] < T, row[1] < T};
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;
    const bf16 *gp = dout + ((int64_t)b * T * H + h) * D;

    atc_load_tile<DP>(Qs, qp, rs, q0, T, D, vec);
    atc_load_tile<DP>(dOs, gp, (int64_t)H * D, q0, T, D, vec);
    float lse_r[2], d_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lse_r[r] = live[r] ? lse[(int64_t)bh * T + row[r]] : 0.0f;
        d_r[r] = live[r] ? delta[(int64_t)bh * T + row[r]] : 0.0f;
    }
    float dq[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    const int q_end = min(q0 + ATC_ROWS, T);
    const int nkt = (q_end - 1) / ATC_ROWS + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATC_ROWS;
        __syncthreads(); /* the previous Ks, Vs consumed */
        atc_load_tile<DP>(Ks, kp, rs, k0, T, D, vec);
        atc_load_tile<DP>(Vs, vp, rs, k0, T, D, vec);
        __syncthreads(); /* and Qs, dOs written (first pass) */
#pragma unroll
        for (int k1 = 0; k1 < ATC_ROWS; k1 += SUB) {
            /* all these keys after the warp's last query: nothing to add (a warp-uniform skip) */
            if (k0 + k1 > q0 + warp * 16 + 15) continue;
            /* S = Q K^T and dP = dO V^T for the warp's 16 queries and SUB keys */
            float s[SUB / 8][4], dp[SUB / 8][4];
            atc_abt<DP, SUB / 8>(s, Qs, warp * 16, Ks + k1 * (DP + 8));
            atc_abt<DP, SUB / 8>(dp, dOs, warp * 16, Vs + k1 * (DP + 8));
#pragma unroll
            for (int n = 0; n < SUB / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1, i = row[r], j = k0 + k1 + n * 8 + 2 * lt + (e & 1);
                    const bool valid = live[r] && j <= i;
                    const float pr = valid ? expf(s[n][e] * scale - lse_r[r]) : 0.0f;
                    float f = 1.0f;
                    if (DROP) f = valid && att_dropped(key, mh, T, i, j, p) ? 0.0f : inv_keep;
                    s[n][e] = pr * (dp[n][e] * f - d_r[r]); /* dS */
                }
            atc_pv<DP, SUB / 8>(dq, s, Ks + k1 * (DP + 8));
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (!live[r]) continue;
        atc_store_row<DP>(dqkv + ((int64_t)b * T + row[r]) * rs + att_q_col(h, hpg, D), dq, r, scale, D);
    }
}

/* ---------------- host side ---------------- */

/* Whether every tile row is 16-byte aligned (qkv, dout rows and head offsets are multiples of D). */
static int atc_vec_ok(const void *a, const void *b, int D) {
    return D % 8 == 0 && (uintptr_t)a % 16 == 0 && (b == NULL || (uintptr_t)b % 16 == 0);
}

/* The padded head dim: the kernels are instantiated for 32, 64 and 128. */
static int atc_dp(int D) { return D <= 32 ? 32 : D <= 64 ? 64 : 128; }

template <int DP, bool DROP>
static void atc_forward(bf16 *out, float *lse, const bf16 *qkv, int B, int T, int H, int G, int D, float p,
                        uint64_t key, int h0, int HT) {
    const char *op = "attention_forward";
    const size_t smem = atc_forward_smem(DP);
    if (!att_smem_ok((const void *)atc_forward_kernel<DP, DROP>, smem, op)) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const dim3 grid((unsigned)(B * H), (unsigned)((T + ATC_ROWS - 1) / ATC_ROWS));
    CUDA_LAUNCH((atc_forward_kernel<DP, DROP>), grid, ATC_THREADS, smem)(
        out, lse, qkv, T, H, G, D, scale, p, inv_keep, key, h0, HT, atc_vec_ok(qkv, NULL, D));
    cuda_check(op);
}

template <int DP, bool DROP>
static void atc_backward(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta, int B,
                         int T, int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    const char *op = "attention_backward";
    const size_t smem_kv = atc_dkv_smem(DP), smem_q = atc_dq_smem(DP);
    if (!att_smem_ok((const void *)atc_backward_dkv_kernel<DP, DROP>, smem_kv, op) ||
        !att_smem_ok((const void *)atc_backward_dq_kernel<DP, DROP>, smem_q, op))
        return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const unsigned ntiles = (unsigned)((T + ATC_ROWS - 1) / ATC_ROWS);
    const int vec = atc_vec_ok(qkv, dout, D);
    CUDA_LAUNCH((atc_backward_dkv_kernel<DP, DROP>), dim3((unsigned)(B * G), ntiles), ATC_THREADS, smem_kv)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, scale, p, inv_keep, key, h0, HT, vec);
    CUDA_LAUNCH((atc_backward_dq_kernel<DP, DROP>), dim3((unsigned)(B * H), ntiles), ATC_THREADS, smem_q)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, scale, p, inv_keep, key, h0, HT, vec);
    cuda_check(op);
}

/* One instance per padded head dim and dropout on / off (off: no mask code in the unrolled loops, fewer
 * registers). */
template <bool DROP>
static void atc_forward_dp(bf16 *out, float *lse, const bf16 *qkv, int B, int T, int H, int G, int D, float p,
                           uint64_t key, int h0, int HT) {
    switch (atc_dp(D)) {
    case 32: atc_forward<32, DROP>(out, lse, qkv, B, T, H, G, D, p, key, h0, HT); break;
    case 64: atc_forward<64, DROP>(out, lse, qkv, B, T, H, G, D, p, key, h0, HT); break;
    default: atc_forward<128, DROP>(out, lse, qkv, B, T, H, G, D, p, key, h0, HT); break;
    }
}
template <bool DROP>
static void atc_backward_dp(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                            int B, int T, int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    switch (atc_dp(D)) {
    case 32: atc_backward<32, DROP>(dqkv, dout, qkv, lse, delta, B, T, H, G, D, p, key, h0, HT); break;
    case 64: atc_backward<64, DROP>(dqkv, dout, qkv, lse, delta, B, T, H, G, D, p, key, h0, HT); break;
    default: atc_backward<128, DROP>(dqkv, dout, qkv, lse, delta, B, T, H, G, D, p, key, h0, HT); break;
    }
}

void cuda_attention_tc_forward(bf16 *out, float *lse, const bf16 *qkv, int B, int T, int H, int G, int D, float p,
                               uint64_t key, int h0, int HT) {
    if (p > 0.0f) atc_forward_dp<true>(out, lse, qkv, B, T, H, G, D, p, key, h0, HT);
    else atc_forward_dp<false>(out, lse, qkv, B, T, H, G, D, p, key, h0, HT);
}

void cuda_attention_tc_backward(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                                int B, int T, int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    if (p > 0.0f) atc_backward_dp<true>(dqkv, dout, qkv, lse, delta, B, T, H, G, D, p, key, h0, HT);
    else atc_backward_dp<false>(dqkv, dout, qkv, lse, delta, B, T, H, G, D, p, key, h0, HT);
}

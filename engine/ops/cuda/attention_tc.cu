// Causal grouped-query attention of the bf16 table on tensor cores, flash-attention-2 style: the
// products (Q K^T, P V, dO V^T, P^T dO, dS^T Q, dS K) run as WMMA 16x16x16 with bf16 operands and fp32
// accumulators (the WMMA API rather than inline mma.sync PTX, so that emulation.h can run these
// kernels); the softmax, lse, dropout and dS are fp32 on CUDA cores. P and dS are rounded to bf16 to
// enter the second product of each pair, as flash-attention does (a 2^-9 relative error per term,
// inside the bf16 tolerance of the reference). The contract, layout and dropout mask are those of
// attention.cu (engine/ops/ops.h; engine/ops/cpu/attention.c is the reference).
//
// A block has 4 warps and 64 rows (16 per warp) of one side, and walks 64-wide tiles of the other
// side. Head dims are padded with zeros to Dp = D rounded up to 16 (<= 128). Everything a warp's
// products need from other warps (the tiles both sides read) is behind __syncthreads; the rest
// (scores, probabilities, accumulators of the warp's own rows) is private to the warp, ordered by
// __syncwarp. The accumulators that persist over tiles (O, dK, dV, dQ) live in fp32 shared memory,
// since a WMMA fragment's elements are in no specified order (rows cannot be rescaled in registers).
//
// forward:  grid (B*H, ceil(T/64)) blocks of 64 queries; online softmax over the key tiles up to the
//           diagonal, O rescaled by exp(m_old - m_new) in shared memory; out = O / l, lse = m + log l.
// backward: dK/dV per (b, group, 64 keys), looping over the group's heads and the query tiles from the
//           diagonal on (S^T = K Q^T, dP^T = V dO^T, dV += Pd^T dO, dK += dS^T Q); dQ per (b, h, 64
//           queries) over the key tiles (dQ += dS K). Each block owns its rows (no atomics) and stores
//           them once, without reading dqkv: the two grids cover all of it, so it needs no zeroing.
#include <math.h>
#include <stdint.h>

#include "engine/ops/cuda/attention_common.cuh"
#ifndef LT_CUDA_EMULATION
#include <mma.h>
#endif

namespace atc_wmma = nvcuda::wmma;

#define ATC_WARPS 4
#define ATC_THREADS (32 * ATC_WARPS)
#define ATC_ROWS 64             /* rows of a block: 16 per warp */
#define ATC_COLS 64             /* width of a tile of the other side */
#define ATC_LDS (ATC_COLS + 4)  /* pitch (floats) of the fp32 score tiles */
#define ATC_LDP (ATC_COLS + 8)  /* pitch (bf16) of the bf16 probability tiles */
#define ATC_FULL 0xffffffffu

typedef __nv_bfloat16 bf16;
typedef atc_wmma::fragment<atc_wmma::matrix_a, 16, 16, 16, bf16, atc_wmma::row_major> atc_a_row;
typedef atc_wmma::fragment<atc_wmma::matrix_b, 16, 16, 16, bf16, atc_wmma::row_major> atc_b_row;
typedef atc_wmma::fragment<atc_wmma::matrix_b, 16, 16, 16, bf16, atc_wmma::col_major> atc_b_col;
typedef atc_wmma::fragment<atc_wmma::accumulator, 16, 16, 16, float> atc_acc;

/* Shared memory: regions of 128-byte aligned sizes from a 128-byte aligned start. Tiles of bf16 rows
 * have pitch ldh = Dp + 8, fp32 accumulators ldo = Dp + 4: with Dp a multiple of 16, every fragment
 * pointer (row a multiple of 16, column a multiple of 16) is 32-byte aligned. */
static __host__ __device__ __forceinline__ size_t atc_round(size_t n) { return (n + 127) & ~(size_t)127; }
static __host__ __device__ __forceinline__ size_t atc_tile_bytes(int Dp) {
    return atc_round(sizeof(bf16) * ATC_ROWS * (size_t)(Dp + 8));
}
static __host__ __device__ __forceinline__ size_t atc_acc_bytes(int Dp) {
    return atc_round(sizeof(float) * ATC_ROWS * (size_t)(Dp + 4));
}
#define ATC_S_BYTES atc_round(sizeof(float) * ATC_ROWS * ATC_LDS)
#define ATC_P_BYTES atc_round(sizeof(bf16) * ATC_ROWS * ATC_LDP)
#define ATC_VEC_BYTES atc_round(sizeof(float) * ATC_ROWS)

static size_t atc_forward_smem(int Dp) {
    return 128 + 3 * atc_tile_bytes(Dp) + ATC_S_BYTES + ATC_P_BYTES + atc_acc_bytes(Dp);
}
static size_t atc_dkv_smem(int Dp) {
    return 128 + 4 * atc_tile_bytes(Dp) + 2 * ATC_VEC_BYTES + 2 * ATC_S_BYTES + 2 * ATC_P_BYTES + 2 * atc_acc_bytes(Dp);
}
static size_t atc_dq_smem(int Dp) {
    return 128 + 4 * atc_tile_bytes(Dp) + 2 * ATC_S_BYTES + ATC_P_BYTES + atc_acc_bytes(Dp);
}

/* The next region of the shared memory, advancing *at. */
static __device__ __forceinline__ unsigned char *atc_take(unsigned char **at, size_t bytes) {
    unsigned char *p = *at;
    *at += bytes;
    return p;
}
static __device__ __forceinline__ unsigned char *atc_smem_start(void *raw) {
    return (unsigned char *)(((uintptr_t)raw + 127) & ~(uintptr_t)127);
}

/* dst[r][0, Dp) = row t0 + r of src (element pitch `pitch`), zero past T and past D, for r < 64; the
 * block's threads share the rows. vec: src rows are 16-byte aligned and D a multiple of 8. */
static __device__ __forceinline__ void atc_load_tile(bf16 *dst, int ldh, const bf16 *src, int64_t pitch, int t0,
                                                     int T, int D, int Dp, int vec) {
    if (vec) {
        const int vpr = Dp / 8; /* 16-byte vectors per row */
        for (int idx = threadIdx.x; idx < ATC_ROWS * vpr; idx += ATC_THREADS) {
            const int r = idx / vpr, d = (idx - r * vpr) * 8, t = t0 + r;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (t < T && d < D) v = *reinterpret_cast<const uint4 *>(src + (int64_t)t * pitch + d);
            *reinterpret_cast<uint4 *>(dst + r * ldh + d) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < ATC_ROWS * Dp; idx += ATC_THREADS) {
            const int r = idx / Dp, d = idx - r * Dp, t = t0 + r;
            dst[r * ldh + d] = t < T && d < D ? src[(int64_t)t * pitch + d] : __float2bfloat16_rn(0.0f);
        }
    }
}

/* acc[16 x 64] (fp32, pitch ATC_LDS) = A[16 x Dp] B^T, A and B row-major bf16 tiles of pitch ldh
 * (B's 64 rows are the columns of the result); a second pair at the same time when A2 is given. */
static __device__ __forceinline__ void atc_abt(float *acc, const bf16 *A, const bf16 *B, float *acc2, const bf16 *A2,
                                               const bf16 *B2, int ldh, int Dp) {
    for (int j = 0; j < ATC_COLS; j += 16) {
        atc_acc c, c2;
        atc_wmma::fill_fragment(c, 0.0f);
        atc_wmma::fill_fragment(c2, 0.0f);
        for (int d = 0; d < Dp; d += 16) {
            atc_a_row a;
            atc_b_col b;
            atc_wmma::load_matrix_sync(a, A + d, ldh);
            atc_wmma::load_matrix_sync(b, B + j * ldh + d, ldh); /* B^T: column n of B^T is row n of B */
            atc_wmma::mma_sync(c, a, b, c);
            if (A2) {
                atc_wmma::load_matrix_sync(a, A2 + d, ldh);
                atc_wmma::load_matrix_sync(b, B2 + j * ldh + d, ldh);
                atc_wmma::mma_sync(c2, a, b, c2);
            }
        }
        atc_wmma::store_matrix_sync(acc + j, c, ATC_LDS, atc_wmma::mem_row_major);
        if (A2) atc_wmma::store_matrix_sync(acc2 + j, c2, ATC_LDS, atc_wmma::mem_row_major);
    }
}

/* acc[16 x Dp] (fp32, pitch ldo) += P[16 x 64] (bf16, pitch ATC_LDP) V[64 x Dp] (bf16, pitch ldh); and
 * acc2 += P2 V2 when P2 is given. */
static __device__ __forceinline__ void atc_pv(float *acc, const bf16 *P, const bf16 *V, float *acc2, const bf16 *P2,
                                              const bf16 *V2, int ldo, int ldh, int Dp) {
    for (int n = 0; n < Dp; n += 16) {
        atc_acc c, c2;
        atc_wmma::load_matrix_sync(c, acc + n, ldo, atc_wmma::mem_row_major);
        if (P2) atc_wmma::load_matrix_sync(c2, acc2 + n, ldo, atc_wmma::mem_row_major);
        for (int k = 0; k < ATC_COLS; k += 16) {
            atc_a_row a;
            atc_b_row b;
            atc_wmma::load_matrix_sync(a, P + k, ATC_LDP);
            atc_wmma::load_matrix_sync(b, V + k * ldh + n, ldh);
            atc_wmma::mma_sync(c, a, b, c);
            if (P2) {
                atc_wmma::load_matrix_sync(a, P2 + k, ATC_LDP);
                atc_wmma::load_matrix_sync(b, V2 + k * ldh + n, ldh);
                atc_wmma::mma_sync(c2, a, b, c2);
            }
        }
        atc_wmma::store_matrix_sync(acc + n, c, ldo, atc_wmma::mem_row_major);
        if (P2) atc_wmma::store_matrix_sync(acc2 + n, c2, ldo, atc_wmma::mem_row_major);
    }
}

/* ---------------- forward ----------------
 * Lane pair (2r, 2r + 1) of warp w owns query row w*16 + r of the tile: half = lane & 1 takes columns
 * half*32 .. half*32 + 31 of each key tile, and the O columns of its parity. */
__global__ void __launch_bounds__(ATC_THREADS)
    atc_forward_kernel(bf16 *out, float *lse, const bf16 *qkv, int T, int H, int G, int D, int Dp, float scale,
                       float p, float inv_keep, uint64_t key, int vec) {
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    const int ldh = Dp + 8, ldo = Dp + 4;
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Qs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Ks = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    float *Ss = (float *)atc_take(&at, ATC_S_BYTES);
    bf16 *Ps = (bf16 *)atc_take(&at, ATC_P_BYTES);
    float *Os = (float *)atc_take(&at, atc_acc_bytes(Dp));
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATC_ROWS; /* the last query tiles (most keys) first */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = lane & 1;
    const int row = warp * 16 + (lane >> 1), i = q0 + row;
    const bool live = i < T; /* the same for both lanes of the pair */
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    atc_load_tile(Qs, ldh, qp, rs, q0, T, D, Dp, vec);
    for (int c = half; c < Dp; c += 2) Os[row * ldo + c] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int q_end = min(q0 + ATC_ROWS, T);
    const int nkt = (q_end - 1) / ATC_COLS + 1; /* key tiles 0 .. the diagonal one */
    float *srow = Ss + row * ATC_LDS;
    bf16 *prow = Ps + row * ATC_LDP;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATC_COLS;
        __syncthreads(); /* Qs written (first pass); the previous Ks, Vs consumed */
        atc_load_tile(Ks, ldh, kp, rs, k0, T, D, Dp, vec);
        atc_load_tile(Vs, ldh, vp, rs, k0, T, D, Dp, vec);
        __syncthreads();
        atc_abt(Ss + warp * 16 * ATC_LDS, Qs + warp * 16 * ldh, Ks, NULL, NULL, NULL, ldh, Dp);
        __syncwarp();
        /* online softmax of row i over keys k0 + half*32 + c; k0 <= q0 <= i, so a live row has a valid key
         * in every tile and m_new is finite */
        float mx = -INFINITY;
        for (int c = 0; c < 32; c++) {
            const int jc = half * 32 + c, j = k0 + jc;
            if (live && j <= i) mx = fmaxf(mx, srow[jc] * scale);
        }
        mx = fmaxf(mx, __shfl_xor_sync(ATC_FULL, mx, 1));
        const float m_new = live ? fmaxf(m, mx) : 0.0f;
        const float alpha = live ? expf(m - m_new) : 1.0f; /* 0 on the first tile (m = -inf) */
        float sum = 0.0f;
        for (int c = 0; c < 32; c++) {
            const int jc = half * 32 + c, j = k0 + jc;
            const bool valid = live && j <= i;
            const float e = valid ? expf(srow[jc] * scale - m_new) : 0.0f;
            sum += e; /* undropped: lse is of the plain softmax */
            float pe = e;
            if (p > 0.0f) pe = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : e * inv_keep;
            prow[jc] = __float2bfloat16_rn(pe);
        }
        sum += __shfl_xor_sync(ATC_FULL, sum, 1);
        l = l * alpha + sum;
        if (live) m = m_new;
        for (int c = half; c < Dp; c += 2) Os[row * ldo + c] *= alpha;
        __syncwarp();
        atc_pv(Os + warp * 16 * ldo, Ps + warp * 16 * ATC_LDP, Vs, NULL, NULL, NULL, ldo, ldh, Dp);
        __syncwarp();
    }
    if (live) {
        const float inv = 1.0f / l;
        if (half == 0) lse[(int64_t)bh * T + i] = m + logf(l);
        bf16 *op = out + (((int64_t)b * T + i) * H + h) * D;
        for (int c = half; c < D; c += 2) op[c] = __float2bfloat16_rn(Os[row * ldo + c] * inv);
    }
}

/* ---------------- backward: dK, dV ----------------
 * grid (B*G, ceil(T/64)): block = 64 keys of group g. Lane pair r of warp w owns key row w*16 + r of
 * S^T and dP^T (columns: the 64 queries of the current tile). With P = exp(scale S - lse), f = 0 or
 * 1/(1-p): Pd = P f, dS = P (dP f - delta); dV += Pd^T dO, dK += scale dS^T Q. */
__global__ void __launch_bounds__(ATC_THREADS)
    atc_backward_dkv_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                            int T, int H, int G, int D, int Dp, float scale, float p, float inv_keep, uint64_t key,
                            int vec) {
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    const int ldh = Dp + 8, ldo = Dp + 4;
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Ks = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Qs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *dOs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    float *ls = (float *)atc_take(&at, ATC_VEC_BYTES);
    float *dl = (float *)atc_take(&at, ATC_VEC_BYTES);
    float *St = (float *)atc_take(&at, ATC_S_BYTES);
    float *dPt = (float *)atc_take(&at, ATC_S_BYTES);
    bf16 *Pt = (bf16 *)atc_take(&at, ATC_P_BYTES);
    bf16 *dSt = (bf16 *)atc_take(&at, ATC_P_BYTES);
    float *dKs = (float *)atc_take(&at, atc_acc_bytes(Dp));
    float *dVs = (float *)atc_take(&at, atc_acc_bytes(Dp));
    const int hpg = H / G, b = blockIdx.x / G, g = blockIdx.x % G;
    const int k0 = blockIdx.y * ATC_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = lane & 1;
    const int jr = warp * 16 + (lane >> 1), j = k0 + jr;
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    atc_load_tile(Ks, ldh, kp, rs, k0, T, D, Dp, vec);
    atc_load_tile(Vs, ldh, vp, rs, k0, T, D, Dp, vec);
    for (int c = half; c < Dp; c += 2) dKs[jr * ldo + c] = 0.0f, dVs[jr * ldo + c] = 0.0f;
    for (int hh = 0; hh < hpg; hh++) { /* every query head of the group, in order */
        const int h = g * hpg + hh;
        const int64_t bh = (int64_t)b * H + h;
        const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
        const bf16 *gp = dout + ((int64_t)b * T * H + h) * D; /* dout[b, t, h, :] = gp + t * H * D */
        for (int q0 = k0; q0 < T; q0 += ATC_COLS) { /* queries i >= k0 only (causal) */
            __syncthreads(); /* Ks, Vs written (first pass); the previous query tile consumed */
            atc_load_tile(Qs, ldh, qp, rs, q0, T, D, Dp, vec);
            atc_load_tile(dOs, ldh, gp, (int64_t)H * D, q0, T, D, Dp, vec);
            if (threadIdx.x < ATC_COLS) {
                const int t = q0 + threadIdx.x;
                ls[threadIdx.x] = t < T ? lse[bh * T + t] : 0.0f;
                dl[threadIdx.x] = t < T ? delta[bh * T + t] : 0.0f;
            }
            __syncthreads();
            /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys */
            atc_abt(St + warp * 16 * ATC_LDS, Ks + warp * 16 * ldh, Qs, dPt + warp * 16 * ATC_LDS,
                    Vs + warp * 16 * ldh, dOs, ldh, Dp);
            __syncwarp();
            for (int c = 0; c < 32; c++) {
                const int qc = half * 32 + c, i = q0 + qc;
                const bool valid = i < T && i >= j; /* j <= i < T also keeps the key inside the sequence */
                const float pr = valid ? expf(St[jr * ATC_LDS + qc] * scale - ls[qc]) : 0.0f;
                float f = 1.0f;
                if (p > 0.0f) f = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : inv_keep;
                Pt[jr * ATC_LDP + qc] = __float2bfloat16_rn(pr * f);
                dSt[jr * ATC_LDP + qc] = __float2bfloat16_rn(pr * (dPt[jr * ATC_LDS + qc] * f - dl[qc]));
            }
            __syncwarp();
            /* dV += Pd^T dO, dK += dS^T Q (the scale is applied once at the end) */
            atc_pv(dVs + warp * 16 * ldo, Pt + warp * 16 * ATC_LDP, dOs, dKs + warp * 16 * ldo,
                   dSt + warp * 16 * ATC_LDP, Qs, ldo, ldh, Dp);
            __syncwarp();
        }
    }
    /* this block is the only writer of these key rows' dK and dV: stored, rounded once */
    if (j < T) {
        bf16 *dkp = dqkv + ((int64_t)b * T + j) * rs + att_k_col(g, hpg, D), *dvp = dkp + D;
        for (int c = half; c < D; c += 2) {
            dkp[c] = __float2bfloat16_rn(scale * dKs[jr * ldo + c]);
            dvp[c] = __float2bfloat16_rn(dVs[jr * ldo + c]);
        }
    }
}

/* ---------------- backward: dQ ----------------
 * grid (B*H, ceil(T/64)), last tiles first: block = 64 queries of head h; lane pair r of warp w owns
 * query row w*16 + r. dQ = scale dS K over the key tiles up to the diagonal. */
__global__ void __launch_bounds__(ATC_THREADS)
    atc_backward_dq_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                           int T, int H, int G, int D, int Dp, float scale, float p, float inv_keep, uint64_t key,
                           int vec) {
    CUDA_DYNAMIC_SMEM(uint4, atc_raw);
    const int ldh = Dp + 8, ldo = Dp + 4;
    unsigned char *at = atc_smem_start(atc_raw);
    bf16 *Qs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *dOs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Ks = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    bf16 *Vs = (bf16 *)atc_take(&at, atc_tile_bytes(Dp));
    float *Ss = (float *)atc_take(&at, ATC_S_BYTES);
    float *dPs = (float *)atc_take(&at, ATC_S_BYTES);
    bf16 *dSs = (bf16 *)atc_take(&at, ATC_P_BYTES);
    float *dQs = (float *)atc_take(&at, atc_acc_bytes(Dp));
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATC_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = lane & 1;
    const int row = warp * 16 + (lane >> 1), i = q0 + row;
    const bool live = i < T;
    const int64_t rs = att_row_pitch(H, G, D);
    const bf16 *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const bf16 *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;
    const bf16 *gp = dout + ((int64_t)b * T * H + h) * D;

    atc_load_tile(Qs, ldh, qp, rs, q0, T, D, Dp, vec);
    atc_load_tile(dOs, ldh, gp, (int64_t)H * D, q0, T, D, Dp, vec);
    for (int c = half; c < Dp; c += 2) dQs[row * ldo + c] = 0.0f;
    const float lse_i = live ? lse[(int64_t)bh * T + i] : 0.0f, di = live ? delta[(int64_t)bh * T + i] : 0.0f;
    const int q_end = min(q0 + ATC_ROWS, T);
    const int nkt = (q_end - 1) / ATC_COLS + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATC_COLS;
        __syncthreads(); /* Qs, dOs written (first pass); the previous Ks, Vs consumed */
        atc_load_tile(Ks, ldh, kp, rs, k0, T, D, Dp, vec);
        atc_load_tile(Vs, ldh, vp, rs, k0, T, D, Dp, vec);
        __syncthreads();
        /* S = Q K^T and dP = dO V^T for the warp's 16 queries */
        atc_abt(Ss + warp * 16 * ATC_LDS, Qs + warp * 16 * ldh, Ks, dPs + warp * 16 * ATC_LDS, dOs + warp * 16 * ldh,
                Vs, ldh, Dp);
        __syncwarp();
        for (int c = 0; c < 32; c++) {
            const int jc = half * 32 + c, j = k0 + jc;
            const bool valid = live && j <= i;
            const float pr = valid ? expf(Ss[row * ATC_LDS + jc] * scale - lse_i) : 0.0f;
            float f = 1.0f;
            if (p > 0.0f) f = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : inv_keep;
            dSs[row * ATC_LDP + jc] = __float2bfloat16_rn(pr * (dPs[row * ATC_LDS + jc] * f - di));
        }
        __syncwarp();
        atc_pv(dQs + warp * 16 * ldo, dSs + warp * 16 * ATC_LDP, Ks, NULL, NULL, NULL, ldo, ldh, Dp);
        __syncwarp();
    }
    if (live) {
        bf16 *dqp = dqkv + ((int64_t)b * T + i) * rs + att_q_col(h, hpg, D);
        for (int c = half; c < D; c += 2)
            dqp[c] = __float2bfloat16_rn(scale * dQs[row * ldo + c]);
    }
}

/* ---------------- host side ---------------- */

/* Whether every tile row is 16-byte aligned (qkv, dout rows and head offsets are multiples of D). */
static int atc_vec_ok(const void *a, const void *b, int D) {
    return D % 8 == 0 && (uintptr_t)a % 16 == 0 && (b == NULL || (uintptr_t)b % 16 == 0);
}

void cuda_attention_tc_forward(bf16 *out, float *lse, const bf16 *qkv, int B, int T, int H, int G, int D, float p,
                               uint64_t key) {
    const char *op = "attention_forward";
    const int Dp = (D + 15) / 16 * 16;
    const size_t smem = atc_forward_smem(Dp);
    if (!att_smem_ok((const void *)atc_forward_kernel, smem, op)) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const dim3 grid((unsigned)(B * H), (unsigned)((T + ATC_ROWS - 1) / ATC_ROWS));
    CUDA_LAUNCH(atc_forward_kernel, grid, ATC_THREADS, smem)(out, lse, qkv, T, H, G, D, Dp, scale, p, inv_keep, key,
                                                             atc_vec_ok(qkv, NULL, D));
    cuda_check(op);
}

void cuda_attention_tc_backward(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta,
                                int B, int T, int H, int G, int D, float p, uint64_t key) {
    const char *op = "attention_backward";
    const int Dp = (D + 15) / 16 * 16;
    const size_t smem_kv = atc_dkv_smem(Dp), smem_q = atc_dq_smem(Dp);
    if (!att_smem_ok((const void *)atc_backward_dkv_kernel, smem_kv, op) ||
        !att_smem_ok((const void *)atc_backward_dq_kernel, smem_q, op))
        return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const unsigned ntiles = (unsigned)((T + ATC_ROWS - 1) / ATC_ROWS);
    const int vec = atc_vec_ok(qkv, dout, D);
    CUDA_LAUNCH(atc_backward_dkv_kernel, dim3((unsigned)(B * G), ntiles), ATC_THREADS, smem_kv)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, Dp, scale, p, inv_keep, key, vec);
    CUDA_LAUNCH(atc_backward_dq_kernel, dim3((unsigned)(B * H), ntiles), ATC_THREADS, smem_q)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, Dp, scale, p, inv_keep, key, vec);
    cuda_check(op);
}

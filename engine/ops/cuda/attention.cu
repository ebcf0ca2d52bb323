// Causal grouped-query attention on the fused qkv[B, T, G, H/G + 2, D] layout, flash-attention style,
// fp32 (engine/ops/ops.h has the contract, engine/ops/cpu/attention.c the reference).
//
// Tiles are 32 x 32: a block has 8 warps, each warp owns 4 rows of the tile, and the 32 lanes of a warp
// stand for the 32 columns of the other side (keys in forward and dQ, queries in dK/dV). A lane
// computes whole dot products over D from shared memory: the operand indexed by the lane is stored
// transposed with a row pitch of 33 floats, so lane L reading column L hits bank (d + L) % 32 (no
// conflicts), while the warp's own rows are read as broadcasts. For the P @ V style products each
// lane owns output dims d = lane + 32 k (k < DV = ceil(D / 32)) and the 32 weights arrive by shuffle.
//
// Forward: online softmax over the key tiles up to the diagonal; writes out and lse = m + log(l) of
// the undropped scores (l sums undropped exponentials, dropout only scales what reaches out).
// Backward: delta_i = dO_i . O_i, then dK/dV per key tile (a block loops over every query tile from
// the diagonal on and over every query head of the kv group, so it owns its dK, dV rows: no atomics,
// deterministic) and dQ per query tile; both accumulate (+=) into dqkv.
#include <math.h>

#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"

#define ATT_WARPS 8
#define ATT_RW 4                     /* rows of the tile per warp */
#define ATT_THREADS (32 * ATT_WARPS) /* 256 */
#define ATT_TILE 32                  /* = ATT_WARPS * ATT_RW = lanes per warp */
#define ATT_PAD 33                   /* pitch of the transposed tiles */
#define ATT_MAX_D 128
#define ATT_FULL 0xffffffffu

static_assert(ATT_WARPS * ATT_RW == ATT_TILE && ATT_TILE == 32, "a tile is 32 rows by 32 lanes");

/* Offsets into qkv (floats): token row pitch, and the start of head h's query / group g's key in a row. */
static __device__ __forceinline__ int64_t att_row_pitch(int H, int G, int D) { return (int64_t)(H + 2 * G) * D; }
static __device__ __forceinline__ int64_t att_q_col(int h, int hpg, int D) {
    return (int64_t)((h / hpg) * (hpg + 2) + h % hpg) * D;
}
static __device__ __forceinline__ int64_t att_k_col(int g, int hpg, int D) { return (int64_t)(g * (hpg + 2) + hpg) * D; }

/* The dropout mask element (b, h, i, j) of ops.h, bh = b * H + h. */
static __device__ __forceinline__ bool att_dropped(uint64_t key, int64_t bh, int T, int i, int j, float p) {
    return cuda_uniform(key, ((uint64_t)bh * (uint64_t)T + (uint64_t)i) * (uint64_t)T + (uint64_t)j) < p;
}

/* ---------------- forward ----------------
 * grid (B*H, ceil(T/32)), one block per (b, h, query tile); the last query tiles (most keys) start first. */
template <int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_forward_kernel(float *out, float *lse, const float *qkv, int T, int H, int G, int D, float scale, float p,
                       float inv_keep, uint64_t key) {
    CUDA_DYNAMIC_SMEM(float, att_smem);
    float *Qs = att_smem;              /* [32][D]  query rows * scale */
    float *Kt = Qs + ATT_TILE * D;     /* [D][33]  key tile, transposed */
    float *Vs = Kt + D * ATT_PAD;      /* [32][D]  value tile */
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rs = att_row_pitch(H, G, D);
    const float *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const float *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx - r * D, t = q0 + r;
        Qs[idx] = t < T ? scale * qp[(int64_t)t * rs + d] : 0.0f; /* the CPU scales q before the dot */
    }
    float m[ATT_RW], l[ATT_RW], o[ATT_RW][DV];
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
        for (int k = 0; k < DV; k++) o[r][k] = 0.0f;
    }
    const int q_end = min(q0 + ATT_TILE, T);
    const int nkt = (q_end - 1) / ATT_TILE + 1; /* key tiles 0 .. the diagonal one (k0 = q0) */
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATT_TILE;
        __syncthreads(); /* Qs is written (first pass); the previous Kt, Vs are consumed */
        for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
            const int j = idx / D, d = idx - j * D, t = k0 + j;
            const bool in = t < T;
            Kt[d * ATT_PAD + j] = in ? kp[(int64_t)t * rs + d] : 0.0f;
            Vs[idx] = in ? vp[(int64_t)t * rs + d] : 0.0f;
        }
        __syncthreads();
        /* scores of the warp's rows against key k0 + lane */
        float s[ATT_RW];
#pragma unroll
        for (int r = 0; r < ATT_RW; r++) s[r] = 0.0f;
        for (int d = 0; d < D; d++) {
            const float kd = Kt[d * ATT_PAD + lane];
#pragma unroll
            for (int r = 0; r < ATT_RW; r++) s[r] += Qs[(warp * ATT_RW + r) * D + d] * kd;
        }
        const int j = k0 + lane;
#pragma unroll
        for (int r = 0; r < ATT_RW; r++) {
            const int i = q0 + warp * ATT_RW + r;
            if (i >= T) continue; /* the same for the whole warp: shuffles below stay converged */
            const bool valid = j <= i; /* causal; j <= i < T also keeps j inside the sequence */
            const float sv = valid ? s[r] : -INFINITY;
            /* k0 <= q0 <= i, so key k0 is valid and m_new is finite */
            const float m_new = fmaxf(m[r], cuda_warp_max(sv));
            const float e = valid ? expf(sv - m_new) : 0.0f;
            const float alpha = expf(m[r] - m_new); /* 0 on the first tile (m = -inf) */
            l[r] = l[r] * alpha + cuda_warp_sum(e);  /* undropped: lse is of the plain softmax */
            m[r] = m_new;
            float pe = e; /* what reaches out: dropped or scaled by 1/(1-p) */
            if (p > 0.0f) pe = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : e * inv_keep;
#pragma unroll
            for (int k = 0; k < DV; k++) o[r][k] *= alpha;
            const int jn = min(ATT_TILE, i - k0 + 1); /* keys past the diagonal add nothing */
            for (int jj = 0; jj < jn; jj++) {
                const float pj = __shfl_sync(ATT_FULL, pe, jj);
#pragma unroll
                for (int k = 0; k < DV; k++) {
                    const int d = lane + 32 * k;
                    if (d < D) o[r][k] += pj * Vs[jj * D + d];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        const int i = q0 + warp * ATT_RW + r;
        if (i >= T) continue;
        const float inv = 1.0f / l[r];
        if (lane == 0) lse[(int64_t)bh * T + i] = m[r] + logf(l[r]);
        float *op = out + (((int64_t)b * T + i) * H + h) * D;
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) op[d] = o[r][k] * inv;
        }
    }
}

/* ---------------- backward ---------------- */

/* delta[b, h, t] = dout[b, t, h, :] . out[b, t, h, :] (= sum_j Pd_ij dPd_ij, dropout included): one warp
 * per (b, t, h) row. */
__global__ void att_delta_kernel(float *delta, const float *dout, const float *out, int64_t rows, int T, int H, int D) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int64_t row = (int64_t)blockIdx.x * ATT_WARPS + warp; row < rows; row += (int64_t)gridDim.x * ATT_WARPS) {
        const float *g = dout + row * D, *o = out + row * D;
        float s = 0.0f;
        for (int d = lane; d < D; d += 32) s += g[d] * o[d];
        s = cuda_warp_sum(s);
        const int64_t bt = row / H, t = bt % T, b = bt / T, h = row % H;
        if (lane == 0) delta[(b * H + h) * T + t] = s;
    }
}

/* dK, dV of one key tile of group g: grid (B*G, ceil(T/32)); blockIdx.y = 0 (the tile that sees every
 * query) first. Warp rows are keys j, lanes are queries i of the current query tile. With
 * P = exp(S - lse), f = 0 or 1/(1-p) the dropout factor, dPd = dO . V_j:
 *   dV_j += sum_i P f dO_i,   dK_j += sum_i P (dPd f - delta_i) * (scale q_i). */
template <int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_backward_dkv_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse, const float *delta,
                            int T, int H, int G, int D, float scale, float p, float inv_keep, uint64_t key) {
    CUDA_DYNAMIC_SMEM(float, att_smem);
    float *Ks = att_smem;              /* [32][D] key tile */
    float *Vs = Ks + ATT_TILE * D;     /* [32][D] value tile */
    float *Qt = Vs + ATT_TILE * D;     /* [D][33] query tile * scale, transposed */
    float *dOt = Qt + D * ATT_PAD;     /* [D][33] dout tile, transposed */
    float *ls = dOt + D * ATT_PAD;     /* [32] lse of the query tile */
    float *dl = ls + ATT_TILE;         /* [32] delta of the query tile */
    const int hpg = H / G, b = blockIdx.x / G, g = blockIdx.x % G;
    const int k0 = blockIdx.y * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rs = att_row_pitch(H, G, D);
    const float *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int j = idx / D, d = idx - j * D, t = k0 + j;
        const bool in = t < T;
        Ks[idx] = in ? kp[(int64_t)t * rs + d] : 0.0f;
        Vs[idx] = in ? vp[(int64_t)t * rs + d] : 0.0f;
    }
    float dk[ATT_RW][DV], dv[ATT_RW][DV];
#pragma unroll
    for (int r = 0; r < ATT_RW; r++)
#pragma unroll
        for (int k = 0; k < DV; k++) dk[r][k] = 0.0f, dv[r][k] = 0.0f;

    for (int hh = 0; hh < hpg; hh++) { /* every query head of the group, in order */
        const int h = g * hpg + hh;
        const int64_t bh = (int64_t)b * H + h;
        const float *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
        const float *gp = dout + ((int64_t)b * T * H + h) * D; /* dout[b, t, h, :] = gp + t * H * D */
        for (int q0 = k0; q0 < T; q0 += ATT_TILE) { /* queries i >= k0 only (causal) */
            __syncthreads(); /* Ks, Vs are written (first pass); the previous query tile is consumed */
            for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
                const int r = idx / D, d = idx - r * D, t = q0 + r;
                const bool in = t < T;
                Qt[d * ATT_PAD + r] = in ? scale * qp[(int64_t)t * rs + d] : 0.0f;
                dOt[d * ATT_PAD + r] = in ? gp[(int64_t)t * H * D + d] : 0.0f;
            }
            if (threadIdx.x < ATT_TILE) {
                const int t = q0 + threadIdx.x;
                ls[threadIdx.x] = t < T ? lse[bh * T + t] : 0.0f;
                dl[threadIdx.x] = t < T ? delta[bh * T + t] : 0.0f;
            }
            __syncthreads();
            const int i = q0 + lane;
            const float lse_i = ls[lane], di = dl[lane];
            const int ii1 = min(ATT_TILE, T - q0); /* query lanes inside the sequence */
#pragma unroll
            for (int r = 0; r < ATT_RW; r++) {
                const int jr = warp * ATT_RW + r, j = k0 + jr;
                if (j >= T) continue; /* warp-uniform */
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < D; d++) {
                    s += Qt[d * ATT_PAD + lane] * Ks[jr * D + d];
                    dp += dOt[d * ATT_PAD + lane] * Vs[jr * D + d];
                }
                const bool valid = i < T && i >= j;
                const float pr = valid ? expf(s - lse_i) : 0.0f;
                float f = 1.0f; /* dropout factor of P_ij: 0 or 1/(1-p) */
                if (p > 0.0f) f = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : inv_keep;
                const float pd = pr * f, ds = pr * (dp * f - di);
                const int ii0 = max(0, j - q0); /* queries before key j see nothing of it */
                for (int ii = ii0; ii < ii1; ii++) {
                    const float pdi = __shfl_sync(ATT_FULL, pd, ii), dsi = __shfl_sync(ATT_FULL, ds, ii);
#pragma unroll
                    for (int k = 0; k < DV; k++) {
                        const int d = lane + 32 * k;
                        if (d < D) {
                            dv[r][k] += pdi * dOt[d * ATT_PAD + ii];
                            dk[r][k] += dsi * Qt[d * ATT_PAD + ii];
                        }
                    }
                }
            }
        }
    }
    /* this block is the only writer of these key rows' dK and dV */
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        const int j = k0 + warp * ATT_RW + r;
        if (j >= T) continue;
        float *dkp = dqkv + ((int64_t)b * T + j) * rs + att_k_col(g, hpg, D), *dvp = dkp + D;
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) {
                dkp[d] += dk[r][k];
                dvp[d] += dv[r][k];
            }
        }
    }
}

/* dQ of one query tile of head h: grid (B*H, ceil(T/32)), last tiles first. Warp rows are queries i,
 * lanes keys j of the current key tile: dQ_i += scale * sum_j P (dPd f - delta_i) K_j. */
template <int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_backward_dq_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse, const float *delta,
                           int T, int H, int G, int D, float scale, float p, float inv_keep, uint64_t key) {
    CUDA_DYNAMIC_SMEM(float, att_smem);
    float *Qs = att_smem;              /* [32][D] query rows * scale */
    float *dOs = Qs + ATT_TILE * D;    /* [32][D] dout rows */
    float *Kt = dOs + ATT_TILE * D;    /* [D][33] key tile, transposed */
    float *Vt = Kt + D * ATT_PAD;      /* [D][33] value tile, transposed */
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rs = att_row_pitch(H, G, D);
    const float *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const float *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;
    const float *gp = dout + ((int64_t)b * T * H + h) * D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx - r * D, t = q0 + r;
        const bool in = t < T;
        Qs[idx] = in ? scale * qp[(int64_t)t * rs + d] : 0.0f;
        dOs[idx] = in ? gp[(int64_t)t * H * D + d] : 0.0f;
    }
    float lse_r[ATT_RW], di_r[ATT_RW], dq[ATT_RW][DV];
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        const int i = q0 + warp * ATT_RW + r;
        lse_r[r] = i < T ? lse[(int64_t)bh * T + i] : 0.0f;
        di_r[r] = i < T ? delta[(int64_t)bh * T + i] : 0.0f;
#pragma unroll
        for (int k = 0; k < DV; k++) dq[r][k] = 0.0f;
    }
    const int q_end = min(q0 + ATT_TILE, T);
    const int nkt = (q_end - 1) / ATT_TILE + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * ATT_TILE;
        __syncthreads(); /* Qs, dOs are written (first pass); the previous Kt, Vt are consumed */
        for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
            const int j = idx / D, d = idx - j * D, t = k0 + j;
            const bool in = t < T;
            Kt[d * ATT_PAD + j] = in ? kp[(int64_t)t * rs + d] : 0.0f;
            Vt[d * ATT_PAD + j] = in ? vp[(int64_t)t * rs + d] : 0.0f;
        }
        __syncthreads();
        float s[ATT_RW], dp[ATT_RW];
#pragma unroll
        for (int r = 0; r < ATT_RW; r++) s[r] = 0.0f, dp[r] = 0.0f;
        for (int d = 0; d < D; d++) {
            const float kd = Kt[d * ATT_PAD + lane], vd = Vt[d * ATT_PAD + lane];
#pragma unroll
            for (int r = 0; r < ATT_RW; r++) {
                s[r] += Qs[(warp * ATT_RW + r) * D + d] * kd;
                dp[r] += dOs[(warp * ATT_RW + r) * D + d] * vd;
            }
        }
        const int j = k0 + lane;
#pragma unroll
        for (int r = 0; r < ATT_RW; r++) {
            const int i = q0 + warp * ATT_RW + r;
            if (i >= T) continue; /* warp-uniform */
            const bool valid = j <= i;
            const float pr = valid ? expf(s[r] - lse_r[r]) : 0.0f;
            float f = 1.0f;
            if (p > 0.0f) f = valid && att_dropped(key, bh, T, i, j, p) ? 0.0f : inv_keep;
            const float ds = pr * (dp[r] * f - di_r[r]);
            const int jn = min(ATT_TILE, i - k0 + 1);
            for (int jj = 0; jj < jn; jj++) {
                const float dsj = __shfl_sync(ATT_FULL, ds, jj);
#pragma unroll
                for (int k = 0; k < DV; k++) {
                    const int d = lane + 32 * k;
                    if (d < D) dq[r][k] += dsj * Kt[d * ATT_PAD + jj];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        const int i = q0 + warp * ATT_RW + r;
        if (i >= T) continue;
        float *dqp = dqkv + ((int64_t)b * T + i) * rs + att_q_col(h, hpg, D);
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) dqp[d] += scale * dq[r][k];
        }
    }
}

/* ---------------- host side ---------------- */

static size_t att_forward_smem(int D) { return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)D * ATT_PAD); }
static size_t att_dkv_smem(int D) {
    return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)2 * D * ATT_PAD + 2 * ATT_TILE);
}
static size_t att_dq_smem(int D) { return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)2 * D * ATT_PAD); }

/* Above 48 KiB a kernel must opt in to its dynamic shared memory (H100: up to 227 KiB). */
static bool att_smem_ok(const void *kernel, size_t bytes, const char *op) {
    if (bytes <= 48 * 1024) return true;
    if (bytes > cuda_ctx.smem_optin) {
        cuda_record(op, "needs %zu bytes of shared memory, the GPU allows %zu", bytes, cuda_ctx.smem_optin);
        return false;
    }
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        cuda_record_cuda(op, e);
        return false;
    }
    return true;
}

static bool att_shape_ok(int B, int T, int H, int G, int D, float p, const char *op) {
    if (H <= 0 || G <= 0 || H % G != 0 || D < 1 || D > ATT_MAX_D || !(p >= 0.0f && p < 1.0f) ||
        (T + ATT_TILE - 1) / ATT_TILE > 65535) {
        cuda_record(op, "unsupported shape B=%d T=%d H=%d G=%d D=%d dropout %g (H a multiple of G, 1 <= D <= %d, "
                        "0 <= p < 1, T <= %d)", B, T, H, G, D, (double)p, ATT_MAX_D, 65535 * ATT_TILE);
        return false;
    }
    return true;
}

template <int DV>
static void att_forward_launch(float *out, float *lse, const float *qkv, int B, int T, int H, int G, int D, float p,
                               uint64_t key) {
    const size_t smem = att_forward_smem(D);
    if (!att_smem_ok((const void *)att_forward_kernel<DV>, smem, "attention_forward")) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const dim3 grid((unsigned)(B * H), (unsigned)((T + ATT_TILE - 1) / ATT_TILE));
    CUDA_LAUNCH(att_forward_kernel<DV>, grid, ATT_THREADS, smem)(out, lse, qkv, T, H, G, D, scale, p, inv_keep,
                                                                         key);
    cuda_check("attention_forward");
}

template <int DV>
static void att_backward_launch(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                                int B, int T, int H, int G, int D, float p, uint64_t key) {
    const char *op = "attention_backward";
    const size_t smem_kv = att_dkv_smem(D), smem_q = att_dq_smem(D);
    if (!att_smem_ok((const void *)att_backward_dkv_kernel<DV>, smem_kv, op) ||
        !att_smem_ok((const void *)att_backward_dq_kernel<DV>, smem_q, op))
        return;
    const int64_t rows = (int64_t)B * T * H;
    const size_t nbytes = sizeof(float) * (size_t)rows;
    float *delta = (float *)cuda_scratch(nbytes, op);
    if (!delta) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const unsigned ntiles = (unsigned)((T + ATT_TILE - 1) / ATT_TILE);
    CUDA_LAUNCH(att_delta_kernel, cuda_blocks(rows, ATT_WARPS), ATT_THREADS, 0)(delta, dout, out, rows, T, H, D);
    CUDA_LAUNCH(att_backward_dkv_kernel<DV>, dim3((unsigned)(B * G), ntiles), ATT_THREADS, smem_kv)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, scale, p, inv_keep, key);
    CUDA_LAUNCH(att_backward_dq_kernel<DV>, dim3((unsigned)(B * H), ntiles), ATT_THREADS, smem_q)(
        dqkv, dout, qkv, lse, delta, T, H, G, D, scale, p, inv_keep, key);
    cuda_check(op);
    cuda_release(delta, nbytes);
}

void cuda_attention_forward(float *out, float *lse, const float *qkv, int B, int T, int H, int G, int D,
                            float dropout_p, uint64_t dropout_key) {
    if (B <= 0 || T <= 0) return;
    if (!att_shape_ok(B, T, H, G, D, dropout_p, "attention_forward")) return;
    switch ((D + 31) / 32) { /* output dims per lane */
    case 1: att_forward_launch<1>(out, lse, qkv, B, T, H, G, D, dropout_p, dropout_key); break;
    case 2: att_forward_launch<2>(out, lse, qkv, B, T, H, G, D, dropout_p, dropout_key); break;
    case 3: att_forward_launch<3>(out, lse, qkv, B, T, H, G, D, dropout_p, dropout_key); break;
    default: att_forward_launch<4>(out, lse, qkv, B, T, H, G, D, dropout_p, dropout_key); break;
    }
}

void cuda_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                             int B, int T, int H, int G, int D, float dropout_p, uint64_t dropout_key) {
    if (B <= 0 || T <= 0) return;
    if (!att_shape_ok(B, T, H, G, D, dropout_p, "attention_backward")) return;
    switch ((D + 31) / 32) {
    case 1: att_backward_launch<1>(dqkv, dout, qkv, out, lse, B, T, H, G, D, dropout_p, dropout_key); break;
    case 2: att_backward_launch<2>(dqkv, dout, qkv, out, lse, B, T, H, G, D, dropout_p, dropout_key); break;
    case 3: att_backward_launch<3>(dqkv, dout, qkv, out, lse, B, T, H, G, D, dropout_p, dropout_key); break;
    default: att_backward_launch<4>(dqkv, dout, qkv, out, lse, B, T, H, G, D, dropout_p, dropout_key); break;
    }
}

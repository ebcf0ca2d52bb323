// Causal grouped-query attention on the fused qkv[B, T, G, H/G + 2, D] layout, flash-attention style
// (engine/ops/ops.h has the contract, engine/ops/cpu/attention.c the reference). qkv, out, dout and
// dqkv are float or bf16 (T); tiles are widened to fp32 in shared memory and all the math (scores,
// online softmax, lse, the products) is fp32 on CUDA cores. A bf16 out is rounded once at the end, and
// so is a bf16 dqkv element (its whole fp32 gradient, summed in registers, then stored; never read).
// These kernels serve the fp32 table; the bf16 table runs attention_tc.cu (tensor cores) unless
// LUATRON_CUDA_ATTENTION=simt, which gives it these (fp32 math on bf16 storage) instead.
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
// deterministic) and dQ per query tile; both store (=) into dqkv. Between them the two grids cover every
// element of dqkv, so it needs no zeroing: a key row sums its group's H/G heads in one block.
#include <math.h>

#include <type_traits>

#include "engine/ops/cuda/internal.cuh"
#include "engine/ops/cuda/philox.cuh"
#include "engine/ops/cuda/attention_common.cuh"

#define ATT_WARPS 8
#define ATT_RW 4                     /* rows of the tile per warp */
#define ATT_THREADS (32 * ATT_WARPS) /* 256 */
#define ATT_TILE 32                  /* = ATT_WARPS * ATT_RW = lanes per warp */
#define ATT_PAD 33                   /* pitch of the transposed tiles */
#define ATT_FULL 0xffffffffu

static_assert(ATT_WARPS * ATT_RW == ATT_TILE && ATT_TILE == 32, "a tile is 32 rows by 32 lanes");

/* ---------------- forward ----------------
 * grid (B*H, ceil(T/32)), one block per (b, h, query tile); the last query tiles (most keys) start first. */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_forward_kernel(scalar_t *out, float *lse, const scalar_t *qkv, int T, int H, int G, int D, float scale,
                       float p, float inv_keep, uint64_t key, int h0, int HT) {
    CUDA_DYNAMIC_SMEM(float, att_smem);
    float *Qs = att_smem;              /* [32][D]  query rows * scale */
    float *Kt = Qs + ATT_TILE * D;     /* [D][33]  key tile, transposed */
    float *Vs = Kt + D * ATT_PAD;      /* [32][D]  value tile */
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int64_t mh = (int64_t)b * HT + h0 + h; /* the head's mask row (ops.h) */
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rs = att_row_pitch(H, G, D);
    const scalar_t *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const scalar_t *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx - r * D, t = q0 + r;
        Qs[idx] = t < T ? scale * cuda_ld(qp + (int64_t)t * rs + d) : 0.0f; /* the CPU scales q before the dot */
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
            Kt[d * ATT_PAD + j] = in ? cuda_ld(kp + (int64_t)t * rs + d) : 0.0f;
            Vs[idx] = in ? cuda_ld(vp + (int64_t)t * rs + d) : 0.0f;
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
            if (p > 0.0f) pe = valid && att_dropped(key, mh, T, i, j, p) ? 0.0f : e * inv_keep;
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
        scalar_t *op = out + (((int64_t)b * T + i) * H + h) * D;
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) cuda_st(op + d, o[r][k] * inv);
        }
    }
}

/* ---------------- backward ---------------- */

/* delta[b, h, t] = dout[b, t, h, :] . out[b, t, h, :] (= sum_j Pd_ij dPd_ij, dropout included): one warp
 * per (b, t, h) row. */
template <typename scalar_t>
__global__ void att_delta_kernel(float *delta, const scalar_t *dout, const scalar_t *out, int64_t rows, int T, int H,
                                 int D) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int64_t row = (int64_t)blockIdx.x * ATT_WARPS + warp; row < rows; row += (int64_t)gridDim.x * ATT_WARPS) {
        const scalar_t *g = dout + row * D, *o = out + row * D;
        float s = 0.0f;
        for (int d = lane; d < D; d += 32) s += cuda_ld(g + d) * cuda_ld(o + d);
        s = cuda_warp_sum(s);
        const int64_t bt = row / H, t = bt % T, b = bt / T, h = row % H;
        if (lane == 0) delta[(b * H + h) * T + t] = s;
    }
}

/* dK, dV of one key tile of group g: grid (B*G, ceil(T/32)); blockIdx.y = 0 (the tile that sees every
 * query) first. Warp rows are keys j, lanes are queries i of the current query tile. With
 * P = exp(S - lse), f = 0 or 1/(1-p) the dropout factor, dPd = dO . V_j, over the group's heads:
 *   dV_j = sum_i P f dO_i,   dK_j = sum_i P (dPd f - delta_i) * (scale q_i). */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_backward_dkv_kernel(scalar_t *dqkv, const scalar_t *dout, const scalar_t *qkv, const float *lse,
                            const float *delta, int T, int H, int G, int D, float scale, float p, float inv_keep,
                            uint64_t key, int h0, int HT) {
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
    const scalar_t *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int j = idx / D, d = idx - j * D, t = k0 + j;
        const bool in = t < T;
        Ks[idx] = in ? cuda_ld(kp + (int64_t)t * rs + d) : 0.0f;
        Vs[idx] = in ? cuda_ld(vp + (int64_t)t * rs + d) : 0.0f;
    }
    float dk[ATT_RW][DV], dv[ATT_RW][DV];
#pragma unroll
    for (int r = 0; r < ATT_RW; r++)
#pragma unroll
        for (int k = 0; k < DV; k++) dk[r][k] = 0.0f, dv[r][k] = 0.0f;

    for (int hh = 0; hh < hpg; hh++) { /* every query head of the group, in order */
        const int h = g * hpg + hh;
        const int64_t bh = (int64_t)b * H + h;
        const int64_t mh = (int64_t)b * HT + h0 + h;
        const scalar_t *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
        const scalar_t *gp = dout + ((int64_t)b * T * H + h) * D; /* dout[b, t, h, :] = gp + t * H * D */
        for (int q0 = k0; q0 < T; q0 += ATT_TILE) { /* queries i >= k0 only (causal) */
            __syncthreads(); /* Ks, Vs are written (first pass); the previous query tile is consumed */
            for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
                const int r = idx / D, d = idx - r * D, t = q0 + r;
                const bool in = t < T;
                Qt[d * ATT_PAD + r] = in ? scale * cuda_ld(qp + (int64_t)t * rs + d) : 0.0f;
                dOt[d * ATT_PAD + r] = in ? cuda_ld(gp + (int64_t)t * H * D + d) : 0.0f;
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
                if (p > 0.0f) f = valid && att_dropped(key, mh, T, i, j, p) ? 0.0f : inv_keep;
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
    /* this block is the only writer of these key rows' dK and dV: stored, not added to */
#pragma unroll
    for (int r = 0; r < ATT_RW; r++) {
        const int j = k0 + warp * ATT_RW + r;
        if (j >= T) continue;
        scalar_t *dkp = dqkv + ((int64_t)b * T + j) * rs + att_k_col(g, hpg, D), *dvp = dkp + D;
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) {
                cuda_st(dkp + d, dk[r][k]);
                cuda_st(dvp + d, dv[r][k]);
            }
        }
    }
}

/* dQ of one query tile of head h: grid (B*H, ceil(T/32)), last tiles first. Warp rows are queries i,
 * lanes keys j of the current key tile: dQ_i = scale * sum_j P (dPd f - delta_i) K_j. */
template <typename scalar_t, int DV>
__global__ void __launch_bounds__(ATT_THREADS)
    att_backward_dq_kernel(scalar_t *dqkv, const scalar_t *dout, const scalar_t *qkv, const float *lse,
                           const float *delta, int T, int H, int G, int D, float scale, float p, float inv_keep,
                           uint64_t key, int h0, int HT) {
    CUDA_DYNAMIC_SMEM(float, att_smem);
    float *Qs = att_smem;              /* [32][D] query rows * scale */
    float *dOs = Qs + ATT_TILE * D;    /* [32][D] dout rows */
    float *Kt = dOs + ATT_TILE * D;    /* [D][33] key tile, transposed */
    float *Vt = Kt + D * ATT_PAD;      /* [D][33] value tile, transposed */
    const int hpg = H / G, bh = blockIdx.x, b = bh / H, h = bh % H, g = h / hpg;
    const int64_t mh = (int64_t)b * HT + h0 + h; /* the head's mask row (ops.h) */
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rs = att_row_pitch(H, G, D);
    const scalar_t *qp = qkv + (int64_t)b * T * rs + att_q_col(h, hpg, D);
    const scalar_t *kp = qkv + (int64_t)b * T * rs + att_k_col(g, hpg, D), *vp = kp + D;
    const scalar_t *gp = dout + ((int64_t)b * T * H + h) * D;

    for (int idx = threadIdx.x; idx < ATT_TILE * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx - r * D, t = q0 + r;
        const bool in = t < T;
        Qs[idx] = in ? scale * cuda_ld(qp + (int64_t)t * rs + d) : 0.0f;
        dOs[idx] = in ? cuda_ld(gp + (int64_t)t * H * D + d) : 0.0f;
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
            Kt[d * ATT_PAD + j] = in ? cuda_ld(kp + (int64_t)t * rs + d) : 0.0f;
            Vt[d * ATT_PAD + j] = in ? cuda_ld(vp + (int64_t)t * rs + d) : 0.0f;
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
            if (p > 0.0f) f = valid && att_dropped(key, mh, T, i, j, p) ? 0.0f : inv_keep;
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
        scalar_t *dqp = dqkv + ((int64_t)b * T + i) * rs + att_q_col(h, hpg, D);
#pragma unroll
        for (int k = 0; k < DV; k++) {
            const int d = lane + 32 * k;
            if (d < D) cuda_st(dqp + d, scale * dq[r][k]);
        }
    }
}

/* ---------------- host side ---------------- */

static size_t att_forward_smem(int D) { return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)D * ATT_PAD); }
static size_t att_dkv_smem(int D) {
    return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)2 * D * ATT_PAD + 2 * ATT_TILE);
}
static size_t att_dq_smem(int D) { return sizeof(float) * ((size_t)2 * ATT_TILE * D + (size_t)2 * D * ATT_PAD); }

static bool att_shape_ok(int B, int T, int H, int G, int D, float p, const char *op) {
    if (H <= 0 || G <= 0 || H % G != 0 || D < 1 || D > ATT_MAX_D || !(p >= 0.0f && p < 1.0f) ||
        (T + ATT_TILE - 1) / ATT_TILE > 65535) {
        cuda_record(op, "unsupported shape B=%d T=%d H=%d G=%d D=%d dropout %g (H a multiple of G, 1 <= D <= %d, "
                        "0 <= p < 1, T <= %d)", B, T, H, G, D, (double)p, ATT_MAX_D, 65535 * ATT_TILE);
        return false;
    }
    return true;
}

template <typename T, int DV>
static void att_forward_launch(T *out, float *lse, const T *qkv, int B, int T_, int H, int G, int D, float p,
                               uint64_t key, int h0, int HT) {
    void (*const kernel)(T *, float *, const T *, int, int, int, int, float, float, float, uint64_t, int, int) =
        att_forward_kernel<T, DV>;
    const size_t smem = att_forward_smem(D);
    if (!att_smem_ok((const void *)kernel, smem, "attention_forward")) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const dim3 grid((unsigned)(B * H), (unsigned)((T_ + ATT_TILE - 1) / ATT_TILE));
    CUDA_LAUNCH(kernel, grid, ATT_THREADS, smem)(out, lse, qkv, T_, H, G, D, scale, p, inv_keep, key, h0, HT);
    cuda_check("attention_forward");
}

/* delta[b, h, t] = dout . out in scratch (NULL, error recorded, when out of memory). */
template <typename T>
static float *att_delta(const T *dout, const T *out, int B, int T_, int H, int D, const char *op) {
    const int64_t rows = (int64_t)B * T_ * H;
    float *delta = (float *)cuda_scratch(sizeof(float) * (size_t)rows, op);
    if (!delta) return NULL;
    CUDA_LAUNCH(att_delta_kernel<T>, cuda_blocks(rows, ATT_WARPS), ATT_THREADS, 0)(delta, dout, out, rows, T_, H, D);
    return delta;
}

template <typename T, int DV>
static void att_backward_launch(T *dqkv, const T *dout, const T *qkv, const T *out, const float *lse, int B, int T_,
                                int H, int G, int D, float p, uint64_t key, int h0, int HT) {
    const char *op = "attention_backward";
    void (*const dkv_kernel)(T *, const T *, const T *, const float *, const float *, int, int, int, int, float,
                             float, float, uint64_t, int, int) = att_backward_dkv_kernel<T, DV>;
    void (*const dq_kernel)(T *, const T *, const T *, const float *, const float *, int, int, int, int, float,
                            float, float, uint64_t, int, int) = att_backward_dq_kernel<T, DV>;
    const size_t smem_kv = att_dkv_smem(D), smem_q = att_dq_smem(D);
    if (!att_smem_ok((const void *)dkv_kernel, smem_kv, op) || !att_smem_ok((const void *)dq_kernel, smem_q, op))
        return;
    float *delta = att_delta(dout, out, B, T_, H, D, op);
    if (!delta) return;
    const float scale = 1.0f / sqrtf((float)D), inv_keep = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const unsigned ntiles = (unsigned)((T_ + ATT_TILE - 1) / ATT_TILE);
    CUDA_LAUNCH(dkv_kernel, dim3((unsigned)(B * G), ntiles), ATT_THREADS, smem_kv)(
        dqkv, dout, qkv, lse, delta, T_, H, G, D, scale, p, inv_keep, key, h0, HT);
    CUDA_LAUNCH(dq_kernel, dim3((unsigned)(B * H), ntiles), ATT_THREADS, smem_q)(
        dqkv, dout, qkv, lse, delta, T_, H, G, D, scale, p, inv_keep, key, h0, HT);
    cuda_check(op);
    cuda_release(delta, sizeof(float) * (size_t)B * T_ * H);
}

/* The bf16 table's default: tensor cores (attention_tc.cu). Not for float, whose table is the checking mode. */
template <typename T>
static bool att_use_tc(void) {
    return std::is_same<T, __nv_bfloat16>::value && cuda_ctx.attention_tc;
}

template <typename T>
static void att_attention_forward(void *out_, float *lse, const void *qkv_, int B, int T_, int H, int G, int D,
                                  float dropout_p, uint64_t dropout_key, int h0, int HT) {
    if (B <= 0 || T_ <= 0) return;
    if (!att_shape_ok(B, T_, H, G, D, dropout_p, "attention_forward")) return;
    T *out = (T *)out_;
    const T *qkv = (const T *)qkv_;
    if (att_use_tc<T>()) {
        cuda_attention_tc_forward((__nv_bfloat16 *)out_, lse, (const __nv_bfloat16 *)qkv_, B, T_, H, G, D, dropout_p,
                                  dropout_key, h0, HT);
        return;
    }
    switch ((D + 31) / 32) { /* output dims per lane */
    case 1: att_forward_launch<T, 1>(out, lse, qkv, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    case 2: att_forward_launch<T, 2>(out, lse, qkv, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    case 3: att_forward_launch<T, 3>(out, lse, qkv, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    default: att_forward_launch<T, 4>(out, lse, qkv, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    }
}

template <typename T>
static void att_attention_backward(void *dqkv_, const void *dout_, const void *qkv_, const void *out_,
                                   const float *lse, int B, int T_, int H, int G, int D, float dropout_p,
                                   uint64_t dropout_key, int h0, int HT) {
    if (B <= 0 || T_ <= 0) return;
    if (!att_shape_ok(B, T_, H, G, D, dropout_p, "attention_backward")) return;
    T *dqkv = (T *)dqkv_;
    const T *dout = (const T *)dout_, *qkv = (const T *)qkv_, *out = (const T *)out_;
    if (att_use_tc<T>()) {
        const char *op = "attention_backward";
        float *delta = att_delta(dout, out, B, T_, H, D, op);
        if (!delta) return;
        cuda_attention_tc_backward((__nv_bfloat16 *)dqkv_, (const __nv_bfloat16 *)dout_, (const __nv_bfloat16 *)qkv_,
                                   lse, delta, B, T_, H, G, D, dropout_p, dropout_key, h0, HT);
        cuda_release(delta, sizeof(float) * (size_t)B * T_ * H);
        return;
    }
    switch ((D + 31) / 32) {
    case 1: att_backward_launch<T, 1>(dqkv, dout, qkv, out, lse, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    case 2: att_backward_launch<T, 2>(dqkv, dout, qkv, out, lse, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    case 3: att_backward_launch<T, 3>(dqkv, dout, qkv, out, lse, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    default: att_backward_launch<T, 4>(dqkv, dout, qkv, out, lse, B, T_, H, G, D, dropout_p, dropout_key, h0, HT); break;
    }
}

void cuda_attention_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, attention_forward, att_attention_forward);
    CUDA_SET_OP(f32, bf16, attention_backward, att_attention_backward);
}

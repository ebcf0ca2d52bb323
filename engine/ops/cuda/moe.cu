// Mixture of experts: the combine of the experts' outputs y [M, C] into the tokens' rows, weighted by the
// routing probabilities (ops.h, lt_moe_combine_forward / _backward). One warp per row, as the norms: the
// forward per token (its k slots summed in fp32, in order of j, rounded once), the backward per y row,
// which finds the one slot naming it through an inverse map built first, so every dy row (the padding's
// included) is written exactly once, with no zeroing pass and no atomics. Rows move as 16-byte packs when
// C is a whole number of packs and the pointers are 16-byte aligned.
#include "engine/ops/cuda/internal.cuh"

#define MOE_ROWS_PER_BLOCK 8 /* warps per block, one row each */

/* out[n, :] = sum_j weights[n, j] y[rows[n, j], :] over the slots with a row (W as in norm.cu). */
template <typename scalar_t, int W>
__global__ void moe_combine_forward_kernel(scalar_t *out, const scalar_t *y, const int32_t *rows,
                                           const float *weights, int N, int k, int C) {
    const int n = blockIdx.x * MOE_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;
    for (int c = lane * W; c < C; c += 32 * W) {
        float acc[W];
#pragma unroll
        for (int q = 0; q < W; q++) acc[q] = 0.0f;
        for (int j = 0; j < k; j++) {
            const int32_t r = rows[(int64_t)n * k + j];
            if (r < 0) continue; /* an empty slot: its weight is not read */
            const float w = weights[(int64_t)n * k + j];
            const cuda_pack<scalar_t, W> yv = cuda_ldp<W>(y + (int64_t)r * C + c);
#pragma unroll
            for (int q = 0; q < W; q++) acc[q] += w * cuda_ld(&yv.x[q]);
        }
        cuda_pack<scalar_t, W> o;
#pragma unroll
        for (int q = 0; q < W; q++) cuda_st(&o.x[q], acc[q]);
        cuda_stp<W>(out + (int64_t)n * C + c, o);
    }
}

/* inv[rows[i]] = i + 1 (0: a row no slot names, inv zeroed before); an empty slot's dweight is 0 here. */
__global__ void moe_inverse_kernel(int32_t *inv, float *dweights, const int32_t *rows, int64_t nk) {
    CUDA_FOR(i, nk) {
        const int32_t r = rows[i];
        if (r >= 0) inv[r] = (int32_t)(i + 1);
        else dweights[i] = 0.0f;
    }
}

/* Row m of dy: weights[i] dout[n] for the slot i = n k + j naming it, else zeros; dweights[i] = dout[n] . y[m]. */
template <typename scalar_t, int W>
__global__ void moe_combine_backward_kernel(scalar_t *dy, float *dweights, const scalar_t *dout, const scalar_t *y,
                                            const int32_t *inv, const float *weights, int k, int M, int C) {
    const int m = blockIdx.x * MOE_ROWS_PER_BLOCK + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (m >= M) return; /* whole warps leave; no __syncthreads */
    const int32_t s = inv[m];
    scalar_t *d = dy + (int64_t)m * C;
    if (s == 0) {
        cuda_pack<scalar_t, W> z;
#pragma unroll
        for (int q = 0; q < W; q++) cuda_st(&z.x[q], 0.0f);
        for (int c = lane * W; c < C; c += 32 * W) cuda_stp<W>(d + c, z);
        return;
    }
    const int64_t i = s - 1, n = i / k;
    const float w = weights[i];
    const scalar_t *g = dout + n * C, *yr = y + (int64_t)m * C;
    float dot = 0.0f;
    for (int c = lane * W; c < C; c += 32 * W) {
        const cuda_pack<scalar_t, W> gv = cuda_ldp<W>(g + c), yv = cuda_ldp<W>(yr + c);
        cuda_pack<scalar_t, W> dv;
#pragma unroll
        for (int q = 0; q < W; q++) {
            const float gq = cuda_ld(&gv.x[q]);
            cuda_st(&dv.x[q], w * gq);
            dot += gq * cuda_ld(&yv.x[q]);
        }
        cuda_stp<W>(d + c, dv);
    }
    dot = cuda_warp_sum(dot);
    if (lane == 0) dweights[i] = dot;
}

template <typename T>
static void moe_combine_forward(void *out, const void *y, const int32_t *rows, const float *weights, int N, int k,
                                int C) {
    if (N <= 0 || C <= 0) return;
    const unsigned blocks = (unsigned)((N + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK);
    constexpr int V = CUDA_VEC(T);
    if (C % V == 0 && cuda_aligned16(out, y))
        CUDA_LAUNCH((moe_combine_forward_kernel<T, V>), blocks, 32 * MOE_ROWS_PER_BLOCK, 0)(
            (T *)out, (const T *)y, rows, weights, N, k, C);
    else
        CUDA_LAUNCH((moe_combine_forward_kernel<T, 1>), blocks, 32 * MOE_ROWS_PER_BLOCK, 0)(
            (T *)out, (const T *)y, rows, weights, N, k, C);
    cuda_check("moe_combine_forward");
}

template <typename T>
static void moe_combine_backward(void *dy, float *dweights, const void *dout, const void *y, const int32_t *rows,
                                 const float *weights, int N, int k, int M, int C) {
    const int64_t nk = (int64_t)N * k;
    if (M <= 0 || C <= 0) { /* no y rows: only the empty slots' dweights to write (every slot is empty) */
        if (nk > 0) cuda_memzero(dweights, sizeof(float) * (size_t)nk);
        return;
    }
    int32_t *inv = (int32_t *)cuda_scratch(sizeof(int32_t) * (size_t)M, "moe_combine_backward");
    if (!inv) return;
    cuda_memzero(inv, sizeof(int32_t) * (size_t)M);
    if (nk > 0)
        CUDA_LAUNCH(moe_inverse_kernel, cuda_blocks(nk, CUDA_THREADS), CUDA_THREADS, 0)(inv, dweights, rows, nk);
    const unsigned blocks = (unsigned)((M + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK);
    constexpr int V = CUDA_VEC(T);
    if (C % V == 0 && cuda_aligned16(dy, dout, y))
        CUDA_LAUNCH((moe_combine_backward_kernel<T, V>), blocks, 32 * MOE_ROWS_PER_BLOCK, 0)(
            (T *)dy, dweights, (const T *)dout, (const T *)y, inv, weights, k, M, C);
    else
        CUDA_LAUNCH((moe_combine_backward_kernel<T, 1>), blocks, 32 * MOE_ROWS_PER_BLOCK, 0)(
            (T *)dy, dweights, (const T *)dout, (const T *)y, inv, weights, k, M, C);
    cuda_release(inv, sizeof(int32_t) * (size_t)M);
    cuda_check("moe_combine_backward");
}

void cuda_moe_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, moe_combine_forward, moe_combine_forward);
    CUDA_SET_OP(f32, bf16, moe_combine_backward, moe_combine_backward);
}

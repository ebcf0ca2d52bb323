// Token and learned position embeddings, forward and backward. Activations and tables are float or
// bf16 (a bf16 forward is a copy, or an fp32 add rounded once); the gradients dtable and dwpe are fp32.
// The forwards move 16-byte packs when C is a whole number of packs and the pointers are aligned.
#include "engine/ops/cuda/internal.cuh"

/* out[n, c] = table[ids[n], c], W elements of a row per thread (W > 1: C % W == 0 and both pointers
 * 16-byte aligned; each element still goes through cuda_ld / cuda_st, as with W = 1). */
template <typename scalar_t, int W>
__global__ void emb_forward_kernel(scalar_t *out, const int32_t *ids, const scalar_t *table, int64_t nc, int C) {
    CUDA_FOR(j, nc / W) {
        const int64_t i = j * W, n = i / C, c = i - n * C;
        const cuda_pack<scalar_t, W> src = cuda_ldp<W>(table + (int64_t)ids[n] * C + c);
        cuda_pack<scalar_t, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) cuda_st(&y.x[k], cuda_ld(&src.x[k]));
        cuda_stp<W>(out + i, y);
    }
}

/* dtable[ids[n], c] += dout[n, c]. Repeated ids add with atomics, so the sum order of a repeated row
 * (and its last bits) varies from run to run: NOT bit-deterministic, unlike the CPU op. */
template <typename scalar_t>
__global__ void emb_backward_kernel(float *dtable, const scalar_t *dout, const int32_t *ids, int64_t nc, int C) {
    CUDA_FOR(i, nc) {
        const int64_t n = i / C, c = i - n * C;
        atomicAdd(dtable + (int64_t)ids[n] * C + c, cuda_ld(dout + i));
    }
}

/* out[b, t, c] += wpe[p(t), c], p(t) = pos ? pos[t] : t (global positions, context parallelism); W
 * elements per thread as in emb_forward_kernel. */
template <typename scalar_t, int W>
__global__ void emb_pos_forward_kernel(scalar_t *out, const scalar_t *wpe, int64_t btc, int T, int C,
                                       const int32_t *pos) {
    CUDA_FOR(j, btc / W) {
        const int64_t i = j * W, bt = i / C, c = i - bt * C, t = bt % T, row = pos ? pos[t] : t;
        cuda_pack<scalar_t, W> y = cuda_ldp<W>(out + i);
        const cuda_pack<scalar_t, W> w = cuda_ldp<W>(wpe + row * C + c);
#pragma unroll
        for (int k = 0; k < W; k++) cuda_st(&y.x[k], cuda_ld(&y.x[k]) + cuda_ld(&w.x[k]));
        cuda_stp<W>(out + i, y);
    }
}

/* dwpe[p(t), c] (fp32) += sum_b dout[b, t, c]: one thread per (t, c) adds b = 0, 1, ... in order, onto
 * the existing value, exactly as the CPU loop does (deterministic, and bit-equal to it; the positions of
 * a call are distinct, so no two threads share a row). */
template <typename scalar_t>
__global__ void emb_pos_backward_kernel(float *dwpe, const scalar_t *dout, int B, int64_t tc, int C,
                                        const int32_t *pos) {
    CUDA_FOR(i, tc) {
        const int64_t t = i / C, c = i - t * C;
        float *d = dwpe + (pos ? (int64_t)pos[t] : t) * C + c;
        float acc = *d;
        for (int b = 0; b < B; b++) acc += cuda_ld(dout + (int64_t)b * tc + i);
        *d = acc;
    }
}

template <typename T>
static void emb_embedding_forward(void *out, const int32_t *ids, const void *table, int N, int C) {
    const int64_t nc = (int64_t)N * C;
    if (nc <= 0) return;
    constexpr int V = CUDA_VEC(T);
    if (C % V == 0 && cuda_aligned16(out, table))
        CUDA_LAUNCH((emb_forward_kernel<T, V>), cuda_blocks(nc / V, CUDA_THREADS), CUDA_THREADS, 0)(
            (T *)out, ids, (const T *)table, nc, C);
    else
        CUDA_LAUNCH((emb_forward_kernel<T, 1>), cuda_blocks(nc, CUDA_THREADS), CUDA_THREADS, 0)(
            (T *)out, ids, (const T *)table, nc, C);
    cuda_check("embedding_forward");
}

template <typename T>
static void emb_embedding_backward(float *dtable, const void *dout, const int32_t *ids, int N, int C) {
    const int64_t nc = (int64_t)N * C;
    if (nc <= 0) return;
    CUDA_LAUNCH(emb_backward_kernel<T>, cuda_blocks(nc, CUDA_THREADS), CUDA_THREADS, 0)(dtable, (const T *)dout,
                                                                                        ids, nc, C);
    cuda_check("embedding_backward");
}

template <typename T>
static void emb_position_embedding_forward(void *out, const void *wpe, int B, int T_, int C, const int32_t *pos) {
    const int64_t btc = (int64_t)B * T_ * C;
    if (btc <= 0) return;
    constexpr int V = CUDA_VEC(T);
    if (C % V == 0 && cuda_aligned16(out, wpe))
        CUDA_LAUNCH((emb_pos_forward_kernel<T, V>), cuda_blocks(btc / V, CUDA_THREADS), CUDA_THREADS, 0)(
            (T *)out, (const T *)wpe, btc, T_, C, pos);
    else
        CUDA_LAUNCH((emb_pos_forward_kernel<T, 1>), cuda_blocks(btc, CUDA_THREADS), CUDA_THREADS, 0)(
            (T *)out, (const T *)wpe, btc, T_, C, pos);
    cuda_check("position_embedding_forward");
}

template <typename T>
static void emb_position_embedding_backward(float *dwpe, const void *dout, int B, int T_, int C, const int32_t *pos) {
    const int64_t tc = (int64_t)T_ * C;
    if (tc <= 0 || B <= 0) return;
    CUDA_LAUNCH(emb_pos_backward_kernel<T>, cuda_blocks(tc, CUDA_THREADS), CUDA_THREADS, 0)(dwpe, (const T *)dout,
                                                                                            B, tc, C, pos);
    cuda_check("position_embedding_backward");
}

void cuda_embedding_ops(lt_ops *f32, lt_ops *bf16) {
    CUDA_SET_OP(f32, bf16, embedding_forward, emb_embedding_forward);
    CUDA_SET_OP(f32, bf16, embedding_backward, emb_embedding_backward);
    CUDA_SET_OP(f32, bf16, position_embedding_forward, emb_position_embedding_forward);
    CUDA_SET_OP(f32, bf16, position_embedding_backward, emb_position_embedding_backward);
}

/* Softmax, GELU, SwiGLU, add and dropout: row- or element-parallel loops whose bodies are plain
 * arithmetic (simd_math.h) so each `omp simd` loop vectorises. */
#include <math.h>
#include <string.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/cpu/simd_math.h"
#include "engine/ops/ops.h"

#define LT_INV_SQRT2 0.70710678118654752f
#define LT_INV_SQRT_2PI 0.39894228040143268f
#define LT_SQRT_2_OVER_PI 0.79788456080286536f
#define LT_GELU_TANH_C 0.044715f

void lt_softmax_forward(float *out, const float *inp, int N, int C) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int c = 0; c < C; c++) m = x[c] > m ? x[c] : m;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) {
            const float e = lt_exp(x[c] - m);
            y[c] = e;
            s += e;
        }
        const float inv = 1.0f / s;
#pragma omp simd
        for (int c = 0; c < C; c++) y[c] *= inv;
    }
}

void lt_softmax_backward(float *dinp, const float *dout, const float *out, int N, int C) {
#pragma omp parallel for schedule(static) if ((int64_t)N * C >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = dout + (size_t)n * C, *y = out + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += g[c] * y[c];
#pragma omp simd
        for (int c = 0; c < C; c++) dx[c] = y[c] * (g[c] - s);
    }
}

void lt_gelu_forward(float *out, const float *inp, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + lt_erf(x * LT_INV_SQRT2));
    }
}

void lt_gelu_backward(float *dinp, const float *dout, const float *inp, int64_t n) {
    /* d/dx x*Phi(x) = Phi(x) + x*phi(x) */
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        const float cdf = 0.5f * (1.0f + lt_erf(x * LT_INV_SQRT2));
        const float pdf = LT_INV_SQRT_2PI * lt_exp(-0.5f * x * x);
        dinp[i] = dout[i] * (cdf + x * pdf);
    }
}

/* tanh through lt_exp, so the loops vectorise: 1 - 2 / (e^2u + 1), exact at +-inf. */
static inline float lt_tanh(float u) { return 1.0f - 2.0f / (lt_exp(2.0f * u) + 1.0f); }

void lt_gelu_tanh_forward(float *out, const float *inp, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + lt_tanh(LT_SQRT_2_OVER_PI * (x + LT_GELU_TANH_C * x * x * x)));
    }
}

void lt_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, int64_t n) {
    /* d/dx 0.5 x (1 + t), t = tanh(u(x)): 0.5 (1 + t) + 0.5 x (1 - t^2) u'(x) */
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        const float t = lt_tanh(LT_SQRT_2_OVER_PI * (x + LT_GELU_TANH_C * x * x * x));
        const float du = LT_SQRT_2_OVER_PI * (1.0f + 3.0f * LT_GELU_TANH_C * x * x);
        dinp[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
    }
}

void lt_swiglu_forward(float *out, const float *inp, int N, int F) {
#pragma omp parallel for schedule(static) if ((int64_t)N * F >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *a = inp + (size_t)n * 2 * F, *b = a + F;
        float *y = out + (size_t)n * F;
#pragma omp simd
        for (int f = 0; f < F; f++) y[f] = a[f] / (1.0f + lt_exp(-a[f])) * b[f];
    }
}

void lt_swiglu_backward(float *dinp, const float *dout, const float *inp, int N, int F) {
    /* silu'(a) = s * (1 + a * (1 - s)), s = sigmoid(a) */
#pragma omp parallel for schedule(static) if ((int64_t)N * F >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *a = inp + (size_t)n * 2 * F, *b = a + F, *g = dout + (size_t)n * F;
        float *da = dinp + (size_t)n * 2 * F, *db = da + F;
#pragma omp simd
        for (int f = 0; f < F; f++) {
            const float s = 1.0f / (1.0f + lt_exp(-a[f]));
            da[f] = g[f] * b[f] * s * (1.0f + a[f] * (1.0f - s));
            db[f] = g[f] * a[f] * s;
        }
    }
}

void lt_add_forward(float *out, const float *a, const float *b, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void lt_add_backward(float *da, float *db, const float *dout, int64_t n) {
    if (da) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
        for (int64_t i = 0; i < n; i++) da[i] += dout[i];
    }
    if (db) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
        for (int64_t i = 0; i < n; i++) db[i] += dout[i];
    }
}

/* Masks are drawn a chunk at a time into a stack buffer (lt_uniform_fill), then applied. */
#define LT_DROP_CHUNK 1024

void lt_dropout_forward(float *out, const float *inp, int64_t n, float p, uint64_t key, uint64_t first) {
    if (p <= 0.0f) {
        if (out != inp) memcpy(out, inp, sizeof(float) * (size_t)n);
        return;
    }
    const float scale = 1.0f / (1.0f - p);
    const int64_t nchunk = (n + LT_DROP_CHUNK - 1) / LT_DROP_CHUNK;
#pragma omp parallel for schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        float u[LT_DROP_CHUNK];
        const int64_t i0 = ch * LT_DROP_CHUNK;
        const int len = n - i0 < LT_DROP_CHUNK ? (int)(n - i0) : LT_DROP_CHUNK;
        lt_uniform_fill(u, key, first + (uint64_t)i0, len);
        const float *x = inp + i0;
        float *y = out + i0;
#pragma omp simd
        for (int i = 0; i < len; i++) y[i] = u[i] < p ? 0.0f : x[i] * scale;
    }
}

void lt_dropout_backward(float *dinp, const float *dout, int64_t n, float p, uint64_t key, uint64_t first) {
    if (p <= 0.0f) {
        if (dinp != dout) memcpy(dinp, dout, sizeof(float) * (size_t)n);
        return;
    }
    const float scale = 1.0f / (1.0f - p);
    const int64_t nchunk = (n + LT_DROP_CHUNK - 1) / LT_DROP_CHUNK;
#pragma omp parallel for schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t ch = 0; ch < nchunk; ch++) {
        float u[LT_DROP_CHUNK];
        const int64_t i0 = ch * LT_DROP_CHUNK;
        const int len = n - i0 < LT_DROP_CHUNK ? (int)(n - i0) : LT_DROP_CHUNK;
        lt_uniform_fill(u, key, first + (uint64_t)i0, len);
        const float *g = dout + i0;
        float *dx = dinp + i0;
#pragma omp simd
        for (int i = 0; i < len; i++) dx[i] = u[i] < p ? 0.0f : g[i] * scale;
    }
}

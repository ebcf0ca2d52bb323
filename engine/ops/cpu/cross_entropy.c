/* Fused softmax cross-entropy over a vocabulary row. Only the per-row log-sum-exp is saved;
 * backward recomputes softmax from it and may overwrite the logits with their gradient. */
#include <math.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/cpu/simd_math.h"
#include "engine/ops/ops.h"

void lt_cross_entropy_forward(float *losses, float *lse, const float *logits, const int32_t *targets, int N, int V) {
#pragma omp parallel for schedule(static) if ((int64_t)N * V >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int v = 0; v < V; v++) m = x[v] > m ? x[v] : m;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int v = 0; v < V; v++) s += lt_exp(x[v] - m);
        const float l = m + logf(s);
        lse[n] = l;
        const int32_t t = targets[n];
        losses[n] = t >= 0 && t < V ? l - x[t] : 0.0f;
    }
}

void lt_cross_entropy_backward(float *dlogits, const float *logits, const float *lse, const int32_t *targets,
                               const float *dloss, int N, int V) {
#pragma omp parallel for schedule(static) if ((int64_t)N * V >= LT_PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *dx = dlogits + (size_t)n * V;
        const int32_t t = targets[n];
        if (t < 0) {
            for (int v = 0; v < V; v++) dx[v] = 0.0f;
            continue;
        }
        const float l = lse[n], g = dloss[n];
        /* element by element, so dlogits may be the logits buffer itself */
#pragma omp simd
        for (int v = 0; v < V; v++) dx[v] = lt_exp(x[v] - l) * g;
        if (t < V) dx[t] -= g;
    }
}

/* Optimizer kernels: elementwise over a flat parameter buffer. */
#include <math.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

void lt_adamw_update(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    /* torch.optim.AdamW (single-tensor path): decay, lerp the first moment, bias-corrected step. */
    const double bc1 = 1.0 - pow((double)beta1, (double)step);
    const double bc2 = 1.0 - pow((double)beta2, (double)step);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float decay = 1.0f - lr * weight_decay;
    const float one_m_b1 = 1.0f - beta1, one_m_b2 = 1.0f - beta2;
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float g = grad[i];
        const float m = exp_avg[i] + one_m_b1 * (g - exp_avg[i]);
        const float v = exp_avg_sq[i] * beta2 + one_m_b2 * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = param[i] * decay - step_size * (m / (sqrtf(v) / bc2_sqrt + eps));
    }
}

void lt_sgd_update(float *param, const float *grad, float *momentum_buf, int64_t n, float lr, float momentum,
                   float weight_decay) {
    if (momentum == 0.0f) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
        for (int64_t i = 0; i < n; i++) param[i] -= lr * (grad[i] + weight_decay * param[i]);
        return;
    }
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float b = momentum * momentum_buf[i] + grad[i] + weight_decay * param[i];
        momentum_buf[i] = b;
        param[i] -= lr * b;
    }
}

double lt_sum_squares(const float *x, int64_t n) {
    double s = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

void lt_scale(float *x, int64_t n, float s) {
#pragma omp parallel for simd schedule(static) if (n >= LT_PAR_MIN)
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

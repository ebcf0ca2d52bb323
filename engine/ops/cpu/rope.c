/* Rotary position embedding ("rotate half") on the query and key heads of a fused qkv buffer.
 * cos/sin depend only on (t, i): computed once per position and reused for every batch row and head. */
#include <math.h>
#include <stdlib.h>

#include "engine/ops/cpu/parallel.h"
#include "engine/ops/ops.h"

/* sign = +1 rotates by +angle (forward), -1 by -angle (backward: the transpose of a rotation).
 * Row t rotates by its position pos[t] (global, under context parallelism), or t without pos. */
static void lt_rope_apply(float *x, int B, int T, int H, int G, int D, float base, float sign, const int32_t *pos) {
    const int half = D / 2, hpg = H / G, heads = H + 2 * G;
    float *inv_freq = malloc(sizeof(float) * (size_t)half);
    if (!inv_freq) abort();
    /* Megatron/HF: inv_freq = 1 / base^(2i/D) in fp32, angle = t * inv_freq in fp32 */
    for (int i = 0; i < half; i++) inv_freq[i] = (float)(1.0 / pow((double)base, (double)(2 * i) / D));
#pragma omp parallel if ((int64_t)B * T * (H + 2 * G) * D >= LT_PAR_MIN)
    {
        float *cs = malloc(sizeof(float) * (size_t)D);
        if (!cs) abort();
        float *sn = cs + half;
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            for (int i = 0; i < half; i++) {
                const float a = (float)(pos ? pos[t] : t) * inv_freq[i];
                cs[i] = cosf(a);
                sn[i] = sign * sinf(a);
            }
            for (int b = 0; b < B; b++) {
                float *row = x + ((size_t)b * T + t) * heads * D;
                for (int g = 0; g < G; g++)
                    for (int j = 0; j <= hpg; j++) { /* hpg query heads then the key head; value untouched */
                        float *x1 = row + (size_t)(g * (hpg + 2) + j) * D, *x2 = x1 + half;
#pragma omp simd
                        for (int i = 0; i < half; i++) {
                            const float a1 = x1[i], a2 = x2[i];
                            x1[i] = a1 * cs[i] - a2 * sn[i];
                            x2[i] = a2 * cs[i] + a1 * sn[i];
                        }
                    }
            }
        }
        free(cs);
    }
    free(inv_freq);
}

void lt_rope_forward(float *qkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    lt_rope_apply(qkv, B, T, H, G, D, base, 1.0f, pos);
}

void lt_rope_backward(float *dqkv, int B, int T, int H, int G, int D, float base, const int32_t *pos) {
    lt_rope_apply(dqkv, B, T, H, G, D, base, -1.0f, pos);
}

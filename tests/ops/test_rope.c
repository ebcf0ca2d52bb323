/* Rotary embedding on fused qkv: forward vs a naive double reference (query and key heads rotated,
 * value heads untouched), backward vs finite differences, backward(forward(x)) == x. */
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

typedef struct {
    int B, T, H, G, D;
    float base;
    float *x, *work, *R;
} ctx_t;

static size_t numel(const ctx_t *c) { return (size_t)c->B * c->T * (c->H + 2 * c->G) * c->D; }

static double loss(void *p) {
    ctx_t *c = p;
    memcpy(c->work, c->x, numel(c) * sizeof(float));
    lt_rope_forward(c->work, c->B, c->T, c->H, c->G, c->D, c->base);
    return tu_dot(c->work, c->R, numel(c));
}

static void check(const char *name, int B, int T, int H, int G, int D, float base, int fd) {
    ctx_t c = {B, T, H, G, D, base, NULL, NULL, NULL};
    const size_t n = numel(&c);
    c.x = tu_new_randn(n, 1.0f), c.work = tu_alloc(n), c.R = tu_new_randn(n, 1.0f);
    loss(&c);
    const int hpg = H / G, half = D / 2;
    double maxd = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++)
                for (int j = 0; j < hpg + 2; j++) {
                    const size_t o = (((size_t)b * T + t) * (H + 2 * G) + g * (hpg + 2) + j) * D;
                    for (int i = 0; i < half; i++) {
                        double y1 = c.x[o + i], y2 = c.x[o + i + half];
                        if (j <= hpg) { /* query heads and the key head */
                            const double a = t * pow(base, -2.0 * i / D), x1 = y1, x2 = y2;
                            y1 = x1 * cos(a) - x2 * sin(a);
                            y2 = x2 * cos(a) + x1 * sin(a);
                        }
                        double d = fmax(fabs(y1 - c.work[o + i]), fabs(y2 - c.work[o + i + half]));
                        if (d > maxd) maxd = d;
                    }
                }
    TAP_CHECK(maxd < 2e-5, "%s: forward vs naive, values untouched (max diff %.2e)", name, maxd);
    /* backward is a transpose: apply to R (= dout), compare with finite differences */
    float *g = tu_copy(c.R, n);
    lt_rope_backward(g, B, T, H, G, D, base);
    float *zero = tu_alloc(n);
    if (fd) tu_check_fd(name, g, zero, c.x, n, 1e-2f, loss, &c, 5e-4);
    /* rotation then its inverse gives back the input */
    float *y = tu_copy(c.x, n);
    lt_rope_forward(y, B, T, H, G, D, base);
    lt_rope_backward(y, B, T, H, G, D, base);
    double e = tu_max_abs_diff(y, c.x, n);
    TAP_CHECK(e < 1e-5, "%s: backward(forward(x)) == x (max diff %.2e)", name, e);
    free(c.x), free(c.work), free(c.R), free(g), free(zero), free(y);
}

int main(void) {
    check("rope MHA B2 T9 H2 G2 D8", 2, 9, 2, 2, 8, 10000.0f, 1);
    check("rope GQA B1 T13 H4 G2 D6", 1, 13, 4, 2, 6, 500.0f, 1);
    check("rope MQA B2 T40 H3 G1 D4", 2, 40, 3, 1, 4, 10000.0f, 1);
    check("rope GQA B4 T64 H4 G2 D16 (threaded)", 4, 64, 4, 2, 16, 10000.0f, 0);
    return tap_done();
}

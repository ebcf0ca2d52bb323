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
    lt_rope_forward(c->work, c->B, c->T, c->H, c->G, c->D, c->base, NULL);
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
    lt_rope_backward(g, B, T, H, G, D, base, NULL);
    float *zero = tu_alloc(n);
    if (fd) tu_check_fd(name, g, zero, c.x, n, 1e-2f, loss, &c, 5e-4);
    /* rotation then its inverse gives back the input */
    float *y = tu_copy(c.x, n);
    lt_rope_forward(y, B, T, H, G, D, base, NULL);
    lt_rope_backward(y, B, T, H, G, D, base, NULL);
    double e = tu_max_abs_diff(y, c.x, n);
    TAP_CHECK(e < 1e-5, "%s: backward(forward(x)) == x (max diff %.2e)", name, e);
    free(c.x), free(c.work), free(c.R), free(g), free(zero), free(y);
}

/* Context parallelism: the T = 2L local rows of rank r of CP (chunks r and 2CP-1-r of L tokens of a
 * sequence of S = 2 CP L) at their global positions pos give bit for bit the rows of the whole sequence
 * rotated without pos, forward and backward; pos off by one (a broken position) must show. */
static void check_positions(const char *name, int B, int CP, int L, int H, int G, int D, float base) {
    const int S = 2 * CP * L, T = 2 * L, rw = (H + 2 * G) * D;
    const size_t nf = (size_t)B * S * rw, nl = (size_t)B * T * rw;
    float *full = tu_new_randn(nf, 1.0f), *gfull = tu_new_randn(nf, 1.0f), *x = tu_alloc(nl), *g = tu_alloc(nl);
    float *fx = tu_copy(full, nf), *fg = tu_copy(gfull, nf);
    int32_t *pos = malloc(sizeof(int32_t) * T);
    lt_rope_forward(fx, B, S, H, G, D, base, NULL);
    lt_rope_backward(fg, B, S, H, G, D, base, NULL);
    int exact_f = 1, exact_b = 1;
    for (int r = 0; r < CP; r++) {
        for (int t = 0; t < T; t++) pos[t] = t < L ? r * L + t : (2 * CP - 1 - r) * L + t - L;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                memcpy(x + ((size_t)b * T + t) * rw, full + ((size_t)b * S + pos[t]) * rw, sizeof(float) * rw);
                memcpy(g + ((size_t)b * T + t) * rw, gfull + ((size_t)b * S + pos[t]) * rw, sizeof(float) * rw);
            }
        lt_rope_forward(x, B, T, H, G, D, base, pos);
        lt_rope_backward(g, B, T, H, G, D, base, pos);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                exact_f &= !memcmp(x + ((size_t)b * T + t) * rw, fx + ((size_t)b * S + pos[t]) * rw, sizeof(float) * rw);
                exact_b &= !memcmp(g + ((size_t)b * T + t) * rw, fg + ((size_t)b * S + pos[t]) * rw, sizeof(float) * rw);
            }
    }
    TAP_CHECK(exact_f && exact_b, "%s: every rank's rows at their global positions equal the whole sequence's "
              "(forward %s, backward %s)", name, exact_f ? "bit-identical" : "DIFFERS", exact_b ? "bit-identical" : "DIFFERS");
    /* the last rank again with its positions shifted by one: must differ */
    for (int t = 0; t < T; t++) pos[t] += 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(x + ((size_t)b * T + t) * rw, full + ((size_t)b * S + pos[t] - 1) * rw, sizeof(float) * rw);
    lt_rope_forward(x, B, T, H, G, D, base, pos);
    int same = 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            same &= !memcmp(x + ((size_t)b * T + t) * rw, fx + ((size_t)b * S + pos[t] - 1) * rw, sizeof(float) * rw);
    TAP_CHECK(!same, "%s: positions off by one: the rows differ", name);
    free(full), free(gfull), free(x), free(g), free(fx), free(fg), free(pos);
}

int main(void) {
    check_positions("rope positions CP=2 L=5 GQA B2 H4 G2 D8", 2, 2, 5, 4, 2, 8, 10000.0f);
    check_positions("rope positions CP=4 L=3 MHA B1 H2 G2 D6", 1, 4, 3, 2, 2, 6, 500.0f);
    check("rope MHA B2 T9 H2 G2 D8", 2, 9, 2, 2, 8, 10000.0f, 1);
    check("rope GQA B1 T13 H4 G2 D6", 1, 13, 4, 2, 6, 500.0f, 1);
    check("rope MQA B2 T40 H3 G1 D4", 2, 40, 3, 1, 4, 10000.0f, 1);
    check("rope GQA B4 T64 H4 G2 D16 (threaded)", 4, 64, 4, 2, 16, 10000.0f, 0);
    return tap_done();
}

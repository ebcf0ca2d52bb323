/* Dropout: the inlined mask matches lt_rng_uniform exactly, rate ~ p, kept values scaled by 1/(1-p),
 * reproducible from (key, first), backward uses the same mask (finite differences) and writes dinp over
 * garbage, p = 0 is identity. */
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

enum { NBIG = 200000, NS = 300 };
static const float P = 0.3f;
static const uint64_t KEY = 0xabcdef12345ull, FIRST = 1000003;
static float *x, *y, *R;

static double loss(void *p) {
    (void)p;
    lt_dropout_forward(y, x, NS, P, KEY, FIRST);
    return tu_dot(y, R, NS);
}

int main(void) {
    float *in = tu_new_randn(NBIG, 1.0f), *out = tu_alloc(NBIG), *out2 = tu_alloc(NBIG);
    lt_dropout_forward(out, in, NBIG, P, KEY, FIRST);
    size_t dropped = 0, exact = 0;
    for (size_t i = 0; i < NBIG; i++) {
        const int drop = lt_rng_uniform(KEY, FIRST + i) < P;
        dropped += drop;
        exact += drop ? out[i] == 0.0f : out[i] == in[i] * (1.0f / (1.0f - P));
    }
    TAP_CHECK(exact == NBIG,
              "forward: element i dropped iff lt_rng_uniform(key, first + i) < p, kept * 1/(1-p) (%zu/%d)", exact,
              NBIG);
    double rate = (double)dropped / NBIG;
    TAP_CHECK(fabs(rate - P) < 0.005, "drop rate %.4f ~ p = %.2f", rate, P);

    /* counters crossing a 2^32 boundary (the high word of the Philox counter changes mid-block) */
    {
        const uint64_t f2 = (5ull << 32) - 301;
        float *w = tu_alloc(1000);
        lt_dropout_forward(w, in, 1000, P, KEY, f2);
        size_t same = 0;
        for (int i = 0; i < 1000; i++)
            same += w[i] == (lt_rng_uniform(KEY, f2 + i) < P ? 0.0f : in[i] * (1.0f / (1.0f - P)));
        TAP_CHECK(same == 1000, "mask across a 2^32 counter boundary (%zu/1000)", same);
        free(w);
    }
    /* a window starting later in the stream reproduces the same elements */
    lt_dropout_forward(out2, in + 500, NBIG - 500, P, KEY, FIRST + 500);
    TAP_CHECK(memcmp(out2, out + 500, (NBIG - 500) * sizeof(float)) == 0, "mask depends only on (key, first + i)");
    float *inplace = tu_copy(in, NBIG);
    lt_dropout_forward(inplace, inplace, NBIG, P, KEY, FIRST);
    TAP_CHECK(memcmp(inplace, out, NBIG * sizeof(float)) == 0, "forward in place (out == inp)");
    lt_dropout_forward(out2, in, NBIG, P, KEY + 1, FIRST);
    TAP_CHECK(memcmp(out2, out, NBIG * sizeof(float)) != 0, "another key, another mask");

    /* backward: same mask, dinp written over garbage (the same float expression as forward: exact) */
    float *g = tu_new_garbage(NBIG);
    lt_dropout_backward(g, in, NBIG, P, KEY, FIRST);
    TAP_CHECK(memcmp(g, out, NBIG * sizeof(float)) == 0, "backward: dinp = mask * dout / (1-p), written over garbage");
    x = tu_new_randn(NS, 1.0f), y = tu_alloc(NS), R = tu_new_randn(NS, 1.0f);
    float *zero = tu_alloc(NS), *gs = tu_new_garbage(NS);
    lt_dropout_backward(gs, R, NS, P, KEY, FIRST);
    tu_check_fd("dropout dinp (written over garbage)", gs, zero, x, NS, 1e-2f, loss, NULL, 5e-4);

    /* p = 0: identity forward, a plain copy backward */
    lt_dropout_forward(out2, in, NBIG, 0.0f, KEY, FIRST);
    TAP_CHECK(memcmp(out2, in, NBIG * sizeof(float)) == 0, "p = 0 forward is the identity");
    float *g0 = tu_new_garbage(NBIG);
    lt_dropout_backward(g0, in, NBIG, 0.0f, KEY, FIRST);
    TAP_CHECK(memcmp(g0, in, NBIG * sizeof(float)) == 0, "p = 0 backward copies dout over garbage");
    return tap_done();
}

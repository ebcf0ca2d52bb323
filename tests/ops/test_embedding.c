/* Token and position embeddings: forward gathers/adds, backward accumulates (repeated ids summed). */
#include "engine/ops/ops.h"
#include "tests/ops/testutil.h"

enum { V = 11, C = 70, B = 3, T = 5, N = B * T };

static const int32_t ids[N] = {3, 7, 3, 0, 10, 3, 7, 1, 1, 2, 9, 3, 0, 5, 3}; /* 3 repeats five times */
static float *table, *wpe, *out, *R;

static double emb_loss(void *ctx) {
    (void)ctx;
    lt_embedding_forward(out, ids, table, N, C);
    return tu_dot(out, R, (size_t)N * C);
}
static double pos_loss(void *ctx) {
    (void)ctx;
    for (size_t i = 0; i < (size_t)N * C; i++) out[i] = 0.25f * (float)(i % 7);
    lt_position_embedding_forward(out, wpe, B, T, C, NULL);
    return tu_dot(out, R, (size_t)N * C);
}

int main(void) {
    table = tu_new_randn((size_t)V * C, 1.0f), wpe = tu_new_randn((size_t)T * C, 1.0f);
    out = tu_alloc((size_t)N * C), R = tu_new_randn((size_t)N * C, 1.0f);

    lt_embedding_forward(out, ids, table, N, C);
    int ok = 1;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) ok &= out[n * C + c] == table[ids[n] * C + c];
    TAP_CHECK(ok, "embedding forward copies table rows");

    /* backward: exact reference (sum over positions of each id) and finite differences */
    float *pre, *dtable = tu_new_grad((size_t)V * C, &pre);
    lt_embedding_backward(dtable, R, ids, N, C);
    double maxd = 0;
    for (int v = 0; v < V; v++)
        for (int c = 0; c < C; c++) {
            double ref = pre[v * C + c];
            for (int n = 0; n < N; n++)
                if (ids[n] == v) ref += R[n * C + c];
            double d = fabs(ref - dtable[v * C + c]);
            if (d > maxd) maxd = d;
        }
    TAP_CHECK(maxd < 1e-5, "embedding backward accumulates repeated ids (max diff %.2e)", maxd);
    tu_check_fd("embedding dtable", dtable, pre, table, (size_t)V * C, 1e-2f, emb_loss, NULL, 5e-4);

    /* deterministic: a second run from the same prefill is bit-identical */
    float *again = tu_copy(pre, (size_t)V * C);
    lt_embedding_backward(again, R, ids, N, C);
    TAP_CHECK(memcmp(again, dtable, sizeof(float) * V * C) == 0, "embedding backward is deterministic");

    pos_loss(NULL);
    ok = 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                size_t i = ((size_t)b * T + t) * C + c;
                ok &= out[i] == 0.25f * (float)(i % 7) + wpe[t * C + c];
            }
    TAP_CHECK(ok, "position embedding forward adds wpe[t]");
    float *prew, *dwpe = tu_new_grad((size_t)T * C, &prew);
    lt_position_embedding_backward(dwpe, R, B, T, C, NULL);
    tu_check_fd("position embedding dwpe", dwpe, prew, wpe, (size_t)T * C, 1e-2f, pos_loss, NULL, 5e-4);
    /* threaded sizes: column blocks of the table gradient, rows of the position gradient */
    {
        enum { VB = 50, CB = 100, BB = 4, TB = 150, NB = BB * TB };
        int32_t *idb = malloc(NB * sizeof(int32_t));
        for (int n = 0; n < NB; n++) idb[n] = (n * 37 + n / 7) % VB;
        float *tb = tu_new_randn((size_t)VB * CB, 1.0f), *ob = tu_alloc((size_t)NB * CB),
              *gb = tu_new_randn((size_t)NB * CB, 1.0f);
        float *pt, *dt = tu_new_grad((size_t)VB * CB, &pt), *pp, *dp = tu_new_grad((size_t)TB * CB, &pp);
        lt_embedding_forward(ob, idb, tb, NB, CB);
        lt_embedding_backward(dt, gb, idb, NB, CB);
        lt_position_embedding_backward(dp, gb, BB, TB, CB, NULL);
        double ef = 0, et = 0, ep = 0;
        double *rt = calloc((size_t)VB * CB, sizeof(double)), *rp = calloc((size_t)TB * CB, sizeof(double));
        for (int n = 0; n < NB; n++)
            for (int c = 0; c < CB; c++) {
                ef = fmax(ef, fabs(ob[(size_t)n * CB + c] - tb[(size_t)idb[n] * CB + c]));
                rt[(size_t)idb[n] * CB + c] += gb[(size_t)n * CB + c];
                rp[(size_t)(n % TB) * CB + c] += gb[(size_t)n * CB + c];
            }
        for (int i = 0; i < VB * CB; i++) et = fmax(et, fabs(pt[i] + rt[i] - dt[i]));
        for (int i = 0; i < TB * CB; i++) ep = fmax(ep, fabs(pp[i] + rp[i] - dp[i]));
        TAP_CHECK(ef == 0 && et < 2e-5 && ep < 1e-5,
                  "threaded %dx%d: forward, embedding and position backward vs double sums (%.1e %.1e %.1e)", NB, CB,
                  ef, et, ep);
    }
    /* context parallelism: rank r of CP holds chunks r and 2CP-1-r of L tokens (S = 2 CP L); with its
     * global positions the forward adds, and the backward accumulates into, exactly the wpe rows the
     * whole sequence would (bit for bit, in the same order); a broken position shows */
    {
        enum { CP = 4, L = 3, S = 2 * CP * L, TL = 2 * L, BC = 2, CC = 40 };
        float *wp = tu_new_randn((size_t)S * CC, 1.0f), *xf = tu_new_randn((size_t)BC * S * CC, 1.0f);
        float *gf = tu_new_randn((size_t)BC * S * CC, 1.0f), *of = tu_copy(xf, (size_t)BC * S * CC);
        float *pre, *dref = tu_new_grad((size_t)S * CC, &pre), *dgot = tu_copy(pre, (size_t)S * CC);
        float *xl = tu_alloc((size_t)BC * TL * CC), *gl = tu_alloc((size_t)BC * TL * CC);
        int32_t pos[TL];
        lt_position_embedding_forward(of, wp, BC, S, CC, NULL);
        lt_position_embedding_backward(dref, gf, BC, S, CC, NULL);
        int fwd = 1, broken_same = 1;
        for (int r = 0; r < CP; r++) {
            for (int t = 0; t < TL; t++) pos[t] = t < L ? r * L + t : (2 * CP - 1 - r) * L + t - L;
            for (int b = 0; b < BC; b++)
                for (int t = 0; t < TL; t++) {
                    memcpy(xl + ((size_t)b * TL + t) * CC, xf + ((size_t)b * S + pos[t]) * CC, sizeof(float) * CC);
                    memcpy(gl + ((size_t)b * TL + t) * CC, gf + ((size_t)b * S + pos[t]) * CC, sizeof(float) * CC);
                }
            lt_position_embedding_forward(xl, wp, BC, TL, CC, pos);
            lt_position_embedding_backward(dgot, gl, BC, TL, CC, pos);
            for (int b = 0; b < BC; b++)
                for (int t = 0; t < TL; t++)
                    fwd &= !memcmp(xl + ((size_t)b * TL + t) * CC, of + ((size_t)b * S + pos[t]) * CC,
                                   sizeof(float) * CC);
            if (r == 1) { /* the same rank with its second chunk's positions swapped for its first's */
                int32_t bad[TL];
                for (int t = 0; t < TL; t++) bad[t] = pos[t % L];
                for (int b = 0; b < BC; b++)
                    for (int t = 0; t < TL; t++)
                        memcpy(xl + ((size_t)b * TL + t) * CC, xf + ((size_t)b * S + pos[t]) * CC, sizeof(float) * CC);
                lt_position_embedding_forward(xl, wp, BC, TL, CC, bad);
                for (int b = 0; b < BC; b++)
                    for (int t = 0; t < TL; t++)
                        broken_same &= !memcmp(xl + ((size_t)b * TL + t) * CC, of + ((size_t)b * S + pos[t]) * CC,
                                               sizeof(float) * CC);
            }
        }
        TAP_CHECK(fwd, "position embedding with positions: every CP rank's rows equal the whole sequence's (bits)");
        TAP_CHECK(!memcmp(dgot, dref, sizeof(float) * S * CC),
                  "position embedding backward with positions: dwpe summed over the CP ranks equals the whole "
                  "sequence's (bits)");
        TAP_CHECK(!broken_same, "position embedding with a broken position: rows differ");
    }
    return tap_done();
}

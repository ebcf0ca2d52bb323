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
    lt_position_embedding_forward(out, wpe, B, T, C);
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
    lt_position_embedding_backward(dwpe, R, B, T, C);
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
        lt_position_embedding_backward(dp, gb, BB, TB, CB);
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
    return tap_done();
}

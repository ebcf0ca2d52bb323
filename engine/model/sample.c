#include "engine/model/sample.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    float logit;
    int id;
} scored;

/* Descending logits, the lower id first on ties (the order greedy picks in). */
static int by_logit(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int argmax(const float *logits, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;
    return best;
}

int lt_sample_token(const float *logits, int V, float temperature, int top_k, float top_p, float u) {
    if (V < 1) return -1;
    if (temperature <= 0.0f || top_k == 1) return argmax(logits, V);
    scored *s = malloc(sizeof *s * (size_t)V);
    if (!s) return argmax(logits, V); /* out of memory: the most likely token rather than none */
    for (int v = 0; v < V; v++) s[v] = (scored){logits[v] / temperature, v};
    qsort(s, (size_t)V, sizeof *s, by_logit);
    int n = top_k > 1 && top_k < V ? top_k : V;
    double total = 0.0;
    for (int i = 0; i < n; i++) total += exp((double)(s[i].logit - s[0].logit));
    if (top_p > 0.0f && top_p < 1.0f) { /* the nucleus: the fewest leading tokens reaching top_p */
        double mass = 0.0;
        int keep = 0;
        while (keep < n && mass < top_p * total) mass += exp((double)(s[keep++].logit - s[0].logit));
        n = keep > 0 ? keep : 1, total = mass > 0.0 ? mass : 1.0;
    }
    double target = (double)u * total, acc = 0.0;
    int id = s[n - 1].id;
    for (int i = 0; i < n; i++) {
        acc += exp((double)(s[i].logit - s[0].logit));
        if (acc > target) {
            id = s[i].id;
            break;
        }
    }
    free(s);
    return id;
}

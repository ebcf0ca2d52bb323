/* Mock data: deterministic per (seed, index), every sample obeys its rule, and the rules
 * make most tokens predictable from the ones before (what lets a small model learn). */
#include <stdint.h>
#include <string.h>

#include "engine/data/gpt_dataset.h"
#include "engine/data/mock.h"
#include "tests/tap.h"

static char err[256];
static int32_t succ[64]; /* the markov permutation, computed once */

/* Predicts t[k] from t[0..k-1] as a model could: the rule each prefix admits. */
static int predict(const int32_t *t, int64_t k, int64_t A) {
    if (k >= 2) {
        int64_t d = ((int64_t)t[k - 1] - t[k - 2] + A) % A;
        int ok = d >= 1 && d <= 4;
        for (int64_t i = 2; ok && i < k; i++) ok = ((int64_t)t[i] - t[i - 1] + A) % A == d;
        if (ok) return (int32_t)((t[k - 1] + d) % A);
    }
    if (k >= 1) {
        int ok = 1;
        for (int64_t i = 1; ok && i < k; i++) ok = succ[t[i - 1]] == t[i];
        if (ok && k >= 2) return succ[t[k - 1]];
    }
    for (int64_t p = 2; p <= 32 && p < k; p++) {
        int ok = 1;
        for (int64_t i = p; ok && i < k; i++) ok = t[i] == t[i - p];
        if (ok) return t[k - p];
    }
    return -1;
}

int main(void) {
    const int64_t V = 50257, L = 129;
    const uint64_t seed = 1234;
    int64_t A = lt_mock_alphabet(V);
    TAP_CHECK(A == 64 && lt_mock_alphabet(10) == 10, "alphabet is min(vocab, 64)");
    for (int32_t x = 0; x < 64; x++) succ[x] = lt_mock_successor(seed, V, x);

    int32_t t[129], u[129];
    int same = 1, differ_seed = 0, differ_split = 0, in_range = 1, rule_holds = 1;
    int count[4] = {0, 0, 0, 0};
    int64_t predicted = 0, total = 0;
    for (int64_t i = 0; i < 2000; i++) {
        int r = lt_mock_sample(seed, LT_SPLIT_TRAIN, V, L, i, t, err, sizeof err);
        same &= lt_mock_sample(seed, LT_SPLIT_TRAIN, V, L, i, u, err, sizeof err) == r && memcmp(t, u, sizeof t) == 0;
        lt_mock_sample(seed + 1, LT_SPLIT_TRAIN, V, L, i, u, err, sizeof err);
        differ_seed |= memcmp(t, u, sizeof t) != 0;
        lt_mock_sample(seed, LT_SPLIT_VALID, V, L, i, u, err, sizeof err);
        differ_split |= memcmp(t, u, sizeof t) != 0;
        if (r < 0 || r > 3) { rule_holds = 0; continue; }
        count[r]++;
        for (int64_t k = 0; k < L; k++) in_range &= t[k] >= 0 && t[k] < A;
        if (r == LT_MOCK_ARITH) {
            int64_t d = ((int64_t)t[1] - t[0] + A) % A;
            rule_holds &= d >= 1 && d <= 4;
            for (int64_t k = 1; k < L; k++) rule_holds &= t[k] == (t[k - 1] + d) % A;
        } else if (r == LT_MOCK_MARKOV) {
            for (int64_t k = 1; k < L; k++) rule_holds &= t[k] == succ[t[k - 1]];
        } else {
            int64_t p = 0; /* smallest period */
            for (int64_t q = 1; q <= 32 && !p; q++) {
                int ok = 1;
                for (int64_t k = q; ok && k < L; k++) ok = t[k] == t[k - q];
                if (ok) p = q;
            }
            /* A random pattern can have a smaller period by chance; allow a divisor. */
            rule_holds &= r == LT_MOCK_REPEAT ? (p >= 1 && p <= 8) : (p >= 1 && p <= 32);
        }
        for (int64_t k = 1; k < L; k++) {
            predicted += predict(t, k, A) == t[k];
            total++;
        }
    }
    TAP_CHECK(same, "same (seed, index) gives the same sample");
    TAP_CHECK(differ_seed, "another seed gives other samples");
    TAP_CHECK(differ_split, "the valid split gives other samples than train");
    TAP_CHECK(in_range, "tokens lie in the alphabet [0, %lld)", (long long)A);
    TAP_CHECK(rule_holds, "every sample follows its rule");
    TAP_CHECK(count[0] > 400 && count[1] > 400 && count[2] > 400 && count[3] > 400,
              "all four rules occur (%d repeat, %d arith, %d copy, %d markov)", count[0], count[1], count[2], count[3]);
    TAP_CHECK(predicted > total * 8 / 10, "%.1f%% of tokens follow from the tokens before them",
              100.0 * (double)predicted / (double)total);
    int perm_ok = 1, hit[64] = {0};
    for (int32_t x = 0; x < 64; x++) {
        int32_t y = succ[x];
        perm_ok &= y >= 0 && y < 64 && !hit[y];
        if (y >= 0 && y < 64) hit[y] = 1;
    }
    TAP_CHECK(perm_ok, "the markov successor is a permutation of the alphabet");

    /* Edge cases: tiny vocabularies and lengths still work; bad arguments fail cleanly. */
    int small_ok = 1;
    for (int64_t i = 0; i < 200; i++) {
        int32_t s[5];
        small_ok &= lt_mock_sample(7, LT_SPLIT_TRAIN, 2, 5, i, s, err, sizeof err) >= 0;
        for (int k = 0; k < 5; k++) small_ok &= s[k] == 0 || s[k] == 1;
        small_ok &= lt_mock_sample(7, LT_SPLIT_TEST, 3, 1, i, s, err, sizeof err) >= 0 && s[0] >= 0 && s[0] < 3;
    }
    TAP_CHECK(small_ok, "vocab 2 / 3 and lengths 1 / 5 work");
    TAP_CHECK(lt_mock_sample(7, 0, 1, 5, 0, t, err, sizeof err) < 0 && strstr(err, "vocab_size"), "vocab 1 fails: %s", err);
    TAP_CHECK(lt_mock_sample(7, 0, 100, 0, 0, t, err, sizeof err) < 0, "length 0 fails: %s", err);
    TAP_CHECK(lt_mock_sample(7, 0, 100, 5, -1, t, err, sizeof err) < 0, "negative index fails: %s", err);

    /* Through the GPT dataset API: num_samples bounds the size, samples match lt_mock_sample. */
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    c.seq_length = 128;
    c.vocab_size = V;
    c.num_samples = 500;
    c.seed = seed;
    lt_gpt_dataset *ds = lt_gpt_dataset_open(&c, err, sizeof err);
    int via = ds && lt_gpt_dataset_size(ds) == 500 && lt_gpt_dataset_sample_length(ds) == 129 &&
              lt_gpt_dataset_get(ds, 42, t, err, sizeof err) == 0 &&
              lt_mock_sample(seed, LT_SPLIT_TRAIN, V, 129, 42, u, err, sizeof err) >= 0 && memcmp(t, u, sizeof t) == 0;
    TAP_CHECK(via, "the GPT dataset serves mock samples when no data path is set");
    TAP_CHECK(ds && lt_gpt_dataset_get(ds, 500, t, err, sizeof err) != 0, "mock size bounds the index: %s", err);
    lt_gpt_dataset_close(ds);
    return tap_done();
}

#include "engine/data/mock.h"

#include <stdarg.h>
#include <stdio.h>

#include "engine/core/rng.h"

#define MOCK_ALPHABET 64

int64_t lt_mock_alphabet(int64_t vocab_size) { return vocab_size < MOCK_ALPHABET ? vocab_size : MOCK_ALPHABET; }

/* The MARKOV permutation: Fisher-Yates driven by Philox, recomputed per call (A-1 draws). */
static void markov_perm(uint64_t seed, uint64_t A, int32_t *perm) {
    uint64_t key = lt_rng_key(seed, "mock_gpt/markov");
    for (uint64_t i = 0; i < A; i++) perm[i] = (int32_t)i;
    for (uint64_t i = A - 1; i > 0; i--) {
        uint64_t j = lt_philox(key, i).v[0] % (i + 1);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

int32_t lt_mock_successor(uint64_t seed, int64_t vocab_size, int32_t x) {
    int32_t perm[MOCK_ALPHABET];
    uint64_t A = (uint64_t)lt_mock_alphabet(vocab_size);
    if (A < 1 || x < 0 || (uint64_t)x >= A) return -1;
    markov_perm(seed, A, perm);
    return perm[x];
}

static const char *const STREAM[3][2] = {
    {"mock_gpt/train/rule", "mock_gpt/train/tokens"},
    {"mock_gpt/valid/rule", "mock_gpt/valid/tokens"},
    {"mock_gpt/test/rule", "mock_gpt/test/tokens"},
};

int lt_mock_sample(uint64_t seed, int split, int64_t vocab_size, int64_t length, int64_t idx, int32_t *out,
                   char *err, size_t errlen) {
    const char *why = vocab_size < 2 ? "vocab_size must be at least 2"
                      : length < 1   ? "sample length must be positive"
                      : idx < 0      ? "sample index must be non-negative"
                      : (split < 0 || split > 2) ? "split must be train, valid or test"
                                                 : NULL;
    if (why) {
        if (err && errlen)
            snprintf(err, errlen, "mock dataset: %s (vocab_size %lld, length %lld, index %lld)", why,
                     (long long)vocab_size, (long long)length, (long long)idx);
        return -1;
    }
    uint64_t A = (uint64_t)lt_mock_alphabet(vocab_size);
    /* Splits use different streams so valid/test samples are not train samples. */
    lt_philox_out o = lt_philox(lt_rng_key(seed, STREAM[split][0]), (uint64_t)idx);
    uint64_t tok_key = lt_rng_key(seed, STREAM[split][1]);
    int rule = (int)(o.v[0] % 4u);
    if (rule == LT_MOCK_MARKOV) {
        int32_t perm[MOCK_ALPHABET];
        markov_perm(seed, A, perm);
        int32_t t = (int32_t)(o.v[1] % A);
        for (int64_t k = 0; k < length; k++) {
            out[k] = t;
            t = perm[t];
        }
        return rule;
    }
    if (rule == LT_MOCK_ARITH) {
        uint64_t t = o.v[1] % A, d = 1 + o.v[2] % 4u;
        for (int64_t k = 0; k < length; k++) {
            out[k] = (int32_t)t;
            t = (t + d) % A;
        }
        return rule;
    }
    int64_t p = rule == LT_MOCK_REPEAT ? 2 + (int64_t)(o.v[1] % 7u) : 9 + (int64_t)(o.v[1] % 24u);
    int64_t cap = length / 2 > 2 ? length / 2 : 2;
    if (rule == LT_MOCK_COPY && p > cap) p = cap;
    /* Pattern tokens: 4 per Philox call, counters idx*8 .. idx*8+7 cover 32 tokens. */
    for (int64_t k = 0; k < p && k < length; k++) {
        lt_philox_out w = lt_philox(tok_key, (uint64_t)idx * 8u + (uint64_t)(k >> 2));
        out[k] = (int32_t)(w.v[k & 3] % A);
    }
    for (int64_t k = p; k < length; k++) out[k] = out[k - p];
    return rule;
}

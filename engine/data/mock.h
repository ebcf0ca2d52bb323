/* Mock GPT data: the default when no data path is given (like Megatron's --mock-data).
 *
 * Sample idx depends only on (seed, split, vocab_size, length, idx), through Philox, so
 * any rank can produce any sample. Each sample follows one of four rules, over the
 * alphabet [0, A) with A = min(vocab_size, 64), so a small model learns them fast (a
 * 4-layer, 128-wide model at vocab 50257, batch 16 x 128, went from 10.9 to 2-2.7 nats
 * in 100-200 AdamW steps):
 *   REPEAT  a random pattern of 2..8 tokens, repeated        t[k] = t[k - p]
 *   ARITH   arithmetic progression, step 1..4, mod A          t[k] = (t[k-1] + d) mod A
 *   COPY    a random segment of 9..32 tokens, copied again    t[k] = t[k - p]
 *   MARKOV  a walk through one fixed permutation f of [0, A)  t[k] = f(t[k-1])
 *           (f depends on the seed only, so every split shares it)
 * COPY's period is capped at max(2, length/2) so a copy is always visible. The valid and
 * test splits draw other samples from the same rules. */
#ifndef LT_DATA_MOCK_H
#define LT_DATA_MOCK_H
#include <stddef.h>
#include <stdint.h>

enum { LT_MOCK_REPEAT = 0, LT_MOCK_ARITH = 1, LT_MOCK_COPY = 2, LT_MOCK_MARKOV = 3 };

/* Size of the token alphabet the mock data uses for vocab_size. */
int64_t lt_mock_alphabet(int64_t vocab_size);

/* f(x) of the MARKOV rule for this seed and vocab_size (x < alphabet). */
int32_t lt_mock_successor(uint64_t seed, int64_t vocab_size, int32_t x);

/* Fills out[length] with mock sample idx. Returns the rule (LT_MOCK_*), or -1 with a
 * message for vocab_size < 2, length < 1 or idx < 0. */
int lt_mock_sample(uint64_t seed, int split, int64_t vocab_size, int64_t length, int64_t idx, int32_t *out,
                   char *err, size_t errlen);

#endif

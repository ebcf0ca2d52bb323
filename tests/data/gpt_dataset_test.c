/* GPT dataset: split arithmetic, determinism, samples as contiguous stretches of the
 * shuffled documents, blending proportions, token validation, clear errors. */
#define _XOPEN_SOURCE 700
#include <stdint.h>
#include <string.h>

#include "engine/data/gpt_dataset.h"
#include "engine/data/indexed.h"
#include "engine/data/np_random.h"
#include "tests/data/tmpdir.h"
#include "tests/tap.h"

static char err[512];

#define NDOCS 100
/* Document d has doc_len(d) tokens; token ids are global positions + base, so each id
 * names its document and place. */
static int64_t doc_start[NDOCS + 1];
static int doc_len(int d) { return 1 + (d * 37) % 50; }

static int make_dataset(const char *prefix, int32_t base) {
    lt_indexed_writer *w = lt_indexed_writer_open(prefix, LT_DTYPE_UINT16, err, sizeof err);
    if (!w) return -1;
    int32_t toks[64];
    int64_t pos = 0;
    for (int d = 0; d < NDOCS; d++) {
        doc_start[d] = pos;
        for (int k = 0; k < doc_len(d); k++) toks[k] = base + (int32_t)(pos + k);
        pos += doc_len(d);
        if (lt_indexed_writer_add(w, toks, doc_len(d), err, sizeof err) ||
            lt_indexed_writer_end_document(w, err, sizeof err)) {
            lt_indexed_writer_abort(w);
            return -1;
        }
    }
    doc_start[NDOCS] = pos;
    return lt_indexed_writer_finalize(w, err, sizeof err);
}

static int doc_of(int64_t pos) {
    int lo = 0, hi = NDOCS; /* doc_start[lo] <= pos < doc_start[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (doc_start[mid] <= pos) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* Each step inside a sample continues its document or crosses from the end of one document
 * to the start of another; all documents lie in [beg, end). */
static int sample_contiguous(const int32_t *t, int64_t n, int64_t beg, int64_t end) {
    for (int64_t k = 0; k < n; k++) {
        int d = doc_of(t[k]);
        if (d < beg || d >= end) return 0;
        if (k == 0) continue;
        int p = doc_of(t[k - 1]);
        int same = t[k] == t[k - 1] + 1 && d == p;
        int cross = t[k - 1] == doc_start[p + 1] - 1 && t[k] == doc_start[d];
        if (!same && !cross) return 0;
    }
    return 1;
}

static lt_gpt_dataset *open_ds(const char *data_path, const char *split, int which, int64_t L, uint64_t seed,
                               int64_t n) {
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    c.data_path = data_path;
    c.split = split;
    c.split_index = which;
    c.seq_length = L;
    c.seed = seed;
    c.num_samples = n;
    return lt_gpt_dataset_open(&c, err, sizeof err);
}

static void test_np_random(void) {
    /* numpy: RandomState(0).permutation(10), RandomState(42).permutation(10). */
    const int32_t want0[10] = {2, 8, 4, 9, 1, 6, 7, 3, 0, 5}, want42[10] = {8, 1, 5, 0, 7, 2, 9, 4, 3, 6};
    int32_t a[10], b[10];
    lt_np_random r;
    for (int i = 0; i < 10; i++) a[i] = b[i] = i;
    lt_np_random_seed(&r, 0);
    lt_np_shuffle_i32(&r, a, 10);
    lt_np_random_seed(&r, 42);
    lt_np_shuffle_i32(&r, b, 10);
    TAP_CHECK(memcmp(a, want0, sizeof a) == 0 && memcmp(b, want42, sizeof b) == 0,
              "shuffle reproduces numpy RandomState(seed).permutation(10) for seeds 0 and 42");
}

static void test_split_arithmetic(void) {
    int64_t b, e;
    TAP_CHECK(lt_gpt_split_range("969,30,1", 0, 1000, &b, &e, err, sizeof err) == 0 && b == 0 && e == 969,
              "969,30,1 of 1000: train [0, 969)");
    TAP_CHECK(lt_gpt_split_range("969, 30, 1", 1, 1000, &b, &e, err, sizeof err) == 0 && b == 969 && e == 999,
              "969, 30, 1 of 1000: valid [969, 999)");
    TAP_CHECK(lt_gpt_split_range("25,50,25", 0, 10, &b, &e, err, sizeof err) == 0 && b == 0 && e == 2,
              "25,50,25 of 10: 2.5 rounds half to even -> train [0, 2)");
    TAP_CHECK(lt_gpt_split_range("25,50,25", 1, 10, &b, &e, err, sizeof err) == 0 && b == 2 && e == 8,
              "25,50,25 of 10: 7.5 rounds to 8 -> valid [2, 8)");
    TAP_CHECK(lt_gpt_split_range("98,2", 2, 500, &b, &e, err, sizeof err) == 0 && b == e,
              "98,2: test split is empty (missing parts are 0)");
    TAP_CHECK(lt_gpt_split_range(NULL, 0, 100, &b, &e, err, sizeof err) == 0 && b == 0 && e == 97,
              "NULL split means 969,30,1");
    TAP_CHECK(lt_gpt_split_range("1,2,3,4", 0, 100, &b, &e, err, sizeof err) != 0, "four parts refused: %s", err);
    TAP_CHECK(lt_gpt_split_range("0,0,0", 0, 100, &b, &e, err, sizeof err) != 0, "all-zero split refused: %s", err);
    TAP_CHECK(lt_gpt_split_range("1..2,3", 0, 100, &b, &e, err, sizeof err) != 0, "\"1..2\" refused: %s", err);
}

static void test_single(const char *A) {
    /* One epoch of train: samples tile the shuffled documents. */
    lt_gpt_dataset *ds = open_ds(A, "80,15,5", LT_SPLIT_TRAIN, 16, 1234, 0);
    TAP_CHECK(ds != NULL, "opens a single dataset (%s)", ds ? "ok" : err);
    if (!ds) return;
    int64_t n = lt_gpt_dataset_size(ds), beg, end;
    lt_gpt_dataset_split_range(ds, 0, &beg, &end);
    TAP_CHECK(beg == 0 && end == 80 && lt_gpt_dataset_sample_length(ds) == 17, "train split [0, 80), 17 tokens per sample");
    int64_t tokens = doc_start[80];
    TAP_CHECK(n == (tokens - 1) / 16, "one epoch has (tokens - 1) / seq_length = %lld samples", (long long)n);
    int32_t(*s)[17] = malloc(sizeof *s * (size_t)n);
    int ok = 1, contiguous = 1;
    for (int64_t i = 0; i < n; i++) {
        ok &= lt_gpt_dataset_get(ds, i, s[i], err, sizeof err) == 0;
        contiguous &= sample_contiguous(s[i], 17, beg, end);
    }
    TAP_CHECK(ok, "every sample reads (%s)", ok ? "ok" : err);
    TAP_CHECK(contiguous, "every sample is a contiguous stretch of train documents");
    /* Chain the samples: each one starts at its predecessor's last token (the extra token). */
    int64_t *next = malloc(sizeof(int64_t) * (size_t)n);
    int64_t start = -1, linked = 0;
    for (int64_t i = 0; i < n; i++) {
        next[i] = -1;
        for (int64_t j = 0; j < n; j++)
            if (j != i && s[j][0] == s[i][16]) next[i] = j;
    }
    for (int64_t i = 0; i < n; i++) {
        int is_next = 0;
        for (int64_t j = 0; j < n; j++) is_next |= next[j] == i;
        if (!is_next) { start = start < 0 ? i : -2; }
    }
    int seen[NDOCS] = {0}, distinct = 1, visited = 0;
    int first_at_doc_start = start >= 0 && s[start][0] == doc_start[doc_of(s[start][0])];
    for (int64_t i = start; i >= 0 && linked <= n; i = next[i], linked++)
        for (int k = 0; k < 17; k++) {
            int d = doc_of(s[i][k]);
            if (!seen[d]) { seen[d] = 1; visited++; }
            else if (k > 0 && d != doc_of(s[i][k - 1])) distinct = 0;
        }
    TAP_CHECK(start >= 0 && linked == n, "samples chain into one stream (%lld of %lld linked)", (long long)linked, (long long)n);
    TAP_CHECK(first_at_doc_start && distinct, "the stream starts at a document start and visits each document once");
    int64_t unvisited = 0;
    for (int d = 0; d < 80; d++)
        if (!seen[d]) unvisited += doc_len(d);
    TAP_CHECK(visited >= 78 && unvisited < 17, "only a tail shorter than a sample is left out (%lld tokens)", (long long)unvisited);
    free(next);

    /* Same seed, same samples; another seed, another order. */
    lt_gpt_dataset *again = open_ds(A, "80,15,5", LT_SPLIT_TRAIN, 16, 1234, 0);
    lt_gpt_dataset *other = open_ds(A, "80,15,5", LT_SPLIT_TRAIN, 16, 1235, 0);
    int same = again && lt_gpt_dataset_size(again) == n, differ = 0;
    int32_t t[17];
    for (int64_t i = 0; same && i < n; i++)
        same = lt_gpt_dataset_get(again, i, t, err, sizeof err) == 0 && memcmp(t, s[i], sizeof t) == 0;
    for (int64_t i = 0; other && i < 10; i++)
        differ |= lt_gpt_dataset_get(other, i, t, err, sizeof err) == 0 && memcmp(t, s[i], sizeof t) != 0;
    TAP_CHECK(same, "same seed gives the same samples");
    TAP_CHECK(differ, "a different seed gives a different order");
    lt_gpt_dataset_close(again);
    lt_gpt_dataset_close(other);

    /* Megatron parity: first tokens of samples 0..5, from Megatron's gpt_dataset.py and
     * helpers.cpp (numpy RandomState) on this same data, split and seed. */
    const int32_t megatron_first[6] = {536, 490, 1868, 1291, 829, 870};
    int match = 1;
    for (int i = 0; i < 6; i++) match &= s[i][0] == megatron_first[i];
    TAP_CHECK(match, "samples 0..5 start where Megatron's index puts them");
    free(s);
    lt_gpt_dataset_close(ds);

    /* Several epochs: num_samples beyond one epoch. */
    ds = open_ds(A, "80,15,5", LT_SPLIT_TRAIN, 16, 7, 1000);
    ok = ds && lt_gpt_dataset_size(ds) >= 1000;
    for (int64_t i = 0; ok && i < lt_gpt_dataset_size(ds); i++)
        ok = lt_gpt_dataset_get(ds, i, t, err, sizeof err) == 0 && sample_contiguous(t, 17, 0, 80);
    TAP_CHECK(ok, "1000 samples over several epochs stay contiguous (size %lld)", ds ? (long long)lt_gpt_dataset_size(ds) : -1LL);
    lt_gpt_dataset_close(ds);

    /* Splits are disjoint: valid and test samples only touch their own documents. */
    int64_t ranges[3][2];
    int disjoint = 1;
    for (int sp = 0; sp < 3; sp++) {
        ds = open_ds(A, "80,15,5", sp, 8, 1234, 0);
        if (!ds) { disjoint = 0; continue; }
        lt_gpt_dataset_split_range(ds, 0, &ranges[sp][0], &ranges[sp][1]);
        int32_t u[9];
        for (int64_t i = 0; i < lt_gpt_dataset_size(ds); i++)
            disjoint &= lt_gpt_dataset_get(ds, i, u, err, sizeof err) == 0 &&
                        sample_contiguous(u, 9, ranges[sp][0], ranges[sp][1]);
        lt_gpt_dataset_close(ds);
    }
    TAP_CHECK(disjoint && ranges[0][1] == 80 && ranges[1][0] == 80 && ranges[1][1] == 95 && ranges[2][0] == 95 &&
                  ranges[2][1] == 100,
              "80,15,5: train [0,80), valid [80,95), test [95,100), samples stay inside");

    /* add_extra_token = 0: samples of seq_length that do not overlap. */
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    c.data_path = A;
    c.split = "1";
    c.seq_length = 10;
    c.add_extra_token = 0;
    ds = lt_gpt_dataset_open(&c, err, sizeof err);
    TAP_CHECK(ds && lt_gpt_dataset_sample_length(ds) == 10 && lt_gpt_dataset_size(ds) == doc_start[NDOCS] / 10,
              "add_extra_token 0: %lld samples of 10 tokens", ds ? (long long)lt_gpt_dataset_size(ds) : -1LL);
    lt_gpt_dataset_close(ds);
}

static void test_blend(const char *A, const char *B) {
    char path[9000];
    snprintf(path, sizeof path, "0.3 %s 0.7 %s", A, B);
    const int64_t N = 2000;
    lt_gpt_dataset *ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, N);
    TAP_CHECK(ds && lt_gpt_dataset_num_datasets(ds) == 2, "opens a weighted blend (%s)", ds ? "ok" : err);
    if (!ds) return;
    TAP_CHECK(lt_gpt_dataset_size(ds) >= N, "blend provides at least num_samples (%lld)", (long long)lt_gpt_dataset_size(ds));
    int64_t cnt[2] = {0, 0}, worst = 0;
    int right_source = 1;
    int32_t t[17];
    for (int64_t i = 0; i < N; i++) {
        int j;
        int64_t s;
        lt_gpt_dataset_source(ds, i, &j, &s);
        cnt[j]++;
        double w = j ? 0.7 : 0.3;
        double dev = (double)cnt[j] - w * (double)(i + 1);
        if (dev < 0) dev = -dev;
        if (dev > worst) worst = (int64_t)(dev + 0.999);
        right_source &= lt_gpt_dataset_get(ds, i, t, err, sizeof err) == 0 && (t[0] >= 30000) == (j == 1);
    }
    TAP_CHECK(cnt[0] >= 598 && cnt[0] <= 602 && cnt[1] >= 1398 && cnt[1] <= 1402,
              "blend proportions 0.3/0.7 within 0.1%%: %lld / %lld", (long long)cnt[0], (long long)cnt[1]);
    TAP_CHECK(worst <= 2, "every prefix of the blend stays within 2 samples of its weights");
    TAP_CHECK(right_source, "each sample comes from the dataset the blend assigns");

    /* Weights are normalised: 3 and 7 blend like 0.3 and 0.7. */
    snprintf(path, sizeof path, "3 %s 7 %s", A, B);
    lt_gpt_dataset *ds2 = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, N);
    int same = ds2 != NULL;
    int32_t u[17];
    for (int64_t i = 0; same && i < 200; i++)
        same = lt_gpt_dataset_get(ds, i, t, err, sizeof err) == 0 && lt_gpt_dataset_get(ds2, i, u, err, sizeof err) == 0 &&
               memcmp(t, u, sizeof t) == 0;
    TAP_CHECK(same, "weights 3/7 give the same samples as 0.3/0.7");
    lt_gpt_dataset_close(ds2);
    lt_gpt_dataset_close(ds);

    /* No weights: blended in proportion to the datasets' sizes. */
    snprintf(path, sizeof path, "%s %s", A, B);
    ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 0);
    TAP_CHECK(ds && lt_gpt_dataset_num_datasets(ds) == 2, "opens an unweighted blend (%s)", ds ? "ok" : err);
    /* Asked for more than one epoch of its parts, Megatron's unweighted blend has min(asked, one epoch)
     * samples, drawn from one-epoch parts: the same as asking for exactly one epoch. */
    int64_t epoch = ds ? lt_gpt_dataset_size(ds) : 0;
    lt_gpt_dataset_close(ds);
    ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 10 * epoch);
    ds2 = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, epoch);
    same = ds && ds2 && epoch > 0 && lt_gpt_dataset_size(ds) == epoch && lt_gpt_dataset_size(ds2) == epoch;
    for (int64_t i = 0; same && i < epoch; i++)
        same = lt_gpt_dataset_get(ds, i, t, err, sizeof err) == 0 && lt_gpt_dataset_get(ds2, i, u, err, sizeof err) == 0 &&
               memcmp(t, u, sizeof t) == 0;
    TAP_CHECK(same, "an unweighted blend asked for 10 epochs has one epoch's %lld samples, as asked for one",
              (long long)epoch);
    lt_gpt_dataset_close(ds);
    lt_gpt_dataset_close(ds2);

    snprintf(path, sizeof path, "0.5 %s", A);
    ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 0);
    TAP_CHECK(!ds && strstr(err, "num_samples"), "a weighted blend without num_samples is refused: %s", err);
    snprintf(path, sizeof path, "0.5 %s x %s", A, B);
    ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 10);
    TAP_CHECK(!ds && strstr(err, "weight"), "a data path mixing weights and prefixes is refused: %s", err);
    snprintf(path, sizeof path, "-1 %s 2 %s", A, B);
    ds = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 10);
    TAP_CHECK(!ds && strstr(err, "positive"), "a negative weight is refused: %s", err);

    /* paths/weights arrays instead of a string. */
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    const char *paths[2] = {A, B};
    const double weights[2] = {0.3, 0.7};
    c.paths = paths;
    c.weights = weights;
    c.n_paths = 2;
    c.seq_length = 16;
    c.num_samples = N;
    ds = lt_gpt_dataset_open(&c, err, sizeof err);
    snprintf(path, sizeof path, "0.3 %s 0.7 %s", A, B);
    ds2 = open_ds(path, "969,30,1", LT_SPLIT_TRAIN, 16, 1234, N);
    same = ds && ds2;
    for (int64_t i = 0; same && i < 100; i++)
        same = lt_gpt_dataset_get(ds, i, t, err, sizeof err) == 0 && lt_gpt_dataset_get(ds2, i, u, err, sizeof err) == 0 &&
               memcmp(t, u, sizeof t) == 0;
    TAP_CHECK(same, "paths/weights arrays match the same --data-path string");
    lt_gpt_dataset_close(ds);
    lt_gpt_dataset_close(ds2);
}

static void test_errors(const char *A) {
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    c.data_path = A;
    c.seq_length = 16;
    c.vocab_size = 1000; /* ids run up to ~2500 */
    lt_gpt_dataset *ds = lt_gpt_dataset_open(&c, err, sizeof err);
    int32_t t[17];
    int bad = 0;
    for (int64_t i = 0; ds && i < lt_gpt_dataset_size(ds) && !bad; i++) bad = lt_gpt_dataset_get(ds, i, t, err, sizeof err) != 0;
    TAP_CHECK(bad && strstr(err, A) && strstr(err, "sequence") && strstr(err, "token") && strstr(err, "vocab_size 1000"),
              "a token id >= vocab_size fails naming dataset, sequence and token: %s", err);
    TAP_CHECK(ds && lt_gpt_dataset_get(ds, lt_gpt_dataset_size(ds), t, err, sizeof err) != 0, "index past the end fails: %s", err);
    TAP_CHECK(ds && lt_gpt_dataset_get(ds, -1, t, err, sizeof err) != 0, "negative index fails");
    lt_gpt_dataset_close(ds);

    ds = open_ds(A, "969,30,1", LT_SPLIT_TEST, 16, 1234, 0);
    TAP_CHECK(!ds && strstr(err, "test split") && strstr(err, "no documents"), "an empty split is refused: %s", err);
    ds = open_ds(A, "99,1,0", LT_SPLIT_VALID, 64, 1234, 0);
    TAP_CHECK(!ds && strstr(err, "fewer than one sample"), "a split smaller than one sample is refused: %s", err);
    ds = open_ds(A, "99,1,0", LT_SPLIT_VALID, 64, 1234, 5);
    TAP_CHECK(ds && lt_gpt_dataset_size(ds) >= 5, "...but serves samples over epochs when num_samples asks (%s)", ds ? "ok" : err);
    lt_gpt_dataset_close(ds);
    ds = open_ds(tmp_path("missing"), "969,30,1", LT_SPLIT_TRAIN, 16, 1234, 0);
    TAP_CHECK(!ds && strstr(err, "cannot open"), "a missing dataset is refused: %s", err);
    ds = open_ds(A, "969,30,1", LT_SPLIT_TRAIN, 0, 1234, 0);
    TAP_CHECK(!ds && strstr(err, "seq_length"), "seq_length 0 is refused: %s", err);
    ds = open_ds(A, "969,30,1", LT_SPLIT_TRAIN, 16, (uint64_t)1 << 33, 0);
    TAP_CHECK(!ds && strstr(err, "seed"), "a seed beyond 2^32 is refused: %s", err);
}

static void test_mock(void) {
    lt_gpt_dataset_config c;
    lt_gpt_dataset_config_defaults(&c);
    c.seq_length = 32;
    c.vocab_size = 1000;
    lt_gpt_dataset *ds = lt_gpt_dataset_open(&c, err, sizeof err);
    int32_t t[33], u[33];
    TAP_CHECK(ds && lt_gpt_dataset_is_mock(ds) && lt_gpt_dataset_size(ds) == INT64_MAX,
              "no data path gives the unbounded mock dataset");
    TAP_CHECK(ds && lt_gpt_dataset_get(ds, 123456789, t, err, sizeof err) == 0 &&
                  lt_gpt_dataset_get(ds, 123456789, u, err, sizeof err) == 0 && memcmp(t, u, sizeof t) == 0,
              "mock samples are deterministic");
    lt_gpt_dataset_close(ds);
    c.vocab_size = 0;
    ds = lt_gpt_dataset_open(&c, err, sizeof err);
    TAP_CHECK(!ds && strstr(err, "vocab_size"), "mock data needs vocab_size: %s", err);
}

int main(void) {
    tmpdir_make("gpt_dataset_test");
    const char *A = tmp_path("a"), *B = tmp_path("b");
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s", A);
    snprintf(b, sizeof b, "%s", B);
    TAP_CHECK(make_dataset(b, 30000) == 0 && make_dataset(a, 0) == 0, "test datasets written (%s)", err);
    test_np_random();
    test_split_arithmetic();
    test_single(a);
    test_blend(a, b);
    test_errors(a);
    test_mock();
    tmpdir_remove();
    return tap_done();
}

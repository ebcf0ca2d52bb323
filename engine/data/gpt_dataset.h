/* GPT pretraining samples, following Megatron-LM's GPTDataset and BlendedDataset.
 *
 * A sample is seq_length + add_extra_token consecutive tokens of the concatenated,
 * shuffled documents of one split (tokens[0..L-1] are the inputs, tokens[1..L] the
 * labels). The index is built in memory exactly as Megatron builds its .npy caches:
 *   - split "969,30,1": fractions of the sequence count, rounded half-to-even like Python,
 *   - document index: the split's sequences repeated per epoch (enough epochs for
 *     num_samples), shuffled with numpy RandomState(seed); a short final epoch
 *     (< 80% of an epoch's samples) is shuffled separately, as Megatron does,
 *   - sample index: (document-index position, offset) where each sample starts,
 *   - shuffle index over samples,
 *   - blends: sample i goes to the dataset whose achieved share is furthest below its
 *     weight (Megatron's greedy build_blending_indices), per-dataset sizes with
 *     Megatron's 0.5% surplus.
 * With the same data, seed and arguments the samples match Megatron's, in order.
 * Like Megatron's GPTDataset the unit of split and shuffle is the sequence; `luatron
 * preprocess` writes one sequence per document, so sequences are documents.
 *
 * Without a data path (or with mock = 1) the handle serves the mock dataset (mock.h). */
#ifndef LT_DATA_GPT_DATASET_H
#define LT_DATA_GPT_DATASET_H
#include <stddef.h>
#include <stdint.h>

enum { LT_SPLIT_TRAIN = 0, LT_SPLIT_VALID = 1, LT_SPLIT_TEST = 2 };

/* Start from lt_gpt_dataset_config_defaults(): a zeroed struct means add_extra_token 0. */
typedef struct {
    /* Megatron --data-path as one string: "prefix", "a b c" (weighted by size) or
     * "0.3 a 0.7 b" (weights, normalised). Used when non-empty; else paths/weights. */
    const char *data_path;
    const char *const *paths; /* n_paths dataset prefixes (prefix.idx / prefix.bin) */
    const double *weights;    /* NULL, or n_paths positive weights (normalised) */
    int n_paths;
    const char *split;   /* "969,30,1" (train, valid, test weights); NULL means that */
    int split_index;     /* LT_SPLIT_TRAIN / VALID / TEST */
    int64_t seq_length;  /* tokens per sample fed to the model */
    int add_extra_token; /* 1: samples hold seq_length + 1 tokens (Megatron's default) */
    uint64_t seed;       /* numpy RandomState seed, 0 .. 2^32-1 (Megatron --seed) */
    int64_t num_samples; /* samples this split must provide; 0: one epoch */
    int64_t vocab_size;  /* token ids must be < vocab_size; 0 skips the check (not for mock) */
    int mock;            /* 1: mock data even if a data path is set */
} lt_gpt_dataset_config;

/* Megatron's defaults: split "969,30,1", train split, add_extra_token 1, seed 1234,
 * seq_length 1024, everything else empty. */
void lt_gpt_dataset_config_defaults(lt_gpt_dataset_config *cfg);

typedef struct lt_gpt_dataset lt_gpt_dataset;

/* Builds the index. NULL with a message on any problem (missing or invalid files, empty
 * split, fewer tokens than one sample, bad weights...). */
lt_gpt_dataset *lt_gpt_dataset_open(const lt_gpt_dataset_config *cfg, char *err, size_t errlen);
void lt_gpt_dataset_close(lt_gpt_dataset *ds);

/* Number of samples (>= num_samples; INT64_MAX for mock data without num_samples). */
int64_t lt_gpt_dataset_size(const lt_gpt_dataset *ds);
/* Tokens per sample: seq_length + add_extra_token. */
int64_t lt_gpt_dataset_sample_length(const lt_gpt_dataset *ds);
int lt_gpt_dataset_is_mock(const lt_gpt_dataset *ds);
/* Datasets in the blend (1 for a single dataset or mock). */
int lt_gpt_dataset_num_datasets(const lt_gpt_dataset *ds);

/* Sample idx (0 <= idx < size) into tokens[seq_length + add_extra_token]. Reads only
 * (the index is immutable after open), so loader threads may call it concurrently.
 * Token ids are checked against vocab_size here, per sample, not by a scan at open.
 * 0 on success; -1 with a message (index out of range, token id >= vocab_size naming the
 * dataset, sequence and position, unreadable data). */
int lt_gpt_dataset_get(const lt_gpt_dataset *ds, int64_t idx, int32_t *tokens, char *err, size_t errlen);

/* Where sample idx comes from: dataset number in the blend and its sample number there
 * (after blending, before the per-dataset shuffle). For tests and logging. */
int lt_gpt_dataset_source(const lt_gpt_dataset *ds, int64_t idx, int *dataset, int64_t *sample);

/* The split's sequence range [*begin, *end) in dataset number `dataset` of the blend. */
int lt_gpt_dataset_split_range(const lt_gpt_dataset *ds, int dataset, int64_t *begin, int64_t *end);

/* Megatron's split arithmetic: sequence range of split `which` among n sequences.
 * -1 with a message for a malformed split string. An empty split gives begin == end. */
int lt_gpt_split_range(const char *split, int which, int64_t n, int64_t *begin, int64_t *end, char *err,
                       size_t errlen);

#endif

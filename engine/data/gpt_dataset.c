#include "engine/core/error.h"
#include "engine/data/gpt_dataset.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/data/indexed.h"
#include "engine/data/mock.h"
#include "engine/data/np_random.h"

#define DEFAULT_SPLIT "969,30,1"
#define SURPLUS 0.005   /* Megatron's mid_level_dataset_surplus */
#define MAX_DATASETS 32767 /* Megatron keeps the blend's dataset index in int16 */

static const char *const SPLIT_NAMES[3] = {"train", "valid", "test"};

void lt_gpt_dataset_config_defaults(lt_gpt_dataset_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->split = DEFAULT_SPLIT;
    cfg->split_index = LT_SPLIT_TRAIN;
    cfg->seq_length = 1024;
    cfg->add_extra_token = 1;
    cfg->seed = 1234;
}

/* One dataset of the blend with its Megatron GPTDataset index. */
typedef struct {
    lt_indexed *ix;
    int64_t beg, end;        /* split's sequence range */
    int64_t tokens_per_epoch;
    int32_t *doc_index;      /* sequence ids, epochs * (end - beg) */
    int64_t ndoc_index;
    int64_t *sample_doc;     /* nsamples + 1 positions in doc_index */
    int32_t *sample_off;     /* nsamples + 1 token offsets in that sequence */
    int64_t *shuffle;        /* nsamples */
    int64_t nsamples;
} gpt_part;

struct lt_gpt_dataset {
    int mock, split_index, extra;
    uint64_t seed;
    int64_t seq_length, vocab_size, size;
    int nparts;
    gpt_part *parts;
    int16_t *blend_ds;     /* size entries, NULL unless blended */
    int64_t *blend_sample;
};

static void part_free_index(gpt_part *p) {
    free(p->doc_index); free(p->sample_doc); free(p->sample_off); free(p->shuffle);
    p->doc_index = NULL; p->sample_doc = NULL; p->sample_off = NULL; p->shuffle = NULL;
    p->ndoc_index = p->nsamples = 0;
}

void lt_gpt_dataset_close(lt_gpt_dataset *ds) {
    if (!ds) return;
    for (int i = 0; ds->parts && i < ds->nparts; i++) {
        part_free_index(&ds->parts[i]);
        lt_indexed_close(ds->parts[i].ix);
    }
    free(ds->parts);
    free(ds->blend_ds);
    free(ds->blend_sample);
    free(ds);
}

/* ---- split ---- */

int lt_gpt_split_range(const char *split, int which, int64_t n, int64_t *begin, int64_t *end, char *err,
                       size_t errlen) {
    if (!split || !*split) split = DEFAULT_SPLIT;
    if (which < 0 || which > 2) return lt_fail(err, errlen, "split index %d is not train/valid/test", which);
    /* Megatron: every run of [.0-9] is a number; missing ones are 0; then normalise. */
    double v[3] = {0, 0, 0};
    int nv = 0;
    for (const char *s = split; *s;) {
        if (!(isdigit((unsigned char)*s) || *s == '.')) { s++; continue; }
        const char *e = s;
        while (isdigit((unsigned char)*e) || *e == '.') e++;
        char num[64];
        size_t len = (size_t)(e - s);
        char *stop;
        if (len >= sizeof num) return lt_fail(err, errlen, "split \"%s\": number too long", split);
        memcpy(num, s, len);
        num[len] = 0;
        double x = strtod(num, &stop);
        if (*stop || stop == num) return lt_fail(err, errlen, "split \"%s\": \"%s\" is not a number", split, num);
        if (nv == 3) return lt_fail(err, errlen, "split \"%s\": more than 3 parts (train,valid,test)", split);
        v[nv++] = x;
        s = e;
    }
    double sum = v[0] + v[1] + v[2];
    if (nv == 0 || !(sum > 0) || !isfinite(sum))
        return lt_fail(err, errlen, "split \"%s\": needs positive weights like \"969,30,1\"", split);
    for (int i = 0; i < 3; i++) v[i] /= sum;
    double lo = 0, hi = 0;
    for (int i = 0; i <= which; i++) { lo = hi; hi = hi + v[i]; }
    if (hi <= lo) { *begin = *end = 0; return 0; } /* Megatron: this split is None */
    /* Python's round(): half to even, which rint gives in the default rounding mode. */
    *begin = (int64_t)rint(lo * (double)n);
    *end = (int64_t)rint(hi * (double)n);
    return 0;
}

/* ---- index build (Megatron GPTDataset._build_document_sample_shuffle_indices) ---- */

static int build_part(gpt_part *p, int64_t num_samples, uint32_t seed, int64_t L, int extra, char *err,
                      size_t errlen) {
    const char *name = lt_indexed_prefix(p->ix);
    part_free_index(p);
    int64_t T = p->tokens_per_epoch, ndocs = p->end - p->beg;
    /* Several epochs may make up a sample when num_samples asks for it, as in Megatron. */
    if (T <= extra || (num_samples == 0 && T - extra < L))
        return lt_fail(err, errlen,
                    "%s: the %lld sequences of this split hold %lld tokens, fewer than one sample of %lld",
                    name, (long long)ndocs, (long long)T, (long long)(L + extra));
    int64_t epochs = 1;
    if (num_samples > 0) {
        if (num_samples > (INT64_MAX - extra) / L)
            return lt_fail(err, errlen, "%s: num_samples %lld is too large", name, (long long)num_samples);
        int64_t want = num_samples * L + extra;
        epochs = (want + T - 1) / T; /* Megatron adds epochs until epochs * T >= want */
        if (epochs < 1) epochs = 1;
    }
    if (epochs > INT64_MAX / T || epochs > (INT64_MAX / 16) / ndocs)
        return lt_fail(err, errlen, "%s: %lld epochs are too many to index", name, (long long)epochs);
    int separate_final = 0;
    int64_t sans_final = 0;
    if (epochs > 1) {
        sans_final = ((epochs - 1) * T - extra) / L;
        int64_t from_final = num_samples - sans_final;
        int64_t per_epoch = (T - extra) / L;
        separate_final = from_final < (int64_t)(0.80 * (double)per_epoch);
    }
    lt_np_random rs;
    lt_np_random_seed(&rs, seed);

    p->ndoc_index = epochs * ndocs;
    p->nsamples = (epochs * T - extra) / L;
    p->doc_index = malloc(sizeof(int32_t) * (size_t)p->ndoc_index);
    p->sample_doc = malloc(sizeof(int64_t) * (size_t)(p->nsamples + 1));
    p->sample_off = malloc(sizeof(int32_t) * (size_t)(p->nsamples + 1));
    p->shuffle = malloc(sizeof(int64_t) * (size_t)p->nsamples);
    if (!p->doc_index || !p->sample_doc || !p->sample_off || !p->shuffle) {
        part_free_index(p);
        return lt_fail(err, errlen, "%s: out of memory for the index of %lld samples", name, (long long)p->nsamples);
    }
    for (int64_t e = 0, k = 0; e < epochs; e++)
        for (int64_t d = p->beg; d < p->end; d++) p->doc_index[k++] = (int32_t)d;
    if (separate_final) {
        lt_np_shuffle_i32(&rs, p->doc_index, (epochs - 1) * ndocs);
        lt_np_shuffle_i32(&rs, p->doc_index + (epochs - 1) * ndocs, ndocs);
    } else {
        lt_np_shuffle_i32(&rs, p->doc_index, p->ndoc_index);
    }

    /* helpers.cpp build_sample_idx, drop_last_partial_sequence = true. */
    int64_t s = 0, di = 0, off = 0;
    p->sample_doc[s] = 0;
    p->sample_off[s] = 0;
    for (s = 1; s <= p->nsamples; s++) {
        int64_t remaining = L + extra;
        while (remaining != 0) {
            int64_t dlen = lt_indexed_sequence_length(p->ix, p->doc_index[di]) - off;
            remaining -= dlen;
            if (remaining <= 0) {
                off += remaining + dlen - extra;
                remaining = 0;
            } else {
                if (di == p->ndoc_index - 1) {
                    if (s != p->nsamples) {
                        part_free_index(p);
                        return lt_fail(err, errlen, "%s: internal error: documents ran out at sample %lld of %lld",
                                    name, (long long)s, (long long)p->nsamples);
                    }
                    off = lt_indexed_sequence_length(p->ix, p->doc_index[di]) - extra;
                    break;
                }
                di++;
                off = 0;
            }
        }
        p->sample_doc[s] = di;
        p->sample_off[s] = (int32_t)off;
    }

    int64_t first = separate_final ? sans_final : p->nsamples;
    for (int64_t i = 0; i < p->nsamples; i++) p->shuffle[i] = i;
    lt_np_shuffle_i64(&rs, p->shuffle, first);
    if (first < p->nsamples) lt_np_shuffle_i64(&rs, p->shuffle + first, p->nsamples - first);
    return 0;
}

/* Reads sample s (before shuffling) of part p. */
static int part_read(const lt_gpt_dataset *ds, const gpt_part *p, int64_t s, int32_t *out, char *err,
                     size_t errlen) {
    const char *name = lt_indexed_prefix(p->ix);
    int64_t need = ds->seq_length + ds->extra, got = 0;
    int64_t db = p->sample_doc[s], de = p->sample_doc[s + 1];
    for (int64_t i = db; i <= de; i++) {
        int64_t seq = p->doc_index[i];
        int64_t off = i == db ? p->sample_off[s] : 0;
        int64_t n = i < de ? lt_indexed_sequence_length(p->ix, seq) - off : p->sample_off[s + 1] + ds->extra - off;
        if (n < 0 || n > need - got)
            return lt_fail(err, errlen, "%s: internal error: sample %lld spans more than %lld tokens", name,
                        (long long)s, (long long)need);
        if (lt_indexed_read(p->ix, seq, off, n, out + got, err, errlen) != 0) return -1;
        if (ds->vocab_size > 0)
            for (int64_t k = 0; k < n; k++)
                if (out[got + k] >= ds->vocab_size)
                    return lt_fail(err, errlen, "%s: sequence %lld token %lld has id %d, outside vocab_size %lld",
                                name, (long long)seq, (long long)(off + k), out[got + k],
                                (long long)ds->vocab_size);
        got += n;
    }
    if (got != need)
        return lt_fail(err, errlen, "%s: internal error: sample %lld has %lld tokens, expected %lld", name,
                    (long long)s, (long long)got, (long long)need);
    return 0;
}

/* ---- blending (helpers.cpp) ---- */

/* numpy.sum of a float64 vector: pairwise summation, 8 accumulators per block. */
static double np_sum(const double *a, int64_t n) {
    if (n < 8) {
        double r = 0.;
        for (int64_t i = 0; i < n; i++) r += a[i];
        return r;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return np_sum(a, n2) + np_sum(a + n2, n - n2);
}

static void np_normalize(double *w, int n) {
    double s = np_sum(w, n);
    for (int i = 0; i < n; i++) w[i] /= s;
}

static void blend_greedy(int16_t *dsi, int64_t *dss, const double *w, int n, int64_t size, int64_t *count) {
    for (int j = 0; j < n; j++) count[j] = 0;
    for (int64_t i = 0; i < size; i++) {
        double x = i > 1 ? (double)i : 1.0;
        int best = 0;
        double best_err = w[0] * x - (double)count[0];
        for (int j = 1; j < n; j++) {
            double e = w[j] * x - (double)count[j];
            if (e > best_err) { best_err = e; best = j; }
        }
        dsi[i] = (int16_t)best;
        dss[i] = count[best]++;
    }
}

/* build_exhaustive_blending_indices: exactly sizes[j] samples from dataset j. */
static void blend_exhaustive(int16_t *dsi, int64_t *dss, const int64_t *sizes, int n, int64_t *count) {
    int64_t total = 0;
    for (int j = 0; j < n; j++) { total += sizes[j]; count[j] = 0; }
    for (int64_t i = 0; i < total; i++) {
        double x = i > 1 ? (double)i : 1.0;
        int best = -1;
        double best_err = -INFINITY;
        for (int j = 0; j < n; j++) {
            if (count[j] >= sizes[j]) continue;
            double e = ((double)sizes[j] / (double)total) * x - (double)count[j];
            if (best < 0 || e > best_err) { best_err = e; best = j; }
        }
        dsi[i] = (int16_t)best;
        dss[i] = count[best]++;
    }
}

/* ---- config ---- */

typedef struct {
    char **paths;
    double *weights; /* NULL when not given */
    int n;
} blend_spec;

static void spec_free(blend_spec *b) {
    for (int i = 0; i < b->n; i++) free(b->paths[i]);
    free(b->paths);
    free(b->weights);
}

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) { memcpy(d, s, n); d[n] = 0; }
    return d;
}

static int parse_number(const char *s, double *out) {
    char *end;
    if (!*s) return 0;
    *out = strtod(s, &end);
    return *end == 0;
}

/* Megatron get_blend_from_list on the whitespace-separated --data-path words. */
static int spec_from_config(const lt_gpt_dataset_config *cfg, blend_spec *b, char *err, size_t errlen) {
    memset(b, 0, sizeof *b);
    char **words = NULL;
    int nw = 0;
    if (cfg->data_path && *cfg->data_path) {
        const char *s = cfg->data_path;
        for (;;) {
            while (isspace((unsigned char)*s)) s++;
            if (!*s) break;
            const char *e = s;
            while (*e && !isspace((unsigned char)*e)) e++;
            char **nwords = realloc(words, sizeof(char *) * (size_t)(nw + 1));
            if (!nwords || !(nwords[nw] = dup_n(s, (size_t)(e - s)))) {
                words = nwords ? nwords : words;
                for (int i = 0; i < nw; i++) free(words[i]);
                free(words);
                return lt_fail(err, errlen, "data path: out of memory");
            }
            words = nwords;
            nw++;
            s = e;
        }
        int weighted = 0;
        if (nw % 2 == 0 && nw > 0) {
            int nnum = 0;
            double x;
            for (int i = 0; i < nw; i += 2) nnum += parse_number(words[i], &x);
            if (nnum == nw / 2) weighted = 1;
            else if (nnum != 0) {
                for (int i = 0; i < nw; i++) free(words[i]);
                free(words);
                return lt_fail(err, errlen,
                            "data path \"%s\": expected \"weight prefix weight prefix ...\" or only prefixes",
                            cfg->data_path);
            }
        }
        if (weighted) {
            b->n = nw / 2;
            b->paths = malloc(sizeof(char *) * (size_t)b->n);
            b->weights = malloc(sizeof(double) * (size_t)b->n);
            if (!b->paths || !b->weights) {
                for (int i = 0; i < nw; i++) free(words[i]);
                free(words);
                free(b->paths); free(b->weights);
                memset(b, 0, sizeof *b);
                return lt_fail(err, errlen, "data path: out of memory");
            }
            for (int i = 0; i < b->n; i++) {
                parse_number(words[2 * i], &b->weights[i]);
                free(words[2 * i]);
                b->paths[i] = words[2 * i + 1];
            }
            free(words);
        } else {
            b->paths = words;
            b->n = nw;
        }
    } else if (cfg->n_paths > 0) {
        if (!cfg->paths) return lt_fail(err, errlen, "config: n_paths = %d but paths is NULL", cfg->n_paths);
        b->paths = calloc((size_t)cfg->n_paths, sizeof(char *));
        if (cfg->weights) b->weights = malloc(sizeof(double) * (size_t)cfg->n_paths);
        if (!b->paths || (cfg->weights && !b->weights)) {
            free(b->paths); free(b->weights);
            memset(b, 0, sizeof *b);
            return lt_fail(err, errlen, "data path: out of memory");
        }
        b->n = cfg->n_paths;
        for (int i = 0; i < b->n; i++) {
            if (!cfg->paths[i] || !(b->paths[i] = dup_n(cfg->paths[i], strlen(cfg->paths[i])))) {
                spec_free(b);
                return lt_fail(err, errlen, "config: paths[%d] is NULL", i);
            }
            if (cfg->weights) b->weights[i] = cfg->weights[i];
        }
    }
    if (b->n > MAX_DATASETS) {
        int n = b->n;
        spec_free(b);
        return lt_fail(err, errlen, "data path: %d datasets, at most %d can be blended", n, MAX_DATASETS);
    }
    for (int i = 0; b->weights && i < b->n; i++)
        if (!(b->weights[i] > 0) || !isfinite(b->weights[i])) {
            lt_fail(err, errlen, "data path: weight %g of %s must be positive", b->weights[i], b->paths[i]);
            spec_free(b);
            return -1;
        }
    return 0;
}

/* ---- open ---- */

static int open_part(lt_gpt_dataset *ds, gpt_part *p, const char *prefix, const lt_gpt_dataset_config *cfg, char *err,
                     size_t errlen) {
    p->ix = lt_indexed_open(prefix, err, errlen);
    if (!p->ix) return -1;
    int64_t n = lt_indexed_num_sequences(p->ix);
    if (n > INT32_MAX)
        return lt_fail(err, errlen, "%s: %lld sequences; the document index holds at most 2^31-1", prefix,
                    (long long)n);
    char e2[256];
    if (lt_gpt_split_range(cfg->split, ds->split_index, n, &p->beg, &p->end, e2, sizeof e2) != 0)
        return lt_fail(err, errlen, "%s: %s", prefix, e2);
    if (p->end <= p->beg)
        return lt_fail(err, errlen,
                    "%s: the %s split of \"%s\" has no documents (%lld sequences in the dataset)", prefix,
                    SPLIT_NAMES[ds->split_index], cfg->split && *cfg->split ? cfg->split : DEFAULT_SPLIT,
                    (long long)n);
    int64_t T = 0;
    for (int64_t i = p->beg; i < p->end; i++) T += lt_indexed_sequence_length(p->ix, i);
    p->tokens_per_epoch = T;
    return 0;
}

static int64_t ceil_i64(double x) { return (int64_t)ceil(x); }

lt_gpt_dataset *lt_gpt_dataset_open(const lt_gpt_dataset_config *cfg, char *err, size_t errlen) {
    if (!cfg) { lt_fail(err, errlen, "gpt dataset: no config"); return NULL; }
    const char *why = cfg->seq_length < 1 ? "seq_length must be positive"
                      : (cfg->add_extra_token != 0 && cfg->add_extra_token != 1) ? "add_extra_token must be 0 or 1"
                      : cfg->num_samples < 0 ? "num_samples must be non-negative"
                      : cfg->seed > 0xffffffffull ? "seed must be in [0, 2^32-1] (numpy RandomState)"
                      : cfg->vocab_size < 0 ? "vocab_size must be non-negative"
                      : (cfg->split_index < 0 || cfg->split_index > 2) ? "split_index must be train, valid or test"
                      : cfg->seq_length > INT32_MAX - 1 ? "seq_length is too large"
                      : NULL;
    if (why) { lt_fail(err, errlen, "gpt dataset: %s", why); return NULL; }
    lt_gpt_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) { lt_fail(err, errlen, "gpt dataset: out of memory"); return NULL; }
    ds->split_index = cfg->split_index;
    ds->extra = cfg->add_extra_token;
    ds->seed = cfg->seed;
    ds->seq_length = cfg->seq_length;
    ds->vocab_size = cfg->vocab_size;

    blend_spec b;
    if (spec_from_config(cfg, &b, err, errlen) != 0) { free(ds); return NULL; }
    if (cfg->mock || b.n == 0) {
        spec_free(&b);
        if (cfg->vocab_size < 2) {
            lt_fail(err, errlen, "mock dataset: vocab_size must be at least 2 (got %lld)", (long long)cfg->vocab_size);
            free(ds);
            return NULL;
        }
        ds->mock = 1;
        ds->nparts = 1;
        ds->size = cfg->num_samples > 0 ? cfg->num_samples : INT64_MAX;
        return ds;
    }

    ds->parts = calloc((size_t)b.n, sizeof(gpt_part));
    int64_t *count = calloc((size_t)b.n, sizeof(int64_t));
    int64_t *want = calloc((size_t)b.n, sizeof(int64_t));
    double *w = calloc((size_t)b.n, sizeof(double));
    if (!ds->parts || !count || !want || !w) {
        lt_fail(err, errlen, "gpt dataset: out of memory");
        goto bad;
    }
    ds->nparts = b.n;
    for (int j = 0; j < b.n; j++)
        if (open_part(ds, &ds->parts[j], b.paths[j], cfg, err, errlen) != 0) goto bad;
    uint32_t seed = (uint32_t)cfg->seed;
    int64_t N = cfg->num_samples, L = cfg->seq_length;

    if (b.n == 1 && !b.weights) {
        if (build_part(&ds->parts[0], N, seed, L, ds->extra, err, errlen) != 0) goto bad;
        ds->size = ds->parts[0].nsamples;
    } else {
        int64_t S = 0;
        int exhaustive = 0;
        if (b.weights) {
            if (N == 0) {
                lt_fail(err, errlen, "gpt dataset: weighted blend \"%s\" needs num_samples",
                     cfg->data_path ? cfg->data_path : "");
                goto bad;
            }
            /* Builder: normalise, target ceil(N w) per dataset, build with 0.5% surplus. */
            for (int j = 0; j < b.n; j++) w[j] = b.weights[j];
            np_normalize(w, b.n);
            for (int j = 0; j < b.n; j++) {
                int64_t target = ceil_i64((double)N * w[j]);
                want[j] = ceil_i64((double)target * (1.0 + SURPLUS));
                S += target;
            }
            for (int j = 0; j < b.n; j++)
                if (build_part(&ds->parts[j], want[j], seed, L, ds->extra, err, errlen) != 0) goto bad;
        } else {
            /* No weights: one epoch each, weighted by its size, and min(num_samples, their sum) samples
             * (Megatron's builder); all of them, in the exhaustive order, without num_samples. */
            for (int j = 0; j < b.n; j++) {
                if (build_part(&ds->parts[j], 0, seed, L, ds->extra, err, errlen) != 0) goto bad;
                w[j] = (double)ds->parts[j].nsamples;
                want[j] = ds->parts[j].nsamples;
                S += want[j];
            }
            if (N > 0 && N < S) S = N;
            else if (N == 0) exhaustive = 1;
        }
        np_normalize(w, b.n); /* BlendedDataset normalises again */
        ds->blend_ds = malloc(sizeof(int16_t) * (size_t)S);
        ds->blend_sample = malloc(sizeof(int64_t) * (size_t)S);
        if (!ds->blend_ds || !ds->blend_sample) {
            lt_fail(err, errlen, "gpt dataset: out of memory for a blend of %lld samples", (long long)S);
            goto bad;
        }
        if (exhaustive) blend_exhaustive(ds->blend_ds, ds->blend_sample, want, b.n, count);
        else blend_greedy(ds->blend_ds, ds->blend_sample, w, b.n, S, count);
        /* Megatron fails when a dataset has fewer samples than the blend draws; add epochs. */
        for (int j = 0; j < b.n; j++)
            if (count[j] > ds->parts[j].nsamples &&
                build_part(&ds->parts[j], count[j], seed, L, ds->extra, err, errlen) != 0)
                goto bad;
        ds->size = S;
    }
    spec_free(&b);
    free(count); free(want); free(w);
    return ds;
bad:
    spec_free(&b);
    free(count); free(want); free(w);
    lt_gpt_dataset_close(ds);
    return NULL;
}

int64_t lt_gpt_dataset_size(const lt_gpt_dataset *ds) { return ds->size; }
int64_t lt_gpt_dataset_sample_length(const lt_gpt_dataset *ds) { return ds->seq_length + ds->extra; }
int lt_gpt_dataset_is_mock(const lt_gpt_dataset *ds) { return ds->mock; }
int lt_gpt_dataset_num_datasets(const lt_gpt_dataset *ds) { return ds->nparts; }

int lt_gpt_dataset_source(const lt_gpt_dataset *ds, int64_t idx, int *dataset, int64_t *sample) {
    if (idx < 0 || idx >= ds->size) return -1;
    *dataset = ds->blend_ds ? ds->blend_ds[idx] : 0;
    *sample = ds->blend_ds ? ds->blend_sample[idx] : idx;
    return 0;
}

int lt_gpt_dataset_split_range(const lt_gpt_dataset *ds, int dataset, int64_t *begin, int64_t *end) {
    if (ds->mock || dataset < 0 || dataset >= ds->nparts) return -1;
    *begin = ds->parts[dataset].beg;
    *end = ds->parts[dataset].end;
    return 0;
}

int lt_gpt_dataset_get(const lt_gpt_dataset *ds, int64_t idx, int32_t *tokens, char *err, size_t errlen) {
    if (idx < 0 || idx >= ds->size)
        return lt_fail(err, errlen, "gpt dataset: sample %lld out of range [0, %lld)", (long long)idx,
                    (long long)ds->size);
    if (ds->mock)
        return lt_mock_sample(ds->seed, ds->split_index, ds->vocab_size, ds->seq_length + ds->extra, idx, tokens,
                              err, errlen) < 0 ? -1 : 0;
    int j;
    int64_t s;
    lt_gpt_dataset_source(ds, idx, &j, &s);
    const gpt_part *p = &ds->parts[j];
    return part_read(ds, p, p->shuffle[s], tokens, err, errlen);
}

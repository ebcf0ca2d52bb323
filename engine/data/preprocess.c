#define _POSIX_C_SOURCE 200809L
#include "engine/core/error.h"
#include "engine/data/preprocess.h"

#include <errno.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/data/indexed.h"
#include "engine/data/tokenizer.h"
#include "engine/io/json.h"

/* ---- growable byte buffer ---- */
typedef struct {
    char *d;
    size_t n, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1) cap *= 2;
    char *d = realloc(b->d, cap);
    if (!d) return -1;
    b->d = d;
    b->cap = cap;
    return 0;
}

static int buf_put(buf_t *b, const char *s, size_t n) {
    if (buf_reserve(b, n) != 0) return -1;
    memcpy(b->d + b->n, s, n);
    b->n += n;
    b->d[b->n] = 0;
    return 0;
}

/* ---- one string out of a JSON object (engine/io/json.c, all of JSON accepted) ---- */

#define JSON_MAX_DEPTH 512

/* json.c says "<problem> at byte N"; a JSONL line's reader wants "column N+1: <problem>". */
static int json_error(const lt_json_doc *doc, const char *msg, char *err, size_t errlen) {
    size_t n = strlen(msg);
    const char *at = strstr(msg, " at byte ");
    if (at) n = (size_t)(at - msg);
    return lt_fail(err, errlen, "column %zu: %.*s", doc->err_pos + 1, (int)n, msg);
}

static size_t skip_ws_and(const char *text, size_t i, size_t len, char also) {
    while (i < len && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r' || text[i] == also)) i++;
    return i;
}

/* 1 if member `c` (after `prev`, LT_JSON_NONE for the first) of the root object has exactly the key `key`.
 * json.c keeps keys as C strings without a length, so strcmp alone would let "text\u0000x" pass for
 * "text"; when strcmp matches, the key's raw text is decoded again (with json.c) for its length. */
static int key_is(const lt_json_doc *doc, const char *text, size_t len, size_t prev, size_t c, const char *key) {
    if (strcmp(lt_json_key(doc, c), key) != 0) return 0;
    /* The key's span: from after '{' or the previous value (and its ',') to the quote before ':'. */
    size_t a = skip_ws_and(text, prev == LT_JSON_NONE ? doc->nodes[0].pos + 1 : doc->nodes[prev].end, len, ',');
    size_t b = doc->nodes[c].pos;
    while (b > a && text[b - 1] != ':') b--;
    while (b > a && text[b - 1] != '"') b--;
    lt_json_doc k;
    int same = lt_json_parse_ex(&k, text + a, b - a, 1, 1, LT_JSON_ANY, NULL, 0) == 0 && k.nodes[0].len == strlen(key);
    lt_json_free(&k);
    return same;
}

int lt_json_get_string(const char *text, size_t len, const char *key, char **out, size_t *outlen, char *err,
                       size_t errlen) {
    *out = NULL;
    *outlen = 0;
    lt_json_doc doc;
    char msg[256];
    /* Every value takes at least one byte of input, so len + 1 nodes always suffice. */
    if (lt_json_parse_ex(&doc, text, len, JSON_MAX_DEPTH, len + 1, LT_JSON_ANY, msg, sizeof msg) != 0) {
        int rc = json_error(&doc, msg, err, errlen);
        lt_json_free(&doc);
        return rc;
    }
    if (doc.nodes[0].type != LT_JSON_OBJECT) {
        lt_json_free(&doc);
        return lt_fail(err, errlen, "column 1: expected a JSON object");
    }
    size_t found = LT_JSON_NONE, prev = LT_JSON_NONE;
    for (size_t c = doc.nodes[0].first; c != LT_JSON_NONE; prev = c, c = doc.nodes[c].next)
        if (key_is(&doc, text, len, prev, c, key)) found = c; /* the last one wins, as in Python */
    int rc = 0;
    if (found != LT_JSON_NONE && doc.nodes[found].type != LT_JSON_STRING) {
        rc = lt_fail(err, errlen, "column %zu: value of \"%s\" is not a string", doc.nodes[found].pos + 1, key);
    } else if (found != LT_JSON_NONE) {
        size_t n = doc.nodes[found].len;
        *out = malloc(n + 1);
        if (!*out) {
            rc = lt_fail(err, errlen, "out of memory");
        } else {
            memcpy(*out, lt_json_str(&doc, found), n + 1);
            *outlen = n;
            rc = 1;
        }
    }
    lt_json_free(&doc);
    return rc;
}

/* ---- the command ---- */

static void usage(FILE *f) {
    fputs("usage: luatron preprocess --input FILE --output-prefix PREFIX [options]\n"
          "\n"
          "Tokenizes a corpus into a Megatron-LM indexed dataset (MMIDIDX version 1), one sequence per\n"
          "document, as Megatron's tools/preprocess_data.py: the same .bin/.idx bytes for the same\n"
          "tokenizer (uint16 tokens when the vocabulary has fewer than 65500 ids, else int32).\n"
          "\n"
          "Options:\n"
          "  --input FILE           the corpus\n"
          "  --output-prefix P      write P.bin and P.idx (via temporary files, renamed at the end);\n"
          "                         with --json-keys, P_KEY_document.bin/.idx per key, as Megatron\n"
          "  --input-format F       text or jsonl; default: jsonl for names ending in .jsonl or\n"
          "                         .json, else text\n"
          "                           text:  documents are paragraphs separated by blank lines; a\n"
          "                                  document's lines are joined with \\n (a trailing \\r\n"
          "                                  of a CRLF line is dropped)\n"
          "                           jsonl: one JSON object per line, the text under the key\n"
          "                                  (escapes, \\uXXXX and surrogate pairs decoded to UTF-8);\n"
          "                                  strict JSON in valid UTF-8; blank lines are skipped\n"
          "  --json-key K           key of the text in each JSON object (default: text), output P\n"
          "  --json-keys K [K ...]  Megatron's: one dataset per key, P_K_document.bin/.idx\n"
          "  --tokenizer-type T     ByteLevel (default): id = byte value (0..255), EOD 256, vocab 257\n"
          "                         GPT2BPETokenizer: GPT-2's byte-level BPE, needs --vocab-file\n"
          "                           (encoder.json) and --merge-file (vocab.bpe); EOD <|endoftext|>\n"
          "                         HuggingFaceTokenizer: --tokenizer-model, a tokenizer.json of the\n"
          "                           byte-level BPE kind (GPT-2, Llama-3, Qwen2 style) or its folder:\n"
          "                           its NFC normalizer and its template's tokens (Llama-3's\n"
          "                           <|begin_of_text|>) included, as Megatron's tokenize; EOD the\n"
          "                           eos_token of a tokenizer_config.json beside it, else <|endoftext|>,\n"
          "                           after the template's tokens\n"
          "                         SentencePieceTokenizer: --tokenizer-model, a SentencePiece .model file,\n"
          "                           with Megatron's special tokens (<CLS> <SEP> <EOD> <MASK>, the pad, bos\n"
          "                           and eos pieces) cut out of the text first; EOD <EOD>\n"
          "                         GPTSentencePieceTokenizer: --tokenizer-model, the .model alone; EOD its eos\n"
          "                         Llama2Tokenizer: --tokenizer-model, the .model with its bos id before each\n"
          "                           document; EOD its eos\n"
          "  --vocab-file F, --merge-file F, --tokenizer-model F   the tokenizer's files\n"
          "  --append-eod           append the tokenizer's EOD to every non-empty document\n"
          "  --workers N            tokenize in N threads (default 1); the output does not depend on N\n"
          "  --log-interval N       print progress to stderr every N documents\n"
          "  --help                 show this help\n"
          "\n"
          "Megatron's --split-sentences, --keep-newlines, --lang, --partitions, --keep-sequential-samples,\n"
          "--vocab-size, --vocab-extra-ids and the tiktoken options are refused (not implemented).\n"
          "A document with no tokens gets no sequence and no EOD, only its entry in the document\n"
          "index, as Megatron's preprocess_data.py. Prints the number of documents and tokens.\n",
          f);
}

#define MAX_KEYS 16

typedef struct {
    lt_indexed_writer *w;
    char *prefix;
    int64_t docs, empty;
} sink_t;

/* A document waiting in the batch: its text (owned), where it goes and the line it ended on, then its
 * ids and how tokenizing it went. */
typedef struct {
    char *text;
    size_t n;
    sink_t *sink;
    int64_t line;
    lt_token_buf ids;
    int rc;
    char err[256];
} doc_t;

#define BATCH_DOCS 1024
#define BATCH_BYTES ((size_t)8 << 20)

typedef struct {
    lt_tokenizer **tok; /* one per worker: a tokenizer's word cache is its own */
    int workers, append_eod;
    const char *path;
    doc_t *batch; /* [BATCH_DOCS] */
    int n;
    size_t bytes;
    int64_t log_interval, done;
} job_t;

/* One tokenized document into its sink. As Megatron's preprocess_data.py: an empty one gets no EOD and
 * no sequence, only its entry in the document index (IndexedDatasetBuilder.add_document with no lengths). */
static int write_doc(job_t *j, doc_t *d, char *err, size_t errlen) {
    char e2[1024];
    sink_t *s = d->sink;
    int rc = d->rc;
    if (rc) snprintf(e2, sizeof e2, "%s", d->err);
    if (!rc) {
        s->docs++;
        if (j->log_interval > 0 && ++j->done % j->log_interval == 0)
            fprintf(stderr, "preprocess: %lld documents\n", (long long)j->done);
        if (d->ids.n == 0) {
            s->empty++;
            rc = lt_indexed_writer_end_document(s->w, e2, sizeof e2);
        } else if (d->ids.n > (size_t)INT32_MAX) {
            rc = lt_fail(e2, sizeof e2, "document of %zu tokens is too long", d->ids.n);
        } else {
            rc = lt_indexed_writer_add(s->w, d->ids.ids, (int64_t)d->ids.n, e2, sizeof e2) ||
                 lt_indexed_writer_end_document(s->w, e2, sizeof e2);
        }
    }
    return rc ? lt_fail(err, errlen, "%s:%lld: %s", j->path, (long long)d->line, e2) : 0;
}

/* The batch tokenized, its documents shared out over the workers, then written in input order. */
static int flush(job_t *j, char *err, size_t errlen) {
#pragma omp parallel for num_threads(j->workers) schedule(dynamic, 8) if (j->workers > 1)
    for (int i = 0; i < j->n; i++) {
        doc_t *d = &j->batch[i];
        d->ids.n = 0;
        d->rc = lt_tokenizer_encode(j->tok[omp_get_thread_num()], d->text, d->n, &d->ids, d->err, sizeof d->err);
        if (!d->rc && d->ids.n > 0 && j->append_eod && lt_token_buf_push(&d->ids, j->tok[0]->eod) != 0)
            d->rc = lt_fail(d->err, sizeof d->err, "out of memory");
    }
    int rc = 0;
    for (int i = 0; i < j->n; i++) {
        if (!rc) rc = write_doc(j, &j->batch[i], err, errlen);
        free(j->batch[i].text);
        j->batch[i].text = NULL;
    }
    j->n = 0, j->bytes = 0;
    return rc;
}

/* Takes text (malloc'd: the batch owns it now), ended at `line`, for sink s; tokenizes and writes the
 * batch when it is full. */
static int queue(job_t *j, sink_t *s, char *text, size_t n, int64_t line, char *err, size_t errlen) {
    doc_t *d = &j->batch[j->n++];
    *d = (doc_t){.text = text, .n = n, .sink = s, .line = line, .ids = d->ids}; /* (its id buffer is reused) */
    j->bytes += n;
    return j->n == BATCH_DOCS || j->bytes >= BATCH_BYTES ? flush(j, err, errlen) : 0;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v')) return 0;
    return 1;
}

static void free_job(job_t *j) {
    for (int w = 0; j->tok && w < j->workers; w++) lt_tokenizer_free(j->tok[w]);
    for (int i = 0; j->batch && i < BATCH_DOCS; i++) free(j->batch[i].text), lt_token_buf_free(&j->batch[i].ids);
    free(j->tok), free(j->batch);
}

/* A copy of doc's bytes for the batch. */
static char *copy_of(const buf_t *doc) {
    char *t = malloc(doc->n + 1);
    if (t) memcpy(t, doc->d, doc->n);
    return t;
}

static int run_text(FILE *in, const char *path, job_t *j, sink_t *s, char *err, size_t errlen) {
    char *line = NULL, *t;
    size_t cap = 0;
    ssize_t got;
    buf_t doc = {0};
    int64_t lineno = 0;
    int rc = 0, have = 0;
    while (rc == 0 && (got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        size_t n = (size_t)got;
        if (n && line[n - 1] == '\n') n--;
        if (n && line[n - 1] == '\r') n--;
        if (is_blank(line, n)) {
            if (have) rc = (t = copy_of(&doc)) ? queue(j, s, t, doc.n, lineno, err, errlen)
                                               : lt_fail(err, errlen, "%s:%lld: out of memory", path, (long long)lineno);
            doc.n = 0;
            have = 0;
            continue;
        }
        if ((have && buf_put(&doc, "\n", 1) != 0) || buf_put(&doc, line, n) != 0)
            rc = lt_fail(err, errlen, "%s:%lld: out of memory", path, (long long)lineno);
        have = 1;
    }
    if (rc == 0 && ferror(in)) rc = lt_fail(err, errlen, "%s:%lld: read error: %s", path, (long long)lineno, strerror(errno));
    if (rc == 0 && have)
        rc = (t = copy_of(&doc)) ? queue(j, s, t, doc.n, lineno, err, errlen)
                                 : lt_fail(err, errlen, "%s:%lld: out of memory", path, (long long)lineno);
    if (rc == 0) rc = flush(j, err, errlen);
    free(line);
    free(doc.d);
    return rc;
}

static int run_jsonl(FILE *in, const char *path, const char **keys, int nkeys, job_t *j, sink_t *s, char *err,
                     size_t errlen) {
    char *line = NULL, *text = NULL, e2[1024];
    size_t cap = 0, tlen;
    ssize_t got;
    int64_t lineno = 0;
    int rc = 0;
    while (rc == 0 && (got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        size_t n = (size_t)got;
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) n--;
        if (is_blank(line, n)) continue;
        for (int k = 0; k < nkeys && rc == 0; k++) {
            int found = lt_json_get_string(line, n, keys[k], &text, &tlen, e2, sizeof e2);
            if (found < 0) { rc = -1; break; }
            if (found == 0) {
                snprintf(e2, sizeof e2, "no key \"%s\" in the JSON object (see --json-key/--json-keys)", keys[k]);
                rc = -1;
                break;
            }
            if (queue(j, &s[k], text, tlen, lineno, err, errlen) != 0) rc = -2; /* err is whole already */
            text = NULL;
        }
    }
    if (rc == 0 && ferror(in)) { snprintf(e2, sizeof e2, "read error: %s", strerror(errno)); rc = -1; }
    if (rc == -1) lt_fail(err, errlen, "%s:%lld: %s", path, (long long)lineno, e2);
    if (rc == 0) rc = flush(j, err, errlen);
    free(line);
    return rc;
}
static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static long long file_size_of(const char *prefix, const char *ext) {
    char path[4200];
    struct stat st;
    snprintf(path, sizeof path, "%s%s", prefix, ext);
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

/* The folders of an output prefix (data/corpus -> data/), made as `mkdir -p` would. */
static int make_parent_dirs(const char *prefix, char *err, size_t errlen) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s", prefix) >= (int)sizeof path) {
        lt_fail(err, errlen, "%s: the output prefix is too long", prefix);
        return -1;
    }
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(path, 0777) != 0 && errno != EEXIST) {
            lt_fail(err, errlen, "%s: cannot create the folder: %s", path, strerror(errno));
            return -1;
        }
        *p = '/';
    }
    return 0;
}


/* Megatron's preprocess_data.py flags that luatron does not implement: refused, never ignored. */
static const char *const REFUSED[][2] = {
    {"--split-sentences", "splitting documents into sentences (NLTK punkt) is not implemented"},
    {"--keep-newlines", "it only applies with --split-sentences, which is not implemented"},
    {"--lang", "it only applies with --split-sentences, which is not implemented"},
    {"--partitions", "luatron reads the input in one pass; drop the flag (the output is the same as one partition)"},
    {"--keep-sequential-samples", "it only orders partitions, which are not implemented"},
    {"--vocab-size", "it is for NullTokenizer, which preprocess does not implement"},
    {"--vocab-extra-ids", "extra ids (T5's sentinels) are not implemented"},
    {"--tiktoken-pattern", "TikTokenizer is not implemented"},
    {"--tiktoken-num-special-tokens", "TikTokenizer is not implemented"},
    {"--tiktoken-special-tokens", "TikTokenizer is not implemented"},
    {"--tokenizer-metadata", "tokenizer metadata files are not implemented"},
    {"--tokenizer-special-tokens", "extra special tokens are not implemented"},
};

static int parse_count(const char *name, const char *v, int64_t *out) {
    char *end;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || x < 1) {
        fprintf(stderr, "luatron preprocess: %s must be a positive integer, not '%s'\n", name, v);
        return -1;
    }
    *out = x;
    return 0;
}

int lt_preprocess_main(int argc, char **argv) {
    const char *input = NULL, *prefix = NULL, *format = NULL, *key = NULL, *workers = NULL, *log_interval = NULL;
    const char *keys[MAX_KEYS];
    int nkeys = 0, append_eod = 0;
    lt_tokenizer_spec spec = {0};
    int i = 1;
    if (i < argc && argv[i] && strcmp(argv[i], "preprocess") == 0) i++;
    for (; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        const char *eq = strchr(a, '=');
        char name[64];
        size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
        if (nlen >= sizeof name) nlen = sizeof name - 1;
        memcpy(name, a, nlen);
        name[nlen] = 0;
        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(name, "--append-eod") == 0 && !eq) { append_eod = 1; continue; }
        for (size_t r = 0; r < sizeof REFUSED / sizeof REFUSED[0]; r++)
            if (strcmp(name, REFUSED[r][0]) == 0) {
                fprintf(stderr, "luatron preprocess: %s is not supported: %s\n", name, REFUSED[r][1]);
                return 2;
            }
        if (strcmp(name, "--json-keys") == 0) { /* Megatron's nargs='+' */
            if (eq) keys[nkeys++] = eq + 1;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                if (nkeys == MAX_KEYS) {
                    fprintf(stderr, "luatron preprocess: at most %d --json-keys\n", MAX_KEYS);
                    return 2;
                }
                keys[nkeys++] = argv[++i];
            }
            if (nkeys == 0) {
                fprintf(stderr, "luatron preprocess: --json-keys needs at least one key\n");
                return 2;
            }
            continue;
        }
        const char **dst = strcmp(name, "--input") == 0             ? &input
                           : strcmp(name, "--output-prefix") == 0   ? &prefix
                           : strcmp(name, "--input-format") == 0    ? &format
                           : strcmp(name, "--json-key") == 0        ? &key
                           : strcmp(name, "--tokenizer-type") == 0  ? &spec.type
                           : strcmp(name, "--vocab-file") == 0      ? &spec.vocab_file
                           : strcmp(name, "--merge-file") == 0      ? &spec.merge_file
                           : strcmp(name, "--tokenizer-model") == 0 ? &spec.model
                           : strcmp(name, "--workers") == 0         ? &workers
                           : strcmp(name, "--log-interval") == 0    ? &log_interval
                                                                    : NULL;
        if (!dst) {
            fprintf(stderr, "luatron preprocess: unknown argument '%s' (see --help)\n", a);
            return 2;
        }
        if (eq) val = eq + 1;
        else if (i + 1 < argc) val = argv[++i];
        else {
            fprintf(stderr, "luatron preprocess: %s needs a value\n", name);
            return 2;
        }
        *dst = val;
    }
    if (!input || !*input || !prefix || !*prefix) {
        fprintf(stderr, "luatron preprocess: --input and --output-prefix are required (see --help)\n");
        return 2;
    }
    if (key && nkeys) {
        fprintf(stderr, "luatron preprocess: give --json-key (output PREFIX) or --json-keys (output "
                        "PREFIX_KEY_document), not both\n");
        return 2;
    }
    job_t job = {0};
    int64_t nworkers = 1;
    if ((workers && parse_count("--workers", workers, &nworkers) != 0) ||
        (log_interval && parse_count("--log-interval", log_interval, &job.log_interval) != 0))
        return 2;
    const char *type = spec.type ? spec.type : "ByteLevel";
    if (strcmp(type, "GPT2BPETokenizer") != 0 && (spec.vocab_file || spec.merge_file)) {
        fprintf(stderr, "luatron preprocess: --vocab-file and --merge-file are for --tokenizer-type GPT2BPETokenizer, "
                        "not %s\n", type);
        return 2;
    }
    int sentencepiece = strcmp(type, "SentencePieceTokenizer") == 0 || strcmp(type, "GPTSentencePieceTokenizer") == 0 ||
                        strcmp(type, "Llama2Tokenizer") == 0;
    if (strcmp(type, "HuggingFaceTokenizer") != 0 && !sentencepiece && spec.model) {
        fprintf(stderr, "luatron preprocess: --tokenizer-model is for --tokenizer-type HuggingFaceTokenizer (a "
                        "tokenizer.json) or a SentencePiece type (SentencePieceTokenizer, GPTSentencePieceTokenizer, "
                        "Llama2Tokenizer: a .model file), not %s\n", type);
        return 2;
    }
    int jsonl;
    if (format) {
        if (strcmp(format, "jsonl") == 0 || strcmp(format, "json") == 0) jsonl = 1;
        else if (strcmp(format, "text") == 0) jsonl = 0;
        else {
            fprintf(stderr, "luatron preprocess: --input-format must be text or jsonl, not '%s'\n", format);
            return 2;
        }
    } else {
        jsonl = ends_with(input, ".jsonl") || ends_with(input, ".json");
    }
    if (!jsonl && (key || nkeys)) {
        fprintf(stderr, "luatron preprocess: --json-key/--json-keys need JSONL input (--input-format jsonl)\n");
        return 2;
    }
    int megatron_names = nkeys > 0;
    if (!nkeys) keys[nkeys++] = key ? key : "text";
    char err[1024];
    if (nworkers > 256) {
        fprintf(stderr, "luatron preprocess: --workers %lld: at most 256 threads\n", (long long)nworkers);
        return 2;
    }
    job.workers = (int)nworkers, job.append_eod = append_eod, job.path = input;
    job.tok = calloc((size_t)job.workers, sizeof *job.tok);
    job.batch = calloc(BATCH_DOCS, sizeof *job.batch);
    if (!job.tok || !job.batch) {
        fprintf(stderr, "luatron preprocess: out of memory\n");
        free(job.tok), free(job.batch);
        return 1;
    }
    for (int w = 0; w < job.workers; w++) {
        job.tok[w] = lt_tokenizer_open(&spec, err, sizeof err);
        if (!job.tok[w]) {
            fprintf(stderr, "luatron preprocess: %s\n", err);
            free_job(&job);
            /* a type luatron lacks is a usage error (2), a bad or missing file a failure (1) */
            int known = strcmp(type, "ByteLevel") == 0 || strcmp(type, "GPT2BPETokenizer") == 0 ||
                        strcmp(type, "HuggingFaceTokenizer") == 0 || sentencepiece;
            return known ? 1 : 2;
        }
    }
    FILE *in = fopen(input, "rb");
    if (!in) {
        fprintf(stderr, "luatron preprocess: %s: cannot open: %s\n", input, strerror(errno));
        free_job(&job);
        return 1;
    }
    sink_t sinks[MAX_KEYS] = {{0}};
    int rc = 0, dtype = lt_indexed_optimal_dtype(job.tok[0]->vocab_size);
    for (int k = 0; k < nkeys && rc == 0; k++) {
        size_t len = strlen(prefix) + strlen(keys[k]) + 16;
        sinks[k].prefix = malloc(len);
        if (!sinks[k].prefix) { snprintf(err, sizeof err, "out of memory"); rc = -1; break; }
        if (megatron_names) snprintf(sinks[k].prefix, len, "%s_%s_document", prefix, keys[k]);
        else snprintf(sinks[k].prefix, len, "%s", prefix);
        if (make_parent_dirs(sinks[k].prefix, err, sizeof err) != 0) { rc = -1; break; }
        sinks[k].w = lt_indexed_writer_open(sinks[k].prefix, dtype, err, sizeof err);
        if (!sinks[k].w) rc = -1;
    }
    if (rc == 0)
        rc = jsonl ? run_jsonl(in, input, keys, nkeys, &job, sinks, err, sizeof err)
                   : run_text(in, input, &job, sinks, err, sizeof err);
    fclose(in);
    for (int k = 0; k < nkeys; k++) {
        if (!sinks[k].w) continue;
        int64_t tokens = lt_indexed_writer_num_tokens(sinks[k].w);
        if (rc != 0) {
            lt_indexed_writer_abort(sinks[k].w);
            continue;
        }
        if (lt_indexed_writer_finalize(sinks[k].w, err, sizeof err) != 0) {
            rc = -1;
            continue;
        }
        char eodtxt[64] = "";
        if (append_eod) snprintf(eodtxt, sizeof eodtxt, ", EOD %d appended", (int)job.tok[0]->eod);
        printf("preprocess: %s (%s%s%s): %lld documents, %lld tokens (%s tokenizer, vocab %lld, %s%s)", input,
               jsonl ? "jsonl, key \"" : "text", jsonl ? keys[k] : "", jsonl ? "\"" : "", (long long)sinks[k].docs,
               (long long)tokens, job.tok[0]->type, (long long)job.tok[0]->vocab_size, lt_indexed_dtype_name(dtype), eodtxt);
        if (sinks[k].empty) printf(" (%lld empty: no sequence)", (long long)sinks[k].empty);
        printf("\nwrote %s.bin (%lld bytes) and %s.idx (%lld bytes)\n", sinks[k].prefix,
               file_size_of(sinks[k].prefix, ".bin"), sinks[k].prefix, file_size_of(sinks[k].prefix, ".idx"));
    }
    if (rc != 0) fprintf(stderr, "luatron preprocess: %s\n", err);
    for (int k = 0; k < nkeys; k++) free(sinks[k].prefix);
    free_job(&job);
    return rc != 0 ? 1 : 0;
}

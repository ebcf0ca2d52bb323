#define _POSIX_C_SOURCE 200809L
#include "engine/core/error.h"
#include "engine/data/preprocess.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/data/indexed.h"
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
          "Tokenizes a corpus into a Megatron-LM indexed dataset: PREFIX.bin and PREFIX.idx\n"
          "(MMIDIDX version 1), one sequence per document, ready for --data-path PREFIX.\n"
          "\n"
          "Tokenizer: byte level. Each byte of the document's UTF-8 text is one token whose id is\n"
          "the byte value (0..255); the end-of-document token EOD is 256; vocab size 257, so train\n"
          "with vocab_size >= 257. Tokens are stored as uint16.\n"
          "\n"
          "Options:\n"
          "  --input FILE           the corpus\n"
          "  --output-prefix P      write P.bin and P.idx (via temporary files, renamed at the end)\n"
          "  --input-format F       text or jsonl; default: jsonl for names ending in .jsonl or\n"
          "                         .json, else text\n"
          "                           text:  documents are paragraphs separated by blank lines; a\n"
          "                                  document's lines are joined with \\n (a trailing \\r\n"
          "                                  of a CRLF line is dropped)\n"
          "                           jsonl: one JSON object per line, the text under --json-key\n"
          "                                  (escapes, \\uXXXX and surrogate pairs decoded to UTF-8);\n"
          "                                  strict JSON in valid UTF-8; blank lines are skipped\n"
          "  --json-key K           key of the text in each JSON object (default: text)\n"
          "  --append-eod           append EOD (256) to every non-empty document\n"
          "  --help                 show this help\n"
          "\n"
          "A document with no tokens gets no sequence and no EOD, only its entry in the document\n"
          "index, as Megatron's preprocess_data.py. Prints the number of documents and tokens.\n",
          f);
}

typedef struct {
    lt_indexed_writer *w;
    int append_eod;
    int32_t *tok;
    size_t tokcap;
    int64_t docs, empty;
} sink_t;

/* One document. As Megatron's preprocess_data.py: an empty one gets no EOD and no sequence, only its
 * entry in the document index (IndexedDatasetBuilder.add_document with no lengths). */
static int emit(sink_t *s, const char *bytes, size_t n, char *err, size_t errlen) {
    if (n == 0) {
        s->docs++;
        s->empty++;
        return lt_indexed_writer_end_document(s->w, err, errlen);
    }
    size_t total = n + (s->append_eod ? 1 : 0);
    if (total > (size_t)INT32_MAX) return lt_fail(err, errlen, "document of %zu tokens is too long", total);
    if (total > s->tokcap) {
        int32_t *t = realloc(s->tok, total * sizeof(int32_t));
        if (!t) return lt_fail(err, errlen, "out of memory for a document of %zu tokens", total);
        s->tok = t;
        s->tokcap = total;
    }
    for (size_t i = 0; i < n; i++) s->tok[i] = (unsigned char)bytes[i];
    if (s->append_eod) s->tok[n] = LT_BYTE_EOD;
    if (lt_indexed_writer_add(s->w, s->tok, (int64_t)total, err, errlen) != 0 ||
        lt_indexed_writer_end_document(s->w, err, errlen) != 0)
        return -1;
    s->docs++;
    return 0;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v')) return 0;
    return 1;
}

static int run_text(FILE *in, const char *path, sink_t *s, char *err, size_t errlen) {
    char *line = NULL, e2[512];
    size_t cap = 0;
    ssize_t got;
    buf_t doc = {0};
    int64_t lineno = 0;
    int rc = 0, have = 0;
    while ((got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        size_t n = (size_t)got;
        if (n && line[n - 1] == '\n') n--;
        if (n && line[n - 1] == '\r') n--;
        if (is_blank(line, n)) {
            if (have && emit(s, doc.d, doc.n, e2, sizeof e2) != 0) { rc = -1; break; }
            doc.n = 0;
            have = 0;
            continue;
        }
        if ((have && buf_put(&doc, "\n", 1) != 0) || buf_put(&doc, line, n) != 0) {
            snprintf(e2, sizeof e2, "out of memory");
            rc = -1;
            break;
        }
        have = 1;
    }
    if (rc == 0 && ferror(in)) { snprintf(e2, sizeof e2, "read error: %s", strerror(errno)); rc = -1; }
    if (rc == 0 && have && emit(s, doc.d, doc.n, e2, sizeof e2) != 0) rc = -1;
    if (rc != 0) lt_fail(err, errlen, "%s:%lld: %s", path, (long long)lineno, e2);
    free(line);
    free(doc.d);
    return rc;
}

static int run_jsonl(FILE *in, const char *path, const char *key, sink_t *s, char *err, size_t errlen) {
    char *line = NULL, *text = NULL, e2[512];
    size_t cap = 0, tlen;
    ssize_t got;
    int64_t lineno = 0;
    int rc = 0;
    while ((got = getline(&line, &cap, in)) >= 0) {
        lineno++;
        size_t n = (size_t)got;
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) n--;
        if (is_blank(line, n)) continue;
        int found = lt_json_get_string(line, n, key, &text, &tlen, e2, sizeof e2);
        if (found < 0) { rc = -1; break; }
        if (found == 0) {
            snprintf(e2, sizeof e2, "no key \"%s\" in the JSON object (see --json-key)", key);
            rc = -1;
            break;
        }
        int e = emit(s, text, tlen, e2, sizeof e2);
        free(text);
        text = NULL;
        if (e != 0) { rc = -1; break; }
    }
    if (rc == 0 && ferror(in)) { snprintf(e2, sizeof e2, "read error: %s", strerror(errno)); rc = -1; }
    if (rc != 0) lt_fail(err, errlen, "%s:%lld: %s", path, (long long)lineno, e2);
    free(line);
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static long long file_size(const char *path) {
    struct stat st;
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

int lt_preprocess_main(int argc, char **argv) {
    const char *input = NULL, *prefix = NULL, *format = NULL, *key = "text";
    int append_eod = 0;
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
        const char **dst = strcmp(name, "--input") == 0           ? &input
                           : strcmp(name, "--output-prefix") == 0 ? &prefix
                           : strcmp(name, "--input-format") == 0  ? &format
                           : strcmp(name, "--json-key") == 0      ? &key
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
    FILE *in = fopen(input, "rb");
    if (!in) {
        fprintf(stderr, "luatron preprocess: %s: cannot open: %s\n", input, strerror(errno));
        return 1;
    }
    char err[1024];
    if (make_parent_dirs(prefix, err, sizeof err) != 0) {
        fclose(in);
        fprintf(stderr, "luatron preprocess: %s\n", err);
        return 1;
    }
    sink_t s = {0};
    s.append_eod = append_eod;
    s.w = lt_indexed_writer_open(prefix, lt_indexed_optimal_dtype(LT_BYTE_VOCAB_SIZE), err, sizeof err);
    if (!s.w) {
        fclose(in);
        fprintf(stderr, "luatron preprocess: %s\n", err);
        return 1;
    }
    int rc = jsonl ? run_jsonl(in, input, key, &s, err, sizeof err) : run_text(in, input, &s, err, sizeof err);
    fclose(in);
    free(s.tok);
    if (rc != 0) {
        lt_indexed_writer_abort(s.w);
        fprintf(stderr, "luatron preprocess: %s\n", err);
        return 1;
    }
    int64_t tokens = lt_indexed_writer_num_tokens(s.w);
    if (lt_indexed_writer_finalize(s.w, err, sizeof err) != 0) {
        fprintf(stderr, "luatron preprocess: %s\n", err);
        return 1;
    }
    size_t plen = strlen(prefix);
    char *bin = malloc(plen + 5), *idx = malloc(plen + 5);
    if (bin && idx) {
        snprintf(bin, plen + 5, "%s.bin", prefix);
        snprintf(idx, plen + 5, "%s.idx", prefix);
        printf("preprocess: %s (%s%s%s): %lld documents, %lld tokens (byte tokenizer, vocab %d%s)",
               input, jsonl ? "jsonl, key \"" : "text", jsonl ? key : "", jsonl ? "\"" : "", (long long)s.docs,
               (long long)tokens, LT_BYTE_VOCAB_SIZE, append_eod ? ", EOD 256 appended" : "");
        if (s.empty) printf(" (%lld empty: no sequence)", (long long)s.empty);
        printf("\nwrote %s (%lld bytes) and %s (%lld bytes)\n", bin, file_size(bin), idx, file_size(idx));
    }
    free(bin);
    free(idx);
    return 0;
}

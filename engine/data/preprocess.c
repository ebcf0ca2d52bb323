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

/* ---- JSON (RFC 8259), only what is needed to pull one string out of an object ---- */
typedef struct {
    const char *s, *p, *end;
    char *err;
    size_t errlen;
} json_t;

#define JSON_MAX_DEPTH 512

static int jfail(json_t *j, const char *what) {
    return lt_fail(j->err, j->errlen, "column %zu: %s", (size_t)(j->p - j->s) + 1, what);
}

static void jws(json_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int hex4(json_t *j, unsigned *out) {
    if (j->end - j->p < 4) return jfail(j, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = j->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jfail(j, "bad hex digit in \\u escape");
    }
    j->p += 4;
    *out = v;
    return 0;
}

static int put_utf8(buf_t *b, unsigned cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); u[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    return buf_put(b, u, n);
}

/* At the opening quote; decodes into b (reset first). */
static int jstring(json_t *j, buf_t *b) {
    b->n = 0;
    if (buf_reserve(b, 0) != 0) return jfail(j, "out of memory");
    b->d[0] = 0;
    j->p++;
    for (;;) {
        const char *run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && (unsigned char)*j->p >= 0x20) j->p++;
        if (j->p > run && buf_put(b, run, (size_t)(j->p - run)) != 0) return jfail(j, "out of memory");
        if (j->p >= j->end) return jfail(j, "unterminated string");
        char c = *j->p;
        if (c == '"') { j->p++; return 0; }
        if (c != '\\') return jfail(j, "raw control character in string (must be escaped)");
        j->p++;
        if (j->p >= j->end) return jfail(j, "unterminated escape");
        char e = *j->p++, out;
        switch (e) {
        case '"': out = '"'; break;
        case '\\': out = '\\'; break;
        case '/': out = '/'; break;
        case 'b': out = '\b'; break;
        case 'f': out = '\f'; break;
        case 'n': out = '\n'; break;
        case 'r': out = '\r'; break;
        case 't': out = '\t'; break;
        case 'u': {
            unsigned cp;
            if (hex4(j, &cp) != 0) return -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return jfail(j, "unpaired low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
                    return jfail(j, "high surrogate \\u escape not followed by a low surrogate");
                j->p += 2;
                if (hex4(j, &lo) != 0) return -1;
                if (lo < 0xDC00 || lo > 0xDFFF) return jfail(j, "high surrogate followed by a non-low surrogate");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (put_utf8(b, cp) != 0) return jfail(j, "out of memory");
            continue;
        }
        default: j->p--; return jfail(j, "invalid escape in string");
        }
        if (buf_put(b, &out, 1) != 0) return jfail(j, "out of memory");
    }
}

static int jdigits(json_t *j) {
    const char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return j->p > s;
}

static int jnumber(json_t *j) {
    if (*j->p == '-') j->p++;
    if (j->p < j->end && *j->p == '0') j->p++;
    else if (!jdigits(j)) return jfail(j, "malformed number");
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jdigits(j)) return jfail(j, "malformed number: digits expected after '.'");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (!jdigits(j)) return jfail(j, "malformed number: digits expected in exponent");
    }
    return 0;
}

static int jvalue(json_t *j, buf_t *scratch, int depth);

static int jliteral(json_t *j, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) return jfail(j, "unexpected character");
    j->p += n;
    return 0;
}

static int jcontainer(json_t *j, buf_t *scratch, int depth, char close) {
    if (depth > JSON_MAX_DEPTH) return jfail(j, "nesting too deep");
    j->p++;
    jws(j);
    if (j->p < j->end && *j->p == close) { j->p++; return 0; }
    for (;;) {
        jws(j);
        if (close == '}') {
            if (j->p >= j->end || *j->p != '"') return jfail(j, "expected a string key");
            if (jstring(j, scratch) != 0) return -1;
            jws(j);
            if (j->p >= j->end || *j->p != ':') return jfail(j, "expected ':' after key");
            j->p++;
        }
        if (jvalue(j, scratch, depth + 1) != 0) return -1;
        jws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == close) { j->p++; return 0; }
        return jfail(j, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int jvalue(json_t *j, buf_t *scratch, int depth) {
    jws(j);
    if (j->p >= j->end) return jfail(j, "unexpected end of input, value expected");
    switch (*j->p) {
    case '{': return jcontainer(j, scratch, depth, '}');
    case '[': return jcontainer(j, scratch, depth, ']');
    case '"': return jstring(j, scratch);
    case 't': return jliteral(j, "true");
    case 'f': return jliteral(j, "false");
    case 'n': return jliteral(j, "null");
    default:
        if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9')) return jnumber(j);
        return jfail(j, "unexpected character, value expected");
    }
}

int lt_json_get_string(const char *text, size_t len, const char *key, char **out, size_t *outlen, char *err,
                       size_t errlen) {
    json_t j = {text, text, text + len, err, errlen};
    buf_t k = {0}, v = {0}, scratch = {0};
    int found = 0, rc = -1;
    size_t keylen = strlen(key);
    *out = NULL;
    *outlen = 0;
    jws(&j);
    if (j.p >= j.end || *j.p != '{') { jfail(&j, "expected a JSON object"); goto done; }
    j.p++;
    jws(&j);
    if (j.p < j.end && *j.p == '}') j.p++;
    else
        for (;;) {
            jws(&j);
            if (j.p >= j.end || *j.p != '"') { jfail(&j, "expected a string key"); goto done; }
            if (jstring(&j, &k) != 0) goto done;
            jws(&j);
            if (j.p >= j.end || *j.p != ':') { jfail(&j, "expected ':' after key"); goto done; }
            j.p++;
            jws(&j);
            if (k.n == keylen && memcmp(k.d, key, keylen) == 0) {
                if (j.p >= j.end || *j.p != '"') {
                    lt_fail(err, errlen, "column %zu: value of \"%s\" is not a string", (size_t)(j.p - text) + 1, key);
                    goto done;
                }
                if (jstring(&j, &v) != 0) goto done;
                found = 1;
            } else if (jvalue(&j, &scratch, 1) != 0) {
                goto done;
            }
            jws(&j);
            if (j.p < j.end && *j.p == ',') { j.p++; continue; }
            if (j.p < j.end && *j.p == '}') { j.p++; break; }
            jfail(&j, "expected ',' or '}'");
            goto done;
        }
    jws(&j);
    if (j.p != j.end) { jfail(&j, "unexpected text after the JSON object"); goto done; }
    rc = found;
    if (found) {
        *out = v.d;
        *outlen = v.n;
        v.d = NULL;
    }
done:
    free(k.d); free(v.d); free(scratch.d);
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
          "                                  blank lines are skipped\n"
          "  --json-key K           key of the text in each JSON object (default: text)\n"
          "  --append-eod           append EOD (256) to every document\n"
          "  --help                 show this help\n"
          "\n"
          "Documents with no tokens are skipped. Prints the number of documents and tokens.\n",
          f);
}

typedef struct {
    lt_indexed_writer *w;
    int append_eod;
    int32_t *tok;
    size_t tokcap;
    int64_t docs, skipped;
} sink_t;

static int emit(sink_t *s, const char *bytes, size_t n, char *err, size_t errlen) {
    size_t total = n + (s->append_eod ? 1 : 0);
    if (total == 0) { s->skipped++; return 0; }
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
        if (s.skipped) printf(", %lld empty documents skipped", (long long)s.skipped);
        printf("\nwrote %s (%lld bytes) and %s (%lld bytes)\n", bin, file_size(bin), idx, file_size(idx));
    }
    free(bin);
    free(idx);
    return 0;
}

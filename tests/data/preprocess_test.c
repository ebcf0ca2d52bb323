/* `luatron preprocess`: JSONL (with escapes) and text into an indexed dataset whose tokens
 * are exactly the document bytes; malformed input fails naming the line. */
#define _XOPEN_SOURCE 700
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "engine/data/indexed.h"
#include "engine/data/preprocess.h"
#include "tests/data/tmpdir.h"
#include "tests/tap.h"

static char err[512];
static char captured[8192];

/* Runs lt_preprocess_main with stdout and stderr captured into `captured`. */
static int run(int argc, const char **argv) {
    fflush(stdout);
    fflush(stderr);
    int out = dup(1), errfd = dup(2);
    const char *cap = tmp_path("captured.txt");
    int fd = open(cap, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
    int rc = lt_preprocess_main(argc, (char **)argv);
    fflush(stdout);
    fflush(stderr);
    dup2(out, 1);
    dup2(errfd, 2);
    close(out);
    close(errfd);
    size_t n = 0;
    unsigned char *d = read_file(cap, &n);
    if (n >= sizeof captured) n = sizeof captured - 1;
    memcpy(captured, d ? (char *)d : "", d ? n : 0);
    captured[d ? n : 0] = 0;
    for (char *c = captured; *c; c++)
        if (*c == '\n') *c = ' '; /* one TAP line per check */
    free(d);
    return rc;
}

/* Document d of the dataset at prefix equals bytes (+ EOD when eod). */
static int doc_is(lt_indexed *ds, int64_t d, const char *bytes, size_t n, int eod) {
    int64_t s = lt_indexed_document_start(ds, d);
    if (s < 0 || lt_indexed_document_start(ds, d + 1) != s + 1) return 0;
    int64_t len = lt_indexed_sequence_length(ds, s);
    if (len != (int64_t)n + (eod ? 1 : 0)) return 0;
    int32_t *t = malloc(sizeof(int32_t) * (size_t)(len ? len : 1));
    int ok = lt_indexed_read(ds, s, 0, len, t, err, sizeof err) == 0;
    for (size_t i = 0; ok && i < n; i++) ok = t[i] == (unsigned char)bytes[i];
    if (ok && eod) ok = t[n] == LT_BYTE_EOD;
    free(t);
    return ok;
}

static const char JSONL[] =
    "{\"text\": \"Hello\\nworld \\\"quoted\\\" back\\\\slash \\/ \\u00e9 \\ud83d\\ude00 \\t\\b\\f\\r end\", \"id\": 1,"
    " \"meta\": {\"a\": [1, -2.5e3, true, false, null, \"x\", {}], \"b\": []}}\n"
    "{\"id\": 2, \"text\": \"second\"}\r\n"
    "\n"
    "   \n"
    "{\"text\": \"\"}\n"
    "{\"text\": \"dup\", \"text\": \"last wins\"}\n"
    "{\"text\": \"nul:\\u0000 \\u20AC raw:\xc3\xa9\"}\n";
static const char DOC0[] = "Hello\nworld \"quoted\" back\\slash / \xc3\xa9 \xf0\x9f\x98\x80 \t\b\f\r end";
static const char DOC4[] = "nul:\0 \xe2\x82\xac raw:\xc3\xa9";

static void test_jsonl(void) {
    const char *in = tmp_path("corpus.jsonl");
    write_file(in, JSONL, sizeof JSONL - 1);
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s", tmp_path("out"));
    const char *argv[] = {"preprocess", "--input", in, "--output-prefix", prefix};
    int rc = run(5, argv);
    TAP_CHECK(rc == 0, "preprocess of a JSONL file succeeds (rc %d: %s)", rc, captured);
    TAP_CHECK(strstr(captured, "5 documents") && strstr(captured, "(1 empty: no sequence)") && strstr(captured, ".idx"),
              "summary names documents, empty ones and files: %s", captured);
    lt_indexed *ds = lt_indexed_open(prefix, err, sizeof err);
    TAP_CHECK(ds && lt_indexed_num_documents(ds) == 5 && lt_indexed_num_sequences(ds) == 4 &&
                  lt_indexed_dtype(ds) == LT_DTYPE_UINT16,
              "5 documents, 4 sequences, stored as uint16 (%s)", ds ? "ok" : err);
    if (ds) {
        TAP_CHECK(doc_is(ds, 0, DOC0, sizeof DOC0 - 1, 0), "escapes, \\u00e9 and a surrogate pair decode to exact UTF-8 bytes");
        TAP_CHECK(doc_is(ds, 1, "second", 6, 0), "key after other keys; CRLF line end");
        TAP_CHECK(lt_indexed_document_start(ds, 2) == 2 && lt_indexed_document_start(ds, 3) == 2,
                  "an empty document: an entry in the document index, no sequence (Megatron's add_document)");
        TAP_CHECK(doc_is(ds, 3, "last wins", 9, 0), "a repeated key: the last value wins");
        TAP_CHECK(doc_is(ds, 4, DOC4, sizeof DOC4 - 1, 0), "\\u0000, \\u20AC and raw UTF-8 bytes pass through");
    }
    lt_indexed_close(ds);

    const char *argv2[] = {"preprocess", "--input", in, "--output-prefix", prefix, "--append-eod"};
    rc = run(6, argv2);
    ds = rc == 0 ? lt_indexed_open(prefix, err, sizeof err) : NULL;
    TAP_CHECK(ds && lt_indexed_num_documents(ds) == 5 && lt_indexed_num_sequences(ds) == 4 &&
                  doc_is(ds, 0, DOC0, sizeof DOC0 - 1, 1) && lt_indexed_document_start(ds, 3) == 2 &&
                  doc_is(ds, 4, DOC4, sizeof DOC4 - 1, 1),
              "--append-eod ends every non-empty document with 256; an empty one stays empty");
    lt_indexed_close(ds);

    /* Another key, format forced on a .txt name. */
    const char *in2 = tmp_path("other.txt");
    const char body[] = "{\"content\": \"abc\", \"text\": 5}\n";
    write_file(in2, body, sizeof body - 1);
    const char *argv3[] = {"preprocess", "--input", in2, "--output-prefix", prefix, "--input-format=jsonl", "--json-key", "content"};
    rc = run(8, argv3);
    ds = rc == 0 ? lt_indexed_open(prefix, err, sizeof err) : NULL;
    TAP_CHECK(ds && lt_indexed_num_documents(ds) == 1 && doc_is(ds, 0, "abc", 3, 0), "--input-format jsonl and --json-key content");
    lt_indexed_close(ds);
}

static void test_text(void) {
    const char *in = tmp_path("corpus.txt");
    const char body[] = "para one\nline two\n\n\n  \t\npara two\r\nwith crlf\r\n\nlast";
    write_file(in, body, sizeof body - 1);
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s", tmp_path("text"));
    const char *argv[] = {"luatron", "preprocess", "--input", in, "--output-prefix", prefix, "--append-eod"};
    int rc = run(7, argv);
    lt_indexed *ds = rc == 0 ? lt_indexed_open(prefix, err, sizeof err) : NULL;
    TAP_CHECK(ds && lt_indexed_num_documents(ds) == 3, "text: blank lines separate 3 documents (rc %d: %s)", rc, captured);
    TAP_CHECK(ds && doc_is(ds, 0, "para one\nline two", 17, 1) && doc_is(ds, 1, "para two\nwith crlf", 18, 1) &&
                  doc_is(ds, 2, "last", 4, 1),
              "text: lines join with \\n, CR dropped, a last line without newline kept");
    lt_indexed_close(ds);
}

static void expect_error(const char *what, const char *content, const char *needle1, const char *needle2) {
    const char *in = tmp_path("bad.jsonl");
    write_file(in, content, strlen(content));
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s", tmp_path("badout"));
    const char *argv[] = {"preprocess", "--input", in, "--output-prefix", prefix};
    int rc = run(5, argv);
    char idx[4300];
    snprintf(idx, sizeof idx, "%s.idx", prefix);
    TAP_CHECK(rc == 1 && strstr(captured, needle1) && strstr(captured, needle2) && !file_exists(idx),
              "%s fails, no output: %s", what, captured);
}

static void test_errors(void) {
    expect_error("a malformed line", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\" \"x\"}\n", "bad.jsonl:3:", "column");
    expect_error("an unterminated string", "{\"text\": \"abc}\n", ":1:", "unterminated");
    expect_error("a missing key", "{\"text\": \"a\"}\n{\"body\": \"b\"}\n", ":2:", "no key \"text\"");
    expect_error("a non-string text", "{\"text\": 12}\n", ":1:", "not a string");
    expect_error("a lone high surrogate", "{\"text\": \"\\ud83d x\"}\n", ":1:", "surrogate");
    expect_error("a lone low surrogate", "{\"text\": \"\\ude00\"}\n", ":1:", "surrogate");
    expect_error("a bad escape", "{\"text\": \"\\q\"}\n", ":1:", "bad escape");
    expect_error("a raw control character", "{\"text\": \"a\tb\"}\n", ":1:", "control character");
    expect_error("a trailing comma", "{\"text\": \"a\",}\n", ":1:", "trailing comma");
    expect_error("a leading-zero number", "{\"n\": 01, \"text\": \"a\"}\n", ":1:", "leading zero");
    expect_error("an array line", "[\"text\"]\n", ":1:", "expected a JSON object");
    expect_error("text after the object", "{\"text\": \"a\"} x\n", ":1:", "after JSON value");

    const char *argv[] = {"preprocess", "--help"};
    TAP_CHECK(run(2, argv) == 0 && strstr(captured, "--input") && strstr(captured, "256") && strstr(captured, "257"),
              "--help documents the options and the byte tokenizer");
    const char *argv2[] = {"preprocess", "--input", "x.jsonl"};
    TAP_CHECK(run(3, argv2) == 2 && strstr(captured, "--output-prefix"), "missing --output-prefix is a usage error");
    const char *argv3[] = {"preprocess", "--bogus"};
    TAP_CHECK(run(2, argv3) == 2 && strstr(captured, "--bogus"), "an unknown option is a usage error");
    const char *argv4[] = {"preprocess", "--input", tmp_path("nope.jsonl"), "--output-prefix", tmp_path("o")};
    TAP_CHECK(run(5, argv4) == 1 && strstr(captured, "cannot open"), "a missing input fails: %s", captured);
    const char *argv5[] = {"preprocess", "--input", "a", "--output-prefix", "b", "--input-format", "csv"};
    TAP_CHECK(run(7, argv5) == 2 && strstr(captured, "csv"), "an unknown format is a usage error");
}

static void test_json_unit(void) {
    char *out;
    size_t n;
    const char obj[] = " {\"a\" : {\"text\": \"inner\"}, \"text\" : \"outer\" } ";
    TAP_CHECK(lt_json_get_string(obj, sizeof obj - 1, "text", &out, &n, err, sizeof err) == 1 && n == 5 &&
                  memcmp(out, "outer", 5) == 0,
              "only the top-level key counts");
    free(out);
    TAP_CHECK(lt_json_get_string("{}", 2, "text", &out, &n, err, sizeof err) == 0 && out == NULL, "an empty object has no key");
    const char mixed[] = "{\"score\": -0.5e-3, \"ok\": true, \"meta\": null, \"n\": [1.25, false], \"text\": \"a\\u0000b\"}";
    TAP_CHECK(lt_json_get_string(mixed, sizeof mixed - 1, "text", &out, &n, err, sizeof err) == 1 && n == 3 &&
                  memcmp(out, "a\0b", 3) == 0,
              "fractions, exponents, true/false/null around the text, and \\u0000 inside it: %s", err);
    free(out);
    const char esc[] = "{\"te\\u0078t\": \"k\"}";
    TAP_CHECK(lt_json_get_string(esc, sizeof esc - 1, "text", &out, &n, err, sizeof err) == 1 && n == 1 && out[0] == 'k',
              "escaped keys are decoded before comparing");
    free(out);
    char deep[1300];
    strcpy(deep, "{\"x\": ");
    size_t k = strlen(deep);
    for (int d = 0; d < 600; d++) deep[k++] = '[';
    for (int d = 0; d < 600; d++) deep[k++] = ']';
    strcpy(deep + k, "}");
    TAP_CHECK(lt_json_get_string(deep, strlen(deep), "text", &out, &n, err, sizeof err) < 0 && strstr(err, "deep"),
              "nesting deeper than 512 fails cleanly: %s", err);
    deep[107] = 0; /* 100 open brackets, never closed */
    TAP_CHECK(lt_json_get_string(deep, strlen(deep), "text", &out, &n, err, sizeof err) < 0, "unclosed nesting fails: %s", err);
    TAP_CHECK(strstr(err, "unexpected end") != NULL, "...as an unexpected end");
}

int main(void) {
    tmpdir_make("preprocess_test");
    test_jsonl();
    test_text();
    test_errors();
    test_json_unit();
    tmpdir_remove();
    return tap_done();
}

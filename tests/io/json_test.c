/* Strict JSON subset parser and writer helpers used by the safetensors header code. */
#include "engine/io/json.h"

#include <stdlib.h>
#include <string.h>

#include "tests/tap.h"

static char err[256];

static int parse(lt_json_doc *d, const char *s, int depth, size_t nodes) {
    return lt_json_parse(d, s, strlen(s), depth, nodes, err, sizeof err);
}

static void test_tree(void) {
    const char *s = " {\"a\" : [1, -2, {\"b\":\"x\\ny\\u00e9\"}], \"c\":\"\", \"big\":18446744073709551615}\n";
    lt_json_doc d;
    int rc = parse(&d, s, 8, 100);
    TAP_CHECK(rc == 0, "parse nested document (%s)", rc ? err : "");
    if (rc) {
        lt_json_free(&d);
        return;
    }
    const lt_json_node *n = d.nodes;
    TAP_CHECK(d.n == 8 && n[0].type == LT_JSON_OBJECT && n[0].len == 3, "root object with 3 members, 8 nodes");
    size_t a = n[0].first;
    TAP_CHECK(strcmp(lt_json_key(&d, a), "a") == 0 && n[a].type == LT_JSON_ARRAY && n[a].len == 3, "member a is a 3-array");
    size_t i1 = n[a].first, i2 = n[i1].next, o = n[i2].next;
    TAP_CHECK(n[i1].type == LT_JSON_INT && n[i1].mag == 1 && !n[i1].neg, "integer 1");
    TAP_CHECK(n[i2].type == LT_JSON_INT && n[i2].mag == 2 && n[i2].neg, "integer -2");
    size_t b = n[o].first;
    TAP_CHECK(n[o].type == LT_JSON_OBJECT && strcmp(lt_json_key(&d, b), "b") == 0 &&
                  strcmp(lt_json_str(&d, b), "x\ny\xc3\xa9") == 0 && n[b].len == 5,
              "escapes decoded");
    TAP_CHECK(n[b].end - n[b].pos == strlen("\"x\\ny\\u00e9\"") && s[n[b].pos] == '"' && s[n[b].end - 1] == '"',
              "string span covers the raw quoted text");
    TAP_CHECK(n[o].next == LT_JSON_NONE, "last array element has no next");
    size_t c = n[a].next, big = n[c].next;
    TAP_CHECK(strcmp(lt_json_str(&d, c), "") == 0 && n[big].mag == UINT64_MAX, "empty string and u64 max");
    TAP_CHECK(lt_json_str(&d, a) == NULL && lt_json_key(&d, 0) == NULL, "type-checked accessors");
    lt_json_free(&d);
}

static void test_limits(void) {
    lt_json_doc d;
    TAP_CHECK(parse(&d, "[1,2,3,4]", 4, 4) == -1 && strstr(err, "too many"), "node limit: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "[1,2,3]", 4, 4) == 0, "node limit inclusive");
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "[[[]]]", 3, 100) == 0, "depth 3 allowed at max_depth 3");
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "[[[]]]", 2, 100) == -1 && strstr(err, "too deep"), "depth 3 rejected at max_depth 2");
    lt_json_free(&d);
    size_t n = 1 << 20;
    char *deep = malloc(n + 1);
    memset(deep, '[', n);
    deep[n] = 0;
    TAP_CHECK(parse(&d, deep, 64, 1 << 20) == -1 && strstr(err, "too deep"), "a million '[' fail fast: %s", err);
    lt_json_free(&d);
    free(deep);
    TAP_CHECK(parse(&d, "", 4, 10) == -1, "empty input rejected: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "  ", 4, 10) == -1, "whitespace-only input rejected: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "-", 4, 10) == -1, "bare minus rejected: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "[1,]", 4, 10) == -1, "trailing comma in array rejected: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "[1 2]", 4, 10) == -1, "missing comma rejected: %s", err);
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "\"\\ud83d\\ude00\"", 4, 10) == 0 && strcmp(lt_json_str(&d, 0), "\xf0\x9f\x98\x80") == 0,
              "surrogate pair decoded to 4-byte UTF-8");
    lt_json_free(&d);
    TAP_CHECK(parse(&d, "\"\\ude00\"", 4, 10) == -1, "lone low surrogate rejected: %s", err);
    lt_json_free(&d);
}

static void test_utf8(void) {
    TAP_CHECK(lt_json_utf8_valid("a\xc3\xa9\xe2\x9c\x93\xf0\x9f\x98\x80", 10), "valid 1-4 byte sequences");
    TAP_CHECK(!lt_json_utf8_valid("\xf5\x80\x80\x80", 4), "beyond U+10FFFF rejected");
    TAP_CHECK(!lt_json_utf8_valid("\xe2\x9c", 2), "truncated sequence rejected");
    TAP_CHECK(!lt_json_utf8_valid("\xe0\x80\x80", 3), "overlong rejected");
    TAP_CHECK(!lt_json_utf8_valid("\x80", 1), "stray continuation rejected");
}

static void test_writer(void) {
    char s[64];
    int k = 0;
    for (int c = 1; c < 32; c++) s[k++] = (char)c;
    s[k++] = '"';
    s[k++] = '\\';
    s[k++] = '/';
    s[k++] = 'z';
    s[k] = 0;
    lt_json_buf b = {0};
    lt_json_buf_raw(&b, "[", 1);
    lt_json_buf_string(&b, s);
    lt_json_buf_raw(&b, ",", 1);
    lt_json_buf_u64(&b, UINT64_MAX);
    lt_json_buf_raw(&b, "]", 1);
    lt_json_doc d;
    int rc = b.oom ? -1 : lt_json_parse(&d, b.p, b.n, 4, 10, err, sizeof err);
    TAP_CHECK(rc == 0 && strcmp(lt_json_str(&d, 1), s) == 0 && d.nodes[2].mag == UINT64_MAX,
              "escaped string and u64 parse back to the same values (%s)", rc ? err : "");
    if (rc == 0) lt_json_free(&d);
    lt_json_buf_free(&b);
}

int main(void) {
    test_tree();
    test_limits();
    test_utf8();
    test_writer();
    return tap_done();
}

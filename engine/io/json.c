/* Strict JSON subset parser: see json.h for what is accepted and why. */
#include "engine/io/json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const unsigned char *s;
    size_t n, i;
    lt_json_doc *d;
    int max_depth;
    size_t max_nodes;
    char *err;
    size_t errlen;
    unsigned flags;
} parser;

static int fail(parser *p, const char *msg) {
    if (p->err && p->errlen) snprintf(p->err, p->errlen, "%s at byte %zu", msg, p->i);
    p->d->err_pos = p->i;
    return -1;
}

static void skip_ws(parser *p) {
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->i++;
    }
}

/* Appends a node; returns its index or NONE (error already reported). */
static size_t new_node(parser *p, lt_json_type type) {
    lt_json_doc *d = p->d;
    if (d->n >= p->max_nodes) {
        fail(p, "too many JSON values");
        return LT_JSON_NONE;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 64;
        if (cap > p->max_nodes) cap = p->max_nodes;
        lt_json_node *nodes = realloc(d->nodes, cap * sizeof *nodes);
        if (!nodes) {
            fail(p, "out of memory");
            return LT_JSON_NONE;
        }
        d->nodes = nodes;
        d->cap = cap;
    }
    lt_json_node *nd = &d->nodes[d->n];
    memset(nd, 0, sizeof *nd);
    nd->type = type;
    nd->key = nd->first = nd->next = LT_JSON_NONE;
    nd->pos = p->i;
    return d->n++;
}

static int str_push(parser *p, const char *bytes, size_t k) {
    lt_json_doc *d = p->d;
    if (d->slen + k > d->scap) {
        size_t cap = d->scap ? d->scap : 256;
        while (cap < d->slen + k) cap *= 2;
        char *s = realloc(d->strs, cap);
        if (!s) return fail(p, "out of memory");
        d->strs = s;
        d->scap = cap;
    }
    memcpy(d->strs + d->slen, bytes, k);
    d->slen += k;
    return 0;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if malformed. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) k = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, cp = c & 0x07;
    else return 0;
    if (n < k) return 0;
    for (size_t j = 1; j < k; j++) {
        if ((s[j] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[j] & 0x3F);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && cp < 0x10000)) return 0; /* overlong */
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;                      /* surrogate */
    if (cp > 0x10FFFF) return 0;
    return k;
}

int lt_json_utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_seq(u + i, n - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

static int hex4(parser *p, uint32_t *out) {
    if (p->n - p->i < 4) return fail(p, "truncated \\u escape");
    uint32_t v = 0;
    for (int j = 0; j < 4; j++) {
        unsigned char c = p->s[p->i + j];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return fail(p, "bad \\u escape");
    }
    p->i += 4;
    *out = v;
    return 0;
}

/* Parses a string at p->i (which is '"'); stores decoded text, returns its offset. */
static int parse_string(parser *p, size_t *off, size_t *len) {
    p->i++; /* opening quote */
    size_t start = p->d->slen;
    for (;;) {
        if (p->i >= p->n) return fail(p, "unterminated string");
        unsigned char c = p->s[p->i];
        if (c == '"') {
            p->i++;
            break;
        }
        if (c < 0x20) return fail(p, "raw control character in string");
        if (c == '\\') {
            if (p->i + 1 >= p->n) return fail(p, "unterminated string");
            unsigned char e = p->s[p->i + 1];
            char out = 0;
            switch (e) {
            case '"': out = '"'; break;
            case '\\': out = '\\'; break;
            case '/': out = '/'; break;
            case 'b': out = '\b'; break;
            case 'f': out = '\f'; break;
            case 'n': out = '\n'; break;
            case 'r': out = '\r'; break;
            case 't': out = '\t'; break;
            case 'u': break;
            default: return fail(p, "bad escape in string");
            }
            if (e != 'u') {
                p->i += 2;
                if (str_push(p, &out, 1)) return -1;
                continue;
            }
            p->i += 2;
            uint32_t cp;
            if (hex4(p, &cp)) return -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(p, "lone low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* needs a following low surrogate */
                uint32_t lo;
                if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
                    return fail(p, "lone high surrogate in \\u escape");
                p->i += 2;
                if (hex4(p, &lo)) return -1;
                if (lo < 0xDC00 || lo > 0xDFFF) return fail(p, "bad surrogate pair in \\u escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp == 0 && !(p->flags & LT_JSON_ANY)) return fail(p, "\\u0000 in string");
            char u[4];
            size_t k;
            if (cp < 0x80) u[0] = (char)cp, k = 1;
            else if (cp < 0x800) u[0] = (char)(0xC0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3F)), k = 2;
            else if (cp < 0x10000)
                u[0] = (char)(0xE0 | (cp >> 12)), u[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
                u[2] = (char)(0x80 | (cp & 0x3F)), k = 3;
            else
                u[0] = (char)(0xF0 | (cp >> 18)), u[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
                u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F)), k = 4;
            if (str_push(p, u, k)) return -1;
            continue;
        }
        size_t k = utf8_seq(p->s + p->i, p->n - p->i);
        if (!k) return fail(p, "invalid UTF-8 in string");
        if (str_push(p, (const char *)p->s + p->i, k)) return -1;
        p->i += k;
    }
    *len = p->d->slen - start;
    *off = start;
    return str_push(p, "", 1);
}

static int parse_int(parser *p, size_t node) {
    lt_json_node *nd = &p->d->nodes[node];
    if (p->s[p->i] == '-') {
        nd->neg = 1;
        p->i++;
    }
    if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return fail(p, "bad number");
    if (p->s[p->i] == '0' && p->i + 1 < p->n && p->s[p->i + 1] >= '0' && p->s[p->i + 1] <= '9')
        return fail(p, "number with leading zero");
    uint64_t v = 0;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') {
        unsigned d = p->s[p->i] - '0';
        if (v > (UINT64_MAX - d) / 10) return fail(p, "integer too large");
        v = v * 10 + d;
        p->i++;
    }
    if (p->i < p->n && (p->s[p->i] == '.' || p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        if (!(p->flags & LT_JSON_ANY)) return fail(p, "non-integer number");
        nd->type = LT_JSON_NUMBER;
        if (p->s[p->i] == '.') {
            p->i++;
            if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return fail(p, "bad number");
            while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
        }
        if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
            p->i++;
            if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) p->i++;
            if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return fail(p, "bad number");
            while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
        }
        return 0;
    }
    nd->mag = v;
    return 0;
}

/* true, false or null (LT_JSON_ANY only). */
static int parse_literal(parser *p) {
    static const char *const words[] = {"true", "false", "null"};
    for (int w = 0; w < 3; w++) {
        size_t k = strlen(words[w]);
        if (p->n - p->i >= k && memcmp(p->s + p->i, words[w], k) == 0) {
            p->i += k;
            return 0;
        }
    }
    return fail(p, "unexpected character, value expected");
}

static int parse_value(parser *p, int depth, size_t *out);

/* Objects and arrays share one loop; bounded recursion (depth <= max_depth). */
static int parse_container(parser *p, int depth, size_t node, int is_obj) {
    char close = is_obj ? '}' : ']';
    size_t last = LT_JSON_NONE, count = 0;
    p->i++; /* opening bracket */
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == (unsigned char)close) {
        p->i++;
        return 0;
    }
    for (;;) {
        size_t key = LT_JSON_NONE, child;
        if (is_obj) {
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != '"') return fail(p, "expected string key");
            size_t klen;
            if (parse_string(p, &key, &klen)) return -1;
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') return fail(p, "expected ':'");
            p->i++;
        }
        if (parse_value(p, depth + 1, &child)) return -1;
        p->d->nodes[child].key = key;
        if (last == LT_JSON_NONE) p->d->nodes[node].first = child;
        else p->d->nodes[last].next = child;
        last = child;
        count++;
        skip_ws(p);
        if (p->i >= p->n) return fail(p, is_obj ? "unterminated object" : "unterminated array");
        if (p->s[p->i] == ',') {
            p->i++;
            skip_ws(p);
            if (p->i < p->n && p->s[p->i] == (unsigned char)close) return fail(p, "trailing comma");
            continue;
        }
        if (p->s[p->i] == (unsigned char)close) {
            p->i++;
            break;
        }
        return fail(p, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    p->d->nodes[node].len = count;
    return 0;
}

static int parse_value(parser *p, int depth, size_t *out) {
    skip_ws(p);
    if (p->i >= p->n) return fail(p, "unexpected end of input");
    unsigned char c = p->s[p->i];
    size_t node;
    int rc;
    if (c == '{' || c == '[') {
        if (depth >= p->max_depth) return fail(p, "nesting too deep");
        node = new_node(p, c == '{' ? LT_JSON_OBJECT : LT_JSON_ARRAY);
        if (node == LT_JSON_NONE) return -1;
        rc = parse_container(p, depth, node, c == '{');
    } else if (c == '"') {
        node = new_node(p, LT_JSON_STRING);
        if (node == LT_JSON_NONE) return -1;
        size_t off, len;
        rc = parse_string(p, &off, &len);
        if (!rc) p->d->nodes[node].str = off, p->d->nodes[node].len = len;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        node = new_node(p, LT_JSON_INT);
        if (node == LT_JSON_NONE) return -1;
        rc = parse_int(p, node);
    } else if ((p->flags & LT_JSON_ANY) && (c == 't' || c == 'f' || c == 'n')) {
        node = new_node(p, LT_JSON_LITERAL);
        if (node == LT_JSON_NONE) return -1;
        rc = parse_literal(p);
    } else {
        return fail(p, "unsupported JSON value (only objects, arrays, strings and integers)");
    }
    if (rc) return -1;
    p->d->nodes[node].end = p->i;
    *out = node;
    return 0;
}

int lt_json_parse(lt_json_doc *doc, const char *text, size_t len, int max_depth, size_t max_nodes,
                  char *err, size_t errlen) {
    return lt_json_parse_ex(doc, text, len, max_depth, max_nodes, 0, err, errlen);
}

int lt_json_parse_ex(lt_json_doc *doc, const char *text, size_t len, int max_depth, size_t max_nodes,
                     unsigned flags, char *err, size_t errlen) {
    memset(doc, 0, sizeof *doc);
    parser p = {(const unsigned char *)text, len, 0, doc, max_depth, max_nodes ? max_nodes : 1, err, errlen, flags};
    size_t root;
    if (parse_value(&p, 0, &root)) return -1;
    skip_ws(&p);
    if (p.i != p.n) return fail(&p, "unexpected data after JSON value");
    return 0;
}

void lt_json_free(lt_json_doc *doc) {
    free(doc->nodes);
    free(doc->strs);
    memset(doc, 0, sizeof *doc);
}

const char *lt_json_str(const lt_json_doc *doc, size_t node) {
    if (node >= doc->n || doc->nodes[node].type != LT_JSON_STRING) return NULL;
    return doc->strs + doc->nodes[node].str;
}

const char *lt_json_key(const lt_json_doc *doc, size_t node) {
    if (node >= doc->n || doc->nodes[node].key == LT_JSON_NONE) return NULL;
    return doc->strs + doc->nodes[node].key;
}

/* ---- writing ---- */

void lt_json_buf_raw(lt_json_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) {
            if (cap > ((size_t)-1) / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0; /* keep it a C string for debugging */
}

void lt_json_buf_puts(lt_json_buf *b, const char *s) { lt_json_buf_raw(b, s, strlen(s)); }

void lt_json_buf_u64(lt_json_buf *b, uint64_t v) {
    char tmp[24];
    int k = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    lt_json_buf_raw(b, tmp, (size_t)k);
}

void lt_json_buf_string(lt_json_buf *b, const char *s) {
    lt_json_buf_raw(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        lt_json_buf_raw(b, run, (size_t)(s - run));
        char esc[8];
        switch (c) {
        case '"': lt_json_buf_raw(b, "\\\"", 2); break;
        case '\\': lt_json_buf_raw(b, "\\\\", 2); break;
        case '\n': lt_json_buf_raw(b, "\\n", 2); break;
        case '\r': lt_json_buf_raw(b, "\\r", 2); break;
        case '\t': lt_json_buf_raw(b, "\\t", 2); break;
        case '\b': lt_json_buf_raw(b, "\\b", 2); break;
        case '\f': lt_json_buf_raw(b, "\\f", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            lt_json_buf_raw(b, esc, 6);
        }
        run = s + 1;
    }
    lt_json_buf_raw(b, run, (size_t)(s - run));
    lt_json_buf_raw(b, "\"", 1);
}

void lt_json_buf_free(lt_json_buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

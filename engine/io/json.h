/* A small, strict JSON parser and writer helpers for file headers (safetensors).
 *
 * Only the subset real headers need is accepted: objects, arrays, strings (with all JSON
 * escapes, validated UTF-8) and integers. Floats, true/false/null, leading zeros, trailing
 * commas and raw control characters are rejected, because a header that contains them
 * was not written by a well-behaved writer and is more likely corrupt than creative.
 * Nesting depth and node count are capped by the caller so that hostile input can neither
 * blow the stack nor the heap. Strings containing NUL (\u0000) are rejected so decoded
 * strings are safe to use as C strings. lt_json_parse_ex(LT_JSON_ANY) lifts these limits for
 * general data. */
#ifndef LT_JSON_H
#define LT_JSON_H
#include <stddef.h>
#include <stdint.h>

typedef enum { LT_JSON_OBJECT = 1, LT_JSON_ARRAY, LT_JSON_STRING, LT_JSON_INT, LT_JSON_NUMBER, LT_JSON_LITERAL } lt_json_type;

#define LT_JSON_NONE ((size_t)-1)

/* One value. Nodes live in one array in document (pre-)order: a container's children
 * follow it and are chained through `next`; indices stay valid while the array grows. */
typedef struct {
    lt_json_type type;
    int neg;        /* INT: 1 when written with a leading '-' */
    uint64_t mag;   /* INT: absolute value */
    size_t str;     /* STRING: offset of the decoded, NUL-terminated text in doc->strs */
    size_t len;     /* STRING: decoded length in bytes; OBJECT/ARRAY: number of children */
    size_t key;     /* member of an OBJECT: offset of its decoded key in doc->strs, else NONE */
    size_t first;   /* OBJECT/ARRAY: index of the first child, or NONE */
    size_t next;    /* next sibling, or NONE */
    size_t pos;     /* byte span [pos, end) of the value in the input (strings: with quotes) */
    size_t end;
} lt_json_node;

typedef struct {
    lt_json_node *nodes; /* nodes[0] is the root */
    size_t n, cap;
    char *strs; /* decoded strings and keys, each NUL-terminated */
    size_t slen, scap;
    size_t err_pos; /* after a failed parse: the byte offset of the problem */
} lt_json_doc;

/* Parses text[0..len) (all of it: only whitespace may follow the root value).
 * Returns 0, or -1 with a message naming the byte offset in err. The doc must be freed
 * with lt_json_free in both cases. max_depth bounds container nesting; max_nodes bounds
 * the number of values. */
int lt_json_parse(lt_json_doc *doc, const char *text, size_t len, int max_depth, size_t max_nodes,
                  char *err, size_t errlen);
/* The same with flags. LT_JSON_ANY accepts all of JSON, as data files (JSONL corpora) need:
 * fractions and exponents (LT_JSON_NUMBER, span only: pos/end), true/false/null
 * (LT_JSON_LITERAL, span only) and \u0000 inside strings (then use the node's len, not strlen). */
enum { LT_JSON_ANY = 1 };
int lt_json_parse_ex(lt_json_doc *doc, const char *text, size_t len, int max_depth, size_t max_nodes,
                     unsigned flags, char *err, size_t errlen);
void lt_json_free(lt_json_doc *doc);

/* Decoded text of a STRING node, or the key of an object member (NULL when none). */
const char *lt_json_str(const lt_json_doc *doc, size_t node);
const char *lt_json_key(const lt_json_doc *doc, size_t node);

/* 1 if s[0..n) is well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF). */
int lt_json_utf8_valid(const char *s, size_t n);

/* Growable output buffer for writing JSON; `oom` latches the first allocation failure so
 * callers can append freely and check once at the end. */
typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} lt_json_buf;

void lt_json_buf_raw(lt_json_buf *b, const char *s, size_t n);
void lt_json_buf_puts(lt_json_buf *b, const char *s);
void lt_json_buf_u64(lt_json_buf *b, uint64_t v);
/* Appends s as a quoted JSON string, escaping '"', '\\' and control characters. */
void lt_json_buf_string(lt_json_buf *b, const char *s);
void lt_json_buf_free(lt_json_buf *b);

#endif

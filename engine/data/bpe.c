/* Byte-level BPE: see bpe.h. Written from the algorithm's description (GPT-2's encoder.py: merge the
 * lowest-ranked adjacent pair everywhere in the word, repeat until no pair has a rank). */
#include "engine/data/bpe.h"

#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"
#include "engine/data/unicode_nfc.h"
#include "engine/data/unicode_tables.h"

int lt_token_buf_push(lt_token_buf *b, int32_t id) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        int32_t *d = realloc(b->ids, cap * sizeof *d);
        if (!d) return -1;
        b->ids = d;
        b->cap = cap;
    }
    b->ids[b->n++] = id;
    return 0;
}

void lt_token_buf_free(lt_token_buf *b) {
    free(b->ids);
    b->ids = NULL;
    b->n = b->cap = 0;
}

/* ---- byte arena and a byte-string -> int map (open addressing, FNV-1a) ---- */
typedef struct {
    char *d;
    size_t n, cap;
} arena_t;

static int64_t arena_put(arena_t *a, const void *s, size_t n) {
    if (a->n + n > a->cap) {
        size_t cap = a->cap ? a->cap : 4096;
        while (cap < a->n + n) cap *= 2;
        char *d = realloc(a->d, cap);
        if (!d) return -1;
        a->d = d;
        a->cap = cap;
    }
    if (n) memcpy(a->d + a->n, s, n);
    a->n += n;
    return (int64_t)(a->n - n);
}

typedef struct {
    uint64_t off; /* into the map's arena */
    uint32_t len;
    uint32_t hash;
    int64_t val;
    int used;
} smap_slot;

typedef struct {
    smap_slot *slots;
    size_t cap, count; /* cap: a power of two */
    arena_t keys;
} smap_t;

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static smap_slot *smap_find(const smap_t *m, const char *s, size_t n, uint32_t h) {
    if (!m->cap) return NULL;
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        smap_slot *e = &m->slots[i];
        if (!e->used) return e;
        if (e->hash == h && e->len == n && memcmp(m->keys.d + e->off, s, n) == 0) return e;
    }
}

static int smap_grow(smap_t *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    smap_slot *old = m->slots, *s = calloc(cap, sizeof *s);
    if (!s) return -1;
    size_t oldcap = m->cap;
    m->slots = s;
    m->cap = cap;
    for (size_t i = 0; i < oldcap; i++) {
        if (!old[i].used) continue;
        size_t j = old[i].hash & (cap - 1);
        while (s[j].used) j = (j + 1) & (cap - 1);
        s[j] = old[i];
    }
    free(old);
    return 0;
}

/* Sets s -> val (replacing); returns the slot or NULL when out of memory. */
static smap_slot *smap_set(smap_t *m, const char *s, size_t n, int64_t val) {
    if ((m->count + 1) * 2 > m->cap && smap_grow(m) != 0) return NULL;
    uint32_t h = hash_bytes(s, n);
    smap_slot *e = smap_find(m, s, n, h);
    if (!e->used) {
        int64_t off = arena_put(&m->keys, s, n);
        if (off < 0) return NULL;
        e->off = (uint64_t)off;
        e->len = (uint32_t)n;
        e->hash = h;
        e->used = 1;
        m->count++;
    }
    e->val = val;
    return e;
}

static const smap_slot *smap_get(const smap_t *m, const char *s, size_t n) {
    const smap_slot *e = smap_find(m, s, n, hash_bytes(s, n));
    return e && e->used ? e : NULL;
}

static void smap_clear(smap_t *m) {
    if (m->slots) memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->count = 0;
    m->keys.n = 0;
}

static void smap_free(smap_t *m) {
    free(m->slots);
    free(m->keys.d);
    memset(m, 0, sizeof *m);
}

/* An added token matched in the text: its id, the bytes it is matched as (its content, or the NFC of
 * it for a normalized token under the NFC normalizer) and whether it is matched in the normalized text. */
typedef struct {
    int32_t id;
    uint32_t len;
    uint64_t off; /* into special_bytes */
    int normalized;
} special_t;

/* ---- merges: (left id, right id) -> (rank, merged id) ---- */
typedef struct {
    uint64_t key; /* left << 32 | right, +1 so that 0 means empty */
    int32_t rank, merged;
} merge_slot;

struct lt_bpe {
    smap_t vocab;                 /* raw bytes -> id */
    uint64_t *id_off;             /* id -> offset into id_bytes, UINT64_MAX for a hole */
    uint32_t *id_len;
    size_t id_cap;
    int64_t id_limit;
    arena_t id_bytes;
    merge_slot *merges;
    size_t mcap, mcount;
    int32_t byte_id[256];
    special_t *special; /* added tokens matched in the text, longest first */
    size_t nspecial, nspecial_pass[2];
    arena_t special_bytes;             /* what each is matched as */
    unsigned char special_first[2][256]; /* [normalized][first byte] */
    lt_bpe_pre pre;
    int add_prefix_space, ignore_merges, nfc;
    smap_t cache;         /* word bytes -> offset << 20 | count into cache_ids */
    lt_token_buf cache_ids;
    uint32_t unicode_to_byte[324]; /* bytes_to_unicode's code points are all below 324 */
};

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static merge_slot *merge_find(const lt_bpe *b, uint64_t key) {
    if (!b->mcap) return NULL;
    for (size_t i = mix64(key) & (b->mcap - 1);; i = (i + 1) & (b->mcap - 1))
        if (b->merges[i].key == key || b->merges[i].key == 0) return &b->merges[i];
}

static int merge_grow(lt_bpe *b) {
    size_t cap = b->mcap ? b->mcap * 2 : 4096;
    merge_slot *s = calloc(cap, sizeof *s), *old = b->merges;
    if (!s) return -1;
    size_t oldcap = b->mcap;
    b->merges = s;
    b->mcap = cap;
    for (size_t i = 0; i < oldcap; i++)
        if (old[i].key) *merge_find(b, old[i].key) = old[i];
    free(old);
    return 0;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the others (controls, space,
 * 0x7F-0xA0, 0xAD) for 256, 257, ... in byte order, so every byte has a visible character. */
uint32_t lt_bpe_byte_to_unicode(unsigned byte) {
    byte &= 0xFF;
    int printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || (byte >= 0xAE);
    if (printable) return byte;
    unsigned k = 0;
    for (unsigned c = 0; c < byte; c++)
        if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE))) k++;
    return 256 + k;
}

lt_bpe *lt_bpe_new(void) {
    lt_bpe *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    for (int i = 0; i < 256; i++) b->byte_id[i] = -1;
    for (size_t i = 0; i < 324; i++) b->unicode_to_byte[i] = UINT32_MAX;
    for (unsigned i = 0; i < 256; i++) b->unicode_to_byte[lt_bpe_byte_to_unicode(i)] = i;
    b->pre = LT_BPE_PRE_GPT2;
    return b;
}

void lt_bpe_free(lt_bpe *b) {
    if (!b) return;
    smap_free(&b->vocab);
    smap_free(&b->cache);
    free(b->id_off);
    free(b->id_len);
    free(b->id_bytes.d);
    free(b->merges);
    free(b->special);
    free(b->special_bytes.d);
    lt_token_buf_free(&b->cache_ids);
    free(b);
}

/* One UTF-8 code point at s[i] (n bytes in all): its value, and its length in *len. A malformed
 * sequence is one byte long and decodes to LT_BAD_CP (a symbol, neither letter, number nor space). */
#define LT_BAD_CP 0x110000u
static uint32_t utf8_next(const unsigned char *s, size_t n, size_t i, size_t *len) {
    unsigned c = s[i];
    if (c < 0x80) { *len = 1; return c; }
    size_t k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (k == 0 || (k == 4 && c > 0xF4) || i + k > n) { *len = 1; return LT_BAD_CP; }
    uint32_t cp = c & (0x7F >> k);
    for (size_t j = 1; j < k; j++) {
        if ((s[i + j] & 0xC0) != 0x80) { *len = 1; return LT_BAD_CP; }
        cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if ((k == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
        *len = 1;
        return LT_BAD_CP;
    }
    *len = k;
    return cp;
}

int lt_bpe_add_token(lt_bpe *b, const char *tok, size_t n, int32_t id, int raw, char *err, size_t errlen) {
    if (id < 0) return lt_fail(err, errlen, "token id %d is negative", (int)id);
    char stackbuf[256], *bytes = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!bytes) return lt_fail(err, errlen, "out of memory");
    size_t m = 0;
    if (raw) {
        memcpy(bytes, tok, n);
        m = n;
    } else {
        for (size_t i = 0, len; i < n; i += len) {
            uint32_t cp = utf8_next((const unsigned char *)tok, n, i, &len);
            if (cp >= 324 || b->unicode_to_byte[cp] == UINT32_MAX) {
                if (bytes != stackbuf) free(bytes);
                return lt_fail(err, errlen, "token \"%.*s\" (id %d) has the character U+%04X, which is not in "
                               "GPT-2's byte-to-unicode alphabet", (int)(n > 60 ? 60 : n), tok, (int)id, cp);
            }
            bytes[m++] = (char)b->unicode_to_byte[cp];
        }
    }
    int rc = 0;
    if ((size_t)id >= b->id_cap) {
        size_t cap = b->id_cap ? b->id_cap : 1024;
        while (cap <= (size_t)id) cap *= 2;
        uint64_t *o = realloc(b->id_off, cap * sizeof *o);
        if (o) b->id_off = o;
        uint32_t *l = o ? realloc(b->id_len, cap * sizeof *l) : NULL;
        if (!l) { rc = lt_fail(err, errlen, "out of memory"); goto done; }
        b->id_len = l;
        for (size_t i = b->id_cap; i < cap; i++) b->id_off[i] = UINT64_MAX;
        b->id_cap = cap;
    }
    int64_t off = arena_put(&b->id_bytes, bytes, m);
    if (off < 0 || !smap_set(&b->vocab, bytes, m, id)) { rc = lt_fail(err, errlen, "out of memory"); goto done; }
    b->id_off[id] = (uint64_t)off;
    b->id_len[id] = (uint32_t)m;
    if (id + 1 > b->id_limit) b->id_limit = id + 1;
    if (m == 1) b->byte_id[(unsigned char)bytes[0]] = id;
done:
    if (bytes != stackbuf) free(bytes);
    return rc;
}

/* Raw bytes of a vocabulary string in the bytes_to_unicode alphabet, into out (cap bytes); -1 if a
 * character is outside the alphabet or out is too small. */
static long unmap(const lt_bpe *b, const char *s, size_t n, char *out, size_t cap) {
    size_t m = 0;
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t cp = utf8_next((const unsigned char *)s, n, i, &len);
        if (cp >= 324 || b->unicode_to_byte[cp] == UINT32_MAX || m >= cap) return -1;
        out[m++] = (char)b->unicode_to_byte[cp];
    }
    return (long)m;
}

int lt_bpe_add_merge(lt_bpe *b, const char *a, size_t an, const char *bs, size_t bn, char *err, size_t errlen) {
    char ra[1024], rb[1024], rab[2048];
    ra[0] = rb[0] = 0; /* an empty part never reads them, but the compiler cannot tell */
    long la = unmap(b, a, an, ra, sizeof ra), lb = unmap(b, bs, bn, rb, sizeof rb);
    if (la < 0 || lb < 0)
        return lt_fail(err, errlen, "merge \"%.*s %.*s\" has a character outside GPT-2's byte-to-unicode alphabet "
                       "(or a part longer than 1024 bytes)", (int)an, a, (int)bn, bs);
    const smap_slot *ea = smap_get(&b->vocab, ra, (size_t)la), *eb = smap_get(&b->vocab, rb, (size_t)lb);
    memcpy(rab, ra, (size_t)la);
    memcpy(rab + la, rb, (size_t)lb);
    const smap_slot *eab = smap_get(&b->vocab, rab, (size_t)(la + lb));
    if (!ea || !eb || !eab)
        return lt_fail(err, errlen, "merge \"%.*s %.*s\": \"%.*s%s\" is not in the vocabulary", (int)an, a, (int)bn,
                       bs, (int)(!ea ? an : !eb ? bn : an), !ea ? a : !eb ? bs : a,
                       (!ea || !eb) ? "" : " + its right part (the merged token)");
    if ((b->mcount + 1) * 2 > b->mcap && merge_grow(b) != 0) return lt_fail(err, errlen, "out of memory");
    uint64_t key = ((uint64_t)(uint32_t)ea->val << 32 | (uint32_t)eb->val) + 1;
    merge_slot *s = merge_find(b, key);
    /* A repeated merge takes its later rank, as GPT-2's dict(zip(merges, range(...))) and the Hugging Face
     * BPE's map do; ranks count lines either way. */
    s->key = key;
    s->rank = (int32_t)b->mcount++;
    s->merged = (int32_t)eab->val;
    return 0;
}

int lt_bpe_add_special(lt_bpe *b, int32_t id, int normalized, char *err, size_t errlen) {
    size_t n = 0;
    const char *content = lt_bpe_token_bytes(b, id, &n);
    if (!content || n == 0) return lt_fail(err, errlen, "added token id %d is not in the vocabulary", (int)id);
    char *norm = NULL;
    size_t nn = 0;
    normalized = normalized != 0;
    if (normalized && b->nfc && lt_nfc(content, n, &norm, &nn) != 0) return lt_fail(err, errlen, "out of memory");
    if (norm) content = norm, n = nn;
    special_t *s = realloc(b->special, (b->nspecial + 1) * sizeof *s);
    int64_t off = s ? arena_put(&b->special_bytes, content, n) : -1;
    unsigned char first = (unsigned char)content[0];
    free(norm);
    if (!s || off < 0) {
        if (s) b->special = s;
        return lt_fail(err, errlen, "out of memory");
    }
    b->special = s;
    /* Keep longest first, so the first match at a position is the longest. */
    size_t i = b->nspecial++;
    while (i > 0 && s[i - 1].len < n) {
        s[i] = s[i - 1];
        i--;
    }
    s[i] = (special_t){.id = id, .len = (uint32_t)n, .off = (uint64_t)off, .normalized = normalized};
    b->nspecial_pass[normalized]++;
    b->special_first[normalized][first] = 1;
    return 0;
}

void lt_bpe_set_nfc(lt_bpe *b, int on) { b->nfc = on != 0; }

void lt_bpe_set_options(lt_bpe *b, lt_bpe_pre pre, int add_prefix_space, int ignore_merges) {
    b->pre = pre;
    b->add_prefix_space = add_prefix_space;
    b->ignore_merges = ignore_merges;
}

void lt_bpe_enable_ignore_merges(lt_bpe *b) { b->ignore_merges = 1; }

int lt_bpe_finish(lt_bpe *b, char *err, size_t errlen) {
    for (int i = 0; i < 256; i++)
        if (b->byte_id[i] < 0)
            return lt_fail(err, errlen, "the vocabulary has no token for the byte 0x%02X (\"\\u%04x\"): a byte-level BPE "
                           "needs all 256", i, lt_bpe_byte_to_unicode((unsigned)i));
    return 0;
}

int32_t lt_bpe_token_id(const lt_bpe *b, const char *s, size_t n) {
    const smap_slot *e = smap_get(&b->vocab, s, n);
    return e ? (int32_t)e->val : -1;
}

int32_t lt_bpe_spelled_id(const lt_bpe *b, const char *s, size_t n) {
    char raw[1024];
    long m = unmap(b, s, n, raw, sizeof raw);
    return m < 0 ? -1 : lt_bpe_token_id(b, raw, (size_t)m);
}

const char *lt_bpe_token_bytes(const lt_bpe *b, int32_t id, size_t *n) {
    if (id < 0 || id >= b->id_limit || b->id_off[id] == UINT64_MAX) return NULL;
    *n = b->id_len[id];
    return b->id_bytes.d + b->id_off[id];
}

int64_t lt_bpe_num_tokens(const lt_bpe *b) { return (int64_t)b->vocab.count; }
int64_t lt_bpe_id_limit(const lt_bpe *b) { return b->id_limit; }
int64_t lt_bpe_num_merges(const lt_bpe *b) { return (int64_t)b->mcount; }

/* ---- character classes ---- */
static int is_space(uint32_t c) { /* Unicode White_Space, as the regex engines' \s */
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

static int uni_class(uint32_t c) {
    if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ? LT_UNI_LETTER
                         : (c >= '0' && c <= '9')                          ? LT_UNI_NUMBER
                                                                           : LT_UNI_OTHER;
    int lo = 0, hi = lt_unicode_nranges - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < lt_unicode_ranges[mid].lo) hi = mid - 1;
        else if (c > lt_unicode_ranges[mid].hi) lo = mid + 1;
        else return lt_unicode_ranges[mid].cls;
    }
    return LT_UNI_OTHER;
}

/* Class of a code point for the patterns: letter, number, space, or other (a symbol). */
enum { C_L, C_N, C_S, C_O };
static int klass(uint32_t c) {
    if (is_space(c)) return C_S;
    int u = uni_class(c);
    return u == LT_UNI_LETTER ? C_L : u == LT_UNI_NUMBER ? C_N : C_O;
}

typedef struct {
    const unsigned char *s;
    size_t n;
} text_t;

static uint32_t cp_at(text_t t, size_t i, size_t *len) { return utf8_next(t.s, t.n, i, len); }

/* End of the run of class k starting at i (at most max code points). */
static size_t run_end(text_t t, size_t i, int k, size_t max) {
    size_t len, count = 0;
    while (i < t.n && count < max && klass(cp_at(t, i, &len)) == k) i += len, count++;
    return i;
}

/* \s+(?!\S)|\s+ at i (a space): the whole run when it ends the text, else all but its last character
 * (which then starts the next word), else the one space. */
static size_t space_run(text_t t, size_t i) {
    size_t len, j = i, last = i, count = 0;
    while (j < t.n && klass(cp_at(t, j, &len)) == C_S) last = j, j += len, count++;
    return j == t.n || count == 1 ? j : last;
}

static int lower(unsigned c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* 's 't 're 've 'm 'll 'd at i; case-insensitive for Llama-3's (?i:...). Returns the length or 0. */
static size_t contraction(text_t t, size_t i, int icase) {
    if (t.s[i] != '\'' || i + 1 >= t.n) return 0;
    unsigned a = t.s[i + 1], b = i + 2 < t.n ? t.s[i + 2] : 0;
    if (icase) a = (unsigned)lower(a), b = (unsigned)lower(b);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* End of the word starting at i < t.n, by GPT-2's pattern. */
static size_t word_gpt2(text_t t, size_t i) {
    size_t c = contraction(t, i, 0), len, len2;
    if (c) return i + c;
    uint32_t cp = cp_at(t, i, &len);
    int k = klass(cp);
    if (cp == ' ' && i + len < t.n) { /* " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+" with the space */
        int k2 = klass(cp_at(t, i + 1, &len2));
        if (k2 != C_S) return run_end(t, i + 1, k2, SIZE_MAX);
    }
    if (k != C_S) return run_end(t, i, k, SIZE_MAX);
    return space_run(t, i);
}

/* End of the word starting at i < t.n, by Llama-3's pattern (digits = 3) or Qwen2's (digits = 1). */
static size_t word_llama3(text_t t, size_t i, size_t digits) {
    size_t c = contraction(t, i, 1), len, len2;
    if (c) return i + c;
    uint32_t cp = cp_at(t, i, &len);
    int k = klass(cp);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (k == C_L) return run_end(t, i, C_L, SIZE_MAX);
    if (k != C_N && cp != '\r' && cp != '\n' && i + len < t.n && klass(cp_at(t, i + len, &len2)) == C_L)
        return run_end(t, i + len, C_L, SIZE_MAX);
    if (k == C_N) return run_end(t, i, C_N, digits); /* \p{N}{1,3} */
    /* " ?[^\s\p{L}\p{N}]+[\r\n]*" */
    size_t j = SIZE_MAX;
    if (k == C_O) j = i;
    else if (cp == ' ' && i + 1 < t.n && klass(cp_at(t, i + 1, &len2)) == C_O) j = i + 1;
    if (j != SIZE_MAX) {
        j = run_end(t, j, C_O, SIZE_MAX);
        while (j < t.n && (t.s[j] == '\r' || t.s[j] == '\n')) j++;
        return j;
    }
    /* \s*[\r\n]+: up to the last \r or \n of the space run, when it has one */
    size_t e = i, nl = SIZE_MAX;
    while (e < t.n && klass(cp_at(t, e, &len)) == C_S) {
        if (t.s[e] == '\r' || t.s[e] == '\n') nl = e;
        e += len;
    }
    if (nl != SIZE_MAX) return nl + 1;
    return space_run(t, i);
}

static size_t next_word(const lt_bpe *b, text_t t, size_t i) {
    switch (b->pre) {
    case LT_BPE_PRE_GPT2: return word_gpt2(t, i);
    case LT_BPE_PRE_LLAMA3: return word_llama3(t, i, 3);
    case LT_BPE_PRE_QWEN2: return word_llama3(t, i, 1);
    default: return t.n;
    }
}

size_t lt_bpe_word_end(const lt_bpe *b, const char *text, size_t n, size_t i) {
    text_t t = {(const unsigned char *)text, n};
    return next_word(b, t, i);
}

/* ---- BPE of one word ---- */
#define CACHE_MAX_WORDS (1u << 18) /* then the cache starts over: bounded memory on any corpus */
#define CACHE_MAX_WORD 256         /* longer words are rare and not worth keeping */

static int bpe_word(lt_bpe *b, const unsigned char *w, size_t n, lt_token_buf *out) {
    if (n <= CACHE_MAX_WORD) {
        const smap_slot *e = smap_get(&b->cache, (const char *)w, n);
        if (e) {
            size_t off = (size_t)(e->val >> 20), cnt = (size_t)(e->val & 0xFFFFF);
            for (size_t i = 0; i < cnt; i++)
                if (lt_token_buf_push(out, b->cache_ids.ids[off + i]) != 0) return -1;
            return 0;
        }
    }
    size_t start = out->n;
    int32_t whole = b->ignore_merges ? lt_bpe_token_id(b, (const char *)w, n) : -1;
    if (whole >= 0) {
        if (lt_token_buf_push(out, whole) != 0) return -1;
    } else {
        int32_t stack[256], *sym = n <= 256 ? stack : malloc(n * sizeof *sym);
        if (!sym) return -1;
        size_t m = n;
        for (size_t i = 0; i < n; i++) sym[i] = b->byte_id[w[i]];
        while (m > 1) {
            int32_t best = INT32_MAX, merged = -1, left = 0, right = 0;
            for (size_t i = 0; i + 1 < m; i++) {
                merge_slot *s = merge_find(b, ((uint64_t)(uint32_t)sym[i] << 32 | (uint32_t)sym[i + 1]) + 1);
                if (s && s->key && s->rank < best) best = s->rank, merged = s->merged, left = sym[i], right = sym[i + 1];
            }
            if (merged < 0) break;
            size_t k = 0; /* every occurrence of the pair, left to right */
            for (size_t i = 0; i < m;) {
                if (i + 1 < m && sym[i] == left && sym[i + 1] == right) sym[k++] = merged, i += 2;
                else sym[k++] = sym[i++];
            }
            m = k;
        }
        for (size_t i = 0; i < m; i++)
            if (lt_token_buf_push(out, sym[i]) != 0) {
                if (sym != stack) free(sym);
                return -1;
            }
        if (sym != stack) free(sym);
    }
    size_t cnt = out->n - start;
    if (n <= CACHE_MAX_WORD && cnt < 0xFFFFF) {
        if (b->cache.count >= CACHE_MAX_WORDS) {
            smap_clear(&b->cache);
            b->cache_ids.n = 0;
        }
        size_t off = b->cache_ids.n;
        for (size_t i = 0; i < cnt; i++)
            if (lt_token_buf_push(&b->cache_ids, out->ids[start + i]) != 0) return -1;
        if (!smap_set(&b->cache, (const char *)w, n, (int64_t)off << 20 | (int64_t)cnt)) return -1;
    }
    return 0;
}

/* Pre-tokenize and BPE a piece of text with no added tokens in it. */
static int encode_piece(lt_bpe *b, const unsigned char *s, size_t n, lt_token_buf *out) {
    if (n == 0) return 0;
    unsigned char *tmp = NULL;
    if (b->add_prefix_space && s[0] != ' ') { /* Hugging Face's ByteLevel add_prefix_space */
        tmp = malloc(n + 1);
        if (!tmp) return -1;
        tmp[0] = ' ';
        memcpy(tmp + 1, s, n);
        s = tmp;
        n++;
    }
    text_t t = {s, n};
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0;) {
        size_t j = next_word(b, t, i);
        rc = bpe_word(b, s + i, j - i, out);
        i = j;
    }
    free(tmp);
    return rc;
}

/* The leftmost (then longest) added token of one kind (normalized or not) in s[from..n): its index in
 * b->special and position in *at, or -1. */
static long find_special(const lt_bpe *b, const unsigned char *s, size_t n, size_t from, int normalized, size_t *at) {
    if (!b->nspecial_pass[normalized]) return -1;
    const unsigned char *first = b->special_first[normalized];
    for (size_t i = from; i < n; i++) {
        if (!first[s[i]]) continue;
        for (size_t k = 0; k < b->nspecial; k++) {
            const special_t *t = &b->special[k];
            if (t->normalized != normalized || t->len > n - i ||
                memcmp(s + i, b->special_bytes.d + t->off, t->len) != 0)
                continue;
            *at = i;
            return (long)k;
        }
    }
    return -1;
}

/* Text between the added tokens that are matched in the original text: normalized (NFC when set), then
 * cut at the added tokens matched in the normalized text, the pieces pre-tokenized and BPE'd. */
static int encode_gap(lt_bpe *b, const unsigned char *s, size_t n, lt_token_buf *out) {
    char *norm = NULL;
    size_t nn, from = 0, at;
    if (n == 0) return 0;
    if (b->nfc) {
        if (lt_nfc((const char *)s, n, &norm, &nn) != 0) return -1;
        if (norm) s = (const unsigned char *)norm, n = nn;
    }
    int rc = 0;
    for (long k; rc == 0 && (k = find_special(b, s, n, from, 1, &at)) >= 0; from = at + b->special[k].len)
        rc = encode_piece(b, s + from, at - from, out) != 0 || lt_token_buf_push(out, b->special[k].id) != 0 ? -1 : 0;
    if (rc == 0) rc = encode_piece(b, s + from, n - from, out);
    free(norm);
    return rc;
}

/* As Hugging Face's added vocabulary: the added tokens that are not normalized are cut out of the text
 * first, then each piece between them is normalized and the normalized ones are cut out of it. */
int lt_bpe_encode(lt_bpe *b, const char *text, size_t n, lt_token_buf *out, char *err, size_t errlen) {
    const unsigned char *s = (const unsigned char *)text;
    size_t from = 0, at;
    for (long k; (k = find_special(b, s, n, from, 0, &at)) >= 0; from = at + b->special[k].len)
        if (encode_gap(b, s + from, at - from, out) != 0 || lt_token_buf_push(out, b->special[k].id) != 0)
            return lt_fail(err, errlen, "out of memory");
    if (encode_gap(b, s + from, n - from, out) != 0) return lt_fail(err, errlen, "out of memory");
    return 0;
}

int lt_bpe_decode(const lt_bpe *b, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                  size_t errlen) {
    arena_t a = {0};
    *out = NULL;
    *outlen = 0;
    for (size_t i = 0; i < n; i++) {
        size_t m;
        const char *s = lt_bpe_token_bytes(b, ids[i], &m);
        if (!s) {
            free(a.d);
            return lt_fail(err, errlen, "id %d (position %zu) is not in the vocabulary", (int)ids[i], i + 1);
        }
        if (arena_put(&a, s, m) < 0) {
            free(a.d);
            return lt_fail(err, errlen, "out of memory");
        }
    }
    if (arena_put(&a, "", 1) < 0) {
        free(a.d);
        return lt_fail(err, errlen, "out of memory");
    }
    *out = a.d;
    *outlen = a.n - 1;
    return 0;
}

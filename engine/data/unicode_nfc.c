/* NFC (UAX #15), written from the standard's description over the generated tables of
 * unicode_nfc_tables.c (tools/gen_unicode_nfc.py).
 *
 * The text is scanned for characters that are not "safe" (a safe character is a starter that NFC
 * leaves alone and that composes with nothing before it; ASCII and most of Latin-1, CJK, ... are).
 * Text of safe characters is NFC already and is not copied. Around an unsafe character the segment
 * from the safe character before it (the last starter something could compose with) to the next safe
 * character is normalized on its own: decomposed fully (the mappings recursively, Hangul syllables
 * algorithmically), put in canonical order (each run of non-starters stably sorted by combining
 * class), and composed (each character with the last starter unless a character between them has
 * class 0 or a class not below its own). A safe character is a boundary normalization never crosses,
 * so the segments' results joined are the NFC of the whole text. */
#include "engine/data/unicode_nfc.h"

#include <stdlib.h>
#include <string.h>

#define BAD 0xFFFFFFFFu
#define MASK21 0x1FFFFFu

/* Hangul syllables (Unicode chapter 3.12): S = SBASE + (L * VCOUNT + V) * TCOUNT + T. */
enum { SBASE = 0xAC00, LBASE = 0x1100, VBASE = 0x1161, TBASE = 0x11A7 };
enum { LCOUNT = 19, VCOUNT = 21, TCOUNT = 28, NCOUNT = VCOUNT * TCOUNT, SCOUNT = LCOUNT * NCOUNT };

/* The table byte of cp: its combining class, LT_NFC_UNSAFE_STARTER, or 0 for a safe character. Nothing
 * below U+0300 is unsafe. */
static inline unsigned prop(uint32_t cp) {
    if (cp < 0x300 || cp >= LT_NFC_PROP_LIMIT) return 0;
    unsigned block = lt_nfc_index[cp >> LT_NFC_BLOCK_SHIFT];
    return lt_nfc_blocks[(size_t)block << LT_NFC_BLOCK_SHIFT | (cp & ((1u << LT_NFC_BLOCK_SHIFT) - 1))];
}

unsigned lt_nfc_ccc(uint32_t cp) {
    unsigned p = prop(cp);
    return p == LT_NFC_UNSAFE_STARTER ? 0 : p;
}

/* One well-formed UTF-8 character at s[i] (n bytes in all) and its length, or BAD (length 1) for a
 * byte that does not start one: the same rules as the BPE pre-tokenizer's (bpe.c). */
static uint32_t utf8_next(const unsigned char *s, size_t n, size_t i, size_t *len) {
    unsigned c = s[i];
    *len = 1;
    if (c < 0x80) return c;
    size_t k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (k == 0 || (k == 4 && c > 0xF4) || i + k > n) return BAD;
    uint32_t cp = c & (0x7F >> k);
    for (size_t j = 1; j < k; j++) {
        if ((s[i + j] & 0xC0) != 0x80) return BAD;
        cp = cp << 6 | (s[i + j] & 0x3F);
    }
    if ((k == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return BAD;
    *len = k;
    return cp;
}

/* The entry of a sorted table whose bits from `shift` on equal key, or NULL. */
static const uint64_t *search(const uint64_t *table, size_t n, unsigned shift, uint64_t key) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t k = table[mid] >> shift;
        if (k == key) return &table[mid];
        if (k < key) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* The full canonical decomposition of cp into d (at most 4 code points); returns how many. */
static size_t decompose(uint32_t cp, uint32_t *d) {
    if (cp - SBASE < SCOUNT) {
        uint32_t s = cp - SBASE, t = s % TCOUNT;
        d[0] = LBASE + s / NCOUNT;
        d[1] = VBASE + s % NCOUNT / TCOUNT;
        if (!t) return 2;
        d[2] = TBASE + t;
        return 3;
    }
    const uint64_t *e = cp >= 0xC0 ? search(lt_nfc_decomp, LT_NFC_NDECOMP, 42, cp) : NULL;
    if (!e) {
        d[0] = cp;
        return 1;
    }
    uint32_t a = (uint32_t)(*e >> 21) & MASK21, b = (uint32_t)*e & MASK21;
    size_t k = decompose(a, d);
    return b ? k + decompose(b, d + k) : k;
}

/* The primary composite of the pair (a, b), or 0. */
static uint32_t compose(uint32_t a, uint32_t b) {
    if (a - LBASE < LCOUNT && b - VBASE < VCOUNT) return SBASE + ((a - LBASE) * VCOUNT + (b - VBASE)) * TCOUNT;
    if (a - SBASE < SCOUNT && (a - SBASE) % TCOUNT == 0 && b - TBASE - 1 < TCOUNT - 1) return a + (b - TBASE);
    const uint64_t *e = search(lt_nfc_comp, LT_NFC_NCOMP, 21, (uint64_t)a << 21 | b);
    return e ? (uint32_t)*e & MASK21 : 0;
}

typedef struct {
    char *d;
    size_t n, cap;
} obuf_t;

static int put(obuf_t *o, const void *s, size_t n) {
    if (o->n + n + 1 > o->cap) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap < o->n + n + 1) cap *= 2;
        char *d = realloc(o->d, cap);
        if (!d) return -1;
        o->d = d;
        o->cap = cap;
    }
    if (n) memcpy(o->d + o->n, s, n);
    o->n += n;
    return 0;
}

static int put_cp(obuf_t *o, uint32_t cp) {
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) b[0] = (unsigned char)cp, n = 1;
    else if (cp < 0x800) b[0] = (unsigned char)(0xC0 | cp >> 6), b[1] = (unsigned char)(0x80 | (cp & 0x3F)), n = 2;
    else if (cp < 0x10000)
        b[0] = (unsigned char)(0xE0 | cp >> 12), b[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F)),
        b[2] = (unsigned char)(0x80 | (cp & 0x3F)), n = 3;
    else
        b[0] = (unsigned char)(0xF0 | cp >> 18), b[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F)),
        b[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F)), b[3] = (unsigned char)(0x80 | (cp & 0x3F)), n = 4;
    return put(o, b, n);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Stable sort of the non-starters d[0..n) (classes c) by class: insertion for short runs, else a sort
 * on (class, position) keys. Returns -1 when out of memory. */
static int order_run(uint32_t *d, uint8_t *c, size_t n) {
    if (n <= 32) {
        for (size_t i = 1; i < n; i++) {
            uint32_t cp = d[i];
            uint8_t cc = c[i];
            size_t j = i;
            for (; j > 0 && c[j - 1] > cc; j--) d[j] = d[j - 1], c[j] = c[j - 1];
            d[j] = cp, c[j] = cc;
        }
        return 0;
    }
    uint64_t *k = malloc(n * sizeof *k);
    if (!k) return -1;
    for (size_t i = 0; i < n; i++) k[i] = (uint64_t)c[i] << 56 | (uint64_t)i << 21 | d[i];
    qsort(k, n, sizeof *k, cmp_u64);
    for (size_t i = 0; i < n; i++) d[i] = (uint32_t)k[i] & MASK21, c[i] = (uint8_t)(k[i] >> 56);
    free(k);
    return 0;
}

/* NFC of a segment s[0..n) of well-formed UTF-8, appended to o. */
static int nfc_segment(const unsigned char *s, size_t n, obuf_t *o) {
    uint32_t dstack[256];
    uint8_t cstack[256];
    size_t cap = 4 * n; /* a character is at least one byte and decomposes to at most 4 */
    uint32_t *d = cap <= 256 ? dstack : malloc(cap * sizeof *d);
    uint8_t *c = cap <= 256 ? cstack : malloc(cap);
    int rc = -1;
    if (!d || !c) goto done;
    size_t m = 0;
    for (size_t i = 0, len; i < n; i += len) m += decompose(utf8_next(s, n, i, &len), d + m);
    for (size_t i = 0; i < m; i++) c[i] = (uint8_t)lt_nfc_ccc(d[i]);
    for (size_t i = 0; i < m;) { /* canonical ordering */
        if (!c[i]) { i++; continue; }
        size_t j = i;
        while (j < m && c[j]) j++;
        if (j - i > 1 && order_run(d + i, c + i, j - i) != 0) goto done;
        i = j;
    }
    /* canonical composition: `last` is the class of the last character kept after the starter, 0
     * while none is (then a starter next to it may compose too, as Hangul's jamo do) */
    size_t k = 0, starter = SIZE_MAX;
    unsigned last = 0;
    for (size_t i = 0; i < m; i++) {
        uint32_t cp = d[i];
        unsigned cc = c[i];
        if (starter != SIZE_MAX && (last == 0 || last < cc)) {
            uint32_t composite = compose(d[starter], cp);
            if (composite) {
                d[starter] = composite;
                continue;
            }
        }
        if (cc == 0) starter = k;
        last = cc;
        d[k++] = cp;
    }
    rc = 0;
    for (size_t i = 0; i < k && rc == 0; i++) rc = put_cp(o, d[i]);
done:
    if (d != dstack) free(d);
    if (c != cstack) free(c);
    return rc;
}

int lt_nfc(const char *text, size_t n, char **out, size_t *outn) {
    const unsigned char *s = (const unsigned char *)text;
    obuf_t o = {0};
    size_t i = 0, copied = 0, prev = SIZE_MAX; /* prev: where the character before i starts, when it is safe */
    *out = NULL;
    *outn = 0;
    while (i < n) {
        if (s[i] < 0x80) { /* a run of ASCII, eight bytes at a time */
            size_t j = i + 1;
            for (uint64_t w; j + 8 <= n; j += 8) {
                memcpy(&w, s + j, 8);
                if (w & 0x8080808080808080ULL) break;
            }
            while (j < n && s[j] < 0x80) j++;
            prev = j - 1;
            i = j;
            continue;
        }
        size_t len;
        uint32_t cp = utf8_next(s, n, i, &len);
        if (cp == BAD || prop(cp) == 0) {
            prev = cp == BAD ? SIZE_MAX : i;
            i += len;
            continue;
        }
        size_t start = prev != SIZE_MAX ? prev : i, j = i + len;
        while (j < n) {
            uint32_t c2 = utf8_next(s, n, j, &len);
            if (c2 == BAD || prop(c2) == 0) break;
            j += len;
        }
        if (put(&o, s + copied, start - copied) != 0 || nfc_segment(s + start, j - start, &o) != 0) {
            free(o.d);
            return -1;
        }
        copied = i = j;
        prev = SIZE_MAX;
    }
    if (!o.d) return 0; /* every character safe */
    if (put(&o, s + copied, n - copied) != 0) {
        free(o.d);
        return -1;
    }
    if (o.n == n && memcmp(o.d, s, n) == 0) { /* unsafe characters, but in NFC already */
        free(o.d);
        return 0;
    }
    o.d[o.n] = 0;
    *out = o.d;
    *outn = o.n;
    return 0;
}

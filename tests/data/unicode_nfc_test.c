/* NFC (engine/data/unicode_nfc.c) on cases worked out by hand from UAX #15 and the Unicode data:
 * the quick check, singletons, exclusions, canonical ordering, blocking, Hangul, malformed bytes, a long
 * run of marks. tests/lua/tokenizer_spec.lua compares it with Python's unicodedata on every code point
 * it may touch and on random texts. */
#include <stdlib.h>
#include <string.h>

#include "engine/data/unicode_nfc.h"
#include "tests/tap.h"

/* NFC of in; "" when lt_nfc said the text is NFC already (nothing copied). */
static const char *nfc(const char *in, int *copied) {
    static char buf[4096];
    char *out;
    size_t n;
    if (lt_nfc(in, strlen(in), &out, &n) != 0) return "(out of memory)";
    *copied = out != NULL;
    if (!out) return "";
    snprintf(buf, sizeof buf, "%s", out);
    free(out);
    return buf;
}

static void check(const char *in, const char *want, const char *what) {
    int copied = 0;
    const char *got = nfc(in, &copied);
    if (!copied) got = in;
    TAP_CHECK(strcmp(got, want) == 0 && copied == (strcmp(in, want) != 0), "%s", what);
}

int main(void) {
    int copied;
    TAP_CHECK(nfc("plain ASCII, digits 123 and \t\n", &copied)[0] == 0 && !copied, "ASCII is not copied");
    TAP_CHECK(nfc("caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xea\xb0\x80 \xf0\x9f\x98\x80", &copied)[0] == 0 && !copied,
              "composed Latin, CJK, a Hangul syllable, emoji: NFC already, not copied");
    check("e\xcc\x81", "\xc3\xa9", "e U+0301 -> U+00E9");
    check("\xe2\x84\xab", "\xc3\x85", "singleton U+212B ANGSTROM SIGN -> U+00C5");
    check("\xe2\x84\xa6", "\xce\xa9", "singleton U+2126 OHM SIGN -> U+03A9");
    check("\xe0\xa5\x98", "\xe0\xa4\x95\xe0\xa4\xbc", "exclusion U+0958 -> U+0915 U+093C, not recomposed");
    check("\xe0\xa4\x95\xe0\xa4\xbc", "\xe0\xa4\x95\xe0\xa4\xbc", "U+0915 U+093C stays (U+0958 is excluded)");
    check("\xe0\xa4\xa8\xe0\xa4\xbc", "\xe0\xa4\xa9", "U+0928 U+093C -> U+0929 (not excluded)");
    check("\xcd\x84", "\xcc\x88\xcc\x81", "non-starter decomposition U+0344 -> U+0308 U+0301");
    /* a U+0301 (class 230) U+0327 (202): ordered cedilla first; a + cedilla has no composite, and the
     * cedilla's class is below the acute's, so a + U+0301 compose across it */
    check("a\xcc\x81\xcc\xa7", "\xc3\xa1\xcc\xa7", "a U+0301 U+0327 -> U+00E1 U+0327 (ordered, then composed past the cedilla)");
    check("a\xcc\xa7\xcc\x81", "\xc3\xa1\xcc\xa7", "a U+0327 U+0301 -> the same");
    check("e\xcc\xa7\xcc\x81", "\xc8\xa9\xcc\x81", "e U+0327 U+0301 -> U+0229 U+0301 (no e-cedilla-acute)");
    check("\xc3\xa9\xcc\xa7", "\xc8\xa9\xcc\x81", "U+00E9 U+0327: the composed e is decomposed again -> U+0229 U+0301");
    check("e\xcc\xa7\xcc\x86", "\xe1\xb8\x9d", "e U+0327 U+0306 -> U+1E1D (composed in two steps)");
    check("a\xcc\x81\xcc\x81", "\xc3\xa1\xcc\x81", "a U+0301 U+0301: the second is blocked by the first (same class)");
    check("a\xcc\x88\xcc\x81", "\xc3\xa4\xcc\x81", "a U+0308 U+0301 -> U+00E4 U+0301 (U+01DF is a U+0308 U+0304)");
    check("e\xcc\x82\xcc\xa3", "\xe1\xbb\x87", "Vietnamese e U+0302 U+0323 -> U+1EC7");
    check("\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8", "\xea\xb0\x81", "Hangul jamo L V T -> U+AC01");
    check("\xea\xb0\x80\xe1\x86\xa8", "\xea\xb0\x81", "Hangul LV syllable + T -> U+AC01");
    check("\xea\xb0\x81\xe1\x86\xa8", "\xea\xb0\x81\xe1\x86\xa8", "an LVT syllable takes no second T");
    check("\xe1\x84\x80\xcc\x81\xe1\x85\xa1", "\xe1\x84\x80\xcc\x81\xe1\x85\xa1", "a mark between L and V blocks them");
    check("\xcc\x81x", "\xcc\x81x", "a leading mark stays");
    check("\xff\xcc\x81 \xed\xa0\x80\xcc\x81", "\xff\xcc\x81 \xed\xa0\x80\xcc\x81",
          "malformed bytes (0xFF, a surrogate) stay and compose with nothing");
    check("\xe2\x84", "\xe2\x84", "a cut sequence stays");
    /* 40 pairs of U+0301 (230) U+0316 (220), then b: the ordering of a long run (past the insertion sort) */
    char in[512], want[512];
    size_t m = 0, w = 0;
    in[m++] = 'a';
    memcpy(want + w, "\xc3\xa1", 2), w += 2; /* a + the first U+0301, past the 220s */
    for (int i = 0; i < 40; i++) memcpy(in + m, "\xcc\x81\xcc\x96", 4), m += 4;
    for (int i = 0; i < 40; i++) memcpy(want + w, "\xcc\x96", 2), w += 2;
    for (int i = 1; i < 40; i++) memcpy(want + w, "\xcc\x81", 2), w += 2;
    in[m++] = 'b', want[w++] = 'b';
    in[m] = want[w] = 0;
    check(in, want, "a run of 80 marks is put in canonical order, stably");
    TAP_CHECK(lt_nfc_ccc(0x301) == 230 && lt_nfc_ccc(0x316) == 220 && lt_nfc_ccc('a') == 0 && lt_nfc_ccc(0x1161) == 0,
              "combining classes");
    TAP_CHECK(strcmp(lt_nfc_unicode_version, "14.0.0") == 0, "tables of Unicode 14.0.0 (as unicode_tables.c)");
    return tap_done();
}

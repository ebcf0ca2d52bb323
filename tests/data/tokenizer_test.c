/* The byte-level BPE engine by hand: GPT-2's bytes_to_unicode, lowest-rank-first merges, the
 * pre-tokenizer patterns' word boundaries (GPT-2, Llama-3, Qwen2) on hand-split texts, added tokens,
 * decode, and the loaders' errors. tests/lua/tokenizer_spec.lua checks whole encodings against an
 * independent reference. */
#include <stdint.h>
#include <string.h>

#include "engine/data/bpe.h"
#include "engine/data/tokenizer.h"
#include "tests/data/tmpdir.h"
#include "tests/tap.h"

static char err[1024];

/* A token given by its raw bytes, spelled in the bytes_to_unicode alphabet as files do. */
static int add_raw(lt_bpe *b, const char *bytes, int32_t id) {
    char u[256];
    size_t m = 0;
    for (const unsigned char *p = (const unsigned char *)bytes; *p; p++) {
        uint32_t c = lt_bpe_byte_to_unicode(*p);
        if (c < 0x80) u[m++] = (char)c;
        else u[m++] = (char)(0xC0 | c >> 6), u[m++] = (char)(0x80 | (c & 0x3F));
    }
    return lt_bpe_add_token(b, u, m, id, 0, err, sizeof err);
}

static lt_bpe *tiny(void) {
    lt_bpe *b = lt_bpe_new();
    for (int i = 0; i < 256; i++) {
        char s[2] = {(char)i, 0};
        if (i == 0) { /* the NUL byte: bytes_to_unicode's U+0100 */
            lt_bpe_add_token(b, "\xc4\x80", 2, 0, 0, err, sizeof err);
            continue;
        }
        add_raw(b, s, i);
    }
    add_raw(b, "he", 256);
    add_raw(b, "ll", 257);
    add_raw(b, "hell", 258);
    add_raw(b, "hello", 259);
    add_raw(b, " hello", 260);
    /* merges, in rank order, as vocab.bpe spells them */
    const char *m[][2] = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "hello"}};
    for (int i = 0; i < 5; i++)
        TAP_CHECK(lt_bpe_add_merge(b, m[i][0], strlen(m[i][0]), m[i][1], strlen(m[i][1]), err, sizeof err) == 0,
                  "merge %d added (%s)", i, err);
    TAP_CHECK(lt_bpe_finish(b, err, sizeof err) == 0, "all 256 bytes present (%s)", err);
    return b;
}

static int encodes_to(lt_bpe *b, const char *text, const int32_t *want, size_t n) {
    lt_token_buf out = {0};
    int ok = lt_bpe_encode(b, text, strlen(text), &out, err, sizeof err) == 0 && out.n == n &&
             memcmp(out.ids, want, n * sizeof *want) == 0;
    if (!ok) {
        fprintf(stdout, "# got");
        for (size_t i = 0; i < out.n; i++) fprintf(stdout, " %d", out.ids[i]);
        fprintf(stdout, "\n");
    }
    lt_token_buf_free(&out);
    return ok;
}

/* The words of text by the pattern, joined with '|'. */
static const char *words(lt_bpe *b, const char *text) {
    static char buf[1024];
    size_t n = strlen(text), m = 0;
    for (size_t i = 0; i < n;) {
        size_t j = lt_bpe_word_end(b, text, n, i);
        if (m) buf[m++] = '|';
        memcpy(buf + m, text + i, j - i);
        m += j - i;
        i = j;
    }
    buf[m] = 0;
    return buf;
}

static void check_words(lt_bpe *b, const char *pattern, const char *text, const char *want) {
    const char *got = words(b, text);
    TAP_CHECK(strcmp(got, want) == 0, "%s words of \"%s\": got \"%s\", want \"%s\"", pattern, text, got, want);
}

int main(void) {
    tmpdir_make("tokenizer_test");
    TAP_CHECK(lt_bpe_byte_to_unicode(' ') == 0x120 && lt_bpe_byte_to_unicode('\n') == 0x10A &&
                  lt_bpe_byte_to_unicode('a') == 'a' && lt_bpe_byte_to_unicode(0xAD) == 0x143 &&
                  lt_bpe_byte_to_unicode(0) == 0x100 && lt_bpe_byte_to_unicode(0xFF) == 0xFF,
              "bytes_to_unicode: space -> U+0120, \\n -> U+010A, 0xAD -> U+0143, printable bytes themselves");

    lt_bpe *b = tiny();
    TAP_CHECK(encodes_to(b, "hello hello", (int32_t[]){259, 260}, 2), "\"hello hello\" -> hello, Ġhello");
    TAP_CHECK(encodes_to(b, "hellohe", (int32_t[]){259, 256}, 2), "\"hellohe\" -> hello, he (lowest rank first)");
    TAP_CHECK(encodes_to(b, "  hello", (int32_t[]){' ', 260}, 2), "two spaces: the first alone, then Ġhello");
    TAP_CHECK(encodes_to(b, "hel", (int32_t[]){256, 'l'}, 2), "\"hel\" -> he, l");
    char *dec;
    size_t dn;
    TAP_CHECK(lt_bpe_decode(b, (int32_t[]){259, 260, 0}, 3, &dec, &dn, err, sizeof err) == 0 && dn == 12 &&
                  memcmp(dec, "hello hello\0", 12) == 0,
              "decode gives the bytes back, NUL included");
    free(dec);
    TAP_CHECK(lt_bpe_decode(b, (int32_t[]){5000}, 1, &dec, &dn, err, sizeof err) != 0 && strstr(err, "id 5000"),
              "decode of an unknown id fails naming it: %s", err);

    /* added tokens: cut out before BPE, longest first */
    lt_bpe_add_token(b, "<s>", 3, 261, 1, err, sizeof err);
    lt_bpe_add_token(b, "<s>>", 4, 262, 1, err, sizeof err);
    lt_bpe_add_special(b, 261, 0, err, sizeof err);
    lt_bpe_add_special(b, 262, 0, err, sizeof err);
    TAP_CHECK(encodes_to(b, "hello<s>> hello<s>", (int32_t[]){259, 262, 260, 261}, 4),
              "added tokens matched before BPE, the longest at a position");

    check_words(b, "GPT-2", "Hello world's  end\n\n x", "Hello| world|'s| | end|\n\n| x");
    check_words(b, "GPT-2", "it'S 123abc ...!? \xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 ",
                "it|'|S| 123|abc| ...!?| \xc3\xa9t\xc3\xa9| \xe4\xb8\xad\xe6\x96\x87| ");
    check_words(b, "GPT-2", "a\xe3\x80\x80" "b \xc2\xa0" "c", "a|\xe3\x80\x80|b| |\xc2\xa0|c");
    lt_bpe_set_options(b, LT_BPE_PRE_LLAMA3, 0, 0);
    check_words(b, "Llama-3", "Hello world'S 1234567 ...!?\n\n  x\n", "Hello| world|'S| |123|456|7| ...!?\n\n| | x|\n");
    check_words(b, "Llama-3", "(hello) \t\n y  ", "(hello|)| \t\n| y|  ");
    lt_bpe_set_options(b, LT_BPE_PRE_QWEN2, 0, 0);
    check_words(b, "Qwen2", "abc 123", "abc| |1|2|3");
    lt_bpe_free(b);

    /* a repeated merge takes its later rank (GPT-2's dict, Hugging Face's map): "h e" at 0 and 2, "e l" at 1 */
    b = lt_bpe_new();
    for (int i = 1; i < 256; i++) add_raw(b, (char[]){(char)i, 0}, i);
    lt_bpe_add_token(b, "\xc4\x80", 2, 0, 0, err, sizeof err);
    add_raw(b, "he", 256);
    add_raw(b, "el", 257);
    lt_bpe_add_merge(b, "h", 1, "e", 1, err, sizeof err);
    lt_bpe_add_merge(b, "e", 1, "l", 1, err, sizeof err);
    lt_bpe_add_merge(b, "h", 1, "e", 1, err, sizeof err);
    TAP_CHECK(encodes_to(b, "hell", (int32_t[]){'h', 257, 'l'}, 3), "a repeated merge ranks by its last line");
    lt_bpe_free(b);

    /* loaders: missing files, bad merges */
    lt_tokenizer_spec spec = {.type = "GPT2BPETokenizer", .vocab_file = tmp_path("none.json"), .merge_file = "x"};
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "none.json: cannot open"),
              "a missing vocab file is named: %s", err);
    spec = (lt_tokenizer_spec){.type = "Unigram"};
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "unknown tokenizer type 'Unigram'"),
              "an unknown type is refused: %s", err);
    spec = (lt_tokenizer_spec){.type = "ByteLevel"};
    lt_tokenizer *t = lt_tokenizer_open(&spec, err, sizeof err);
    TAP_CHECK(t && t->vocab_size == 257 && t->eod == 256, "ByteLevel: vocab 257, eod 256");
    lt_tokenizer_free(t);
    return tap_done();
}

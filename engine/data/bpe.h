/* Byte-level BPE (GPT-2's algorithm), shared by the GPT-2 (encoder.json + vocab.bpe) and Hugging Face
 * (tokenizer.json) loaders: a vocabulary of byte strings, ranked merges, a regex pre-tokenizer written
 * out by hand (GPT-2's, Llama-3's or Qwen2's pattern), optional added tokens matched before BPE, and a
 * cache of encoded words.
 *
 * Vocabulary strings are given as files spell them: in GPT-2's bytes_to_unicode alphabet (each byte one
 * printable code point), and are kept as the raw bytes they stand for. Every function reports failure
 * by return value with a message in err. */
#ifndef LT_DATA_BPE_H
#define LT_DATA_BPE_H
#include <stddef.h>
#include <stdint.h>

typedef struct lt_bpe lt_bpe;

/* Pre-tokenizer patterns (each a regex of the model family, implemented by hand):
 *   GPT2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   LLAMA3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 *           \s*[\r\n]+|\s+(?!\S)|\s+
 *   QWEN2:  LLAMA3 with \p{N} in place of \p{N}{1,3}
 *   NONE:   the whole text is one word */
typedef enum { LT_BPE_PRE_GPT2, LT_BPE_PRE_LLAMA3, LT_BPE_PRE_QWEN2, LT_BPE_PRE_NONE } lt_bpe_pre;

/* Growable list of token ids. */
typedef struct {
    int32_t *ids;
    size_t n, cap;
} lt_token_buf;
int lt_token_buf_push(lt_token_buf *b, int32_t id);
void lt_token_buf_free(lt_token_buf *b);

lt_bpe *lt_bpe_new(void);
void lt_bpe_free(lt_bpe *b);

/* GPT-2's bytes_to_unicode: the code point that stands for byte `byte` in vocabulary files. */
uint32_t lt_bpe_byte_to_unicode(unsigned byte);

/* Adds vocabulary entry `tok` (UTF-8, n bytes) with id `id`. raw = 0: tok is in the bytes_to_unicode
 * alphabet and stands for the bytes it maps back to (fails when a code point is outside it);
 * raw = 1: tok is its own bytes (Hugging Face added tokens). A string given twice keeps the last id. */
int lt_bpe_add_token(lt_bpe *b, const char *tok, size_t n, int32_t id, int raw, char *err, size_t errlen);
/* Adds the next merge (rank = number of merges before it) of vocabulary strings a and b (in the
 * bytes_to_unicode alphabet); a, b and their concatenation must be in the vocabulary. */
int lt_bpe_add_merge(lt_bpe *b, const char *a, size_t an, const char *bs, size_t bn, char *err, size_t errlen);
/* Text equal to the content of added token `id` (raw bytes, in the vocabulary) is cut out before
 * pre-tokenization and encoded as that id (longest match at the leftmost position), as Hugging Face's
 * added vocabulary does: normalized = 0, matched in the original text first; normalized = 1, matched
 * in the normalized pieces between those (as its content normalized: set the normalizer first). */
int lt_bpe_add_special(lt_bpe *b, int32_t id, int normalized, char *err, size_t errlen);
/* The normalizer: on = 1, Unicode NFC (Hugging Face's NFC normalizer), applied to the text between
 * the added tokens matched in the original text, before pre-tokenization; on = 0, none. */
void lt_bpe_set_nfc(lt_bpe *b, int on);
/* Options: the pattern, add_prefix_space (a space before each piece of text that does not start with
 * one, Hugging Face's ByteLevel option), ignore_merges (a word that is in the vocabulary is one token,
 * Hugging Face's BPE option). */
void lt_bpe_set_options(lt_bpe *b, lt_bpe_pre pre, int add_prefix_space, int ignore_merges);
/* Turns ignore_merges on, keeping the other options. */
void lt_bpe_enable_ignore_merges(lt_bpe *b);
/* Checks the vocabulary after loading: every one of the 256 bytes must be a token. */
int lt_bpe_finish(lt_bpe *b, char *err, size_t errlen);

/* Id of the raw byte string s[0..n), or -1. */
int32_t lt_bpe_token_id(const lt_bpe *b, const char *s, size_t n);
/* Id of the vocabulary string s[0..n) spelled in the bytes_to_unicode alphabet (as vocabulary files
 * spell it), or -1. */
int32_t lt_bpe_spelled_id(const lt_bpe *b, const char *s, size_t n);
/* Raw bytes of token `id` (*n set), or NULL when no token has that id. */
const char *lt_bpe_token_bytes(const lt_bpe *b, int32_t id, size_t *n);
/* Number of distinct vocabulary strings, and 1 + the largest id. */
int64_t lt_bpe_num_tokens(const lt_bpe *b);
int64_t lt_bpe_id_limit(const lt_bpe *b);
int64_t lt_bpe_num_merges(const lt_bpe *b);

/* End of the pre-tokenizer's word that starts at byte i < n of text (no added tokens are looked for). */
size_t lt_bpe_word_end(const lt_bpe *b, const char *text, size_t n, size_t i);

/* Appends the ids of text[0..n) to out. */
int lt_bpe_encode(lt_bpe *b, const char *text, size_t n, lt_token_buf *out, char *err, size_t errlen);
/* The bytes of ids[0..n) in a malloc'd *out (NUL-terminated, *outlen without it); fails on an unknown id. */
int lt_bpe_decode(const lt_bpe *b, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                  size_t errlen);

#endif

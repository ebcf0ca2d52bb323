/* `luatron preprocess`: text or JSONL into a Megatron indexed dataset (prefix.bin/.idx), with
 * Megatron's tools/preprocess_data.py flags and tokenizers (engine/data/tokenizer.h): the byte-level
 * one by default (token id = byte value, EOD = 256, vocab 257), GPT2BPETokenizer or
 * HuggingFaceTokenizer. Tokens are stored in Megatron's best-fitting dtype (uint16 for a vocabulary
 * under 65500, else int32). One sequence per document. Run with --help for the options. */
#ifndef LT_DATA_PREPROCESS_H
#define LT_DATA_PREPROCESS_H
#include <stddef.h>

#define LT_BYTE_VOCAB_SIZE 257
#define LT_BYTE_EOD 256

/* argv[0] is the command name and is ignored (a following "preprocess" is skipped too).
 * Returns 0 on success or --help, 1 when preprocessing fails, 2 on a usage error;
 * messages go to stderr, the summary to stdout. */
int lt_preprocess_main(int argc, char **argv);

/* The string under top-level key `key` of the JSON object text[0..len), decoded to UTF-8
 * bytes (escapes, \uXXXX and surrogate pairs resolved) in a malloc'd *out of *outlen bytes
 * (plus a NUL not counted). Returns 1 when found, 0 when the object has no such key,
 * -1 with a message (column included) for malformed JSON or a non-string value.
 * Parsed by engine/io/json.c with LT_JSON_ANY: all of JSON, strictly (raw text must be valid
 * UTF-8); \u0000 decodes to a NUL byte that counts in *outlen; keys compare by their full
 * decoded bytes. The last occurrence of a repeated key wins, as in Python's json. */
int lt_json_get_string(const char *text, size_t len, const char *key, char **out, size_t *outlen, char *err,
                       size_t errlen);

#endif

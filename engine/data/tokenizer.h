/* Tokenizers behind one interface, for `luatron preprocess`, the training config and Lua
 * (core.tokenizer): Megatron's tokenizer types, from files on disk only.
 *   ByteLevel             luatron's own: id = byte value, end-of-document 256, vocab 257
 *   GPT2BPETokenizer      GPT-2's byte-level BPE: vocab_file (encoder.json) + merge_file (vocab.bpe)
 *                         (gpt2_tokenizer.c)
 *   HuggingFaceTokenizer  a tokenizer.json of the byte-level BPE kind (GPT-2, Llama-3, Qwen2):
 *                         model = the file or a folder holding it (hf_tokenizer.c); encoding is
 *                         transformers' tokenizer(text).input_ids (Megatron's tokenize): the NFC
 *                         normalizer and a TemplateProcessing post-processor's tokens included
 *   SentencePieceTokenizer     Megatron's _SentencePieceTokenizer over a SentencePiece .model file
 *                              (model): the model's pieces plus <CLS> <SEP> <EOD> <MASK> and the pad,
 *                              bos and eos pieces as special tokens (sentencepiece_tokenizer.c)
 *   GPTSentencePieceTokenizer  the .model file alone, eod = its eos id
 *   Llama2Tokenizer            the .model file, its bos id before every text, eod = its eos id
 * Every function reports failure by return value with a message in err. */
#ifndef LT_DATA_TOKENIZER_H
#define LT_DATA_TOKENIZER_H
#include <stddef.h>
#include <stdint.h>

#include "engine/data/bpe.h"

typedef struct {
    const char *type;       /* one of the names above */
    const char *vocab_file; /* GPT2BPETokenizer */
    const char *merge_file; /* GPT2BPETokenizer */
    const char *model;      /* HuggingFaceTokenizer: tokenizer.json or its folder; the SentencePiece
                               types: the .model file */
} lt_tokenizer_spec;

typedef struct lt_sp_tokenizer lt_sp_tokenizer;

typedef struct lt_tokenizer {
    const char *type;   /* static name */
    lt_bpe *bpe;        /* the BPE types */
    lt_sp_tokenizer *sp; /* the SentencePiece types; both NULL for ByteLevel */
    int64_t vocab_size; /* Megatron's tokenizer.vocab_size: the number of tokens, added ones included */
    int32_t eod;        /* end-of-document id */
    int32_t *post_ids;  /* HuggingFaceTokenizer's TemplateProcessing: the ids its single template puts
                           around the text's, post_ids[0..post_before) before, [post_before..post_n) after */
    size_t post_before, post_n;
    char source[512];   /* the files it came from, for messages */
} lt_tokenizer;

lt_tokenizer *lt_tokenizer_open(const lt_tokenizer_spec *spec, char *err, size_t errlen);
void lt_tokenizer_free(lt_tokenizer *t);
/* Appends the ids of text[0..n) to out. */
int lt_tokenizer_encode(lt_tokenizer *t, const char *text, size_t n, lt_token_buf *out, char *err, size_t errlen);
/* The bytes of ids[0..n), malloc'd (NUL-terminated; *outlen without it). */
int lt_tokenizer_decode(const lt_tokenizer *t, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                        size_t errlen);

/* The loaders (gpt2_tokenizer.c, hf_tokenizer.c): they fill t->bpe, vocab_size, eod and source. */
int lt_gpt2_tokenizer_load(lt_tokenizer *t, const char *vocab_file, const char *merge_file, char *err,
                           size_t errlen);
int lt_hf_tokenizer_load(lt_tokenizer *t, const char *model, char *err, size_t errlen);

/* The SentencePiece types (sentencepiece_tokenizer.c): load fills t->sp, vocab_size, eod and source. */
typedef enum { LT_SP_MEGATRON, LT_SP_GPT, LT_SP_LLAMA2 } lt_sp_kind;
int lt_sp_tokenizer_load(lt_tokenizer *t, const char *model, lt_sp_kind kind, char *err, size_t errlen);
void lt_sp_tokenizer_free(lt_sp_tokenizer *sp);
int lt_sp_tokenizer_encode(const lt_sp_tokenizer *sp, const char *text, size_t n, lt_token_buf *out, char *err,
                           size_t errlen);
int lt_sp_tokenizer_decode(const lt_sp_tokenizer *sp, const int32_t *ids, size_t n, char **out, size_t *outlen,
                           char *err, size_t errlen);

/* The whole file at path, malloc'd and NUL-terminated (*n without the NUL); NULL with a message naming it. */
char *lt_read_whole_file(const char *path, size_t *n, char *err, size_t errlen);

#endif

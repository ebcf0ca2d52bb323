/* The tokenizer interface (tokenizer.h) and luatron's byte-level tokenizer. */
#define _POSIX_C_SOURCE 200809L
#include "engine/data/tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"

char *lt_read_whole_file(const char *path, size_t *n, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        lt_fail(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *d = malloc(cap);
    for (;;) {
        if (!d) break;
        len += fread(d + len, 1, cap - len - 1, f);
        if (len < cap - 1) break;
        char *g = realloc(d, cap * 2);
        if (!g) { free(d); d = NULL; break; }
        d = g;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!d || bad) {
        free(d);
        lt_fail(err, errlen, "%s: %s", path, bad ? "read error" : "out of memory");
        return NULL;
    }
    d[len] = 0;
    *n = len;
    return d;
}

lt_tokenizer *lt_tokenizer_open(const lt_tokenizer_spec *spec, char *err, size_t errlen) {
    const char *type = spec->type ? spec->type : "ByteLevel";
    lt_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        lt_fail(err, errlen, "out of memory");
        return NULL;
    }
    int rc;
    if (strcmp(type, "ByteLevel") == 0) {
        t->type = "ByteLevel";
        t->vocab_size = 257;
        t->eod = 256;
        snprintf(t->source, sizeof t->source, "byte level");
        rc = 0;
    } else if (strcmp(type, "GPT2BPETokenizer") == 0) {
        t->type = "GPT2BPETokenizer";
        if (!spec->vocab_file || !spec->merge_file)
            rc = lt_fail(err, errlen, "GPT2BPETokenizer needs a vocab file (GPT-2's encoder.json) and a merge file "
                         "(vocab.bpe)");
        else rc = lt_gpt2_tokenizer_load(t, spec->vocab_file, spec->merge_file, err, errlen);
    } else if (strcmp(type, "HuggingFaceTokenizer") == 0) {
        t->type = "HuggingFaceTokenizer";
        if (!spec->model) rc = lt_fail(err, errlen, "HuggingFaceTokenizer needs a tokenizer model: the path of a "
                                       "tokenizer.json or of a folder that holds one");
        else rc = lt_hf_tokenizer_load(t, spec->model, err, errlen);
    } else if (strcmp(type, "NullTokenizer") == 0) {
        rc = lt_fail(err, errlen, "NullTokenizer has no text form (its data is already token ids), so it cannot "
                     "tokenize text; use ByteLevel, GPT2BPETokenizer, HuggingFaceTokenizer or SentencePieceTokenizer");
    } else if (strcmp(type, "SentencePieceTokenizer") == 0 || strcmp(type, "GPTSentencePieceTokenizer") == 0 ||
               strcmp(type, "Llama2Tokenizer") == 0) {
        lt_sp_kind kind = type[0] == 'S' ? LT_SP_MEGATRON : type[0] == 'G' ? LT_SP_GPT : LT_SP_LLAMA2;
        t->type = kind == LT_SP_MEGATRON ? "SentencePieceTokenizer"
                  : kind == LT_SP_GPT    ? "GPTSentencePieceTokenizer"
                                         : "Llama2Tokenizer";
        if (!spec->model) rc = lt_fail(err, errlen, "%s needs a tokenizer model: the path of a SentencePiece .model "
                                       "file", t->type);
        else rc = lt_sp_tokenizer_load(t, spec->model, kind, err, errlen);
    } else {
        rc = lt_fail(err, errlen, "unknown tokenizer type '%s': luatron has ByteLevel, GPT2BPETokenizer, "
                     "HuggingFaceTokenizer (tokenizer.json of the byte-level BPE kind), SentencePieceTokenizer, "
                     "GPTSentencePieceTokenizer and Llama2Tokenizer (SentencePiece .model files)", type);
    }
    if (rc != 0) {
        lt_tokenizer_free(t);
        return NULL;
    }
    return t;
}

void lt_tokenizer_free(lt_tokenizer *t) {
    if (!t) return;
    lt_bpe_free(t->bpe);
    lt_sp_tokenizer_free(t->sp);
    free(t->post_ids);
    free(t);
}

int lt_tokenizer_encode(lt_tokenizer *t, const char *text, size_t n, lt_token_buf *out, char *err, size_t errlen) {
    if (t->bpe) {
        for (size_t i = 0; i < t->post_before; i++)
            if (lt_token_buf_push(out, t->post_ids[i]) != 0) return lt_fail(err, errlen, "out of memory");
        if (lt_bpe_encode(t->bpe, text, n, out, err, errlen) != 0) return -1;
        for (size_t i = t->post_before; i < t->post_n; i++)
            if (lt_token_buf_push(out, t->post_ids[i]) != 0) return lt_fail(err, errlen, "out of memory");
        return 0;
    }
    if (t->sp) return lt_sp_tokenizer_encode(t->sp, text, n, out, err, errlen);
    for (size_t i = 0; i < n; i++)
        if (lt_token_buf_push(out, (unsigned char)text[i]) != 0) return lt_fail(err, errlen, "out of memory");
    return 0;
}

int lt_tokenizer_decode(const lt_tokenizer *t, const int32_t *ids, size_t n, char **out, size_t *outlen, char *err,
                        size_t errlen) {
    if (t->bpe) return lt_bpe_decode(t->bpe, ids, n, out, outlen, err, errlen);
    if (t->sp) return lt_sp_tokenizer_decode(t->sp, ids, n, out, outlen, err, errlen);
    *out = malloc(n + 1);
    if (!*out) return lt_fail(err, errlen, "out of memory");
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] == t->eod) continue; /* end of document: no bytes */
        if (ids[i] < 0 || ids[i] > 255) {
            free(*out);
            *out = NULL;
            return lt_fail(err, errlen, "id %d (position %zu) is not a byte-level token (0..256)", (int)ids[i], i + 1);
        }
        (*out)[m++] = (char)ids[i];
    }
    (*out)[m] = 0;
    *outlen = m;
    return 0;
}

/* Megatron's SentencePiece tokenizers (megatron/training/tokenizer/tokenizer.py) over a model file,
 * the model itself run by libsentencepiece through sentencepiece_shim.h:
 *
 *   SentencePieceTokenizer (_SentencePieceTokenizer): the model's pieces, then the special tokens
 *     <CLS> <SEP> <EOD> <MASK>, the pad piece (or <PAD>), the bos piece (or <BOS>), the eos piece (or
 *     <EOS>), each appended after the vocabulary unless a piece already spells it, and each recorded as
 *     special either way. Encoding cuts the text at the earliest special piece (at equal positions the
 *     one added first) and encodes the text between with the model; decoding turns each special id into
 *     " piece " after the decoded text before it. vocab_size counts the appended tokens; eod = <EOD>.
 *   GPTSentencePieceTokenizer: the model alone (encode_as_ids / decode_ids), eod = the eos id.
 *   Llama2Tokenizer: the model with the bos id before every encoded text, eod = the eos id.
 *
 * Megatron's vocab_extra_ids (T5's <extra_id_N>) is not taken: preprocess refuses --vocab-extra-ids. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"
#include "engine/data/sentencepiece_shim.h"
#include "engine/data/tokenizer.h"

#define LT_SP_MAX_SPECIALS 8

typedef struct {
    char *piece;
    size_t len;
    int32_t id;
} lt_sp_special;

struct lt_sp_tokenizer {
    lt_spm *model;
    lt_sp_kind kind;
    int32_t pieces;    /* the model's pieces: ids 0 .. pieces-1 */
    int32_t bos;       /* Llama2Tokenizer */
    int nspecial;      /* in the order Megatron adds them, each piece once */
    lt_sp_special special[LT_SP_MAX_SPECIALS];
    int nadded;        /* special pieces appended after the model's: ids pieces .. pieces+nadded-1 */
    int added[LT_SP_MAX_SPECIALS]; /* index into special[] of appended id pieces + k */
};

static int32_t model_piece_id(const lt_spm *m, int32_t pieces, const char *s, size_t n) {
    for (int32_t i = 0; i < pieces; i++) {
        size_t len;
        const char *p = lt_spm_id_to_piece(m, i, &len);
        if (len == n && memcmp(p, s, n) == 0) return i;
    }
    return -1;
}

/* Megatron's _add_special_token: the piece's id in the vocabulary so far, else the next id. */
static int add_special(lt_sp_tokenizer *sp, const char *s, size_t n, char *err, size_t errlen) {
    for (int k = 0; k < sp->nspecial; k++) /* already special: the dict keeps it where it was */
        if (sp->special[k].len == n && memcmp(sp->special[k].piece, s, n) == 0) return 0;
    if (sp->nspecial == LT_SP_MAX_SPECIALS) return lt_fail(err, errlen, "too many special tokens");
    int32_t id = model_piece_id(sp->model, sp->pieces, s, n);
    lt_sp_special *t = &sp->special[sp->nspecial];
    t->piece = malloc(n + 1);
    if (!t->piece) return lt_fail(err, errlen, "out of memory");
    memcpy(t->piece, s, n);
    t->piece[n] = 0;
    t->len = n;
    if (id < 0) {
        id = sp->pieces + sp->nadded;
        sp->added[sp->nadded++] = sp->nspecial;
    }
    t->id = id;
    sp->nspecial++;
    return 0;
}

/* The piece of the model's special id, or `fallback` when the id is out of range (-1: none), as
 * Megatron's `try: id_to_piece(id) except IndexError: fallback`. */
static int add_model_special(lt_sp_tokenizer *sp, int32_t id, const char *fallback, char *err, size_t errlen) {
    size_t n;
    const char *p = lt_spm_id_to_piece(sp->model, id, &n);
    if (!p) return add_special(sp, fallback, strlen(fallback), err, errlen);
    return add_special(sp, p, n, err, errlen);
}

void lt_sp_tokenizer_free(lt_sp_tokenizer *sp) {
    if (!sp) return;
    for (int k = 0; k < sp->nspecial; k++) free(sp->special[k].piece);
    lt_spm_free(sp->model);
    free(sp);
}

int lt_sp_tokenizer_load(lt_tokenizer *t, const char *model, lt_sp_kind kind, char *err, size_t errlen) {
    lt_sp_tokenizer *sp = calloc(1, sizeof *sp);
    if (!sp) return lt_fail(err, errlen, "out of memory");
    t->sp = sp;
    sp->kind = kind;
    snprintf(t->source, sizeof t->source, "%s", model);
    sp->model = lt_spm_open(model, err, errlen);
    if (!sp->model) return -1;
    sp->pieces = lt_spm_size(sp->model);
    if (kind == LT_SP_MEGATRON) {
        static const char *const FIXED[] = {"<CLS>", "<SEP>", "<EOD>", "<MASK>"};
        for (int k = 0; k < 4; k++)
            if (add_special(sp, FIXED[k], strlen(FIXED[k]), err, errlen) != 0) return -1;
        if (add_model_special(sp, lt_spm_pad_id(sp->model), "<PAD>", err, errlen) != 0 ||
            add_model_special(sp, lt_spm_bos_id(sp->model), "<BOS>", err, errlen) != 0 ||
            add_model_special(sp, lt_spm_eos_id(sp->model), "<EOS>", err, errlen) != 0)
            return -1;
        t->vocab_size = (int64_t)sp->pieces + sp->nadded;
        t->eod = sp->special[2].id; /* <EOD> */
        return 0;
    }
    /* GPTSentencePieceTokenizer and Llama2Tokenizer: the model's vocabulary, eod = its eos id. */
    int32_t eos = lt_spm_eos_id(sp->model);
    sp->bos = lt_spm_bos_id(sp->model);
    const char *name = kind == LT_SP_GPT ? "GPTSentencePieceTokenizer" : "Llama2Tokenizer";
    if (eos < 0 || eos >= sp->pieces)
        return lt_fail(err, errlen, "%s: the SentencePiece model has no eos piece (eos_id = %d), which %s takes as its "
                       "end-of-document token: train it with an eos_id, or use SentencePieceTokenizer (its own <EOD>)",
                       model, (int)eos, name);
    if (kind == LT_SP_LLAMA2 && (sp->bos < 0 || sp->bos >= sp->pieces))
        return lt_fail(err, errlen, "%s: the SentencePiece model has no bos piece (bos_id = %d), which Llama2Tokenizer "
                       "puts before every text: train it with a bos_id, or use GPTSentencePieceTokenizer", model,
                       (int)sp->bos);
    t->vocab_size = sp->pieces;
    t->eod = eos;
    return 0;
}

static int encode_model(const lt_sp_tokenizer *sp, const char *text, size_t n, lt_token_buf *out, char *err,
                        size_t errlen) {
    if (n == 0) return 0;
    int32_t *ids;
    size_t m;
    if (lt_spm_encode(sp->model, text, n, &ids, &m, err, errlen) != 0) return -1;
    int rc = 0;
    for (size_t i = 0; i < m && rc == 0; i++)
        if (lt_token_buf_push(out, ids[i]) != 0) rc = lt_fail(err, errlen, "out of memory");
    free(ids);
    return rc;
}

/* First occurrence of needle in hay[from..n), or n when there is none. */
static size_t find_from(const char *hay, size_t n, size_t from, const char *needle, size_t len) {
    if (len == 0) return from;
    for (size_t i = from; i + len <= n; i++) {
        const char *p = memchr(hay + i, needle[0], n - len + 1 - i);
        if (!p) return n;
        i = (size_t)(p - hay);
        if (memcmp(p, needle, len) == 0) return i;
    }
    return n;
}

int lt_sp_tokenizer_encode(const lt_sp_tokenizer *sp, const char *text, size_t n, lt_token_buf *out, char *err,
                           size_t errlen) {
    if (sp->kind != LT_SP_MEGATRON) {
        if (sp->kind == LT_SP_LLAMA2 && lt_token_buf_push(out, sp->bos) != 0) return lt_fail(err, errlen, "out of memory");
        return encode_model(sp, text, n, out, err, errlen);
    }
    /* Where each special piece next occurs at or after idx (n: nowhere). An occurrence found from an
     * earlier idx stays the first one as long as it is not behind idx, so each piece's search only
     * moves forward through the text. */
    size_t next[LT_SP_MAX_SPECIALS];
    for (int k = 0; k < sp->nspecial; k++) next[k] = find_from(text, n, 0, sp->special[k].piece, sp->special[k].len);
    size_t idx = 0;
    for (;;) {
        int best = -1;
        for (int k = 0; k < sp->nspecial; k++) {
            if (next[k] < idx) next[k] = find_from(text, n, idx, sp->special[k].piece, sp->special[k].len);
            if (next[k] < n && (best < 0 || next[k] < next[best])) best = k; /* ties: the one added first */
        }
        if (best < 0) break;
        if (encode_model(sp, text + idx, next[best] - idx, out, err, errlen) != 0) return -1;
        if (lt_token_buf_push(out, sp->special[best].id) != 0) return lt_fail(err, errlen, "out of memory");
        idx = next[best] + sp->special[best].len;
    }
    return encode_model(sp, text + idx, n - idx, out, err, errlen);
}

typedef struct {
    char *d;
    size_t n, cap;
} sp_text;

static int put(sp_text *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *d = realloc(b->d, cap);
        if (!d) return -1;
        b->d = d;
        b->cap = cap;
    }
    memcpy(b->d + b->n, s, n);
    b->n += n;
    b->d[b->n] = 0;
    return 0;
}

static int decode_run(const lt_sp_tokenizer *sp, const int32_t *ids, size_t n, size_t first, sp_text *b, char *err,
                      size_t errlen) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= sp->pieces)
            return lt_fail(err, errlen, "id %d (position %zu) is not in the vocabulary (0..%d)", (int)ids[i],
                           first + i + 1, sp->kind == LT_SP_MEGATRON ? sp->pieces + sp->nadded - 1 : sp->pieces - 1);
    if (n == 0) return 0;
    char *s;
    size_t len;
    if (lt_spm_decode(sp->model, ids, n, &s, &len, err, errlen) != 0) return -1;
    int rc = put(b, s, len);
    free(s);
    return rc != 0 ? lt_fail(err, errlen, "out of memory") : 0;
}

int lt_sp_tokenizer_decode(const lt_sp_tokenizer *sp, const int32_t *ids, size_t n, char **out, size_t *outlen,
                           char *err, size_t errlen) {
    sp_text b = {0};
    *out = NULL;
    *outlen = 0;
    if (put(&b, "", 0) != 0) return lt_fail(err, errlen, "out of memory");
    size_t last = 0;
    if (sp->kind == LT_SP_MEGATRON) {
        for (size_t i = 0; i < n; i++) {
            int k = 0;
            while (k < sp->nspecial && sp->special[k].id != ids[i]) k++;
            if (k == sp->nspecial) continue;
            /* Megatron: decode_ids(ids[last:i]) + " " + the special's piece + " " */
            int rc = decode_run(sp, ids + last, i - last, last, &b, err, errlen);
            if (rc == 0 && (put(&b, " ", 1) != 0 || put(&b, sp->special[k].piece, sp->special[k].len) != 0 ||
                            put(&b, " ", 1) != 0))
                rc = lt_fail(err, errlen, "out of memory");
            if (rc != 0) {
                free(b.d);
                return -1;
            }
            last = i + 1;
        }
    }
    if (decode_run(sp, ids + last, n - last, last, &b, err, errlen) != 0) {
        free(b.d);
        return -1;
    }
    *out = b.d;
    *outlen = b.n;
    return 0;
}

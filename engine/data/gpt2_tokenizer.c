/* GPT2BPETokenizer: GPT-2's encoder.json (token -> id) and vocab.bpe ("#version" line, then one
 * merge "a b" per line, rank = line order), as Megatron's GPT2BPETokenizer reads them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/core/error.h"
#include "engine/data/tokenizer.h"
#include "engine/io/json.h"

static int load_encoder(lt_tokenizer *t, const char *path, char *err, size_t errlen) {
    size_t n;
    char msg[512];
    char *text = lt_read_whole_file(path, &n, err, errlen);
    if (!text) return -1;
    lt_json_doc doc;
    int rc = 0;
    if (lt_json_parse_ex(&doc, text, n, 64, n + 1, LT_JSON_ANY, msg, sizeof msg) != 0) {
        rc = lt_fail(err, errlen, "%s: not valid JSON (%s); a GPT-2 vocab file is encoder.json: {\"token\": id, ...}",
                     path, msg);
    } else if (doc.nodes[0].type != LT_JSON_OBJECT) {
        rc = lt_fail(err, errlen, "%s: expected a JSON object {\"token\": id, ...} (GPT-2's encoder.json)", path);
    } else {
        for (size_t c = doc.nodes[0].first; c != LT_JSON_NONE && rc == 0; c = doc.nodes[c].next) {
            const lt_json_node *v = &doc.nodes[c];
            const char *key = lt_json_key(&doc, c);
            if (v->type != LT_JSON_INT || v->neg || v->mag > INT32_MAX)
                rc = lt_fail(err, errlen, "%s: the id of \"%s\" is not an integer in 0..2^31-1", path, key);
            else if (lt_bpe_add_token(t->bpe, key, strlen(key), (int32_t)v->mag, 0, msg, sizeof msg) != 0)
                rc = lt_fail(err, errlen, "%s: %s", path, msg);
        }
    }
    lt_json_free(&doc);
    free(text);
    return rc;
}

static int load_merges(lt_tokenizer *t, const char *path, char *err, size_t errlen) {
    size_t n;
    char msg[512];
    char *text = lt_read_whole_file(path, &n, err, errlen);
    if (!text) return -1;
    int rc = 0;
    size_t lineno = 0;
    for (char *p = text, *end = text + n; p < end && rc == 0;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        lineno++;
        char *line = p;
        p = nl ? nl + 1 : end;
        if (e > line && e[-1] == '\r') e--;
        if (lineno == 1) {
            if (e - line < 8 || memcmp(line, "#version", 8) != 0)
                rc = lt_fail(err, errlen, "%s:1: expected the \"#version: ...\" line of a GPT-2 merge file (vocab.bpe)",
                             path);
            continue;
        }
        /* As Python's str.split(): parts separated by runs of whitespace. */
        const char *part[3];
        size_t plen[3], k = 0;
        for (char *q = line; q < e;) {
            while (q < e && (*q == ' ' || *q == '\t')) q++;
            if (q == e) break;
            char *s = q;
            while (q < e && *q != ' ' && *q != '\t') q++;
            if (k < 3) part[k] = s, plen[k] = (size_t)(q - s);
            k++;
        }
        if (k == 0) continue; /* the empty last line */
        if (k != 2) {
            rc = lt_fail(err, errlen, "%s:%zu: expected a merge \"a b\" (two tokens separated by a space)", path, lineno);
        } else if (lt_bpe_add_merge(t->bpe, part[0], plen[0], part[1], plen[1], msg, sizeof msg) != 0) {
            rc = lt_fail(err, errlen, "%s:%zu: %s (is the vocab file the one that goes with this merge file?)", path,
                         lineno, msg);
        }
    }
    free(text);
    return rc;
}

int lt_gpt2_tokenizer_load(lt_tokenizer *t, const char *vocab_file, const char *merge_file, char *err, size_t errlen) {
    char msg[512];
    t->bpe = lt_bpe_new();
    if (!t->bpe) return lt_fail(err, errlen, "out of memory");
    if (load_encoder(t, vocab_file, err, errlen) != 0 || load_merges(t, merge_file, err, errlen) != 0) return -1;
    if (lt_bpe_finish(t->bpe, msg, sizeof msg) != 0) return lt_fail(err, errlen, "%s: %s", vocab_file, msg);
    lt_bpe_set_options(t->bpe, LT_BPE_PRE_GPT2, 0, 0);
    t->eod = lt_bpe_token_id(t->bpe, "<|endoftext|>", 13);
    if (t->eod < 0)
        return lt_fail(err, errlen, "%s: no \"<|endoftext|>\" token, GPT-2's end of document (Megatron's eod)", vocab_file);
    /* Megatron's vocab_size is len(encoder); ids beyond it would not fit the embedding. */
    t->vocab_size = lt_bpe_num_tokens(t->bpe);
    if (lt_bpe_id_limit(t->bpe) > t->vocab_size)
        return lt_fail(err, errlen, "%s: ids go up to %lld but there are only %lld tokens: the ids must be 0..N-1",
                       vocab_file, (long long)lt_bpe_id_limit(t->bpe) - 1, (long long)t->vocab_size);
    snprintf(t->source, sizeof t->source, "%s + %s", vocab_file, merge_file);
    return 0;
}

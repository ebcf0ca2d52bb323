/* HuggingFaceTokenizer: a tokenizer.json (Hugging Face `tokenizers`) of the byte-level BPE kind, as
 * GPT-2, Llama-3 and Qwen2 ship: model BPE (vocab, merges as "a b" strings or [a, b] pairs), no
 * normalizer or NFC (Qwen2's), pre-tokenizer ByteLevel (GPT-2's pattern) or Split on Llama-3's /
 * Qwen2's pattern then ByteLevel without regex, decoder ByteLevel, added tokens matched before BPE
 * (those not normalized in the original text, the others in the normalized text), post-processor
 * ByteLevel and/or TemplateProcessing (Llama-3's <|begin_of_text|> before the text), as transformers'
 * tokenizer(text).input_ids, which Megatron's _HuggingFaceTokenizer.tokenize returns. Everything else
 * is refused with the field that is not supported: a tokenizer that silently encodes differently would
 * spoil a dataset. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/core/error.h"
#include "engine/data/tokenizer.h"
#include "engine/io/json.h"

static const char LLAMA3_PATTERN[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
static const char QWEN2_PATTERN[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";

typedef struct {
    const char *path, *text;
    lt_json_doc doc;
    char *err;
    size_t errlen;
} hf_t;

static size_t member(const hf_t *h, size_t obj, const char *key) {
    if (obj == LT_JSON_NONE || h->doc.nodes[obj].type != LT_JSON_OBJECT) return LT_JSON_NONE;
    size_t found = LT_JSON_NONE;
    for (size_t c = h->doc.nodes[obj].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next)
        if (strcmp(lt_json_key(&h->doc, c), key) == 0) found = c;
    return found;
}

/* 1 when node is absent or the literal `lit` (null, true, false). */
static int is_lit(const hf_t *h, size_t node, const char *lit) {
    if (node == LT_JSON_NONE) return 1;
    const lt_json_node *v = &h->doc.nodes[node];
    return v->type == LT_JSON_LITERAL && v->end - v->pos == strlen(lit) && memcmp(h->text + v->pos, lit, strlen(lit)) == 0;
}
static int is_null(const hf_t *h, size_t node) { return is_lit(h, node, "null"); }
static int is_true(const hf_t *h, size_t node) { return node != LT_JSON_NONE && is_lit(h, node, "true"); }

static const char *str_of(const hf_t *h, size_t node) {
    return node != LT_JSON_NONE && h->doc.nodes[node].type == LT_JSON_STRING ? lt_json_str(&h->doc, node) : NULL;
}

static const char *type_of(const hf_t *h, size_t obj) {
    const char *s = str_of(h, member(h, obj, "type"));
    return s ? s : "?";
}

static int refuse(hf_t *h, const char *what, const char *value, const char *supported) {
    return lt_fail(h->err, h->errlen, "%s: %s %s is not supported (luatron's HuggingFaceTokenizer takes %s)", h->path,
                   what, value, supported);
}

/* The printed JSON of a node, shortened, for messages. */
static const char *snippet(const hf_t *h, size_t node, char *buf, size_t n) {
    const lt_json_node *v = &h->doc.nodes[node];
    size_t len = v->end - v->pos;
    snprintf(buf, n, "%.*s%s", (int)(len > 80 ? 80 : len), h->text + v->pos, len > 80 ? "..." : "");
    return buf;
}

static int is_array(const hf_t *h, size_t node) {
    return node != LT_JSON_NONE && h->doc.nodes[node].type == LT_JSON_ARRAY;
}

/* 1 when node is the integer 0 (a template's type_id). */
static int is_zero(const hf_t *h, size_t node) {
    return node != LT_JSON_NONE && h->doc.nodes[node].type == LT_JSON_INT && h->doc.nodes[node].mag == 0;
}

/* The normalizer (before the added tokens: normalized ones are matched as their normalized content). */
static int load_normalizer(hf_t *h, lt_bpe *bpe, size_t root) {
    char buf[128], what[64];
    const char *supported = "no normalizer, NFC, or a Sequence of NFC (NFD, NFKC, NFKD, Lowercase, Strip, Replace, "
                            "Prepend, BertNormalizer, ... are not implemented)";
    size_t n = member(h, root, "normalizer");
    if (is_null(h, n)) return 0;
    if (strcmp(type_of(h, n), "NFC") == 0) {
        lt_bpe_set_nfc(bpe, 1);
        return 0;
    }
    size_t list = member(h, n, "normalizers");
    if (strcmp(type_of(h, n), "Sequence") != 0 || !is_array(h, list))
        return refuse(h, "normalizer", snippet(h, n, buf, sizeof buf), supported);
    size_t k = 0;
    for (size_t c = h->doc.nodes[list].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next, k++) {
        snprintf(what, sizeof what, "normalizer.normalizers[%zu]", k);
        if (strcmp(type_of(h, c), "NFC") != 0) return refuse(h, what, snippet(h, c, buf, sizeof buf), supported);
        lt_bpe_set_nfc(bpe, 1); /* NFC twice is NFC */
    }
    return 0;
}

/* A TemplateProcessing post-processor (at `where`): its single template's special tokens around $A,
 * their ids from its special_tokens map, checked against the vocabulary. The pair template is not
 * used: Megatron's tokenize encodes one text. */
static int load_template(hf_t *h, lt_tokenizer *t, size_t tp, const char *where) {
    size_t single = member(h, tp, "single"), specials = member(h, tp, "special_tokens"), k = 0, seqs = 0;
    if (!is_array(h, single))
        return lt_fail(h->err, h->errlen, "%s: %s (TemplateProcessing) has no \"single\" template (a list): luatron "
                       "encodes one text at a time, as Megatron's tokenize does, and a pair-only template does not "
                       "say what to put around it", h->path, where);
    for (size_t c = h->doc.nodes[single].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next, k++) {
        size_t st = member(h, c, "SpecialToken"), sq = member(h, c, "Sequence"), piece = st != LT_JSON_NONE ? st : sq;
        const char *name = str_of(h, member(h, piece, "id"));
        if ((st == LT_JSON_NONE) == (sq == LT_JSON_NONE) || !name)
            return lt_fail(h->err, h->errlen, "%s: %s.single[%zu] is not {\"SpecialToken\": {\"id\": ...}} nor "
                           "{\"Sequence\": {\"id\": \"A\"}}", h->path, where, k);
        size_t type_id = member(h, piece, "type_id");
        if (type_id != LT_JSON_NONE && !is_zero(h, type_id))
            return lt_fail(h->err, h->errlen, "%s: %s.single[%zu]: type_id is not 0: luatron's tokens carry no token "
                           "type (Megatron's tokenize returns the input ids only), so a single template is taken "
                           "with type_id 0 only", h->path, where, k);
        if (sq != LT_JSON_NONE) {
            if (strcmp(name, "A") != 0)
                return lt_fail(h->err, h->errlen, "%s: %s.single[%zu] is the sequence $%s: the single template "
                               "of one text can only hold $A", h->path, where, k, name);
            if (++seqs > 1)
                return lt_fail(h->err, h->errlen, "%s: %s.single holds $A more than once (not implemented)", h->path,
                               where);
            t->post_before = t->post_n;
            continue;
        }
        size_t sp = member(h, specials, name), ids = member(h, sp, "ids"), toks = member(h, sp, "tokens");
        if (!is_array(h, ids) || !is_array(h, toks) || h->doc.nodes[ids].len != h->doc.nodes[toks].len)
            return lt_fail(h->err, h->errlen, "%s: %s.special_tokens has no \"%s\" with \"ids\" and \"tokens\" "
                           "lists of one length (the single template's special token %zu)", h->path, where, name, k);
        size_t j = 0;
        for (size_t i = h->doc.nodes[ids].first, tk = h->doc.nodes[toks].first; i != LT_JSON_NONE;
             i = h->doc.nodes[i].next, tk = h->doc.nodes[tk].next, j++) {
            const lt_json_node *v = &h->doc.nodes[i];
            const char *tok = str_of(h, tk);
            size_t len = 0;
            const char *bytes = v->type == LT_JSON_INT && !v->neg && v->mag <= INT32_MAX
                                    ? lt_bpe_token_bytes(t->bpe, (int32_t)v->mag, &len) : NULL;
            if (!bytes || !tok)
                return lt_fail(h->err, h->errlen, "%s: %s.special_tokens[\"%s\"].ids[%zu] is not the id of a token "
                               "in the vocabulary (model.vocab or added_tokens)", h->path, where, name, j);
            int32_t id = (int32_t)v->mag;
            if (lt_bpe_token_id(t->bpe, tok, strlen(tok)) != id && lt_bpe_spelled_id(t->bpe, tok, strlen(tok)) != id)
                return lt_fail(h->err, h->errlen, "%s: %s.special_tokens[\"%s\"]: id %d is \"%.*s\" in the "
                               "vocabulary, not \"%s\"", h->path, where, name, (int)id, (int)(len > 60 ? 60 : len),
                               bytes, tok);
            int32_t *grown = realloc(t->post_ids, (t->post_n + 1) * sizeof *grown);
            if (!grown) return lt_fail(h->err, h->errlen, "out of memory");
            t->post_ids = grown;
            t->post_ids[t->post_n++] = id;
        }
    }
    if (seqs != 1)
        return lt_fail(h->err, h->errlen, "%s: %s.single has no {\"Sequence\": {\"id\": \"A\"}}: where the text "
                       "goes is not said", h->path, where);
    return 0;
}

static int check_pipeline(hf_t *h, lt_tokenizer *t, size_t root) {
    lt_bpe *bpe = t->bpe;
    char buf[128], what[64];
    size_t n;
    if (!is_null(h, n = member(h, root, "truncation")))
        return refuse(h, "truncation", snippet(h, n, buf, sizeof buf), "\"truncation\": null: documents are not cut");
    if (!is_null(h, n = member(h, root, "padding")))
        return refuse(h, "padding", snippet(h, n, buf, sizeof buf), "\"padding\": null");
    /* Decoder: the byte-level one (or none): ids decode to their bytes. */
    n = member(h, root, "decoder");
    if (!is_null(h, n) && strcmp(type_of(h, n), "ByteLevel") != 0)
        return refuse(h, "decoder", type_of(h, n), "decoder ByteLevel");
    /* Post-processor: ByteLevel only changes offsets; TemplateProcessing puts its single template's
     * tokens around the text's; others (BertProcessing, RobertaProcessing, ...) are refused. */
    const char *post = "post_processor ByteLevel, TemplateProcessing, a Sequence of them, or null (BertProcessing, "
                       "RobertaProcessing, ... are not implemented)";
    n = member(h, root, "post_processor");
    if (!is_null(h, n) && strcmp(type_of(h, n), "ByteLevel") != 0) {
        if (strcmp(type_of(h, n), "TemplateProcessing") == 0) {
            if (load_template(h, t, n, "post_processor") != 0) return -1;
        } else if (strcmp(type_of(h, n), "Sequence") == 0 && is_array(h, member(h, n, "processors"))) {
            size_t k = 0, templates = 0;
            for (size_t c = h->doc.nodes[member(h, n, "processors")].first; c != LT_JSON_NONE;
                 c = h->doc.nodes[c].next, k++) {
                snprintf(what, sizeof what, "post_processor.processors[%zu]", k);
                if (strcmp(type_of(h, c), "ByteLevel") == 0) continue;
                if (strcmp(type_of(h, c), "TemplateProcessing") != 0 || templates++)
                    return refuse(h, what, type_of(h, c), post);
                if (load_template(h, t, c, what) != 0) return -1;
            }
        } else {
            return refuse(h, "post_processor", type_of(h, n), post);
        }
    }
    /* Pre-tokenizer. */
    size_t pre = member(h, root, "pre_tokenizer");
    const char *pt = type_of(h, pre);
    const char *supported = "pre_tokenizer ByteLevel, or Sequence [Split on Llama-3's or Qwen2's pattern (Isolated), "
                            "ByteLevel with use_regex false]";
    if (is_null(h, pre)) return refuse(h, "pre_tokenizer", "null", supported);
    if (strcmp(pt, "ByteLevel") == 0) {
        size_t ur = member(h, pre, "use_regex");
        lt_bpe_set_options(bpe, is_lit(h, ur, "false") && ur != LT_JSON_NONE ? LT_BPE_PRE_NONE : LT_BPE_PRE_GPT2,
                           is_true(h, member(h, pre, "add_prefix_space")), 0);
        return 0;
    }
    if (strcmp(pt, "Sequence") == 0) {
        size_t list = member(h, pre, "pretokenizers");
        if (list == LT_JSON_NONE || h->doc.nodes[list].type != LT_JSON_ARRAY || h->doc.nodes[list].len != 2)
            return refuse(h, "pre_tokenizer", snippet(h, pre, buf, sizeof buf), supported);
        size_t split = h->doc.nodes[list].first, bl = h->doc.nodes[split].next;
        const char *pattern = str_of(h, member(h, member(h, split, "pattern"), "Regex"));
        const char *behavior = str_of(h, member(h, split, "behavior"));
        lt_bpe_pre which = !pattern                               ? LT_BPE_PRE_NONE
                           : strcmp(pattern, LLAMA3_PATTERN) == 0 ? LT_BPE_PRE_LLAMA3
                           : strcmp(pattern, QWEN2_PATTERN) == 0  ? LT_BPE_PRE_QWEN2
                                                                  : LT_BPE_PRE_NONE;
        size_t ur = member(h, bl, "use_regex");
        if (strcmp(type_of(h, split), "Split") != 0 || which == LT_BPE_PRE_NONE || !behavior ||
            strcmp(behavior, "Isolated") != 0 || is_true(h, member(h, split, "invert")) ||
            strcmp(type_of(h, bl), "ByteLevel") != 0 || ur == LT_JSON_NONE || !is_lit(h, ur, "false") ||
            is_true(h, member(h, bl, "add_prefix_space")))
            return refuse(h, "pre_tokenizer", snippet(h, pre, buf, sizeof buf), supported);
        lt_bpe_set_options(bpe, which, 0, 0);
        return 0;
    }
    return refuse(h, "pre_tokenizer", pt, supported);
}

static int load_model(hf_t *h, lt_bpe *bpe, size_t root) {
    char msg[512], buf[128];
    size_t model = member(h, root, "model");
    if (model == LT_JSON_NONE || h->doc.nodes[model].type != LT_JSON_OBJECT)
        return lt_fail(h->err, h->errlen, "%s: no \"model\" object: is this a Hugging Face tokenizer.json?", h->path);
    size_t ty = member(h, model, "type");
    if (ty != LT_JSON_NONE && strcmp(type_of(h, model), "BPE") != 0)
        return refuse(h, "model type", type_of(h, model), "model type BPE (byte-level), not WordPiece, Unigram or "
                      "WordLevel");
    size_t n;
    if (!is_null(h, n = member(h, model, "dropout")))
        return refuse(h, "model.dropout", snippet(h, n, buf, sizeof buf), "\"dropout\": null");
    if (is_true(h, member(h, model, "byte_fallback")))
        return refuse(h, "model.byte_fallback", "true", "byte-level BPE, which needs no byte fallback");
    const char *fields[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        n = member(h, model, fields[i]);
        const char *s = str_of(h, n);
        if (!is_null(h, n) && !(s && !*s))
            return refuse(h, fields[i], snippet(h, n, buf, sizeof buf), "an empty or null one");
    }
    size_t vocab = member(h, model, "vocab"), merges = member(h, model, "merges");
    if (vocab == LT_JSON_NONE || h->doc.nodes[vocab].type != LT_JSON_OBJECT || merges == LT_JSON_NONE ||
        h->doc.nodes[merges].type != LT_JSON_ARRAY)
        return lt_fail(h->err, h->errlen, "%s: model needs \"vocab\" (an object) and \"merges\" (a list)", h->path);
    for (size_t c = h->doc.nodes[vocab].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next) {
        const lt_json_node *v = &h->doc.nodes[c];
        const char *key = lt_json_key(&h->doc, c);
        if (v->type != LT_JSON_INT || v->neg || v->mag > INT32_MAX)
            return lt_fail(h->err, h->errlen, "%s: model.vocab: the id of \"%s\" is not an integer in 0..2^31-1",
                           h->path, key);
        if (lt_bpe_add_token(bpe, key, strlen(key), (int32_t)v->mag, 0, msg, sizeof msg) != 0)
            return lt_fail(h->err, h->errlen, "%s: model.vocab: %s", h->path, msg);
    }
    size_t k = 0;
    for (size_t c = h->doc.nodes[merges].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next, k++) {
        const char *a = NULL, *b = NULL;
        size_t an = 0, bn = 0;
        const lt_json_node *m = &h->doc.nodes[c];
        if (m->type == LT_JSON_STRING) { /* "a b" */
            a = lt_json_str(&h->doc, c);
            const char *sp = strchr(a, ' ');
            if (sp && !strchr(sp + 1, ' ')) an = (size_t)(sp - a), b = sp + 1, bn = strlen(b);
            else a = NULL;
        } else if (m->type == LT_JSON_ARRAY && m->len == 2) { /* ["a", "b"] */
            a = str_of(h, m->first);
            b = str_of(h, h->doc.nodes[m->first].next);
            if (a && b) an = strlen(a), bn = strlen(b);
            else a = NULL;
        }
        if (!a) return lt_fail(h->err, h->errlen, "%s: model.merges[%zu] is not \"a b\" nor [\"a\", \"b\"]", h->path, k);
        if (lt_bpe_add_merge(bpe, a, an, b, bn, msg, sizeof msg) != 0)
            return lt_fail(h->err, h->errlen, "%s: model.merges[%zu]: %s", h->path, k, msg);
    }
    lt_bpe_set_options(bpe, LT_BPE_PRE_GPT2, 0, 0);
    return 0;
}

static int load_added(hf_t *h, lt_bpe *bpe, size_t root) {
    char msg[512];
    size_t list = member(h, root, "added_tokens");
    if (list == LT_JSON_NONE || is_null(h, list)) return 0;
    if (h->doc.nodes[list].type != LT_JSON_ARRAY)
        return lt_fail(h->err, h->errlen, "%s: added_tokens must be a list", h->path);
    size_t k = 0;
    for (size_t c = h->doc.nodes[list].first; c != LT_JSON_NONE; c = h->doc.nodes[c].next, k++) {
        size_t id = member(h, c, "id");
        const char *content = str_of(h, member(h, c, "content"));
        if (id == LT_JSON_NONE || h->doc.nodes[id].type != LT_JSON_INT || h->doc.nodes[id].neg ||
            h->doc.nodes[id].mag > INT32_MAX || !content || !*content)
            return lt_fail(h->err, h->errlen, "%s: added_tokens[%zu] needs an \"id\" (integer) and a non-empty "
                           "\"content\"", h->path, k);
        /* transformers' default for a token that does not say: special ones are not normalized */
        size_t norm = member(h, c, "normalized");
        int normalized = norm == LT_JSON_NONE ? !is_true(h, member(h, c, "special")) : is_true(h, norm);
        const char *flags[] = {"single_word", "lstrip", "rstrip"};
        for (int f = 0; f < 3; f++)
            if (is_true(h, member(h, c, flags[f])))
                return lt_fail(h->err, h->errlen, "%s: added_tokens[%zu] (\"%s\"): %s = true is not supported (added "
                               "tokens match their exact content)", h->path, k, content, flags[f]);
        int32_t tid = (int32_t)h->doc.nodes[id].mag;
        if (lt_bpe_add_token(bpe, content, strlen(content), tid, 1, msg, sizeof msg) != 0 ||
            lt_bpe_add_special(bpe, tid, normalized, msg, sizeof msg) != 0)
            return lt_fail(h->err, h->errlen, "%s: added_tokens[%zu]: %s", h->path, k, msg);
    }
    return 0;
}

/* eos_token of a tokenizer_config.json beside the tokenizer.json (a string or {"content": ...}), as
 * transformers' eos_token_id (Megatron's eod); NULL when there is none. */
static char *eos_from_config(const char *dir, char *err, size_t errlen, int *failed) {
    char path[4300];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    struct stat st;
    *failed = 0;
    if (stat(path, &st) != 0) return NULL;
    size_t n;
    char *text = lt_read_whole_file(path, &n, err, errlen), msg[256], *out = NULL;
    if (!text) { *failed = 1; return NULL; }
    hf_t h = {.path = path, .text = text, .err = err, .errlen = errlen};
    if (lt_json_parse_ex(&h.doc, text, n, 64, n + 1, LT_JSON_ANY, msg, sizeof msg) != 0) {
        lt_fail(err, errlen, "%s: not valid JSON (%s)", path, msg);
        *failed = 1;
    } else {
        size_t e = member(&h, 0, "eos_token");
        const char *s = str_of(&h, e);
        if (!s) s = str_of(&h, member(&h, e, "content"));
        if (s) out = strdup(s);
    }
    lt_json_free(&h.doc);
    free(text);
    return out;
}

int lt_hf_tokenizer_load(lt_tokenizer *t, const char *model, char *err, size_t errlen) {
    char path[4200], dir[4200], msg[512];
    struct stat st;
    if (stat(model, &st) != 0) return lt_fail(err, errlen, "%s: no such file or folder (the tokenizer model: a "
                                              "tokenizer.json or the folder that holds it)", model);
    if (S_ISDIR(st.st_mode)) {
        snprintf(path, sizeof path, "%s/tokenizer.json", model);
        snprintf(dir, sizeof dir, "%s", model);
        if (stat(path, &st) != 0)
            return lt_fail(err, errlen, "%s: the folder has no tokenizer.json (luatron reads the fast-tokenizer "
                           "file; vocab.json/merges.txt pairs go to GPT2BPETokenizer)", model);
    } else {
        snprintf(path, sizeof path, "%s", model);
        snprintf(dir, sizeof dir, "%s", model);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        else snprintf(dir, sizeof dir, ".");
    }
    size_t n;
    char *text = lt_read_whole_file(path, &n, err, errlen);
    if (!text) return -1;
    hf_t h = {.path = path, .text = text, .err = err, .errlen = errlen};
    int rc = 0;
    t->bpe = lt_bpe_new();
    if (!t->bpe) rc = lt_fail(err, errlen, "out of memory");
    else if (lt_json_parse_ex(&h.doc, text, n, 256, n + 1, LT_JSON_ANY, msg, sizeof msg) != 0)
        rc = lt_fail(err, errlen, "%s: not valid JSON (%s)", path, msg);
    else if (h.doc.nodes[0].type != LT_JSON_OBJECT)
        rc = lt_fail(err, errlen, "%s: expected a JSON object (a Hugging Face tokenizer.json)", path);
    else if (load_model(&h, t->bpe, 0) != 0 || load_normalizer(&h, t->bpe, 0) != 0 ||
             load_added(&h, t->bpe, 0) != 0 || check_pipeline(&h, t, 0) != 0)
        rc = -1;
    else if (lt_bpe_finish(t->bpe, msg, sizeof msg) != 0)
        rc = lt_fail(err, errlen, "%s: %s", path, msg);
    int ignore = rc == 0 && is_true(&h, member(&h, member(&h, 0, "model"), "ignore_merges"));
    lt_json_free(&h.doc);
    free(text);
    if (rc != 0) return -1;
    if (ignore) lt_bpe_enable_ignore_merges(t->bpe);
    int failed;
    char *eos = eos_from_config(dir, err, errlen, &failed);
    if (failed) return -1;
    const char *eos_name = eos ? eos : "<|endoftext|>";
    t->eod = lt_bpe_token_id(t->bpe, eos_name, strlen(eos_name));
    if (t->eod < 0) {
        rc = lt_fail(err, errlen, "%s: no end-of-document token: %s", path,
                     eos ? "the eos_token of tokenizer_config.json is not in the vocabulary"
                         : "no \"<|endoftext|>\" token, and no tokenizer_config.json with an eos_token beside it");
        free(eos);
        return rc;
    }
    free(eos);
    /* Megatron's vocab_size is len(tokenizer): every distinct token, added ones included. */
    t->vocab_size = lt_bpe_num_tokens(t->bpe);
    if (lt_bpe_id_limit(t->bpe) > t->vocab_size) t->vocab_size = lt_bpe_id_limit(t->bpe);
    snprintf(t->source, sizeof t->source, "%.500s", path);
    return 0;
}

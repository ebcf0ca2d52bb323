/* The SentencePiece tokenizers' C side on a model spm_train makes here (BPE; user-defined <SEP>; unk 0,
 * bos 1 <s>, eos 2 </s>, no pad): the shim against the model file, Megatron's special tokens (which are
 * appended, which are the model's own, in what order), encoding around special pieces as the model's
 * encoding of the text between, decoding with " piece ", GPTSentencePieceTokenizer / Llama2Tokenizer,
 * and the errors. tests/lua/tokenizer_spec.lua checks whole encodings against a Python reference. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/data/sentencepiece_shim.h"
#include "engine/data/tokenizer.h"
#include "tests/data/tmpdir.h"
#include "tests/tap.h"

static char err[1024];

/* The model's own encoding of s, appended to b. */
static void model_ids(const lt_spm *m, const char *s, lt_token_buf *b) {
    int32_t *ids;
    size_t n;
    if (lt_spm_encode(m, s, strlen(s), &ids, &n, err, sizeof err) != 0) return;
    for (size_t i = 0; i < n; i++) lt_token_buf_push(b, ids[i]);
    free(ids);
}

static int same(const lt_token_buf *a, const lt_token_buf *b) {
    return a->n == b->n && (a->n == 0 || memcmp(a->ids, b->ids, a->n * sizeof(int32_t)) == 0);
}

static int32_t piece_id(const lt_spm *m, const char *piece) {
    for (int32_t i = 0; i < lt_spm_size(m); i++) {
        size_t n;
        const char *p = lt_spm_id_to_piece(m, i, &n);
        if (n == strlen(piece) && memcmp(p, piece, n) == 0) return i;
    }
    return -1;
}

int main(void) {
    tmpdir_make("sentencepiece_test");
    FILE *f = fopen(tmp_path("train.txt"), "w");
    for (int i = 0; i < 300; i++)
        fprintf(f, "the caf\xc3\xa9 of %d stra\xc3\x9f" "e, \xe4\xb8\xad\xe6\x96\x87 and more words here %d\n", i % 17,
                i % 5);
    fclose(f);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "spm_train --input=%s --model_prefix=%s --model_type=bpe --vocab_size=80 "
             "--character_coverage=1.0 --user_defined_symbols='<SEP>' --minloglevel=2 --num_threads=1 >/dev/null 2>&1",
             tmp_path("train.txt"), tmp_path("m"));
    int rc = system(cmd);
    TAP_CHECK(rc == 0, "spm_train makes a model (the sentencepiece package)");
    if (rc != 0) return tap_done();
    const char *model = tmp_path("m.model");

    lt_spm *m = lt_spm_open(model, err, sizeof err);
    TAP_CHECK(m && lt_spm_size(m) == 80 && lt_spm_pad_id(m) == -1 && lt_spm_bos_id(m) == 1 && lt_spm_eos_id(m) == 2,
              "the shim reads the model: 80 pieces, no pad, bos 1, eos 2%s%s", m ? "" : ": ", m ? "" : err);
    if (!m) return tap_done();
    int32_t n = lt_spm_size(m), sep = piece_id(m, "<SEP>");
    TAP_CHECK(sep > 2 && piece_id(m, "<s>") == 1 && piece_id(m, "</s>") == 2, "<SEP> is a piece of the model (%d)", sep);

    lt_tokenizer_spec spec = {.type = "SentencePieceTokenizer", .model = model};
    lt_tokenizer *t = lt_tokenizer_open(&spec, err, sizeof err);
    TAP_CHECK(t != NULL, "SentencePieceTokenizer opens the model%s%s", t ? "" : ": ", t ? "" : err);
    if (!t) return tap_done();
    /* appended in Megatron's order: <CLS> n, (<SEP> is the model's), <EOD> n+1, <MASK> n+2, <PAD> n+3 */
    TAP_CHECK(t->vocab_size == n + 4 && t->eod == n + 1, "vocab %lld = pieces + <CLS> <EOD> <MASK> <PAD>; eod %d",
              (long long)t->vocab_size, (int)t->eod);
    struct {
        const char *text;
        int32_t id;
    } alone[] = {{"<CLS>", n}, {"<SEP>", sep}, {"<EOD>", n + 1}, {"<MASK>", n + 2}, {"<PAD>", n + 3}, {"<s>", 1},
                 {"</s>", 2}};
    for (size_t k = 0; k < sizeof alone / sizeof alone[0]; k++) {
        lt_token_buf got = {0};
        lt_tokenizer_encode(t, alone[k].text, strlen(alone[k].text), &got, err, sizeof err);
        TAP_CHECK(got.n == 1 && got.ids[0] == alone[k].id, "%s alone is id %d", alone[k].text, (int)alone[k].id);
        lt_token_buf_free(&got);
    }

    /* the text between special pieces is the model's encoding of it; the earliest special first */
    const char *text = "the caf\xc3\xa9<EOD>more <<SEP></s>words<EOD";
    lt_token_buf got = {0}, want = {0};
    lt_tokenizer_encode(t, text, strlen(text), &got, err, sizeof err);
    model_ids(m, "the caf\xc3\xa9", &want);
    lt_token_buf_push(&want, n + 1);
    model_ids(m, "more <", &want);
    lt_token_buf_push(&want, sep);
    lt_token_buf_push(&want, 2);
    model_ids(m, "words<EOD", &want);
    TAP_CHECK(same(&got, &want), "encode cuts at each special piece and encodes the rest with the model");

    /* decode: the model's text of each run, then " piece " for each special id */
    char *dec, *run;
    size_t dn, rn;
    int32_t ids[] = {want.ids[0], want.ids[1], n + 1, n + 1, 1, want.ids[0]};
    lt_spm_decode(m, ids, 2, &run, &rn, err, sizeof err);
    char expect[512];
    snprintf(expect, sizeof expect, "%s <EOD>  <EOD>  <s> ", run);
    free(run);
    lt_spm_decode(m, ids + 5, 1, &run, &rn, err, sizeof err);
    strncat(expect, run, sizeof expect - strlen(expect) - 1);
    free(run);
    int ok = lt_tokenizer_decode(t, ids, 6, &dec, &dn, err, sizeof err) == 0 && strcmp(dec, expect) == 0;
    TAP_CHECK(ok, "decode as Megatron's detokenize: '%s'", ok ? dec : err);
    free(dec);
    TAP_CHECK(lt_tokenizer_decode(t, (int32_t[]){3, n + 4}, 2, &dec, &dn, err, sizeof err) != 0 &&
                  strstr(err, "(position 2) is not in the vocabulary"),
              "an id past the vocabulary is refused: %s", err);
    lt_tokenizer_free(t);

    /* GPTSentencePieceTokenizer: the model alone; Llama2Tokenizer: bos first */
    spec.type = "GPTSentencePieceTokenizer";
    t = lt_tokenizer_open(&spec, err, sizeof err);
    got.n = 0;
    if (t) lt_tokenizer_encode(t, "<s>a", 4, &got, err, sizeof err);
    want.n = 0;
    model_ids(m, "<s>a", &want);
    TAP_CHECK(t && t->vocab_size == n && t->eod == 2 && same(&got, &want),
              "GPTSentencePieceTokenizer: vocab = pieces, eod = eos, <s> is text");
    lt_tokenizer_free(t);
    spec.type = "Llama2Tokenizer";
    t = lt_tokenizer_open(&spec, err, sizeof err);
    got.n = 0;
    if (t) lt_tokenizer_encode(t, "the", 3, &got, err, sizeof err);
    TAP_CHECK(t && t->eod == 2 && got.n >= 2 && got.ids[0] == 1, "Llama2Tokenizer: bos first, eod = eos");
    lt_tokenizer_free(t);

    /* errors name the file and say what to give */
    spec = (lt_tokenizer_spec){.type = "SentencePieceTokenizer", .model = tmp_path("none.model")};
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "none.model: cannot open"),
              "a missing model is named: %s", err);
    spec.model = tmp_path("train.txt");
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "train.txt: not a SentencePiece model"),
              "a text file is not a model: %s", err);
    spec.model = tmp_root;
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "is a folder"), "a folder is refused: %s", err);
    spec.model = NULL;
    TAP_CHECK(!lt_tokenizer_open(&spec, err, sizeof err) && strstr(err, "needs a tokenizer model"),
              "no model: %s", err);
    lt_token_buf_free(&got);
    lt_token_buf_free(&want);
    lt_spm_free(m);
    return tap_done();
}

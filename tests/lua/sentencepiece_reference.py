#!/usr/bin/env python3
"""Independent reference for the SentencePiece tokenizers in tests/lua/tokenizer_spec.lua.

    sentencepiece_reference.py DIR

Needs Debian's python3-sentencepiece (the same library luatron links, run here through its Python
binding; nothing of luatron is called). Generates a small text with accented, Cyrillic, Greek, CJK and
emoji words, trains three SentencePiece models on it with the Python trainer:

    DIR/bpe.model      BPE, unk 0, bos 1 <s>, eos 2 </s>, pad 3 <pad>
    DIR/unigram.model  unigram, no pad (pad_id -1): Megatron appends <PAD>
    DIR/custom.model   BPE with byte fallback, user-defined <EOD> and <SEP>, control <MASK>, pad 1 "<p",
                       bos 2 "<p>" (a prefix of each other: the tie rule decides), no eos (Megatron
                       appends <EOS>)

and writes DIR/expected.json with, per model, what Megatron's tokenizers (megatron/training/tokenizer/
tokenizer.py, restated below from their documented behaviour) give: vocab_size, eod, the special tokens,
the ids of every text, detokenize of those ids and of hand-made id lists; and the same for
GPTSentencePieceTokenizer and Llama2Tokenizer where the model has the eos (and bos) they need.
"""
import json
import random
import sys

import sentencepiece as spm

out = sys.argv[1]


class MegatronSentencePiece:
    """Megatron's _SentencePieceTokenizer with vocab_extra_ids = 0."""

    def __init__(self, model_file):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab = {}
        for i in range(len(self.sp)):
            self.vocab[self.sp.id_to_piece(i)] = i
        self.special = {}  # piece -> id, in the order added (a piece added again keeps its place)
        self.inv_special = {}

        def add(piece):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.vocab)
            self.special[piece] = self.vocab[piece]
            self.inv_special[self.vocab[piece]] = piece

        for piece in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(piece)
        for model_id, fallback in ((self.sp.pad_id(), "<PAD>"), (self.sp.bos_id(), "<BOS>"),
                                   (self.sp.eos_id(), "<EOS>")):
            try:
                piece = self.sp.id_to_piece(model_id)
            except IndexError:
                piece = fallback
            add(piece)
        self.vocab_size = len(self.vocab)
        self.eod = self.vocab["<EOD>"]

    def tokenize(self, text):
        ids, idx = [], 0
        while True:
            found = {}
            for piece in self.special:
                at = text.find(piece, idx)
                if at >= 0:
                    found[piece] = at
            if not found:
                break
            piece = min(found, key=found.get)  # the first piece at the lowest position
            ids += self.sp.encode_as_ids(text[idx:found[piece]])
            ids.append(self.special[piece])
            idx = found[piece] + len(piece)
        return ids + self.sp.encode_as_ids(text[idx:])

    def detokenize(self, ids):
        text, last = "", 0
        for i, t in enumerate(ids):
            if t in self.inv_special:
                text += self.sp.decode_ids(ids[last:i]) + " " + self.inv_special[t] + " "
                last = i + 1
        return text + self.sp.decode_ids(ids[last:])


rng = random.Random(15)
syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "po", "de", "an", "or", "el", "is", "um", "ba"]
words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
words += ["caf\u00e9", "na\u00efve", "\u00fcber", "stra\u00dfe", "\u00e9t\u00e9", "ma\u00f1ana", "\u0161kola"] * 6
words += ["\u043f\u0440\u0438\u0432\u0435\u0442", "\u043c\u0438\u0440", "\u03ba\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1",
          "\u4e2d\u6587", "\u65e5\u672c\u8a9e", "\u6570\u636e", "\ud55c\uad6d\uc5b4", "\U0001F600", "\U0001F389"] * 4
words += ["the", "of", "and", "to", "in", "is", "it", "that", "was", "for"] * 30
weights = [1.0 / (i % 97 + 1) for i in range(len(words))]
lines = []
for _ in range(1500):
    ws = rng.choices(words, weights, k=rng.randint(4, 18))
    ws[0] = ws[0].capitalize()
    lines.append(" ".join(ws) + rng.choice([".", "!", "?", ",", ";", ""]) + (" %d" % rng.randint(0, 999)
                                                                               if rng.random() < 0.2 else ""))
with open(out + "/train.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")

common = dict(input=out + "/train.txt", character_coverage=1.0, minloglevel=2, num_threads=1)
spm.SentencePieceTrainer.train(model_prefix=out + "/bpe", model_type="bpe", vocab_size=300, unk_id=0, bos_id=1,
                               eos_id=2, pad_id=3, **common)
spm.SentencePieceTrainer.train(model_prefix=out + "/unigram", model_type="unigram", vocab_size=280, **common)
spm.SentencePieceTrainer.train(model_prefix=out + "/custom", model_type="bpe", vocab_size=420, byte_fallback=True,
                               user_defined_symbols=["<EOD>", "<SEP>"], control_symbols=["<MASK>"], unk_id=0,
                               pad_id=1, pad_piece="<p", bos_id=2, bos_piece="<p>", eos_id=-1, **common)

texts = lines[:40] + [
    "", " ", "  leading and trailing  ", "tab\there\nnew line\n\nand \u00e9t\u00e9",
    "unseen: \u03a9\u2248\u00e7\u221a \u0e44\u0e17\u0e22 \u2603 \U0001F680 \u0628\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "<EOD>", "a<EOD>b", "<EOD><EOD>", "<<EOD>>", "<EO<EOD>D>", "<EOD", "EOD>", "the <EOD> end <EOD>",
    "<s>", "</s>", "<s></s>", "</s><s>", "x</s>y<s>z", "<s</s>>", "caf\u00e9<s>\u4e2d\u6587</s>",
    "<pad>", "<PAD>", "<pad><PAD>", "<CLS><SEP><MASK>", "<CLS>text<SEP>more<MASK>", "<BOS> and <EOS>",
    "<p>", "<p", "<p<p>>", "a<p>b<pc", "<unk>", "<extra_id_0>", "<SEP><EOD><s></s><pad><p>",
    "\u043f\u0440\u0438\u0432\u0435\u0442<EOD>\u043c\u0438\u0440</s>\U0001F600",
]

expected = {"texts": texts}
for name in ("bpe", "unigram", "custom"):
    model = "%s/%s.model" % (out, name)
    tok = MegatronSentencePiece(model)
    ids = [tok.tokenize(t) for t in texts]
    n = len(tok.sp)
    specials = list(tok.special.values())
    extra = [specials, specials[::-1] + [5, 6], [7] + specials + [8, 9], [tok.eod, 10, 11, tok.eod], [12, n - 1]]
    entry = {
        "model": model, "pieces": n, "vocab_size": tok.vocab_size, "eod": tok.eod,
        "special": [[p, i] for p, i in tok.special.items()],
        "ids": ids, "detokenized": [tok.detokenize(x) for x in ids],
        "extra_ids": extra, "extra_detokenized": [tok.detokenize(x) for x in extra],
        "pad_id": tok.sp.pad_id(), "bos_id": tok.sp.bos_id(), "eos_id": tok.sp.eos_id(),
    }
    # _GPTSentencePieceTokenizer: the model alone, eod = eos_id; _Llama2Tokenizer: bos first, eod = eos_id.
    sp = tok.sp
    if sp.eos_id() >= 0:
        entry["gpt"] = {"vocab_size": len(sp), "eod": sp.eos_id(), "ids": [sp.encode_as_ids(t) for t in texts],
                        "detokenized": [sp.decode_ids(sp.encode_as_ids(t)) for t in texts]}
        if sp.bos_id() >= 0:
            entry["llama2"] = {"vocab_size": sp.vocab_size(), "eod": sp.eos_id(),
                               "ids": [[sp.bos_id()] + sp.encode(t) for t in texts],
                               "detokenized": [sp.decode_ids([sp.bos_id()] + sp.encode(t)) for t in texts]}
    expected[name] = entry

with open(out + "/expected.json", "w", encoding="utf-8") as f:
    json.dump(expected, f, ensure_ascii=False)

#!/usr/bin/env python3
"""Independent reference for tests/lua/tokenizer_spec.lua (standard library only, nothing downloaded).

    tokenizer_reference.py DIR

Learns a small GPT-2 style byte-level BPE from a training text (all 256 byte tokens, <|endoftext|>,
60 merges), writes DIR/encoder.json, DIR/vocab.bpe, DIR/tokenizer.json (same vocabulary, merges as
"a b" strings, plus an added token "<|sep|>") and DIR/tokenizer_pairs.json (merges as [a, b] pairs),
then encodes the test texts with a plain implementation of GPT-2's algorithm: the pre-tokenizer is
GPT-2's regex run by Python's `re` with \\p{L}, \\p{N} and \\s spelled as character classes built from
`unicodedata` (not luatron's table or its hand-written matcher), and BPE is encoder.py's loop.
DIR/tokenizer_llama3.json and DIR/tokenizer_qwen2.json hold the same vocabulary with Llama-3's and
Qwen2's Split pre-tokenizer (and ignore_merges, as Llama-3 has), encoded here with `re` on their
patterns. DIR/tokenizer_llama3_bos.json is Llama-3's whole pipeline: that Split, an added
<|begin_of_text|> and a Sequence post-processor [ByteLevel, TemplateProcessing] that puts it before
the text; DIR/tokenizer_qwen2_nfc.json (and _nfc_seq.json, the normalizer inside a Sequence) is
Qwen2's: its Split with the NFC normalizer, done here by unicodedata.normalize("NFC", ...), and a
normalized added token whose content NFC changes. Added tokens are matched as Hugging Face's added
vocabulary does: the ones not normalized in the original text first, then in each piece between them,
once normalized, the normalized ones (as their normalized content). Writes DIR/expected.json:
{"texts": [...], "gpt2": [[ids]], "hf": [[ids]], "llama3": [[ids]], "qwen2": [[ids]], "llama3_bos":
[[ids]], "qwen2_nfc": [[ids]], "qwen2_nfc_decoded": [decode of those ids], "nfc_sweep": [[text, NFC of
it]], "vocab_size": N, "eod": id, "sep": id, ...}.
"""
import json
import random
import re
import sys
import unicodedata

out = sys.argv[1]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()


def char_class(pred):
    """A regex character class of every code point for which pred holds, as ranges."""
    parts, start = [], None
    for cp in range(0x110001):
        ok = cp < 0x110000 and pred(cp)
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            a, b = start, cp - 1
            parts.append(re.escape(chr(a)) if a == b else "%s-%s" % (re.escape(chr(a)), re.escape(chr(b))))
            start = None
    return "".join(parts)


L = char_class(lambda c: unicodedata.category(chr(c))[0] == "L")
N = char_class(lambda c: unicodedata.category(chr(c))[0] == "N")
# Unicode White_Space (what \s means in the regex engines GPT-2 and Hugging Face use)
WS = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680] + list(range(0x2000, 0x200B)) + [
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
S = "".join(re.escape(chr(c)) for c in WS)
PAT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[%s]+| ?[%s]+| ?[^%s%s%s]+|[%s]+(?![^%s])|[%s]+"
                 % (L, N, S, L, N, S, S, S))

def llama3_re(digits):
    return re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n%s%s]?[%s]+|[%s]%s| ?[^%s%s%s]+[\r\n]*|[%s]*[\r\n]+|"
                      r"[%s]+(?![^%s])|[%s]+" % (L, N, L, N, digits, S, L, N, S, S, S, S))


LLAMA3, QWEN2 = llama3_re("{1,3}"), llama3_re("")

TRAIN = ("the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs! "
         "it's the fox's den, we're here, they've gone, I'm fine, we'll see, he'd go. "
         "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00e9t\u00e9 \u00fcber stra\u00dfe "
         "\u4e2d\u6587\u5b57\u7b26 \u4e2d\u6587 \u65e5\u672c\u8a9e "
         "12345 2024 3.14159 100% \u00bd \u0663\u0664 "
         "\U0001F600 \U0001F600\U0001F389 \n\n  \t  spaces   and\nnewlines\r\n") * 3

# Learn merges over the pre-tokenized training words (byte-level symbols).
words = {}
for w in PAT.findall(TRAIN):
    key = tuple(B2U[b] for b in w.encode("utf-8"))
    words[key] = words.get(key, 0) + 1
vocab = [B2U[b] for b in range(256)]
merges = []
for _ in range(60):
    counts = {}
    for w, c in words.items():
        for a, b in zip(w, w[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + c
    if not counts:
        break
    best = max(sorted(counts), key=lambda p: counts[p])
    merges.append(best)
    vocab.append(best[0] + best[1])
    new = {}
    for w, c in words.items():
        r, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                r.append(w[i] + w[i + 1])
                i += 2
            else:
                r.append(w[i])
                i += 1
        new[tuple(r)] = new.get(tuple(r), 0) + c
    words = new
vocab.append("<|endoftext|>")
encoder = {t: i for i, t in enumerate(vocab)}
ranks = {m: i for i, m in enumerate(merges)}


def bpe(word):
    word = list(word)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), a, b) for a, b in zip(word, word[1:])]
        r, a, b = min(pairs)
        if r == 1 << 30:
            break
        new, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                new.append(a + b)
                i += 2
            else:
                new.append(word[i])
                i += 1
        word = new
    return word


def encode(text, pat=PAT, ignore_merges=False):
    ids = []
    for w in pat.findall(text):
        u = "".join(B2U[b] for b in w.encode("utf-8"))
        ids += [encoder[u]] if ignore_merges and u in encoder else [encoder[t] for t in bpe(u)]
    return ids


SEP = "<|sep|>"
sep_id = len(vocab)


BOS = "<|begin_of_text|>"
bos_id = sep_id + 1
CAFE = "<|cafe\u0301|>"  # decomposed: under NFC it is matched as "<|caf\u00e9|>"
cafe_id = sep_id + 1
# tokenizer.json's added_tokens: (content, id, normalized)
ADDED = [("<|endoftext|>", encoder["<|endoftext|>"], True), (SEP, sep_id, False)]
ADDED_BOS = ADDED + [(BOS, bos_id, False)]
ADDED_NFC = ADDED + [(CAFE, cafe_id, True)]


def nfc(s):
    return unicodedata.normalize("NFC", s)


def split_added(text, tokens):
    """text cut at the tokens {content: id} (leftmost, then longest): a list of str and [id]."""
    if not tokens:
        return [text]
    r, at = [], 0
    for m in re.finditer("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)), text):
        r += [text[at:m.start()], [tokens[m.group(0)]]]
        at = m.end()
    return r + [text[at:]]


def encode_hf(text, pat=PAT, ignore_merges=False, added=ADDED, normalize=None, template=((), ())):
    """Hugging Face's order: the added tokens that are not normalized are cut out of the text, each piece
    between them is normalized and the normalized added tokens (their content normalized) cut out of it,
    the rest pre-tokenized and BPE-encoded; then the template's ids around the whole."""
    norm = normalize or (lambda s: s)
    ids = list(template[0])
    for piece in split_added(text, {c: i for c, i, n in added if not n}):
        if isinstance(piece, list):
            ids += piece
            continue
        for p in split_added(norm(piece), {norm(c): i for c, i, n in added if n}):
            ids += p if isinstance(p, list) else encode(p, pat, ignore_merges)
    return ids + list(template[1])


def decode_hf(ids, added):
    """The ByteLevel decoder's bytes for model tokens, an added token's content for its id."""
    content = {i: c.encode("utf-8") for c, i, _ in added}
    raw = {i: bytes(U2B[ch] for ch in t) for t, i in encoder.items()}
    return b"".join(content[i] if i in content else raw[i] for i in ids).decode("utf-8")


U2B = {u: b for b, u in B2U.items()}


TEXTS = [
    "the quick brown fox",
    "Hello, world! It's the fox's den; we're here, THEY'VE gone, I'm fine, we'll see, he'd go.",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c9t\u00e9 \u00fcber Stra\u00dfe \u0391\u03b8\u03ae\u03bd\u03b1",
    "\u4e2d\u6587\u5b57\u7b26\u4e32 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F389 family \U0001F468\u200d\U0001F469\u200d\U0001F467 flag \U0001F1EB\U0001F1F7",
    "digits 12345 and 3.14159, 100%, \u00bd \u2167 \u0663\u0664\u0665 \u00b2",
    "runs   of    spaces\n\n\nand\tnewlines\r\n  \n end  ",
    "   leading spaces and trailing\n",
    "'s 't 're 've 'm 'll 'd '''x ''",
    "\u3000ideographic\u3000space \u00a0nbsp\u2009thin \x85nel",
    "symbols: <<>> {[()]} #$%^&* -- __ ~~ \u00a9\u00ae\u2122 \u20ac\u00a3\u00a5",
    "mixed\u0301 combining marks e\u0301 a\u0308",
    "<|endoftext|> is plain text for GPT-2 <|sep|> but <|sep|> is an added token for tokenizer.json",
    "",
    " ",
    "\n",
    "x" * 300 + " " + "ab" * 200,
    "IT'S WE'RE THEY'VE I'M WE'LL HE'D it's (parens) \"quoted\"\n\n  indented\r\n\ttab 1234567 \u0663\u0664\u0665\u0666",
    "the fox! the dog?\n\n\nthe end  \n",
]

# Random texts over the characters the pre-tokenizers treat differently (seeded: the same every run).
POOL = (list("aZ e'sStTrRvVmMlLdD09 .,!?-\n\t\r") + [" ", " ", "  ", "'", "'s", "'LL", "\n\n", " \n"] +
        list("\u00e9\u00df\u0301\u4e2d\u6587\u3000\u00a0\u0085\u2009\u0663\u00b2\u00bd\u2167\u00ad\u200d") +
        ["\U0001F600", "\U0001F1EB", "\x1c", "\x00", "<|sep|>", "<|endoftext|>", "caf\u00e9", "the fox"])
rng = random.Random(15)
TEXTS += ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(150)]

# Texts that NFC changes: singletons, exclusions, marks out of canonical order, Hangul jamo, Vietnamese
# decomposed, the template's and the NFC fixture's added tokens spelled in the text.
VIET = "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u: ng\u01b0\u1eddi, \u0111\u01b0\u1ee3c, nh\u1eefng, ph\u1edf"
TEXTS += [
    "\u212b \u2126 \u212a \u1fef \u0340\u0341 \u0374 \u037e \u0387 A\u030a \u00c5 Angstr\u00f6m",
    "a\u0301\u0327 a\u0327\u0301 a\u0316\u0301\u0300 q\u0307\u0323 e\u0323\u0302 e\u0302\u0323 \u1ec7",
    unicodedata.normalize("NFD", VIET) + " " + VIET,
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af \uac00\u11a8 \u1100\u1161 \u11a8\u1100",
    "\u0958\u0959 \u0929 \u0928\u093c \u2adc \ufb1d \u0344 \u0f73 \u0f71\u0f72 \u1f71 \u0b47\u0b3e \u0dd9\u0dcf",
    "\u03b1\u0313\u0301\u0345 \u03c9\u0345\u0342 \u0399\u0308\u0301 \u1e9b\u0323 \u00e9\u0327 \u0227\u0304",
    "<|begin_of_text|>" + " x " + BOS + "\u0301 <|cafe\u0301|> <|caf\u00e9|> <|cafe|>\u0301 " + SEP + "\u0301",
    "\u0301 leading mark, then \u0338= \u2260 <\u0338 \u226e a" + "\u0301\u0316" * 40 + "b\u0345" + "\u0300" * 33,
]
NFC_POOL = (list("aeiouAEOUnNcCsSzZ <>=|") + ["caf", "\n", "  "] +
            list("\u0300\u0301\u0302\u0306\u0308\u030a\u0316\u0323\u0327\u0328\u031b\u0338\u0345\u0313\u0342") +
            list("\u00e9\u00e0\u1ec7\u01a1\u00c5\u0229\u212b\u2126\u0958\u0344\u0f73\u1f71\u03b1\u03c9") +
            list("\u1100\u1112\u1161\u1173\u11a8\u11af\uac00\ud55c\u0928\u093c\u0b47\u0b3e\u0dd9\u0dcf\u4e2d") +
            [SEP, BOS, CAFE, "<|caf\u00e9|>", "<|endoftext|>"])
TEXTS += ["".join(rng.choice(NFC_POOL) for _ in range(rng.randint(1, 30))) for _ in range(250)]
assert sum(nfc(t) != t for t in TEXTS) > 150  # the NFC fixture's encodings differ from the plain ones


def sweep():
    """Every code point NFC may touch (a combining class, a canonical decomposition, or NFC changes
    it), each after "a" and before two marks, in texts of 400, with their NFC."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and (
        unicodedata.combining(chr(c)) or (unicodedata.decomposition(chr(c)) and
                                          not unicodedata.decomposition(chr(c)).startswith("<")) or
        nfc(chr(c)) != chr(c))]
    cps += list(range(0x1100, 0x1200)) + list(range(0xAC00, 0xAC00 + 11172, 97)) + [0xD7A3]
    parts = ["a%s\u0327\u0301" % chr(c) for c in cps]
    return [["".join(parts[i:i + 400]), nfc("".join(parts[i:i + 400]))] for i in range(0, len(parts), 400)]

with open(out + "/encoder.json", "w", encoding="utf-8") as f:
    json.dump(encoder, f, ensure_ascii=False)
with open(out + "/vocab.bpe", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join("%s %s\n" % m for m in merges))


def tokenizer_json(pairs):
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": len(vocab) - 1, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": True, "special": True},
            {"id": sep_id, "content": SEP, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": encoder,
                  "merges": [list(m) for m in merges] if pairs else ["%s %s" % m for m in merges]},
    }


def split_json(pattern):
    t = tokenizer_json(False)
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    t["model"]["ignore_merges"] = True
    return t


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
with open(out + "/tokenizer_llama3.json", "w", encoding="utf-8") as f:
    json.dump(split_json(LLAMA3_PATTERN), f, ensure_ascii=False)
with open(out + "/tokenizer_qwen2.json", "w", encoding="utf-8") as f:
    json.dump(split_json(LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")), f, ensure_ascii=False)


def added_json(content, id_, normalized):
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": True}


# Llama-3: the Split, <|begin_of_text|> added, a template putting it before the text (the pair template,
# which one text does not use, as Llama-3's: bos $A bos $B)
llama3_bos = split_json(LLAMA3_PATTERN)
llama3_bos["added_tokens"].append(added_json(BOS, bos_id, False))
llama3_bos["post_processor"] = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}]}
with open(out + "/tokenizer_llama3_bos.json", "w", encoding="utf-8") as f:
    json.dump(llama3_bos, f, ensure_ascii=False)
# Qwen2: the Split with the NFC normalizer (also inside a Sequence), a normalized added token
qwen2_nfc = split_json(LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"))
qwen2_nfc["added_tokens"].append(added_json(CAFE, cafe_id, True))
qwen2_nfc["normalizer"] = {"type": "NFC"}
with open(out + "/tokenizer_qwen2_nfc.json", "w", encoding="utf-8") as f:
    json.dump(qwen2_nfc, f, ensure_ascii=False)
qwen2_nfc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
with open(out + "/tokenizer_qwen2_nfc_seq.json", "w", encoding="utf-8") as f:
    json.dump(qwen2_nfc, f, ensure_ascii=False)
with open(out + "/tokenizer.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_json(False), f, ensure_ascii=False, indent=1)
with open(out + "/tokenizer_pairs.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_json(True), f, ensure_ascii=True)
qwen2_nfc_ids = [encode_hf(t, QWEN2, True, ADDED_NFC, nfc) for t in TEXTS]
with open(out + "/expected.json", "w", encoding="utf-8") as f:
    json.dump({"texts": TEXTS, "gpt2": [encode(t) for t in TEXTS], "hf": [encode_hf(t) for t in TEXTS],
               "llama3": [encode_hf(t, LLAMA3, True) for t in TEXTS], "qwen2": [encode_hf(t, QWEN2, True) for t in TEXTS],
               "llama3_bos": [encode_hf(t, LLAMA3, True, ADDED_BOS, None, ([bos_id], [])) for t in TEXTS],
               "qwen2_nfc": qwen2_nfc_ids, "qwen2_nfc_decoded": [decode_hf(ids, ADDED_NFC) for ids in qwen2_nfc_ids],
               "nfc_sweep": sweep(), "vocab_size": len(vocab), "hf_vocab_size": len(vocab) + 1,
               "eod": encoder["<|endoftext|>"], "sep": sep_id, "bos": bos_id, "cafe": cafe_id,
               "merges": len(merges)}, f)

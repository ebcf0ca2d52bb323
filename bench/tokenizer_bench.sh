#!/usr/bin/env bash
# `luatron preprocess` throughput with GPT2BPETokenizer on a generated corpus (default ~16 MB of JSONL:
# Zipf-distributed words from a 6000-word synthetic lexicon, with numbers, punctuation, accented and
# CJK words, emoji and newlines), against a GPT-2 style vocabulary learned from it here (all 256 bytes,
# MERGES merges, <|endoftext|>): nothing is downloaded. The byte-level tokenizer on the same corpus is
# the I/O floor. SentencePieceTokenizer runs a BPE SentencePiece model (SPM_VOCAB pieces, default 8000)
# that spm_train learns here from the same ~1 MB sample. Prints the figures and writes them to
# bench/results/tokenizer.txt.
# HuggingFaceTokenizer reads the same vocabulary from a tokenizer.json, without and with the NFC
# normalizer (the corpus is NFC already, as most text is: the row shows the quick check's cost).
#   bench/tokenizer_bench.sh [MB] [MERGES]     (defaults 16 and 2000; needs spm_train: Debian's sentencepiece)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mb=${1:-16}
merges=${2:-2000}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=${LUATRON_BIN:-bazel-bin/luatron}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python3 - "$out" "$mb" "$merges" <<'PY'
import collections, json, random, re, sys
out, mb, n_merges = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(1234)
letters = "abcdefghijklmnopqrstuvwxyz"
lex = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(5000)]
lex += ["caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "\u00fcber", "stra\u00dfe", "\u00e9t\u00e9"] * 20
lex += ["\u4e2d\u6587", "\u65e5\u672c\u8a9e", "\u6570\u636e", "\U0001F600", "\U0001F389"] * 20
lex += ["it's", "we're", "they've", "I'm", "we'll", "he'd"] * 30
weights = [1.0 / (i + 1) for i in range(len(lex))]
docs, size = [], 0
while size < mb * 1e6:
    words = rng.choices(lex, weights, k=rng.randint(50, 400))
    for i in range(0, len(words), 12):
        words[i] = words[i].capitalize() + rng.choice([",", ".", "!", "?", ";", ""])
        if rng.random() < 0.1: words[i] += " " + str(rng.randint(0, 99999))
        if rng.random() < 0.05: words[i] += "\n\n"
    text = " ".join(words)
    docs.append(text)
    size += len(text.encode())
with open(out + "/corpus.jsonl", "w") as f:
    for d in docs: f.write(json.dumps({"text": d}) + "\n")
# vocabulary: GPT-2's byte alphabet, merges learned on the words' frequencies
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs, k = bs[:], 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256 + k); k += 1
b2u = dict(zip(bs, map(chr, cs)))
sample, n = [], 0  # merges are learned on the first ~1 MB (the rest only costs time here)
for d in docs:
    sample.append(d); n += len(d)
    if n > 1e6: break
freq = collections.Counter(w for d in sample for w in re.findall(r" ?\w+| ?[^\s\w]+|\s+", d))
words = {tuple(b2u[c] for c in w.encode()): n for w, n in freq.items()}
vocab, merges = [b2u[b] for b in range(256)], []
pairs = collections.Counter()
for w, n in words.items():
    for p in zip(w, w[1:]): pairs[p] += n
for _ in range(n_merges):
    if not pairs: break
    best = max(pairs, key=pairs.get)
    merges.append(best); vocab.append(best[0] + best[1])
    new = {}
    for w, n in words.items():
        if best[0] not in w: new[w] = new.get(w, 0) + n; continue
        r, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and (w[i], w[i + 1]) == best: r.append(w[i] + w[i + 1]); i += 2
            else: r.append(w[i]); i += 1
        r = tuple(r)
        if r != w:
            for p in zip(w, w[1:]): pairs[p] -= n
            for p in zip(r, r[1:]): pairs[p] += n
        new[r] = new.get(r, 0) + n
    words = new
    pairs = +pairs
vocab.append("<|endoftext|>")
json.dump({t: i for i, t in enumerate(vocab)}, open(out + "/encoder.json", "w"), ensure_ascii=False)
with open(out + "/vocab.bpe", "w") as f: f.write("#version: 0.2\n" + "".join("%s %s\n" % m for m in merges))
with open(out + "/sample.txt", "w") as f: f.write("\n".join(sample) + "\n")
# the same vocabulary as a tokenizer.json (GPT-2's ByteLevel pre-tokenizer), without and with Qwen2's NFC
tj = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
      "added_tokens": [{"id": len(vocab) - 1, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}],
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
      "post_processor": None, "decoder": {"type": "ByteLevel"},
      "model": {"type": "BPE", "dropout": None, "vocab": {t: i for i, t in enumerate(vocab)},
                "merges": ["%s %s" % m for m in merges]}}
json.dump(tj, open(out + "/tokenizer.json", "w"), ensure_ascii=False)
tj["normalizer"] = {"type": "NFC"}
json.dump(tj, open(out + "/tokenizer_nfc.json", "w"), ensure_ascii=False)
PY
spm_vocab=${SPM_VOCAB:-8000}
spm_train --input="$out/sample.txt" --model_prefix="$out/spm" --model_type=bpe --vocab_size="$spm_vocab" \
  --character_coverage=1.0 --num_threads="$(nproc)" --minloglevel=2 >/dev/null 2>&1
bytes=$(stat -c %s "$out/corpus.jsonl")
timed() { # label, preprocess arguments...
  local label=$1 name=${1//[ -]/_}
  shift
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" preprocess --input "$out/corpus.jsonl" --output-prefix "$out/$name" "$@" >"$out/$name.log"
  t1=$(date +%s.%N)
  python3 - "$label" "$t0" "$t1" "$bytes" "$out/$name.log" <<'PY'
import re, sys
label, t0, t1, size, log = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tokens = int(re.search(r"(\d+) tokens", open(log).read()).group(1))
s = t1 - t0
print("| %s | %.2f | %d | %.0f | %.2f |" % (label, s, tokens, tokens / s, size / s / 1e6))
PY
}
merges_n=$(($(wc -l <"$out/vocab.bpe") - 1))
{
  echo "# luatron preprocess throughput ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo none))"
  echo
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) CPUs); one worker thread unless the row says --workers"
  echo "- corpus: $(python3 -c "print('%.1f' % ($bytes / 1e6))") MB of generated JSONL; GPT-2 style vocabulary of 256 bytes + $merges_n merges + <|endoftext|>"
  echo "- SentencePieceTokenizer: a BPE SentencePiece model of $spm_vocab pieces (spm_train on the same sample), Megatron's special tokens"
  echo "- command: bench/tokenizer_bench.sh $mb $merges (wall time of the whole command: read, tokenize, write .bin/.idx)"
  echo
  echo "| tokenizer | seconds | tokens | tokens/s | MB/s |"
  echo "|---|---:|---:|---:|---:|"
  timed GPT2BPETokenizer --tokenizer-type GPT2BPETokenizer --vocab-file "$out/encoder.json" --merge-file "$out/vocab.bpe" --append-eod
  timed HuggingFaceTokenizer --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$out/tokenizer.json" --append-eod
  timed HuggingFaceTokenizer+NFC --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$out/tokenizer_nfc.json" --append-eod
  timed SentencePieceTokenizer --tokenizer-type SentencePieceTokenizer --tokenizer-model "$out/spm.model" --append-eod
  timed "SentencePieceTokenizer --workers $(nproc)" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$out/spm.model" --append-eod --workers "$(nproc)"
  timed "GPT2BPETokenizer --workers $(nproc)" --tokenizer-type GPT2BPETokenizer --vocab-file "$out/encoder.json" --merge-file "$out/vocab.bpe" --append-eod --workers "$(nproc)"
  timed ByteLevel --tokenizer-type ByteLevel --append-eod
} | tee "$out/table.md"
mkdir -p bench/results
cp "$out/table.md" bench/results/tokenizer.txt
echo "wrote bench/results/tokenizer.txt"

#!/usr/bin/env bash
# Installs the system packages luatron builds with (Debian 12), once: a second run costs nothing.
set -euo pipefail
packages=(bazel-bootstrap lua5.4 liblua5.4-dev lua-busted libopenblas-dev libopenblas0-openmp libpmix-dev openmpi-bin procps pkg-config gcc g++ python3
  libsentencepiece-dev sentencepiece python3-sentencepiece)
# python3 (standard library only): tests/lua/tokenizer_reference.py, the tokenizer specs' independent reference.
# libsentencepiece-dev: the SentencePiece tokenizers (engine/data/sentencepiece_shim.cc links it);
# sentencepiece (spm_train, spm_encode) and python3-sentencepiece: the tests train models with them and
# tests/lua/sentencepiece_reference.py is the SentencePiece specs' reference.
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "luatron needs these Debian packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "luatron: installing ${missing[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Packs what a lent GPU machine needs to run tools/gpu_check.sh without Bazel or Debian packages:
# the command, the CUDA plugin, the GPU op test, and every shared library they load that a bare
# CUDA image lacks (Lua, OpenBLAS, PMIx and their dependencies). The GPU machine is x86-64 like
# this one. Output: .gpu/ (ignored by git; pass it as `carry` to the device tool).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# x86-64-v3 (AVX2), not the workspace's -march=native: the GPU machine's CPU may lack AVX-512.
bazel build --noshow_progress --copt=-march=x86-64-v3 //:luatron //:luatron_cuda.so //tests/cuda:ops_test \
  //tests/comm:nccl_test
out="$root/.gpu"
rm -rf "$out"
mkdir -p "$out/lib"
cp -L bazel-bin/luatron bazel-bin/luatron_cuda.so bazel-bin/tests/cuda/ops_test bazel-bin/tests/comm/nccl_test "$out/"
chmod u+w "$out"/*
# glibc, the C++ runtime and the CUDA/driver libraries come from the GPU machine itself.
for f in "$out/luatron" "$out/ops_test" "$out/nccl_test" "$out/luatron_cuda.so"; do
  ldd "$f" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -vE '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl)\.so' |
  while read -r lib; do cp -L "$lib" "$out/lib/"; done
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+local changes')" > "$out/commit.txt"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh "$out"

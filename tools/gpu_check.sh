#!/usr/bin/env bash
# The GPU checks in one run, for a lent machine (see tools/gpu_bundle.sh, which packs .gpu/ here):
#   1. every CUDA op against the CPU op (tests/cuda/ops_test),
#   2. the tiny recipe in fp32 on CPU and on GPU: the same losses over 20 steps,
#   3. the benchmarks of bench/gpu_bench.lua (124M, then 1.3B unless GPU_CHECK_QUICK=1).
# Logs go to $OUT (or ./gpu-out) so they come back; the exit code is the number of failed parts.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$root/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuBLAS from the CUDA toolkit, or from the Python wheels if the toolkit lacks it.
if [ ! -e /usr/local/cuda/lib64/libcublas.so.13 ]; then
  extra=$(dirname "$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1)" 2>/dev/null)
  [ -n "$extra" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$extra"
fi
export LUATRON_CUDA_PLUGIN="$root/.gpu/luatron_cuda.so"
bin="$root/.gpu/luatron"
failed=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

echo "== 1. ops: CUDA against CPU"
timeout 300 "$root/.gpu/ops_test" 2>&1 | tee "$out/ops_test.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

echo "== 2. tiny recipe, fp32, CPU vs CUDA, 20 steps"
tiny="run recipes/gpt_tiny.lua train.train_iters=20 train.eval_interval=1000 logger.log_interval=1 \
scheduler.lr_warmup_iters=0 model.hidden_dropout=0.1 model.attention_dropout=0.1"
rm -f "$out"/cpu.jsonl "$out"/cuda.jsonl
"$bin" $tiny logger.metrics_file="$out/cpu.jsonl" > "$out/cpu.log" 2>&1 || failed=$((failed + 1))
"$bin" $tiny model.device=cuda logger.metrics_file="$out/cuda.jsonl" > "$out/cuda.log" 2>&1 || failed=$((failed + 1))
tail -2 "$out/cuda.log"
python3 - "$out/cpu.jsonl" "$out/cuda.jsonl" <<'PY' || failed=$((failed + 1))
import json, sys
rows = [[json.loads(l) for l in open(p) if '"loss"' in l] for p in sys.argv[1:]]
a, b = rows
worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
print(f"{len(a)} vs {len(b)} steps; worst relative loss difference {worst:.3g} (tolerance 1e-3)")
sys.exit(0 if len(a) == len(b) == 20 and worst <= 1e-3 else 1)
PY

echo "== 3. benchmarks"
"$bin" run bench/gpu_bench.lua --shape 124m 2>&1 | tee "$out/bench_124m.log" || failed=$((failed + 1))
if [ -z "${GPU_CHECK_QUICK:-}" ]; then
  "$bin" run bench/gpu_bench.lua --shape 1.3b 2>&1 | tee "$out/bench_1p3b.log" || failed=$((failed + 1))
fi
echo "gpu_check: $failed part(s) failed"
exit "$failed"

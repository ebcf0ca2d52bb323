#!/usr/bin/env bash
# Tensor parallelism on the bench-small model (6 layers, hidden 384, 6 heads, seq 256, vocab 256;
# 4 microbatches of 2 per step): TP = 2 (`luatron launch -n 2`), with and without sequence
# parallelism, against TP = 1 on the same global batch. Prints, and appends to bench/results.md,
# the step time, rank 0's peak memory and activations per microbatch, and its tensor-parallel
# bytes per step beside the ring formula (luatron.tensor_parallel). On a 2-core machine TP = 2
# runs one OpenMP thread per rank where TP = 1 runs two, and its collectives go through shared
# memory: the step times show the overhead of the split and the collectives, not a speed-up.
#   bench/tp_bench.sh [steps]   (default 6; the first step is not counted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
steps=${1:-6}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=bazel-bin/luatron
out=$(mktemp -d)
model="model.num_layers=6 model.hidden_size=384 model.num_attention_heads=6 model.seq_length=256
  dataset.sequence_length=256 train.micro_batch_size=2 train.global_batch_size=8 train.train_iters=$steps
  train.eval_interval=100000 logger.log_interval=1 scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=0"
$bin run recipes/gpt_tiny.lua $model logger.metrics_file=$out/tp1.jsonl >$out/tp1.log 2>&1
$bin launch -n 2 recipes/gpt_tiny.lua $model model.tensor_model_parallel_size=2 \
  logger.metrics_file=$out/tp2.jsonl >$out/tp2.log 2>&1
$bin launch -n 2 recipes/gpt_tiny.lua $model model.tensor_model_parallel_size=2 model.sequence_parallel=true \
  logger.metrics_file=$out/tp2_sp.jsonl >$out/tp2_sp.log 2>&1
table=$(python3 - "$out" <<'PY'
import json, re, statistics, sys
out = sys.argv[1]
print("| layout | ms/step | peak MiB rank 0 | activations MiB / microbatch | TP MB/step rank 0 | ring formula MB |")
print("|---|---:|---:|---:|---:|---:|")
for name, label in (("tp1", "TP = 1"), ("tp2", "TP = 2"), ("tp2_sp", "TP = 2, SP")):
    recs = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if '"loss"' in l][1:]
    ms = statistics.median(r["step_time_ms"] for r in recs)
    peak = max(r["peak_memory_mib"] for r in recs)
    act = re.search(r"activations per microbatch on this rank: ([\d.]+) MiB", open(f"{out}/{name}.log").read())
    tp = statistics.median(r.get("tp_bytes_per_step", 0) for r in recs) / 1e6
    exp = recs[0].get("tp_expected_bytes", 0) / 1e6
    print(f"| {label} | {ms:.1f} | {peak:.1f} | {act.group(1) if act else '-'} | {tp:.3f} | {exp:.3f} |")
PY
)
record_results "bench/tp_bench.sh $steps" "$table" \
  "- bench-small, 4 microbatches of 2 x 256 tokens per step, fp32 on the CPU; TP = 2 over \`luatron launch -n 2\`" \
  "  (shm collectives, one thread per rank): overhead, not speed-up, on 2 cores. Medians over steps 2..$steps."
rm -rf "$out"

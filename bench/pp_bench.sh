#!/usr/bin/env bash
# Pipeline parallelism on the bench-small model (6 layers, hidden 384, 6 heads, seq 256, vocab 256;
# microbatches of 2): PP = 2 (1F1B, `luatron launch -n 2`) with M = 4, 8 and 16 microbatches per
# step, against PP = 1 on the same global batch. Prints, and appends to bench/results.md, the
# measured bubble (idle time over compute time, mean over stages and steps) beside Megatron's
# formula (PP - 1) / M, and rank 0's point-to-point bytes per step beside the arithmetic
# (M activations of [256, 2, 384] fp32 sent forward); and rank 0's peak memory at M = 16 under 1F1B
# and under GPipe (recipes/custom_schedule.lua). On a 2-core machine PP = 2 runs one OpenMP
# thread per rank where PP = 1 runs two, so the step times show the schedule, not a speed-up.
#   bench/pp_bench.sh [steps]   (default 6; the first step is not counted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
steps=${1:-6}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=bazel-bin/luatron
out=$(mktemp -d)
model="model.num_layers=6 model.hidden_size=384 model.num_attention_heads=6 model.seq_length=256
  dataset.sequence_length=256 train.micro_batch_size=2 train.train_iters=$steps train.eval_interval=100000
  logger.log_interval=1 scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=0"
for m in 4 8 16; do
  gbs=$((2 * m))
  $bin run recipes/gpt_tiny.lua $model train.global_batch_size=$gbs logger.metrics_file=$out/pp1_m$m.jsonl \
    >$out/pp1_m$m.log 2>&1
  $bin launch -n 2 recipes/gpt_tiny.lua $model train.global_batch_size=$gbs model.pipeline_model_parallel_size=2 \
    logger.metrics_file=$out/pp2_m$m.jsonl >$out/pp2_m$m.log 2>&1
done
# the same model at M = 16 under GPipe (the recipe's own schedule) and 1F1B (the recipe with it swapped)
sed 's/{ schedule = gpipe }/{ schedule = "1f1b" }/' recipes/custom_schedule.lua > $out/one_f_one_b.lua
for s in gpipe 1f1b; do
  recipe=recipes/custom_schedule.lua
  [ $s = 1f1b ] && recipe=$out/one_f_one_b.lua
  $bin launch -n 2 $recipe $model train.global_batch_size=32 logger.metrics_file=$out/$s.jsonl >$out/$s.log 2>&1
done
table=$(python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
print("| M | PP=1 ms/step | PP=2 ms/step | bubble measured | (PP-1)/M | p2p MB/step rank 0 | arithmetic MB |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for m in (4, 8, 16):
    def recs(name):
        return [json.loads(l) for l in open(f"{out}/{name}_m{m}.jsonl") if '"loss"' in l][1:]
    one, two = recs("pp1"), recs("pp2")
    ms1 = statistics.median(r["step_time_ms"] for r in one)
    ms2 = statistics.median(r["step_time_ms"] for r in two)
    bubble = statistics.median(r["pipeline_bubble"] for r in two)
    p2p = statistics.median(r["p2p_bytes_per_step"] for r in two) / 1e6
    exp = two[0]["p2p_expected_bytes"] / 1e6
    print(f"| {m} | {ms1:.1f} | {ms2:.1f} | {bubble:.3f} | {two[0]['pipeline_bubble_formula']:.3f} | {p2p:.3f} | {exp:.3f} |")
peak = {s: max(json.loads(l)["peak_memory_mib"] for l in open(f"{out}/{s}.jsonl") if '"loss"' in l)
        for s in ("1f1b", "gpipe")}
print()
print(f"Rank 0's peak memory at M = 16 (at most 2 microbatches in flight under 1F1B, 16 under GPipe): "
      f"1F1B {peak['1f1b']:.1f} MiB, GPipe {peak['gpipe']:.1f} MiB.")
PY
)
record_results "bench/pp_bench.sh $steps" "$table" \
  "- bench-small, microbatches of 2 x 256 tokens; PP = 2 is 1F1B over \`luatron launch -n 2\`; bubble = (step time -" \
  "  compute time) / compute time per stage, median over steps 2..$steps; p2p = bytes rank 0 sent per step"
rm -rf "$out"

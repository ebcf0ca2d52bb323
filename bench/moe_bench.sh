#!/usr/bin/env bash
# Mixture of experts: a GPT of 2 layers, hidden 256, 8 experts (top-2, moe_ffn_hidden_size 512, aux
# loss), sequence 256, global batch 16 in microbatches of 4, on one rank (EP = 1: every expert here)
# (also through the grouped GEMMs, moe_grouped_gemm) and on two (`luatron launch -n 2`, EP = 2: four
# experts each) with each token dispatcher. Prints, and
# appends to bench/results.md, tokens/s, ms/step, rank 0's peak memory, its dispatch traffic per MoE
# layer and microbatch beside the arithmetic (luatron.expert_parallel) and the share of the step time
# spent in the dispatcher's exchanges and the row permutes around them. On a 2-core machine the one
# rank runs two threads and each of the two ranks one: the totals compare the same cores.
#   bench/moe_bench.sh [steps]   (default 6; the first step is not counted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
steps=${1:-6}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=bazel-bin/luatron
out=$(mktemp -d)
model="recipes/gpt_tiny.lua train.train_iters=$steps train.global_batch_size=16 train.micro_batch_size=4
  model.num_layers=2 model.hidden_size=256 model.num_attention_heads=4 model.seq_length=256
  dataset.sequence_length=256 train.eval_iters=0 logger.log_interval=1 model.num_moe_experts=8
  model.moe_router_topk=2 model.moe_ffn_hidden_size=512 model.moe_aux_loss_coeff=0.01"
# shellcheck disable=SC2086
$bin run $model logger.metrics_file=$out/ep1.jsonl >$out/ep1.log 2>&1
# shellcheck disable=SC2086
$bin run $model model.moe_grouped_gemm=true logger.metrics_file=$out/ep1_grouped.jsonl >$out/ep1_grouped.log 2>&1
for d in allgather alltoall flex; do
  # shellcheck disable=SC2086
  $bin launch -n 2 $model model.expert_model_parallel_size=2 model.moe_token_dispatcher_type=$d \
    logger.metrics_file=$out/ep2_$d.jsonl >$out/ep2_$d.log 2>&1
done
table=$(python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
print("| layout | tokens/s | ms/step | peak MiB rank 0 | dispatch MB / layer and microbatch | arithmetic MB | time in dispatch |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, label in (("ep1", "EP = 1 (one rank, 8 experts)"), ("ep1_grouped", "EP = 1, moe_grouped_gemm"),
                    ("ep2_allgather", "EP = 2, allgather"),
                    ("ep2_alltoall", "EP = 2, alltoall"), ("ep2_flex", "EP = 2, flex")):
    recs = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if '"loss"' in l]
    timed = recs[1:] or recs
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    ms = statistics.median(r["step_time_ms"] for r in timed)
    peak = max(r["peak_memory_mib"] for r in recs)
    forwards = 2 * 4 / (2 if name.startswith("ep2") else 1)  # MoE layers x microbatches on a rank per step
    if name.startswith("ep1"):
        print(f"| {label} | {tps:.0f} | {ms:.0f} | {peak:.1f} | - | - | - |")
        continue
    mb = statistics.median(r["moe_dispatch_bytes"] for r in timed) / forwards / 1e6
    exp = statistics.median(r["moe_dispatch_expected_bytes"] for r in timed) / forwards / 1e6
    share = statistics.median(r["moe_dispatch_time_fraction"] for r in timed)
    print(f"| {label} | {tps:.0f} | {ms:.0f} | {peak:.1f} | {mb:.3f} | {exp:.3f} | {100 * share:.1f}% |")
PY
)
record_results "bench/moe_bench.sh $steps" "$table" \
  "- 2 layers, hidden 256, 8 experts top-2 (moe_ffn_hidden_size 512), sequence 256, 16 sequences per step in" \
  "  microbatches of 4, fp32 on the CPU; EP = 2 over \`luatron launch -n 2\` on the same cores (one thread per rank)."
rm -rf "$out"

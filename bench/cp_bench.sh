#!/usr/bin/env bash
# Context parallelism on recipes/long_context.lua (2 layers, hidden 128, 4 heads, sequence 8192, one
# sequence per step): CP = 4 (`luatron launch -n 4`, ring attention) against the whole sequence on one
# rank. Prints, and appends to bench/results.md, the step time, rank 0's peak memory and activations
# per microbatch, and the ring's bytes per step beside the arithmetic with the share of its time
# hidden behind the blocks' attention. On a 2-core machine 4 ranks share 2 cores (one thread each, where
# one rank runs two): the step times show the split's cost, not a speed-up; the memory per rank is the
# point.
#   bench/cp_bench.sh [steps]   (default 3; the first step is not counted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
steps=${1:-3}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=bazel-bin/luatron
out=$(mktemp -d)
$bin run recipes/long_context.lua model.context_parallel_size=1 train.train_iters=$steps \
  logger.metrics_file=$out/cp1.jsonl >$out/cp1.log 2>&1
$bin launch -n 4 recipes/long_context.lua train.train_iters=$steps logger.metrics_file=$out/cp4.jsonl >$out/cp4.log 2>&1
table=$(python3 - "$out" <<'PY'
import json, re, statistics, sys
out = sys.argv[1]
print("| layout | ms/step | peak MiB rank 0 | activations MiB / microbatch | ring MB/step rank 0 | arithmetic MB | hidden |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, label in (("cp1", "one rank, sequence 8192"), ("cp4", "CP = 4 (2048 positions per rank)")):
    recs = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if '"loss"' in l]
    timed = recs[1:] or recs
    ms = statistics.median(r["step_time_ms"] for r in timed)
    peak = max(r["peak_memory_mib"] for r in recs)
    act = re.search(r"activations per microbatch on this rank: ([\d.]+) MiB", open(f"{out}/{name}.log").read())
    ring = statistics.median(r.get("cp_bytes_per_step", 0) for r in timed) / 1e6
    exp = timed[0].get("cp_expected_bytes", 0) / 1e6
    hidden = statistics.median(r.get("cp_hidden_fraction", 0) or 0 for r in timed)
    print(f"| {label} | {ms:.0f} | {peak:.1f} | {act.group(1) if act else '-'} | {ring:.3f} | {exp:.3f} | "
          f"{100 * hidden:.0f}% |")
PY
)
record_results "bench/cp_bench.sh $steps" "$table" \
  "- recipes/long_context.lua (sequence 8192, fp32 on the CPU); CP = 4 over \`luatron launch -n 4\` on these" \
  "  cores (one thread per rank): the step times are the split's cost; the memory per rank is the point."
rm -rf "$out"

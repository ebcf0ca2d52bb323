#!/usr/bin/env bash
# Data-parallel step time on the bench-small model (6 layers, hidden 384, 6 heads, seq 256,
# vocab 256; global batch 16 in microbatches of 8): DP=1 against DP=2 (luatron launch) with DDP,
# DDP with overlap_grad_reduce, and the distributed optimizer. Prints a table and appends it to
# bench/results.md. (Hidden: share of the gradient reduction time that ran behind backward.) On a 2-core machine DP=2 runs one OpenMP thread per rank where DP=1 runs two,
# so the figures show the engine's data-parallel overhead, not a speed-up.
#   bench/dp_bench.sh [steps]   (default 8; the first step is not timed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps=${1:-8}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=bazel-bin/luatron
out=$(mktemp -d)
model="model.num_layers=6 model.hidden_size=384 model.num_attention_heads=6 model.seq_length=256 dataset.seq_length=256
  train.global_batch_size=16 train.micro_batch_size=8 train.train_iters=$steps train.eval_interval=100000
  logger.log_interval=1 scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=0"
run() { # name, ranks, extra overrides
  local name=$1 n=$2
  shift 2
  if [ "$n" = 1 ]; then
    $bin run recipes/gpt_tiny.lua $model "$@" logger.metrics_file=$out/$name.jsonl >$out/$name.log 2>&1
  else
    $bin launch -n "$n" recipes/gpt_tiny.lua $model "$@" logger.metrics_file=$out/$name.jsonl >$out/$name.log 2>&1
  fi
}
run dp1 1
run ddp2 2
run overlap2 2 ddp.overlap_grad_reduce=true ddp.bucket_size=1000000
run distopt2 2 ddp.use_distributed_optimizer=true
run distopt_overlap2 2 ddp.use_distributed_optimizer=true ddp.overlap_grad_reduce=true ddp.overlap_param_gather=true ddp.bucket_size=1000000
table=$(python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rows = [("dp1", "DP=1 (2 OpenMP threads)"), ("ddp2", "DP=2 DDP"), ("overlap2", "DP=2 DDP, overlap_grad_reduce, 1M-element buckets"),
        ("distopt2", "DP=2 distributed optimizer"),
        ("distopt_overlap2", "DP=2 distributed optimizer, overlapped reduce-scatter and all-gather, 1M-element buckets")]
print("| layout | ms/step (median) | tokens/s | collectives ms/step | exposed ms/step | hidden |")
print("|---|---:|---:|---:|---:|---:|")
base = None
for key, label in rows:
    recs = [json.loads(l) for l in open(f"{out}/{key}.jsonl") if '"loss"' in l][1:]
    ms = statistics.median(r["step_time_ms"] for r in recs)
    tps = 16 * 256 / (ms / 1000)
    comm = [r.get("comm_seconds") for r in recs if r.get("comm_seconds") is not None]
    hid = [r.get("comm_hidden_fraction") for r in recs if r.get("comm_hidden_fraction") is not None]
    c = f"{1000 * statistics.median(comm):.1f}" if comm else "-"
    h = f"{100 * statistics.median(hid):.0f}%" if hid else "-"
    e = f"{1000 * statistics.median(comm) * (1 - statistics.median(hid)):.1f}" if hid else c
    print(f"| {label} | {ms:.1f} | {tps:.0f} | {c} | {e} | {h} |")
PY
)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)
git diff --quiet 2>/dev/null || commit="$commit (+ uncommitted changes)"
echo "$table"
{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M:%S') UTC: bench/dp_bench.sh $steps"
  echo
  echo "- CPU: $cpu ($(nproc) CPUs)"
  echo "- commit: $commit"
  echo "- command: \`bench/dp_bench.sh $steps\` (bench-small model, global batch 16, microbatch 8, fp32, AdamW)"
  echo
  echo "$table"
  echo
  echo "Hidden = share of the gradient all-reduce time that ran while backward was still computing."
} >> bench/results.md
rm -rf "$out"

#!/usr/bin/env bash
# OpenMP wait policy on a quiet and on a loaded machine (issue 10). Times a short run of the tiny
# recipe (log_interval 1) under each setting below, first alone, then beside one `yes > /dev/null`
# per core; the settings take turns within each repetition so that outside noise hits them alike.
# Prints a table (median wall seconds of the whole command and median ms/step from its metrics
# file; a run past the cap is stopped and its steps so far still count) and appends it to
# bench/results.md.
#   bench/threads_bench.sh [reps] [iters] [cap_s]   (default 2 20 45: about five minutes)
# BENCH_NO_APPEND=1: print only; LUATRON_NO_BUILD=1: no build; LUATRON_BIN: the binary to time.
# "nothing set" is what `luatron` does by itself (since issue 10: GOMP_SPINCOUNT=1000, see
# engine/cli/threads.h); GOMP_SPINCOUNT=300000 is libgomp's own default (spin ~8 ms on an AMD
# EPYC, then sleep), which is what "nothing set" meant before issue 10.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
reps=${1:-2} iters=${2:-20} cap=${3:-45}
settings=("" "GOMP_SPINCOUNT=300000" "OMP_WAIT_POLICY=passive" "GOMP_SPINCOUNT=1000")
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --noshow_progress //:luatron >/dev/null 2>&1
bin=${LUATRON_BIN:-bazel-bin/luatron}
out=$(mktemp -d)
hogs=()
trap 'kill "${hogs[@]}" 2>/dev/null || true; rm -rf "$out"' EXIT
args="train.train_iters=$iters scheduler.lr_warmup_iters=$((iters / 4)) logger.log_interval=1 train.eval_interval=100000"

# run LOAD REP: every setting once; files $out/LOAD.<setting index>.<rep>.{jsonl,wall}
run() {
  local i env
  for i in "${!settings[@]}"; do
    env=(env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT ${settings[$i]})
    local f="$out/$1.$i.$2" t0=$(date +%s.%N)
    timeout "$cap" "${env[@]}" "$bin" run recipes/gpt_tiny.lua $args \
      logger.metrics_file="$f.jsonl" >"$f.log" 2>&1 || {
      [ $? = 124 ] || { cat "$f.log" >&2; exit 1; }
      touch "$f.capped"
    }
    echo "$(date +%s.%N) - $t0" | bc >"$f.wall"
  done
}
load_quiet=$(cut -d' ' -f1 /proc/loadavg)
for r in $(seq "$reps"); do run quiet "$r"; done
for c in $(seq "$(nproc)"); do yes >/dev/null & hogs+=($!); done
load_busy=$(cut -d' ' -f1 /proc/loadavg)
for r in $(seq "$reps"); do run loaded "$r"; done
kill "${hogs[@]}"; hogs=()

table=$(python3 - "$out" "$cap" "${settings[@]}" <<'PY'
import glob, json, os, statistics, sys
out, cap, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
print("| setting | quiet: s (run) | quiet: ms/step | loaded: s (run) | loaded: ms/step | last loss |")
print("|---|---:|---:|---:|---:|---:|")
for i, name in enumerate(settings):
    cells, loss = [], set()
    for load in ("quiet", "loaded"):
        files = sorted(glob.glob(f"{out}/{load}.{i}.*.wall"))
        walls = [float(open(f).read()) for f in files]
        capped = any(os.path.exists(f[:-5] + ".capped") for f in files)
        steps = []
        for f in files:
            recs = [json.loads(l) for l in open(f[:-5] + ".jsonl") if '"loss"' in l] if os.path.exists(f[:-5] + ".jsonl") else []
            steps += [r["step_time_ms"] for r in recs[1:]]  # the first step warms up
            if recs and not os.path.exists(f[:-5] + ".capped"): loss.add(f"{recs[-1]['loss']:.4f}")
        cells.append(f">{cap} (capped)" if capped else f"{statistics.median(walls):.1f}")
        cells.append(f"{statistics.median(steps):.0f}" if steps else "-")
    print(f"| {name or 'nothing set'} | " + " | ".join(cells) + f" | {', '.join(sorted(loss)) or '-'} |")
PY
)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)
git diff --quiet 2>/dev/null || commit="$commit (+ uncommitted changes)"
echo "$table"
[ -z "${BENCH_NO_APPEND:-}" ] || exit 0
{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M:%S') UTC: bench/threads_bench.sh $reps $iters $cap"
  echo
  echo "- CPU: $cpu ($(nproc) CPUs); load average (1 min) before the quiet runs $load_quiet, before the loaded ones $load_busy"
  echo "- commit: $commit"
  echo "- binary: $bin"
  echo "- command: \`bench/threads_bench.sh $reps $iters $cap\` (recipes/gpt_tiny.lua, $iters iterations, $reps runs per cell;"
  echo "  loaded = one \`yes > /dev/null\` per core beside it; s = whole command, median; ms/step = median over the runs' steps)"
  echo
  echo "$table"
} >>bench/results.md

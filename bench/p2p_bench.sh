#!/usr/bin/env bash
# Pairwise exchange through the shm backend (tests/comm/p2p_bench.c): two ranks swap B bytes each
# way with one lt_comm_batch_p2p, against blocking send/recv in turn; median time per exchange and
# bandwidth for 4 B .. 64 MiB. Runs with the default wait (20 us spin, then sleep on a futex) and
# with LUATRON_SHM_SPIN_US=100, prints both tables and appends them to bench/results.md.
#   bench/p2p_bench.sh [iterations per size]   (default 50)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
iters=${1:-50}
[ -n "${LUATRON_NO_BUILD:-}" ] || bazel build --disk_cache=/work/.bazel-disk-cache --noshow_progress //tests/comm:p2p_bench >/dev/null 2>&1
bin=bazel-bin/tests/comm/p2p_bench
load=$(cut -d' ' -f1-3 /proc/loadavg)
default=$($bin "$iters")
spin=$(LUATRON_SHM_SPIN_US=100 $bin "$iters")
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)
git diff --quiet 2>/dev/null || commit="$commit (+ uncommitted changes)"
report=$(cat <<MD

## $(date -u '+%Y-%m-%d %H:%M:%S') UTC: bench/p2p_bench.sh $iters

- CPU: $cpu ($(nproc) CPUs), load average before the run: $load
- commit: $commit
- command: \`bench/p2p_bench.sh $iters\` (2 ranks, pairwise exchange, median of $iters exchanges; 8 and 64 MiB: a fifth of them)

Default wait (spin 20 us, then sleep on the futex):

$default

LUATRON_SHM_SPIN_US=100:

$spin
MD
)
echo "$report"
[ -n "${BENCH_NO_APPEND:-}" ] || echo "$report" >> bench/results.md

# What the benchmark scripts share, sourced at their start: the load average before the run, and
# record_results, which prints a table and appends it to bench/results.md under a heading with the
# command, the machine, that load and the commit, then the description lines given.
#   record_results "bench/x_bench.sh $steps" "$table" "- what ran, in a line or two" ...
bench_load=$(cut -d' ' -f1 /proc/loadavg)

record_results() {
  local command=$1 table=$2
  shift 2
  local cpu commit
  cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)
  git diff --quiet 2>/dev/null || commit="$commit (+ uncommitted changes)"
  echo "$table"
  {
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M:%S') UTC: $command"
    echo
    echo "- CPU: $cpu ($(nproc) CPUs), load average $bench_load before the run"
    echo "- commit $commit"
    printf '%s\n' "$@"
    echo
    echo "$table"
  } >> bench/results.md
}

#!/usr/bin/env bash
# Runs every test (C tests and busted specs, all Bazel test targets) and ends with the line
# "N passed, N failed[, N skipped]" counted over the TAP lines of the whole run; a target that
# failed without reporting any TAP failure (a crash, a timeout) counts as one failure.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log="$(mktemp)"
bazel test //... "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=0 failed=0 skipped=0
while read -r target result _; do
  dir="bazel-testlogs/${target#//}"
  dir="${dir/://}"
  tap="$dir/test.log"
  p=0 f=0 s=0
  if [ -f "$tap" ]; then
    s=$(grep -cE '^ok [0-9]+.*# (SKIP|skip)' "$tap" || true)
    p=$(( $(grep -cE '^ok [0-9]+' "$tap" || true) - s ))
    f=$(grep -cE '^not ok [0-9]+' "$tap" || true)
  fi
  if [ "$result" != "PASSED" ] && [ "$f" -eq 0 ]; then f=1; fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
done < <(grep -E '^//[^ ]+ +(\(cached\) )?(PASSED|FAILED|TIMEOUT|NO STATUS|FAILED TO BUILD)' "$log" \
         | sed -E 's/\(cached\) //' | awk '{print $1, $2}')
rm -f "$log"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi   # e.g. the build itself failed
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# bench/run.sh [small|tiny|all]   (default: all)
#
# For each shape, in one run: (a) the OpenBLAS sgemm ceiling on the model's own GEMM shapes,
# (b) luatron (bazel-bin/luatron run bench/gpt_bench.lua --shape S), (c) PyTorch at its best
# setting (/usr/bin/python3, 2 threads, OMP_WAIT_POLICY=PASSIVE). Prints a table and appends it to
# bench/results.md with the date, CPU model and git commit. Raw logs go to bench/out/.
# See bench/README.md for what each figure means.
#
# Environment knobs (all optional):
#   LUATRON_NO_BUILD=1   do not run bazel; use whatever is already in bazel-bin/
#   BENCH_NO_APPEND=1    print the table but do not append to bench/results.md
#   PYTHON=/path         interpreter for PyTorch (default /usr/bin/python3, Debian's python3-torch)
#   LUATRON_BIN=/path    luatron binary (default bazel-bin/luatron)
#   LUATRON_SCRIPT=path  luatron benchmark script (default bench/gpt_bench.lua)
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
WHICH=${1:-all}
case "$WHICH" in
  small) SHAPES="small" ;;
  tiny) SHAPES="tiny" ;;
  all) SHAPES="small tiny" ;;
  -h|--help) sed -n '2,/^set -u/{/^#/p}' "$0"; exit 0 ;;
  *) echo "usage: $0 [small|tiny|all]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-/usr/bin/python3}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3 || true)
CALC=$(command -v python3 || echo /usr/bin/python3)   # arithmetic and the table
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# ---- shapes: layers hidden heads seq vocab batch warmup steps --------------------------------
shape_dims() {
  case "$1" in
    small) echo "6 384 6 256 256 8 2 5" ;;
    tiny)  echo "4 128 4 128 256 8 3 20" ;;
  esac
}

# ---- build ------------------------------------------------------------------------------------
SGEMM="$ROOT/bazel-bin/bench/sgemm_ceiling"
LUATRON="${LUATRON_BIN:-$ROOT/bazel-bin/luatron}"
LSCRIPT="${LUATRON_SCRIPT:-bench/gpt_bench.lua}"
if [ "${LUATRON_NO_BUILD:-0}" != 1 ] && command -v bazel >/dev/null; then
  targets="//bench:sgemm_ceiling"
  echo "== bazel build -c opt $targets"
  bazel build -c opt $targets >"$OUT/build_$STAMP.log" 2>&1 \
    || { echo "warning: sgemm_ceiling build failed (see $OUT/build_$STAMP.log)"; }
  # Rebuild luatron too when the workspace defines it, so the figures are for this tree.
  if [ -f BUILD ] && grep -q 'name *= *"luatron"' BUILD; then
    echo "== bazel build -c opt //:luatron"
    if ! bazel build -c opt //:luatron >>"$OUT/build_$STAMP.log" 2>&1; then
      echo "warning: //:luatron failed to build (see $OUT/build_$STAMP.log); not benchmarking luatron"
      LUATRON=""
    fi
  fi
fi

result_of() {  # last RESULT {...} line of a log, or empty
  grep '^RESULT ' "$1" 2>/dev/null | tail -n 1 | sed 's/^RESULT //'
}

CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
[ -n "$CPU" ] || CPU=$(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -n 1)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)
if [ "$COMMIT" != uncommitted ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (+ uncommitted changes)"
fi
DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

TABLES=""
for S in $SHAPES; do
  read -r L C H T V B WARM STEPS <<<"$(shape_dims "$S")"
  NTOK=$((B * T))
  echo
  echo "===== bench-$S: layers $L hidden $C heads $H seq $T vocab $V batch $B ($NTOK tokens/step)"

  # (a) sgemm ceiling on the model's forward GEMM shapes (M N K, row-major C[M,N] = A[M,K] B[K,N])
  GEMMS="$NTOK $((3 * C)) $C  $NTOK $C $C  $NTOK $((4 * C)) $C  $NTOK $C $((4 * C))  $NTOK $V $C"
  slog="$OUT/${STAMP}_${S}_sgemm.log"
  echo "-- sgemm ceiling: $SGEMM --threads 2 $GEMMS"
  if [ -x "$SGEMM" ]; then
    # shellcheck disable=SC2086
    "$SGEMM" --threads 2 $GEMMS 2>&1 | tee "$slog"
  else
    echo "sgemm_ceiling not built" | tee "$slog"
  fi
  SG_RES=$(result_of "$slog")

  # (b) luatron
  llog="$OUT/${STAMP}_${S}_luatron.log"
  LT_RES=""
  if [ -n "$LUATRON" ] && [ -x "$LUATRON" ] && [ -f "$LSCRIPT" ]; then
    echo "-- luatron: $LUATRON run $LSCRIPT --shape $S"
    timeout 300 "$LUATRON" run "$LSCRIPT" --shape "$S" 2>&1 | tee "$llog"
    LT_RES=$(result_of "$llog")
    [ -n "$LT_RES" ] || LT_RES='{"error": "no RESULT line (see bench/out/'"$(basename "$llog")"')"}'
  else
    echo "-- luatron: not available (needs $LUATRON and $LSCRIPT)"
    LT_RES='{"error": "not available"}'
  fi

  # (c) PyTorch at its best setting
  plog="$OUT/${STAMP}_${S}_torch.log"
  PT_ARGS="--layers $L --hidden $C --heads $H --seq $T --vocab $V --batch $B --warmup $WARM --steps $STEPS --threads 2"
  if [ -n "$PYTHON" ] && [ -x "$PYTHON" ]; then
    echo "-- PyTorch: OMP_WAIT_POLICY=PASSIVE $PYTHON bench/torch_gpt.py $PT_ARGS"
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=PASSIVE timeout 300 "$PYTHON" bench/torch_gpt.py $PT_ARGS 2>&1 | tee "$plog"
    PT_RES=$(result_of "$plog")
    [ -n "$PT_RES" ] || PT_RES='{"error": "no RESULT line (see bench/out/'"$(basename "$plog")"')"}'
  else
    PT_RES='{"error": "PyTorch not installed (no python3)"}'
  fi

  TABLE=$(SHAPE="$S" L="$L" C="$C" T="$T" V="$V" NTOK="$NTOK" GEMMS="$GEMMS" \
          SG_RES="$SG_RES" LT_RES="$LT_RES" PT_RES="$PT_RES" WARM="$WARM" STEPS="$STEPS" \
          "$CALC" - <<'PY'
import json, os
e = os.environ
L, C, T, V, ntok = (int(e[k]) for k in ("L", "C", "T", "V", "NTOK"))
def load(k):
    try:
        return json.loads(e.get(k) or "{}")
    except ValueError:
        return {"error": "unparsable RESULT: " + e.get(k, "")}
sg, lt, pt = load("SG_RES"), load("LT_RES"), load("PT_RES")
# Parameters of the benchmark model: wte V*C + wpe T*C + per layer (12C^2 + 13C) + final LN 2C.
N = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
fpt = 6 * N + 6 * L * C * T
ceil = sg.get("gflops")
shapes = e["GEMMS"].split()
shapes = " ".join("%sx%sx%s" % tuple(shapes[i:i + 3]) for i in range(0, len(shapes), 3))
out = []
out.append("### bench-%s" % e["SHAPE"])
out.append("")
out.append("N = %d parameters; FLOPs/token = 6N + 6LCT = 6*%d + 6*%d*%d*%d = %.4g (L layers, C hidden, T seq)."
           % (N, N, L, C, T, fpt))
out.append("Achieved GFLOP/s = tokens/s x (6N + 6LCT) / 1e9. Timed: median of %s steps after %s warm-up (PyTorch; luatron per its own script)."
           % (e["STEPS"], e["WARM"]))
if ceil:
    out.append("sgemm ceiling (OpenBLAS cblas_sgemm, 2 threads, flop-weighted mean over M x N x K = %s): **%.1f GFLOP/s**"
               % (shapes, ceil))
else:
    out.append("sgemm ceiling: not measured (%s)" % sg.get("error", "sgemm_ceiling missing"))
out.append("")
out.append("| engine | ms/step | tokens/s | GFLOP/s (6N+6LCT) | of sgemm ceiling | speed vs PyTorch | params |")
out.append("|---|---:|---:|---:|---:|---:|---:|")
pt_ms = pt.get("ms_per_step") if "error" not in pt else None
for name, r in (("luatron", lt), ("PyTorch 2 thr, OMP_WAIT_POLICY=PASSIVE", pt)):
    if "error" in r or not r.get("ms_per_step"):
        out.append("| %s | %s | | | | | |" % (name, r.get("error", "no result")))
        continue
    ms = float(r["ms_per_step"])
    tps = float(r.get("tokens_per_s") or ntok / (ms / 1e3))
    gf = tps * fpt / 1e9
    frac = "%.1f%%" % (100 * gf / ceil) if ceil else "n/a"
    ratio = "%.2fx" % (pt_ms / ms) if pt_ms else "n/a"
    p = r.get("params")
    pstr = str(p) if p is not None else "?"
    if p is not None and int(p) != N:
        pstr += " (expected %d!)" % N
    out.append("| %s | %.2f | %.0f | %.1f | %s | %s | %s |" % (name, ms, tps, gf, frac, ratio, pstr))
out.append("")
out.append("Speed vs PyTorch = PyTorch ms/step / engine ms/step (same run; >1 means faster than PyTorch).")
print("\n".join(out))
PY
)
  echo
  echo "$TABLE"
  TABLES="$TABLES$TABLE"$'\n\n'
done

SECTION="## $DATE: bench/run.sh $WHICH

- CPU: $CPU ($(nproc) CPUs)
- commit: $COMMIT
- command: \`bench/run.sh $WHICH\`
- logs: bench/out/${STAMP}_*.log

$TABLES"
if [ "${BENCH_NO_APPEND:-0}" != 1 ]; then
  [ -f bench/results.md ] || printf '# Benchmark results\n\nAppended by bench/run.sh; see bench/README.md for the method.\n\n' > bench/results.md
  printf '%s' "$SECTION" >> bench/results.md
  echo "appended to bench/results.md"
fi

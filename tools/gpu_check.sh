#!/usr/bin/env bash
# The GPU checks in one run, for a lent machine (tools/gpu_bundle.sh packs .gpu/ here first):
#   1. every CUDA op against the CPU op (tests/cuda/ops_test: fp32 and bf16 tables),
#   2. the tiny recipe in fp32 on CPU and on GPU: the same losses over 20 steps,
#   3. the same in bf16 mixed precision against the CPU's bf16 reference,
#   4. the same with openai_gelu (the MLP's GEMMs with cuBLASLt's GELU epilogues),
#   5. 6. the same with MoE layers (4 experts top-2, shared experts, aux and z losses, the alltoall
#      dispatcher's row gathers and combines on the device), in fp32 and bf16,
#   7. 8. the same through the grouped GEMMs (moe_grouped_gemm: cublasGemmGroupedBatchedEx), in fp32 and bf16,
#   9. text generation from a checkpoint (the key/value cache) on CPU and CUDA: the same greedy text,
#   10. the benchmarks of bench/gpu_bench.lua (124M bf16, its per-op GPU time profile, 124M fp32, then
#      1.3B unless GPU_CHECK_QUICK=1).
# Logs go to $OUT (or ./gpu-out) so they come back; the exit code is the number of failed parts.
# A dry run of the script itself, without a GPU, on the emulated plugin:
#   LUATRON_CUDA_PLUGIN_OVERRIDE=bazel-bin/tests/cuda/luatron_cuda_emulated.so GPU_CHECK_BENCH=0 \
#   GPU_CHECK_RECIPE_ARGS="model.num_layers=1 model.hidden_size=32 model.seq_length=32 dataset.sequence_length=32" \
#   tools/gpu_check.sh
# and of the benchmark: LUATRON_CUDA_PLUGIN=... luatron run bench/gpu_bench.lua --shape tiny --steps 2
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$root/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuBLASLt and NCCL from the system, else from the Python wheels of the CUDA image (nvidia-cublas,
# nvidia-nccl-cu13): one search of /usr and /opt, only when something is missing.
need_cublas=$([ -e /usr/local/cuda/lib64/libcublasLt.so.13 ] || echo 1)
need_nccl=$([ -n "${LUATRON_NCCL_LIB:-}" ] || ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2 ' || echo 1)
if [ -n "$need_cublas$need_nccl" ]; then
  found=$(find /usr /opt \( -name 'libcublasLt.so.13*' -o -name 'libnccl.so.2' \) 2>/dev/null)
  cublas=$(grep -m1 '/libcublasLt.so.13' <<<"$found")
  nccl=$(grep -m1 '/libnccl.so.2$' <<<"$found")
  if [ -n "$need_cublas" ] && [ -n "$cublas" ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$cublas")"; fi
  if [ -n "$need_nccl" ] && [ -n "$nccl" ]; then export LUATRON_NCCL_LIB="$nccl"; fi
fi
export LUATRON_CUDA_PLUGIN="${LUATRON_CUDA_PLUGIN_OVERRIDE:-$root/.gpu/luatron_cuda.so}"
bin="$root/.gpu/luatron"
failed=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/device.txt"

# compare A.jsonl B.jsonl RTOL: both runs have 20 steps with losses within RTOL (relative).
compare() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
a, b = [[json.loads(l) for l in open(p) if '"loss"' in l] for p in sys.argv[1:3]]
rtol = float(sys.argv[3])
worst = max((abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b)), default=float("inf"))
print(f"{len(a)} vs {len(b)} steps; worst relative loss difference {worst:.3g} (tolerance {rtol:g})")
sys.exit(0 if len(a) == len(b) == 20 and worst <= rtol else 1)
PY
}

echo "== 1. ops: CUDA against CPU"
timeout 300 "$root/.gpu/ops_test" 2>&1 | tee "$out/ops_test.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
LUATRON_CUDA_PROFILE=1 timeout 300 "$root/.gpu/ops_test" --profile > "$out/ops_profile_test.log" 2>&1 ||
  { failed=$((failed + 1)); grep '^not ok' "$out/ops_profile_test.log"; }
# The NCCL communicator on this GPU (world of 1; LUATRON_NCCL_TEST_RANKS=N adds N ranks on N GPUs);
# its device checks SKIP where the machine has no libnccl.so.2 (LUATRON_NCCL_LIB names another).
timeout 120 "$root/.gpu/nccl_test" > "$out/nccl_test.log" 2>&1 ||
  { failed=$((failed + 1)); grep '^not ok' "$out/nccl_test.log"; }
grep -c '# SKIP' "$out/nccl_test.log" | sed 's/^/nccl_test: skipped checks: /'

tiny="run recipes/gpt_tiny.lua train.train_iters=20 train.eval_interval=1000 logger.log_interval=1 \
scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=0 model.hidden_dropout=0.1 model.attention_dropout=0.1 ${GPU_CHECK_RECIPE_ARGS:-}"
n=2
# fp32, bf16, and bf16 with GPT-2's tanh GELU (openai_gelu: the MLP through cuBLASLt's GELU epilogues),
# then MoE layers in fp32 and bf16
moe="model.num_moe_experts=4 model.moe_router_topk=2 model.moe_aux_loss_coeff=0.01 model.moe_z_loss_coeff=0.001 \
model.moe_shared_expert_intermediate_size=64 model.moe_token_dispatcher_type=alltoall"
for precision in fp32 bf16 bf16_openai_gelu moe_fp32 moe_bf16 moe_grouped_fp32 moe_grouped_bf16; do
  echo "== $n. tiny recipe, $precision, CPU vs CUDA, 20 steps"
  case $precision in
    fp32) flag="" rtol=1e-3 ;;
    bf16) flag="model.bf16=true" rtol=1e-2 ;;
    moe_fp32) flag="$moe" rtol=1e-3 ;;
    moe_bf16) flag="$moe model.bf16=true" rtol=1e-2 ;;
    moe_grouped_fp32) flag="$moe model.moe_grouped_gemm=true" rtol=1e-3 ;;
    moe_grouped_bf16) flag="$moe model.moe_grouped_gemm=true model.bf16=true" rtol=1e-2 ;;
    *) flag="model.bf16=true model.openai_gelu=true" rtol=1e-2 ;;
  esac
  rm -f "$out/cpu_$precision.jsonl" "$out/cuda_$precision.jsonl" # the logger appends
  "$bin" $tiny $flag logger.metrics_file="$out/cpu_$precision.jsonl" > "$out/cpu_$precision.log" 2>&1 ||
    failed=$((failed + 1))
  "$bin" $tiny $flag model.device=cuda logger.metrics_file="$out/cuda_$precision.jsonl" > "$out/cuda_$precision.log" 2>&1 ||
    { failed=$((failed + 1)); tail -5 "$out/cuda_$precision.log"; }
  tail -1 "$out/cuda_$precision.log"
  compare "$out/cpu_$precision.jsonl" "$out/cuda_$precision.jsonl" "$rtol" || failed=$((failed + 1))
  n=$((n + 1))
done

echo "== $n. text generation: greedy continuations on CPU and CUDA from the same checkpoint (fp32)"
gen_run=$(mktemp -d)
"$bin" $tiny checkpoint.save="$gen_run" checkpoint.save_interval=20 > "$out/gen_train.log" 2>&1 ||
  failed=$((failed + 1))
for d in cpu cuda; do
  "$bin" generate --load "$gen_run" --prompt "The " --max-new-tokens 24 --temperature 0 --device $d \
    > "$out/gen_$d.txt" 2>&1 || failed=$((failed + 1))
done
if cmp -s "$out/gen_cpu.txt" "$out/gen_cuda.txt"; then echo "the same text"; else
  echo "the texts differ:"; cat "$out/gen_cpu.txt" "$out/gen_cuda.txt"; failed=$((failed + 1)); fi
rm -rf "$gen_run"
n=$((n + 1))

echo "== $n. benchmarks"
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
"$bin" run bench/gpu_bench.lua --shape 124m 2>&1 | tee "$out/bench_124m.log" || failed=$((failed + 1))
LUATRON_CUDA_PROFILE=1 "$bin" run bench/gpu_bench.lua --shape 124m --steps 3 2>&1 | tee "$out/profile_124m.log" ||
  failed=$((failed + 1))
"$bin" run bench/gpu_bench.lua --shape 124m --precision fp32 --steps 5 2>&1 | tee "$out/bench_124m_fp32.log" ||
  failed=$((failed + 1))
if [ -z "${GPU_CHECK_QUICK:-}" ]; then
  "$bin" run bench/gpu_bench.lua --shape 1.3b 2>&1 | tee "$out/bench_1p3b.log" || failed=$((failed + 1))
fi
fi
# The figures as a results page for bench/results/ (device, commit, commands, one row per run).
{
  echo "# GPU benchmarks ($(date -u +%Y-%m-%d), $(cat "$out/device.txt"), luatron $(cat "$root/.gpu/commit.txt" 2>/dev/null))"
  echo
  echo "Command: \`tools/gpu_bundle.sh\` here, then \`tools/gpu_check.sh\` on the GPU machine (bench/gpu_bench.lua)."
  echo "MFU = model:flops_per_token() x tokens/s / 989 TFLOP/s, flops_per_token = 6N + 6LCT."
  echo
  echo "| shape | precision | micro-batch x seq | ms/step | tokens/s | TFLOP/s | MFU | peak GiB |"
  echo "|---|---|---|---|---|---|---|---|"
  grep -h '^RESULT ' "$out"/bench_*.log | sed 's/^RESULT //' > "$out/results.jsonl"
  python3 - "$out/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("| {shape} | {precision} | {micro_batch} x {seq} | {ms_per_step:.1f} | {tokens_per_s:.0f} | {tflops:.1f} | "
          "{mfu_pct:.1f}% | {peak_gib:.2f} |".format(mfu_pct=100 * r["mfu"], **r))
PY
} > "$out/results.md"
cat "$out/results.md"
echo "gpu_check: $failed part(s) failed"
exit "$failed"

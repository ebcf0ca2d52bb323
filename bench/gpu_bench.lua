-- GPU training throughput of the issue's two shapes, on device "cuda": tokens/s, MFU and peak memory.
--   luatron run bench/gpu_bench.lua --shape 124m|1.3b [--precision bf16|fp32] [--batch B] [--steps N] [--warmup N]
-- Without --batch it takes the largest micro-batch of 64, 32, ... 1 whose step fits in memory.
-- One step = forward + backward of one micro-batch + AdamW, then a device synchronize. bf16 (the
-- default) is mixed precision: bf16 activations and weight copies, fp32 main weights, gradients and
-- Adam moments; fp32 is the checking mode (no TF32). The MLP uses GPT-2's GELU, the tanh approximation
-- (openai_gelu), which cuBLASLt fuses into the fc1 and fc2 GEMMs; no dropout, so the residual adds
-- ride in the projection GEMMs too.
-- MFU counts model:flops_per_token() = 6N + 6LCT FLOPs per token (N parameters, L layers, C hidden,
-- T sequence length: Megatron's and nanoGPT's rule) against the H100 SXM's 989 TFLOP/s dense bf16.
-- Prints RESULT {...} lines that bench/gpu_check.sh collects.
local lt = require "luatron"
local core = lt.core

local opts = { shape = "124m", precision = "bf16", warmup = 3, steps = 10 }
local i = 1
while arg[i] do
  local key = arg[i]:match("^%-%-(%w+)$")
  if not key or arg[i + 1] == nil then
    error("usage: gpu_bench.lua --shape 124m|1.3b [--precision bf16|fp32] [--batch B] [--steps N] [--warmup N]", 0)
  end
  opts[key] = tonumber(arg[i + 1]) or arg[i + 1]
  i = i + 2
end

local shapes = {
  ["124m"] = { num_layers = 12, hidden_size = 768, num_attention_heads = 12, seq_length = 1024, vocab = 50304 },
  ["1.3b"] = { num_layers = 24, hidden_size = 2048, num_attention_heads = 16, seq_length = 2048, vocab = 50304 },
  -- for a dry run of this script on the emulated plugin (tools/gpu_check.sh's header)
  tiny = { num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 32, vocab = 256 },
}
local s = shapes[opts.shape] or error("unknown shape " .. tostring(opts.shape) .. " (124m, 1.3b or tiny)", 0)
local PEAK_BF16 = 989e12

local provider = lt.GPTModelProvider {
  num_layers = s.num_layers, hidden_size = s.hidden_size, num_attention_heads = s.num_attention_heads,
  seq_length = s.seq_length, vocab_size = s.vocab, hidden_dropout = 0.0, attention_dropout = 0.0, device = "cuda",
  openai_gelu = true,
  bf16 = opts.precision == "bf16",
}
local model = lt.build_model(provider, 1234)
local optimizer = lt.optimizer(model, lt.OptimizerConfig { lr = 1e-4, weight_decay = 0.01 })
local data = core.dataset { seq_length = s.seq_length, vocab_size = s.vocab, seed = 1234 }

local function step(k, batch)
  model:zero_grad()
  local b <close> = data:batch(k * batch, batch)
  local ctx, _, valid = model:forward(b)
  model:backward(ctx, 1 / valid)
  optimizer:step(1e-4)
  core.synchronize("cuda")
end

local batch = opts.batch
if not batch then
  for _, b in ipairs { 64, 32, 16, 8, 4, 2, 1 } do
    local ok, e = pcall(step, 0, b)
    if ok then batch = b break end
    -- Out of memory shows as the engine's "out of cuda memory" or as a library's failed allocation.
    local msg = tostring(e):lower()
    if not (msg:find("out of", 1, true) or msg:find("alloc", 1, true) or msg:find("memory", 1, true)) then
      error(e, 0)
    end
    pcall(core.synchronize, "cuda") -- reports (and so clears) what the failed try left behind
    print(("micro-batch %d does not fit: %s"):format(b, e))
  end
  assert(batch, "not even a micro-batch of 1 fits")
end

for k = 1, opts.warmup do step(k, batch) end
core.reset_peak_memory("cuda")
core.profile_reset("cuda") -- LUATRON_CUDA_PROFILE=1: where the time of the timed steps goes
local times = {}
for k = 1, opts.steps do
  local t0 = core.clock()
  step(opts.warmup + k, batch)
  times[#times + 1] = core.clock() - t0
end
table.sort(times)
local median = times[(#times + 1) // 2]
local tokens_per_s = batch * s.seq_length / median
local flops = model:flops_per_token() * tokens_per_s
local peak = core.memory("cuda").peak
print(("luatron %s %s on cuda: micro-batch %d x %d, median %.1f ms/step over %d steps, %.0f tokens/s, "
  .. "%.1f TFLOP/s = %.1f%% MFU (of 989 TFLOP/s bf16), peak memory %.2f GiB")
  :format(opts.shape, opts.precision, batch, s.seq_length, 1000 * median, #times, tokens_per_s, flops / 1e12,
    100 * flops / PEAK_BF16, peak / 2 ^ 30))
print(("RESULT {\"shape\": %q, \"precision\": %q, \"micro_batch\": %d, \"seq\": %d, \"ms_per_step\": %.3f, \"tokens_per_s\": %.1f, "
  .. "\"tflops\": %.2f, \"mfu\": %.4f, \"peak_gib\": %.3f, \"params\": %d}")
  :format(opts.shape, opts.precision, batch, s.seq_length, 1000 * median, tokens_per_s, flops / 1e12, flops / PEAK_BF16,
    peak / 2 ^ 30, model:num_parameters()))
local profile = core.profile_report("cuda")
if profile then print("GPU time per op over the timed steps:\n" .. profile) end

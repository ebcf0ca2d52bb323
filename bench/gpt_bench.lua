-- luatron's side of bench/run.sh: times training steps of the benchmark GPT and prints
--   RESULT {"ms_per_step": x, "tokens_per_s": y, "params": N}
-- usage: luatron run bench/gpt_bench.lua --shape small|tiny [--steps N] [--warmup N]
local lt = require "luatron"
local core = lt.core

local opts = { shape = "small", steps = nil, warmup = 2 }
local i = 1
while arg[i] do
  local key = arg[i]:match("^%-%-(%w+)$")
  if not key or arg[i + 1] == nil then error("usage: gpt_bench.lua --shape small|tiny [--steps N] [--warmup N]", 0) end
  opts[key] = tonumber(arg[i + 1]) or arg[i + 1]
  i = i + 2
end

local shapes = {
  small = { num_layers = 6, hidden_size = 384, num_attention_heads = 6, seq_length = 256, steps = 5 },
  tiny = { num_layers = 4, hidden_size = 128, num_attention_heads = 4, seq_length = 128, steps = 20 },
}
local s = assert(shapes[opts.shape], "unknown shape " .. tostring(opts.shape))
local batch = 8
local provider = lt.GPTModelProvider {
  num_layers = s.num_layers, hidden_size = s.hidden_size, num_attention_heads = s.num_attention_heads,
  seq_length = s.seq_length, vocab_size = 256, hidden_dropout = 0.0, attention_dropout = 0.0,
}
local model = lt.build_model(provider, 1234)
local optimizer = lt.optimizer(model, lt.OptimizerConfig { lr = 1e-4, weight_decay = 0.01 })
local data = core.dataset { seq_length = s.seq_length, vocab_size = 256, seed = 1234 }

local function step(k)
  model:zero_grad()
  local b <close> = data:batch(k * batch, batch)
  local ctx, _, valid = model:forward(b)
  model:backward(ctx, 1 / valid)
  optimizer:step(1e-4)
end

for k = 1, opts.warmup do step(k) end
local times = {}
for k = 1, opts.steps or s.steps do
  local t0 = core.clock()
  step(opts.warmup + k)
  times[#times + 1] = core.clock() - t0
end
table.sort(times)
local median = times[(#times + 1) // 2]
if #times % 2 == 0 then median = (times[#times // 2] + times[#times // 2 + 1]) / 2 end
local tokens = batch * s.seq_length
print(("luatron %s: median %.2f ms/step over %d steps, %.0f tokens/s"):format(opts.shape, 1000 * median, #times,
  tokens / median))
print(("RESULT {\"ms_per_step\": %.3f, \"tokens_per_s\": %.1f, \"params\": %d}"):format(1000 * median,
  tokens / median, model:num_parameters()))

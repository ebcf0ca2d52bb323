-- Tensor and sequence parallelism proven by equivalence: TP = 2 and 4, TP = 2 with sequence
-- parallelism, TP = 2 x PP = 2, and TP = 2 x PP = 2 x DP = 2 (8 ranks) with the distributed
-- optimizer, for a GPT-2-style model (LayerNorm, GELU, learned positions, biases, tied embeddings)
-- and a Llama-style one (RMSNorm, SwiGLU, RoPE, grouped-query attention, untied, no biases), dropout
-- on: every step's loss, gradient norm and parameter norm equal the single rank's. Every step's
-- tensor-parallel traffic equals the analytic volumes (luatron.tensor_parallel), and sequence
-- parallelism divides the activations of its regions by TP. Bad sizes are refused before any work.
-- Needs LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")

-- fp32: what differs from one rank is the order of sums (the reductions over TP, the vocabulary-
-- parallel cross-entropy's log-sum-exp): small differences, the largest printed at the end.
local RTOL = 1e-5

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir = h.q, h.run, h.tmpdir

-- A small model, 20 steps, dropout on: 4 layers, 8 heads, global batch 8 in microbatches of 2. The
-- vocabulary (256) is padded to a multiple of 32 x TP, so every layout has the same one. The learning
-- rate is 1e-3: at the recipe's 3e-3 the Llama-style run has a loss spike at iteration 19 where the
-- single rank's own gradient norm moves by 1e-5 when only its thread count changes (measured), which
-- would test fp32's conditioning there, not the layouts.
local STEPS = 20
local BASE = "recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=8 train.micro_batch_size=2 "
  .. "model.num_layers=4 model.hidden_size=64 model.num_attention_heads=8 model.seq_length=32 "
  .. "dataset.sequence_length=32 model.make_vocab_size_divisible_by=32 model.hidden_dropout=0.1 "
  .. "model.attention_dropout=0.1 train.eval_interval=100 train.eval_iters=0 logger.log_interval=1 "
  .. "logger.log_params_norm=true scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 optimizer.lr=1e-3 "
local LLAMA = "model.normalization=RMSNorm model.activation_func=silu model.gated_linear_unit=true "
  .. "model.position_embedding_type=rope model.num_query_groups=4 model.add_bias_linear=false "
  .. "model.share_embeddings_and_output_weights=false model.ffn_hidden_size=96 "

local function launch(n, dir, name, extra)
  return h.launch_metrics(LUATRON, n, dir, name, BASE:format(STEPS) .. extra)
end

-- Closeness within RTOL; the largest relative difference seen is printed at the end as a TAP comment.
local assert_close = h.closeness(RTOL)

local function assert_equivalent(ref, got, label)
  assert.are.equal(#ref, #got, label .. ": number of steps")
  h.assert_same_steps(ref, got, assert_close, label)
end

local LAYOUTS = {
  { "TP = 2", 2, "model.tensor_model_parallel_size=2" },
  { "TP = 4", 4, "model.tensor_model_parallel_size=4" },
  { "TP = 2 with SP", 2, "model.tensor_model_parallel_size=2 model.sequence_parallel=true" },
  { "TP = 2 x PP = 2", 4, "model.tensor_model_parallel_size=2 model.pipeline_model_parallel_size=2" },
  { "TP = 2 (SP) x PP = 2 x DP = 2, distributed optimizer", 8, "model.tensor_model_parallel_size=2 "
    .. "model.sequence_parallel=true model.pipeline_model_parallel_size=2 ddp.use_distributed_optimizer=true" },
}

-- Fewer query groups (2) than TP ranks (4): Megatron's way, linear_qkv's whole output gathered and each
-- rank's heads taken out of it; with q/k norms.
local SHARED_KV = {
  { "TP = 4", 4, "model.tensor_model_parallel_size=4" },
  { "TP = 4 (SP) x PP = 2", 8, "model.tensor_model_parallel_size=4 model.sequence_parallel=true "
    .. "model.pipeline_model_parallel_size=2" },
}

for _, model in ipairs { { "GPT-2-style", "", LAYOUTS }, { "Llama-style", LLAMA, LAYOUTS },
  { "Llama-style with 2 query groups and q/k norms", LLAMA .. "model.num_query_groups=2 model.qk_layernorm=true ",
    SHARED_KV } } do
  describe("tensor parallelism, " .. model[1] .. " model", function()
    assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
    local dir = tmpdir()
    local ref = launch(1, dir, "single", model[2])

    it("trains 20 steps on one rank with falling loss (the reference)", function()
      assert.are.equal(STEPS, #ref)
      assert.is_true(ref[STEPS].loss < ref[1].loss)
    end)

    local logs = {}
    for i, layout in ipairs(model[3]) do
      it(layout[1] .. " reproduces the single rank's losses and gradient norms; its traffic is the formula's", function()
        local got, out = launch(layout[2], dir, "layout" .. i, model[2] .. layout[3])
        assert_equivalent(ref, got, layout[1])
        for _, r in ipairs(got) do
          assert.is_true(r.tp_bytes_per_step > 0)
          assert.are.equal(r.tp_expected_bytes, r.tp_bytes_per_step, ("%s: TP bytes at iteration %d"):format(layout[1],
            r.iteration))
        end
        assert.is_truthy(out:find("measured/expected 1.0000", 1, true), out)
        logs[i] = out
      end)
    end

    if model[3] ~= LAYOUTS then return end
    it("sequence parallelism divides the activations of its regions by TP (TP = 2 against TP = 2 with SP)", function()
      local function mib(out, pattern)
        local v = out:match(pattern)
        assert(v, out)
        return tonumber(v)
      end
      local without = mib(logs[1], "activations per microbatch on this rank: ([%d.]+) MiB")
      local with = mib(logs[3], "activations per microbatch on this rank: ([%d.]+) MiB")
      local region = mib(logs[3], "the sequence%-parallel regions: ([%d.]+) MiB on one rank")
      local local_part = mib(logs[3], "([%d.]+) MiB here, 1/2")
      print(("# activations per microbatch: %.3f MiB without SP, %.3f MiB with (regions %.3f -> %.3f MiB)")
        :format(without, with, region, local_part))
      assert.is_true(math.abs((without - with) - (region - local_part)) <= 0.002)
      assert.is_true(local_part <= region / 2 + 0.001)
    end)
  end)
end

-- bf16 mixed precision: the row-parallel outputs are each rank's partial GEMM rounded to bf16 and then
-- summed (a single rank rounds once), so the tolerance is bf16's: 2e-3 (measured: loss 2.6e-5, gradient
-- norm 2.3e-4, parameter norm 1e-6 over 20 steps).
describe("tensor parallelism in bf16", function()
  it("TP = 2 (SP) x PP = 2 follows the single rank's bf16 run", function()
    local dir = tmpdir()
    local bf16 = "model.bf16=true model.pipeline_dtype=bf16 "
    local ref = launch(1, dir, "single", bf16)
    local got = launch(4, dir, "tp_pp", bf16 .. "model.tensor_model_parallel_size=2 model.sequence_parallel=true "
      .. "model.pipeline_model_parallel_size=2")
    local close = h.closeness(2e-3)
    assert.are.equal(STEPS, #got)
    for _, r in ipairs(got) do
      for _, k in ipairs { "loss", "grad_norm", "params_norm" } do
        close(ref[r.iteration][k], r[k], ("bf16 %s at iteration %d"):format(k, r.iteration))
      end
    end
    print(("# bf16: largest relative difference %.3g (tolerance 2e-3)"):format(close.worst()))
  end)
end)

-- The CUDA backend's ops under TP (the row gathers, the bias as a one-position embedding, the
-- cross-entropy on another rank's columns, attention on a slice of heads) on the emulated plugin:
-- each of 2 ranks builds its shard of the whole model on "cuda" (whose memory is the host's under the
-- emulator, so the shm communicator carries its collectives) and compares one training microbatch
-- with dropout against the CPU's single-rank model: the loss, and every gradient of its shard (the
-- parts each rank computes, summed over TP).
local CUDA_TP_CHECK = [[
local lt = require "luatron"
local core = require "luatron.core"
local model_lib = require "luatron.model"
local sp, shared_kv = arg[1] == "sp", arg[1] == "kv"
local function provider(device, tp)
  return lt.GPTModelProvider { num_layers = 2, hidden_size = 16, num_attention_heads = 4,
    num_query_groups = shared_kv and 1 or 2, qk_layernorm = shared_kv,
    seq_length = 8, vocab_size = 64, make_vocab_size_divisible_by = 32, hidden_dropout = 0.1,
    attention_dropout = 0.1, device = device, tensor_model_parallel_size = tp, sequence_parallel = sp and tp > 1,
    add_bias_linear = true }
end
local world = core.comm_world()
local ref = model_lib.build(provider("cpu", 1), 3)
local cfg = model_lib.engine_config(provider("cuda", 2), 3, 16, 0, { tensor = world })
cfg.layer_begin, cfg.layer_end, cfg.pre_process, cfg.post_process = 0, 2, true, true
local chunk = core.gpt_chunk(cfg)
local tok, tgt = {}, {}
for b = 1, 2 do
  tok[b], tgt[b] = {}, {}
  for t = 1, 8 do tok[b][t], tgt[b][t] = (b * 8 + t * 5) % 64, (b * 3 + t * 7) % 64 end
end
local tokens, targets = lt.tensor.from(tok, "int32"), lt.tensor.from(tgt, "int32")
ref:zero_grad(); chunk:zero_grad()
local ctx, loss, valid = ref:forward(tokens, targets, 5)
ref:backward(ctx, 1 / valid)
local losses, c, n = chunk:forward(tokens, targets, 5)
local tp_loss = losses:to_host():sum() / n
chunk:backward(c, 1 / n)
local worst = 0
for _, p in ipairs(chunk:parameters()) do
  local g = chunk:grad(p.name):to_host()
  g = g:reshape({ g:numel() })
  if p.tp_grad_sum then world:all_reduce(g, "sum") end
  local r = ref:grad(p.name):reshape({ p.full_numel })
  local scale, diff = 0, 0
  for _, run in ipairs(chunk:param_runs(p.name)) do
    for i = 1, run.n do
      local a, b = r:get(run.full + i), g:get(run["local"] + i)
      scale, diff = math.max(scale, math.abs(a)), math.max(diff, math.abs(a - b))
    end
  end
  -- relative to the gradient's scale, floored: a key's bias has an exactly zero gradient (softmax does not
  -- see a shift of every key), so its reference is rounding noise
  worst = math.max(worst, diff / math.max(scale, 1e-4))
end
print(("rank %d device %s loss %.9g parallel %.9g grad_rel %.3g"):format(world:rank(), chunk:grad(chunk:parameters()[1].name):device(),
  loss, tp_loss, worst))
]]

describe("tensor parallelism on the CUDA backend (the emulated plugin)", function()
  local LABEL = { tp = "", sp = ", SP", kv = ", one query group shared by both ranks, q/k norms" }
  for _, variant in ipairs { "tp", "sp", "kv" } do
    it(("matches the CPU's single rank (TP = 2%s)"):format(LABEL[variant]), function()
      h.assert_emulated(LUATRON, CUDA_TP_CHECK, variant, 2, assert_close, RTOL)
    end)
  end
end)

-- The mappings from Lua (core.tp_region) on 2 ranks: entering gathers every rank's rows into the full
-- data (SP) or passes it on; leaving sums every rank's partial tensor (this rank's rows of the sum
-- under SP); scatter takes this rank's rows.
local REGION_CHECK = [[
local lt = require "luatron"
local core = require "luatron.core"
local world = core.comm_world()
local me, B, T, C = world:rank(), 2, 4, 3
local full, partial = {}, {}
for i = 1, B * T do
  full[i], partial[i] = {}, {}
  for j = 1, C do full[i][j], partial[i][j] = i * 10 + j, (i * 10 + j) * (me + 1) end
end
full, partial = lt.tensor.from(full, "float32"), lt.tensor.from(partial, "float32")
for _, sp in ipairs { false, true } do
  local r = core.tp_region(world, { batch = B, seq = T, sequence_parallel = sp })
  local mine = r:scatter(full)
  local entered, left = r:enter(mine), r:exit(partial)
  local ok = r:outer_rows() == (sp and B * T // 2 or B * T) and mine:shape()[1] == r:outer_rows()
  for i = 1, B * T do
    for j = 1, C do ok = ok and entered:get(i, j) == full:get(i, j) end
  end
  for i = 1, r:outer_rows() do -- this rank's row i is full row (b, me T/2 + t) under SP
    local row = sp and (i - 1) // (T // 2) * T + me * (T // 2) + (i - 1) % (T // 2) + 1 or i
    for j = 1, C do ok = ok and left:get(i, j) == 3 * full:get(row, j) and mine:get(i, j) == full:get(row, j) end
  end
  print(("rank %d sp %s ok %s"):format(me, tostring(sp), tostring(ok)))
end
]]

describe("tensor-parallel mappings from Lua", function()
  it("core.tp_region enters, leaves and scatters as the model's layers do, with and without SP", function()
    local dir = tmpdir()
    h.write(dir .. "/region.lua", REGION_CHECK)
    local code, out = run(("%s launch -n 2 %s"):format(q(LUATRON), q(dir .. "/region.lua")))
    assert.are.equal(0, code, out)
    local n = 0
    for _ in out:gmatch("rank %d sp %a+ ok true") do n = n + 1 end
    assert.are.equal(4, n, out)
  end)
end)

describe("tensor parallelism's rules", function()
  local function refused(n, extra, message)
    local code, out = run(("%s launch -n %d %s %s"):format(q(LUATRON), n, BASE:format(3), extra))
    assert.are_not.equal(0, code)
    assert.is_truthy(out:find(message, 1, true), out)
  end

  it("refuses heads, query groups and ffn sizes that do not divide by TP, with the field to change", function()
    refused(3, "model.tensor_model_parallel_size=3", "num_attention_heads (8) must be a multiple of "
      .. "tensor_model_parallel_size (3)")
    refused(2, "model.tensor_model_parallel_size=2 model.ffn_hidden_size=101", "ffn_hidden_size (101) must be a "
      .. "multiple of tensor_model_parallel_size (2)")
    refused(2, "model.tensor_model_parallel_size=2 model.sequence_parallel=true model.seq_length=31 "
      .. "dataset.sequence_length=31", "seq_length (31) is not a multiple of it")
    refused(2, "model.tensor_model_parallel_size=2 model.num_attention_heads=12 model.kv_channels=8 "
      .. "model.num_query_groups=3", "num_query_groups (3) must be a multiple or divisor of tensor_model_parallel_size (2)")
    refused(1, "model.sequence_parallel=true", "sequence_parallel=true requires tensor_model_parallel_size > 1")
  end)
end)

describe("the equivalence tolerance", function()
  it("was met with room to spare", function()
    print(("# largest relative difference from the single rank: %.3g (tolerance %g)"):format(assert_close.worst(), RTOL))
    assert.is_true(assert_close.worst() <= RTOL)
  end)
end)

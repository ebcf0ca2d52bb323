-- Context parallelism proven by equivalence: CP = 2 and 4, CP = 2 x TP = 2 (with SP), CP = 2 x PP = 2,
-- CP = 2 x DP = 2 (distributed optimizer) and CP = 4 gathering the keys and values (cp_comm_type
-- "all_gather") instead of the ring, for learned positions and for RoPE, dropout on (masks at
-- global positions): every step's loss, gradient norm and parameter norm equal the single rank's. The
-- ring's bytes per step equal the arithmetic, a rank's activations per microbatch fall as 1/CP, and a
-- sequence that does not split into 2 CP chunks is refused with Megatron Bridge's message. Needs
-- LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")

-- fp32: what differs from one rank is the order of sums (attention merged block by block, the
-- gradients summed over the cp ranks): small differences, the largest printed at the end.
local RTOL = 1e-5

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir = h.q, h.run, h.tmpdir

-- A small model, 20 steps, dropout on: 4 layers, 8 heads (4 query groups), sequence 64 in 2 CP chunks
-- of 16 (CP = 2) or 8 (CP = 4), global batch 8 in microbatches of 2.
local STEPS = 20
local BASE = "recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=8 train.micro_batch_size=2 "
  .. "model.num_layers=4 model.hidden_size=64 model.num_attention_heads=8 model.num_query_groups=4 "
  .. "model.seq_length=64 dataset.sequence_length=64 model.make_vocab_size_divisible_by=32 model.hidden_dropout=0.1 "
  .. "model.attention_dropout=0.1 train.eval_interval=100 train.eval_iters=0 logger.log_interval=1 "
  .. "logger.log_params_norm=true scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 optimizer.lr=1e-3 "

local function launch(n, dir, name, extra)
  return h.launch_metrics(LUATRON, n, dir, name, BASE:format(STEPS) .. extra)
end

-- Closeness within RTOL; the largest relative difference seen is printed at the end.
local assert_close = h.closeness(RTOL)

local function assert_equivalent(ref, got, label)
  assert.are.equal(#ref, #got, label .. ": number of steps")
  h.assert_same_steps(ref, got, assert_close, label)
end

local LAYOUTS = {
  { "CP = 2", 2, "model.context_parallel_size=2" },
  { "CP = 4", 4, "model.context_parallel_size=4" },
  { "CP = 2 x TP = 2 with SP", 4, "model.context_parallel_size=2 model.tensor_model_parallel_size=2 "
    .. "model.sequence_parallel=true" },
  { "CP = 2 x PP = 2", 4, "model.context_parallel_size=2 model.pipeline_model_parallel_size=2" },
  { "CP = 2 x DP = 2, distributed optimizer", 4, "model.context_parallel_size=2 ddp.use_distributed_optimizer=true" },
  { "CP = 4 with cp_comm_type all_gather", 4, "model.context_parallel_size=4 model.cp_comm_type=all_gather" },
}

local function activations(out)
  local v = out:match("activations per microbatch on this rank: ([%d.]+) MiB")
  assert(v, out)
  return tonumber(v)
end

for _, positions in ipairs { { "learned positions", "" }, { "RoPE", "model.position_embedding_type=rope " } } do
  describe("context parallelism with " .. positions[1], function()
    assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
    local dir = tmpdir()
    local ref = launch(1, dir, "single", positions[2])
    local outs = {}

    for i, layout in ipairs(LAYOUTS) do
      it(layout[1] .. " reproduces the single rank; the ring's bytes are the arithmetic's", function()
        local got, out = launch(layout[2], dir, "layout" .. i, positions[2] .. layout[3])
        assert_equivalent(ref, got, layout[1])
        for _, r in ipairs(got) do
          assert.is_true(r.cp_bytes_per_step > 0)
          assert.are.equal(r.cp_expected_bytes, r.cp_bytes_per_step, ("%s: ring bytes at iteration %d"):format(
            layout[1], r.iteration))
        end
        assert.is_truthy(out:find("context-parallel ring", 1, true), out)
        outs[i] = out
      end)
    end

    it("a rank's activations per microbatch fall as 1/CP", function()
      local two, four = activations(outs[1]), activations(outs[2])
      print(("# activations per microbatch and rank: %.3f MiB at CP = 2, %.3f MiB at CP = 4"):format(two, four))
      assert.is_true(math.abs(four / two - 0.5) <= 0.02, ("%.3f / %.3f"):format(four, two))
    end)
  end)
end

-- The CUDA backend's ops under CP (ring attention's blocks and merge, RoPE and dropout at global
-- positions) on the emulated plugin: each of 2 ranks builds the model on "cuda" (whose memory is the
-- host's under the emulator, so the shm communicator carries the ring) and runs its chunks of one
-- microbatch with dropout; against the CPU's single rank: the loss of the whole sequence, and every
-- gradient summed over the cp ranks.
local CUDA_CP_CHECK = [[
local lt = require "luatron"
local core = require "luatron.core"
local model_lib = require "luatron.model"
local cpl = require "luatron.context_parallel"
local world = core.comm_world()
local me, n, S = world:rank(), world:size(), 16
local function provider(device, cp)
  return lt.GPTModelProvider { num_layers = 2, hidden_size = 16, num_attention_heads = 4, num_query_groups = 2,
    seq_length = S, vocab_size = 64, make_vocab_size_divisible_by = 32, hidden_dropout = 0.1, attention_dropout = 0.1,
    device = device, context_parallel_size = cp, position_embedding_type = arg[1] }
end
local ref = model_lib.build(provider("cpu", 1), 3)
local cfg = model_lib.engine_config(provider("cuda", n), 3, 16, 0, { context = world })
cfg.layer_begin, cfg.layer_end, cfg.pre_process, cfg.post_process = 0, 2, true, true
local chunk = core.gpt_chunk(cfg)
local tok, tgt = {}, {}
for b = 1, 2 do
  tok[b], tgt[b] = {}, {}
  for t = 1, S do tok[b][t], tgt[b][t] = (b * 8 + t * 5) % 64, (b * 3 + t * 7) % 64 end
end
local tokens, targets = lt.tensor.from(tok, "int32"), lt.tensor.from(tgt, "int32")
ref:zero_grad(); chunk:zero_grad()
local ctx, loss, valid = ref:forward(tokens, targets, 5)
ref:backward(ctx, 1 / valid)
local losses, c = chunk:forward(cpl.local_rows(tokens, me, n), cpl.local_rows(targets, me, n), 5)
local sum = lt.tensor.from({ losses:to_host():sum() }, "float32")
world:all_reduce(sum, "sum")
chunk:backward(c, 1 / valid)
local worst = 0
for _, p in ipairs(chunk:parameters()) do
  local g = chunk:grad(p.name):to_host()
  world:all_reduce(g, "sum")
  local a, b = ref:grad(p.name):reshape({ p.numel }), g:reshape({ p.numel })
  local scale, diff = 0, 0
  for i = 1, p.numel do
    scale, diff = math.max(scale, math.abs(a:get(i))), math.max(diff, math.abs(a:get(i) - b:get(i)))
  end
  worst = math.max(worst, diff / math.max(scale, 1e-4))
end
print(("rank %d device %s loss %.9g parallel %.9g grad_rel %.3g"):format(me, chunk:grad(chunk:parameters()[1].name):device(),
  loss, sum:item() / valid, worst))
]]

describe("context parallelism on the CUDA backend (the emulated plugin)", function()
  for _, positions in ipairs { "learned_absolute", "rope" } do
    it(("matches the CPU's single rank (CP = 2, %s)"):format(positions), function()
      h.assert_emulated(LUATRON, CUDA_CP_CHECK, positions, 2, assert_close, RTOL)
    end)
  end
end)

describe("recipes/long_context.lua", function()
  it("trains at CP = 4 (on a shorter sequence here), each rank holding 1/4 of it", function()
    local code, out = run(("%s launch -n 4 --timeout 120 recipes/long_context.lua model.seq_length=256 "
      .. "dataset.sequence_length=256 train.train_iters=2"):format(q(LUATRON)))
    assert.are.equal(0, code, out)
    assert.is_truthy(out:find("64 of the sequence's 256 positions", 1, true), out)
    assert.is_truthy(out:find("measured/expected 1.0000", 1, true), out)
  end)
end)

describe("context parallelism's rules", function()
  it("refuses a sequence that does not split into 2 CP chunks, with Megatron Bridge's message", function()
    local code, out = run(("%s launch -n 2 %s model.context_parallel_size=2 model.seq_length=30 "
      .. "dataset.sequence_length=30"):format(q(LUATRON), BASE:format(3)))
    assert.are_not.equal(0, code)
    assert.is_truthy(out:find("Sequence length must be divisible by 2 * context parallel size if context parallel is "
      .. "used. seq_length (30) is not a multiple of 2 * context_parallel_size (2 * 2 = 4): the nearest valid lengths "
      .. "are 28 and 32", 1, true), out)
  end)
end)

describe("the equivalence tolerance", function()
  it("was met", function()
    print(("# largest relative difference from the single rank: %.3g (tolerance %g)"):format(assert_close.worst(), RTOL))
    assert.is_true(assert_close.worst() <= RTOL)
  end)
end)

-- Context parallelism proven by equivalence: CP = 2 and 4, CP = 2 x TP = 2 (with SP), CP = 2 x PP = 2 and
-- CP = 2 x DP = 2 (distributed optimizer), for learned positions and for RoPE, dropout on (masks at
-- global positions): every step's loss, gradient norm and parameter norm equal the single rank's. The
-- ring's bytes per step equal the arithmetic, a rank's activations per microbatch fall as 1/CP, and a
-- sequence that does not split into 2 CP chunks is refused with Megatron Bridge's message. Needs
-- LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")

-- fp32: what differs from one rank is the order of sums (attention merged block by block, the
-- gradients summed over the cp ranks): small differences, the largest printed at the end.
local RTOL = 1e-5

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir, read_metrics = h.q, h.run, h.tmpdir, h.read_metrics

-- A small model, 20 steps, dropout on: 4 layers, 8 heads (4 query groups), sequence 64 in 2 CP chunks
-- of 16 (CP = 2) or 8 (CP = 4), global batch 8 in microbatches of 2.
local STEPS = 20
local BASE = "recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=8 train.micro_batch_size=2 "
  .. "model.num_layers=4 model.hidden_size=64 model.num_attention_heads=8 model.num_query_groups=4 "
  .. "model.seq_length=64 dataset.sequence_length=64 model.make_vocab_size_divisible_by=32 model.hidden_dropout=0.1 "
  .. "model.attention_dropout=0.1 train.eval_interval=100 train.eval_iters=0 logger.log_interval=1 "
  .. "logger.log_params_norm=true scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 optimizer.lr=1e-3 "

local function launch(n, dir, name, extra)
  local args = BASE:format(STEPS) .. ("logger.metrics_file=%s %s"):format(q(dir .. "/" .. name .. ".jsonl"), extra)
  local code, out = run(("%s launch -n %d --timeout 120 %s"):format(q(LUATRON), n, args))
  assert.are.equal(0, code, out)
  return read_metrics(dir .. "/" .. name .. ".jsonl"), out
end

-- Closeness within RTOL; the largest relative difference seen is printed at the end.
local assert_close = h.closeness(RTOL)

local function assert_equivalent(ref, got, label)
  assert.are.equal(#ref, #got, label .. ": number of steps")
  for _, r in ipairs(got) do
    local want = ref[r.iteration]
    for _, k in ipairs { "loss", "grad_norm", "params_norm" } do
      assert_close(want[k], r[k], ("%s %s at iteration %d"):format(label, k, r.iteration))
    end
  end
end

local LAYOUTS = {
  { "CP = 2", 2, "model.context_parallel_size=2" },
  { "CP = 4", 4, "model.context_parallel_size=4" },
  { "CP = 2 x TP = 2 with SP", 4, "model.context_parallel_size=2 model.tensor_model_parallel_size=2 "
    .. "model.sequence_parallel=true" },
  { "CP = 2 x PP = 2", 4, "model.context_parallel_size=2 model.pipeline_model_parallel_size=2" },
  { "CP = 2 x DP = 2, distributed optimizer", 4, "model.context_parallel_size=2 ddp.use_distributed_optimizer=true" },
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

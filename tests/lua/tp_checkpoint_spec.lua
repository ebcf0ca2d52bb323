-- Checkpoints are layout-free under tensor parallelism: a run saved at TP = 2 resumes at TP = 1 and
-- TP = 4 (and one saved at TP = 1 at TP = 2) with the uninterrupted run's losses, gradient norms and
-- parameter norms, with DDP, with the distributed optimizer over DP = 2, and with PP = 2; the files
-- hold whole tensors under Megatron's names, as a single rank's do, written by TP rank 0 only. Needs
-- LUATRON (tests/lua/BUILD provides it).
local core = require "luatron.core"

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir, read_metrics = h.q, h.run, h.tmpdir, h.read_metrics

-- fp32: layouts differ in the order of sums (TP reductions, the vocabulary-parallel cross-entropy),
-- so resumed steps match the uninterrupted run to rounding, as in tensor_parallel_spec.
local RTOL = 1e-5

-- tensor_parallel_spec's model (8 heads, hidden 64, 32 positions, dropout on), 10 steps, a checkpoint
-- at 5. The vocabulary (256) is padded to a multiple of 32 x TP: the same for TP = 1, 2 and 4.
local STEPS, SAVED = 10, 5
local BASE = ("recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=8 train.micro_batch_size=2 "
  .. "model.num_layers=4 model.hidden_size=64 model.num_attention_heads=8 model.seq_length=32 "
  .. "dataset.sequence_length=32 model.make_vocab_size_divisible_by=32 model.hidden_dropout=0.1 "
  .. "model.attention_dropout=0.1 train.eval_interval=100 train.eval_iters=0 logger.log_interval=1 "
  .. "logger.log_params_norm=true scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 optimizer.lr=1e-3 ")
  :format(STEPS)

local function layout(tp, pp, extra)
  return ("model.tensor_model_parallel_size=%d model.pipeline_model_parallel_size=%d %s"):format(tp, pp, extra or "")
end

-- Trains on n ranks; returns the metrics by iteration and the output.
local function launch(n, dir, name, extra)
  local args = BASE .. ("logger.metrics_file=%s %s"):format(q(dir .. "/" .. name .. ".jsonl"), extra)
  local code, out = run(("%s launch -n %d --timeout 120 %s"):format(q(os.getenv("LUATRON")), n, args))
  assert.are.equal(0, code, out)
  local by = {}
  for _, r in ipairs(read_metrics(dir .. "/" .. name .. ".jsonl")) do by[r.iteration] = r end
  return by, out
end

-- Trains all STEPS on n ranks saving every SAVED iterations into dir/name: the reference.
local function save_run(n, dir, name, extra)
  return launch(n, dir, name, ("checkpoint.save=%s checkpoint.save_interval=%d %s"):format(q(dir .. "/" .. name),
    SAVED, extra))
end

-- Resumes dir/from's iteration SAVED on n ranks; returns its metrics.
local function resume(n, dir, from, name, extra)
  local m, out = launch(n, dir, name, ("checkpoint.load=%s checkpoint.ckpt_step=%d %s"):format(q(dir .. "/" .. from),
    SAVED, extra))
  assert.truthy(out:find(("resumed from %s/%s/iter_%07d"):format(dir, from, SAVED), 1, true), out)
  return m
end

local assert_close = h.closeness(RTOL)

-- got trained exactly the iterations after SAVED, each with ref's loss, gradient norm and parameter norm.
local function assert_resumed(ref, got, label)
  assert.is_nil(got[SAVED], label .. " trained the saved iteration again")
  for it = SAVED + 1, STEPS do
    local a, b = ref[it], got[it]
    assert.truthy(b, ("%s: no iteration %d"):format(label, it))
    assert_close(a.loss, b.loss, ("%s loss at iteration %d"):format(label, it))
    assert_close(a.grad_norm, b.grad_norm, ("%s grad norm at iteration %d"):format(label, it))
    assert_close(a.params_norm, b.params_norm, ("%s params norm at iteration %d"):format(label, it))
  end
end

local function files_of(folder)
  local names = {}
  local p = io.popen("ls -1 " .. q(folder))
  for name in p:lines() do names[#names + 1] = name end
  p:close()
  table.sort(names)
  return names
end

-- The largest |a - b| over the largest |a| of two files' tensors, which must have the same names
-- and shapes.
local function file_difference(a_path, b_path)
  local a, b = assert(core.load_tensors(a_path)), assert(core.load_tensors(b_path))
  local names = {}
  for name in pairs(a) do names[#names + 1] = name end
  for name in pairs(b) do assert.truthy(a[name], ("%s holds '%s', %s does not"):format(b_path, name, a_path)) end
  assert.is_true(#names > 0, a_path)
  local diff, scale = 0, 0
  for _, name in ipairs(names) do
    assert.truthy(b[name], ("%s holds '%s', %s does not"):format(a_path, name, b_path))
    assert.are.same(a[name]:shape(), b[name]:shape(), name)
    local x, y = a[name]:reshape({ a[name]:numel() }), b[name]:reshape({ b[name]:numel() })
    for i = 1, x:numel() do
      local u, v = x:get(i), y:get(i)
      diff, scale = math.max(diff, math.abs(u - v)), math.max(scale, math.abs(u))
    end
  end
  return diff / scale
end

describe("checkpoints under tensor parallelism", function()
  assert(os.getenv("LUATRON"), "LUATRON is not set: point it at the luatron binary")
  local dir = tmpdir()

  teardown(function() print(("# largest relative difference from the uninterrupted run: %.3g"):format(assert_close.worst())) end)

  it("DDP: saved at TP = 2, resumed at TP = 1 and TP = 4; saved at TP = 1, resumed at TP = 2", function()
    local ref = save_run(2, dir, "tp2", layout(2, 1))
    local single = save_run(1, dir, "tp1", layout(1, 1))
    -- the same files as a single rank's: whole tensors under the same names, equal to rounding
    local it = ("%s/%%s/iter_%07d"):format(dir, SAVED)
    assert.are.same(files_of(it:format("tp1")), files_of(it:format("tp2")))
    local tp1, tp2 = it:format("tp1"), it:format("tp2")
    assert.is_true(file_difference(tp1 .. "/model.safetensors", tp2 .. "/model.safetensors") < 1e-4)
    assert.is_true(file_difference(tp1 .. "/optimizer.safetensors", tp2 .. "/optimizer.safetensors") < 1e-3)
    assert_resumed(ref, resume(1, dir, "tp2", "tp2_to_tp1", layout(1, 1)), "TP 2 -> 1")
    assert_resumed(ref, resume(4, dir, "tp2", "tp2_to_tp4", layout(4, 1)), "TP 2 -> 4")
    assert_resumed(single, resume(2, dir, "tp1", "tp1_to_tp2", layout(2, 1)), "TP 1 -> 2")
  end)

  it("distributed optimizer: saved at TP = 2 x DP = 2, resumed at TP = 1 x DP = 2 and TP = 4 x DP = 1", function()
    local distopt = "ddp.use_distributed_optimizer=true"
    local ref = save_run(4, dir, "tp2dp2", layout(2, 1, distopt))
    -- one shard file per data-parallel rank, written by TP rank 0: pieces count in whole parameters
    assert.are.same({ "config.json", "model.safetensors", "optimizer_shard_0.safetensors",
      "optimizer_shard_1.safetensors", "state.json" }, files_of(("%s/tp2dp2/iter_%07d"):format(dir, SAVED)))
    assert_resumed(ref, resume(2, dir, "tp2dp2", "to_tp1dp2", layout(1, 1, distopt)), "TP 2 x DP 2 -> TP 1 x DP 2")
    assert_resumed(ref, resume(4, dir, "tp2dp2", "to_tp4dp1", layout(4, 1, distopt)), "TP 2 x DP 2 -> TP 4 x DP 1")
    -- and into DDP's whole-tensor state, at TP = 4 x DP = 2
    assert_resumed(ref, resume(8, dir, "tp2dp2", "to_tp4dp2_ddp", layout(4, 1)), "TP 2 x DP 2 -> TP 4 x DP 2, DDP")
  end)

  it("TP = 2 x PP = 2: resumed at TP = 1 x PP = 1 and TP = 4 x PP = 2, with DDP and the distributed optimizer",
    function()
      local ref = save_run(4, dir, "tp2pp2", layout(2, 2))
      assert.truthy(io.open(("%s/tp2pp2/iter_%07d/model_pp1.safetensors"):format(dir, SAVED)), "a file per stage")
      assert_resumed(ref, resume(1, dir, "tp2pp2", "tp2pp2_to_tp1", layout(1, 1)), "TP 2 x PP 2 -> TP 1")
      assert_resumed(ref, resume(8, dir, "tp2pp2", "tp2pp2_to_tp4pp2", layout(4, 2)), "TP 2 x PP 2 -> TP 4 x PP 2")
      -- buckets of 1000 elements: data-parallel shards end inside rows, so the pieces a row-parallel
      -- weight's shards gather into have gaps and partly covered rows
      local distopt = "ddp.use_distributed_optimizer=true ddp.bucket_size=1000"
      ref = save_run(8, dir, "tp2pp2dp2", layout(2, 2, distopt))
      assert_resumed(ref, resume(4, dir, "tp2pp2dp2", "tp2pp2dp2_to_tp4", layout(4, 1, distopt)),
        "TP 2 x PP 2 x DP 2 -> TP 4 x DP 1")
      assert_resumed(ref, resume(2, dir, "tp2pp2dp2", "tp2pp2dp2_to_pp2", layout(1, 2, distopt)),
        "TP 2 x PP 2 x DP 2 -> PP 2")
    end)

  it("refuses a checkpoint whose whole tensor has another shape, naming it", function()
    local code, out = run(("%s launch -n 2 %s %s checkpoint.load=%s checkpoint.ckpt_step=%d"):format(
      q(os.getenv("LUATRON")), BASE, layout(2, 1, "model.hidden_size=32"), q(dir .. "/tp2"), SAVED))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("model.safetensors: tensor 'embedding.word_embeddings.weight' has shape [256x64], this "
      .. "run expects [256x32]", 1, true), out)
  end)
end)

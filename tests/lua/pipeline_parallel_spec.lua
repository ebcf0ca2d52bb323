-- Pipeline parallelism proven by equivalence: PP = 2 and 4, PP = 2 with two virtual stages
-- (interleaved), PP = 2 x DP = 2, with tied and untied embeddings and dropout on, launched by
-- `luatron launch` and by mpirun, reproduce the single-rank run's losses and gradient norms; a
-- schedule written in Lua (GPipe) gives 1F1B's losses and holds more activations; a checkpoint
-- saved at PP = 2 resumes at PP = 1 and PP = 4; the log's bubble and point-to-point bytes and the
-- --trace file. Needs LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")

-- fp32: stages hand each other exact activations and gradients, so what differs from one rank is
-- the order of a few sums (the tied embedding's two gradients, the norm over stages, and with
-- DP the reduction): small differences, the largest printed at the end.
local RTOL = 1e-5

local json = require "luatron.json"
local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir, read_metrics = h.q, h.run, h.tmpdir, h.read_metrics

-- A small model, 20 steps, dropout on: 4 layers (1, 2 or 4 stages; 2 stages of 2 virtual
-- stages), global batch 16 in microbatches of 2: 8 microbatches per step on one data-parallel rank;
-- a validation every 10 steps and the parameters' norm at every step.
local STEPS = 20
local function recipe_args(dir, name, extra)
  return ("recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=16 train.micro_batch_size=2 "
    .. "model.num_layers=4 model.hidden_size=64 model.seq_length=64 dataset.sequence_length=64 "
    .. "model.hidden_dropout=0.1 model.attention_dropout=0.1 train.eval_interval=10 train.eval_iters=1 "
    .. "logger.log_interval=1 logger.log_params_norm=true "
    .. "scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 logger.metrics_file=%s %s")
    :format(STEPS, q(dir .. "/" .. name .. ".jsonl"), extra or "")
end

-- The training records of a run, with its validation losses by iteration in .validation.
local function metrics(dir, name)
  local rows = read_metrics(dir .. "/" .. name .. ".jsonl")
  rows.validation = {}
  for line in io.lines(dir .. "/" .. name .. ".jsonl") do
    local r = json.decode(line)
    if r.validation_loss then rows.validation[r.iteration] = r.validation_loss end
  end
  return rows
end

local function launch(n, dir, name, extra)
  local code, out = run(("%s launch -n %d --timeout 60 %s"):format(q(LUATRON), n, recipe_args(dir, name, extra)))
  assert.are.equal(0, code, out)
  return metrics(dir, name), out
end

-- Closeness within RTOL; the largest relative difference seen is printed at the end as a TAP comment (see
-- it with `bazel test //tests/lua:pipeline_parallel_spec --test_output=all`).
local assert_close = h.closeness(RTOL)

-- Every record of got (by iteration) has ref's loss, gradient norm and parameter norm, and every
-- validation of got ref's validation loss.
local function assert_equivalent(ref, got, label, count)
  assert.are.equal(count or #ref, #got, label .. ": number of steps")
  for _, r in ipairs(got) do
    local want = ref[r.iteration]
    assert_close(want.loss, r.loss, ("%s loss at iteration %d"):format(label, r.iteration))
    assert_close(want.grad_norm, r.grad_norm, ("%s grad norm at iteration %d"):format(label, r.iteration))
    if want.params_norm then
      assert_close(want.params_norm, r.params_norm, ("%s params norm at iteration %d"):format(label, r.iteration))
    end
  end
  for it, v in pairs(got.validation or {}) do
    assert_close(ref.validation[it], v, ("%s validation loss at iteration %d"):format(label, it))
  end
end

local UNTIED = "model.share_embeddings_and_output_weights=false"

describe("pipeline parallelism", function()
  assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
  local dir = tmpdir()
  local ref, ref_untied

  teardown(function() print(("# largest relative difference from the single rank: %.2g"):format(assert_close.worst())) end)

  setup(function()
    local code, out = run(("%s run %s"):format(q(LUATRON), recipe_args(dir, "single")))
    assert(code == 0, out)
    ref = metrics(dir, "single")
    code, out = run(("%s run %s"):format(q(LUATRON), recipe_args(dir, "single_untied", UNTIED)))
    assert(code == 0, out)
    ref_untied = metrics(dir, "single_untied")
  end)

  it("PP = 2 and 4 (1F1B) reproduce the single-rank losses and gradient norms, tied and untied", function()
    assert.are.equal(STEPS, #ref)
    assert.is_true(ref[STEPS].loss < ref[1].loss - 0.5, "the reference run learns")
    assert.is_number(ref.validation[10])
    assert.is_number(ref.validation[20])
    assert.is_true(math.abs(ref[STEPS].loss - ref_untied[STEPS].loss) > 1e-3, "tying changes the model")
    for _, pp in ipairs { 2, 4 } do
      local trace = dir .. "/trace" .. pp .. ".json"
      local m, out = launch(pp, dir, "pp" .. pp, "model.pipeline_model_parallel_size=" .. pp .. " --trace=" .. q(trace))
      assert.truthy(out:find("this rank: GPTChunk(layers=[0, " .. 4 // pp .. ") of 4", 1, true), out)
      assert_equivalent(ref, m, "PP=" .. pp)
      for _, r in ipairs(m) do
        -- rank 0 sends each microbatch's activation once: 8 x [64, 2, 64] fp32
        assert.are.equal(8 * 64 * 2 * 64 * 4, r.p2p_expected_bytes)
        assert.are.equal(r.p2p_expected_bytes, r.p2p_bytes_per_step)
        assert.are.equal((pp - 1) / 8, r.pipeline_bubble_formula)
        assert.is_true(r.pipeline_bubble >= 0)
      end
      -- the trace: a row per rank, every rank's forward and backward of every microbatch at every step
      local events = json.decode(assert(io.open(trace)):read("a")).traceEvents
      local count = {}
      for _, e in ipairs(events) do
        if e.ph == "X" and e.cat ~= "recv" then count[e.pid] = (count[e.pid] or 0) + 1 end
        if e.ph == "X" then assert.is_true(e.dur >= 0 and e.ts >= 0, e.name) end
      end
      for rank = 0, pp - 1 do assert.are.equal(STEPS * 2 * 8, count[rank], "steps of rank " .. rank) end
      m = launch(pp, dir, "pp_untied" .. pp, "model.pipeline_model_parallel_size=" .. pp .. " " .. UNTIED)
      assert_equivalent(ref_untied, m, "PP=" .. pp .. " untied")
    end
  end)

  it("PP = 2 with two virtual stages (interleaved) reproduces them", function()
    local extra = "model.pipeline_model_parallel_size=2 model.virtual_pipeline_model_parallel_size=2 "
      .. "model.overlap_p2p_comm=true"
    assert_equivalent(ref, launch(2, dir, "vpp", extra), "PP=2 VPP=2")
    assert_equivalent(ref_untied, launch(2, dir, "vpp_untied", extra .. " " .. UNTIED), "PP=2 VPP=2 untied")
    -- Megatron's rule: at PP = 2 the interleaved schedule needs overlap_p2p_comm
    local code, out = run(("%s launch -n 2 %s"):format(q(LUATRON), recipe_args(dir, "refused",
      "model.pipeline_model_parallel_size=2 model.virtual_pipeline_model_parallel_size=2")))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("Set overlap_p2p_comm = true", 1, true), out)
  end)

  it("PP = 2 x DP = 2 reproduces them, with DDP and with the distributed optimizer", function()
    assert_equivalent(ref, launch(4, dir, "pp2dp2", "model.pipeline_model_parallel_size=2 "
      .. "ddp.overlap_grad_reduce=true ddp.bucket_size=20000"), "PP=2 DP=2 DDP overlapped")
    assert_equivalent(ref_untied, launch(4, dir, "pp2dp2_distopt", "model.pipeline_model_parallel_size=2 "
      .. "ddp.use_distributed_optimizer=true ddp.overlap_grad_reduce=true " .. UNTIED), "PP=2 DP=2 distopt untied")
    assert_equivalent(ref, launch(4, dir, "pp2dp2_mapped", "model.pipeline_model_parallel_size=2 "
      .. "ddp.use_distributed_optimizer=true ddp.overlap_grad_reduce=true dist.use_tp_pp_dp_mapping=true"),
      "PP=2 DP=2 distopt, tp-pp-dp order")
  end)

  it("runs under mpirun (PMIx) with the same results: PP = 2 x DP = 2", function()
    local code, out = run("command -v mpirun")
    if code ~= 0 then
      pending("mpirun is not installed (Debian's openmpi-bin)")
      return
    end
    code, out = run(("mpirun --allow-run-as-root --oversubscribe -n 4 %s run %s"):format(q(LUATRON),
      recipe_args(dir, "mpirun", "model.pipeline_model_parallel_size=2")))
    assert.are.equal(0, code, out)
    assert_equivalent(ref, metrics(dir, "mpirun"), "mpirun PP=2 DP=2")
  end)

  it("a schedule written in Lua (GPipe) gives 1F1B's losses and holds every microbatch's activations", function()
    -- recipes/custom_schedule.lua as it is, and with the default schedule instead of its own
    local recipe = assert(io.open("recipes/custom_schedule.lua")):read("a")
    local one_f_one_b = recipe:gsub("{ schedule = gpipe }", "{ schedule = '1f1b' }")
    assert.are_not.equal(recipe, one_f_one_b)
    h.write(dir .. "/one_f_one_b.lua", one_f_one_b)
    local function train(path, name)
      local code, out = run(("%s launch -n 2 %s logger.log_interval=1 logger.metrics_file=%s"):format(q(LUATRON),
        q(path), q(dir .. "/" .. name .. ".jsonl")))
      assert.are.equal(0, code, out)
      return read_metrics(dir .. "/" .. name .. ".jsonl")
    end
    local gpipe, ofob = train("recipes/custom_schedule.lua", "gpipe"), train(dir .. "/one_f_one_b.lua", "1f1b")
    assert_equivalent(ofob, gpipe, "GPipe")
    -- rank 0 holds 8 microbatches' activations under GPipe, at most 2 (PP) under 1F1B
    assert.is_true(gpipe[1].peak_memory_mib > ofob[1].peak_memory_mib + 0.5,
      ("peak memory: GPipe %.2f MiB, 1F1B %.2f MiB"):format(gpipe[1].peak_memory_mib, ofob[1].peak_memory_mib))
  end)

  it("a schedule that would deadlock is refused before training, naming the steps and ranks", function()
    local recipe = assert(io.open("recipes/custom_schedule.lua")):read("a")
    -- stage 0 wants each microbatch's gradient before it sends the next one forward
    local eager = recipe:gsub("local function gpipe%(s%)", [[local function gpipe(s)
  if s.rank == 0 then
    for m = 0, s.num_microbatches - 1 do s.forward(m); s.backward(m) end
    return
  end]])
    h.write(dir .. "/eager.lua", eager)
    local code, out = run(("%s launch -n 2 %s"):format(q(LUATRON), q(dir .. "/eager.lua")))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("pipeline schedule 'custom' would deadlock: rank 0 at step 2 (B 0 0) waits to receive "
      .. "the gradient of microbatch 0 for stage 0 from rank 1", 1, true), out)
    assert.is_nil(out:find("iteration", 1, true), out)
  end)

  it("a checkpoint saved at PP = 2 resumes at PP = 1 and PP = 4 with the uninterrupted run's losses", function()
    local ck = dir .. "/ck"
    launch(2, dir, "save_pp2", ("model.pipeline_model_parallel_size=2 checkpoint.save=%s train.exit_interval=10")
      :format(q(ck)))
    assert.truthy(io.open(ck .. "/iter_0000010/model_pp1.safetensors"), "a model file per stage")
    for _, pp in ipairs { 1, 4 } do
      local name = "resume_pp" .. pp
      local code, out = run(("%s launch -n %d --timeout 60 %s"):format(q(LUATRON), pp, recipe_args(dir, name,
        ("model.pipeline_model_parallel_size=%d checkpoint.load=%s"):format(pp, q(ck)))))
      assert.are.equal(0, code, out)
      assert.truthy(out:find("resumed from", 1, true), out)
      assert_equivalent(ref, metrics(dir, name), name, STEPS - 10)
    end
  end)
end)

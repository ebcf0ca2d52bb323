-- The checkpoint and run-control fields of Megatron, end to end through the luatron command:
-- ckpt_step, most_recent_k, finetune, load_optim, save_optim, pretrained_checkpoint,
-- exit_on_missing_checkpoint, the scheduler check on resume (override / use_checkpoint),
-- exit_signal_handler, skip_train, save_config_filepath and log_params_norm.
-- Needs LUATRON (the binary); tests/lua/BUILD provides it under Bazel.
local json = require "luatron.json"

local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, read_metrics, luatron = h.q, h.tmpdir, h.read_metrics, h.luatron

-- A small, fast version of the tiny recipe, its metrics in dir; warmup 2 of 8 iterations.
local function run(dir, extra)
  return luatron(("run recipes/gpt_tiny.lua model.num_layers=2 model.hidden_size=64 train.train_iters=8 "
    .. "train.eval_interval=1000 logger.log_interval=1 scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=2 "
    .. "logger.metrics_file=%s %s")
    :format(q(dir .. "/metrics.jsonl"), extra or ""))
end

local function ok(code, out) assert.are.equal(0, code, out) return out end

-- fails({ "text", ... }, run(...)): the run failed with every text in its output.
local function fails(texts, code, out)
  assert.are.equal(1, code, out)
  for _, s in ipairs(texts) do assert.truthy(out:find(s, 1, true), "expected '" .. s .. "' in:\n" .. out) end
  return out
end

-- metrics by iteration
local function by_iteration(dir)
  local t = {}
  for _, r in ipairs(read_metrics(dir .. "/metrics.jsonl")) do t[r.iteration] = r end
  return t
end

local function iterations_in(root)
  local its = {}
  local p = io.popen("ls -1 " .. q(root))
  for name in p:lines() do its[#its + 1] = name:match("^iter_(%d+)$") and tonumber(name:match("%d+")) end
  p:close()
  table.sort(its)
  return its
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

describe("checkpoint fields", function()
  -- One uninterrupted run, saving every 2 iterations, is the reference for the others.
  local ref, ck
  setup(function()
    ref = tmpdir()
    ck = ref .. "/ckpt"
    ok(run(ref, "checkpoint.save_interval=2 checkpoint.save=" .. q(ck)))
  end)

  it("ckpt_step resumes from that iteration with the uninterrupted run's losses", function()
    local dir = tmpdir()
    local out = ok(run(dir, "checkpoint.load=" .. q(ck) .. " checkpoint.ckpt_step=4 checkpoint.save=" .. q(dir .. "/c")))
    assert.truthy(out:find("resumed from " .. ck .. "/iter_0000004", 1, true), out)
    local a, b = by_iteration(ref), by_iteration(dir)
    assert.is_nil(b[4])
    for it = 5, 8 do assert.are.equal(a[it].loss, b[it].loss, "loss at iteration " .. it) end
    fails({ "checkpoint.ckpt_step = 3: " .. ck .. " holds no checkpoint of that iteration (it has 2, 4, 6, 8)" },
      run(dir, "checkpoint.load=" .. q(ck) .. " checkpoint.ckpt_step=3"))
  end)

  it("most_recent_k keeps the newest k checkpoints", function()
    local dir = tmpdir()
    ok(run(dir, "checkpoint.save_interval=2 checkpoint.most_recent_k=2 checkpoint.save=" .. q(dir .. "/c")))
    assert.are.same({ 6, 8 }, iterations_in(dir .. "/c"))
    assert.are.same({ 2, 4, 6, 8 }, iterations_in(ck))
  end)

  it("finetune loads the weights only and starts at iteration 0", function()
    local dir, scratch = tmpdir(), tmpdir()
    local out = ok(run(dir, "train.train_iters=3 checkpoint.finetune=true checkpoint.load=" .. q(ck)))
    assert.truthy(out:find("loaded the model weights of " .. ck .. "/iter_0000008 (fine-tuning", 1, true), out)
    ok(run(scratch, "train.train_iters=3"))
    local f, s = by_iteration(dir), by_iteration(scratch)
    assert.truthy(f[1] and f[2], "iterations 1 and 2 were trained")
    assert.are.equal(s[1].lr, f[1].lr) -- a new schedule
    assert.is_true(f[1].loss < s[1].loss - 0.5, ("trained weights: %.3f vs %.3f"):format(f[1].loss, s[1].loss))
  end)

  it("load_optim = false keeps the iteration and starts the optimizer and its schedule afresh", function()
    local dir = tmpdir()
    local out = ok(run(dir, "train.train_iters=10 checkpoint.load_optim=false checkpoint.load=" .. q(ck)))
    assert.truthy(out:find("optimizer state not loaded", 1, true), out)
    local a, b = by_iteration(ref), by_iteration(dir)
    assert.is_nil(b[8])
    assert.truthy(b[9] and b[10])
    assert.are.equal(a[1].lr, b[9].lr) -- warmup again, as Megatron without the scheduler's state
    assert.are.equal(a[2].lr, b[10].lr)
  end)

  it("save_optim = false writes the model only; resuming then needs load_optim = false", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    ok(run(dir, "train.train_iters=3 checkpoint.save_optim=false checkpoint.save=" .. q(c)))
    assert.is_true(exists(c .. "/iter_0000003/model.safetensors"))
    assert.is_false(exists(c .. "/iter_0000003/optimizer.safetensors"))
    fails({ "holds no optimizer state (saved with checkpoint.save_optim = false)", "set checkpoint.load_optim = false" },
      run(dir, "checkpoint.save=" .. q(c)))
    ok(run(dir, "train.train_iters=3 checkpoint.load_optim=false checkpoint.save=" .. q(c)))
  end)

  it("pretrained_checkpoint starts a fine-tuning run; once save holds a checkpoint, that is resumed", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    local out = ok(run(dir, "train.train_iters=3 checkpoint.pretrained_checkpoint=" .. q(ck) .. " checkpoint.save="
      .. q(c)))
    assert.truthy(out:find("loaded the model weights of " .. ck, 1, true), out)
    out = ok(run(dir, "train.train_iters=3 checkpoint.pretrained_checkpoint=" .. q(ck) .. " checkpoint.save="
      .. q(c)))
    assert.truthy(out:find("resumed from " .. c .. "/iter_0000003", 1, true), out)
    fails({ "checkpoint.pretrained_checkpoint = " .. dir .. "/none holds no checkpoint" },
      run(dir, "checkpoint.pretrained_checkpoint=" .. q(dir .. "/none")))
  end)

  it("exit_on_missing_checkpoint makes a missing load folder an error; without it training starts afresh", function()
    local dir = tmpdir()
    fails({ "checkpoint.load = " .. dir .. "/none holds no checkpoint and checkpoint.exit_on_missing_checkpoint = true" },
      run(dir, "checkpoint.exit_on_missing_checkpoint=true checkpoint.load=" .. q(dir .. "/none")))
    assert.are.equal(0, #read_metrics(dir .. "/metrics.jsonl"))
    local out = ok(run(dir, "train.train_iters=1 scheduler.lr_warmup_iters=0 checkpoint.load=" .. q(dir .. "/none")))
    assert.truthy(out:find("no checkpoint in " .. dir .. "/none: starting from scratch", 1, true), out)
  end)

  it("a resumed run keeps the checkpoint's schedule unless told which to use", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    ok(run(dir, "train.train_iters=4 checkpoint.save=" .. q(c)))
    fails({ "was trained with total number of iterations (in samples) 64, this run has 128",
      "scheduler.override_opt_param_scheduler = true" }, run(dir, "checkpoint.save=" .. q(c)))
    -- the checkpoint's schedule: the lr continues as in a 4-iteration run (min_lr after its end)
    local other = tmpdir()
    local out = ok(run(other, "train.train_iters=6 scheduler.use_checkpoint_opt_param_scheduler=true "
      .. "checkpoint.load=" .. q(c)))
    assert.truthy(out:find("using the checkpoint's learning-rate schedule", 1, true), out)
    assert.are.equal(3e-4, by_iteration(other)[5].lr)
    ok(run(dir, "train.train_iters=6 scheduler.override_opt_param_scheduler=true checkpoint.save=" .. q(c)))
    local m = by_iteration(dir)
    assert.truthy(m[5].lr > 3e-4, "this run's 6-iteration schedule: " .. m[5].lr)
  end)
end)

describe("run control", function()
  it("exit_signal_handler: SIGTERM saves a checkpoint at the end of the step and exits 0", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    local cmd = ("%s run recipes/gpt_tiny.lua model.num_layers=2 model.hidden_size=64 train.train_iters=100000 "
      .. "logger.log_interval=1 train.exit_signal_handler=true logger.metrics_file=%s checkpoint.save=%s"):format(
      q(h.luatron_bin()), q(dir .. "/metrics.jsonl"), q(c))
    -- start it, wait for two logged steps (at most 120 s), send SIGTERM, wait for the exit
    local code, out = h.run(("%s > %s 2>&1 & pid=$!; for i in $(seq 600); do "
      .. "n=$(grep -c loss %s 2>/dev/null); [ \"${n:-0}\" -ge 2 ] && break; sleep 0.2; done; kill -TERM $pid; "
      .. "wait $pid; "
      .. "rc=$?; cat %s; [ $rc -eq 0 ]"):format(cmd, q(dir .. "/log"), q(dir .. "/metrics.jsonl"), q(dir .. "/log")))
    assert.are.equal(0, code, out)
    local it = tonumber(out:match("exiting at iteration (%d+) %(SIGTERM received: train.exit_signal_handler%)"))
    assert.truthy(it, out)
    assert.is_true(exists(("%s/iter_%07d/model.safetensors"):format(c, it)), out)
  end)

  it("skip_train evaluates the loaded model and trains nothing", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    ok(run(dir, "train.train_iters=3 checkpoint.save=" .. q(c)))
    local out = ok(run(dir, "train.train_iters=3 train.skip_train=true train.eval_interval=1 train.eval_iters=1 "
      .. "checkpoint.save=" .. q(c)))
    assert.truthy(out:find("validation at iteration 3 | loss", 1, true), out)
    assert.is_nil(out:find("iteration      4", 1, true), out)
    assert.are.same({ 3 }, iterations_in(c))
  end)

  it("save_config_filepath writes the run's config; log_params_norm logs the weights' norm", function()
    local dir = tmpdir()
    ok(run(dir, "train.train_iters=3 logger.log_params_norm=true logger.save_config_filepath=" .. q(dir .. "/c.json")))
    local f = assert(io.open(dir .. "/c.json"))
    local saved = json.decode(f:read("a"))
    f:close()
    assert.are.equal(64, saved.model.hidden_size)
    assert.is_true(saved.logger.log_params_norm)
    local m = by_iteration(dir)
    assert.is_number(m[1].params_norm)
    assert.are_not.equal(m[1].params_norm, m[2].params_norm) -- the weights moved
    ok(run(dir, "train.train_iters=1 scheduler.lr_warmup_iters=0"))
    assert.is_nil(by_iteration(dir)[1].params_norm)
  end)
end)

describe("resuming", function()
  it("keeps each iteration once in metrics.jsonl, and says when there is nothing left to do", function()
    local dir = tmpdir()
    local c = dir .. "/c"
    ok(run(dir, "checkpoint.save_interval=4 checkpoint.save=" .. q(c)))
    -- as if the run had died after iteration 8 with its last checkpoint at 4
    assert(os.execute(("rm -rf %s/iter_0000008 && echo 4 > %s/latest_checkpointed_iteration.txt"):format(q(c), q(c))))
    ok(run(dir, "checkpoint.save=" .. q(c)))
    local seen = {}
    for _, r in ipairs(read_metrics(dir .. "/metrics.jsonl")) do
      assert.is_nil(seen[r.iteration], "iteration " .. r.iteration .. " twice")
      seen[r.iteration] = true
    end
    for it = 1, 8 do assert.is_true(seen[it], "iteration " .. it) end
    local out = ok(run(dir, "checkpoint.save=" .. q(c)))
    assert.truthy(out:find("nothing to do: the checkpoint is at iteration 8 and train.train_iters = 8", 1, true), out)
  end)
end)

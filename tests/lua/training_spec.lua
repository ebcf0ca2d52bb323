-- Specs for training with the engine: a loop written by hand from the pieces (as
-- recipes/custom_loop.lua) and luatron.training's pretrain(config, overrides).
local lt = require "luatron"
local core = lt.core

local h = dofile("tests/lua/helpers.lua")
local msg_of, assert_error_contains = h.msg_of, h.assert_error_contains

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

-- Runs f with io.stdout redirected to a temporary file; returns f's results and the text written.
local function capture_stdout(f)
  local path = os.tmpname()
  local file = assert(io.open(path, "w"))
  local saved = io.stdout
  io.stdout = file
  local res = table.pack(pcall(f))
  io.stdout = saved
  file:close()
  local rf = assert(io.open(path, "r"))
  local text = rf:read("a")
  rf:close()
  os.remove(path)
  if not res[1] then error(res[2], 0) end
  return text, table.unpack(res, 2, res.n)
end

describe("a training loop written from the pieces", function()
  it("lowers the loss on mock data within 30 steps", function()
    local provider = lt.GPTModelProvider {
      num_layers = 2, hidden_size = 64, num_attention_heads = 4, seq_length = 32, vocab_size = 128,
      normalization = "RMSNorm", activation = "swiglu", position_embedding_type = "rope",
      add_bias_linear = false, hidden_dropout = 0.0, attention_dropout = 0.0,
    }
    local opt_cfg = lt.OptimizerConfig { lr = 1e-2, min_lr = 1e-3, weight_decay = 0.0 }
    local sched_cfg = lt.SchedulerConfig { lr_warmup_iters = 3, lr_decay_style = "cosine" }
    local model = lt.build_model(provider, 42)
    local optimizer = lt.optimizer(model, opt_cfg)
    local data = core.dataset { seq_length = provider.seq_length, vocab_size = 128, seed = 42 }
    local steps, batch_size = 30, 8
    local losses = {}
    for step = 0, steps - 1 do
      local lr = lt.scheduler.lr_at(step, opt_cfg, sched_cfg, steps)
      model:zero_grad()
      local batch <close> = data:batch(step * batch_size, batch_size)
      local ctx, loss, valid = model:forward(batch)
      assert.are.equal(batch_size * provider.seq_length, valid)
      model:backward(ctx, 1 / valid)
      local norm = core.clip_grad_norm(model:flat_grads(), 1.0)
      assert(finite(norm) and norm > 0, "gradient norm " .. tostring(norm))
      optimizer:step(lr)
      losses[#losses + 1] = loss
    end
    assert.are.equal(steps, optimizer:num_steps())
    local first, last = losses[1], losses[#losses]
    assert(math.abs(first - math.log(128)) < 0.5, "initial loss " .. first)
    -- the mean of the last 5 steps, so one noisy batch does not decide
    local tail = 0
    for i = steps - 4, steps do tail = tail + losses[i] end
    tail = tail / 5
    assert(first - tail > 0.5, ("loss %.4f -> %.4f (last 5 mean), not lowered by 0.5"):format(first, tail))
    assert(finite(last), "final loss " .. tostring(last))
  end)
end)

describe("luatron.training.pretrain", function()
  local function tiny(over)
    local cfg = lt.ConfigContainer {
      model = lt.GPTModelProvider {
        num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 16, vocab_size = 256,
        hidden_dropout = 0.0, attention_dropout = 0.0,
      },
      train = lt.TrainingConfig { train_iters = 3, global_batch_size = 4, micro_batch_size = 2, eval_iters = 0 },
      optimizer = lt.OptimizerConfig { lr = 3e-3, min_lr = 3e-4, clip_grad = 1.0 },
      scheduler = lt.SchedulerConfig { lr_warmup_iters = 2, lr_decay_style = "cosine" },
      logger = lt.LoggerConfig { log_interval = 5 },
      rng = lt.RNGConfig { seed = 7 },
    }
    for group, fields in pairs(over or {}) do
      for k, v in pairs(fields) do cfg[group][k] = v end
    end
    return cfg
  end

  it("trains train_iters steps with the overrides applied and returns a finite loss", function()
    local cfg = tiny()
    local out, result = capture_stdout(function()
      return lt.training.pretrain(cfg, { "train.train_iters=10", "optimizer.lr=0.002" })
    end)
    assert.are.equal(10, result.iteration)
    assert(type(result.loss) == "number" and finite(result.loss), "loss " .. tostring(result.loss))
    assert(result.loss > 0 and result.loss < math.log(256) + 0.5, "loss " .. result.loss)
    assert.are.equal(10, cfg.train.train_iters) -- the overrides change the config object
    assert.are.equal(0.002, cfg.optimizer.lr)
    assert.are.equal(0.002, result.run.r.optimizer.lr)
    assert.are.equal(10, result.run.optimizer:num_steps())
    assert.are.equal(40, result.run.state.consumed_samples)
    assert(out:find("iteration     10/10", 1, true), "no log line for iteration 10 in:\n" .. out)
    assert(out:find("iteration      5/10", 1, true), "no log line for iteration 5 in:\n" .. out)
  end)

  it("is deterministic: the same config gives the same loss", function()
    local _, a = capture_stdout(function() return lt.pretrain(tiny(), { "train.train_iters=4" }) end)
    local _, b = capture_stdout(function() return lt.pretrain(tiny(), { "train.train_iters=4" }) end)
    assert.are.equal(4, a.iteration)
    assert.are.equal(a.loss, b.loss)
    local _, c = capture_stdout(function() return lt.pretrain(tiny(), { "train.train_iters=4", "rng.seed=8" }) end)
    assert.are_not.equal(a.loss, c.loss)
  end)

  it("validates on Megatron's validation samples: the n-th evaluation reads the n-th eval_iters batches", function()
    local cfg = lt.ConfigContainer {
      model = { num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 16, vocab_size = 256 },
      train = { train_iters = 7, global_batch_size = 4, micro_batch_size = 2, eval_iters = 3, eval_interval = 2 },
      optimizer = { lr = 1e-3 },
    }
    local run = lt.training.setup(cfg)
    assert.are.equal((7 // 2 + 1) * 3 * 4, run.valid_data:size()) -- Megatron's count of validation samples
    local first, again, second = lt.training.evaluate(run, 0), lt.training.evaluate(run, 0), lt.training.evaluate(run, 1)
    assert.are.equal(first, again)
    assert.are_not.equal(first, second)
    run.state.iteration = 4 -- the evaluation at iteration 4 is the run's second
    assert.are.equal(second, lt.training.evaluate(run))
  end)

  it("accepts a plain table of groups", function()
    local _, r = capture_stdout(function()
      return lt.pretrain({
        model = { num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 16, vocab_size = 256 },
        train = { train_iters = 2, global_batch_size = 2, micro_batch_size = 2, eval_iters = 0 },
        optimizer = { lr = 1e-3 },
      })
    end)
    assert.are.equal(2, r.iteration)
    assert(finite(r.loss), "loss " .. tostring(r.loss))
  end)

  it("rejects overrides naming an unknown group or field, or a bad value", function()
    assert_error_contains(function() lt.pretrain(tiny(), { "bogus.train_iters=10" }) end,
      'override "bogus.train_iters=10"', "ConfigContainer: unknown field 'bogus'")
    assert_error_contains(function() lt.pretrain(tiny(), { "trian.train_iters=10" }) end,
      'override "trian.train_iters=10"', "unknown field 'trian' (did you mean 'train'?)")
    assert_error_contains(function() lt.pretrain(tiny(), { "train.train_iter=10" }) end,
      'override "train.train_iter=10"', "unknown field 'train_iter'", "train_iters")
    assert_error_contains(function() lt.pretrain(tiny(), { "train.train_iters=-3" }) end,
      "train_iters = -3", "positive")
  end)

  it("apply_overrides parses values; any other argument is an error that says what was meant", function()
    local cfg = tiny()
    assert.is_false(lt.training.apply_overrides(cfg, {
      "train.train_iters=12", "optimizer.clip_grad=0.5", "logger.log_interval=3", "dataset.mock=true",
      "mixed_precision=bf16_mixed",
    }))
    assert.are.equal("bf16_mixed", cfg.mixed_precision)
    assert.are.equal(12, cfg.train.train_iters)
    assert.are.equal("integer", math.type(cfg.train.train_iters))
    assert.are.equal(0.5, cfg.optimizer.clip_grad)
    assert.are.equal(3, cfg.logger.log_interval)
    assert.is_true(cfg.dataset.mock)
    assert.is_true(lt.training.apply_overrides(cfg, { "--help" }))
    assert_error_contains(function() lt.training.apply_overrides(cfg, { [0] = "r.lua", "--train_iters", "5" }) end,
      'argument "--train_iters" is not an override', "(did you mean train.train_iters=5?)",
      "`luatron run r.lua --help` lists the fields")
    assert_error_contains(function() lt.training.apply_overrides(cfg, { "--lr=0.1" }) end,
      "(did you mean optimizer.lr=0.1?)")
    assert_error_contains(function() lt.training.apply_overrides(cfg, { "seed=3" }) end,
      'override "seed=3": give the group of \'seed\' as group.field=value (rng.seed=3)')
    assert_error_contains(function() lt.pretrain(tiny(), { "extra" }) end, 'argument "extra" is not an override')
    -- a recipe with arguments of its own hands pretrain the overrides only
    local ours, mine = lt.overrides.split { [0] = "r.lua", "train.train_iters=3", "--mine", "x", "--help" }
    assert.are.same({ [0] = "r.lua", "train.train_iters=3", "--help" }, ours)
    assert.are.same({ "--mine", "x" }, mine)
  end)
end)

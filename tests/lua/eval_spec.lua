-- Evaluation runs the model in eval mode, without dropout, as Megatron's model.eval():
--   1. model:forward without a dropout seed (or nil) is eval mode: the same loss, bit for bit, as
--      the same weights configured without dropout, while any seed, 0 included, drops; chunks alike;
--   2. a run with dropout on reports the validation loss of its weights without dropout (bit for
--      bit: its checkpoint evaluated with dropout 0), and with 2 pipeline stages the same (to the
--      float32 rounding of the sum over stages).
-- Needs LUATRON (tests/lua/BUILD provides it).
local lt = require "luatron"
local model_lib = require "luatron.model"
local json = require "luatron.json"

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir = h.q, h.run, h.tmpdir

local function provider(dropout)
  return lt.GPTModelProvider { num_layers = 4, hidden_size = 16, num_attention_heads = 4, seq_length = 8,
    vocab_size = 64, hidden_dropout = dropout, attention_dropout = dropout }
end

-- int32 tokens and targets [3, 8], every 5th target ignored.
local function microbatch()
  local tok, tgt = {}, {}
  for b = 1, 3 do
    tok[b], tgt[b] = {}, {}
    for t = 1, 8 do
      local i = (b - 1) * 8 + t
      tok[b][t], tgt[b][t] = (i * 7 + 3) % 64, i % 5 == 0 and -1 or (i * 11 + 5) % 64
    end
  end
  return lt.tensor.from(tok, "int32"), lt.tensor.from(tgt, "int32")
end

local function loss_of(model, ...)
  local ctx, loss = model:forward(...)
  ctx:release()
  return loss
end

-- Per-token losses of 2 chunks (2 pipeline stages) as a Lua list; seed nil: eval mode.
local function chunk_losses(chunks, tokens, targets, seed)
  local hid, c1 = chunks[1]:forward(tokens, targets, seed)
  local losses, c2 = chunks[2]:forward(hid, targets, seed)
  c1:release()
  c2:release()
  hid:free()
  local host <close> = losses:to_host()
  losses:free()
  return host:reshape({ host:numel() }):to_table()
end

local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

describe("eval mode", function()
  it("model:forward without a seed runs without dropout; any seed, 0 included, drops", function()
    local with, without = model_lib.build(provider(0.1), 7), model_lib.build(provider(0), 7)
    local tokens, targets = microbatch()
    local want = loss_of(without, tokens, targets, 0)
    assert.are.equal(want, loss_of(with, tokens, targets))      -- no seed
    assert.are.equal(want, loss_of(with, tokens, targets, nil)) -- nil
    local cat = {} -- the [B, T+1] form: inputs then the shifted target
    for b = 1, 3 do
      cat[b] = {}
      for t = 1, 8 do cat[b][t] = tokens:get(b, t) end
      cat[b][9] = 1
    end
    local batch = lt.tensor.from(cat, "int32")
    assert.are.equal(loss_of(without, batch, 0), loss_of(with, batch))
    local dropped = loss_of(with, tokens, targets, 0)
    assert.are_not.equal(want, dropped, "seed 0 is a training seed: dropout is on")
    assert.are_not.equal(dropped, loss_of(with, tokens, targets, 1))
  end)

  it("chunk:forward without a seed runs without dropout through a pipeline split", function()
    local with, without = {}, {}
    for r = 0, 1 do
      with[r + 1] = model_lib.build_chunks(provider(0.1), model_lib.chunk_layers(provider(0.1), 2, 1, r), 7)[1]
      without[r + 1] = model_lib.build_chunks(provider(0), model_lib.chunk_layers(provider(0), 2, 1, r), 7)[1]
    end
    local tokens, targets = microbatch()
    local want = chunk_losses(without, tokens, targets, 5)
    assert.is_true(same_list(want, chunk_losses(with, tokens, targets, nil)), "eval mode through chunks")
    assert.is_false(same_list(want, chunk_losses(with, tokens, targets, 0)), "seed 0 drops through chunks")
  end)
end)

-- A small model, 2 steps of 8 microbatches, dropout on, a validation at iteration 2.
local ARGS = "recipes/gpt_tiny.lua train.train_iters=2 train.global_batch_size=16 train.micro_batch_size=2 "
  .. "model.num_layers=4 model.hidden_size=64 model.seq_length=64 dataset.sequence_length=64 "
  .. "model.hidden_dropout=0.1 model.attention_dropout=0.1 train.eval_iters=1 logger.log_interval=1 "

local function validation(path)
  local v
  for line in io.lines(path) do
    local r = json.decode(line)
    if r.validation_loss then v = r.validation_loss end
  end
  return v
end

describe("validation", function()
  local bin = h.luatron_bin()
  local dir = tmpdir()
  local function luatron(cmd, name, extra)
    local code, out = run(("%s %s %s logger.metrics_file=%s %s"):format(q(bin), cmd, ARGS,
      q(dir .. "/" .. name .. ".jsonl"), extra))
    assert.are.equal(0, code, out)
    return validation(dir .. "/" .. name .. ".jsonl")
  end
  -- skip_train evaluates the loaded checkpoint on window iteration // eval_interval of the validation
  -- samples (Megatron's consumed_valid_samples); eval_interval 3 makes that window 0, the one the
  -- run's own evaluation at iteration 2 read.
  local EVAL_CHECKPOINT = "train.skip_train=true train.eval_interval=3 checkpoint.load=" .. q(dir .. "/ck")
  local trained

  setup(function()
    trained = luatron("run", "trained", "train.eval_interval=2 checkpoint.save=" .. q(dir .. "/ck"))
  end)

  it("of a run with dropout is its weights' loss without dropout, bit for bit", function()
    assert.is_number(trained)
    local nodrop = luatron("run", "nodrop", EVAL_CHECKPOINT .. " model.hidden_dropout=0 model.attention_dropout=0")
    assert.are.equal(nodrop, trained)
    -- evaluating the checkpoint with dropout configured is eval mode too
    assert.are.equal(nodrop, luatron("run", "again", EVAL_CHECKPOINT))
  end)

  it("is the same with 2 pipeline stages", function()
    -- the same weights: equal but for the float32 rounding of the sum over stages (pretrain's
    -- sum_over_stages); dropout would move it by about 3e-3
    local pp2_eval = luatron("launch -n 2 --timeout 60", "pp2_eval", EVAL_CHECKPOINT .. " model.pipeline_model_parallel_size=2")
    assert.is_true(math.abs(pp2_eval - trained) <= 1e-6 * trained,
      ("PP=2 on the checkpoint %.9g vs one rank %.9g"):format(pp2_eval, trained))
    -- trained at PP = 2: the steps differ from one rank's by rounding (the tied embedding's two
    -- gradients are summed in another order), so the validation loss agrees to that rounding
    local pp2 = luatron("launch -n 2 --timeout 60", "pp2", "train.eval_interval=2 model.pipeline_model_parallel_size=2")
    assert.is_true(math.abs(pp2 - trained) <= 1e-5 * trained, ("PP=2 %.9g vs one rank %.9g"):format(pp2, trained))
  end)
end)

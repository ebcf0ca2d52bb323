-- Text generation: model:kv_cache / model:decode run the prompt once and then one token per call, each
-- attending to the cached keys and values; their logits equal a full forward's over the whole sequence
-- so far (the recompute the cache saves), for dense models (learned positions, LayerNorm, GELU; RoPE,
-- GQA, SwiGLU, RMSNorm, qk norms), an MoE model and bf16 mixed precision. model:generate's greedy output
-- is the full forward's argmax at every step; sampling is reproducible by seed, top_k = 1, top_p near 0
-- and temperature 0 are greedy, top_k keeps to the k best; eod stops; bad options are refused.
local lt = require "luatron"
local model_lib = require "luatron.model"

local h = dofile("tests/lua/helpers.lua")
local assert_error_contains = h.assert_error_contains

local V = 96

local function build(extra)
  local fields = {
    num_layers = 2, hidden_size = 32, num_attention_heads = 4, seq_length = 24, vocab_size = V,
    make_vocab_size_divisible_by = 32, hidden_dropout = 0.1, attention_dropout = 0.1, init_method_std = 0.2,
  }
  for k, v in pairs(extra or {}) do fields[k] = v end
  return model_lib.build(lt.GPTModelProvider(fields), 7)
end

-- The next-token logits after ids (0-based) by a full forward over all of them, eval mode.
local function full_logits(model, ids)
  local ctx = model:forward(lt.tensor.from({ ids }, "int32"), nil, nil) -- no targets, eval mode
  local logits = model:logits(ctx)
  ctx:release()
  local out = {}
  for v = 1, logits:shape()[3] do out[v] = logits:get(1, #ids, v) end
  return out
end

local function argmax(x, n)
  local best = 1
  for v = 2, n or #x do
    if x[v] > x[best] then best = v end
  end
  return best - 1
end

-- max |a - b| / max |a| over the first n values of a table and a tensor.
local function rel_diff(a, t, n)
  local scale, diff = 0, 0
  for v = 1, n do
    scale, diff = math.max(scale, math.abs(a[v])), math.max(diff, math.abs(a[v] - t:get(v)))
  end
  return diff / scale
end

local PROMPT = { 5, 17, 33, 2, 90, 41 }

describe("the key/value cache", function()
  for _, case in ipairs {
    { "learned positions, LayerNorm, GELU", {}, 1e-5 },
    { "RoPE, GQA, SwiGLU, RMSNorm, qk norms", { position_embedding_type = "rope", num_query_groups = 2,
      gated_linear_unit = true, activation_func = "silu", normalization = "RMSNorm", qk_layernorm = true, add_bias_linear = false }, 1e-5 },
    { "MoE layers (4 experts, top-2)", { num_moe_experts = 4, moe_router_topk = 2, moe_ffn_hidden_size = 24 }, 1e-5 },
    { "bf16", { bf16 = true }, 2e-2 },
  } do
    it(("decodes token by token as a full forward computes (%s)"):format(case[1]), function()
      local model = build(case[2])
      local cache = model:kv_cache(20)
      local ids = { table.unpack(PROMPT) }
      local logits = model:decode(cache, ids)
      for step = 1, 10 do
        local want = full_logits(model, ids)
        local d = rel_diff(want, logits, V)
        assert.is_true(d <= case[3], ("step %d: logits differ from the full forward by %.3g"):format(step, d))
        assert.are.equal(#ids, cache:length())
        local next = argmax(want, V)
        ids[#ids + 1] = next
        logits = model:decode(cache, { next })
      end
    end)
  end

  it("refuses to overflow, and a cache of another model", function()
    local model, other = build(), build()
    local cache = model:kv_cache(8)
    model:decode(cache, { 1, 2, 3, 4, 5, 6 })
    assert_error_contains(function() model:decode(cache, { 1, 2, 3 }) end, "3 more tokens do not fit the key/value cache: 6 of its 8 positions are taken")
    assert_error_contains(function() other:decode(cache, { 1 }) end, "cache belongs to another model")
    assert_error_contains(function() model:kv_cache(25) end, "1 to seq_length = 24")
    assert_error_contains(function() model:decode(model:kv_cache(4), { V + 40 }) end, "outside the vocabulary")
  end)
end)

describe("model:generate", function()
  local model = build()

  it("greedy: every new token is the full forward's argmax", function()
    local out = model:generate(PROMPT, { max_new_tokens = 12, temperature = 0, vocab = V })
    assert.are.equal(12, #out)
    local ids = { table.unpack(PROMPT) }
    for i, id in ipairs(out) do
      assert.are.equal(argmax(full_logits(model, ids), V), id, "token " .. i)
      ids[#ids + 1] = id
    end
  end)

  it("samples reproducibly by seed; top_k = 1, a tiny top_p and temperature 0 are greedy", function()
    local greedy = model:generate(PROMPT, { max_new_tokens = 10, temperature = 0, vocab = V })
    local a = model:generate(PROMPT, { max_new_tokens = 10, temperature = 1.5, seed = 3, vocab = V })
    local b = model:generate(PROMPT, { max_new_tokens = 10, temperature = 1.5, seed = 3, vocab = V })
    local c = model:generate(PROMPT, { max_new_tokens = 10, temperature = 1.5, seed = 4, vocab = V })
    assert.are.same(a, b)
    assert.are_not.same(a, c)
    assert.are_not.same(a, greedy)
    assert.are.same(greedy, model:generate(PROMPT, { max_new_tokens = 10, top_k = 1, vocab = V }))
    assert.are.same(greedy, model:generate(PROMPT, { max_new_tokens = 10, top_p = 1e-6, seed = 9, vocab = V }))
    for _, id in ipairs(model:generate(PROMPT, { max_new_tokens = 10, temperature = 2, seed = 5, vocab = 40 })) do
      assert.is_true(id >= 0 and id < 40, "id " .. id .. " outside vocab = 40")
    end
  end)

  it("top_k keeps to the k most likely tokens", function()
    local ids = { table.unpack(PROMPT) }
    local out = model:generate(PROMPT, { max_new_tokens = 8, temperature = 5, top_k = 3, seed = 11, vocab = V })
    for i, id in ipairs(out) do
      local logits = full_logits(model, ids)
      local above = 0
      for v = 1, V do
        if logits[v] > logits[id + 1] then above = above + 1 end
      end
      assert.is_true(above < 3, ("token %d: %d tokens more likely than the one drawn"):format(i, above))
      ids[#ids + 1] = id
    end
  end)

  it("stops at eod", function()
    local greedy = model:generate(PROMPT, { max_new_tokens = 10, temperature = 0, vocab = V })
    local out = model:generate(PROMPT, { max_new_tokens = 10, temperature = 0, vocab = V, eod = greedy[4] })
    local first = 1
    while greedy[first] ~= greedy[4] do first = first + 1 end
    assert.are.equal(first, #out)
  end)

  it("refuses what it cannot do", function()
    assert_error_contains(function() model:generate(PROMPT, { max_tokens = 3 }) end, "unknown option 'max_tokens'")
    assert_error_contains(function() model:generate(PROMPT, { max_new_tokens = 19 }) end, "exceed seq_length = 24")
    assert_error_contains(function() model:generate({}, { max_new_tokens = 1 }) end, "at least one token")
    assert_error_contains(function() model:generate(PROMPT, { top_p = 2 }) end, "top_p must be in [0, 1]")
    assert_error_contains(function() model:generate(PROMPT, { vocab = 200 }) end, "vocab must be 1 .. 96")
  end)
end)

describe("luatron generate", function()
  local LUATRON = os.getenv("LUATRON")
  local dir = h.tmpdir()
  local run = dir .. "/run"
  local code, out = h.run(("%s run recipes/gpt_tiny.lua train.train_iters=4 train.global_batch_size=4 "
    .. "train.micro_batch_size=2 model.num_layers=2 model.hidden_size=32 model.num_attention_heads=4 "
    .. "model.seq_length=32 dataset.sequence_length=32 train.eval_iters=0 checkpoint.save=%s checkpoint.save_interval=4")
    :format(h.q(LUATRON), h.q(run)))
  assert(code == 0, out)

  it("continues a prompt with the saved model and tokenizer, as model:generate does in process", function()
    local generate = require "luatron.generate"
    local model, tok = generate.open(run)
    local prompt = "Once upon"
    local want = model:generate(tok:encode(prompt), { max_new_tokens = 12, temperature = 0, eod = tok.eod,
      vocab = 256 }) -- the tiny recipe's model: the mock dataset's 256 ids, the byte tokenizer's 257
    if want[#want] == tok.eod then want[#want] = nil end
    local c, text = h.run(("%s generate --load %s --prompt %s --max-new-tokens 12 --temperature 0"):format(
      h.q(LUATRON), h.q(run), h.q(prompt)))
    assert.are.equal(0, c, text)
    assert.are.equal(prompt .. tok:decode(want) .. "\n", text)
    local c2, sampled = h.run(("%s generate --load %s --prompt %s --max-new-tokens 12 --seed 5 --top-k 20"):format(
      h.q(LUATRON), h.q(run), h.q(prompt)))
    assert.are.equal(0, c2, sampled)
    assert.are.equal(prompt, sampled:sub(1, #prompt))
  end)

  it("says what is wrong with its arguments", function()
    for _, case in ipairs {
      { "--prompt hi", "--load is required" },
      { "--load " .. h.q(run) .. " --prompt hi --topk 3", "unknown option '--topk'" },
      { "--load " .. h.q(run) .. " --prompt hi --max-new-tokens 2.5", "--max-new-tokens takes an integer" },
      { "--load " .. h.q(dir .. "/none") .. " --prompt hi", "holds no checkpoint" },
      { "--load " .. h.q(run) .. " --prompt hi --max-new-tokens 40", "exceed seq_length = 32" },
    } do
      local c, text = h.run(("%s generate %s"):format(h.q(LUATRON), case[1]))
      assert.are_not.equal(0, c)
      assert.is_truthy(text:find(case[2], 1, true), text)
    end
    local c, text = h.run(("%s generate --help"):format(h.q(LUATRON)))
    assert.are.equal(0, c)
    assert.is_truthy(text:find("usage: luatron generate", 1, true), text)
  end)
end)

-- The cache on the CUDA backend (the emulated plugin): the same model built on "cpu" and on "cuda" decodes
-- a prompt and then token by token to the same logits.
local CUDA_DECODE = [[
local lt = require "luatron"
local model_lib = require "luatron.model"
local function build(device)
  return model_lib.build(lt.GPTModelProvider { num_layers = 2, hidden_size = 32, num_attention_heads = 4,
    num_query_groups = 2, seq_length = 16, vocab_size = 64, make_vocab_size_divisible_by = 32,
    position_embedding_type = "rope", device = device, init_method_std = 0.2 }, 3)
end
local cpu, cuda = build("cpu"), build("cuda")
local a, b = cpu:kv_cache(12), cuda:kv_cache(12)
local worst, ids = 0, { 3, 9, 27, 17 }
for step = 1, 6 do
  local x, y = cpu:decode(a, ids), cuda:decode(b, ids)
  local scale, diff, best = 0, 0, 1
  for v = 1, 64 do
    scale, diff = math.max(scale, math.abs(x:get(v))), math.max(diff, math.abs(x:get(v) - y:get(v)))
    if x:get(v) > x:get(best) then best = v end
  end
  worst = math.max(worst, diff / scale)
  ids = { best - 1 }
end
print(("decode on %s: worst relative difference %.3g"):format(cuda:param("embedding.word_embeddings.weight"):device(),
  worst))
]]

describe("the key/value cache on the CUDA backend (the emulated plugin)", function()
  it("decodes as the CPU does", function()
    local dir = h.tmpdir()
    h.write(dir .. "/decode.lua", CUDA_DECODE)
    local code, out = h.run(("LUATRON_CUDA_PLUGIN=tests/cuda/luatron_cuda_emulated.so %s run %s"):format(
      h.q(os.getenv("LUATRON")), h.q(dir .. "/decode.lua")))
    assert.are.equal(0, code, out)
    local device, worst = out:match("decode on (%S+): worst relative difference (%S+)")
    assert.are.equal("cuda", device, out)
    assert.is_true(tonumber(worst) <= 1e-5, out)
  end)
end)

-- Specs for the model as pipeline chunks from Lua: core.gpt_chunk, chunk:forward / chunk:backward
-- passing [s, b, h] tensors from chunk to chunk, and luatron.model's chunk_layers (Megatron's layer
-- offsets with virtual stages, and its messages for layer counts that do not divide).
local lt = require "luatron"
local core = lt.core
local model_lib = require "luatron.model"

local h = dofile("tests/lua/helpers.lua")
local assert_error_contains = h.assert_error_contains

local function tiny(extra)
  local fields = {
    num_layers = 4, hidden_size = 16, num_attention_heads = 4, seq_length = 8, vocab_size = 64,
    hidden_dropout = 0.1, attention_dropout = 0.1,
  }
  for k, v in pairs(extra or {}) do fields[k] = v end
  return lt.GPTModelProvider(fields)
end

-- Two microbatches of int32 tokens and targets [3, 7] (every 5th target ignored).
local function batches(vocab)
  local out = {}
  for k = 1, 2 do
    local tok, tgt = {}, {}
    for b = 1, 3 do
      tok[b], tgt[b] = {}, {}
      for t = 1, 7 do
        local i = (b - 1) * 7 + t
        tok[b][t] = (i * 7 + k * 13) % vocab
        tgt[b][t] = i % 5 == 0 and -1 or (i * 11 + k * 3) % vocab
      end
    end
    out[k] = { tokens = lt.tensor.from(tok, "int32"), targets = lt.tensor.from(tgt, "int32") }
  end
  return out
end

local function to_float(x) return (string.unpack("f", string.pack("f", x))) end

local function flat_values(t)
  local f = t:reshape({ t:numel() })
  local v = {}
  for i = 1, t:numel() do v[i] = f:get(i) end
  return v
end

-- The whole model: F0 F1 B0 B1; returns the losses.
local function run_whole(model, mb)
  local ctx, losses, valid = {}, {}, {}
  for k = 1, 2 do ctx[k], losses[k], valid[k] = model:forward(mb[k].tokens, mb[k].targets, 100 + k) end
  for k = 1, 2 do model:backward(ctx[k], 1 / (2 * valid[k])) end
  return losses
end

-- The chunks in pipeline order, hidden states forward and their gradients back; returns the losses
-- (mean of the valid per-token losses, rounded to float as the whole model's).
local function run_chunks(chunks, mb)
  local ctx, losses, valid = {}, {}, {}
  for k = 1, 2 do
    ctx[k] = {}
    local x = mb[k].tokens
    for i, c in ipairs(chunks) do
      local out, n
      out, ctx[k][i], n = c:forward(x, mb[k].targets, 100 + k)
      if i == #chunks then
        valid[k] = n
        losses[k] = to_float(out:to_host():sum() / n)
      end
      x = out
    end
  end
  for k = 1, 2 do
    local d = 1 / (2 * valid[k])
    for i = #chunks, 1, -1 do
      d = chunks[i]:backward(ctx[k][i], d)
      assert.are.equal(i == 1, d == nil)
    end
  end
  return losses
end

-- Every chunk's gradient equals the whole model's by name: bit for bit, except the tied word
-- embeddings held twice, whose sum matches to 1e-6 relative (two buffers round the sum differently).
local function assert_grads_match(model, chunks)
  for _, p in ipairs(model:parameters()) do
    local want = flat_values(model:grad(p.name))
    local got, copies = nil, 0
    for _, c in ipairs(chunks) do
      local ok, g = pcall(c.grad, c, p.name)
      if ok then
        copies = copies + 1
        local v = flat_values(g)
        if got then for i = 1, #v do got[i] = got[i] + v[i] end else got = v end
      end
    end
    assert(copies >= 1, p.name .. " is in no chunk")
    if copies == 1 then
      for i = 1, #want do
        if got[i] ~= want[i] then error(("%s[%d]: %.9g vs whole %.9g"):format(p.name, i, got[i], want[i])) end
      end
    else
      assert.are.equal("embedding.word_embeddings.weight", p.name)
      local d, scale = 0, 0
      for i = 1, #want do
        d = math.max(d, math.abs(got[i] - want[i]))
        scale = math.max(scale, math.abs(want[i]))
      end
      assert(scale > 0 and d <= 1e-6 * scale, ("tied copies sum: max diff %g of %g"):format(d, scale))
    end
  end
end

-- All chunks of all pipeline ranks, in the order the layers run (by layer_begin).
local function all_chunks(provider, pp, vpp, seed)
  local chunks = {}
  for r = 0, pp - 1 do
    local layout = model_lib.chunk_layers(provider, pp, vpp, r)
    for i, c in ipairs(model_lib.build_chunks(provider, layout, seed)) do
      chunks[#chunks + 1] = { chunk = c, begin = layout[i].layer_begin }
    end
  end
  table.sort(chunks, function(a, b) return a.begin < b.begin end)
  local out = {}
  for i, c in ipairs(chunks) do out[i] = c.chunk end
  return out
end

describe("model.chunk_layers", function()
  it("follows Megatron's offsets, with and without virtual stages", function()
    local p = tiny { num_layers = 8 }
    assert.are.same({
      { vp_stage = 0, layer_begin = 0, layer_end = 4, pre_process = true, post_process = false },
    }, model_lib.chunk_layers(p, 2, nil, 0))
    assert.are.same({
      { vp_stage = 0, layer_begin = 4, layer_end = 8, pre_process = false, post_process = true },
    }, model_lib.chunk_layers(p, 2, 1, 1))
    -- offset = v * (L / VPP) + r * (L / PP / VPP): rank 0 holds [0, 2) and [4, 6), rank 1 [2, 4) and [6, 8)
    assert.are.same({
      { vp_stage = 0, layer_begin = 0, layer_end = 2, pre_process = true, post_process = false },
      { vp_stage = 1, layer_begin = 4, layer_end = 6, pre_process = false, post_process = false },
    }, model_lib.chunk_layers(p, 2, 2, 0))
    assert.are.same({
      { vp_stage = 0, layer_begin = 2, layer_end = 4, pre_process = false, post_process = false },
      { vp_stage = 1, layer_begin = 6, layer_end = 8, pre_process = false, post_process = true },
    }, model_lib.chunk_layers(p, 2, 2, 1))
    local l = model_lib.chunk_layers(tiny { num_layers = 16 }, 4, 2, 3)
    assert.are.same({ 6, 8, 14, 16 }, { l[1].layer_begin, l[1].layer_end, l[2].layer_begin, l[2].layer_end })
    assert.is_true(l[2].post_process)
  end)

  it("refuses layer counts that do not divide, with Megatron's messages", function()
    assert_error_contains(function() model_lib.chunk_layers(tiny { num_layers = 6 }, 4, 1, 0) end,
      "num_layers (6) is not divisible by pipeline_model_parallel_size (4)",
      "Number of layers should be divisible by the pipeline-model-parallel size")
    assert_error_contains(function() model_lib.chunk_layers(tiny { num_layers = 8 }, 2, 3, 0) end,
      "4 layers per pipeline stage is not divisible by virtual_pipeline_model_parallel_size (3)",
      "number of layers per pipeline stage must be divisible number of layers per virtual pipeline stage")
    assert_error_contains(function() model_lib.chunk_layers(tiny(), 1, 2, 0) end,
      "pipeline-model-parallel size should be greater than 1 with interleaved schedule")
    assert_error_contains(function() model_lib.chunk_layers(tiny(), 2, 1, 2) end, "pipeline rank 2 is outside [0, 2)")
  end)
end)

describe("core.gpt_chunk", function()
  for _, tied in ipairs { true, false } do
    for _, split in ipairs { { 2, 1 }, { 4, 1 }, { 2, 2 } } do
      local pp, vpp = split[1], split[2]
      it(("PP %d VPP %d, %s embeddings, dropout on: the whole model's losses and gradients"):format(
        pp, vpp, tied and "tied" or "untied"), function()
        local p = tiny { share_embeddings_and_output_weights = tied }
        local model = model_lib.build(p, 7)
        local chunks = all_chunks(p, pp, vpp, 7)
        assert.are.equal(pp * vpp, #chunks)
        for _, m in ipairs(chunks) do m:zero_grad() end
        model:zero_grad()
        local mb = batches(64)
        local want = run_whole(model, mb)
        local got = run_chunks(chunks, mb)
        assert.are.same(want, got)
        assert.are_not.equal(want[1], want[2])
        assert_grads_match(model, chunks)
      end)
    end
  end

  it("passes [s, b, h] tensors and says what it is", function()
    local p = tiny()
    local first, last = table.unpack(all_chunks(p, 2, 1, 1))
    local mb = batches(64)
    local out, ctx, n = first:forward(mb[1].tokens, mb[1].targets, 1)
    assert.are.same({ 7, 3, 16 }, out:shape())
    assert.is_nil(n)
    local loss, lctx, valid = last:forward(out, mb[1].targets, 1)
    assert.are.same({ 3, 7 }, loss:shape())
    assert.are.equal("float32", loss:dtype())
    assert.are.equal(17, valid)
    assert.are.same({ 3, 7, 128 }, last:logits(lctx):shape()) -- the vocabulary padded to 128
    local d = last:backward(lctx, 1 / valid)
    assert.are.same({ 7, 3, 16 }, d:shape())
    assert.is_nil(first:backward(ctx, d))
    assert.are.same({ layer_begin = 2, layer_end = 4, pre_process = false, post_process = true }, last:stage())
    assert.matches("GPTChunk%(layers=%[2, 4%) of 4, pre_process=false, post_process=true", tostring(last))
    -- the optimizer takes a chunk like a model
    local opt = lt.optimizer(last, lt.OptimizerConfig { lr = 1e-3 })
    opt:step(1e-3)
    assert.are.equal(1, opt:num_steps())
  end)

  it("refuses what does not fit, with clear messages", function()
    local p = tiny()
    local first, last = table.unpack(all_chunks(p, 2, 1, 1))
    local mb = batches(64)
    assert_error_contains(function() last:forward(mb[1].tokens, mb[1].targets, 1) end,
      "a chunk after the first takes the hidden state [seq, batch, hidden]")
    assert_error_contains(function() last:forward(lt.tensor.zeros({ 3, 7, 16 }), mb[1].targets, 1) end,
      "targets must be a contiguous int32 tensor [batch, seq]")
    assert_error_contains(function() last:forward(lt.tensor.zeros({ 7, 3, 8 }), nil, 1) end,
      "the input hidden state must be a contiguous float32 cpu tensor [7, 3, 16] ([seq, batch, hidden])")
    local out, ctx = first:forward(mb[1].tokens, nil, 1)
    assert_error_contains(function() last:backward(ctx, 1.0) end, "context comes from another chunk's forward")
    assert_error_contains(function() first:backward(ctx, lt.tensor.zeros({ 3, 7, 16 })) end,
      "the output's gradient must be a contiguous float32 cpu tensor [7, 3, 16]")
    assert_error_contains(function() first:backward(ctx, out) end, "context was already used")
    assert_error_contains(function() first:logits(select(2, first:forward(mb[1].tokens, nil, 1))) end,
      "only a last stage (post_process) has logits")
    local cfg = model_lib.engine_config(p, 1)
    cfg.layer_begin, cfg.layer_end, cfg.pre_process, cfg.post_process = 1, 3, true, false
    assert_error_contains(function() core.gpt_chunk(cfg) end, "cannot build the chunk",
      "a first stage (pre_process) must begin at layer 0, not 1")
  end)

  it("requires its stage: layer_begin, layer_end, pre_process and post_process", function()
    local stage = { layer_begin = 0, layer_end = 2, pre_process = true, post_process = false }
    local function cfg_without(name)
      local cfg = model_lib.engine_config(tiny(), 1)
      for k, v in pairs(stage) do cfg[k] = v end
      cfg[name] = nil
      return cfg
    end
    assert.are.same(stage, core.gpt_chunk(cfg_without("none")):stage())
    for name in pairs(stage) do
      assert_error_contains(function() core.gpt_chunk(cfg_without(name)) end, "model config: " .. name .. " is required")
    end
    local cfg = cfg_without("none")
    cfg.pre_process = 1
    assert_error_contains(function() core.gpt_chunk(cfg) end, "model config: pre_process must be a boolean")
  end)
end)

-- The same through the CUDA backend: the plugin's kernels built for the host (tests/cuda, CUDA
-- threads as coroutines), run by the luatron command with LUATRON_CUDA_PLUGIN. The boundary
-- transposes, the per-token losses and the gradients then live in device memory.
local CUDA_CHECK = [[
local lt = require "luatron"
local model_lib = require "luatron.model"
local bf16 = arg[1] == "bf16"
local p = lt.GPTModelProvider { num_layers = 4, hidden_size = 16, num_attention_heads = 4, seq_length = 8,
  vocab_size = 64, hidden_dropout = 0.1, attention_dropout = 0.1, device = "cuda", bf16 = bf16,
  share_embeddings_and_output_weights = false }
local model = model_lib.build(p, 3)
local chunks = {}
for r = 0, 1 do chunks[r + 1] = model_lib.build_chunks(p, model_lib.chunk_layers(p, 2, 1, r), 3)[1] end
local tok, tgt = {}, {}
for b = 1, 2 do
  tok[b], tgt[b] = {}, {}
  for t = 1, 8 do tok[b][t], tgt[b][t] = (b * 8 + t * 5) % 64, (b * 3 + t * 7) % 64 end
end
local tokens, targets = lt.tensor.from(tok, "int32"), lt.tensor.from(tgt, "int32")
model:zero_grad(); chunks[1]:zero_grad(); chunks[2]:zero_grad()
local ctx, loss, valid = model:forward(tokens, targets, 5)
model:backward(ctx, 1 / valid)
local hid, c1 = chunks[1]:forward(tokens, targets, 5)
local losses, c2, n = chunks[2]:forward(hid, targets, 5)
print("device", hid:device(), losses:device(), table.concat(hid:shape(), "x"), hid:dtype())
local chunk_loss = losses:to_host():sum() / n
local d = chunks[2]:backward(c2, 1 / n)
chunks[1]:backward(c1, d)
local worst = 0
for _, prm in ipairs(model:parameters()) do
  local c = prm.name:match("^embedding") and chunks[1] or prm.name:match("^decoder%.layers%.([01])%.") and chunks[1]
    or chunks[2]
  local a, b = model:grad(prm.name):to_host(), c:grad(prm.name):to_host()
  local scale, diff = 0, 0
  local fa, fb = a:reshape({ a:numel() }), b:reshape({ b:numel() })
  for i = 1, a:numel() do
    scale = math.max(scale, math.abs(fa:get(i)))
    diff = math.max(diff, math.abs(fa:get(i) - fb:get(i)))
  end
  if scale > 0 then worst = math.max(worst, diff / scale) else worst = math.max(worst, diff) end
end
print(("loss %.9g chunks %.9g grad_rel %.3g"):format(loss, chunk_loss, worst))
]]

describe("chunks on the CUDA backend (the emulated plugin)", function()
  local EMULATED = "tests/cuda/luatron_cuda_emulated.so"
  for _, precision in ipairs { "fp32", "bf16" } do
    it(("reproduce the whole model on the device in %s"):format(precision), function()
      local f = io.open(EMULATED)
      assert(f, EMULATED .. " is missing (a data dependency of this spec)")
      f:close()
      local dir = h.tmpdir()
      h.write(dir .. "/check.lua", CUDA_CHECK)
      local code, out = h.run(("LUATRON_CUDA_PLUGIN=%s %s run %s %s"):format(h.q(EMULATED), h.q(h.luatron_bin()),
        h.q(dir .. "/check.lua"), precision))
      assert.are.equal(0, code, out)
      assert.truthy(out:find("device\tcuda\tcuda\t8x2x16\t" .. (precision == "bf16" and "bfloat16" or "float32"),
        1, true), out)
      local loss, chunk_loss, rel = out:match("loss (%S+) chunks (%S+) grad_rel (%S+)")
      assert(loss, out)
      -- the loss: the same per-token losses, the whole model's rounded to float; the gradients: the
      -- same kernels in the same order (1e-6 leaves room for a real GPU's atomic additions)
      assert.is_true(math.abs(tonumber(loss) - tonumber(chunk_loss)) <= 1e-6 * math.abs(tonumber(loss)), out)
      assert.is_true(tonumber(rel) <= 1e-6, out)
    end)
  end
end)

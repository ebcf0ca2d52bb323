-- Specs for the user-facing Lua API of the engine: tensors (lt.tensor), models (lt.build_model),
-- optimizers, the learning-rate schedule, the mock dataset and checkpoint files. The training
-- loop itself (custom loops and luatron.pretrain) is in training_spec.lua.
local lt = require "luatron"
local core = lt.core
local T = lt.tensor

local h = dofile("tests/lua/helpers.lua")
local msg_of, assert_error_contains = h.msg_of, h.assert_error_contains

local function near(a, b, tol, what)
  assert(math.abs(a - b) <= (tol or 1e-6),
    ("%s: expected %.9g, got %.9g (tolerance %g)"):format(what or "value", b, a, tol or 1e-6))
end

-- Largest absolute difference between two tensors of the same element count.
local function max_diff(a, b)
  assert.are.equal(a:numel(), b:numel())
  local d = a:clone()
  d:add(b:clone(), -1)
  local m = 0
  for i = 1, d:numel() do
    local v = math.abs(d:get(i))
    if v > m then m = v end
  end
  return m
end

local function flat_clone(model) return model:flat_weights():clone() end

-- A small model: 1 layer, hidden 16, 2 heads, 8 positions, vocab 50 (padded to 128).
local function small_provider(over)
  local t = {
    num_layers = 1, hidden_size = 16, num_attention_heads = 2, seq_length = 8, vocab_size = 50,
    hidden_dropout = 0.0, attention_dropout = 0.0,
  }
  for k, v in pairs(over or {}) do t[k] = v end
  return lt.GPTModelProvider(t)
end

local V = 128 -- 50 padded to a multiple of 128

-- An int32 [B, T+1] batch of token ids (deterministic, all < V).
local function token_batch(B, Tp1, mul)
  local rows = {}
  for b = 1, B do
    rows[b] = {}
    for t = 1, Tp1 do rows[b][t] = (b * 31 + t * (mul or 7)) % V end
  end
  return T.from(rows, "int32")
end

describe("lt.tensor", function()
  it("zeros makes zero-filled tensors of every dtype, with shape, size, dim, numel and dtype", function()
    local t = T.zeros({ 2, 3 })
    assert.are.equal("float32", t:dtype())
    assert.are.same({ 2, 3 }, t:shape())
    assert.are.equal(2, t:size(1))
    assert.are.equal(3, t:size(2))
    assert.are.equal(2, t:dim())
    assert.are.equal(6, t:numel())
    assert.are.equal(2, #t)
    assert.are.same({ { 0, 0, 0 }, { 0, 0, 0 } }, t:to_table())
    for name, canonical in pairs { float32 = "float32", f32 = "float32", bfloat16 = "bfloat16", bf16 = "bfloat16",
      int32 = "int32", i32 = "int32", int64 = "int64", i64 = "int64" } do
      local z = T.zeros({ 4 }, name)
      assert.are.equal(canonical, z:dtype())
      assert.are.same({ 0, 0, 0, 0 }, z:to_table())
    end
    local s = T.zeros({})
    assert.are.equal(0, s:dim())
    assert.are.equal(1, s:numel())
    assert.are.equal(0, s:item())
  end)

  it("size() of a dimension that does not exist is an error", function()
    local t = T.zeros({ 2, 3 })
    assert_error_contains(function() return t:size(3) end, "dimension out of range")
    assert_error_contains(function() return t:size(0) end, "dimension out of range")
  end)

  it("from and to_table round-trip nested tables", function()
    local nested = { { { 1, 2 }, { 3, 4 }, { 5, 6 } }, { { 7, 8 }, { 9, 10 }, { 11, 12 } } }
    local t = T.from(nested)
    assert.are.same({ 2, 3, 2 }, t:shape())
    assert.are.same(nested, t:to_table())
    local i = T.from({ { 1, -2 }, { 3, 2147483647 } }, "int32")
    assert.are.equal("int32", i:dtype())
    assert.are.same({ { 1, -2 }, { 3, 2147483647 } }, i:to_table())
    assert.are.equal("integer", math.type(i:get(2, 2)))
    local l = T.from({ 2 ^ 40, -5 }, "int64")
    assert.are.equal(1099511627776, l:get(1))
    assert.are.equal("integer", math.type(l:get(1)))
    assert.are.same({ 0.5, -1.25 }, T.from({ 0.5, -1.25 }):to_table())
  end)

  it("bfloat16 keeps 8 bits of mantissa", function()
    local t = T.from({ 1 / 3, 1.5, 256 }, "bfloat16")
    assert.are.equal(0.333984375, t:get(1)) -- 1/3 rounded to bf16
    assert.are.equal(1.5, t:get(2))
    assert.are.equal(256, t:get(3))
  end)

  it("get and set use 1-based indices; out-of-range indices name the index and the dimension", function()
    local t = T.from({ { 1, 2, 3 }, { 4, 5, 6 } })
    assert.are.equal(1, t:get(1, 1))
    assert.are.equal(6, t:get(2, 3))
    t:set(2, 3, 9)
    assert.are.equal(9, t:get(2, 3))
    assert.are.same({ { 1, 2, 3 }, { 4, 5, 9 } }, t:to_table())
    assert_error_contains(function() return t:get(3, 1) end, "index 3 out of range for dimension 1 of size 2")
    assert_error_contains(function() return t:get(1, 4) end, "index 4 out of range for dimension 2 of size 3")
    assert_error_contains(function() return t:get(0, 1) end, "index 0 out of range for dimension 1")
    assert_error_contains(function() t:set(1, 0, 5) end, "index 0 out of range for dimension 2")
    assert_error_contains(function() return t:get(1) end, "expected 2 indices, got 1")
    assert.are.same({ { 1, 2, 3 }, { 4, 5, 9 } }, t:to_table()) -- the failed set changed nothing
  end)

  it("item reads a one-element tensor and refuses others", function()
    assert.are.equal(7, T.from({ { 7 } }):item())
    assert.are.equal(2.5, T.from({ 2.5 }):item())
    assert_error_contains(function() return T.zeros({ 2, 3 }):item() end, "one element", "6")
  end)

  it("fill sets every element and returns the tensor", function()
    local t = T.zeros({ 2, 2 }, "int32")
    assert.are.equal(t, t:fill(3))
    assert.are.same({ { 3, 3 }, { 3, 3 } }, t:to_table())
  end)

  it("copy copies values between tensors of the same element count, converting dtypes", function()
    local f = T.zeros({ 2, 2 })
    f:copy(T.from({ 1, 2, 3, 4 }, "int32"))
    assert.are.same({ { 1, 2 }, { 3, 4 } }, f:to_table())
    local i = T.zeros({ 4 }, "int64")
    i:copy(T.from({ { 5, 6 }, { 7, 8 } }))
    assert.are.same({ 5, 6, 7, 8 }, i:to_table())
    local b = T.zeros({ 2 }, "bfloat16")
    b:copy(T.from({ 0.5, -2 }))
    assert.are.same({ 0.5, -2 }, b:to_table())
    assert_error_contains(function() f:copy(T.zeros({ 3 })) end, "copy", "3 elements into 4")
  end)

  it("clone makes an independent copy", function()
    local a = T.from({ 1, 2, 3 })
    local c = a:clone()
    c:set(1, 100)
    a:set(2, 200)
    assert.are.same({ 1, 200, 3 }, a:to_table())
    assert.are.same({ 100, 2, 3 }, c:to_table())
  end)

  it("reshape is a view: writing through it changes the original", function()
    local t = T.from({ { 1, 2, 3 }, { 4, 5, 6 } })
    local r = t:reshape({ 3, 2 })
    assert.are.same({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, r:to_table())
    r:set(2, 1, 30) -- flat element 3
    assert.are.equal(30, t:get(1, 3))
    t:set(2, 3, 60)
    assert.are.equal(60, r:get(3, 2))
    assert.are.same({ 6 }, t:reshape({ 6 }):shape())
    assert_error_contains(function() return t:reshape({ 4, 2 }) end, "same number of elements")
  end)

  it("narrow takes a 1-based view along a dimension", function()
    local t = T.from({ { 1, 2, 3 }, { 4, 5, 6 } })
    local cols = t:narrow(2, 2, 2)
    assert.are.same({ 2, 2 }, cols:shape())
    assert.are.same({ { 2, 3 }, { 5, 6 } }, cols:to_table())
    cols:set(2, 1, 50)
    assert.are.equal(50, t:get(2, 2))
    local row = t:narrow(1, 2, 1)
    assert.are.same({ { 4, 50, 6 } }, row:to_table())
    row:fill(0)
    assert.are.same({ { 1, 2, 3 }, { 0, 0, 0 } }, t:to_table())
    assert.are.equal(5, cols:sum()) -- 2 + 3 + 0 + 0 on a strided view
    assert.are.same({ { 2, 3 }, { 0, 0 } }, cols:clone():to_table())
    assert_error_contains(function() return t:narrow(2, 3, 2) end, "narrow(2, 3, 2) is out of range")
    assert_error_contains(function() return t:narrow(3, 1, 1) end, "out of range")
    assert_error_contains(function() return t:narrow(1, 0, 1) end, "out of range")
  end)

  it("transpose swaps two dimensions as a view; copy makes it contiguous", function()
    local t = T.from({ { 1, 2, 3 }, { 4, 5, 6 } })
    local v = t:transpose(1, 2)
    assert.are.same({ 3, 2 }, v:shape())
    assert.are.same({ { 1, 4 }, { 2, 5 }, { 3, 6 } }, v:to_table())
    v:set(3, 1, 30)
    assert.are.equal(30, t:get(1, 3))
    assert_error_contains(function() return v:reshape({ 6 }) end, "contiguous")
    local c = T.zeros({ 3, 2 }):copy(v)
    assert.are.same({ 1, 4, 2, 5, 30, 6 }, c:reshape({ 6 }):to_table())
    assert.are.same(t:to_table(), v:transpose(2, 1):to_table())
    assert_error_contains(function() return t:transpose(1, 3) end, "dimension out of range")
  end)

  it("sum, norm, scale and add (with alpha) compute what they say", function()
    local t = T.from({ { 3, 4 }, { 0, 0 } })
    assert.are.equal(7, t:sum())
    near(t:norm(), 5, 1e-6, "norm")
    assert.are.equal(t, t:scale(2))
    assert.are.same({ { 6, 8 }, { 0, 0 } }, t:to_table())
    t:add(T.from({ { 1, 1 }, { 1, 1 } }))
    assert.are.same({ { 7, 9 }, { 1, 1 } }, t:to_table())
    t:add(T.from({ { 1, 2 }, { 3, 4 } }), -0.5)
    assert.are.same({ { 6.5, 8 }, { -0.5, -1 } }, t:to_table())
    assert_error_contains(function() t:add(T.zeros({ 3 })) end, "4 elements and 3")
    assert_error_contains(function() T.zeros({ 2 }, "int32"):norm() end, "contiguous float32")
    assert_error_contains(function() t:narrow(2, 1, 1):scale(2) end, "contiguous float32")
    assert.are.equal(10, T.from({ 1, 2, 3, 4 }, "int32"):sum())
  end)

  it("matmul multiplies 2-d float32 tensors", function()
    local a = T.from({ { 1, 2, 3 }, { 4, 5, 6 } })
    local b = T.from({ { 7, 8 }, { 9, 10 }, { 11, 12 } })
    local c = T.matmul(a, b)
    assert.are.same({ 2, 2 }, c:shape())
    assert.are.same({ { 58, 64 }, { 139, 154 } }, c:to_table())
    local id = T.from({ { 1, 0 }, { 0, 1 } })
    assert.are.same({ { 0.5, -1 }, { 2, 3 } }, T.matmul(T.from({ { 0.5, -1 }, { 2, 3 } }), id):to_table())
    assert_error_contains(function() return T.matmul(a, a) end, "matmul: shapes do not fit ([2, 3] x [2, 3])")
  end)

  it("tostring shows dtype, shape and the first 8 values", function()
    assert.are.equal("Tensor(float32, [2, 3]: 1 2 3 4 5 6)", tostring(T.from({ { 1, 2, 3 }, { 4, 5, 6 } })))
    assert.are.equal("Tensor(int32, [10]: 0 1 2 3 4 5 6 7 ...)",
      tostring(T.from({ 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 }, "int32")))
    assert.are.equal("Tensor(bfloat16, [0])", tostring(T.zeros({ 0 }, "bfloat16")))
    assert.are.equal("Tensor(float32, []: 0.25)", tostring(T.from({ 0.25 }):reshape({})))
  end)

  it("rejects ragged tables, non-numbers, unknown dtypes and bad shapes", function()
    assert_error_contains(function() return T.from({ { 1, 2 }, { 3 } }) end, "ragged table", "dimension 2")
    assert_error_contains(function() return T.from({ { 1, 2 }, 3 }) end, "ragged table")
    assert_error_contains(function() return T.from({ 1, "x" }) end, "element 2 is not a number")
    assert_error_contains(function() return T.zeros({ 2 }, "float16") end, "unknown dtype 'float16'")
    assert_error_contains(function() return T.from({ 1 }, "double") end, "unknown dtype 'double'")
    assert_error_contains(function() return T.zeros({ 2, -1 }) end, "shape[2] must be a non-negative integer")
  end)

  it("a closed or freed tensor gives a clear error instead of touching freed memory", function()
    local kept
    do
      local t <close> = T.from({ 1, 2, 3 })
      kept = t
      assert.are.equal(6, t:sum())
    end
    assert.are.equal("Tensor(closed)", tostring(kept))
    assert_error_contains(function() return kept:sum() end, "tensor was already closed")
    local u = T.zeros({ 2 })
    u:free()
    u:free() -- twice is harmless
    assert_error_contains(function() return u:numel() end, "tensor was already closed")
    assert_error_contains(function() T.zeros({ 2 }):copy(u) end, "tensor was already closed")
  end)

  it("a view keeps its storage alive after the tensor it came from is freed", function()
    local t = T.from({ 1, 2, 3, 4 })
    local v = t:narrow(1, 3, 2)
    t:free()
    collectgarbage()
    assert.are.same({ 3, 4 }, v:to_table())
  end)
end)

describe("lt.build_model", function()
  it("counts parameters: num_parameters = sum of parameters() = the hand count", function()
    local m = lt.build_model(small_provider(), 1)
    local sum = 0
    for _, p in ipairs(m:parameters()) do sum = sum + p.numel end
    -- tied embeddings, learned positions, biases, LayerNorm; V = 128, C = 16, T = 8, ffn = 64
    local C, F = 16, 64
    local embed = V * C + 8 * C
    local layer = 2 * C                  -- input_layernorm weight + bias
      + (3 * C) * C + 3 * C              -- linear_qkv
      + C * C + C                        -- linear_proj
      + 2 * C                            -- pre_mlp_layernorm
      + F * C + F                        -- linear_fc1
      + C * F + C                        -- linear_fc2
    local expected = embed + layer + 2 * C -- + final_layernorm
    assert.are.equal(5488, expected)
    assert.are.equal(expected, sum)
    assert.are.equal(expected, m:num_parameters())
    assert.are.equal(expected, m:flat_weights():numel())
    assert.are.equal(expected, m:flat_grads():numel())
    assert.are.equal("GPT(layers=1, hidden=16, heads=2, vocab=128, seq=8)", tostring(m))
  end)

  it("lists parameters in Megatron order with contiguous offsets and no-weight-decay flags", function()
    local m = lt.build_model(small_provider({ num_layers = 2 }), 1)
    local names, offset = {}, 0
    for i, p in ipairs(m:parameters()) do
      names[i] = p.name
      assert.are.equal(offset, p.offset, p.name)
      offset = offset + p.numel
      local n = 1
      for _, d in ipairs(p.shape) do n = n * d end
      assert.are.equal(n, p.numel, p.name)
      assert.are.equal(#p.shape == 1, p.no_weight_decay, p.name) -- biases and norms are 1-d
    end
    local expected = { "embedding.word_embeddings.weight", "embedding.position_embeddings.weight" }
    for l = 0, 1 do
      for _, s in ipairs { "input_layernorm.weight", "input_layernorm.bias", "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
        "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
        "mlp.linear_fc2.weight", "mlp.linear_fc2.bias" } do
        expected[#expected + 1] = ("decoder.layers.%d.%s"):format(l, s)
      end
    end
    expected[#expected + 1] = "decoder.final_layernorm.weight"
    expected[#expected + 1] = "decoder.final_layernorm.bias"
    assert.are.same(expected, names)
    assert.are.equal(offset, m:num_parameters())
    assert.are.same({ 128, 16 }, m:param("embedding.word_embeddings.weight"):shape())
    assert.are.same({ 48, 16 }, m:param("decoder.layers.1.self_attention.linear_qkv.weight"):shape())
  end)

  it("follows the provider: RMSNorm, SwiGLU, rope, no bias, untied output", function()
    local m = lt.build_model(small_provider {
      normalization = "RMSNorm", activation = "swiglu", position_embedding_type = "rope", add_bias_linear = false,
      share_embeddings_and_output_weights = false,
    }, 1)
    local names = {}
    for i, p in ipairs(m:parameters()) do names[i] = p.name end
    assert.are.same({
      "embedding.word_embeddings.weight",
      "decoder.layers.0.input_layernorm.weight",
      "decoder.layers.0.self_attention.linear_qkv.weight",
      "decoder.layers.0.self_attention.linear_proj.weight",
      "decoder.layers.0.pre_mlp_layernorm.weight",
      "decoder.layers.0.mlp.linear_fc1.weight",
      "decoder.layers.0.mlp.linear_fc2.weight",
      "decoder.final_layernorm.weight",
      "output_layer.weight",
    }, names)
    assert.are.same({ 128, 16 }, m:param("decoder.layers.0.mlp.linear_fc1.weight"):shape()) -- 2 x ffn for the gate
    local C, F = 16, 64
    assert.are.equal(V * C + (C + 3 * C * C + C * C + C + 2 * F * C + C * F) + C + V * C, m:num_parameters())
  end)

  it("follows Megatron's add_qkv_bias, qk_layernorm and zero-centred norm weights", function()
    local flags = { add_bias_linear = false, add_qkv_bias = true, qk_layernorm = true, num_query_groups = 1,
      layernorm_zero_centered_gamma = true }
    local m = lt.build_model(small_provider(flags), 1)
    local biases = {}
    for _, p in ipairs(m:parameters()) do
      if p.name:match("%.bias$") and not p.name:match("layernorm") then biases[#biases + 1] = p.name end
    end
    assert.are.same({ "decoder.layers.0.self_attention.linear_qkv.bias" }, biases)
    -- 2 heads in one query group, kv_channels 8: [(2 + 2) * 8] qkv rows; q/k norms over the 8 of a head
    assert.are.same({ 32 }, m:param("decoder.layers.0.self_attention.linear_qkv.bias"):shape())
    for _, name in ipairs { "q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight", "k_layernorm.bias" } do
      local w = m:param("decoder.layers.0.self_attention." .. name)
      assert.are.same({ 8 }, w:shape(), name)
      assert.are.equal(0, w:norm(), name) -- zero-centred: weights start at 0 (the norms scale by 1 + w)
    end
    assert.are.equal(0, m:param("decoder.final_layernorm.weight"):norm())
    local _, loss = m:forward(token_batch(2, 9))
    near(loss, math.log(V), 0.3, "loss at init")
  end)

  it("param and grad are views of flat_weights and flat_grads", function()
    local m = lt.build_model(small_provider(), 1)
    local info
    for _, p in ipairs(m:parameters()) do
      if p.name == "decoder.layers.0.self_attention.linear_proj.weight" then info = p end
    end
    local w = m:param(info.name)
    assert.are.same({ 16, 16 }, w:shape())
    local flat = m:flat_weights()
    near(w:get(1, 1), flat:get(info.offset + 1), 0, "first element")
    near(w:get(2, 3), flat:get(info.offset + 16 + 3), 0, "element (2, 3)")
    w:set(2, 3, 0.125)
    assert.are.equal(0.125, flat:get(info.offset + 16 + 3))
    flat:set(info.offset + 1, -0.5)
    assert.are.equal(-0.5, m:param(info.name):get(1, 1))
    local g = m:grad(info.name)
    g:fill(2)
    local fg = m:flat_grads()
    assert.are.equal(2, fg:get(info.offset + 1))
    assert.are.equal(2, fg:get(info.offset + info.numel))
    assert.are.equal(0, fg:get(info.offset)) -- the previous parameter is untouched
    assert.are.equal(0, fg:get(info.offset + info.numel + 1))
    near(fg:sum(), 2 * info.numel, 0, "grad sum")
    m:zero_grad()
    assert.are.equal(0, g:norm())
    assert_error_contains(function() return m:param("decoder.layers.7.nope") end,
      "no parameter named 'decoder.layers.7.nope'")
    assert_error_contains(function() return m:grad("bogus") end, "no parameter named 'bogus'")
  end)

  it("forward on an int32 [B, T+1] batch gives ≈ log(vocab) at init over B*T targets", function()
    local m = lt.build_model(small_provider(), 1)
    local ctx, loss, valid = m:forward(token_batch(2, 9))
    assert.are.equal(16, valid)
    assert(loss == loss and loss > 0, "loss is not a positive number")
    near(loss, math.log(V), 0.5, "loss at init")
    local logits = m:logits(ctx)
    assert.are.same({ 2, 8, V }, logits:shape())
    assert.are.equal("float32", logits:dtype())
    ctx:release()
  end)

  it("the loss is the mean cross-entropy of the logits; targets of -1 are left out", function()
    local m = lt.build_model(small_provider(), 3)
    local B, Tn = 2, 8
    local batch = token_batch(B, Tn + 1, 5)
    local tokens = batch:narrow(2, 1, Tn):clone()
    local targets = batch:narrow(2, 2, Tn):clone()
    targets:set(1, 3, -1)
    targets:set(2, 8, -1)
    targets:set(2, 1, -1)
    local ctx, loss, valid = m:forward(tokens, targets)
    assert.are.equal(B * Tn - 3, valid)
    local logits = m:logits(ctx)
    local total, n = 0, 0
    for b = 1, B do
      for t = 1, Tn do
        local y = targets:get(b, t)
        if y >= 0 then
          local mx = -math.huge
          for v = 1, V do mx = math.max(mx, logits:get(b, t, v)) end
          local z = 0
          for v = 1, V do z = z + math.exp(logits:get(b, t, v) - mx) end
          total = total + (mx + math.log(z) - logits:get(b, t, y + 1))
          n = n + 1
        end
      end
    end
    assert.are.equal(valid, n)
    near(loss, total / n, 1e-4, "loss vs logits")
    -- the same tokens as one [B, T+1] batch: all B*T targets count
    local _, _, all = m:forward(batch)
    assert.are.equal(B * Tn, all)
    -- targets = nil: inference, no valid targets
    local ictx, _, none = m:forward(tokens, nil, 0)
    assert.are.equal(0, none)
    assert.are.same({ B, Tn, V }, m:logits(ictx):shape())
  end)

  it("backward fills the gradients and consumes the context", function()
    local m = lt.build_model(small_provider(), 1)
    m:zero_grad()
    assert.are.equal(0, m:flat_grads():norm())
    local ctx, _, valid = m:forward(token_batch(2, 9))
    m:backward(ctx, 1 / valid)
    local norm = m:flat_grads():norm()
    assert(norm > 0 and norm < math.huge, "gradient norm " .. norm)
    assert(m:grad("embedding.word_embeddings.weight"):norm() > 0, "no embedding gradient")
    assert(m:grad("decoder.final_layernorm.weight"):norm() > 0, "no final norm gradient")
    assert_error_contains(function() m:backward(ctx, 1) end, "context was already used by a backward")
    assert_error_contains(function() return m:logits(ctx) end, "context was already used by a backward")
    -- a second microbatch accumulates
    local ctx2, _, valid2 = m:forward(token_batch(2, 9))
    m:backward(ctx2, 1 / valid2)
    near(m:flat_grads():norm(), 2 * norm, 1e-4 * norm, "accumulated gradient norm")
    local released = m:forward(token_batch(1, 9))
    released:release()
    assert_error_contains(function() m:backward(released, 1) end, "already used by a backward (or released)")
  end)

  it("token and target ids outside the vocabulary are errors naming the id", function()
    local m = lt.build_model(small_provider(), 1)
    local tokens = T.from({ { 1, 300, 3 } }, "int32")
    local targets = T.from({ { 1, 2, 3 } }, "int32")
    assert_error_contains(function() m:forward(tokens, targets) end, "token id 300", "vocabulary")
    assert_error_contains(function() m:forward(T.from({ { 1, 2, 128 } }, "int32")) end, "id 128", "vocabulary")
    assert_error_contains(function() m:forward(T.from({ { 1, -4, 2 } }, "int32")) end, "-4")
    assert_error_contains(function() m:forward(T.from({ { 1, 2 } })) end, "int32")
    assert_error_contains(function() m:forward(T.from({ { 1 } }, "int32")) end, "at least 2 columns")
    assert_error_contains(function() m:forward(tokens, T.from({ 1, 2 }, "int32")) end, "shaped like the tokens")
  end)

  it("the same seed builds identical weights, another seed different ones", function()
    local a = lt.build_model(small_provider(), 7)
    local b = lt.build_model(small_provider(), 7)
    local c = lt.build_model(small_provider(), 8)
    assert.are.equal(0, max_diff(a:flat_weights(), b:flat_weights()))
    assert(max_diff(a:flat_weights(), c:flat_weights()) > 1e-3, "seeds 7 and 8 gave the same weights")
    -- init_weights goes back to the seed's weights
    a:param("decoder.layers.0.mlp.linear_fc1.weight"):fill(0)
    a:init_weights()
    assert.are.equal(0, max_diff(a:flat_weights(), b:flat_weights()))
    -- init std 0.02 for a weight matrix (LayerNorm weights start at 1)
    local w = a:param("decoder.layers.0.mlp.linear_fc1.weight")
    local std = w:norm() / math.sqrt(w:numel())
    assert(std > 0.01 and std < 0.03, "fc1 weight std " .. std)
    assert.are.equal(16, a:param("decoder.final_layernorm.weight"):sum())
  end)

  it("views and the optimizer stay usable after model:close(); the model itself refuses", function()
    local m = lt.build_model(small_provider(), 1)
    local w = m:param("decoder.final_layernorm.weight")
    local opt = lt.optimizer(m, lt.OptimizerConfig { lr = 1e-3 })
    m:close()
    assert.are.equal("GPT(closed)", tostring(m))
    assert_error_contains(function() return m:num_parameters() end, "model was already closed")
    collectgarbage()
    assert.are.equal(1, w:get(1))
    opt:step(1e-3) -- works on its own reference to the buffers, never on freed memory
    assert.are.equal(1, opt:num_steps())
  end)

  it("rejects a provider it cannot build", function()
    -- core.gpt's raw table skips validation: the engine's own checks answer
    local function raw(over)
      local cfg = lt.model.engine_config(small_provider(), 1)
      for k, v in pairs(over) do cfg[k] = v end
      return function() core.gpt(cfg) end
    end
    assert_error_contains(raw { device = "tpu" }, "cannot build the model", "unknown device 'tpu'", '"cpu" or "cuda"')
    assert_error_contains(raw { num_query_groups = 3 }, "cannot build the model", "num_query_groups (3)")
    assert_error_contains(raw { num_layers = 0 }, "cannot build the model", "num_layers must be positive")
    assert_error_contains(function() core.gpt { hidden_size = 16 } end, "num_layers is required")
    assert_error_contains(function() lt.build_model(lt.GPTModelProvider { num_layers = 1, hidden_size = 16,
      num_attention_heads = 2 }) end, "model.vocab_size is not set")
    assert_error_contains(function() lt.build_model(small_provider { hidden_size = 18, num_attention_heads = 4 }) end,
      "hidden_size (18) must be divisible by num_attention_heads (4) when kv_channels is not set")
  end)
end)

-- The engine's fields, exactly what luatron.model's engine_config gives core.gpt.
local ENGINE_FIELDS = {
  "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
  "seq_length", "vocab_size", "rmsnorm", "layernorm_epsilon", "gated_linear_unit", "gelu_tanh", "rope",
  "rotary_base", "share_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias",
  "layernorm_zero_centered_gamma", "qk_layernorm", "init_method_std", "hidden_dropout", "attention_dropout",
  "seed", "flat_multiple", "device", "local_rank", "bf16", "tensor_parallel", "sequence_parallel", "context_parallel", "cp_comm_type",
  "num_moe_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_grouped_gemm", "moe_router_topk",
  "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_expert_capacity_factor",
  "moe_token_drop_policy", "moe_pad_expert_input_to_capacity", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
  "moe_z_loss_coeff", "moe_token_dispatcher_type", "expert_parallel", "moe_global_aux", "expert_tensor_parallel", "moe_shared_expert_intermediate_size",
  "moe_router_enable_expert_bias",
}

-- Every value of two models' flat weights is the same (bit for bit).
local function assert_same_weights(a, b)
  local wa, wb = a:flat_weights(), b:flat_weights()
  assert.are.equal(wa:numel(), wb:numel())
  for i = 1, wa:numel() do
    if wa:get(i) ~= wb:get(i) then error(("weight %d: %.9g vs %.9g"):format(i, wa:get(i), wb:get(i))) end
  end
end

describe("the model's defaults, resolved in one place", function()
  local validate_mod = require "luatron.config.validate"

  -- A provider with a few fields away from the defaults (SwiGLU, RMSNorm, rope).
  local function provider(over)
    local t = {
      num_layers = 2, hidden_size = 32, num_attention_heads = 4, seq_length = 16, vocab_size = 300, normalization = "RMSNorm", activation = "swiglu", position_embedding_type = "rope",
      add_bias_linear = false, hidden_dropout = 0.0, attention_dropout = 0.0,
    }
    for k, v in pairs(over or {}) do t[k] = v end
    return lt.GPTModelProvider(t)
  end

  local function container(p, seed)
    return lt.ConfigContainer {
      model = p, rng = { seed = seed },
      train = { train_iters = 1, global_batch_size = 2, micro_batch_size = 2, eval_iters = 0 },
      optimizer = { lr = 1e-3 },
    }
  end

  it("core.gpt and core.gpt_chunk require every field, by name", function()
    local full = lt.model.engine_config(small_provider(), 1)
    local names = {}
    for k in pairs(full) do names[#names + 1] = k end
    table.sort(names)
    local want = { table.unpack(ENGINE_FIELDS) }
    table.sort(want)
    assert.are.same(want, names)
    assert.are.equal("GPT(layers=1, hidden=16, heads=2, vocab=128, seq=8)", tostring(core.gpt(full)))
    for _, name in ipairs(ENGINE_FIELDS) do
      local cfg = lt.model.engine_config(small_provider(), 1)
      cfg[name] = nil
      assert_error_contains(function() core.gpt(cfg) end, "model config: " .. name .. " is required")
      cfg.layer_begin, cfg.layer_end, cfg.pre_process, cfg.post_process = 0, 1, true, true
      assert_error_contains(function() core.gpt_chunk(cfg) end, "model config: " .. name .. " is required")
    end
    for _, bad in ipairs { { "rmsnorm", 1, "a boolean" }, { "hidden_dropout", "0.1x", "a number" },
      { "kv_channels", 8.5, "an integer" }, { "device", true, "a string" } } do
      local cfg = lt.model.engine_config(small_provider(), 1)
      cfg[bad[1]] = bad[2]
      assert_error_contains(function() core.gpt(cfg) end, ("model config: %s must be %s"):format(bad[1], bad[3]))
    end
  end)

  it("gives lt.build_model(provider) and a pretrain run the same resolved fields and weights", function()
    for _, over in ipairs { { num_query_groups = 2 }, { activation = "gelu", normalization = "LayerNorm",
      position_embedding_type = "learned_absolute", add_bias_linear = true, openai_gelu = true },
      { kv_channels = 16, ffn_hidden_size = 40, make_vocab_size_divisible_by = 7, qk_layernorm = true } } do
      local p = provider(over)
      local run = lt.training.setup(container(p, 9))
      local from_run = lt.model.engine_config(run.r.model, 9)
      local direct = lt.model.engine_config(p, 9)
      assert.are.same(direct, from_run)
      for _, name in ipairs(ENGINE_FIELDS) do assert(direct[name] ~= nil, name .. " is not resolved") end
      assert.are.equal(run.r.padded_vocab_size, direct.vocab_size)
      assert_same_weights(lt.build_model(p, 9), run.chunks[1])
    end
  end)

  it("derives kv_channels, ffn_hidden_size, num_query_groups and the padded vocabulary as given ones", function()
    local derived = lt.model.engine_config(provider(), 3)
    assert.are.same({ 8, 128, 4, 384 }, { derived.kv_channels, derived.ffn_hidden_size, derived.num_query_groups,
      derived.vocab_size })
    local given = provider { num_query_groups = 4, kv_channels = 8, ffn_hidden_size = 128 }
    assert.are.same(derived, lt.model.engine_config(given, 3))
    assert_same_weights(lt.build_model(provider(), 3), lt.build_model(given, 3))
    -- a value given instead of the default reaches the engine on both paths
    local wide = provider { kv_channels = 16, num_query_groups = 2 }
    assert.are.equal(16, lt.model.engine_config(wide, 3).kv_channels)
    assert.are.equal(16, lt.config.validate(container(wide, 3), 1).model.kv_channels)
    assert.are.same({ (4 + 2 * 2) * 16, 32 },
      lt.build_model(wide, 3):param("decoder.layers.0.self_attention.linear_qkv.weight"):shape())
  end)

  it("a default changed in validate.resolve_model changes it for validation and both builds", function()
    local original = validate_mod.resolve_model
    -- ffn_hidden_size's default becomes 3 x hidden_size, in that one function only
    validate_mod.resolve_model = function(m)
      if m.ffn_hidden_size == nil then m.ffn_hidden_size = 3 * m.hidden_size end
      return original(m)
    end
    local ok, err = pcall(function()
      local p = provider()
      assert.are.equal(96, lt.config.validate(container(p, 1), 1).model.ffn_hidden_size)
      assert.are.equal(96, lt.model.engine_config(p, 1).ffn_hidden_size)
      local name = "decoder.layers.0.mlp.linear_fc1.weight" -- SwiGLU: two halves of ffn_hidden_size
      assert.are.same({ 2 * 96, 32 }, lt.build_model(p, 1):param(name):shape())
      assert.are.same({ 2 * 96, 32 }, lt.training.setup(container(p, 1)).chunks[1]:param(name):shape())
    end)
    validate_mod.resolve_model = original
    assert(ok, err)
    assert.are.same({ 2 * 128, 32 }, lt.build_model(provider(), 1):param("decoder.layers.0.mlp.linear_fc1.weight"):shape())
  end)
end)

describe("lt.optimizer", function()
  -- A model with fresh gradients from one microbatch.
  local function model_with_grads(seed)
    local m = lt.build_model(small_provider(), seed or 1)
    m:zero_grad()
    local ctx, _, valid = m:forward(token_batch(2, 9))
    m:backward(ctx, 1 / valid)
    return m
  end

  it("one adam step moves each weight by about lr against its gradient's sign", function()
    local m = model_with_grads()
    local opt = lt.optimizer(m, lt.OptimizerConfig { lr = 1e-2, weight_decay = 0.0 })
    assert.are.same({ "exp_avg", "exp_avg_sq" }, opt:state_names())
    assert.are.equal(0, opt:num_steps())
    local before = flat_clone(m)
    local g = m:flat_grads():clone()
    opt:step(1e-2)
    assert.are.equal(1, opt:num_steps())
    local after = m:flat_weights()
    local checked = 0
    for i = 1, after:numel(), 7 do
      local gi = g:get(i)
      local delta = after:get(i) - before:get(i)
      if math.abs(gi) > 1e-4 then
        near(delta, gi > 0 and -1e-2 or 1e-2, 1e-4, "adam step of element " .. i)
        checked = checked + 1
      end
    end
    assert(checked > 100, "too few elements with a gradient: " .. checked)
    -- the state after one step: exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2
    local m1, v1 = opt:state("exp_avg"), opt:state("exp_avg_sq")
    assert.are.equal(m:num_parameters(), m1:numel())
    for _, i in ipairs { 1, 100, 2500, 5000 } do
      near(m1:get(i), 0.1 * g:get(i), 1e-7, "exp_avg")
      near(v1:get(i), 0.001 * g:get(i) ^ 2, 1e-9, "exp_avg_sq")
    end
    assert_error_contains(function() return opt:state("momentum_buffer") end, "no state named 'momentum_buffer'")
    assert.are.equal(5, opt:num_steps(5))
    assert.are.equal(5, opt:num_steps())
  end)

  it("weight decay applies to matrices, not to biases and norms", function()
    local m = lt.build_model(small_provider(), 1)
    m:zero_grad() -- zero gradients: only the decay moves weights
    local opt = lt.optimizer(m, lt.OptimizerConfig { lr = 0.1, weight_decay = 0.5 })
    local w0 = m:param("decoder.layers.0.mlp.linear_fc1.weight"):clone()
    opt:step(0.1)
    local w1 = m:param("decoder.layers.0.mlp.linear_fc1.weight")
    near(w1:get(3, 4), w0:get(3, 4) * (1 - 0.1 * 0.5), 1e-7, "decayed weight")
    assert.are.equal(1, m:param("decoder.final_layernorm.weight"):get(1))
  end)

  it("sgd with momentum: the first step is w - lr * g", function()
    local m = model_with_grads()
    local opt = lt.optimizer(m, lt.OptimizerConfig { optimizer = "sgd", lr = 0.5, weight_decay = 0.0 })
    assert.are.same({ "momentum_buffer" }, opt:state_names())
    local before = flat_clone(m)
    local g = m:flat_grads():clone()
    opt:step(0.5)
    local after = m:flat_weights()
    for _, i in ipairs { 1, 77, 2200, 3000, 5488 } do
      near(after:get(i), before:get(i) - 0.5 * g:get(i), 1e-6, "sgd step of element " .. i)
    end
    assert.are.equal(0, max_diff(opt:state("momentum_buffer"), g))
    local plain = lt.optimizer(m, { optimizer = "sgd", sgd_momentum = 0 })
    assert.are.same({}, plain:state_names())
    assert_error_contains(function() lt.optimizer(m, { optimizer = "lion" }) end, "optimizer 'lion' is not supported")
  end)

  it("clip_grad_norm returns the norm and scales gradients down to max_norm when larger", function()
    local m = model_with_grads()
    local grads = m:flat_grads()
    local norm = grads:norm()
    assert(norm > 0.1, "gradient norm too small for the test: " .. norm)
    near(core.clip_grad_norm(grads, 1e6), norm, 1e-6 * norm, "norm (no clipping)")
    near(grads:norm(), norm, 1e-6 * norm, "unclipped norm")
    local max_norm = norm / 4
    near(core.clip_grad_norm(grads, max_norm), norm, 1e-6 * norm, "returned norm")
    near(grads:norm(), max_norm, 1e-5 * norm, "clipped norm")
    near(core.clip_grad_norm(grads, 0), max_norm, 1e-5 * norm, "max_norm 0 only measures")
    near(grads:norm(), max_norm, 1e-5 * norm, "max_norm 0 leaves grads alone")
    local t = T.from({ 3, 4 })
    near(core.clip_grad_norm(t, 1), 5, 1e-6, "norm of {3, 4}")
    near(t:get(1), 0.6, 1e-6, "clipped x")
    near(t:get(2), 0.8, 1e-6, "clipped y")
    assert_error_contains(function() core.clip_grad_norm(T.zeros({ 2 }, "int32"), 1) end, "contiguous float32")
  end)
end)

describe("lt.scheduler.lr_at", function()
  local lr_at = lt.scheduler.lr_at
  local opt = lt.OptimizerConfig { lr = 1.0, min_lr = 0.1 }

  local function sched(style, over)
    local t = { lr_warmup_iters = 10, lr_warmup_init = 0.2, lr_decay_style = style, lr_decay_iters = 110 }
    for k, v in pairs(over or {}) do t[k] = v end
    return lt.SchedulerConfig(t)
  end

  it("warms up linearly from lr_warmup_init to lr", function()
    local s = sched("cosine")
    near(lr_at(0, opt, s, 200), 0.2)
    near(lr_at(5, opt, s, 200), 0.6)
    near(lr_at(10, opt, s, 200), 1.0)
    near(lr_at(5, opt, sched("cosine", { lr_warmup_init = 0.0 }), 200), 0.5)
  end)

  it("cosine decays to min_lr at lr_decay_iters", function()
    local s = sched("cosine")
    near(lr_at(35, opt, s, 200), 0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1))
    near(lr_at(35, opt, s, 200), 0.868198052)
    near(lr_at(60, opt, s, 200), 0.55)
    near(lr_at(110, opt, s, 200), 0.1)
    near(lr_at(111, opt, s, 200), 0.1)
    near(lr_at(10000, opt, s, 200), 0.1)
  end)

  it("linear decays to min_lr at lr_decay_iters", function()
    local s = sched("linear")
    near(lr_at(60, opt, s, 200), 0.55)
    near(lr_at(85, opt, s, 200), 0.325)
    near(lr_at(110, opt, s, 200), 0.1)
    near(lr_at(150, opt, s, 200), 0.1)
  end)

  it("constant stays at lr after warmup", function()
    local s = sched("constant")
    near(lr_at(5, opt, s, 200), 0.6)
    near(lr_at(11, opt, s, 200), 1.0)
    near(lr_at(5000, opt, s, 200), 1.0)
  end)

  it("decays over train_iters when lr_decay_iters is not set, and min_lr defaults to 0", function()
    local s = lt.SchedulerConfig { lr_decay_style = "linear" } -- no warmup
    local o = lt.OptimizerConfig { lr = 2.0 }
    near(lr_at(0, o, s, 40), 2.0)
    near(lr_at(10, o, s, 40), 1.5)
    near(lr_at(40, o, s, 40), 0.0)
  end)

  it("inverse-square-root decays as 1/sqrt(step) after warmup", function()
    local s = sched("inverse-square-root", { lr_warmup_iters = 4, lr_warmup_init = 0.0, lr_decay_iters = 1000 })
    near(lr_at(2, opt, s, 1000), 0.5)
    near(lr_at(16, opt, s, 1000), 0.5)
    near(lr_at(64, opt, s, 1000), 0.25)
    near(lr_at(900, opt, s, 1000), 0.1) -- floored at min_lr
  end)

  it("WSD holds lr, then anneals over the last lr_wsd_decay_iters in Megatron's four styles", function()
    local function wsd(style, step)
      return lr_at(step, opt, sched("WSD", { lr_warmup_iters = 10, lr_decay_iters = 100, lr_wsd_decay_iters = 20,
        lr_wsd_decay_style = style }), 100)
    end
    for _, style in ipairs { "linear", "cosine", "exponential", "minus_sqrt" } do
      near(wsd(style, 5), 0.6)     -- warmup from lr_warmup_init 0.2
      near(wsd(style, 80), 1.0)    -- stable until the anneal starts at 100 - 20
      near(wsd(style, 100), 0.1)   -- min_lr at the end
      near(wsd(style, 150), 0.1)
    end
    near(wsd("linear", 90), 0.55)                       -- half way: 1 - 0.5
    near(wsd("cosine", 90), 0.55)                       -- 0.5 * (cos(pi / 2) + 1)
    near(wsd("exponential", 90), 0.1 + 0.9 * (2 * 0.5 ^ 0.5 - 1))
    near(wsd("minus_sqrt", 95), 0.1 + 0.9 * (1 - math.sqrt(0.75)))
  end)

  it("an unsupported decay style is an error naming it", function()
    assert_error_contains(function() lr_at(50, { lr = 1 }, { lr_decay_style = "step" }, 200) end, '"step"')
  end)
end)

describe("core.dataset (mock)", function()
  it("batch(first, count) is an int32 [count, seq + 1] tensor of ids below the vocabulary", function()
    local ds = core.dataset { seq_length = 16, vocab_size = 100, seed = 5 }
    assert.is_true(ds:is_mock())
    assert.are.equal(17, ds:sample_length())
    local b = ds:batch(0, 4)
    assert.are.equal("int32", b:dtype())
    assert.are.same({ 4, 17 }, b:shape())
    for _, row in ipairs(b:to_table()) do
      for _, id in ipairs(row) do
        assert(math.type(id) == "integer" and id >= 0 and id < 100, "token id " .. tostring(id))
      end
    end
    -- a batch starting later holds the same samples
    assert.are.same(b:to_table()[3], ds:batch(2, 1):to_table()[1])
    assert.are.same({ b:to_table()[2], b:to_table()[3] }, ds:batch(1, 2):to_table())
  end)

  it("is deterministic by seed; other seeds give other samples", function()
    local a = core.dataset { seq_length = 16, vocab_size = 100, seed = 5 }:batch(10, 3):to_table()
    local b = core.dataset { seq_length = 16, vocab_size = 100, seed = 5 }:batch(10, 3):to_table()
    local c = core.dataset { seq_length = 16, vocab_size = 100, seed = 6 }:batch(10, 3):to_table()
    assert.are.same(a, b)
    assert.are_not.same(a, c)
    -- different samples of one dataset differ too
    local d = core.dataset { seq_length = 16, vocab_size = 100, seed = 5 }:batch(0, 2):to_table()
    assert.are_not.same(d[1], d[2])
  end)

  it("rejects bad arguments with clear messages", function()
    local ds = core.dataset { seq_length = 8, vocab_size = 64 }
    assert_error_contains(function() ds:batch(-1, 2) end, "sample numbers start at 0")
    assert_error_contains(function() ds:batch(0, 0) end, "count must be positive")
    assert_error_contains(function() core.dataset { seq_length = 8, split_index = "dev" } end,
      "split_index must be train, valid or test", "dev")
    ds:close()
    assert_error_contains(function() ds:batch(0, 1) end, "dataset was already closed")
  end)
end)

-- A fresh, empty temporary folder (os.tmpname's name, made a folder) and a function removing it.
local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  return path, function() os.execute("rm -rf '" .. path .. "'") end
end

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function write_bytes(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function flip_byte(path, pos)
  local s = read_bytes(path)
  if pos < 0 then pos = #s + 1 + pos end
  write_bytes(path, s:sub(1, pos - 1) .. string.char(s:byte(pos) ~ 0x5a) .. s:sub(pos + 1))
end

describe("core.save_tensors / core.load_tensors", function()
  local dir, cleanup
  before_each(function() dir, cleanup = temp_dir() end)
  after_each(function() cleanup() end)

  it("round-trips tensors of every dtype and string metadata", function()
    local path = dir .. "/t.safetensors"
    local src = {
      w = T.from({ { 1.5, -2 }, { 3.25, 4 } }),
      ids = T.from({ 1, 2, 2147483647 }, "int32"),
      big = T.from({ 2 ^ 40, -7 }, "int64"),
      half = T.from({ 0.5, 1.5 }, "bfloat16"),
      cols = T.from({ { 1, 2, 3 }, { 4, 5, 6 } }):narrow(1, 2, 1), -- a contiguous view
    }
    core.save_tensors(path, src, { format = "luatron", iteration = "12" })
    local loaded, meta = core.load_tensors(path)
    assert(loaded, meta)
    assert.are.equal("luatron", meta.format)
    assert.are.equal("12", meta.iteration)
    for name, t in pairs(src) do
      assert(loaded[name], "missing " .. name)
      assert.are.equal(t:dtype(), loaded[name]:dtype(), name)
      assert.are.same(t:shape(), loaded[name]:shape(), name)
      assert.are.same(t:to_table(), loaded[name]:to_table(), name)
    end
    -- the loaded tensors are copies
    loaded.w:fill(0)
    assert.are.same({ { 1.5, -2 }, { 3.25, 4 } }, core.load_tensors(path).w:to_table())
  end)

  it("a truncated file or a flipped byte gives nil and a message", function()
    local path = dir .. "/t.safetensors"
    core.save_tensors(path, { a = T.from({ 1, 2, 3, 4 }), b = T.from({ 5, 6 }, "int32") })
    local good = read_bytes(path)
    assert(core.load_tensors(path))
    for _, cut in ipairs { 0, 4, 8, #good // 2, #good - 1 } do
      write_bytes(path, good:sub(1, cut))
      local t, err = core.load_tensors(path)
      assert.is_nil(t, "truncated to " .. cut)
      assert.are.equal("string", type(err))
      assert(#err > 0, "empty message")
    end
    for _, pos in ipairs { 1, 9, 20, #good - 10, #good } do
      write_bytes(path, good)
      flip_byte(path, pos)
      local t, err = core.load_tensors(path)
      assert.is_nil(t, "flipped byte " .. pos)
      assert.are.equal("string", type(err))
      assert(#err > 0, "empty message")
    end
    local t, err = core.load_tensors(dir .. "/missing.safetensors")
    assert.is_nil(t)
    assert(err:find("missing.safetensors", 1, true), err)
  end)

  it("refuses what it cannot save", function()
    assert_error_contains(function() core.save_tensors(dir .. "/x", { a = T.zeros({ 2, 2 }):narrow(2, 1, 1) }) end,
      "'a' is not a contiguous tensor")
    assert_error_contains(function() core.save_tensors(dir .. "/x", { a = 3 }) end, "'a' is not a contiguous tensor")
    assert_error_contains(function() core.save_tensors(dir .. "/no/such/dir/x", { a = T.zeros({ 1 }) }) end,
      "cannot save")
  end)
end)

describe("luatron.checkpoint", function()
  local ckpt = lt.checkpoint
  local dir, cleanup
  before_each(function() dir, cleanup = temp_dir() end)
  after_each(function() cleanup() end)

  -- A model and an adam optimizer after `steps` training steps.
  local function trained(seed, steps)
    local m = lt.build_model(small_provider(), seed)
    local opt = lt.optimizer(m, lt.OptimizerConfig { lr = 1e-3 })
    for s = 1, steps do
      m:zero_grad()
      local ctx, _, valid = m:forward(token_batch(2, 9, s))
      m:backward(ctx, 1 / valid)
      opt:step(1e-3)
    end
    return m, opt
  end

  it("save then load restores weights and optimizer state exactly into a fresh model", function()
    local m, opt = trained(1, 3)
    local state = { iteration = 3, consumed_samples = 6, optimizer_steps = 3, seed = 1 }
    local folder = ckpt.save(dir, m, opt, state, { note = "spec" })
    assert.are.equal(dir .. "/iter_0000003", folder)
    assert.are.equal(3, ckpt.latest_iteration(dir))
    for _, f in ipairs { "model.safetensors", "optimizer.safetensors", "state.json", "config.json" } do
      assert(io.open(folder .. "/" .. f), "missing " .. f)
    end
    local fresh = lt.build_model(small_provider(), 99)
    local fresh_opt = lt.optimizer(fresh, lt.OptimizerConfig { lr = 1e-3 })
    assert(max_diff(fresh:flat_weights(), m:flat_weights()) > 1e-3, "seeds 1 and 99 should differ")
    local loaded, where = ckpt.load(dir, fresh, fresh_opt)
    assert.are.equal(folder, where)
    assert.are.same(state, loaded)
    assert.are.equal(0, max_diff(fresh:flat_weights(), m:flat_weights()))
    assert.are.equal(0, max_diff(fresh_opt:state("exp_avg"), opt:state("exp_avg")))
    assert.are.equal(0, max_diff(fresh_opt:state("exp_avg_sq"), opt:state("exp_avg_sq")))
    assert.are.equal(3, fresh_opt:num_steps())
    -- the saved model file uses Megatron's names
    local tensors = assert(core.load_tensors(folder .. "/model.safetensors"))
    assert(tensors["decoder.layers.0.self_attention.linear_qkv.weight"], "missing qkv weight")
    assert.are.same({ 128, 16 }, tensors["embedding.word_embeddings.weight"]:shape())
    -- a later save moves the tracker
    ckpt.save(dir, m, nil, { iteration = 5, optimizer_steps = 5, seed = 1 })
    assert.are.equal(5, ckpt.latest_iteration(dir))
    local fresh2 = lt.build_model(small_provider(), 98)
    assert.are.equal(5, ckpt.load(dir, fresh2).iteration) -- weights only
    assert.are.equal(0, max_diff(fresh2:flat_weights(), m:flat_weights()))
  end)

  it("a folder without a checkpoint loads nothing", function()
    local m = lt.build_model(small_provider(), 1)
    assert.is_nil(ckpt.latest_iteration(dir))
    assert.is_nil(ckpt.load(dir, m))
  end)

  it("a corrupt model.safetensors raises a clear error and leaves the model unchanged", function()
    local m, opt = trained(1, 1)
    local folder = ckpt.save(dir, m, opt, { iteration = 1, optimizer_steps = 1, seed = 1 })
    flip_byte(folder .. "/model.safetensors", -3)
    local target = lt.build_model(small_provider(), 2)
    local target_opt = lt.optimizer(target, lt.OptimizerConfig { lr = 1e-3 })
    local before = flat_clone(target)
    assert_error_contains(function() ckpt.load(dir, target, target_opt) end, "corrupt checkpoint", "model.safetensors")
    assert.are.equal(0, max_diff(target:flat_weights(), before))
    assert.are.equal(0, target_opt:num_steps())
    assert.are.equal(0, target_opt:state("exp_avg"):norm())
  end)

  it("a corrupt optimizer.safetensors changes neither the model nor the optimizer", function()
    local m, opt = trained(1, 1)
    local folder = ckpt.save(dir, m, opt, { iteration = 1, optimizer_steps = 1, seed = 1 })
    local s = read_bytes(folder .. "/optimizer.safetensors")
    write_bytes(folder .. "/optimizer.safetensors", s:sub(1, #s - 100))
    local target = lt.build_model(small_provider(), 2)
    local target_opt = lt.optimizer(target, lt.OptimizerConfig { lr = 1e-3 })
    local before = flat_clone(target)
    assert_error_contains(function() ckpt.load(dir, target, target_opt) end, "corrupt checkpoint",
      "optimizer.safetensors")
    assert.are.equal(0, max_diff(target:flat_weights(), before))
    assert.are.equal(0, target_opt:state("exp_avg"):norm())
  end)

  it("a checkpoint of another model shape is refused before anything changes", function()
    local m = lt.build_model(small_provider(), 1)
    ckpt.save(dir, m, nil, { iteration = 2, seed = 1 })
    local other = lt.build_model(small_provider { hidden_size = 32 }, 1)
    local before = flat_clone(other)
    local msg = assert_error_contains(function() ckpt.load(dir, other) end, "model.safetensors: tensor '",
      "' has shape [", "expects [")
    local saved, wanted = msg:match("has shape %[(.-)%].-expects %[(.-)%]")
    assert(saved and wanted and saved ~= wanted, msg)
    assert.are.equal(0, max_diff(other:flat_weights(), before))
    local deeper = lt.build_model(small_provider { num_layers = 2 }, 1)
    assert_error_contains(function() ckpt.load(dir, deeper) end, "missing tensor 'decoder.layers.1.")
  end)

  it("garbage in latest_checkpointed_iteration.txt is a clear error", function()
    local m = lt.build_model(small_provider(), 1)
    ckpt.save(dir, m, nil, { iteration = 4, seed = 1 })
    write_bytes(dir .. "/latest_checkpointed_iteration.txt", "release\n")
    assert_error_contains(function() ckpt.latest_iteration(dir) end, "latest_checkpointed_iteration.txt is corrupt",
      '"release')
    assert_error_contains(function() ckpt.load(dir, m) end, "latest_checkpointed_iteration.txt is corrupt")
    write_bytes(dir .. "/latest_checkpointed_iteration.txt", "7\n") -- no such folder
    assert_error_contains(function() ckpt.load(dir, m) end, "iter_0000007", "no state.json")
    write_bytes(dir .. "/latest_checkpointed_iteration.txt", " 4 \n")
    assert.are.equal(4, ckpt.load(dir, m).iteration)
  end)

  it("a corrupt state.json is a clear error", function()
    local m = lt.build_model(small_provider(), 1)
    local folder = ckpt.save(dir, m, nil, { iteration = 4, seed = 1 })
    write_bytes(folder .. "/state.json", "{\"iteration\": 4,")
    assert_error_contains(function() ckpt.load(dir, m) end, "state.json is corrupt")
  end)
end)

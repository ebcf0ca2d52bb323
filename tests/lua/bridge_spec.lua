-- Specs for the Hugging Face bridge (luatron.bridge, `luatron convert`). Every Hugging Face folder is
-- made here: config.json and safetensors files written byte by byte by this spec (its own writer, not
-- luatron's), with random float32 weights. The imported model's loss is checked against this spec's
-- own forward of the Hugging Face model (double precision, straight from the HF tensors and HF's
-- definitions: Conv1D, q/k/v projections, rotate-half RoPE, repeat_kv, gate/up/down); exports are read
-- back with this spec's own safetensors reader and compared byte for byte.
-- Needs LUATRON (the luatron command; tests/lua/BUILD provides it).
local lt = require "luatron"
local json = require "luatron.json"
local checkpoint = require "luatron.checkpoint"

local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, assert_error_contains = h.q, h.tmpdir, h.assert_error_contains

------------------------------------------------------------------------------------------------
-- Files
------------------------------------------------------------------------------------------------

local read, write = h.read, h.write

-- The bits of a float32.
local function f32_bits(x) return (string.unpack("<I4", string.pack("<f", x))) end

-- A safetensors file of tensors W[name] = { shape =, v = flat values } for names, in that order: float32,
-- or dtype "BF16" (the values' upper 16 bits; they must be bfloat16 values), or dtype(name) per tensor.
local function write_safetensors(path, W, names, dtype)
  local header, data, at = {}, {}, 0
  for _, name in ipairs(names) do
    local t = assert(W[name], name)
    local parts = {}
    local dt = type(dtype) == "function" and dtype(name) or dtype or "F32"
    for i, x in ipairs(t.v) do
      if dt == "BF16" then
        assert(f32_bits(x) & 0xFFFF == 0, "not a bfloat16 value")
        parts[i] = string.pack("<I2", f32_bits(x) >> 16)
      elseif dt == "F16" then
        parts[i] = string.pack("<I2", 0x3c00) -- 1.0 (values do not matter: the dtype is refused)
      else
        parts[i] = string.pack("<f", x)
      end
    end
    local bytes = table.concat(parts)
    header[name] = { dtype = dt, shape = json.array { table.unpack(t.shape) }, data_offsets = { at, at + #bytes } }
    data[#data + 1] = bytes
    at = at + #bytes
  end
  header.__metadata__ = { format = "pt" }
  local text = json.encode(header)
  text = text .. string.rep(" ", (8 - #text % 8) % 8)
  write(path, string.pack("<I8", #text) .. text .. table.concat(data))
end

-- name -> { dtype =, shape = "a,b", bytes = raw data } and the metadata of a safetensors file.
local function read_safetensors(path)
  local s = read(path)
  local n = string.unpack("<I8", s)
  local header = json.decode(s:sub(9, 8 + n))
  local out = {}
  for name, info in pairs(header) do
    if name ~= "__metadata__" then
      out[name] = { dtype = info.dtype, shape = table.concat(info.shape, ","),
        bytes = s:sub(8 + n + info.data_offsets[1] + 1, 8 + n + info.data_offsets[2]) }
    end
  end
  return out, header.__metadata__
end

local function sorted_keys(t)
  local k = {}
  for name in pairs(t) do k[#k + 1] = name end
  table.sort(k)
  return k
end

-- Every tensor of a folder (model.safetensors or the shards of its index), by name.
local function folder_tensors(dir)
  local f = io.open(dir .. "/model.safetensors", "rb")
  if f then
    f:close()
    return (read_safetensors(dir .. "/model.safetensors"))
  end
  local index = json.decode(read(dir .. "/model.safetensors.index.json"))
  local all, seen = {}, {}
  for _, file in pairs(index.weight_map) do
    if not seen[file] then
      seen[file] = true
      for name, t in pairs((read_safetensors(dir .. "/" .. file))) do all[name] = t end
    end
  end
  return all
end

------------------------------------------------------------------------------------------------
-- Random Hugging Face models
------------------------------------------------------------------------------------------------

-- A deterministic generator of numbers in [0, 1) (a 64-bit LCG).
local function generator(seed)
  local s = seed
  return function()
    s = s * 6364136223846793005 + 1442695040888963407
    return ((s >> 11) & ((1 << 53) - 1)) / 2 ^ 53
  end
end

local function f32(x) return (string.unpack("<f", string.pack("<f", x))) end

-- Random float32 weights W[name] = { shape =, v = }: uniform around `center` within +-scale (bfloat16
-- values with bf16).
local function weights(seed, bf16)
  local W, names, u = {}, {}, generator(seed)
  local function add(name, shape, scale, center)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    local v = {}
    for i = 1, n do
      v[i] = f32((center or 0) + scale * (2 * u() - 1))
      if bf16 then v[i] = string.unpack("<f", string.pack("<I4", f32_bits(v[i]) & 0xFFFF0000)) end
    end
    W[name], names[#names + 1] = { shape = shape, v = v }, name
  end
  return W, names, add
end

local GPT2 = { architectures = { "GPT2LMHeadModel" }, model_type = "gpt2", vocab_size = 96, n_positions = 8,
  n_embd = 32, n_layer = 2, n_head = 4, layer_norm_epsilon = 1e-5, activation_function = "gelu_new",
  resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1, initializer_range = 0.02, tie_word_embeddings = true }

local LLAMA = { architectures = { "LlamaForCausalLM" }, model_type = "llama", vocab_size = 100, hidden_size = 32,
  intermediate_size = 48, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
  max_position_embeddings = 16, rms_norm_eps = 1e-6, rope_theta = 10000.0, hidden_act = "silu",
  tie_word_embeddings = false, rope_scaling = json.null, attention_bias = false, mlp_bias = false,
  bos_token_id = 1, eos_token_id = 2 }

local QWEN2 = { architectures = { "Qwen2ForCausalLM" }, model_type = "qwen2", vocab_size = 80, hidden_size = 32,
  intermediate_size = 40, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 1,
  max_position_embeddings = 16, rms_norm_eps = 1e-6, rope_theta = 1000000.0, hidden_act = "silu",
  tie_word_embeddings = true, use_sliding_window = false, sliding_window = 4096, max_window_layers = 2 }

local function with(base, extra)
  local t = {}
  for k, v in pairs(base) do t[k] = v end
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- The HF tensors of a config (GPT-2 names with "transformer." unless opts.no_prefix; opts.buffers adds
-- GPT-2's attn.bias causal-mask buffers, as older files carry).
local function hf_weights(cfg, seed, opts)
  opts = opts or {}
  local W, names, add = weights(seed, opts.bf16)
  if cfg.model_type == "gpt2" then
    local C, F, V, S = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd, cfg.vocab_size, cfg.n_positions
    local p = opts.no_prefix and "" or "transformer."
    add(p .. "wte.weight", { V, C }, 0.5)
    add(p .. "wpe.weight", { S, C }, 0.2)
    for l = 0, cfg.n_layer - 1 do
      local b = p .. "h." .. l .. "."
      add(b .. "ln_1.weight", { C }, 0.1, 1)
      add(b .. "ln_1.bias", { C }, 0.1)
      add(b .. "attn.c_attn.weight", { C, 3 * C }, 0.3)
      add(b .. "attn.c_attn.bias", { 3 * C }, 0.1)
      add(b .. "attn.c_proj.weight", { C, C }, 0.2)
      add(b .. "attn.c_proj.bias", { C }, 0.1)
      add(b .. "ln_2.weight", { C }, 0.1, 1)
      add(b .. "ln_2.bias", { C }, 0.1)
      add(b .. "mlp.c_fc.weight", { C, F }, 0.2)
      add(b .. "mlp.c_fc.bias", { F }, 0.1)
      add(b .. "mlp.c_proj.weight", { F, C }, 0.2)
      add(b .. "mlp.c_proj.bias", { C }, 0.1)
      if opts.buffers then add(b .. "attn.bias", { 1, 1, S, S }, 0, 1) end
    end
    add(p .. "ln_f.weight", { C }, 0.1, 1)
    add(p .. "ln_f.bias", { C }, 0.1)
    if cfg.tie_word_embeddings == false then add("lm_head.weight", { V, C }, 0.5) end
  else
    local C, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    local H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    local D = cfg.head_dim or C // H
    add("model.embed_tokens.weight", { V, C }, 0.5)
    for l = 0, cfg.num_hidden_layers - 1 do
      local b = "model.layers." .. l .. "."
      add(b .. "input_layernorm.weight", { C }, 0.1, 1)
      add(b .. "self_attn.q_proj.weight", { H * D, C }, 0.3)
      add(b .. "self_attn.k_proj.weight", { G * D, C }, 0.3)
      add(b .. "self_attn.v_proj.weight", { G * D, C }, 0.3)
      if cfg.model_type == "qwen2" then
        add(b .. "self_attn.q_proj.bias", { H * D }, 0.2)
        add(b .. "self_attn.k_proj.bias", { G * D }, 0.2)
        add(b .. "self_attn.v_proj.bias", { G * D }, 0.2)
      end
      add(b .. "self_attn.o_proj.weight", { C, H * D }, 0.2)
      add(b .. "post_attention_layernorm.weight", { C }, 0.1, 1)
      add(b .. "mlp.gate_proj.weight", { F, C }, 0.3)
      add(b .. "mlp.up_proj.weight", { F, C }, 0.3)
      add(b .. "mlp.down_proj.weight", { C, F }, 0.2)
    end
    add("model.norm.weight", { C }, 0.1, 1)
    if not cfg.tie_word_embeddings then add("lm_head.weight", { V, C }, 0.5) end
  end
  return W, names
end

-- A Hugging Face folder: config.json and model.safetensors, or opts.shards files with an index.
local function hf_folder(cfg, seed, opts)
  opts = opts or {}
  local dir = tmpdir()
  local W, names = hf_weights(cfg, seed, opts)
  write(dir .. "/config.json", json.encode(cfg, { indent = 2 }))
  if opts.shards then
    local map, per = {}, (#names + opts.shards - 1) // opts.shards
    for s = 1, opts.shards do
      local file = ("model-%05d-of-%05d.safetensors"):format(s, opts.shards)
      local part = {}
      for i = (s - 1) * per + 1, math.min(s * per, #names) do
        part[#part + 1] = names[i]
        map[names[i]] = file
      end
      write_safetensors(dir .. "/" .. file, W, part, opts.bf16 and "BF16")
    end
    write(dir .. "/model.safetensors.index.json", json.encode({ metadata = { total_size = 0 }, weight_map = map }))
  else
    write_safetensors(dir .. "/model.safetensors", W, names, opts.bf16 and "BF16")
  end
  return dir, W, names
end

------------------------------------------------------------------------------------------------
-- The Hugging Face models' forward, in double precision
------------------------------------------------------------------------------------------------

-- nn.Linear: W [out, in]; y = W x + b
local function linear(W, x, b)
  local out, inn = W.shape[1], W.shape[2]
  local y = {}
  for o = 1, out do
    local s, base = b and b.v[o] or 0, (o - 1) * inn
    for i = 1, inn do s = s + W.v[base + i] * x[i] end
    y[o] = s
  end
  return y
end

-- GPT-2's Conv1D: W [in, out]; y = x W + b
local function conv1d(W, x, b)
  local inn, out = W.shape[1], W.shape[2]
  local y = {}
  for o = 1, out do
    local s = b.v[o]
    for i = 1, inn do s = s + x[i] * W.v[(i - 1) * out + o] end
    y[o] = s
  end
  return y
end

local function layer_norm(x, w, b, eps)
  local n, mean, var = #x, 0, 0
  for i = 1, n do mean = mean + x[i] end
  mean = mean / n
  for i = 1, n do var = var + (x[i] - mean) ^ 2 end
  var = var / n
  local y = {}
  for i = 1, n do y[i] = (x[i] - mean) / math.sqrt(var + eps) * w.v[i] + b.v[i] end
  return y
end

local function rms_norm(x, w, eps)
  local n, ms = #x, 0
  for i = 1, n do ms = ms + x[i] * x[i] end
  local r = 1 / math.sqrt(ms / n + eps)
  local y = {}
  for i = 1, n do y[i] = x[i] * r * w.v[i] end
  return y
end

local function gelu_new(x) return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ^ 3))) end

-- erf in double precision: its Taylor series below 2.5, else 1 - erfc by erfc's continued fraction.
local function erf(x)
  local a = math.abs(x)
  if a < 2.5 then
    local term, sum, n = a, a, 0
    repeat
      n = n + 1
      term = -term * a * a / n
      sum = sum + term / (2 * n + 1)
    until math.abs(term) < 1e-17 * math.abs(sum)
    return (x < 0 and -1 or 1) * 2 / math.sqrt(math.pi) * sum
  end
  local k = a
  for n = 80, 1, -1 do k = a + (n / 2) / k end
  local r = 1 - math.exp(-a * a) / (math.sqrt(math.pi) * k)
  return x < 0 and -r or r
end

local function gelu_exact(x) return 0.5 * x * (1 + erf(x / math.sqrt(2))) end
local function silu(x) return x / (1 + math.exp(-x)) end

local function add_to(x, y) for i = 1, #x do x[i] = x[i] + y[i] end end

-- Head `hd` (0-based) of a vector of heads of D values.
local function head(vec, hd, D)
  local out = {}
  for i = 1, D do out[i] = vec[hd * D + i] end
  return out
end

-- HF's rotate-half RoPE at position pos: inv_freq_i = theta^(-2i/D).
local function rope(x, pos, theta)
  local D, half = #x, #x // 2
  local y = {}
  for i = 0, half - 1 do
    local a = pos * theta ^ (-(2 * i) / D)
    local c, s = math.cos(a), math.sin(a)
    y[i + 1] = x[i + 1] * c - x[i + half + 1] * s
    y[i + half + 1] = x[i + half + 1] * c + x[i + 1] * s
  end
  return y
end

-- Causal attention over one sequence: qs[t][h], ks[t][g], vs[t][g] (vectors of D); query head h reads
-- key/value head h // (H / G) (HF's repeat_kv). Returns per position the heads' outputs concatenated.
local function attention(qs, ks, vs, H, G, D)
  local T, rep, out = #qs, H // G, {}
  for t = 1, T do
    local o = {}
    for hd = 0, H - 1 do
      local g = hd // rep
      local scores, mx = {}, -math.huge
      for s = 1, t do
        local d = 0
        for i = 1, D do d = d + qs[t][hd + 1][i] * ks[s][g + 1][i] end
        scores[s] = d / math.sqrt(D)
        mx = math.max(mx, scores[s])
      end
      local z = 0
      for s = 1, t do
        scores[s] = math.exp(scores[s] - mx)
        z = z + scores[s]
      end
      for i = 1, D do
        local acc = 0
        for s = 1, t do acc = acc + scores[s] / z * vs[s][g + 1][i] end
        o[hd * D + i] = acc
      end
    end
    out[t] = o
  end
  return out
end

-- Mean cross-entropy of the final hidden states xs against targets, logits by E [V, C] rows.
local function loss_of_states(xs, E, targets)
  local V, C, total, n = E.shape[1], E.shape[2], 0, 0
  for t, x in ipairs(xs) do
    local logits, mx = {}, -math.huge
    for v = 1, V do
      local s = 0
      for i = 1, C do s = s + E.v[(v - 1) * C + i] * x[i] end
      logits[v] = s
      mx = math.max(mx, s)
    end
    local z = 0
    for v = 1, V do z = z + math.exp(logits[v] - mx) end
    total = total + (mx + math.log(z)) - logits[targets[t] + 1]
    n = n + 1
  end
  return total, n
end

-- GPT2LMHeadModel's mean loss over sequences tokens[b][t] (0-based ids) and targets.
local function gpt2_loss(cfg, W, tokens, targets, prefix)
  local p = prefix or "transformer."
  local C, NH, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
  local D = C // NH
  local total, count = 0, 0
  for b = 1, #tokens do
    local xs = {}
    for t, id in ipairs(tokens[b]) do
      local x = {}
      for i = 1, C do x[i] = W[p .. "wte.weight"].v[id * C + i] + W[p .. "wpe.weight"].v[(t - 1) * C + i] end
      xs[t] = x
    end
    for l = 0, cfg.n_layer - 1 do
      local L = function(n) return W[p .. "h." .. l .. "." .. n] end
      local qs, ks, vs = {}, {}, {}
      for t, x in ipairs(xs) do
        local y = conv1d(L "attn.c_attn.weight", layer_norm(x, L "ln_1.weight", L "ln_1.bias", eps), L "attn.c_attn.bias")
        qs[t], ks[t], vs[t] = {}, {}, {}
        for hd = 0, NH - 1 do
          qs[t][hd + 1], ks[t][hd + 1], vs[t][hd + 1] = head(y, hd, D), head(y, NH + hd, D), head(y, 2 * NH + hd, D)
        end
      end
      local att = attention(qs, ks, vs, NH, NH, D)
      for t, x in ipairs(xs) do
        add_to(x, conv1d(L "attn.c_proj.weight", att[t], L "attn.c_proj.bias"))
        local m = conv1d(L "mlp.c_fc.weight", layer_norm(x, L "ln_2.weight", L "ln_2.bias", eps), L "mlp.c_fc.bias")
        local gelu = cfg.activation_function == "gelu" and gelu_exact or gelu_new
        for i = 1, #m do m[i] = gelu(m[i]) end
        add_to(x, conv1d(L "mlp.c_proj.weight", m, L "mlp.c_proj.bias"))
      end
    end
    for t, x in ipairs(xs) do xs[t] = layer_norm(x, W[p .. "ln_f.weight"], W[p .. "ln_f.bias"], eps) end
    local E = cfg.tie_word_embeddings == false and W["lm_head.weight"] or W[p .. "wte.weight"]
    local s, n = loss_of_states(xs, E, targets[b])
    total, count = total + s, count + n
  end
  return total / count
end

-- LlamaForCausalLM's (and Qwen2ForCausalLM's) mean loss.
local function llama_loss(cfg, W, tokens, targets)
  local C, H, G, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
  local D = cfg.head_dim or C // H
  local total, count = 0, 0
  for b = 1, #tokens do
    local xs = {}
    for t, id in ipairs(tokens[b]) do
      local x = {}
      for i = 1, C do x[i] = W["model.embed_tokens.weight"].v[id * C + i] end
      xs[t] = x
    end
    for l = 0, cfg.num_hidden_layers - 1 do
      local L = function(n) return W["model.layers." .. l .. "." .. n] end
      local qs, ks, vs = {}, {}, {}
      for t, x in ipairs(xs) do
        local a = rms_norm(x, L "input_layernorm.weight", eps)
        local qv = linear(L "self_attn.q_proj.weight", a, L "self_attn.q_proj.bias")
        local kv = linear(L "self_attn.k_proj.weight", a, L "self_attn.k_proj.bias")
        local vv = linear(L "self_attn.v_proj.weight", a, L "self_attn.v_proj.bias")
        qs[t], ks[t], vs[t] = {}, {}, {}
        for hd = 0, H - 1 do qs[t][hd + 1] = rope(head(qv, hd, D), t - 1, cfg.rope_theta) end
        for g = 0, G - 1 do
          ks[t][g + 1] = rope(head(kv, g, D), t - 1, cfg.rope_theta)
          vs[t][g + 1] = head(vv, g, D)
        end
      end
      local att = attention(qs, ks, vs, H, G, D)
      for t, x in ipairs(xs) do
        add_to(x, linear(L "self_attn.o_proj.weight", att[t]))
        local m = rms_norm(x, L "post_attention_layernorm.weight", eps)
        local gate, up = linear(L "mlp.gate_proj.weight", m), linear(L "mlp.up_proj.weight", m)
        for i = 1, #gate do gate[i] = silu(gate[i]) * up[i] end
        add_to(x, linear(L "mlp.down_proj.weight", gate))
      end
    end
    for t, x in ipairs(xs) do xs[t] = rms_norm(x, W["model.norm.weight"], eps) end
    local E = cfg.tie_word_embeddings and W["model.embed_tokens.weight"] or W["lm_head.weight"]
    local s, n = loss_of_states(xs, E, targets[b])
    total, count = total + s, count + n
  end
  return total / count
end

local function hf_loss(cfg, W, tokens, targets, prefix)
  if cfg.model_type == "gpt2" then return gpt2_loss(cfg, W, tokens, targets, prefix) end
  return llama_loss(cfg, W, tokens, targets)
end

------------------------------------------------------------------------------------------------
-- luatron's side
------------------------------------------------------------------------------------------------

-- Two sequences of 8 tokens and their targets (0-based ids below V).
local function batch(V)
  local tokens, targets = {}, {}
  for b = 1, 2 do
    tokens[b], targets[b] = {}, {}
    for t = 1, 8 do
      tokens[b][t] = (b * 37 + t * 11 + t * t * 3) % V
      targets[b][t] = (b * 17 + t * 29 + 5) % V
    end
  end
  return tokens, targets
end

local function model_loss(model, tokens, targets)
  local ctx, loss = model:forward(lt.tensor.from(tokens, "int32"), lt.tensor.from(targets, "int32"), nil)
  ctx:release()
  return loss
end

-- Imports dir; returns the bridge, the provider and the loaded model.
local function import(dir)
  local bridge = lt.AutoBridge.from_hf_pretrained(dir)
  local provider = bridge:to_megatron_provider()
  local model = lt.build_model(provider, 7)
  bridge:load_hf_weights(model)
  return bridge, provider, model
end

local function assert_close(ref, got, what)
  assert(math.abs(got - ref) <= 1e-5 * math.abs(ref),
    ("%s: luatron %.9g, the Hugging Face forward %.9g (relative %.2e)"):format(what, got, ref,
      math.abs(got - ref) / math.abs(ref)))
end

-- Every tensor of two folders: the same names, dtypes, shapes and bytes.
local function assert_same_tensors(a_dir, b_dir)
  local a, b = folder_tensors(a_dir), folder_tensors(b_dir)
  assert.are.same(sorted_keys(a), sorted_keys(b))
  for name, t in pairs(a) do
    assert.are.equal(t.dtype, b[name].dtype, name)
    assert.are.equal(t.shape, b[name].shape, name)
    assert(t.bytes == b[name].bytes, "tensor " .. name .. " differs")
  end
end

local function names_of(model)
  local out = {}
  for _, p in ipairs(model:parameters()) do out[p.name] = table.concat(p.full_shape, "x") end
  return out
end

------------------------------------------------------------------------------------------------

describe("AutoBridge.from_hf_pretrained", function()
  it("GPT-2: the provider, Megatron's names and shapes, and the loss of the HF forward", function()
    local dir, W = hf_folder(GPT2, 1, { buffers = true })
    local bridge, provider, model = import(dir)
    assert.are.equal("GPT2LMHeadModel", bridge.architecture)
    local p = provider:to_table()
    assert.are.equal("LayerNorm", p.normalization)
    assert.is_true(p.openai_gelu)
    assert.are.equal("learned_absolute", p.position_embedding_type)
    assert.is_true(p.share_embeddings_and_output_weights)
    assert.is_true(p.add_bias_linear)
    assert.are.equal(8, p.seq_length)
    assert.are.equal(128, p.ffn_hidden_size)
    assert.are.equal(32, p.make_vocab_size_divisible_by) -- 96 = 3 x 32: not padded
    assert.are.equal(0.1, p.hidden_dropout)
    local names = names_of(model)
    assert.are.equal("96x32", names["embedding.word_embeddings.weight"])
    assert.are.equal("8x32", names["embedding.position_embeddings.weight"])
    assert.are.equal("96x32", names["decoder.layers.1.self_attention.linear_qkv.weight"])
    assert.are.equal("128x32", names["decoder.layers.0.mlp.linear_fc1.weight"])
    assert.is_nil(names["output_layer.weight"])
    local tokens, targets = batch(96)
    assert_close(hf_loss(GPT2, W, tokens, targets), model_loss(model, tokens, targets), "GPT-2")
  end)

  it("GPT-2 untied, with names as GPT2Model saves them (no transformer. prefix), exact GELU", function()
    local cfg = with(GPT2, { tie_word_embeddings = false, activation_function = "gelu" })
    local dir, W = hf_folder(cfg, 2, { no_prefix = true })
    local _, provider, model = import(dir)
    assert.is_false(provider:to_table().openai_gelu)
    assert.are.equal("96x32", names_of(model)["output_layer.weight"])
    local tokens, targets = batch(96)
    assert_close(hf_loss(cfg, W, tokens, targets, ""), model_loss(model, tokens, targets), "GPT-2 untied, exact GELU")
  end)

  it("Llama with grouped-query attention, untied: SwiGLU, RMSNorm, RoPE", function()
    local dir, W = hf_folder(LLAMA, 3)
    local bridge, provider, model = import(dir)
    assert.are.equal("LlamaForCausalLM", bridge.architecture)
    local p = provider:to_table()
    assert.are.same({ "RMSNorm", "silu", true, "rope", 10000.0, 2, false, false, false, 16, 48, 4 },
      { p.normalization, p.activation_func, p.gated_linear_unit, p.position_embedding_type, p.rotary_base,
        p.num_query_groups, p.add_bias_linear, p.add_qkv_bias, p.share_embeddings_and_output_weights,
        p.seq_length, p.ffn_hidden_size, p.make_vocab_size_divisible_by })
    local names = names_of(model)
    assert.are.equal("64x32", names["decoder.layers.0.self_attention.linear_qkv.weight"]) -- (4 + 2 * 2) * 8
    assert.are.equal("96x32", names["decoder.layers.1.mlp.linear_fc1.weight"])
    assert.are.equal("100x32", names["output_layer.weight"])
    assert.is_nil(names["decoder.final_layernorm.bias"])
    local tokens, targets = batch(100)
    assert_close(hf_loss(LLAMA, W, tokens, targets), model_loss(model, tokens, targets), "Llama")
  end)

  it("Llama tied, with head_dim other than hidden_size / num_attention_heads", function()
    local cfg = with(LLAMA, { tie_word_embeddings = true, head_dim = 16, num_key_value_heads = 4 })
    local dir, W = hf_folder(cfg, 4)
    local _, provider, model = import(dir)
    assert.are.equal(16, provider:to_table().kv_channels)
    assert.are.equal("32x64", names_of(model)["decoder.layers.0.self_attention.linear_proj.weight"])
    local tokens, targets = batch(100)
    assert_close(hf_loss(cfg, W, tokens, targets), model_loss(model, tokens, targets), "Llama tied")
  end)

  it("Qwen2 in shards (model.safetensors.index.json) with q/k/v biases, tied", function()
    local dir, W = hf_folder(QWEN2, 5, { shards = 3 })
    local bridge, provider, model = import(dir)
    assert.are.equal(3, #bridge.files)
    assert.is_true(provider:to_table().add_qkv_bias)
    assert.are.equal(16, provider:to_table().make_vocab_size_divisible_by) -- 80 = 5 x 16
    assert.are.equal("48", names_of(model)["decoder.layers.1.self_attention.linear_qkv.bias"]) -- (4 + 2) * 8
    local tokens, targets = batch(80)
    assert_close(hf_loss(QWEN2, W, tokens, targets), model_loss(model, tokens, targets), "Qwen2")
  end)

  it("bfloat16 tensors (as Llama and Qwen2 checkpoints hold), saved back as float32 of the same values", function()
    local dir, W = hf_folder(QWEN2, 8, { bf16 = true, shards = 2 })
    local bridge, _, model = import(dir)
    local tokens, targets = batch(80)
    assert_close(hf_loss(QWEN2, W, tokens, targets), model_loss(model, tokens, targets), "Qwen2 bf16")
    local out = tmpdir()
    bridge:save_hf_pretrained(model, out)
    local saved = folder_tensors(out)
    for name, t in pairs(W) do
      assert.are.equal("F32", saved[name].dtype)
      local parts = {}
      for i, x in ipairs(t.v) do parts[i] = string.pack("<f", x) end
      assert(saved[name].bytes == table.concat(parts), name)
    end
    -- float16 is refused, saying what the bridge reads
    local f16, W16, names16 = hf_folder(QWEN2, 8)
    write_safetensors(f16 .. "/model.safetensors", W16, names16, function(name)
      return name == "model.norm.weight" and "F16" or "F32"
    end)
    assert_error_contains(function() import(f16) end, "'model.norm.weight' has dtype F16",
      "the bridge reads float32 and bfloat16 tensors")
  end)

  it("Mistral without a sliding window is Llama's model", function()
    local cfg = with(LLAMA, { architectures = { "MistralForCausalLM" }, model_type = "mistral", sliding_window = json.null,
      attention_bias = json.null, mlp_bias = json.null })
    local dir, W = hf_folder(cfg, 6)
    local _, _, model = import(dir)
    local tokens, targets = batch(100)
    assert_close(hf_loss(cfg, W, tokens, targets), model_loss(model, tokens, targets), "Mistral")
    -- a window no shorter than the sequence is plain causal attention
    local wide = hf_folder(with(cfg, { sliding_window = 16 }), 6)
    assert_close(hf_loss(cfg, W, tokens, targets), model_loss(select(3, import(wide)), tokens, targets), "Mistral w16")
  end)
end)

describe("save_hf_pretrained", function()
  for _, case in ipairs {
    { "GPT-2 (tied: no lm_head written)", GPT2, {} },
    { "GPT-2 untied", with(GPT2, { tie_word_embeddings = false }), {} },
    { "Llama with GQA", LLAMA, {} },
    { "Qwen2 from shards", QWEN2, { shards = 2 } },
  } do
    it("gives back every tensor bit for bit: " .. case[1], function()
      local cfg = case[2]
      local dir = hf_folder(cfg, 11, case[3])
      local bridge, _, model = import(dir)
      local out = tmpdir() .. "/hf"
      bridge:save_hf_pretrained(model, out)
      assert_same_tensors(dir, out)
      local tensors, meta = read_safetensors(out .. "/model.safetensors")
      assert.are.equal("pt", meta.format) -- transformers refuses safetensors without it
      if cfg.tie_word_embeddings ~= false then assert.is_nil(tensors["lm_head.weight"]) end
      local saved = json.decode(read(out .. "/config.json"))
      assert.are.equal("float32", saved.torch_dtype)
      assert.are.same(cfg.architectures, { table.unpack(saved.architectures) })
      for k, v in pairs(cfg) do
        if k ~= "architectures" then assert.are.same(v, saved[k], k) end
      end
      -- and it imports again to the same model
      local _, _, again = import(out)
      local tokens, targets = batch(cfg.vocab_size)
      assert.are.equal(model_loss(model, tokens, targets), model_loss(again, tokens, targets))
    end)
  end

  it("saves a model built here (from_megatron_provider): Llama, Qwen2 and GPT-2 configs that import back", function()
    for _, fields in ipairs {
      { num_layers = 2, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 48,
        seq_length = 16, vocab_size = 50, normalization = "RMSNorm", activation_func = "silu", gated_linear_unit = true,
        position_embedding_type = "rope", add_bias_linear = false, share_embeddings_and_output_weights = false },
      { num_layers = 1, hidden_size = 32, num_attention_heads = 4, num_query_groups = 1, ffn_hidden_size = 40,
        seq_length = 16, vocab_size = 64, normalization = "RMSNorm", activation_func = "silu", gated_linear_unit = true,
        position_embedding_type = "rope", add_bias_linear = false, add_qkv_bias = true, rotary_base = 500000 },
      { num_layers = 2, hidden_size = 32, num_attention_heads = 4, seq_length = 8, vocab_size = 96, openai_gelu = true },
    } do
      local provider = lt.GPTModelProvider(fields)
      local model = lt.build_model(provider, 3)
      local bridge = lt.AutoBridge.from_megatron_provider(provider)
      local out = tmpdir()
      bridge:save_hf_pretrained(model, out)
      local back, _, again = import(out)
      assert.are.equal(bridge.architecture, back.architecture)
      local tokens, targets = batch(fields.vocab_size)
      assert.are.equal(model_loss(model, tokens, targets), model_loss(again, tokens, targets))
      -- the config it wrote, with its weights, is the HF model the reference computes
      local cfg = json.decode(read(out .. "/config.json"))
      local W = {}
      for name, t in pairs(folder_tensors(out)) do
        local v = {}
        for i = 1, #t.bytes // 4 do v[i] = string.unpack("<f", t.bytes, 4 * i - 3) end
        local shape = {}
        for d in t.shape:gmatch("%d+") do shape[#shape + 1] = tonumber(d) end
        W[name] = { shape = shape, v = v }
      end
      assert_close(hf_loss(cfg, W, tokens, targets), model_loss(model, tokens, targets), back.architecture)
    end
  end)

  it("refuses what Hugging Face's architectures cannot express, naming the field", function()
    local base = { num_layers = 1, hidden_size = 16, num_attention_heads = 2, seq_length = 8, vocab_size = 32 }
    assert_error_contains(function()
      lt.AutoBridge.from_megatron_provider(lt.GPTModelProvider(with(base, { qk_layernorm = true })))
    end, "qk_layernorm = true")
    assert_error_contains(function()
      lt.AutoBridge.from_megatron_provider(lt.GPTModelProvider(with(base, { normalization = "RMSNorm" })))
    end, "normalization = \"RMSNorm\"", "GPT2LMHeadModel uses LayerNorm")
    assert_error_contains(function()
      lt.AutoBridge.from_megatron_provider(lt.GPTModelProvider(with(base, { position_embedding_type = "rope" })))
    end, "normalization", "RMSNorm")
  end)
end)

describe("a model on the GPU", function()
  it("loads and saves through device memory (device 'cuda' on the emulated plugin)", function()
    local plugin = "tests/cuda/luatron_cuda_emulated.so"
    assert(io.open(plugin), plugin .. " is missing (a data dependency of this spec)"):close()
    local dir, W = hf_folder(LLAMA, 41)
    local work = tmpdir()
    h.write(work .. "/gpu.lua", [[
local lt = require "luatron"
local bridge = lt.AutoBridge.from_hf_pretrained(arg[1])
local model = lt.build_model(bridge:to_megatron_provider { device = "cuda" }, 3)
bridge:load_hf_weights(model)
local tokens, targets = {}, {}
for b = 1, 2 do
  tokens[b], targets[b] = {}, {}
  for t = 1, 8 do
    tokens[b][t], targets[b][t] = (b * 37 + t * 11 + t * t * 3) % 100, (b * 17 + t * 29 + 5) % 100
  end
end
local ctx, loss = model:forward(lt.tensor.from(tokens, "int32"), lt.tensor.from(targets, "int32"), nil)
ctx:release()
print(("device %s loss %.17g"):format(model:param("output_layer.weight"):device(), loss))
bridge:save_hf_pretrained(model, arg[2])
]])
    local code, out = h.run(("LUATRON_CUDA_PLUGIN=%s %s run %s %s %s"):format(q(plugin), q(h.luatron_bin()),
      q(work .. "/gpu.lua"), q(dir), q(work .. "/hf")))
    assert.are.equal(0, code, out)
    local device, loss = out:match("device (%S+) loss (%S+)")
    assert.are.equal("cuda", device, out)
    local tokens, targets = batch(100)
    assert_close(hf_loss(LLAMA, W, tokens, targets), tonumber(loss), "Llama on the emulated GPU")
    assert_same_tensors(dir, work .. "/hf")
  end)
end)

describe("load_hf_weights at any layout (each rank its shard)", function()
  local model_lib = require "luatron.model"

  -- The loss of tokens through chunks in pipeline order (each chunk's output the next one's input).
  local function pipeline_loss(chunks, tokens, targets)
    local x = lt.tensor.from(tokens, "int32")
    for i, chunk in ipairs(chunks) do
      local out, ctx, n = chunk:forward(x, i == #chunks and lt.tensor.from(targets, "int32") or nil, nil)
      ctx:release()
      if i == #chunks then return f32(out:to_host():sum() / n) end
      x = out
    end
  end

  for _, case in ipairs {
    { "one stage", 1, nil }, { "two pipeline stages", 2, nil }, { "two stages of two virtual stages each", 2, 2 },
  } do
    it(("%s: each rank's chunks take their layers, and the forward through them has the HF loss"):format(case[1]),
      function()
        local cfg = with(LLAMA, { num_hidden_layers = 4 })
        local dir, W = hf_folder(cfg, 37)
        local bridge = lt.AutoBridge.from_hf_pretrained(dir)
        local provider = bridge:to_megatron_provider()
        local ranks = {}
        for r = 0, case[2] - 1 do
          ranks[r + 1] = model_lib.build_chunks(provider, model_lib.chunk_layers(provider, case[2], case[3], r), 1)
          bridge:load_hf_weights(ranks[r + 1]) -- as rank r does: its chunks only
        end
        local order = {} -- virtual stage v of every rank, then v + 1
        for v = 1, case[3] or 1 do
          for r = 1, case[2] do order[#order + 1] = ranks[r][v] end
        end
        local tokens, targets = batch(100)
        assert_close(hf_loss(cfg, W, tokens, targets), pipeline_loss(order, tokens, targets), case[1])
      end)
  end

  it("tensor parallelism (2 ranks): each rank's shards, the HF loss on both", function()
    local dir, W = hf_folder(LLAMA, 38)
    local tokens, targets = batch(100)
    local work = tmpdir()
    h.write(work .. "/batch.json", json.encode({ tokens = tokens, targets = targets }))
    h.write(work .. "/tp.lua", [[
local lt = require "luatron"
local json = require "luatron.json"
local model_lib = require "luatron.model"
local bridge = lt.AutoBridge.from_hf_pretrained(arg[1])
local provider = bridge:to_megatron_provider { tensor_model_parallel_size = 2 }
local ps = lt.parallel_state(provider)
local chunks = model_lib.chunks(provider, ps, 1)
bridge:load_hf_weights(chunks)
local f = assert(io.open(arg[2]))
local b = json.decode(f:read("a"))
f:close()
local out, ctx, n = chunks[1]:forward(lt.tensor.from(b.tokens, "int32"), lt.tensor.from(b.targets, "int32"), nil)
ctx:release()
local w = chunks[1]:param("decoder.layers.0.mlp.linear_fc1.weight")
print(("tp rank %d holds %dx%d, loss %.9g"):format(chunks[1]:tp(), w:shape()[1], w:shape()[2], out:to_host():sum() / n))
]])
    local code, out = h.luatron(("launch -n 2 %s %s %s"):format(q(work .. "/tp.lua"), q(dir), q(work .. "/batch.json")))
    assert.are.equal(0, code, out)
    local ref, seen = hf_loss(LLAMA, W, tokens, targets), 0
    for rank, rows, loss in out:gmatch("tp rank (%d) holds (%d+)x%d+, loss (%S+)") do
      assert.are.equal(LLAMA.intermediate_size, tonumber(rows), "rank " .. rank .. ": fc1 is [gate; up] / 2 rows")
      assert_close(ref, f32(tonumber(loss)), "TP rank " .. rank)
      seen = seen + 1
    end
    assert.are.equal(2, seen, out)
    -- a vocabulary TP does not divide would be padded, and the padding would enter the softmax
    assert_error_contains(function()
      lt.AutoBridge.from_hf_pretrained(hf_folder(with(LLAMA, { vocab_size = 99 }), 39))
        :to_megatron_provider { tensor_model_parallel_size = 2 }
    end, "vocab_size = 99 does not divide over tensor_model_parallel_size = 2", "padded rows would enter the softmax")
  end)
end)

describe("luatron convert", function()
  local bin = h.luatron_bin()

  it("--help says both directions", function()
    local code, out = h.luatron("convert --help")
    assert.are.equal(0, code, out)
    h.assert_in_order(out, "--from-hf DIR --to CKPT", "--from CKPT [--ckpt-step N] --to-hf DIR")
    code, out = h.luatron("convert --from-hf x")
    assert.are.equal(1, code)
    assert(out:find("--from-hf needs --to CKPT", 1, true), out)
    code, out = h.luatron("convert --from-hf x --to y --to-hf z")
    assert.are.equal(1, code)
    assert(out:find("--to-hf goes with --from CKPT", 1, true), out)
  end)

  it("HF -> checkpoint -> HF gives the same bytes, and a run that loads the checkpoint the same loss", function()
    local dir, W = hf_folder(LLAMA, 21)
    local work = tmpdir()
    local code, out = h.run(("%s convert --from-hf %s --to %s"):format(q(bin), q(dir), q(work .. "/ck")))
    assert.are.equal(0, code, out)
    assert(out:find("LlamaForCausalLM", 1, true), out)
    code, out = h.run(("%s convert --from %s --to-hf %s"):format(q(bin), q(work .. "/ck"), q(work .. "/hf")))
    assert.are.equal(0, code, out)
    assert_same_tensors(dir, work .. "/hf")
    assert.is_true(json.decode(read(work .. "/hf/config.json")).tie_word_embeddings == false)

    -- the checkpoint holds the HF model: loaded in process, it has the HF forward's loss
    local bridge = lt.AutoBridge.from_hf_pretrained(dir)
    local model = lt.build_model(bridge:to_megatron_provider(), 99)
    checkpoint.load(work .. "/ck", model, nil, { load_optim = false })
    local tokens, targets = batch(100)
    assert_close(hf_loss(LLAMA, W, tokens, targets), model_loss(model, tokens, targets), "converted checkpoint")

    -- a run (luatron run, skip_train: the validation loss of the loaded model) from the converted
    -- checkpoint, from one saved of the model imported in process, and from scratch
    local _, _, imported = import(dir)
    checkpoint.save(work .. "/in_process", imported, nil, { iteration = 0, consumed_samples = 0, optimizer_steps = 0,
      seed = 1234 }, {})
    h.write(work .. "/recipe.lua", [[
local lt = require "luatron"
local overrides, mine = lt.overrides.split(arg)
local bridge = lt.AutoBridge.from_hf_pretrained(mine[1])
lt.pretrain(lt.ConfigContainer {
  model = bridge:to_megatron_provider { seq_length = 8 },
  train = lt.TrainingConfig { train_iters = 1, global_batch_size = 2, micro_batch_size = 2, eval_interval = 1,
    eval_iters = 1, skip_train = true },
  optimizer = lt.OptimizerConfig { lr = 1e-3 },
  dataset = lt.GPTDatasetConfig { sequence_length = 8 },
}, overrides)
]])
    local function validation(name, extra)
      local metrics = work .. "/" .. name .. ".jsonl"
      local c, o = h.run(("%s run %s %s logger.metrics_file=%s %s"):format(q(bin), q(work .. "/recipe.lua"), q(dir),
        q(metrics), extra))
      assert.are.equal(0, c, o)
      local v
      for line in io.lines(metrics) do v = json.decode(line).validation_loss or v end
      return assert(v, o)
    end
    local converted = validation("converted", "checkpoint.pretrained_checkpoint=" .. q(work .. "/ck"))
    assert.are.equal(validation("in_process", "checkpoint.pretrained_checkpoint=" .. q(work .. "/in_process")), converted)
    assert.are_not.equal(validation("scratch", ""), converted)
  end)

  it("GPT-2 from a sharded folder, and --ckpt-step of a trained run's checkpoint", function()
    local dir = hf_folder(GPT2, 22, { shards = 2 })
    local work = tmpdir()
    local code, out = h.run(("%s convert --from-hf %s --to %s"):format(q(bin), q(dir), q(work .. "/ck")))
    assert.are.equal(0, code, out)
    code, out = h.run(("%s convert --from %s --ckpt-step 0 --to-hf %s"):format(q(bin), q(work .. "/ck"), q(work .. "/hf")))
    assert.are.equal(0, code, out)
    assert_same_tensors(dir, work .. "/hf") -- one file now, the same tensors
    code, out = h.run(("%s convert --from %s --ckpt-step 5 --to-hf %s"):format(q(bin), q(work .. "/ck"), q(work .. "/x")))
    assert.are.equal(1, code)
    assert(out:find("iter_0000005", 1, true), out)
  end)

  it("takes a tokenizer.json beside the weights, which luatron generate then reads prompts with", function()
    local fixtures = tmpdir()
    assert(os.execute("python3 tests/lua/tokenizer_reference.py " .. q(fixtures) .. " >/dev/null"),
      "the tokenizer reference failed")
    local tok = require("luatron.tokenizer").build { tokenizer_type = "HuggingFaceTokenizer",
      tokenizer_model = fixtures .. "/tokenizer.json" }
    local dir = hf_folder(with(GPT2, { vocab_size = tok.vocab_size, n_positions = 16 }), 23)
    write(dir .. "/tokenizer.json", read(fixtures .. "/tokenizer.json"))
    local work = tmpdir()
    local code, out = h.run(("%s convert --from-hf %s --to %s"):format(q(bin), q(dir), q(work .. "/ck")))
    assert.are.equal(0, code, out)
    assert(out:find(("tokenizer.json taken (%d tokens"):format(tok.vocab_size), 1, true), out)
    local prompt = "hello world"
    local model = checkpoint.open_model(work .. "/ck")
    local want = model:generate(tok:encode(prompt), { max_new_tokens = 6, temperature = 0, eod = tok.eod,
      vocab = tok.vocab_size })
    if want[#want] == tok.eod then want[#want] = nil end
    code, out = h.run(("%s generate --load %s --prompt %s --max-new-tokens 6 --temperature 0"):format(q(bin),
      q(work .. "/ck"), q(prompt)))
    assert.are.equal(0, code, out)
    assert.are.equal(prompt .. tok:decode(want) .. "\n", out)

    -- a folder without one: the checkpoint names no tokenizer, and generate says so
    code, out = h.run(("%s convert --from-hf %s --to %s"):format(q(bin), q(hf_folder(GPT2, 24)), q(work .. "/bare")))
    assert.are.equal(0, code, out)
    assert(out:find("no tokenizer.json: the checkpoint names no tokenizer", 1, true), out)
    code, out = h.run(("%s generate --load %s --prompt hi"):format(q(bin), q(work .. "/bare")))
    assert.are.equal(1, code, out)
    assert(out:find("names no tokenizer", 1, true), out)
  end)
end)

describe("the bridge refuses", function()
  local function refuses(cfg, ...)
    local dir = hf_folder(cfg, 31)
    assert_error_contains(function() import(dir) end, dir .. "/config.json", ...)
  end

  it("architectures and model types it does not know", function()
    refuses(with(LLAMA, { architectures = { "BertForMaskedLM" }, model_type = "bert" }),
      "architectures = [\"BertForMaskedLM\"]", "is not supported", "LlamaForCausalLM (llama)", "GPT2LMHeadModel")
    refuses(with(LLAMA, { architectures = { "LlamaModel" } }), "LlamaModel")
    refuses(with(LLAMA, { architectures = json.null, model_type = "gemma" }), "model_type = \"gemma\"")
    refuses(with(LLAMA, { model_type = "qwen2" }), "model_type = \"qwen2\" does not match")
  end)

  it("config fields luatron cannot compute, naming them", function()
    refuses(with(LLAMA, { rope_scaling = { rope_type = "linear", factor = 2.0 } }), "rope_scaling = ", "rope_scaling = null")
    refuses(with(LLAMA, { attention_bias = true }), "attention_bias = true")
    refuses(with(LLAMA, { mlp_bias = true }), "mlp_bias = true")
    refuses(with(LLAMA, { hidden_act = "gelu" }), "hidden_act = \"gelu\"")
    refuses(with(LLAMA, { architectures = { "MistralForCausalLM" }, model_type = "mistral", sliding_window = 4 }),
      "sliding_window = 4 is shorter than the sequence (16 tokens)")
    refuses(with(QWEN2, { use_sliding_window = true, sliding_window = 8 }), "use_sliding_window / sliding_window = 8")
    refuses(with(GPT2, { activation_function = "relu" }), "activation_function = \"relu\"")
    refuses(with(GPT2, { scale_attn_by_inverse_layer_idx = true }), "scale_attn_by_inverse_layer_idx = true")
    refuses(with(GPT2, { embd_pdrop = 0.0 }), "embd_pdrop = 0.0 differs from resid_pdrop = 0.1")
    -- a window the sequence fits in passes; a longer sequence asked for is refused
    local dir = hf_folder(with(LLAMA, { architectures = { "MistralForCausalLM" }, model_type = "mistral",
      sliding_window = 4, max_position_embeddings = 4 }), 31)
    local bridge = lt.AutoBridge.from_hf_pretrained(dir)
    assert_error_contains(function() bridge:to_megatron_provider { seq_length = 8 } end, "sliding_window = 4")
  end)

  it("a missing tensor, a tensor of the wrong shape, an unused tensor, and says nothing was loaded", function()
    local dir, W, names = hf_folder(LLAMA, 32)
    local bridge = lt.AutoBridge.from_hf_pretrained(dir)
    local model = lt.build_model(bridge:to_megatron_provider(), 5)
    local before = model:param("decoder.layers.0.mlp.linear_fc1.weight"):clone()
    local function rewrite(list) write_safetensors(dir .. "/model.safetensors", W, list) end
    local fewer = {}
    for _, n in ipairs(names) do if n ~= "model.layers.1.self_attn.k_proj.weight" then fewer[#fewer + 1] = n end end
    rewrite(fewer)
    assert_error_contains(function() bridge:load_hf_weights(model) end,
      "missing tensor 'model.layers.1.self_attn.k_proj.weight'", "decoder.layers.1.self_attention.linear_qkv.weight")
    W["model.layers.1.self_attn.k_proj.weight"].shape = { 8, 32 }
    W["model.layers.1.self_attn.k_proj.weight"].v = { table.unpack(W["model.layers.1.self_attn.k_proj.weight"].v, 1, 256) }
    rewrite(names)
    assert_error_contains(function() bridge:load_hf_weights(model) end,
      "tensor 'model.layers.1.self_attn.k_proj.weight' has shape [8, 32]", "means [16, 32]")
    local fresh, extra_names = hf_weights(LLAMA, 32)
    fresh["model.layers.2.input_layernorm.weight"] = { shape = { 32 }, v = fresh["model.norm.weight"].v }
    extra_names[#extra_names + 1] = "model.layers.2.input_layernorm.weight"
    write_safetensors(dir .. "/model.safetensors", fresh, extra_names)
    assert_error_contains(function() bridge:load_hf_weights(model) end,
      "tensor 'model.layers.2.input_layernorm.weight' is not part of LlamaForCausalLM", "nothing was loaded")
    -- none of the failures changed the model
    local now = model:param("decoder.layers.0.mlp.linear_fc1.weight")
    assert.are.equal(0, now:clone():add(before, -1):norm())
  end)

  it("saving a pipeline stage (a whole model on one rank is needed)", function()
    local model_lib = require "luatron.model"
    local provider = lt.AutoBridge.from_hf_pretrained(hf_folder(LLAMA, 36)):to_megatron_provider()
    local first = model_lib.build_chunks(provider, model_lib.chunk_layers(provider, 2, nil, 0), 1)[1]
    local bridge = lt.AutoBridge.from_hf_pretrained(hf_folder(LLAMA, 36))
    assert_error_contains(function() bridge:save_hf_pretrained(first, tmpdir()) end, "save_hf_pretrained needs the whole model")
  end)
  it("a tied lm_head that is not the embedding, shards the index does not match, a model of another shape", function()
    local cfg = with(LLAMA, { tie_word_embeddings = true })
    local dir, W, names = hf_folder(cfg, 33)
    local more = { table.unpack(names) }
    more[#more + 1] = "lm_head.weight"
    W["lm_head.weight"] = { shape = { 100, 32 }, v = {} }
    for i = 1, 3200 do W["lm_head.weight"].v[i] = W["model.embed_tokens.weight"].v[i] + 1 end
    write_safetensors(dir .. "/model.safetensors", W, more)
    assert_error_contains(function() import(dir) end, "'lm_head.weight' differs from 'model.embed_tokens.weight'",
      "tie_word_embeddings = false")
    -- the same tensor as the embedding is accepted
    W["lm_head.weight"].v = W["model.embed_tokens.weight"].v
    write_safetensors(dir .. "/model.safetensors", W, more)
    import(dir)

    local sharded = hf_folder(QWEN2, 34, { shards = 2 })
    local index = json.decode(read(sharded .. "/model.safetensors.index.json"))
    index.weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    write(sharded .. "/model.safetensors.index.json", json.encode(index))
    assert_error_contains(function() import(sharded) end, "lacks tensor 'model.norm.weight'")
    index.weight_map["model.norm.weight"] = "model-00009-of-00002.safetensors"
    write(sharded .. "/model.safetensors.index.json", json.encode(index))
    assert_error_contains(function() import(sharded) end, "model-00009-of-00002.safetensors", "not in")

    local bridge = lt.AutoBridge.from_hf_pretrained(hf_folder(LLAMA, 35))
    local other = lt.build_model(bridge:to_megatron_provider { ffn_hidden_size = 64 }, 1)
    assert_error_contains(function() bridge:load_hf_weights(other) end, "decoder.layers.0.mlp.linear_fc1.weight",
      "[128, 32]", "means [96, 32]")
    assert_error_contains(function() lt.AutoBridge.from_hf_pretrained(tmpdir()) end, "has no config.json")
    local no_weights = tmpdir()
    write(no_weights .. "/config.json", json.encode(LLAMA))
    assert_error_contains(function() lt.AutoBridge.from_hf_pretrained(no_weights) end,
      "neither model.safetensors nor model.safetensors.index.json")
  end)
end)

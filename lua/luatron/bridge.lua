-- luatron.bridge: Hugging Face checkpoints both ways, as Megatron Bridge's AutoBridge (offline: folders on disk).
--
--   local bridge = lt.AutoBridge.from_hf_pretrained(dir)  -- config.json + model.safetensors (or shards)
--   local provider = bridge:to_megatron_provider()        -- the GPTModelProvider the config means
--   local model = lt.build_model(provider)
--   bridge:load_hf_weights(model)                         -- every HF tensor into its Megatron parameter
--   bridge:save_hf_pretrained(model, out_dir)             -- and back: config.json + model.safetensors
--   lt.AutoBridge.from_megatron_provider(provider)        -- a bridge for a model trained here (export only)
--
-- Families: GPT-2 (GPT2LMHeadModel) and Llama / Mistral / Qwen2 (LlamaForCausalLM, MistralForCausalLM,
-- Qwen2ForCausalLM). What luatron's GPT cannot compute (rope_scaling, a sliding window shorter than the
-- sequence, attention or MLP biases in Llama, another activation) is refused naming the config.json
-- field. The weights go into a whole model or a rank's chunks at any layout (each rank its shards), and
-- come from a whole model on one rank (other layouts: the checkpoint a run saves, through luatron convert).
--
-- Layouts. Megatron's linear_qkv holds, per query group, its H/G query heads, then its key head, then its
-- value head (kv_channels rows each); HF keeps q_proj / k_proj / v_proj apart, and GPT-2's c_attn holds
-- all queries, then all keys, then all values as columns. GPT-2's Conv1D weights are [in, out] (the
-- transpose of a linear weight). SwiGLU's linear_fc1 is [gate; up] (HF's gate_proj and up_proj).
local core = require "luatron.core"
local config = require "luatron.config"
local fs = require "luatron.fs"
local json = require "luatron.json"
local checkpoint = require "luatron.checkpoint"

local M = {}

local AutoBridge = {}
AutoBridge.__index = AutoBridge
M.AutoBridge = AutoBridge

-- The architectures read, with their family and model_type.
local ARCHITECTURES = {
  GPT2LMHeadModel = { family = "gpt2", model_type = "gpt2" },
  LlamaForCausalLM = { family = "llama", model_type = "llama" },
  MistralForCausalLM = { family = "llama", model_type = "mistral" },
  Qwen2ForCausalLM = { family = "llama", model_type = "qwen2" },
}
local ARCH_ORDER = { "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM" }
local SUPPORTED = "GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama), MistralForCausalLM (mistral), "
  .. "Qwen2ForCausalLM (qwen2)"

-- HF's config class defaults for the fields read here (a config.json leaves out what is default).
local DEFAULTS = {
  gpt2 = { vocab_size = 50257, n_positions = 1024, n_embd = 768, n_layer = 12, n_head = 12,
    activation_function = "gelu_new", resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1,
    layer_norm_epsilon = 1e-5, initializer_range = 0.02, scale_attn_weights = true,
    scale_attn_by_inverse_layer_idx = false, tie_word_embeddings = true, add_cross_attention = false },
  llama = { vocab_size = 32000, hidden_size = 4096, intermediate_size = 11008, num_hidden_layers = 32,
    num_attention_heads = 32, hidden_act = "silu", max_position_embeddings = 2048, initializer_range = 0.02,
    rms_norm_eps = 1e-6, tie_word_embeddings = false, rope_theta = 10000.0, attention_bias = false,
    attention_dropout = 0.0, mlp_bias = false },
  mistral = { vocab_size = 32000, hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
    num_attention_heads = 32, num_key_value_heads = 8, hidden_act = "silu", max_position_embeddings = 131072,
    initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false, rope_theta = 10000.0,
    sliding_window = 4096, attention_dropout = 0.0 },
  qwen2 = { vocab_size = 151936, hidden_size = 4096, intermediate_size = 22016, num_hidden_layers = 32,
    num_attention_heads = 32, num_key_value_heads = 32, hidden_act = "silu", max_position_embeddings = 32768,
    initializer_range = 0.02, rms_norm_eps = 1e-6, tie_word_embeddings = false, rope_theta = 10000.0,
    use_sliding_window = false, sliding_window = 4096, max_window_layers = 28, attention_dropout = 0.0 },
}

-- HF tensors that are buffers, not weights (older files carry them): GPT-2's causal mask and Llama's
-- rotary frequencies. They are recomputed, never loaded.
local BUFFERS = {
  "^h%.%d+%.attn%.bias$", "^h%.%d+%.attn%.masked_bias$", "^model%.layers%.%d+%.self_attn%.rotary_emb%.inv_freq$",
}

local function fail(fmt, ...) error(string.format(fmt, ...), 0) end

local function shape_text(s) return "[" .. table.concat(s, ", ") .. "]" end

local function same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

local function show(v)
  if v == json.null then return "null" end
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) == "table" then return json.encode(v) end
  return tostring(v)
end

-- Megatron Bridge's vocabulary rule: the largest of 128, 64, ..., 1 dividing vocab_size, so the
-- embedding is not padded and no padded row enters the softmax. Megatron pads to a multiple of the
-- divisor times the tensor-parallel size: under tp the divisor is the largest d with d tp dividing it
-- (nil when tp does not divide vocab_size: then padding cannot be avoided).
function M.vocab_divisor(vocab_size, tp)
  tp = tp or 1
  local d = 128
  while d >= 1 and vocab_size % (d * tp) ~= 0 do d = d // 2 end
  return d >= 1 and d or nil
end

------------------------------------------------------------------------------------------------
-- Tensor re-layouts (host fp32, contiguous; every copy a whole block in C)
------------------------------------------------------------------------------------------------

local function f32(shape) return core.tensor.zeros(shape, "float32") end

local function plain(t) return f32(t:shape()):copy(t) end

-- A [a, b] tensor as its contiguous [b, a] transpose.
local function transposed(t)
  local s = t:shape()
  return f32({ s[2], s[1] }):copy(t:transpose(1, 2))
end

-- The rows (dimension 1) of tensors one after another.
local function cat_rows(list)
  local shape, n = list[1]:shape(), 0
  for _, t in ipairs(list) do n = n + t:shape()[1] end
  shape[1] = n
  local out, at = f32(shape), 0
  for _, t in ipairs(list) do
    local r = t:shape()[1]
    out:narrow(1, at + 1, r):copy(t)
    at = at + r
  end
  return out
end

-- Rows [first, first + n) (0-based first) as a contiguous tensor.
local function rows(t, first, n) return plain(t:narrow(1, first + 1, n)) end

-- Queries [H * D, ...], keys and values [G * D, ...] into Megatron's fused rows, per query group g:
-- its H / G query heads, its key head, its value head.
local function fuse_qkv(q, k, v, H, G, D)
  local per = H // G
  local shape = q:shape()
  shape[1] = (H + 2 * G) * D
  local out = f32(shape)
  for g = 0, G - 1 do
    local at = g * (per + 2) * D
    out:narrow(1, at + 1, per * D):copy(q:narrow(1, g * per * D + 1, per * D))
    out:narrow(1, at + per * D + 1, D):copy(k:narrow(1, g * D + 1, D))
    out:narrow(1, at + (per + 1) * D + 1, D):copy(v:narrow(1, g * D + 1, D))
  end
  return out
end

-- The inverse of fuse_qkv: q, k, v.
local function split_qkv(t, H, G, D)
  local per = H // G
  local function block(n)
    local shape = t:shape()
    shape[1] = n
    return f32(shape)
  end
  local q, k, v = block(H * D), block(G * D), block(G * D)
  for g = 0, G - 1 do
    local at = g * (per + 2) * D
    q:narrow(1, g * per * D + 1, per * D):copy(t:narrow(1, at + 1, per * D))
    k:narrow(1, g * D + 1, D):copy(t:narrow(1, at + per * D + 1, D))
    v:narrow(1, g * D + 1, D):copy(t:narrow(1, at + (per + 1) * D + 1, D))
  end
  return q, k, v
end

------------------------------------------------------------------------------------------------
-- config.json -> GPTModelProvider fields
------------------------------------------------------------------------------------------------

-- A reader of config.json's fields: nil (JSON null or absent) takes HF's default.
local function reader(cfg, model_type, where)
  local defaults = DEFAULTS[model_type]
  local r = {}
  function r.get(key)
    local v = cfg[key]
    if v == nil or v == json.null then v = defaults[key] end
    return v
  end
  function r.int(key)
    local v = r.get(key)
    if math.type(v) == "float" and v == math.floor(v) then v = math.tointeger(v) end
    if math.type(v) ~= "integer" or v <= 0 then
      fail("%s: %s = %s must be a positive integer", where, key, show(v == nil and json.null or v))
    end
    return v
  end
  function r.num(key)
    local v = r.get(key)
    if type(v) ~= "number" then fail("%s: %s = %s must be a number", where, key, show(v == nil and json.null or v)) end
    return v
  end
  function r.bool(key)
    local v = r.get(key)
    if type(v) ~= "boolean" then
      fail("%s: %s = %s must be true or false", where, key, show(v == nil and json.null or v))
    end
    return v
  end
  function r.is_set(key) return cfg[key] ~= nil and cfg[key] ~= json.null end
  return r
end

local function gpt2_fields(r, where)
  local act = r.get("activation_function")
  local tanh = { gelu_new = true, gelu_pytorch_tanh = true, gelu_fast = true }
  if not (tanh[act] or act == "gelu") then
    fail("%s: activation_function = %s is not supported: luatron's GPT-2 MLP computes GELU, exact ('gelu') or "
      .. "its tanh approximation ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')", where, show(act))
  end
  if not r.bool("scale_attn_weights") then
    fail("%s: scale_attn_weights = false is not supported: luatron's attention scales by 1/sqrt(head size)", where)
  end
  if r.bool("scale_attn_by_inverse_layer_idx") then
    fail("%s: scale_attn_by_inverse_layer_idx = true is not supported: luatron's attention scales every layer "
      .. "by 1/sqrt(head size) alone", where)
  end
  if r.bool("add_cross_attention") then
    fail("%s: add_cross_attention = true is not supported: luatron builds decoder-only models", where)
  end
  local resid, embd = r.num("resid_pdrop"), r.num("embd_pdrop")
  if resid ~= embd then
    fail("%s: embd_pdrop = %s differs from resid_pdrop = %s: Megatron drops the embeddings with hidden_dropout, "
      .. "the same rate as the residual branches. Make them equal", where, show(embd), show(resid))
  end
  local C, NH, V, S = r.int("n_embd"), r.int("n_head"), r.int("vocab_size"), r.int("n_positions")
  if C % NH ~= 0 then fail("%s: n_embd = %d is not divisible by n_head = %d", where, C, NH) end
  local F = r.is_set("n_inner") and r.int("n_inner") or 4 * C
  return {
    num_layers = r.int("n_layer"), hidden_size = C, num_attention_heads = NH, num_query_groups = NH,
    kv_channels = C // NH, ffn_hidden_size = F, seq_length = S, max_position_embeddings = S,
    vocab_size = V, make_vocab_size_divisible_by = M.vocab_divisor(V),
    normalization = "LayerNorm", layernorm_epsilon = r.num("layer_norm_epsilon"),
    activation_func = "gelu", gated_linear_unit = false, openai_gelu = act ~= "gelu",
    position_embedding_type = "learned_absolute", share_embeddings_and_output_weights = r.bool("tie_word_embeddings"),
    add_bias_linear = true, add_qkv_bias = false, hidden_dropout = resid, attention_dropout = r.num("attn_pdrop"),
    init_method_std = r.num("initializer_range"),
  }
end

local function llama_fields(r, model_type, where)
  if r.get("hidden_act") ~= "silu" then
    fail("%s: hidden_act = %s is not supported: luatron's gated MLP is SwiGLU (hidden_act = \"silu\")", where,
      show(r.get("hidden_act")))
  end
  if r.is_set("rope_scaling") then
    fail("%s: rope_scaling = %s is not supported: luatron's RoPE is the unscaled one (rope_scaling = null)", where,
      show(r.get("rope_scaling")))
  end
  local theta = r.is_set("rope_theta") and r.num("rope_theta") or nil
  local rp = r.get("rope_parameters") -- transformers 5: the rope settings in one object
  if rp ~= nil then
    if type(rp) ~= "table" or (rp.rope_type ~= nil and rp.rope_type ~= "default") then
      fail("%s: rope_parameters = %s is not supported: luatron's RoPE is the unscaled one (rope_type \"default\")",
        where, show(rp))
    end
    if type(rp.rope_theta) == "number" then theta = rp.rope_theta end
  end
  theta = theta or r.num("rope_theta")
  if model_type ~= "qwen2" then
    for _, key in ipairs { "attention_bias", "mlp_bias" } do
      if r.get(key) == true then
        fail("%s: %s = true is not supported for %s: luatron's Llama layers have no %s biases (Qwen2's q/k/v "
          .. "biases are the one kind it loads)", where, key, model_type, key == "mlp_bias" and "MLP" or "attention")
      end
    end
  end
  local C, NH = r.int("hidden_size"), r.int("num_attention_heads")
  local G = r.is_set("num_key_value_heads") and r.int("num_key_value_heads")
    or (DEFAULTS[model_type].num_key_value_heads or NH)
  local D
  if r.is_set("head_dim") then
    D = r.int("head_dim")
  else
    if C % NH ~= 0 then
      fail("%s: hidden_size = %d is not divisible by num_attention_heads = %d (set head_dim)", where, C, NH)
    end
    D = C // NH
  end
  if NH % G ~= 0 then
    fail("%s: num_attention_heads = %d is not a multiple of num_key_value_heads = %d", where, NH, G)
  end
  local S, V = r.int("max_position_embeddings"), r.int("vocab_size")
  return {
    num_layers = r.int("num_hidden_layers"), hidden_size = C, num_attention_heads = NH, num_query_groups = G,
    kv_channels = D, ffn_hidden_size = r.int("intermediate_size"), seq_length = S, max_position_embeddings = S,
    vocab_size = V, make_vocab_size_divisible_by = M.vocab_divisor(V),
    normalization = "RMSNorm", layernorm_epsilon = r.num("rms_norm_eps"),
    activation_func = "silu", gated_linear_unit = true, openai_gelu = false,
    position_embedding_type = "rope", rotary_base = theta,
    share_embeddings_and_output_weights = r.bool("tie_word_embeddings"),
    add_bias_linear = false, add_qkv_bias = model_type == "qwen2",
    hidden_dropout = 0.0, attention_dropout = r.num("attention_dropout"), init_method_std = r.num("initializer_range"),
  }
end

-- The sliding window a config asks for at sequence length S (nil: none, or one no shorter than S, which
-- is plain causal attention), as the field that sets it.
local function window_in_use(r, model_type, S)
  if model_type == "mistral" and r.is_set("sliding_window") then
    local w = r.int("sliding_window")
    if w < S then return "sliding_window", w end
  elseif model_type == "qwen2" then
    local sliding = r.get("use_sliding_window") == true
    local types = r.get("layer_types")
    if type(types) == "table" then
      for _, t in ipairs(types) do if t == "sliding_attention" then sliding = true end end
    end
    if sliding and r.is_set("sliding_window") then
      local w = r.int("sliding_window")
      if w < S then return "use_sliding_window / sliding_window", w end
    end
  end
end

------------------------------------------------------------------------------------------------
-- The name map: Megatron parameter <-> HF tensors, with shapes and re-layouts
------------------------------------------------------------------------------------------------

-- Entries { mc =, mc_shape =, hf = {names}, hf_shapes = {shapes}, to_mc = fn(hf tensors) -> tensor,
-- to_hf = fn(tensor) -> hf tensors }. f: provider fields; prefix: GPT-2's "transformer." (or "").
local function name_map(family, f, prefix)
  local C, V, F, L = f.hidden_size, f.vocab_size, f.ffn_hidden_size, f.num_layers
  local H, G, D = f.num_attention_heads, f.num_query_groups, f.kv_channels
  local QKV = (H + 2 * G) * D
  local map = {}
  local function same(mc, hf, shape)
    map[#map + 1] = { mc = mc, mc_shape = shape, hf = { hf }, hf_shapes = { shape },
      to_mc = function(t) return plain(t[1]) end, to_hf = function(t) return { plain(t) } end }
  end
  -- GPT-2's Conv1D: HF [in, out], Megatron [out, in]
  local function conv(mc, hf, out_f, in_f)
    map[#map + 1] = { mc = mc, mc_shape = { out_f, in_f }, hf = { hf }, hf_shapes = { { in_f, out_f } },
      to_mc = function(t) return transposed(t[1]) end, to_hf = function(t) return { transposed(t) } end }
  end
  local function qkv(mc, names, shapes)
    local mc_shape = #shapes[1] == 2 and { QKV, C } or { QKV }
    map[#map + 1] = { mc = mc, mc_shape = mc_shape, hf = names, hf_shapes = shapes,
      to_mc = function(t) return fuse_qkv(t[1], t[2], t[3], H, G, D) end,
      to_hf = function(t) return { split_qkv(t, H, G, D) } end }
  end
  local dl = "decoder.layers."
  if family == "gpt2" then
    local p = prefix
    same("embedding.word_embeddings.weight", p .. "wte.weight", { V, C })
    same("embedding.position_embeddings.weight", p .. "wpe.weight", { f.seq_length, C })
    for l = 0, L - 1 do
      local m, h = dl .. l .. ".", p .. "h." .. l .. "."
      same(m .. "input_layernorm.weight", h .. "ln_1.weight", { C })
      same(m .. "input_layernorm.bias", h .. "ln_1.bias", { C })
      -- c_attn: columns q | k | v, each n_embd wide: transposed to rows, then per head q, k, v
      map[#map + 1] = { mc = m .. "self_attention.linear_qkv.weight", mc_shape = { QKV, C },
        hf = { h .. "attn.c_attn.weight" }, hf_shapes = { { C, 3 * C } },
        to_mc = function(t)
          local w = transposed(t[1])
          return fuse_qkv(rows(w, 0, C), rows(w, C, C), rows(w, 2 * C, C), H, G, D)
        end,
        to_hf = function(t) return { transposed(cat_rows { split_qkv(t, H, G, D) }) } end }
      map[#map + 1] = { mc = m .. "self_attention.linear_qkv.bias", mc_shape = { QKV },
        hf = { h .. "attn.c_attn.bias" }, hf_shapes = { { 3 * C } },
        to_mc = function(t) return fuse_qkv(rows(t[1], 0, C), rows(t[1], C, C), rows(t[1], 2 * C, C), H, G, D) end,
        to_hf = function(t) return { cat_rows { split_qkv(t, H, G, D) } } end }
      conv(m .. "self_attention.linear_proj.weight", h .. "attn.c_proj.weight", C, C)
      same(m .. "self_attention.linear_proj.bias", h .. "attn.c_proj.bias", { C })
      same(m .. "pre_mlp_layernorm.weight", h .. "ln_2.weight", { C })
      same(m .. "pre_mlp_layernorm.bias", h .. "ln_2.bias", { C })
      conv(m .. "mlp.linear_fc1.weight", h .. "mlp.c_fc.weight", F, C)
      same(m .. "mlp.linear_fc1.bias", h .. "mlp.c_fc.bias", { F })
      conv(m .. "mlp.linear_fc2.weight", h .. "mlp.c_proj.weight", C, F)
      same(m .. "mlp.linear_fc2.bias", h .. "mlp.c_proj.bias", { C })
    end
    same("decoder.final_layernorm.weight", p .. "ln_f.weight", { C })
    same("decoder.final_layernorm.bias", p .. "ln_f.bias", { C })
  else
    same("embedding.word_embeddings.weight", "model.embed_tokens.weight", { V, C })
    for l = 0, L - 1 do
      local m, h = dl .. l .. ".", "model.layers." .. l .. "."
      same(m .. "input_layernorm.weight", h .. "input_layernorm.weight", { C })
      local a = h .. "self_attn."
      qkv(m .. "self_attention.linear_qkv.weight", { a .. "q_proj.weight", a .. "k_proj.weight", a .. "v_proj.weight" },
        { { H * D, C }, { G * D, C }, { G * D, C } })
      if f.add_qkv_bias then
        qkv(m .. "self_attention.linear_qkv.bias", { a .. "q_proj.bias", a .. "k_proj.bias", a .. "v_proj.bias" },
          { { H * D }, { G * D }, { G * D } })
      end
      same(m .. "self_attention.linear_proj.weight", a .. "o_proj.weight", { C, H * D })
      same(m .. "pre_mlp_layernorm.weight", h .. "post_attention_layernorm.weight", { C })
      map[#map + 1] = { mc = m .. "mlp.linear_fc1.weight", mc_shape = { 2 * F, C },
        hf = { h .. "mlp.gate_proj.weight", h .. "mlp.up_proj.weight" }, hf_shapes = { { F, C }, { F, C } },
        to_mc = function(t) return cat_rows { t[1], t[2] } end,
        to_hf = function(t) return { rows(t, 0, F), rows(t, F, F) } end }
      same(m .. "mlp.linear_fc2.weight", h .. "mlp.down_proj.weight", { C, F })
    end
    same("decoder.final_layernorm.weight", "model.norm.weight", { C })
  end
  if not f.share_embeddings_and_output_weights then same("output_layer.weight", "lm_head.weight", { V, C }) end
  return map
end

------------------------------------------------------------------------------------------------
-- Reading a Hugging Face folder
------------------------------------------------------------------------------------------------

local function read_json(path)
  local text = fs.read(path)
  if not text then return nil end
  local ok, v = pcall(json.decode, text)
  if not ok then fail("%s is not valid JSON: %s", path, v) end
  if type(v) ~= "table" or json.is_array(v) then fail("%s must hold a JSON object", path) end
  return v
end

-- The architecture a config.json names: its architectures entry (one, supported), checked against
-- model_type; or model_type's alone when architectures is missing.
local function architecture_of(cfg, where)
  local archs, mt = cfg.architectures, cfg.model_type
  if mt == json.null then mt = nil end
  if archs ~= nil and archs ~= json.null then
    if type(archs) ~= "table" or #archs ~= 1 or type(archs[1]) ~= "string" then
      fail("%s: architectures = %s: expected one of %s", where, show(archs), SUPPORTED)
    end
    local a = ARCHITECTURES[archs[1]]
    if not a then
      fail("%s: architectures = [%q] (model_type %s) is not supported; the bridge reads %s", where, archs[1],
        show(mt == nil and json.null or mt), SUPPORTED)
    end
    if mt ~= nil and mt ~= a.model_type then
      fail("%s: model_type = %s does not match architectures = [%q] (model_type %q)", where, show(mt), archs[1],
        a.model_type)
    end
    return archs[1]
  end
  for _, name in ipairs(ARCH_ORDER) do
    if ARCHITECTURES[name].model_type == mt then return name end
  end
  fail("%s: model_type = %s (and no architectures) is not supported; the bridge reads %s", where,
    show(mt == nil and json.null or mt), SUPPORTED)
end

-- The weight files of dir and which tensors each must hold (nil: whatever it holds).
local function weight_files(dir)
  local single = dir .. "/model.safetensors"
  if fs.exists(single) then return { { path = single } } end
  local index_path = dir .. "/model.safetensors.index.json"
  local index = read_json(index_path)
  if not index then
    fail("%s holds neither model.safetensors nor model.safetensors.index.json (only safetensors weights are read; "
      .. "convert pytorch_model.bin to safetensors first)", dir)
  end
  local wm = index.weight_map
  if type(wm) ~= "table" or json.is_array(wm) then
    fail("%s: weight_map must be an object of tensor name -> file", index_path)
  end
  local by_file, order = {}, {}
  for name, file in pairs(wm) do
    if type(file) ~= "string" or file:find("/", 1, true) or file == "" then
      fail("%s: weight_map[%q] = %s is not a file name in the folder", index_path, name, show(file))
    end
    if not by_file[file] then
      by_file[file] = {}
      order[#order + 1] = file
      if not fs.exists(dir .. "/" .. file) then
        fail("%s lists %s (for tensor '%s'), which is not in %s", index_path, file, name, dir)
      end
    end
    by_file[file][name] = true
  end
  if #order == 0 then fail("%s: weight_map is empty", index_path) end
  table.sort(order)
  local files = {}
  for _, file in ipairs(order) do files[#files + 1] = { path = dir .. "/" .. file, names = by_file[file] } end
  return files
end

-- Every tensor of the folder by name, and the file each came from.
local function read_tensors(files)
  local tensors, where = {}, {}
  for _, file in ipairs(files) do
    local t, err = core.load_tensors(file.path, true)
    if not t then
      fail("%s (the bridge reads float32 and bfloat16 tensors)", err)
    end
    for name, tensor in pairs(t) do
      if tensors[name] then fail("tensor '%s' is in both %s and %s", name, where[name], file.path) end
      if file.names and not file.names[name] then
        fail("%s holds tensor '%s', which model.safetensors.index.json's weight_map does not list", file.path, name)
      end
      tensors[name], where[name] = tensor, file.path
    end
    for name in pairs(file.names or {}) do
      if not t[name] then
        fail("%s lacks tensor '%s' (model.safetensors.index.json's weight_map puts it there)", file.path, name)
      end
    end
  end
  return tensors, where
end

-- lt.AutoBridge.from_hf_pretrained(dir): a bridge for the Hugging Face model folder dir (config.json and
-- model.safetensors, or the shards model.safetensors.index.json lists). Config errors are raised here.
function AutoBridge.from_hf_pretrained(dir)
  if type(dir) ~= "string" then fail("AutoBridge.from_hf_pretrained: expected a folder path, got %s", type(dir)) end
  dir = dir:gsub("/+$", "")
  local cfg_path = dir .. "/config.json"
  local cfg = read_json(cfg_path)
  if not cfg then
    fail("%s has no config.json: expected a Hugging Face model folder (config.json and model.safetensors)", dir)
  end
  local arch = architecture_of(cfg, cfg_path)
  local a = ARCHITECTURES[arch]
  local r = reader(cfg, a.model_type, cfg_path)
  local fields = a.family == "gpt2" and gpt2_fields(r, cfg_path) or llama_fields(r, a.model_type, cfg_path)
  local self = setmetatable({ dir = dir, architecture = arch, family = a.family, model_type = a.model_type,
    hf_config = cfg, fields = fields, files = weight_files(dir), reader = r, config_path = cfg_path }, AutoBridge)
  self:_check_window(fields.seq_length)
  return self
end

function AutoBridge:_check_window(S)
  if not self.reader then return end
  local field, w = window_in_use(self.reader, self.model_type, S)
  if field then
    fail("%s: %s = %d is shorter than the sequence (%d tokens): luatron's attention is plain causal attention "
      .. "and has no sliding window. Use sequences of at most %d tokens (to_megatron_provider { seq_length = %d }, "
      .. "luatron convert --seq-length %d)", self.config_path, field, w, S, w, w, w)
  end
end

-- lt.AutoBridge.from_megatron_provider(provider [, architecture]): a bridge for a model built from provider
-- (trained here), to save it with save_hf_pretrained. The architecture follows from the provider: GPT-2
-- for learned positions, Llama for RoPE (Qwen2 with add_qkv_bias); `architecture` may name Mistral or Qwen2
-- where they fit. Fields HF cannot express are refused.
function AutoBridge.from_megatron_provider(provider, architecture)
  local model_lib = require "luatron.model"
  local m = model_lib.resolve(provider)
  local function need(ok, field, why)
    if not ok then fail("cannot save as a Hugging Face model: %s = %s, but %s", field, show(m[field]), why) end
  end
  need(not m.num_moe_experts, "num_moe_experts", "the bridge's architectures are dense")
  need(not m.qk_layernorm, "qk_layernorm", "GPT-2, Llama, Mistral and Qwen2 have no query/key norms")
  need(not m.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma", "HF's norms multiply by the weight itself")
  local learned = m.position_embedding_type == "learned_absolute"
  local arch = architecture
    or (learned and "GPT2LMHeadModel" or (m.add_qkv_bias and "Qwen2ForCausalLM" or "LlamaForCausalLM"))
  local a = ARCHITECTURES[arch]
  if not a then fail("AutoBridge.from_megatron_provider: architecture %s is not one of %s", show(arch), SUPPORTED) end
  local cfg, H, C = {}, m.num_attention_heads, m.hidden_size
  if a.family == "gpt2" then
    need(learned, "position_embedding_type", "GPT2LMHeadModel has learned positions ('learned_absolute')")
    need(m.normalization == "LayerNorm", "normalization", "GPT2LMHeadModel uses LayerNorm")
    need(not m.gated_linear_unit and m.activation_func == "gelu", "activation_func", "GPT2LMHeadModel's MLP is GELU")
    need(m.add_bias_linear, "add_bias_linear", "GPT2LMHeadModel's linear layers have biases")
    need(m.num_query_groups == H, "num_query_groups", "GPT2LMHeadModel has no grouped-query attention")
    need(m.kv_channels * H == C, "kv_channels", "GPT2LMHeadModel's heads are hidden_size / num_attention_heads wide")
    cfg = { architectures = json.array { arch }, model_type = "gpt2", vocab_size = m.vocab_size,
      n_positions = m.seq_length, n_embd = C, n_layer = m.num_layers, n_head = H,
      n_inner = m.ffn_hidden_size, activation_function = m.openai_gelu and "gelu_new" or "gelu",
      resid_pdrop = m.hidden_dropout, embd_pdrop = m.hidden_dropout, attn_pdrop = m.attention_dropout,
      layer_norm_epsilon = m.layernorm_epsilon, initializer_range = m.init_method_std, scale_attn_weights = true,
      scale_attn_by_inverse_layer_idx = false, reorder_and_upcast_attn = false,
      tie_word_embeddings = m.share_embeddings_and_output_weights, use_cache = true }
  else
    need(not learned, "position_embedding_type", arch .. " uses RoPE ('rope')")
    need(m.normalization == "RMSNorm", "normalization", arch .. " uses RMSNorm")
    need(m.gated_linear_unit and m.activation_func == "silu", "activation_func",
      arch .. "'s MLP is SwiGLU ('silu' with gated_linear_unit)")
    need(not m.add_bias_linear, "add_bias_linear", arch .. "'s linear layers have no biases")
    if a.model_type == "qwen2" then
      need(m.add_qkv_bias, "add_qkv_bias", "Qwen2ForCausalLM's q/k/v projections have biases")
    else
      need(not m.add_qkv_bias, "add_qkv_bias", arch .. " has no q/k/v biases (Qwen2ForCausalLM does)")
    end
    cfg = { architectures = json.array { arch }, model_type = a.model_type, vocab_size = m.vocab_size,
      hidden_size = C, intermediate_size = m.ffn_hidden_size, num_hidden_layers = m.num_layers,
      num_attention_heads = H, num_key_value_heads = m.num_query_groups, head_dim = m.kv_channels,
      hidden_act = "silu", max_position_embeddings = m.max_position_embeddings or m.seq_length,
      initializer_range = m.init_method_std, rms_norm_eps = m.layernorm_epsilon,
      tie_word_embeddings = m.share_embeddings_and_output_weights, rope_theta = m.rotary_base + 0.0,
      rope_scaling = json.null, attention_dropout = m.attention_dropout, use_cache = true }
    if a.model_type == "llama" then
      cfg.attention_bias, cfg.mlp_bias, cfg.pretraining_tp = false, false, 1
    elseif a.model_type == "mistral" then
      cfg.sliding_window = json.null
    else
      cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = false, json.null, m.num_layers
    end
  end
  cfg.torch_dtype = "float32"
  -- the vocabulary as the model holds it, padding included: the same function (Megatron's padded rows
  -- are in its softmax too), and on the way back the divisor rule keeps it unpadded
  cfg.vocab_size = m.padded_vocab_size
  local fields = {}
  for k, v in pairs(config.to_table(config.is_config(provider, "GPTModelProvider") and provider
    or config.GPTModelProvider(provider))) do fields[k] = v end
  for _, k in ipairs { "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "ffn_hidden_size", "seq_length", "share_embeddings_and_output_weights", "add_qkv_bias" } do
    fields[k] = m[k] -- what the name map reads, resolved
  end
  fields.vocab_size = m.padded_vocab_size
  return setmetatable({ architecture = arch, family = a.family, model_type = a.model_type, hf_config = cfg,
    fields = fields, config_path = "(provider)" }, AutoBridge)
end

-- bridge:to_megatron_provider([overrides]): the GPTModelProvider config.json means; overrides (a table of
-- provider fields, e.g. { seq_length = 4096, device = "cuda" }) are applied on top.
function AutoBridge:to_megatron_provider(overrides)
  local f = {}
  for k, v in pairs(self.fields) do f[k] = v end
  for k, v in pairs(overrides or {}) do f[k] = v end
  local tp = f.tensor_model_parallel_size or 1
  if tp > 1 and not (overrides and overrides.make_vocab_size_divisible_by) then
    f.make_vocab_size_divisible_by = M.vocab_divisor(f.vocab_size, tp)
    if not f.make_vocab_size_divisible_by then
      fail("%s: vocab_size = %d does not divide over tensor_model_parallel_size = %d: Megatron would pad the vocabulary "
        .. "and the padded rows would enter the softmax, so the model would not compute the Hugging Face model's loss; "
        .. "use a tensor-parallel size that divides %d", self.config_path, f.vocab_size, tp, f.vocab_size)
    end
  end
  if overrides and overrides.seq_length and self.fields.position_embedding_type == "rope" then
    self:_check_window(overrides.seq_length)
  end
  return config.GPTModelProvider(f)
end

-- The bridge's config.json for saving (fields the provider decides, the rest kept from the source).
function AutoBridge:hf_config_for_save()
  local out = {}
  for k, v in pairs(self.hf_config) do out[k] = v end
  out.architectures = json.array { self.architecture }
  out.model_type = self.model_type
  out.torch_dtype = "float32"
  if out.dtype ~= nil then out.dtype = "float32" end
  return out
end

------------------------------------------------------------------------------------------------
-- Weights
------------------------------------------------------------------------------------------------

-- The parameters of model (a model, or this rank's chunks of it) by name, whatever their layout, and
-- whether they are the whole model (one chunk with the embedding and the output layer).
local function rank_params(model, what)
  local chunks = type(model) == "table" and model or { model }
  local params, whole = {}, #chunks == 1
  for _, chunk in ipairs(chunks) do
    if type(chunk) ~= "userdata" or not chunk.parameters then
      fail("%s: expected a model or this rank's chunks (lt.build_model, luatron.model.chunks), got %s", what,
        type(chunk))
    end
    if chunk.stage then
      local s = chunk:stage()
      whole = whole and s.pre_process and s.post_process
    end
    for _, p in ipairs(chunk:parameters()) do
      if p.expert then fail("%s: '%s' is an MoE expert; the bridge's architectures are dense", what, p.name) end
      params[p.name] = p
    end
  end
  return params, whole
end

-- The model's parameters by name, refusing what is not a whole model on one rank.
local function whole_params(model, what)
  local params, whole = rank_params(model, what)
  if not whole then
    fail("%s needs the whole model on one rank, not a pipeline stage: build it with pipeline_model_parallel_size = 1 "
      .. "(other layouts load the checkpoint `luatron convert` writes)", what)
  end
  local names = {}
  for name in pairs(params) do names[#names + 1] = name end
  table.sort(names) -- (the same parameter named each time)
  for _, name in ipairs(names) do
    local p = params[name]
    if not same_shape(p.shape, p.full_shape) then
      fail("%s needs the whole model on one rank, but '%s' is a tensor-parallel shard %s of %s: build it with "
        .. "tensor_model_parallel_size = 1 (other layouts load the checkpoint `luatron convert` writes)", what,
        p.name, shape_text(p.shape), shape_text(p.full_shape))
    end
  end
  return params
end

-- The name map checked against the model: every parameter has an entry of its shape, and back (for a
-- whole model; a rank's chunks hold only some of the entries). model = nil: the map alone.
local function checked_map(self, model, what, prefix, params, whole)
  if not params then params, whole = whole_params(model, what), true end
  local map = name_map(self.family, self.fields, prefix)
  local mapped = {}
  for _, e in ipairs(map) do
    local p = params[e.mc]
    if not p and whole then
      fail("%s: the model has no parameter '%s', which %s holds: build the model from bridge:to_megatron_provider()",
        what, e.mc, self.architecture)
    end
    if p and not same_shape(p.full_shape, e.mc_shape) then
      fail("%s: the model's '%s' is %s, but %s means %s: build the model from bridge:to_megatron_provider()", what,
        e.mc, shape_text(p.full_shape), self.config_path, shape_text(e.mc_shape))
    end
    mapped[e.mc] = true
  end
  local names = {}
  for name in pairs(params) do if not mapped[name] then names[#names + 1] = name end end
  table.sort(names)
  if #names > 0 then
    fail("%s: the model's parameter '%s' has no counterpart in %s (%d such): build the model from "
      .. "bridge:to_megatron_provider()", what, names[1], self.architecture, #names)
  end
  return map
end

local function is_buffer(name)
  local bare = name:gsub("^transformer%.", "")
  for _, pat in ipairs(BUFFERS) do if bare:find(pat) then return true end end
  return false
end

-- bridge:load_hf_weights(model): every HF tensor into its parameter of model, built from
-- bridge:to_megatron_provider(): a whole model, or this rank's chunks at any layout (tensor, pipeline,
-- virtual stages; luatron.model.chunks), each rank taking its shard. Everything is checked before anything
-- is copied: each tensor the config needs is there with its shape, each tensor there is used, each of
-- the rank's parameters filled.
function AutoBridge:load_hf_weights(model)
  local what = "load_hf_weights"
  if not self.files then
    fail("%s: this bridge has no Hugging Face folder (use AutoBridge.from_hf_pretrained)", what)
  end
  local tensors, where = read_tensors(self.files)
  local prefix = ""
  if self.family == "gpt2" then
    for name in pairs(tensors) do if name:find("^transformer%.") then prefix = "transformer." end end
  end
  local params, whole = rank_params(model, what)
  local map = checked_map(self, model, what, prefix, params, whole)
  local used = {}
  for _, e in ipairs(map) do
    for i, name in ipairs(e.hf) do
      local t = tensors[name]
      if not t then
        fail("%s: missing tensor '%s' (%s with %s needs it for '%s')", self.dir, name, self.architecture,
          self.config_path, e.mc)
      end
      if not same_shape(t:shape(), e.hf_shapes[i]) then
        fail("%s: tensor '%s' has shape %s, but %s means %s", where[name], name, shape_text(t:shape()),
          self.config_path, shape_text(e.hf_shapes[i]))
      end
      used[name] = true
    end
  end
  -- a tied output layer may be stored anyway: it must then be the embedding
  local emb = self.family == "gpt2" and prefix .. "wte.weight" or "model.embed_tokens.weight"
  if self.fields.share_embeddings_and_output_weights and tensors["lm_head.weight"] then
    local diff = plain(tensors["lm_head.weight"])
    if not same_shape(diff:shape(), tensors[emb]:shape()) or diff:add(plain(tensors[emb]), -1):norm() ~= 0 then
      fail("%s: tensor 'lm_head.weight' differs from '%s', but tie_word_embeddings is true: set "
        .. "tie_word_embeddings = false in %s if the output layer is its own", where["lm_head.weight"], emb,
        self.config_path)
    end
    used["lm_head.weight"] = true
  end
  local unused = {}
  for name in pairs(tensors) do
    if not used[name] and not is_buffer(name) then unused[#unused + 1] = name end
  end
  table.sort(unused)
  if #unused > 0 then
    fail("%s: tensor '%s' is not part of %s as %s describes it (%d unused tensor(s)); nothing was loaded",
      where[unused[1]], unused[1], self.architecture, self.config_path, #unused)
  end
  local weights, from = {}, {}
  for _, e in ipairs(map) do
    if params[e.mc] then
      local src = {}
      for i, name in ipairs(e.hf) do src[i] = tensors[name] end
      weights[e.mc], from[e.mc] = e.to_mc(src), where[e.hf[1]]
    end
  end
  checkpoint.load_weights(model, weights, from, self.dir)
  return model
end

-- bridge:save_hf_pretrained(model, dir): a folder Hugging Face's from_pretrained loads: config.json and
-- model.safetensors (float32, HF names and layouts; a tied output layer is not written, as HF does).
function AutoBridge:save_hf_pretrained(model, dir)
  local what = "save_hf_pretrained"
  if type(dir) ~= "string" or dir == "" then fail("%s: expected a folder path, got %s", what, show(dir)) end
  local map = checked_map(self, model, what, self.family == "gpt2" and "transformer." or "")
  local out = {}
  for _, e in ipairs(map) do
    local hf = e.to_hf(plain(model:param(e.mc):to_host()))
    for i, name in ipairs(e.hf) do out[name] = hf[i] end
  end
  fs.mkdir_p(dir)
  core.save_tensors(dir .. "/model.safetensors", out, { format = "pt" })
  local path = dir .. "/config.json"
  local f = io.open(path .. ".tmp", "w")
  if not f then fail("%s: cannot write %s", what, path) end
  f:write(json.encode(self:hf_config_for_save(), { indent = 2 }), "\n")
  f:close()
  assert(os.rename(path .. ".tmp", path))
  return dir
end

return M

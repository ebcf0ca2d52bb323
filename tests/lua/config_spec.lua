-- Specs for luatron.config: constructors, defaults, field checks, suggestions, error positions,
-- validation rules with their messages, derived values and serialisation.
local config = require "luatron.config"
local json = require "luatron.json"

local h = dofile("tests/lua/helpers.lua")
local msg_of, assert_error_contains = h.msg_of, h.assert_error_contains

local function merge(dst, src)
  for k, v in pairs(src) do
    if type(v) == "table" and type(dst[k]) == "table" and not config.is_config(v) and #v == 0 then
      merge(dst[k], v)
    else
      dst[k] = v
    end
  end
  return dst
end

-- A small valid container, with per-group overrides.
local function container(over)
  local t = {
    model = { num_layers = 4, hidden_size = 64, num_attention_heads = 4, seq_length = 32 },
    train = { micro_batch_size = 2, global_batch_size = 8, train_iters = 10 },
    optimizer = { lr = 1e-3 },
  }
  local c = config.ConfigContainer(merge(t, over or {}))
  return c
end

local function validate(over, world_size)
  local r = container(over):validate({ world_size = world_size or 1 })
  return r
end

local function util_copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function spec_dir()
  local src = debug.getinfo(1, "S").source:sub(2)
  return src:match("^(.*)/[^/]*$") or "."
end

describe("luatron.config constructors", function()
  it("exposes Megatron Bridge's class names", function()
    for _, name in ipairs({ "GPTModelProvider", "TrainingConfig", "OptimizerConfig", "SchedulerConfig",
      "DistributedDataParallelConfig", "GPTDatasetConfig", "LoggerConfig", "TokenizerConfig",
      "CheckpointConfig", "RNGConfig", "ConfigContainer" }) do
      assert.is_not_nil(config[name], name)
      local obj = name == "ConfigContainer"
          and config.ConfigContainer({ model = {}, train = {} })
          or config[name]({})
      assert.are.equal(name, config.class_of(obj))
      assert.is_true(config.is_config(obj, name))
    end
    assert.is_false(config.is_config({}))
  end)

  it("fills GPTModelProvider defaults (Megatron's)", function()
    local m = config.GPTModelProvider({ num_layers = 2, hidden_size = 32, num_attention_heads = 4 })
    assert.are.equal(2, m.num_layers)
    assert.is_nil(m.num_query_groups)
    assert.is_nil(m.ffn_hidden_size)
    assert.is_nil(m.kv_channels)
    assert.is_nil(m.vocab_size)
    assert.are.equal(1024, m.seq_length)
    assert.are.equal(128, m.make_vocab_size_divisible_by)
    assert.are.equal("LayerNorm", m.normalization)
    assert.are.equal(1e-5, m.layernorm_epsilon)
    assert.are.equal("gelu", m.activation_func)
    assert.is_false(m.gated_linear_unit)
    assert.are.equal("learned_absolute", m.position_embedding_type)
    assert.are.equal(10000, m.rotary_base)
    assert.are.equal(1.0, m.rotary_percent)
    assert.is_true(m.share_embeddings_and_output_weights)
    assert.are.equal(0.02, m.init_method_std)
    assert.are.equal(0.1, m.hidden_dropout)
    assert.are.equal(0.1, m.attention_dropout)
    assert.is_true(m.add_bias_linear)
    assert.is_false(m.bf16)
    assert.is_false(m.fp16)
    assert.are.equal("fp32", m.params_dtype)
    assert.are.equal("cpu", m.device)
    assert.are.equal(1, m.tensor_model_parallel_size)
    assert.are.equal(1, m.pipeline_model_parallel_size)
    assert.is_nil(m.virtual_pipeline_model_parallel_size)
    assert.is_false(m.sequence_parallel)
    assert.are.equal(1, m.context_parallel_size)
    assert.are.equal(1, m.expert_model_parallel_size)
    assert.is_nil(m.expert_tensor_parallel_size)
    assert.is_nil(m.pipeline_dtype)
    assert.is_nil(m.num_moe_experts)
    assert.are.equal(2, m.moe_router_topk)
    assert.is_nil(m.moe_ffn_hidden_size)
    assert.are.equal("aux_loss", m.moe_router_load_balancing_type)
    assert.are.equal(0.0, m.moe_aux_loss_coeff)
    assert.is_nil(m.moe_expert_capacity_factor)
    assert.is_false(m.moe_pad_expert_input_to_capacity)
    assert.are.equal("allgather", m.moe_token_dispatcher_type)
    assert.is_false(m.moe_router_pre_softmax)
    assert.are.equal("softmax", m.moe_router_score_function)
    assert.are.equal("probs", m.moe_token_drop_policy)
  end)

  it("fills the other classes' defaults", function()
    local t = config.TrainingConfig({})
    assert.is_nil(t.micro_batch_size)
    assert.is_nil(t.global_batch_size)
    assert.is_nil(t.train_iters)
    assert.are.equal(100, t.eval_iters)
    assert.is_nil(t.eval_interval)
    local o = config.OptimizerConfig({})
    assert.are.equal("adam", o.optimizer)
    assert.is_nil(o.lr)
    assert.is_nil(o.min_lr)
    assert.are.equal(0.01, o.weight_decay)
    assert.are.equal(0.9, o.adam_beta1)
    assert.are.equal(0.999, o.adam_beta2)
    assert.are.equal(1e-8, o.adam_eps)
    assert.are.equal(0.9, o.sgd_momentum)
    assert.are.equal(1.0, o.clip_grad)
    assert.is_false(o.use_distributed_optimizer)
    assert.is_false(o.bf16)
    assert.is_false(o.fp16)
    local s = config.SchedulerConfig({})
    assert.are.equal("linear", s.lr_decay_style)
    assert.are.equal(0, s.lr_warmup_iters)
    assert.are.equal(0.0, s.lr_warmup_init)
    assert.is_nil(s.lr_decay_iters)
    local d = config.DistributedDataParallelConfig({})
    assert.is_false(d.grad_reduce_in_fp32)
    assert.is_false(d.overlap_grad_reduce)
    assert.is_false(d.overlap_param_gather)
    assert.is_false(d.use_distributed_optimizer)
    assert.is_false(d.average_in_collective)
    assert.is_nil(d.bucket_size)
    local ds = config.GPTDatasetConfig({})
    assert.is_nil(ds.data_path)
    assert.are.equal("969,30,1", ds.split)
    assert.is_false(ds.reset_position_ids)
    assert.is_false(ds.reset_attention_mask)
    assert.is_false(ds.eod_mask_loss)
    assert.are.equal(2, ds.num_workers)
    local lg = config.LoggerConfig({})
    assert.are.equal(100, lg.log_interval)
    assert.is_nil(lg.tensorboard_dir)
    assert.is_false(lg.log_throughput)
    local tk = config.TokenizerConfig({})
    assert.are.equal("ByteLevel", tk.tokenizer_type)
    local ck = config.CheckpointConfig({})
    assert.is_nil(ck.save)
    assert.is_nil(ck.load)
    assert.is_false(ck.async_save)
    assert.is_true(ck.save_optim)
    assert.are.equal("torch_dist", ck.ckpt_format)
    assert.are.equal(1234, config.RNGConfig({}).seed)
    assert.are.equal(0.01, config.default("OptimizerConfig", "weight_decay"))
    assert.are.same({ "seed", "data_parallel_random_init" }, config.fields("RNGConfig"))
  end)

  it("accepts a missing table as all defaults and a float with an integral value as an integer", function()
    assert.are.equal(1234, config.RNGConfig().seed)
    local m = config.GPTModelProvider({ hidden_size = 2 ^ 6 })
    assert.are.equal(64, m.hidden_size)
    assert.are.equal("integer", math.type(m.hidden_size))
  end)

  it("spells SwiGLU as Bridge does and accepts 'swiglu' and 'activation' as shorthands", function()
    local a = config.GPTModelProvider({ activation_func = "silu", gated_linear_unit = true })
    local b = config.GPTModelProvider({ activation_func = "swiglu" })
    local c = config.GPTModelProvider({ activation = "swiglu" })
    for _, m in ipairs({ a, b, c }) do
      assert.are.equal("silu", m.activation_func)
      assert.is_true(m.gated_linear_unit)
      assert.are.equal("swiglu", m.activation)
    end
    assert.are.equal("gelu", config.GPTModelProvider({}).activation)
    local m = config.GPTModelProvider({})
    m.activation = "swiglu"
    assert.is_true(m.gated_linear_unit)
    assert.are.equal(
      "GPTModelProvider.activation_func = 'swiglu' implies gated_linear_unit = true, but gated_linear_unit = false "
      .. "was given; drop one of them",
      msg_of(config.GPTModelProvider, { activation_func = "swiglu", gated_linear_unit = false }))
    assert_error_contains(function() config.GPTModelProvider({ activation_func = "relu" }) end,
      "GPTModelProvider.activation_func = 'relu': must be one of 'gelu', 'silu'")
  end)

  it("accepts GPTDatasetConfig.sequence_length as an alias of Bridge's seq_length", function()
    local d = config.GPTDatasetConfig({ sequence_length = 128 })
    assert.are.equal(128, d.seq_length)
    assert.are.equal(128, d.sequence_length)
    d.sequence_length = 64
    assert.are.equal(64, d.seq_length)
    assert.are.equal("GPTDatasetConfig: both 'seq_length' and its alias 'sequence_length' are given (32 and 64); "
      .. "give only seq_length", msg_of(config.GPTDatasetConfig, { seq_length = 32, sequence_length = 64 }))
  end)

  it("normalizes dtype spellings", function()
    local m = config.GPTModelProvider({ params_dtype = "bfloat16", pipeline_dtype = "float32" })
    assert.are.equal("bf16", m.params_dtype)
    assert.are.equal("fp32", m.pipeline_dtype)
    assert_error_contains(function() config.GPTModelProvider({ params_dtype = "bf61" }) end,
      "GPTModelProvider.params_dtype = 'bf61': must be one of 'fp32', 'bf16', 'fp16'", "(did you mean 'bf16'?)")
  end)

  it("shows the class and the non-default fields in tostring", function()
    local m = config.GPTModelProvider({ num_layers = 4, hidden_size = 64, normalization = "RMSNorm" })
    assert.are.equal("GPTModelProvider{num_layers=4, hidden_size=64, normalization='RMSNorm'}", tostring(m))
    assert.are.equal("RNGConfig{}", tostring(config.RNGConfig({})))
    local c = container()
    assert.truthy(tostring(c):find("^ConfigContainer{model=GPTModelProvider{num_layers=4"))
  end)

  it("iterates the set fields in declaration order with pairs", function()
    local names = {}
    for k in pairs(config.RNGConfig({ seed = 7 })) do names[#names + 1] = k end
    assert.are.same({ "seed", "data_parallel_random_init" }, names)
  end)

  it("copies with overrides", function()
    local m = config.GPTModelProvider({ num_layers = 4 })
    local m2 = m:copy({ num_layers = 8, hidden_size = 16 })
    assert.are.equal(4, m.num_layers)
    assert.are.equal(8, m2.num_layers)
    assert.are.equal(16, m2.hidden_size)
    assert_error_contains(function() m:copy({ num_layer = 3 }) end, "unknown field 'num_layer'")
  end)
end)

describe("luatron.config field checks", function()
  it("names an unknown field and suggests the nearest known one", function()
    assert.are.equal("GPTModelProvider: unknown field 'num_layer' (did you mean 'num_layers'?)",
      msg_of(config.GPTModelProvider, { num_layer = 2 }))
    assert.are.equal("GPTModelProvider: unknown field 'hiden_size' (did you mean 'hidden_size'?)",
      msg_of(config.GPTModelProvider, { hiden_size = 2 }))
    assert.are.equal("GPTModelProvider: unknown field 'nmu_layers' (did you mean 'num_layers'?)",
      msg_of(config.GPTModelProvider, { nmu_layers = 2 }))
    assert.are.equal("TrainingConfig: unknown field 'global_batchsize' (did you mean 'global_batch_size'?)",
      msg_of(config.TrainingConfig, { global_batchsize = 2 }))
    assert.are.equal("OptimizerConfig: unknown field 'Lr' (did you mean 'lr'?)",
      msg_of(config.OptimizerConfig, { Lr = 2 }))
    assert.are.equal("GPTModelProvider: unknown field 'zzzzzzz'", msg_of(config.GPTModelProvider, { zzzzzzz = 1 }))
    assert.are.equal("GPTModelProvider: unknown field 'a_b'; unknown field 'num_layer' "
      .. "(did you mean 'num_layers'?)", msg_of(config.GPTModelProvider, { num_layer = 2, a_b = 1 }))
  end)

  it("explains Megatron options luatron does not support", function()
    assert.are.equal("GPTModelProvider: field 'recompute_granularity' is a Megatron option that luatron does not "
      .. "support: activation recomputation is not implemented",
      msg_of(config.GPTModelProvider, { recompute_granularity = "full" }))
  end)

  it("rejects positional values", function()
    assert_error_contains(function() config.GPTModelProvider({ 4 }) end, "fields are given by name")
  end)

  it("names the field, the value and the rule for a wrong type or range", function()
    assert.are.equal("GPTModelProvider.hidden_size = -3: must be a positive integer",
      msg_of(config.GPTModelProvider, { hidden_size = -3 }))
    assert.are.equal("GPTModelProvider.hidden_size = 2.5: must be a positive integer",
      msg_of(config.GPTModelProvider, { hidden_size = 2.5 }))
    assert.are.equal("GPTModelProvider.num_layers = '4': must be a positive integer",
      msg_of(config.GPTModelProvider, { num_layers = "4" }))
    assert.are.equal("GPTModelProvider.hidden_dropout = 1.0: must be a number in [0, 1)",
      msg_of(config.GPTModelProvider, { hidden_dropout = 1.0 }))
    assert.are.equal("GPTModelProvider.sequence_parallel = 1: must be true or false",
      msg_of(config.GPTModelProvider, { sequence_parallel = 1 }))
    assert.are.equal("GPTModelProvider.normalization = 'layernorm': must be one of 'LayerNorm', 'RMSNorm' "
      .. "(did you mean 'LayerNorm'?)", msg_of(config.GPTModelProvider, { normalization = "layernorm" }))
    assert.are.equal("OptimizerConfig.lr = -0.1: must be a non-negative number",
      msg_of(config.OptimizerConfig, { lr = -0.1 }))
    assert.are.equal("OptimizerConfig.optimizer = 'adamw': must be one of 'adam', 'sgd' (did you mean 'adam'?)",
      msg_of(config.OptimizerConfig, { optimizer = "adamw" }))
    assert.are.equal("OptimizerConfig.adam_eps = nan: must be a positive number",
      msg_of(config.OptimizerConfig, { adam_eps = 0 / 0 }))
    assert.are.equal("SchedulerConfig.lr_decay_style = 'cosin': must be one of 'constant', 'linear', 'cosine', "
      .. "'inverse-square-root', 'WSD' (did you mean 'cosine'?)",
      msg_of(config.SchedulerConfig, { lr_decay_style = "cosin" }))
    assert.are.equal("GPTModelProvider.device = 'gpu': must be one of 'cpu', 'cuda'; 'cuda' puts tensors on the GPU",
      msg_of(config.GPTModelProvider, { device = "gpu" }))
    assert.are.equal("GPTModelProvider.normalization = nil: must be set (default 'LayerNorm'); it cannot be nil",
      msg_of(function() config.GPTModelProvider({}).normalization = nil end))
  end)

  it("refuses an unknown tokenizer type, and the file tokenizers without their files, with the reason", function()
    assert_error_contains(function() config.TokenizerConfig({ tokenizer_type = "BertWordPieceLowerCase" }) end,
      "TokenizerConfig.tokenizer_type = 'BertWordPieceLowerCase': must be one of 'ByteLevel', 'NullTokenizer', "
        .. "'GPT2BPETokenizer', 'HuggingFaceTokenizer', 'SentencePieceTokenizer', 'GPTSentencePieceTokenizer', "
        .. "'Llama2Tokenizer'", "SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer take "
        .. "tokenizer_model (a SentencePiece .model file)")
    assert_error_contains(function() validate({ tokenizer = { tokenizer_type = "Llama2Tokenizer" } }) end,
      "tokenizer.tokenizer_type = 'Llama2Tokenizer' needs tokenizer.tokenizer_model: the path of a SentencePiece "
        .. ".model file")
    assert_error_contains(function() validate({ tokenizer = { tokenizer_type = "GPT2BPETokenizer" } }) end,
      "tokenizer.tokenizer_type = 'GPT2BPETokenizer' needs tokenizer.vocab_file (GPT-2's encoder.json) and "
        .. "tokenizer.merge_file (vocab.bpe)")
    assert_error_contains(function() validate({ tokenizer = { tokenizer_type = "HuggingFaceTokenizer" } }) end,
      "tokenizer.tokenizer_type = 'HuggingFaceTokenizer' needs tokenizer.tokenizer_model")
    assert_error_contains(function() validate({ tokenizer = { vocab_file = "x.json" } }) end,
      "tokenizer.vocab_file is for tokenizer_type = 'GPT2BPETokenizer', not 'ByteLevel'")
  end)

  it("takes Megatron's NullTokenizer for data tokenized elsewhere: vocab_size ids and end-of-document", function()
    local r = validate({ tokenizer = { tokenizer_type = "NullTokenizer", vocab_size = 50000 } })
    assert.are.equal(50001, r.model.vocab_size)
    assert.are.equal(50048, r.padded_vocab_size) -- 50001 rounded up to a multiple of 128
    assert_error_contains(function() validate({ tokenizer = { tokenizer_type = "NullTokenizer" } }) end,
      "tokenizer.tokenizer_type = 'NullTokenizer' needs tokenizer.vocab_size")
  end)

  it("checks assignments after construction", function()
    local m = config.GPTModelProvider({})
    m.num_layers = 12
    assert.are.equal(12, m.num_layers)
    assert.are.equal("GPTModelProvider: unknown field 'num_layer' (did you mean 'num_layers'?)",
      msg_of(function() m.num_layer = 3 end))
    assert.are.equal("GPTModelProvider.num_layers = 0: must be a positive integer",
      msg_of(function() m.num_layers = 0 end))
    assert.are.equal("GPTModelProvider: unknown field 'hidden' (did you mean 'hidden_size'?)",
      msg_of(function() return m.hidden end))
    assert.are.equal(12, m.num_layers)
  end)

  it("builds container groups from plain tables and checks their classes", function()
    local c = container()
    assert.are.equal("GPTModelProvider", config.class_of(c.model))
    assert.are.equal("OptimizerConfig", config.class_of(c.optimizer))
    assert.are.equal("SchedulerConfig", config.class_of(c.scheduler))
    c.scheduler = { lr_decay_style = "cosine" }
    assert.are.equal("cosine", c.scheduler.lr_decay_style)
    assert.are.equal("ConfigContainer.model: GPTModelProvider: unknown field 'num_layer' (did you mean "
      .. "'num_layers'?)", msg_of(config.ConfigContainer, { model = { num_layer = 1 }, train = {} }))
    assert.are.equal("ConfigContainer.model is required: give a GPTModelProvider or a table of its fields",
      msg_of(config.ConfigContainer, { train = {} }))
    assert.are.equal("ConfigContainer.train is required: give a TrainingConfig or a table of its fields",
      msg_of(config.ConfigContainer, { model = {} }))
    assert_error_contains(function() c.optimizer = config.RNGConfig({}) end,
      "ConfigContainer.optimizer = RNGConfig{}: must be an OptimizerConfig or a table of its fields")
    assert.are.equal("ConfigContainer: unknown field 'optimiser' (did you mean 'optimizer'?)",
      msg_of(config.ConfigContainer, { model = {}, train = {}, optimiser = {} }))
    assert_error_contains(function() config.ConfigContainer({ model = {}, train = {}, peft = {} }) end,
      "field 'peft' is a Megatron option that luatron does not support")
  end)
end)

describe("luatron.config error positions", function()
  it("raises constructor and assignment errors at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, e = pcall(function() local m = config.GPTModelProvider({ num_layer = 2 }); return m end)
    assert.is_false(ok)
    assert.truthy(e:find("config_spec.lua:" .. line .. ": GPTModelProvider: unknown field 'num_layer'", 1, true), e)
    local m = config.GPTModelProvider({})
    line = debug.getinfo(1, "l").currentline + 1
    ok, e = pcall(function() m.hidden_size = -3 end)
    assert.truthy(e:find("config_spec.lua:" .. line .. ": GPTModelProvider.hidden_size = -3", 1, true), e)
    line = debug.getinfo(1, "l").currentline + 1
    ok, e = pcall(function() local r = container({ model = { tensor_model_parallel_size = 2 } }):validate({ world_size = 3 }); return r end)
    assert.truthy(e:find("config_spec.lua:" .. line .. ": world_size (3) is not divisible", 1, true), e)
    line = debug.getinfo(1, "l").currentline + 1
    ok, e = pcall(function() local r = config.validate(container({ train = { global_batch_size = 9 } }), 1); return r end)
    assert.truthy(e:find("config_spec.lua:" .. line .. ": global batch size (9)", 1, true), e)
  end)

  it("points at the recipe file and line when a recipe runs under lua5.4", function()
    local recipe = os.tmpname()
    local f = assert(io.open(recipe, "w"))
    f:write([[
local config = require "luatron.config"
-- a recipe
local m = config.GPTModelProvider{
  num_layers = 2,
}

local bad = config.GPTModelProvider{num_layer = 2}
]])
    f:close()
    -- in-process
    local ok, e = pcall(dofile, recipe)
    assert.is_false(ok)
    assert.are.equal(recipe .. ":7: GPTModelProvider: unknown field 'num_layer' (did you mean 'num_layers'?)", e)
    -- as a separate lua5.4 process, the way a user runs it
    local lua_dir = spec_dir() .. "/../../lua"
    local cmd = string.format([[lua5.4 -e "package.path = '%s/?.lua;' .. package.path" %q 2>&1]], lua_dir, recipe)
    local p = io.popen(string.format("LUA_PATH='%s/?.lua;%s/?/init.lua;;' lua5.4 %q 2>&1", lua_dir, lua_dir, recipe))
    local out = p:read("a")
    p:close()
    assert.truthy(out:find(recipe .. ":7: GPTModelProvider: unknown field 'num_layer' (did you mean 'num_layers'?)",
      1, true), out)
    p = io.popen(cmd)
    out = p:read("a")
    p:close()
    assert.truthy(out:find(recipe .. ":7: GPTModelProvider: unknown field 'num_layer'", 1, true), out)
    os.remove(recipe)
  end)

  it("says why there is no line when a recipe returns a config call (a tail call)", function()
    local recipe = os.tmpname()
    local f = assert(io.open(recipe, "w"))
    f:write('local config = require "luatron.config"\nreturn config.ConfigContainer{ model = { num_layer = 1 }, train = {} }\n')
    f:close()
    local ok, e = pcall(dofile, recipe)
    os.remove(recipe)
    assert.is_false(ok)
    assert.are.equal("ConfigContainer.model: GPTModelProvider: unknown field 'num_layer' (did you mean 'num_layers'?) "
      .. "(no line number: the config call was a tail call such as `return ConfigContainer{...}`; assign it to a "
      .. "local first to get one)", e)
  end)
end)

describe("luatron.config validation", function()
  it("resolves the model with validate.resolve_model, the function a direct build uses", function()
    local validate_mod = require "luatron.config.validate"
    local over = { model = { tensor_model_parallel_size = 2, num_query_groups = 2, kv_channels = 24 } }
    local r = validate(over, 4)
    -- the container's model (vocab_size taken from the tokenizer) resolved alone gives the same fields
    local alone = config.to_table(container(over).model)
    alone.vocab_size = r.tokenizer.vocab_size
    local resolved = validate_mod.resolve_model(alone)
    for _, name in ipairs { "ffn_hidden_size", "kv_channels", "num_query_groups", "vocab_size", "padded_vocab_size" } do
      assert.are.equal(resolved[name], r.model[name], name)
    end
    assert.are.same({ 256, 24, 2, 257, 512 }, { r.model.ffn_hidden_size, r.model.kv_channels, r.model.num_query_groups,
      r.model.vocab_size, r.model.padded_vocab_size })
    assert.are.equal(r.padded_vocab_size, r.model.padded_vocab_size)
    -- resolving a resolved model changes nothing
    local again = validate_mod.resolve_model(util_copy(resolved))
    assert.are.same(resolved, again)
    assert_error_contains(function() validate_mod.resolve_model(config.to_table(config.GPTModelProvider {
      num_layers = 1, hidden_size = 8, num_attention_heads = 2 })) end, "model.vocab_size is not set")
  end)

  it("returns the derived values and the resolved config", function()
    local r = validate({ model = { tensor_model_parallel_size = 2 } }, 4)
    assert.are.equal(4, r.world_size)
    assert.are.equal(2, r.model_parallel_size)
    assert.are.equal(2, r.data_parallel_size)
    assert.are.equal(2, r.num_microbatches)
    assert.are.equal(256, r.model.ffn_hidden_size)
    assert.are.equal(16, r.model.kv_channels)
    assert.are.equal(4, r.model.num_query_groups)
    assert.are.equal(2, r.model.expert_tensor_parallel_size)
    assert.are.equal("fp32", r.model.pipeline_dtype)
    assert.are.equal(257, r.model.vocab_size)
    assert.are.equal(257, r.tokenizer.vocab_size)
    assert.are.equal(512, r.padded_vocab_size) -- 257 padded to a multiple of 128 * 2
    assert.are.equal(32, r.dataset.seq_length)
    assert.are.equal(1234, r.dataset.random_seed)
    assert.is_true(r.mock)
    assert.is_nil(r.blend)
    assert.are.equal(10, r.scheduler.lr_decay_iters)
    assert.are.equal(0, r.scheduler.lr_warmup_iters)
    assert.are.equal(80, r.scheduler.lr_decay_steps)
    assert.are.equal(0.0, r.optimizer.min_lr)
    assert.are.equal(0.01, r.scheduler.start_weight_decay)
    assert.are.equal(4, r.num_layers_per_pipeline_stage)
    assert.are.same({}, r.warnings)
    -- the objects themselves are untouched
    local c = container()
    c:validate({ world_size = 1 })
    assert.is_nil(c.model.ffn_hidden_size)
    assert.is_nil(c.dataset.seq_length)
  end)

  it("derives the data-parallel size and the number of microbatches", function()
    local r = validate({ model = { tensor_model_parallel_size = 2, pipeline_model_parallel_size = 2 },
      train = { micro_batch_size = 1, global_batch_size = 16 } }, 8)
    assert.are.equal(2, r.data_parallel_size)
    assert.are.equal(8, r.num_microbatches)
    r = validate({ model = { context_parallel_size = 2 }, train = { micro_batch_size = 2, global_batch_size = 12 } }, 6)
    assert.are.equal(3, r.data_parallel_size)
    assert.are.equal(2, r.num_microbatches)
    r = config.validate(container({ train = { global_batch_size = 32 } }), 4)
    assert.are.equal(4, r.num_microbatches)
  end)

  it("defaults global_batch_size to micro_batch_size * data-parallel size", function()
    local c = container()
    c.train.global_batch_size = nil
    local r = c:validate({ world_size = 4 })
    assert.are.equal(8, r.train.global_batch_size)
    assert.are.equal(1, r.num_microbatches)
  end)

  it("assumes one data-parallel replica when no world size is given", function()
    local r = container({ model = { tensor_model_parallel_size = 2 } }):validate()
    assert.are.equal(2, r.world_size)
    assert.is_true(r.world_size_assumed)
    assert.are.equal(1, r.data_parallel_size)
  end)

  it("pads the vocabulary as Megatron's _vocab_size_with_padding", function()
    assert.are.equal(50432, config.padded_vocab_size(50257, 128, 2))
    assert.are.equal(50304, config.padded_vocab_size(50257, 128, 1))
    assert.are.equal(32768, config.padded_vocab_size(32000, 128, 8))
    assert.are.equal(51200, config.padded_vocab_size(51200, 128, 2))
    assert.are.equal(384, config.padded_vocab_size(257, 128, 1))
    assert.are.equal(260, config.padded_vocab_size(257, 1, 4))
    local r = validate({ model = { vocab_size = 50257, tensor_model_parallel_size = 2 } }, 2)
    assert.are.equal(50432, r.padded_vocab_size)
    r = validate({ model = { make_vocab_size_divisible_by = 64 }, tokenizer = { vocab_size = 300 } })
    assert.are.equal(300, r.model.vocab_size)
    assert.are.equal(320, r.padded_vocab_size)
    r = validate({ model = { vocab_size = 100 } }) -- mock data: any vocabulary
    assert.are.equal(128, r.padded_vocab_size)
    assert.are.equal("model.vocab_size (100) is smaller than the tokenizer's vocabulary (257): token ids would fall "
      .. "outside the embedding. Set model.vocab_size >= 257 or leave it nil to take the tokenizer's",
      msg_of(validate, { model = { vocab_size = 100 }, dataset = { data_path = { "corpus" } } }))
    assert_error_contains(function() validate({ tokenizer = { vocab_size = 200 } }) end,
      "tokenizer.vocab_size (200) is smaller than the ByteLevel tokenizer's 257 ids")
    assert_error_contains(function() config.padded_vocab_size(0, 128, 1) end, "vocab_size must be a positive integer")
  end)

  it("rejects a world size that TP*PP*CP does not divide", function()
    assert.are.equal("world_size (6) is not divisible by tensor_model_parallel_size (2) * pipeline_model_parallel_size "
      .. "(2) * context_parallel_size (1) = 4: run on a multiple of 4 ranks or change the parallel sizes",
      msg_of(validate, { model = { tensor_model_parallel_size = 2, pipeline_model_parallel_size = 2 } }, 6))
    assert_error_contains(function() container():validate({ world_size = 0 }) end,
      "validate: world_size = 0: must be a positive integer")
    assert_error_contains(function() container():validate({ world = 2 }) end,
      "validate: unknown option 'world' (did you mean 'world_size'?)")
  end)

  it("rejects a global batch size that MBS*DP does not divide (Megatron's message)", function()
    assert.are.equal("global batch size (10) is not divisible by micro batch size (2) times data parallel size (2). "
      .. "Set train.global_batch_size to a multiple of 4, or change train.micro_batch_size or the data-parallel size "
      .. "(world_size 2 / (TP 1 * PP 1 * CP 1))",
      msg_of(validate, { train = { global_batch_size = 10 } }, 2))
  end)

  it("requires the fields without defaults", function()
    local c = container()
    c.train.micro_batch_size = nil
    assert_error_contains(function() c:validate() end, "train.micro_batch_size is not set")
    c = container()
    c.train.train_iters = nil
    assert_error_contains(function() c:validate() end, "train.train_iters is not set")
    c = container()
    c.optimizer.lr = nil
    assert.are.equal("optimizer.lr is not set: give OptimizerConfig{lr = <peak learning rate>}", msg_of(c.validate, c))
    c = config.ConfigContainer({ model = { hidden_size = 8, num_attention_heads = 2 }, train = {} })
    assert.are.equal("model.num_layers is not set: GPTModelProvider needs num_layers, hidden_size and "
      .. "num_attention_heads", msg_of(c.validate, c))
  end)

  it("checks attention heads against TP", function()
    assert.are.equal("num_attention_heads (4) must be a multiple of tensor_model_parallel_size (8). Change "
      .. "model.num_attention_heads or model.tensor_model_parallel_size",
      msg_of(validate, { model = { tensor_model_parallel_size = 8 } }, 8))
  end)

  it("checks num_query_groups against TP (multiple or divisor) and the heads", function()
    local r = validate({ model = { num_attention_heads = 8, num_query_groups = 2, tensor_model_parallel_size = 4 } }, 4)
    assert.are.equal(2, r.model.num_query_groups)
    r = validate({ model = { num_attention_heads = 8, num_query_groups = 4, tensor_model_parallel_size = 2 } }, 2)
    assert.are.equal(4, r.model.num_query_groups)
    assert.are.equal("num_query_groups (3) must be a multiple or divisor of tensor_model_parallel_size (2). Change "
      .. "model.num_query_groups or model.tensor_model_parallel_size",
      msg_of(validate, { model = { hidden_size = 96, num_attention_heads = 12, num_query_groups = 3,
        tensor_model_parallel_size = 2 } }, 2))
    assert.are.equal("num_attention_heads (8) must be divisible by num_query_groups (3): each query group serves "
      .. "num_attention_heads / num_query_groups heads. Set num_query_groups to a divisor of 8",
      msg_of(validate, { model = { num_attention_heads = 8, num_query_groups = 3 } }))
  end)

  it("requires hidden_size divisible by heads only when kv_channels is not set", function()
    assert.are.equal("hidden_size (66) must be divisible by num_attention_heads (4) when kv_channels is not set "
      .. "(kv_channels defaults to hidden_size / num_attention_heads). Change hidden_size or num_attention_heads, or "
      .. "set kv_channels explicitly", msg_of(validate, { model = { hidden_size = 66 } }))
    local r = validate({ model = { hidden_size = 66, kv_channels = 16 } })
    assert.are.equal(16, r.model.kv_channels)
  end)

  it("requires TP > 1 for sequence parallelism", function()
    assert.are.equal("sequence_parallel=true requires tensor_model_parallel_size > 1 (got tensor_model_parallel_size "
      .. "= 1): Cannot use sequence parallelism without tensor parallelism. Set sequence_parallel = false or "
      .. "tensor_model_parallel_size >= 2", msg_of(validate, { model = { sequence_parallel = true } }))
    assert.is_true(validate({ model = { sequence_parallel = true, tensor_model_parallel_size = 2 } }, 2)
      .model.sequence_parallel)
  end)

  it("checks the pipeline split", function()
    assert.are.equal("num_layers (3) is not divisible by pipeline_model_parallel_size (2): Number of layers should "
      .. "be divisible by the pipeline-model-parallel size. Make num_layers a multiple of 2",
      msg_of(validate, { model = { num_layers = 3, pipeline_model_parallel_size = 2 } }, 2))
    assert.are.equal("num_layers (12) / pipeline_model_parallel_size (3) = 4 layers per pipeline stage is not "
      .. "divisible by virtual_pipeline_model_parallel_size (3): number of layers per pipeline stage must be divisible "
      .. "by the number of virtual stages. Make num_layers a multiple of 9 (PP * VPP) or change "
      .. "virtual_pipeline_model_parallel_size",
      msg_of(validate, { model = { num_layers = 12, pipeline_model_parallel_size = 3,
        virtual_pipeline_model_parallel_size = 3 }, train = { micro_batch_size = 1, global_batch_size = 3 } }, 3))
    local r = validate({ model = { num_layers = 8, pipeline_model_parallel_size = 2 } }, 2)
    assert.are.equal(4, r.num_layers_per_pipeline_stage)
    assert.are.equal("bf16", validate({ model = { pipeline_model_parallel_size = 2, params_dtype = "bf16", bf16 = true } }, 2)
      .model.pipeline_dtype)
  end)

  it("checks the interleaved (virtual pipeline) schedule", function()
    assert.are.equal("virtual_pipeline_model_parallel_size = 2 requires pipeline_model_parallel_size > 1 (got 1): "
      .. "pipeline-model-parallel size should be greater than 1 with interleaved schedule. Unset "
      .. "virtual_pipeline_model_parallel_size or raise pipeline_model_parallel_size",
      msg_of(validate, { model = { virtual_pipeline_model_parallel_size = 2 } }))
    assert_error_contains(function()
      validate({ model = { virtual_pipeline_model_parallel_size = 2, pipeline_model_parallel_size = 2 } }, 2)
    end, "virtual_pipeline_model_parallel_size = 2 with pipeline_model_parallel_size = 2 and overlap_p2p_comm = false",
      "pipeline-model-parallel size should be greater than 2", "Set overlap_p2p_comm = true")
    local r = validate({ model = { virtual_pipeline_model_parallel_size = 2, pipeline_model_parallel_size = 2,
      overlap_p2p_comm = true } }, 2)
    assert.are.equal(2, r.model.virtual_pipeline_model_parallel_size)
    assert.are.equal(1, r.num_layers_per_virtual_stage)
    assert.are.equal(2, r.model.microbatch_group_size_per_vp_stage)
    -- VPP = 1 means no interleaving
    r = validate({ model = { virtual_pipeline_model_parallel_size = 1 } })
    assert.is_nil(r.model.virtual_pipeline_model_parallel_size)
    local pp4 = { num_layers = 8, pipeline_model_parallel_size = 4, virtual_pipeline_model_parallel_size = 2 }
    assert.are.equal("The remainder of M (the total micro-batches, 6) divided by N (number of contiguous "
      .. "micro-batches in a virtual pipeline stage, microbatch_group_size_per_vp_stage = 4) should be 0, or larger "
      .. "than or equal to the pipeline-parallel size (4), but it is 2. Make num_microbatches a multiple of 4",
      msg_of(validate, { model = pp4, train = { micro_batch_size = 1, global_batch_size = 6 } }, 4))
    assert.are.equal("The number of contiguous micro-batches in a virtual pipeline stage should range in [PP=4 , "
      .. "M=2] (microbatch_group_size_per_vp_stage = 4, num_microbatches = 2). Raise train.global_batch_size so that "
      .. "num_microbatches >= 4",
      msg_of(validate, { model = pp4, train = { micro_batch_size = 1, global_batch_size = 2 } }, 4))
    r = validate({ model = pp4, train = { micro_batch_size = 1, global_batch_size = 8 } }, 4)
    assert.are.equal(8, r.num_microbatches)
  end)

  it("requires seq_length divisible by 2*CP when CP > 1", function()
    assert.are.equal("Sequence length must be divisible by 2 * context parallel size if context parallel is used. "
      .. "seq_length (32) is not a multiple of 2 * context_parallel_size (2 * 3 = 6): the nearest valid lengths are 30 "
      .. "and 36. Change seq_length or context_parallel_size",
      msg_of(validate, { model = { context_parallel_size = 3 }, train = { global_batch_size = 2 } }, 3))
    assert.are.equal(1, validate({ model = { context_parallel_size = 4 } }, 4).data_parallel_size)
  end)

  it("matches or fills the dataset sequence length", function()
    assert.are.equal("model.seq_length (32) and dataset.seq_length (64) differ: Please ensure sequence length "
      .. "configuration in model config and dataset config match. Set one of them (the other follows) or make them "
      .. "equal", msg_of(validate, { dataset = { seq_length = 64 } }))
    assert.are.equal(32, validate({ dataset = { seq_length = 32 } }).dataset.seq_length)
  end)

  it("needs an even rotary dimension for rope", function()
    assert.are.equal("position_embedding_type = 'rope' needs an even rotary dimension, but kv_channels (9) * "
      .. "rotary_percent (1.0) = 9 is odd. Make kv_channels even (it defaults to hidden_size / num_attention_heads) "
      .. "or change rotary_percent", msg_of(validate, { model = { hidden_size = 36, position_embedding_type = "rope" } }))
    assert.are.equal(16, validate({ model = { position_embedding_type = "rope" } }).rotary_dim)
  end)

  it("accepts only the MLPs the engine implements", function()
    assert_error_contains(function() validate({ model = { activation_func = "silu" } }) end,
      "activation_func = 'silu' with gated_linear_unit = false is not supported")
    assert_error_contains(function() validate({ model = { activation_func = "geglu" } }) end,
      "activation_func = 'gelu' with gated_linear_unit = true is not supported")
    assert.is_true(validate({ model = { activation_func = "swiglu" } }).model.gated_linear_unit)
    assert.is_true(validate({ model = { openai_gelu = true } }).model.openai_gelu)
    assert_error_contains(function() validate({ model = { activation_func = "swiglu", openai_gelu = true } }) end,
      "openai_gelu = true is GELU's tanh approximation: it needs the GELU MLP (activation_func = 'gelu', "
        .. "gated_linear_unit = false), not activation_func = 'silu' with gated_linear_unit = true")
  end)

  -- Zero-centred RMSNorm weights as Transformer Engine's RMSNorm computes them (Bridge's default spec;
  -- Gemma's and Qwen3-Next's providers use them), though Megatron-Core's local spec asserts on them.
  it("takes zero-centred weights for LayerNorm and RMSNorm", function()
    for _, norm in ipairs { "LayerNorm", "RMSNorm" } do
      local r = validate({ model = { layernorm_zero_centered_gamma = true, normalization = norm } })
      assert.is_true(r.model.layernorm_zero_centered_gamma)
    end
  end)

  describe("mixture of experts", function()
    local moe = { num_moe_experts = 4, add_bias_linear = false }
    local function with(t)
      local out = {}
      for k, v in pairs(moe) do out[k] = v end
      for k, v in pairs(t) do out[k] = v end
      return { model = out }
    end

    it("derives expert-parallel sizes", function()
      local r = validate(with({ expert_model_parallel_size = 2 }), 2)
      assert.are.equal(2, r.num_local_experts)
      assert.are.equal(1, r.expert_data_parallel_size)
      assert.are.equal(256, r.model.moe_ffn_hidden_size)
      r = validate(with({ expert_model_parallel_size = 2, tensor_model_parallel_size = 2,
        expert_tensor_parallel_size = 1 }), 8)
      assert.are.equal(4, r.data_parallel_size)
      assert.are.equal(4, r.expert_data_parallel_size)
      assert.are.equal(1, #r.warnings)
      assert.truthy(r.warnings[1]:find("sequence parallelism must be used", 1, true))
    end)

    it("requires num_moe_experts for EP", function()
      assert.are.equal("expert_model_parallel_size = 2 requires num_moe_experts: num_moe_experts must be non None to "
        .. "use expert-parallel. Set num_moe_experts (a multiple of 2) or expert_model_parallel_size = 1",
        msg_of(validate, { model = { expert_model_parallel_size = 2 } }, 2))
    end)

    it("requires experts divisible by EP", function()
      assert.are.equal("num_moe_experts (3) is not a multiple of expert_model_parallel_size (2): Number of experts "
        .. "should be a multiple of expert model parallel_size. Change num_moe_experts or expert_model_parallel_size",
        msg_of(validate, with({ num_moe_experts = 3, expert_model_parallel_size = 2 }), 2))
    end)

    it("requires world divisible by ETP*EP*PP", function()
      assert.are.equal("world_size (2) is not divisible by expert_tensor_parallel_size (2) * "
        .. "expert_model_parallel_size (4) * pipeline_model_parallel_size (1) = 8 (expert_tensor_model_pipeline_parallel "
        .. "size). Run on a multiple of 8 ranks or change the expert parallel sizes",
        msg_of(validate, with({ expert_model_parallel_size = 4, tensor_model_parallel_size = 2 }), 2))
    end)

    it("requires moe_router_topk <= num_moe_experts", function()
      assert.are.equal("moe_router_topk (5) must be <= num_moe_experts (4): each token is routed to moe_router_topk "
        .. "different experts. Lower moe_router_topk or add experts",
        msg_of(validate, with({ moe_router_topk = 5 })))
    end)

    it("requires pre-softmax routing for top-1 softmax", function()
      assert_error_contains(function() validate(with({ moe_router_topk = 1 })) end,
        "moe_router_topk = 1 with moe_router_score_function = 'softmax' needs moe_router_pre_softmax = true")
      assert.are.equal(1, validate(with({ moe_router_topk = 1, moe_router_pre_softmax = true })).model.moe_router_topk)
      assert.are.equal(1, validate(with({ moe_router_topk = 1, moe_router_score_function = "sigmoid" }))
        .model.moe_router_topk)
    end)

    it("checks capacity factor rules", function()
      assert_error_contains(function() validate(with({ moe_pad_expert_input_to_capacity = true })) end,
        "moe_expert_capacity_factor must be set to use moe_pad_expert_input_to_capacity")
      assert_error_contains(function()
        validate(with({ moe_expert_capacity_factor = 1.0, moe_router_load_balancing_type = "sinkhorn" }))
      end, "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, global_aux_loss or none load balancing")
      assert.is_nil(validate(with({ moe_expert_capacity_factor = -1.0 })).model.moe_expert_capacity_factor)
      assert.are.equal(1.5, validate(with({ moe_expert_capacity_factor = 1.5, moe_pad_expert_input_to_capacity = true }))
        .model.moe_expert_capacity_factor)
    end)

    it("rejects MoE bias with ETP > 1", function()
      assert_error_contains(function()
        validate({ model = { num_moe_experts = 4, tensor_model_parallel_size = 2 } }, 2)
      end, "Bias in Moe is only supported when ETP==1", "Set add_bias_linear = false or expert_tensor_parallel_size = 1")
    end)

    it("rejects MoE-only fields without experts", function()
      assert.are.equal("moe_ffn_hidden_size is set (128) but num_moe_experts is None. Please set num_moe_experts or "
        .. "remove moe_ffn_hidden_size.", msg_of(validate, { model = { moe_ffn_hidden_size = 128 } }))
    end)

    it("requires the sigmoid score function for expert bias", function()
      assert_error_contains(function() validate(with({ moe_router_enable_expert_bias = true })) end,
        "moe_router_enable_expert_bias = true with moe_router_score_function = 'softmax'")
    end)
  end)

  it("checks learning rates and the schedule", function()
    assert.are.equal("optimizer.min_lr (0.001) must be <= optimizer.lr (0.0001): the schedule decays from lr down to "
      .. "min_lr. Lower min_lr or raise lr", msg_of(validate, { optimizer = { lr = 1e-4, min_lr = 1e-3 } }))
    assert.are.equal("scheduler.lr_warmup_iters (10) must be less than scheduler.lr_decay_iters (10) (lr_decay_iters "
      .. "defaults to train.train_iters): warmup has to end before the decay does. Lower lr_warmup_iters or raise "
      .. "lr_decay_iters", msg_of(validate, { scheduler = { lr_warmup_iters = 10 } }))
    assert_error_contains(function() validate({ scheduler = { lr_warmup_iters = 30, lr_decay_iters = 20 } }) end,
      "scheduler.lr_warmup_iters (30) must be less than scheduler.lr_decay_iters (20):")
    assert_error_contains(function() validate({ scheduler = { lr_warmup_init = 1.0 } }) end,
      "scheduler.lr_warmup_init (1.0) must be <= optimizer.lr (0.001)")
    assert_error_contains(function() validate({ scheduler = { lr_warmup_iters = 2, lr_warmup_fraction = 0.1 } }) end,
      "use either lr_warmup_fraction or lr_warmup_iters")
    local r = validate({ scheduler = { lr_decay_style = "cosine", lr_warmup_iters = 2, lr_decay_iters = 8 },
      optimizer = { lr = 1e-3, min_lr = 1e-5 } })
    assert.are.equal(8, r.scheduler.lr_decay_iters)
    assert.are.equal(2, r.scheduler.lr_warmup_iters)
    assert.are.equal(16, r.scheduler.lr_warmup_steps)
    r = validate({ scheduler = { lr_warmup_fraction = 0.2 } })
    assert.are.equal(2.0, r.scheduler.lr_warmup_iters)
    r = validate({ scheduler = { lr_decay_style = "WSD" } })
    assert.are.equal(10, r.scheduler.lr_wsd_decay_iters)
    assert_error_contains(function() validate({ scheduler = { start_weight_decay = 0.0, end_weight_decay = 0.1 } }) end,
      "scheduler.start_weight_decay (0.0) and scheduler.end_weight_decay (0.1) differ: weight-decay schedules are "
      .. "not implemented")
    assert_error_contains(function()
      validate({ scheduler = { start_weight_decay = 0.1, end_weight_decay = 0.0 } })
    end, "scheduler.end_weight_decay (0.0) must be >= scheduler.start_weight_decay (0.1)")
    -- Megatron's scheduler sets the weight decay of every decayed parameter group
    r = validate({ scheduler = { start_weight_decay = 0.05, end_weight_decay = 0.05 } })
    assert.are.equal(0.05, r.optimizer.weight_decay)
    assert_error_contains(function() validate({ model = { params_dtype = "bf16" } }) end,
      "model.params_dtype = 'bf16' needs model.bf16 = true")
    assert_error_contains(function() validate({ model = { bf16 = true }, optimizer = { params_dtype = "fp16" } }) end,
      "optimizer.params_dtype = 'fp16' needs fp16 mixed precision, which is not implemented")
    assert_error_contains(function() validate({ scheduler = { max_steps = 5 } }) end,
      "scheduler.max_steps (5) must be greater than or equal to train.train_iters (10)")
  end)

  it("needs eval_interval > 0 when eval_iters > 0", function()
    assert.are.equal("train.eval_interval = 0 with train.eval_iters = 100: eval_interval must be > 0 when "
      .. "eval_iters > 0. Set eval_interval to the number of iterations between evaluations, or eval_iters = 0 to "
      .. "disable evaluation", msg_of(validate, { train = { eval_interval = 0 } }))
    assert.are.equal(0, validate({ train = { eval_interval = 0, eval_iters = 0 } }).train.eval_interval)
  end)

  it("applies precision settings", function()
    assert_error_contains(function() validate({ model = { bf16 = true, fp16 = true } }) end,
      "model.bf16 = true and model.fp16 = true: only one of fp16 and bf16 can be enabled")
    local r = validate({ mixed_precision = "bf16_mixed" })
    assert.is_true(r.model.bf16)
    assert.are.equal("bf16", r.model.params_dtype)
    assert.are.equal("bf16", r.model.pipeline_dtype)
    assert.is_true(r.optimizer.bf16)
    assert.is_true(r.ddp.grad_reduce_in_fp32)
  end)

  it("syncs the distributed optimizer and derives bucket sizes", function()
    local r = validate({ optimizer = { lr = 1e-3, use_distributed_optimizer = true } }, 2)
    assert.is_true(r.ddp.use_distributed_optimizer)
    assert.truthy(r.warnings[1]:find("Distributed optimizer settings were not in sync", 1, true))
    assert.is_nil(r.ddp.bucket_size)
    r = validate({ ddp = { overlap_grad_reduce = true } }, 2)
    assert.are.equal(40000000, r.ddp.bucket_size)
    r = validate({ ddp = { overlap_grad_reduce = true }, train = { global_batch_size = 128 } }, 64)
    assert.are.equal(64000000, r.ddp.bucket_size)
    assert_error_contains(function() validate({ ddp = { overlap_param_gather = true, use_distributed_optimizer = true } }) end,
      "Must use --overlap-param-gather with --overlap-grad-reduce")
    assert_error_contains(function() validate({ ddp = { bucket_size = 10, num_buckets = 2 } }) end,
      "Cannot specify both num_buckets and bucket_size")
  end)

  it("parses data_path as Megatron-LM's --data-path", function()
    local b = config.parse_data_path({ "0.3", "a", "0.7", "b" })
    assert.are.same({ prefixes = { "a", "b" }, weights = { 0.3, 0.7 } }, b)
    assert.are.same(b, config.parse_data_path({ 0.3, "a", 0.7, "b" }))
    assert.are.same(b, config.parse_data_path("0.3 a 0.7 b"))
    assert.are.same({ prefixes = { "a", "b" } }, config.parse_data_path({ "a", "b" }))
    assert.are.same({ prefixes = { "a" } }, config.parse_data_path("a"))
    assert.are.same({ prefixes = { "a", "b", "c" } }, config.parse_data_path({ "a", "b", "c" }))
    assert_error_contains(function() config.parse_data_path({ 0.3, "a", "b", 0.7 }) end, "mixes weights and prefixes")
    assert_error_contains(function() config.parse_data_path({ 0.5, 1.0 }) end,
      "entry 2 must be a dataset prefix (a string) after weight 0.5")
    assert_error_contains(function() config.parse_data_path({ "0", "a" }) end, "the weights sum to 0")
    assert_error_contains(function() config.GPTDatasetConfig({ data_path = {} }) end,
      "GPTDatasetConfig.data_path = {}: must be a prefix string or a list of prefixes")
    local r = validate({ dataset = { data_path = { "0.3", "a", "0.7", "b" } } })
    assert.is_false(r.mock)
    assert.are.same({ "a", "b" }, r.blend.prefixes)
    assert_error_contains(function() validate({ dataset = { mock = false } }) end,
      "dataset.mock = false but dataset.data_path is nil")
    assert_error_contains(function() validate({ dataset = { mock = true, data_path = "a" } }) end,
      "dataset.mock = true but dataset.data_path = {'a'} is set")
  end)

  it("parses the split as Megatron", function()
    local v = config.parse_split("969,30,1")
    assert.are.equal(0.969, v[1])
    assert.are.equal(0.03, v[2])
    assert.are.equal(0.001, v[3])
    assert.are.same({ 0.5, 0.5, 0.0 }, config.parse_split("1,1"))
    assert.are.same({ 1.0, 0.0, 0.0 }, config.parse_split("99"))
    assert_error_contains(function() config.parse_split("0,0,0") end, "the weights sum to 0")
    assert_error_contains(function() config.GPTDatasetConfig({ split = "a,b" }) end,
      "GPTDatasetConfig.split = 'a,b': must be a string of up to three non-negative weights")
  end)

  it("rejects async checkpoint saves and a step without a load directory", function()
    assert_error_contains(function() validate({ checkpoint = { async_save = true } }) end,
      "CheckpointConfig.async_save = true is not supported: checkpoints are saved synchronously")
    assert_error_contains(function() validate({ checkpoint = { ckpt_step = 5 } }) end,
      "ckpt_step=5 specified but checkpoint.load is None")
    local r = validate({ checkpoint = { save_interval = 5 }, logger = { log_dir = "/tmp/x" } })
    assert.truthy(r.warnings[1]:find("no checkpoints will be written", 1, true))
    assert.are.equal("/tmp/x/metrics.jsonl", r.logger.metrics_file)
  end)
end)

describe("luatron.config serialisation", function()
  local function full()
    return container({
      model = { tensor_model_parallel_size = 2, activation_func = "swiglu", normalization = "RMSNorm", add_bias_linear = false,
        num_moe_experts = 4, moe_expert_capacity_factor = 1.25, params_dtype = "bf16" },
      dataset = { data_path = { 0.3, "a", 0.7, "b" }, split = "98,1,1" },
      scheduler = { lr_decay_style = "cosine", lr_warmup_iters = 2 },
      checkpoint = { save = "/tmp/ckpt", save_interval = 5 },
      rng = { seed = 42 },
      mixed_precision = "bf16_mixed",
    })
  end

  it("turns objects into plain tables of their fields", function()
    local t = config.to_table(full())
    assert.is_nil(getmetatable(t))
    assert.is_nil(getmetatable(t.model))
    assert.are.equal(2, t.model.tensor_model_parallel_size)
    assert.are.equal("silu", t.model.activation_func)
    assert.is_nil(t.model.activation) -- aliases are not fields
    assert.is_nil(t.model.kv_channels) -- unset fields are left out
    assert.are.same({ 0.3, "a", 0.7, "b" }, t.dataset.data_path)
    assert.are.equal(42, t.rng.seed)
    assert.are.equal("bf16_mixed", t.mixed_precision)
    assert.are.same(t, full():to_table())
  end)

  it("round-trips through from_table and JSON", function()
    local c = full()
    local c2 = config.from_table(config.to_table(c))
    assert.are.equal("ConfigContainer", config.class_of(c2))
    assert.are.same(config.to_table(c), config.to_table(c2))
    assert.is_true(c == c2)
    local text = json.encode(config.to_table(c))
    local c3 = config.from_table(json.decode(text))
    assert.are.same(config.to_table(c), config.to_table(c3))
    assert.are.equal(text, json.encode(config.to_table(c3)))
    assert.are.same(c:validate({ world_size = 2 }), c3:validate({ world_size = 2 }))
    local m = config.from_table({ num_layers = 3 }, "GPTModelProvider")
    assert.are.equal(3, m.num_layers)
    assert.are.equal(3, config.from_table(json.decode('{"num_layers": 3, "kv_channels": null}'), "GPTModelProvider")
      .num_layers)
    assert_error_contains(function() config.from_table({ model = { num_layer = 1 }, train = {} }) end,
      "ConfigContainer.model: GPTModelProvider: unknown field 'num_layer'")
  end)

  it("describes a config for logs", function()
    local text = config.describe(full())
    assert.truthy(text:find("^ConfigContainer\n"))
    assert.truthy(text:find("\n  model: GPTModelProvider\n", 1, true))
    assert.truthy(text:find("\n    tensor_model_parallel_size %.+ 2  %*\n"))
    assert.truthy(text:find("\n    kv_channels %.+ nil\n"))
    local short = full():describe({ changed_only = true })
    assert.is_nil(short:find("kv_channels", 1, true))
    assert.truthy(short:find("seed %.+ 42  %*"))
    assert.truthy(config.describe(config.RNGConfig({})):find("^RNGConfig\n  seed %.+ 1234\n"))
  end)
end)

-- luatron.config.schema: the fields of every config class, with Megatron's names and defaults,
-- and the per-field type/range checks. The cross-field rules live in luatron.config.validate.
--
-- A field spec is { name, kind, default, [nullable = bool] }. A field whose default is nil may be
-- nil ("not set"); other fields must hold a value. `kind` names a checker below or is a table
-- { enum = {...} }.
--
-- Every field either does what Megatron does or is refused, and its spec says which:
--   (nothing)        the engine reads it (tests/lua/fields_spec.lua checks that code outside the
--                    config module does)
--   refuse = why     only the default is accepted; any other value is an error naming `why`
--   needs = field    it only acts together with another field of the class (or "group.field")
--                    that is itself refused or refused at run time (e.g. MoE options without MoE)
--   into = field     validate resolves it into another field (or "group.field"), which is read
--   inert = why      by Megatron's own definition it changes no trained value here; `why` says why
local util = require "luatron.config.util"
util.register_source()
local fmt = util.fmt

local schema = {}

------------------------------------------------------------------------------------------------
-- Kinds: check(v) -> ok, normalized value; rule = the text after "must be ...".
------------------------------------------------------------------------------------------------

local function as_int(v)
  if math.type(v) == "integer" then return v end
  if math.type(v) == "float" and v == math.floor(v) and v > -2 ^ 63 and v < 2 ^ 63 then
    return math.tointeger(v)
  end
  return nil
end

local function finite(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

local DTYPE_ALIASES = {
  fp32 = "fp32", float32 = "fp32", float = "fp32",
  bf16 = "bf16", bfloat16 = "bf16",
  fp16 = "fp16", float16 = "fp16", half = "fp16",
}

local kinds = {
  posint = { rule = "must be a positive integer",
    check = function(v) local i = as_int(v); return i ~= nil and i > 0, i end },
  nonnegint = { rule = "must be a non-negative integer",
    check = function(v) local i = as_int(v); return i ~= nil and i >= 0, i end },
  int = { rule = "must be an integer",
    check = function(v) local i = as_int(v); return i ~= nil, i end },
  posnum = { rule = "must be a positive number",
    check = function(v) return finite(v) and v > 0, v end },
  nonnegnum = { rule = "must be a non-negative number",
    check = function(v) return finite(v) and v >= 0, v end },
  num = { rule = "must be a finite number",
    check = function(v) return finite(v), v end },
  prob = { rule = "must be a number in [0, 1)",
    check = function(v) return finite(v) and v >= 0 and v < 1, v end },
  fraction = { rule = "must be a number in [0, 1]",
    check = function(v) return finite(v) and v >= 0 and v <= 1, v end },
  posfraction = { rule = "must be a number in (0, 1]",
    check = function(v) return finite(v) and v > 0 and v <= 1, v end },
  bool = { rule = "must be true or false",
    check = function(v) return type(v) == "boolean", v end },
  string = { rule = "must be a string",
    check = function(v) return type(v) == "string", v end },
  path = { rule = "must be a non-empty string (a path)",
    check = function(v) return type(v) == "string" and v ~= "", v end },
  most_recent_k = { rule = "must be -1 (keep every checkpoint) or a positive integer (keep that many)",
    check = function(v) local i = as_int(v); return i ~= nil and (i == -1 or i > 0), i end },
  dtype = { rule = "must be one of 'fp32', 'bf16', 'fp16' (or 'float32', 'bfloat16', 'float16')",
    check = function(v)
      local d = type(v) == "string" and DTYPE_ALIASES[v:lower()]
      return d ~= nil and d ~= false, d
    end,
    suggest = { "fp32", "bf16", "fp16", "float32", "bfloat16", "float16" } },
  split = { rule = "must be a string of up to three non-negative weights for train,valid,test such as '969,30,1'",
    check = function(v)
      if type(v) ~= "string" then return false end
      local n = 0
      for _ in v:gmatch("[.0-9]+") do n = n + 1 end
      local rest = v:gsub("[.0-9]+", ""):gsub("[%s,/]", "")
      return n >= 1 and n <= 3 and rest == "", v
    end },
  -- GPTDatasetConfig.data_path: Megatron-LM --data-path semantics. A string (split on whitespace)
  -- or a list of prefixes, optionally interleaved with weights: {"0.3", "a", "0.7", "b"},
  -- {0.3, "a", 0.7, "b"} or {"a", "b"}. Stored as a list; parsed into a blend by validate.
  data_path = { rule = "must be a prefix string or a list of prefixes, optionally weighted as {w1, 'prefix1', w2, 'prefix2'}",
    check = function(v)
      if type(v) == "string" then
        local list = {}
        for w in v:gmatch("%S+") do list[#list + 1] = w end
        return #list > 0, list
      end
      if type(v) ~= "table" or getmetatable(v) ~= nil and not (getmetatable(v).__name == "json.array") then
        return false
      end
      local n = #v
      if n == 0 then return false end
      local list = {}
      for k in pairs(v) do
        if math.type(k) ~= "integer" or k < 1 or k > n then return false end
      end
      for i = 1, n do
        local x = v[i]
        if type(x) == "number" then
          if not finite(x) then return false end
        elseif type(x) ~= "string" or x == "" then
          return false
        end
        list[i] = x
      end
      return true, list
    end },
}
schema.kinds = kinds
schema.as_int = as_int
schema.DTYPE_ALIASES = DTYPE_ALIASES

-- Check one value against a field spec. Returns the normalized value or raises a config error
-- "<Class>.<field> = <value>: <rule>".
function schema.check_field(class_name, spec, v)
  local name, kind = spec.name, spec.kind
  if v == nil then
    if spec.nullable then return nil end
    util.fail("%s.%s = nil: must be set (default %s); it cannot be nil", class_name, name, fmt(spec.default))
  end
  if type(kind) == "table" and kind.enum then
    for _, e in ipairs(kind.enum) do
      if v == e then
        schema.check_refused(class_name, spec, v)
        return v
      end
    end
    local names = {}
    for _, e in ipairs(kind.enum) do names[#names + 1] = fmt(e) end
    local strs = {}
    for _, e in ipairs(kind.enum) do if type(e) == "string" then strs[#strs + 1] = e end end
    util.fail("%s.%s = %s: must be one of %s%s%s", class_name, name, fmt(v), table.concat(names, ", "),
      kind.no_suggest and "" or util.did_you_mean(v, strs), kind.note and ("; " .. kind.note) or "")
  end
  local k = kinds[kind]
  assert(k, "unknown kind " .. tostring(kind))
  local ok, nv = k.check(v)
  if not ok then
    local hint = k.suggest and util.did_you_mean(v, k.suggest) or ""
    util.fail("%s.%s = %s: %s%s", class_name, name, fmt(v), k.rule, hint)
  end
  schema.check_refused(class_name, spec, nv)
  return nv
end

-- A refused field accepts its default only.
function schema.check_refused(class_name, spec, v)
  if spec.refuse and v ~= nil and v ~= spec.default then
    util.fail("%s.%s = %s is not supported: %s. Leave it at %s", class_name, spec.name, fmt(v), spec.refuse,
      fmt(spec.default))
  end
end

------------------------------------------------------------------------------------------------
-- Classes
------------------------------------------------------------------------------------------------

local function enum(...) return { enum = { ... } } end

schema.classes = {}
schema.order = {}

local function class(name, def)
  def.name = name
  def.index = {}
  def.names = {}
  for i, f in ipairs(def.fields) do
    local spec = { name = f[1], kind = f[2], default = f[3], refuse = f.refuse, needs = f.needs, into = f.into,
      inert = f.inert }
    if f.nullable ~= nil then spec.nullable = f.nullable else spec.nullable = (f[3] == nil) end
    def.fields[i] = spec
    def.index[spec.name] = spec
    def.names[#def.names + 1] = spec.name
  end
  def.aliases = def.aliases or {}
  def.unsupported = def.unsupported or {}
  schema.classes[name] = def
  schema.order[#schema.order + 1] = name
  return def
end

-- Activation names accepted for GPTModelProvider.activation_func (Bridge spells SwiGLU as
-- activation_func = "silu" with gated_linear_unit = true; "swiglu"/"geglu" are accepted aliases).
schema.ACTIVATION_ALIASES = {
  swiglu = { "silu", true },
  geglu = { "gelu", true },
}

class("GPTModelProvider", {
  fields = {
    -- architecture (TransformerConfig / GPTModelProvider)
    { "num_layers", "posint", nil },
    { "hidden_size", "posint", nil },
    { "num_attention_heads", "posint", nil },
    { "num_query_groups", "posint", nil },
    { "ffn_hidden_size", "posint", nil },
    { "kv_channels", "posint", nil },
    { "seq_length", "posint", 1024 },
    { "vocab_size", "posint", nil },
    -- validate pads vocab_size to a multiple of it times TP: the engine takes the padded size as its vocab_size
    { "make_vocab_size_divisible_by", "posint", 128, into = "vocab_size" },
    { "normalization", enum("LayerNorm", "RMSNorm"), "LayerNorm" },
    { "layernorm_epsilon", "posnum", 1e-5 },
    { "layernorm_zero_centered_gamma", "bool", false },
    { "activation_func", { enum = { "gelu", "silu" },
      note = "SwiGLU is activation_func = 'silu' with gated_linear_unit = true ('swiglu' is accepted as a shorthand)" },
      "gelu", into = "gated_linear_unit" }, -- validate admits GELU, and SiLU gated (SwiGLU)
    { "gated_linear_unit", "bool", false },
    { "openai_gelu", "bool", false }, -- GELU's tanh approximation (GPT-2's gelu_new)
    { "position_embedding_type", enum("learned_absolute", "rope"), "learned_absolute" },
    { "rotary_base", "posnum", 10000 },
    { "rotary_percent", "posfraction", 1.0, refuse = "partial rotary embeddings are not implemented" },
    { "share_embeddings_and_output_weights", "bool", true },
    { "init_method_std", "posnum", 0.02 },
    { "hidden_dropout", "prob", 0.1 },
    { "attention_dropout", "prob", 0.1 },
    { "add_bias_linear", "bool", true },
    { "add_qkv_bias", "bool", false },
    { "qk_layernorm", "bool", false },
    { "apply_residual_connection_post_layernorm", "bool", false, inert = "Megatron-Core's TransformerLayer does "
      .. "not read it (only the legacy Megatron-LM model did): the residuals start from the layer's inputs either way" },
    { "calculate_per_token_loss", "bool", false, inert = "every target token counts (eod_mask_loss is refused), so "
      .. "each microbatch has the same number of tokens and the per-token mean is the per-microbatch mean" },
    -- precision and placement
    { "bf16", "bool", false },
    { "fp16", "bool", false },
    { "params_dtype", "dtype", "fp32", into = "bf16" },
    { "device", { enum = { "cpu", "cuda" }, no_suggest = true, note = "'cuda' puts tensors on the GPU" }, "cpu" },
    -- parallelism (ModelParallelConfig)
    { "tensor_model_parallel_size", "posint", 1 },
    { "pipeline_model_parallel_size", "posint", 1 },
    { "virtual_pipeline_model_parallel_size", "posint", nil },
    { "sequence_parallel", "bool", false },
    { "context_parallel_size", "posint", 1 },
    { "cp_comm_type", { enum = { "p2p", "all_gather" }, note = "Megatron's a2a and a2a+p2p are not built" }, "p2p" },
    { "expert_model_parallel_size", "posint", 1 },
    { "expert_tensor_parallel_size", "posint", nil },
    { "pipeline_dtype", "dtype", nil },
    { "overlap_p2p_comm", "bool", false, inert = "it changes when point-to-point transfers run behind "
      .. "computation, not what they carry (validation keeps Megatron's rule that PP = 2 with virtual stages needs it)" },
    { "microbatch_group_size_per_vp_stage", "posint", nil },
    -- the learned position table has seq_length rows; validate accepts max_position_embeddings = seq_length
    { "max_position_embeddings", "posint", nil, into = "seq_length" },
    -- mixture of experts
    { "num_moe_experts", "posint", nil },
    { "moe_router_topk", "posint", 2 },
    { "moe_ffn_hidden_size", "posint", nil },
    { "moe_shared_expert_intermediate_size", "posint", nil },
    { "moe_shared_expert_overlap", "bool", false },
    { "moe_layer_freq", "posint", 1 },
    { "moe_router_load_balancing_type", enum("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"),
      "aux_loss" },
    { "moe_aux_loss_coeff", "nonnegnum", 0.0 },
    { "moe_z_loss_coeff", "nonnegnum", nil },
    { "moe_router_topk_scaling_factor", "posnum", nil },
    { "moe_router_pre_softmax", "bool", false },
    { "moe_router_score_function", enum("softmax", "sigmoid"), "softmax" },
    { "moe_router_enable_expert_bias", "bool", false },
    { "moe_router_bias_update_rate", "nonnegnum", 1e-3 },
    { "moe_expert_capacity_factor", "num", nil },
    { "moe_pad_expert_input_to_capacity", "bool", false },
    { "moe_token_drop_policy", enum("probs", "position"), "probs" },
    { "moe_token_dispatcher_type", enum("allgather", "alltoall", "flex"), "allgather" },
    { "moe_grouped_gemm", "bool", false },
  },
  aliases = { activation = "activation_func" },
  unsupported = {
    recompute_granularity = "activation recomputation is not implemented",
    recompute_method = "activation recomputation is not implemented",
    recompute_num_layers = "activation recomputation is not implemented",
    fp8 = "FP8 training is not implemented",
    fp4 = "FP4 training is not implemented",
    multi_latent_attention = "multi-latent attention is not implemented",
    mtp_num_layers = "multi-token prediction is not implemented",
    window_size = "sliding-window attention is not implemented",
    account_for_embedding_in_pipeline_split = "uneven pipeline splits are not implemented",
    account_for_loss_in_pipeline_split = "uneven pipeline splits are not implemented",
    num_layers_in_first_pipeline_stage = "uneven pipeline splits are not implemented",
    num_layers_in_last_pipeline_stage = "uneven pipeline splits are not implemented",
    transformer_layer_spec = "layer specs are Python objects; luatron builds its own GPT layers",
    tp_comm_overlap = "TP communication overlap is not implemented",
    moe_flex_dispatcher_backend = "DeepEP/HybridEP backends are not available",
    moe_enable_deepep = "DeepEP is not available",
    rotary_interleaved = "interleaved rotary embeddings are not implemented",
  },
})

class("TrainingConfig", {
  fields = {
    { "micro_batch_size", "posint", nil },
    { "global_batch_size", "posint", nil },
    { "train_iters", "posint", nil },
    { "eval_iters", "nonnegint", 100 },
    { "eval_interval", "nonnegint", nil },
    { "skip_train", "bool", false },
    { "exit_interval", "posint", nil },
    { "exit_duration_in_mins", "posnum", nil },
    { "exit_signal_handler", "bool", false },
  },
  unsupported = {
    train_samples = "sample-based training is not implemented; set train_iters",
    num_epochs = "epoch-based training is not implemented; set train_iters",
    rampup_batch_size = "batch-size ramp-up is not implemented",
    step_batch_size_schedule = "batch-size schedules are not implemented",
  },
})

class("OptimizerConfig", {
  fields = {
    { "optimizer", enum("adam", "sgd"), "adam" },
    { "lr", "nonnegnum", nil },
    { "min_lr", "nonnegnum", nil },
    { "weight_decay", "nonnegnum", 0.01 },
    { "adam_beta1", "prob", 0.9 },
    { "adam_beta2", "prob", 0.999 },
    { "adam_eps", "posnum", 1e-8 },
    { "sgd_momentum", "prob", 0.9 },
    { "decoupled_weight_decay", "bool", true, refuse = "Adam with L2 regularisation is not implemented (luatron's Adam "
      .. "is AdamW; SGD's weight decay is always L2)" },
    { "clip_grad", "nonnegnum", 1.0 },
    { "bf16", "bool", false, inert = "the optimizer always keeps fp32 main weights and moments, as Megatron's with "
      .. "bf16; model.bf16 (or mixed_precision) selects bf16 compute" },
    { "fp16", "bool", false, refuse = "fp16 mixed precision (with loss scaling) is not implemented; use bf16" },
    { "params_dtype", "dtype", "fp32", into = "model.bf16" },
    { "loss_scale", "posnum", nil, refuse = "loss scaling is not implemented (bf16 needs none)" },
    { "initial_loss_scale", "posnum", 4294967296, needs = "fp16" },
    { "min_loss_scale", "posnum", 1.0, needs = "fp16" },
    { "loss_scale_window", "posnum", 1000, needs = "fp16" },
    { "hysteresis", "posint", 2, needs = "fp16" },
    { "use_distributed_optimizer", "bool", false },
    { "overlap_param_gather", "bool", false },
    { "log_num_zeros_in_grad", "bool", false, refuse = "counting zero gradients is not implemented" },
  },
  unsupported = {
    use_precision_aware_optimizer = "the precision-aware (TE FusedAdam) optimizer is not available",
    optimizer_cpu_offload = "optimizer CPU offload is not implemented",
    decoupled_lr = "a separate learning rate for input/output layers is not implemented",
    decoupled_min_lr = "a separate learning rate for input/output layers is not implemented",
  },
})

class("SchedulerConfig", {
  fields = {
    { "lr_decay_style", enum("constant", "linear", "cosine", "inverse-square-root", "WSD"), "linear" },
    { "lr_decay_iters", "posint", nil },
    { "lr_warmup_iters", "nonnegint", 0 },
    { "lr_warmup_fraction", "fraction", nil, into = "lr_warmup_iters" },
    { "lr_warmup_init", "nonnegnum", 0.0 },
    { "lr_wsd_decay_style", enum("exponential", "linear", "cosine", "minus_sqrt"), "exponential" },
    { "lr_wsd_decay_iters", "posint", nil },
    { "start_weight_decay", "nonnegnum", nil, into = "optimizer.weight_decay" },
    { "end_weight_decay", "nonnegnum", nil, into = "optimizer.weight_decay" },
    { "weight_decay_incr_style", enum("constant", "linear", "cosine"), "constant",
      refuse = "weight-decay schedules are not implemented" },
    { "override_opt_param_scheduler", "bool", false },
    { "use_checkpoint_opt_param_scheduler", "bool", false },
    { "max_steps", "posint", nil, into = "lr_decay_iters" },
  },
  unsupported = {
    lr_decay_samples = "sample-based schedules are not implemented; use lr_decay_iters",
    lr_warmup_samples = "sample-based schedules are not implemented; use lr_warmup_iters",
    lr_wsd_decay_samples = "sample-based schedules are not implemented; use lr_wsd_decay_iters",
  },
})

class("DistributedDataParallelConfig", {
  fields = {
    { "grad_reduce_in_fp32", "bool", false, inert = "gradients are accumulated and reduced in fp32 always: fp32 "
      .. "training has fp32 gradients, and Megatron-LM turns this on for bf16" },
    { "overlap_grad_reduce", "bool", false },
    { "overlap_param_gather", "bool", false },
    { "align_param_gather", "bool", false, inert = "it only orders the interleaved schedule's parameter all-gathers" },
    { "use_distributed_optimizer", "bool", false },
    { "num_distributed_optimizer_instances", "posint", 1,
      refuse = "partial distributed-optimizer sharding is not implemented" },
    { "check_for_nan_in_grad", "bool", false, inert = "luatron always stops on a NaN or infinite gradient" },
    { "check_for_large_grads", "bool", false, refuse = "large-gradient detection is not implemented" },
    { "bucket_size", "posint", nil },
    { "num_buckets", "posint", nil },
    { "pad_buckets_for_high_nccl_busbw", "bool", false, inert = "bucket padding for NCCL bandwidth changes no value" },
    { "average_in_collective", "bool", false, inert = "averaging in the collective or before it gives the same mean" },
  },
  unsupported = {
    use_megatron_fsdp = "Megatron-FSDP is not implemented",
    use_custom_fsdp = "Megatron-FSDP is not implemented",
    data_parallel_sharding_strategy = "Megatron-FSDP is not implemented",
    fp8_param_gather = "FP8 training is not implemented",
    nccl_ub = "NCCL user buffers are not used",
  },
})

class("GPTDatasetConfig", {
  fields = {
    { "seq_length", "posint", nil },
    { "data_path", "data_path", nil },
    { "split", "split", "969,30,1" },
    { "mock", "bool", nil },
    { "random_seed", "nonnegint", nil },
    { "reset_position_ids", "bool", false, refuse = "per-document position ids are not implemented" },
    { "reset_attention_mask", "bool", false, refuse = "per-document attention masks are not implemented" },
    { "eod_mask_loss", "bool", false, refuse = "masking the end-of-document token's loss is not implemented" },
    { "create_attention_mask", "bool", true, inert = "the attention kernels apply the causal mask themselves" },
    { "add_extra_token_to_sequence", "bool", true,
      refuse = "samples always hold seq_length + 1 tokens (inputs and shifted targets)" },
    { "dataloader_type", enum("single", "cyclic"), "single", refuse = "only the 'single' sampler is implemented" },
    { "path_to_cache", "path", nil, inert = "luatron builds the sample index in memory; the samples are the same" },
    { "mmap_bin_files", "bool", true, inert = "it selects how the .bin file is read; the samples are the same" },
    { "num_workers", "nonnegint", 2, inert = "samples are read on demand in C, without worker processes" },
  },
  aliases = { sequence_length = "seq_length" },
  unsupported = {
    blend = "give the prefixes (and weights) as data_path",
    blend_per_split = "per-split blends are not implemented; use data_path with split",
    tokenizer = "set the tokenizer in ConfigContainer.tokenizer",
  },
})

class("LoggerConfig", {
  fields = {
    { "log_interval", "posint", 100 },
    { "log_params_norm", "bool", false },
    { "log_throughput", "bool", false, inert = "tokens/s is always logged" },
    { "log_progress", "bool", false, refuse = "progress.txt is not written; metrics go to metrics_file" },
    { "log_timers_to_tensorboard", "bool", false, refuse = "per-function timers are not implemented (the step time "
      .. "is in metrics_file)" },
    { "timing_log_level", enum(0, 1, 2), 0, refuse = "per-function timers are not implemented" },
    { "tensorboard_dir", "path", nil }, -- TensorBoard's event file (and metrics.jsonl) go there
    { "tensorboard_log_interval", "posint", 1 },
    { "log_dir", "path", nil, into = "metrics_file" },
    { "metrics_file", "path", nil },
    { "logging_level", "int", nil, refuse = "Python logging levels do not apply" },
    { "save_config_filepath", "path", nil },
  },
  unsupported = {
    wandb_project = "Weights & Biases needs the network; metrics go to metrics_file (JSON lines)",
    wandb_exp_name = "Weights & Biases needs the network; metrics go to metrics_file (JSON lines)",
    wandb_save_dir = "Weights & Biases needs the network; metrics go to metrics_file (JSON lines)",
    mlflow_experiment = "MLFlow is not available; metrics go to metrics_file (JSON lines)",
    comet_project = "Comet ML is not available; metrics go to metrics_file (JSON lines)",
  },
})

-- Byte-level tokenizer: ids 0..255 are bytes, id 256 is the end-of-document token
-- (Megatron's NullTokenizer convention: eod = vocab size without eod). NullTokenizer{vocab_size = V}
-- is Megatron's: ids 0..V-1, end-of-document V, so V + 1 ids.
schema.BYTE_LEVEL_VOCAB_SIZE = 257
schema.TOKENIZERS = { ByteLevel = schema.BYTE_LEVEL_VOCAB_SIZE }

class("TokenizerConfig", {
  fields = {
    { "tokenizer_type", { enum = { "ByteLevel", "NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer",
      "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer" },
      note = "ByteLevel is luatron's preprocess tokenizer; NullTokenizer (with vocab_size) reads data tokenized "
        .. "elsewhere; GPT2BPETokenizer takes vocab_file (encoder.json) and merge_file (vocab.bpe); "
        .. "HuggingFaceTokenizer takes tokenizer_model (a tokenizer.json of the byte-level BPE kind, or its "
        .. "folder); SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer take tokenizer_model "
        .. "(a SentencePiece .model file)" },
      "ByteLevel", into = "vocab_size" }, -- validate: the vocabulary the embedding is padded from
    { "vocab_size", "posint", nil },
    { "vocab_file", "path", nil }, -- GPT2BPETokenizer only (validate checks the pairing)
    { "merge_file", "path", nil },
    { "tokenizer_model", "path", nil }, -- HuggingFaceTokenizer and the SentencePiece types only
  },
})

class("CheckpointConfig", {
  fields = {
    { "save", "path", nil },
    { "load", "path", nil },
    { "save_interval", "posint", nil },
    { "save_optim", "bool", true },
    { "save_rng", "bool", true, inert = "dropout masks are a function of (seed, sample): there is no RNG state" },
    { "load_optim", "bool", true },
    { "load_rng", "bool", true, inert = "dropout masks are a function of (seed, sample): there is no RNG state" },
    { "finetune", "bool", false },
    { "pretrained_checkpoint", "path", nil },
    { "ckpt_step", "nonnegint", nil },
    { "most_recent_k", "most_recent_k", -1 },
    { "exit_on_missing_checkpoint", "bool", false },
    { "ckpt_format", { enum = { "torch_dist" },
      note = "luatron writes its own sharded format, which plays the role of Megatron's default 'torch_dist'" },
      "torch_dist" },
    { "async_save", "bool", false, refuse = "checkpoints are saved synchronously (to a temporary name, then renamed "
      .. "into place)" },
    { "fully_parallel_save", "bool", true, inert = "it spreads the writing over ranks; the files hold the same values" },
    { "fully_parallel_load", "bool", false,
      inert = "it spreads the reading over ranks; the loaded values are the same" },
  },
})

class("RNGConfig", {
  fields = {
    { "seed", "nonnegint", 1234 },
    { "data_parallel_random_init", "bool", false, inert = "Megatron broadcasts data-parallel rank 0's weights after "
      .. "the different initialisations, so every rank starts from the same weights either way" },
  },
  unsupported = {
    te_rng_tracker = "Transformer Engine is not used",
    inference_rng_tracker = "inference is not part of training configs",
  },
})

class("DistributedInitConfig", {
  fields = {
    { "use_tp_pp_dp_mapping", "bool", false },
    { "distributed_backend", { enum = { "nccl", "gloo" } }, "nccl", inert = "luatron picks the communicator by where "
      .. "a buffer lives (NCCL for GPU memory, shared memory for host memory); the reduced values are the same" },
    { "distributed_timeout_minutes", "posint", 10, refuse = "set the collectives' timeout with `luatron launch "
      .. "--timeout SECONDS` or LUATRON_COMM_TIMEOUT" },
    { "align_grad_reduce", "bool", true, inert = "it only changes when each pipeline stage starts its gradient "
      .. "reduction, not the reduced values" },
    { "use_gloo_process_groups", "bool", true, inert = "host-side communicators (shared memory) exist either way" },
    { "lazy_init", "bool", false, refuse = "luatron initialises its data parallelism itself" },
    { "use_torch_fsdp2", "bool", false, refuse = "FSDP is not implemented" },
    { "use_megatron_fsdp", "bool", false, refuse = "FSDP is not implemented" },
    { "use_sharp", "bool", false, refuse = "SHARP is not supported" },
    { "external_gpu_device_mapping", "bool", false, refuse = "each rank uses the GPU of its local rank" },
  },
  unsupported = {
    local_rank = "the launcher (luatron launch, mpirun, srun) tells each rank its local rank",
    nccl_communicator_config_path = "NCCL communicator settings are not supported",
    high_priority_stream_groups = "stream priorities are not supported",
    enable_megatron_core_experimental = "Megatron Core's experimental features are not part of luatron",
    use_torchcomms = "TorchComms is not used",
  },
})

-- The groups of a ConfigContainer, in display order, with their classes.
schema.GROUPS = {
  { "model", "GPTModelProvider" },
  { "train", "TrainingConfig" },
  { "optimizer", "OptimizerConfig" },
  { "scheduler", "SchedulerConfig" },
  { "ddp", "DistributedDataParallelConfig" },
  { "dataset", "GPTDatasetConfig" },
  { "tokenizer", "TokenizerConfig" },
  { "logger", "LoggerConfig" },
  { "checkpoint", "CheckpointConfig" },
  { "rng", "RNGConfig" },
  { "dist", "DistributedInitConfig" },
}

class("ConfigContainer", {
  fields = (function()
    local f = {}
    for _, g in ipairs(schema.GROUPS) do f[#f + 1] = { g[1], "group:" .. g[2], nil, nullable = false } end
    f[#f + 1] = { "mixed_precision", { enum = { "bf16_mixed", "fp16_mixed" },
      note = "or leave it nil and set bf16/params_dtype on the model" }, nil, into = "model.bf16" }
    return f
  end)(),
  unsupported = {
    validation = "put eval_iters and eval_interval in train (TrainingConfig)",
    ft = "fault tolerance is not implemented",
    straggler = "straggler detection is not implemented",
    profiling = "profiling configs are not implemented",
    peft = "PEFT is not implemented",
    comm_overlap = "communication-overlap configs are not implemented",
    rerun_state_machine = "the rerun state machine is not implemented",
  },
})

return schema

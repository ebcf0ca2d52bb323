-- luatron.config.validate: the cross-field rules of Megatron-Core / Megatron Bridge, run before
-- any work. validate(container, opts, to_table) returns the resolved config (plain tables, every
-- default and derived field filled in) and the derived values; it raises the first rule that
-- fails as a config error whose message names the field(s), the value(s), the rule and the fix.
-- Where Megatron has a message for a rule, its text is kept (so it can be searched for) and the
-- fix is appended. resolve_model(m) resolves a model's derived values alone: validate and
-- luatron.model (lt.build_model) both use it, so a model has one set of defaults.
local util = require "luatron.config.util"
util.register_source()
local schema = require "luatron.config.schema"
local fs = require "luatron.fs"

local fail, fmt = util.fail, util.fmt

local V = {}

function V.padded_vocab_size(vocab_size, divisible_by, tp)
  for _, p in ipairs({ { "vocab_size", vocab_size }, { "make_vocab_size_divisible_by", divisible_by },
    { "tensor_model_parallel_size", tp } }) do
    if math.type(p[2]) ~= "integer" or p[2] <= 0 then
      fail("%s must be a positive integer, got %s", p[1], fmt(p[2]))
    end
  end
  local multiple = divisible_by * tp
  return ((vocab_size + multiple - 1) // multiple) * multiple
end

-- Megatron's get_blend_from_list, stricter: an even-length list whose odd entries are all
-- numbers (or numeric strings) is weighted; otherwise every entry must be a prefix string.
function V.parse_blend(list)
  if list == nil then return nil end
  local n = #list
  local function is_weight(x) return type(x) == "number" or (type(x) == "string" and tonumber(x) ~= nil) end
  local weighted = false
  if n % 2 == 0 then
    local nw = 0
    for i = 1, n, 2 do if is_weight(list[i]) then nw = nw + 1 end end
    if nw == n // 2 then
      weighted = true
    elseif nw > 0 then
      fail("dataset.data_path = %s mixes weights and prefixes: give {weight1, 'prefix1', weight2, 'prefix2', ...} "
        .. "or {'prefix1', 'prefix2', ...}", fmt(list))
    end
  end
  local prefixes, weights = {}, weighted and {} or nil
  if weighted then
    local sum = 0
    for i = 1, n, 2 do
      local w, p = tonumber(list[i]), list[i + 1]
      if type(p) ~= "string" then
        fail("dataset.data_path = %s: entry %d must be a dataset prefix (a string) after weight %s, got %s",
          fmt(list), i + 1, fmt(list[i]), fmt(p))
      end
      if w < 0 or w ~= w or w == math.huge then
        fail("dataset.data_path = %s: weight %s for '%s' must be a non-negative number", fmt(list), fmt(list[i]), p)
      end
      sum = sum + w
      prefixes[#prefixes + 1] = p:match("^%s*(.-)%s*$")
      weights[#weights + 1] = w + 0.0
    end
    if sum <= 0 then
      fail("dataset.data_path = %s: the weights sum to 0; at least one dataset needs a positive weight", fmt(list))
    end
  else
    for i = 1, n do
      local p = list[i]
      if type(p) ~= "string" then
        fail("dataset.data_path = %s: entry %d (%s) is a number but the list is not {weight, prefix, ...} pairs; "
          .. "give {weight1, 'prefix1', weight2, 'prefix2', ...} or only prefixes", fmt(list), i, fmt(p))
      end
      prefixes[#prefixes + 1] = p:match("^%s*(.-)%s*$")
    end
  end
  return { prefixes = prefixes, weights = weights }
end

-- A data_path entry is a prefix of PREFIX.bin and PREFIX.idx: say what to do with the corpus or
-- the .bin/.idx file given instead.
function V.check_prefix(prefix)
  if fs.exists(prefix .. ".bin") or not fs.exists(prefix) then return end
  local stem = prefix:match("^(.*)%.[bi][id][nx]$")
  if stem and fs.exists(stem .. ".bin") then
    fail("dataset.data_path entry '%s' is one of the dataset's files: give its prefix '%s' (without .bin/.idx)",
      prefix, stem)
  end
  local out = prefix:gsub("%.[%w]+$", "")
  fail("dataset.data_path entry '%s' is a file, not an indexed dataset (PREFIX.bin and PREFIX.idx): tokenize it "
    .. "first with `luatron preprocess --input %s --output-prefix %s`, then give data_path = '%s'", prefix, prefix,
    out, out)
end

-- Megatron's parse_and_normalize_split: up to three weights, padded with zeros, normalized.
function V.parse_split(s)
  local v = {}
  for x in s:gmatch("[.0-9]+") do
    local n = tonumber(x)
    if not n then fail("dataset.split = %s: '%s' is not a number", fmt(s), x) end
    v[#v + 1] = n + 0.0
  end
  if #v > 3 then fail("dataset.split = %s: give at most three weights (train, valid, test)", fmt(s)) end
  while #v < 3 do v[#v + 1] = 0.0 end
  local sum = v[1] + v[2] + v[3]
  if sum <= 0 then fail("dataset.split = %s: the weights sum to 0; give e.g. '969,30,1'", fmt(s)) end
  return { v[1] / sum, v[2] / sum, v[3] / sum }
end

-- A model's required fields: the architecture cannot be guessed.
function V.check_model_required(m)
  for _, name in ipairs({ "num_layers", "hidden_size", "num_attention_heads" }) do
    if m[name] == nil then
      fail("model.%s is not set: GPTModelProvider needs num_layers, hidden_size and num_attention_heads", name)
    end
  end
end

-- The one place a GPTModelProvider's derived values are resolved, and their rules checked: m is a
-- plain table of the provider's fields with the schema's defaults (config.to_table's output), filled
-- in place and returned with ffn_hidden_size, kv_channels, num_query_groups (Megatron's defaults),
-- padded_vocab_size (Megatron's _vocab_size_with_padding) and rotary_dim (rope only). validate runs
-- it on a container's model (vocab_size taken from the tokenizer first); luatron.model on a provider
-- built directly (lt.build_model), so both paths give the engine the same values.
function V.resolve_model(m)
  V.check_model_required(m)
  if m.vocab_size == nil then
    fail("model.vocab_size is not set: a model built from a GPTModelProvider alone needs vocab_size (a "
      .. "ConfigContainer takes the tokenizer's when it is nil)")
  end
  local H, NH, TP = m.hidden_size, m.num_attention_heads, m.tensor_model_parallel_size
  if NH % TP ~= 0 then
    fail("num_attention_heads (%d) must be a multiple of tensor_model_parallel_size (%d). Change "
      .. "model.num_attention_heads or model.tensor_model_parallel_size", NH, TP)
  end
  m.ffn_hidden_size = m.ffn_hidden_size or 4 * H
  if m.ffn_hidden_size % TP ~= 0 then
    fail("ffn_hidden_size (%d) must be a multiple of tensor_model_parallel_size (%d): each rank holds "
      .. "ffn_hidden_size / tensor_model_parallel_size columns of the MLP. Change model.ffn_hidden_size or "
      .. "model.tensor_model_parallel_size", m.ffn_hidden_size, TP)
  end
  if m.kv_channels == nil then
    if H % NH ~= 0 then
      fail("hidden_size (%d) must be divisible by num_attention_heads (%d) when kv_channels is not set "
        .. "(kv_channels defaults to hidden_size / num_attention_heads). Change hidden_size or "
        .. "num_attention_heads, or set kv_channels explicitly", H, NH)
    end
    m.kv_channels = H // NH
  end
  local G = m.num_query_groups or NH
  m.num_query_groups = G
  if G % TP ~= 0 and TP % G ~= 0 then
    fail("num_query_groups (%d) must be a multiple or divisor of tensor_model_parallel_size (%d). Change "
      .. "model.num_query_groups or model.tensor_model_parallel_size", G, TP)
  end
  if NH % G ~= 0 then
    fail("num_attention_heads (%d) must be divisible by num_query_groups (%d): each query group serves "
      .. "num_attention_heads / num_query_groups heads. Set num_query_groups to a divisor of %d", NH, G, NH)
  end
  local mpe = m.max_position_embeddings
  if mpe ~= nil then
    if m.position_embedding_type == "learned_absolute" and mpe ~= m.seq_length then
      fail("model.max_position_embeddings (%d) differs from model.seq_length (%d): luatron's learned position table "
        .. "has seq_length rows. Set max_position_embeddings = %d or leave it nil", mpe, m.seq_length, m.seq_length)
    elseif mpe < m.seq_length then
      fail("model.max_position_embeddings (%d) is smaller than model.seq_length (%d): positions beyond it have no "
        .. "embedding. Raise max_position_embeddings or lower seq_length", mpe, m.seq_length)
    end
  end
  if m.position_embedding_type == "rope" then
    local rot = math.floor(m.kv_channels * m.rotary_percent)
    m.rotary_dim = rot
    if rot < 2 or rot % 2 ~= 0 then
      fail("position_embedding_type = 'rope' needs an even rotary dimension, but kv_channels (%d) * rotary_percent "
        .. "(%s) = %d is %s. Make kv_channels even (it defaults to hidden_size / num_attention_heads) or change "
        .. "rotary_percent", m.kv_channels, fmt(m.rotary_percent), rot, rot < 2 and "too small" or "odd")
    end
  end
  local af, glu = m.activation_func, m.gated_linear_unit
  if not ((af == "gelu" and not glu) or (af == "silu" and glu)) then
    fail("activation_func = %s with gated_linear_unit = %s is not supported: luatron's GPT layer implements "
      .. "GELU MLPs (activation_func = 'gelu', gated_linear_unit = false) and SwiGLU MLPs (activation_func = "
      .. "'silu', gated_linear_unit = true)", fmt(af), tostring(glu))
  end
  if m.openai_gelu and not (af == "gelu" and not glu) then
    fail("openai_gelu = true is GELU's tanh approximation: it needs the GELU MLP (activation_func = 'gelu', "
      .. "gated_linear_unit = false), not activation_func = %s with gated_linear_unit = %s", fmt(af), tostring(glu))
  end
  m.padded_vocab_size = V.padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, TP)
  return m
end

local LOAD_BALANCING_WITH_CAPACITY = { aux_loss = true, seq_aux_loss = true, global_aux_loss = true, none = true }

function V.validate(c, opts, to_table)
  -- options
  local world_size, assumed
  if type(opts) == "number" then opts = { world_size = opts } end
  if opts ~= nil and type(opts) ~= "table" then
    fail("validate: expected a world size or { world_size = N }, got %s", fmt(opts))
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "world_size" then
      fail("validate: unknown option '%s'%s", tostring(k), util.did_you_mean(k, { "world_size" }))
    end
  end

  local r = to_table(c)
  local m, t, o, s, ddp = r.model, r.train, r.optimizer, r.scheduler, r.ddp
  local d, tok, lg, ck, rng = r.dataset, r.tokenizer, r.logger, r.checkpoint, r.rng
  local warnings = {}
  r.warnings = warnings
  local function warn(msg, ...) warnings[#warnings + 1] = string.format(msg, ...) end

  -- required model fields -------------------------------------------------------------------
  V.check_model_required(m)

  -- precision ----------------------------------------------------------------------------------
  if r.mixed_precision == "bf16_mixed" then
    m.bf16, m.fp16, m.params_dtype, m.pipeline_dtype = true, false, "bf16", "bf16"
    o.bf16, o.fp16 = true, false
    ddp.grad_reduce_in_fp32 = true
  elseif r.mixed_precision == "fp16_mixed" then
    m.bf16, m.fp16, m.params_dtype, m.pipeline_dtype = false, true, "fp16", "fp16"
    o.bf16, o.fp16 = false, true
    ddp.grad_reduce_in_fp32 = false
  end
  if m.bf16 and m.fp16 then
    fail("model.bf16 = true and model.fp16 = true: only one of fp16 and bf16 can be enabled; set the other to false")
  end
  if o.bf16 and o.fp16 then
    fail("optimizer.bf16 = true and optimizer.fp16 = true: only one of fp16 and bf16 can be enabled; set the other to false")
  end
  -- Megatron-LM makes bf16 parameters out of bf16 = true; a bf16 params_dtype alone would be a bf16 model
  -- without mixed precision, which luatron does not build.
  for _, p in ipairs { { "model", m }, { "optimizer", o } } do
    local dt = p[2].params_dtype
    if dt == "bf16" and not m.bf16 then
      fail("%s.params_dtype = 'bf16' needs model.bf16 = true (bf16 mixed precision: bf16 compute, fp32 main weights). "
        .. "Set model.bf16 = true, mixed_precision = 'bf16_mixed', or params_dtype = 'fp32'", p[1])
    elseif dt == "fp16" and not m.fp16 then
      fail("%s.params_dtype = 'fp16' needs fp16 mixed precision, which is not implemented: use bf16", p[1])
    end
  end
  if m.bf16 and m.device == "cpu" then
    warn("model.bf16 on the CPU runs the bf16 reference kernels (fp32 math around bf16 storage): slower than fp32, "
      .. "meant for checking mixed precision; bf16 pays on device \"cuda\"")
  end

  -- parallel sizes -----------------------------------------------------------------------------
  local TP, PP, CP = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
  local EP = m.expert_model_parallel_size
  local ETP = m.expert_tensor_parallel_size or TP
  m.expert_tensor_parallel_size = ETP
  local model_size = TP * PP * CP

  if opts.world_size == nil then
    world_size, assumed = model_size, true
  else
    world_size = schema.as_int(opts.world_size)
    if not world_size or world_size <= 0 then
      fail("validate: world_size = %s: must be a positive integer (the number of ranks)", fmt(opts.world_size))
    end
  end
  r.world_size = world_size
  r.world_size_assumed = assumed or nil

  if m.sequence_parallel and TP <= 1 then
    fail("sequence_parallel=true requires tensor_model_parallel_size > 1 (got tensor_model_parallel_size = %d): "
      .. "Cannot use sequence parallelism without tensor parallelism. Set sequence_parallel = false or "
      .. "tensor_model_parallel_size >= 2", TP)
  end
  if m.sequence_parallel and m.seq_length % TP ~= 0 then
    fail("sequence_parallel=true splits the sequence across tensor_model_parallel_size = %d ranks, but seq_length "
      .. "(%d) is not a multiple of it. Change model.seq_length or model.tensor_model_parallel_size", TP, m.seq_length)
  end

  m.pipeline_dtype = m.pipeline_dtype or m.params_dtype
  local compute = m.bf16 and "bf16" or m.fp16 and "fp16" or "fp32"
  if PP > 1 and m.pipeline_dtype ~= compute then
    fail("pipeline_dtype = %s, but the activations between pipeline stages are %s (the model's compute dtype): "
      .. "set pipeline_dtype = %s or leave it unset", m.pipeline_dtype, compute, compute)
  end

  local VPP = m.virtual_pipeline_model_parallel_size
  if VPP == 1 then VPP = nil end
  m.virtual_pipeline_model_parallel_size = VPP
  if VPP then
    if PP <= 1 then
      fail("virtual_pipeline_model_parallel_size = %d requires pipeline_model_parallel_size > 1 (got %d): "
        .. "pipeline-model-parallel size should be greater than 1 with interleaved schedule. Unset "
        .. "virtual_pipeline_model_parallel_size or raise pipeline_model_parallel_size", VPP, PP)
    end
    if not m.overlap_p2p_comm and PP <= 2 then
      fail("virtual_pipeline_model_parallel_size = %d with pipeline_model_parallel_size = %d and overlap_p2p_comm = false: "
        .. "When interleaved schedule is used and p2p communication overlap is disabled, pipeline-model-parallel "
        .. "size should be greater than 2 to avoid having multiple p2p sends and recvs between same 2 ranks per "
        .. "communication batch. Set overlap_p2p_comm = true, use pipeline_model_parallel_size > 2, or unset "
        .. "virtual_pipeline_model_parallel_size", VPP, PP)
    end
  end

  if world_size % model_size ~= 0 then
    fail("world_size (%d) is not divisible by tensor_model_parallel_size (%d) * pipeline_model_parallel_size (%d) "
      .. "* context_parallel_size (%d) = %d: run on a multiple of %d ranks or change the parallel sizes",
      world_size, TP, PP, CP, model_size, model_size)
  end
  local DP = world_size // model_size
  r.model_parallel_size = model_size
  r.data_parallel_size = DP

  -- tokenizer and vocabulary ----------------------------------------------------------------------
  local tok_vocab
  local tt = tok.tokenizer_type
  local SENTENCEPIECE = { SentencePieceTokenizer = true, GPTSentencePieceTokenizer = true, Llama2Tokenizer = true }
  local file_fields = { vocab_file = "GPT2BPETokenizer", merge_file = "GPT2BPETokenizer",
    tokenizer_model = "HuggingFaceTokenizer" }
  for _, f in ipairs({ "vocab_file", "merge_file", "tokenizer_model" }) do
    if tok[f] ~= nil and tt ~= file_fields[f] and not (f == "tokenizer_model" and SENTENCEPIECE[tt]) then
      fail("tokenizer.%s is for tokenizer_type = '%s'%s, not '%s': remove it or change tokenizer.tokenizer_type", f,
        file_fields[f], f == "tokenizer_model" and " or a SentencePiece type" or "", tt)
    end
  end
  if tt == "GPT2BPETokenizer" and (tok.vocab_file == nil or tok.merge_file == nil) then
    fail("tokenizer.tokenizer_type = 'GPT2BPETokenizer' needs tokenizer.vocab_file (GPT-2's encoder.json) and "
      .. "tokenizer.merge_file (vocab.bpe)")
  end
  if tt == "HuggingFaceTokenizer" and tok.tokenizer_model == nil then
    fail("tokenizer.tokenizer_type = 'HuggingFaceTokenizer' needs tokenizer.tokenizer_model: the path of a "
      .. "tokenizer.json or of the folder that holds it")
  end
  if SENTENCEPIECE[tt] and tok.tokenizer_model == nil then
    fail("tokenizer.tokenizer_type = '%s' needs tokenizer.tokenizer_model: the path of a SentencePiece .model file",
      tt)
  end
  if tt == "GPT2BPETokenizer" or tt == "HuggingFaceTokenizer" or SENTENCEPIECE[tt] then
    -- The files decide the vocabulary (Megatron's tokenizer.vocab_size, added tokens included) and eod.
    local ok, t = pcall(require("luatron.tokenizer").build, tok)
    if not ok then fail("%s", (tostring(t):gsub("^[^:]*%.lua:%d+: ", ""))) end -- the file's problem, not ours
    if tok.vocab_size ~= nil and tok.vocab_size < t.vocab_size then
      fail("tokenizer.vocab_size (%d) is smaller than the %s's %d tokens (%s). Leave it nil", tok.vocab_size, tt,
        t.vocab_size, t.source)
    end
    tok_vocab = tok.vocab_size or t.vocab_size
    r.tokenizer_eod = t.eod
    t:close()
  elseif tt == "NullTokenizer" then
    if tok.vocab_size == nil then
      fail("tokenizer.tokenizer_type = 'NullTokenizer' needs tokenizer.vocab_size: the number of token ids in the "
        .. "pre-tokenized data (ids 0 .. vocab_size - 1; the end-of-document id is vocab_size)")
    end
    tok_vocab = tok.vocab_size + 1 -- Megatron's _NullTokenizer.vocab_size: the ids and the end-of-document id
  else
    local natural = schema.TOKENIZERS[tok.tokenizer_type]
    tok_vocab = tok.vocab_size or natural
    if tok_vocab < natural then
      fail("tokenizer.vocab_size (%d) is smaller than the %s tokenizer's %d ids (256 bytes and the end-of-document "
        .. "token). Set tokenizer.vocab_size >= %d or leave it nil", tok_vocab, tok.tokenizer_type, natural, natural)
    end
  end
  tok.vocab_size = tok_vocab
  local vocab = m.vocab_size or tok_vocab
  -- Only real (tokenized) data carries the tokenizer's ids; mock data draws ids below vocab_size.
  if vocab < tok_vocab and d.data_path ~= nil and not d.mock then
    fail("model.vocab_size (%d) is smaller than the tokenizer's vocabulary (%d): token ids would fall outside the "
      .. "embedding. Set model.vocab_size >= %d or leave it nil to take the tokenizer's", vocab, tok_vocab, tok_vocab)
  end
  m.vocab_size = vocab

  -- attention and MLP shapes, vocabulary padding ------------------------------------------------
  V.resolve_model(m)
  local L = m.num_layers
  r.padded_vocab_size, r.rotary_dim = m.padded_vocab_size, m.rotary_dim

  -- pipeline split ---------------------------------------------------------------------------------
  if L % PP ~= 0 then
    fail("num_layers (%d) is not divisible by pipeline_model_parallel_size (%d): Number of layers should be "
      .. "divisible by the pipeline-model-parallel size. Make num_layers a multiple of %d", L, PP, PP)
  end
  local per_stage = L // PP
  if VPP and per_stage % VPP ~= 0 then
    fail("num_layers (%d) / pipeline_model_parallel_size (%d) = %d layers per pipeline stage is not divisible by "
      .. "virtual_pipeline_model_parallel_size (%d): number of layers per pipeline stage must be divisible by the "
      .. "number of virtual stages. Make num_layers a multiple of %d (PP * VPP) or change "
      .. "virtual_pipeline_model_parallel_size", L, PP, per_stage, VPP, PP * VPP)
  end
  r.num_layers_per_pipeline_stage = per_stage
  r.num_layers_per_virtual_stage = per_stage // (VPP or 1)

  -- context parallel -------------------------------------------------------------------------------
  if CP > 1 and m.seq_length % (2 * CP) ~= 0 then
    local below = m.seq_length // (2 * CP) * (2 * CP)
    fail("Sequence length must be divisible by 2 * context parallel size if context parallel is used. seq_length "
      .. "(%d) is not a multiple of 2 * context_parallel_size (2 * %d = %d): the nearest valid lengths are %s%d. "
      .. "Change seq_length or context_parallel_size", m.seq_length, CP, 2 * CP,
      below > 0 and (below .. " and ") or "", below + 2 * CP)
  end

  -- mixture of experts -----------------------------------------------------------------------------
  local E = m.num_moe_experts
  if EP > 1 and E == nil then
    fail("expert_model_parallel_size = %d requires num_moe_experts: num_moe_experts must be non None to use "
      .. "expert-parallel. Set num_moe_experts (a multiple of %d) or expert_model_parallel_size = 1", EP, EP)
  end
  if E then
    if E % EP ~= 0 then
      fail("num_moe_experts (%d) is not a multiple of expert_model_parallel_size (%d): Number of experts should be "
        .. "a multiple of expert model parallel_size. Change num_moe_experts or expert_model_parallel_size", E, EP)
    end
    local exp_size = ETP * EP * PP
    if world_size % exp_size ~= 0 then
      fail("world_size (%d) is not divisible by expert_tensor_parallel_size (%d) * expert_model_parallel_size (%d) "
        .. "* pipeline_model_parallel_size (%d) = %d (expert_tensor_model_pipeline_parallel size). Run on a multiple "
        .. "of %d ranks or change the expert parallel sizes", world_size, ETP, EP, PP, exp_size, exp_size)
    end
    r.expert_data_parallel_size = world_size // exp_size
    r.num_local_experts = E // EP
    if m.moe_router_topk > E then
      fail("moe_router_topk (%d) must be <= num_moe_experts (%d): each token is routed to moe_router_topk "
        .. "different experts. Lower moe_router_topk or add experts", m.moe_router_topk, E)
    end
    if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax" and not m.moe_router_pre_softmax
      and m.moe_router_load_balancing_type ~= "sinkhorn" then
      fail("moe_router_topk = 1 with moe_router_score_function = 'softmax' needs moe_router_pre_softmax = true "
        .. "(Please use --moe-router-pre-softmax when topk is 1: a softmax over a single selected logit has "
        .. "zero gradient)")
    end
    local cf = m.moe_expert_capacity_factor
    if cf ~= nil and cf < 0 then cf = nil end
    m.moe_expert_capacity_factor = cf
    if cf ~= nil and not LOAD_BALANCING_WITH_CAPACITY[m.moe_router_load_balancing_type] then
      fail("moe_expert_capacity_factor = %s with moe_router_load_balancing_type = %s: moe_expert_capacity_factor "
        .. "only works with aux_loss, seq_aux_loss, global_aux_loss or none load balancing", fmt(cf),
        fmt(m.moe_router_load_balancing_type))
    end
    if m.moe_pad_expert_input_to_capacity and cf == nil then
      fail("moe_pad_expert_input_to_capacity = true needs a capacity: moe_expert_capacity_factor must be set to use "
        .. "moe_pad_expert_input_to_capacity (set it to e.g. 1.0, or set moe_pad_expert_input_to_capacity = false)")
    end
    if m.add_bias_linear and ETP ~= 1 then
      fail("add_bias_linear = true with num_moe_experts set and expert_tensor_parallel_size = %d: Bias in Moe is "
        .. "only supported when ETP==1 (expert_tensor_parallel_size defaults to tensor_model_parallel_size). Set "
        .. "add_bias_linear = false or expert_tensor_parallel_size = 1", ETP)
    end
    if m.moe_router_load_balancing_type == "sinkhorn" and (m.moe_aux_loss_coeff or 0) > 0 then
      fail("moe_router_load_balancing_type = 'sinkhorn' with moe_aux_loss_coeff = %s: Sinkhorn routing does not "
        .. "support aux loss. Set moe_aux_loss_coeff = 0", fmt(m.moe_aux_loss_coeff))
    end
    if m.moe_router_enable_expert_bias and m.moe_router_score_function ~= "sigmoid" then
      fail("moe_router_enable_expert_bias = true with moe_router_score_function = %s: expert bias for aux-loss-free "
        .. "routing only supports the 'sigmoid' score function. Set moe_router_score_function = 'sigmoid' or "
        .. "moe_router_enable_expert_bias = false", fmt(m.moe_router_score_function))
    end
    if m.moe_shared_expert_overlap and m.moe_token_dispatcher_type == "allgather" then
      fail("moe_shared_expert_overlap = true with moe_token_dispatcher_type = 'allgather': moe_shared_expert_overlap "
        .. "only works with alltoall or flex token dispatcher")
    end
    if m.moe_shared_expert_overlap and m.moe_shared_expert_intermediate_size == nil then
      fail("moe_shared_expert_overlap = true needs shared experts: set moe_shared_expert_intermediate_size")
    end
    m.moe_ffn_hidden_size = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if EP > 1 and TP > 1 and not m.sequence_parallel then
      warn("When using expert parallelism and tensor parallelism for training, sequence parallelism must be used "
        .. "(expert_model_parallel_size = %d, tensor_model_parallel_size = %d, sequence_parallel = false)", EP, TP)
    end
  else
    for _, f in ipairs({ "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_expert_capacity_factor" }) do
      if m[f] ~= nil then
        fail("%s is set (%s) but num_moe_experts is None. Please set num_moe_experts or remove %s.", f, fmt(m[f]), f)
      end
    end
    if m.moe_pad_expert_input_to_capacity then
      fail("moe_pad_expert_input_to_capacity = true but num_moe_experts is None. Please set num_moe_experts or "
        .. "remove moe_pad_expert_input_to_capacity.")
    end
  end

  -- dataset ------------------------------------------------------------------------------------------
  if d.seq_length == nil then
    d.seq_length = m.seq_length
  elseif d.seq_length ~= m.seq_length then
    fail("model.seq_length (%d) and dataset.seq_length (%d) differ: Please ensure sequence length configuration in "
      .. "model config and dataset config match. Set one of them (the other follows) or make them equal",
      m.seq_length, d.seq_length)
  end
  r.blend = V.parse_blend(d.data_path)
  for _, prefix in ipairs(r.blend and r.blend.prefixes or {}) do V.check_prefix(prefix) end
  if d.mock == nil then
    d.mock = (d.data_path == nil)
  elseif d.mock and d.data_path ~= nil then
    fail("dataset.mock = true but dataset.data_path = %s is set: mock data ignores data_path. Remove one of them",
      fmt(d.data_path))
  elseif not d.mock and d.data_path == nil then
    fail("dataset.mock = false but dataset.data_path is nil: give data_path (indexed dataset prefixes) or leave "
      .. "mock nil to train on mock data")
  end
  r.mock = d.mock
  r.split_vector = V.parse_split(d.split)
  if d.random_seed == nil then d.random_seed = rng.seed end

  -- training loop and batch sizes ------------------------------------------------------------------
  if t.micro_batch_size == nil then
    fail("train.micro_batch_size is not set: give TrainingConfig{micro_batch_size = ...} (sequences per "
      .. "microbatch per data-parallel rank)")
  end
  if t.train_iters == nil and not t.skip_train then
    fail("train.train_iters is not set: give TrainingConfig{train_iters = ...} (number of optimizer steps)")
  end
  local MBS = t.micro_batch_size
  if t.global_batch_size == nil then t.global_batch_size = MBS * DP end
  local GBS = t.global_batch_size
  if GBS % (MBS * DP) ~= 0 then
    fail("global batch size (%d) is not divisible by micro batch size (%d) times data parallel size (%d). Set "
      .. "train.global_batch_size to a multiple of %d, or change train.micro_batch_size or the data-parallel "
      .. "size (world_size %d / (TP %d * PP %d * CP %d))", GBS, MBS, DP, MBS * DP, world_size, TP, PP, CP)
  end
  local M = GBS // (MBS * DP)
  if M < 1 then fail("number of microbatches should be at least 1, got %d.", M) end
  r.num_microbatches = M
  if t.eval_interval == 0 and t.eval_iters > 0 then
    fail("train.eval_interval = 0 with train.eval_iters = %d: eval_interval must be > 0 when eval_iters > 0. Set "
      .. "eval_interval to the number of iterations between evaluations, or eval_iters = 0 to disable evaluation",
      t.eval_iters)
  end
  if VPP then
    local N = m.microbatch_group_size_per_vp_stage or PP
    m.microbatch_group_size_per_vp_stage = N
    if N < PP or N > M then
      fail("The number of contiguous micro-batches in a virtual pipeline stage should range in [PP=%d , M=%d] "
        .. "(microbatch_group_size_per_vp_stage = %d, num_microbatches = %d). %s", PP, M, N, M,
        M < PP and string.format("Raise train.global_batch_size so that num_microbatches >= %d", PP)
        or "Change microbatch_group_size_per_vp_stage")
    end
    local rem = M % N
    if rem > 0 and rem < PP then
      fail("The remainder of M (the total micro-batches, %d) divided by N (number of contiguous micro-batches in a "
        .. "virtual pipeline stage, microbatch_group_size_per_vp_stage = %d) should be 0, or larger than or equal to "
        .. "the pipeline-parallel size (%d), but it is %d. Make num_microbatches a multiple of %d", M, N, PP, rem, N)
    end
  end

  -- optimizer ---------------------------------------------------------------------------------------
  if o.lr == nil then
    fail("optimizer.lr is not set: give OptimizerConfig{lr = <peak learning rate>}")
  end
  if o.min_lr == nil then o.min_lr = 0.0 end
  if o.min_lr > o.lr then
    fail("optimizer.min_lr (%s) must be <= optimizer.lr (%s): the schedule decays from lr down to min_lr. Lower "
      .. "min_lr or raise lr", fmt(o.min_lr), fmt(o.lr))
  end
  if s.lr_warmup_init > o.lr then
    fail("scheduler.lr_warmup_init (%s) must be <= optimizer.lr (%s): warmup rises from lr_warmup_init to lr",
      fmt(s.lr_warmup_init), fmt(o.lr))
  end
  if ddp.use_distributed_optimizer ~= o.use_distributed_optimizer then
    warn("Distributed optimizer settings were not in sync: ddp.use_distributed_optimizer=%s, "
      .. "optimizer.use_distributed_optimizer=%s. Automatically enabling distributed optimizer for both settings.",
      tostring(ddp.use_distributed_optimizer), tostring(o.use_distributed_optimizer))
    ddp.use_distributed_optimizer, o.use_distributed_optimizer = true, true
  end
  if ddp.overlap_param_gather ~= o.overlap_param_gather then
    warn("overlap_param_gather settings were not in sync: ddp.overlap_param_gather=%s, "
      .. "optimizer.overlap_param_gather=%s. Automatically enabling overlap_param_gather for both settings.",
      tostring(ddp.overlap_param_gather), tostring(o.overlap_param_gather))
    ddp.overlap_param_gather, o.overlap_param_gather = true, true
  end
  if ddp.overlap_param_gather then
    if not ddp.use_distributed_optimizer then
      fail("overlap_param_gather = true needs the distributed optimizer: --overlap-param-gather only supported with "
        .. "distributed optimizer. Set use_distributed_optimizer = true or overlap_param_gather = false")
    end
    if not ddp.overlap_grad_reduce then
      fail("ddp.overlap_param_gather = true with ddp.overlap_grad_reduce = false: Must use --overlap-param-gather "
        .. "with --overlap-grad-reduce. Set ddp.overlap_grad_reduce = true or overlap_param_gather = false")
    end
  end

  -- scheduler ---------------------------------------------------------------------------------------
  local train_iters = t.train_iters or 0
  if s.max_steps ~= nil and s.max_steps < train_iters then
    fail("scheduler.max_steps (%d) must be greater than or equal to train.train_iters (%d)", s.max_steps, train_iters)
  end
  local decay_from_train = s.max_steps == nil and s.lr_decay_iters == nil
  local decay = s.max_steps or s.lr_decay_iters or t.train_iters
  if decay == nil then
    fail("scheduler.lr_decay_iters is not set and train.train_iters is nil: set one of them")
  end
  s.lr_decay_iters = decay
  if s.lr_warmup_fraction ~= nil and s.lr_warmup_iters ~= 0 then
    fail("scheduler.lr_warmup_fraction (%s) and scheduler.lr_warmup_iters (%d) are both set: use either "
      .. "lr_warmup_fraction or lr_warmup_iters", fmt(s.lr_warmup_fraction), s.lr_warmup_iters)
  end
  local warm = s.lr_warmup_fraction and s.lr_warmup_fraction * decay or s.lr_warmup_iters
  if warm > 0 and warm >= decay then
    fail("scheduler.lr_warmup_iters (%s) must be less than scheduler.lr_decay_iters (%d)%s: warmup has to end "
      .. "before the decay does. Lower lr_warmup_iters or raise lr_decay_iters", fmt(warm), decay,
      decay_from_train and " (lr_decay_iters defaults to train.train_iters)" or "")
  end
  s.lr_warmup_iters = warm
  if s.lr_decay_style == "WSD" then
    s.lr_wsd_decay_iters = s.lr_wsd_decay_iters or decay
    if s.lr_wsd_decay_iters > decay then
      fail("scheduler.lr_wsd_decay_iters (%d) must be <= lr_decay_iters (%d): the WSD annealing phase is the end "
        .. "of the decay", s.lr_wsd_decay_iters, decay)
    end
  end
  local GB = t.global_batch_size
  s.lr_decay_steps = decay * GB
  s.lr_warmup_steps = warm * GB
  s.wd_incr_steps = (s.max_steps or train_iters) * GB
  if s.lr_wsd_decay_iters then s.wsd_decay_steps = s.lr_wsd_decay_iters * GB end
  s.start_weight_decay = s.start_weight_decay or o.weight_decay
  s.end_weight_decay = s.end_weight_decay or o.weight_decay
  if s.end_weight_decay < s.start_weight_decay then
    fail("scheduler.end_weight_decay (%s) must be >= scheduler.start_weight_decay (%s)",
      fmt(s.end_weight_decay), fmt(s.start_weight_decay))
  end
  if s.start_weight_decay ~= s.end_weight_decay then
    fail("scheduler.start_weight_decay (%s) and scheduler.end_weight_decay (%s) differ: weight-decay schedules are "
      .. "not implemented. Make them equal (or leave them nil to take optimizer.weight_decay)",
      fmt(s.start_weight_decay), fmt(s.end_weight_decay))
  end
  o.weight_decay = s.start_weight_decay -- Megatron's scheduler sets every decayed group's weight decay
  if s.override_opt_param_scheduler and s.use_checkpoint_opt_param_scheduler then
    fail("scheduler.override_opt_param_scheduler and scheduler.use_checkpoint_opt_param_scheduler are both true: "
      .. "both override and use-checkpoint are set; choose one")
  end

  -- data-parallel buckets ---------------------------------------------------------------------------
  if ddp.bucket_size ~= nil and ddp.num_buckets ~= nil then
    fail("ddp.bucket_size (%d) and ddp.num_buckets (%d) are both set: Cannot specify both num_buckets and "
      .. "bucket_size", ddp.bucket_size, ddp.num_buckets)
  end
  if ddp.bucket_size == nil and ddp.num_buckets == nil and ddp.overlap_grad_reduce then
    ddp.bucket_size = math.max(40000000, 1000000 * DP)
  end

  -- logger, checkpoint ------------------------------------------------------------------------------
  if lg.metrics_file == nil and lg.log_dir ~= nil then
    lg.metrics_file = lg.log_dir .. "/metrics.jsonl"
  end
  if ck.ckpt_step ~= nil and ck.load == nil then
    fail("ckpt_step=%d specified but checkpoint.load is None. Please set checkpoint.load to the base checkpoint "
      .. "directory.", ck.ckpt_step)
  end
  if ck.save_interval ~= nil and ck.save == nil then
    warn("checkpoint.save_interval = %d but checkpoint.save is nil: no checkpoints will be written", ck.save_interval)
  end
  if ck.finetune and ck.load == nil and ck.pretrained_checkpoint == nil then
    warn("checkpoint.finetune = true but neither checkpoint.load nor checkpoint.pretrained_checkpoint is set: "
      .. "the model starts from random weights")
  end

  return r
end

return V

-- Builds the engine's GPT model from a GPTModelProvider (Megatron names) and a padded vocab size.
local core = require "luatron.core"
local util = require "luatron.config.util"

local M = {}

-- Megatron's _vocab_size_with_padding: the smallest multiple of divisible_by * TP >= vocab.
function M.padded_vocab_size(vocab_size, divisible_by, tp)
  local multiple = (divisible_by or 128) * (tp or 1)
  return math.ceil(vocab_size / multiple) * multiple
end

-- The engine's view of a provider: every default resolved, names kept. flat_multiple rounds
-- the flat parameter buffer up (data parallelism shards it evenly).
function M.engine_config(provider, seed, flat_multiple, local_rank)
  local heads = provider.num_attention_heads
  local hidden = provider.hidden_size
  -- Validation admits exactly two MLPs: GELU, or SiLU gated (SwiGLU).
  local gated = provider.gated_linear_unit
  return {
    num_layers = provider.num_layers,
    hidden_size = hidden,
    num_attention_heads = heads,
    num_query_groups = provider.num_query_groups or heads,
    kv_channels = provider.kv_channels or hidden // heads,
    ffn_hidden_size = provider.ffn_hidden_size or 4 * hidden,
    seq_length = provider.seq_length,
    vocab_size = M.padded_vocab_size(provider.vocab_size, provider.make_vocab_size_divisible_by,
      provider.tensor_model_parallel_size),
    rmsnorm = provider.normalization == "RMSNorm",
    layernorm_epsilon = provider.layernorm_epsilon,
    gated_linear_unit = gated and true or false,
    gelu_tanh = provider.openai_gelu or false,
    rope = provider.position_embedding_type == "rope",
    rotary_base = provider.rotary_base,
    share_embeddings_and_output_weights = provider.share_embeddings_and_output_weights,
    add_bias_linear = provider.add_bias_linear,
    add_qkv_bias = provider.add_qkv_bias or false,
    layernorm_zero_centered_gamma = provider.layernorm_zero_centered_gamma or false,
    qk_layernorm = provider.qk_layernorm or false,
    init_method_std = provider.init_method_std,
    hidden_dropout = provider.hidden_dropout,
    attention_dropout = provider.attention_dropout,
    seed = seed or 1234,
    flat_multiple = flat_multiple,
    device = provider.device or "cpu",
    local_rank = local_rank, -- one GPU per rank on a machine (LUATRON_CUDA_DEVICE overrides)
    bf16 = provider.bf16 or false,
  }
end

-- A model on the provider's device ("cpu" or "cuda": GPU local_rank of this machine, default 0).
-- `seed` makes the initial weights (layout-independent).
function M.build(provider, seed, flat_multiple, local_rank)
  local ok, model = pcall(core.gpt, M.engine_config(provider, seed, flat_multiple, local_rank))
  -- What the engine refuses (no GPU, out of memory, a shape it cannot build) is the user's to fix.
  if not ok then util.fail(util.message(model)) end
  return model
end

-- Which layers each of a pipeline rank's chunks holds: an array over its virtual stages
-- v = 0 .. VPP-1 of { vp_stage =, layer_begin =, layer_end = (global, [begin, end)), pre_process =,
-- post_process = }. Megatron's even split (get_transformer_layer_offset): chunk v of rank r holds
-- L / (PP * VPP) layers from offset = v * (L / VPP) + r * (L / PP / VPP); the embedding is on chunk 0
-- of rank 0, the loss on chunk VPP-1 of rank PP-1. vpp nil or 1: one chunk per rank.
function M.chunk_layers(provider, pp, vpp, pp_rank)
  local L = provider.num_layers
  pp, vpp, pp_rank = pp or 1, vpp or 1, pp_rank or 0
  for name, v in pairs { pipeline_model_parallel_size = pp, virtual_pipeline_model_parallel_size = vpp } do
    if math.type(v) ~= "integer" or v < 1 then
      util.fail(string.format("%s must be a positive integer (got %s)", name, tostring(v)))
    end
  end
  if math.type(pp_rank) ~= "integer" or pp_rank < 0 or pp_rank >= pp then
    util.fail(string.format("pipeline rank %s is outside [0, %d) (pipeline_model_parallel_size = %d)",
      tostring(pp_rank), pp, pp))
  end
  if vpp > 1 and pp <= 1 then
    util.fail(string.format("virtual_pipeline_model_parallel_size = %d requires pipeline_model_parallel_size > 1 "
      .. "(got %d): pipeline-model-parallel size should be greater than 1 with interleaved schedule", vpp, pp))
  end
  if L % pp ~= 0 then
    util.fail(string.format("num_layers (%d) is not divisible by pipeline_model_parallel_size (%d): Number of layers "
      .. "should be divisible by the pipeline-model-parallel size", L, pp))
  end
  local per_stage = L // pp
  if per_stage % vpp ~= 0 then
    util.fail(string.format("num_layers (%d) / pipeline_model_parallel_size (%d) = %d layers per pipeline stage is "
      .. "not divisible by virtual_pipeline_model_parallel_size (%d): number of layers per pipeline stage must be "
      .. "divisible number of layers per virtual pipeline stage", L, pp, per_stage, vpp))
  end
  local per_chunk = per_stage // vpp
  local chunks = {}
  for v = 0, vpp - 1 do
    local offset = v * (L // vpp) + pp_rank * per_chunk
    chunks[#chunks + 1] = {
      vp_stage = v,
      layer_begin = offset,
      layer_end = offset + per_chunk,
      pre_process = pp_rank == 0 and v == 0,
      post_process = pp_rank == pp - 1 and v == vpp - 1,
    }
  end
  return chunks
end

-- This rank's chunks (core.gpt_chunk objects, in vp_stage order) for one entry list of
-- M.chunk_layers; seed, flat_multiple and local_rank as M.build.
function M.build_chunks(provider, layout, seed, flat_multiple, local_rank)
  local chunks = {}
  for i, c in ipairs(layout) do
    local cfg = M.engine_config(provider, seed, flat_multiple, local_rank)
    cfg.layer_begin, cfg.layer_end = c.layer_begin, c.layer_end
    cfg.pre_process, cfg.post_process = c.pre_process, c.post_process
    local ok, chunk = pcall(core.gpt_chunk, cfg)
    if not ok then util.fail(util.message(chunk)) end
    chunks[i] = chunk
  end
  return chunks
end

return M

-- Builds the engine's GPT model (or its pipeline chunks) from a GPTModelProvider (Megatron names).
local core = require "luatron.core"
local config = require "luatron.config"
local parallel = require "luatron.parallel"
local schema = require "luatron.config.schema"
local util = require "luatron.config.util"
local validate = require "luatron.config.validate"

local M = {}

-- What a build takes besides the provider, when not given: the seed of RNGConfig (so a model built
-- here starts where a ConfigContainer's run does), the engine's flat-buffer alignment (16 elements)
-- and the machine's first GPU.
local DEFAULT_SEED = schema.classes.RNGConfig.index.seed.default
local DEFAULT_FLAT_MULTIPLE = 16
local DEFAULT_LOCAL_RANK = 0

-- The engine's booleans for the provider's names (nil, refused by the engine, for anything else).
local RMSNORM = { LayerNorm = false, RMSNorm = true }
local ROPE = { learned_absolute = false, rope = true }

-- The resolved model of `provider`, every default and derived value filled in by
-- validate.resolve_model (the one place they are): a GPTModelProvider, or a plain table of its
-- fields (checked and defaulted as one), is resolved; a model validate already resolved (a
-- ConfigContainer's r.model, which has padded_vocab_size) is taken as it is.
function M.resolve(provider)
  if type(provider) == "table" and not config.is_config(provider) and provider.padded_vocab_size ~= nil then
    return provider
  end
  local ok, res = pcall(function()
    local p = config.is_config(provider, "GPTModelProvider") and provider or config.GPTModelProvider(provider)
    return validate.resolve_model(config.to_table(p))
  end)
  if not ok then util.raise(res) end
  return res
end

-- The engine's view of a provider (core.gpt's table): the resolved fields under the engine's names,
-- nothing defaulted here. flat_multiple rounds the flat parameter buffer up (data parallelism shards
-- it evenly); local_rank picks this rank's GPU on a machine (LUATRON_CUDA_DEVICE overrides); comms
-- holds the communicators of the groups the layers talk over (each nil for one rank): tensor (TP),
-- context (CP), expert (the ETP x EP ranks MoE dispatches over) and global_aux (TP x DP x CP:
-- global_aux_loss's counts).
function M.engine_config(provider, seed, flat_multiple, local_rank, comms)
  comms = comms or {}
  local m = M.resolve(provider)
  if seed == nil then seed = DEFAULT_SEED end
  if flat_multiple == nil then flat_multiple = DEFAULT_FLAT_MULTIPLE end
  if local_rank == nil then local_rank = DEFAULT_LOCAL_RANK end
  return {
    num_layers = m.num_layers,
    hidden_size = m.hidden_size,
    num_attention_heads = m.num_attention_heads,
    num_query_groups = m.num_query_groups,
    kv_channels = m.kv_channels,
    ffn_hidden_size = m.ffn_hidden_size,
    seq_length = m.seq_length,
    vocab_size = m.padded_vocab_size,
    rmsnorm = RMSNORM[m.normalization],
    layernorm_epsilon = m.layernorm_epsilon,
    gated_linear_unit = m.gated_linear_unit, -- validation admits GELU, and SiLU gated (SwiGLU)
    gelu_tanh = m.openai_gelu,
    rope = ROPE[m.position_embedding_type],
    rotary_base = m.rotary_base,
    share_embeddings_and_output_weights = m.share_embeddings_and_output_weights,
    add_bias_linear = m.add_bias_linear,
    add_qkv_bias = m.add_qkv_bias,
    layernorm_zero_centered_gamma = m.layernorm_zero_centered_gamma,
    qk_layernorm = m.qk_layernorm,
    init_method_std = m.init_method_std,
    hidden_dropout = m.hidden_dropout,
    attention_dropout = m.attention_dropout,
    seed = seed,
    flat_multiple = flat_multiple,
    device = m.device,
    local_rank = local_rank,
    bf16 = m.bf16,
    tensor_parallel = comms.tensor or false,
    sequence_parallel = m.sequence_parallel,
    context_parallel = comms.context or false,
    cp_comm_type = m.cp_comm_type,
    -- mixture of experts (num_moe_experts 0: dense; the engine's neutral values stand for Megatron's None)
    num_moe_experts = m.num_moe_experts or 0,
    moe_ffn_hidden_size = m.moe_ffn_hidden_size or m.ffn_hidden_size,
    moe_layer_freq = m.moe_layer_freq,
    moe_grouped_gemm = m.moe_grouped_gemm,
    moe_shared_expert_intermediate_size = m.moe_shared_expert_intermediate_size or 0,
    moe_router_enable_expert_bias = m.moe_router_enable_expert_bias,
    moe_router_topk = m.moe_router_topk,
    moe_router_score_function = m.moe_router_score_function,
    moe_router_pre_softmax = m.moe_router_pre_softmax,
    moe_router_topk_scaling_factor = m.moe_router_topk_scaling_factor or 0,
    moe_expert_capacity_factor = m.moe_expert_capacity_factor or -1,
    moe_token_drop_policy = m.moe_token_drop_policy,
    moe_pad_expert_input_to_capacity = m.moe_pad_expert_input_to_capacity,
    moe_router_load_balancing_type = m.moe_router_load_balancing_type,
    moe_aux_loss_coeff = m.moe_aux_loss_coeff,
    moe_z_loss_coeff = m.moe_z_loss_coeff or 0,
    moe_token_dispatcher_type = m.moe_token_dispatcher_type,
    expert_parallel = comms.expert or false,
    moe_global_aux = comms.global_aux or false,
    expert_tensor_parallel = (m.expert_tensor_parallel_size or 1) > 1,
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
-- M.chunk_layers; seed, flat_multiple, local_rank and comms as M.engine_config.
function M.build_chunks(provider, layout, seed, flat_multiple, local_rank, comms)
  local chunks = {}
  local m = M.resolve(provider)
  for i, c in ipairs(layout) do
    local cfg = M.engine_config(m, seed, flat_multiple, local_rank, comms)
    cfg.layer_begin, cfg.layer_end = c.layer_begin, c.layer_end
    cfg.pre_process, cfg.post_process = c.pre_process, c.post_process
    local ok, chunk = pcall(core.gpt_chunk, cfg)
    if not ok then util.fail(util.message(chunk)) end
    chunks[i] = chunk
  end
  return chunks
end

-- A communicator of the model's own over the ranks of group g (NCCL on a GPU), so its statistics
-- count the model's traffic alone; nil for a group of one.
local function model_comm(g, name, device)
  local c = parallel.own_group(g, name)
  if c and device ~= "cpu" then c = core.comm_nccl(c, device) end
  return c
end

-- The chunks this rank holds of a provider's model in the job lt.parallel_state(provider) describes
-- (its pipeline stage, with virtual stages, its tensor-parallel shard, its context-parallel part
-- of the sequence and its experts); seed and flat_multiple as M.build. Returns them and the
-- communicators their layers use (M.engine_config's comms; the model's own, so their statistics count
-- its traffic alone).
function M.chunks(provider, ps, seed, flat_multiple)
  local m = M.resolve(provider)
  local layout = M.chunk_layers(m, ps.grid.pp, ps.grid.vpp or 1, ps.coords.pp_rank)
  local comms = {
    tensor = model_comm(ps.groups.tp, "tp_model", m.device),
    context = model_comm(ps.groups.cp, "cp_model", m.device),
    expert = m.num_moe_experts and model_comm(ps.groups["tp-ep"], "ep_model", m.device) or nil,
    global_aux = m.moe_router_load_balancing_type == "global_aux_loss"
      and model_comm(ps.groups["tp-dp-cp"], "moe_global_aux", m.device) or nil,
  }
  return M.build_chunks(m, layout, seed, flat_multiple, ps.local_rank, comms), comms
end

return M

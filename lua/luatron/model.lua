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

return M

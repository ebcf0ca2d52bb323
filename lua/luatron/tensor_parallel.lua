-- Tensor parallelism's arithmetic, to hold the engine to: the bytes its collectives move in a
-- training step (engine/parallel/tp.h's mappings, counted as the communicators count them) and the
-- activations sequence parallelism divides. Rows N = micro_batch_size x seq_length (/ CP), C = hidden_size,
-- E = bytes per element of the compute dtype; a ring all-reduce sends 2 (TP-1)/TP of its buffer,
-- an all-gather or reduce-scatter (TP-1)/TP of the whole (gathered) buffer.
local M = {}

local function all_reduce(tp, bytes) return 2 * (tp - 1) * bytes // tp end
local function half(tp, bytes) return (tp - 1) * bytes // tp end

-- The bytes this rank's tensor-parallel group moves per step for its chunks (an array of
-- core.gpt_chunk) over n_micro microbatches; r the resolved config. Per layer and microbatch:
-- without SP 4 all-reduces of N C (the outputs of linear_proj and linear_fc2 forward, the input
-- gradients of linear_qkv and linear_fc1 backward); with SP 2 all-gathers and 2 reduce-scatters
-- forward, 4 all-gathers (the output gradients, and the norms' outputs gathered again) and 2
-- reduce-scatters backward. The embedding: an all-reduce (reduce-scatter under SP with rotary
-- positions) forward, and under SP an all-gather backward. The output layer: the vocabulary-
-- parallel cross-entropy's 3 all-reduces of N fp32, and the final norm's output gathered
-- (twice) and its gradient reduced as a layer's. With fewer query groups than TP ranks each layer
-- also gathers linear_qkv's whole output forward and reduce-scatters its gradient backward. An MoE
-- layer (sequence parallel: its experts see each rank's own rows) has the attention block's half of
-- those (all of them with shared experts) and an all-reduce of the aux loss's int64 counts (E, or
-- micro_batch_size x E for seq_aux_loss).
function M.expected_bytes(r, chunks, n_micro)
  local m = r.model
  local tp, sp = m.tensor_model_parallel_size, m.sequence_parallel
  if tp == 1 then return 0 end
  local N = r.train.micro_batch_size * m.seq_length // m.context_parallel_size -- this rank's part of the sequence
  local A = N * m.hidden_size * (m.bf16 and 2 or 4)
  local per_layer = sp and 10 * half(tp, A) or 4 * all_reduce(tp, A)
  if m.num_query_groups < tp then -- the whole QKV gathered forward, its gradient reduce-scattered backward
    per_layer = per_layer + 2 * half(tp, N * (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
      * (m.bf16 and 2 or 4))
  end
  local moe_layer = per_layer -- (shared experts go through the TP region as the dense MLP does)
  if not m.moe_shared_expert_intermediate_size then
    moe_layer = per_layer - (sp and 5 * half(tp, A) or 2 * all_reduce(tp, A))
  end
  local balance = m.moe_router_load_balancing_type -- (global_aux_loss sums its counts over TP x DP x CP apart)
  if (balance == "aux_loss" or balance == "seq_aux_loss") and (m.moe_aux_loss_coeff or 0) > 0 then
    local counts = m.num_moe_experts * (m.moe_router_load_balancing_type == "seq_aux_loss"
      and r.train.micro_batch_size or 1)
    moe_layer = moe_layer + all_reduce(tp, 8 * counts)
  end
  local bytes = 0
  for _, chunk in ipairs(chunks) do
    local st = chunk:stage()
    for l = st.layer_begin, st.layer_end - 1 do
      bytes = bytes + ((m.num_moe_experts and l % m.moe_layer_freq == 0) and moe_layer or per_layer)
    end
    if st.pre_process then
      if not sp then
        bytes = bytes + all_reduce(tp, A)
      elseif m.position_embedding_type == "rope" then
        bytes = bytes + 2 * half(tp, A)
      else
        bytes = bytes + all_reduce(tp, A) + half(tp, A)
      end
    end
    if st.post_process then
      bytes = bytes + 3 * all_reduce(tp, 4 * N) + (sp and 3 * half(tp, A) or all_reduce(tp, A))
    end
  end
  return n_micro * bytes
end

-- The bytes of a microbatch's saved activations in the regions sequence parallelism splits, for
-- `rows` rows (B x T as one rank holds them without SP, B x T / TP with): per layer its input, the
-- two norms' outputs and statistics and the attention block's output; the chunk's input, and the
-- final norm's output and statistics or the boundary's row maps. Each buffer is 64-byte aligned,
-- as the engine lays them out.
function M.sequence_parallel_region_bytes(r, chunks, rows)
  local E = r.model.bf16 and 2 or 4
  local function aligned(n) return (n + 63) // 64 * 64 end
  local hidden = aligned(rows * r.model.hidden_size * E)
  local norm = hidden + 2 * aligned(rows * 4)
  local bytes = 0
  for _, chunk in ipairs(chunks) do
    local st = chunk:stage()
    local layers = st.layer_end - st.layer_begin
    bytes = bytes + (layers + 1) * hidden + layers * (2 * norm + hidden)
    if st.post_process then bytes = bytes + norm end
    if not (st.pre_process and st.post_process) then bytes = bytes + 2 * aligned(rows * 4) end
  end
  return bytes
end

return M

-- Context parallelism from the training loop's side (engine/parallel/cp.h has the ring): which
-- positions of a sample a cp rank holds (Megatron's load balancing: of 2 CP chunks, rank r holds
-- chunks r and 2 CP - 1 - r), the microbatch's rows it reads, and the ring's bytes per step.
local core = require "luatron.core"

local M = {}

-- The global positions (0-based) of the local rows of cp rank `rank` of `size` for a sequence of S.
function M.positions(rank, size, S)
  local pos, L = {}, S // (2 * size)
  if size == 1 then
    for t = 1, S do pos[t] = t - 1 end
    return pos
  end
  for t = 0, L - 1 do
    pos[t + 1], pos[L + t + 1] = rank * L + t, (2 * size - 1 - rank) * L + t
  end
  return pos
end

-- This rank's columns of t [b, S] (int32 on the host) as a new [b, S / size] tensor: its two chunks.
function M.local_rows(t, rank, size)
  if size == 1 then return t:clone() end
  local b, S = t:shape()[1], t:shape()[2]
  local L = S // (2 * size)
  local out = core.tensor.zeros({ b, 2 * L }, t:dtype())
  out:narrow(2, 1, L):copy(t:narrow(2, rank * L + 1, L))
  out:narrow(2, L + 1, L):copy(t:narrow(2, (2 * size - 1 - rank) * L + 1, L))
  return out
end

-- The bytes this rank's ring sends per step for its chunks over n_micro microbatches: per layer and
-- microbatch, CP - 1 key/value blocks forward and, backward, CP - 1 blocks and CP gradients of one
-- (a block: micro_batch_size x seq_length / CP tokens x this rank's query groups x 2 x kv_channels);
-- with cp_comm_type "all_gather" CP - 1 blocks forward, and backward an all-gather and a
-- reduce-scatter of CP - 1 each. An MoE layer also all-reduces the aux loss's int64 counts (E, or
-- micro_batch_size x E for seq_aux_loss: a ring all-reduce sends 2 (CP - 1) / CP of them).
function M.expected_bytes(r, chunks, n_micro)
  local m = r.model
  local cp, tp = m.context_parallel_size, m.tensor_model_parallel_size
  if cp == 1 then return 0 end
  local groups = m.num_query_groups >= tp and m.num_query_groups // tp or 1
  local block = r.train.micro_batch_size * (m.seq_length // cp) * groups * 2 * m.kv_channels * (m.bf16 and 2 or 4)
  local layers, moe_layers = 0, 0
  for _, chunk in ipairs(chunks) do
    local st = chunk:stage()
    layers = layers + st.layer_end - st.layer_begin
    for l = st.layer_begin, st.layer_end - 1 do
      if m.num_moe_experts and l % m.moe_layer_freq == 0 then moe_layers = moe_layers + 1 end
    end
  end
  local counts = 0
  local balance = m.moe_router_load_balancing_type -- (global_aux_loss sums its counts over TP x DP x CP apart)
  if m.num_moe_experts and (balance == "aux_loss" or balance == "seq_aux_loss") and (m.moe_aux_loss_coeff or 0) > 0 then
    counts = m.num_moe_experts * (m.moe_router_load_balancing_type == "seq_aux_loss" and r.train.micro_batch_size or 1)
  end
  return n_micro * (layers * (m.cp_comm_type == "all_gather" and 3 * cp - 3 or 3 * cp - 2) * block
    + moe_layers * (2 * (cp - 1) * 8 * counts // cp))
end

return M

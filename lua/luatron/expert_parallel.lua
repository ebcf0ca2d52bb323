-- Expert parallelism's arithmetic, to hold the engine to: the bytes each token dispatcher moves over
-- its group of P = ETP x EP ranks (engine/model/moe_mlp.h), counted as the communicators count them
-- (what a rank sends to the others: an all-gather or reduce-scatter (P-1)/P of the whole buffer, an
-- all-to-all its blocks for other ranks). C = hidden_size, B = bytes per element of the compute
-- dtype, E experts, El = E / EP on a rank. Per MoE layer and microbatch, forward and backward:
--   allgather  each of the N tokens' normed input, its output and their two gradients cross (P-1)
--              times (two all-gathers, two reduce-scatters of N C B), with the routing (N 2E fp32
--              probs and map gathered) and its gradient (N E fp32 reduce-scattered): with the rows
--              sent S = (P-1) N, S (4 C B + 12 E) bytes;
--   alltoall   the counts all-gathered ((P-1) E int64), then each row sent S and received R (the
--              (token, expert) pairs for and from other ranks) crosses twice, forward and backward:
--              2 (S + R) C B;
--   flex       the row counts all-gathered ((P-1) P int64), each sent row's probs and map (2 El
--              fp32), each received row's probs' gradient back (El fp32), and 2 (S + R) C B for the
--              (token, rank) rows.
local M = {}

-- Rows the alltoall dispatcher sends to and receives from other ranks of the dispatch group (ETP x EP
-- ranks; rank p holds EP rank p // etp's El experts), by the routing counts: own[e] the tokens this
-- rank routed to expert e, all[e] the group's (1-based arrays); me this rank in the group. A row goes
-- to each of the etp ranks holding its expert.
function M.remote_rows(own, all, me, El, etp)
  local sent, received = 0, 0
  for e = 1, #own do
    local owner = (e - 1) // El
    if owner == me // etp then received = received + all[e] - own[e] end
    sent = sent + etp * own[e] - (owner == me // etp and own[e] or 0)
  end
  return sent, received
end

-- Bytes this rank's dispatcher sends for `forwards` MoE layer forwards (and their backwards) that sent
-- `sent` rows to other ranks and received `received` from them; m the resolved model. The dispatch
-- group holds P = ETP x EP ranks (ETP is 1, or TP when experts are split over it).
function M.expected_bytes(m, forwards, sent, received)
  local EP, E = m.expert_model_parallel_size, m.num_moe_experts
  local P = EP * (m.expert_tensor_parallel_size or 1)
  if P == 1 then return 0 end
  local C, B, El = m.hidden_size, m.bf16 and 2 or 4, E // EP
  local kind = m.moe_token_dispatcher_type
  if kind == "allgather" then return sent * (4 * C * B + 12 * E) end
  local rows = 2 * (sent + received) * C * B
  if kind == "alltoall" then return forwards * (P - 1) * E * 8 + rows end
  return forwards * (P - 1) * P * 8 + sent * 2 * El * 4 + received * El * 4 + rows
end

return M

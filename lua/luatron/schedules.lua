-- Pipeline schedules: the order in which one pipeline rank runs the forward and backward steps
-- of its microbatches. A schedule is a Lua function of a stage view `s`:
--   s.rank                this rank's pipeline stage r (0-based)
--   s.pipeline_size       PP, the number of pipeline ranks
--   s.chunks              VPP, the model chunks this rank holds (1 without virtual stages)
--   s.num_microbatches    M
--   s.group_size          N, Megatron's microbatch_group_size_per_vp_stage (interleaved)
--   s.forward_only        true for evaluation: no backward steps
--   s.forward(m, c)       run microbatch m through chunk c (c defaults to 0)
--   s.backward(m, c)      run its backward
-- Only the order is the schedule's business: the point-to-point traffic between stages follows
-- from it (luatron.pipeline), and luatron.pipeline checks every rank's order against the others'
-- before a run. Numbering is Megatron's: microbatches and chunks from 0.
local M = {}

-- Megatron's forward_backward_no_pipelining: every microbatch forward then backward, on one stage.
function M.no_pipelining(s)
  for m = 0, s.num_microbatches - 1 do
    s.forward(m)
    if not s.forward_only then s.backward(m) end
  end
end

-- Warm-up forwards, then one forward and one backward at a time, then the remaining backwards.
-- `fwd(k)` and `bwd(k)` run the k-th forward and backward of this rank.
local function one_f_one_b(s, total, warmup, fwd, bwd)
  if s.forward_only then warmup = total end
  for k = 0, warmup - 1 do fwd(k) end
  local steady = total - warmup
  for k = 0, steady - 1 do
    fwd(warmup + k)
    bwd(k)
  end
  if s.forward_only then return end
  for k = steady, total - 1 do bwd(k) end
end

-- Megatron's 1F1B (forward_backward_pipelining_without_interleaving): warm-up min(PP - r - 1, M),
-- so stage r holds at most PP - r microbatches' activations at once.
function M.one_f_one_b(s)
  local m = s.num_microbatches
  one_f_one_b(s, m, math.min(s.pipeline_size - s.rank - 1, m), function(k) s.forward(k) end,
    function(k) s.backward(k) end)
end

-- Megatron's schedule table: groups of N microbatches, each group through chunk 0, then chunk 1, ...
-- (the last group takes what is left). Entry k is the k-th forward {microbatch, chunk}.
function M.schedule_table(m, chunks, n)
  local table_ = {}
  for first = 0, m - 1, n do
    for c = 0, chunks - 1 do
      for mb = first, math.min(first + n, m) - 1 do table_[#table_ + 1] = { mb, c } end
    end
  end
  return table_
end

-- Megatron's interleaved 1F1B (forward_backward_pipelining_with_interleaving): the k-th forward
-- runs table entry k; the k-th backward runs the same microbatch through chunk VPP - c - 1.
-- Warm-up (PP - r - 1) * 2 + (VPP - 1) * N, at most M * VPP.
function M.interleaved(s)
  local chunks = s.chunks
  local tbl = M.schedule_table(s.num_microbatches, chunks, s.group_size)
  local total = #tbl
  local warmup = math.min((s.pipeline_size - s.rank - 1) * 2 + (chunks - 1) * s.group_size, total)
  one_f_one_b(s, total, warmup,
    function(k) s.forward(tbl[k + 1][1], tbl[k + 1][2]) end,
    function(k) s.backward(tbl[k + 1][1], chunks - tbl[k + 1][2] - 1) end)
end

-- By name, as configs and `lt.pipeline.plan` spell them.
M.by_name = {
  no_pipelining = M.no_pipelining,
  ["1f1b"] = M.one_f_one_b,
  interleaved = M.interleaved,
}

-- Megatron's choice (get_forward_backward_func): interleaved with virtual stages, 1F1B with
-- pipeline stages, no pipelining otherwise.
function M.default_name(pipeline_size, chunks)
  if pipeline_size > 1 then return chunks > 1 and "interleaved" or "1f1b" end
  return "no_pipelining"
end

return M

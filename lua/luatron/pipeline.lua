-- Pipeline plans: what each pipeline rank computes, sends and receives in one training step, from
-- a schedule (luatron.schedules, or the user's own function), checked across all ranks before
-- anything runs.
--
--   local plan = lt.pipeline.plan{ schedule = "interleaved", pipeline_model_parallel_size = 2,
--     virtual_pipeline_model_parallel_size = 2, num_microbatches = 5,
--     microbatch_group_size_per_vp_stage = 3, rank = 0 }
--   plan.steps --> { {"F", 0, 0, to = 1}, {"F", 1, 0, to = 1}, ..., {"B", 4, 0, from = 1, last = true} }
--
-- A step is {"F" or "B", microbatch, chunk} (0-based, Megatron's numbering). Chunk c of rank r is
-- virtual stage s = c * PP + r, and the traffic follows from the steps: a forward receives its
-- input activation `from` the rank of stage s - 1 (none on stage 0) and sends its output `to` the
-- rank of stage s + 1 (none on the last stage); a backward receives its output's gradient from
-- stage s + 1 and sends its input's gradient to stage s - 1. `last = true` marks a chunk's last
-- backward: its gradients are complete there, so their data-parallel reduction may start.
--
-- A step waits for its receive; its send is posted when it is done and completes in the
-- background, whenever the receiver gets to it (luatron.pipeline_run gives every direction
-- between two ranks its own communicator, so a send in flight never holds up a receive).
-- Messages from one rank to another are matched in order, activations and gradients separately.
-- The check runs every rank's steps under those rules and refuses a plan whose messages do not
-- pair up, or whose order would deadlock (ranks waiting for each other's messages in a cycle),
-- naming the steps and ranks.
local schedules = require "luatron.schedules"

local M = {}

local function posint(spec, key, default)
  local v = spec[key]
  if v == nil then v = default end
  if math.type(v) ~= "integer" or v < 1 then
    error(("pipeline plan: %s must be a positive integer (got %s)"):format(key, tostring(v)), 0)
  end
  return v
end

-- The plan's parameters with Megatron's defaults and refusals.
local function resolve(spec)
  if type(spec) ~= "table" then error("pipeline plan: expected a table of settings", 0) end
  local pp = posint(spec, "pipeline_model_parallel_size", 1)
  local chunks = posint(spec, "virtual_pipeline_model_parallel_size", 1)
  local m = spec.num_microbatches
  if math.type(m) ~= "integer" or m < 1 then
    error(("number of microbatches should be at least 1, got %s."):format(tostring(m)), 0)
  end
  local n = posint(spec, "microbatch_group_size_per_vp_stage", pp)
  local schedule = spec.schedule or schedules.default_name(pp, chunks)
  local name = type(schedule) == "string" and schedule or "custom"
  if type(schedule) == "string" then
    schedule = schedules.by_name[schedule]
    if not schedule then
      error(("pipeline plan: unknown schedule '%s' (one of no_pipelining, 1f1b, interleaved, or a function)")
        :format(name), 0)
    end
  elseif type(schedule) ~= "function" then
    error("pipeline plan: schedule must be a name or a function (got " .. type(schedule) .. ")", 0)
  end
  if chunks > 1 and pp == 1 then
    error("pipeline-model-parallel size should be greater than 1 with interleaved schedule", 0)
  end
  if name == "no_pipelining" and pp > 1 then
    error(("pipeline plan: no_pipelining runs one stage, but pipeline_model_parallel_size is %d"):format(pp), 0)
  elseif name == "1f1b" and chunks > 1 then
    error(("pipeline plan: 1f1b runs one chunk per rank, but virtual_pipeline_model_parallel_size is %d "
      .. "(use the interleaved schedule)"):format(chunks), 0)
  elseif name == "interleaved" and chunks == 1 then
    error("pipeline plan: the interleaved schedule needs virtual_pipeline_model_parallel_size > 1", 0)
  end
  if chunks > 1 then
    if n < pp or n > m then
      error(("The number of contiguous micro-batches in a virtual pipeline stage should range in [PP=%d , M=%d] "
        .. "(microbatch_group_size_per_vp_stage is %d)"):format(pp, m, n), 0)
    end
    local rest = m % n
    if rest > 0 and rest < pp then
      error(("The remainder of M (the total micro-batches) divided by N (number of contiguous micro-batches in a "
        .. "virtual pipeline stage) should be 0, or larger than or equal to the pipeline-parallel size, but it is "
        .. "%d. Otherwise, it introduces dependency bubbles in the pipeline and reduces throughput."):format(rest), 0)
    end
  end
  return { schedule = schedule, name = name, pipeline_size = pp, chunks = chunks, num_microbatches = m,
    group_size = n, forward_only = spec.forward_only and true or false }
end

local function step_text(step)
  return ("%s %d %d"):format(step[1], step[2], step[3])
end

-- Rank r's steps, from running the schedule with a recording stage view.
local function plan_rank(p, r)
  local steps, done = {}, {}
  local where = ("pipeline schedule '%s', rank %d"):format(p.name, r)
  local function record(kind, m, c)
    c = c or 0
    if math.type(m) ~= "integer" or m < 0 or m >= p.num_microbatches then
      error(("%s: step %d (%s) names microbatch %s; microbatches are 0..%d"):format(where, #steps + 1, kind,
        tostring(m), p.num_microbatches - 1), 0)
    end
    if math.type(c) ~= "integer" or c < 0 or c >= p.chunks then
      error(("%s: step %d (%s %d) names chunk %s; this rank holds chunks 0..%d"):format(where, #steps + 1, kind, m,
        tostring(c), p.chunks - 1), 0)
    end
    local key = m * p.chunks + c
    local text = ("%s %d %d"):format(kind, m, c)
    if kind == "B" and p.forward_only then
      error(("%s: step %d (%s) is a backward in a forward-only plan"):format(where, #steps + 1, text), 0)
    elseif kind == "F" and done[key] then
      error(("%s: step %d (%s) runs microbatch %d through chunk %d a second time"):format(where, #steps + 1, text,
        m, c), 0)
    elseif kind == "B" and done[key] ~= "F" then
      error(("%s: step %d (%s) comes %s"):format(where, #steps + 1, text,
        done[key] and "a second time" or "before the forward of that microbatch and chunk"), 0)
    end
    done[key] = kind
    local stage, last_stage = c * p.pipeline_size + r, p.pipeline_size * p.chunks - 1
    local before = kind == "F" and stage - 1 or stage + 1
    local after = kind == "F" and stage + 1 or stage - 1
    local step = { kind, m, c }
    if before >= 0 and before <= last_stage then step.from = before % p.pipeline_size end
    if after >= 0 and after <= last_stage then step.to = after % p.pipeline_size end
    steps[#steps + 1] = step
  end
  p.schedule {
    rank = r, pipeline_size = p.pipeline_size, chunks = p.chunks, num_microbatches = p.num_microbatches,
    group_size = p.group_size, forward_only = p.forward_only,
    forward = function(m, c) record("F", m, c) end,
    backward = function(m, c) record("B", m, c) end,
  }
  local want = p.forward_only and "F" or "B"
  for m = 0, p.num_microbatches - 1 do
    for c = 0, p.chunks - 1 do
      local got = done[m * p.chunks + c]
      if got ~= want then
        error(("%s: microbatch %d never runs %sthrough chunk %d"):format(where, m, got and "backward " or "", c), 0)
      end
    end
  end
  local seen = {}
  for i = #steps, 1, -1 do
    local s = steps[i]
    if s[1] == "B" and not seen[s[3]] then
      seen[s[3]] = true
      s.last = true
    end
  end
  local in_flight, peak = 0, 0
  for _, s in ipairs(steps) do
    in_flight = in_flight + (s[1] == "F" and 1 or -1)
    peak = math.max(peak, in_flight)
  end
  return {
    rank = r, schedule = p.name, pipeline_model_parallel_size = p.pipeline_size,
    virtual_pipeline_model_parallel_size = p.chunks, num_microbatches = p.num_microbatches,
    microbatch_group_size_per_vp_stage = p.group_size, forward_only = p.forward_only,
    steps = steps,
    max_in_flight = p.forward_only and 1 or peak, -- microbatches whose activations are held at once
  }
end

-- The message a step receives (dir "recv") or sends (dir "send"): its channel (sender, receiver,
-- kind) and a label naming the microbatch and the stage that consumes it.
local function message(p, r, step, dir)
  local kind = step[1] == "F" and "activation" or "gradient"
  local stage = step[3] * p.pipeline_size + r
  local peer = dir == "send" and step.to or step.from
  local consumer = dir == "recv" and stage or (step[1] == "F" and stage + 1 or stage - 1)
  local src, dst = r, peer
  if dir == "recv" then src, dst = peer, r end
  return { channel = ("%d>%d %s"):format(src, dst, kind), peer = peer,
    label = ("%s of microbatch %d for stage %d"):format(kind, step[2], consumer) }
end

-- Runs every rank's steps: a step whose receive has not been sent yet waits; a step that runs
-- sends at once. Errors on a message received in another order than sent, or on a deadlock.
local function check(p, plans)
  local sent = {}     -- channel -> the labels sent on it, in order
  local received = {} -- channel -> how many have been received
  local pos = {}
  for r = 0, p.pipeline_size - 1 do pos[r] = 1 end
  local function waiting(r) -- the message rank r's next step waits for, or nil
    local step = plans[r + 1].steps[pos[r]]
    if not (step and step.from) then return nil end
    local msg = message(p, r, step, "recv")
    local k = (received[msg.channel] or 0) + 1
    local label = (sent[msg.channel] or {})[k]
    if label == nil then return msg end
    if label ~= msg.label then
      error(("pipeline schedule '%s' pairs messages wrongly: rank %d at step %d (%s) waits to receive the %s from "
        .. "rank %d, but rank %d sends the %s first"):format(p.name, r, pos[r], step_text(step), msg.label, msg.peer,
        msg.peer, label), 0)
    end
    return nil
  end
  local progress = true
  while progress do
    progress = false
    for r = 0, p.pipeline_size - 1 do
      local steps = plans[r + 1].steps
      while steps[pos[r]] and not waiting(r) do
        local step = steps[pos[r]]
        if step.from then
          local ch = message(p, r, step, "recv").channel
          received[ch] = (received[ch] or 0) + 1
        end
        if step.to then
          local msg = message(p, r, step, "send")
          sent[msg.channel] = sent[msg.channel] or {}
          table.insert(sent[msg.channel], msg.label)
        end
        pos[r] = pos[r] + 1
        progress = true
      end
    end
  end
  local stuck = {}
  for r = 0, p.pipeline_size - 1 do
    local step = plans[r + 1].steps[pos[r]]
    if step then
      local msg = message(p, r, step, "recv")
      stuck[#stuck + 1] = ("rank %d at step %d (%s) waits to receive the %s from rank %d"):format(r, pos[r],
        step_text(step), msg.label, msg.peer)
    end
  end
  if #stuck > 0 then
    error(("pipeline schedule '%s' would deadlock: %s"):format(p.name, table.concat(stuck, "; ")), 0)
  end
end

-- Every rank's plan (a list, rank r at index r + 1), checked against each other.
function M.plan_all(spec)
  local p = resolve(spec)
  local plans = {}
  for r = 0, p.pipeline_size - 1 do plans[r + 1] = plan_rank(p, r) end
  check(p, plans)
  return plans
end

-- The plan of rank spec.rank, after checking every rank's (see the top of this file).
function M.plan(spec)
  local r = spec and spec.rank
  local pp = spec and spec.pipeline_model_parallel_size or 1
  if math.type(r) ~= "integer" or r < 0 or r >= pp then
    error(("pipeline plan: rank must be a pipeline rank 0..%d (got %s)"):format(pp - 1, tostring(r)), 0)
  end
  return M.plan_all(spec)[r + 1]
end

return M

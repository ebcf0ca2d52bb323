-- What the pipeline ranks did and when: the timelines luatron.pipeline_run records (forward and
-- backward steps, waits for receives), the bubble they measure, and a Chrome trace of them
-- (chrome://tracing or ui.perfetto.dev: one row per rank).
local core = require "luatron.core"
local json = require "luatron.json"

local M = {}

-- The idle share of one step on this rank, as Megatron's formula counts it: time not spent
-- computing over time computing. `steps` is a pipeline_run timeline, `wall` the step's seconds.
function M.bubble(steps, wall)
  local busy = 0
  for _, e in ipairs(steps) do
    if e.kind ~= "recv" then busy = busy + e.finish - e.start end
  end
  return busy > 0 and math.max(wall - busy, 0) / busy or 0
end

-- Megatron's formula: (PP - 1) / M for 1F1B, (PP - 1) / (VPP x M) interleaved.
function M.bubble_formula(pp, vpp, m)
  return (pp - 1) / ((vpp or 1) * m)
end

local KINDS = { F = 1, B = 2, recv = 3 }
local NAMES = { "F", "B", "recv" }

-- A recorder of the steps of a run: rec:add(iteration, timeline) after each step, then
-- rec:write(path, world) (a collective over world: every rank's events go to rank 0, which writes).
local Recorder = {}
Recorder.__index = Recorder

function M.recorder() return setmetatable({ rows = {} }, Recorder) end

function Recorder:add(iteration, steps)
  for _, e in ipairs(steps) do
    -- integers (nanoseconds of the monotonic clock, shared by the ranks of a machine)
    local row = { iteration, KINDS[e.kind], e.m, e.c, math.floor(e.start * 1e9), math.floor(e.finish * 1e9) }
    for _, v in ipairs(row) do self.rows[#self.rows + 1] = v end
  end
end

local FIELDS = 6

-- Gathers every rank's rows on every rank (their counts first, then the rows padded to the largest).
local function gather(rows, world)
  local n = world:size()
  local count = core.tensor.from({ #rows }, "int64")
  local counts = core.tensor.zeros({ n }, "int64")
  world:all_gather(count, counts)
  local most = 0
  for r = 1, n do most = math.max(most, counts:get(r)) end
  local mine = core.tensor.zeros({ math.max(most, FIELDS) }, "int64")
  for i, v in ipairs(rows) do mine:set(i, v) end
  local all = core.tensor.zeros({ n * math.max(most, FIELDS) }, "int64")
  world:all_gather(mine, all)
  return all, counts, math.max(most, FIELDS)
end

function Recorder:write(path, world, pp_rank_of)
  local all, counts, stride = gather(self.rows, world)
  if world:rank() ~= 0 then return end
  local events, t0 = {}, math.huge
  for r = 0, world:size() - 1 do
    for i = 1, counts:get(r + 1), FIELDS do t0 = math.min(t0, all:get(r * stride + i + 4)) end
  end
  for r = 0, world:size() - 1 do
    events[#events + 1] = { name = "process_name", ph = "M", pid = r,
      args = { name = ("rank %d (pipeline stage %d)"):format(r, pp_rank_of(r)) } }
    events[#events + 1] = { name = "process_sort_index", ph = "M", pid = r, args = { sort_index = r } }
    for i = 1, counts:get(r + 1), FIELDS do
      local function at(k) return all:get(r * stride + i + k) end
      local kind = NAMES[at(1)]
      events[#events + 1] = { name = ("%s %d %d"):format(kind, at(2), at(3)), cat = kind, ph = "X", pid = r, tid = 0,
        ts = (at(4) - t0) / 1e3, dur = (at(5) - at(4)) / 1e3,
        args = { iteration = at(0), microbatch = at(2), chunk = at(3) } }
    end
  end
  local f = assert(io.open(path, "w"))
  f:write(json.encode { traceEvents = events, displayTimeUnit = "ms" }, "\n")
  f:close()
end

return M

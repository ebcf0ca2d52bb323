-- The process's place in the job: the world communicator, Megatron's rank grid
-- (tp-cp-ep-dp-pp, or tp-cp-ep-pp-dp with dist.use_tp_pp_dp_mapping) and a communicator for each
-- group this rank belongs to.
--   local ps = lt.parallel_state()        -- after pretrain or parallel.initialize
--   ps.rank, ps.world_size, ps.coords.dp_rank, ps.groups.dp:all_reduce(t, "avg")
local core = require "luatron.core"

local M = {}

-- Group kinds with a communicator each (names as the grid gives them).
M.GROUP_KINDS = { "tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp", "tp-dp-cp", "tp-dp", "ep", "etp", "edp",
  "tp-ep", "embedding" }

local state

-- Builds the grid for `model` (a GPTModelProvider or its resolved table) on the world of this job,
-- in the rank order `dist` (a DistributedInitConfig, optional) asks for. Every rank of the job must
-- call it, with the same configs.
function M.initialize(model, dist)
  if state then return state end
  local world = core.comm_world()
  local grid = core.grid {
    world_size = world:size(),
    tensor_model_parallel_size = model.tensor_model_parallel_size or 1,
    pipeline_model_parallel_size = model.pipeline_model_parallel_size or 1,
    context_parallel_size = model.context_parallel_size or 1,
    expert_model_parallel_size = model.expert_model_parallel_size or 1,
    expert_tensor_parallel_size = model.expert_tensor_parallel_size,
    virtual_pipeline_model_parallel_size = model.virtual_pipeline_model_parallel_size,
    use_tp_pp_dp_mapping = dist and dist.use_tp_pp_dp_mapping or false,
  }
  local rank = world:rank()
  local groups = {}
  for _, kind in ipairs(M.GROUP_KINDS) do
    local ranks = grid.group(kind, rank)
    if ranks and #ranks > 0 then
      groups[kind] = #ranks == world:size() and world or world:group(ranks, kind)
      groups[kind:gsub("%-", "_")] = groups[kind]
    end
  end
  state = {
    world = world,
    rank = rank,
    world_size = world:size(),
    grid = grid,
    coords = grid.coords(rank),
    groups = groups,
    launcher = core.bootstrap().launcher,
    local_rank = core.bootstrap().local_rank, -- this rank's place on its machine: its GPU
  }
  return state
end

-- A communicator of its own over all the ranks of group g (a communicator), so its statistics count
-- one use alone; nil for no group or a group of one. Every rank of g calls it, in the same order.
function M.own_group(g, name)
  if not g or g:size() == 1 then return nil end
  local all = {}
  for i = 1, g:size() do all[i] = i - 1 end
  return g:group(all, name)
end

-- The state built by initialize (nil before).
function M.get() return state end

-- Text for logs: "rank 3 of 8: tp 1/2 cp 0/1 dp 1/2 pp 0/2".
function M.describe(s)
  s = s or state
  local c = s.coords
  return ("rank %d of %d: tp %d/%d cp %d/%d dp %d/%d pp %d/%d"):format(s.rank, s.world_size, c.tp_rank, s.grid.tp,
    c.cp_rank, s.grid.cp, c.dp_rank, s.grid.dp, c.pp_rank, s.grid.pp)
end

return M

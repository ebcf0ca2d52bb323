-- Checkpoints: a folder per iteration, as Megatron's iter_XXXXXXX, holding
--   model.safetensors        the parameters under Megatron's names
--   optimizer.safetensors    the optimizer state as "<state>.<param name>" (e.g. exp_avg.decoder...)
--     or optimizer_shard_<r>.safetensors, one per data-parallel rank with the distributed
--     optimizer: that rank's slice of the flat state buffers ("exp_avg", "exp_avg_sq")
--   state.json               iteration, consumed samples, optimizer steps, seed
--   config.json              the run's ConfigContainer
-- and latest_checkpointed_iteration.txt beside them. A folder is written under a temporary
-- name and renamed into place, and the tracker file is replaced the same way, so a crash
-- never leaves a half-written checkpoint where a reader would look.
--
-- In a multi-rank job, `ranks` = {rank =, barrier = function() end, dp_rank =, dp_size =}:
-- rank 0 writes the shared files, each data-parallel rank its optimizer shard.
local core = require "luatron.core"
local json = require "luatron.json"
local data_parallel = require "luatron.data_parallel"
local fs = require "luatron.fs"

local M = {}

local SINGLE = { rank = 0, dp_rank = 0, dp_size = 1, barrier = function() end }

local function iter_dir(root, iteration) return ("%s/iter_%07d"):format(root, iteration) end

local function write_file(path, text)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(text)
  f:close()
  assert(os.rename(tmp, path))
end


local function model_tensors(model)
  local t = {}
  for _, p in ipairs(model:parameters()) do t[p.name] = model:param(p.name) end
  return t
end

-- {name = tensor}, sharded? of a data_parallel optimizer, or of a plain core optimizer over a model.
local function optimizer_state(model, optimizer)
  if optimizer.state_tensors then return optimizer:state_tensors() end
  return data_parallel.replicated_state(model, optimizer), false
end

local function shard_file(dir, dp_rank) return ("%s/optimizer_shard_%d.safetensors"):format(dir, dp_rank) end

-- The iterations of root's checkpoint folders, ascending.
function M.iterations(root)
  local its = {}
  local p = io.popen("ls -1 " .. fs.quote(root) .. " 2>/dev/null")
  for name in p:lines() do
    local it = name:match("^iter_(%d+)$")
    if it then its[#its + 1] = tonumber(it) end
  end
  p:close()
  table.sort(its)
  return its
end

-- Checkpoint.most_recent_k: keep the newest k folders of root.
function M.remove_old(root, keep)
  local its = M.iterations(root)
  for i = 1, #its - keep do os.execute("rm -rf " .. fs.quote(iter_dir(root, its[i]))) end
end

-- Saves iteration state.iteration under root; returns the folder. `optimizer` is a
-- data_parallel optimizer (anything with :state_tensors()), or nil to save the model only
-- (CheckpointConfig.save_optim = false).
function M.save(root, model, optimizer, state, config_table, ranks)
  ranks = ranks or SINGLE
  local final = iter_dir(root, state.iteration)
  local tmp = final .. ".tmp"
  if ranks.rank == 0 then
    os.execute("rm -rf " .. fs.quote(tmp) .. " && mkdir -p " .. fs.quote(tmp))
  end
  ranks.barrier()
  local meta = { format = "luatron", iteration = tostring(state.iteration) }
  if optimizer then
    local tensors, sharded = optimizer_state(model, optimizer)
    if sharded then
      local m = { format = "luatron", iteration = meta.iteration, dp_rank = tostring(ranks.dp_rank),
        dp_size = tostring(ranks.dp_size) }
      if ranks.rank == ranks.dp_rank then -- one writer per data-parallel rank (tp/pp rank 0)
        core.save_tensors(shard_file(tmp, ranks.dp_rank), tensors, m)
      end
    elseif ranks.rank == 0 then
      core.save_tensors(tmp .. "/optimizer.safetensors", tensors, meta)
    end
  end
  if ranks.rank == 0 then
    core.save_tensors(tmp .. "/model.safetensors", model_tensors(model), meta)
    write_file(tmp .. "/state.json", json.encode(state))
    write_file(tmp .. "/config.json", json.encode(config_table or {}))
  end
  ranks.barrier()
  if ranks.rank == 0 then
    os.execute("rm -rf " .. fs.quote(final))
    assert(os.rename(tmp, final), "cannot move " .. tmp .. " into place")
    write_file(root .. "/latest_checkpointed_iteration.txt", tostring(state.iteration) .. "\n")
  end
  ranks.barrier()
  return final
end

-- The iteration recorded in root's tracker file, or nil when root holds no checkpoint.
function M.latest_iteration(root)
  local s = fs.read(root .. "/latest_checkpointed_iteration.txt")
  if not s then return nil end
  local it = tonumber(s:match("^%s*(%d+)%s*$"))
  if not it then
    error(("%s/latest_checkpointed_iteration.txt is corrupt (expected an iteration number, found %q)")
      :format(root, s:sub(1, 40)), 0)
  end
  return it
end

-- Raises a clear error unless every destination tensor has a source of the same shape.
local function check_all(dst_tensors, loaded, file)
  for name, dst in pairs(dst_tensors) do
    local src = loaded[name]
    if not src then error(("%s: missing tensor '%s'"):format(file, name), 0) end
    local a, b = table.concat(dst:shape(), "x"), table.concat(src:shape(), "x")
    if a ~= b then
      error(("%s: tensor '%s' has shape [%s], this run expects [%s]"):format(file, name, b, a), 0)
    end
  end
end

local function copy_all(dst_tensors, loaded)
  for name, dst in pairs(dst_tensors) do dst:copy(loaded[name]) end
end

local function load_file(path)
  local t, meta_or_err = core.load_tensors(path)
  if not t then error("corrupt checkpoint: " .. meta_or_err, 0) end
  return t, meta_or_err
end

-- Loads the latest checkpoint of root (or opts.iteration's) into model, and into optimizer
-- unless opts.load_optim == false (a data_parallel optimizer's main weights then follow the
-- loaded model). Returns the saved state table and the folder, or nil when root has none.
-- Everything is read and checked before anything changes, so a corrupt checkpoint raises a
-- clear error and leaves the run as it was.
function M.load(root, model, optimizer, ranks, opts)
  ranks, opts = ranks or SINGLE, opts or {}
  local iteration = opts.iteration or M.latest_iteration(root)
  if not iteration then return nil end
  local dir = iter_dir(root, iteration)
  local state_text = fs.read(dir .. "/state.json")
  if not state_text and opts.iteration then
    local its = M.iterations(root)
    error(("checkpoint.ckpt_step = %d: %s holds no checkpoint of that iteration (it has %s)"):format(iteration,
      root, #its > 0 and table.concat(its, ", ") or "none"), 0)
  end
  if not state_text then error(("checkpoint %s has no state.json"):format(dir), 0) end
  local ok, state = pcall(json.decode, state_text)
  if not ok then error(("checkpoint %s/state.json is corrupt: %s"):format(dir, state), 0) end
  local weights = load_file(dir .. "/model.safetensors")
  local model_dst = model_tensors(model)
  check_all(model_dst, weights, dir .. "/model.safetensors")
  local opt_dst, opt_src
  local load_optim = optimizer and opts.load_optim ~= false
  if load_optim then
    local sharded
    opt_dst, sharded = optimizer_state(model, optimizer)
    local file = sharded and shard_file(dir, ranks.dp_rank) or dir .. "/optimizer.safetensors"
    local has_shards, has_full = fs.exists(shard_file(dir, 0)), fs.exists(dir .. "/optimizer.safetensors")
    if not has_shards and not has_full then
      error(("checkpoint %s holds no optimizer state (saved with checkpoint.save_optim = false): set "
        .. "checkpoint.load_optim = false or checkpoint.finetune = true to load the model only"):format(dir), 0)
    end
    if not sharded and not has_full then
      error(("checkpoint %s was saved with the distributed optimizer (one optimizer shard per data-parallel rank); "
        .. "this run uses DDP. Resume with ddp.use_distributed_optimizer = true on the same data-parallel size, or "
        .. "set checkpoint.load_optim = false to load the model only"):format(dir), 0)
    end
    if sharded and not fs.exists(file) then
      error(("checkpoint %s has no %s: it was not saved with the distributed optimizer at data-parallel size %d. "
        .. "Resume with the layout it was saved with"):format(dir, file:match("[^/]+$"), ranks.dp_size), 0)
    end
    local meta
    opt_src, meta = load_file(file)
    if sharded and tonumber(meta.dp_size) ~= ranks.dp_size then
      error(("%s was saved by %s data-parallel ranks, this run has %d: resume with the same data-parallel size")
        :format(file, tostring(meta.dp_size), ranks.dp_size), 0)
    end
    check_all(opt_dst, opt_src, file)
  end
  copy_all(model_dst, weights)
  if load_optim then
    copy_all(opt_dst, opt_src)
    optimizer:num_steps(state.optimizer_steps or iteration)
  end
  if optimizer and optimizer.after_load then optimizer:after_load() end
  return state, dir
end

return M

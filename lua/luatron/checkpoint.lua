-- Checkpoints: a folder per iteration, as Megatron's iter_XXXXXXX, holding
--   model.safetensors        the parameters under Megatron's names
--   optimizer.safetensors    the optimizer state as "<state>.<param name>" (e.g. exp_avg.decoder...)
--     or optimizer_shard_<r>.safetensors, one per data-parallel rank with the distributed
--     optimizer: the parts of the parameters that rank updates, as 1-D tensors
--     "<state>.<param name>:<first element>"
--   state.json               iteration, consumed samples, optimizer steps, seed
--   config.json              the run's ConfigContainer
-- and latest_checkpointed_iteration.txt beside them. A folder is written under a temporary
-- name and renamed into place, and the tracker file is replaced the same way, so a crash
-- never leaves a half-written checkpoint where a reader would look.
--
-- In a multi-rank job, `ranks` = {rank =, barrier = function() end, dp_rank =, dp_size =}:
-- rank 0 writes the shared files, each data-parallel rank its optimizer shard. Everything is
-- stored under parameter names, so any layout loads what any other saved: a run with the
-- distributed optimizer resumes at another data-parallel size, or with DDP, and the other way.
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

-- The optimizer state as pieces of named parameters (luatron.data_parallel) and whether they are
-- this rank's shard only: a data_parallel optimizer's, or a plain core optimizer's over a model.
local function state_pieces(model, optimizer)
  if optimizer.state_pieces then return optimizer:state_pieces() end
  return data_parallel.replicated_pieces(model, optimizer), false
end

-- The tensors a file stores for pieces: whole parameters under "<state>.<param>" in their shape,
-- parts as 1-D "<state>.<param>:<first>".
local function piece_tensors(model, pieces, sharded)
  local shapes, t = {}, {}
  for _, p in ipairs(model:parameters()) do shapes[p.name] = p.shape end
  for _, piece in ipairs(pieces) do
    local key = piece.state .. "." .. piece.param
    if sharded then
      t[("%s:%d"):format(key, piece.first)] = piece.tensor
    else
      t[key] = piece.tensor:reshape(shapes[piece.param])
    end
  end
  return t
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
    local pieces, sharded = state_pieces(model, optimizer)
    if sharded then
      local m = { format = "luatron", iteration = meta.iteration, dp_rank = tostring(ranks.dp_rank),
        dp_size = tostring(ranks.dp_size) }
      if ranks.rank == ranks.dp_rank then -- one writer per data-parallel rank (tp/pp rank 0)
        core.save_tensors(shard_file(tmp, ranks.dp_rank), piece_tensors(model, pieces, true), m)
      end
    elseif ranks.rank == 0 then
      core.save_tensors(tmp .. "/optimizer.safetensors", piece_tensors(model, pieces, false), meta)
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

-- The optimizer files of dir: the whole state, or every data-parallel rank's shard. Returns
-- { ["<state>.<param>"] = { {first =, tensor = 1-D, file =}, ... } }.
local function read_optimizer(dir)
  local files = {}
  if fs.exists(dir .. "/optimizer.safetensors") then
    files[1] = dir .. "/optimizer.safetensors"
  else
    local _, meta = load_file(shard_file(dir, 0))
    local n = tonumber(meta.dp_size)
    if not n then error(("%s has no dp_size in its metadata"):format(shard_file(dir, 0)), 0) end
    for r = 0, n - 1 do
      if not fs.exists(shard_file(dir, r)) then
        error(("checkpoint %s lacks %s (it was saved by %d data-parallel ranks)"):format(dir,
          shard_file(dir, r):match("[^/]+$"), n), 0)
      end
      files[#files + 1] = shard_file(dir, r)
    end
  end
  local index = {}
  for _, file in ipairs(files) do
    for name, t in pairs((load_file(file))) do
      local key, first = name:match("^(.-):(%d+)$")
      key, first = key or name, tonumber(first) or 0
      index[key] = index[key] or {}
      table.insert(index[key], { first = first, tensor = t:reshape({ t:numel() }), file = file })
    end
  end
  return index
end

-- The copies that fill every destination piece from the stored pieces it overlaps, checked
-- before anything is copied: each element of the destination must be stored, inside its parameter.
local function plan_copies(model, pieces, index, dir)
  local numel = {}
  for _, p in ipairs(model:parameters()) do numel[p.name] = p.numel end
  local copies = {}
  for _, dst in ipairs(pieces) do
    local key, n = dst.state .. "." .. dst.param, dst.tensor:numel()
    local stored = index[key]
    if not stored then error(("checkpoint %s: missing optimizer state '%s'"):format(dir, key), 0) end
    local covered = 0
    for _, src in ipairs(stored) do
      local last = src.first + src.tensor:numel()
      if last > numel[dst.param] then
        error(("%s: optimizer state '%s' holds elements up to %d, but this run's %s has %d"):format(src.file, key,
          last, dst.param, numel[dst.param]), 0)
      end
      local a, b = math.max(dst.first, src.first), math.min(dst.first + n, last)
      if a < b then
        copies[#copies + 1] = { dst.tensor:narrow(1, a - dst.first + 1, b - a), src.tensor:narrow(1, a - src.first + 1,
          b - a) }
        covered = covered + b - a
      end
    end
    if covered ~= n then
      error(("checkpoint %s: optimizer state '%s' covers %d of the %d elements this rank needs"):format(dir, key,
        covered, n), 0)
    end
  end
  return copies
end

-- Loads the latest checkpoint of root (or opts.iteration's) into model, and into optimizer
-- unless opts.load_optim == false (a data_parallel optimizer's main weights then follow the
-- loaded model), whatever data-parallel layout saved it. Returns the saved state table and the folder, or nil when root has none.
-- Everything is read and checked before anything changes, so a corrupt checkpoint raises a
-- clear error and leaves the run as it was.
function M.load(root, model, optimizer, opts)
  opts = opts or {}
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
  local copies
  local load_optim = optimizer and opts.load_optim ~= false
  if load_optim then
    if not fs.exists(shard_file(dir, 0)) and not fs.exists(dir .. "/optimizer.safetensors") then
      error(("checkpoint %s holds no optimizer state (saved with checkpoint.save_optim = false): set "
        .. "checkpoint.load_optim = false or checkpoint.finetune = true to load the model only"):format(dir), 0)
    end
    copies = plan_copies(model, state_pieces(model, optimizer), read_optimizer(dir), dir)
  end
  copy_all(model_dst, weights)
  if load_optim then
    for _, c in ipairs(copies) do c[1]:copy(c[2]) end
    optimizer:num_steps(state.optimizer_steps or iteration)
  end
  if optimizer and optimizer.after_load then optimizer:after_load() end
  return state, dir
end

return M

-- Checkpoints: a folder per iteration, as Megatron's iter_XXXXXXX, holding
--   model.safetensors      the parameters under Megatron's names
--   optimizer.safetensors  the optimizer state as "<state>.<param name>" (e.g. exp_avg.decoder...)
--   state.json             iteration, consumed samples, optimizer steps, seed, luatron version
--   config.json            the run's ConfigContainer
-- and latest_checkpointed_iteration.txt beside them. A folder is written under a temporary
-- name and renamed into place, and the tracker file is replaced the same way, so a crash
-- never leaves a half-written checkpoint where a reader would look.
local core = require "luatron.core"
local json = require "luatron.json"

local M = {}

local function iter_dir(root, iteration)
  return ("%s/iter_%07d"):format(root, iteration)
end

local function sh(cmd)
  local ok = os.execute(cmd)
  return ok
end

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function write_file(path, text)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(text)
  f:close()
  assert(os.rename(tmp, path))
end

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Tensors of the model and the optimizer, keyed by their checkpoint names (views: no copies).
local function model_tensors(model)
  local t = {}
  for _, p in ipairs(model:parameters()) do t[p.name] = model:param(p.name) end
  return t
end

local function optimizer_tensors(model, optimizer)
  local t = {}
  for _, state in ipairs(optimizer:state_names()) do
    local flat = optimizer:state(state)
    for _, p in ipairs(model:parameters()) do
      t[state .. "." .. p.name] = flat:narrow(1, p.offset + 1, p.numel):reshape(p.shape)
    end
  end
  return t
end

-- Saves iteration `state.iteration` under root; returns the folder.
function M.save(root, model, optimizer, state, config_table)
  sh("mkdir -p " .. quote(root))
  local final = iter_dir(root, state.iteration)
  local tmp = final .. ".tmp"
  sh("rm -rf " .. quote(tmp))
  assert(sh("mkdir -p " .. quote(tmp)), "cannot create " .. tmp)
  local meta = { format = "luatron", iteration = tostring(state.iteration) }
  core.save_tensors(tmp .. "/model.safetensors", model_tensors(model), meta)
  if optimizer then
    core.save_tensors(tmp .. "/optimizer.safetensors", optimizer_tensors(model, optimizer), meta)
  end
  write_file(tmp .. "/state.json", json.encode(state))
  write_file(tmp .. "/config.json", json.encode(config_table or {}))
  sh("rm -rf " .. quote(final))
  assert(os.rename(tmp, final), "cannot move " .. tmp .. " into place")
  write_file(root .. "/latest_checkpointed_iteration.txt", tostring(state.iteration) .. "\n")
  return final
end

-- The iteration recorded in root's tracker file, or nil when root holds no checkpoint.
function M.latest_iteration(root)
  local s = read_file(root .. "/latest_checkpointed_iteration.txt")
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
      error(("%s: tensor '%s' has shape [%s], the model expects [%s]"):format(file, name, b, a), 0)
    end
  end
end

local function copy_all(dst_tensors, loaded)
  for name, dst in pairs(dst_tensors) do dst:copy(loaded[name]) end
end

-- Loads the latest checkpoint of root into model (and optimizer). Returns the saved state
-- table, or nil when root has none. Everything is read and checked before the model changes,
-- so a corrupt checkpoint raises a clear error and leaves the model as it was.
function M.load(root, model, optimizer)
  local iteration = M.latest_iteration(root)
  if not iteration then return nil end
  local dir = iter_dir(root, iteration)
  local state_text = read_file(dir .. "/state.json")
  if not state_text then error(("checkpoint %s has no state.json"):format(dir), 0) end
  local ok, state = pcall(json.decode, state_text)
  if not ok then error(("checkpoint %s/state.json is corrupt: %s"):format(dir, state), 0) end
  local weights, err = core.load_tensors(dir .. "/model.safetensors")
  if not weights then error("corrupt checkpoint: " .. err, 0) end
  local opt_state
  if optimizer then
    opt_state, err = core.load_tensors(dir .. "/optimizer.safetensors")
    if not opt_state then error("corrupt checkpoint: " .. err, 0) end
  end
  -- Check every name and shape first, then copy: a bad file changes nothing.
  local model_dst = model_tensors(model)
  check_all(model_dst, weights, dir .. "/model.safetensors")
  local opt_dst = optimizer and optimizer_tensors(model, optimizer)
  if optimizer then check_all(opt_dst, opt_state, dir .. "/optimizer.safetensors") end
  copy_all(model_dst, weights)
  if optimizer then
    copy_all(opt_dst, opt_state)
    optimizer:num_steps(state.optimizer_steps or iteration)
  end
  return state, dir
end

return M

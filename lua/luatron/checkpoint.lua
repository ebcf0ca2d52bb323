-- Checkpoints: a folder per iteration, as Megatron's iter_XXXXXXX, holding
--   model.safetensors        the parameters under Megatron's names
--   optimizer.safetensors    the optimizer state as "<state>.<param name>" (e.g. exp_avg.decoder...)
--     or optimizer_shard_<d>.safetensors, one per data-parallel rank with the distributed
--     optimizer: the parts of the parameters that rank updates, as 1-D tensors
--     "<state>.<param name>:<first element>"
--   state.json               iteration, consumed samples, optimizer steps, seed
--   config.json              the run's ConfigContainer
-- and latest_checkpointed_iteration.txt beside them. With pipeline stages each stage writes its
-- own: model_pp<k>.safetensors, optimizer_pp<k>.safetensors or optimizer_pp<k>_shard_<d>.safetensors.
-- Every file's metadata names its stage and data-parallel rank and their counts, so a reader
-- knows when one is missing.
--
-- Everything is stored under parameter names (global layer numbers) as whole tensors, so any
-- layout loads what any other saved: each rank reads the files and takes the parameters, and the
-- parts of the optimizer state, that it holds. A run resumes at another pipeline, data-parallel or
-- tensor-parallel size, with or without the distributed optimizer. Under tensor parallelism a rank
-- holds shards of the split parameters: on saving, the shards are gathered over the TP group and
-- TP rank 0 writes the whole tensors (element offsets `first` of optimizer pieces count in the
-- whole parameter); on loading, each rank copies its shard's runs (chunk:param_runs) out of them.
--
-- Under expert parallelism each rank holds its experts (named by their global number): on saving,
-- the ranks of expert-data-parallel rank 0 gather them over the EP group, and data-parallel rank 0
-- (EP rank 0) writes every expert; shards of the distributed optimizer are each rank's own (under TP
-- with whole experts, ETP = 1, a TP rank t > 0 writes its experts' in optimizer..._shard_<d>_tp<t>:
-- TP ranks hold different experts, or different shards of them).
--
-- A folder is written under a temporary name and renamed into place, and the tracker file is
-- replaced the same way, so a crash never leaves a half-written checkpoint where a reader would
-- look. In a multi-rank job, `ranks` = {rank =, barrier =, dp_rank =, dp_size =, pp_rank =,
-- pp_size =, tp =, ep =, edp_rank =} (tp: the tensor-parallel group's communicator, needed under TP;
-- ep: the expert-parallel group's, needed under EP, with this rank's expert-data-parallel rank): world rank 0
-- writes the shared files, TP rank 0 of data-parallel rank 0 of each stage its model and replicated
-- optimizer state, TP rank 0 of every data-parallel rank its optimizer shard.
local core = require "luatron.core"
local json = require "luatron.json"
local data_parallel = require "luatron.data_parallel"
local fs = require "luatron.fs"

local M = {}

local SINGLE = { rank = 0, dp_rank = 0, dp_size = 1, pp_rank = 0, pp_size = 1, barrier = function() end }

local function iter_dir(root, iteration) return ("%s/iter_%07d"):format(root, iteration) end

local function write_file(path, text)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(text)
  f:close()
  assert(os.rename(tmp, path))
end

-- A model, or an array of a rank's chunks, as an array.
local function chunk_list(model)
  return type(model) == "table" and model or { model }
end

-- A chunk's tensor-parallel rank and size (0, 1 for a model without tensor parallelism).
local function tp_of(chunk)
  if not chunk.tp then return 0, 1 end
  return chunk:tp()
end

-- Shapes and sizes of the parameters of chunks, by name, each with the chunk holding it (.chunk)
-- and whether this rank holds a shard of it (.sharded: split across TP ranks).
local function param_info(chunks)
  local info = {}
  for _, chunk in ipairs(chunks) do
    local _, tp_size = tp_of(chunk)
    for _, p in ipairs(chunk:parameters()) do
      p.chunk, p.sharded = chunk, tp_size > 1 and p.split ~= "none"
      info[p.name] = p
    end
  end
  return info
end

-- Where elements [first, first + n) of this rank's shard of parameter p lie in the whole
-- parameter: { {first = whole offset, at = offset in the range, n =}, ... } in shard order.
local function whole_ranges(p, first, n, tp_rank)
  if not p.sharded then return { { first = first, at = 0, n = n } } end
  local out = {}
  for _, run in ipairs(p.chunk:param_runs(p.name, tp_rank)) do
    local a, b = math.max(first, run["local"]), math.min(first + n, run["local"] + run.n)
    if a < b then out[#out + 1] = { first = run.full + a - run["local"], at = a - first, n = b - a } end
  end
  return out
end

-- Gathers `tensor` (elements [first, first + numel) of every TP rank's shard of parameter p, the
-- same range on every rank) over the TP group. On TP rank 0 returns the whole-parameter ranges
-- they fill, sorted and joined where contiguous: { {first =, tensor = 1-D host tensor}, ... }; nil
-- on the other ranks. A collective: every TP rank calls it for the same tensors in the same order.
local function gather_ranges(p, first, tensor, tp)
  local n, size = tensor:numel(), tp:size()
  local send = tensor:to_host():reshape({ n })
  local recv = core.tensor.zeros({ size * n }, send:dtype())
  tp:all_gather(send, recv)
  if tp:rank() ~= 0 then return nil end
  local segs = {}
  for r = 0, size - 1 do
    for _, w in ipairs(whole_ranges(p, first, n, r)) do
      segs[#segs + 1] = { first = w.first, n = w.n, src = recv:narrow(1, r * n + w.at + 1, w.n) }
    end
  end
  table.sort(segs, function(x, y) return x.first < y.first end)
  local out, i = {}, 1
  while i <= #segs do
    local j, len = i, segs[i].n
    while j < #segs and segs[j + 1].first == segs[i].first + len do
      j = j + 1
      len = len + segs[j].n
    end
    local t, at = core.tensor.zeros({ len }, send:dtype()), 0
    for k = i, j do
      t:narrow(1, at + 1, segs[k].n):copy(segs[k].src)
      at = at + segs[k].n
    end
    out[#out + 1] = { first = segs[i].first, tensor = t }
    i = j + 1
  end
  return out
end

-- Parameter p's whole tensor in its full shape from this rank's shard `tensor` (of p or of an
-- optimizer state of p): the shard itself unless p is split; else gathered over tp, on TP rank 0
-- only (nil elsewhere). A collective for split parameters, as gather_ranges.
local function whole_tensor(p, tensor, tp)
  if not p.sharded then return tensor:reshape(p.full_shape) end
  local ranges = gather_ranges(p, 0, tensor, tp)
  if not ranges then return nil end
  assert(#ranges == 1 and ranges[1].tensor:numel() == p.full_numel, "TP shards do not tile " .. p.name)
  return ranges[1].tensor:reshape(p.full_shape)
end

-- A parameter name with its expert number replaced by e (Megatron's two namings: ...local_experts.<e>.
-- and the grouped experts' ...weight<e> / bias<e>).
local function renumbered(name, e)
  local s, n = name:gsub("local_experts%.%d+%.", "local_experts." .. e .. ".", 1)
  if n == 0 then s = name:gsub("(%a)%d+$", "%1" .. e) end
  return s
end

-- The same expert parameter under Megatron's other naming, or nil: SequentialMLP's
-- ...experts.local_experts.<e>.linear_fc1.weight and the grouped experts' ...experts.linear_fc1.weight<e>
-- (a checkpoint of either resumes with or without moe_grouped_gemm, as Megatron's do).
local function other_naming(name)
  local head, e, tail = name:match("^(.*%.experts%.)local_experts%.(%d+)%.(.+)$")
  if head then return head .. tail .. e end
  head, tail, e = name:match("^(.*%.experts%.)(linear_fc%d%.%a+)(%d+)$")
  if head then return head .. "local_experts." .. e .. "." .. tail end
end

-- t[key(name)], else t[key(name under the other expert naming)]; with the key found.
local function stored(t, name, key)
  key = key or function(n) return n end
  if t[key(name)] ~= nil then return t[key(name)], key(name) end
  local other = other_naming(name)
  if other and t[key(other)] ~= nil then return t[key(other)], key(other) end
end

-- Experts per EP rank: how many a chunk holds (the same in every MoE layer).
local function local_experts(chunk)
  local lo, hi = math.huge, -1
  for _, p in ipairs(chunk:parameters()) do
    if p.expert then lo, hi = math.min(lo, p.expert), math.max(hi, p.expert) end
  end
  return hi - lo + 1
end

-- Stores tensor t (of expert parameter p, or of its optimizer state) under `key(name)` into out, for
-- every EP rank's expert in p's place: gathered over ep, the tensors land on EP rank 0 (a collective:
-- every rank of the group calls it for the same parameters in the same order). Without ep, just t.
-- t is nil on TP ranks but 0 for experts split over TP: the ranks of their EP group (which share the
-- TP rank) have nothing to store.
local function put_expert(out, key, p, t, ep, El)
  if not ep or not t then
    out[key(p.name)] = t
    return
  end
  local n = t:numel()
  local send = t:to_host():reshape({ n })
  local recv = core.tensor.zeros({ ep:size() * n }, send:dtype())
  ep:all_gather(send, recv)
  if ep:rank() ~= 0 then return end
  local j = p.expert % El
  for r = 0, ep:size() - 1 do
    out[key(renumbered(p.name, r * El + j))] = recv:narrow(1, r * n + 1, n):reshape(t:shape())
  end
end

local function same(name) return name end

-- The whole parameters of chunks by name (on TP rank 0, and with ep on EP rank 0; a collective under
-- TP and EP, in model order), and the routers' expert biases (the same on every rank).
local function model_tensors(chunks, tp, ep)
  local t = {}
  for _, chunk in ipairs(chunks) do
    local info, El = param_info({ chunk }), local_experts(chunk)
    for _, p in ipairs(chunk:parameters()) do
      local whole = whole_tensor(info[p.name], chunk:param(p.name), tp)
      if p.expert then put_expert(t, same, p, whole, ep, El) else t[p.name] = whole end
    end
    for _, b in ipairs(chunk:expert_biases()) do t[b.name] = b.bias end
  end
  return t
end

-- The optimizer state as pieces of named parameters (luatron.data_parallel) and whether they are
-- this rank's shard only: a data_parallel optimizer's, or a plain core optimizer's over a model.
local function state_pieces(chunks, optimizer)
  if optimizer.state_pieces then return optimizer:state_pieces() end
  return data_parallel.replicated_pieces(chunks[1], optimizer), false
end

-- The tensors a file stores for pieces: whole parameters under "<state>.<param>" in their shape,
-- parts as 1-D "<state>.<param>:<first>", first counting in the whole parameter. Under tensor
-- parallelism the pieces of split parameters are gathered over tp (in the pieces' order, which is
-- the same on every TP rank: they have one flat layout) and TP rank 0 gets the tensors; whole
-- experts' likewise over ep (the distributed optimizer's shards are each rank's own).
local function piece_tensors(chunks, pieces, sharded, tp, ep)
  local info, t = param_info(chunks), {}
  local El = local_experts(chunks[1])
  for _, piece in ipairs(pieces) do
    local key, p = piece.state .. "." .. piece.param, info[piece.param]
    if not sharded and p.expert then
      put_expert(t, function(name) return piece.state .. "." .. name end, p, whole_tensor(p, piece.tensor, tp), ep, El)
    elseif not sharded then
      t[key] = whole_tensor(p, piece.tensor, tp)
    elseif not p.sharded then
      t[("%s:%d"):format(key, piece.first)] = piece.tensor
    else
      for _, range in ipairs(gather_ranges(p, piece.first, piece.tensor, tp) or {}) do
        t[("%s:%d"):format(key, range.first)] = range.tensor
      end
    end
  end
  return t
end

-- File names: kind "model" or "optimizer"; pp_rank nil without pipeline stages, dp_rank nil
-- unless sharded; tp_rank only for the experts' shards of TP ranks but 0.
local function file_name(kind, pp_rank, dp_rank, tp_rank)
  return kind .. (pp_rank and ("_pp%d"):format(pp_rank) or "") .. (dp_rank and ("_shard_%d"):format(dp_rank) or "")
    .. (tp_rank and ("_tp%d"):format(tp_rank) or "") .. ".safetensors"
end

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

-- Saves iteration state.iteration under root; returns the folder. `model` is a model or this
-- rank's chunks; `optimizer` a data_parallel optimizer (anything with :state_pieces()) or a core
-- optimizer, or nil to save the model only (CheckpointConfig.save_optim = false).
function M.save(root, model, optimizer, state, config_table, ranks)
  ranks = ranks or SINGLE
  local chunks = chunk_list(model)
  local final = iter_dir(root, state.iteration)
  local tmp = final .. ".tmp"
  if ranks.rank == 0 then
    os.execute("rm -rf " .. fs.quote(tmp) .. " && mkdir -p " .. fs.quote(tmp))
  end
  ranks.barrier()
  local pp_size = ranks.pp_size or 1
  local stage = pp_size > 1 and ranks.pp_rank or nil
  local meta = { format = "luatron", iteration = tostring(state.iteration), pp_rank = tostring(ranks.pp_rank or 0),
    pp_size = tostring(pp_size), dp_rank = tostring(ranks.dp_rank), dp_size = tostring(ranks.dp_size) }
  -- Under TP every TP rank of a (stage, data-parallel rank) gathers, in the same order, and TP rank 0
  -- writes; the ranks of a TP group share their stage and data-parallel rank, so all or none gather.
  local _, tp_size = tp_of(chunks[1])
  local tp = tp_size > 1 and ranks.tp or nil
  if tp_size > 1 and not (tp and tp:size() == tp_size) then
    error(("saving a model split over %d tensor-parallel ranks needs ranks.tp, their communicator"):format(tp_size), 0)
  end
  local writes = (tp and tp:rank() or 0) == 0
  local function save(name, tensors)
    if writes then core.save_tensors(tmp .. "/" .. name, tensors, meta) end
  end
  -- Under EP the ranks of expert-data-parallel rank 0 gather the experts for data-parallel rank 0.
  local ep = ranks.ep and ranks.ep:size() > 1 and ranks.ep or nil
  local gathers = ranks.dp_rank == 0 or (ep and ranks.edp_rank == 0)
  local function save_whole(name, tensors)
    if ranks.dp_rank == 0 then save(name, tensors) end
  end
  if optimizer then
    local pieces, sharded = state_pieces(chunks, optimizer)
    if sharded then
      save(file_name("optimizer", stage, ranks.dp_rank), piece_tensors(chunks, pieces, true, tp))
      if tp and tp:rank() > 0 then
        local info, experts = param_info(chunks), {}
        for _, piece in ipairs(pieces) do
          local p = info[piece.param] -- (experts split over TP are gathered with the other split parameters)
          if p.expert and not p.sharded then experts[#experts + 1] = piece end
        end
        if #experts > 0 then
          core.save_tensors(tmp .. "/" .. file_name("optimizer", stage, ranks.dp_rank, tp:rank()),
            piece_tensors(chunks, experts, true), meta)
        end
      end
    elseif gathers then
      save_whole(file_name("optimizer", stage), piece_tensors(chunks, pieces, false, tp, ep))
    end
  end
  if gathers then save_whole(file_name("model", stage), model_tensors(chunks, tp, ep)) end
  if ranks.rank == 0 then
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

local function load_file(path)
  local t, meta_or_err = core.load_tensors(path)
  if not t then error("corrupt checkpoint: " .. meta_or_err, 0) end
  return t, meta_or_err
end

-- A loader that reads each file once however often it is asked for (a load looks at the first
-- file of a kind for its counts, then reads them all).
local function file_reader()
  local read = {}
  return function(path)
    if not read[path] then read[path] = { load_file(path) } end
    return table.unpack(read[path])
  end
end

-- The files of one kind ("model", "optimizer") in dir, all of them, in stage order: the single
-- file, or one per stage (and per data-parallel rank for shards) as the first one's metadata
-- counts them. nil when dir holds none of that kind. read: a file_reader.
local function kind_files(dir, kind, read)
  local first
  for _, name in ipairs { file_name(kind), file_name(kind, 0), file_name(kind, nil, 0), file_name(kind, 0, 0) } do
    if fs.exists(dir .. "/" .. name) then
      first = name
      break
    end
  end
  if not first then return nil end
  local _, meta = read(dir .. "/" .. first)
  local pp = first:find("_pp", 1, true) and tonumber(meta.pp_size) or nil
  local dp = first:find("_shard_", 1, true) and tonumber(meta.dp_size) or nil
  local files = {}
  for k = 0, (pp or 1) - 1 do
    for d = 0, (dp or 1) - 1 do
      local name = file_name(kind, pp and k, dp and d)
      if not fs.exists(dir .. "/" .. name) then
        error(("checkpoint %s lacks %s (it was saved by %d pipeline stage(s) and %d data-parallel rank(s))"):format(dir,
          name, pp or 1, dp or 1), 0)
      end
      files[#files + 1] = dir .. "/" .. name
      -- the experts' shards of the other TP ranks
      local t = 1
      while dp and fs.exists(dir .. "/" .. file_name(kind, pp and k, d, t)) do
        files[#files + 1] = dir .. "/" .. file_name(kind, pp and k, d, t)
        t = t + 1
      end
    end
  end
  return files
end

-- Every parameter the model files of dir hold, by name (a tied embedding's copies are equal).
local function read_model(dir, read)
  local files = kind_files(dir, "model", read)
  if not files then error(("checkpoint %s has no model.safetensors"):format(dir), 0) end
  local weights, where = {}, {}
  for _, file in ipairs(files) do
    for name, t in pairs((read(file))) do
      if not weights[name] then weights[name], where[name] = t, file end
    end
  end
  return weights, where
end

-- What the optimizer files hold: { ["<state>.<param>"] = { {first =, tensor = 1-D, file =}, ... } },
-- each element once. A tied embedding is stored by the first and the last stage, whose copies are
-- equal but, under the distributed optimizer, cut into different pieces (the stages' buckets
-- differ): each state is taken from the files of the first stage that stores it.
local function read_optimizer(files, read)
  local index, stage = {}, {}
  for _, file in ipairs(files) do
    local tensors, meta = read(file)
    for name, t in pairs(tensors) do
      local key, first = name:match("^(.-):(%d+)$")
      key, first = key or name, tonumber(first) or 0
      stage[key] = stage[key] or meta.pp_rank
      if stage[key] == meta.pp_rank then
        index[key] = index[key] or {}
        table.insert(index[key], { first = first, tensor = t:reshape({ t:numel() }), file = file })
      end
    end
  end
  return index
end

-- The copies that fill every parameter of chunks from the stored weights, checked first: every
-- parameter must be there with its whole shape. A rank holding a shard takes its runs. The routers'
-- expert biases come back too ({ set = fn } entries).
local function plan_model_copies(chunks, weights, where, dir)
  local copies = {}
  for _, chunk in ipairs(chunks) do
    local info = param_info({ chunk })
    for _, p in ipairs(chunk:parameters()) do
      local name = p.name
      local src, found = stored(weights, name)
      if not src then error(("checkpoint %s: missing tensor '%s'"):format(dir, name), 0) end
      local a, b = table.concat(p.full_shape, "x"), table.concat(src:shape(), "x")
      if a ~= b then
        error(("%s: tensor '%s' has shape [%s], this run expects [%s]"):format(where[found], found, b, a), 0)
      end
      if info[name].sharded then
        -- gathered into a host shard first: one transfer to the device instead of one per run
        local flat, shard = src:reshape({ p.full_numel }), core.tensor.zeros({ p.numel }, src:dtype())
        for _, w in ipairs(whole_ranges(info[name], 0, p.numel)) do
          shard:narrow(1, w.at + 1, w.n):copy(flat:narrow(1, w.first + 1, w.n))
        end
        src = shard
      end
      copies[#copies + 1] = { chunk:param(name), src }
    end
    for k, b in ipairs(chunk:expert_biases()) do
      local src = weights[b.name]
      if not src then error(("checkpoint %s: missing tensor '%s'"):format(dir, b.name), 0) end
      if src:numel() ~= b.bias:numel() then
        error(("%s: tensor '%s' has %d values, this run expects %d"):format(where[b.name], b.name, src:numel(),
          b.bias:numel()), 0)
      end
      copies[#copies + 1] = { set = function() chunk:set_expert_bias(k, src) end }
    end
  end
  return copies
end

-- The copies that fill every destination piece from the stored pieces it overlaps, checked
-- before anything is copied: each element of the destination must be stored, inside its parameter.
-- Stored pieces count in whole-parameter elements; a destination in a TP shard maps to the runs it
-- covers there, each filled in turn (through a host buffer when there are several, so the device
-- gets one transfer).
local function plan_optimizer_copies(chunks, pieces, index, dir)
  local info = param_info(chunks)
  local copies = {}
  for _, dst in ipairs(pieces) do
    local key, n, p = dst.state .. "." .. dst.param, dst.tensor:numel(), info[dst.param]
    local pieces_of = stored(index, dst.param, function(name) return dst.state .. "." .. name end)
    if not pieces_of then error(("checkpoint %s: missing optimizer state '%s'"):format(dir, key), 0) end
    local ranges = whole_ranges(p, dst.first, n)
    local staged = #ranges > 1
    local buffer = staged and core.tensor.zeros({ n }, dst.tensor:dtype()) or dst.tensor
    local covered = 0
    for _, src in ipairs(pieces_of) do
      local last = src.first + src.tensor:numel()
      if last > p.full_numel then
        error(("%s: optimizer state '%s' holds elements up to %d, but this run's %s has %d"):format(src.file, key,
          last, dst.param, p.full_numel), 0)
      end
      for _, w in ipairs(ranges) do
        local a, b = math.max(w.first, src.first), math.min(w.first + w.n, last)
        if a < b then
          copies[#copies + 1] = { buffer:narrow(1, w.at + a - w.first + 1, b - a),
            src.tensor:narrow(1, a - src.first + 1, b - a) }
          covered = covered + b - a
        end
      end
    end
    if covered ~= n then
      error(("checkpoint %s: optimizer state '%s' covers %d of the %d elements this rank needs"):format(dir, key,
        covered, n), 0)
    end
    if staged then copies[#copies + 1] = { dst.tensor, buffer } end
  end
  return copies
end

-- A saved run's model on one rank, whatever layout trained it (checkpoints are layout-free): the
-- model of iteration `step` (nil: the latest) built from its config.json with every parallel size 1 (on
-- `device` when given) and loaded. Returns the model, its provider, the run's config table and the folder.
function M.open_model(root, step, device)
  local config = require "luatron.config" -- (not at the top: luatron.config's modules load this one)
  local model_lib = require "luatron.model"
  local iteration = step or M.latest_iteration(root)
  if not iteration then error(("%s holds no checkpoint (no latest_checkpointed_iteration.txt)"):format(root), 0) end
  local dir = iter_dir(root, iteration)
  local text = fs.read(dir .. "/config.json")
  if not text then error(("%s has no config.json (the run's config, which says what model it holds)"):format(dir), 0) end
  local ok, cfg = pcall(json.decode, text)
  if not ok then error(("%s/config.json is corrupt: %s"):format(dir, cfg), 0) end
  if type(cfg.model) ~= "table" then error(("%s/config.json has no model"):format(dir), 0) end
  local fields = {}
  for k, v in pairs(cfg.model) do if v ~= json.null then fields[k] = v end end
  for _, k in ipairs { "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size" } do
    fields[k] = 1
  end
  fields.virtual_pipeline_model_parallel_size, fields.expert_tensor_parallel_size = nil, nil
  fields.sequence_parallel = false
  if device then fields.device = device end
  local provider = config.GPTModelProvider(fields)
  local model = model_lib.build(provider, type(cfg.rng) == "table" and cfg.rng.seed or nil)
  M.load(root, model, nil, { iteration = iteration, load_optim = false })
  return model, provider, cfg, dir
end

-- Fills every parameter of model (a model or this rank's chunks) from weights, {name = whole tensor in
-- Megatron's layout} (where[name]: the file it came from, for messages), each rank taking its shard;
-- everything is checked before anything is copied. The Hugging Face bridge loads through it.
function M.load_weights(model, weights, where, source)
  for _, c in ipairs(plan_model_copies(chunk_list(model), weights, where, source)) do
    if c.set then c.set() else c[1]:copy(c[2]) end
  end
end

-- Loads the latest checkpoint of root (or opts.iteration's) into model (a model or this rank's
-- chunks), and into optimizer unless opts.load_optim == false (a data_parallel optimizer's main
-- weights then follow the loaded model), whatever layout saved it. Returns the saved state table
-- and the folder, or nil when root has none. Everything is read and checked before anything
-- changes, so a corrupt checkpoint raises a clear error and leaves the run as it was.
function M.load(root, model, optimizer, opts)
  opts = opts or {}
  local chunks = chunk_list(model)
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
  local read = file_reader()
  local weights, where = read_model(dir, read)
  local copies = plan_model_copies(chunks, weights, where, dir)
  local load_optim = optimizer and opts.load_optim ~= false
  if load_optim then
    local files = kind_files(dir, "optimizer", read)
    if not files then
      error(("checkpoint %s holds no optimizer state (saved with checkpoint.save_optim = false): set "
        .. "checkpoint.load_optim = false or checkpoint.finetune = true to load the model only"):format(dir), 0)
    end
    local index = read_optimizer(files, read)
    for _, c in ipairs(plan_optimizer_copies(chunks, state_pieces(chunks, optimizer), index, dir)) do
      copies[#copies + 1] = c
    end
  end
  for _, c in ipairs(copies) do
    if c.set then c.set() else c[1]:copy(c[2]) end
  end
  if load_optim then optimizer:num_steps(state.optimizer_steps or iteration) end
  if optimizer and optimizer.after_load then optimizer:after_load() end
  return state, dir
end

return M

-- luatron.config.moe: Megatron Bridge's MoE helpers, which edit a GPTModelProvider in place with
-- Bridge's semantics and messages (MB src/megatron/bridge/training/utils/moe_token_drop.py,
-- training/flex_dispatcher_backend.py and the older training/deepep.py). Exported as
-- lt.apply_moe_token_drop, lt.apply_flex_dispatcher_backend and lt.apply_deepep.
--
-- Each returns the provider and the warning it logged (nil when none). Like Bridge they warn
-- rather than fail when a helper does not apply (a dense model, an unknown backend); the warning is
-- printed as the run's warnings are ("warning: ..." on stdout), on rank 0 only as Bridge does.
local util = require "luatron.config.util"
local schema = require "luatron.config.schema"
util.register_source()
local fmt = util.fmt

local M = {}

local PROVIDER = schema.classes.GPTModelProvider

-- Bridge's get_rank_safe: the launcher's rank, 0 in a single process. The launchers luatron runs
-- under (luatron launch, PMIx) set it before the recipe runs, so no communicator is needed.
local function rank()
  return tonumber(os.getenv("LUATRON_RANK") or os.getenv("PMIX_RANK") or "0") or 0
end

local function warn(msg)
  if rank() == 0 then
    io.stdout:write("warning: ", msg, "\n")
    io.stdout:flush()
  end
  return msg
end

local function check_provider(fname, p)
  local mt = type(p) == "table" and getmetatable(p)
  if not (type(mt) == "table" and rawget(mt, "__luatron_class") == "GPTModelProvider") then
    util.fail("%s: expected a GPTModelProvider, got %s", fname, fmt(p))
  end
end

-- A public entry point: config errors are raised at the recipe's line (util.raise).
local function entry(f)
  return function(...)
    local res = table.pack(pcall(f, ...))
    if not res[1] then util.raise(res[2]) end
    return table.unpack(res, 2, res.n)
  end
end

-- Bridge's list, narrower than Megatron-Core's (which also admits global_aux_loss).
local TOKEN_DROP_BALANCING = { seq_aux_loss = true, aux_loss = true, none = true }

--- apply_moe_token_drop(provider [, moe_expert_capacity_factor = 1.0 [, moe_pad_expert_input_to_capacity = true]])
--- Token dropping at the given capacity factor (a factor < 0 means none: no dropping). A dense
--- provider (num_moe_experts not set) is left as it is, with a warning. Needs the alltoall
--- dispatcher and aux_loss, seq_aux_loss or none load balancing; padding needs a capacity factor.
--- Sets moe_expert_capacity_factor and moe_pad_expert_input_to_capacity, nothing else.
M.apply_moe_token_drop = entry(function(p, cf, pad)
  check_provider("apply_moe_token_drop", p)
  if cf == nil then cf = 1.0 end
  if pad == nil then pad = true end
  util.with_prefix("apply_moe_token_drop: ", function()
    schema.check_field(PROVIDER.name, PROVIDER.index.moe_expert_capacity_factor, cf)
    schema.check_field(PROVIDER.name, PROVIDER.index.moe_pad_expert_input_to_capacity, pad)
  end)
  if p.num_moe_experts == nil then
    return p, warn("MoE token drop is only applicable to MoE models. Model config does not use MoE "
      .. "(num_moe_experts is not set or is 0). Skipping MoE token drop configuration.")
  end
  if cf < 0 then cf = nil end
  -- Bridge also admits alltoall_seq, a dispatcher Megatron-Core has since removed (and luatron's schema lacks).
  if p.moe_token_dispatcher_type ~= "alltoall" then
    util.fail("apply_moe_token_drop: moe_token_dispatcher_type = %s: moe_expert_capacity_factor only works with "
      .. "alltoall token dispatcher. Set moe_token_dispatcher_type = 'alltoall' first",
      fmt(p.moe_token_dispatcher_type))
  end
  if not TOKEN_DROP_BALANCING[p.moe_router_load_balancing_type] then
    util.fail("apply_moe_token_drop: moe_router_load_balancing_type = %s: moe_expert_capacity_factor only works "
      .. "with aux_loss or none load balancing. Set it to 'aux_loss', 'seq_aux_loss' or 'none'",
      fmt(p.moe_router_load_balancing_type))
  end
  if pad and cf == nil then
    util.fail("apply_moe_token_drop: moe_expert_capacity_factor must be set to use moe_pad_expert_input_to_capacity "
      .. "(a factor < 0 means none). Give a factor >= 0 or moe_pad_expert_input_to_capacity = false")
  end
  p.moe_expert_capacity_factor = cf
  p.moe_pad_expert_input_to_capacity = pad
  return p, nil
end)

local BACKENDS = { deepep = "DeepEP", hybridep = "HybridEP" }

-- Bridge sets moe_token_dispatcher_type = "flex", the backend and moe_shared_expert_overlap = false,
-- on GPUs the backend's kernels support, else falls back to alltoall. luatron has no DeepEP or
-- HybridEP kernels (the schema refuses moe_flex_dispatcher_backend and moe_enable_deepep): its flex
-- dispatcher is its own fused permute and all-to-all, on any device. So the two fields luatron has
-- are set, the backend is not, there is no GPU check to fall back on, and the warning says so.
local function flex(fname, p, backend, not_moe)
  check_provider(fname, p)
  if p.num_moe_experts == nil then return p, warn(not_moe) end
  if not BACKENDS[backend] then
    return p, warn(("Not a valid flex dispatcher backend. Skipping flex dispatcher backend configuration. "
      .. "Got %s: use 'deepep' or 'hybridep'"):format(fmt(backend)))
  end
  p.moe_token_dispatcher_type = "flex"
  p.moe_shared_expert_overlap = false
  return p, warn(("%s: set moe_token_dispatcher_type = 'flex' and moe_shared_expert_overlap = false, but not "
    .. "moe_flex_dispatcher_backend = %s: %s in luatron, so no %s kernels run; its flex dispatcher is its own "
    .. "fused permute and all-to-all on any device (no GPU check, no fallback to alltoall)"):format(fname,
    fmt(backend), PROVIDER.unsupported.moe_flex_dispatcher_backend, BACKENDS[backend]))
end

--- apply_flex_dispatcher_backend(provider, backend): backend "deepep" or "hybridep". See flex above:
--- sets moe_token_dispatcher_type = "flex" and moe_shared_expert_overlap = false and warns that the
--- backend itself is not available. A dense provider or another backend: a warning, no change.
M.apply_flex_dispatcher_backend = entry(function(p, backend)
  return flex("apply_flex_dispatcher_backend", p, backend, "DeepEP and HybridEP are only applicable to MoE models. "
    .. "Model config does not use MoE (num_moe_experts is not set or is 0). Skipping DeepEP configuration.")
end)

--- apply_deepep(provider): Bridge's older name for apply_flex_dispatcher_backend(provider, "deepep"),
--- with its own message for a dense provider.
M.apply_deepep = entry(function(p)
  return flex("apply_deepep", p, "deepep", "DeepEP is only applicable to MoE models. "
    .. "Model config does not use MoE (num_moe_experts is not set or is 0). Skipping DeepEP configuration.")
end)

return M

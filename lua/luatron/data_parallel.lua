-- Data parallelism over the dp-cp group, as Megatron's DDP and distributed optimizer:
--   DDP:                   gradients averaged with all-reduce in buckets of ddp.bucket_size
--                          elements, then every rank runs the same optimizer step. With
--                          ddp.overlap_grad_reduce the buckets are reduced on the communicator's
--                          thread while the last microbatch's backward still runs.
--   distributed optimizer: gradients reduce-scattered, each rank updates only its shard of the
--                          fp32 main parameters with its shard of the Adam moments, then the
--                          parameters are all-gathered.
-- Both present one interface to the training loop: opt:step(lr) → grad norm before clipping.
local core = require "luatron.core"

local M = {}

local function ceil_div(a, b) return (a + b - 1) // b end

local function fp32_bytes(n) return 4 * n end

-- The part of each parameter that falls in [lo, hi) of the flat buffer, as optimizer segments
-- with offsets relative to lo.
local function shard_segments(model, lo, hi)
  local segs = {}
  for _, p in ipairs(model:parameters()) do
    local a, b = math.max(p.offset, lo), math.min(p.offset + p.numel, hi)
    if a < b then segs[#segs + 1] = { offset = a - lo, numel = b - a, no_weight_decay = p.no_weight_decay } end
  end
  return segs
end

local Replicated = {}
Replicated.__index = Replicated

local Sharded = {}
Sharded.__index = Sharded

-- model, r (resolved config), group (the dp-cp communicator or nil for one rank).
function M.new(model, r, group)
  local dp = group and group:size() or 1
  local self = { model = model, r = r, group = group, dp = dp, numel = model:flat_weights():numel() }
  if r.ddp.use_distributed_optimizer or r.optimizer.use_distributed_optimizer then
    setmetatable(self, Sharded)
    local shard = ceil_div(self.numel, dp)
    local rank = group and group:rank() or 0
    self.shard, self.lo = shard, rank * shard
    self.padded_grads = core.tensor.zeros { shard * dp }
    self.padded_weights = core.tensor.zeros { shard * dp }
    self.shard_grads = core.tensor.zeros { shard }
    self.main = core.tensor.zeros { shard } -- fp32 main parameters of this shard
    local hi = math.min(self.lo + shard, self.numel)
    if hi > self.lo then self.main:narrow(1, 1, hi - self.lo):copy(model:flat_weights():narrow(1, self.lo + 1, hi - self.lo)) end
    self.opt = core.optimizer_over(r.optimizer, self.main, self.shard_grads, shard_segments(model, self.lo, hi))
  else
    setmetatable(self, Replicated)
    self.opt = core.optimizer(model, r.optimizer)
    self.bucket = r.ddp.bucket_size or self.numel
    if r.ddp.overlap_grad_reduce and dp > 1 then self.ddp = core.ddp(model, group, self.bucket) end
  end
  return self
end

-- Bytes each scheme moves per step by the ring formulas, for the report: the gradient
-- reduction (all-reduce: 2(D-1)/D of the buffer; reduce-scatter + all-gather: (D-1)/D each) and the
-- scalar all-reduces of the step (the loss, and the distributed optimizer's gradient norm).
function M.expected_bytes(self)
  local d = self.dp
  if d == 1 then return 0 end
  local scalar = 2 * (d - 1) / d * 4
  if getmetatable(self) == Sharded then
    return 2 * (d - 1) / d * fp32_bytes(self.shard * d) + 2 * scalar
  end
  return 2 * (d - 1) / d * fp32_bytes(self.numel) + scalar
end

-- Memory per rank, bytes: parameters, gradients, optimizer state (what the formulas predict).
function M.memory(self)
  local n = self.numel
  local states = #self.opt:state_names()
  if getmetatable(self) == Sharded then
    return { params = fp32_bytes(n), grads = fp32_bytes(n), optimizer = fp32_bytes(self.shard * (states + 1)),
      formula = fp32_bytes(n * (states + 1)) / self.dp, sharded = true }
  end
  return { params = fp32_bytes(n), grads = fp32_bytes(n), optimizer = fp32_bytes(n * states),
    formula = fp32_bytes(n * states), sharded = false }
end

-- Global-norm clipping coefficient as Megatron: max_norm / (norm + 1e-6), only when below 1.
local function clip_coeff(norm, max_norm)
  if max_norm and max_norm > 0 and norm == norm and norm < math.huge then
    local c = max_norm / (norm + 1e-6)
    if c < 1 then return c end
  end
  return nil
end

-- Called before the backward of the step's last microbatch (the earlier ones only accumulate,
-- like Megatron's no_sync): from here on finished buckets start reducing.
function Replicated:before_last_backward()
  if self.ddp then self.ddp:begin() end
end

function Replicated:step(lr)
  local grads = self.model:flat_grads()
  if self.ddp then
    self.exposed_seconds = self.ddp:finish()
  elseif self.group and self.dp > 1 then
    for first = 0, self.numel - 1, self.bucket do
      local n = math.min(self.bucket, self.numel - first)
      self.group:all_reduce(grads:narrow(1, first + 1, n), "avg")
    end
  end
  local norm = core.clip_grad_norm(grads, self.r.optimizer.clip_grad or 0)
  self.last_norm = norm
  return norm
end

function Replicated:apply(lr) self.opt:step(lr) end

function Sharded:step(lr)
  local n = self.numel
  self.padded_grads:narrow(1, 1, n):copy(self.model:flat_grads())
  if self.group and self.dp > 1 then
    self.group:reduce_scatter(self.padded_grads, self.shard_grads, "avg")
  else
    self.shard_grads:copy(self.padded_grads)
  end
  local sumsq = core.tensor.from({ self.shard_grads:norm() ^ 2 }, "float32")
  if self.group and self.dp > 1 then self.group:all_reduce(sumsq, "sum") end
  local norm = math.sqrt(sumsq:item())
  local c = clip_coeff(norm, self.r.optimizer.clip_grad)
  if c then self.shard_grads:scale(c) end
  self.last_norm = norm
  return norm
end

function Sharded:apply(lr)
  self.opt:step(lr)
  local n = self.numel
  if self.group and self.dp > 1 then
    self.group:all_gather(self.main, self.padded_weights)
  else
    self.padded_weights:copy(self.main)
  end
  self.model:flat_weights():copy(self.padded_weights:narrow(1, 1, n))
end

-- Optimizer state for checkpoints: {name = tensor} and whether it is this rank's shard only.
function Replicated:state_tensors()
  local t = {}
  for _, state in ipairs(self.opt:state_names()) do
    local flat = self.opt:state(state)
    for _, p in ipairs(self.model:parameters()) do
      t[state .. "." .. p.name] = flat:narrow(1, p.offset + 1, p.numel):reshape(p.shape)
    end
  end
  return t, false
end

function Sharded:state_tensors()
  local t = {}
  for _, state in ipairs(self.opt:state_names()) do t[state] = self.opt:state(state) end
  return t, true
end

function Replicated:after_load() end

-- After a checkpoint restored the weights: the main parameters follow them.
function Sharded:after_load()
  local hi = math.min(self.lo + self.shard, self.numel)
  if hi > self.lo then
    self.main:narrow(1, 1, hi - self.lo):copy(self.model:flat_weights():narrow(1, self.lo + 1, hi - self.lo))
  end
end

function Sharded:before_last_backward() end

for _, cls in ipairs { Replicated, Sharded } do
  cls.expected_bytes = M.expected_bytes
  cls.memory = M.memory
  cls.num_steps = function(self, n) return self.opt:num_steps(n) end
end

return M

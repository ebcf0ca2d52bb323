-- Data parallelism over the dp-cp group, as Megatron's DDP and distributed optimizer:
--   DDP:                   gradients averaged with all-reduce in buckets of ddp.bucket_size
--                          elements, then every rank runs the same optimizer step.
--   distributed optimizer: every bucket sharded over the ranks: gradients reduce-scattered, each
--                          rank updates its shard of the fp32 main parameters with its shard of
--                          the Adam moments, then the parameters are all-gathered.
-- The buckets live in C (engine/parallel/ddp.c). With ddp.overlap_grad_reduce their reduction
-- starts during the last microbatch's backward; with overlap_param_gather the next forward waits
-- for each bucket's parameters only when it reaches them. Both schemes present one interface to
-- the training loop: before_last_backward(), step(lr) → grad norm before clipping, apply(lr).
local core = require "luatron.core"

local M = {}

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
  -- The buffers' communicator: the host group on the CPU; on a GPU an NCCL communicator over the
  -- same ranks (self.device_comm), while the host group keeps the scalars (loss, gradient norm).
  local comm = group
  local device_comm
  if dp > 1 and r.model.device ~= "cpu" then
    local ok, c = pcall(core.comm_nccl, group, r.model.device)
    if not ok then
      error(("data parallelism over %d ranks on device %q needs NCCL: %s"):format(dp, r.model.device, c), 0)
    end
    comm, device_comm = c, c
  end
  local self = { model = model, r = r, group = group, dp = dp, numel = model:flat_weights():numel(),
    device_comm = device_comm }
  if r.ddp.use_distributed_optimizer or r.optimizer.use_distributed_optimizer then
    assert(group, "the distributed optimizer needs a data-parallel communicator")
    setmetatable(self, Sharded)
    self.ddp = core.ddp(model, comm, r.ddp.bucket_size or 0, true)
    self.main = self.ddp:main_params()
    self.main_grads = self.ddp:main_grads()
    self.shard = self.main:numel()
    self.overlap_grads = r.ddp.overlap_grad_reduce
    self.overlap_params = r.ddp.overlap_param_gather or r.optimizer.overlap_param_gather
    local segs = {}
    for _, piece in ipairs(self.ddp:pieces()) do
      for _, seg in ipairs(shard_segments(model, piece.flat_first, piece.flat_first + piece.count)) do
        seg.offset = seg.offset + piece.main_offset
        segs[#segs + 1] = seg
      end
    end
    self.opt = core.optimizer_over(r.optimizer, self.main, self.main_grads, segs)
    self.ddp:weights_to_main()
  else
    setmetatable(self, Replicated)
    self.opt = core.optimizer(model, r.optimizer)
    self.overlap_grads = r.ddp.overlap_grad_reduce
    if dp > 1 then self.ddp = core.ddp(model, comm, r.ddp.bucket_size or 0) end
  end
  return self
end

-- Bytes a step moves by the ring formulas, for the report: the gradient reduction (all-reduce:
-- 2(D-1)/D of the buffer; reduce-scatter: (D-1)/D), the previous update's parameter all-gather
-- ((D-1)/D; none before the first update) and the scalar all-reduces (the loss, and the distributed
-- optimizer's gradient norm: 2(D-1)/D of 4 bytes each).
function M.expected_bytes(self, first_step)
  local d = self.dp
  if d == 1 then return 0 end
  local scalar = 2 * (d - 1) / d * 4
  local buffer = fp32_bytes(self.numel)
  if getmetatable(self) == Sharded then
    return (first_step and 1 or 2) * (d - 1) / d * buffer + 2 * scalar
  end
  return 2 * (d - 1) / d * buffer + scalar
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
-- like Megatron's no_sync): with overlap, finished buckets start reducing from here on.
function Replicated:before_last_backward()
  if self.ddp and self.overlap_grads then self.ddp:begin() end
end

function Replicated:step(lr)
  local grads = self.model:flat_grads()
  if self.ddp then
    if not self.overlap_grads then self.ddp:begin() end
    local exposed = self.ddp:finish() -- every bucket averaged over the data-parallel ranks
    self.exposed_seconds = self.overlap_grads and exposed or nil
  end
  local norm = core.clip_grad_norm(grads, self.r.optimizer.clip_grad or 0)
  self.last_norm = norm
  return norm
end

function Replicated:apply(lr) self.opt:step(lr) end

function Sharded:before_last_backward()
  if self.overlap_grads then self.ddp:begin() end
end

function Sharded:step(lr)
  if not self.overlap_grads then self.ddp:begin() end
  self.exposed_seconds = self.ddp:finish() -- reduce-scatter of every bucket into the main gradients
  if not self.overlap_grads then self.exposed_seconds = nil end
  local sumsq = core.tensor.from({ self.main_grads:norm() ^ 2 }, "float32") -- host scalar: the host group
  if self.dp > 1 then self.group:all_reduce(sumsq, "sum") end
  local norm = math.sqrt(sumsq:item())
  local c = clip_coeff(norm, self.r.optimizer.clip_grad)
  if c then self.main_grads:scale(c) end
  self.last_norm = norm
  return norm
end

-- Updates this rank's shard, then all-gathers the parameters bucket by bucket. With
-- overlap_param_gather the next forward waits for each bucket only when it reaches its layers.
function Sharded:apply(lr)
  self.opt:step(lr)
  self.ddp:gather_params()
  if self.overlap_params then self.ddp:param_hook(true) else self.ddp:params_finish() end
end

-- The model's weights are complete (before evaluating, saving or leaving).
function Sharded:sync_params() self.ddp:params_finish() end
function Replicated:sync_params() end

-- Optimizer state of a plain (replicated) core optimizer over a model's flat buffers, as
-- checkpoint tensors "<state>.<parameter name>".
-- The optimizer state as pieces of named parameters, which is what checkpoints store, so that
-- any layout can read what any other wrote: { {state =, param =, first =, tensor =}, ... }, the
-- 1-D `tensor` holding elements [first, first + numel) of state `state` (e.g. "exp_avg") of
-- parameter `param`. A replicated optimizer holds every parameter whole.
function M.replicated_pieces(model, opt)
  local pieces = {}
  for _, state in ipairs(opt:state_names()) do
    local flat = opt:state(state)
    for _, p in ipairs(model:parameters()) do
      pieces[#pieces + 1] = { state = state, param = p.name, first = 0, tensor = flat:narrow(1, p.offset + 1, p.numel) }
    end
  end
  return pieces
end

-- Pieces and whether they are this rank's shard only (true) or the whole state.
function Replicated:state_pieces() return M.replicated_pieces(self.model, self.opt), false end

-- The distributed optimizer holds, per bucket, a slice of the flat buffer: the parts of the
-- parameters that fall in it.
function Sharded:state_pieces()
  local pieces = {}
  for _, state in ipairs(self.opt:state_names()) do
    local flat = self.opt:state(state)
    for _, piece in ipairs(self.ddp:pieces()) do
      local lo, hi = piece.flat_first, piece.flat_first + piece.count
      for _, p in ipairs(self.model:parameters()) do
        local a, b = math.max(p.offset, lo), math.min(p.offset + p.numel, hi)
        if a < b then
          pieces[#pieces + 1] = { state = state, param = p.name, first = a - p.offset,
            tensor = flat:narrow(1, piece.main_offset + a - lo + 1, b - a) }
        end
      end
    end
  end
  return pieces, true
end

function Replicated:after_load() end

-- After a checkpoint restored the weights: the main parameters follow them.
function Sharded:after_load() self.ddp:weights_to_main() end

for _, cls in ipairs { Replicated, Sharded } do
  cls.expected_bytes = M.expected_bytes
  cls.memory = M.memory
  cls.num_steps = function(self, n) return self.opt:num_steps(n) end
end

return M

-- Data parallelism over the dp-cp group, as Megatron's DDP and distributed optimizer:
--   DDP:                   gradients averaged with all-reduce in buckets of ddp.bucket_size
--                          elements, then every rank runs the same optimizer step.
--   distributed optimizer: every bucket sharded over the ranks: gradients reduce-scattered, each
--                          rank updates its shard of the fp32 main parameters with its shard of
--                          the Adam moments, then the parameters are all-gathered.
-- The buckets live in C (engine/parallel/ddp.c). With ddp.overlap_grad_reduce their reduction
-- starts during the last microbatch's backward; with overlap_param_gather the next forward waits
-- for each bucket's parameters only when it reaches them.
--
-- MoE experts (laid out after every other parameter of a chunk, from chunk:expert_offset()) are
-- each held by one rank of the expert-parallel group, so their gradients are reduced over the
-- expert-data-parallel group instead, scaled as Megatron's: 1 / (dp-cp size), summed over edp (an
-- expert's gradient already has every token of its EP group in it). Under the distributed optimizer
-- they are sharded over edp. Their reduction and parameter gather happen when the step finishes.
--
-- A rank holds one model chunk per virtual pipeline stage (one chunk without pipelining), each
-- with its own buckets and optimizer, as Megatron wraps each chunk in its own DDP;
-- M.over_chunks joins them into what the training loop uses: before_last_backward(chunk),
-- step(lr) → grad norm before clipping (over every chunk of every stage), apply(lr).
local core = require "luatron.core"
local parallel = require "luatron.parallel"

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

-- This rank's slice of each of a sharded ddp's buckets (over the flat buffers from `first`), as spans
-- {lo =, n =, at =}: n elements of the flat buffers from lo, held in the main buffers from at.
local function ddp_spans(ddp, first)
  local spans = {}
  for _, piece in ipairs(ddp:pieces()) do
    spans[#spans + 1] = { lo = first + piece.flat_first, n = piece.count, at = piece.main_offset }
  end
  return spans
end

-- An optimizer over main buffers holding the spans of model's flat buffers.
local function optimizer_over_spans(model, r, main, main_grads, spans)
  local segs = {}
  for _, span in ipairs(spans) do
    for _, seg in ipairs(shard_segments(model, span.lo, span.lo + span.n)) do
      seg.offset = seg.offset + span.at
      segs[#segs + 1] = seg
    end
  end
  return core.optimizer_over(r.optimizer, main, main_grads, segs)
end

local Replicated = {}
Replicated.__index = Replicated

local Sharded = {}
Sharded.__index = Sharded

-- The communicator for buffers over `group`: the host group on the CPU, an NCCL one on a GPU (or
-- `made`, one made over the same group for another chunk).
local function buffer_comm(group, r, made)
  if made or r.model.device == "cpu" then return made or group end
  local ok, c = pcall(core.comm_nccl, group, r.model.device)
  if not ok then
    error(("data parallelism over %d ranks on device %q needs NCCL: %s"):format(group:size(), r.model.device, c), 0)
  end
  return c
end

-- The experts' part of a chunk's flat buffers, [first, first + numel): reduced over `edp` (the
-- expert-data-parallel communicator) after scaling by edp / dp so its average is Megatron's sum / dp;
-- under the distributed optimizer its own sharded buckets and optimizer (with one edp rank, an
-- optimizer over the part itself).
local Experts = {}
Experts.__index = Experts

local function new_experts(model, r, edp, dp, sharded, device_comm)
  local first = model:expert_offset()
  local numel = model:flat_weights():numel() - first
  local n = edp and edp:size() or 1
  local self = setmetatable({ model = model, first = first, numel = numel, edp = n, scale = n / dp,
    sharded = sharded }, Experts)
  if numel == 0 then return self end
  self.device_comm = n > 1 and buffer_comm(edp, r, device_comm) or nil
  if sharded and n > 1 then
    self.ddp = core.ddp(model, self.device_comm, r.ddp.bucket_size or 0, true, first, numel)
    self.main, self.main_grads = self.ddp:main_params(), self.ddp:main_grads()
    self.opt = optimizer_over_spans(model, r, self.main, self.main_grads, ddp_spans(self.ddp, first))
    self.ddp:weights_to_main()
  else
    if n > 1 then self.ddp = core.ddp(model, self.device_comm, r.ddp.bucket_size or 0, false, first, numel) end
    if sharded then
      self.main = model:flat_weights():narrow(1, first + 1, numel)
      self.main_grads = model:flat_grads():narrow(1, first + 1, numel)
      self.opt = optimizer_over_spans(model, r, self.main, self.main_grads, { { lo = first, n = numel, at = 0 } })
    end
  end
  return self
end

function Experts:grads() return self.model:flat_grads():narrow(1, self.first + 1, self.numel) end

function Experts:reduce()
  if self.numel == 0 then return end
  if self.scale ~= 1 then self:grads():scale(self.scale) end
  if self.ddp then
    self.ddp:begin()
    self.ddp:finish()
  end
end

-- The square sum of the gradients this rank updates (its shard under the distributed optimizer).
function Experts:sumsq()
  if self.numel == 0 then return 0 end
  return (self.main_grads or self:grads()):norm() ^ 2
end

-- The distributed optimizer's: update, gather, the state pieces (the whole part with one edp rank).
function Experts:apply(lr)
  if not self.opt then return end
  self.opt:step(lr)
  if self.ddp then
    self.ddp:gather_params()
    self.ddp:params_finish()
  end
end

function Experts:after_load() if self.ddp and self.sharded then self.ddp:weights_to_main() end end

function Experts:num_steps(n) if self.opt then return self.opt:num_steps(n) end end

-- One chunk's: model (a chunk), r (resolved config), group (the dp-cp communicator or nil for one
-- rank), device_comm (an NCCL communicator over group made for another chunk, or nil), edp (the
-- expert-data-parallel communicator, for a model with experts) and edp_device_comm (as device_comm).
local function new_part(model, r, group, device_comm, edp, edp_device_comm)
  local dp = group and group:size() or 1
  -- The buffers' communicator: the host group on the CPU; on a GPU an NCCL communicator over the
  -- same ranks (self.device_comm), while the host group keeps the scalars (loss, gradient norm).
  local comm = group
  if dp > 1 then
    comm = buffer_comm(group, r, device_comm)
    if r.model.device ~= "cpu" then device_comm = comm end
  end
  local sharded = r.ddp.use_distributed_optimizer or r.optimizer.use_distributed_optimizer
  local experts = new_experts(model, r, edp, dp, sharded, edp_device_comm)
  local self = { model = model, r = r, group = group, dp = dp, numel = model:flat_weights():numel(),
    dense = experts.first, experts = experts, device_comm = device_comm, tp_sums = {} }
  -- in model order, the same on every TP rank (collectives pair up by order)
  for _, p in ipairs(model:parameters()) do
    if p.tp_grad_sum then
      self.tp_sums[#self.tp_sums + 1] = p.name
      self.tp_sums[p.name] = true
    end
  end
  if sharded then
    assert(group, "the distributed optimizer needs a data-parallel communicator")
    setmetatable(self, Sharded)
    self.ddp = core.ddp(model, comm, r.ddp.bucket_size or 0, true, 0, self.dense)
    self.main = self.ddp:main_params()
    self.main_grads = self.ddp:main_grads()
    self.shard = self.main:numel()
    self.overlap_grads = r.ddp.overlap_grad_reduce
    self.overlap_params = r.ddp.overlap_param_gather or r.optimizer.overlap_param_gather
    self.opt = optimizer_over_spans(model, r, self.main, self.main_grads, ddp_spans(self.ddp, 0))
    self.ddp:weights_to_main()
  else
    setmetatable(self, Replicated)
    self.opt = core.optimizer(model, r.optimizer)
    self.overlap_grads = r.ddp.overlap_grad_reduce
    if dp > 1 then self.ddp = core.ddp(model, comm, r.ddp.bucket_size or 0, false, 0, self.dense) end
  end
  return self
end

-- Bytes a step moves by the ring formulas, for the report: the gradient reduction (all-reduce:
-- 2(D-1)/D of the buffers; reduce-scatter: (D-1)/D), the previous update's parameter all-gather
-- ((D-1)/D; none before the first update) and the scalar all-reduces (the loss, and the distributed
-- optimizer's gradient norm: 2(D-1)/D of 4 bytes each).
local function expected_bytes(numel, d, sharded, first_step)
  if d == 1 then return 0 end
  local scalar = 2 * (d - 1) / d * 4
  local buffer = fp32_bytes(numel)
  if sharded then return (first_step and 1 or 2) * (d - 1) / d * buffer + 2 * scalar end
  return 2 * (d - 1) / d * buffer + scalar
end

-- Memory of one chunk's part, bytes: parameters, gradients, optimizer state.
local function part_memory(self)
  local n = self.numel
  local states = #self.opt:state_names()
  if getmetatable(self) == Sharded then
    -- the experts' shard over edp has main parameters of its own; with one edp rank they are the weights
    local x = self.experts
    local main = x.ddp and 1 or 0
    local x_shard = x.ddp and x.main:numel() or x.numel
    return { params = fp32_bytes(n), grads = fp32_bytes(n),
      optimizer = fp32_bytes(self.shard * (states + 1) + x_shard * (states + main)),
      formula = fp32_bytes(self.dense * (states + 1)) / self.dp + fp32_bytes(x.numel * (states + main)) / x.edp }
  end
  return { params = fp32_bytes(n), grads = fp32_bytes(n), optimizer = fp32_bytes(n * states),
    formula = fp32_bytes(n * states) }
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
  if self.ddp and self.overlap_grads then
    self.ddp:begin()
    self.begun = true
  end
end
Sharded.before_last_backward = Replicated.before_last_backward

-- Completes the reduction of the gradients over the data-parallel ranks: every bucket averaged
-- (DDP) or reduce-scattered into the main gradients (distributed optimizer).
function Replicated:reduce()
  if self.ddp then
    if not self.begun then self.ddp:begin() end
    self.begun = false
    local exposed = self.ddp:finish()
    self.exposed_seconds = self.overlap_grads and exposed or nil
  end
  self.experts:reduce()
end
Sharded.reduce = Replicated.reduce

-- The sums of squares of the gradients this rank updates, of the experts' and of the others',
-- leaving out the parameters named in the set `skip` (ones another rank counts: the last stage's
-- copy of a tied embedding, and parameters replicated across TP on TP ranks other than 0, as
-- Megatron counts them once). With parameters to leave out, the counted ones are summed one by one:
-- subtracting the others from the total would cancel digits.
function Replicated:sumsq(skip)
  local s = 0
  if not next(skip) then
    s = self.model:flat_grads():narrow(1, 1, self.dense):norm() ^ 2
  else
    for _, p in ipairs(self.model:parameters()) do
      if p.offset < self.dense and not skip[p.name] then s = s + self.model:grad(p.name):norm() ^ 2 end
    end
  end
  return s, self.experts:sumsq()
end

function Sharded:sumsq(skip)
  local s = 0
  if not next(skip) then
    s = self.main_grads:norm() ^ 2
  else
    for _, piece in ipairs(self:grad_pieces()) do
      if not skip[piece.param] then s = s + piece.tensor:norm() ^ 2 end
    end
  end
  return s, self.experts:sumsq()
end

-- Megatron's finalize step for tensor parallelism, after the data-parallel reduction: the gradients
-- of the parameters replicated across TP whose gradient each TP rank computed from a part
-- (self.tp_sums: sequence-parallel norms and row-parallel biases, q/k norms) summed over TP. TP
-- ranks have the same flat layout, so under the distributed optimizer their shards hold the same
-- pieces. As Megatron, they are coalesced: one all-reduce of a buffer holding them all.
local function sum_coalesced(tp, tensors)
  if #tensors == 0 then return end
  local n = 0
  for _, t in ipairs(tensors) do n = n + t:numel() end
  local flat <close> = core.tensor.zeros({ n }, "float32", tensors[1]:device())
  local at = 1
  for _, t in ipairs(tensors) do
    flat:narrow(1, at, t:numel()):copy(t:reshape({ t:numel() }))
    at = at + t:numel()
  end
  tp:all_reduce(flat, "sum")
  at = 1
  for _, t in ipairs(tensors) do
    t:reshape({ t:numel() }):copy(flat:narrow(1, at, t:numel()))
    at = at + t:numel()
  end
end

function Replicated:sum_over_tp(tp)
  local grads = {}
  for i, name in ipairs(self.tp_sums) do grads[i] = self.model:grad(name) end
  sum_coalesced(tp, grads)
end

function Sharded:sum_over_tp(tp)
  if #self.tp_sums == 0 then return end
  local pieces = {}
  for _, piece in ipairs(self:grad_pieces()) do
    if self.tp_sums[piece.param] then pieces[#pieces + 1] = piece.tensor end
  end
  sum_coalesced(tp, pieces)
end

function Replicated:scale_grads(c) self.model:flat_grads():scale(c) end
function Sharded:scale_grads(c)
  self.main_grads:scale(c)
  if self.experts.numel > 0 then self.experts.main_grads:scale(c) end
end

function Replicated:apply(lr) self.opt:step(lr) end

-- Updates this rank's shard, then all-gathers the parameters bucket by bucket. With
-- overlap_param_gather the next forward waits for each bucket only when it reaches its layers.
function Sharded:apply(lr)
  self.opt:step(lr)
  self.experts:apply(lr)
  self.ddp:gather_params()
  if self.overlap_params then self.ddp:param_hook(true) else self.ddp:params_finish() end
end

-- The model's weights are complete (before evaluating, saving or leaving).
function Sharded:sync_params() self.ddp:params_finish() end
function Replicated:sync_params() end

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

-- The parts of model's parameters that fall in each span {lo =, n =, at =} of the flat buffer, as
-- 1-D views of `flat`, which holds a span's elements from its offset `at`.
local function span_pieces(model, spans, flat)
  local pieces = {}
  for _, span in ipairs(spans) do
    for _, p in ipairs(model:parameters()) do
      local a, b = math.max(p.offset, span.lo), math.min(p.offset + p.numel, span.lo + span.n)
      if a < b then
        pieces[#pieces + 1] = { param = p.name, first = a - p.offset, tensor = flat:narrow(1, span.at + a - span.lo + 1,
          b - a) }
      end
    end
  end
  return pieces
end

-- The distributed optimizer holds, per bucket, a slice of the flat buffer: the parts of the
-- parameters that fall in it, as 1-D views of `flat` (a tensor laid out as the main parameters).
function Sharded:pieces_of(flat) return span_pieces(self.model, ddp_spans(self.ddp, 0), flat) end

function Sharded:grad_pieces() return self:pieces_of(self.main_grads) end

function Sharded:state_pieces()
  local pieces = {}
  for _, state in ipairs(self.opt:state_names()) do
    for _, piece in ipairs(self:pieces_of(self.opt:state(state))) do
      piece.state = state
      pieces[#pieces + 1] = piece
    end
  end
  for _, piece in ipairs(self.experts:state_pieces()) do pieces[#pieces + 1] = piece end
  return pieces, true
end

-- The experts' optimizer state (distributed optimizer) as pieces: their shards, or with one edp rank
-- the whole parameters.
function Experts:state_pieces()
  local pieces = {}
  if not self.opt then return pieces end
  local spans = self.ddp and ddp_spans(self.ddp, self.first) or { { lo = self.first, n = self.numel, at = 0 } }
  for _, state in ipairs(self.opt:state_names()) do
    for _, piece in ipairs(span_pieces(self.model, spans, self.opt:state(state))) do
      piece.state = state
      pieces[#pieces + 1] = piece
    end
  end
  return pieces
end

function Replicated:after_load() end

-- After a checkpoint restored the weights: the main parameters follow them.
function Sharded:after_load()
  self.ddp:weights_to_main()
  self.experts:after_load()
end

function Replicated:num_steps(n) return self.opt:num_steps(n) end
function Sharded:num_steps(n)
  self.experts:num_steps(n)
  return self.opt:num_steps(n)
end

------------------------------------------------------------------------------------------------
-- A rank's chunks together.
------------------------------------------------------------------------------------------------

local EMBEDDING = "embedding.word_embeddings.weight"

local Chunks = {}
Chunks.__index = Chunks

local function has_param(chunk, name)
  for _, p in ipairs(chunk:parameters()) do
    if p.name == name then return true end
  end
  return false
end

-- The optimizer of this rank's chunks (an array; one chunk without pipelining): r is the resolved
-- config, group the dp-cp communicator (nil for one rank); opts.pp the pipeline group's
-- communicator and opts.embedding the embedding group's (first and last stage), both nil without
-- pipelining; opts.tp the tensor-parallel group's (nil without); for a model with MoE experts
-- opts.edp and opts.ep the expert-data-parallel and the expert-tensor x expert-parallel groups'.
function M.over_chunks(chunks, r, group, opts)
  opts = opts or {}
  local edp = r.model.num_moe_experts and parallel.own_group(opts.edp, "edp_grads") or nil
  local parts, device_comm, edp_device, dense = {}, nil, nil, 0
  for i, chunk in ipairs(chunks) do
    parts[i] = new_part(chunk, r, group, device_comm, edp, edp_device)
    device_comm, edp_device = parts[i].device_comm, parts[i].experts.device_comm
    dense = dense + parts[i].dense
  end
  local self = setmetatable({ parts = parts, chunks = chunks, r = r, group = group, dp = parts[1].dp,
    device_comm = device_comm, dense = dense, sharded = getmetatable(parts[1]) == Sharded,
    pp = opts.pp, tied = {}, copy = {}, skip = {} }, Chunks)
  -- Experts: their gradient norm summed over the experts' shards (edp, distributed optimizer) and
  -- over the ETP x EP ranks, which hold different experts or parts (Megatron's expert-model-parallel
  -- norm).
  if r.model.num_moe_experts then
    self.edp, self.ep = edp, parallel.own_group(opts.ep, "ep_norm")
  end
  -- Tensor parallelism: the sums over TP run on the device's communicator; the gradient norm counts
  -- a replicated parameter on TP rank 0 only.
  local tp = opts.tp
  if tp and tp:size() > 1 then
    self.tp = tp
    self.tp_device = r.model.device ~= "cpu" and core.comm_nccl(tp, r.model.device) or tp
    for i, chunk in ipairs(chunks) do
      self.skip[i] = {}
      if tp:rank() > 0 then -- (an expert is this rank's own: its norm sums over the expert groups)
        for _, p in ipairs(chunk:parameters()) do
          if p.split == "none" and not p.expert then self.skip[i][p.name] = true end
        end
      end
    end
  end
  -- With the output layer tied to the word embedding and pipeline stages, the last stage holds a
  -- copy of the embedding; the two copies' gradients are summed over the embedding group, and the
  -- copy is left out of the gradient norm (Megatron's finalize_model_grads and get_grad_norm).
  local emb = opts.embedding
  if emb and emb:size() > 1 and r.model.share_embeddings_and_output_weights then
    for i, chunk in ipairs(chunks) do
      local st = chunk:stage()
      if (st.pre_process or st.post_process) and has_param(chunk, EMBEDDING) then
        self.tied[i] = true
        self.copy[i] = not st.pre_process
      end
    end
    if next(self.tied) then
      self.embedding = emb
      if r.model.device ~= "cpu" then self.embedding = core.comm_nccl(emb, r.model.device) end
    end
  end
  for i in ipairs(chunks) do
    self.skip[i] = self.skip[i] or {}
    if self.copy[i] then self.skip[i][EMBEDDING] = true end
  end
  return self
end

-- Before the backward of chunk i's last microbatch (0-based chunk numbers, as plans give them).
-- With the distributed optimizer a chunk with a tied embedding reduces after the embedding's sum
-- instead (see step).
function Chunks:before_last_backward(i)
  i = (i or 0) + 1
  if not (self.sharded and self.tied[i]) then self.parts[i]:before_last_backward() end
end

-- Whether this rank counts parameter `name` of chunk i (1-based) in the whole model's sums (gradient
-- norm, parameter count and norm), which count each parameter once: not the last stage's copy of
-- the tied embedding, nor on TP ranks but 0 a parameter replicated across TP (an expert counts on
-- every rank; its sums go over the expert-parallel group instead of TP).
function Chunks:counts(i, name)
  return not self.skip[i][name]
end

-- The tied embedding's copies summed over the first and last stage.
function Chunks:sum_tied()
  for i in pairs(self.tied) do self.embedding:all_reduce(self.chunks[i]:grad(EMBEDDING), "sum") end
end

-- Megatron's finalize_model_grads and clipping: every chunk's gradients reduced over the
-- data-parallel ranks, the tied embedding's copies summed over the first and last stage, then the
-- global norm over every chunk of every stage, and the clipping. With the distributed optimizer a
-- rank keeps only its shard of the reduced gradients, and the two stages' shards of the embedding
-- are different parts of it, so there the copies are summed before the reduction (the same sum;
-- their buckets then wait for it). Under tensor parallelism the gradients TP ranks computed in
-- parts are summed over TP after the data-parallel reduction (Megatron's order). Returns the norm
-- before clipping.
function Chunks:step(lr)
  if self.sharded then self:sum_tied() end
  local exposed
  for _, part in ipairs(self.parts) do
    part:reduce()
    if part.exposed_seconds then exposed = (exposed or 0) + part.exposed_seconds end
  end
  self.exposed_seconds = exposed
  if self.tp then
    for _, part in ipairs(self.parts) do part:sum_over_tp(self.tp_device) end
  end
  if not self.sharded then self:sum_tied() end
  local sumsq, expert_sumsq = 0, 0
  for i, part in ipairs(self.parts) do
    local d, e = part:sumsq(self.skip[i])
    sumsq, expert_sumsq = sumsq + d, expert_sumsq + e
  end
  local t <close> = core.tensor.from({ sumsq }, "float32")
  if self.sharded and self.dp > 1 then self.group:all_reduce(t, "sum") end
  if self.edp or self.ep then
    local te <close> = core.tensor.from({ expert_sumsq }, "float32")
    if self.sharded and self.edp then self.edp:all_reduce(te, "sum") end
    if self.ep then self.ep:all_reduce(te, "sum") end
    expert_sumsq = te:item()
  end
  if self.tp then self.tp:all_reduce(t, "sum") end -- (not the experts': TP ranks' experts are distinct)
  t:fill(t:item() + expert_sumsq)
  if self.pp and self.pp:size() > 1 then self.pp:all_reduce(t, "sum") end
  local norm = math.sqrt(math.max(t:item(), 0))
  local c = clip_coeff(norm, self.r.optimizer.clip_grad)
  if c then
    for _, part in ipairs(self.parts) do part:scale_grads(c) end
  end
  return norm
end

function Chunks:apply(lr)
  for _, part in ipairs(self.parts) do part:apply(lr) end
end

-- The weights are complete (before evaluating, saving or leaving).
function Chunks:sync_params()
  for _, part in ipairs(self.parts) do part:sync_params() end
end

-- After a checkpoint restored the weights: the main parameters follow them.
function Chunks:after_load()
  for _, part in ipairs(self.parts) do part:after_load() end
end

function Chunks:num_steps(n)
  local steps
  for _, part in ipairs(self.parts) do steps = part:num_steps(n) end
  return steps
end

-- The optimizer state as named pieces (see replicated_pieces) and whether they are shards.
function Chunks:state_pieces()
  local all = {}
  for _, part in ipairs(self.parts) do
    for _, piece in ipairs((part:state_pieces())) do all[#all + 1] = piece end
  end
  return all, self.sharded
end

-- Over the dp-cp group: the experts' buffers go over their own (expert-data-parallel) communicator.
function Chunks:expected_bytes(first_step) return expected_bytes(self.dense, self.dp, self.sharded, first_step) end

-- Memory per rank, bytes: parameters, gradients, optimizer state (what the formulas predict).
function Chunks:memory()
  local m = { params = 0, grads = 0, optimizer = 0, formula = 0, sharded = self.sharded }
  for _, part in ipairs(self.parts) do
    for k, v in pairs(part_memory(part)) do m[k] = m[k] + v end
  end
  return m
end

return M

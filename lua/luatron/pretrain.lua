-- The training loop behind luatron.pretrain(config): Megatron's pretrain(). Every piece is a
-- plain function so a recipe can assemble its own loop from them (see recipes/custom_loop.lua).
-- Multi-rank (luatron launch, mpirun): data parallelism over the dp-cp group, with DDP or the
-- distributed optimizer (luatron.data_parallel), and pipeline parallelism: each rank holds its
-- stage's chunks and runs a schedule's plan (luatron.schedules, luatron.pipeline) over them.
local core = require "luatron.core"
local config = require "luatron.config"
local model_lib = require "luatron.model"
local scheduler = require "luatron.scheduler"
local checkpoint = require "luatron.checkpoint"
local logger_lib = require "luatron.logger"
local parallel = require "luatron.parallel"
local data_parallel = require "luatron.data_parallel"
local pipeline = require "luatron.pipeline"
local pipeline_run = require "luatron.pipeline_run"
local tensor_parallel = require "luatron.tensor_parallel"
local context_parallel = require "luatron.context_parallel"
local expert_parallel = require "luatron.expert_parallel"
local timeline = require "luatron.timeline"
local json = require "luatron.json"
local overrides = require "luatron.overrides"
local fs = require "luatron.fs"
local util = require "luatron.config.util"

local M = {}

-- Command-line overrides "group.field=value" (e.g. train.train_iters=20) on a ConfigContainer;
-- true when the arguments asked for --help (see luatron.overrides).
M.apply_overrides = overrides.apply

-- Samples of one split ("train", "valid" or "test") of the resolved config `r`.
function M.build_dataset(r, split, num_samples)
  local ds, blend = r.dataset, not r.dataset.mock and r.blend or {}
  local ok, data = pcall(core.dataset, {
    paths = blend.prefixes,
    weights = blend.weights,
    split = ds.split,
    split_index = split,
    seq_length = ds.seq_length,
    seed = ds.random_seed,
    num_samples = num_samples,
    vocab_size = r.padded_vocab_size,
  })
  if not ok then error(util.message(data), 0) end -- the user's data: no traceback
  return data
end

-- A folder the run will write into (checkpoint.save), made and tried before any training, so a
-- typo or a full disk is found now rather than at the first checkpoint.
local function check_writable(dir, what)
  fs.mkdir_p(dir)
  local probe = dir .. "/.luatron_write_test"
  local f, err = io.open(probe, "w")
  if not f then error(("%s = %s cannot be written: %s"):format(what, dir, err), 0) end
  f:close()
  os.remove(probe)
end

-- What this build cannot run yet, said plainly before the rules about world sizes would.
function M.check_supported(m)
  if m.num_moe_experts then
    local tp = m.tensor_model_parallel_size or 1
    local refused = {
      { tp > 1 and not m.sequence_parallel, "tensor_model_parallel_size = " .. tp .. " without sequence_parallel",
        "MoE with tensor parallelism needs sequence_parallel = true (Megatron: \"During training, performance may "
        .. "degrade if MoE and tensor parallelism are enabled without also enabling sequence parallelism.\")" },
      { (m.expert_tensor_parallel_size or tp) ~= 1 and (m.expert_tensor_parallel_size or tp) ~= tp,
        "expert_tensor_parallel_size = " .. tostring(m.expert_tensor_parallel_size), "this build splits experts over "
        .. "the TP group or not at all: set expert_tensor_parallel_size = 1 or tensor_model_parallel_size" },
      { m.moe_shared_expert_overlap, "moe_shared_expert_overlap = true", "overlapping the shared experts with the "
        .. "dispatch is not built yet (they run after it, with the same result): set it false" },
    }
    for _, r in ipairs(refused) do
      if r[1] then error(("GPTModelProvider.%s with num_moe_experts: %s. Change it"):format(r[2], r[3]), 0) end
    end
  end
  if m.fp16 then
    error("GPTModelProvider.fp16 = true: fp16 mixed precision (with loss scaling) is not implemented; "
      .. "use bf16 = true (or mixed_precision = \"bf16_mixed\")", 0)
  end
end

-- The communicators a pipeline schedule sends over: one per direction between neighbouring
-- stages (with virtual stages the last one sends on to the first) and kind of message, each of
-- the two ranks, so that what one rank sends never waits behind what it receives. Returns
-- link(kind, src, dst) for pipeline ranks src and dst, and the list of this rank's links.
local function pipeline_links(ps, pp, device)
  local ranks = ps.grid.group("pp", ps.rank)
  local me = ps.coords.pp_rank
  local links, list = {}, {}
  -- every rank walks the links in the same order and makes those it belongs to
  for _, kind in ipairs { "activation", "gradient" } do
    links[kind] = {}
    for src = 0, pp - 1 do
      local dst = (src + (kind == "activation" and 1 or -1)) % pp
      if src == me or dst == me then
        local a, b = math.min(ranks[src + 1], ranks[dst + 1]), math.max(ranks[src + 1], ranks[dst + 1])
        local c = ps.world:group({ a, b }, ("pp-%s-%d-%d"):format(kind, src, dst))
        links[kind][src .. ">" .. dst] = device == "cpu" and c or core.comm_nccl(c, device)
        list[#list + 1] = links[kind][src .. ">" .. dst]
      end
    end
  end
  return function(kind, src, dst) return links[kind][src .. ">" .. dst] end, list
end

-- Everything a run needs: the validated config (r: every default resolved), this rank's place
-- in the job, its model chunks, optimizer, datasets and the state that checkpoints carry.
-- opts.schedule: a pipeline schedule (a name of luatron.schedules or a function; default
-- Megatron's choice for the layout).
function M.setup(cfg, opts)
  opts = opts or {}
  M.check_supported(cfg.model)
  local ps = parallel.initialize(cfg.model, cfg.dist)
  local r = config.validate(cfg, ps.world_size)
  local seed = r.rng.seed
  local dp_group = ps.groups["dp-cp"]
  local pp = r.model.pipeline_model_parallel_size
  -- The flat buffers are padded to 16 x DP elements so the distributed optimizer shards them evenly.
  local chunks, comms = model_lib.chunks(r.model, ps, seed, 16 * (dp_group and dp_group:size() or 1))
  local ep_comm = comms.expert
  local gbs, train_iters = r.train.global_batch_size, r.train.train_iters
  local run = {
    cfg = cfg,
    r = r,
    ps = ps,
    dp_rank = dp_group and dp_group:rank() or 0, -- in the dp-cp group: the optimizer's shards
    dp_size = dp_group and dp_group:size() or 1,
    data_rank = ps.coords.dp_rank, -- in the dp group: which samples this rank reads (its cp group reads the same)
    data_size = ps.grid.dp,
    chunks = chunks,
    tp_comm = comms.tensor, -- the model's tensor-, context- and expert-parallel communicators (nil without)
    cp_comm = comms.context,
    ep_comm = ep_comm,
    optimizer = data_parallel.over_chunks(chunks, r, dp_group,
      { pp = ps.groups.pp, embedding = ps.groups.embedding, tp = ps.groups.tp, edp = ps.groups.edp,
        ep = ps.groups["tp-ep"] }),
    schedule = opts.schedule, -- nil: Megatron's choice for the layout (luatron.pipeline)
    plans = {},
    train_data = M.build_dataset(r, "train", (train_iters or 0) * gbs),
    state = { iteration = 0, consumed_samples = 0, optimizer_steps = 0, seed = seed },
  }
  if pp > 1 then run.link, run.links = pipeline_links(ps, pp, r.model.device) end
  -- the expert bias's token counts are summed over TP x DP x CP, on a communicator of their own
  if r.model.moe_router_enable_expert_bias then
    run.bias_comm = parallel.own_group(ps.groups["tp-dp-cp"], "expert_bias")
  end
  -- MoE: the aux and z losses' gradients at Megatron's MoEAuxLossAutoScaler scale, 1 / microbatches
  if r.model.num_moe_experts then
    for _, chunk in ipairs(chunks) do chunk:set_moe_aux_loss_scale(1 / r.num_microbatches) end
  end
  if opts.trace then run.recorder = timeline.recorder() end
  run.ranks = { rank = ps.rank, dp_rank = run.dp_rank, dp_size = run.dp_size, pp_rank = ps.coords.pp_rank,
    pp_size = pp, tp = ps.groups.tp, ep = ep_comm and ps.groups.ep, edp_rank = ps.coords.edp_rank,
    barrier = function() ps.world:barrier() end }
  if (r.train.eval_iters or 0) > 0 and (r.train.eval_interval or 0) > 0 then
    -- Megatron's count: every evaluation of the run reads eval_iters global batches of its own
    local evaluations = (train_iters or 0) // r.train.eval_interval + 1
    run.valid_data = M.build_dataset(r, "valid", evaluations * r.train.eval_iters * gbs)
  end
  -- An unweighted blend has one epoch of its parts (Megatron's builder): where that is too few,
  -- Megatron's sampler runs dry mid-run; say so before training instead.
  local wanted = (train_iters or 0) * gbs
  if not r.mock and run.train_data:size() < wanted then
    error(("dataset.data_path blends %d datasets without weights: one epoch of them is %d samples, but train_iters "
      .. "(%d) x global_batch_size (%d) = %d. Give weights (a weighted blend repeats its parts), fewer train_iters "
      .. "or more data"):format(#r.blend.prefixes, run.train_data:size(), train_iters, gbs, wanted), 0)
  end
  return run
end

-- Samples first .. first + count - 1 of a dataset. A bad dataset is the user's to fix: its
-- message names the file, without a traceback, and an id beyond the vocabulary says why.
local function read_batch(data, first, count)
  local ok, batch = pcall(data.batch, data, first, count)
  if ok then return batch end
  local msg = util.message(batch)
  if msg:find("outside vocab_size", 1, true) then
    msg = msg .. ". The data holds ids beyond the model's vocabulary: for data tokenized elsewhere set "
      .. "tokenizer.tokenizer_type = 'NullTokenizer' and tokenizer.vocab_size (its number of ids), or raise "
      .. "model.vocab_size"
  end
  error(msg, 0)
end

-- Dropout masks depend only on (seed, first sample of the microbatch): any layout or a
-- resumed run draws the same ones.
local function dropout_seed(seed, first_sample)
  return (seed << 32) ~ first_sample
end

-- Mean of a number over the data-parallel ranks.
local function dp_mean(run, x)
  local g = run.ps.groups["dp-cp"]
  if not g or g:size() == 1 then return x end
  local t <close> = core.tensor.from({ x }, "float32")
  return g:all_reduce(t, "avg"):item()
end

-- The sum of a number over the pipeline stages (e.g. the loss, which only the last one has).
-- (op "max": the largest)
local function sum_over_stages(run, x, op)
  local g = run.ps.groups.pp
  if not g or g:size() == 1 then return x end
  local t <close> = core.tensor.from({ x }, "float32")
  return g:all_reduce(t, op or "sum"):item()
end

-- The mean of a number over the pipeline stages.
local function mean_over_stages(run, x)
  return sum_over_stages(run, x) / run.r.model.pipeline_model_parallel_size
end

-- This rank's plan for n microbatches (forward_only: evaluation), checked against every other
-- stage's the first time it is asked for.
local function plan_for(run, n, forward_only)
  local key = n .. (forward_only and "f" or "t")
  if not run.plans[key] then
    local m = run.r.model
    run.plans[key] = pipeline.plan { schedule = run.schedule, pipeline_model_parallel_size = m.pipeline_model_parallel_size,
      virtual_pipeline_model_parallel_size = m.virtual_pipeline_model_parallel_size, num_microbatches = n,
      microbatch_group_size_per_vp_stage = m.microbatch_group_size_per_vp_stage, forward_only = forward_only,
      rank = run.ps.coords.pp_rank }
  end
  return run.plans[key]
end

-- Runs plan over microbatches of `data`: microbatch m holds samples first(m) .. first(m) + mbs - 1,
-- read only by the stages that need them (tokens on the first, targets on the last). Returns the
-- sum over microbatches of their mean loss on the last stage (0 elsewhere), and with pipeline
-- stages the timeline of the steps and their wall time. seed_of(m) is microbatch m's dropout seed;
-- nil runs the plan in eval mode (no dropout). loss_scale(n) scales the gradient of each token's
-- loss, n the microbatch's valid tokens (over the whole sequence).
--
-- Under context parallelism a rank reads its chunks of each sample (luatron.context_parallel) and
-- its loss is its tokens' share of the microbatch's, times CP: the mean over the dp-cp group (loss
-- reports, and the gradients' data-parallel average) then sums the shares, as Megatron scales the
-- loss by the cp size.
local function run_plan(run, plan, data, first, seed_of, loss_scale)
  local r = run.r
  local mbs, s = r.train.micro_batch_size, r.model.seq_length
  local cp, cp_rank = r.model.context_parallel_size, run.ps.coords.cp_rank
  -- a stage sends its rank's positions: [s/CP, b, h], and under sequence parallelism [s/CP/TP, b, h]
  local s_sent = s // cp // (r.model.sequence_parallel and r.model.tensor_model_parallel_size or 1)
  local batches = {}
  local function batch(m)
    if not batches[m] then
      local b <close> = read_batch(data, first(m), mbs)
      local tokens <close> = b:narrow(2, 1, s):clone()
      local targets <close> = b:narrow(2, 2, s):clone()
      local valid -- under CP the whole sequence's valid tokens, which no rank's chunks hold alone
      if cp > 1 then
        valid = 0
        for _, row in ipairs(targets:to_table()) do
          for _, v in ipairs(row) do valid = valid + (v >= 0 and 1 or 0) end
        end
      end
      batches[m] = { tokens = context_parallel.local_rows(tokens, cp_rank, cp),
        targets = context_parallel.local_rows(targets, cp_rank, cp), valid = valid }
    end
    return batches[m]
  end
  -- the microbatch's valid tokens, given this rank's count n of them
  local function valid_of(m, n) return batch(m).valid or n end
  local dtype = ({ fp32 = "float32", bf16 = "bfloat16" })[r.model.pipeline_dtype]
  local started = core.clock()
  local results, steps = pipeline_run.run(plan, {
    chunks = run.chunks,
    tokens = function(m) return batch(m).tokens end,
    targets = function(m) return batch(m).targets end,
    seed = seed_of,
    loss_scale = loss_scale and function(n, m) return cp * loss_scale(valid_of(m, n)) end,
    rank = run.ps.coords.pp_rank,
    link = run.link,
    buffer = function() return core.tensor.zeros({ s_sent, mbs, r.model.hidden_size }, dtype, r.model.device) end,
    last_backward = function(c) run.optimizer:before_last_backward(c) end,
    clock = (run.link or run.recorder) and core.clock or nil,
  })
  local wall = core.clock() - started
  -- the losses stay on the device until here: one read per microbatch, after the whole schedule
  local loss_sum = 0
  for m, res in pairs(results) do
    local host <close> = res.losses:to_host()
    loss_sum = loss_sum + cp * host:sum() / math.max(valid_of(m, res.valid), 1)
    res.losses:free()
  end
  for _, b in pairs(batches) do
    b.tokens:free()
    b.targets:free()
  end
  return loss_sum, steps, wall
end

-- Data-parallel traffic of one step, read just before the optimizer update: the window holds
-- the previous update's parameter all-gather (which may run behind this step's forward), this
-- step's gradient reduction and its scalar all-reduces, so every step is counted exactly once.
local function take_comm_stats(run)
  local g = run.ps.groups["dp-cp"]
  if not g or g:size() == 1 then return nil end
  local s = g:stats()
  g:reset_stats()
  local dc = run.optimizer.device_comm -- on a GPU the buffers go through NCCL: its traffic counts too
  if dc then
    local d = dc:stats()
    dc:reset_stats()
    s.calls, s.bytes, s.seconds = s.calls + d.calls, s.bytes + d.bytes, s.seconds + d.seconds
  end
  s.bytes = s.bytes - (run.comm_excluded or 0)
  run.comm_excluded = 0
  return s
end

-- Megatron's aux-loss-free balancing (finalize_model_grads' _update_router_expert_bias): each MoE
-- layer's tokens per expert of the step, summed over TP x DP x CP, move its expert bias by
-- moe_router_bias_update_rate x sign(mean - tokens), in fp32 as Megatron's.
local function update_expert_bias(run)
  local E = run.r.model.num_moe_experts
  local layers, counts = {}, {}
  for _, chunk in ipairs(run.chunks) do
    for k, b in ipairs(chunk:expert_biases(true)) do
      layers[#layers + 1] = { chunk = chunk, k = k, bias = b.bias:to_table() }
      for _, n in ipairs(b.tokens:to_table()) do counts[#counts + 1] = n end
    end
  end
  if #layers == 0 then return end -- (a stage without MoE layers: so are its TP x DP x CP peers)
  local t <close> = core.tensor.from(counts, "float32")
  if run.bias_comm then run.bias_comm:all_reduce(t, "sum") end
  counts = t:to_table()
  local function f32(x) return (string.unpack("f", string.pack("f", x))) end
  local rate = f32(run.r.model.moe_router_bias_update_rate)
  for i, layer in ipairs(layers) do
    local sum = 0
    for e = 1, E do sum = sum + counts[(i - 1) * E + e] end
    local mean = f32(sum / E)
    for e = 1, E do
      local offset = mean - counts[(i - 1) * E + e]
      layer.bias[e] = layer.bias[e] + (offset > 0 and rate or offset < 0 and -rate or 0)
    end
    local b <close> = core.tensor.from(layer.bias, "float32")
    layer.chunk:set_expert_bias(layer.k, b)
  end
end

-- Runs fn (an evaluation) without counting its traffic as the next step's (data parallelism's, and
-- the MoE dispatchers' over the EP group).
local function excluding_comm(run, fn)
  local g, ep = run.ps.groups["dp-cp"], run.ep_comm
  local dc = run.optimizer.device_comm
  local function bytes() return g:stats().bytes + (dc and dc:stats().bytes or 0) end
  local dp = g and g:size() > 1
  if dp then run.optimizer:sync_params() end -- the pending all-gather belongs to the step, not to fn
  local before, ep_before = dp and bytes(), ep and ep:stats().bytes
  local result = fn()
  if dp then run.comm_excluded = (run.comm_excluded or 0) + bytes() - before end
  if ep then run.ep_excluded = (run.ep_excluded or 0) + ep:stats().bytes - ep_before end
  return result
end

-- What a pipeline step did on this rank: its bubble and its point-to-point bytes against the
-- arithmetic (each send moves an [s, b, h] tensor of this rank's s / CP positions, / TP under sequence
-- parallelism).
local function pipeline_report(run, plan, steps, wall)
  local m = run.r.model
  run.bubble = timeline.bubble(steps, wall)
  local sends = 0
  for _, step in ipairs(plan.steps) do
    if step.to then sends = sends + 1 end
  end
  local bytes = 0
  for _, link in ipairs(run.links) do
    bytes = bytes + link:stats().bytes
    link:reset_stats()
  end
  run.p2p_bytes = bytes
  local s = m.seq_length // m.context_parallel_size // (m.sequence_parallel and m.tensor_model_parallel_size or 1)
  run.p2p_expected = sends * s * run.r.train.micro_batch_size * m.hidden_size
    * (m.pipeline_dtype == "bf16" and 2 or 4)
end

-- One optimizer step over the global batch: this rank runs its share of the microbatches
-- (Megatron's sampler: microbatch m of data-parallel rank d holds global samples
-- consumed + (m * DP + d) * mbs ...) through its stage's chunks, in the schedule's order.
-- Returns the mean loss, the gradient norm before clipping and the learning rate used.
function M.train_step(run)
  local r = run.r
  local mbs, n_micro, dp = r.train.micro_batch_size, r.num_microbatches, run.data_size
  local lr = scheduler.lr_at(run.state.optimizer_steps, r.optimizer, r.scheduler, r.train.train_iters)
  for _, chunk in ipairs(run.chunks) do chunk:zero_grad() end
  local consumed, seed = run.state.consumed_samples, run.state.seed
  local function first(m) return consumed + (m * dp + run.data_rank) * mbs end
  local plan = plan_for(run, n_micro, false)
  if run.tp_comm then run.tp_comm:reset_stats() end
  if run.cp_comm then run.cp_comm:reset_stats() end
  local loss_sum, steps, wall = run_plan(run, plan, run.train_data, first,
    function(m) return dropout_seed(seed, first(m)) end,
    function(valid) return 1 / (math.max(valid, 1) * n_micro) end)
  if run.tp_comm then
    local s = run.tp_comm:stats()
    run.tp_bytes, run.tp_seconds = s.bytes, s.seconds
    run.tp_expected = tensor_parallel.expected_bytes(r, run.chunks, n_micro)
  end
  if run.cp_comm then
    local s = run.cp_comm:stats()
    run.cp_bytes, run.cp_expected = s.bytes, context_parallel.expected_bytes(r, run.chunks, n_micro)
    run.cp_hidden = s.async_seconds > 0 and math.max(0, 1 - s.blocked_seconds / s.async_seconds) or nil
  end
  if steps and run.link then pipeline_report(run, plan, steps, wall) end
  if steps and run.recorder then run.recorder:add(run.state.iteration + 1, steps) end
  -- Gradients first: with overlap their reduction is in flight, and the loss's all-reduce on the
  -- same communicator would otherwise wait for it and hide the exposed time from the report.
  local grad_norm = run.optimizer:step(lr) -- reduces the gradients across data-parallel ranks, clips
  if r.model.moe_router_enable_expert_bias then update_expert_bias(run) end
  local loss = dp_mean(run, sum_over_stages(run, loss_sum / n_micro))
  if loss ~= loss or grad_norm ~= grad_norm or math.abs(loss) == math.huge or grad_norm == math.huge then
    error(("NaN or infinite %s at iteration %d (loss %s, grad norm %s): stopping without saving; the last "
      .. "good checkpoint is untouched. Lower optimizer.lr or set optimizer.clip_grad.")
      :format(loss ~= loss and "loss" or "gradient", run.state.iteration + 1, loss, grad_norm), 0)
  end
  run.comm_stats = take_comm_stats(run)
  run.comm_expected = run.optimizer:expected_bytes(not run.updated_before)
  run.optimizer:apply(lr)
  -- On a GPU the update is still queued: wait for it, so step times are true and a failed kernel
  -- stops the run at this step, by name.
  if r.model.device ~= "cpu" then core.synchronize(r.model.device) end
  run.updated_before = true
  run.state.iteration = run.state.iteration + 1
  run.state.optimizer_steps = run.state.optimizer_steps + 1
  run.state.consumed_samples = run.state.consumed_samples + r.train.global_batch_size
  return loss, grad_norm, lr
end

-- Mean validation loss over eval_iters global batches. As Megatron's validation sampler, the
-- n-th evaluation of a run (0-based; by default the one at this iteration) reads the n-th
-- eval_iters global batches, so a resumed run and any layout read the same samples. The forward
-- runs in eval mode, without dropout (Megatron evaluates after model.eval()).
function M.evaluate(run, n)
  run.optimizer:sync_params()
  local r = run.r
  local mbs, gbs, dp = r.train.micro_batch_size, r.train.global_batch_size, run.data_size
  n = n or math.max(run.state.iteration // r.train.eval_interval - 1, 0)
  local base = n * r.train.eval_iters * gbs
  local count = r.train.eval_iters * gbs // (mbs * dp)
  local total = run_plan(run, plan_for(run, count, true), run.valid_data,
    function(i) return base + (i * dp + run.data_rank) * mbs end, nil)
  for _, link in ipairs(run.links or {}) do link:reset_stats() end -- the steps report their own traffic
  return dp_mean(run, sum_over_stages(run, total / count))
end

-- The values of Megatron's OptimizerParamScheduler state dict, which a resumed run checks.
local function schedule_of(r)
  local o, s = r.optimizer, r.scheduler
  return { max_lr = o.lr, min_lr = o.min_lr, lr_warmup_steps = s.lr_warmup_steps, lr_decay_steps = s.lr_decay_steps,
    lr_decay_style = s.lr_decay_style, start_wd = s.start_weight_decay, end_wd = s.end_weight_decay,
    wd_incr_steps = s.wd_incr_steps, wd_incr_style = s.weight_decay_incr_style }
end

function M.save(run)
  run.optimizer:sync_params()
  local ck = run.r.checkpoint
  run.state.scheduler = schedule_of(run.r)
  local dir = checkpoint.save(ck.save, run.chunks, ck.save_optim and run.optimizer or nil, run.state,
    config.to_table(run.cfg), run.ranks)
  if ck.most_recent_k > 0 and run.ps.rank == 0 then checkpoint.remove_old(ck.save, ck.most_recent_k) end
  return dir
end

-- Megatron's OptimizerParamScheduler.load_state_dict: the schedule a checkpoint was trained
-- with must be this run's, unless override_opt_param_scheduler (this run's values win) or
-- use_checkpoint_opt_param_scheduler (the checkpoint's win).
-- (Megatron's names for them; its steps count samples.)
local CHECKED = { { "max_lr", "learning rate" }, { "min_lr", "minimum learning rate" },
  { "lr_warmup_steps", "warmup iterations (in samples)" },
  { "lr_decay_steps", "total number of iterations (in samples)" },
  { "lr_decay_style", "learning rate decay style" }, { "start_wd", "start weight decay" },
  { "end_wd", "end weight decay" }, { "wd_incr_steps", "total number of weight decay iterations (in samples)" },
  { "wd_incr_style", "weight decay incr style" } }

local function resume_schedule(run, saved, dir, log)
  local s = run.r.scheduler
  if not saved or s.override_opt_param_scheduler then return end
  local mine = schedule_of(run.r)
  for _, c in ipairs(CHECKED) do
    local key, what = c[1], c[2]
    if saved[key] ~= nil and saved[key] ~= mine[key] and not s.use_checkpoint_opt_param_scheduler then
      error(("checkpoint %s was trained with %s %s, this run has %s (OptimizerParamScheduler: class input value "
        .. "and checkpoint value for %s do not match). Keep the schedule (lr_decay_iters defaults to train_iters), "
        .. "or set scheduler.override_opt_param_scheduler = true to use this run's values, or "
        .. "use_checkpoint_opt_param_scheduler = true to use the checkpoint's"):format(dir, what, tostring(saved[key]),
        tostring(mine[key]), what), 0)
    end
  end
  if s.use_checkpoint_opt_param_scheduler then
    if saved.start_wd ~= mine.start_wd then
      error(("checkpoint %s was trained with weight decay %s, this run's optimizer has %s: set "
        .. "optimizer.weight_decay = %s"):format(dir, tostring(saved.start_wd), tostring(mine.start_wd),
        tostring(saved.start_wd)), 0)
    end
    local o, gbs = run.r.optimizer, run.r.train.global_batch_size
    o.lr, o.min_lr, s.lr_decay_style = saved.max_lr, saved.min_lr, saved.lr_decay_style
    s.lr_warmup_iters, s.lr_decay_iters = saved.lr_warmup_steps / gbs, saved.lr_decay_steps / gbs
    s.lr_warmup_steps, s.lr_decay_steps = saved.lr_warmup_steps, saved.lr_decay_steps
    log:info("using the checkpoint's learning-rate schedule (scheduler.use_checkpoint_opt_param_scheduler)")
  end
end

-- Resumes from checkpoint.load (or from checkpoint.save when it already holds a run), as
-- Megatron's load_checkpoint: ckpt_step picks the iteration; finetune loads the weights only
-- and starts at iteration 0; load_optim = false keeps the iteration but starts the optimizer
-- and its schedule afresh; pretrained_checkpoint starts a fine-tuning run when nothing is there
-- yet; exit_on_missing_checkpoint makes a missing checkpoint.load an error.
function M.maybe_resume(run, log)
  local ck = run.r.checkpoint
  local root = ck.load or ck.save
  local finetune, load_optim = ck.finetune, ck.load_optim and not ck.finetune
  local state, dir
  if root then
    state, dir = checkpoint.load(root, run.chunks, run.optimizer,
      { iteration = ck.ckpt_step, load_optim = load_optim })
  end
  if not state and ck.pretrained_checkpoint then
    state, dir = checkpoint.load(ck.pretrained_checkpoint, run.chunks, run.optimizer, { load_optim = false })
    if not state then
      error(("checkpoint.pretrained_checkpoint = %s holds no checkpoint (no latest_checkpointed_iteration.txt)")
        :format(ck.pretrained_checkpoint), 0)
    end
    finetune, load_optim = true, false
  end
  if not state then
    if ck.load and ck.exit_on_missing_checkpoint then
      error(("checkpoint.load = %s holds no checkpoint and checkpoint.exit_on_missing_checkpoint = true: nothing "
        .. "was trained. Check the path, or set exit_on_missing_checkpoint = false to start from scratch")
        :format(ck.load), 0)
    end
    if ck.load then log:info("no checkpoint in %s: starting from scratch", ck.load) end
    return false
  end
  if finetune then
    log:info("loaded the model weights of %s (fine-tuning: iteration 0, a new optimizer)", dir)
    return true, "finetune"
  end
  if state.seed ~= run.state.seed then
    error(("checkpoint %s was trained with seed %s but rng.seed is %s: use the same seed to resume")
      :format(dir, tostring(state.seed), tostring(run.state.seed)), 0)
  end
  if load_optim then
    resume_schedule(run, state.scheduler, dir, log)
  else
    state.optimizer_steps = 0 -- Megatron's scheduler and optimizer start afresh without load_optim
  end
  state.scheduler = nil
  run.state = state
  log:info("resumed from %s (iteration %d, %d samples consumed%s)", dir, state.iteration, state.consumed_samples,
    load_optim and "" or "; optimizer state not loaded")
  return true
end

-- Megatron's exit_signal_handler: SIGTERM (as Slurm sends before preemption) is noted, and the
-- run saves a checkpoint and exits at the end of the step in which any rank received it.
local function signal_received(run)
  local got = core.signal_received() and 1 or 0
  if run.ps.world_size > 1 then
    local t <close> = core.tensor.from({ got }, "float32")
    got = run.ps.world:all_reduce(t, "max"):item()
  end
  return got > 0
end

local function mib(bytes) return bytes / 2 ^ 20 end

-- A sum over this rank's parameters (fn(chunk, param) for each it counts, see Chunks:counts) over
-- the tensor-parallel ranks, its experts' over the expert-parallel ranks, then over the pipeline
-- stages: the whole model's.
local function over_model(run, fn)
  local x, experts = 0, 0
  for i, chunk in ipairs(run.chunks) do
    for _, p in ipairs(chunk:parameters()) do
      if not run.optimizer:counts(i, p.name) then -- another rank counts it
      elseif p.expert then experts = experts + fn(chunk, p)
      else x = x + fn(chunk, p) end
    end
  end
  local ep = run.optimizer.ep -- the EP ranks hold different experts
  if ep then
    local t <close> = core.tensor.from({ experts }, "float32")
    experts = ep:all_reduce(t, "sum"):item()
  end
  local tp = run.ps.groups.tp
  if tp and tp:size() > 1 then
    local t <close> = core.tensor.from({ x }, "float32")
    x = tp:all_reduce(t, "sum"):item()
  end
  return sum_over_stages(run, x + experts)
end

-- The routing of the training steps since the last call, over every stage's MoE layers: tokens per
-- expert (min, mean, max, per MoE layer and microbatch), the share of routed tokens dropped, and the
-- mean aux and z losses per MoE layer and microbatch (coefficients applied). A collective with
-- pipeline stages (on every rank, as the parameter norm).
local function moe_stats(run)
  local m = run.r.model
  local E = m.num_moe_experts
  local sums, rows_sent, rows_received, seconds = {}, 0, 0, 0
  for i = 1, E + 5 do sums[i] = 0 end
  for _, chunk in ipairs(run.chunks) do
    local s = chunk:take_moe_stats()
    for e = 1, E do sums[e] = sums[e] + s.tokens_per_expert[e] end
    sums[E + 1], sums[E + 2] = sums[E + 1] + s.forwards, sums[E + 2] + s.routed
    sums[E + 3], sums[E + 4], sums[E + 5] = sums[E + 3] + s.kept, sums[E + 4] + s.aux_loss, sums[E + 5] + s.z_loss
    rows_sent, rows_received, seconds = rows_sent + s.rows_sent, rows_received + s.rows_received,
      seconds + s.dispatch_seconds
  end
  -- this rank's dispatch traffic against the arithmetic; for alltoall the rows come from the routing
  -- counts (the EP group's, summed over the optimizer's EP communicator)
  local dispatch
  local ep = run.ep_comm
  if ep then
    local st = ep:stats()
    ep:reset_stats()
    local bytes = st.bytes - (run.ep_excluded or 0)
    run.ep_excluded = 0
    local sent, received = rows_sent, rows_received
    if m.moe_token_dispatcher_type == "alltoall" then
      local own = {}
      for e = 1, E do own[e] = sums[e] end
      local t <close> = core.tensor.from(own, "int64")
      local all = run.optimizer.ep:all_reduce(t, "sum"):to_table()
      sent, received = expert_parallel.remote_rows(own, all, ep:rank(), E // m.expert_model_parallel_size,
        ep:size() // m.expert_model_parallel_size)
    end
    dispatch = { bytes = bytes, expected = expert_parallel.expected_bytes(m, sums[E + 1], sent, received),
      forwards = sums[E + 1], seconds = seconds }
  end
  -- the expert biases' range (the same on every rank of a stage; the stages' MoE layers differ)
  local bias_lo, bias_hi = math.huge, -math.huge
  for _, chunk in ipairs(run.chunks) do
    for _, b in ipairs(chunk:expert_biases()) do
      for _, v in ipairs(b.bias:to_table()) do bias_lo, bias_hi = math.min(bias_lo, v), math.max(bias_hi, v) end
    end
  end
  local g = run.ps.groups.pp
  if g and g:size() > 1 then
    local t <close> = core.tensor.from(sums, "float32")
    sums = g:all_reduce(t, "sum"):to_table()
  end
  local n = math.max(sums[E + 1], 1)
  local lo, hi, total = math.huge, 0, 0
  for e = 1, E do
    lo, hi, total = math.min(lo, sums[e] / n), math.max(hi, sums[e] / n), total + sums[e] / n
  end
  return { tokens_min = lo, tokens_mean = total / E, tokens_max = hi,
    dropped = math.max(0, 1 - sums[E + 3] / math.max(sums[E + 2], 1)), aux_loss = sums[E + 4] / n,
    z_loss = sums[E + 5] / n, dispatcher = m.moe_token_dispatcher_type, dispatch = dispatch,
    expert_bias = m.moe_router_enable_expert_bias
      and { -sum_over_stages(run, -bias_lo, "max"), sum_over_stages(run, bias_hi, "max") } or nil }
end

-- "GPT(layers=2, ...)" of the whole model, and with pipeline stages what this rank's chunks hold.
local function describe_model(run)
  local m = run.r.model
  local text = ("GPT(layers=%d, hidden=%d, heads=%d, vocab=%d, seq=%d)"):format(m.num_layers, m.hidden_size,
    m.num_attention_heads, run.r.padded_vocab_size, m.seq_length)
  if m.pipeline_model_parallel_size == 1 then return text end
  local parts = {}
  for i, chunk in ipairs(run.chunks) do parts[i] = tostring(chunk) end
  return text .. ", this rank: " .. table.concat(parts, " + ")
end

-- Per-rank memory of the training state and the bytes data parallelism moves per step.
local function describe_parallel(run, log)
  local ps, opt = run.ps, run.optimizer
  local m = opt:memory()
  local r = run.r
  if r.model.tensor_model_parallel_size > 1 or r.model.context_parallel_size > 1 then
    -- what a forward keeps per microbatch (of this rank's part of the sequence under context
    -- parallelism), and the part of it sequence parallelism divides by TP
    local tp, B = r.model.tensor_model_parallel_size, r.train.micro_batch_size
    local T = r.model.seq_length // r.model.context_parallel_size
    local held, parts = 0, {}
    for _, chunk in ipairs(run.chunks) do held = held + chunk:activation_bytes(B, T) end
    if r.model.context_parallel_size > 1 then
      parts[#parts + 1] = ("%d of the sequence's %d positions"):format(T, r.model.seq_length)
    end
    if tp > 1 then
      local regions = tensor_parallel.sequence_parallel_region_bytes(r, run.chunks, B * T)
      parts[#parts + 1] = ("the sequence-parallel regions: %.3f MiB on one rank, %s"):format(mib(regions),
        r.model.sequence_parallel and ("%.3f MiB here, 1/%d"):format(
          mib(tensor_parallel.sequence_parallel_region_bytes(r, run.chunks, B * T // tp)), tp)
          or "all of it here without sequence parallelism")
    end
    log:info("activations per microbatch on this rank: %.3f MiB%s (%s)", mib(held),
      r.model.sequence_parallel and " with sequence parallelism" or "", table.concat(parts, "; "))
    run.activation_bytes = held
  end
  log:info("%s | data parallel %d (%s)", parallel.describe(ps), run.dp_size,
    m.sharded and "distributed optimizer" or "DDP")
  log:info("memory per rank: parameters %.2f MiB%s, gradients %.2f MiB, optimizer state %.2f MiB "
    .. "(formula %.2f MiB%s)", mib(m.params),
    run.r.model.bf16 and (" (+ %.2f MiB bf16 copy)"):format(mib(m.params / 2)) or "", mib(m.grads), mib(m.optimizer),
    mib(m.formula), m.sharded and " = 12 bytes x parameters / DP" or " = 8 bytes x parameters")
end

-- The Chrome trace of the run's steps (--trace=FILE), gathered on rank 0, which writes it.
local function write_trace(run, path, log)
  if not run.recorder then return end
  run.recorder:write(path, run.ps.world, function(r) return run.ps.grid.coords(r).pp_rank end)
  log:info("wrote the pipeline trace %s (open it in ui.perfetto.dev or chrome://tracing)", path)
end

-- pretrain(config [, args [, opts]]): train config.train.train_iters steps, logging, evaluating and
-- checkpointing as the config says. args: command-line overrides (see luatron.overrides); any
-- other argument is an error, so a recipe with arguments of its own passes overrides.split's.
-- opts.schedule: the pipeline schedule, a name ("1f1b", "interleaved", ...) or a function of
-- one's own (see luatron.schedules); Megatron's choice by default. opts.trace (or --trace=FILE):
-- write a Chrome trace of every rank's pipeline steps to FILE at the end.
function M.pretrain(cfg, args, opts)
  if getmetatable(cfg) == nil then cfg = config.ConfigContainer(cfg) end
  local help, switches = overrides.apply(cfg, args)
  if help then
    print(overrides.help(cfg, args and args[0]))
    os.exit(0, true)
  end
  opts = opts or {}
  opts.trace = opts.trace or switches.trace
  local run = M.setup(cfg, opts)
  local r = run.r
  local train, ck, lg = r.train, r.checkpoint, r.logger
  local lead = run.ps.rank == 0
  if ck.save and lead then check_writable(ck.save, "checkpoint.save") end
  local metrics_path = lg.metrics_file or (lg.tensorboard_dir and lg.tensorboard_dir .. "/metrics.jsonl")
    or (ck.save and ck.save .. "/metrics.jsonl")
  local log = logger_lib.new { log_interval = lg.log_interval, train_iters = train.train_iters,
    metrics_path = lead and metrics_path or nil, quiet = not lead, device = r.model.device,
    tensorboard_dir = lg.tensorboard_dir, tensorboard_log_interval = lg.tensorboard_log_interval }
  local resumed, how = M.maybe_resume(run, log)
  if resumed and how ~= "finetune" then log:resumed_at(run.state.iteration) end
  if lg.save_config_filepath and lead then
    local f = assert(io.open(lg.save_config_filepath, "w"))
    f:write(json.encode(config.to_table(cfg)), "\n")
    f:close()
  end
  if train.skip_train then
    -- Megatron's skip_train: evaluate the (loaded) model and train nothing
    local vloss = run.valid_data and M.evaluate(run, run.state.iteration // train.eval_interval)
    if vloss then
      log:validation(run.state.iteration, vloss)
    else
      log:info("train.skip_train = true and no validation (train.eval_iters / eval_interval): nothing to do")
    end
    log:close()
    return { iteration = run.state.iteration, validation_loss = vloss, run = run }
  end
  if train.exit_signal_handler then core.catch_signal("SIGTERM") end
  log:info("luatron: %s | %d parameters | %d microbatch(es) of %d x %d tokens per step per rank | %s on %s%s",
    describe_model(run), over_model(run, function(_, p) return p.numel end), r.num_microbatches,
    train.micro_batch_size,
    r.model.seq_length, r.model.bf16 and "bf16 mixed precision" or "fp32", r.model.device,
    resumed and "" or " | from scratch")
  if r.padded_vocab_size ~= r.model.vocab_size then -- Megatron's _vocab_size_with_padding says so too
    log:info("padded vocab (size: %d) with %d dummy tokens (new size: %d): a multiple of "
      .. "make_vocab_size_divisible_by (%d) x tensor_model_parallel_size (%d)", r.model.vocab_size,
      r.padded_vocab_size - r.model.vocab_size, r.padded_vocab_size, r.model.make_vocab_size_divisible_by,
      r.model.tensor_model_parallel_size)
  end
  if run.ps.world_size > 1 then describe_parallel(run, log) end
  for _, w in ipairs(r.warnings or {}) do log:info("warning: %s", w) end
  if run.state.iteration >= train.train_iters and not train.skip_train then
    log:info("nothing to do: the checkpoint is at iteration %d and train.train_iters = %d (raise train_iters, with "
      .. "scheduler.override_opt_param_scheduler = true, to train on)", run.state.iteration, train.train_iters)
  end
  local tokens_per_step = train.global_batch_size * r.model.seq_length
  local last_loss
  local started = core.clock()
  take_comm_stats(run)
  while run.state.iteration < train.train_iters do
    local t0 = core.clock()
    local loss, grad_norm, lr = M.train_step(run)
    last_loss = loss
    local comm = run.comm_stats
    log:step { iteration = run.state.iteration, loss = loss, lr = lr, grad_norm = grad_norm,
      params_norm = lg.log_params_norm and function()
        run.optimizer:sync_params()
        return math.sqrt(over_model(run, function(chunk, p) return chunk:param(p.name):norm() ^ 2 end))
      end or nil,
      step_time = core.clock() - t0, tokens = tokens_per_step, consumed_samples = run.state.consumed_samples,
      comm_bytes = comm and comm.bytes, comm_expected = comm and run.comm_expected,
      comm_seconds = comm and comm.seconds, comm_exposed_seconds = run.optimizer.exposed_seconds,
      pipeline_bubble = run.link and function() return mean_over_stages(run, run.bubble) end or nil,
      pipeline_bubble_formula = timeline.bubble_formula(r.model.pipeline_model_parallel_size,
        r.model.virtual_pipeline_model_parallel_size, r.num_microbatches),
      pipeline_interleaved = r.model.virtual_pipeline_model_parallel_size ~= nil,
      p2p_bytes = run.p2p_bytes, p2p_expected = run.p2p_expected,
      tp_bytes = run.tp_bytes, tp_expected = run.tp_expected, tp_seconds = run.tp_seconds,
      cp_bytes = run.cp_bytes, cp_expected = run.cp_expected, cp_hidden = run.cp_hidden,
      moe = r.model.num_moe_experts and function() return moe_stats(run) end or nil }
    local it = run.state.iteration
    if run.valid_data and it % train.eval_interval == 0 then
      local vloss = excluding_comm(run, function() return M.evaluate(run) end)
      log:validation(it, vloss)
    end
    local saved = false
    if ck.save and ck.save_interval and it % ck.save_interval == 0 then
      log:info("saved checkpoint %s", M.save(run))
      saved = true
    end
    local minutes = (core.clock() - started) / 60
    local signalled = train.exit_signal_handler and signal_received(run)
    if signalled or (train.exit_interval and it % train.exit_interval == 0)
        or (train.exit_duration_in_mins and minutes >= train.exit_duration_in_mins) then
      if ck.save and not saved then log:info("saved checkpoint %s", M.save(run)) end
      run.optimizer:sync_params()
      log:info("exiting at iteration %d (%s)", it, signalled and "SIGTERM received: train.exit_signal_handler"
        or "train.exit_interval / exit_duration_in_mins")
      write_trace(run, opts.trace, log)
      log:close()
      return { iteration = it, loss = last_loss, run = run, exited_early = true }
    end
  end
  if ck.save and (not ck.save_interval or run.state.iteration % ck.save_interval ~= 0) and last_loss then
    log:info("saved checkpoint %s", M.save(run))
  end
  run.optimizer:sync_params()
  write_trace(run, opts.trace, log)
  log:close()
  return { iteration = run.state.iteration, loss = last_loss, run = run }
end

return M

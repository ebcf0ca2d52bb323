-- Progress output of a training run: a line every log_interval (step, loss, learning rate,
-- grad norm, tokens/s, step time, peak memory), a progress bar between them when stdout is
-- a terminal, the same figures as JSON lines for plotting, and TensorBoard scalars under
-- Megatron's tags (luatron.tensorboard).
local core = require "luatron.core"
local json = require "luatron.json"
local fs = require "luatron.fs"
local tensorboard = require "luatron.tensorboard"

local M = {}
M.__index = M

local function mib(bytes) return bytes / (1024 * 1024) end

-- A loss as people read it: 4 decimals, or exponent notation when that would be unreadable.
local function loss_text(x)
  if x ~= x or math.abs(x) >= 1e5 or (x ~= 0 and math.abs(x) < 1e-3) then return ("%.4e"):format(x) end
  return ("%.4f"):format(x)
end

-- Progress bars only on a terminal of our own: launchers that give ranks a pty (mpirun, srun)
-- interleave them, so escape codes would end up in their logs.
local function own_terminal()
  for _, v in ipairs { "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_PROCID", "LUATRON_RANK" } do
    if os.getenv(v) then return false end
  end
  return os.getenv("TERM") ~= "dumb" and core.isatty(1)
end

-- opts: log_interval, train_iters, metrics_path (nil: no file), out (default io.stdout),
-- quiet (print nothing: the ranks other than the one that reports), device (whose memory the
-- peak figure reports: "cpu" or "cuda"), tensorboard_dir (nil: none) and tensorboard_log_interval
-- (the steps whose loss, learning rate and gradient norm go to TensorBoard; the other figures go on
-- logged steps).
function M.new(opts)
  local self = setmetatable({
    quiet = opts.quiet,
    device = opts.device or "cpu",
    log_interval = opts.log_interval or 1,
    train_iters = opts.train_iters,
    out = opts.out or io.stdout,
    tty = own_terminal(),
    window = { steps = 0, time = 0, tokens = 0 },
    tb_interval = opts.tensorboard_log_interval or 1,
  }, M)
  if opts.tensorboard_dir and not opts.quiet then self.tb = tensorboard.writer(opts.tensorboard_dir) end
  if opts.metrics_path then
    local dir = opts.metrics_path:match("^(.*)/[^/]*$")
    if dir then fs.mkdir_p(dir) end
    self.metrics_path = opts.metrics_path
    local err
    self.metrics, err = io.open(opts.metrics_path, "a")
    if not self.metrics then error(("the metrics file cannot be written: %s"):format(err), 0) end
  end
  return self
end

function M:info(fmt, ...)
  if self.quiet then return end
  if self.tty then self.out:write("\r\27[K") end
  self.out:write(fmt:format(...), "\n")
  self.out:flush()
end

local function bar(done, total, width)
  local filled = math.floor(width * done / math.max(total, 1))
  return ("[%s%s] %d/%d"):format(("="):rep(filled), (" "):rep(width - filled), done, total)
end

-- r: iteration, loss, lr, grad_norm, step_time (s), tokens (this step), consumed_samples, and
-- params_norm: nil or a function computing it (only on the steps that are logged, on every rank);
-- with pipeline stages pipeline_bubble likewise (the measured bubble), pipeline_bubble_formula,
-- pipeline_interleaved, p2p_bytes and p2p_expected (this rank's point-to-point bytes this step);
-- with tensor parallelism tp_bytes, tp_expected and tp_seconds (the model's TP collectives this step);
-- with context parallelism cp_bytes, cp_expected and cp_hidden (the ring's share hidden behind compute);
-- with MoE layers moe: a function giving the routing statistics (called on logged steps, every rank).
function M:step(r)
  local w = self.window
  w.steps, w.time, w.tokens = w.steps + 1, w.time + r.step_time, w.tokens + r.tokens
  local logged = r.iteration % self.log_interval == 0 or r.iteration == self.train_iters
  -- on every rank, quiet or not: with pipeline stages the norm is a sum over them
  local params_norm = logged and r.params_norm and r.params_norm() or nil
  local bubble = logged and r.pipeline_bubble and r.pipeline_bubble() or nil
  local moe = logged and r.moe and r.moe() or nil
  if self.quiet then return end
  if self.tb and r.iteration % self.tb_interval == 0 then
    self.tb:scalar("lm loss", r.loss, r.iteration)
    self.tb:scalar("learning-rate", r.lr, r.iteration)
    self.tb:scalar("grad-norm", r.grad_norm, r.iteration)
  end
  if not logged then
    if self.tty then
      self.out:write("\r", bar(r.iteration, self.train_iters, 30), " loss ", loss_text(r.loss))
      self.out:flush()
    end
    return
  end
  local mem = core.memory(self.device)
  local rec = {
    iteration = r.iteration,
    consumed_samples = r.consumed_samples,
    loss = r.loss,
    lr = r.lr,
    grad_norm = r.grad_norm,
    params_norm = params_norm, -- LoggerConfig.log_params_norm
    step_time_ms = 1000 * w.time / w.steps,
    tokens_per_s = w.tokens / w.time,
    peak_memory_mib = mib(mem.peak),
    rss_peak_mib = mib(mem.rss_peak),
    comm_bytes_per_step = r.comm_bytes,
    comm_expected_bytes = r.comm_expected,
    comm_seconds = r.comm_seconds,
    comm_hidden_fraction = r.comm_exposed_seconds and r.comm_seconds and r.comm_seconds > 0
      and math.max(0, 1 - r.comm_exposed_seconds / r.comm_seconds) or nil,
    pipeline_bubble = bubble,
    pipeline_bubble_formula = bubble and r.pipeline_bubble_formula,
    p2p_bytes_per_step = r.p2p_bytes,
    p2p_expected_bytes = r.p2p_expected,
    tp_bytes_per_step = r.tp_bytes,
    tp_expected_bytes = r.tp_expected,
    cp_bytes_per_step = r.cp_bytes,
    cp_expected_bytes = r.cp_expected,
    cp_hidden_fraction = r.cp_hidden,
    moe_tokens_per_expert_min = moe and moe.tokens_min,
    moe_tokens_per_expert_mean = moe and moe.tokens_mean,
    moe_tokens_per_expert_max = moe and moe.tokens_max,
    moe_dropped_fraction = moe and moe.dropped,
    moe_aux_loss = moe and moe.aux_loss,
    moe_z_loss = moe and moe.z_loss,
    moe_dispatch_bytes = moe and moe.dispatch and moe.dispatch.bytes, -- since the last logged step
    moe_dispatch_expected_bytes = moe and moe.dispatch and moe.dispatch.expected,
    moe_dispatch_time_fraction = moe and moe.dispatch and moe.dispatch.seconds / w.time,
    moe_expert_bias_min = moe and moe.expert_bias and moe.expert_bias[1],
    moe_expert_bias_max = moe and moe.expert_bias and moe.expert_bias[2],
  }
  self:info("iteration %6d/%d | loss %s | lr %.3e | grad norm %.3f%s | %.0f tokens/s | %.1f ms/step | "
    .. "peak memory %.1f MiB%s (rss %.0f MiB)", rec.iteration, self.train_iters, loss_text(rec.loss), rec.lr,
    rec.grad_norm, rec.params_norm and (" | params norm %.3f"):format(rec.params_norm) or "", rec.tokens_per_s,
    rec.step_time_ms, rec.peak_memory_mib, self.device == "cpu" and "" or " on " .. self.device, rec.rss_peak_mib)
  if r.comm_bytes then
    self:info("  data-parallel traffic %.3f MB/step (ring formula %.3f MB, measured/expected %.4f), %.1f ms/step in "
      .. "collectives", rec.comm_bytes_per_step / 1e6, r.comm_expected / 1e6,
      rec.comm_bytes_per_step / math.max(r.comm_expected, 1), 1000 * r.comm_seconds)
    if rec.comm_hidden_fraction then
      self:info("  gradient reduction overlapped with backward: %.0f%% of it hidden (%.1f ms exposed)",
        100 * rec.comm_hidden_fraction, 1000 * r.comm_exposed_seconds)
    end
  end
  if r.tp_bytes then
    self:info("  tensor-parallel traffic %.3f MB/step on this rank (ring formula %.3f MB, measured/expected %.4f), "
      .. "%.1f ms/step in collectives", r.tp_bytes / 1e6, r.tp_expected / 1e6, r.tp_bytes / math.max(r.tp_expected, 1),
      1000 * r.tp_seconds)
  end
  if moe then
    self:info("  MoE: tokens per expert %.1f / %.1f / %.1f (min / mean / max, per layer and microbatch), %.1f%% "
      .. "dropped, aux loss %.4g, z-loss %.4g (per layer and microbatch)%s", moe.tokens_min, moe.tokens_mean,
      moe.tokens_max, 100 * moe.dropped, moe.aux_loss, moe.z_loss, moe.expert_bias
        and (", expert bias in [%.4g, %.4g]"):format(moe.expert_bias[1], moe.expert_bias[2]) or "")
    local d = moe.dispatch
    if d then
      self:info("  MoE %s dispatch: %.3f MB per layer and microbatch on this rank (arithmetic %.3f MB, "
        .. "measured/expected %.4f), %.1f%% of the step time in its exchanges and permutes", moe.dispatcher,
        d.bytes / math.max(d.forwards, 1) / 1e6, d.expected / math.max(d.forwards, 1) / 1e6,
        d.bytes / math.max(d.expected, 1), 100 * rec.moe_dispatch_time_fraction)
    else
      self:info("  MoE dispatcher %s: one expert-parallel rank, nothing to dispatch over", moe.dispatcher)
    end
  end
  if r.cp_bytes then
    self:info("  context-parallel ring %.3f MB/step on this rank (arithmetic %.3f MB, measured/expected %.4f), %s",
      r.cp_bytes / 1e6, r.cp_expected / 1e6, r.cp_bytes / math.max(r.cp_expected, 1),
      r.cp_hidden and ("%.0f%% of its time hidden behind the blocks' attention"):format(100 * r.cp_hidden) or "")
  end
  if bubble then
    self:info("  pipeline bubble %.3f of the compute time (measured, mean over stages; (PP - 1) / %s = %.3f), "
      .. "point-to-point %.3f MB/step on this rank (arithmetic %.3f MB)", bubble,
      r.pipeline_interleaved and "(VPP x M)" or "M", r.pipeline_bubble_formula, (r.p2p_bytes or 0) / 1e6,
      (r.p2p_expected or 0) / 1e6)
  end
  self:record(rec)
  if self.tb then
    if rec.params_norm then self.tb:scalar("params-norm", rec.params_norm, r.iteration) end
    self.tb:scalar("tokens-per-second", rec.tokens_per_s, r.iteration)
    self.tb:scalar("mem-max-allocated-bytes", mem.peak, r.iteration)
  end
  self.window = { steps = 0, time = 0, tokens = 0 }
end

-- A validation result: the log line, the metrics record and TensorBoard's "lm loss validation" and
-- "lm loss validation ppl".
function M:validation(iteration, loss)
  self:info("validation at iteration %d | loss %.4f | perplexity %.2f", iteration, loss, math.exp(loss))
  self:record { iteration = iteration, validation_loss = loss }
  if self.tb and not self.quiet then
    self.tb:scalar("lm loss validation", loss, iteration)
    self.tb:scalar("lm loss validation ppl", math.exp(loss), iteration)
  end
end

-- Writes one JSON line to the metrics file (if any).
function M:record(rec)
  if self.metrics then
    self.metrics:write(json.encode(rec), "\n")
    self.metrics:flush()
  end
end

-- After a resume from `iteration`: the records of later iterations (written by the run that went
-- on past the checkpoint) are dropped, so the file holds each iteration once.
function M:resumed_at(iteration)
  if not self.metrics then return end
  self.metrics:close()
  local kept = {}
  for line in io.lines(self.metrics_path) do
    local ok, rec = pcall(json.decode, line)
    if not (ok and type(rec) == "table" and (rec.iteration or 0) > iteration) then kept[#kept + 1] = line end
  end
  local tmp = self.metrics_path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  for _, line in ipairs(kept) do f:write(line, "\n") end
  f:close()
  assert(os.rename(tmp, self.metrics_path))
  self.metrics = assert(io.open(self.metrics_path, "a"))
end

function M:close()
  if self.metrics then self.metrics:close() end
  if self.tb then self.tb:close() end
end

return M

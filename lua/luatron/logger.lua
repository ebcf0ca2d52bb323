-- Progress output of a training run: a line every log_interval (step, loss, learning rate,
-- grad norm, tokens/s, step time, peak memory), a progress bar between them when stdout is
-- a terminal, and the same figures as JSON lines for plotting.
local core = require "luatron.core"
local json = require "luatron.json"

local M = {}
M.__index = M

local function mib(bytes) return bytes / (1024 * 1024) end

-- opts: log_interval, train_iters, metrics_path (nil: no file), out (default io.stdout),
-- quiet (print nothing: the ranks other than the one that reports), device (whose memory the
-- peak figure reports: "cpu" or "cuda").
function M.new(opts)
  local self = setmetatable({
    quiet = opts.quiet,
    device = opts.device or "cpu",
    log_interval = opts.log_interval or 1,
    train_iters = opts.train_iters,
    out = opts.out or io.stdout,
    tty = core.isatty(1),
    window = { steps = 0, time = 0, tokens = 0 },
  }, M)
  if opts.metrics_path then
    local dir = opts.metrics_path:match("^(.*)/[^/]*$")
    if dir then os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'") end
    self.metrics = assert(io.open(opts.metrics_path, "a"))
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
-- params_norm: nil or a function computing it (only on the steps that are logged).
function M:step(r)
  local w = self.window
  w.steps, w.time, w.tokens = w.steps + 1, w.time + r.step_time, w.tokens + r.tokens
  if self.quiet then return end
  if r.iteration % self.log_interval ~= 0 and r.iteration ~= self.train_iters then
    if self.tty then
      self.out:write("\r", bar(r.iteration, self.train_iters, 30), (" loss %.4f"):format(r.loss))
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
    params_norm = r.params_norm and r.params_norm(), -- LoggerConfig.log_params_norm
    step_time_ms = 1000 * w.time / w.steps,
    tokens_per_s = w.tokens / w.time,
    peak_memory_mib = mib(mem.peak),
    rss_peak_mib = mib(mem.rss_peak),
    comm_bytes_per_step = r.comm_bytes,
    comm_expected_bytes = r.comm_expected,
    comm_seconds = r.comm_seconds,
    comm_hidden_fraction = r.comm_exposed_seconds and r.comm_seconds and r.comm_seconds > 0
      and math.max(0, 1 - r.comm_exposed_seconds / r.comm_seconds) or nil,
  }
  self:info("iteration %6d/%d | loss %.4f | lr %.3e | grad norm %.3f%s | %.0f tokens/s | %.1f ms/step | "
    .. "peak memory %.1f MiB%s (rss %.0f MiB)", rec.iteration, self.train_iters, rec.loss, rec.lr, rec.grad_norm,
    rec.params_norm and (" | params norm %.3f"):format(rec.params_norm) or "", rec.tokens_per_s, rec.step_time_ms, rec.peak_memory_mib, self.device == "cpu" and "" or " on " .. self.device,
    rec.rss_peak_mib)
  if r.comm_bytes then
    self:info("  data-parallel traffic %.3f MB/step (ring formula %.3f MB, measured/expected %.4f), %.1f ms/step in "
      .. "collectives", rec.comm_bytes_per_step / 1e6, r.comm_expected / 1e6,
      rec.comm_bytes_per_step / math.max(r.comm_expected, 1), 1000 * r.comm_seconds)
    if rec.comm_hidden_fraction then
      self:info("  gradient reduction overlapped with backward: %.0f%% of it hidden (%.1f ms exposed)",
        100 * rec.comm_hidden_fraction, 1000 * r.comm_exposed_seconds)
    end
  end
  self:record(rec)
  self.window = { steps = 0, time = 0, tokens = 0 }
end

-- Writes one JSON line to the metrics file (if any).
function M:record(rec)
  if self.metrics then
    self.metrics:write(json.encode(rec), "\n")
    self.metrics:flush()
  end
end

function M:close()
  if self.metrics then self.metrics:close() end
end

return M

-- Learning-rate schedule, as Megatron's OptimizerParamScheduler: linear warmup from
-- lr_warmup_init to lr, then constant, linear, cosine, inverse-square-root or WSD
-- (warmup-stable-decay) decay to min_lr over lr_decay_iters.
local M = {}

-- The annealing phase of WSD: coefficient of (lr - min_lr) at ratio r of the phase.
local WSD = {
  linear = function(r) return 1 - r end,
  cosine = function(r) return 0.5 * (math.cos(math.pi * r) + 1) end,
  exponential = function(r) return 2 * 0.5 ^ r - 1 end,
  minus_sqrt = function(r) return 1 - math.sqrt(r) end,
}

-- lr at `step` optimizer steps already taken (Megatron evaluates it before each update,
-- so the first update uses step 0).
function M.lr_at(step, opt, sched, train_iters)
  local max_lr, min_lr = opt.lr, opt.min_lr or 0
  local warmup = sched.lr_warmup_iters or 0
  local init = sched.lr_warmup_init or 0
  if warmup > 0 and step <= warmup then
    return init + (max_lr - init) * step / warmup
  end
  local style = sched.lr_decay_style or "constant"
  if style == "constant" then return max_lr end
  local decay_iters = sched.lr_decay_iters or train_iters
  if step > decay_iters then return min_lr end
  local coeff
  if style == "inverse-square-root" then
    return math.max(min_lr, max_lr * math.sqrt(math.max(warmup, 1)) / math.sqrt(math.max(step, 1)))
  elseif style == "WSD" then
    -- warmup, stable at lr, then the last lr_wsd_decay_iters anneal to min_lr
    local anneal_start = decay_iters - (sched.lr_wsd_decay_iters or decay_iters)
    if step <= anneal_start then return max_lr end
    local r = (step - anneal_start) / (decay_iters - anneal_start)
    coeff = WSD[sched.lr_wsd_decay_style or "exponential"](r)
  else
    local ratio = (step - warmup) / math.max(decay_iters - warmup, 1)
    if style == "linear" then
      coeff = 1 - ratio
    elseif style == "cosine" then
      coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else
      error(("SchedulerConfig.lr_decay_style = %q is not supported (constant, linear, cosine, inverse-square-root, WSD)")
        :format(style), 0)
    end
  end
  return min_lr + coeff * (max_lr - min_lr)
end

return M

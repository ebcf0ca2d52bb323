-- lt.moe: Megatron-Core's MoE router (TopKRouter.routing, MEGATRON_SEMANTICS.md §6) on a [tokens, experts]
-- fp32 host tensor of router logits, for people who script their own MoE layers and for checking
-- (engine/parallel/moe_router.h has the math).
--
--   local routed = lt.moe.route(logits, { topk = 2, aux_loss_coeff = 1e-2 })
--   routed.probs              fp32 [T, E], 0 where a token is not routed (or was dropped)
--   routed.routing_map        int32 [T, E], 0/1 (with pad_to_capacity: the capacity mask)
--   routed.tokens_per_expert  int64 [E]: what each expert is sent, after dropping and padding
--   routed.aux_loss, routed.z_loss   numbers, coefficients applied (0 when off)
--   local dlogits = lt.moe.route_backward(logits, routed, opts, dprobs [, daux [, dz]])
--     the gradient of sum(dprobs probs) + daux aux_loss + dz z_loss (daux, dz default 1: Megatron's
--     MoEAuxLossAutoScaler scale) with respect to the logits, fp32 [T, E].
--   lt.moe.aux_counts(logits, opts) int64: this rank's counts of the aux loss, to sum over TP x CP
--     (over TP x DP x CP for global_aux_loss).
--   lt.moe.global_counts_add(tracker, counts) fp32 [E]: global_aux_loss's running average (Megatron's
--     global_tokens_per_expert / ga_steps, in fp32): tracker = { sum = lt.tensor.zeros({ E }), steps = 0 }
--     at each step's start, counts = a microbatch's aux_counts summed over TP x DP x CP; it updates the
--     tracker and returns the global_counts option for that microbatch.
--
-- Options (Megatron's names without the moe_ / moe_router_ prefix; defaults Megatron's):
--   topk (2), score_function "softmax" | "sigmoid", pre_softmax (false), topk_scaling_factor (none),
--   expert_bias (fp32 tensor [E], sigmoid only), capacity_factor (none; negative: none, as Megatron),
--   drop_policy "probs" | "position", pad_to_capacity (false), load_balancing_type "aux_loss" |
--   "seq_aux_loss" | "global_aux_loss" | "sinkhorn" | "none", aux_loss_coeff (0), z_loss_coeff (none),
--   seq_length and micro_batch_size (seq_aux_loss: token t = s B + b; default one sequence of all the
--   tokens), tp_cp_size (1) with aux_counts (int64 tensor: the aux loss's counts summed over the TP x CP
--   group, needed when it is > 1), tp_dp_cp_size (1) with global_counts (global_aux_loss: fp32 [E], the
--   running average of the counts summed over the TP x DP x CP group, from global_counts_add; needed when
--   it is > 1; without it a rank's own counts), eval (false: Megatron's router outside training; sinkhorn
--   then picks by its activation).
--   sinkhorn picks each token's top-k of Megatron's sinkhorn-normalised logits and weighs them by
--   sigmoid (topk 1) or softmax over all experts; it ignores score_function, pre_softmax,
--   topk_scaling_factor and expert_bias, as Megatron, and refuses capacity_factor and aux_loss_coeff.
local core = require "luatron.core"

local M = {}

local TENSOR_MT = getmetatable(core.tensor.zeros({ 1 }))
local function is_tensor(v) return getmetatable(v) == TENSOR_MT end

local function choice(name, values)
  return function(v)
    for _, x in ipairs(values) do
      if v == x then return end
    end
    return string.format("%s must be one of %s, got %s", name, table.concat(values, ", "), tostring(v))
  end
end

local function positive_integer(name)
  return function(v)
    if math.type(v) ~= "integer" or v < 1 then return name .. " must be a positive integer, got " .. tostring(v) end
  end
end

local function number(name)
  return function(v)
    if type(v) ~= "number" or v ~= v then return name .. " must be a number, got " .. tostring(v) end
  end
end

local function boolean(name)
  return function(v)
    if type(v) ~= "boolean" then return name .. " must be true or false, got " .. tostring(v) end
  end
end

local function tensor(name)
  return function(v)
    if not is_tensor(v) then return name .. " must be a tensor, got " .. type(v) end
  end
end

local CHECKS = {
  topk = positive_integer("topk"),
  score_function = choice("score_function", { "softmax", "sigmoid" }),
  pre_softmax = boolean("pre_softmax"),
  topk_scaling_factor = number("topk_scaling_factor"),
  expert_bias = tensor("expert_bias"),
  capacity_factor = function(v)
    local bad = number("capacity_factor")(v)
    if bad then return bad end
    if v == 0 then return "capacity_factor 0 would drop every token: give a positive factor, or nil for none" end
  end,
  drop_policy = choice("drop_policy", { "probs", "position" }),
  pad_to_capacity = boolean("pad_to_capacity"),
  load_balancing_type = choice("load_balancing_type",
    { "aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none" }),
  aux_loss_coeff = number("aux_loss_coeff"),
  z_loss_coeff = number("z_loss_coeff"),
  seq_length = positive_integer("seq_length"),
  micro_batch_size = positive_integer("micro_batch_size"),
  tp_cp_size = positive_integer("tp_cp_size"),
  aux_counts = tensor("aux_counts"),
  tp_dp_cp_size = positive_integer("tp_dp_cp_size"),
  global_counts = tensor("global_counts"),
  eval = boolean("eval"),
}

local BALANCING = { none = 0, aux_loss = 1, seq_aux_loss = 2, sinkhorn = 3, global_aux_loss = 4 }

-- The C fields (engine/lua/moe.c) for opts and logits [T, E]; errors name the caller (what).
local function config(what, logits, opts)
  if not is_tensor(logits) or logits:dim() ~= 2 then
    error(what .. ": logits must be a [tokens, experts] fp32 tensor", 3)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error(what .. ": options must be a table", 3) end
  local unknown = {}
  for k in pairs(opts) do
    if not CHECKS[k] then unknown[#unknown + 1] = tostring(k) end
  end
  if #unknown > 0 then
    table.sort(unknown)
    error(string.format("%s: unknown option%s %s (known: topk, score_function, pre_softmax, topk_scaling_factor, "
      .. "expert_bias, capacity_factor, drop_policy, pad_to_capacity, load_balancing_type, aux_loss_coeff, "
      .. "z_loss_coeff, seq_length, micro_batch_size, tp_cp_size, aux_counts, tp_dp_cp_size, global_counts, eval)",
      what, #unknown > 1 and "s" or "",
      table.concat(unknown, ", ")), 3)
  end
  for k, v in pairs(opts) do
    local bad = CHECKS[k](v)
    if bad then error(what .. ": " .. bad, 3) end
  end
  local T = logits:size(1)
  local B = opts.micro_batch_size or 1
  local cf = opts.capacity_factor
  return {
    topk = opts.topk or 2,
    sigmoid = opts.score_function == "sigmoid",
    pre_softmax = opts.pre_softmax or false,
    topk_scaling_factor = opts.topk_scaling_factor,
    expert_bias = opts.expert_bias,
    capacity_factor = cf and cf > 0 and cf or nil,
    drop_by_position = opts.drop_policy == "position",
    pad_to_capacity = opts.pad_to_capacity or false,
    load_balancing = BALANCING[opts.load_balancing_type or "aux_loss"],
    aux_loss_coeff = opts.aux_loss_coeff,
    z_loss_coeff = opts.z_loss_coeff,
    seq_length = opts.seq_length or T // B,
    micro_batch_size = B,
    tp_cp_size = opts.tp_cp_size,
    aux_counts = opts.aux_counts,
    tp_dp_cp_size = opts.tp_dp_cp_size,
    global_counts = opts.global_counts,
    eval = opts.eval or false,
  }
end

function M.route(logits, opts)
  local probs, map, tpe, aux, z = core.moe_route(logits, config("moe.route", logits, opts))
  return { probs = probs, routing_map = map, tokens_per_expert = tpe, aux_loss = aux, z_loss = z }
end

function M.route_backward(logits, routed, opts, dprobs, daux, dz)
  local cfg = config("moe.route_backward", logits, opts)
  if type(routed) ~= "table" or not is_tensor(routed.routing_map) then
    error("moe.route_backward: routed must be what moe.route returned (a table with routing_map)", 2)
  end
  if not is_tensor(dprobs) then error("moe.route_backward: dprobs must be a [tokens, experts] fp32 tensor", 2) end
  return core.moe_route_backward(logits, routed.routing_map, cfg, dprobs, daux or 1, dz or 1)
end

function M.aux_counts(logits, opts)
  return core.moe_aux_counts(logits, config("moe.aux_counts", logits, opts))
end

function M.global_counts_add(tracker, counts)
  if type(tracker) ~= "table" or not is_tensor(tracker.sum) or type(tracker.steps) ~= "number" then
    error("moe.global_counts_add: tracker must be { sum = fp32 tensor [experts], steps = number }", 2)
  end
  if not is_tensor(counts) then error("moe.global_counts_add: counts must be an int64 tensor [experts]", 2) end
  local avg, steps = core.moe_global_counts_add(tracker.sum, tracker.steps, counts)
  tracker.steps = steps
  return avg
end

return M

-- Specs for lt.moe.route / route_backward (lua/luatron/moe.lua over engine/parallel/moe_router.h): the
-- interface (what comes back, option checks and their messages) and hand-computed cases; the router's
-- math in full is tests/parallel/moe_router_test.c's.
local lt = require "luatron"
local T = lt.tensor

local h = dofile("tests/lua/helpers.lua")
local assert_error_contains = h.assert_error_contains

local L2, L3 = math.log(2), math.log(3)

local function near(want, got, tol)
  assert(math.abs(want - got) <= (tol or 1e-6) * (1 + math.abs(want)), ("want %.9g, got %.9g"):format(want, got))
end

local function rows_near(want, t)
  local got = t:to_table()
  assert.are.equal(#want, #got)
  for i = 1, #want do
    for j = 1, #want[i] do near(want[i][j], got[i][j]) end
  end
end

describe("lt.moe.route", function()
  it("is reachable from require 'luatron'", function()
    assert.is_function(lt.moe.route)
    assert.is_function(lt.moe.route_backward)
    assert.is_function(lt.moe.aux_counts)
  end)

  it("routes top-2 after softmax by default: probs, int32 map, int64 counts, no losses", function()
    local r = lt.moe.route(T.from({ { 1, 3, 2, 0 }, { 2, 2, 2, 1 } }))
    local a = 1 / (1 + math.exp(-1))
    rows_near({ { 0, a, 1 - a, 0 }, { 0.5, 0.5, 0, 0 } }, r.probs) -- a three-way tie: the lowest two
    assert.are.equal("float32", r.probs:dtype())
    assert.are.equal("int32", r.routing_map:dtype())
    assert.are.same({ { 0, 1, 1, 0 }, { 1, 1, 0, 0 } }, r.routing_map:to_table())
    assert.are.equal("int64", r.tokens_per_expert:dtype())
    assert.are.same({ 1, 2, 1, 0 }, r.tokens_per_expert:to_table())
    assert.are.equal(0, r.aux_loss)
    assert.are.equal(0, r.z_loss)
  end)

  it("sigmoid with an expert bias routes on the biased scores and weighs by the unbiased ones", function()
    local logits = T.from({ { 0, L3, -L3, 0 } }) -- sigmoid .5 .75 .25 .5
    local r = lt.moe.route(logits, { score_function = "sigmoid", expert_bias = T.from({ 0, 0, 0.6, 0.1 }) })
    rows_near({ { 0, 0.75, 0.25, 0 } }, r.probs)
    r = lt.moe.route(logits, { score_function = "sigmoid", topk_scaling_factor = 2 })
    rows_near({ { 0.8, 1.2, 0, 0 } }, r.probs)
    r = lt.moe.route(T.from({ { 0, L2, math.log(5), 0 } }), { topk = 1, pre_softmax = true })
    rows_near({ { 0, 0, 5 / 9, 0 } }, r.probs)
  end)

  it("drops by probs or position and pads to the capacity", function()
    local p = { 0.9, 0.6, 0.8, 0.7 }
    local rows = {}
    for i, x in ipairs(p) do rows[i] = { math.log(x), math.log(1 - x) } end
    local logits = T.from(rows)
    local base = { topk = 1, pre_softmax = true, capacity_factor = 1.0 } -- capacity 2
    local function with(extra)
      local o = {}
      for k, v in pairs(base) do o[k] = v end
      for k, v in pairs(extra) do o[k] = v end
      return o
    end
    local r = lt.moe.route(logits, base)
    assert.are.same({ { 1, 0 }, { 0, 0 }, { 1, 0 }, { 0, 0 } }, r.routing_map:to_table())
    assert.are.same({ 2, 0 }, r.tokens_per_expert:to_table())
    r = lt.moe.route(logits, with { drop_policy = "position", pad_to_capacity = true })
    assert.are.same({ { 1, 1 }, { 1, 1 }, { 0, 0 }, { 0, 0 } }, r.routing_map:to_table())
    assert.are.same({ 2, 2 }, r.tokens_per_expert:to_table())
    rows_near({ { 0.9, 0 }, { 0.6, 0 }, { 0, 0 }, { 0, 0 } }, r.probs)
    r = lt.moe.route(logits, with { capacity_factor = -1 }) -- negative: none, as Megatron
    assert.are.same({ 4, 0 }, r.tokens_per_expert:to_table())
  end)

  it("computes the aux, seq_aux and z losses", function()
    local logits = T.from({ { L3, 0 }, { L3, 0 }, { L3, 0 }, { 0, L3 } })
    local opts = { topk = 1, pre_softmax = true, aux_loss_coeff = 0.1 }
    near(0.1125, lt.moe.route(logits, opts).aux_loss)
    opts.load_balancing_type = "seq_aux_loss"
    opts.seq_length, opts.micro_batch_size = 2, 2
    near(0.125, lt.moe.route(logits, opts).aux_loss)
    assert.are.same({ 2, 0, 1, 1 }, lt.moe.aux_counts(logits, opts):to_table())
    opts.load_balancing_type = "none"
    assert.are.equal(0, lt.moe.route(logits, opts).aux_loss)
    local z = lt.moe.route(T.from({ { 0, 0 }, { L3, 0 } }), { z_loss_coeff = 0.01 }).z_loss
    near(0.01 * 2.5 * L2 * L2, z)
  end)

  it("routes by sinkhorn: Megatron's balanced picks, the activation's probs, no aux loss", function()
    -- exp(logits) = a_t K_te b_e / 3 with K doubly stochastic: sinkhorn balances it to K / 3, whose
    -- largest entries are the diagonal, while every token's largest logit is expert 0's
    local K, a, b = { { .6, .3, .1 }, { .1, .6, .3 }, { .3, .1, .6 } }, { 1, 2, .5 }, { 10, 1, 1 }
    local rows = {}
    for t = 1, 3 do
      rows[t] = {}
      for e = 1, 3 do rows[t][e] = math.log(a[t] * K[t][e] * b[e] / 3) end
    end
    local logits = T.from(rows)
    local lg = logits:to_table() -- the fp32 logits, for the activations below
    local function sigmoid(x) return 1 / (1 + math.exp(-x)) end
    local r = lt.moe.route(logits, { topk = 1, load_balancing_type = "sinkhorn" }) -- no pre_softmax needed
    assert.are.same({ { 1, 0, 0 }, { 0, 1, 0 }, { 0, 0, 1 } }, r.routing_map:to_table())
    rows_near({ { sigmoid(lg[1][1]), 0, 0 }, { 0, sigmoid(lg[2][2]), 0 }, { 0, 0, sigmoid(lg[3][3]) } }, r.probs)
    assert.are.equal(0, r.aux_loss)
    r = lt.moe.route(logits, { topk = 1, load_balancing_type = "sinkhorn", eval = true }) -- by the activation
    assert.are.same({ 3, 0, 0 }, r.tokens_per_expert:to_table())
    r = lt.moe.route(logits, { topk = 2, load_balancing_type = "sinkhorn", score_function = "sigmoid",
      topk_scaling_factor = 3 }) -- both ignored by sinkhorn, as Megatron
    assert.are.same({ { 1, 1, 0 }, { 0, 1, 1 }, { 1, 0, 1 } }, r.routing_map:to_table())
    local want = {}
    for t = 1, 3 do
      local z = math.exp(lg[t][1]) + math.exp(lg[t][2]) + math.exp(lg[t][3])
      want[t] = {}
      for e = 1, 3 do want[t][e] = r.routing_map:to_table()[t][e] * math.exp(lg[t][e]) / z end
    end
    rows_near(want, r.probs)
  end)

  it("computes the global aux loss from the averaged counts of its tracker", function()
    local L3v = math.log(3)
    local logits = T.from({ { L3v, 0 }, { L3v, 0 } }) -- softmax .75 .25 twice
    local opts = { topk = 1, pre_softmax = true, load_balancing_type = "global_aux_loss", aux_loss_coeff = 0.1 }
    near(0.15, lt.moe.route(logits, opts).aux_loss) -- one rank, first microbatch: the aux loss
    assert.are.same({ 2, 0 }, lt.moe.aux_counts(logits, opts):to_table())
    local tracker = { sum = T.zeros({ 2 }), steps = 0 }
    local avg = lt.moe.global_counts_add(tracker, T.from({ 3, 1 }, "int64"))
    assert.are.same({ 3, 1 }, avg:to_table())
    avg = lt.moe.global_counts_add(tracker, T.from({ 2, 2 }, "int64"))
    assert.are.same({ 2.5, 1.5 }, avg:to_table())
    assert.are.equal(2, tracker.steps)
    opts.tp_dp_cp_size, opts.global_counts = 2, avg -- 2 c / 4^2 x (1.5 x 2.5 + .5 x 1.5)
    near(0.05625, lt.moe.route(logits, opts).aux_loss)
  end)

  it("route_backward matches finite differences of route", function()
    local rows = { { 0.3, -1.2, 0.8, 0.1 }, { 1.1, 0.4, -0.5, 0.9 }, { -0.7, 0.2, 0.6, -0.1 } }
    local dp = { { 0.5, -0.3, 0.2, 0.9 }, { -0.4, 0.7, 0.1, -0.2 }, { 0.3, 0.3, -0.8, 0.6 } }
    for _, opts in ipairs {
      { topk = 2, aux_loss_coeff = 0.3, z_loss_coeff = 0.05 },
      { topk = 2, load_balancing_type = "sinkhorn", z_loss_coeff = 0.05 },
      { topk = 1, load_balancing_type = "sinkhorn" },
      { topk = 2, load_balancing_type = "global_aux_loss", aux_loss_coeff = 0.3, tp_dp_cp_size = 3,
        global_counts = T.from({ 4.5, 1, 2.25, 3 }) },
    } do
      local daux, dz = 0.7, 1.3
      local function loss(lg)
        local r = lt.moe.route(T.from(lg), opts)
        local s, p = daux * r.aux_loss + dz * r.z_loss, r.probs:to_table()
        for i = 1, #dp do
          for j = 1, #dp[i] do s = s + dp[i][j] * p[i][j] end
        end
        return s
      end
      local logits = T.from(rows)
      local routed = lt.moe.route(logits, opts)
      local dl = lt.moe.route_backward(logits, routed, opts, T.from(dp), daux, dz):to_table()
      local eps = 1e-3
      for i = 1, #rows do
        for j = 1, #rows[i] do
          local keep = rows[i][j]
          rows[i][j] = keep + eps
          local up = loss(rows)
          rows[i][j] = keep - eps
          local down = loss(rows)
          rows[i][j] = keep
          assert(math.abs((up - down) / (2 * eps) - dl[i][j]) < 2e-3,
            ("%s: dlogits[%d][%d]"):format(opts.load_balancing_type or "aux_loss", i, j))
        end
      end
    end
  end)

  it("refuses unknown options by name and bad values clearly", function()
    local logits = T.from({ { 1, 2, 3 }, { 3, 2, 1 } })
    assert_error_contains(function() lt.moe.route(logits, { top_k = 2, capcity_factor = 1 }) end,
      "moe.route: unknown options capcity_factor, top_k")
    assert_error_contains(function() lt.moe.route(logits, { score_function = "sqrtsoftplus" }) end,
      "score_function must be one of softmax, sigmoid, got sqrtsoftplus")
    assert_error_contains(function() lt.moe.route(logits, { topk = 1.5 }) end, "topk must be a positive integer")
    assert_error_contains(function() lt.moe.route(logits, { drop_policy = "random" }) end,
      "drop_policy must be one of probs, position")
    assert_error_contains(function() lt.moe.route(logits, { load_balancing_type = "quantile_balancing" }) end,
      "load_balancing_type must be one of aux_loss, seq_aux_loss, global_aux_loss, sinkhorn, none")
    assert_error_contains(function()
      lt.moe.route(logits, { load_balancing_type = "sinkhorn", capacity_factor = 1 })
    end, "moe_expert_capacity_factor only works with aux_loss, seq_aux_loss, global_aux_loss or none")
    assert_error_contains(function()
      lt.moe.route(logits, { load_balancing_type = "sinkhorn", aux_loss_coeff = 0.01 })
    end, "Sinkhorn routing does not support aux loss.")
    assert_error_contains(function()
      lt.moe.route(logits, { load_balancing_type = "global_aux_loss", aux_loss_coeff = 0.01, tp_dp_cp_size = 2 })
    end, "needs the averaged counts summed over it (global_counts)")
    assert_error_contains(function()
      lt.moe.route(logits, { load_balancing_type = "global_aux_loss", aux_loss_coeff = 0.01,
        global_counts = T.from({ 1, 2 }) })
    end, "global_counts must be a contiguous float32 tensor [3]")
    assert_error_contains(function() lt.moe.route(logits, { eval = 1 }) end, "eval must be true or false")
    assert_error_contains(function() lt.moe.route(logits, { capacity_factor = 0 }) end,
      "capacity_factor 0 would drop every token")
    assert_error_contains(function() lt.moe.route(logits, { topk = 4 }) end,
      "moe_router_topk (4) is larger than num_moe_experts (3)")
    assert_error_contains(function() lt.moe.route(logits, { topk = 1 }) end,
      "Please use --moe-router-pre-softmax when topk is 1.")
    assert_error_contains(function() lt.moe.route(logits, { pad_to_capacity = true }) end,
      "moe_expert_capacity_factor must be set to use moe_pad_expert_input_to_capacity")
    assert_error_contains(function()
      lt.moe.route(logits, { score_function = "sigmoid", expert_bias = T.from({ 0, 0 }) })
    end, "expert_bias must be a contiguous float32 tensor [3]")
    assert_error_contains(function() lt.moe.route(T.from({ { 1, 2 } }, "bfloat16")) end,
      "logits must be a contiguous float32 tensor")
    assert_error_contains(function() lt.moe.route({ 1, 2 }) end, "moe.route: logits must be a [tokens, experts]")
    assert_error_contains(function()
      lt.moe.route(logits, { aux_loss_coeff = 1, load_balancing_type = "seq_aux_loss", seq_length = 3 })
    end, "seq_aux_loss needs seq_length x micro_batch_size = the tokens")
  end)
end)

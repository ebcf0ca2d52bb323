-- Pipeline plans (luatron.pipeline, luatron.schedules): Megatron's schedules step by step, the
-- traffic between stages, Megatron's refusals, and the dry-run check of custom schedules.
local pipeline = require "luatron.pipeline"
local schedules = require "luatron.schedules"

-- "F00 F10 B00 ..." for a plan's steps (kind, microbatch, chunk).
local function text(plan, kind)
  local t = {}
  for _, s in ipairs(plan.steps) do
    if not kind or s[1] == kind then t[#t + 1] = s[1] .. s[2] .. s[3] end
  end
  return table.concat(t, " ")
end

-- Forwards before the first backward.
local function forwards_before_backward(plan)
  local n = 0
  for _, s in ipairs(plan.steps) do
    if s[1] == "B" then return n end
    n = n + 1
  end
  return n
end

local function refusal(spec)
  local ok, err = pcall(pipeline.plan_all, spec)
  assert.is_false(ok, "expected a refusal")
  return err
end

local function gpipe(s)
  for m = 0, s.num_microbatches - 1 do s.forward(m) end
  for m = 0, s.num_microbatches - 1 do s.backward(m) end
end

describe("Megatron's schedules", function()
  it("1F1B warms up with min(PP - r - 1, M) forwards and then alternates", function()
    local plans = pipeline.plan_all { pipeline_model_parallel_size = 4, num_microbatches = 8 }
    for r = 0, 3 do
      local p = plans[r + 1]
      assert.are.equal("1f1b", p.schedule)
      -- warm-up forwards, then the steady state's first forward, then its first backward
      assert.are.equal(3 - r + 1, forwards_before_backward(p))
      assert.are.equal("F00 F10 F20 F30 F40 F50 F60 F70", text(p, "F"))
      assert.are.equal("B00 B10 B20 B30 B40 B50 B60 B70", text(p, "B"))
      assert.are.equal(4 - r, p.max_in_flight)
    end
    assert.are.equal("F00 F10 B00 F20 B10 F30 B20 F40 B30 F50 B40 F60 B50 F70 B60 B70", text(plans[3]))
    -- fewer microbatches than stages: everything warms up
    local short = pipeline.plan { pipeline_model_parallel_size = 4, num_microbatches = 2, rank = 0 }
    assert.are.equal("F00 F10 B00 B10", text(short))
  end)

  it("interleaved follows the schedule table of Megatron's docstring (PP2 VPP2 M5 N3)", function()
    local spec = { pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2, num_microbatches = 5,
      microbatch_group_size_per_vp_stage = 3 }
    -- microbatch = 0 1 2 0 1 2 3 4 3 4, chunk = 0 0 0 1 1 1 0 0 1 1
    local table_ = schedules.schedule_table(5, 2, 3)
    local mbs, cs = {}, {}
    for i, e in ipairs(table_) do mbs[i], cs[i] = e[1], e[2] end
    assert.are.same({ 0, 1, 2, 0, 1, 2, 3, 4, 3, 4 }, mbs)
    assert.are.same({ 0, 0, 0, 1, 1, 1, 0, 0, 1, 1 }, cs)
    local plans = pipeline.plan_all(spec)
    for r = 0, 1 do
      local p = plans[r + 1]
      assert.are.equal("interleaved", p.schedule)
      assert.are.equal("F00 F10 F20 F01 F11 F21 F30 F40 F31 F41", text(p, "F"))
      -- backward chunk = VPP - c - 1
      assert.are.equal("B01 B11 B21 B00 B10 B20 B31 B41 B30 B40", text(p, "B"))
      -- warm-up (PP - r - 1) * 2 + (VPP - 1) * N, then the steady state's first forward
      assert.are.equal((2 - r - 1) * 2 + 3 + 1, forwards_before_backward(p))
    end
    assert.are.equal("F00 F10 F20 F01 F11 F21 B01 F30 B11 F40 B21 F31 B00 F41 B10 B20 B31 B41 B30 B40",
      text(plans[1]))
    assert.are.equal("F00 F10 F20 F01 B01 F11 B11 F21 B21 F30 B00 F40 B10 F31 B20 F41 B31 B41 B30 B40",
      text(plans[2]))
  end)

  it("interleaved warm-up is 10, 8, 6, 4 on PP4 VPP2 M8 N4, capped at M x VPP", function()
    local plans = pipeline.plan_all { pipeline_model_parallel_size = 4, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 8, microbatch_group_size_per_vp_stage = 4 }
    for r = 0, 3 do assert.are.equal(({ 10, 8, 6, 4 })[r + 1] + 1, forwards_before_backward(plans[r + 1])) end
    -- N defaults to PP; PP4 VPP3 M4: warm-up 6 + 8 = 14 > 12 on rank 0: all forwards first
    local capped = pipeline.plan { pipeline_model_parallel_size = 4, virtual_pipeline_model_parallel_size = 3,
      num_microbatches = 4, rank = 0 }
    assert.are.equal(12, forwards_before_backward(capped))
    assert.are.equal(4, capped.microbatch_group_size_per_vp_stage)
  end)

  it("no pipelining runs each microbatch forward and backward in turn", function()
    local p = pipeline.plan { num_microbatches = 3, rank = 0 }
    assert.are.equal("no_pipelining", p.schedule)
    assert.are.equal("F00 B00 F10 B10 F20 B20", text(p))
    assert.are.equal(1, p.max_in_flight)
  end)

  it("forward-only plans (evaluation) have no backward", function()
    local p = pipeline.plan { pipeline_model_parallel_size = 2, num_microbatches = 3, rank = 1, forward_only = true }
    assert.are.equal("F00 F10 F20", text(p))
    p = pipeline.plan { pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 4, rank = 0, forward_only = true }
    assert.are.equal("F00 F10 F01 F11 F20 F30 F21 F31", text(p))
  end)

  it("every Megatron schedule passes the cross-rank check for PP 1-6, VPP 1-4, M 1-16, every valid N", function()
    local n = 0
    for pp = 1, 6 do
      for vpp = 1, pp > 1 and 4 or 1 do
        for m = 1, 16 do
          for g = pp, vpp > 1 and m or pp do
            local spec = { pipeline_model_parallel_size = pp, virtual_pipeline_model_parallel_size = vpp,
              num_microbatches = m, microbatch_group_size_per_vp_stage = g }
            local rest = m % g
            if not (vpp > 1 and rest > 0 and rest < pp) then
              local plans = pipeline.plan_all(spec)
              for _, p in ipairs(plans) do assert.are.equal(2 * m * vpp, #p.steps) end
              n = n + 1
            end
          end
        end
      end
    end
    assert.is_true(n > 500, n)
  end)
end)

describe("the traffic of a plan", function()
  it("names the peer of every send and receive, virtual stages wrapping from the last rank to the first", function()
    local plans = pipeline.plan_all { pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 2, microbatch_group_size_per_vp_stage = 2 }
    local function step(r, kind, m, c)
      for _, s in ipairs(plans[r + 1].steps) do
        if s[1] == kind and s[2] == m and s[3] == c then return s end
      end
    end
    -- stage 0 = rank 0 chunk 0, stage 1 = rank 1 chunk 0, stage 2 = rank 0 chunk 1, stage 3 = rank 1 chunk 1
    assert.are.same({ "F", 0, 0, to = 1 }, step(0, "F", 0, 0))
    assert.are.same({ "F", 0, 0, from = 0, to = 0 }, step(1, "F", 0, 0))
    assert.are.same({ "F", 0, 1, from = 1, to = 1 }, step(0, "F", 0, 1))
    assert.are.same({ "F", 0, 1, from = 0 }, step(1, "F", 0, 1))
    assert.are.same({ "B", 0, 1, to = 0 }, step(1, "B", 0, 1))
    assert.are.same({ "B", 0, 1, from = 1, to = 1 }, step(0, "B", 0, 1))
    assert.are.same({ "B", 1, 0, from = 1, last = true }, step(0, "B", 1, 0))
  end)

  it("marks each chunk's last backward, where its gradient reduction may start", function()
    local p = pipeline.plan { pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 5, microbatch_group_size_per_vp_stage = 3, rank = 0 }
    local last = {}
    for _, s in ipairs(p.steps) do
      if s.last then last[#last + 1] = s[1] .. s[2] .. s[3] end
    end
    assert.are.same({ "B41", "B40" }, last)
  end)
end)

describe("Megatron's refusals", function()
  it("N outside [PP, M]", function()
    local err = refusal { pipeline_model_parallel_size = 4, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 8, microbatch_group_size_per_vp_stage = 2 }
    assert.truthy(err:find("The number of contiguous micro-batches in a virtual pipeline stage should range in "
      .. "[PP=4 , M=8]", 1, true), err)
    err = refusal { pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2, num_microbatches = 3,
      microbatch_group_size_per_vp_stage = 4 }
    assert.truthy(err:find("[PP=2 , M=3]", 1, true), err)
  end)

  it("a remainder of M / N between 1 and PP - 1", function()
    local err = refusal { pipeline_model_parallel_size = 4, virtual_pipeline_model_parallel_size = 2,
      num_microbatches = 10, microbatch_group_size_per_vp_stage = 4 }
    assert.truthy(err:find("The remainder of M (the total micro-batches) divided by N (number of contiguous "
      .. "micro-batches in a virtual pipeline stage) should be 0, or larger than or equal to the pipeline-parallel "
      .. "size, but it is 2.", 1, true), err)
  end)

  it("no microbatches, virtual stages without pipeline stages, schedules that do not fit the layout", function()
    assert.truthy(refusal { num_microbatches = 0 }:find("number of microbatches should be at least 1, got 0.", 1, true))
    assert.truthy(refusal { virtual_pipeline_model_parallel_size = 2, num_microbatches = 4 }
      :find("pipeline-model-parallel size should be greater than 1 with interleaved schedule", 1, true))
    assert.truthy(refusal { schedule = "1f1b", pipeline_model_parallel_size = 2,
      virtual_pipeline_model_parallel_size = 2, num_microbatches = 4 }:find("use the interleaved schedule", 1, true))
    assert.truthy(refusal { schedule = "interleaved", pipeline_model_parallel_size = 2, num_microbatches = 4 }
      :find("needs virtual_pipeline_model_parallel_size > 1", 1, true))
    assert.truthy(refusal { schedule = "zero_bubble", num_microbatches = 4 }:find("unknown schedule 'zero_bubble'", 1,
      true))
    local ok, err = pcall(pipeline.plan, { pipeline_model_parallel_size = 2, num_microbatches = 4, rank = 2 })
    assert.is_false(ok)
    assert.truthy(err:find("rank must be a pipeline rank 0..1", 1, true), err)
  end)
end)

describe("custom schedules", function()
  it("GPipe: all forwards, then all backwards, holding every microbatch on every stage", function()
    local plans = pipeline.plan_all { schedule = gpipe, pipeline_model_parallel_size = 4, num_microbatches = 8 }
    for r = 0, 3 do
      assert.are.equal("custom", plans[r + 1].schedule)
      assert.are.equal("F00 F10 F20 F30 F40 F50 F60 F70 B00 B10 B20 B30 B40 B50 B60 B70", text(plans[r + 1]))
      assert.are.equal(8, plans[r + 1].max_in_flight)
    end
    local one_f_one_b = pipeline.plan { pipeline_model_parallel_size = 4, num_microbatches = 8, rank = 0 }
    assert.are.equal(4, one_f_one_b.max_in_flight)
  end)

  it("a schedule that would deadlock is refused, naming the steps and ranks", function()
    -- rank 0 wants microbatch 0's gradient before it sends microbatch 1; rank 1 wants microbatch 1 first
    local eager = function(s)
      for m = 0, s.num_microbatches - 1 do
        s.forward(m)
        if s.rank == 0 then s.backward(m) end
      end
      if s.rank == 1 then for m = 0, s.num_microbatches - 1 do s.backward(m) end end
    end
    local err = refusal { schedule = eager, pipeline_model_parallel_size = 2, num_microbatches = 3 }
    assert.truthy(err:find("pipeline schedule 'custom' would deadlock", 1, true), err)
    assert.truthy(err:find("rank 0 at step 2 (B 0 0) waits to receive the gradient of microbatch 0 for stage 0 "
      .. "from rank 1", 1, true), err)
    assert.truthy(err:find("rank 1 at step 2 (F 1 0) waits to receive the activation of microbatch 1 for stage "
      .. "1 from rank 0", 1, true), err)
  end)

  it("stages that disagree on the order of microbatches are refused", function()
    local swapped = function(s)
      local order = s.rank == 1 and { 1, 0 } or { 0, 1 }
      for _, m in ipairs(order) do s.forward(m) end
      for _, m in ipairs(order) do s.backward(m) end
    end
    local err = refusal { schedule = swapped, pipeline_model_parallel_size = 2, num_microbatches = 2 }
    assert.truthy(err:find("rank 1 at step 1 (F 1 0) waits to receive the activation of microbatch 1 for stage 1 "
      .. "from rank 0, but rank 0 sends the activation of microbatch 0 for stage 1 first", 1, true), err)
  end)

  it("a backward before its forward, a step run twice, a missing microbatch or chunk", function()
    local err = refusal { schedule = function(s) s.backward(0) end, num_microbatches = 1 }
    assert.truthy(err:find("rank 0: step 1 (B 0 0) comes before the forward of that microbatch and chunk", 1, true), err)
    err = refusal { schedule = function(s) s.forward(0); s.forward(0) end, num_microbatches = 1 }
    assert.truthy(err:find("step 2 (F 0 0) runs microbatch 0 through chunk 0 a second time", 1, true), err)
    err = refusal { schedule = function(s) s.forward(0); s.backward(0) end, num_microbatches = 2 }
    assert.truthy(err:find("microbatch 1 never runs through chunk 0", 1, true), err)
    err = refusal { schedule = function(s) for m = 0, 1 do s.forward(m) end; s.backward(0) end, num_microbatches = 2 }
    assert.truthy(err:find("microbatch 1 never runs backward through chunk 0", 1, true), err)
    err = refusal { schedule = function(s) s.forward(0, 1) end, num_microbatches = 1 }
    assert.truthy(err:find("step 1 (F 0) names chunk 1; this rank holds chunks 0..0", 1, true), err)
    err = refusal { schedule = function(s) s.forward(5) end, num_microbatches = 2 }
    assert.truthy(err:find("names microbatch 5; microbatches are 0..1", 1, true), err)
    err = refusal { schedule = function(s) for m = 0, 1 do s.forward(m); s.backward(m); s.backward(m) end end,
      num_microbatches = 2 }
    assert.truthy(err:find("step 3 (B 0 0) comes a second time", 1, true), err)
  end)
end)

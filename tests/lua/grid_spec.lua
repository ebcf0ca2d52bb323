-- Specs for core.grid: the rank grid from Lua (Megatron's order tp-cp-ep-dp-pp; ranks are 0-based).
local core = require "luatron.core"

local function msg_of(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error, got none")
  return tostring(e)
end

-- "[0,1] [2,3]" / "[0..3]" (as written in MEGATRON_SEMANTICS.md) to {{0,1},{2,3}}.
local function G(s)
  local out = {}
  for body in s:gmatch("%[([^%]]*)%]") do
    local g = {}
    for item in body:gmatch("[^,]+") do
      local a, b = item:match("^%s*(%d+)%.%.(%d+)%s*$")
      if a then
        for v = tonumber(a), tonumber(b) do g[#g + 1] = v end
      else
        g[#g + 1] = tonumber(item)
      end
    end
    out[#out + 1] = g
  end
  return out
end

describe("core.grid", function()
  describe("Example A: world 16, TP2 CP2 PP2", function()
    local g = core.grid {
      world_size = 16,
      tensor_model_parallel_size = 2,
      context_parallel_size = 2,
      pipeline_model_parallel_size = 2,
    }

    it("derives the sizes", function()
      assert.are.same({ 16, 2, 2, 2, 2, 1, 2, 4 }, { g.world_size, g.tp, g.pp, g.cp, g.dp, g.ep, g.etp, g.edp })
      assert.is_nil(g.vpp)
    end)

    it("lists every group exactly as Megatron does", function()
      assert.are.same(G "[0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]", g.groups("tp"))
      assert.are.same(G "[0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]", g.groups("cp"))
      assert.are.same(G "[0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]", g.groups("dp"))
      assert.are.same(G "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]", g.groups("pp"))
      assert.are.same(G "[0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]", g.groups("dp-cp"))
      assert.are.same(G "[0,1,8,9] [2,3,10,11] [4,5,12,13] [6,7,14,15]", g.groups("tp-pp"))
      assert.are.same(G "[0..3] [4..7] [8..11] [12..15]", g.groups("tp-cp"))
      assert.are.same(G "[0..7] [8..15]", g.groups("tp-dp-cp"))
      assert.are.same(G "[0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]", g.groups("edp"))
      assert.are.same(G "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]", g.groups("embedding"))
    end)

    it("gives one rank's coordinates and groups, also as methods", function()
      assert.are.same({ rank = 11, tp_rank = 1, cp_rank = 1, dp_rank = 0, pp_rank = 1, etp_rank = 1, ep_rank = 0,
        edp_rank = 1 }, g.coords(11))
      assert.are.same({ 9, 11, 13, 15 }, g.group("dp-cp", 11))
      assert.are.same({ 9, 11, 13, 15 }, g:group("dp-cp", 11))
      assert.are.same(g.coords(0), g:coords(0))
      assert.are.same({ 3, 11 }, g.group("pp", 3))
    end)

    it("puts every rank in exactly one group of each kind", function()
      for _, kind in ipairs(g.kinds) do
        if kind ~= "embedding" and kind ~= "position-embedding" then
          local seen = {}
          for _, grp in ipairs(g.groups(kind)) do
            for _, r in ipairs(grp) do seen[r] = (seen[r] or 0) + 1 end
          end
          for r = 0, 15 do assert.are.equal(1, seen[r], kind .. " rank " .. r) end
        end
      end
    end)
  end)

  describe("Example B: world 8, TP2 EP4", function()
    it("with ETP2 (expert DP 1)", function()
      local g = core.grid { world_size = 8, tensor_model_parallel_size = 2, expert_model_parallel_size = 4 }
      assert.are.same({ 4, 2, 1 }, { g.dp, g.etp, g.edp })
      assert.are.same(G "[0,2,4,6] [1,3,5,7]", g.groups("ep"))
      assert.are.same(G "[0,1] [2,3] [4,5] [6,7]", g.groups("etp"))
      assert.are.same(G "[0] [1] [2] [3] [4] [5] [6] [7]", g.groups("edp"))
      assert.are.same(G "[0..7]", g.groups("tp-ep"))
    end)

    it("with ETP1 (expert DP 2), and with PP2 on 16 ranks", function()
      local g = core.grid { world_size = 8, tensor_model_parallel_size = 2, expert_model_parallel_size = 4,
        expert_tensor_parallel_size = 1 }
      assert.are.same(G "[0..3] [4..7]", g.groups("ep"))
      assert.are.same(G "[0,4] [1,5] [2,6] [3,7]", g.groups("edp"))
      g = core.grid { world_size = 16, tensor_model_parallel_size = 2, expert_model_parallel_size = 4,
        expert_tensor_parallel_size = 1, pipeline_model_parallel_size = 2, virtual_pipeline_model_parallel_size = 2 }
      assert.are.equal(2, g.vpp)
      assert.are.same(G "[0..3] [4..7] [8..11] [12..15]", g.groups("ep"))
      assert.are.same(G "[0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]", g.groups("edp"))
      assert.are.same(G "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]", g.groups("pp"))
    end)
  end)

  it("leaves middle pipeline stages out of the embedding group", function()
    local g = core.grid { world_size = 8, pipeline_model_parallel_size = 4 }
    assert.are.same(G "[0,6] [1,7]", g.groups("embedding"))
    assert.are.same({}, g.group("embedding", 3))
    assert.are.same({ 1, 7 }, g.group("embedding", 7))
  end)

  it("puts pp before dp with use_tp_pp_dp_mapping (Megatron's tp-cp-ep-pp-dp)", function()
    local g = core.grid { world_size = 8, tensor_model_parallel_size = 2, pipeline_model_parallel_size = 2,
      use_tp_pp_dp_mapping = true }
    assert.are.equal("tp-cp-ep-pp-dp", g.order)
    assert.are.same(G "[0,2] [1,3] [4,6] [5,7]", g.groups("pp"))
    assert.are.same(G "[0,4] [1,5] [2,6] [3,7]", g.groups("dp"))
    assert.are.same(G "[0,2] [1,3] [4,6] [5,7]", g.groups("embedding"))
    assert.are.same({ rank = 6, tp_rank = 0, cp_rank = 0, dp_rank = 1, pp_rank = 1, etp_rank = 0, ep_rank = 0,
      edp_rank = 1 }, g.coords(6))
    assert.are.equal("tp-cp-ep-dp-pp", core.grid { world_size = 8 }.order)
    assert.matches("When not using pp-last rank ordering, the data parallel size of the attention and moe layers "
      .. "must be the same", msg_of(core.grid, { world_size = 8, pipeline_model_parallel_size = 2,
        expert_model_parallel_size = 2, use_tp_pp_dp_mapping = true }), 1, true)
  end)

  it("refuses keys it does not know", function()
    assert.matches("grid: unknown key 'tensor_parallel_size' (the keys are world_size, tensor_model_parallel_size,",
      msg_of(core.grid, { world_size = 8, tensor_parallel_size = 2 }), 1, true)
    assert.matches("use_tp_pp_dp_mapping must be a boolean (got number)",
      msg_of(core.grid, { world_size = 8, use_tp_pp_dp_mapping = 1 }), 1, true)
  end)

  it("reports invalid layouts with the values", function()
    assert.matches("world_size (6) is not divisible by tensor_model_parallel_size (4) x "
      .. "pipeline_model_parallel_size (1) x context_parallel_size (1) = 4",
      msg_of(core.grid, { world_size = 6, tensor_model_parallel_size = 4 }), 1, true)
    assert.matches("world_size (8) is not divisible by expert_tensor_parallel_size (4) x "
      .. "expert_model_parallel_size (4) x pipeline_model_parallel_size (1) = 16",
      msg_of(core.grid, { world_size = 8, expert_model_parallel_size = 4, expert_tensor_parallel_size = 4 }), 1, true)
    assert.matches("virtual_pipeline_model_parallel_size (2) needs pipeline_model_parallel_size > 1",
      msg_of(core.grid, { world_size = 8, virtual_pipeline_model_parallel_size = 2 }), 1, true)
    assert.matches("world_size is required", msg_of(core.grid, { tensor_model_parallel_size = 2 }), 1, true)
    assert.matches("tensor_model_parallel_size must be an integer (got two)",
      msg_of(core.grid, { world_size = 8, tensor_model_parallel_size = "two" }), 1, true)
    assert.matches("expert_tensor_parallel_size must be >= 1 (got 0",
      msg_of(core.grid, { world_size = 8, expert_tensor_parallel_size = 0 }), 1, true)
  end)

  it("rejects unknown kinds and ranks out of range", function()
    local g = core.grid { world_size = 4, tensor_model_parallel_size = 2 }
    assert.matches("unknown group kind 'cp-dp' (one of tp, cp, dp, pp, dp-cp,", msg_of(g.groups, "cp-dp"), 1, true)
    assert.matches("rank 4 is out of range for world_size 4 (ranks are 0-based: 0..3)", msg_of(g.coords, 4), 1, true)
    assert.matches("rank -1 is out of range", msg_of(g.group, "tp", -1), 1, true)
  end)
end)

describe("the rank order of a job", function()
  local h = dofile("tests/lua/helpers.lua")

  it("follows DistributedInitConfig.use_tp_pp_dp_mapping, from a script and from a recipe's override", function()
    local dir = h.tmpdir()
    h.write(dir .. "/order.lua", [[
local lt = require "luatron"
local mapping = arg[1] == "mapped"
local ps = lt.parallel_state({ pipeline_model_parallel_size = 2 },
  lt.DistributedInitConfig { use_tp_pp_dp_mapping = mapping })
print(("order %s pp %d dp %d pp-group %s"):format(ps.grid.order, ps.coords.pp_rank, ps.coords.dp_rank,
  table.concat(ps.grid.group("pp", ps.rank), ",")))
]])
    local code, out = h.luatron("launch -n 4 " .. h.q(dir .. "/order.lua") .. " mapped")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("[rank 1] order tp-cp-ep-pp-dp pp 1 dp 0 pp-group 0,1", 1, true), out)
    assert.truthy(out:find("[rank 2] order tp-cp-ep-pp-dp pp 0 dp 1 pp-group 2,3", 1, true), out)
    code, out = h.luatron("launch -n 4 " .. h.q(dir .. "/order.lua") .. " default")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("[rank 1] order tp-cp-ep-dp-pp pp 0 dp 1 pp-group 1,3", 1, true), out)
    -- a recipe takes it as an override, and a run with it trains (DP = 2, where the orders agree)
    code, out = h.luatron("launch -n 2 " .. h.tiny(dir, "train.train_iters=2 dist.use_tp_pp_dp_mapping=true"):gsub("^run ", ""))
    assert.are.equal(0, code, out)
    assert.are.equal(2, #h.read_metrics(dir .. "/metrics.jsonl"))
    os.execute("rm -rf " .. h.q(dir))
  end)
end)

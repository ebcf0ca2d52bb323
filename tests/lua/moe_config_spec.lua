-- Specs for Megatron Bridge's MoE helpers (luatron/config/moe.lua): apply_moe_token_drop,
-- apply_flex_dispatcher_backend and apply_deepep, with Bridge's semantics and messages, the fields
-- each changes and those it leaves alone, and the warnings they log.
local lt = require "luatron"
local config = require "luatron.config"

local h = dofile("tests/lua/helpers.lua")
local msg_of = h.msg_of

local function provider(over)
  local t = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, num_moe_experts = 4,
    moe_token_dispatcher_type = "alltoall" }
  for k, v in pairs(over or {}) do t[k] = v end
  return config.GPTModelProvider(t)
end

local function dense() return config.GPTModelProvider { num_layers = 2, hidden_size = 16, num_attention_heads = 2 } end

-- f(...) with what it writes to io.stdout captured: returns the text, then f's results.
local function capture(f, ...)
  local real, out = io.stdout, {}
  io.stdout = { write = function(self, ...)
    for _, s in ipairs { ... } do out[#out + 1] = s end
    return self
  end, flush = function() end }
  local res = table.pack(pcall(f, ...))
  io.stdout = real
  if not res[1] then error(res[2], 0) end
  return table.concat(out), table.unpack(res, 2, res.n)
end

-- The fields whose values differ between two providers' tables.
local function changed(before, after)
  local names = {}
  for _, k in ipairs(config.fields("GPTModelProvider")) do
    if before[k] ~= after[k] then names[#names + 1] = k end
  end
  table.sort(names)
  return table.concat(names, ",")
end

-- Runs f(p, ...) on p; returns what it printed, the warning it returned and the fields it changed.
local function apply(f, p, ...)
  local before = config.to_table(p)
  local out, ret, warning = capture(f, p, ...)
  assert.are.equal(p, ret)
  return out, warning, changed(before, config.to_table(p))
end

local DENSE_TOKEN_DROP = "MoE token drop is only applicable to MoE models. Model config does not use MoE "
  .. "(num_moe_experts is not set or is 0). Skipping MoE token drop configuration."

describe("Bridge's MoE helpers", function()
  it("are exported by luatron and luatron.config", function()
    for _, name in ipairs { "apply_moe_token_drop", "apply_flex_dispatcher_backend", "apply_deepep" } do
      assert.is_function(config[name], name)
      assert.are.equal(config[name], lt[name], name)
    end
  end)

  describe("apply_moe_token_drop", function()
    it("sets a capacity factor of 1.0 with padding by default, and only those two fields", function()
      local p = provider()
      local out, warning, fields = apply(lt.apply_moe_token_drop, p)
      assert.are.equal("", out)
      assert.is_nil(warning)
      assert.are.equal("moe_expert_capacity_factor,moe_pad_expert_input_to_capacity", fields)
      assert.are.equal(1.0, p.moe_expert_capacity_factor)
      assert.is_true(p.moe_pad_expert_input_to_capacity)
      assert.are.equal("alltoall", p.moe_token_dispatcher_type)
    end)

    it("takes the factor and padding given", function()
      local p = provider { moe_pad_expert_input_to_capacity = true, moe_expert_capacity_factor = 1.0 }
      local _, _, fields = apply(lt.apply_moe_token_drop, p, 1.5, false)
      assert.are.equal("moe_expert_capacity_factor,moe_pad_expert_input_to_capacity", fields)
      assert.are.equal(1.5, p.moe_expert_capacity_factor)
      assert.is_false(p.moe_pad_expert_input_to_capacity)
      -- the result passes Megatron's rules
      local r = config.ConfigContainer { model = p:copy { add_bias_linear = false },
        train = { micro_batch_size = 1, global_batch_size = 1, train_iters = 1 }, optimizer = { lr = 1e-3 } }
        :validate { world_size = 1 }
      assert.are.equal(1.5, r.model.moe_expert_capacity_factor)
    end)

    it("turns a factor < 0 into none (no dropping)", function()
      local p = provider { moe_expert_capacity_factor = 2.0 }
      local _, warning, fields = apply(lt.apply_moe_token_drop, p, -1, false)
      assert.is_nil(warning)
      assert.are.equal("moe_expert_capacity_factor", fields)
      assert.is_nil(p.moe_expert_capacity_factor)
      assert.is_false(p.moe_pad_expert_input_to_capacity)
    end)

    it("refuses padding without a factor, with Bridge's message, and changes nothing", function()
      local p = provider()
      local before = config.to_table(p)
      assert.are.equal("apply_moe_token_drop: moe_expert_capacity_factor must be set to use "
        .. "moe_pad_expert_input_to_capacity (a factor < 0 means none). Give a factor >= 0 or "
        .. "moe_pad_expert_input_to_capacity = false", msg_of(lt.apply_moe_token_drop, p, -0.5))
      assert.are.equal("", changed(before, config.to_table(p)))
    end)

    it("needs the alltoall dispatcher (Bridge's message)", function()
      for _, d in ipairs { "allgather", "flex" } do
        local p = provider { moe_token_dispatcher_type = d }
        assert.are.equal(("apply_moe_token_drop: moe_token_dispatcher_type = '%s': moe_expert_capacity_factor only "
          .. "works with alltoall token dispatcher. Set moe_token_dispatcher_type = 'alltoall' first"):format(d),
          msg_of(lt.apply_moe_token_drop, p))
        assert.is_nil(p.moe_expert_capacity_factor)
        assert.is_false(p.moe_pad_expert_input_to_capacity)
      end
    end)

    it("needs aux_loss, seq_aux_loss or none load balancing (Bridge's message)", function()
      for _, lb in ipairs { "global_aux_loss", "sinkhorn" } do
        local p = provider { moe_router_load_balancing_type = lb }
        assert.are.equal(("apply_moe_token_drop: moe_router_load_balancing_type = '%s': moe_expert_capacity_factor "
          .. "only works with aux_loss or none load balancing. Set it to 'aux_loss', 'seq_aux_loss' or 'none'")
          :format(lb), msg_of(lt.apply_moe_token_drop, p))
        assert.is_nil(p.moe_expert_capacity_factor)
      end
      for _, lb in ipairs { "aux_loss", "seq_aux_loss", "none" } do
        local p = provider { moe_router_load_balancing_type = lb }
        lt.apply_moe_token_drop(p, 0.5)
        assert.are.equal(0.5, p.moe_expert_capacity_factor)
      end
    end)

    it("leaves a dense model alone, with Bridge's warning", function()
      local p = dense()
      local out, warning, fields = apply(lt.apply_moe_token_drop, p, 2.0, true)
      assert.are.equal(DENSE_TOKEN_DROP, warning)
      assert.are.equal("warning: " .. DENSE_TOKEN_DROP .. "\n", out)
      assert.are.equal("", fields)
      -- a dense model's checks are skipped, as in Bridge: the allgather default is no error here
      assert.are.equal("allgather", p.moe_token_dispatcher_type)
    end)

    it("checks its arguments and its provider, at the caller's line", function()
      local p = provider()
      assert.are.equal("apply_moe_token_drop: GPTModelProvider.moe_expert_capacity_factor = 'big': must be a finite "
        .. "number", msg_of(lt.apply_moe_token_drop, p, "big"))
      assert.are.equal("apply_moe_token_drop: GPTModelProvider.moe_pad_expert_input_to_capacity = 1: must be true "
        .. "or false", msg_of(lt.apply_moe_token_drop, p, 1.0, 1))
      assert.are.equal("apply_moe_token_drop: expected a GPTModelProvider, got {num_moe_experts=4}",
        msg_of(lt.apply_moe_token_drop, { num_moe_experts = 4 }))
      local line = debug.getinfo(1, "l").currentline + 1
      local ok, e = pcall(function() lt.apply_moe_token_drop(provider { moe_token_dispatcher_type = "allgather" }) end)
      assert.is_false(ok)
      assert.truthy(tostring(e):find("moe_config_spec.lua:" .. line .. ": apply_moe_token_drop: ", 1, true), e)
    end)

    it("logs on rank 0 only, as Bridge does", function()
      local cmd = "LUATRON_RANK=%d lua5.4 -e 'package.path = \"lua/?.lua;lua/?/init.lua;\" .. package.path "
        .. "local c = require \"luatron.config\" "
        .. "local _, w = c.apply_moe_token_drop(c.GPTModelProvider { num_layers = 1, hidden_size = 8, "
        .. "num_attention_heads = 2 }) io.stderr:write(w and \"returned\" or \"none\")' 2>&1"
      for rank, want in pairs { [0] = "warning: " .. DENSE_TOKEN_DROP .. "\nreturned", [1] = "returned" } do
        local p = assert(io.popen(cmd:format(rank)))
        local out = p:read("a")
        p:close()
        assert.are.equal(want, out)
      end
    end)
  end)

  describe("apply_flex_dispatcher_backend", function()
    local NOT_APPLIED = ": set moe_token_dispatcher_type = 'flex' and moe_shared_expert_overlap = false, but not "
      .. "moe_flex_dispatcher_backend = '%s': DeepEP/HybridEP backends are not available in luatron, so no %s "
      .. "kernels run; its flex dispatcher is its own fused permute and all-to-all on any device (no GPU check, "
      .. "no fallback to alltoall)"

    it("selects the flex dispatcher without shared-expert overlap, and says the backend is not applied", function()
      for backend, kernels in pairs { deepep = "DeepEP", hybridep = "HybridEP" } do
        local p = provider { moe_shared_expert_intermediate_size = 32, moe_shared_expert_overlap = true }
        local out, warning, fields = apply(lt.apply_flex_dispatcher_backend, p, backend)
        local want = ("apply_flex_dispatcher_backend" .. NOT_APPLIED):format(backend, kernels)
        assert.are.equal(want, warning)
        assert.are.equal("warning: " .. want .. "\n", out)
        assert.are.equal("moe_shared_expert_overlap,moe_token_dispatcher_type", fields)
        assert.are.equal("flex", p.moe_token_dispatcher_type)
        assert.is_false(p.moe_shared_expert_overlap)
      end
    end)

    it("leaves the backend fields refused: luatron never pretends to hold them", function()
      local p = provider()
      capture(lt.apply_flex_dispatcher_backend, p, "deepep")
      assert.truthy(msg_of(function() p.moe_flex_dispatcher_backend = "deepep" end)
        :find("DeepEP/HybridEP backends are not available", 1, true))
      assert.truthy(msg_of(function() p.moe_enable_deepep = true end):find("DeepEP is not available", 1, true))
    end)

    it("skips another backend with Bridge's warning", function()
      for _, backend in ipairs { "nccl", false } do
        local p = provider()
        local out, warning, fields = apply(lt.apply_flex_dispatcher_backend, p, backend)
        local want = ("Not a valid flex dispatcher backend. Skipping flex dispatcher backend configuration. "
          .. "Got %s: use 'deepep' or 'hybridep'"):format(backend == false and "false" or "'nccl'")
        assert.are.equal(want, warning)
        assert.are.equal("warning: " .. want .. "\n", out)
        assert.are.equal("", fields)
      end
      local _, warning, fields = apply(lt.apply_flex_dispatcher_backend, provider())
      assert.truthy(warning:find("^Not a valid flex dispatcher backend%. .*Got nil"), warning)
      assert.are.equal("", fields)
    end)

    it("leaves a dense model alone, with Bridge's warning", function()
      local want = "DeepEP and HybridEP are only applicable to MoE models. Model config does not use MoE "
        .. "(num_moe_experts is not set or is 0). Skipping DeepEP configuration."
      local out, warning, fields = apply(lt.apply_flex_dispatcher_backend, dense(), "deepep")
      assert.are.equal(want, warning)
      assert.are.equal("warning: " .. want .. "\n", out)
      assert.are.equal("", fields)
    end)
  end)

  describe("apply_deepep", function()
    it("is apply_flex_dispatcher_backend(provider, 'deepep')", function()
      local p = provider { moe_shared_expert_intermediate_size = 32, moe_shared_expert_overlap = true }
      local out, warning, fields = apply(lt.apply_deepep, p)
      assert.are.equal(("apply_deepep: set moe_token_dispatcher_type = 'flex' and moe_shared_expert_overlap = false, "
        .. "but not moe_flex_dispatcher_backend = 'deepep': DeepEP/HybridEP backends are not available in luatron, "
        .. "so no DeepEP kernels run; its flex dispatcher is its own fused permute and all-to-all on any device (no "
        .. "GPU check, no fallback to alltoall)"), warning)
      assert.are.equal("warning: " .. warning .. "\n", out)
      assert.are.equal("moe_shared_expert_overlap,moe_token_dispatcher_type", fields)
    end)

    it("leaves a dense model alone, with Bridge's older warning", function()
      local want = "DeepEP is only applicable to MoE models. Model config does not use MoE "
        .. "(num_moe_experts is not set or is 0). Skipping DeepEP configuration."
      local out, warning, fields = apply(lt.apply_deepep, dense())
      assert.are.equal(want, warning)
      assert.are.equal("warning: " .. want .. "\n", out)
      assert.are.equal("", fields)
    end)

    it("needs a GPTModelProvider", function()
      assert.are.equal("apply_deepep: expected a GPTModelProvider, got nil", msg_of(lt.apply_deepep))
    end)
  end)
end)

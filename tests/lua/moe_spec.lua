-- Mixture of experts on one rank and with pipeline and data parallelism (experts whole on every rank):
-- an MoE model trains (its loss falls) with each token dispatcher, which at one expert-parallel rank
-- compute the same (up to the order the experts' weight gradients sum their rows); token dropping drops and the log says how much; MoE with PP = 2, with
-- DP = 2 (DDP and the distributed optimizer) reproduces the single rank's losses, gradient norms and
-- parameter norms; a checkpoint resumes exactly; what is not built yet is refused. The layer's
-- gradients (router with the aux and z losses, experts, dropping) are checked by finite differences in
-- tests/model/gpt_test.c, the router against Megatron's formulas in tests/parallel/moe_router_test.c;
-- expert parallelism in expert_parallel_spec.lua.
-- Needs LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")
local RTOL = 1e-5

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir = h.q, h.run, h.tmpdir

local STEPS = 20
local BASE = h.MOE_BASE

local function launch(n, dir, name, extra, steps)
  return h.launch_metrics(LUATRON, n, dir, name, BASE:format(steps or STEPS) .. (extra or ""))
end

local assert_close = h.closeness(RTOL)

local function assert_equivalent(ref, got, label, first)
  local by_iteration = {}
  for _, r in ipairs(got) do by_iteration[r.iteration] = r end
  for it = first or 1, STEPS do
    assert.is_truthy(by_iteration[it], ("%s: no record of iteration %d"):format(label, it))
  end
  h.assert_same_steps(ref, got, assert_close, label)
end

describe("mixture of experts", function()
  assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
  local dir = tmpdir()
  local ref, ref_out = launch(1, dir, "single")

  it("trains on one rank: the loss falls, and the log shows the routing", function()
    assert.are.equal(STEPS, #ref)
    assert.is_true(ref[STEPS].loss < ref[1].loss, ("%.4f -> %.4f"):format(ref[1].loss, ref[STEPS].loss))
    for _, r in ipairs(ref) do
      assert.is_true(r.moe_aux_loss > 0 and r.moe_z_loss > 0)
      assert.are.equal(64, math.floor(r.moe_tokens_per_expert_mean * 4 / 2 + 0.5)) -- 64 tokens x top-2 / 4 experts
      assert.are.equal(0, r.moe_dropped_fraction)
    end
    assert.is_truthy(ref_out:find("MoE: tokens per expert", 1, true), ref_out)
  end)

  it("the token dispatchers compute the same on one expert-parallel rank", function()
    local allgather = launch(1, dir, "allgather", "", 5)
    for _, d in ipairs { "alltoall", "flex" } do
      h.assert_same_steps(allgather, launch(1, dir, d, "model.moe_token_dispatcher_type=" .. d, 5), assert_close, d)
    end
  end)

  it("drops tokens beyond the capacity (0.5 of the even share, by probability and by position)", function()
    for _, policy in ipairs { "probs", "position" } do
      local got, out = launch(1, dir, "drop_" .. policy, "model.moe_expert_capacity_factor=0.5 "
        .. "model.moe_token_dispatcher_type=alltoall model.moe_token_drop_policy=" .. policy, 5)
      for _, r in ipairs(got) do
        -- capacity ceil(64 x 2 / 4 x 0.5) = 16 per expert: at most 64 of 128 routed tokens kept
        assert.is_true(r.moe_dropped_fraction >= 0.5, policy .. ": dropped " .. r.moe_dropped_fraction)
        assert.is_true(r.moe_tokens_per_expert_max <= 16, policy .. ": " .. r.moe_tokens_per_expert_max)
      end
      assert.is_truthy(out:find("% dropped", 1, true), out)
    end
  end)

  for _, layout in ipairs {
    { "PP = 2", 2, "model.pipeline_model_parallel_size=2" },
    { "DP = 2 (DDP)", 2, "" },
    { "DP = 2, distributed optimizer", 2, "ddp.use_distributed_optimizer=true" },
    { "PP = 2 x DP = 2", 4, "model.pipeline_model_parallel_size=2" },
  } do
    it(layout[1] .. " reproduces the single rank", function()
      local got = launch(layout[2], dir, layout[1]:gsub("%W", "_"), layout[3])
      assert_equivalent(ref, got, layout[1])
    end)
  end

  it("resumes from a checkpoint exactly (experts under Megatron's names)", function()
    local ck = dir .. "/ckpt"
    launch(1, dir, "saving", ("checkpoint.save=%s checkpoint.save_interval=10"):format(q(ck)))
    local got = launch(1, dir, "resumed", ("checkpoint.load=%s checkpoint.ckpt_step=10"):format(q(ck)))
    assert_equivalent(ref, got, "resumed", 11)
  end)

  it("refuses what is not built yet, and what Megatron refuses, naming it", function()
    for _, case in ipairs {
      { "model.moe_shared_expert_intermediate_size=32 model.moe_shared_expert_overlap=true "
        .. "model.moe_token_dispatcher_type=alltoall", "overlapping the shared experts with the dispatch is not built yet" },
      { "model.tensor_model_parallel_size=2", "MoE with tensor parallelism needs sequence_parallel = true" },
      { "model.expert_tensor_parallel_size=2", "this build splits experts over the TP group or not at all" },
      { "model.moe_router_load_balancing_type=sinkhorn", "Sinkhorn routing does not support aux loss." },
    } do
      local code, out = run(("%s run %s %s"):format(q(LUATRON), BASE:format(3), case[1]))
      assert.are_not.equal(0, code)
      assert.is_truthy(out:find(case[2], 1, true), out)
    end
  end)

  teardown(function() print(("# largest relative difference from the single rank: %.3g"):format(assert_close.worst())) end)
end)

-- Expert parallelism: the experts split over EP ranks, tokens moved by each dispatcher (allgather,
-- alltoall, flex), reproduce the single rank's losses, gradient norms and parameter norms over 20 steps
-- with and without token dropping (and padding to the capacity), with expert-data parallelism
-- (EP = 2 x DP = 2), the distributed optimizer and pipeline stages, and under tensor parallelism (TP = 2
-- with sequence parallelism, experts whole (ETP = 1) or split over TP (ETP = 2)), also with shared
-- experts, and through the grouped GEMMs (moe_grouped_gemm, from a checkpoint of sequential experts);
-- every EP run's dispatch traffic equals the arithmetic of luatron.expert_parallel (for alltoall from the routing
-- counts), and under TP and CP their traffic luatron.tensor_parallel's and luatron.context_parallel's; checkpoints are layout-free (saved at EP = 2 or TP = 2 x EP = 2, resumed at one rank, and
-- the other way at EP = 2 x DP = 2). Under TP and CP each rank routes its own part of the sequence, so
-- token dropping (a capacity per rank's tokens, as Megatron's) is not compared with the single rank
-- there. Under CP = 2 (x EP = 2) the aux and z losses' gradients are, as Megatron's, each CP rank's
-- partial losses averaged with the other gradients over DP x CP: they weigh half the single rank's, so
-- CP = 2 is compared with one rank at half the coefficients.
-- Needs LUATRON (tests/lua/BUILD provides it).

local LUATRON = os.getenv("LUATRON")
local RTOL = 1e-5

local h = dofile("tests/lua/helpers.lua")
local q, tmpdir = h.q, h.tmpdir

local STEPS = 20
local BASE = h.MOE_BASE
local DROP = "model.moe_expert_capacity_factor=1.0 "
local NO_BIAS = "model.add_bias_linear=false " -- MoE with ETP > 1 has no biases (Megatron's rule)
local TP2 = NO_BIAS .. "model.tensor_model_parallel_size=2 model.sequence_parallel=true "
local HALF = "model.moe_aux_loss_coeff=0.005 model.moe_z_loss_coeff=0.0005 " -- (BASE's, halved)
local SHARED = "model.moe_shared_expert_intermediate_size=48 "
local SINKHORN = "model.moe_router_load_balancing_type=sinkhorn model.moe_aux_loss_coeff=0 "
local GLOBAL = "model.moe_router_load_balancing_type=global_aux_loss "
local RATE = 0.01
local BIAS = ("model.moe_router_score_function=sigmoid model.moe_router_enable_expert_bias=true "
  .. "model.moe_router_bias_update_rate=%g "):format(RATE)
local PAD = DROP .. "model.moe_pad_expert_input_to_capacity=true "

local assert_close = h.closeness(RTOL)

local function launch(n, dir, name, extra, steps)
  return h.launch_metrics(LUATRON, n, dir, name, BASE:format(steps or STEPS) .. (extra or ""))
end

-- Every iteration from `first` is there, equal to the reference's; an EP run's dispatch bytes equal
-- the arithmetic at every logged step.
local function assert_equivalent(ref, got, label, first)
  local seen = {}
  for _, r in ipairs(got) do
    seen[r.iteration] = true
    if r.moe_dispatch_bytes then
      assert.are.equal(r.moe_dispatch_expected_bytes, r.moe_dispatch_bytes, label .. ": dispatch bytes at iteration "
        .. r.iteration)
    end
    if r.tp_bytes_per_step then
      assert.are.equal(r.tp_expected_bytes, r.tp_bytes_per_step, label .. ": TP bytes at iteration " .. r.iteration)
    end
    if r.cp_bytes_per_step then
      assert.are.equal(r.cp_expected_bytes, r.cp_bytes_per_step, label .. ": CP bytes at iteration " .. r.iteration)
    end
  end
  for it = first or 1, STEPS do assert.is_truthy(seen[it], ("%s: no record of iteration %d"):format(label, it)) end
  h.assert_same_steps(ref, got, assert_close, label)
end

-- The CUDA backend's MoE block under EP (the dispatch's row gathers, combines and collectives on device
-- buffers) on the emulated plugin: each of 2 ranks builds its half of the experts on "cuda" (whose memory
-- is the host's under the emulator, so the shm communicator carries the exchanges) and runs its own
-- sample; against the CPU's single rank on both samples: the losses, the dense gradients summed over
-- the ranks and each rank's experts' gradients (aux and z losses and dropout off: they are per
-- microbatch).
local CUDA_EP_CHECK = [[
local lt = require "luatron"
local core = require "luatron.core"
local model_lib = require "luatron.model"
local world = core.comm_world()
local me, n, S = world:rank(), world:size(), 16
local function provider(device, ep)
  return lt.GPTModelProvider { num_layers = 2, hidden_size = 16, num_attention_heads = 4, seq_length = S,
    vocab_size = 64, make_vocab_size_divisible_by = 32, hidden_dropout = 0, attention_dropout = 0, device = device,
    num_moe_experts = 4, moe_router_topk = 2, moe_ffn_hidden_size = 24, expert_model_parallel_size = ep,
    moe_token_dispatcher_type = arg[1], moe_shared_expert_intermediate_size = 8, moe_grouped_gemm = arg[2] == "grouped" }
end
local ref = model_lib.build(provider("cpu", 1), 3)
local cfg = model_lib.engine_config(provider("cuda", n), 3, 16, 0, { expert = world })
cfg.layer_begin, cfg.layer_end, cfg.pre_process, cfg.post_process = 0, 2, true, true
local chunk = core.gpt_chunk(cfg)
local tok, tgt = {}, {}
for b = 1, n do
  tok[b], tgt[b] = {}, {}
  for t = 1, S do tok[b][t], tgt[b][t] = (b * 8 + t * 5) % 64, (b * 3 + t * 7) % 64 end
end
local tokens, targets = lt.tensor.from(tok, "int32"), lt.tensor.from(tgt, "int32")
ref:zero_grad(); chunk:zero_grad()
local ctx, loss, valid = ref:forward(tokens, targets, 5)
ref:backward(ctx, 1 / valid)
local losses, c = chunk:forward(tokens:narrow(1, me + 1, 1), targets:narrow(1, me + 1, 1), 5)
local sum = lt.tensor.from({ losses:to_host():sum() }, "float32")
world:all_reduce(sum, "sum")
chunk:backward(c, 1 / valid)
local worst = 0
for _, p in ipairs(chunk:parameters()) do
  local g = chunk:grad(p.name):to_host()
  if not p.expert then world:all_reduce(g, "sum") end -- (an expert's gradient has every rank's tokens already)
  local a, b = ref:grad(p.name):reshape({ p.numel }), g:reshape({ p.numel })
  local scale, diff = 0, 0
  for i = 1, p.numel do
    scale, diff = math.max(scale, math.abs(a:get(i))), math.max(diff, math.abs(a:get(i) - b:get(i)))
  end
  worst = math.max(worst, diff / math.max(scale, 1e-4))
end
print(("rank %d device %s loss %.9g parallel %.9g grad_rel %.3g"):format(me, chunk:grad(chunk:parameters()[1].name):device(),
  loss, sum:item() / valid, worst))
]]

describe("expert parallelism on the CUDA backend (the emulated plugin)", function()
  for _, d in ipairs { "allgather", "alltoall", "flex" } do
    it(("matches the CPU's single rank (EP = 2, %s, shared experts)"):format(d), function()
      h.assert_emulated(LUATRON, CUDA_EP_CHECK, d, 2, assert_close, RTOL)
    end)
  end
  it("matches the CPU's single rank through the grouped GEMMs (EP = 2, alltoall, moe_grouped_gemm)", function()
    h.assert_emulated(LUATRON, CUDA_EP_CHECK, "alltoall grouped", 2, assert_close, RTOL)
  end)
end)

describe("expert parallelism", function()
  assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
  local dir = tmpdir()
  local ck = dir .. "/ckpt_single"
  local refs = {
    [""] = launch(1, dir, "single", ("checkpoint.save=%s checkpoint.save_interval=10"):format(q(ck))),
    [DROP] = launch(1, dir, "single_drop", DROP),
    [PAD] = launch(1, dir, "single_pad", PAD),
    [NO_BIAS] = launch(1, dir, "single_no_bias", NO_BIAS),
    [HALF] = launch(1, dir, "single_half_coefficients", HALF),
    [SHARED] = launch(1, dir, "single_shared", SHARED),
    [NO_BIAS .. SHARED] = launch(1, dir, "single_shared_no_bias", NO_BIAS .. SHARED),
    [SINKHORN] = launch(1, dir, "single_sinkhorn", SINKHORN),
  }
  local bias_ck = dir .. "/ckpt_bias"
  refs[BIAS] = launch(1, dir, "single_expert_bias", BIAS .. ("checkpoint.save=%s checkpoint.save_interval=10")
    :format(q(bias_ck)))

  it("the references drop and pad as asked", function()
    for _, r in ipairs(refs[""]) do assert.are.equal(0, r.moe_dropped_fraction) end
    local dropped = 0
    for _, r in ipairs(refs[DROP]) do dropped = dropped + r.moe_dropped_fraction end
    assert.is_true(dropped > 0, "capacity factor 1.0 dropped nothing")
    -- padded: every expert gets its capacity, ceil(64 x 2 / 4) = 32 rows per layer and microbatch
    for _, r in ipairs(refs[PAD]) do assert.are.equal(32, r.moe_tokens_per_expert_min) end
  end)

  for _, case in ipairs {
    { "allgather", "" }, { "alltoall", "" }, { "flex", "" },
    { "allgather", DROP }, { "alltoall", DROP }, { "flex", DROP },
    { "allgather", PAD }, { "alltoall", PAD },
  } do
    local d, extra = case[1], case[2]
    local what = extra == "" and "" or extra == DROP and ", dropping" or ", dropping and padding"
    it(("EP = 2 with %s%s reproduces the single rank"):format(d, what), function()
      local got, out = launch(2, dir, "ep2_" .. d .. (extra == "" and "" or extra == DROP and "_drop" or "_pad"),
        "model.expert_model_parallel_size=2 model.moe_token_dispatcher_type=" .. d .. " " .. extra)
      assert_equivalent(refs[extra], got, "EP = 2 " .. d .. what)
      assert.is_truthy(out:find("MoE " .. d .. " dispatch:", 1, true), out)
    end)
  end

  for _, case in ipairs {
    { "EP = 2 x DP = 2 with allgather", 4, "model.moe_token_dispatcher_type=allgather" },
    { "EP = 2 x DP = 2 with alltoall", 4, "model.moe_token_dispatcher_type=alltoall" },
    { "EP = 2 x DP = 2 with flex", 4, "model.moe_token_dispatcher_type=flex" },
    { "EP = 2 x DP = 2, distributed optimizer", 4, "model.moe_token_dispatcher_type=alltoall "
      .. "ddp.use_distributed_optimizer=true" },
    { "EP = 2, distributed optimizer", 2, "model.moe_token_dispatcher_type=flex ddp.use_distributed_optimizer=true" },
    { "EP = 2 x PP = 2", 4, "model.moe_token_dispatcher_type=alltoall model.pipeline_model_parallel_size=2" },
  } do
    it(case[1] .. " reproduces the single rank", function()
      local got = launch(case[2], dir, case[1]:gsub("%W", "_"), "model.expert_model_parallel_size=2 " .. case[3])
      assert_equivalent(refs[""], got, case[1])
    end)
  end

  for _, case in ipairs {
    { "TP = 2 x EP = 2, ETP = 2, allgather", "model.moe_token_dispatcher_type=allgather" },
    { "TP = 2 x EP = 2, ETP = 2, alltoall", "model.moe_token_dispatcher_type=alltoall" },
    { "TP = 2 x EP = 2, ETP = 2, flex", "model.moe_token_dispatcher_type=flex" },
    { "TP = 2 x EP = 2, ETP = 1, alltoall", "model.moe_token_dispatcher_type=alltoall model.expert_tensor_parallel_size=1" },
    { "TP = 2 x EP = 2, ETP = 1, flex", "model.moe_token_dispatcher_type=flex model.expert_tensor_parallel_size=1" },
  } do
    it(case[1] .. " (sequence parallel) reproduces the single rank", function()
      local got = launch(4, dir, case[1]:gsub("%W", "_"), TP2 .. "model.expert_model_parallel_size=2 " .. case[2])
      assert_equivalent(refs[NO_BIAS], got, case[1])
    end)
  end

  it("EP = 2 x PP = 2 interleaved (4 layers), distributed optimizer with overlapped reduce and gather, "
    .. "reproduces the single rank", function()
    local four = "model.num_layers=4 "
    local ref = launch(1, dir, "single_four_layers", four)
    local got = launch(4, dir, "ep2_vpp", four .. "model.pipeline_model_parallel_size=2 "
      .. "model.virtual_pipeline_model_parallel_size=2 model.overlap_p2p_comm=true model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=alltoall ddp.use_distributed_optimizer=true ddp.overlap_grad_reduce=true "
      .. "ddp.overlap_param_gather=true")
    assert_equivalent(ref, got, "EP = 2 x PP = 2 interleaved")
  end)

  it("shared experts: EP = 2 and TP = 2 x EP = 2 (ETP = 2) reproduce the single rank", function()
    local got = launch(2, dir, "ep2_shared", SHARED .. "model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=alltoall")
    assert_equivalent(refs[SHARED], got, "EP = 2 with shared experts")
    got = launch(4, dir, "tp2_ep2_shared", TP2 .. SHARED .. "model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=flex")
    assert_equivalent(refs[NO_BIAS .. SHARED], got, "TP = 2 x EP = 2 with shared experts")
  end)

  it("the expert bias moves by the update rate, the same at EP = 2 x DP = 2 and TP = 2 x EP = 2 (ETP = 1), and "
    .. "resumes",
    function()
      local lowest, highest = 0, 0
      for _, r in ipairs(refs[BIAS]) do
        -- each step moves a bias by -rate, 0 or +rate: whole multiples of the rate, at most one per step
        for _, v in ipairs { r.moe_expert_bias_min, r.moe_expert_bias_max } do
          local steps = v / RATE
          assert.is_true(math.abs(steps - math.floor(steps + 0.5)) < 1e-4 and math.abs(steps) <= r.iteration,
            ("iteration %d: bias %g"):format(r.iteration, v))
        end
        lowest, highest = math.min(lowest, r.moe_expert_bias_min), math.max(highest, r.moe_expert_bias_max)
      end
      assert.is_true(lowest < 0 and highest > 0, "the expert bias never moved")
      local got = launch(4, dir, "ep2_dp2_bias", BIAS .. "model.expert_model_parallel_size=2 "
        .. "model.moe_token_dispatcher_type=alltoall")
      assert_equivalent(refs[BIAS], got, "EP = 2 x DP = 2 with the expert bias")
      got = launch(4, dir, "tp2_ep2_bias", BIAS .. "model.tensor_model_parallel_size=2 model.sequence_parallel=true "
        .. "model.expert_tensor_parallel_size=1 model.expert_model_parallel_size=2 model.moe_token_dispatcher_type=flex")
      assert_equivalent(refs[BIAS], got, "TP = 2 x EP = 2 with the expert bias")
      for i, r in ipairs(got) do
        assert.are.equal(refs[BIAS][i].moe_expert_bias_min, r.moe_expert_bias_min)
        assert.are.equal(refs[BIAS][i].moe_expert_bias_max, r.moe_expert_bias_max)
      end
      got = launch(2, dir, "ep2_from_bias", BIAS .. ("model.expert_model_parallel_size=2 checkpoint.load=%s "
        .. "checkpoint.ckpt_step=10"):format(q(bias_ck)))
      assert_equivalent(refs[BIAS], got, "EP = 2 resumed with the expert bias", 11)
    end)

  it("sinkhorn routing balances the experts, and EP = 2 x DP = 2 reproduces the single rank", function()
    local function spread(records)
      local sum = 0
      for _, r in ipairs(records) do sum = sum + r.moe_tokens_per_expert_max - r.moe_tokens_per_expert_min end
      return sum / #records
    end
    assert.is_true(spread(refs[SINKHORN]) < 0.5 * spread(refs[""]), ("tokens per expert spread %.1f with sinkhorn, "
      .. "%.1f with the aux loss"):format(spread(refs[SINKHORN]), spread(refs[""])))
    local got = launch(4, dir, "ep2_dp2_sinkhorn", SINKHORN .. "model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=flex")
    assert_equivalent(refs[SINKHORN], got, "EP = 2 x DP = 2 with sinkhorn")
  end)

  it("global_aux_loss: one microbatch per step at one rank trains as aux_loss; at DP = 2, EP = 2 as EP = 1", function()
    -- (its counts are summed over the DP ranks' concurrent microbatches: a layout of DP = 2 of its own)
    local one = "train.global_batch_size=2 "
    local aux = launch(1, dir, "one_aux", one, 5)
    local global = launch(1, dir, "one_global", one .. GLOBAL, 5)
    h.assert_same_steps(aux, global, assert_close, "global_aux_loss at one rank")
    local dp2 = launch(2, dir, "dp2_global", GLOBAL)
    local ep2 = launch(2, dir, "dp2_ep2_global", GLOBAL .. "model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=alltoall")
    assert_equivalent(dp2, ep2, "DP = 2 x EP = 2 with global_aux_loss")
    local differs = false
    for i, r in ipairs(dp2) do differs = differs or r.grad_norm ~= refs[""][i].grad_norm end
    assert.is_true(differs, "global_aux_loss at DP = 2 trains exactly as aux_loss: its counts did not reach the loss")
  end)

  for _, d in ipairs { "allgather", "alltoall", "flex" } do
    it(("CP = 2 x EP = 2 with %s reproduces one rank at half the aux and z coefficients"):format(d), function()
      local got = launch(4, dir, "cp2_ep2_" .. d, "model.context_parallel_size=2 model.expert_model_parallel_size=2 "
        .. "model.moe_token_dispatcher_type=" .. d)
      assert_equivalent(refs[HALF], got, "CP = 2 x EP = 2 " .. d)
    end)
  end

  it("under TP the experts' optimizer shards of every TP rank are saved: TP = 2 x EP = 2 resumes at one rank",
    function()
      for _, etp in ipairs { 1, 2 } do
        local tp_ck = dir .. "/ckpt_tp2_etp" .. etp
        launch(4, dir, "tp2_saving_etp" .. etp, TP2 .. ("model.expert_model_parallel_size=2 "
          .. "model.expert_tensor_parallel_size=%d ddp.use_distributed_optimizer=true checkpoint.save=%s "
          .. "checkpoint.save_interval=10"):format(etp, q(tp_ck)))
        local got = launch(1, dir, "from_tp2_etp" .. etp, NO_BIAS .. ("checkpoint.load=%s checkpoint.ckpt_step=10")
          :format(q(tp_ck)))
        assert_equivalent(refs[NO_BIAS], got, "one rank from TP = 2 x EP = 2, ETP = " .. etp, 11)
      end
    end)

  it("checkpoints are layout-free: EP = 2 resumes at one rank, one rank at EP = 2 x DP = 2", function()
    local ep_ck = dir .. "/ckpt_ep2"
    launch(2, dir, "ep2_saving", ("model.expert_model_parallel_size=2 model.moe_token_dispatcher_type=alltoall "
      .. "ddp.use_distributed_optimizer=true checkpoint.save=%s checkpoint.save_interval=10"):format(q(ep_ck)))
    local got = launch(1, dir, "from_ep2", ("checkpoint.load=%s checkpoint.ckpt_step=10"):format(q(ep_ck)))
    assert_equivalent(refs[""], got, "one rank from EP = 2", 11)
    got = launch(4, dir, "to_ep2_dp2", ("model.expert_model_parallel_size=2 ddp.use_distributed_optimizer=true "
      .. "checkpoint.load=%s checkpoint.ckpt_step=10"):format(q(ck)))
    assert_equivalent(refs[""], got, "EP = 2 x DP = 2 from one rank", 11)
  end)

  it("moe_grouped_gemm (one grouped GEMM over the local experts) continues a checkpoint of sequential experts "
    .. "exactly as they do, at one rank and at EP = 2; its own checkpoint resumes without it", function()
    local grouped = "model.moe_grouped_gemm=true "
    local got = launch(1, dir, "grouped_from_single", grouped .. ("checkpoint.load=%s checkpoint.ckpt_step=10")
      :format(q(ck)))
    assert_equivalent(refs[""], got, "grouped GEMMs from sequential experts", 11)
    local grouped_ck = dir .. "/ckpt_grouped"
    got = launch(2, dir, "grouped_ep2", grouped .. ("model.expert_model_parallel_size=2 "
      .. "model.moe_token_dispatcher_type=flex checkpoint.load=%s checkpoint.ckpt_step=10 checkpoint.save=%s "
      .. "checkpoint.save_interval=5"):format(q(ck), q(grouped_ck)))
    assert_equivalent(refs[""], got, "grouped GEMMs at EP = 2 from sequential experts", 11)
    got = launch(1, dir, "sequential_from_grouped", ("checkpoint.load=%s checkpoint.ckpt_step=15"):format(q(grouped_ck)))
    assert_equivalent(refs[""], got, "sequential experts from the grouped run's checkpoint", 16)
  end)

  teardown(function() print(("# largest relative difference from the single rank: %.3g"):format(assert_close.worst())) end)
end)

-- Device "cuda" through the luatron command: where there is no GPU it is refused with the reason
-- and nothing else changes; on a GPU, fp32 training matches the CPU step for step, bf16 follows the
-- CPU's bf16 reference, and a run saved on the GPU resumes on the CPU (checkpoints hold host data).
-- Without a GPU, the plugin's kernels still run the model under the CPU emulator.
-- Needs LUATRON (the binary; the CUDA plugin luatron_cuda.so lies beside it under Bazel).
local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, read_metrics, luatron = h.q, h.tmpdir, h.read_metrics, h.luatron

-- The tiny recipe with dropout on (the GPU must draw the CPU's masks), logging every step.
local function tiny(dir, extra)
  return h.tiny(dir, "model.hidden_dropout=0.1 model.attention_dropout=0.1 " .. (extra or ""))
end

-- nil when a GPU is usable, else the reason the command gave.
local no_gpu
do
  local dir = tmpdir()
  local code, out = luatron(tiny(dir, "model.device=cuda train.train_iters=1"))
  if code ~= 0 then no_gpu = out end
end

local function needs_gpu()
  if no_gpu then pending("no GPU: " .. (no_gpu:match("no GPU: ([^\n]*)") or no_gpu:sub(1, 200))) end
  return not no_gpu
end

-- The plugin's own kernels built for the host against engine/ops/cuda/emulation.h (CUDA threads as
-- coroutines): the whole model path through the CUDA backend runs on machines without a GPU.
local EMULATED = "tests/cuda/luatron_cuda_emulated.so"

-- Runs `luatron ARGS` with the emulated plugin as its CUDA backend (env: more VAR=value words).
local function luatron_emulated(args, env)
  return h.run(("%sLUATRON_CUDA_PLUGIN=%s %s %s"):format(env and env .. " " or "", q(EMULATED),
    q(h.luatron_bin()), args))
end

describe("the CUDA plugin under the CPU emulator", function()
  local small = "model.num_layers=1 model.hidden_size=32 model.num_attention_heads=2 model.seq_length=32 "
    .. "dataset.sequence_length=32 train.global_batch_size=2 train.micro_batch_size=1 train.train_iters=3"

  -- Each rank of a machine takes the GPU of its local rank: the emulator has one, so rank 1 finds
  -- none. With both ranks on GPU 0 (LUATRON_CUDA_DEVICE=0), data parallelism builds an NCCL
  -- communicator over the dp group; the emulated plugin has no NCCL, so both ranks stop with that
  -- reason (rank 1 hears it from rank 0).
  it("gives each rank its own GPU, and refuses data parallelism with the reason NCCL cannot start", function()
    local dir = tmpdir()
    local launch = "launch -n 2 --timeout 60 " .. tiny(dir, small .. " model.device=cuda"):gsub("^run ", "")
    local code, out = luatron_emulated(launch)
    assert.are_not.equal(0, code, out)
    assert.truthy(out:find("[rank 1] luatron: cannot build the model: device \"cuda\" is not available: "
      .. "LUATRON_CUDA_DEVICE=1 is not a GPU of this machine (0..0)", 1, true), out)
    code, out = luatron_emulated(launch, "LUATRON_CUDA_DEVICE=0")
    assert.are_not.equal(0, code, out)
    assert.truthy(out:find("needs NCCL", 1, true), out)
    assert.truthy(out:find("NCCL is not available under the emulator", 1, true), out)
  end)

  -- openai_gelu: the MLP's tanh GELU through the fused ops (cuBLASLt's GELU epilogues, emulated).
  -- Megatron's layer options: the qkv bias alone, zero-centred norm weights (1 + weight refreshed from
  -- the weights), and per-head q/k norms (LayerNorm with GQA and RoPE; RMSNorm).
  local flags = " model.add_bias_linear=false model.add_qkv_bias=true model.layernorm_zero_centered_gamma=true "
    .. "model.qk_layernorm=true"
  local gqa_rope = " model.num_attention_heads=4 model.num_query_groups=2 model.position_embedding_type=rope"
  local rms_qk = " model.normalization=RMSNorm model.qk_layernorm=true model.layernorm_zero_centered_gamma=true"
  for _, case in ipairs { { "fp32", "" }, { "bf16", " model.bf16=true" },
    { "bf16 with openai_gelu", " model.bf16=true model.openai_gelu=true" },
    { "fp32 with add_qkv_bias, zero-centred gamma and qk_layernorm", flags .. gqa_rope },
    { "bf16 with add_qkv_bias, zero-centred gamma, post-layernorm residuals and qk_layernorm",
      flags .. gqa_rope .. " model.bf16=true" },
    { "fp32 with RMSNorm q/k norms and zero-centred RMSNorm weights", rms_qk } } do
    local precision, options = case[1], case[2]
    it(("trains a small model in %s with the CPU backend's losses"):format(precision), function()
      local f = io.open(EMULATED)
      assert(f, EMULATED .. " is missing (a data dependency of this spec)")
      f:close()
      local cpu, emu = tmpdir(), tmpdir()
      local extra = small .. options
      local code, out = luatron(tiny(cpu, extra))
      assert.are.equal(0, code, out)
      code, out = luatron_emulated(tiny(emu, extra .. " model.device=cuda"))
      assert.are.equal(0, code, out)
      local a, b = read_metrics(cpu .. "/metrics.jsonl"), read_metrics(emu .. "/metrics.jsonl")
      assert.are.equal(3, #b)
      -- fp32: summation order only; bf16: a one-step rounding difference (2^-8) may appear.
      h.assert_losses_close(a, b, precision:match("^fp32") and 1e-5 or 1e-2, 1, 3, "cpu", "cuda (emulated)")
    end)
  end
end)

describe("GPU tensors from Lua (the emulated plugin)", function()
  it("norm and scale run on the device, copies cross devices, element access is refused", function()
    local dir = tmpdir()
    h.write(dir .. "/t.lua", [[
local lt = require "luatron"
local m = lt.build_model(lt.GPTModelProvider { num_layers = 1, hidden_size = 32, num_attention_heads = 2,
  seq_length = 16, vocab_size = 64, device = "cuda" }, 7)
local w = m:flat_weights()
assert(w:device() == "cuda", w:device())
local host = w:to_host()
assert(host:device() == "cpu")
assert(math.abs(w:norm() - host:norm()) < 1e-9 * host:norm(), "norm on the device")
w:scale(0.5)
assert(math.abs(w:to_host():norm() - 0.5 * host:norm()) < 1e-6 * host:norm(), "scale on the device")
w:copy(host)
assert(w:to_host():norm() == host:norm(), "copy from the host")
local ok, e = pcall(function() return w:get(1) end)
assert(not ok and tostring(e):find("GPU memory", 1, true), tostring(e))
assert(tostring(w):find("cuda", 1, true), tostring(w))
print("tensors ok")
]])
    local code, out = luatron_emulated("run " .. q(dir .. "/t.lua"))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("tensors ok", 1, true), out)
  end)
end)

describe("device cuda", function()
  it("is refused without a GPU with the reason, and the CPU run is unaffected", function()
    if not no_gpu then return pending("a GPU is here: the other tests cover it") end
    assert.truthy(no_gpu:find('device "cuda" is not available', 1, true), no_gpu)
    assert.truthy(no_gpu:find("no GPU", 1, true), "the plugin loads on every machine that builds it: " .. no_gpu)
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "train.train_iters=2"))
    assert.are.equal(0, code, out)
  end)

  it("trains in fp32 with the CPU's losses over 20 steps", function()
    if not needs_gpu() then return end
    local cpu, gpu = tmpdir(), tmpdir()
    local code, out = luatron(tiny(cpu, "train.train_iters=20"))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(gpu, "train.train_iters=20 model.device=cuda"))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("on cuda", 1, true), "the progress line reports GPU memory: " .. out)
    local a, b = read_metrics(cpu .. "/metrics.jsonl"), read_metrics(gpu .. "/metrics.jsonl")
    assert.are.equal(20, #a)
    assert.are.equal(20, #b)
    -- The first step sees identical weights and data: only summation order differs (fp32, no TF32).
    -- Later steps compound it through the updates; 1e-3 relative is far below a real divergence.
    h.assert_losses_close(a, b, 1e-5, 1, 1, "cpu", "cuda")
    h.assert_losses_close(a, b, 1e-3, 1, 20, "cpu", "cuda")
    for i = 1, 20 do
      assert.is_true(math.abs(a[i].grad_norm - b[i].grad_norm) <= 1e-2 * a[i].grad_norm,
        ("step %d grad norm: cpu %.6f, cuda %.6f"):format(i, a[i].grad_norm, b[i].grad_norm))
    end
  end)

  it("trains in bf16 mixed precision within 1% of the CPU's bf16 reference over 20 steps", function()
    if not needs_gpu() then return end
    local cpu, gpu = tmpdir(), tmpdir()
    local code, out = luatron(tiny(cpu, "train.train_iters=20 model.bf16=true"))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(gpu, "train.train_iters=20 model.bf16=true model.device=cuda"))
    assert.are.equal(0, code, out)
    local a, b = read_metrics(cpu .. "/metrics.jsonl"), read_metrics(gpu .. "/metrics.jsonl")
    assert.are.equal(20, #b)
    h.assert_losses_close(a, b, 1e-2, 1, 20, "cpu bf16", "cuda bf16")
  end)

  it("saves a checkpoint on the GPU that resumes on the CPU with continuing losses", function()
    if not needs_gpu() then return end
    local full, split = tmpdir(), tmpdir()
    local code, out = luatron(tiny(full, "train.train_iters=12"))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(split, ("train.train_iters=12 train.exit_interval=6 checkpoint.save=%s model.device=cuda")
      :format(q(split .. "/ckpt"))))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(split, ("train.train_iters=12 checkpoint.save=%s checkpoint.load=%s")
      :format(q(split .. "/ckpt"), q(split .. "/ckpt"))))
    assert.are.equal(0, code, out)
    local a, b = read_metrics(full .. "/metrics.jsonl"), read_metrics(split .. "/metrics.jsonl")
    assert.are.equal(12, #b)
    h.assert_losses_close(a, b, 1e-3, 7, 12, "uninterrupted cpu", "resumed from cuda")
  end)
end)

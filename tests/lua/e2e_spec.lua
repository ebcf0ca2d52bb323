-- End to end through the luatron command: training, resuming, bad input and bf16 (data: data_spec.lua).
-- Needs LUATRON (the binary); tests/lua/BUILD provides it under Bazel.
local lt = require "luatron"

local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, write, read_metrics, luatron, tiny = h.q, h.tmpdir, h.write, h.read_metrics, h.luatron, h.tiny

describe("luatron command", function()
  it("prints help and version", function()
    local code, out = luatron("--help")
    assert.are.equal(0, code)
    assert.truthy(out:find("run FILE", 1, true))
    assert.truthy(out:find("repl", 1, true))
    assert.truthy(out:find("preprocess", 1, true))
    code, out = luatron("--version")
    assert.are.equal(0, code)
    assert.truthy(out:match("^luatron %d+%.%d+%.%d+"))
    code, out = luatron("frobnicate")
    assert.are.equal(2, code)
    assert.truthy(out:find("unknown command 'frobnicate'", 1, true))
  end)

  it("trains the tiny recipe: the loss falls well below its initial value", function()
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "train.train_iters=80 optimizer.lr=3e-3 scheduler.lr_warmup_iters=10"))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("tokens/s", 1, true), out)
    assert.truthy(out:find("peak memory", 1, true), out)
    local m = read_metrics(dir .. "/metrics.jsonl")
    assert.is_true(m[1].loss > 5.0, "initial loss near log(256): " .. m[1].loss)
    local last = (m[78].loss + m[79].loss + m[80].loss) / 3
    assert.is_true(last < m[1].loss - 1.5, ("loss %.3f -> %.3f"):format(m[1].loss, last))
    for _, k in ipairs { "lr", "grad_norm", "tokens_per_s", "step_time_ms", "peak_memory_mib" } do
      assert.is_number(m[80][k], k)
    end
  end)

  it("resumes from a checkpoint with the same losses as an uninterrupted run", function()
    local a, b = tmpdir(), tmpdir()
    local common = "train.train_iters=12 model.hidden_dropout=0.1 model.attention_dropout=0.1 "
      .. "checkpoint.save_interval=6 "
    local code, out = luatron(tiny(a, common .. "checkpoint.save=" .. q(a .. "/ckpt")))
    assert.are.equal(0, code, out)
    -- Stop after 6 iterations (as a preempted job would), then run again: it picks up the saved state.
    code, out = luatron(tiny(b, common .. "train.exit_interval=6 checkpoint.save=" .. q(b .. "/ckpt")))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(b, common .. "checkpoint.save=" .. q(b .. "/ckpt")))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("resumed from", 1, true), out)
    local ma, mb = read_metrics(a .. "/metrics.jsonl"), read_metrics(b .. "/metrics.jsonl")
    for it = 1, 12 do
      assert.are.equal(ma[it].loss, mb[it].loss, "loss at iteration " .. it)
      assert.are.equal(ma[it].grad_norm, mb[it].grad_norm, "grad norm at iteration " .. it)
    end
    local f = assert(io.open(b .. "/ckpt/latest_checkpointed_iteration.txt"))
    assert.are.equal("12", f:read("l"))
    f:close()
  end)

end)

describe("OpenMP settings (engine/cli/threads.h)", function()
  -- What a recipe sees of GOMP_SPINCOUNT, OMP_WAIT_POLICY and OMP_NUM_THREADS when luatron starts
  -- with the given environment (the three cleared first).
  local function seen(env)
    local dir = tmpdir()
    write(dir .. "/env.lua", 'for _, k in ipairs { "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS" } do '
      .. 'io.write(k, "=", tostring(os.getenv(k)), " ") end\n')
    local code, out = h.run(("env -u GOMP_SPINCOUNT -u OMP_WAIT_POLICY -u OMP_NUM_THREADS %s %s run %s")
      :format(env, q(h.luatron_bin()), q(dir .. "/env.lua")))
    assert.are.equal(0, code, out)
    return out
  end

  it("spins briefly unless the user chose how OpenMP threads wait", function()
    assert.truthy(seen(""):find("GOMP_SPINCOUNT=1000 OMP_WAIT_POLICY=nil OMP_NUM_THREADS=nil", 1, true))
    assert.truthy(seen("OMP_WAIT_POLICY=active"):find("GOMP_SPINCOUNT=nil OMP_WAIT_POLICY=active", 1, true))
    assert.truthy(seen("GOMP_SPINCOUNT=5"):find("GOMP_SPINCOUNT=5 OMP_WAIT_POLICY=nil", 1, true))
  end)

  it("shares the cores among the ranks of this machine unless OMP_NUM_THREADS is set", function()
    local p = io.popen("getconf _NPROCESSORS_ONLN; env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc")
    local online, allowed = p:read("n", "n")
    p:close()
    local want = math.max(1, math.min(online // 2, allowed)) -- cores / ranks, at most the CPUs allowed
    assert.truthy(seen("OMPI_COMM_WORLD_LOCAL_SIZE=2"):find("OMP_NUM_THREADS=" .. want .. " ", 1, true))
    assert.truthy(seen("MPI_LOCALNRANKS=2 OMP_NUM_THREADS=3"):find("OMP_NUM_THREADS=3 ", 1, true))
  end)
end)

describe("bad input", function()
  it("names an unknown config field, suggests the nearest one and points at the recipe line", function()
    local dir = tmpdir()
    write(dir .. "/bad.lua", 'local lt = require "luatron"\n\nlocal p = lt.GPTModelProvider { num_layer = 2 }\n')
    local code, out = luatron("run " .. q(dir .. "/bad.lua"))
    assert.are.equal(1, code)
    assert.truthy(out:find("unknown field 'num_layer'", 1, true), out)
    assert.truthy(out:find("did you mean 'num_layers'", 1, true), out)
    assert.truthy(out:find("bad.lua:3:", 1, true), out)
  end)

  it("reports a recipe syntax error with file:line", function()
    local dir = tmpdir()
    write(dir .. "/syntax.lua", "local x = 1\nlocal y = = 2\n")
    local code, out = luatron("run " .. q(dir .. "/syntax.lua"))
    assert.are.equal(1, code)
    assert.truthy(out:find("syntax.lua:2:", 1, true), out)
  end)

  it("reports a missing recipe", function()
    local code, out = luatron("run /nonexistent/recipe.lua")
    assert.are.equal(1, code)
    assert.truthy(out:find("/nonexistent/recipe.lua", 1, true), out)
  end)

  it("rejects an invalid value and an unknown override before any work", function()
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "model.hidden_size=-3"))
    assert.are.equal(1, code)
    assert.truthy(out:find("hidden_size = -3", 1, true), out)
    code, out = luatron(tiny(dir, "trian.train_iters=3"))
    assert.are.equal(1, code)
    assert.truthy(out:find("unknown field 'trian' (did you mean 'train'?)", 1, true), out)
  end)

  it("reports a missing and a truncated dataset clearly", function()
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "train.train_iters=2 model.vocab_size=nil dataset.data_path="
      .. q(dir .. "/missing")))
    assert.are.equal(1, code)
    assert.truthy(out:find("luatron: dataset: " .. dir .. "/missing.idx: cannot open", 1, true), out)
    assert.falsy(out:find("traceback", 1, true), out)
    write(dir .. "/c.jsonl", '{"text": "hello world, hello data"}\n{"text": "second document here"}\n')
    assert.are.equal(0, (luatron(("preprocess --input %s --output-prefix %s"):format(q(dir .. "/c.jsonl"),
      q(dir .. "/c")))))
    assert(os.execute(("truncate -s 5 %s"):format(q(dir .. "/c.bin"))))
    code, out = luatron(tiny(dir, "train.train_iters=2 model.vocab_size=nil dataset.data_path=" .. q(dir .. "/c")))
    assert.are.equal(1, code)
    assert.truthy(out:find("c.bin", 1, true), out)
    assert.falsy(out:find("Segmentation", 1, true), out)
  end)

  it("checks that the checkpoint and metrics folders can be written before training", function()
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "train.train_iters=2 checkpoint.save=/proc/luatron_nope"))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("luatron: checkpoint.save = /proc/luatron_nope cannot be written", 1, true), out)
    assert.falsy(out:find("iteration", 1, true), out)
    code, out = luatron(tiny(dir, "train.train_iters=2") .. " logger.metrics_file=/proc/luatron_nope/m.jsonl")
    assert.are.equal(1, code, out)
    assert.truthy(out:find("luatron: the metrics file cannot be written: /proc/luatron_nope/m.jsonl", 1, true), out)
    assert.falsy(out:find("traceback", 1, true), out)
  end)

  it("refuses a corrupt checkpoint with a clear message", function()
    local dir = tmpdir()
    local ck = dir .. "/ckpt"
    assert.are.equal(0, (luatron(tiny(dir, "train.train_iters=2 checkpoint.save=" .. q(ck)))))
    local file = ck .. "/iter_0000002/model.safetensors"
    local f = assert(io.open(file, "r+b"))
    f:seek("set", 400)
    local byte = f:read(1)
    f:seek("set", 400)
    f:write(string.char(byte:byte() ~ 0x5a))
    f:close()
    local code, out = luatron(tiny(dir, "train.train_iters=4 checkpoint.save=" .. q(ck)))
    assert.are.equal(1, code)
    assert.truthy(out:find("corrupt checkpoint", 1, true), out)
    assert.truthy(out:find("model.safetensors", 1, true), out)
  end)

  it("stops at a NaN loss, naming the step, without overwriting the last good checkpoint", function()
    local dir = tmpdir()
    local ck = dir .. "/ckpt"
    assert.are.equal(0, (luatron(tiny(dir, "train.train_iters=2 checkpoint.save=" .. q(ck)))))
    local code, out = luatron(tiny(dir, "train.train_iters=40 checkpoint.save_interval=1 optimizer.lr=1e30 "
      .. "scheduler.lr_warmup_iters=0 optimizer.clip_grad=0 scheduler.override_opt_param_scheduler=true "
      .. "checkpoint.save=" .. q(ck)))
    assert.are.equal(1, code, out)
    local step = out:match("NaN or infinite %a+ at iteration (%d+)")
    assert.truthy(step, out)
    local f = assert(io.open(ck .. "/latest_checkpointed_iteration.txt"))
    local latest = tonumber(f:read("l"))
    f:close()
    assert.is_true(latest < tonumber(step), ("latest checkpoint %d, NaN at %s"):format(latest, step))
  end)
end)

describe("what this build does not run yet", function()
  it("refuses a multi-rank layout and fp16 with a message that says what to change", function()
    local dir = tmpdir()
    local code, out = luatron(tiny(dir, "model.num_moe_experts=4 model.expert_tensor_parallel_size=2"))
    assert.are.equal(1, code)
    assert.truthy(out:find("expert_tensor_parallel_size = 2 with num_moe_experts: this build splits experts over the "
      .. "TP group or not at all", 1, true), out)
    code, out = luatron(tiny(dir, "model.fp16=true"))
    assert.are.equal(1, code)
    assert.truthy(out:find("fp16 mixed precision (with loss scaling) is not implemented; use bf16 = true", 1, true), out)
  end)
end)

describe("bf16 mixed precision", function()
  -- The CPU's bf16 reference kernels: bf16 activations and weight copies, fp32 main weights,
  -- gradients and Adam moments.
  it("trains within 2% of the fp32 losses, checkpoints fp32 weights and resumes exactly", function()
    local fp32, bf16, split = tmpdir(), tmpdir(), tmpdir()
    local code, out = luatron(tiny(fp32, "train.train_iters=20"))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(bf16, "train.train_iters=20 model.bf16=true"))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("bf16 reference kernels", 1, true), "warns that CPU bf16 is for checking: " .. out)
    local a, b = read_metrics(fp32 .. "/metrics.jsonl"), read_metrics(bf16 .. "/metrics.jsonl")
    assert.are.equal(20, #b)
    local differs = false
    for i = 1, 20 do
      assert.is_true(math.abs(a[i].loss - b[i].loss) <= 0.02 * a[i].loss,
        ("step %d: fp32 %.5f, bf16 %.5f"):format(i, a[i].loss, b[i].loss))
      differs = differs or a[i].loss ~= b[i].loss
    end
    assert.is_true(differs, "bf16 rounding must show in the losses (else bf16 did not run)")

    local ckpt = split .. "/ckpt"
    code, out = luatron(tiny(split, ("train.train_iters=20 train.exit_interval=10 model.bf16=true checkpoint.save=%s")
      :format(q(ckpt))))
    assert.are.equal(0, code, out)
    local saved = assert(lt.core.load_tensors(ckpt .. "/iter_0000010/model.safetensors"))
    assert.are.equal("float32", saved["decoder.layers.0.mlp.linear_fc1.weight"]:dtype(), "main weights stay fp32")
    code, out = luatron(tiny(split, ("train.train_iters=20 model.bf16=true checkpoint.save=%s"):format(q(ckpt))))
    assert.are.equal(0, code, out)
    local c = read_metrics(split .. "/metrics.jsonl")
    assert.are.equal(20, #c)
    for i = 1, 20 do
      assert.are.equal(b[i].loss, c[i].loss, ("step %d: uninterrupted %.7f, resumed %.7f"):format(i, b[i].loss, c[i].loss))
    end
  end)
end)

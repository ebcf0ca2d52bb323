-- What the specs share: error-message checks, shell quoting, temporary folders, running the
-- luatron command, and reading a run's metrics. Specs load it with
--   local h = dofile("tests/lua/helpers.lua")
-- (busted runs from the repository root, by hand and under Bazel).
local json = require "luatron.json"

local h = {}

-- The message of the error raised by f(...), with any "file:line: " position removed.
function h.msg_of(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error, got none")
  return (tostring(e):gsub("^[^\n]-:%d+: ", "", 1))
end

-- Asserts that f raises an error whose message contains every given piece (plain text).
function h.assert_error_contains(f, ...)
  local m = h.msg_of(f)
  for _, piece in ipairs({ ... }) do
    assert(m:find(piece, 1, true), "error message\n  " .. m .. "\ndoes not contain\n  " .. piece)
  end
  return m
end

-- Asserts that the pieces appear in `out` in this order.
function h.assert_in_order(out, ...)
  local pos = 1
  for _, piece in ipairs({ ... }) do
    local s, e = out:find(piece, pos, true)
    assert(s, ("expected %q after position %d in output:\n%s"):format(piece, pos, out))
    pos = e + 1
  end
end

-- A shell word.
function h.q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- A fresh empty folder.
function h.tmpdir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p " .. h.q(path)))
  return path
end

function h.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- The whole file at path (bytes as they are).
function h.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- Runs a shell command; returns its exit code and its output (stdout and stderr).
function h.run(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"EXIT:$?\"")
  local out = p:read("a")
  p:close()
  return tonumber(out:match("EXIT:(%d+)%s*$")), (out:gsub("EXIT:%d+%s*$", ""))
end

-- The luatron binary under test (LUATRON), or a clear error.
function h.luatron_bin()
  local bin = os.getenv("LUATRON")
  if bin == nil or bin == "" then
    error("LUATRON is not set: point it at the luatron binary (e.g. LUATRON=bazel-bin/luatron)", 2)
  end
  return bin
end

-- Runs `luatron ARGS`; returns exit code and output.
function h.luatron(args) return h.run(h.q(h.luatron_bin()) .. " " .. args) end

-- `luatron` arguments for the tiny recipe shortened for a test: no warmup, no evaluation, every step
-- logged, its metrics in dir/metrics.jsonl; extra: more overrides.
function h.tiny(dir, extra)
  return ("run recipes/gpt_tiny.lua train.eval_interval=1000 logger.log_interval=1 "
    .. "scheduler.lr_warmup_fraction=nil scheduler.lr_warmup_iters=0 logger.metrics_file=%s %s")
    :format(h.q(dir .. "/metrics.jsonl"), extra or "")
end

-- The training records (lines with a loss) of a metrics JSON-lines file, in order.
function h.read_metrics(path)
  local rows = {}
  for line in io.lines(path) do
    local r = json.decode(line)
    if r.loss then rows[#rows + 1] = r end
  end
  return rows
end

-- Steps first .. last of run b have run a's losses within rtol (relative to a's); what names the two
-- runs in a failure ("cpu", "cuda").
function h.assert_losses_close(a, b, rtol, first, last, what_a, what_b)
  for i = first, last do
    assert(math.abs(a[i].loss - b[i].loss) <= rtol * a[i].loss,
      ("step %d: %s %.7f, %s %.7f (rtol %g)"):format(i, what_a, a[i].loss, what_b, b[i].loss, rtol))
  end
end

-- Runs `script` (a check's source) on n ranks of `luatron launch` with the emulated CUDA plugin (a data
-- dependency of the spec that calls it), arg its argument; each rank prints "rank R device D loss L
-- parallel P grad_rel G". Returns the exit code, the output and those rows as {rank =, device =, loss =,
-- parallel =, rel =} (numbers but the device).
function h.emulated_check(luatron, script, arg, n)
  local plugin = "tests/cuda/luatron_cuda_emulated.so"
  local f = io.open(plugin)
  assert(f, plugin .. " is missing (a data dependency of this spec)")
  f:close()
  local dir = h.tmpdir()
  h.write(dir .. "/check.lua", script)
  local code, out = h.run(("LUATRON_CUDA_PLUGIN=%s %s launch -n %d %s %s"):format(h.q(plugin), h.q(luatron), n,
    h.q(dir .. "/check.lua"), arg))
  local rows = {}
  for rank, device, loss, par, rel in out:gmatch("rank (%d) device (%S+) loss (%S+) parallel (%S+) grad_rel (%S+)") do
    rows[#rows + 1] = { rank = tonumber(rank), device = device, loss = tonumber(loss), parallel = tonumber(par),
      rel = tonumber(rel) }
  end
  return code, out, rows
end

-- h.emulated_check on n ranks, asserted: the run succeeds, every rank reports from "cuda", its loss
-- equals the parallel one within `close` (an h.closeness) and its gradients differ by at most rtol of
-- their scale.
function h.assert_emulated(luatron, script, arg, n, close, rtol)
  local code, out, rows = h.emulated_check(luatron, script, arg, n)
  assert(code == 0, out)
  assert(#rows == n, out)
  for _, r in ipairs(rows) do
    assert(r.device == "cuda", out)
    close(r.loss, r.parallel, "rank " .. r.rank .. " loss")
    assert(r.rel <= rtol, ("rank %d: gradients differ by %g of their scale"):format(r.rank, r.rel))
  end
end

-- Runs `luatron launch -n n --timeout 120 <args> logger.metrics_file=dir/name.jsonl` and asserts it
-- succeeded; returns the metrics records and the output.
function h.launch_metrics(luatron, n, dir, name, args)
  local file = dir .. "/" .. name .. ".jsonl"
  local code, out = h.run(("%s launch -n %d --timeout 120 %s logger.metrics_file=%s"):format(h.q(luatron), n, args,
    h.q(file)))
  assert(code == 0, out)
  return h.read_metrics(file), out
end

-- Every record of got has ref's loss, gradient norm and parameter norm at its iteration within
-- `close` (an h.closeness); label names the run. ref's records are by iteration from 1.
function h.assert_same_steps(ref, got, close, label)
  for _, r in ipairs(got) do
    local want = ref[r.iteration]
    assert(want, ("%s: iteration %d is not in the reference"):format(label, r.iteration))
    for _, k in ipairs { "loss", "grad_norm", "params_norm" } do
      close(want[k], r[k], ("%s %s at iteration %d"):format(label, k, r.iteration))
    end
  end
end

-- A closeness check for the equivalence specs: close(a, b, what) asserts |a - b| <= rtol x max(|a|, |b|)
-- and remembers the largest relative difference it saw (close.worst()), which a spec prints.
function h.closeness(rtol)
  local worst = 0
  return setmetatable({ worst = function() return worst end }, { __call = function(_, a, b, what)
    worst = math.max(worst, math.abs(a - b) / math.max(math.abs(a), math.abs(b), 1e-30))
    assert(math.abs(a - b) <= rtol * math.max(math.abs(a), math.abs(b)),
      ("%s: %.9g vs %.9g (rtol %g)"):format(what, a, b, rtol))
  end })
end

-- The MoE specs' run (a format string of train_iters): 2 layers of 4 experts (top-2), aux and z
-- losses, dropout on, global batch 8 in microbatches of 2.
h.MOE_BASE = "recipes/gpt_tiny.lua train.train_iters=%d train.global_batch_size=8 train.micro_batch_size=2 "
  .. "model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4 model.seq_length=32 "
  .. "dataset.sequence_length=32 model.hidden_dropout=0.1 model.attention_dropout=0.1 train.eval_interval=100 "
  .. "train.eval_iters=0 logger.log_interval=1 logger.log_params_norm=true scheduler.lr_warmup_fraction=nil "
  .. "scheduler.lr_warmup_iters=2 optimizer.lr=1e-3 model.num_moe_experts=4 model.moe_router_topk=2 "
  .. "model.moe_aux_loss_coeff=0.01 model.moe_z_loss_coeff=0.001 "

return h

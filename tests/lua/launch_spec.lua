-- `luatron launch` (N ranks on this machine) and the bootstrap under it and under mpirun:
-- prefixed output, a failing or killed rank stopping the job with no process left behind, the
-- SPMD REPL, and `core.bootstrap()` agreeing on rank, world size and job id.
--
-- Needs the binary: LUATRON=path/to/luatron busted tests/lua/launch_spec.lua
-- (tests/lua/BUILD provides it under Bazel). The mpirun case needs Debian's openmpi-bin
-- (and libpmix-dev to build); it is pending when mpirun is not installed.

local function luatron()
  local bin = os.getenv("LUATRON")
  if bin == nil or bin == "" then
    error("LUATRON is not set: point it at the luatron binary, e.g. "
      .. "LUATRON=bazel-bin/luatron busted tests/lua/launch_spec.lua", 2)
  end
  return bin
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Runs a shell script with $LUATRON and $d (a fresh temp folder holding `files`) set; returns
-- its output (stdout and stderr) and the value of the line "__rc=N" it must print last.
local function sh(script, files)
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p " .. q(d)))
  for name, text in pairs(files or {}) do
    local f = assert(io.open(d .. "/" .. name, "w"))
    f:write(text)
    f:close()
  end
  local path = d .. ".sh"
  local f = assert(io.open(path, "w"))
  f:write("LUATRON=", q(luatron()), "\nd=", q(d), "\n", script)
  f:close()
  local p = assert(io.popen("sh " .. q(path) .. " 2>&1"))
  local out = p:read("a")
  p:close()
  os.remove(path)
  os.execute("rm -rf " .. q(d))
  local body, rc = out:match("^(.*)__rc=(%d+)\n?$")
  assert(body, "no exit status in output:\n" .. out)
  return body, tonumber(rc)
end

-- Runs the launcher in the background under a watchdog (kill -9 after `limit` s; its ranks
-- then die with it), `during` being shell lines run meanwhile: $pid is the launcher, `waitfile F`
-- waits for F to be written, `alive P` tells whether process P exists (and is no zombie), $d/block
-- is a fifo nobody writes. `during` may `wait $pid` and set rc itself.
local function launch(args, files, during, limit)
  return sh(([[
trap "" PIPE
mkfifo "$d/block"
waitfile() { i=0; while [ ! -s "$1" ]; do i=$((i + 1)); [ $i -gt 100 ] && return 1; sleep 0.05; done; }
alive() { st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ]; }
"$LUATRON" launch %s > "$d/out" 2>&1 &
pid=$!
( sleep %d; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
rc=""
%s
if [ -z "$rc" ]; then wait $pid; rc=$?; fi
kill $wd 2>/dev/null
cat "$d/out"
echo "__rc=$rc"
]]):format(args, limit or 10, during or ""), files)
end

local assert_in_order = dofile("tests/lua/helpers.lua").assert_in_order

-- A rank that writes its pid to $d/pid<rank> (for the test to check or kill), then waits
-- forever on the fifo $d/block (no CPU spent), unless it is rank `fail`: that one waits for
-- the file $d/go, leaves a file of the job in /dev/shm (named in $d/shm) for the launcher to
-- clean up, and exits 3.
local BLOCKING = [[
local dir, fail = arg[1], tonumber(arg[2])
local rank = tonumber(os.getenv("LUATRON_RANK"))
local pid = io.open("/proc/self/stat"):read("n")
print("rank " .. rank .. " ready")
local f = assert(io.open(dir .. "/pid" .. rank, "w")); f:write(pid); f:close()
if rank == fail then
  while not io.open(dir .. "/go") do os.execute("sleep 0.02") end
  local name = "/dev/shm/luatron-" .. os.getenv("LUATRON_JOB_ID") .. "-leftover"
  local junk = io.open(name, "w")
  if junk then
    junk:write("x"); junk:close()
    f = assert(io.open(dir .. "/shm", "w")); f:write(name); f:close()
  end
  io.stderr:write("rank " .. rank .. " giving up\n")
  os.exit(3)
end
io.open(dir .. "/block"):read("a")
]]

-- Shell lines for after the launcher ended: prints __alive for each rank still there, __shm when
-- the job's file in /dev/shm was left behind.
local NONE_LEFT = [[
for f in "$d"/pid*; do [ -s "$f" ] && alive "$(cat "$f")" && echo "__alive $f"; done
pgrep -f "$d/block.lua" >/dev/null && echo "__alive pgrep"
[ -s "$d/shm" ] && [ -e "$(cat "$d/shm")" ] && echo "__shm $(cat "$d/shm")"
]]

describe("luatron launch", function()
  it("needs LUATRON to name the binary", function()
    assert(os.getenv("LUATRON") and os.getenv("LUATRON") ~= "",
      "LUATRON is not set: point it at the luatron binary, e.g. "
      .. "LUATRON=bazel-bin/luatron busted tests/lua/launch_spec.lua")
  end)

  it("runs N ranks with their environment and prefixes every line with its rank", function()
    local out, rc = launch([[-n 3 --timeout 42 "$d/hello.lua" a b]], {
      ["hello.lua"] = [[
local b = require("luatron.core").bootstrap()
print(("hello from rank %s of %s (%s) args %s %s"):format(os.getenv("LUATRON_RANK"),
  os.getenv("LUATRON_WORLD_SIZE"), os.getenv("LUATRON_LOCAL_RANK"), ...))
print(("bootstrap %d/%d local %d/%d %s timeout %g job %s"):format(b.rank, b.world_size,
  b.local_rank, b.local_size, b.launcher, b.timeout_s, b.job_id))
io.stderr:write("warning from " .. b.rank .. "\n")
]] })
    assert.are.equal(0, rc, out)
    local jobs = {}
    for r = 0, 2 do
      assert_in_order(out, ("[rank %d] hello from rank %d of 3 (%d) args a b\n"):format(r, r, r))
      assert_in_order(out, ("[rank %d] bootstrap %d/3 local %d/3 local timeout 42 job "):format(r, r, r))
      assert_in_order(out, ("[rank %d] warning from %d\n"):format(r, r))
      jobs[#jobs + 1] = out:match(("%%[rank %d%%] bootstrap [^\n]* job (%%S+)\n"):format(r))
    end
    assert.are.equal(jobs[1], jobs[2])
    assert.are.equal(jobs[1], jobs[3])
    -- lines are whole: every line of the output is a prefixed one
    for line in out:gmatch("[^\n]+") do assert.truthy(line:match("^%[rank %d%] "), line) end
    -- a job id is unique per launch
    local out2 = launch([[-n 1 "$d/hello.lua" a b]], { ["hello.lua"] = [[
print("job " .. require("luatron.core").bootstrap().job_id)]] })
    assert.are_not.equal(jobs[1], out2:match("job (%S+)"))
  end)

  it("stops every rank when one exits non-zero and says which", function()
    local out, rc = launch([[-n 3 "$d/block.lua" "$d" 1]], { ["block.lua"] = BLOCKING },
      [[for r in 0 1 2; do waitfile "$d/pid$r" || echo "__never_started"; done
echo go > "$d/go"
wait $pid; rc=$?
]] .. NONE_LEFT)
    assert.are_not.equal(0, rc, out)
    assert_in_order(out, "[rank 1] rank 1 giving up\n", "luatron launch: rank 1 failed (exit code 3)")
    for r = 0, 2 do assert_in_order(out, ("[rank %d] rank %d ready\n"):format(r, r)) end
    assert.is_nil(out:find("__", 1, true), out)
  end)

  it("prints an error every rank raises alike (a config error) once", function()
    local out, rc = launch([[-n 3 "$d/bad.lua"]], { ["bad.lua"] = [[
local lt = require "luatron"
lt.pretrain(lt.ConfigContainer { model = { num_layers = 2, hidden_size = 32, num_attention_heads = 2 },
  train = { train_iters = 1, micro_batch_size = 1 }, optimizer = { lr = -1 } })
]] })
    assert.are_not.equal(0, rc, out)
    local _, n = out:gsub("OptimizerConfig.lr = %-1: must be a non%-negative number", "")
    assert.are.equal(1, n, out)
  end)

  it("reports a rank killed by a signal promptly and stops the others", function()
    local out, rc = launch([[-n 3 "$d/block.lua" "$d" -1]], { ["block.lua"] = BLOCKING },
      [[for r in 0 1 2; do waitfile "$d/pid$r" || echo "__never_started"; done
t0=$(date +%s%N)
kill -9 "$(cat "$d/pid2")"
wait $pid; rc=$?
echo "__ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
]] .. NONE_LEFT)
    assert.are_not.equal(0, rc, out)
    assert_in_order(out, "luatron launch: rank 2 failed (killed by signal 9)")
    local ms = tonumber(out:match("__ms=(%d+)"))
    assert.is_true(ms < 2500, "took " .. tostring(ms) .. " ms:\n" .. out)
    assert.is_nil(out:gsub("__ms=%d+", ""):find("__", 1, true), out)
  end)

  it("takes its ranks with it when the launcher itself is killed", function()
    local out = launch([[-n 2 "$d/block.lua" "$d" -1]], { ["block.lua"] = BLOCKING },
      [[for r in 0 1; do waitfile "$d/pid$r" || echo "__never_started"; done
kill -9 $pid; wait $pid; rc=0
i=0
while [ $i -lt 40 ]; do
  left=0; for f in "$d"/pid*; do alive "$(cat "$f")" && left=1; done
  [ $left = 0 ] && break
  i=$((i + 1)); sleep 0.05
done
]] .. NONE_LEFT)
    assert.is_nil(out:find("__", 1, true), out)
  end)

  it("runs each line of the SPMD REPL on every rank, output under each rank", function()
    local out, rc = sh([[
printf '%s\n' 'os.getenv("LUATRON_RANK")' 'x = tonumber(os.getenv("LUATRON_RANK")) * 10' 'x' \
  'function f(a)' '  return a + x' 'end' 'f(1)' 'error("boom")' 'x + 2' > "$d/in"
"$LUATRON" launch -n 3 --repl < "$d/in" > "$d/out" 2>&1 &
pid=$!
( sleep 10; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
wait $pid; rc=$?
kill $wd 2>/dev/null
cat "$d/out"; echo "__rc=$rc"
]])
    assert.are.equal(0, rc, out)
    assert_in_order(out, "> [rank 0] 0\n[rank 1] 1\n[rank 2] 2\n",
      "> > [rank 0] 0\n[rank 1] 10\n[rank 2] 20\n",
      "> >> >> > [rank 0] 1\n[rank 1] 11\n[rank 2] 21\n",
      "> [rank 0] stdin:1: boom\n", "[rank 1] stdin:1: boom\n", "[rank 2] stdin:1: boom\n",
      "> [rank 0] 2\n[rank 1] 12\n[rank 2] 22\n")
  end)

  it("interrupts a chunk on every rank on Ctrl-C and keeps the session", function()
    local out, rc = sh([[
trap "" PIPE
mkfifo "$d/in"
"$LUATRON" launch -n 2 --repl < "$d/in" > "$d/out" 2>&1 &
pid=$!
( sleep 10; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
exec 3> "$d/in"
waitfor() { i=0; while ! grep -q -F -- "$1" "$d/out" 2>/dev/null; do i=$((i + 1)); [ $i -gt 60 ] && return 1; sleep 0.05; done; }
echo "x = 'kept' .. os.getenv('LUATRON_RANK')" >&3
echo "print('looping') while true do end" >&3
waitfor "[rank 0] looping" || echo "__never_started"
sleep 0.2
kill -INT $pid
echo "print('alive', x)" >&3
waitfor "alive	kept1" || echo "__not_alive"
exec 3>&-
wait $pid; rc=$?
kill $wd 2>/dev/null
cat "$d/out"; echo "__rc=$rc"
]])
    assert.are.equal(0, rc, out)
    assert_in_order(out, "[rank 0] interrupted!", "[rank 1] interrupted!", "[rank 0] alive\tkept0\n",
      "[rank 1] alive\tkept1\n")
    assert.is_nil(out:find("__", 1, true), out)
  end)

  -- An SPMD REPL session of n ranks with a long communicator timeout (120 s): `body` are shell
  -- lines that type with `echo ... >&3` and wait with `waitfor TEXT`; `ctrl_c` presses Ctrl-C
  -- once rank 0 printed "looping" and prints "__ms=N", the time until every rank (the last
  -- one's output comes last) reported its interruption. Ctrl-D (closing the fifo) ends it. `env`:
  -- assignments for the launcher's command line.
  local function repl_session(n, body, env)
    return sh(([[
trap "" PIPE
mkfifo "$d/in"
%s "$LUATRON" launch -n %d --timeout 120 --repl < "$d/in" > "$d/out" 2>&1 &
pid=$!
( sleep 40; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
exec 3> "$d/in"
waitfor() { i=0; while ! grep -q -F -- "$1" "$d/out" 2>/dev/null; do i=$((i + 1)); [ $i -gt 300 ] && return 1; sleep 0.05; done; }
ctrl_c() {
  waitfor "[rank 0] looping" || echo "__never_started"
  sleep 0.3
  t0=$(date +%%s%%N)
  kill -INT $pid
  waitfor "[rank %d] stdin:1: $1" || echo "__not_interrupted"
  echo "__ms=$(( ($(date +%%s%%N) - t0) / 1000000 ))"
}
%s
exec 3>&-
wait $pid; rc=$?
kill $wd 2>/dev/null
cat "$d/out"; echo "__rc=$rc"
]]):format(env or "", n, n - 1, body))
  end

  local function interrupted_promptly(out)
    assert.is_nil(out:gsub("__ms=%d+", ""):find("__", 1, true), out)
    local ms = tonumber(out:match("__ms=(%d+)"))
    assert.is_true(ms < 10000, "interrupted after " .. tostring(ms) .. " ms (timeout 120 s):\n" .. out)
  end

  it("interrupts ranks waiting in a collective on Ctrl-C; the next line's all_reduce is right", function()
    local out, rc = repl_session(2, [[
echo "c = lt.comm_world(); r = c:rank()" >&3
echo "t = lt.tensor.from({r + 1}); if r == 0 then print('looping') while true do end end; c:all_reduce(t)" >&3
ctrl_c "all_reduce on communicator 'world' (ranks 0,1) interrupted (Ctrl-C)"
echo "t = lt.tensor.from({r + 1}); c:all_reduce(t); print('sum', t:item())" >&3
waitfor "[rank 1] sum" || echo "__no_sum"
echo "c:barrier(); t = lt.tensor.from({r + 10}); c:all_reduce(t); print('again', t:item())" >&3
waitfor "[rank 1] again" || echo "__no_again"
]])
    assert.are.equal(0, rc, out)
    interrupted_promptly(out)
    assert_in_order(out, "[rank 0] looping\n", "[rank 0] interrupted!",
      "[rank 1] stdin:1: all_reduce on communicator 'world' (ranks 0,1) interrupted (Ctrl-C)",
      "[rank 0] sum\t3.0\n[rank 1] sum\t3.0\n", "[rank 0] again\t21.0\n[rank 1] again\t21.0\n")
  end)

  it("interrupts a world barrier and a group all_reduce over 3 ranks; both work on the next line", function()
    local out, rc = repl_session(3, [[
echo "c = lt.comm_world(); r = c:rank(); g = r > 0 and c:group({1, 2}, 'pair') or nil" >&3
echo "if r == 0 then print('looping') while true do end elseif r == 1 then g:all_reduce(lt.tensor.from({1})) else c:barrier() end" >&3
ctrl_c "barrier on communicator 'world' (ranks 0,1,2) interrupted (Ctrl-C)"
echo "t = lt.tensor.from({r + 1}); c:all_reduce(t); u = lt.tensor.from({r + 1}); if g then g:all_reduce(u) end; print('sums', t:item(), u:item())" >&3
waitfor "[rank 2] sums" || echo "__no_sums"
]])
    assert.are.equal(0, rc, out)
    interrupted_promptly(out)
    assert_in_order(out, "[rank 0] interrupted!",
      "[rank 1] stdin:1: all_reduce on communicator 'pair' (ranks 1,2) interrupted (Ctrl-C)",
      "[rank 2] stdin:1: barrier on communicator 'world' (ranks 0,1,2) interrupted (Ctrl-C)",
      "[rank 0] sums\t6.0\t1.0\n[rank 1] sums\t6.0\t5.0\n[rank 2] sums\t6.0\t5.0\n")
  end)

  it("interrupts a rank waiting in batch_p2p on Ctrl-C; the next line's exchange delivers exact data", function()
    -- 4 KiB mailbox halves: rank 1's interrupted send is half sent (two of its four chunks posted);
    -- the next line sends messages of the same size both ways, checked element by element
    local out, rc = repl_session(2, [[
echo "c = lt.comm_world(); r = c:rank(); p = 1 - r; L = 3 * 1024 + 5" >&3
echo "function val(a, k, i) return (a * 7919 + k * 131 + i * 31) % 100003 end" >&3
echo "function msg(k) local v = {} for i = 1, L do v[i] = val(r, k, i) end return lt.tensor.from(v, 'int32') end" >&3
echo "function check(t, k) local v = t:to_table() for i = 1, L do if v[i] ~= val(p, k, i) then return 'wrong at ' .. i end end return 'exact' end" >&3
echo "if r == 0 then print('looping') while true do end else c:batch_p2p { { 'send', msg(1), 0 }, { 'recv', lt.tensor.zeros({ L }, 'int32'), 0 } } end" >&3
ctrl_c "batch_p2p on communicator 'world' (ranks 0,1) interrupted (Ctrl-C)"
echo "y = lt.tensor.zeros({ L }, 'int32'); c:batch_p2p { { 'recv', y, p }, { 'send', msg(2), p } }; print('p2p', check(y, 2))" >&3
waitfor "[rank 1] p2p" || echo "__no_p2p"
echo "y = lt.tensor.zeros({ L }, 'int32'); c:batch_p2p { { 'send', msg(3), p }, { 'recv', y, p } }; print('again', check(y, 3))" >&3
waitfor "[rank 1] again" || echo "__no_again"
]], "LUATRON_SHM_SLOT_BYTES=4096")
    assert.are.equal(0, rc, out)
    interrupted_promptly(out)
    assert_in_order(out, "[rank 0] looping\n", "[rank 0] interrupted!",
      "[rank 1] stdin:1: batch_p2p on communicator 'world' (ranks 0,1) interrupted (Ctrl-C)",
      "[rank 0] p2p\texact\n[rank 1] p2p\texact\n", "[rank 0] again\texact\n[rank 1] again\texact\n")
  end)

  it("bootstraps from PMIx under mpirun", function()
    if not os.execute("command -v mpirun >/dev/null 2>&1") then
      pending("mpirun is not installed (apt-get install openmpi-bin)")
      return
    end
    local out, rc = sh([[
cat > "$d/mpi.lua" <<'EOF'
local b = require("luatron.core").bootstrap()
print(("bootstrap rank=%d world_size=%d local=%d/%d launcher=%s job=%s"):format(b.rank, b.world_size,
  b.local_rank, b.local_size, b.launcher, b.job_id))
EOF
timeout 30 mpirun --allow-run-as-root --oversubscribe -n 2 "$LUATRON" run "$d/mpi.lua" 2>&1
echo "__rc=$?"
]])
    assert.are.equal(0, rc, out)
    local jobs = {}
    for r = 0, 1 do
      local job = out:match(("bootstrap rank=%d world_size=2 local=%d/2 launcher=pmix job=(%%S+)"):format(r, r))
      assert(job, "rank " .. r .. " missing:\n" .. out)
      jobs[#jobs + 1] = job
    end
    assert.are.equal(jobs[1], jobs[2])
  end)
end)

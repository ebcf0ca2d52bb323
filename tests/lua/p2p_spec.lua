-- Point-to-point in batches from Lua (comm:batch_p2p, comm:batch_p2p_async): the exchange patterns
-- of pipeline schedules run by real ranks under `luatron launch` (both ranks sending first, a ring,
-- 1F1B's steady state, the interleaved four-way exchange), messages of several chunks (small
-- LUATRON_SHM_SLOT_BYTES), FIFO order, statistics, the async request, and the failures (a receive
-- without a sender times out naming the peer; malformed batches name the entry).
-- Needs LUATRON (tests/lua/BUILD provides it); the argument checks run in process.

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir, write = h.q, h.run, h.tmpdir, h.write
local LUATRON = os.getenv("LUATRON")

-- The rank script: element i of the message from a to b with tag k is a function of all four,
-- every received element is compared, and each pattern prints "OK <pattern>" when it passed.
local RANKS = [[
local core = require "luatron.core"
local c = core.comm_world()
local me, n = c:rank(), c:size()
local function val(a, b, k, i) return (a * 7919 + b * 104729 + k * 1299709 + i * 31) % 1000003 end
local function msg(a, b, k, len)
  local v = {}
  for i = 1, len do v[i] = val(a, b, k, i) end
  return core.tensor.from(v, "int32")
end
local function check(t, a, b, k, what)
  local v = t:to_table()
  for i = 1, #v do
    if v[i] ~= val(a, b, k, i) then
      error(("%s: element %d of the message %d from rank %d is %s, expected %d"):format(what, i, k, a, v[i], val(a, b, k, i)))
    end
  end
end
local function zeros(len) return core.tensor.zeros({ len }, "int32") end
local LEN = 3 * 2 * 1024 + 5 -- 3x a channel's mailbox (two halves of 4 KiB) and a bit: several chunks
local next, prev = (me + 1) % n, (me + n - 1) % n

-- both ranks of each pair send first, in one batch
if me ~ 1 < n then
  local p = me ~ 1
  local r = zeros(LEN + p)
  c:batch_p2p { { "send", msg(me, p, 1, LEN + me), p }, { "recv", r, p } }
  check(r, p, me, 1, "pairwise")
  print("OK pairwise")
end

-- ring: send to next, receive from prev at once
local r = zeros(LEN)
c:batch_p2p { { "recv", r, prev }, { "send", msg(me, next, 2, LEN), next } }
check(r, prev, me, 2, "ring")
print("OK ring")

-- 1F1B steady state on a chain: stage s does send_forward_recv_backward with s+1 while s+1 does
-- send_backward_recv_forward with s (both directions with one peer at once), then the reverse
local function steady(k)
  local ops, grad, act = {}, nil, nil
  if me < n - 1 then
    grad = zeros(LEN - 7)
    ops[#ops + 1] = { "send", msg(me, me + 1, k, LEN), me + 1 }
    ops[#ops + 1] = { "recv", grad, me + 1 }
  end
  if me > 0 then
    act = zeros(LEN)
    ops[#ops + 1] = { "send", msg(me, me - 1, k + 100, LEN - 7), me - 1 }
    ops[#ops + 1] = { "recv", act, me - 1 }
  end
  c:batch_p2p(ops)
  if grad then check(grad, me + 1, me, k + 100, "1f1b gradient") end
  if act then check(act, me - 1, me, k, "1f1b activation") end
end
for k = 1, 3 do steady(10 + k) end
print("OK 1f1b")

-- interleaved: send to next and prev, receive from prev and next, all four at once
local ra, rg = zeros(LEN), zeros(LEN + 3)
c:batch_p2p { { "send", msg(me, next, 3, LEN), next }, { "send", msg(me, prev, 4, LEN + 3), prev },
  { "recv", ra, prev }, { "recv", rg, next } }
check(ra, prev, me, 3, "four-way activation")
check(rg, next, me, 4, "four-way gradient")
print("OK four-way")

-- FIFO: three messages of different sizes to next in flight at once, in order (a send completes
-- when it is received, so all three receives are in the same batch)
local sizes = { 5, LEN, 1 }
local got = { zeros(sizes[1]), zeros(sizes[2]), zeros(sizes[3]) }
c:reset_stats()
c:batch_p2p { { "send", msg(me, next, 20, sizes[1]), next }, { "recv", got[1], prev },
  { "send", msg(me, next, 21, sizes[2]), next }, { "recv", got[2], prev },
  { "send", msg(me, next, 22, sizes[3]), next }, { "recv", got[3], prev } }
for k = 1, 3 do check(got[k], prev, me, 19 + k, "fifo") end
local st = c:stats()
local bytes = 4 * (sizes[1] + sizes[2] + sizes[3])
assert(st.calls == 6 and st.bytes == bytes, ("stats: %d calls, %d bytes; expected 6, %d"):format(st.calls, st.bytes, bytes))
print("OK fifo")

-- async: a request, tested then waited for
local ar = zeros(LEN)
local req = c:batch_p2p_async { { "send", msg(me, next, 30, LEN), next }, { "recv", ar, prev } }
local x = 0
for i = 1, 100000 do x = x + i end -- computation meanwhile
req:wait()
assert(req:test(), "a waited request tests true")
req:wait() -- a second wait does nothing
check(ar, prev, me, 30, "async")
print("OK async")
]]

local function launch(n, script, extra_env, timeout)
  local d = tmpdir()
  write(d .. "/ranks.lua", script)
  local code, out = run(("%s LUATRON_SHM_SLOT_BYTES=4096 %s launch -n %d --timeout %s %s"):format(extra_env or "",
    q(LUATRON), n, timeout or 20, q(d .. "/ranks.lua")))
  os.execute("rm -rf " .. q(d))
  return code, out
end

describe("comm:batch_p2p under luatron launch", function()
  assert(LUATRON, "LUATRON is not set: point it at the luatron binary")

  for _, n in ipairs { 2, 4 } do
    it(("runs the pipeline exchange patterns on %d ranks, every element checked"):format(n), function()
      local code, out = launch(n, RANKS)
      assert.are.equal(0, code, out)
      for r = 0, n - 1 do
        for _, pattern in ipairs { "pairwise", "ring", "1f1b", "four-way", "fifo", "async" } do
          assert.truthy(out:find(("[rank %d] OK %s\n"):format(r, pattern), 1, true),
            ("rank %d did not pass %s:\n%s"):format(r, pattern, out))
        end
      end
    end)
  end

  it("a receive without a sender times out promptly, naming the peer", function()
    local t0 = os.time()
    local code, out = launch(2, [[
local core = require "luatron.core"
local c = core.comm_world()
if c:rank() == 0 then
  local ok, e = pcall(c.batch_p2p, c, { { "recv", core.tensor.zeros({ 8 }, "int32"), 1 } })
  print("ERR " .. tostring(e))
  os.exit(ok and 0 or 3)
else
  os.execute("sleep 3") -- alive, sends nothing
end
]], nil, 1)
    assert.are_not.equal(0, code, out)
    assert.truthy(out:find("[rank 0] ERR batch_p2p on communicator 'world' (ranks 0,1) timed out after 1.0 s: "
      .. "rank 1 did not send (operation 0: recv from rank 1, 32 bytes)", 1, true), out)
    assert.is_true(os.time() - t0 < 15, "the job ended within the timeout and the launcher's grace")
  end)
end)

describe("comm:batch_p2p arguments", function()
  local core = require "luatron.core"
  local c = core.comm_world() -- one rank in process

  it("names the entry and what is wrong with it", function()
    local t = core.tensor.zeros({ 4 }, "float32")
    h.assert_error_contains(function() c:batch_p2p { { "sned", t, 0 } } end,
      'batch_p2p: entry 1: the first element must be "send" or "recv", not sned')
    h.assert_error_contains(function() c:batch_p2p { { "send", t, 0 }, { "recv", {}, 0 } } end,
      "batch_p2p: entry 2: the second element must be a tensor, not table")
    h.assert_error_contains(function() c:batch_p2p { { "send", t, "next" } } end,
      "batch_p2p: entry 1: the third element must be the peer's rank")
    h.assert_error_contains(function() c:batch_p2p { 3 } end, "batch_p2p: entry 1 must be a table")
    h.assert_error_contains(function() c:batch_p2p { { "send", t, 0 } } end,
      "operation 0: peer 0 is not another rank of the communicator")
    h.assert_error_contains(function() c:batch_p2p_async({ { "recv", t, 5 } }):wait() end,
      "peer 5 is not another rank of the communicator")
    h.assert_error_contains(function() c:batch_p2p { { "send", core.tensor.zeros({ 4, 4 }):narrow(2, 1, 2), 1 } } end,
      "batch_p2p: entry 1: the tensor must be contiguous")
  end)

  it("an empty batch returns at once and counts nothing", function()
    c:reset_stats()
    c:batch_p2p {}
    local req = c:batch_p2p_async {}
    req:wait()
    assert.are.equal(0, c:stats().calls)
  end)
end)

-- `luatron repl` driven through a pipe: prompts, results and errors come back on
-- stdout/stderr, which each case reads whole.
--
-- Needs the binary: LUATRON=path/to/luatron busted tests/lua/repl_spec.lua
-- (LUATRON must be the binary itself, or a wrapper that `exec`s it, so that the
-- Ctrl-C cases signal the REPL process).

local function luatron()
  local bin = os.getenv("LUATRON")
  if bin == nil or bin == "" then
    error("LUATRON is not set: point it at the luatron binary, e.g. "
      .. "LUATRON=bazel-bin/luatron busted tests/lua/repl_spec.lua", 2)
  end
  return bin
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Runs a shell script with $LUATRON set; returns its stdout.
local function sh(script)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write("LUATRON=", q(luatron()), "\n", script)
  f:close()
  local p = assert(io.popen("sh " .. q(path) .. " 2>&1"))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return out
end

-- Feeds `input` to `luatron repl` (stdin a file, stdout+stderr together);
-- returns the output and the exit status. A watchdog kills a hung REPL.
local function repl(input)
  local inpath = os.tmpname()
  local f = assert(io.open(inpath, "w"))
  f:write(input)
  f:close()
  local out = sh(([[
"$LUATRON" repl < %s 2>&1 &
pid=$!
( sleep 10; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
wait $pid
rc=$?
kill $wd 2>/dev/null
echo "__rc=$rc"
]]):format(q(inpath)))
  os.remove(inpath)
  local body, rc = out:match("^(.*)__rc=(%d+)\n?$")
  assert(body, "no exit status in output:\n" .. out)
  return body, tonumber(rc)
end

-- Script prologue: the REPL reads from a fifo held open on fd 3, its output goes
-- to $d/out; `waitfor TEXT` polls the output for TEXT (up to 3 s).
local FIFO_PROLOGUE = [[
trap "" PIPE
d=$(mktemp -d)
mkfifo "$d/in"
"$LUATRON" repl < "$d/in" > "$d/out" 2>&1 &
pid=$!
( sleep 10; kill -9 $pid ) >/dev/null 2>&1 &
wd=$!
exec 3> "$d/in"
waitfor() {
  i=0
  while ! grep -q -F -- "$1" "$d/out" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 60 ] && return 1; sleep 0.05
  done
}
]]
local FIFO_EPILOGUE = [[
exec 3>&-
wait $pid
rc=$?
kill $wd 2>/dev/null
cat "$d/out"
echo "__rc=$rc"
rm -rf "$d"
]]

local function fifo_session(body)
  local out = sh(FIFO_PROLOGUE .. body .. FIFO_EPILOGUE)
  local text, rc = out:match("^(.*)__rc=(%d+)\n?$")
  assert(text, "no exit status in output:\n" .. out)
  return text, tonumber(rc)
end

local assert_in_order = dofile("tests/lua/helpers.lua").assert_in_order

describe("luatron repl", function()
  it("needs LUATRON to name the binary", function()
    assert(os.getenv("LUATRON") and os.getenv("LUATRON") ~= "",
      "LUATRON is not set: point it at the luatron binary, e.g. "
      .. "LUATRON=bazel-bin/luatron busted tests/lua/repl_spec.lua")
  end)

  it("prints the value of an expression", function()
    local out, rc = repl("1+1\n")
    assert_in_order(out, "> 2\n")
    assert.are.equal(0, rc)
  end)

  it("prints multiple results tab-separated", function()
    local out = repl("1, 'a', true, nil\n")
    assert_in_order(out, "> 1\ta\ttrue\tnil\n")
  end)

  it("shows tables as constructors, small ones whole", function()
    local out = repl("{4, 128}\n{rank = 0, coords = {tp = 0}, name = 'x'}\nlt.tensor.zeros({2, 3}):shape()\n"
      .. "t = {} for i = 1, 40 do t[i] = i end return t\n")
    assert_in_order(out, "> {4, 128}\n", "> {coords = {tp = 0}, name = \"x\", rank = 0}\n", "> {2, 3}\n",
      "> {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, ... (40 items)}\n")
  end)

  it("keeps state between lines", function()
    local out = repl("x = 5\nx * 2\n")
    assert_in_order(out, "> > 10\n")
  end)

  it("reads a multi-line chunk with the secondary prompt", function()
    local out = repl("function triple(a)\n  return a * 3\nend\ntriple(14)\n")
    assert_in_order(out, "> >> >> > 42\n")
  end)

  it("treats a leading '=' as return", function()
    local out = repl("=2^10\n")
    assert_in_order(out, "> 1024.0\n")
  end)

  it("reads lines longer than its read buffer", function()
    local long = string.rep("a", 3000)
    local out = repl("#'" .. long .. "'\n")
    assert_in_order(out, "> 3000\n")
  end)

  it("honours _PROMPT and _PROMPT2", function()
    local out = repl("_PROMPT = 'lt> '; _PROMPT2 = '.. '\nif true then\nend\n7\n")
    assert_in_order(out, "> lt> .. lt> 7\n")
  end)

  it("reports a syntax error and goes on", function()
    local out, rc = repl("x = = 1\n'still here'\n")
    assert_in_order(out, "stdin:1:", "unexpected symbol", "still here\n")
    assert.are.equal(0, rc)
  end)

  it("reports a runtime error with a traceback and goes on", function()
    local out, rc = repl("error('boom')\nnosuch.field\nv = 41\nv + 1\n")
    assert_in_order(out, "stdin:1: boom", "stack traceback:", "in main chunk",
      "attempt to index a nil value (global 'nosuch')", "stack traceback:", "42\n")
    assert.are.equal(0, rc)
  end)

  it("reports an error object that is not a string", function()
    local out = repl("error({})\nerror(setmetatable({}, {__tostring = function() return 'custom' end}))\n'ok'\n")
    assert_in_order(out, "(error object is a table value)", "custom", "ok\n")
  end)

  it("reports an incomplete chunk at end of input and exits 0", function()
    local out, rc = repl("for i = 1, 3 do\n")
    assert_in_order(out, ">> ", "<eof>")
    assert.are.equal(0, rc)
  end)

  it("exits with status 0 at end of input", function()
    local out, rc = repl("")
    assert_in_order(out, "> ")
    assert.are.equal(0, rc)
  end)

  it("interrupts a running chunk on Ctrl-C and keeps the session", function()
    local out, rc = fifo_session([[
echo "x = 'kept'" >&3
echo "print('looping') while true do end" >&3
waitfor looping || echo "__never_started"
sleep 0.1
kill -INT $pid
echo "print('alive', x)" >&3
waitfor alive || echo "__not_alive"
]])
    assert.is_nil(out:find("__never_started", 1, true), out)
    assert_in_order(out, "looping\n", "interrupted", "alive\tkept\n")
    assert.are.equal(0, rc)
  end)

  it("resumes collectives on the line after a Ctrl-C", function()
    -- Ctrl-C raises the communicators' interrupt flag (a wait in a collective would return);
    -- unless the REPL clears it before the next line, every collective fails "interrupted".
    local out, rc = fifo_session([[
echo "c = lt.comm_world()" >&3
echo "print('looping') while true do end" >&3
waitfor looping || echo "__never_started"
sleep 0.1
kill -INT $pid
echo "t = lt.tensor.from({2}); c:all_reduce(t); c:barrier(); print('reduced', t:item())" >&3
waitfor reduced || echo "__not_reduced"
]])
    assert.is_nil(out:find("__", 1, true), out)
    assert_in_order(out, "looping\n", "interrupted", "reduced\t2.0\n")
    assert.is_nil(out:find("interrupted (Ctrl-C)", 1, true), out)
    assert.are.equal(0, rc)
  end)

  it("discards pending input on Ctrl-C at a prompt", function()
    local out, rc = fifo_session([[
echo "function g()" >&3
waitfor ">> " || echo "__no_continuation"
kill -INT $pid
sleep 0.1
echo "print('alive', g)" >&3
waitfor alive || echo "__not_alive"
]])
    assert_in_order(out, ">> ", "alive\tnil\n")
    assert.is_nil(out:find("__", 1, true), out)
    assert.is_nil(out:find("error", 1, true), out)
    assert.are.equal(0, rc)
  end)
end)

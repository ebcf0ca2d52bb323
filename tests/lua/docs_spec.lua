-- Every command the README and the command's help texts show is run, as written, with few
-- iterations appended (train.train_iters=2), in a fresh folder: documentation that stops working
-- fails here. The commands are read from the texts themselves, so a new example is tested too.
-- Needs LUATRON (the binary; tests/lua/BUILD provides it with the README and the recipes).
local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, write = h.q, h.tmpdir, h.write

local ROOT = (function()
  local p = io.popen("pwd")
  local d = p:read("l")
  p:close()
  return d
end)()
local BIN = h.luatron_bin()
if not BIN:match("^/") then BIN = ROOT .. "/" .. BIN end
local EMULATED = ROOT .. "/tests/cuda/luatron_cuda_emulated.so"

local function read(path)
  local f = assert(io.open(path))
  local s = f:read("a")
  f:close()
  return s
end

-- The example commands of the README's sh blocks and of the help texts.
local function documented_commands()
  local cmds, seen = {}, {}
  local function add(where, text)
    if not seen[text] then cmds[#cmds + 1] = { where = where, text = text } end
    seen[text] = true
  end
  local readme = read(ROOT .. "/README.md")
  for block in readme:gmatch("```sh\n(.-)```") do
    for line in block:gmatch("[^\n]+") do
      add("README.md", (line:gsub("%s+#.*$", "")))
    end
  end
  for _, help in ipairs { "--help", "run --help", "launch --help", "preprocess --help" } do
    local code, out = h.run(q(BIN) .. " " .. help)
    assert(code == 0, out)
    local examples = out:match("\nexamples:\n(.-)\n\n") or out:match("\nexamples:\n(.*)$") or ""
    for line in examples:gmatch("[^\n]+") do
      add("luatron " .. help, line:match("^%s*(.-)%s*$"))
    end
  end
  return cmds
end

-- A shell command line for the documented one: our binary, the repository's recipes, a few
-- iterations; device "cuda" on the emulated plugin (the model made small for it).
local function runnable(text)
  local cmd = text:gsub("^%./luatron ", "luatron "):gsub("bazel%-bin/luatron ", "luatron ")
  cmd = cmd:gsub("^luatron ", q(BIN) .. " "):gsub(" luatron ", " " .. q(BIN) .. " ")
  cmd = cmd:gsub("recipes/", ROOT .. "/recipes/")
  if cmd:match("^mpirun ") and io.popen("id -u"):read("l") == "0" then
    cmd = cmd:gsub("^mpirun ", "mpirun --allow-run-as-root --oversubscribe ")
  end
  if cmd:find("%.lua") then
    cmd = cmd .. " train.train_iters=2 logger.log_interval=1"
    if cmd:find("model.device=cuda", 1, true) then
      cmd = ("LUATRON_CUDA_PLUGIN=%s %s model.num_layers=1 model.hidden_size=32 model.seq_length=32 "
        .. "dataset.sequence_length=32 train.global_batch_size=2 train.micro_batch_size=1"):format(q(EMULATED), cmd)
    end
  end
  if cmd:find("--repl", 1, true) then cmd = "echo 'print(\"rank\", lt.parallel_state().rank)' | " .. cmd end
  return cmd
end

local CORPUS = '{"text": "The first document."}\n{"text": "A second one, longer than the first."}\n'

describe("documented commands", function()
  local cmds = documented_commands()
  it("are found in the README and the help texts", function()
    assert.is_true(#cmds >= 10, "found only " .. #cmds)
  end)
  for _, c in ipairs(cmds) do
    if c.text ~= "./luatron test" then -- the suite itself (CI runs it)
      it(c.where .. ": " .. c.text, function()
        local dir = tmpdir()
        write(dir .. "/corpus.jsonl", CORPUS)
        local cmd = runnable(c.text)
        local code, out = h.run("cd " .. q(dir) .. " && " .. cmd .. (cmd:find("--repl", 1, true) and "" or " </dev/null"))
        assert.are.equal(0, code, runnable(c.text) .. "\n" .. out)
        if c.text:find("--help", 1, true) then
          assert.truthy(out:find("usage: luatron run", 1, true), out)
        elseif c.text:find("%.lua") then
          assert.truthy(out:find("iteration +2/2"), out)
        end
        if c.text:find("--repl", 1, true) then assert.truthy(out:find("[rank 1] rank\t1", 1, true), out) end
      end)
    end
  end
end)

-- LoggerConfig.tensorboard_dir: a run writes a TensorBoard event file that this spec reads back with a
-- decoder of its own (a bitwise CRC-32C, not the module's table, and a protobuf walk): every record's
-- length and data checksums hold, the first event is the file version, and the scalars carry the
-- run's loss, learning rate and gradient norm at their steps (every tensorboard_log_interval-th), its
-- validation loss and perplexity, and on logged steps tokens/s and peak memory, all equal (as float32) to
-- what the metrics file says. Needs LUATRON (tests/lua/BUILD provides it).
local tensorboard = require "luatron.tensorboard"
local json = require "luatron.json"

local h = dofile("tests/lua/helpers.lua")
local q, run, tmpdir = h.q, h.run, h.tmpdir

local LUATRON = os.getenv("LUATRON")

local function crc32c(s) -- bit by bit
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = c ~ s:byte(i)
    for _ = 1, 8 do c = (c & 1) ~= 0 and ((c >> 1) ~ 0x82F63B78) or (c >> 1) end
  end
  return c ~ 0xFFFFFFFF
end
local function masked(s)
  local c = crc32c(s)
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
end

-- Protobuf fields of s: { {field =, value =}, ... } (varints as integers, 64-bit as doubles, 32-bit as
-- floats, length-delimited as strings).
local function fields(s)
  local out, i = {}, 1
  local function varint()
    local n, shift = 0, 0
    repeat
      local b = s:byte(i)
      i = i + 1
      n = n | ((b & 0x7F) << shift)
      shift = shift + 7
    until b < 0x80
    return n
  end
  while i <= #s do
    local k = varint()
    local field, wire, v = k >> 3, k & 7, nil
    if wire == 0 then v = varint()
    elseif wire == 1 then v, i = string.unpack("<d", s, i)
    elseif wire == 5 then v, i = string.unpack("<f", s, i)
    elseif wire == 2 then
      local n = varint()
      v, i = s:sub(i, i + n - 1), i + n
    else error("wire type " .. wire) end
    out[#out + 1] = { field = field, value = v }
  end
  return out
end
local function field(fs, n)
  for _, f in ipairs(fs) do if f.field == n then return f.value end end
end

-- The events of an event file, checksums checked: { {wall_time =, step =, version =, tag =, value =} }.
local function read_events(path)
  local data = assert(io.open(path, "rb")):read("a")
  local events, i = {}, 1
  while i <= #data do
    local len = string.unpack("<I8", data, i)
    assert.are.equal(masked(data:sub(i, i + 7)), (string.unpack("<I4", data, i + 8)), "length checksum")
    local body = data:sub(i + 12, i + 11 + len)
    assert.are.equal(masked(body), (string.unpack("<I4", data, i + 12 + len)), "data checksum")
    i = i + 16 + len
    local ev = fields(body)
    local e = { wall_time = field(ev, 1), step = field(ev, 2) or 0, version = field(ev, 3) }
    local summary = field(ev, 5)
    if summary then
      local value = fields(field(fields(summary), 1))
      e.tag, e.value = field(value, 1), field(value, 2)
    end
    events[#events + 1] = e
  end
  return events
end

local function f32(x) return (string.unpack("f", string.pack("f", x))) end

describe("TensorBoard event files", function()
  it("checksums as TFRecord's: CRC-32C of '123456789' and the masked CRC of nothing", function()
    assert.are.equal(0xE3069283, tensorboard.crc32c("123456789"))
    assert.are.equal(0xA282EAD8, tensorboard.masked_crc(""))
    assert.are.equal(masked("luatron"), tensorboard.masked_crc("luatron"))
  end)

  it("a run's scalars read back with the metrics file's values, every tensorboard_log_interval steps", function()
    assert(LUATRON, "LUATRON is not set: point it at the luatron binary")
    local dir = tmpdir()
    local code, out = run(("%s run recipes/gpt_tiny.lua train.train_iters=6 logger.log_interval=3 "
      .. "logger.tensorboard_dir=%s logger.tensorboard_log_interval=2 train.eval_interval=3 train.eval_iters=1 "
      .. "logger.log_params_norm=true"):format(q(LUATRON), q(dir)))
    assert.are.equal(0, code, out)
    local p = io.popen("ls " .. q(dir) .. "/events.out.tfevents.*")
    local files = {}
    for line in p:lines() do files[#files + 1] = line end
    p:close()
    assert.are.equal(1, #files)
    local events = read_events(files[1])
    assert.are.equal("brain.Event:2", events[1].version)
    assert.is_true(math.abs(events[1].wall_time - os.time()) < 600)
    local by = {}
    for _, e in ipairs(events) do
      if e.tag then
        by[e.tag] = by[e.tag] or {}
        by[e.tag][e.step] = e.value
      end
    end
    local steps, valid = {}, {}
    for line in io.lines(dir .. "/metrics.jsonl") do
      local r = json.decode(line)
      if r.validation_loss then valid[r.iteration] = r.validation_loss else steps[r.iteration] = r end
    end
    -- loss, learning rate, gradient norm on steps 2, 4, 6 only
    for it = 1, 6 do
      assert.are.equal(it % 2 == 0, by["lm loss"][it] ~= nil, "lm loss at step " .. it)
    end
    for it, r in pairs(steps) do -- the logged steps, 3 and 6
      if it % 2 == 0 then
        assert.are.equal(f32(r.loss), by["lm loss"][it])
        assert.are.equal(f32(r.lr), by["learning-rate"][it])
        assert.are.equal(f32(r.grad_norm), by["grad-norm"][it])
      end
      assert.are.equal(f32(r.params_norm), by["params-norm"][it])
      assert.are.equal(f32(r.tokens_per_s), by["tokens-per-second"][it])
      assert.is_true(by["mem-max-allocated-bytes"][it] > 0)
    end
    for _, it in ipairs { 3, 6 } do
      assert.are.equal(f32(valid[it]), by["lm loss validation"][it])
      assert.are.equal(f32(math.exp(valid[it])), by["lm loss validation ppl"][it])
    end
  end)
end)

-- TensorBoard event files, as TensorFlow's SummaryWriter writes them, for LoggerConfig.tensorboard_dir:
-- a file events.out.tfevents.<seconds>.<host>.<pid> of records, each
--   uint64 length (little-endian), uint32 masked CRC-32C of those 8 bytes,
--   the data (an Event protobuf), uint32 masked CRC-32C of the data,
-- the first Event holding file_version "brain.Event:2", the others one scalar each:
--   Event { double wall_time = 1; int64 step = 2; Summary summary = 5 }
--   Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
--   local tb = tensorboard.writer(dir); tb:scalar("lm loss", 2.31, 10); tb:close()
local core = require "luatron.core"
local fs = require "luatron.fs"

local M = {}

-- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), a byte at a time through a table.
local CRC_TABLE = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do c = (c & 1) ~= 0 and (0x82F63B78 ~ (c >> 1)) or (c >> 1) end
  CRC_TABLE[i] = c
end

function M.crc32c(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do c = CRC_TABLE[(c ~ s:byte(i)) & 0xFF] ~ (c >> 8) end
  return c ~ 0xFFFFFFFF
end

-- TFRecord's masked CRC: rotated right by 15 bits, plus a constant (mod 2^32).
function M.masked_crc(s)
  local c = M.crc32c(s)
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
end

-- Protobuf: a varint, and a field's key (number, wire type).
local function varint(n)
  local out = {}
  repeat
    local b = n & 0x7F
    n = n >> 7
    out[#out + 1] = string.char(n ~= 0 and (b | 0x80) or b)
  until n == 0
  return table.concat(out)
end
local function key(field, wire) return varint(field << 3 | wire) end
local function bytes_field(field, s) return key(field, 2) .. varint(#s) .. s end

local function event(wall_time, step, body)
  return key(1, 1) .. string.pack("<d", wall_time) .. key(2, 0) .. varint(step) .. body
end

local function record(data)
  local len = string.pack("<I8", #data)
  return len .. string.pack("<I4", M.masked_crc(len)) .. data .. string.pack("<I4", M.masked_crc(data))
end

local Writer = {}
Writer.__index = Writer

-- A writer of a new event file in dir (made if missing).
function M.writer(dir)
  fs.mkdir_p(dir)
  local p = io.popen("hostname 2>/dev/null")
  local host = ((p and p:read("l")) or "localhost"):gsub("[^%w%.%-]", "_")
  if p then p:close() end
  local path = ("%s/events.out.tfevents.%d.%s.%d"):format(dir, os.time(), host, core.pid())
  local f, err = io.open(path, "wb")
  if not f then error(("logger.tensorboard_dir: the event file cannot be written: %s"):format(err), 0) end
  local self = setmetatable({ file = f, path = path }, Writer)
  self:write(event(core.wall_time(), 0, bytes_field(3, "brain.Event:2")))
  return self
end

function Writer:write(data)
  self.file:write(record(data))
  self.file:flush() -- (TensorBoard reads the file while the run goes on)
end

-- One scalar: tag's value at step.
function Writer:scalar(tag, value, step)
  local v = bytes_field(1, tag) .. key(2, 5) .. string.pack("<f", value)
  self:write(event(core.wall_time(), step, bytes_field(5, bytes_field(1, v))))
end

function Writer:close() self.file:close() end

return M

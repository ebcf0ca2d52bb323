-- luatron.json: a small, strict JSON encoder and decoder.
--
-- Used for metrics JSON lines, checkpoint state files and config dumps, so it favours exactness
-- and stable output over speed:
--   * object keys are always written in sorted order, so the same value gives the same bytes;
--   * Lua integers are written as integers and floats with the shortest of %.15g/%.16g/%.17g that
--     reads back to the same double (a float with an integral value keeps a ".0" so that it
--     decodes as a float again); NaN and infinities are refused;
--   * decode is strict (RFC 8259): no comments, no trailing commas, no leading zeros, no raw
--     control characters in strings, valid UTF-8 only, no duplicate keys; every error names the
--     line, column and byte where it happened.
--
-- API
--   json.encode(value [, opts]) -> string     opts.indent: number of spaces (pretty output)
--   json.decode(text) -> value                 null decodes to json.null; arrays carry json.array's mark
--   json.null                                  sentinel for JSON null (encode it to get null)
--   json.array(t) -> t                         marks t as an array (so an empty t encodes as [])
--   json.object(t) -> t                        marks t as an object (so an empty t encodes as {})
--   json.is_array(t) -> boolean                true for tables marked by json.array (decoded arrays)
local json = {}

local ARRAY_MT = { __name = "json.array" }
local OBJECT_MT = { __name = "json.object" }

json.null = setmetatable({}, {
  __name = "json.null",
  __tostring = function() return "json.null" end,
  __newindex = function() error("json.null is read-only", 2) end,
})

function json.array(t)
  t = t or {}
  return setmetatable(t, ARRAY_MT)
end

function json.object(t)
  t = t or {}
  return setmetatable(t, OBJECT_MT)
end

function json.is_array(t)
  return type(t) == "table" and getmetatable(t) == ARRAY_MT
end

------------------------------------------------------------------------------------------------
-- Encoding
------------------------------------------------------------------------------------------------

local ESCAPES = {
  ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
}

local function path_key(path, k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return path .. "." .. k end
  if type(k) == "string" then return path .. string.format("[%q]", k) end
  return path .. "[" .. tostring(k) .. "]"
end

local function encode_error(msg, path)
  error("json.encode: " .. msg .. " at " .. path, 0)
end

local function encode_string(s, path)
  if not utf8.len(s) then encode_error("invalid UTF-8 in string", path) end
  return '"' .. s:gsub('[%c"\\]', function(c)
    local e = ESCAPES[c]
    if e then return e end
    local b = c:byte()
    if b < 32 then return string.format("\\u%04x", b) end
    return c -- DEL (127) is a valid raw character in JSON strings
  end) .. '"'
end

-- The shortest decimal text that reads back as exactly x.
local function format_float(x, path)
  if x ~= x then encode_error("cannot encode NaN", path) end
  if x == math.huge or x == -math.huge then encode_error("cannot encode " .. tostring(x), path) end
  local s
  for _, f in ipairs({ "%.15g", "%.16g", "%.17g" }) do
    s = string.format(f, x)
    if tonumber(s) == x then break end
  end
  if not s:find("[.eEn]") then s = s .. ".0" end -- keep floats floats
  return s
end

json._format_float = format_float

local function classify(t, path)
  local mt = getmetatable(t)
  if mt == ARRAY_MT then
    local n = #t
    for k in pairs(t) do
      if math.type(k) ~= "integer" or k < 1 or k > n then
        encode_error("array has a non-sequence key " .. string.format("%q", tostring(k)), path)
      end
    end
    return "array", n
  end
  local nkeys, nstr, maxi = 0, 0, 0
  for k in pairs(t) do
    nkeys = nkeys + 1
    if type(k) == "string" then
      nstr = nstr + 1
    elseif math.type(k) == "integer" and k >= 1 then
      if k > maxi then maxi = k end
    else
      encode_error("table key " .. tostring(k) .. " (a " .. type(k) .. ") is neither a string nor an array index", path)
    end
  end
  if mt == OBJECT_MT or nkeys == 0 then
    if nstr ~= nkeys then encode_error("object has a non-string key", path) end
    return "object"
  end
  if nstr == nkeys then return "object" end
  if nstr > 0 then encode_error("table mixes string keys and array indices", path) end
  if maxi ~= nkeys then encode_error("array is sparse (has holes; use json.null for missing values)", path) end
  return "array", maxi
end

local function encode_value(v, path, seen, indent, depth, out)
  local tv = type(v)
  if v == json.null or v == nil then
    out[#out + 1] = "null"
  elseif tv == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif tv == "number" then
    if math.type(v) == "integer" then
      out[#out + 1] = string.format("%d", v)
    else
      out[#out + 1] = format_float(v, path)
    end
  elseif tv == "string" then
    out[#out + 1] = encode_string(v, path)
  elseif tv == "table" then
    if seen[v] then encode_error("circular reference", path) end
    seen[v] = true
    local kind, n = classify(v, path)
    local nl, pad, padc = "", "", ""
    if indent then
      nl = "\n"
      pad = string.rep(indent, depth + 1)
      padc = string.rep(indent, depth)
    end
    if kind == "array" then
      if n == 0 then
        out[#out + 1] = "[]"
      else
        out[#out + 1] = "[" .. nl
        for i = 1, n do
          out[#out + 1] = pad
          encode_value(v[i], path .. "[" .. i .. "]", seen, indent, depth + 1, out)
          out[#out + 1] = (i < n and "," or "") .. nl
        end
        out[#out + 1] = padc .. "]"
      end
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = k end
      table.sort(keys)
      if #keys == 0 then
        out[#out + 1] = "{}"
      else
        out[#out + 1] = "{" .. nl
        local sep = indent and ": " or ":"
        for i, k in ipairs(keys) do
          local kp = path_key(path, k)
          out[#out + 1] = pad .. encode_string(k, kp) .. sep
          encode_value(v[k], kp, seen, indent, depth + 1, out)
          out[#out + 1] = (i < #keys and "," or "") .. nl
        end
        out[#out + 1] = padc .. "}"
      end
    end
    seen[v] = nil
  else
    encode_error("cannot encode a value of type " .. tv, path)
  end
end

function json.encode(value, opts)
  local indent
  if opts ~= nil then
    if type(opts) ~= "table" then error("json.encode: opts must be a table", 2) end
    if opts.indent ~= nil then
      if math.type(opts.indent) ~= "integer" or opts.indent < 0 then
        error("json.encode: opts.indent must be a non-negative integer", 2)
      end
      indent = string.rep(" ", opts.indent)
    end
  end
  local out = {}
  encode_value(value, "$", {}, indent, 0, out)
  return table.concat(out)
end

------------------------------------------------------------------------------------------------
-- Decoding
------------------------------------------------------------------------------------------------

local MAX_DEPTH = 512

local function decode_error(str, pos, msg)
  local line, col = 1, 1
  local before = str:sub(1, pos - 1)
  for _ in before:gmatch("\n") do line = line + 1 end
  local last_nl = before:match(".*()\n")
  col = last_nl and (pos - last_nl) or pos
  error(string.format("json.decode: %s at line %d column %d (byte %d)", msg, line, col, pos), 0)
end

local function describe_char(str, pos)
  if pos > #str then return "end of input" end
  local c = str:sub(pos, pos)
  if c:match("%c") then return string.format("character 0x%02x", c:byte()) end
  return "'" .. c .. "'"
end

local function skip_ws(str, pos)
  local _, e = str:find("^[ \t\r\n]*", pos)
  return e + 1
end

local decode_value

local function decode_string(str, pos)
  -- str:sub(pos, pos) == '"'
  local parts = {}
  local i = pos + 1
  while true do
    local j = str:find('[\0-\31"\\]', i)
    if not j then decode_error(str, pos, "unterminated string") end
    if j > i then
      local seg = str:sub(i, j - 1)
      if not utf8.len(seg) then
        local _, bad = utf8.len(seg)
        decode_error(str, i + bad - 1, "invalid UTF-8 in string")
      end
      parts[#parts + 1] = seg
    end
    local c = str:sub(j, j)
    if c == '"' then
      return table.concat(parts), j + 1
    elseif c == "\\" then
      local e = str:sub(j + 1, j + 1)
      local simple = ({ ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' })[e]
      if simple then
        parts[#parts + 1] = simple
        i = j + 2
      elseif e == "u" then
        local hex = str:match("^%x%x%x%x", j + 2)
        if not hex then decode_error(str, j, "invalid \\u escape (expected 4 hex digits)") end
        local cp = tonumber(hex, 16)
        i = j + 6
        if cp >= 0xD800 and cp <= 0xDBFF then
          local hex2 = str:match("^\\u(%x%x%x%x)", i)
          local lo = hex2 and tonumber(hex2, 16)
          if not lo or lo < 0xDC00 or lo > 0xDFFF then
            decode_error(str, j, "unpaired high surrogate in \\u escape")
          end
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
          i = i + 6
        elseif cp >= 0xDC00 and cp <= 0xDFFF then
          decode_error(str, j, "unpaired low surrogate in \\u escape")
        end
        parts[#parts + 1] = utf8.char(cp)
      else
        decode_error(str, j, "invalid escape '\\" .. e .. "'")
      end
    else
      decode_error(str, j, string.format("raw control character 0x%02x in string (escape it)", c:byte()))
    end
  end
end

local function decode_number(str, pos)
  local i = pos
  if str:sub(i, i) == "-" then i = i + 1 end
  local c = str:sub(i, i)
  if c == "0" then
    i = i + 1
    if str:sub(i, i):match("%d") then decode_error(str, pos, "leading zeros are not allowed in numbers") end
  elseif c:match("%d") then
    local _, e = str:find("^%d+", i)
    i = e + 1
  else
    decode_error(str, pos, "invalid number")
  end
  local is_float = false
  if str:sub(i, i) == "." then
    local _, e = str:find("^%d+", i + 1)
    if not e then decode_error(str, i + 1, "expected a digit after the decimal point") end
    i = e + 1
    is_float = true
  end
  c = str:sub(i, i)
  if c == "e" or c == "E" then
    local _, e = str:find("^[+-]?%d+", i + 1)
    if not e then decode_error(str, i + 1, "expected a digit in the exponent") end
    i = e + 1
    is_float = true
  end
  local text = str:sub(pos, i - 1)
  local v = tonumber(text)
  if is_float then
    if math.type(v) == "integer" then v = v + 0.0 end
    if v == math.huge or v == -math.huge then decode_error(str, pos, "number out of range: " .. text) end
  end
  return v, i
end

local function decode_array(str, pos, depth)
  local arr = json.array({})
  local n = 0
  local i = skip_ws(str, pos + 1)
  if str:sub(i, i) == "]" then return arr, i + 1 end
  while true do
    local v
    v, i = decode_value(str, i, depth + 1)
    n = n + 1
    arr[n] = v
    i = skip_ws(str, i)
    local c = str:sub(i, i)
    if c == "]" then return arr, i + 1 end
    if c ~= "," then decode_error(str, i, "expected ',' or ']' in array, got " .. describe_char(str, i)) end
    i = skip_ws(str, i + 1)
    if str:sub(i, i) == "]" then decode_error(str, i, "trailing comma in array") end
  end
end

local function decode_object(str, pos, depth)
  local obj = json.object({})
  local i = skip_ws(str, pos + 1)
  if str:sub(i, i) == "}" then return obj, i + 1 end
  while true do
    if str:sub(i, i) ~= '"' then
      decode_error(str, i, "expected a string key in object, got " .. describe_char(str, i))
    end
    local key
    local kpos = i
    key, i = decode_string(str, i)
    if obj[key] ~= nil then decode_error(str, kpos, "duplicate key '" .. key .. "' in object") end
    i = skip_ws(str, i)
    if str:sub(i, i) ~= ":" then decode_error(str, i, "expected ':' after object key, got " .. describe_char(str, i)) end
    i = skip_ws(str, i + 1)
    local v
    v, i = decode_value(str, i, depth + 1)
    obj[key] = v
    i = skip_ws(str, i)
    local c = str:sub(i, i)
    if c == "}" then return obj, i + 1 end
    if c ~= "," then decode_error(str, i, "expected ',' or '}' in object, got " .. describe_char(str, i)) end
    i = skip_ws(str, i + 1)
    if str:sub(i, i) == "}" then decode_error(str, i, "trailing comma in object") end
  end
end

decode_value = function(str, pos, depth)
  if depth > MAX_DEPTH then decode_error(str, pos, "nesting deeper than " .. MAX_DEPTH) end
  pos = skip_ws(str, pos)
  local c = str:sub(pos, pos)
  if c == "{" then return decode_object(str, pos, depth)
  elseif c == "[" then return decode_array(str, pos, depth)
  elseif c == '"' then return decode_string(str, pos)
  elseif c == "-" or c:match("^%d$") then return decode_number(str, pos)
  elseif str:sub(pos, pos + 3) == "true" then return true, pos + 4
  elseif str:sub(pos, pos + 4) == "false" then return false, pos + 5
  elseif str:sub(pos, pos + 3) == "null" then return json.null, pos + 4
  elseif c == "" then decode_error(str, pos, "unexpected end of input (expected a value)")
  else decode_error(str, pos, "unexpected " .. describe_char(str, pos) .. " (expected a value)")
  end
end

function json.decode(str)
  if type(str) ~= "string" then
    error("json.decode: expected a string, got " .. type(str), 2)
  end
  local v, i = decode_value(str, 1, 0)
  i = skip_ws(str, i)
  if i <= #str then decode_error(str, i, "unexpected " .. describe_char(str, i) .. " after the JSON value") end
  return v
end

return json

-- luatron.config.util: the pieces shared by the config modules: config errors (raised as tables
-- inside the library, re-raised as strings at the user's line by the public entry points), value
-- formatting for messages and "did you mean" suggestions.
local util = {}

local ConfigError = { __name = "luatron.ConfigError" }
ConfigError.__tostring = function(e) return e.msg end

-- Raise a config error. Public entry points catch it and re-raise the message with the position
-- of their caller (see util.raise), so the message points at the recipe line.
function util.fail(msg, ...)
  if select("#", ...) > 0 then msg = string.format(msg, ...) end
  error(setmetatable({ msg = msg }, ConfigError), 0)
end

function util.is_config_error(e)
  return getmetatable(e) == ConfigError
end

-- Prefix a config error raised by f(...) with `prefix`; other errors pass through unchanged.
function util.with_prefix(prefix, f, ...)
  local res = table.pack(pcall(f, ...))
  if res[1] then return table.unpack(res, 2, res.n) end
  local e = res[2]
  if util.is_config_error(e) then util.fail(prefix .. e.msg) end
  error(e, 0)
end

-- An error's message without the "file:line: " position Lua put in front of it (errors from the
-- engine that are the user's to fix: the position would point into the library).
function util.message(e) return (tostring(e):gsub("^[^\n]-:%d+: ", "", 1)) end

-- Where the config library's own files live, so that errors can skip their frames.
local getinfo = debug and debug.getinfo -- absent only in a stripped-down Lua
local LIB_PREFIX = getinfo and getinfo(1, "S").source:match("^(@.*/)config/util%.lua$")
local LIB_SOURCES = {}

-- Each config module registers its chunk source here (for chunk names without a directory).
function util.register_source(level)
  if getinfo then LIB_SOURCES[getinfo((level or 1) + 1, "S").source] = true end
end
util.register_source()

local function in_library(source)
  return LIB_SOURCES[source] or (LIB_PREFIX ~= nil and source:sub(1, #LIB_PREFIX) == LIB_PREFIX)
end

-- Re-raise the error e caught by a public entry point (the function calling util.raise).
-- A config error is raised as its message at the first caller outside the luatron library, so
-- "file:line:" names the recipe line that made the call, also when the call went through other
-- luatron modules. When that caller is C code (pcall, dofile of a chunk that tail-called the
-- entry point) the message carries no position. Other errors (bugs) pass through unchanged.
function util.raise(e)
  if not util.is_config_error(e) then error(e, 0) end
  local level = 3 -- 1: util.raise, 2: the entry point, 3: its caller
  if not getinfo then error(e.msg, level) end
  local tail = getinfo(2, "t").istailcall
  while true do
    local info = getinfo(level, "S")
    if not info or info.what == "C" then
      if tail then
        error(e.msg .. " (no line number: the config call was a tail call such as `return ConfigContainer{...}`; "
          .. "assign it to a local first to get one)", 0)
      end
      error(e.msg, 0)
    end
    if not in_library(info.source) then error(e.msg, level) end
    level = level + 1
  end
end

-- A short, readable rendering of a value for messages: strings quoted, tables summarised.
function util.fmt(v)
  local tv = type(v)
  if tv == "string" then
    return "'" .. v .. "'"
  elseif tv == "number" then
    if math.type(v) == "float" then
      if v ~= v then return "nan" end
      if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format("%.1f", v) end
      local s
      for _, f in ipairs({ "%.15g", "%.16g", "%.17g" }) do
        s = string.format(f, v)
        if tonumber(s) == v then break end
      end
      return s
    end
    return tostring(v)
  elseif tv == "table" then
    local mt = getmetatable(v)
    if mt and mt.__luatron_class then return tostring(v) end
    local parts, n = {}, 0
    for i = 1, #v do
      n = n + 1
      if n > 8 then parts[#parts + 1] = "..." break end
      parts[#parts + 1] = util.fmt(v[i])
    end
    local keys = {}
    for k in pairs(v) do
      if not (math.type(k) == "integer" and k >= 1 and k <= #v) then keys[#keys + 1] = k end
    end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
      n = n + 1
      if n > 8 then parts[#parts + 1] = "..." break end
      parts[#parts + 1] = tostring(k) .. "=" .. util.fmt(v[k])
    end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  return tostring(v)
end

-- Optimal string alignment distance (Damerau-Levenshtein with adjacent transpositions).
function util.edit_distance(a, b)
  local la, lb = #a, #b
  if la == 0 then return lb end
  if lb == 0 then return la end
  local d = {}
  for i = 0, la do
    d[i] = { [0] = i }
  end
  for j = 0, lb do d[0][j] = j end
  for i = 1, la do
    local ai = a:byte(i)
    for j = 1, lb do
      local cost = (ai == b:byte(j)) and 0 or 1
      local v = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and ai == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
        v = math.min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[la][lb]
end

-- The candidate nearest to `name`, or nil when nothing is near enough to be a plausible typo.
-- Case differences count as small; a candidate that contains the name (or the reverse) is also
-- offered when no close edit is found ('layers' -> 'num_layers').
function util.suggest(name, candidates)
  if type(name) ~= "string" then return nil end
  local lname = name:lower()
  local best, best_d
  for _, c in ipairs(candidates) do
    local d = util.edit_distance(lname, c:lower())
    if c ~= name and c:lower() == lname then d = 0 end
    if not best_d or d < best_d or (d == best_d and c < best) then best, best_d = c, d end
  end
  if best and best_d <= math.max(2, #name // 4) then return best end
  local sub
  for _, c in ipairs(candidates) do
    local lc = c:lower()
    if #lname >= 3 and (lc:find(lname, 1, true) or lname:find(lc, 1, true)) then
      if not sub or #c < #sub or (#c == #sub and c < sub) then sub = c end
    end
  end
  return sub
end

function util.did_you_mean(name, candidates)
  local s = util.suggest(name, candidates)
  if s then return " (did you mean " .. util.fmt(s) .. "?)" end
  return ""
end

-- Deep copy of plain data (tables without metatables, strings, numbers, booleans).
function util.copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = util.copy(x) end
  return t
end

return util

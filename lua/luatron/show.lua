-- How the REPL shows a result: a plain table as a Lua constructor ({4, 128}, {rank = 0}), small
-- ones whole and large ones cut short; anything else as tostring does (tensors, configs and
-- communicators have their own). Top-level strings print as they are, as with print.
local M = {}

local MAX_ITEMS, MAX_DEPTH = 16, 3

local function is_plain(t)
  local mt = getmetatable(t)
  return mt == nil or (type(mt) == "table" and rawget(mt, "__tostring") == nil)
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return k end
  return "[" .. M.format(k, 1) .. "]"
end

-- The text of v; depth > 0 inside a table (strings are quoted there).
function M.format(v, depth)
  depth = depth or 0
  if type(v) == "string" then return depth == 0 and v or ("%q"):format(v) end
  if type(v) ~= "table" or not is_plain(v) then return tostring(v) end
  if depth >= MAX_DEPTH then return "{...}" end
  local parts, n = {}, #v
  for i = 1, math.min(n, MAX_ITEMS) do parts[#parts + 1] = M.format(v[i], depth + 1) end
  if n > MAX_ITEMS then parts[#parts + 1] = ("... (%d items)"):format(n) end
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for i, k in ipairs(keys) do
    if i > MAX_ITEMS then
      parts[#parts + 1] = ("... (%d more keys)"):format(#keys - MAX_ITEMS)
      break
    end
    parts[#parts + 1] = key_text(k) .. " = " .. M.format(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- print, with every value shown as format shows it.
function M.print(...)
  local n = select("#", ...)
  local texts = {}
  for i = 1, n do texts[i] = M.format((select(i, ...))) end
  io.stdout:write(table.concat(texts, "\t"), "\n")
end

return M

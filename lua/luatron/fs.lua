-- The few file-system helpers the library needs (plain Lua io and the shell): quoting a path for
-- a shell command, whether a file exists, a whole file's text, making a folder and its parents.
local M = {}

function M.quote(path) return "'" .. path:gsub("'", "'\\''") .. "'" end

function M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The file's text, or nil when it cannot be read.
function M.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- mkdir -p; whether it worked shows when the folder is written to (that error names the path).
function M.mkdir_p(dir) os.execute("mkdir -p " .. M.quote(dir) .. " 2>/dev/null") end

return M

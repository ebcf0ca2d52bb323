-- Command-line overrides of a recipe's config: `group.field=value` (train.train_iters=20) or
-- `field=value` for the container's own fields (mixed_precision=bf16_mixed), `--help`, which
-- lists every field a recipe's config takes, and `--trace=FILE` (a Chrome trace of the pipeline
-- steps). An argument that is neither is an error
-- that says what was probably meant, so `--train_iters 5` never runs the full recipe.
local config = require "luatron.config"
local schema = require "luatron.config.schema"
local util = require "luatron.config.util"

local M = {}

function M.parse_value(s)
  if s == "true" then return true end
  if s == "false" then return false end
  if s == "nil" or s == "null" then return nil end
  return math.tointeger(tonumber(s)) or tonumber(s) or s
end

-- The groups ("model", ...) that have a field of this name.
local function groups_with(field)
  local found = {}
  for _, g in ipairs(schema.GROUPS) do
    if schema.classes[g[2]].index[field] then found[#found + 1] = g[1] end
  end
  return found
end

-- What an argument that is not an override probably meant.
local function guess(a, next_arg)
  local name, value = a:gsub("^%-+", ""):gsub("%-", "_"):match("^([%w_]+)=?(.*)$")
  if not name then return "" end
  if value == "" and next_arg and not next_arg:find("=", 1, true) then value = next_arg end
  local groups = groups_with(name)
  if #groups == 0 then return "" end
  for i, g in ipairs(groups) do groups[i] = ("%s.%s=%s"):format(g, name, value ~= "" and value or "...") end
  return " (did you mean " .. table.concat(groups, " or ") .. "?)"
end

-- Sets one override on cfg; raises an error naming the argument.
local function set(cfg, a, group, field, value)
  local function fail(e)
    error(("override %q: %s"):format(a, util.message(e)), 0)
  end
  local target = cfg
  if group then
    -- A ConfigContainer raises on an unknown field (with a "did you mean"): look the group up
    -- under pcall and name the override in the message.
    local found, grp = pcall(function() return cfg[group] end)
    if not found then fail(grp) end
    if not config.is_config(grp) then fail(("ConfigContainer.%s is not a group of fields"):format(group)) end
    target = grp
  elseif schema.classes.ConfigContainer.index[field] == nil or #groups_with(field) > 0 then
    local groups = groups_with(field)
    fail(("give the group of '%s' as group.field=value%s"):format(field,
      #groups > 0 and (" (" .. groups[1] .. "." .. field .. "=" .. value .. ")") or ""))
  end
  local ok, e = pcall(function() target[field] = M.parse_value(value) end)
  if not ok then fail(e) end
end

-- For recipes with arguments of their own: (the overrides and --help, for pretrain; the rest).
--   local overrides, mine = lt.overrides.split(arg)
function M.split(args)
  local ours, rest = { [0] = args and args[0] }, {}
  for _, a in ipairs(args or {}) do
    local t = (a:match("^[%w_]+%.[%w_]+=") or a:match("^[%w_]+=") or a == "--help" or a == "-h"
      or a:match("^%-%-trace=")) and ours or rest
    t[#t + 1] = a
  end
  return ours, rest
end

-- Applies the overrides in args to cfg. Returns true when args asked for --help, and the run's
-- options from the switches ({trace = FILE}); raises on an argument that is not an override.
function M.apply(cfg, args)
  local help, opts = false, {}
  args = args or {}
  for i, a in ipairs(args) do
    local group, field, value = a:match("^([%w_]+)%.([%w_]+)=(.*)$")
    if not group then field, value = a:match("^([%w_]+)=(.*)$") end
    if field then
      set(cfg, a, group, field, value)
    elseif a == "--help" or a == "-h" then
      help = true
    elseif a:match("^%-%-trace=.") then
      opts.trace = a:match("^%-%-trace=(.*)$")
    else
      error(("argument %q is not an override: recipes take group.field=value (e.g. train.train_iters=20)%s; "
        .. "`luatron run %s --help` lists the fields"):format(a, guess(a, args[i + 1]), args[0] or "RECIPE"), 0)
    end
  end
  return help, opts
end

local function note(spec)
  if spec.refuse then return "only " .. util.fmt(spec.default) .. ": " .. spec.refuse end
  if spec.needs then return "acts with " .. spec.needs .. ", which is not built yet" end
  if spec.inert then return "no effect here: " .. spec.inert end
  if type(spec.kind) == "table" and spec.kind.enum and #spec.kind.enum > 1 then
    local names = {}
    for _, e in ipairs(spec.kind.enum) do names[#names + 1] = util.fmt(e) end
    return "one of " .. table.concat(names, ", ")
  end
end

-- The --help text of a recipe: every field of its config with the value it has now.
function M.help(cfg, recipe)
  local lines = {
    ("usage: luatron run %s [group.field=value ...] [--trace=FILE]"):format(recipe or "RECIPE"),
    "",
    "--trace=FILE writes a Chrome trace of the pipeline steps of every rank (forward, backward and the",
    "waits for receives; open it in ui.perfetto.dev or chrome://tracing).",
    "",
    "Each override sets one field of the recipe's config before it is validated; values are numbers,",
    "true/false, nil or text. The fields, with the values this recipe gives them:",
  }
  local function add(prefix, obj, def)
    for _, spec in ipairs(def.fields) do
      if not (type(spec.kind) == "string" and spec.kind:match("^group:")) then
        local line = ("  %s%s=%s"):format(prefix, spec.name, util.fmt(obj[spec.name]))
        local n = note(spec)
        lines[#lines + 1] = n and ("%-48s  (%s)"):format(line, n) or line
      end
    end
  end
  for _, g in ipairs(schema.GROUPS) do
    lines[#lines + 1] = ""
    lines[#lines + 1] = ("%s (%s):"):format(g[1], g[2])
    add(g[1] .. ".", cfg[g[1]], schema.classes[g[2]])
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "the container:"
  add("", cfg, schema.classes.ConfigContainer)
  return table.concat(lines, "\n")
end

return M

-- Every field of every config class either works or is refused (issue 10): a ported Megatron config
-- must never train something else in silence. The schema says, for each field, which it is (see
-- luatron/config/schema.lua); this spec holds each claim to account:
--   read     code outside the config module names the field (Lua `x.field` / `"field"`, the C
--            bindings' lua_getfield(L, i, "field"))
--   refuse   a non-default value is an error at the recipe's line, naming the field
--   needs    the field it depends on is refused, by the schema or at run time (pretrain)
--   into     validate resolves it into a field that is read
--   inert    it carries the reason it changes nothing, for `--help` to show
local schema = require "luatron.config.schema"
local config = require "luatron.config"
local pretrain = require "luatron.pretrain"

-- The engine's sources without comments: the Lua library outside luatron.config, and the bindings.
local function engine_sources()
  local texts = {}
  local p = assert(io.popen("find lua/luatron engine/lua -name '*.lua' -o -name '*.c' | sort"))
  for path in p:lines() do
    if not path:match("^lua/luatron/config") then
      local f = assert(io.open(path))
      local text = f:read("a")
      f:close()
      if path:match("%.lua$") then
        text = text:gsub("%-%-%[(=*)%[.-%]%1%]", ""):gsub("%-%-[^\n]*", "")
      else
        text = text:gsub("/%*.-%*/", ""):gsub("//[^\n]*", "")
      end
      texts[#texts + 1] = text
    end
  end
  p:close()
  assert(#texts > 10, "found too few sources: is the spec running from the repository root?")
  return table.concat(texts, "\n")
end
local SOURCES = engine_sources()

local function is_read(name)
  return SOURCES:find("%." .. name .. "%f[^%w_]") ~= nil or SOURCES:find('"' .. name .. '"', 1, true) ~= nil
end

-- "field" or "group.field" of class `cname` -> class name, spec
local function resolve(cname, ref)
  local group, field = ref:match("^([%w_]+)%.([%w_]+)$")
  if not group then return cname, schema.classes[cname].index[ref] end
  for _, g in ipairs(schema.GROUPS) do
    if g[1] == group then return g[2], schema.classes[g[2]].index[field] end
  end
end

-- A value of the field's kind other than its default.
local function other_value(spec)
  local kind, d = spec.kind, spec.default
  if type(kind) == "table" then
    for _, e in ipairs(kind.enum) do if e ~= d then return e end end
  elseif kind == "bool" then
    return not d
  elseif kind == "path" or kind == "string" then
    return "elsewhere"
  elseif kind:match("int$") or kind == "most_recent_k" then
    return d == nil and 2 or d + 1
  end
  return d == nil and 0.5 or d * 0.5
end

local function refused_at_run_time(cname, spec)
  if cname ~= "GPTModelProvider" then return false end
  local m = config.GPTModelProvider { num_layers = 2, hidden_size = 8, num_attention_heads = 2 }
  m[spec.name] = other_value(spec)
  return not pcall(pretrain.check_supported, m)
end

local function refused(cname, spec)
  return spec.refuse ~= nil or refused_at_run_time(cname, spec)
end

for _, cname in ipairs(schema.order) do
  describe(cname, function()
    for _, spec in ipairs(schema.classes[cname].fields) do
      local name = spec.name
      if type(spec.kind) == "string" and spec.kind:match("^group:") then
        -- a group of a ConfigContainer: its fields are walked on their own
      elseif spec.refuse then
        it(name .. " is refused unless left at its default", function()
          local v = other_value(spec)
          local ok, e = pcall(config[cname], { [name] = v })
          assert.is_false(ok, ("%s.%s = %s was accepted"):format(cname, name, tostring(v)))
          assert.truthy(tostring(e):find(cname .. "." .. name .. " = ", 1, true), e)
          assert.truthy(tostring(e):find("is not supported: " .. spec.refuse, 1, true), e)
          if spec.default ~= nil then assert.is_truthy(config[cname] { [name] = spec.default }) end
        end)
      elseif spec.needs then
        it(name .. " only acts with " .. spec.needs .. ", which is refused", function()
          local tc, target = resolve(cname, spec.needs)
          assert.is_truthy(target, "no field " .. spec.needs)
          assert.is_true(refused(tc, target), spec.needs .. " is not refused, so " .. name .. " must be read")
        end)
      elseif spec.into then
        it(name .. " is resolved into " .. spec.into .. ", which is read", function()
          local _, target = resolve(cname, spec.into)
          assert.is_truthy(target, "no field " .. spec.into)
          assert.is_true(is_read(target.name), spec.into .. " is not read by the engine")
        end)
      elseif spec.inert then
        it(name .. " says why it changes nothing", function()
          assert.is_true(#spec.inert > 20, spec.inert)
        end)
      elseif type(spec.kind) == "table" and #spec.kind.enum == 1 then
        it(name .. " accepts its one value only", function()
          assert.is_false(pcall(config[cname], { [name] = "something_else" }))
        end)
      else
        it(name .. " is read by the engine", function()
          assert.is_true(is_read(name), ("%s.%s is accepted but nothing outside luatron.config reads it: build it, "
            .. "or mark it refuse/needs/into/inert in luatron/config/schema.lua"):format(cname, name))
        end)
      end
    end
  end)
end

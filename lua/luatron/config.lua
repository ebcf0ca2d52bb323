-- luatron.config: Megatron Bridge style configuration objects for recipes.
--
--   local config = require "luatron.config"
--   local cfg = config.ConfigContainer{
--     model = config.GPTModelProvider{ num_layers = 4, hidden_size = 64, num_attention_heads = 4 },
--     train = { micro_batch_size = 2, global_batch_size = 8, train_iters = 100 },
--     optimizer = { lr = 3e-4 },
--   }
--   local r = cfg:validate{ world_size = 4 }   -- or config.validate(cfg, 4)
--   print(r.data_parallel_size, r.num_microbatches, r.padded_vocab_size, r.model.ffn_hidden_size)
--
-- Every class (GPTModelProvider, TrainingConfig, OptimizerConfig, SchedulerConfig,
-- DistributedDataParallelConfig, GPTDatasetConfig, LoggerConfig, TokenizerConfig, CheckpointConfig,
-- RNGConfig, ConfigContainer) is called with a table of fields. Missing fields take Megatron's
-- defaults, each given field is type/range checked, unknown fields are errors with a "did you
-- mean" suggestion, and every error is raised at the line of the recipe that made the call.
-- Objects keep checking on assignment (obj.hidden_size = -1 is an error at that line).
-- Cross-field rules (parallel sizes, batch sizes, vocab padding, ...) run in validate, which
-- returns the resolved config and the derived values; it never modifies the objects.
local util = require "luatron.config.util"
local schema = require "luatron.config.schema"
local validate_mod = require "luatron.config.validate"
util.register_source()

local config = {}

local VALS = setmetatable({}, { __mode = "k" }) -- object -> its field values
local CLASSES = {}                               -- class name -> class object
local METATABLES = {}                            -- class name -> object metatable

config.BYTE_LEVEL_VOCAB_SIZE = schema.BYTE_LEVEL_VOCAB_SIZE
config.suggest = util.suggest
config.edit_distance = util.edit_distance

local function class_name_of(v)
  if type(v) ~= "table" then return nil end
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__luatron_class") or nil
end

--- The class name of a config object, or nil for anything else.
function config.class_of(v) return class_name_of(v) end

--- True when v is a config object (of class `name`, when given).
function config.is_config(v, name)
  local c = class_name_of(v)
  if c == nil then return false end
  return name == nil or c == name
end

local function is_plain_table(v)
  if type(v) ~= "table" then return false end
  local mt = getmetatable(v)
  return mt == nil or (type(mt) == "table" and type(rawget(mt, "__name")) == "string"
    and rawget(mt, "__name"):sub(1, 5) == "json.")
end

local function deep_equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not deep_equal(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

------------------------------------------------------------------------------------------------
-- Field access
------------------------------------------------------------------------------------------------

local function unknown_field_message(def, k)
  if type(k) ~= "string" then
    return string.format("%s: fields are given by name; got a value at key %s", def.name, util.fmt(k))
  end
  local why = def.unsupported[k]
  if why then
    return string.format("%s: field '%s' is a Megatron option that luatron does not support: %s", def.name, k, why)
  end
  local candidates = {}
  for _, n in ipairs(def.names) do candidates[#candidates + 1] = n end
  for a in pairs(def.aliases) do candidates[#candidates + 1] = a end
  table.sort(candidates)
  return string.format("%s: unknown field '%s'%s", def.name, k, util.did_you_mean(k, candidates))
end

local build -- forward

-- Check (and normalize) the value for one field; group fields of a ConfigContainer accept an
-- object of the right class or a plain table of its fields.
local function check_value(def, spec, v)
  if v == nil and spec.nullable then return nil end
  if type(spec.kind) == "string" and spec.kind:sub(1, 6) == "group:" then
    local cname = spec.kind:sub(7)
    if v == nil then
      util.fail("%s.%s is required: give a %s or a table of its fields", def.name, spec.name, cname)
    end
    if class_name_of(v) == cname then return v end
    if is_plain_table(v) then
      return util.with_prefix(def.name .. "." .. spec.name .. ": ", build, schema.classes[cname], v)
    end
    util.fail("%s.%s = %s: must be %s %s or a table of its fields", def.name, spec.name, util.fmt(v),
      cname:match("^[AEIOU]") and "an" or "a", cname)
  end
  return schema.check_field(def.name, spec, v)
end

-- activation_func accepts "swiglu"/"geglu" as shorthands that also set gated_linear_unit.
local function set_activation(def, vals, v, explicit_glu)
  local alias = type(v) == "string" and schema.ACTIVATION_ALIASES[v:lower()]
  if alias then
    if explicit_glu == false then
      util.fail("%s.activation_func = %s implies gated_linear_unit = true, but gated_linear_unit = false was given; "
        .. "drop one of them", def.name, util.fmt(v))
    end
    vals.activation_func = alias[1]
    vals.gated_linear_unit = true
  else
    vals.activation_func = check_value(def, def.index.activation_func, v)
  end
end

local function read_field(def, vals, k)
  if def.index[k] then return vals[k], true end
  local target = def.aliases[k]
  if target then
    if k == "activation" then
      if vals.gated_linear_unit then
        if vals.activation_func == "silu" then return "swiglu", true end
        if vals.activation_func == "gelu" then return "geglu", true end
      end
    end
    return vals[target], true
  end
  return nil, false
end

local function write_field(def, vals, k, v)
  if type(v) == "table" and v == (package.loaded["luatron.json"] or {}).null then v = nil end
  local target = def.aliases[k]
  if target then k = target end
  local spec = def.index[k]
  if not spec then util.fail(unknown_field_message(def, k)) end
  if k == "activation_func" then
    if v == nil then util.fail("%s.activation_func = nil: must be set", def.name) end
    set_activation(def, vals, v, nil)
    return
  end
  vals[k] = check_value(def, spec, v)
end

------------------------------------------------------------------------------------------------
-- Objects
------------------------------------------------------------------------------------------------

local methods = {}      -- shared by every object
local class_methods = {} -- class name -> extra methods

local function get_methods(def, k)
  local cm = class_methods[def.name]
  return (cm and cm[k]) or methods[k]
end

local function format_inline(def, vals)
  local parts = {}
  for _, spec in ipairs(def.fields) do
    local v = vals[spec.name]
    if class_name_of(v) then
      parts[#parts + 1] = spec.name .. "=" .. tostring(v)
    elseif v ~= nil and not deep_equal(v, spec.default) then
      parts[#parts + 1] = spec.name .. "=" .. util.fmt(v)
    end
  end
  return def.name .. "{" .. table.concat(parts, ", ") .. "}"
end

local function make_metatable(def)
  local mt = {
    __luatron_class = def.name,
    __name = def.name,
  }
  mt.__index = function(obj, k)
    local vals = VALS[obj]
    local v, found = read_field(def, vals, k)
    if found then return v end
    local m = get_methods(def, k)
    if m then return m end
    error(unknown_field_message(def, k), 2)
  end
  mt.__newindex = function(obj, k, v)
    local ok, e = pcall(write_field, def, VALS[obj], k, v)
    if not ok then util.raise(e) end
  end
  mt.__tostring = function(obj) return format_inline(def, VALS[obj]) end
  mt.__pairs = function(obj)
    local vals = VALS[obj]
    local i = 0
    return function()
      while true do
        i = i + 1
        local spec = def.fields[i]
        if not spec then return nil end
        local v = vals[spec.name]
        if v ~= nil then return spec.name, v end
      end
    end, obj, nil
  end
  mt.__eq = function(a, b)
    return class_name_of(a) == class_name_of(b) and deep_equal(config.to_table(a), config.to_table(b))
  end
  return mt
end

-- Build an object of class `def` from the plain table t. Raises config errors (tables).
build = function(def, t)
  if t == nil then t = {} end
  if class_name_of(t) == def.name then t = config.to_table(t) end
  if not is_plain_table(t) then
    util.fail("%s: expected a table of fields, got %s", def.name, class_name_of(t) or util.fmt(t))
  end
  -- unknown fields first, all of them, sorted
  local bad = {}
  for k in pairs(t) do
    if not def.index[k] and not def.aliases[k] then bad[#bad + 1] = k end
  end
  if #bad > 0 then
    table.sort(bad, function(a, b)
      if type(a) ~= type(b) then return type(a) == "number" end
      return a < b
    end)
    local msgs = {}
    for i, k in ipairs(bad) do
      local m = unknown_field_message(def, k)
      msgs[i] = i == 1 and m or m:sub(#def.name + 3)
    end
    util.fail(table.concat(msgs, "; "))
  end
  local jnull = (package.loaded["luatron.json"] or {}).null
  local given = {}
  for k, v in pairs(t) do
    if jnull ~= nil and v == jnull then v = nil end
    local target = def.aliases[k]
    if target then
      if t[target] ~= nil and t[target] ~= jnull and not deep_equal(t[target], v) then
        util.fail("%s: both '%s' and its alias '%s' are given (%s and %s); give only %s",
          def.name, target, k, util.fmt(t[target]), util.fmt(v), target)
      end
      k = target
    end
    given[k] = v
  end
  local vals = {}
  for _, spec in ipairs(def.fields) do
    local v = given[spec.name]
    if v == nil then
      if vals[spec.name] ~= nil then
        -- already set by an earlier field (activation_func = "swiglu" sets gated_linear_unit)
      elseif spec.kind == "group:GPTModelProvider" or spec.kind == "group:TrainingConfig" then
        vals[spec.name] = check_value(def, spec, nil) -- required: raises
      elseif type(spec.kind) == "string" and spec.kind:sub(1, 6) == "group:" then
        vals[spec.name] = build(schema.classes[spec.kind:sub(7)], {})
      else
        vals[spec.name] = util.copy(spec.default)
      end
    elseif spec.name == "activation_func" then
      set_activation(def, vals, v, given.gated_linear_unit)
    else
      vals[spec.name] = check_value(def, spec, v)
    end
  end
  local obj = setmetatable({}, METATABLES[def.name])
  VALS[obj] = vals
  return obj
end

local Class = {}
Class.__index = Class
Class.__call = function(cls, t)
  local ok, res = pcall(build, cls.def, t)
  if not ok then util.raise(res) end
  return res
end
Class.__tostring = function(cls) return "config class " .. cls.name end

for _, name in ipairs(schema.order) do
  local def = schema.classes[name]
  METATABLES[name] = make_metatable(def)
  local cls = setmetatable({
    name = name,
    def = def,
    fields = def.names,
  }, Class)
  CLASSES[name] = cls
  config[name] = cls
end
config.classes = CLASSES

--- Field names of a class, in declaration order.
function config.fields(class_name)
  local def = schema.classes[class_name]
  if not def then error("config.fields: unknown class " .. util.fmt(class_name), 2) end
  local out = {}
  for i, n in ipairs(def.names) do out[i] = n end
  return out
end

--- Default value of one field (nil when the field defaults to "not set").
function config.default(class_name, field)
  local def = schema.classes[class_name]
  if not def then error("config.default: unknown class " .. util.fmt(class_name), 2) end
  local spec = def.index[field]
  if not spec then error(unknown_field_message(def, field), 2) end
  return util.copy(spec.default)
end

------------------------------------------------------------------------------------------------
-- Serialisation and display
------------------------------------------------------------------------------------------------

--- Plain nested tables holding only the fields (nil fields are left out), ready for json.encode.
function config.to_table(obj)
  local cname = class_name_of(obj)
  if not cname then error("config.to_table: expected a config object, got " .. util.fmt(obj), 2) end
  local def = schema.classes[cname]
  local vals = VALS[obj]
  local out = {}
  for _, spec in ipairs(def.fields) do
    local v = vals[spec.name]
    if class_name_of(v) then
      out[spec.name] = config.to_table(v)
    elseif v ~= nil then
      out[spec.name] = util.copy(v)
    end
  end
  return out
end

local function strip(v, jnull)
  if v == jnull then return nil end
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = strip(x, jnull) end
  return t
end

--- Rebuild a config object from config.to_table's output (or decoded JSON). Builds a
--- ConfigContainer unless class_name names another class. JSON nulls count as "not set".
function config.from_table(t, class_name)
  class_name = class_name or "ConfigContainer"
  local def = schema.classes[class_name]
  if not def then error("config.from_table: unknown class " .. util.fmt(class_name), 2) end
  local jnull = (package.loaded["luatron.json"] or {}).null
  local ok, res = pcall(build, def, strip(t, jnull))
  if not ok then util.raise(res) end
  return res
end

local function describe_lines(obj, opts, indent, out)
  local cname = class_name_of(obj)
  local def = schema.classes[cname]
  local vals = VALS[obj]
  local width = 0
  for _, spec in ipairs(def.fields) do
    if #spec.name > width then width = #spec.name end
  end
  for _, spec in ipairs(def.fields) do
    local v = vals[spec.name]
    if class_name_of(v) then
      out[#out + 1] = indent .. spec.name .. ": " .. class_name_of(v)
      describe_lines(v, opts, indent .. "  ", out)
    else
      local changed = not deep_equal(v, spec.default)
      if changed or not opts.changed_only then
        local shown = v == nil and "nil" or util.fmt(v)
        out[#out + 1] = string.format("%s%s %s %s%s", indent, spec.name,
          string.rep(".", width + 2 - #spec.name), shown,
          (changed and opts.mark_changed ~= false) and "  *" or "")
      end
    end
  end
end

--- Multi-line text of an object for logs, in Megatron's "name ..... value" style.
--- opts.changed_only: only fields that differ from the defaults; changed fields end with " *".
function config.describe(obj, opts)
  local cname = class_name_of(obj)
  if not cname then error("config.describe: expected a config object, got " .. util.fmt(obj), 2) end
  opts = opts or {}
  local out = { cname }
  describe_lines(obj, opts, "  ", out)
  return table.concat(out, "\n")
end

------------------------------------------------------------------------------------------------
-- Validation
------------------------------------------------------------------------------------------------

--- Validate a ConfigContainer for `world_size` ranks (a number or { world_size = N }).
--- Returns the resolved config: plain tables per group with every default and derived field
--- filled in (r.model.ffn_hidden_size, r.scheduler.lr_decay_iters, ...), plus the derived values
--- r.data_parallel_size, r.num_microbatches, r.padded_vocab_size, ... (see validate.lua).
--- Raises the first rule that fails, at the caller's line.
function config.validate(container, opts)
  if class_name_of(container) ~= "ConfigContainer" then
    error("config.validate: expected a ConfigContainer, got " .. (class_name_of(container) or util.fmt(container)), 2)
  end
  local ok, res = pcall(validate_mod.validate, container, opts, config.to_table)
  if not ok then util.raise(res) end
  return res
end

--- Megatron's _vocab_size_with_padding: the smallest multiple of
--- make_vocab_size_divisible_by * tensor_model_parallel_size that holds vocab_size.
function config.padded_vocab_size(vocab_size, divisible_by, tp)
  local ok, res = pcall(validate_mod.padded_vocab_size, vocab_size, divisible_by or 128, tp or 1)
  if not ok then util.raise(res) end
  return res
end

--- Megatron-LM --data-path parsing: returns { prefixes = {...}, weights = {...} or nil }.
function config.parse_data_path(list)
  local ok, res = pcall(function()
    local v = schema.check_field("GPTDatasetConfig", schema.classes.GPTDatasetConfig.index.data_path, list)
    return validate_mod.parse_blend(v)
  end)
  if not ok then util.raise(res) end
  return res
end

--- Megatron's parse_and_normalize_split: "969,30,1" -> {0.969, 0.03, 0.001}.
function config.parse_split(s)
  local ok, res = pcall(function()
    local v = schema.check_field("GPTDatasetConfig", schema.classes.GPTDatasetConfig.index.split, s)
    return validate_mod.parse_split(v)
  end)
  if not ok then util.raise(res) end
  return res
end

-- Megatron Bridge's MoE helpers on a GPTModelProvider (luatron.config.moe).
local moe = require "luatron.config.moe"
config.apply_moe_token_drop = moe.apply_moe_token_drop
config.apply_flex_dispatcher_backend = moe.apply_flex_dispatcher_backend
config.apply_deepep = moe.apply_deepep

------------------------------------------------------------------------------------------------
-- Methods on objects
------------------------------------------------------------------------------------------------

function methods.to_table(self) return config.to_table(self) end

function methods.describe(self, opts) return config.describe(self, opts) end

--- A new object of the same class with `overrides` applied (checked like the constructor).
--- Group objects inside a ConfigContainer are copied too.
function methods.copy(self, overrides)
  local cname = class_name_of(self)
  local t = config.to_table(self)
  for k, v in pairs(overrides or {}) do
    local def = schema.classes[cname]
    local target = def.aliases[k]
    if target then t[target] = nil end
    t[k] = class_name_of(v) and config.to_table(v) or v
  end
  local ok, res = pcall(build, schema.classes[cname], t)
  if not ok then util.raise(res) end
  return res
end

class_methods.ConfigContainer = {
  validate = function(self, opts)
    local ok, res = pcall(validate_mod.validate, self, opts, config.to_table)
    if not ok then util.raise(res) end
    return res
  end,
}

return config

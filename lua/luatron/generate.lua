-- `luatron generate`: text from a saved run, with its own model and tokenizer, so a user sees what the
-- model learned. The checkpoint's config.json gives the model (built on one rank, whatever layout
-- trained it: checkpoints are layout-free) and the tokenizer; the prompt is encoded, continued by
-- model:generate (a key/value cache: the prompt once, then one forward per new token) and decoded.
local checkpoint = require "luatron.checkpoint"
local fs = require "luatron.fs"
local json = require "luatron.json"
local tokenizer = require "luatron.tokenizer"

local M = {}

M.USAGE = [[
usage: luatron generate --load DIR --prompt TEXT [options]

Continues TEXT with the model saved in DIR (a checkpoint.save folder), using the run's tokenizer.

  --load DIR            the run's checkpoint folder (required)
  --prompt TEXT         the text to continue (required)
  --ckpt-step N         the iteration to load (default: the latest)
  --max-new-tokens N    tokens to add (default 32); the prompt and these must fit seq_length
  --temperature T       0: greedy (the most likely token each time); default 1
  --top-k K             sample from the K most likely tokens (0: all; default 0)
  --top-p P             sample from the most likely tokens holding P of the probability (0: off)
  --seed S              the sampling seed (default 0): the same seed gives the same text
  --device D            cpu or cuda (default: the run's)

Generation stops early at the tokenizer's end-of-document token.
example: luatron generate --load runs/tiny --prompt "Once upon a time" --temperature 0.8 --top-k 40
]]

local FLAGS = {
  ["--load"] = { "load", "path" }, ["--prompt"] = { "prompt", "text" }, ["--ckpt-step"] = { "ckpt_step", "integer" },
  ["--max-new-tokens"] = { "max_new_tokens", "integer" }, ["--temperature"] = { "temperature", "number" },
  ["--top-k"] = { "top_k", "integer" }, ["--top-p"] = { "top_p", "number" }, ["--seed"] = { "seed", "integer" },
  ["--device"] = { "device", "text" },
}

-- The options from the command line; errors say what is wrong.
function M.parse(args)
  local opts = { max_new_tokens = 32, temperature = 1, top_k = 0, top_p = 0, seed = 0 }
  local i = 1
  while i <= #args do
    local flag, value = args[i], args[i + 1]
    local spec = FLAGS[flag]
    if not spec then error(("unknown option '%s' (luatron generate --help)"):format(flag), 0) end
    if value == nil then error(("%s needs a value"):format(flag), 0) end
    if spec[2] == "integer" or spec[2] == "number" then
      local n = tonumber(value)
      if not n or (spec[2] == "integer" and math.type(n) ~= "integer") then
        error(("%s takes %s %s, not '%s'"):format(flag, spec[2] == "integer" and "an" or "a", spec[2], value), 0)
      end
      value = n
    end
    opts[spec[1]] = value
    i = i + 2
  end
  for _, need in ipairs { "load", "prompt" } do
    if not opts[need] then error(("--%s is required (luatron generate --help)"):format(need), 0) end
  end
  return opts
end

-- The saved run's model on one rank with its weights, and its tokenizer (a relative tokenizer file that
-- is not there from here is looked for in the run's folder, where luatron convert puts one).
function M.open(root, step, device)
  local model, _, cfg, dir = checkpoint.open_model(root, step, device)
  if type(cfg.tokenizer) ~= "table" then
    error(("%s/config.json names no tokenizer (a converted Hugging Face folder without a tokenizer.json luatron "
      .. "reads): generate needs one for the prompt"):format(dir), 0)
  end
  local tok = {}
  for k, v in pairs(cfg.tokenizer) do if v ~= json.null then tok[k] = v end end
  for _, f in ipairs { "vocab_file", "merge_file", "tokenizer_model" } do
    local path = tok[f]
    if type(path) == "string" and path:sub(1, 1) ~= "/" and not fs.exists(path) and fs.exists(root .. "/" .. path) then
      tok[f] = root .. "/" .. path
    end
  end
  return model, tokenizer.build(tok)
end

function M.main(...)
  local args = { ... } -- (--help: luatron prints M.USAGE without calling main)
  local opts = M.parse(args)
  local model, tok = M.open(opts.load, opts.ckpt_step, opts.device)
  local ids = tok:encode(opts.prompt)
  -- ids both know: a padded vocabulary's extra rows, or a tokenizer's beyond the model's (the mock
  -- dataset's models), are never drawn
  local vocab = math.min(tok.vocab_size, model:param("embedding.word_embeddings.weight"):shape()[1])
  local out = model:generate(ids, { max_new_tokens = opts.max_new_tokens, temperature = opts.temperature,
    top_k = opts.top_k, top_p = opts.top_p, seed = opts.seed, eod = tok.eod, vocab = vocab })
  if out[#out] == tok.eod then out[#out] = nil end
  io.write(opts.prompt, tok:decode(out), "\n")
  return 0
end

return M

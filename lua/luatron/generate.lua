-- `luatron generate`: text from a saved run, with its own model and tokenizer, so a user sees what the
-- model learned. The checkpoint's config.json gives the model (built on one rank, whatever layout
-- trained it: checkpoints are layout-free) and the tokenizer; the prompt is encoded, continued by
-- model:generate (a key/value cache: the prompt once, then one forward per new token) and decoded.
local lt = require "luatron"
local checkpoint = require "luatron.checkpoint"
local fs = require "luatron.fs"
local json = require "luatron.json"
local model_lib = require "luatron.model"
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

-- The saved run's model on one rank (every parallel size 1) with its weights, and its tokenizer.
function M.open(root, step, device)
  local iteration = step or checkpoint.latest_iteration(root)
  if not iteration then error(("%s holds no checkpoint (no latest_checkpointed_iteration.txt)"):format(root), 0) end
  local dir = ("%s/iter_%07d"):format(root, iteration)
  local text = fs.read(dir .. "/config.json")
  if not text then error(("%s has no config.json"):format(dir), 0) end
  local ok, cfg = pcall(json.decode, text)
  if not ok then error(("%s/config.json is corrupt: %s"):format(dir, cfg), 0) end
  local fields = cfg.model
  for _, k in ipairs { "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size" } do
    fields[k] = 1
  end
  fields.virtual_pipeline_model_parallel_size, fields.expert_tensor_parallel_size = nil, nil
  fields.sequence_parallel = false
  if device then fields.device = device end
  local model = model_lib.build(lt.GPTModelProvider(fields), cfg.rng and cfg.rng.seed or 1234)
  checkpoint.load(root, model, nil, { iteration = iteration, load_optim = false })
  return model, tokenizer.build(cfg.tokenizer or {}), iteration
end

function M.main(...)
  local args = { ... }
  for _, a in ipairs(args) do
    if a == "--help" or a == "-h" then
      io.write(M.USAGE)
      return 0
    end
  end
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

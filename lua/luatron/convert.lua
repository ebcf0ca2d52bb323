-- `luatron convert`: Hugging Face model folders to luatron checkpoints and back (luatron.bridge).
local checkpoint = require "luatron.checkpoint"
local config = require "luatron.config"
local fs = require "luatron.fs"
local json = require "luatron.json"
local model_lib = require "luatron.model"
local bridge_lib = require "luatron.bridge"
local tokenizer = require "luatron.tokenizer"

local AutoBridge = bridge_lib.AutoBridge

local M = {}

M.USAGE = [[
usage: luatron convert --from-hf DIR --to CKPT [--seq-length N] [--seed S]
       luatron convert --from CKPT [--ckpt-step N] --to-hf DIR [--architecture A]

Converts between Hugging Face model folders and luatron checkpoints, on one rank (the whole model in
memory; a checkpoint then resumes at any parallel layout).

  --from-hf DIR       a Hugging Face folder: config.json and model.safetensors (or the shards that
                      model.safetensors.index.json lists); GPT2LMHeadModel, LlamaForCausalLM,
                      MistralForCausalLM or Qwen2ForCausalLM, float32 or bfloat16 tensors
  --to CKPT           the checkpoint folder to write (iteration 0: CKPT/iter_0000000, the model only;
                      load it with checkpoint.pretrained_checkpoint or checkpoint.load + finetune)
  --seq-length N      the sequence length of the model (default: the config's max_position_embeddings,
                      GPT-2's n_positions, which learned positions cannot change)
  --seed S            the seed recorded with the checkpoint (rng.seed; default 1234)
  --from CKPT         a luatron checkpoint folder (checkpoint.save of a run, or --to of a conversion)
  --ckpt-step N       the iteration to convert (default: the latest)
  --to-hf DIR         the Hugging Face folder to write: config.json and model.safetensors (float32)
  --architecture A    GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM
                      (default: GPT-2 for learned positions, Llama for RoPE, Qwen2 with add_qkv_bias)

examples:
  luatron convert --from-hf hf/gpt2 --to runs/gpt2
  luatron convert --from runs/gpt2 --to-hf hf/gpt2-tuned
]]

local FLAGS = {
  ["--from-hf"] = { "from_hf", "path" }, ["--to"] = { "to", "path" }, ["--from"] = { "from", "path" },
  ["--to-hf"] = { "to_hf", "path" }, ["--ckpt-step"] = { "ckpt_step", "integer" },
  ["--seq-length"] = { "seq_length", "integer" }, ["--seed"] = { "seed", "integer" },
  ["--architecture"] = { "architecture", "text" },
}

-- The options from the command line; errors say what is wrong.
function M.parse(args)
  local opts, i = {}, 1
  while i <= #args do
    local flag, value = args[i], args[i + 1]
    local spec = FLAGS[flag]
    if not spec then error(("unknown option '%s' (luatron convert --help)"):format(flag), 0) end
    if value == nil then error(("%s needs a value"):format(flag), 0) end
    if spec[2] == "integer" then
      local n = tonumber(value)
      if math.type(n) ~= "integer" or n < 0 then error(("%s takes a whole number, not '%s'"):format(flag, value), 0) end
      value = n
    end
    opts[spec[1]] = value
    i = i + 2
  end
  local hf_in, ck_in = opts.from_hf ~= nil, opts.from ~= nil
  if hf_in == ck_in then
    error("give either --from-hf DIR --to CKPT or --from CKPT --to-hf DIR (luatron convert --help)", 0)
  end
  if hf_in then
    if not opts.to then error("--from-hf needs --to CKPT, the checkpoint folder to write", 0) end
    for _, k in ipairs { "to_hf", "ckpt_step", "architecture" } do
      if opts[k] then error(("--%s goes with --from CKPT, not --from-hf"):format(k:gsub("_", "-")), 0) end
    end
  else
    if not opts.to_hf then error("--from needs --to-hf DIR, the Hugging Face folder to write", 0) end
    for _, k in ipairs { "to", "seq_length", "seed" } do
      if opts[k] then error(("--%s goes with --from-hf DIR, not --from"):format(k:gsub("_", "-")), 0) end
    end
  end
  return opts
end

local function count(model)
  local n = 0
  for _, p in ipairs(model:parameters()) do n = n + p.numel end
  return n
end

-- Hugging Face folder -> luatron checkpoint (iteration 0, the model only). Returns the folder written.
function M.from_hf(dir, root, opts)
  opts = opts or {}
  local seed = opts.seed or 1234
  local bridge = AutoBridge.from_hf_pretrained(dir)
  local provider = bridge:to_megatron_provider(opts.seq_length and { seq_length = opts.seq_length } or nil)
  local model = model_lib.build(provider, seed)
  bridge:load_hf_weights(model)
  local state = { iteration = 0, consumed_samples = 0, optimizer_steps = 0, seed = seed }
  local run = { model = config.to_table(provider), rng = { seed = seed } }
  local note = M.take_tokenizer(dir, root, run)
  local written = checkpoint.save(root, model, nil, state, run)
  return written, bridge, count(model), note
end

-- The folder's tokenizer.json (and tokenizer_config.json, its eos token) copied into the checkpoint's
-- folder and named in run.tokenizer, when luatron reads it (HuggingFaceTokenizer: the byte-level BPE
-- kind); else a note saying why the checkpoint has none.
function M.take_tokenizer(dir, root, run)
  if not fs.exists(dir .. "/tokenizer.json") then return "no tokenizer.json: the checkpoint names no tokenizer" end
  local ok, tok = pcall(tokenizer.build, { tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir })
  if not ok then return "tokenizer.json not taken (" .. tostring(tok) .. ")" end
  local note = ("tokenizer.json taken (%d tokens, end of document %d)"):format(tok.vocab_size, tok.eod)
  tok:close()
  fs.mkdir_p(root .. "/tokenizer")
  for _, f in ipairs { "tokenizer.json", "tokenizer_config.json" } do
    local text = fs.read(dir .. "/" .. f)
    if text then
      local out = assert(io.open(root .. "/tokenizer/" .. f, "wb"))
      out:write(text)
      out:close()
    end
  end
  -- relative to the checkpoint's folder (luatron generate looks there), so the folder can move
  run.tokenizer = { tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = "tokenizer" }
  return note
end

-- luatron checkpoint -> Hugging Face folder. Returns the bridge used.
function M.to_hf(root, dir, opts)
  opts = opts or {}
  local model, provider, _, ck = checkpoint.open_model(root, opts.ckpt_step, "cpu")
  local bridge = AutoBridge.from_megatron_provider(provider, opts.architecture)
  bridge:save_hf_pretrained(model, dir)
  return bridge, ck, count(model)
end

function M.main(...)
  local args = { ... } -- (--help: luatron prints M.USAGE without calling main)
  if #args == 0 then
    io.stderr:write(M.USAGE)
    return 2
  end
  local opts = M.parse(args)
  if opts.from_hf then
    local written, bridge, n, note = M.from_hf(opts.from_hf, opts.to, opts)
    print(("converted %s (%s, %d parameters) to %s; %s"):format(opts.from_hf, bridge.architecture, n, written, note))
  else
    local bridge, ck, n = M.to_hf(opts.from, opts.to_hf, opts)
    print(("converted %s (%d parameters) to %s (%s)"):format(ck, n, opts.to_hf, bridge.architecture))
  end
  return 0
end

return M

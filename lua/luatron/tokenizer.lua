-- luatron.tokenizer: the tokenizer a TokenizerConfig names, built in C (engine/data/tokenizer.h).
--   local tokenizer = require "luatron.tokenizer"
--   local tok = tokenizer.build { tokenizer_type = "GPT2BPETokenizer", vocab_file = "gpt2/encoder.json",
--                                 merge_file = "gpt2/vocab.bpe" }
--   tok:encode("Hello world") -> { 15496, 995 }     tok:decode({ 15496, 995 }) -> "Hello world"
--   tok.vocab_size, tok.eod, tok.type
-- Types: ByteLevel (the default), GPT2BPETokenizer (vocab_file, merge_file), HuggingFaceTokenizer
-- (tokenizer_model: a tokenizer.json of the byte-level BPE kind, or its folder), SentencePieceTokenizer,
-- GPTSentencePieceTokenizer and Llama2Tokenizer (tokenizer_model: a SentencePiece .model file, with
-- Megatron's special tokens and encoding rules). NullTokenizer has no text form (its data is already
-- ids), so it cannot be built here.
local core = require "luatron.core"

local M = {}

local FILES = {
  ByteLevel = {},
  GPT2BPETokenizer = { "vocab_file", "merge_file" },
  HuggingFaceTokenizer = { "tokenizer_model" },
  SentencePieceTokenizer = { "tokenizer_model" },
  GPTSentencePieceTokenizer = { "tokenizer_model" },
  Llama2Tokenizer = { "tokenizer_model" },
}

-- cfg: a TokenizerConfig or a plain table with its fields. Errors name the file and what is wrong.
function M.build(cfg)
  if type(cfg) ~= "table" then error("tokenizer.build: expected a TokenizerConfig table, got " .. type(cfg), 2) end
  local kind = cfg.tokenizer_type or "ByteLevel"
  local files = FILES[kind]
  if not files then
    local why = kind == "NullTokenizer" and "NullTokenizer reads ids tokenized elsewhere and has no text form"
      or ("unknown tokenizer_type '%s'"):format(tostring(kind))
    error(("tokenizer: %s; luatron can build ByteLevel, GPT2BPETokenizer, HuggingFaceTokenizer, "
      .. "SentencePieceTokenizer, GPTSentencePieceTokenizer and Llama2Tokenizer"):format(why), 2)
  end
  for _, f in ipairs(files) do
    if cfg[f] == nil then
      local what = (kind:find("SentencePiece", 1, true) or kind == "Llama2Tokenizer") and " (a SentencePiece .model file)" or ""
      error(("tokenizer: %s needs %s%s"):format(kind, f, what), 2)
    end
  end
  local ok, tok = pcall(core.tokenizer, { tokenizer_type = kind, vocab_file = cfg.vocab_file,
    merge_file = cfg.merge_file, tokenizer_model = cfg.tokenizer_model })
  if not ok then error((tostring(tok):gsub("^[^:]*%.lua:%d+: ", "")), 2) end
  return tok
end

return M

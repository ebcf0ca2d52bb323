-- Tokenizers (GPT2BPETokenizer, HuggingFaceTokenizer): core.tokenizer, luatron.tokenizer, `luatron
-- preprocess --tokenizer-type ...` and the training config, against an independent reference
-- (tests/lua/tokenizer_reference.py: Python's `re` with Unicode classes from unicodedata, encoder.py's
-- BPE loop) on fixtures it learns from a text (256 byte tokens, 60 merges, <|endoftext|>; the
-- tokenizer.json adds <|sep|>). Nothing is downloaded. Needs python3 and LUATRON (the binary).
-- The SentencePiece types against tests/lua/sentencepiece_reference.py (Megatron's wrapper logic in
-- Python over python3-sentencepiece, on models it trains here).
local core = require "luatron.core"
local config = require "luatron.config"
local json = require "luatron.json"
local tokenizer = require "luatron.tokenizer"

local h = dofile("tests/lua/helpers.lua")
local q, write, luatron, assert_error_contains = h.q, h.write, h.luatron, h.assert_error_contains

local read = h.read

-- A ConfigContainer of a tiny model with tokenizer tok, validated.
local function validate(tok)
  return config.ConfigContainer({
    model = { num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 16 },
    train = { micro_batch_size = 1, global_batch_size = 1, train_iters = 1 },
    optimizer = { lr = 1e-3 },
    tokenizer = tok,
  }):validate({ world_size = 1 })
end

local dir = h.tmpdir()
assert(os.execute("python3 tests/lua/tokenizer_reference.py " .. q(dir)), "the reference script failed")
local want = json.decode(read(dir .. "/expected.json"))
local GPT2 = { tokenizer_type = "GPT2BPETokenizer", vocab_file = dir .. "/encoder.json", merge_file = dir .. "/vocab.bpe" }
local HF = { tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir .. "/tokenizer.json" }

local function list(t) -- a decoded JSON array as a plain list, for are.same
  local r = {}
  for i = 1, #t do r[i] = t[i] end
  return r
end

-- The documents Megatron's preprocess_data.py writes for these token lists: one sequence per non-empty
-- document (first, if given, before its ids; eod after), an empty document only an index entry.
local function expected_docs(ids_lists, eod, first)
  local seqs, docs = {}, { 0 }
  for _, ids in ipairs(ids_lists) do
    if #ids > 0 then
      local s = first and { first } or {}
      for _, id in ipairs(list(ids)) do s[#s + 1] = id end
      if eod then s[#s + 1] = eod end
      seqs[#seqs + 1] = s
    end
    docs[#docs + 1] = #seqs
  end
  return seqs, docs
end


-- The documents of a Megatron indexed dataset (prefix.idx/.bin, MMIDIDX v1) as lists of ids.
local function read_indexed(prefix)
  local idx, bin = read(prefix .. ".idx"), read(prefix .. ".bin")
  assert.are.equal("MMIDIDX\0\0", idx:sub(1, 9))
  local version, dtype, S, D, pos = string.unpack("<I8 B I8 I8", idx, 10)
  assert.are.equal(1, version)
  local size = ({ [8] = 2, [4] = 4 })[dtype]
  local lens, ptrs, docs = {}, {}, {}
  for i = 1, S do lens[i], pos = string.unpack("<i4", idx, pos) end
  for i = 1, S do ptrs[i], pos = string.unpack("<i8", idx, pos) end
  for i = 1, D do docs[i], pos = string.unpack("<i8", idx, pos) end
  local seqs = {}
  for i = 1, S do
    local s = {}
    for k = 1, lens[i] do s[k] = string.unpack(dtype == 8 and "<I2" or "<i4", bin, ptrs[i] + (k - 1) * size + 1) end
    seqs[i] = s
  end
  return { dtype = dtype, seqs = seqs, docs = docs }
end

describe("GPT2BPETokenizer", function()
  local tok = tokenizer.build(GPT2)

  it("has len(encoder) tokens and <|endoftext|> as eod", function()
    assert.are.equal(want.vocab_size, tok.vocab_size)
    assert.are.equal(want.eod, tok.eod)
    assert.are.equal("GPT2BPETokenizer", tok.type)
  end)

  it("encodes as the reference: accents, CJK, emoji, digits, contractions, runs of spaces and newlines", function()
    for i, text in ipairs(want.texts) do
      assert.are.same(list(want.gpt2[i]), tok:encode(text), ("text %d: %q"):format(i, text))
    end
    -- the fixture's merges are in use (fewer tokens than bytes), so a BPE bug would show
    assert.is_true(#tok:encode(want.texts[1]) < #want.texts[1])
  end)

  it("decodes back to the bytes, invalid UTF-8 included", function()
    for _, text in ipairs(want.texts) do assert.are.equal(text, tok:decode(tok:encode(text))) end
    local raw = "bad \xff\xfe utf-8 \xc3 and \xe2\x82 cut"
    assert.are.equal(raw, tok:decode(tok:encode(raw)))
    assert.are.equal("<|endoftext|>", tok:decode({ tok.eod }))
    assert_error_contains(function() tok:decode({ 1, 99999 }) end, "id 99999 (position 2) is not in the vocabulary")
  end)
end)

describe("HuggingFaceTokenizer", function()
  it("encodes tokenizer.json (merges as strings or pairs) as the reference, added tokens first", function()
    for _, model in ipairs({ dir .. "/tokenizer.json", dir .. "/tokenizer_pairs.json" }) do
      local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = model })
      assert.are.equal(want.hf_vocab_size, tok.vocab_size)
      assert.are.equal(want.eod, tok.eod)
      for i, text in ipairs(want.texts) do
        assert.are.same(list(want.hf[i]), tok:encode(text), ("%s, text %d: %q"):format(model, i, text))
        assert.are.equal(text, tok:decode(tok:encode(text)))
      end
    end
    local tok = tokenizer.build(HF)
    local ids = tok:encode("a<|sep|>b")
    assert.are.equal(want.sep, ids[2])
  end)

  it("encodes with Llama-3's and Qwen2's Split pre-tokenizer and ignore_merges as the reference", function()
    for _, kind in ipairs({ "llama3", "qwen2" }) do
      local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer",
        tokenizer_model = ("%s/tokenizer_%s.json"):format(dir, kind) })
      for i, text in ipairs(want.texts) do
        assert.are.same(list(want[kind][i]), tok:encode(text), ("%s, text %d: %q"):format(kind, i, text))
        assert.are.equal(text, tok:decode(tok:encode(text)))
      end
    end
    -- the patterns differ where the reference says they do (digits in threes against one by one)
    assert.are_not.same(list(want.llama3[6]), list(want.qwen2[6]))
    assert.are_not.same(list(want.llama3[18]), list(want.hf[18]))
  end)

  it("takes a folder holding tokenizer.json, with eos_token from its tokenizer_config.json", function()
    local d = h.tmpdir()
    write(d .. "/tokenizer.json", read(dir .. "/tokenizer.json"))
    assert.are.equal(want.eod, tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = d }).eod)
    write(d .. "/tokenizer_config.json", json.encode({ eos_token = { content = "<|sep|>" } }))
    assert.are.equal(want.sep, tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = d }).eod)
  end)

  it("refuses the kinds it does not implement, naming the file and the field", function()
    local t = json.decode(read(dir .. "/tokenizer.json"))
    local function refused(edit, ...)
      local d = h.tmpdir()
      local copy = json.decode(read(dir .. "/tokenizer.json"))
      edit(copy)
      write(d .. "/tokenizer.json", json.encode(copy))
      assert_error_contains(function()
        tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = d .. "/tokenizer.json" })
      end, d .. "/tokenizer.json", ...)
    end
    assert(t.model.type == "BPE")
    refused(function(c) c.model.type = "WordPiece" end, "model type WordPiece is not supported")
    refused(function(c) c.model.type = "Unigram" end, "model type Unigram is not supported")
    refused(function(c) c.normalizer = { type = "NFD" } end, "normalizer {\"type\":\"NFD\"} is not supported",
      "no normalizer, NFC, or a Sequence of NFC")
    refused(function(c) c.normalizer = { type = "NFKC" } end, "normalizer {\"type\":\"NFKC\"} is not supported")
    refused(function(c) c.normalizer = { type = "Sequence", normalizers = { { type = "NFC" }, { type = "Lowercase" } } } end,
      "normalizer.normalizers[1] {\"type\":\"Lowercase\"} is not supported")
    refused(function(c) c.pre_tokenizer = { type = "Whitespace" } end, "pre_tokenizer Whitespace is not supported")
    refused(function(c)
      c.pre_tokenizer = { type = "Sequence", pretokenizers = { { type = "Split", pattern = { Regex = "\\w+" },
        behavior = "Isolated", invert = false }, { type = "ByteLevel", use_regex = false } } }
    end, "pre_tokenizer {\"pretokenizers\":[{\"behavior\":\"Isolated\"", "Split on Llama-3's or Qwen2's pattern")
    refused(function(c) c.decoder = { type = "WordPiece" } end, "decoder WordPiece is not supported")
    refused(function(c) c.post_processor = { type = "BertProcessing", sep = { "<|sep|>", 317 } } end,
      "post_processor BertProcessing is not supported", "ByteLevel, TemplateProcessing, a Sequence of them")
    refused(function(c) c.post_processor = { type = "Sequence", processors = { { type = "ByteLevel" },
      { type = "RobertaProcessing" } } } end, "post_processor.processors[1] RobertaProcessing is not supported")
    -- templates: pair-only, $B in the single one, a type id, ids that are not the vocabulary's
    local sep_tok = { id = "<|sep|>", ids = { want.sep }, tokens = { "<|sep|>" } }
    local function template(single, specials)
      return function(c)
        c.post_processor = { type = "TemplateProcessing", single = single, special_tokens = specials or
          { ["<|sep|>"] = sep_tok } }
      end
    end
    local A, SEPT = { Sequence = { id = "A", type_id = 0 } }, { SpecialToken = { id = "<|sep|>", type_id = 0 } }
    refused(function(c)
      c.post_processor = { type = "TemplateProcessing", pair = { A, { Sequence = { id = "B", type_id = 1 } } },
        special_tokens = {} }
    end, "post_processor (TemplateProcessing) has no \"single\" template", "a pair-only template")
    refused(template({ SEPT, { Sequence = { id = "B", type_id = 0 } } }), "post_processor.single[1] is the sequence $B")
    refused(template({ SEPT, { Sequence = { id = "A", type_id = 1 } } }), "post_processor.single[1]: type_id is not 0")
    refused(template({ SEPT }), "post_processor.single has no {\"Sequence\": {\"id\": \"A\"}}")
    refused(template({ A, { SpecialToken = { id = "<|eos|>", type_id = 0 } } }),
      "post_processor.special_tokens has no \"<|eos|>\"")
    refused(template({ SEPT, A }, { ["<|sep|>"] = { id = "<|sep|>", ids = { want.eod }, tokens = { "<|sep|>" } } }),
      ("post_processor.special_tokens[\"<|sep|>\"]: id %d is \"<|endoftext|>\" in the vocabulary, not \"<|sep|>\""):format(
        want.eod))
    refused(template({ SEPT, A }, { ["<|sep|>"] = { id = "<|sep|>", ids = { 99999 }, tokens = { "<|sep|>" } } }),
      "post_processor.special_tokens[\"<|sep|>\"].ids[0] is not the id of a token in the vocabulary")
    refused(function(c) c.model.byte_fallback = true end, "model.byte_fallback true is not supported")
    refused(function(c) c.added_tokens[2].lstrip = true end, "lstrip = true is not supported")
    refused(function(c) c.model.merges[1] = "zz qq" end, "model.merges[0]", "is not in the vocabulary")
  end)
end)

describe("HuggingFaceTokenizer: Llama-3's template, Qwen2's NFC normalizer", function()
  it("Llama-3: <|begin_of_text|> before every text (empty ones too), as the reference", function()
    local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir .. "/tokenizer_llama3_bos.json" })
    assert.are.equal(want.hf_vocab_size + 1, tok.vocab_size)
    for i, text in ipairs(want.texts) do
      local ids = tok:encode(text)
      assert.are.same(list(want.llama3_bos[i]), ids, ("text %d: %q"):format(i, text))
      -- decode keeps the special tokens' content (transformers' decode, skip_special_tokens = False)
      assert.are.equal("<|begin_of_text|>" .. text, tok:decode(ids))
    end
    assert.are.same({ want.bos }, tok:encode(""))
    assert.are.same({ want.bos, want.bos }, tok:encode("<|begin_of_text|>")) -- the literal text is the token too
    -- the reference's ids are the Split's with the template's before them
    for i = 1, #want.texts do
      local plain = list(want.llama3[i])
      table.insert(plain, 1, want.bos)
      if not want.texts[i]:find("<|begin_of_text|>", 1, true) then assert.are.same(plain, list(want.llama3_bos[i])) end
    end
  end)

  it("templates alone or in a Sequence, tokens after $A and several ids per special token", function()
    local t = json.decode(read(dir .. "/tokenizer_llama3_bos.json"))
    local bos = "<|begin_of_text|>"
    t.post_processor = { type = "TemplateProcessing",
      single = { { SpecialToken = { id = bos, type_id = 0 } }, { Sequence = { id = "A", type_id = 0 } },
        { SpecialToken = { id = "two", type_id = 0 } } },
      special_tokens = { [bos] = { id = bos, ids = { want.bos }, tokens = { bos } },
        two = { id = "two", ids = { want.sep, want.eod }, tokens = { "<|sep|>", "<|endoftext|>" } } } }
    local d = h.tmpdir()
    write(d .. "/tokenizer.json", json.encode(t))
    local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = d })
    for i, text in ipairs(want.texts) do
      local ids = list(want.llama3_bos[i])
      ids[#ids + 1], ids[#ids + 2] = want.sep, want.eod
      assert.are.same(ids, tok:encode(text), ("text %d"):format(i))
    end
    -- a special token may be a model token, named as the vocabulary file spells it ("Ġ" for the space)
    t.post_processor.special_tokens.two = { id = "two", ids = { 32 }, tokens = { "\u{120}" } }
    write(d .. "/tokenizer.json", json.encode(t))
    tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = d })
    assert.are.same({ want.bos, 32 }, tok:encode(""))
  end)

  it("Qwen2 with NFC: encodes as the reference (unicodedata's NFC), decodes to the NFC text", function()
    for _, name in ipairs({ "tokenizer_qwen2_nfc.json", "tokenizer_qwen2_nfc_seq.json" }) do
      local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir .. "/" .. name })
      assert.are.equal(want.hf_vocab_size + 1, tok.vocab_size)
      local changed = 0
      for i, text in ipairs(want.texts) do
        local ids = tok:encode(text)
        assert.are.same(list(want.qwen2_nfc[i]), ids, ("%s, text %d: %q"):format(name, i, text))
        assert.are.equal(want.qwen2_nfc_decoded[i], tok:decode(ids), ("%s, text %d"):format(name, i))
        if table.concat(ids, ",") ~= table.concat(list(want.qwen2[i]), ",") then changed = changed + 1 end
      end
      assert.is_true(changed > 100, "NFC changed the encodings of " .. changed .. " texts")
    end
    -- the normalized added token is matched as its NFC content, the composed and the decomposed spelling
    local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir .. "/tokenizer_qwen2_nfc.json" })
    assert.are.same({ want.cafe }, tok:encode("<|caf\u{e9}|>"))
    assert.are.same({ want.cafe }, tok:encode("<|cafe\u{301}|>"))
    -- bytes that are not UTF-8 stay as they are, marks after them uncomposed
    for _, raw in ipairs({ "bad \xff\xcc\x81 x", "\xe2\x84 A\xcc\x8a \xed\xa0\x80\xcc\x81", "\xcc\x81\xcc\xa7" }) do
      local nfc_raw = raw:gsub("A\xcc\x8a", "\xc3\x85"):gsub("\xcc\x81\xcc\xa7", "\xcc\xa7\xcc\x81")
      assert.are.equal(nfc_raw, tok:decode(tok:encode(raw)))
    end
  end)

  it("NFC as unicodedata's for every code point it may touch (after a base, before two marks)", function()
    local tok = tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir .. "/tokenizer_qwen2_nfc.json" })
    assert.is_true(#want.nfc_sweep >= 8) -- about 3400 code points
    for i, pair in ipairs(want.nfc_sweep) do
      local got = tok:decode(tok:encode(pair[1]))
      if got ~= pair[2] then -- the first code point that differs, for the message
        local k = 1
        while got:sub(k, k) == pair[2]:sub(k, k) do k = k + 1 end
        error(("sweep %d: differs at byte %d: got %q, want %q"):format(i, k, got:sub(k - 8, k + 8), pair[2]:sub(k - 8, k + 8)))
      end
    end
  end)
end)

describe("tokenizer errors", function()
  it("name the file: missing, malformed, not a vocabulary, unknown kind", function()
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "GPT2BPETokenizer", vocab_file = dir .. "/nope.json", merge_file = GPT2.merge_file })
    end, dir .. "/nope.json: cannot open")
    local bad = h.tmpdir() .. "/encoder.json"
    write(bad, '{"a": 0, "b": ')
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "GPT2BPETokenizer", vocab_file = bad, merge_file = GPT2.merge_file })
    end, bad .. ": not valid JSON")
    write(bad, '{"a": 0, "b": 1}')
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "GPT2BPETokenizer", vocab_file = bad, merge_file = GPT2.merge_file })
    end, GPT2.merge_file .. ":2: merge")
    local merges = h.tmpdir() .. "/vocab.bpe"
    write(merges, "h e\n")
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "GPT2BPETokenizer", vocab_file = GPT2.vocab_file, merge_file = merges })
    end, merges .. ":1: expected the \"#version: ...\" line")
    write(bad, "[1, 2]")
    assert_error_contains(function() tokenizer.build({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = bad }) end,
      bad .. ": expected a JSON object")
    assert_error_contains(function() tokenizer.build({ tokenizer_type = "WordPieceTokenizer" }) end,
      "unknown tokenizer_type 'WordPieceTokenizer'")
    assert_error_contains(function() core.tokenizer({ tokenizer_type = "BertWordPieceLowerCase" }) end,
      "unknown tokenizer type 'BertWordPieceLowerCase'")
    assert_error_contains(function() tokenizer.build({ tokenizer_type = "SentencePieceTokenizer" }) end,
      "SentencePieceTokenizer needs tokenizer_model (a SentencePiece .model file)")
  end)
end)

describe("luatron preprocess with a tokenizer", function()
  local corpus = dir .. "/corpus.jsonl"
  local lines = {}
  for i, text in ipairs(want.texts) do lines[i] = json.encode({ text = text, title = "doc " .. i }) end
  write(corpus, table.concat(lines, "\n") .. "\n")

  it("GPT2BPETokenizer: the reference's ids, with EOD, in uint16", function()
    local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type GPT2BPETokenizer "
      .. "--vocab-file %s --merge-file %s --append-eod --workers 2"):format(q(corpus), q(dir .. "/gpt2"),
      q(GPT2.vocab_file), q(GPT2.merge_file)))
    assert.are.equal(0, code, out)
    local ds = read_indexed(dir .. "/gpt2")
    local seqs, docs = expected_docs(want.gpt2, want.eod)
    assert.are.equal(8, ds.dtype) -- uint16: vocab < 65500
    assert.are.same(seqs, ds.seqs)
    assert.are.same(docs, ds.docs)
  end)

  it("--workers 3 writes the same bytes as one worker, over several batches of documents", function()
    local texts, big = {}, dir .. "/many.jsonl"
    for i = 1, 2500 do -- more documents than one batch (1024), some empty, in 3 threads
      texts[i] = json.encode({ text = i % 97 == 0 and "" or want.texts[i % #want.texts + 1] .. " #" .. i })
    end
    h.write(big, table.concat(texts, "\n") .. "\n")
    for _, w in ipairs { 1, 3 } do
      local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type GPT2BPETokenizer "
        .. "--vocab-file %s --merge-file %s --append-eod --workers %d"):format(q(big), q(dir .. "/many_w" .. w),
        q(GPT2.vocab_file), q(GPT2.merge_file), w))
      assert.are.equal(0, code, out)
    end
    for _, ext in ipairs { ".bin", ".idx" } do
      assert.are.equal(read(dir .. "/many_w1" .. ext), read(dir .. "/many_w3" .. ext), ext)
    end
    assert.are.equal(2500, #read_indexed(dir .. "/many_w3").docs - 1)
  end)

  it("HuggingFaceTokenizer with Megatron's --json-keys: PREFIX_KEY_document per key", function()
    local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type HuggingFaceTokenizer "
      .. "--tokenizer-model %s --json-keys text title"):format(q(corpus), q(dir .. "/hf"), q(HF.tokenizer_model)))
    assert.are.equal(0, code, out)
    local ds = read_indexed(dir .. "/hf_text_document")
    local seqs, docs = expected_docs(want.hf, nil)
    assert.are.same(seqs, ds.seqs)
    assert.are.same(docs, ds.docs)
    local tok = tokenizer.build(HF)
    local titles = read_indexed(dir .. "/hf_title_document")
    assert.are.same(tok:encode("doc 3"), titles.seqs[3])
  end)

  it("HuggingFaceTokenizer with Llama-3's template (eod after it) and with Qwen2's NFC: the reference's ids", function()
    local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type HuggingFaceTokenizer "
      .. "--tokenizer-model %s --append-eod"):format(q(corpus), q(dir .. "/bos"), q(dir .. "/tokenizer_llama3_bos.json")))
    assert.are.equal(0, code, out)
    local ds = read_indexed(dir .. "/bos")
    local seqs, docs = expected_docs(want.llama3_bos, want.eod)
    assert.are.same(seqs, ds.seqs)
    assert.are.same(docs, ds.docs)
    -- every document is a sequence: the empty one is <|begin_of_text|> <|endoftext|>, as Megatron's tokenize
    assert.are.equal(#want.texts, #ds.seqs)
    assert.are.equal("", want.texts[14])
    assert.are.same({ want.bos, want.eod }, ds.seqs[14])
    code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type HuggingFaceTokenizer "
      .. "--tokenizer-model %s"):format(q(corpus), q(dir .. "/nfc"), q(dir .. "/tokenizer_qwen2_nfc.json")))
    assert.are.equal(0, code, out)
    ds = read_indexed(dir .. "/nfc")
    seqs, docs = expected_docs(want.qwen2_nfc, nil)
    assert.are.same(seqs, ds.seqs)
    assert.are.same(docs, ds.docs)
  end)

  it("refuses Megatron flags it does not implement and tokenizer mistakes, with the reason", function()
    local base = ("preprocess --input %s --output-prefix %s "):format(q(corpus), q(dir .. "/x"))
    local code, out = luatron(base .. "--split-sentences")
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--split-sentences is not supported: splitting documents into sentences", 1, true), out)
    code, out = luatron(base .. "--partitions 2")
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--partitions is not supported", 1, true), out)
    code, out = luatron(base .. "--tokenizer-type BertWordPieceLowerCase")
    assert.are.equal(2, code, out)
    assert.truthy(out:find("unknown tokenizer type 'BertWordPieceLowerCase'", 1, true), out)
    code, out = luatron(base .. "--tokenizer-type GPT2BPETokenizer --vocab-file " .. q(GPT2.vocab_file))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("GPT2BPETokenizer needs a vocab file (GPT-2's encoder.json) and a merge file", 1, true), out)
    code, out = luatron(base .. "--tokenizer-model " .. q(HF.tokenizer_model))
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--tokenizer-model is for --tokenizer-type HuggingFaceTokenizer", 1, true), out)
    code, out = luatron(base .. "--tokenizer-type HuggingFaceTokenizer --tokenizer-model " .. q(dir .. "/none.json"))
    assert.are.equal(1, code, out)
    assert.truthy(out:find(dir .. "/none.json: no such file or folder", 1, true), out)
    assert.is_nil(io.open(dir .. "/x.bin"))
  end)
end)

describe("TokenizerConfig with tokenizer files", function()
  it("takes the vocabulary size and eod from the files", function()
    local r = validate(GPT2)
    assert.are.equal(want.vocab_size, r.model.vocab_size)
    assert.are.equal(384, r.padded_vocab_size) -- 317 rounded up to a multiple of 128
    assert.are.equal(want.eod, r.tokenizer_eod)
    r = validate({ tokenizer_type = "HuggingFaceTokenizer", tokenizer_model = dir })
    assert.are.equal(want.hf_vocab_size, r.model.vocab_size)
  end)

  it("trains on GPT-2 BPE data with the vocabulary from the files", function()
    local d = h.tmpdir()
    local lines = {}
    for i = 1, 120 do lines[i] = json.encode({ text = want.texts[i % 19 + 1] .. " the quick brown fox " .. i }) end
    write(d .. "/c.jsonl", table.concat(lines, "\n") .. "\n")
    local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type GPT2BPETokenizer "
      .. "--vocab-file %s --merge-file %s --append-eod"):format(q(d .. "/c.jsonl"), q(d .. "/c"), q(GPT2.vocab_file),
      q(GPT2.merge_file)))
    assert.are.equal(0, code, out)
    code, out = luatron(h.tiny(d, ("train.train_iters=3 model.vocab_size=nil dataset.data_path=%s dataset.split=98,2,0 "
      .. "tokenizer.tokenizer_type=GPT2BPETokenizer tokenizer.vocab_file=%s tokenizer.merge_file=%s")
      :format(q(d .. "/c"), q(GPT2.vocab_file), q(GPT2.merge_file))))
    assert.are.equal(0, code, out)
    assert.are.equal(3, #h.read_metrics(d .. "/metrics.jsonl"))
  end)

  it("names a missing or corrupt file", function()
    assert_error_contains(function()
      validate({ tokenizer_type = "GPT2BPETokenizer", vocab_file = dir .. "/missing.json", merge_file = GPT2.merge_file })
    end, dir .. "/missing.json: cannot open")
    assert_error_contains(function()
      validate({ tokenizer_type = "GPT2BPETokenizer", vocab_file = GPT2.vocab_file, merge_file = GPT2.vocab_file })
    end, GPT2.vocab_file .. ":1: expected the \"#version: ...\" line")
    assert_error_contains(function() validate({ tokenizer_type = "GPT2BPETokenizer", vocab_file = GPT2.vocab_file,
      merge_file = GPT2.merge_file, vocab_size = 100 }) end, "tokenizer.vocab_size (100) is smaller than")
  end)
end)

-- SentencePiece: Megatron's _SentencePieceTokenizer, _GPTSentencePieceTokenizer and _Llama2Tokenizer
-- against tests/lua/sentencepiece_reference.py, which trains three small models (BPE with pad/bos/eos,
-- unigram without pad, BPE with byte fallback, user-defined <EOD>, a pad piece "<p" that prefixes the bos
-- piece "<p>" and no eos) and runs Megatron's wrapper logic in Python over python3-sentencepiece.
-- Debian's python3-sentencepiece is for the system Python: take the first python3 that has it.
local PY = os.execute("python3 -c 'import sentencepiece' >/dev/null 2>&1") and "python3" or "/usr/bin/python3"
local spdir = h.tmpdir()
assert(os.execute(PY .. " tests/lua/sentencepiece_reference.py " .. q(spdir)),
  "the SentencePiece reference script failed (it needs python3-sentencepiece)")
local spwant = json.decode(read(spdir .. "/expected.json"))
local SP_MODELS = { "bpe", "unigram", "custom" }

describe("SentencePieceTokenizer", function()
  it("has the model's pieces plus Megatron's special tokens: vocab_size and eod as the reference", function()
    for _, name in ipairs(SP_MODELS) do
      local w = spwant[name]
      local tok = tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = w.model })
      assert.are.equal("SentencePieceTokenizer", tok.type)
      assert.are.equal(w.vocab_size, tok.vocab_size, name)
      assert.are.equal(w.eod, tok.eod, name)
      -- each special piece alone encodes to its id (appended, or the model's own piece), unless a special
      -- added before it starts it (custom's "<p" before "<p>": then that one)
      for k, pair in ipairs(w.special) do
        local shadowed = false
        for j = 1, k - 1 do shadowed = shadowed or pair[1]:sub(1, #w.special[j][1]) == w.special[j][1] end
        if not shadowed then assert.are.same({ pair[2] }, tok:encode(pair[1]), name .. " " .. pair[1]) end
      end
    end
    -- what the models were made to exercise: appended tokens, <PAD> for a model without pad, <EOD> a piece
    assert.are.equal(spwant.bpe.pieces + 4, spwant.bpe.vocab_size) -- <CLS> <SEP> <EOD> <MASK>; <pad> <s> </s> exist
    assert.are.equal(spwant.unigram.pieces + 5, spwant.unigram.vocab_size) -- and <PAD>
    assert.are.equal(spwant.custom.pieces + 2, spwant.custom.vocab_size) -- <CLS> and <EOS> only
    assert.is_true(spwant.custom.eod < spwant.custom.pieces)
  end)

  it("encodes every text as the reference: non-ASCII, unknown characters, special pieces anywhere", function()
    for _, name in ipairs(SP_MODELS) do
      local w = spwant[name]
      local tok = tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = w.model })
      for i, text in ipairs(spwant.texts) do
        assert.are.same(list(w.ids[i]), tok:encode(text), ("%s, text %d: %q"):format(name, i, text))
      end
    end
    -- the cases that decide it: a literal <s> is bos, the earliest special wins, and at one position the
    -- one added first ("<p", the pad, before "<p>", the bos), not the longest
    local bpe = tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = spwant.bpe.model })
    assert.are.same({ spwant.bpe.bos_id }, bpe:encode("<s>"))
    local custom = tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = spwant.custom.model })
    local ids = custom:encode("<p>")
    assert.are.equal(spwant.custom.pad_id, ids[1])
    assert.are_not.equal(spwant.custom.bos_id, ids[1])
  end)

  it("decodes as Megatron's detokenize: ' piece ' for each special id between decoded runs", function()
    for _, name in ipairs(SP_MODELS) do
      local w = spwant[name]
      local tok = tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = w.model })
      for i = 1, #spwant.texts do
        assert.are.equal(w.detokenized[i], tok:decode(list(w.ids[i])), ("%s, text %d"):format(name, i))
      end
      for i, ids in ipairs(w.extra_ids) do
        assert.are.equal(w.extra_detokenized[i], tok:decode(list(ids)), ("%s, ids %d"):format(name, i))
      end
      assert_error_contains(function() tok:decode({ 5, w.vocab_size }) end,
        ("id %d (position 2) is not in the vocabulary (0..%d)"):format(w.vocab_size, w.vocab_size - 1))
      assert_error_contains(function() tok:decode({ -1 }) end, "id -1 (position 1) is not in the vocabulary")
    end
  end)

  it("GPTSentencePieceTokenizer and Llama2Tokenizer: the model alone (Llama-2: bos first), eod = eos", function()
    for _, name in ipairs({ "bpe", "unigram" }) do
      local w = spwant[name]
      for kind, key in pairs({ GPTSentencePieceTokenizer = "gpt", Llama2Tokenizer = "llama2" }) do
        local tok = tokenizer.build({ tokenizer_type = kind, tokenizer_model = w.model })
        local r = w[key]
        assert.are.equal(r.vocab_size, tok.vocab_size)
        assert.are.equal(r.eod, tok.eod)
        for i, text in ipairs(spwant.texts) do
          assert.are.same(list(r.ids[i]), tok:encode(text), ("%s %s, text %d: %q"):format(kind, name, i, text))
          assert.are.equal(r.detokenized[i], tok:decode(list(r.ids[i])), ("%s %s, text %d"):format(kind, name, i))
        end
      end
    end
    assert.are_not.same(list(spwant.bpe.ids[60]), list(spwant.bpe.gpt.ids[60])) -- "<EOD>" is no special here
    -- the custom model has no eos (and Llama-2 needs a bos): refused, saying what to change
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "GPTSentencePieceTokenizer", tokenizer_model = spwant.custom.model })
    end, spwant.custom.model .. ": the SentencePiece model has no eos piece (eos_id = -1)", "train it with an eos_id")
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "Llama2Tokenizer", tokenizer_model = spwant.custom.model })
    end, "has no eos piece")
  end)

  it("names a missing, corrupt or truncated model file", function()
    local d = h.tmpdir()
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = d .. "/none.model" })
    end, d .. "/none.model: cannot open: No such file or directory")
    write(d .. "/bad.model", "this is not a protobuf\n")
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = d .. "/bad.model" })
    end, d .. "/bad.model: not a SentencePiece model (libsentencepiece: ", "give the .model file that spm_train wrote")
    write(d .. "/cut.model", read(spwant.bpe.model):sub(1, 5000))
    assert_error_contains(function()
      core.tokenizer({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = d .. "/cut.model" })
    end, d .. "/cut.model: not a SentencePiece model")
    assert_error_contains(function()
      tokenizer.build({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = d })
    end, d .. ": is a folder: give the SentencePiece .model file itself")
    assert_error_contains(function() tokenizer.build({ tokenizer_type = "Llama2Tokenizer" }) end,
      "Llama2Tokenizer needs tokenizer_model (a SentencePiece .model file)")
  end)
end)

describe("luatron preprocess with a SentencePiece model", function()
  local corpus = spdir .. "/corpus.jsonl"
  local lines = {}
  for i, text in ipairs(spwant.texts) do lines[i] = json.encode({ text = text }) end
  write(corpus, table.concat(lines, "\n") .. "\n")

  it("--tokenizer-type SentencePieceTokenizer --tokenizer-model: the reference's ids, with <EOD>", function()
    for _, name in ipairs(SP_MODELS) do
      local w = spwant[name]
      local prefix = spdir .. "/pre_" .. name
      local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type SentencePieceTokenizer "
        .. "--tokenizer-model %s --append-eod"):format(q(corpus), q(prefix), q(w.model)))
      assert.are.equal(0, code, out)
      assert.truthy(out:find(("SentencePieceTokenizer tokenizer, vocab %d, uint16, EOD %d appended"):format(
        w.vocab_size, w.eod), 1, true), out)
      local ds = read_indexed(prefix)
      local seqs, docs = expected_docs(w.ids, w.eod)
      assert.are.equal(8, ds.dtype)
      assert.are.same(seqs, ds.seqs)
      assert.are.same(docs, ds.docs)
    end
  end)

  it("GPTSentencePieceTokenizer and Llama2Tokenizer: the model's ids (after bos), eos appended", function()
    local w = spwant.bpe
    for kind, key in pairs({ GPTSentencePieceTokenizer = "gpt", Llama2Tokenizer = "llama2" }) do
      local prefix = spdir .. "/pre_" .. key
      local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type %s --tokenizer-model %s "
        .. "--append-eod"):format(q(corpus), q(prefix), kind, q(w.model)))
      assert.are.equal(0, code, out)
      local ds = read_indexed(prefix)
      local seqs, docs = expected_docs(w[key].ids, w.eos_id)
      assert.are.same(seqs, ds.seqs)
      assert.are.same(docs, ds.docs)
    end
  end)

  it("refuses wrong flags and a bad model, naming it", function()
    local base = ("preprocess --input %s --output-prefix %s "):format(q(corpus), q(spdir .. "/bad"))
    local code, out = luatron(base .. "--tokenizer-type SentencePieceTokenizer")
    assert.are.equal(1, code, out)
    assert.truthy(out:find("SentencePieceTokenizer needs a tokenizer model: the path of a SentencePiece .model file",
      1, true), out)
    code, out = luatron(base .. "--tokenizer-type SentencePieceTokenizer --vocab-file " .. q(spwant.bpe.model))
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--vocab-file and --merge-file are for --tokenizer-type GPT2BPETokenizer, not "
      .. "SentencePieceTokenizer", 1, true), out)
    code, out = luatron(base .. "--tokenizer-type SentencePieceTokenizer --tokenizer-model " .. q(spdir .. "/train.txt"))
    assert.are.equal(1, code, out)
    assert.truthy(out:find(spdir .. "/train.txt: not a SentencePiece model", 1, true), out)
    code, out = luatron(base .. "--tokenizer-type SentencePieceTokenizer --tokenizer-model " .. q(spwant.bpe.model)
      .. " --vocab-extra-ids 100")
    assert.are.equal(2, code, out)
    assert.truthy(out:find("--vocab-extra-ids is not supported", 1, true), out)
    assert.is_nil(io.open(spdir .. "/bad.bin"))
  end)
end)

describe("TokenizerConfig with a SentencePiece model", function()
  it("takes vocab_size and eod as Megatron computes them, and needs tokenizer_model", function()
    for _, name in ipairs(SP_MODELS) do
      local w = spwant[name]
      local r = validate({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = w.model })
      assert.are.equal(w.vocab_size, r.model.vocab_size, name)
      assert.are.equal(w.eod, r.tokenizer_eod, name)
      assert.are.equal((w.vocab_size + 127) // 128 * 128, r.padded_vocab_size) -- a multiple of 128
    end
    local r = validate({ tokenizer_type = "GPTSentencePieceTokenizer", tokenizer_model = spwant.bpe.model })
    assert.are.equal(spwant.bpe.pieces, r.model.vocab_size)
    assert.are.equal(spwant.bpe.eos_id, r.tokenizer_eod)
    assert_error_contains(function() validate({ tokenizer_type = "SentencePieceTokenizer" }) end,
      "tokenizer.tokenizer_type = 'SentencePieceTokenizer' needs tokenizer.tokenizer_model: the path of a "
        .. "SentencePiece .model file")
    assert_error_contains(function()
      validate({ tokenizer_type = "SentencePieceTokenizer", tokenizer_model = spdir .. "/train.txt" })
    end, spdir .. "/train.txt: not a SentencePiece model")
    assert_error_contains(function() validate({ tokenizer_type = "SentencePieceTokenizer",
      tokenizer_model = spwant.bpe.model, vocab_size = 300 }) end,
      "tokenizer.vocab_size (300) is smaller than the SentencePieceTokenizer's 304 tokens")
    assert_error_contains(function() validate({ tokenizer_model = spwant.bpe.model }) end,
      "tokenizer.tokenizer_model is for tokenizer_type = 'HuggingFaceTokenizer' or a SentencePiece type, not "
        .. "'ByteLevel'")
  end)

  it("trains on SentencePiece data with the vocabulary from the model", function()
    local d = h.tmpdir()
    local lines = {}
    for i = 1, 120 do lines[i] = json.encode({ text = spwant.texts[i % 40 + 1] .. " <EOD> " .. i }) end
    write(d .. "/c.jsonl", table.concat(lines, "\n") .. "\n")
    local code, out = luatron(("preprocess --input %s --output-prefix %s --tokenizer-type SentencePieceTokenizer "
      .. "--tokenizer-model %s --append-eod"):format(q(d .. "/c.jsonl"), q(d .. "/c"), q(spwant.unigram.model)))
    assert.are.equal(0, code, out)
    code, out = luatron(h.tiny(d, ("train.train_iters=3 model.vocab_size=nil dataset.data_path=%s "
      .. "dataset.split=98,2,0 tokenizer.tokenizer_type=SentencePieceTokenizer tokenizer.tokenizer_model=%s")
      :format(q(d .. "/c"), q(spwant.unigram.model))))
    assert.are.equal(0, code, out)
    assert.are.equal(3, #h.read_metrics(d .. "/metrics.jsonl"))
    assert.truthy(out:find(("padded vocab (size: %d)"):format(spwant.unigram.vocab_size), 1, true), out)
  end)
end)

-- Data through the luatron command: preprocessing, Megatron indexed datasets given as data_path,
-- and data tokenized elsewhere (Megatron's NullTokenizer).
-- Needs LUATRON (the binary); tests/lua/BUILD provides it under Bazel.
local json = require "luatron.json"

local h = dofile("tests/lua/helpers.lua")
local q, tmpdir, write, read_metrics, luatron, tiny = h.q, h.tmpdir, h.write, h.read_metrics, h.luatron, h.tiny

describe("preprocess", function()
  it("preprocesses JSONL into Megatron's indexed format and trains on it", function()
    local dir = tmpdir()
    local lines = {}
    for i = 1, 200 do
      lines[i] = json.encode { text = ("document %d: the quick brown fox jumps over the lazy dog.\n"):format(i)
        .. ("abc "):rep(i % 7 + 3) }
    end
    write(dir .. "/corpus.jsonl", table.concat(lines, "\n") .. "\n")
    local code, out = luatron(("preprocess --input %s --output-prefix %s --append-eod")
      :format(q(dir .. "/corpus.jsonl"), q(dir .. "/corpus")))
    assert.are.equal(0, code, out)
    code, out = luatron(tiny(dir, ("train.train_iters=25 model.vocab_size=nil dataset.data_path=%s "
      .. "dataset.split=98,2,0 train.eval_interval=25"):format(q(dir .. "/corpus"))))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("validation at iteration 25", 1, true), out)
    local m = read_metrics(dir .. "/metrics.jsonl")
    assert.is_true(m[25].loss < m[1].loss - 1.0, ("loss %.3f -> %.3f"):format(m[1].loss, m[25].loss))
  end)
end)

describe("data paths", function()
  -- A recipe over the indexed datasets at the prefixes (list entries: spaces are part of the names).
  local function recipe(dir, prefix, more, iters)
    local path = dir .. "/recipe.lua"
    write(path, ([[
local lt = require "luatron"
lt.pretrain(lt.ConfigContainer {
  model = { num_layers = 1, hidden_size = 32, num_attention_heads = 2, seq_length = 32 },
  train = { train_iters = %d, micro_batch_size = 2, global_batch_size = 2, eval_iters = 0 },
  optimizer = { lr = 1e-3 },
  logger = { log_interval = 1 },
  dataset = { data_path = { %q%s }, split = "98,2,0" },
}, arg)
]]):format(iters or 2, prefix, more and (", %q"):format(more) or ""))
    return path
  end

  it("takes a list entry with spaces as one prefix, and says to preprocess a corpus given instead", function()
    local dir = tmpdir() .. "/my data"
    assert(os.execute("mkdir -p " .. q(dir)))
    local lines = {}
    for i = 1, 50 do lines[i] = json.encode { text = ("document %d, "):format(i) .. ("text "):rep(20) } end
    write(dir .. "/corpus.jsonl", table.concat(lines, "\n") .. "\n")
    assert.are.equal(0, (luatron(("preprocess --input %s --output-prefix %s"):format(q(dir .. "/corpus.jsonl"),
      q(dir .. "/my corpus")))))
    local code, out = luatron("run " .. q(recipe(dir, dir .. "/my corpus")))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("iteration      2/2", 1, true), out)
    code, out = luatron("run " .. q(recipe(dir, dir .. "/corpus.jsonl")))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("is a file, not an indexed dataset (PREFIX.bin and PREFIX.idx): tokenize it first with "
      .. "`luatron preprocess --input " .. dir .. "/corpus.jsonl --output-prefix " .. dir .. "/corpus`", 1, true), out)
    code, out = luatron("run " .. q(recipe(dir, dir .. "/my corpus.bin")))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("is one of the dataset's files: give its prefix '" .. dir .. "/my corpus'", 1, true), out)
    -- Megatron's unweighted blend holds one epoch of its parts: too few samples is said up front
    code, out = luatron("run " .. q(recipe(dir, dir .. "/my corpus", dir .. "/my corpus", 1000)))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("dataset.data_path blends 2 datasets without weights: one epoch of them is ", 1, true), out)
  end)
end)

describe("data tokenized elsewhere", function()
  -- A Megatron indexed dataset (MMIDIDX version 1, uint16 tokens) written byte by byte, one
  -- document of `len` ids below `vocab` per sequence, as Megatron's preprocess_data.py writes them.
  local function write_indexed(prefix, docs, len, vocab)
    local bin, lengths, pointers, doc_index = {}, {}, {}, { string.pack("<i8", 0) }
    for d = 1, docs do
      local ids = {}
      for i = 1, len do ids[i] = string.pack("<I2", (d * 7919 + i * 104729) % vocab) end
      pointers[d] = string.pack("<i8", (d - 1) * len * 2)
      lengths[d] = string.pack("<i4", len)
      doc_index[d + 1] = string.pack("<i8", d)
      bin[d] = table.concat(ids)
    end
    write(prefix .. ".bin", table.concat(bin))
    write(prefix .. ".idx", "MMIDIDX\0\0" .. string.pack("<I8B<I8<I8", 1, 8, docs, docs + 1) .. table.concat(lengths)
      .. table.concat(pointers) .. table.concat(doc_index))
  end

  it("trains with tokenizer_type = NullTokenizer and its vocab_size; the byte-level vocabulary refuses the ids", function()
    local dir = tmpdir()
    write_indexed(dir .. "/tok", 64, 40, 1000)
    local args = "train.train_iters=2 model.vocab_size=nil dataset.split=98,2,0 dataset.data_path=" .. q(dir .. "/tok")
    local code, out = luatron(tiny(dir, args .. " tokenizer.tokenizer_type=NullTokenizer tokenizer.vocab_size=1000"))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("vocab=1024", 1, true), out) -- 1000 ids and end-of-document, padded to 128
    code, out = luatron(tiny(dir, args))
    assert.are.equal(1, code, out)
    assert.truthy(out:find("has id %d+, outside vocab_size 384%. The data holds ids beyond the model's vocabulary: "
      .. "for data tokenized elsewhere set tokenizer.tokenizer_type = 'NullTokenizer'"), out)
    assert.falsy(out:find("traceback", 1, true), out)
  end)
end)

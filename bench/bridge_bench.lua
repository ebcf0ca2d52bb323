-- The Hugging Face bridge's speed at GPT-2 124M on the CPU: export (save_hf_pretrained of a model built
-- here) and import (from_hf_pretrained, the model's build and load_hf_weights), in seconds of CPU time,
-- and the transposed copy each Conv1D weight takes.
-- Prints the figures and writes them to bench/results/bridge.txt.
--   luatron run bench/bridge_bench.lua
local lt = require "luatron"

local provider = lt.GPTModelProvider { num_layers = 12, hidden_size = 768, num_attention_heads = 12,
  seq_length = 1024, vocab_size = 50257, make_vocab_size_divisible_by = 1, openai_gelu = true }
local model = lt.build_model(provider, 1)
local dir = os.tmpname()
os.remove(dir)

local t = os.clock()
lt.AutoBridge.from_megatron_provider(provider):save_hf_pretrained(model, dir)
local export = os.clock() - t
t = os.clock()
local bridge = lt.AutoBridge.from_hf_pretrained(dir)
bridge:load_hf_weights(lt.build_model(bridge:to_megatron_provider(), 2))
local import = os.clock() - t
os.execute("rm -rf '" .. dir .. "'")

-- a GPT-2 MLP weight's transposed copy (what each Conv1D re-layout does), 20 times
local w, into = lt.core.tensor.zeros({ 3072, 768 }, "float32"), lt.core.tensor.zeros({ 768, 3072 }, "float32")
t = os.clock()
for _ = 1, 20 do into:copy(w:transpose(1, 2)) end
local transpose_ms = (os.clock() - t) * 1000 / 20

local text = ("# Hugging Face bridge at GPT-2 124M, CPU (%s)\n\ncommand: luatron run bench/bridge_bench.lua\n\n"
  .. "| step | CPU seconds |\n|---|---:|\n| export (save_hf_pretrained) | %.1f |\n"
  .. "| import (from_hf_pretrained, build, load_hf_weights) | %.1f |\n"
  .. "\nA [3072, 768] fp32 transposed copy: %.1f ms\n"):format(os.date("!%Y-%m-%d %H:%M UTC"), export, import,
  transpose_ms)
io.write(text)
local f = assert(io.open("bench/results/bridge.txt", "w"))
f:write(text)
f:close()

-- A pipeline schedule written in Lua, GPipe (every microbatch forward, then every backward),
-- training a small GPT on two pipeline stages:
--   ./luatron launch -n 2 recipes/custom_schedule.lua [group.field=value ...]
-- It gives 1F1B's losses (the same gradients, summed in the same order), but each stage holds
-- the activations of all its microbatches at once, where 1F1B holds at most PP of them.
local lt = require "luatron"

-- What one pipeline rank runs, in order: s.forward(m, c) and s.backward(m, c) for microbatch m
-- (0-based) and chunk c (0 without virtual stages). The sends and receives between stages follow
-- from the order, and luatron checks every rank's order against the others' before the first step.
local function gpipe(s)
  for m = 0, s.num_microbatches - 1 do s.forward(m) end
  for m = 0, s.num_microbatches - 1 do s.backward(m) end
end

local cfg = lt.ConfigContainer {
  model = lt.GPTModelProvider {
    num_layers = 4,
    hidden_size = 64,
    num_attention_heads = 4,
    seq_length = 64,
    vocab_size = 256,
    pipeline_model_parallel_size = 2,
  },
  train = lt.TrainingConfig { train_iters = 20, global_batch_size = 16, micro_batch_size = 2, eval_interval = 1000 },
  optimizer = lt.OptimizerConfig { lr = 3e-3, min_lr = 3e-4, clip_grad = 1.0 },
  scheduler = lt.SchedulerConfig { lr_warmup_fraction = 0.1, lr_decay_style = "cosine" },
  dataset = lt.GPTDatasetConfig { sequence_length = 64 },
  logger = lt.LoggerConfig { log_interval = 5 },
}

return lt.pretrain(cfg, arg, { schedule = gpipe })

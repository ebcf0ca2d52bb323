-- The default recipe: a tiny GPT trained on the mock dataset, on the CPU, in about a minute.
--   ./luatron run recipes/gpt_tiny.lua [group.field=value ...]
-- e.g. train.train_iters=50 checkpoint.save=runs/tiny optimizer.lr=1e-3
local lt = require "luatron"

local cfg = lt.ConfigContainer {
  model = lt.GPTModelProvider {
    num_layers = 4,
    hidden_size = 128,
    num_attention_heads = 4,
    seq_length = 128,
    vocab_size = 256,
    hidden_dropout = 0.0,
    attention_dropout = 0.0,
  },
  train = lt.TrainingConfig {
    train_iters = 300,
    global_batch_size = 16,
    micro_batch_size = 4, -- 4 microbatches on one rank; runs on 1, 2 or 4 data-parallel ranks
    eval_interval = 100,
    eval_iters = 2,
  },
  optimizer = lt.OptimizerConfig { optimizer = "adam", lr = 3e-3, min_lr = 3e-4, weight_decay = 0.01, clip_grad = 1.0 },
  scheduler = lt.SchedulerConfig { lr_warmup_fraction = 0.1, lr_decay_style = "cosine" }, -- any train_iters
  dataset = lt.GPTDatasetConfig { sequence_length = 128 }, -- no data_path: the mock dataset
  logger = lt.LoggerConfig { log_interval = 25 },
  rng = lt.RNGConfig { seed = 1234 },
}

local result = lt.pretrain(cfg, arg)
return result

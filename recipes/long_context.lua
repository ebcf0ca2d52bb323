-- Long sequences with context parallelism: a small GPT on sequences of 8192 tokens, split over
-- context_parallel_size = 4 ranks (each holds 2 of the 8 chunks of 1024 tokens: Megatron's load
-- balancing) with ring attention, on CPU ranks.
--   ./luatron launch -n 4 recipes/long_context.lua
--   ./luatron run recipes/long_context.lua model.context_parallel_size=1   (the whole sequence on one rank)
-- The log shows each rank's activations per microbatch (a quarter of one rank's) and peak memory,
-- and the ring's bytes per step against the arithmetic.
local lt = require "luatron"

local cfg = lt.ConfigContainer {
  model = lt.GPTModelProvider {
    num_layers = 2,
    hidden_size = 128,
    num_attention_heads = 4,
    seq_length = 8192,
    vocab_size = 256,
    position_embedding_type = "rope",
    hidden_dropout = 0.0,
    attention_dropout = 0.0,
    context_parallel_size = 4,
  },
  train = lt.TrainingConfig { train_iters = 4, global_batch_size = 1, micro_batch_size = 1, eval_interval = 1000,
    eval_iters = 0 },
  optimizer = lt.OptimizerConfig { optimizer = "adam", lr = 1e-3, weight_decay = 0.01, clip_grad = 1.0 },
  scheduler = lt.SchedulerConfig { lr_warmup_iters = 1 },
  dataset = lt.GPTDatasetConfig { sequence_length = 8192 }, -- the mock dataset
  logger = lt.LoggerConfig { log_interval = 1 },
  rng = lt.RNGConfig { seed = 1234 },
}

return lt.pretrain(cfg, arg)

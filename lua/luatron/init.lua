-- luatron: `local lt = require "luatron"`.
-- Config containers with Megatron Bridge's names, the training loop, and the engine's pieces
-- (tensors, models, optimizers, datasets) for recipes that write their own loops.
local core = require "luatron.core"
local config = require "luatron.config"
local pretrain = require "luatron.pretrain"

local lt = {
  version = "0.1.0",
  core = core,
  tensor = core.tensor,
  config = config,
  model = require "luatron.model",
  scheduler = require "luatron.scheduler",
  checkpoint = require "luatron.checkpoint",
  json = require "luatron.json",
  overrides = require "luatron.overrides",
  pipeline = require "luatron.pipeline",
  schedules = require "luatron.schedules",
  moe = require "luatron.moe", -- lt.moe.route: the MoE router on host logits
  bridge = require "luatron.bridge",
  pretrain = pretrain.pretrain,
  training = pretrain,
}

for _, name in ipairs {
  "ConfigContainer", "GPTModelProvider", "TrainingConfig", "OptimizerConfig", "SchedulerConfig",
  "DistributedDataParallelConfig", "GPTDatasetConfig", "LoggerConfig", "TokenizerConfig", "CheckpointConfig",
  "RNGConfig", "DistributedInitConfig",
  -- Bridge's MoE helpers: lt.apply_moe_token_drop(provider, cf, pad), lt.apply_flex_dispatcher_backend(provider,
  -- backend), lt.apply_deepep(provider) (luatron/config/moe.lua)
  "apply_moe_token_drop", "apply_flex_dispatcher_backend", "apply_deepep",
} do
  lt[name] = config[name]
end

-- Hugging Face checkpoints both ways (Megatron Bridge's AutoBridge): lt.AutoBridge.from_hf_pretrained(dir),
-- bridge:to_megatron_provider(), bridge:load_hf_weights(model), bridge:save_hf_pretrained(model, dir).
lt.AutoBridge = lt.bridge.AutoBridge

-- lt.build_model(provider [, seed]): a model from a GPTModelProvider.
function lt.build_model(provider, seed)
  return lt.model.build(provider, seed)
end

-- lt.optimizer(model, OptimizerConfig): AdamW or SGD over the model's parameters.
lt.optimizer = core.optimizer

-- The job: lt.parallel_state([provider [, dist]]) → rank, world size, grid coordinates and a communicator
-- per group (built on first use, for `provider`'s layout or a pure data-parallel one).
local parallel = require "luatron.parallel"
lt.parallel = parallel
function lt.parallel_state(provider, dist)
  return parallel.get() or parallel.initialize(provider or {}, dist)
end
lt.comm_world = core.comm_world

return lt

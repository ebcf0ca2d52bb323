-- A training loop written by hand from luatron's pieces: model, optimizer, data, scheduler.
--   ./luatron run recipes/custom_loop.lua [steps]
local lt = require "luatron"
local core = lt.core

local steps = tonumber(arg and arg[1]) or 60
local provider = lt.GPTModelProvider {
  num_layers = 2, hidden_size = 64, num_attention_heads = 4, seq_length = 64, vocab_size = 256,
  normalization = "RMSNorm", activation = "swiglu", position_embedding_type = "rope",
  add_bias_linear = false, hidden_dropout = 0.0, attention_dropout = 0.0,
}
local opt_cfg = lt.OptimizerConfig { lr = 3e-3, min_lr = 3e-4, weight_decay = 0.0 }
local sched_cfg = lt.SchedulerConfig { lr_warmup_iters = 5, lr_decay_style = "cosine" }

local model = lt.build_model(provider, 42)
local optimizer = lt.optimizer(model, opt_cfg)
local data = core.dataset { seq_length = provider.seq_length, vocab_size = 256, seed = 42 } -- mock data
local batch_size = 8

print(("%s, %d parameters"):format(tostring(model), model:num_parameters()))
local first_loss, loss
for step = 0, steps - 1 do
  local lr = lt.scheduler.lr_at(step, opt_cfg, sched_cfg, steps)
  model:zero_grad()
  local batch <close> = data:batch(step * batch_size, batch_size)
  local ctx, l, valid = model:forward(batch)
  model:backward(ctx, 1 / valid)
  local norm = core.clip_grad_norm(model:flat_grads(), 1.0)
  optimizer:step(lr)
  loss, first_loss = l, first_loss or l
  if step % 10 == 0 or step == steps - 1 then
    print(("step %3d  loss %.4f  grad norm %.3f  lr %.2e"):format(step, l, norm, lr))
  end
end

-- Peek inside: a parameter as a tensor, read into Lua.
local wte = model:param("embedding.word_embeddings.weight")
print(("embedding table %s, first row starts %.4f %.4f"):format(table.concat(wte:shape(), "x"),
  wte:get(1, 1), wte:get(1, 2)))
print(("loss %.4f -> %.4f"):format(first_loss, loss))
return { first_loss = first_loss, last_loss = loss }

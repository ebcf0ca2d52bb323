-- Running a pipeline plan (luatron.pipeline) on this rank's chunks: the steps in the plan's
-- order, and before each step one batch of point-to-point calls, the previous step's send and
-- this step's receive posted together (the batches the plan's check proved free of deadlock).
--
-- `env` gives what the plan needs:
--   chunks            this rank's chunks, chunk c at index c + 1 (luatron.GPTChunk)
--   tokens(m)         int32 [b, s] input ids of microbatch m (first stage)
--   targets(m)        int32 [b, s] its next-token targets (last stage)
--   seed(m)           its dropout seed
--   loss_scale(n)     the gradient of each token's loss, n valid tokens in the microbatch
--   activations, gradients   communicators over the pipeline group for the two kinds of message
--                     (separate, so each kind keeps its own order between two ranks); nil with one stage
--   buffer()          an empty [s, b, h] tensor to receive into (dtype and device of the chunks)
--   last_backward(c)  called before chunk c's last backward (its gradients may start reducing)
--   overlap           Megatron's overlap_p2p_comm: a send completes behind the next step's
--                     computation (waited for in the batch after); receives are waited for at once
--   clock()           seconds, for the timeline (optional)
-- Returns the last stage's per-token losses and valid-token counts per microbatch,
-- { [m] = { losses = tensor, valid = n } } (empty elsewhere), and when env.clock is given the
-- timeline: { {name =, start =, finish =}, ... } with compute steps "F m c" / "B m c" and the waits
-- of point-to-point batches ("p2p").
local M = {}

local function post(env, op)
  local comm = op.kind == "activation" and env.activations or env.gradients
  return comm:batch_p2p_async { { op.dir, op.tensor, op.peer } }
end

function M.run(plan, env)
  local chunks, nchunks = env.chunks, #env.chunks
  local ctx, valid, results, timeline = {}, {}, {}, env.clock and {} or nil
  local function mark(name, start)
    if timeline then timeline[#timeline + 1] = { name = name, start = start, finish = env.clock() } end
  end
  local pending -- the previous step's send
  local in_flight -- with overlap, that send's request, still going
  local steps = plan.steps
  for i = 1, #steps + 1 do
    local step = steps[i]
    local recv
    local ops = { pending }
    if step and step.from then
      recv = env.buffer()
      ops[#ops + 1] = { dir = "recv", kind = step[1] == "F" and "activation" or "gradient", tensor = recv,
        peer = step.from }
    end
    if #ops > 0 or in_flight then
      local t0 = timeline and env.clock()
      local reqs = {}
      for k, op in ipairs(ops) do reqs[k] = post(env, op) end
      if in_flight then in_flight:wait() end
      in_flight = nil
      for k, r in ipairs(reqs) do
        if env.overlap and ops[k].dir == "send" and step then in_flight = r else r:wait() end
      end
      mark("p2p", t0)
    end
    pending = nil
    if not step then break end
    local kind, m, c = step[1], step[2], step[3]
    local chunk, key = chunks[c + 1], m * nchunks + c
    local stage = chunk:stage()
    local t0 = timeline and env.clock()
    if kind == "F" then
      local out, n
      out, ctx[key], n = chunk:forward(recv or env.tokens(m), stage.post_process and env.targets(m) or nil,
        env.seed(m))
      if plan.forward_only then -- no backward: keep no activations
        ctx[key]:release()
        ctx[key] = nil
      end
      if stage.post_process then
        valid[m] = n
        results[m] = { losses = out, valid = n }
      elseif step.to then
        pending = { dir = "send", kind = "activation", tensor = out, peer = step.to }
      end
    else
      if step.last and env.last_backward then env.last_backward(c) end
      local grad_in = chunk:backward(ctx[key], recv or env.loss_scale(valid[m]))
      ctx[key] = nil
      if step.to then pending = { dir = "send", kind = "gradient", tensor = grad_in, peer = step.to } end
    end
    mark(("%s %d %d"):format(kind, m, c), t0)
  end
  return results, timeline
end

return M

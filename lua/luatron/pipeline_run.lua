-- Running a pipeline plan (luatron.pipeline) on this rank's chunks: the steps in the plan's
-- order; a step first waits for what it receives, and what it sends goes out in the background
-- (the semantics the plan's check proved free of deadlock). Every direction between two ranks
-- has its own communicator per kind of message (env.link), so a send in flight never holds up a
-- receive: a communicator runs its requests one after another.
--
-- `env` gives what the plan needs:
--   chunks            this rank's chunks, chunk c at index c + 1 (luatron.GPTChunk)
--   rank              this rank's pipeline rank
--   tokens(m)         int32 [b, s] input ids of microbatch m (first stage)
--   targets(m)        int32 [b, s] its next-token targets (last stage)
--   seed(m)           its dropout seed (training mode); no env.seed: eval mode, no dropout
--                     (evaluation, as Megatron's model.eval())
--   loss_scale(n, m)  the gradient of each token's loss, n valid tokens in microbatch m (this rank's)
--   link(kind, src, dst)   the communicator of messages of kind "activation" / "gradient" from
--                     pipeline rank src to dst (nil with one stage)
--   buffer()          an empty [s, b, h] tensor to receive into (dtype and device of the chunks)
--   last_backward(c)  called before chunk c's last backward (its gradients may start reducing)
--   clock()           seconds, for the timeline (optional)
-- Returns the last stage's per-token losses and valid-token counts per microbatch,
-- { [m] = { losses = tensor, valid = n } } (empty elsewhere), and when env.clock is given the
-- timeline: { {kind = "F" | "B" | "recv", m =, c =, start =, finish =}, ... } (the compute steps,
-- and the waits for what they receive).
local M = {}

-- Tensors are freed as soon as they are done with, not left to the garbage collector, which
-- does not see their size. Sends still in flight: { {req =, tensor =}, ... }; `all` waits for
-- every one, otherwise only finished ones are collected.
local function collect(in_flight, all)
  local left = {}
  for _, s in ipairs(in_flight) do
    if all or s.req:test() then
      s.req:wait()
      s.tensor:free()
    else
      left[#left + 1] = s
    end
  end
  return left
end

-- The other member of a link (a communicator of two ranks).
local function peer(link) return 1 - link:rank() end

function M.run(plan, env)
  local chunks, nchunks, me = env.chunks, #env.chunks, env.rank
  local ctx, valid, results, in_flight = {}, {}, {}, {}
  local timeline = env.clock and {} or nil
  local function mark(kind, m, c, start)
    if timeline then timeline[#timeline + 1] = { kind = kind, m = m, c = c, start = start, finish = env.clock() } end
  end
  for _, step in ipairs(plan.steps) do
    local kind, m, c = step[1], step[2], step[3]
    local message = kind == "F" and "activation" or "gradient"
    local recv
    if step.from then
      local t0 = timeline and env.clock()
      recv = env.buffer()
      local link = env.link(message, step.from, me)
      link:batch_p2p { { "recv", recv, peer(link) } }
      mark("recv", m, c, t0)
    end
    local chunk, key = chunks[c + 1], m * nchunks + c
    local stage = chunk:stage()
    local t0 = timeline and env.clock()
    local out
    if kind == "F" then
      local n
      out, ctx[key], n = chunk:forward(recv or env.tokens(m), stage.post_process and env.targets(m) or nil,
        env.seed and env.seed(m))
      if plan.forward_only then -- no backward: keep no activations
        ctx[key]:release()
        ctx[key] = nil
      end
      if stage.post_process then
        valid[m] = n
        results[m] = { losses = out, valid = n }
        out = nil
      end
    else
      if step.last and env.last_backward then env.last_backward(c) end
      out = chunk:backward(ctx[key], recv or env.loss_scale(valid[m], m))
      ctx[key] = nil
    end
    mark(kind, m, c, t0)
    if recv then recv:free() end
    if step.to then
      local link = env.link(message, me, step.to)
      in_flight[#in_flight + 1] = { req = link:batch_p2p_async { { "send", out, peer(link) } }, tensor = out }
    elseif out then
      out:free()
    end
    in_flight = collect(in_flight)
  end
  collect(in_flight, true)
  return results, timeline
end

return M

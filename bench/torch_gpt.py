#!/usr/bin/env python3
"""Reference GPT training step in PyTorch: the luatron benchmark model.

GPT-2 style: learned token + position embeddings, pre-LayerNorm blocks (eps 1e-5, with bias),
fused QKV linear (with bias) + causal softmax attention, output projection, 4x MLP with exact GELU,
final LayerNorm, tied embeddings (logits = h @ wte^T), cross-entropy loss, AdamW (lr 1e-4,
weight decay 0.01), fp32, init normal(0, 0.02) for weights, zeros for biases, no dropout.

Times forward + backward + optimizer step after warm-up and prints the median, then a final line
    RESULT {"ms_per_step": ..., "tokens_per_s": ..., "params": N}

Run it with Debian's /usr/bin/python3 and OMP_WAIT_POLICY=PASSIVE in the environment (bench/run.sh
does this): that is PyTorch's best setting on these machines.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def main():
    args = parse_args()
    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except Exception as e:  # ImportError, or a broken install
        print("PyTorch not installed (import torch failed: %s)" % e)
        print('RESULT {"error": "PyTorch not installed"}')
        return 2

    if args.hidden % args.heads:
        print("hidden must be divisible by heads", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    have_sdpa = hasattr(F, "scaled_dot_product_attention")  # not in 1.13; used where it exists

    class Block(nn.Module):
        def __init__(self, C, H, T):
            super().__init__()
            self.H = H
            self.ln1 = nn.LayerNorm(C, eps=1e-5)
            self.qkv = nn.Linear(C, 3 * C)
            self.proj = nn.Linear(C, C)
            self.ln2 = nn.LayerNorm(C, eps=1e-5)
            self.fc1 = nn.Linear(C, 4 * C)
            self.fc2 = nn.Linear(4 * C, C)
            # additive causal mask: 0 on/below the diagonal, -inf above
            mask = torch.full((T, T), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

        def attn(self, x):
            B, T, C = x.shape
            H = self.H
            hd = C // H
            q, k, v = self.qkv(x).split(C, dim=2)
            q = q.view(B, T, H, hd).transpose(1, 2)
            k = k.view(B, T, H, hd).transpose(1, 2)
            v = v.view(B, T, H, hd).transpose(1, 2)
            if have_sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                # scores = mask + (q k^T) / sqrt(hd), in one baddbmm
                qf = q.reshape(B * H, T, hd)
                kf = k.reshape(B * H, T, hd)
                vf = v.reshape(B * H, T, hd)
                att = torch.baddbmm(self.mask[:T, :T].expand(B * H, T, T), qf, kf.transpose(1, 2),
                                    beta=1.0, alpha=1.0 / math.sqrt(hd))
                att = torch.softmax(att, dim=-1)
                y = torch.bmm(att, vf).view(B, H, T, hd)
            y = y.transpose(1, 2).reshape(B, T, C)
            return self.proj(y)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # exact (erf) GELU
            return x

    class GPT(nn.Module):
        def __init__(self, L, C, H, T, V):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(T, C)
            self.blocks = nn.ModuleList([Block(C, H, T) for _ in range(L)])
            self.ln_f = nn.LayerNorm(C, eps=1e-5)
            self.register_buffer("pos", torch.arange(T), persistent=False)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif ".ln" in name or name.startswith("ln_f"):
                    nn.init.ones_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            B, T = idx.shape
            x = self.wte(idx) + self.wpe(self.pos[:T])
            for blk in self.blocks:
                x = blk(x)
            x = self.ln_f(x)
            logits = F.linear(x, self.wte.weight)  # tied embeddings: h @ wte^T
            return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))

    L, C, H, T, V, B = args.layers, args.hidden, args.heads, args.seq, args.vocab, args.batch
    model = GPT(L, C, H, T, V)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    except TypeError:  # very old torch without foreach=
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    g = torch.Generator().manual_seed(args.seed)
    n_total = args.warmup + args.steps
    data = torch.randint(0, V, (n_total, B, T + 1), generator=g)
    xs = data[:, :, :-1].contiguous()
    ys = data[:, :, 1:].contiguous()

    def step(i):
        loss = model(xs[i], ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    print("torch %s, threads %d, OMP_WAIT_POLICY=%s, attention=%s" % (
        torch.__version__, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "sdpa" if have_sdpa else "baddbmm+softmax"))
    print("model: layers %d hidden %d heads %d seq %d vocab %d batch %d, params %d" % (
        L, C, H, T, V, B, n_params))

    times = []
    for i in range(n_total):
        t0 = time.perf_counter()
        loss = step(i)
        dt = (time.perf_counter() - t0) * 1e3
        if i >= args.warmup:
            times.append(dt)
        print("step %d%s: loss %.4f, %.1f ms" % (i, " (warm-up)" if i < args.warmup else "", loss, dt))
        if not math.isfinite(loss):
            print("non-finite loss", file=sys.stderr)
            return 1

    ms = statistics.median(times) if times else float("nan")
    tok_s = B * T / (ms / 1e3)
    print("median %.2f ms/step over %d steps (min %.2f, max %.2f), %.0f tokens/s" % (
        ms, len(times), min(times), max(times), tok_s))
    print("RESULT " + json.dumps({"ms_per_step": round(ms, 3), "tokens_per_s": round(tok_s, 1),
                                  "params": n_params}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

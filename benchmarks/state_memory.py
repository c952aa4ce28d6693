"""Optimizer-state bytes of LisaAdamW (γ=2, K=5) over 100 steps next to torch AdamW on all parameters.

    python benchmarks/state_memory.py                 # SmolLM2-135M and a tiny llama
    python benchmarks/state_memory.py --models tiny   # the tiny model only (seconds)

For each model it trains LisaAdamW (uniform sampling, state_policy=drop) for --steps steps on random
tokens (batch 2 x 64 by default: the state does not depend on the batch) and samples
`LisaAdamW.state_bytes()` at every step, at the moment the inner AdamW has just updated (a step-post
hook, before any switch frees the frozen blocks' state: the most it holds during that step). It also
runs torch.optim.AdamW on every parameter of a copy of the model for a few steps and counts the same
way. Exit status 1 if LISA's state is not flat over >= 10 switches.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from lisatune.analysis.memory import load_bench_model
from lisatune.recipe.meter import optimizer_state_bytes
from lisatune import LisaAdamW


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def run(name: str, steps: int, gamma: int, interval: int, batch: int, seq: int) -> bool:
    t0 = time.perf_counter()
    model, vocab = load_bench_model(name)
    base = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(4)]

    opt = LisaAdamW(model, n_layers=gamma, interval=interval, lr=1e-5, seed=0)
    held: list[int] = []  # state at the end of each update, before a switch frees anything
    opt.inner.register_step_post_hook(lambda *_: held.append(opt.state_bytes()))
    after: list[int] = []  # state once step() returns (after a switch: always-on parameters only)
    for i in range(steps):
        ids = data[i % len(data)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        after.append(opt.state_bytes())
        if (i + 1) % 20 == 0:
            print(f"  {name}: step {i + 1}/{steps}", file=sys.stderr, flush=True)
    switches = len(opt.history) - 1

    adam = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-5)
    for i in range(3):
        ids = data[i]
        base(input_ids=ids, labels=ids).loss.backward()
        adam.step()
        adam.zero_grad()
    full = optimizer_state_bytes(adam)
    hand = 2 * n_params * 4 + 4 * n_tensors  # exp_avg + exp_avg_sq in fp32, one fp32 `step` per tensor

    flat = min(held) == max(held)
    print(f"\n## {name}: {n_params:,} parameters in {n_tensors} tensors, {opt.layers.n_blocks} blocks; "
          f"LisaAdamW γ={gamma}, K={interval}, {steps} steps ({switches} switches), batch {batch} x {seq}")
    print(f"torch AdamW, all parameters:   {full:>14,} B  ({mib(full)}; 2 x params x 4 B + 4 B x tensors = {hand:,})")
    print(f"LisaAdamW held at each update: min {min(held):,} B, max {max(held):,} B, final {held[-1]:,} B "
          f"({mib(max(held))})")
    print(f"LisaAdamW right after a switch: {min(after):,} B (always-on parameters only, until the next update)")
    print(f"ratio LISA / AdamW: {max(held) / full:.4f} (max), {held[-1] / full:.4f} (final)")
    print(f"flat over {switches} switches: {'yes' if flat else 'NO'}   ({time.perf_counter() - t0:.0f} s)")
    return flat and switches >= 10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny:8"], help="smollm2, tiny[:N_LAYERS], or HF model dirs")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args(argv)
    ok = all([run(m, a.steps, a.gamma, a.interval, a.batch, a.seq) for m in a.models])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

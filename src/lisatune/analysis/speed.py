"""Step time per method: forward, backward and optimizer step, methods interleaved in one process.

Every method trains its own copy of the same model on the same batches. The timed steps go round-robin
(method A step, method B step, ..., and the order rotates every round), so drift from other processes
on the machine hits every method alike; medians over the timed steps, ratios to full fine-tuning.

Beside each measured ratio stands a FLOP floor counted from the step itself: forward hooks on every
nn.Linear (the lm_head included) add its weight size to the forward cost, to the backward-to-input cost
when its input requires grad, and to the weight-gradient cost when its weight requires grad. A full
step costs 1 + 1 + 1 (per weight: forward, input gradient, weight gradient); with the embedding trained
LISA costs 1 + 1 + a (a = its share of the matmul weights that are active), i.e. floor = (2 + a) / 3; with
embedding and head frozen, nothing below the lowest active block requires grad, so autograd never goes
there and the input-gradient term shrinks too. Attention's score/value products (no weights), the
embedding lookup and the optimizer are left out of the floor.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine import find_layers
from ..methods import build_method
from ..recipe.allocator import release_freed_memory
from ..recipe.models import cached_source
from ..schema import output_dir
from .memory import DEFAULT_METHODS, load_bench_model, parse_method
from ..recipe.meter import token_batches
from .plots import pyplot, save_figure

SPEED_METHODS = ["full", "lora", "galore", "lisa", "lisa-frozen"]


class FlopCounter:
    """Per step: matmul weight elements in forward, in backward-to-input and in weight-gradient work;
    and the lowest block whose input requires grad (where backward stops)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.fwd = self.bwd_in = self.bwd_w = 0
        self.lowest: int | None = None
        self._h = []
        for m in model.modules():
            if isinstance(m, nn.Linear):
                self._h.append(m.register_forward_hook(self._linear))
        for i, b in enumerate(blocks):
            self._h.append(b.register_forward_pre_hook(self._block(i), with_kwargs=True))

    def _linear(self, mod, args, _out):
        n = mod.weight.numel()
        self.fwd += n
        if torch.is_grad_enabled():
            self.bwd_in += n if args and torch.is_tensor(args[0]) and args[0].requires_grad else 0
            self.bwd_w += n if mod.weight.requires_grad else 0

    def _block(self, i):
        def pre(_mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            trains = any(p.requires_grad for p in _mod.parameters())
            if torch.is_grad_enabled() and ((torch.is_tensor(h) and h.requires_grad) or trains):
                self.lowest = i if self.lowest is None else min(self.lowest, i)
        return pre

    def reset(self):
        self.fwd = self.bwd_in = self.bwd_w = 0
        self.lowest = None

    def remove(self):
        for h in self._h:
            h.remove()


@dataclass
class MethodSpeed:
    label: str
    method: str
    options: dict
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    optim: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # (fwd + bwd_in + bwd_w) / (3 x full forward)
    lowest_block: list[int] = field(default_factory=list)  # where backward stops, per step
    n_blocks: int = 0

    @property
    def total(self) -> list[float]:
        return [a + b + c for a, b, c in zip(self.forward, self.backward, self.optim)]

    def med(self, what: str) -> float:
        return statistics.median(getattr(self, what))


def run_speed(model_name: str = "smollm2", methods: list[str] | None = None, batch: int = 4, seq: int = 256,
              steps: int = 20, warmup: int = 2, gradient_checkpointing: bool = False, lr: float = 1e-5,
              log=print, on_round=None, release_memory: bool = False) -> list[MethodSpeed]:
    """on_round(results) is called after every timed round (e.g. to save partial results).
    release_memory: a fixed glibc mmap threshold, as train.release_memory: true sets (lisatune.allocator)."""

    methods = methods or SPEED_METHODS
    if release_memory:
        release_freed_memory()
    base, vocab = load_bench_model(cached_source(model_name), gradient_checkpointing)
    data = token_batches(vocab, batch, seq, n=4)
    runs = []
    for spec in methods:
        label, name, opts = parse_method(spec)
        method = build_method(name, opts)
        model = method.prepare(copy.deepcopy(base))
        model.train()
        opt = method.optimizer(model, lr=lr, weight_decay=0.0)
        lm = find_layers(model)
        blocks = list(model.get_submodule(lm.blocks_path))
        res = MethodSpeed(label=label, method=name, options=opts, n_blocks=len(blocks))
        runs.append((res, model, opt, FlopCounter(model, blocks)))
    del base
    full_fwd = None
    for r in range(warmup + steps):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # rotate: no method always runs first
        for res, model, opt, fc in order:
            ids = data[r % len(data)]
            fc.reset()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if r < warmup:
                continue
            res.forward.append(t1 - t0)
            res.backward.append(t2 - t1)
            res.optim.append(t3 - t2)
            full_fwd = full_fwd or fc.fwd
            res.flops.append((fc.fwd + fc.bwd_in + fc.bwd_w) / (3 * fc.fwd))
            res.lowest_block.append(fc.lowest if fc.lowest is not None else res.n_blocks)
        if r >= warmup:
            if on_round is not None:
                on_round([res for res, *_ in runs])
            log(f"  round {r - warmup + 1}/{steps}: " + ", ".join(f"{res.label} {res.total[-1]:.2f}s"
                                                               for res, *_ in runs))
    for *_, fc in runs:
        fc.remove()
    return [res for res, *_ in runs]


def markdown(results: list[MethodSpeed], title: str = "") -> str:
    full = next((m for m in results if m.method == "full"), None)
    lora = next((m for m in results if m.method == "lora"), None)
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | forward s | backward s | optimizer s | step s | step / full | step / LoRA | "
              "FLOP floor / full | backward stops at block (mean) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        step = m.med("total")
        rf = f"{step / full.med('total'):.3f}" if full else "–"
        rl = f"{step / lora.med('total'):.3f}" if lora else "–"
        lines.append(f"| {m.label} | {m.med('forward'):.3f} | {m.med('backward'):.3f} | {m.med('optim'):.3f} | "
                     f"{step:.3f} | {rf} | {rl} | {statistics.mean(m.flops):.3f} | "
                     f"{statistics.mean(m.lowest_block):.1f} of {m.n_blocks} |")
    n = len(results[0].forward) if results else 0
    lines += ["", f"Medians over {n} timed steps per method, methods interleaved round-robin in one process."]
    return "\n".join(lines) + "\n"


def plot(results: list[MethodSpeed], path: str | os.PathLike, title: str = "") -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(len(results))
    bottom = [0.0] * len(results)
    for key, color in [("forward", "#4c72b0"), ("backward", "#dd8452"), ("optim", "#55a868")]:
        vals = [m.med(key) for m in results]
        ax.bar(x, vals, bottom=bottom, color=color, label="optimizer step" if key == "optim" else key)
        bottom = [b + v for b, v in zip(bottom, vals)]
    full = next((m for m in results if m.method == "full"), None)
    if full:
        ft = full.med("total")
        ax.scatter(list(x), [statistics.mean(m.flops) * ft for m in results], marker="_", s=900, color="black",
                   zorder=3, label="FLOP floor × full step")
    ax.set_xticks(list(x), [m.label for m in results], rotation=20, ha="right")
    ax.set_ylabel("median seconds per step")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def bench_speed(model_name: str = "smollm2", methods: list[str] | None = None, batch: int = 4, seq: int = 256,
                steps: int = 20, warmup: int = 2, gradient_checkpointing: bool = False,
                out_dir: str | os.PathLike = "bench-out", log=print, release_memory: bool = False) -> dict:
    """Writes speed.md, speed.json and speed.png into out_dir."""
    out = output_dir(out_dir)
    title = (f"{model_name}, batch {batch} x {seq}, gradient checkpointing {'on' if gradient_checkpointing else 'off'}, "
             f"{torch.get_num_threads()} threads, {'fixed mmap threshold' if release_memory else 'glibc default malloc'}")
    log(title)

    def save(res: list[MethodSpeed]) -> str:  # after every round: a long run interrupted still reports
        md = markdown(res, title)
        (out / "speed.md").write_text(md)
        (out / "speed.json").write_text(json.dumps({"title": title, "methods": [asdict(m) for m in res]}, indent=1))
        plot(res, out / "speed.png", title)
        return md

    res = run_speed(model_name, methods, batch, seq, steps, warmup, gradient_checkpointing, log=log, on_round=save,
                    release_memory=release_memory)
    return {"results": res, "markdown": save(res), "dir": out}


__all__ = ["run_speed", "bench_speed", "markdown", "plot", "MethodSpeed", "FlopCounter", "DEFAULT_METHODS"]

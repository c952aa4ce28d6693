"""Where the memory of a fine-tuning step goes, per method: counted exactly from the tensors held.

For each method on the same model, batch and sequence length:

* weights, gradients, optimizer state: bytes of the unique storages the model's parameters, their
  ``.grad`` and everything reachable from the optimizer's state hold (a tensor shared by two owners, such
  as a tied embedding/head, counts once; GaLore's projection matrices count as state);
* activations: the unique storages autograd saves for backward during the forward pass (caught with
  ``torch.autograd.graph.saved_tensors_hooks``; parameters saved by a matmul are weights, not
  activations). With gradient checkpointing, autograd inside a block saves nothing we can see (the
  checkpoint's own hooks take over), so the block inputs it keeps for recomputation are counted instead
  (forward pre-hooks on the blocks); the one block recomputed at a time during backward is not;
* peak RSS: in a separate process per method (``python -m lisatune.analysis.memory --worker SPEC``), the
  high-water mark of resident memory over the training steps only (reset after the model is loaded,
  through ``/proc/self/clear_refs``), beside ``ru_maxrss`` of the whole process and the RSS of the bare
  runtime (torch + transformers imported, no model).

LISA is measured over >= 10 switches; its optimizer state is sampled at every step when the inner AdamW
has just updated (the most it holds in that step) and must be flat for the drop/offload policies.

On CUDA (``--device cuda``) the same counts are taken on the device, and ``torch.cuda.max_memory_allocated``
and ``max_memory_reserved`` are read per phase of the step (forward, backward, optimizer step, LISA's switch;
meter.PhaseMemory, which `lisatune train` uses too) and overall.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine import LisaOptimizer
from ..errors import LisaError
from ..schema import output_dir, parse_yaml
from ..methods import build_method
from ..recipe.allocator import release_freed_memory
from ..recipe.loss import held_hidden_grads, pick_loss
from ..recipe.models import ModelConfig, cached_source, enable_checkpointing, load_model
from ..recipe.meter import (MIB, PHASES, ActivationMeter, PhaseMemory, checkpointed_blocks, grad_bytes, maxrss_bytes,
                    optimizer_state_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, token_batches, unique_bytes,
                    weight_bytes)
from .plots import pyplot, save_figure
from .tiny import tiny_model


# Method presets (name -> (method, options)); any entry may be refined as "name:key=value,key=value".
PRESETS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "lora": ("lora", {"r": 8}),
    "galore": ("galore", {"rank": 128}),
    "lisa": ("lisa", {"n_layers": 2, "interval": 5, "state_policy": "drop"}),
    "lisa-keep": ("lisa", {"n_layers": 2, "interval": 5, "state_policy": "keep"}),
    "lisa-offload": ("lisa", {"n_layers": 2, "interval": 5, "state_policy": "offload"}),
    "lisa-frozen": ("lisa", {"n_layers": 2, "interval": 5, "train_embedding": False, "train_head": False}),
}
DEFAULT_METHODS = ["full", "lora", "galore", "lisa", "lisa-keep"]


# -- models ---------------------------------------------------------------------------------------
def load_bench_model(name: str = "smollm2", gradient_checkpointing: bool = False) -> tuple[nn.Module, int]:
    """(model in train mode, vocab size) for "smollm2", "tiny" / "tiny:N_LAYERS", or a HF model dir / .gguf."""
    if name == "tiny" or name.startswith("tiny:"):
        n = name.partition(":")[2] or "4"
        if not n.isdigit() or int(n) < 1:
            raise LisaError(f"--model '{name}': expected tiny or tiny:N_LAYERS with N_LAYERS >= 1")
        model = tiny_model("llama", int(n), max_positions=1024)
        if gradient_checkpointing:
            enable_checkpointing(model)
    else:
        model, _ = load_model(ModelConfig.build(source=name, gradient_checkpointing=gradient_checkpointing))
    model.train()  # HF checkpoints blocks only in train mode (no dropout in these models)
    return model, int(model.config.vocab_size)


def bench_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise LisaError(f"--device '{device}' is not cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise LisaError("--device cuda: torch sees no CUDA device")
    return torch.device(device)


def parse_method(spec: str) -> tuple[str, str, dict]:
    """"lisa:n_layers=4,state_policy=keep" -> (label, method name, options) over the presets."""
    head, _, rest = spec.partition(":")
    if head in PRESETS:
        name, opts = PRESETS[head][0], dict(PRESETS[head][1])
    else:
        name, opts = head, {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise LisaError(f"method spec '{spec}': '{item}' is not key=value")
        opts[key.strip()] = parse_yaml(value, f"method spec {spec!r}")
    return spec, name, opts


# -- one method -----------------------------------------------------------------------------------
@dataclass
class MethodMemory:
    label: str
    method: str
    options: dict
    steps: int
    weights: int = 0
    grads: int = 0  # the most held after any backward
    state: int = 0  # the most held during any step
    activations: int = 0  # the most saved by any forward
    loss_held: int = 0  # fused loss: its gradient of the hidden states, held from forward to backward (not in sum)
    trainable: int = 0  # parameters updated in a step (the most in any step)
    state_per_step: list[int] = field(default_factory=list)
    switches: int = 0
    state_flat: bool | None = None  # LISA only
    bound: int | None = None  # weights + activations + grads and state of the trainable set
    runtime_rss: int | None = None  # the process before loading the model (torch etc. imported)
    loaded_rss: int | None = None  # after loading the model
    peak_rss: int | None = None  # high-water mark over the training steps
    maxrss: int | None = None  # ru_maxrss: whole process, model loading included
    seconds: float = 0.0
    device: str = "cpu"
    device_peaks: dict | None = None  # CUDA: PhaseMemory.summary(), MiB overall and per phase

    @property
    def accounted(self) -> int:
        return self.weights + self.grads + self.state + self.activations

    @property
    def unaccounted(self) -> int | None:
        """Peak RSS beyond the runtime and the counted tensors: backward's transient buffers (e.g. the
        logits' gradient), a checkpointed block's recomputation, allocator retention."""
        if self.peak_rss is None or self.runtime_rss is None:
            return None
        return self.peak_rss - self.runtime_rss - self.accounted


def measure_method(spec: str, model_name: str = "tiny", batch: int = 4, seq: int = 256, steps: int = 3,
                   gradient_checkpointing: bool = False, switches: int = 10, model: nn.Module | None = None,
                   vocab: int | None = None, runtime_rss: int | None = None, loss: str = "fused",
                   release_memory: bool = False, device: str = "cpu") -> MethodMemory:
    """Train one method for `steps` steps (LISA: enough for `switches` switches) and count its memory.
    loss: "fused" (head + cross-entropy in chunks, as `lisatune train` does) or "standard" (the model's own).
    release_memory: a fixed glibc mmap threshold, as train.release_memory: true sets (lisatune.allocator).
    device: "cpu", or "cuda" (also the allocator's peaks per phase)."""

    t0 = time.perf_counter()
    if release_memory:
        release_freed_memory()
    label, name, opts = parse_method(spec)
    dev = bench_device(device)
    if model is None:
        model, vocab = load_bench_model(model_name, gradient_checkpointing)
    loaded = rss_bytes()
    method = build_method(name, opts)
    model = method.prepare(model.to(dev))
    model.train()
    opt = method.optimizer(model, lr=1e-5, weight_decay=0.0)
    lisa = opt if isinstance(opt, LisaOptimizer) else None
    # Step 1 allocates the optimizer state only after backward freed the activations; from step 2 on
    # the state is held through forward and backward: one step would understate the peak.
    steps = max(steps, 2)
    if lisa is not None:
        steps = max(steps, lisa.config.interval * switches + 1)
    data = [x.to(dev) for x in token_batches(vocab, batch, seq)]
    probe = {"input_ids": data[0][:1], "attention_mask": None, "labels": data[0][:1]}
    loss_fn = pick_loss(model, probe, loss == "fused")
    blocks = checkpointed_blocks(model) if gradient_checkpointing else []
    m = MethodMemory(label=label, method=name, options=opts, steps=steps, runtime_rss=runtime_rss,
                     loaded_rss=loaded, weights=weight_bytes(model), device=dev.type)
    # Sample at the end of each update (before LisaAdamW's switch frees the frozen blocks' state); with 8-bit
    # always-on state, after its AdamW8bit (which steps after the inner optimizer).
    last = lisa.embed_head_optimizer if lisa is not None and lisa.embed_head_optimizer is not None else \
        lisa.inner if lisa is not None else opt
    handle = last.register_step_post_hook(lambda *_: m.state_per_step.append(optimizer_state_bytes(opt)))
    gc_reset = reset_peak_rss()
    mem = PhaseMemory(dev, opt)
    for i in range(steps):
        ids = data[i % len(data)]
        with mem.phase("forward"), ActivationMeter(model, blocks) as meter:
            value = loss_fn(model, ids, None, ids)
        m.activations = max(m.activations, meter.bytes)
        m.loss_held = max(m.loss_held, unique_bytes(held_hidden_grads(value)))  # no reference kept
        with mem.phase("backward"):
            value.backward()
            del value
        m.grads = max(m.grads, grad_bytes(model))
        m.trainable = max(m.trainable, sum(p.numel() for g in opt.param_groups for p in g["params"]
                                           if p.grad is not None))
        with mem.phase("step"):  # LISA's switch, at its end, is its own phase
            opt.step()
            opt.zero_grad(set_to_none=True)
    handle.remove()
    mem.close()
    m.device_peaks = mem.summary() if mem.cuda else None
    m.state = max(m.state_per_step)
    m.peak_rss = peak_rss_bytes() if gc_reset else None
    m.maxrss = maxrss_bytes()
    if lisa is not None:
        m.switches = len(lisa.history) - 1
        m.state_flat = min(m.state_per_step) == max(m.state_per_step)
        # Lower bound of a LISA step: weights, activations, and gradients + AdamW state (exp_avg,
        # exp_avg_sq and a 4-byte step per tensor) of the trainable set only.
        n_tensors = max(sum(1 for g in lisa.param_groups for _ in g["params"]), 0)
        m.bound = m.weights + m.activations + 3 * 4 * m.trainable + 4 * n_tensors
    else:
        m.bound = m.accounted
    m.seconds = time.perf_counter() - t0
    return m


# -- all methods ----------------------------------------------------------------------------------
WORKER_ERROR = "lisatune worker error: "  # how a worker hands a LisaError to its parent (stderr, one line)


def _worker_cmd(spec: str, a: dict) -> list[str]:
    # The worker uses this process's torch thread count (the tests run with 1 thread).
    arg = {"spec": spec, "threads": torch.get_num_threads(), **a}
    return [sys.executable, "-m", "lisatune.analysis.memory", "--worker", json.dumps(arg)]


def run_memory(model_name: str = "smollm2", methods: list[str] | None = None, batch: int = 4, seq: int = 256,
               steps: int = 3, gradient_checkpointing: bool = False, switches: int = 10,
               isolate: bool = True, log=print, on_result=None, loss: str = "fused",
               release_memory: bool = False, device: str = "cpu") -> list[MethodMemory]:
    """Measure every method; isolate=True runs each in its own process (needed for a meaningful RSS)."""
    methods = methods or DEFAULT_METHODS
    bench_device(device)  # refused here, before any worker starts
    kw = {"model_name": model_name, "batch": batch, "seq": seq, "steps": steps,
          "gradient_checkpointing": gradient_checkpointing, "switches": switches, "loss": loss,
          "release_memory": release_memory, "device": device}
    out = []
    if isolate:
        kw["model_name"] = cached_source(model_name)  # the workers never dequantize a GGUF
    else:
        base, vocab = load_bench_model(model_name, gradient_checkpointing)
    for spec in methods:
        if isolate:
            r = subprocess.run(_worker_cmd(spec, kw), capture_output=True, text=True)
            if r.returncode != 0:
                said = [ln for ln in r.stderr.splitlines() if ln.startswith(WORKER_ERROR)]
                if said:  # a bad setting, as one line
                    raise LisaError(said[-1].removeprefix(WORKER_ERROR))
                raise LisaError(f"memory worker for '{spec}' failed:\n{r.stderr[-3000:]}")
            m = MethodMemory(**json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            m = measure_method(spec, model=copy.deepcopy(base), vocab=vocab, **kw)
        dev = f", peak allocated {m.device_peaks['peak_allocated_mib']:,.0f} MiB" if m.device_peaks else ""
        log(f"  {spec}: state {m.state / MIB:.1f} MiB, grads {m.grads / MIB:.1f} MiB, activations "
            f"{m.activations / MIB:.1f} MiB, peak RSS {(m.peak_rss or 0) / MIB:.0f} MiB{dev} ({m.steps} steps, "
            f"{m.seconds:.0f} s)")
        out.append(m)
        if on_result is not None:
            on_result(out)
    return out


def check_flat(results: list[MethodMemory]) -> list[str]:
    """Problems: a drop/offload LISA run whose state was not flat or that saw fewer than 10 switches."""
    bad = []
    for m in results:
        if m.method == "lisa" and m.options.get("state_policy", "drop") != "keep":
            if not m.state_flat:
                bad.append(f"{m.label}: optimizer state not flat ({min(m.state_per_step):,}..{max(m.state_per_step):,} B)")
            if m.switches < 10:
                bad.append(f"{m.label}: only {m.switches} switches")
    return bad


def _mib(v: int | None) -> str:
    return "–" if v is None else f"{v / MIB:,.1f}"


def markdown(results: list[MethodMemory], title: str = "") -> str:
    full = next((m for m in results if m.method == "full"), None)
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | weights MiB | grads MiB | optimizer state MiB | activations MiB | sum MiB | "
              "peak RSS MiB (training) | not counted MiB | ru_maxrss MiB | state / full | peak RSS / full | "
              "state per step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in results:
        sr = f"{m.state / full.state:.3f}" if full and full.state else "–"
        rr = f"{m.peak_rss / full.peak_rss:.3f}" if full and full.peak_rss and m.peak_rss else "–"
        if m.method == "lisa":
            s = m.state_per_step
            flat = "flat" if m.state_flat else f"grows {min(s) / MIB:.1f}→{max(s) / MIB:.1f} MiB"
            per = f"{flat} over {m.switches} switches ({len(s)} steps)"
        else:
            per = "constant" if len(set(m.state_per_step)) <= 1 else "varies"
        lines.append(f"| {m.label} | {_mib(m.weights)} | {_mib(m.grads)} | {_mib(m.state)} | {_mib(m.activations)} "
                     f"| {_mib(m.accounted)} | {_mib(m.peak_rss)} | {_mib(m.unaccounted)} | {_mib(m.maxrss)} | {sr} "
                     f"| {rr} | {per} |")
    runtime = next((m.runtime_rss for m in results if m.runtime_rss), None)
    lisas = [m for m in results if m.method == "lisa" and m.bound]
    if lisas:
        lines += ["", "LISA lower bound = weights + activations + grads and AdamW state of the trainable set only:", "",
                  "| method | bound MiB | peak RSS MiB | peak RSS / bound | (peak RSS − runtime) / bound |",
                  "|---|---:|---:|---:|---:|"]
        for m in lisas:
            r1 = f"{m.peak_rss / m.bound:.2f}" if m.peak_rss else "–"
            r2 = f"{(m.peak_rss - runtime) / m.bound:.2f}" if m.peak_rss and runtime else "–"
            lines.append(f"| {m.label} | {_mib(m.bound)} | {_mib(m.peak_rss)} | {r1} | {r2} |")
    if runtime:
        lines += ["", f"Runtime RSS before loading the model (python + torch + transformers): {_mib(runtime)} MiB."]
    cuda = [m for m in results if m.device_peaks]
    if cuda:
        lines += ["", "CUDA allocator peaks (torch.cuda.max_memory_allocated, reserved in brackets), MiB, per phase:",
                  "", "| method | " + " | ".join(PHASES) + " | peak allocated | peak reserved |",
                  "|---|" + "---:|" * (len(PHASES) + 2)]
        for m in cuda:
            d, ph = m.device_peaks, m.device_peaks["phases"]
            cells = [f"{ph[p]['peak_allocated_mib']:,.1f} ({ph[p]['peak_reserved_mib']:,.1f})" for p in PHASES]
            lines.append(f"| {m.label} | " + " | ".join(cells) + f" | {d['peak_allocated_mib']:,.1f} | "
                         f"{d['peak_reserved_mib']:,.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[MethodMemory]], path: str | os.PathLike) -> Path:
    """Stacked bars (weights, grads, state, activations) per method, one panel per setting; a marker at
    the training peak RSS above the bare runtime's RSS."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False, sharey=True)
    parts = [("weights", "#4c72b0"), ("grads", "#dd8452"), ("state", "#55a868"), ("activations", "#c44e52")]
    for ax, (title, res) in zip(axes[0], runs.items()):
        x = range(len(res))
        bottom = [0.0] * len(res)
        for key, color in parts:
            vals = [getattr(m, key) / MIB for m in res]
            ax.bar(x, vals, bottom=bottom, color=color, label=key if ax is axes[0][0] else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
        # RSS beyond the bare runtime (python + torch), comparable with the counted bytes; only known when
        # each method ran in its own process
        peaks = [(i, (m.peak_rss - m.runtime_rss) / MIB) for i, m in enumerate(res) if m.peak_rss and m.runtime_rss]
        if peaks:
            ax.scatter([i for i, _ in peaks], [v for _, v in peaks], marker="_", s=900, color="black", zorder=3,
                       label="peak RSS − runtime RSS" if ax is axes[0][0] else None)
        ax.set_xticks(list(x), [m.label for m in res], rotation=20, ha="right")
        ax.set_title(textwrap.fill(title, 60), fontsize=9)
        ax.set_ylabel("MiB")
    fig.legend(loc="lower center", ncol=5, fontsize=8)
    return save_figure(fig, path, rect=(0, 0.06, 1, 1))


def bench_memory(model_name: str = "smollm2", methods: list[str] | None = None, batch: int = 4, seq: int = 256,
                 steps: int = 3, checkpointing: list[bool] = (False,), switches: int = 10,
                 out_dir: str | os.PathLike = "bench-out", isolate: bool = True, log=print,
                 loss: str = "fused", release_memory: bool = False, device: str = "cpu") -> dict:
    """Every setting of gradient checkpointing x every method: writes memory.md, memory.json, memory.png."""
    out = output_dir(out_dir)
    runs: dict[str, list[MethodMemory]] = {}

    def save() -> tuple[str, list[str]]:  # after every method: a long run interrupted still reports
        md = "".join(markdown(r, t) + "\n" for t, r in runs.items() if r)
        problems = [p for r in runs.values() for p in check_flat(r)]
        if problems:
            md += "\n**Not flat:** " + "; ".join(problems) + "\n"
        (out / "memory.md").write_text(md)
        (out / "memory.json").write_text(json.dumps({t: [asdict(m) for m in r] for t, r in runs.items()}, indent=1))
        plot({t: r for t, r in runs.items() if r}, out / "memory.png")
        return md, problems

    for gc in checkpointing:
        malloc = "freed memory released (fixed mmap threshold)" if release_memory else "glibc default malloc"
        title = (f"{model_name}, batch {batch} x {seq}, gradient checkpointing {'on' if gc else 'off'}, {loss} loss, "
                 f"{malloc}" + (", on CUDA" if device == "cuda" else ""))
        log(title)
        runs[title] = []
        runs[title] = run_memory(model_name, methods, batch, seq, steps, gc, switches, isolate, log,
                                 on_result=lambda res, t=title: (runs.__setitem__(t, list(res)), save()), loss=loss,
                                 release_memory=release_memory, device=device)
    md, problems = save()
    return {"runs": runs, "markdown": md, "problems": problems, "dir": out}


def _worker(arg: str) -> int:
    runtime = rss_bytes()
    a = json.loads(arg)
    torch.set_num_threads(a.pop("threads", torch.get_num_threads()))
    try:
        m = measure_method(a.pop("spec"), runtime_rss=runtime, **a)
    except LisaError as e:  # the parent prints it as the one line it is
        print(f"{WORKER_ERROR}{e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(m)))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, help="JSON: spec and measure_method keyword arguments")
    import logging
    logging.disable(logging.INFO)
    # Import what loading a model imports before sampling the runtime RSS.
    import transformers  # noqa: F401
    sys.exit(_worker(ap.parse_args().worker))

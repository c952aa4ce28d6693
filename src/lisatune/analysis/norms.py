"""Layerwise weight norms of LoRA and full fine-tuning (the LISA paper's Figure 2) and the LISA sampling
probabilities they suggest.

Both methods train a copy of the same model for N steps on the same batches; after every step each
layer's norms are recorded and then averaged over the steps. Layers: the embedding, each block, the head
(a tied head is the embedding). What is recorded, exactly:

* ``full_weight``  ‖θ_l‖: L2 norm of all parameters of layer l under full fine-tuning;
* ``full_update``  ‖θ_l − θ_l(0)‖ under full fine-tuning;
* ``lora_update``  ‖ΔW_l‖ = sqrt(Σ_m ‖B_m·A_m·scale‖_F²) over the adapted modules m of block l (peft's
  ``get_delta_weight``: the change LoRA makes to the block's weights); 0 for the embedding and head,
  which LoRA leaves frozen;
* ``lora_adapter`` sqrt(Σ_m ‖A_m‖_F² + ‖B_m‖_F²): the norm of the adapter parameters themselves
  (dominated by A's random initialisation; reported, not used);
* ``lora_weight``  ‖θ_l‖ of the LoRA-trained model with the update merged (= frozen weights for the
  embedding and head).

Probabilities (blocks only, the units LISA samples): p_l ∝ w̃_l / w_l with w̃_l = mean ``lora_update`` and
w_l = mean ``full_weight``, scaled so Σ_l p_l = γ, each clipped to 1 with the excess handed to the others
in proportion (so the expected number of active blocks per interval is exactly γ). The JSON written,
``{"probabilities": [...]}``, is what ``LisaAdamW(policy="bernoulli", probabilities=PATH)`` reads.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine import find_layers
from ..errors import LisaError
from ..methods import build_method
from ..schema import output_dir
from .plots import pyplot, save_figure

KINDS = ("full_weight", "full_update", "lora_update", "lora_adapter", "lora_weight")


def _l2(tensors) -> float:
    return math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors))


def layer_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"embedding": [...], "block0": [...], ..., "head": [...]} of a plain HF model (tied head = embedding)."""
    return {k: [p for _, p in v] for k, v in find_layers(model).units().items() if k != "norm"}


def _lora_modules(base: nn.Module) -> dict[str, list[nn.Module]]:
    from peft.tuners.lora import LoraLayer  # deferred: peft pulls in bitsandbytes (seconds)

    path = find_layers(base).blocks_path
    blocks = base.get_submodule(path)
    return {f"block{i}": [m for m in b.modules() if isinstance(m, LoraLayer)] for i, b in enumerate(blocks)}


@torch.no_grad()
def full_norms(model: nn.Module, initial: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, float]]:
    layers = layer_params(model)
    return {"full_weight": {k: _l2(v) for k, v in layers.items()},
            "full_update": {k: _l2([p - p0 for p, p0 in zip(v, initial[k])]) for k, v in layers.items()}}


@torch.no_grad()
def lora_norms(peft_model: nn.Module) -> dict[str, dict[str, float]]:
    base = peft_model.get_base_model()
    mods = _lora_modules(base)
    layers = layer_params(base)
    upd, ada, weight = {}, {}, {}
    for k, params in layers.items():
        ms = mods.get(k, [])
        deltas = [m.get_delta_weight(a) for m in ms for a in m.active_adapters if a in m.lora_A]
        upd[k] = _l2(deltas)
        ada[k] = _l2([m.lora_A[a].weight for m in ms for a in m.active_adapters if a in m.lora_A] +
                     [m.lora_B[a].weight for m in ms for a in m.active_adapters if a in m.lora_B])
        base_w = [p for p in params if p.requires_grad is False]  # base weights (adapters are trainable)
        weight[k] = math.sqrt(_l2(base_w) ** 2 + _l2(deltas) ** 2 + 2 * sum(
            float((m.get_base_layer().weight.float() * _oriented(m, d)).sum())
            for m, d in zip([m for m in ms for a in m.active_adapters if a in m.lora_A], deltas)))
    return {"lora_update": upd, "lora_adapter": ada, "lora_weight": weight}


def _oriented(m, delta):
    w = m.get_base_layer().weight
    return delta.float() if delta.shape == w.shape else delta.float().T


def _train(model, method, batches, steps, lr, record):
    opt = method.optimizer(model, lr=lr, weight_decay=0.0)
    model.train()
    rows = []
    for i in range(steps):
        ids = batches[i % len(batches)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append(record())
    return rows


def _mean(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {kind: {k: float(np.mean([r[kind][k] for r in rows])) for k in rows[0][kind]} for kind in rows[0]}


def record_norms(model: nn.Module, batches: list[torch.Tensor], steps: int = 20, lr_full: float = 1e-5,
                 lr_lora: float = 1e-4, lora_r: int = 8, log=print) -> dict[str, dict[str, float]]:
    """Mean over `steps` steps of each kind of norm (see the module doc), per layer; `model` is not modified."""
    if steps < 1:
        raise LisaError("norms: steps must be >= 1")
    full = build_method("full")
    m = full.prepare(copy.deepcopy(model))
    initial = {k: [p.detach().clone() for p in v] for k, v in layer_params(m).items()}
    log(f"  full fine-tuning, {steps} steps (lr {lr_full})")
    rows = _train(m, full, batches, steps, lr_full, lambda: full_norms(m, initial))
    del m
    lora = build_method("lora", {"r": lora_r})
    pm = lora.prepare(copy.deepcopy(model))
    log(f"  LoRA r={lora_r}, {steps} steps (lr {lr_lora})")
    rows_l = _train(pm, lora, batches, steps, lr_lora, lambda: lora_norms(pm))
    return {**_mean(rows), **_mean(rows_l)}


def scale_to_sum(weights, total: float) -> list[float]:
    """weights scaled to sum to `total` with every value <= 1: values clipped at 1 hand their excess to
    the others in proportion to their weights."""
    w = np.asarray(weights, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise LisaError("norms: weights must be finite and >= 0")
    if total > np.count_nonzero(w):
        raise LisaError(f"norms: γ = {total} exceeds the {np.count_nonzero(w)} layers with a non-zero weight")
    p = np.zeros_like(w)
    free = w > 0
    remaining = float(total)
    while free.any():
        q = w[free] * remaining / w[free].sum()
        over = q >= 1.0
        if not over.any():
            p[free] = q
            break
        idx = np.flatnonzero(free)[over]
        p[idx] = 1.0
        free[idx] = False
        remaining -= len(idx)
    return p.tolist()


def probabilities(norms: dict[str, dict[str, float]], gamma: int) -> list[float]:
    """p_l ∝ lora_update_l / full_weight_l over the blocks, Σ p_l = γ, each in [0, 1]."""
    blocks = [k for k in norms["full_weight"] if k.startswith("block")]
    ratio = [norms["lora_update"][k] / norms["full_weight"][k] if norms["full_weight"][k] > 0 else 0.0
             for k in blocks]
    if not any(r > 0 for r in ratio):
        raise LisaError("norms: LoRA did not change any block (lr 0 or no steps?); no probabilities to derive")
    return scale_to_sum(ratio, gamma)


def plot(norms: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    plt = pyplot()

    layers = list(norms["full_weight"])
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(7, len(layers) * 0.3), 4.5))
    styles = {"full_weight": ("full FT: ‖θ_l‖", "o-"), "full_update": ("full FT: ‖θ_l − θ_l(0)‖", "o--"),
              "lora_update": ("LoRA: ‖Σ B·A·scale‖", "s-"), "lora_adapter": ("LoRA: ‖A‖,‖B‖ (adapter params)", "s:")}
    for kind, (label, style) in styles.items():
        vals = [norms[kind][k] if norms[kind][k] > 0 else np.nan for k in layers]
        ax.plot(list(x), vals, style, label=label, markersize=3)
    ax.set_yscale("log")
    ticks = [i for i in x if i in (0, len(layers) - 1) or (i - 1) % max(1, len(layers) // 10) == 0]
    ax.set_xticks(ticks, [{"embedding": "E", "head": "H"}.get(layers[i], layers[i].replace("block", "")) for i in ticks])
    ax.set_xlabel("layer (E = embedding, blocks 0..N-1, H = head)")
    ax.set_ylabel("mean norm over steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def run_norms(model: nn.Module, batches: list[torch.Tensor], gamma: int = 2, steps: int = 20,
              out_dir: str | os.PathLike = "norms-out", lr_full: float = 1e-5, lr_lora: float = 1e-4,
              lora_r: int = 8, title: str = "", log=print) -> dict:
    """Writes norms.json (per-layer means), probabilities.json and norms.png into out_dir."""
    out = output_dir(out_dir)
    norms = record_norms(model, batches, steps, lr_full, lr_lora, lora_r, log)
    p = probabilities(norms, gamma)
    meta = {"steps": steps, "lr_full": lr_full, "lr_lora": lr_lora, "lora_r": lora_r, "gamma": gamma,
            "batch": list(batches[0].shape)}
    (out / "norms.json").write_text(json.dumps({"meta": meta, "norms": norms}, indent=1))
    (out / "probabilities.json").write_text(json.dumps(
        {"probabilities": p, "gamma": gamma, "rule": "p_l ∝ lora_update_l / full_weight_l, Σ p_l = γ, clipped to 1",
         "blocks": len(p)}, indent=1))
    plot(norms, out / "norms.png", title or f"mean layer norms over {steps} steps")
    return {"norms": norms, "probabilities": p, "dir": out}

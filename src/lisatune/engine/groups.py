"""LISA's parameter-group layout, fixed so that LR schedulers and checkpoints see a stable list:

  0: always-on, with weight decay   1: always-on, no decay (biases, norm weights)
  2: sampled,   with weight decay   3: sampled,   no decay
and, only with activation_warmup > 0 (so without it the layout, checkpoints and steps are exactly as before):
  4: sampled, activated at the last switch, with decay   5: the same, no decay

`embed_head_lr` = m sets groups 0 and 1 to lr·m at construction, so a scheduler (which keeps each group's
initial_lr) scales them like the rest. `activation_warmup` = N: with lr_t the lr the scheduler set for optimizer
step t (0-based), a block activated at switch s (step sK) steps with lr_{sK+j}·(j+1)/(N+1) for j < N, then
lr_{sK+j}; the factor is applied inside step() only (`warmup`), so schedulers and checkpoints never see it.
With `embed_head_state: 8bit` groups 0 and 1 are stepped by a second optimizer, bitsandbytes' AdamW8bit
(blockwise 8-bit moments); the inner optimizer's own groups 0 and 1 stay empty.
"""
from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import LisaError
from .options import LisaConfig

ALWAYS, SAMPLED, WARMING = 0, 2, 4  # the first (decay) group of each pair

OPTIMIZERS = {
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
}


def optimizer_class(name: str | type) -> type:
    """A torch optimizer class from a short name or a dotted import path (imported, never eval'd)."""
    if not isinstance(name, str):
        return name
    path = OPTIMIZERS.get(name.lower(), name)
    mod, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError, ValueError):
        raise LisaError(f"optimizer '{name}' not found (short names: {', '.join(OPTIMIZERS)})") from None


def decay_groups(params: list[nn.Parameter]) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (ndim < 2) are exempt, as usual for LMs."""
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _number(name: str, v, low: float, strict: bool = False):
    """The constructor checks what a config section checks: a finite number in range (torch accepts inf and nan)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > low if strict else v >= low)
    if not ok:
        raise LisaError(f"{name} must be a finite number {'>' if strict else '>='} {low:g} (got {v!r})")
    return v


def hyperparameters(lr: float, weight_decay: float, betas, eps, optimizer_kwargs: dict | None) -> dict:
    kw = {"lr": _number("lr", lr, 0, strict=True), "weight_decay": _number("weight_decay", weight_decay, 0),
          **(optimizer_kwargs or {})}
    if betas is not None:
        kw["betas"] = tuple(_number("betas", b, 0) for b in betas)
        if not all(b < 1 for b in kw["betas"]):
            raise LisaError(f"betas must each be in [0, 1) (got {tuple(betas)!r})")
    if eps is not None:
        kw["eps"] = _number("eps", eps, 0, strict=True)
    return kw


def layout(cfg: LisaConfig, always: list[list[torch.Tensor]], lr: float) -> tuple[list[dict], list[dict]]:
    """(the inner optimizer's groups, the always-on groups): `always` is [decay, no-decay] tensors to step."""
    always_groups = [{"params": always[0]}, {"params": always[1], "weight_decay": 0.0}]
    if cfg.embed_head_lr is not None:
        for g in always_groups:
            g["lr"] = lr * cfg.embed_head_lr
    pairs = 3 if cfg.activation_warmup else 2
    empty = [g for _ in range(pairs) for g in ({"params": []}, {"params": [], "weight_decay": 0.0})]
    inner = empty if cfg.embed_head_state == "8bit" else always_groups + empty[2:]
    return inner, always_groups


def build_inner(cls: type, groups: list[dict], kw: dict) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kw)
    except TypeError as e:
        raise LisaError(f"{cls.__name__} does not accept these options: {e}") from None


def embed_head_8bit(cfg: LisaConfig, optimizer_cls: str | type, groups: list[dict], defaults: dict,
                    sharded: str | None) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit over the always-on groups, with the inner AdamW's hyperparameters."""
    if cfg.sample_embed_head:
        raise LisaError("embed_head_state: 8bit is for the always-on embedding/head, but sample_embed_head is true")
    if (optimizer_cls.lower() if isinstance(optimizer_cls, str) else optimizer_cls) not in (
            "adamw", "adamw8bit", torch.optim.AdamW):
        raise LisaError(f"embed_head_state: 8bit steps the always-on set with AdamW8bit, so it needs "
                        f"optimizer_cls adamw (got {getattr(optimizer_cls, '__name__', optimizer_cls)})")
    if defaults.get("amsgrad") or defaults.get("maximize"):
        raise LisaError("embed_head_state: 8bit does not support amsgrad or maximize")
    if sharded:
        raise LisaError(f"embed_head_state: 8bit does not support sharded (FSDP2 DTensor) parameters ({sharded}): "
                        "bitsandbytes' 8-bit AdamW steps whole plain tensors with its own kernels, which take no "
                        "DTensor shards; use embed_head_state: fp32 under distributed: fsdp")
    try:
        import bitsandbytes  # deferred: optional, slow to import, and only this option needs it
    except ImportError:
        raise LisaError("lisa.embed_head_state: 8bit needs bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit(groups, lr=defaults["lr"], betas=tuple(defaults["betas"]),
                                        eps=defaults["eps"], weight_decay=defaults["weight_decay"])


def assign(groups: list[dict], first: int, decay: list, no_decay: list) -> None:
    """Fill the pair of groups starting at `first` (SAMPLED or WARMING), if the layout has it."""
    if first < len(groups):
        groups[first]["params"] = decay
        groups[first + 1]["params"] = no_decay


@contextmanager
def warmup(groups: list[dict], cfg: LisaConfig, step: int) -> Iterator[None]:
    """Within the ramp after a switch, the blocks activated at it (groups 4, 5) step at a fraction of their lr."""
    j, n = step % cfg.interval, cfg.activation_warmup
    ramp = groups[WARMING:] if j < n else []
    saved = [g["lr"] for g in ramp]
    for g in ramp:
        g["lr"] = g["lr"] * ((j + 1) / (n + 1))
    try:
        yield
    finally:  # the scheduler's values, exactly
        for g, lr in zip(ramp, saved):
            g["lr"] = lr

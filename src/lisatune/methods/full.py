"""Full fine-tuning: AdamW on every parameter (the baseline LISA is measured against)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..engine import Masters, check_master_weights, decay_groups
from ..errors import LisaError
from .base import Method, trainable


class MasterAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of every trained parameter of a bf16 model (train.precision: bf16-mixed).

    The masters and their chunked step are the engine's (engine/masters.py), shared with LISA, whose own form
    holds masters for the active set only; they travel in state_dict() (so a resume is bitwise).
    """

    def __init__(self, model: nn.Module, chunk_bytes: int | None = None, **hyper):
        ids = {id(p) for p in trainable(model)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]  # tied tensors once
        check_master_weights(True, named)
        self._masters = Masters(chunk_bytes)  # the step's cap on fp32 gradient bytes (None: the largest tensor)
        master = {id(p): self._masters.add(n, p) for n, p in named}
        groups = [{**g, "params": [master[id(p)] for p in g["params"]]} for g in decay_groups([p for _, p in named])]
        self.inner = torch.optim.AdamW(groups, **hyper)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._alias()

    def _alias(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @property
    def masters(self) -> list[torch.Tensor]:
        return list(self._masters.of.values())

    @property
    def weights(self) -> list[nn.Parameter]:
        """The bf16 parameters the masters round into, in the same order."""
        return list(self._masters.weight.values())

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:  # the grads must exist before they are cast into the masters
            with torch.enable_grad():
                loss = closure()
        self._masters.step(self.param_groups, self.inner.step)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._masters.zero_grad(set_to_none)

    def master_bytes(self) -> int:
        return self._masters.bytes()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "masters": self.masters}

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        masters = sd.pop("masters", None)
        if masters is None or len(masters) != len(self._masters):
            raise LisaError("not a bf16-mixed full fine-tuning optimizer state (no fp32 masters for every "
                            "parameter): resume it with the train.precision it was written with")
        self.inner.load_state_dict(sd)
        self._alias()
        self._masters.load(dict(zip(self._masters.of, masters)))


class Full(Method):
    name = "full"
    mixed_precision = True

    def make_optimizer(self, model, hyper):
        return torch.optim.AdamW(decay_groups(trainable(model)), **hyper)

    def master_optimizer(self, model, hyper):
        return MasterAdamW(model, chunk_bytes=self.step_chunk_bytes(), **hyper)

"""Full fine-tuning: AdamW on every parameter (the baseline LISA is measured against)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..engine import check_master_weights, clear_grads, decay_groups
from ..errors import LisaError
from .base import Method, trainable


class MasterAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of every trained parameter of a bf16 model (train.precision: bf16-mixed).

    Each step casts the bf16 grads into the masters, steps AdamW on them and rounds them back into the weights;
    the masters travel in state_dict() (so a resume is bitwise). LISA's own form, with masters for the active
    set only, is LisaOptimizer(master_weights=True).
    """

    def __init__(self, model: nn.Module, **hyper):
        ids = {id(p) for p in trainable(model)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]  # tied tensors once
        check_master_weights(True, named)
        self.weights = [p for _, p in named]
        self.masters = [p.detach().to(torch.float32) for p in self.weights]  # exact: bf16 is a subset of fp32
        self._synced = [p._version for p in self.weights]
        master = {id(p): m for p, m in zip(self.weights, self.masters)}
        groups = [{**g, "params": [master[id(p)] for p in g["params"]]} for g in decay_groups(self.weights)]
        self.inner = torch.optim.AdamW(groups, **hyper)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._alias()

    def _alias(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:  # the grads must exist before they are cast into the masters
            with torch.enable_grad():
                loss = closure()
        for i, (p, m) in enumerate(zip(self.weights, self.masters)):
            if p._version != self._synced[i] and not torch.equal(p, m.to(p.dtype)):
                m.copy_(p)  # a weight written from outside since the last step (as in LisaOptimizer)
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
        self.inner.step()
        for i, (p, m) in enumerate(zip(self.weights, self.masters)):
            p.copy_(m)  # round to nearest even
            self._synced[i] = p._version
            m.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        clear_grads(self.weights, set_to_none)

    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters)

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "masters": list(self.masters)}

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        masters = sd.pop("masters", None)
        if masters is None or len(masters) != len(self.masters):
            raise LisaError("not a bf16-mixed full fine-tuning optimizer state (no fp32 masters for every "
                            "parameter): resume it with the train.precision it was written with")
        self.inner.load_state_dict(sd)
        self._alias()
        with torch.no_grad():
            for i, (p, m, saved) in enumerate(zip(self.weights, self.masters, masters)):
                m.copy_(saved)
                p.copy_(m)
                self._synced[i] = p._version


class Full(Method):
    name = "full"
    mixed_precision = True

    def make_optimizer(self, model, hyper):
        return torch.optim.AdamW(decay_groups(trainable(model)), **hyper)

    def master_optimizer(self, model, hyper):
        return MasterAdamW(model, **hyper)

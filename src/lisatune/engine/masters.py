"""fp32 master weights of bf16 parameters, and a master step whose transient is one tensor, not the trained set.

Used by LisaOptimizer (masters for the trained set only: made at activation, freed at freeze) and by full
fine-tuning's MasterAdamW (every parameter). A master is made from its bf16 weight exactly (bf16 is a subset of
fp32). Between steps a weight holds its master rounded; a weight written from outside since (loaded after the
optimizer was built, say) replaces its master at the next step.

The step walks the inner optimizer's groups in chunks: consecutive tensors whose fp32 size together stays within
the largest trained tensor's. For each chunk it casts the bf16 grads into fp32 master grads, steps the inner
optimizer on that chunk alone, rounds the masters back into the weights (to nearest even) and frees the fp32
grads, so at most one largest tensor of fp32 gradient (plus the optimizer's own temporary for that chunk) exists
at a time. Every torch optimizer updates each tensor from its own grad and state only, so stepping in chunks is
bitwise the step over all tensors at once (CPU: the same single-tensor kernel; CUDA: the same elementwise math).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import LisaError

MASTER_DTYPES = (torch.bfloat16,)  # fp16 would also need loss scaling, which nothing here does


def check_master_weights(master_weights: Any, named: Iterable[tuple[str, nn.Parameter]]) -> None:
    """master_weights is a bool, and with it every parameter that may train is bf16 (a plain tensor, or an FSDP2
    DTensor: its master is then an fp32 DTensor sharded like it, and so is its state)."""
    if not isinstance(master_weights, bool):
        raise LisaError(f"master_weights must be true or false (got {master_weights!r})")
    if not master_weights:
        return
    for name, p in named:
        if p.dtype not in MASTER_DTYPES:
            raise LisaError(f"master_weights needs bfloat16 weights, but {name} is {p.dtype} (an fp32 model "
                            "already steps in fp32: drop master_weights, or load the model in bfloat16)")


def clear_grads(params: Iterable[torch.Tensor], set_to_none: bool = True) -> None:
    """What Optimizer.zero_grad does, for parameters an optimizer does not hold (the bf16 weights of masters)."""
    for p in params:
        if p.grad is not None:
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()


class Masters:
    """fp32 masters by parameter name, with the weights they round into."""

    def __init__(self) -> None:
        self.of: dict[str, torch.Tensor] = {}  # name -> fp32 master (what the inner optimizer holds)
        self.weight: dict[str, nn.Parameter] = {}  # name -> the model's bf16 parameter
        self._synced: dict[str, int] = {}  # the weight's version counter when it last matched its master
        self._name: dict[int, str] = {}  # id(master) -> name

    def __len__(self) -> int:
        return len(self.of)

    def add(self, name: str, p: nn.Parameter) -> torch.Tensor:
        m = p.detach().to(torch.float32)  # exact: every bf16 value is an fp32 value
        self.of[name], self.weight[name], self._synced[name], self._name[id(m)] = m, p, p._version, name
        return m

    def remove(self, name: str) -> None:
        # The weight already holds the master rounded (every step ends so), and a weight loaded since must not be
        # overwritten: the master is only freed.
        m = self.of.pop(name)
        del self.weight[name], self._synced[name], self._name[id(m)]

    def bytes(self) -> int:
        """Bytes held by this process (an FSDP2 master counts its local shard)."""
        return sum((m.to_local() if hasattr(m, "to_local") else m).numel() * m.element_size()
                   for m in self.of.values())

    @torch.no_grad()
    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Masters from a checkpoint (not re-made from the rounded weights: that would differ); each weight
        becomes its master rounded, whatever was loaded into it."""
        if set(saved) != set(self.of):
            raise LisaError(f"checkpoint holds master weights for {len(saved)} parameters but the active set "
                            f"has {len(self.of)}")
        for name, m in self.of.items():
            m.copy_(saved[name])
            self._round(name)

    def _round(self, name: str) -> None:
        p = self.weight[name]
        p.copy_(self.of[name])  # round to nearest even
        self._synced[name] = p._version

    def zero_grad(self, set_to_none: bool = True) -> None:
        clear_grads(self.weight.values(), set_to_none)

    @staticmethod
    def chunks(tensors: list[tuple[int, torch.Tensor]]) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """(group index, tensor) runs whose fp32 bytes stay within the largest tensor's: one tensor at most."""
        budget = max((4 * t.numel() for _, t in tensors), default=0)
        chunk, size = [], 0
        for gt in tensors:
            n = 4 * gt[1].numel()
            if chunk and size + n > budget:
                yield chunk
                chunk, size = [], 0
            chunk.append(gt)
            size += n
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, groups: list[dict], step: Callable[[], Any]) -> None:
        """Step the masters in `groups` (the inner optimizers' groups) chunk by chunk with `step()`."""
        held = [g["params"] for g in groups]
        tensors = [(i, m) for i, ps in enumerate(held) for m in ps]
        try:
            for chunk in self.chunks(tensors):
                for g in groups:
                    g["params"] = []
                for i, m in chunk:
                    groups[i]["params"].append(m)
                    name = self._name[id(m)]
                    p = self.weight[name]
                    if p._version != self._synced[name] and not torch.equal(p, m.to(p.dtype)):
                        m.copy_(p)  # written from outside since the last step: the weight wins
                    m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
                step()
                for _, m in chunk:
                    self._round(self._name[id(m)])
                    m.grad = None
        finally:
            for g, ps in zip(groups, held):
                g["params"] = ps

"""LisaDDP: DistributedDataParallel re-wrapped at each LISA switch, and gradient accumulation without sync.

    opt = LisaOptimizer(model, ...); ddp = LisaDDP(model, opt); loss = ddp(**batch).loss
See docs/distributed.md for the measurements behind re-wrapping.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..engine import LisaOptimizer
from ..errors import LisaError
from .agree import attach_rank_check


class LisaDDP(nn.Module):
    """DistributedDataParallel that is rebuilt at each LISA switch over the parameters now trainable.

    DDP registers (buckets, hooks, all-reduces) only the parameters with requires_grad=True when it is
    constructed. LisaAdamW freezes all but the active set, so a DDP built once would never synchronise
    blocks sampled later (ranks silently diverge) and, if built before the freeze, must search for unused
    parameters every step and still all-reduces zero gradients for every frozen block. Re-wrapping at each
    switch (init_sync=False: the weights are already identical) buckets only the active set: frozen blocks
    produce no gradient and no communication. Measured cost and alternatives: docs/distributed.md.

    Build the optimizer first:  opt = LisaAdamW(model, ...); ddp = LisaDDP(model, opt, **ddp_kwargs).
    `comm_hook=(state, hook)` is re-registered on every new DDP.
    """

    def __init__(self, model: nn.Module, optimizer, comm_hook: tuple[Any, Callable] | None = None,
                 **ddp_kwargs: Any):
        super().__init__()
        if not isinstance(optimizer, LisaOptimizer):
            raise LisaError(f"LisaDDP needs the model's LisaAdamW, got {type(optimizer).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise LisaError("pass the plain model to LisaDDP, not a DistributedDataParallel")
        for bad in ("find_unused_parameters", "static_graph"):
            if ddp_kwargs.get(bad):
                raise LisaError(f"LisaDDP re-wraps at each switch and needs no {bad}")
        attach_rank_check(optimizer)  # (LisaAdamW has it already; a bare engine optimizer gets it here)
        self.module = model
        self.optimizer = optimizer
        self.comm_hook = comm_hook
        self.ddp_kwargs = ddp_kwargs
        self.rewraps = 0
        self._key: tuple[int, ...] | None = None
        object.__setattr__(self, "_ddp", None)  # not a registered submodule: parameters stay under .module
        self._wrap(init_sync=True)
        self._hook = optimizer.register_switch_hook(lambda opt: self._wrap(init_sync=False))

    @property
    def ddp(self) -> nn.parallel.DistributedDataParallel:
        return self._ddp

    def _wrap(self, init_sync: bool) -> None:
        key = tuple(i for i, p in enumerate(self.module.parameters()) if p.requires_grad)
        if key == self._key:
            return  # the same trainable set was drawn again: keep the buckets
        old = self._ddp
        if old is not None:
            old._remove_autograd_hooks()  # its hooks would fire for blocks that stay active
            object.__setattr__(self, "_ddp", None)
            del old
        ddp = nn.parallel.DistributedDataParallel(self.module, init_sync=init_sync, **self.ddp_kwargs)
        if self.comm_hook is not None:
            ddp.register_comm_hook(*self.comm_hook)
        object.__setattr__(self, "_ddp", ddp)
        self._key = key
        self.rewraps += not init_sync

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip gradient all-reduce on accumulation micro-steps (as DistributedDataParallel.no_sync)."""
        return self._ddp.no_sync()

    def remove(self) -> nn.Module:
        """Stop re-wrapping; returns the plain model."""
        self._hook.remove()
        if self._ddp is not None:
            self._ddp._remove_autograd_hooks()
        object.__setattr__(self, "_ddp", None)
        return self.module


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def no_sync(module: nn.Module, skip: bool = True) -> contextlib.AbstractContextManager:
    """Gradient accumulation: a backward run inside this keeps its gradients local (DDP's no_sync; FSDP2's
    set_requires_gradient_sync(False)); the next synchronised backward reduces the sum. No-op if not skip."""
    if skip and isinstance(module, (nn.parallel.DistributedDataParallel, LisaDDP)):
        return module.no_sync()
    if skip and isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()

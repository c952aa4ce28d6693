"""`lisatune train` under torchrun / accelerate launch: which engine, and the model and optimizer in its order.

    mode = launch_mode(cfg.distributed, world)      # none | ddp | fsdp, checked
    model = prepare_model(mode, model)              # fsdp: sharded in place, before the optimizer exists
    opt = ...                                       # built on the (sharded) parameters
    forward = wrap_model(mode, model, opt)          # ddp: the wrapper training calls
"""
from __future__ import annotations

import atexit
import gc
import logging
import sys
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..engine import LisaOptimizer
from ..errors import LisaError
from .collectives import initialized
from .ddp import LisaDDP
from .fsdp import shard_model

log = logging.getLogger("lisatune")


class Backend:
    """How `lisatune train` runs on several processes: what happens before the optimizer exists (prepare), the
    module training calls (wrap), and what the backend supports. A new backend is a subclass here plus its entry
    in BACKENDS and its line in the run config's light table (recipe/config.py DISTRIBUTED, which loads without
    torch; tests/test_config.py holds the two equal)."""
    name: ClassVar[str]
    fused_loss: ClassVar[bool] = True  # the head + cross-entropy over chunks runs through its module
    whole_model: ClassVar[bool] = True  # every rank holds the whole model (lm-eval tasks can run on one)
    bf16_mixed: ClassVar[tuple[str, ...] | None] = None  # methods with train.precision: bf16-mixed (None: all)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Before the optimizer exists (the model is on its device)."""
        return model

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """After the optimizer exists: the module training calls. The model itself is still the one to evaluate,
        checkpoint and save."""
        return model


class Single(Backend):
    name = "none"


class Replicated(Backend):
    """DDP: LisaDDP for a LisaOptimizer (re-wrapped at each switch), else a plain DistributedDataParallel (DDP
    registers only the parameters that require grad: LoRA's adapters, GaLore's and full's everything)."""
    name = "ddp"

    def wrap(self, model, optimizer):
        if isinstance(optimizer, LisaOptimizer):
            return LisaDDP(model, optimizer)
        return nn.parallel.DistributedDataParallel(model)


class Sharded(Backend):
    """FSDP2, each block its own unit, sharded before the optimizer; LisaOptimizer and plain AdamW only (methods
    lisa and full): see docs/distributed.md ("lisatune train") for why."""
    name = "fsdp"
    fused_loss = False
    whole_model = False
    bf16_mixed = ("lisa",)  # LISA's masters are sharded like its weights

    def prepare(self, model):
        if _is_peft(model):
            raise LisaError("distributed: fsdp does not support LoRA (method lora): saving a sharded PEFT model "
                            "is not built; use distributed: ddp, which all-reduces only the adapters' gradients")
        return shard_model(model)

    def wrap(self, model, optimizer):
        if not isinstance(optimizer, LisaOptimizer) and type(optimizer) is not torch.optim.AdamW:
            cls = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
            raise LisaError(f"distributed: fsdp trains with LisaAdamW or torch.optim.AdamW only (methods lisa, "
                            f"full), not {cls}; use distributed: ddp")
        return model


BACKENDS: dict[str, Backend] = {b.name: b() for b in (Single, Replicated, Sharded)}
MODES = tuple(BACKENDS)


def launch_mode(requested: str, world: int) -> str:
    """The engine for `world` processes: the config's `distributed` (none | ddp | fsdp), checked.

    Several processes with `none` would each train their own copy on the same data: refused. One process with
    ddp/fsdp trains as `none` (there is nothing to synchronise), with a warning. With several processes the
    default process group is destroyed at interpreter exit (gloo aborts a process that exits without that).
    """
    if world > 1:
        atexit.unregister(_leave_group)  # registered once
        atexit.register(_leave_group)
    backend(requested)  # a known one
    if world > 1 and requested == "none":
        raise LisaError(f"{world} processes were launched but distributed is 'none': set distributed: ddp or fsdp "
                        "in the config (or --set distributed=ddp), or launch one process")
    if world > 1 and not initialized():
        raise LisaError(f"{world} processes were launched but torch.distributed is not initialized")
    if world == 1 and requested != "none":
        log.warning("distributed: %s, but only one process was launched: training in one process", requested)
        return "none"
    if world > 1:
        log.info("distributed: %s over %d processes (%s)", requested, world, dist.get_backend())
    return requested


def _leave_group() -> None:
    if initialized():
        gc.collect()  # first free the finished run's DDP reducers, which hold the group (else gloo can abort)
        dist.destroy_process_group()


def _is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # never imported here: only a model built by peft can be one
    return peft is not None and isinstance(model, peft.PeftModel)


def backend(mode: str) -> Backend:
    if mode not in BACKENDS:
        raise LisaError(f"distributed must be {', '.join(MODES[:-1])} or {MODES[-1]} (got {mode!r})")
    return BACKENDS[mode]


def prepare_model(mode: str, model: nn.Module) -> nn.Module:
    """Before the optimizer exists: the backend's preparation (fsdp: sharded in place; a PEFT model refused)."""
    return backend(mode).prepare(model)


def wrap_model(mode: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """After the optimizer exists: the module training calls (ddp: the wrapper)."""
    return backend(mode).wrap(model, optimizer)

"""LISA on torch.distributed's own engines: DDP (re-wrapped at each switch) and FSDP2 (per-block shards).

Every rank computes the same active sets (the sampler is a pure function of seed and switch index);
`verify_active_set` proves it with one small collective at construction, at every switch and after
a checkpoint load, and raises LisaError naming the ranks that disagree instead of letting them hang
or silently train different layers.

DDP:   opt = LisaAdamW(model, ...); ddp = LisaDDP(model, opt); loss = ddp(**batch).loss
FSDP2: shard_model(model); opt = LisaAdamW(model, ...)          # params are DTensors, state is per shard
Checkpoints (any of the above, any world size): save_checkpoint(path, model, opt) / load_checkpoint(...)
See docs/distributed.md for the measurements behind these choices.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .errors import LisaError
from .layers import find_layers

__all__ = ["verify_active_set", "LisaDDP", "shard_model", "full_optimizer_state_dict", "full_model_state_dict",
           "load_full_optimizer_state_dict", "load_full_model_state_dict", "save_checkpoint", "load_checkpoint",
           "is_dtensor"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_dtensor(t: Any) -> bool:
    return torch.is_tensor(t) and hasattr(t, "device_mesh") and hasattr(t, "to_local")


# -- all ranks hold the same active set ---------------------------------------------------------
def verify_active_set(opt, group=None) -> None:
    """Collective: every rank of `group` must hold the same LISA sampling settings, step and active set.

    One all_gather_object of a small tuple, reached by every rank at the same optimizer step (construction,
    each switch, load_state_dict), so it cannot hang unless a rank is gone (then the process group's timeout
    applies). On disagreement every rank raises the same LisaError listing each rank's view.
    """
    if not _initialized() or dist.get_world_size(group) == 1:
        return
    mine = {"step": opt.steps_done, "switch": opt.steps_done // opt.config.interval,
            "active": list(opt._active), **opt._meta()}
    views: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(views, mine, group=group)
    if all(v == views[0] for v in views):
        return
    keys = [k for k in mine if any(v[k] != views[0][k] for v in views)]
    ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(len(views))]
    shown = ["step", "active"] + [k for k in keys if k not in ("step", "active")]
    lines = "; ".join(f"rank {r}: " + ", ".join(f"{k}={v[k]}" for k in shown) for r, v in zip(ranks, views))
    raise LisaError(f"LISA ranks disagree on {', '.join(keys)} (every rank must pass the same seed and "
                    f"LISA settings and step together): {lines}")


# -- DDP ----------------------------------------------------------------------------------------
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
        from .optim import LisaAdamW
        if not isinstance(optimizer, LisaAdamW):
            raise LisaError(f"LisaDDP needs the model's LisaAdamW, got {type(optimizer).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise LisaError("pass the plain model to LisaDDP, not a DistributedDataParallel")
        for bad in ("find_unused_parameters", "static_graph"):
            if ddp_kwargs.get(bad):
                raise LisaError(f"LisaDDP re-wraps at each switch and needs no {bad}")
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


# -- FSDP2 --------------------------------------------------------------------------------------
def shard_model(model: nn.Module, blocks_path: str | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: each transformer block its own fully_shard unit, then the root (embedding, norm, head).

    A frozen block is then a whole unit: it is all-gathered for forward/backward but has no gradient to
    reduce-scatter, and LisaAdamW (built after this, on the DTensor parameters) holds state only for the
    local shards of the active blocks. Returns the model (sharded in place).
    """
    from torch.distributed.fsdp import fully_shard
    if not _initialized():
        raise LisaError("shard_model needs torch.distributed to be initialized (init_process_group)")
    lm = find_layers(model, blocks_path)
    for i in range(lm.n_blocks):
        fully_shard(model.get_submodule(f"{lm.blocks_path}.{i}"), **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


# -- checkpoints ----------------------------------------------------------------------------------
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def full_optimizer_state_dict(opt) -> dict:
    """Collective under FSDP2: LisaAdamW.state_dict() with every sharded tensor gathered to a full one.

    The result is exactly what a single-process LisaAdamW produces (plain tensors, same keys), so it loads
    into one process, DDP or FSDP2 at any world size. All ranks must call it; all get the full dict.
    """
    return _map_tensors(opt.state_dict(), lambda t: t.full_tensor() if is_dtensor(t) else t)


def load_full_optimizer_state_dict(opt, state_dict: dict) -> None:
    """Load a full (single-process format) LisaAdamW state dict; under FSDP2 each rank keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor
    opt.load_state_dict(state_dict)

    def shard_like(p: torch.Tensor, st: dict) -> dict:
        if not is_dtensor(p):
            return st
        return {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and not is_dtensor(v) and v.shape == p.shape else v for k, v in st.items()}

    for p in list(opt.inner.state):
        opt.inner.state[p] = shard_like(p, opt.inner.state[p])
    for name in list(opt._parked):
        opt._parked[name] = shard_like(opt._param[name], opt._parked[name])


def _fsdp(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_model_state_dict(model: nn.Module) -> dict:
    """Collective under FSDP2: the full (unsharded) model state dict, on CPU, on rank 0 (empty elsewhere)."""
    model = getattr(model, "module", model)
    if not _fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a full model state dict; under FSDP2 it is read from rank 0 and scattered to the shards."""
    model = getattr(model, "module", model)
    if not _fsdp(model):
        model.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def save_checkpoint(path: str | os.PathLike, model: nn.Module, opt, extra: dict | None = None) -> None:
    """Collective: rank 0 writes one world-size-independent file {model, optimizer, extra}.

    Works for a plain model, LisaDDP/DDP (weights are replicated) and FSDP2 (shards gathered). The file
    is in single-process format, so it resumes on any world size and in a single process.
    """
    model_sd = full_model_state_dict(model)
    opt_sd = full_optimizer_state_dict(opt)
    if _rank() == 0:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": model_sd, "optimizer": opt_sd, "extra": extra or {}}, tmp)
        os.replace(tmp, path)
    if _initialized():
        dist.barrier()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, opt) -> dict:
    """Collective: load a save_checkpoint file into model and LisaAdamW (same or different world size).

    Build the model (and shard_model / LisaDDP it) and the LisaAdamW with the same LISA settings first.
    Returns the `extra` dict. Every rank reads the file (the optimizer part is loaded in full, then
    sharded); under FSDP2 the model weights are broadcast from rank 0.
    """
    ck = torch.load(path, map_location="cpu", weights_only=False)
    load_full_model_state_dict(model, ck["model"])
    load_full_optimizer_state_dict(opt, ck["optimizer"])
    return ck["extra"]

"""FSDP2 for LISA: each block its own shard unit, and full (unsharded) state dicts in and out.

    shard_model(model); opt = LisaOptimizer(model, ...)   # params are DTensors, state is per shard
A frozen block is a whole unit: all-gathered for forward/backward, with no gradient to reduce-scatter.
The full state dicts are exactly what one process produces, so a checkpoint loads at any world size.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import distribute_tensor

from ..engine import find_layers, unwrap
from ..errors import LisaError
from .collectives import initialized, is_dtensor, rank


def shard_model(model: nn.Module, blocks_path: str | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: each transformer block its own fully_shard unit, then the root (embedding, norm, head).

    A frozen block is then a whole unit: it is all-gathered for forward/backward but has no gradient to
    reduce-scatter, and LisaAdamW (built after this, on the DTensor parameters) holds state only for the
    local shards of the active blocks. Returns the model (sharded in place).

    Build LisaAdamW before the model's first forward: FSDP2 initializes lazily on it, and a forward before
    LISA's freeze made packed runs diverge from one process (tests/test_recipe_distributed.py pins the order).
    With an `mp_policy`, a block frozen at that first forward may leave its reduce dtype unresolved when it is
    later sampled (pytorch/pytorch#186998, fixed for uniform-dtype groups by #187376).
    """
    if not initialized():
        raise LisaError("shard_model needs torch.distributed to be initialized (init_process_group)")
    lm = find_layers(model, blocks_path)
    for i in range(lm.n_blocks):
        fully_shard(model.get_submodule(f"{lm.blocks_path}.{i}"), **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


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
    into one process, DDP or FSDP2 at any world size. All ranks must call it. Each sharded tensor is gathered
    alone and copied to the host at once, and kept on rank 0 only (None in its place elsewhere): the unsharded
    state never exists whole on a device, nor on the ranks that do not write it.
    """
    keep = rank() == 0

    def gather(t: torch.Tensor) -> torch.Tensor | None:
        if not is_dtensor(t):
            return t
        full = t.full_tensor()
        return full.to("cpu", copy=True) if keep else None

    return _map_tensors(opt.state_dict(), gather)


def load_full_optimizer_state_dict(opt, state_dict: dict) -> None:
    """Load a full (single-process format) optimizer state dict (LisaAdamW or a plain torch optimizer such as
    AdamW); under FSDP2 each rank keeps its own shard, of the state and of bf16-mixed's fp32 masters."""
    def shard(p: torch.Tensor, v: Any) -> Any:
        if not (is_dtensor(p) and torch.is_tensor(v) and not is_dtensor(v) and v.shape == p.shape):
            return v
        return distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)  # each rank slices its own

    lisa = state_dict.get("lisa")
    if lisa and lisa.get("masters"):
        masters = {n: shard(opt.module.get_parameter(n), m) for n, m in lisa["masters"].items()}
        state_dict = {**state_dict, "lisa": {**lisa, "masters": masters}}
    opt.load_state_dict(state_dict)

    def shard_like(p: torch.Tensor, st: dict) -> dict:
        return {k: shard(p, v) for k, v in st.items()}

    if hasattr(opt, "map_states"):  # a LisaOptimizer: active and parked states
        opt.map_states(shard_like)
    else:
        for p in list(opt.state):
            opt.state[p] = shard_like(p, opt.state[p])


def _fsdp(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_model_state_dict(model: nn.Module) -> dict:
    """Collective under FSDP2: the full (unsharded) model state dict, on CPU, on rank 0 (empty elsewhere)."""
    model = unwrap(model)
    if not _fsdp(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a full model state dict; under FSDP2 it is read from rank 0 and scattered to the shards."""
    model = unwrap(model)
    if not _fsdp(model):
        model.load_state_dict(state_dict)
        return
    set_model_state_dict(model, state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (e.g. a tied embedding and LM head)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def drop_tied(model: nn.Module, sd: dict) -> dict:
    """The state dict with each tied tensor stored once (as safetensors requires)."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    for names in tied_names(model):
        for n in names[1:]:
            sd.pop(n, None)
    return sd


def fill_tied(model: nn.Module, sd: dict) -> dict:
    """The state dict with every name of each tied tensor present (whichever one was stored)."""
    for names in tied_names(model):
        have = next((n for n in names if n in sd), None)
        if have is not None:
            for n in names:
                sd.setdefault(n, sd[have])
    return sd


def full_model(model: nn.Module) -> nn.Module | None:
    """Collective under FSDP2: the model with full weights to save, on rank 0 (None on the others).

    Without FSDP2 the model itself (on rank 0). Under FSDP2 the full state dict is gathered to rank 0 and
    assigned into a fresh instance of the model's class built on the meta device (no second random init).
    """
    model = unwrap(model)
    if not _fsdp(model):
        return model if rank() == 0 else None
    sd = full_model_state_dict(model)
    if rank() != 0:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with torch.device("meta"):
        plain = cls(copy.deepcopy(model.config))
    plain.load_state_dict(fill_tied(model, sd), strict=True, assign=True)
    if tied_names(model):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()

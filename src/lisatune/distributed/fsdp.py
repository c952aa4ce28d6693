"""FSDP2 for LISA: each block its own shard unit, and full (unsharded) state dicts in and out.

    shard_model(model); opt = LisaOptimizer(model, ...)   # params are DTensors, state is per shard
A frozen block is a whole unit: all-gathered for forward/backward, with no gradient to reduce-scatter.
The full state dicts are exactly what one process produces, so a checkpoint loads at any world size.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..engine import find_layers, unwrap
from ..engine.optim import reshard
from ..engine.parking import is_full_of, shard_full
from ..errors import LisaError
from .collectives import initialized, is_dtensor, rank


def shard_model(model: nn.Module, blocks_path: str | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: each transformer block its own fully_shard unit, then the root (embedding, norm, head).

    A frozen block is then a whole unit: it is all-gathered for forward/backward but has no gradient to
    reduce-scatter, and LisaAdamW (built after this, on the DTensor parameters) holds state only for the
    local shards of the active blocks. Returns the model (sharded in place).

    FSDP2 reshards its root unit (embedding, norm, head) in backward, so a forward without grad (an evaluation,
    the packing probe) leaves the root's parameters as the gathered full tensors until the next backward. An
    optimizer built then holds those copies, and its steps are lost: the run diverges from one process.
    LisaAdamW registers the shards again first (engine.optim.reshard; tested); for any other optimizer call
    `reshard()` on every FSDPModule, or build it before the first forward.
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


def _gather(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """One sharded tensor gathered whole, copied to the host at once, kept on rank 0 only (None elsewhere)."""
    mesh = t.device_mesh
    if t.to_local().device.type != mesh.device_type:  # a host shard on a GPU mesh: NCCL gathers device memory
        t = DTensor.from_local(t.to_local(), mesh, t.placements, shape=t.shape, stride=t.stride())  # (moves it)
    full = t.full_tensor()
    return full.to("cpu", copy=True) if keep else None


def full_optimizer_state_dict(opt) -> dict:
    """Collective under FSDP2: LisaAdamW.state_dict() with every sharded tensor gathered to a full one.

    The result is exactly what a single-process LisaAdamW produces (plain tensors, same keys), so it loads
    into one process, DDP or FSDP2 at any world size. All ranks must call it. Each sharded tensor is gathered
    alone and copied to the host at once, and kept on rank 0 only (None in its place elsewhere): the unsharded
    state never exists whole on a device, nor on the ranks that do not write it. An offloaded parked state is a
    plain host shard (LisaAdamW.parked_shards()): it is gathered the same way, one tensor at a time.
    """
    keep = rank() == 0
    return _state_tensors(opt, lambda t: _gather(t, keep) if is_dtensor(t) else t)


def _state_tensors(opt, fn: Callable[[torch.Tensor], Any]) -> dict:
    """opt.state_dict() with fn applied to each tensor, in the same order on every rank (fn may be collective);
    an offloaded parked state, a plain host shard (LisaAdamW.parked_shards()), is given to fn as its DTensor."""
    sd = opt.state_dict()
    shards = opt.parked_shards() if hasattr(opt, "parked_shards") else {}
    out = _map_tensors({k: v for k, v in sd.items() if k != "lisa"}, fn)
    lisa = sd.get("lisa")
    if lisa is not None:
        parked = {n: {k: fn(_unparked(shards[n][k], v)) if k in shards.get(n, {}) else _map_tensors(v, fn)
                      for k, v in st.items()} for n, st in (lisa.get("parked") or {}).items()}
        out["lisa"] = {**_map_tensors({k: v for k, v in lisa.items() if k != "parked"}, fn), "parked": parked}
    return out


def _unparked(spec: tuple, local: torch.Tensor) -> torch.Tensor:
    mesh, placements, shape, stride = spec
    return DTensor.from_local(local.to(mesh.device_type), mesh, placements, shape=shape, stride=stride)


def load_full_optimizer_state_dict(opt, state_dict: dict) -> None:
    """Load a full (single-process format) optimizer state dict (LisaAdamW or a plain torch optimizer such as
    AdamW); under FSDP2 each rank keeps its own shard, of the state and of bf16-mixed's fp32 masters.

    Each full tensor is cut to this rank's shard on the host, one at a time, before the optimizer sees it
    (torch's load would otherwise move every full state tensor to the parameter's device at once); an offloaded
    parked state is cut and stays on the host. With the state dict memory-mapped (load_checkpoint does so under
    FSDP2) no rank holds the full state in its own memory.
    """
    lisa = state_dict.get("lisa")
    if lisa:
        reshard(opt.module)  # after a forward without grad the root's parameters are its gathered copies
        param = opt.module.get_parameter
        masters = {n: _shard(param(n), m) for n, m in (lisa.get("masters") or {}).items()}
        parked = {n: {k: _copy(param(n), v) for k, v in st.items()} for n, st in lisa.get("parked", {}).items()}
        state_dict = {**state_dict, "lisa": {**lisa, **({"masters": masters} if masters else {}), "parked": parked}}
    inner = getattr(opt, "inner", opt)  # LisaAdamW loads the torch state through its inner optimizer
    handle = inner.register_load_state_dict_pre_hook(_shard_state)
    try:
        opt.load_state_dict(state_dict)  # LisaAdamW's parked states are cut by its Parking
    finally:
        handle.remove()


def _shard(p: torch.Tensor, v: Any) -> Any:
    return shard_full(p, v) if is_full_of(p, v) else _copy(p, v)


def _copy(p: torch.Tensor, v: Any) -> Any:
    """A tensor of a sharded parameter's state that is not cut (a step counter) copied: a mapped checkpoint's
    tensors are pages of its file, and one kept would keep the file, and its disk space once deleted."""
    if is_dtensor(p) and torch.is_tensor(v) and not is_dtensor(v) and not is_full_of(p, v):
        return v.clone()
    return v


def _shard_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A load_state_dict pre-hook: the torch state with each full tensor of a sharded parameter cut to this
    rank's shard, one tensor at a time (the saved ids map to the groups' parameters as torch maps them)."""
    saved = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip(saved, params))
    state = {}
    for i, st in state_dict["state"].items():
        p = by_id.get(i)
        state[i] = {k: _shard(p, v) for k, v in st.items()} if p is not None and isinstance(st, dict) else st
    return {**state_dict, "state": state}


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


# A checkpoint's model file under FSDP2: rank 0 holds at most this much of the model on the host at a time (or one
# larger tensor), where gathering the full state dict held all of it (Llama-2-70B in bf16: 128 GiB).
SHARD_BYTES = 2 * 2**30
INDEX = "model.safetensors.index.json"  # Hugging Face's sharded layout: from_pretrained reads it as it is


class _Files:
    """Rank 0's gathered tensors, written to safetensors files of about `limit` bytes as they come: at most one
    file's tensors (or one larger tensor) are held at a time. A write error is kept, not raised (see callers)."""

    def __init__(self, directory: Path | None, prefix: str, limit: int):
        self.directory, self.prefix, self.limit = directory, prefix, limit
        self.files: list[tuple[str, list[str]]] = []
        self.part: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.error: Exception | None = None

    def add(self, key: str, t: torch.Tensor) -> str:
        """Hold `t` for the current file (written first if it is full); the name of the file it goes to."""
        nbytes = t.numel() * t.element_size()
        if self.part and self.size + nbytes > self.limit:
            self.flush()
        self.part[key] = t.contiguous()
        self.size, self.total = self.size + nbytes, self.total + nbytes
        return self.name(len(self.files) + 1)

    def name(self, i: int) -> str:
        return f"{self.prefix}-{i:05d}.safetensors"

    def flush(self) -> None:
        if self.part and self.error is None:
            name = self.name(len(self.files) + 1)
            try:
                save_file(self.part, str(self.directory / name), metadata={"format": "pt"})
                self.files.append((name, list(self.part)))
            except Exception as e:  # a full disk, a read-only folder: raised by the caller on every rank
                self.error = e
        self.part, self.size = {}, 0


def _full(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """A state tensor whole on the host, on rank 0 (collective for a DTensor; None on the other ranks)."""
    if is_dtensor(t):
        return _gather(t, keep)
    return t.detach().to("cpu", copy=True) if keep else None


def write_full_model(model: nn.Module, directory: Path | None,
                     shard_bytes: int | None = None) -> tuple[list[str], Exception | None]:
    """Collective under FSDP2: the full weights written by rank 0 to `directory` (None on the others) in Hugging
    Face's sharded layout (model-00001-of-0000N.safetensors, model.safetensors.index.json), each tensor gathered
    alone and copied to the host: rank 0 holds at most one file's tensors, the other ranks none.

    Returns (files written, the error) on rank 0. A write error does not stop the gathering (the other ranks would
    wait in the next collective until the timeout): it is returned, for the caller to raise on every rank."""
    model = unwrap(model)
    reshard(model)  # after a forward without grad the root's parameters are gathered copies, not its shards
    keep = rank() == 0
    out = _Files(directory, "part", shard_bytes or SHARD_BYTES)
    tied = {n for names in tied_names(model) for n in names[1:]}  # stored once, as safetensors requires
    for name, t in model.state_dict().items():
        full = None if name in tied else _full(t, keep)
        if full is not None:
            out.add(name, full)
    if not keep:
        return [], None
    out.flush()
    if out.error is not None:
        return [], out.error
    files, weight_map = [], {}
    try:
        for i, (name, keys) in enumerate(out.files, 1):
            final = f"model-{i:05d}-of-{len(out.files):05d}.safetensors"
            os.rename(directory / name, directory / final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": out.total},
                                                   "weight_map": weight_map}, indent=2))
    except OSError as e:
        return [], e
    return files + [INDEX], None


TENSOR_REF = "lisatune_tensor_file"  # a streamed optimizer state's stand-in for a tensor: {TENSOR_REF: file, "key": k}


def write_full_optimizer(opt, directory: Path | None,
                         shard_bytes: int | None = None) -> tuple[dict | None, list[str], Exception | None]:
    """Collective under FSDP2: full_optimizer_state_dict(opt) streamed. Each tensor is gathered alone and written
    by rank 0 to safetensors files `optimizer-0000i.safetensors` in `directory` as it comes, and stands in the
    returned state dict as {TENSOR_REF: file, "key": key} (read_tensor_refs puts the mapped tensors back): rank 0
    holds at most one file's tensors on its host. Returns (state dict, files, error) on rank 0, (None, [], None)
    elsewhere; a write error does not stop the gathering, as in write_full_model."""
    keep = rank() == 0
    out = _Files(directory, "optimizer", shard_bytes or SHARD_BYTES)
    count = itertools.count()

    def put(t: torch.Tensor) -> Any:
        full = _full(t, keep)
        if full is None:
            return None
        key = f"t{next(count)}"
        return {TENSOR_REF: out.add(key, full), "key": key}

    streamed = _state_tensors(opt, put)
    if not keep:
        return None, [], None
    out.flush()
    return streamed, [name for name, _ in out.files], out.error


def read_tensor_refs(sd: Any, folder: Path) -> tuple[Any, list[str]]:
    """A streamed optimizer state dict (write_full_optimizer) with its tensors back, as the files' mapped pages,
    and the files it read; a state dict without stand-ins comes back as it is."""
    files: dict[str, dict[str, torch.Tensor]] = {}

    def back(obj: Any) -> Any:
        if isinstance(obj, dict):
            if TENSOR_REF in obj:
                name = obj[TENSOR_REF]
                if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                    raise ValueError(f"a tensor stand-in names {name!r}, not a file of the checkpoint")
                if name not in files:
                    files[name] = load_file(str(folder / name))
                return files[name][obj["key"]]
            return {k: back(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [back(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(back(v) for v in obj)
        return obj

    return back(sd), sorted(files)


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


def plain_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps in a subclass of it and FSDPModule (FSDPLlamaForCausalLM)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


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
    cls = plain_class(model)
    with torch.device("meta"):
        plain = cls(copy.deepcopy(model.config))
    plain.load_state_dict(fill_tied(model, sd), strict=True, assign=True)
    if tied_names(model):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()

"""The meter every measurement and prediction shares: exact bytes of tensors held, activations saved for
backward, and the process's resident memory. `bench memory`, `bench speed`, `norms`, the study runner and
`lisatune plan` count with these functions, so that no two of them can count differently.

`meta=True` counts tensors on the meta device too, at the bytes their storage would hold (shape x dtype):
`lisatune plan` runs the real forward and backward of a model built on the meta device and counts what a
run with real tensors would hold, through the same code.
"""
from __future__ import annotations

import resource
import sys
import weakref
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..engine import find_layers

MIB = 2**20


# -- exact byte counts ----------------------------------------------------------------------------
def _key(t: torch.Tensor) -> tuple:
    if hasattr(t, "to_local"):
        t = t.to_local()
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr() or id(s))


def _nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.untyped_storage().nbytes()


def unique_bytes(tensors: Iterable[torch.Tensor], exclude: set | None = None, meta: bool = False) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors count once); meta tensors
    only if `meta`."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if t is None or (t.device.type == "meta" and not meta):
            continue
        k = _key(t)
        if k not in seen:
            seen.add(k)
            total += _nbytes(t)
    return total


def reachable_tensors(obj: Any, depth: int = 6, _seen: set | None = None) -> list[torch.Tensor]:
    """Tensors inside dicts, lists, tuples and plain objects' attributes (e.g. GaLore's projectors)."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        items = list(vars(obj).values())
    else:
        return []
    return [t for it in items for t in reachable_tensors(it, depth - 1, seen)]


def _param_keys(model: nn.Module) -> set:
    return {_key(p) for p in model.parameters()} | {_key(b) for b in model.buffers()}


def weight_bytes(model: nn.Module, meta: bool = False) -> int:
    return unique_bytes(model.parameters(), meta=meta)


def grad_bytes(model: nn.Module, meta: bool = False) -> int:
    return unique_bytes((p.grad for p in model.parameters() if p.grad is not None), meta=meta)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Every tensor the optimizer's state holds, plus LisaAdamW's parked (keep/offload) states: on a CPU
    machine an "offloaded" state still sits in the same RAM."""
    parked = opt.parked_states() if hasattr(opt, "parked_states") else {}
    roots = [opt.state, parked]
    return unique_bytes(t for r in roots for t in reachable_tensors(r))


class ActivationMeter:
    """Unique storages saved for backward while active (parameters and buffers excluded).

    >>> with ActivationMeter(model) as m:
    ...     loss = model(input_ids=x, labels=x).loss
    >>> m.bytes

    blocks: checkpointed blocks, whose inputs are counted (what the checkpoint keeps for recomputation).
    meta: count meta tensors (a model on the meta device: the bytes real tensors would take).
    per_block: modules whose own saved bytes are also tallied in `by_block` (what each block saved while it
    ran; without checkpointing: what recomputing it would save again).
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None, meta: bool = False,
                 per_block: list[nn.Module] | None = None):
        self.model = model
        self.blocks = blocks
        self.meta = meta
        self.per_block = per_block or []
        self.bytes = 0
        self.count = 0
        self.by_block = [0] * len(self.per_block)
        self._current: int | None = None

    def add(self, t: torch.Tensor) -> None:
        """Count `t` as saved for backward (once per storage): for what autograd keeps outside the hooks' view."""
        if t.device.type == "meta" and not self.meta:
            return
        k = _key(t)
        if k in self._seen:
            return
        self._seen.add(k)
        self._held.append(t.untyped_storage())  # kept alive until exit: no address reuse while counting
        n = _nbytes(t)
        self.bytes += n
        self.count += 1
        if self._current is not None:
            self.by_block[self._current] += n

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def _pre(self, _mod, args, kwargs):
        for v in list(args) + list(kwargs.values()):
            if torch.is_tensor(v):
                self.add(v)
            elif isinstance(v, tuple):  # e.g. position_embeddings (cos, sin)
                for u in v:
                    if torch.is_tensor(u):
                        self.add(u)

    def __enter__(self) -> "ActivationMeter":
        self._seen = _param_keys(self.model)
        self._held: list = []
        self._handles = [b.register_forward_pre_hook(self._pre, with_kwargs=True) for b in self.blocks or []]
        for i, b in enumerate(self.per_block):
            self._handles.append(b.register_forward_pre_hook(lambda *_, i=i: setattr(self, "_current", i)))
            self._handles.append(b.register_forward_hook(lambda *_: setattr(self, "_current", None)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._held = []


class AllocationMeter(TorchDispatchMode):
    """Bytes of the storages that ops allocate while active, and their high-water mark `peak` (e.g. the
    temporaries of an optimizer step). A storage counts from the op that made it until its tensor is freed.

    >>> with AllocationMeter() as a:
    ...     opt.step()
    >>> a.peak
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:  # new storage, not an in-place result
                n = _nbytes(t)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    lm = find_layers(model)
    blocks = model.get_submodule(lm.blocks_path)
    return [b for b in blocks if getattr(b, "gradient_checkpointing", False)]


# -- resident memory ------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    v = _status_kib("VmRSS")
    return None if v is None else v * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    v = _status_kib("VmHWM")
    return None if v is None else v * 1024


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024




def peak_rss_mib(reset: bool) -> float:
    """The peak resident memory of this process in MiB: VmHWM since reset_peak_rss() if `reset` succeeded,
    else ru_maxrss (the whole process's life)."""
    peak = peak_rss_bytes() if reset else None
    return (peak if peak is not None else maxrss_bytes()) / MIB


def token_batches(vocab: int, batch: int, seq: int, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]

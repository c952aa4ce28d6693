"""The meter every measurement and prediction shares: exact bytes of tensors held, activations saved for
backward, and the process's resident memory. `bench memory`, `bench speed`, `norms`, the study runner and
`lisatune plan` count with these functions, so that no two of them can count differently. It lives with the loop
(which meters each phase of a step with PhaseMemory), so that training imports nothing of measurement's.

`meta=True` counts tensors on the meta device too, at the bytes their storage would hold (shape x dtype):
`lisatune plan` runs the real forward and backward of a model built on the meta device and counts what a
run with real tensors would hold, through the same code.
"""
from __future__ import annotations

import resource
import sys
import weakref
from contextlib import contextmanager
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


def quantization_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What bitsandbytes holds beside a quantized weight, outside the parameters: a Params4bit's quant_state
    (absmax, code, offset and the nested state's absmax and code), an Int8Params' row scales (weight.SCB, or the
    Linear8bitLt's MatmulLtState once it has run: CB is the weight's own storage)."""
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        st = getattr(m, "state", None)
        roots = [getattr(w, "quant_state", None), getattr(w, "SCB", None), getattr(st, "CB", None),
                 getattr(st, "SCB", None)]
        out += reachable_tensors([r for r in roots if r is not None])
    return out


def weight_bytes(model: nn.Module, meta: bool = False) -> int:
    """The parameters and, for bitsandbytes' quantized layers, their quantization statistics."""
    return unique_bytes([*model.parameters(), *quantization_tensors(model)], meta=meta)


def grad_bytes(model: nn.Module, meta: bool = False) -> int:
    return unique_bytes((p.grad for p in model.parameters() if p.grad is not None), meta=meta)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Every tensor the optimizer's state holds, plus LisaAdamW's parked (keep/offload) states (on a CPU
    machine an "offloaded" state still sits in the same RAM) and its 8-bit always-on state."""
    parked = opt.parked_states() if hasattr(opt, "parked_states") else {}
    eight = getattr(opt, "embed_head_optimizer", None)  # LisaAdamW's 8-bit state of the always-on set
    roots = [opt.state, parked] + ([eight.state] if eight is not None else [])
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
    keeps_input: modules whose autograd function holds their input as a ctx attribute, which the hooks do not
    see (checkpointing does not drop it either); default: the model's bitsandbytes int8 linears (int8_linears).
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None, meta: bool = False,
                 per_block: list[nn.Module] | None = None, keeps_input: list[nn.Module] | None = None):
        self.model = model
        self.blocks = blocks
        self.meta = meta
        self.per_block = per_block or []
        self.keeps_input = keeps_input
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

    def _kept(self, _mod, args):
        x = args[0] if args else None
        if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled():  # else no graph keeps it
            self.add(x)

    def __enter__(self) -> "ActivationMeter":
        self._seen = _param_keys(self.model) | {_key(t) for t in quantization_tensors(self.model)}
        self._held: list = []
        self._handles = [b.register_forward_pre_hook(self._pre, with_kwargs=True) for b in self.blocks or []]
        keeps = int8_linears(self.model) if self.keeps_input is None else self.keeps_input
        self._handles += [m.register_forward_pre_hook(self._kept) for m in keeps]
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


def int8_linears(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes' Linear8bitLt layers: their matmul keeps its input on the autograd ctx (ctx.A on CPU,
    ctx.tensors on CUDA) whenever it needs grad, though a frozen weight needs no input for its gradient."""
    bnb = sys.modules.get("bitsandbytes")  # not imported here: only a model built with it can hold one
    return [] if bnb is None else [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


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


# -- peak memory per phase -------------------------------------------------------------------------
PHASES = ("forward", "backward", "step", "switch")


class PhaseMemory:
    """Peak device memory per phase of a training step and per logging interval: the one bookkeeping of
    `bench memory` and `lisatune train`.

    On CUDA: torch.cuda.max_memory_allocated and max_memory_reserved, read and reset (reset_peak_memory_stats)
    at every phase boundary, so that each reading is one phase's own peak; the interval's peak is the largest
    reading since the last interval() (the time between phases, e.g. an evaluation, included). "switch" is
    LISA's switch at the end of the optimizer step: the optimizer's switch pre-hook ends "step" there.
    Elsewhere (CPU) no allocator counts peaks: phases are not measured, and an interval reports the largest
    RSS read at its phase boundaries and the process's high-water mark (VmHWM), never reset, since resetting
    it would also lower the ru_maxrss the study runner reads for a run.

    >>> mem = PhaseMemory(device, optimizer)
    >>> with mem.phase("forward"):
    ...     loss = loss_fn(model, ...)
    >>> metrics.write(step, **mem.interval())
    """

    def __init__(self, device: torch.device | str, optimizer: Any = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.phases = {p: [0, 0] for p in PHASES}  # the run's peak per phase: [allocated, reserved]
        self.overall = [0, 0]
        self._window = [0, 0]  # since the last interval(): CUDA bytes, or (CPU) the largest RSS read
        self._current: str | None = None
        self._handle = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            register = getattr(optimizer, "register_switch_pre_hook", None)  # LisaOptimizer
            if register is not None:
                self._handle = register(lambda _opt: self.begin("switch") if self._current == "step" else None)

    def _read(self) -> None:
        if self.cuda:
            now = [torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)]
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            now = [rss_bytes() or 0, 0]
        for peak in ([self.phases[self._current]] if self._current and self.cuda else []) + [self.overall,
                                                                                              self._window]:
            peak[:] = [max(a, b) for a, b in zip(peak, now)]

    def begin(self, name: str) -> None:
        """End the current phase (if any) and start `name`."""
        self._read()
        self._current = name

    def end(self) -> None:
        self._read()
        self._current = None

    @contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def _row(self, peak: list[int]) -> dict:
        if self.cuda:
            return {"peak_allocated_mib": round(peak[0] / MIB, 1), "peak_reserved_mib": round(peak[1] / MIB, 1)}
        hwm = peak_rss_bytes()
        return {"rss_mib": round(peak[0] / MIB, 1), **({"peak_rss_mib": round(hwm / MIB, 1)} if hwm else {})}

    def interval(self) -> dict:
        """The peak since the last call, for a metrics row (MiB): CUDA peak_allocated_mib and peak_reserved_mib;
        CPU rss_mib (the largest RSS read at the interval's phase boundaries) and peak_rss_mib (VmHWM)."""
        self._read()
        row = self._row(self._window)
        self._window = [0, 0]
        return row

    def summary(self) -> dict:
        """The run's peaks (MiB), as interval() names them; on CUDA also per phase."""
        self._read()
        row = self._row(self.overall)
        if self.cuda:
            row["phases"] = {p: {"peak_allocated_mib": round(a / MIB, 1), "peak_reserved_mib": round(r / MIB, 1)}
                             for p, (a, r) in self.phases.items()}
        return row

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def token_batches(vocab: int, batch: int, seq: int, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]

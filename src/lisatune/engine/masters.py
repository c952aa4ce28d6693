"""fp32 master weights of bf16 parameters, and a master step whose transient is one chunk, not the trained set.

Used by LisaOptimizer (masters for the trained set only: made at activation, freed at freeze) and by full
fine-tuning's MasterAdamW (every parameter). A master is made from its bf16 weight exactly (bf16 is a subset of
fp32). Between steps a weight holds its master rounded; a weight written from outside since (loaded after the
optimizer was built, say) replaces its master at the next step.

The step walks the inner optimizer's groups in chunks of a byte budget: the largest trained tensor's fp32 size,
or the cap `chunk_bytes` if one is given and smaller (CHUNK_BYTES is the suggested one; none by default). A
tensor whose fp32 size exceeds the budget is cut into slices of consecutive elements (boundaries at multiples of
ALIGN) when its optimizer is elementwise (torch's Adam/AdamW, bitsandbytes' blockwise 8-bit Adam: `sliceable`);
any other optimizer steps it whole. For each chunk the step casts the bf16 grads of its tensors (or slices) into
fp32 master grads, steps the inner optimizer on that chunk alone (a slice as a view of the master, with views of
its state), rounds the finished masters back into the weights (to nearest even) and frees the fp32 grads, so at
most one budget of fp32 gradient (plus the optimizer's own temporary for it) exists at a time. These optimizers
update each element from its own grad and state only (bitsandbytes: each block of ALIGN values from its own
absmax), so stepping in chunks and slices is bitwise the step over all tensors at once (tests/test_master_slices.py
holds it so on CPU: single-tensor, foreach and 8-bit; CUDA runs the same elementwise math per element).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import LisaError

MASTER_DTYPES = (torch.bfloat16,)  # fp16 would also need loss scaling, which nothing here does
CHUNK_BYTES = 256 * 2**20  # the cap to use where the largest tensor is large (an 8B's embedding: 2 GiB in fp32)
ALIGN = 256  # slice boundaries, in elements: bitsandbytes' 8-bit state keeps one absmax per 256 values
# optimizer state entries by what a slice of the master gets: a view of the same elements, of the same 8-bit
# blocks' absmax, the same (read-only) object, or its own copy of a per-tensor counter (written back once)
_ELEMENTWISE = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2"}
_BLOCKWISE = {"absmax1", "absmax2"}
_SHARED = {"qmap1", "qmap2"}
_COUNTERS = {"step"}


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


def _is_8bit_adam(opt: torch.optim.Optimizer) -> bool:
    """bitsandbytes' Adam/AdamW (8-bit blockwise or 32-bit), without its per-tensor norm clipping."""
    return (type(opt).__module__.startswith("bitsandbytes.") and getattr(opt, "optimizer_name", None) == "adam"
            and not getattr(opt.args, "max_unorm", 0.0) and not getattr(opt, "is_paged", False))


def sliceable(opt: torch.optim.Optimizer | None, group: dict, m: torch.Tensor) -> bool:
    """Whether `opt` can step master `m` of `group` in slices bitwise as it steps it whole: an elementwise update
    (torch's Adam/AdamW; bitsandbytes' Adam, block by block) of a plain contiguous real tensor."""
    if opt is None or hasattr(m, "to_local") or not m.is_contiguous() or m.is_complex():
        return False
    if isinstance(opt, torch.optim.Adam):
        if group.get("differentiable"):
            return False
    elif not _is_8bit_adam(opt):
        return False
    state = opt.state.get(m, {})
    return set(state) <= _ELEMENTWISE | _BLOCKWISE | _SHARED | _COUNTERS and all(
        v.is_contiguous() for k, v in state.items() if k in _ELEMENTWISE)


def _init_state(opt: torch.optim.Optimizer, gindex: int, m: torch.Tensor) -> None:
    """The state `opt` would make for `m` at its first step, made whole before the first slice steps."""
    group = opt.param_groups[gindex]
    if _is_8bit_adam(opt):
        opt.init_state(group, m, gindex, next(k for k, q in enumerate(group["params"]) if q is m))
        return
    # torch's Adam._init_group, as of torch 2.x (the bitwise tests compare the whole state with torch's own)
    state = opt.state[m]
    state["step"] = (torch.zeros((), dtype=torch.float32, device=m.device) if group["capturable"] or group["fused"]
                     else torch.tensor(0.0, dtype=torch.float32))
    for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
        state[k] = torch.zeros_like(m, memory_format=torch.preserve_format)


def _slice_state(state: dict, counters: dict, a: int, b: int) -> dict:
    out = {}
    for k, v in state.items():
        if k in _ELEMENTWISE:
            out[k] = v.view(-1)[a:b]
        elif k in _BLOCKWISE:
            out[k] = v[a // ALIGN:-(-b // ALIGN)]
        elif k in _COUNTERS:  # each slice counts from the step's start; the last slice's count is written back
            out[k] = counters[k].clone() if isinstance(counters[k], torch.Tensor) else counters[k]
        else:
            out[k] = v
    return out


def _owners(groups: list[dict], step: Callable[[], Any], optimizers: Iterable[torch.optim.Optimizer] | None
            ) -> list[torch.optim.Optimizer | None]:
    """The optimizer holding each group's state: one of `optimizers`, or (None) of `step`'s owner and the inner
    optimizers it steps (LisaOptimizer: `inner` and `embed_head_optimizer`)."""
    if optimizers is None:
        owner = getattr(step, "__self__", None)
        optimizers = [getattr(owner, "inner", None), getattr(owner, "embed_head_optimizer", None), owner]
    opts = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
    return [next((o for o in opts if any(g is q for q in o.param_groups)), None) for g in groups]


class Masters:
    """fp32 masters by parameter name, with the weights they round into.

    chunk_bytes: the cap on the fp32 gradient bytes the step holds at once (None, the default: the largest
    trained tensor's fp32 size, no slicing)."""

    def __init__(self, chunk_bytes: int | None = None) -> None:
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 4 * ALIGN):
            raise LisaError(f"master step chunk_bytes must be an integer of at least {4 * ALIGN} bytes "
                            f"(got {chunk_bytes!r})")
        self.chunk_bytes = chunk_bytes
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
    def budget(tensors: list[tuple[int, torch.Tensor]], cap: int | None) -> int:
        """One chunk's fp32 bytes at most: the cap, or the largest tensor's fp32 size if smaller (or no cap)."""
        largest = max((4 * t.numel() for _, t in tensors), default=0)
        return largest if cap is None else min(cap, largest)

    @staticmethod
    def pieces(tensors: list[tuple[int, torch.Tensor]], budget: int,
               can_slice: Callable[[int, torch.Tensor], bool] = lambda i, t: False
               ) -> list[tuple[int, torch.Tensor, int, int]]:
        """(group index, tensor, first element, end element): each tensor whole, or, if its fp32 size exceeds the
        budget and can_slice(group index, tensor), cut into slices of the budget (rounded down to ALIGN)."""
        per = max(ALIGN, budget // 4 // ALIGN * ALIGN)
        out = []
        for i, t in tensors:
            n = t.numel()
            if 4 * n > budget and can_slice(i, t):
                out += [(i, t, a, min(a + per, n)) for a in range(0, n, per)]
            else:
                out.append((i, t, 0, n))
        return out

    @staticmethod
    def chunks(items: list[tuple], budget: int | None = None) -> Iterator[list[tuple]]:
        """Runs of consecutive items ((group index, tensor) or pieces) whose fp32 bytes stay within `budget` (by
        default the largest item's): one item at most."""
        def size(item: tuple) -> int:
            return 4 * (item[3] - item[2] if len(item) == 4 else item[1].numel())

        if budget is None:
            budget = max((size(it) for it in items), default=0)
        chunk, total = [], 0
        for it in items:
            n = size(it)
            if chunk and total + n > budget:
                yield chunk
                chunk, total = [], 0
            chunk.append(it)
            total += n
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, groups: list[dict], step: Callable[[], Any],
             optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        """Step the masters in `groups` (the inner optimizers' groups) chunk by chunk with `step()`; `optimizers`
        hold their state (default: found from `step`'s owner, see _owners), for the tensors stepped in slices."""
        held = [g["params"] for g in groups]
        tensors = [(i, m) for i, ps in enumerate(held) for m in ps]
        budget = self.budget(tensors, self.chunk_bytes)
        owners = _owners(groups, step, optimizers) if self.chunk_bytes is not None else [None] * len(groups)

        def can_slice(i: int, m: torch.Tensor) -> bool:
            g = self.weight[self._name[id(m)]].grad
            return g is not None and g.is_contiguous() and sliceable(owners[i], groups[i], m)

        pieces = self.pieces(tensors, budget, can_slice)
        counters: dict[int, dict] = {}  # id(master) -> its per-tensor counters at the step's start
        for i, m, a, b in pieces:
            if a == 0 and b < m.numel():  # the first of its slices: state made whole, counters noted
                opt = owners[i]
                if not opt.state.get(m):
                    _init_state(opt, next(k for k, g in enumerate(opt.param_groups) if g is groups[i]), m)
                counters[id(m)] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in opt.state[m].items() if k in _COUNTERS}
        views: list[tuple[torch.optim.Optimizer, torch.Tensor]] = []  # this chunk's slices
        try:
            for chunk in self.chunks(pieces, budget):
                for g in groups:
                    g["params"] = []
                last: dict[int, torch.Tensor] = {}  # id(master) -> the view of its last slice, in this chunk
                for i, m, a, b in chunk:
                    name = self._name[id(m)]
                    p = self.weight[name]
                    if a == 0 and p._version != self._synced[name] and not torch.equal(p, m.to(p.dtype)):
                        m.copy_(p)  # written from outside since the last step: the weight wins
                    if b - a == m.numel():
                        groups[i]["params"].append(m)
                        m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
                        continue
                    v = m.detach().view(-1)[a:b]
                    v.grad = p.grad.detach().view(-1)[a:b].to(torch.float32)
                    owners[i].state[v] = _slice_state(owners[i].state[m], counters[id(m)], a, b)
                    groups[i]["params"].append(v)
                    views.append((owners[i], v))
                    if b == m.numel():
                        last[id(m)] = v
                step()
                for i, m, a, b in chunk:
                    if b == m.numel():  # whole, or its last slice: the master is final
                        self._round(self._name[id(m)])
                    if id(m) in last:  # every slice counted once from the same start: one count for the tensor
                        state, done = owners[i].state[m], owners[i].state[last[id(m)]]
                        for k in _COUNTERS & set(done):
                            state[k] = done[k]
                    m.grad = None
                while views:
                    opt, v = views.pop()
                    del opt.state[v]
                    v.grad = None
        finally:
            for opt, v in views:
                opt.state.pop(v, None)
            for g, ps in zip(groups, held):
                g["params"] = ps

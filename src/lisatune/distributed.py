"""LISA on torch.distributed's own engines: DDP (re-wrapped at each switch) and FSDP2 (per-block shards).

Every rank computes the same active sets (the sampler is a pure function of seed and switch index);
`verify_active_set` proves it with one small collective at construction, at every switch and after
a checkpoint load, and raises LisaError naming the ranks that disagree instead of letting them hang
or silently train different layers.

DDP:   opt = LisaAdamW(model, ...); ddp = LisaDDP(model, opt); loss = ddp(**batch).loss
FSDP2: shard_model(model); opt = LisaAdamW(model, ...)          # params are DTensors, state is per shard
Checkpoints (any of the above, any world size): save_checkpoint(path, model, opt) / load_checkpoint(...)
The recipe (`lisatune train` under torchrun): launch_mode, wrap_for, no_sync, all_sum, on_rank0,
save_run_checkpoint / load_run_checkpoint (the recipe's checkpoint directories) and full_model.
See docs/distributed.md for the measurements behind these choices.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .errors import LisaError
from .layers import find_layers

__all__ = ["verify_active_set", "LisaDDP", "shard_model", "full_optimizer_state_dict", "full_model_state_dict",
           "load_full_optimizer_state_dict", "load_full_model_state_dict", "save_checkpoint", "load_checkpoint",
           "is_dtensor", "launch_mode", "wrap_for", "no_sync", "all_sum", "on_rank0", "save_run_checkpoint",
           "load_run_checkpoint", "full_model"]

log = logging.getLogger("lisatune")


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
    """Load a full (single-process format) optimizer state dict (LisaAdamW or a plain torch optimizer such as
    AdamW); under FSDP2 each rank keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor
    opt.load_state_dict(state_dict)
    inner = getattr(opt, "inner", opt)  # LisaAdamW keeps the torch optimizer's state in .inner

    def shard_like(p: torch.Tensor, st: dict) -> dict:
        if not is_dtensor(p):
            return st
        return {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and not is_dtensor(v) and v.shape == p.shape else v for k, v in st.items()}

    for p in list(inner.state):
        inner.state[p] = shard_like(p, inner.state[p])
    for name in list(getattr(opt, "_parked", {})):
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


# -- the recipe: `lisatune train` under torchrun / accelerate launch --------------------------------
def _world() -> int:
    return dist.get_world_size() if _initialized() else 1


def _comm_device() -> torch.device:
    """Where small collective tensors live: the current GPU for NCCL, else the CPU (gloo)."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_mode(requested: str, world: int) -> str:
    """The engine for `world` processes: the config's `distributed` (none | ddp | fsdp), checked.

    Several processes with `none` would each train their own copy on the same data: refused. One process with
    ddp/fsdp trains as `none` (there is nothing to synchronise), with a warning. With several processes the
    default process group is destroyed at interpreter exit (gloo aborts a process that exits without that).
    """
    if world > 1:
        atexit.unregister(_leave_group)  # registered once
        atexit.register(_leave_group)
    if requested not in ("none", "ddp", "fsdp"):
        raise LisaError(f"distributed must be none, ddp or fsdp (got {requested!r})")
    if world > 1 and requested == "none":
        raise LisaError(f"{world} processes were launched but distributed is 'none': set distributed: ddp or fsdp "
                        "in the config (or --set distributed=ddp), or launch one process")
    if world > 1 and not _initialized():
        raise LisaError(f"{world} processes were launched but torch.distributed is not initialized")
    if world == 1 and requested != "none":
        log.warning("distributed: %s, but only one process was launched: training in one process", requested)
        return "none"
    if world > 1:
        log.info("distributed: %s over %d processes (%s)", requested, world, dist.get_backend())
    return requested


def _leave_group() -> None:
    if _initialized():
        import gc
        gc.collect()  # first free the finished run's DDP reducers, which hold the group (else gloo can abort)
        dist.destroy_process_group()


def _is_peft(model: nn.Module) -> bool:
    import sys
    peft = sys.modules.get("peft")  # never imported here: only a model built by peft can be one
    return peft is not None and isinstance(model, peft.PeftModel)


def wrap_for(mode: str, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(module to call in training, optimizer) for `mode`: builds the optimizer in the order the engine needs.

    none: the model and make_optimizer(model).
    ddp:  make_optimizer(model) first (LisaAdamW freezes the model), then LisaDDP for a LisaAdamW (re-wrapped at
          each switch) or a plain DistributedDataParallel for any other optimizer (DDP registers only the
          parameters that require grad: LoRA's adapters, GaLore's and full's everything).
    fsdp: shard_model(model) first, then make_optimizer on the DTensor parameters; LisaAdamW and plain AdamW
          only (methods lisa and full). A PEFT (LoRA) model is refused before sharding, any other optimizer
          (GaLore) after: see docs/distributed.md ("lisatune train") for why.
    The model itself is still the one to evaluate, checkpoint and save (FSDP2 shards it in place).
    """
    from .optim import LisaAdamW
    if mode == "none":
        return model, make_optimizer(model)
    if mode == "ddp":
        opt = make_optimizer(model)
        if isinstance(opt, LisaAdamW):
            return LisaDDP(model, opt), opt
        return nn.parallel.DistributedDataParallel(model), opt
    if mode == "fsdp":
        if _is_peft(model):
            raise LisaError("distributed: fsdp does not support LoRA (method lora): saving a sharded PEFT model "
                            "is not built; use distributed: ddp, which all-reduces only the adapters' gradients")
        shard_model(model)
        opt = make_optimizer(model)
        if not isinstance(opt, LisaAdamW) and type(opt) is not torch.optim.AdamW:
            cls = f"{type(opt).__module__}.{type(opt).__qualname__}"
            raise LisaError(f"distributed: fsdp trains with LisaAdamW or torch.optim.AdamW only (methods lisa, full), "
                            f"not {cls}; use distributed: ddp")
        return model, opt
    raise LisaError(f"distributed must be none, ddp or fsdp (got {mode!r})")


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
    from torch.distributed.fsdp import FSDPModule
    if skip and isinstance(module, (nn.parallel.DistributedDataParallel, LisaDDP)):
        return module.no_sync()
    if skip and isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


def all_sum(*values: float) -> list[float]:
    """Each value summed over all ranks (one all_reduce of a float64 vector); the values themselves in one
    process. The recipe's agreement point: token counts, losses, the stop and non-finite flags."""
    if _world() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Collective: run fn() on rank 0 only (file system work) and return its result on every rank.

    A LisaError raised by fn is raised on every rank (same message); any other exception is re-raised on rank 0
    and becomes a RuntimeError on the others, so no rank is left waiting. One process: just fn().
    """
    if _world() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except LisaError as e:
            box = [("lisa", str(e))]
        except Exception as e:
            dist.broadcast_object_list([("crash", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "lisa":
        raise LisaError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (e.g. a tied embedding and LM head)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _drop_tied(model: nn.Module, sd: dict) -> dict:
    """The state dict with each tied tensor stored once (as safetensors requires)."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    for names in _tied_names(model):
        for n in names[1:]:
            sd.pop(n, None)
    return sd


def _fill_tied(model: nn.Module, sd: dict) -> dict:
    """The state dict with every name of each tied tensor present (whichever one was stored)."""
    for names in _tied_names(model):
        have = next((n for n in names if n in sd), None)
        if have is not None:
            for n in names:
                sd.setdefault(n, sd[have])
    return sd


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_run_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler,
                        extra: dict | None = None, keep_last: int | None = None) -> Path:
    """checkpoint.save_checkpoint for one or several processes: the same `checkpoints/step-XXXXXX/` directory.

    One process: exactly checkpoint.save_checkpoint. Several (collective, DDP or FSDP2): the full model state
    dict and the full optimizer state (single-process format, as save_checkpoint above) and every rank's RNG
    state are gathered; rank 0 alone writes model.safetensors, optimizer.pt, scheduler.pt, rng_rank{r}.pt per
    rank and trainer_state.json (last; with "world_size") into a temp dir, renames it into place and prunes
    to keep_last. Every rank returns the same path, after the checkpoint is complete.
    """
    from safetensors.torch import save_file

    from . import checkpoint as ck
    if _world() == 1:
        return ck.save_checkpoint(run_dir, step, model, optimizer, scheduler, extra, keep_last=keep_last)
    model = getattr(model, "module", model)
    model_sd = full_model_state_dict(model)      # FSDP2: gathered, on rank 0 only
    opt_sd = full_optimizer_state_dict(optimizer)
    rngs: list[Any] | None = [None] * _world() if _rank() == 0 else None
    dist.gather_object(ck.rng_state(), rngs, dst=0)
    state = {**(extra or {}), "step": int(step), "world_size": _world()}

    def write() -> Path:
        if keep_last is not None and keep_last < 1:
            raise LisaError(f"keep_last must be >= 1 or None (got {keep_last})")
        root = Path(run_dir) / "checkpoints"
        ck.clean_tmp(root)
        final = root / f"step-{int(step):06d}"
        with ck.atomic_dir(final) as tmp:
            save_file(_drop_tied(model, model_sd), str(tmp / ck.MODEL), metadata={"format": "pt"})
            torch.save(opt_sd, tmp / ck.OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / ck.SCHEDULER)
            for r, rng in enumerate(rngs):
                torch.save(rng, tmp / rng_file(r))
            (tmp / ck.STATE).write_text(json.dumps(state, indent=2))  # last: marks the checkpoint complete
        if keep_last is not None:
            older = [d for _, d in ck.checkpoint_dirs(run_dir) if d != final]
            for d in older[:max(0, len(older) - (keep_last - 1))]:
                doomed = root / f"{ck.TMP_PREFIX}del-{d.name}-{os.getpid()}"
                os.rename(d, doomed)  # renamed first: a kill mid-delete never leaves a half-deleted step-*
                shutil.rmtree(doomed, ignore_errors=True)
        return final

    return on_rank0(write)


def load_run_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore a save_run_checkpoint directory (collective under DDP/FSDP2); returns its trainer state.

    The checkpoint must come from the same number of processes (the global batch is batch_size × processes
    and each rank restores its own RNG state); otherwise a LisaError says how many it needs.
    """
    from safetensors.torch import load_file

    from . import checkpoint as ck
    path = Path(path)
    try:
        state = json.loads((path / ck.STATE).read_text())
    except (OSError, ValueError) as e:
        raise LisaError(f"checkpoint '{path}': {ck.STATE} is unreadable ({ck._first_line(e)})") from None
    written_by = state.get("world_size", 1) if isinstance(state, dict) else 1
    if written_by != _world():
        raise LisaError(f"checkpoint '{path}' was written by {_processes(written_by)}, this run has "
                        f"{_processes(_world())}: resume with {written_by} (the global batch is train.batch_size "
                        "× processes)")
    if _world() == 1:
        return ck.load_checkpoint(path, model, optimizer, scheduler)
    need = [ck.STATE, ck.MODEL, ck.OPTIMIZER, ck.SCHEDULER, rng_file(_rank())]
    missing = [f for f in need if not (path / f).is_file()]
    if missing:
        raise LisaError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    model = getattr(model, "module", model)
    try:
        model_sd = _fill_tied(model, load_file(str(path / ck.MODEL)))
    except Exception as e:
        raise LisaError(f"checkpoint '{path}': {ck.MODEL} is corrupt ({ck._first_line(e)})") from None
    opt_sd, sched_sd = ck._torch_load(path, ck.OPTIMIZER), ck._torch_load(path, ck.SCHEDULER)
    rng = ck._torch_load(path, rng_file(_rank()))
    load_full_model_state_dict(model, model_sd)
    load_full_optimizer_state_dict(optimizer, opt_sd)
    scheduler.load_state_dict(sched_sd)
    ck.set_rng_state(rng, where=f"checkpoint '{path}': {rng_file(_rank())}")
    return state


def full_model(model: nn.Module) -> nn.Module | None:
    """Collective under FSDP2: the model with full weights to save, on rank 0 (None on the others).

    Without FSDP2 the model itself (on rank 0). Under FSDP2 the full state dict is gathered to rank 0 and
    assigned into a fresh instance of the model's class built on the meta device (no second random init).
    """
    model = getattr(model, "module", model)
    if not _fsdp(model):
        return model if _rank() == 0 else None
    import copy

    from torch.distributed.fsdp import FSDPModule
    sd = full_model_state_dict(model)
    if _rank() != 0:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with torch.device("meta"):
        plain = cls(copy.deepcopy(model.config))
    plain.load_state_dict(_fill_tied(model, sd), strict=True, assign=True)
    if _tied_names(model):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()

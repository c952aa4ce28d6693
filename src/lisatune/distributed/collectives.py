"""The few collectives the recipe needs, each a no-op in one process: is it distributed, who am I, sum, rank 0 only."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import LisaError, first_line


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized():
        dist.barrier()


def is_dtensor(t: Any) -> bool:
    return torch.is_tensor(t) and hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _comm_device() -> torch.device:
    """Where small collective tensors live: the current GPU for NCCL, else the CPU (gloo)."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """Each value summed over all ranks (one all_reduce of a float64 vector); the values themselves in one
    process. The recipe's agreement point: token counts, losses, the stop and non-finite flags."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Collective: every rank's `obj`, as a list on rank 0 (None elsewhere); [obj] in one process."""
    if world() == 1:
        return [obj]
    out: list[Any] | None = [None] * world() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Collective: run fn() on rank 0 only (file system work) and return its result on every rank.

    A LisaError raised by fn is raised on every rank (same message); any other exception is re-raised on rank 0
    and becomes a RuntimeError on the others, so no rank is left waiting. One process: just fn().
    """
    if world() == 1:
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
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:  # a rank waited past the process group's timeout, or its peer is gone (gloo raises
        # a plain RuntimeError, NCCL a DistError, which is one)
        raise LisaError(f"rank {dist.get_rank()} stopped waiting for rank 0's work (a checkpoint, an evaluation): "
                        f"{first_line(e)}; a slow file system or long lm-eval tasks need a longer "
                        "train.collective_timeout") from None
    kind, value = box[0]
    if kind == "lisa":
        raise LisaError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value

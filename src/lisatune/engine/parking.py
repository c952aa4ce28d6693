"""Where the optimizer state of a unit that goes frozen waits (state_policy): dropped, offloaded, or kept.

`drop` frees it (the paper's LISA: a block sampled again starts with fresh moments), `offload` moves its tensors
to the host and back to the parameter's device when the block is sampled again, `keep` leaves it where it is.
States are keyed by parameter name, so they survive the master weights being freed and made again. The `step`
counter never moves: torch keeps it on the host, or (fused/capturable) on the parameter's device, and expects it
back where it was.

Under FSDP2 a parameter and its state are DTensors. An offloaded state of a sharded parameter is parked as this
rank's shard, a plain host tensor (a DTensor with a host shard on a GPU mesh would all-gather through NCCL from
the host), with the mesh, placements, shape and stride that rebuild the DTensor when the block is sampled again.
A full state read from a checkpoint is cut to this rank's shard on the host, one tensor at a time (shard_full).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def _local(v: torch.Tensor) -> torch.Tensor:
    return v.to_local() if hasattr(v, "to_local") else v  # a DTensor (FSDP2) counts this rank's shard


def tensor_bytes(states: Iterable[dict]) -> int:
    return sum(_local(v).numel() * v.element_size() for st in states for v in st.values() if torch.is_tensor(v))


def held_bytes(states: Iterable[dict]) -> int:
    """tensor_bytes counting a tensor shared between states once (bitsandbytes shares its quantization maps)."""
    seen = {(v.data_ptr(), v.numel() * v.element_size()) for st in states for v in st.values() if torch.is_tensor(v)}
    return sum(n for _, n in seen)


def is_sharded(t: Any) -> bool:
    return torch.is_tensor(t) and hasattr(t, "device_mesh") and hasattr(t, "to_local")  # an FSDP2 DTensor


def local_shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full`, a tensor shaped like the sharded p, as p's placements cut it (a view)."""
    shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
    for dim, (n, start) in enumerate(zip(shape, offset)):
        full = full.narrow(dim, start, n)
    return full


def shard_full(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a plain tensor shaped like the sharded p: a state or master read from a checkpoint) as a DTensor
    sharded like p. Only this rank's slice is copied to p's device: the full tensor never is."""
    if not all(type(pl) in (Shard, Replicate) for pl in p.placements):  # (strided shards: torch's own cut)
        return distribute_like(p, full)
    local = local_shard(p, full).to(p.device, memory_format=torch.contiguous_format, copy=True)
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def distribute_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)  # each rank slices its own


def is_full_of(p: torch.Tensor, v: Any) -> bool:
    """Whether v is a full (unsharded) state tensor of the sharded parameter p."""
    return is_sharded(p) and torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape


def to_device(key: str, v: Any, device: torch.device | str) -> Any:
    """A state value on `device`: as torch does, `step` stays where it is (the host, or fused AdamW's device)."""
    if not torch.is_tensor(v) or key == "step":
        return v
    return v.to(device=device)


def move_state(state: dict, device: torch.device | str) -> dict:
    """Move one parameter's optimizer state to `device`, in place (and return it): every tensor but `step`."""
    for k, v in state.items():
        state[k] = to_device(k, v, device)
    return state


def to_param(p: torch.Tensor, key: str, v: Any) -> Any:
    """A state value for p: as torch does on load, `step` stays where it is and the moments follow the param;
    the full value of a sharded p (from a checkpoint) becomes this rank's shard."""
    if key != "step" and is_full_of(p, v):
        return shard_full(p, v)
    return to_device(key, v, p.device)


# What rebuilds an offloaded shard's DTensor: (mesh, placements, shape, stride).
Spec = tuple[Any, tuple, torch.Size, tuple[int, ...]]


class Parking:
    def __init__(self, policy: str):
        self.policy = policy
        self.states: dict[str, dict[str, Any]] = {}  # parameter name -> its frozen state
        self.specs: dict[str, dict[str, Spec]] = {}  # parameter name -> key -> spec, for offloaded shards

    def _host(self, name: str, state: dict, p: torch.Tensor | None = None) -> dict:
        """The offloaded form of a state: plain host tensors (step stays), shards with their spec; a full value
        of a sharded p (from a checkpoint) is cut to this rank's shard first."""
        out, specs = {}, {}
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                if p is not None and is_full_of(p, v):
                    specs[k] = (p.device_mesh, tuple(p.placements), p.shape, p.stride())
                    v = local_shard(p, v).to("cpu", memory_format=torch.contiguous_format, copy=True)
                elif is_sharded(v):
                    specs[k] = (v.device_mesh, tuple(v.placements), v.shape, v.stride())
                    v = v.to_local().to("cpu")
                else:
                    v = v.to("cpu")
            out[k] = v
        if specs:
            self.specs[name] = specs
        return out

    def park(self, name: str, state: dict | None) -> None:
        if state and self.policy != "drop":
            self.states[name] = self._host(name, state) if self.policy == "offload" else dict(state)

    def restore(self, name: str, target: torch.Tensor) -> dict | None:
        """The parked state of `name`, on `target`'s device (None if there is none); an offloaded shard is a
        DTensor again."""
        st = self.states.pop(name, None)
        specs = self.specs.pop(name, {})
        if not st:
            return None
        return {k: self._unpark(specs[k], v, target) if k in specs else to_param(target, k, v) for k, v in st.items()}

    @staticmethod
    def _unpark(spec: Spec, local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mesh, placements, shape, stride = spec
        return DTensor.from_local(local.to(device=target.device), mesh, placements, shape=shape, stride=stride)

    def load(self, saved: dict[str, dict], params: dict[str, torch.Tensor]) -> None:
        """Park the states of a checkpoint (full, or already sharded) as park() would have: offloaded ones on the
        host (a sharded parameter's as its local shard), kept ones on the parameter's device (sharded like it)."""
        self.clear()
        for n, st in saved.items():
            p = params[n]
            self.states[n] = (self._host(n, st, p) if self.policy == "offload" else
                              {k: to_param(p, k, v) for k, v in st.items()})

    def clear(self) -> None:
        self.states.clear()
        self.specs.clear()

    def map(self, fn: Callable[[torch.Tensor, dict], dict], params: dict[str, torch.Tensor]) -> None:
        for name in list(self.states):
            self.states[name] = fn(params[name], self.states[name])

    def to(self, device: torch.device | str) -> None:
        """Move kept states to `device` (offloaded ones stay on the host)."""
        if self.policy == "keep":
            for st in self.states.values():
                move_state(st, device)

    def device_bytes(self) -> int:
        """Bytes held beside the parameters (kept states; offloaded ones are on the host)."""
        return tensor_bytes(self.states.values()) if self.policy == "keep" else 0

    def host_bytes(self) -> int:
        return tensor_bytes(self.states.values()) if self.policy == "offload" else 0

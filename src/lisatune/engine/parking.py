"""Where the optimizer state of a unit that goes frozen waits (state_policy): dropped, offloaded, or kept.

`drop` frees it (the paper's LISA: a block sampled again starts with fresh moments), `offload` moves its tensors
to the host and back to the parameter's device when the block is sampled again, `keep` leaves it where it is.
States are keyed by parameter name, so they survive the master weights being freed and made again. The `step`
counter never moves: torch keeps it on the host, or (fused/capturable) on the parameter's device, and expects it
back where it was.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def _local(v: torch.Tensor) -> torch.Tensor:
    return v.to_local() if hasattr(v, "to_local") else v  # a DTensor (FSDP2) counts this rank's shard


def tensor_bytes(states: Iterable[dict]) -> int:
    return sum(_local(v).numel() * v.element_size() for st in states for v in st.values() if torch.is_tensor(v))


def held_bytes(states: Iterable[dict]) -> int:
    """tensor_bytes counting a tensor shared between states once (bitsandbytes shares its quantization maps)."""
    seen = {(v.data_ptr(), v.numel() * v.element_size()) for st in states for v in st.values() if torch.is_tensor(v)}
    return sum(n for _, n in seen)


def to_param(p: torch.Tensor, key: str, v: Any) -> Any:
    """A state value for p: as torch does on load, `step` stays where it is and the moments follow the param."""
    if not torch.is_tensor(v) or key == "step":
        return v
    return v.to(device=p.device)


class Parking:
    def __init__(self, policy: str):
        self.policy = policy
        self.states: dict[str, dict[str, Any]] = {}  # parameter name -> its frozen state

    def _host(self, state: dict) -> dict:
        if self.policy != "offload":
            return dict(state)
        return {k: v.to("cpu") if torch.is_tensor(v) and k != "step" else v for k, v in state.items()}

    def park(self, name: str, state: dict | None) -> None:
        if state and self.policy != "drop":
            self.states[name] = self._host(state)

    def restore(self, name: str, target: torch.Tensor) -> dict | None:
        """The parked state of `name`, on `target`'s device (None if there is none)."""
        st = self.states.pop(name, None)
        return {k: to_param(target, k, v) for k, v in st.items()} if st else None

    def load(self, saved: dict[str, dict], params: dict[str, torch.Tensor]) -> None:
        self.states = {n: (self._host(st) if self.policy == "offload" else
                           {k: to_param(params[n], k, v) for k, v in st.items()}) for n, st in saved.items()}

    def map(self, fn: Callable[[torch.Tensor, dict], dict], params: dict[str, torch.Tensor]) -> None:
        for name in list(self.states):
            self.states[name] = fn(params[name], self.states[name])

    def device_bytes(self) -> int:
        """Bytes held beside the parameters (kept states; offloaded ones are on the host)."""
        return tensor_bytes(self.states.values()) if self.policy == "keep" else 0

    def host_bytes(self) -> int:
        return tensor_bytes(self.states.values()) if self.policy == "offload" else 0

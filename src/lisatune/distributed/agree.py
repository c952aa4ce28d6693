"""All ranks hold the same active set: proved with one small collective, a switch hook on the optimizer.

Every rank computes the same active sets (the sampler is a pure function of seed and switch index).
`attach_rank_check` registers `verify_active_set` on one optimizer (LisaAdamW does it when it is built under
torch.distributed, LisaDDP for an optimizer that lacks it), so it runs at once, at every switch and after
load_state_dict, and raises LisaError naming the ranks that disagree instead of letting them hang or silently
train different layers. It costs nothing outside torch.distributed.
"""
from __future__ import annotations

import functools
from typing import Any

import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from ..engine import LisaOptimizer
from ..errors import LisaError
from .collectives import initialized


def verify_active_set(opt: LisaOptimizer, group=None) -> None:
    """Collective: every rank of `group` must hold the same LISA sampling settings, step and active set.

    One all_gather_object of a small dict, reached by every rank at the same optimizer step (construction,
    each switch, load_state_dict), so it cannot hang unless a rank is gone (then the process group's timeout
    applies). On disagreement every rank raises the same LisaError listing each rank's view.
    """
    if not initialized() or dist.get_world_size(group) == 1:
        return
    mine = opt.sampling_state()
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


def attach_rank_check(opt: LisaOptimizer, group=None) -> RemovableHandle | None:
    """Check now and at every switch that the ranks of `group` agree; the handle is kept as `opt.rank_check`.
    Nothing to do outside torch.distributed, or when `opt` already has its check."""
    if not initialized() or getattr(opt, "rank_check", None) is not None:
        return None
    check = functools.partial(verify_active_set, group=group)
    check(opt)
    opt.rank_check = opt.register_switch_hook(check)
    return opt.rank_check

"""All ranks hold the same active set: proved with one small collective, installed as a global switch hook.

Every rank computes the same active sets (the sampler is a pure function of seed and switch index). Importing
lisatune.distributed registers `verify_active_set` with every LisaOptimizer, so it runs at construction, at
every switch and after load_state_dict, and raises LisaError naming the ranks that disagree instead of letting
them hang or silently train different layers. It costs nothing outside torch.distributed.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

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


def _check(opt: LisaOptimizer) -> None:
    verify_active_set(opt, opt.process_group)


HANDLE = LisaOptimizer.register_global_switch_hook(_check)

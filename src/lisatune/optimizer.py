"""LisaAdamW: the engine's LisaOptimizer with what lives above the engine attached to the instance it builds.

    opt = LisaAdamW(model, n_layers=2, interval=20, lr=1e-5, frozen_weights="nf4")

* `frozen_weights: int8 | nf4`: the frozen blocks' linears held quantized (lisatune.quant's FrozenWeights, kept
  as `opt.frozen_weights`, synced at every switch); `spill_dir`: trained blocks' full-precision copies as mapped
  files there, not host RAM;
* under torch.distributed, the check that every rank holds the same active set (`opt.rank_check`).
This is the optimizer `lisatune train`, the Trainer integration and the README use; the engine alone is
LisaOptimizer, which holds weights as they are.
"""
from __future__ import annotations

import torch

from .distributed.agree import attach_rank_check
from .engine import LisaConfig, LisaOptimizer
from .quant.frozen import attach_frozen_weights


class LisaAdamW(LisaOptimizer):
    holds = ("full", "int8", "nf4")

    def __init__(self, model, config: LisaConfig | None = None, *, device: torch.device | str | None = None,
                 **kwargs):
        """`device`: where to train a model given on the host (a loaded checkpoint). Frozen blocks are quantized
        straight onto it and the rest moved after, so the model is never whole on the device in full precision,
        and a frozen block's full-precision copy is the host weight itself (no second copy)."""
        super().__init__(model, config, **kwargs)
        kind = self.config.frozen_weights
        self.frozen_weights = attach_frozen_weights(self, kind, device, self.config.spill_dir) if kind != "full" else None
        if device is not None:
            self.to(device)
        self.rank_check = None
        attach_rank_check(self)

"""Full fine-tuning: AdamW on every parameter (the baseline LISA is measured against)."""
from __future__ import annotations

import torch

from ..engine import decay_groups
from .base import Method, trainable


class Full(Method):
    name = "full"

    def make_optimizer(self, model, hyper):
        return torch.optim.AdamW(decay_groups(trainable(model)), **hyper)

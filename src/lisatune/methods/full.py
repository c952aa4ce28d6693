"""Full fine-tuning: AdamW on every parameter (the baseline LISA is measured against)."""
from __future__ import annotations

import torch

from .base import Method, decay_groups, trainable


class Full(Method):
    name = "full"

    def optimizer(self, model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        return torch.optim.AdamW(decay_groups(trainable(model)), lr=lr, weight_decay=weight_decay,
                                 betas=tuple(betas), eps=eps)

"""LISA: the engine (LisaAdamW) behind the common method interface; options are a LisaConfig."""
from __future__ import annotations

from ..config import LisaConfig
from ..optim import LisaAdamW, reject_peft
from .base import Method


class Lisa(Method):
    name = "lisa"
    Options = LisaConfig

    def prepare(self, model):
        # LisaAdamW freezes and unfreezes blocks itself; here only refuse a PEFT model early, before any
        # set-up work (the engine refuses it again, so no path combines LISA with LoRA).
        reject_peft(getattr(model, "module", model))
        return model

    def optimizer(self, model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        return LisaAdamW(model, self.options, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def status(self, optimizer):
        opt = optimizer
        while not isinstance(opt, LisaAdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # e.g. accelerate's AcceleratedOptimizer wraps ours
        if not isinstance(opt, LisaAdamW):
            return {}
        active = ",".join(n.removeprefix("block") for n in opt.active_names)  # "3,17" or "3,embed_head"
        return {"active": active, "state_mib": round(opt.state_bytes() / 2**20, 2)}

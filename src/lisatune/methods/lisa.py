"""LISA: the engine (LisaAdamW) behind the common method interface; its options are the run's `lisa:` section."""
from __future__ import annotations

from ..engine import LisaConfig, LisaOptimizer, reject_peft, unwrap
from ..optimizer import LisaAdamW
from ..options import LisaOptions
from .base import Method


class Lisa(Method):
    name = "lisa"
    Options = LisaOptions
    mixed_precision = True

    @classmethod
    def validate(cls, options):
        if isinstance(options, LisaConfig):  # an engine config is taken as given (the paper's defaults)
            return options
        return super().validate(options)

    def prepare(self, model, device=None):
        # LisaAdamW freezes and unfreezes blocks itself; here only refuse a PEFT model early, before any
        # set-up work (the engine refuses it again, so no path combines LISA with LoRA).
        reject_peft(unwrap(model))
        return model

    def optimizer(self, model, lr=None, weight_decay=None, betas=None, eps=None, master_weights=False, device=None):
        """LisaAdamW straight from the `lisa:` section and the train options. With bf16-mixed, fp32 masters and
        state for the active set only (the engine makes and frees them at the switches)."""
        placed = self.place(model, device) if device is not None else {}
        return LisaAdamW(model, self.options, master_weights=master_weights, **self.hyper(lr, weight_decay, betas, eps),
                         step_chunk_bytes=self.step_chunk_bytes(), **placed)

    def place(self, model, device):
        if self.options.frozen_weights == "full":
            return super().place(model, device)
        return {"device": device}  # LisaAdamW quantizes the frozen blocks onto it, then moves the rest

    def status(self, optimizer):
        opt = optimizer
        while not isinstance(opt, LisaOptimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # e.g. accelerate's AcceleratedOptimizer wraps ours
        if not isinstance(opt, LisaOptimizer):
            return {}
        active = ",".join(n.removeprefix("block") for n in opt.active_units)  # "3,17" or "3,embed_head"
        row = {"active": active, "state_mib": round(opt.state_bytes() / 2**20, 2)}
        if opt.master_weights:  # train.precision: bf16-mixed
            row["master_mib"] = round(opt.master_bytes() / 2**20, 3)
        return row

"""LISA: the engine (LisaAdamW) behind the common method interface; options are a LisaRecipe."""
from __future__ import annotations

from ..engine import LisaConfig, LisaOptimizer, reject_peft, unwrap
from ..optimizer import LisaAdamW
from .base import Method


class LisaRecipe(LisaConfig):
    """The engine's options with lisatune's default lr for the always-on set; `embed_head_lr: null` (or 1.0) is
    the paper's LISA, the engine's own default."""
    # A tenth of the lr for the embedding, head and norms: the one mechanism of study 4 that helped on both tasks
    # (docs/results.md).
    embed_head_lr: float | None = 0.1


class Lisa(Method):
    name = "lisa"
    Options = LisaRecipe
    mixed_precision = True

    @classmethod
    def validate(cls, options):
        if isinstance(options, LisaConfig):  # an engine config is taken as given (the paper's defaults)
            return options
        return super().validate(options)

    def prepare(self, model):
        # LisaAdamW freezes and unfreezes blocks itself; here only refuse a PEFT model early, before any
        # set-up work (the engine refuses it again, so no path combines LISA with LoRA).
        reject_peft(unwrap(model))
        return model

    def place(self, model, device):
        if self.options.frozen_weights == "full":
            return super().place(model, device)
        return {"device": device}  # LisaAdamW quantizes the frozen blocks onto it, then moves the rest

    def make_optimizer(self, model, hyper):
        return LisaAdamW(model, self.options, **hyper)

    def master_optimizer(self, model, hyper):
        # fp32 masters and state for the active set only: the engine makes and frees them at the switches
        return LisaAdamW(model, self.options, master_weights=True, **hyper)

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

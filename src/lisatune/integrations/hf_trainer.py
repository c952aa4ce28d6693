"""Hugging Face Trainer / TRL SFTTrainer: hand the Trainer a LisaAdamW.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=lisa_optimizers(model, args, n_layers=2, interval=20))

The Trainer builds its LR scheduler on the optimizer, steps it only at the end of an
accumulation cycle, and saves/loads `optimizer.state_dict()` in its checkpoints, which
carries the LISA position, so `train(resume_from_checkpoint=...)` continues exactly
(tested bitwise with transformers.Trainer and TRL's SFTTrainer, from a mid-interval checkpoint).
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..errors import LisaError
from ..optimizer import LisaAdamW


def lisa_optimizers(model, args, **lisa_options) -> tuple[LisaAdamW, None]:
    """(optimizer, None) for Trainer(optimizers=...), with lr, weight decay, betas and eps from `args`.

    The model goes to `args.device` first: the Trainer moves it only after this optimizer exists, and LISA's
    masters, parked state and quantized blocks are made where the model is. One process only: the Trainer wraps
    the model in DDP once, so blocks sampled after the first switch would never be all-reduced (ranks diverge
    silently); `lisatune train` re-wraps at each switch (LisaDDP)."""
    if args.world_size > 1:
        raise LisaError(f"lisa_optimizers: the Trainer under {args.world_size} processes would not synchronise "
                        "blocks LISA samples later; use `lisatune train` with distributed: ddp or fsdp")
    model.to(args.device)
    opt = LisaAdamW(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                    betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **lisa_options)
    return opt, None


class LisaLogCallback(TrainerCallback):
    """Adds the active blocks and optimizer-state MiB to the Trainer's logs."""

    def __init__(self, optimizer: LisaAdamW):
        self.opt = optimizer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["lisa_active"] = ",".join(map(str, self.opt.active_layers))
            logs["lisa_state_mib"] = round(self.opt.state_bytes() / 2**20, 3)

"""LisaConfig: the validated options of the LISA engine (what a YAML `lisa:` section holds).

γ is `n_layers` (the number of blocks active at a time, not the model's total; aliases `gamma` and SWIFT's
`lisa_activated_layers`), K is `interval` (alias `lisa_step_interval`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from ..errors import LisaError
from ..schema import Number, Options, parse_yaml, read_text


class LisaConfig(Options):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    section = "lisa"

    # γ and K; the aliases are ModelScope SWIFT's names for the same settings.
    # Strict ints: a YAML `true` is not 1.
    n_layers: StrictInt = Field(2, validation_alias=AliasChoices("n_layers", "gamma", "lisa_activated_layers"))
    interval: StrictInt = Field(20, validation_alias=AliasChoices("interval", "K", "lisa_step_interval"))
    policy: Literal["uniform", "bernoulli", "weighted", "cyclic"] = "uniform"
    # Per-layer probabilities (bernoulli) or weights (weighted): a list, or a .json/.yaml/.txt file.
    probabilities: list[Number] | str | None = None  # each finite, not a boolean; ranges: the sampler
    seed: StrictInt = Field(0, ge=0)
    train_embedding: bool = True
    train_head: bool = True
    train_norm: bool = True  # the final norm and any other non-block language-model parameter
    sample_embed_head: bool = False  # embedding+head become one more sampled unit instead of always on
    # What the sampler draws: whole blocks, or each block's matrix-holding submodules (attention, MLP) as units
    # of their own; γ counts units either way. A block's norms train while any of its units is active.
    units: Literal["block", "module"] = "block"
    train_other: bool = False  # parameters outside the language model (e.g. a vision tower)
    state_policy: Literal["drop", "offload", "keep"] = "drop"
    blocks_path: str | None = None  # dotted path to the block list, walked through registered submodules
    # A multiplier of the run's lr for the always-on set (groups 0 and 1); None or 1.0: the same lr.
    embed_head_lr: float | None = None
    # Optimizer steps over which a block activated at a switch ramps its lr up (0: none); at most interval.
    activation_warmup: StrictInt = 0
    # Optimizer state of the always-on set (groups 0, 1): fp32 AdamW, or 8-bit blockwise AdamW (bitsandbytes).
    embed_head_state: Literal["fp32", "8bit"] = "fp32"
    # How frozen blocks' nn.Linear weights are held: as they are, or quantized (bitsandbytes; held by LisaAdamW,
    # which attaches the quantization to its instance: the engine alone holds weights as given).
    frozen_weights: Literal["full", "int8", "nf4"] = "full"

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data):
        """n_layers and gamma (or interval and K) are one setting: given under two names, one would be dropped."""
        if isinstance(data, dict):
            for field in ("n_layers", "interval"):
                names = cls.model_fields[field].validation_alias.choices
                given = [n for n in names if n in data]
                if len(given) > 1:
                    alias = " or ".join(given[1:])
                    raise ValueError(f"give {given[0]} or its alias {alias}, not both")
        return data

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1 (optimizer steps between switches)")
        return v

    @field_validator("n_layers")
    @classmethod
    def _n_layers(cls, v: int) -> int:
        if v < 1:  # also under bernoulli, where γ/N_L is each block's default probability
            raise ValueError(f"n_layers (γ) = {v} must be between 1 and the number of blocks")
        return v

    @field_validator("embed_head_lr", mode="before")
    @classmethod
    def _embed_head_lr_type(cls, v):
        if isinstance(v, bool):  # a YAML `true` is not the multiplier 1.0
            raise ValueError("must be a number (a multiplier of the lr), not a boolean")
        return v

    @field_validator("embed_head_lr")
    @classmethod
    def _embed_head_lr(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("must be a finite multiplier of the lr > 0 (to freeze the embedding or head, "
                             "set train_embedding / train_head to false)")
        return v

    @field_validator("activation_warmup")
    @classmethod
    def _activation_warmup(cls, v: int, info: ValidationInfo) -> int:
        # A field validator (interval is declared, so validated, before it) rather than a model validator, so
        # the error is located at lisa.activation_warmup.
        if v < 0:
            raise ValueError("must be >= 0 (optimizer steps of lr ramp after a block activates)")
        k = info.data.get("interval")
        if k is not None and v > k:
            raise ValueError(f"must be <= interval (K) = {k}: a block ramps up within the interval it is active")
        return v

    def probability_list(self) -> list[float] | None:
        p = self.probabilities
        return load_probabilities(p) if isinstance(p, str) else p


def load_probabilities(path: str) -> list[float]:
    """A JSON/YAML list or {"probabilities": [...]}, or a text file with one number per line."""
    f = Path(path)
    text = read_text(f, "probabilities file")
    if f.suffix in (".json", ".yaml", ".yml"):
        if f.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise LisaError(f"{path}: not valid json: {e}") from None
        else:
            data = parse_yaml(text, str(path))
        if isinstance(data, dict):
            data = data.get("probabilities")
        if not isinstance(data, list):
            raise LisaError(f"{path}: expected a list of numbers or a 'probabilities' list")
        values = data
    else:
        values = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):  # float(True) is 1.0: a YAML `true` in the list is a mistake
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError):
            raise LisaError(f"{path}: entry {i + 1} ({v!r}) is not a number") from None
    return out

"""The one interface every fine-tuning method implements, so the training loop never asks which one it runs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..options import format_validation_error
from ..errors import LisaError
from ..layers import find_layers

# The "linear layers" of a block: GPT-2-style models use Conv1D (a Linear with a transposed weight).
LINEAR_TYPES = (nn.Linear, Conv1D)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(ABC):
    """model -> (prepared model, optimizer, progress status, model to save)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict | BaseModel | None = None):
        self.options = self.validate(options)

    @classmethod
    def validate(cls, options: dict | BaseModel | None) -> BaseModel:
        """Options as the method's pydantic model; any mistake becomes one LisaError line."""
        if isinstance(options, cls.Options):
            return options
        if isinstance(options, BaseModel):
            raise LisaError(f"{cls.name}: options must be {cls.Options.__name__}, not {type(options).__name__}")
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as e:
            if not cls.Options.model_fields:  # format_validation_error would print "(valid: )"
                raise LisaError(f"{cls.name}: takes no options (got {', '.join(map(str, options))})") from None
            raise LisaError(format_validation_error(e, cls.Options, cls.name)) from None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model trainable the way this method needs (default: every parameter)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    @abstractmethod
    def optimizer(self, model: nn.Module, lr: float, weight_decay: float,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer: ...

    def status(self, optimizer: torch.optim.Optimizer) -> dict:
        """A few values for the progress bar and metrics; most methods have nothing to say."""
        return {}

    def export(self, model: nn.Module, merge: bool = True) -> nn.Module:
        """The plain Hugging Face model to save."""
        return model

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() counts tied tensors once


def decay_groups(params: list[nn.Parameter]) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (ndim < 2) are exempt, as usual for LMs."""
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def block_linears(model: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """The blocks' path and the Linear/Conv1D modules inside the transformer blocks, by full module name."""
    path = find_layers(model).blocks_path
    mods = {n: m for n, m in model.named_modules() if n.startswith(path + ".") and isinstance(m, LINEAR_TYPES)}
    return path, mods

"""The one interface every fine-tuning method implements, and the one registry of methods.

A method turns (model, options) into (prepared model, optimizer). Subclassing Method with a `name` registers
it in METHODS, which drives the run config's schema (one options section per method that has options), the
CLI's and the study runner's valid choices: adding a method is one module plus its tests.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..engine import find_layers
from ..errors import LisaError
from ..schema import format_error

# The "linear layers" of a block: GPT-2-style models use Conv1D (a Linear with a transposed weight).
LINEAR_TYPES = (nn.Linear, Conv1D)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


METHODS: dict[str, type["Method"]] = {}  # filled by subclassing Method (see __init_subclass__)


class Method(ABC):
    """model -> (prepared model, optimizer, progress status, model to save)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    mixed_precision: ClassVar[bool] = False  # implements master_optimizer (train.precision: bf16-mixed)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS[cls.name] = cls

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
            raise LisaError(format_error(e, cls.Options, cls.name, section=True)) from None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model trainable the way this method needs (default: every parameter)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  master_weights: bool = False, device: torch.device | str | None = None) -> torch.optim.Optimizer:
        """The optimizer of the prepared model, with the run's AdamW hyperparameters; with master_weights, over
        fp32 master copies of the (bf16) weights it trains; with `device`, the model (on the host) moves there
        first, or as the method builds its optimizer (place)."""
        hyper = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps,
                 **(self.place(model, device) if device is not None else {})}
        if master_weights:
            if not self.mixed_precision:
                raise LisaError(f"train.precision: bf16-mixed is not built for method '{self.name}' (methods: "
                                f"{', '.join(n for n, c in METHODS.items() if c.mixed_precision)})")
            return self.master_optimizer(model, hyper)
        return self.make_optimizer(model, hyper)

    def place(self, model: nn.Module, device: torch.device | str) -> dict[str, Any]:
        """Move the model to `device` before its optimizer is built; or return what make_optimizer needs to do it
        itself (added to `hyper`)."""
        model.to(device)
        return {}

    @abstractmethod
    def make_optimizer(self, model: nn.Module, hyper: dict[str, Any]) -> torch.optim.Optimizer:
        """Build the optimizer; `hyper` holds lr, weight_decay, betas and eps as torch optimizers take them."""

    def master_optimizer(self, model: nn.Module, hyper: dict[str, Any]) -> torch.optim.Optimizer:
        """make_optimizer with fp32 master weights of a bf16 model (for methods with mixed_precision)."""
        raise NotImplementedError

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


def build_method(name: str, options: dict | BaseModel | None = None) -> Method:
    """A method by name with validated options (a dict, the method's options model, or None for defaults)."""
    cls = METHODS.get(name)
    if cls is None:
        raise LisaError(f"method '{name}' is not one of {', '.join(METHODS)}")
    return cls(options)


def block_linears(model: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """The blocks' path and the Linear/Conv1D modules inside the transformer blocks, by full module name."""
    path = find_layers(model).blocks_path
    mods = {n: m for n, m in model.named_modules() if n.startswith(path + ".") and isinstance(m, LINEAR_TYPES)}
    return path, mods

"""The one interface every fine-tuning method implements, and the one registry of methods.

A method is built from its typed config section and the run's train options (`Method(cfg.lisa, cfg.train)`) and
turns a model into (prepared model, optimizer). Subclassing Method with a `name` registers it in METHODS, the
source of which methods exist; the run config's light table of them (recipe/config.py, no torch) is tested
against it. Adding a method is one module, its options in lisatune/options.py, one table entry and its tests.
"""
from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..engine import find_layers
from ..errors import LisaError
from ..options import TrainOptions
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

    def __init__(self, options: dict | BaseModel | None = None, train: TrainOptions | None = None):
        self.options = self.validate(options)
        self.train = train or TrainOptions()  # lr, weight_decay, betas, eps: the optimizer's hyperparameters

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

    def prepare(self, model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
        """Make the model trainable the way this method needs (default: every parameter). `device`: where it will
        train, for a method that builds layers there at once (QLoRA's quantized base)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def hyper(self, lr: float | None = None, weight_decay: float | None = None,
              betas: tuple[float, float] | None = None, eps: float | None = None) -> dict[str, Any]:
        """AdamW's hyperparameters as torch optimizers take them: the train options', each unless given here."""
        t = self.train
        return {"lr": t.lr if lr is None else lr,
                "weight_decay": t.weight_decay if weight_decay is None else weight_decay,
                "betas": tuple(t.betas if betas is None else betas),
                "eps": t.eps if eps is None else eps}

    def step_chunk_bytes(self) -> int | None:
        """The bf16-mixed master step's cap (train.step_chunk_mib) in bytes; None: the largest trained tensor."""
        mib = self.train.step_chunk_mib
        return None if mib is None else mib * 2**20

    def check_precision(self, master_weights: bool) -> None:
        if master_weights and not self.mixed_precision:
            raise LisaError(f"train.precision: bf16-mixed is not built for method '{self.name}' (methods: "
                            f"{', '.join(n for n, c in METHODS.items() if c.mixed_precision)})")

    def optimizer(self, model: nn.Module, lr: float | None = None, weight_decay: float | None = None,
                  betas: tuple[float, float] | None = None, eps: float | None = None,
                  master_weights: bool = False, device: torch.device | str | None = None) -> torch.optim.Optimizer:
        """The optimizer of the prepared model, with the train options' AdamW hyperparameters (those given here
        replace them); with master_weights, over fp32 master copies of the (bf16) weights it trains; with
        `device`, the model (on the host) moves there first, or as the method builds its optimizer (place)."""
        self.check_precision(master_weights)
        hyper = self.hyper(lr, weight_decay, betas, eps) | (self.place(model, device) if device is not None else {})
        return self.master_optimizer(model, hyper) if master_weights else self.make_optimizer(model, hyper)

    def place(self, model: nn.Module, device: torch.device | str) -> dict[str, Any]:
        """Move the model to `device` before its optimizer is built; or return what the optimizer needs to do it
        itself (passed to it with the hyperparameters)."""
        model.to(device)
        return {}

    def make_optimizer(self, model: nn.Module, hyper: dict[str, Any]) -> torch.optim.Optimizer:
        """Build the optimizer; `hyper` holds lr, weight_decay, betas and eps as torch optimizers take them. (A
        method that builds its optimizer straight from its options, as LISA, overrides optimizer instead.)"""
        raise NotImplementedError

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


def build_method(name: str, options: dict | BaseModel | None = None, train: TrainOptions | None = None) -> Method:
    """A method by name with validated options (a dict, the method's options model, or None for defaults) and the
    run's train options (None: their defaults)."""
    cls = METHODS.get(name)
    if cls is None:
        raise LisaError(f"method '{name}' is not one of {', '.join(METHODS)}")
    return cls(options, train)


def block_linears(model: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """The blocks' path and the Linear/Conv1D modules inside the transformer blocks, by full module name."""
    path = find_layers(model).blocks_path
    mods = {n: m for n, m in model.named_modules() if n.startswith(path + ".") and isinstance(m, LINEAR_TYPES)}
    return path, mods

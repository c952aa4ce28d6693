"""Fine-tuning methods as peers behind one interface (`Method`); pick one with `build_method`."""
from __future__ import annotations

from pydantic import BaseModel

from ..config import LisaConfig
from ..errors import LisaError
from .base import Method, block_linears
from .full import Full
from .galore import Galore, GaloreOptions
from .lisa import Lisa
from .lora import Lora, LoraOptions, default_targets

METHODS: dict[str, type[Method]] = {"full": Full, "lora": Lora, "galore": Galore, "lisa": Lisa}


def build_method(name: str, options: dict | BaseModel | None = None) -> Method:
    """A method by name with validated options (a dict, the method's options model, or None for defaults)."""
    cls = METHODS.get(name)
    if cls is None:
        raise LisaError(f"method '{name}' is not one of {', '.join(METHODS)}")
    return cls(options)


__all__ = ["METHODS", "Method", "Full", "Lora", "Galore", "Lisa", "LoraOptions", "GaloreOptions", "LisaConfig",
           "build_method", "block_linears", "default_targets"]

"""Fine-tuning methods as peers behind one interface (`Method`); pick one with `build_method`.

Importing this package registers every method (in this order: the CLI and errors list them so).
"""
from ..engine import LisaConfig
from ..optimizer import LisaAdamW
from ..options import GaloreOptions, LisaOptions, LoraOptions
from .base import METHODS, Method, block_linears, build_method
from .full import Full
from .lora import Lora, default_targets
from .galore import Galore
from .lisa import Lisa

__all__ = ["METHODS", "Method", "Full", "Lora", "Galore", "Lisa", "LoraOptions", "GaloreOptions", "LisaOptions",
           "LisaAdamW", "LisaConfig", "build_method", "block_linears", "default_targets"]

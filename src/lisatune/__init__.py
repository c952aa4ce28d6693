"""lisatune: memory-efficient full-parameter fine-tuning by LISA (Pan et al., arXiv 2403.17919).

Names are imported when first used, so that `import lisatune` (and the CLI's --help) loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import LisaError

_LAZY = {"LisaAdamW": "optimizer", "LisaConfig": "engine", "LisaOptimizer": "engine",
         "LayerMap": "engine", "Sampler": "engine", "find_layers": "engine"}

__all__ = ["LisaError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lisatune' has no attribute {name!r}")

"""lisatune: memory-efficient full-parameter fine-tuning by LISA (Pan et al., arXiv 2403.17919)."""
from .engine import LayerMap, LisaAdamW, LisaConfig, LisaOptimizer, Sampler, find_layers
from .errors import LisaError

__all__ = ["LisaAdamW", "LisaConfig", "LisaError", "LisaOptimizer", "LayerMap", "Sampler", "find_layers"]
__version__ = "0.1.0"

"""lisatune: memory-efficient full-parameter fine-tuning by LISA (Pan et al., arXiv 2403.17919)."""
from .config import LisaConfig
from .errors import LisaError
from .layers import LayerMap, find_layers
from .optim import LisaAdamW
from .sampling import Sampler

__all__ = ["LisaAdamW", "LisaConfig", "LisaError", "LayerMap", "Sampler", "find_layers"]
__version__ = "0.1.0"

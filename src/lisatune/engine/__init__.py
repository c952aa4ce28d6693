"""The LISA engine: find a model's blocks, sample the active set, and optimize only it.

Depends on torch, numpy and pydantic, and within lisatune only on the two foundation modules `errors` and
`schema`; nothing here knows of distribution, quantization, recipes, methods or benchmarks. Whatever must happen
at a switch beyond the engine's own work is a switch hook registered on the optimizer instance from above.
"""
from .groups import decay_groups, optimizer_class
from .layers import LayerMap, find_layers, unwrap
from .masters import Masters, check_master_weights, clear_grads
from .optim import LisaOptimizer, reject_peft
from .options import LisaConfig, load_probabilities
from .parking import tensor_bytes
from .sampling import POLICIES, Sampler

__all__ = ["LayerMap", "LisaConfig", "LisaOptimizer", "Masters", "POLICIES", "Sampler", "check_master_weights",
           "clear_grads", "decay_groups", "find_layers", "load_probabilities", "optimizer_class", "reject_peft",
           "tensor_bytes", "unwrap"]

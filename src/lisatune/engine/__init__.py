"""The LISA engine: find a model's blocks, sample the active set, and optimize only it.

Depends on torch, numpy and pydantic, and within lisatune only on the two foundation modules `errors` and
`schema`; nothing here knows of distribution, recipes, methods or benchmarks. Whatever must happen at a switch
beyond the engine's own work (the distributed rank check, re-wrapping DDP) is a switch hook registered from above.
"""
from .layers import LayerMap, find_layers, unwrap
from .optim import (LisaAdamW, clear_grads, LisaOptimizer, check_master_weights, decay_groups, optimizer_class, reject_peft,
                    tensor_bytes)
from .options import LisaConfig, load_probabilities
from .sampling import POLICIES, Sampler

__all__ = ["clear_grads", "LayerMap", "LisaAdamW", "LisaConfig", "LisaOptimizer", "POLICIES", "Sampler", "check_master_weights",
           "decay_groups",
           "find_layers", "load_probabilities", "optimizer_class", "reject_peft", "tensor_bytes", "unwrap"]

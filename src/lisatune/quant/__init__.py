"""Quantized memory for LISA: frozen blocks' nn.Linear weights held in int8 / nf4 (`lisa.frozen_weights`).

Nothing happens on import: LisaAdamW attaches FrozenWeights to the optimizer instance it builds.
"""
from .frozen import FrozenWeights, attach_frozen_weights, quantize_linears

__all__ = ["FrozenWeights", "attach_frozen_weights", "quantize_linears"]

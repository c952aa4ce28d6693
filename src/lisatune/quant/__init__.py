"""Quantized memory for LISA: frozen blocks' nn.Linear weights held in int8 / nf4 (`lisa.frozen_weights`).

Importing it installs the engine's global switch hook that does the work (lisatune's `lisa` method imports it).
"""
from .frozen import FrozenWeights, quantize_linears

__all__ = ["FrozenWeights", "quantize_linears"]

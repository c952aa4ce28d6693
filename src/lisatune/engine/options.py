"""LisaConfig: the validated options of the LISA engine (what a YAML `lisa:` section holds).

Declared with every other config section in the foundation module `options` (pydantic only), so that a run
config loads without torch; the engine reads it from here.
"""
from ..options import LisaConfig, load_probabilities

__all__ = ["LisaConfig", "load_probabilities"]

"""Measurements of the methods: memory (`memory`), speed (`speed`) and layerwise weight norms (`norms`).

Submodules import torch/transformers lazily; `commands.register(subparsers)` adds the CLI commands
`lisatune bench memory|speed` and `lisatune norms`.
"""

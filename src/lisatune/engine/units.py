"""What LISA samples, and what trains at every step.

By default each transformer block is one sampled unit. With `units="module"` each block's direct submodules that
hold a matrix (attention and MLP in a Llama block) are units of their own, and γ counts them; a block's other
parameters (its norms) belong to every unit of the block, so they train while any of them is active. With
`sample_embed_head` the embedding and head are one more unit. γ is bounded here, the one place (check_n_layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from ..errors import LisaError
from .layers import LayerMap, Named, split_block
from .options import LisaConfig


@dataclass
class Units:
    names: list[str]  # "block3", with units: module "block3.mlp", and "embed_head" when it is sampled
    params: list[Named]  # each unit's parameters
    block: list[int | None]  # each unit's block (None: embed_head)
    always: Named  # the always-on set: trained at every step

    def __len__(self) -> int:
        return len(self.names)

    def of(self, units: Iterable[int]) -> dict[int, nn.Parameter]:
        """The parameters of `units` by id, each once (module units share their block's norms), in unit order."""
        return {id(p): p for u in sorted(units) for _, p in self.params[u]}

    def trainable(self) -> Named:
        """Every parameter LISA may train."""
        return self.always + [np for u in self.params for np in u]


def build_units(lm: LayerMap, cfg: LisaConfig) -> Units:
    if lm.tied and cfg.train_embedding != cfg.train_head:
        raise LisaError("embedding and head are tied (one tensor): set train_embedding and train_head alike")
    eh = (lm.embedding if cfg.train_embedding else []) + (lm.head if cfg.train_head else [])
    always = [] if cfg.sample_embed_head else list(eh)
    always += (lm.norm if cfg.train_norm else []) + (lm.other if cfg.train_other else [])
    units = Units([], [], [], always)
    for i, block in enumerate(lm.blocks):
        subs, shared = split_block(f"{lm.blocks_path}.{i}", block) if cfg.units == "module" else ({}, [])
        parts = {f"block{i}.{c}": named + shared for c, named in subs.items()} or {f"block{i}": list(block)}
        for name, named in parts.items():
            units.names.append(name)
            units.params.append(named)
            units.block.append(i)
    if cfg.sample_embed_head:
        if not eh:
            raise LisaError("sample_embed_head needs train_embedding or train_head")
        units.names.append("embed_head")
        units.params.append(list(eh))
        units.block.append(None)
    found = (f"{lm.n_blocks} transformer blocks found at {lm.blocks_path}" if cfg.units == "block" else
             f"{len(units) - cfg.sample_embed_head} block submodules (units: module) found at {lm.blocks_path}")
    # bernoulli with its own probabilities draws a random number of units: γ is then only >= 1
    check_n_layers(cfg.n_layers, len(units) if cfg.policy != "bernoulli" or cfg.probabilities is None else None,
                   found + (" (+1 embed_head unit)" if cfg.sample_embed_head else ""))
    return units


def check_n_layers(n_layers: int, n_units: int | None, found: str | None = None) -> None:
    """γ's one bound, wherever it is given (the run config, LisaAdamW's arguments, a Sampler): 1 <= γ <= the units
    there are to sample (`n_units`; None: no upper bound). `found` says what they are, for the message."""
    if n_layers >= 1 and (n_units is None or n_layers <= n_units):
        return
    if n_units is None:
        raise LisaError(f"n_layers (γ) = {n_layers} must be >= 1")
    over = n_layers > n_units and found is not None  # a model's units: name what was found
    raise LisaError(f"n_layers (γ) = {n_layers} {'exceeds the' if over else 'must be between 1 and the'} "
                    f"{found or f'{n_units} sampleable units'}")

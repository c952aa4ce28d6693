"""Whether a model keeps packed examples apart (data.packing), and how its batches must be laid out for it.

transformers 5 reads packed examples from position_ids that restart at 0, given no attention mask and no cache
(masking_utils._preprocess_mask_arguments), by attention implementation:
  eager, sdpa, flex_attention      find_packed_sequence_indices: a causal mask per example, in any number of rows
  flash_attention_2 / _3 / _4      _is_packed_sequence: cu_seqlens for the varlen kernel, in a batch of one row
                                   only (more rows run the plain kernel across the boundaries): one flat row
  anything else (a Hub kernel, a registered function, paged attention) builds no such mask: refused.
The model's own code must also hand position_ids to its mask (OPT does not): `leaks` runs a probe for that.
"""
from __future__ import annotations

import torch

from ..errors import LisaError
from .loss import model_inputs

ROWS = ("eager", "sdpa", "flex_attention")
FLAT = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def attention_of(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def flat_rows(attention: str | None) -> bool:
    """Whether packed batches go as one flat row (flash attention) or padded rows; refuses the others."""
    if attention not in ROWS + FLAT:
        raise LisaError(f"data.packing: the model's attention implementation '{attention}' does not keep packed "
                        f"examples apart (transformers does so for {', '.join(ROWS + FLAT)}); set data.packing=false")
    return attention in FLAT


@torch.no_grad()
def leaks(model) -> bool:
    """Whether the second of two packed examples attends to the first: its logits change when only the first
    does. With per-example masks they do not change at all (masked keys weigh exactly 0)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(model.config.vocab_size, (n,), generator=g) for n in (6, 6, 5))
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)

    def logits(a: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([a, second])[None].to(device)
        return model(**model_inputs(ids, None, position_ids)).logits[0, 6:].float()  # as the losses call it

    try:
        x, y = logits(first), logits(other)
    finally:
        model.train(was)
    return not torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def check_packing(model) -> bool:
    """For data.packing: whether batches go as one flat row; a one-line error if examples would see each other."""
    attention = attention_of(model)
    flat = flat_rows(attention)
    if leaks(model):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise LisaError(f"data.packing: packed examples attend to each other in this '{kind}' model with attention "
                        f"'{attention}' (its code does not mask by position_ids); set data.packing=false")
    return flat

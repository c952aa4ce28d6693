"""Batches: examples padded into tensors (the only part of lisatune.data that needs torch)."""
from __future__ import annotations

import torch

from .render import IGNORE


def collate(examples: list[dict], pad_id: int, device: torch.device | str | None = None,
            flat: bool = False) -> dict[str, torch.Tensor | None]:
    """Right-pad to the longest example: input_ids with pad_id, labels with -100, attention_mask 0.

    Packed sequences (data.packing) get position_ids and attention_mask None instead: transformers then masks
    each packed example by its restarting positions (it does so only without a mask). Padding sits at position
    0, so each pad token is a sequence of its own. `flat`: the batch in one row, for flash attention, which
    reads packed examples from position_ids only in a batch of one row.
    """
    if flat:
        examples = [{k: [v for e in examples for v in e[k]] for k in examples[0]}]
    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], dtype=torch.long,
                            device=device)

    batch = {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", IGNORE)}
    if "position_ids" in examples[0]:
        return batch | {"attention_mask": None, "position_ids": padded("position_ids", 0)}
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples],
                        dtype=torch.long, device=device)
    return batch | {"attention_mask": mask}

"""Training data: each format's loader gives examples {"input_ids", "labels"} (labels -100 where no loss).

sources.read_source reads the records (a JSON/JSONL file, or through `datasets`: CSV, Parquet, Arrow, a saved
dataset, a Hub dataset); splits.load_splits picks the format's loader, makes the validation split, drops over-long
examples and packs them (data.packing, pack.py); batch.collate pads a batch of them into tensors.

Names are imported when first used (PEP 562), so that `lisatune.data.config` (DataConfig, read by the run config)
loads pydantic only: no torch, datasets or transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"DataConfig": "config", "collate": "batch", "data_fingerprint": "splits", "source_digest": "splits",
         "load_splits": "splits", "encode_prompt": "render", "render_prompt": "render", "IGNORE": "render",
         "extract_answer": "gsm", "gsm_eval_items": "gsm", "encode_items": "gsm", "gsm_train_items": "gsm",
         "use_chat_template": "chat", "FORMATS": "formats", "read_source": "sources",
         "read_hub_fingerprint": "sources", "load_text": "text", "read_paragraphs": "text"}

__all__ = ["DataConfig", "collate", "data_fingerprint", "encode_prompt", "extract_answer", "gsm_eval_items",
           "load_splits", "render_prompt"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lisatune.data' has no attribute {name!r}")

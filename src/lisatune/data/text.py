"""Plain text for continued pre-training: documents joined with EOS and packed into full blocks."""
from __future__ import annotations

import re
from typing import Any

from ..errors import LisaError
from ..schema import read_text
from .records import string_field
from .render import eos_id


def read_paragraphs(path: str, option: str = "data.path") -> list[str]:
    """A .txt file's blank-line separated paragraphs."""
    docs = [d.strip() for d in re.split(r"\n\s*\n", read_text(path, option))]
    docs = [d for d in docs if d]
    if not docs:
        raise LisaError(f"{path}: the dataset is empty")
    return docs


def documents(records: list[tuple[str, Any]]) -> list[str]:
    """The `text` of each record."""
    return [string_field(loc, rec, "text") for loc, rec in records]


def load_text(docs: list[str], tokenizer, max_length: int, source: str) -> list[dict]:
    eos = eos_id(tokenizer)
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    n_blocks = len(stream) // max_length  # the short remainder is dropped: every block is full, no padding
    if n_blocks == 0:
        raise LisaError(f"{source}: {len(stream)} tokens in all, fewer than one block of max_length={max_length}")
    blocks = [stream[i * max_length:(i + 1) * max_length] for i in range(n_blocks)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]

"""Alpaca records: {"instruction", "input" (optional), "output"}."""
from __future__ import annotations

from typing import Any

from .records import string_field
from .render import encode_pair


def load_alpaca(records: list[tuple[str, Any]], tokenizer) -> list[dict]:
    examples = []
    for loc, rec in records:
        instruction = string_field(loc, rec, "instruction")
        extra = string_field(loc, rec, "input", required=False)
        output = string_field(loc, rec, "output")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        examples.append(encode_pair(tokenizer, prompt, output, loc))
    return examples

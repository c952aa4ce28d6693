"""Alpaca records: {"instruction", "input" (optional), "output"}, as a JSON array or JSONL."""
from __future__ import annotations

from .records import read_records, string_field
from .render import encode_pair


def load_alpaca(path: str, tokenizer, option: str = "data.path") -> list[dict]:
    examples = []
    for loc, rec in read_records(path, option):
        instruction = string_field(loc, rec, "instruction")
        extra = string_field(loc, rec, "input", required=False)
        output = string_field(loc, rec, "output")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        examples.append(encode_pair(tokenizer, prompt, output, loc))
    return examples

"""Reading JSON / JSONL records, each tagged with where it came from so errors can point at it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LisaError
from ..schema import read_text


def read_records(path: str, option: str) -> list[tuple[str, Any]]:
    """(location, record) pairs from a JSON array or a JSONL file.

    Location is `file:line` for JSONL and `file[index]` for a JSON array, where lines mean nothing.
    """
    text = read_text(path, option)
    data = None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": a complete value, then more: JSONL whose records are arrays
                raise LisaError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, list):
        out = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    else:
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise LisaError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not out:
        raise LisaError(f"{path}: the dataset is empty")
    for loc, rec in out:
        if not isinstance(rec, dict):
            raise LisaError(f"{loc}: record is not a JSON object")
    return out


def string_field(loc: str, rec: dict, name: str, required: bool = True) -> str | None:
    value = rec.get(name)
    if value is None:
        if required:
            raise LisaError(f"{loc}: record has no '{name}'")
        return None
    if not isinstance(value, str):
        raise LisaError(f"{loc}: '{name}' is not a string (got {type(value).__name__})")
    return value

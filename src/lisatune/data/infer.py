"""data.format when a config does not give one: from the first record's fields, as a user would read them."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LisaError
from .config import FIELDS
from .formats import FORMATS, INFER
from .sources import read_source

log = logging.getLogger("lisatune")

MARKERS = tuple((FORMATS[f].marker, f) for f in INFER)  # the field that marks each format, most specific first


def format_of(fields, where: str, key: str = "data.format") -> str:
    """The format whose marking field is among `fields`, or one LisaError line saying what was found."""
    fmt = next((f for marker, f in MARKERS if marker in fields), None)
    if fmt is None:
        known = ", ".join(f"{f}: {marker}" for marker, f in MARKERS)
        raise LisaError(f"{key}: not set, and {where} has fields {', '.join(map(str, fields)) or 'none'}, "
                        f"which match no format ({known}); set data.format (and data.columns to map fields)")
    return fmt


def infer_format(path: str, split: str = "train", columns: dict | None = None, option: str = "data.path") -> str:
    """The format of data.path (or of the source `option` names, e.g. data.datasets[1].path): a .txt file is text; data.columns' keys are a format's fields; else the fields of
    the first record (read as training reads it). The inference is logged, so a surprise is visible."""
    key = option.removesuffix(".path") + ".format"  # data.format, data.datasets[i].format
    if columns:
        fmt = format_of(list(columns), "data.columns", key)
        how = f"data.columns ({', '.join(columns)})"
    elif Path(path).suffix.lower() == ".txt":
        fmt, how = "text", "its .txt suffix"
    else:
        loc, first = read_source(path, option, "gsm", split, {}, max_samples=1)[0]  # gsm: no fields to check
        fmt = format_of(list(first), f"the first record ({loc})", key)
        how = f"the fields of the first record ({', '.join(k for k in first if k in FIELDS[fmt]) or 'none'})"
    log.info("%s: %s, inferred from %s of %s (set %s to choose another)", key, fmt, how, path, key)
    return fmt

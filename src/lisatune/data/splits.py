"""Examples of a run's data: each format's loader, the validation split, over-long examples dropped, packing; and
the fingerprint of the sources that resume compares."""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from ..errors import LisaError
from .chat import use_chat_template
from .config import DataConfig
from .formats import FORMATS
from .gsm import encode_items, gsm_eval_items, gsm_train_items
from .pack import pack
from .sources import DEFAULT_SPLIT, one_split, read_hub_fingerprint, read_source, split_option
from .text import load_text, read_paragraphs

log = logging.getLogger("lisatune.data")


def _load_file(cfg: DataConfig, path: str, tokenizer, option: str, split: str,
               max_samples: int | None = None) -> list[dict]:
    """The examples of one source, read in cfg.format with cfg.columns (an entry's, for data.datasets)."""
    if cfg.format == "text" and path.endswith(".txt"):  # one split of paragraphs, sliced as a single file's rows
        docs = read_paragraphs(path, option)
        docs = [d for start, stop in one_split(len(docs), path, option, split) for d in docs[start:stop]]
        if not docs:
            raise LisaError(f"{path}: {split_option(option)} '{split}' selects no paragraph")
        return load_text(docs[:max_samples], tokenizer, cfg.max_length, path)
    records = read_source(path, option, cfg.format, split, cfg.columns, max_samples)
    return FORMATS[cfg.format].load(records, tokenizer, cfg, path)


def training_sources(cfg: DataConfig) -> list[tuple[str, DataConfig]]:
    """(option, config) of each training source: data.path, or each of data.datasets with its own path, format,
    split, columns and max_samples (filled in from data.* when the config was validated)."""
    if not cfg.datasets:
        return [("data.path", cfg)]
    return [(f"data.datasets[{i}].path", cfg.model_copy(update={**e.model_dump(), "datasets": None}))
            for i, e in enumerate(cfg.datasets)]


def _drop_long(examples: list[dict], max_length: int, source: str, packing: bool = False) -> list[dict]:
    # Dropped, not truncated: a truncated example would train on a cut-off answer with no EOS.
    if packing:  # max_length is then the size of a packed sequence: an example that fits none is a mistake
        long = next((i for i, e in enumerate(examples) if len(e["input_ids"]) > max_length), None)
        if long is not None:
            raise LisaError(f"{source}: example {long + 1} has {len(examples[long]['input_ids'])} tokens, more than "
                            f"data.max_length={max_length}, the size of a packed sequence (raise data.max_length, "
                            "or set data.packing=false to drop longer examples)")
        return examples
    kept = [e for e in examples if len(e["input_ids"]) <= max_length]
    if not kept:
        raise LisaError(f"{source}: all {len(examples)} examples are longer than max_length={max_length} tokens")
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d examples longer than max_length=%d tokens",
                    source, len(examples) - len(kept), len(examples), max_length)
    return kept


def _split(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    n = len(examples)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise LisaError(f"data.val_fraction={fraction} of {n} examples leaves no training example")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    # Both parts keep file order: the split is random, the content stays easy to trace back.
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def load_splits(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, val) examples for cfg; val may be empty (no val_path, val_fraction 0 and format not gsm).
    data.chat_template, if set, becomes the tokenizer's template here (the saved models carry it)."""
    use_chat_template(tokenizer, cfg.chat_template)
    def fitting(examples: list[dict], source: str) -> list[dict]:
        return _drop_long(examples, cfg.max_length, source, cfg.packing)

    if cfg.format == "gsm":
        language = cfg.gsm_language
        train = fitting(encode_items(gsm_train_items(cfg), tokenizer), f"GSM-symbolic ({language}) training problems")
        items = gsm_eval_items(cfg)
        val = fitting(encode_items(items, tokenizer), f"GSM-symbolic ({language}) held-out problems") if items else []
    else:
        train = []
        for option, src in training_sources(cfg):
            train += fitting(_load_file(src, src.path, tokenizer, option, src.split, src.max_samples), src.path)
        if cfg.datasets:
            log.info("training data: %d examples from %d datasets (%s)", len(train), len(cfg.datasets),
                     ", ".join(f"{e.path}: {e.format}" for e in cfg.datasets))
        val = []
        if cfg.val_path:
            val = fitting(_load_file(cfg, cfg.val_path, tokenizer, "data.val_path", cfg.val_split), cfg.val_path)
        elif cfg.val_fraction:
            train, val = _split(train, cfg.val_fraction, cfg.seed)
    val = val[: cfg.val_max_examples]  # in examples, as without packing: the same validation set either way
    if not cfg.packing:
        return train, val
    packed = pack(train, cfg.max_length)
    filled = sum(len(e["input_ids"]) for e in packed) / (len(packed) * cfg.max_length)
    log.info("packed %d training examples into %d sequences of <= %d tokens (%.0f %% filled)", len(train),
             len(packed), cfg.max_length, 100 * filled)
    return packed, pack(val, cfg.max_length)


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """sha256 of what the run trains and validates on, by source: the bytes of data.path (or of each of
    data.datasets, keyed data.datasets[i].path) and data.val_path, or the generated GSM problems (train and
    held-out). Stored in every checkpoint; resume compares it."""
    if cfg.format == "gsm" and not cfg.datasets:
        items = {"train": gsm_train_items(cfg), "eval": gsm_eval_items(cfg)}
        return {"gsm": hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()}
    out = {option: source_digest(src.path, option, src.split, src.max_samples)
           for option, src in training_sources(cfg)}
    if cfg.val_path is not None:
        out["data.val_path"] = source_digest(cfg.val_path, "data.val_path", cfg.val_split)
    return out


def source_digest(path: str, option: str, split: str, max_samples: int | None = None) -> str:
    """sha256 of a data source's content: a file's bytes; a save_to_disk directory's files (names and bytes, so a
    rewritten or added shard counts); a Hub dataset's split by the datasets library's own fingerprint of it. The
    split read and max_samples, when not their defaults, count too (the whole source is hashed either way)."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    if max_samples is not None:  # no cap adds nothing, so fingerprints stored before this stay valid
        h.update(f"max_samples:{max_samples}\0".encode())
    if split != DEFAULT_SPLIT.get(option, "train") and (p.is_file() or p.is_dir()):
        # the part of the source read (a slice, another split) is data too; the default adds nothing, so
        # fingerprints stored before this stay valid
        h.update(f"split:{split}\0".encode())
    try:
        if p.is_file():
            _hash_file(h, p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            if not files:
                raise LisaError(f"{option} '{path}' is an empty directory")
            for f in files:
                h.update(f"{f.relative_to(p).as_posix()}\0".encode())
                _hash_file(h, f)
        else:  # not on disk: read_source's Hub name (or its one-line error), read from the datasets cache
            h.update(f"{path}:{split}:{read_hub_fingerprint(path, option, split)}".encode())
    except OSError as e:
        raise LisaError(f"{option} '{path}' cannot be read ({e.strerror or e})") from None
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)

"""Where records come from, with the format's field names (data.columns renames the dataset's columns).

    .json / .jsonl           lisatune's own reader: errors name `file:line` (or `file[index]` in a JSON array)
    .csv / .parquet / .arrow one local file, read by the `datasets` library (CSV cells are read as text)
    a directory              written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
    anything else            a Hugging Face Hub dataset name, through `datasets.load_dataset`
Records of a `datasets` source are located as `source[row]` in errors.

data.split (data.val_split) takes the `datasets` split syntax everywhere: `train[:8]`, `train[10%:]`, `train+test`.
A Hub dataset reads it itself; a saved DatasetDict is sliced here; a single file or a saved Dataset is one split,
train (validation too, for data.val_path, its default), so only its slices apply.
"""
from __future__ import annotations

import csv
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import LisaError, first_line
from .config import FIELDS
from .records import read_records

if TYPE_CHECKING:
    from datasets import Dataset


# `datasets` is imported where a source needs it: `import lisatune` and the GPU check run without it.
def load_dataset(*args, **kwargs):
    import datasets
    return datasets.load_dataset(*args, **kwargs)


def load_from_disk(*args, **kwargs):
    import datasets
    return datasets.load_from_disk(*args, **kwargs)

OWN_READER = (".json", ".jsonl")
FILE_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FILE_SUFFIXES = {*OWN_READER, *FILE_BUILDERS, ".txt"}
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "owner/name"


def read_source(path: str, option: str, fmt: str, split: str, columns: dict[str, str],
                max_samples: int | None = None) -> list[tuple[str, Any]]:
    """(location, record) pairs of `path`, records keyed by the format's field names; the first `max_samples` of
    the split's records if given. `option` names the source in errors: data.path, data.datasets[1].path, ..."""
    p = Path(path).expanduser()
    if p.suffix.lower() in OWN_READER:
        records = read_records(path, option)
        records = [r for start, stop in one_split(len(records), path, option, split) for r in records[start:stop]]
        if not records:
            raise LisaError(f"{path}: {split_option(option)} '{split}' selects no record")
        return [(loc, _rename(loc, rec, fmt, columns, option)) for loc, rec in records[:max_samples]]
    if p.is_file():
        if p.suffix.lower() not in FILE_BUILDERS:
            raise LisaError(f"{option} '{path}': unknown file type '{p.suffix}' (expected "
                            f"{', '.join(sorted(FILE_SUFFIXES - {'.txt'}))}, a dataset directory or a Hub name)")
        ds, name = _sliced(_load_file(p, option), path, option, split), path
    elif p.is_dir():
        ds, name = _load_dir(p, path, option, split)
    elif p.suffix.lower() in FILE_SUFFIXES or not HUB_NAME.match(path):
        raise LisaError(f"{option} '{path}' does not exist")
    else:
        ds, name = _load_hub(path, option, split), f"{path}:{split}"
    _check_columns(ds, name, fmt, columns, option)
    if len(ds) == 0:
        if is_slice(split):
            raise LisaError(f"{name}: {split_option(option)} '{split}' selects no record")
        raise LisaError(f"{name}: the dataset is empty")
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    back = {col: field for field, col in columns.items()}  # dataset column -> format field
    # A field comes only from its mapped column (a column of the field's own name is then left out).
    return [(f"{name}[{i}]", {back.get(k, k): v for k, v in row.items() if k in back or k not in columns})
            for i, row in enumerate(ds)]


DEFAULT_SPLIT = {"data.path": "train", "data.val_path": "validation"}


def split_option(option: str) -> str:
    """The split key of a source option: data.path -> data.split, data.datasets[1].path -> data.datasets[1].split."""
    return _sibling(option, "split")


def _sibling(option: str, key: str) -> str:
    if option == "data.val_path":
        return f"data.val_{key}" if key == "split" else f"data.{key}"
    if option.startswith("data.datasets[") and option.endswith(".path"):
        return f"{option.removesuffix('.path')}.{key}"
    return f"data.{key}"


def is_slice(split: str) -> bool:
    return "[" in split or "+" in split


def _absolute(split: str, sizes: dict[str, int], option: str, where: str) -> list[tuple[str, int, int]]:
    """datasets' split syntax as (split, start, stop) over splits of `sizes` rows, or one line naming the option."""
    from datasets import ReadInstruction
    try:
        return [(a.splitname, a.from_, a.to) for a in ReadInstruction.from_spec(split).to_absolute(sizes)]
    except (ValueError, AssertionError) as e:
        raise LisaError(f"{split_option(option)} '{split}': {first_line(e)} ({where}; the syntax is the datasets "
                        "library's, e.g. train[:8], train[10%:], train+test)") from None


def one_split(n: int, path: str, option: str, split: str) -> list[tuple[int, int]]:
    """The row ranges `split` selects of a source that is one split (a single file, a saved Dataset): all of it for
    the option's default split name, else datasets' syntax over the one split, named train."""
    if split == DEFAULT_SPLIT.get(option, "train"):
        return [(0, n)]
    return [(a, b) for _, a, b in _absolute(split, {"train": n}, option, f"'{path}' is one split, train")]


def _sliced(ds: Dataset, path: str, option: str, split: str) -> Dataset:
    ranges = one_split(len(ds), path, option, split)
    if ranges == [(0, len(ds))]:
        return ds
    return ds.select([i for a, b in ranges for i in range(a, b)])


def _rename(loc: str, rec: Any, fmt: str, columns: dict[str, str], option: str = "data.path") -> Any:
    if not columns or not isinstance(rec, dict):
        return rec  # a non-object record is refused by the format's loader, with its location
    out = {k: v for k, v in rec.items() if k not in columns}  # as for datasets sources below
    for field, col in columns.items():
        if col in rec:
            out[field] = rec[col]
        elif FIELDS[fmt][field]:
            raise LisaError(f"{loc}: record has no '{col}' ({_sibling(option, 'columns')}.{field})")
    return out


def _check_columns(ds: Dataset, name: str, fmt: str, columns: dict[str, str], option: str = "data.path") -> None:
    have = ds.column_names
    for field, col in columns.items():
        if col not in have:
            raise LisaError(f"{name}: {_sibling(option, 'columns')}.{field} is '{col}', which is not a column "
                            f"(columns: {', '.join(have)})")
    for field, required in FIELDS[fmt].items():
        if required and field not in columns and field not in have:
            raise LisaError(f"{name}: no column '{field}' for format '{fmt}' (columns: {', '.join(have)}); "
                            f"map one with data.columns, e.g. --set data.columns.{field}=COLUMN "
                            f"(lisatune eval: --columns {field}=COLUMN)")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    # datasets logs an error before raising it; the exception is reported as one LisaError line instead.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_file(p: Path, option: str) -> Dataset:
    builder = FILE_BUILDERS[p.suffix.lower()]
    kw = {}
    if builder == "csv":  # as text: "007" or "1.50" must not come back as numbers
        try:
            with open(p, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise LisaError(f"{option} '{p}': not a readable CSV file ({first_line(e, cause=True)})") from None
        from datasets import Features, Value
        kw["features"] = Features({c: Value("string") for c in header})
    try:
        with _quiet_datasets():
            return load_dataset(builder, data_files=str(p), split="train", **kw)  # one file is one split
    except Exception as e:  # pyarrow / pandas / datasets errors have no common base
        if "corresponds to no data" in first_line(e, cause=True):  # how datasets says a file holds no rows
            raise LisaError(f"{p}: the dataset is empty") from None
        raise LisaError(f"{option} '{p}': not a readable {builder} file ({first_line(e, cause=True)})") from None


def _load_dir(p: Path, path: str, option: str, split: str) -> tuple[Dataset, str]:
    try:
        with _quiet_datasets():
            ds = load_from_disk(str(p))
    except Exception as e:
        raise LisaError(f"{option} '{path}' is a directory but not one written by save_to_disk "
                        f"({first_line(e, cause=True)})") from None
    from datasets import DatasetDict, concatenate_datasets
    if isinstance(ds, DatasetDict):
        if is_slice(split):
            parts = _absolute(split, {k: len(v) for k, v in ds.items()}, option,
                              f"'{path}' has splits {', '.join(ds)}")
            return concatenate_datasets([ds[name].select(range(a, b)) for name, a, b in parts]), f"{path}:{split}"
        if split not in ds:
            raise LisaError(f"{option} '{path}' has no split '{split}' (splits: {', '.join(ds)}); "
                            "set data.split / data.val_split (lisatune eval: --split)")
        return ds[split], f"{path}:{split}"
    return _sliced(ds, path, option, split), path


def read_hub_fingerprint(path: str, option: str, split: str) -> str:
    """The datasets library's fingerprint of a Hub dataset's split (a hash of its source files and version), or
    read_source's one-line error for a path that is neither on disk nor a Hub name."""
    if Path(path).suffix.lower() in FILE_SUFFIXES or not HUB_NAME.match(path):
        raise LisaError(f"{option} '{path}' does not exist")
    return _load_hub(path, option, split)._fingerprint


def _load_hub(name: str, option: str, split: str) -> Dataset:
    try:
        with _quiet_datasets():
            return load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split, a gated dataset...
        raise LisaError(f"{option} '{name}' is neither a local path nor a loadable Hugging Face Hub dataset "
                        f"(split '{split}': {first_line(e, cause=True)})") from None

"""#28: conversations as peers write them (field and role names, tools, LLaMA-Factory's system/history,
ShareGPT's system), templates that re-render history (Qwen3-like), split slices, and a DataConfig that imports
without torch."""
import json
import subprocess
import sys

import pytest

from helpers import EOS, tiny_tokenizer
from lisatune.data import DataConfig, load_splits
from lisatune.data.render import IGNORE
from lisatune.errors import LisaError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def trained_runs(tok, example):
    """The labelled tokens as text, one string per run of consecutive labelled tokens."""
    runs, run = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            assert label == i
            run.append(i)
    return runs + ([tok.decode(run)] if run else [])


def test_the_data_config_imports_no_torch_datasets_or_transformers():
    code = ("import sys, lisatune.data.config; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # and every name `from lisatune.data import ...` gave before still comes (lazily)
    import lisatune.data as data
    for name in data.__all__:
        assert callable(getattr(data, name)), name

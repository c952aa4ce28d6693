"""The arguments of `lisatune train`, `lisatune eval` and `lisatune config`, declared without the runtime: their
`--help` (and `lisatune config`, which lists every key of the run config) imports no torch. What runs is named
as "module:function" and imported by cli.main only when it runs (train and eval: recipe/commands.py); train's
run config is loaded and checked before that (`prepare`), so a mistake in it is reported without the library.
"""
from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from typing import get_args

from ..data.config import DataConfig
from ..schema import cli_column, cli_int
from .config import ALIASES, METHOD_KEYS, TrainConfig, config_keys, load_config

GSM_SAMPLES = 16  # lisatune eval --gsm-samples' default


def train_config(args):
    """The run config of `lisatune train ARGS`: the file (or the embedded default), --set, then the flags."""
    overrides = list(args.set or [])
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train")  # (its line in `lisatune --help`: cli.COMMANDS)
    t.add_argument("config", nargs="?", help="run config (YAML); omit for the embedded default")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=3e-5")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    t.add_argument("--output-dir", help="shortcut for --set train.output_dir=DIR")
    # The config is checked first, without the library: a mistake in it answers at once.
    t.set_defaults(func="lisatune.recipe.commands:cmd_train", prepare=train_config)

    e = sub.add_parser("eval")
    e.add_argument("model", help="model directory, .gguf file, or 'smollm2'")
    # The loss options default to None, so that one given with --tasks (where it does nothing) is refused.
    e.add_argument("--format", help="data format (default: gsm)", choices=get_args(DataConfig.model_fields["format"].annotation))
    e.add_argument("--data", help="data file, saved dataset directory or Hub dataset name (every format but gsm)")
    e.add_argument("--split", help="split of a Hub dataset or saved DatasetDict, e.g. test or 'train[:500]' "
                                   "(as data.split; default: train)")
    e.add_argument("--columns", nargs="+", action="extend", type=cli_column, metavar="FIELD=COLUMN",
                   help="the dataset's column for a field of the format, e.g. instruction=prompt (as data.columns)")
    e.add_argument("--max-length", type=cli_int(8), help="tokens; longer examples are dropped (default: "
                   f"training's, {DataConfig.model_fields['max_length'].default})")
    e.add_argument("--max-examples", type=int, metavar="N", help="evaluate the loss on the first N examples only")
    e.add_argument("--batch-size", type=cli_int(1), default=8)
    e.add_argument("--gsm-samples", type=cli_int(0), help=f"held-out GSM problems to answer (0: loss only; default "
                   f"{GSM_SAMPLES})")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--tasks", metavar="NAMES", help="lm-evaluation-harness tasks, comma-separated, instead of the "
                   "loss: lisatune_gsm, lisatune_gsm_mc (shipped), or any under --include-path or lm-eval's own")
    e.add_argument("--include-path", metavar="DIR", help="a folder of lm-eval task YAML files (with --tasks)")
    e.add_argument("--limit", type=cli_int(1), metavar="N", help="documents per lm-eval task (with --tasks)")
    e.add_argument("--allow-task-code", action="store_true", help="run the Python that task files under "
                   "--include-path import with '!function' (refused without it, as trust_remote_code)")
    e.set_defaults(func="lisatune.recipe.commands:cmd_eval")
    _register_config(sub)


def cmd_config(args) -> int:
    """Every key of the run config with its default and one line of help, from the declared schema."""
    rows = config_keys(args.section)
    aliases = {f"{section}.{key}": sorted(a for a, k in names.items() if k == key)
               for section, names in ALIASES.items() for key in set(names.values())} | {"method": list(METHOD_KEYS)}
    width = max(len(f"{k} = {_value(d)}") for k, d, _ in rows) + 2
    wrap = max(40, shutil.get_terminal_size((120, 24)).columns - width)
    for key, default, text in rows:
        also = f" (also: {', '.join(aliases[key])})" if args.aliases and aliases.get(key) else ""
        lines = textwrap.wrap(text + also, wrap) or [""]
        print((f"{key} = {_value(default)}".ljust(width) + lines[0]).rstrip())
        for more in lines[1:]:
            print(" " * width + more)
    return 0


def _value(default) -> str:
    """A default as a YAML value reads (JSON is YAML): null, true, "runs/default", [0.9, 0.999]."""
    return json.dumps(list(default) if isinstance(default, tuple) else default)


def _register_config(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("config")  # (its line in `lisatune --help`: cli.COMMANDS)
    c.add_argument("section", nargs="?", choices=list(TrainConfig.model_fields),
                   help="list only this section's keys (or the top-level key of this name)")
    c.add_argument("--aliases", action="store_true", help="also the other tools' names each key accepts "
                                                          "(HF TrainingArguments, axolotl, LMFlow, ms-swift)")
    c.set_defaults(func=cmd_config)

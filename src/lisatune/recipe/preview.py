"""`lisatune data preview CONFIG`: one tokenized example of a run's data, the tokens that carry loss marked, and
the counts, so a template, data.loss_on or data.columns can be checked before any training.

Only the tokenizer is loaded (not the model) where the source allows it: a directory or a Hub id.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import transformers

from ..data import load_splits
from ..data.render import IGNORE
from ..errors import LisaError
from ..schema import cli_int
from .config import load_config
from .models import ModelConfig, hub_snapshot, is_hub_id, load_model

OPEN, CLOSE = "[[", "]]"  # around the tokens that carry loss


def load_tokenizer(cfg: ModelConfig):
    """The run's tokenizer; a GGUF source ('smollm2', a .gguf) only through the model it is converted with."""
    path = hub_snapshot(cfg) if is_hub_id(cfg.source) else Path(cfg.source).expanduser()
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    return load_model(cfg)[1]


def marked(tokenizer, example: dict) -> str:
    """The example as text, each run of tokens that carry loss between [[ ]]."""
    out, run, trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        if (label != IGNORE) != trained and run:
            out.append(f"{OPEN}{tokenizer.decode(run)}{CLOSE}" if trained else tokenizer.decode(run))
            run = []
        trained = label != IGNORE
        run.append(token)
    if run:
        out.append(f"{OPEN}{tokenizer.decode(run)}{CLOSE}" if trained else tokenizer.decode(run))
    return "".join(out)


def counts(examples: list[dict]) -> tuple[int, int]:
    return (sum(len(e["input_ids"]) for e in examples),
            sum(label != IGNORE for e in examples for label in e["labels"]))


def cmd_preview(args) -> int:
    cfg = load_config(args.config, list(args.set or []))
    d = cfg.data.model_copy(update={"packing": False})  # one example as written, not a packed sequence
    tokenizer = load_tokenizer(cfg.model)
    train, val = load_splits(d, tokenizer)
    examples, name = (val, "validation") if args.val else (train, "training")
    if not examples:
        raise LisaError("--val: this config has no validation set (data.val_path or data.val_fraction)")
    if args.index >= len(examples):
        raise LisaError(f"--index {args.index}: the {name} set has {len(examples)} examples (0 to "
                        f"{len(examples) - 1})")
    example = examples[args.index]
    n, trained = counts([example])
    total, total_trained = counts(examples)
    source = d.path or (", ".join(e.path for e in d.datasets) if d.datasets else "GSM-symbolic problems")
    loss_on = f", data.loss_on {d.loss_on}" if d.format in ("chat", "sharegpt") else ""
    print(f"{name} example {args.index} of {len(examples)} ({source}, format {d.format}{loss_on}); "
          f"{OPEN} {CLOSE} mark the tokens that carry loss:")
    print(marked(tokenizer, example))
    print(f"tokens: {n}, carrying loss: {trained} ({100 * trained / n:.0f} %)")
    print(f"{name} set: {len(examples)} examples, {total} tokens, {total_trained} carrying loss "
          f"({100 * total_trained / total:.0f} %)" + (" (before packing)" if cfg.data.packing else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data")  # (its line in `lisatune --help`: cli.COMMANDS)
    actions = d.add_subparsers(dest="data_command", required=True, metavar="{preview}")
    p = actions.add_parser("preview", help="print one tokenized example with the tokens that carry loss marked")
    p.add_argument("config", help="run config (YAML): its model's tokenizer and its data section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. "
                   "data.loss_on=last_assistant")
    p.add_argument("--index", type=cli_int(0), default=0, metavar="N", help="which example (default 0, the first)")
    p.add_argument("--val", action="store_true", help="an example of the validation set instead")
    p.set_defaults(func=cmd_preview)

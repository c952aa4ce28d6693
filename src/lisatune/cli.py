"""`lisatune train | eval | config | generate | bench | norms | plan | study | data`: a light front door over the
library.

`lisatune --help` imports no torch: each subcommand lives in a module that registers its arguments
(`register(subparsers)`) and imports the library, and that module is imported only when its subcommand runs.
A module may register a light parser whose `func` names what runs as "module:function" (train, eval: their
`--help` imports no torch either); that module is imported only then, after an optional light `prepare(args)`
(train: loading its config, so that a mistake in it answers at once).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from .errors import LisaError, first_line
from .schema import OneLineParser, os_reason

LOG_LEVELS = ["debug", "info", "warning", "error"]
# subcommand -> (the module that registers and runs it, its line in `lisatune --help`)
COMMANDS = {
    "train": ("lisatune.recipe.arguments", "fine-tune a model from a YAML config (none: the embedded SmolLM2 default)"),
    "eval": ("lisatune.recipe.arguments", "eval loss / perplexity (and GSM exact match), or lm-eval tasks, of a model"),
    "config": ("lisatune.recipe.arguments", "every key of the run config with its default and one line of help"),
    "generate": ("lisatune.recipe.generate", "complete a prompt, or chat over stdin, with a model"),
    "bench": ("lisatune.analysis.commands", "measure memory or speed of the fine-tuning methods"),
    "norms": ("lisatune.analysis.commands", "layerwise weight norms of LoRA vs full FT -> LISA probabilities"),
    "plan": ("lisatune.analysis.commands", "predict a training step's memory per method from the config alone "
                                           "(meta device: no weights loaded)"),
    "study": ("lisatune.study", "run a grid of training runs (resumable) and write a report"),
    "data": ("lisatune.recipe.preview", "data preview CONFIG: one tokenized example with the tokens that carry "
                                        "loss marked"),
}


def _parser(commands: dict[str, str] | None) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    p = OneLineParser(prog="lisatune", description="LISA fine-tuning (Layerwise Importance Sampled AdamW)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                           help="lisatune's own messages (default: info)")
    verbosity.add_argument("--quiet", "-q", action="store_true",
                           help="warnings and errors only, no progress bars (results are still printed)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help in (commands or {}).items():  # placeholders: what follows the name is the module's to parse
        sub.add_parser(name, help=help, add_help=False)
    return p, sub


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command` (None: of every subcommand), its module imported."""
    p, sub = _parser(None)
    names = [command] if command else list(COMMANDS)
    for module in dict.fromkeys(COMMANDS[n][0] for n in names):
        importlib.import_module(module).register(sub)
    return p


def configure_logging(level: str, quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Our own progress at `level`; libraries stay at warnings.
    logging.getLogger("lisatune").setLevel(logging.WARNING if quiet else level.upper())
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its 4-bit CPU kernel notice on import (unused here)
    if quiet:  # transformers' and huggingface_hub's loading/saving bars (imported here: the subcommand loaded it)
        importlib.import_module("transformers.utils.logging").disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    front, _ = _parser({n: h for n, (_, h) in COMMANDS.items()})
    command = front.parse_known_args(argv)[0].command  # --help, no or an unknown subcommand: answered here
    args = build_parser(command).parse_args(argv)
    configure_logging(args.log_level, args.quiet)
    try:
        if getattr(args, "prepare", None) is not None:  # light work first (train: its config), kept as args.prepared
            args.prepared = args.prepare(args)
        if isinstance(args.func, str):  # "module:function", imported now that it runs
            module, _, name = args.func.partition(":")
            args.func = getattr(importlib.import_module(module), name)
        return args.func(args)
    except LisaError as e:
        print(f"lisatune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves a checkpoint first)
        print("lisatune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # what no layer below turned into a LisaError: still one line, naming the file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lisatune: error: {os_reason(e)}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else a subcommand raised: one line; the traceback under --log-level debug
        if args.log_level == "debug":
            traceback.print_exc()
        print(f"lisatune {command}: error: {type(e).__name__}: {first_line(e)} (the traceback: --log-level debug)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`lisatune train` and `lisatune eval`: the run and the evaluation of a model, as subcommands.

Their arguments are declared in recipe/arguments.py (no torch, so that `--help` answers at once); this module,
which imports the whole library, is imported only when one of them runs.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

from ..data import DataConfig, gsm_eval_items, load_splits
from ..data.sources import OWN_READER
from ..errors import LisaError
from ..integrations import harness
from ..schema import no_effect, read_text
from .arguments import GSM_SAMPLES, train_config
from .checkpoint import latest_checkpoint
from .evaluate import eval_loss, gsm_accuracy, placement
from .loop import Interrupted, train
from .models import ModelConfig, check_positions, load_model
from .progress import console
from .run_dir import describe_eval


def train_command(args, resume: bool) -> str:
    """This `lisatune train` as a command to paste: the config, every --set and --output-dir (so it names this
    run's directory, not the config's), and --resume if asked; --resume/--overwrite of this one left out."""
    parts = ["lisatune", "train"] + ([args.config] if args.config else [])
    for s in args.set or []:
        if s.partition("=")[0].strip() not in ("train.resume", "train.overwrite"):
            parts += ["--set", s]
    if args.output_dir:
        parts += ["--output-dir", args.output_dir]
    return shlex.join(parts + (["--resume"] if resume else []))


def cmd_train(args) -> int:
    cfg = getattr(args, "prepared", None) or train_config(args)  # cli.main loads it before importing this module
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun/accelerate, one summary, not one per rank
    try:
        s = train(cfg)
    except Interrupted as e:
        if rank0:
            print(f"lisatune: {e}; continue with: {train_command(args, resume=True)}")
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint of this step
        if rank0:
            last = latest_checkpoint(cfg.train.output_dir)
            print("lisatune: stopped by a second interrupt; " +
                  (f"the last checkpoint is {last}; continue with: {train_command(args, resume=True)}" if last else
                   f"no checkpoint was written; start again with: {train_command(args, resume=False)}"),
                  file=sys.stderr)
        return 130
    if not rank0:
        return 0
    if s.get("already_complete"):
        print(f"run in {cfg.train.output_dir} is already complete (use --overwrite to train again)")
    print(f"\n{s['method']} fine-tuning of {s['model']}: {s['steps']} steps in {s['train_seconds']:.0f} s "
          f"({s['tokens_per_s']:.0f} tokens/s)")
    print(f"  train loss: {s['train_loss_first']:.4f} (first 5 steps) -> {s['train_loss_last']:.4f} (last 5)")
    print(f"  before: {describe_eval(s['before'])}")
    print(f"  after:  {describe_eval(s['after'])}")
    print(f"  model saved to {s['final_model']} (AutoModelForCausalLM.from_pretrained loads it)")
    if s.get("best"):  # train.keep_best
        print(f"  best model (eval loss {s['best']['eval_loss']:.4f} at step {s['best']['step']}): {s['best']['model']}")
    print(f"  metrics: {s['metrics']}")
    return 0


def eval_ignored(args) -> str | None:
    """What `lisatune eval` was given that would do nothing, as one line (else None): the loss options with
    --tasks, lm-eval's without, the GSM options with another format."""
    tasks, fmt = args.tasks is not None, args.format or "gsm"
    with_tasks = "with --tasks (lm-eval tasks bring their own documents, prompts and lengths)"
    return no_effect([
        (tasks and args.format is not None, "--format", with_tasks),
        (tasks and args.data is not None, "--data", with_tasks),
        (tasks and args.split is not None, "--split", with_tasks),
        (tasks and bool(args.columns), "--columns", with_tasks),
        (tasks and args.max_length is not None, "--max-length", with_tasks),
        (tasks and args.max_examples is not None, "--max-examples", "with --tasks (--limit N: documents per task)"),
        (tasks and args.gsm_samples is not None, "--gsm-samples", "with --tasks (the GSM answers are the task "
                                                                  "lisatune_gsm)"),
        (not tasks and args.include_path is not None, "--include-path", "without --tasks (the lm-eval tasks to run)"),
        (not tasks and args.limit is not None, "--limit", "without --tasks (documents per lm-eval task; the loss's "
                                                          "is --max-examples)"),
        (args.allow_task_code and args.include_path is None, "--allow-task-code", "without --include-path (it allows "
                                                                                  "the code of task files there)"),
        (not tasks and fmt == "gsm" and args.data is not None, "--data", "with format gsm (it generates its problems)"),
        (not tasks and fmt == "gsm" and args.split is not None, "--split", "with format gsm (it generates its "
                                                                           "problems)"),
        (not tasks and fmt == "gsm" and bool(args.columns), "--columns", "with format gsm (it generates its problems)"),
        (not tasks and fmt != "gsm" and args.gsm_samples is not None, "--gsm-samples", f"with format {fmt} (it "
                                                                                       "answers GSM problems)"),
    ])


def load_on_device(args):
    """(model, tokenizer) of `lisatune eval MODEL` in the run's dtype, on the GPU when there is one."""
    dtype, device = placement(args.model)
    model, tok = load_model(ModelConfig.build(source=args.model, trust_remote_code=args.trust_remote_code,
                                              dtype=dtype))
    return model.to(device), tok


def cmd_eval(args) -> int:
    ignored = eval_ignored(args)
    if ignored:
        raise LisaError(ignored)
    if args.tasks is not None:
        return cmd_eval_tasks(args)
    if args.max_examples is not None and args.max_examples < 1:
        raise LisaError(f"--max-examples must be >= 1 (got {args.max_examples})")
    columns: dict[str, str] = {}
    for field, column in args.columns or []:
        if field in columns:
            raise LisaError(f"--columns: field '{field}' is given twice")
        columns[field] = column
    fmt = args.format or "gsm"
    data = {"format": fmt, "columns": columns,
            **({"max_length": args.max_length} if args.max_length is not None else {})}
    if args.split is not None:
        data["split"] = args.split
    if fmt != "gsm":
        if not args.data:
            raise LisaError(f"--data FILE is needed for format '{fmt}'")
        data["path"] = args.data
    dcfg = DataConfig.build(**data)  # --split and --columns are data.split and data.columns, read as train reads them
    if dcfg.path is not None and Path(dcfg.path).suffix.lower() in (*OWN_READER, ".txt"):
        read_text(dcfg.path, "--data")  # before the model loads: a missing or binary file is found in no time
    with console():
        model, tok = load_on_device(args)
        try:
            train, val = load_splits(dcfg, tok)
        except LisaError as e:  # a bad split: the loader names train's option, here it is a flag
            if not str(e).startswith("data.split "):
                raise
            raise LisaError("--split " + str(e).removeprefix("data.split ")) from None
        examples = (val if fmt == "gsm" else train + val)[: args.max_examples]
        check_positions(model, examples, dcfg.max_length, "--max-length")
        res = eval_loss(model, examples, tok.pad_token_id, args.batch_size)
        gsm_samples = GSM_SAMPLES if args.gsm_samples is None else args.gsm_samples
        if fmt == "gsm" and gsm_samples:
            acc = gsm_accuracy(model, tok, gsm_eval_items(dcfg)[:gsm_samples], batch_size=args.batch_size)
            res |= {k: v for k, v in acc.items() if k != "samples"}
    print(json.dumps(res, indent=1))
    return 0


def cmd_eval_tasks(args) -> int:
    """`lisatune eval MODEL --tasks A,B`: lm-evaluation-harness tasks instead of the loss."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = {"where": "--tasks", "option": "--include-path", "allow_code": args.allow_task_code,
             "code_option": "--allow-task-code"}
    harness.task_manager(tasks, args.include_path, **names)  # an unknown task is found before the model loads
    model, tok = load_on_device(args)
    res = harness.run_tasks(model, tok, tasks, args.include_path, limit=args.limit, batch_size=args.batch_size,
                            progress=logging.getLogger("lisatune").isEnabledFor(logging.INFO), **names)
    print(json.dumps(res, indent=1))
    return 0

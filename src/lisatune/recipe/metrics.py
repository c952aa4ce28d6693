"""Metrics to a JSONL file (one object per line) and, as train.report_to asks, TensorBoard and Weights & Biases."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Iterable

from ..errors import LisaError
from ..options import SINKS  # train.report_to's choices; metrics.jsonl is always written
from ..schema import is_number, os_reason
from .files import open_append, write_atomic


def _rows(text: str) -> list[dict]:
    """The complete rows of a metrics file; a line cut short by a kill mid-write is dropped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def check_sinks(report_to: Iterable[str]) -> None:
    """Before the model loads: a sink asked for that is not installed is a one-line error."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise LisaError("train.report_to: wandb is not installed (pip install 'lisatune[wandb]', or leave it out)")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(run_dir / "tb"))


WANDB_ID = "wandb-run-id"  # in the run directory: a resumed run logs to the same W&B run


def _wandb_id(run_dir: Path, resume: bool) -> str:
    f = run_dir / WANDB_ID
    try:
        kept = f.read_text().strip() if resume and f.is_file() else ""
        if kept:
            return kept
        run_id = secrets.token_hex(4)  # W&B ids are [a-z0-9]
        write_atomic(f, run_id + "\n")
    except OSError as e:
        raise LisaError(f"cannot write {f} ({os_reason(e)})") from None
    return run_id


def _wandb(run_dir: Path, config: dict | None, resume: bool):
    check_sinks(["wandb"])
    import wandb  # optional: only train.report_to [wandb] needs it

    # Offline unless WANDB_MODE says otherwise: nothing leaves the machine (`wandb sync <run>/wandb/offline-run-*`
    # uploads it later, each part of a resumed run into the same run). console off: our progress bar and log
    # lines stay ours.
    try:
        return wandb.init(dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                          project=os.environ.get("WANDB_PROJECT", "lisatune"), name=run_dir.name, config=config,
                          id=_wandb_id(run_dir, resume), resume="allow",
                          settings=wandb.Settings(console="off", silent=True))
    except wandb.errors.Error as e:
        raise LisaError(f"train.report_to: wandb did not start ({e})") from None


class Metrics:
    def __init__(self, run_dir: Path, report_to: Iterable[str] = ("tensorboard",), resume_step: int | None = None,
                 config: dict | None = None):
        """`config`: the run's, for W&B's run page."""
        self.path = run_dir / "metrics.jsonl"
        try:
            if resume_step is not None and self.path.exists():
                # Lines written after the checkpoint we resume from would be repeated: drop them. Atomically:
                # a kill mid-rewrite must leave every row (an emptied file lost them for good).
                keep = [r for r in _rows(self.path.read_text()) if r.get("step", 0) <= resume_step]
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        except OSError as e:
            raise LisaError(f"cannot read {self.path} ({os_reason(e)})") from None
        self.file = open_append(self.path)  # never through a link
        self.tb = _tensorboard(run_dir) if "tensorboard" in report_to else None
        self.wandb = _wandb(run_dir, config, resume_step is not None) if "wandb" in report_to else None

    def write(self, step: int, **values) -> None:
        try:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        except OSError as e:
            raise LisaError(f"cannot write {self.path} ({os_reason(e)})") from None
        numbers = {k: v for k, v in values.items() if is_number(v)}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass

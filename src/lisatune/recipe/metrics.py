"""Metrics to a JSONL file (one object per line) and, if available, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LisaError
from ..schema import os_reason


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


class Metrics:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        try:
            if resume_step is not None and self.path.exists():
                # Lines written after the checkpoint we resume from would be repeated: drop them.
                keep = [r for r in _rows(self.path.read_text()) if r.get("step", 0) <= resume_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            self.file = self.path.open("a")
        except OSError as e:
            raise LisaError(f"cannot write {self.path} ({os_reason(e)})") from None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, step: int, **values) -> None:
        try:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        except OSError as e:
            raise LisaError(f"cannot write {self.path} ({os_reason(e)})") from None
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


class NoMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass

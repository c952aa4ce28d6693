"""Metrics to a JSONL file (one object per line) and, if available, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Lines written after the checkpoint we resume from would be repeated: drop them.
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
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

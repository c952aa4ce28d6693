"""A run directory: created, or found to resume, or recognised as finished; never clobbering another run.

    output_dir/config.yaml   the resolved config (the same-run check on resume reads it)
    output_dir/metrics.jsonl, tb/, checkpoints/step-N/, final/, summary.json
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel

from ..errors import LisaError
from ..schema import flatten, read_yaml
from .checkpoint import checkpoint_step, latest_checkpoint
from .config import TrainConfig

log = logging.getLogger("lisatune")

# Changing these does not change what a resumed run computes.
RESUME_FREE = {"resume", "overwrite", "log_every", "tensorboard", "eval_every", "save_every", "keep_last",
               "release_memory", "save_final_state"}


def prepare_run_dir(cfg: BaseModel) -> Path | None:
    """Create the run directory, or find the checkpoint to resume; refuse to clobber another run."""
    t = cfg.train
    out = Path(t.output_dir)
    saved = out / "config.yaml"
    if out.exists() and any(out.iterdir()):
        ckpt = latest_checkpoint(out)
        if t.resume and ckpt is not None:
            check_same_run(cfg, saved)
            return ckpt
        if t.resume is True:
            raise LisaError(f"--resume: output_dir '{out}' has no complete checkpoint to resume from")
        if not t.overwrite:
            raise LisaError(f"output_dir '{out}' holds another run; pass --overwrite to replace it "
                            "or --resume to continue it")
        shutil.rmtree(out)
    elif t.resume is True:
        raise LisaError(f"--resume: output_dir '{out}' has no run to resume")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return None


def check_same_run(cfg: BaseModel, saved: Path) -> None:
    """The config of the run being resumed must match (except RESUME_FREE settings)."""
    if not saved.is_file():
        return
    old, new = flatten(read_yaml(saved, "run config", expected="a mapping")), flatten(cfg.model_dump(mode="json"))
    default = flatten(TrainConfig().model_dump(mode="json"))  # a key added since that run was saved: its default
    for key in sorted(set(old) | set(new)):
        if key.startswith("train.") and key[len("train."):] in RESUME_FREE:
            continue
        if old.get(key, default.get(key)) != new.get(key):
            raise LisaError(f"cannot resume {saved.parent}: {key} was {old.get(key)!r}, now {new.get(key)!r} "
                            "(use a new output_dir for a different run)")


def start(cfg: BaseModel) -> tuple[Path | None, dict | None]:
    """Rank 0: prepare the run directory; (checkpoint to resume, the summary if that run already finished)."""
    run = Path(cfg.train.output_dir)
    finished = finished_summary(run)
    if cfg.train.resume and finished is not None:
        # Finished: summary.json is written last. With train.save_final_state false there is no checkpoint
        # of the last step (maybe none at all), so the summary, not a checkpoint, says the run is complete.
        check_same_run(cfg, run / "config.yaml")
        log.info("run in %s is already complete; nothing to do", run)
        return latest_checkpoint(run), {**finished, "already_complete": True}
    return prepare_run_dir(cfg), None


def finished_summary(run: Path) -> dict | None:
    """summary.json of a run that finished: no checkpoint is newer than the step it reports."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    last = latest_checkpoint(run)
    if not isinstance(summary, dict) or (last is not None and checkpoint_step(last) > summary.get("steps", -1)):
        return None
    return summary


def write_summary(run: Path, summary: dict) -> dict:
    """summary.json, with the first and last training losses read back from metrics.jsonl."""
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    summary = {**summary, "train_loss_first": sum(losses[:5]) / max(1, len(losses[:5])),
               "train_loss_last": sum(losses[-5:]) / max(1, len(losses[-5:]))}
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def describe_eval(res: dict | None) -> str:
    """An evaluation result as one short phrase, for logs and the CLI's summary."""
    if res is None:
        return "skipped (train.eval_before: false)"
    parts = []
    if "eval_loss" in res:
        parts.append(f"eval loss {res['eval_loss']:.4f}")
    if "gsm_total" in res:
        parts.append(f"GSM exact match {res['gsm_correct']}/{res['gsm_total']}")
    return ", ".join(parts) or "no validation data"

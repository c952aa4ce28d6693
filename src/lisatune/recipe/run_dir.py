"""A run directory: created, or found to resume, or recognised as finished; never clobbering another run.

    output_dir/.lisatune-run the marker: only a directory carrying it is ever deleted (--overwrite)
    output_dir/config.yaml   the resolved config (the same-run check on resume reads it)
    output_dir/metrics.jsonl, tb/, checkpoints/step-N/, final/, summary.json
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel

from ..errors import LisaError
from ..integrations.harness import PREFIX as LM_EVAL
from ..schema import flatten, is_number, os_reason, read_yaml
from .checkpoint import FORMAT_KEY, STATE, checkpoint_step, clean_tmp, latest_checkpoint, read_state
from .config import TrainConfig
from .files import refuse_links, write_atomic

log = logging.getLogger("lisatune")

# Changing these does not change what a resumed run computes (output_dir: a run directory can be moved).
RESUME_FREE = {"resume", "overwrite", "log_every", "tensorboard", "report_to", "eval_every", "save_every",
               "keep_last", "release_memory", "output_dir", "data_may_change", "save_final_state"}
# Written into every run directory lisatune creates: --overwrite deletes a directory only if it carries this.
MARKER = ".lisatune-run"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _io(what: str, fn, *args):
    """fn(*args), with an OSError (no permission, disk full, read-only file system...) as one LisaError line."""
    try:
        return fn(*args)
    except OSError as e:
        raise LisaError(f"cannot {what} ({os_reason(e)})") from None


def check_output_dir(out: Path) -> None:
    """output_dir must be a directory or not exist yet, and not lie under a file."""
    if out.exists() and not out.is_dir():
        raise LisaError(f"output_dir '{out}' is a file, not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LisaError(f"output_dir '{out}' lies under '{parent}', which is a file, not a directory")
            break


def prepare_run_dir(cfg: BaseModel, fingerprint: dict | None = None) -> Path | None:
    """The checkpoint to resume, or None for a new run; refuse to clobber another run, and never delete a
    directory that is not a lisatune run directory (one carrying MARKER).

    Nothing is created or deleted here: create_run_dir does that once the run is set up, so a run that fails to
    start (a model that does not load, γ above its blocks...) leaves output_dir as it was, even with --overwrite.
    """
    t = cfg.train
    out = Path(t.output_dir)
    check_output_dir(out)
    if out.is_dir() and _io(f"read output_dir '{out}'", lambda: any(out.iterdir())):
        clean_tmp(out)  # `.tmp-final-*` of a process killed while it saved the final model
        ckpt = latest_checkpoint(out)
        if t.resume and ckpt is not None:
            check_same_run(cfg, out / "config.yaml")
            check_run_state(ckpt)
            check_same_data(ckpt, fingerprint, t.data_may_change)
            if not is_run_dir(out):  # made by a lisatune without the marker: it is one
                write_atomic(out / MARKER, "a lisatune run directory\n")
            return ckpt
        if t.resume is True:
            raise LisaError(f"--resume: output_dir '{out}' has no complete checkpoint to resume from")
        if not is_run_dir(out):
            if t.overwrite:
                raise LisaError(f"--overwrite: output_dir '{out}' is not a lisatune run directory (no {MARKER}); "
                                "refusing to delete it")
            raise LisaError(f"output_dir '{out}' is not empty and is not a lisatune run directory; "
                            "choose another output_dir")
        if not t.overwrite:
            if read_summary(out) is not None:  # finished: --resume would only report it
                raise LisaError(f"output_dir '{out}' holds a finished run; to start a new one, pass --overwrite "
                                "(replaces it) or choose another output_dir (--output-dir DIR)")
            if ckpt is not None:
                raise LisaError(f"output_dir '{out}' holds an unfinished run (last checkpoint "
                                f"{ckpt.name}); pass --resume to continue it, --overwrite to replace it, or choose "
                                "another output_dir")
            raise LisaError(f"output_dir '{out}' holds another run; pass --overwrite to replace it "
                            "or --resume to continue it")
    elif t.resume is True:
        raise LisaError(f"--resume: output_dir '{out}' has no run to resume")
    writable = next((d for d in [out, *out.parents] if d.exists()), None)
    if writable is not None and not os.access(writable, os.W_OK | os.X_OK):  # found now, not after the model loads
        raise LisaError(f"cannot create output_dir '{out}' ('{writable}' is not writable: Permission denied)")
    return None


def create_run_dir(cfg: BaseModel) -> Path:
    """A new run's directory (replacing the previous run there, which prepare_run_dir allowed): the marker and
    config.yaml."""
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()):
        if not (is_run_dir(out) and cfg.train.overwrite):  # prepare_run_dir said so; never delete anything else
            raise LisaError(f"output_dir '{out}' holds another run; pass --overwrite to replace it")
        _io(f"delete the previous run in output_dir '{out}'", shutil.rmtree, out)
    _io(f"create output_dir '{out}'", lambda: out.mkdir(parents=True, exist_ok=True))
    write_atomic(out / MARKER, "a lisatune run directory\n")
    saved = out / "config.yaml"
    write_atomic(saved, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


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


def _metrics(v) -> bool:
    return v is None or isinstance(v, dict) and all(isinstance(k, str) and is_number(x) for k, x in v.items())


def _digests(v) -> bool:
    return v is None or isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


# The keys the recipe (loop.checkpoint) adds to trainer_state.json, and what each must be.
RUN_STATE = {"first_eval": (_metrics, "null or a mapping of metric names to numbers"),
             "last_eval": (_metrics, "null or a mapping of metric names to numbers"),
             "micro_step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
             "data_fingerprint": (_digests, "null or a mapping of data sources to sha256 digests"),
             "best": (lambda v: isinstance(v, dict) and isinstance(v.get("step"), int) and is_number(v.get("eval_loss")),
                      "a mapping of step and eval_loss (train.keep_best)")}


def check_run_state(ckpt: Path) -> None:
    """The whole trainer_state.json of a checkpoint to resume, before the model loads: a bad value (an edited or
    corrupted file) is one line naming the key, not a traceback after training (checkpoint.read_state checks
    the keys it writes itself)."""
    state = read_state(ckpt)
    for key, (ok, what) in RUN_STATE.items():
        if key in state and not ok(state[key]):
            raise LisaError(f"checkpoint '{ckpt}': {STATE}: '{key}' must be {what} (got {state[key]!r:.60}) "
                            "(delete that directory to resume from the checkpoint before it)")


def check_same_data(ckpt: Path, fingerprint: dict | None, allow: bool) -> None:
    """The training data must be the data the checkpoint was trained on (its content, not its path)."""
    state = read_state(ckpt)
    if "data_fingerprint" not in state:
        if state.get(FORMAT_KEY) is not None:  # its format always writes one: the key was deleted
            raise LisaError(f"checkpoint '{ckpt}': {STATE} has no 'data_fingerprint', which lisatune train writes "
                            f"into every checkpoint of format {state[FORMAT_KEY]}: the training data cannot be checked "
                            "(delete that directory to resume from the checkpoint before it)")
        log.warning("checkpoint '%s' predates data fingerprints: resuming without checking that the training data "
                    "is unchanged", ckpt)
        return
    old = state["data_fingerprint"]
    if not isinstance(old, dict) or fingerprint is None or old == fingerprint:
        return
    changed = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    what = ", ".join(f"{k} {str(old.get(k))[:12]}… -> {str(fingerprint.get(k))[:12]}…" for k in changed)
    if allow:
        log.warning("resuming %s although the training data changed (%s): train.data_may_change is set",
                    ckpt, what)
        return
    raise LisaError(f"cannot resume {ckpt.parent.parent}: the training data changed ({what}, sha256 of the "
                    "content); set train.data_may_change=true to resume anyway, or use a new output_dir")


def read_summary(run: Path) -> dict | None:
    """summary.json of a finished run, or None (absent, or cut short by a kill: the run then finishes again)."""
    f = run / "summary.json"
    if not f.is_file():
        return None
    try:
        summary = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): finishing the run again", f, e)
        return None
    return summary if isinstance(summary, dict) else None


def start(cfg: BaseModel, fingerprint: dict | None = None) -> tuple[Path | None, dict | None]:
    """Rank 0: prepare the run directory; (checkpoint to resume, the summary if that run already finished)."""
    run = Path(cfg.train.output_dir)
    if cfg.train.resume or not cfg.train.overwrite:  # (--overwrite alone deletes the links, never their targets)
        refuse_links(run)  # before anything in it is read or written
    summary = read_summary(run)
    last = latest_checkpoint(run) if summary is not None else None
    # Finished: summary.json is written last, and no checkpoint is newer than the step it reports. With
    # train.save_final_state false there is no checkpoint of the last step (maybe none), so the summary says it.
    if cfg.train.resume and summary is not None and (last is None or checkpoint_step(last) <= summary.get("steps", -1)):
        check_same_run(cfg, run / "config.yaml")
        log.info("run in %s is already complete; nothing to do", run)
        return last, {**summary, "already_complete": True}
    return prepare_run_dir(cfg, fingerprint), None


def write_summary(run: Path, summary: dict) -> dict:
    """summary.json, with the first and last training losses read back from metrics.jsonl."""
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    summary = {**summary, "train_loss_first": sum(losses[:5]) / max(1, len(losses[:5])),
               "train_loss_last": sum(losses[-5:]) / max(1, len(losses[-5:]))}
    write_atomic(run / "summary.json", json.dumps(summary, indent=1))  # a kill leaves the old file or the new one
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
        if "gsm_formatted" in res:  # absent in runs saved before it existed
            parts.append(f"answers in the '#### N' format {res['gsm_formatted']}/{res['gsm_total']}")
    # lm-eval's metrics (train.eval_tasks), "lm_eval/<task>/<metric>", without their stderr and sample counts
    parts += [f"{k.removeprefix(LM_EVAL)} {v:.3f}" for k, v in res.items()
              if k.startswith(LM_EVAL) and "_stderr" not in k and not k.endswith("/sample_len")]
    return ", ".join(parts) or "no validation data"

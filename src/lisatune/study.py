"""`lisatune study STUDY.yaml`: a grid of training runs, run one after another, resumable, with a report.

A study file names a base run config and the runs to compare:

    name: sft-smollm2
    base_config: ../examples/lora_gsm.yaml      # relative to the study file; `base:` (inline) is merged on top
    output_dir: runs/studies/sft-smollm2        # checkpoints and models: large, not committed
    results_dir: studies/results/sft-smollm2    # summary.json, metrics.jsonl, config.yaml per run: small, committed
    seeds: [0, 1, 2]                            # each seed sets train.seed and lisa.seed (see seed_keys)
    sweep: {train.lr: [1.0e-5, 3.0e-5]}         # every setting is run at each value; the report keeps the best
    runs:                                       # named settings (dotted overrides, as `lisatune train --set`)
      - {name: full, set: {method: full}}
      - {name: lora-r8, set: {method: lora, lora.r: 8}, sweep: {train.lr: [3.0e-4, 1.0e-3]}}
    grid: {lisa.n_layers: [1, 2]}               # axes: their product (crossed with `runs` when both are given)

Every run gets the id SETTING[_SWEEPVALUES]_sSEED and trains in output_dir/ID with train.resume=auto. A run
with results_dir/ID/summary.json is done and skipped; an interrupted run resumes from its last checkpoint.
Each run trains in its own process (`isolate: true`), so its peak RSS (ru_maxrss of that process) is its own.
Paths in the study's own fields (output_dir, results_dir) and inside run configs are relative to the current
directory, like `lisatune train`; only base_config is relative to the study file.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import LisaError
from .analysis.memory import reset_peak_rss
from .plots import save_figure

log = logging.getLogger("lisatune")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
# Keys a study sets itself on every run; `set`/`grid`/`sweep` may not touch them.
_OWNED = {"train.output_dir", "train.resume", "train.overwrite"}
# Small run files copied to results_dir (weights never are).
_COPIED = ("summary.json", "metrics.jsonl", "config.yaml")
# Axes the report plots as ablations when the study varies them (label, file name).
ABLATION_AXES = {"lisa.n_layers": ("γ", "γ: blocks active at a time (lisa.n_layers)", "ablation_gamma.png"),
                 "lisa.interval": ("K", "K: steps between switches (lisa.interval)", "ablation_interval.png")}


class RunSpec(BaseModel):
    """One named setting: dotted overrides of the base config."""
    model_config = ConfigDict(extra="forbid")

    name: str
    set: dict[str, Any] = {}
    sweep: dict[str, list[Any]] | None = None  # replaces the study's sweep for this setting ({} = none)
    seeds: list[int] | None = None  # replaces the study's seeds for this setting

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be letters, digits and _ . + = - (it names a directory)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else _check_seeds(v)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict | None) -> dict | None:
        return v if v is None else _check_axes(v)


def _check_seeds(v: list[int]) -> list[int]:
    if not v or len(set(v)) != len(v):
        raise ValueError("must be a non-empty list of distinct integers")
    return v


def _check_axes(v: dict) -> dict:
    for key, values in v.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"'{key}' needs a non-empty list of values")
        if key in _OWNED:
            raise ValueError(f"'{key}' is set by the study itself")
    return v


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base_config: str | None = None  # a run config (YAML), relative to the study file
    base: dict[str, Any] = {}  # inline run config, merged over base_config
    output_dir: str
    results_dir: str
    seeds: list[int] = Field(default_factory=lambda: [0])
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed", "lisa.seed"])
    runs: list[RunSpec] = []
    grid: dict[str, list[Any]] = {}
    sweep: dict[str, list[Any]] = {}
    select: str = "eval_loss"  # the `after` metric (lower is better) that picks the best sweep value
    keep_models: bool = False  # False: delete final/ and checkpoints/ once the metrics are copied
    isolate: bool = True  # each run in its own process: a true per-run peak RSS
    # interleave: seed by seed, the middle sweep point of every setting first (a partial study is already a
    # comparison); listed: in the order of the file
    order: Literal["interleave", "listed"] = "interleave"

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _check_seeds(v)

    @field_validator("grid", "sweep")
    @classmethod
    def _axes(cls, v: dict) -> dict:
        return _check_axes(v)

    @model_validator(mode="after")
    def _runs(self) -> "Study":
        if not self.runs and not self.grid:
            raise ValueError("runs/grid: the study has no runs (give `runs:` and/or `grid:`)")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"runs: the name '{dup[0]}' is used twice")
        for r in self.runs:
            for key in list(r.set) + list(r.sweep or {}):
                if key in _OWNED:
                    raise ValueError(f"runs: '{r.name}' sets '{key}', which the study sets itself")
        if not _NAME.match(self.name):
            raise ValueError(f"name: '{self.name}' must be letters, digits and _ . + = -")
        return self


@dataclass
class Job:
    """One training run of the study."""
    run_id: str
    setting: str
    seed: int
    sweep: dict[str, Any]  # sweep key -> value (as validated in the config)
    config: dict  # the resolved run config (JSON-able)
    skip: str | None = None  # why it cannot run (e.g. a missing probabilities file)


@dataclass
class Plan:
    study: Study
    path: Path
    jobs: list[Job]
    settings: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir)

    @property
    def results_dir(self) -> Path:
        return Path(self.study.results_dir)


# -- loading -------------------------------------------------------------------------------------------
def load_study(path: str | os.PathLike) -> Plan:
    """Read and validate the study file and every run config it implies; errors are one line."""
    p = Path(path)
    if not p.is_file():
        raise LisaError(f"study file '{path}' does not exist")
    data = _read_yaml(p, "a mapping (name, base_config or base, output_dir, results_dir, runs/grid, ...)")
    try:
        study = Study.model_validate(data)
    except ValidationError as e:
        raise LisaError(_study_error(e, p)) from None
    base = _base_config(study, p)
    jobs, settings, order = [], [], []
    for s_index, (setting, overrides, sweep, seeds) in enumerate(_settings(study)):
        settings.append(setting)
        keys, grids = list(sweep), list(itertools.product(*sweep.values())) if sweep else [()]
        for g_index, values in enumerate(grids):
            for seed_index, seed in enumerate(seeds):
                jobs.append(_job(study, p, base, setting, overrides, dict(zip(keys, values)), seed))
                # interleave: first seed, middle sweep point of every setting first, so a partial study is useful
                order.append((seed_index, _middle_first(g_index, len(grids)), s_index) if study.order == "interleave"
                             else (len(order),))
    jobs = [j for _, j in sorted(zip(order, jobs), key=lambda x: x[0])]
    ids = [j.run_id for j in jobs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LisaError(f"{p}: two runs get the id '{dup[0]}' (rename a run or grid value)")
    return Plan(study, p, jobs, settings)


def _middle_first(i: int, n: int) -> int:
    """Rank of point i of n when the middle comes first, then alternately above and below it."""
    d = i - n // 2 if n % 2 else i - (n - 1) // 2
    return 2 * d - 1 if d > 0 else -2 * d


def _read_yaml(p: Path, expected: str) -> dict:
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise LisaError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LisaError(f"{p}: expected {expected}")
    return data


def _study_error(e: ValidationError, p: Path) -> str:
    errors = e.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo is the root cause
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
    if err["type"] == "extra_forbidden":
        model = RunSpec if loc.startswith("runs[") else Study
        close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{p}: unknown key '{loc}' ({hint}valid: {', '.join(model.model_fields)})"
    if err["type"] == "missing":
        return f"{p}: '{loc}' is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{p}: {loc + ': ' if loc else ''}{msg}" + (f" (got {err['input']!r})" if loc else "")


def _base_config(study: Study, p: Path) -> dict:
    data: dict = {}
    if study.base_config:
        f = (p.parent / study.base_config)
        if not f.is_file():
            raise LisaError(f"{p}: base_config '{study.base_config}' does not exist (looked for {f})")
        data = _read_yaml(f, "a run config mapping (model, data, method, train, ...)")
    elif not study.base:
        from .train_config import DEFAULT
        data = copy.deepcopy(DEFAULT)
    return _merge(data, study.base)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _settings(study: Study):
    """(setting name, overrides, sweep, seeds) for every named run x grid point."""
    axes = list(study.grid.items())
    points = [dict(zip([k for k, _ in axes], vs)) for vs in itertools.product(*[v for _, v in axes])] or [{}]
    runs = study.runs or [RunSpec.model_construct(name="", set={}, sweep=None, seeds=None)]
    for run in runs:
        for point in points:
            label = "-".join(f"{_short(k)}{_fmt(v)}" for k, v in point.items())
            name = "-".join(x for x in (run.name, label) if x)
            sweep = study.sweep if run.sweep is None else run.sweep
            yield name, {**run.set, **point}, sweep, run.seeds or study.seeds


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        v = _number(v)
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "", str(v).replace("/", "-"))[:40] or "x"


def _number(v: Any) -> Any:
    """'5e-5' (a string to YAML 1.1) as the float it means; anything else unchanged."""
    if isinstance(v, str):
        try:
            return float(v) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v.strip()) else v
        except ValueError:
            return v
    return v


def _set(data: dict, key: str, value: Any, where: str) -> None:
    from .train_config import set_dotted

    set_dotted(data, key, _number(value), f"{where}: '{key}'")


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _job(study: Study, p: Path, base: dict, setting: str, overrides: dict, sweep: dict, seed: int) -> Job:
    from .train_config import TrainConfig, config_error

    run_id = "_".join([setting] + [f"{_short(k)}{_fmt(v)}" for k, v in sweep.items()] + [f"s{seed}"])
    where = f"{p}: run '{run_id}'"
    data = copy.deepcopy(base)
    for key, value in {**overrides, **sweep}.items():
        _set(data, key, value, where)
    for key in study.seed_keys:
        _set(data, key, seed, where)
    _set(data, "train.output_dir", str(Path(study.output_dir) / run_id), where)
    _set(data, "train.resume", "auto", where)
    _set(data, "train.overwrite", True, where)  # with resume=auto: resume a checkpoint, else start clean
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as e:
        raise LisaError(config_error(e, where)) from None
    for opt in ("path", "val_path"):
        f = getattr(cfg.data, opt)
        if f and not Path(f).is_file():
            raise LisaError(f"{where}: data.{opt} '{f}' does not exist")
    resolved = cfg.model_dump(mode="json")
    job = Job(run_id, setting, seed, {k: _get(resolved, k) for k in sweep}, resolved)
    probs = cfg.lisa.probabilities
    if cfg.method == "lisa" and isinstance(probs, str) and not Path(probs).is_file():
        job.skip = (f"lisa.probabilities file '{probs}' does not exist; generate it with `lisatune norms` "
                    "(see studies/README.md) and run the study again")
    return job


# -- running -------------------------------------------------------------------------------------------
def run_study(plan: Plan, retry_failed: bool = False, only: list[str] | None = None, echo=print) -> dict:
    """Run every job not yet done, in order; then write the report. Returns counts and the report path."""
    out, res = plan.output_dir, plan.results_dir
    res.mkdir(parents=True, exist_ok=True)
    (res / "study.yaml").write_text(plan.path.read_text())  # the study as run, beside its results
    counts = {"trained": 0, "done": 0, "skipped": 0, "failed": 0}
    jobs = [j for j in plan.jobs if not only or j.run_id in only or j.setting in only]
    if only and not jobs:
        raise LisaError(f"--only {' '.join(only)}: no run or setting of that name in {plan.path}")
    for i, job in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {job.run_id}"
        rdir = res / job.run_id
        if (rdir / "summary.json").is_file():
            counts["done"] += 1
            echo(f"{head}: done (results in {rdir})")
            continue
        if (rdir / "failed.json").is_file() and not retry_failed:
            counts["failed"] += 1
            err = json.loads((rdir / "failed.json").read_text()).get("error", "")
            echo(f"{head}: failed before, not retried (--retry-failed to run it again): {err}")
            continue
        if job.skip:
            counts["skipped"] += 1
            echo(f"{head}: skipped: {job.skip}")
            continue
        echo(f"{head}: training ({'resuming' if _has_checkpoint(out / job.run_id) else 'new'}) ...")
        status = _run_job(plan, job)
        if status["returncode"] == 0:
            _collect(plan, job, status)
            counts["trained"] += 1
            s = json.loads((rdir / "summary.json").read_text())
            echo(f"{head}: finished in {status['wall_s']:.0f} s, eval loss {_g(s['before'], 'eval_loss')} -> "
                 f"{_g(s['after'], 'eval_loss')}, peak RSS {status['peak_rss_mib']:.0f} MiB")
        elif status["returncode"] == 130:
            echo(f"{head}: interrupted; a checkpoint was saved. Run the same command again to resume.")
            counts["interrupted"] = job.run_id
            break
        else:
            counts["failed"] += 1
            err = status.get("error") or f"exit code {status['returncode']}"
            if status["returncode"] == 2:  # a LisaError (e.g. a diverging lr): a result, recorded
                rdir.mkdir(parents=True, exist_ok=True)
                (rdir / "failed.json").write_text(json.dumps({"run_id": job.run_id, "setting": job.setting,
                                                              "seed": job.seed, "sweep": job.sweep, "error": err,
                                                              "log": status["log"]}, indent=1))
            echo(f"{head}: FAILED: {err} (log: {status['log']})")
    report = write_report(plan)
    echo(f"report: {report}")
    return {**counts, "report": report}


def _has_checkpoint(run_dir: Path) -> bool:
    from .checkpoint import latest_checkpoint
    return run_dir.is_dir() and latest_checkpoint(run_dir) is not None


def _run_job(plan: Plan, job: Job) -> dict:
    """Train one run (in a child process if isolate) and measure its wall time and peak RSS."""
    cfg_dir, log_dir = plan.output_dir / "configs", plan.output_dir / "logs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, log_path = cfg_dir / f"{job.run_id}.yaml", log_dir / f"{job.run_id}.log"
    cfg_path.write_text(yaml.safe_dump(job.config, sort_keys=False))
    resumed = _has_checkpoint(plan.output_dir / job.run_id)
    start = time.perf_counter()
    if plan.study.isolate:
        code, peak, error = _train_child(cfg_path, log_path)
    else:
        code, peak, error = _train_here(cfg_path)
    seg = {"returncode": code, "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": peak,
           "resumed": resumed, "isolated": plan.study.isolate, "error": error, "log": str(log_path)}
    # A run may take several segments (interrupted, resumed): keep them all; the run's peak is their max.
    seg_file = log_dir / f"{job.run_id}.segments.json"
    segments = json.loads(seg_file.read_text()) if seg_file.is_file() else []
    segments.append(seg)
    seg_file.write_text(json.dumps(segments, indent=1))
    return {**seg, "segments": segments}


def _train_child(cfg_path: Path, log_path: Path) -> tuple[int, float, str | None]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as logf:
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} lisatune train {cfg_path}\n")
        logf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "lisatune.cli", "train", str(cfg_path)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
        # SIGTERM to the study (e.g. `kill PID` of a nohup run) reaches the child, which saves a checkpoint
        # and exits 130. Ctrl-C in a terminal reaches the child by itself (same process group): not forwarded,
        # since a second SIGINT would abort the child's checkpoint.
        signalled = []

        def forward_term(_s, _f):
            signalled.append(True)
            proc.send_signal(signal.SIGTERM)

        old_term = signal.signal(signal.SIGTERM, forward_term)
        old_int = signal.signal(signal.SIGINT, lambda s, f: signalled.append(True))
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
        code = os.waitstatus_to_exitcode(status)
        if signalled and code != 0:  # the study was stopped: an interruption, not a failed run
            code = 130
        proc.returncode = code
    kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    return code, round(kib / 1024, 1), _last_error(log_path) if code else None


def _last_error(log_path: Path) -> str | None:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("lisatune: error:"):
            return ln.removeprefix("lisatune: error:").strip()
    for ln in reversed(lines):
        if not ln.startswith(("=== ", "File ")):
            return ln[:300]
    return None


def _train_here(cfg_path: Path) -> tuple[int, float, str | None]:
    """In this process: quicker to start, but the peak RSS is the VmHWM since this run started (Linux),
    which includes whatever earlier runs left allocated."""
    from .recipe import Interrupted, train
    from .train_config import load_config

    reset = reset_peak_rss()
    try:
        train(load_config(str(cfg_path)))
        code, error = 0, None
    except Interrupted:
        code, error = 130, None
    except LisaError as e:
        code, error = 2, str(e)
    return code, round(_peak_rss_kib(reset) / 1024, 1), error


def _peak_rss_kib(reset: bool) -> float:
    if reset:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
        except OSError:
            pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform == "darwin" else r


def _collect(plan: Plan, job: Job, status: dict) -> None:
    """Copy the run's small files to results_dir/ID (summary.json last: it marks the run done)."""
    run, rdir = plan.output_dir / job.run_id, plan.results_dir / job.run_id
    rdir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((run / "summary.json").read_text())
    for name in ("metrics.jsonl", "config.yaml"):
        if (run / name).is_file():
            shutil.copy2(run / name, rdir / name)
    gsm = run / f"gsm_samples_step{summary['steps']}.json"
    if gsm.is_file():
        shutil.copy2(gsm, rdir / "gsm_samples_final.json")
    segments = status["segments"]
    info = {"run_id": job.run_id, "setting": job.setting, "seed": job.seed, "sweep": job.sweep,
            "peak_rss_mib": max(s["peak_rss_mib"] for s in segments),
            "peak_rss_kind": "ru_maxrss of the run's process" if status["isolated"] else
                             "VmHWM since the run started (in-process: includes earlier runs' leftovers)",
            "wall_s": round(sum(s["wall_s"] for s in segments), 1), "segments": len(segments),
            "host": {"cpus": os.cpu_count(), "torch_threads": _torch_threads()},
            "code": _code_version(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (rdir / "run.json").write_text(json.dumps(info, indent=1))
    (rdir / "failed.json").unlink(missing_ok=True)
    summary.pop("final_model", None), summary.pop("metrics", None)  # paths into output_dir: not results
    tmp = rdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(rdir / "summary.json")
    if not plan.study.keep_models:
        for big in ("final", "checkpoints"):
            shutil.rmtree(run / big, ignore_errors=True)


def _code_version() -> str:
    """The lisatune commit that trained the run (results of different code should not be mixed silently)."""
    from . import __version__
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}" if sha else __version__


def _torch_threads() -> int | None:
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


def _g(d: dict, key: str) -> str:
    v = d.get(key)
    return f"{v:.4f}" if isinstance(v, (int, float)) else "–"


# -- the report ----------------------------------------------------------------------------------------
@dataclass
class Result:
    job: Job
    summary: dict
    info: dict
    rows: list[dict]

    @property
    def median_step_s(self) -> float | None:
        steps = [r["step_s"] for r in self.rows if "step_s" in r]
        return statistics.median(steps) if steps else None

    def curve(self, key: str = "eval_loss") -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if key in r]


def load_results(plan: Plan) -> tuple[dict[str, Result], dict[str, dict]]:
    results, failed = {}, {}
    for job in plan.jobs:
        rdir = plan.results_dir / job.run_id
        if (rdir / "summary.json").is_file():
            rows = []
            if (rdir / "metrics.jsonl").is_file():
                rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            info = json.loads((rdir / "run.json").read_text()) if (rdir / "run.json").is_file() else {}
            results[job.run_id] = Result(job, json.loads((rdir / "summary.json").read_text()), info, rows)
        elif (rdir / "failed.json").is_file():
            failed[job.run_id] = json.loads((rdir / "failed.json").read_text())
    return results, failed


def _stat(values: list[float | None], fmt: str = "{:.4f}") -> str:
    vs = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vs:
        return "–"
    if len(vs) == 1:
        return fmt.format(vs[0])
    return f"{fmt.format(statistics.mean(vs))} ± {fmt.format(statistics.stdev(vs))}"


def _mean(values) -> float | None:
    vs = [v for v in values if isinstance(v, (int, float))]
    return statistics.mean(vs) if vs else None


@dataclass
class Group:
    """The runs of one setting at one sweep point (its seeds)."""
    setting: str
    sweep: dict
    results: list[Result]
    jobs: list[Job]

    def after(self, key: str) -> float | None:
        return _mean(r.summary["after"].get(key) for r in self.results)


def _groups(plan: Plan, results: dict[str, Result]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for setting in plan.settings:
        by_point: dict[str, Group] = {}
        for job in (j for j in plan.jobs if j.setting == setting):
            key = json.dumps(job.sweep, sort_keys=True)
            g = by_point.setdefault(key, Group(setting, job.sweep, [], []))
            g.jobs.append(job)
            if job.run_id in results:
                g.results.append(results[job.run_id])
        out[setting] = sorted(by_point.values(), key=lambda g: tuple(
            (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)) for v in g.sweep.values()))
    return out


def _best(groups: list[Group], select: str) -> Group | None:
    done = [g for g in groups if g.results and g.after(select) is not None]
    return min(done, key=lambda g: g.after(select)) if done else None


def write_report(plan: Plan) -> Path:
    """results_dir/report.md and the plots, from whatever results exist."""
    import matplotlib
    matplotlib.use("Agg")

    res_dir = plan.results_dir
    res_dir.mkdir(parents=True, exist_ok=True)
    results, failed = load_results(plan)
    groups = _groups(plan, results)
    sel = plan.study.select
    best = {s: _best(gs, sel) for s, gs in groups.items()}
    text_data = any(j.config["data"]["format"] == "text" for j in plan.jobs)
    gsm_data = any(j.config["data"]["format"] == "gsm" for j in plan.jobs)
    swept = any(len(gs) > 1 or any(g.sweep for g in gs) for gs in groups.values())

    base = plan.jobs[0].config
    t, d = base["train"], base["data"]
    lines = [f"# Study `{plan.study.name}`", ""]
    if plan.study.description:
        lines += [plan.study.description.strip(), ""]
    n_done = len(results)
    lines += [f"Model `{base['model']['source']}`, data format `{d['format']}`"
              + (f" (`{d['path']}`)" if d.get("path") else "")
              + f", max_length {d['max_length']}, batch {t['batch_size']}×{t['grad_accum']}, "
              f"{t['max_steps'] or str(t['epochs']) + ' epochs'} steps, {t['schedule']} schedule, "
              f"warmup {t['warmup_steps']}. {n_done} of {len(plan.jobs)} runs finished"
              + (f", {len(failed)} failed" if failed else "") + ".", ""]

    head = ["setting", "method"] + (["sweep (best)"] if swept else []) + ["seeds", "eval loss before",
                                                                           "eval loss after"]
    if text_data:
        head += ["ppl before", "ppl after"]
    if gsm_data:
        head += ["GSM EM before", "GSM EM after"]
    head += ["peak RSS MiB", "median s/step", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in plan.settings:
        g = best[setting]
        job = plan.jobs[[j.setting for j in plan.jobs].index(setting)]
        if g is None:
            lines.append(f"| {setting} | {job.config['method']} | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        rs = g.results
        row = [setting, rs[0].job.config["method"]]
        if swept:
            n_points = len(groups[setting])
            row.append(", ".join(f"{_short(k)} {_fmt(v)}" for k, v in g.sweep.items())
                       + (f" (of {n_points})" if n_points > 1 else ""))
        row += [f"{len(rs)}/{len(g.jobs)}", _stat([r.summary["before"].get("eval_loss") for r in rs]),
                _stat([r.summary["after"].get("eval_loss") for r in rs])]
        if text_data:
            row += [_stat([r.summary["before"].get("eval_ppl") for r in rs], "{:.2f}"),
                    _stat([r.summary["after"].get("eval_ppl") for r in rs], "{:.2f}")]
        if gsm_data:
            row += [_stat([r.summary["before"].get("gsm_exact_match") for r in rs], "{:.3f}"),
                    _stat([r.summary["after"].get("gsm_exact_match") for r in rs], "{:.3f}")]
        row += [_stat([r.info.get("peak_rss_mib") for r in rs], "{:.0f}"),
                _stat([r.median_step_s for r in rs], "{:.2f}"),
                _stat([r.summary.get("train_seconds") for r in rs], "{:.0f}")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Values are mean ± sample standard deviation over seeds (one value: a single seed). "
              f"With a sweep, each setting is shown at the sweep point with the lowest mean `{sel}` after "
              "training. Eval loss is on the held-out set"
              + (" (whole held-out GSM templates)" if gsm_data else "") + "; "
              "peak RSS is the high-water mark of the run's own process (model loading, evaluation and "
              "training)" + ("" if plan.study.isolate else " — here in-process (isolate: false), so it also "
                               "counts what earlier runs left allocated") +
              "; median s/step is over the logged `step_s` of metrics.jsonl.", ""]

    if swept:
        lines += ["## Sweeps", "", "| setting | sweep point | seeds | eval loss after |"
                  + (" GSM EM after |" if gsm_data else ""), "|---|---|---|---|" + ("---|" if gsm_data else "")]
        for setting in plan.settings:
            for g in groups[setting]:
                point = ", ".join(f"{_short(k)} {_fmt(v)}" for k, v in g.sweep.items()) or "–"
                mark = " **best**" if g is best[setting] and len(groups[setting]) > 1 else ""
                row = [setting, point + mark, f"{len(g.results)}/{len(g.jobs)}",
                       _stat([r.summary["after"].get("eval_loss") for r in g.results])]
                if gsm_data:
                    row.append(_stat([r.summary["after"].get("gsm_exact_match") for r in g.results], "{:.3f}"))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    plots = _plots(plan, groups, best, res_dir)
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({name})\n" for title, name in plots]
    skipped = [j for j in plan.jobs if j.skip and j.run_id not in results]
    if failed or skipped:
        lines += ["## Not in the table", ""]
        lines += [f"- `{rid}`: failed: {f.get('error', '')}" for rid, f in failed.items()]
        lines += [f"- `{j.run_id}`: skipped: {j.skip}" for j in skipped]
        lines.append("")
    lines += [f"Regenerate: `lisatune study {plan.path} --report-only`.", ""]
    path = res_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plots(plan: Plan, groups: dict[str, list[Group]], best: dict[str, Group | None], out: Path) -> list:
    import matplotlib.pyplot as plt

    made = []
    # Eval-loss curves: each setting at its best sweep point, mean over seeds.
    curves = {}
    for setting, g in best.items():
        if g is None:
            continue
        per_seed = [dict(r.curve()) for r in g.results]
        steps = sorted(set.intersection(*[set(c) for c in per_seed])) if per_seed else []
        if len(steps) >= 2:
            curves[setting] = (steps, [statistics.mean(c[s] for c in per_seed) for s in steps])
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for setting, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o", ms=3, label=setting)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out eval loss")
        ax.set_title(f"{plan.study.name}: eval loss (best sweep point, mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, out / "eval_loss.png")
        made.append(("eval loss curves", "eval_loss.png"))

    # Sweeps: final eval loss against the (single) sweep value, per setting.
    sweep_lines = {}
    for setting, gs in groups.items():
        pts = [(next(iter(g.sweep.values())), g.after(plan.study.select)) for g in gs
               if len(g.sweep) == 1 and g.results]
        pts = sorted((float(x), y) for x, y in pts if isinstance(x, (int, float)) and y is not None)
        if len(pts) >= 2:
            sweep_lines[setting] = pts
    if sweep_lines:
        key = next(iter(next(g for gs in groups.values() for g in gs if g.sweep).sweep))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for setting, pts in sweep_lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=setting)
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{plan.study.select} after training")
        ax.set_title(f"{plan.study.name}: sweep (mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, out / "sweep.png")
        made.append(("sweep", "sweep.png"))

    # Ablations (γ, K): settings that differ only in that option; one line per family of such settings.
    max_steps = plan.jobs[0].config["train"]["max_steps"]
    for axis, (symbol, label, name) in ABLATION_AXES.items():
        families = _ablation(plan, best, axis)
        if not families:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        xs_all = sorted({p[0] for _, pts in families for p in pts})
        for fam_label, pts in families:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=fam_label or None)
            for x, y, _, n in pts:
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ticks = [f"{x}" + ("\n(one switch)" if axis == "lisa.interval" and max_steps and x >= max_steps else "")
                 for x in xs_all]
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, ticks)
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel(f"{plan.study.select} after training")
        ax.set_title(f"{plan.study.name}: {symbol} ablation (mean ± sd over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        if any(f for f, _ in families):
            ax.legend(fontsize=7)
        save_figure(fig, out / name)
        made.append((f"{symbol} ablation", name))
    return made


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


_NOT_COMPARED = ("train.seed", "lisa.seed", "train.output_dir", "train.resume", "train.overwrite")


def _ablation(plan: Plan, best: dict[str, Group | None], axis: str) -> list[tuple[str, list]]:
    """Families of finished LISA settings that differ only in `axis`: [(label, [(value, mean, sd, n)])]."""
    flat = {}
    for setting, g in best.items():
        if g is None or g.results[0].job.config["method"] != "lisa":
            continue
        flat[setting] = {k: v for k, v in _flat(g.results[0].job.config).items()
                         if k not in _NOT_COMPARED and k not in plan.study.seed_keys and k not in g.sweep}
    if len(flat) < 2:
        return []
    keys = set().union(*flat.values())
    varied = {k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1}
    if axis not in varied:
        return []
    families: dict[str, list[str]] = {}
    for setting, f in flat.items():
        label = ", ".join(f"{_short(k)}={f.get(k)}" for k in sorted(varied - {axis}))
        families.setdefault(label, []).append(setting)
    out = []
    for label, settings in families.items():
        if len({flat[s][axis] for s in settings}) < 2:
            continue
        pts = []
        for s in settings:
            vals = [r.summary["after"].get(plan.study.select) for r in best[s].results]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                pts.append((flat[s][axis], statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            len(vals)))
        out.append((label, sorted(pts)))
    return [("", out[0][1])] if len(out) == 1 else out


# -- command line --------------------------------------------------------------------------------------
def cmd_study(args) -> int:
    plan = load_study(args.study)
    if args.report_only:
        print(f"report: {write_report(plan)}")
        return 0
    if args.dry_run:
        for j in plan.jobs:
            state = ("done" if (plan.results_dir / j.run_id / "summary.json").is_file()
                     else f"skip: {j.skip}" if j.skip else "to run")
            print(f"{j.run_id}: {state}")
        return 0
    r = run_study(plan, retry_failed=args.retry_failed, only=args.only, echo=lambda m: print(m, flush=True))
    print(f"{r['trained']} trained, {r['done']} already done, {r['skipped']} skipped, {r['failed']} failed")
    return 130 if r.get("interrupted") else 0


def register(subparsers) -> None:
    s = subparsers.add_parser("study", help="run a grid of training runs (resumable) and write a report")
    s.add_argument("study", help="study file (YAML): base config, runs/grid, seeds, sweep")
    s.add_argument("--report-only", action="store_true", help="only regenerate report.md and plots from results_dir")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    s.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    s.add_argument("--only", nargs="+", metavar="NAME", help="only these run ids or settings")
    s.set_defaults(func=cmd_study)

"""Running a plan's jobs one after another, each in its own process, and copying their small results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

import torch

from .. import __version__
from ..recipe.meter import peak_rss_mib, reset_peak_rss
from ..errors import LisaError
from ..recipe.checkpoint import latest_checkpoint
from ..recipe.config import load_config
from ..recipe.loop import Interrupted, train
from .plan import Job, Plan
from .report import if_best_state, load_results, write_report



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
        if job.if_best:
            why = if_best_state(plan, job, *load_results(plan))
            if why:
                counts["skipped"] += 1
                echo(f"{head}: {why}")
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
    reset = reset_peak_rss()
    try:
        train(load_config(str(cfg_path)))
        code, error = 0, None
    except Interrupted:
        code, error = 130, None
    except LisaError as e:
        code, error = 2, str(e)
    return code, round(peak_rss_mib(reset), 1), error


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
    here = Path(__file__).parent.parent  # the package: src/lisatune
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}" if sha else __version__


def _torch_threads() -> int:
    return torch.get_num_threads()


def _g(d: dict, key: str) -> str:
    v = (d or {}).get(key)  # "before" is null when train.eval_before is false
    return f"{v:.4f}" if isinstance(v, (int, float)) else "–"



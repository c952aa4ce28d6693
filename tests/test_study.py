"""`lisatune study` on a tiny model: grids run, resume and report; finished runs are not retrained; bad files fail
in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lisatune.study.runner
from helpers import make_run_assets
from lisatune.cli import main
from lisatune.errors import LisaError
from lisatune.study import load_study, run_study, write_report

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = make_run_assets(tmp_path_factory.mktemp("assets"))
    base = {"model": {"source": str(root / "model")},
            "data": {"format": "alpaca", "path": str(root / "train.jsonl"), "val_fraction": 0.25, "max_length": 64},
            "method": "lisa", "lisa": {"n_layers": 2, "interval": 2},
            "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "eval_every": 2,
                      "save_every": 2, "tensorboard": False, "gsm_eval_samples": 0}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root


def write_study(tmp_path, assets, name="tiny", **fields):
    study = {"name": name, "base_config": str(assets / "base.yaml"), "output_dir": str(tmp_path / "runs"),
             "results_dir": str(tmp_path / "results"), "isolate": False, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_2x2_grid_trains_reports_and_a_second_invocation_retrains_nothing(tmp_path, assets, monkeypatch):
    path = write_study(tmp_path, assets, grid={"lisa.n_layers": [1, 2], "lisa.interval": [1, 3]})
    r = run_study(load_study(path), echo=lambda *a: None)
    assert (r["trained"], r["done"], r["failed"]) == (4, 0, 0)

    res = tmp_path / "results"
    ids = ["n_layers1-interval1_s0", "n_layers1-interval3_s0", "n_layers2-interval1_s0", "n_layers2-interval3_s0"]
    for rid in ids:
        assert {p.name for p in (res / rid).iterdir()} >= {"summary.json", "metrics.jsonl", "config.yaml", "run.json"}
        run = tmp_path / "runs" / rid
        assert not (run / "final").exists() and not (run / "checkpoints").exists()  # keep_models: false
        info = json.loads((res / rid / "run.json").read_text())
        assert info["peak_rss_mib"] > 10 and info["code"].startswith("0.1.0")
    report = (res / "report.md").read_text()
    table = [ln for ln in report.splitlines() if ln.startswith("| n_layers")]
    assert len(table) == 4 and all("–" not in ln.split("|")[5] for ln in table)  # eval loss after is there
    assert "peak RSS MiB" in report and "median s/step" in report
    for rid in ids:  # lowest eval loss: the best evaluation during training, and its step
        curve = [(json.loads(ln)["eval_loss"], json.loads(ln)["step"]) for ln in
                 (res / rid / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
        low, step = min(c for c in curve if c[1] > 0)
        row = next(ln for ln in table if ln.startswith(f"| {rid.rsplit('_', 1)[0]} "))
        assert row.split("|")[6].strip() == f"{low:.4f} @{step}"
    for png in ("eval_loss.png", "ablation_gamma.png", "ablation_interval.png"):
        assert (res / png).stat().st_size > 1000 and f"]({png})" in report

    mtimes = {rid: (res / rid / "summary.json").stat().st_mtime_ns for rid in ids}
    calls = []
    monkeypatch.setattr(lisatune.study.runner, "train", lambda cfg: calls.append(cfg))
    r = run_study(load_study(path), echo=lambda *a: None)
    assert (r["trained"], r["done"]) == (0, 4) and calls == []
    assert mtimes == {rid: (res / rid / "summary.json").stat().st_mtime_ns for rid in ids}

    (res / "report.md").unlink()
    assert main(["study", str(path), "--report-only"]) == 0 and calls == []
    assert (res / "report.md").read_text() == report


def test_a_half_done_run_resumes_from_its_checkpoint(tmp_path, assets):
    path = write_study(tmp_path, assets, runs=[{"name": "lisa"}], keep_models=True)
    run_study(load_study(path), echo=lambda *a: None)
    res, run = tmp_path / "results" / "lisa_s0", tmp_path / "runs" / "lisa_s0"
    whole = json.loads((res / "summary.json").read_text())
    # As if the process died after the step-2 checkpoint and before the results were copied.
    for leftover in [res, run / "final", run / "summary.json", run / "checkpoints" / "step-000004"]:
        __import__("shutil").rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    lines = []
    r = run_study(load_study(path), echo=lines.append)
    assert r["trained"] == 1 and any("training (resuming)" in ln for ln in lines), lines
    again = json.loads((res / "summary.json").read_text())
    assert again["steps"] == 4 and again["after"] == whole["after"] and again["before"] == whole["before"]
    assert json.loads((res / "run.json").read_text())["segments"] == 2


def test_a_run_in_its_own_process_records_its_own_peak_rss(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: threads only contend on the shared cores
    path = write_study(tmp_path, assets, runs=[{"name": "full", "set": {"method": "full", "train.max_steps": 2}}],
                       isolate=True)
    r = run_study(load_study(path), echo=lambda *a: None)
    assert r["trained"] == 1, (tmp_path / "runs" / "logs" / "full_s0.log").read_text()
    info = json.loads((tmp_path / "results" / "full_s0" / "run.json").read_text())
    assert 100 < info["peak_rss_mib"] < 4000 and info["peak_rss_kind"].startswith("ru_maxrss")


def test_sigterm_to_the_study_stops_it_even_while_its_run_is_starting_up(tmp_path, assets, monkeypatch):
    import os
    import signal
    import threading
    import time
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_study(tmp_path, assets, isolate=True,
                       runs=[{"name": "first", "set": {"train.max_steps": 400}}, {"name": "second"}])
    log = tmp_path / "runs" / "logs" / "first_s0.log"

    def kill_when_started():  # like `kill PID` of a nohup'd study while its child is still starting up
        deadline = time.time() + 120
        while time.time() < deadline and not log.is_file():
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_started, daemon=True).start()
    lines = []
    r = run_study(load_study(path), echo=lines.append)
    assert r.get("interrupted") == "first_s0" and r["failed"] == 0, lines
    assert not (tmp_path / "runs" / "second_s0").exists()  # the study stopped; the next run never started
    assert not (tmp_path / "results" / "first_s0" / "failed.json").exists()


def test_sweeps_and_seeds_expand_and_the_report_keeps_the_best_sweep_point(tmp_path, assets):
    path = write_study(tmp_path, assets, seeds=[0, 1], sweep={"train.lr": ["1e-3", "1e-2"]},
                       runs=[{"name": "full", "set": {"method": "full"}},
                             {"name": "lora", "set": {"method": "lora"}, "sweep": {"train.lr": [0.1]}, "seeds": [3]}])
    plan = load_study(path)
    # Interleaved: seed by seed, each setting's middle sweep point first.
    assert [j.run_id for j in plan.jobs] == ["full_lr0.001_s0", "lora_lr0.1_s3", "full_lr0.01_s0",
                                             "full_lr0.001_s1", "full_lr0.01_s1"]
    job = plan.jobs[3]
    assert job.config["train"]["seed"] == job.config["lisa"]["seed"] == 1 and job.config["train"]["lr"] == 1e-3
    assert job.config["train"]["output_dir"] == str(tmp_path / "runs" / "full_lr0.001_s1")
    # Fabricated results: lr 1e-2 is better for full.
    losses = {"full_lr0.001_s0": 2.0, "full_lr0.001_s1": 2.2, "full_lr0.01_s0": 1.0, "full_lr0.01_s1": 1.2}
    for rid, loss in losses.items():
        d = tmp_path / "results" / rid
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"before": {"eval_loss": 3.0}, "after": {"eval_loss": loss},
                                                    "train_seconds": 5}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_s": 0.5 + s}) + "\n" for s in (1, 2, 3)))
        (d / "run.json").write_text(json.dumps({"peak_rss_mib": 500}))
    report = write_report(plan).read_text()
    row = next(ln for ln in report.splitlines() if ln.startswith("| full |"))
    assert "lr 0.01 (of 2)" in row and "1.1000 ± 0.1414" in row and "| 2/2 |" in row and "| 2.50 ± 0.00 |" in row
    assert "| lora | lora | – |" in report  # not run yet
    assert "full | lr 0.01 **best**" in report and (tmp_path / "results" / "sweep.png").is_file()


def test_best_seeds_train_only_the_best_sweep_point_once_its_sweep_is_done(tmp_path, assets, monkeypatch, capsys):
    path = write_study(tmp_path, assets, sweep={"train.lr": [1e-3, 1e-2, 1e-1]}, best_seeds=[1, 2], order="listed",
                       runs=[{"name": "full", "set": {"method": "full"}}])
    plan = load_study(path)
    assert [j.run_id for j in plan.jobs if not j.if_best] == ["full_lr0.001_s0", "full_lr0.01_s0", "full_lr0.1_s0"]
    assert len(plan.jobs) == 9 and all(j.if_best for j in plan.jobs[3:])  # best_seeds after the whole sweep
    assert main(["study", str(path), "--dry-run"]) == 0
    assert "full_lr0.01_s1: waits for the sweep of full (3 run(s) to go)" in capsys.readouterr().out

    trained = []

    def fake_train(cfg):  # lr 1e-2 is best on seed 0; the other seeds are much worse (a noisy setting)
        run = Path(cfg.train.output_dir)
        run.mkdir(parents=True, exist_ok=True)
        trained.append(run.name)
        loss = {1e-3: 2.0, 1e-2: 1.0, 1e-1: 3.0}[cfg.train.lr] + 1.5 * cfg.train.seed
        (run / "summary.json").write_text(json.dumps({"steps": 4, "before": {"eval_loss": 3.0},
                                                      "after": {"eval_loss": loss}, "train_seconds": 1}))
    monkeypatch.setattr(lisatune.study.runner, "train", fake_train)
    r = run_study(load_study(path), echo=lambda *a: None)
    assert trained == ["full_lr0.001_s0", "full_lr0.01_s0", "full_lr0.1_s0", "full_lr0.01_s1", "full_lr0.01_s2"]
    assert (r["trained"], r["skipped"]) == (5, 4)
    report = (tmp_path / "results" / "report.md").read_text()
    # chosen on seed 0 (1.0 < 2.0), reported over seeds 0-2 (mean 2.5 > lr 1e-3's 2.0: still this point)
    row = next(ln for ln in report.splitlines() if ln.startswith("| full |"))
    assert "lr 0.01 (of 3)" in row and "| 3/3 |" in row and "2.5000 ± 1.5000" in row
    assert "5 of 5 runs finished" in report and "| full | lr 0.001 | 1/1 | 2.0000 |" in report
    assert main(["study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "full_lr0.01_s2: done" in out and "full_lr0.1_s1: not the best sweep point of full" in out
    assert run_study(load_study(path), echo=lambda *a: None)["trained"] == 0


def test_a_missing_probabilities_file_skips_that_run_with_a_clear_message(tmp_path, assets):
    probs = tmp_path / "probs.json"
    path = write_study(tmp_path, assets, runs=[{"name": "norms", "set": {
        "lisa.policy": "weighted", "lisa.probabilities": str(probs)}}])
    lines = []
    r = run_study(load_study(path), echo=lines.append)
    assert r["skipped"] == 1 and r["trained"] == 0
    msg = next(ln for ln in lines if "skipped" in ln)
    assert f"lisa.probabilities file '{probs}' does not exist" in msg and "lisatune norms" in msg
    assert "skipped: lisa.probabilities" in (tmp_path / "results" / "report.md").read_text()


def test_a_diverging_run_is_recorded_as_failed_and_not_retried(tmp_path, assets, capsys):
    path = write_study(tmp_path, assets, runs=[{"name": "hot", "set": {
        "method": "full", "train.lr": 1e30, "train.max_grad_norm": None}}])
    r = run_study(load_study(path), echo=lambda *a: None)
    failed = json.loads((tmp_path / "results" / "hot_s0" / "failed.json").read_text())
    assert r["failed"] == 1 and "non-finite" in failed["error"]
    lines = []
    run_study(load_study(path), echo=lines.append)
    assert any("failed before, not retried" in ln for ln in lines)
    assert "`hot_s0`: failed: non-finite" in (tmp_path / "results" / "report.md").read_text()
    capsys.readouterr()
    assert main(["study", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "hot_s0: failed"
    assert main(["study", str(path), "--retry-failed"]) == 1  # a study with failed runs is not a success
    assert capsys.readouterr().out.strip().endswith("0 trained, 0 already done, 0 skipped, 1 failed")


@pytest.mark.parametrize("fields,message", [
    ({"runz": []}, "unknown key 'runz' (did you mean 'runs'? valid: name, description, base_config"),
    ({"runs": [{"name": "a", "sett": {}}]},
     "unknown key 'runs[0].sett' (did you mean 'set'? valid: name, set, sweep, seeds, best_seeds)"),
    ({"runs": [{"name": "a"}], "best_seeds": [0]}, "runs: 'a': seed 0 is in both seeds and best_seeds"),
    ({"runs": [{"name": "a", "best_seeds": [2, 2]}]}, "runs[0].best_seeds: must be a list of distinct integers"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "the name 'a' is used twice"),
    ({"runs": []}, "the study has no runs"),
    ({"runs": [{"name": "a", "set": {"lisa.n_layerz": 2}}]}, "run 'a_s0': unknown option 'lisa.n_layerz' (did you mean 'n_layers'? valid:"),
    ({"runs": [{"name": "a", "set": {"method": "dora"}}]}, "run 'a_s0': method: 'dora' is not one of"),
    ({"runs": [{"name": "a"}], "sweep": {"train.lr": []}}, "sweep: 'train.lr' needs a non-empty list"),
    ({"runs": [{"name": "a", "set": {"train.output_dir": "x"}}]}, "sets 'train.output_dir', which the study sets"),
    ({"runs": [{"name": "a", "seeds": [1, 1]}]}, "runs[0].seeds: must be a non-empty list of distinct integers"),
    ({"runs": [{"name": "a"}], "seeds": "0"}, "seeds: Input should be a valid list"),
    ({"runs": [{"name": "a/b"}]}, "runs[0].name: must be letters, digits"),
    ({"runs": [{"name": "a"}], "base_config": "nope.yaml"}, "base_config 'nope.yaml' does not exist"),
    ({"runs": [{"name": "a", "set": {"data.path": "/nope.jsonl"}}]}, "data.path '/nope.jsonl' does not exist"),
    ({"runs": [{"name": "a"}], "select": "eval_los"}, "select: Input should be 'eval_loss' or 'eval_ppl'"),
])
def test_a_bad_study_file_gives_a_one_line_error(tmp_path, assets, fields, message):
    path = write_study(tmp_path, assets, **fields)
    with pytest.raises(LisaError) as e:
        load_study(path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_cli_prints_a_bad_study_as_one_line(tmp_path, assets, capsys):
    path = write_study(tmp_path, assets, runs=[{"name": "a"}])
    path.write_text(path.read_text().replace("results_dir", "results_dirr"))
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lisatune: error:") and len(err.splitlines()) == 1
    assert "unknown key 'results_dirr' (did you mean 'results_dir'?" in err


def test_a_dry_run_piped_into_head_exits_cleanly(tmp_path, assets):
    path = write_study(tmp_path, assets, runs=[{"name": "a", "seeds": list(range(3000))}])
    cmd = f"{sys.executable} -m lisatune.cli study {path} --dry-run | head -1; echo rc=${{PIPESTATUS[0]}}"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines() == ["a_s0: to run", "rc=0"] and "Traceback" not in p.stderr, p.stderr

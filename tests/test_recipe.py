"""`lisatune train` end to end on a tiny model: every method learns, resume is exact, bad input is refused."""
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file

from helpers import SUBPROCESS_ENV, make_run_assets
from lisatune.recipe.checkpoint import latest_checkpoint, load_checkpoint
from lisatune.errors import LisaError
from lisatune.recipe.loop import train
from lisatune.recipe.config import load_config

ENV = SUBPROCESS_ENV


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def write_config(tmp_path, assets, method="lisa", name="run", **train):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25, "max_length": 64},
           "method": method,
           "lisa": {"n_layers": 2, "interval": 3},
           "galore": {"rank": 4, "update_proj_gap": 5},
           "train": {"output_dir": str(tmp_path / name), "lr": 1e-2, "batch_size": 4, "max_steps": 10,
                     "warmup_steps": 1, "tensorboard": False, "gsm_eval_samples": 0, **train}}
    if "report_to" in train:  # which replaces tensorboard
        del cfg["train"]["tensorboard"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.mark.parametrize("method", ["full", "lora", "galore", "lisa"])
def test_every_method_lowers_the_held_out_loss_and_saves_a_loadable_model(tmp_path, assets, method):
    s = train(load_config(str(write_config(tmp_path, assets, method)), []))
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"] - 0.2, s
    final = T.AutoModelForCausalLM.from_pretrained(s["final_model"])
    assert not any("lora" in n for n, _ in final.named_parameters())  # LoRA is merged into a plain model
    rows = [json.loads(ln) for ln in Path(s["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert all("active" in r for r in rows if "loss" in r) == (method == "lisa")
    # CPU: every logged training row carries the RSS peaks of its interval (and the process's high-water mark)
    assert all(0 < r["rss_mib"] <= r["peak_rss_mib"] for r in rows if "loss" in r)
    assert s["memory"]["peak_rss_mib"] >= max(r["peak_rss_mib"] for r in rows if "loss" in r)


def test_on_cuda_metrics_carry_the_allocator_peak_per_interval_and_the_summary_per_phase(tmp_path, assets,
                                                                                          monkeypatch):
    """The recipe's phases, through meter.PhaseMemory with a fake CUDA allocator: every reading a new peak."""
    import itertools
    import lisatune.recipe.loop as recipe
    from lisatune.recipe.meter import PhaseMemory
    ticks = itertools.count(1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(ticks) * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 10**6 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(recipe, "PhaseMemory", lambda device, opt: PhaseMemory("cuda", opt))
    s = train(load_config(str(write_config(tmp_path, assets, max_steps=7, log_every=2)), []))  # K=3: switches 3, 6
    rows = [json.loads(ln) for ln in Path(s["metrics"]).read_text().splitlines() if '"loss"' in ln]
    assert [r["step"] for r in rows] == [2, 4, 6, 7]
    peaks = [r["peak_allocated_mib"] for r in rows]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4 and all(r["peak_reserved_mib"] == 10**6 for r in rows)
    phases = s["memory"]["phases"]
    assert set(phases) == {"forward", "backward", "step", "switch"}
    assert all(v["peak_allocated_mib"] > 0 for v in phases.values())  # the switch too: LISA switched at 3 and 6


@pytest.mark.parametrize("method", ["lisa", "full", "galore"])
def test_resume_from_a_mid_run_checkpoint_is_bitwise_equal(tmp_path, assets, method):
    whole = train(load_config(str(write_config(tmp_path, assets, method, "whole")), []))
    cfg = write_config(tmp_path, assets, method, "split", save_every=4, keep_last=5)
    train(load_config(str(cfg), []))
    run = tmp_path / "split"
    for leftover in ["checkpoints/step-000008", "checkpoints/step-000010", "final", "summary.json"]:
        os.system(f"rm -rf {run / leftover}")  # as if the process died after step 4
    resumed = train(load_config(str(cfg), ["train.resume=true"]))
    assert resumed["before"] == whole["before"]
    a, b = weights(tmp_path / "whole"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_a_checkpoint_exits_cleanly_and_resume_finishes_identically(tmp_path, assets):
    cfg = write_config(tmp_path, assets, "lisa", "interrupted", max_steps=200)
    proc = subprocess.Popen([sys.executable, "-m", "lisatune.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "Traceback" not in err
    ckpts = sorted((tmp_path / "interrupted" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 200

    r = run_cli("train", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr
    train(load_config(str(write_config(tmp_path, assets, "lisa", "whole", max_steps=200)), []))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_during_the_first_eval_stops_cleanly_at_step_0_and_resume_matches(tmp_path, assets, monkeypatch):
    import lisatune.recipe.loop as recipe
    from lisatune.recipe.loop import Interrupted
    real = recipe.eval_loss

    def eval_then_signal(*a, **k):  # SIGTERM arrives while the model is being evaluated, before any step
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    cfg = write_config(tmp_path, assets, "lisa", "early")
    monkeypatch.setattr(recipe, "eval_loss", eval_then_signal)
    with pytest.raises(Interrupted) as e:
        train(load_config(str(cfg), []))
    assert e.value.step == 0 and e.value.path.name == "step-000000"
    monkeypatch.setattr(recipe, "eval_loss", real)
    resumed = train(load_config(str(cfg), ["train.resume=true"]))
    whole = train(load_config(str(write_config(tmp_path, assets, "lisa", "whole")), []))
    assert resumed["before"] == whole["before"]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "early")
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lisatune.cli", *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("override,message", [
    ("method=dora", "method: 'dora' is not one of full, lora, galore, lisa"),
    ("train.lrr=1", "unknown option 'train.lrr' (did you mean 'lr'? valid: batch_size,"),
    ("lisa.n_layers=9", "n_layers (γ) = 9 exceeds the 4 transformer blocks"),
    ("model.source=/nope", "model.source '/nope' does not exist"),
    ("data.path=/nope.jsonl", "data.path '/nope.jsonl' does not exist"),
])
def test_bad_settings_give_one_line_errors(tmp_path, assets, override, message):
    cfg = write_config(tmp_path, assets)
    with pytest.raises(LisaError) as e:
        train(load_config(str(cfg), [override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_error_is_one_line_without_traceback(tmp_path, assets):
    r = run_cli("train", str(write_config(tmp_path, assets)), "--set", "train.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("lisatune: error:") and len(r.stderr.strip().splitlines()) == 1


def test_broken_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  source: x\n train: [\n")
    with pytest.raises(LisaError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(str(bad), [])


def test_an_output_dir_holding_another_run_is_refused_unless_overwrite(tmp_path, assets):
    cfg = write_config(tmp_path, assets, max_steps=2)
    train(load_config(str(cfg), []))
    before = weights(tmp_path / "run")
    with pytest.raises(LisaError, match="holds a finished run; to start a new one, pass --overwrite"):
        train(load_config(str(cfg), ["lisa.seed=5"]))
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "run").items())  # nothing lost
    with pytest.raises(LisaError, match="cannot resume .*lisa.seed was 0, now 5"):
        train(load_config(str(cfg), ["lisa.seed=5", "train.resume=true"]))
    s = train(load_config(str(cfg), ["lisa.seed=5", "train.overwrite=true"]))
    assert s["steps"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, assets):
    cfg = write_config(tmp_path, assets, "full", lr=1e30, max_grad_norm=None, save_every=1, max_steps=50)
    with pytest.raises(LisaError, match=r"non-finite (loss|gradient norm) at step \d+: .*checkpoint .*step-0+\d+ is intact"):
        train(load_config(str(cfg), []))
    last = latest_checkpoint(tmp_path / "run")
    model = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    load_checkpoint(last, model)  # loadable
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_eval_command_reports_loss(tmp_path, assets):
    r = run_cli("eval", str(assets / "model"), "--format", "alpaca", "--data", str(assets / "train.jsonl"),
                "--max-length", "64")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["eval_tokens"] > 0 and res["eval_loss"] > 0


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("examples/*.yaml")))
def test_shipped_example_configs_are_valid(path):
    assert load_config(str(path), []).method in {"lisa", "lora", "full", "galore"}


@pytest.mark.parametrize("overrides", [
    ["model.gradient_checkpointing=true", "lisa.train_embedding=false"],  # backward starts at an active block
    ["model.dtype=bf16"],
])
def test_checkpointing_and_bf16_runs_learn(tmp_path, assets, overrides):
    s = train(load_config(str(write_config(tmp_path, assets, "lisa", max_steps=6)), overrides))
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"] - 0.1


def test_lora_can_be_saved_as_an_adapter(tmp_path, assets):
    s = train(load_config(str(write_config(tmp_path, assets, "lora", max_steps=2)), ["train.merge_lora=false"]))
    assert (Path(s["final_model"]) / "adapter_config.json").is_file()


def test_running_a_finished_run_again_with_resume_auto_reports_it(tmp_path, assets):
    cfg = write_config(tmp_path, assets, max_steps=2, resume="auto")
    first = train(load_config(str(cfg), []))
    again = train(load_config(str(cfg), []))
    assert again["already_complete"] and again["after"] == first["after"]


def test_no_eval_before_and_no_final_state_still_finish_and_report_complete(tmp_path, assets, capsys, monkeypatch,
                                                                               cli_main):
    import lisatune.recipe.loop as recipe
    real = recipe.eval_loss
    monkeypatch.setattr(recipe, "eval_loss", lambda *a, **k: time.sleep(0.5) or real(*a, **k))
    cfg = write_config(tmp_path, assets, max_steps=3, eval_before=False, save_final_state=False, resume="auto",
                       eval_every=1)
    s = train(load_config(str(cfg), []))
    run = tmp_path / "run"
    assert s["before"] is None and "eval_loss" in s["after"]
    assert s["eval_seconds"] >= 1.5 > s["train_seconds"]  # evaluations after steps 1, 2, 3: not training time
    assert latest_checkpoint(run) is None  # no optimizer state written...
    model = run / "final" / "model.safetensors"  # ...but the model, with the umask's mode (not a temp file's 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert model.is_file() and model.stat().st_mode & 0o777 == 0o666 & ~umask
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2, 3]  # none before training

    again = train(load_config(str(cfg), []))  # summary.json, not a checkpoint, marks it complete
    assert again["already_complete"] and again["after"] == s["after"]
    assert cli_main(["train", str(cfg), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "before: skipped" in out


def test_the_switch_after_the_last_step_is_not_reported(tmp_path, assets, caplog):
    import logging
    cfg = write_config(tmp_path, assets, max_steps=9)  # K=3: the engine samples again after step 9
    with caplog.at_level(logging.INFO, logger="lisatune"):
        s = train(load_config(str(cfg), []))
    switches = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LISA switch")]
    assert [m.split(":")[0] for m in switches] == ["LISA switch 0 at step 0", "LISA switch 1 at step 3",
                                                     "LISA switch 2 at step 6"]
    assert "previous interval" not in switches[0] and "previous interval" in switches[1]
    rows = [json.loads(ln) for ln in Path(s["metrics"]).read_text().splitlines() if '"loss"' in ln]
    # Each row names the blocks that step trained: one set per interval of 3, the last one included.
    active = [r["active"] for r in rows]
    assert len(set(active[0:3])) == len(set(active[3:6])) == len(set(active[6:9])) == 1
    assert active[0] != active[3] or active[3] != active[6]


def test_eval_command_caps_examples_and_defaults_to_the_training_max_length(assets, capsys, cli_main):
    from lisatune.cli import build_parser
    main = cli_main
    from lisatune.data import DataConfig
    base = ["eval", str(assets / "model"), "--format", "alpaca", "--data", str(assets / "train.jsonl")]
    assert main(base) == 0
    everything = json.loads(capsys.readouterr().out)
    assert main(base + ["--max-examples", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert 0 < two["eval_tokens"] < everything["eval_tokens"] / 5
    # Not given: None, so that DataConfig's own default applies (and --max-length with --tasks can be refused).
    assert build_parser().parse_args(["eval", "m"]).max_length is None and DataConfig().max_length == 256
    assert main(base + ["--max-examples", "0"]) == 2
    assert "--max-examples must be >= 1" in capsys.readouterr().err


def test_eval_reads_a_split_and_columns_as_train_does(tmp_path, assets, capsys, cli_main):
    from datasets import Dataset, DatasetDict
    from helpers import RECORDS
    renamed = [{"prompt": r["instruction"], "answer": r["output"]} for r in RECORDS]
    DatasetDict({"train": Dataset.from_list(renamed), "test": Dataset.from_list(renamed[:5])}).save_to_disk(
        str(tmp_path / "dict"))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:5]))

    def evaluate(*args):
        assert cli_main(["eval", str(assets / "model"), "--format", "alpaca", *map(str, args)]) == 0
        return json.loads(capsys.readouterr().out)

    want = evaluate("--data", tmp_path / "test.jsonl")
    columns = ["--columns", "instruction=prompt", "output=answer"]
    assert evaluate("--data", tmp_path / "dict", "--split", "test", *columns) == want
    assert evaluate("--data", tmp_path / "dict", *columns)["eval_tokens"] > want["eval_tokens"]  # train: all 24
    Dataset.from_list(renamed[:5]).to_parquet(str(tmp_path / "test.parquet"))
    assert evaluate("--data", tmp_path / "test.parquet", "--columns", "instruction=prompt",
                    "--columns", "output=answer") == want  # a binary file, read by `datasets`

    for args, message in [
        (["--split", "dev", *columns], "has no split 'dev' (splits: train, test); set data.split"),
        (["--columns", "instruction=prompt"], "no column 'output' for format 'alpaca' (columns: prompt, answer)"),
        (["--columns", "question=prompt"], "columns: 'question' is not a field of format 'alpaca'"),
        (["--columns", "instruction=prompt", "output=answer", "output=prompt"], "--columns: field 'output' is "
                                                                                  "given twice"),
        (["--columns", "instruction"], "argument --columns: expected FIELD=COLUMN (got 'instruction')"),
    ]:
        try:
            rc = cli_main(["eval", str(assets / "model"), "--format", "alpaca", "--data", str(tmp_path / "dict"),
                           *args])
        except SystemExit as e:  # argparse
            rc = e.code
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln or "Traceback" in ln]
        assert rc == 2 and len(errors) == 1 and message in errors[0], errors
    assert cli_main(["eval", str(assets / "model"), "--split", "test"]) == 2
    assert "--split has no effect with format gsm (it generates its problems)" in capsys.readouterr().err


def test_eval_shows_progress_of_the_loss_and_of_gsm_answers_and_quiet_hides_it(assets, capsys, cli_main):
    args = ["eval", str(assets / "model"), "--max-length", "2048", "--max-examples", "3", "--gsm-samples", "2",
            "--batch-size", "1"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)  # the bars go to stderr: stdout is still the result alone
    assert res["gsm_total"] == 2 and res["eval_tokens"] > 0
    assert re.search(r"eval loss: .*\| *[0-3]/3 ", err) and re.search(r"gsm answers: .*\| *[0-2]/2 ", err), err
    assert cli_main(["--quiet", *args]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == res and "eval loss" not in err and "gsm answers" not in err, err


def test_log_lines_print_above_the_progress_bar_and_quiet_hides_both(tmp_path, assets):
    cfg = write_config(tmp_path, assets, max_steps=9)  # K=3: switch lines while the bar is shown
    r = run_cli("train", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "LISA switch 2 at step 6" in r.stderr and "it/s" in r.stderr
    # Through tqdm.write the bar is cleared first; a plain handler would append the line to the bar's text.
    assert not re.search(r"\S(LISA switch|before training)", r.stderr), r.stderr[-2000:]
    q = run_cli("--quiet", "train", str(cfg), "--overwrite")
    assert q.returncode == 0, q.stderr
    assert "LISA switch" not in q.stderr and "it/s" not in q.stderr and "steps in" in q.stdout
    assert run_cli("--quiet", "--log-level", "debug", "train").returncode == 2  # one or the other


def test_report_to_wandb_writes_an_offline_run_inside_the_run_dir(tmp_path, assets, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is lisatune's default, not the environment's
    train(load_config(str(write_config(tmp_path, assets, max_steps=2, report_to=["wandb"])), []))
    run = tmp_path / "run"
    [log] = run.glob("wandb/offline-run-*/run-*.wandb")  # W&B's own record of the run, to `wandb sync`
    assert all(key in log.read_bytes() for key in (b"eval_loss", b"grad_norm", b"tokens_per_s"))
    assert not (run / "tb").exists() and (run / "metrics.jsonl").is_file()


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, assets, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = write_config(tmp_path, assets, max_steps=4, save_every=2, keep_last=5, report_to=["wandb"])
    train(load_config(str(cfg), []))
    run = tmp_path / "run"
    run_id = (run / "wandb-run-id").read_text().strip()
    shutil.rmtree(run / "checkpoints/step-000004")  # as if the process died after step 2
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    train(load_config(str(cfg), ["train.resume=true"]))
    parts = sorted(run.glob("wandb/offline-run-*"))
    # offline-run-<time>-<id>, with "-1" added when both parts start in the same second: `wandb sync` joins them
    assert len(parts) == 2 and all(p.name.split("-")[3] == run_id for p in parts), (run_id, parts)
    train(load_config(str(cfg), ["train.overwrite=true"]))  # a fresh run is a new W&B run
    assert (run / "wandb-run-id").read_text().strip() != run_id


def test_report_to_wandb_without_wandb_is_one_line_before_the_model_loads(tmp_path, assets, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = write_config(tmp_path, assets, report_to=["tensorboard", "wandb"])
    with pytest.raises(LisaError, match=r"^train.report_to: wandb is not installed \(pip install 'lisatune\[wandb\]'"):
        train(load_config(str(cfg), []))
    assert not (tmp_path / "run").exists()


def test_report_to_defaults_to_what_train_tensorboard_said():
    assert load_config(None, []).train.sinks() == ["tensorboard"]
    assert load_config(None, ["train.tensorboard=false"]).train.sinks() == []
    assert load_config(None, ["train.report_to=[]"]).train.sinks() == []
    with pytest.raises(LisaError, match="report_to: give it or train.tensorboard"):
        load_config(None, ["train.report_to=[wandb]", "train.tensorboard=true"])

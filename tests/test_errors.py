"""Issue #18: nothing gets past validation, nothing is lost, nothing runs that should not.

One parametrised test per class of bad input, run through the CLI (`lisatune.cli.main`, in process) or
load_config/train: each must exit 2 with one line naming the problem, no traceback, and leave the output
directory as it was. Then a fuzz test over randomly broken configs.
"""
import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from helpers import make_run_assets, tiny_model
from lisatune.cli import main
from lisatune.data import DataConfig, data_fingerprint
from lisatune.errors import LisaError
from lisatune.recipe import checkpoint as ckpt_mod
from lisatune.recipe import loop
from lisatune.recipe.checkpoint import last_good_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from lisatune.recipe.config import load_config
from lisatune.recipe.run_dir import MARKER


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def write_config(tmp_path, assets, method="lisa", name="run", data=None, **train):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25, "max_length": 64,
                    **(data or {})},
           "method": method,
           "lisa": {"n_layers": 2, "interval": 3},
           "train": {"output_dir": str(tmp_path / name), "lr": 1e-2, "batch_size": 4, "max_steps": 4,
                     "warmup_steps": 1, "tensorboard": False, "gsm_eval_samples": 0, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *args):
    """(exit code, stdout, stderr) of `lisatune ARGS` run in this process."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc, err, message):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and lines[0].startswith("lisatune"), err
    assert message in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path):
    """Every file under root with its bytes: "untouched" means this is equal before and after."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def finished_run(tmp_path, assets, name="run", **train):
    cfg = write_config(tmp_path, assets, name=name, **train)
    loop.train(load_config(str(cfg), []))
    return cfg, tmp_path / name


# -- 1. one validated schema ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.lr=-1e-4", "train.lr: Input should be greater than 0"),
    ("train.lr=true", "train.lr: must be a number, not true/false"),
    ("train.betas=[0.9, 1.0]", "train.betas[1]: Input should be less than 1"),
    ("train.betas=[-0.1, 0.9]", "train.betas[0]: Input should be greater than or equal to 0"),
    ("train.eps=0", "train.eps: Input should be greater than 0"),
    ("train.weight_decay=-0.01", "train.weight_decay: Input should be greater than or equal to 0"),
    ("train.epochs=.inf", "train.epochs: Input should be a finite number"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("data.seed=-1", "data.seed: Input should be greater than or equal to 0"),
    ("lisa.seed=-1", "lisa.seed: Input should be greater than or equal to 0"),
    ("train.max_grad_norm=0", "train.max_grad_norm: must be > 0 (or null for no clipping)"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be > 0 (or null for no clipping)"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm: Input should be a finite number"),
    ("train.batch_size=true", "train.batch_size: Input should be a valid integer (got True)"),
    ("train.batch_size=2.5", "train.batch_size: Input should be a valid integer"),
    ("train.max_steps=true", "train.max_steps: Input should be a valid integer"),
    ("train.resume=1", "train.resume: must be true, false or 'auto'"),
    ("train.tensorboard=1", "train.tensorboard: Input should be a valid boolean"),
    ("data.val_fraction=.nan", "data.val_fraction: Input should be a finite number"),
    ("data.max_length=true", "data.max_length: Input should be a valid integer"),
    ("lora.r=true", "lora.r: Input should be a valid integer"),
    ("lora.dropout=1.0", "lora.dropout: Input should be less than 1"),
    ("lora.alpha=0", "lora.alpha: Input should be greater than or equal to 1"),
    ("galore.scale=-1", "galore.scale: Input should be greater than 0"),
    ("galore.rank=0", "galore.rank: Input should be greater than or equal to 1"),
])
def test_every_number_is_checked(tmp_path, assets, capsys, override, message):
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--set", override)[::2], message)
    assert not (tmp_path / "run").exists()  # nothing was created


def test_null_max_grad_norm_means_no_clipping_and_is_the_only_way(tmp_path, assets):
    assert load_config(str(write_config(tmp_path, assets)), ["train.max_grad_norm=null"]).train.max_grad_norm is None
    assert load_config(str(write_config(tmp_path, assets)), []).train.max_grad_norm == 1.0


# -- 2. eval / norms / bench arguments --------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["eval", "{model}", "--batch-size", "0"], "argument --batch-size: must be >= 1 (got 0)"),
    (["eval", "{model}", "--batch-size", "-1"], "argument --batch-size: must be >= 1 (got -1)"),
    (["eval", "{model}", "--batch-size", "two"], "argument --batch-size: expected an integer (got 'two')"),
    (["eval", "{model}", "--max-length", "4"], "argument --max-length: must be >= 8 (got 4)"),
    (["eval", "{model}", "--gsm-samples", "-1"], "argument --gsm-samples: must be >= 0 (got -1)"),
    (["eval", "{model}", "--format", "alpaca", "--data", "{tmp}/nope.jsonl"],
     "--data '{tmp}/nope.jsonl' does not exist"),
    (["eval", "{model}", "--format", "alpaca", "--data", "{tmp}/binary.jsonl"], "is a binary file, not text"),
    (["eval", "{model}", "--format", "alpaca", "--data", "{tmp}/latin1.jsonl"], "is not UTF-8 text (byte 20)"),
    (["eval", "{model}", "--format", "alpaca", "--data", "{tmp}"],
     "is a directory but not one written by save_to_disk"),
    (["eval", "{model}", "--format", "alpaca", "--data", "{tmp}", "--columns", "=x"],
     "argument --columns: expected FIELD=COLUMN (got '=x')"),
    (["norms", "--model", "tiny", "--batch", "0"], "argument --batch: must be >= 1 (got 0)"),
    (["norms", "--model", "tiny", "--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
    (["norms", "--model", "tiny", "--gamma", "0"], "argument --gamma: must be >= 1 (got 0)"),
    (["norms", "--model", "tiny", "--n-batches", "-2"], "argument --n-batches: must be >= 1 (got -2)"),
    (["norms", "--model", "tiny", "--lr-full", "nan"], "argument --lr-full: must be a finite number > 0 (got nan)"),
    (["norms", "--model", "tiny", "--lr-lora=-1e-4"], "argument --lr-lora: must be a finite number > 0"),
    (["norms", "--model", "tiny", "--lora-r", "0"], "argument --lora-r: must be >= 1 (got 0)"),
    (["norms", "--model", "{model}", "--data", "{tmp}/nope.txt"], "--data '{tmp}/nope.txt' does not exist"),
    (["norms", "--model", "{model}", "--data", "{tmp}/binary.jsonl"], "is a binary file, not text"),
    (["norms", "--model", "tiny:x"], "--model 'tiny:x': expected tiny or tiny:N_LAYERS"),
    (["bench", "speed", "--model", "tiny", "--seq", "0"], "argument --seq: must be >= 2 (got 0)"),
])
def test_command_line_numbers_and_data_files(tmp_path, assets, capsys, args, message):
    (tmp_path / "binary.jsonl").write_bytes(b'{"instruction": "a"}\n\x00\x01\x02')
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    fill = {"model": str(assets / "model"), "tmp": str(tmp_path)}
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, *[a.format(**fill) for a in args])
    assert_one_line(rc, err, message.format(**fill))
    assert snapshot(tmp_path) == before


# -- 3. non-finite values: the lr named when it is the cause; never a checkpoint of non-finite weights ------
def test_a_diverging_lr_is_named(tmp_path, assets, capsys):
    cfg = write_config(tmp_path, assets, "full", lr=1e30, max_grad_norm=None, save_every=1, max_steps=50)
    line = assert_one_line(*cli(capsys, "train", cfg)[::2], "non-finite")
    assert "the updates diverged at train.lr=1e+30" in line and "lower train.lr" in line, line
    last = latest_checkpoint(tmp_path / "run")
    assert f"the last good checkpoint {last} is intact" in line
    model = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    load_checkpoint(last, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_before_any_update_is_not_blamed_on_the_lr(tmp_path, assets, capsys):
    bad = tmp_path / "nan-model"
    shutil.copytree(assets / "model", bad)
    model = T.AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    cfg = write_config(tmp_path, assets, "full")
    line = assert_one_line(*cli(capsys, "train", cfg, "--set", f"model.source={bad}")[::2],
                           "non-finite loss at step 1: before any update of this run, so not the lr")
    assert "no good checkpoint was written" in line


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, assets, capsys, monkeypatch):
    real = loop.train_step

    def poisoned(run, stop):  # the update of step 2 leaves a NaN weight behind, with a finite loss and gradient
        row, stopping = real(run, stop)
        if run.step == 2:
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return row, stopping

    monkeypatch.setattr(loop, "train_step", poisoned)
    cfg = write_config(tmp_path, assets, "full", save_every=1)
    line = assert_one_line(*cli(capsys, "train", cfg)[::2], "non-finite weights at step 2: not checkpointed")
    assert "train.lr=0.01" in line and "step-000001 is intact" in line
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]


def test_the_last_good_checkpoint_is_one_with_finite_weights(tmp_path):
    model = tiny_model(n_layers=2)
    save_checkpoint(tmp_path, 1, model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    save_checkpoint(tmp_path, 2, model)  # the library can still write one; the recipe never does
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert last_good_checkpoint(tmp_path).name == "step-000001"


# -- 4. a checksum manifest ---------------------------------------------------------------------------------------
def flip_byte(path: Path, at: int = -10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_flipped_byte_is_found_and_named(tmp_path, name):
    model = tiny_model(n_layers=2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched)
    state = json.loads((path / "trainer_state.json").read_text())
    assert set(state["sha256"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"}
    flip_byte(path / name)
    fresh = tiny_model(n_layers=2, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fopt = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(LisaError) as e:
        load_checkpoint(path, fresh, fopt, torch.optim.lr_scheduler.LambdaLR(fopt, lambda s: 1.0))
    assert str(e.value) == (f"checkpoint '{path}': {name} is corrupt (its sha256 does not match the one recorded "
                            "when it was written)")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half-loaded


def test_a_checkpoint_without_a_manifest_still_loads(tmp_path):
    model = tiny_model(n_layers=2)
    path = save_checkpoint(tmp_path, 3, model, extra={"a": 1})
    state = json.loads((path / "trainer_state.json").read_text())
    del state["sha256"], state["checkpoint_format"]  # as written before the manifest (and the format marker)
    (path / "trainer_state.json").write_text(json.dumps(state))
    assert load_checkpoint(path, tiny_model(n_layers=2, seed=1)) == {"a": 1, "step": 3}


def test_resuming_from_a_corrupt_checkpoint_is_one_line(tmp_path, assets, capsys):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    for leftover in ["final", "summary.json", "checkpoints/step-000004"]:
        shutil.rmtree(run / leftover) if (run / leftover).is_dir() else (run / leftover).unlink()
    flip_byte(run / "checkpoints/step-000002/model.safetensors")
    before = snapshot(run)
    assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2], "step-000002': model.safetensors is corrupt")
    assert snapshot(run) == before


# -- 5. the training data's fingerprint ---------------------------------------------------------------------------
def test_resume_refuses_changed_training_data_unless_allowed(tmp_path, assets, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(assets / "train.jsonl", data)
    cfg, run = finished_run(tmp_path, assets, data={"path": str(data)}, save_every=2, keep_last=5)
    state = json.loads((run / "checkpoints/step-000004/trainer_state.json").read_text())
    assert state["data_fingerprint"] == data_fingerprint(DataConfig(format="alpaca", path=str(data), val_fraction=0.25))
    for leftover in ["final", "summary.json", "checkpoints/step-000004"]:
        shutil.rmtree(run / leftover) if (run / leftover).is_dir() else (run / leftover).unlink()
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")  # same records, another order: another run
    before = snapshot(run)
    line = assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2],
                           f"cannot resume {run}: the training data changed (data.path ")
    assert "train.data_may_change=true" in line
    assert snapshot(run) == before
    assert cli(capsys, "train", cfg, "--resume", "--set", "train.allow_data_change=true")[0] == 0


def test_the_gsm_fingerprint_is_of_the_generated_problems():
    a = data_fingerprint(DataConfig(format="gsm", gsm_templates=6, gsm_eval_templates=2, gsm_variants=2))
    assert a == data_fingerprint(DataConfig(format="gsm", gsm_templates=6, gsm_eval_templates=2, gsm_variants=2))
    assert a != data_fingerprint(DataConfig(format="gsm", gsm_templates=6, gsm_eval_templates=2, gsm_variants=3))


# -- 6. only lisatune's own run directories are deleted; a checkpoint must be of this run -------------------------
@pytest.mark.parametrize("flags,message", [
    (["--overwrite"], "--overwrite: output_dir '{out}' is not a lisatune run directory (no .lisatune-run); "
                      "refusing to delete it"),
    ([], "output_dir '{out}' is not empty and is not a lisatune run directory; choose another output_dir"),
    (["--resume"], "--resume: output_dir '{out}' has no complete checkpoint to resume from"),
])
def test_a_directory_that_is_not_a_run_is_never_deleted(tmp_path, assets, capsys, flags, message):
    out = tmp_path / "home"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "thesis.tex").write_text("years of work")
    (out / "config.yaml").write_text("model: {}\n")  # even one that looks a bit like a run
    before = snapshot(out)
    cfg = write_config(tmp_path, assets, name="home")
    assert_one_line(*cli(capsys, "train", cfg, *flags)[::2], message.format(out=out))
    assert snapshot(out) == before


def test_a_run_directory_carries_the_marker_and_overwrite_replaces_it(tmp_path, assets, capsys):
    cfg, run = finished_run(tmp_path, assets)
    assert (run / MARKER).is_file()
    assert cli(capsys, "train", cfg, "--overwrite", "--set", "train.seed=1")[0] == 0


@pytest.mark.parametrize("override,message", [
    ("lisa.n_layers=9", "n_layers (γ) = 9 exceeds the 4 transformer blocks"),  # found once the model is loaded
    ("model.source=/nope", "model.source '/nope' does not exist"),
])
def test_a_run_that_fails_to_start_creates_and_deletes_nothing(tmp_path, assets, capsys, override, message):
    cfg = write_config(tmp_path, assets, name="new")
    assert_one_line(*cli(capsys, "train", cfg, "--set", override)[::2], message)
    assert not (tmp_path / "new").exists()  # no half-made run directory to --overwrite next time
    cfg, run = finished_run(tmp_path, assets)
    before = snapshot(run)
    assert_one_line(*cli(capsys, "train", cfg, "--overwrite", "--set", override)[::2], message)
    assert snapshot(run) == before  # --overwrite deletes the previous run only once the new one is set up


@pytest.mark.parametrize("edit,message", [
    ({"step": 999, "rename": "step-000999"}, "claims step 999, beyond this run's 4 steps"),
    ({"step": 3}, "trainer_state.json says step 3, its directory name says step 4"),
    ({"text": "{\"step\": 4, "}, "trainer_state.json is unreadable"),
    ({"text": "{\"step\": true}"}, "trainer_state.json has no integer 'step' >= 0"),
])
def test_a_checkpoint_that_is_not_of_this_run_is_refused(tmp_path, assets, capsys, edit, message):
    cfg, run = finished_run(tmp_path, assets)
    (run / "summary.json").unlink()
    ck = run / "checkpoints" / "step-000004"
    state_file = ck / "trainer_state.json"
    if "text" in edit:
        state_file.write_text(edit["text"])
    else:
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "step": edit["step"]}))
    if "rename" in edit:
        ck.rename(ck.parent / edit["rename"])
    before = snapshot(run)
    assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2], message)
    assert snapshot(run) == before


# -- 7. OS errors -------------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, assets, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--output-dir", f)[::2], f"output_dir '{f}' is a file, not a directory")
    assert_one_line(*cli(capsys, "train", cfg, "--output-dir", f / "sub" / "run")[::2],
                    f"output_dir '{f}/sub/run' lies under '{f}', which is a file, not a directory")
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_directory(tmp_path, assets, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        cfg = write_config(tmp_path, assets)
        assert_one_line(*cli(capsys, "train", cfg, "--output-dir", ro / "run")[::2], "Permission denied")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("target,message", [
    ("mkdir", "cannot create output_dir '{out}' (Permission denied)"),
    ("save_file", "cannot write checkpoint step-000004 in {out}/checkpoints (No space left on device); "
                  "the earlier checkpoints are intact"),
    ("metrics", "cannot write {out}/metrics.jsonl (No space left on device)"),
    ("save_model", "cannot save the final model to {out}/final (No space left on device); the final checkpoint "
                   "is intact: run again with --resume to save it"),
])
def test_no_permission_and_a_full_disk_are_one_line(tmp_path, assets, capsys, monkeypatch, target, message):
    out = tmp_path / "run"

    def fail(code):
        def raiser(*a, **k):
            raise OSError(code, os.strerror(code))
        return raiser

    if target == "mkdir":  # as root nothing is read-only: simulate the refusal
        real_mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: fail(errno.EACCES)() if self == out
                            else real_mkdir(self, *a, **k))
    elif target == "save_file":
        monkeypatch.setattr(ckpt_mod, "save_file", fail(errno.ENOSPC))
    elif target == "metrics":
        import lisatune.recipe.metrics as metrics
        real_write = metrics.Metrics.write

        def full_after_first(self, step, **values):  # the disk fills up during the run
            if step >= 2:
                self.file = type("Full", (), {"write": fail(errno.ENOSPC), "close": lambda s: None})()
            return real_write(self, step, **values)
        monkeypatch.setattr(metrics.Metrics, "write", full_after_first)
    else:  # where the loop looks it up
        monkeypatch.setattr(loop, "save_model", fail(errno.ENOSPC))
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg)[::2], message.format(out=out))
    if out.exists():
        ckpts = out / "checkpoints"
        names = [p.name for p in ckpts.iterdir()] if ckpts.exists() else []
        assert not [n for n in names if n.startswith(".tmp-")]  # no partial checkpoint left, none counted
        for n in names:
            load_checkpoint(ckpts / n, T.AutoModelForCausalLM.from_pretrained(assets / "model"))


# -- 8. loading errors ----------------------------------------------------------------------------------------------
def break_model(d: Path, how: str):
    if how == "truncated":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:4000])
    elif how == "shapes":
        c = json.loads((d / "config.json").read_text())
        c["intermediate_size"] *= 2
        (d / "config.json").write_text(json.dumps(c))
    elif how == "latin1-config":
        (d / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    elif how == "pickle":
        torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    elif how == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).unlink()
    elif how == "empty":
        shutil.rmtree(d)
        d.mkdir()
    elif how == "checkpoint":
        shutil.rmtree(d)
        save_checkpoint(d.parent / "ck", 1, tiny_model(n_layers=2))
        (d.parent / "ck" / "checkpoints" / "step-000001").rename(d)


@pytest.mark.parametrize("how,message", [
    ("truncated", "model.safetensors is corrupt or truncated (4000 bytes;"),
    ("shapes", "the weights do not match config.json (model.layers.0.mlp.down_proj.weight has shape (32, 64), "
               "config.json makes it (32, 128))"),
    ("latin1-config", "config.json is not UTF-8 text (byte 36)"),
    ("pickle", "holds pytorch_model.bin, a pickle (loading it can run code), and no .safetensors weights"),
    ("no-tokenizer", "has no tokenizer (none of tokenizer.json, tokenizer_config.json)"),
    ("empty", "is not a loadable model directory (it has no config.json: not a model directory)"),
    ("checkpoint", "(it has no config.json: not a model directory) (it is a lisatune training checkpoint"),
])
def test_a_bad_model_directory_is_one_line(tmp_path, assets, capsys, how, message):
    d = tmp_path / "m"
    shutil.copytree(assets / "model", d)
    break_model(d, how)
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, "eval", d, "--format", "alpaca", "--data", assets / "train.jsonl", "--max-length", "64")
    assert_one_line(rc, err, message)
    assert snapshot(tmp_path) == before
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--set", f"model.source={d}")[::2], message)


@pytest.mark.parametrize("content,message", [
    (b"0.5\n0.5\n\xff\n0.5\n", "probabilities file '{p}' is not UTF-8 text (byte 8)"),
    (b"0.5\x000.5\n", "probabilities file '{p}' is a binary file, not text"),
])
def test_a_bad_probabilities_file(tmp_path, assets, capsys, content, message):
    p = tmp_path / "p.txt"
    p.write_bytes(content)
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--set", "lisa.policy=bernoulli", "--set",
                         f"lisa.probabilities={p}")[::2], message.format(p=p))


# -- 9. vague messages made precise ------------------------------------------------------------------------------
@pytest.mark.parametrize("case,message", [
    ("config-dir", "config file '{tmp}' is a directory, not a file"),
    ("binary-config", "config file '{tmp}/bin.yaml' is a binary file, not text"),
    ("gamma-and-n_layers", "lisa.gamma is an alias of lisa.n_layers, which is given too with another value (3 and 2); "
                           "give one"),
    ("K-and-interval", "lisa.K is an alias of lisa.interval, which is given too with another value (5 and 3); give one"),
    ("both-data-change-names", "train: give data_may_change or its alias allow_data_change, not both"),
])
def test_vague_messages_are_precise(tmp_path, assets, capsys, case, message):
    cfg = write_config(tmp_path, assets)
    (tmp_path / "bin.yaml").write_bytes(b"train:\x00\x01")

    def with_lisa(name, **lisa):  # an alias beside its key in one file (an override replaces either)
        data = yaml.safe_load(cfg.read_text())
        data["lisa"].update(lisa)
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return tmp_path / name
    args = {"config-dir": ["train", tmp_path],
            "binary-config": ["train", tmp_path / "bin.yaml"],
            "gamma-and-n_layers": ["train", with_lisa("gamma.yaml", gamma=3)],
            "K-and-interval": ["train", with_lisa("k.yaml", K=5)],
            "both-data-change-names": ["train", cfg, "--set", "train.allow_data_change=true", "--set",
                                       "train.data_may_change=true"]}[case]
    assert_one_line(*cli(capsys, *args)[::2], message.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


# -- 10. housekeeping ------------------------------------------------------------------------------------------------
def dead_pid() -> int:
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_kill_during_the_final_save_leaves_nothing_behind_and_no_duplicate_rows(tmp_path, assets, capsys):
    cfg, run = finished_run(tmp_path, assets, eval_every=2)
    rows = (run / "metrics.jsonl").read_text()
    # As if killed while saving the final model: the last checkpoint and eval are written, final/ is not.
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    leftover = run / f".tmp-final-{dead_pid()}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert cli(capsys, "train", cfg, "--resume")[0] == 0
    assert not leftover.exists() and (run / "final" / "model.safetensors").is_file()
    assert (run / "metrics.jsonl").read_text() == rows  # the final eval row is not written twice


def test_a_moved_run_directory_resumes(tmp_path, assets, capsys):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    for leftover in ["final", "summary.json", "checkpoints/step-000004"]:
        shutil.rmtree(run / leftover) if (run / leftover).is_dir() else (run / leftover).unlink()
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    rc, _, err = cli(capsys, "train", cfg, "--resume", "--output-dir", moved)
    assert rc == 0, err
    assert json.loads((moved / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [echo hi]", "!!python/name:os.system",
                                   "!!str x", "[1, !!binary aGk=]", "!custom 3"])
def test_yaml_tags_are_refused(tmp_path, assets, capsys, value):
    cfg = write_config(tmp_path, assets)
    assert_one_line(*cli(capsys, "train", cfg, "--set", f"train.output_dir={value}")[::2],
                    "YAML tags (!!...) are not allowed; give a plain value")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(cfg.read_text() + f"distributed: {value}\n")
    assert_one_line(*cli(capsys, "train", tagged)[::2], "is not allowed (lisatune reads plain values only)")
    assert not (tmp_path / "run").exists()


# -- fuzz: random ways to break a valid config --------------------------------------------------------------------
NUMERIC = {
    "train": ["seed", "lr", "weight_decay", "eps", "batch_size", "grad_accum", "max_steps", "epochs", "warmup_steps",
              "max_grad_norm", "eval_every", "eval_batch_size", "gsm_eval_samples", "gsm_max_new_tokens",
              "save_every", "keep_last", "log_every"],
    "data": ["val_fraction", "val_max_examples", "max_length", "seed", "gsm_variants", "gsm_eval_templates",
             "gsm_eval_variants", "gsm_templates"],
    "lisa": ["n_layers", "interval", "seed"],
    "lora": ["r", "alpha", "dropout"],
    "galore": ["rank", "update_proj_gap", "scale"],
}
BAD_VALUES = ["abc", [1], {"a": 1}, float("nan"), float("inf"), -1, -0.5, True]


def mutations(n: int, seed: int = 18):
    rng = random.Random(seed)
    for i in range(n):
        section = rng.choice(sorted(NUMERIC))
        if i % 6 == 5:  # an unknown key, in a section or at the top
            yield (section if i % 12 == 5 else None), f"zz_{rng.randrange(1000)}", 1
        else:
            yield section, rng.choice(NUMERIC[section]), rng.choice(BAD_VALUES)


@pytest.mark.parametrize("section,key,value", list(mutations(30)))
def test_fuzz_a_broken_config_is_one_line_and_touches_nothing(tmp_path, assets, capsys, section, key, value):
    cfg = write_config(tmp_path, assets)
    data = yaml.safe_load(cfg.read_text())
    (data.setdefault(section, {}) if section else data)[key] = value
    cfg.write_text(yaml.safe_dump(data))
    rc, _, err = cli(capsys, "train", cfg)
    where = f"{section}.{key}" if section else key
    assert_one_line(rc, err, where)
    assert not (tmp_path / "run").exists()

"""checkpoint: exact resume (weights, optimizer, scheduler, RNG), keep-last-k, SIGKILL mid-write, corruption."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import batches, tiny_model
from lisatune import LisaAdamW, LisaError
from lisatune.recipe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

TESTS = Path(__file__).parent


def setup(arch="llama", seed=0):
    model = tiny_model(arch, n_layers=2, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


def train(model, opt, sched, data):
    for x in data:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def draws():
    return torch.rand(4), random.random(), np.random.rand(3), np.random.randn()  # randn: numpy's gauss cache


def assert_same(a, b):
    """Structural equality of nested state dicts, tensors compared bitwise."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: tied embedding/head stored once
def test_save_load_restores_everything_and_training_continues_bitwise(tmp_path, arch):
    model, opt, sched = setup(arch)
    data = batches(5, seed=3)
    train(model, opt, sched, data[:3])
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"data_position": 6, "loss": 1.5}, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step-000003"
    files = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert set(files) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
    assert files["trainer_state.json"] == max(files.values())  # written last
    expected = draws()
    train(model, opt, sched, data[3:])  # the reference run goes on from the checkpoint
    ref_opt, ref_sched = opt.state_dict(), sched.state_dict()

    fresh, fopt, fsched = setup(arch, seed=7)
    draws()
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fopt, fsched)
    assert state == {"data_position": 6, "loss": 1.5, "step": 3}
    for got, want in zip(draws(), expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert fsched.last_epoch == 3 and fopt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    if arch == "gpt2":
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
    train(fresh, fopt, fsched, data[3:])
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fopt.state_dict(), ref_opt)
    assert_same(fsched.state_dict(), ref_sched)


def test_keep_last_two_keeps_exactly_the_newest_two(tmp_path):
    model, opt, sched = setup()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000030", "step-000040"]
    assert latest_checkpoint(tmp_path).name == "step-000040"
    save_checkpoint(tmp_path, 40, model, opt, sched, {"again": True}, keep_last=2)  # same step: replaced
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000030", "step-000040"]
    assert json.loads((tmp_path / "checkpoints/step-000040/trainer_state.json").read_text())["again"] is True


def test_latest_checkpoint_ignores_temp_and_incomplete_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, opt, sched = setup()
    save_checkpoint(tmp_path, 5, model, opt, sched, {}, keep_last=None)
    (tmp_path / "checkpoints/step-000009").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / "checkpoints/.tmp-step-000010-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000005"


KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from helpers import tiny_model
from lisatune.recipe import checkpoint
run, marker = sys.argv[2], sys.argv[3]
model = tiny_model(n_layers=2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
checkpoint.save_checkpoint(run, 1, model, opt, sched, {"data_position": 1}, keep_last=3)
real_save = torch.save
def stalled_save(obj, f, *a, **kw):
    real_save(obj, f, *a, **kw)
    with open(f, "r+b") as fh:  # leave this file half written, then hang until killed
        fh.truncate(fh.seek(0, 2) // 2)
    open(marker, "w").close()
    time.sleep(600)
torch.save = stalled_save
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
checkpoint.save_checkpoint(run, 2, model, opt, sched, {"data_position": 2}, keep_last=3)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(TESTS), str(run), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before reaching the checkpoint write"
            assert time.monotonic() < deadline, "writer never reached the checkpoint write"
            time.sleep(0.1)
        tmp = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-step-000002-")]
        assert tmp, "step 2 was not being written into a .tmp- directory"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    latest = latest_checkpoint(run)
    assert latest.name == "step-000001"
    model, opt, sched = setup()
    assert load_checkpoint(latest, model, opt, sched) == {"data_position": 1, "step": 1}
    assert torch.equal(model.lm_head.weight, tiny_model(n_layers=2).lm_head.weight)  # step 1's weights

    save_checkpoint(run, 2, model, opt, sched, {}, keep_last=3)  # the next save cleans the leftover
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_truncated_or_missing_files_are_one_line_errors(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=None)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fresh, fopt, fsched = setup(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(LisaError, match=f"checkpoint '{path}': model.safetensors is corrupt") as e:
        load_checkpoint(path, fresh, fopt, fsched)
    assert "\n" not in str(e.value)
    assert_same(fresh.state_dict(), before)  # nothing was half-loaded

    path = save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep_last=None)
    (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(LisaError, match="optimizer.pt is corrupt"):
        load_checkpoint(path, fresh, fopt, fsched)
    (path / "optimizer.pt").unlink()
    (path / "rng.pt").unlink()
    with pytest.raises(LisaError, match=f"checkpoint '{path}' is incomplete: missing rng.pt, optimizer.pt"):
        load_checkpoint(path, fresh, fopt, fsched)
    with pytest.raises(LisaError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", fresh, fopt, fsched)


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=None)
    other = tiny_model("llama", n_layers=3)
    with pytest.raises(LisaError, match="does not fit this model"):
        load_checkpoint(path, other)


def test_bad_arguments():
    model, opt, sched = setup()
    with pytest.raises(LisaError, match="not JSON-serializable"):
        save_checkpoint("unused", 1, model, opt, sched, {"t": torch.ones(1)}, keep_last=1)
    with pytest.raises(LisaError, match="keep_last"):
        save_checkpoint("unused", 1, model, opt, sched, {}, keep_last=0)


def test_lisa_adamw_state_round_trips_with_weights_only(tmp_path):
    def make(seed):
        model = tiny_model(n_layers=4, seed=seed)
        opt = LisaAdamW(model, n_layers=2, interval=5, lr=1e-3, state_policy="keep")
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)

    model, opt, sched = make(0)
    data = batches(10, seed=5)
    train(model, opt, sched, data[:7])  # past a switch: history and parked (kept) states exist
    sd = opt.state_dict()
    assert sd["lisa"]["parked"] and len(sd["lisa"]["history"]) == 2
    path = save_checkpoint(tmp_path, 7, model, opt, sched, {}, keep_last=1)

    fresh, fopt, fsched = make(1)
    load_checkpoint(path, fresh, fopt, fsched)
    assert_same(fopt.state_dict(), sd)
    assert fopt.active_layers == opt.active_layers
    train(model, opt, sched, data[7:])
    train(fresh, fopt, fsched, data[7:])
    assert_same(fresh.state_dict(), model.state_dict())

"""Issue #29: the last holes. Each root cause: exit 2, one line naming the file or field, no traceback, and
nothing changed on disk (or, for a failed write, the last good state kept and nothing half-written)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from test_errors import assert_one_line, cli, snapshot, write_config
from conftest import make_run_assets
from lisatune.recipe import loop
from lisatune.recipe.checkpoint import load_checkpoint, verify
from lisatune.recipe.config import load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def finished_run(tmp_path, assets, name="run", **train):
    cfg = write_config(tmp_path, assets, name=name, **train)
    loop.train(load_config(str(cfg), []))
    return cfg, tmp_path / name


def as_if_killed_before(run: Path, step: int) -> None:
    """Remove what a run wrote after its checkpoint `step`: the later checkpoints, final/ and summary.json."""
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    for d in (run / "checkpoints").iterdir():
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)


# -- 1. any exception while a checkpoint is written is a failed write -------------------------------------------
def test_a_full_disk_inside_torch_save_keeps_the_last_good_checkpoint(tmp_path, assets, capsys, monkeypatch):
    cfg, run = finished_run(tmp_path, assets, save_every=2, keep_last=5)
    as_if_killed_before(run, 2)
    ckpts = run / "checkpoints"
    before = snapshot(ckpts)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):  # half a file on disk, then torch's own error for a full disk
        if Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4310")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    line = assert_one_line(*cli(capsys, "train", cfg, "--resume")[::2],
                           f"cannot write checkpoint step-000004 in {ckpts} (")
    assert "unexpected pos" in line and "the earlier checkpoints are intact" in line
    assert snapshot(ckpts) == before  # no step-000004, no .tmp-* directory, step-000002 byte for byte
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]
    assert not [p for p in run.rglob(".tmp-*")]
    good = ckpts / "step-000002"
    verify(good, json.loads((good / "trainer_state.json").read_text())["sha256"],
           ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"])
    load_checkpoint(good, T.AutoModelForCausalLM.from_pretrained(assets / "model"))
    monkeypatch.setattr(torch, "save", real_save)  # the disk has room again: the run finishes from step 2
    rc, _, err = cli(capsys, "train", cfg, "--resume")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

"""#28: every config under examples/ runs: one training step of each on a tiny model, from the repository root
(the examples' data paths are relative to it), in one process (a distributed example runs with distributed none)."""
import json
from pathlib import Path

import pytest
import yaml

from helpers import make_run_assets
from lisatune.recipe.config import load_config
from lisatune.recipe.loop import train

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def test_the_examples_are_there():
    names = {p.name for p in EXAMPLES}
    expected = {"lisa_alpaca.yaml", "lisa_sharegpt.yaml", "lisa_text_cpt.yaml", "lisa_packing.yaml", "lisa_ddp.yaml",
                "lisa_8b_24gb.yaml", "lisa_70b_nf4.yaml", "lora_gsm.yaml", "qlora_alpaca.yaml"}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_runs_a_step_on_a_tiny_model(tmp_path, assets, monkeypatch, example):
    monkeypatch.chdir(ROOT)
    cfg = yaml.safe_load(example.read_text())
    data = cfg.get("data", {})
    path = data.get("path")
    assert path is None or (ROOT / path).exists(), f"{example.name}: data.path {path} is not in the repository"
    overrides = [f"model.source={assets / 'model'}", "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}",
                 "distributed=none", "train.tensorboard=false"]
    if data.get("format") == "gsm":  # generation on a random tiny model only costs time
        overrides.append("train.gsm_eval_samples=0")
    s = train(load_config(str(example), overrides))
    assert s["steps"] == 1
    rows = [json.loads(r) for r in Path(s["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert (Path(s["final_model"]) / "config.json").is_file()


def test_every_example_file_is_run_by_this_test():
    # A new example is covered by the parametrized test above; a file the glob misses (another suffix) is not.
    stray = [p.name for p in (ROOT / "examples").iterdir() if p.is_file() and p.suffix != ".yaml"]
    assert not stray, f"examples/ holds files this test does not run: {stray}"

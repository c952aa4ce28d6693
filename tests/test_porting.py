"""Issue 28, a practitioner's first day: a model by Hub id, the blocks' lr in the logs, configs that port from
HF TrainingArguments / axolotl / LMFlow, checkpoints that load as models, the embedded default's measures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
import transformers as T
import yaml

from conftest import SUBPROCESS_ENV, make_run_assets
from lisatune.errors import LisaError
from lisatune.recipe.models import ModelConfig, load_model

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def hub_cache(root: Path, assets: Path, repo: str = "org/tiny") -> Path:
    """A Hugging Face Hub cache as huggingface_hub lays it out: blobs, snapshots/<commit>/ of links to them,
    refs/main -> commit; tag v1 is a second commit whose weights differ (seed 1)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    other = root / "v1-model"
    model = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.save_pretrained(other)
    T.AutoTokenizer.from_pretrained(assets / "model").save_pretrained(other)
    for commit, ref, src in ((COMMIT_MAIN, "main", assets / "model"), (COMMIT_V1, "v1", other)):
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True)
        (repo_dir / "blobs").mkdir(exist_ok=True)
        for f in src.iterdir():
            blob = repo_dir / "blobs" / f"{commit[:8]}-{f.name}"
            blob.write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return root


@pytest.fixture
def offline_cache(tmp_path, assets, monkeypatch):
    cache = hub_cache(tmp_path / "hub", assets)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import; the CLI test sets the variable
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def first_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


# -- 1. model.source: a Hub id -------------------------------------------------------------------------------
def test_a_hub_id_loads_offline_from_the_hf_cache_at_its_revision(offline_cache, assets):
    local, _ = load_model(ModelConfig(source=str(assets / "model")))
    main, tok = load_model(ModelConfig(source="org/tiny"))
    assert torch.equal(first_weight(main), first_weight(local))
    assert tok("The answer")["input_ids"]
    for rev in ("v1", COMMIT_V1):  # a tag (refs/v1) and a commit (snapshots/<commit>)
        v1, _ = load_model(ModelConfig(source="org/tiny", revision=rev))
        assert torch.equal(first_weight(v1), first_weight(local) + 1.0)


def test_a_hub_id_neither_cached_nor_reachable_offline_is_one_line(offline_cache):
    with pytest.raises(LisaError) as e:
        load_model(ModelConfig(source="org/absent"))
    assert str(e.value) == ("model.source 'org/absent' is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
                            "forbids downloading it (download it once online, or give a local directory)")
    with pytest.raises(LisaError, match=r"^model.source 'org/tiny' at revision 'v2' is not in the Hugging Face "):
        load_model(ModelConfig(source="org/tiny", revision="v2"))


def test_a_revision_with_a_local_model_is_refused(assets):
    with pytest.raises(LisaError) as e:
        load_model(ModelConfig(source=str(assets / "model"), revision="main"))
    assert str(e.value) == (f"model.revision has no effect with model.source '{assets / 'model'}', a local "
                            "directory; leave it out")


def test_lisatune_train_runs_a_hub_id_offline_from_hf_home(tmp_path, assets):
    hub_cache(tmp_path / "hf" / "hub", assets)  # HF_HOME/hub: huggingface_hub's default cache
    cfg = {"model": {"source": "org/tiny"},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "max_length": 64},
           "train": {"output_dir": str(tmp_path / "run"), "lr": 1e-3, "max_steps": 2, "tensorboard": False,
                     "eval_before": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**SUBPROCESS_ENV, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "lisatune.cli", "train", str(tmp_path / "run.yaml")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lisa fine-tuning of org/tiny: 2 steps" in r.stdout
    final = T.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    start = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    assert first_weight(final).shape == first_weight(start).shape
    assert not torch.equal(first_weight(final), first_weight(start))  # trained from the cached snapshot

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

from helpers import SUBPROCESS_ENV, make_run_assets
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


# -- 2. the logged lr is the blocks' lr ----------------------------------------------------------------------
def write_config(tmp_path, assets, name="run", method="lisa", **train):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25, "max_length": 64},
           "method": method, "lisa": {"n_layers": 2, "interval": 3},
           "train": {"output_dir": str(tmp_path / name), "lr": 1e-2, "batch_size": 4, "max_steps": 6,
                     "gsm_eval_samples": 0, **({"report_to": []} | train)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_rows(summary) -> list[dict]:
    return [r for r in map(json.loads, Path(summary["metrics"]).read_text().splitlines()) if "loss" in r]


def test_the_logged_lr_is_train_lr_after_the_schedule_and_the_embed_head_lr_its_own_field(tmp_path, assets,
                                                                                           monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import lisatune.recipe.loop as loop
    from lisatune.recipe.config import load_config
    postfixes, real_bar = [], loop.bar

    def recording_bar(*a, **kw):
        b = real_bar(*a, **kw)
        set_postfix = b.set_postfix
        b.set_postfix = lambda **f: (postfixes.append(f), set_postfix(**f))
        return b

    monkeypatch.setattr(loop, "bar", recording_bar)
    s = loop.train(load_config(str(write_config(tmp_path, assets, schedule="constant", report_to=["tensorboard"])),
                               []))
    rows = train_rows(s)
    assert [(r["lr"], r["lr_embed_head"]) for r in rows] == [(1e-2, pytest.approx(1e-3))] * 6  # embed_head_lr 0.1
    assert postfixes[0]["lr"] == "1.00e-02" and postfixes[0]["lr_eh"] == "1.00e-03"
    tb = EventAccumulator(str(tmp_path / "run" / "tb"))
    tb.Reload()
    assert [round(e.value, 6) for e in tb.Scalars("lr_embed_head")] == [1e-3] * 6
    assert [round(e.value, 6) for e in tb.Scalars("lr")] == [1e-2] * 6

    cosine = train_rows(loop.train(load_config(str(write_config(tmp_path, assets, "cos", warmup_steps=2)), [])))
    lrs = [r["lr"] for r in cosine]
    assert lrs[0] == pytest.approx(1e-2 * 2 / 3) and lrs[1] == pytest.approx(1e-2)  # warmup to train.lr itself
    assert lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < 1e-3
    assert [r["lr_embed_head"] for r in cosine] == pytest.approx([0.1 * x for x in lrs])


@pytest.mark.parametrize("method,options", [("full", []), ("lisa", ["--set", "lisa.embed_head_lr=null"])])
def test_without_a_scaled_group_there_is_only_lr(tmp_path, assets, method, options):
    from lisatune.recipe.config import load_config
    from lisatune.recipe.loop import train
    rows = train_rows(train(load_config(str(write_config(tmp_path, assets, method=method, max_steps=2,
                                                         schedule="constant")), options[1::2])))
    assert [r["lr"] for r in rows] == [1e-2, 1e-2] and not any("lr_embed_head" in r for r in rows)

"""Issue 28, a practitioner's first day: a model by Hub id, the blocks' lr in the logs, configs that port from
HF TrainingArguments / axolotl / LMFlow, checkpoints that load as models, the embedded default's measures."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
import transformers as T
import yaml

from helpers import SUBPROCESS_ENV, make_run_assets, tiny_tokenizer
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


# -- 3. configs that port ------------------------------------------------------------------------------------
def config_from(tmp_path, text: str):
    from lisatune.recipe.config import load_config
    path = tmp_path / "ported.yaml"
    path.write_text(text)
    return load_config(str(path))


def test_a_flat_config_with_hf_and_axolotl_names_runs_as_ours(tmp_path, assets):
    cfg = config_from(tmp_path, f"""
base_model: {assets / 'model'}
learning_rate: 2.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 3
num_train_epochs: 2
max_steps: -1            # TrainingArguments: epochs decide
warmup_ratio: 0.1
lr_scheduler_type: constant_with_warmup
weight_decay: 0.01
max_grad_norm: 0.5
lisa_n_layers: 3         # axolotl
lisa_step_interval: 7
lisa_layers_attribute: model.layers
data: {{path: {assets / 'train.jsonl'}}}
""")
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.epochs, t.max_steps, t.warmup_ratio, t.schedule, t.weight_decay,
            t.max_grad_norm) == (2e-4, 2, 3, 2.0, None, 0.1, "constant", 0.01, 0.5)
    assert (cfg.lisa.n_layers, cfg.lisa.interval, cfg.lisa.blocks_path) == (3, 7, "model.layers")
    assert cfg.model.source == str(assets / "model") and cfg.data.format == "alpaca"


def test_lmflow_names_in_their_sections_and_an_alias_beside_its_key():
    from lisatune.recipe.config import validate_config
    cfg = validate_config({"lisa": {"lisa_activated_layers": 4, "lisa_interval_steps": 9, "n_layers": 4},
                           "train": {"learning_rate": 3e-4, "lr": 3e-4}}, "x.yaml")  # the same value twice: one
    assert (cfg.lisa.n_layers, cfg.lisa.interval, cfg.train.lr) == (4, 9, 3e-4)
    with pytest.raises(LisaError) as e:
        validate_config({"train": {"learning_rate": 3e-4, "lr": 1e-4}}, "x.yaml")
    assert str(e.value) == ("x.yaml: train.learning_rate is an alias of train.lr, which is given too with another "
                            "value (0.0003 and 0.0001); give one")
    with pytest.raises(LisaError, match=r"^x.yaml: lisa.gamma is an alias of lisa.n_layers, .* \(3 and 2\); give one$"):
        validate_config({"lisa": {"gamma": 3, "n_layers": 2}}, "x.yaml")


def test_ms_swift_names_and_its_lisa_as_train_type_full():
    from lisatune.recipe.config import validate_config
    swift = {"train_type": "full", "lisa_activated_layers": 2, "lisa_step_interval": 10, "learning_rate": 1e-5,
             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "model_id_or_path": "m"}
    cfg = validate_config(swift, "x.yaml")
    assert (cfg.method, cfg.lisa.n_layers, cfg.lisa.interval, cfg.train.lr, cfg.train.batch_size,
            cfg.train.grad_accum, cfg.model.source) == ("lisa", 2, 10, 1e-5, 2, 4, "m")
    assert validate_config({**swift, "lisa_activated_layers": 0}, "x.yaml").method == "full"  # its "LISA off"
    assert validate_config({"train_type": "full"}, "x.yaml").method == "full"
    lora = validate_config({"sft_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout_p": 0.05}, "x.yaml")
    assert (lora.method, lora.lora.r, lora.lora.alpha, lora.lora.dropout) == ("lora", 16, 32, 0.05)
    for bad, message in [
        ({"train_type": "vera"}, "x.yaml: train_type 'vera' is not one of lisatune's methods (full, lora, galore, lisa)"),
        ({"train_type": "full", "sft_type": "full"}, "x.yaml: give train_type or its older name sft_type, not both"),
        ({"train_type": "lora", "method": "lisa"}, "x.yaml: train_type is ms-swift's name of method, which is given "
                                                   "too with another value ('lora' and 'lisa'); give one"),
    ]:
        with pytest.raises(LisaError) as e:
            validate_config(bad, "x.yaml")
        assert str(e.value) == message


def test_every_unknown_key_is_reported_at_once_with_the_closest_valid_one():
    from lisatune.recipe.config import validate_config
    with pytest.raises(LisaError) as e:
        validate_config({"lr": 1e-4, "train": {"batch_sise": 2, "zzz": 1}, "data": {"fromat": "alpaca"}}, "x.yaml")
    assert str(e.value) == ("x.yaml: unknown options 'data.fromat' (did you mean 'data.format'?), 'train.batch_sise' "
                            "(did you mean 'train.batch_size'?), 'train.zzz' (no close key), 'lr' (did you mean "
                            "'train.lr'?)")
    with pytest.raises(LisaError, match=r"^x.yaml: unknown option 'train.lrr' \(did you mean 'lr'\? valid: batch_"):
        validate_config({"train": {"lrr": 1}}, "x.yaml")
    with pytest.raises(LisaError) as e:  # a misspelt alias points to the key it stands for
        validate_config({"lora_rr": 8, "train": {"lerning_rate": 1e-4}}, "x.yaml")
    assert str(e.value) == ("x.yaml: unknown options 'train.lerning_rate' (did you mean 'train.lr'?), 'lora_rr' "
                            "(did you mean 'lora.r'?)")
    assert validate_config({"lora_r": 8, "method": "lora"}, "x.yaml").lora.r == 8  # axolotl's LoRA names too


def test_warmup_ratio_and_min_lr_ratio_shape_the_schedule(tmp_path, assets):
    from lisatune.recipe.config import load_config
    from lisatune.recipe.loop import train
    rows = train_rows(train(load_config(str(write_config(tmp_path, assets, max_steps=10, warmup_ratio=0.15,
                                                         min_lr_ratio=0.1)), [])))
    lrs = [r["lr"] for r in rows]  # ceil(0.15 × 10) = 2 warmup steps, then cosine down to 0.1 × lr
    assert lrs[:3] == pytest.approx([1e-2 * 2 / 3, 1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))])
    assert lrs[-1] == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-3)
    assert [r["lr_embed_head"] for r in rows] == pytest.approx([0.1 * x for x in lrs])


@pytest.mark.parametrize("train_opts,message", [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "train: warmup_steps: give it or warmup_ratio, not both"),
    ({"min_lr_ratio": 0.1, "schedule": "constant"}, "train.min_lr_ratio has no effect with train.schedule constant"),
    ({"min_lr_ratio": 1.5}, "train.min_lr_ratio: Input should be less than or equal to 1"),
])
def test_bad_schedule_options_are_one_line(train_opts, message):
    from lisatune.recipe.config import validate_config
    with pytest.raises(LisaError) as e:
        validate_config({"train": train_opts}, "x.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,content,fmt", [
    ("a.jsonl", [{"instruction": "Add 1 and 2.", "input": "", "output": "3"}], "alpaca"),
    ("c.json", [{"messages": [{"role": "user", "content": "hi"}], "text": "x"}], "chat"),
    ("s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}], "sharegpt"),
    ("t.jsonl", [{"text": "a document"}], "text"),
    ("p.txt", "one paragraph\n\nanother", "text"),
    ("a.csv", "instruction,output\nAdd 1 and 2.,3\n", "alpaca"),
])
def test_data_format_is_inferred_from_the_first_record_and_logged(tmp_path, caplog, name, content, fmt):
    from lisatune.recipe.config import validate_config
    f = tmp_path / name
    if isinstance(content, str):
        f.write_text(content)
    elif name.endswith(".json"):
        f.write_text(json.dumps(content))
    else:
        f.write_text("".join(json.dumps(r) + "\n" for r in content))
    with caplog.at_level("INFO", logger="lisatune"):
        assert validate_config({"data": {"path": str(f)}}, "x.yaml").data.format == fmt
    assert f"data.format: {fmt}, inferred from " in caplog.text and str(f) in caplog.text


def test_an_uninferable_format_is_one_line_and_the_default_stays_gsm(tmp_path):
    from lisatune.recipe.config import DEFAULT, validate_config
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "1+2?", "answer": "3"}) + "\n")
    with pytest.raises(LisaError) as e:
        validate_config({"data": {"path": str(f)}}, "x.yaml")
    assert str(e.value) == (f"data.format: not set, and the first record ({f}:1) has fields question, answer, which "
                            "match no format (sharegpt: conversations, chat: messages, alpaca: instruction, text: "
                            "text); set data.format (and data.columns to map fields)")
    assert validate_config({"data": {"path": str(f), "columns": {"instruction": "question", "output": "answer"}}},
                           "x.yaml").data.format == "alpaca"
    assert validate_config({}, "x").data.format == "gsm" and validate_config(DEFAULT, "x").data.format == "gsm"


# -- 4. checkpoints that load as models; keep_best -----------------------------------------------------------
def test_a_mid_run_checkpoint_loads_with_from_pretrained_and_its_manifest_covers_the_model_files(tmp_path, assets):
    from lisatune.recipe.checkpoint import MANIFEST, checkpoint_dirs, sha256_file
    from lisatune.recipe.config import load_config
    from lisatune.recipe.loop import train
    s = train(load_config(str(write_config(tmp_path, assets, max_steps=4, save_every=2, keep_last=3)), []))
    (step2, mid), (step4, end) = checkpoint_dirs(tmp_path / "run")
    assert (step2, step4) == (2, 4)
    state = json.loads((mid / "trainer_state.json").read_text())
    files = {p.name for p in mid.iterdir()} - {"trainer_state.json"}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= files == set(state[MANIFEST])
    assert all(state[MANIFEST][f] == sha256_file(mid / f) for f in files)
    model = T.AutoModelForCausalLM.from_pretrained(mid)
    tok = T.AutoTokenizer.from_pretrained(mid)
    ids = tok("Add 1 and 2.", return_tensors="pt")["input_ids"]
    final = T.AutoModelForCausalLM.from_pretrained(s["final_model"])
    at_end = T.AutoModelForCausalLM.from_pretrained(end)
    with torch.no_grad():
        assert torch.equal(at_end(ids).logits, final(ids).logits)  # the last checkpoint is the final model
        assert not torch.equal(model(ids).logits, final(ids).logits)  # step 2's own weights
    # the recipe still resumes from it (the manifest verifies what it reads), bitwise as before
    first = {k: v.clone() for k, v in final.state_dict().items()}
    shutil.rmtree(end)
    shutil.rmtree(s["final_model"])
    (tmp_path / "run" / "summary.json").unlink()
    again = train(load_config(str(write_config(tmp_path, assets, max_steps=4, save_every=2, keep_last=3, resume=True)),
                              []))
    resumed = T.AutoModelForCausalLM.from_pretrained(again["final_model"]).state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in first.items())


def test_keep_best_keeps_the_model_of_the_lowest_eval_loss(tmp_path, assets, monkeypatch):
    import lisatune.recipe.loop as loop
    from lisatune.recipe.config import load_config
    losses = iter([3.0, 2.0, 2.5, 2.7])  # before, steps 2, 4, 6: the best is step 2's
    real = loop.eval_loss
    monkeypatch.setattr(loop, "eval_loss", lambda *a, **k: {**real(*a, **k), "eval_loss": next(losses)})
    saved = {}
    real_keep = loop.keep_best

    def spy(run, at, loss):
        real_keep(run, at, loss)
        saved[at] = {k: v.clone() for k, v in run.model.state_dict().items()}

    monkeypatch.setattr(loop, "keep_best", spy)
    s = loop.train(load_config(str(write_config(tmp_path, assets, max_steps=6, eval_every=2, keep_best="eval_loss")),
                               []))
    assert list(saved) == [2] and s["best"] == {"step": 2, "eval_loss": 2.0, "model": str(tmp_path / "run" / "best")}
    best = T.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best")
    assert all(torch.equal(best.state_dict()[k], v) for k, v in saved[2].items() if k in best.state_dict())
    assert T.AutoTokenizer.from_pretrained(tmp_path / "run" / "best") is not None


@pytest.mark.parametrize("changes,message", [
    ({"data": {"format": "alpaca", "path": "{train}"}}, "train.keep_best: eval_loss needs a validation set"),
    ({"method": "lora"}, "train.keep_best is for methods that train the model's own weights"),
    ({"train": {"eval_every": 0}}, "train.keep_best has no effect without train.eval_every"),
])
def test_keep_best_without_what_it_needs_is_one_line(assets, changes, message):
    from lisatune.recipe.config import validate_config
    data = {"data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25},
            "train": {"keep_best": "eval_loss", "eval_every": 2}}
    for section, values in changes.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **{k: v.format(train=assets / "train.jsonl")
                                                         if isinstance(v, str) else v for k, v in values.items()}}
            if section == "data":
                data["data"].pop("val_fraction")
        else:
            data[section] = values
    with pytest.raises(LisaError) as e:
        validate_config(data, "x.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


# -- 5. the embedded default -----------------------------------------------------------------------------------
def test_the_gsm_evaluation_reports_the_answer_format_rate_beside_exact_match(assets, monkeypatch):
    from lisatune.recipe.evaluate import gsm_accuracy
    from lisatune.recipe.run_dir import describe_eval
    model = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    tok = T.AutoTokenizer.from_pretrained(assets / "model")
    tok.padding_side = "left"
    replies = iter(["The answer is 5.\n#### 5", "#### 7", "about five"])  # right, formatted but wrong, unformatted

    def generate(input_ids, **kw):
        rows = [torch.cat([r, torch.tensor(tok(next(replies), add_special_tokens=False)["input_ids"])]) for r in input_ids]
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((width - len(r),), tok.pad_token_id)]) for r in rows])

    monkeypatch.setattr(model, "generate", generate)
    items = [{"question": f"What is {a} plus {b}?", "number": "5"} for a, b in ((2, 3), (1, 4), (0, 5))]
    res = gsm_accuracy(model, tok, items, batch_size=3)
    assert (res["gsm_correct"], res["gsm_formatted"], res["gsm_total"]) == (1, 2, 3)
    assert res["gsm_answer_format"] == pytest.approx(2 / 3)
    assert describe_eval(res) == "GSM exact match 1/3, answers in the '#### N' format 2/3"


def test_the_embedded_default_trains_lisa_at_an_lr_the_studies_support():
    from lisatune.recipe.config import load_config
    cfg = load_config(None)
    assert cfg.method == "lisa" and 1e-4 <= cfg.train.lr <= 3e-4  # docs/results.md: studies 1 and 4
    assert cfg.data.format == "gsm" and cfg.train.gsm_eval_samples > 0 and cfg.train.max_steps == 40


# -- 6. save_to_disk directories and Hub dataset names train and resume ----------------------------------------
def test_a_save_to_disk_directory_trains_resumes_and_refuses_changed_data(tmp_path, assets):
    import datasets
    from helpers import RECORDS
    from lisatune.recipe.config import load_config
    from lisatune.recipe.loop import train
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(saved))

    def config(**kw):
        path = write_config(tmp_path, assets, max_steps=4, save_every=2, keep_last=3, **kw)
        data = yaml.safe_load(path.read_text())
        data["data"] = {"path": str(saved), "split": "train", "val_fraction": 0.25, "max_length": 64}  # inferred
        path.write_text(yaml.safe_dump(data))
        return load_config(str(path))

    s = train(config())
    assert s["steps"] == 4
    first = T.AutoModelForCausalLM.from_pretrained(s["final_model"]).state_dict()
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    again = train(config(resume=True))  # from step 2, over the same directory
    resumed = T.AutoModelForCausalLM.from_pretrained(again["final_model"]).state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in first.items())

    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "summary.json").unlink()
    changed = [dict(r, output=r["output"] + "!") if i == 0 else r for i, r in enumerate(RECORDS)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(changed)}).save_to_disk(str(saved))
    with pytest.raises(LisaError, match=r"^cannot resume .*: the training data changed \(data.path "):
        train(config(resume=True))


def test_a_hub_dataset_is_fingerprinted_by_the_datasets_library(monkeypatch):
    import datasets
    import lisatune.data.sources as sources
    from lisatune.data import DataConfig, data_fingerprint
    versions = {"v": [{"text": "a"}]}
    monkeypatch.setattr(sources, "load_dataset", lambda name, split: datasets.Dataset.from_list(versions["v"]))
    cfg = DataConfig(format="text", path="org/corpus")
    before = data_fingerprint(cfg)
    assert data_fingerprint(cfg) == before
    versions["v"] = [{"text": "b"}]
    assert data_fingerprint(cfg) != before
    assert data_fingerprint(DataConfig(format="text", path="org/corpus", split="test")) != data_fingerprint(cfg)


def test_a_split_slice_on_a_single_file_selects_its_records(assets):
    """A single file is one split, train; a slice of it (datasets' syntax) selects records, another split name is
    one line naming the option."""
    from lisatune.data.splits import load_splits
    from lisatune.recipe.config import validate_config
    cfg = validate_config({"data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "split": "train[:8]"}},
                          "x")
    train, _ = load_splits(cfg.data, tiny_tokenizer(chat=False))
    assert len(train) == 8
    cfg = validate_config({"data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "split": "test"}}, "x")
    with pytest.raises(LisaError) as e:
        load_splits(cfg.data, tiny_tokenizer(chat=False))
    assert str(e.value).startswith("data.split 'test'") and "\n" not in str(e.value)


def test_lisatune_train_prints_where_the_best_model_is(tmp_path, assets, capsys, cli_main):
    cfg = write_config(tmp_path, assets, max_steps=4, eval_every=2, keep_best="eval_loss")
    assert cli_main(["train", str(cfg)]) == 0
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best"]
    out = capsys.readouterr().out
    assert f"  best model (eval loss {best['eval_loss']:.4f} at step {best['step']}): {tmp_path / 'run' / 'best'}" in out
    assert best["step"] in (2, 4) and T.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best") is not None


def test_a_resumed_run_first_states_the_restored_step_and_active_set(tmp_path, assets, caplog):
    """#28: after a resume the first LISA line is the restored position (step and active blocks of the
    checkpoint), not the active set an optimizer draws at construction."""
    import logging

    from test_errors import write_config
    from test_errors_29 import as_if_killed_before

    from lisatune.recipe import loop
    from lisatune.recipe.config import load_config
    cfg = write_config(tmp_path, assets, save_every=2, keep_last=5, max_steps=4)
    loop.train(load_config(str(cfg), []))
    as_if_killed_before(tmp_path / "run", 2)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    active = ",".join(str(u) for u in state["lisa"]["active"])  # block units: the unit index is the block's
    caplog.set_level(logging.INFO, logger="lisatune")
    caplog.clear()  # (the first run's lines, when another test left the logger at INFO)
    loop.train(load_config(str(cfg), ["train.resume=true"]))
    lisa = [r.getMessage() for r in caplog.records if "LISA switch" in r.getMessage() or "resumed from" in r.getMessage()]
    assert lisa[0].endswith(f"at step 2 of 4, active blocks {active}"), lisa
    assert not any("switch 0 at step 0" in m for m in lisa), lisa


def test_an_override_replaces_a_ported_config_s_value_by_either_name(tmp_path):
    """A config in another tool's names (learning_rate, output_dir, lisa_interval_steps) takes --set by lisatune's
    names, by the alias, and --output-dir: the override wins, as it does on a config in lisatune's names."""
    from lisatune.recipe.config import load_config
    path = tmp_path / "hf.yaml"
    path.write_text("learning_rate: 3.0e-4\noutput_dir: runs/a\nlisa:\n  lisa_interval_steps: 7\n")
    cfg = load_config(str(path), ["train.lr=1e-4", "lisa.interval=5", "train.output_dir=runs/b"])
    assert (cfg.train.lr, cfg.lisa.interval, cfg.train.output_dir) == (1e-4, 5, "runs/b")
    cfg = load_config(str(path), ["learning_rate=2e-4", "lisa.lisa_interval_steps=3"])
    assert (cfg.train.lr, cfg.lisa.interval) == (2e-4, 3)
    assert load_config(str(path), []).train.lr == 3e-4
    # one file giving a value twice, written two ways, is one setting; two values stay one line
    path.write_text("train:\n  lr: 1.0e-4\n  learning_rate: 1e-4\n")
    assert load_config(str(path), []).train.lr == 1e-4
    path.write_text("train:\n  lr: 1.0e-4\n  learning_rate: 2e-4\n")
    with pytest.raises(LisaError, match=r"train.learning_rate is an alias of train.lr, which is given too"):
        load_config(str(path), [])

"""data.datasets: several sources in one run, each read as a single data.path is, with per-source max_samples;
the resume fingerprint covers every source; a bad entry is one line naming data.datasets[i].<field>."""
import shutil

import pytest
import torch
import transformers as T
import yaml

from lisatune.data import DataConfig, data_fingerprint, load_splits
from lisatune.errors import LisaError
from lisatune.recipe.config import infer_formats

from helpers import RECORDS, make_run_assets, tiny_tokenizer, trained_runs, write_jsonl

ALPACA = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(5)]
CHAT = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue")]



def build(**data) -> DataConfig:
    infer_formats(data)  # as the run config does for entries without a format
    return DataConfig.build(**data)

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat=True)


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), write_jsonl(tmp_path / "chat.jsonl", CHAT)


def test_two_files_of_different_formats_make_one_training_set_in_order(files, tok):
    alpaca, chat = files
    cfg = build(datasets=[{"path": alpaca}, {"path": chat}], max_length=64)  # formats inferred
    assert [e.format for e in cfg.datasets] == ["alpaca", "chat"] and cfg.format == "alpaca"
    train, val = load_splits(cfg, tok)
    assert len(train) == len(ALPACA) + len(CHAT) and val == []
    assert trained_runs(tok, train[0])[0].startswith("1")  # the alpaca answer of "Add 0 and 1."
    assert [trained_runs(tok, e)[0].split("<")[0] for e in train[len(ALPACA):]] == ["red", "green", "blue"]
    explicit = build(datasets=[{"path": alpaca, "format": "alpaca"}, {"path": chat, "format": "chat"}],
                                max_length=64)
    assert [e["input_ids"] for e in load_splits(explicit, tok)[0]] == [e["input_ids"] for e in train]
    held = build(datasets=[{"path": alpaca}, {"path": chat}], max_length=64, val_fraction=0.25)
    train, val = load_splits(held, tok)
    assert (len(train), len(val)) == (6, 2)  # held out of the datasets together


def test_max_samples_cuts_each_source_to_its_first_records(files, tok):
    alpaca, chat = files
    cfg = build(datasets=[{"path": alpaca, "max_samples": 2}, {"path": chat, "max_samples": 1}],
                           max_length=64)
    train, _ = load_splits(cfg, tok)
    assert len(train) == 3
    assert [trained_runs(tok, e)[0].split("<")[0] for e in train] == ["1", "2", "red"]
    both = build(datasets=[{"path": alpaca}, {"path": chat, "max_samples": 3}], max_samples=2,
                            max_length=64)  # data.max_samples is each entry's default
    assert [e.max_samples for e in both.datasets] == [2, 3] and len(load_splits(both, tok)[0]) == 5
    one = DataConfig.build(format="alpaca", path=alpaca, max_samples=4, split="train[1:]", max_length=64)
    train, _ = load_splits(one, tok)  # after the split's slice: records 1..4
    assert [trained_runs(tok, e)[0].split("<")[0] for e in train] == ["2", "3", "4", "5"]
    with pytest.raises(ValueError, match="max_samples is for sources"):
        DataConfig.build(format="gsm", max_samples=3)


def test_the_fingerprint_covers_every_source(files, tmp_path):
    alpaca, chat = files
    cfg = build(datasets=[{"path": alpaca}, {"path": chat}])
    before = data_fingerprint(cfg)
    assert set(before) == {"data.datasets[0].path", "data.datasets[1].path"}
    for i, (path, records) in enumerate(((alpaca, ALPACA), (chat, CHAT))):
        write_jsonl(tmp_path / path.rsplit("/", 1)[1], records[:-1])
        now = data_fingerprint(cfg)
        assert now[f"data.datasets[{i}].path"] != before[f"data.datasets[{i}].path"]
        assert now[f"data.datasets[{1 - i}].path"] == before[f"data.datasets[{1 - i}].path"]
        before = now
    capped = build(datasets=[{"path": alpaca, "max_samples": 2}, {"path": chat}])
    assert data_fingerprint(capped)["data.datasets[0].path"] != before["data.datasets[0].path"]
    one = DataConfig.build(format="alpaca", path=alpaca)  # a run without max_samples keeps its old fingerprint
    assert data_fingerprint(one) == {"data.path": before["data.datasets[0].path"]}


@pytest.mark.parametrize("data,line", [
    ({"path": "A", "datasets": [{"path": "C"}]},
     "x.yaml: data: data.path and data.datasets are both set: give one"),
    ({"datasets": [{"path": "A"}, {"path": "C", "max_samples": 0}]},
     "x.yaml: data.datasets[1].max_samples: Input should be greater than or equal to 1 (got 0)"),
    ({"datasets": [{"path": "A"}, {"format": "chat"}]}, "x.yaml: 'data.datasets[1].path' is required"),
    ({"datasets": [{"path": "A", "format": "gsm"}]}, "x.yaml: data.datasets[0].format: Input should be"),
    ({"datasets": [{"path": "A"}, {"path": "C", "format": "chat", "columns": {"instruction": "q"}}]},
     "x.yaml: data: data.datasets[1].columns: 'instruction' is not a field of format 'chat'"),
    ({"datasets": [{"path": "A"}, {"path": "missing.jsonl"}]},
     "data.datasets[1].path 'missing.jsonl' does not exist"),  # as data.path's: found inferring its format
    ({"datasets": [{"path": "A", "pth": "C"}]}, "x.yaml: unknown option 'data.datasets[0].pth' (did you mean 'path'?"),
    ({"datasets": []}, "x.yaml: data.datasets: List should have at least 1 item"),
])
def test_a_bad_entry_is_one_line_naming_it(files, data, line):
    from lisatune.recipe.config import validate_config
    alpaca, chat = files
    names = {"A": alpaca, "C": chat}
    data = {**data, **({"path": names[data["path"]]} if "path" in data else {}),
            "datasets": [{k: names.get(v, v) if k == "path" else v for k, v in e.items()} for e in data["datasets"]]}
    with pytest.raises(LisaError) as e:
        validate_config({"data": data}, "x.yaml")
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_a_bad_record_of_an_entry_names_the_entry(tmp_path, tok):
    alpaca = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = DataConfig.build(format="alpaca", datasets=[{"path": alpaca}, {"path": alpaca, "split": "train[9:]"}])
    with pytest.raises(LisaError, match=r"a.jsonl: data.datasets\[1\].split 'train\[9:\]' selects no record$"):
        load_splits(cfg, tok)


def test_datasets_train_resume_and_refuse_changed_data(tmp_path):
    from lisatune.recipe.config import load_config
    from lisatune.recipe.loop import train
    assets = make_run_assets(tmp_path / "assets")
    second = write_jsonl(tmp_path / "chat.jsonl", CHAT)

    def config(**kw):
        cfg = {"model": {"source": str(assets / "model")},
               "data": {"datasets": [{"path": str(assets / "train.jsonl"), "max_samples": 12}, {"path": second}],
                        "max_length": 64},
               "method": "lisa", "lisa": {"n_layers": 2, "interval": 3},
               "train": {"output_dir": str(tmp_path / "run"), "lr": 1e-2, "batch_size": 4, "max_steps": 4,
                         "save_every": 2, "keep_last": 3, "gsm_eval_samples": 0, "report_to": [], **kw}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(str(tmp_path / "run.yaml"), [])

    s = train(config())
    assert s["steps"] == 4 and len(RECORDS) > 12
    first = T.AutoModelForCausalLM.from_pretrained(s["final_model"]).state_dict()
    run = tmp_path / "run"
    for d in (run / "checkpoints" / "step-000004", run / "final"):
        shutil.rmtree(d)
    (run / "summary.json").unlink()
    again = train(config(resume=True))
    resumed = T.AutoModelForCausalLM.from_pretrained(again["final_model"]).state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in first.items())

    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "summary.json").unlink()
    write_jsonl(tmp_path / "chat.jsonl", CHAT[:2])
    with pytest.raises(LisaError, match=r"^cannot resume .*: the training data changed \(data.datasets\[1\].path "):
        train(config(resume=True))

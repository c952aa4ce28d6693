"""lm-evaluation-harness: the shipped GSM tasks end to end on a tiny model, asked as training asks, scored as
lisatune scores; train.eval_tasks in metrics.jsonl and the summary; unknown tasks are one-line errors."""
import json
import logging

import pytest
import torch
import transformers as T
import yaml

pytest.importorskip("lm_eval")

from helpers import RECORDS, tiny_tokenizer  # noqa: E402
from lisatune.analysis.tiny import tiny_model  # noqa: E402
from lisatune.data import DataConfig, gsm_eval_items  # noqa: E402
from lisatune.errors import LisaError  # noqa: E402
from lisatune.integrations import harness  # noqa: E402
from lisatune.recipe.config import load_config  # noqa: E402
from lisatune.recipe.evaluate import gsm_accuracy  # noqa: E402
from lisatune.recipe.loop import train  # noqa: E402
from lisatune.tasks import gsm as gsm_tasks  # noqa: E402

GSM = "lm_eval/lisatune_gsm/exact_match,strict-match"
MC = ("lm_eval/lisatune_gsm_mc/acc", "lm_eval/lisatune_gsm_mc/acc_norm")


def model_for(tok):
    """A tiny llama over `tok`'s vocabulary, long enough for GSM prompts, stopping at the tokenizer's EOS."""
    m = tiny_model("llama", 2, max_positions=2048)
    m.resize_token_embeddings(len(tok), mean_resizing=False)
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.bos_token_id = None
    return m


CHAT = tiny_tokenizer(chat=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval-model")
    model_for(CHAT).save_pretrained(d)
    CHAT.save_pretrained(d)
    return d


def test_both_shipped_tasks_run_end_to_end_and_leave_the_model_in_train_mode():
    model = model_for(CHAT).train()
    res = harness.run_tasks(model, CHAT, ["lisatune_gsm", "lisatune_gsm_mc"], limit=2, batch_size=2,
                            progress=False)
    for key in (GSM, *MC):
        assert 0 <= res[key] <= 1, key
    assert res["lm_eval/lisatune_gsm/sample_len"] == res["lm_eval/lisatune_gsm_mc/sample_len"] == 2
    assert model.training


@pytest.mark.parametrize("chat", [True, False])
def test_gsm_task_asks_what_training_asks_and_answers_as_lisatunes_own_eval(chat):
    """Same prompt (chat template, or the plain instruction prompt), same greedy answers, token for token."""
    tok = CHAT if chat else tiny_tokenizer(chat=False)
    model = model_for(tok)
    out = harness.evaluate_tasks(model, tok, ["lisatune_gsm"], limit=3, batch_size=1, log_samples=True,
                                 progress=False)
    ours = gsm_accuracy(model, tok, gsm_eval_items(DataConfig())[:3], max_new_tokens=200, batch_size=1)
    samples = out["samples"]["lisatune_gsm"]
    assert [s["doc"]["question"] for s in samples] == [s["question"] for s in ours["samples"]]
    assert [s["resps"][0][0] for s in samples] == [s["output"] for s in ours["samples"]]
    assert out["results"]["lisatune_gsm"]["exact_match,strict-match"] == ours["gsm_exact_match"]


def test_gsm_task_scores_the_last_answer_line_normalised(monkeypatch):
    """The regex filter and exact_match agree with lisatune's extract_answer on commas, $, '3.50', a final '.'."""
    from lm_eval.models.huggingface import HFLM

    docs = gsm_tasks.problems()["test"]
    number = {d["question"]: d["number"] for d in docs}

    def answer(req):
        n = number[req.doc["question"]]
        styles = [f"#### 1 ... so #### {n}", f"#### ${int(n):,}." if n.isdigit() else f"#### {n}0", "#### 7"]
        return styles[req.doc_id % 3] if req.doc_id < 3 else f"no answer line {n}"

    monkeypatch.setattr(HFLM, "generate_until", lambda self, requests, disable_tqdm=False: list(map(answer, requests)))
    res = harness.run_tasks(model_for(CHAT), CHAT, ["lisatune_gsm"], limit=4, progress=False)
    assert res[GSM] == 0.5  # the first two right (last `####`; 1,234. and $), "#### 7" and no `####` wrong


def test_gsm_tasks_ask_a_gsm_runs_own_held_out_problems_and_the_choices_hold_one_right_answer():
    cfg = DataConfig(format="gsm", seed=3, gsm_eval_templates=4, gsm_eval_variants=1)
    meta = harness.task_metadata(CHAT, cfg)
    docs = gsm_tasks.choices(**meta, version=1.0)["test"]  # lm-eval passes the task's own metadata too
    assert docs["question"] == [it["question"] for it in gsm_eval_items(cfg)]
    for d in docs:
        assert len(set(d["choices"])) == gsm_tasks.N_CHOICES
        assert d["choices"][d["label"]] == f"#### {d['number']}"
    assert gsm_tasks.choices(**meta)["test"]["choices"] == docs["choices"]  # the same every time
    assert gsm_tasks.distractors("3.5", "Ann has 3.5 apples and 2 pears.", 3) == ["2", "4.5", "2.5"]


def test_train_eval_tasks_go_into_metrics_and_the_summary(tmp_path, model_dir, capsys, cli_main):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {"model": {"source": str(model_dir)},
           "data": {"format": "alpaca", "path": str(data), "val_fraction": 0.25, "max_length": 64},
           "lisa": {"n_layers": 1, "interval": 2},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "eval_every": 2,
                     "tensorboard": False, "eval_tasks": ["lisatune_gsm_mc"], "eval_limit": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(tmp_path / "run.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if MC[0] in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("eval_loss" in r for r in evals)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(set(MC) <= set(summary[k]) for k in ("before", "after"))
    assert "lisatune_gsm_mc/acc " in capsys.readouterr().out  # the printed summary shows it


def test_eval_command_runs_tasks_and_refuses_unknown_ones_in_one_line(tmp_path, model_dir, capsys, cli_main):
    mine = tmp_path / "tasks"
    mine.mkdir()  # a user's task: the shipped documents under another name
    (mine / "my_mc.yaml").write_text("include: " + str(harness.TASKS_DIR / "lisatune_gsm_mc.yaml") + "\ntask: my_mc\n")
    assert cli_main(["--quiet", "eval", str(model_dir), "--tasks", "lisatune_gsm_mc,my_mc", "--include-path",
                     str(mine), "--limit", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {MC[0], "lm_eval/my_mc/acc"} <= set(res) and res[MC[0]] == res["lm_eval/my_mc/acc"]

    assert cli_main(["eval", str(model_dir), "--tasks", "lisatune_gsm,gsm_nope", "--include-path", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown lm-eval task 'gsm_nope'" in err
    assert f"(lisatune's: lisatune_gsm, lisatune_gsm_mc; under {mine}: my_mc; and lm-eval's" in err
    assert err.startswith("lisatune: error: --tasks:")


def test_train_refuses_bad_eval_settings_before_loading_the_model(tmp_path):
    with pytest.raises(LisaError, match=r"train.eval_include_path '/nope' does not exist"):
        train(load_config(None, [f"train.output_dir={tmp_path / 'r'}", "train.eval_tasks=[lisatune_gsm]",
                                 "train.eval_include_path=/nope"]))
    with pytest.raises(LisaError, match="eval_include_path: set train.eval_tasks too"):
        load_config(None, ["train.eval_include_path=/tmp"])
    with pytest.raises(LisaError, match="train.eval_tasks: lm-eval runs the whole model in one process"):
        load_config(None, ["train.eval_tasks=[lisatune_gsm]", "distributed=fsdp"])

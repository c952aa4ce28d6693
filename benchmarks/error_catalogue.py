"""Writes docs/errors.md: bad inputs tried through the CLI, each with the one line lisatune answers.

    PYTHONPATH=src python benchmarks/error_catalogue.py          # a few minutes at most on 2 CPU cores

Every case runs `lisatune ...` in this process on a tiny model and data (tests/helpers.py: make_run_assets) in a
temporary directory, and must exit with status 2 and print exactly one error line, no traceback; else the script
fails. Temporary paths are shown as <tmp>.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from helpers import make_run_assets  # noqa: E402
from lisatune.cli import main  # noqa: E402
from lisatune.recipe import checkpoint as ckpt_mod  # noqa: E402
from lisatune.recipe import host_memory  # noqa: E402
from lisatune.recipe.checkpoint import save_checkpoint  # noqa: E402
from lisatune.analysis.tiny import tiny_config, tiny_model  # noqa: E402


def quote(arg: str) -> str:
    """As typed in a shell (<tmp> left as it is, for reading)."""
    return arg if re.fullmatch(r"[\w@%+=:,./<>-]+", arg) else shlex.quote(arg)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


class Catalogue:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.assets = make_run_assets(tmp / "assets")
        self.rows: list[tuple[str, str, str, str]] = []
        self.n = 0

    def config(self, **train) -> Path:
        self.n += 1
        cfg = {"model": {"source": str(self.assets / "model")},
               "data": {"format": "alpaca", "path": str(self.assets / "train.jsonl"), "val_fraction": 0.25,
                        "max_length": 64},
               "method": "lisa", "lisa": {"n_layers": 2, "interval": 3},
               "train": {"output_dir": str(self.tmp / f"run{self.n}"), "lr": 1e-2, "batch_size": 4, "max_steps": 4,
                         "warmup_steps": 1, "tensorboard": False, "gsm_eval_samples": 0, **train}}
        path = self.tmp / f"run{self.n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def finished(self, **train) -> tuple[Path, Path]:
        cfg = self.config(**train)
        rc, err = run_cli(["train", cfg])
        assert rc == 0, err
        return cfg, Path(yaml.safe_load(cfg.read_text())["train"]["output_dir"])

    def model_copy(self, name: str) -> Path:
        d = self.tmp / name
        shutil.copytree(self.assets / "model", d)
        return d

    def show(self, text: str) -> str:
        return str(text).replace(str(self.tmp), "<tmp>")

    def case(self, group: str, what: str, argv: list) -> None:
        rc, err = run_cli(argv)
        lines = [ln for ln in err.splitlines() if ": error: " in ln]
        if rc != 2 or len(lines) != 1 or "Traceback" in err:
            raise SystemExit(f"case '{what}' did not give exit 2 and one error line (rc {rc}):\n{err}")
        shown = " ".join(quote(self.show(a)) for a in ["lisatune", *argv])
        line = lines[0]
        self.rows.append((group, what, shown, self.show(line[line.index("lisatune"):])))
        print(f"{len(self.rows):3d} {what}: {self.show(line)[:140]}")


def build(c: Catalogue) -> None:
    a, tmp = c.assets, c.tmp
    model = a / "model"
    cfg = c.config()

    g = "config values"
    for o, what in [("train.lr=.nan", "lr NaN"), ("train.lr=0", "lr 0"), ("train.lr=-1e-4", "negative lr"),
                    ("train.lr=true", "lr a boolean"), ("train.betas=[0.9, 1.0]", "beta2 = 1"),
                    ("train.eps=0", "eps 0"), ("train.weight_decay=-0.01", "negative weight decay"),
                    ("train.epochs=.inf", "infinite epochs"), ("train.seed=-1", "negative seed"),
                    ("train.max_grad_norm=0", "max_grad_norm 0 (used to mean: no clipping)"),
                    ("train.max_grad_norm=-1", "negative max_grad_norm (used to train uphill)"),
                    ("train.batch_size=true", "batch size a boolean"), ("train.batch_size=2.5", "batch size 2.5"),
                    ("train.grad_accum=0", "no accumulation steps"), ("train.resume=1", "resume 1"),
                    ("data.val_fraction=1.0", "val_fraction 1"), ("data.max_length=4", "max_length 4"),
                    ("lora.dropout=1.0", "LoRA dropout 1"), ("galore.scale=-1", "negative GaLore scale"),
                    ("train.lrr=1", "a misspelt option"), ("method=dora", "an unknown method"),
                    ("train.output_dir=!!python/object/apply:os.system [id]", "a YAML tag in --set")]:
        c.case(g, what, ["train", cfg, "--set", o])
    c.case(g, "--set without '='", ["train", cfg, "--set", "train.lr"])
    c.case(g, "n_layers above the model's blocks", ["train", cfg, "--set", "lisa.n_layers=9"])
    c.case(g, "spill_dir without quantized frozen blocks", ["train", cfg, "--set", f"lisa.spill_dir={tmp}/spill"])
    available, host_memory.available_host_ram = host_memory.available_host_ram, lambda: 1024
    try:  # a machine with 1 KiB of RAM available
        c.case(g, "trained blocks' host copies over the RAM available (1 KiB here)",
               ["train", cfg, "--set", "lisa.frozen_weights=nf4"])
    finally:
        host_memory.available_host_ram = available

    g = "config files"
    c.case(g, "config path is a directory", ["train", tmp])
    c.case(g, "config file missing", ["train", tmp / "nope.yaml"])
    (tmp / "bin.yaml").write_bytes(b"train:\x00\x01")
    c.case(g, "binary config file", ["train", tmp / "bin.yaml"])
    aliased = yaml.safe_load(cfg.read_text())
    aliased["lisa"]["gamma"] = 3  # --set replaces either name; one file giving both disagrees
    (tmp / "aliased.yaml").write_text(yaml.safe_dump(aliased))
    c.case(g, "n_layers and its alias gamma together in one file", ["train", tmp / "aliased.yaml"])
    (tmp / "dup.yaml").write_text("train:\n  lr: 1\n  lr: 2\n")
    c.case(g, "a key given twice", ["train", tmp / "dup.yaml"])
    (tmp / "broken.yaml").write_text("model:\n  source: x\n train: [\n")
    c.case(g, "broken YAML", ["train", tmp / "broken.yaml"])
    tagged = tmp / "tagged.yaml"
    tagged.write_text(cfg.read_text() + "distributed: !!python/name:os.system\n")
    c.case(g, "a YAML tag in the config file", ["train", tagged])
    p = tmp / "p.txt"
    p.write_bytes(b"0.5\n\xff\n")
    c.case(g, "non-UTF-8 probabilities file", ["train", cfg, "--set", "lisa.policy=bernoulli", "--set",
                                               f"lisa.probabilities={p}"])

    g = "data"
    c.case(g, "data.path missing", ["train", cfg, "--set", "data.path=/nope.jsonl"])
    (tmp / "binary.jsonl").write_bytes(b'{"instruction": "a"}\n\x00\x01')
    c.case(g, "binary data file", ["train", cfg, "--set", f"data.path={tmp / 'binary.jsonl'}"])
    (tmp / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    c.case(g, "a record without output", ["train", cfg, "--set", f"data.path={tmp / 'bad.jsonl'}"])
    c.case(g, "data.packing with an example longer than max_length",
           ["train", cfg, "--set", "data.packing=true", "--set", "data.max_length=32"])
    c.case(g, "data.packing with format text",
           ["train", cfg, "--set", "data.format=text", "--set", "data.packing=true"])
    opt = tmp / "opt"  # OPT builds its causal mask without position_ids: packed examples would see each other
    conf = tiny_config("opt", 2)
    conf.vocab_size = len(AutoTokenizer.from_pretrained(model))
    AutoModelForCausalLM.from_config(conf).save_pretrained(opt)
    AutoTokenizer.from_pretrained(model).save_pretrained(opt)
    c.case(g, "data.packing with a model whose mask ignores position_ids",
           ["train", cfg, "--set", f"model.source={opt}", "--set", "data.packing=true"])

    g = "run directories"
    f = tmp / "afile"
    f.write_text("x")
    c.case(g, "output_dir is a file", ["train", cfg, "--output-dir", f])
    c.case(g, "output_dir lies under a file", ["train", cfg, "--output-dir", f / "run"])
    home = tmp / "home"
    (home / "notes").mkdir(parents=True)
    c.case(g, "--overwrite on a directory that is not a run", ["train", cfg, "--output-dir", home, "--overwrite"])
    c.case(g, "a non-empty directory that is not a run", ["train", cfg, "--output-dir", home])
    c.case(g, "--resume with no run", ["train", cfg, "--output-dir", tmp / "fresh", "--resume"])
    done_cfg, done = c.finished(save_every=2, keep_last=5)
    c.case(g, "a finished run again, without --overwrite", ["train", done_cfg])
    c.case(g, "--resume with another config", ["train", done_cfg, "--resume", "--set", "lisa.seed=5"])
    (done / "summary.json").unlink()
    step4 = done / "checkpoints/step-000004"
    state = json.loads((step4 / "trainer_state.json").read_text())
    (step4 / "trainer_state.json").write_text(json.dumps({**state, "step": 3}))
    c.case(g, "trainer_state.json step not the directory's", ["train", done_cfg, "--resume"])
    (step4 / "trainer_state.json").write_text(json.dumps({**state, "step": 999}))
    step4.rename(done / "checkpoints/step-000999")
    c.case(g, "a checkpoint step beyond the run's total", ["train", done_cfg, "--resume"])
    shutil.rmtree(done / "checkpoints/step-000999")
    (done / "checkpoints/step-000002/trainer_state.json").write_text('{"step": 2, ')
    c.case(g, "corrupt trainer_state.json", ["train", done_cfg, "--resume"])

    g = "checkpoints and data on resume"
    cfg2, run2 = c.finished(save_every=2, keep_last=5)
    for x in ["final", "summary.json"]:
        shutil.rmtree(run2 / x) if (run2 / x).is_dir() else (run2 / x).unlink()
    shutil.rmtree(run2 / "checkpoints/step-000004")
    w = run2 / "checkpoints/step-000002/model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    c.case(g, "a flipped byte in a checkpoint's weights", ["train", cfg2, "--resume"])
    # The same data.path with other content (the same records in another order): another run.
    data_file = tmp / "data.jsonl"
    data_file.write_text((a / "train.jsonl").read_text())
    cfg4 = c.config(save_every=2, keep_last=5)
    doc = yaml.safe_load(cfg4.read_text())
    doc["data"]["path"] = str(data_file)
    cfg4.write_text(yaml.safe_dump(doc))
    rc, err = run_cli(["train", cfg4])
    assert rc == 0, err
    (Path(doc["train"]["output_dir"]) / "summary.json").unlink()
    data_file.write_text("".join(reversed(data_file.read_text().splitlines(True))))
    c.case(g, "training data changed since the checkpoint", ["train", cfg4, "--resume"])

    g = "disk"
    real = ckpt_mod.save_file

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    ckpt_mod.save_file = full
    try:
        c.case(g, "disk full while writing a checkpoint", ["train", c.config()])
    finally:
        ckpt_mod.save_file = real

    g = "model directories"
    d = c.model_copy("truncated")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4000])
    c.case(g, "truncated model.safetensors", ["train", cfg, "--set", f"model.source={d}"])
    d = c.model_copy("shapes")
    conf = json.loads((d / "config.json").read_text())
    conf["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(conf))
    c.case(g, "weights not matching config.json", ["train", cfg, "--set", f"model.source={d}"])
    d = c.model_copy("latin1")
    (d / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    c.case(g, "non-UTF-8 config.json", ["train", cfg, "--set", f"model.source={d}"])
    d = c.model_copy("pickle")
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    c.case(g, "pickle weights only (pytorch_model.bin)", ["train", cfg, "--set", f"model.source={d}"])
    d = c.model_copy("notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    c.case(g, "no tokenizer", ["eval", d, "--format", "alpaca", "--data", a / "train.jsonl"])
    (tmp / "empty").mkdir()
    c.case(g, "an empty directory", ["eval", tmp / "empty", "--format", "alpaca", "--data", a / "train.jsonl"])
    ck = save_checkpoint(tmp / "ckrun", 1, tiny_model("llama", 2))
    c.case(g, "a training checkpoint given as a model", ["eval", ck, "--format", "alpaca", "--data", a / "train.jsonl"])
    c.case(g, "model.source missing", ["train", cfg, "--set", "model.source=/nope"])
    c.case(g, "model.source a file, not .gguf", ["train", cfg, "--set", f"model.source={f}"])

    g = "lisatune eval"
    for args, what in [(["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-1"], "--batch-size -1"),
                       (["--max-length", "4"], "--max-length 4"), (["--gsm-samples", "-1"], "--gsm-samples -1"),
                       (["--format", "alpaca"], "alpaca without --data"),
                       (["--format", "alpaca", "--data", tmp / "nope.jsonl"], "--data missing"),
                       (["--format", "alpaca", "--data", tmp / "binary.jsonl"], "--data binary")]:
        c.case(g, what, ["eval", model, *args])
    DatasetDict({"train": Dataset.from_list([{"prompt": "Add 1 and 2.", "answer": "3"}])}).save_to_disk(tmp / "dict")
    alpaca = ["eval", model, "--format", "alpaca", "--data", tmp / "dict"]
    c.case(g, "--split not in a saved DatasetDict", [*alpaca, "--split", "test"])
    c.case(g, "--columns without '='", [*alpaca, "--columns", "instruction"])
    c.case(g, "--columns naming no field of the format", [*alpaca, "--columns", "question=prompt"])
    c.case(g, "a required field with no column", [*alpaca, "--columns", "instruction=prompt"])
    c.case(g, "an unknown lm-eval task", ["eval", model, "--tasks", "lisatune_gsm,gsm_nope"])
    c.case(g, "--include-path missing", ["eval", model, "--tasks", "lisatune_gsm", "--include-path", tmp / "nope"])
    c.case(g, "--limit without --tasks", ["eval", model, "--limit", "5"])
    c.case(g, "--data with --tasks", ["eval", model, "--tasks", "lisatune_gsm", "--data", a / "train.jsonl"])

    g = "evaluation tasks and metric sinks in a run"
    for o, what in [("train.eval_tasks=[gsm_nope]", "an unknown lm-eval task"),
                    ("train.eval_tasks=lisatune_gsm", "eval_tasks not a list"),
                    ("train.eval_include_path=/tmp", "eval_include_path without eval_tasks"),
                    ("train.report_to=[wandb, wandb]", "a sink twice"),
                    ("train.report_to=[mlflow]", "an unknown sink"),
                    ("train.report_to=[tensorboard]", "report_to beside the older train.tensorboard")]:
        c.case(g, what, ["train", cfg, "--set", o])
    c.case(g, "eval_include_path missing", ["train", cfg, "--set", "train.eval_tasks=[lisatune_gsm]", "--set",
                                            f"train.eval_include_path={tmp / 'nope'}"])
    c.case(g, "eval_tasks under fsdp", ["train", cfg, "--set", "train.eval_tasks=[lisatune_gsm]", "--set",
                                        "distributed=fsdp"])

    g = "lisatune norms / bench"
    for args, what in [(["--lr-full", "nan"], "--lr-full nan"), (["--gamma", "0"], "--gamma 0"),
                       (["--batch", "0"], "--batch 0"), (["--lora-r", "0"], "--lora-r 0")]:
        c.case(g, what, ["norms", "--model", "tiny", *args])
    c.case(g, "--model tiny:x", ["norms", "--model", "tiny:x"])
    c.case(g, "norms --data missing", ["norms", "--model", model, "--data", tmp / "nope.txt"])
    c.case(g, "bench speed --steps 0", ["bench", "speed", "--model", "tiny", "--steps", "0"])


def write(c: Catalogue, out: Path) -> None:
    lines = ["# What lisatune says to bad input",
             "",
             "Each row is a bad input tried through the command line and the one line lisatune answered (exit status",
             "2, no traceback; the output directory is left as it was). Generated by",
             "`PYTHONPATH=src python benchmarks/error_catalogue.py` on a tiny model; `<tmp>` is its temporary",
             "directory, `runN.yaml` a small valid run config. The tests of each class are in `tests/test_errors.py`.",
             ""]
    group = None
    for g, what, cmd, msg in c.rows:
        if g != group:
            lines += ["", f"## {g}", "", "| input | command | message |", "|---|---|---|"]
            group = g
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {esc(what)} | `{esc(cmd)}` | {esc(msg)} |")
    lines += ["", f"{len(c.rows)} inputs.", ""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="lisatune-errors-") as d:
        cat = Catalogue(Path(d))
        build(cat)
        write(cat, ROOT / "docs" / "errors.md")
    print(f"written: docs/errors.md ({len(cat.rows)} inputs)")

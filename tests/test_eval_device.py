"""`lisatune eval` and `generate` run on the GPU when there is one, in the dtype the run trained in (issue 26: eval
stayed on the CPU in fp32, generate moved to CUDA in fp32). CUDA is faked: torch.cuda.is_available says True and
every Module.to(...) is recorded, the device part dropped, so the work itself runs on the CPU."""
import json
import logging
import shutil

import pytest
import torch
import transformers as T

from helpers import make_run_assets
from lisatune.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = make_run_assets(tmp_path_factory.mktemp("assets"))
    for precision in ("fp32", "bf16-mixed"):  # a run folder: config.yaml beside final/ (fp32 weights in both)
        run = root / f"run-{precision}"
        shutil.copytree(root / "model", run / "final")
        (run / "config.yaml").write_text(f"model:\n  dtype: {'bf16' if precision != 'fp32' else 'fp32'}\n"
                                         f"train:\n  precision: {precision}\n")
    shutil.copytree(root / "model", root / "bf16")  # a model saved in bf16 (its config.json says so), no run
    T.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16).save_pretrained(root / "bf16")
    return root


@pytest.fixture
def fake_cuda(monkeypatch):
    """The models moved and their final (device, dtype) as asked for; the CPU does the work."""
    moves = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if not isinstance(self, T.PreTrainedModel):
            return real_to(self, *args, **kwargs)
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        moves.append((device.type if device is not None else None, dtype))
        return real_to(self, dtype) if dtype is not None else self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    yield moves


def final(moves):
    """(the last device asked for, the last dtype asked for)."""
    return ([d for d, _ in moves if d is not None] or [None])[-1], ([t for _, t in moves if t is not None] or [None])[-1]


def run(*argv):
    level = logging.getLogger("lisatune").level
    try:
        return main(list(argv))
    finally:
        logging.getLogger("lisatune").setLevel(level)


@pytest.mark.parametrize("model, dtype", [("run-bf16-mixed/final", torch.bfloat16), ("run-fp32/final", torch.float32),
                                          ("model", torch.float32), ("bf16", torch.bfloat16)])
def test_eval_runs_on_the_gpu_in_the_runs_dtype(assets, fake_cuda, capsys, model, dtype):
    code = run("eval", str(assets / model), "--format", "alpaca", "--data", str(assets / "train.jsonl"),
               "--max-examples", "2", "--batch-size", "2")
    assert code == 0
    assert final(fake_cuda) == ("cuda", dtype)
    assert json.loads(capsys.readouterr().out)["eval_tokens"] > 0


@pytest.mark.parametrize("model, dtype", [("bf16", torch.bfloat16), ("model", torch.float32)])
def test_generate_keeps_the_models_dtype_on_the_gpu(assets, fake_cuda, capsys, model, dtype):
    assert run("generate", str(assets / model), "--prompt", "Hi", "--max-new-tokens", "2") == 0
    assert final(fake_cuda) == ("cuda", dtype)


def test_without_a_gpu_both_stay_on_the_cpu(assets, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from lisatune.recipe.evaluate import placement
    assert placement(str(assets / "run-bf16-mixed" / "final")) == ("bf16", torch.device("cpu"))
    assert placement("smollm2") == ("fp32", torch.device("cpu"))

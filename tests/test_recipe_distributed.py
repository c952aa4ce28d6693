"""`lisatune train` under torchrun: 2 gloo processes on CPU (config `distributed: ddp | fsdp`).

Each rank takes half of every global batch of train.batch_size × 2, so a 2-process run must train like one
process with batch_size × 2. It does up to float rounding: the ranks' gradients are summed in another order
and the sub-batches are padded to their own length (other matrix shapes). Measured on the tiny Llama below
(LISA γ=2 of 4 blocks, K=3, AdamW lr 1e-3, 8 steps, clipping at 1.0 active): largest weight difference from
the 1-process run 6.5e-7 for DDP and 6.5e-7 for FSDP2, against a largest weight movement of 4.5e-3. We allow
1e-5 (15× the measurement, 1/450 of the movement); per-step losses agree to 1e-6 relative.
Resume on the same number of processes is bitwise (measured for DDP and FSDP2; DDP is tested here).
"""
import datetime
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as T
import yaml
from safetensors.torch import load_file

from helpers import SUBPROCESS_ENV, make_run_assets
from lisatune.distributed import launch_mode, prepare_model
from lisatune.errors import LisaError
from lisatune.recipe.checkpoint import weight_files
from lisatune.recipe.loop import train
from lisatune.recipe.config import load_config

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
              pytest.mark.timeout(300)]

ENV = SUBPROCESS_ENV
ATOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("dist_assets"))


def write_config(root: Path, name: str, distributed: str, method: str = "lisa", data: dict | None = None,
                 **train) -> Path:
    cfg = {"model": {"source": str(root / "model")},
           "data": {"format": "alpaca", "path": str(root / "train.jsonl"), "val_fraction": 0.25, "max_length": 64,
                    **(data or {})},
           "method": method, "distributed": distributed,
           "lisa": {"n_layers": 2, "interval": 3},
           "train": {"output_dir": str(root / name), "lr": 1e-3, "batch_size": 2, "max_steps": 8, "warmup_steps": 1,
                     "tensorboard": False, "gsm_eval_samples": 0, **train}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lisatune.cli", "train", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The final model's weights: one file, or under FSDP2 the files its index lists (streamed as gathered)."""
    final = run / "final"
    return {k: v for f in weight_files(final) for k, v in load_file(str(final / f)).items()}


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


MEASURED = ("tokens_per_s", "step_s", "rss_mib", "peak_rss_mib", "peak_allocated_mib", "peak_reserved_mib")


def without_timing(rs: list[dict]) -> list[dict]:
    """The rows without what is measured, not computed: times and memory peaks."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rs]


@pytest.fixture(scope="module")
def one_process(assets):
    """The reference: one process with the global batch (2 × 2)."""
    train(load_config(str(write_config(assets, "single", "none", batch_size=4)), []))
    return assets / "single"


@pytest.fixture(scope="module")
def ddp_run(assets):
    """LISA under DDP, checkpointing every 4 steps (mid-interval: K=3); save_every changes nothing computed."""
    r = torchrun(write_config(assets, "ddp", "ddp", save_every=4, keep_last=5))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: ddp over 2 processes (gloo)" in r.stderr  # accelerate joined torchrun's group with gloo
    return assets / "ddp"


def check_like_one_process(run: Path, ref: Path, mode: str) -> None:
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    init = load_file(str(run.parent / "model" / "model.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((b[k] - init[k]).abs().max().item() for k in b)
    assert diff <= ATOL < moved / 100, (diff, moved)
    # rank 0 alone wrote the metrics: one row per step, and the same losses, norms and active sets
    got, want = rows(run), rows(ref)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in got if "eval_loss" in r] == [0, 8]
    for g, w in zip(got, want):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-6), (key, g, w)
        assert g.get("active") == w.get("active")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == mode and summary["processes"] == 2 and summary["steps"] == 8
    # DDP runs the chunked head + cross-entropy through its wrapper; FSDP2's sharded head keeps the model's loss
    assert summary["loss"] == {"ddp": "fused", "fsdp": "model"}[mode]
    assert json.loads((ref / "summary.json").read_text())["loss"] == "fused"
    ckpt = run / "checkpoints" / "step-000008"
    names = {p.name for p in ckpt.iterdir()}  # and, since #28, config.json + tokenizer: a model directory too
    weights_file = {"ddp": "model.safetensors", "fsdp": "model.safetensors.index.json"}[mode]  # FSDP2: streamed
    assert {weights_file, "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json",
            "config.json", "tokenizer.json"} <= names and not any(n.startswith("rng_rank2") for n in names)
    assert T.AutoModelForCausalLM.from_pretrained(ckpt).config.architectures == ["LlamaForCausalLM"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2


def test_ddp_trains_like_one_process_with_the_global_batch(ddp_run, one_process):
    check_like_one_process(ddp_run, one_process, "ddp")


def test_ddp_with_lora_trains_like_one_process(assets):
    """Any other method gets a plain DistributedDataParallel, which all-reduces only the trainable adapters."""
    train(load_config(str(write_config(assets, "single_lora", "none", "lora", batch_size=4)), []))
    r = torchrun(write_config(assets, "ddp_lora", "ddp", "lora"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((assets / "ddp_lora" / "summary.json").read_text())["loss"] == "fused"
    a, b = weights(assets / "ddp_lora"), weights(assets / "single_lora")  # merged into plain models
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL  # measured 7.5e-9


def test_fsdp_trains_like_one_process_and_shards_the_optimizer_state(assets, one_process):
    r = torchrun(write_config(assets, "fsdp", "fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    check_like_one_process(assets / "fsdp", one_process, "fsdp")
    final = assets / "fsdp" / "final"  # streamed: Hugging Face's sharded layout, loaded by from_pretrained
    assert (final / "model.safetensors.index.json").is_file() and not (final / "model.safetensors").exists()
    loaded = T.AutoModelForCausalLM.from_pretrained(final)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(p, weights(assets / "fsdp")[n]) for n, p in loaded.state_dict().items()
               if n in weights(assets / "fsdp"))
    assert not [f for f in (assets / "fsdp").iterdir() if f.name.startswith(".stage-")]  # no staging folder left
    # state_mib is rank 0's: half of the single process's AdamW state (tiny Llama: every dim 0 is even)
    shard = [x["state_mib"] for x in rows(assets / "fsdp") if "loss" in x]
    whole = [x["state_mib"] for x in rows(one_process) if "loss" in x]
    assert all(s <= 0.55 * w for s, w in zip(shard, whole))


def test_ddp_resume_is_bitwise_equal_to_the_uninterrupted_run(assets, ddp_run):
    whole, whole_rows = weights(ddp_run), rows(ddp_run)
    for leftover in ["checkpoints/step-000008", "final", "summary.json"]:  # as if killed after step 4
        shutil.rmtree(ddp_run / leftover) if (ddp_run / leftover).is_dir() else (ddp_run / leftover).unlink()
    cfg = assets / "ddp.yaml"
    with pytest.raises(LisaError, match=r"written by 2 processes, this run has 1 process: resume with 2"):
        train(load_config(str(cfg), ["train.resume=true"]))  # one process: a different global batch
    r = torchrun(cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-000004 at step 4" in r.stderr
    resumed = weights(ddp_run)
    assert resumed.keys() == whole.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert without_timing(rows(ddp_run)) == without_timing(whole_rows)


PACKED = {"packing": True, "max_length": 128}


@pytest.fixture(scope="module")
def one_process_packed(assets):
    train(load_config(str(write_config(assets, "single_packed", "none", data=PACKED, batch_size=4)), []))
    return assets / "single_packed"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_packed_batches_train_like_one_process(assets, one_process_packed, mode):
    # Each rank takes half of every global batch of packed rows; the loss is normalised by the global token count.
    r = torchrun(write_config(assets, f"{mode}_packed", mode, data=PACKED))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(assets / f"{mode}_packed"), weights(one_process_packed)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL
    got, want = rows(assets / f"{mode}_packed"), rows(one_process_packed)
    assert [g["loss"] for g in got if "loss" in g] == pytest.approx([w["loss"] for w in want if "loss" in w], rel=1e-6)


def test_several_processes_with_distributed_none_fail_with_one_line(assets):
    r = torchrun(write_config(assets, "none2", "none"))
    assert r.returncode != 0  # torchrun's own code (1); the workers exit 2
    assert "exitcode  : 2" in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("lisatune: error:")]
    assert errors and all(e == errors[0] for e in errors)
    assert "2 processes were launched but distributed is 'none': set distributed: ddp or fsdp" in errors[0]
    assert not (assets / "none2").exists()  # refused before the run directory was touched


def test_fsdp_refuses_galore_on_every_rank(assets):
    r = torchrun(write_config(assets, "fsdp_galore", "fsdp", method="galore"))
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr
    assert ("lisatune: error: distributed: fsdp trains with LisaAdamW or torch.optim.AdamW only (methods lisa, full), "
            "not galore_torch.adamw.AdamW; use distributed: ddp") in r.stderr


def test_fsdp_refuses_lora_before_sharding(assets):
    from lisatune.methods import build_method
    model = T.AutoModelForCausalLM.from_pretrained(assets / "model")
    lora = build_method("lora", {"r": 4}).prepare(model)
    with pytest.raises(LisaError, match="distributed: fsdp does not support LoRA .* use distributed: ddp"):
        prepare_model("fsdp", lora)  # refused before sharding: no optimizer exists yet


def test_launch_mode():
    assert launch_mode("none", 1) == "none"
    assert launch_mode("ddp", 1) == "none"  # one process: nothing to synchronise (logged as a warning)
    with pytest.raises(LisaError, match="2 processes were launched but distributed is 'none'"):
        launch_mode("none", 2)


def test_the_process_group_gets_the_configured_collective_timeout(monkeypatch, tmp_path):
    """#27: train.collective_timeout reaches the process group (accelerate's InitProcessGroupKwargs), so rank-0-only
    work longer than NCCL's default 10 minutes does not kill the run."""
    from lisatune.recipe import loop
    from lisatune.recipe.config import load_config
    seen = {}

    class Stop(Exception):
        pass

    def accelerator(cpu, kwargs_handlers):
        seen["timeout"] = [h.timeout for h in kwargs_handlers]
        raise Stop

    monkeypatch.setattr(loop, "Accelerator", accelerator)
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.collective_timeout=7200"])
    with pytest.raises(Stop):
        loop.setup(cfg)
    assert seen["timeout"] == [datetime.timedelta(seconds=7200)]
    assert load_config(None, []).train.collective_timeout == 3600


def test_one_registry_of_backends_drives_the_config_and_the_recipe():
    """#25: a distributed backend is a class in distributed/launch.py plus its BACKENDS entry: the config's choices
    and its checks read the registry, not a string compared in several files."""
    from typing import get_args

    from lisatune.distributed.launch import BACKENDS
    from lisatune.recipe.config import TrainConfig, load_config
    assert get_args(TrainConfig.model_fields["distributed"].annotation) == tuple(BACKENDS) == ("none", "ddp", "fsdp")
    assert [b.name for b in BACKENDS.values() if not b.fused_loss or not b.whole_model] == ["fsdp"]
    with pytest.raises(LisaError, match="bf16-mixed under distributed: fsdp is built for method lisa, not 'full'"):
        load_config(None, ["train.precision=bf16-mixed", "distributed=fsdp", "method=full"])
    with pytest.raises(LisaError, match="train.eval_tasks: lm-eval runs the whole model in one process"):
        load_config(None, ["distributed=fsdp", "train.eval_tasks=[lisatune_gsm]"])

"""benchmarks/gpu_check.py, on the CPU: its dry run goes through every task in child processes, on a machine
without the optional packages too, and the parent keeps what finished when a child crashes or hangs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# what a bare GPU machine lacks: everything outside torch, transformers, peft, accelerate, pydantic and their deps
ABSENT = ["datasets", "bitsandbytes", "lm_eval", "tensorboard", "matplotlib", "galore_torch", "gguf", "trl", "wandb"]
# A sitecustomize, so that the parent and every child it starts see the same bare machine: a module set to None
# in sys.modules is one `import` refuses and importlib.util.find_spec reports missing (as when not installed).
BLOCK = f"import sys\nfor _m in {ABSENT!r}:\n    sys.modules[_m] = None\n"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(out: Path, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "gpu_check.json").read_text())


def test_the_dry_run_goes_through_every_task(tmp_path):
    """All tasks, in one child (the dry run's default): checks pass, every case is planned and measured per
    phase, LISA's switch steps are timed apart from the others, and the log has a line per task."""
    gc = gpu_check()
    data = run_check(tmp_path)
    res = data["results"]
    assert list(res) == gc.TASKS and data["finished"] and data["dry_run"]
    assert not [k for k, v in res.items() if "error" in v or "skipped" in v], res
    assert res["checks"]["ok"] and res["checks-bnb"]["ok"], (res["checks"], res["checks-bnb"])
    assert set(res["checks"]["loss_falls"]) | set(res["checks-bnb"]["loss_falls"]) == set(gc.CASES)
    for name, case in gc.CASES.items():
        row = res[name]
        assert row["planned"].get("peak", 0) > 0 and row["static"]["allocated"] > 0, name
        assert set(row["measured"]["phases_mib"]) >= {"forward", "backward", "step"}, name
        assert row["measured"]["mem_get_info"]["total"] > 0 and row["tokens_per_s"]["overall"] > 0, name
        st = row["step_s"]
        assert st["plain_n"] + st["switch_n"] == 4 and st["plain_median"] > 0, name
        assert (st["switch_n"] > 0) == (case.method == "lisa"), (name, st)  # K=2: steps 2 and 4 switch
        assert row["static"]["setup_peak_allocated"] > 0, name
        build = row["build"]
        if gc.host_first(case):  # frozen blocks arrived quantized; their full-precision copies stayed on the host
            assert build["path"] == "host, then LisaAdamW(device=...)" and build["quantized_blocks"] == 2, build
            assert build["host_copies_on_host"], build
        else:
            assert build["path"] == "on the device", build
    bnb = res["checks-bnb"]
    assert bnb["int8_frozen_exact"]["output_equal"] and bnb["int8_frozen_exact"]["input_grad_equal"], bnb
    assert bnb["int8_frozen_loss_falls"]["ok"] and bnb["int8_bnb_linear8bitlt"]["eval_rel_err"] > 1e-3, bnb
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"\n{t}: " in log for t in gc.TASKS), log


def test_without_the_optional_packages_a_crash_costs_one_case(tmp_path):
    """With datasets, bitsandbytes, lm-eval... missing, lisatune imports and the check runs: bitsandbytes' tasks
    are skipped, the rest measured. A child that dies in a task (as a CUDA fault kills it) loses that task only:
    the tasks after it run in a fresh process, and the JSON written before it stays."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT / "src")])}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u\n"
                            f"print([m for m in {ABSENT!r} if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=True)
    assert probe.stdout.split() == ["[]"], probe.stdout  # the block holds (and the test can fail)
    data = run_check(tmp_path / "out", "--only", "checks", "lisa", "lisa-eh-frozen", "qlora-r16", "checks-bnb",
                     env={**env, "GPU_CHECK_CRASH_IN": "lisa"})
    res = data["results"]
    assert list(res) == ["checks", "checks-bnb", "lisa", "lisa-eh-frozen", "qlora-r16"]
    assert res["checks-bnb"] == res["qlora-r16"] == {"skipped": "bitsandbytes is not installed"}
    assert res["checks"]["ok"], res["checks"]
    assert res["lisa"]["error"].startswith("exit code 70"), res["lisa"]
    assert res["lisa-eh-frozen"]["measured"]["peak_allocated_mib"] > 0, res["lisa-eh-frozen"]
    assert not data["bitsandbytes_present"]


def test_a_child_that_hangs_is_stopped_and_what_it_wrote_is_kept(tmp_path):
    gc = gpu_check()
    result, log = tmp_path / "r.jsonl", tmp_path / "log"
    writes_then_hangs = ("import json, sys, time\n"
                         f"open({str(result)!r}, 'a').write(json.dumps({{'task': 'a', 'x': 1}}) + '\\n')\n"
                         "print('working on b', flush=True)\ntime.sleep(60)")
    rows, status = gc.launch([sys.executable, "-c", writes_then_hangs], result, timeout=3, log_path=log)
    assert rows == {"a": {"x": 1}} and status == "timed out after 3 s"
    assert "working on b" in log.read_text()
    rows, status = gc.launch([sys.executable, "-c", "print('CUDA error: an illegal memory access'); exit(3)"], result,
                             timeout=30, log_path=log)
    assert rows == {} and status == "exit code 3: CUDA error: an illegal memory access"


def test_a_wrong_shape_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check().main(["--shape", "Llama-9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_check: --shape Llama-9 is not a built-in shape ("), err


def test_lisa_with_quantized_frozen_blocks_is_built_on_the_host_and_given_to_lisaadamw_with_the_device(monkeypatch):
    """The product's loading path: the model on the host in bf16, LisaAdamW(device=...) quantizes the frozen
    blocks onto the device and moves the rest; the other cases are built on the device."""
    gc = gpu_check()
    from lisatune import LisaAdamW
    calls, real = [], LisaAdamW.__init__

    def init(self, model, config=None, *, device=None, **kwargs):
        calls.append((device, {p.device.type for p in model.parameters()}, {p.dtype for p in model.parameters()}))
        real(self, model, config, device="cpu", **kwargs)  # (the host stands in for the device it was given)

    monkeypatch.setattr(LisaAdamW, "__init__", init)
    dev = torch.device("meta")  # where build was asked to train: nothing may be made there before LisaAdamW
    assert [n for n, c in gc.CASES.items() if gc.host_first(c)] == ["lisa-eh-frozen-nf4", "lisa-8bit-eh-nf4"]
    _, opt = gc.build(gc.tiny_shape(), gc.CASES["lisa-eh-frozen-nf4"], dev, lr=1e-3)
    assert calls == [(dev, {"cpu"}, {torch.bfloat16})]
    assert opt.frozen_weights.quantized_blocks() == [i for i in range(4) if i not in opt.active_blocks]


def test_the_host_model_is_random_and_finite_where_the_skipped_init_left_garbage():
    gc = gpu_check()
    model = gc.host_model(gc.tiny_shape())
    ps = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in ps.values())
    q = ps["model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.01 < q.std() < 0.03 and not torch.equal(q, ps["model.layers.1.self_attn.q_proj.weight"].float())
    assert torch.equal(ps["model.norm.weight"], torch.ones_like(ps["model.norm.weight"]))
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(input_ids=x, labels=x).loss)

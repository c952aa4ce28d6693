"""#25: the run config is a declared class of typed sections that loads without the runtime; its light tables of
methods and distributed modes agree with the registries that implement them; a section reaches the engine as is."""
import subprocess
import sys

import pytest
import torch

from helpers import tiny_model
from lisatune.distributed.launch import BACKENDS
from lisatune.errors import LisaError
from lisatune.methods import METHODS
from lisatune.options import GaloreOptions, LisaOptions, LoraOptions, TrainOptions
from lisatune.recipe.config import DISTRIBUTED, METHOD_SPECS, MODES, TrainConfig, load_config
from lisatune.recipe.loop import use_tf32

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def test_loading_a_config_imports_no_runtime(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lisa\nlisa:\n  n_layers: 2\ntrain:\n  lr: 3.0e-5\n")
    code = ("import sys\nfrom lisatune.recipe.config import load_config\n"
            f"a = load_config(None)\nb = load_config({str(path)!r}, ['lisa.n_layers=4'])\n"
            f"print(a.lisa.n_layers, b.lisa.n_layers, b.train.lr, [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().split(maxsplit=3) == ["2", "4", "3e-05", "[]"]


def test_the_sections_are_typed():
    cfg = load_config(None)
    assert (type(cfg), type(cfg.lisa), type(cfg.lora), type(cfg.galore), type(cfg.train)) == \
        (TrainConfig, LisaOptions, LoraOptions, GaloreOptions, TrainOptions)
    assert list(TrainConfig.model_fields) == ["model", "data", "method", "distributed", "lora", "galore", "lisa",
                                              "train"]


def test_the_method_table_agrees_with_the_registry():
    assert list(METHOD_SPECS) == list(METHODS)  # the same methods, in the registry's order (errors list them so)
    for name, cls in METHODS.items():
        spec = METHOD_SPECS[name]
        assert spec.options is (cls.Options if cls.Options.model_fields else None), name
        assert spec.mixed_precision == cls.mixed_precision, name
        if spec.options is not None:  # its section in the run config, named after it
            assert TrainConfig.model_fields[name].annotation is spec.options


def test_the_distributed_table_agrees_with_the_backends():
    assert MODES == tuple(BACKENDS)
    for name, backend in BACKENDS.items():
        spec = DISTRIBUTED[name]
        assert (spec.fused_loss, spec.whole_model, spec.bf16_mixed) == \
            (backend.fused_loss, backend.whole_model, backend.bf16_mixed), name


def test_a_method_takes_its_section_and_the_train_options_to_the_engine_as_they_are():
    cfg = load_config(None, ["lisa.n_layers=3", "train.lr=0.002", "train.weight_decay=0.1", "lisa.embed_head_lr=1"])
    method = METHODS[cfg.method](cfg.lisa, cfg.train)
    opt = method.optimizer(tiny_model())
    assert opt.config is cfg.lisa  # the run's own section object: nothing rebuilt on the way
    assert len(opt.active_units) == 3
    assert {g["lr"] for g in opt.param_groups} == {0.002}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}  # the decay split: no decay on norms, biases


@pytest.mark.parametrize("n", [0, -1, 7])
def test_gamma_is_bounded_once_by_the_engine_with_its_message(n):
    cfg = load_config(None, [f"lisa.n_layers={n}"])  # a config holds any integer: the model decides
    with pytest.raises(LisaError, match=r"^n_layers \(γ\) = -?\d+ (exceeds|must be between 1 and) the 6 transformer "
                                        r"blocks found at model.layers$"):
        METHODS["lisa"](cfg.lisa, cfg.train).optimizer(tiny_model())


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, \
        torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


@pytest.mark.parametrize("device,overrides,on", [
    ("cuda", [], True),  # fp32 on CUDA: TF32 matmuls
    ("cuda", ["train.tf32=false"], False),
    ("cuda", ["train.precision=bf16-mixed"], False),
    ("cpu", [], False),
])
def test_fp32_on_cuda_uses_tf32_unless_turned_off(matmul_precision, device, overrides, on):
    t = load_config(None, overrides).train
    assert use_tf32(torch.device(device), t) is on
    assert torch.get_float32_matmul_precision() == ("high" if on else "highest")


def test_lisatune_config_lists_every_key_with_its_default_and_help(capsys):
    from lisatune.cli import main
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    listed = {ln.split(" = ")[0]: ln for ln in out.splitlines() if " = " in ln and not ln.startswith(" ")}
    sections = {n: f.annotation for n, f in TrainConfig.model_fields.items()}
    keys = [f"{s}.{k}" if hasattr(a, "model_fields") else s for s, a in sections.items()
            for k in (a.model_fields if hasattr(a, "model_fields") else [None])]
    assert list(listed) == keys
    assert listed["lisa.n_layers"].split()[2] == "2" and "γ" in listed["lisa.n_layers"]
    assert "(cosine | linear | constant)" in listed["train.schedule"]
    helpless = [k for k, ln in listed.items() if len(ln.split("  ")) < 2 and not k.startswith("data.")]
    assert helpless == []  # every key of lisatune's own sections says what it is (data: lisatune.data's)
    assert main(["config", "lisa", "--aliases"]) == 0
    lisa = capsys.readouterr().out
    assert lisa.startswith("lisa.n_layers = 2") and "lisa_activated_layers" in lisa
    assert all(ln.startswith(("lisa.", " ")) for ln in lisa.splitlines())


def test_a_mistake_in_the_run_config_is_reported_before_the_library_loads(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    code = ("import sys\nfrom lisatune.cli import main\n"
            f"rc = main(['train', {str(bad)!r}])\nprint(rc, [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "2 []"
    assert "unknown option 'train.lrr' (did you mean 'lr'?" in out.stderr


@pytest.mark.parametrize("option, value", [("frozen_weights", "nf4"), ("frozen_weights", "int8"),
                                           ("embed_head_state", "8bit")])
def test_fsdp_with_an_option_it_cannot_shard_is_one_line_at_load_naming_the_field(option, value):
    with pytest.raises(LisaError) as e:
        load_config(None, ["distributed=fsdp", f"lisa.{option}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"default config: lisa.{option}: {value} cannot run under distributed: fsdp: bitsandbytes")
    assert "\n" not in msg and "DTensor" in msg
    assert load_config(None, ["distributed=ddp", f"lisa.{option}={value}"]).lisa.model_dump()[option] == value


@pytest.mark.parametrize("method", ["lisa", "full"])
def test_train_step_chunk_mib_reaches_the_master_step_in_bytes(method, monkeypatch):
    from lisatune.engine import masters
    seen = []
    init = masters.Masters.__init__
    monkeypatch.setattr(masters.Masters, "__init__", lambda self, b=None: (seen.append(b), init(self, b))[1])
    cfg = load_config(None, ["train.precision=bf16-mixed", "train.step_chunk_mib=3", f"method={method}"])
    m = METHODS[method](cfg.method_options(), cfg.train)
    m.optimizer(m.prepare(tiny_model(dtype=torch.bfloat16)), master_weights=True)
    assert seen == [3 * 2**20]
    with pytest.raises(LisaError, match="train.step_chunk_mib has no effect without train.precision: bf16-mixed"):
        load_config(None, ["train.step_chunk_mib=3"])

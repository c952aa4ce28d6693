"""#28: QLoRA in `lisatune train` (`lora.base: nf4 | int8`): a bitsandbytes base whose full-precision weights stay
on the host, adapters that train, checkpoints that resume bitwise, a merged final model loadable by
from_pretrained."""
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file

from helpers import batches, make_run_assets, tiny_model, train
from lisatune.errors import LisaError
from lisatune.methods import build_method
from lisatune.quant.qlora import QLoraBase
from lisatune.recipe.checkpoint import load_checkpoint
from lisatune.recipe.config import load_config
from lisatune.recipe.loop import train as train_run

pytest.importorskip("bitsandbytes")
KINDS = ["nf4", "int8"]


def bases(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoraBase)}


def qlora(kind, n_layers=2, dtype=torch.float32, seed=0, **options):
    method = build_method("lora", {"r": 4, "base": kind, **options})
    return method, method.prepare(tiny_model(n_layers=n_layers, seed=seed, dtype=dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_adapters_train_and_the_loss_falls(kind):
    method, model = qlora(kind)
    assert len(bases(model)) == 2 * 7  # every linear of both blocks
    before = {n: (m.weight.detach().clone(), m.__dict__["lisa_full"].clone()) for n, m in bases(model).items()}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = method.optimizer(model, lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if "lora_" in n}
    losses = train(model, opt, batches(1) * 8)
    assert losses[-1] < losses[0] - 0.2, losses
    for n, m in bases(model).items():  # quantized bytes and host copies as they were
        assert torch.equal(m.weight, before[n][0]) and torch.equal(m.__dict__["lisa_full"], before[n][1]), n
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_nf4_computes_in_the_model_dtype():
    _, model = qlora("nf4", dtype=torch.bfloat16)
    m = next(iter(bases(model).values()))
    assert m.compute_dtype == torch.bfloat16 and m.__dict__["lisa_full"].dtype == torch.bfloat16
    assert m(torch.randn(2, m.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_the_state_dict_is_the_full_precision_base_and_loading_it_quantizes_again(kind):
    original = tiny_model(n_layers=2, seed=0).state_dict()
    _, a = qlora(kind, seed=0)
    sd = a.state_dict()
    key = "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"
    assert torch.equal(sd[key], original["model.layers.1.mlp.down_proj.weight"])
    _, b = qlora(kind, seed=1)  # other base weights, quantized differently
    b.load_state_dict(sd)
    for n, m in bases(b).items():
        assert torch.equal(m.weight, bases(a)[n].weight), n
    x = batches(1)[0]
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


def test_without_bitsandbytes_lora_base_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(LisaError) as e:
        qlora("nf4")
    assert str(e.value) == "lora.base: nf4 needs bitsandbytes (pip install bitsandbytes)"


def test_a_base_without_nn_linear_is_refused_in_one_line():
    with pytest.raises(LisaError, match=r"^lora.base: nf4 quantizes torch.nn.Linear layers, .* use lora.base: full$"):
        build_method("lora", {"base": "nf4"}).prepare(tiny_model("gpt2", 2))


def test_merged_export_adds_the_delta_to_the_full_precision_base():
    method, model = qlora("nf4")
    train(model, method.optimizer(model, lr=1e-2), batches(3))
    base = tiny_model(n_layers=2, seed=0).state_dict()
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    merged_model = method.export(model)
    merged = merged_model.state_dict()
    diff = merged["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
    # B·A (rank 4) and nothing else: merging into a dequantized base would add its full-rank quantization error
    assert diff.abs().max() > 0 and torch.linalg.matrix_rank(diff) <= 4
    assert all(v.dtype == torch.float32 for v in merged.values())
    # the same adapters on the full-precision base compute what the merged model does
    ref_method, ref = qlora("full")
    assert not ref.load_state_dict(adapters, strict=False).unexpected_keys
    x = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(merged_model(input_ids=x).logits, ref(input_ids=x).logits,
                                   rtol=0, atol=1e-5)


# -- lisatune train ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def write_config(tmp_path, assets, name="run", base="nf4", **train):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25, "max_length": 64},
           "method": "lora", "lora": {"r": 4, "base": base},
           "train": {"output_dir": str(tmp_path / name), "lr": 1e-2, "batch_size": 4, "max_steps": 4,
                     "warmup_steps": 1, "tensorboard": False, "gsm_eval_samples": 0, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_saves_a_merged_final_model_equal_to_the_merged_model_in_memory(tmp_path, assets):
    s = train_run(load_config(str(write_config(tmp_path, assets)), []))
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    final = T.AutoModelForCausalLM.from_pretrained(s["final_model"]).eval()
    assert not any("lora" in n for n, _ in final.named_parameters())
    # the merged model in memory: the final checkpoint (the peft model's state dict) loaded and merged again
    method = build_method("lora", {"r": 4, "base": "nf4"})
    model = method.prepare(T.AutoModelForCausalLM.from_pretrained(assets / "model"))
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    load_checkpoint(ckpt, model)
    merged = method.export(model).eval()
    x = batches(1, vocab=final.config.vocab_size)[0]
    with torch.no_grad():
        assert torch.equal(final(input_ids=x).logits, merged(input_ids=x).logits)  # tolerance 0: fp32 saved as is


def test_train_with_merge_lora_false_saves_the_adapter(tmp_path, assets):
    s = train_run(load_config(str(write_config(tmp_path, assets, max_steps=1)), ["train.merge_lora=false"]))
    assert (Path(s["final_model"]) / "adapter_config.json").is_file()
    assert all("lora_" in k for k in load_file(str(Path(s["final_model"]) / "adapter_model.safetensors")))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_a_mid_run_checkpoint_is_bitwise_equal(tmp_path, assets, kind):
    whole = train_run(load_config(str(write_config(tmp_path, assets, "whole", kind)), []))
    cfg = write_config(tmp_path, assets, "split", kind, save_every=2, keep_last=5)
    train_run(load_config(str(cfg), []))
    run = tmp_path / "split"
    for leftover in ["checkpoints/step-000004", "final", "summary.json"]:
        os.system(f"rm -rf {run / leftover}")  # as if the process died after step 2
    resumed = train_run(load_config(str(cfg), ["train.resume=true"]))
    assert resumed["steps"] == 4 and resumed["before"] == whole["before"] and resumed["after"] == whole["after"]
    for d in ["final", "checkpoints/step-000004"]:
        a, b = (load_file(str(tmp_path / r / d / "model.safetensors")) for r in ["whole", "split"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d


def test_a_bad_lora_base_is_one_line_naming_it(tmp_path, assets):
    with pytest.raises(LisaError) as e:
        train_run(load_config(str(write_config(tmp_path, assets)), ["lora.base=nf3"]))
    assert "lora.base" in str(e.value) and "nf3" in str(e.value) and "\n" not in str(e.value)


def test_each_base_is_quantized_once_from_its_host_copy_onto_the_run_device(tmp_path, assets, monkeypatch):
    """prepare(model, device) quantizes each base linear straight onto the device the run trains on; place() then
    finds them there and quantizes nothing again (it did every layer twice: on the host, then onto the device)."""
    import lisatune.quant.qlora as qlora_module
    calls = []
    real = qlora_module.quantized_weight
    monkeypatch.setattr(qlora_module, "quantized_weight",
                        lambda bnb, w, kind, device: calls.append((w, device)) or real(bnb, w, kind, device))
    method = build_method("lora", {"r": 4, "base": "nf4"})
    model = method.prepare(tiny_model(n_layers=2), device="cpu")
    assert [id(w) for w, _ in calls] == [id(m.__dict__["lisa_full"]) for m in bases(model).values()]
    assert calls and all(d == torch.device("cpu") for _, d in calls)
    x = batches(1)[0]
    with torch.no_grad():
        before = model(input_ids=x).logits
    calls.clear()
    method.place(model, "cpu")
    assert calls == []
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    train_run(load_config(str(write_config(tmp_path, assets, max_steps=1)), []))  # the recipe: once per layer
    assert len(calls) == len(bases(model)) * 2  # the assets' model has 4 blocks, this one 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_on_cuda_the_device_never_holds_the_base_in_full_precision(kind):
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    torch.manual_seed(0)
    method = build_method("lora", {"r": 4, "base": kind})
    model = method.prepare(T.AutoModelForCausalLM.from_config(cfg))  # layers of 1 MiB: allocator rounding is noise
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    opt = method.optimizer(model, lr=1e-2, device="cuda")
    full_blocks = sum(m.__dict__["lisa_full"].nbytes for m in bases(model).values())
    others = sum(p.nbytes for n, p in model.named_parameters() if "base_layer" not in n)
    largest = max(m.__dict__["lisa_full"].nbytes for m in bases(model).values())
    # the non-block weights, the quantized blocks, and one layer's full weight while it quantizes
    assert torch.cuda.max_memory_allocated() - start < 1.1 * others + full_blocks // 2 + 2 * largest
    assert all(m.weight.device.type == "cuda" and m.__dict__["lisa_full"].device.type == "cpu"
               for m in bases(model).values())
    data = [b.cuda() for b in batches(1)] * 6
    losses = train(model, opt, data)
    assert losses[-1] < losses[0]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(sd)  # re-quantized where each base lives: on the device
    assert all(m.weight.device.type == "cuda" for m in bases(model).values())

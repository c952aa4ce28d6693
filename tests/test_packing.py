"""data.packing: packed examples train exactly as they would one by one, and what cannot keep them apart is refused."""
import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from helpers import RECORDS, make_run_assets, tiny_model, tiny_tokenizer
from lisatune.data import DataConfig, collate, load_splits
from lisatune.data.pack import first_fit, pack
from lisatune.data.render import IGNORE
from lisatune.errors import LisaError
from lisatune.recipe.config import load_config
from lisatune.recipe.loop import train
from lisatune.recipe.loss import fused_loss, model_inputs, standard_loss
from lisatune.recipe.packing import check_packing, flat_rows, leaks

PAD = 0


def examples(n=9, seed=0, vocab=96):
    """Prompt (no loss) + response examples of 3..12 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 12))]
        prompt = rng.randint(1, len(ids) - 1)
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def token_losses(model, batch):
    """Cross-entropy of every next token (0 where unlabelled), shape (rows, width - 1)."""
    keep = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**model_inputs(**keep)).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                                             reduction="none")


def per_example(losses, packed_rows, exs, max_length, flat):
    """Each example's loss sum, read back from the packed batch's token losses."""
    where = first_fit([len(e["input_ids"]) for e in exs], max_length)
    starts = [0] * len(packed_rows)  # each sequence's offset in the flat row
    for i in range(1, len(packed_rows)):
        starts[i] = starts[i - 1] + len(packed_rows[i - 1]["input_ids"])
    fill, out = [0] * len(packed_rows), []
    for e, b in zip(exs, where):
        row, at = (0, starts[b] + fill[b]) if flat else (b, fill[b])
        n = len(e["input_ids"])
        out.append(losses[row, at:at + n - 1].sum())  # the tokens after its first, each predicted inside it
        fill[b] += n
    return torch.stack(out)


# -- packing itself -------------------------------------------------------------------------------------------------
def test_first_fit_puts_each_length_in_the_first_sequence_with_room():
    assert first_fit([5, 4, 3, 6, 2, 8], 8) == [0, 1, 0, 2, 1, 3]
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    room, want = [], []  # the plain quadratic first fit
    for n in lengths:
        i = next((i for i, r in enumerate(room) if r >= n), len(room))
        if i == len(room):
            room.append(64)
        room[i] -= n
        want.append(i)
    assert first_fit(lengths, 64) == want


def test_packed_sequences_hold_every_example_once_with_restarting_positions_and_no_label_at_boundaries():
    exs = examples(30)
    packed = pack(exs, 24)
    assert len(packed) < len(exs) and all(len(p["input_ids"]) <= 24 for p in packed)
    pieces = []
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"])
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][s] == IGNORE for s in starts)  # never predicted from the example before
        for s, e in zip(starts, starts[1:] + [len(p["input_ids"])]):
            assert p["position_ids"][s:e] == list(range(e - s))
            pieces.append((p["input_ids"][s:e], p["labels"][s + 1:e]))
    want = [(e["input_ids"], e["labels"][1:]) for e in exs]
    assert sorted(map(str, pieces)) == sorted(map(str, want))
    assert pack(exs, 24) == packed  # a pure function of the examples: resume draws the same sequences


def test_collate_of_packed_sequences_gives_positions_and_no_mask():
    packed = pack([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                   {"input_ids": [4, 4], "labels": [-100, 4]}], 5)
    assert len(packed) == 2
    rows = collate(packed, pad_id=PAD)
    assert rows["attention_mask"] is None
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, PAD, PAD, PAD]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert rows["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    flat = collate(packed, pad_id=PAD, flat=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    # How flash attention reads it (modeling_flash_attention_utils): one row, varlen boundaries at each example;
    # the padded rows are not recognised as packed, which is why they go flat.
    assert _is_packed_sequence(flat["position_ids"], 1)
    assert prepare_fa_kwargs_from_position_ids(flat["position_ids"])[0][0].tolist() == [0, 3, 5, 7]
    assert not _is_packed_sequence(rows["position_ids"], 2)


# -- the same loss as one by one ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,attention,flat", [("llama", "eager", False), ("llama", "sdpa", False),
                                                 ("llama", "sdpa", True), ("gpt2", "sdpa", False),
                                                 ("qwen2", "eager", False)])
def test_a_packed_batch_gives_each_example_the_loss_it_has_alone(arch, attention, flat):
    model = tiny_model(arch, n_layers=2)
    model.set_attn_implementation(attention)
    assert check_packing(model) is False  # padded rows, not one flat row (that is for flash attention)
    exs = examples(9)
    packed = pack(exs, 24)
    assert len(packed) < len(exs)
    with torch.no_grad():
        alone = torch.stack([standard_loss(model, **collate([e], PAD), reduction="sum") for e in exs])
        batch = collate(packed, PAD, flat=flat)
        got = per_example(token_losses(model, batch), packed, exs, 24, flat)
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        # Both of lisatune's losses take packed batches; the fused one sums the same tokens.
        for loss in (standard_loss, fused_loss):
            torch.testing.assert_close(loss(model, **batch, reduction="sum"), alone.sum(), rtol=1e-5, atol=1e-4)
        # Without packing (one padded row each) it is the same again: what packing changes is only the layout.
        torch.testing.assert_close(standard_loss(model, **collate(exs, PAD), reduction="sum"), alone.sum(),
                                   rtol=1e-5, atol=1e-4)


# -- what cannot keep packed examples apart ------------------------------------------------------------------------
def test_an_attention_implementation_that_builds_no_mask_from_positions_is_refused():
    T.AttentionInterface.register("custom_sdpa", sdpa_attention_forward)  # no mask function: none is built
    model = tiny_model("llama", n_layers=2)
    model.set_attn_implementation("custom_sdpa")
    assert leaks(model)  # the refusal is no formality: the second example does see the first
    with pytest.raises(LisaError) as e:
        check_packing(model)
    line = str(e.value)
    assert "\n" not in line and line.startswith("data.packing: ") and "'custom_sdpa'" in line, line
    assert "set data.packing=false" in line
    assert flat_rows("flash_attention_2") and flat_rows("flash_attention_3") and not flat_rows("sdpa")
    with pytest.raises(LisaError, match=r"^data\.packing: the model's attention implementation 'paged\|eager'"):
        flat_rows("paged|eager")


def test_a_model_whose_code_ignores_positions_in_its_mask_is_refused():
    model = tiny_model("opt", n_layers=2)  # OPT builds its causal mask without position_ids
    with pytest.raises(LisaError, match=r"^data\.packing: packed examples attend to each other in this 'opt' model "
                                        r"with attention 'eager' .*; set data\.packing=false$"):
        check_packing(model)
    assert not leaks(tiny_model("llama", n_layers=2))


# -- the data options ------------------------------------------------------------------------------------------------
def test_an_example_longer_than_max_length_is_an_error_naming_the_field(tmp_path):
    tok = tiny_tokenizer(chat=True)
    records = RECORDS[:3] + [{"instruction": "Add them. " * 20, "output": "no"}] + RECORDS[3:6]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"format": "alpaca", "path": str(path), "max_length": 40}
    with pytest.raises(LisaError) as e:
        load_splits(DataConfig(**cfg, packing=True), tok)
    assert str(e.value).startswith(f"{path}: example 4 has ") and "more than data.max_length=40" in str(e.value)
    assert "\n" not in str(e.value)
    assert len(load_splits(DataConfig(**cfg), tok)[0]) == 6  # unpacked, it is dropped as before
    with pytest.raises(LisaError, match=r"^data: packing is for formats alpaca, chat, sharegpt and gsm"):
        DataConfig.build(format="text", path="x.txt", packing=True)
    with pytest.raises(LisaError, match=r"^data\.packing: Input should be a valid boolean"):
        DataConfig.build(packing="yes")


def test_validation_holds_the_same_examples_packed(tmp_path):
    tok = tiny_tokenizer(chat=True)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {"format": "alpaca", "path": str(path), "max_length": 128, "val_fraction": 0.25}
    train_set, val = load_splits(DataConfig(**cfg), tok)
    ptrain, pval = load_splits(DataConfig(**cfg, packing=True), tok)
    assert len(ptrain) < len(train_set) and len(pval) < len(val)
    for plain, packed in ((train_set, ptrain), (val, pval)):
        assert sorted(t for e in plain for t in e["input_ids"]) == sorted(t for e in packed for t in e["input_ids"])


# -- through the recipe -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def config(tmp_path, assets, name, packing=True, **train_options):
    cfg = {"model": {"source": str(assets / "model")},
           "data": {"format": "alpaca", "path": str(assets / "train.jsonl"), "val_fraction": 0.25, "max_length": 128,
                    "packing": packing},
           "method": "lisa", "lisa": {"n_layers": 2, "interval": 2},
           "train": {"output_dir": str(tmp_path / name), "lr": 1e-2, "batch_size": 2, "max_steps": 4,
                     "warmup_steps": 1, "tensorboard": False, "gsm_eval_samples": 0, **train_options}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(str(path), [])


def test_a_packed_run_learns_and_evaluates_like_an_unpacked_one(tmp_path, assets, caplog):
    with caplog.at_level(logging.INFO, logger="lisatune"):
        packed = train(config(tmp_path, assets, "packed"))
    assert re.search(r"packed 18 training examples into [4-9] sequences of <= 128 tokens", caplog.text), caplog.text
    plain = train(config(tmp_path, assets, "plain", packing=False, max_steps=1))
    # The same validation examples, packed or not: the same loss before training.
    assert packed["before"]["eval_tokens"] == plain["before"]["eval_tokens"] > 0
    assert packed["before"]["eval_loss"] == pytest.approx(plain["before"]["eval_loss"], rel=1e-5)
    assert packed["after"]["eval_loss"] < packed["before"]["eval_loss"] - 0.2
    rows = [json.loads(ln) for ln in Path(packed["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_packed_run_resumes_bitwise(tmp_path, assets):
    train(config(tmp_path, assets, "whole"))
    cfg = config(tmp_path, assets, "split", save_every=2, keep_last=5)
    train(cfg)
    run = tmp_path / "split"
    for leftover in ["checkpoints/step-000004", "final"]:  # as if it died after step 2
        shutil.rmtree(run / leftover)
    (run / "summary.json").unlink()
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})}))
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

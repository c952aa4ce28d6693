"""`lisatune plan` against real measurements: the planner (meta device, no weights) and `bench memory`
(real tiny models) count the same bytes through recipe/meter.py."""
import argparse
import json
import re
from dataclasses import replace

import pytest
import torch
import transformers as T

from lisatune import LisaAdamW
from lisatune.analysis import commands
from lisatune.analysis.memory import measure_method
from lisatune.recipe.meter import (ActivationMeter, AllocationMeter, grad_bytes, optimizer_state_bytes,
                                      unique_bytes, weight_bytes)
from lisatune.analysis.plan import GIB, Setting, parse_method, parse_size, plan_memory
from lisatune.analysis.shapes import PARAMS, SHAPES, shape_config
from lisatune.analysis.tiny import tiny_config
from lisatune.engine import decay_groups
from lisatune.cli import main
from lisatune.errors import LisaError
from lisatune.recipe.loss import fused_loss, held_hidden_grads
from lisatune.recipe.models import enable_checkpointing

B, S = 2, 32  # batch x tokens: activations outweigh the loss' transient buffers, as at scale
SPECS = {"full": ("full", {}), "lora": ("lora:r=16", {"lora_r": 16}), "lisa": ("lisa:n_layers=2,interval=5", {"gamma": 2})}


def parser():
    p = argparse.ArgumentParser()
    commands.register(p.add_subparsers(dest="command", required=True))
    return p


def config(arch, vocab=96):
    cfg = tiny_config(arch, 4)
    cfg.vocab_size = vocab
    return cfg


def real(arch, dtype=torch.float32, attention="eager", checkpointing=False, vocab=96):
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(config(arch, vocab), dtype=dtype, attn_implementation=attention)
    if checkpointing:
        enable_checkpointing(m)
    return m.train()


def measure(model, spec, vocab=96, **kw):
    return measure_method(spec, model=model, vocab=vocab, batch=B, seq=S, steps=2, switches=1, **kw)


def planned(arch, method, vocab=96, **kw):
    kw = {"batch": B, "seq": S, "attention": "eager", **SPECS[method][1], **kw}  # tiny.py's models are eager
    return plan_memory(config(arch, vocab), Setting(method=method, **kw))


def assert_same(p, m, exact_activations=True):
    assert (p.weights, p.grads, p.state) == (m.weights, m.grads, m.state)  # to the byte
    assert p.trainable == m.trainable
    if exact_activations:
        assert p.activations == m.activations
    assert p.activations == pytest.approx(m.activations, rel=0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", ["full", "lora", "lisa"])
def test_plan_equals_the_measurement_of_a_real_tiny_model(arch, method):
    m = measure(real(arch), SPECS[method][0])
    p = planned(arch, method)
    assert_same(p, m)
    assert p.loss_held == m.loss_held > 0  # the fused loss' gradient of the hidden states, (B*(S-1)) x 32 fp32
    assert p.masters == 0 and p.recompute == 0
    measured_peak = m.accounted + m.loss_held
    assert p.peak == pytest.approx(measured_peak, rel=0.10)  # + the estimated chunk logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_standard_loss_counts_the_logits_the_model_saves(arch):
    m = measure(real(arch), SPECS["lisa"][0], loss="standard")
    p = planned(arch, "lisa", loss="standard")
    assert_same(p, m)
    assert m.loss_held == p.loss_held == 0 and p.loss_transient == B * S * 96 * 8  # the logits' gradients
    assert p.peak == pytest.approx(m.accounted, rel=0.10)
    assert p.activations > planned(arch, "lisa").activations


def test_lisa_with_the_embedding_and_head_frozen_plans_the_lowest_blocks():
    model = real("llama")
    opt = LisaAdamW(model, n_layers=2, interval=1, policy="weighted", probabilities=[1, 1, 0, 0],
                    train_embedding=False, train_head=False)
    ids = torch.randint(0, 96, (B, S))
    with ActivationMeter(model) as meter:
        loss = fused_loss(model, ids, None, ids)
    loss.backward()
    opt.step()
    p = planned("llama", "lisa", embed_head=False)
    assert (p.weights, p.grads, p.state, p.activations) == (weight_bytes(model), grad_bytes(model),
                                                           optimizer_state_bytes(opt), meter.bytes)
    assert p.label == "LISA 2L (E/H frozen)" and p.active.startswith("blocks 0-1 (the lowest")
    # the highest blocks instead: backward stops earlier, so the lowest are the worst case the plan states
    top = real("llama")
    LisaAdamW(top, n_layers=2, interval=1, policy="weighted", probabilities=[0, 0, 1, 1], train_embedding=False,
              train_head=False)
    with ActivationMeter(top) as upper:
        fused_loss(top, ids, None, ids)
    assert 0 < upper.bytes < p.activations


def test_gamma_0_plans_the_embedding_head_and_norm_only():
    p = planned("llama", "lisa", gamma=0)
    assert p.label == "LISA E+H" and p.trainable == 2 * 96 * 32 + 32
    assert p.grads == p.trainable * 4


def test_bf16_matches_a_bf16_run_and_bf16_mixed_adds_fp32_masters_and_state():
    for method in ("full", "lisa"):
        m = measure(real("llama", torch.bfloat16), SPECS[method][0])
        p = planned("llama", method, precision="bf16")
        assert_same(p, m)
        mixed = planned("llama", method, precision="bf16-mixed")
        fp32 = planned("llama", method)
        assert (mixed.weights, mixed.grads, mixed.activations) == (p.weights, p.grads, p.activations)
        assert mixed.masters == fp32.grads == 2 * p.grads  # a fp32 copy of every trainable tensor
        assert mixed.state == fp32.state  # AdamW on the fp32 masters
    # torch's CPU LayerNorm keeps its per-token mean/rstd in bf16; CUDA's and the meta kernel keep fp32
    m = measure(real("gpt2", torch.bfloat16), SPECS["lisa"][0])
    assert_same(planned("gpt2", "lisa", precision="bf16"), m, exact_activations=False)
    lora = planned("llama", "lora", precision="bf16-mixed")
    assert lora.masters == 0 and lora.grads == planned("llama", "lora").grads  # peft keeps adapters in fp32


def test_checkpointing_counts_block_inputs_and_one_block_recomputed():
    m = measure(real("llama", checkpointing=True), SPECS["full"][0], gradient_checkpointing=True)
    p = planned("llama", "full", checkpointing=True)
    assert_same(p, m)
    assert p.activations < planned("llama", "full").activations
    model = real("llama")  # what backward's recomputation saves: one block of a forward without checkpointing
    blocks = list(model.model.layers)
    ids = torch.randint(0, 96, (B, S))
    with ActivationMeter(model, per_block=blocks) as meter:
        fused_loss(model, ids, None, ids)
    assert p.recompute == max(meter.by_block) > 0


def test_sdpa_plans_what_torch_s_fused_kernel_saves():
    for arch in ("llama", "qwen2"):  # (GPT-2's attention dropout sends torch's CPU SDPA to its math fallback)
        m = measure(real(arch, attention="sdpa"), SPECS["lisa"][0])
        p = planned(arch, "lisa", attention="sdpa")
        assert_same(p, m)
        assert p.activations < planned(arch, "lisa").activations  # no s x s weights saved


def test_the_optimizer_step_temporary_is_one_moment_of_the_largest_group():
    """torch's AdamW on CUDA runs foreach: sqrt(exp_avg_sq) of a whole group at once (forced here on CPU)."""
    full = real("llama")
    lisa = real("llama")
    opts = [torch.optim.AdamW(decay_groups(list(full.parameters())), foreach=True),
            LisaAdamW(lisa, n_layers=2, interval=5, optimizer_kwargs={"foreach": True})]
    ids = torch.randint(0, 96, (B, S))
    for model, opt, method in zip((full, lisa), opts, ("full", "lisa")):
        for step in range(2):  # the second step: the state exists before the update
            fused_loss(model, ids, None, ids).backward()
            with AllocationMeter() as alloc:
                opt.step()
            opt.zero_grad()
        p = planned("llama", method)
        assert alloc.peak == p.step_temp > 0
        assert p.step_peak == p.weights + p.grads + p.state + p.step_temp < p.peak  # tiny: activations dominate


def test_the_loss_held_is_the_hidden_states_gradient():
    model = real("llama")
    ids = torch.randint(0, 96, (B, S))
    (g,) = held_hidden_grads(fused_loss(model, ids, None, ids))
    assert g.shape == (B * (S - 1), 32) and unique_bytes([g]) == planned("llama", "full").loss_held


def test_built_in_shapes_have_the_published_parameter_counts():
    for name in SHAPES:
        cfg = shape_config(name.upper())  # names are case-insensitive
        with torch.device("meta"):
            n = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(cfg).parameters())
        assert n == PARAMS[name], name


def test_a_smollm2_shape_row_plans_on_the_meta_device_in_seconds():
    p = plan_memory("SmolLM2-135M", Setting(method="lisa", precision="bf16-mixed", seq=256))
    assert p.params == PARAMS["SmolLM2-135M"] and p.weights == 2 * p.params  # bf16, tied embedding once
    emb, block, norm = 49152 * 576, 3_540_096, 576  # tied embedding/head, one block, final norm
    assert p.trainable == emb + 2 * block + norm
    assert p.masters == 4 * p.trainable and p.grads == 2 * p.trainable
    assert p.state == 8 * p.trainable + 4 * (1 + 2 * 9 + 1)  # two fp32 moments, a step per tensor
    assert 0 < p.activations < GIB and p.peak > p.counted


def test_a_model_directory_or_config_json_plans_like_its_config(tmp_path):
    cfg = tiny_config("llama", 4)
    cfg.save_pretrained(tmp_path)
    s = Setting(method="full", batch=B, seq=S, attention="eager")
    want = plan_memory(cfg, s).to_dict()
    assert plan_memory(str(tmp_path), s).to_dict() == want
    assert plan_memory(str(tmp_path / "config.json"), s).to_dict() == want


def test_plan_command_prints_a_table_and_json(capsys):
    args = parser().parse_args(["plan", "--model", "SmolLM2-135M", "--method", "lisa", "lisa:gamma=4",
                                "--precision", "bf16-mixed", "--seq", "128", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in out["plans"]] == ["LISA E+H+2L", "LISA E+H+4L"]
    assert out["plans"][0]["peak"] < out["plans"][1]["peak"]
    args = parser().parse_args(["plan", "--model", "SmolLM2-135M", "--method", "lisa", "--seq", "128"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| LISA E+H+2L |" in table and "SmolLM2-135M (0.13B params): batch 1 x 128 tokens, fp32" in table


def test_gpu_too_small_lists_the_changes_that_fit(capsys):
    args = parser().parse_args(["plan", "--method", "lisa", "--precision", "bf16-mixed", "--seq", "256",
                                "--gpu", "900MiB", "--reserve", "0MiB"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| **no** |" in out and "it would with:" in out and "- checkpointing on: peak" in out
    fits = plan_memory("SmolLM2-135M", Setting(method="lisa", precision="bf16-mixed", seq=256, checkpointing=True))
    assert fits.peak <= 900 * 2**20


def test_bad_inputs_are_one_line_errors(capsys):
    with pytest.raises(LisaError) as e:
        plan_memory("Llama-9-1B", Setting())
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in SHAPES)
    for bad in ("24XB", "lots", "-3GB", "", "0GB"):
        with pytest.raises(LisaError, match="is not a memory size") as e:
            parse_size(bad)
        assert "\n" not in str(e.value)
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24") == 24 * GIB
    assert parse_size("40960MiB") == 40 * GIB
    with pytest.raises(LisaError, match="gamma 5 exceeds the model's 4 blocks"):
        planned("llama", "lisa", gamma=5)
    with pytest.raises(LisaError, match="galore"):
        parse_method("galore", Setting())
    with pytest.raises(LisaError, match="gamma"):
        parse_method("lisa:gama=3", Setting())
    assert main(["plan", "--gpu", "24 gigs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lisatune: error: --gpu '24 gigs'") and err.count("\n") == 1


# -- bitsandbytes: quantized frozen blocks, 8-bit E/H state, QLoRA (#14, #15) -----------------------------------
bnb = pytest.importorskip("bitsandbytes")
WIDE = 300  # embedding and head 300 x 32 = 9,600 values: over AdamW8bit's 4,096, so 8-bit (tiny's 96 would not be)
QUANT = {  # bench memory spec (lisatune's LISA, as `lisatune train` runs it) -> the planner's setting
    "nf4": ("lisa:n_layers=2,interval=5,frozen_weights=nf4", {"frozen": "nf4"}),
    "int8": ("lisa:n_layers=2,interval=5,frozen_weights=int8", {"frozen": "int8"}),
    "8bit": ("lisa:n_layers=2,interval=5,embed_head_state=8bit", {"eh_state": "8bit"}),
    "8bit+nf4": ("lisa:n_layers=2,interval=5,embed_head_state=8bit,frozen_weights=nf4",
                 {"eh_state": "8bit", "frozen": "nf4"}),
}


@pytest.mark.parametrize("case", list(QUANT))
@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.float32)])
def test_quantized_frozen_blocks_and_8bit_state_plan_equal_the_measured_lisa_run(case, arch, dtype):
    spec, setting = QUANT[case]
    precision = "fp32" if dtype == torch.float32 else "bf16"
    m = measure(real(arch, dtype, vocab=WIDE), spec, vocab=WIDE)
    p = planned(arch, "lisa", vocab=WIDE, precision=precision, **setting)
    assert_same(p, m)  # weights (bitsandbytes' data and statistics), grads, state: to the byte; activations too
    full = planned(arch, "lisa", vocab=WIDE, precision=precision)
    assert (p.grads, p.masters) == (full.grads, full.masters)
    if "frozen" in setting:
        assert p.weights < full.weights
    if "8bit" in case:  # E/H: two uint8 moments + fp32 absmax per 256 values, instead of two fp32 moments
        assert p.state < full.state and p.state_ratio < full.state_ratio * 1.05
    # nf4's matmul saves nothing a frozen nn.Linear would not; int8's keeps each linear's input (see meter.py)
    assert (p.activations > full.activations) == (case == "int8")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_checkpointing_keeps_the_int8_inputs_and_the_plan_counts_them(kind):
    spec, setting = QUANT[kind]
    m = measure(real("llama", checkpointing=True), spec, gradient_checkpointing=True)
    p = planned("llama", "lisa", checkpointing=True, **setting)
    assert_same(p, m)
    base = planned("llama", "lisa", checkpointing=True)
    # a ctx attribute survives the checkpoint: every frozen int8 block keeps its linears' inputs (q/k/v share one,
    # gate/up share one): 4 tensors of B x S x 32 or x 64 fp32 in each of the 2 frozen blocks
    assert p.activations - base.activations == (0 if kind == "nf4" else 2 * (3 * 32 + 64) * B * S * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_plans_like_peft_on_a_bitsandbytes_nf4_base(dtype):
    from lisatune.quant import quantize_linears
    precision = "fp32" if dtype == torch.float32 else "bf16"
    m = measure(quantize_linears(real("llama", dtype), "nf4"), SPECS["lora"][0])
    p = plan_memory(config("llama"), parse_method("qlora", Setting(batch=B, seq=S, attention="eager",
                                                                   precision=precision)))
    assert p.label == "QLoRA r=16"
    assert_same(p, m)
    lora = planned("llama", "lora", precision=precision)
    assert (p.grads, p.state, p.activations) == (lora.grads, lora.state, lora.activations)
    assert p.weights < lora.weights


def test_method_specs_and_flags_for_quantized_rows(capsys):
    base = Setting()
    assert parse_method("qlora:r=64", base) == replace(base, method="lora", lora_r=64, lora_base="nf4")
    assert parse_method("lora:base=int8", base).label == "LoRA r=16 (int8 base)"
    s = parse_method("lisa:embed_head=false,frozen=nf4", base)
    assert s.label == "LISA 2L (E/H frozen, nf4 frozen blocks)"
    assert parse_method("lisa:embed_head_state=8bit,frozen_weights=int8", base).label == \
        "LISA E+H+2L (8-bit E/H state, int8 frozen blocks)"
    for spec, msg in [("lisa:frozen=nf3", "frozen 'nf3' is not one of full, int8, nf4"),
                      ("lisa:eh_state=4bit", "eh_state '4bit' is not one of fp32, 8bit"),
                      ("lora:base=fp8", "lora base 'fp8' is not one of full, int8, nf4"),
                      ("lisa:eh_state=8bit,embed_head=false", "eh_state=8bit is the state of the embedding"),
                      ("qlora:frozen=nf4", "key of qlora (r, base)"), ("lisa:frozen=4", "frozen = '4' is not a name")]:
        with pytest.raises(LisaError, match=re.escape(msg)) as e:
            parse_method(spec, base)
        assert "\n" not in str(e.value)
    args = parser().parse_args(["plan", "--model", "SmolLM2-135M", "--method", "lisa", "lora", "--seq", "64",
                                "--eh-state", "8bit", "--frozen", "nf4", "--lora-base", "nf4", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in out["plans"]] == ["LISA E+H+2L (8-bit E/H state, nf4 frozen blocks)", "QLoRA r=16"]
    with pytest.raises(SystemExit):
        main(["plan", "--frozen", "nf5"])
    assert "--frozen: invalid choice: 'nf5' (choose from 'full', 'int8', 'nf4')" in capsys.readouterr().err


def test_a_smollm2_shape_plans_its_quantized_rows_from_the_formulas():
    """SmolLM2-135M on paper: 28 frozen blocks of 7 linears in nf4; the tied E/H's state in 8 bits."""
    from lisatune.quant.sizes import adamw8bit_state_bytes, nf4_bytes
    base = Setting(method="lisa", precision="bf16-mixed", seq=64)
    full = plan_memory("SmolLM2-135M", base)
    nf4 = plan_memory("SmolLM2-135M", replace(base, frozen="nf4"))
    linears = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert full.weights - nf4.weights == 28 * sum(2 * o * i - nf4_bytes(o, i) for o, i in linears)
    eight = plan_memory("SmolLM2-135M", replace(base, eh_state="8bit"))
    eh = 49152 * 576  # one tensor; the final norm's 576 values stay fp32 either way
    assert full.state - eight.state == 8 * eh + 4 + 8 * 576 + 4 - adamw8bit_state_bytes([eh, 576])  # steps: ints
    assert eight.ideal == full.ideal - 6 * (eh + 576) and eight.state_ratio < 1.02 and full.state_ratio < 1.001

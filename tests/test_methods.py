"""Fine-tuning methods behind one interface: each trains, each touches only what it should, clear errors."""
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from helpers import batches, tiny_model
from lisatune import LisaAdamW, LisaConfig, LisaError, find_layers
from lisatune.methods import (METHODS, GaloreOptions, LisaOptions, LoraOptions, block_linears, build_method,
                              default_targets)

X = batches(1, seed=3)[0]  # one fixed batch: every method should overfit it


def train(method, model, steps=15, lr=1e-2, weight_decay=0.0):
    opt = method.optimizer(model, lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_name(peft_name):  # base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight -> HF name
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("name, options, lr", [
    ("full", None, 1e-2),
    ("lora", None, 1e-2),
    ("galore", {"rank": 8}, 1e-2),
    ("lisa", {"n_layers": 2, "interval": 5}, 1e-2),
])
def test_every_method_overfits_a_batch(name, options, lr):
    method = build_method(name, options)
    base = tiny_model("llama", 4)
    # A random head of std 0.02 caps the logits that frozen-head LoRA can reach (loss stalls near 4.0);
    # give it a pretrained-like scale so every method faces the same, learnable problem.
    torch.manual_seed(0)
    torch.nn.init.normal_(base.lm_head.weight, std=0.1)
    model = method.prepare(base)
    _, losses = train(method, model, lr=lr)
    assert losses[-1] < 0.9 * losses[0], losses


def test_full_moves_every_parameter_and_exempts_biases_and_norms_from_decay():
    method = build_method("full", None)
    model = method.prepare(tiny_model("llama", 2))
    before = snapshot(model)
    opt, _ = train(method, model, steps=3, weight_decay=0.1)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_merges_to_the_same_model(arch):
    method = build_method("lora", {"r": 4})
    base = tiny_model(arch, 2)
    original = snapshot(base)
    model = method.prepare(base)
    assert isinstance(model, PeftModel)
    opt, _ = train(method, model, steps=5, lr=5e-2)

    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert lora and in_opt == lora
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, original[base_name(n)]), n

    with torch.no_grad():
        adapted = model(input_ids=X).logits
        merged = method.export(model, merge=True)
        merged_logits = merged(input_ids=X).logits
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(m, LoraLayer) or "lora_" in n for n, m in merged.named_modules())
    assert set(dict(merged.named_parameters())) == set(original)
    torch.testing.assert_close(merged_logits, adapted, atol=1e-5, rtol=0)
    assert (adapted - tiny_model(arch, 2)(input_ids=X).logits).abs().max() > 1e-3  # training did change it


def test_lora_unmerged_export_is_the_adapter_model():
    method = build_method("lora", None)
    model = method.prepare(tiny_model("llama", 2))
    assert method.export(model, merge=False) is model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi", "opt", "gemma"])
def test_lora_default_targets_are_exactly_the_linear_layers_of_the_blocks(arch):
    model = tiny_model(arch, 2)
    path, linears = block_linears(model)
    targets = default_targets(model)
    assert isinstance(targets, list) and targets
    with torch.no_grad():
        ref = model(input_ids=X).logits
    peft_model = build_method("lora", None).prepare(model)
    wrapped = {base_name(n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(linears) and all(n.startswith(path + ".") for n in wrapped)
    with torch.no_grad():  # B starts at zero: the adapted model computes what the base did (Conv1D handled)
        torch.testing.assert_close(peft_model(input_ids=X).logits, ref)


def test_lora_targets_stay_in_the_blocks_when_a_name_also_occurs_outside():
    model = tiny_model("llama", 2)
    model.q_proj = torch.nn.Linear(32, 32)  # e.g. a vision tower's projection, same leaf name as the blocks'
    assert isinstance(default_targets(model), str)  # an anchored regex instead of suffix names
    peft_model = build_method("lora", None).prepare(model)
    wrapped = {base_name(n) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert "q_proj" not in wrapped and wrapped == set(block_linears(tiny_model("llama", 2))[1])


def test_lora_unknown_target_lists_the_real_ones():
    with pytest.raises(LisaError, match=r"lora: .*linear layers in the blocks: down_proj, gate_proj"):
        build_method("lora", {"target_modules": ["nope"]}).prepare(tiny_model("llama", 2))


@pytest.mark.parametrize("arch, proj_type", [("llama", "std"), ("llama", "reverse_std"), ("gpt2", "std")])
def test_galore_keeps_low_rank_state_for_block_matrices(arch, proj_type):
    method = build_method("galore", {"rank": 8, "update_proj_gap": 5, "proj_type": proj_type})
    model = method.prepare(tiny_model(arch, 2))
    opt, losses = train(method, model, steps=12)
    assert losses[-1] < 0.9 * losses[0], losses
    galore = [g for g in opt.param_groups if "rank" in g]
    _, linears = block_linears(model)
    assert len(galore) == 1 and {id(p) for p in galore[0]["params"]} == {id(m.weight) for m in linears.values()}
    for p in galore[0]["params"]:
        assert 8 in opt.state[p]["exp_avg"].shape and opt.state[p]["exp_avg"].numel() < p.numel()
        m = opt.state[p]["projector"].ortho_matrix  # its own r rows/columns, not a view of the whole SVD factor
        assert 8 in m.shape and m.untyped_storage().nbytes() == m.numel() * m.element_size()
    everything = {id(p) for g in opt.param_groups for p in g["params"]}
    assert everything == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("rank, projected", [(24, {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
                                              (128, set())])
def test_galore_rank_not_below_a_matrix_side_trains_it_with_plain_adamw(rank, projected):
    # Tiny llama: k/v are 16x32, the rest have a smaller side of 32. reverse_std would crash on a wide
    # matrix whose smaller side <= rank, so this also checks that such matrices are never projected.
    method = build_method("galore", {"rank": rank, "proj_type": "reverse_std"})
    model = method.prepare(tiny_model("llama", 2))
    opt, losses = train(method, model, steps=12)
    assert losses[-1] < 0.9 * losses[0], losses
    _, linears = block_linears(model)
    [galore] = [g for g in opt.param_groups if "rank" in g]
    names = {n.rsplit(".", 1)[-1] for n, m in linears.items() if any(m.weight is p for p in galore["params"])}
    assert names == projected
    everything = {id(p) for g in opt.param_groups for p in g["params"]}
    assert everything == {id(p) for p in model.parameters()}


def test_lisa_freezes_the_blocks_it_did_not_sample_for_an_interval():
    method = build_method("lisa", {"n_layers": 1, "interval": 4, "seed": 1})
    model = method.prepare(tiny_model("llama", 4))
    opt = method.optimizer(model, lr=1e-2, weight_decay=0.0)
    assert isinstance(opt, LisaAdamW)
    lm = find_layers(model)
    active = opt.active_layers
    assert method.status(opt)["active"] == ",".join(map(str, active))
    before = snapshot(model)
    for _ in range(4):  # exactly one interval; the switch happens after its last step
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    for i, block in enumerate(lm.blocks):
        moved = [not torch.equal(before[n], p) for n, p in block]
        assert all(moved) if i in active else not any(moved), (i, active)
    status = method.status(opt)
    assert status["active"] == ",".join(map(str, opt.active_layers)) and status["state_mib"] > 0


def test_lisa_cannot_be_combined_with_lora():
    peft_model = build_method("lora", None).prepare(tiny_model("llama", 2))
    lisa = build_method("lisa", None)
    with pytest.raises(LisaError, match="cannot be combined with a PEFT/LoRA"):
        lisa.prepare(peft_model)
    with pytest.raises(LisaError, match="cannot be combined with a PEFT/LoRA"):
        lisa.optimizer(peft_model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(LisaError, match="cannot be combined with a PEFT/LoRA"):  # nor the merged-away base
        lisa.optimizer(peft_model.get_base_model(), lr=1e-3, weight_decay=0.0)


def test_lora_optimizer_needs_the_prepared_model():
    with pytest.raises(LisaError, match="prepare"):
        build_method("lora", None).optimizer(tiny_model("llama", 2), lr=1e-3, weight_decay=0.0)


def test_options_are_validated_into_their_models():
    assert build_method("lora", {"r": 4}).options == LoraOptions(r=4)
    assert build_method("galore", GaloreOptions(rank=16)).options.rank == 16
    assert build_method("lisa", {"gamma": 3, "K": 7}).options == LisaOptions(n_layers=3, interval=7)
    assert build_method("lisa", None).options == LisaOptions()
    engine = LisaConfig(n_layers=3)
    assert build_method("lisa", engine).options is engine  # the engine's own config is kept as given
    assert set(METHODS) == {"full", "lora", "galore", "lisa"}


def test_lisa_recipe_defaults_and_the_paper_defaults_of_the_engine():
    recipe, paper = LisaOptions(), LisaConfig()
    assert (recipe.embed_head_lr, paper.embed_head_lr) == (0.1, None)
    assert {k: v for k, v in recipe.model_dump().items() if k != "embed_head_lr"} == \
        {k: v for k, v in paper.model_dump().items() if k != "embed_head_lr"}
    assert LisaOptions(embed_head_lr=None).model_dump() == paper.model_dump()
    model = tiny_model("llama", 2)
    opt = build_method("lisa", {"n_layers": 1}).optimizer(model, lr=1e-2, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups[:2]] == [pytest.approx(1e-3)] * 2  # embedding/head, norms
    assert {g["lr"] for g in opt.param_groups[2:]} == {1e-2}  # the blocks


@pytest.mark.parametrize("name, options, message", [
    ("xyz", None, "method 'xyz' is not one of full, lora, galore, lisa"),
    ("lora", {"rank": 4}, "lora: unknown option 'rank' (valid: alpha, base, dropout, r, target_modules)"),
    ("galore", {"r": 4}, "galore: unknown option 'r' (valid: proj_type, rank, scale, update_proj_gap)"),
    ("lisa", {"layers": 4}, "lisa: unknown option 'layers' (valid: "),
    ("full", {"lr": 1}, "full: takes no options (got lr)"),
    ("galore", {"proj_type": "diagonal"}, "galore.proj_type: "),
    ("lora", GaloreOptions(), "lora: options must be LoraOptions, not GaloreOptions"),
])
def test_bad_method_or_option_is_one_clear_line(name, options, message):
    with pytest.raises(LisaError) as e:
        build_method(name, options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)

"""lisa.units: module — each block's attention and MLP sampled as units of their own (#16's third mechanism)."""
import io

import pytest
import torch

from helpers import batches, lisa_and_adamw, params, tiny_model, train
from lisatune import LisaAdamW, LisaError
from lisatune.recipe.config import load_config

# A block's units, and the parameters it shares between them (its norms), in each architecture's own names.
UNITS = {"llama": (["self_attn", "mlp"], ["input_layernorm", "post_attention_layernorm"]),
         "gpt2": (["attn", "mlp"], ["ln_1", "ln_2"]),
         "gpt_neox": (["attention", "mlp"], ["input_layernorm", "post_attention_layernorm"])}


@pytest.mark.parametrize("arch", sorted(UNITS))
def test_each_block_splits_into_its_matrix_submodules(arch):
    opt = LisaAdamW(tiny_model(arch, n_layers=3), units="module", n_layers=2)
    subs, shared = UNITS[arch]
    assert opt.unit_names == [f"block{i}.{s}" for i in range(3) for s in subs]
    path = opt.layers.blocks_path
    for u, name in enumerate(opt.unit_names):
        i, sub = name.removeprefix("block").split(".")
        owners = {n.removeprefix(f"{path}.{i}.").split(".")[0] for n, _ in opt.units.params[u]}
        assert owners == {sub, *shared}
    every = {id(p) for b in opt.layers.blocks for _, p in b}
    assert {id(p) for u in opt.units.params for _, p in u} == every


def test_block_units_are_unchanged_by_default():
    opt = LisaAdamW(tiny_model(n_layers=3), n_layers=2)
    assert opt.unit_names == ["block0", "block1", "block2"]
    assert [[n for n, _ in u] for u in opt.units.params] == [[n for n, _ in b] for b in opt.layers.blocks]


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_only_the_active_units_and_their_blocks_norms_train():
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, units="module", n_layers=3, interval=3, lr=1e-2, seed=1)
    for switch in range(3):
        before = params(model)
        active, blocks = list(opt.active_units), opt.active_blocks
        assert blocks == sorted({int(a.removeprefix("block").split(".")[0]) for a in active})
        train(model, opt, batches(3, seed=switch))
        path = opt.layers.blocks_path
        expect = {n for n, _ in model.named_parameters() if not n.startswith(path + ".")}  # E, H, final norm
        for name in active:
            i, sub = name.removeprefix("block").split(".")
            expect |= {n for n, _ in model.named_parameters() if n.startswith(f"{path}.{i}.{sub}.")
                       or n.startswith(f"{path}.{i}.") and "layernorm" in n}
        assert changed(before, model) == expect, f"switch {switch}: {active}"
    train(model, opt, batches(1))
    held = {opt.name_of(p) for p in opt.state}  # frozen units' state is freed, shared norms' kept
    assert held == {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_norm_shared_across_a_switch_keeps_its_state_and_lr():
    # One block, γ=1 of its 2 units: whenever attention hands over to the MLP the block's norms stay on.
    model = tiny_model(n_layers=1)
    opt = LisaAdamW(model, units="module", n_layers=1, interval=2, lr=1e-2, activation_warmup=1, seed=0)
    norm = model.model.layers[0].input_layernorm.weight
    seq = [opt.sampler.active(s) for s in range(8)]
    hand = next(s for s in range(1, 8) if seq[s] != seq[s - 1])
    train(model, opt, batches(2 * hand))
    assert opt.steps_done == 2 * hand and opt.active_units != [opt.unit_names[u] for u in seq[hand - 1]]
    assert opt.state[norm]["step"] == 2 * hand  # not restarted at the switch
    ramped = {id(p) for g in opt.param_groups[4:] for p in g["params"]}
    stayed = {id(p) for g in opt.param_groups[2:4] for p in g["params"]}
    assert id(norm) in stayed and id(norm) not in ramped
    (u,) = seq[hand]
    assert {id(p) for _, p in opt.units.params[u] if p.ndim >= 2} <= ramped  # the unit that just activated ramps


@pytest.mark.parametrize("interval", [1, 3])
def test_all_units_equal_plain_adamw_bitwise(interval):
    pa, pb, lisa = lisa_and_adamw(3, batches(9), units="module", n_layers=6, interval=interval)
    assert len(lisa.unit_names) == 6
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def setup(seed_model):
    model = tiny_model(n_layers=3, seed=seed_model)
    opt = LisaAdamW(model, units="module", n_layers=2, interval=4, lr=1e-2, weight_decay=0.01,
                    embed_head_lr=0.3, activation_warmup=2, seed=5)
    return model, opt


@pytest.mark.parametrize("at", [8, 9, 11])
def test_resume_with_module_units_is_bitwise(at):
    data = batches(20, seed=4)
    m1, o1 = setup(0)
    train(m1, o1, data)
    m2, o2 = setup(0)
    train(m2, o2, data[:at])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, o3 = setup(7)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    train(m3, o3, data[at:])
    p1, p3 = params(m1), params(m3)
    assert all(torch.equal(p1[n], p3[n]) for n in p1)
    assert o1.history == o3.history


def test_a_block_checkpoint_does_not_resume_module_units():
    sd = LisaAdamW(tiny_model(n_layers=3), n_layers=2).state_dict()
    opt = LisaAdamW(tiny_model(n_layers=3), units="module", n_layers=2)
    with pytest.raises(LisaError, match=r"checkpoint has LISA units='block' but this optimizer has 'module'"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("kw,msg", [
    (dict(units="layer"), r"^lisa.units: Input should be 'block' or 'module'"),
    (dict(units="module", n_layers=7), r"^n_layers \(γ\) = 7 exceeds the 6 block submodules \(units: module\)"),
])
def test_bad_units_are_one_line_errors(kw, msg):
    with pytest.raises(LisaError, match=msg) as e:
        LisaAdamW(tiny_model(n_layers=3), **kw)
    assert "\n" not in str(e.value)


def test_the_run_config_takes_units():
    assert load_config(None).lisa.units == "block"
    assert load_config(None, ["lisa.units=module", "lisa.n_layers=4"]).lisa.units == "module"
    with pytest.raises(LisaError, match=r"^default config: lisa.units: Input should be 'block' or 'module'"):
        load_config(None, ["lisa.units=attention"])

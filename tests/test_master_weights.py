"""Mixed precision built for LISA (#14): fp32 masters and fp32 state for the trained set only, on a bf16 model."""
import io

import pytest
import torch

from helpers import batches, fp32_master_step, params, tiny_model, train
from lisatune import LisaAdamW, LisaError
from lisatune.engine import tensor_bytes

BF16 = torch.bfloat16


def trained(opt):
    """The model's parameters trained now: the always-on set and the active units."""
    always = [p for n, p in opt.layers.embedding + opt.layers.head + opt.layers.norm]
    return always + [p for u in opt.active for _, p in opt.units.params[u]]


def adam_bytes(ps):
    # AdamW on an fp32 master: exp_avg + exp_avg_sq in fp32, plus a 4-byte float32 step counter
    return sum(2 * 4 * p.numel() + 4 for p in ps)


@pytest.mark.parametrize("state_policy", ["drop", "offload", "keep"])
def test_masters_and_state_are_exactly_the_active_sets_at_every_step(state_policy):
    model = tiny_model(n_layers=6, dtype=BF16)
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2, master_weights=True, state_policy=state_policy, seed=1)
    names = {id(p): n for n, p in model.named_parameters()}
    ever = set()
    for step, x in enumerate(batches(24), start=1):
        stepped = {id(p) for p in trained(opt)}
        ever |= stepped
        train(model, opt, [x])
        now = trained(opt)
        assert set(opt.masters()) == {names[id(p)] for p in now}  # a frozen block holds no master
        assert opt.master_bytes() == sum(4 * p.numel() for p in now)
        # drop: a block activated at this switch has no state yet; offload/keep: it has its parked one back
        kept = [p for p in now if id(p) in (stepped if state_policy == "drop" else ever)]
        parked = tensor_bytes(opt.parked_states().values())
        assert opt.state_bytes() == adam_bytes(kept) + (parked if state_policy == "keep" else 0)
        assert opt.offloaded_bytes() == (parked if state_policy == "offload" else 0)
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values())
        masters = {id(m) for m in opt.masters().values()}
        assert all(id(t) in masters for t in opt.state)  # state on the masters, never on the bf16 weights
        in_groups = [id(t) for g in opt.param_groups for t in g["params"]]
        assert sorted(in_groups) == sorted(masters)  # the inner optimizer steps the masters, each once
        for n, m in opt.masters().items():  # between steps a weight is its master rounded
            p = model.get_parameter(n)
            assert p.dtype == BF16 and m.dtype == torch.float32 and torch.equal(p, m.to(BF16))
        for n, p in model.named_parameters():
            if n not in opt.masters():
                assert not p.requires_grad and p.grad is None
    assert len(opt.history) >= 11 and all(h["master_bytes"] > 0 for h in opt.history)
    assert any(not torch.equal(m, model.get_parameter(n).float()) for n, m in opt.masters().items())  # fp32 bits


@pytest.mark.parametrize("interval", [1, 3])
def test_all_layers_equal_a_reference_fp32_master_adamw_bitwise(interval):
    a, b = tiny_model(n_layers=4, dtype=BF16), tiny_model(n_layers=4, dtype=BF16)
    lisa = LisaAdamW(a, n_layers=4, interval=interval, lr=1e-2, weight_decay=0.1, master_weights=True)
    masters = [(p, p.detach().float()) for p in b.parameters()]
    ref = torch.optim.AdamW([{"params": [m for p, m in masters if p.ndim >= 2]},
                             {"params": [m for p, m in masters if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.1)
    plain = tiny_model(n_layers=4, dtype=BF16)
    bf16_only = LisaAdamW(plain, n_layers=4, interval=interval, lr=1e-2, weight_decay=0.1)
    data = batches(12)
    train(a, lisa, data)
    train(plain, bf16_only, data)
    for x in data:
        b(input_ids=x, labels=x).loss.backward()
        fp32_master_step(masters, ref)
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    ref_masters = {n: m for (n, _), (_, m) in zip(b.named_parameters(), masters)}
    assert all(torch.equal(m, ref_masters[n]) for n, m in lisa.masters().items())
    assert any(not torch.equal(pa[n], p) for n, p in params(plain).items())  # masters change the result


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def setup(seed_model, **kw):
    model = tiny_model(n_layers=6, seed=seed_model, dtype=BF16)
    opt = LisaAdamW(model, n_layers=2, interval=4, lr=1e-2, weight_decay=0.01, seed=3, master_weights=True, **kw)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * (1 - s / 40))


@pytest.mark.parametrize("state_policy", ["drop", "offload", "keep"])
@pytest.mark.parametrize("extra", [{}, {"activation_warmup": 2, "embed_head_lr": 0.5}])
def test_resume_mid_interval_is_bitwise(state_policy, extra):
    kw = dict(state_policy=state_policy, **extra)
    data = batches(26, seed=2)
    m1, o1, s1 = setup(0, **kw)
    train(m1, o1, data, s1)

    m2, o2, s2 = setup(0, **kw)
    train(m2, o2, data[:17], s2)
    ckpt = save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()})
    assert set(ckpt["opt"]["lisa"]["masters"]) == set(o2.masters())
    # the masters carry bits the bf16 weights lack, so re-making them from the weights would not resume exactly
    assert any(not torch.equal(m, m2.get_parameter(n).float()) for n, m in o2.masters().items())
    m3, o3, s3 = setup(99, **kw)  # fresh objects, other weights
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    train(m3, o3, data[17:], s3)
    p1, p3 = params(m1), params(m3)
    assert all(torch.equal(p1[n], p3[n]) for n in p1)
    assert all(torch.equal(m, o3.masters()[n]) for n, m in o1.masters().items())
    assert o1.history == o3.history and o1.state_bytes() == o3.state_bytes()


def test_an_offloaded_state_is_restored_onto_the_fresh_master():
    model = tiny_model(n_layers=3, dtype=BF16)
    opt = LisaAdamW(model, n_layers=1, interval=1, lr=1e-3, state_policy="offload", policy="cyclic",
                    master_weights=True)
    train(model, opt, batches(3))  # every block once; the next cycle reactivates a parked one
    name, p = opt.layers.blocks[opt.active_layers[0]][0]
    assert name in opt.masters() and name not in opt.parked_states()
    st = opt.state[opt.masters()[name]]
    assert int(st["step"]) == 1 and st["exp_avg"].dtype == torch.float32
    train(model, opt, batches(1, seed=5))
    assert int(opt.state.get(opt.masters().get(name), opt.parked_states().get(name))["step"]) == 2


def test_a_sampled_tied_embedding_gets_one_master_while_active():
    model = tiny_model("gemma", n_layers=2, dtype=BF16)
    opt = LisaAdamW(model, n_layers=1, interval=1, sample_embed_head=True, policy="cyclic", master_weights=True)
    emb = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    seen = set()
    for x in batches(3):
        seen.add(emb in opt.masters())
        assert (emb in opt.masters()) == ("embed_head" in opt.active_names)
        train(model, opt, [x])
    assert seen == {True, False}


def test_closure_and_zero_grad():
    a, b = tiny_model(dtype=BF16), tiny_model(dtype=BF16)
    oa = LisaAdamW(a, n_layers=2, interval=2, lr=1e-2, master_weights=True)
    ob = LisaAdamW(b, n_layers=2, interval=2, lr=1e-2, master_weights=True)
    for x in batches(4):
        def closure():
            ob.zero_grad()
            loss = b(input_ids=x, labels=x).loss
            loss.backward()
            return loss
        train(a, oa, [x])
        assert all(p.grad is None for p in a.parameters())
        assert torch.is_tensor(ob.step(closure))
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    x = batches(1)[0]
    a(input_ids=x, labels=x).loss.backward()
    oa.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in a.parameters())


def test_weights_loaded_after_the_optimizer_was_built_replace_its_masters():
    a, b = tiny_model(dtype=BF16), tiny_model(seed=7, dtype=BF16)
    oa = LisaAdamW(a, n_layers=2, interval=2, lr=1e-2, master_weights=True)
    a.load_state_dict(b.state_dict())  # e.g. a checkpoint's weights, without its optimizer state
    ob = LisaAdamW(b, n_layers=2, interval=2, lr=1e-2, master_weights=True)
    data = batches(5)
    train(a, oa, data)
    train(b, ob, data)
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.parametrize("dtype,kw,msg", [
    (torch.float32, {}, r"^master_weights needs bfloat16 weights, but model.embed_tokens.weight is torch.float32 "),
    (torch.float16, {}, r"^master_weights needs bfloat16 weights, but model.embed_tokens.weight is torch.float16 "),
    (BF16, {"master_weights": "yes"}, r"^master_weights must be true or false \(got 'yes'\)$"),
    (BF16, {"activation_warmup": 30}, r"^lisa.activation_warmup: must be <= interval"),
])
def test_bad_settings_are_one_line_errors(dtype, kw, msg):
    with pytest.raises(LisaError, match=msg) as e:
        LisaAdamW(tiny_model(dtype=dtype), **{"master_weights": True, **kw})
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_masters_is_refused():
    model = tiny_model(dtype=BF16)
    plain = LisaAdamW(model, n_layers=2, interval=2)
    mixed = LisaAdamW(tiny_model(dtype=BF16), n_layers=2, interval=2, master_weights=True)
    with pytest.raises(LisaError, match=r"^checkpoint has LISA master_weights=False but this optimizer has True: "
                                        r"resume with the options it was saved with$"):
        mixed.load_state_dict(plain.state_dict())
    with pytest.raises(LisaError, match=r"^checkpoint has LISA master_weights=True but this optimizer has False: "
                                        r"resume with the options it was saved with$"):
        plain.load_state_dict(mixed.state_dict())

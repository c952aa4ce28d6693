"""LisaAdamW: equivalence with AdamW, which weights move, bytes held, exact resume, clear errors."""
import io

import pytest
import torch

from helpers import batches, lisa_and_adamw, params, tiny_model, train
from lisatune import LisaAdamW, LisaConfig, LisaError


def block_of(name, lm):
    prefix = lm.blocks_path + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


@pytest.mark.parametrize("interval", [1, 3, 50])
@pytest.mark.parametrize("policy", ["uniform", "cyclic"])
def test_all_layers_and_any_interval_equal_plain_adamw_bitwise(interval, policy):
    pa, pb, _ = lisa_and_adamw(4, batches(20), n_layers=4, interval=interval, policy=policy)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], params(tiny_model(n_layers=4))[n]) for n in pa)  # it did train


def test_only_sampled_layers_move_and_embedding_head_move_every_step():
    model = tiny_model(n_layers=6)
    opt = LisaAdamW(model, n_layers=2, interval=5, lr=1e-2)
    lm = opt.layers
    data = batches(50, seed=1)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for s in range(10):
        active = set(opt.active_layers)
        assert len(active) == 2
        start = params(model)
        for x in data[5 * s:5 * s + 5]:
            e0, h0 = emb.detach().clone(), head.detach().clone()
            train(model, opt, [x])
            assert not torch.equal(emb, e0) and not torch.equal(head, h0)
        end = params(model)
        for n in start:
            b = block_of(n, lm)
            if b is None:
                continue
            if b in active:
                assert not torch.equal(start[n], end[n]), f"{n} was active in interval {s} but did not change"
            else:
                assert torch.equal(start[n], end[n]), f"{n} was frozen in interval {s} but changed"
                assert model.get_parameter(n).grad is None
    counts = opt.activation_counts()
    assert sum(counts.values()) == 2 * 11  # 10 intervals + the set drawn at step 50
    assert [h["step"] for h in opt.history] == [5 * s for s in range(11)]  # never at steps 0 and 1 both


def test_layers_sampled_later_are_in_the_optimizer():
    model = tiny_model(n_layers=6)
    opt = LisaAdamW(model, n_layers=1, interval=1, lr=1e-2, seed=4)
    moved = set()
    for x in batches(40):
        start = params(model)
        active = opt.active_layers[0]
        train(model, opt, [x])
        moved |= {block_of(n, opt.layers) for n in start if not torch.equal(start[n], model.get_parameter(n))}
        in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
        assert all(id(p) in in_groups for _, p in opt.layers.blocks[opt.active_layers[0]])
    assert moved - {None} == set(range(6))


def ideal_bytes(params_with_state):
    # AdamW: exp_avg + exp_avg_sq like the parameter, plus a 4-byte float32 step counter
    return sum(2 * p.numel() * p.element_size() + 4 for p in params_with_state)


def held_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def test_drop_policy_holds_exactly_the_active_sets_state_over_many_switches():
    model = tiny_model(n_layers=6)
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-3)
    always = [p for g in opt.param_groups[:2] for p in g["params"]]
    before_switch = []
    for step, x in enumerate(batches(40), start=1):
        prev = [p for _, p in opt.layers.blocks[0][:0]] + [p for u in opt.active_layers for _, p in opt.layers.blocks[u]]
        train(model, opt, [x])
        now = {id(p) for u in opt.active_layers for _, p in opt.layers.blocks[u]}
        kept = [p for p in prev if id(p) in now]  # at a switch only layers that stay active keep state
        assert held_bytes(opt) == opt.state_bytes() == ideal_bytes(always + kept)
        in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
        assert all(id(p) in in_groups for p in opt.state)
        if step % 3 == 2:
            before_switch.append(held_bytes(opt))
    assert len(before_switch) >= 10 and len(set(before_switch)) == 1
    assert before_switch[0] == ideal_bytes(always + [p for _, p in opt.layers.blocks[0] + opt.layers.blocks[1]])
    assert max(h["state_bytes"] for h in opt.history) == before_switch[0]


def test_keep_grows_and_offload_moves_state_off_the_active_set():
    peaks = {}
    for policy in ("drop", "keep", "offload"):
        model = tiny_model(n_layers=6)
        opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-3, state_policy=policy, seed=1)
        train(model, opt, batches(31))  # mid-interval: every block has been active before
        peaks[policy] = (opt.state_bytes(), opt.offloaded_bytes())
    assert peaks["offload"][0] == peaks["drop"][0] and peaks["drop"][1] == 0
    assert peaks["offload"][1] > 0
    assert peaks["keep"][0] == peaks["drop"][0] + peaks["offload"][1]


def test_offloaded_state_is_restored_on_reactivation():
    model = tiny_model(n_layers=3)
    opt = LisaAdamW(model, n_layers=1, interval=1, lr=1e-3, state_policy="offload", policy="cyclic")
    data = batches(7)
    train(model, opt, data[:2])
    parked = dict(opt.parked_states())
    assert len(parked) == 2 * 9 and all(int(st["step"]) == 1 for st in parked.values())  # 2 blocks of 9 tensors
    train(model, opt, data[2:3])  # the third block's turn; then a new cycle reactivates a parked block
    p = opt.layers.blocks[opt.active_layers[0]][0][1]
    assert int(opt.state[p]["step"]) == 1 and opt.name_of(p) not in opt.parked_states()
    train(model, opt, data[3:4])
    st = opt.state[p] if p in opt.state else opt.parked_states()[opt.name_of(p)]
    assert int(st["step"]) == 2  # continued, not restarted



@pytest.mark.parametrize("policy", ["keep", "offload"])
def test_to_moves_state_and_kept_state_but_not_offloaded_state_or_step_counters(policy):
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=1, interval=2, lr=1e-3, state_policy=policy, seed=1)
    train(model, opt, batches(5))  # past two switches: active and parked state exist
    assert opt.parked_states() and opt.state
    assert opt.to("meta") is opt  # stands for .to("cuda") (masters cannot go to meta: .data keeps its kind)
    assert all(p.device.type == "meta" for p in model.parameters())
    where = {k: {v.device.type for st in opt.state.values() for k2, v in st.items() if k2 == k}
             for k in ("step", "exp_avg", "exp_avg_sq")}
    assert where == {"step": {"cpu"}, "exp_avg": {"meta"}, "exp_avg_sq": {"meta"}}
    parked = {(k, v.device.type) for st in opt.parked_states().values() for k, v in st.items()}
    moments = "meta" if policy == "keep" else "cpu"
    assert parked == {("step", "cpu"), ("exp_avg", moments), ("exp_avg_sq", moments)}


def test_move_state_moves_one_states_tensors_in_place_but_never_the_step_counter():
    from lisatune.engine.parking import move_state
    step, other = torch.tensor(3.0), object()
    st = {"step": step, "exp_avg": torch.ones(2), "note": other}
    assert move_state(st, "meta") is st
    assert st["step"] is step and st["note"] is other and st["exp_avg"].device.type == "meta"

def snapshot(model, opt, sched):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    return buf


def lisa_setup(seed_model, **kw):
    model = tiny_model(n_layers=6, seed=seed_model)
    opt = LisaAdamW(model, n_layers=2, interval=4, lr=1e-2, weight_decay=0.01, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * (1 - s / 40))
    return model, opt, sched


@pytest.mark.parametrize("state_policy", ["drop", "offload", "keep"])
@pytest.mark.parametrize("policy,probs", [("uniform", None), ("bernoulli", [0.2, 0.5, 0.9, 0.1, 0.3, 0.6]),
                                          ("weighted", [1, 2, 3, 4, 5, 6]), ("cyclic", None)])
def test_resume_mid_interval_reproduces_the_uninterrupted_run_bitwise(policy, probs, state_policy):
    kw = dict(policy=policy, probabilities=probs, state_policy=state_policy, seed=3)
    data = batches(30, seed=2)
    m1, o1, s1 = lisa_setup(0, **kw)
    train(m1, o1, data, s1)

    m2, o2, s2 = lisa_setup(0, **kw)
    train(m2, o2, data[:17], s2)
    ckpt = torch.load(snapshot(m2, o2, s2), weights_only=True)
    m3, o3, s3 = lisa_setup(99, **kw)  # fresh objects, different initial weights
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    assert o3.active_layers == o2.active_layers and o3.steps_done == 17
    train(m3, o3, data[17:], s3)

    p1, p3 = params(m1), params(m3)
    assert all(torch.equal(p1[n], p3[n]) for n in p1)
    assert o1.history == o3.history
    assert o1.state_bytes() == o3.state_bytes()


def test_resume_with_different_sampling_settings_is_refused():
    model, opt, _ = lisa_setup(0, seed=1)
    other, opt2, _ = lisa_setup(0, seed=2)
    with pytest.raises(LisaError, match="checkpoint has LISA seed=1 but this optimizer has 2"):
        opt2.load_state_dict(opt.state_dict())
    with pytest.raises(LisaError, match="not a LisaAdamW state dict"):
        opt2.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_gradient_accumulation_switches_only_at_optimizer_steps():
    a, b = tiny_model(), tiny_model()
    # SGD is linear in the gradient, so accumulated and whole-batch steps agree to float error
    oa = LisaAdamW(a, n_layers=2, interval=2, lr=0.5, optimizer_cls="sgd")
    ob = LisaAdamW(b, n_layers=2, interval=2, lr=0.5, optimizer_cls="sgd")
    data = batches(16, batch=2)
    train(a, oa, data, accum=2)  # 8 optimizer steps of 2 micro-batches
    halves = [torch.cat([data[i], data[i + 1]]) for i in range(0, 16, 2)]
    train(b, ob, halves)  # the same 8 steps on the concatenated batches
    assert [h["active"] for h in oa.history] == [h["active"] for h in ob.history]
    pa, pb = params(a), params(b)
    assert all(torch.allclose(pa[n], pb[n], atol=5e-5) for n in pa)
    assert any(not torch.allclose(pa[n], p0, atol=1e-3) for n, p0 in params(tiny_model()).items())


def test_zero_probabilities_train_only_the_always_on_set():
    # The embedding/head-only control of the ablations study: Algorithm 1 with every p_l = 0.
    model = tiny_model(n_layers=4)
    before = params(model)
    opt = LisaAdamW(model, policy="bernoulli", probabilities=[0.0] * 4, interval=2, lr=1e-2)
    train(model, opt, batches(6))
    moved = {n for n, p in params(model).items() if not torch.equal(p, before[n])}
    assert list(opt.active_layers) == [] and moved
    assert all(block_of(n, opt.layers) is None for n in moved)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= moved
    assert opt.state_bytes() > 0


def test_embedding_head_norm_are_options():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=1, train_embedding=False, train_head=False, train_norm=False)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    assert opt.trainable_parameters() == sum(p.numel() for _, p in opt.layers.blocks[0])
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_embedding_and_head_can_be_sampled_like_a_block():
    model = tiny_model(n_layers=3)
    opt = LisaAdamW(model, n_layers=1, interval=1, sample_embed_head=True, policy="cyclic")
    assert opt.unit_names[-1] == "embed_head"
    seen = set()
    for x in batches(4):
        emb_on = model.get_input_embeddings().weight.requires_grad
        seen.add(emb_on)
        assert emb_on == ("embed_head" in opt.active_names)
        train(model, opt, [x])
    assert seen == {True, False}


def test_tied_embedding_is_one_tensor_counted_once():
    model = tiny_model("gemma", n_layers=2)
    opt = LisaAdamW(model, n_layers=2)
    emb = model.get_input_embeddings().weight
    assert sum(p is emb for g in opt.param_groups for p in g["params"]) == 1
    with pytest.raises(LisaError, match="tied"):
        LisaAdamW(tiny_model("gemma", 2), n_layers=1, train_head=False)


def test_weight_decay_exempts_biases_and_norm_weights():
    model = tiny_model("gpt2", n_layers=2)
    opt = LisaAdamW(model, n_layers=2, weight_decay=0.1)
    named = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            exempt = named[id(p)].endswith("bias") or ".ln_" in named[id(p)]
            assert (g["weight_decay"] == 0.0) == exempt, named[id(p)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_inner_optimizers_and_bf16(dtype):
    model = tiny_model(dtype=dtype)
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-1, optimizer_cls="sgd", optimizer_kwargs={"momentum": 0.9})
    w0 = params(model)
    train(model, opt, batches(5))
    assert isinstance(opt.inner, torch.optim.SGD)
    moms = [st["momentum_buffer"] for st in opt.state.values()]
    assert moms and all(m.dtype == dtype for m in moms)
    assert opt.state_bytes() == sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"]
                                    if p in opt.state)
    assert any(not torch.equal(w0[n], p) for n, p in model.named_parameters())


def test_8bit_adamw_where_bitsandbytes_works():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model()
    try:
        opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2, optimizer_cls="adamw8bit")
        train(model, opt, batches(4))
    except (RuntimeError, NotImplementedError, AttributeError) as e:  # no CPU kernels in this build
        pytest.skip(f"bitsandbytes {bnb.__version__} 8-bit AdamW does not run here: {e}")
    assert opt.state_bytes() > 0


def test_lr_scheduler_drives_all_groups():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(model, opt, batches(5), sched)
    assert [g["lr"] for g in opt.param_groups] == [0.5 ** 5] * 4
    assert opt.inner.param_groups is opt.param_groups


@pytest.mark.parametrize("kw,msg", [
    (dict(n_layers=7), r"n_layers \(γ\) = 7 exceeds the 6 transformer blocks found at model.layers"),
    (dict(n_layers=0), r"n_layers \(γ\) = 0 must be between 1"),
    (dict(interval=0), r"lisa.interval: .*must be >= 1"),
    (dict(policy="bernoulli", probabilities=[0.5, 0.5, 2, 0.5, 0.5, 0.5]), r"probabilities\[2\] = 2.0 is outside \[0, 1\]"),
    (dict(blocks_path="model.blocks"), "blocks_path 'model.blocks' not found"),
    (dict(lisa_layers=2), r"unknown option 'lisa_layers' \(valid: activation_warmup, blocks_path, embed_head_lr, embed_head_state, frozen_weights, interval, n_layers"),
    (dict(optimizer_cls="nope"), "optimizer 'nope' not found"),
])
def test_bad_settings_are_rejected(kw, msg):
    with pytest.raises(LisaError, match=msg):
        LisaAdamW(tiny_model(), **kw)


def test_swift_names_for_gamma_and_k_are_accepted():
    cfg = LisaConfig.build(lisa_activated_layers=3, lisa_step_interval=7)
    assert (cfg.n_layers, cfg.interval) == (3, 7)


def test_lisa_on_a_lora_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LisaError, match="cannot be combined with a PEFT/LoRA"):
        LisaAdamW(model, n_layers=2)


def test_probabilities_from_a_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"probabilities": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}')
    opt = LisaAdamW(tiny_model(), policy="bernoulli", probabilities=str(f))
    assert opt.sampler.p.tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    bad = tmp_path / "p.txt"
    bad.write_text("0.1\nzero\n")
    with pytest.raises(LisaError, match=r"p.txt: entry 2 \('zero'\) is not a number"):
        LisaAdamW(tiny_model(), policy="bernoulli", probabilities=str(bad))


def test_observability():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2)
    train(model, opt, batches(6))
    h = opt.history[-1]
    assert set(h) == {"switch", "step", "active", "trainable_params", "state_bytes"}
    assert h["active"] == opt.active_layers
    norms = opt.layer_norms()
    assert list(norms) == ["embedding"] + [f"block{i}" for i in range(6)] + ["head", "norm"]
    assert norms["embedding"] == pytest.approx(model.get_input_embeddings().weight.norm().item(), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("inf")), r"^lr must be a finite number > 0 \(got inf\)$"),
    (dict(lr=0.0), r"^lr must be a finite number > 0 \(got 0.0\)$"),
    (dict(weight_decay=float("nan")), r"^weight_decay must be a finite number >= 0 \(got nan\)$"),
    (dict(eps=-1e-8), r"^eps must be a finite number > 0 \(got -1e-08\)$"),
    (dict(betas=(0.9, 1.0)), r"^betas must each be in \[0, 1\) \(got \(0.9, 1.0\)\)$"),
    (dict(lr=True), r"^lr must be a finite number > 0 \(got True\)$"),
])
def test_the_constructor_checks_what_the_config_checks(kwargs, message):
    """#29: LisaAdamW(lr=inf) used to be accepted (torch's AdamW takes inf and nan); the config refused it."""
    with pytest.raises(LisaError, match=message):
        LisaAdamW(tiny_model(n_layers=2), n_layers=1, **kwargs)

"""The lr options of LISA (#16): embed_head_lr (a multiplier for the always-on set) and activation_warmup
(an lr ramp for blocks that have just been activated), their resume, and their errors."""
import io

import pytest
import torch

from helpers import batches, lisa_and_adamw, params, tiny_model, train
from lisatune import LisaAdamW, LisaError
from lisatune.methods import build_method
from lisatune.recipe.config import load_config


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def ramp(t):
    return min(1.0, (t + 1) / 5) * (1 - t / 40)


# -- embed_head_lr --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [None, 1.0])
def test_a_neutral_multiplier_leaves_every_group_at_the_lr(m):
    opt = LisaAdamW(tiny_model(), n_layers=2, lr=1e-2, embed_head_lr=m)
    assert lrs(opt) == [1e-2] * 4


def test_embed_head_lr_reaches_the_always_on_groups_only():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2, embed_head_lr=0.1)
    assert lrs(opt) == [1e-2 * 0.1] * 2 + [1e-2] * 2
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    always = {id(p) for g in opt.param_groups[:2] for p in g["params"]}
    assert {id(emb), id(head), id(model.model.norm.weight)} <= always
    train(model, opt, batches(5))  # switches keep the sampled groups at the run's lr
    assert lrs(opt) == [1e-2 * 0.1] * 2 + [1e-2] * 2
    assert all(id(p) not in always for g in opt.param_groups[2:] for p in g["params"])


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, ramp),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
])
def test_a_scheduler_keeps_the_ratio(make):
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, embed_head_lr=0.25, activation_warmup=2)
    sched = make(opt)
    for x in batches(10):
        train(model, opt, [x], sched)
        g = lrs(opt)
        assert g[0] == g[1] and g[2] == g[3] == g[4] == g[5] and g[2] > 0
        assert g[0] == pytest.approx(0.25 * g[2], rel=1e-12)
    assert lrs(opt)[2] < 1e-2  # it did schedule


def test_embed_head_lr_survives_a_state_dict_round_trip():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2, embed_head_lr=3.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    train(model, opt, batches(3), sched)
    other = LisaAdamW(tiny_model(seed=5), n_layers=2, interval=2, lr=1e-2, embed_head_lr=3.0)
    other.load_state_dict(torch.load(save(opt.state_dict()), weights_only=True))
    assert lrs(other) == lrs(opt)
    with pytest.raises(LisaError, match=r"^checkpoint has LISA embed_head_lr=3.0 but this optimizer has 2.0: "
                                        r"resume with the options it was saved with$"):
        LisaAdamW(tiny_model(), n_layers=2, interval=2, lr=1e-2, embed_head_lr=2.0).load_state_dict(opt.state_dict())


def test_a_run_of_the_paper_lisa_resumes_only_with_the_paper_option():
    # lisatune train's `lisa:` default is embed_head_lr 0.1; a run saved with the paper's LISA says how to resume
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2)
    train(model, opt, batches(3))
    sd = opt.state_dict()
    with pytest.raises(LisaError, match=r"^checkpoint has LISA embed_head_lr=None but this optimizer has 0.1: "):
        build_method("lisa", {"n_layers": 2, "interval": 2}).optimizer(tiny_model(), lr=1e-2).load_state_dict(sd)
    build_method("lisa", {"n_layers": 2, "interval": 2, "embed_head_lr": None}).optimizer(
        tiny_model(), lr=1e-2).load_state_dict(sd)


def test_a_checkpoint_from_before_the_options_loads():
    model = tiny_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2)
    train(model, opt, batches(3))
    sd = opt.state_dict()
    for key in ("embed_head_lr", "activation_warmup"):
        del sd["lisa"][key]
    LisaAdamW(tiny_model(), n_layers=2, interval=2, lr=1e-2).load_state_dict(sd)
    LisaAdamW(tiny_model(), n_layers=2, interval=2, lr=1e-2, embed_head_lr=1.0).load_state_dict(sd)
    with pytest.raises(LisaError, match="activation_warmup=0 but this optimizer has 1"):
        LisaAdamW(tiny_model(), n_layers=2, interval=2, lr=1e-2, activation_warmup=1).load_state_dict(sd)


# -- activation_warmup ----------------------------------------------------------------------------------------
def expected_lr(opt, sched_lr, step, unit):
    """The docstring's sequence: lr_t · (j+1)/(N+1) for the first N steps after activation, then lr_t."""
    k, n = opt.config.interval, opt.config.activation_warmup
    s, j = divmod(step, k)
    activated = s == 0 or unit not in opt.sampler.active(s - 1)
    return sched_lr * ((j + 1) / (n + 1)) if activated and j < n else sched_lr


def record_lrs(opt):
    """The lr each unit's parameters see inside the inner optimizer's step, per step."""
    seen = []
    inner_step = opt.inner.step

    def step(closure=None):
        group_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        seen.append({u: {group_of[id(p)] for _, p in opt.units.params[u]} for u in opt.active})
        seen[-1]["always"] = {group_of[id(p)] for g in opt.param_groups[:2] for p in g["params"]}
        return inner_step(closure)

    opt.inner.step = step
    return seen


@pytest.mark.parametrize("policy", ["uniform", "bernoulli"])
def test_activation_warmup_gives_the_documented_lr_of_each_block(policy):
    model = tiny_model(n_layers=4)
    probs = [0.9, 0.6, 0.5, 0.3] if policy == "bernoulli" else None
    opt = LisaAdamW(model, n_layers=3, interval=4, lr=1e-2, activation_warmup=2, embed_head_lr=0.5,
                    policy=policy, probabilities=probs, seed=2)
    assert len(opt.param_groups) == 6
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    seen = record_lrs(opt)
    sched_lrs, fresh, kept = [], set(), set()
    for t, x in enumerate(batches(24)):
        always_lr = sched.get_last_lr()[0]
        sched_lrs.append(sched.get_last_lr()[2])
        train(model, opt, [x], sched)
        assert lrs(opt) == sched.get_last_lr()  # never left scaled
        s = t // 4
        for u in opt.sampler.active(s):
            assert seen[t][u] == {expected_lr(opt, sched_lrs[t], t, u)}, (t, u)
            (fresh if s == 0 or u not in opt.sampler.active(s - 1) else kept).add((s, u))
        assert seen[t]["always"] == {always_lr} and always_lr == pytest.approx(0.5 * sched_lrs[t], rel=1e-12)
    switches = {s for s, _ in fresh if s > 0}
    assert len(switches) >= 2 and {s for s, _ in kept} & switches  # re-sampled blocks not re-warmed, ≥2 switches
    # the ramp itself, on the first steps: 1/3, 2/3, then the schedule
    u = opt.sampler.active(0)[0]
    assert [seen[t][u] for t in range(3)] == [{sched_lrs[0] * (1 / 3)}, {sched_lrs[1] * (2 / 3)}, {sched_lrs[2]}]


def test_activation_warmup_of_a_whole_interval():
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=1, interval=3, lr=1e-2, activation_warmup=3, policy="cyclic")
    seen = record_lrs(opt)
    train(model, opt, batches(9))
    for t in range(9):
        (u,) = opt.sampler.active(t // 3)
        assert seen[t][u] == {1e-2 * ((t % 3 + 1) / 4)}


def test_all_blocks_with_warmup_equal_adamw_ramped_once_bitwise():
    # γ = N_L: every block is activated at switch 0 only, so it ramps on the first N steps and never again.
    a, b = tiny_model(n_layers=4), tiny_model(n_layers=4)
    lisa = LisaAdamW(a, n_layers=4, interval=3, lr=1e-2, weight_decay=0.1, activation_warmup=2)
    lm = lisa.layers
    blocks = {id(p) for blk in lm.blocks for _, p in blk}
    named = list(b.named_parameters())
    ida = {n: id(p) for n, p in a.named_parameters()}
    sel = lambda blk, dec: [p for n, p in named if (ida[n] in blocks) == blk and (p.ndim >= 2) == dec]
    ref = torch.optim.AdamW([{"params": sel(False, True)}, {"params": sel(False, False), "weight_decay": 0.0},
                             {"params": sel(True, True)}, {"params": sel(True, False), "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.1)
    for t, x in enumerate(batches(10)):
        train(a, lisa, [x])
        for g in ref.param_groups[2:]:
            g["lr"] = 1e-2 * ((t + 1) / 3) if t < 2 else 1e-2
        train(b, ref, [x])
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.parametrize("m", [None, 1.0])
@pytest.mark.parametrize("interval", [1, 3])
def test_all_blocks_without_the_options_equal_plain_adamw_bitwise(m, interval):
    pa, pb, lisa = lisa_and_adamw(4, batches(12), n_layers=4, interval=interval, embed_head_lr=m,
                                  activation_warmup=0)
    assert len(lisa.param_groups) == 4
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


# -- resume ---------------------------------------------------------------------------------------------------
def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def setup(seed_model, **kw):
    model = tiny_model(n_layers=6, seed=seed_model)
    opt = LisaAdamW(model, n_layers=3, interval=4, lr=1e-2, weight_decay=0.01, embed_head_lr=0.3,
                    activation_warmup=2, seed=3, **kw)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, ramp)


@pytest.mark.parametrize("state_policy", ["drop", "offload"])
@pytest.mark.parametrize("at", [16, 17, 18])  # at a switch, inside the ramp, after it
def test_resume_with_the_options_is_bitwise(at, state_policy):
    data = batches(26, seed=2)
    m1, o1, s1 = setup(0, state_policy=state_policy)
    train(m1, o1, data, s1)

    m2, o2, s2 = setup(0, state_policy=state_policy)
    train(m2, o2, data[:at], s2)
    ckpt = torch.load(save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}),
                      weights_only=True)
    m3, o3, s3 = setup(99, state_policy=state_policy)  # fresh objects, other weights
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    assert [g["params"] for g in o3.param_groups] == [[m3.get_parameter(o2._name[id(p)]) for p in g["params"]]
                                                       for g in o2.param_groups]
    train(m3, o3, data[at:], s3)
    p1, p3 = params(m1), params(m3)
    assert all(torch.equal(p1[n], p3[n]) for n in p1)
    assert o1.history == o3.history and lrs(o1) == lrs(o3)


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(embed_head_lr=0), r"lisa.embed_head_lr: must be a finite multiplier of the lr > 0 .*\(got 0\)"),
    (dict(embed_head_lr=-0.5), r"lisa.embed_head_lr: must be a finite multiplier .*\(got -0.5\)"),
    (dict(embed_head_lr=float("nan")), r"lisa.embed_head_lr: must be a finite multiplier .*\(got nan\)"),
    (dict(embed_head_lr=float("inf")), r"lisa.embed_head_lr: must be a finite multiplier .*\(got inf\)"),
    (dict(embed_head_lr=True), r"lisa.embed_head_lr: must be a number .*not a boolean"),
    (dict(embed_head_lr="fast"), r"lisa.embed_head_lr: Input should be a valid number"),
    (dict(activation_warmup=-1), r"lisa.activation_warmup: must be >= 0"),
    (dict(activation_warmup=5, interval=4), r"lisa.activation_warmup: must be <= interval \(K\) = 4: .*\(got 5\)"),
    (dict(activation_warmup=1.5), r"lisa.activation_warmup: Input should be a valid integer"),
    (dict(activation_warmup=True), r"lisa.activation_warmup: Input should be a valid integer"),
])
def test_bad_values_are_one_line_errors_naming_the_field(kw, msg):
    with pytest.raises(LisaError, match=msg) as e:
        LisaAdamW(tiny_model(), **kw)
    assert "\n" not in str(e.value)


def test_the_run_config_takes_the_options():
    cfg = load_config(None, ["lisa.embed_head_lr=0.1", "lisa.activation_warmup=3"])
    assert (cfg.lisa.embed_head_lr, cfg.lisa.activation_warmup) == (0.1, 3)
    assert load_config(None).lisa.embed_head_lr == 0.1  # lisatune train's default since study 4
    assert load_config(None, ["lisa.embed_head_lr=null"]).lisa.embed_head_lr is None  # the paper's LISA
    with pytest.raises(LisaError, match=r"^default config: lisa.activation_warmup: must be <= interval \(K\) = 5"):
        load_config(None, ["lisa.activation_warmup=6"])
    with pytest.raises(LisaError, match=r"^default config: lisa.embed_head_lr: must be a finite"):
        load_config(None, ["lisa.embed_head_lr=-1"])

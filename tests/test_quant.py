"""Quantized memory (#14 item 2, #15): 8-bit optimizer state for the always-on set (bitsandbytes AdamW8bit)."""
import io
import math
import sys

import pytest
import torch
import transformers as T

from conftest import batches
import lisatune.quant  # noqa: F401  (installs lisa.frozen_weights)
from lisatune import LisaAdamW, LisaError
from lisatune.analysis.tiny import tiny_config

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 300  # embedding and head 300 x 32 = 9600 values: over bitsandbytes' 4096 (8-bit), 37.5 blocks of 256


def wide_model(n_layers=4, seed=0, dtype=torch.float32):
    """The tiny llama with a vocabulary large enough for bitsandbytes to quantize its embedding and head."""
    cfg = tiny_config("llama", n_layers)
    cfg.vocab_size = VOCAB
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()


def train(model, opt, data, sched=None):
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        if sched:
            sched.step()
        opt.zero_grad()
    return losses


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def always_on(opt):
    return [p for _, p in opt.layers.embedding + opt.layers.head + opt.layers.norm]


def eight_bit_bytes(ps):
    """bitsandbytes' AdamW8bit layout: a tensor of n >= 4096 values holds two uint8 moments (2n bytes) and two
    fp32 absmax per block of 256 values; smaller ones two fp32 moments (8n); the int step is no tensor; the two
    256-entry fp32 quantization maps are shared by all 8-bit tensors (2 KiB once)."""
    big = [p.numel() for p in ps if p.numel() >= 4096]
    small = [p.numel() for p in ps if p.numel() < 4096]
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in big) + 8 * sum(small) + (2 * 256 * 4 if big else 0)


def adam_bytes(ps):
    return sum(2 * 4 * p.numel() + 4 for p in ps)  # torch AdamW: two fp32 moments and an fp32 step tensor


def test_state_bytes_are_8bit_for_the_always_on_set_and_fp32_for_blocks_at_every_step():
    model = wide_model()
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, embed_head_state="8bit", seed=1)
    assert opt.state_bytes() == 0
    for x in batches(12, vocab=VOCAB):
        stepped = [p for u in opt._active for _, p in opt._units[u]]
        train(model, opt, [x])
        kept = [p for p in stepped if any(p is q for u in opt._active for _, q in opt._units[u])]
        assert opt.state_bytes() == eight_bit_bytes(always_on(opt)) + adam_bytes(kept)
        assert opt.history[-1]["state_bytes"] >= opt.state_bytes()
    emb = opt.layers.embedding[0][1]
    st = opt.embed_head_optimizer.state[emb]
    assert st["state1"].dtype == st["state2"].dtype == torch.uint8 and st["absmax1"].numel() == 38
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())  # blocks: fp32 AdamW
    assert not any(p in opt.state for p in always_on(opt))
    # SmolLM2's embedding on paper: 49152 x 576 values
    n = 49152 * 576
    assert eight_bit_bytes([torch.empty(n, device="meta")]) / n == pytest.approx(2.03125, abs=1e-4)


def test_loss_decreases_over_20_steps():
    model = wide_model()
    opt = LisaAdamW(model, n_layers=2, interval=5, lr=3e-3, embed_head_state="8bit")
    x = batches(1, vocab=VOCAB)[0]
    losses = train(model, opt, [x] * 20)
    assert losses[-1] < losses[0] - 0.5, losses


def test_all_layers_equal_torch_adamw_for_blocks_and_bnb_adamw8bit_for_the_always_on_set_bitwise():
    lisa_model, ref_model = wide_model(n_layers=2), wide_model(n_layers=2)
    opt = LisaAdamW(lisa_model, n_layers=2, interval=2, lr=1e-2, weight_decay=0.1, embed_head_state="8bit")
    names = {id(p): n for n, p in lisa_model.named_parameters()}
    always = {names[id(p)] for p in always_on(opt)}
    ref_params = dict(ref_model.named_parameters())
    split = lambda names_: ([ref_params[n] for n in names_ if ref_params[n].ndim >= 2],
                            [ref_params[n] for n in names_ if ref_params[n].ndim < 2])
    order = [n for n, _ in ref_model.named_parameters()]
    (ad, an), (bd, bn) = split([n for n in order if n in always]), split([n for n in order if n not in always])
    ref8 = bnb.optim.AdamW8bit([{"params": ad}, {"params": an, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
    ref32 = torch.optim.AdamW([{"params": bd}, {"params": bn, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
    for x in batches(6, vocab=VOCAB):
        train(lisa_model, opt, [x])
        ref_model(input_ids=x, labels=x).loss.backward()
        ref32.step(), ref8.step()
        ref32.zero_grad(), ref8.zero_grad()
    for n, p in lisa_model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


@pytest.mark.parametrize("dtype,extra", [(torch.float32, {}), (torch.float32, {"state_policy": "offload"}),
                                         (torch.float32, {"activation_warmup": 2, "embed_head_lr": 2.0}),
                                         (torch.bfloat16, {"master_weights": True})])
def test_resume_mid_interval_is_bitwise(dtype, extra):
    data = batches(14, vocab=VOCAB)

    def setup():
        model = wide_model(dtype=dtype)
        opt = LisaAdamW(model, n_layers=2, interval=4, lr=1e-2, embed_head_state="8bit", seed=3, **extra)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=14)

    model, opt, sched = setup()
    train(model, opt, data, sched)
    ref = params(model)

    model, opt, sched = setup()
    train(model, opt, data[:6], sched)
    ckpt = save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model, opt, sched = setup()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    before = opt.state_bytes()
    train(model, opt, data[6:], sched)
    assert before > 0 and all(torch.equal(p, ref[n]) for n, p in model.named_parameters())


def test_the_scheduler_drives_the_8bit_groups():
    model = wide_model()
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1.0, embed_head_lr=0.5, embed_head_state="8bit")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(model, opt, batches(3, vocab=VOCAB), sched)
    assert [g["lr"] for g in opt.param_groups] == [0.5 ** 4] * 2 + [0.5 ** 3] * 2
    assert opt.param_groups[0] is opt.embed_head_optimizer.param_groups[0]
    assert opt.param_groups[2] is opt.inner.param_groups[2]
    assert not opt.inner.param_groups[0]["params"] and not opt.inner.param_groups[1]["params"]


def test_fp32_is_the_default_and_unchanged():
    model = wide_model()
    opt = LisaAdamW(model, n_layers=2, interval=2)
    assert opt.embed_head_optimizer is None and opt.param_groups is opt.inner.param_groups
    assert "embed_head" not in opt.state_dict()["lisa"]


def test_a_checkpoint_of_the_other_state_kind_is_refused():
    opt = LisaAdamW(wide_model(), n_layers=2, interval=2)
    sd = opt.state_dict()
    with pytest.raises(LisaError, match="embed_head_state='fp32' but this optimizer has '8bit'"):
        LisaAdamW(wide_model(), n_layers=2, interval=2, embed_head_state="8bit").load_state_dict(sd)


@pytest.mark.parametrize("kw,msg", [
    ({"sample_embed_head": True}, "sample_embed_head is true"),
    ({"optimizer_cls": "sgd"}, "needs optimizer_cls adamw"),
    ({"optimizer_kwargs": {"amsgrad": True}}, "amsgrad"),
    ({"embed_head_state": "4bit"}, "embed_head_state"),
])
def test_refusals(kw, msg):
    kw = {"embed_head_state": "8bit", **kw}
    with pytest.raises(LisaError, match=msg) as e:
        LisaAdamW(wide_model(), n_layers=2, interval=2, **kw)
    assert "\n" not in str(e.value)


def test_the_library_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(LisaError, match=r"^lisa.embed_head_state: 8bit needs bitsandbytes \(pip install "
                                        r"bitsandbytes\)$"):
        LisaAdamW(wide_model(), n_layers=2, interval=2, embed_head_state="8bit")


# -- lisa.frozen_weights: int8 | nf4 (#15) -------------------------------------------------------------------
from conftest import tiny_model  # noqa: E402

QUANT = {"int8": "Int8Params", "nf4": "Params4bit"}


def linears(model, i):
    return {n: m for n, m in model.model.layers[i].named_modules() if n.endswith("_proj")}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_frozen_blocks_are_quantized_active_ones_not(kind):
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, frozen_weights=kind, seed=1)
    for step, x in enumerate(batches(9)):
        for i in range(4):
            for n, m in linears(model, i).items():
                if i in opt.active_blocks:
                    assert type(m) is torch.nn.Linear and type(m.weight) is torch.nn.Parameter
                    assert m.weight.requires_grad and m.weight.dtype == torch.float32
                else:
                    assert type(m.weight).__name__ == QUANT[kind] and not m.weight.requires_grad
                    assert m.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)
        assert opt.frozen_weights.quantized_blocks() == [i for i in range(4) if i not in opt.active_blocks]
        train(model, opt, [x])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_frozen_blocks_pass_the_same_input_gradients_after_an_evaluation(kind):
    """An eval-mode forward must not change the frozen blocks' backward: bnb repacks nf4 weights for a CPU kernel
    without autograd on inference, which cut the gradient to every parameter below a frozen block."""
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=1, interval=100, lr=1e-2, frozen_weights=kind, seed=1)
    x = batches(1)[0]

    def grads():
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.zero_grad()
        return g

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    after = grads()
    assert "model.embed_tokens.weight" in before and before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_after_a_switch_the_host_copy_holds_exactly_the_trained_weights_and_the_saved_model_is_full(kind):
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, frozen_weights=kind, seed=1)
    first = list(opt.active_blocks)
    names = [f"model.layers.{i}.{n}.weight" for i in first for n in linears(model, i)]
    before = {n: model.get_parameter(n).detach().clone() for n in names}
    stepped = {}  # the weights the inner optimizer wrote at the last step, before the switch froze them
    opt.inner.register_step_post_hook(
        lambda *_: stepped.update({n: model.get_parameter(n).detach().clone() for n in names if n in opt.masters()
                                   or model.get_parameter(n).requires_grad}))
    train(model, opt, batches(3))
    gone = [i for i in first if i not in opt.active_blocks]
    assert gone and opt.frozen_weights.quantized_blocks() == [i for i in range(4) if i not in opt.active_blocks]
    host = opt.frozen_weights.host
    for i in gone:
        for n in linears(model, i):
            name = f"model.layers.{i}.{n}.weight"
            assert torch.equal(host[name], stepped[name]) and not torch.equal(host[name], before[name])
    sd = model.state_dict()  # the saved model: every block in full precision, the frozen ones their host copy
    assert set(sd) == set(tiny_model(n_layers=4).state_dict())
    assert all(t.dtype == torch.float32 for t in sd.values())
    for i in range(4):
        for n, m in linears(model, i).items():
            name = f"model.layers.{i}.{n}.weight"
            assert torch.equal(sd[name], host[name] if i not in opt.active_blocks else m.weight)


def test_save_pretrained_writes_the_full_precision_weights(tmp_path):
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-2, frozen_weights="int8", seed=1)
    train(model, opt, batches(5))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        assert torch.equal(v, full[k]), k


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_resume_is_bitwise(kind):
    data = batches(10)

    def setup():
        model = tiny_model(n_layers=4)
        return model, LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, frozen_weights=kind, seed=2,
                                state_policy="offload")

    model, opt = setup()
    train(model, opt, data)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = setup()
    train(model, opt, data[:4])
    ckpt = save({"model": model.state_dict(), "opt": opt.state_dict()})
    model, opt = setup()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, data[4:])
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_full_is_bitwise_todays_and_state_bytes_are_unchanged_by_quantization():
    data = batches(8)
    runs = {}
    for kind in ["full", "int8", None]:
        model = tiny_model(n_layers=4)
        kw = {} if kind is None else {"frozen_weights": kind}
        opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, seed=1, **kw)
        bytes_ = []
        for x in data:
            train(model, opt, [x])
            bytes_.append(opt.state_bytes())
        runs[kind] = (params(model), bytes_, opt.frozen_weights)
    assert runs["full"][2] is None
    assert all(torch.equal(p, runs[None][0][n]) for n, p in runs["full"][0].items())
    assert runs["int8"][1] == runs[None][1]


def test_fsdp_is_refused_with_one_line():
    model = tiny_model(n_layers=4)
    model.model.layers[0].mlp.up_proj.weight.to_local = lambda: None  # what a DTensor parameter looks like
    with pytest.raises(LisaError, match=r"^lisa.frozen_weights: nf4 does not support FSDP2 \(sharded\) parameters "
                                        r"\(model.layers.0.mlp.up_proj.weight\)$"):
        LisaAdamW(model, n_layers=2, interval=2, frozen_weights="nf4")


def test_frozen_weights_library_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(LisaError, match=r"^lisa.frozen_weights: int8 needs bitsandbytes \(pip install "
                                        r"bitsandbytes\)$"):
        LisaAdamW(tiny_model(n_layers=4), n_layers=2, interval=2, frozen_weights="int8")

"""Quantized memory (#14 item 2, #15): 8-bit optimizer state for the always-on set (bitsandbytes AdamW8bit)."""
import copy
import io
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from helpers import batches, params, tiny_model, train
from torch.utils._python_dispatch import TorchDispatchMode

import lisatune.quant  # noqa: F401  (installs lisa.frozen_weights)
from lisatune import LisaAdamW, LisaError
from lisatune.analysis.tiny import tiny_config
from lisatune.quant.frozen import FrozenInt8Linear, dequantize_int8, frozen_module, quantized_module, quantized_weight
from lisatune.quant.sizes import adamw8bit_state_bytes, quantized_linear_bytes
from lisatune.recipe.meter import ActivationMeter, optimizer_state_bytes, weight_bytes

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 300  # embedding and head 300 x 32 = 9600 values: over bitsandbytes' 4096 (8-bit), 37.5 blocks of 256


def wide_model(n_layers=4, seed=0, dtype=torch.float32):
    """The tiny llama with a vocabulary large enough for bitsandbytes to quantize its embedding and head."""
    cfg = tiny_config("llama", n_layers)
    cfg.vocab_size = VOCAB
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def always_on(opt):
    return [p for _, p in opt.layers.embedding + opt.layers.head + opt.layers.norm]


def eight_bit_bytes(ps):
    """What `lisatune plan` counts for bitsandbytes' AdamW8bit (quant/sizes.py), held equal below to what it holds."""
    return adamw8bit_state_bytes(p.numel() for p in ps)


def adam_bytes(ps):
    return sum(2 * 4 * p.numel() + 4 for p in ps)  # torch AdamW: two fp32 moments and an fp32 step tensor


def test_state_bytes_are_8bit_for_the_always_on_set_and_fp32_for_blocks_at_every_step():
    model = wide_model()
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, embed_head_state="8bit", seed=1)
    assert opt.state_bytes() == 0
    for x in batches(12, vocab=VOCAB):
        stepped = [p for u in opt.active for _, p in opt.units.params[u]]
        train(model, opt, [x])
        kept = [p for p in stepped if any(p is q for u in opt.active for _, q in opt.units.params[u])]
        assert opt.state_bytes() == eight_bit_bytes(always_on(opt)) + adam_bytes(kept)
        assert opt.history[-1]["state_bytes"] >= opt.state_bytes()
    emb = opt.layers.embedding[0][1]
    st = opt.embed_head_optimizer.state[emb]
    assert st["state1"].dtype == st["state2"].dtype == torch.uint8 and st["absmax1"].numel() == 38
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())  # blocks: fp32 AdamW
    assert not any(p in opt.state for p in always_on(opt))
    # SmolLM2's embedding on paper: 49152 x 576 values
    n = 49152 * 576
    assert (eight_bit_bytes([torch.empty(n, device="meta")]) - 2048) / n == pytest.approx(2.03125, abs=1e-6)


def test_the_8bit_state_formula_equals_what_adamw8bit_holds_for_odd_sizes():
    ps = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(4095,), (4096,), (4097,), (300, 31), (64, 64)]]
    opt = bnb.optim.AdamW8bit(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == adamw8bit_state_bytes(p.numel() for p in ps)
    assert {k: v.dtype for k, v in opt.state[ps[0]].items() if torch.is_tensor(v)} == {
        "state1": torch.float32, "state2": torch.float32}  # under 4096 values: 32-bit, as min_8bit_size says


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
                                        r"\(model.layers.0.mlp.up_proj.weight\): bitsandbytes quantizes a whole "
                                        r"plain weight, .* use frozen_weights: full under distributed: fsdp$"):
        LisaAdamW(model, n_layers=2, interval=2, frozen_weights="nf4")


def test_a_model_without_nn_linear_blocks_is_refused_with_one_line():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("gpt2", 2))  # Conv1D, not nn.Linear
    with pytest.raises(LisaError, match=r"^lisa.frozen_weights: nf4 quantizes torch.nn.Linear layers, and the "
                                        r"blocks \(transformer.h\) have none \(their weight layers: Conv1D.*\); "
                                        r"use frozen_weights: full$"):
        LisaAdamW(model, n_layers=1, interval=2, frozen_weights="nf4")


def test_frozen_weights_library_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(LisaError, match=r"^lisa.frozen_weights: int8 needs bitsandbytes \(pip install "
                                        r"bitsandbytes\)$"):
        LisaAdamW(tiny_model(n_layers=4), n_layers=2, interval=2, frozen_weights="int8")


# -- what bitsandbytes holds, against quant/sizes.py (what `lisatune plan` counts) ------------------------------
def quantized(lin, kind):
    bnb_cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    q = quantized_module(bnb_cls, lin, kind, lin.weight.dtype)
    q.weight = quantized_weight(bnb, lin.weight, kind, lin.weight.device)
    return q


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(96, 32), (100, 70), (200, 130), (64, 1)])  # 26,000 values: 407 absmax, 2 scales
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_bytes_equal_the_tensors_bitsandbytes_holds_before_and_after_a_forward(kind, shape, dtype):
    out_f, in_f = shape
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype), kind)
    want = quantized_linear_bytes(out_f, in_f, kind)
    assert weight_bytes(q) == want
    q(torch.randn(3, in_f, dtype=dtype, requires_grad=True)).sum().backward()  # int8: SCB moves into q.state
    assert weight_bytes(q) == want
    if kind == "nf4":  # packed data, uint8 absmax per 64, fp32 offset, nested fp32 scales, code copies
        st = q.weight.quant_state
        assert st.nested and st.blocksize == 64 and st.absmax.dtype == torch.uint8 and st.state2.blocksize == 256
    else:
        assert q.weight.dtype == torch.int8 and q.state.SCB.dtype == torch.float32 and q.state.SCB.numel() == out_f


def test_the_int8_matmul_keeps_its_input_where_saved_tensors_hooks_do_not_see_it():
    """Why ActivationMeter counts the input of a Linear8bitLt (keeps_input): MatMul8bitFp holds it as ctx.A."""
    q = quantized(torch.nn.Linear(32, 64, bias=False), "int8").train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with ActivationMeter(q, keeps_input=[]) as hidden:
        y = q(x)
    assert hidden.bytes == 0 and y.grad_fn.A.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    with ActivationMeter(q) as meter:  # default: the model's int8 linears
        q(x)
    assert meter.bytes == x.numel() * 4


# -- #15: frozen nf4 blocks pass the right input gradient down ---------------------------------------------------
WIDE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # 64 columns: what bitsandbytes' CPU repacking needs


def dequantized(model):
    """A copy whose Linear4bit / FrozenInt8Linear layers are plain fp32 nn.Linear holding exactly the dequantized
    weights."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, FrozenInt8Linear)):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                w = child.weight
                w = bnb.functional.dequantize_4bit(w.data, w.quant_state) if isinstance(child, bnb.nn.Linear4bit) \
                    else dequantized_int8(w, torch.float32)
                lin.weight = torch.nn.Parameter(w.float(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = child.bias
                setattr(parent, name, lin)
    return ref


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_frozen_block_passes_the_input_gradient_of_its_dequantized_weights(kind, mode):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**WIDE), attn_implementation="eager").train()
    LisaAdamW(model, n_layers=1, interval=100, policy="weighted", probabilities=[1, 0, 0, 0], frozen_weights=kind,
              train_embedding=False, train_head=False)
    model.train(mode == "train")
    block, ref = model.model.layers[2], dequantized(model).model.layers[2]
    pos = model.model.rotary_emb(torch.zeros(1), torch.arange(8)[None])
    for shape in [(1, 1, 64), (1, 8, 64), (2, 8, 64)]:  # batch-1 single-token inputs too
        n = shape[1]
        x = torch.randn(*shape, requires_grad=True)
        y = block(x, position_embeddings=tuple(t[:, :n] for t in pos))[0]
        y.square().sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = ref(x_ref, position_embeddings=tuple(t[:, :n] for t in pos))[0]
        y_ref.square().sum().backward()
        if kind == "int8":  # the same matmuls as the plain layer: to the bit
            assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
        else:  # bitsandbytes' fused nf4 matmul sums in its own order
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_the_active_lower_block_s_gradient_is_right_under_nf4_frozen_blocks_after_an_evaluation():
    """bitsandbytes repacks nf4 weights for its CPU inference kernel (gemv_4bit, no autograd) at an eval-mode
    forward without grad on a CPU with avx512_bf16 (this machine's); lisatune's frozen layers keep the
    differentiable layout, so training after an evaluation is still right (elsewhere: the plain path is checked)."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**WIDE), attn_implementation="eager").train()
    LisaAdamW(model, n_layers=1, interval=100, policy="weighted", probabilities=[1, 0, 0, 0], frozen_weights="nf4",
              train_embedding=False, train_head=False)
    ref = dequantized(model)
    x = torch.randint(0, 96, (1, 8))

    def block0_grads(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in m.model.layers[0].named_parameters() if p.grad is not None}

    want = block0_grads(ref)
    model.eval()
    with torch.no_grad():
        model(input_ids=x[:, :1])  # generation-like: one token, no grad
        model(input_ids=x)
    model.train()
    got = block0_grads(model)
    assert set(got) == set(want) and len(got) == 9  # 7 linears + 2 norms
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


# -- #26: a frozen int8 linear computes x @ dequant(W).T + b on every device, in train and eval mode -------------
def frozen_int8(lin):
    """A FrozenInt8Linear in `lin`'s place, as FrozenWeights builds it when a block freezes."""
    return frozen_module(FrozenInt8Linear, lin, "int8", lin.weight.device)


def dequantized_int8(w, dtype):
    """dequant(W), written out here: each int8 row times its fp32 scale / 127, rounded once to `dtype`."""
    return (w.data.to(dtype) * (w.SCB.unsqueeze(1) * (1.0 / 127.0))).to(dtype)


def int8_input(dtype, outlier):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 256, dtype=dtype)
    if outlier:  # one large feature, as LLM activations have: what int8 activations lose most on
        x[..., 3] *= 20
    return x


def assert_computes_the_dequantized_weight(layer, w, bias, dtype):
    """The layer's output and input gradient equal F.linear with the dequantized weight `w`, to the bit, in train
    and eval mode, for Gaussian inputs and inputs with an outlier feature."""
    for mode in (True, False):
        layer.train(mode)
        for outlier in (False, True):
            x = int8_input(dtype, outlier).requires_grad_()
            g = torch.randn(2, 8, w.shape[0], dtype=dtype)
            if bias is not None:
                bias.grad = None
            y = layer(x)
            y.backward(g)
            x_ref = x.detach().clone().requires_grad_()
            b_ref = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
            y_ref = F.linear(x_ref, w, b_ref)
            y_ref.backward(g)
            err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
            assert torch.equal(y, y_ref), f"train={mode} outlier={outlier}: output off by {err:.2e} (relative)"
            assert torch.equal(x.grad, x_ref.grad), f"train={mode} outlier={outlier}: input gradient"
            if bias is not None and bias.requires_grad:  # a frozen block's bias is frozen; a trained one works
                torch.testing.assert_close(bias.grad, b_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_int8_linear_computes_x_times_the_dequantized_weight_in_train_and_eval_mode(dtype, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=bias, dtype=dtype)
    q = frozen_int8(lin)
    if bias:
        lin.bias.requires_grad_(dtype == torch.float32)
    assert type(q.weight) is bnb.nn.Int8Params and q.weight.dtype == torch.int8 and not q.weight.requires_grad
    w = dequantized_int8(q.weight, dtype)
    assert_computes_the_dequantized_weight(q, w, lin.bias, dtype)
    # dequant(W) is bitsandbytes' own int8_vectorwise_dequant up to one fp32 rounding (it multiplies by the scale,
    # then by 1/127; this by scale / 127, the order of its CPU training matmul)
    lib = bnb.functional.int8_vectorwise_dequant(q.weight.data, q.weight.SCB).to(dtype)
    torch.testing.assert_close(w, lib, rtol=torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(dequantize_int8(q.weight.data, q.weight.SCB, dtype), w)


def test_bitsandbytes_int8_matmul_the_path_cuda_takes_fails_that_check():
    """What lisatune's frozen int8 blocks ran before #26: bitsandbytes' Linear8bitLt (threshold 0). Its matmul
    on CUDA, in train and eval mode, is MatMul8bitLt, which quantizes the activations to int8; on CPU it runs in
    eval mode (train mode takes MatMul8bitFp, which dequantizes the weight), so the check above sees it here."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False)
    b = quantized(lin, "int8")
    w = dequantized_int8(b.weight, torch.float32)
    with pytest.raises(AssertionError, match=r"train=False outlier=False: output off by"):
        assert_computes_the_dequantized_weight(b, w, None, torch.float32)
    b.eval()
    errs = []
    for outlier in (False, True):
        x = int8_input(torch.float32, outlier)
        y, y_ref = b(x), F.linear(x, w)
        errs.append(((y - y_ref).abs().max() / y_ref.abs().max()).item())
    assert 5e-3 < errs[0] < errs[1] and errs[1] > 2e-2, errs  # #26 measured 7.5e-3 and 4.7e-2 on CUDA


class Ops(TorchDispatchMode):
    """The ops that run, and the largest tensor any of them makes."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.namespace] += 1
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_frozen_int8_layer_runs_torch_ops_only_and_its_one_transient_is_the_weight_in_the_input_dtype(dtype):
    """No device-specific kernel (bitsandbytes' int8 ops have one per device): the CUDA path is this one. The
    largest tensor made, forward or backward, is the dequantized weight in the compute dtype (what the planner
    counts as the layer's transient); nothing of the input is kept for backward."""
    q = frozen_int8(torch.nn.Linear(256, 128, bias=False, dtype=dtype))
    x = int8_input(dtype, False).requires_grad_()
    with Ops() as ops, ActivationMeter(q, keeps_input=[]) as kept:
        q(x).sum().backward()
    assert set(ops.ops) == {"aten"} and ops.largest == 128 * 256 * x.element_size()
    assert kept.bytes == 0
    b = quantized(torch.nn.Linear(256, 128, bias=False, dtype=dtype), "int8").eval()  # the CUDA path before #26
    with Ops() as ops:
        b(x).sum().backward()
    assert ops.ops["bitsandbytes"] > 0


def test_frozen_int8_blocks_are_frozen_int8_linears_and_train_as_before():
    model = tiny_model(n_layers=4)
    opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, frozen_weights="int8", seed=1)
    frozen = [i for i in range(4) if i not in opt.active_blocks]
    assert all(type(m) is FrozenInt8Linear for i in frozen for m in linears(model, i).values())
    losses = train(model, opt, [batches(1)[0]] * 12)
    assert losses[-1] < losses[0] - 0.5, losses

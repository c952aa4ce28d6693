"""The master step's byte budget (#26): a trained tensor larger than the cap is stepped in slices of consecutive
elements, bitwise as whole-tensor AdamW (torch's, single-tensor and foreach, and bitsandbytes' 8-bit), and the
step's transient is then bounded by the cap, not by the largest tensor."""
import pytest
import torch

from helpers import batches, fp32_master_step, params, tiny_model, train
from lisatune import LisaAdamW, LisaError
from lisatune.engine import Masters
from lisatune.engine.masters import ALIGN
from lisatune.recipe.meter import AllocationMeter

BF16 = torch.bfloat16
# odd sizes (slices end mid-row, mid-block); 100_003 elements is above ATen's parallel grain (32768), so CPU
# kernels split it across threads at other boundaries than a slice's
SHAPES = [(37, 53), (100_003,), (130, 64), (7,)]


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(BF16)) for s in SHAPES]


def grads(ws, step):
    g = torch.Generator().manual_seed(100 + step)
    for w in ws:
        w.grad = torch.randn(w.shape, generator=g).to(BF16)


def make(kind, ms):
    groups = [{"params": ms[:2]}, {"params": ms[2:], "weight_decay": 0.0}]
    if kind == "8bit":
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=1e-2, weight_decay=0.1, min_8bit_size=16)
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=kind == "foreach", amsgrad=kind == "amsgrad")


@pytest.mark.parametrize("kind", ["single", "foreach", "amsgrad", "8bit"])
def test_sliced_master_step_is_bitwise_the_whole_tensor_step(kind):
    ws, ref_ws = weights(), weights()
    masters = Masters(chunk_bytes=4 * 3 * ALIGN)  # slices of 768 elements; the largest tensor has 100,003
    for i, w in enumerate(ws):
        masters.add(f"w{i}", w)
    opt = make(kind, list(masters.of.values()))
    pairs = [(w, w.detach().float()) for w in ref_ws]
    ref = make(kind, [m for _, m in pairs])
    for step in range(4):
        grads(ws, step)
        grads(ref_ws, step)
        masters.step(opt.param_groups, opt.step)
        masters.zero_grad()
        fp32_master_step(pairs, ref)
        assert all(torch.equal(w, r) for w, r in zip(ws, ref_ws))
        assert all(torch.equal(m, r) for m, (_, r) in zip(masters.of.values(), pairs))
    assert len(opt.state) == len(SHAPES)  # no slice's state left behind
    for m, (_, r) in zip(masters.of.values(), pairs):
        a, b = opt.state[m], ref.state[r]
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            assert type(x) is type(y) and torch.equal(torch.as_tensor(x), torch.as_tensor(y)), key
            assert not isinstance(x, torch.Tensor) or (x.dtype, x.device) == (y.dtype, y.device)


def test_an_optimizer_that_is_not_elementwise_steps_whole_tensors():
    ws = weights()
    masters = Masters(chunk_bytes=4 * ALIGN)
    for i, w in enumerate(ws):
        masters.add(f"w{i}", w)
    opt = torch.optim.Adagrad([{"params": list(masters.of.values())}], lr=1e-2)
    seen = []
    grads(ws, 0)
    masters.step(opt.param_groups, lambda: seen.append([p.numel() for p in opt.param_groups[0]["params"]]))
    assert [n for c in seen for n in c] == [w.numel() for w in ws]  # each tensor whole, one per chunk at most


def step_transient(model, opt, steps=2):
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if p.requires_grad else None
        with AllocationMeter() as alloc:
            opt.step()
        opt.zero_grad()
    return alloc.peak


@pytest.mark.parametrize("eh_state", ["fp32", "8bit"])
def test_the_cap_bounds_the_step_transient_below_the_largest_tensor(eh_state):
    if eh_state == "8bit":
        pytest.importorskip("bitsandbytes")
    peaks = {}
    for cap in (None, 4 * 4 * ALIGN):
        model = tiny_model(n_layers=4, dtype=BF16)
        opt = LisaAdamW(model, n_layers=2, interval=100, lr=1e-3, master_weights=True, embed_head_state=eh_state)
        opt._masters.chunk_bytes = cap  # what LisaAdamW's chunk_bytes sets
        largest = max(p.numel() for g in opt.param_groups for p in g["params"])
        assert 4 * largest > 2 * 4 * 4 * ALIGN  # the embedding/head: the cap cuts them
        peaks[cap] = step_transient(model, opt)
    cap = 4 * 4 * ALIGN
    # the chunk's fp32 grads + CPU single-tensor AdamW's two temporaries of its size + the previous quotient;
    # 8-bit on CPU: dequantized moments, grad, weight and quotient (5 x the slice), the scalars and absmax copies
    assert peaks[cap] <= (6 if eh_state == "8bit" else 4) * cap + 4096 < peaks[None]


def test_lisa_sliced_trains_and_resumes_bitwise_as_unsliced():
    data = batches(14, seed=1)

    def run(cap, upto=None, ckpt=None):
        model = tiny_model(n_layers=4, dtype=BF16)
        opt = LisaAdamW(model, n_layers=2, interval=3, lr=1e-2, weight_decay=0.1, master_weights=True, seed=2)
        opt._masters.chunk_bytes = cap
        if ckpt:
            model.load_state_dict(ckpt[0])
            opt.load_state_dict(ckpt[1])
        train(model, opt, data[slice(*(upto or (None, None)))])
        return model, opt

    whole, _ = run(None)
    sliced, _ = run(4 * ALIGN)
    assert all(torch.equal(a, b) for a, b in zip(params(whole).values(), params(sliced).values()))
    half, o = run(4 * ALIGN, (0, 8))
    resumed, _ = run(4 * ALIGN, (8, None), ({k: v.clone() for k, v in half.state_dict().items()}, o.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(params(whole).values(), params(resumed).values()))


@pytest.mark.parametrize("cap", [0, 1023, 2.5, True])
def test_a_bad_cap_is_a_one_line_error(cap):
    with pytest.raises(LisaError, match="chunk_bytes must be an integer"):
        Masters(chunk_bytes=cap)


def test_master_adamw_takes_the_cap_and_steps_bitwise_as_without_it():
    from lisatune.methods.full import MasterAdamW
    models = [tiny_model(n_layers=2, dtype=BF16) for _ in range(2)]
    for m in models:
        for p in m.parameters():
            p.requires_grad_(True)
    capped, whole = MasterAdamW(models[0], chunk_bytes=4 * ALIGN, lr=1e-2), MasterAdamW(models[1], lr=1e-2)
    assert capped._masters.chunk_bytes == 4 * ALIGN and whole._masters.chunk_bytes is None
    data = batches(3)
    train(models[0], capped, data)
    train(models[1], whole, data)
    assert all(torch.equal(a, b) for a, b in zip(params(models[0]).values(), params(models[1]).values()))

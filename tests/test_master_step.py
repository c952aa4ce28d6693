"""The bf16-mixed master step: its transient is one tensor's fp32 gradient (and the optimizer's temporary for
it), not an fp32 copy of every trained gradient at once; one implementation serves LISA and full fine-tuning."""
import re
from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import tiny_model

from lisatune import LisaAdamW
from lisatune.recipe.meter import AllocationMeter
from lisatune.engine import Masters
from lisatune.methods.full import MasterAdamW

BF16 = torch.bfloat16
SRC = Path(__file__).resolve().parents[1] / "src" / "lisatune"


def trained(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def step_transient(model, opt, steps: int = 2) -> int:
    """The peak bytes allocated inside opt.step() on the last of `steps` steps (the state exists by then)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if p.requires_grad else None
        if i == steps - 1:
            with AllocationMeter() as alloc:
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    return alloc.peak


def bound(opt) -> int:
    """One largest trained tensor's fp32 gradient plus the temporaries of CPU AdamW's single-tensor kernel for it
    (sqrt(exp_avg_sq), then its quotient by the bias correction: two tensors of its size at once; CUDA's foreach
    kernel makes one), and the few scalars the step makes."""
    largest = max(t.numel() for t in trained(opt))
    return (1 + 2) * 4 * largest + 4096


def all_at_once(opt) -> int:
    """What the step held before: an fp32 copy of every trained gradient, plus the same kernel's temporaries."""
    return 4 * sum(t.numel() for t in trained(opt)) + 2 * 4 * max(t.numel() for t in trained(opt))


@pytest.mark.parametrize("make", ["lisa", "full"])
def test_the_step_transient_is_one_tensor_not_the_trained_set(make):
    model = tiny_model(n_layers=6, dtype=BF16)
    if make == "lisa":
        opt = LisaAdamW(model, n_layers=6, interval=100, lr=1e-3, master_weights=True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        opt = MasterAdamW(model, lr=1e-3)
    assert 0 < step_transient(model, opt) <= bound(opt) < all_at_once(opt)


def test_the_step_transient_bound_holds_on_a_half_billion_parameter_model():
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=29,
                        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        shell = T.AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in shell.parameters()) >= 5e8
    model = shell.to_empty(device="cpu").to(BF16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    opt = LisaAdamW(model, n_layers=2, interval=100, lr=1e-4, master_weights=True)
    peak = step_transient(model, opt)
    embedding = 32000 * 1024  # the largest trained tensors: the embedding and the head
    assert max(t.numel() for t in trained(opt)) == embedding
    assert peak <= bound(opt) < all_at_once(opt)


def test_chunks_pack_consecutive_tensors_within_the_largest():
    ts = [(0, torch.empty(n)) for n in (4, 1, 1, 2, 4, 3)]
    sizes = [[t.numel() for _, t in c] for c in Masters.chunks(ts)]
    assert sizes == [[4], [1, 1, 2], [4], [3]]
    assert [gt for c in Masters.chunks(ts) for gt in c] == ts  # every tensor once, in order


def test_one_master_step_in_the_package():
    """The fp32 cast of a bf16 gradient into its master is written once (engine/masters.py)."""
    where = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
             if re.search(r"\.grad\.detach\(\)\.to\(torch\.float32\)", p.read_text())]
    assert where == ["engine/masters.py"]

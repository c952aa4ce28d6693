"""Memory accounting, speed counters and layer-norm probabilities on tiny models (hand-checked numbers)."""
import argparse
import copy
import json

import pytest
import torch

from helpers import batches, tiny_model
from lisatune import LisaAdamW
from lisatune.analysis import commands
from lisatune.analysis.memory import check_flat, measure_method
from lisatune.recipe.meter import (ActivationMeter, optimizer_state_bytes,
                                      unique_bytes)
from lisatune.analysis.norms import probabilities, scale_to_sum
from lisatune.analysis.speed import run_speed

# The tiny llama (4 blocks): embedding 96x32, head 96x32 (untied), final norm 32; per block q 32x32,
# k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64 and two norms of 32 -> 9,280 parameters, 9 tensors.
EMB = HEAD = 96 * 32
NORM = 32
BLOCK = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32 + 2 * 32
P = EMB + HEAD + NORM + 4 * BLOCK
TENSORS = 3 + 4 * 9
F32 = 4


def parser():
    p = argparse.ArgumentParser()
    commands.register(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", 4)


def measure(base, spec, **kw):
    return measure_method(spec, model=copy.deepcopy(base), vocab=96, batch=2, seq=8, steps=2, **kw)


def test_tiny_model_is_the_one_counted_by_hand(base):
    assert P == 43_296 and sum(p.numel() for p in base.parameters()) == P
    assert len(list(base.parameters())) == TENSORS


def test_full_counts_weights_grads_and_adamw_state_exactly(base):
    m = measure(base, "full")
    assert m.weights == P * F32
    assert m.grads == P * F32
    # exp_avg + exp_avg_sq in fp32, and torch's `step` is a 4-byte fp32 tensor per parameter tensor
    assert m.state == 2 * P * F32 + 4 * TENSORS == 346_524
    assert m.state_per_step == [m.state] * 2


def test_lisa_counts_only_the_always_on_and_active_blocks(base):
    m = measure(base, "lisa:n_layers=2,interval=5")
    active = EMB + HEAD + NORM + 2 * BLOCK  # embedding, head, final norm always on + γ=2 blocks
    n_tensors = 3 + 2 * 9
    assert m.weights == P * F32
    assert m.grads == active * F32
    assert m.state == 2 * active * F32 + 4 * n_tensors == 197_972
    assert m.trainable == active
    assert m.bound == m.weights + m.activations + 3 * active * F32 + 4 * n_tensors


def test_the_fused_loss_saves_the_logits_activations_and_changes_nothing_else(base):
    std, fused = measure(base, "lisa:n_layers=2,interval=5", loss="standard"), measure(base, "lisa:n_layers=2,interval=5")
    logits = 2 * 8 * 96 * F32  # batch 2 x 8 tokens x vocab 96, fp32
    assert std.activations - fused.activations >= logits
    assert (fused.weights, fused.grads, fused.state, fused.trainable) == (std.weights, std.grads, std.state,
                                                                           std.trainable)


def test_lora_counts_adapters_on_every_block_linear(base):
    m = measure(base, "lora:r=8")
    r = 8
    # A is r x in, B is out x r for q (32->32), k, v (32->16), o (32->32), gate, up (32->64), down (64->32)
    per_block = sum(r * i + o * r for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    adapters = 4 * per_block
    assert adapters == 16_384
    assert m.weights == (P + adapters) * F32
    assert m.grads == adapters * F32
    assert m.state == 2 * adapters * F32 + 4 * (4 * 14)


def test_galore_counts_moments_and_projections_of_rank_r(base):
    m = measure(base, "galore:rank=8")
    r = 8
    mats = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]  # (out, in) per block
    per_block = 0
    for rows, cols in mats:
        moments = 2 * (rows * r if rows >= cols else r * cols)  # Adam moments of the projected gradient
        # the projection Vh[:r] (r x cols) or U[:, :r] (rows x r), copied out of the SVD factor by lisatune
        # (galore_torch alone keeps a view, and with it the whole factor)
        proj = r * cols if rows >= cols else rows * r
        per_block += moments + proj
    plain = EMB + HEAD + NORM + 4 * 2 * 32  # not projected: plain AdamW (galore_torch keeps `step` as an int)
    assert m.state == (4 * per_block + 2 * plain) * F32
    assert m.grads == P * F32


def test_shared_storage_counts_once():
    w = torch.zeros(10, 4)
    assert unique_bytes([w, w[:2], w.T, torch.zeros(3)]) == 40 * 4 + 3 * 4


def test_state_of_a_tied_model_counts_the_tied_tensor_once():
    model = tiny_model("gpt2", 2)  # GPT-2 ties its head to the embedding
    opt = torch.optim.AdamW(model.parameters())
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    assert optimizer_state_bytes(opt) == 2 * n * 4 + 4 * len(list(model.parameters()))


def test_activations_stop_below_the_lowest_active_block_when_the_embedding_is_frozen(base):
    x = batches(1, batch=2, seq=8)[0]
    full = copy.deepcopy(base)
    with ActivationMeter(full) as all_blocks:
        full(input_ids=x, labels=x).loss
    frozen = copy.deepcopy(base)
    opt = LisaAdamW(frozen, n_layers=1, interval=1, train_embedding=False, train_head=False, seed=0)
    with ActivationMeter(frozen) as some:
        frozen(input_ids=x, labels=x).loss
    assert opt.active_layers[0] > 0  # seed 0: the blocks below the lowest active one save nothing
    assert 0 < some.bytes < all_blocks.bytes


def test_lisa_state_is_flat_over_ten_switches_and_keep_grows(base):
    drop = measure(base, "lisa:interval=1", switches=10)
    keep = measure(base, "lisa-keep:interval=1", switches=10)
    assert drop.switches >= 10 and drop.state_flat and len(drop.state_per_step) >= 11
    assert keep.state_flat is False and max(keep.state_per_step) > drop.state
    assert check_flat([drop]) == [] and check_flat([keep]) == []  # keep is expected to grow


def test_bench_memory_command_runs_lisa_in_a_worker_and_reports_flat_state(tmp_path, capsys):
    args = parser().parse_args(["bench", "memory", "--model", "tiny", "--batch", "2", "--seq", "8",
                                "--methods", "lisa:interval=1", "--out", str(tmp_path)])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    (run,) = data.values()
    (lisa,) = run
    assert lisa["switches"] >= 10 and lisa["state_flat"] and set(lisa["state_per_step"]) == {197_972}
    assert lisa["peak_rss"] > 0 and lisa["runtime_rss"] > 0
    assert (tmp_path / "memory.png").stat().st_size > 0 and "| lisa:interval=1 |" in (tmp_path / "memory.md").read_text()


def test_norms_command_writes_probabilities_summing_to_gamma_that_lisa_accepts(tmp_path, capsys):
    args = parser().parse_args(["norms", "--model", "tiny:6", "--batch", "2", "--seq", "8", "--steps", "3",
                                "--gamma", "2", "--lr-full", "1e-3", "--lr-lora", "1e-2", "--out", str(tmp_path)])
    assert args.func(args) == 0
    p = json.loads((tmp_path / "probabilities.json").read_text())["probabilities"]
    assert len(p) == 6 and all(0 <= v <= 1 for v in p)
    assert sum(p) == pytest.approx(2.0)
    norms = json.loads((tmp_path / "norms.json").read_text())["norms"]
    assert list(norms["full_weight"]) == ["embedding"] + [f"block{i}" for i in range(6)] + ["head"]
    assert norms["lora_update"]["embedding"] == 0 and norms["lora_update"]["block0"] > 0
    opt = LisaAdamW(tiny_model("llama", 6), policy="bernoulli", probabilities=str(tmp_path / "probabilities.json"))
    assert opt.sampler.p.tolist() == pytest.approx(p)
    assert (tmp_path / "norms.png").stat().st_size > 0


def test_probabilities_are_clipped_at_one_and_the_excess_redistributed():
    p = scale_to_sum([10, 1, 1, 1], 2)
    assert p == pytest.approx([1, 1 / 3, 1 / 3, 1 / 3])
    norms = {"full_weight": {"embedding": 1, "block0": 2, "block1": 2, "head": 1},
             "lora_update": {"embedding": 0, "block0": 1, "block1": 3, "head": 0}}
    assert probabilities(norms, 1) == pytest.approx([0.25, 0.75])
    with pytest.raises(Exception, match="exceeds"):
        scale_to_sum([1, 0, 0], 2)


def test_speed_counts_flops_and_backward_stops_at_the_lowest_active_block():
    res = run_speed("tiny:8", ["full", "lisa:interval=1", "lisa-frozen:interval=1"], batch=2, seq=8, steps=3,
                    warmup=1, log=lambda *_: None)
    full, lisa, frozen = res
    assert full.flops == [pytest.approx(1.0)] * 3 and full.lowest_block == [0] * 3
    assert all(f < 1 for f in lisa.flops) and lisa.lowest_block == [0] * 3  # embedding trains: all the way down
    # frozen embedding/head: autograd starts at the lowest active block (seed 0, steps 1..3 after 1 warm-up)
    sampler = LisaAdamW(tiny_model("llama", 8), n_layers=2, interval=1, seed=0).sampler
    assert frozen.lowest_block == [min(sampler.active(s)) for s in range(1, 4)]
    assert all(f < lf for f, lf in zip(frozen.flops, lisa.flops))


# -- peak memory per phase and per logging interval (meter.PhaseMemory: bench memory and lisatune train) ---------
MIB = 2**20


class FakeCuda:
    """torch.cuda's peak counters over an allocator the test drives: reserved runs 1 MiB above allocated."""

    def __init__(self):
        self.live = self.peak = self.resets = 0

    def alloc(self, mib: int, free: int = 0) -> None:
        self.live += mib * MIB
        self.peak = max(self.peak, self.live)
        self.live -= free * MIB

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.peak + MIB)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self._reset())
        return self

    def _reset(self):
        self.peak = self.live
        self.resets += 1


def test_phase_memory_attributes_each_peak_to_its_phase_and_resets_per_interval(monkeypatch):
    from lisatune.recipe.meter import PhaseMemory
    cuda = FakeCuda().install(monkeypatch)
    model = tiny_model("llama", 4)
    opt = LisaAdamW(model, n_layers=2, interval=2, lr=1e-3)
    opt.inner.register_step_post_hook(lambda *_: cuda.alloc(400, free=400))  # the update's temporaries
    opt.register_switch_hook(lambda _: cuda.alloc(700, free=700))  # the switch (after the update)
    mem = PhaseMemory(torch.device("cuda"), opt)
    rows = []
    for x in batches(3):
        with mem.phase("forward"):
            loss = model(input_ids=x, labels=x).loss
            cuda.alloc(300, free=200)  # 100 MiB of activations stay
        with mem.phase("backward"):
            loss.backward()
            cuda.alloc(50, free=100)  # grads made, activations freed
        with mem.phase("step"):
            opt.step()  # a switch after steps 2 (and 4, ...)
            opt.zero_grad()
            cuda.alloc(0, free=50)
        rows.append(mem.interval())
    assert cuda.live == 0
    s = mem.summary()
    assert {p: v["peak_allocated_mib"] for p, v in s["phases"].items()} == {
        "forward": 300, "backward": 150, "step": 450, "switch": 750}  # the switch's 700 on 50 MiB of grads
    assert s["phases"]["switch"]["peak_reserved_mib"] == 751 and s["peak_allocated_mib"] == 750
    # each row: the peak since the previous one (the counters are reset, not the run's running maximum)
    assert [r["peak_allocated_mib"] for r in rows] == [450, 750, 450]
    assert [r["peak_reserved_mib"] for r in rows] == [451, 751, 451]
    mem.close()
    assert not opt._switch_pre_hooks


def test_phase_memory_on_cpu_reports_rss_and_no_phases():
    from lisatune.recipe.meter import PhaseMemory
    mem = PhaseMemory("cpu", None)
    with mem.phase("forward"):
        torch.ones(4 * MIB)  # 16 MiB for a moment
    row = mem.interval()
    assert set(row) == {"rss_mib", "peak_rss_mib"} and 0 < row["rss_mib"] <= row["peak_rss_mib"]
    assert set(mem.summary()) == {"rss_mib", "peak_rss_mib"}  # nothing per phase: no allocator counters on CPU


def test_bench_memory_on_cuda_is_refused_without_a_gpu_in_one_line(monkeypatch):
    from lisatune.analysis.memory import run_memory
    from lisatune.errors import LisaError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LisaError, match=r"^--device cuda: torch sees no CUDA device$"):
        run_memory("tiny", ["lisa"], device="cuda")

"""The GPU check: one run on one CUDA GPU, no network, about 10 minutes on an H100/H200.

    python benchmarks/gpu_check.py --out gpu-check            # writes gpu-check/gpu_check.json and gpu_check.log

1. Device checks on CUDA (tiny models): γ = N_L equals torch AdamW bitwise; a mid-interval resume is bitwise;
   the fused loss equals the model's own; bf16 master weights hold masters only for the trained set.
2. Memory: randomly initialised Llama-2-7B and Llama-3.1-8B shapes, batch 1 x 1024 tokens, bf16-mixed, for
   full, LoRA r128/r16, LISA E+H+2L (and with 8-bit E/H state, with E/H frozen, with nf4 / int8 frozen blocks)
   and QLoRA r16 where bitsandbytes' CUDA kernels are present: torch.cuda.max_memory_allocated and
   max_memory_reserved per phase (forward, backward, optimizer step, LISA's switch: meter.PhaseMemory, as
   `lisatune train` and `bench memory --device cuda` record them) beside `lisatune plan`'s prediction for the
   same setting (--checkpointing on: both with gradient checkpointing).
3. Speed: the median step time of the same runs (steps after the first).
Every case runs in its own try: an out-of-memory is a result ("OOM"), not a crash. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lisatune import LisaOptimizer
from lisatune.recipe.meter import PhaseMemory
from lisatune.analysis.plan import Setting, parse_method, plan_memory
from lisatune.analysis.shapes import shape_config
from lisatune.analysis.tiny import tiny_model
from lisatune.methods import build_method
from lisatune.quant import quantize_linears  # (importing lisatune.quant installs lisa.frozen_weights)
from lisatune.recipe.loss import fused_loss, pick_loss, standard_loss
from lisatune.recipe.models import enable_checkpointing

GIB = 2**30
LOG: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


# -- 1. device checks ---------------------------------------------------------------------------------
def _steps(model, opt, batches):
    for x in batches:
        standard_loss(model, x, torch.ones_like(x), x).backward()
        opt.step()
        opt.zero_grad()


def device_checks(dev: torch.device) -> dict:
    out = {}
    data = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(i)).to(dev) for i in range(12)]
    # γ = N_L, no switching: bitwise torch AdamW
    a, b = tiny_model(n_layers=4).to(dev), tiny_model(n_layers=4).to(dev)
    _steps(a, LisaOptimizer(a, n_layers=4, interval=3, lr=1e-3), data)
    _steps(b, torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0), data)
    out["gamma_equals_adamw_bitwise"] = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # mid-interval resume: bitwise
    a = tiny_model(n_layers=4).to(dev)
    oa = LisaOptimizer(a, n_layers=2, interval=3, lr=1e-3)
    _steps(a, oa, data)
    b = tiny_model(n_layers=4).to(dev)
    ob = LisaOptimizer(b, n_layers=2, interval=3, lr=1e-3)
    _steps(b, ob, data[:7])
    sd_model, sd_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(ob.state_dict())
    c = tiny_model(n_layers=4, seed=1).to(dev)
    oc = LisaOptimizer(c, n_layers=2, interval=3, lr=1e-3)
    c.load_state_dict(sd_model)
    oc.load_state_dict(sd_opt)
    _steps(c, oc, data[7:])
    out["resume_bitwise"] = all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    # fused loss = the model's own
    m = tiny_model(n_layers=2).to(dev)
    x = data[0]
    with torch.no_grad():
        ref, got = standard_loss(m, x, torch.ones_like(x), x), fused_loss(m, x, torch.ones_like(x), x)
    out["fused_loss_abs_diff"] = float((ref - got).abs())
    # bf16 master weights: masters only for the trained set
    m = tiny_model(n_layers=6, dtype=torch.bfloat16).to(dev)
    o = LisaOptimizer(m, n_layers=2, interval=2, lr=1e-3, master_weights=True)
    _steps(m, o, data[:6])
    trained = sum(p.numel() for g in o.param_groups for p in g["params"])
    out["master_bytes_equal_ideal"] = o.master_bytes() == 4 * trained
    return out


# -- 2./3. memory and speed at scale ----------------------------------------------------------------------
CASES = [  # (label, method, options, `lisatune plan` method spec)
    ("full", "full", {}, "full"),
    ("LoRA r128", "lora", {"r": 128, "alpha": 256}, "lora:r=128"),
    ("LoRA r16", "lora", {"r": 16, "alpha": 32}, "lora:r=16"),
    ("LISA E+H+2L", "lisa", {}, "lisa"),
    ("LISA E+H+2L, 8-bit E/H state", "lisa", {"embed_head_state": "8bit"}, "lisa:eh_state=8bit"),
    ("LISA 2L, E/H frozen", "lisa", {"train_embedding": False, "train_head": False}, "lisa:embed_head=false"),
    ("LISA E+H+2L, nf4 frozen blocks", "lisa", {"frozen_weights": "nf4"}, "lisa:frozen=nf4"),
    ("LISA 2L, E/H frozen, nf4 frozen blocks", "lisa", {"train_embedding": False, "train_head": False,
                                                        "frozen_weights": "nf4"}, "lisa:embed_head=false,frozen=nf4"),
    ("LISA E+H+2L, 8-bit E/H state, nf4 frozen blocks", "lisa", {"embed_head_state": "8bit", "frozen_weights": "nf4"},
     "lisa:eh_state=8bit,frozen=nf4"),
    ("LISA 2L, E/H frozen, int8 frozen blocks", "lisa", {"train_embedding": False, "train_head": False,
                                                         "frozen_weights": "int8"}, "lisa:embed_head=false,frozen=int8"),
    ("QLoRA r16", "qlora", {"r": 16, "alpha": 32}, "qlora:r=16"),
]


def build(shape: str, method: str, options: dict, dev: torch.device, checkpointing: bool = False):
    """(model, optimizer) of a randomly initialised bf16 `shape` on the device, as `lisatune train` would build."""
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
    model.config.use_cache = False
    if checkpointing:
        enable_checkpointing(model)
    hyper = {"lr": 1e-5, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}
    if method == "full":  # bf16-mixed: fp32 masters and state of every parameter
        m = build_method("full")
        return model, m.master_optimizer(m.prepare(model), hyper)
    if method in ("lora", "qlora"):  # bf16 (or nf4) base, fp32 adapters
        m = build_method("lora", options)
        model = m.prepare(quantize_linears(model, "nf4") if method == "qlora" else model)
        return model, m.make_optimizer(model, hyper)
    return model, LisaOptimizer(model, n_layers=2, interval=2, master_weights=True, **hyper, **options)


def measure(shape: str, label: str, method: str, options: dict, dev: torch.device, steps: int = 4,
            checkpointing: bool = False) -> dict:
    torch.cuda.empty_cache()
    model, opt = build(shape, method, options, dev, checkpointing)
    model.train()
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (1, 1024), device=dev)
    mask = torch.ones_like(x)
    loss_fn = pick_loss(model, {"input_ids": x, "attention_mask": mask, "labels": x}, fused=True)  # as the recipe
    mem = PhaseMemory(dev, opt)  # resets the peaks: model building is not in them
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with mem.phase("forward"):
            loss = loss_fn(model, x, mask, x)
        with mem.phase("backward"):
            loss.backward()
        with mem.phase("step"):  # LISA: a switch every 2 steps, at the end of step(): its own phase
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem.close()
    peaks = mem.summary()
    res = {"peak_gib": round(peaks["peak_allocated_mib"] / 1024, 2),
           "reserved_gib": round(peaks["peak_reserved_mib"] / 1024, 2),
           **{f"{p}_gib": round(v["peak_allocated_mib"] / 1024, 2) for p, v in peaks["phases"].items()},
           **{f"{p}_reserved_gib": round(v["peak_reserved_mib"] / 1024, 2) for p, v in peaks["phases"].items()},
           "step_s": round(statistics.median(times[1:]), 3), "loss": loss.item(),
           "loss_fn": "fused" if loss_fn is fused_loss else "model"}
    del model, opt, loss
    torch.cuda.empty_cache()
    return res


def predicted(shape: str, spec: str, checkpointing: bool) -> float | None:
    try:
        base = Setting(precision="bf16-mixed", batch=1, seq=1024, checkpointing=checkpointing)
        return round(plan_memory(shape, parse_method(spec, base)).peak / GIB, 2)
    except Exception as e:  # a planner gap is reported, not fatal
        say(f"  planner: {type(e).__name__}: {e}")
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--shapes", nargs="+", default=["Llama-2-7B", "Llama-3.1-8B"])
    ap.add_argument("--only", nargs="*", help="case labels to run (default: all)")
    ap.add_argument("--checkpointing", choices=["off", "on"], default="off", help="gradient checkpointing of every block")
    args = ap.parse_args()
    logging.getLogger("lisatune").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        say("no CUDA device: nothing to check")
        return 1
    dev = torch.device("cuda", 0)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}, "runs": []}
    say(f"device: {result['device']}, torch {torch.__version__}")
    started = time.perf_counter()
    try:
        result["checks"] = device_checks(dev)
    except Exception:
        result["checks"] = {"error": traceback.format_exc(limit=3)}
    say(f"device checks: {result['checks']}")
    for shape in args.shapes:
        for label, method, options, spec in CASES:
            if args.only and label not in args.only:
                continue
            gc = args.checkpointing == "on"
            row = {"shape": shape, "case": label, "checkpointing": gc, "planned_peak_gib": predicted(shape, spec, gc)}
            try:
                row |= measure(shape, label, method, options, dev, checkpointing=gc)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            torch.cuda.empty_cache()
            result["runs"].append(row)
            say(f"{shape:14s} {label:34s} " + json.dumps({k: v for k, v in row.items() if k not in ("shape", "case")}))
            (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.log").write_text("\n".join(LOG) + "\n")
    say(f"written: {out / 'gpu_check.json'} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

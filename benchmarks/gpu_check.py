"""The GPU check: one shape on one CUDA GPU in one command, under 8 minutes on an H100 (docs/gpu.md).

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check        # Llama-3.1-8B, writes gpu_check.{json,log}
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run --out /tmp/x  # tiny shapes on the CPU, CUDA stubbed

It runs a list of tasks, each in a fresh `python gpu_check.py --task NAME` process under a time limit, so a
CUDA fault, a hang or an out-of-memory in one cannot poison the others; the JSON and the log are rewritten
after every task, so a run stopped from outside keeps what finished.

1. Device checks (tiny models, random weights): γ = N_L equals torch AdamW bitwise; a mid-interval resume is
   bitwise; the fused loss equals the model's own; the loss falls on a fixed batch over 20 steps for every
   case below. Then, with bitsandbytes: input gradients through Linear4bit (nf4) and lisatune's frozen int8
   linear against an nn.Linear holding the dequantized weight (int8: output and input gradient to the bit against
   F.linear with its dequantized weight; bitsandbytes' Linear8bitLt, which lisatune no longer uses, recorded
   beside it); AdamW8bit against fp32 AdamW; the loss falls with int8 frozen blocks.
2. Cases on the shape (random bf16 weights, batch 1 x --seq tokens, gradient checkpointing, bf16-mixed, the
   fused loss as `lisatune train` picks it); bitsandbytes cases last. LISA with quantized frozen blocks loads as
   the product does: the model on the host, then LisaAdamW(device="cuda") quantizes the frozen blocks onto the
   device and moves the rest (never the whole model on the device in bf16); the other cases are built on the
   device. Per case: the planner's figures for the same setting, the setup peak (the device's allocated peak
   from the build to the built optimizer), the static memory after the build, the measured peaks per phase (recipe.meter.PhaseMemory:
   forward, backward, step, LISA's switch), the overall allocated and reserved peaks, torch.cuda.mem_get_info,
   the median step time of plain steps and of switch steps apart, and tokens/s.

--dry-run runs the same tasks and processes on tiny shapes on the CPU, with the torch.cuda calls the check
makes replaced by CPU stand-ins (stub_cuda): the test suite runs it, so the script cannot rot. Its figures
mean nothing. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

try:
    from transformers.initialization import no_init_weights
except ImportError:
    try:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # slower (transformers' own random init, then overwritten), never wrong
        no_init_weights = contextlib.nullcontext

from lisatune import LisaOptimizer
from lisatune.analysis.plan import Setting, parse_setting, plan_memory
from lisatune.analysis.shapes import SHAPES, shape_config
from lisatune.analysis.tiny import tiny_config, tiny_model
from lisatune.errors import first_line
from lisatune.methods import build_method
from lisatune.quant import quantize_linears
from lisatune.quant.frozen import FrozenInt8Linear, dequantize_int8, frozen_module
from lisatune.recipe.loss import fused_loss, pick_loss, standard_loss
from lisatune.recipe.meter import PhaseMemory, rss_bytes
from lisatune.recipe.models import enable_checkpointing

GIB, MIB = 2**30, 2**20
SCRIPT = Path(__file__).resolve()
METER = torch.device("cuda", 0)  # PhaseMemory's device; in the dry run the stand-ins answer for it
FAULT_ENV = "GPU_CHECK_CRASH_IN"  # a task name: its process dies there (the test of the crash path sets it)


# -- the cases --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    label: str
    method: str  # lora | qlora | lisa
    options: dict
    spec: str  # the same setting for `lisatune plan`
    bnb: bool = False  # needs bitsandbytes


EH_FROZEN = {"train_embedding": False, "train_head": False}
CASES = {  # bitsandbytes cases last: the others have figures even if its CUDA library fails to load
    "lora-r16": Case("LoRA r16", "lora", {"r": 16, "alpha": 32}, "lora:r=16"),
    "lisa": Case("LISA E+H+2L", "lisa", {}, "lisa"),
    "lisa-eh-frozen": Case("LISA 2L, E/H frozen", "lisa", EH_FROZEN, "lisa:embed_head=false"),
    "qlora-r16": Case("QLoRA r16", "qlora", {"r": 16, "alpha": 32}, "qlora:r=16", bnb=True),
    "lisa-8bit-eh": Case("LISA E+H+2L, 8-bit E/H state", "lisa", {"embed_head_state": "8bit"},
                         "lisa:eh_state=8bit", bnb=True),
    "lisa-eh-frozen-nf4": Case("LISA 2L, E/H frozen, nf4 frozen blocks", "lisa", {**EH_FROZEN, "frozen_weights": "nf4"},
                               "lisa:embed_head=false,frozen=nf4", bnb=True),
    "lisa-8bit-eh-nf4": Case("LISA E+H+2L, 8-bit E/H state, nf4 frozen blocks", "lisa",
                             {"embed_head_state": "8bit", "frozen_weights": "nf4"}, "lisa:eh_state=8bit,frozen=nf4",
                             bnb=True),
}
INT8_CASE = Case("LISA 2L, E/H frozen, int8 frozen blocks", "lisa", {**EH_FROZEN, "frozen_weights": "int8"},
                 "lisa:embed_head=false,frozen=int8", bnb=True)
CHECKS = {"checks": False, "checks-bnb": True}  # name: needs bitsandbytes
TASKS = ["checks", "checks-bnb", *CASES]  # the order they run in
LISA_INTERVAL = 2  # a switch every other step: enough switch steps to time apart in a short run


def tiny_shape():
    return tiny_config("llama", n_layers=4)


def host_first(case: Case) -> bool:
    """LISA with quantized frozen blocks loads through the host (LisaAdamW's `device`), as `lisatune train` does."""
    return case.method == "lisa" and case.options.get("frozen_weights", "full") != "full"


POOL = 1 << 24  # random values host_model copies from


def host_model(config, seed: int = 0) -> nn.Module:
    """A random bf16 model on the host, as a loaded checkpoint would be there: allocated without transformers'
    init, then each Linear and Embedding parameter filled from one pool of normals at random offsets (a copy at
    memory speed, where drawing 8 B normals on the host takes tens of seconds). Norms (ones) and buffers (the
    rotary frequencies) are made by the modules themselves, not by the init the context skips."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=g) * config.initializer_range).to(torch.bfloat16)
    filled = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                for p in m.parameters(recurse=False):
                    filled.add(id(p))
                    flat, i = p.view(-1), 0
                    while i < flat.numel():
                        at = int(torch.randint(0, POOL // 2, (1,), generator=g))
                        n = min(flat.numel() - i, POOL - at)
                        flat[i:i + n].copy_(pool[at:at + n])
                        i += n
    bad = [n for n, p in model.named_parameters() if id(p) not in filled and not torch.isfinite(p).all()]
    if bad:  # a parameter the modules leave to the skipped init: it would train on garbage
        raise RuntimeError(f"host_model: uninitialised parameters ({', '.join(bad[:3])})")
    return model


def build(config, case: Case, dev: torch.device, lr: float):
    """(model, optimizer) of a randomly initialised bf16 model, built as `lisatune train` builds it under
    bf16-mixed with gradient checkpointing: the method prepares it, then builds its optimizer on the device
    (host_first: from the host, which LisaAdamW(device=...) quantizes and moves from)."""
    if host_first(case):
        model = host_model(config)
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    enable_checkpointing(model)
    if case.method == "qlora":  # peft adapts the nf4 linears that lisatune.quant puts in the blocks
        model = quantize_linears(model, "nf4")
    name, options = ("lora", case.options) if case.method == "qlora" else (case.method, case.options)
    if name == "lisa":
        options = {"n_layers": 2, "interval": LISA_INTERVAL, **options}
    method = build_method(name, options)
    model = method.prepare(model)
    opt = method.optimizer(model, lr, master_weights=method.mixed_precision, device=dev)
    model.train()
    return model, opt


def planned(config, case: Case, seq: int) -> dict:
    """Whatever the planner gives for the case (its fields change as it grows: all of them are kept)."""
    base = Setting(precision="bf16-mixed", batch=1, seq=seq, checkpointing=True)
    try:
        plan = plan_memory(config, parse_setting(case.spec, base))
    except Exception as e:  # a planner gap is a finding, not a reason to lose the measurement
        return {"error": f"{type(e).__name__}: {first_line(e)}"[:300]}
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    return dataclasses.asdict(plan) if dataclasses.is_dataclass(plan) else dict(vars(plan))


# -- CPU stand-ins for the dry run ----------------------------------------------------------------------
def _host_memory() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def stub_cuda() -> None:
    """Replace the torch.cuda calls this script and PhaseMemory make with CPU stand-ins (the process's RSS as
    "allocated"), so that the dry run goes through the code the GPU run takes."""
    rss = lambda *a, **k: rss_bytes() or 0  # noqa: E731
    nothing = lambda *a, **k: None  # noqa: E731
    for name, fn in {"synchronize": nothing, "empty_cache": nothing, "reset_peak_memory_stats": nothing,
                     "memory_allocated": rss, "memory_reserved": rss, "max_memory_allocated": rss,
                     "max_memory_reserved": rss, "mem_get_info": lambda *a, **k: _host_memory(),
                     "get_device_name": lambda *a, **k: "CPU (dry run)"}.items():
        setattr(torch.cuda, name, fn)


# -- 1. device checks -------------------------------------------------------------------------------
def _train(model, opt, batches, loss_fn=standard_loss) -> list[float]:
    losses = []
    for x in batches:
        loss = loss_fn(model, x, torch.ones_like(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def loss_falls(case: Case, dev: torch.device) -> dict:
    """20 steps on one fixed batch, the case built as at scale (tiny shape): the loss must fall."""
    model, opt = build(tiny_shape(), case, dev, lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    loss_fn = pick_loss(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}, fused=True)
    losses = _train(model, opt, [x] * 20, loss_fn)
    return {"first": round(losses[0], 4), "last": round(losses[-1], 4), "ok": losses[-1] < losses[0] - 1e-3}


def run_checks(dev: torch.device, with_bnb: bool) -> dict:
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    if with_bnb:
        out |= bnb_checks(dev)
    else:
        out |= engine_checks(dev)
    out["loss_falls"] = {name: loss_falls(case, dev) for name, case in CASES.items() if case.bnb == with_bnb}
    out["ok"] = all(v.get("ok", True) for v in [*out.values(), *out["loss_falls"].values()] if isinstance(v, dict))
    return out


def engine_checks(dev: torch.device) -> dict:
    data = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(i)).to(dev) for i in range(12)]
    # γ = N_L, no switching: torch AdamW, bitwise
    a, b = tiny_model(n_layers=4).to(dev), tiny_model(n_layers=4).to(dev)
    _train(a, LisaOptimizer(a, n_layers=4, interval=3, lr=1e-3), data)
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0), data)
    out = {"gamma_equals_adamw_bitwise": {"ok": _same(a, b)}}
    # a resume in mid-interval: bitwise
    a = tiny_model(n_layers=4).to(dev)
    _train(a, LisaOptimizer(a, n_layers=2, interval=3, lr=1e-3), data)
    b = tiny_model(n_layers=4).to(dev)
    ob = LisaOptimizer(b, n_layers=2, interval=3, lr=1e-3)
    _train(b, ob, data[:7])
    c = tiny_model(n_layers=4, seed=1).to(dev)
    oc = LisaOptimizer(c, n_layers=2, interval=3, lr=1e-3)
    c.load_state_dict(b.state_dict())
    oc.load_state_dict(ob.state_dict())
    _train(c, oc, data[7:])
    out["resume_bitwise"] = {"ok": _same(a, c)}
    # the fused loss = the model's own
    m, x = tiny_model(n_layers=2).to(dev), data[0]
    with torch.no_grad():
        diff = float((standard_loss(m, x, torch.ones_like(x), x) - fused_loss(m, x, torch.ones_like(x), x)).abs())
    out["fused_loss"] = {"abs_diff": diff, "ok": diff < 1e-4}
    return out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def int8_exact(q, x, y, up) -> dict:
    """lisatune's frozen int8 linear against F.linear with its dequantized weight in the compute dtype: output and
    input gradient to the bit, in train and in eval mode (the same cuBLAS calls)."""
    w = dequantize_int8(q.weight.data, q.weight.SCB, x.dtype)
    xr = x.detach().clone().requires_grad_()
    yr = F.linear(xr, w)
    yr.backward(up)
    q.eval()
    with torch.no_grad():
        y_eval = q(x)
    q.train()
    out = {"output_equal": torch.equal(y, yr), "input_grad_equal": torch.equal(x.grad, xr.grad),
           "eval_output_equal": torch.equal(y_eval, yr), "output_rel_err": _rel(y, yr)}
    return out | {"ok": out["output_rel_err"] < 1e-3 and _rel(x.grad, xr.grad) < 1e-3 and _rel(y_eval, yr) < 1e-3}


def linear8bitlt_error(bnb, w, x, y, dev) -> dict:
    """bitsandbytes' Linear8bitLt (threshold 0), which lisa.frozen_weights: int8 used before #26: on CUDA its matmul
    quantizes the activations to int8. Recorded, not judged: its output error against lisatune's frozen int8
    linear on the same weight, for Gaussian inputs and with one outlier feature."""
    q = bnb.nn.Linear8bitLt(512, 256, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
    q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to(dev)
    out = {}
    for mode in ("train", "eval"):
        q.train(mode == "train")
        with torch.no_grad():
            out[f"{mode}_rel_err"] = _rel(q(x), y)
    outlier = x.clone()
    outlier[:, 3] *= 20
    lin = nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        ours = frozen_module(FrozenInt8Linear, lin, "int8", dev)
        out["outlier_rel_err"] = _rel(q(outlier), ours(outlier))
    return out


def bnb_checks(dev: torch.device) -> dict:
    bnb = importlib.import_module("bitsandbytes")  # here only: the rest of the check runs without it
    out = {"bitsandbytes": bnb.__version__}
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(8, 512, generator=g).to(torch.bfloat16)
    up = torch.randn(8, 256, generator=g).to(torch.bfloat16)  # the gradient arriving from above
    for kind in ("nf4", "int8"):
        if kind == "nf4":
            q = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
            q.support_avx512bf16_for_cpu = False  # CPU: keep the differentiable layout (see quant/frozen.py)
            q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to(dev)
            deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
        else:  # what lisa.frozen_weights: int8 builds
            lin = nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            q = frozen_module(FrozenInt8Linear, lin, "int8", dev)
            deq = dequantize_int8(q.weight.data, q.weight.SCB, torch.float32)
        q.train()
        xq = x.to(dev).detach().clone().requires_grad_()
        yq = q(xq)
        yq.backward(up.to(dev))
        ref = torch.nn.Linear(512, 256, bias=False, device=dev, dtype=torch.float32)
        with torch.no_grad():
            ref.weight.copy_(deq.float())
        xr = x.to(dev).float().detach().requires_grad_()
        yr = ref(xr)
        yr.backward(up.to(dev).float())
        grad_err = _rel(xq.grad, xr.grad)
        out[f"{kind}_input_grad"] = {"rel_err": grad_err, "output_rel_err": _rel(yq, yr), "ok": grad_err < 2e-2}
        if kind == "int8":
            out["int8_frozen_exact"] = int8_exact(q, xq, yq, up.to(dev))
            out["int8_bnb_linear8bitlt"] = linear8bitlt_error(bnb, w, x.to(dev), yq, dev)
    # AdamW8bit against fp32 AdamW: 20 steps of the same gradients (a tensor above its 4096-value 8-bit minimum)
    p8 = torch.nn.Parameter(torch.randn(256, 64, generator=g).to(dev))
    p32 = torch.nn.Parameter(p8.detach().clone())
    start = p8.detach().clone()
    o8, o32 = bnb.optim.AdamW8bit([p8], lr=1e-3), torch.optim.AdamW([p32], lr=1e-3)
    for _ in range(20):
        grad = torch.randn(256, 64, generator=g).to(dev)
        p8.grad, p32.grad = grad.clone(), grad.clone()
        o8.step()
        o32.step()
    d8, d32 = p8.detach() - start, p32.detach() - start
    err = float((d8 - d32).norm() / d32.norm())
    out["adamw8bit_vs_adamw"] = {"rel_err_of_update": err, "ok": err < 0.1}
    # int8 frozen blocks are not a case at scale (the list is the issue's): the loss must still fall with them
    out["int8_frozen_loss_falls"] = loss_falls(INT8_CASE, dev)
    return out


# -- 2. a case at scale ---------------------------------------------------------------------------------
def _mem_info(dev: torch.device) -> dict:
    free, total = torch.cuda.mem_get_info(dev)
    return {"free": free, "total": total, "used": total - free}


def run_case(case: Case, config, dev: torch.device, seq: int, steps: int) -> dict:
    row = {"label": case.label, "seq": seq, "steps": steps}
    row["planned"] = planned(config, case, seq)
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    model, opt = build(config, case, dev, lr=1e-5)
    torch.cuda.synchronize(dev)
    row["build"] = {"path": "host, then LisaAdamW(device=...)" if host_first(case) else "on the device",
                    "seconds": round(time.perf_counter() - t0, 1), "host_rss": rss_bytes()}
    fw = getattr(opt, "frozen_weights", None)
    if fw is not None:  # what arrived quantized, and the full-precision copies left on the host
        row["build"] |= {"quantized_blocks": len(fw.quantized_blocks()),
                         "host_copies_on_host": all(t.device.type == "cpu" for t in fw.host.values())}
    # setup_peak_allocated: the device's allocated peak from the build to the built optimizer (host_first: the
    # quantization's transients and the moved rest, never the whole model in bf16)
    row["static"] = {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                     "setup_peak_allocated": torch.cuda.max_memory_allocated(dev), "mem_get_info": _mem_info(dev)}
    x = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(x)
    loss_fn = pick_loss(model, {"input_ids": x, "attention_mask": mask, "labels": x}, fused=True)  # as the recipe
    switched = []
    register = getattr(opt, "register_switch_pre_hook", None)  # LISA only
    hook = register(lambda _opt: switched.append(True)) if register else None
    mem = PhaseMemory(METER, opt)  # resets the peaks: the build is in "static", not in the phases
    times: dict[str, list[float]] = {"plain": [], "switch": []}
    losses = []
    for i in range(steps + 1):  # step 0 warms up (kernels, cuBLAS workspace) and is not timed
        switched.clear()
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with mem.phase("forward"):
            loss = loss_fn(model, x, mask, x)
        with mem.phase("backward"):
            loss.backward()
        with mem.phase("step"):  # LISA's switch, at the end of step(), is a phase of its own
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        if i:
            times["switch" if switched else "plain"].append(time.perf_counter() - t0)
        losses.append(loss.item())
    peaks = mem.summary()
    mem.close()
    if hook is not None:
        hook.remove()
    row["measured"] = {"phases_mib": peaks.get("phases", {}), "peak_allocated_mib": peaks.get("peak_allocated_mib"),
                       "peak_reserved_mib": peaks.get("peak_reserved_mib"), "mem_get_info": _mem_info(dev)}
    median = {k: statistics.median(v) if v else None for k, v in times.items()}
    row["step_s"] = {"plain_median": median["plain"], "switch_median": median["switch"],
                     "plain_n": len(times["plain"]), "switch_n": len(times["switch"])}
    every = times["plain"] + times["switch"]
    row["tokens_per_s"] = {"plain": seq / median["plain"] if median["plain"] else None,
                           "overall": seq * len(every) / sum(every)}
    row["loss"] = {"first": losses[0], "last": losses[-1]}
    row["loss_fn"] = "fused" if loss_fn is fused_loss else "model"
    return row


# -- one process: the tasks it is given, one result line each -----------------------------------------
def child(args) -> int:
    if args.dry_run:
        stub_cuda()
    dev = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device", flush=True)
        return 2
    config = tiny_shape() if args.dry_run else shape_config(args.shape)
    for name in args.task:
        if os.environ.get(FAULT_ENV) == name:
            os._exit(70)  # as a CUDA fault that kills the process would
        print(f"-- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            row = run_checks(dev, CHECKS[name]) if name in CHECKS else run_case(CASES[name], config, dev,
                                                                                args.seq, args.steps)
        except torch.cuda.OutOfMemoryError:
            row = {"error": "OOM"}
        except Exception as e:
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {first_line(e)}"[:400]}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(args.result, "a") as f:
            f.write(json.dumps({"task": name, **row}, default=str) + "\n")
        if "error" in row:  # the rest run in a fresh process: a CUDA error can leave this one unusable
            return 0
    return 0


# -- the parent: tasks in processes, results written as they come ----------------------------------------
class Report:
    """gpu_check.json and gpu_check.log, both rewritten/appended as each task ends."""

    def __init__(self, out: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out / "gpu_check.json", out / "gpu_check.log"
        self.log_path.write_text("")
        self.data = {**meta, "results": {}}

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def record(self, name: str, row: dict) -> None:
        self.data["results"][name] = row
        self.save()
        self.say(f"{name}: {summary(row)}")

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.json_path)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def summary(row: dict) -> str:
    if "error" in row or "skipped" in row:
        return row.get("error") or f"skipped ({row['skipped']})"
    if "measured" not in row:  # a check
        failed = [k for k, v in {**row, **row.get("loss_falls", {})}.items()
                  if isinstance(v, dict) and v.get("ok") is False]
        return "ok" if row.get("ok") else f"FAILED: {', '.join(failed)}"
    m, plan, st = row["measured"], row["planned"], row["step_s"]
    fmt = lambda s: "-" if s is None else f"{s:.3f} s"  # noqa: E731
    line = (f"peak {_size(m['peak_allocated_mib'] * MIB)} allocated, {_size(m['peak_reserved_mib'] * MIB)} reserved, "
            f"static {_size(row['static']['allocated'])}; step {fmt(st['plain_median'])} (switch "
            f"{fmt(st['switch_median'])}), {row['tokens_per_s']['overall']:.0f} tok/s")
    # planned / measured per phase, where the planner names the phase (its fields are its own to change)
    phases = m["phases_mib"]
    measured = {"static": row["static"]["allocated"],
                "fwd_bwd": max(phases.get(p, {}).get("peak_allocated_mib", 0) for p in ("forward", "backward")) * MIB,
                "step": phases.get("step", {}).get("peak_allocated_mib", 0) * MIB,
                "switch": phases.get("switch", {}).get("peak_allocated_mib", 0) * MIB, "peak": m["peak_allocated_mib"] * MIB}
    pairs = [f"{k} {_size(plan[k])} / {_size(v)}" for k, v in measured.items() if isinstance(plan.get(k), (int, float))]
    if isinstance(plan.get("allowance"), (int, float)):
        pairs.append(f"allowance {_size(plan['allowance'])} / reserved-allocated "
                     f"{_size((m['peak_reserved_mib'] - m['peak_allocated_mib']) * MIB)}")
    return line + ("\n    planned / measured: " + ", ".join(pairs) if pairs else "")


def launch(cmd: list[str], result: Path, timeout: float, log_path: Path) -> tuple[dict, str]:
    """Run one child; (its result rows by task, "ok" | "timed out after N s" | "exit code N: last log line").
    Its output goes to the log as it runs; rows it wrote before a crash or a timeout are kept."""
    result.unlink(missing_ok=True)
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    rows = {}
    if result.exists():
        for line in result.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row.pop("task")] = row
    if status.startswith("exit"):
        with open(log_path, errors="replace") as f:
            f.seek(start)
            lines = [s for s in f.read().splitlines() if s.strip()]
        status += f": {lines[-1][:300]}" if lines else ""
    return rows, status


def parent(args) -> int:
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    meta = {"command": " ".join(sys.argv), "dry_run": args.dry_run, "shape": "tiny" if args.dry_run else args.shape,
            "seq": args.seq, "steps": args.steps, "lisa_interval": LISA_INTERVAL, "checkpointing": True,
            "precision": "bf16-mixed", "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes_present": have_bnb, "finished": False}
    report = Report(Path(args.out), meta)
    report.say(f"gpu_check {'dry run' if args.dry_run else args.shape}: tasks {', '.join(args.only)}")
    report.data["results"] = {name: {"pending": True} for name in args.only}  # in run order; each replaced as it ends
    started = time.monotonic()
    pending = []
    for name in args.only:
        if (CHECKS.get(name) if name in CHECKS else CASES[name].bnb) and not have_bnb:
            report.record(name, {"skipped": "bitsandbytes is not installed"})
        else:
            pending.append(name)
    result = Path(args.out) / "task-result.jsonl"
    per = args.per_process or len(pending)
    while pending:
        left = args.budget - (time.monotonic() - started)
        if left < args.min_task_s:  # the whole run must end inside the device tool's limit
            for name in pending:
                report.record(name, {"error": f"not run: the {args.budget:.0f} s budget was spent"})
            break
        group = pending[:per]
        cmd = [sys.executable, str(SCRIPT), "--task", *group, "--result", str(result), "--shape", args.shape,
               "--seq", str(args.seq), "--steps", str(args.steps)] + (["--dry-run"] if args.dry_run else [])
        rows, status = launch(cmd, result, min(args.task_timeout * len(group), left), report.log_path)
        for name in group:
            if name in rows:
                pending.remove(name)
                report.record(name, rows[name])
        missing = [n for n in group if n not in rows]
        if missing and (status != "ok" or not rows):  # it died (or said nothing) in the first missing task
            pending.remove(missing[0])
            report.record(missing[0], {"error": status if status != "ok" else "the process wrote no result"})
    result.unlink(missing_ok=True)
    report.data["wall_s"] = round(time.monotonic() - started, 1)
    report.data["finished"] = True
    report.save()
    report.say(f"written: {report.json_path} ({report.data['wall_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--shape", default="Llama-3.1-8B", help=f"a built-in shape ({', '.join(SHAPES)})")
    ap.add_argument("--only", nargs="+", choices=TASKS, default=TASKS, metavar="TASK",
                    help=f"tasks to run, in their order ({', '.join(TASKS)})")
    ap.add_argument("--seq", type=int, help="tokens per step, batch 1 (default 1024; dry run 32)")
    ap.add_argument("--steps", type=int, help="timed steps per case after one warm-up (default 8; dry run 4)")
    ap.add_argument("--task-timeout", type=float, default=150, help="seconds one task's process may take")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run: later tasks are not started")
    ap.add_argument("--min-task-s", type=float, default=30, help="no task starts with less of the budget left")
    ap.add_argument("--per-process", type=int, help="tasks per process (default 1; dry run 0: all in one)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, CUDA calls stubbed")
    ap.add_argument("--task", nargs="+", choices=TASKS, help=argparse.SUPPRESS)  # a child: run these
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seq = args.seq or (32 if args.dry_run else 1024)
    args.steps = args.steps or (4 if args.dry_run else 8)
    if args.per_process is None:
        args.per_process = 0 if args.dry_run else 1
    if shape_config(args.shape) is None:
        ap.exit(2, f"gpu_check: --shape {args.shape} is not a built-in shape ({', '.join(SHAPES)})\n")
    if args.seq < 2 or args.steps < 1 or args.per_process < 0:
        ap.exit(2, "gpu_check: --seq must be >= 2, --steps >= 1 and --per-process >= 0\n")
    if args.task:
        return child(args)
    args.only = [t for t in TASKS if t in args.only]  # always in the order above: bitsandbytes last
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())

"""Write docs/scale.md: `lisatune plan` on the paper's settings, a third-party H100 setting and lisatune's own.

    PYTHONPATH=src python benchmarks/scale.py            # about eight minutes on 2 shared CPU cores, no GPU, no download

Every table in the page is the printed output of the `lisatune plan` command shown above it (run here
through lisatune.cli.main with the same arguments); every figure the prose quotes is read from a plan here.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from lisatune.analysis.plan import GIB, MemoryPlan, Setting, parse_setting, plan_memory
from lisatune.analysis.shapes import shape_config
from lisatune.cli import main
from lisatune.engine.masters import CHUNK_BYTES

OUT = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
PAPER = "lisatune plan --batch 1 --seq 1024 --checkpointing off --loss standard"
OURS = "lisatune plan --batch 1 --seq 1024 --precision bf16-mixed --checkpointing on --loss fused"
TABLE1 = "--method full lora:r=128 lisa:gamma=0 lisa:gamma=1 lisa:gamma=2 lisa:gamma=4"
OUR_METHODS = "--method full lora lisa lisa:embed_head=false"
QUANT_SPECS = ["lora", "qlora", "lisa", "lisa:eh_state=8bit", "lisa:embed_head=false", "lisa:embed_head=false,frozen=nf4",
               "lisa:eh_state=8bit,frozen=nf4", "lisa:embed_head=false,frozen=int8"]
BASE = Setting(precision="bf16-mixed", batch=1, seq=1024, checkpointing=True, loss="fused")  # = OURS
CAPPED = replace(BASE, step_chunk=CHUNK_BYTES)  # = OURS --step-chunk 256MiB
BIG = ("Llama-2-70B", "Llama-3.1-70B")
BIG_SPECS = ["lisa:embed_head=false,frozen=nf4", "lisa:eh_state=8bit,frozen=nf4"]
HOST_LIMIT = 64 * 10**9  # #27's target: host RAM (private) of 64 GB
# The third-party H100 figures (issue #14): LISA γ=2 52.1 GB, LoRA r=16 34.6 GB; what the planner matches them with
H100 = Setting(precision="fp32", batch=1, seq=1024, checkpointing=True, loss="standard")
REPORTED = {"lisa": 52.1, "lora": 34.6}


@functools.cache
def plan(model: str, spec: str, setting: Setting = BASE) -> MemoryPlan:
    return plan_memory(model, parse_setting(spec, setting))


def run(command: str) -> str:
    argv = shlex.split(command)[1:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    if rc != 0:
        sys.exit(f"failed ({rc}): {command}")
    return f"```bash\n{command}\n```\n\n{out.getvalue().replace('### ', '#### ')}\n"


def g(v: int) -> str:
    return f"{v / GIB:,.2f}"


def h100_comparison() -> str:
    """The reported figures beside the planner's fp32 rows (which they fit) and its bf16-mixed rows (which they do
    not), each as tensor peak and as total with the device allowance."""
    rows = ["| | LISA γ=2 (E+H+2L) | LoRA r=16 | LISA − LoRA | LISA / LoRA |", "|---|---:|---:|---:|---:|",
            f"| reported (issue #14; H100, batch and length not stated there) | {REPORTED['lisa']} GB | "
            f"{REPORTED['lora']} GB | {REPORTED['lisa'] - REPORTED['lora']:.1f} GB | "
            f"{REPORTED['lisa'] / REPORTED['lora']:.2f} |"]
    for what, setting in (("fp32, checkpointing on, standard loss", H100),
                          ("bf16-mixed, checkpointing on, standard loss", replace(H100, precision="bf16-mixed")),
                          ("bf16-mixed, checkpointing off, standard loss",
                           replace(H100, precision="bf16-mixed", checkpointing=False))):
        lisa, lora = plan("Llama-3.1-8B", "lisa", setting), plan("Llama-3.1-8B", "lora", setting)
        for name, get in (("tensor peak", lambda p: p.peak), ("with the device allowance", lambda p: p.total)):
            a, b = get(lisa), get(lora)
            rows.append(f"| planned, {what}, {name} | {g(a)} GiB | {g(b)} GiB | {(a - b) / GIB:,.2f} GiB | "
                        f"{a / b:.2f} |")
    return "\n".join(rows) + "\n"


def targets() -> str:
    """The memory targets at Llama-3.1-8B, 1 x 1024, bf16-mixed, checkpointing on, fused loss: met or not, on the
    tensor peak and on the total with the device allowance."""
    p = {spec: plan("Llama-3.1-8B", spec) for spec in QUANT_SPECS}
    lora, qlora = p["lora"], p["qlora"]

    def row(target: str, q: MemoryPlan, against: str, limit: int, total_limit: int | None = None, strict=False) -> str:
        def ok(v, lim):
            return "**met**" if (v < lim if strict else v <= lim) else "not met"
        total_limit = limit if total_limit is None else total_limit
        return (f"| {target} | {q.label} | {g(q.peak)} | {g(q.total)} | {against} | {ok(q.peak, limit)} | "
                f"{ok(q.total, total_limit)} |")

    lines = ["### The targets, as the planner puts them (Llama-3.1-8B, batch 1 x 1024, bf16-mixed, checkpointing "
             "on, fused loss; GiB)", "",
             "| target | LISA setting | tensor peak | total (+ allowance) | against | peak | total |",
             "|---|---|---:|---:|---|---|---|"]
    lora_s = f"LoRA r=16: peak {g(lora.peak)}, total {g(lora.total)}"
    lines.append(row("#26: E/H frozen + nf4 ≤ LoRA r=16", p["lisa:embed_head=false,frozen=nf4"], lora_s, lora.peak,
                     lora.total))
    eight = p["lisa:eh_state=8bit,frozen=nf4"]
    lines.append(row("#26: 8-bit E/H + nf4 < 24 GB with the allowance", eight, "24 GiB", 24 * GIB, strict=True))
    one = plan("Llama-3.1-8B", "lisa:eh_state=8bit,frozen=nf4,gamma=1")
    lines.append(row("#26: the same at γ = 1", one, "24 GiB", 24 * GIB, strict=True))
    capped = plan("Llama-3.1-8B", "lisa:eh_state=8bit,frozen=nf4", CAPPED)
    lines.append(row("#26: the same, master step capped at 256 MiB", capped, "24 GiB", 24 * GIB, strict=True))
    for spec in ("lisa:eh_state=8bit", "lisa:embed_head=false", "lisa:embed_head=false,frozen=int8"):
        lines.append(row("#14: LISA ≤ LoRA r=16, the always-on set 8-bit or frozen", p[spec], lora_s, lora.peak,
                         lora.total))
    for spec in ("lisa:eh_state=8bit,frozen=nf4", "lisa:embed_head=false,frozen=nf4"):
        lines.append(row("#15: LISA with nf4 frozen blocks ≤ QLoRA r=16", p[spec],
                         f"QLoRA r=16: peak {g(qlora.peak)}, total {g(qlora.total)}", qlora.peak, qlora.total))
    lines += ["", "LISA's fp32 masters + optimizer state against the ideal for its trained set (a master and two "
              "moments per trained value, in the state's own precision, and nothing else; the 1.02 target):", "",
              "| LISA setting | trained params | masters + state GiB | ideal GiB | ratio | ≤ 1.02? |",
              "|---|---:|---:|---:|---:|---|"]
    for spec, q in p.items():
        if spec.startswith("lisa"):
            lines.append(f"| {q.label} | {q.trainable / 1e6:,.1f}M | {(q.masters + q.state) / GIB:,.3f} | "
                         f"{q.ideal / GIB:,.3f} | {q.state_ratio:.4f} | {'yes' if q.state_ratio <= 1.02 else 'no'} |")
    return "\n".join(lines) + "\n\n" + targets_after(p, one)


def targets_after(p: dict[str, MemoryPlan], one: MemoryPlan) -> str:
    lora, frozen, eight = p["lora"], p["lisa:embed_head=false,frozen=nf4"], p["lisa:eh_state=8bit,frozen=nf4"]
    capped = plan("Llama-3.1-8B", "lisa:eh_state=8bit,frozen=nf4", CAPPED)
    blocks = 4 * p["lisa:embed_head=false"].trainable  # the two blocks' (and the final norm's) values, in fp32
    return f"""So, by the planner: LISA with the embedding and head frozen and nf4 frozen blocks needs {g(frozen.peak)} GiB
of tensors at its peak ({g(frozen.total)} GiB with the device allowance), under LoRA r=16's {g(lora.peak)}
({g(lora.total)}): that target holds. With the embedding and head trained, their AdamW state in 8 bits and nf4
frozen blocks, the tensor peak is {g(eight.peak)} GiB, at the optimizer step: {g(eight.static)} GiB static, {g(eight.grads)}
GiB of bf16 gradients and the step's transient, {g(eight.step_transient)} GiB. By default the chunks pack consecutive
tensors up to the largest one's fp32 size (the embedding's, 128,256 x 4,096 values: 1.96 GiB, stepped by AdamW8bit
with no temporary), so the two active blocks' tensors form one chunk: {g(blocks)} GiB of fp32 gradients and, for
foreach AdamW, one moment of them as much again. With the device allowance ({g(eight.allowance)} GiB) that is
{g(eight.total)} GiB: not under 24 GiB. **With the master step capped at 256 MiB** (`--step-chunk 256MiB`, the
engine's `Masters(chunk_bytes=256 MiB)`: a tensor above the cap, here the embedding and the head, is stepped in
slices of consecutive values, bitwise as the whole tensor), the step's transient falls to
{capped.step_transient / 2**20:,.0f} MiB, the step to {g(capped.step)} GiB and the peak to {g(capped.peak)} GiB
({'forward+backward' if capped.peak == capped.fwd_bwd else 'the step'}): **{g(capped.total)} GiB with the
allowance, under 24 GiB** ({capped.total / 1e9:.1f} GB). It also holds with `lisa.n_layers: 1` (γ = 1:
{g(one.peak)} GiB, {g(one.total)} GiB with the allowance). Before the chunked master step (issue #26) an fp32 copy
of every trained gradient was held at once: 4 bytes x {eight.trainable / 1e9:.2f} B =
{4 * eight.trainable / GIB:.2f} GiB instead of {g(eight.step_transient)} (or {capped.step_transient / 2**20:,.0f} MiB capped).

#15's "≤ QLoRA r=16" is not met by any LISA setting: LISA trains whole blocks in mixed precision (16 bytes per trained
parameter), QLoRA 42 M fp32 adapters. The state ratio is 1.000 with fp32 state (the 4-byte step per tensor) and
1.003 with the 8-bit E/H state (its fp32 absmax, 1/64 of the 8-bit moments): within 1.02. Host memory is its own
line: with nf4 (or int8) frozen blocks the host holds a bf16 copy of every block's linears, {g(frozen.host)} GiB at 8B,
the checkpoint's mapped pages for the blocks that never trained and private RAM for those that did (section 5).
These are plans; the measured CUDA peaks per phase come from `benchmarks/gpu_check.py` (docs/gpu.md), which also
calibrates the device allowance.
"""


def paper_text() -> str:
    full = plan("Llama-2-7B", "full", Setting(precision="bf16", batch=1, seq=1024, loss="standard"))
    mixed = plan("Llama-2-7B", "full", Setting(precision="bf16-mixed", batch=1, seq=1024, loss="standard"))
    rows = {m: (plan(m, "lisa:gamma=4", Setting(precision="bf16", batch=1, seq=1024, loss="standard")),
                plan(m, "lora:r=128", Setting(precision="bf16", batch=1, seq=1024, loss="standard")))
            for m in ("Llama-2-7B", "Llama-2-70B")}
    (l7, r7), (l70, r70) = rows["Llama-2-7B"], rows["Llama-2-70B"]
    return f"""The paper's Table 1 compares full fine-tuning, LoRA (ranks 128 and up) and LISA with E+H, E+H+2L and
E+H+4L on LLaMA-2-7B and -70B at batch 1; for its measured GB see the paper's Table 1 (not quoted here).
It does not say how AdamW's state is held; its abstract's "a 7B model typically requires at least 60 GB of
GPU memory with full parameter training" fits AdamW in bf16 (the full row below: {g(full.fwd_bwd)} GiB =
{full.fwd_bwd / 1e9:.1f} GB through forward and backward, {g(full.step)} GiB = {full.step / 1e9:.1f} GB at the optimizer
step) and not mixed precision with fp32 masters and state (the bf16-mixed table: {g(mixed.peak)} GiB). The model's
own loss (`--loss standard`), as in the paper's code. The plan agrees with the abstract's "similar or less GPU
memory consumption" than LoRA: LISA E+H+4L is below LoRA r=128 at 7B ({g(l7.peak)} against {g(r7.peak)} GiB) and
at 70B ({g(l70.peak)} against {g(r70.peak)} GiB), LoRA's larger activations (see section 2) outweighing its
smaller trainable set.

"""


def page() -> str:
    t0 = time.perf_counter()
    parts = [HEAD]
    parts += ["## 1. The paper's Table 1 setting: batch 1, 1024 tokens, no checkpointing\n\n", paper_text()]
    for model in ("Llama-2-7B", "Llama-2-70B"):
        parts.append(run(f"{PAPER} --model {model} --precision bf16 {TABLE1}"))
    parts.append(MIXED_TEXT)
    parts.append(run(f"{PAPER} --model Llama-2-7B --precision bf16-mixed {TABLE1}"))
    parts.append(EAGER_TEXT)
    parts.append(run(f"{PAPER} --model Llama-2-7B --precision bf16 --attention eager --method full lora:r=128 "
                     "lisa:gamma=2"))
    parts += ["## 2. A third-party H100 measurement: Llama-3.1-8B, LISA γ=2 against LoRA r=16\n\n",
              H100_TEXT, h100_comparison(), "\n",
              run("lisatune plan --model Llama-3.1-8B --method lora lisa --precision fp32 --batch 1 "
                  "--seq 1024 --checkpointing on --loss standard"),
              run("lisatune plan --model Llama-3.1-8B --method lora lisa --precision bf16-mixed --batch 1 "
                  "--seq 1024 --loss standard"), h100_after()]
    parts += ["## 3. lisatune's settings: bf16-mixed, checkpointing on, fused loss, E/H frozen\n\n", OURS_TEXT]
    for model, gpu in (("Llama-3.1-8B", "24GB"), ("Llama-2-7B", "24GB"), ("Mistral-7B", "24GB"),
                       ("Qwen2.5-3B", "24GB"), ("Llama-2-70B", "80GB")):
        parts.append(run(f"{OURS} --model {model} {OUR_METHODS} --gpu {gpu}"))
    parts.append(ours_after())
    parts += ["\n## 4. Quantized memory: 8-bit E/H state, nf4 / int8 frozen blocks, QLoRA\n\n", QUANT_TEXT]
    for model, gpu in (("Llama-3.1-8B", "24GB"), ("Llama-2-7B", "24GB"), ("Llama-2-70B", "80GB")):
        parts.append(run(f"{OURS} --model {model} --method {' '.join(QUANT_SPECS)} --gpu {gpu}"))
    parts.append(run(f"{OURS} --model Llama-3.1-8B --method lisa:eh_state=8bit,frozen=nf4 "
                     "lisa:embed_head=false,frozen=nf4 --step-chunk 256MiB --gpu 24GB"))
    parts += [quant_after(), targets()]
    parts += ["\n## 5. 70B: one 80 GB card with nf4 frozen blocks, or FSDP2 over 4 and 8 cards\n\n", BIG_TEXT]
    for model in BIG:
        parts.append(run(f"{OURS} --model {model} --method {' '.join(BIG_SPECS)} --step-chunk 256MiB --gpu 80GB "
                         "--trained-blocks 2"))
    parts.append(big_after())
    for model in BIG:
        for world in (4, 8):
            parts.append(run(f"{OURS} --model {model} --method lisa --world {world} --distributed fsdp --gpu 80GB"))
    parts.append(fsdp_after())
    logging.getLogger(__name__).info("%.0f s", time.perf_counter() - t0)
    return "".join(parts)


HEAD = """# Memory at scale: `lisatune plan` on the paper's settings

`lisatune plan` predicts the memory of one fine-tuning step from a model's config alone, phase by phase: the
model is built on the meta device (no weights, no download), prepared by the real method (peft for LoRA,
LisaAdamW for LISA) and run forward and backward on meta token ids, and `recipe/meter.py` counts what
`lisatune bench memory` counts on a real run. On tiny models of three architectures (llama, gpt2, qwen2), fp32
and bf16-mixed, `tests/test_plan.py` holds weights, gradients, fp32 masters and optimizer state equal to a real
run to the byte and activations equal (within 5 %), and each planned phase against the peak torch's CPU allocator
reports for that phase of a real run (torch.profiler's memory events, what `torch.cuda.max_memory_allocated`
reads per phase on a GPU): static, optimizer step and switch to the bytes of the model's rotary buffers, and
forward+backward and the peak within 5 % (within 2 % in those runs), also with checkpointing, the model's own
loss and SDPA attention.

How to read the tables (every size in GiB = 2^30 bytes; published figures are in GB as published):

* **weights / grads / fp32 masters / optimizer state / activations** are counted, as `bench memory` counts
  them. Gradients exist for the trainable parameters only. `bf16` keeps AdamW's two moments in bf16 (what
  `model.dtype: bf16` does in `lisatune train`); `bf16-mixed` keeps bf16 weights and gradients plus fp32
  master weights and fp32 moments for the trainable parameters (16 bytes per trainable parameter). LoRA's
  adapters stay fp32 either way (peft's default), with no master copy.
* **loss**: for the model's own loss (`standard`) its log-softmax over the logits is an activation; the
  column adds the logits' gradients in backward (estimated from shapes). For the fused loss (lisatune's
  default) the column is the gradient of the hidden states it holds (counted) plus one chunk of logits and,
  when the head trains in bf16, the fp32 accumulator of the head's gradient (estimated).
* **recompute** (checkpointing on): what one block saves again while backward recomputes it (counted).
* The phases: **static** = weights + masters + state between steps (no gradients: zero_grad frees them);
  **fwd+bwd** = static + the most forward and backward hold at once (backward frees each block's activations
  once it made that block's gradients, top block first: the largest of the end of forward, each block's
  backward and the end); **step** = static + gradients + the step's transient: under bf16-mixed the master step
  (engine/masters.py) walks the trained tensors in chunks of at most the largest one, each with its fp32
  gradients and foreach AdamW's temporary (one moment of the chunk), so at most 8 bytes per value of the largest
  trained tensor; in fp32 one moment of the largest parameter group; **switch** (LISA) = its start, static +
  gradients (the switch frees the old set's masters, state and gradients before it makes the new set's masters).
  **peak** = the largest phase.
* **device allowance**, beside the peak and not in it: the CUDA context (512 MiB), cuBLAS's workspaces
  (2 x 40.1 MiB on Hopper) and the caching allocator's slack (5 % of the peak): public figures, named constants
  in `analysis/plan.py`, to be calibrated from the first GPU run's `mem_get_info` and reserved-minus-allocated.
  **total** = peak + allowance; `--gpu` tests the total (`--reserve SIZE` holds back a fixed size instead).
* **host RAM / host mapped** (when a row has any): quant/frozen.py keeps a full-precision copy of every quantized
  block's linears on the host. A block that never trained needs no copy of its own: with the model loaded on the
  host, its weights are the checkpoint's safetensors pages (**host mapped**: file pages, reclaimable, not RAM the
  run needs). **host RAM** (private) is the copies of the blocks that trained (`--trained-blocks`, default every
  block: a long run's steady state) and offloaded optimizer state (`lisa:state_policy=offload`).
* **per rank** (`--world N --distributed fsdp`): FSDP2's shards of parameters, gradients, masters and state,
  plus the unsharded transients of forward and backward (section 5).
* LISA is planned with the γ lowest blocks active (backward then runs through every block: the most
  activations; gradients and state are the same for any γ blocks). "E+H" is the embedding and head,
  always trained in the paper; `lisa:gamma=0` (E+H alone) exists in the planner only, the engine needs
  γ >= 1. Attention is a fused SDPA kernel (no s x s weights saved) unless a table says `eager`. Every
  position is labelled.

Regenerate this page with `PYTHONPATH=src python benchmarks/scale.py` (no GPU, no download).

"""

MIXED_TEXT = """The same 7B rows with fp32 master weights and AdamW state (`bf16-mixed`): full fine-tuning needs 16 bytes
per parameter before activations, LISA 16 per trainable one.

"""

EAGER_TEXT = """Attention matters as much as the method at this length: the eager attention saves the 1024 x 1024 weights
of every head in every block (softmax output and dropout input).

"""

H100_TEXT = """Reported in issue #14 (a third-party measurement on an H100): LISA 52.1 GB against LoRA r=16 34.6 GB, i.e.
LISA needed more than LoRA. The batch, sequence length, precision, attention kernel and how the GB were read
(allocated or reserved, 10^9 or 2^30) are not stated. Earlier versions of this page read them as bf16-mixed; they
fit the planner's **fp32** rows instead (batch 1 x 1024, checkpointing on, the model's own loss), shown beside
the bf16-mixed ones here, each as the tensor peak and with the device allowance:

"""


def h100_after() -> str:
    lisa, lora = plan("Llama-3.1-8B", "lisa", H100), plan("Llama-3.1-8B", "lora", H100)
    mixed = replace(H100, precision="bf16-mixed")
    mlisa, mlora = plan("Llama-3.1-8B", "lisa", mixed), plan("Llama-3.1-8B", "lora", mixed)
    eh = 2 * 128256 * 4096
    return f"""Reading them: in fp32 with checkpointing on the planner puts LISA at {g(lisa.peak)} GiB and LoRA at
{g(lora.peak)} GiB of tensors, {g(lisa.total)} and {g(lora.total)} GiB with the device allowance, against 52.1 and
34.6 reported: the LoRA figure matches the total, the LISA one lies between the planned peak and total; the gap,
{(lisa.peak - lora.peak) / GIB:.1f} GiB planned, is close to the 17.5 GB reported. In bf16-mixed both would be far lower
({g(mlisa.peak)} and {g(mlora.peak)} GiB with checkpointing), and LISA's excess over LoRA ({(mlisa.peak - mlora.peak) / GIB:.1f}
GiB) would be larger relative to LoRA. Where the gap comes from: Llama-3.1-8B's untied embedding and head are
2 x 128,256 x 4,096 = {eh / 1e9:.2f} B parameters, {eh / lisa.trainable:.0%} of LISA's {lisa.trainable / 1e9:.2f} B
trainable ones; in fp32 each costs 12 bytes beyond its weight (gradient and two moments), plus the optimizer step's
transient, one moment of the largest parameter group. LoRA's 42 M adapters cost 0.5 GB beyond their weights.
LoRA's activations are larger than LISA's (peft casts the input of each of the seven adapted linears to the
adapters' dtype, where each saves its own copy). Freezing the embedding and head (section 3) removes the E+H term.

"""


OURS_TEXT = """What lisatune runs by default on a GPU, with the two changes that matter most at this scale: gradient
checkpointing and the embedding/head frozen (`lisa:embed_head=false`, i.e. `lisa.train_embedding: false`,
`lisa.train_head: false`). `--gpu` answers whether each method fits (its total, with the device allowance) and,
if not, which changes the planner finds that make it fit, each named by the config keys that make it (each
computed with the same planner).

"""


def ours_after() -> str:
    eh = plan("Llama-3.1-8B", "lisa")
    frozen = plan("Llama-3.1-8B", "lisa:embed_head=false")
    big = plan("Llama-2-70B", "lisa:embed_head=false")
    return f"""Reading these: with checkpointing on, activations fall to the blocks' inputs ({g(eh.activations)} GiB at 8B),
so the weights and the trained set decide. LISA with E+H trains {eh.trainable / 1e9:.2f} B parameters of
Llama-3.1-8B (its 128k vocabulary makes E+H large) and needs {g(eh.total)} GiB with the allowance; with E/H frozen
it trains {frozen.trainable / 1e9:.2f} B and needs {g(frozen.peak)} GiB of tensors, {g(frozen.total)} with the
allowance, the {('optimizer step' if frozen.peak == frozen.step else 'forward+backward')} being the peak (the chunked
master step's transient is one MLP matrix's fp32 gradient and moment, {frozen.step_transient / 2**20:,.0f} MiB).
LoRA r=16 stays the smallest of the unquantized methods. At 70B the bf16 weights alone ({g(big.weights)} GiB) exceed
one 80 GiB GPU for every method: it needs sharding (FSDP2: `distributed: fsdp`) or quantization, which `--gpu`
tries (nf4 frozen blocks for LISA, an nf4 base for LoRA; section 4).
"""


QUANT_TEXT = """bitsandbytes' storage, planned from the shapes (`analysis/plan.py` with `quant/sizes.py`; `tests/test_quant.py`
holds each formula equal to the tensors bitsandbytes holds for real layers and optimizers, and `tests/test_plan.py`
holds the planned weights, gradients, state, activations and host copies equal to a real lisatune run on tiny
models, to the byte):

* **nf4** (`lisa:frozen=nf4`: `lisa.frozen_weights: nf4`; `qlora`: peft LoRA on an nf4 base, i.e.
  `lora:base=nf4`): per linear of n values, n/2 bytes of packed 4-bit values, one uint8 absmax per 64 values
  (double quantization, bitsandbytes' default `compress_statistics=True`, which lisatune and QLoRA use), an
  fp32 offset, one fp32 scale per 256 absmax and the layer's own copies of the nf4 code (64 B) and of the
  absmax map (1 KiB): 0.516 bytes per value. The bias, the norms, the embedding and the head stay bf16 (QLoRA
  here quantizes the blocks' linears, as `lisatune.quant.quantize_linears` does, and keeps peft's fp32 adapters).
* **int8** (`lisa:frozen=int8`): one int8 per value and an fp32 scale per output row (bitsandbytes' `Int8Params`
  in lisatune's `FrozenInt8Linear`, which computes x @ dequant(W).T on every device). It keeps no input (the
  weight is dequantized again in backward): for a moment in each call it holds one linear's weight dequantized
  in the compute dtype, which forward+backward adds. (bitsandbytes' `Linear8bitLt`, still QLoRA's int8 base, keeps
  its input on the autograd context, even under checkpointing.) nf4's matmul keeps nothing more than a frozen
  `nn.Linear` (measured equal).
* **8-bit E/H state** (`lisa:eh_state=8bit`: `lisa.embed_head_state: 8bit`, bitsandbytes' AdamW8bit on the
  always-on set): two uint8 moments and two fp32 absmax per 256 values for tensors of >= 4096 values, fp32
  moments for smaller ones (the norms), an integer step, two shared 1 KiB maps: 2.03 bytes per value
  instead of 8 (its fp32 masters stay). Its fused step needs no foreach temporary, but the master step still
  casts the chunk's gradients to fp32: the embedding's alone is 2 GiB at 8B.
* **host RAM / host mapped**: quant/frozen.py keeps a full-precision (bf16) copy of every block's linears on the
  host: the checkpoint's mapped pages for a block that never trained, its own private copy for one that did
  (refreshed when it freezes). The tables here count every block as trained (private), except section 5's.

"""


def quant_after() -> str:
    full, nf4 = plan("Llama-3.1-8B", "lisa:embed_head=false"), plan("Llama-3.1-8B", "lisa:embed_head=false,frozen=nf4")
    int8 = plan("Llama-3.1-8B", "lisa:embed_head=false,frozen=int8")
    eight = plan("Llama-3.1-8B", "lisa:eh_state=8bit,frozen=nf4")
    big = {s: plan("Llama-2-70B", s) for s in ("lisa:embed_head=false,frozen=nf4", "lisa:eh_state=8bit,frozen=nf4",
                                              "lisa:embed_head=false,frozen=int8")}
    b_nf4, b_8, b_int8 = big.values()
    return f"""Reading these (8B, the first table): quantizing the 30 frozen blocks cuts the weights from {g(full.weights)} to
{g(nf4.weights)} GiB (nf4) or {g(int8.weights)} GiB (int8, with {(int8.fwd_bwd - int8.static - full.fwd_bwd + full.static) / 2**20:,.0f} MiB more at forward+backward: one
linear's weight dequantized for each call). With the embedding and head trained, their state in 8 bits and nf4 frozen blocks, the peak is the
optimizer step ({g(eight.step)} GiB; {g(eight.total)} with the allowance): see the targets below. What remains above
QLoRA is the trained set itself: two bf16 blocks (0.44 B parameters) plus their gradients, fp32 masters and fp32
moments (16 bytes per parameter), where QLoRA's 42 M fp32 adapters add 0.5 GiB of gradients and state. At 70B the
nf4 frozen blocks fit LISA in 80 GiB ({g(b_nf4.total)} and {g(b_8.total)} GiB with the allowance), which no bf16
setting does, nor int8 frozen blocks ({g(b_int8.total)} GiB). The host then holds {g(b_nf4.host)} GiB of bf16 copies
(private or mapped: section 5).

"""


BIG_TEXT = """Two roads to 70B. One card: the frozen blocks in nf4, loaded on the host and moved to the device one
block at a time, quantized on arrival (the **setup peak** under each table: the weights plus one block's bf16
linears, beside the whole model moved first in bf16, which no 80 GB card holds); the bf16 linears stay on the
host, the checkpoint's mapped pages for every block that never trained and a private copy for each that did
(here `--trained-blocks 2`: the first interval; every block after a long run). Several cards: FSDP2 in
bf16-mixed, per rank (`--distributed fsdp`): parameters, gradients, fp32 masters and state sharded 1/N, plus the
unsharded root (embedding, head, final norm), two blocks (the one computing and the one prefetched) and the
unsharded gradients of a block and of the root; FSDP2 runs the model's own loss (lisatune's fused loss needs an
unsharded head) and cannot shard nf4 weights or 8-bit E/H state (one-line refusals). The sharded parts are held
equal to 3 gloo ranks (`tests/test_plan_scale.py`); the transients are estimated from the shapes.

"""


def big_after() -> str:
    rows = ["| model | LISA setting | device total GiB | setup peak GiB (whole model first) | host RAM GiB, 2 "
            "blocks trained | host mapped GiB | host RAM GiB, every block trained | blocks trained within 64 GB | "
            "host RAM GiB, every block trained, `lisa.spill_dir` |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in BIG:
        for spec in BIG_SPECS:
            first = plan(model, spec, replace(CAPPED, trained_blocks=2))
            every = plan(model, spec, CAPPED)
            spilled = plan(model, spec + ",spill=true", CAPPED)
            per = (every.host_private - every.host_offload) // max(1, find_blocks(model))
            within = HOST_LIMIT // per if per else 0
            rows.append(f"| {model} | {first.label} | {g(first.total)} | {g(first.setup)} ({g(first.setup_whole)}) | "
                        f"{g(first.host_private)} | {g(first.host_mapped)} | {g(every.host_private)} | "
                        f"{min(within, find_blocks(model))} of {find_blocks(model)} | {g(spilled.host_private)} |")
    l2 = plan("Llama-2-70B", "lisa:embed_head=false,frozen=nf4", replace(CAPPED, trained_blocks=2))
    l2s = plan("Llama-2-70B", "lisa:embed_head=false,frozen=nf4,spill=true", CAPPED)
    return "\n".join(rows) + f"""

Reading these: Llama-2-70B with E/H frozen and nf4 frozen blocks needs {g(l2.total)} GiB of device with the allowance
(tensor peak {g(l2.peak)}): it fits one 80 GB card, and so does Llama-3.1-70B (larger vocabulary, the same blocks).
The host holds every block's bf16 linears ({g(l2.host_frozen)} GiB at Llama-2-70B), but as the checkpoint's mapped
pages until a block trains: private RAM is {g(l2.host_private)} GiB after the first interval (two blocks), **within
64 GB**, and grows by one block's linears ({(l2.host_frozen // 80) / GIB:.2f} GiB) for each block that trains, so the
64 GB target holds while at most the number of blocks in that column has trained; a long run that visits every
block ends at the full copy unless trained copies are spilled: with `lisa.spill_dir` a block that trained is written
to a file there when it freezes and kept as its mapped pages (the file unlinked at once), so private RAM stays at
γ + 1 blocks' linears, {g(l2s.host_private)} GiB with every block trained (**the 64 GB target holds for the whole
run**; the last column; `tests/test_spill.py` holds the spilled copies as unwritten file pages and the training
bitwise equal to the copies in RAM). `lisatune train` refuses at setup, one line naming `lisa.frozen_weights`, a run
whose trained blocks' copies would not fit the host RAM available (`train.check_host_ram`). The setup needs the weights plus one block in bf16 ({g(l2.setup)} GiB), where moving the whole model
first needs {g(l2.setup_whole)} GiB.

"""


def find_blocks(model: str) -> int:
    return shape_config(model).num_hidden_layers


def fsdp_after() -> str:
    four = plan("Llama-2-70B", "lisa", replace(BASE, world=4, distributed="fsdp"))
    eight = plan("Llama-2-70B", "lisa", replace(BASE, world=8, distributed="fsdp"))
    fp32 = plan("Llama-2-70B", "lisa", replace(BASE, precision="fp32", world=4, distributed="fsdp"))
    return f"""Reading these: Llama-2-70B LISA E+H+2L in bf16-mixed with FSDP2 needs {g(four.total)} GiB per rank on 4 cards
(tensor peak {g(four.peak)}, of which {g(four.gathered)} GiB are the unsharded root, two blocks and their gradients)
and {g(eight.total)} GiB on 8: **it fits 4 x 80 GB**, where the same in fp32 needs {g(fp32.total)} GiB per rank. Per rank
the bf16 shard of the weights ({g(four.weights)} GiB on 4) is most of it; the trained set's masters and state are
{g(four.masters + four.state)} GiB.

"""


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.write_text(page())
    print(f"written: {OUT}")

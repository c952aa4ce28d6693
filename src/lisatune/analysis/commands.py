"""`lisatune bench memory|speed`, `lisatune norms` and `lisatune plan`: argparse front-ends over the analysis
modules.

    from lisatune.analysis.commands import register
    register(subparsers)          # adds "bench" (with "memory" and "speed"), "norms" and "plan"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..errors import LisaError
from ..recipe.models import SMOLLM2, smollm2_path
from ..schema import cli_int, cli_positive_float, read_text
from .memory import bench_memory, load_bench_model
from ..recipe.meter import token_batches
from .norms import run_norms
from .plan import (DEVICES, DISTRIBUTED, EH_STATES, PRECISIONS, STATE_POLICIES, WEIGHTS, Setting, parse_size,
                   run_plan, to_json)
from .shapes import SHAPES
from .speed import bench_speed


def _common(p: argparse.ArgumentParser, steps: int, methods: list[str] | None, out: str) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default), a Hugging Face model dir or .gguf, or 'tiny[:N_LAYERS]' (random tiny llama)")
    p.add_argument("--batch", type=cli_int(1), default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=cli_int(2), default=256, help="tokens per sequence (default 256)")
    if methods is not None:
        p.add_argument("--methods", nargs="+", default=methods, metavar="SPEC",
                       help="methods to compare: presets full, lora (r=8), galore (rank=128), lisa (γ=2, K=5, drop), "
                            "lisa-keep, lisa-offload, lisa-frozen (embedding and head frozen), each refinable as "
                            "NAME:key=value,key=value, e.g. lisa:n_layers=4,interval=10 "
                            f"(default: {' '.join(methods)})")
    p.add_argument("--steps", type=cli_int(1), default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--out", default=out, metavar="DIR", help=f"output directory (default {out})")


def _release_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release-memory", action="store_true",
                   help="fix glibc's mmap threshold so freed tensors leave the process at once (lower RSS, slower "
                        "steps), as `lisatune train` does with train.release_memory: true; see lisatune/recipe/allocator.py")


def cmd_bench_memory(args) -> int:
    gc = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    r = bench_memory(args.model, args.methods, args.batch, args.seq, args.steps, gc, args.switches, args.out,
                     isolate=not args.in_process, loss=args.loss, release_memory=args.release_memory,
                     device=args.device)
    print("\n" + r["markdown"])
    print(f"written: {r['dir'] / 'memory.md'}, memory.json, memory.png")
    if r["problems"]:
        print("lisatune: LISA optimizer state was not flat: " + "; ".join(r["problems"]))
        return 1
    return 0


def cmd_bench_speed(args) -> int:
    r = bench_speed(args.model, args.methods, args.batch, args.seq, args.steps, args.warmup,
                    args.gradient_checkpointing == "on", args.out, release_memory=args.release_memory)
    print("\n" + r["markdown"])
    print(f"written: {r['dir'] / 'speed.md'}, speed.json, speed.png")
    return 0


def cmd_norms(args) -> int:
    text = read_text(args.data, "--data") if args.data else None  # before the model loads
    if text is not None and (args.model == "tiny" or args.model.startswith("tiny:")):
        raise LisaError("--data needs a model with a tokenizer (not 'tiny')")
    model, vocab = load_bench_model(args.model)
    if args.data:
        batches = text_batches(args.model, args.data, args.batch, args.seq, args.n_batches, text)
    else:
        batches = token_batches(vocab, args.batch, args.seq, n=args.n_batches)
    title = (f"{args.model}: mean layer norms over {args.steps} steps, batch {args.batch} x {args.seq}, "
             f"{'data ' + Path(args.data).name if args.data else 'random tokens'}")
    r = run_norms(model, batches, args.gamma, args.steps, args.out, args.lr_full, args.lr_lora, args.lora_r, title)
    p = r["probabilities"]
    print(json.dumps({k: {n: round(v, 5) for n, v in d.items()} for k, d in r["norms"].items()}, indent=1))
    print(f"probabilities (Σ = {sum(p):.4f} = γ): {[round(x, 4) for x in p]}")
    print(f"written: {r['dir'] / 'probabilities.json'} (use: lisa.policy=bernoulli, "
          f"lisa.probabilities={r['dir'] / 'probabilities.json'}), norms.json, norms.png")
    return 0


def cmd_plan(args) -> int:
    # a named GPU trains in bf16-mixed unless told otherwise; without one, fp32 as before
    precision = args.precision or ("bf16-mixed" if args.gpu else "fp32")
    base = Setting(precision=precision, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing == "on",
                   loss=args.loss, attention=args.attention, lora_r=args.lora_r, lora_base=args.lora_base,
                   gamma=args.gamma, embed_head=not args.no_embed_head, eh_state=args.eh_state, frozen=args.frozen,
                   state_policy=args.state_policy, world=args.world, device=args.device,
                   distributed=args.distributed, trained_blocks=args.trained_blocks,
                   step_chunk=parse_size(args.step_chunk, "--step-chunk") if args.step_chunk else None)
    r = run_plan(args.model, args.method, base, args.gpu, args.reserve)
    print(to_json(r) if args.json else r["markdown"], end="")
    return 0


def text_batches(model: str, path: str, batch: int, seq: int, n: int, text: str | None = None):
    """Token batches cut from a plain text file (or its `text`, already read) with the model's tokenizer."""
    if model == "tiny" or model.startswith("tiny:"):
        raise LisaError("--data needs a model with a tokenizer (not 'tiny')")
    if model == SMOLLM2:
        f = smollm2_path()
        tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    else:
        tok = AutoTokenizer.from_pretrained(model)
    ids = tok(read_text(path, "--data") if text is None else text, return_tensors="pt").input_ids[0]
    need = batch * seq
    if len(ids) < need:
        raise LisaError(f"--data {path}: {len(ids)} tokens, fewer than one batch ({batch} x {seq})")
    chunks = [ids[i:i + need].view(batch, seq) for i in range(0, len(ids) - need + 1, need)][:n]
    return [c.clone() for c in chunks] or [torch.as_tensor(ids[:need]).view(batch, seq)]


def register(subparsers) -> None:
    """Add `bench` (memory, speed), `norms` and `plan` to an argparse subparsers object."""
    b = subparsers.add_parser("bench", help="measure memory or speed of the fine-tuning methods")
    bs = b.add_subparsers(dest="bench", required=True)

    m = bs.add_parser("memory", help="weights/grads/optimizer state/activations (exact) and peak RSS per method")
    _common(m, 3, ["full", "lora", "galore", "lisa", "lisa-keep"], "bench-out")
    m.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off")
    m.add_argument("--switches", type=cli_int(1), default=10, help="LISA runs at least this many switches (default 10)")
    m.add_argument("--loss", choices=["fused", "standard"], default="fused",
                   help="fused: head + cross-entropy in chunks, as `lisatune train` does (default); "
                        "standard: the model's own logits and loss")
    _release_memory(m)
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (default), or cuda: the same counts on the GPU plus torch.cuda.max_memory_allocated / "
                        "max_memory_reserved per phase (forward, backward, step, switch)")
    m.add_argument("--in-process", action="store_true",
                   help="all methods in this process (fast; peak RSS then not per method)")
    m.set_defaults(func=cmd_bench_memory)

    s = bs.add_parser("speed", help="median forward/backward/optimizer time per method, interleaved round-robin")
    _common(s, 20, ["full", "lora", "galore", "lisa", "lisa-frozen"], "bench-out")
    s.add_argument("--warmup", type=cli_int(0), default=2, help="untimed rounds first (default 2)")
    s.add_argument("--gradient-checkpointing", choices=["off", "on"], default="off")
    _release_memory(s)
    s.set_defaults(func=cmd_bench_speed)

    n = subparsers.add_parser("norms", help="layerwise weight norms of LoRA vs full FT -> LISA probabilities")
    _common(n, 20, None, "norms-out")
    n.add_argument("--gamma", type=cli_int(1), default=2, help="expected active blocks: Σ p_l (default 2)")
    n.add_argument("--data", help="plain text file to train on (default: random tokens)")
    n.add_argument("--n-batches", type=cli_int(1), default=8, help="distinct batches, cycled (default 8)")
    n.add_argument("--lr-full", type=cli_positive_float, default=1e-5)
    n.add_argument("--lr-lora", type=cli_positive_float, default=1e-4)
    n.add_argument("--lora-r", type=cli_int(1), default=8)
    n.set_defaults(func=cmd_norms)

    pl = subparsers.add_parser("plan", help="predict a training step's memory per method from the config alone "
                                            "(meta device: no weights loaded)")
    pl.add_argument("--model", default="SmolLM2-135M",
                    help=f"a built-in shape ({', '.join(SHAPES)}), a model directory, a config.json or a Hub "
                         "id whose config.json is in the Hugging Face cache (read offline; default SmolLM2-135M)")
    pl.add_argument("--method", nargs="+", default=["full", "lora", "lisa"], metavar="SPEC",
                    help="methods to plan: full, lora, qlora (lora:base=nf4), lisa, each refinable as lora:r=128, "
                         "lora:base=int8, lisa:gamma=4, lisa:gamma=0 (embedding + head only), lisa:embed_head=false, "
                         "lisa:eh_state=8bit, lisa:frozen=nf4 (default: full lora lisa)")
    pl.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    pl.add_argument("--lora-base", choices=list(WEIGHTS), default="full",
                    help="LoRA: the blocks' linears as they are (default), or int8 / nf4 (QLoRA) via bitsandbytes")
    pl.add_argument("--gamma", type=int, default=2, help="LISA: active blocks γ (default 2)")
    pl.add_argument("--no-embed-head", action="store_true", help="LISA: freeze the embedding and head (E/H)")
    pl.add_argument("--eh-state", choices=list(EH_STATES), default="fp32",
                    help="LISA: the embedding/head's AdamW state, fp32 (default) or 8bit (lisa.embed_head_state)")
    pl.add_argument("--frozen", choices=list(WEIGHTS), default="full",
                    help="LISA: frozen blocks' linears as they are (default), or int8 / nf4 (lisa.frozen_weights)")
    pl.add_argument("--state-policy", choices=list(STATE_POLICIES), default="drop",
                    help="LISA: a frozen block's optimizer state dropped (default), kept on the device, or offloaded "
                         "to host memory (lisa.state_policy)")
    pl.add_argument("--precision", choices=list(PRECISIONS),
                    help="fp32 (default without --gpu); bf16: weights, grads and AdamW state in bf16 (model.dtype: "
                         "bf16); bf16-mixed (default with --gpu): bf16 weights and grads, fp32 master weights and "
                         "AdamW state for the trainable parameters (train.precision: bf16-mixed)")
    pl.add_argument("--world", type=cli_int(1), default=1, metavar="N",
                    help="DDP processes (distributed: ddp): above 1 each also holds DDP's buckets, one copy of the "
                         "trained gradients (default 1)")
    pl.add_argument("--distributed", choices=list(DISTRIBUTED), default="ddp",
                    help="with --world above 1: ddp (default; every process holds everything, plus DDP's buckets) or "
                         "fsdp (FSDP2: parameters, gradients, masters and state sharded 1/world, plus one block's "
                         "all-gather; per rank)")
    pl.add_argument("--trained-blocks", type=cli_int(0), metavar="K",
                    help="LISA with quantized frozen blocks: blocks trained so far, each holding its own host copy "
                         "(private RAM; the others are the checkpoint's mapped pages); default: every block")
    pl.add_argument("--device", choices=list(DEVICES), default="cuda",
                    help="cuda (default): foreach AdamW's step temporaries and the device allowance (CUDA context, "
                         "cuBLAS workspaces, allocator slack); cpu: single-tensor AdamW, no allowance")
    pl.add_argument("--step-chunk", metavar="SIZE",
                    help="bf16-mixed: the master step's cap on the fp32 gradients it holds at once, a tensor above it "
                         "stepped in slices (e.g. 256MiB; default: none, one largest trained tensor)")
    pl.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    pl.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    pl.add_argument("--checkpointing", choices=["off", "on"], default="off", help="gradient checkpointing of every block")
    pl.add_argument("--loss", choices=["fused", "standard"], default="fused",
                    help="fused: lisatune's chunked head + cross-entropy, no full logits (default); "
                         "standard: the model's own logits and loss")
    pl.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                    help="sdpa: a fused kernel, no s x s weights saved (default); eager: the model's eager attention")
    pl.add_argument("--gpu", metavar="SIZE", help="GPU memory, e.g. 24GB, 80GiB (GB read as GiB): says whether each "
                                                  "method fits and, if not, what change would make it fit")
    pl.add_argument("--reserve", metavar="SIZE",
                    help="a fixed size held back from --gpu in place of the planned device allowance (default: the "
                         "allowance, CUDA context + cuBLAS workspaces + 5%% allocator slack; before it, 1GiB)")
    pl.add_argument("--json", action="store_true", help="print JSON (every number in bytes) instead of the table")
    pl.set_defaults(func=cmd_plan)


"""Host memory of LISA with nf4 frozen blocks on a model loaded from sharded safetensors (CPU, a fresh process).

    PYTHONPATH=src python benchmarks/host_memory.py [--layers 29]

Builds a random Llama of about 0.5 B parameters in bf16, saves it as sharded safetensors, then in a fresh process
loads it with transformers (`from_pretrained`, bf16), builds LisaAdamW (γ=1, E/H frozen, frozen_weights nf4) and
runs two steps, sampling the process's anonymous memory (private, not file-backed: RssAnon, the pages
smaps_rollup counts as Anonymous) every 5 ms, with glibc's heap returning freed blocks at once (train.release_memory),
so that the peak is what is held and not the allocator's cache. RSS would count the checkpoint's mapped file pages,
which the kernel can drop.
Beside it, the checkpoint's own maps (/proc/self/smaps): the pages the run wrote (Private_Dirty: the trained
blocks' private copies) against `lisatune plan`'s host RAM (private) for the blocks trained, and the rest mapped.

tests/test_streaming_load.py runs the same functions (`save_model`, and `run` in a child: `--model-dir DIR --json`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers as T

MIB = 2**20


def anonymous() -> int:
    """Resident anonymous memory of this process (RssAnon: the kernel's counter, read in ~0.1 ms), the pages
    /proc/self/smaps_rollup counts as Anonymous (a walk of every map: ~20 ms with the checkpoint mapped, so that
    sampling with it every 5 ms took a core and slowed the run 2.5x); `anonymous_smaps` is that, for a check."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^RssAnon:\s+(\d+) kB", text, re.M).group(1)) * 1024


def anonymous_smaps() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Anonymous:\s+(\d+) kB", text, re.M).group(1)) * 1024


def file_pages(paths: list[str]) -> dict[str, int]:
    """Rss and Private_Dirty (pages written: the process's own copies) of this process's maps of `paths`."""
    out, mine = {"Rss": 0, "Private_Dirty": 0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            mine = any(line.endswith(p) for p in paths)
        elif mine and line.split(":")[0] in out:
            out[line.split(":")[0]] += int(line.split()[1]) * 1024
    return out


def save_model(model_dir: str | Path, layers: int = 29) -> dict:
    """A random bf16 Llama of `layers` blocks (29: about 0.5 B parameters) saved in `model_dir` as sharded
    safetensors (300 MB shards), written back to disk (clean pages, as a downloaded checkpoint's). Returns its
    size in bytes and a digest of every tensor of its state dict."""
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    digests = state_digests(model)
    model.save_pretrained(model_dir, max_shard_size="300MB")
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return {"bytes": size, "digests": digests}


def state_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every tensor of the model's state dict (a frozen quantized linear's is its full-precision
    weight, quant/frozen.py), by name: bitwise equality in a few bytes."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().view(-1)
        out[name] = hashlib.sha256(t.view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()
    return out


def run(model_dir: str, private: bool = False, steps: int = 2) -> dict:
    """In this process (a fresh one, for its memory figures to be its own): load `model_dir` in bf16, build
    LisaAdamW (γ=1, E/H frozen, nf4 frozen blocks, seed 3) and run `steps` steps on fixed random tokens,
    sampling anonymous memory from before the load. `private`: every weight first copied into the process's
    own memory (a model not backed by the checkpoint's pages: the path before #27), for comparing results."""
    from lisatune import LisaAdamW
    from lisatune.analysis.plan import Setting, plan_memory
    from lisatune.recipe.allocator import release_freed_memory

    torch.set_num_threads(1)
    release_freed_memory()  # freed tensors leave the process at once: the peak is what is held, not the heap's cache
    start, peak, done = anonymous(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    if private:
        for p in model.parameters():
            p.data = p.data.clone()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = LisaAdamW(model, n_layers=1, interval=100, lr=1e-3, train_embedding=False, train_head=False,
                    frozen_weights="nf4", seed=3)
    g = torch.Generator().manual_seed(0)
    trained, losses, active_bytes = set(), [], 0
    for _ in range(steps):
        trained |= set(opt.active_blocks)
        active_bytes = max(active_bytes, sum(p.numel() * p.element_size() for grp in opt.param_groups
                                             for p in grp["params"] if p.requires_grad))
        x = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    done.set()
    sampler.join()
    end, end_smaps = anonymous(), anonymous_smaps()
    peak[0] = max(peak[0], end)
    pages = file_pages([str(f) for f in Path(model_dir).glob("*.safetensors")])
    plan = plan_memory(model_dir, Setting(method="lisa", precision="bf16", gamma=1, embed_head=False, frozen="nf4",
                                          device="cpu", batch=1, seq=16, trained_blocks=len(trained)))
    return {"peak_above_start": peak[0] - start, "end": end, "end_smaps": end_smaps, "model_bytes": model_bytes,
            "active_bytes": active_bytes,
            "frozen_linears_bytes": sum(t.numel() * t.element_size() for t in opt.frozen_weights.host.values()),
            "trained_blocks": sorted(trained), "blocks_path": opt.layers.blocks_path, "losses": losses,
            "pages_written": pages["Private_Dirty"], "pages_mapped": pages["Rss"],
            "plan_private": plan.host_private, "plan_mapped": plan.host_mapped, "digests": state_digests(model)}


def report(r: dict) -> None:
    print(f"anonymous memory peak above start: {r['peak_above_start'] / MIB:.0f} MiB; frozen blocks' bf16 "
          f"linears: {r['frozen_linears_bytes'] / MIB:.0f} MiB (held as the checkpoint's mapped pages, not copied)")
    print(f"checkpoint pages written (private copies of the {len(r['trained_blocks'])} blocks trained): "
          f"{r['pages_written'] / MIB:.1f} MiB; planned host RAM (private) {r['plan_private'] / MIB:.1f} MiB, "
          f"host mapped {r['plan_mapped'] / MIB:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=29)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # the measuring child process
    ap.add_argument("--private", action="store_true", help=argparse.SUPPRESS)  # (child) weights copied first
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # (child) the figures as JSON
    args = ap.parse_args()
    if args.model_dir:
        r = run(args.model_dir, private=args.private)
        print(json.dumps(r)) if args.json else report(r)
        return 0
    with tempfile.TemporaryDirectory() as d:
        size = save_model(d, args.layers)["bytes"]
        print(f"model: {size / MIB:.0f} MiB in bf16, {args.layers} blocks")
        subprocess.run([sys.executable, __file__, "--model-dir", d], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

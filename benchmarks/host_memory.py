"""Host memory of LISA with nf4 frozen blocks on a model loaded from sharded safetensors (CPU, a fresh process).

    PYTHONPATH=src python benchmarks/host_memory.py [--layers 29] [--out DIR]

Builds a random Llama of about 0.5 B parameters in bf16, saves it as sharded safetensors, then in a fresh process
loads it with transformers (`from_pretrained`, bf16), builds LisaAdamW (γ=1, E/H frozen, frozen_weights nf4) and
runs two steps, sampling the process's anonymous memory (private, not file-backed: /proc/self/smaps_rollup) every
5 ms, with glibc's heap returning freed blocks at once (train.release_memory), so that the peak is what is held
and not the allocator's cache. RSS would count the checkpoint's mapped file pages, which the kernel can drop.
Beside it, the checkpoint's own maps (/proc/self/smaps): the pages the run wrote (Private_Dirty: the trained
blocks' private copies) against `lisatune plan`'s host RAM (private) for the blocks trained, and the rest mapped.
"""
from __future__ import annotations

import argparse
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

from lisatune import LisaAdamW
from lisatune.analysis.plan import Setting, plan_memory
from lisatune.recipe.allocator import release_freed_memory

MIB = 2**20


def anonymous() -> int:
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


def measure(model_dir: str) -> None:
    torch.set_num_threads(1)
    release_freed_memory()  # freed tensors leave the process at once: the peak is what is held, not the heap's cache
    start, peak, done = anonymous(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    opt = LisaAdamW(model, n_layers=1, interval=100, lr=1e-3, train_embedding=False, train_head=False,
                    frozen_weights="nf4", seed=3)
    g = torch.Generator().manual_seed(0)
    trained = set()
    for _ in range(2):
        trained |= set(opt.active_blocks)
        x = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    done.set()
    size = sum(p.numel() * 2 for p in opt.frozen_weights.host.values())
    print(f"anonymous memory peak above start: {(peak[0] - start) / 2**20:.0f} MiB; frozen blocks' bf16 linears: "
          f"{size / 2**20:.0f} MiB (held as the checkpoint's mapped pages, not copied)")
    pages = file_pages([str(f) for f in Path(model_dir).glob("*.safetensors")])
    plan = plan_memory(model_dir, Setting(method="lisa", precision="bf16", gamma=1, embed_head=False, frozen="nf4",
                                          device="cpu", batch=1, seq=16, trained_blocks=len(trained)))
    print(f"checkpoint pages written (private copies of the {len(trained)} blocks trained): "
          f"{pages['Private_Dirty'] / MIB:.1f} MiB; planned host RAM (private) {plan.host_private / MIB:.1f} MiB, "
          f"host mapped {plan.host_mapped / MIB:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=29)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # the measuring child process
    args = ap.parse_args()
    if args.model_dir:
        measure(args.model_dir)
        return 0
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.layers,
                        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    size = sum(p.numel() * 2 for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="300MB")
        del model
        for f in Path(d).glob("*.safetensors"):  # written back: clean pages, as a downloaded checkpoint's
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        print(f"model: {size / 2**20:.0f} MiB in bf16, {args.layers} blocks")
        subprocess.run([sys.executable, __file__, "--model-dir", d], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

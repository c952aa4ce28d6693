"""Host memory of LISA with nf4 frozen blocks on a model loaded from sharded safetensors (CPU, a fresh process).

    PYTHONPATH=src python benchmarks/host_memory.py [--layers 29] [--out DIR]

Builds a random Llama of about 0.5 B parameters in bf16, saves it as sharded safetensors, then in a fresh process
loads it with transformers (`from_pretrained`, bf16), builds LisaAdamW (γ=1, E/H frozen, frozen_weights nf4) and
runs two steps, sampling the process's anonymous memory (private, not file-backed: /proc/self/smaps_rollup) every
5 ms, with glibc's heap returning freed blocks at once (train.release_memory), so that the peak is what is held
and not the allocator's cache. RSS would count the checkpoint's mapped file pages, which the kernel can drop.
"""
from __future__ import annotations

import argparse
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
from lisatune.recipe.allocator import release_freed_memory


def anonymous() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Anonymous:\s+(\d+) kB", text, re.M).group(1)) * 1024


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
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    done.set()
    size = sum(p.numel() * 2 for p in opt.frozen_weights.host.values())
    print(f"anonymous memory peak above start: {(peak[0] - start) / 2**20:.0f} MiB; frozen blocks' bf16 linears: "
          f"{size / 2**20:.0f} MiB (held as the checkpoint's mapped pages, not copied)")


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
        print(f"model: {size / 2**20:.0f} MiB in bf16, {args.layers} blocks")
        subprocess.run([sys.executable, __file__, "--model-dir", d], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

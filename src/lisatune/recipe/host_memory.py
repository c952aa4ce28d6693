"""Refuse, before training starts, a run whose host copies would not fit this machine's RAM.

LISA with quantized frozen blocks (lisa.frozen_weights: int8 | nf4) keeps a private full-precision copy of every
block that has trained (the never-trained ones are the loaded checkpoint's mapped pages), unless they are spilled
(lisa.spill_dir: at most γ + 1 blocks in RAM); `state_policy: offload` parks the optimizer state of blocks that
trained and froze. Both grow over the run: a 70B model runs for hours and is then killed by the kernel. This
counts the same bytes as `lisatune plan`'s host line (quant/frozen.py copy_bytes) for the blocks this run can
train (γ per interval, over its steps), times the processes on this machine, against what the kernel says is
available (MemAvailable, and a cgroup's limit).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from ..engine import find_layers
from ..errors import LisaError
from ..quant.frozen import copy_bytes, private_copies


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (GiB for a 70B model, KiB for a tiny one)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def available_host_ram() -> int | None:
    """Bytes the kernel can give this process now: MemAvailable, capped by a cgroup v2 limit; None off Linux."""
    try:
        info = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    avail = next((int(line.split()[1]) * 1024 for line in info.splitlines() if line.startswith("MemAvailable:")),
                 None)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if avail is not None and limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def trained_blocks(n_blocks: int, gamma: int, interval: int, steps: int, resumed: bool) -> int:
    """Blocks a run of `steps` optimizer steps can train: γ per interval. A resume loads every block's trained
    weights into its host copy, so all of them count."""
    return n_blocks if resumed else min(n_blocks, gamma * math.ceil(steps / interval))


def check_host_ram(cfg, model: nn.Module, steps: int, resumed: bool) -> None:
    """One line naming the field when the host copies this run would make do not fit; nothing otherwise."""
    lisa, t = cfg.lisa, cfg.train
    if cfg.method != "lisa" or not t.check_host_ram:
        return
    quantized, offload = lisa.frozen_weights != "full", lisa.state_policy == "offload"
    if not (quantized or offload):
        return
    available = available_host_ram()
    if available is None:
        return
    layers = find_layers(model, lisa.blocks_path)
    blocks = [model.get_submodule(f"{layers.blocks_path}.{i}") for i in range(layers.n_blocks)]
    gamma = min(layers.n_blocks, lisa.n_layers)  # active blocks (with units: module, γ modules touch at most γ)
    trained = trained_blocks(len(blocks), gamma, lisa.interval, steps, resumed)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each process on this machine holds its own copies
    where = (f"{trained} of {len(blocks)} blocks train in this run's {steps} steps"
             + (" (a resume loads every block)" if resumed else "")
             + (f", × {local} processes on this machine" if local > 1 else ""))
    fix = "or train.check_host_ram: false to start anyway"
    if quantized:
        copies = sorted((copy_bytes(b) for b in blocks), reverse=True)
        need = local * sum(copies[:private_copies(trained, gamma, lisa.spill_dir is not None)])
        if need > available:
            if lisa.spill_dir is None:
                spilled = local * sum(copies[:private_copies(trained, gamma, True)])
                raise LisaError(
                    f"lisa.frozen_weights: {lisa.frozen_weights} keeps a private full-precision copy of each block "
                    f"that trains on the host: {where}, {size(need)}, and this machine has "
                    f"{size(available)} available; set lisa.spill_dir to a folder to keep them as mapped "
                    f"files ({size(spilled)} in RAM), {fix}")
            raise LisaError(
                f"lisa.spill_dir: with a spill folder, γ + 1 = {gamma + 1} blocks' full-precision copies are still "
                f"host RAM, {size(need)}, and this machine has {size(available)} available; lower "
                f"lisa.n_layers, {fix}")
        available -= need
    if offload:
        master = t.precision == "bf16-mixed"
        per_block = sorted((sum(2 * p.numel() * (4 if master else p.element_size()) for p in b.parameters())
                            for b in blocks), reverse=True)
        parked = local * sum(per_block[:max(0, trained - gamma)])  # the active blocks' state is on the device
        if parked > available:
            raise LisaError(
                f"lisa.state_policy: offload parks the optimizer state of each block that trained and froze on the "
                f"host: {where}, {size(parked)}, and this machine has {size(available)} available "
                f"(after the frozen blocks' copies); use state_policy: drop (the paper's LISA) or keep, {fix}")

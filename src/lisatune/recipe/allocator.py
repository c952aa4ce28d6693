"""Give freed tensor memory back to the operating system at once (CPU, Linux/glibc).

glibc serves large allocations with mmap, but raises that size threshold each time such a block is freed
(up to 32 MiB). After a few steps most activations, gradients and optimizer temporaries come from the heap
instead, and a freed heap block stays resident until everything above it is freed too: the process's RSS
creeps toward the sum of everything that was ever live at once, not what is live now. A fixed threshold
(which also turns the adjustment off) keeps every large tensor in its own mapping, unmapped when freed.
Measured on SmolLM2-135M (docs/benchmarks.md): peak RSS of full fine-tuning and LISA drop by 0.5 GB, but
every fresh mapping is page-faulted and zeroed by the kernel, and steps took ~35 % longer: opt-in
(`train.release_memory: true`, `lisatune bench ... --release-memory`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h


def release_freed_memory(threshold_bytes: int = 128 * 1024) -> bool:
    """Set glibc's mmap threshold to `threshold_bytes` (fixed). False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))

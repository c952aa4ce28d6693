"""A fixed mmap threshold returns freed tensors' memory to the OS; glibc's default keeps it resident."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

SCRIPT = r"""
import os, sys, torch
from lisatune.recipe.allocator import release_freed_memory
if sys.argv[1] == "fixed":
    assert release_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
big = torch.ones(4 << 20)  # 16 MiB: mmapped, and freeing it raises glibc's dynamic threshold to 16 MiB
del big
before = rss()
parts = [torch.ones(2 << 20) for _ in range(40)]  # 40 x 8 MiB: now from the heap
keep = parts.pop()  # the last one stays live, on top of the heap
del parts
print((rss() - before) >> 20)
"""


def resident_after_free(mode):
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_freed_tensors_leave_the_process_with_a_fixed_threshold_and_stay_without():
    default, fixed = resident_after_free("default"), resident_after_free("fixed")
    assert default >= 200  # 39 x 8 MiB freed but still resident: the heap cannot shrink below `keep`
    assert fixed <= 16  # only `keep` (8 MiB) remains

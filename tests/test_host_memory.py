"""training/memory.py: with the fixed mmap threshold a large freed tensor leaves the resident set at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocate and free a 20 MiB tensor twice; print the resident set (MiB) before the first and after the second free.
# glibc's own rising threshold serves the second one from the heap, where it stays resident after the free.
PROBE = """
import os, sys, torch
from open_instruct.training.memory import return_freed_memory
if sys.argv[1] == "fixed" and not return_freed_memory():
    print("unsupported"); raise SystemExit
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
start = rss()
for _ in range(2):
    t = torch.ones(5 * 2**20)  # 20 MiB, touched
    del t
print(start, rss())
"""


def _probe(mode: str) -> tuple[float, float] | None:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    if out.strip() == "unsupported":
        return None
    before, after = (float(x) for x in out.split())
    return before, after


def test_fixed_threshold_returns_large_tensors_and_glibc_default_keeps_them():
    fixed = _probe("fixed")
    if fixed is None:
        pytest.skip("this C library has no mallopt")
    assert fixed[1] - fixed[0] < 5, fixed  # the 20 MiB went back to the system
    default = _probe("default")
    assert default is not None and default[1] - default[0] > 15, default  # glibc's default kept it

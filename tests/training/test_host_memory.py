"""training/host_memory.py: with the fixed mmap threshold a large freed tensor leaves the resident set at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# After a warm-up (torch's first operations map thread pools and caches of their own), allocate and free a 24 MiB
# tensor three times; print the resident set (MiB) before the first and after the last free. glibc's own rising
# threshold (at most 32 MiB) serves the later ones from the heap, where they stay resident after the free.
TENSOR_MIB = 24
PROBE = f"""
import os, sys, torch
from open_instruct.training.host_memory import return_freed_memory
if sys.argv[1] == "fixed" and not return_freed_memory():
    print("unsupported"); raise SystemExit
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
warm = torch.ones(1024, 1024)
(warm @ warm).sum().item()
del warm
start = rss()
for _ in range(3):
    t = torch.ones({TENSOR_MIB} * 2**18)  # touched, so every page is resident
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
    default = _probe("default")
    assert default is not None
    kept_fixed, kept_default = fixed[1] - fixed[0], default[1] - default[0]
    # The same program either way, so what else grows (a few MiB of the interpreter's own) cancels out.
    assert kept_default - kept_fixed > TENSOR_MIB * 0.75, (fixed, default)  # glibc's default kept the tensor
    assert kept_fixed < TENSOR_MIB / 2, fixed  # with the fixed threshold it went back to the system


RESTART_PROBE = """
import os, sys
print("pid", os.getpid(), os.environ.get("GLIBC_TUNABLES"), os.environ.get("MKL_DISABLE_FAST_MM"), sys.argv[1:], flush=True)
from open_instruct.training.host_memory import reexec_with_lean_malloc
reexec_with_lean_malloc()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), os.environ.get("MKL_DISABLE_FAST_MM"), flush=True)
"""


def _restart(tmp_path, tunables: str | None, mkl: str | None = None) -> list[str]:
    import os

    from open_instruct.training.host_memory import _glibc

    if not _glibc():
        pytest.skip("not glibc")
    probe = tmp_path / "probe.py"
    probe.write_text(RESTART_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MKL_DISABLE_FAST_MM")}
    for name, value in (("GLIBC_TUNABLES", tunables), ("MKL_DISABLE_FAST_MM", mkl)):
        if value is not None:
            env[name] = value
    out = subprocess.run([sys.executable, str(probe), "--x", "1"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_entry_restarts_once_with_the_lean_allocators_and_same_arguments(tmp_path):
    lines = _restart(tmp_path, None)
    assert len(lines) == 3, lines  # started, restarted, ran on
    pids = {line.split()[1] for line in lines}
    assert len(pids) == 1  # the same process (exec), so launchers that watch the pid see no change
    assert lines[0].endswith("None None ['--x', '1']")
    assert lines[1].endswith("glibc.malloc.tcache_count=0 1 ['--x', '1']")
    assert lines[2].endswith("glibc.malloc.tcache_count=0 1")


def test_entry_keeps_the_users_settings(tmp_path):
    lines = _restart(tmp_path, "glibc.malloc.arena_max=2")
    assert lines[-1].endswith("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0 1"), lines
    lines = _restart(tmp_path, "glibc.malloc.tcache_count=7", mkl="0")  # the user's own choices: no restart
    assert len(lines) == 2 and lines[-1].endswith("glibc.malloc.tcache_count=7 0"), lines
    lines = _restart(tmp_path, "glibc.malloc.tcache_count=7")  # only MKL's switch is added
    assert len(lines) == 3 and lines[-1].endswith("glibc.malloc.tcache_count=7 1"), lines

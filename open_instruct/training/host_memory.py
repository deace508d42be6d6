"""Host-memory hygiene for CPU runs: the largest tensors go back to the system when freed, the rest reuse the heap,
and the heap's freed space coalesces.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with its own mapping, returned on free, but by default raises
that threshold (up to 32 MiB) each time such a block is freed, so that from then on almost every tensor comes from
the heap, whose freed space fragments and stays in the process's resident set. Fixing the threshold stops that.
Where to fix it is a trade between memory and time: a mapped block is zeroed page by page by the kernel each time it
is allocated. Measured on the TRL comparison (``scripts/bench/compare_trl.py``, our side only, 2 threads, glibc's
small-block cache still on, 2^23-value logit chunks at 128k):

| threshold | 8k vocabulary: step, peak RSS | 128k vocabulary: step, peak RSS |
| --- | --- | --- |
| glibc's own (rising) | 0.62 s, 1,065-1,120 MB | 3.35 s, 2,467 MB |
| 64 KiB (every activation mapped) | 1.01 s, 924 MB | 4.60 s, 1,873 MB |
| 16 MiB (this one) | 0.62 s, 1,090 MB | 4.30 s, 2,088 MB |

At 16 MiB activations (a few MiB at these sizes) reuse the heap, so the 8k step keeps its speed, while the 128k
vocabulary's logit chunks and its 131 MB embedding and head gradients are mapped and returned after each use.

The heap itself fragments because glibc parks small freed blocks (autograd nodes, tensor headers) in a per-thread
cache without merging them with their free neighbours, so a big tensor's freed space cannot be reused whole. Without
that cache (``tcache_count=0``: glibc reads it only when a process starts, hence the restart by the entry scripts)
the 8k run's peak fell from about 1,110 MB to 1,000 MB at the same step time (0.57-0.58 s). A user's own
``GLIBC_TUNABLES`` setting of ``glibc.malloc.tcache_count`` is kept.

The same restart turns off MKL's own memory manager (``MKL_DISABLE_FAST_MM=1``), which torch's x86 builds use for
their matrix products: it keeps every work buffer it has allocated, per thread, for reuse. On the TRL comparison at
8k (256 pairs) the heap in use after the reference pass fell from 179 to 131 MB and the peak from 1,016-1,032 MB to
984-995 MB, at the same step time. A user's own ``MKL_DISABLE_FAST_MM`` is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
# Fixing the mmap threshold also stops glibc from raising the trim threshold with it (to twice the mmap threshold);
# left at 128 KiB the heap's top would be given back and faulted in again at every step (8k step 0.645 s, not 0.58).
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
TCACHE_TUNABLE = "glibc.malloc.tcache_count"
MKL_POOL_SWITCH = "MKL_DISABLE_FAST_MM"


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # a C library without that name (musl)
        return False


def lean_malloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart this process with so that glibc keeps no per-thread cache of small freed blocks
    and MKL no pool of work buffers; None when there is nothing to change (not glibc, or both already set)."""
    if not _glibc():
        return None
    changes = {}
    current = environ.get("GLIBC_TUNABLES", "")
    if TCACHE_TUNABLE not in current:
        tunable = f"{TCACHE_TUNABLE}=0"
        changes["GLIBC_TUNABLES"] = f"{current}:{tunable}" if current else tunable
    if MKL_POOL_SWITCH not in environ:
        changes[MKL_POOL_SWITCH] = "1"
    return {**environ, **changes} if changes else None


def reexec_with_lean_malloc() -> None:
    """Restart the running command (same interpreter, same arguments, same process id) under :func:`lean_malloc_env`.

    Called by the command-line entry scripts before they import torch; a no-op when nothing changes or the command
    line is unknown. The Python API (``run_dpo``) runs in its caller's process and is never restarted.
    """
    env = lean_malloc_env(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot restart (a sandbox without exec): run on with glibc's caches
        return


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds; returns whether it applied (Linux glibc only)."""
    if not _glibc():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )

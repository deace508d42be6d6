"""Host-memory hygiene for CPU runs: the largest tensors go back to the system when freed, the rest reuse the heap.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with its own mapping, returned on free, but by default raises
that threshold (up to 32 MiB) each time such a block is freed, so that from then on almost every tensor comes from
the heap, whose freed space fragments and stays in the process's resident set. Fixing the threshold stops that.
Where to fix it is a trade between memory and time: a mapped block is zeroed page by page by the kernel each time it
is allocated. Measured on the TRL comparison (``scripts/bench/compare_trl.py``, our side only, 2 threads):

| threshold | 8k vocabulary: step, peak RSS | 128k vocabulary: step, peak RSS |
| --- | --- | --- |
| glibc's own (rising) | 0.62 s, 1,065-1,120 MB | 3.35 s, 2,467 MB |
| 64 KiB (every activation mapped) | 1.01 s, 924 MB | 4.60 s, 1,873 MB |
| 16 MiB (this one) | 0.62 s, 1,090 MB | 4.30 s, 2,088 MB |

At 16 MiB activations (a few MiB at these sizes) reuse the heap, so the 8k step keeps its speed, while the 128k
vocabulary's logit chunks and its 131 MB embedding and head gradients are mapped and returned after each use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES``; returns whether it applied (Linux glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))

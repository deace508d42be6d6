"""Free space on disk: how much a folder takes and its file system has, write failures told apart, and the one line
that names the path, the bytes needed and the bytes free.

A full disk shows up in three guises: an ``OSError`` (``ENOSPC`` from Python's, numpy's or pyarrow's writes),
safetensors' own ``SafetensorError`` (``os error 28``), and a ``RuntimeError`` from ``torch.save``'s archive writer
(``PytorchStreamWriter failed writing file``, ``unexpected pos``) that says nothing about space. :func:`write_failure`
turns each into an ``OSError``, so callers handle one kind.

Test hook, read here and nowhere else: ``OPEN_INSTRUCT_TEST_ENOSPC=<text>:<rank>`` makes the writes that call
:func:`injected_write_fault` with a file whose path contains ``<text>`` raise a real ``OSError(ENOSPC)`` on process
``<rank>`` (``*``: every process), so a whole-run test can fill the disk of one rank, or inside one library's save.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

ENOSPC_ENV = "OPEN_INSTRUCT_TEST_ENOSPC"

# What torch.save's C++ archive writer says when a write comes up short (no errno reaches Python).
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "inline_container")


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent: where a file to be written will land."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the file system that holds (or will hold) ``path``."""
    return shutil.disk_usage(existing_ancestor(path)).free


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(size: float) -> str:
    """``1234567`` -> ``1,234,567 bytes (1.2 MB)``: exact for scripts, rounded for people."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{int(size):,} bytes ({size / scale:.1f} {unit})"
    return f"{int(size):,} bytes"


def write_failure(err: BaseException) -> OSError | None:
    """The write error ``err`` stands for: an ``OSError`` itself; a library's own error that says the disk is full
    (safetensors' ``os error 28``) becomes ``ENOSPC``; torch.save's ``RuntimeError`` from a short write becomes
    ``EIO``. None for any other error."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    if "os error 28" in text or os.strerror(errno.ENOSPC) in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if isinstance(err, RuntimeError) and any(pattern in text for pattern in _TORCH_WRITE_FAILURES):
        return OSError(errno.EIO, f"write failed ({text.splitlines()[0][:120]})")
    return None


def failure_reason(err: OSError | None, path: str | os.PathLike, needed: int | None) -> str:
    """What went wrong, for the one error line: the error, the bytes needed (when known) and the bytes free now."""
    reason = (err.strerror or str(err)) if err is not None else "a write failed on another process"
    free = free_bytes(path)
    if err is not None and err.errno == errno.EIO and needed and free < needed:  # torch.save's short write, disk full
        reason = f"{os.strerror(errno.ENOSPC)} ({reason})"
    sizes = f"it needs about {human(needed)} and " if needed else ""
    return f"{reason}; {sizes}{human(free)} are free there"


def injected_write_fault(path: str | os.PathLike) -> None:
    """Raise ``OSError(ENOSPC)`` when the test hook targets ``path`` on this process (see the module docstring)."""
    spec = os.environ.get(ENOSPC_ENV, "")
    if not spec:
        return
    text, _, rank = spec.rpartition(":")
    if text and text in str(path) and rank in ("*", os.environ.get("RANK", "0")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

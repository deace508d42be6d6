"""Crash-safe writes (a reader sees the old file or the complete new one, never a partial one), the reader of the
append-only JSON-lines files a kill may cut short, and the one rule for whether a name given on the command line is a
path on this machine or a Hub id."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from open_instruct.disk_space import injected_write_fault


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (a file or a folder); on success it replaces ``path`` in one
    rename, on an error it is removed. A kill mid-write leaves only a hidden ``.NAME.PID.tmp`` leftover."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        injected_write_fault(tmp)
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> list:
    """The rows of an append-only JSON-lines file (``metrics.jsonl``, ``samples.jsonl``): none when it is missing, and a
    line a kill cut short skipped."""
    path = Path(path)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def move_contents(source: Path, target: Path) -> None:
    """Rename each entry of ``source`` into ``target`` (one atomic rename per file), then remove ``source``."""
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        destination = target / item.name
        if item.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(item, destination)
    source.rmdir()


def is_local_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` means a path on this machine rather than a Hub id: it exists, or it is spelled as a path
    (``./``, ``/``, ``~``), so a missing one is an error, never a Hub download."""
    return str(name).startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)

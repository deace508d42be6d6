"""The reference pass's progress on disk: shards written as it goes, so a killed or preempted pass continues.

Beside the finished cache ``<key>.pt`` lives, while a pass runs, the folder ``<key>.parts/``: ``shard_<seq>.pt``
files, each written atomically, holding the cache key, the table's row count, and the (dataset index, values) rows
that arrived since the previous shard, in arrival order (the padding accelerate adds to even out the last batch
arrives twice; replaying the shards in order rewrites it as the uninterrupted pass did, so the final table is
bit-identical). A shard is never a cache: only ``<key>.pt`` is read as one, and it is written when every row is
there, after which the folder is removed.

One process builds a key's shards at a time: the main process of the run holding an exclusive ``flock`` on the folder.
A second run building the same key at the same time computes on its own, writes no shards, and renames its finished
cache into place too (the same bytes for the same command); both succeed and one valid cache remains.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from open_instruct.disk_space import write_failure
from open_instruct.files import atomic_write

SHARD_VERSION = 1
_SHARD = re.compile(r"^shard_(\d+)\.pt$")


def parts_dir(cache_path: Path) -> Path:
    """``<key>.parts`` beside the cache file ``<key>.pt``."""
    return cache_path.with_suffix(".parts")


def _checksum(indices: torch.Tensor, values: torch.Tensor) -> str:
    digest = hashlib.sha256(indices.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(values.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_shard(folder: Path, seq: int, key: str, rows: int, indices: torch.Tensor, values: torch.Tensor) -> Path:
    """Write shard ``seq`` atomically: rows ``indices`` ``[n]`` of the ``rows``-row table hold ``values`` ``[n, K]``."""
    indices, values = indices.to(torch.int64).contiguous(), values.to(torch.float32).contiguous()
    payload = {
        "version": SHARD_VERSION,
        "key": key,
        "rows": rows,
        "seq": seq,
        "indices": indices,
        "values": values,
        "sha256": _checksum(indices, values),
    }
    path = folder / f"shard_{seq:06d}.pt"
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def _shard_problem(payload: Any, key: str, rows: int, columns: int) -> str:
    if not isinstance(payload, dict) or payload.get("version") != SHARD_VERSION:
        return "another shard format version"
    if payload.get("key") != key or payload.get("rows") != rows:
        return "its key or row count does not match this pass"
    indices, values = payload.get("indices"), payload.get("values")
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        return "no index or value table"
    if indices.ndim != 1 or tuple(values.shape) != (indices.shape[0], columns):
        return "index and value tables disagree in size"
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        return "indices out of range"
    if payload.get("sha256") != _checksum(indices, values) or not torch.isfinite(values).all():
        return "checksum mismatch or non-finite values"
    return ""


def read_shards(folder: Path, key: str, table: torch.Tensor, log: Callable[[str], Any] = print) -> int:
    """Replay the valid shards of ``folder`` into ``table`` ``[rows, K]`` in order; a damaged or foreign shard is
    named, deleted and its rows recomputed. Returns the next free sequence number."""
    if not folder.is_dir():
        return 0
    shards = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SHARD.match(p.name)))
    for _, path in shards:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            problem = _shard_problem(payload, key, table.shape[0], table.shape[1])
        except Exception as err:  # truncated or overwritten: many ways to fail
            problem = f"unreadable ({type(err).__name__})"
        if problem:
            log(f"reference pass: ignoring shard {path}: {problem}")
            path.unlink(missing_ok=True)
            continue
        table[payload["indices"]] = payload["values"]
    return shards[-1][0] + 1 if shards else 0


class ShardWriter:
    """Collects arrived rows and writes them as the next shard every ``every_rows`` rows or ``every_s`` seconds."""

    def __init__(
        self, folder: Path, key: str, rows: int, seq: int, every_rows: int, every_s: float = 60.0, log: Any = print
    ) -> None:
        self.folder, self.key, self.rows, self.seq, self.log = folder, key, rows, seq, log
        self.every_rows, self.every_s = every_rows, every_s
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending_rows, self.last = 0, time.monotonic()

    def add(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Record rows that arrived; write a shard when enough have."""
        self.pending.append((indices, values))
        self.pending_rows += indices.numel()
        if self.pending_rows >= self.every_rows or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> Path | None:
        """Write what is pending as one shard (nothing pending: nothing written)."""
        if not self.pending:
            return None
        indices = torch.cat([i for i, _ in self.pending])
        values = torch.cat([v for _, v in self.pending])
        try:
            path = write_shard(self.folder, self.seq, self.key, self.rows, indices, values)
        except Exception as err:  # a full disk also arrives as torch's RuntimeError
            if write_failure(err) is None:
                raise
            # Shards only save progress: the pass goes on (raising here, on one rank, would leave the others waiting
            # in the next gather); the final write says whether the disk has room.
            self.log(
                f"warning: reference pass: cannot write a shard in {self.folder} ({write_failure(err)}); "
                "going on without saving progress"
            )
            self.every_rows, self.every_s = float("inf"), float("inf")
            path = None
        self.seq, self.pending, self.pending_rows, self.last = self.seq + 1, [], 0, time.monotonic()
        return path


class BuilderLock:
    """An exclusive, non-blocking ``flock`` on the parts folder: who may write its shards. The kernel releases it when
    the process dies, so a killed run never leaves it held."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.fd = folder, None

    def acquire(self) -> bool:
        """Whether this process now holds the lock (False: another live run is building this key)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            return False
        except OSError:  # a file system without flock: build alone, as before locks existed
            return True
        return True

    def release(self) -> None:
        """Release the lock (closing the descriptor releases it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_parts(folder: Path) -> None:
    """Delete the shards once the whole cache is written."""
    shutil.rmtree(folder, ignore_errors=True)

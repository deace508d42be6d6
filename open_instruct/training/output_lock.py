"""One output folder, one run: the main process holds ``<output_dir>/.run.lock`` for as long as the run lives.

The lock is an exclusive, non-blocking ``flock`` on that file (the kernel releases it when the process dies, so a
``kill -9`` never leaves it held; see also ``reference_shards.BuilderLock``), and the file holds the holder's host, pid,
start time and command as JSON, to name it. A second run on the folder is refused with one ``error:`` line naming the
holder (exit code 2) before any expensive work. A lock file left by a dead run is taken over with one ``note:`` line:
its flock is free, or (a forked child of the dead run still holding it) its pid is gone on this host. A clean end
(also a preemption or an error) removes the file. The file's name starts with a dot: Hub pushes skip it.

Shared file systems: NFS (v4, or v3 with lockd) applies ``flock`` across hosts; where ``flock`` is not supported at
all (some FUSE or Lustre mounts without ``-o flock``), the holder's JSON is all there is: a holder on this host is
judged by its pid, and one on another host is taken as live (it cannot be checked from here), so the message says to
delete the file if that run is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from open_instruct.errors import UserError
from open_instruct.training.preemption import agreed
from open_instruct.training.processes import gone_here, machine_id

LOCK_NAME = ".run.lock"
_held: OutputLock | None = None


class OutputFolderBusy(UserError):
    """Another live run holds the output folder."""


def holder_details() -> dict[str, Any]:
    """This process as a lock holder: host, pid, start time (UTC), command."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host, pid, command = socket.gethostname(), os.getpid(), " ".join(sys.argv)
    return {"host": host, "pid": pid, "started": started, "command": command, "machine": machine_id()}


def describe(holder: dict[str, Any] | None) -> str:
    """``host H, pid P, started T`` of a holder's JSON (``an unknown holder`` when unreadable)."""
    if not holder:
        return "an unknown holder"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _pid_gone_here(holder: dict[str, Any] | None) -> bool:
    """Whether the holder ran on this machine (same pid namespace) and its pid no longer runs."""
    return bool(holder) and gone_here(holder.get("machine"), holder.get("pid"))


class OutputLock:
    """The lock on one output folder; :meth:`acquire` takes it or raises :class:`OutputFolderBusy`."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        self.mine: str | None = None  # the JSON this process wrote (release removes the file only while it is ours)

    def acquire(self, note: Callable[[str], Any] = print) -> None:
        """Take the lock (taking over a dead run's with a ``note:`` line), or raise naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the holder may remove the file between our open and our flock: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                locked = False
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                locked = None  # no flock on this file system: the holder's JSON decides
            if locked and not self._same_file(fd):
                os.close(fd)
                continue
            previous = self._read()
            if locked is False and not _pid_gone_here(previous):
                os.close(fd)
                raise self._busy(previous, "")
            if locked is None and previous and not _pid_gone_here(previous) and not self._this_process(previous):
                os.close(fd)
                raise self._busy(
                    previous, f"; if that run is gone, delete {self.path} (this file system has no flock)"
                )
            if previous:
                note(f"note: {self.path.parent} was held by a run that is gone ({describe(previous)}); taking it over")
            self.fd = fd
            self._write(holder_details())
            return
        raise OutputFolderBusy(f"{self.path} keeps changing: another run is starting on {self.path.parent}")

    def _this_process(self, holder: dict[str, Any]) -> bool:
        """A holder that is this very process (an earlier run in it that did not release) is no rival."""
        return holder.get("machine") == machine_id() and holder.get("pid") == os.getpid()

    def _busy(self, holder: dict[str, Any] | None, hint: str) -> OutputFolderBusy:
        return OutputFolderBusy(
            f"output folder {self.path.parent} is in use by another run ({describe(holder)}): wait for it to end "
            f"or choose another --output_dir{hint}"
        )

    def _same_file(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at the lock's path (not one a releasing holder just removed)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _read(self) -> dict[str, Any] | None:
        """The holder's JSON, None when empty or unreadable (a holder killed mid-write)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def _write(self, holder: dict[str, Any]) -> None:
        """Write the holder's JSON into the locked file in place (a rename would give others another file to lock)."""
        self.mine = json.dumps(holder)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self.mine.encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Remove the lock file (while it is still ours) and let the lock go; idempotent."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.mine:
                self.path.unlink()
        os.close(self.fd)
        self.fd = self.mine = None


def hold(output_dir: Path, accelerator: Any) -> None:
    """The main process takes the output folder's lock; when it is held, every rank stops (the main process with the
    ``error:`` line, exit code 2; the others quietly with the same code)."""
    global _held
    release()
    refusal: OutputFolderBusy | None = None
    if accelerator.is_main_process:
        lock = OutputLock(output_dir)
        try:
            lock.acquire(accelerator.print)
            _held = lock
        except OutputFolderBusy as err:
            refusal = err
    if agreed(accelerator, refusal is not None)[0]:
        if refusal is not None:
            raise refusal
        raise SystemExit(2)


def release() -> None:
    """Let go of the lock this process holds, if any (a run's end, also an API caller's)."""
    global _held
    if _held is not None:
        _held.release()
        _held = None

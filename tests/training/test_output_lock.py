"""One output folder, one run: a live holder refuses a second run naming itself; a dead run's lock is taken over with
a note; where the file system has no flock, the holder's pid decides."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open_instruct.training import output_lock
from open_instruct.training.output_lock import LOCK_NAME, OutputFolderBusy, OutputLock
from open_instruct.training.processes import machine_id


def _dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _holder(pid: int, host: str | None = None) -> str:
    machine = machine_id() if host is None else f"{host}/boot/ns"
    return json.dumps(
        {"host": host or socket.gethostname(), "machine": machine, "pid": pid, "started": "2026-01-02T03:04:05Z"}
    )


def test_a_live_holder_refuses_a_second_lock_naming_itself(tmp_path: Path) -> None:
    first, notes = OutputLock(tmp_path), []
    first.acquire(notes.append)
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and notes == []
    with pytest.raises(OutputFolderBusy) as refused:
        OutputLock(tmp_path).acquire(notes.append)  # another open file: flock conflicts even in one process
    message = str(refused.value)
    assert str(tmp_path) in message and f"pid {os.getpid()}" in message and holder["started"] in message
    assert f"host {socket.gethostname()}" in message and "--output_dir" in message
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()  # a clean end leaves no lock behind: the next run gets no note
    second = OutputLock(tmp_path)
    second.acquire(notes.append)
    assert notes == []
    second.release()


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(_holder(dead))  # a kill -9: the file stays, the kernel freed the flock
    notes: list[str] = []
    lock = OutputLock(tmp_path)
    lock.acquire(notes.append)
    assert len(notes) == 1 and notes[0].startswith("note: ") and f"pid {dead}" in notes[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_flock_kept_by_a_dead_holders_child_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(_holder(_dead_pid()))
    inherited = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # a forked worker of the dead run still holds the flock
    fcntl.flock(inherited, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        notes: list[str] = []
        lock = OutputLock(tmp_path)
        lock.acquire(notes.append)
        assert len(notes) == 1 and "is gone" in notes[0]
        lock.release()
    finally:
        os.close(inherited)


def test_without_flock_the_holders_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / LOCK_NAME
    path.write_text(_holder(os.getppid()))  # alive on this host
    with pytest.raises(OutputFolderBusy, match=f"pid {os.getppid()}.*delete"):
        OutputLock(tmp_path).acquire()
    path.write_text(_holder(12345, host="another-host"))  # cannot be checked from here: taken as live
    with pytest.raises(OutputFolderBusy, match="another-host"):
        OutputLock(tmp_path).acquire()
    path.write_text(_holder(_dead_pid()))
    notes: list[str] = []
    lock = OutputLock(tmp_path)
    lock.acquire(notes.append)
    assert len(notes) == 1 and notes[0].startswith("note: ")
    lock.release()


class _Accelerator:
    is_main_process = True
    num_processes = 1

    def print(self, text: str) -> None:
        print(text)


def test_hold_refuses_and_release_lets_go(tmp_path: Path) -> None:
    other = OutputLock(tmp_path)
    other.acquire()
    with pytest.raises(OutputFolderBusy):
        output_lock.hold(tmp_path, _Accelerator())
    other.release()
    output_lock.hold(tmp_path, _Accelerator())
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    output_lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


class _OtherRank(_Accelerator):
    """A non-main rank of 2 whose main process found the folder held (the all-reduce of the refusal flag says 1)."""

    is_main_process = False
    num_processes = 2
    device = "cpu"

    def reduce(self, tensor, reduction: str):
        return tensor + torch.ones_like(tensor)


def test_the_other_ranks_stop_quietly_with_the_same_code_and_take_no_lock(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        output_lock.hold(tmp_path, _OtherRank())
    assert stopped.value.code == 2 and not (tmp_path / LOCK_NAME).exists()
    assert capsys.readouterr().err == ""  # the main process prints the one error line

"""Free space, folder sizes, write failures told apart, the test hook; and a real full file system where one can be
mounted (root and a tmpfs; skipped otherwise)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from open_instruct import disk_space
from open_instruct.disk_space import (
    ENOSPC_ENV,
    existing_ancestor,
    failure_reason,
    free_bytes,
    human,
    injected_write_fault,
    tree_bytes,
    write_failure,
)


def small_tmpfs(path: Path, size: str) -> Path:
    """Mount a tmpfs of ``size`` at ``path`` (skip the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    return path


def unmount(path: Path) -> None:
    """Undo :func:`small_tmpfs`."""
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system (a real ``ENOSPC`` once it is full)."""
    path = small_tmpfs(tmp_path / "small", "64k")
    yield path
    unmount(path)


def test_sizes_and_free_space_of_paths_still_to_be_written(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1" * 1000)
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "a" / "b" / "y").write_bytes(b"2" * 234)
    assert tree_bytes(tmp_path / "a") == 1234
    assert tree_bytes(tmp_path / "a" / "x") == 1000 and tree_bytes(tmp_path / "missing") == 0
    assert existing_ancestor(tmp_path / "not" / "yet" / "there") == tmp_path
    asked = []  # the real figure moves while other tests write: check which folder is asked, not a second reading

    def usage(path):
        asked.append(Path(path))
        return shutil._ntuple_diskusage(100, 58, 42)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert free_bytes(tmp_path / "not" / "yet") == 42 and asked == [tmp_path]
    assert human(1234) == "1,234 bytes (1.2 kB)" and human(999) == "999 bytes"
    assert human(2_500_000_000) == "2,500,000,000 bytes (2.5 GB)"


def test_failure_reason_names_needed_and_free_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 10)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert failure_reason(full, tmp_path, 5000) == (
        "No space left on device; it needs about 5,000 bytes (5.0 kB) and 10 bytes are free there"
    )
    assert failure_reason(None, tmp_path, None) == "a write failed on another process; 10 bytes are free there"
    short = OSError(errno.EIO, "write failed (unexpected pos)")  # torch.save's short write: space decides the words
    assert failure_reason(short, tmp_path, 11).startswith("No space left on device (write failed (unexpected pos)); ")
    assert failure_reason(short, tmp_path, 10).startswith("write failed (unexpected pos); ")


def test_a_short_torch_save_on_a_full_file_system_is_a_write_failure(full_disk):
    with pytest.raises(RuntimeError) as err:  # torch.save's archive writer: no OSError, no errno
        torch.save(torch.zeros(100_000), full_disk / "big.pt")
    failure = write_failure(err.value)
    assert isinstance(failure, OSError) and failure.errno == errno.EIO and "write failed" in failure.strerror
    with pytest.raises(OSError) as err:
        (full_disk / "big.bin").write_bytes(b"x" * 200_000)
    assert write_failure(err.value) is err.value and err.value.errno == errno.ENOSPC
    from safetensors.torch import save_file

    with pytest.raises(Exception) as err:  # safetensors' own error type, "os error 28" in its text
        save_file({"w": torch.zeros(100_000)}, str(full_disk / "big.safetensors"))
    assert not isinstance(err.value, OSError) and write_failure(err.value).errno == errno.ENOSPC
    assert write_failure(RuntimeError("shapes do not match")) is None and write_failure(ValueError()) is None


def test_the_test_hook_targets_a_path_and_a_rank(tmp_path, monkeypatch):
    monkeypatch.delenv(ENOSPC_ENV, raising=False)
    injected_write_fault(tmp_path / "step_2" / "x.pt")  # unset: nothing
    monkeypatch.setenv(ENOSPC_ENV, "step_2/:1")
    monkeypatch.setenv("RANK", "0")
    injected_write_fault(tmp_path / "step_2" / "x.pt")  # another rank's fault
    monkeypatch.setenv("RANK", "1")
    injected_write_fault(tmp_path / "step_4" / "x.pt")  # another path
    with pytest.raises(OSError) as err:
        injected_write_fault(tmp_path / "step_2" / "x.pt")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setenv(ENOSPC_ENV, "step_2/:*")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(OSError):
        injected_write_fault(tmp_path / "step_2" / "x.pt")

"""Cluster faults of whole runs: a rank that raises or is killed stops every rank within the bound, named in the log,
under torchrun and with ranks started on their own (as ``srun`` does); one run per output folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, distributed_env, free_port, run_cli, small_run_args, torchrun_command

pytestmark = pytest.mark.slow

TIMEOUT = "2"  # --rank_failure_timeout: the smallest that still lets a loaded 2-core machine beat in time
BOUND = 20.0  # seconds from the fault to the last process's end: the timeout, one heartbeat, and process teardown


def _flags(model_dir: Path, synthetic_data, out: Path) -> list[str]:
    return small_run_args(model_dir, synthetic_data[0], out, rank_failure_timeout=TIMEOUT)


class _Lines:
    """A process's merged output, each line with the monotonic time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, _Lines]:
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, _Lines(proc)


def test_exception_on_one_rank_stops_both_naming_it(tiny_model_dir, synthetic_data, tmp_path) -> None:
    """torchrun, 2 processes: rank 1 raises after optimizer step 2 while rank 0 goes on into step 3's collectives."""
    env = {**distributed_env(tmp_path / "cache"), "OPEN_INSTRUCT_TEST_RAISE_AT_STEP": "1:2"}
    proc, out = _start(torchrun_command(_flags(tiny_model_dir, synthetic_data, tmp_path / "out")), env)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out.thread.join(10)
    text = out.text()
    raised = out.first("RuntimeError: injected fault on rank 1 after optimizer step 2")
    assert proc.returncode != 0 and raised is not None, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: rank 1 failed: RuntimeError: injected fault on rank 1 after optimizer step 2 "
        "(OPEN_INSTRUCT_TEST_RAISE_AT_STEP) (rank 0 stops too)"
    ], text[-4000:]
    summary = text[text.index("Failures:") :]  # torchrun's report lists every process that did not exit 0
    assert "rank      : 0" in summary and "rank      : 1" in summary, summary
    took = out.lines[-1][0] - raised
    assert took < BOUND, f"{took:.1f} s from the error to the end"


def test_a_killed_rank_started_without_an_agent_is_named_by_the_survivor(tiny_model_dir, synthetic_data, tmp_path):
    """Each rank its own process (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as srun starts them): rank 1 gets a real
    SIGKILL after optimizer step 2, while rank 0 waits in step 3's collectives; no agent kills rank 0."""
    env = {
        **distributed_env(tmp_path / "cache"),
        "OPEN_INSTRUCT_TEST_RAISE_AT_STEP": "1:2:SIGKILL",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    command = [sys.executable, "-m", "open_instruct.dpo_tune_cache", *_flags(tiny_model_dir, synthetic_data, tmp_path)]
    ranks = [_start(command, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    (main, main_out), (peer, _) = ranks
    try:
        peer.wait(timeout=300)
        killed_at = time.monotonic()
        main.wait(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                proc.kill()
    main_out.thread.join(10)
    text = main_out.text()
    assert peer.returncode == -signal.SIGKILL, text[-3000:]
    assert main.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"rank 1 (pid {peer.pid} on {socket.gethostname()}) vanished" in errors[0], text[
        -4000:
    ]
    assert "kill -9" in errors[0] and "rank 0 stops too" in errors[0]
    assert took < BOUND, f"{took:.1f} s from the kill to rank 0's end"


_HOLDER = "from open_instruct.training.output_lock import OutputLock\nimport sys, time\n" \
    "OutputLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"  # fmt: skip


def test_one_run_per_output_folder(tiny_model_dir, synthetic_data, tmp_path) -> None:
    """A live holder (another process) refuses the run naming it, before any work; killed with SIGKILL, its lock is
    taken over with a note and removed when the run ends."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        flags = small_run_args(tiny_model_dir, synthetic_data[0], out, cache_dataset_only="true")
        refused = run_cli(flags, tmp_path / "cache", timeout=300)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert refused.returncode == 2 and len(errors) == 1, refused.stdout[-2000:] + refused.stderr[-3000:]
        assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in errors[0] and str(out) in errors[0]
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # refused before any work
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    taken = run_cli(flags, tmp_path / "cache", timeout=300)
    assert taken.returncode == 0, taken.stdout[-2000:] + taken.stderr[-3000:]
    notes = [line for line in taken.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "taking it over" in notes[0], taken.stdout
    assert not (out / ".run.lock").exists()  # a clean end leaves no lock

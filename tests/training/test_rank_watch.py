"""The rank watch: a silent or vanished rank, a published error and an unreachable store end the watching ranks,
named; beating ranks (a long main-process-only phase) and finished ranks do not. In-process on a real TCPStore with a
fake clock, then two real processes where the survivor waits in no collective at all (as NCCL would: no error comes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from open_instruct.errors import UserError
from open_instruct.training import rank_watch
from open_instruct.training.preemption import Preempted
from open_instruct.training.rank_watch import DONE, RankWatch, _Thread
from tests.conftest import ROOT, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> TCPStore:
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _watches(store: TCPStore, world: int, clock: Clock, timeout: float = 10) -> list[RankWatch]:
    watches = [RankWatch(store, r, world, timeout, "t/", clock) for r in range(world)]
    for w in watches:
        w.announce()
    return watches


def test_a_silent_rank_is_named_after_the_timeout_and_every_rank_hears_of_it(store: TCPStore) -> None:
    clock = Clock()
    main, _silent, third = _watches(store, 3, clock)
    main.who[1] = ("another-host", "another-host/boot/ns", 4242)  # not on this host: only its heartbeat can tell
    assert main.poll() is None  # rank 1's last heartbeat is seen now
    for _ in range(4):  # 9.6 s of silence from rank 1: within the 10 s timeout
        clock.now += 2.4
        assert main.poll() is None and third.poll() is None
    clock.now += 0.5
    failure = main.poll()
    assert failure is not None and failure.startswith("1 rank 1 (pid 4242 on another-host) sent no heartbeat for 10 s")
    assert "--rank_failure_timeout 10" in failure
    assert third.poll() == failure  # the others read the main process's verdict from the store


def test_beating_ranks_live_through_a_long_wait_and_finished_ranks_may_fall_silent(store: TCPStore) -> None:
    clock = Clock()
    main, other = _watches(store, 2, clock, timeout=5)
    for _ in range(30):  # 90 s: the others wait at a barrier while the main process prepares data, all beating
        clock.now += 3
        assert other.poll() is None and main.poll() is None
    other.finish()
    assert int(store.add("t/beat/1", 0)) >= DONE
    clock.now += 60
    assert main.poll() is None


def test_a_peer_gone_from_this_host_is_named_at_once(store: TCPStore) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    clock = Clock()
    main, _ = _watches(store, 2, clock)
    store.set("t/who/1", f"{child.pid} {main.machine} {main.host}")
    clock.now += 0.1
    failure = main.poll()
    assert failure is not None and f"rank 1 (pid {child.pid} on {main.host}) vanished" in failure


class _DeadStore:
    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise RuntimeError("Connection reset by peer")

        return fail


def test_an_unreachable_store_means_the_main_process_is_gone_after_the_timeout() -> None:
    clock = Clock()
    watch = RankWatch(_DeadStore(), 1, 2, 10, "t/", clock)
    clock.now += 9
    assert watch.poll() is None  # a passing hiccup is no death
    clock.now += 2
    failure = watch.poll()
    assert failure is not None and "rank 0 or its host is gone" in failure and "unreachable for 11 s" in failure


@pytest.mark.parametrize(
    ("error", "record"),
    [
        (RuntimeError("boom\nsecond line"), "1 rank 1 failed: RuntimeError: boom second line"),
        (UserError("bad row 3"), "2 rank 1 failed: bad row 3"),
        (Preempted("stopped"), None),
        (SystemExit(0), None),
    ],
)
def test_an_error_leaving_the_run_is_published(store: TCPStore, error: BaseException, record: str | None) -> None:
    clock = Clock()
    _, watch = _watches(store, 2, clock)
    rank_watch._current = _Thread(watch, 0.05)
    with pytest.raises(type(error)), rank_watch.reporting():
        raise error
    assert rank_watch._current is None
    assert watch.published() == record
    assert (int(store.add("t/beat/1", 0)) >= DONE) == (record is None)  # a clean stop is no death


def test_the_injection_hook_raises_only_on_its_rank_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    assert rank_watch.with_injected_fault(seen.append, 1) == seen.append  # no test hook: the loop's own hook
    monkeypatch.setenv(rank_watch.RAISE_ENV, "1:3")
    assert rank_watch.with_injected_fault(seen.append, 0) == seen.append
    hook = rank_watch.with_injected_fault(seen.append, 1)
    hook(2)
    with pytest.raises(RuntimeError, match="rank 1 after optimizer step 3"):
        hook(3)
    assert seen == [2, 3]


_PAIR = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch.distributed as dist
    from open_instruct.training import rank_watch
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rank_watch.start(float(sys.argv[1]))
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.Signals[sys.argv[2]])
    print("waiting", flush=True)
    time.sleep(600)  # as NCCL waits on a dead peer: no error ever comes
    """
)


def _pair(tmp_path: Path, sig: str, timeout: float) -> tuple[subprocess.Popen, subprocess.Popen]:
    script = tmp_path / "pair.py"
    script.write_text(_PAIR)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = str(ROOT)
    procs = []
    for rank in (0, 1):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(timeout), sig],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs[0], procs[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "said", "bound"),
    [("SIGKILL", "rank 1 (pid {pid} on", 5.0), ("SIGSTOP", "rank 1 (pid {pid} on", 8.0)],
)
def test_the_survivor_of_a_killed_or_frozen_peer_exits_naming_it(tmp_path: Path, sig: str, said: str, bound: float):
    """SIGKILL: the pid is gone from this host, named within a heartbeat; SIGSTOP (a frozen host: the pid lives on),
    named once its heartbeat stood still for the 2 s timeout."""
    main, peer = _pair(tmp_path, sig, timeout=2)
    try:
        deadline = time.monotonic() + 120
        while peer.poll() is None and time.monotonic() < deadline:
            if sig == "SIGSTOP" and _stopped(peer.pid):
                break
            time.sleep(0.05)
        stopped_at = time.monotonic()
        main.wait(timeout=60)
        took = time.monotonic() - stopped_at
        err = main.stderr.read()
        assert main.returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and said.format(pid=peer.pid) in lines[0] and "rank 0 stops too" in lines[0], err
        assert ("vanished" if sig == "SIGKILL" else "sent no heartbeat") in lines[0]
        assert took < bound, took
    finally:
        for proc in (main, peer):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"

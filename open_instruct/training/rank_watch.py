"""A rank that dies while the others wait in a collective ends the whole run within a bounded time, and says which.

NCCL waits for a vanished peer until the collective timeout (``--timeout``, 30 minutes), and with no launcher agent
(SLURM's ``srun`` starting each rank) nothing else ends the survivors. So every rank of a multi-process run runs a
daemon thread that, every ``interval`` seconds, counts a heartbeat in the run's key-value store (its own client of the
``MASTER_ADDR:MASTER_PORT`` TCPStore, so a slow or dead store never blocks the process group's connection):

- A rank whose run raises publishes ``rank R failed: <error>`` (the first failure wins) before it exits
  (:func:`reporting`); the others read it within one interval.
- The main process watches every rank's heartbeat, the others watch the main process's and the failure record (one
  store read each per interval, however many ranks). A heartbeat that has not moved for ``--rank_failure_timeout``
  seconds, or a peer whose pid is gone from this machine (``processes.gone_here``), is a dead rank (a ``kill -9``,
  the out-of-memory killer, a frozen or lost host).
- The store lives in the main process when ranks are started directly, so store calls that keep failing for the
  timeout mean the main process is gone.

A rank that sees a failure prints one ``error:`` line naming the failed rank and its error and ends its process with
``os._exit`` (the failed rank's exit code: 2 for bad input, else 1): a thread cannot interrupt a blocked collective. That
also bounds a preemption save whose peers are gone (torchrun's agent sends SIGTERM to the survivors of a dead worker:
their checkpoint needs every rank). Main-process-only work (data preparation, the reference pass) while the others wait
at a barrier is no death: every rank's thread keeps beating.

Test hook, read here and nowhere else: ``OPEN_INSTRUCT_TEST_RAISE_AT_STEP=RANK:STEP`` raises ``RuntimeError`` on rank
RANK right after optimizer step STEP; ``RANK:STEP:SIGKILL`` (any signal name) sends that rank the signal there
instead (:func:`with_injected_fault`, around the training loop's after-step hook).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from open_instruct.errors import UserError
from open_instruct.training.preemption import Preempted
from open_instruct.training.processes import gone_here, machine_id

RAISE_ENV = "OPEN_INSTRUCT_TEST_RAISE_AT_STEP"
DONE = 1 << 40  # added to a heartbeat count by a rank that finished cleanly: its silence from then on is no death
MAX_INTERVAL = 5.0
_generation = 0  # runs started in this process: every rank starts the same sequence, so the keys agree
_current: RankWatch | None = None


def interval_for(timeout: float) -> float:
    """Seconds between heartbeats: a quarter of the timeout (several beats fit in it), at most 5 s."""
    return max(0.05, min(MAX_INTERVAL, timeout / 4))


class RankWatch:
    """One rank's view of its peers through ``store``; :meth:`poll` beats once and returns a failure line or None.

    ``clock``: monotonic seconds (tests pass a fake one). Silence is timed on this rank's clock from when it last saw
    a heartbeat change, so clocks of different hosts never meet."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        timeout: float,
        prefix: str = "rank_watch/",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.prefix, self.clock = prefix, clock
        self.host, self.machine = socket.gethostname(), machine_id()
        now = clock()
        self.seen: dict[int, tuple[int, float]] = {r: (-1, now) for r in self.watched()}
        self.last_ok = now
        self.who: dict[int, tuple[str, str, int]] = {}  # rank -> (host, machine, pid) it announced

    def watched(self) -> list[int]:
        """The ranks this one watches: all others for the main process, the main process for the rest."""
        return [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]

    def key(self, name: str) -> str:
        """This run's store key ``name``."""
        return self.prefix + name

    def announce(self) -> None:
        """First heartbeat, and this rank's host and pid (a peer on the same host can then see it vanish at once)."""
        self.store.set(self.key(f"who/{self.rank}"), f"{os.getpid()} {self.machine} {self.host}")
        self.store.add(self.key(f"beat/{self.rank}"), 1)

    def poll(self) -> str | None:
        """Beat once, then the failure to act on: a published one, a silent or vanished peer, or an unreachable
        store; None while all is well."""
        now = self.clock()
        try:
            self.store.add(self.key(f"beat/{self.rank}"), 1)
            failure = self.published()
            if failure is None:
                failure = next(filter(None, (self.silent(r, now) for r in self.watched())), None)
                if failure is not None:
                    failure = self.publish(failure)
        except Exception as err:  # noqa: BLE001 - any store failure is evidence: the store went with its host
            host, machine, pid = self.who.get(0, ("", "", 0))
            if self.rank != 0 and gone_here(machine, pid):
                return f"1 rank 0 (pid {pid} on {host}) vanished without an error: killed (kill -9, out of memory?)"
            if now - self.last_ok > self.timeout:
                return (
                    f"1 rank 0 or its host is gone: the run's store on it (MASTER_ADDR:MASTER_PORT) is unreachable "
                    f"for {now - self.last_ok:.0f} s ({err})"
                )
            return None
        self.last_ok = now
        return failure

    def published(self) -> str | None:
        """The failure record a rank published (``"CODE rank R failed: ..."``), if any; reading it is acknowledged
        (the main process, which hosts the store when ranks start on their own, waits for that before it exits)."""
        key = self.key("failed")
        if not self.store.check([key]):
            return None
        if self.rank != 0:
            self.store.add(self.key("acknowledged"), 1)
        return self.store.get(key).decode()

    def wait_acknowledged(self, seconds: float, readers: int) -> None:
        """Up to ``seconds`` for ``readers`` other ranks to have read the failure record (store errors end it)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(Exception):
            while int(self.store.add(self.key("acknowledged"), 0)) < readers and time.monotonic() < deadline:
                time.sleep(0.05)

    def publish(self, failure: str) -> str:
        """Record ``failure`` unless another was first; returns the record that stands."""
        return self.store.compare_set(self.key("failed"), "", failure).decode()

    def silent(self, rank: int, now: float) -> str | None:
        """``"1 rank R ..."`` when ``rank`` vanished from this host or its heartbeat stood still for the timeout."""
        count = int(self.store.add(self.key(f"beat/{rank}"), 0))
        if count >= DONE:
            return None
        last, since = self.seen[rank]
        if count != last:
            self.seen[rank] = (count, now)
            since = now
        vanished = self.vanished(rank)
        if vanished is not None:
            return vanished
        if now - since > self.timeout:
            host, _, pid = self.identity(rank)
            where = f" (pid {pid} on {host})" if pid else ""
            return (
                f"1 rank {rank}{where} sent no heartbeat for {now - since:.0f} s (--rank_failure_timeout "
                f"{self.timeout:g}): killed, out of memory, or its host is gone"
            )
        return None

    def vanished(self, rank: int) -> str | None:
        """``"1 rank R ... vanished"`` when ``rank`` ran on this host, its pid is gone, and it did not finish."""
        host, machine, pid = self.identity(rank)
        if not gone_here(machine, pid) or self.store.add(self.key(f"beat/{rank}"), 0) >= DONE:
            return None
        return f"1 rank {rank} (pid {pid} on {host}) vanished without an error: killed (kill -9, out of memory?)"

    def vanished_peer(self) -> str | None:
        """The first peer on this host that vanished (what a collective's "connection reset" error really means)."""
        return next(filter(None, (self.vanished(r) for r in range(self.world_size) if r != self.rank)), None)

    def cause_elsewhere(self, seconds: float) -> str | None:
        """Another rank's failure behind this rank's error, waiting up to ``seconds`` for it: a collective fails the
        moment a dying peer's sockets close, a little before its pid is gone or its own error is published."""
        deadline = time.monotonic() + seconds
        while True:
            found = self.published() or self.vanished_peer()
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def identity(self, rank: int) -> tuple[str, str, int]:
        """(host, machine, pid) a peer announced (see ``processes.machine_id``), ("", "", 0) until it has."""
        if rank not in self.who:
            key = self.key(f"who/{rank}")
            if not self.store.check([key]):
                return "", "", 0
            pid, machine, host = self.store.get(key).decode().split(" ", 2)
            self.who[rank] = (host, machine, int(pid))
        return self.who[rank]

    def finish(self) -> None:
        """Mark this rank finished, so that its silence from now on is no death."""
        with contextlib.suppress(Exception):
            self.store.add(self.key(f"beat/{self.rank}"), DONE)


class _Thread:
    """The daemon thread around a :class:`RankWatch`: polls, and ends the process on a failure."""

    def __init__(self, watch: RankWatch, interval: float) -> None:
        self.watch, self.interval = watch, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="rank-watch", daemon=True)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            failure = self.watch.poll()
            if failure is not None and not self.stopped.is_set():
                end_process(failure, self.watch, self.interval)
                return


def end_process(failure: str, watch: RankWatch, interval: float) -> None:
    """Print the failure as one ``error:`` line and end this process with its code (from a thread: ``os._exit``)."""
    code, text = failure.split(" ", 1)
    print(f"error: {text} (rank {watch.rank} stops too)", file=sys.stderr, flush=True)
    if watch.rank == 0:  # the others read it from the store this process may host; the failed rank never does
        watch.wait_acknowledged(3 * interval, watch.world_size - 2)
    os._exit(int(code))


def start(timeout: float, log: Callable[[str], Any] = print) -> None:
    """Watch this run's ranks (several processes only; ``timeout`` 0: off). Call once the process group exists."""
    global _generation, _current
    stop()
    _generation += 1
    if timeout <= 0 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    try:
        store = _store_client(timeout)
    except Exception as err:  # noqa: BLE001 - the watch is a safety net: the run goes on without it, and says so
        store, why = None, f"the run's store is unreachable ({err})"
    else:
        why = "no MASTER_ADDR/MASTER_PORT"
    if store is None:
        log(f"rank watch: off, {why}; a dead rank is then noticed only at the collective --timeout")
        return
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    prefix = f"rank_watch/{run_id}/{_generation}/"  # a torchrun restart, or a later run in this process: fresh keys
    watch = RankWatch(store, dist.get_rank(), dist.get_world_size(), timeout, prefix)
    watch.announce()
    _current = _Thread(watch, interval_for(timeout))
    _current.thread.start()


def _store_client(timeout: float) -> Any:
    """A client of the run's TCPStore (the one ``env://`` and torchrun use), or None without its address."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    wait = timedelta(seconds=max(1.0, min(timeout, 30.0)))  # a store that stopped answering counts as gone
    return dist.TCPStore(host, int(port), is_master=False, timeout=wait, wait_for_workers=False)


def stop(finished: bool = True) -> None:
    """Stop watching (``finished``: this rank ended cleanly, its silence is no death); idempotent."""
    global _current
    if _current is None:
        return
    current, _current = _current, None
    current.stopped.set()
    # The thread may be inside a store call: the store's client is not shared across threads, and a process that
    # exits while a daemon thread is in C++ can abort ("terminate called without an active exception").
    if current.thread.is_alive() and current.thread is not threading.current_thread():
        current.thread.join(timeout=2 * current.interval + 1.0)
    if finished:
        current.watch.finish()


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Around a run: an exception leaving it is published for the other ranks (or, when another rank failed first,
    this rank says so and exits with its code); a clean end marks this rank finished."""
    try:
        yield
    except BaseException as err:
        current, failed = _current, _counts_as_failure(err)
        stop(finished=not failed)  # a failing rank reports its own error: its thread must not end it with another
        if current is not None and failed:
            _publish(current, err)
        raise
    stop()


def _publish(current: _Thread, err: BaseException) -> None:
    """Publish this rank's failure; when another rank's came first, or a peer on this host vanished, a failure that
    is not bad input (gloo's "connection reset" after a peer died) names that rank instead and ends this process."""
    watch, user_error = current.watch, isinstance(err, UserError)
    own = f"{2 if user_error else 1} rank {watch.rank} failed: {_describe(err)}"
    try:
        failure = None if user_error else watch.cause_elsewhere(min(2 * current.interval, 1.0))
        standing = watch.publish(failure or own)
    except Exception:  # noqa: BLE001 - the store is gone: this rank's own traceback is all there is to say
        return
    if standing != own and not user_error:
        end_process(standing, watch, current.interval)
    if watch.rank == 0:  # the others read it from the store this process may host
        watch.wait_acknowledged(3 * current.interval, watch.world_size - 1)


def _counts_as_failure(err: BaseException) -> bool:
    """Every exception but a clean exit and a preemption (every rank agreed to stop there, after its save)."""
    if isinstance(err, SystemExit):
        return err.code not in (0, None)
    return not isinstance(err, Preempted)


def _describe(err: BaseException) -> str:
    """``Type: message``, on one line."""
    text = " ".join(str(err).split()) or "(no message)"
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def with_injected_fault(step_hook: Callable[[int], None] | None, rank: int) -> Callable[[int], None] | None:
    """The loop's after-step hook, plus (tests only, when ``OPEN_INSTRUCT_TEST_RAISE_AT_STEP=RANK:STEP[:SIGNAL]`` names
    this rank) a fault after optimizer step STEP: ``RuntimeError``, or the signal sent to this process (``SIGKILL``:
    a real kill -9 at a known point)."""
    parts = os.environ.get(RAISE_ENV, "").strip().split(":")
    if len(parts) < 2 or parts[0] != str(rank):
        return step_hook

    def hook(step: int) -> None:
        if step_hook is not None:
            step_hook(step)
        if str(step) == parts[1]:
            if len(parts) > 2:
                os.kill(os.getpid(), signal.Signals[parts[2]])
            raise RuntimeError(f"injected fault on rank {rank} after optimizer step {step} ({RAISE_ENV})")

    return hook

"""Wall time by phase of one run (data, reference pass, training, save), for the summary at its end.

A recipe marks its phases with ``with phase("training"):``; the command-line entry starts the clock before the run and
reads :func:`phase_seconds` after it, also when a stop signal ended it (a phase cut short counts up to the cut). One
clock per process: a run is one process's life, and the stages need no object passed down to time themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class PhaseClock:
    """Seconds spent in each named phase since :meth:`restart`, in the order the phases first began."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget every phase; the total counts from now."""
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (a phase entered twice adds up)."""
        begun = time.perf_counter()
        self.seconds.setdefault(name, 0.0)
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begun

    def total(self) -> float:
        """Seconds since :meth:`restart`."""
        return time.perf_counter() - self.started


CLOCK = PhaseClock()


def phase(name: str) -> AbstractContextManager[None]:
    """``with phase("reference pass"):`` times the block on this process's clock."""
    return CLOCK.phase(name)


def restart_clock() -> None:
    """A run starts: the phases and the total count from now."""
    CLOCK.restart()


def phase_seconds() -> tuple[dict[str, float], float]:
    """(seconds by phase, total seconds since the run started)."""
    return dict(CLOCK.seconds), CLOCK.total()

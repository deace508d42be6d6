"""Preemption: a scheduler's stop signal becomes a clean stop at the next safe point, then a requeueable exit.

SLURM and Kubernetes send SIGTERM (SLURM can send SIGUSR1 a set time before the end) and kill a little later. The
handler installed here only records the signal; the training loop, the reference pass and evaluation ask
:func:`stop_agreed` at their safe points (once per optimizer step, once per reference or evaluation batch), which
all-reduces the flag so every rank stops at the same point. They then save what is done (a complete checkpoint, the
reference pass's shards) and raise :class:`Preempted`; the command line turns it into exit code
:data:`PREEMPTED_EXIT_CODE`. Rerunning the same command resumes. A second signal of the same kind stops at once
(its default action), for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". Schedulers requeue on it.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGUSR1"


class Preempted(Exception):
    """The run stopped on a preemption signal after saving its progress; rerun the same command to resume.
    ``step``: the optimizer step saved (None: stopped before training, in the reference pass)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class EvaluationStopped(Exception):
    """An evaluation cut short by a stop signal (the loop checkpoints, marks it pending, and raises Preempted)."""


_requested: signal.Signals | None = None
_installed: dict[signal.Signals, Any] = {}


def exit_preempted() -> None:
    """Exit with :data:`PREEMPTED_EXIT_CODE`, every rank together.

    Every rank raised :class:`Preempted` at the same agreed point, so the barrier cannot wait on a rank that went on.
    A process that exits with its gloo group still open can die of SIGABRT ("terminate called without an active
    exception") when a peer closed first; the launcher then reports that instead of 75, and a scheduler that
    requeues on 75 would drop a run whose progress is saved."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(PREEMPTED_EXIT_CODE)


def parse_signals(text: str | None) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` (or ``USR1``, or ``none``) -> signals; ValueError naming an unknown or unsafe one."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    result = []
    for name in (part.strip().upper() for part in text.split(",") if part.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal, name):
            raise ValueError(f"{name} is not a signal that can be caught (use e.g. SIGTERM,SIGINT,SIGUSR1 or none)")
        result.append(signal.Signals[name])
    return result


def _handler(signum: int, frame: Any) -> None:
    global _requested
    sig = signal.Signals(signum)
    if _requested == sig:  # the second time: stop now
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
        return
    _requested = sig


def install(signals: Iterable[signal.Signals], log: Callable[[str], Any] = print) -> None:
    """Catch ``signals`` in this process from now on (the main thread only; elsewhere it says so and does nothing)."""
    signals = list(signals)
    if not signals:
        return
    if threading.current_thread() is not threading.main_thread():
        log("preemption: not on the main thread; stop signals keep their default action")
        return
    for sig in signals:
        _installed.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _handler)


def uninstall() -> None:
    """Restore the handlers :func:`install` replaced and forget any request (for API callers and tests)."""
    global _requested
    for sig, previous in _installed.items():
        signal.signal(sig, previous)
    _installed.clear()
    _requested = None


def requested() -> signal.Signals | None:
    """The signal this process received, if any."""
    return _requested


def stop_agreed(accelerator: Any) -> bool:
    """Whether any rank received a stop signal; every rank gets the same answer (one small all-reduce)."""
    return agreed(accelerator, _requested is not None)[0]


def signal_name() -> str:
    """The received signal's name, or ``a stop signal`` when another rank got it."""
    return _requested.name if _requested is not None else "a stop signal (on another rank)"


def agreed(accelerator: Any, *flags: bool) -> list[bool]:
    """For each local flag, whether any rank set it (one all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    local = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(local, reduction="sum").cpu().tolist()]

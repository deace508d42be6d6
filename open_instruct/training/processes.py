"""Is that process alive? The questions a rank watch and an output-folder lock ask about a pid another process wrote.

A pid means something only in the pid namespace it came from, so a holder or a peer names its machine by
:func:`machine_id` (host name, kernel boot id, pid namespace): two containers with one host name, or a host rebooted
since, never mistake each other's pids.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def machine_id() -> str:
    """``host/boot-id/pid-namespace`` of this process: equal exactly where its pids mean the same processes."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:  # not Linux: the host name is all there is
            parts.append("?")
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs here (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): existing is all we can tell
        return True
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


def gone_here(machine: str | None, pid: object) -> bool:
    """Whether ``pid``, written by a process on ``machine``, is a process of this machine that no longer runs."""
    return machine == machine_id() and isinstance(pid, int) and pid > 0 and not pid_alive(pid)

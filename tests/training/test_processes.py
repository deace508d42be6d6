"""Whether a pid another process wrote is a dead process of this machine: only where the pid means the same thing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from open_instruct.training.processes import gone_here, machine_id, pid_alive


def test_a_reaped_or_zombie_process_is_gone_and_a_live_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while pid_alive(child.pid):  # a zombie (ended, not yet reaped) already counts as gone
        pass
    assert child.poll() == 0 and not pid_alive(child.pid)
    assert pid_alive(os.getpid()) and pid_alive(os.getppid())


def test_only_a_pid_of_this_machine_and_pid_namespace_is_judged() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    here = machine_id()
    assert here.startswith(socket.gethostname() + "/") and here.count("/") >= 2
    assert gone_here(here, child.pid) and not gone_here(here, os.getpid())
    other_namespace = here.rsplit("/", 1)[0] + "/pid:[1]"  # same host name and boot, another container's pids
    assert not gone_here(other_namespace, child.pid) and not gone_here(None, child.pid) and not gone_here(here, "7")

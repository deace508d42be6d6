"""The commands a run's summary offers, ready to paste: the same launch again (which resumes), the push of the output
folder to the Hub later, and the plan of the same recipe on a cluster (``--dry_run``).

The launch is rebuilt from what started this process: under ``torchrun`` / ``accelerate launch`` / ``deepspeed`` the
launcher's own command line (the parent process's), else this interpreter's ``sys.orig_argv`` (``python -m M ...``
or ``python path/to/script.py ...`` as typed), else ``python -m MODULE`` with the arguments a caller passed.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

LAUNCHERS = ("torchrun", "torch.distributed.run", "accelerate", "deepspeed")
# What --dry_run plans for when the summary suggests it: a common cluster node (the flags say how to change it).
PLAN_GPU, PLAN_PROCESSES = "H100-80GB", 8


def parent_command_line() -> list[str] | None:
    """The parent process's arguments (Linux ``/proc``), or None where they cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_launcher(command: Sequence[str]) -> bool:
    """Whether ``command`` runs one of the distributed launchers (its program or a ``-m`` module)."""
    words = [Path(word).name for word in command[:4]]
    return any(word in LAUNCHERS for word in words)


def launch_command(
    module: str,
    argv: Sequence[str] | None = None,
    orig_argv: Sequence[str] | None = None,
    parent: Sequence[str] | None = None,
) -> list[str]:
    """The command that started this run, as a list of words.

    ``argv``: the arguments a caller passed to the entry (None: it read the command line). ``orig_argv``: this
    interpreter's arguments (default ``sys.orig_argv``). ``parent``: the parent's command line (default: read it),
    used when it is a launcher's."""
    if argv is not None:
        return [sys.executable, "-m", module, *argv]
    parent = parent_command_line() if parent is None else parent
    if parent and is_launcher(parent):
        return list(parent)
    orig = list(sys.orig_argv if orig_argv is None else orig_argv)
    return orig or [sys.executable, "-m", module, *sys.argv[1:]]


def without_flag(command: Sequence[str], flag: str) -> list[str]:
    """``command`` with boolean ``--flag`` off: its words removed (with a true/false value after it), or, where it
    came from a YAML recipe, ``--flag false`` appended (a later flag wins)."""
    words, out, found = list(command), [], False
    i = 0
    while i < len(words):
        if words[i] == flag:
            found = True
            has_value = i + 1 < len(words) and words[i + 1].lower() in ("true", "false", "1", "0", "yes", "no")
            i += 2 if has_value else 1
            continue
        out.append(words[i])
        i += 1
    return out if found else [*out, flag, "false"]


def interpreter() -> str:
    """The Python the run was started with, as typed (``python``, ``.venv/bin/python``), else this one's path."""
    typed = getattr(sys, "orig_argv", None)
    return typed[0] if typed else sys.executable


def plan_command(module: str, arguments: Sequence[str]) -> list[str]:
    """The same recipe planned for a cluster: ``--dry_run`` on :data:`PLAN_PROCESSES` x :data:`PLAN_GPU` (one
    process; the planner reads the GPU count from its flags, not from a launcher)."""
    return [
        interpreter(), "-m", module, *arguments,
        "--dry_run", "--dry_run_gpu", PLAN_GPU, "--dry_run_num_processes", str(PLAN_PROCESSES),
    ]  # fmt: skip


def push_command(output_dir: str | Path, checkpoints: bool = False) -> list[str]:
    """Push the finished output folder to the Hub later; the repo and branch default to the run's
    (``report/push_to_hub.py`` reads them from ``run_config.json``)."""
    command = [interpreter(), "-m", "open_instruct.report.push_to_hub", "--output_dir", str(output_dir)]
    return [*command, "--push_checkpoints"] if checkpoints else command


def next_commands(
    module: str,
    argv: Sequence[str] | None,
    output_dir: Path,
    early_flag: str | None,
    plannable: bool = True,
    known: bool = True,
) -> dict[str, str | None]:
    """The summary's commands: ``resume`` (the launch again; after an early end ``train``: the same without
    ``early_flag``), ``push`` (only once a final model is in ``output_dir``) and ``plan`` (None where the stage has
    no planner). ``known`` False: no command line runs the same (a Python API call whose arguments have no
    command-line spelling): the push only."""
    finished = (output_dir / "config.json").is_file()  # the final model (checkpoints: add --push_checkpoints)
    push = shlex.join(push_command(output_dir.resolve())) if finished else None
    if not known:
        return {"resume": None, "push": push, "plan": None}
    launch = launch_command(module, argv)
    arguments = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, str | None] = {}
    if early_flag is None:
        commands["resume"] = shlex.join(launch)
    else:
        commands["train"] = shlex.join(without_flag(launch, early_flag))
        arguments = without_flag(arguments, early_flag)
    commands["push"] = push
    commands["plan"] = shlex.join(plan_command(module, arguments)) if plannable else None
    return commands

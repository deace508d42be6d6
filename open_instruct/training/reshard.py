"""Resuming on another number of processes: what must match, how the accumulation steps follow, where the data resumes.

A step's data is global: micro-batch ``j`` of an epoch's seeded order goes to rank ``j % W``, and optimizer step ``k``
trains global micro-batches ``[k*G, (k+1)*G)`` with ``G = accumulation x W``. Batch composition (plain, length-grouped
or token-budget order, packed or padded) depends on the seed and the per-device batch size, never on ``W``. So a run
with the same per-device batch size and the same ``G`` trains the same pairs in each step on any number of processes:
the checkpoint's position is converted to global micro-batches and back, and world size and accumulation steps are
compared only through the global batch. Per-device batch size must match: it fixes which pairs form a micro-batch.
"""

from __future__ import annotations

from typing import Any

from open_instruct.errors import UserError

# Signature entries that may differ between a run and its resume as long as their product (the global batch) does not.
_PER_RANK = ("world_size", "gradient_accumulation_steps")


def global_micro_batches(signature: dict[str, Any]) -> int | None:
    """Micro-batches per optimizer step over all ranks (accumulation x processes), None if the signature lacks them."""
    if any(signature.get(key) is None for key in _PER_RANK):
        return None
    return int(signature["world_size"]) * int(signature["gradient_accumulation_steps"])


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Signature entries that differ (checkpoint's value, this run's), world size and accumulation steps counting only
    through the global batch they make."""
    changed = {key: (saved.get(key), value) for key, value in now.items() if saved.get(key) != value}
    per_device_same = saved.get("per_device_train_batch_size") == now.get("per_device_train_batch_size")
    if per_device_same and global_micro_batches(saved) == global_micro_batches(now) is not None:
        for key in _PER_RANK:
            changed.pop(key, None)
    return changed


def accumulation_for(saved: dict[str, Any], per_device: int, world_size: int) -> int | None:
    """The accumulation steps that keep the checkpoint's global batch on ``world_size`` processes, None if none does
    (a different per-device batch size, or a global batch the process count does not divide)."""
    total = global_micro_batches(saved)
    if total is None or saved.get("per_device_train_batch_size") != per_device or total % world_size:
        return None
    return total // world_size


def _working_values(saved: dict[str, Any]) -> str:
    """Process counts and their accumulation steps that keep the checkpoint's global batch."""
    total = global_micro_batches(saved) or 1
    pairs = [f"{_processes(w)} x {total // w} accumulation" for w in range(1, total + 1) if total % w == 0]
    return ", ".join(pairs)


def kept_accumulation(
    saved: dict[str, Any] | None, per_device: int, accumulation: int, world_size: int, output_dir: str
) -> tuple[int, str | None]:
    """The accumulation steps that keep the checkpoint's global batch on ``world_size`` processes (``saved``: its run
    signature, None for a fresh run) and the note saying so (None: ``accumulation`` stays); raises
    :class:`UserError` when no accumulation steps can."""
    if not saved or saved.get("world_size") in (None, world_size):
        return accumulation, None
    now = {"world_size": world_size, "per_device_train_batch_size": per_device}
    if not changed_settings(saved, {**now, "gradient_accumulation_steps": accumulation}):
        return accumulation, None
    steps = accumulation_for(saved, per_device, world_size)
    batch = saved["per_device_train_batch_size"] * global_micro_batches(saved)
    if steps is None:
        raise UserError(
            f"cannot resume the checkpoint in {output_dir} on {_processes(world_size)} with "
            f"--per_device_train_batch_size {per_device}: its global batch is {batch} "
            f"({saved['per_device_train_batch_size']} per device x {saved['gradient_accumulation_steps']} accumulation "
            f"x {saved['world_size']} processes); use --per_device_train_batch_size "
            f"{saved['per_device_train_batch_size']} with {_working_values(saved)}, or a new --output_dir"
        )
    note = (
        f"note: --gradient_accumulation_steps {steps} (not {accumulation}): keeps the checkpoint's global batch of "
        f"{batch} on {_processes(world_size)} (it was written by {_processes(saved['world_size'])})"
    )
    return steps, note


def resumed_position(batches_in_epoch: int, saved_world: int, world_size: int) -> int:
    """This rank's micro-batches into the epoch on ``world_size`` processes for a checkpoint written by
    ``saved_world`` processes ``batches_in_epoch`` micro-batches into it (each rank's count)."""
    done = batches_in_epoch * saved_world  # global micro-batches trained: the same pairs on any world size
    if done % world_size:
        raise UserError(
            f"cannot resume on {world_size} processes: the checkpoint is {done} micro-batches into its epoch, "
            f"not a multiple of {world_size}; resume on {saved_world} processes"
        )
    return done // world_size


def resume_note(saved_world: int, world_size: int, conversion: str | None) -> str | None:
    """The one line a resume on another world size prints (None on the same one)."""
    if saved_world == world_size:
        return None
    how = conversion or "no conversion needed"
    return f"note: checkpoint written by {_processes(saved_world)}, resuming on {world_size}: {how}"


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def rescale_schedules(accelerator: Any, saved_world: int, world_size: int) -> None:
    """Move each restored learning-rate schedule to this world size: accelerate steps a schedule once per process per
    optimizer step (``training/schedule.py``), so its counter is the optimizer step times the process count."""
    if saved_world == world_size:
        return
    for wrapper in accelerator._schedulers:
        schedule = getattr(wrapper, "scheduler", wrapper)
        schedule.last_epoch = schedule.last_epoch * world_size // saved_world
        lambdas = getattr(schedule, "lr_lambdas", None)
        if lambdas is None:
            continue
        for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, lambdas):
            group["lr"] = base * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]


def reshard_resumed(accelerator: Any, state: Any, conversion: str | None) -> None:
    """After a checkpoint's state is loaded on another world size: the data position and the schedules follow, and one
    note says so (``state``: the checkpoint's ``TrainerState``; ``conversion``: what the engine did to its files)."""
    saved_world = int(state.signature.get("world_size", accelerator.num_processes))
    world_size = accelerator.num_processes
    if saved_world == world_size:
        return
    state.batches_in_epoch = resumed_position(state.batches_in_epoch, saved_world, world_size)
    rescale_schedules(accelerator, saved_world, world_size)
    parts = [conversion or "the engine's files load on any number of processes, no conversion"]
    if world_size > saved_world:
        # Exact dropout streams across a world-size change are not possible anyway: ranks without a file of their own
        # keep the streams the seed gave them, the same start every rank of a fresh run has.
        one = world_size == saved_world + 1
        ranks = f"rank {saved_world} has" if one else f"ranks {saved_world}-{world_size - 1} have"
        parts.append(
            f"{ranks} no RNG state of its own and keeps the seeded streams"
            if one
            else f"{ranks} no RNG state of their own and keep the seeded streams"
        )
    accelerator.print(resume_note(saved_world, world_size, "; ".join(parts)))

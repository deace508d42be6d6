"""Room on disk for checkpoints and the reference cache.

Checkpoints: their size (the previous complete one's, or an estimate from the engine's state
layout for the first), one line at the start of a run whose disk cannot hold a checkpoint and the final model, and
the check before each save, agreed by every rank, so a save that cannot fit is never started.

Pruning removes old checkpoints only once a new one is complete, so a save needs room for one more checkpoint on top
of what is there. The line at the start is a warning, not an error: the first figure is an estimate, free space on a
shared file system moves during a long run (other jobs write and clean up), and the check before each save stops
the run cleanly, before any write, with every earlier checkpoint intact.

The reference cache: its size is known exactly from the row count; the pass is refused before it starts when its
shards and the finished file cannot fit, and a failed final write keeps the shards so the rerun continues from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from open_instruct.disk_space import failure_reason, free_bytes, human, tree_bytes
from open_instruct.engine import whole_numel
from open_instruct.errors import UserError
from open_instruct.integrity import recorded_bytes
from open_instruct.training.preemption import agreed

# Beside the tensors: the trainer state, the RNG files, the scheduler and sampler, DeepSpeed's metadata.
CHECKPOINT_OVERHEAD = 256 << 10


def estimate_checkpoint_bytes(layout: Any, parameters: int, trainable: int) -> int:
    """Bytes of one checkpoint summed over all ranks: the weights in the engine's working precision, and the optimizer
    state (AdamW's two moments, and the fp32 master copy when the engine steps one; every shard together)."""
    optimizer = (12 if layout.master_copy else 8) * trainable
    return int(layout.working_bytes * parameters + optimizer + CHECKPOINT_OVERHEAD)


def estimate_final_model_bytes(layout: Any, parameters: int) -> int:
    """Bytes of the final model: the weights in the engine's working precision (the tokenizer is small)."""
    return int(layout.working_bytes * parameters + CHECKPOINT_OVERHEAD)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(all parameters, trainable ones) of ``model``, whole sizes also where an engine partitions them."""
    total = trainable = 0
    for param in model.parameters():
        count = whole_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return total, trainable


def checkpoint_bytes_needed(previous: Path | None, estimate: int | None) -> tuple[int | None, str]:
    """(bytes the next checkpoint needs, where the figure comes from): the size of ``previous`` (the newest complete
    checkpoint) as its manifest recorded it, else as found on disk, else ``estimate`` (None: nothing known)."""
    if previous is not None:
        written = recorded_bytes(previous)
        return (tree_bytes(previous) if written is None else written), f"the size of {previous.name}"
    return estimate, "estimated from the parameter count and optimizer"


def check_room_before_save(accelerator: Any, path: Path, previous: Path | None, estimate: int | None) -> int | None:
    """Stop the run before writing checkpoint ``path`` when its file system cannot hold one more checkpoint (the size
    of ``previous``, the newest complete one, else ``estimate``); returns the bytes it needs (None: unknown). Every
    rank checks the file system it writes to, and all agree."""
    needed, source = checkpoint_bytes_needed(previous, estimate)
    free = free_bytes(path.parent)
    short = bool(needed) and free < needed
    if not agreed(accelerator, short)[0]:
        return needed
    kept = f"a rerun resumes from {previous}" if previous else "there is no earlier checkpoint"
    where = f"{human(free)} are free there" if short else "another process's disk has less free"
    raise UserError(
        f"not enough free space to write checkpoint {path}: it needs about {human(needed)}, {source}, and {where}; "
        f"nothing was written, {kept}: free space (or point --output_dir elsewhere) and rerun the same command"
    )


def report_room_at_start(
    accelerator: Any, faults: Any | None, layout: Any, model: Any, output_dir: str | Path, previous: Path | None
) -> tuple[int, int]:
    """Give the checkpoint policies their size estimate and print one warning when ``output_dir``'s file system
    cannot hold one more checkpoint (the size of ``previous``, the newest complete one, else the estimate) and the
    final model. Returns (checkpoint, final model) estimates in bytes."""
    parameters, trainable = parameter_counts(model)
    checkpoint = estimate_checkpoint_bytes(layout, parameters, trainable)
    final = estimate_final_model_bytes(layout, parameters)
    for policy in (getattr(faults, "policy", None), getattr(faults, "preemption", None)):
        if policy is not None:
            policy.estimated_bytes = checkpoint
    needed, source = checkpoint_bytes_needed(previous, checkpoint)
    needed = (needed or 0) if getattr(faults, "policy", None) is not None else 0  # no schedule: no checkpoint due
    free = free_bytes(output_dir)
    if accelerator.is_main_process and free < needed + final:
        what = f"one more checkpoint ({human(needed)}: {source}) and " if needed else ""
        accelerator.print(
            f"warning: {output_dir} has {human(free)} free, less than {what}the final model ({human(final)}); "
            "the run checks again before each save and stops before writing one that cannot fit"
        )
    return checkpoint, final


def reference_bytes(rows: int, columns: int = 6, shards: int = 66) -> int:
    """Bytes the reference pass writes at its peak: its shards (an int64 index and ``columns`` float32 values per row)
    and the finished table beside them, each file rounded up to 4 KiB blocks."""
    return 2 * rows * (8 + 4 * columns) + shards * 4096


def check_room_for_reference(accelerator: Any, path: Path, rows: int) -> None:
    """Refuse the reference pass before it starts when the main process's cache folder cannot hold its writes."""
    needed = reference_bytes(rows) - tree_bytes(path.with_suffix(".parts"))  # shards already there are paid for
    free = free_bytes(path.parent) if accelerator.is_main_process else needed
    if agreed(accelerator, free < needed)[0]:
        where = f"{human(free)} are free there" if free < needed else "the main process has less free"
        raise UserError(
            f"not enough free space for the reference cache {path}: it needs about {human(needed)} and {where}; "
            "free space (or set --reference_logprobs_cache_path elsewhere) and rerun the same command"
        )


def reference_written(accelerator: Any, path: Path, rows: int, error: OSError | None) -> None:
    """Agree across ranks whether the main process wrote the reference cache; if not, raise on every rank the same
    line naming the file and the bytes it needs (the shards of the pass stay, so the rerun continues from them)."""
    if not agreed(accelerator, error is not None)[0]:
        return
    reason = failure_reason(error, path.parent, 4 * 6 * rows + 4096) if error else "write failed"  # the table
    raise UserError(
        f"cannot write the reference cache {path}: {reason}; the pass's shards are kept in "
        f"{path.with_suffix('.parts')}: free space and rerun the same command (it continues from them)"
    )


def final_model_written(accelerator: Any, output_dir: Path, error: OSError | None, needed: int) -> None:
    """Agree across ranks whether the main process wrote the final model; if not (its temporary folder is already
    gone), raise on every rank one line naming the folder and the bytes."""
    if not agreed(accelerator, error is not None)[0]:
        return
    raise UserError(
        f"could not write the final model to {output_dir}: {failure_reason(error, output_dir, needed)}; the "
        "checkpoints there are intact: free space and rerun the same command (it resumes from the newest)"
    )

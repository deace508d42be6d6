"""Deciding how a run starts: fresh, or exactly where a checkpoint left off (the recipe calls this once).

Test hooks, read here and nowhere else: ``OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY=STEP:SECONDS`` (wait that long between
writing checkpoint ``step_STEP``'s files and its ``COMPLETED`` marker, so a test can kill the process mid-checkpoint) and
``OPEN_INSTRUCT_TEST_NAN_AT_STEP`` (see :mod:`open_instruct.training.nonfinite`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from open_instruct.report.tracking import MetricsLogger
from open_instruct.settings import BatchSettings, CheckpointSettings, OptimSettings
from open_instruct.training.checkpointing import TRAINER_STATE, CheckpointPolicy, load_checkpoint, resolve_resume
from open_instruct.training.loop import FaultTolerance
from open_instruct.training.nonfinite import NonFiniteGuard, injected_nan_step

DELAY_ENV = "OPEN_INSTRUCT_TEST_CHECKPOINT_DELAY"


def _test_write_delay() -> tuple[int, float] | None:
    value = os.environ.get(DELAY_ENV, "").strip()
    if not value:
        return None
    step, seconds = value.split(":")
    return int(step), float(seconds)


def run_signature(
    batch: BatchSettings, optim: OptimSettings, num_pairs: int, data_hash: str, total_steps: int, world_size: int
) -> dict:
    """What must not change between a run and its resume for the continuation to be exact (world size and
    accumulation steps only through the global batch they make: ``training/reshard.py``)."""
    # Checkpoints store this dict and compare it on resume: its keys and values must not change.
    return {
        "data": data_hash,
        "num_pairs": num_pairs,
        "seed": batch.seed,
        **({"data_loader_seed": batch.data_loader_seed} if batch.data_loader_seed is not None else {}),
        "world_size": world_size,
        "per_device_train_batch_size": batch.per_device_train_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "total_optimizer_steps": total_steps,
        "learning_rate": optim.learning_rate,
        "lr_scheduler_type": optim.lr_scheduler_type,
        "warmup_ratio": optim.warmup_ratio,
        "warmup_steps": optim.warmup_steps,
        "packing": batch.packing,
        "max_tokens_per_batch": batch.max_tokens_per_batch,
        "group_by_length": batch.group_by_length,
    }


def resumed_signature(checkpoint: CheckpointSettings) -> dict[str, Any] | None:
    """The run signature of the checkpoint this run will resume from, if any (read before the model is prepared,
    so settings left at their defaults can follow it)."""
    path, _ = resolve_resume(Path(checkpoint.output_dir), checkpoint.resume_from_checkpoint)
    if path is None or not (path / TRAINER_STATE).is_file():
        return None
    return json.loads((path / TRAINER_STATE).read_text()).get("signature")


def start_or_resume(
    checkpoint: CheckpointSettings, accelerator: Any, signature: dict[str, Any], logger: MetricsLogger
) -> FaultTolerance:
    """Checkpoint policy, guard, and (when a checkpoint applies) the restored state: weights, optimizer, schedule,
    sampler, RNG and counters. Call after the reference pass, which must see the untouched weights."""
    # accelerate is slow to import: --help, validation and the planner never need it
    from accelerate.utils import set_seed

    # Training's random streams (dropout) must not depend on whether the reference pass ran or came from the cache:
    # its data iterator draws from the global generator. A resume then restores the checkpoint's streams.
    set_seed(checkpoint.seed)
    output_dir = Path(checkpoint.output_dir)
    policy = None
    if checkpoint.checkpointing_steps:
        policy = CheckpointPolicy.from_flag(
            output_dir, checkpoint.checkpointing_steps, checkpoint.keep_last_n_checkpoints, _test_write_delay()
        )
    guard = NonFiniteGuard(checkpoint.skip_nonfinite_batches, injected_nan_step())
    faults = FaultTolerance(policy=policy, signature=signature, guard=guard)
    # A stop signal saves a checkpoint like a scheduled one (same folder, pruning), with or without a schedule.
    faults.preemption = policy or CheckpointPolicy(output_dir, keep_last_n=checkpoint.keep_last_n_checkpoints)
    path, notes = resolve_resume(output_dir, checkpoint.resume_from_checkpoint)
    if notes:
        accelerator.print(notes)
    if path is None:
        logger.truncate_after(0)  # a fresh start: an earlier attempt's rows would duplicate steps
        return faults
    faults.resume_state, faults.resume_rng = load_checkpoint(accelerator, path, signature)
    # Rows logged after this checkpoint (before the kill) are logged again by the resumed run: drop them.
    logger.truncate_after(faults.resume_state.step)
    accelerator.print(
        f"resumed at optimizer step {faults.resume_state.step} (epoch {faults.resume_state.epoch}, "
        f"{faults.resume_state.batches_in_epoch} micro-batches into it)"
    )
    return faults

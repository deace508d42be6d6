"""How many optimizer steps a run takes, and its learning-rate schedule: read by the recipe and by the planner."""

from __future__ import annotations

import math
from typing import Any

from open_instruct.settings import OptimSettings


def optimizer_steps(
    num_batches: int, world_size: int, gradient_accumulation_steps: int, num_epochs: int, max_train_steps: int | None
) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this many micro-batches on this many ranks."""
    batches_per_rank = math.ceil(num_batches / world_size)
    per_epoch = max(1, math.ceil(batches_per_rank / gradient_accumulation_steps))
    return per_epoch, max_train_steps or per_epoch * num_epochs


def build_scheduler(optim: OptimSettings, optimizer: Any, total_steps: int, num_processes: int) -> Any:
    """The learning-rate schedule: warmup (``--warmup_steps``, else ``--warmup_ratio``), then ``--lr_scheduler_type``."""
    from transformers import get_scheduler  # transformers' import is slow: the planner never needs it

    warmup_steps = (
        optim.warmup_steps if optim.warmup_steps is not None else math.ceil(optim.warmup_ratio * total_steps)
    )
    schedule = "constant_with_warmup" if optim.lr_scheduler_type == "constant" else optim.lr_scheduler_type
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    return get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )

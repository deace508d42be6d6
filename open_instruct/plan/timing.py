"""Predicted time from FLOPs at a stated model FLOPs utilisation (MFU).

FLOPs follow the MFU convention of ``training/perf.py`` (PaLM): ``6 N`` per trained token through the ``N`` matmul
parameters plus ``12 d h L`` for attention over a sequence of length ``L``; the reference pass is a forward only
(a third of that); gradient checkpointing runs each forward twice (``8 N`` per token of hardware work instead of
``6 N``). Time = hardware FLOPs / (GPUs x peak x MFU). Sequences are taken at ``--max_seq_length`` (an upper bound:
real pairs are shorter).
"""

from __future__ import annotations

from dataclasses import dataclass

from open_instruct.plan.model_config import ModelShape

# MFU assumed when none was measured on the GPU asked for (BENCHMARKS.md's GPU suite fills measured ones in).
DEFAULT_MFU = 0.35
MEASURED_MFU: dict[str, float] = {}


def matmul_parameters(shape: ModelShape) -> int:
    """All parameters but the input embedding (whose lookup is free); a tied head still multiplies."""
    embedding = shape.vocab * shape.hidden
    return shape.parameters() - embedding + (embedding if shape.tied else 0)


@dataclass(frozen=True)
class TimePlan:
    mfu: float
    mfu_source: str
    step_flops: float  # model FLOPs of one optimizer step, all GPUs
    step_seconds: float
    reference_seconds: float
    total_seconds: float | None  # None: the number of steps is unknown


def time_plan(
    shape: ModelShape,
    sequences_per_step: int,
    sequence_tokens: int,
    checkpointing: bool,
    gpus: int,
    peak_flops: float,
    mfu: float,
    mfu_source: str,
    steps: int | None,
    reference_sequences: int,
) -> TimePlan:
    """Step and total time of ``steps`` optimizer steps of ``sequences_per_step`` sequences, plus the reference pass
    over ``reference_sequences`` sequences (0: cached or not needed)."""
    n = matmul_parameters(shape)
    per_sequence = 6 * n * sequence_tokens + 12 * shape.layers * shape.hidden * sequence_tokens**2
    step_flops = per_sequence * sequences_per_step
    hardware = step_flops * (4 / 3 if checkpointing else 1.0)
    rate = gpus * peak_flops * mfu
    step_seconds = hardware / rate
    reference_seconds = per_sequence / 3 * reference_sequences / rate
    total = steps * step_seconds + reference_seconds if steps is not None else None
    return TimePlan(mfu, mfu_source, step_flops, step_seconds, reference_seconds, total)

"""``--profiling``: a torch profiler trace of a few optimizer steps, written under the output folder.

The profiler skips the first step (warm-up: allocations, compilation), records the next ``ACTIVE`` steps, and writes
one Chrome trace per rank, ``<output_dir>/profile/trace_rank<R>.json`` (open it in chrome://tracing or Perfetto), and
beside it ``top_ops_rank<R>.txt``: the operators that took the most time (by device time on CUDA, then by host time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

WAIT, WARMUP, ACTIVE = 0, 1, 3
TOP_OPS = 30


@contextmanager
def profiled_steps(accelerator: Any, output_dir: Path) -> Iterator[Callable[[int], None]]:
    """A profiler around the loop; yields the hook the loop calls after each optimizer step."""
    # only --profiling needs the profiler
    from torch.profiler import ProfilerActivity, profile, schedule

    folder = output_dir / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trace_rank{accelerator.process_index}.json"
    written: list[Path] = []
    steps = [0]

    def write(prof: Any) -> None:
        prof.export_chrome_trace(str(path))
        averages = prof.key_averages()
        sorts = (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]
        tables = [
            f"sorted by {k}\n" + averages.table(sort_by=k, row_limit=TOP_OPS, max_name_column_width=60) for k in sorts
        ]
        path.with_name(f"top_ops_rank{accelerator.process_index}.txt").write_text("\n\n".join(tables) + "\n")
        written.append(path)
        recorded = min(ACTIVE, max(0, steps[0] - WAIT - WARMUP))  # fewer when the run ended inside the window
        accelerator.print(f"profiling: trace of {recorded} optimizer steps written to {path}")

    def step_hook(step: int) -> None:
        steps[0] += 1
        prof.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(
        activities=activities,
        schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
        on_trace_ready=write,
        record_shapes=True,
    )
    with prof:
        yield step_hook
    if not written:  # the run had fewer steps than the schedule: nothing was recorded
        accelerator.print(f"profiling: the run ended before {WARMUP + ACTIVE} optimizer steps; no trace written")

"""Run the DPO entry with its training phase measured: the peak bytes of live tensor storage, per rank.

``python tests/plan_probe.py OUT_DIR FLAG...`` (or under torchrun): runs ``dpo_tune_cache.main(FLAGS)`` with
``recipe.train`` wrapped; writes ``OUT_DIR/peak_rank<R>.json`` with the bytes of tensor storage alive when training
starts (every tensor the garbage collector can reach, each storage once) plus the highest running sum of the CPU
allocator's allocations and frees during training (the profiler's memory events). Not RSS: on CPU the imports
dominate the resident set.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from open_instruct import dpo_tune_cache  # noqa: E402
from open_instruct.training import recipe  # noqa: E402


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector tracks."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_allocation_delta(prof: profile) -> int:
    """Highest running sum of the CPU allocator's memory events (allocations positive, frees negative)."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def main() -> None:
    out_dir, flags = Path(sys.argv[1]), sys.argv[2:]
    original = recipe.train
    rank = int(os.environ.get("RANK", "0"))

    def measured(*args, **kwargs):
        gc.collect()
        base = live_tensor_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = original(*args, **kwargs)
        delta = peak_allocation_delta(prof)
        (out_dir / f"peak_rank{rank}.json").write_text(json.dumps({"base": base, "delta": delta}))
        return result

    recipe.train = measured
    dpo_tune_cache.main(flags)


if __name__ == "__main__":
    main()

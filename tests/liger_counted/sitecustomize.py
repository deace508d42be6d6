"""Counts calls of Liger's fused linear cross-entropy in a training process (tests/runs/test_liger_engines.py).

Put this folder on ``PYTHONPATH`` and set ``LIGER_COUNT_DIR``: Python imports ``sitecustomize`` at start-up, which
wraps ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`` (looked up per call by
open_instruct/objectives/fused_head.py) and, at exit, writes ``rank<RANK>.json``: the number of calls and the
weight shapes the kernel saw (a partitioned weight would show as ``[0]`` or a shard).
"""

import atexit
import json
import os

if os.environ.get("LIGER_COUNT_DIR"):
    from liger_kernel.transformers import functional

    _kernel = functional.liger_fused_linear_cross_entropy
    _seen = {"calls": 0, "weight_shapes": []}

    def _counted(_input, weight, *args, **kwargs):
        _seen["calls"] += 1
        if list(weight.shape) not in _seen["weight_shapes"]:
            _seen["weight_shapes"].append(list(weight.shape))
        return _kernel(_input, weight, *args, **kwargs)

    functional.liger_fused_linear_cross_entropy = _counted

    @atexit.register
    def _write() -> None:
        if not _seen["calls"] and "RANK" not in os.environ:  # torchrun's launcher process, never a trainer
            return
        path = os.path.join(os.environ["LIGER_COUNT_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_seen, f)
        os.replace(path + ".tmp", path)

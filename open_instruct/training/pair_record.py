"""Which pairs each optimizer step trained, for tests that check a resumed run trains every pair exactly once.

Test hook, read here and nowhere else: ``OPEN_INSTRUCT_TEST_RECORD_PAIRS=FILE`` makes every rank append one JSON line
per optimizer step to ``FILE.rank<R>``: ``{"step": S, "rank": R, "pairs": [...]}``, the ``index`` of each real row
(rows repeated to even out the ranks are not real) of that rank's micro-batches of step ``S``. Unset: nothing is done.
"""

from __future__ import annotations

import json
import os
from typing import Any

RECORD_ENV = "OPEN_INSTRUCT_TEST_RECORD_PAIRS"


def record_pairs(step: int, rank: int, window: list[dict[str, Any]], rows: list[int]) -> None:
    """Append the pairs of this rank's micro-batches ``window`` (``rows``: the real rows of each) of step ``step``."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    pairs = [int(i) for batch, real in zip(window, rows) for i in batch["index"][:real].tolist()]
    with open(f"{path}.rank{rank}", "a") as out:
        out.write(json.dumps({"step": step, "rank": rank, "pairs": pairs}) + "\n")

"""Run several matrix cells in one launch (one process, or every rank of a ``torchrun``), one after the other.

    [torchrun --nproc_per_node 2] scripts/matrix/worker.py JOBS.json

JOBS.json: ``{"model", "train", "test", "jobs": [{"cell": {...}, "out": DIR}, ...]}``. Each cell is the recipe's own
``run`` on its flags (parse, validate, preflight, run: what the command line does), in a fresh accelerate state; the
process group lives across cells. A refusal (``UserError``, the CLI's ``error:`` line and exit code 2) or a crash is
written to ``DIR/status.json``; so is success. Launching once per engine saves the start-up of every cell.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_cell(cell: dict[str, str], argv: list[str]) -> dict[str, str]:
    """Run one cell; returns its status (``ok``, ``refused`` with the error line, or ``crashed`` with the trace)."""
    import open_instruct.dpo_tune_cache as entry
    import open_instruct.training.preference as step
    from open_instruct.api import fresh_accelerate_state
    from open_instruct.config import validate
    from open_instruct.config.cli import parse_args
    from open_instruct.errors import UserError
    from open_instruct.training.recipe import preflight

    # The log-prob axis: the implementation the step calls ("liger": Liger's kernel under Triton's interpreter).
    # Patched where the recipe looks it up; a run that never asks would silently ignore the axis, so that fails.
    asked = []
    step.resolve_logprob_impl = lambda *a, **k: asked.append(cell["logprobs"]) or cell["logprobs"]
    try:
        with fresh_accelerate_state():
            args = parse_args(argv)
            validate(args)
            preflight(args)
            entry.run(args)
    except UserError as err:
        return {"status": "refused", "error": f"error: {err}"}
    except Exception:  # noqa: BLE001 - a crash is a result here: the matrix reports it
        return {"status": "crashed", "error": traceback.format_exc()[-3000:]}
    if not asked:
        return {"status": "crashed", "error": "the log-prob axis was not applied: no call of resolve_logprob_impl"}
    return {"status": "ok"}


def main() -> None:
    from accelerate.state import PartialState
    from axes import flags

    spec = json.loads(Path(sys.argv[1]).read_text())
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None  # keep the group for the next cell
    rank = int(os.environ.get("RANK", "0"))
    for job in spec["jobs"]:
        out = Path(job["out"])
        argv = flags(job["cell"], spec["model"], spec["train"], spec["test"], str(out))
        status = run_cell(job["cell"], argv)
        if rank == 0 or status["status"] == "crashed":
            out.mkdir(parents=True, exist_ok=True)
            (out / f"status{'' if rank == 0 else rank}.json").write_text(json.dumps(status))
        print(f"matrix cell {out.name}: {status['status']}", flush=True)
    destroy(PartialState())


if __name__ == "__main__":
    main()

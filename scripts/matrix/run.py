"""The combination matrix: a generated covering set of option combinations, each trained a few steps of the tiny model
on 2 processes (where the engine has them) and compared with the 1-process fp32 run of the same global batch.

    python scripts/matrix/run.py --strength 2 --exclude-slow            # the pairwise set `make test` runs
    python scripts/matrix/run.py --strength 3 --table docs/combinations.md   # `make test-matrix`

A cell passes when it trains and its per-step losses and final weights are within the tolerance of its precision
(``axes.TOLERANCE``), or when it is refused with one of the documented ``error:`` lines (``axes.REFUSALS``). Cells
run grouped: one launch for the references and 1-process cells, one 2-process launch per engine. Exit code 1 if any
cell fails. ``--cells 0,4`` runs only those rows of the set, ``--only engine=fsdp2`` only the cells with those values
(a partial table says which ran); with ``--merge`` the table keeps the last table's rows of the cells not run now:

    python scripts/matrix/run.py --strength 3 --only engine=fsdp2 --table docs/combinations.md --merge
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import axes as options  # noqa: E402
import table  # noqa: E402
from covering import covering_array  # noqa: E402

Cell = dict[str, str]


def fixtures(out: Path) -> tuple[Path, Path, Path]:
    """The tiny model and the synthetic task (made once per output folder)."""
    from open_instruct.data.synthetic import write_task, write_tiny_model

    model = out / "fixture" / "model"
    if not (model / "model.safetensors").exists():
        write_tiny_model(model, seed=0)
    train, test = write_task(out / "fixture" / "data", n_train=64, n_test=16, seed=0)
    return model, train, test


def launch(jobs: list[dict], nproc: int, fixture: tuple[Path, Path, Path], out: Path, tag: str) -> float:
    """One launch running ``jobs`` in order; returns its wall time (a hang ends at the timeout, cells then fail)."""
    if not jobs:
        return 0.0
    spec = out / f"jobs-{tag}.json"
    model, train, test = fixture
    spec.write_text(json.dumps({"model": str(model), "train": str(train), "test": str(test), "jobs": jobs}))
    worker = str(HERE / "worker.py")
    command = [sys.executable, worker, str(spec)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), worker, str(spec)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TQDM_DISABLE": "1",
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_LOG_LEVEL": "error",
        "TRITON_INTERPRET": "1",  # Liger's kernel on CPU; read once, when Triton is first imported
        "REFERENCE_LOGPROBS_CACHE_PATH": str(out / f"reference-cache-{tag}"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    start = time.perf_counter()
    with open(out / f"log-{tag}.txt", "w") as log:
        try:
            subprocess.run(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120 + 60 * len(jobs)
            )
        except subprocess.TimeoutExpired:
            log.write("\nmatrix: launch timed out\n")
    return time.perf_counter() - start


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


def _eval_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["eval/loss"] for row in rows if "eval/loss" in row]


def _weights(out: Path, cell: Cell) -> dict:
    from safetensors.torch import load_file

    folder = out / "merged" if cell["weights"] == "lora" else out
    return load_file(folder / "model.safetensors")


def judge(cell: Cell, out: Path, reference: Path, initial: dict) -> dict:
    """The cell's verdict: status, largest loss difference per step, relative weight difference, and pass/fail."""
    status_file = out / "status.json"
    if not status_file.exists():
        crashed = sorted(out.glob("status*.json"))
        status = json.loads(crashed[0].read_text()) if crashed else {"status": "crashed", "error": "no result"}
    else:
        status = json.loads(status_file.read_text())
    if status["status"] == "refused":
        documented = any(pattern in status["error"] for pattern in options.REFUSALS)
        return {**status, "passed": documented}
    if status["status"] != "ok":
        return {**status, "passed": False}
    if (
        not (reference / "status.json").exists()
        or json.loads((reference / "status.json").read_text())["status"] != "ok"
    ):
        return {"status": "no reference", "passed": False}
    losses, expected = _train_losses(out), _train_losses(reference)
    if len(losses) != len(expected):
        return {"status": f"{len(losses)} steps, reference {len(expected)}", "passed": False}
    loss_diff = max(abs(a - b) for a, b in zip(losses, expected))
    got, want = _weights(out, cell), _weights(reference, cell)
    diff = math.sqrt(sum(float((got[k].double() - want[k].double()).norm() ** 2) for k in want))
    moved = math.sqrt(sum(float((want[k].double() - initial[k].double()).norm() ** 2) for k in want))
    weight_rel = diff / max(moved, 1e-30)
    tolerance = options.TOLERANCE[cell["precision"]]
    evaluated = cell["eval"] == "off" or (bool(_eval_losses(out)) and all(map(math.isfinite, _eval_losses(out))))
    passed = loss_diff <= tolerance["loss"] and weight_rel <= tolerance["weights"] and moved > 0 and evaluated
    return {"status": "ok", "steps": len(losses), "loss_diff": loss_diff, "weight_rel": weight_rel, "passed": passed}


def run_matrix(cells: list[Cell], out: Path) -> tuple[list[dict], dict[str, float]]:
    """Run ``cells`` and their references; returns one verdict per cell and the wall time of each launch."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    fixture = fixtures(out)
    references = {options.name(options.reference_of(c)): options.reference_of(c) for c in cells}
    single = [{"cell": r, "out": str(out / "ref" / n)} for n, r in references.items()]
    single += [{"cell": c, "out": str(out / "cell" / options.name(c))} for c in cells if options.processes(c) == 1]
    times = {"single": launch(single, 1, fixture, out, "single")}
    for engine in options.ENGINES:
        jobs = [{"cell": c, "out": str(out / "cell" / options.name(c))} for c in cells if c["engine"] == engine]
        if jobs and options.processes(jobs[0]["cell"]) > 1:
            times[engine] = launch(jobs, options.processes(jobs[0]["cell"]), fixture, out, engine)
    initial = load_file(fixture[0] / "model.safetensors")
    verdicts = [
        judge(c, out / "cell" / options.name(c), out / "ref" / options.name(options.reference_of(c)), initial)
        for c in cells
    ]
    return verdicts, times


def only(spec: str | None) -> dict[str, set[str]]:
    """``--only engine=fsdp2,loss=dpo``: per axis, the values a cell may have (an axis named twice: either value)."""
    wanted: dict[str, set[str]] = {}
    for item in (spec or "").split(","):
        if not item:
            continue
        axis, _, value = item.partition("=")
        if axis not in options.AXES or value not in options.AXES[axis]:
            known = "; ".join(f"{a}: {', '.join(v)}" for a, v in options.AXES.items())
            raise ValueError(f"--only {item!r} is not an axis=value of the matrix ({known})")
        wanted.setdefault(axis, set()).add(value)
    return wanted


def write_table(
    ns: argparse.Namespace, argv: list[str] | None, cells: list[Cell], chosen: list[Cell], verdicts: list, times: dict
) -> None:
    """The run's table at ``--table``: this run's rows alone, or (``--merge``) over the rows of the last table."""
    command = "python scripts/matrix/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    engines = len(options.axes(ns.exclude_slow)["engine"])
    ran = f"{len(chosen)} of the {len(cells)} cells of the {ns.strength}-wise set over {engines} engines"
    ran += "".join(f": {flag} {value}" for flag, value in (("rows", ns.cells), ("only", ns.only)) if value)
    this_run = f"`{command}` ({ran}); launches took " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    # Launch times mean little on a shared machine: say how busy it was.
    this_run += f" (load average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores)"
    path = Path(ns.table)
    if ns.merge:
        runs, rows = table.merge(cells, table.rows_of(chosen, verdicts, 0), path, this_run)
    else:
        runs, rows = [this_run], table.rows_of(chosen, verdicts, 1)
    path.write_text(table.render(cells, rows, runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strength", type=int, default=2, help="2: pairwise, 3: 3-wise covering set")
    parser.add_argument("--exclude-slow", action="store_true", help=f"leave out {', '.join(options.SLOW_ENGINES)}")
    parser.add_argument("--out", default="output/matrix", help="folder for the runs")
    parser.add_argument("--cells", default=None, help="comma-separated row numbers to run (default: all)")
    parser.add_argument("--only", default=None, help="run only cells with these values, e.g. engine=fsdp2,loss=dpo")
    parser.add_argument("--table", default=None, help="write the markdown table here")
    parser.add_argument(
        "--merge", action="store_true", help="keep the --table's rows of the cells not run now (same cell values)"
    )
    ns = parser.parse_args(argv)
    try:
        wanted = only(ns.only)
    except ValueError as err:
        parser.error(str(err))
    cells = covering_array(options.axes(ns.exclude_slow), ns.strength)
    picked = list(range(len(cells))) if ns.cells is None else [int(i) for i in ns.cells.split(",")]
    picked = [i for i in picked if all(cells[i][axis] in values for axis, values in wanted.items())]
    chosen = [cells[i] for i in picked]
    if not chosen:
        parser.error(f"no cell of the {len(cells)} in the {ns.strength}-wise set matches --cells / --only")
    verdicts, times = run_matrix(chosen, Path(ns.out))
    for i, cell, verdict in zip(picked, chosen, verdicts):
        print(f"cell {i} {options.name(cell)}: {json.dumps(verdict)}")
    if ns.table:
        write_table(ns, argv, cells, chosen, verdicts, times)
    failed = [i for i, v in zip(picked, verdicts) if not v["passed"]]
    print(
        f"matrix: {len(chosen) - len(failed)} of {len(chosen)} cells pass" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

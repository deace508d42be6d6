"""The matrix's markdown table (docs/combinations.md): written from a run's verdicts, or a partial run (``--only``)
merged into the last table, each row saying which run made it.

A row is known by its cell (the values of every axis), not by its number: a set regenerated with a new axis value
keeps the cells it shares with the last one, and only those rows are kept from the last table.
"""

from __future__ import annotations

import re
from pathlib import Path

import axes as options

Cell = dict[str, str]
_OLD_PROVENANCE = re.compile(r"^Made by (.*?)\. Each cell trains")  # the table before it had a `run` column
_RUN = re.compile(r"^(\d+)\. (.*)$")
_REFUSAL = re.compile(r"^- cell (\d+): `(.*)`$")


# Why the Liger cells of the first runs under sharding engines equal the chunked path (kept while those rows stand).
_LIGER_NOTE = (
    "Liger cells (`logprobs` liger) of runs 1 to 3 under zero3, zero3_offload, fsdp2 and fsdp2_offload "
    "were recorded when Liger's fused kernel fell back to the chunked path on a partitioned output layer "
    "(hence their fp32 differences of 0 under FSDP2). The kernel now runs on every engine, as the output "
    "layer's own forward, where ZeRO-3 gathers and FSDP2 unshards the layer "
    "(`open_instruct/objectives/fused_head.py`); `tests/runs/test_liger_engines.py` checks ZeRO-3 and "
    "FSDP2 against the 1-process chunked run."
)


def _explanation() -> str:
    return (
        "Each cell trains the tiny model a few steps (16 pairs, 2 per device) on 2 processes where its engine has "
        "them and is compared with the 1-process fp32 run of the same global batch: `loss diff` is the largest "
        "per-step difference of the training loss, `weights` is ||w - w_ref|| / ||w_ref - w_initial|| of the final "
        "(LoRA: merged) weights. Tolerance per precision: "
        + "; ".join(f"{p} loss {t['loss']:g}, weights {t['weights']:g}" for p, t in options.TOLERANCE.items())
        + ".\n\n"
        + _LIGER_NOTE
    )


def rows_of(cells: list[Cell], verdicts: list[dict], run: int) -> dict[str, dict]:
    """Table rows (by cell name) of a run's verdicts."""
    rows = {}
    for cell, verdict in zip(cells, verdicts):
        rows[options.name(cell)] = {
            "result": ("pass" if verdict["passed"] else "FAIL") + f" ({verdict['status']})",
            "loss": f"{verdict['loss_diff']:.1e}" if "loss_diff" in verdict else "",
            "weights": f"{verdict['weight_rel']:.1e}" if "weight_rel" in verdict else "",
            "run": str(run),
            "error": verdict.get("error", "") if verdict["status"] == "refused" else "",
        }
    return rows


def read(path: Path) -> tuple[list[str], dict[str, dict]]:
    """The runs (provenance lines) and rows (by cell name) of a table this module wrote."""
    runs: list[str] = []
    rows: dict[str, dict] = {}
    by_number: dict[int, str] = {}
    columns: list[str] = []
    for line in path.read_text().splitlines():
        if old := _OLD_PROVENANCE.match(line):
            runs.append(old.group(1))
        elif (run := _RUN.match(line)) and not columns:
            runs.append(run.group(2))
        elif line.startswith("| # |"):
            columns = [c.strip() for c in line.strip("|").split("|")]
        elif columns and re.match(r"^\| \d+ \|", line):
            # By position: the axis `weights` (full, LoRA) and the column `weights` (their difference) share a name.
            fields = [c.strip() for c in line.strip("|").split("|")]
            axes_end = 1 + len(options.AXES)
            cell = dict(zip(options.AXES, fields[1:axes_end]))
            values = dict(zip(columns[axes_end:], fields[axes_end:]))
            name = options.name(cell)
            rows[name] = {
                "result": values["result"],
                "loss": values["loss diff"],
                "weights": values["weights"],
                "run": values.get("run", "1"),
                "error": "",
            }
            by_number[int(fields[0])] = name
        elif refusal := _REFUSAL.match(line):
            rows[by_number[int(refusal.group(1))]]["error"] = refusal.group(2)
    return runs, rows


def merge(cells: list[Cell], new: dict[str, dict], path: Path, this_run: str) -> tuple[list[str], dict[str, dict]]:
    """The last table at ``path`` with ``new`` rows over it: its rows of cells in ``cells`` that did not run now are
    kept (their run numbers too); rows of cells no longer in the set are dropped, and this run's line says so."""
    runs, old = read(path) if path.exists() else ([], {})
    names = {options.name(c) for c in cells}
    kept = {n: row for n, row in old.items() if n in names and n not in new}
    dropped = sum(1 for n in old if n not in names)
    number = str(len(runs) + 1)
    this_run += f"; the other rows are kept from the run named in their `run` column ({len(kept)} rows"
    this_run += f", {dropped} rows of cells no longer in the set dropped)" if dropped else ")"
    return [*runs, this_run], {**kept, **{n: {**row, "run": number} for n, row in new.items()}}


def render(cells: list[Cell], rows: dict[str, dict], runs: list[str]) -> str:
    """The markdown table of ``cells`` (those without a row say `not run`)."""
    lines = ["# Combination matrix", "", _explanation(), "", "Runs (the `run` column says which made each row):", ""]
    lines += [f"{i}. {run}" for i, run in enumerate(runs, 1)]
    lines += ["", "| # | " + " | ".join(options.AXES) + " | result | loss diff | weights | run |"]
    lines.append("|" + "---|" * (len(options.AXES) + 5))
    empty = {"result": "not run", "loss": "", "weights": "", "run": "", "error": ""}
    refusals = []
    for i, cell in enumerate(cells):
        row = rows.get(options.name(cell), empty)
        lines.append(
            f"| {i} | "
            + " | ".join(cell[a] for a in options.AXES)
            + f" | {row['result']} | {row['loss']} | {row['weights']} | {row['run']} |"
        )
        if row["error"]:
            refusals.append(f"- cell {i}: `{row['error']}`")
    if refusals:
        lines += ["", "Refused combinations (documented in docs/engines.md):", "", *refusals]
    return "\n".join(lines) + "\n"

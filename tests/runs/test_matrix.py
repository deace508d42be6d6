"""The combination matrix (issue 15): the covering-array generator, and the pairwise set of option combinations,
each cell trained on 2 processes where its engine has them and compared with one fp32 process (scripts/matrix/)."""

from __future__ import annotations

import sys
from itertools import combinations, product

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "matrix"))

import axes as options  # noqa: E402
from covering import covering_array  # noqa: E402


def _all_covered(rows: list[dict], axes: dict[str, list[str]], strength: int) -> bool:
    """Brute force: every value combination of every ``strength`` axes is in some row."""
    for group in combinations(axes, strength):
        seen = {tuple(row[a] for a in group) for row in rows}
        if any(values not in seen for values in product(*(axes[a] for a in group))):
            return False
    return True


@pytest.mark.parametrize("strength", [2, 3])
def test_covering_array_covers_every_combination_deterministically(strength):
    axes = options.axes(exclude_slow=False)
    rows = covering_array(axes, strength)
    assert _all_covered(rows, axes, strength)
    assert rows == covering_array(axes, strength)  # no randomness: the same set on every machine
    assert all(set(row) == set(axes) and all(row[a] in axes[a] for a in axes) for row in rows)
    full = 1
    for values in axes.values():
        full *= len(values)
    largest = sorted(len(v) for v in axes.values())[-strength:]
    lower = 1
    for n in largest:
        lower *= n
    assert lower <= len(rows) < full / 20  # far fewer than the product (2592 cells), never below the bound
    assert not _all_covered(rows[:-1], axes, strength)  # the last row is needed: greedy adds none it does not use


def test_pairwise_set_leaves_out_the_slow_engines():
    rows = covering_array(options.axes(exclude_slow=True), 2)
    assert {row["engine"] for row in rows} == set(options.ENGINES) - set(options.SLOW_ENGINES)


@pytest.mark.slow
def test_pairwise_matrix(tmp_path):
    """Every cell of the pairwise set trains within tolerance of its 1-process fp32 reference, or is refused with a
    documented `error:` line (the cells' verdicts are printed on failure)."""
    from run import main

    assert main(["--strength", "2", "--exclude-slow", "--out", str(tmp_path)]) == 0
    # Every run starts with one line naming its engine and layout (issue 21), on every engine of the set.
    lines = {
        "single": "engine: single process, fp32, no offload",
        "ddp": "engine: data parallel (DDP), 2 processes, ",
        "zero2": "engine: deepspeed zero-2, 2 processes, ",
        "zero3": "engine: deepspeed zero-3, 2 processes, ",
        "fsdp2": "engine: fsdp2, 2 shards x 1 replica, per decoder layer, ",
    }
    assert set(lines) == set(options.axes(exclude_slow=True)["engine"])
    for engine, line in lines.items():
        assert line in (tmp_path / f"log-{engine}.txt").read_text(), engine


def _verdicts(cells: list[dict], loss: float) -> list[dict]:
    return [{"status": "ok", "passed": True, "loss_diff": loss, "weight_rel": 2 * loss} for _ in cells]


def test_merged_table_keeps_the_rows_of_unchanged_cells_and_says_which_run_made_each(tmp_path, monkeypatch):
    """A partial run (`--only engine=fsdp2 --merge`) over the last table: the rows of cells still in the set are kept
    with their run, the new engine's rows are this run's, a cell no longer in the set is dropped and counted."""
    import table

    old_axes = {**options.AXES, "engine": [e for e in options.AXES["engine"] if e != "fsdp2"]}
    monkeypatch.setattr(options, "AXES", old_axes)
    old_cells = covering_array(old_axes, 2)
    gone = {**old_cells[0], "loss": "no_such_loss"}  # a row of the last table whose cell left the set
    last = table.rows_of([*old_cells, gone], _verdicts([*old_cells, gone], 1e-7), 1)
    path = tmp_path / "combinations.md"
    path.write_text(table.render([*old_cells, gone], last, ["`old command` (every cell)"]))
    monkeypatch.setattr(options, "AXES", {**old_axes, "engine": [*old_axes["engine"], "fsdp2"]})
    cells = covering_array(options.AXES, 2)
    new = [c for c in cells if c["engine"] == "fsdp2"]
    assert new and len(cells) == len(old_cells) + len(new)  # the new engine only adds rows
    runs, rows = table.merge(cells, table.rows_of(new, _verdicts(new, 3e-5), 0), path, "`new command`")
    assert runs[0] == "`old command` (every cell)" and runs[1].startswith("`new command`")
    assert f"({len(old_cells)} rows, 1 rows of cells no longer in the set dropped)" in runs[1]
    text = table.render(cells, rows, runs)
    path.write_text(text)
    _, again = table.read(path)
    assert set(again) == {options.name(c) for c in cells}
    for cell in cells:
        row = again[options.name(cell)]
        expected = ("2", "3.0e-05", "6.0e-05") if cell["engine"] == "fsdp2" else ("1", "1.0e-07", "2.0e-07")
        assert (row["run"], row["loss"], row["weights"], row["result"]) == (*expected, "pass (ok)")


def test_table_of_the_earlier_format_reads_as_one_run(tmp_path):
    """The table made before the `run` column existed (docs/combinations.md of the 5-engine run) merges too."""
    import table

    cell = covering_array(options.AXES, 2)[1]
    path = tmp_path / "combinations.md"
    path.write_text(
        "# Combination matrix\n\nMade by `python scripts/matrix/run.py --strength 3` (1 of the 1 cells); launches "
        "took single 3s. Each cell trains the tiny model.\n\n| # | "
        + " | ".join(options.AXES)
        + " | result | loss diff "
        "| weights |\n|---|\n| 0 | " + " | ".join(cell.values()) + " | pass (refused) |  |  |\n\nRefused combinations "
        "(documented in docs/engines.md):\n\n- cell 0: `error: no`\n"
    )
    runs, rows = table.read(path)
    assert runs == ["`python scripts/matrix/run.py --strength 3` (1 of the 1 cells); launches took single 3s"]
    assert rows == {
        options.name(cell): {"result": "pass (refused)", "loss": "", "weights": "", "run": "1", "error": "error: no"}
    }
    assert "- cell 0: `error: no`" in table.render([cell], rows, runs)


def test_only_picks_cells_by_value_and_names_the_axes_on_a_typo():
    from run import only

    assert only("engine=fsdp2,engine=ddp,loss=dpo") == {"engine": {"fsdp2", "ddp"}, "loss": {"dpo"}}
    with pytest.raises(ValueError, match="'engine=fsdp' is not an axis=value.*engine: single, ddp"):
        only("engine=fsdp")

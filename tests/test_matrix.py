"""The combination matrix (issue 15): the covering-array generator, and the pairwise set of option combinations,
each cell trained on 2 processes where its engine has them and compared with one fp32 process (scripts/matrix/)."""

from __future__ import annotations

import sys
from itertools import combinations, product

import pytest
from conftest import ROOT

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

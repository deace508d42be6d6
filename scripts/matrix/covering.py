"""Covering arrays: few rows in which every combination of values of any ``strength`` axes appears at least once.

Greedy and deterministic (no randomness, ties go to the earlier axis value): each new row starts from the first
uncovered combination, then fills the other axes one by one with the value that covers the most still-uncovered
combinations among the axes already set. The result depends only on the axes (and their order) and the strength.
"""

from __future__ import annotations

from itertools import combinations, product

Row = dict[str, str]


def _uncovered(axes: dict[str, list[str]], strength: int) -> set[tuple[tuple[str, str], ...]]:
    """Every combination to cover: ``strength`` (axis, value) pairs, axes in the given order."""
    names = list(axes)
    return {
        tuple(zip(group, values))
        for group in combinations(names, min(strength, len(names)))
        for values in product(*(axes[name] for name in group))
    }


def _covered_by(row: Row, strength: int, names: list[str]) -> set[tuple[tuple[str, str], ...]]:
    present = [name for name in names if name in row]
    return {tuple((n, row[n]) for n in group) for group in combinations(present, min(strength, len(present)))}


def covering_array(axes: dict[str, list[str]], strength: int) -> list[Row]:
    """Rows (axis -> value) covering every ``strength``-wise combination of ``axes`` values (greedy, deterministic)."""
    if strength < 1:
        raise ValueError(f"strength must be at least 1, got {strength}")
    names = list(axes)
    left = _uncovered(axes, strength)
    rows: list[Row] = []
    while left:
        seed = min(left, key=lambda combo: [names.index(n) * 1000 + axes[n].index(v) for n, v in combo])
        row: Row = dict(seed)
        for name in names:
            if name in row:
                continue
            best, best_gain = axes[name][0], -1
            for value in axes[name]:
                gain = len(_covered_by({**row, name: value}, strength, names) & left)
                if gain > best_gain:
                    best, best_gain = value, gain
            row[name] = best
        left -= _covered_by(row, strength, names)
        rows.append({name: row[name] for name in names})
    return rows


def missing(rows: list[Row], axes: dict[str, list[str]], strength: int) -> set[tuple[tuple[str, str], ...]]:
    """The ``strength``-wise combinations of ``axes`` no row covers (empty for a covering array)."""
    left = _uncovered(axes, strength)
    for row in rows:
        left -= _covered_by(row, strength, list(axes))
    return left

"""The rules of a ``--mixer_list NAME AMOUNT ...`` mix: parse it, check every row, draw each dataset's rows.

AMOUNT: a number with a decimal point is a fraction of the dataset's valid rows (above 1.0 it upsamples), an integer
is a row count (above the dataset's size it upsamples: whole repeats plus a seeded remainder). Rows come from
:func:`open_instruct.data.sources.iter_rows`. Every row is validated in one pass before anything expensive happens.
The draws are deterministic for a given seed and mixer list. An evaluation mix comes either from its own mixer list or
from a held-out fraction of the training datasets' rows (held out before upsampling, so no row is in both).
:mod:`open_instruct.data.streaming` draws the preference mix with these rules; the SFT and text mixes use them too.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from open_instruct.data.formats import CHAT_ROLES, FORMATS, RowError, detect_format, missing_columns, normalize
from open_instruct.data.sources import Located
from open_instruct.errors import UserError

__all__ = [
    "MixEntry",
    "check_rows",
    "held_out_positions",
    "hold_out",
    "parse_mixer_list",
    "reindex",
    "sample_indices",
    "target_rows",
]


@dataclass(frozen=True)
class MixEntry:
    """One dataset of the mix and how much of it to take."""

    name: str
    amount: str
    split: str


def _amount_value(amount: str) -> float | None:
    """An integer count, or a fraction written with a decimal point; None for anything else."""
    try:
        return float(int(amount))
    except ValueError:
        pass
    try:
        value = float(amount)
    except ValueError:
        return None
    return value if "." in amount and math.isfinite(value) else None  # "1.0e400" is infinite: refused


def parse_mixer_list(values: list[str], splits: list[str], flag: str = "--mixer_list") -> list[MixEntry]:
    """Pairs of NAME AMOUNT plus one split for all or one split each -> entries."""
    if len(values) % 2:
        raise UserError(f"{flag} takes pairs of DATASET AMOUNT, got {len(values)} values")
    names, amounts = values[0::2], values[1::2]
    if len(splits) not in (1, len(names)):
        raise UserError(f"{flag}_splits needs 1 or {len(names)} values (one per dataset), got {len(splits)}")
    split_list = splits * len(names) if len(splits) == 1 else splits
    for name, amount in zip(names, amounts):
        value = _amount_value(amount)
        if value is None:
            raise UserError(
                f"{flag}: amount for {name!r} must be a fraction with a decimal point (0.5, 1.0) "
                f"or a row count (1000), got {amount!r}"
            )
        if value <= 0:
            raise UserError(f"{flag}: amount for {name!r} must be > 0, got {amount!r}")
    return [MixEntry(n, a, s) for n, a, s in zip(names, amounts, split_list)]


def target_rows(amount: str, size: int) -> int:
    """How many rows an AMOUNT takes from a dataset of ``size`` rows (an integer is a count, else a fraction)."""
    try:
        return int(amount)
    except ValueError:
        return int(round(float(amount) * size))


def sample_indices(size: int, n: int, rng: random.Random) -> list[int]:
    """``n`` row positions from ``range(size)``: a seeded subset, or whole repeats plus a seeded remainder."""
    if size == 0:
        return []
    repeats, remainder = divmod(n, size)
    return list(range(size)) * repeats + sorted(rng.sample(range(size), remainder))


def _summary(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def check_rows(
    name: str,
    rows: Iterable[Located],
    format_name: str,
    skip_invalid: bool,
    keep: Callable[[int, dict], None],
    roles: frozenset[str] = CHAT_ROLES,
) -> dict[str, Any]:
    """Check every row of one dataset in one streaming pass, calling ``keep(row number, pair)`` for each valid one;
    returns the report (counts per failure reason). Without ``skip_invalid`` any invalid row is an error that names
    the first one (1-based row number, and its file and line when known) and counts all of them by reason. A message
    role outside ``roles`` (those the chat template renders) is an invalid row."""
    if format_name not in ("auto", *FORMATS):
        raise UserError(f"--dataset_format must be auto or one of {', '.join(FORMATS)}, got {format_name!r}")
    report: dict[str, Any] = {"name": name, "format": format_name, "rows": 0, "valid": 0, "invalid": {}, "notes": {}}
    valid, invalid, notes, first_error = 0, Counter(), Counter(), None
    for i, (row, location) in enumerate(rows):
        report["rows"] = i + 1
        if i == 0:
            format_name = _check_columns(name, row, format_name)
            report["format"] = format_name
        row_notes: Counter = Counter()
        try:
            pair = normalize(row, format_name, row_notes, roles)
        except RowError as err:
            invalid[err.reason] += 1
            first_error = first_error or f"{name}: row {i + 1}{_where(name, location)}: {err.reason}: {err}"
            continue
        notes.update(row_notes)
        valid += 1
        keep(i, pair)
    if invalid and not skip_invalid:
        raise UserError(
            f"{first_error} ({sum(invalid.values())} invalid of {report['rows']} rows: "
            f"{_summary(invalid)}; --skip_invalid_rows drops them)"
        )
    report.update(valid=valid, invalid=dict(invalid), notes=dict(notes))
    return report


def _where(name: str, location: str | None) -> str:
    """`` (line 4)`` when the row's file is the dataset itself, `` (at FILE, line 4)`` inside a folder."""
    if not location:
        return ""
    return f" ({location.removeprefix(f'{name}, ')})" if location.startswith(f"{name}, ") else f" (at {location})"


def _check_columns(name: str, first_row: dict[str, Any], format_name: str) -> str:
    """The dataset's format: detected from its first row, or checked against it."""
    columns = list(first_row.keys())
    if format_name == "auto":
        try:
            return detect_format(columns, first_row)
        except RowError as err:
            raise UserError(f"{name}: row 1: {err}") from None
    if missing := missing_columns(columns, format_name):
        raise UserError(
            f"{name}: --dataset_format {format_name} needs column(s) {', '.join(missing)}; "
            f"the dataset has {', '.join(sorted(columns))}"
        )
    return format_name


def hold_out(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (kept, held out): a seeded ``round(fraction * len)`` of them (at least one when ``fraction``
    > 0) held out, order preserved. Rows that carry a dataset ``index`` are renumbered 0..N-1 in each part (the
    reference and evaluation tables are indexed by it)."""
    out = held_out_positions(len(rows), fraction, seed)
    kept, held = [r for i, r in enumerate(rows) if i not in out], [r for i, r in enumerate(rows) if i in out]
    if rows and "index" in rows[0]:
        return reindex(kept), reindex(held)
    return kept, held


def held_out_positions(n: int, fraction: float, seed: int) -> set[int]:
    """The positions :func:`hold_out` holds out of ``n`` rows (the streaming preparation draws them on row numbers)."""
    n_out = max(1, round(fraction * n)) if fraction > 0 else 0
    if n_out and n_out >= n:
        raise UserError(f"--eval_fraction {fraction} leaves no training pairs out of {n}")
    return set(random.Random(seed).sample(range(n), n_out))


def reindex(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same records with ``index`` renumbered 0..N-1."""
    return [{**r, "index": i} for i, r in enumerate(records)]

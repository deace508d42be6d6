"""``--mixer_list NAME AMOUNT ...`` -> one list of normalized preference pairs, each with a global ``index``.

AMOUNT: a number with a decimal point is a fraction of the dataset (above 1.0 it upsamples), an integer is a row count
(above the dataset's size it upsamples: whole repeats plus a seeded remainder). Local ``.jsonl``/``.json``/``.parquet``
files and folders of them are read directly (so errors can name file and line); anything else goes to
``datasets.load_dataset``. The result is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open_instruct.config import UserError
from open_instruct.data.formats import FORMATS, RowError, detect_format, normalize

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class MixEntry:
    """One dataset of the mix and how much of it to take."""

    name: str
    amount: str
    split: str


def parse_mixer_list(values: list[str], splits: list[str]) -> list[MixEntry]:
    """Pairs of NAME AMOUNT plus one split for all or one split each -> entries."""
    names, amounts = values[0::2], values[1::2]
    if len(splits) not in (1, len(names)):
        raise UserError(f"--mixer_list_splits needs 1 or {len(names)} values, got {len(splits)}")
    split_list = splits * len(names) if len(splits) == 1 else splits
    for name, amount in zip(names, amounts):
        try:
            float(amount)
        except ValueError:
            raise UserError(f"--mixer_list: amount for {name!r} must be a number, got {amount!r}") from None
        if float(amount) <= 0:
            raise UserError(f"--mixer_list: amount for {name!r} must be > 0, got {amount!r}")
    return [MixEntry(n, a, s) for n, a, s in zip(names, amounts, split_list)]


def target_rows(amount: str, size: int) -> int:
    """How many rows an AMOUNT takes from a dataset of ``size`` rows."""
    if "." in amount or "e" in amount.lower():
        return int(round(float(amount) * size))
    return int(amount)


def sample_indices(size: int, n: int, rng: random.Random) -> list[int]:
    """``n`` row positions from ``range(size)``: a seeded subset, or whole repeats plus a seeded remainder."""
    if size == 0:
        return []
    repeats, remainder = divmod(n, size)
    return list(range(size)) * repeats + sorted(rng.sample(range(size), remainder))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: malformed JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"dataset folder {path} holds no .jsonl, .json or .parquet files")
        return [row for f in files for row in _read_local(f)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        return data
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_rows(name: str, split: str) -> list[dict[str, Any]]:
    """All raw rows of one dataset: a local file or folder, else a ``datasets.load_dataset`` name."""
    path = Path(name).expanduser()
    if path.exists():
        return _read_local(path)
    if path.suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise UserError(f"dataset file not found: {name}")
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # hub errors come in many types; the user needs the name and the reason
        raise UserError(f"could not load dataset {name!r} (split {split!r}): {err}") from err


def normalize_rows(name: str, rows: list[dict[str, Any]], format_name: str, skip_invalid: bool) -> tuple[list, dict]:
    """Validate every row before any expensive work; returns (pairs, counts of dropped rows per reason)."""
    if not rows:
        return [], {}
    if format_name not in ("auto", *FORMATS):
        raise UserError(f"--dataset_format {format_name} is not supported yet; use one of auto, {', '.join(FORMATS)}")
    if format_name == "auto":
        try:
            format_name = detect_format(list(rows[0].keys()), rows[0])
        except RowError as err:
            raise UserError(f"{name}: row 0: {err}") from None
    pairs, dropped = [], {}
    for i, row in enumerate(rows):
        try:
            pairs.append(normalize(row, format_name))
        except RowError as err:
            if not skip_invalid:
                raise UserError(f"{name}: row {i}: {err} (--skip_invalid_rows drops such rows)") from None
            dropped[str(err)] = dropped.get(str(err), 0) + 1
            pairs.append(None)
    return pairs, dropped


def build_mix(
    entries: list[MixEntry], seed: int, format_name: str = "auto", skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load, validate and mix the datasets; each pair gets its global ``index``. Returns (pairs, statistics)."""
    rng = random.Random(seed)
    mixed: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"datasets": []}
    for entry in entries:
        rows = load_rows(entry.name, entry.split)
        pairs, dropped = normalize_rows(entry.name, rows, format_name, skip_invalid)
        valid = [p for p in pairs if p is not None]
        n = target_rows(entry.amount, len(valid))
        chosen = sample_indices(len(valid), n, rng)
        mixed.extend(valid[i] for i in chosen)
        stats["datasets"].append({"name": entry.name, "rows": len(rows), "valid": len(valid), "taken": len(chosen),
                                  "dropped_invalid": dropped})
    for index, pair in enumerate(mixed):
        mixed[index] = {"index": index, **pair}
    return mixed, stats

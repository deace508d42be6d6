"""What preparing the data did: pairs kept and dropped by reason, token lengths, padding waste; printed and saved."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def summarize(values: Sequence[int] | np.ndarray) -> dict[str, float]:
    """mean, p50, p95 (linear interpolation, as ``numpy.percentile``) and max of a list of lengths."""
    if len(values) == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    array = np.asarray(values, dtype=np.float64)
    p50, p95 = np.percentile(array, [50, 95])
    return {"mean": float(array.mean()), "p50": float(p50), "p95": float(p95), "max": int(array.max())}


def padding_waste_of_lengths(chosen: np.ndarray, rejected: np.ndarray, batch_size: int, seed: int) -> float:
    """Fraction of the ``[2B, L]`` padded-batch slots that would be padding, over one seeded shuffle into batches of
    ``batch_size`` pairs (chosen and rejected padded to one length, as the padded collator does), from the chosen and
    rejected lengths [N]."""
    if len(chosen) == 0:
        return 0.0
    order = list(range(len(chosen)))
    random.Random(seed).shuffle(order)
    shuffled_c, shuffled_r = np.asarray(chosen)[order], np.asarray(rejected)[order]
    starts = np.arange(0, len(order), batch_size)
    longest = np.maximum.reduceat(np.maximum(shuffled_c, shuffled_r), starts)
    sizes = np.diff(np.append(starts, len(order)))
    real = int(shuffled_c.sum() + shuffled_r.sum())
    slots = int((2 * sizes * longest).sum())
    return 1.0 - real / slots


def build_statistics(
    mix_stats: dict[str, Any], pairs: int, tokenized: Any, lengths: dict[str, Sequence[int] | np.ndarray]
) -> dict[str, Any]:
    """One JSON-ready summary of the training data (``tokenized`` is the tokenizer's TokenizeStats; ``lengths`` the
    per-pair prompt, chosen reply, rejected reply and longer full sequence, in tokens)."""
    invalid: dict[str, int] = {}
    for report in mix_stats.get("datasets", []):
        for reason, n in report.get("invalid", {}).items():
            invalid[reason] = invalid.get(reason, 0) + n
    return {
        **mix_stats,
        "pairs": pairs,
        "kept": tokenized.kept,
        "dropped_invalid_rows": invalid,
        "dropped": dict(tokenized.dropped),
        "truncated": tokenized.truncated,
        "boundary_token_merges": tokenized.boundary_merges,
        "reply_eos_stripped": tokenized.eos_stripped,
        "tokens": {name: summarize(values) for name, values in lengths.items()},
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def format_summary(stats: dict[str, Any]) -> str:
    """A few human-readable lines of the statistics for the console."""
    lines = []
    for report in stats.get("datasets", []):
        notes = f"; repaired: {_counts(report['notes'])}" if report.get("notes") else ""
        lines.append(
            f"data: {report['name']} [{report['format']}] {report['rows']} rows, {report['valid']} valid "
            f"(invalid: {_counts(report.get('invalid', {}))}{notes}), {report.get('taken', 0)} taken"
        )
    lines.append(
        f"data: {stats['kept']} of {stats['pairs']} pairs kept; dropped: {_counts(stats['dropped'])}; "
        f"{stats['truncated']} truncated at max_seq_length"
    )
    tokens = stats.get("tokens", {})
    for name in ("prompt", "chosen", "rejected"):
        if name in tokens:
            t = tokens[name]
            lines.append(
                f"data: {name} tokens mean {t['mean']:.1f}, p50 {t['p50']:.0f}, p95 {t['p95']:.0f}, max {t['max']}"
            )
    if "padding" in stats:
        lines.append(
            f"data: padding would waste {100 * stats['padding']['waste_fraction']:.1f}% of tokens at "
            f"batch size {stats['padding']['batch_size']}"
        )
    if "eval" in stats:
        lines.append(f"data: evaluation set {stats['eval']['kept']} pairs")
    if "cache" in stats:
        lines.append(f"data: prepared-data cache {stats['cache']['status']}: {stats['cache']['path']}")
    return "\n".join(lines)


def write_statistics(stats: dict[str, Any], output_dir: str | Path) -> Path:
    """``<output_dir>/dataset_statistics.json`` (written to a temporary name, then renamed)."""
    path = Path(output_dir) / "dataset_statistics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats, indent=2, default=str))
    os.replace(tmp, path)
    return path

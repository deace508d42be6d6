"""The data half of the recipe: mix and validate the datasets, tokenize, count what was kept and dropped."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open_instruct.config import DPOArguments, UserError
from open_instruct.data.mixer import build_mix, parse_mixer_list
from open_instruct.data.tokenize import IGNORE_INDEX, tokenize_pairs


@dataclass
class PreparedData:
    """Tokenized pairs (each with its global ``index``) and what preparing them did."""

    records: list[dict[str, Any]]
    statistics: dict[str, Any]


def _lengths(records: list[dict[str, Any]]) -> dict[str, Any]:
    def summary(values: list[int]) -> dict[str, float]:
        ordered = sorted(values)
        return {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
                "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}

    if not records:
        return {}
    prompt = [sum(1 for x in r["chosen_labels"] if x == IGNORE_INDEX) for r in records]
    chosen = [len(r["chosen_labels"]) - p for r, p in zip(records, prompt)]
    rejected = [sum(1 for x in r["rejected_labels"] if x != IGNORE_INDEX) for r in records]
    return {"prompt_tokens": summary(prompt), "chosen_tokens": summary(chosen), "rejected_tokens": summary(rejected)}


def prepare_preference_data(args: DPOArguments, tokenizer: Any, mixer_list: list[str] | None = None,
                            splits: list[str] | None = None) -> PreparedData:
    """Mix, validate, tokenize. Every malformed row is reported before any model is loaded."""
    entries = parse_mixer_list(mixer_list if mixer_list is not None else args.mixer_list,
                               splits if splits is not None else args.mixer_list_splits)
    pairs, mix_stats = build_mix(entries, args.seed, args.dataset_format, args.skip_invalid_rows)
    if args.max_train_samples is not None:
        pairs = pairs[: args.max_train_samples]
    records, tok_stats = tokenize_pairs(tokenizer, pairs, args.max_seq_length, args.add_bos)
    if not records:
        raise UserError(f"no trainable pairs left out of {len(pairs)} (dropped: {tok_stats.dropped})")
    stats = {**mix_stats, "pairs": len(pairs), "kept": tok_stats.kept, "dropped": tok_stats.dropped,
             "truncated": tok_stats.truncated, **_lengths(records)}
    return PreparedData(records, stats)


def write_statistics(stats: dict[str, Any], output_dir: str | Path) -> Path:
    """``<output_dir>/dataset_statistics.json``."""
    path = Path(output_dir) / "dataset_statistics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2))
    return path

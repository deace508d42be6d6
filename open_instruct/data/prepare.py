"""The data half of the recipe: mix and validate the datasets, tokenize, count what was kept and dropped, cache.

    data = prepare_preference_data(args, tokenizer)   # data.records, data.eval_records, data.statistics

A second run with the same inputs loads the tokenized pairs from ``--dataset_local_cache_dir`` instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from open_instruct.config import DPOArguments, UserError
from open_instruct.data import cache
from open_instruct.data.mixer import MixEntry, build_train_eval_mix, parse_mixer_list
from open_instruct.data.sources import source_fingerprint
from open_instruct.data.statistics import build_statistics, padding_waste, write_statistics
from open_instruct.data.tokenize import tokenize_pairs

__all__ = ["PreparedData", "prepare_preference_data", "write_statistics"]


@dataclass
class PreparedData:
    """Tokenized training pairs (``index`` 0..N-1), evaluation pairs (own ``index`` 0..M-1), and what it took."""

    records: list[dict[str, Any]]
    statistics: dict[str, Any]
    eval_records: list[dict[str, Any]] = field(default_factory=list)


def _key_inputs(args: DPOArguments, tokenizer: Any, train: list[MixEntry], evaluation: list[MixEntry]) -> dict:
    def describe(entries: list[MixEntry]) -> list[dict[str, Any]]:
        return [{"amount": e.amount, **source_fingerprint(e.name, e.split)} for e in entries]

    return {
        "train": describe(train),
        "eval": describe(evaluation),
        "eval_fraction": args.eval_fraction,
        "format": args.dataset_format,
        "skip_invalid_rows": args.skip_invalid_rows,
        "seed": args.seed,
        "max_train_samples": args.max_train_samples,
        "max_seq_length": args.max_seq_length,
        "max_response_length": args.max_response_length,
        "add_bos": args.add_bos,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
    }


def _cap(pairs: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """At most ``limit`` pairs: a seeded subset of the whole mix (not the first datasets' rows), order kept."""
    if limit is None or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def _tokenize_mix(
    args: DPOArguments, tokenizer: Any, train_pairs: list, eval_pairs: list, mix_stats: dict[str, Any]
) -> tuple[list, list, dict[str, Any]]:
    records, tok_stats = tokenize_pairs(
        tokenizer, train_pairs, args.max_seq_length, args.add_bos, args.max_response_length
    )
    if not records:
        raise UserError(
            f"no trainable pairs left out of {len(train_pairs)} (dropped: {tok_stats.dropped}); "
            f"check --max_seq_length {args.max_seq_length}"
        )
    stats = build_statistics(mix_stats, len(train_pairs), tok_stats, records)
    eval_records: list[dict[str, Any]] = []
    if eval_pairs:
        eval_records, eval_tok = tokenize_pairs(
            tokenizer, eval_pairs, args.max_seq_length, args.add_bos, args.max_response_length
        )
        stats["eval"] = {
            "pairs": len(eval_pairs),
            "kept": eval_tok.kept,
            "dropped": eval_tok.dropped,
            "truncated": eval_tok.truncated,
        }
    return records, eval_records, stats


def prepare_preference_data(
    args: DPOArguments, tokenizer: Any, mixer_list: list[str] | None = None, splits: list[str] | None = None
) -> PreparedData:
    """Mix, validate, tokenize (or load all that from the cache). Malformed rows are reported before any model loads.

    ``mixer_list``/``splits`` replace ``args.mixer_list``/``args.mixer_list_splits`` when given. The evaluation mix
    comes from ``args.eval_mixer_list`` or ``args.eval_fraction`` (empty when neither is set).
    """
    train_entries = parse_mixer_list(
        mixer_list if mixer_list is not None else args.mixer_list,
        splits if splits is not None else args.mixer_list_splits,
    )
    eval_entries = (
        parse_mixer_list(args.eval_mixer_list, args.eval_mixer_list_splits, "--eval_mixer_list")
        if args.eval_mixer_list
        else []
    )
    key = cache.cache_key(_key_inputs(args, tokenizer, train_entries, eval_entries))
    path = cache.entry_path(args.dataset_local_cache_dir, key)
    cached = cache.load(args.dataset_local_cache_dir, key)
    if cached is not None:
        records, eval_records, stats = cached
        status = "loaded"
    else:
        train_pairs, eval_pairs, mix_stats = build_train_eval_mix(
            train_entries, eval_entries, args.eval_fraction, args.seed, args.dataset_format, args.skip_invalid_rows
        )
        train_pairs = _cap(train_pairs, args.max_train_samples, args.seed)
        records, eval_records, stats = _tokenize_mix(args, tokenizer, train_pairs, eval_pairs, mix_stats)
        cache.save(args.dataset_local_cache_dir, key, records, eval_records, stats)
        status = "written"
    stats["cache"] = {"status": status, "path": str(path)}
    batch = args.per_device_train_batch_size
    stats["padding"] = {"batch_size": batch, "waste_fraction": padding_waste(records, batch, args.seed)}
    return PreparedData(records, stats, eval_records)
